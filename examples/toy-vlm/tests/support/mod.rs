//! Shared by the toy's tests: a seeded random checkpoint, and variants of the toy registered under other
//! names in a few lines.
#![allow(dead_code)] // each test file uses a part of it

use mmreg_core::{Error, Result};
use tch::{Device, Kind, Tensor};

/// Writes a toy checkpoint with seeded random weights (config.json and model.safetensors).
pub fn write_checkpoint(dir: &std::path::Path, seed: i64) -> Result<()> {
    let config = serde_json::json!({
        "architectures": ["ToyVlmForCausalLM"],
        "vocab_size": 16,
        "hidden_size": 8,
        "image_token_id": 15,
        "grid": 2,
    });
    std::fs::write(dir.join("config.json"), config.to_string())
        .map_err(|e| Error::Other(e.into()))?;
    tch::manual_seed(seed);
    let random = |shape: [i64; 2]| Tensor::randn(shape, (Kind::Float, Device::Cpu));
    let tensors = [
        ("embed_tokens.weight", random([16, 8])),
        ("cell_proj.weight", random([8, 3])),
        ("lm_head.weight", random([16, 8])),
    ];
    Tensor::write_safetensors(&tensors, dir.join("model.safetensors"))?;
    Ok(())
}

/// Implements the model traits for a newtype around [`toy_vlm::ToyVlm`] by delegation, so that a test
/// registers a variant of the toy (other dummy data, a wrong processor) in a few lines.
#[macro_export]
macro_rules! toy_newtype {
    ($name:ident) => {
        impl mmreg_core::LoadModel for $name {
            fn load(
                ctx: &mmreg_core::ModelContext,
                weights: &mmreg_core::Weights,
                options: &mmreg_core::LoadOptions,
            ) -> mmreg_core::Result<Self> {
                <toy_vlm::ToyVlm as mmreg_core::LoadModel>::load(ctx, weights, options).map($name)
            }
        }

        impl mmreg_core::SupportsVision for $name {
            type ImageInputs = toy_vlm::ToyImageInputs;
            fn num_image_tokens(
                ctx: &mmreg_core::ModelContext,
                size: mmreg_core::ImageSize,
            ) -> mmreg_core::Result<usize> {
                <toy_vlm::ToyVlm as mmreg_core::SupportsVision>::num_image_tokens(ctx, size)
            }
            fn image_token_id(ctx: &mmreg_core::ModelContext) -> mmreg_core::Result<u32> {
                <toy_vlm::ToyVlm as mmreg_core::SupportsVision>::image_token_id(ctx)
            }
            fn largest_image(
                ctx: &mmreg_core::ModelContext,
            ) -> mmreg_core::Result<mmreg_core::ImageSize> {
                <toy_vlm::ToyVlm as mmreg_core::SupportsVision>::largest_image(ctx)
            }
            fn embed_images(
                &self,
                inputs: toy_vlm::ToyImageInputs,
            ) -> mmreg_core::Result<Vec<tch::Tensor>> {
                self.0.embed_images(inputs)
            }
        }

        impl mmreg_core::MultiModalModel for $name {
            fn language_model(&self) -> &dyn mmreg_core::LanguageModel {
                self.0.language_model()
            }
        }
    };
}

/// The toy's own registry entry, whose defaults (input processor, dummy data) a variant builds on.
pub fn toy_entry() -> &'static mmreg_core::registry::ModelEntry {
    mmreg_core::Registry::global()
        .by_architecture("ToyVlmForCausalLM")
        .expect("the toy is registered")
}

/// A checkpoint's context, registry entry and model.
pub fn load(
    dir: &std::path::Path,
) -> (
    mmreg_core::ModelContext,
    &'static mmreg_core::registry::ModelEntry,
    Box<dyn mmreg_core::MultiModalModel>,
) {
    let ctx = mmreg_core::ModelContext::from_dir(dir).expect("context");
    let entry = mmreg_core::Registry::global().for_context(&ctx).expect("registered");
    let weights = mmreg_core::Weights::from_dir(dir).expect("weights");
    let model = entry.load(&ctx, &weights, &mmreg_core::LoadOptions::default()).expect("loads");
    (ctx, entry, model)
}

/// The toy's prefill logits written out densely, for the attention tests: one head whose queries, keys
/// and values are the embeddings `[len, hidden]`, the keys each query may see given by `allowed`
/// (`[len, len]`, bool), the residual, then `lm_head` read from the checkpoint in `dir`.
pub fn dense_toy_logits(dir: &std::path::Path, embeds: &Tensor, allowed: &Tensor) -> Tensor {
    let hidden = embeds.size()[1] as f64;
    let scores = embeds
        .matmul(&embeds.transpose(0, 1))
        .f_div_scalar(hidden.sqrt())
        .expect("scale")
        .masked_fill(&allowed.logical_not(), f64::NEG_INFINITY);
    let attended = scores.softmax(-1, Kind::Float).matmul(embeds);
    let weights = Tensor::read_safetensors(dir.join("model.safetensors")).expect("weights");
    let lm_head = &weights.iter().find(|(k, _)| k == "lm_head.weight").expect("lm_head").1;
    (attended + embeds).matmul(&lm_head.transpose(0, 1))
}
