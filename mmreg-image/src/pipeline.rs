//! The CLIP pipeline on one RGB image: resize, center crop, rescale, normalize, write CHW `f32`.
//!
//! Resize and crop are fused: only the resized pixels the crop keeps are computed, and they are
//! written straight into the channel planes of the output.

use std::ops::Range;

use crate::config::PipelineConfig;
use crate::kernels;
use crate::resize::{resize_region_with, PassOrder};
use crate::view::RgbView;

/// Rescale + normalize with HF's exact `f32` rounding.
#[derive(Clone, Copy, Debug)]
struct Normalizer {
    rescale: Option<f64>,
    normalize: Option<([f32; 3], [f32; 3])>,
}

impl Normalizer {
    /// `(mean, std)` of channel `c`, if normalising.
    fn channel(&self, c: usize) -> Option<(f32, f32)> {
        self.normalize.map(|(mean, std)| (mean[c], std[c]))
    }

    /// Converts one run of channel-`c` samples, appending them to `out`.
    fn append(&self, c: usize, src: &[u8], out: &mut Vec<f32>) {
        kernels::normalize(src, out, self.rescale, self.channel(c));
    }

    /// The output value of a zero sample (what HF's zero padding turns into).
    fn zero(&self, c: usize) -> f32 {
        let mut out = Vec::with_capacity(1);
        self.append(c, &[0], &mut out);
        out[0]
    }
}

/// A validated pipeline ready to run.
#[derive(Clone, Debug)]
pub(crate) struct Pipeline {
    pub config: PipelineConfig,
    pub order: PassOrder,
    normalizer: Normalizer,
}

/// Where the output comes from: rows/columns of the resized image, possibly extending past it
/// (then zero-padded, like HF's `center_crop` on an image smaller than the crop).
struct Geometry {
    resized: (usize, usize),
    out: (usize, usize),
    /// Resized-image coordinate of output row/column 0 (negative when padding is needed).
    top: i64,
    left: i64,
}

impl Geometry {
    /// Output rows (or columns) that fall inside the resized image, in resized coordinates.
    fn visible(offset: i64, out_len: usize, resized_len: usize) -> Range<usize> {
        let start = offset.max(0) as usize;
        let end = (offset + out_len as i64).clamp(0, resized_len as i64) as usize;
        start..end.max(start)
    }
}

impl Pipeline {
    pub fn new(config: PipelineConfig, order: PassOrder) -> Self {
        let normalizer = Normalizer {
            rescale: config.rescale,
            normalize: config.normalize,
        };
        Pipeline {
            config,
            order,
            normalizer,
        }
    }

    fn geometry(&self, height: usize, width: usize) -> Geometry {
        let resized = match self.config.resize {
            Some(target) => target.output_size(height, width),
            None => (height, width),
        };
        match self.config.crop {
            // HF: top = (H - crop_h) // 2 (floor). When the crop is larger, the image lands at
            // ceil((crop_h - H) / 2), which is the same number negated.
            Some((ch, cw)) => Geometry {
                resized,
                out: (ch, cw),
                top: (resized.0 as i64 - ch as i64).div_euclid(2),
                left: (resized.1 as i64 - cw as i64).div_euclid(2),
            },
            None => Geometry {
                resized,
                out: resized,
                top: 0,
                left: 0,
            },
        }
    }

    /// `(height, width)` of the output for an input of `(height, width)`.
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        self.geometry(height, width).out
    }

    /// Runs the pipeline on `src` and appends `3 * h * w` values (CHW, RGB) to `out`.
    /// Returns the output `(height, width)`. `src` must be non-empty.
    pub fn run(&self, src: RgbView<'_>, out: &mut Vec<f32>) -> (usize, usize) {
        let g = self.geometry(src.height, src.width);
        let (oh, ow) = g.out;
        let rows = Geometry::visible(g.top, oh, g.resized.0);
        let cols = Geometry::visible(g.left, ow, g.resized.1);
        let pixels = (!rows.is_empty() && !cols.is_empty()).then(|| {
            resize_region_with(
                self.config.resample,
                src,
                g.resized.1,
                g.resized.0,
                cols.clone(),
                rows.clone(),
                self.order,
            )
        });
        let mut scratch = Vec::new();
        out.reserve(3 * oh * ow);
        if rows.len() == oh && cols.len() == ow {
            // No padding: the planes are produced in memory order, so append row by row.
            if let Some(pixels) = &pixels {
                let pixels = pixels.view();
                for c in 0..3 {
                    for y in 0..oh {
                        self.normalizer
                            .append(c, pixels.channel(y, c, &mut scratch), out);
                    }
                }
            }
            return g.out;
        }
        // Padding (crop larger than the resized image): start from the value of a zero pixel.
        let base = out.len();
        for c in 0..3 {
            out.resize(base + (c + 1) * oh * ow, self.normalizer.zero(c));
        }
        if let Some(pixels) = &pixels {
            let pixels = pixels.view();
            let y_off = (rows.start as i64 - g.top) as usize;
            let x_off = (cols.start as i64 - g.left) as usize;
            let mut row = Vec::with_capacity(cols.len());
            for (c, plane) in out[base..].chunks_exact_mut(oh * ow).enumerate() {
                for y in 0..pixels.height {
                    let at = (y_off + y) * ow + x_off;
                    row.clear();
                    self.normalizer
                        .append(c, pixels.channel(y, c, &mut scratch), &mut row);
                    plane[at..at + cols.len()].copy_from_slice(&row);
                }
            }
        }
        g.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ResizeTarget;

    fn pipeline(resize: Option<ResizeTarget>, crop: Option<(usize, usize)>) -> Pipeline {
        let config = PipelineConfig {
            convert_rgb: true,
            resize,
            resample: crate::resize::Resample::Bicubic,
            crop,
            rescale: None,
            normalize: None,
        };
        Pipeline::new(config, PassOrder::Pillow13)
    }

    #[test]
    fn normalize_matches_formula() {
        let mean = [
            0.48145466f64 as f32,
            0.4578275f64 as f32,
            0.40821073f64 as f32,
        ];
        let std = [
            0.26862954f64 as f32,
            0.26130258f64 as f32,
            0.27577711f64 as f32,
        ];
        let n = Normalizer {
            rescale: Some(1.0 / 255.0),
            normalize: Some((mean, std)),
        };
        let samples: Vec<u8> = (0..=255).collect();
        for c in 0..3 {
            let mut out = Vec::new();
            n.append(c, &samples, &mut out);
            for (&v, &got) in samples.iter().zip(&out) {
                let x = (f64::from(v) * (1.0 / 255.0)) as f32;
                assert_eq!(
                    got.to_bits(),
                    ((x - mean[c]) / std[c]).to_bits(),
                    "channel {c}, value {v}"
                );
            }
        }
        // Padding values quoted in the spec.
        assert_eq!(
            [n.zero(0), n.zero(1), n.zero(2)],
            [-1.7922626, -1.7520971, -1.4802198]
        );
    }

    #[test]
    fn crop_larger_than_image_pads_extra_pixel_before() {
        // 2x3 image (h x w) cropped to 5x4: rows land at ceil(3/2) = 2, columns at ceil(1/2) = 1.
        let data: Vec<u8> = (1..=18).collect();
        let p = pipeline(None, Some((5, 4)));
        let mut out = Vec::new();
        assert_eq!(p.run(RgbView::interleaved(&data, 3, 2), &mut out), (5, 4));
        #[rustfmt::skip]
        let expect = [
            0., 0., 0., 0.,
            0., 0., 0., 0.,
            0., 1., 4., 7.,
            0., 10., 13., 16.,
            0., 0., 0., 0.,
        ];
        assert_eq!(out[..20], expect);
    }

    #[test]
    fn center_crop_floors_the_offset() {
        // Width 5 cropped to 2: left = (5 - 2) // 2 = 1.
        let data: Vec<u8> = (0..15).collect();
        let p = pipeline(None, Some((1, 2)));
        let mut out = Vec::new();
        p.run(RgbView::interleaved(&data, 5, 1), &mut out);
        assert_eq!(out, [3.0, 6.0, 4.0, 7.0, 5.0, 8.0]);
    }
}
