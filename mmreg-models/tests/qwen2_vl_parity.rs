//! Qwen2-VL and Qwen2.5-VL against HF transformers, on the tiny random checkpoints and goldens of
//! `scripts/make_qwen2_vl_fixtures.py` (real Qwen tokenizer): for one image, two images of different
//! aspect ratios, a 4-frame video, an image and a video, and text alone, the expanded ids, the pixel
//! values and grids (bit for bit), the M-RoPE positions and delta, the vision tower's output, f32 prefill
//! logits at every prompt position (log-sum-exp, max and argmax over the whole vocabulary, and the
//! logits of ~100 columns), and 20 greedy tokens; then all five through the engine in one batch.

#[allow(dead_code)] // the LLaVA comparison helpers
mod common;
mod support;

use std::path::{Path, PathBuf};

use common::Golden;
use mmreg_core::prepare::{prepare, PreparedInputs};
use mmreg_core::registry::ModelEntry;
use mmreg_core::{
    ImageInput, LoadOptions, Modality, ModelContext, MultiModalData, MultiModalModel,
    ProcessorInputs, Prompt, Registry, VideoInput, Weights,
};
use mmreg_engine::generate::{embed_prompt, generate, prefill_logits_at};
use mmreg_engine::{Engine, EngineOptions, ImageSource, Request, SamplingParams};
use mmreg_models as _;
use serde_json::Value;
use support::fixture;
use tch::{Kind, Tensor};

const CASES: [&str; 5] = [
    "one_image",
    "two_images",
    "video",
    "image_and_video",
    "text_only",
];

struct Checkpoint {
    dir: PathBuf,
    ctx: ModelContext,
    entry: &'static ModelEntry,
    model: Box<dyn MultiModalModel>,
    golden: Golden,
    meta: Value,
}

fn checkpoint(name: &str) -> Checkpoint {
    let dir = fixture(name);
    let ctx = ModelContext::from_dir(&dir).expect("context");
    let entry = Registry::global().for_context(&ctx).expect("registered");
    let options = LoadOptions {
        device: tch::Device::Cpu,
        dtype: Kind::Float,
        tensor_parallel: None,
        shard_vision_tower: false,
    };
    let weights = Weights::from_dir(&dir).expect("weights");
    let model = entry.load(&ctx, &weights, &options).expect("loads");
    let meta = serde_json::from_str(
        &std::fs::read_to_string(dir.join("golden.json")).expect("golden.json"),
    )
    .expect("json");
    Checkpoint {
        golden: Golden::load(&dir),
        dir,
        ctx,
        entry,
        model,
        meta,
    }
}

/// The case's video frame rate, where HF's processor was given one (Qwen2.5-VL's `video` case).
fn case_fps(meta: &Value) -> Option<f64> {
    meta.get("video_fps_passed").and_then(Value::as_f64)
}

/// The case's prompt text, images and videos (frames) from golden.json.
fn case_inputs(dir: &Path, meta: &Value) -> (String, Vec<PathBuf>, Vec<Vec<PathBuf>>) {
    let prompt = meta["prompt"].as_str().expect("prompt").to_owned();
    let files = |v: &Value| -> Vec<PathBuf> {
        v.as_array()
            .expect("file list")
            .iter()
            .map(|f| dir.join("images").join(f.as_str().expect("name")))
            .collect()
    };
    let images = files(&meta["images"]);
    let videos = meta["videos"]
        .as_object()
        .map(|v| v.values().map(files).collect())
        .unwrap_or_default();
    (prompt, images, videos)
}

fn prepared(c: &Checkpoint, case: &str) -> PreparedInputs {
    let meta = &c.meta["cases"][case];
    let (prompt, images, videos) = case_inputs(&c.dir, meta);
    let images = images
        .iter()
        .map(|p| ImageInput::open(p).expect("image"))
        .collect();
    let videos = videos
        .iter()
        .map(|frames| {
            let frames = frames
                .iter()
                .map(|p| ImageInput::open(p).expect("frame").image)
                .collect();
            let video = VideoInput::new("clip", frames);
            match case_fps(meta) {
                Some(fps) => video.with_fps(fps),
                None => video,
            }
        })
        .collect();
    let inputs = ProcessorInputs {
        prompt: Prompt::Text(prompt),
        multimodal: MultiModalData { images, videos },
    };
    prepare(c.entry, &c.ctx, inputs, usize::MAX).expect("prepares")
}

fn max_relative_error(actual: &Tensor, expected: &Tensor, scale: f64) -> f64 {
    (actual - expected).abs().max().double_value(&[]) / scale
}

fn check_case(c: &Checkpoint, case: &str) {
    let _guard = tch::no_grad_guard();
    let g = &c.golden;
    let key = |k: &str| format!("{case}.{k}");
    let inputs = prepared(c, case);
    let ids: Vec<i64> = inputs
        .processed
        .token_ids
        .iter()
        .map(|&t| t as i64)
        .collect();
    assert_eq!(ids, g.ids(&key("input_ids")), "{case}: input_ids");

    // Pixel values and grids, bit for bit.
    for (modality, pixels, grid) in [
        (Modality::Image, "pixel_values", "image_grid_thw"),
        (Modality::Video, "pixel_values_videos", "video_grid_thw"),
    ] {
        let mapped = inputs.mapped.iter().find(|(m, _)| *m == modality);
        let has_golden = g.has(&key(pixels));
        assert_eq!(mapped.is_some(), has_golden, "{case}: {modality} inputs");
        if let Some((_, tensors)) = mapped {
            let map: Vec<(&str, &Tensor)> = tensors.iter().collect();
            let get = |name: &str| map.iter().find(|(n, _)| *n == name).expect(name).1;
            assert!(
                get(pixels).equal(g.get(&key(pixels))),
                "{case}: {pixels} differ from HF's"
            );
            assert_eq!(
                Vec::<i64>::try_from(get(grid).flatten(0, -1)).expect("grid"),
                g.ids(&key(grid)),
                "{case}: {grid}"
            );
        }
    }

    // M-RoPE positions and the decode offset.
    let positions = inputs.processed.positions.clone().expect("positions");
    assert_eq!(positions.sections, 3);
    assert_eq!(
        positions.ids,
        g.ids(&key("position_ids")),
        "{case}: positions"
    );
    assert_eq!(
        positions.delta,
        g.ids(&key("rope_deltas"))[0],
        "{case}: rope delta"
    );

    // The vision tower alone, on the first item.
    for (modality, name) in [
        (Modality::Image, "image_embeds"),
        (Modality::Video, "video_embeds"),
    ] {
        if !g.has(&key(name)) {
            continue;
        }
        let (_, tensors) = inputs
            .mapped
            .iter()
            .find(|(m, _)| *m == modality)
            .expect("mapped");
        let features = c
            .entry
            .embed(c.model.as_ref(), modality, tensors.shallow_clone())
            .expect("embeds");
        let expected = g.get(&key(name));
        let scale = expected.abs().max().double_value(&[]);
        let error = max_relative_error(&features[0], expected, scale);
        assert!(error <= 1e-5, "{case}: {name} relative error {error:e}");
    }

    // Prefill logits at every position of the prompt.
    let embeds = embed_prompt(c.entry, c.model.as_ref(), inputs).expect("embeds");
    let logits = prefill_logits_at(c.model.as_ref(), &embeds, Some(&positions)).expect("prefill");
    let scale = g.get(&key("logits_max")).abs().max().double_value(&[]);
    let at_cols = logits.index_select(1, g.get(&key("logit_cols")));
    for (what, actual, expected) in [
        (
            "logits at the golden's columns",
            at_cols,
            g.get(&key("logits_at_cols")),
        ),
        (
            "log-sum-exp",
            logits.logsumexp([-1], false),
            g.get(&key("logits_lse")),
        ),
        (
            "max logit",
            logits.amax([-1], false),
            g.get(&key("logits_max")),
        ),
    ] {
        let error = max_relative_error(&actual, expected, scale);
        assert!(
            error <= 1e-5,
            "{case}: {what}: relative error {error:e} > 1e-5"
        );
    }
    assert_eq!(
        Vec::<i64>::try_from(logits.argmax(-1, false)).expect("argmax"),
        g.ids(&key("logits_argmax")),
        "{case}: argmax at some position"
    );

    // 20 greedy tokens, EOS not stopping (as HF's golden was made).
    let params = SamplingParams {
        max_tokens: 20,
        ..SamplingParams::default()
    };
    let generated =
        generate(c.entry, c.model.as_ref(), prepared(c, case), &params).expect("generates");
    let generated: Vec<i64> = generated.token_ids.iter().map(|&t| t as i64).collect();
    assert_eq!(generated, g.ids(&key("generated")), "{case}: greedy tokens");
}

#[test]
fn qwen2_vl_matches_hf_on_every_case() {
    let c = checkpoint("qwen2-vl-tiny");
    for case in CASES {
        check_case(&c, case);
    }
}

#[test]
fn qwen2_5_vl_matches_hf_on_every_case() {
    let c = checkpoint("qwen2_5-vl-tiny");
    for case in CASES {
        check_case(&c, case);
    }
}

/// Every case in one engine batch (twice, so that steps mix prefills of different modalities and
/// decodes of sequences with different M-RoPE offsets): HF's 20 greedy tokens for each. `options` picks
/// the engine's paths: packed steps, fixed-shape steps (what CUDA graphs replay, run uncaptured on the
/// CPU), a KV cache small enough to preempt.
fn engine_batch(name: &str, options: EngineOptions) -> usize {
    let c = checkpoint(name);
    let engine = Engine::new(&c.dir, options).expect("engine");
    let requests: Vec<Request> = CASES
        .iter()
        .chain(CASES.iter().rev())
        .map(|case| {
            let meta = &c.meta["cases"][case];
            let (prompt, images, videos) = case_inputs(&c.dir, meta);
            Request {
                prompt: Prompt::Text(prompt),
                images: images.into_iter().map(ImageSource::Path).collect(),
                videos: videos
                    .into_iter()
                    .map(|frames| frames.into_iter().map(ImageSource::Path).collect())
                    .collect(),
                params: SamplingParams {
                    max_tokens: 20,
                    ..SamplingParams::default()
                },
            }
        })
        .collect();
    let cases: Vec<&str> = CASES.iter().chain(CASES.iter().rev()).copied().collect();
    for (case, result) in cases.iter().zip(engine.generate(requests)) {
        // The engine's requests carry no frame rate: Qwen2.5-VL's `video` golden was made at 1 fps.
        if name.starts_with("qwen2_5") && case_fps(&c.meta["cases"][case]).is_some() {
            continue;
        }
        let tokens: Vec<i64> = result
            .expect("completes")
            .token_ids
            .iter()
            .map(|&t| t as i64)
            .collect();
        assert_eq!(
            tokens,
            c.golden.ids(&format!("{case}.generated")),
            "{name} {case}: engine tokens"
        );
    }
    engine
        .counters()
        .preemptions
        .load(std::sync::atomic::Ordering::SeqCst)
}

fn packed() -> EngineOptions {
    EngineOptions {
        max_model_len: Some(512),
        max_num_batched_tokens: 512,
        cuda_graphs: Some(false),
        ..EngineOptions::default()
    }
}

/// Decode steps and lone prefills in the fixed shapes CUDA graphs capture (M-RoPE rows packed into the
/// step's buffer), and a KV cache of 160 tokens for ten sequences of up to 95: sequences are preempted
/// and recomputed, their positions with them.
fn fixed_shapes_and_preemption() -> EngineOptions {
    EngineOptions {
        max_model_len: Some(128),
        max_num_batched_tokens: 128,
        cuda_graphs: Some(true),
        // 10 blocks of 16 tokens at 192 bytes a token (3 layers × keys and values × 1 head × 8 × f32).
        cpu_kv_cache_bytes: 10 * 16 * 192,
        // Each step's tokens read before the next is issued (the async test below issues it first).
        async_scheduling: false,
        ..EngineOptions::default()
    }
}

#[test]
fn qwen2_vl_through_the_engine_in_one_batch() {
    engine_batch("qwen2-vl-tiny", packed());
}

#[test]
fn qwen2_5_vl_through_the_engine_in_one_batch() {
    engine_batch("qwen2_5-vl-tiny", packed());
}

#[test]
fn qwen2_vl_through_fixed_shape_steps_and_preemption() {
    let preempted = engine_batch("qwen2-vl-tiny", fixed_shapes_and_preemption());
    assert!(preempted > 0, "the small cache preempted no sequence");
}

/// The same with async scheduling: each greedy decode step is issued before the previous one's tokens
/// are read, its M-RoPE positions planned from lengths alone.
#[test]
fn qwen2_vl_through_fixed_shape_steps_with_async_scheduling() {
    let options = EngineOptions {
        async_scheduling: true,
        ..fixed_shapes_and_preemption()
    };
    engine_batch("qwen2-vl-tiny", options);
}

/// The placeholder count of every size in HF's sweep (8637 sizes, each side 1..2000, aspect ratios up to
/// and past 200) under the default and a non-default `min_pixels`/`max_pixels` from
/// preprocessor_config.json equals HF's, and the sizes HF refuses are refused, naming the limit.
#[test]
fn qwen2_vl_token_counts_equal_hf_on_a_size_sweep() {
    let sweep: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("qwen2-vl-processor/token_counts.json")).expect("sweep"),
    )
    .expect("json");
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("qwen2-vl-tiny/config.json")).expect("config"),
    )
    .expect("json");
    let column = |v: &Value| -> Vec<Option<u64>> {
        v.as_array()
            .expect("array")
            .iter()
            .map(Value::as_u64)
            .collect()
    };
    let (widths, heights) = (
        column(&sweep["sizes"]["width"]),
        column(&sweep["sizes"]["height"]),
    );
    assert!(widths.len() >= 5000, "{} sizes", widths.len());
    for (name, setting) in sweep["settings"].as_object().expect("settings") {
        let processor = serde_json::json!({
            "min_pixels": setting["min_pixels"],
            "max_pixels": setting["max_pixels"],
            "patch_size": 14,
            "merge_size": 2,
            "temporal_patch_size": 2,
            "image_processor_type": "Qwen2VLImageProcessor",
        });
        let ctx = ModelContext::from_json(config.clone(), processor);
        let (grid_h, grid_w) = (column(&setting["grid_h"]), column(&setting["grid_w"]));
        let mut refused = 0;
        for i in 0..widths.len() {
            let size = mmreg_core::ImageSize {
                width: widths[i].expect("width") as u32,
                height: heights[i].expect("height") as u32,
            };
            let ours =
                <mmreg_models::Qwen2Vl as mmreg_core::SupportsVision>::num_image_tokens(&ctx, size);
            match (grid_h[i], grid_w[i]) {
                (Some(h), Some(w)) => assert_eq!(
                    ours.as_ref().ok().copied(),
                    Some((h * w / 4) as usize),
                    "{name}: {}x{}: {ours:?}",
                    size.width,
                    size.height
                ),
                _ => {
                    let error = ours.expect_err("HF refuses this size").to_string();
                    assert!(error.contains("200"), "{name}: {error}");
                    refused += 1;
                }
            }
        }
        assert_eq!(
            refused,
            setting["num_errors"].as_u64().expect("count") as usize
        );
    }
}
