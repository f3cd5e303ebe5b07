//! Qwen2-VL (`Qwen2VLForConditionalGeneration`): a ViT at native resolution (each image or video its own
//! number of 14-px patches, packed into one tower call with attention kept inside each frame, 2-D rotary
//! embeddings, a 2×2 patch merger) and the Qwen2 decoder with multimodal rotary embeddings (M-RoPE: a
//! temporal, a height and a width position per token). Images and videos (given as frames) in one prompt,
//! each written `<|vision_start|><|image_pad|><|vision_end|>` (or `<|video_pad|>`) and expanded into its
//! placeholders by [`input_processor`], which also computes the M-RoPE positions ([`rope_index`]).

use mmreg_core::defaults::{expand_placeholders, prompt_ids};
use mmreg_core::{
    register_input_mapper, register_input_processor, register_model, Error, ImageInput, ImageSize,
    LanguageModel, LoadModel, LoadOptions, Modality, ModalityInputs, ModelContext, MultiModalModel,
    PlaceholderRange, ProcessedInputs, ProcessorInputs, PromptPositions, Result, SupportsVideo,
    SupportsVision, VideoInput, Weights,
};
use mmreg_image::{PreprocessorConfig, Qwen2VlImageProcessor};
use mmreg_nn::llama::{Llama, TextConfig, TextConfigJson};
use mmreg_nn::{Activation, LayerNorm, Linear, Loader};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

/// `vision_config` of a Qwen2-VL checkpoint; missing keys take `Qwen2VLVisionConfig`'s defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    pub depth: usize,
    pub embed_dim: i64,
    /// The decoder's hidden size, which the merger projects to.
    pub hidden_size: i64,
    pub hidden_act: String,
    pub mlp_ratio: f64,
    pub num_heads: i64,
    pub in_channels: i64,
    pub patch_size: i64,
    pub spatial_merge_size: i64,
    pub temporal_patch_size: i64,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self {
            depth: 32,
            embed_dim: 1280,
            hidden_size: 3584,
            hidden_act: "quick_gelu".into(),
            mlp_ratio: 4.0,
            num_heads: 16,
            in_channels: 3,
            patch_size: 14,
            spatial_merge_size: 2,
            temporal_patch_size: 2,
        }
    }
}

/// config.json of a Qwen2-VL checkpoint (the decoder's keys in `text_config`, or at the top level in
/// configs written by transformers 4.x: see [`text_config`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Qwen2VlConfig {
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_config: VisionConfig,
}

impl Default for Qwen2VlConfig {
    fn default() -> Self {
        Self {
            image_token_id: 151655,
            video_token_id: 151656,
            vision_start_token_id: 151652,
            vision_config: VisionConfig::default(),
        }
    }
}

/// The decoder's config: `text_config`, or the top level of a transformers-4.x config, with
/// `tie_word_embeddings` read from the top level as Qwen2VLConfig keeps it.
pub fn text_config(ctx: &ModelContext, model_type: &str) -> Result<TextConfig> {
    let json = ctx.config_json();
    let mut text = json.get("text_config").unwrap_or(json).clone();
    if let Some(object) = text.as_object_mut() {
        object.insert("model_type".into(), model_type.into());
        if let Some(tie) = json.get("tie_word_embeddings") {
            object.entry("tie_word_embeddings").or_insert(tie.clone());
        }
    }
    TextConfigJson::deserialize(&text)
        .map_err(|e| Error::config("config.json", e))?
        .resolve()
}

/// The image processor of the checkpoint (preprocessor_config.json).
pub(crate) fn image_processor(ctx: &ModelContext) -> Result<Qwen2VlImageProcessor> {
    let config = ctx.processor_config::<PreprocessorConfig>()?;
    Qwen2VlImageProcessor::new(&config).map_err(|e| Error::config("preprocessor_config.json", e))
}

/// The video processor: `video_processor` of processor_config.json (transformers 5.x) or
/// video_preprocessor_config.json (4.x), where the checkpoint has either, else the image processor's
/// settings.
pub(crate) fn video_processor(ctx: &ModelContext) -> Result<Qwen2VlImageProcessor> {
    let nested = ctx
        .json_file("processor_config.json")?
        .and_then(|p| p.get("video_processor").cloned())
        .map(|json| ("processor_config.json", json));
    let file = "video_preprocessor_config.json";
    let Some((file, json)) = nested.or(ctx.json_file(file)?.map(|json| (file, json))) else {
        return image_processor(ctx);
    };
    let config = PreprocessorConfig::deserialize(&json).map_err(|e| Error::config(file, e))?;
    Qwen2VlImageProcessor::new(&config).map_err(|e| Error::config(file, e))
}

/// `[t, h, w]` patches of an image: the one function behind every image-token count.
pub fn image_grid(ctx: &ModelContext, size: ImageSize) -> Result<[i64; 3]> {
    let grid = image_processor(ctx)?
        .grid(size.height as usize, size.width as usize)
        .map_err(|e| Error::bad_input("image", e))?;
    Ok(grid.map(|d| d as i64))
}

/// `[t, h, w]` patches of a video (frames of one size, their count padded to the temporal patch).
pub fn video_grid(ctx: &ModelContext, video: &VideoInput) -> Result<[i64; 3]> {
    let first = video
        .frames
        .first()
        .ok_or_else(|| Error::bad_input(&*video.name, "a video needs at least one frame"))?;
    let (width, height) = (first.width(), first.height());
    if let Some(other) = video
        .frames
        .iter()
        .find(|f| (f.width(), f.height()) != (width, height))
    {
        return Err(Error::bad_input(
            &*video.name,
            format!(
                "every frame of a video must have one size: {width}x{height} and {}x{}",
                other.width(),
                other.height()
            ),
        ));
    }
    let grid = video_processor(ctx)?
        .video_grid(video.frames.len(), height as usize, width as usize)
        .map_err(|e| Error::bad_input(&*video.name, e))?;
    Ok(grid.map(|d| d as i64))
}

/// Placeholder tokens of a `[t, h, w]` grid: the merger folds `merge × merge` patches into one.
pub(crate) fn grid_tokens(ctx: &ModelContext, grid: [i64; 3]) -> Result<usize> {
    let merge = ctx
        .config::<Qwen2VlConfig>()?
        .vision_config
        .spatial_merge_size;
    Ok((grid[0] * grid[1] * grid[2] / (merge * merge)) as usize)
}

/// Tokenizes (the chat template's text, or ids), expands each `<|image_pad|>` and `<|video_pad|>` into
/// its item's placeholders, and computes the prompt's M-RoPE positions.
pub fn input_processor(ctx: &ModelContext, inputs: ProcessorInputs) -> Result<ProcessedInputs> {
    process(ctx, inputs, |_| Ok(1))
}

/// [`input_processor`] where a video's temporal positions advance by `video_interval(video)` per
/// temporal patch (1 in Qwen2-VL; Qwen2.5-VL spaces them by the seconds they span).
pub(crate) fn process(
    ctx: &ModelContext,
    inputs: ProcessorInputs,
    video_interval: impl Fn(&VideoInput) -> Result<i64>,
) -> Result<ProcessedInputs> {
    let config = ctx.config::<Qwen2VlConfig>()?;
    let data = &inputs.multimodal;
    let grids = |modality| -> Result<Vec<[i64; 3]>> {
        match modality {
            Modality::Image => data
                .images
                .iter()
                .map(|i| image_grid(ctx, i.size()))
                .collect(),
            Modality::Video => data.videos.iter().map(|v| video_grid(ctx, v)).collect(),
        }
    };
    let (image_grids, video_grids) = (grids(Modality::Image)?, grids(Modality::Video)?);
    let intervals = data
        .videos
        .iter()
        .map(&video_interval)
        .collect::<Result<Vec<_>>>()?;
    let ids = prompt_ids(ctx, inputs.prompt)?;
    let markers = [
        (Modality::Image, config.image_token_id),
        (Modality::Video, config.video_token_id),
    ];
    let (token_ids, placeholders) =
        expand_placeholders(ctx, &ids, &markers, data, |modality, item| {
            let grid = match modality {
                Modality::Image => image_grids[item],
                Modality::Video => video_grids[item],
            };
            grid_tokens(ctx, grid)
        })?;
    let merge = config.vision_config.spatial_merge_size;
    let positions = rope_index(token_ids.len(), &placeholders, merge, |range| {
        match range.modality {
            Modality::Image => (image_grids[range.item], 1),
            Modality::Video => (video_grids[range.item], intervals[range.item]),
        }
    });
    Ok(ProcessedInputs {
        token_ids,
        placeholders,
        multimodal: inputs.multimodal,
        positions: Some(positions),
        bidirectional: Vec::new(),
    })
}

/// HF's `get_rope_index`: text tokens count up in all three rows; an item's placeholders take its
/// (temporal × interval, height, width) patch coordinates, offset by the position where the item starts;
/// the text after it continues from that start plus the item's larger side. `delta` continues the
/// positions past the prompt. `grid` gives each range's item grid and temporal interval.
pub fn rope_index(
    len: usize,
    placeholders: &[PlaceholderRange],
    merge: i64,
    grid: impl Fn(&PlaceholderRange) -> ([i64; 3], i64),
) -> PromptPositions {
    let mut rows = [vec![0i64; len], vec![0i64; len], vec![0i64; len]];
    let mut ranges: Vec<&PlaceholderRange> = placeholders.iter().collect();
    ranges.sort_by_key(|r| r.offset);
    let (mut at, mut next) = (0usize, 0i64);
    let mut text_until = |end: usize, at: &mut usize, next: &mut i64| {
        for i in *at..end {
            for row in rows.iter_mut() {
                row[i] = *next;
            }
            *next += 1;
        }
        *at = end;
    };
    let mut vision = Vec::new();
    for range in ranges {
        text_until(range.offset, &mut at, &mut next);
        let ([_, h, w], interval) = grid(range);
        let (h, w) = (h / merge, w / merge);
        let start = next;
        for (k, i) in (range.offset..range.offset + range.length).enumerate() {
            let k = k as i64;
            let t = start + k / (h * w) * interval;
            vision.push((i, [t, start + (k / w) % h, start + k % w]));
        }
        next = start + h.max(w);
        at = range.offset + range.length;
    }
    text_until(len, &mut at, &mut next);
    for (i, [t, h, w]) in vision {
        rows[0][i] = t;
        rows[1][i] = h;
        rows[2][i] = w;
    }
    let max = rows.iter().flatten().copied().max().unwrap_or(-1);
    PromptPositions {
        sections: 3,
        ids: rows.concat(),
        delta: max + 1 - len as i64,
    }
}

/// Images as the ViT takes them: every image's patches `[patches, C·T·P·P]` end to end, and each image's
/// `[t, h, w]` grid.
#[derive(Debug, ModalityInputs)]
pub struct QwenImageInputs {
    pub pixel_values: Tensor,
    #[inputs(host)]
    pub image_grid_thw: Tensor,
}

/// Videos as the ViT takes them, as [`QwenImageInputs`] under the video parameter names.
#[derive(Debug, ModalityInputs)]
pub struct QwenVideoInputs {
    pub pixel_values_videos: Tensor,
    #[inputs(host)]
    pub video_grid_thw: Tensor,
}

/// One item's patches and grid, from the image or video processor.
fn patches(processed: mmreg_image::QwenPatches) -> (Vec<f32>, [i64; 3], i64) {
    let grid = processed.grid_thw.map(|d| d as i64);
    (processed.data, grid, processed.shape[1] as i64)
}

/// Patches of several items joined, and their grids `[items, 3]`.
fn join(items: Vec<(Vec<f32>, [i64; 3], i64)>, width: i64) -> (Tensor, Tensor) {
    let grids: Vec<i64> = items.iter().flat_map(|(_, g, _)| *g).collect();
    let data: Vec<f32> = items.into_iter().flat_map(|(d, _, _)| d).collect();
    (
        Tensor::from_slice(&data).view([-1, width]),
        Tensor::from_slice(&grids).view([-1, 3]),
    )
}

/// The PIL-exact Qwen2-VL image processor (smart resize to multiples of 28, patches of 2×14×14).
pub fn map_images(ctx: &ModelContext, images: &[ImageInput]) -> Result<QwenImageInputs> {
    let processor = image_processor(ctx)?;
    let items = images
        .iter()
        .map(|i| {
            let out = processor
                .preprocess(&i.image)
                .map_err(|e| Error::bad_input(&*i.name, e))?;
            Ok(patches(out))
        })
        .collect::<Result<Vec<_>>>()?;
    let width = items.first().map_or(1, |i| i.2);
    let (pixel_values, image_grid_thw) = join(items, width);
    Ok(QwenImageInputs {
        pixel_values,
        image_grid_thw,
    })
}

/// The video processor over each video's frames.
pub fn map_videos(ctx: &ModelContext, videos: &[VideoInput]) -> Result<QwenVideoInputs> {
    let processor = video_processor(ctx)?;
    let items = videos
        .iter()
        .map(|v| {
            video_grid(ctx, v)?;
            let out = processor
                .preprocess_video(&v.frames)
                .map_err(|e| Error::bad_input(&*v.name, e))?;
            Ok(patches(out))
        })
        .collect::<Result<Vec<_>>>()?;
    let width = items.first().map_or(1, |i| i.2);
    let (pixel_values_videos, video_grid_thw) = join(items, width);
    Ok(QwenVideoInputs {
        pixel_values_videos,
        video_grid_thw,
    })
}

#[register_model("Qwen2VLForConditionalGeneration")]
#[register_input_mapper(image = map_images, video = map_videos)]
#[register_input_processor(input_processor)]
pub struct Qwen2Vl {
    visual: VisionTransformer,
    language_model: Llama,
}

/// Maps both weight-name layouts to one: transformers 5.x's (`model.visual.*`,
/// `model.language_model.*`, `lm_head.*`) and 4.x's (`visual.*`, `model.*`, `lm_head.*`).
pub fn canonical_weight_name(name: &str) -> Option<String> {
    if name.ends_with("rotary_emb.inv_freq") {
        return None;
    }
    Some(if let Some(rest) = name.strip_prefix("model.visual.") {
        format!("visual.{rest}")
    } else if let Some(rest) = name.strip_prefix("model.language_model.") {
        format!("language_model.{rest}")
    } else if let Some(rest) = name.strip_prefix("model.") {
        format!("language_model.{rest}")
    } else {
        name.to_owned()
    })
}

impl LoadModel for Qwen2Vl {
    fn load(ctx: &ModelContext, weights: &Weights, options: &LoadOptions) -> Result<Self> {
        let config = ctx.config::<Qwen2VlConfig>()?;
        let weights = weights.renamed(canonical_weight_name)?;
        let loader = Loader::new(&weights, options);
        let text = text_config(ctx, "qwen2_vl_text")?;
        let model = Self {
            visual: VisionTransformer::load(&loader.pp("visual"), &config.vision_config)?,
            language_model: Llama::load(&loader.pp("language_model"), &loader.pp("lm_head"), text)?,
        };
        weights.check_all_used()?;
        Ok(model)
    }
}

/// The grids `[items, 3]` of a mapped input as host integers.
pub(crate) fn grids(grid_thw: &Tensor) -> Result<Vec<[i64; 3]>> {
    let flat = Vec::<i64>::try_from(grid_thw.to_device(Device::Cpu).flatten(0, -1))?;
    Ok(flat.chunks(3).map(|g| [g[0], g[1], g[2]]).collect())
}

impl SupportsVision for Qwen2Vl {
    type ImageInputs = QwenImageInputs;

    fn num_image_tokens(ctx: &ModelContext, size: ImageSize) -> Result<usize> {
        grid_tokens(ctx, image_grid(ctx, size)?)
    }

    fn image_token_id(ctx: &ModelContext) -> Result<u32> {
        Ok(ctx.config::<Qwen2VlConfig>()?.image_token_id)
    }

    /// The image of `max_pixels` (the processor's cap) in the most tokens.
    fn largest_image(ctx: &ModelContext) -> Result<ImageSize> {
        let (height, width) = image_processor(ctx)?.largest_size();
        Ok(ImageSize {
            width: width as u32,
            height: height as u32,
        })
    }

    fn embed_images(&self, inputs: QwenImageInputs) -> Result<Vec<Tensor>> {
        self.visual
            .forward(&inputs.pixel_values, &grids(&inputs.image_grid_thw)?)
    }
}

impl SupportsVideo for Qwen2Vl {
    type VideoInputs = QwenVideoInputs;

    fn num_video_tokens(ctx: &ModelContext, video: &VideoInput) -> Result<usize> {
        grid_tokens(ctx, video_grid(ctx, video)?)
    }

    fn video_token_id(ctx: &ModelContext) -> Result<u32> {
        Ok(ctx.config::<Qwen2VlConfig>()?.video_token_id)
    }

    /// The longest video the limits allow, its frames of the largest size: the processor's
    /// `max_frames`, or as many as fit in the decoder's context, whichever is fewer.
    fn largest_video(ctx: &ModelContext) -> Result<VideoInput> {
        let processor = video_processor(ctx)?;
        let (height, width) = processor.largest_size();
        let temporal = ctx
            .config::<Qwen2VlConfig>()?
            .vision_config
            .temporal_patch_size as usize;
        let frame = image::DynamicImage::new_rgb8(width as u32, height as u32);
        let per_patch = grid_tokens(
            ctx,
            image_grid(
                ctx,
                ImageSize {
                    width: width as u32,
                    height: height as u32,
                },
            )?,
        )?;
        let context = text_config(ctx, "qwen2_vl_text")?.max_position_embeddings;
        let fit = (context / per_patch.max(1)).max(1) * temporal;
        let frames = processor.max_frames().min(fit).max(temporal);
        Ok(VideoInput::new("dummy video", vec![frame; frames]))
    }

    fn embed_videos(&self, inputs: QwenVideoInputs) -> Result<Vec<Tensor>> {
        self.visual
            .forward(&inputs.pixel_values_videos, &grids(&inputs.video_grid_thw)?)
    }
}

impl MultiModalModel for Qwen2Vl {
    fn language_model(&self) -> &dyn LanguageModel {
        &self.language_model
    }
}

/// `attn`: multi-head attention inside each frame of each item, with 2-D rotary embeddings.
pub(crate) struct VisionAttention {
    qkv: Linear,
    proj: Linear,
    heads: i64,
}

impl VisionAttention {
    pub(crate) fn load(loader: &Loader, dim: i64, heads: i64) -> Result<Self> {
        Ok(Self {
            qkv: Linear::load(&loader.pp("qkv"), dim, 3 * dim, true)?,
            proj: Linear::load(&loader.pp("proj"), dim, dim, true)?,
            heads,
        })
    }

    /// `x` `[patches, dim]`; `segments` the lengths of the runs that attend among themselves.
    pub(crate) fn forward(&self, x: &Tensor, rotary: &VisionRotary, segments: &[i64]) -> Tensor {
        let n = x.size()[0];
        let qkv = self
            .qkv
            .forward(x)
            .view([n, 3, self.heads, -1])
            .permute([1, 0, 2, 3]);
        let (q, k) = rotary.apply(&qkv.get(0), &qkv.get(1));
        // [patches, heads, d] → [1, heads, patches, d], split into the segments.
        let heads_first = |t: &Tensor| t.transpose(0, 1).unsqueeze(0);
        let (q, k, v) = (heads_first(&q), heads_first(&k), heads_first(&qkv.get(2)));
        let outputs: Vec<Tensor> = q
            .split_with_sizes(segments, 2)
            .iter()
            .zip(k.split_with_sizes(segments, 2))
            .zip(v.split_with_sizes(segments, 2))
            .map(|((q, k), v)| {
                Tensor::scaled_dot_product_attention(
                    q,
                    &k,
                    &v,
                    None::<Tensor>,
                    0.0,
                    false,
                    None,
                    false,
                )
            })
            .collect();
        let out = Tensor::cat(&outputs, 2).squeeze_dim(0).transpose(0, 1);
        self.proj.forward(&out.reshape([n, -1]))
    }
}

/// cos and sin of the ViT's 2-D rotary embedding at every patch, `[patches, head_dim]` in f32.
pub(crate) struct VisionRotary {
    cos: Tensor,
    sin: Tensor,
}

impl VisionRotary {
    /// HF's `Qwen2VLVisionRotaryEmbedding`: each patch's (row, column) in its item, laid out block by
    /// block of `merge × merge` patches; half the frequencies follow the row, half the column.
    pub(crate) fn new(grids: &[[i64; 3]], merge: i64, head_dim: i64, device: Device) -> Self {
        let mut rows = Vec::new();
        let mut columns = Vec::new();
        for &[t, h, w] in grids {
            for _ in 0..t {
                for block_row in 0..h / merge {
                    for block_column in 0..w / merge {
                        for r in 0..merge {
                            for c in 0..merge {
                                rows.push(block_row * merge + r);
                                columns.push(block_column * merge + c);
                            }
                        }
                    }
                }
            }
        }
        let spatial = head_dim / 2;
        let exponent = Tensor::arange_start_step(0, spatial, 2, (Kind::Int64, Device::Cpu))
            .to_kind(Kind::Float)
            / spatial as f64;
        let inv_freq = Tensor::scalar_tensor(10000.0, (Kind::Float, Device::Cpu))
            .pow(&exponent)
            .reciprocal();
        let angle = |p: &[i64]| Tensor::from_slice(p).to_kind(Kind::Float).unsqueeze(1) * &inv_freq;
        let half = Tensor::cat(&[angle(&rows), angle(&columns)], 1);
        let freqs = Tensor::cat(&[&half, &half], 1).to_device(device);
        Self {
            cos: freqs.cos(),
            sin: freqs.sin(),
        }
    }

    /// The same angles with the patches reordered by `f` (Qwen2.5-VL's windows).
    pub(crate) fn reordered(self, f: impl Fn(&Tensor) -> Tensor) -> Self {
        Self {
            cos: f(&self.cos),
            sin: f(&self.sin),
        }
    }

    /// `x·cos + rotate_half(x)·sin` on queries and keys `[patches, heads, d]`, in f32 as HF computes it.
    pub(crate) fn apply(&self, q: &Tensor, k: &Tensor) -> (Tensor, Tensor) {
        let (cos, sin) = (self.cos.unsqueeze(1), self.sin.unsqueeze(1));
        let rotate = |x: &Tensor| {
            let kind = x.kind();
            let x = x.to_kind(Kind::Float);
            let half = x.size()[2] / 2;
            let rotated = Tensor::cat(&[-x.narrow(2, half, half), x.narrow(2, 0, half)], 2);
            (&x * &cos + rotated * &sin).to_kind(kind)
        };
        (rotate(q), rotate(k))
    }
}

/// `blocks.N`: pre-norm attention and MLP with residuals.
struct VisionBlock {
    norm1: LayerNorm,
    attn: VisionAttention,
    norm2: LayerNorm,
    fc1: Linear,
    act: Activation,
    fc2: Linear,
}

impl VisionBlock {
    fn load(loader: &Loader, c: &VisionConfig) -> Result<Self> {
        let (dim, hidden) = (c.embed_dim, (c.embed_dim as f64 * c.mlp_ratio) as i64);
        Ok(Self {
            norm1: LayerNorm::load(&loader.pp("norm1"), dim, 1e-6)?,
            attn: VisionAttention::load(&loader.pp("attn"), dim, c.num_heads)?,
            norm2: LayerNorm::load(&loader.pp("norm2"), dim, 1e-6)?,
            fc1: Linear::load(&loader.pp("mlp.fc1"), dim, hidden, true)?,
            act: Activation::parse(&c.hidden_act)?,
            fc2: Linear::load(&loader.pp("mlp.fc2"), hidden, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor, rotary: &VisionRotary, segments: &[i64]) -> Tensor {
        let x = x + self.attn.forward(&self.norm1.forward(x), rotary, segments);
        let mlp = self
            .fc2
            .forward(&self.act.forward(&self.fc1.forward(&self.norm2.forward(&x))));
        x + mlp
    }
}

/// `visual`: patch embedding, the blocks, and the merger that folds each 2×2 block of patches into one
/// token of the decoder's width.
pub struct VisionTransformer {
    patch_embed: Tensor,
    blocks: Vec<VisionBlock>,
    merger_ln_q: LayerNorm,
    merger_fc1: Linear,
    merger_fc2: Linear,
    config: VisionConfig,
}

impl VisionTransformer {
    pub fn load(loader: &Loader, c: &VisionConfig) -> Result<Self> {
        let (p, t) = (c.patch_size, c.temporal_patch_size);
        let merged = c.embed_dim * c.spatial_merge_size * c.spatial_merge_size;
        let heads_fit = c.num_heads > 0 && c.embed_dim % c.num_heads == 0;
        if !heads_fit || c.spatial_merge_size <= 0 || p <= 0 || t <= 0 {
            return Err(Error::config(
                "config.json",
                format!(
                    "vision_config: embed_dim {}, num_heads {}, patch_size {p}, temporal_patch_size {t} and spatial_merge_size {} do not fit together",
                    c.embed_dim, c.num_heads, c.spatial_merge_size
                ),
            ));
        }
        Ok(Self {
            patch_embed: loader.get(
                "patch_embed.proj.weight",
                &[c.embed_dim, c.in_channels, t, p, p],
            )?,
            blocks: (0..c.depth)
                .map(|i| VisionBlock::load(&loader.pp("blocks").pp(i), c))
                .collect::<Result<_>>()?,
            merger_ln_q: LayerNorm::load(&loader.pp("merger.ln_q"), c.embed_dim, 1e-6)?,
            merger_fc1: Linear::load(&loader.pp("merger.mlp.0"), merged, merged, true)?,
            merger_fc2: Linear::load(&loader.pp("merger.mlp.2"), merged, c.hidden_size, true)?,
            config: c.clone(),
        })
    }

    /// One `[tokens, hidden]` tensor per item, for patches `[patches, C·T·P·P]` of items with `grids`.
    pub fn forward(&self, pixel_values: &Tensor, grids: &[[i64; 3]]) -> Result<Vec<Tensor>> {
        let c = &self.config;
        let merge = c.spatial_merge_size;
        let patches: i64 = grids.iter().map(|[t, h, w]| t * h * w).sum();
        if pixel_values.size().first() != Some(&patches) {
            return Err(Error::Model(format!(
                "Qwen2-VL: {:?} pixel rows for grids {grids:?} ({patches} patches)",
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
        let mut x = x
            .f_conv3d(
                &self.patch_embed,
                None::<Tensor>,
                stride,
                [0, 0, 0],
                [1, 1, 1],
                1,
            )?
            .view([-1, c.embed_dim]);
        let rotary = VisionRotary::new(grids, merge, c.embed_dim / c.num_heads, x.device());
        // Attention stays inside each frame of each item (HF's `cu_seqlens`).
        let segments: Vec<i64> = grids
            .iter()
            .flat_map(|&[t, h, w]| std::iter::repeat_n(h * w, t as usize))
            .collect();
        for block in &self.blocks {
            x = block.forward(&x, &rotary, &segments);
        }
        let merged = self
            .merger_ln_q
            .forward(&x)
            .view([-1, c.embed_dim * merge * merge]);
        let out = self
            .merger_fc2
            .forward(&self.merger_fc1.forward(&merged).gelu("none"));
        let tokens: Vec<i64> = grids
            .iter()
            .map(|[t, h, w]| t * h * w / (merge * merge))
            .collect();
        Ok(out.split_with_sizes(tokens.as_slice(), 0))
    }
}
