//! A toy vision-language model in a crate of its own, on `mmreg-nn`'s public blocks: nothing in mmreg
//! names it. Vision: each image is averaged over `grid` rows of cells (columns follow the aspect ratio),
//! one token per cell, so the image-token count is dynamic. Language: one causal self-attention layer.

use mmreg_core::{
    register_input_mapper, register_model, ImageInput, ImageSize, KvCacheSpec, LanguageModel,
    LoadModel, LoadOptions, ModalityInputs, ModelContext, MultiModalModel, Result, Step,
    SupportsVision, Weights,
};
use mmreg_nn::{Attention, Embedding, Linear, Loader};
use serde::Deserialize;
use tch::{Device, Tensor};

/// `config.json` of a toy checkpoint; missing keys take these defaults, like HF config classes.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ToyConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    /// The token that marks an image in a prompt.
    pub image_token_id: u32,
    /// Images have `grid` rows of cells and between 1 and `2 × grid` columns.
    pub grid: u32,
    pub max_position_embeddings: usize,
    /// Attend to the last `sliding_window` positions only (HF's `sliding_window`); `None`: all.
    pub sliding_window: Option<usize>,
}

impl Default for ToyConfig {
    fn default() -> Self {
        let (vocab_size, hidden_size, image_token_id, grid) = (16, 8, 15, 2);
        let max_position_embeddings = 256;
        let sliding_window = None;
        Self {
            vocab_size,
            hidden_size,
            image_token_id,
            grid,
            max_position_embeddings,
            sliding_window,
        }
    }
}

/// Max tokens, dummy data and the input processor are `SupportsVision`'s defaults.
#[register_model("ToyVlmForCausalLM")]
#[register_input_mapper(image = map_images)]
pub struct ToyVlm {
    embed_tokens: Embedding,
    cell_proj: Linear,
    self_attn: Attention,
    lm_head: Linear,
    config: ToyConfig,
}

/// The cell layout of an image: the one function behind every image-token count of the toy model.
pub fn cell_layout(config: &ToyConfig, size: ImageSize) -> (u32, u32) {
    let aspect = size.width as f64 / size.height.max(1) as f64;
    let columns = (config.grid as f64 * aspect).round().clamp(1.0, 2.0 * config.grid as f64);
    (config.grid, columns as u32)
}

/// Every image's cells in one `[cells, 3]` tensor, and the number of cells of each image (they differ,
/// so they cannot be stacked). Several prompts' inputs join end to end; the counts stay on the host.
#[derive(ModalityInputs)]
pub struct ToyImageInputs {
    pub cells: Tensor,
    #[inputs(host)]
    pub cells_per_image: Tensor,
}

/// Mean colour of each cell, in [0, 1].
pub fn map_images(ctx: &ModelContext, images: &[ImageInput]) -> Result<ToyImageInputs> {
    let config = ctx.config::<ToyConfig>()?;
    let (mut cells, mut counts) = (Vec::new(), Vec::new());
    for image in images {
        let (rows, columns) = cell_layout(&config, image.size());
        let filter = image::imageops::FilterType::Triangle;
        let small = image::imageops::resize(&image.image.to_rgb8(), columns, rows, filter);
        cells.extend(small.pixels().flat_map(|p| p.0.map(|c| c as f32 / 255.0)));
        counts.push((rows * columns) as i64);
    }
    let cells = Tensor::from_slice(&cells).reshape([-1, 3]);
    Ok(ToyImageInputs { cells, cells_per_image: Tensor::from_slice(&counts) })
}

impl LoadModel for ToyVlm {
    fn load(ctx: &ModelContext, weights: &Weights, options: &LoadOptions) -> Result<Self> {
        let config = (*ctx.config::<ToyConfig>()?).clone();
        let (v, h, vb) = (config.vocab_size, config.hidden_size, Loader::new(weights, options));
        let self_attn = match config.sliding_window {
            Some(window) => Attention::new(0, 1, 1, h).with_sliding_window(window),
            None => Attention::new(0, 1, 1, h),
        };
        let model = Self {
            embed_tokens: Embedding::load(&vb.pp("embed_tokens"), v, h)?,
            cell_proj: Linear::load(&vb.pp("cell_proj"), 3, h, false)?,
            self_attn,
            lm_head: Linear::load(&vb.pp("lm_head"), h, v, false)?,
            config,
        };
        weights.check_all_used()?;
        Ok(model)
    }
}

impl SupportsVision for ToyVlm {
    type ImageInputs = ToyImageInputs;

    fn num_image_tokens(ctx: &ModelContext, size: ImageSize) -> Result<usize> {
        let (rows, columns) = cell_layout(&*ctx.config::<ToyConfig>()?, size);
        Ok((rows * columns) as usize)
    }

    fn image_token_id(ctx: &ModelContext) -> Result<u32> {
        Ok(ctx.config::<ToyConfig>()?.image_token_id)
    }

    /// The widest layout: `2 × grid` columns.
    fn largest_image(_: &ModelContext) -> Result<ImageSize> {
        Ok(ImageSize { width: 64, height: 8 })
    }

    fn embed_images(&self, inputs: ToyImageInputs) -> Result<Vec<Tensor>> {
        let kind = self.embed_tokens.weight().kind();
        let features = self.cell_proj.forward(&inputs.cells.to_kind(kind));
        Ok(features.split_with_sizes(Vec::<i64>::try_from(&inputs.cells_per_image)?, 0))
    }
}

impl MultiModalModel for ToyVlm {
    fn language_model(&self) -> &dyn LanguageModel {
        self
    }
}

impl LanguageModel for ToyVlm {
    fn embed_tokens(&self, token_ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.forward(token_ids)
    }

    fn forward(&self, inputs_embeds: &Tensor, step: &mut Step) -> Result<Tensor> {
        let x = inputs_embeds.unsqueeze(1); // one head: [tokens, 1, hidden]
        let attended = self.self_attn.forward(&x, &x, &x, step)?.squeeze_dim(1);
        Ok(self.lm_head.forward(&step.logits_rows(attended + inputs_embeds)?))
    }

    fn kv_cache_spec(&self) -> KvCacheSpec {
        let kind = self.embed_tokens.weight().kind();
        let (layers, kv_heads, head_dim) = (1, 1, self.config.hidden_size);
        KvCacheSpec::new(layers, kv_heads, head_dim, kind)
    }

    fn device(&self) -> Device {
        self.embed_tokens.weight().device()
    }

    fn max_model_len(&self) -> usize {
        self.config.max_position_embeddings
    }
}
