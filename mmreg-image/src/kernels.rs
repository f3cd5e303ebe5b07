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
    /// Samples per block: the accumulators of one block stay in vector registers.
    const BLOCK: usize = 32;
    let row_len = src.width * 3;
    let run_len = row_len / src.run_count();
    for (yo, dst_row) in ys.zip(dst.chunks_exact_mut(row_len)) {
        let (start, w) = f.taps(yo);
        let rows = start - y0..start - y0 + w.len();
        for (run, out) in dst_row.chunks_exact_mut(run_len).enumerate() {
            for (b, out) in out.chunks_mut(BLOCK).enumerate() {
                let at = b * BLOCK;
                let mut acc = [ROUND_HALF; BLOCK];
                for (y, &wk) in rows.clone().zip(w) {
                    let samples = &src.run(y, run)[at..];
                    match samples.first_chunk::<BLOCK>() {
                        Some(full) => acc
                            .iter_mut()
                            .zip(full)
                            .for_each(|(a, &p)| *a += i32::from(p) * wk),
                        None => acc
                            .iter_mut()
                            .zip(samples)
                            .for_each(|(a, &p)| *a += i32::from(p) * wk),
                    }
                }
                for (d, &a) in out.iter_mut().zip(&acc) {
                    *d = clip8(a);
                }
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
    // Byte columns of the source span, per run; each run padded to whole 16x16 blocks.
    let run_len = if src.run_count() == 1 {
        3 * span_w
    } else {
        span_w
    };
    let run_cols = run_len.next_multiple_of(STRIP);
    let run_begin = if src.run_count() == 1 { 3 * lo } else { lo };
    let mut columns: Vec<Column> = vec![[0; STRIP]; src.run_count() * run_cols];
    let mut filtered: Vec<Column> = vec![[0; STRIP]; (3 * out_w).next_multiple_of(STRIP)];
    for (strip, dst_rows) in dst.chunks_mut(STRIP * 3 * out_w).enumerate() {
        let rows = dst_rows.len() / (3 * out_w);
        let first = strip * STRIP;
        // Short last strip: repeat its last row; those results are never written out.
        let row_of = |r: usize| first + r.min(rows - 1);

        for (run, run_columns) in columns.chunks_exact_mut(run_cols).enumerate() {
            let src_rows: [&[u8]; STRIP] =
                std::array::from_fn(|r| &src.run(row_of(r), run)[run_begin..run_begin + run_len]);
            for (chunk, out) in run_columns.chunks_exact_mut(STRIP).enumerate() {
                let block = std::array::from_fn(|r| load16(&src_rows[r][chunk * STRIP..]));
                transpose(&block, as_block(out));
            }
        }

        for (c, outs) in filtered.chunks_exact_mut(out_w).take(3).enumerate() {
            for (out, xo) in outs.iter_mut().zip(xs.clone()) {
                let (start, w) = f.taps(xo);
                let mut acc = [ROUND_HALF; STRIP];
                for (k, &wk) in w.iter().enumerate() {
                    let col = &columns[src.run_index(start - span.start + k, c, run_cols)];
                    for (a, &p) in acc.iter_mut().zip(col) {
                        *a += i32::from(p) * wk;
                    }
                }
                *out = acc.map(clip8);
            }
        }

        let mut block = [[0u8; STRIP]; STRIP];
        for (chunk, cols) in filtered.chunks_exact_mut(STRIP).enumerate() {
            transpose(as_block(cols), &mut block);
            for (dst_row, block_row) in dst_rows.chunks_exact_mut(3 * out_w).zip(&block) {
                let dst = &mut dst_row[chunk * STRIP..];
                match dst.first_chunk_mut::<STRIP>() {
                    Some(full) => *full = *block_row,
                    None => dst.copy_from_slice(&block_row[..dst.len()]),
                }
            }
        }
    }
}

/// A 16-column slice as a 16x16 block.
#[inline(always)]
fn as_block(cols: &mut [Column]) -> &mut [Column; STRIP] {
    cols.try_into()
        .expect("blocks are cut with chunks_exact_mut(STRIP)")
}

/// The first 16 bytes of `s`, zero-padded when shorter.
#[inline(always)]
fn load16(s: &[u8]) -> [u8; 16] {
    match s.first_chunk::<16>() {
        Some(full) => *full,
        None => {
            let mut out = [0; 16];
            out[..s.len()].copy_from_slice(s);
            out
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

/// Transposes a 16x16 byte matrix into `out`.
#[inline(always)]
fn transpose(m: &[[u8; 16]; 16], out: &mut [[u8; 16]; 16]) {
    #[cfg(target_arch = "x86_64")]
    sse2::transpose(m, out);
    #[cfg(not(target_arch = "x86_64"))]
    for (i, row) in out.iter_mut().enumerate() {
        *row = std::array::from_fn(|j| m[j][i]);
    }
}

#[cfg(target_arch = "x86_64")]
mod sse2 {
    use std::arch::x86_64::*;

    /// 16x16 byte transpose with four rounds of unpacks (SSE2 is part of x86-64's baseline).
    #[inline(always)]
    pub(super) fn transpose(m: &[[u8; 16]; 16], out: &mut [[u8; 16]; 16]) {
        // SAFETY: SSE2 is always available on x86-64; unaligned loads and stores go through
        // references to 16-byte arrays, so every access is in bounds.
        unsafe {
            let mut v: [__m128i; 16] =
                std::array::from_fn(|i| _mm_loadu_si128(m[i].as_ptr().cast()));
            // Round r pairs rows i and i + 2^r and interleaves units of 2^r bytes (lo half stays
            // at i, hi half goes to i + 2^r). Afterwards row i holds column bitreverse4(i).
            macro_rules! round {
                ($stride:literal, $lo:ident, $hi:ident) => {
                    for i in 0..16 {
                        if i & $stride == 0 {
                            let (a, b) = (v[i], v[i + $stride]);
                            v[i] = $lo(a, b);
                            v[i + $stride] = $hi(a, b);
                        }
                    }
                };
            }
            round!(1, _mm_unpacklo_epi8, _mm_unpackhi_epi8);
            round!(2, _mm_unpacklo_epi16, _mm_unpackhi_epi16);
            round!(4, _mm_unpacklo_epi32, _mm_unpackhi_epi32);
            round!(8, _mm_unpacklo_epi64, _mm_unpackhi_epi64);
            const BIT_REVERSED: [usize; 16] =
                [0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15];
            for (x, column) in v.into_iter().zip(BIT_REVERSED) {
                _mm_storeu_si128(out[column].as_mut_ptr().cast(), x);
            }
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
        let mut t = [[0u8; 16]; 16];
        transpose(&m, &mut t);
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
