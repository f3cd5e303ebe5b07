// What tch does not expose of libtorch's CUDA side: the caching allocator's memory statistics and CUDA
// graphs. Every function catches C++ exceptions and returns non-zero instead, so nothing unwinds into Rust.
#include <ATen/cuda/CUDAGraph.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <dlfcn.h>
#include <cstdint>

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
