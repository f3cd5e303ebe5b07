//! A toy vision-language model written outside `mmreg-models`, to show that a third-party crate adds a
//! model with the registration macros alone: nothing in mmreg-core names it.
//!
//! Vision: each image is averaged over a layout of cells, `grid` rows by a number of columns that follows
//! its aspect ratio, and each cell's mean colour is projected to one token, so the number of image tokens
//! is dynamic (as in LLaVA-NeXT). Language: one causal self-attention layer over token embeddings.

use mmreg_core::attention::paged_attention;
use mmreg_core::{
    register_dummy_data, register_input_mapper, register_input_processor, register_max_tokens,
    register_model, AttentionBatch, DummyRequest, Error, ImageInput, ImageSize, KvCacheSpec,
    LoadModel, LoadOptions, ModalityInputs, ModelContext, MultiModalData, MultiModalModel,
    PagedKvCache, PlaceholderRange, ProcessedInputs, ProcessorInputs, Prompt, Result,
    SupportsVision, TensorMap, Weights,
};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

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
}

impl Default for ToyConfig {
    fn default() -> Self {
        Self {
            vocab_size: 16,
            hidden_size: 8,
            image_token_id: 15,
            grid: 2,
            max_position_embeddings: 256,
        }
    }
}

#[register_model("ToyVlmForCausalLM")]
#[register_input_mapper(image = map_images)]
#[register_max_tokens(image = max_image_tokens)]
#[register_dummy_data(dummy_data)]
#[register_input_processor(input_processor)]
pub struct ToyVlm {
    embed_tokens: Tensor,
    cell_proj: Tensor,
    lm_head: Tensor,
    config: ToyConfig,
    device: Device,
}

/// The cell layout of an image: the one function behind every image-token count of the toy model.
pub fn cell_layout(config: &ToyConfig, size: ImageSize) -> (u32, u32) {
    let aspect = size.width as f64 / size.height.max(1) as f64;
    let columns = (config.grid as f64 * aspect)
        .round()
        .clamp(1.0, 2.0 * config.grid as f64) as u32;
    (config.grid, columns)
}

/// What the toy's forward takes for images: every image's cells in one `[cells, 3]` tensor, and the
/// number of cells of each image (they differ, so they cannot be stacked).
pub struct ToyImageInputs {
    pub cells: Tensor,
    pub cells_per_image: Tensor,
}

impl ModalityInputs for ToyImageInputs {
    const PARAMS: &'static [&'static str] = &["cells", "cells_per_image"];

    fn into_tensors(self) -> TensorMap {
        let mut map = TensorMap::default();
        map.insert("cells", self.cells);
        map.insert("cells_per_image", self.cells_per_image);
        map
    }

    fn from_tensors(mut tensors: TensorMap) -> Result<Self> {
        Ok(Self {
            cells: tensors.take("cells")?,
            cells_per_image: tensors.take("cells_per_image")?,
        })
    }

    /// Several prompts' cells end to end, so a step's prefills embed their images in one call.
    fn concat(parts: Vec<Self>) -> Result<Option<Self>> {
        let (cells, counts): (Vec<Tensor>, Vec<Tensor>) = parts
            .into_iter()
            .map(|p| (p.cells, p.cells_per_image))
            .unzip();
        Ok(Some(Self {
            cells: Tensor::f_cat(&cells, 0)?,
            cells_per_image: Tensor::f_cat(&counts, 0)?,
        }))
    }
}

/// Mean colour of each cell, in [0, 1].
pub fn map_images(ctx: &ModelContext, images: &[ImageInput]) -> Result<ToyImageInputs> {
    let config = ctx.config::<ToyConfig>()?;
    let mut cells = Vec::new();
    let mut counts = Vec::with_capacity(images.len());
    for image in images {
        let (rows, columns) = cell_layout(&config, image.size());
        let rgb = image.image.to_rgb8();
        let small =
            image::imageops::resize(&rgb, columns, rows, image::imageops::FilterType::Triangle);
        cells.extend(small.pixels().flat_map(|p| p.0.map(|c| c as f32 / 255.0)));
        counts.push((rows * columns) as i64);
    }
    Ok(ToyImageInputs {
        cells: Tensor::from_slice(&cells).reshape([-1, 3]),
        cells_per_image: Tensor::from_slice(&counts),
    })
}

/// The widest image allowed has `2 × grid` columns.
pub fn max_image_tokens(ctx: &ModelContext) -> Result<usize> {
    ToyVlm::num_image_tokens(ctx, widest_image())
}

fn widest_image() -> ImageSize {
    ImageSize {
        width: 64,
        height: 8,
    }
}

/// As many image markers as images, each followed by filler text, padded to the requested length.
pub fn dummy_data(ctx: &ModelContext, request: &DummyRequest) -> Result<ProcessorInputs> {
    let config = ctx.config::<ToyConfig>()?;
    let images = request.counts.get(mmreg_core::Modality::Image);
    let per_image = max_image_tokens(ctx)?;
    let text = request.seq_len.saturating_sub(images * per_image).max(1);
    let mut ids = vec![config.image_token_id; images];
    ids.extend(std::iter::repeat_n(1, text));
    // The costliest image: the widest layout.
    let blank = image::DynamicImage::new_rgb8(widest_image().width, widest_image().height);
    let images = (0..images)
        .map(|i| ImageInput::new(format!("dummy image {i}"), blank.clone()))
        .collect();
    Ok(ProcessorInputs {
        prompt: Prompt::TokenIds(ids),
        multimodal: MultiModalData::with_images(images),
    })
}

/// Expands each image marker into the image's placeholder tokens. Token-id prompts only (no tokenizer).
pub fn input_processor(ctx: &ModelContext, inputs: ProcessorInputs) -> Result<ProcessedInputs> {
    let config = ctx.config::<ToyConfig>()?;
    let Prompt::TokenIds(ids) = inputs.prompt else {
        return Err(Error::bad_input(
            "prompt",
            "the toy model takes token ids only",
        ));
    };
    let markers = ids.iter().filter(|&&t| t == config.image_token_id).count();
    if markers != inputs.multimodal.images.len() {
        return Err(Error::PlaceholderMismatch {
            modality: mmreg_core::Modality::Image,
            marker: format!("token {}", config.image_token_id),
            placeholders: markers,
            items: inputs.multimodal.images.len(),
        });
    }
    let mut token_ids = Vec::with_capacity(ids.len());
    let mut placeholders = Vec::new();
    let mut images = inputs.multimodal.images.iter();
    for id in ids {
        if id == config.image_token_id {
            let image = images.next().expect("counted above");
            let length = ToyVlm::num_image_tokens(ctx, image.size())?;
            let item = placeholders.len();
            placeholders.push(PlaceholderRange {
                modality: mmreg_core::Modality::Image,
                item,
                offset: token_ids.len(),
                length,
            });
            token_ids.extend(std::iter::repeat_n(id, length));
        } else {
            token_ids.push(id);
        }
    }
    Ok(ProcessedInputs {
        token_ids,
        placeholders,
        multimodal: inputs.multimodal,
    })
}

impl LoadModel for ToyVlm {
    fn load(ctx: &ModelContext, weights: &Weights, options: &LoadOptions) -> Result<Self> {
        let config = (*ctx.config::<ToyConfig>()?).clone();
        let (v, h) = (config.vocab_size, config.hidden_size);
        let get =
            |name: &str, shape: &[i64]| weights.get(name, shape, options.dtype, options.device);
        let model = Self {
            embed_tokens: get("embed_tokens.weight", &[v, h])?,
            cell_proj: get("cell_proj.weight", &[h, 3])?,
            lm_head: get("lm_head.weight", &[v, h])?,
            config,
            device: options.device,
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

    fn embed_images(&self, inputs: ToyImageInputs) -> Result<Vec<Tensor>> {
        let features = inputs
            .cells
            .to_kind(self.cell_proj.kind())
            .matmul(&self.cell_proj.tr());
        let counts = Vec::<i64>::try_from(&inputs.cells_per_image)?;
        Ok(features.split_with_sizes(counts, 0))
    }
}

impl MultiModalModel for ToyVlm {
    fn embed_tokens(&self, token_ids: &Tensor) -> Result<Tensor> {
        Ok(Tensor::embedding(
            &self.embed_tokens,
            token_ids,
            -1,
            false,
            false,
        ))
    }

    fn forward(
        &self,
        inputs_embeds: &Tensor,
        batch: &AttentionBatch,
        cache: &mut PagedKvCache,
    ) -> Result<Tensor> {
        let x = inputs_embeds.unsqueeze(1); // one head: [tokens, 1, hidden]
        let scale = (self.config.hidden_size as f64).powf(-0.5);
        let attended = paged_attention(&x, &x, &x, 0, batch, cache, scale)?.squeeze_dim(1);
        let mut hidden = attended + inputs_embeds;
        if let Some(rows) = &batch.logits_indices {
            hidden = hidden.index_select(0, rows);
        }
        Ok(hidden.matmul(&self.lm_head.tr()))
    }

    fn kv_cache_spec(&self) -> KvCacheSpec {
        KvCacheSpec {
            layers: 1,
            kv_heads: 1,
            head_dim: self.config.hidden_size,
            kind: self.embed_tokens.kind(),
        }
    }

    fn device(&self) -> Device {
        self.device
    }

    fn dtype(&self) -> Kind {
        self.embed_tokens.kind()
    }

    fn max_model_len(&self) -> usize {
        self.config.max_position_embeddings
    }
}

/// Writes a toy checkpoint with seeded random weights (config.json and model.safetensors).
pub fn write_checkpoint(dir: &std::path::Path, seed: i64) -> Result<()> {
    let config = serde_json::json!({
        "architectures": ["ToyVlmForCausalLM"],
        "vocab_size": 16,
        "hidden_size": 8,
        "image_token_id": 15,
        "grid": 2,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).map_err(anyhow_io)?;
    tch::manual_seed(seed);
    let tensors = [
        (
            "embed_tokens.weight",
            Tensor::randn([16, 8], (Kind::Float, Device::Cpu)),
        ),
        (
            "cell_proj.weight",
            Tensor::randn([8, 3], (Kind::Float, Device::Cpu)),
        ),
        (
            "lm_head.weight",
            Tensor::randn([16, 8], (Kind::Float, Device::Cpu)),
        ),
    ];
    Tensor::write_safetensors(&tensors, dir.join("model.safetensors"))?;
    Ok(())
}

fn anyhow_io(error: std::io::Error) -> Error {
    Error::Other(error.into())
}

/// Implements `LoadModel`, `MultiModalModel` and `SupportsVision` for a newtype around [`ToyVlm`], so that
/// tests can register variants of the toy (other dummy data, a wrong processor) in a few lines.
#[macro_export]
macro_rules! toy_newtype {
    ($name:ident) => {
        impl mmreg_core::LoadModel for $name {
            fn load(
                ctx: &mmreg_core::ModelContext,
                weights: &mmreg_core::Weights,
                options: &mmreg_core::LoadOptions,
            ) -> mmreg_core::Result<Self> {
                <$crate::ToyVlm as mmreg_core::LoadModel>::load(ctx, weights, options).map($name)
            }
        }

        impl mmreg_core::SupportsVision for $name {
            type ImageInputs = $crate::ToyImageInputs;
            fn num_image_tokens(
                ctx: &mmreg_core::ModelContext,
                size: mmreg_core::ImageSize,
            ) -> mmreg_core::Result<usize> {
                <$crate::ToyVlm as mmreg_core::SupportsVision>::num_image_tokens(ctx, size)
            }
            fn embed_images(
                &self,
                inputs: $crate::ToyImageInputs,
            ) -> mmreg_core::Result<Vec<tch::Tensor>> {
                self.0.embed_images(inputs)
            }
        }

        impl mmreg_core::MultiModalModel for $name {
            fn embed_tokens(&self, token_ids: &tch::Tensor) -> mmreg_core::Result<tch::Tensor> {
                self.0.embed_tokens(token_ids)
            }
            fn forward(
                &self,
                inputs_embeds: &tch::Tensor,
                batch: &mmreg_core::AttentionBatch,
                cache: &mut mmreg_core::PagedKvCache,
            ) -> mmreg_core::Result<tch::Tensor> {
                self.0.forward(inputs_embeds, batch, cache)
            }
            fn kv_cache_spec(&self) -> mmreg_core::KvCacheSpec {
                self.0.kv_cache_spec()
            }
            fn device(&self) -> tch::Device {
                self.0.device()
            }
            fn dtype(&self) -> tch::Kind {
                self.0.dtype()
            }
            fn max_model_len(&self) -> usize {
                self.0.max_model_len()
            }
        }
    };
}
