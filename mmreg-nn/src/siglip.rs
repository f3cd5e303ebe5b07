//! The SigLIP vision tower (`SiglipVisionModel` without its pooling head): patch embeddings plus learned
//! position embeddings (no class token), the same pre-norm encoder layers as CLIP, then
//! `post_layernorm`. PaliGemma and Gemma 3 read its last hidden state.

use std::sync::Mutex;

use mmreg_core::{Error, Result};
use mmreg_engine::graphs::GraphCache;
use serde::Deserialize;
use tch::Tensor;

use crate::clip::{ClipVisionConfig, EncoderLayer};
use crate::{patch_embedding, LayerNorm, Loader};

/// `vision_config` of a SigLIP tower; missing keys take `SiglipVisionConfig`'s defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SiglipVisionConfig {
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

impl Default for SiglipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 16,
            hidden_act: "gelu_pytorch_tanh".into(),
            layer_norm_eps: 1e-6,
        }
    }
}

impl SiglipVisionConfig {
    /// The encoder layers' shapes, which CLIP's layers share.
    fn encoder(&self) -> ClipVisionConfig {
        ClipVisionConfig {
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

    /// Patches per side of the square input, once the sizes are known to fit together.
    pub fn patches_per_side(&self) -> Result<i64> {
        let encoder = self.encoder();
        encoder.validate()?;
        encoder.patches_per_side()
    }

    /// Rows the tower outputs per image: one per patch.
    pub fn num_patches(&self) -> Result<i64> {
        Ok(self.patches_per_side()?.pow(2))
    }
}

/// `vision_tower.vision_model`: embeddings, encoder, `post_layernorm`.
pub struct SiglipVisionTower {
    patch_embedding: Tensor,
    patch_bias: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    patch_size: i64,
    /// Which position embedding each patch takes (Idefics3's bucketed positions); `None`: patch `i`
    /// takes row `i`.
    position_ids: Option<Tensor>,
    /// [`Self::forward`] per pixel-value shape, replayed as a CUDA graph on a GPU.
    graphs: Mutex<GraphCache<Vec<i64>>>,
}

impl SiglipVisionTower {
    /// Loads every layer and `post_layernorm`; the pooling head (`head.*`), which PaliGemma and Gemma 3
    /// do not read, is skipped.
    pub fn load(loader: &Loader, config: &SiglipVisionConfig) -> Result<Self> {
        let replicated = crate::clip::unsharded(loader.options);
        let loader = &crate::clip::vision_loader(loader, &replicated);
        let encoder = config.encoder();
        let (h, p, c) = (config.hidden_size, config.patch_size, config.num_channels);
        let positions = config.num_patches()?;
        let embeddings = loader.pp("embeddings");
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::load(&loader.pp("encoder.layers").pp(i), &encoder))
            .collect::<Result<_>>()?;
        loader.pp("head").skip_all();
        Ok(Self {
            patch_embedding: embeddings.get("patch_embedding.weight", &[h, c, p, p])?,
            patch_bias: embeddings.get("patch_embedding.bias", &[h])?,
            position_embedding: embeddings.get("position_embedding.weight", &[positions, h])?,
            layers,
            post_layernorm: LayerNorm::load(
                &loader.pp("post_layernorm"),
                h,
                config.layer_norm_eps,
            )?,
            patch_size: p,
            position_ids: None,
            graphs: Mutex::new(GraphCache::new(loader.options.device)),
        })
    }

    /// Patch `i` takes position embedding `position_ids[i]` (int64, on the tower's device).
    pub fn with_position_ids(self, position_ids: Tensor) -> Self {
        Self {
            position_ids: Some(position_ids),
            ..self
        }
    }

    /// `last_hidden_state` `[n, patches, hidden]` of pixel values `[n, 3, H, W]`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let mut graphs = self.graphs.lock().unwrap_or_else(|e| e.into_inner());
        let out = graphs.run(pixel_values.size(), &[pixel_values], |inputs| {
            self.forward_eager(&inputs[0])
        })?;
        // A replay's output is overwritten by the next replay.
        Ok(if graphs.captures() { out.copy() } else { out })
    }

    fn forward_eager(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let patches = patch_embedding(
            &pixel_values.to_kind(self.patch_embedding.kind()),
            &self.patch_embedding,
            Some(&self.patch_bias),
            self.patch_size,
        )?; // [n, patches, hidden], row-major
        let positions = match &self.position_ids {
            Some(ids) => self.position_embedding.f_index_select(0, ids)?,
            None => self.position_embedding.shallow_clone(),
        };
        if patches.size()[1] != positions.size()[0] {
            return Err(Error::Model(format!(
                "SigLIP: {} patches but {} position embeddings (pixel values {:?})",
                patches.size()[1],
                positions.size()[0],
                pixel_values.size()
            )));
        }
        let mut x = patches + positions;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        Ok(self.post_layernorm.forward(&x))
    }
}
