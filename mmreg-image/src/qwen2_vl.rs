//! `Qwen2VLImageProcessor` (Qwen2-VL, Qwen2.5-VL): images and videos as rows of flattened patches.
//!
//! Each image, or each frame of a video, is resized to about its own area kept within
//! `[min_pixels, max_pixels]`, both sides multiples of `patch_size * merge_size` ([`smart_resize`]),
//! then rescaled and normalized like CLIP and cut into `patch_size`² patches. One output row is one
//! patch over `temporal_patch_size` consecutive frames (an image is repeated to fill them),
//! channel-major; rows go frame group by frame group and, inside one, `merge_size`² neighbouring
//! patches at a time: the order in which the vision tower's merger folds them into one token.
//!
//! Images are bit-exact with `Qwen2VLImageProcessorPil` (transformers 5.17). transformers has no
//! PIL video processor: videos are bit-exact with its torchvision-only `Qwen2VLVideoProcessor`
//! (torch's 8-bit antialiased resize, its fused normalization, padding by repeating the last frame).

use std::collections::BTreeMap;
use std::path::Path;

use image::DynamicImage;

use crate::clip::rgb_input;
use crate::config::{
    check_resample, invalid, normalize_of, positive, rescale_of, PreprocessorConfig, SizeSpec,
};
use crate::error::{ImageError, Result};
use crate::kernels;
use crate::resize::{resize_region, PassOrder};
use crate::torch_resize;
use crate::view::RgbView;

/// `smart_resize` refuses images whose long side exceeds this many times the short side.
const MAX_ASPECT_RATIO: u32 = 200;
/// Class defaults of `Qwen2VLImageProcessorPil`.
const DEFAULT_MIN_PIXELS: i64 = 56 * 56;
const DEFAULT_MAX_PIXELS: i64 = 28 * 28 * 1280;
const DEFAULT_PATCH_SIZE: usize = 14;
const DEFAULT_TEMPORAL_PATCH_SIZE: usize = 2;
const DEFAULT_MERGE_SIZE: usize = 2;
/// Class default of `Qwen2VLVideoProcessor.max_frames`.
const DEFAULT_MAX_FRAMES: usize = 768;
/// The frame rate transformers assumes for a video given as frames without metadata
/// (`VideoMetadata.sampled_fps` falls back to 24).
const FRAMES_FPS: f64 = 24.0;

/// Patches of one image or video as the Qwen2-VL vision tower takes them.
#[derive(Clone, Debug, PartialEq)]
pub struct QwenPatches {
    /// `shape[0] * shape[1]` values, row-major.
    pub data: Vec<f32>,
    /// `[t * h * w, 3 * temporal_patch_size * patch_size * patch_size]`.
    pub shape: [usize; 2],
    /// `[t, h, w]`: frame groups, patch rows, patch columns (HF's `image_grid_thw` entry).
    pub grid_thw: [usize; 3],
}

/// Bit-exact port of transformers' `Qwen2VLImageProcessorPil`, with videos laid out as HF's
/// `Qwen2VLVideoProcessor` lays them out.
#[derive(Clone, Debug)]
pub struct Qwen2VlImageProcessor {
    convert_rgb: bool,
    do_resize: bool,
    min_pixels: usize,
    max_pixels: usize,
    patch_size: usize,
    temporal_patch_size: usize,
    merge_size: usize,
    max_frames: usize,
    /// The output value of every 8-bit sample per channel: HF's rescale and normalize, computed
    /// once by the same kernel as the CLIP pipeline.
    values: [[f32; 256]; 3],
    /// The same for video frames: HF's video processor (torchvision only in transformers 5.17) fuses
    /// rescale and normalize into `(u8 − mean / rescale) / (std / rescale)` in f32, which rounds
    /// differently from the image path (by up to 2.4e-7).
    video_values: [[f32; 256]; 3],
    order: PassOrder,
}

impl Qwen2VlImageProcessor {
    /// Builds the processor from a parsed config; absent keys take the HF class defaults.
    ///
    /// The pixel bounds come from `size: {shortest_edge, longest_edge}` (transformers 5.x),
    /// overridden by top-level `min_pixels` / `max_pixels` (older configs), as HF's `__init__`
    /// does; a config that HF would refuse on its first image is refused here.
    pub fn new(config: &PreprocessorConfig) -> Result<Self> {
        check_resample(config)?;
        let (min_pixels, max_pixels) = pixel_bounds(config)?;
        let count =
            |name, value: Option<i64>, default| value.map_or(Ok(default), |v| positive(name, v));
        let patch_size = count("patch_size", config.patch_size, DEFAULT_PATCH_SIZE)?;
        let temporal_patch_size = count(
            "temporal_patch_size",
            config.temporal_patch_size,
            DEFAULT_TEMPORAL_PATCH_SIZE,
        )?;
        let merge_size = count("merge_size", config.merge_size, DEFAULT_MERGE_SIZE)?;
        let max_frames = count("max_frames", config.max_frames, DEFAULT_MAX_FRAMES)?;
        // The products that size every output (and the search in `largest`) must not overflow.
        let fits = patch_size
            .checked_mul(merge_size)
            .and_then(|f| f.checked_mul(f))
            .and_then(|ff| ff.checked_mul(MAX_ASPECT_RATIO as usize))
            .is_some()
            && temporal_patch_size
                .checked_mul(3)
                .and_then(|n| n.checked_mul(patch_size))
                .and_then(|n| n.checked_mul(patch_size))
                .is_some();
        if !fits {
            return Err(invalid(format!(
                "patch_size {patch_size}, merge_size {merge_size} and temporal_patch_size \
                 {temporal_patch_size} are too large"
            )));
        }
        let (rescale, normalize) = (rescale_of(config)?, normalize_of(config)?);
        let samples: Vec<u8> = (0..=255).collect();
        let mut values = [[0.0; 256]; 3];
        for (c, table) in values.iter_mut().enumerate() {
            let mut out = Vec::with_capacity(256);
            kernels::normalize(
                &samples,
                &mut out,
                rescale,
                normalize.map(|(m, s)| (m[c], s[c])),
            );
            table.copy_from_slice(&out);
        }
        let video_values = match (rescale, normalize) {
            (Some(rescale), Some((mean, std))) => {
                let factor = (1.0 / rescale) as f32;
                let mut fused = [[0.0; 256]; 3];
                for (c, table) in fused.iter_mut().enumerate() {
                    let (m, s) = (mean[c] * factor, std[c] * factor);
                    for (v, out) in table.iter_mut().enumerate() {
                        *out = (v as f32 - m) / s;
                    }
                }
                fused
            }
            _ => values,
        };
        Ok(Qwen2VlImageProcessor {
            video_values,
            convert_rgb: config.do_convert_rgb.unwrap_or(true),
            do_resize: config.do_resize.unwrap_or(true),
            min_pixels,
            max_pixels,
            patch_size,
            temporal_patch_size,
            merge_size,
            max_frames,
            values,
            order: PassOrder::default(),
        })
    }

    /// Builds the processor from a `preprocessor_config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::new(&PreprocessorConfig::from_file(path)?)
    }

    /// Reproduces a different Pillow release's resize pass order (default: Pillow 13).
    pub fn with_pass_order(mut self, order: PassOrder) -> Self {
        self.order = order;
        self
    }

    /// Fewest pixels an image is resized to (`size.shortest_edge`, `min_pixels`).
    pub fn min_pixels(&self) -> usize {
        self.min_pixels
    }

    /// Most pixels an image is resized to (`size.longest_edge`, `max_pixels`), aspect ratios
    /// near 200 aside (see [`Self::max_grid`]).
    pub fn max_pixels(&self) -> usize {
        self.max_pixels
    }

    /// Side of a patch in pixels.
    pub fn patch_size(&self) -> usize {
        self.patch_size
    }

    /// Frames per patch.
    pub fn temporal_patch_size(&self) -> usize {
        self.temporal_patch_size
    }

    /// Patches per side merged into one token.
    pub fn merge_size(&self) -> usize {
        self.merge_size
    }

    /// Most frames HF samples from a video file (`max_frames`); frames passed in are all used.
    pub fn max_frames(&self) -> usize {
        self.max_frames
    }

    /// The frame rate transformers assumes for a video given as frames without metadata: 24
    /// (`VideoMetadata.sampled_fps`), whatever the config says.
    pub fn fps(&self) -> f64 {
        FRAMES_FPS
    }

    /// Both sides of a resized image are multiples of this (`patch_size * merge_size`).
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// `(height, width)` an image of `(height, width)` is resized to: [`smart_resize`], or its
    /// own size when `do_resize` is false (then it must already be a multiple of the factor).
    pub fn resized_size(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        if height == 0 || width == 0 {
            return Err(ImageError::EmptyImage { width, height });
        }
        let factor = self.factor();
        if self.do_resize {
            return smart_resize(height, width, factor, self.min_pixels, self.max_pixels);
        }
        if !height.is_multiple_of(factor) || !width.is_multiple_of(factor) {
            return Err(invalid(format!(
                "do_resize is false, so the image ({width}x{height}) must have sides that are \
                 multiples of patch_size * merge_size = {factor}"
            )));
        }
        Ok((height, width))
    }

    /// `[t, h, w]` patches of an image of `(height, width)`: `[1, height' / patch, width' / patch]`
    /// after resizing. The one function behind every image-token count (see [`Self::num_tokens`]).
    pub fn grid(&self, height: usize, width: usize) -> Result<[usize; 3]> {
        let (h, w) = self.resized_size(height, width)?;
        Ok([1, h / self.patch_size, w / self.patch_size])
    }

    /// Frames a video of `num_frames` has once HF pads it, repeating the last frame, to a
    /// multiple of `temporal_patch_size` (3 frames become 4 at the default 2).
    pub fn padded_frame_count(&self, num_frames: usize) -> usize {
        num_frames.div_ceil(self.temporal_patch_size) * self.temporal_patch_size
    }

    /// `[t, h, w]` patches of a video of `num_frames` frames of `(height, width)`; `t` counts the
    /// padded frames (HF's `video_grid_thw`; its `get_num_of_video_patches` floors `t` instead).
    pub fn video_grid(&self, num_frames: usize, height: usize, width: usize) -> Result<[usize; 3]> {
        if num_frames == 0 {
            return Err(ImageError::InvalidVideo(
                "a video needs at least one frame".into(),
            ));
        }
        let [_, h, w] = self.grid(height, width)?;
        Ok([
            self.padded_frame_count(num_frames) / self.temporal_patch_size,
            h,
            w,
        ])
    }

    /// Placeholder tokens of a grid: the merger folds `merge_size`² patches into one.
    pub fn num_tokens(&self, grid_thw: [usize; 3]) -> usize {
        grid_thw.iter().product::<usize>() / (self.merge_size * self.merge_size)
    }

    /// The grid with the most patches that any image produces: the costliest image, for
    /// profiling. Usually `max_pixels` worth, but `smart_resize` overshoots its bounds at aspect
    /// ratios near 200, and configs with `min_pixels` near `max_pixels` overshoot more; the grid
    /// is found by running `smart_resize` on the inputs where its maxima lie (see `largest`).
    pub fn max_grid(&self) -> [usize; 3] {
        let (_, (h, w)) = self.largest();
        [1, h / self.patch_size, w / self.patch_size]
    }

    /// An input `(height, width)` whose grid is [`Self::max_grid`] (a dummy image for profiling).
    pub fn largest_size(&self) -> (usize, usize) {
        self.largest().0
    }

    /// Preprocesses one image: `[h * w, 3 * temporal_patch_size * patch_size²]` patches, grid `[1, h, w]`.
    pub fn preprocess(&self, image: &DynamicImage) -> Result<QwenPatches> {
        let (planes, size) = self.resized_planes(image)?;
        Ok(self.patchify(&[planes], size, &self.values))
    }

    /// Preprocesses the frames of one video (all of one size), padded with copies of the last
    /// frame to a multiple of `temporal_patch_size`: grid `[t, h, w]`.
    pub fn preprocess_video(&self, frames: &[DynamicImage]) -> Result<QwenPatches> {
        let first = frames
            .first()
            .ok_or_else(|| ImageError::InvalidVideo("a video needs at least one frame".into()))?;
        let size = (first.width(), first.height());
        if let Some((i, other)) = frames
            .iter()
            .enumerate()
            .find(|(_, f)| (f.width(), f.height()) != size)
        {
            return Err(ImageError::InvalidVideo(format!(
                "every frame must have the size of frame 0 ({}x{}), but frame {i} is {}x{}",
                size.0,
                size.1,
                other.width(),
                other.height()
            )));
        }
        let mut planes = Vec::with_capacity(frames.len());
        let mut resized = (0, 0);
        for frame in frames {
            let (p, hw) = self.video_frame_planes(frame)?;
            planes.push(p);
            resized = hw;
        }
        Ok(self.patchify(&planes, resized, &self.video_values))
    }

    /// The image as 8-bit RGB resized by PIL's bicubic, in three `h * w` planes, and `(h, w)`.
    fn resized_planes(&self, image: &DynamicImage) -> Result<(Vec<u8>, (usize, usize))> {
        let rgb = rgb_input(image, self.convert_rgb)?;
        let src = RgbView::from_image(&rgb)?;
        let (h, w) = self.resized_size(src.height, src.width)?;
        let resized = resize_region(src, w, h, 0..w, 0..h, self.order);
        Ok((rgb_planes(resized.view(), h), (h, w)))
    }

    /// A video frame as HF's video processor resizes it: torch's 8-bit antialiased bicubic
    /// (transformers has no PIL video processor), in three `h * w` planes, and `(h, w)`.
    fn video_frame_planes(&self, frame: &DynamicImage) -> Result<(Vec<u8>, (usize, usize))> {
        let rgb = rgb_input(frame, self.convert_rgb)?;
        let src = RgbView::from_image(&rgb)?;
        let (height, width) = (src.height, src.width);
        let (h, w) = self.resized_size(height, width)?;
        let planes = rgb_planes(src, height);
        Ok((
            torch_resize::resize_planes(&planes, 3, (height, width), (h, w)),
            (h, w),
        ))
    }

    /// HF's reshape `[t, temporal, C, h/m, m, p, w/m, m, p]`, permuted to
    /// `[t, h/m, w/m, m, m, C, temporal, p, p]` and flattened to rows of `C * temporal * p * p`,
    /// normalising each sample on the way. Frames past the last repeat the last one.
    fn patchify(
        &self,
        frames: &[Vec<u8>],
        (h, w): (usize, usize),
        values: &[[f32; 256]; 3],
    ) -> QwenPatches {
        let (p, m, temporal) = (self.patch_size, self.merge_size, self.temporal_patch_size);
        let (gh, gw) = (h / p, w / p);
        let gt = frames.len().div_ceil(temporal);
        let row_len = 3 * temporal * p * p;
        let plane = h * w;
        let mut data = Vec::with_capacity(gt * gh * gw * row_len);
        for t in 0..gt {
            let group: Vec<&[u8]> = (0..temporal)
                .map(|i| frames[(t * temporal + i).min(frames.len() - 1)].as_slice())
                .collect();
            for block_y in (0..gh).step_by(m) {
                for block_x in (0..gw).step_by(m) {
                    for py in block_y..block_y + m {
                        for px in block_x..block_x + m {
                            for (c, table) in values.iter().enumerate() {
                                for frame in &group {
                                    let channel = &frame[c * plane..(c + 1) * plane];
                                    for y in py * p..(py + 1) * p {
                                        let row = &channel[y * w + px * p..][..p];
                                        data.extend(row.iter().map(|&v| table[usize::from(v)]));
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        QwenPatches {
            data,
            shape: [gt * gh * gw, row_len],
            grid_thw: [gt, gh, gw],
        }
    }
}

/// `(min_pixels, max_pixels)` as HF resolves them: `size` (default `{shortest_edge: 3136,
/// longest_edge: 1003520}`) with top-level `min_pixels` / `max_pixels` replacing `shortest_edge` /
/// `longest_edge`; the result must have exactly those two keys, both non-zero.
fn pixel_bounds(cfg: &PreprocessorConfig) -> Result<(usize, usize)> {
    let mut size = match &cfg.size {
        None => BTreeMap::from([
            ("shortest_edge".to_string(), Some(DEFAULT_MIN_PIXELS)),
            ("longest_edge".to_string(), Some(DEFAULT_MAX_PIXELS)),
        ]),
        Some(SizeSpec::Dict(dict)) => dict.clone(),
        Some(other) => {
            return Err(invalid(format!(
                "size must be {{\"shortest_edge\": min_pixels, \"longest_edge\": max_pixels}}, got {other:?}"
            )))
        }
    };
    for (key, alias, value) in [
        ("shortest_edge", "min_pixels", cfg.min_pixels),
        ("longest_edge", "max_pixels", cfg.max_pixels),
    ] {
        if let Some(v) = value {
            size.insert(key.to_string(), Some(v));
            size.remove(alias);
        }
    }
    let get = |key: &str| size.get(key).copied().flatten();
    match (get("shortest_edge"), get("longest_edge"), size.len()) {
        (Some(lo), Some(hi), 2) => Ok((positive("min_pixels", lo)?, positive("max_pixels", hi)?)),
        _ => Err(invalid(format!(
            "size must have exactly the keys shortest_edge and longest_edge (or set min_pixels and \
             max_pixels), got {:?}",
            size.keys().collect::<Vec<_>>()
        ))),
    }
}

/// The `(height, width)` Qwen2-VL resizes an image of `(height, width)` to, exactly as HF's
/// `smart_resize`: sides rounded (half to even) to multiples of `factor`; if that exceeds
/// `max_pixels`, both scaled by `sqrt(height * width / max_pixels)` and floored (at least one
/// `factor`); if below `min_pixels`, scaled up and ceiled. Refuses (as HF does) an aspect ratio
/// over 200. Same `f64` operations as Python, so exact while `height * width < 2^53`.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    if height == 0 || width == 0 {
        return Err(ImageError::EmptyImage { width, height });
    }
    if factor == 0 {
        return Err(invalid("smart_resize needs a non-zero factor".into()));
    }
    let ratio = height.max(width) as f64 / height.min(width) as f64;
    if ratio > f64::from(MAX_ASPECT_RATIO) {
        return Err(ImageError::AspectRatio {
            width,
            height,
            ratio,
            limit: MAX_ASPECT_RATIO,
        });
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    // Python ints do not overflow: keep products in u128 and float results saturating.
    let to_side = |units: f64| (units as u128).saturating_mul(factor as u128);
    let (mut h_bar, mut w_bar) = (
        to_side((h / f).round_ties_even()),
        to_side((w / f).round_ties_even()),
    );
    let pixels = height as u128 * width as u128;
    if h_bar.saturating_mul(w_bar) > max_pixels as u128 {
        let beta = (pixels as f64 / max_pixels as f64).sqrt();
        h_bar = (factor as u128).max(to_side((h / beta / f).floor()));
        w_bar = (factor as u128).max(to_side((w / beta / f).floor()));
    } else if h_bar * w_bar < min_pixels as u128 {
        let beta = (min_pixels as f64 / pixels as f64).sqrt();
        h_bar = to_side((h * beta / f).ceil());
        w_bar = to_side((w * beta / f).ceil());
    }
    let side = |v: u128| usize::try_from(v).unwrap_or(usize::MAX);
    Ok((side(h_bar), side(w_bar)))
}

mod largest;
#[cfg(test)]
mod tests;

/// An RGB view of `height` rows as three row-major planes.
fn rgb_planes(view: RgbView<'_>, height: usize) -> Vec<u8> {
    let mut planes = Vec::with_capacity(3 * height * view.width);
    let mut scratch = Vec::new();
    for c in 0..3 {
        for y in 0..height {
            planes.extend_from_slice(view.channel(y, c, &mut scratch));
        }
    }
    planes
}
