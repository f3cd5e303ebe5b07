//! The loaded kernels of a device (or the emulator's) and their launches: argument lists in each
//! kernel's parameter order, grids and blocks.

use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};

use tch::{Kind, Tensor};

use super::nvrtc;

/// Launches of each kernel family since the process started, for tests that must see a kernel run:
/// `rms_norm`, `add_rms_norm`, `silu_mul`, `rope`, `paged_decode_attention` (every variant),
/// `linear`, `paged_decode_attention_mma` (the tensor-core variant alone), `linear_silu_mul` and
/// `linear_rope_and_store`, `quick_gelu`, the tensor-core attention's six-warp variant alone,
/// `add_layer_norm` and `argmax`.
pub(super) static LAUNCHES: [AtomicU64; 13] = [const { AtomicU64::new(0) }; 13];
pub(super) const FAMILIES: [&str; 13] = [
    "rms_norm",
    "add_rms_norm",
    "silu_mul",
    "rope",
    "paged_decode_attention",
    "linear",
    "paged_decode_attention_mma",
    "linear_silu_mul",
    "linear_rope_and_store",
    "quick_gelu",
    "paged_decode_attention_mma_w6",
    "add_layer_norm",
    "argmax",
];

fn counted(family: usize) {
    LAUNCHES[family].fetch_add(1, Ordering::Relaxed);
}

/// A kernel: a `CUfunction` of a loaded module, or the emulator's number for it.
#[derive(Clone, Copy)]
pub(super) enum Function {
    Cuda(*mut c_void),
    Emulated(i32),
}

// SAFETY: a CUfunction may be launched from any thread of the process.
unsafe impl Send for Function {}
unsafe impl Sync for Function {}

/// The kernels' names without their dtype suffix, in the emulator's order (`kEmulated` in
/// `csrc/kernel_emulator.cpp`): the elementwise ones, then decode attention for heads of up to 64, 128
/// and 256 elements (a position's row read by 8, 16 or 32 lanes), each holding up to 1, 4 or 8 query
/// heads per key/value head, and on the tensor cores (heads of 64 or 128 elements, up to 8 query heads
/// per key/value head, bf16 and f16); then the linear layer for one row, silu_mul and rope in 16-byte
/// vectors, the linear layer for a few rows, and the one-row linear layer with SiLU × up after a
/// stacked gate and up projection, or with rope and the KV-cache write after a stacked q/k/v one; the
/// one-row linear layer with k split; the few-rows linear layer with SiLU × up or rope after it; its
/// variants for one tile of x's rows; quick_gelu, plain and in 16-byte vectors; the tensor-core
/// attention in blocks of six warps; the residual add and LayerNorm in 16-byte vectors; the argmax of
/// each row.
pub(super) const NAMES: [&str; 35] = [
    "rms_norm",
    "add_rms_norm",
    "rms_norm_vectors",
    "add_rms_norm_vectors",
    "silu_mul",
    "rope",
    "paged_decode_combine",
    "paged_decode_attention_r8_g1",
    "paged_decode_attention_r8_g4",
    "paged_decode_attention_r8_g8",
    "paged_decode_attention_r16_g1",
    "paged_decode_attention_r16_g4",
    "paged_decode_attention_r16_g8",
    "paged_decode_attention_r32_g1",
    "paged_decode_attention_r32_g4",
    "paged_decode_attention_r32_g8",
    "paged_decode_attention_mma",
    "linear_one_row",
    "silu_mul_vectors",
    "rope_vectors",
    "linear_few_rows",
    "linear_one_row_silu",
    "linear_one_row_rope",
    "linear_one_row_split2",
    "linear_one_row_split4",
    "linear_few_rows_silu",
    "linear_few_rows_rope",
    "linear_few_rows_8",
    "linear_few_rows_silu_8",
    "linear_few_rows_rope_8",
    "quick_gelu",
    "quick_gelu_vectors",
    "paged_decode_attention_mma_w6",
    "add_layer_norm_vectors",
    "argmax_rows",
];
const RMS_NORM: usize = 0;
const ADD_RMS_NORM: usize = 1;
/// The vectorised variants follow the plain ones: `RMS_NORM + VECTORS`.
const VECTORS: usize = 2;
const SILU_MUL: usize = 4;
const ROPE: usize = 5;
const COMBINE: usize = 6;
pub(super) const ATTENTION: usize = 7;
/// Decode attention's variants from `ATTENTION` on: `LANES` × `GROUPS`, then the tensor cores'.
pub(super) const ATTENTION_VARIANTS: usize = LANES.len() * GROUPS.len() + 1;
pub(super) const LINEAR: usize = 17;
const SILU_MUL_VECTORS: usize = 18;
const ROPE_VECTORS: usize = 19;
const LINEAR_FEW_ROWS: usize = 20;
const LINEAR_SILU: usize = 21;
const LINEAR_ROPE: usize = 22;
/// `linear_one_row` with k split between 2 and 4 warps.
const LINEAR_SPLIT_2: usize = 23;
const LINEAR_SPLIT_4: usize = 24;
/// `linear_few_rows` with the epilogues of `linear_one_row_silu` and `linear_one_row_rope`.
const LINEAR_FEW_ROWS_SILU: usize = 25;
const LINEAR_FEW_ROWS_ROPE: usize = 26;
/// The three few-rows kernels for at most 8 rows (one tile of x's rows: fewer registers, 3 blocks an
/// SM on an H200 where the 16-row kernels fit 2).
const LINEAR_FEW_ROWS_8: usize = 27;
const LINEAR_FEW_ROWS_SILU_8: usize = 28;
const LINEAR_FEW_ROWS_ROPE_8: usize = 29;
const QUICK_GELU: usize = 30;
const QUICK_GELU_VECTORS: usize = 31;
/// The tensor-core decode attention in blocks of `ATTENTION_WIDE_WARPS` warps.
pub(super) const ATTENTION_MMA_WIDE: usize = 32;
const ADD_LAYER_NORM_VECTORS: usize = 33;
const ARGMAX_ROWS: usize = 34;
/// The most rows of x the few-rows linear kernel takes (its two tiles of 8), its warps per block
/// (`kFewWarps`) and weight rows per block (`kFewTile`).
pub(super) const FEW_ROWS: i64 = 16;
const FEW_ROWS_WARPS: u32 = 8;
const FEW_ROWS_TILE: i64 = 16;
/// Warps per block of the linear kernel, and weight rows per warp (`kLinearWarps`, `kLinearRows`).
pub(super) const LINEAR_WARPS: u32 = 4;
const LINEAR_ROWS_PER_WARP: i64 = 2;
/// Lanes reading a position's row in each attention variant (each lane a run of `RUN` elements), and
/// the query heads per key/value head it holds.
const LANES: [i64; 3] = [8, 16, 32];
const GROUPS: [i64; 3] = [1, 4, 8];
/// Elements per lane of a row (`kRun`), and the most chunks the combine reduces (`kMaxSplits`).
const RUN: i64 = 8;
/// Positions a warp of the tensor-core variant reads at once (`kMmaTile`), and its head sizes.
const MMA_TILE: i64 = 16;
const MMA_DIMS: [i64; 2] = [64, 128];
const MAX_SPLITS: i64 = 256;

/// Positions a warp of the attention variant reads at once (`kTile`: `kLoads` × 32 / lanes).
fn attention_tile(lanes: i64, group: i64, kind: Kind) -> i64 {
    let vectors = if group == 8 { 4 } else { 8 };
    let loads = vectors * 2 / kind.elt_size_in_bytes() as i64;
    loads * 32 / lanes
}

/// The kernels' dtype for `kind`, as an index into `SUFFIXES` (f32 for any other kind).
fn suffix_index(kind: Kind) -> usize {
    match kind {
        Kind::BFloat16 => 1,
        Kind::Half => 2,
        _ => 0,
    }
}

/// The kernels for one dtype, in the order of [`NAMES`].
pub(super) struct ForKind(pub(super) [Function; NAMES.len()]);

/// The kernels of one device, for each dtype.
pub(super) struct Kernels {
    /// The CUDA device they were loaded for (unused by the emulator).
    pub(super) device: i32,
    /// The most blocks a grid-stride launch uses along x and y: enough to fill a GPU (y at CUDA's
    /// limit); a few for the emulator, which runs each thread as an OS thread (and so still checks the
    /// striding).
    pub(super) max_grid: (i64, i64),
    /// Decode attention splits each sequence's context into chunks of at least a tile for each warp (or
    /// `min_chunk` positions where set), as many as make the fewest rounds of the blocks the device
    /// holds at once (`attention_resident`, for each dtype in `SUFFIXES`' order and variant; 0 where
    /// the driver could not say), or, with `target_blocks` set or the occupancy unknown, until there
    /// are about `target_blocks` blocks (`MMREG_DECODE_ATTENTION_BLOCKS`; small numbers for the
    /// emulator, so that its tests cover both the split and the unsplit path and warps with nothing to
    /// read).
    pub(super) target_blocks: Option<i64>,
    pub(super) min_chunk: Option<i64>,
    /// Launch with programmatic dependent launches (an sm_90+ device, `MMREG_PDL` not `0`).
    pub(super) programmatic: bool,
    pub(super) attention_resident: [[i64; ATTENTION_VARIANTS]; 3],
    /// The same for the tensor-core attention's six-warp variant, for each dtype.
    pub(super) attention_wide_resident: [i64; 3],
    /// How many blocks of the one-row linear kernel the device holds at once, for each dtype (0 where
    /// the driver could not say: no split of k; a dozen for the emulator, so that its tests cover each
    /// split).
    pub(super) linear_resident: [i64; 3],
    pub(super) f32: ForKind,
    pub(super) bf16: ForKind,
    pub(super) f16: ForKind,
}

pub(super) const SUFFIXES: [&str; 3] = ["f32", "bf16", "f16"];
/// Threads per block of the elementwise kernels, and at most for RMSNorm.
const BLOCK: u32 = 256;
/// Threads of the argmax's block: a row of 32k bf16 logits is four 16-byte vectors a thread.
const ARGMAX_BLOCK: u32 = 1024;
/// Warps per block of decode attention (`kWarps` in the CUDA source), and of the tensor-core
/// variant's wide blocks (`kWideWarps`).
pub(super) const ATTENTION_WARPS: u32 = 4;
pub(super) const ATTENTION_WIDE_WARPS: u32 = 6;
/// Without the device's occupancy, decode attention splits contexts until there are about this many
/// blocks (about 8 of 4 warps per SM of an H100/H200).
const TARGET_BLOCKS: i64 = 1024;
/// What a block costs besides its positions (its query, slots, the partial sums it writes and their
/// share of the combine), in positions read, for choosing the split. Measured (docs/benchmarks.md, run
/// 31): at 32 the rule split LLaVA-1.5's batch 32 in 3 chunks, 5% slower than unsplit; at 96 it picks,
/// in every configuration measured, the split that measured fastest.
const BLOCK_COST: i64 = 96;
/// Elements of a 16-byte vector the vectorised RMSNorm holds per thread at most (`kNormVectors`).
const NORM_VECTORS: i64 = 4;
/// From this many rows on, the vectorised RMSNorm's threads hold `norm_vectors_per_thread` vectors.
pub(super) const NORM_MANY_ROWS: i64 = 64;

pub(super) static EMULATED: Kernels = {
    const fn for_kind(k: i32) -> ForKind {
        let mut functions = [Function::Emulated(0); NAMES.len()];
        let mut i = 0;
        while i < NAMES.len() {
            functions[i] = Function::Emulated(NAMES.len() as i32 * k + i as i32);
            i += 1;
        }
        ForKind(functions)
    }
    Kernels {
        device: -1,
        max_grid: (3, 3),
        target_blocks: Some(32),
        min_chunk: Some(8),
        programmatic: false,
        attention_resident: [[0; ATTENTION_VARIANTS]; 3],
        attention_wide_resident: [0; 3],
        linear_resident: [12; 3],
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

/// The split (1 to `most` chunks) of `pairs` contexts of `width` positions that takes the least time
/// when the device holds `resident` blocks at once: rounds of resident blocks × the positions of a
/// chunk and a block's fixed cost. The fewest chunks among equals. None where the pairs alone fill half
/// the resident blocks: their warps then keep enough loads in flight for the card's read rate, and
/// chunks only add a round's tail and the combine (LLaVA-1.5's batch 8 on an H200, 256 pairs of 396:
/// +2.2% decode tokens/s unsplit against the 3 chunks the rounds pick, and 2 chunks −1.6%;
/// docs/benchmarks.md, run 67).
fn fewest_rounds(pairs: i64, width: i64, most: i64, resident: i64) -> i64 {
    if 2 * pairs >= resident {
        return 1;
    }
    (1..=most)
        .min_by_key(|&s| {
            let rounds = (pairs * s + resident - 1) / resident;
            rounds * ((width + s - 1) / s + BLOCK_COST)
        })
        .unwrap_or(1)
}

/// Warps of the one-row linear kernel that share a run of rows, splitting k (1, 2 or 4): more while
/// the runs' warps would still fit the `resident` blocks the device holds at once (2 for a 7B decoder's
/// o_proj and down_proj on an H200: 2048 runs, 5280 warps; 1 for the other products).
fn linear_split(runs: i64, resident: i64) -> i64 {
    let mut split = 1;
    while split < LINEAR_WARPS as i64 && runs * split * 2 <= resident * LINEAR_WARPS as i64 {
        split *= 2;
    }
    split
}

/// Threads for `n` items, one each: whole warps, at least one and at most `most` threads.
fn warps_for(n: i64, most: u32) -> u32 {
    (n.max(1) as u32).div_ceil(32).clamp(1, most / 32) * 32
}

/// Whether `t`'s data starts at a multiple of `bytes` (vector loads need their size's alignment).
pub(super) fn aligned(t: &Tensor, bytes: usize) -> bool {
    (t.data_ptr() as usize).is_multiple_of(bytes)
}

/// A pointer to an argument's value, as a launch takes it.
macro_rules! arg {
    ($v:expr) => {
        (&mut $v) as *mut _ as *mut c_void
    };
}

impl Kernels {
    pub(super) fn of(&self, kind: Kind) -> &ForKind {
        [&self.f32, &self.bf16, &self.f16][suffix_index(kind)]
    }

    /// A grid-stride launch's grid for `x` blocks along x and `y` along y, within `max_grid`.
    fn grid(&self, x: i64, y: i64) -> (i64, i64) {
        (x.clamp(1, self.max_grid.0), y.clamp(1, self.max_grid.1))
    }

    /// Launches `f` with `args` (pointers to each argument's value, in the kernel's parameter order).
    fn launch(&self, f: Function, grid: (i64, i64), block: u32, args: &mut [*mut c_void]) {
        let (x, y) = (grid.0.max(1) as u32, grid.1.max(1) as u32);
        let status = match f {
            Function::Cuda(function) => nvrtc::launch(
                function,
                self.device,
                (x, y),
                block,
                args,
                self.programmatic,
            ),
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
    pub(super) fn rms_norm(
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
        // Whole rows in registers, in 16-byte vectors, where they fit: a thread per vector up to 1024,
        // then up to NORM_VECTORS each; from NORM_MANY_ROWS rows on, `norm_vectors_per_thread` each
        // (blocks of fewer threads, so that more rows' blocks are resident at once). Else a block of up
        // to 256 threads striding over the row.
        let vectors = cols / (16 / x.kind().elt_size_in_bytes() as i64);
        let tensors = [Some(x), delta, Some(weight), Some(&out), sum.as_ref()];
        let vectorized = Self::vector_rows_fit(tensors.into_iter().flatten(), x.kind(), cols);
        let per_thread = if rows >= NORM_MANY_ROWS {
            super::norm_vectors_per_thread()
        } else {
            1
        };
        let (block, first) = if vectorized {
            (
                warps_for((vectors + per_thread - 1) / per_thread, 1024),
                RMS_NORM + VECTORS,
            )
        } else {
            (warps_for(cols, BLOCK), RMS_NORM)
        };
        let (mut out_p, mut x_p, mut w_p) = (ptr(&out), ptr(x), ptr(weight));
        let (mut cols, mut eps) = (cols as i32, eps as f32);
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
            let f = k.0[first + ADD_RMS_NORM - RMS_NORM];
            self.launch(f, (rows, 1), block, &mut args);
            counted(1);
        } else {
            let mut args = [arg!(out_p), arg!(x_p), arg!(w_p), arg!(cols), arg!(eps)];
            self.launch(k.0[first], (rows, 1), block, &mut args);
            counted(0);
        }
        (sum, out)
    }

    /// `x + delta` and its LayerNorm, for rows whose 16-byte vectors fit a block (the caller checks:
    /// [`Self::vector_rows_fit`]).
    pub(super) fn add_layer_norm(
        &self,
        x: &Tensor,
        delta: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        eps: f64,
    ) -> (Tensor, Tensor) {
        let (out, sum) = (x.empty_like(), x.empty_like());
        let cols = weight.size()[0];
        let rows = x.numel() as i64 / cols.max(1);
        if rows == 0 {
            return (sum, out);
        }
        // A thread per vector up to 1024 threads, then up to NORM_VECTORS vectors each.
        let vectors = cols / (16 / x.kind().elt_size_in_bytes() as i64);
        let block = warps_for(vectors.min(1024), 1024);
        let (mut out_p, mut sum_p, mut x_p, mut delta_p) =
            (ptr(&out), ptr(&sum), ptr(x), ptr(delta));
        let (mut w_p, mut b_p) = (ptr(weight), ptr(bias));
        let (mut cols, mut eps) = (cols as i32, eps as f32);
        let mut args = [
            arg!(out_p),
            arg!(sum_p),
            arg!(x_p),
            arg!(delta_p),
            arg!(w_p),
            arg!(b_p),
            arg!(cols),
            arg!(eps),
        ];
        let k = self.of(x.kind());
        self.launch(k.0[ADD_LAYER_NORM_VECTORS], (rows, 1), block, &mut args);
        counted(11);
        (sum, out)
    }

    /// Whether the norms' vector kernels take rows of `cols` elements of these tensors: whole 16-byte
    /// vectors, at most `NORM_VECTORS` a thread of a 1024-thread block, every tensor aligned to them.
    pub(super) fn vector_rows_fit<'t>(
        tensors: impl IntoIterator<Item = &'t Tensor>,
        kind: Kind,
        cols: i64,
    ) -> bool {
        let per_vector = 16 / kind.elt_size_in_bytes() as i64;
        cols > 0
            && cols % per_vector == 0
            && cols / per_vector <= 1024 * NORM_VECTORS
            && tensors.into_iter().all(|t| aligned(t, 16))
    }

    pub(super) fn silu_mul(&self, gate_up: &Tensor) -> Tensor {
        let mut size = gate_up.size();
        let last = size.last_mut().expect("checked by kernels::silu_mul");
        let n = *last / 2;
        *last = n;
        let out = Tensor::empty(size, (gate_up.kind(), gate_up.device()));
        let k = self.of(gate_up.kind());
        let rows = gate_up.numel() as i64 / (2 * n).max(1);
        // A thread per 16-byte vector of the whole output (one flat index, 31 bits) where the rows
        // allow it, else per element of a row (a grid of rows).
        let per_vector = 16 / gate_up.kind().elt_size_in_bytes() as i64;
        let vectors = rows * (n / per_vector);
        let vectorized = n % per_vector == 0
            && vectors <= i64::from(i32::MAX)
            && aligned(gate_up, 16)
            && aligned(&out, 16);
        let (function, grid) = if vectorized {
            (
                SILU_MUL_VECTORS,
                self.grid((vectors + BLOCK as i64 - 1) / BLOCK as i64, 1),
            )
        } else {
            (
                SILU_MUL,
                self.grid((n + BLOCK as i64 - 1) / BLOCK as i64, rows),
            )
        };
        let (mut out_p, mut in_p, mut rows, mut cols) = (ptr(&out), ptr(gate_up), rows, n);
        let mut args = [arg!(out_p), arg!(in_p), arg!(rows), arg!(cols)];
        self.launch(k.0[function], grid, BLOCK, &mut args);
        counted(2);
        out
    }

    /// The index of each row's largest element of `x` (`[rows, cols]`, contiguous, cols > 0), as
    /// torch.argmax over the last dimension: `[rows]` i64.
    pub(super) fn argmax_rows(&self, x: &Tensor) -> Tensor {
        let [rows, cols] = x.size()[..] else {
            unreachable!("checked by kernels::argmax")
        };
        let out = Tensor::empty([rows], (Kind::Int64, x.device()));
        let k = self.of(x.kind());
        let per_vector = 16 / x.kind().elt_size_in_bytes() as i64;
        let vectorized = i32::from(cols % per_vector == 0 && aligned(x, 16));
        let (mut out_p, mut x_p, mut cols, mut vectorized) =
            (ptr(&out), ptr(x), cols as i32, vectorized);
        let mut args = [arg!(out_p), arg!(x_p), arg!(cols), arg!(vectorized)];
        // A block a row (the grid is not strided: one block for each).
        let function = k.0[ARGMAX_ROWS];
        // The emulator runs a thread as an OS thread: two warps still check the block's reduction.
        let block = match function {
            Function::Cuda(_) => ARGMAX_BLOCK,
            Function::Emulated(_) => 64,
        };
        self.launch(function, (rows, 1), block, &mut args);
        counted(12);
        out
    }

    pub(super) fn quick_gelu(&self, x: &Tensor) -> Tensor {
        let out = x.empty_like();
        let k = self.of(x.kind());
        let n = x.numel() as i64;
        // A thread per 16-byte vector where the size allows it, else per element.
        let per_vector = 16 / x.kind().elt_size_in_bytes() as i64;
        let vectorized = n % per_vector == 0 && aligned(x, 16) && aligned(&out, 16);
        let (function, mut count) = if vectorized {
            (QUICK_GELU_VECTORS, n / per_vector)
        } else {
            (QUICK_GELU, n)
        };
        let (mut out_p, mut x_p) = (ptr(&out), ptr(x));
        let mut args = [arg!(out_p), arg!(x_p), arg!(count)];
        let grid = self.grid((count + BLOCK as i64 - 1) / BLOCK as i64, 1);
        self.launch(k.0[function], grid, BLOCK, &mut args);
        counted(9);
        out
    }

    /// `store`: key cache, value cache, slots and key/value heads, for [`rope_and_store`]; `slack` rows
    /// of zeros follow the output's.
    pub(super) fn rope(
        &self,
        qkv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        rotated: i64,
        store: Option<(&Tensor, &Tensor, &Tensor, i64)>,
        slack: i64,
    ) -> Tensor {
        // The kernel writes the slack rows' zeros (no memset of its own in a prefill step's graph).
        let mut size = qkv.size();
        size[0] += slack;
        let out = Tensor::empty(size, (qkv.kind(), qkv.device()));
        let k = self.of(qkv.kind());
        let [tokens, heads, dim] = qkv.size()[..] else {
            unreachable!("checked by kernels::rope")
        };
        let (mut out_p, mut qkv_p, mut cos_p, mut sin_p) =
            (ptr(&out), ptr(qkv), ptr(cos), ptr(sin));
        let (mut tokens, mut slack) = (tokens, slack);
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
            arg!(slack),
        ];
        let half = dim / 2;
        let per_vector = 16 / qkv.kind().elt_size_in_bytes() as i64;
        let mut tensors = vec![qkv, cos, sin, &out];
        if let Some((keys, values, _, _)) = store {
            tensors.extend([keys, values]);
        }
        if half % per_vector == 0 && tensors.iter().all(|t| aligned(t, 16)) {
            // A thread per run of a vector's elements of a row's first half (and the matching run of
            // its second half): the runs of a token's heads along x, tokens along y.
            let per_token = heads * (half / per_vector);
            let grid = self.grid((per_token + BLOCK as i64 - 1) / BLOCK as i64, tokens);
            self.launch(k.0[ROPE_VECTORS], grid, BLOCK, &mut args);
        } else {
            // A thread per pair of elements (j, j + dim/2) of a row (token, head).
            let block = warps_for(half, BLOCK);
            let grid = self.grid((half + block as i64 - 1) / block as i64, tokens * heads);
            self.launch(k.0[ROPE], grid, block, &mut args);
        }
        counted(3);
        out
    }

    /// Blocks of `ATTENTION_WARPS` warps, one per (sequence, key/value head) and chunk of its context:
    /// the context is split (flash-decoding) until there are about `target_blocks` blocks (at most
    /// `MAX_SPLITS` chunks, each at least a tile per warp of the padded width), and the chunks' partial
    /// results are then reduced by `paged_decode_combine`. The split depends only on the shapes (not
    /// on the lengths), so a CUDA graph replays it for any lengths.
    pub(super) fn paged_decode_attention(
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
        let device = query.device();
        let out = Tensor::empty([sequences, heads, dim], (query.kind(), device));
        let k = self.of(query.kind());
        let kv_heads = key_cache.size()[1];
        let width = slots.numel() as i64 / sequences;
        let blocks = sequences * kv_heads;
        // The variant: the fewest lanes whose runs cover the head, and the smallest group that holds
        // the query heads of a key/value head.
        let r = LANES
            .iter()
            .position(|&lanes| lanes * RUN >= dim)
            .unwrap_or(LANES.len() - 1);
        let g = GROUPS
            .iter()
            .position(|&g| g >= heads / kv_heads)
            .unwrap_or(GROUPS.len() - 1);
        let run = RUN * key_cache.kind().elt_size_in_bytes() as i64;
        let vectorized = dim % RUN == 0
            && [key_cache, value_cache]
                .iter()
                .all(|t| aligned(t, run as usize));
        // The tensor cores' variant where it applies (groups of up to 8, as every variant) and is
        // switched on.
        let mma = super::tensor_core_attention()
            && vectorized
            && MMA_DIMS.contains(&dim)
            && aligned(query, 16)
            && query.stride()[0] % RUN == 0
            && matches!(query.kind(), Kind::BFloat16 | Kind::Half);
        let (variant, tile) = if mma {
            (ATTENTION_VARIANTS - 1, MMA_TILE)
        } else {
            let tile = attention_tile(LANES[r], GROUPS[g], query.kind());
            (r * GROUPS.len() + g, tile)
        };
        let min_chunk = self.min_chunk.unwrap_or(ATTENTION_WARPS as i64 * tile);
        let most = ((width + min_chunk - 1) / min_chunk).clamp(1, MAX_SPLITS);
        let resident = self.attention_resident[suffix_index(query.kind())][variant];
        let splits = match self.target_blocks {
            None if resident > 0 => fewest_rounds(blocks, width, most, resident),
            target => (target.unwrap_or(TARGET_BLOCKS) / blocks).clamp(1, most),
        };
        // Unsplit, blocks of six warps where the device holds them all at once (switched on).
        let wide_resident = self.attention_wide_resident[suffix_index(query.kind())];
        let wide = mma
            && splits == 1
            && super::six_warp_attention()
            && (wide_resident == 0 || blocks <= wide_resident);
        let (function, warps) = if wide {
            (ATTENTION_MMA_WIDE, ATTENTION_WIDE_WARPS)
        } else {
            (ATTENTION + variant, ATTENTION_WARPS)
        };
        let f32_empty = |shape: &[i64]| Tensor::empty(shape, (Kind::Float, device));
        let partial = (splits > 1).then(|| {
            let rows = sequences * heads;
            (
                f32_empty(&[rows, splits, dim]),
                f32_empty(&[rows, splits]),
                f32_empty(&[rows, splits]),
            )
        });
        let null = std::ptr::null_mut();
        let (mut acc_p, mut max_p, mut sum_p) = match &partial {
            Some((acc, max, sum)) => (ptr(acc), ptr(max), ptr(sum)),
            None => (null, null, null),
        };
        let (mut out_p, mut q_p, mut keys_p, mut values_p) =
            (ptr(&out), ptr(query), ptr(key_cache), ptr(value_cache));
        let (mut slots_p, mut lengths_p) = (ptr(slots), ptr(lengths));
        let (mut q_stride, mut width) = (query.stride()[0], width);
        let (mut heads32, mut kv_heads32, mut dim32) = (heads as i32, kv_heads as i32, dim as i32);
        let (mut scale, mut vectorized) = (scale as f32, vectorized as i32);
        let mut args = [
            arg!(out_p),
            arg!(acc_p),
            arg!(max_p),
            arg!(sum_p),
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
            arg!(vectorized),
        ];
        self.launch(k.0[function], (blocks, splits), warps * 32, &mut args);
        counted(4);
        if mma {
            counted(6);
        }
        if wide {
            counted(10);
        }
        if partial.is_some() {
            let (mut splits32, mut dim32) = (splits as i32, dim as i32);
            let mut args = [
                arg!(out_p),
                arg!(acc_p),
                arg!(max_p),
                arg!(sum_p),
                arg!(splits32),
                arg!(dim32),
            ];
            let block = warps_for(dim, BLOCK);
            self.launch(k.0[COMBINE], (sequences * heads, 1), block, &mut args);
        }
        out
    }

    /// Whether one row of `x` takes the 8-row few-rows kernels (bf16 and f16 on the tensor cores, unless
    /// these or the few-rows kernels are switched off) rather than the one-row kernels (see
    /// [`super::set_few_rows_for_one`]).
    fn one_row_on_tensor_cores(x: &Tensor) -> bool {
        matches!(x.kind(), Kind::BFloat16 | Kind::Half)
            && super::few_rows_for_one_enabled()
            && super::few_rows_enabled()
    }

    /// The few-rows kernel `function` (`LINEAR_FEW_ROWS` or its SiLU or rope epilogue's) for `rows` of
    /// x: its 8-row variant for at most 8 (unless switched off).
    fn few_rows(function: usize, rows: i64) -> usize {
        match function {
            _ if rows > 8 || !super::eight_rows_enabled() => function,
            LINEAR_FEW_ROWS => LINEAR_FEW_ROWS_8,
            LINEAR_FEW_ROWS_SILU => LINEAR_FEW_ROWS_SILU_8,
            LINEAR_FEW_ROWS_ROPE => LINEAR_FEW_ROWS_ROPE_8,
            _ => function,
        }
    }

    /// `x · weightᵀ (+ bias)` for `x` of one row, or of up to [`FEW_ROWS`] rows on the tensor cores
    /// (checked by [`super::linear`]).
    pub(super) fn linear(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
        let [n, k] = weight.size()[..] else {
            unreachable!("checked by kernels::linear")
        };
        let rows = x.numel() as i64 / k.max(1);
        let mut size = x.size();
        *size.last_mut().expect("checked by kernels::linear") = n;
        let y = Tensor::empty(size, (x.kind(), x.device()));
        let runs = (n + LINEAR_ROWS_PER_WARP - 1) / LINEAR_ROWS_PER_WARP;
        let split = if rows == 1 && super::linear_split_enabled() {
            linear_split(runs, self.linear_resident[suffix_index(x.kind())])
        } else {
            1
        };
        let function = match (rows, split) {
            (1, _) if Self::one_row_on_tensor_cores(x) => LINEAR_FEW_ROWS_8,
            (1, 4) => LINEAR_SPLIT_4,
            (1, 2) => LINEAR_SPLIT_2,
            (1, _) => LINEAR,
            _ => Self::few_rows(LINEAR_FEW_ROWS, rows),
        };
        self.launch_linear(function, &y, x, weight, bias, &mut []);
        counted(5);
        y
    }

    /// `silu(x · gateᵀ) * (x · upᵀ)` for `x` of one row, or of a few on the tensor cores, and `weight` =
    /// `[gate; up]` (`[2 * n, k]`, with `bias` `[2 * n]`): `[.., n]` (checked by
    /// [`super::linear_silu_mul`]).
    pub(super) fn linear_silu_mul(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> Tensor {
        let mut size = x.size();
        *size
            .last_mut()
            .expect("checked by kernels::linear_silu_mul") = weight.size()[0] / 2;
        let y = Tensor::empty(size, (x.kind(), x.device()));
        let (rows, half) = (x.numel() as i64 / weight.size()[1], weight.size()[0] / 2);
        let function = if rows == 1 && (half % 8 != 0 || !Self::one_row_on_tensor_cores(x)) {
            LINEAR_SILU
        } else {
            Self::few_rows(LINEAR_FEW_ROWS_SILU, rows)
        };
        self.launch_linear(function, &y, x, weight, bias, &mut []);
        counted(7);
        y
    }

    /// [`rope`](Self::rope) with the cache write of a stacked q/k/v projection of `x`, one row or a few
    /// on the tensor cores, in the product's last step: `[tokens, heads, dim]` (checked by
    /// [`super::linear_rope_and_store`]).
    pub(super) fn linear_rope_and_store(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        dim: i64,
        store: &super::RopeStore,
    ) -> Tensor {
        let heads = weight.size()[0] / dim;
        let tokens = x.numel() as i64 / weight.size()[1];
        let y = Tensor::empty([tokens, heads, dim], (x.kind(), x.device()));
        let (mut cos_p, mut sin_p) = (ptr(store.cos), ptr(store.sin));
        let (mut keys_p, mut values_p) = (ptr(store.key_cache), ptr(store.value_cache));
        let mut slots_p = ptr(store.slots);
        let (mut rotated, mut dim32, mut kv_heads) = (
            (heads - store.kv_heads) as i32,
            dim as i32,
            store.kv_heads as i32,
        );
        let mut rope_args = [
            arg!(cos_p),
            arg!(sin_p),
            arg!(rotated),
            arg!(dim32),
            arg!(keys_p),
            arg!(values_p),
            arg!(slots_p),
            arg!(kv_heads),
        ];
        let function = if tokens == 1 && (dim % 16 != 0 || !Self::one_row_on_tensor_cores(x)) {
            LINEAR_ROPE
        } else {
            Self::few_rows(LINEAR_FEW_ROWS_ROPE, tokens)
        };
        self.launch_linear(function, &y, x, weight, bias, &mut rope_args);
        counted(8);
        y
    }

    /// Launches the linear kernel `function` with arguments y, x, w, bias, then m (x's rows: the
    /// few-rows kernels alone), n, k, then `more`. The one-row kernels take `weight`'s rows (`[n, k]`)
    /// in runs of two (a warp's run, or with k split 2 or 4 warps' of a block); the few-rows kernels in
    /// tiles of 16 (with an epilogue, 8 rows and their partners).
    fn launch_linear(
        &self,
        function: usize,
        y: &Tensor,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        more: &mut [*mut c_void],
    ) {
        let [mut n, mut k] = weight.size()[..] else {
            unreachable!("checked by kernels::linear, linear_silu_mul and linear_rope_and_store")
        };
        let few = matches!(
            function,
            LINEAR_FEW_ROWS
                | LINEAR_FEW_ROWS_SILU
                | LINEAR_FEW_ROWS_ROPE
                | LINEAR_FEW_ROWS_8
                | LINEAR_FEW_ROWS_SILU_8
                | LINEAR_FEW_ROWS_ROPE_8
        );
        let mut m = (x.numel() as i64 / k.max(1)) as i32;
        let (mut y_p, mut x_p, mut w_p) = (ptr(y), ptr(x), ptr(weight));
        let mut bias_p = bias.map_or(std::ptr::null_mut(), ptr);
        let mut args = vec![arg!(y_p), arg!(x_p), arg!(w_p), arg!(bias_p)];
        if few {
            args.push(arg!(m));
        }
        args.extend_from_slice(&[arg!(n), arg!(k)]);
        args.extend_from_slice(more);
        let (blocks, threads) = if few {
            ((n + FEW_ROWS_TILE - 1) / FEW_ROWS_TILE, FEW_ROWS_WARPS * 32)
        } else {
            let split = match function {
                LINEAR_SPLIT_4 => 4,
                LINEAR_SPLIT_2 => 2,
                _ => 1,
            };
            let runs = (n + LINEAR_ROWS_PER_WARP - 1) / LINEAR_ROWS_PER_WARP;
            let per_block = LINEAR_WARPS as i64 / split;
            ((runs + per_block - 1) / per_block, LINEAR_WARPS * 32)
        };
        let grid = self.grid(blocks, 1);
        self.launch(self.of(x.kind()).0[function], grid, threads, &mut args);
    }
}

#[cfg(test)]
mod tests {
    use super::{fewest_rounds, linear_split};

    /// On an H200 (132 SMs × 10 blocks of the one-row kernel): a 7B decoder's o_proj and down_proj
    /// (4096 rows, 2048 runs) split k in two, its q/k/v (6144 runs with rope), gate/up (11008) and LM
    /// head (16000) do not; few runs split in four; an unknown occupancy never splits.
    #[test]
    fn the_one_row_linear_splits_k_only_where_runs_leave_warps_idle() {
        assert_eq!(linear_split(2048, 1320), 2);
        for runs in [6144, 11008, 16000] {
            assert_eq!(linear_split(runs, 1320), 1);
        }
        assert_eq!(linear_split(8, 1320), 4);
        assert_eq!(linear_split(2048, 0), 1);
    }

    /// The split by occupancy on an H200's numbers (132 SMs × 3 blocks of the LLaVA variant, 2 of
    /// Mistral's), over decode widths rounded to 128: LLaVA-1.5's ~700-position contexts at batch 8
    /// (256 pairs) fill more than half the device unsplit, and stay so (the rounds alone would take 3
    /// chunks); at batch 4 (128 pairs) two rounds of 3 chunks beat 4, which need a third; at batch 1
    /// (32 pairs) every chunk allowed fits in one round; at batch 32 (1024 pairs) the device holds
    /// fewer blocks than there are pairs. Mistral's 2.4k contexts at batch 8 (64 pairs): one round of
    /// 4 chunks with the CUDA cores' kernel (2 blocks per SM), of 6 with the tensor cores' (3 per SM).
    #[test]
    fn the_split_takes_the_fewest_rounds_of_resident_blocks() {
        for width in [640, 768] {
            assert_eq!(fewest_rounds(256, width, width / 64, 396), 1);
            assert_eq!(fewest_rounds(198, width, width / 64, 396), 1);
            assert_eq!(fewest_rounds(197, width, width / 64, 396), 2);
            assert_eq!(fewest_rounds(128, width, width / 64, 396), 3);
            assert_eq!(fewest_rounds(32, width, width / 64, 396), width / 64);
            assert_eq!(fewest_rounds(1024, width, width / 64, 396), 1);
        }
        assert_eq!(fewest_rounds(8, 16, 1, 396), 1);
        assert_eq!(fewest_rounds(64, 2432, 38, 264), 4);
        assert_eq!(fewest_rounds(64, 2432, 38, 396), 6);
    }
}
