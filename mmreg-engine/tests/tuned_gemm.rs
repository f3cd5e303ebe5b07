//! Products tuned on the card (`mmreg_engine::tuned_gemm`) against libtorch's product and an f32
//! reference, on a decode step's shapes (32 rows of LLaVA-1.5-7B's q/k/v and down projections), a vision
//! tower's with a bias, and f16; the kept configuration again, through `kernels::linear`, for another count
//! of rows in its bucket, inside a CUDA graph, and read back from the file of kept picks. The CUDA cases are skipped, with a message, where no GPU is available (or the build has no
//! cuBLASLt header).

use std::io::Write;

use mmreg_engine::cuda::Graph;
use mmreg_engine::kernels;
use mmreg_engine::tuned_gemm::{self, Decision};
use tch::{Device, Kind, Tensor};

/// Held by each CUDA case: one captures a CUDA graph, and the others' random tensors would take the
/// device's generator while it is capturing ("Offset increment outside graph capture", run 98).
static DEVICE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Takes the lock, with picks kept in this process's own file (not the user's cache).
fn lock() -> std::sync::MutexGuard<'static, ()> {
    let guard = DEVICE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    tuned_gemm::set_cache_path(Some(scratch("tuned-gemm.tsv")));
    guard
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mmreg-tuned-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir.join(name)
}

fn cuda() -> Option<Device> {
    let why = if !tch::Cuda::is_available() {
        "CUDA is not available on this machine"
    } else if !tuned_gemm::available() {
        "this build found no cublasLt.h beside torch's CUDA headers"
    } else {
        return Some(Device::Cuda(0));
    };
    // Written past the test harness's output capture, so the skip shows in a plain `cargo test`.
    let _ = writeln!(std::io::stderr(), "SKIPPED tuned product test: {why}");
    None
}

fn max_error(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Float) - b.to_kind(Kind::Float))
        .abs()
        .max()
        .double_value(&[])
}

fn equal(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.eq_tensor(b).all().int64_value(&[]) == 1
}

#[test]
fn tuned_products_match_libtorch_and_f32() {
    let Some(device) = cuda() else { return };
    let _device = lock();
    tuned_gemm::set_enabled(true);
    tch::manual_seed(11);
    // rows, n, k, bias, dtype
    let cases = [
        (32, 12288, 4096, false, Kind::BFloat16),
        (32, 4096, 11008, false, Kind::BFloat16),
        (40, 3072, 1024, true, Kind::BFloat16),
        (24, 4096, 4096, false, Kind::Half),
    ];
    for (rows, n, k, has_bias, kind) in cases {
        let x = Tensor::randn([rows, k], (kind, device));
        let w = Tensor::randn([n, k], (kind, device)) * 0.02;
        let bias = has_bias.then(|| Tensor::randn([n], (kind, device)));
        let reference = x.to_kind(Kind::Float).matmul(&w.to_kind(Kind::Float).tr())
            + bias
                .as_ref()
                .map_or(Tensor::from(0f32), |b| b.to_kind(Kind::Float));
        let libtorch = x.linear(&w, bias.as_ref());
        let scale = reference.abs().max().double_value(&[]);
        let out = tuned_gemm::linear(&x, &w, bias.as_ref());
        let decision = tuned_gemm::decision(0, kind, rows, n, k, has_bias);
        println!("{rows} x {k} by {n} x {k} (bias {has_bias}, {kind:?}): {decision:?}");
        match (decision, &out) {
            (
                Decision::CublasLt {
                    best_us,
                    torch_us,
                    candidates,
                    ..
                },
                Some(out),
            ) => {
                assert!(best_us < torch_us && candidates > 1, "{decision:?}");
                let (error, torch_error) =
                    (max_error(out, &reference), max_error(&libtorch, &reference));
                assert!(
                    error <= 2.0 * torch_error + 1e-3 * scale,
                    "tuned {error} against libtorch's {torch_error} (scale {scale})"
                );
                let again = tuned_gemm::linear(&x, &w, bias.as_ref()).expect("kept");
                assert!(
                    equal(out, &again),
                    "the kept configuration gives the same output"
                );
                // kernels::linear takes it for [batch, seq, k] as well.
                let x3 = x.view([2, rows / 2, k]);
                let through = kernels::linear(&x3, &w, bias.as_ref());
                assert!(equal(&through.view([rows, n]), out));
            }
            (Decision::Libtorch { candidates, .. }, None) => assert!(candidates > 0),
            _ => panic!("output {:?} against {decision:?}", out.map(|t| t.size())),
        }
    }
    // Switched off, the caller gets None and runs libtorch's. (In this test: the switch is the
    // process's, and the tests run side by side.)
    let x = Tensor::randn([32, 4096], (Kind::BFloat16, device));
    let w = Tensor::randn([12288, 4096], (Kind::BFloat16, device));
    tuned_gemm::set_enabled(false);
    let off = tuned_gemm::linear(&x, &w, None);
    tuned_gemm::set_enabled(true);
    assert!(off.is_none(), "switched off");
}

#[test]
fn picks_are_kept_on_disk_and_read_back_by_a_later_process() {
    let Some(device) = cuda() else { return };
    let _device = lock();
    let path = scratch("kept.tsv");
    let _ = std::fs::remove_file(&path);
    tuned_gemm::set_cache_path(Some(path.clone()));
    tuned_gemm::forget();
    tuned_gemm::set_enabled(true);
    tch::manual_seed(3);
    let (rows, n, k) = (24, 11008, 4096);
    let x = Tensor::randn([rows, k], (Kind::BFloat16, device));
    let w = Tensor::randn([n, k], (Kind::BFloat16, device)) * 0.02;
    let before = tuned_gemm::tuning();
    let first = tuned_gemm::linear(&x, &w, None);
    let timed = tuned_gemm::decision(0, Kind::BFloat16, rows, n, k, false);
    let after = tuned_gemm::tuning();
    println!(
        "timed here: {timed:?} ({:.3} s)",
        after.seconds - before.seconds
    );
    assert_eq!(after.shapes, before.shapes + 1, "one shape timed");
    assert!(after.seconds > before.seconds, "{before:?} {after:?}");
    let text = std::fs::read_to_string(&path).expect("the pick was kept");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(lines[0].contains("\tbf16\t24\t11008\t4096\t0\t"), "{text}");

    // A later process (here: the same one with its picks dropped) takes the pick from the file.
    tuned_gemm::forget();
    assert_eq!(
        tuned_gemm::decision(0, Kind::BFloat16, rows, n, k, false),
        Decision::Untuned
    );
    let second = tuned_gemm::linear(&x, &w, None);
    let read = tuned_gemm::decision(0, Kind::BFloat16, rows, n, k, false);
    println!("read back: {read:?}");
    assert_eq!(tuned_gemm::tuning(), after, "a kept pick is not timed");
    match (timed, read) {
        (
            Decision::CublasLt {
                candidates,
                stored: false,
                ..
            },
            Decision::CublasLt {
                candidates: again,
                stored: true,
                ..
            },
        ) => {
            assert_eq!(candidates, again);
            let (first, second) = (first.expect("tuned"), second.expect("kept"));
            assert!(
                equal(&first, &second),
                "the same configuration, the same output"
            );
        }
        (Decision::Libtorch { stored: false, .. }, Decision::Libtorch { stored: true, .. }) => {
            assert!(first.is_none() && second.is_none())
        }
        _ => panic!("timed {timed:?}, read back {read:?}"),
    }
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        text,
        "nothing timed, nothing appended"
    );

    // Picks of another card (or cuBLASLt version) are not taken: the shape is timed again.
    let other = lines[0].replacen(lines[0].split('\t').next().unwrap(), "Some Other GPU", 1);
    std::fs::write(&path, format!("{other}\n")).unwrap();
    tuned_gemm::forget();
    let _ = tuned_gemm::linear(&x, &w, None);
    match tuned_gemm::decision(0, Kind::BFloat16, rows, n, k, false) {
        Decision::CublasLt { stored, .. } | Decision::Libtorch { stored, .. } => {
            assert!(!stored, "timed again")
        }
        Decision::Untuned => panic!("not tuned"),
    }
    assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
}

#[test]
fn a_buckets_pick_serves_its_other_counts_of_rows() {
    let Some(device) = cuda() else { return };
    let _device = lock();
    tuned_gemm::set_enabled(true);
    tch::manual_seed(7);
    // A lone prefill's gate/up products: 608 and 630 rows share the bucket of 577-640 rows.
    let (n, k) = (22016, 4096);
    assert_eq!(tuned_gemm::rows_bucket(608), tuned_gemm::rows_bucket(630));
    let w = Tensor::randn([n, k], (Kind::BFloat16, device)) * 0.02;
    let first = Tensor::randn([608, k], (Kind::BFloat16, device));
    let _ = tuned_gemm::linear(&first, &w, None);
    let timed = tuned_gemm::decision(0, Kind::BFloat16, 608, n, k, false);
    println!("608 rows: {timed:?}");
    assert_ne!(timed, Decision::Untuned);
    let x = Tensor::randn([630, k], (Kind::BFloat16, device));
    let out = tuned_gemm::linear(&x, &w, None);
    assert_eq!(
        tuned_gemm::decision(0, Kind::BFloat16, 630, n, k, false),
        timed,
        "the bucket's pick, not timed again"
    );
    let reference = x.to_kind(Kind::Float).matmul(&w.to_kind(Kind::Float).tr());
    let libtorch_error = max_error(&x.linear(&w, None::<&Tensor>), &reference);
    match (timed, out) {
        (Decision::CublasLt { .. }, Some(out)) => {
            let error = max_error(&out, &reference);
            assert!(
                error <= 2.0 * libtorch_error + 1e-3 * reference.abs().max().double_value(&[]),
                "630 rows through 608's configuration: {error} against libtorch's {libtorch_error}"
            );
        }
        (Decision::Libtorch { .. }, None) => {}
        (timed, out) => panic!("{timed:?} with output {:?}", out.map(|t| t.size())),
    }
}

#[test]
fn tuned_product_replays_in_a_cuda_graph() {
    let Some(device) = cuda() else { return };
    let _device = lock();
    tuned_gemm::set_enabled(true);
    tch::manual_seed(5);
    let (rows, n, k) = (48, 4096, 4096);
    let mut x = Tensor::randn([rows, k], (Kind::BFloat16, device));
    let w = Tensor::randn([n, k], (Kind::BFloat16, device)) * 0.02;
    // The capture's warm-up run meets the shape first and tunes it; the capture then records the kept
    // configuration (or libtorch's product).
    let (graph, out, _pool) =
        Graph::capture(0, None, || Ok(kernels::linear(&x, &w, None))).expect("captured");
    assert_ne!(
        tuned_gemm::decision(0, Kind::BFloat16, rows, n, k, false),
        Decision::Untuned,
        "tuned in the warm-up run"
    );
    let fresh = Tensor::randn([rows, k], (Kind::BFloat16, device));
    x.copy_(&fresh);
    graph.replay().expect("replayed");
    tch::Cuda::synchronize(0);
    let eager = kernels::linear(&fresh, &w, None);
    assert!(
        equal(&out, &eager),
        "the replay computes the new input as the eager call does"
    );
}

#[test]
fn tuned_products_decline_what_they_do_not_run() {
    let cpu = Tensor::randn([32, 64], (Kind::Float, Device::Cpu));
    let w = Tensor::randn([16, 64], (Kind::Float, Device::Cpu));
    tuned_gemm::set_enabled(true);
    assert!(tuned_gemm::linear(&cpu, &w, None).is_none(), "CPU tensors");
    let Some(device) = cuda() else {
        assert_eq!(tuned_gemm::tuning(), Default::default(), "nothing timed");
        return;
    };
    let _device = lock();
    let before = tuned_gemm::tuning();
    let w = Tensor::randn([256, 512], (Kind::BFloat16, device));
    let one = Tensor::randn([1, 512], (Kind::BFloat16, device));
    assert!(
        tuned_gemm::linear(&one, &w, None).is_none(),
        "one row: the engine's kernels"
    );
    let many = Tensor::randn([tuned_gemm::max_rows() + 1, 512], (Kind::BFloat16, device));
    assert!(
        tuned_gemm::linear(&many, &w, None).is_none(),
        "more rows than MMREG_TUNED_GEMM_ROWS"
    );
    let f32 = Tensor::randn([32, 512], (Kind::Float, device));
    assert!(
        tuned_gemm::linear(&f32, &w.to_kind(Kind::Float), None).is_none(),
        "f32"
    );
    let strided = Tensor::randn([512, 32], (Kind::BFloat16, device)).tr();
    assert!(
        tuned_gemm::linear(&strided, &w, None).is_none(),
        "x not contiguous"
    );
    assert_eq!(tuned_gemm::tuning(), before, "nothing declined is timed");
}
