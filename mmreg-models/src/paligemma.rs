//! PaliGemma (`PaliGemmaForConditionalGeneration`): a SigLIP vision tower, one linear projector and a
//! Gemma decoder. The prompt is the images' placeholders, then `<bos>`, the text and a newline; the
//! whole prompt (image and text prefix) attends both ways, generated tokens causally (the prefix-LM
//! mask). Rotary positions count from 1.

use mmreg_core::defaults::{expand_placeholders, prompt_ids};
use mmreg_core::{
    register_input_mapper, register_input_processor, register_model, Error, ImageInput, ImageSize,
    LanguageModel, LoadModel, LoadOptions, Modality, ModelContext, MultiModalModel,
    PlaceholderRange, ProcessedInputs, ProcessorInputs, Prompt, Result, SupportsVision, Weights,
};
use mmreg_image::{PreprocessorConfig, SiglipImageProcessor};
use mmreg_nn::clip::PixelValues;
use mmreg_nn::gemma::{Gemma, GemmaConfig, GemmaConfigJson};
use mmreg_nn::siglip::{SiglipVisionConfig, SiglipVisionTower};
use mmreg_nn::{Linear, Loader};
use serde::Deserialize;
use tch::Tensor;

/// config.json of a PaliGemma checkpoint; missing keys take `PaliGemmaConfig`'s defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct PaliGemmaConfig {
    #[serde(alias = "image_token_id")]
    pub image_token_index: u32,
    /// The decoder's vocabulary when `text_config` has none.
    pub vocab_size: i64,
    pub projection_dim: i64,
    pub vision_config: SiglipVisionConfig,
    pub text_config: GemmaConfigJson,
}

impl Default for PaliGemmaConfig {
    fn default() -> Self {
        Self {
            image_token_index: 256000,
            vocab_size: 257152,
            projection_dim: 2048,
            vision_config: SiglipVisionConfig {
                hidden_size: 1152,
                intermediate_size: 4096,
                num_hidden_layers: 27,
                num_attention_heads: 16,
                patch_size: 14,
                ..SiglipVisionConfig::default()
            },
            text_config: GemmaConfigJson::default(),
        }
    }
}

impl PaliGemmaConfig {
    fn text(&self) -> Result<GemmaConfig> {
        let mut text = self.text_config.clone();
        text.vocab_size = text.vocab_size.or(Some(self.vocab_size));
        // PaliGemmaConfig's own text defaults (paligemma-3b): Gemma-2B.
        text.hidden_size = text.hidden_size.or(Some(2048));
        text.num_hidden_layers = text.num_hidden_layers.or(Some(18));
        text.intermediate_size = text.intermediate_size.or(Some(16384));
        text.num_attention_heads = text.num_attention_heads.or(Some(8));
        text.num_key_value_heads = text.num_key_value_heads.or(Some(1));
        text.resolve()
    }
}

/// Placeholder tokens per image: one per SigLIP patch (256 at 224 px), whatever the image's size.
pub fn image_tokens(config: &PaliGemmaConfig) -> Result<usize> {
    Ok(config.vision_config.num_patches()? as usize)
}

/// PaliGemma (a Gemma decoder; PaliGemma 2's Gemma 2 decoder is refused by its `model_type`).
#[register_model("PaliGemmaForConditionalGeneration")]
#[register_input_mapper(image = map_images)]
#[register_input_processor(input_processor)]
pub struct PaliGemma {
    vision_tower: SiglipVisionTower,
    multi_modal_projector: Linear,
    language_model: Gemma,
    tokens_per_image: usize,
}

impl LoadModel for PaliGemma {
    fn load(ctx: &ModelContext, weights: &Weights, options: &LoadOptions) -> Result<Self> {
        let config = ctx.config::<PaliGemmaConfig>()?;
        let weights = weights.renamed(crate::llava::canonical_weight_name)?;
        let loader = Loader::new(&weights, options);
        let text = config.text()?;
        let model = Self {
            vision_tower: SiglipVisionTower::load(
                &loader.pp("vision_tower"),
                &config.vision_config,
            )?,
            multi_modal_projector: Linear::load(
                &loader.pp("multi_modal_projector.linear"),
                config.vision_config.hidden_size,
                config.projection_dim,
                true,
            )?,
            // PaliGemma's positions are 1-indexed.
            language_model: Gemma::load(&loader.pp("language_model"), &loader.pp("lm_head"), text)?
                .with_position_offset(1),
            tokens_per_image: image_tokens(&config)?,
        };
        if config.projection_dim != model.language_model.config.hidden_size {
            return Err(Error::config(
                "config.json",
                format!(
                    "projection_dim {} differs from text_config.hidden_size {}",
                    config.projection_dim, model.language_model.config.hidden_size
                ),
            ));
        }
        weights.check_all_used()?;
        Ok(model)
    }
}

impl SupportsVision for PaliGemma {
    type ImageInputs = PixelValues;

    fn num_image_tokens(ctx: &ModelContext, _size: ImageSize) -> Result<usize> {
        image_tokens(&*ctx.config::<PaliGemmaConfig>()?)
    }

    fn image_token_id(ctx: &ModelContext) -> Result<u32> {
        Ok(ctx.config::<PaliGemmaConfig>()?.image_token_index)
    }

    /// Every image is resized to the tower's square input, so any size costs the same.
    fn largest_image(ctx: &ModelContext) -> Result<ImageSize> {
        let side = ctx.config::<PaliGemmaConfig>()?.vision_config.image_size as u32;
        Ok(ImageSize {
            width: side,
            height: side,
        })
    }

    /// `multi_modal_projector(vision_tower(pixel_values))`, one `[256, hidden]` tensor per image.
    fn embed_images(&self, inputs: PixelValues) -> Result<Vec<Tensor>> {
        let features = self
            .multi_modal_projector
            .forward(&self.vision_tower.forward(&inputs.pixel_values)?);
        let rows = features.size()[1] as usize;
        if rows != self.tokens_per_image {
            return Err(Error::Model(format!(
                "PaliGemma vision path produced {rows} rows per image, image_tokens() says {}",
                self.tokens_per_image
            )));
        }
        Ok(features.unbind(0))
    }
}

impl MultiModalModel for PaliGemma {
    fn language_model(&self) -> &dyn LanguageModel {
        &self.language_model
    }
}

/// The SigLIP image processor (resize to the tower's size, rescale, normalize), from the checkpoint's
/// processor config.
pub fn map_images(ctx: &ModelContext, images: &[ImageInput]) -> Result<PixelValues> {
    let config = ctx.processor_config::<PreprocessorConfig>()?;
    let processor = SiglipImageProcessor::new(&config)
        .map_err(|e| Error::config("preprocessor_config.json", e))?;
    let mut data = Vec::new();
    let mut shape = [0, 3, 0, 0];
    for image in images {
        let pixels = processor
            .preprocess(&image.image)
            .map_err(|e| Error::bad_input(&*image.name, e))?;
        shape = pixels.shape;
        data.extend_from_slice(&pixels.data);
    }
    let [_, c, h, w] = shape.map(|d| d as i64);
    Ok(PixelValues {
        pixel_values: Tensor::from_slice(&data).reshape([images.len() as i64, c, h, w]),
    })
}

/// PaliGemma's prompt, as `PaliGemmaProcessor` builds it: text without `<image>` gets one per image in
/// front; `<bos>` goes after the last `<image>`, and a newline ends the prefix. Each `<image>` is then
/// expanded into its 256 placeholders, and the whole prompt is one bidirectional run. A prompt of token
/// ids is taken as written, with one `<image>` per image put in front if it has none; ids already
/// expanded (256 `<image>` per image) are kept.
pub fn input_processor(ctx: &ModelContext, inputs: ProcessorInputs) -> Result<ProcessedInputs> {
    let config = ctx.config::<PaliGemmaConfig>()?;
    let images = inputs.multimodal.images.len();
    if images == 0 {
        return Err(Error::bad_input(
            "images",
            "PaliGemma needs at least one image per prompt (as transformers' PaliGemmaProcessor)",
        ));
    }
    let image_token = config.image_token_index;
    let ids = match inputs.prompt {
        Prompt::Text(text) => {
            let tokenizer = ctx.tokenizer()?;
            let marker = tokenizer.id_to_token(image_token).ok_or_else(|| {
                Error::config(
                    "tokenizer.json",
                    format!("the image token {image_token} is not in the tokenizer"),
                )
            })?;
            let bos_id = config.text_config_bos();
            let bos = tokenizer.id_to_token(bos_id).ok_or_else(|| {
                Error::config("tokenizer.json", format!("no token for bos id {bos_id}"))
            })?;
            let text = match text.rfind(&marker) {
                Some(at) => {
                    let end = at + marker.len();
                    format!("{}{bos}{}\n", &text[..end], &text[end..])
                }
                None => format!("{}{bos}{text}\n", marker.repeat(images)),
            };
            ctx.tokenizer()?
                .encode(text, false)
                .map_err(|e| Error::bad_input("prompt", e))?
                .get_ids()
                .to_vec()
        }
        Prompt::TokenIds(ids) if !ids.contains(&image_token) => {
            let mut with_images = vec![image_token; images];
            with_images.extend(ids);
            with_images
        }
        prompt @ Prompt::TokenIds(_) => prompt_ids(ctx, prompt)?,
    };
    let per_image = image_tokens(&config)?;
    // Ids whose images are already expanded (as HF's processor returns them) are taken as they are.
    let markers = ids.iter().filter(|&&t| t == image_token).count();
    if markers == images * per_image && markers != images {
        let placeholders = (0..images)
            .map(|item| {
                let offset = ids
                    .iter()
                    .enumerate()
                    .filter(|(_, &t)| t == image_token)
                    .nth(item * per_image)
                    .map_or(0, |(i, _)| i);
                PlaceholderRange {
                    modality: Modality::Image,
                    item,
                    offset,
                    length: per_image,
                    is_embed: None,
                }
            })
            .collect::<Vec<_>>();
        let contiguous = placeholders.iter().all(|p| {
            ids[p.offset..p.offset + per_image]
                .iter()
                .all(|&t| t == image_token)
        });
        if contiguous {
            let prefix = 0..ids.len();
            return Ok(ProcessedInputs {
                bidirectional: vec![prefix],
                token_ids: ids,
                placeholders,
                multimodal: inputs.multimodal,
                positions: None,
            });
        }
    }
    let (token_ids, placeholders) = expand_placeholders(
        ctx,
        &ids,
        &[(Modality::Image, image_token)],
        &inputs.multimodal,
        |_, _| Ok(per_image),
    )?;
    let prefix = 0..token_ids.len();
    Ok(ProcessedInputs {
        token_ids,
        placeholders,
        multimodal: inputs.multimodal,
        positions: None,
        bidirectional: vec![prefix],
    })
}

impl PaliGemmaConfig {
    /// `text_config.bos_token_id` (Gemma's 2).
    fn text_config_bos(&self) -> u32 {
        self.text_config.bos_token_id.unwrap_or(2)
    }
}
