//! Products tuned on the card (`csrc/tuned_gemm.cpp`): `x · weightᵀ (+ bias)` through cuBLASLt with the
//! configuration that timed fastest for the shape, where libtorch's `linear` takes cuBLAS's heuristic
//! first pick. The first call with a shape times the heuristic's candidates and variants of its best
//! (tiles, split-K, stages), each checked against libtorch's output, against libtorch's own product, with
//! the L2 cache flushed before each call; libtorch's product stays the shape's unless a candidate beats
//! it by 2%. Where there are more than 16 candidates (a decode step's rows: hundreds), each is first
//! timed twice unchecked and only the fastest 8 are checked and timed in full. A shape first met while
//! a CUDA graph is being captured is not timed (the graph keeps libtorch's product); the engine's
//! captures run their step once before, so decode buckets are tuned in that run.
//!
//! Counts of rows are tuned in buckets ([`rows_bucket`]): exact to a multiple of 8 up to 64 rows (a decode
//! step's), in quarters of a power of two above (a prefill's), so that a server meets a bounded set.
//!
//! [`linear`] answers `None` where the caller should run libtorch's product: CPU tensors, dtypes other
//! than bf16 and f16, one row or more rows than `MMREG_TUNED_GEMM_ROWS` (8192 by default), shapes where
//! libtorch's was fastest, builds without cuBLASLt's header, or switched off (on unless
//! `MMREG_TUNED_GEMM=0`). `MMREG_TUNED_GEMM_LOG=1` prints each shape's timings and pick to stderr.
//!
//! Each pick is kept in a file (`MMREG_TUNED_GEMM_CACHE`, by default `tuned-gemm.tsv` in
//! [`crate::cache_dir`]; empty: none) with the card and cuBLASLt version it was timed on, and later
//! processes on the same card and version take it from there instead of timing the shape again.

mod store;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::switch::Switch;

static ENABLED: Switch = Switch::on_by_default("MMREG_TUNED_GEMM");

/// Whether [`linear`] may run: on unless `MMREG_TUNED_GEMM=0`.
pub fn enabled() -> bool {
    ENABLED.get()
}

/// Switches [`linear`] on or off for the process (tests and benchmarks compare both).
pub fn set_enabled(on: bool) {
    ENABLED.set(on);
}

/// Whether this build can tune products at all (it found cuBLASLt's header).
pub const fn available() -> bool {
    cfg!(mmreg_tuned_gemm)
}

/// The most rows of `x` a tuned product takes: `MMREG_TUNED_GEMM_ROWS`, 8192 by default (the engine's
/// default step budget, `max_num_batched_tokens`; longer products are compute-bound and cuBLAS's
/// heuristic serves them).
pub fn max_rows() -> i64 {
    static ROWS: OnceLock<i64> = OnceLock::new();
    *ROWS.get_or_init(|| {
        std::env::var("MMREG_TUNED_GEMM_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(8192)
    })
}

/// The count of rows under which a product's pick is timed and kept: up to 64 rows (decode steps),
/// rounded up to a multiple of 8 (the engine's batch buckets); above, rounded up to a quarter of their
/// power of two (65-80 to 80, 577-640 to 640, 4097-5120 to 5120), so that prefills of every length meet
/// at most four buckets per doubling. The configuration timed at the first count of rows met in a bucket
/// serves the bucket's other counts, each checked first.
pub fn rows_bucket(rows: i64) -> i64 {
    if rows <= 64 {
        return (rows + 7) / 8 * 8;
    }
    let step = 1i64 << (61 - rows.leading_zeros());
    (rows + step - 1) / step * step
}

/// What tuning decided for one shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Not met yet (or met only under capture).
    Untuned,
    /// libtorch's product was the fastest, or no candidate beat it by 2%.
    Libtorch {
        torch_us: f32,
        best_us: f32,
        candidates: u32,
        /// Read from the file of kept picks, not timed in this process.
        stored: bool,
    },
    /// A cuBLASLt configuration beat libtorch's product.
    CublasLt {
        torch_us: f32,
        best_us: f32,
        candidates: u32,
        stored: bool,
    },
}

/// The shapes this process timed and how long that took: the stall the picks file saves later processes.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Tuning {
    pub shapes: u64,
    pub seconds: f64,
}

static TUNED_SHAPES: AtomicU64 = AtomicU64::new(0);
static TUNING_NANOS: AtomicU64 = AtomicU64::new(0);

/// The shapes timed in this process so far (not those whose picks were read from the file), and the
/// wall time of the calls that timed them.
pub fn tuning() -> Tuning {
    Tuning {
        shapes: TUNED_SHAPES.load(Ordering::Relaxed),
        seconds: TUNING_NANOS.load(Ordering::Relaxed) as f64 * 1e-9,
    }
}

/// Where picks are kept and read: set by [`set_cache_path`], else `MMREG_TUNED_GEMM_CACHE` or the user's
/// cache folder. `None`: nowhere.
static CACHE_PATH: Mutex<Option<Option<PathBuf>>> = Mutex::new(None);
/// The devices whose kept picks this process has read.
static LOADED: Mutex<Option<HashSet<i32>>> = Mutex::new(None);

/// The file picks are kept in (`None`: none).
pub fn cache_path() -> Option<PathBuf> {
    let mut path = CACHE_PATH.lock().unwrap_or_else(|e| e.into_inner());
    path.get_or_insert_with(store::default_path).clone()
}

/// Keeps picks in `path` from now on (`None`: nowhere), in place of `MMREG_TUNED_GEMM_CACHE`.
pub fn set_cache_path(path: Option<PathBuf>) {
    *CACHE_PATH.lock().unwrap_or_else(|e| e.into_inner()) = Some(path);
    LOADED.lock().unwrap_or_else(|e| e.into_inner()).take();
}

/// Drops every pick of this process: the next call of each shape takes a kept pick from the file or
/// tunes the shape again.
pub fn forget() {
    LOADED.lock().unwrap_or_else(|e| e.into_inner()).take();
    forget_plans();
}

/// `x · weightᵀ (+ bias)` for `x` `[.., k]`, `weight` `[n, k]`, `bias` `[n]`, through the shape's tuned
/// cuBLASLt configuration, tuning it if the shape is new: `None` where the caller should run libtorch's
/// product (see the module's doc).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Option<Tensor> {
    if !available() || !enabled() {
        return None;
    }
    let (Device::Cuda(device), Kind::BFloat16 | Kind::Half) = (x.device(), x.kind()) else {
        return None;
    };
    let [n, k] = weight.size()[..] else {
        return None;
    };
    let mut size = x.size();
    let rows = x.numel() as i64 / k.max(1);
    let fits = size.last() == Some(&k)
        && (2..=max_rows()).contains(&rows)
        && n > 0
        && weight.kind() == x.kind()
        && weight.device() == x.device()
        && weight.is_contiguous()
        && x.is_contiguous()
        && bias.is_none_or(|b| {
            b.size() == [n] && b.kind() == x.kind() && b.device() == x.device() && b.is_contiguous()
        })
        // (the configurations were timed on 16-byte aligned rows)
        && k % 8 == 0
        && n % 8 == 0
        && [Some(x), Some(weight), bias]
            .iter()
            .flatten()
            .all(|t| (t.data_ptr() as usize).is_multiple_of(16));
    if !fits {
        return None;
    }
    let device = device as i32;
    load_kept(device);
    let x2 = x.view([rows, k]);
    let bucket = rows_bucket(rows);
    let began = Instant::now();
    let (ran, tuned) = call(&x2, weight, bias, bucket);
    if tuned {
        let took = began.elapsed();
        TUNED_SHAPES.fetch_add(1, Ordering::Relaxed);
        TUNING_NANOS.fetch_add(
            u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        if std::env::var_os("MMREG_TUNED_GEMM_LOG").is_some() {
            let decision = decision(device as usize, x.kind(), rows, n, k, bias.is_some());
            let bias = if bias.is_some() { " + bias" } else { "" };
            log_tuned(
                &format!("{rows} (of up to {bucket}) x {k} by {n} x {k}{bias}"),
                decision,
                took,
            );
        }
        keep(device, x.kind(), bucket, n, k, bias.is_some());
    }
    match ran {
        Ok(Some(y)) => {
            *size.last_mut()? = n;
            Some(y.view(size.as_slice()))
        }
        Ok(None) => None,
        Err(why) => {
            static WARNED: AtomicBool = AtomicBool::new(false);
            if !WARNED.swap(true, Ordering::Relaxed) {
                eprintln!("mmreg: a tuned product failed, using libtorch's where it fails: {why}");
            }
            None
        }
    }
}

/// `MMREG_TUNED_GEMM_LOG`'s line for a shape just timed.
fn log_tuned(shape: &str, decision: Decision, took: std::time::Duration) {
    let (pick, torch_us, best_us, candidates) = match decision {
        Decision::Libtorch {
            torch_us,
            best_us,
            candidates,
            ..
        } => ("libtorch", torch_us, best_us, candidates),
        Decision::CublasLt {
            torch_us,
            best_us,
            candidates,
            ..
        } => ("cuBLASLt", torch_us, best_us, candidates),
        Decision::Untuned => return,
    };
    eprintln!(
        "mmreg: tuned {shape}: libtorch {torch_us:.1} us, cuBLASLt's best {best_us:.1} us of {candidates} -> {pick} ({:.0} ms)",
        took.as_secs_f64() * 1e3
    );
}

/// What tuning decided for `rows` × `k` by `[n, k]` (with or without a bias) on CUDA device `device`:
/// the pick of `rows`'s bucket ([`rows_bucket`]).
pub fn decision(device: usize, kind: Kind, rows: i64, n: i64, k: i64, bias: bool) -> Decision {
    let Some(dtype) = dtype(kind) else {
        return Decision::Untuned;
    };
    let plan = plan(device as i32, dtype, rows_bucket(rows), n, k, bias);
    let [best_us, torch_us, candidates] = plan.times;
    let (candidates, stored) = (candidates as u32, plan.stored);
    match plan.state {
        0 => Decision::Libtorch {
            torch_us,
            best_us,
            candidates,
            stored,
        },
        1 => Decision::CublasLt {
            torch_us,
            best_us,
            candidates,
            stored,
        },
        _ => Decision::Untuned,
    }
}

fn dtype(kind: Kind) -> Option<i32> {
    match kind {
        Kind::BFloat16 => Some(0),
        Kind::Half => Some(1),
        _ => None,
    }
}

/// Takes the picks kept for `device`'s card, once per process.
fn load_kept(device: i32) {
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if !loaded.get_or_insert_with(HashSet::new).insert(device) {
        return;
    }
    let (Some(path), Some(identity)) = (cache_path(), identity(device)) else {
        return;
    };
    for kept in store::read(&path, &identity) {
        if let Err(why) = adopt(device, &kept) {
            eprintln!(
                "mmreg: a kept product pick in {} was not taken: {why}",
                path.display()
            );
            break;
        }
    }
}

/// Appends the pick just timed for a shape to the file of kept picks.
fn keep(device: i32, kind: Kind, m: i64, n: i64, k: i64, bias: bool) {
    let (Some(path), Some(identity), Some(dtype)) = (cache_path(), identity(device), dtype(kind))
    else {
        return;
    };
    let plan = plan(device, dtype, m, n, k, bias);
    if plan.state < 0 || plan.times[2] == 0.0 {
        return; // (tuning failed: nothing to keep)
    }
    let kept = store::Stored {
        identity,
        dtype,
        m,
        n,
        k,
        bias,
        cublaslt: plan.state == 1,
        torch_us: plan.times[1],
        best_us: plan.times[0],
        candidates: plan.times[2] as u32,
        algo: plan.algo,
    };
    if let Err(why) = store::append(&path, &kept) {
        static WARNED: AtomicBool = AtomicBool::new(false);
        if !WARNED.swap(true, Ordering::Relaxed) {
            eprintln!(
                "mmreg: could not keep a tuned product's pick in {}: {why}",
                path.display()
            );
        }
    }
}

/// One shape's pick as the shim holds it.
struct Plan {
    /// -1: none; 0: libtorch's product; 1: a cuBLASLt configuration.
    state: i32,
    /// cuBLASLt's best µs, libtorch's µs, candidates timed.
    times: [f32; 3],
    algo: [u64; 8],
    stored: bool,
}

#[cfg(mmreg_tuned_gemm)]
extern "C" {
    fn mmreg_tuned_linear(
        x: *const std::ffi::c_void,
        w: *const std::ffi::c_void,
        bias: *const std::ffi::c_void,
        bucket: i64,
        y: *mut *mut std::ffi::c_void,
        tuned: *mut i32,
        error: *mut std::ffi::c_char,
        capacity: usize,
    ) -> i32;
    fn mmreg_tuned_linear_plan(
        device: i32,
        dtype: i32,
        m: i64,
        n: i64,
        k: i64,
        bias: i32,
        times: *mut f32,
        algo: *mut u64,
        stored: *mut i32,
    ) -> i32;
    fn mmreg_tuned_linear_adopt(
        device: i32,
        dtype: i32,
        m: i64,
        n: i64,
        k: i64,
        bias: i32,
        lt: i32,
        algo: *const u64,
        times: *const f32,
        error: *mut std::ffi::c_char,
        capacity: usize,
    ) -> i32;
    fn mmreg_tuned_gemm_identity(device: i32, out: *mut std::ffi::c_char, capacity: usize) -> i32;
    fn mmreg_tuned_gemm_forget();
}

/// The tuned product's output (`Ok(None)`: libtorch's product is the caller's to run), and whether this
/// call timed the shape.
#[cfg(mmreg_tuned_gemm)]
fn call(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    bucket: i64,
) -> (Result<Option<Tensor>, String>, bool) {
    use std::ffi::c_char;
    let mut error = [0 as c_char; 1024];
    let mut tuned = 0;
    let mut y = std::ptr::null_mut();
    let bias = bias.map_or(std::ptr::null(), |b| b.as_ptr().cast());
    // SAFETY: the pointers are tch's tensors (`at::Tensor*`), alive for the call, with the shapes the
    // shim expects (checked by `linear`); `error` is a buffer of the capacity given.
    let status = unsafe {
        mmreg_tuned_linear(
            x.as_ptr().cast(),
            w.as_ptr().cast(),
            bias,
            bucket,
            &mut y,
            &mut tuned,
            error.as_mut_ptr(),
            error.len(),
        )
    };
    let ran = match status {
        // SAFETY: on 0 the shim hands over a new `at::Tensor*`, owned from here as tch's tensors are.
        0 if !y.is_null() => Ok(Some(unsafe { Tensor::from_ptr(y.cast()) })),
        0 => Err("the tuned product returned no tensor".into()),
        2 | 3 => Ok(None),
        _ => Err(message(&error)),
    };
    (ran, tuned != 0)
}

#[cfg(mmreg_tuned_gemm)]
fn message(buffer: &[std::ffi::c_char]) -> String {
    // SAFETY: the shim writes a NUL-terminated message within the buffer (zeroed to begin with).
    unsafe { std::ffi::CStr::from_ptr(buffer.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

#[cfg(not(mmreg_tuned_gemm))]
fn call(
    _x: &Tensor,
    _w: &Tensor,
    _bias: Option<&Tensor>,
    _bucket: i64,
) -> (Result<Option<Tensor>, String>, bool) {
    (Ok(None), false)
}

#[cfg(mmreg_tuned_gemm)]
fn plan(device: i32, dtype: i32, m: i64, n: i64, k: i64, bias: bool) -> Plan {
    let mut plan = Plan {
        state: -1,
        times: [0.0; 3],
        algo: [0; 8],
        stored: false,
    };
    let mut stored = 0;
    // SAFETY: `times` and `algo` hold the three floats and eight words the shim writes.
    plan.state = unsafe {
        mmreg_tuned_linear_plan(
            device,
            dtype,
            m,
            n,
            k,
            i32::from(bias),
            plan.times.as_mut_ptr(),
            plan.algo.as_mut_ptr(),
            &mut stored,
        )
    };
    plan.stored = stored != 0;
    plan
}

#[cfg(not(mmreg_tuned_gemm))]
fn plan(_device: i32, _dtype: i32, _m: i64, _n: i64, _k: i64, _bias: bool) -> Plan {
    Plan {
        state: -1,
        times: [0.0; 3],
        algo: [0; 8],
        stored: false,
    }
}

/// The card's name, compute capability and cuBLASLt's version, which kept picks must match.
#[cfg(mmreg_tuned_gemm)]
fn identity(device: i32) -> Option<String> {
    let mut out = [0 as std::ffi::c_char; 256];
    // SAFETY: `out` is a buffer of the capacity given.
    let status = unsafe { mmreg_tuned_gemm_identity(device, out.as_mut_ptr(), out.len()) };
    (status == 0).then(|| message(&out))
}

#[cfg(not(mmreg_tuned_gemm))]
fn identity(_device: i32) -> Option<String> {
    None
}

#[cfg(mmreg_tuned_gemm)]
fn adopt(device: i32, kept: &store::Stored) -> Result<(), String> {
    let mut error = [0 as std::ffi::c_char; 1024];
    let times = [kept.best_us, kept.torch_us, kept.candidates as f32];
    // SAFETY: `algo` and `times` are the eight words and three floats the shim reads; `error` a buffer of
    // the capacity given.
    let status = unsafe {
        mmreg_tuned_linear_adopt(
            device,
            kept.dtype,
            kept.m,
            kept.n,
            kept.k,
            i32::from(kept.bias),
            i32::from(kept.cublaslt),
            kept.algo.as_ptr(),
            times.as_ptr(),
            error.as_mut_ptr(),
            error.len(),
        )
    };
    if status < 0 {
        Err(message(&error))
    } else {
        Ok(())
    }
}

#[cfg(not(mmreg_tuned_gemm))]
fn adopt(_device: i32, _kept: &store::Stored) -> Result<(), String> {
    Ok(())
}

#[cfg(mmreg_tuned_gemm)]
fn forget_plans() {
    // SAFETY: no arguments; the shim takes its own lock.
    unsafe { mmreg_tuned_gemm_forget() }
}

#[cfg(not(mmreg_tuned_gemm))]
fn forget_plans() {}

#[cfg(test)]
mod tests {
    use super::rows_bucket;

    #[test]
    fn rows_fall_in_bounded_buckets() {
        let cases = [
            (2, 8),
            (8, 8),
            (17, 24),
            (24, 24),
            (64, 64),
            (65, 80),
            (80, 80),
            (81, 96),
            (128, 128),
            (129, 160),
            (576, 640),
            (577, 640),
            (608, 640),
            (641, 768),
            (2944, 3072),
            (4095, 4096),
            (4832, 5120),
            (8192, 8192),
        ];
        for (rows, bucket) in cases {
            assert_eq!(rows_bucket(rows), bucket, "{rows} rows");
        }
        // Every count of rows lies in its bucket, within a quarter of it, and buckets do not overlap.
        let mut buckets = std::collections::BTreeSet::new();
        for rows in 1..=8192 {
            let b = rows_bucket(rows);
            assert!(b >= rows && (b - rows) * 4 <= b.max(32), "{rows} -> {b}");
            assert_eq!(rows_bucket(b), b);
            buckets.insert(b);
        }
        assert!(buckets.len() <= 8 + 4 * 7, "{} buckets", buckets.len());
    }
}
