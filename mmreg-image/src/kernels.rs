//! The two separable convolution passes of Pillow's 8-bit resampler.
//!
//! Each output sample is `clamp((2^21 + sum(u8 * weight)) >> 22, 0, 255)` in `i32`, exactly as
//! Pillow computes it. Integer sums do not depend on their order, so the loops are arranged for
//! SIMD without changing a single result:
//!
//! * the vertical pass combines whole rows element-wise (it never looks at channels);
//! * the horizontal pass works on strips of 16 rows transposed into byte columns, so that
//!   filtering along a row becomes the same element-wise combination, 16 rows at a time.
//!
//! The generic code is compiled twice on x86-64 (baseline and AVX2, picked at run time).

use std::ops::Range;

use crate::resize::{AxisFilter, PRECISION_BITS};
use crate::view::RgbView;

/// Rounding offset added before the final shift (`1 << (PRECISION_BITS - 1)`).
const ROUND_HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Rows the horizontal pass processes together (one byte column = one 16-byte vector).
const STRIP: usize = 16;

/// One byte position of a row, for each of the `STRIP` rows of a strip.
type Column = [u8; STRIP];

/// Pillow's `clip8`: drop the fraction bits (arithmetic shift, i.e. floor) and saturate.
#[inline(always)]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Runs `$generic` through an AVX2-enabled copy when the CPU has AVX2.
macro_rules! dispatch {
    ($generic:ident, $avx2:ident, ($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn $avx2($($arg: $ty),*) {
            $generic($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 support was just checked.
            return unsafe { $avx2($($arg),*) };
        }
        $generic($($arg),*)
    };
}

/// Filters along columns: output row `i` is filtered around source row `ys.start + i`; row 0 of
/// `src` is source row `y0`. Writes `ys.len()` packed rows in `src`'s layout (planar rows become
/// row-planar with runs of `src.width`).
pub(crate) fn vertical(
    src: RgbView<'_>,
    y0: usize,
    f: &AxisFilter,
    ys: Range<usize>,
    dst: &mut [u8],
) {
    dispatch!(vertical_generic, vertical_avx2, (src: RgbView<'_>, y0: usize, f: &AxisFilter, ys: Range<usize>, dst: &mut [u8]));
}

#[inline(always)]
fn vertical_generic(src: RgbView<'_>, y0: usize, f: &AxisFilter, ys: Range<usize>, dst: &mut [u8]) {
    let row_len = src.width * 3;
    let run_len = row_len / src.run_count();
    let mut acc = vec![0i32; run_len];
    for (yo, dst_row) in ys.zip(dst.chunks_exact_mut(row_len)) {
        let (start, w) = f.taps(yo);
        for (run, out) in dst_row.chunks_exact_mut(run_len).enumerate() {
            acc.fill(ROUND_HALF);
            for (k, &wk) in w.iter().enumerate() {
                for (a, &p) in acc.iter_mut().zip(src.run(start - y0 + k, run)) {
                    *a += i32::from(p) * wk;
                }
            }
            for (d, &a) in out.iter_mut().zip(&acc) {
                *d = clip8(a);
            }
        }
    }
}

/// Filters along rows: output pixel `j` is filtered around source column `xs.start + j`;
/// column 0 of `src` is source column `x0`. Writes `src.height` row-planar rows of `xs.len()`
/// pixels (R run, G run, B run).
pub(crate) fn horizontal(
    src: RgbView<'_>,
    x0: usize,
    f: &AxisFilter,
    xs: Range<usize>,
    dst: &mut [u8],
) {
    dispatch!(horizontal_generic, horizontal_avx2, (src: RgbView<'_>, x0: usize, f: &AxisFilter, xs: Range<usize>, dst: &mut [u8]));
}

#[inline(always)]
fn horizontal_generic(
    src: RgbView<'_>,
    x0: usize,
    f: &AxisFilter,
    xs: Range<usize>,
    dst: &mut [u8],
) {
    let out_w = xs.len();
    let span = f.source_span(xs.clone());
    let (lo, span_w) = (span.start - x0, span.len());
    let mut columns: Vec<Column> = Vec::new();
    let mut filtered: Vec<Column> = vec![[0; STRIP]; 3 * out_w];
    for (strip, dst_rows) in dst.chunks_mut(STRIP * 3 * out_w).enumerate() {
        let rows = dst_rows.len() / (3 * out_w);
        let first = strip * STRIP;
        // Short last strip: repeat its last row; those results are never written out.
        let row_of = |r: usize| first + r.min(rows - 1);

        columns.clear();
        for run in 0..src.run_count() {
            let (begin, len) = match src.run_count() {
                1 => (3 * lo, 3 * span_w),
                _ => (lo, span_w),
            };
            for chunk in (0..len).step_by(STRIP) {
                let n = STRIP.min(len - chunk);
                let mut block = [[0u8; STRIP]; STRIP];
                for (r, dst) in block.iter_mut().enumerate() {
                    let at = begin + chunk;
                    dst[..n].copy_from_slice(&src.run(row_of(r), run)[at..at + n]);
                }
                columns.extend_from_slice(&transpose(&block)[..n]);
            }
        }

        for (c, outs) in filtered.chunks_exact_mut(out_w).enumerate() {
            for (out, xo) in outs.iter_mut().zip(xs.clone()) {
                let (start, w) = f.taps(xo);
                let mut acc = [ROUND_HALF; STRIP];
                for (k, &wk) in w.iter().enumerate() {
                    let col = &columns[src.run_index(start - span.start + k, c, span_w)];
                    for (a, &p) in acc.iter_mut().zip(col) {
                        *a += i32::from(p) * wk;
                    }
                }
                *out = acc.map(clip8);
            }
        }

        for (chunk, cols) in filtered.chunks(STRIP).enumerate() {
            let mut block = [[0u8; STRIP]; STRIP];
            block[..cols.len()].copy_from_slice(cols);
            let block = transpose(&block);
            for (r, dst_row) in dst_rows.chunks_exact_mut(3 * out_w).enumerate() {
                dst_row[chunk * STRIP..][..cols.len()].copy_from_slice(&block[r][..cols.len()]);
            }
        }
    }
}

/// Rescales and normalises one run of samples of a single channel, with HF's rounding:
/// `f32(f64(v) * scale)`, then `(x - mean) / std` in `f32`. Written as plain loops (no lookup
/// table) so the compiler vectorises them; IEEE arithmetic makes the result identical.
pub(crate) fn normalize(src: &[u8], dst: &mut [f32], scale: Option<f64>, norm: Option<(f32, f32)>) {
    dispatch!(normalize_generic, normalize_avx2, (src: &[u8], dst: &mut [f32], scale: Option<f64>, norm: Option<(f32, f32)>));
}

#[inline(always)]
fn normalize_generic(src: &[u8], dst: &mut [f32], scale: Option<f64>, norm: Option<(f32, f32)>) {
    let pairs = dst.iter_mut().zip(src);
    match (scale, norm) {
        (Some(k), Some((m, s))) => {
            pairs.for_each(|(d, &v)| *d = ((f64::from(v) * k) as f32 - m) / s)
        }
        (Some(k), None) => pairs.for_each(|(d, &v)| *d = (f64::from(v) * k) as f32),
        (None, Some((m, s))) => pairs.for_each(|(d, &v)| *d = (f32::from(v) - m) / s),
        (None, None) => pairs.for_each(|(d, &v)| *d = f32::from(v)),
    }
}

/// Transposes a 16x16 byte matrix.
#[inline(always)]
fn transpose(m: &[[u8; 16]; 16]) -> [[u8; 16]; 16] {
    #[cfg(target_arch = "x86_64")]
    {
        sse2::transpose(m)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::array::from_fn(|i| std::array::from_fn(|j| m[j][i]))
    }
}

#[cfg(target_arch = "x86_64")]
mod sse2 {
    use std::arch::x86_64::*;

    /// 16x16 byte transpose with four rounds of unpacks (SSE2 is part of x86-64's baseline).
    #[inline(always)]
    pub(super) fn transpose(m: &[[u8; 16]; 16]) -> [[u8; 16]; 16] {
        // SAFETY: SSE2 is always available on x86-64; unaligned loads and stores go through
        // references to 16-byte arrays, so every access is in bounds.
        unsafe {
            let mut v: [__m128i; 16] =
                std::array::from_fn(|i| _mm_loadu_si128(m[i].as_ptr().cast()));
            // Round r pairs rows i and i + 2^r and interleaves units of 2^r bytes (lo half stays
            // at i, hi half goes to i + 2^r). Afterwards row i holds column bitreverse4(i).
            for round in 0..4 {
                let stride = 1 << round;
                for i in (0..16).filter(|i| i & stride == 0) {
                    let (a, b) = (v[i], v[i + stride]);
                    let (lo, hi) = match round {
                        0 => (_mm_unpacklo_epi8(a, b), _mm_unpackhi_epi8(a, b)),
                        1 => (_mm_unpacklo_epi16(a, b), _mm_unpackhi_epi16(a, b)),
                        2 => (_mm_unpacklo_epi32(a, b), _mm_unpackhi_epi32(a, b)),
                        _ => (_mm_unpacklo_epi64(a, b), _mm_unpackhi_epi64(a, b)),
                    };
                    v[i] = lo;
                    v[i + stride] = hi;
                }
            }
            let mut out = [[0u8; 16]; 16];
            for (i, x) in v.into_iter().enumerate() {
                let column = (i as u8).reverse_bits() >> 4;
                _mm_storeu_si128(out[usize::from(column)].as_mut_ptr().cast(), x);
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::RgbBuf;

    #[test]
    fn transpose_is_a_transpose() {
        let m: [[u8; 16]; 16] =
            std::array::from_fn(|i| std::array::from_fn(|j| (i * 16 + j) as u8));
        let t = transpose(&m);
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(t[i][j], m[j][i], "({i}, {j})");
            }
        }
    }

    /// Pillow's horizontal loop written plainly, as the reference for the strip version.
    fn horizontal_reference(
        src: RgbView<'_>,
        x0: usize,
        f: &AxisFilter,
        xs: Range<usize>,
    ) -> Vec<u8> {
        let out_w = xs.len();
        let mut out = vec![0u8; src.height * 3 * out_w];
        let mut scratch = Vec::new();
        for y in 0..src.height {
            for c in 0..3 {
                let channel = src.channel(y, c, &mut scratch).to_vec();
                for (j, xo) in xs.clone().enumerate() {
                    let (start, w) = f.taps(xo);
                    let acc = w.iter().enumerate().fold(ROUND_HALF, |acc, (k, &wk)| {
                        acc + i32::from(channel[start - x0 + k]) * wk
                    });
                    out[y * 3 * out_w + c * out_w + j] = clip8(acc);
                }
            }
        }
        out
    }

    fn noise(len: usize, seed: u32) -> Vec<u8> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn strip_horizontal_matches_reference() {
        // Heights around the strip size, widths with partial 16-byte chunks, up and down scales.
        for (w, h, out_w) in [
            (37, 5, 20),
            (50, 16, 11),
            (23, 33, 60),
            (100, 17, 7),
            (9, 40, 9 * 3),
        ] {
            let data = noise(w * h * 3, (w * h) as u32);
            let src = RgbView::interleaved(&data, w, h);
            let f = AxisFilter::bicubic(w, out_w);
            for xs in [0..out_w, out_w / 3..out_w - out_w / 4] {
                let mut got = vec![0u8; h * 3 * xs.len()];
                horizontal(src, 0, &f, xs.clone(), &mut got);
                assert_eq!(
                    got,
                    horizontal_reference(src, 0, &f, xs.clone()),
                    "{w}x{h} -> {out_w} {xs:?}"
                );
                // The same pixels stored planar give the same result.
                let planar = RgbBuf::interleaved_from(src);
                let mut data = planar.data.clone();
                for (row, src_row) in data
                    .chunks_exact_mut(3 * w)
                    .zip(planar.data.chunks_exact(3 * w))
                {
                    for x in 0..w {
                        for c in 0..3 {
                            row[c * w + x] = src_row[3 * x + c];
                        }
                    }
                }
                let planar = RgbBuf {
                    data,
                    width: w,
                    height: h,
                    planar: true,
                };
                let mut got_planar = vec![0u8; h * 3 * xs.len()];
                horizontal(planar.view(), 0, &f, xs.clone(), &mut got_planar);
                assert_eq!(got_planar, got);
            }
        }
    }
}
