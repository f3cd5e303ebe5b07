//! Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): Qwen2-VL's design (see [`crate::qwen2_vl`]: the
//! processor, placeholders, M-RoPE and decoder are the same) with a ViT that attends within windows of
//! `window_size` pixels except in its `fullatt_block_indexes` blocks, uses RMSNorm and a SwiGLU MLP, and
//! spaces a video's temporal positions by the seconds each temporal patch spans.

use mmreg_core::{
    register_input_mapper, register_input_processor, register_model, Error, ImageSize,
    LanguageModel, LoadModel, LoadOptions, ModelContext, MultiModalModel, ProcessedInputs,
    ProcessorInputs, Result, SupportsVideo, SupportsVision, VideoInput, Weights,
};
use mmreg_nn::llama::Llama;
use mmreg_nn::{Activation, Linear, Loader, RmsNorm};
use serde::Deserialize;
use tch::Tensor;

use crate::qwen2_vl::{
    canonical_weight_name, grid_tokens, grids, map_images, map_videos, process, text_config,
    video_grid, QwenImageInputs, QwenVideoInputs, VisionAttention, VisionRotary,
};

/// `vision_config` of a Qwen2.5-VL checkpoint; missing keys take `Qwen2_5_VLVisionConfig`'s defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    pub depth: usize,
    pub hidden_size: i64,
    pub hidden_act: String,
    pub intermediate_size: i64,
    pub num_heads: i64,
    pub in_channels: i64,
    pub patch_size: i64,
    pub spatial_merge_size: i64,
    pub temporal_patch_size: i64,
    pub tokens_per_second: i64,
    /// Pixels per side of an attention window.
    pub window_size: i64,
    /// The decoder's hidden size, which the merger projects to.
    pub out_hidden_size: i64,
    /// The blocks that attend over a whole frame instead of windows.
    pub fullatt_block_indexes: Vec<usize>,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            depth: 32,
            hidden_size: 3584,
            hidden_act: "silu".into(),
            intermediate_size: 3420,
            num_heads: 16,
            in_channels: 3,
            patch_size: 14,
            spatial_merge_size: 2,
            temporal_patch_size: 2,
            tokens_per_second: 4,
            window_size: 112,
            out_hidden_size: 3584,
            fullatt_block_indexes: vec![7, 15, 23, 31],
        }
    }
}

/// config.json of a Qwen2.5-VL checkpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Qwen25VlConfig {
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_config: VisionConfig,
}

impl Default for Qwen25VlConfig {
    fn default() -> Self {
        Self {
            image_token_id: 151655,
            video_token_id: 151656,
            vision_config: VisionConfig::default(),
        }
    }
}

/// The frame rate HF's video processor assumes for frames given without metadata (transformers 5.17).
const DEFAULT_FPS: f64 = 24.0;

/// How far a video's temporal position moves per temporal patch: `tokens_per_second` × the whole
/// seconds a patch spans (`temporal_patch_size / fps`, HF's `second_per_grid_ts`, truncated as HF does:
/// at 24 fps a patch of 2 frames spans 0 whole seconds, so every frame shares its temporal position).
fn video_interval(ctx: &ModelContext, video: &VideoInput) -> Result<i64> {
    let vision = &ctx.config::<Qwen25VlConfig>()?.vision_config;
    let fps = video.fps.unwrap_or(DEFAULT_FPS);
    if !(fps > 0.0 && fps.is_finite()) {
        return Err(Error::bad_input(
            &*video.name,
            format!("fps must be positive, got {fps}"),
        ));
    }
    let seconds = (vision.temporal_patch_size as f64 / fps) as i64;
    Ok(vision.tokens_per_second * seconds)
}

/// Qwen2-VL's processor, with Qwen2.5-VL's temporal spacing of video positions.
pub fn input_processor(ctx: &ModelContext, inputs: ProcessorInputs) -> Result<ProcessedInputs> {
    process(ctx, inputs, |video| video_interval(ctx, video))
}

#[register_model("Qwen2_5_VLForConditionalGeneration")]
#[register_input_mapper(image = map_images, video = map_videos)]
#[register_input_processor(input_processor)]
pub struct Qwen25Vl {
    visual: VisionTransformer,
    language_model: Llama,
}

impl LoadModel for Qwen25Vl {
    fn load(ctx: &ModelContext, weights: &Weights, options: &LoadOptions) -> Result<Self> {
        let config = ctx.config::<Qwen25VlConfig>()?;
        let weights = weights.renamed(canonical_weight_name)?;
        let loader = Loader::new(&weights, options);
        let text = text_config(ctx, "qwen2_5_vl_text")?;
        let model = Self {
            visual: VisionTransformer::load(&loader.pp("visual"), &config.vision_config)?,
            language_model: Llama::load(&loader.pp("language_model"), &loader.pp("lm_head"), text)?,
        };
        weights.check_all_used()?;
        Ok(model)
    }
}

impl SupportsVision for Qwen25Vl {
    type ImageInputs = QwenImageInputs;

    fn num_image_tokens(ctx: &ModelContext, size: ImageSize) -> Result<usize> {
        crate::qwen2_vl::Qwen2Vl::num_image_tokens(ctx, size)
    }

    fn image_token_id(ctx: &ModelContext) -> Result<u32> {
        Ok(ctx.config::<Qwen25VlConfig>()?.image_token_id)
    }

    fn largest_image(ctx: &ModelContext) -> Result<ImageSize> {
        crate::qwen2_vl::Qwen2Vl::largest_image(ctx)
    }

    fn embed_images(&self, inputs: QwenImageInputs) -> Result<Vec<Tensor>> {
        self.visual
            .forward(&inputs.pixel_values, &grids(&inputs.image_grid_thw)?)
    }
}

impl SupportsVideo for Qwen25Vl {
    type VideoInputs = QwenVideoInputs;

    fn num_video_tokens(ctx: &ModelContext, video: &VideoInput) -> Result<usize> {
        grid_tokens(ctx, video_grid(ctx, video)?)
    }

    fn video_token_id(ctx: &ModelContext) -> Result<u32> {
        Ok(ctx.config::<Qwen25VlConfig>()?.video_token_id)
    }

    fn largest_video(ctx: &ModelContext) -> Result<VideoInput> {
        crate::qwen2_vl::Qwen2Vl::largest_video(ctx)
    }

    fn embed_videos(&self, inputs: QwenVideoInputs) -> Result<Vec<Tensor>> {
        self.visual
            .forward(&inputs.pixel_values_videos, &grids(&inputs.video_grid_thw)?)
    }
}

impl MultiModalModel for Qwen25Vl {
    fn language_model(&self) -> &dyn LanguageModel {
        &self.language_model
    }
}

/// `blocks.N`: pre-RMSNorm attention and SwiGLU MLP with residuals.
struct VisionBlock {
    norm1: RmsNorm,
    attn: VisionAttention,
    norm2: RmsNorm,
    gate_up_proj: Linear,
    act: Activation,
    down_proj: Linear,
}

impl VisionBlock {
    fn load(loader: &Loader, c: &VisionConfig) -> Result<Self> {
        let (dim, hidden) = (c.hidden_size, c.intermediate_size);
        let mlp = loader.pp("mlp");
        Ok(Self {
            norm1: RmsNorm::load(&loader.pp("norm1"), dim, 1e-6)?,
            attn: VisionAttention::load(&loader.pp("attn"), dim, c.num_heads)?,
            norm2: RmsNorm::load(&loader.pp("norm2"), dim, 1e-6)?,
            gate_up_proj: Linear::load_stacked(
                &[(&mlp.pp("gate_proj"), hidden), (&mlp.pp("up_proj"), hidden)],
                dim,
                true,
            )?,
            act: Activation::parse(&c.hidden_act)?,
            down_proj: Linear::load(&mlp.pp("down_proj"), hidden, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor, rotary: &VisionRotary, segments: &[i64]) -> Tensor {
        let x = x + self.attn.forward(&self.norm1.forward(x), rotary, segments);
        let mlp = self.down_proj.forward(
            &self
                .gate_up_proj
                .forward_gated(&self.norm2.forward(&x), self.act),
        );
        x + mlp
    }
}

/// HF's `get_vision_window_index`: the order in which the merged patches (`merge × merge` units) go
/// through the windowed blocks (window by window, each window row-major), and the lengths of the
/// windows in patches.
fn window_order(grids: &[[i64; 3]], merge: i64, window: i64) -> (Vec<i64>, Vec<i64>) {
    let (mut order, mut lengths) = (Vec::new(), Vec::new());
    let mut first = 0;
    for &[t, h, w] in grids {
        let (lh, lw) = (h / merge, w / merge);
        let (windows_h, windows_w) = (lh / window + 1, lw / window + 1);
        for frame in 0..t {
            for wy in 0..windows_h {
                for wx in 0..windows_w {
                    let before = order.len();
                    for y in wy * window..((wy + 1) * window).min(lh) {
                        for x in wx * window..((wx + 1) * window).min(lw) {
                            order.push(first + (frame * lh + y) * lw + x);
                        }
                    }
                    let units = (order.len() - before) as i64;
                    if units > 0 {
                        lengths.push(units * merge * merge);
                    }
                }
            }
        }
        first += t * lh * lw;
    }
    (order, lengths)
}

/// `visual`: patch embedding, windowed and full-attention blocks, and the merger.
pub struct VisionTransformer {
    patch_embed: Tensor,
    blocks: Vec<VisionBlock>,
    merger_ln_q: RmsNorm,
    merger_fc1: Linear,
    merger_fc2: Linear,
    config: VisionConfig,
}

impl VisionTransformer {
    pub fn load(loader: &Loader, c: &VisionConfig) -> Result<Self> {
        let (p, t, m) = (c.patch_size, c.temporal_patch_size, c.spatial_merge_size);
        let fits = c.num_heads > 0
            && c.hidden_size % c.num_heads == 0
            && p > 0
            && t > 0
            && m > 0
            && c.window_size >= p * m;
        if !fits {
            return Err(Error::config(
                "config.json",
                format!(
                    "vision_config: hidden_size {}, num_heads {}, patch_size {p}, temporal_patch_size {t}, spatial_merge_size {m} and window_size {} do not fit together",
                    c.hidden_size, c.num_heads, c.window_size
                ),
            ));
        }
        let merged = c.hidden_size * m * m;
        Ok(Self {
            patch_embed: loader.get(
                "patch_embed.proj.weight",
                &[c.hidden_size, c.in_channels, t, p, p],
            )?,
            blocks: (0..c.depth)
                .map(|i| VisionBlock::load(&loader.pp("blocks").pp(i), c))
                .collect::<Result<_>>()?,
            merger_ln_q: RmsNorm::load(&loader.pp("merger.ln_q"), c.hidden_size, 1e-6)?,
            merger_fc1: Linear::load(&loader.pp("merger.mlp.0"), merged, merged, true)?,
            merger_fc2: Linear::load(&loader.pp("merger.mlp.2"), merged, c.out_hidden_size, true)?,
            config: c.clone(),
        })
    }

    /// One `[tokens, hidden]` tensor per item, for patches `[patches, C·T·P·P]` of items with `grids`.
    pub fn forward(&self, pixel_values: &Tensor, grids: &[[i64; 3]]) -> Result<Vec<Tensor>> {
        let c = &self.config;
        let (merge, unit) = (
            c.spatial_merge_size,
            c.spatial_merge_size * c.spatial_merge_size,
        );
        let patches: i64 = grids.iter().map(|[t, h, w]| t * h * w).sum();
        if pixel_values.size().first() != Some(&patches) {
            return Err(Error::Model(format!(
                "Qwen2.5-VL: {:?} pixel rows for grids {grids:?} ({patches} patches)",
                pixel_values.size()
            )));
        }
        let x = pixel_values.to_kind(self.patch_embed.kind()).view([
            -1,
            c.in_channels,
            c.temporal_patch_size,
            c.patch_size,
            c.patch_size,
        ]);
        let stride = [c.temporal_patch_size, c.patch_size, c.patch_size];
        let x = x
            .f_conv3d(
                &self.patch_embed,
                None::<Tensor>,
                stride,
                [0, 0, 0],
                [1, 1, 1],
                1,
            )?
            .view([-1, c.hidden_size]);
        // Windows of merged patches: reorder every per-patch tensor so that each window is contiguous.
        let (order, windows) = window_order(grids, merge, c.window_size / merge / c.patch_size);
        let order = Tensor::from_slice(&order).to_device(x.device());
        let by_window = |t: &Tensor| -> Tensor {
            let width = t.size()[1];
            t.view([-1, unit, width])
                .index_select(0, &order)
                .view([-1, width])
        };
        let mut x = by_window(&x);
        let rotary = VisionRotary::new(grids, merge, c.hidden_size / c.num_heads, x.device())
            .reordered(by_window);
        let frames: Vec<i64> = grids
            .iter()
            .flat_map(|&[t, h, w]| std::iter::repeat_n(h * w, t as usize))
            .collect();
        for (i, block) in self.blocks.iter().enumerate() {
            let segments = if c.fullatt_block_indexes.contains(&i) {
                &frames
            } else {
                &windows
            };
            x = block.forward(&x, &rotary, segments);
        }
        let merged = self
            .merger_ln_q
            .forward(&x)
            .view([-1, c.hidden_size * unit]);
        let merged = self
            .merger_fc2
            .forward(&self.merger_fc1.forward(&merged).gelu("none"));
        // Back to the patches' own order.
        let merged = merged.index_select(0, &order.argsort(0, false));
        let tokens: Vec<i64> = grids.iter().map(|[t, h, w]| t * h * w / unit).collect();
        Ok(merged.split_with_sizes(tokens.as_slice(), 0))
    }
}
