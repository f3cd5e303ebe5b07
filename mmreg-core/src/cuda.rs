//! CUDA memory statistics of the caching allocator, through the C++ shim in `csrc/cuda_shim.cpp`.
//! Every function returns `None` (or does nothing) where CUDA or the shim is unavailable.

/// Bytes held by PyTorch's caching allocator on one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    pub allocated: u64,
    pub reserved: u64,
    pub peak_allocated: u64,
    pub peak_reserved: u64,
}

pub use shim::{empty_cache, mem_get_info, memory_stats, reset_peak_stats};

#[cfg(mmreg_cuda_shim)]
mod shim {
    use super::MemoryStats;

    extern "C" {
        fn mmreg_cuda_memory_stats(device: i32, out: *mut i64) -> i32;
        fn mmreg_cuda_reset_peak_stats(device: i32) -> i32;
        fn mmreg_cuda_empty_cache() -> i32;
        fn mmreg_cuda_mem_get_info(device: i32, out: *mut i64) -> i32;
    }

    pub fn memory_stats(device: usize) -> Option<MemoryStats> {
        if !tch::Cuda::is_available() {
            return None;
        }
        let mut out = [0i64; 4];
        // SAFETY: the shim writes exactly four values and catches every C++ exception.
        let status = unsafe { mmreg_cuda_memory_stats(device as i32, out.as_mut_ptr()) };
        let [allocated, reserved, peak_allocated, peak_reserved] = out.map(|v| v as u64);
        (status == 0).then_some(MemoryStats {
            allocated,
            reserved,
            peak_allocated,
            peak_reserved,
        })
    }

    /// Free and total memory of the device in bytes, as the driver sees it.
    pub fn mem_get_info(device: usize) -> Option<(u64, u64)> {
        if !tch::Cuda::is_available() {
            return None;
        }
        let mut out = [0i64; 2];
        // SAFETY: the shim writes two values and catches every C++ exception.
        let status = unsafe { mmreg_cuda_mem_get_info(device as i32, out.as_mut_ptr()) };
        (status == 0).then_some((out[0] as u64, out[1] as u64))
    }

    /// Starts a new peak measurement.
    pub fn reset_peak_stats(device: usize) {
        if tch::Cuda::is_available() {
            // SAFETY: the shim catches every C++ exception.
            unsafe { mmreg_cuda_reset_peak_stats(device as i32) };
        }
    }

    /// Returns cached, unused blocks to the driver.
    pub fn empty_cache() {
        if tch::Cuda::is_available() {
            // SAFETY: the shim catches every C++ exception.
            unsafe { mmreg_cuda_empty_cache() };
        }
    }
}

#[cfg(not(mmreg_cuda_shim))]
mod shim {
    use super::MemoryStats;

    pub fn memory_stats(_device: usize) -> Option<MemoryStats> {
        None
    }

    pub fn mem_get_info(_device: usize) -> Option<(u64, u64)> {
        None
    }

    pub fn reset_peak_stats(_device: usize) {}

    pub fn empty_cache() {}
}
