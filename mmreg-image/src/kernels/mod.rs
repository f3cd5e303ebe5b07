//! The two separable convolution passes of Pillow's 8-bit resampler, and normalisation.
//!
//! Each output sample is `clamp((2^21 + sum(u8 * weight)) >> 22, 0, 255)` in `i32`, exactly as
//! Pillow computes it. Integer sums do not depend on their order, so the loops are arranged for
//! SIMD without changing a single result:
//!
//! * the vertical pass combines whole rows element-wise (it never looks at channels);
//! * the horizontal pass works on strips of 16 rows transposed into byte columns, so that
//!   filtering along a row becomes the same element-wise combination, 16 rows at a time.
//!
//! On x86-64 the inner loops use AVX2 when the CPU has it (see `x86.rs`); the generic loops
//! below are the fallback and the reference the SIMD code is tested against.

use std::ops::Range;

use crate::resize::{AxisFilter, PRECISION_BITS};
use crate::view::RgbView;

#[cfg(target_arch = "x86_64")]
mod x86;

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
    #[cfg(target_arch = "x86_64")]
    if x86::vertical(src, y0, f, ys.clone(), dst) {
        return;
    }
    vertical_with(src, y0, f, ys, dst, |rows, w, out| {
        mac_rows_generic(rows, w, out)
    });
}

/// The vertical pass around an inner loop `mac(rows, weights, out)` that computes
/// `out[i] = clip8(ROUND_HALF + sum_k rows[k][i] * weights[k])`.
#[inline(always)]
fn vertical_with(
    src: RgbView<'_>,
    y0: usize,
    f: &AxisFilter,
    ys: Range<usize>,
    dst: &mut [u8],
    mac: impl Fn(&[&[u8]], &[i32], &mut [u8]),
) {
    let row_len = src.width * 3;
    let run_len = row_len / src.run_count();
    let mut rows: Vec<&[u8]> = Vec::new();
    for (yo, dst_row) in ys.zip(dst.chunks_exact_mut(row_len)) {
        let (start, w) = f.taps(yo);
        for (run, out) in dst_row.chunks_exact_mut(run_len).enumerate() {
            rows.clear();
            rows.extend((0..w.len()).map(|k| src.run(start - y0 + k, run)));
            mac(&rows, w, out);
        }
    }
}

/// `out[i] = clip8(ROUND_HALF + sum_k rows[k][i] * w[k])`.
fn mac_rows_generic(rows: &[&[u8]], w: &[i32], out: &mut [u8]) {
    for (i, d) in out.iter_mut().enumerate() {
        let acc = rows
            .iter()
            .zip(w)
            .fold(ROUND_HALF, |acc, (row, &wk)| acc + i32::from(row[i]) * wk);
        *d = clip8(acc);
    }
}

/// `clip8(ROUND_HALF + sum_k columns[first + k * step] * w[k])` for each row of a strip.
fn mac_columns_generic(columns: &[Column], first: usize, step: usize, w: &[i32]) -> Column {
    let mut acc = [ROUND_HALF; STRIP];
    for (k, &wk) in w.iter().enumerate() {
        for (a, &p) in acc.iter_mut().zip(&columns[first + k * step]) {
            *a += i32::from(p) * wk;
        }
    }
    acc.map(clip8)
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
    #[cfg(target_arch = "x86_64")]
    if x86::horizontal(src, x0, f, xs.clone(), dst) {
        return;
    }
    horizontal_with(src, x0, f, xs, dst, mac_columns_generic);
}

/// The horizontal pass around an inner loop `mac(columns, first, step, weights)` that filters
/// one output byte for all rows of a strip (see `mac_columns_generic`).
#[inline(always)]
fn horizontal_with(
    src: RgbView<'_>,
    x0: usize,
    f: &AxisFilter,
    xs: Range<usize>,
    dst: &mut [u8],
    mac: impl Fn(&[Column], usize, usize, &[i32]) -> Column,
) {
    let out_w = xs.len();
    let span = f.source_span(xs.clone());
    let (lo, span_w) = (span.start - x0, span.len());
    // Byte columns of the source span, per run; each run padded to whole 16x16 blocks.
    let interleaved = src.run_count() == 1;
    let run_len = if interleaved { 3 * span_w } else { span_w };
    let run_begin = if interleaved { 3 * lo } else { lo };
    let run_cols = run_len.next_multiple_of(STRIP);
    let step = if interleaved { 3 } else { 1 };
    let mut columns: Vec<Column> = vec![[0; STRIP]; src.run_count() * run_cols];
    let mut filtered: Vec<Column> = vec![[0; STRIP]; (3 * out_w).next_multiple_of(STRIP)];
    let mut block = [[0u8; STRIP]; STRIP];
    for (strip, dst_rows) in dst.chunks_mut(STRIP * 3 * out_w).enumerate() {
        let rows = dst_rows.len() / (3 * out_w);
        let first = strip * STRIP;
        // Short last strip: repeat its last row; those results are never written out.
        let row_of = |r: usize| first + r.min(rows - 1);

        for (run, run_columns) in columns.chunks_exact_mut(run_cols).enumerate() {
            let src_rows: [&[u8]; STRIP] =
                std::array::from_fn(|r| &src.run(row_of(r), run)[run_begin..run_begin + run_len]);
            for (chunk, out) in run_columns.chunks_exact_mut(STRIP).enumerate() {
                let at = chunk * STRIP;
                if at + STRIP <= run_len {
                    transpose_rows(&src_rows, at, as_block(out));
                } else {
                    // Last partial chunk: zero-pad a copy. (A plain loop: `array::from_fn`
                    // compiles to `memcpy` calls here.)
                    for (dst, row) in block.iter_mut().zip(&src_rows) {
                        *dst = load16(&row[at..]);
                    }
                    transpose(&block, as_block(out));
                }
            }
        }

        for (c, outs) in filtered.chunks_exact_mut(out_w).take(3).enumerate() {
            for (out, xo) in outs.iter_mut().zip(xs.clone()) {
                let (start, w) = f.taps(xo);
                *out = mac(
                    &columns,
                    src.run_index(start - span.start, c, run_cols),
                    step,
                    w,
                );
            }
        }

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

/// Transposes the 16x16 block whose row `r` is `rows[r][at..at + 16]` into `out`.
#[inline(always)]
fn transpose_rows(rows: &[&[u8]; STRIP], at: usize, out: &mut [Column; STRIP]) {
    #[cfg(target_arch = "x86_64")]
    x86::transpose_rows(rows, at, out);
    #[cfg(not(target_arch = "x86_64"))]
    for (i, col) in out.iter_mut().enumerate() {
        *col = std::array::from_fn(|r| rows[r][at + i]);
    }
}

/// Transposes a 16x16 byte matrix into `out`.
#[inline(always)]
fn transpose(m: &[[u8; 16]; 16], out: &mut [[u8; 16]; 16]) {
    #[cfg(target_arch = "x86_64")]
    x86::transpose(m, out);
    #[cfg(not(target_arch = "x86_64"))]
    for (i, row) in out.iter_mut().enumerate() {
        *row = std::array::from_fn(|j| m[j][i]);
    }
}

/// Rescales and normalises one run of samples of a single channel, appending to `out`, with
/// HF's rounding: `f32(f64(v) * scale)`, then `(x - mean) / std` in `f32`. Plain loops (no lookup
/// table) that the compiler vectorises; IEEE arithmetic makes every lane equal the scalar formula.
pub(crate) fn normalize(
    src: &[u8],
    out: &mut Vec<f32>,
    scale: Option<f64>,
    norm: Option<(f32, f32)>,
) {
    #[cfg(target_arch = "x86_64")]
    if x86::normalize(src, out, scale, norm) {
        return;
    }
    normalize_generic(src, out, scale, norm)
}

#[inline(always)]
fn normalize_generic(src: &[u8], out: &mut Vec<f32>, scale: Option<f64>, norm: Option<(f32, f32)>) {
    let samples = src.iter().copied();
    match (scale, norm) {
        (Some(k), Some((m, s))) => out.extend(samples.map(|v| ((f64::from(v) * k) as f32 - m) / s)),
        (Some(k), None) => out.extend(samples.map(|v| (f64::from(v) * k) as f32)),
        (None, Some((m, s))) => out.extend(samples.map(|v| (f32::from(v) - m) / s)),
        (None, None) => out.extend(samples.map(f32::from)),
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

    #[test]
    fn vertical_matches_reference() {
        // Widths with partial 32-byte blocks; planar input keeps its layout.
        for (w, h, out_h) in [(37, 50, 20), (11, 9, 40), (64, 33, 33 * 2 + 1)] {
            let data = noise(w * h * 3, (w + h) as u32);
            let f = AxisFilter::bicubic(h, out_h);
            let src = RgbView::interleaved(&data, w, h);
            let mut got = vec![0u8; out_h * w * 3];
            vertical(src, 0, &f, 0..out_h, &mut got);
            for (y, row) in got.chunks_exact(3 * w).enumerate() {
                let (start, taps) = f.taps(y);
                for (i, &v) in row.iter().enumerate() {
                    let acc = taps.iter().enumerate().fold(ROUND_HALF, |acc, (k, &wk)| {
                        acc + i32::from(data[(start + k) * 3 * w + i]) * wk
                    });
                    assert_eq!(v, clip8(acc), "{w}x{h} -> {out_h}: row {y} byte {i}");
                }
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
