//! Qwen2-VL and Qwen2.5-VL on bad or unusual input, as HF's processor treats it: aspect ratios over 200
//! are refused (exactly 200 passes), tiny images are scaled up to HF's grids, odd frame counts are
//! padded with the last frame, and frames of different sizes, empty videos, over-long prompts and
//! placeholders without items (or items without placeholders) are clear errors; through `prepare` and
//! through the engine, where each bad request fails alone and the others in its batch complete.

mod support;

use std::sync::OnceLock;

use image::DynamicImage;
use mmreg_core::prepare::{prepare, PreparedInputs};
use mmreg_core::registry::ModelEntry;
use mmreg_core::{
    Error, ImageInput, Modality, ModelContext, MultiModalData, ProcessorInputs, Prompt, Registry,
    Result, VideoInput,
};
use mmreg_engine::{Engine, EngineOptions, ImageSource, Request, SamplingParams};
use mmreg_models as _;
use serde_json::Value;
use support::fixture;
use tch::Tensor;

const CHECKPOINTS: [&str; 2] = ["qwen2-vl-tiny", "qwen2_5-vl-tiny"];
const IMAGE: &str = "<|vision_start|><|image_pad|><|vision_end|>";
const VIDEO: &str = "<|vision_start|><|video_pad|><|vision_end|>";
/// The fixture clip's frames are 112x84: grid [·, 6, 8], 12 tokens per temporal patch.
const FRAME_TOKENS: usize = 12;

/// Qwen's chat text for one user turn.
fn chat(content: &str) -> String {
    format!("<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n")
}

/// The checkpoint's context (its tokenizer takes a while to parse in a debug build: once per process).
fn context(name: &str) -> (&'static ModelContext, &'static ModelEntry) {
    static CONTEXTS: OnceLock<Vec<(&str, ModelContext)>> = OnceLock::new();
    let contexts = CONTEXTS.get_or_init(|| {
        CHECKPOINTS
            .iter()
            .map(|&n| (n, ModelContext::from_dir(fixture(n)).expect("context")))
            .collect()
    });
    let (_, ctx) = contexts
        .iter()
        .find(|(n, _)| *n == name)
        .expect("a fixture");
    let entry = Registry::global().for_context(ctx).expect("registered");
    (ctx, entry)
}

/// Frame `i` (0..4) of the fixture clip.
fn frame(i: usize) -> DynamicImage {
    let path = fixture(&format!("qwen2-vl-tiny/images/clip_f{i}_w112_h84.png"));
    ImageInput::open(path).expect("frame").image
}

fn blank(width: u32, height: u32) -> DynamicImage {
    DynamicImage::new_rgb8(width, height)
}

fn run(
    name: &str,
    prompt: &str,
    images: Vec<DynamicImage>,
    videos: Vec<VideoInput>,
    max_len: usize,
) -> Result<PreparedInputs> {
    let (ctx, entry) = context(name);
    let images = images
        .into_iter()
        .enumerate()
        .map(|(i, image)| ImageInput::new(format!("image {i}"), image))
        .collect();
    let inputs = ProcessorInputs {
        prompt: Prompt::Text(prompt.into()),
        multimodal: MultiModalData { images, videos },
    };
    prepare(entry, ctx, inputs, max_len)
}

fn error(result: Result<PreparedInputs>) -> Error {
    match result {
        Ok(prepared) => panic!("accepted: {} tokens", prepared.processed.token_ids.len()),
        Err(error) => error,
    }
}

/// The mapped tensor `name` of `modality`.
fn mapped<'a>(prepared: &'a PreparedInputs, modality: Modality, name: &str) -> &'a Tensor {
    let (_, tensors) = prepared
        .mapped
        .iter()
        .find(|(m, _)| *m == modality)
        .unwrap_or_else(|| panic!("no {modality} inputs"));
    tensors
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no {name}"))
        .1
}

fn grid(prepared: &PreparedInputs, modality: Modality) -> Vec<i64> {
    let name = match modality {
        Modality::Image => "image_grid_thw",
        Modality::Video => "video_grid_thw",
    };
    Vec::<i64>::try_from(mapped(prepared, modality, name).flatten(0, -1)).expect("grid")
}

/// HF's sweep (`fixtures/qwen2-vl-processor/token_counts.json`) under its `default` setting: for a
/// (width, height), `Ok([grid_h, grid_w])` or `Err(HF's message)`.
fn hf_default(width: u64, height: u64) -> std::result::Result<[u64; 2], String> {
    static SWEEP: OnceLock<Value> = OnceLock::new();
    let sweep = SWEEP.get_or_init(|| {
        let path = fixture("qwen2-vl-processor/token_counts.json");
        serde_json::from_str(&std::fs::read_to_string(path).expect("sweep")).expect("json")
    });
    let sizes = &sweep["sizes"];
    let i = (0..sizes["width"].as_array().expect("widths").len())
        .find(|&i| sizes["width"][i] == width && sizes["height"][i] == height)
        .unwrap_or_else(|| panic!("{width}x{height} is not in HF's sweep"));
    let setting = &sweep["settings"]["default"];
    assert_eq!(
        setting["min_pixels"], 3136,
        "the tiny checkpoints' min_pixels"
    );
    match (setting["grid_h"][i].as_u64(), setting["grid_w"][i].as_u64()) {
        (Some(h), Some(w)) => Ok([h, w]),
        _ => Err(setting["errors"][i.to_string()]
            .as_str()
            .expect("HF's error")
            .to_owned()),
    }
}

#[test]
fn an_aspect_ratio_over_200_is_refused_as_hf_refuses_it() {
    for name in CHECKPOINTS {
        for (width, height) in [(1000, 4), (4, 1000), (201, 1), (3, 601)] {
            let hf = hf_default(width, height).expect_err("HF refuses it");
            let prompt = chat(&format!("{IMAGE}Describe this image."));
            let images = vec![blank(width as u32, height as u32)];
            match error(run(name, &prompt, images, vec![], usize::MAX)) {
                Error::BadInput { input, reason } => {
                    assert_eq!(input, "image", "{name} {width}x{height}");
                    assert_eq!(reason, format!("image is {width}x{height}: {hf}"));
                }
                other => panic!("{name} {width}x{height}: {other}"),
            }
        }
        let message = error(run(
            name,
            &chat(IMAGE),
            vec![blank(1000, 4)],
            vec![],
            usize::MAX,
        ))
        .to_string();
        assert_eq!(
            message,
            "image: image is 1000x4: absolute aspect ratio must be smaller than 200, got 250.0"
        );
    }
}

/// The check is `max / min > 200`, so 200 itself passes, at HF's grid: the min_pixels branch, which
/// here overshoots even the tiny checkpoints' max_pixels (28x812 px).
#[test]
fn an_aspect_ratio_of_exactly_200_is_accepted() {
    for (width, height) in [(200, 1), (1, 200), (2, 400)] {
        let [h, w] = hf_default(width, height).expect("HF accepts it");
        let prompt = chat(IMAGE);
        let prepared = run(
            "qwen2-vl-tiny",
            &prompt,
            vec![blank(width as u32, height as u32)],
            vec![],
            usize::MAX,
        )
        .expect("accepted");
        assert_eq!(grid(&prepared, Modality::Image), [1, h as i64, w as i64]);
        assert_eq!(
            prepared.processed.placeholder_lengths(Modality::Image),
            [(h * w / 4) as usize]
        );
    }
}

/// HF's `smart_resize` rounds each side to a multiple of 28 and takes the max_pixels branch only when
/// that product exceeds max_pixels: for these sizes it is at most 28x28, under both the sweep's
/// default max (1003520) and the tiny checkpoints' (12544), so the sweep's grids hold for them.
#[test]
fn tiny_images_are_scaled_up_to_hfs_grids() {
    for name in CHECKPOINTS {
        for (width, height) in [(1, 1), (5, 7), (7, 5), (13, 13), (2, 1), (1, 3)] {
            let rounded = |side: u64| (side as f64 / 28.0).round_ties_even() * 28.0;
            assert!(rounded(width) * rounded(height) <= 12544.0);
            let [h, w] = hf_default(width, height).expect("HF accepts it");
            let prompt = chat(&format!("{IMAGE}Describe this image."));
            let image = vec![blank(width as u32, height as u32)];
            let prepared = run(name, &prompt, image, vec![], usize::MAX).expect("accepted");
            assert_eq!(
                grid(&prepared, Modality::Image),
                [1, h as i64, w as i64],
                "{name} {width}x{height}"
            );
            // At least min_pixels = 56x56 px and 28 px a side, in patches of 14x14.
            assert!(h >= 2 && w >= 2 && h * w * 196 >= 3136, "{width}x{height}");
            let rows = mapped(&prepared, Modality::Image, "pixel_values").size();
            assert_eq!(rows, [(h * w) as i64, 3 * 2 * 14 * 14]);
            assert_eq!(
                prepared.processed.placeholder_lengths(Modality::Image),
                [(h * w / 4) as usize]
            );
        }
    }
}

/// HF's `patchify` repeats the last frame up to a multiple of `temporal_patch_size`: 3 frames are
/// processed as f0 f1 f2 f2 (grid_t 2) and 1 frame as f0 f0 (grid_t 1).
#[test]
fn odd_frame_counts_are_padded_with_the_last_frame() {
    let video =
        |frames: &[usize]| VideoInput::new("clip", frames.iter().map(|&i| frame(i)).collect());
    let prompt = chat(&format!("{VIDEO}What happens?"));
    for name in CHECKPOINTS {
        for (frames, padded, grid_t) in [(&[0, 1, 2][..], &[0, 1, 2, 2][..], 2), (&[0], &[0, 0], 1)]
        {
            let prepare_video =
                |f: &[usize]| run(name, &prompt, vec![], vec![video(f)], usize::MAX);
            let odd = prepare_video(frames).expect("accepted");
            let even = prepare_video(padded).expect("accepted");
            assert_eq!(
                grid(&odd, Modality::Video),
                [grid_t, 6, 8],
                "{name} {frames:?}"
            );
            assert_eq!(
                odd.processed.placeholder_lengths(Modality::Video),
                [grid_t as usize * FRAME_TOKENS]
            );
            let pixels = |p: &PreparedInputs| {
                mapped(p, Modality::Video, "pixel_values_videos").shallow_clone()
            };
            assert!(
                pixels(&odd).equal(&pixels(&even)),
                "{name}: {frames:?} is not processed as {padded:?}"
            );
        }
    }
}

#[test]
fn frames_of_different_sizes_are_refused_naming_both_sizes() {
    let prompt = chat(&format!("{VIDEO}What happens?"));
    for name in CHECKPOINTS {
        let clip = VideoInput::new("clip", vec![frame(0), frame(1), blank(56, 56)]);
        let message = error(run(name, &prompt, vec![], vec![clip], usize::MAX)).to_string();
        assert_eq!(
            message,
            "clip: every frame of a video must have one size: 112x84 and 56x56"
        );
    }
}

#[test]
fn a_video_without_frames_is_refused() {
    let prompt = chat(&format!("{VIDEO}What happens?"));
    for name in CHECKPOINTS {
        let empty = VideoInput::new("empty clip", Vec::new());
        let message = error(run(name, &prompt, vec![], vec![empty], usize::MAX)).to_string();
        assert_eq!(message, "empty clip: a video needs at least one frame");
    }
}

#[test]
fn an_item_past_the_length_limit_makes_the_prompt_too_long() {
    let image = || ImageInput::open(fixture("qwen2-vl-tiny/images/a_w300_h200.png")).expect("A");
    let twelve_frames = || VideoInput::new("clip", (0..12).map(|i| frame(i % 4)).collect());
    for name in CHECKPOINTS {
        let (ctx, _) = context(name);
        let text_tokens = |prompt: &str| {
            ctx.tokenizer()
                .expect("tokenizer")
                .encode(prompt, true)
                .expect("encodes")
                .len()
        };
        // Image A: grid [1, 6, 8], 12 tokens. Twelve frames: grid [6, 6, 8], 72 tokens.
        let cases = [
            (chat(&format!("{IMAGE}Describe this image.")), 12, true),
            (chat(&format!("{VIDEO}What happens?")), 72, false),
        ];
        for (prompt, item_tokens, is_image) in cases {
            let len = text_tokens(&prompt) - 1 + item_tokens;
            let (images, videos) = if is_image {
                (vec![image().image], vec![])
            } else {
                (vec![], vec![twelve_frames()])
            };
            let fits = run(name, &prompt, images.clone(), videos.clone(), len).expect("fits");
            assert_eq!(fits.processed.token_ids.len(), len);
            let too_long = error(run(name, &prompt, images, videos, len - 1));
            assert!(
                matches!(too_long, Error::PromptTooLong { len: l, max } if l == len && max == len - 1),
                "{name}: {too_long}"
            );
            assert_eq!(
                too_long.to_string(),
                format!(
                    "the prompt is {len} tokens long (after placeholder expansion) but the model allows at most {}",
                    len - 1
                )
            );
        }
    }
}

#[test]
fn placeholders_and_items_must_agree() {
    let image = || vec![blank(112, 84)];
    let clip = || vec![VideoInput::new("clip", vec![frame(0), frame(1)])];
    type Case = (
        String,
        Vec<DynamicImage>,
        Vec<VideoInput>,
        Modality,
        &'static str,
        usize,
        usize,
    );
    let cases: Vec<Case> = vec![
        (
            chat(&format!("{IMAGE}Describe.")),
            vec![],
            vec![],
            Modality::Image,
            "<|image_pad|>",
            1,
            0,
        ),
        (
            chat("Describe."),
            image(),
            vec![],
            Modality::Image,
            "<|image_pad|>",
            0,
            1,
        ),
        (
            chat(&format!("{IMAGE}{IMAGE}Compare.")),
            image(),
            vec![],
            Modality::Image,
            "<|image_pad|>",
            2,
            1,
        ),
        (
            chat(&format!("{VIDEO}What happens?")),
            vec![],
            vec![],
            Modality::Video,
            "<|video_pad|>",
            1,
            0,
        ),
        (
            chat("What happens?"),
            vec![],
            clip(),
            Modality::Video,
            "<|video_pad|>",
            0,
            1,
        ),
        // A video given where the prompt has an image placeholder.
        (
            chat(&format!("{IMAGE}What happens?")),
            vec![],
            clip(),
            Modality::Image,
            "<|image_pad|>",
            1,
            0,
        ),
    ];
    for name in CHECKPOINTS {
        for (prompt, images, videos, modality, token, found, given) in cases.clone() {
            let error = error(run(name, &prompt, images, videos, usize::MAX));
            match &error {
                Error::PlaceholderMismatch {
                    modality: m,
                    marker,
                    placeholders,
                    items,
                } => assert_eq!(
                    (*m, marker.as_str(), *placeholders, *items),
                    (modality, token, found, given),
                    "{name}: {prompt:?}"
                ),
                other => panic!("{name}: {prompt:?}: {other}"),
            }
            assert_eq!(
                error.to_string(),
                format!("the prompt has {found} `{token}` placeholder(s) but {given} {modality} item(s) were given")
            );
        }
    }
}

/// Each bad request of one batch fails alone with its error; the good ones around it give HF's tokens
/// (the goldens' `one_image` and `video` cases), and the unusual but valid ones complete.
#[test]
fn bad_requests_fail_alone_in_an_engine_batch() {
    let dir = fixture("qwen2-vl-tiny");
    let engine = Engine::new(
        &dir,
        EngineOptions {
            max_model_len: Some(96),
            max_num_batched_tokens: 256,
            cpu_kv_cache_bytes: 1 << 20,
            ..EngineOptions::default()
        },
    )
    .expect("engine");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).expect("golden"))
            .expect("json");
    let golden = Tensor::read_safetensors(dir.join("golden.safetensors")).expect("golden");
    let generated = |case: &str| -> Vec<u32> {
        let key = format!("{case}.generated");
        let (_, t) = golden.iter().find(|(k, _)| *k == key).expect("generated");
        Vec::<i64>::try_from(t.flatten(0, -1))
            .expect("ids")
            .into_iter()
            .map(|t| t as u32)
            .collect()
    };
    let case_prompt = |case: &str| {
        meta["cases"][case]["prompt"]
            .as_str()
            .expect("prompt")
            .to_owned()
    };
    let path = |file: &str| ImageSource::Path(dir.join("images").join(file));
    let clip_frame = |i: usize| path(&format!("clip_f{i}_w112_h84.png"));
    let decoded = |image: DynamicImage| ImageSource::Decoded(ImageInput::new("decoded", image));
    let request =
        |prompt: String, images: Vec<ImageSource>, videos: Vec<Vec<ImageSource>>| Request {
            prompt: Prompt::Text(prompt),
            images,
            videos,
            params: SamplingParams {
                max_tokens: 20,
                ..SamplingParams::default()
            },
        };
    let image_prompt = chat(&format!("{IMAGE}Describe this image."));
    let video_prompt = chat(&format!("{VIDEO}What happens?"));
    let requests = vec![
        // 0: HF's one_image case.
        request(
            case_prompt("one_image"),
            vec![path("a_w300_h200.png")],
            vec![],
        ),
        // 1: aspect ratio 250.
        request(image_prompt.clone(), vec![decoded(blank(1000, 4))], vec![]),
        // 2: a 1x1 image, scaled up to 56x56 px: 4 tokens.
        request(image_prompt.clone(), vec![decoded(blank(1, 1))], vec![]),
        // 3: three frames, padded to grid_t 2: 24 tokens.
        request(
            video_prompt.clone(),
            vec![],
            vec![(0..3).map(clip_frame).collect()],
        ),
        // 4: frames of two sizes.
        request(
            video_prompt.clone(),
            vec![],
            vec![vec![clip_frame(0), decoded(blank(56, 56))]],
        ),
        // 5: sixteen frames, 96 tokens: over max_model_len - 1 = 95.
        request(
            video_prompt.clone(),
            vec![],
            vec![(0..16).map(|i| clip_frame(i % 4)).collect()],
        ),
        // 6-8: placeholders and items that disagree.
        request(image_prompt.clone(), vec![], vec![]),
        request(
            chat("Describe this image."),
            vec![path("a_w300_h200.png")],
            vec![],
        ),
        request(video_prompt.clone(), vec![], vec![]),
        // 9: a video without frames.
        request(video_prompt.clone(), vec![], vec![vec![]]),
        // 10: HF's video case.
        request(
            case_prompt("video"),
            vec![],
            vec![(0..4).map(clip_frame).collect()],
        ),
    ];
    let text_tokens = |prompt: &str| {
        engine
            .context()
            .tokenizer()
            .expect("tokenizer")
            .encode(prompt, true)
            .expect("encodes")
            .len()
    };
    let (image_text, video_text) = (
        text_tokens(&image_prompt) - 1,
        text_tokens(&video_prompt) - 1,
    );
    let results = engine.generate(requests);
    let message = |i: usize| match &results[i] {
        Ok(c) => panic!("request {i} completed: {c:?}"),
        Err(e) => e.to_string(),
    };
    assert_eq!(
        message(1),
        "image: image is 1000x4: absolute aspect ratio must be smaller than 200, got 250.0"
    );
    assert_eq!(
        message(4),
        "video #0: every frame of a video must have one size: 112x84 and 56x56"
    );
    assert_eq!(
        message(5),
        format!(
            "the prompt is {} tokens long (after placeholder expansion) but the model allows at most 95",
            video_text + 96
        )
    );
    assert_eq!(
        message(6),
        "the prompt has 1 `<|image_pad|>` placeholder(s) but 0 image item(s) were given"
    );
    assert_eq!(
        message(7),
        "the prompt has 0 `<|image_pad|>` placeholder(s) but 1 image item(s) were given"
    );
    assert_eq!(
        message(8),
        "the prompt has 1 `<|video_pad|>` placeholder(s) but 0 video item(s) were given"
    );
    assert_eq!(message(9), "video #0: a video needs at least one frame");
    let completed = |i: usize| {
        results[i]
            .as_ref()
            .unwrap_or_else(|e| panic!("request {i} failed: {e}"))
    };
    assert_eq!(completed(0).token_ids, generated("one_image"));
    assert_eq!(completed(10).token_ids, generated("video"));
    assert_eq!(completed(2).prompt_tokens, image_text + 4);
    assert_eq!(completed(3).prompt_tokens, video_text + 2 * FRAME_TOKENS);
    for i in [2, 3] {
        assert!(!completed(i).token_ids.is_empty(), "request {i}");
    }
}
