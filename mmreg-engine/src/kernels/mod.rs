//! Kernels of our own for decoder layers: RMSNorm (with the residual add before it), SiLU × up (and
//! the vision towers' quick_gelu), rotary embeddings, decode attention that reads the paged KV cache in place, and the linear layer of a
//! one-sequence decode step (alone, with SiLU × up after the MLP's stacked gate and up projection, or
//! with rope and the KV-cache write after the stacked q/k/v one; and of 2 to 16 sequences on
//! the tensor cores); and the argmax of a step's logits. The
//! elementwise ones replace several libtorch kernels each and compute the same values
//! (`csrc/fused_kernels.cu` rounds every intermediate to the model dtype where HF's op-by-op code does).
//!
//! On CUDA they are compiled once per device by NVRTC (which pip's torch ships), checked against
//! libtorch's ops ([`self_check`]), and launched through the shim on libtorch's current stream, so they
//! run inside CUDA graphs. **On by default** since they won every configuration measured on an H200
//! (docs/benchmarks.md, runs 25–27); `MMREG_FUSED_KERNELS=0` or [`set_enabled`] switches them off.
//! Everywhere else (on the CPU, in a build without the shim, when NVRTC or the self-check fails, or
//! switched off) each function runs HF's plain libtorch ops instead, which stay the reference, so the
//! layers of `mmreg-nn` call these functions unconditionally.
//!
//! The module by concern: the switches and entry points here; [`reference`] (the libtorch formulas each
//! kernel replaces); `launch` (argument lists, grids, the launch counters); `nvrtc` (compiling and
//! loading through the shim); `self_check` (each kernel against its reference when it loads).
//!
//! Without a GPU, the CPU emulator (`csrc/kernel_emulator.cpp`) runs the same CUDA source, launched by
//! the same code, for the tests.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use tch::{Device, Kind, Tensor};

mod launch;
mod nvrtc;
pub mod reference;
mod self_check;

use launch::{Kernels, EMULATED};
use reference as unfused;

/// Whether the environment variable `name` is anything but `0` (unset counts as on).
fn not_zero(name: &str) -> bool {
    std::env::var(name).map_or(true, |v| v != "0")
}

/// A process-wide setting, a small number: set by a function, else decided on first use (from the
/// environment). Held as the value + 1, 0 while undecided.
struct Setting(AtomicU8);

impl Setting {
    /// Not decided yet.
    const fn new() -> Self {
        Setting(AtomicU8::new(0))
    }

    fn set(&self, value: u8) {
        self.0.store(value.min(u8::MAX - 1) + 1, Ordering::Relaxed);
    }

    /// The setting as set, else `decide()`'s answer, kept (a concurrent `set` wins over it).
    fn get(&self, decide: impl FnOnce() -> u8) -> u8 {
        if self.0.load(Ordering::Relaxed) == 0 {
            let decided = decide().min(u8::MAX - 1) + 1;
            let _ = self
                .0
                .compare_exchange(0, decided, Ordering::Relaxed, Ordering::Relaxed);
        }
        self.0.load(Ordering::Relaxed) - 1
    }
}

/// A process-wide on/off [`Setting`].
struct Switch(Setting);

impl Switch {
    const fn new() -> Self {
        Switch(Setting::new())
    }

    fn set(&self, on: bool) {
        self.0.set(u8::from(on));
    }

    /// The switch as set, else `decide()`'s answer, kept.
    fn get(&self, decide: impl FnOnce() -> bool) -> bool {
        self.0.get(|| u8::from(decide())) == 1
    }
}

static ENABLED: Switch = Switch::new();

/// Switches the fused kernels on or off for the whole process (overrides `MMREG_FUSED_KERNELS`).
pub fn set_enabled(on: bool) {
    ENABLED.set(on);
}

/// Whether the fused kernels are switched on: [`set_enabled`], else unless `MMREG_FUSED_KERNELS` is
/// `0` (or empty).
pub fn enabled() -> bool {
    ENABLED.get(|| std::env::var("MMREG_FUSED_KERNELS").map_or(true, |v| !v.is_empty() && v != "0"))
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
/// rounded to the dtype before it is normalised (as two separate ops would). `x` is the residual
/// stream: with `MMREG_EARLY_READS=1` the kernel reads it before waiting for the kernel launched just
/// before it, so that kernel must not be what wrote `x` (a decoder's stream comes from further back).
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

/// The residual add and the next LayerNorm (HF's `nn.LayerNorm` over the last dimension, with weight
/// and bias): returns `(x + delta, layer_norm(x + delta))`, the sum rounded to the dtype before it is
/// normalised, as two separate ops would. One kernel on CUDA where rows are whole 16-byte vectors.
pub fn add_layer_norm(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> (Tensor, Tensor) {
    let cols = weight.size().first().copied().unwrap_or(0);
    let fits = || {
        x.size() == delta.size()
            && x.size().last() == Some(&cols)
            && bias.size() == [cols]
            && Kernels::vector_rows_fit([x, delta, weight, bias], x.kind(), cols)
    };
    match fused_for(&[x, delta, weight, bias]) {
        Some(k) if fits() => k.add_layer_norm(x, delta, weight, bias, eps),
        _ => unfused::add_layer_norm(x, delta, weight, bias, eps),
    }
}

/// `silu(gate) * up` for a stacked `[.., 2 * n]` projection (`gate` the first half): `[.., n]`.
pub fn silu_mul(gate_up: &Tensor) -> Tensor {
    match fused_for(&[gate_up]) {
        Some(k) if gate_up.dim() > 0 => k.silu_mul(gate_up),
        _ => unfused::silu_mul(gate_up),
    }
}

/// CLIP's `quick_gelu`, `x * sigmoid(1.702 * x)`, as one kernel where HF runs three
/// (`MMREG_FUSED_QUICK_GELU=0`: libtorch's three, for comparisons).
pub fn quick_gelu(x: &Tensor) -> Tensor {
    static FUSED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    match fused_for(&[x]) {
        Some(k) if *FUSED.get_or_init(|| not_zero("MMREG_FUSED_QUICK_GELU")) => k.quick_gelu(x),
        _ => unfused::quick_gelu(x),
    }
}

/// torch.argmax over the last dimension of `[rows, cols]` logits: each row's first index of its
/// largest element, NaN counting as the largest; `[rows]` i64. One block a row where the kernels run
/// (libtorch's reduction took 12-13 µs of every decode step for at most 32 rows, docs/benchmarks.md,
/// run 109; `MMREG_FUSED_ARGMAX=0`: libtorch's), else libtorch's.
pub fn argmax(logits: &Tensor) -> Tensor {
    static FUSED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let fits = || matches!(logits.size()[..], [rows, cols] if rows > 0 && cols > 0 && cols <= i64::from(i32::MAX));
    match fused_for(&[logits]) {
        Some(k) if fits() && *FUSED.get_or_init(|| not_zero("MMREG_FUSED_ARGMAX")) => {
            k.argmax_rows(logits)
        }
        _ => logits.argmax(-1, false),
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
        Some(k) if fits() => k.rope(qkv, cos, sin, rotated, None, 0),
        _ => unfused::rope(qkv, cos, sin, rotated),
    }
}

/// Where [`rope_and_store`] and [`linear_rope_and_store`] put a decoder layer's new keys and values, and
/// the rotation they take: the tokens' `cos` and `sin` (`[tokens, dim]`, the projection's dtype), the
/// layer's caches (`[slots, kv_heads, dim]`) and the tokens' `slots` (`[tokens]`, int64).
pub struct RopeStore<'a> {
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub kv_heads: i64,
    pub key_cache: &'a mut Tensor,
    pub value_cache: &'a mut Tensor,
    pub slots: &'a Tensor,
    /// Rows of zeros that [`rope_and_store`]'s output keeps after the tokens' (it is then `[tokens +
    /// slack_rows, heads, dim]`), for an attention that reads a sequence's keys past its end.
    pub slack_rows: i64,
}

impl RopeStore<'_> {
    /// Whether the kernels can take these for a projection of `tokens` rows of `heads` heads.
    fn fits(&self, tokens: i64, heads: i64, device: Device) -> bool {
        let dim = self.cos.size().get(1).copied().unwrap_or(0);
        self.cos.size() == [tokens, dim]
            && self.sin.size() == [tokens, dim]
            && dim > 0
            && dim % 2 == 0
            && self.kv_heads > 0
            && 2 * self.kv_heads <= heads
            && self.key_cache.size().get(1..) == Some(&[self.kv_heads, dim][..])
            && self.value_cache.size() == self.key_cache.size()
            && self.slots.size() == [tokens]
            && readable_indices(self.slots, device)
    }
}

/// [`rope`] of a decoder layer's stacked `[tokens, heads, dim]` projection whose last `2 * kv_heads`
/// heads are the keys and the values (queries and keys rotate), which also stores the keys (rotated)
/// and values in the caches at their slots: the step's KV-cache write in the same pass. Followed by
/// `store.slack_rows` rows of zeros. `None` where the kernel does not run: the caller then applies
/// [`rope`] and writes the cache itself.
pub fn rope_and_store(qkv: &Tensor, store: RopeStore) -> Option<Tensor> {
    let k = fused_for(&[
        qkv,
        store.cos,
        store.sin,
        &*store.key_cache,
        &*store.value_cache,
    ])?;
    let [tokens, heads, dim] = qkv.size()[..] else {
        return None;
    };
    if !(store.fits(tokens, heads, qkv.device()) && store.cos.size()[1] == dim) {
        return None;
    }
    let caches = (
        &*store.key_cache,
        &*store.value_cache,
        store.slots,
        store.kv_heads,
    );
    let rotated = heads - store.kv_heads;
    Some(k.rope(
        qkv,
        store.cos,
        store.sin,
        rotated,
        Some(caches),
        store.slack_rows.max(0),
    ))
}

/// [`linear`] of `x` by a decoder layer's stacked q/k/v projection (`weight` `[heads * dim, k]`, `bias`
/// `[heads * dim]`, `dim` from `store.cos`), then [`rope_and_store`]: the projection
/// `[tokens, heads, dim]`, queries and keys rotated, keys and values also in the caches. A decode step
/// of one sequence takes one kernel for all of it (the product's last step rotates and stores), and so
/// does one of a few where [`linear`] takes them on the tensor cores and 16 divides `dim`; `None`
/// elsewhere: the caller then projects and calls [`rope_and_store`]. With `MMREG_EARLY_READS=1` the
/// few-rows kernels read `store`'s cos, sin and slots before waiting for the kernel launched just
/// before, so that kernel must not be what wrote them (a step's come before its first layer).
pub fn linear_rope_and_store(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    store: RopeStore,
) -> Option<Tensor> {
    let tensors = [
        x,
        weight,
        store.cos,
        store.sin,
        &*store.key_cache,
        &*store.value_cache,
    ];
    let k = fused_for(&tensors)?;
    let (n, dim) = (
        weight.size()[0],
        store.cos.size().get(1).copied().unwrap_or(0),
    );
    let rows = linear_rows(x, weight, bias).unwrap_or(0);
    let fits = (rows == 1 || (rows_fit(x, rows) && dim % 16 == 0))
        && dim > 0
        && n % dim == 0
        && store.fits(rows, n / dim, x.device());
    fits.then(|| k.linear_rope_and_store(x, weight, bias, dim, &store))
}

/// Attention of one new token per sequence over its cached keys and values, read in place from the paged
/// cache: `query` `[sequences, heads, dim]` (rows may be strided, as a narrow of the stacked projection),
/// `key_cache`/`value_cache` `[slots, kv_heads, dim]`, `slots` `[sequences * width]` (each sequence's
/// slots, padded to `width`), `lengths` `[sequences]` (how many are real; a sequence of none gets
/// zeros). Returns `[sequences, heads, dim]`, or `None` where the kernel does not run (not on CUDA,
/// switched off, or shapes it does not handle: `dim` up to 256, at most 8 query heads per key/value
/// head, group × dim at most 1024): the caller then gathers the keys and values and runs libtorch's
/// attention. Where a step has few sequences, each context is split in chunks across blocks and the
/// chunks reduced after (flash-decoding), so that the GPU is full at batch 1 too. In bf16 and f16 with
/// heads of 64 or 128 elements the products run on the tensor cores (`MMREG_DECODE_ATTENTION_MMA=0`
/// keeps the kernels that multiply in f32 on the CUDA cores). With `MMREG_EARLY_READS=1` the tensor-core
/// kernel reads `slots` and `lengths` before waiting for the kernel launched just before, so that kernel
/// must not be what wrote them (a step's come before its first layer).
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

thread_local! {
    static TENSOR_CORE_ATTENTION: Cell<Option<bool>> = const { Cell::new(None) };
    static SIX_WARP_ATTENTION: Cell<Option<bool>> = const { Cell::new(None) };
}

type ThreadSwitch = std::thread::LocalKey<Cell<Option<bool>>>;

/// Runs `f` with the thread's `switch` set `on`, then restores its setting.
fn with_switch<R>(switch: &'static ThreadSwitch, on: bool, f: impl FnOnce() -> R) -> R {
    let before = switch.with(|c| c.replace(Some(on)));
    let result = f();
    switch.with(|c| c.set(before));
    result
}

/// The thread's `switch` where set, else unless the environment variable `name` is `0` (`from_env`,
/// read once).
fn switch_on(
    switch: &'static ThreadSwitch,
    from_env: &std::sync::OnceLock<bool>,
    name: &str,
) -> bool {
    switch
        .with(Cell::get)
        .unwrap_or_else(|| *from_env.get_or_init(|| not_zero(name)))
}

/// Runs `f` with decode attention's tensor cores switched `on` on this thread (over
/// `MMREG_DECODE_ATTENTION_MMA`), then restores the thread's setting: the self-check and the tests run
/// both paths.
#[doc(hidden)]
pub fn with_tensor_core_attention<R>(on: bool, f: impl FnOnce() -> R) -> R {
    with_switch(&TENSOR_CORE_ATTENTION, on, f)
}

/// Whether [`paged_decode_attention`] takes its tensor-core kernel where it applies (bf16 and f16,
/// heads of 64 or 128 elements): this thread's override, else unless `MMREG_DECODE_ATTENTION_MMA` is
/// `0` (read once). On by default: on an H200 it measured faster at every batch of both 7B shapes
/// (docs/benchmarks.md, run 35).
fn tensor_core_attention() -> bool {
    static FROM_ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    switch_on(
        &TENSOR_CORE_ATTENTION,
        &FROM_ENV,
        "MMREG_DECODE_ATTENTION_MMA",
    )
}

/// Runs `f` with the tensor-core attention's six-warp blocks switched `on` on this thread (over
/// `MMREG_ATTENTION_SIX_WARPS`), then restores the thread's setting: the tests run both.
#[doc(hidden)]
pub fn with_six_warp_attention<R>(on: bool, f: impl FnOnce() -> R) -> R {
    with_switch(&SIX_WARP_ATTENTION, on, f)
}

/// Whether an unsplit tensor-core decode attention whose blocks the device holds at once runs in
/// blocks of six warps rather than four: this thread's override, else unless `MMREG_ATTENTION_SIX_WARPS`
/// is `0` (read once). At its 168 registers a thread the kernel fits 3 blocks of 4 warps or 2 of 6 in an
/// SM; LLaVA-1.5's batch 8 (256 pairs on 132 SMs) left blocks of 4 warps at about 2 an SM, 8 warps
/// reading keys and values where batch 32 has 12, and each warp walked 10 tiles of a 700-position
/// context one after another. Blocks of 6 put 12 warps on the SM and cut a warp's tiles to 7: +1.8%
/// decode tokens/s at batch 8 on an H100 (docs/benchmarks.md, run 72).
fn six_warp_attention() -> bool {
    static FROM_ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    switch_on(&SIX_WARP_ATTENTION, &FROM_ENV, "MMREG_ATTENTION_SIX_WARPS")
}

/// `x · weightᵀ (+ bias)`, libtorch's `linear`: `x` `[.., k]`, `weight` `[n, k]` as a layer stores it,
/// `bias` `[n]`. A step of 1 to 16 sequences in bf16 or f16 takes a kernel of our own that streams the
/// weight once for all rows and multiplies on the tensor cores, with the SiLU and rope epilogues (on an
/// H200, 2–7% more decode tokens/s than cuBLAS and separate kernels at 2 to 16 sequences:
/// docs/benchmarks.md, run 49); up to 8 rows take its variant for one tile of x's rows, which holds
/// fewer registers and more blocks (+4% at batch 8 in run 58; `MMREG_FEW_ROWS_8=0`,
/// [`set_eight_rows`]: never), and so does one row (`MMREG_FEW_ROWS_1=0`, [`set_few_rows_for_one`]:
/// never). `MMREG_FUSED_LINEAR=one` (or [`set_few_rows_linear`]) keeps cuBLAS for 2 to 16 rows and the
/// one-row kernel for one. That kernel (f32, or switched on) streams the weight in 16-byte vectors
/// through the CUDA cores; a weight with too few rows to keep the device's warps busy has k split
/// between 2 or 4 warps of a block (`MMREG_LINEAR_SPLIT=0`, [`set_linear_split`]: never). More rows,
/// and wherever the kernels do not run, take libtorch's, or with `MMREG_TUNED_GEMM=1` the shape's
/// fastest cuBLASLt configuration ([`crate::tuned_gemm`]). `MMREG_FUSED_LINEAR=0` keeps libtorch's for
/// every size while the other kernels run (for comparisons).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
    match fused_for(&[x, weight]) {
        Some(k) if linear_rows(x, weight, bias).is_some_and(|rows| rows_fit(x, rows)) => {
            k.linear(x, weight, bias)
        }
        _ => crate::tuned_gemm::linear(x, weight, bias).unwrap_or_else(|| x.linear(weight, bias)),
    }
}

/// Whether the linear kernels take `rows` of `x`: one in every dtype; a few on the tensor cores, in
/// bf16 and f16, where switched on.
fn rows_fit(x: &Tensor, rows: i64) -> bool {
    rows == 1
        || (few_rows_enabled()
            && (2..=launch::FEW_ROWS).contains(&rows)
            && matches!(x.kind(), Kind::BFloat16 | Kind::Half))
}

/// The MLP's gated activation after its stacked `[gate; up]` projection (`weight` `[2 * n, k]`, `bias`
/// `[2 * n]`): `silu(x · gateᵀ) * (x · upᵀ)`, `[.., n]`, each product rounded to the dtype first, as
/// [`silu_mul`] after [`linear`]. A decode step of one sequence takes one kernel for both (the
/// product's last step applies the activation), and so does one of a few where [`linear`] takes them
/// on the tensor cores and 8 divides `n`; other sizes take [`linear`], then [`silu_mul`].
pub fn linear_silu_mul(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
    let n = weight.size().first().copied().unwrap_or(0);
    let fits = |rows| n % 2 == 0 && (rows == 1 || (rows_fit(x, rows) && (n / 2) % 8 == 0));
    match fused_for(&[x, weight]) {
        Some(k) if linear_rows(x, weight, bias).is_some_and(fits) => {
            k.linear_silu_mul(x, weight, bias)
        }
        _ => silu_mul(&linear(x, weight, bias)),
    }
}

/// The rows of `x` where the linear kernels can take `x`, `weight` and `bias` (switched on, shapes,
/// alignment, dtype of the bias), whatever their number; `None` where they cannot.
fn linear_rows(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Option<i64> {
    let [n, cols] = weight.size()[..] else {
        return None;
    };
    let per_vector = 16 / x.kind().elt_size_in_bytes() as i64;
    let bias_fits = bias.is_none_or(|b| {
        b.size() == [n] && b.kind() == x.kind() && b.device() == x.device() && b.is_contiguous()
    });
    // The CPU emulator runs every CUDA thread as an OS thread: a tiny model's 32k-row LM head would
    // take it minutes, so there only small weights take the kernel (the rest libtorch's product).
    let emulated_fits = x.device().is_cuda() || n <= 4096;
    let fits = linear_enabled()
        && x.size().last() == Some(&cols)
        && cols % per_vector == 0
        && launch::aligned(x, 16)
        && launch::aligned(weight, 16)
        && bias_fits
        && emulated_fits;
    fits.then(|| x.numel() as i64 / cols.max(1))
}

/// Whether [`linear`] may take its kernels (`MMREG_FUSED_LINEAR=0` says no), read once.
fn linear_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| not_zero("MMREG_FUSED_LINEAR"))
}

static FEW_ROWS: Switch = Switch::new();

/// Switches the few-rows linear kernel on or off for the whole process (overrides
/// `MMREG_FUSED_LINEAR`). On by default: with its SiLU and rope epilogues it measured ahead of cuBLAS
/// and the separate kernels at 2 to 16 rows on an H200 (docs/benchmarks.md, runs 48–49).
pub fn set_few_rows_linear(on: bool) {
    FEW_ROWS.set(on);
}

/// Whether [`linear`] takes the few-rows kernel for 2 to 16 rows: [`set_few_rows_linear`], else
/// not `MMREG_FUSED_LINEAR=one`.
fn few_rows_enabled() -> bool {
    FEW_ROWS.get(|| std::env::var("MMREG_FUSED_LINEAR").map_or(true, |v| v != "one"))
}

static EIGHT_ROWS: Switch = Switch::new();

/// Lets the few-rows linear kernels take their 8-row variants for 2 to 8 rows, or not (the 16-row
/// kernels for every few rows; for the whole process, overrides `MMREG_FEW_ROWS_8`). On by default:
/// one tile of x's rows needs fewer registers, so more of the weight is in flight (docs/benchmarks.md,
/// run 58).
pub fn set_eight_rows(on: bool) {
    EIGHT_ROWS.set(on);
}

/// Whether the few-rows kernels take their 8-row variants for at most 8 rows: [`set_eight_rows`],
/// else not `MMREG_FEW_ROWS_8=0`.
fn eight_rows_enabled() -> bool {
    EIGHT_ROWS.get(|| not_zero("MMREG_FEW_ROWS_8"))
}

static FEW_ROWS_FOR_ONE: Switch = Switch::new();

/// Lets one row (a decode step of one sequence) take the 8-row few-rows kernels in bf16 and f16, or
/// keeps the one-row kernels there (for the whole process, overrides `MMREG_FEW_ROWS_1`). On by
/// default: on an H200 a batch-1 step measured level with the one-row kernels or ahead, within the
/// runs' spread (docs/benchmarks.md, runs 58–60).
pub fn set_few_rows_for_one(on: bool) {
    FEW_ROWS_FOR_ONE.set(on);
}

/// Whether one row takes the 8-row few-rows kernels: [`set_few_rows_for_one`], else not
/// `MMREG_FEW_ROWS_1=0`.
fn few_rows_for_one_enabled() -> bool {
    FEW_ROWS_FOR_ONE.get(|| not_zero("MMREG_FEW_ROWS_1"))
}

/// 16-byte vectors a thread of the vectorised RMSNorm holds where a call has many rows (a prefill's).
static NORM_VECTORS: Setting = Setting::new();

/// Sets how many 16-byte vectors each thread of the vectorised RMSNorm holds where a call has
/// `launch::NORM_MANY_ROWS` rows or more (1 to 4: fewer threads a row, more rows' blocks resident at once),
/// for the whole process; overrides `MMREG_NORM_VECTORS`. Fewer rows always take one vector a thread.
#[doc(hidden)]
pub fn set_norm_vectors_per_thread(vectors: u8) {
    NORM_VECTORS.set(vectors.clamp(1, 4));
}

/// [`set_norm_vectors_per_thread`]'s value, else `MMREG_NORM_VECTORS` (1 to 4), else 4. With a thread
/// per vector (as at a decode step) an H200 holds 528 of a 604-token prefill's blocks of 4096 columns
/// (two rounds), with 2 or 4 all of them; 4 took LLaVA-1.5's prefill from 15.7 to 15.4 ms at batch 1 and
/// from 105.4 to 103.9 at batch 8 (docs/benchmarks.md, runs 56 and 58).
fn norm_vectors_per_thread() -> i64 {
    i64::from(NORM_VECTORS.get(|| {
        std::env::var("MMREG_NORM_VECTORS")
            .ok()
            .and_then(|v| v.parse::<u8>().ok())
            .filter(|v| (1..=4).contains(v))
            .unwrap_or(4)
    }))
}

static LINEAR_SPLIT: Switch = Switch::new();

/// Lets the one-row linear kernel split k between warps where a weight has too few rows to keep the
/// device's warps busy, or not (for the whole process; overrides `MMREG_LINEAR_SPLIT`). On by default:
/// a 7B decoder's o_proj and down_proj split in two on an H200. Off, every product of one row sums each
/// output in the order of the fused gate/up and q/k/v products (`linear_silu_mul`,
/// `linear_rope_and_store`), which never split.
pub fn set_linear_split(on: bool) {
    LINEAR_SPLIT.set(on);
}

/// Whether the one-row linear kernel may split k: [`set_linear_split`], else not `MMREG_LINEAR_SPLIT=0`.
fn linear_split_enabled() -> bool {
    LINEAR_SPLIT.get(|| not_zero("MMREG_LINEAR_SPLIT"))
}

/// How many times the kernel `family` (`rms_norm`, `add_rms_norm`, `silu_mul`, `rope`,
/// `paged_decode_attention`, `paged_decode_attention_mma`, `linear`, `linear_silu_mul` or
/// `linear_rope_and_store`) has been launched in this process, on any device, the emulator included:
/// for tests that must see a kernel run, not only its result. `None` for an unknown name.
pub fn launches(family: &str) -> Option<u64> {
    let index = launch::FAMILIES.iter().position(|&f| f == family)?;
    Some(launch::LAUNCHES[index].load(Ordering::Relaxed))
}

/// Runs every kernel for `device` (as switched on: compiled, or emulated on the CPU) on small fixed
/// inputs in f32, bf16 and f16 and compares it with libtorch's ops: `Err` names the first that
/// disagrees. Loading the kernels on a GPU runs it first, and kernels that fail it are never used.
pub fn self_check(device: Device) -> Result<(), String> {
    self_check::check_kernels(kernels_for(device)?, device)
}

/// Compiles the kernels with NVRTC for compute capability `major.minor` without a GPU (nothing is loaded),
/// with `defines` (`#define` lines of the source's tuning constants, as the environment sets them for
/// measurements; empty: the defaults) before the source, and returns the size of the binary and ptxas's
/// report (each kernel's registers, stack frame and spills): checks the source and the NVRTC lookup on
/// any machine. An error says why (NVRTC's log included), or that this build has no shim.
pub fn compile_for(major: i32, minor: i32, defines: &str) -> Result<(usize, String), String> {
    nvrtc::compile_for(major, minor, defines)
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
        return Err("switched off (MMREG_FUSED_KERNELS=0 or kernels::set_enabled(false))");
    }
    match device {
        Device::Cuda(index) => nvrtc::kernels(index),
        Device::Cpu if EMULATE.with(Cell::get) || EMULATE_ALL.load(Ordering::Relaxed) => {
            Ok(&EMULATED)
        }
        _ => Err("not a CUDA device"),
    }
}
