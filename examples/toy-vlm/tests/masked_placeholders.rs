//! Placeholder runs that interleave text tokens with embedded ones (`PlaceholderRange::is_embed`, as
//! Idefics3's tiles do): a variant of the toy whose image run puts a plain token after every image token.
//! The registry checks the mask, `mmreg check` counts only the embedded tokens, and the merge writes the
//! image rows at the masked positions and leaves the text tokens' embeddings alone.

mod support;

use std::sync::Arc;

use mmreg_core::defaults::{expand_placeholders, prompt_ids};
use mmreg_core::registry::ModelEntry;
use mmreg_core::{
    register_input_mapper, register_input_processor, register_model, ImageInput, ImageSize,
    LanguageModel, LoadModel, LoadOptions, Modality, ModelContext, MultiModalData, MultiModalModel,
    ProcessedInputs, ProcessorInputs, Prompt, Registry, Result, SupportsVision, Weights,
};
use mmreg_engine::generate::embed_prompt;
use tch::{Kind, Tensor};
use toy_vlm::{ToyImageInputs, ToyVlm};

/// The plain token placed after each image token.
const BETWEEN: u32 = 3;
/// A prompt token that makes the processor return a mask of the wrong length.
const BROKEN: u32 = 9;

#[register_model("ToyInterleavedForCausalLM")]
#[register_input_mapper(image = toy_vlm::map_images)]
#[register_input_processor(interleaved)]
struct ToyInterleaved(ToyVlm);

/// The toy's expansion, then a `BETWEEN` after every image token, masked out of the embedding. A prompt
/// holding `BROKEN` gets a mask one token short (for the error test).
fn interleaved(ctx: &ModelContext, inputs: ProcessorInputs) -> Result<ProcessedInputs> {
    let ids = prompt_ids(ctx, inputs.prompt)?;
    let token = ToyVlm::image_token_id(ctx)?;
    let broken = ids.contains(&BROKEN);
    let data = &inputs.multimodal;
    let (expanded, ranges) =
        expand_placeholders(ctx, &ids, &[(Modality::Image, token)], data, |_, item| {
            ToyVlm::num_image_tokens(ctx, data.images[item].size())
        })?;
    let (mut token_ids, mut placeholders, mut src) = (Vec::new(), Vec::new(), 0);
    for mut range in ranges {
        token_ids.extend_from_slice(&expanded[src..range.offset]);
        let cells = range.length;
        src = range.offset + cells;
        range.offset = token_ids.len();
        range.length = 2 * cells;
        let mask_len = 2 * cells - usize::from(broken);
        range.is_embed = Some((0..mask_len).map(|i| i % 2 == 0).collect::<Arc<[bool]>>());
        for _ in 0..cells {
            token_ids.extend([token, BETWEEN]);
        }
        placeholders.push(range);
    }
    token_ids.extend_from_slice(&expanded[src..]);
    Ok(ProcessedInputs {
        token_ids,
        placeholders,
        multimodal: inputs.multimodal,
        positions: None,
        bidirectional: Vec::new(),
    })
}

impl LoadModel for ToyInterleaved {
    fn load(ctx: &ModelContext, weights: &Weights, options: &LoadOptions) -> Result<Self> {
        ToyVlm::load(ctx, weights, options).map(ToyInterleaved)
    }
}

impl SupportsVision for ToyInterleaved {
    type ImageInputs = ToyImageInputs;

    /// The whole run: an image token and a plain token per cell.
    fn num_image_tokens(ctx: &ModelContext, size: ImageSize) -> Result<usize> {
        Ok(2 * ToyVlm::num_image_tokens(ctx, size)?)
    }

    fn image_token_id(ctx: &ModelContext) -> Result<u32> {
        ToyVlm::image_token_id(ctx)
    }

    fn largest_image(ctx: &ModelContext) -> Result<ImageSize> {
        ToyVlm::largest_image(ctx)
    }

    fn embed_images(&self, inputs: ToyImageInputs) -> Result<Vec<Tensor>> {
        self.0.embed_images(inputs)
    }
}

impl MultiModalModel for ToyInterleaved {
    fn language_model(&self) -> &dyn LanguageModel {
        self.0.language_model()
    }
}

fn checkpoint() -> (tempfile::TempDir, ModelContext, &'static ModelEntry) {
    let dir = tempfile::tempdir().expect("temp dir");
    support::write_checkpoint(dir.path(), 5).expect("checkpoint");
    let config = std::fs::read_to_string(dir.path().join("config.json")).expect("config");
    let config = config.replace("ToyVlmForCausalLM", "ToyInterleavedForCausalLM");
    std::fs::write(dir.path().join("config.json"), config).expect("config");
    let ctx = ModelContext::from_dir(dir.path()).expect("context");
    let entry = Registry::global().for_context(&ctx).expect("registered");
    (dir, ctx, entry)
}

fn image(width: u32, height: u32) -> ImageInput {
    let pixels = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x * 9) as u8, (y * 13) as u8, ((x + y) * 5) as u8])
    });
    ImageInput::new("image", image::DynamicImage::ImageRgb8(pixels))
}

#[test]
fn masked_runs_embed_only_their_image_tokens() {
    let _guard = tch::no_grad_guard();
    let (dir, ctx, entry) = checkpoint();
    let model = entry
        .load(&ctx, &Weights::from_dir(dir.path()).expect("weights"), &LoadOptions::default())
        .expect("loads");
    // `mmreg check`: the embedding's rows equal the masked count, not the run's length.
    let report =
        mmreg_core::check::check_model(entry, &ctx, 64, Some(model.as_ref())).expect("consistent");
    assert_eq!(report.modalities[0].max_tokens, 16);

    let inputs = ProcessorInputs {
        prompt: Prompt::TokenIds(vec![1, 15, 2, 15, 4]),
        multimodal: MultiModalData::with_images(vec![image(30, 20), image(20, 40)]),
    };
    let prepared = mmreg_core::prepare::prepare(entry, &ctx, inputs, 1024).expect("prepares");
    let processed = prepared.processed.clone();
    let embeds = embed_prompt(entry, model.as_ref(), prepared).expect("embeds");
    let tokens =
        Tensor::from_slice(&processed.token_ids.iter().map(|&t| t as i64).collect::<Vec<_>>());
    let plain = model.embed_tokens(&tokens).expect("token embeddings");
    let features = entry
        .embed(
            model.as_ref(),
            Modality::Image,
            entry.map(&ctx, Modality::Image, &processed.multimodal).expect("maps"),
        )
        .expect("features");
    for (range, feature) in processed.placeholders.iter().zip(&features) {
        let mask = range.is_embed.as_ref().expect("a mask");
        let mut row = 0;
        for (i, &embedded) in mask.iter().enumerate() {
            let at = (range.offset + i) as i64;
            let got = embeds.get(at);
            if embedded {
                assert!(got.equal(&feature.get(row).to_kind(Kind::Float)), "row {at}");
                row += 1;
            } else {
                assert_eq!(processed.token_ids[at as usize], BETWEEN);
                assert!(got.equal(&plain.get(at)), "text token at {at} overwritten");
            }
        }
        assert_eq!(row as usize, range.embedded());
    }
}

#[test]
fn a_mask_of_the_wrong_length_is_a_clear_error() {
    let (_dir, ctx, entry) = checkpoint();
    let inputs = ProcessorInputs {
        prompt: Prompt::TokenIds(vec![1, 15, BROKEN]),
        multimodal: MultiModalData::with_images(vec![image(30, 20)]),
    };
    let error = entry.process(&ctx, inputs).expect_err("refused").to_string();
    assert!(
        error.contains(
            "placeholder range of 12 tokens (image item 0) with an is-embedding mask of 11"
        ),
        "{error}"
    );
}
