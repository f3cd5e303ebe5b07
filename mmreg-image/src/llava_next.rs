//! `LlavaNextImageProcessor` (LLaVA-NeXT / v1.6 "anyres").
//!
//! Per image: pick the best grid canvas, resize the original to fit it (ceil rounding), pad with
//! zeros centred (odd pixel at the bottom/right), cut the canvas into crop-sized patches, and put
//! a plain squash of the original to `size` in front. Every tile then runs through the CLIP
//! pipeline (a no-op resize and crop at the default sizes, then rescale and normalize).

use std::path::Path;

use image::DynamicImage;

use crate::clip::rgb_input;
use crate::config::{
    crop_of, invalid, positive, size_of, PipelineConfig, PreprocessorConfig, ResizeTarget,
    DEFAULT_GRID_PINPOINTS,
};
use crate::error::{ImageError, Result};
use crate::pipeline::Pipeline;
use crate::resize::{resize_region, PassOrder};
use crate::view::RgbView;
use crate::PixelValues;

/// Patches of one image plus its original size.
#[derive(Clone, Debug, PartialEq)]
pub struct NextPixelValues {
    /// `[1 + patches, 3, H, W]`: the squashed base image first, then the grid row by row.
    pub pixel_values: PixelValues,
    /// The original `(height, width)` after RGB conversion (HF's `image_sizes` entry).
    pub image_size: (usize, usize),
}

/// A batch as HF returns it: `[n, max_patches, 3, H, W]`, images with fewer patches padded
/// with `0.0` (after normalization).
#[derive(Clone, Debug, PartialEq)]
pub struct NextBatch {
    /// Row-major `f32` values.
    pub data: Vec<f32>,
    /// `[n, max_patches, 3, H, W]`.
    pub shape: [usize; 5],
    /// Original `(height, width)` of each image.
    pub image_sizes: Vec<(usize, usize)>,
}

/// Bit-exact port of transformers' `LlavaNextImageProcessorPil`.
#[derive(Clone, Debug)]
pub struct LlavaNextImageProcessor {
    pipeline: Pipeline,
    /// Candidate canvases as `(height, width)`.
    pinpoints: Vec<(usize, usize)>,
    /// Size of the squashed base image, `(height, width)`.
    base_size: (usize, usize),
    /// Side of the square grid patches (`crop_size.height`).
    patch_size: usize,
    do_pad: bool,
}

impl LlavaNextImageProcessor {
    /// Builds the processor from a parsed config; absent keys take the HF class defaults.
    pub fn new(config: &PreprocessorConfig) -> Result<Self> {
        let resolved = PipelineConfig::resolve(config)?;
        // HF reads `size` and `crop_size` for the grid even when resizing/cropping is disabled.
        let size = size_of(config)?;
        let base_size = match size {
            ResizeTarget::Exact(h, w) => (h, w),
            ResizeTarget::ShortestEdge(s) => (s, s),
        };
        let patch_size = crop_of(config)?.0;
        let pinpoints = match &config.image_grid_pinpoints {
            None => DEFAULT_GRID_PINPOINTS
                .iter()
                .map(|&[h, w]| (h, w))
                .collect(),
            Some(list) => list
                .iter()
                .map(|pair| match pair.as_slice() {
                    &[h, w] => Ok((
                        positive("image_grid_pinpoints", h)?,
                        positive("image_grid_pinpoints", w)?,
                    )),
                    other => Err(invalid(format!(
                        "image_grid_pinpoints entries must be [height, width], got {other:?}"
                    ))),
                })
                .collect::<Result<Vec<_>>>()?,
        };
        if pinpoints.is_empty() {
            return Err(invalid("image_grid_pinpoints must not be empty".into()));
        }
        Ok(LlavaNextImageProcessor {
            pipeline: Pipeline::new(resolved, PassOrder::default()),
            pinpoints,
            base_size,
            patch_size,
            do_pad: config.do_pad.unwrap_or(true),
        })
    }

    /// Builds the processor from a `preprocessor_config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::new(&PreprocessorConfig::from_file(path)?)
    }

    /// Reproduces a different Pillow release's resize pass order (default: Pillow 13).
    pub fn with_pass_order(mut self, order: PassOrder) -> Self {
        self.pipeline.order = order;
        self
    }

    /// The candidate canvases, `(height, width)`.
    pub fn grid_pinpoints(&self) -> &[(usize, usize)] {
        &self.pinpoints
    }

    /// The size the base image is squashed to, `(height, width)`.
    #[cfg(feature = "fuzzing")]
    pub(crate) fn base_size(&self) -> (usize, usize) {
        self.base_size
    }

    /// Number of tiles (base image included) produced for an image of `(height, width)`.
    pub fn num_patches(&self, height: usize, width: usize) -> usize {
        let (ph, pw) = select_best_resolution((height, width), &self.pinpoints);
        1 + ph.div_ceil(self.patch_size) * pw.div_ceil(self.patch_size)
    }

    /// Splits one image into its base tile and grid patches: `[1 + patches, 3, H, W]`.
    pub fn preprocess(&self, image: &DynamicImage) -> Result<NextPixelValues> {
        let rgb = rgb_input(image, self.pipeline.config.convert_rgb)?;
        let src = RgbView::from_image(&rgb)?;
        let image_size = (src.height, src.width);

        // Grid canvas: aspect-preserving resize, then centred zero padding.
        let (ph, pw) = select_best_resolution(image_size, &self.pinpoints);
        let (nh, nw) = get_patch_output_size(image_size, (ph, pw));
        let resized = resize_region(src, nw, nh, 0..nw, 0..nh, self.pipeline.order);
        let resized = resized.view();
        let (top, left) = ((ph - nh) / 2, (pw - nw) / 2);
        // Planar canvas: tiles are then contiguous per channel row, the fastest input to normalise.
        let mut canvas = vec![0u8; ph * pw * 3];
        let mut scratch = Vec::new();
        for (c, plane) in canvas.chunks_exact_mut(ph * pw).enumerate() {
            for y in 0..nh {
                let at = (top + y) * pw + left;
                plane[at..at + nw].copy_from_slice(resized.channel(y, c, &mut scratch));
            }
        }
        let canvas = RgbView::image_planar(&canvas, pw, ph);

        // Base image: the original squashed to `size`, aspect ratio not kept.
        let (bh, bw) = self.base_size;
        let base = resize_region(src, bw, bh, 0..bw, 0..bh, self.pipeline.order);

        let mut data = Vec::new();
        let tile_hw = self.pipeline.run(base.view(), &mut data);
        let mut count = 1;
        let p = self.patch_size;
        for y in (0..ph).step_by(p) {
            for x in (0..pw).step_by(p) {
                let tile = canvas.crop(x, y, p.min(pw - x), p.min(ph - y));
                let hw = self.pipeline.run(tile, &mut data);
                if hw != tile_hw {
                    return Err(invalid(format!(
                        "patches of {:?} end up {hw:?} but the base image {tile_hw:?}; \
                         crop_size must make all tiles the same size",
                        (tile.height, tile.width)
                    )));
                }
                count += 1;
            }
        }
        let pixel_values = PixelValues {
            data,
            shape: [count, 3, tile_hw.0, tile_hw.1],
        };
        Ok(NextPixelValues {
            pixel_values,
            image_size,
        })
    }

    /// Preprocesses several images; with `do_pad` (default) images are padded to the largest
    /// patch count, otherwise all must have the same count.
    pub fn preprocess_batch(&self, images: &[DynamicImage]) -> Result<NextBatch> {
        let outputs = images
            .iter()
            .map(|image| self.preprocess(image))
            .collect::<Result<Vec<_>>>()?;
        let max = outputs
            .iter()
            .map(|o| o.pixel_values.shape[0])
            .max()
            .unwrap_or(0);
        let [_, c, h, w] = outputs
            .first()
            .map_or([0, 3, 0, 0], |o| o.pixel_values.shape);
        if !self.do_pad && outputs.iter().any(|o| o.pixel_values.shape[0] != max) {
            return Err(ImageError::InvalidConfig(
                "images have different patch counts and do_pad is false".into(),
            ));
        }
        let per_image = max * c * h * w;
        let mut data = Vec::with_capacity(outputs.len() * per_image);
        let mut image_sizes = Vec::with_capacity(outputs.len());
        for out in outputs {
            data.extend_from_slice(&out.pixel_values.data);
            data.resize(data.len() + per_image - out.pixel_values.data.len(), 0.0);
            image_sizes.push(out.image_size);
        }
        Ok(NextBatch {
            data,
            shape: [images.len(), max, c, h, w],
            image_sizes,
        })
    }
}

/// Picks the canvas `(height, width)` that keeps the most original pixels, then wastes the
/// fewest; the first candidate wins ties (HF `select_best_resolution`).
pub fn select_best_resolution(
    original: (usize, usize),
    candidates: &[(usize, usize)],
) -> (usize, usize) {
    let (oh, ow) = original;
    let mut best = candidates.first().copied().unwrap_or(original);
    let (mut best_effective, mut best_waste) = (0u64, u64::MAX);
    for &(h, w) in candidates {
        let scale = (w as f64 / ow as f64).min(h as f64 / oh as f64);
        let (dw, dh) = ((ow as f64 * scale) as u64, (oh as f64 * scale) as u64);
        let effective = (dw * dh).min(ow as u64 * oh as u64);
        let waste = (h as u64 * w as u64).saturating_sub(effective);
        if effective > best_effective || (effective == best_effective && waste < best_waste) {
            (best_effective, best_waste, best) = (effective, waste, (h, w));
        }
    }
    best
}

/// Size `(height, width)` of the original resized to fit `target` with its aspect ratio kept;
/// the free side is rounded **up** (HF `get_patch_output_size`) and capped at the target.
pub fn get_patch_output_size(original: (usize, usize), target: (usize, usize)) -> (usize, usize) {
    let (oh, ow) = original;
    let (th, tw) = target;
    let scale_w = tw as f64 / ow as f64;
    let scale_h = th as f64 / oh as f64;
    if scale_w < scale_h {
        (((oh as f64 * scale_w).ceil() as usize).min(th), tw)
    } else {
        (th, ((ow as f64 * scale_h).ceil() as usize).min(tw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::RgbImage;

    const DEFAULT: [(usize, usize); 5] =
        [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)];

    #[test]
    fn best_resolution_examples() {
        // Ties go to the first candidate: 336x336 fits (336, 672) and (672, 336) equally.
        assert_eq!(select_best_resolution((336, 336), &DEFAULT), (336, 672));
        assert_eq!(select_best_resolution((480, 640), &DEFAULT), (672, 672));
        assert_eq!(select_best_resolution((500, 316), &DEFAULT), (672, 336));
        assert_eq!(select_best_resolution((1080, 1920), &DEFAULT), (672, 672));
        assert_eq!(select_best_resolution((100, 1000), &DEFAULT), (336, 1008));
        assert_eq!(select_best_resolution((200, 300), &DEFAULT), (336, 672));
    }

    #[test]
    fn patch_output_size_rounds_up() {
        assert_eq!(get_patch_output_size((480, 640), (672, 672)), (504, 672));
        assert_eq!(get_patch_output_size((500, 316), (672, 336)), (532, 336));
        assert_eq!(get_patch_output_size((1080, 1920), (672, 672)), (378, 672));
        // 100 * 1008 / 1000 = 100.8 -> 101 (floor would give 100).
        assert_eq!(get_patch_output_size((100, 1000), (336, 1008)), (101, 1008));
        assert_eq!(get_patch_output_size((899, 1024), (672, 672)), (590, 672));
    }

    fn processor() -> LlavaNextImageProcessor {
        let json =
            r#"{"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}"#;
        LlavaNextImageProcessor::new(&PreprocessorConfig::from_json_str(json).unwrap()).unwrap()
    }

    #[test]
    fn patch_counts() {
        let p = processor();
        for ((h, w), n) in [
            ((480, 640), 5),
            ((500, 316), 3),
            ((336, 336), 3),
            ((100, 1000), 4),
            ((1080, 1920), 5),
        ] {
            assert_eq!(p.num_patches(h, w), n, "{h}x{w}");
        }
    }

    #[test]
    fn odd_padding_goes_bottom_right() {
        // 100x1000 -> canvas 336x1008 with the image resized to 101 rows: 117 above, 118 below.
        let p = processor();
        let img =
            DynamicImage::ImageRgb8(RgbImage::from_pixel(1000, 100, image::Rgb([255, 255, 255])));
        let out = p.preprocess(&img).unwrap();
        assert_eq!(out.pixel_values.shape, [4, 3, 336, 336]);
        assert_eq!(out.image_size, (100, 1000));
        let plane = 336 * 336;
        let first_patch_red = &out.pixel_values.data[3 * plane..4 * plane];
        let pad = first_patch_red[0];
        let white = first_patch_red[200 * 336];
        let column: Vec<bool> = (0..336)
            .map(|y| first_patch_red[y * 336] == white)
            .collect();
        assert_eq!(column.iter().position(|&v| v), Some(117));
        assert_eq!(column.iter().rposition(|&v| v), Some(117 + 100));
        assert!(pad < white);
    }

    #[test]
    fn batch_pads_patch_axis_with_zeros() {
        let p = processor();
        let wide = DynamicImage::ImageRgb8(RgbImage::new(1000, 100));
        let square = DynamicImage::ImageRgb8(RgbImage::new(40, 40));
        let batch = p.preprocess_batch(&[wide, square]).unwrap();
        assert_eq!(batch.shape, [2, 4, 3, 336, 336]);
        assert_eq!(batch.image_sizes, vec![(100, 1000), (40, 40)]);
        let tile = 3 * 336 * 336;
        assert!(batch.data[7 * tile..].iter().all(|&v| v == 0.0));
        assert!(batch.data[6 * tile..7 * tile].iter().any(|&v| v != 0.0));
    }

    #[test]
    fn bad_pinpoints_are_rejected() {
        for json in [
            r#"{"image_grid_pinpoints": []}"#,
            r#"{"image_grid_pinpoints": [[336]]}"#,
            r#"{"image_grid_pinpoints": [[0, 336]]}"#,
        ] {
            let cfg = PreprocessorConfig::from_json_str(json).unwrap();
            let err = LlavaNextImageProcessor::new(&cfg).unwrap_err().to_string();
            assert!(err.contains("image_grid_pinpoints"), "{err}");
        }
    }
}
