//! `mmreg_engine::kernels` against HF's op-by-op formulas, in f32, bf16 and f16, three ways: libtorch's
//! fallback on the CPU; the fused kernels run by the CPU emulator (the same CUDA source and the same
//! launch code, each CUDA thread an OS thread); and, where there is a GPU, the NVRTC kernels on cuda:0,
//! also inside a CUDA graph. Rope and the residual add are bit-exact; RMSNorm (the order of its f32 sum)
//! and SiLU (the platform's expf) are within one rounding step.

use mmreg_engine::cuda::Graph;
use mmreg_engine::kernels;
use std::io::Write;

use tch::{Device, Kind, Tensor};

const KINDS: [Kind; 3] = [Kind::Float, Kind::BFloat16, Kind::Half];

/// Tests that count a kernel family's launches, and those that launch the families counted (the
/// self-check launches every kernel), run one at a time: the counters are the process's.
static COUNTED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn counting() -> std::sync::MutexGuard<'static, ()> {
    COUNTED.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Fallback,
    Emulated,
    Cuda,
}

/// Whether `MMREG_TEST_MODES` (a comma-separated subset of `fallback`, `emulated` and `cuda`; unset:
/// all) keeps `mode`. On the GPU machine the emulated kernels take most of a test's time and check what
/// CI already checks, so its runs can keep `cuda` alone.
fn wanted(mode: Mode) -> bool {
    std::env::var("MMREG_TEST_MODES").map_or(true, |only| {
        let name = format!("{mode:?}").to_lowercase();
        only.split(',').any(|m| m.trim() == name)
    })
}

/// The modes this machine can run and `MMREG_TEST_MODES` keeps, each switched on for this thread as it
/// is returned.
fn modes() -> impl Iterator<Item = Mode> {
    let mut modes = vec![Mode::Fallback, Mode::Emulated];
    if tch::Cuda::is_available() {
        modes.push(Mode::Cuda);
    } else {
        eprintln!("fused kernels: no GPU here, checking the fallback and the emulated kernels");
    }
    let all = modes.len();
    modes.retain(|&mode| wanted(mode));
    if modes.len() < all {
        // Written past the test harness's output capture, so the skip shows in the log.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED some modes: MMREG_TEST_MODES keeps {modes:?}"
        );
    }
    modes.into_iter().inspect(|&mode| {
        // On by default (MMREG_FUSED_KERNELS=0 in the environment would switch them off).
        kernels::set_enabled(true);
        kernels::emulate_on_this_thread(mode == Mode::Emulated);
        let device = mode.device();
        assert_eq!(
            kernels::fused_available(device),
            mode != Mode::Fallback,
            "{mode:?}: {:?}",
            kernels::unavailable_reason(device)
        );
    })
}

impl Mode {
    fn device(self) -> Device {
        if self == Mode::Cuda {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }
    }
}

fn random(shape: &[i64], kind: Kind, device: Device, seed: i64) -> Tensor {
    // The seed and the draw under one lock: libtorch's generator is the process's, and the tests run
    // in parallel threads, so without it a test's inputs would depend on the others' timing.
    static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _drawing = GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed);
    Tensor::randn(shape, (Kind::Float, Device::Cpu))
        .to_kind(kind)
        .to_device(device)
}

/// Number of elements where `a` and `b` differ, and the largest difference relative to `b` (in f32).
fn differences(a: &Tensor, b: &Tensor) -> (i64, f64) {
    assert_eq!(a.size(), b.size());
    assert_eq!(a.kind(), b.kind());
    let (a, b) = (
        a.to_device(Device::Cpu).to_kind(Kind::Float),
        b.to_device(Device::Cpu).to_kind(Kind::Float),
    );
    let diff = (&a - &b).abs();
    let relative = &diff / b.abs().clamp_min(1e-6);
    (
        diff.gt(0.0).sum(Kind::Int64).int64_value(&[]),
        relative.max().double_value(&[]),
    )
}

fn assert_identical(what: &str, actual: &Tensor, expected: &Tensor) {
    let (count, max) = differences(actual, expected);
    assert_eq!(
        count,
        0,
        "{what} ({:?} on {:?}): {count} elements differ, by up to {max} (relative)",
        actual.kind(),
        actual.device()
    );
}

/// Off by at most one rounding step of the dtype (relative), on at most 1% of the elements in 16-bit
/// types (in f32 a different last bit of the scale or of expf moves many).
fn assert_within_one_rounding(what: &str, actual: &Tensor, expected: &Tensor) {
    assert_within_roundings(what, actual, expected, 1.0);
}

/// As [`assert_within_one_rounding`], off by at most `steps` rounding steps.
fn assert_within_roundings(what: &str, actual: &Tensor, expected: &Tensor, steps: f64) {
    let (count, max) = differences(actual, expected);
    let numel = expected.numel() as i64;
    let (step, allowed) = match expected.kind() {
        Kind::Float => (2f64.powi(-21), numel),
        Kind::Half => (2f64.powi(-10), numel / 100),
        _ => (2f64.powi(-7), numel / 100),
    };
    assert!(
        max <= steps * step && count <= allowed,
        "{what} ({:?} on {:?}): {count} of {numel} differ, by up to {max} (relative)",
        actual.kind(),
        actual.device()
    );
}

/// HF's LlamaRMSNorm.
fn hf_rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let h = x.to_kind(Kind::Float);
    let variance = h.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
    weight * (h * (variance + eps).rsqrt()).to_kind(x.kind())
}

/// HF's apply_rotary_pos_emb on the query and key heads; values unchanged.
fn hf_rope(qkv: &Tensor, cos: &Tensor, sin: &Tensor, rotated: i64) -> Tensor {
    let [_, heads, dim] = qkv.size()[..] else {
        unreachable!()
    };
    let half = dim / 2;
    let x = qkv.narrow(1, 0, rotated);
    let rotate_half = Tensor::cat(&[-x.narrow(2, half, half), x.narrow(2, 0, half)], 2);
    let (cos, sin) = (cos.unsqueeze(1), sin.unsqueeze(1));
    let roped = (&x * &cos) + (rotate_half * &sin);
    Tensor::cat(&[roped, qkv.narrow(1, rotated, heads - rotated)], 1)
}

/// HF's silu(gate) * up.
fn hf_silu_mul(gate_up: &Tensor) -> Tensor {
    let n = gate_up.size()[1] / 2;
    gate_up.narrow(1, 0, n).silu() * gate_up.narrow(1, n, n)
}

fn rope_tables(tokens: i64, dim: i64, kind: Kind, device: Device) -> (Tensor, Tensor) {
    let exponent = Tensor::arange_start_step(0, dim, 2, (Kind::Float, Device::Cpu)) / dim as f64;
    let inv_freq = (exponent * -(10000f64.ln())).exp();
    let positions = Tensor::arange(tokens, (Kind::Float, Device::Cpu)) + 600.0;
    let freqs = positions.unsqueeze(1) * inv_freq.unsqueeze(0);
    let emb = Tensor::cat(&[&freqs, &freqs], 1);
    (
        emb.cos().to_kind(kind).to_device(device),
        emb.sin().to_kind(kind).to_device(device),
    )
}

/// NVRTC needs no GPU: the source compiles here for the cards the benchmarks run on (H100/H200: sm_90)
/// and for Ampere (sm_80). This build machine and CI have pip's torch with its CUDA wheels, so the shim
/// is built; a build without it says so. ptxas's report must show every kernel without local memory
/// (no stack frame, no spills): per-lane arrays indexed at run time would land there and make the
/// attention kernel slow, which no CPU test would notice. PRINT_PTXAS=1 prints the reports (registers).
#[test]
fn fused_kernels_compile_with_nvrtc_for_hopper_and_ampere_without_local_memory() {
    // As they load by default, and with the variants measurements switch on from the environment.
    let variants = [
        (9, 0, ""),
        (8, 0, ""),
        (9, 0, "#define MMREG_EARLY_READS 0\n"),
    ];
    for (major, minor, defines) in variants {
        let (bytes, report) = match kernels::compile_for(major, minor, defines) {
            Ok(compiled) => compiled,
            Err(why) => panic!("sm_{major}{minor}: {why}"),
        };
        assert!(bytes > 1000, "sm_{major}{minor}: a {bytes}-byte cubin");
        if std::env::var("PRINT_PTXAS").is_ok() {
            eprintln!("== sm_{major}{minor} {defines:?}\n{report}");
        }
        // "ptxas info    : Function properties for NAME" is followed by
        // "    N bytes stack frame, N bytes spill stores, N bytes spill loads".
        let mut kernels = 0;
        let mut lines = report.lines();
        while let Some(line) = lines.next() {
            let Some(name) = line.split("Function properties for ").nth(1) else {
                continue;
            };
            let properties = lines.next().unwrap_or_default();
            kernels += 1;
            assert!(
                properties.contains(" 0 bytes stack frame")
                    && properties.contains(" 0 bytes spill stores")
                    && properties.contains(" 0 bytes spill loads"),
                "sm_{major}{minor}: {name} uses local memory: {properties}"
            );
        }
        // 35 kernels in each of 3 dtypes.
        assert_eq!(
            kernels, 105,
            "sm_{major}{minor}: ptxas reported {kernels} kernels:\n{report}"
        );
    }
}

#[test]
fn fused_kernels_run_only_where_they_can() {
    kernels::set_enabled(true);
    kernels::emulate_on_this_thread(false);
    assert!(!kernels::fused_available(Device::Cpu));
    kernels::emulate_on_this_thread(true);
    assert!(kernels::fused_available(Device::Cpu));
    // Unsupported dtypes and non-contiguous tensors take the fallback, with the same result.
    let gate_up = random(&[4, 64], Kind::Double, Device::Cpu, 1);
    assert_identical(
        "silu_mul f64",
        &kernels::silu_mul(&gate_up),
        &hf_silu_mul(&gate_up),
    );
    let strided = random(&[64, 4], Kind::Float, Device::Cpu, 2).transpose(0, 1);
    assert_identical(
        "silu_mul strided",
        &kernels::silu_mul(&strided),
        &hf_silu_mul(&strided),
    );
    kernels::emulate_on_this_thread(false);
    if tch::Cuda::is_available() && mmreg_engine::cuda::graphs_available() {
        // The shim is built in and a GPU is present: the kernels must compile (a failure would be
        // logged and everything would silently run unfused).
        let reason = kernels::unavailable_reason(Device::Cuda(0));
        assert!(reason.is_none(), "fused kernels unavailable: {reason:?}");
    }
}

/// The check that loading runs on a GPU (kernels that fail it are never used) passes for the emulated
/// kernels, and for the real ones where there is a GPU.
#[test]
fn the_self_check_passes() {
    let _one_at_a_time = counting();
    kernels::set_enabled(true);
    if wanted(Mode::Emulated) {
        kernels::emulate_on_this_thread(true);
        assert_eq!(kernels::self_check(Device::Cpu), Ok(()));
    }
    kernels::emulate_on_this_thread(false);
    assert!(
        kernels::self_check(Device::Cpu).is_err(),
        "no kernels to check"
    );
    if tch::Cuda::is_available() && mmreg_engine::cuda::graphs_available() {
        assert_eq!(kernels::self_check(Device::Cuda(0)), Ok(()));
    }
}

#[test]
fn silu_mul_equals_silu_of_gate_times_up() {
    for mode in modes() {
        for kind in KINDS {
            // Shapes that leave partial blocks and, in the emulator (3 blocks), several strides; in
            // 16-byte vectors (rows of whole vectors) and not (the last two).
            for (rows, n) in [(37, 352), (3, 1376), (1, 1), (5, 300)] {
                let gate_up = random(&[rows, 2 * n], kind, mode.device(), rows + n);
                let what = format!("silu_mul {mode:?}");
                assert_within_one_rounding(
                    &what,
                    &kernels::silu_mul(&gate_up),
                    &hf_silu_mul(&gate_up),
                );
            }
        }
    }
}

#[test]
fn quick_gelu_equals_hfs_clip_activation() {
    for mode in modes() {
        for kind in KINDS {
            // A CLIP MLP's rows (whole 16-byte vectors, partial blocks) and sizes that are not whole
            // vectors (one thread per element).
            for (rows, cols) in [(37, 352), (16, 24), (5, 301)] {
                let x = random(&[rows, cols], kind, mode.device(), rows + cols) * 4.0;
                let before = kernels::launches("quick_gelu");
                let actual = kernels::quick_gelu(&x);
                let what = format!("quick_gelu {mode:?}");
                assert_within_one_rounding(&what, &actual, &(&x * (&x * 1.702).sigmoid()));
                if mode != Mode::Fallback {
                    assert!(
                        kernels::launches("quick_gelu") > before,
                        "{what}: no launch"
                    );
                }
            }
        }
    }
}

/// The decode step's argmax, as torch.argmax: the first index of each row's largest element, NaN the
/// largest. Rows of whole 16-byte vectors and not, ties, NaNs, a row of -inf and a last-column maximum.
#[test]
fn argmax_is_torchs_first_index_of_the_largest() {
    for mode in modes() {
        for kind in KINDS {
            for (rows, cols) in [(3, 1000), (2, 997), (1, 8)] {
                let x = random(&[rows, cols], kind, Device::Cpu, rows * cols);
                let x = Tensor::cat(&[&x, &x.ones_like(), &x.copy()], 0);
                // Row `rows`: all ones (a tie everywhere: index 0); NaN twice in row `rows + 1` (the
                // first NaN); the largest value twice in row 0, at its last two columns (the first);
                // a last row of -inf (index 0).
                let _ = x.get(rows + 1).get(cols / 3).fill_(f64::NAN);
                let _ = x.get(rows + 1).get(cols / 2).fill_(f64::NAN);
                let _ = x.get(0).get(cols - 1).fill_(100.0);
                let _ = x.get(0).get(cols - 2).fill_(100.0);
                let x = Tensor::cat(
                    &[&x, &x.get(0).full_like(f64::NEG_INFINITY).unsqueeze(0)],
                    0,
                );
                let expected = x.argmax(-1, false);
                let before = kernels::launches("argmax");
                let actual = kernels::argmax(&x.to_device(mode.device()));
                let what = format!("argmax {mode:?} {kind:?} {rows}x{cols}");
                assert!(
                    actual.to_device(Device::Cpu).equal(&expected),
                    "{what}: {actual:?} against {expected:?}"
                );
                if mode != Mode::Fallback {
                    assert!(kernels::launches("argmax") > before, "{what}: no launch");
                }
            }
        }
    }
}

#[test]
fn rope_equals_hf_rotary_embedding() {
    for mode in modes() {
        for kind in KINDS {
            // LLaVA-1.5 (32 heads, no GQA: 64 rotated of 96), Mistral-like (32 + 8 rotated, 8 values)
            // and a small head, in 16-byte vectors; a head whose halves are not whole vectors (one
            // thread per pair); fewer tokens in the emulator.
            for (tokens, heads, rotated, dim) in [
                (3, 96, 64, 128),
                (2, 48, 40, 128),
                (19, 6, 4, 32),
                (5, 6, 4, 12),
            ] {
                let device = mode.device();
                let qkv = random(&[tokens, heads, dim], kind, device, tokens * heads);
                let (cos, sin) = rope_tables(tokens, dim, kind, device);
                assert_identical(
                    &format!("rope {mode:?}"),
                    &kernels::rope(&qkv, &cos, &sin, rotated),
                    &hf_rope(&qkv, &cos, &sin, rotated),
                );
            }
        }
    }
}

#[test]
fn rope_and_store_also_writes_the_keys_and_values_at_their_slots() {
    for mode in modes() {
        let device = mode.device();
        // Heads of 64 take the 16-byte kernel; of 36 (runs of 18) the one with a pair a thread.
        for (kind, dim) in KINDS.into_iter().flat_map(|k| [(k, 64), (k, 36)]) {
            // Mistral-like: 8 query heads, 2 key and 2 value heads; 5 tokens into a pool of 16 slots,
            // and 3 rows of slack after them.
            let (tokens, kv_heads, slack) = (5, 2, 3);
            let heads = 8 + 2 * kv_heads;
            let qkv = random(&[tokens, heads, dim], kind, device, 11);
            let (cos, sin) = rope_tables(tokens, dim, kind, device);
            let mut keys = Tensor::zeros([16, kv_heads, dim], (kind, device));
            let mut values = Tensor::zeros([16, kv_heads, dim], (kind, device));
            let slots = Tensor::from_slice(&[3i64, 15, 0, 8, 9]).to_device(device);
            // Memory of the output's size, poisoned and freed: the allocator hands it back to the
            // kernel's output, whose slack the kernel must then overwrite with zeros.
            drop(Tensor::full(
                [tokens + slack, heads, dim],
                7.0,
                (kind, device),
            ));
            let store = kernels::RopeStore {
                cos: &cos,
                sin: &sin,
                kv_heads,
                key_cache: &mut keys,
                value_cache: &mut values,
                slots: &slots,
                slack_rows: slack,
            };
            let out = kernels::rope_and_store(&qkv, store);
            let Some(out) = out else {
                assert_eq!(mode, Mode::Fallback, "the kernel did not run");
                continue;
            };
            let expected = hf_rope(&qkv, &cos, &sin, heads - kv_heads);
            let what = format!("rope_and_store {mode:?} {kind:?}, heads of {dim}");
            // The tokens' rows, then the slack's rows of zeros.
            assert_eq!(out.size(), [tokens + slack, heads, dim], "{what}");
            assert_identical(&what, &out.narrow(0, 0, tokens), &expected);
            let zeros = out.narrow(0, tokens, slack);
            assert_identical(&what, &zeros, &zeros.zeros_like());
            let stored = |cache: &Tensor| cache.index_select(0, &slots);
            assert_identical(&what, &stored(&keys), &expected.narrow(1, 8, kv_heads));
            assert_identical(&what, &stored(&values), &expected.narrow(1, 10, kv_heads));
            // Nothing else written.
            let written = keys
                .abs()
                .sum_dim_intlist(&[1i64, 2][..], false, Kind::Float)
                .gt(0.0);
            let expected_written = Tensor::zeros([16], (Kind::Bool, device))
                .index_fill(0, &slots, 1)
                .to_kind(Kind::Bool);
            assert_identical(&what, &written, &expected_written);
        }
    }
}

#[test]
fn rms_norm_and_residual_add_match_hf() {
    // 64 rows (a prefill's many) with each thread holding 1, 2 or 4 vectors. A block's sum of squares
    // is in another order than HF's; where that moves the normalised value by a rounding step, the
    // product with the weight (rounded again) can land two steps away: 2 allowed (seen with one vector
    // a thread too: 2 of 33,280 f16 elements on an H100, run 81).
    let cases = [
        (9, 4096, 1),
        (4, 100, 1),
        (1, 32, 1),
        (64, 2048, 4),
        (64, 2048, 2),
        (64, 520, 1),
    ];
    for mode in modes() {
        for kind in KINDS {
            for (rows, cols, per_thread) in cases {
                kernels::set_norm_vectors_per_thread(per_thread);
                let device = mode.device();
                let x = random(&[rows, cols], kind, device, rows);
                let delta = random(&[rows, cols], kind, device, rows + 1);
                let weight = (random(&[cols], kind, device, 7) * 0.1 + 1.0).to_kind(kind);
                let eps = 1e-5;
                let what =
                    format!("rms_norm {mode:?} ({rows}×{cols}, {per_thread} vectors a thread)");
                let steps = 2.0;
                let normed = kernels::rms_norm(&x, &weight, eps);
                assert_within_roundings(&what, &normed, &hf_rms_norm(&x, &weight, eps), steps);

                let (sum, normed) = kernels::add_rms_norm(&x, &delta, &weight, eps);
                let expected_sum = &x + &delta;
                assert_identical(&format!("residual add {mode:?}"), &sum, &expected_sum);
                let expected = hf_rms_norm(&expected_sum, &weight, eps);
                assert_within_roundings(&format!("add_{what}"), &normed, &expected, steps);
            }
        }
    }
}

/// The vision towers' residual add and LayerNorm against HF's two ops (`hidden + residual`, then
/// `nn.LayerNorm`): the sum bit-exact; the norm within a rounding step in 16-bit types (the kernel's
/// two-pass mean and variance are in another order than libtorch's), within 1e-5 in f32 (absolute: the
/// bias can cancel the product, where relative errors mean nothing). CLIP's rows (1024), SigLIP's
/// (1152), rows of more than 1024 vectors in 16-bit types (several a thread), and rows that are not whole
/// vectors (libtorch's ops: no launch).
#[test]
fn add_layer_norm_matches_hf() {
    let _counting = counting();
    for mode in modes() {
        for kind in KINDS {
            for (rows, cols) in [(37, 1024), (5, 1152), (2, 12288), (3, 100)] {
                let device = mode.device();
                let x = random(&[rows, cols], kind, device, rows + cols);
                let delta = random(&[rows, cols], kind, device, rows + cols + 1);
                let weight = (random(&[cols], kind, device, 7) * 0.1 + 1.0).to_kind(kind);
                let bias = (random(&[cols], kind, device, 8) * 0.3).to_kind(kind);
                let eps = 1e-5;
                let before = kernels::launches("add_layer_norm");
                let (sum, normed) = kernels::add_layer_norm(&x, &delta, &weight, &bias, eps);
                let what = format!("add_layer_norm {mode:?} ({rows}×{cols})");
                let expected_sum = &x + &delta;
                assert_identical(&format!("{what}: sum"), &sum, &expected_sum);
                let expected =
                    expected_sum.layer_norm([cols], Some(&weight), Some(&bias), eps, true);
                if kind == Kind::Float {
                    let error = (&normed - &expected).abs().max().double_value(&[]);
                    assert!(error < 1e-5, "{what}: off by {error}");
                } else {
                    assert_within_one_rounding(&what, &normed, &expected);
                }
                let whole_vectors = cols * kind.elt_size_in_bytes() as i64 % 16 == 0;
                if mode != Mode::Fallback {
                    assert_eq!(
                        kernels::launches("add_layer_norm") > before,
                        whole_vectors,
                        "{what}: launched where it should not, or not where it should"
                    );
                }
            }
        }
    }
}

/// softmax(q k^T scale) v over each sequence's real slots, in f32, written as einsums over the gathered
/// rows (grouped-query heads repeat their key/value head, as HF's repeat_kv).
fn reference_decode_attention(
    query: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    slots: &[Vec<i64>],
    scale: f64,
) -> Tensor {
    let group = query.size()[1] / keys.size()[1];
    let per_query_head = |cache: &Tensor, index: &Tensor| {
        cache
            .index_select(0, index)
            .to_kind(Kind::Float)
            .repeat_interleave_self_int(group, Some(1), None)
    };
    let rows: Vec<Tensor> = slots
        .iter()
        .zip(0i64..)
        .map(|(slots, i)| {
            let index = Tensor::from_slice(slots).to_device(keys.device());
            let (k, v) = (per_query_head(keys, &index), per_query_head(values, &index));
            let q = query.get(i).to_kind(Kind::Float);
            let scores = Tensor::einsum("hd,lhd->hl", &[&q, &k], None::<i64>) * scale;
            let weights = scores.softmax(-1, Kind::Float);
            Tensor::einsum("hl,lhd->hd", &[&weights, &v], None::<i64>)
        })
        .collect();
    Tensor::stack(&rows, 0).to_kind(query.kind())
}

#[test]
fn paged_decode_attention_matches_softmax_attention_over_the_slots() {
    let _one_at_a_time = counting();
    let wide_launches = || kernels::launches("paged_decode_attention_mma_w6").expect("a family");
    for mode in modes() {
        let device = mode.device();
        let wide_before = wide_launches();
        for kind in KINDS {
            // No grouping (LLaVA-1.5), 4 query heads per key/value head (Mistral), 8 (the most); heads
            // of every kernel variant (up to 64, 128, 256 elements: 8, 16, 32 lanes a row), narrower
            // than its lanes' runs or not a multiple of a run (20: scalar loads). Four sequences: the
            // emulator splits their contexts in chunks (reduced by the combine kernel); eight of
            // LLaVA's shape: one chunk each, also with contexts of up to 200 (many tiles per warp);
            // eight of Mistral's grouping with contexts of up to 200 (two chunks, several tiles of
            // the tensor-core kernel per warp).
            for (heads, kv_heads, dim, lengths) in [
                (4, 4, 128, &[1i64, 9, 40, 23][..]),
                (4, 4, 128, &[1, 9, 40, 23, 48, 2, 31, 17][..]),
                (4, 4, 128, &[1, 9, 200, 123, 48, 2, 131, 17][..]),
                (8, 2, 64, &[1, 9, 40, 23][..]),
                (8, 2, 128, &[1, 9, 200, 123, 48, 2, 131, 17][..]),
                (2, 1, 8, &[1, 9, 40, 23][..]),
                (3, 1, 40, &[1, 9, 40, 23][..]),
                (2, 1, 20, &[1, 9, 40, 23][..]),
                (2, 1, 256, &[1, 9, 40, 23][..]),
                (4, 1, 96, &[1, 9, 40, 23][..]),
                (8, 1, 32, &[1, 9, 40, 23][..]),
                (16, 2, 128, &[1, 9, 40, 23][..]),
            ] {
                let sequences = lengths.len() as i64;
                let longest = *lengths.iter().max().expect("lengths");
                let width = ((longest + 7) / 8 * 8).max(48) as usize;
                let pool = 200;
                let keys = random(&[pool, kv_heads, dim], kind, device, heads);
                let values = random(&[pool, kv_heads, dim], kind, device, heads + 1);
                // Each sequence's slots scattered over the pool; padding points anywhere (slot 0).
                let slots: Vec<Vec<i64>> = lengths
                    .iter()
                    .enumerate()
                    .map(|(i, &len)| (0..len).map(|p| (p * 7 + i as i64 * 31) % pool).collect())
                    .collect();
                let padded: Vec<i64> = slots
                    .iter()
                    .flat_map(|s| {
                        s.iter()
                            .copied()
                            .chain(std::iter::repeat_n(0, width - s.len()))
                    })
                    .collect();
                // The query as a narrow of a wider stacked projection: strided rows.
                let stacked = random(&[sequences, heads + 2 * kv_heads, dim], kind, device, 5);
                let query = stacked.narrow(1, 0, heads);
                let scale = (dim as f64).powf(-0.5);
                let expected = reference_decode_attention(&query, &keys, &values, &slots, scale);
                // On the CUDA cores, then on the tensor cores where they apply (bf16 and f16, heads
                // of 64 or 128 elements): the tensor-core kernel must then have run. Then with its
                // six-warp blocks switched on (they run where a step is not split; counted below);
                // off, they never run.
                for (tensor_cores, six_warps) in [(false, false), (true, false), (true, true)] {
                    let mma_launches =
                        || kernels::launches("paged_decode_attention_mma").expect("a family");
                    let wide_before = wide_launches();
                    let (out, on_tensor_cores) =
                        kernels::with_six_warp_attention(six_warps, || {
                            kernels::with_tensor_core_attention(tensor_cores, || {
                                let before = mma_launches();
                                let out = kernels::paged_decode_attention(
                                    &query,
                                    &keys,
                                    &values,
                                    &Tensor::from_slice(&padded).to_device(device),
                                    &Tensor::from_slice(lengths).to_device(device),
                                    scale,
                                );
                                (out, mma_launches() > before)
                            })
                        });
                    if !six_warps {
                        assert_eq!(wide_launches(), wide_before, "six warps while off");
                    }
                    let Some(out) = out else {
                        assert_eq!(mode, Mode::Fallback, "the kernel did not run");
                        continue;
                    };
                    assert_ne!(mode, Mode::Fallback);
                    let applies = tensor_cores && kind != Kind::Float && [64, 128].contains(&dim);
                    if applies {
                        assert!(
                            on_tensor_cores,
                            "{mode:?} {kind:?} dim {dim}: not on the tensor cores"
                        );
                    }
                    // A different summation order than one softmax: within a rounding step of the
                    // outputs' scale (they are averages of values of about unit size).
                    let diff = (out.to_kind(Kind::Float) - expected.to_kind(Kind::Float))
                        .abs()
                        .max()
                        .double_value(&[]);
                    let tolerance = match kind {
                        Kind::Float => 1e-5,
                        Kind::Half => 2e-3,
                        _ => 1.6e-2,
                    };
                    assert!(
                        diff <= tolerance,
                        "paged decode attention {mode:?} {kind:?} tensor cores {tensor_cores} \
                         six warps {six_warps} ({heads}/{kv_heads} heads, dim {dim}): off by {diff}"
                    );
                }
            }
        }
        // The unsplit cases of dims 64 and 128 in bf16 and f16 ran on six warps (eight sequences of
        // 4 key/value heads fill the emulator's 32 blocks; a GPU leaves a 48-wide context unsplit).
        if mode != Mode::Fallback {
            assert!(
                wide_launches() > wide_before,
                "{mode:?}: the six-warp attention never ran"
            );
        }
    }
}

#[test]
fn fused_kernels_replay_inside_a_cuda_graph() {
    let _one_at_a_time = counting();
    if !mmreg_engine::cuda::graphs_available() {
        // Written past the test harness's output capture, so the skip shows in CI's log.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED fused kernels inside a CUDA graph: CUDA graphs are not available on this machine"
        );
        return;
    }
    kernels::set_enabled(true);
    let device = Device::Cuda(0);
    let kind = Kind::BFloat16;
    let mut gate_up = random(&[8, 256], kind, device, 1);
    let mut qkv = random(&[8, 12, 64], kind, device, 2);
    let (cos, sin) = rope_tables(8, 64, kind, device);
    let (graph, (mlp, roped), _) = Graph::capture(0, None, || {
        Ok((
            kernels::silu_mul(&gate_up),
            kernels::rope(&qkv, &cos, &sin, 8),
        ))
    })
    .expect("capture");
    // New inputs in place, then replay: the outputs follow.
    gate_up.copy_(&random(&[8, 256], kind, device, 3));
    qkv.copy_(&random(&[8, 12, 64], kind, device, 4));
    graph.replay().expect("replay");
    assert_within_one_rounding("silu_mul in a graph", &mlp, &hf_silu_mul(&gate_up));
    assert_identical("rope in a graph", &roped, &hf_rope(&qkv, &cos, &sin, 8));
}

/// The linear kernels for a decode step of one sequence, and of 2 to 16 (bf16 and f16: the tensor
/// cores' mma on a GPU, the same products summed lane by lane in the emulator), against the product in f64:
/// within a rounding of the dtype relative to the largest output (the sums are f32, in different
/// orders), with and without bias, weights whose rows do not fill the last block (37) or tile of 16,
/// inputs that take a warp more than one pass (k = 520) and a k that ends inside a chunk of 32 (200,
/// 520); one row with k split between 2 warps (37 rows: 19 runs; the emulator holds 12 blocks of 4
/// warps), 4 (16 rows) and none (200 rows); rows that fill one tile of 8 of x's rows (5, 8) or two (9,
/// 16), one row and up to 8 with the 8-row kernels (bf16 and f16) and with the one-row and 16-row
/// ones. 17 rows, f32 with more than
/// one row, and a k that is not a multiple of a vector take libtorch's product.
#[test]
fn linear_for_few_rows_matches_the_product() {
    let _one_at_a_time = counting();
    kernels::set_few_rows_linear(true);
    kernels::set_linear_split(true);
    // The 8-row kernels for one row and up to 8 (as by default), and the one-row and 16-row kernels.
    for (mode, eight) in modes().flat_map(|mode| [(mode, true), (mode, false)]) {
        kernels::set_eight_rows(eight);
        kernels::set_few_rows_for_one(eight);
        let device = mode.device();
        for kind in KINDS {
            let few = kind != Kind::Float;
            for (rows, n, k, with_bias, kernel) in [
                (1, 37, 520, false, true),
                (1, 16, 64, true, true),
                (1, 37, 200, true, true),
                (1, 200, 64, false, true),
                (2, 37, 200, true, few),
                (5, 16, 64, false, few),
                (8, 24, 520, false, few),
                (9, 37, 200, true, few),
                (16, 40, 136, false, few),
                (17, 16, 64, false, false),
                (1, 16, 66, false, false),
            ] {
                let before = kernels::launches("linear").expect("a family");
                let x = random(&[rows, k], kind, device, rows);
                let weight = random(&[n, k], kind, device, n);
                let bias = with_bias.then(|| random(&[n], kind, device, k));
                let out = kernels::linear(&x, &weight, bias.as_ref());
                let wide = |t: &Tensor| t.to_device(Device::Cpu).to_kind(Kind::Double);
                let mut expected = wide(&x).matmul(&wide(&weight).transpose(0, 1));
                if let Some(b) = &bias {
                    expected += wide(b);
                }
                let scale = expected.abs().max().double_value(&[]);
                let off = (wide(&out) - &expected).abs().max().double_value(&[]) / scale;
                let tolerance = match kind {
                    Kind::Float => 1e-6,
                    Kind::Half => 1e-3,
                    _ => 8e-3,
                };
                assert!(
                    off <= tolerance,
                    "linear {mode:?} {kind:?} ({rows}×{k} · {n}×{k}, 8-row kernels: {eight}): off \
                     by {off} of the largest"
                );
                assert_eq!(out.size(), [rows, n]);
                // The tests that launch linear kernels take turns (`counting`): the count is this call's.
                let launched = kernels::launches("linear").expect("a family") - before;
                let expected_launches = u64::from(kernel && mode != Mode::Fallback);
                assert_eq!(
                    launched, expected_launches,
                    "linear {mode:?} {kind:?} ({rows}×{k} · {n}×{k}): launches"
                );
            }
        }
    }
    // (Back to the defaults for the tests after this one.)
    kernels::set_eight_rows(true);
    kernels::set_few_rows_for_one(true);
}

/// The MLP's stacked gate/up product with SiLU × up in the same kernel (a decode step of one sequence):
/// the same values as the linear kernel (unsplit) followed by silu_mul (each row's sum in the same order, the
/// same rounding, the same activation: identical), and within a rounding of silu(gate) * up in f64.
/// Several rows take the few-rows kernel with the same epilogue where it is switched on (bf16 and f16,
/// 8 dividing n), the same sums as its plain product; else the product and then silu_mul (no gated
/// launch).
#[test]
fn linear_silu_mul_equals_the_product_then_silu_mul() {
    let _one_at_a_time = counting();
    // The product unsplit, as the gated kernel sums (a split product sums in another order).
    kernels::set_linear_split(false);
    // Several rows with the few-rows kernel off (the product, then silu_mul), and on (bf16 and f16: the
    // gated kernel where 8 divides n, two tiles of x's rows for 9 to 16).
    for (mode, few) in modes().flat_map(|mode| [(mode, false), (mode, true)]) {
        kernels::set_few_rows_linear(few);
        let device = mode.device();
        for kind in KINDS {
            for (rows, n, k, with_bias) in [
                (1, 37, 520, false),
                (1, 16, 64, true),
                (1, 5, 200, true),
                (3, 16, 64, false),
                (8, 24, 200, true),
                (12, 16, 136, false),
                (4, 12, 64, false),
            ] {
                let what = format!(
                    "linear_silu_mul {mode:?} {kind:?} ({rows}×{k} · 2×{n}×{k}, few rows: {few})"
                );
                let x = random(&[rows, k], kind, device, rows + k);
                let weight = random(&[2 * n, k], kind, device, n);
                let bias = with_bias.then(|| random(&[2 * n], kind, device, k));
                let before = kernels::launches("linear_silu_mul").expect("a family");
                let fused = kernels::linear_silu_mul(&x, &weight, bias.as_ref());
                let launched = kernels::launches("linear_silu_mul").expect("a family") - before;
                let on_tensor_cores = few && kind != Kind::Float && n % 8 == 0;
                assert_eq!(
                    launched,
                    u64::from((rows == 1 || on_tensor_cores) && mode != Mode::Fallback),
                    "{what}: gated launches"
                );
                let separate = kernels::silu_mul(&kernels::linear(&x, &weight, bias.as_ref()));
                assert_identical(&what, &fused, &separate);

                let wide = |t: &Tensor| t.to_device(Device::Cpu).to_kind(Kind::Double);
                let mut product = wide(&x).matmul(&wide(&weight).transpose(0, 1));
                if let Some(b) = &bias {
                    product += wide(b);
                }
                let expected = product.narrow(1, 0, n).silu() * product.narrow(1, n, n);
                let scale = expected.abs().max().double_value(&[]);
                let off = (wide(&fused) - &expected).abs().max().double_value(&[]) / scale;
                let tolerance = match kind {
                    Kind::Float => 1e-5,
                    Kind::Half => 4e-3,
                    _ => 3e-2,
                };
                assert!(off <= tolerance, "{what}: off by {off} of the largest");
                assert_eq!(fused.size(), [rows, n], "{what}");
            }
        }
    }
}

/// A decoder layer's stacked q/k/v product for one token with rope and the KV-cache write in its last
/// step: identical to the linear kernel (unsplit) followed by rope_and_store (the same sums, the same rotation),
/// caches included, with and without biases (Qwen2's), for Llama's grouping (no groups) and Mistral's;
/// a few tokens take the few-rows kernel with the same epilogue where it is switched on (bf16 and f16,
/// heads a multiple of 16), the same sums as its plain product; else no fused kernel (`None`: the
/// caller projects first).
#[test]
fn linear_rope_and_store_equals_the_product_then_rope_and_store() {
    let _one_at_a_time = counting();
    // As in the gated test.
    kernels::set_linear_split(false);
    // One token, and several with the few-rows kernel off (None) and on (bf16 and f16: the kernel where
    // 16 divides dim; heads of 40 do not).
    for (mode, few) in modes().flat_map(|mode| [(mode, false), (mode, true)]) {
        kernels::set_few_rows_linear(few);
        let device = mode.device();
        for kind in KINDS {
            for (tokens, heads, kv_heads, dim, k, with_bias) in [
                (1, 4, 4, 64, 200, false),
                (1, 8, 2, 64, 64, true),
                (1, 2, 1, 128, 136, true),
                (5, 4, 4, 64, 200, false),
                (12, 8, 2, 32, 64, true),
                (3, 2, 1, 40, 64, false),
            ] {
                let what = format!(
                    "linear_rope_and_store {mode:?} {kind:?} ({tokens} tokens, {heads}+2×{kv_heads} \
                     heads of {dim}, k {k}, few rows: {few})"
                );
                let n = (heads + 2 * kv_heads) * dim;
                let x = random(&[tokens, k], kind, device, k);
                let weight = random(&[n, k], kind, device, n) * 0.1;
                let bias = with_bias.then(|| random(&[n], kind, device, heads));
                let (cos, sin) = rope_tables(tokens, dim, kind, device);
                // Token t at slot 5 + 2t of a pool of 40.
                let slots: Vec<i64> = (0..tokens).map(|t| 5 + 2 * t).collect();
                let slots = Tensor::from_slice(&slots).to_device(device);
                let caches = || {
                    let zeros = || Tensor::zeros([40, kv_heads, dim], (kind, device));
                    (zeros(), zeros())
                };
                let ((mut keys, mut values), (mut keys2, mut values2)) = (caches(), caches());
                let before = kernels::launches("linear_rope_and_store").expect("a family");
                let store = kernels::RopeStore {
                    cos: &cos,
                    sin: &sin,
                    kv_heads,
                    key_cache: &mut keys,
                    value_cache: &mut values,
                    slots: &slots,
                    slack_rows: 0,
                };
                let fused = kernels::linear_rope_and_store(&x, &weight, bias.as_ref(), store);
                let launched =
                    kernels::launches("linear_rope_and_store").expect("a family") - before;
                let runs = tokens == 1 || (few && kind != Kind::Float && dim % 16 == 0);
                let Some(fused) = fused else {
                    assert!(
                        mode == Mode::Fallback || !runs,
                        "{what}: the kernel did not run"
                    );
                    assert_eq!(launched, 0, "{what}");
                    continue;
                };
                assert!(runs, "{what}: a fused kernel where none applies");
                assert_eq!(launched, 1, "{what}: launches");
                let projected = kernels::linear(&x, &weight, bias.as_ref()).view([
                    tokens,
                    heads + 2 * kv_heads,
                    dim,
                ]);
                let store = kernels::RopeStore {
                    cos: &cos,
                    sin: &sin,
                    kv_heads,
                    key_cache: &mut keys2,
                    value_cache: &mut values2,
                    slots: &slots,
                    slack_rows: 0,
                };
                let separate = kernels::rope_and_store(&projected, store)
                    .expect("rope_and_store runs where the fused kernel does");
                assert_identical(&what, &fused, &separate);
                assert_identical(&format!("{what}: keys"), &keys, &keys2);
                assert_identical(&format!("{what}: values"), &values, &values2);
                assert!(
                    keys.abs().sum(Kind::Float).double_value(&[]) > 0.0,
                    "{what}: no key stored"
                );
                // Two tokens: the few-rows kernel where it applies, else none (the caller projects).
                let (two_cos, two_sin) = rope_tables(2, dim, kind, device);
                let two_slots = Tensor::from_slice(&[1i64, 2]).to_device(device);
                let two = kernels::linear_rope_and_store(
                    &random(&[2, k], kind, device, 2),
                    &weight,
                    bias.as_ref(),
                    kernels::RopeStore {
                        cos: &two_cos,
                        sin: &two_sin,
                        kv_heads,
                        key_cache: &mut keys,
                        value_cache: &mut values,
                        slots: &two_slots,
                        slack_rows: 0,
                    },
                );
                let two_runs = few && kind != Kind::Float && dim % 16 == 0;
                assert_eq!(two.is_some(), two_runs, "{what}: two tokens");
            }
        }
    }
}
