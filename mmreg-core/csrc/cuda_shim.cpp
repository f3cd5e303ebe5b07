// CUDA memory statistics from PyTorch's caching allocator, which tch does not expose. Every function
// catches C++ exceptions and returns non-zero instead, so nothing unwinds into Rust.
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
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
