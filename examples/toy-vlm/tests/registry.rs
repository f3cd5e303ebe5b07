//! The toy model, defined outside mmreg-models, is found and run through the registry.

mod support;

use mmreg_core::{
    ImageInput, LoadOptions, Modality, ModelContext, MultiModalData, MultiModalModel,
    ProcessorInputs, Prompt, Registry, SupportsVision, Weights,
};
use mmreg_engine::generate::{embed_prompt, generate, prepare};
use mmreg_engine::SamplingParams;
use tch::Tensor;
use toy_vlm::ToyVlm;

fn checkpoint() -> (tempfile::TempDir, ModelContext, Weights) {
    let dir = tempfile::tempdir().expect("temp dir");
    support::write_checkpoint(dir.path(), 7).expect("checkpoint");
    let ctx = ModelContext::from_dir(dir.path()).expect("context");
    let weights = Weights::from_dir(dir.path()).expect("weights");
    (dir, ctx, weights)
}

fn solid(r: u8, g: u8, b: u8) -> ImageInput {
    let image = image::RgbImage::from_pixel(12, 10, image::Rgb([r, g, b]));
    ImageInput::new(format!("solid {r},{g},{b}"), image.into())
}

fn inputs(ids: Vec<u32>, images: Vec<ImageInput>) -> ProcessorInputs {
    ProcessorInputs {
        prompt: Prompt::TokenIds(ids),
        multimodal: MultiModalData::with_images(images),
    }
}

#[test]
fn registry_is_valid_and_finds_the_toy_by_architecture() {
    let registry = Registry::global();
    registry.validate().expect("valid registrations");
    let (_dir, ctx, _) = checkpoint();
    let entry = registry.for_context(&ctx).expect("found by config.json architectures");
    assert_eq!(entry.id.name, "ToyVlm");
    assert_eq!(entry.modalities(), vec![Modality::Image]);
    assert_eq!(entry.max_tokens(&ctx, Modality::Image).expect("max tokens"), 8);
    // The cell counts are read as numbers: they stay on the host.
    assert_eq!(entry.host_params(Modality::Image).expect("mapper"), ["cells_per_image"]);
    // Two registrations, and the defaults of the three optional ones, all located in the toy's file.
    let lines: Vec<u32> = entry.listing().iter().map(|l| l.location.line).collect();
    assert_eq!(lines.len(), 5);
    assert_eq!(entry.registrations().len(), 2);
    assert!(entry.listing().iter().all(|l| l.location.file.ends_with("toy-vlm/src/lib.rs")));
}

#[test]
fn generation_through_the_registry_equals_direct_calls() {
    let (_dir, ctx, weights) = checkpoint();
    let entry = Registry::global().for_context(&ctx).expect("registered");
    let model = entry.load(&ctx, &weights, &LoadOptions::default()).expect("loads");
    let request = || inputs(vec![3, 15, 4, 15, 5], vec![solid(255, 0, 0), solid(0, 0, 255)]);
    let params = SamplingParams { max_tokens: 6, ..SamplingParams::default() };

    let prepared = prepare(entry, &ctx, request(), 256).expect("prepared");
    assert_eq!(prepared.processed.token_ids.len(), 3 + 2 * 4);
    let through_registry = generate(entry, model.as_ref(), prepared, &params).expect("generates");
    assert_eq!(through_registry.token_ids.len(), 6);

    // The same prefill by hand, without the registry's glue: embed text, overwrite the two image
    // spans with the model's own image features, run the decoder.
    let toy = model.as_any().downcast_ref::<ToyVlm>().expect("a ToyVlm");
    let prepared = prepare(entry, &ctx, request(), 256).expect("prepared");
    let embeds = embed_prompt(entry, model.as_ref(), prepared).expect("embeds");
    let ids = Tensor::from_slice(&[3i64, 15, 15, 15, 15, 4, 15, 15, 15, 15, 5]);
    let text = toy.embed_tokens(&ids).expect("embeds");
    let pixels = toy_vlm::ToyImageInputs {
        cells: Tensor::from_slice(&[1f32, 0., 0., 1., 0., 0., 1., 0., 0., 1., 0., 0.])
            .reshape([4, 3]),
        cells_per_image: Tensor::from_slice(&[4i64]),
    };
    let red = toy.embed_images(pixels).expect("features").remove(0);
    assert!(embeds.narrow(0, 1, 4).allclose(&red, 1e-6, 1e-6, false));
    assert!(embeds.narrow(0, 0, 1).allclose(&text.narrow(0, 0, 1), 0.0, 0.0, false));
}

#[test]
fn placeholder_mismatch_names_both_counts() {
    let (_dir, ctx, _) = checkpoint();
    let entry = Registry::global().for_context(&ctx).expect("registered");
    let error = entry
        .process(&ctx, inputs(vec![15, 1], vec![solid(1, 2, 3), solid(4, 5, 6)]))
        .expect_err("mismatch");
    assert_eq!(
        error.to_string(),
        "the prompt has 1 `token 15` placeholder(s) but 2 image item(s) were given"
    );
}

#[test]
fn self_check_passes_with_and_without_weights() {
    let (_dir, ctx, weights) = checkpoint();
    let entry = Registry::global().for_context(&ctx).expect("registered");
    let model = entry.load(&ctx, &weights, &LoadOptions::default()).expect("loads");
    let report =
        mmreg_core::check::check_model(entry, &ctx, 32, Some(model.as_ref())).expect("consistent");
    assert_eq!(report.prompt_tokens, 32);
    assert_eq!(report.modalities[0].dummy_item_tokens, vec![8]);
    let mapped = vec![("cells".to_owned(), vec![8, 3]), ("cells_per_image".to_owned(), vec![1])];
    assert_eq!(report.modalities[0].mapped, mapped);
    mmreg_core::check::check_model(entry, &ctx, 32, None).expect("consistent without weights");
}

#[test]
fn image_token_counts_follow_the_aspect_ratio() {
    let (_dir, ctx, weights) = checkpoint();
    let entry = Registry::global().for_context(&ctx).expect("registered");
    let wide = ImageInput::new("wide", image::RgbImage::new(40, 10).into());
    let tall = ImageInput::new("tall", image::RgbImage::new(10, 40).into());
    let prepared =
        prepare(entry, &ctx, inputs(vec![15, 2, 15], vec![wide, tall]), 256).expect("prepared");
    assert_eq!(prepared.processed.placeholder_lengths(Modality::Image), vec![8, 2]);
    assert_eq!(prepared.processed.token_ids.len(), 8 + 1 + 2);
    let model = entry.load(&ctx, &weights, &LoadOptions::default()).expect("loads");
    let rows: Vec<i64> = embed_rows(entry, model.as_ref(), prepared);
    assert_eq!(rows, vec![8, 2]);
}

fn embed_rows(
    entry: &mmreg_core::registry::ModelEntry,
    model: &dyn MultiModalModel,
    prepared: mmreg_engine::generate::PreparedInputs,
) -> Vec<i64> {
    let (modality, mapped) = prepared.mapped.into_iter().next().expect("mapped images");
    let features = entry.embed(model, modality, mapped).expect("embeds");
    features.iter().map(|f| f.size()[0]).collect()
}
