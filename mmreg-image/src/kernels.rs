//! The two separable convolution passes of Pillow's 8-bit resampler.
//!
//! Each output sample is `clamp((2^21 + sum(u8 * weight)) >> 22, 0, 255)` with `i32` arithmetic,
//! which is exactly what Pillow computes; the order of the sum does not matter for integers, which
//! leaves room to vectorise freely.

use std::ops::Range;

use crate::resize::{AxisFilter, PRECISION_BITS};
use crate::view::RgbView;

/// Rounding offset added before the final shift (`1 << (PRECISION_BITS - 1)`).
const ROUND_HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Pillow's `clip8`: drop the fraction bits (arithmetic shift, i.e. floor) and saturate.
#[inline(always)]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Filters along rows: output pixel `j` of row `y` is filtered around source column
/// `xs.start + j`. Column 0 of `src` is source column `x0`.
/// `dst` holds `src.height` rows of `xs.len()` pixels.
pub(crate) fn horizontal(
    src: RgbView<'_>,
    x0: usize,
    f: &AxisFilter,
    xs: Range<usize>,
    dst: &mut [u8],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 support was just checked.
        return unsafe { horizontal_avx2(src, x0, f, xs, dst) };
    }
    horizontal_generic(src, x0, f, xs, dst)
}

/// The generic code compiled with AVX2 enabled, so the compiler can vectorise it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn horizontal_avx2(
    src: RgbView<'_>,
    x0: usize,
    f: &AxisFilter,
    xs: Range<usize>,
    dst: &mut [u8],
) {
    horizontal_generic(src, x0, f, xs, dst)
}

#[inline(always)]
fn horizontal_generic(
    src: RgbView<'_>,
    x0: usize,
    f: &AxisFilter,
    xs: Range<usize>,
    dst: &mut [u8],
) {
    let out_row = xs.len() * 3;
    for (y, dst_row) in dst.chunks_exact_mut(out_row).take(src.height).enumerate() {
        let row = src.row(y);
        for (px, xo) in dst_row.chunks_exact_mut(3).zip(xs.clone()) {
            let (start, w) = f.taps(xo);
            let first = (start - x0) * 3;
            let taps = &row[first..first + w.len() * 3];
            let mut acc = [ROUND_HALF; 3];
            for (p, &k) in taps.chunks_exact(3).zip(w) {
                acc[0] += i32::from(p[0]) * k;
                acc[1] += i32::from(p[1]) * k;
                acc[2] += i32::from(p[2]) * k;
            }
            px[0] = clip8(acc[0]);
            px[1] = clip8(acc[1]);
            px[2] = clip8(acc[2]);
        }
    }
}

/// Filters along columns: output row `i` is filtered around source row `ys.start + i`.
/// Row 0 of `src` is source row `y0`. `dst` holds `ys.len()` rows of `src.width` pixels.
pub(crate) fn vertical(
    src: RgbView<'_>,
    y0: usize,
    f: &AxisFilter,
    ys: Range<usize>,
    dst: &mut [u8],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 support was just checked.
        return unsafe { vertical_avx2(src, y0, f, ys, dst) };
    }
    vertical_generic(src, y0, f, ys, dst)
}

/// The generic code compiled with AVX2 enabled, so the compiler can vectorise it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn vertical_avx2(
    src: RgbView<'_>,
    y0: usize,
    f: &AxisFilter,
    ys: Range<usize>,
    dst: &mut [u8],
) {
    vertical_generic(src, y0, f, ys, dst)
}

#[inline(always)]
fn vertical_generic(src: RgbView<'_>, y0: usize, f: &AxisFilter, ys: Range<usize>, dst: &mut [u8]) {
    let row_len = src.width * 3;
    let mut acc = vec![0i32; row_len];
    for (yo, dst_row) in ys.zip(dst.chunks_exact_mut(row_len)) {
        let (start, w) = f.taps(yo);
        acc.fill(ROUND_HALF);
        for (k, &wk) in w.iter().enumerate() {
            // Channels are independent, so whole interleaved rows combine element-wise.
            for (a, &p) in acc.iter_mut().zip(src.row(start - y0 + k)) {
                *a += i32::from(p) * wk;
            }
        }
        for (d, &a) in dst_row.iter_mut().zip(&acc) {
            *d = clip8(a);
        }
    }
}
