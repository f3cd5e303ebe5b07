//! LLaVA-NeXT / LLaVA-1.6 (`LlavaNextForConditionalGeneration`): LLaVA with "anyres" images. Each image
//! is a squashed base view plus a grid of crops on the best-fitting pinpoint canvas; the grid's features
//! are unpadded back to the image's aspect ratio with a newline embedding after every row. The number of
//! tokens depends on the image size and is computed by [`anyres_layout`] alone.

use mmreg_core::{
    concat_tensors, register_input_mapper, register_model, DefaultMapper, Error, Image, ImageInput,
    ImageSize, LanguageModel, LoadModel, LoadOptions, ModalityInputs, ModelContext,
    MultiModalModel, Result, SupportsVision, TensorMap, Weights, MAX_IMAGE_PIXELS,
};
use mmreg_image::{select_best_resolution, LlavaNextImageProcessor, PreprocessorConfig};
use mmreg_nn::Loader;
use serde::Deserialize;
use tch::{Device, Tensor};

use crate::llava::{canonical_weight_name, LlavaConfig, LlavaParts};

/// config.json of a LLaVA-NeXT checkpoint: LLaVA's keys plus the grid pinpoints.
#[derive(Debug, Clone, Deserialize)]
pub struct LlavaNextConfig {
    #[serde(flatten)]
    pub llava: LlavaConfig,
    /// Candidate canvases, `[height, width]` pairs.
    #[serde(default = "default_pinpoints")]
    pub image_grid_pinpoints: Vec<[u64; 2]>,
}

fn default_pinpoints() -> Vec<[u64; 2]> {
    mmreg_image::DEFAULT_GRID_PINPOINTS
        .iter()
        .map(|&[h, w]| [h as u64, w as u64])
        .collect()
}

/// Where an image's tokens come from: the grid canvas and the unpadded feature grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnyresLayout {
    /// Crops per column and per row of the canvas.
    pub grid: (i64, i64),
    /// Feature rows and columns kept after unpadding, and the first kept row and column.
    pub rows: i64,
    pub columns: i64,
    pub top: i64,
    pub left: i64,
    /// Base-image tokens (patches per side squared, plus CLS under `full`).
    pub base_tokens: i64,
}

impl AnyresLayout {
    /// Placeholder tokens: the base image, then every kept row followed by a newline.
    pub fn tokens(&self) -> usize {
        (self.base_tokens + self.rows * (self.columns + 1)) as usize
    }
}

/// The one function behind every LLaVA-NeXT token count (input processor, dummy data, max tokens, the
/// model's unpadding). Integer-exact: HF's `int(round(x, 7))` of `oh * cur_w / ow` is this floor, since the
/// fraction stays at least 1/ow away from the next integer.
pub fn anyres_layout(config: &LlavaNextConfig, size: ImageSize) -> Result<AnyresLayout> {
    let vision = &config.llava.vision_config;
    let (oh, ow) = (size.height as i64, size.width as i64);
    if oh <= 0 || ow <= 0 {
        return Err(Error::bad_input("image", "the image has no pixels"));
    }
    let per_side = vision.patches_per_side()?;
    let crop = vision.image_size;
    let pinpoints = pinpoints(config)?;
    let (bh, bw) = select_best_resolution((oh as usize, ow as usize), &pinpoints);
    let grid = (bh as i64 / crop, bw as i64 / crop);
    if grid.0 <= 0 || grid.1 <= 0 {
        return Err(Error::config(
            "config.json",
            format!("pinpoint {bh}x{bw} is smaller than one {crop}px crop"),
        ));
    }
    let (full_h, full_w) = (per_side * grid.0, per_side * grid.1);
    let (mut rows, mut columns, mut top, mut left) = (full_h, full_w, 0, 0);
    if ow * full_h > full_w * oh {
        // Wider than the canvas: padding was added above and below.
        let new_h = oh * full_w / ow;
        top = (full_h - new_h) / 2;
        rows = full_h - 2 * top;
    } else {
        let new_w = ow * full_h / oh;
        left = (full_w - new_w) / 2;
        columns = full_w - 2 * left;
    }
    let cls = i64::from(!config.llava.drops_cls()?);
    Ok(AnyresLayout {
        grid,
        rows,
        columns,
        top,
        left,
        base_tokens: per_side * per_side + cls,
    })
}

/// `image_grid_pinpoints` as `(height, width)`, each canvas non-empty and at most `MAX_IMAGE_PIXELS`, so
/// that the grid arithmetic cannot overflow and the dummy image (a whole canvas) stays allocatable.
fn pinpoints(config: &LlavaNextConfig) -> Result<Vec<(usize, usize)>> {
    config
        .image_grid_pinpoints
        .iter()
        .map(|&[h, w]| {
            let pixels = h.saturating_mul(w);
            if pixels == 0 || pixels > MAX_IMAGE_PIXELS {
                return Err(Error::config(
                    "config.json",
                    format!("pinpoint {h}x{w} must have between 1 and {MAX_IMAGE_PIXELS} pixels"),
                ));
            }
            Ok((h as usize, w as usize))
        })
        .collect()
}

/// The image size with the most tokens: the full grid of some pinpoint canvas.
fn costliest_image(config: &LlavaNextConfig) -> Result<(ImageSize, usize)> {
    let mut best = None;
    for (h, w) in pinpoints(config)? {
        // Both sides fit: a canvas has at most MAX_IMAGE_PIXELS.
        let size = ImageSize {
            width: w as u32,
            height: h as u32,
        };
        let tokens = anyres_layout(config, size)?.tokens();
        if best.is_none_or(|(_, t)| tokens > t) {
            best = Some((size, tokens));
        }
    }
    best.ok_or_else(|| Error::config("config.json", "image_grid_pinpoints is empty"))
}

/// LLaVA-NeXT. Max tokens, dummy data and the input processor are `SupportsVision`'s defaults: the
/// costliest image is a whole pinpoint canvas, and each `<image>` expands into [`anyres_layout`]'s count.
#[register_model("LlavaNextForConditionalGeneration")]
#[register_input_mapper(image)] // the anyres image processor, from preprocessor_config.json
pub struct LlavaNext {
    parts: LlavaParts,
    image_newline: Tensor,
    config: LlavaNextConfig,
}

impl LoadModel for LlavaNext {
    fn load(ctx: &ModelContext, weights: &Weights, options: &LoadOptions) -> Result<Self> {
        let config = (*ctx.config::<LlavaNextConfig>()?).clone();
        let weights = weights.renamed(canonical_weight_name)?;
        let loader = Loader::new(&weights, options);
        let parts = LlavaParts::load(&config.llava, &loader)?;
        let hidden = parts.language_model.config.hidden_size;
        let model = Self {
            image_newline: loader.get("image_newline", &[hidden])?,
            parts,
            config,
        };
        weights.check_all_used()?;
        Ok(model)
    }
}

impl SupportsVision for LlavaNext {
    type ImageInputs = AnyresPixelValues;

    fn num_image_tokens(ctx: &ModelContext, size: ImageSize) -> Result<usize> {
        Ok(anyres_layout(&*ctx.config::<LlavaNextConfig>()?, size)?.tokens())
    }

    fn image_token_id(ctx: &ModelContext) -> Result<u32> {
        Ok(ctx.config::<LlavaNextConfig>()?.llava.image_token_index)
    }

    fn largest_image(ctx: &ModelContext) -> Result<ImageSize> {
        Ok(costliest_image(&*ctx.config::<LlavaNextConfig>()?)?.0)
    }

    fn embed_images(&self, inputs: AnyresPixelValues) -> Result<Vec<Tensor>> {
        let sizes = Vec::<i64>::try_from(inputs.image_sizes.to_device(Device::Cpu).flatten(0, -1))?;
        let layouts = sizes
            .chunks(2)
            .map(|hw| {
                anyres_layout(
                    &self.config,
                    ImageSize {
                        height: hw[0] as u32,
                        width: hw[1] as u32,
                    },
                )
            })
            .collect::<Result<Vec<_>>>()?;
        // Drop the batch's padding patches, run every real patch through the tower at once.
        let patches: Vec<i64> = layouts.iter().map(|l| 1 + l.grid.0 * l.grid.1).collect();
        let real: Vec<Tensor> = patches
            .iter()
            .enumerate()
            .map(|(i, &n)| inputs.pixel_values.get(i as i64).narrow(0, 0, n))
            .collect();
        let features = self.parts.image_features(&Tensor::cat(&real, 0))?;
        features
            .split_with_sizes(&patches, 0)
            .iter()
            .zip(&layouts)
            .map(|(f, layout)| self.pack(f, layout))
            .collect()
    }
}

impl LlavaNext {
    /// HF's `pack_image_features` for one image: base tokens first, then the grid's features arranged
    /// spatially, unpadded, with `image_newline` after every row.
    fn pack(&self, features: &Tensor, layout: &AnyresLayout) -> Result<Tensor> {
        let (_, tokens, hidden) = features.size3()?;
        let side = (tokens as f64).sqrt().round() as i64;
        let base = features.get(0);
        let (grid_h, grid_w) = layout.grid;
        let grid = features
            .narrow(0, 1, grid_h * grid_w)
            .narrow(1, tokens - side * side, side * side) // CLS, if kept, is not part of the grid
            .view([grid_h, grid_w, side, side, hidden])
            .permute([4, 0, 2, 1, 3])
            .reshape([hidden, grid_h * side, grid_w * side])
            .narrow(1, layout.top, layout.rows)
            .narrow(2, layout.left, layout.columns);
        let newline = self
            .image_newline
            .to_kind(grid.kind())
            .view([hidden, 1, 1])
            .expand([hidden, layout.rows, 1], false);
        let rows = Tensor::cat(&[grid, newline], 2)
            .flatten(1, 2)
            .transpose(0, 1);
        let packed = Tensor::cat(&[base, rows], 0);
        if packed.size()[0] as usize != layout.tokens() {
            return Err(Error::Model(format!(
                "LLaVA-NeXT packed {} rows but anyres_layout() says {}",
                packed.size()[0],
                layout.tokens()
            )));
        }
        Ok(packed)
    }
}

impl MultiModalModel for LlavaNext {
    fn language_model(&self) -> &dyn LanguageModel {
        &self.parts.language_model
    }
}

/// LLaVA-NeXT's image inputs, as HF's processor returns them: `pixel_values` `[n, max_patches, 3, H, W]`
/// (images with fewer patches padded with 0.0) and `image_sizes` `[n, 2]` i64, the original (height, width),
/// which stays on the host (`HOST`): the model reads it as numbers.
#[derive(Debug)]
pub struct AnyresPixelValues {
    pub pixel_values: Tensor,
    pub image_sizes: Tensor,
}

impl ModalityInputs for AnyresPixelValues {
    const PARAMS: &'static [&'static str] = &["image_sizes", "pixel_values"];
    const HOST: &'static [&'static str] = &["image_sizes"];

    fn into_tensors(self) -> TensorMap {
        let mut map = TensorMap::default();
        map.insert("pixel_values", self.pixel_values);
        map.insert("image_sizes", self.image_sizes);
        map
    }

    fn from_tensors(mut tensors: TensorMap) -> Result<Self> {
        Ok(Self {
            pixel_values: tensors.take("pixel_values")?,
            image_sizes: tensors.take("image_sizes")?,
        })
    }

    /// Pads every prompt's patches to the most any of them has (as HF's processor pads within a prompt).
    fn concat(parts: Vec<Self>) -> Result<Option<Self>> {
        let (pixels, sizes): (Vec<Tensor>, Vec<Tensor>) = parts
            .into_iter()
            .map(|p| (p.pixel_values, p.image_sizes))
            .unzip();
        let (Some(pixel_values), Some(image_sizes)) = (
            concat_tensors(&pixels, Some(1))?,
            concat_tensors(&sizes, None)?,
        ) else {
            return Ok(None);
        };
        Ok(Some(Self {
            pixel_values,
            image_sizes,
        }))
    }
}

/// The LLaVA-NeXT "anyres" processor: best grid canvas, patches, base image, `image_sizes`.
impl DefaultMapper<Image> for AnyresPixelValues {
    fn map(ctx: &ModelContext, images: &[ImageInput]) -> Result<Self> {
        let config = ctx.processor_config::<PreprocessorConfig>()?;
        let processor = LlavaNextImageProcessor::new(&config)
            .map_err(|e| Error::config("preprocessor_config.json", e))?;
        let outputs = images
            .iter()
            .map(|i| {
                processor
                    .preprocess(&i.image)
                    .map_err(|e| Error::bad_input(&*i.name, e))
            })
            .collect::<Result<Vec<_>>>()?;
        // Pad along the patch axis with 0.0 to the largest patch count, as HF batches them.
        let [_, c, h, w] = outputs
            .first()
            .map(|o| o.pixel_values.shape)
            .unwrap_or([0, 3, 0, 0]);
        let max_patches = outputs
            .iter()
            .map(|o| o.pixel_values.shape[0])
            .max()
            .unwrap_or(0);
        let mut data = vec![0f32; outputs.len() * max_patches * c * h * w];
        for (chunk, output) in data.chunks_mut(max_patches * c * h * w).zip(&outputs) {
            chunk[..output.pixel_values.data.len()].copy_from_slice(&output.pixel_values.data);
        }
        let sizes: Vec<i64> = outputs
            .iter()
            .flat_map(|o| [o.image_size.0 as i64, o.image_size.1 as i64])
            .collect();
        let shape = [outputs.len(), max_patches, c, h, w].map(|d| d as i64);
        Ok(AnyresPixelValues {
            pixel_values: Tensor::from_slice(&data).reshape(shape),
            image_sizes: Tensor::from_slice(&sizes).reshape([images.len() as i64, 2]),
        })
    }
}
