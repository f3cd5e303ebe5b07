//! The loaded kernels of a device (or the emulator's) and their launches: argument lists in each
//! kernel's parameter order, grids and blocks.

use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};

use tch::{Kind, Tensor};

use super::nvrtc;

/// Launches of each kernel family since the process started, for tests that must see a kernel run:
/// `rms_norm`, `add_rms_norm`, `silu_mul`, `rope`, `paged_decode_attention`.
pub(super) static LAUNCHES: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];
pub(super) const FAMILIES: [&str; 5] = [
    "rms_norm",
    "add_rms_norm",
    "silu_mul",
    "rope",
    "paged_decode_attention",
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

/// The kernels for one dtype, in the emulator's order.
pub(super) struct ForKind {
    pub(super) rms_norm: Function,
    pub(super) add_rms_norm: Function,
    pub(super) silu_mul: Function,
    pub(super) rope: Function,
    /// For heads of up to 32, 64, 128 and 256 elements (1, 2, 4, 8 per lane).
    pub(super) paged_decode_attention: [Function; 4],
}

/// The kernels of one device, for each dtype.
pub(super) struct Kernels {
    /// The CUDA device they were loaded for (unused by the emulator).
    pub(super) device: i32,
    /// The most blocks a grid-stride launch uses along x and y: enough to fill a GPU (y at CUDA's
    /// limit); a few for the emulator, which runs each thread as an OS thread (and so still checks the
    /// striding).
    pub(super) max_grid: (i64, i64),
    pub(super) f32: ForKind,
    pub(super) bf16: ForKind,
    pub(super) f16: ForKind,
}

pub(super) const NAMES: [&str; 8] = [
    "rms_norm",
    "add_rms_norm",
    "silu_mul",
    "rope",
    "paged_decode_attention_e1",
    "paged_decode_attention_e2",
    "paged_decode_attention_e4",
    "paged_decode_attention_e8",
];
pub(super) const SUFFIXES: [&str; 3] = ["f32", "bf16", "f16"];
/// Threads per block of the elementwise kernels, and at most for RMSNorm.
const BLOCK: u32 = 256;

pub(super) static EMULATED: Kernels = {
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
    pub(super) fn of(&self, kind: Kind) -> &ForKind {
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
            Function::Cuda(function) => nvrtc::launch(function, self.device, (x, y), block, args),
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
            counted(1);
        } else {
            let mut args = [arg!(out_p), arg!(x_p), arg!(w_p), arg!(cols), arg!(eps)];
            self.launch(k.rms_norm, (rows, 1), block, &mut args);
            counted(0);
        }
        (sum, out)
    }

    pub(super) fn silu_mul(&self, gate_up: &Tensor) -> Tensor {
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
        counted(2);
        out
    }

    /// `store`: key cache, value cache, slots and key/value heads, for [`rope_and_store`].
    pub(super) fn rope(
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
        counted(3);
        out
    }

    /// One block per (sequence, key/value head) of `BLOCK` threads, the 8 warps (`kWarps`) that
    /// `paged_decode_attention_block` in the CUDA source is written for.
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
        counted(4);
        out
    }
}
