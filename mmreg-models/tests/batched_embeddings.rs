//! A step's prefills embed their images together (`embed_prompts`): the same embeddings as prompt by
//! prompt, for LLaVA-1.5 (fixed-size pixel values) and LLaVA-NeXT (patch counts that differ per image,
//! padded to join), whatever the grouping limit.

use std::path::Path;

use mmreg_core::{
    ImageInput, LoadOptions, ModelContext, MultiModalData, ProcessorInputs, Prompt, Registry,
    Weights,
};
use mmreg_engine::generate::{embed_prompt, embed_prompts, prepare, PreparedInputs};
use mmreg_models as _;

mod support;
use support::fixture;

fn check(dir: &Path, prompts: &[(&str, &[&str])]) {
    let ctx = ModelContext::from_dir(dir).expect("context");
    let entry = Registry::global().for_context(&ctx).expect("registered");
    let weights = Weights::from_dir(dir).expect("weights");
    let model = entry
        .load(&ctx, &weights, &LoadOptions::default())
        .expect("loads");
    let prepared = || -> Vec<PreparedInputs> {
        prompts
            .iter()
            .map(|(text, images)| {
                let images = images
                    .iter()
                    .map(|name| ImageInput::open(dir.join("images").join(name)).expect("image"))
                    .collect();
                let inputs = ProcessorInputs {
                    prompt: Prompt::Text(text.to_string()),
                    multimodal: MultiModalData::with_images(images),
                };
                prepare(entry, &ctx, inputs, usize::MAX).expect("prepared")
            })
            .collect()
    };
    let alone: Vec<_> = prepared()
        .into_iter()
        .map(|p| embed_prompt(entry, model.as_ref(), p).expect("embeds"))
        .collect();
    let _guard = tch::no_grad_guard();
    for max_items in [1, 2, 3, 16] {
        let together = embed_prompts(entry, model.as_ref(), prepared(), max_items).expect("embeds");
        assert_eq!(together.len(), alone.len());
        for (i, (a, b)) in together.iter().zip(&alone).enumerate() {
            assert_eq!(a.size(), b.size(), "prompt {i}, max_items {max_items}");
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(
                diff <= 1e-5,
                "prompt {i}, max_items {max_items}: max difference {diff}"
            );
        }
    }
}

#[test]
fn llava_prompts_embedded_together_equal_each_alone() {
    let dir = fixture("llava-tiny-real");
    check(
        &dir,
        &[
            ("USER: <image>\nWhat is it? ASSISTANT:", &["a_300x200.png"]),
            ("USER: Hello, no image. ASSISTANT:", &[]),
            (
                "USER: <image>\n<image>\nWhat differs? ASSISTANT:",
                &["b_480x640.png", "a_300x200.png"],
            ),
            ("USER: <image>\nAnd this? ASSISTANT:", &["b_480x640.png"]),
        ],
    );
}

#[test]
fn llava_next_prompts_with_different_patch_counts_embedded_together_equal_each_alone() {
    let dir = fixture("llava-next-tiny-real");
    let prompt = "[INST] <image>\nWhat is shown in this image? [/INST]";
    check(
        &dir,
        &[
            (prompt, &["portrait_500x316.png"]),
            (prompt, &["tiny_10x7.png"]),
            (prompt, &["landscape_480x640.png"]),
        ],
    );
}
