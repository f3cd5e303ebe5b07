//! Kernels of our own for decoder layers: RMSNorm (with the residual add before it), SiLU × up, rotary
//! embeddings, and decode attention that reads the paged KV cache in place. The elementwise ones replace
//! several libtorch kernels each and compute the same values (`csrc/fused_kernels.cu` rounds every
//! intermediate to the model dtype where HF's op-by-op code does).
//!
//! On CUDA they are compiled once per device by NVRTC (which pip's torch ships), checked against
//! libtorch's ops ([`self_check`]), and launched through the shim on libtorch's current stream, so they
//! run inside CUDA graphs. **Opt-in for now** (`MMREG_FUSED_KERNELS=1` or [`set_enabled`]): they have
//! not yet run on a GPU, so the default stays the measured libtorch path until `tests/fused_kernels.rs`,
//! `fused_engine` and the benchmark have run on one. Everywhere else (on the CPU, in a build without the
//! shim, when NVRTC or the self-check fails, or switched off) each function runs HF's plain libtorch ops
//! instead, so model code calls these functions unconditionally.
//!
//! Without a GPU, the CPU emulator (`csrc/kernel_emulator.cpp`) runs the same CUDA source, launched by
//! the same code, for the tests.

use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use tch::{Device, Kind, Tensor};

/// 0: not decided yet (read `MMREG_FUSED_KERNELS` on first use), 1: off, 2: on.
static ENABLED: AtomicU8 = AtomicU8::new(0);

/// Switches the fused kernels on or off for the whole process (overrides `MMREG_FUSED_KERNELS`).
pub fn set_enabled(on: bool) {
    ENABLED.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// Whether the fused kernels are switched on: [`set_enabled`], else `MMREG_FUSED_KERNELS=1`.
pub fn enabled() -> bool {
    match ENABLED.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("MMREG_FUSED_KERNELS").is_ok_and(|v| !v.is_empty() && v != "0");
            // A concurrent set_enabled wins over the environment.
            let _ = ENABLED.compare_exchange(
                0,
                if on { 2 } else { 1 },
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            ENABLED.load(Ordering::Relaxed) == 2
        }
        state => state == 2,
    }
}

/// Whether the fused kernels run for tensors on `device`: switched on ([`enabled`]), a CUDA device, the
/// shim built in, and the kernels compiled (the first call compiles them; a failure is logged once and
/// everything then runs unfused).
pub fn fused_available(device: Device) -> bool {
    kernels_for(device).is_ok()
}

/// Runs the fused kernels on CPU tensors of this thread through the CPU emulator of
/// `csrc/kernel_emulator.cpp` (each CUDA thread an OS thread): slow, for tests of the kernels and of the
/// launches where there is no GPU. Still needs the kernels switched on ([`set_enabled`]).
#[doc(hidden)]
pub fn emulate_on_this_thread(on: bool) {
    EMULATE.with(|e| e.set(on));
}

/// [`emulate_on_this_thread`] for every thread of the process, such as an engine's scheduler.
#[doc(hidden)]
pub fn emulate_on_all_threads(on: bool) {
    EMULATE_ALL.store(on, Ordering::Relaxed);
}

thread_local! {
    static EMULATE: Cell<bool> = const { Cell::new(false) };
}
static EMULATE_ALL: AtomicBool = AtomicBool::new(false);

/// Why the fused kernels do not run on `device`, if they don't (compiling them on first use).
pub fn unavailable_reason(device: Device) -> Option<String> {
    kernels_for(device).err().map(str::to_owned)
}

/// HF's `LlamaRMSNorm`: `weight * (x * rsqrt(mean(x²) + eps))`, normalised in f32 over the last
/// dimension, rounded to `x`'s dtype, then multiplied by `weight` in that dtype.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    match fused_for(&[x, weight]) {
        Some(k) if x.size().last() == weight.size().first() => k.rms_norm(x, None, weight, eps).1,
        _ => unfused::rms_norm(x, weight, eps),
    }
}

/// The residual add and the next RMSNorm: returns `(x + delta, rms_norm(x + delta, weight))`, the sum
/// rounded to the dtype before it is normalised (as two separate ops would).
pub fn add_rms_norm(x: &Tensor, delta: &Tensor, weight: &Tensor, eps: f64) -> (Tensor, Tensor) {
    let fits = || x.size() == delta.size() && x.size().last() == weight.size().first();
    match fused_for(&[x, delta, weight]) {
        Some(k) if fits() => {
            let (sum, normed) = k.rms_norm(x, Some(delta), weight, eps);
            (sum.expect("the fused add returns the sum"), normed)
        }
        _ => unfused::add_rms_norm(x, delta, weight, eps),
    }
}

/// `silu(gate) * up` for a stacked `[.., 2 * n]` projection (`gate` the first half): `[.., n]`.
pub fn silu_mul(gate_up: &Tensor) -> Tensor {
    match fused_for(&[gate_up]) {
        Some(k) if gate_up.dim() > 0 => k.silu_mul(gate_up),
        _ => unfused::silu_mul(gate_up),
    }
}

/// Rotary embedding on a stacked `[tokens, heads, dim]` projection: the first `rotated` heads (queries
/// and keys) become `x * cos + rotate_half(x) * sin` (halves, not interleaved, as HF's Llama), the other
/// heads (values) are returned unchanged. `cos` and `sin` are `[tokens, dim]` in `qkv`'s dtype.
pub fn rope(qkv: &Tensor, cos: &Tensor, sin: &Tensor, rotated: i64) -> Tensor {
    let [tokens, heads, dim] = qkv.size()[..] else {
        panic!("rope expects [tokens, heads, dim], got {:?}", qkv.size());
    };
    let fits = || {
        cos.size() == [tokens, dim]
            && sin.size() == [tokens, dim]
            && dim % 2 == 0
            && (0..=heads).contains(&rotated)
    };
    match fused_for(&[qkv, cos, sin]) {
        Some(k) if fits() => k.rope(qkv, cos, sin, rotated, None),
        _ => unfused::rope(qkv, cos, sin, rotated),
    }
}

/// [`rope`] of a decoder layer's stacked `[tokens, heads, dim]` projection whose last `2 * kv_heads`
/// heads are the keys and the values (queries and keys rotate), which also stores the keys (rotated)
/// and values in `key_cache`/`value_cache` (`[slots, kv_heads, dim]`) at `slots` (`[tokens]`, int64):
/// the step's KV-cache write in the same pass. `None` where the kernel does not run: the caller then
/// applies [`rope`] and writes the cache itself.
pub fn rope_and_store(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    kv_heads: i64,
    key_cache: &Tensor,
    value_cache: &Tensor,
    slots: &Tensor,
) -> Option<Tensor> {
    let k = fused_for(&[qkv, cos, sin, key_cache, value_cache])?;
    let [tokens, heads, dim] = qkv.size()[..] else {
        return None;
    };
    let fits = cos.size() == [tokens, dim]
        && sin.size() == [tokens, dim]
        && dim % 2 == 0
        && kv_heads > 0
        && 2 * kv_heads <= heads
        && key_cache.size().get(1..) == Some(&[kv_heads, dim][..])
        && value_cache.size() == key_cache.size()
        && slots.size() == [tokens]
        && readable_indices(slots, qkv.device());
    if !fits {
        return None;
    }
    let store = (key_cache, value_cache, slots, kv_heads);
    Some(k.rope(qkv, cos, sin, heads - kv_heads, Some(store)))
}

/// Attention of one new token per sequence over its cached keys and values, read in place from the paged
/// cache: `query` `[sequences, heads, dim]` (rows may be strided, as a narrow of the stacked projection),
/// `key_cache`/`value_cache` `[slots, kv_heads, dim]`, `slots` `[sequences * width]` (each sequence's
/// slots, padded to `width`), `lengths` `[sequences]` (how many are real). Returns `[sequences, heads,
/// dim]`, or `None` where the kernel does not run (not on CUDA, switched off, or shapes it does not
/// handle: `dim` up to 256, at most 8 query heads per key/value head, group × dim at most 1024): the
/// caller then gathers the keys and values and runs libtorch's attention.
pub fn paged_decode_attention(
    query: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    slots: &Tensor,
    lengths: &Tensor,
    scale: f64,
) -> Option<Tensor> {
    let k = fused_for(&[key_cache, value_cache])?;
    let [sequences, heads, dim] = query.size()[..] else {
        return None;
    };
    let [_, kv_heads, cache_dim] = key_cache.size()[..] else {
        return None;
    };
    let group = if kv_heads > 0 && heads % kv_heads == 0 {
        heads / kv_heads
    } else {
        return None;
    };
    let shapes_fit = cache_dim == dim
        && value_cache.size() == key_cache.size()
        && (1..=256).contains(&dim)
        && group <= 8
        && group * dim <= 1024
        && lengths.size() == [sequences]
        && sequences > 0
        && slots.numel() as i64 % sequences == 0;
    // The query's rows may be strided (a narrow of the stacked projection); within a row, contiguous.
    let row_contiguous = query.stride()[1..] == [dim, 1];
    let same = query.kind() == key_cache.kind() && query.device() == key_cache.device();
    let indices_fit = [slots, lengths]
        .iter()
        .all(|t| readable_indices(t, query.device()));
    if !(shapes_fit && row_contiguous && same && indices_fit) {
        return None;
    }
    Some(k.paged_decode_attention(query, key_cache, value_cache, slots, lengths, scale))
}

/// Runs every kernel for `device` (as switched on: compiled, or emulated on the CPU) on small fixed
/// inputs in f32, bf16 and f16 and compares it with libtorch's ops: `Err` names the first that
/// disagrees. Loading the kernels on a GPU runs it first, and kernels that fail it are never used.
pub fn self_check(device: Device) -> Result<(), String> {
    check_kernels(kernels_for(device)?, device)
}

/// The libtorch ops each kernel replaces: HF's formulas, op by op.
mod unfused {
    use tch::{Kind, Tensor};

    pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
        weight * x.rms_norm([weight.size()[0]], None::<Tensor>, eps)
    }

    pub fn add_rms_norm(x: &Tensor, delta: &Tensor, weight: &Tensor, eps: f64) -> (Tensor, Tensor) {
        let sum = x + delta;
        let normed = rms_norm(&sum, weight, eps);
        (sum, normed)
    }

    pub fn silu_mul(gate_up: &Tensor) -> Tensor {
        let n = gate_up.size().last().copied().unwrap_or(0) / 2;
        gate_up.narrow(-1, 0, n).silu() * gate_up.narrow(-1, n, n)
    }

    pub fn rope(qkv: &Tensor, cos: &Tensor, sin: &Tensor, rotated: i64) -> Tensor {
        let [_, heads, dim] = qkv.size()[..] else {
            unreachable!("checked by kernels::rope")
        };
        let half = dim / 2;
        let x = qkv.narrow(1, 0, rotated);
        let rotate_half = Tensor::cat(&[-x.narrow(2, half, half), x.narrow(2, 0, half)], 2);
        let roped = &x * cos.unsqueeze(1) + rotate_half * sin.unsqueeze(1);
        Tensor::cat(&[roped, qkv.narrow(1, rotated, heads - rotated)], 1)
    }

    /// softmax(q·k·scale)·v in f32 over each sequence's slots: what attention over the gathered copy
    /// computes.
    pub fn decode_attention(
        query: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        slots: &[Vec<i64>],
        scale: f64,
    ) -> Tensor {
        let group = query.size()[1] / keys.size()[1];
        let rows: Vec<Tensor> = slots
            .iter()
            .enumerate()
            .map(|(i, slots)| {
                let index = Tensor::from_slice(slots).to_device(keys.device());
                let gather = |cache: &Tensor| {
                    cache
                        .index_select(0, &index)
                        .to_kind(Kind::Float)
                        .repeat_interleave_self_int(group, Some(1), None)
                        .transpose(0, 1)
                };
                let (k, v) = (gather(keys), gather(values));
                let q = query.get(i as i64).to_kind(Kind::Float).unsqueeze(1);
                let weights = (q.matmul(&k.transpose(1, 2)) * scale).softmax(-1, Kind::Float);
                weights.matmul(&v).squeeze_dim(1)
            })
            .collect();
        Tensor::stack(&rows, 0).to_kind(query.kind())
    }
}

/// Deterministic inputs of about unit size (no random generator: the caller's seeds stay untouched).
fn waves(shape: &[i64], phase: f64, kind: Kind, device: Device) -> Tensor {
    let n: i64 = shape.iter().product();
    let t = Tensor::arange(n, (Kind::Float, Device::Cpu));
    ((&t * 0.7311 + phase).sin() * 1.7 + (&t * 0.0917 + 2.0 * phase).cos())
        .view(shape)
        .to_kind(kind)
        .to_device(device)
}

/// See [`self_check`].
fn check_kernels(k: &Kernels, device: Device) -> Result<(), String> {
    let _no_grad = tch::no_grad_guard();
    for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
        // Off by at most a few roundings of the dtype, relative to the largest expected value: a wrong
        // index or a missing term is far beyond that.
        let tolerance = match kind {
            Kind::Float => 1e-5,
            Kind::Half => 4e-3,
            _ => 3e-2,
        };
        let compare = |what: &str, actual: &Tensor, expected: &Tensor| -> Result<(), String> {
            let (a, e) = (actual.to_kind(Kind::Float), expected.to_kind(Kind::Float));
            let scale = e.abs().max().double_value(&[]).max(1.0);
            let error = (a - e).abs().max().double_value(&[]) / scale;
            if error <= tolerance {
                Ok(())
            } else {
                Err(format!(
                    "fused kernel {what} ({kind:?}) disagrees with libtorch: relative error {error:e}"
                ))
            }
        };
        let w = |shape: &[i64], phase: f64| waves(shape, phase, kind, device);
        let (x, delta, weight) = (w(&[5, 200], 0.1), w(&[5, 200], 0.2), w(&[200], 0.3));
        let eps = 1e-5;
        let normed = k.rms_norm(&x, None, &weight, eps).1;
        compare("rms_norm", &normed, &unfused::rms_norm(&x, &weight, eps))?;
        let (sum, normed) = k.rms_norm(&x, Some(&delta), &weight, eps);
        let (expected_sum, expected) = unfused::add_rms_norm(&x, &delta, &weight, eps);
        compare("residual add", &sum.expect("the sum"), &expected_sum)?;
        compare("add_rms_norm", &normed, &expected)?;
        let gate_up = w(&[3, 2 * 300], 0.4);
        compare(
            "silu_mul",
            &k.silu_mul(&gate_up),
            &unfused::silu_mul(&gate_up),
        )?;
        let (qkv, cos, sin) = (w(&[4, 6, 64], 0.5), w(&[4, 64], 0.6), w(&[4, 64], 0.7));
        let roped = k.rope(&qkv, &cos, &sin, 4, None);
        compare("rope", &roped, &unfused::rope(&qkv, &cos, &sin, 4))?;
        // With the key (head 4) and value (head 5) rows stored at slots 9, 2, 5, 0 of a pool of 12.
        let (keys, values) = (w(&[12, 1, 64], 1.1), w(&[12, 1, 64], 1.2));
        let rows = Tensor::from_slice(&[9i64, 2, 5, 0]).to_device(device);
        let roped = k.rope(&qkv, &cos, &sin, 5, Some((&keys, &values, &rows, 1)));
        compare(
            "rope_and_store",
            &roped,
            &unfused::rope(&qkv, &cos, &sin, 5),
        )?;
        let stored = |cache: &Tensor| cache.index_select(0, &rows);
        compare(
            "rope_and_store keys",
            &stored(&keys),
            &roped.narrow(1, 4, 1),
        )?;
        compare(
            "rope_and_store values",
            &stored(&values),
            &roped.narrow(1, 5, 1),
        )?;
        // Sequences of 3 and 37 slots (padded to 40) scattered over a pool of 50, 2 query heads per
        // key/value head, query rows strided.
        let (keys, values) = (w(&[50, 2, 64], 0.8), w(&[50, 2, 64], 0.9));
        let slots = [vec![7, 3, 41], (0..37).map(|p| (p * 11 + 5) % 50).collect()];
        let padded: Vec<i64> = slots
            .iter()
            .flat_map(|s| {
                s.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, 40 - s.len()))
            })
            .collect();
        let on_device = |v: &[i64]| Tensor::from_slice(v).to_device(device);
        let query = w(&[2, 8, 64], 1.0).narrow(1, 0, 4);
        let scale = 0.125;
        let (padded, lengths) = (on_device(&padded), on_device(&[3, 37]));
        let out = k.paged_decode_attention(&query, &keys, &values, &padded, &lengths, scale);
        let expected = unfused::decode_attention(&query, &keys, &values, &slots, scale);
        compare("paged_decode_attention", &out, &expected)?;
    }
    Ok(())
}

/// Compiles the kernels with NVRTC for compute capability `major.minor` without a GPU (nothing is loaded)
/// and returns the size of the binary and ptxas's report (each kernel's registers, stack frame and
/// spills): checks the source and the NVRTC lookup on any machine. An error says why (NVRTC's log
/// included), or that this build has no shim.
pub fn compile_for(major: i32, minor: i32) -> Result<(usize, String), String> {
    cuda::compile_for(major, minor)
}

/// An index tensor a kernel can read: contiguous int64 on `device`.
fn readable_indices(t: &Tensor, device: Device) -> bool {
    t.kind() == Kind::Int64 && t.device() == device && t.is_contiguous()
}

/// The kernels when every tensor is contiguous, of one supported dtype and on one device they run on.
/// Whether the kernels run at all is asked first: off (the default), a call costs one device lookup.
fn fused_for(tensors: &[&Tensor]) -> Option<&'static Kernels> {
    let first = tensors.first()?;
    let device = first.device();
    let kernels = kernels_for(device).ok()?;
    let kind = first.kind();
    if !matches!(kind, Kind::Float | Kind::BFloat16 | Kind::Half) {
        return None;
    }
    let uniform = tensors
        .iter()
        .all(|t| t.device() == device && t.kind() == kind && t.is_contiguous());
    uniform.then_some(kernels)
}

/// The kernels for `device`, or why not as a static message: every kernel call asks, so the answer
/// allocates nothing (a failure's message is kept from when the kernels were loaded).
fn kernels_for(device: Device) -> Result<&'static Kernels, &'static str> {
    if !enabled() {
        return Err("switched off (MMREG_FUSED_KERNELS=1 switches them on)");
    }
    match device {
        Device::Cuda(index) => cuda::kernels(index),
        Device::Cpu if EMULATE.with(Cell::get) || EMULATE_ALL.load(Ordering::Relaxed) => {
            Ok(&EMULATED)
        }
        _ => Err("not a CUDA device"),
    }
}

/// A kernel: a `CUfunction` of a loaded module, or the emulator's number for it.
#[derive(Clone, Copy)]
enum Function {
    Cuda(*mut c_void),
    Emulated(i32),
}

// SAFETY: a CUfunction may be launched from any thread of the process.
unsafe impl Send for Function {}
unsafe impl Sync for Function {}

/// The kernels for one dtype, in the emulator's order.
struct ForKind {
    rms_norm: Function,
    add_rms_norm: Function,
    silu_mul: Function,
    rope: Function,
    /// For heads of up to 32, 64, 128 and 256 elements (1, 2, 4, 8 per lane).
    paged_decode_attention: [Function; 4],
}

/// The kernels of one device, for each dtype.
struct Kernels {
    /// The CUDA device they were loaded for (unused by the emulator).
    device: i32,
    /// The most blocks a grid-stride launch uses along x and y: enough to fill a GPU (y at CUDA's
    /// limit); a few for the emulator, which runs each thread as an OS thread (and so still checks the
    /// striding).
    max_grid: (i64, i64),
    f32: ForKind,
    bf16: ForKind,
    f16: ForKind,
}

const NAMES: [&str; 8] = [
    "rms_norm",
    "add_rms_norm",
    "silu_mul",
    "rope",
    "paged_decode_attention_e1",
    "paged_decode_attention_e2",
    "paged_decode_attention_e4",
    "paged_decode_attention_e8",
];
const SUFFIXES: [&str; 3] = ["f32", "bf16", "f16"];
/// Threads per block of the elementwise kernels, and at most for RMSNorm.
const BLOCK: u32 = 256;

static EMULATED: Kernels = {
    const fn for_kind(k: i32) -> ForKind {
        let n = NAMES.len() as i32;
        ForKind {
            rms_norm: Function::Emulated(n * k),
            add_rms_norm: Function::Emulated(n * k + 1),
            silu_mul: Function::Emulated(n * k + 2),
            rope: Function::Emulated(n * k + 3),
            paged_decode_attention: [
                Function::Emulated(n * k + 4),
                Function::Emulated(n * k + 5),
                Function::Emulated(n * k + 6),
                Function::Emulated(n * k + 7),
            ],
        }
    }
    Kernels {
        device: -1,
        max_grid: (3, 3),
        f32: for_kind(0),
        bf16: for_kind(1),
        f16: for_kind(2),
    }
};

extern "C" {
    fn mmreg_emulator_launch(
        id: i32,
        grid_x: u32,
        grid_y: u32,
        block: u32,
        args: *mut *mut c_void,
    ) -> i32;
}

fn ptr(t: &Tensor) -> *mut c_void {
    t.data_ptr()
}

/// A pointer to an argument's value, as a launch takes it.
macro_rules! arg {
    ($v:expr) => {
        (&mut $v) as *mut _ as *mut c_void
    };
}

impl Kernels {
    fn of(&self, kind: Kind) -> &ForKind {
        match kind {
            Kind::BFloat16 => &self.bf16,
            Kind::Half => &self.f16,
            _ => &self.f32,
        }
    }

    /// A grid-stride launch's grid for `x` blocks along x and `y` along y, within `max_grid`.
    fn grid(&self, x: i64, y: i64) -> (i64, i64) {
        (x.clamp(1, self.max_grid.0), y.clamp(1, self.max_grid.1))
    }

    /// Launches `f` with `args` (pointers to each argument's value, in the kernel's parameter order).
    fn launch(&self, f: Function, grid: (i64, i64), block: u32, args: &mut [*mut c_void]) {
        let (x, y) = (grid.0.max(1) as u32, grid.1.max(1) as u32);
        let status = match f {
            Function::Cuda(function) => cuda::launch(function, self.device, (x, y), block, args),
            // SAFETY: as for the CUDA launch: the arguments match the kernel's parameters and point at
            // live buffers (here in host memory) of its dtype and size.
            Function::Emulated(id) => unsafe {
                mmreg_emulator_launch(id, x, y, block, args.as_mut_ptr())
            },
        };
        // A launch fails only on a broken context or an invalid configuration, which these sizes rule
        // out; libtorch's own launches panic the same way through tch.
        assert_eq!(status, 0, "kernel launch failed with error {status}");
    }

    /// `x` (plus `delta`, when given, which is also returned) normalised over its last dimension.
    fn rms_norm(
        &self,
        x: &Tensor,
        delta: Option<&Tensor>,
        weight: &Tensor,
        eps: f64,
    ) -> (Option<Tensor>, Tensor) {
        let out = x.empty_like();
        let sum = delta.map(|_| x.empty_like());
        let cols = weight.size()[0];
        let rows = x.numel() as i64 / cols.max(1);
        if rows == 0 {
            return (sum, out);
        }
        let k = self.of(x.kind());
        let (mut out_p, mut x_p, mut w_p) = (ptr(&out), ptr(x), ptr(weight));
        let (mut cols, mut eps) = (cols as i32, eps as f32);
        // One block per row, a multiple of 32 threads up to 256.
        let block = (cols as u32).div_ceil(32).clamp(1, BLOCK / 32) * 32;
        if let (Some(sum), Some(delta)) = (&sum, delta) {
            let (mut sum_p, mut delta_p) = (ptr(sum), ptr(delta));
            let mut args = [
                arg!(out_p),
                arg!(sum_p),
                arg!(x_p),
                arg!(delta_p),
                arg!(w_p),
                arg!(cols),
                arg!(eps),
            ];
            self.launch(k.add_rms_norm, (rows, 1), block, &mut args);
        } else {
            let mut args = [arg!(out_p), arg!(x_p), arg!(w_p), arg!(cols), arg!(eps)];
            self.launch(k.rms_norm, (rows, 1), block, &mut args);
        }
        (sum, out)
    }

    fn silu_mul(&self, gate_up: &Tensor) -> Tensor {
        let mut size = gate_up.size();
        let last = size.last_mut().expect("checked by kernels::silu_mul");
        let n = *last / 2;
        *last = n;
        let out = Tensor::empty(size, (gate_up.kind(), gate_up.device()));
        let k = self.of(gate_up.kind());
        let rows = gate_up.numel() as i64 / (2 * n).max(1);
        let (mut out_p, mut in_p, mut rows, mut cols) = (ptr(&out), ptr(gate_up), rows, n);
        let mut args = [arg!(out_p), arg!(in_p), arg!(rows), arg!(cols)];
        let grid = self.grid((cols + BLOCK as i64 - 1) / BLOCK as i64, rows);
        self.launch(k.silu_mul, grid, BLOCK, &mut args);
        out
    }

    /// `store`: key cache, value cache, slots and key/value heads, for [`rope_and_store`].
    fn rope(
        &self,
        qkv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        rotated: i64,
        store: Option<(&Tensor, &Tensor, &Tensor, i64)>,
    ) -> Tensor {
        let out = qkv.empty_like();
        let k = self.of(qkv.kind());
        let [tokens, heads, dim] = qkv.size()[..] else {
            unreachable!("checked by kernels::rope")
        };
        let (mut out_p, mut qkv_p, mut cos_p, mut sin_p) =
            (ptr(&out), ptr(qkv), ptr(cos), ptr(sin));
        let mut tokens = tokens;
        let (mut heads32, mut rotated, mut dim32) = (heads as i32, rotated as i32, dim as i32);
        let null = std::ptr::null_mut();
        let (mut keys_p, mut values_p, mut slots_p, mut kv_heads) = match store {
            Some((keys, values, slots, kv)) => (ptr(keys), ptr(values), ptr(slots), kv as i32),
            None => (null, null, null, 0),
        };
        let mut args = [
            arg!(out_p),
            arg!(qkv_p),
            arg!(cos_p),
            arg!(sin_p),
            arg!(tokens),
            arg!(heads32),
            arg!(rotated),
            arg!(dim32),
            arg!(keys_p),
            arg!(values_p),
            arg!(slots_p),
            arg!(kv_heads),
        ];
        // A thread per pair of elements (j, j + dim/2) of a row (token, head).
        let half = dim / 2;
        let block = (half as u32).div_ceil(32).clamp(1, BLOCK / 32) * 32;
        let grid = self.grid((half + block as i64 - 1) / block as i64, tokens * heads);
        self.launch(k.rope, grid, block, &mut args);
        out
    }

    /// One block per (sequence, key/value head) of `BLOCK` threads, the 8 warps (`kWarps`) that
    /// `paged_decode_attention_block` in the CUDA source is written for.
    fn paged_decode_attention(
        &self,
        query: &Tensor,
        key_cache: &Tensor,
        value_cache: &Tensor,
        slots: &Tensor,
        lengths: &Tensor,
        scale: f64,
    ) -> Tensor {
        let [sequences, heads, dim] = query.size()[..] else {
            unreachable!("checked by kernels::paged_decode_attention")
        };
        let out = Tensor::empty([sequences, heads, dim], (query.kind(), query.device()));
        let k = self.of(query.kind());
        let kv_heads = key_cache.size()[1];
        let (mut out_p, mut q_p, mut keys_p, mut values_p) =
            (ptr(&out), ptr(query), ptr(key_cache), ptr(value_cache));
        let (mut slots_p, mut lengths_p) = (ptr(slots), ptr(lengths));
        let (mut q_stride, mut width) = (query.stride()[0], slots.numel() as i64 / sequences);
        let (mut heads32, mut kv_heads32, mut dim32) = (heads as i32, kv_heads as i32, dim as i32);
        let mut scale = scale as f32;
        let mut args = [
            arg!(out_p),
            arg!(q_p),
            arg!(q_stride),
            arg!(keys_p),
            arg!(values_p),
            arg!(slots_p),
            arg!(width),
            arg!(lengths_p),
            arg!(heads32),
            arg!(kv_heads32),
            arg!(dim32),
            arg!(scale),
        ];
        // Elements per lane: the variant for the smallest of 1, 2, 4, 8 that covers the head.
        let variant = match (dim as u32).div_ceil(32) {
            0 | 1 => 0,
            2 => 1,
            3 | 4 => 2,
            _ => 3,
        };
        let blocks = sequences * kv_heads;
        self.launch(
            k.paged_decode_attention[variant],
            (blocks, 1),
            BLOCK,
            &mut args,
        );
        out
    }
}

/// Loading and launching on CUDA devices through the shim.
#[cfg(mmreg_cuda_shim)]
mod cuda {
    use std::collections::HashMap;
    use std::ffi::{c_char, c_void, CString};
    use std::sync::Mutex;

    use super::{check_kernels, ForKind, Function, Kernels, NAMES, SUFFIXES};

    const SOURCE: &str = include_str!("../csrc/fused_kernels.cu");

    extern "C" {
        fn mmreg_kernels_compile(
            source: *const c_char,
            major: i32,
            minor: i32,
            size: *mut usize,
            report: *mut c_char,
            report_capacity: usize,
            error: *mut c_char,
            capacity: usize,
        ) -> i32;
        fn mmreg_kernels_load(
            device: i32,
            source: *const c_char,
            module: *mut *mut c_void,
            error: *mut c_char,
            capacity: usize,
        ) -> i32;
        fn mmreg_kernels_function(module: *mut c_void, name: *const c_char) -> *mut c_void;
        fn mmreg_kernels_launch(
            function: *mut c_void,
            device: i32,
            grid_x: u32,
            grid_y: u32,
            block: u32,
            args: *mut *mut c_void,
        ) -> i32;
    }

    /// Compiled and checked once per device, or why not (logged once, the message kept for good).
    type Loaded = Result<&'static Kernels, &'static str>;
    static LOADED: Mutex<Option<HashMap<usize, Loaded>>> = Mutex::new(None);

    pub(super) fn kernels(device: usize) -> Loaded {
        let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
        let loaded = loaded.get_or_insert_with(HashMap::new);
        let entry = loaded.entry(device).or_insert_with(|| {
            let checked = load(device).and_then(|kernels| {
                let kernels: &'static Kernels = Box::leak(Box::new(kernels));
                check_kernels(kernels, tch::Device::Cuda(device))?;
                Ok(kernels)
            });
            match &checked {
                Ok(_) => tracing::debug!(device, "fused kernels compiled and checked"),
                Err(why) => {
                    tracing::warn!(
                        device,
                        "fused kernels unavailable, running unfused ops: {why}"
                    )
                }
            }
            checked.map_err(|why| &*Box::leak(why.into_boxed_str()))
        });
        *entry
    }

    /// Calls the shim with an error buffer; the message it wrote when it returned non-zero.
    fn with_error(call: impl FnOnce(*mut c_char, usize) -> i32) -> Result<(), String> {
        let mut error = vec![0u8; 16 * 1024];
        let status = call(error.as_mut_ptr().cast(), error.len());
        if status == 0 {
            return Ok(());
        }
        let end = error.iter().position(|&b| b == 0).unwrap_or(error.len());
        let message = String::from_utf8_lossy(&error[..end]);
        Err(format!("{message} (status {status})"))
    }

    pub(super) fn compile_for(major: i32, minor: i32) -> Result<(usize, String), String> {
        let source = CString::new(SOURCE).map_err(|e| e.to_string())?;
        let mut size = 0usize;
        let mut report = vec![0u8; 64 * 1024];
        // SAFETY: the shim writes the size and NUL-terminated texts of at most their capacities, and
        // catches every C++ exception.
        with_error(|error, capacity| unsafe {
            mmreg_kernels_compile(
                source.as_ptr(),
                major,
                minor,
                &mut size,
                report.as_mut_ptr().cast(),
                report.len(),
                error,
                capacity,
            )
        })?;
        let end = report.iter().position(|&b| b == 0).unwrap_or(report.len());
        Ok((size, String::from_utf8_lossy(&report[..end]).into_owned()))
    }

    fn load(device: usize) -> Result<Kernels, String> {
        let source = CString::new(SOURCE).map_err(|e| e.to_string())?;
        let mut module = std::ptr::null_mut();
        // SAFETY: as in `compile_for`; the shim sets `module` on success.
        with_error(|error, capacity| unsafe {
            mmreg_kernels_load(device as i32, source.as_ptr(), &mut module, error, capacity)
        })?;
        let function = |name: String| {
            let c_name = CString::new(name.clone()).map_err(|e| e.to_string())?;
            // SAFETY: `module` was loaded above; the shim returns null when the name is missing.
            let f = unsafe { mmreg_kernels_function(module, c_name.as_ptr()) };
            if f.is_null() {
                Err(format!("kernel {name} missing from the compiled module"))
            } else {
                Ok(Function::Cuda(f))
            }
        };
        let for_kind = |suffix: &str| -> Result<ForKind, String> {
            let [rms_norm, add_rms_norm, silu_mul, rope, e1, e2, e4, e8] =
                NAMES.map(|name| function(format!("{name}_{suffix}")));
            Ok(ForKind {
                rms_norm: rms_norm?,
                add_rms_norm: add_rms_norm?,
                silu_mul: silu_mul?,
                rope: rope?,
                paged_decode_attention: [e1?, e2?, e4?, e8?],
            })
        };
        let [f32, bf16, f16] = SUFFIXES.map(for_kind);
        Ok(Kernels {
            device: device as i32,
            max_grid: (8192, 65535),
            f32: f32?,
            bf16: bf16?,
            f16: f16?,
        })
    }

    pub(super) fn launch(
        function: *mut c_void,
        device: i32,
        (grid_x, grid_y): (u32, u32),
        block: u32,
        args: &mut [*mut c_void],
    ) -> i32 {
        // SAFETY: the caller passes arguments matching the kernel's parameters, every tensor pointer a
        // live contiguous CUDA buffer of the kernel's dtype and size; the shim catches every C++
        // exception.
        unsafe { mmreg_kernels_launch(function, device, grid_x, grid_y, block, args.as_mut_ptr()) }
    }
}

#[cfg(not(mmreg_cuda_shim))]
mod cuda {
    use std::ffi::c_void;

    use super::Kernels;

    const NO_SHIM: &str = "this build has no CUDA shim (no CUDA headers next to libtorch)";

    pub(super) fn kernels(_device: usize) -> Result<&'static Kernels, &'static str> {
        Err(NO_SHIM)
    }

    pub(super) fn compile_for(_major: i32, _minor: i32) -> Result<(usize, String), String> {
        Err(NO_SHIM.into())
    }

    pub(super) fn launch(
        _: *mut c_void,
        _: i32,
        _: (u32, u32),
        _: u32,
        _: &mut [*mut c_void],
    ) -> i32 {
        unreachable!("no CUDA kernels are loaded without the shim")
    }
}
