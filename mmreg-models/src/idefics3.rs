//! Idefics3 and SmolVLM (`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`): a
//! SigLIP-style vision tower over square tiles (the image split into a grid, then a global view), a
//! connector that folds `scale_factor²` neighbouring patches into one token (pixel shuffle) and projects
//! them, and a Llama decoder. The prompt interleaves each tile's `<image>` run with
//! `<fake_token_around_image>`, `<row_r_col_c>` and `<global-img>` text tokens: one placeholder range
//! per image whose embedded positions are its `<image>` tokens.

use mmreg_core::defaults::{interleaved_placeholders, placeholder_span, prompt_ids};
use mmreg_core::{
    register_input_mapper, register_input_processor, register_model, Error, ImageInput, ImageSize,
    LanguageModel, LoadModel, LoadOptions, Modality, ModalityInputs, ModelContext, MultiModalModel,
    ProcessedInputs, ProcessorInputs, Prompt, Result, SupportsVision, Weights,
};
use mmreg_image::{
    idefics3_image_prompt, Idefics3Grid, Idefics3ImageProcessor, Idefics3PromptTokens,
    PreprocessorConfig,
};
use mmreg_nn::llama::{Llama, TextConfigJson};
use mmreg_nn::siglip::{SiglipVisionConfig, SiglipVisionTower};
use mmreg_nn::{Linear, Loader};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

/// `vision_config` (`Idefics3VisionConfig`); missing keys take HuggingFaceM4/Idefics3-8B-Llama3's values
/// (HF's class defaults, 224 px in patches of 32, give 7 × 7 patches, which `scale_factor` 2 cannot fold).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Idefics3VisionConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: usize,
    pub num_attention_heads: i64,
    pub num_channels: i64,
    pub image_size: i64,
    pub patch_size: i64,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for Idefics3VisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 1152,
            intermediate_size: 4304,
            num_hidden_layers: 27,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 364,
            patch_size: 14,
            hidden_act: "gelu_pytorch_tanh".into(),
            layer_norm_eps: 1e-6,
        }
    }
}

impl Idefics3VisionConfig {
    fn siglip(&self) -> SiglipVisionConfig {
        SiglipVisionConfig {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_channels: self.num_channels,
            image_size: self.image_size,
            patch_size: self.patch_size,
            hidden_act: self.hidden_act.clone(),
            layer_norm_eps: self.layer_norm_eps,
        }
    }
}

/// config.json of an Idefics3 or SmolVLM checkpoint; missing keys take `Idefics3Config`'s defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Idefics3Config {
    pub image_token_id: u32,
    pub scale_factor: i64,
    pub tie_word_embeddings: bool,
    pub vision_config: Idefics3VisionConfig,
    pub text_config: TextConfigJson,
}

impl Default for Idefics3Config {
    fn default() -> Self {
        Self {
            image_token_id: 128_257,
            scale_factor: 2,
            tie_word_embeddings: false,
            vision_config: Idefics3VisionConfig::default(),
            text_config: TextConfigJson {
                rms_norm_eps: Some(1e-5),
                ..TextConfigJson::default()
            },
        }
    }
}

/// `<image>` tokens per tile: the tile's patches, `scale_factor²` of them folded into each token.
pub fn image_seq_len(config: &Idefics3Config) -> Result<usize> {
    let vision = &config.vision_config;
    let patches = vision.siglip().num_patches()?;
    let fold = config.scale_factor * config.scale_factor;
    let side = (patches as f64).sqrt() as i64;
    if config.scale_factor <= 0 || side % config.scale_factor != 0 {
        return Err(Error::config(
            "config.json",
            format!(
                "scale_factor {} must divide the {side} patches per side",
                config.scale_factor
            ),
        ));
    }
    Ok((patches / fold) as usize)
}

fn image_processor(ctx: &ModelContext) -> Result<Idefics3ImageProcessor> {
    Idefics3ImageProcessor::new(&*ctx.processor_config::<PreprocessorConfig>()?)
        .map_err(|e| Error::config("preprocessor_config.json", e))
}

fn grid(ctx: &ModelContext, size: ImageSize) -> Result<Idefics3Grid> {
    image_processor(ctx)?
        .grid(size.height as usize, size.width as usize)
        .map_err(|e| Error::bad_input("image", e))
}

/// Tiles as the tower takes them: every image's tiles then its global view, `[Σ frames, 3, M, M]`, and
/// each image's `(rows, cols)` grid.
#[derive(Debug, ModalityInputs)]
pub struct Idefics3ImageInputs {
    pub pixel_values: Tensor,
    #[inputs(host)]
    pub image_grid: Tensor,
}

/// The Idefics3 / SmolVLM image processor on each image.
pub fn map_images(ctx: &ModelContext, images: &[ImageInput]) -> Result<Idefics3ImageInputs> {
    let processor = image_processor(ctx)?;
    let (mut data, mut grids, mut frames) = (Vec::new(), Vec::new(), 0);
    let mut shape = [0, 3, 0, 0];
    for image in images {
        let out = processor
            .preprocess(&image.image)
            .map_err(|e| Error::bad_input(&*image.name, e))?;
        shape = out.pixel_values.shape;
        frames += shape[0];
        grids.extend([out.grid.rows as i64, out.grid.cols as i64]);
        data.extend_from_slice(&out.pixel_values.data);
    }
    let [_, c, h, w] = shape.map(|d| d as i64);
    Ok(Idefics3ImageInputs {
        pixel_values: Tensor::from_slice(&data).reshape([frames as i64, c, h, w]),
        image_grid: Tensor::from_slice(&grids).reshape([images.len() as i64, 2]),
    })
}

/// `Idefics3VisionEmbeddings`' position ids of a full `n × n` tile, computed with HF's operations in the
/// model's dtype: the fractional coordinates are rounded to it before bucketing, which in bf16 repeats
/// some positions (at 26 patches per side, row 3 takes bucket 2); the same libtorch gives the same ids.
fn bucketed_position_ids(n: i64, kind: Kind, device: Device) -> Result<Tensor> {
    let step = 1.0 / n as f64;
    let boundaries = Tensor::f_arange_start_step(step, 1.0, step, (Kind::Float, device))?;
    let count = Tensor::from_slice(&[n]).to_device(device);
    let steps = count.f_reciprocal()?.to_kind(Kind::Float);
    let indices = Tensor::f_arange(n, (Kind::Float, device))?;
    let coords = (indices.unsqueeze(0) * steps.unsqueeze(1))
        .f_clamp_max(1.0 - 1e-6)?
        .to_kind(kind);
    let buckets = Tensor::f_bucketize(&coords, &boundaries, false, true)?.squeeze_dim(0);
    Ok((buckets.unsqueeze(1) * n + buckets.unsqueeze(0)).reshape([-1]))
}

#[register_model("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")]
#[register_input_mapper(image = map_images)]
#[register_input_processor(input_processor)]
pub struct Idefics3 {
    vision_model: SiglipVisionTower,
    /// `connector.modality_projection.proj`.
    connector: Linear,
    text_model: Llama,
    scale_factor: i64,
    image_seq_len: usize,
}

impl LoadModel for Idefics3 {
    fn load(ctx: &ModelContext, weights: &Weights, options: &LoadOptions) -> Result<Self> {
        let config = ctx.config::<Idefics3Config>()?;
        let weights = weights.renamed(canonical_weight_name)?;
        let loader = Loader::new(&weights, options);
        let mut text = config.text_config.clone();
        // transformers reads the top-level key only (text_config's is ignored).
        text.tie_word_embeddings = Some(config.tie_word_embeddings);
        let text = text.resolve()?;
        let vision = config.vision_config.siglip();
        let side = vision.patches_per_side()?;
        let fold = config.scale_factor * config.scale_factor;
        let positions = bucketed_position_ids(side, options.dtype, options.device)?;
        Ok(Self {
            vision_model: SiglipVisionTower::load(&loader.pp("vision_model"), &vision)?
                .with_position_ids(positions),
            connector: Linear::load(
                &loader.pp("connector.modality_projection.proj"),
                vision.hidden_size * fold,
                text.hidden_size,
                false,
            )?,
            text_model: Llama::load(&loader.pp("text_model"), &loader.pp("lm_head"), text)?,
            scale_factor: config.scale_factor,
            image_seq_len: image_seq_len(&config)?,
        })
        .and_then(|model| {
            weights.check_all_used()?;
            Ok(model)
        })
    }
}

/// transformers 4.x and 5.x name the weights alike (`model.vision_model.*`, `model.connector.*`,
/// `model.text_model.*`, `lm_head.*`).
pub fn canonical_weight_name(name: &str) -> Option<String> {
    if name.ends_with("rotary_emb.inv_freq") {
        return None;
    }
    Some(name.strip_prefix("model.").unwrap_or(name).to_owned())
}

impl Idefics3 {
    /// HF's `pixel_shuffle`: `[n, side², d]` → `[n, side² / s², d·s²]`, each token the `s × s` patches
    /// around it.
    fn pixel_shuffle(&self, x: &Tensor) -> Tensor {
        let (n, seq, d) = x.size3().expect("[tiles, patches, hidden]");
        let s = self.scale_factor;
        let side = (seq as f64).sqrt() as i64;
        x.view([n, side, side, d])
            .view([n, side, side / s, d * s])
            .permute([0, 2, 1, 3])
            .reshape([n, side / s, side / s, d * s * s])
            .permute([0, 2, 1, 3])
            .reshape([n, seq / (s * s), d * s * s])
    }
}

impl SupportsVision for Idefics3 {
    type ImageInputs = Idefics3ImageInputs;

    /// The span from the image's first `<image>` token to its last: `image_seq_len` per tile and for
    /// the global view (the embedded rows), and the tile tags between them.
    fn num_image_tokens(ctx: &ModelContext, size: ImageSize) -> Result<usize> {
        let config = ctx.config::<Idefics3Config>()?;
        let seq_len = image_seq_len(&config)?;
        let g = grid(ctx, size)?;
        if g.frames() == 1 {
            return Ok(seq_len);
        }
        let text = idefics3_image_prompt(g.rows, g.cols, seq_len, &Idefics3PromptTokens::default());
        placeholder_span(ctx, &text, config.image_token_id)
    }

    fn image_token_id(ctx: &ModelContext) -> Result<u32> {
        Ok(ctx.config::<Idefics3Config>()?.image_token_id)
    }

    /// A square at the processor's largest size: the most tiles.
    fn largest_image(ctx: &ModelContext) -> Result<ImageSize> {
        let config = ctx.processor_config::<PreprocessorConfig>()?;
        let side = match &config.size {
            Some(mmreg_image::SizeSpec::Dict(d)) => {
                d.get("longest_edge").copied().flatten().unwrap_or(4 * 364)
            }
            _ => 4 * 364,
        }
        .clamp(1, 4096) as u32;
        Ok(ImageSize {
            width: side,
            height: side,
        })
    }

    /// Each image's tiles and global view, `image_seq_len` rows each, in prompt order.
    fn embed_images(&self, inputs: Idefics3ImageInputs) -> Result<Vec<Tensor>> {
        let hidden = self.vision_model.forward(&inputs.pixel_values)?;
        let features = self.connector.forward(&self.pixel_shuffle(&hidden));
        let grids = Vec::<i64>::try_from(inputs.image_grid.to_kind(Kind::Int64).flatten(0, -1))?;
        let frames: Vec<i64> = grids.chunks(2).map(|g| g[0] * g[1] + 1).collect();
        if frames.iter().sum::<i64>() != features.size()[0] {
            return Err(Error::Model(format!(
                "Idefics3: {} tiles for grids {grids:?}",
                features.size()[0]
            )));
        }
        if features.size()[1] != self.image_seq_len as i64 {
            return Err(Error::Model(format!(
                "Idefics3: {} rows per tile, image_seq_len is {}",
                features.size()[1],
                self.image_seq_len
            )));
        }
        Ok(features
            .split_with_sizes(&frames, 0)
            .into_iter()
            .map(|f| f.flatten(0, 1))
            .collect())
    }
}

impl MultiModalModel for Idefics3 {
    fn language_model(&self) -> &dyn LanguageModel {
        &self.text_model
    }
}

/// The prompt as `Idefics3Processor` / `SmolVLMProcessor` build it: each `<image>` of the text becomes the
/// image's tiles (`<fake_token_around_image><row_r_col_c>` + `image_seq_len` × `<image>`, a newline per
/// row) and its global view (`<fake_token_around_image><global-img>` + `<image>`s +
/// `<fake_token_around_image>`); then tokenized with the tokenizer's BOS. Each image's placeholder range
/// runs from its first `<image>` to its last, embedding rows at the `<image>` tokens only. In a prompt
/// of ids, each `<image>` that is not already part of an expanded run is expanded the same way.
pub fn input_processor(ctx: &ModelContext, inputs: ProcessorInputs) -> Result<ProcessedInputs> {
    let config = ctx.config::<Idefics3Config>()?;
    let seq_len = image_seq_len(&config)?;
    let images = &inputs.multimodal.images;
    let grids = images
        .iter()
        .map(|i| grid(ctx, i.size()))
        .collect::<Result<Vec<_>>>()?;
    let tokens = Idefics3PromptTokens::default();
    let expansion = |g: &Idefics3Grid| idefics3_image_prompt(g.rows, g.cols, seq_len, &tokens);
    let image_token = config.image_token_id;
    let mismatch = |found: usize| Error::PlaceholderMismatch {
        modality: Modality::Image,
        marker: tokens.image_token.clone(),
        placeholders: found,
        items: images.len(),
    };
    let ids = match inputs.prompt {
        Prompt::Text(text) => {
            let parts: Vec<&str> = text.split(tokens.image_token.as_str()).collect();
            if parts.len() - 1 != images.len() {
                return Err(mismatch(parts.len() - 1));
            }
            let mut expanded = parts[0].to_owned();
            for (part, g) in parts[1..].iter().zip(&grids) {
                expanded.push_str(&expansion(g));
                expanded.push_str(part);
            }
            prompt_ids(ctx, Prompt::Text(expanded))?
        }
        Prompt::TokenIds(ids) => {
            let markers = ids.iter().filter(|&&t| t == image_token).count();
            if markers == images.len() {
                let tokenizer = ctx.tokenizer()?;
                let mut expanded = Vec::with_capacity(ids.len());
                let mut next = grids.iter();
                for id in ids {
                    match (id == image_token).then(|| next.next()).flatten() {
                        Some(g) => expanded.extend_from_slice(
                            tokenizer
                                .encode(expansion(g), false)
                                .map_err(|e| Error::bad_input("prompt", e))?
                                .get_ids(),
                        ),
                        None => expanded.push(id),
                    }
                }
                expanded
            } else {
                ids
            }
        }
    };
    let frames: Vec<usize> = grids.iter().map(Idefics3Grid::frames).collect();
    let (placeholders, _) =
        interleaved_placeholders(&ids, image_token, seq_len, &frames, &tokens.image_token)?;
    Ok(ProcessedInputs {
        token_ids: ids,
        placeholders,
        multimodal: inputs.multimodal,
        positions: None,
        bidirectional: Vec::new(),
    })
}
