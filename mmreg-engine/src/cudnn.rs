//! cuDNN's fused attention called directly (`csrc/cudnn_attention.cpp`, through cudnn-frontend), where
//! libtorch's `scaled_dot_product_attention` would call the same kernel on Hopper with more around it: two
//! `at::zeros` for a dropout seed and offset that inference never reads, so a memset node, and the GPU
//! idle 4–5 µs after it, before each attention of a CUDA graph (55 in a LLaVA-1.5 prefill, run 86's
//! trace). The output is laid out token by token (`[b, s_q, heads, d]` in memory), as libtorch's cuDNN
//! path lays it out, so callers that view it back as the step's rows copy nothing.
//!
//! [`attention`] answers `None` where it does not run (a CPU tensor, another dtype, a build without
//! cudnn-frontend's headers, shapes cuDNN has no kernel for, or switched off: it is off unless
//! `MMREG_CUDNN_ATTENTION=1`); the caller then calls libtorch's attention, which stays the reference.

use std::sync::atomic::{AtomicBool, Ordering};

use tch::Tensor;

use crate::switch::Switch;

static ENABLED: Switch = Switch::new("MMREG_CUDNN_ATTENTION");

/// Whether [`attention`] may run: `MMREG_CUDNN_ATTENTION=1` switches it on. Off by default: bit-identical
/// to libtorch's attention and no faster at LLaVA-1.5's batch-1 prefill (docs/benchmarks.md, run 96).
pub fn enabled() -> bool {
    ENABLED.get()
}

/// Switches [`attention`] on or off for the process (tests and benchmarks compare both).
pub fn set_enabled(on: bool) {
    ENABLED.set(on);
}

/// Whether this build can call cuDNN's attention at all (it found cudnn-frontend's headers).
pub const fn available() -> bool {
    cfg!(mmreg_cudnn_attention)
}

/// Attention of `q` `[b, heads, s_q, d]` over `k` and `v` `[b, kv_heads, s_kv, d]` (grouped heads where
/// `kv_heads` divides `heads`; any strides with each head's `d` elements contiguous), without a mask or
/// causal (aligned to the top left, as libtorch's), scaled by `scale`: `[b, heads, s_q, d]`, a view of
/// `[b, s_q, heads, d]` in memory. `None` where it does not run (see the module's doc).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool, scale: f64) -> Option<Tensor> {
    if !available() || !enabled() {
        return None;
    }
    let tch::Device::Cuda(device) = q.device() else {
        return None;
    };
    let dtype = match q.kind() {
        tch::Kind::BFloat16 => 0,
        tch::Kind::Half => 1,
        _ => return None,
    };
    let [b, heads, s_q, d] = q.size()[..] else {
        return None;
    };
    let [kb, kv_heads, s_kv, kd] = k.size()[..] else {
        return None;
    };
    let fits = kb == b
        && kd == d
        && v.size() == k.size()
        && kv_heads > 0
        && heads % kv_heads == 0
        && [k, v]
            .iter()
            .all(|t| t.kind() == q.kind() && t.device() == q.device())
        && [q, k, v].iter().all(|t| t.stride()[3] == 1)
        && b * heads * s_q * s_kv > 0;
    if !fits {
        return None;
    }
    let out = Tensor::f_empty([b, s_q, heads, d], (q.kind(), q.device()))
        .ok()?
        .transpose(1, 2);
    let dims = [b, heads, kv_heads, s_q, s_kv, d];
    let mut strides = [0i64; 16];
    for (i, t) in [q, k, v, &out].iter().enumerate() {
        strides[4 * i..4 * i + 4].copy_from_slice(&t.stride());
    }
    let status = call(
        device as i32,
        dtype,
        &dims,
        &strides,
        [q, k, v, &out],
        causal,
        scale as f32,
    );
    match status {
        Ok(()) => Some(out),
        Err((code, why)) => {
            // 2: no kernel for these shapes (a quiet fallback, asked once per shape); else say it once.
            static WARNED: AtomicBool = AtomicBool::new(false);
            if code != 2 && !WARNED.swap(true, Ordering::Relaxed) {
                eprintln!("mmreg: cuDNN attention failed, using libtorch's from here on where it fails: {why}");
            }
            None
        }
    }
}

#[cfg(mmreg_cudnn_attention)]
fn call(
    device: i32,
    dtype: i32,
    dims: &[i64; 6],
    strides: &[i64; 16],
    tensors: [&Tensor; 4],
    causal: bool,
    scale: f32,
) -> Result<(), (i32, String)> {
    use std::ffi::{c_char, c_void, CStr};
    extern "C" {
        fn mmreg_cudnn_attention(
            device: i32,
            dtype: i32,
            dims: *const i64,
            strides: *const i64,
            q: *mut c_void,
            k: *mut c_void,
            v: *mut c_void,
            o: *mut c_void,
            causal: i32,
            scale: f32,
            error: *mut c_char,
            capacity: usize,
        ) -> i32;
    }
    let mut error = [0 as c_char; 1024];
    let [q, k, v, o] = tensors;
    // SAFETY: the pointers are the tensors' data, described by `dims` and `strides`, alive for the call;
    // `error` is a buffer of the capacity given.
    let status = unsafe {
        mmreg_cudnn_attention(
            device,
            dtype,
            dims.as_ptr(),
            strides.as_ptr(),
            q.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            o.data_ptr(),
            i32::from(causal),
            scale,
            error.as_mut_ptr(),
            error.len(),
        )
    };
    if status == 0 {
        return Ok(());
    }
    // SAFETY: the shim writes a NUL-terminated message within the buffer.
    let why = unsafe { CStr::from_ptr(error.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    Err((status, why))
}

#[cfg(not(mmreg_cudnn_attention))]
fn call(
    _device: i32,
    _dtype: i32,
    _dims: &[i64; 6],
    _strides: &[i64; 16],
    _tensors: [&Tensor; 4],
    _causal: bool,
    _scale: f32,
) -> Result<(), (i32, String)> {
    Err((2, "built without cudnn-frontend".into()))
}
