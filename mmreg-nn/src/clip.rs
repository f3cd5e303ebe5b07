//! The CLIP vision tower (`CLIPVisionModel`) up to the deepest feature layer a model reads, its input
//! type ([`PixelValues`]) and that type's default input mapper: the CLIP image processor configured by
//! the checkpoint's preprocessor_config.json.

use std::sync::Mutex;

use mmreg_core::{
    DefaultMapper, Error, Image, ImageInput, ModalityInputs, ModelContext, Result, TensorMap,
    MAX_IMAGE_PIXELS,
};
use mmreg_engine::graphs::GraphCache;
use mmreg_image::{ClipImageProcessor, PreprocessorConfig};
use serde::Deserialize;
use tch::Tensor;

use crate::parallel::split_heads;
use crate::{patch_embedding, Activation, LayerNorm, Linear, Loader, RowParallelLinear};

/// `vision_config`; missing keys take `CLIPVisionConfig`'s defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
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

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipVisionConfig {
    /// LLaVA's vision tower (CLIP ViT-L/14 at 336 px), used when config.json has no `vision_config`.
    pub fn llava_default() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            image_size: 336,
            patch_size: 14,
            ..Self::default()
        }
    }

    /// Patches per side of the (square) input, once the sizes are known to fit: a positive `patch_size`
    /// that divides `image_size`, and an input of at most `MAX_IMAGE_PIXELS` (the dummy data allocates
    /// one). Checked before anything divides by `patch_size` or sizes a tensor from it.
    pub fn patches_per_side(&self) -> Result<i64> {
        let (size, patch) = (self.image_size, self.patch_size);
        // A size that is not a multiple loses its last pixels to the convolution, as HF's `image_size //
        // patch_size` (SmolVLM-Instruct: 384 px in patches of 14, 27 per side).
        let fits = size > 0
            && patch > 0
            && size >= patch
            && size
                .checked_mul(size)
                .is_some_and(|pixels| pixels as u64 <= MAX_IMAGE_PIXELS);
        if !fits {
            return Err(Error::config(
                "config.json",
                format!(
                    "vision_config: image_size {size} must be at least patch_size {patch} (both positive), \
                     with at most {MAX_IMAGE_PIXELS} pixels"
                ),
            ));
        }
        Ok(size / patch)
    }

    /// Checks what the tower's shapes are computed from, so that a bad config.json is a `Config` error
    /// rather than a division by zero or a nonsensical allocation.
    pub fn validate(&self) -> Result<()> {
        self.patches_per_side()?;
        let sizes_ok = self.hidden_size > 0
            && self.intermediate_size > 0
            && self.num_channels > 0
            && self.num_attention_heads > 0
            && self.hidden_size % self.num_attention_heads == 0;
        if !sizes_ok {
            return Err(Error::config(
                "config.json",
                format!(
                    "vision_config: hidden_size {}, intermediate_size {}, num_channels {} and num_attention_heads {} do not fit together (all positive, heads dividing hidden_size)",
                    self.hidden_size, self.intermediate_size, self.num_channels, self.num_attention_heads
                ),
            ));
        }
        Ok(())
    }
}

/// Self-attention of a tower layer; loaded as a rank of a tensor-parallel group (a sharded tower, see
/// [`vision_loader`]), its share of the heads.
struct Attention {
    /// `q_proj`, `k_proj` and `v_proj` stacked: one matrix multiply.
    qkv_proj: Linear,
    out_proj: RowParallelLinear,
    heads: i64,
    head_dim: i64,
}

impl Attention {
    fn load(loader: &Loader, config: &ClipVisionConfig) -> Result<Self> {
        let h = config.hidden_size;
        let d = h / config.num_attention_heads;
        let (rank, size) = loader.rank_and_size();
        let ((first, heads), _) = split_heads(
            config.num_attention_heads,
            config.num_attention_heads,
            rank,
            size,
        )?;
        let rows = (first * d, heads * d);
        Ok(Self {
            qkv_proj: Linear::load_stacked_rows(
                &[
                    (&loader.pp("q_proj"), h, rows),
                    (&loader.pp("k_proj"), h, rows),
                    (&loader.pp("v_proj"), h, rows),
                ],
                h,
                true,
            )?,
            out_proj: RowParallelLinear::load(&loader.pp("out_proj"), h, h, true)?,
            heads,
            head_dim: d,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.size3().expect("[batch, seq, hidden]");
        // [b, l, 3, heads, d] → three [b, heads, l, d] views.
        let qkv = self
            .qkv_proj
            .forward(x)
            .view([b, l, 3, self.heads, self.head_dim]);
        let split = |i: i64| qkv.select(2, i).transpose(1, 2);
        let (q, k, v) = (split(0), split(1), split(2));
        let scale = (self.head_dim as f64).powf(-0.5);
        let out = crate::attention::attend(&q, &k, &v, false, scale)?;
        self.out_proj.forward(
            &out.transpose(1, 2)
                .reshape([b, l, self.heads * self.head_dim]),
        )
    }
}

/// The loader a vision tower reads its layers with: the model's, when the tower is sharded over the
/// tensor-parallel group ([`mmreg_core::LoadOptions::shard_vision_tower`]); else one without the group
/// (`replicated`: the model's options less the group), so every rank holds the whole tower.
pub(crate) fn vision_loader<'b>(
    loader: &Loader<'b>,
    replicated: &'b mmreg_core::LoadOptions,
) -> Loader<'b> {
    if loader.options.shard_vision_tower {
        loader.clone()
    } else {
        loader.with_options(replicated)
    }
}

/// The model's load options without its tensor-parallel group.
pub(crate) fn unsharded(options: &mmreg_core::LoadOptions) -> mmreg_core::LoadOptions {
    mmreg_core::LoadOptions {
        tensor_parallel: None,
        ..options.clone()
    }
}

/// One pre-norm transformer layer of the CLIP and SigLIP towers (`encoder.layers.N`).
pub(crate) struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: Attention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: RowParallelLinear,
    act: Activation,
}

impl EncoderLayer {
    pub(crate) fn load(loader: &Loader, config: &ClipVisionConfig) -> Result<Self> {
        let (h, i, eps) = (
            config.hidden_size,
            config.intermediate_size,
            config.layer_norm_eps,
        );
        Ok(Self {
            layer_norm1: LayerNorm::load(&loader.pp("layer_norm1"), h, eps)?,
            self_attn: Attention::load(&loader.pp("self_attn"), config)?,
            layer_norm2: LayerNorm::load(&loader.pp("layer_norm2"), h, eps)?,
            fc1: {
                let (rank, size) = loader.rank_and_size();
                let rows = mmreg_core::parallel::shard(i, rank, size);
                Linear::load_rows(&loader.pp("mlp.fc1"), h, i, rows, true)?
            },
            fc2: RowParallelLinear::load(&loader.pp("mlp.fc2"), i, h, true)?,
            act: Activation::parse(&config.hidden_act)?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (x, mlp) = self.forward_unsummed(x, None)?;
        Ok(x + mlp)
    }

    /// The layer with its last residual add left undone: `(x, mlp)`, whose sum is its output. Its input
    /// is `x + pending` when the layer before left its add too: each add then goes into the next
    /// norm's kernel.
    pub(crate) fn forward_unsummed(
        &self,
        x: &Tensor,
        pending: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let (x, normed) = match pending {
            Some(delta) => self.layer_norm1.forward_add(x, delta),
            None => (x.shallow_clone(), self.layer_norm1.forward(x)),
        };
        let attn = self.self_attn.forward(&normed)?;
        let (x, normed) = self.layer_norm2.forward_add(&x, &attn);
        let mlp = self
            .fc2
            .forward(&self.act.forward(&self.fc1.forward(&normed)))?;
        Ok((x, mlp))
    }
}

/// Which hidden states a model reads from the tower: HF's `vision_feature_layer` (as indices into
/// `hidden_states`, 0 being the embeddings) and `vision_feature_select_strategy` (`default` drops CLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureSelect {
    pub layers: Vec<usize>,
    pub drop_cls: bool,
}

/// Embeddings, `pre_layrnorm` and the encoder layers up to the deepest one a model reads.
pub struct ClipVisionTower {
    patch_embedding: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    patch_size: i64,
    select: FeatureSelect,
    /// [`Self::features`] per pixel-value shape, replayed as a CUDA graph on a GPU (its few hundred
    /// kernels are too short to launch one by one).
    graphs: Mutex<GraphCache<Vec<i64>>>,
}

impl ClipVisionTower {
    /// Loads the layers needed for every selected hidden state; later layers and `post_layernorm` are
    /// skipped.
    pub fn load(loader: &Loader, config: &ClipVisionConfig, select: FeatureSelect) -> Result<Self> {
        let replicated = unsharded(loader.options);
        let loader = &vision_loader(loader, &replicated);
        let feature_layers = &select.layers;
        config.validate()?;
        let (h, p, c) = (config.hidden_size, config.patch_size, config.num_channels);
        let positions = config.patches_per_side()?.pow(2) + 1;
        let needed = feature_layers
            .iter()
            .copied()
            .max()
            .unwrap_or(config.num_hidden_layers);
        let embeddings = loader.pp("embeddings");
        let encoder = loader.pp("encoder.layers");
        let layers = (0..needed)
            .map(|i| EncoderLayer::load(&encoder.pp(i), config))
            .collect::<Result<_>>()?;
        // The layers past the deepest one read, as the checkpoint names them (however large
        // `num_hidden_layers` claims to be).
        let layer_prefix = encoder.name("");
        let unread: Vec<String> = loader
            .weights
            .names()
            .filter_map(|name| {
                let index: usize = name
                    .strip_prefix(&layer_prefix)?
                    .split('.')
                    .next()?
                    .parse()
                    .ok()?;
                (index >= needed).then(|| format!("{layer_prefix}{index}"))
            })
            .collect();
        for layer in unread {
            loader.weights.skip_prefix(&layer);
        }
        loader.pp("post_layernorm").skip_all();
        Ok(Self {
            patch_embedding: embeddings.get("patch_embedding.weight", &[h, c, p, p])?,
            class_embedding: embeddings.get("class_embedding", &[h])?,
            position_embedding: embeddings.get("position_embedding.weight", &[positions, h])?,
            pre_layrnorm: LayerNorm::load(&loader.pp("pre_layrnorm"), h, config.layer_norm_eps)?,
            layers,
            patch_size: p,
            graphs: Mutex::new(GraphCache::new(loader.options.device)),
            select,
        })
    }

    /// The selected hidden states of pixel values `[n, 3, H, W]`, CLS dropped if asked, concatenated
    /// along the hidden axis: `[n, tokens, hidden × layers]`.
    pub fn features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let mut graphs = self.graphs.lock().unwrap_or_else(|e| e.into_inner());
        let features = graphs.run(pixel_values.size(), &[pixel_values], |inputs| {
            self.features_eager(&inputs[0])
        })?;
        // A replay's output is overwritten by the next replay.
        Ok(if graphs.captures() {
            features.copy()
        } else {
            features
        })
    }

    fn features_eager(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let states: Vec<Tensor> = self
            .hidden_states(pixel_values, &self.select.layers)?
            .into_iter()
            .map(|h| {
                if self.select.drop_cls {
                    h.narrow(1, 1, h.size()[1] - 1)
                } else {
                    h
                }
            })
            .collect();
        Ok(Tensor::cat(&states, -1))
    }

    /// `hidden_states[i]` for each requested `i`, from pixel values `[n, 3, H, W]`.
    pub fn hidden_states(&self, pixel_values: &Tensor, indices: &[usize]) -> Result<Vec<Tensor>> {
        let pixel_values = pixel_values.to_kind(self.patch_embedding.kind());
        // [n, patches, hidden], row-major
        let patches = patch_embedding(&pixel_values, &self.patch_embedding, None, self.patch_size)?;
        let n = patches.size()[0];
        let class = self
            .class_embedding
            .view([1, 1, -1])
            .expand([n, 1, -1], false);
        let embeddings = Tensor::cat(&[class, patches], 1) + &self.position_embedding;
        let mut x = self.pre_layrnorm.forward(&embeddings);
        // The last layer's MLP output, not yet added to x: the next layer's first norm adds it.
        let mut pending: Option<Tensor> = None;
        let mut states: Vec<Option<Tensor>> = indices.iter().map(|_| None).collect();
        for (depth, layer) in std::iter::once(None)
            .chain(self.layers.iter().map(Some))
            .enumerate()
        {
            if let Some(layer) = layer {
                let (residual, mlp) = layer.forward_unsummed(&x, pending.as_ref())?;
                (x, pending) = (residual, Some(mlp));
            }
            if indices.contains(&depth) {
                // A state read here is the sum itself, which the next layer then takes as it is.
                if let Some(delta) = pending.take() {
                    x += delta;
                }
                for (slot, &index) in states.iter_mut().zip(indices) {
                    if index == depth {
                        *slot = Some(x.shallow_clone());
                    }
                }
            }
        }
        Ok(states
            .into_iter()
            .map(|s| s.expect("the tower loads every requested layer"))
            .collect())
    }
}

/// `pixel_values` `[n, 3, H, W]` float32: the input of CLIP-style vision towers (LLaVA-1.5).
#[derive(Debug)]
pub struct PixelValues {
    pub pixel_values: Tensor,
}

impl ModalityInputs for PixelValues {
    const PARAMS: &'static [&'static str] = &["pixel_values"];

    fn into_tensors(self) -> TensorMap {
        let mut map = TensorMap::default();
        map.insert("pixel_values", self.pixel_values);
        map
    }

    fn from_tensors(mut tensors: TensorMap) -> Result<Self> {
        Ok(Self {
            pixel_values: tensors.take("pixel_values")?,
        })
    }

    fn concat(parts: Vec<Self>) -> Result<Option<Self>> {
        let pixels: Vec<Tensor> = parts.into_iter().map(|p| p.pixel_values).collect();
        Ok(mmreg_core::concat_tensors(&pixels, None)?.map(|pixel_values| Self { pixel_values }))
    }
}

/// The CLIP image processor (resize shortest edge, center crop, rescale, normalize): LLaVA-1.5's.
impl DefaultMapper<Image> for PixelValues {
    fn map(ctx: &ModelContext, images: &[ImageInput]) -> Result<Self> {
        let config = ctx.processor_config::<PreprocessorConfig>()?;
        let processor = ClipImageProcessor::new(&config)
            .map_err(|e| Error::config("preprocessor_config.json", e))?;
        let mut data = Vec::new();
        let mut shape = None;
        for image in images {
            let pixels = processor
                .preprocess(&image.image)
                .map_err(|e| Error::bad_input(&*image.name, e))?;
            shape.get_or_insert(pixels.shape);
            data.extend_from_slice(&pixels.data);
        }
        let [_, c, h, w] = shape.unwrap_or([0, 3, 0, 0]).map(|d| d as i64);
        let pixel_values = Tensor::from_slice(&data).reshape([images.len() as i64, c, h, w]);
        Ok(PixelValues { pixel_values })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mmreg_core::{LoadOptions, Weights};
    use mmreg_engine::kernels;
    use tch::{Device, Kind};

    /// A random three-layer CLIP tower (8 hidden, 2 heads, 8-px images in 4-px patches: 5 positions),
    /// written as a checkpoint at `path`.
    fn tiny_checkpoint(path: &std::path::Path) -> ClipVisionConfig {
        let config = ClipVisionConfig {
            hidden_size: 8,
            intermediate_size: 16,
            num_hidden_layers: 3,
            num_attention_heads: 2,
            image_size: 8,
            patch_size: 4,
            ..ClipVisionConfig::default()
        };
        tch::manual_seed(11);
        let random = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, Device::Cpu)) * 0.5;
        let mut tensors = vec![
            (
                "embeddings.patch_embedding.weight".to_owned(),
                random(&[8, 3, 4, 4]),
            ),
            ("embeddings.class_embedding".to_owned(), random(&[8])),
            (
                "embeddings.position_embedding.weight".to_owned(),
                random(&[5, 8]),
            ),
        ];
        let norm = |name: String| {
            [
                (format!("{name}.weight"), random(&[8]) * 0.1 + 1.0),
                (format!("{name}.bias"), random(&[8])),
            ]
        };
        tensors.extend(norm("pre_layrnorm".into()));
        tensors.extend(norm("post_layernorm".into()));
        for i in 0..3 {
            let layer = format!("encoder.layers.{i}");
            tensors.extend(norm(format!("{layer}.layer_norm1")));
            tensors.extend(norm(format!("{layer}.layer_norm2")));
            for (name, out, inp) in [
                ("self_attn.q_proj", 8, 8),
                ("self_attn.k_proj", 8, 8),
                ("self_attn.v_proj", 8, 8),
                ("self_attn.out_proj", 8, 8),
                ("mlp.fc1", 16, 8),
                ("mlp.fc2", 8, 16),
            ] {
                tensors.push((format!("{layer}.{name}.weight"), random(&[out, inp])));
                tensors.push((format!("{layer}.{name}.bias"), random(&[out])));
            }
        }
        Tensor::write_safetensors(&tensors, path).expect("writes the checkpoint");
        config
    }

    /// The tower leaves each layer's last residual add to the next layer's first norm: every hidden
    /// state it returns is still the layer before's state through one whole layer, whichever states are
    /// asked for (all of them, or the deepest alone), with libtorch's ops and with the fused kernels
    /// (the CPU emulator's add_layer_norm).
    #[test]
    fn hidden_states_are_each_layer_of_the_state_before() {
        let path =
            std::env::temp_dir().join(format!("mmreg-clip-{}.safetensors", std::process::id()));
        let config = tiny_checkpoint(&path);
        let weights = Weights::from_files(std::slice::from_ref(&path)).expect("maps");
        let options = LoadOptions::default();
        let loader = Loader::new(&weights, &options);
        let select = FeatureSelect {
            layers: vec![0, 1, 2, 3],
            drop_cls: false,
        };
        let tower = ClipVisionTower::load(&loader, &config, select).expect("loads");
        let pixels = Tensor::randn([2, 3, 8, 8], (Kind::Float, Device::Cpu));
        let all = tower.hidden_states(&pixels, &[0, 1, 2, 3]).expect("runs");
        for depth in 0..3 {
            let expected = tower.layers[depth].forward(&all[depth]).expect("a layer");
            assert!(
                all[depth + 1].equal(&expected),
                "hidden state {} is not layer {depth} of the one before",
                depth + 1
            );
        }
        let deepest = tower.hidden_states(&pixels, &[3]).expect("runs");
        assert!(deepest[0].equal(&all[3]), "the deepest state alone differs");

        kernels::emulate_on_this_thread(true);
        if kernels::fused_available(Device::Cpu) {
            let before = kernels::launches("add_layer_norm");
            let fused = tower.hidden_states(&pixels, &[1, 3]).expect("runs");
            assert!(
                kernels::launches("add_layer_norm") > before,
                "no fused norm ran"
            );
            for (state, expected) in fused.iter().zip([&all[1], &all[3]]) {
                let error = (state - expected).abs().max().double_value(&[]);
                assert!(error < 1e-4, "fused: off by {error}");
            }
        } else {
            eprintln!(
                "SKIPPED the fused half: the emulated kernels are off (MMREG_FUSED_KERNELS=0)"
            );
        }
        kernels::emulate_on_this_thread(false);
        let _ = std::fs::remove_file(&path);
    }
}
