//! `mmreg check` on the tiny Qwen2-VL and Qwen2.5-VL checkpoints: the registrations, the default dummy
//! data (the costliest image and the costliest video), the input processor, the input mappers and the
//! loaded model's embedding rows all agree.

mod support;

use mmreg_core::check::{check_model, ModalityReport};
use mmreg_core::{LoadOptions, Modality, ModelContext, Registry, Weights};
use mmreg_models as _;
use support::fixture;

/// With the tiny checkpoints' max_pixels 12544, the costliest image is not a 16-token square but a
/// 1:200 strip: HF's smart_resize takes 15x3000 px to 28x1568 (2x112 patches, 56 tokens). A video may
/// have `max_frames` 768 such frames: 384 temporal patches, 21504 tokens.
const IMAGE_TOKENS: usize = 56;
const VIDEO_TOKENS: usize = 384 * IMAGE_TOKENS;

fn check(name: &str, architecture: &str) {
    let dir = fixture(name);
    let ctx = ModelContext::from_dir(&dir).expect("context");
    let entry = Registry::global().for_context(&ctx).expect("registered");
    assert_eq!(entry.architectures(), [architecture]);
    assert_eq!(entry.modalities(), [Modality::Image, Modality::Video]);
    let model = entry
        .load(
            &ctx,
            &Weights::from_dir(&dir).expect("weights"),
            &LoadOptions::default(),
        )
        .expect("loads");
    let seq_len = IMAGE_TOKENS + VIDEO_TOKENS + 40;
    let report = check_model(entry, &ctx, seq_len, Some(model.as_ref()))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(report.seq_len, seq_len);
    assert_eq!(report.prompt_tokens, seq_len, "the filler fills the prompt");
    let shapes = |list: &[(&str, Vec<i64>)]| -> Vec<(String, Vec<i64>)> {
        list.iter()
            .map(|(n, s)| (n.to_string(), s.clone()))
            .collect()
    };
    assert_eq!(
        report.modalities,
        [
            ModalityReport {
                modality: Modality::Image,
                max_tokens: IMAGE_TOKENS,
                dummy_item_tokens: vec![IMAGE_TOKENS],
                mapped: shapes(&[
                    ("image_grid_thw", vec![1, 3]),
                    ("pixel_values", vec![224, 1176]),
                ]),
            },
            ModalityReport {
                modality: Modality::Video,
                max_tokens: VIDEO_TOKENS,
                dummy_item_tokens: vec![VIDEO_TOKENS],
                mapped: shapes(&[
                    ("pixel_values_videos", vec![4 * VIDEO_TOKENS as i64, 1176]),
                    ("video_grid_thw", vec![1, 3]),
                ]),
            },
        ],
        "{name}"
    );
    // A sequence too short for the costliest video leaves it out of the dummy data: the check says so.
    let error = check_model(entry, &ctx, seq_len - 41, None)
        .expect_err("the video does not fit")
        .to_string();
    assert_eq!(
        error,
        format!(
            "{}: dummy data has items {{Image: 1}} but {{Image: 1, Video: 1}} were asked for",
            entry.id.path
        )
    );
}

#[test]
fn check_passes_on_the_tiny_qwen2_vl() {
    check("qwen2-vl-tiny", "Qwen2VLForConditionalGeneration");
}

#[test]
fn check_passes_on_the_tiny_qwen2_5_vl() {
    check("qwen2_5-vl-tiny", "Qwen2_5_VLForConditionalGeneration");
}
