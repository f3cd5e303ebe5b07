//! The CLIP pipeline on one RGB image: resize, center crop, rescale, normalize, write CHW `f32`.
//!
//! Resize and crop are fused: only the resized pixels the crop keeps are computed. Rescale and
//! normalize are fused through a per-channel 256-entry table, which is exact because the input
//! is `u8`: each entry is computed with HF's own formula
//! `f32(f64(v) * rescale_factor)`, then `(x - mean_f32) / std_f32` in `f32`.

use std::ops::Range;

use crate::config::PipelineConfig;
use crate::resize::{resize_region, PassOrder};
use crate::view::RgbView;

/// Rescale + normalize as a lookup table per channel.
#[derive(Clone, Debug)]
struct Normalizer {
    lut: [[f32; 256]; 3],
}

impl Normalizer {
    fn new(rescale: Option<f64>, normalize: Option<([f32; 3], [f32; 3])>) -> Self {
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, out) in table.iter_mut().enumerate() {
                let x = match rescale {
                    // `image.astype(float64) * scale`, then `.astype(float32)`.
                    Some(factor) => (v as f64 * factor) as f32,
                    None => v as f32,
                };
                *out = match normalize {
                    Some((mean, std)) => (x - mean[c]) / std[c],
                    None => x,
                };
            }
        }
        Normalizer { lut }
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
        let normalizer = Normalizer::new(config.rescale, config.normalize);
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
        let base = out.len();
        let plane = oh * ow;
        // Start from the normalised value of a zero pixel: that is what HF's padding becomes.
        for c in 0..3 {
            out.resize(base + (c + 1) * plane, self.normalizer.lut[c][0]);
        }
        if rows.is_empty() || cols.is_empty() {
            return g.out;
        }
        let pixels = resize_region(
            src,
            g.resized.1,
            g.resized.0,
            cols.clone(),
            rows.clone(),
            self.order,
        );
        let dst = &mut out[base..];
        let (r_plane, rest) = dst.split_at_mut(plane);
        let (g_plane, b_plane) = rest.split_at_mut(plane);
        let y_off = (rows.start as i64 - g.top) as usize;
        let x_off = (cols.start as i64 - g.left) as usize;
        let [lr, lg, lb] = &self.normalizer.lut;
        for (i, src_row) in pixels.chunks_exact(cols.len() * 3).enumerate() {
            let at = (y_off + i) * ow + x_off;
            let span = at..at + cols.len();
            let planes = r_plane[span.clone()]
                .iter_mut()
                .zip(&mut g_plane[span.clone()])
                .zip(&mut b_plane[span]);
            for (((r, g), b), px) in planes.zip(src_row.chunks_exact(3)) {
                *r = lr[usize::from(px[0])];
                *g = lg[usize::from(px[1])];
                *b = lb[usize::from(px[2])];
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
            crop,
            rescale: None,
            normalize: None,
        };
        Pipeline::new(config, PassOrder::Pillow13)
    }

    #[test]
    fn lut_matches_formula() {
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
        let n = Normalizer::new(Some(1.0 / 255.0), Some((mean, std)));
        for v in 0..=255u8 {
            for c in 0..3 {
                let x = (f64::from(v) * (1.0 / 255.0)) as f32;
                assert_eq!(
                    n.lut[c][usize::from(v)].to_bits(),
                    ((x - mean[c]) / std[c]).to_bits()
                );
            }
        }
        // Padding value quoted in the spec.
        assert_eq!(n.lut[0][0], -1.7922626);
        assert_eq!(n.lut[2][0], -1.4802198);
    }

    #[test]
    fn crop_larger_than_image_pads_extra_pixel_before() {
        // 2x3 image (h x w) cropped to 5x4: rows land at ceil(3/2) = 2, columns at ceil(1/2) = 1.
        let data: Vec<u8> = (1..=18).collect();
        let p = pipeline(None, Some((5, 4)));
        let mut out = Vec::new();
        assert_eq!(p.run(RgbView::packed(&data, 3, 2), &mut out), (5, 4));
        let red: Vec<f32> = out[..20].to_vec();
        #[rustfmt::skip]
        let expect = [
            0., 0., 0., 0.,
            0., 0., 0., 0.,
            0., 1., 4., 7.,
            0., 10., 13., 16.,
            0., 0., 0., 0.,
        ];
        assert_eq!(red, expect);
    }

    #[test]
    fn center_crop_floors_the_offset() {
        // Width 5 cropped to 2: left = (5 - 2) // 2 = 1.
        let data: Vec<u8> = (0..15).collect();
        let p = pipeline(None, Some((1, 2)));
        let mut out = Vec::new();
        p.run(RgbView::packed(&data, 5, 1), &mut out);
        assert_eq!(out, [3.0, 6.0, 4.0, 7.0, 5.0, 8.0]);
    }
}
