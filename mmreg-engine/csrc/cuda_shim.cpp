// What tch does not expose of libtorch's CUDA side: the caching allocator's memory statistics, CUDA
// graphs, the profiler, and launching kernels of our own. Every function catches C++ exceptions and
// returns non-zero instead, so nothing unwinds into Rust.
#include <ATen/cuda/CUDAGraph.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <dlfcn.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {
constexpr size_t kAggregate = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
}

extern "C" {

// out: allocated, reserved, peak allocated, peak reserved (bytes).
int mmreg_cuda_memory_stats(int device, int64_t* out) {
  try {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    out[0] = stats.allocated_bytes[kAggregate].current;
    out[1] = stats.reserved_bytes[kAggregate].current;
    out[2] = stats.allocated_bytes[kAggregate].peak;
    out[3] = stats.reserved_bytes[kAggregate].peak;
    return 0;
  } catch (...) {
    return 1;
  }
}

int mmreg_cuda_reset_peak_stats(int device) {
  try {
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return 1;
  }
}

int mmreg_cuda_empty_cache() {
  try {
    c10::cuda::CUDACachingAllocator::emptyCache();
    return 0;
  } catch (...) {
    return 1;
  }
}

// cudaMemGetInfo, looked up in the CUDA runtime that libtorch_cuda already loaded, so that nothing here
// links against a versioned libcudart. out: free, total (bytes).
int mmreg_cuda_mem_get_info(int device, int64_t* out) {
  try {
    using MemGetInfo = int (*)(size_t*, size_t*);
    auto mem_get_info = reinterpret_cast<MemGetInfo>(dlsym(RTLD_DEFAULT, "cudaMemGetInfo"));
    if (mem_get_info == nullptr) {
      return 2;
    }
    auto previous = c10::cuda::current_device();
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    size_t free = 0, total = 0;
    int status = mem_get_info(&free, &total);
    c10::cuda::set_device(previous);
    if (status != 0) {
      return 3;
    }
    out[0] = static_cast<int64_t>(free);
    out[1] = static_cast<int64_t>(total);
    return 0;
  } catch (...) {
    return 1;
  }
}
}

// Events: the host waits for what was queued on the device's current stream up to the record, not for
// what was queued after it (a step's sampled tokens while the next step runs). The runtime's functions
// are looked up in the CUDA runtime libtorch_cuda loaded, as cudaMemGetInfo above.
namespace {
struct EventApi {
  int (*create)(void**, unsigned);
  int (*record)(void*, void*);
  int (*synchronize)(void*);
  int (*destroy)(void*);
};

const EventApi* event_api() {
  static const EventApi api = {
      reinterpret_cast<int (*)(void**, unsigned)>(dlsym(RTLD_DEFAULT, "cudaEventCreateWithFlags")),
      reinterpret_cast<int (*)(void*, void*)>(dlsym(RTLD_DEFAULT, "cudaEventRecord")),
      reinterpret_cast<int (*)(void*)>(dlsym(RTLD_DEFAULT, "cudaEventSynchronize")),
      reinterpret_cast<int (*)(void*)>(dlsym(RTLD_DEFAULT, "cudaEventDestroy")),
  };
  bool found = api.create && api.record && api.synchronize && api.destroy;
  return found ? &api : nullptr;
}

constexpr unsigned kEventDisableTiming = 0x02;
}  // namespace

extern "C" {

// A new event recorded on the current stream of `device`, or null.
void* mmreg_event_record(int device) {
  try {
    const EventApi* api = event_api();
    if (api == nullptr) {
      return nullptr;
    }
    auto index = static_cast<c10::DeviceIndex>(device);
    auto previous = c10::cuda::current_device();
    c10::cuda::set_device(index);
    void* event = nullptr;
    int status = api->create(&event, kEventDisableTiming);
    if (status == 0) {
      status = api->record(event, c10::cuda::getCurrentCUDAStream(index).stream());
    }
    c10::cuda::set_device(previous);
    if (status != 0) {
      if (event != nullptr) {
        api->destroy(event);
      }
      return nullptr;
    }
    return event;
  } catch (...) {
    return nullptr;
  }
}

int mmreg_event_synchronize(void* event) {
  const EventApi* api = event_api();
  return api == nullptr ? 1 : api->synchronize(event);
}

void mmreg_event_free(void* event) {
  const EventApi* api = event_api();
  if (api != nullptr) {
    api->destroy(event);
  }
}

// A host tensor in pinned memory (itself if it is pinned already): a later copy to a device from it is one
// asynchronous copy, with no memcpy into a pinned buffer first. A new `torch::Tensor*`, or null.
void* mmreg_pin_memory(void* host) {
  try {
    const auto& source = *static_cast<at::Tensor*>(host);
    return new at::Tensor(source.pin_memory());
  } catch (...) {
    return nullptr;
  }
}

// A host tensor copied into `target`, a CUDA tensor of its shape and dtype (both tch's `C_tensor*`),
// without the host waiting for the stream: through pinned memory, which the caching host allocator keeps
// until the copy has run. 0, or -1 on failure.
int mmreg_copy_into_async(void* target, void* host) {
  try {
    auto& dst = *static_cast<at::Tensor*>(target);
    const auto& source = *static_cast<at::Tensor*>(host);
    dst.copy_(source.pin_memory(), /*non_blocking=*/true);
    return 0;
  } catch (...) {
    return -1;
  }
}

// A host tensor (tch's `C_tensor*`, a `torch::Tensor*`) copied to `device` without the host waiting for
// the stream: through pinned memory, which the caching host allocator keeps until the copy has run. A new
// `torch::Tensor*` (owned by the caller), or null.
void* mmreg_to_device_async(void* host, int device) {
  try {
    const auto& source = *static_cast<at::Tensor*>(host);
    auto on_device = at::TensorOptions().device(at::kCUDA, static_cast<c10::DeviceIndex>(device));
    auto target = source.pin_memory().to(on_device, /*non_blocking=*/true);
    return new at::Tensor(std::move(target));
  } catch (...) {
    return nullptr;
  }
}
}

// CUDA graphs (tch has none): capture the kernels a closure launches on a side stream, replay them later
// with one launch. All graphs share one memory pool, so their intermediates reuse the same memory; they
// must then be replayed one at a time, which the engine's single scheduler thread guarantees.
struct MmregGraph {
  at::cuda::CUDAGraph graph;
  c10::cuda::CUDAStream stream;
  c10::DeviceIndex device;
  explicit MmregGraph(c10::DeviceIndex d) : stream(c10::cuda::getStreamFromPool(false, d)), device(d) {}
};

extern "C" {

void* mmreg_graph_new(int device) {
  try {
    return new MmregGraph(static_cast<c10::DeviceIndex>(device));
  } catch (...) {
    return nullptr;
  }
}

void mmreg_graph_free(void* graph) {
  try {
    delete static_cast<MmregGraph*>(graph);
  } catch (...) {
  }
}

// Makes the graph's side stream current on this thread (after the device is idle), so that what runs
// next is ordered on it: the warm-up, then the capture.
int mmreg_graph_enter_stream(void* graph) {
  try {
    auto* g = static_cast<MmregGraph*>(graph);
    c10::cuda::device_synchronize();
    c10::cuda::setCurrentCUDAStream(g->stream);
    return 0;
  } catch (...) {
    return 1;
  }
}

// Waits for the side stream and makes the device's default stream current again.
int mmreg_graph_leave_stream(void* graph) {
  try {
    auto* g = static_cast<MmregGraph*>(graph);
    g->stream.synchronize();
    c10::cuda::setCurrentCUDAStream(c10::cuda::getDefaultCUDAStream(g->device));
    return 0;
  } catch (...) {
    return 1;
  }
}

// pool: the shared pool's id (both zero: a new pool). Thread-local capture mode: worker threads that
// allocate or copy meanwhile do not invalidate the capture.
int mmreg_graph_capture_begin(void* graph, uint64_t pool0, uint64_t pool1) {
  try {
    auto* g = static_cast<MmregGraph*>(graph);
    g->graph.capture_begin({pool0, pool1}, cudaStreamCaptureModeThreadLocal);
    return 0;
  } catch (...) {
    return 1;
  }
}

// Ends the capture; out: the pool's id, for the next graph to share.
int mmreg_graph_capture_end(void* graph, uint64_t* out) {
  try {
    auto* g = static_cast<MmregGraph*>(graph);
    g->graph.capture_end();
    auto pool = g->graph.pool();
    out[0] = pool.first;
    out[1] = pool.second;
    return 0;
  } catch (...) {
    return 1;
  }
}

// Launches the captured kernels on the current stream.
int mmreg_graph_replay(void* graph) {
  try {
    static_cast<MmregGraph*>(graph)->graph.replay();
    return 0;
  } catch (...) {
    return 1;
  }
}
}

// libtorch's Kineto profiler (what torch.profiler drives in Python): CPU ops of this thread and every CUDA
// kernel, memcpy and graph launch on the device, saved as a Chrome trace.
extern "C" {

int mmreg_profiler_start() {
  try {
    using namespace torch::profiler::impl;
    ProfilerConfig config(ProfilerState::KINETO);
    std::set<ActivityType> activities{ActivityType::CPU, ActivityType::CUDA};
    torch::autograd::profiler::prepareProfiler(config, activities);
    torch::autograd::profiler::enableProfiler(config, activities);
    return 0;
  } catch (...) {
    return 1;
  }
}

int mmreg_profiler_stop(const char* path) {
  try {
    auto result = torch::autograd::profiler::disableProfiler();
    if (!result) {
      return 2;
    }
    result->save(path);
    return 0;
  } catch (...) {
    return 1;
  }
}
}

// Kernels of our own (src/kernels.rs): CUDA C compiled at run time by NVRTC for the current device's
// architecture, loaded and launched on libtorch's current stream through the driver API, so that a launch
// inside a graph capture is captured. NVRTC and the driver are looked up with dlopen: libtorch_cuda loads
// neither at link time, and the build machine has no driver.
namespace {

using NvrtcProgram = void*;
struct Nvrtc {
  int (*create)(NvrtcProgram*, const char*, const char*, int, const char* const*, const char* const*);
  int (*compile)(NvrtcProgram, int, const char* const*);
  int (*log_size)(NvrtcProgram, size_t*);
  int (*log)(NvrtcProgram, char*);
  int (*cubin_size)(NvrtcProgram, size_t*);
  int (*cubin)(NvrtcProgram, char*);
  int (*destroy)(NvrtcProgram*);
};

struct Driver {
  int (*module_load_data)(void**, const void*);
  int (*module_get_function)(void**, void*, const char*);
  int (*launch_kernel)(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                       void*, void**, void**);
  // cuOccupancyMaxActiveBlocksPerMultiprocessor: optional (null where the driver lacks it).
  int (*occupancy)(int*, void*, int, size_t);
  // cuLaunchKernelEx, for programmatic dependent launches: optional too.
  int (*launch_kernel_ex)(const CUlaunchConfig*, void*, void**, void**);
};

// The directory of libtorch's libraries (torch/lib): pip's wheels put NVRTC in ../../nvidia/cu13/lib.
std::string torch_lib_dir() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&c10::cuda::current_device), &info) == 0 || info.dli_fname == nullptr) {
    return "";
  }
  std::string path(info.dli_fname);
  auto slash = path.rfind('/');
  return slash == std::string::npos ? "" : path.substr(0, slash);
}

void* open_first(const std::vector<std::string>& names) {
  for (const auto& name : names) {
    if (void* handle = dlopen(name.c_str(), RTLD_NOW | RTLD_GLOBAL)) {
      return handle;
    }
  }
  return nullptr;
}

template <typename F>
bool find(void* lib, const char* name, F& out) {
  out = reinterpret_cast<F>(dlsym(lib, name));
  return out != nullptr;
}

// The driver's entry points, looked up once (null where there is no driver: a machine without a GPU).
const Driver* driver() {
  static const Driver* found = [] () -> const Driver* {
    static Driver d;
    void* lib = open_first({"libcuda.so.1", "libcuda.so"});
    bool ok = lib != nullptr && find(lib, "cuModuleLoadData", d.module_load_data) &&
              find(lib, "cuModuleGetFunction", d.module_get_function) &&
              find(lib, "cuLaunchKernel", d.launch_kernel);
    if (ok) {
      find(lib, "cuOccupancyMaxActiveBlocksPerMultiprocessor", d.occupancy);
      find(lib, "cuLaunchKernelEx", d.launch_kernel_ex);
    }
    return ok ? &d : nullptr;
  }();
  return found;
}

// cudaDeviceGetAttribute from the runtime libtorch_cuda loaded (as for cudaMemGetInfo above): `attribute`
// of `device` into `out`; false where it cannot say.
bool device_attribute(cudaDeviceAttr attribute, int device, int& out) {
  using GetAttribute = int (*)(int*, int, int);
  static auto get_attribute =
      reinterpret_cast<GetAttribute>(dlsym(RTLD_DEFAULT, "cudaDeviceGetAttribute"));
  return get_attribute != nullptr && get_attribute(&out, attribute, device) == 0;
}

void set_error(char* error, size_t capacity, const std::string& message) {
  if (capacity == 0) {
    return;
  }
  size_t n = std::min(capacity - 1, message.size());
  memcpy(error, message.data(), n);
  error[n] = '\0';
}

// Compiles `source` with NVRTC for compute capability major.minor into `cubin`, and NVRTC's log into `log`
// (with `report`, ptxas's registers, stack frame and spills of every kernel); on failure returns false
// with why (the log included). Needs no GPU.
bool nvrtc_compile(const char* source, int major, int minor, bool report, std::string& cubin,
                   std::string& log, std::string& why) {
  // NVRTC opens its builtins library by name when it compiles; loading that first from the wheel's
  // directory lets the by-name lookup find it without LD_LIBRARY_PATH.
  std::string wheel = torch_lib_dir() + "/../../nvidia/cu13/lib/";
  dlopen((wheel + "libnvrtc-builtins.so.13.0").c_str(), RTLD_NOW | RTLD_GLOBAL);
  void* lib = open_first({"libnvrtc.so.13", wheel + "libnvrtc.so.13"});
  if (lib == nullptr) {
    why = "NVRTC (libnvrtc.so.13, CUDA 13 as pip's torch 2.11) not found";
    return false;
  }
  Nvrtc nvrtc;
  if (!find(lib, "nvrtcCreateProgram", nvrtc.create) || !find(lib, "nvrtcCompileProgram", nvrtc.compile) ||
      !find(lib, "nvrtcGetProgramLogSize", nvrtc.log_size) || !find(lib, "nvrtcGetProgramLog", nvrtc.log) ||
      !find(lib, "nvrtcGetCUBINSize", nvrtc.cubin_size) || !find(lib, "nvrtcGetCUBIN", nvrtc.cubin) ||
      !find(lib, "nvrtcDestroyProgram", nvrtc.destroy)) {
    why = "NVRTC lacks a function mmreg needs";
    return false;
  }
  std::string arch = "--gpu-architecture=sm_" + std::to_string(major) + std::to_string(minor);
  // --fmad=false: a product and a sum stay two roundings, as in libtorch's separate kernels.
  const char* options[] = {arch.c_str(), "--std=c++17", "--fmad=false", "--ptxas-options=--verbose"};
  NvrtcProgram program = nullptr;
  if (nvrtc.create(&program, source, "mmreg_fused_kernels.cu", 0, nullptr, nullptr) != 0) {
    why = "nvrtcCreateProgram failed";
    return false;
  }
  bool ok = nvrtc.compile(program, report ? 4 : 3, options) == 0;
  size_t size = 0;
  nvrtc.log_size(program, &size);
  log.assign(size, '\0');
  nvrtc.log(program, log.data());
  log.resize(strnlen(log.data(), log.size()));
  if (!ok) {
    why = "NVRTC compile (" + arch + ") failed: " + log;
  } else {
    nvrtc.cubin_size(program, &size);
    cubin.assign(size, '\0');
    nvrtc.cubin(program, cubin.data());
  }
  nvrtc.destroy(&program);
  return ok;
}

// Runs `body` (which returns a status), turning a C++ exception into status 1 with its message in `error`.
template <typename F>
int guarded(char* error, size_t capacity, F body) {
  try {
    return body();
  } catch (const std::exception& e) {
    set_error(error, capacity, e.what());
  } catch (...) {
    set_error(error, capacity, "unknown C++ exception");
  }
  return 1;
}

}  // namespace

extern "C" {

// Compiles `source` for compute capability major.minor without loading it; *size receives the cubin's
// size and `report` ptxas's account of every kernel's registers, stack frame and spills. For checking the
// kernels where there is no GPU.
int mmreg_kernels_compile(const char* source, int major, int minor, size_t* size, char* report,
                          size_t report_capacity, char* error, size_t capacity) {
  return guarded(error, capacity, [&] {
    std::string cubin, log, why;
    if (!nvrtc_compile(source, major, minor, true, cubin, log, why)) {
      set_error(error, capacity, why);
      return 2;
    }
    set_error(report, report_capacity, log);
    *size = cubin.size();
    return 0;
  });
}

// Compiles `source` for `device` and loads it; *module receives the handle. On failure returns non-zero
// and writes why into `error`.
int mmreg_kernels_load(int device, const char* source, void** module, char* error, size_t capacity) {
  return guarded(error, capacity, [&] {
    const Driver* cuda = driver();
    if (cuda == nullptr) {
      set_error(error, capacity, "the CUDA driver (libcuda.so.1, with the functions mmreg calls) not found");
      return 4;
    }
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    // cuModuleLoadData needs the device's primary context current on this thread. set_device does
    // not make it so where the device is already the current one and nothing on this thread has used
    // CUDA yet (the first call of a process, or of a new thread); cudaFree(nullptr), from the runtime
    // libtorch_cuda loaded, does.
    using Free = int (*)(void*);
    static auto cuda_free = reinterpret_cast<Free>(dlsym(RTLD_DEFAULT, "cudaFree"));
    if (cuda_free != nullptr) {
      cuda_free(nullptr);
    }
    int major = 0, minor = 0;
    if (!device_attribute(cudaDevAttrComputeCapabilityMajor, device, major) ||
        !device_attribute(cudaDevAttrComputeCapabilityMinor, device, minor)) {
      set_error(error, capacity, "cannot read the device's compute capability");
      return 9;
    }
    std::string cubin, log, why;
    if (!nvrtc_compile(source, major, minor, false, cubin, log, why)) {
      set_error(error, capacity, why);
      return 7;
    }
    int loaded = cuda->module_load_data(module, cubin.data());
    if (loaded != 0) {
      set_error(error, capacity, "cuModuleLoadData failed with CUDA error " + std::to_string(loaded));
      return 8;
    }
    return 0;
  });
}

// The kernel `name` of a loaded module, or null.
void* mmreg_kernels_function(void* module, const char* name) {
  try {
    const Driver* cuda = driver();
    void* function = nullptr;
    return cuda != nullptr && cuda->module_get_function(&function, module, name) == 0 ? function : nullptr;
  } catch (...) {
    return nullptr;
  }
}

// How many blocks of `block` threads of `function` are resident on the whole of `device` at once (the
// driver's occupancy per SM, times its SMs), in *out; non-zero where the driver cannot say.
int mmreg_kernels_resident(void* function, int device, unsigned block, long long* out) {
  try {
    const Driver* cuda = driver();
    int per_sm = 0, sms = 0;
    if (cuda == nullptr || cuda->occupancy == nullptr ||
        cuda->occupancy(&per_sm, function, static_cast<int>(block), 0) != 0 ||
        !device_attribute(cudaDevAttrMultiProcessorCount, device, sms)) {
      return 1;
    }
    *out = static_cast<long long>(per_sm) * sms;
    return 0;
  } catch (...) {
    return 2;
  }
}

// Whether `device` takes programmatic dependent launches (compute capability 9.0 or later, and a driver
// with cuLaunchKernelEx): 1 or 0.
int mmreg_kernels_programmatic(int device) {
  try {
    const Driver* cuda = driver();
    int major = 0;
    return cuda != nullptr && cuda->launch_kernel_ex != nullptr &&
                   device_attribute(cudaDevAttrComputeCapabilityMajor, device, major) && major >= 9
               ? 1
               : 0;
  } catch (...) {
    return 0;
  }
}

// Launches `function` (loaded for `device`) on that device's current stream; `args` point at the
// arguments. The device is made current for the launch: libtorch's allocator restores the previous device
// after allocating, so the calling thread's current device may be another. With `programmatic` (where
// mmreg_kernels_programmatic says yes), the launch lets the kernel start before the one before it in the
// stream has finished (the kernel waits for it itself: begin_kernel in csrc/fused_kernels.cu); a stream
// capture records that as a programmatic edge of the graph.
int mmreg_kernels_launch(void* function, int device, unsigned grid_x, unsigned grid_y, unsigned block,
                         void** args, int programmatic) {
  try {
    const Driver* cuda = driver();
    if (cuda == nullptr) {
      return 2;
    }
    auto index = static_cast<c10::DeviceIndex>(device);
    auto previous = c10::cuda::current_device();
    if (previous != index) {
      c10::cuda::set_device(index);
    }
    void* stream = c10::cuda::getCurrentCUDAStream(index).stream();
    int status;
    if (programmatic != 0 && cuda->launch_kernel_ex != nullptr) {
      CUlaunchAttribute attribute;
      memset(&attribute, 0, sizeof(attribute));
      attribute.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
      attribute.value.programmaticStreamSerializationAllowed = 1;
      CUlaunchConfig config;
      memset(&config, 0, sizeof(config));
      config.gridDimX = grid_x;
      config.gridDimY = grid_y;
      config.gridDimZ = 1;
      config.blockDimX = block;
      config.blockDimY = 1;
      config.blockDimZ = 1;
      config.hStream = static_cast<CUstream>(stream);
      config.attrs = &attribute;
      config.numAttrs = 1;
      status = cuda->launch_kernel_ex(&config, function, args, nullptr);
    } else {
      status = cuda->launch_kernel(function, grid_x, grid_y, 1, block, 1, 1, 0, stream, args, nullptr);
    }
    if (previous != index) {
      c10::cuda::set_device(previous);
    }
    return status;
  } catch (...) {
    return 1;
  }
}
}
