//! Products tuned on the card (`csrc/tuned_gemm.cpp`): `x · weightᵀ (+ bias)` through cuBLASLt with the
//! configuration that timed fastest for the shape, where libtorch's `linear` takes cuBLAS's heuristic
//! first pick. The first call with a shape times the heuristic's candidates and variants of its best
//! (tiles, split-K, stages), each checked against libtorch's output, against libtorch's own product, with
//! the L2 cache flushed before each call; libtorch's product stays the shape's unless a candidate beats
//! it by 2%. A shape first met while a CUDA graph is being captured is not timed (the graph keeps
//! libtorch's product); the engine's captures run their step once before, so decode buckets are tuned
//! in that run.
//!
//! [`linear`] answers `None` where the caller should run libtorch's product: CPU tensors, dtypes other
//! than bf16 and f16, more rows than `MMREG_TUNED_GEMM_ROWS` (64 by default: the decode steps' products
//! that the few-rows kernels do not take), shapes where libtorch's was fastest, builds without cuBLASLt's
//! header, or switched off (off unless `MMREG_TUNED_GEMM=1`). `MMREG_TUNED_GEMM_LOG=1` prints each
//! shape's timings and pick to stderr.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

use crate::switch::Switch;

static ENABLED: Switch = Switch::new("MMREG_TUNED_GEMM");

/// Whether [`linear`] may run: `MMREG_TUNED_GEMM=1` switches it on.
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

/// The most rows of `x` a tuned product takes: `MMREG_TUNED_GEMM_ROWS`, 64 by default.
pub fn max_rows() -> i64 {
    static ROWS: OnceLock<i64> = OnceLock::new();
    *ROWS.get_or_init(|| {
        std::env::var("MMREG_TUNED_GEMM_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(64)
    })
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
    },
    /// A cuBLASLt configuration beat libtorch's product.
    CublasLt {
        torch_us: f32,
        best_us: f32,
        candidates: u32,
    },
}

/// `x · weightᵀ (+ bias)` for `x` `[.., k]`, `weight` `[n, k]`, `bias` `[n]`, through the shape's tuned
/// cuBLASLt configuration, tuning it if the shape is new: `None` where the caller should run libtorch's
/// product (see the module's doc).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Option<Tensor> {
    if !available() || !enabled() {
        return None;
    }
    let (Device::Cuda(_), Kind::BFloat16 | Kind::Half) = (x.device(), x.kind()) else {
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
    let x2 = x.view([rows, k]);
    let y = Tensor::f_empty([rows, n], (x.kind(), x.device())).ok()?;
    match call(&x2, weight, bias, &y) {
        Ok(true) => {
            *size.last_mut()? = n;
            Some(y.view(size.as_slice()))
        }
        Ok(false) => None,
        Err(why) => {
            static WARNED: AtomicBool = AtomicBool::new(false);
            if !WARNED.swap(true, Ordering::Relaxed) {
                eprintln!("mmreg: a tuned product failed, using libtorch's where it fails: {why}");
            }
            None
        }
    }
}

/// What tuning decided for `rows` × `k` by `[n, k]` (with or without a bias) on CUDA device `device`.
pub fn decision(device: usize, kind: Kind, rows: i64, n: i64, k: i64, bias: bool) -> Decision {
    let dtype = match kind {
        Kind::BFloat16 => 0,
        Kind::Half => 1,
        _ => return Decision::Untuned,
    };
    let (state, [best_us, torch_us, candidates]) = plan(device as i32, dtype, rows, n, k, bias);
    let candidates = candidates as u32;
    match state {
        0 => Decision::Libtorch {
            torch_us,
            best_us,
            candidates,
        },
        1 => Decision::CublasLt {
            torch_us,
            best_us,
            candidates,
        },
        _ => Decision::Untuned,
    }
}

#[cfg(mmreg_tuned_gemm)]
extern "C" {
    fn mmreg_tuned_linear(
        x: *const std::ffi::c_void,
        w: *const std::ffi::c_void,
        bias: *const std::ffi::c_void,
        y: *mut std::ffi::c_void,
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
    ) -> i32;
}

/// `Ok(true)`: `y` holds the product; `Ok(false)`: libtorch's product is the caller's to run.
#[cfg(mmreg_tuned_gemm)]
fn call(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, y: &Tensor) -> Result<bool, String> {
    use std::ffi::{c_char, CStr};
    let mut error = [0 as c_char; 1024];
    let bias = bias.map_or(std::ptr::null(), |b| b.as_ptr().cast());
    // SAFETY: the pointers are tch's tensors (`at::Tensor*`), alive for the call, with the shapes the
    // shim expects (checked by `linear`); `error` is a buffer of the capacity given.
    let status = unsafe {
        mmreg_tuned_linear(
            x.as_ptr().cast(),
            w.as_ptr().cast(),
            bias,
            y.as_ptr().cast_mut().cast(),
            error.as_mut_ptr(),
            error.len(),
        )
    };
    match status {
        0 => Ok(true),
        2 | 3 => Ok(false),
        // SAFETY: the shim writes a NUL-terminated message within the buffer.
        _ => Err(unsafe { CStr::from_ptr(error.as_ptr()) }
            .to_string_lossy()
            .into_owned()),
    }
}

#[cfg(not(mmreg_tuned_gemm))]
fn call(_x: &Tensor, _w: &Tensor, _bias: Option<&Tensor>, _y: &Tensor) -> Result<bool, String> {
    Ok(false)
}

#[cfg(mmreg_tuned_gemm)]
fn plan(device: i32, dtype: i32, m: i64, n: i64, k: i64, bias: bool) -> (i32, [f32; 3]) {
    let mut times = [0f32; 3];
    // SAFETY: `times` holds the three floats the shim writes.
    let state = unsafe {
        mmreg_tuned_linear_plan(device, dtype, m, n, k, i32::from(bias), times.as_mut_ptr())
    };
    (state, times)
}

#[cfg(not(mmreg_tuned_gemm))]
fn plan(_device: i32, _dtype: i32, _m: i64, _n: i64, _k: i64, _bias: bool) -> (i32, [f32; 3]) {
    (-1, [0.0; 3])
}
