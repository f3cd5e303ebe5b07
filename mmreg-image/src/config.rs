//! `preprocessor_config.json` as written by Hugging Face, and its validation.
//!
//! Every field is optional: a missing key or `null` means "use the class default", exactly as
//! transformers 5.x resolves `None` kwargs to class attributes. Unknown keys are ignored.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::error::{ImageError, Result};
use crate::resize::Resample;

/// OpenAI CLIP channel means (transformers `OPENAI_CLIP_MEAN`), the CLIP/LLaVA class default.
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP channel standard deviations (transformers `OPENAI_CLIP_STD`).
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
/// LLaVA-NeXT's default `image_grid_pinpoints`, as `[height, width]` pairs.
pub const DEFAULT_GRID_PINPOINTS: [[usize; 2]; 5] =
    [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]];

/// PIL's `Image.Resampling.BICUBIC`, the only filter implemented.
const BICUBIC: i64 = 3;

/// The raw, unvalidated contents of a `preprocessor_config.json`.
#[derive(Clone, Debug, Default, Deserialize)]
#[non_exhaustive]
pub struct PreprocessorConfig {
    /// Convert inputs to RGB first (default true).
    pub do_convert_rgb: Option<bool>,
    /// Resize before cropping (default true).
    pub do_resize: Option<bool>,
    /// Resize target: `{"shortest_edge": n}`, `{"height": h, "width": w}`, an int or `[h, w]`.
    pub size: Option<SizeSpec>,
    /// PIL resampling code (default 3, bicubic).
    pub resample: Option<i64>,
    /// Center-crop after resizing (default true).
    pub do_center_crop: Option<bool>,
    /// Crop size: `{"height": h, "width": w}`, an int or `[h, w]`.
    pub crop_size: Option<SizeSpec>,
    /// Multiply by `rescale_factor` (default true).
    pub do_rescale: Option<bool>,
    /// Rescale factor (default `1/255`).
    pub rescale_factor: Option<f64>,
    /// Subtract the mean and divide by the std (default true).
    pub do_normalize: Option<bool>,
    /// Per-channel mean (or one value for all channels).
    pub image_mean: Option<PerChannel>,
    /// Per-channel standard deviation (or one value for all channels).
    pub image_std: Option<PerChannel>,
    /// LLaVA-NeXT: pad batches to the same number of patches (default true). Idefics3 / SmolVLM:
    /// pad every frame to the batch's largest and return `pixel_attention_mask` (default true).
    pub do_pad: Option<bool>,
    /// LLaVA-NeXT: candidate `[height, width]` canvases for the anyres grid.
    pub image_grid_pinpoints: Option<Vec<Vec<i64>>>,
    /// Qwen2-VL: fewest pixels after resizing (older configs; overrides `size.shortest_edge`).
    pub min_pixels: Option<i64>,
    /// Qwen2-VL: most pixels after resizing (older configs; overrides `size.longest_edge`).
    pub max_pixels: Option<i64>,
    /// Qwen2-VL: side of a ViT patch in pixels (default 14).
    pub patch_size: Option<i64>,
    /// Qwen2-VL: frames per patch (default 2; an image is repeated to fill them).
    pub temporal_patch_size: Option<i64>,
    /// Qwen2-VL: patches merged per side into one token (default 2).
    pub merge_size: Option<i64>,
    /// Qwen2-VL video processor: most frames HF samples from a video (default 768).
    pub max_frames: Option<i64>,
    /// Idefics3 / SmolVLM: cut an image larger than one `max_image_size` tile into tiles, followed
    /// by the whole image resized to one tile (default true).
    pub do_image_splitting: Option<bool>,
    /// Idefics3 / SmolVLM: `{"longest_edge": n}`, the side of a tile and of the global image
    /// (default 364; SmolVLM checkpoints use 384 or 512).
    pub max_image_size: Option<SizeSpec>,
    /// Gemma 3: add crops of a long image to it (default false).
    pub do_pan_and_scan: Option<bool>,
    /// Gemma 3: smallest side of a crop (default 256).
    pub pan_and_scan_min_crop_size: Option<i64>,
    /// Gemma 3: most crops per image (default 4).
    pub pan_and_scan_max_num_crops: Option<i64>,
    /// Gemma 3: the aspect ratio from which an image is cropped (default 1.2).
    pub pan_and_scan_min_ratio_to_activate: Option<f64>,
}

impl PreprocessorConfig {
    /// Parses a `preprocessor_config.json` document.
    pub fn from_json_str(json: &str) -> Result<Self> {
        Ok(serde_json::from_str(json)?)
    }

    /// Reads and parses a `preprocessor_config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ImageError::Io {
            path: path.into(),
            source,
        })?;
        Self::from_json_str(&text)
    }
}

/// A size as HF configs spell it.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum SizeSpec {
    /// A single number (shortest edge for `size`, a square for `crop_size`).
    Int(i64),
    /// `[height, width]`.
    List(Vec<i64>),
    /// A size dict such as `{"shortest_edge": 336}`; `null` values count as absent.
    Dict(BTreeMap<String, Option<i64>>),
}

/// A per-channel value, or one value broadcast to all channels.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PerChannel {
    /// The same value for R, G and B.
    Scalar(f64),
    /// One value per channel.
    List(Vec<f64>),
}

/// How the resize step picks its output size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ResizeTarget {
    /// Scale so the shorter side becomes this, keeping the aspect ratio (truncating the long side).
    ShortestEdge(usize),
    /// Resize to exactly `(height, width)`.
    Exact(usize, usize),
}

impl ResizeTarget {
    /// Output `(height, width)` for an input of `(height, width)`, as
    /// `get_resize_output_image_size(default_to_square=False)` computes it.
    pub(crate) fn output_size(self, height: usize, width: usize) -> (usize, usize) {
        match self {
            ResizeTarget::Exact(h, w) => (h, w),
            ResizeTarget::ShortestEdge(s) => {
                let (short, long) = if width <= height {
                    (width, height)
                } else {
                    (height, width)
                };
                // Python: int(s * long / short) -- exact integer product, one f64 division, truncation.
                let new_long = ((s as u64 * long as u64) as f64 / short as f64) as usize;
                if width <= height {
                    (new_long, s)
                } else {
                    (s, new_long)
                }
            }
        }
    }
}

/// A validated CLIP-style pipeline description (shared by CLIP and LLaVA-NeXT).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PipelineConfig {
    pub convert_rgb: bool,
    pub resize: Option<ResizeTarget>,
    pub resample: Resample,
    /// `(height, width)` of the center crop.
    pub crop: Option<(usize, usize)>,
    pub rescale: Option<f64>,
    /// `(mean, std)` rounded to `f32`, as numpy does with `np.array(mean, dtype=float32)`.
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

/// Class defaults shared by `CLIPImageProcessorPil` and `LlavaNextImageProcessorPil`.
const DEFAULT_SHORTEST_EDGE: usize = 224;
const DEFAULT_CROP: usize = 224;

impl PipelineConfig {
    /// Validates `cfg`, filling absent keys with the CLIP class defaults.
    pub(crate) fn resolve(cfg: &PreprocessorConfig) -> Result<Self> {
        check_resample(cfg)?;
        let resize = if cfg.do_resize.unwrap_or(true) {
            Some(size_of(cfg)?)
        } else {
            None
        };
        let crop = if cfg.do_center_crop.unwrap_or(true) {
            Some(crop_of(cfg)?)
        } else {
            None
        };
        Ok(PipelineConfig {
            convert_rgb: cfg.do_convert_rgb.unwrap_or(true),
            resize,
            resample: Resample::Bicubic,
            crop,
            rescale: rescale_of(cfg)?,
            normalize: normalize_of(cfg)?,
        })
    }
}

/// Refuses every filter but bicubic (the default).
pub(crate) fn check_resample(cfg: &PreprocessorConfig) -> Result<()> {
    match cfg.resample.unwrap_or(BICUBIC) {
        BICUBIC => Ok(()),
        other => Err(ImageError::UnsupportedResample(other)),
    }
}

/// The filter `resample` names (`default` when absent): bicubic or bilinear.
pub(crate) fn resample_of(cfg: &PreprocessorConfig, default: Resample) -> Result<Resample> {
    match cfg.resample {
        None => Ok(default),
        Some(code) => Resample::from_pil(code).ok_or(ImageError::UnsupportedResample(code)),
    }
}

/// The rescale factor, if rescaling (default `1/255`).
pub(crate) fn rescale_of(cfg: &PreprocessorConfig) -> Result<Option<f64>> {
    if !cfg.do_rescale.unwrap_or(true) {
        return Ok(None);
    }
    let factor = cfg.rescale_factor.unwrap_or(1.0 / 255.0);
    if !factor.is_finite() {
        return Err(invalid(format!(
            "rescale_factor must be finite, got {factor}"
        )));
    }
    Ok(Some(factor))
}

/// `(mean, std)` as `f32`, if normalising (default: the OpenAI CLIP values).
pub(crate) fn normalize_of(cfg: &PreprocessorConfig) -> Result<Option<([f32; 3], [f32; 3])>> {
    if !cfg.do_normalize.unwrap_or(true) {
        return Ok(None);
    }
    let mean = per_channel("image_mean", cfg.image_mean.as_ref(), OPENAI_CLIP_MEAN)?;
    let std = per_channel("image_std", cfg.image_std.as_ref(), OPENAI_CLIP_STD)?;
    if std.contains(&0.0) {
        return Err(invalid(format!("image_std must be non-zero, got {std:?}")));
    }
    Ok(Some((mean, std)))
}

/// The resolved `size`, whether or not `do_resize` is set.
pub(crate) fn size_of(cfg: &PreprocessorConfig) -> Result<ResizeTarget> {
    cfg.size.as_ref().map_or(
        Ok(ResizeTarget::ShortestEdge(DEFAULT_SHORTEST_EDGE)),
        resize_target,
    )
}

/// The resolved `crop_size` as `(height, width)`, whether or not `do_center_crop` is set.
pub(crate) fn crop_of(cfg: &PreprocessorConfig) -> Result<(usize, usize)> {
    cfg.crop_size
        .as_ref()
        .map_or(Ok((DEFAULT_CROP, DEFAULT_CROP)), crop_size)
}

pub(crate) fn invalid(msg: String) -> ImageError {
    ImageError::InvalidConfig(msg)
}

/// A strictly positive pixel count.
pub(crate) fn positive(name: &str, v: i64) -> Result<usize> {
    usize::try_from(v)
        .ok()
        .filter(|&v| v > 0)
        .ok_or_else(|| invalid(format!("{name} must be a positive integer, got {v}")))
}

/// The keys present (non-null) in a size dict.
fn present(dict: &BTreeMap<String, Option<i64>>) -> BTreeMap<&str, i64> {
    dict.iter()
        .filter_map(|(k, v)| v.map(|v| (k.as_str(), v)))
        .collect()
}

/// `size` follows `get_size_dict(default_to_square=False)`: an int is a shortest edge.
fn resize_target(spec: &SizeSpec) -> Result<ResizeTarget> {
    match spec {
        SizeSpec::Int(s) => Ok(ResizeTarget::ShortestEdge(positive("size", *s)?)),
        SizeSpec::List(_) => {
            let (h, w) = height_width("size", spec)?;
            Ok(ResizeTarget::Exact(h, w))
        }
        SizeSpec::Dict(dict) => {
            let keys = present(dict);
            match (keys.get("shortest_edge"), keys.get("height"), keys.get("width"), keys.len()) {
                (Some(&s), None, None, 1) => Ok(ResizeTarget::ShortestEdge(positive("size.shortest_edge", s)?)),
                (None, Some(&h), Some(&w), 2) => {
                    Ok(ResizeTarget::Exact(positive("size.height", h)?, positive("size.width", w)?))
                }
                _ => Err(invalid(format!(
                    "size must be {{\"shortest_edge\": n}} or {{\"height\": h, \"width\": w}}, got keys {:?}",
                    keys.keys().collect::<Vec<_>>()
                ))),
            }
        }
    }
}

/// `crop_size` follows `get_size_dict(default_to_square=True)`: an int is a square.
fn crop_size(spec: &SizeSpec) -> Result<(usize, usize)> {
    match spec {
        SizeSpec::Int(s) => {
            let s = positive("crop_size", *s)?;
            Ok((s, s))
        }
        _ => height_width("crop_size", spec),
    }
}

/// Reads `[h, w]` or `{"height": h, "width": w}`.
fn height_width(name: &str, spec: &SizeSpec) -> Result<(usize, usize)> {
    match spec {
        SizeSpec::List(v) if v.len() == 2 => Ok((positive(name, v[0])?, positive(name, v[1])?)),
        SizeSpec::Dict(dict) => {
            let keys = present(dict);
            match (keys.get("height"), keys.get("width"), keys.len()) {
                (Some(&h), Some(&w), 2) => Ok((
                    positive(&format!("{name}.height"), h)?,
                    positive(&format!("{name}.width"), w)?,
                )),
                _ => Err(invalid(format!(
                    "{name} must have exactly the keys height and width, got {:?}",
                    keys.keys().collect::<Vec<_>>()
                ))),
            }
        }
        other => Err(invalid(format!(
            "{name} must be [height, width] or a dict, got {other:?}"
        ))),
    }
}

/// Resolves a mean/std entry to three `f32` values (numpy casts the Python floats to float32).
fn per_channel(name: &str, value: Option<&PerChannel>, default: [f64; 3]) -> Result<[f32; 3]> {
    let values = match value {
        None => default,
        Some(PerChannel::Scalar(v)) => [*v; 3],
        Some(PerChannel::List(v)) => <[f64; 3]>::try_from(v.as_slice())
            .map_err(|_| invalid(format!("{name} must have 3 values (RGB), got {}", v.len())))?,
    };
    if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
        return Err(invalid(format!("{name} must be finite, got {bad}")));
    }
    Ok(values.map(|v| v as f32))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAVA_15: &str = r#"{
      "crop_size": {"height": 336, "width": 336}, "do_center_crop": true, "do_convert_rgb": true,
      "do_normalize": true, "do_rescale": true, "do_resize": true,
      "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
      "image_std": [0.26862954, 0.26130258, 0.27577711], "processor_class": "LlavaProcessor",
      "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336}
    }"#;

    fn resolve(json: &str) -> Result<PipelineConfig> {
        PipelineConfig::resolve(&PreprocessorConfig::from_json_str(json)?)
    }

    #[test]
    fn hub_config_and_defaults() {
        let cfg = resolve(LLAVA_15).unwrap();
        assert_eq!(cfg.resize, Some(ResizeTarget::ShortestEdge(336)));
        assert_eq!(cfg.crop, Some((336, 336)));
        assert_eq!(cfg.rescale, Some(1.0 / 255.0));
        let defaults = resolve("{}").unwrap();
        assert_eq!(defaults.resize, Some(ResizeTarget::ShortestEdge(224)));
        assert_eq!(defaults.crop, Some((224, 224)));
        assert_eq!(defaults.normalize, cfg.normalize);
        // `null` means "class default", and legacy int / list sizes are accepted.
        let legacy = resolve(r#"{"size": 336, "crop_size": 300, "image_mean": null}"#).unwrap();
        assert_eq!(legacy.resize, Some(ResizeTarget::ShortestEdge(336)));
        assert_eq!(legacy.crop, Some((300, 300)));
        let list =
            resolve(r#"{"size": [20, 30], "do_center_crop": false, "image_std": 0.5}"#).unwrap();
        assert_eq!(list.resize, Some(ResizeTarget::Exact(20, 30)));
        assert_eq!(list.crop, None);
        assert_eq!(list.normalize.unwrap().1, [0.5; 3]);
    }

    #[test]
    fn shortest_edge_output_size() {
        let t = ResizeTarget::ShortestEdge(336);
        assert_eq!(t.output_size(480, 640), (336, 448));
        assert_eq!(t.output_size(500, 316), (531, 336));
        assert_eq!(t.output_size(1080, 1920), (336, 597));
        assert_eq!(t.output_size(100, 1000), (336, 3360));
        assert_eq!(t.output_size(7, 7), (336, 336));
    }

    #[test]
    fn bad_configs_are_rejected_with_names() {
        let err = |json: &str| resolve(json).unwrap_err().to_string();
        assert!(err(r#"{"resample": 2}"#).contains("BILINEAR"));
        assert!(err(r#"{"size": {"shortest_edge": 0}}"#).contains("size.shortest_edge"));
        assert!(err(r#"{"size": {"longest_edge": 10}}"#).contains("longest_edge"));
        assert!(err(r#"{"crop_size": {"height": 3}}"#).contains("crop_size"));
        assert!(err(r#"{"crop_size": [3, -1]}"#).contains("crop_size"));
        assert!(err(r#"{"image_mean": [0.5, 0.5]}"#).contains("image_mean must have 3 values"));
        assert!(err(r#"{"image_std": [1, 0, 1]}"#).contains("non-zero"));
        assert!(err(r#"{"size": "big"}"#).contains("parse"));
        // A disabled step does not look at its parameters.
        assert!(resolve(r#"{"do_center_crop": false, "crop_size": {"height": 3}}"#).is_ok());
    }
}
