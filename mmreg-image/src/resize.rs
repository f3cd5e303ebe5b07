//! Pillow-exact bicubic, bilinear and Lanczos resampling of 8-bit RGB images.
//!
//! Reproduces `PIL.Image.resize(size, Image.BICUBIC)` (and `Image.BILINEAR`, `Image.LANCZOS`;
//! Pillow's `Resample.c`, 8-bit path) bit for bit:
//! per-axis filter weights computed in `f64`, quantised to 22-bit fixed point, two separable passes
//! with a rounded and clamped `u8` image in between, and a pass skipped when its axis keeps its size.
//!
//! Every output pixel depends only on its own filter window, so [`resize_region`] computes just a
//! rectangle of the resized image (e.g. the part a center crop keeps) with results identical to
//! resizing everything and cropping afterwards.

use std::ops::Range;

use image::RgbImage;

use crate::error::{ImageError, Result};
use crate::kernels;
use crate::view::{RgbBuf, RgbView};

/// Fixed-point fraction bits of Pillow's 8-bit resampler (`PRECISION_BITS = 32 - 8 - 2`).
pub(crate) const PRECISION_BITS: u32 = 22;

/// The resampling filters implemented: PIL's `LANCZOS` (1), `BILINEAR` (2) and `BICUBIC` (3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Resample {
    /// Pillow's `lanczos_filter`: a sinc windowed by a 3-lobe sinc (Idefics3, SmolVLM).
    Lanczos,
    Bilinear,
    #[default]
    Bicubic,
}

impl Resample {
    /// The filter of a PIL resampling code, if implemented.
    pub fn from_pil(code: i64) -> Option<Self> {
        match code {
            1 => Some(Resample::Lanczos),
            2 => Some(Resample::Bilinear),
            3 => Some(Resample::Bicubic),
            _ => None,
        }
    }

    /// Support radius in input pixels at scale 1 (`filter->support`).
    fn support(self) -> f64 {
        match self {
            Resample::Lanczos => 3.0,
            Resample::Bilinear => 1.0,
            Resample::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Resample::Lanczos => lanczos(x),
            Resample::Bilinear => bilinear(x),
            Resample::Bicubic => bicubic(x),
        }
    }
}

/// Pillow's `sinc_filter`: `sin(pi x) / (pi x)`, 1 at 0, computed in the same operation order
/// (`x * M_PI`, then libm's `sin`, then one division).
fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

/// Pillow's `lanczos_filter`: `sinc(x) * sinc(x / 3)` on the half-open `[-3, 3)`, 0 elsewhere (so
/// exactly 3.0 weighs 0 while -3.0 weighs the product of two `sin` rounding residues, ~1e-33).
pub(crate) fn lanczos(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// Pillow's triangle kernel.
pub(crate) fn bilinear(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// The order of the two separable passes, which changed in Pillow 13.
///
/// Because the intermediate image is rounded to `u8`, the two orders give slightly different
/// pixels, so the order must match the Pillow release that produced the reference.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PassOrder {
    /// Pillow 12 and older: always the horizontal (width) pass first.
    Pillow12,
    /// Pillow 13 and newer (python-pillow PR #9549): vertical first when the height shrinks by
    /// more than twice as many pixels as the width does, horizontal first otherwise.
    #[default]
    Pillow13,
}

impl PassOrder {
    /// Whether the vertical pass runs first when resizing `(in_w, in_h)` to `(out_w, out_h)`.
    pub fn vertical_first(self, in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> bool {
        match self {
            PassOrder::Pillow12 => false,
            PassOrder::Pillow13 => {
                // Signed: the width may grow while the height shrinks.
                let (in_w, in_h, out_w, out_h) =
                    (in_w as i64, in_h as i64, out_w as i64, out_h as i64);
                out_h < in_h && in_h - out_h > 2 * (in_w - out_w)
            }
        }
    }
}

/// Pillow's bicubic kernel (a = -0.5), with its exact operation order so every `f64` rounds alike.
pub(crate) fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point filter weights for resampling one axis from `in_size` to `out_size` samples
/// (Pillow's `precompute_coeffs` followed by `normalize_coeffs_8bpc`).
#[derive(Clone, Debug)]
pub(crate) struct AxisFilter {
    /// First input sample used by each output sample.
    starts: Vec<usize>,
    /// Number of input samples (taps) used by each output sample.
    lens: Vec<usize>,
    /// `ksize` weights per output sample; only the first `lens[i]` are meaningful.
    weights: Vec<i32>,
    ksize: usize,
    /// Index of the first output sample computed (entries above are for `first..`).
    first: usize,
}

impl AxisFilter {
    /// Computes the weights of all `out_size` outputs. Both sizes must be non-zero.
    #[cfg(test)]
    pub(crate) fn bicubic(in_size: usize, out_size: usize) -> Self {
        Self::range(Resample::Bicubic, in_size, out_size, 0..out_size)
    }

    /// Computes the weights of the outputs in `outputs` only (a crop needs no others).
    pub(crate) fn range(
        filter: Resample,
        in_size: usize,
        out_size: usize,
        outputs: Range<usize>,
    ) -> Self {
        debug_assert!(in_size > 0 && out_size > 0 && outputs.end <= out_size);
        let scale = in_size as f64 / out_size as f64;
        // Antialiasing: when shrinking, the kernel is stretched over `scale` input pixels.
        let filterscale = scale.max(1.0);
        let support = filter.support() * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let inv_filterscale = 1.0 / filterscale;

        let mut starts = Vec::with_capacity(outputs.len());
        let mut lens = Vec::with_capacity(outputs.len());
        let mut weights = vec![0i32; outputs.len() * ksize];
        let mut taps = vec![0f64; ksize];
        for (xx, out) in outputs.clone().zip(weights.chunks_exact_mut(ksize)) {
            let center = (xx as f64 + 0.5) * scale;
            // `as i64` truncates toward zero like C's `(int)` cast; negatives clamp to 0 anyway.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let len = xmax - xmin;
            let mut sum = 0.0;
            for (x, tap) in taps[..len].iter_mut().enumerate() {
                *tap = filter.weight(((x + xmin) as f64 - center + 0.5) * inv_filterscale);
                sum += *tap;
            }
            // Same operation as Pillow's `k[x] /= ww` (a division, not a reciprocal multiply).
            let divisor = if sum != 0.0 { sum } else { 1.0 };
            for (tap, w) in taps[..len].iter().zip(out.iter_mut()) {
                *w = to_fixed(tap / divisor);
            }
            starts.push(xmin);
            lens.push(len);
        }
        AxisFilter {
            starts,
            lens,
            weights,
            ksize,
            first: outputs.start,
        }
    }

    /// First input index and fixed-point weights of output sample `i`.
    #[inline]
    pub(crate) fn taps(&self, i: usize) -> (usize, &[i32]) {
        let i = i - self.first;
        let w = &self.weights[i * self.ksize..];
        (self.starts[i], &w[..self.lens[i]])
    }

    /// The input samples read when producing the outputs in `outputs` (non-empty range).
    pub(crate) fn source_span(&self, outputs: Range<usize>) -> Range<usize> {
        let taps = outputs.map(|i| self.taps(i));
        let (start, end) = taps.fold((usize::MAX, 0), |(lo, hi), (s, w)| {
            (lo.min(s), hi.max(s + w.len()))
        });
        start.min(end)..end
    }
}

/// Quantises a weight to 22-bit fixed point, rounding half away from zero like Pillow.
fn to_fixed(w: f64) -> i32 {
    let scaled = w * f64::from(1u32 << PRECISION_BITS);
    if w < 0.0 {
        (scaled - 0.5) as i32
    } else {
        (scaled + 0.5) as i32
    }
}

/// Resizes a whole image with PIL's bicubic filter.
///
/// Returns a copy when the size is unchanged (PIL does the same without filtering).
pub fn resize_bicubic(
    image: &RgbImage,
    width: u32,
    height: u32,
    order: PassOrder,
) -> Result<RgbImage> {
    let src = RgbView::from_image(image)?;
    let (out_w, out_h) = (width as usize, height as usize);
    if out_w == 0 || out_h == 0 {
        return Err(ImageError::EmptyImage {
            width: out_w,
            height: out_h,
        });
    }
    let resized = resize_region(src, out_w, out_h, 0..out_w, 0..out_h, order);
    let data = RgbBuf::interleaved_from(resized.view()).data;
    RgbImage::from_raw(width, height, data)
        .ok_or_else(|| ImageError::InvalidConfig("resized buffer has the wrong length".into()))
}

/// Resizes `src` to `out_w x out_h` but computes only output columns `xs` and rows `ys`.
///
/// Identical to resizing fully and then cropping: the horizontal-first order filters only the
/// source rows the vertical pass reads, the vertical-first order only the source columns the
/// horizontal pass reads. Requires non-empty ranges inside the output size. The result is
/// row-planar whenever a horizontal pass ran, otherwise it keeps `src`'s layout.
pub(crate) fn resize_region(
    src: RgbView<'_>,
    out_w: usize,
    out_h: usize,
    xs: Range<usize>,
    ys: Range<usize>,
    order: PassOrder,
) -> RgbBuf {
    resize_region_with(Resample::Bicubic, src, out_w, out_h, xs, ys, order)
}

/// [`resize_region`] with another filter.
pub(crate) fn resize_region_with(
    filter: Resample,
    src: RgbView<'_>,
    out_w: usize,
    out_h: usize,
    xs: Range<usize>,
    ys: Range<usize>,
    order: PassOrder,
) -> RgbBuf {
    debug_assert!(xs.start < xs.end && xs.end <= out_w && ys.start < ys.end && ys.end <= out_h);
    let src_planar = src.run_count() == 3;
    let (w, h) = (xs.len(), ys.len());
    let need_h = out_w != src.width;
    let need_v = out_h != src.height;
    match (need_h, need_v) {
        (false, false) => RgbBuf::copy_of(src.crop(xs.start, ys.start, w, h)),
        (true, false) => {
            let fh = AxisFilter::range(filter, src.width, out_w, xs.clone());
            let mut out = RgbBuf::new(w, h, true);
            kernels::horizontal(
                src.crop(0, ys.start, src.width, h),
                0,
                &fh,
                xs,
                &mut out.data,
            );
            out
        }
        (false, true) => {
            let fv = AxisFilter::range(filter, src.height, out_h, ys.clone());
            let mut out = RgbBuf::new(w, h, src_planar);
            kernels::vertical(
                src.crop(xs.start, 0, w, src.height),
                0,
                &fv,
                ys,
                &mut out.data,
            );
            out
        }
        (true, true) => {
            let fh = AxisFilter::range(filter, src.width, out_w, xs.clone());
            let fv = AxisFilter::range(filter, src.height, out_h, ys.clone());
            let mut out = RgbBuf::new(w, h, true);
            if order.vertical_first(src.width, src.height, out_w, out_h) {
                let cols = fh.source_span(xs.clone());
                let mut tmp = RgbBuf::new(cols.len(), h, src_planar);
                let strip = src.crop(cols.start, 0, cols.len(), src.height);
                kernels::vertical(strip, 0, &fv, ys, &mut tmp.data);
                kernels::horizontal(tmp.view(), cols.start, &fh, xs, &mut out.data);
            } else {
                let rows = fv.source_span(ys.clone());
                let mut tmp = RgbBuf::new(w, rows.len(), true);
                let strip = src.crop(0, rows.start, src.width, rows.len());
                kernels::horizontal(strip, 0, &fh, xs, &mut tmp.data);
                kernels::vertical(tmp.view(), rows.start, &fv, ys, &mut out.data);
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_values() {
        assert_eq!(bicubic(0.0), 1.0);
        assert_eq!(bicubic(1.0), 0.0);
        assert_eq!(bicubic(2.0), 0.0);
        assert_eq!(bicubic(0.5), 0.5625);
        assert_eq!(bicubic(-1.5), -0.0625);
    }

    #[test]
    fn lanczos_kernel_values() {
        assert_eq!(lanczos(0.0), 1.0);
        assert_eq!(lanczos(3.0), 0.0);
        assert_eq!(lanczos(3.5), 0.0);
        assert_eq!(lanczos(-3.5), 0.0);
        assert!(lanczos(-3.0).abs() < 1e-30);
        // Symmetric, with negative lobes between 1 and 2.
        let pi = std::f64::consts::PI;
        let expect = (0.5 * pi).sin() / (0.5 * pi) * ((0.5 / 3.0 * pi).sin() / (0.5 / 3.0 * pi));
        assert_eq!(lanczos(0.5), expect);
        assert_eq!(lanczos(-0.5), lanczos(0.5));
        assert!(lanczos(1.5) < 0.0 && lanczos(2.5) > 0.0);
        assert_eq!(Resample::from_pil(1), Some(Resample::Lanczos));
        assert_eq!(Resample::from_pil(0), None);
    }

    #[test]
    fn fixed_point_rounds_half_away_from_zero() {
        assert_eq!(to_fixed(1.0), 1 << 22);
        assert_eq!(to_fixed(0.5 / f64::from(1u32 << 22)), 1);
        assert_eq!(to_fixed(-0.5 / f64::from(1u32 << 22)), -1);
        assert_eq!(to_fixed(0.49 / f64::from(1u32 << 22)), 0);
        assert_eq!(to_fixed(-0.0625), -(1 << 18));
    }

    #[test]
    fn downscale_coefficients_match_pillow() {
        // 4 -> 2: scale 2, support 4, ksize 9; output 0 is centred at 1.0 and reads inputs 0..3.
        let f = AxisFilter::bicubic(4, 2);
        assert_eq!(f.ksize, 9);
        let (start, w) = f.taps(0);
        assert_eq!((start, w.len()), (0, 4));
        // Kernel at (x + 0.5 - 1.0) / 2 for x = 0..4: w(-0.25), w(0.25), w(0.75), w(1.25), normalised.
        let raw = [bicubic(-0.25), bicubic(0.25), bicubic(0.75), bicubic(1.25)];
        let sum: f64 = raw.iter().sum();
        let expect: Vec<i32> = raw.iter().map(|r| to_fixed(r / sum)).collect();
        assert_eq!(w, expect.as_slice());
        let (start, w) = f.taps(1);
        assert_eq!((start, w.len()), (0, 4));
        assert_eq!(w.iter().rev().copied().collect::<Vec<_>>(), expect);
    }

    #[test]
    fn upscale_coefficients_have_at_most_four_taps() {
        let f = AxisFilter::bicubic(5, 336);
        assert_eq!(f.ksize, 5);
        for i in 0..336 {
            let (start, w) = f.taps(i);
            assert!(w.len() <= 4 && start + w.len() <= 5);
            // Weights of one sample sum to one within the rounding of each tap.
            let sum: i32 = w.iter().sum();
            assert!((sum - (1 << 22)).abs() <= w.len() as i32, "{i}: {sum}");
        }
    }

    #[test]
    fn identity_filter_is_exact() {
        // Same size on one axis (e.g. a 1:1 pass) must reproduce every value exactly.
        let f = AxisFilter::bicubic(7, 7);
        for i in 0..7 {
            let (start, w) = f.taps(i);
            let at = i - start;
            for (j, &k) in w.iter().enumerate() {
                assert_eq!(k, if j == at { 1 << 22 } else { 0 });
            }
        }
    }

    #[test]
    fn pass_order_rule() {
        let p13 = PassOrder::Pillow13;
        // Tall photo 1920x1080 (h x w) squashed to 336x336: height drops 1584 > 2 * 744.
        assert!(p13.vertical_first(1080, 1920, 336, 336));
        // Landscape or mild portrait: horizontal first.
        assert!(!p13.vertical_first(640, 480, 448, 336));
        assert!(!p13.vertical_first(316, 500, 336, 531));
        // Boundary is strict: 300 == 2 * 150 stays horizontal first.
        assert!(!p13.vertical_first(300, 600, 150, 300));
        assert!(p13.vertical_first(300, 601, 150, 300));
        // Height not shrinking never goes vertical first, even if width grows.
        assert!(!p13.vertical_first(10, 100, 400, 100));
        // Width growing while height shrinks: the signed difference counts.
        assert!(p13.vertical_first(10, 100, 20, 50));
        assert!(!PassOrder::Pillow12.vertical_first(1080, 1920, 336, 336));
    }

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 7 + y * 3) as u8,
                (x * x + y) as u8,
                (255 - (x + 2 * y) % 256) as u8,
            ])
        })
    }

    #[test]
    fn unchanged_size_is_a_copy() {
        let img = gradient(9, 6);
        let out = resize_bicubic(&img, 9, 6, PassOrder::Pillow13).unwrap();
        assert_eq!(out, img);
    }

    #[test]
    fn region_equals_full_resize_then_crop() {
        for (w, h, ow, oh) in [
            (37, 90, 11, 20),
            (90, 37, 20, 11),
            (13, 9, 40, 27),
            (40, 40, 17, 40),
        ] {
            let img = gradient(w, h);
            for order in [PassOrder::Pillow12, PassOrder::Pillow13] {
                let full = resize_bicubic(&img, ow, oh, order).unwrap();
                let (ow, oh) = (ow as usize, oh as usize);
                let (xs, ys) = (ow / 4..ow - ow / 5, oh / 3..oh - 1);
                let part = resize_region(
                    RgbView::from_image(&img).unwrap(),
                    ow,
                    oh,
                    xs.clone(),
                    ys.clone(),
                    order,
                );
                let part = RgbBuf::interleaved_from(part.view()).data;
                let mut expect = Vec::new();
                for y in ys {
                    let row = &full.as_raw()[y * ow * 3..];
                    expect.extend_from_slice(&row[xs.start * 3..xs.end * 3]);
                }
                assert_eq!(part, expect, "{w}x{h} -> {ow}x{oh} {order:?}");
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(23, 57, image::Rgb([10, 128, 250]));
        for (ow, oh) in [(5, 9), (100, 30), (23, 336)] {
            let out = resize_bicubic(&img, ow, oh, PassOrder::Pillow13).unwrap();
            assert!(out.pixels().all(|p| p.0 == [10, 128, 250]), "{ow}x{oh}");
            for filter in [Resample::Lanczos, Resample::Bilinear] {
                let src = RgbView::from_image(&img).unwrap();
                let (w, h) = (ow as usize, oh as usize);
                let out = resize_region_with(filter, src, w, h, 0..w, 0..h, PassOrder::Pillow13);
                let out = RgbBuf::interleaved_from(out.view()).data;
                assert!(
                    out.chunks(3).all(|p| p == [10, 128, 250]),
                    "{filter:?} {ow}x{oh}"
                );
            }
        }
    }

    #[test]
    fn zero_target_is_an_error() {
        let img = gradient(4, 4);
        assert!(matches!(
            resize_bicubic(&img, 0, 4, PassOrder::Pillow13),
            Err(ImageError::EmptyImage { .. })
        ));
        let empty = RgbImage::new(0, 3);
        assert!(matches!(
            resize_bicubic(&empty, 2, 2, PassOrder::Pillow13),
            Err(ImageError::EmptyImage { .. })
        ));
    }
}
