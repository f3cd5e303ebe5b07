//! A registration whose input processor disagrees with the model's token count is caught before any
//! request reaches the model: by `process` on every request and by `mmreg check`.

mod support;

use mmreg_core::check::check_model;
use mmreg_core::{
    register_input_mapper, register_input_processor, register_model, Error, ImageInput,
    ModelContext, MultiModalData, ProcessedInputs, ProcessorInputs, Prompt, Registry, Result,
};

/// The toy model with an input processor that inserts one placeholder per image instead of the model's count.
#[register_model("ToyLiarForCausalLM")]
#[register_input_mapper(image = toy_vlm::map_images)]
#[register_input_processor(one_placeholder_per_image)]
struct ToyLiar(toy_vlm::ToyVlm);

toy_newtype!(ToyLiar);

fn one_placeholder_per_image(
    ctx: &ModelContext,
    inputs: ProcessorInputs,
) -> Result<ProcessedInputs> {
    let mut processed = support::toy_entry().process(ctx, inputs)?;
    for range in &mut processed.placeholders {
        range.length = 1;
    }
    Ok(processed)
}

#[test]
fn inconsistent_counts_are_reported_with_both_numbers() {
    let ctx = ModelContext::from_json(
        serde_json::json!({"architectures": ["ToyLiarForCausalLM"]}),
        serde_json::json!({}),
    );
    let entry = Registry::global().for_context(&ctx).expect("registered");
    let image = ImageInput::new("square", image::RgbImage::new(10, 10).into());
    let inputs = ProcessorInputs {
        prompt: Prompt::TokenIds(vec![15, 1]),
        multimodal: MultiModalData::with_images(vec![image]),
    };
    let error = entry.process(&ctx, inputs).expect_err("inconsistent");
    assert!(matches!(error, Error::TokenCountMismatch { actual: 1, expected: 4, .. }), "{error:?}");
    assert!(
        error.to_string().contains(
            "the input processor's placeholder range has 1 token(s) but the model's count is 4"
        ),
        "{error}"
    );
    let error = check_model(entry, &ctx, 64, None).expect_err("mmreg check fails").to_string();
    assert!(error.contains("ToyLiar") && error.contains("model's count is 8"), "{error}");
}
