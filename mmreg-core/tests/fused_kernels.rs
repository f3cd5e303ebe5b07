//! `mmreg_core::kernels` against HF's op-by-op formulas, in f32, bf16 and f16: on the CPU (the unfused
//! path) and, where there is a GPU, on cuda:0 (the NVRTC kernels, also inside a CUDA graph). SiLU × up,
//! rope and the residual add are bit-exact; RMSNorm differs at most by the order of its f32 sum.

use mmreg_core::cuda::Graph;
use mmreg_core::kernels;
use tch::{Device, Kind, Tensor};

const KINDS: [Kind; 3] = [Kind::Float, Kind::BFloat16, Kind::Half];

fn devices() -> Vec<Device> {
    // Opt-in in the library for now; these tests are what lets it become the default.
    kernels::set_enabled(true);
    let mut devices = vec![Device::Cpu];
    if tch::Cuda::is_available() {
        devices.push(Device::Cuda(0));
    } else {
        eprintln!("fused kernels: no GPU here, checking the CPU path only");
    }
    devices
}

fn random(shape: &[i64], kind: Kind, device: Device, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn(shape, (Kind::Float, Device::Cpu))
        .to_kind(kind)
        .to_device(device)
}

/// Number of elements where `a` and `b` differ, and the largest difference (in f32).
fn differences(a: &Tensor, b: &Tensor) -> (i64, f64) {
    assert_eq!(a.size(), b.size());
    assert_eq!(a.kind(), b.kind());
    let (a, b) = (
        a.to_device(Device::Cpu).to_kind(Kind::Float),
        b.to_device(Device::Cpu).to_kind(Kind::Float),
    );
    let diff = (&a - &b).abs();
    (
        diff.gt(0.0).sum(Kind::Int64).int64_value(&[]),
        diff.max().double_value(&[]),
    )
}

fn assert_identical(what: &str, actual: &Tensor, expected: &Tensor) {
    let (count, max) = differences(actual, expected);
    assert_eq!(
        count,
        0,
        "{what} ({:?} on {:?}): {count} elements differ, by up to {max}",
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
/// is built; a build without it says so.
#[test]
fn fused_kernels_compile_with_nvrtc_for_hopper_and_ampere() {
    for (major, minor) in [(9, 0), (8, 0)] {
        match kernels::compile_for(major, minor) {
            Ok(bytes) => assert!(bytes > 1000, "sm_{major}{minor}: a {bytes}-byte cubin"),
            Err(why) => panic!("sm_{major}{minor}: {why}"),
        }
    }
}

#[test]
fn fused_kernels_compile_wherever_there_is_a_gpu() {
    kernels::set_enabled(true);
    assert!(!kernels::fused_available(Device::Cpu));
    if tch::Cuda::is_available() && mmreg_core::cuda::graphs_available() {
        // The shim is built in and a GPU is present: the kernels must compile (a failure would be
        // logged and everything would silently run unfused).
        let reason = kernels::unavailable_reason(Device::Cuda(0));
        assert!(reason.is_none(), "fused kernels unavailable: {reason:?}");
    }
}

#[test]
fn silu_mul_equals_silu_of_gate_times_up() {
    for device in devices() {
        for kind in KINDS {
            for (rows, n) in [(37, 352), (3, 11008), (1, 1)] {
                let gate_up = random(&[rows, 2 * n], kind, device, rows + n);
                let expected = gate_up.narrow(1, 0, n).silu() * gate_up.narrow(1, n, n);
                assert_identical("silu_mul", &kernels::silu_mul(&gate_up), &expected);
            }
        }
    }
}

#[test]
fn rope_equals_hf_rotary_embedding() {
    for device in devices() {
        for kind in KINDS {
            // LLaVA-1.5 (32 heads, no GQA) and Mistral-like (32 + 8 + 8) layouts, and a small head.
            for (tokens, heads, rotated, dim) in
                [(7, 96, 64, 128), (5, 48, 40, 128), (19, 6, 4, 32)]
            {
                let qkv = random(&[tokens, heads, dim], kind, device, tokens * heads);
                let (cos, sin) = rope_tables(tokens, dim, kind, device);
                let expected = hf_rope(&qkv, &cos, &sin, rotated);
                assert_identical("rope", &kernels::rope(&qkv, &cos, &sin, rotated), &expected);
            }
        }
    }
}

#[test]
fn rms_norm_and_residual_add_match_hf() {
    for device in devices() {
        for kind in KINDS {
            for (rows, cols) in [(37, 4096), (4, 100), (1, 32)] {
                let x = random(&[rows, cols], kind, device, rows);
                let delta = random(&[rows, cols], kind, device, rows + 1);
                let weight = (random(&[cols], kind, device, 7) * 0.1 + 1.0).to_kind(kind);
                let eps = 1e-5;

                let normed = kernels::rms_norm(&x, &weight, eps);
                let expected = hf_rms_norm(&x, &weight, eps);
                let (count, max) = differences(&normed, &expected);
                // Only a different order of the f32 sum: a few elements off by one rounding step.
                // In f32 one ulp of the scale moves most of a row; in 16 bits it rarely changes a rounding.
                let (step, allowed) = match kind {
                    Kind::Float => (1e-5, rows * cols),
                    Kind::Half => (4e-3, rows * cols / 100),
                    _ => (3.2e-2, rows * cols / 100),
                };
                assert!(
                    max <= step && count <= allowed,
                    "rms_norm {kind:?} on {device:?}: {count} differ, by up to {max}"
                );

                let (sum, normed) = kernels::add_rms_norm(&x, &delta, &weight, eps);
                let expected_sum = &x + &delta;
                assert_identical("residual add", &sum, &expected_sum);
                let (count, max) = differences(&normed, &hf_rms_norm(&expected_sum, &weight, eps));
                assert!(
                    max <= step && count <= allowed,
                    "add_rms_norm {kind:?} on {device:?}: {count} differ, by up to {max}"
                );
            }
        }
    }
}

#[test]
fn fused_kernels_replay_inside_a_cuda_graph() {
    if !mmreg_core::cuda::graphs_available() {
        eprintln!("fused kernels: no CUDA graphs here, skipping the graph check");
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
    let expected_mlp = gate_up.narrow(1, 0, 128).silu() * gate_up.narrow(1, 128, 128);
    assert_identical("silu_mul in a graph", &mlp, &expected_mlp);
    assert_identical("rope in a graph", &roped, &hf_rope(&qkv, &cos, &sin, 8));
}
