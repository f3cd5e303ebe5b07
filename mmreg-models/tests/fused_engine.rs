//! The engine with the fused kernels (paged decode attention included) generates what it generates with
//! libtorch's ops: packed decode steps, and the fixed-shape steps that CUDA graphs replay (padding rows,
//! context buckets). On the CPU the kernels run in the emulator of their CUDA source; on a GPU, where
//! there is one, for real (f32, CUDA graphs captured). Its own binary: the switches are process-wide.

use std::io::Write;
use std::sync::Mutex;

use mmreg_core::Prompt;
use mmreg_engine::kernels;
use mmreg_engine::{Engine, EngineOptions, ImageSource, Request, SamplingParams};
use mmreg_models as _;

mod support;
use support::fixture;
use tch::{Device, Kind};

/// The tests switch the kernels for the whole process: one at a time.
static SWITCHES: Mutex<()> = Mutex::new(());

fn request(prompt: &str, images: &[&str], max_tokens: usize) -> Request {
    let dir = fixture("llava-tiny-real/images");
    Request {
        videos: Vec::new(),
        prompt: Prompt::Text(prompt.into()),
        images: images
            .iter()
            .map(|name| ImageSource::Path(dir.join(name)))
            .collect(),
        params: SamplingParams {
            max_tokens,
            ..SamplingParams::default()
        },
    }
}

fn token_ids(options: EngineOptions, requests: &[Request]) -> Vec<Vec<u32>> {
    let engine = Engine::new(fixture("llava-tiny-real"), options).expect("engine");
    engine
        .generate(requests.to_vec())
        .into_iter()
        .map(|r| r.expect("completes").token_ids)
        .collect()
}

/// The launches of every kernel family the decoder uses, to check that a run really used them: the same
/// tokens with the kernels silently off would prove nothing. One sequence decoding alone takes the
/// one-row products with SiLU × up and with rope and the cache write in their last step.
struct KernelsRan([u64; 9]);

const FAMILIES: [&str; 9] = [
    "rms_norm",
    "add_rms_norm",
    "silu_mul",
    "rope",
    "paged_decode_attention",
    "linear",
    "linear_silu_mul",
    "linear_rope_and_store",
    "argmax",
];

impl KernelsRan {
    fn start() -> Self {
        Self(FAMILIES.map(|f| kernels::launches(f).expect("a kernel family")))
    }

    fn assert(&self) {
        for (family, before) in FAMILIES.iter().zip(self.0) {
            let after = kernels::launches(family).expect("a kernel family");
            assert!(after > before, "the fused {family} kernel never ran");
        }
    }
}

#[test]
fn emulated_kernels_generate_what_libtorch_does() {
    let _one_at_a_time = SWITCHES.lock().unwrap_or_else(|e| e.into_inner());
    // As in the kernels' tests: MMREG_TEST_MODES without `emulated` (the GPU machine's quick runs).
    if std::env::var("MMREG_TEST_MODES")
        .is_ok_and(|only| !only.split(',').any(|m| m.trim() == "emulated"))
    {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED the emulated engine: MMREG_TEST_MODES leaves out `emulated`"
        );
        return;
    }
    // Three sequences of different lengths decoding together, one finishing early and the longest decoding
    // alone at the end (the one-row linear kernel). Text only, and small
    // limits for the startup profile's dummy step: the emulator runs each CUDA thread as an OS thread,
    // too slow for 576 image tokens per prompt (the kernels' unit tests and hf_parity cover images).
    let requests = [
        request("USER: What is shown in this image? ASSISTANT:", &[], 8),
        request("USER: Say something. ASSISTANT:", &[], 3),
        request(
            "USER: Describe every detail of the picture, then say what differs. ASSISTANT:",
            &[],
            12,
        ),
    ];
    let options = |cuda_graphs| EngineOptions {
        cuda_graphs,
        max_model_len: Some(128),
        max_num_batched_tokens: 128,
        limit_mm_per_prompt: mmreg_engine::MultiModalLimits::each(0),
        ..EngineOptions::default()
    };
    kernels::set_enabled(false);
    let expected = token_ids(options(Some(false)), &requests);
    kernels::set_enabled(true);
    kernels::emulate_on_all_threads(true);
    assert!(kernels::fused_available(Device::Cpu));
    for cuda_graphs in [Some(false), Some(true)] {
        let ran = KernelsRan::start();
        let actual = token_ids(options(cuda_graphs), &requests);
        ran.assert();
        assert_eq!(actual, expected, "cuda_graphs {cuda_graphs:?}");
    }
    kernels::emulate_on_all_threads(false);
}

#[test]
fn on_a_gpu_the_kernels_generate_what_libtorch_does() {
    if !tch::Cuda::is_available() {
        // Written past the test harness's output capture, so the skip shows in a plain `cargo test`.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED fused kernels on a GPU: CUDA is not available on this machine"
        );
        return;
    }
    let _one_at_a_time = SWITCHES.lock().unwrap_or_else(|e| e.into_inner());
    let question = "USER: <image>\nWhat is shown in this image? ASSISTANT:";
    let requests: Vec<Request> = (0..5)
        .map(|i| request(question, &["a_300x200.png"], 4 + 3 * i))
        .chain([request(
            "USER: <image>\n<image>\nWhat differs? ASSISTANT:",
            &["a_300x200.png", "b_480x640.png"],
            9,
        )])
        .collect();
    let options = |cuda_graphs| EngineOptions {
        device: Device::Cuda(0),
        dtype: Kind::Float,
        cuda_graphs,
        ..EngineOptions::default()
    };
    kernels::set_enabled(false);
    let expected = token_ids(options(Some(false)), &requests);
    kernels::set_enabled(true);
    let reason = kernels::unavailable_reason(Device::Cuda(0));
    assert!(reason.is_none(), "fused kernels unavailable: {reason:?}");
    // Eager steps, then CUDA graphs (where they work) around the kernels.
    for cuda_graphs in [Some(false), None] {
        let ran = KernelsRan::start();
        let actual = token_ids(options(cuda_graphs), &requests);
        ran.assert();
        assert_eq!(actual, expected, "cuda_graphs {cuda_graphs:?}");
    }
    kernels::set_enabled(false);
}
