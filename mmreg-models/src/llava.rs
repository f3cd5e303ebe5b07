//! LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP vision tower, a two-layer projector and a Llama
//! (or Mistral) decoder. Every image becomes `(image_size / patch_size)²` placeholder tokens (576 for
//! the released checkpoints), counted by [`image_tokens`] alone.

use std::sync::Mutex;

use mmreg_core::graphs::GraphCache;
use mmreg_core::{
    register_dummy_data, register_input_mapper, register_input_processor, register_max_tokens,
    register_model, AttentionBatch, DummyRequest, Error, ImageInput, ImageSize, KvCacheSpec,
    LoadModel, LoadOptions, Modality, ModelContext, MultiModalData, MultiModalModel, PagedKvCache,
    PixelValues, PlaceholderRange, ProcessedInputs, ProcessorInputs, Prompt, Result,
    SupportsVision, Weights,
};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use crate::clip::{ClipVisionConfig, ClipVisionTower};
use crate::layers::{Activation, Linear, Loader};
use crate::llama::{Llama, TextConfigJson};

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

    pub(crate) fn text(&self) -> Result<crate::llama::TextConfig> {
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

#[register_model("LlavaForConditionalGeneration")]
#[register_input_mapper(image)]
#[register_max_tokens(image = max_image_tokens)]
#[register_dummy_data(dummy_data)]
#[register_input_processor(input_processor)]
pub struct Llava {
    parts: LlavaParts,
    tokens_per_image: usize,
}

fn max_image_tokens(ctx: &ModelContext) -> Result<usize> {
    image_tokens(&*ctx.config::<LlavaConfig>()?)
}

/// `seq_len` tokens: one `<image>` per requested image (expanded by the processor), then filler.
fn dummy_data(ctx: &ModelContext, request: &DummyRequest) -> Result<ProcessorInputs> {
    let config = ctx.config::<LlavaConfig>()?;
    let side = config.vision_config.image_size as u32;
    let size = ImageSize {
        width: side,
        height: side,
    };
    Ok(dummy_prompt(
        config.image_token_index,
        image_tokens(&config)?,
        size,
        request,
    ))
}

/// `request.seq_len` token ids after expansion: one image marker per requested image of `size` (each
/// `tokens` long once expanded), then filler. Shared with LLaVA-NeXT.
pub(crate) fn dummy_prompt(
    image_token: u32,
    tokens: usize,
    size: ImageSize,
    request: &DummyRequest,
) -> ProcessorInputs {
    let images = request.counts.get(Modality::Image);
    let mut ids = vec![image_token; images];
    // Filler id 0 would read as more images where 0 is the image token (as in HF's tiny test configs).
    let filler = u32::from(image_token == 0);
    ids.extend(std::iter::repeat_n(
        filler,
        request.seq_len.saturating_sub(images * tokens),
    ));
    let image = image::DynamicImage::new_rgb8(size.width, size.height);
    let images = (0..images)
        .map(|i| ImageInput::new(format!("dummy image {i}"), image.clone()))
        .collect();
    ProcessorInputs {
        prompt: Prompt::TokenIds(ids),
        multimodal: MultiModalData::with_images(images),
    }
}

/// Token ids of a prompt: text is tokenized with BOS, as HF's processor does; ids pass through.
pub(crate) fn prompt_ids(ctx: &ModelContext, prompt: Prompt) -> Result<Vec<u32>> {
    match prompt {
        Prompt::TokenIds(ids) => Ok(ids),
        Prompt::Text(text) => Ok(ctx
            .tokenizer()?
            .encode(text, true)
            .map_err(|e| Error::bad_input("prompt", e))?
            .get_ids()
            .to_vec()),
    }
}

/// Tokenizes a text prompt (BOS included, as HF's processor does) and expands every `<image>` token
/// into the image's placeholder tokens.
fn input_processor(ctx: &ModelContext, inputs: ProcessorInputs) -> Result<ProcessedInputs> {
    let config = ctx.config::<LlavaConfig>()?;
    let ids = prompt_ids(ctx, inputs.prompt)?;
    expand_placeholders(
        &ids,
        config.image_token_index,
        &inputs.multimodal,
        |image| Llava::num_image_tokens(ctx, image.size()),
    )
    .map(|(token_ids, placeholders)| ProcessedInputs {
        token_ids,
        placeholders,
        multimodal: inputs.multimodal,
    })
}

/// Replaces the i-th `image_token` by `count(image i)` copies of it and records each range. Shared with
/// LLaVA-NeXT, whose counts depend on the image size.
pub fn expand_placeholders(
    ids: &[u32],
    image_token: u32,
    data: &MultiModalData,
    count: impl Fn(&ImageInput) -> Result<usize>,
) -> Result<(Vec<u32>, Vec<PlaceholderRange>)> {
    let markers = ids.iter().filter(|&&t| t == image_token).count();
    if markers != data.images.len() {
        return Err(Error::PlaceholderMismatch {
            modality: Modality::Image,
            marker: "<image>".into(),
            placeholders: markers,
            items: data.images.len(),
        });
    }
    let mut token_ids = Vec::with_capacity(ids.len());
    let mut placeholders = Vec::with_capacity(markers);
    let mut images = data.images.iter();
    for &id in ids {
        match images.len() {
            _ if id != image_token => token_ids.push(id),
            _ => {
                let image = images.next().expect("markers were counted");
                let length = count(image)?;
                let item = placeholders.len();
                placeholders.push(PlaceholderRange {
                    modality: Modality::Image,
                    item,
                    offset: token_ids.len(),
                    length,
                });
                token_ids.extend(std::iter::repeat_n(image_token, length));
            }
        }
    }
    Ok((token_ids, placeholders))
}

/// `multi_modal_projector`: linear → activation → linear.
pub struct Projector {
    linear_1: Linear,
    act: Activation,
    linear_2: Linear,
}

impl Projector {
    pub fn load(
        loader: &Loader,
        in_features: i64,
        hidden: i64,
        act: &str,
        bias: bool,
    ) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::load(&loader.pp("linear_1"), in_features, hidden, bias)?,
            act: Activation::parse(act)?,
            linear_2: Linear::load(&loader.pp("linear_2"), hidden, hidden, bias)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.linear_2
            .forward(&self.act.forward(&self.linear_1.forward(x)))
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
    projector: Projector,
    pub(crate) language_model: Llama,
    feature_layers: Vec<usize>,
    drops_cls: bool,
    /// The vision path for each pixel-value shape, replayed as a CUDA graph on a GPU.
    vision_graphs: Mutex<GraphCache<Vec<i64>>>,
}

impl LlavaParts {
    /// Loads the shared parts from canonical weight names (see [`canonical_weight_name`]).
    pub(crate) fn load(config: &LlavaConfig, loader: &Loader) -> Result<Self> {
        let feature_layers = config.feature_layers()?;
        let text = config.text()?;
        let vision = &config.vision_config;
        Ok(Self {
            vision_tower: ClipVisionTower::load(
                &loader.pp("vision_tower"),
                vision,
                &feature_layers,
            )?,
            projector: Projector::load(
                &loader.pp("multi_modal_projector"),
                vision.hidden_size * feature_layers.len() as i64,
                text.hidden_size,
                &config.projector_hidden_act,
                config.multimodal_projector_bias,
            )?,
            language_model: Llama::load(&loader.pp("language_model"), &loader.pp("lm_head"), text)?,
            drops_cls: config.drops_cls()?,
            feature_layers,
            vision_graphs: Mutex::new(GraphCache::new(loader.options.device)),
        })
    }

    /// Projected features `[n, tokens, hidden]` of `[n, 3, H, W]` pixel values: the selected layers'
    /// hidden states (CLS dropped under `default`), concatenated, through the projector. On a GPU the
    /// path runs as one CUDA graph per shape (its few hundred kernels are too short to launch one by one).
    pub(crate) fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let mut graphs = self
            .vision_graphs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let features = graphs.run(pixel_values.size(), &[pixel_values], |inputs| {
            Ok(self.image_features_eager(&inputs[0]))
        })?;
        // A replay's output is overwritten by the next replay.
        Ok(if graphs.captures() {
            features.copy()
        } else {
            features
        })
    }

    fn image_features_eager(&self, pixel_values: &Tensor) -> Tensor {
        let states = self
            .vision_tower
            .hidden_states(pixel_values, &self.feature_layers);
        let states: Vec<Tensor> = states
            .into_iter()
            .map(|h| {
                if self.drops_cls {
                    h.narrow(1, 1, h.size()[1] - 1)
                } else {
                    h
                }
            })
            .collect();
        self.projector.forward(&Tensor::cat(&states, -1))
    }
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

    fn embed_images(&self, inputs: PixelValues) -> Result<Vec<Tensor>> {
        let features = self.parts.image_features(&inputs.pixel_values)?;
        let rows = features.size()[1] as usize;
        if rows != self.tokens_per_image {
            return Err(Error::Registry(format!(
                "LLaVA vision path produced {rows} rows per image but image_tokens() says {}",
                self.tokens_per_image
            )));
        }
        Ok(features.unbind(0))
    }
}

/// `MultiModalModel` for a model whose `parts: LlavaParts` hold its language model.
macro_rules! impl_multimodal_model_via_parts {
    ($model:ty) => {
        impl MultiModalModel for $model {
            fn embed_tokens(&self, token_ids: &Tensor) -> Result<Tensor> {
                Ok(self.parts.language_model.embed_tokens(token_ids))
            }

            fn forward(
                &self,
                inputs_embeds: &Tensor,
                batch: &AttentionBatch,
                cache: &mut PagedKvCache,
            ) -> Result<Tensor> {
                self.parts
                    .language_model
                    .forward(inputs_embeds, batch, cache)
            }

            fn kv_cache_spec(&self) -> KvCacheSpec {
                self.parts.language_model.kv_cache_spec()
            }

            fn device(&self) -> Device {
                self.parts.language_model.device()
            }

            fn dtype(&self) -> Kind {
                self.parts.language_model.dtype()
            }

            fn max_model_len(&self) -> usize {
                self.parts.language_model.config.max_position_embeddings
            }

            fn supports_cuda_graphs(&self) -> bool {
                true
            }
        }
    };
}
pub(crate) use impl_multimodal_model_via_parts;

impl_multimodal_model_via_parts!(Llava);
