//! CUDA smoke test: a bf16 matmul and scaled_dot_product_attention on cuda:0 agree with the CPU.
//! Skipped, with a message, where no GPU is available.

use std::io::Write;

use tch::{Device, Kind, Tensor};

fn cuda() -> Option<Device> {
    if tch::Cuda::is_available() {
        println!(
            "CUDA available: {} device(s), cuDNN: {}",
            tch::Cuda::device_count(),
            tch::Cuda::cudnn_is_available()
        );
        Some(Device::Cuda(0))
    } else {
        // Written past the test harness's output capture, so the skip shows in a plain `cargo test`.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED cuda smoke test: CUDA is not available on this machine"
        );
        None
    }
}

fn max_relative_error(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_device(Device::Cpu).to_kind(Kind::Float);
    let b = b.to_device(Device::Cpu).to_kind(Kind::Float);
    let error = (&a - &b).abs().max().double_value(&[]);
    error / b.abs().max().double_value(&[]).max(1e-12)
}

#[test]
fn bf16_matmul_on_cuda_matches_cpu() {
    let Some(device) = cuda() else { return };
    tch::manual_seed(0);
    let a = Tensor::randn([256, 512], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
    let b = Tensor::randn([512, 128], (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16);
    let expected = a.to_kind(Kind::Float).matmul(&b.to_kind(Kind::Float));
    let actual = a.to_device(device).matmul(&b.to_device(device));
    assert_eq!(actual.device(), device);
    let error = max_relative_error(&actual, &expected);
    println!("bf16 matmul on {device:?}: max relative error {error:.2e}");
    assert!(error < 2e-2, "bf16 matmul error {error}");
}

#[test]
fn sdpa_on_cuda_matches_cpu() {
    let Some(device) = cuda() else { return };
    tch::manual_seed(1);
    let shape = [2, 8, 64, 64];
    let q = Tensor::randn(shape, (Kind::Float, Device::Cpu));
    let k = Tensor::randn(shape, (Kind::Float, Device::Cpu));
    let v = Tensor::randn(shape, (Kind::Float, Device::Cpu));
    let expected =
        Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, None, false);
    let on = |t: &Tensor| t.to_device(device).to_kind(Kind::BFloat16);
    let actual = Tensor::scaled_dot_product_attention(
        &on(&q),
        &on(&k),
        &on(&v),
        None::<Tensor>,
        0.0,
        true,
        None,
        false,
    );
    let error = max_relative_error(&actual, &expected);
    println!("bf16 causal SDPA on {device:?}: max relative error {error:.2e}");
    assert!(error < 3e-2, "SDPA error {error}");
}

#[test]
fn caching_allocator_statistics_follow_an_allocation() {
    let Some(device) = cuda() else { return };
    mmreg_engine::cuda::empty_cache();
    mmreg_engine::cuda::reset_peak_stats(0);
    let before = mmreg_engine::cuda::memory_stats(0).expect("statistics through the shim");
    let tensor = Tensor::zeros([256, 1024, 1024], (Kind::Float, device)); // 1 GiB
    let during = mmreg_engine::cuda::memory_stats(0).expect("statistics");
    drop(tensor);
    let after = mmreg_engine::cuda::memory_stats(0).expect("statistics");
    let (free, total) = mmreg_engine::cuda::mem_get_info(0).expect("cudaMemGetInfo");
    println!(
        "allocated {} -> {} -> {} bytes, peak {}, free {free} of {total}",
        before.allocated, during.allocated, after.allocated, after.peak_allocated
    );
    assert!(
        during.allocated >= before.allocated + (1 << 30),
        "{before:?} -> {during:?}"
    );
    assert!(
        after.allocated + (1 << 30) <= during.allocated,
        "{during:?} -> {after:?}"
    );
    assert!(
        after.peak_allocated >= before.allocated + (1 << 30),
        "{after:?}"
    );
    assert!(
        free <= total && total > 1 << 30,
        "free {free}, total {total}"
    );
}

#[test]
fn a_captured_graph_replays_with_new_inputs() {
    let Some(device) = cuda() else { return };
    let mut x = Tensor::zeros([1024], (Kind::Float, device));
    let w = Tensor::randn([1024, 1024], (Kind::Float, device));
    let (graph, y, _pool) =
        mmreg_engine::cuda::Graph::capture(0, None, || Ok(w.mv(&x).relu() + 1.0))
            .expect("captures");
    for seed in 0..3 {
        let input = Tensor::randn([1024], (Kind::Float, device)) * (seed + 1) as f64;
        x.copy_(&input);
        graph.replay().expect("replays");
        let expected = w.mv(&input).relu() + 1.0;
        let error = max_relative_error(&y, &expected);
        println!("graph replay {seed}: relative error {error:.2e}");
        assert!(error < 1e-5, "replay {seed} differs from eager: {error}");
    }
}
