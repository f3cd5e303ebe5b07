//! Tensor parallelism's process groups: libtorch's c10d reached through the shim (`csrc/dist_shim.cpp`),
//! Gloo for ranks on the CPU and NCCL for ranks on CUDA devices. The ranks are threads of this process
//! (one per device, see docs/distributed.md), so they meet in an in-process store; each rank's
//! [`ProcessGroup`] is the [`Collectives`] its model's parallel layers call.

use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mmreg_core::{Collectives, Error, Result};
use tch::Tensor;

extern "C" {
    fn mmreg_dist_nccl_available() -> c_int;
    fn mmreg_dist_store_new() -> *mut c_void;
    fn mmreg_dist_store_free(store: *mut c_void);
    fn mmreg_dist_group_new(
        store: *mut c_void,
        prefix: *const c_char,
        rank: c_int,
        size: c_int,
        nccl: c_int,
        timeout_ms: i64,
        error: *mut c_char,
        capacity: usize,
    ) -> *mut c_void;
    fn mmreg_dist_group_free(group: *mut c_void);
    fn mmreg_dist_all_reduce(
        group: *mut c_void,
        tensor: *mut c_void,
        error: *mut c_char,
        capacity: usize,
    ) -> c_int;
    fn mmreg_dist_all_gather(
        group: *mut c_void,
        output: *mut c_void,
        input: *mut c_void,
        error: *mut c_char,
        capacity: usize,
    ) -> c_int;
    fn mmreg_dist_broadcast(
        group: *mut c_void,
        tensor: *mut c_void,
        root: c_int,
        error: *mut c_char,
        capacity: usize,
    ) -> c_int;
}

/// Which c10d backend a group runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// CPU tensors.
    Gloo,
    /// CUDA tensors.
    Nccl,
}

impl Backend {
    /// Whether this build has NCCL (it needs the CUDA, CCCL and NCCL headers beside libtorch).
    pub fn nccl_available() -> bool {
        // SAFETY: reads a constant.
        unsafe { mmreg_dist_nccl_available() != 0 }
    }
}

/// Runs a shim call that reports failure in a message buffer.
fn checked(what: &str, call: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<()> {
    let mut error = vec![0u8; 1024];
    if call(error.as_mut_ptr().cast(), error.len()) == 0 {
        return Ok(());
    }
    Err(Error::Engine(format!("{what}: {}", message(&error))))
}

fn message(buffer: &[u8]) -> String {
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..end]).into_owned()
}

/// The in-process store where a group's ranks meet (c10d's `HashStore`).
struct Store(*mut c_void);

// SAFETY: c10d's HashStore is thread-safe (a mutex inside).
unsafe impl Send for Store {}
unsafe impl Sync for Store {}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: made by `mmreg_dist_store_new`, freed once; the groups hold their own references.
        unsafe { mmreg_dist_store_free(self.0) }
    }
}

/// One rank's membership of a c10d process group.
pub struct ProcessGroup {
    group: *mut c_void,
    rank: usize,
    size: usize,
    backend: Backend,
    /// A rank's collectives are called from its own thread; the lock makes that a guarantee.
    lock: Mutex<()>,
    /// Set when a collective failed (a peer timed out, say): its work may still be running inside
    /// c10d, so the group is never freed (freeing it under that work crashes the process).
    failed: std::sync::atomic::AtomicBool,
}

// SAFETY: the group is only used under `lock`, one call at a time.
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("backend", &self.backend)
            .finish()
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if self.failed.load(std::sync::atomic::Ordering::SeqCst) {
            // A broken group is left allocated: see `failed`.
            return;
        }
        // SAFETY: made by `mmreg_dist_group_new`, freed once.
        unsafe { mmreg_dist_group_free(self.group) }
    }
}

/// Makes the `size` ranks of a new group, each joined from a thread of its own (joining blocks until
/// every rank has), rank `r` on device `devices[r]` for NCCL. A collective that waits longer than
/// `timeout` for a peer fails with an error instead of hanging.
pub fn new_group(
    size: usize,
    backend: Backend,
    timeout: Duration,
) -> Result<Vec<Arc<ProcessGroup>>> {
    if backend == Backend::Nccl && !Backend::nccl_available() {
        return Err(Error::Engine(
            "tensor parallelism on CUDA needs NCCL, which this build of mmreg lacks (no CUDA, CCCL or NCCL headers beside libtorch when it was built: run scripts/libtorch.sh and rebuild)".into(),
        ));
    }
    // SAFETY: no arguments; null on failure.
    let store = unsafe { mmreg_dist_store_new() };
    if store.is_null() {
        return Err(Error::Engine("could not make the c10d store".into()));
    }
    let store = Arc::new(Store(store));
    let joined: Vec<Result<ProcessGroup>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..size)
            .map(|rank| {
                let store = store.clone();
                scope.spawn(move || join(&store, rank, size, backend, timeout))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Engine("a rank panicked while joining".into())))
            })
            .collect()
    });
    joined
        .into_iter()
        .map(|g| g.map(Arc::new))
        .collect::<Result<Vec<_>>>()
}

fn join(
    store: &Store,
    rank: usize,
    size: usize,
    backend: Backend,
    timeout: Duration,
) -> Result<ProcessGroup> {
    let prefix = CString::new("mmreg-tp").expect("no NUL");
    let mut group = std::ptr::null_mut();
    checked(
        &format!("rank {rank} of {size} joining its {backend:?} group"),
        |error, capacity| {
            // SAFETY: the store outlives the call (and the group keeps its own reference); the prefix is a
            // valid C string; the error buffer is `capacity` bytes.
            group = unsafe {
                mmreg_dist_group_new(
                    store.0,
                    prefix.as_ptr(),
                    rank as c_int,
                    size as c_int,
                    c_int::from(backend == Backend::Nccl),
                    timeout.as_millis() as i64,
                    error,
                    capacity,
                )
            };
            c_int::from(group.is_null())
        },
    )?;
    Ok(ProcessGroup {
        group,
        rank,
        size,
        backend,
        lock: Mutex::new(()),
        failed: std::sync::atomic::AtomicBool::new(false),
    })
}

impl ProcessGroup {
    pub fn backend(&self) -> Backend {
        self.backend
    }

    fn call(
        &self,
        what: &str,
        f: impl FnOnce(*mut c_void, *mut c_char, usize) -> c_int,
    ) -> Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let result = checked(
            &format!(
                "tensor parallelism, rank {} of {}: {what}",
                self.rank, self.size
            ),
            |error, capacity| f(self.group, error, capacity),
        );
        if result.is_err() {
            self.failed.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        result
    }
}

impl Collectives for ProcessGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce(&self, tensor: &mut Tensor) -> Result<()> {
        if self.size == 1 && self.backend == Backend::Gloo {
            return Ok(());
        }
        let ptr = tensor.as_mut_ptr().cast();
        // SAFETY: `ptr` is a live tensor for the call's duration.
        self.call("all-reduce", |g, e, c| unsafe {
            mmreg_dist_all_reduce(g, ptr, e, c)
        })
    }

    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor> {
        let mut input = tensor.f_contiguous()?;
        let mut shape = input.size();
        if let Some(rows) = shape.first_mut() {
            *rows *= self.size as i64;
        }
        let mut output = Tensor::f_empty(&shape, (input.kind(), input.device()))?;
        let (out, inp) = (output.as_mut_ptr().cast(), input.as_mut_ptr().cast());
        // SAFETY: both tensors live for the call's duration; `output` has `size` times `input`'s rows.
        self.call("all-gather", |g, e, c| unsafe {
            mmreg_dist_all_gather(g, out, inp, e, c)
        })?;
        Ok(output)
    }

    fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<()> {
        if self.size == 1 && self.backend == Backend::Gloo {
            return Ok(());
        }
        let ptr = tensor.as_mut_ptr().cast();
        // SAFETY: `ptr` is a live tensor for the call's duration.
        self.call("broadcast", |g, e, c| unsafe {
            mmreg_dist_broadcast(g, ptr, root as c_int, e, c)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gloo_ranks_sum_gather_and_broadcast() {
        let groups = new_group(3, Backend::Gloo, Duration::from_secs(30)).expect("group");
        let results: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = groups
                .iter()
                .map(|g| {
                    scope.spawn(move || {
                        let r = g.rank() as f32;
                        let mut sum = Tensor::from_slice(&[r, 10.0 * r]);
                        g.all_reduce(&mut sum).expect("all-reduce");
                        let gathered = g.all_gather(&Tensor::from_slice(&[r])).expect("gather");
                        let mut root = Tensor::from_slice(&[r + 100.0]);
                        g.broadcast(&mut root, 1).expect("broadcast");
                        let v = |t: Tensor| Vec::<f32>::try_from(t).expect("f32");
                        (v(sum), v(gathered), v(root))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("rank"))
                .collect()
        });
        for (sum, gathered, root) in results {
            assert_eq!(sum, vec![3.0, 30.0]);
            assert_eq!(gathered, vec![0.0, 1.0, 2.0]);
            assert_eq!(root, vec![101.0]);
        }
    }

    #[test]
    fn a_missing_peer_is_an_error_after_the_timeout_not_a_hang() {
        let groups = new_group(2, Backend::Gloo, Duration::from_millis(500)).expect("group");
        let mut t = Tensor::from_slice(&[1.0f32]);
        let error = groups[0]
            .all_reduce(&mut t)
            .expect_err("rank 1 never calls");
        assert!(
            error.to_string().contains("rank 0 of 2: all-reduce"),
            "{error}"
        );
    }
}
