//! LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP vision tower, a two-layer projector and a Llama
//! (or Mistral) decoder. Every image becomes `(image_size / patch_size)²` placeholder tokens (576 for
//! the released checkpoints), counted by [`image_tokens`] alone.

use mmreg_core::{
    register_input_mapper, register_model, Error, ImageSize, LanguageModel, LoadModel, LoadOptions,
    ModelContext, MultiModalModel, Result, SupportsVision, Weights,
};
use mmreg_nn::clip::{ClipVisionConfig, ClipVisionTower, FeatureSelect, PixelValues};
use mmreg_nn::llama::{Llama, TextConfig, TextConfigJson};
use mmreg_nn::projector::Projector;
use mmreg_nn::Loader;
use serde::Deserialize;
use tch::Tensor;

/// config.json of a LLaVA checkpoint; missing keys take `LlavaConfig`'s defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LlavaConfig {
    #[serde(alias = "image_token_id")]
    pub image_token_index: u32,
    pub projector_hidden_act: String,
    pub vision_feature_layer: FeatureLayers,
    pub vision_feature_select_strategy: String,
    pub multimodal_projector_bias: bool,
    /// Top-level vocab size of older configs, used when `text_config` has none.
    pub vocab_size: Option<i64>,
    pub vision_config: ClipVisionConfig,
    pub text_config: TextConfigJson,
}

impl Default for LlavaConfig {
    fn default() -> Self {
        Self {
            image_token_index: 32000,
            projector_hidden_act: "gelu".into(),
            vision_feature_layer: FeatureLayers::One(-2),
            vision_feature_select_strategy: "default".into(),
            multimodal_projector_bias: true,
            vocab_size: None,
            vision_config: ClipVisionConfig::llava_default(),
            text_config: TextConfigJson::default(),
        }
    }
}

/// `vision_feature_layer`: one layer or several whose features are concatenated.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum FeatureLayers {
    One(i64),
    Many(Vec<i64>),
}

impl LlavaConfig {
    /// Whether the CLS token is dropped (`default`) or kept (`full`).
    pub(crate) fn drops_cls(&self) -> Result<bool> {
        match self.vision_feature_select_strategy.as_str() {
            "default" => Ok(true),
            "full" => Ok(false),
            other => Err(Error::config(
                "config.json",
                format!("unknown vision_feature_select_strategy `{other}`"),
            )),
        }
    }

    /// The requested hidden states as indices into HF's `hidden_states` (0 = embeddings).
    pub(crate) fn feature_layers(&self) -> Result<Vec<usize>> {
        let layers = match &self.vision_feature_layer {
            FeatureLayers::One(layer) => vec![*layer],
            FeatureLayers::Many(layers) => layers.clone(),
        };
        let layer_count = self.vision_config.num_hidden_layers;
        // The embeddings and every layer's output.
        let states = i64::try_from(layer_count)
            .ok()
            .and_then(|n| n.checked_add(1))
            .ok_or_else(|| {
                Error::config(
                    "config.json",
                    format!("vision_config.num_hidden_layers {layer_count} is too large"),
                )
            })?;
        layers
            .iter()
            .map(|&layer| {
                let index = if layer < 0 { states + layer } else { layer };
                if (0..states).contains(&index) {
                    Ok(index as usize)
                } else {
                    Err(Error::config(
                        "config.json",
                        format!(
                            "vision_feature_layer {layer} is outside the {states} hidden states"
                        ),
                    ))
                }
            })
            .collect()
    }

    pub(crate) fn text(&self) -> Result<TextConfig> {
        let mut text = self.text_config.clone();
        text.vocab_size = text.vocab_size.or(self.vocab_size);
        text.resolve()
    }
}

/// Placeholder tokens per image: one per patch, plus CLS under the `full` strategy. The one source of
/// truth for the input processor, the dummy data, the max tokens and the vision path's shape check.
pub fn image_tokens(config: &LlavaConfig) -> Result<usize> {
    let side = config.vision_config.patches_per_side()?;
    Ok((side * side) as usize + usize::from(!config.drops_cls()?))
}

/// LLaVA-1.5. Max tokens, dummy data and the input processor are the defaults `SupportsVision` gives:
/// `<image>` (`image_token_index`) expanded into [`image_tokens`] placeholders.
#[register_model("LlavaForConditionalGeneration")]
#[register_input_mapper(image)] // the CLIP image processor, from preprocessor_config.json
pub struct Llava {
    parts: LlavaParts,
    tokens_per_image: usize,
}

impl LoadModel for Llava {
    fn load(ctx: &ModelContext, weights: &Weights, options: &LoadOptions) -> Result<Self> {
        let config = ctx.config::<LlavaConfig>()?;
        let weights = weights.renamed(canonical_weight_name)?;
        let model = Self {
            parts: LlavaParts::load(&config, &Loader::new(&weights, options))?,
            tokens_per_image: image_tokens(&config)?,
        };
        weights.check_all_used()?;
        Ok(model)
    }
}

impl SupportsVision for Llava {
    type ImageInputs = PixelValues;

    fn num_image_tokens(ctx: &ModelContext, _size: ImageSize) -> Result<usize> {
        image_tokens(&*ctx.config::<LlavaConfig>()?)
    }

    fn image_token_id(ctx: &ModelContext) -> Result<u32> {
        Ok(ctx.config::<LlavaConfig>()?.image_token_index)
    }

    /// Every image is resized to the tower's square input, so any size costs the same.
    fn largest_image(ctx: &ModelContext) -> Result<ImageSize> {
        let side = ctx.config::<LlavaConfig>()?.vision_config.image_size as u32;
        Ok(ImageSize {
            width: side,
            height: side,
        })
    }

    fn embed_images(&self, inputs: PixelValues) -> Result<Vec<Tensor>> {
        let features = self.parts.image_features(&inputs.pixel_values)?;
        let rows = features.size()[1] as usize;
        if rows != self.tokens_per_image {
            return Err(Error::Model(format!(
                "LLaVA vision path produced {rows} rows per image but image_tokens() says {}",
                self.tokens_per_image
            )));
        }
        Ok(features.unbind(0))
    }
}

impl MultiModalModel for Llava {
    fn language_model(&self) -> &dyn LanguageModel {
        &self.parts.language_model
    }
}

/// Maps both weight-name layouts to one: the hub's (`language_model.model.*`, `vision_tower.vision_model.*`,
/// `language_model.lm_head`) and transformers-5's (`model.` prefix, no `vision_model.`).
pub fn canonical_weight_name(name: &str) -> Option<String> {
    if name.ends_with(".position_ids") || name.ends_with("rotary_emb.inv_freq") {
        return None;
    }
    let name = name.strip_prefix("model.").unwrap_or(name);
    let name = match name {
        "language_model.lm_head.weight" => "lm_head.weight".to_owned(),
        _ => name
            .replacen("language_model.model.", "language_model.", 1)
            .replacen("vision_tower.vision_model.", "vision_tower.", 1),
    };
    Some(name)
}

/// The vision tower, projector and language model that LLaVA and LLaVA-NeXT share.
pub(crate) struct LlavaParts {
    vision_tower: ClipVisionTower,
    multi_modal_projector: Projector,
    pub(crate) language_model: Llama,
}

impl LlavaParts {
    /// Loads the shared parts from canonical weight names (see [`canonical_weight_name`]).
    pub(crate) fn load(config: &LlavaConfig, loader: &Loader) -> Result<Self> {
        let select = FeatureSelect {
            layers: config.feature_layers()?,
            drop_cls: config.drops_cls()?,
        };
        let text = config.text()?;
        let vision = &config.vision_config;
        Ok(Self {
            multi_modal_projector: Projector::load(
                &loader.pp("multi_modal_projector"),
                vision.hidden_size * select.layers.len() as i64,
                text.hidden_size,
                &config.projector_hidden_act,
                config.multimodal_projector_bias,
            )?,
            vision_tower: ClipVisionTower::load(&loader.pp("vision_tower"), vision, select)?,
            language_model: Llama::load(&loader.pp("language_model"), &loader.pp("lm_head"), text)?,
        })
    }

    /// Projected features `[n, tokens, hidden]` of `[n, 3, H, W]` pixel values: the selected layers'
    /// hidden states (CLS dropped under `default`), concatenated, through the projector.
    pub(crate) fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let features = self.vision_tower.features(pixel_values)?;
        Ok(self.multi_modal_projector.forward(&features))
    }
}
