//! What tch lacks of libtorch's CUDA side, through the C++ shim in `csrc/cuda_shim.cpp`: memory
//! statistics of the caching allocator, CUDA graphs and the Kineto profiler. The statistics are `None`
//! (and the other calls do nothing) where CUDA or the shim is unavailable; capturing a graph or profiling
//! there is an error.

use mmreg_core::{Error, Result};

/// Bytes held by PyTorch's caching allocator on one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    pub allocated: u64,
    pub reserved: u64,
    pub peak_allocated: u64,
    pub peak_reserved: u64,
}

pub use shim::{empty_cache, mem_get_info, memory_stats, reset_peak_stats};

/// Records every CUDA kernel, copy and graph launch on the device (and this thread's CPU ops) with
/// libtorch's Kineto profiler until [`stop_profiler`] saves them as a Chrome trace (chrome://tracing,
/// Perfetto). For benchmarks.
pub fn start_profiler() -> Result<()> {
    shim::profiler_start()
}

/// Stops the profiler and writes the trace to `path`.
pub fn stop_profiler(path: &std::path::Path) -> Result<()> {
    shim::profiler_stop(path)
}

/// Whether [`Graph::capture`] can work in this build and on this machine, and is not switched off with
/// `MMREG_NO_CUDA_GRAPHS=1` (everything then runs eagerly, as with vLLM's `enforce_eager`).
pub fn graphs_available() -> bool {
    let off = std::env::var("MMREG_NO_CUDA_GRAPHS").is_ok_and(|v| !v.is_empty() && v != "0");
    cfg!(mmreg_cuda_shim) && !off && tch::Cuda::is_available()
}

/// A captured sequence of kernels, replayed with one launch. The tensors the captured code read and wrote
/// keep their addresses: refill the inputs in place (`copy_`) before [`Graph::replay`], and read the
/// outputs it returned at capture afterwards.
pub struct Graph {
    raw: shim::RawGraph,
}

/// The memory pool graphs share (see [`Graph::capture`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GraphPool(u64, u64);

impl Graph {
    /// Runs `f` once on a side stream to warm up (lazy initialisation, cuBLAS workspaces), then again under
    /// capture, and returns the graph with what the captured run returned and the pool its
    /// intermediates live in: `pool` (a new one if `None`), to pass to the next capture. Graphs sharing a
    /// pool must not run concurrently, and one graph's outputs may be overwritten by another's replay.
    pub fn capture<T>(
        device: usize,
        pool: Option<GraphPool>,
        mut f: impl FnMut() -> Result<T>,
    ) -> Result<(Graph, T, GraphPool)> {
        if !graphs_available() {
            return Err(Error::Engine(
                "CUDA graphs are unavailable: no CUDA device or no CUDA shim in this build".into(),
            ));
        }
        let raw = shim::RawGraph::new(device)?;
        raw.enter_stream()?;
        let warm = f().map(drop);
        let captured = warm.and_then(|()| {
            raw.capture_begin(pool.unwrap_or(GraphPool(0, 0)))?;
            let result = f();
            // End the capture even when `f` failed, so the stream is usable again.
            let ended = raw.capture_end();
            Ok((result?, ended?))
        });
        let left = raw.leave_stream();
        let (value, pool) = captured?;
        left?;
        Ok((Graph { raw }, value, pool))
    }

    /// Launches the captured kernels on the current stream.
    pub fn replay(&self) -> Result<()> {
        self.raw.replay()
    }
}

/// A point in the current CUDA stream's queue that the host can wait for: what was queued before the
/// record, not what was queued after it. Off CUDA (everything there is synchronous) it is a no-op.
pub struct Event {
    raw: Option<shim::RawEvent>,
}

impl Event {
    /// Records the point on the current stream of `device`; a no-op off CUDA.
    pub fn record(device: tch::Device) -> Result<Self> {
        let raw = match device {
            tch::Device::Cuda(i) => Some(shim::RawEvent::record(i)?),
            _ => None,
        };
        Ok(Self { raw })
    }

    /// Blocks until everything queued before the record has run.
    pub fn wait(&self) -> Result<()> {
        self.raw.as_ref().map_or(Ok(()), shim::RawEvent::wait)
    }
}

/// Whether [`Event`] and [`upload`]'s pinned copies work on this build's CUDA devices (they need the CUDA
/// shim).
pub fn events_available() -> bool {
    cfg!(mmreg_cuda_shim)
}

/// Whether [`upload`] copies through pinned memory: unless `MMREG_ASYNC_UPLOADS=0` or without the shim.
fn pinned_uploads() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        events_available() && !std::env::var("MMREG_ASYNC_UPLOADS").is_ok_and(|v| v == "0")
    })
}

/// A host tensor bound for CUDA `device`, in pinned memory, so that its [`upload`] is one asynchronous
/// copy with no memcpy into a pinned buffer first (the preprocessing workers pin an item's pixels, off
/// the scheduler's path). `None` where uploads do not go through pinned memory (another device,
/// `MMREG_ASYNC_UPLOADS=0`, no shim), for a tensor that is not on the host, or where pinning fails.
pub fn pinned(tensor: &tch::Tensor, device: tch::Device) -> Option<tch::Tensor> {
    let wanted = device.is_cuda() && pinned_uploads() && tensor.device() == tch::Device::Cpu;
    wanted.then(|| shim::pin_memory(tensor).ok()).flatten()
}

/// `tensor` on `device`. A host tensor bound for a CUDA device goes through pinned memory, its copy
/// queued behind the work the stream already holds without the host waiting for it (plain copies from
/// pageable memory wait for the whole stream): a step's small inputs (token ids, slots, positions) are
/// then issued while the GPU still runs what came before. `MMREG_ASYNC_UPLOADS=0` makes plain copies, as
/// does a failure to pin (logged once). Anything else: `to_device`.
pub fn upload(tensor: &tch::Tensor, device: tch::Device) -> Result<tch::Tensor> {
    static FAILED: std::sync::Once = std::sync::Once::new();
    match device {
        tch::Device::Cuda(i) if pinned_uploads() && tensor.device() == tch::Device::Cpu => {
            shim::to_device_async(tensor, i).or_else(|error| {
                FAILED.call_once(
                    || tracing::warn!(%error, "pinned copies failed; copying from pageable memory"),
                );
                Ok(tensor.f_to_device(device)?)
            })
        }
        _ => Ok(tensor.f_to_device(device)?),
    }
}

/// `source` copied into `target`, a tensor of its shape and dtype, without the host waiting: a host
/// tensor into a CUDA one straight from pinned memory (one asynchronous copy, where [`upload`] and a
/// copy on the device would take two); anything else through [`upload`] and `copy_`. A failure to pin
/// falls back the same way (logged once).
pub fn upload_into(target: &mut tch::Tensor, source: &tch::Tensor) -> Result<()> {
    static FAILED: std::sync::Once = std::sync::Once::new();
    if target.device().is_cuda() && pinned_uploads() && source.device() == tch::Device::Cpu {
        match shim::copy_into_async(target, source) {
            Ok(()) => return Ok(()),
            Err(error) => FAILED.call_once(
                || tracing::warn!(%error, "pinned copies failed; copying through a device tensor"),
            ),
        }
    }
    target.f_copy_(&upload(source, target.device())?)?;
    Ok(())
}

#[cfg(mmreg_cuda_shim)]
mod shim {
    use super::{GraphPool, MemoryStats};
    use mmreg_core::{Error, Result};

    extern "C" {
        fn mmreg_graph_new(device: i32) -> *mut std::ffi::c_void;
        fn mmreg_graph_free(graph: *mut std::ffi::c_void);
        fn mmreg_graph_enter_stream(graph: *mut std::ffi::c_void) -> i32;
        fn mmreg_graph_leave_stream(graph: *mut std::ffi::c_void) -> i32;
        fn mmreg_graph_capture_begin(graph: *mut std::ffi::c_void, pool0: u64, pool1: u64) -> i32;
        fn mmreg_graph_capture_end(graph: *mut std::ffi::c_void, out: *mut u64) -> i32;
        fn mmreg_graph_replay(graph: *mut std::ffi::c_void) -> i32;
        fn mmreg_event_record(device: i32) -> *mut std::ffi::c_void;
        fn mmreg_event_synchronize(event: *mut std::ffi::c_void) -> i32;
        fn mmreg_event_free(event: *mut std::ffi::c_void);
        fn mmreg_to_device_async(host: *mut std::ffi::c_void, device: i32)
            -> *mut std::ffi::c_void;
        fn mmreg_pin_memory(host: *mut std::ffi::c_void) -> *mut std::ffi::c_void;
        fn mmreg_copy_into_async(target: *mut std::ffi::c_void, host: *mut std::ffi::c_void)
            -> i32;
        fn mmreg_profiler_start() -> i32;
        fn mmreg_profiler_stop(path: *const std::ffi::c_char) -> i32;
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

    pub fn profiler_start() -> Result<()> {
        // SAFETY: the shim catches every C++ exception.
        let status = unsafe { mmreg_profiler_start() };
        (status == 0)
            .then_some(())
            .ok_or_else(|| Error::Engine("starting the Kineto profiler failed".into()))
    }

    pub fn profiler_stop(path: &std::path::Path) -> Result<()> {
        let path = std::ffi::CString::new(path.to_string_lossy().as_bytes())
            .map_err(|_| Error::Engine("a trace path with a NUL byte".into()))?;
        // SAFETY: `path` is a valid C string for the call; the shim catches every C++ exception.
        let status = unsafe { mmreg_profiler_stop(path.as_ptr()) };
        (status == 0)
            .then_some(())
            .ok_or_else(|| Error::Engine("stopping the profiler or saving its trace failed".into()))
    }

    pub fn copy_into_async(target: &mut tch::Tensor, tensor: &tch::Tensor) -> Result<()> {
        let mut host = tensor.shallow_clone();
        // SAFETY: both are live tensors for the call; the shim writes into `target`'s storage only
        // (through libtorch's checked `copy_`) and catches every C++ exception.
        let status =
            unsafe { mmreg_copy_into_async(target.as_mut_ptr().cast(), host.as_mut_ptr().cast()) };
        (status == 0).then_some(()).ok_or_else(|| {
            Error::Engine(
                "copying a host tensor into a GPU tensor through pinned memory failed".into(),
            )
        })
    }

    pub fn pin_memory(tensor: &tch::Tensor) -> Result<tch::Tensor> {
        let mut host = tensor.shallow_clone();
        // SAFETY: `host` is a live tensor for the call; the shim returns a new owned tensor or null and
        // catches every C++ exception.
        let raw = unsafe { mmreg_pin_memory(host.as_mut_ptr().cast()) };
        if raw.is_null() {
            return Err(Error::Engine("pinning a host tensor failed".into()));
        }
        // SAFETY: `raw` is a `torch::Tensor*` the caller owns, as tch's tensors are.
        Ok(unsafe { tch::Tensor::from_ptr(raw.cast()) })
    }

    pub fn to_device_async(tensor: &tch::Tensor, device: usize) -> Result<tch::Tensor> {
        let mut host = tensor.shallow_clone();
        // SAFETY: `host` is a live tensor for the call; the shim returns a new owned tensor or null and
        // catches every C++ exception.
        let raw = unsafe { mmreg_to_device_async(host.as_mut_ptr().cast(), device as i32) };
        if raw.is_null() {
            return Err(Error::Engine(
                "copying a tensor to the GPU through pinned memory failed".into(),
            ));
        }
        // SAFETY: `raw` is a `torch::Tensor*` the caller owns, as tch's tensors are.
        Ok(unsafe { tch::Tensor::from_ptr(raw.cast()) })
    }

    /// An owned `at::cuda::CUDAEvent`, recorded.
    pub struct RawEvent(*mut std::ffi::c_void);

    // SAFETY: an event may be waited for and freed from any thread; it is used by one at a time.
    unsafe impl Send for RawEvent {}

    impl RawEvent {
        pub fn record(device: usize) -> Result<Self> {
            // SAFETY: returns an owned pointer or null; catches every C++ exception.
            let raw = unsafe { mmreg_event_record(device as i32) };
            if raw.is_null() {
                return Err(Error::Engine("CUDA event: recording failed".into()));
            }
            Ok(Self(raw))
        }

        pub fn wait(&self) -> Result<()> {
            // SAFETY: `self.0` is a live event; the shim catches every C++ exception.
            match unsafe { mmreg_event_synchronize(self.0) } {
                0 => Ok(()),
                _ => Err(Error::Engine("CUDA event: waiting failed".into())),
            }
        }
    }

    impl Drop for RawEvent {
        fn drop(&mut self) {
            // SAFETY: `self.0` came from `mmreg_event_record` and is freed once.
            unsafe { mmreg_event_free(self.0) }
        }
    }

    /// An owned `at::cuda::CUDAGraph` with its side stream.
    pub struct RawGraph(*mut std::ffi::c_void);

    // SAFETY: the graph is used by one thread at a time (it is not Sync); CUDA graphs and streams are not
    // tied to the thread that made them.
    unsafe impl Send for RawGraph {}

    fn check(status: i32, what: &str) -> Result<()> {
        match status {
            0 => Ok(()),
            _ => Err(Error::Engine(format!("CUDA graph: {what} failed"))),
        }
    }

    impl RawGraph {
        pub fn new(device: usize) -> Result<Self> {
            // SAFETY: returns an owned pointer or null; catches every C++ exception.
            let raw = unsafe { mmreg_graph_new(device as i32) };
            if raw.is_null() {
                return Err(Error::Engine("CUDA graph: creation failed".into()));
            }
            Ok(Self(raw))
        }

        pub fn enter_stream(&self) -> Result<()> {
            // SAFETY: `self.0` is a live graph; the shim catches every C++ exception.
            check(
                unsafe { mmreg_graph_enter_stream(self.0) },
                "switching to its stream",
            )
        }

        pub fn leave_stream(&self) -> Result<()> {
            // SAFETY: as above.
            check(
                unsafe { mmreg_graph_leave_stream(self.0) },
                "leaving its stream",
            )
        }

        pub fn capture_begin(&self, pool: GraphPool) -> Result<()> {
            // SAFETY: as above.
            check(
                unsafe { mmreg_graph_capture_begin(self.0, pool.0, pool.1) },
                "starting the capture",
            )
        }

        pub fn capture_end(&self) -> Result<GraphPool> {
            let mut out = [0u64; 2];
            // SAFETY: as above; the shim writes two values.
            check(
                unsafe { mmreg_graph_capture_end(self.0, out.as_mut_ptr()) },
                "ending the capture (was something in it not capturable?)",
            )?;
            Ok(GraphPool(out[0], out[1]))
        }

        pub fn replay(&self) -> Result<()> {
            // SAFETY: as above.
            check(unsafe { mmreg_graph_replay(self.0) }, "replay")
        }
    }

    impl Drop for RawGraph {
        fn drop(&mut self) {
            // SAFETY: `self.0` came from `mmreg_graph_new` and is freed once.
            unsafe { mmreg_graph_free(self.0) }
        }
    }
}

#[cfg(not(mmreg_cuda_shim))]
mod shim {
    use super::{GraphPool, MemoryStats};
    use mmreg_core::{Error, Result};

    pub fn profiler_start() -> Result<()> {
        Err(Error::Engine("the profiler needs the CUDA shim".into()))
    }

    pub fn profiler_stop(_path: &std::path::Path) -> Result<()> {
        Err(Error::Engine("the profiler needs the CUDA shim".into()))
    }

    pub fn to_device_async(_tensor: &tch::Tensor, _device: usize) -> Result<tch::Tensor> {
        Err(Error::Engine(
            "asynchronous copies need the CUDA shim".into(),
        ))
    }

    pub fn copy_into_async(_target: &mut tch::Tensor, _tensor: &tch::Tensor) -> Result<()> {
        Err(Error::Engine(
            "asynchronous copies need the CUDA shim".into(),
        ))
    }

    pub fn pin_memory(_tensor: &tch::Tensor) -> Result<tch::Tensor> {
        Err(Error::Engine("pinned memory needs the CUDA shim".into()))
    }

    /// Never made: a CUDA device without the shim has no events ([`super::events_available`]).
    pub struct RawEvent;

    impl RawEvent {
        pub fn record(_device: usize) -> Result<Self> {
            Err(Error::Engine("CUDA events need the CUDA shim".into()))
        }
        pub fn wait(&self) -> Result<()> {
            Ok(())
        }
    }

    /// Never made: [`super::Graph::capture`] fails first without the shim.
    pub struct RawGraph;

    impl RawGraph {
        pub fn new(_device: usize) -> Result<Self> {
            Err(Error::Engine("CUDA graphs need the CUDA shim".into()))
        }
        pub fn enter_stream(&self) -> Result<()> {
            Ok(())
        }
        pub fn leave_stream(&self) -> Result<()> {
            Ok(())
        }
        pub fn capture_begin(&self, _pool: GraphPool) -> Result<()> {
            Ok(())
        }
        pub fn capture_end(&self) -> Result<GraphPool> {
            Ok(GraphPool(0, 0))
        }
        pub fn replay(&self) -> Result<()> {
            Ok(())
        }
    }

    pub fn memory_stats(_device: usize) -> Option<MemoryStats> {
        None
    }

    pub fn mem_get_info(_device: usize) -> Option<(u64, u64)> {
        None
    }

    pub fn reset_peak_stats(_device: usize) {}

    pub fn empty_cache() {}
}
