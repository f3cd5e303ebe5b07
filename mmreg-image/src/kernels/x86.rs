//! x86-64 SIMD pieces of the resampler: an SSE2 byte transpose (baseline on x86-64) and
//! multiply-accumulate loops for AVX2 and AVX-512, picked at run time.
//!
//! Every routine computes exactly the integer expression of its generic twin in `mod.rs`
//! (`i32` products and sums, arithmetic shift, saturation to `0..=255`), so results do not
//! depend on the instruction set; `mod.rs` tests compare them with plain loops.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{Column, ROUND_HALF, STRIP};
use crate::resize::{AxisFilter, PRECISION_BITS};
use crate::view::RgbView;

/// The best instruction set available (detection is cached by the standard library).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Avx512,
    Avx2,
}

fn level() -> Option<Level> {
    if std::arch::is_x86_feature_detected!("avx512f") {
        Some(Level::Avx512)
    } else if std::arch::is_x86_feature_detected!("avx2") {
        Some(Level::Avx2)
    } else {
        None
    }
}

/// The vertical pass with SIMD inner loops; returns false (doing nothing) without AVX2.
pub(super) fn vertical(
    src: RgbView<'_>,
    y0: usize,
    f: &AxisFilter,
    ys: Range<usize>,
    dst: &mut [u8],
) -> bool {
    // SAFETY: each branch runs only on a CPU with the features its function enables.
    match level() {
        Some(Level::Avx512) => unsafe { vertical_avx512(src, y0, f, ys, dst) },
        Some(Level::Avx2) => unsafe { vertical_avx2(src, y0, f, ys, dst) },
        None => return false,
    }
    true
}

/// The horizontal pass with SIMD inner loops; returns false (doing nothing) without AVX2.
pub(super) fn horizontal(
    src: RgbView<'_>,
    x0: usize,
    f: &AxisFilter,
    xs: Range<usize>,
    dst: &mut [u8],
) -> bool {
    // SAFETY: each branch runs only on a CPU with the features its function enables.
    match level() {
        Some(Level::Avx512) => unsafe { horizontal_avx512(src, x0, f, xs, dst) },
        Some(Level::Avx2) => unsafe { horizontal_avx2(src, x0, f, xs, dst) },
        None => return false,
    }
    true
}

/// Normalisation compiled for the best instruction set; returns false without AVX2.
pub(super) fn normalize(
    src: &[u8],
    out: &mut Vec<f32>,
    scale: Option<f64>,
    norm: Option<(f32, f32)>,
) -> bool {
    /// The generic loops compiled with AVX-512 enabled; they vectorise well on their own.
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(src: &[u8], out: &mut Vec<f32>, scale: Option<f64>, norm: Option<(f32, f32)>) {
        super::normalize_generic(src, out, scale, norm)
    }
    /// The generic loops compiled with AVX2 enabled.
    #[target_feature(enable = "avx2")]
    unsafe fn avx2(src: &[u8], out: &mut Vec<f32>, scale: Option<f64>, norm: Option<(f32, f32)>) {
        super::normalize_generic(src, out, scale, norm)
    }
    // SAFETY: each branch runs only on a CPU with the features its function enables.
    match level() {
        Some(Level::Avx512) => unsafe { avx512(src, out, scale, norm) },
        Some(Level::Avx2) => unsafe { avx2(src, out, scale, norm) },
        None => return false,
    }
    true
}

/// Transposes the 16x16 block whose row `r` is `rows[r][at..at + 16]` into `out`.
#[inline(always)]
pub(super) fn transpose_rows(rows: &[&[u8]; 16], at: usize, out: &mut [[u8; 16]; 16]) {
    let mut v = [unsafe_zero(); 16];
    for (x, row) in v.iter_mut().zip(rows) {
        // Slicing checks that the 16 loaded bytes exist.
        let bytes = &row[at..at + 16];
        // SAFETY: SSE2 is part of the x86-64 baseline and `bytes` holds 16 readable bytes.
        *x = unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) };
    }
    store_transposed(v, out);
}

/// Transposes a 16x16 byte matrix into `out`.
#[inline(always)]
pub(super) fn transpose(m: &[[u8; 16]; 16], out: &mut [[u8; 16]; 16]) {
    let mut v = [unsafe_zero(); 16];
    for (x, row) in v.iter_mut().zip(m) {
        // SAFETY: SSE2 is part of the x86-64 baseline; `row` is 16 readable bytes.
        *x = unsafe { _mm_loadu_si128(row.as_ptr().cast()) };
    }
    store_transposed(v, out);
}

#[inline(always)]
fn unsafe_zero() -> __m128i {
    // SAFETY: SSE2 is part of the x86-64 baseline.
    unsafe { _mm_setzero_si128() }
}

/// The 16x16 byte transpose proper: four rounds of unpacks, then stores in column order.
#[inline(always)]
fn store_transposed(mut v: [__m128i; 16], out: &mut [[u8; 16]; 16]) {
    const BIT_REVERSED: [usize; 16] = [0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15];
    // SAFETY: SSE2 is part of the x86-64 baseline; stores go to 16-byte arrays.
    unsafe {
        // Round r pairs rows i and i + 2^r and interleaves units of 2^r bytes (low halves stay at
        // i, high halves go to i + 2^r). Afterwards row i holds column bitreverse4(i). Written
        // out pair by pair so all 16 rows stay in registers.
        macro_rules! round {
            ($lo:ident, $hi:ident: $(($a:literal, $b:literal))*) => {
                $(
                    let (a, b) = (v[$a], v[$b]);
                    v[$a] = $lo(a, b);
                    v[$b] = $hi(a, b);
                )*
            };
        }
        round!(_mm_unpacklo_epi8, _mm_unpackhi_epi8:
            (0, 1) (2, 3) (4, 5) (6, 7) (8, 9) (10, 11) (12, 13) (14, 15));
        round!(_mm_unpacklo_epi16, _mm_unpackhi_epi16:
            (0, 2) (1, 3) (4, 6) (5, 7) (8, 10) (9, 11) (12, 14) (13, 15));
        round!(_mm_unpacklo_epi32, _mm_unpackhi_epi32:
            (0, 4) (1, 5) (2, 6) (3, 7) (8, 12) (9, 13) (10, 14) (11, 15));
        round!(_mm_unpacklo_epi64, _mm_unpackhi_epi64:
            (0, 8) (1, 9) (2, 10) (3, 11) (4, 12) (5, 13) (6, 14) (7, 15));
        for (x, column) in v.into_iter().zip(BIT_REVERSED) {
            _mm_storeu_si128(out[column].as_mut_ptr().cast(), x);
        }
    }
}

/// Offsets of `block`-sized pieces covering `0..len`; the last one is moved back to end at `len`
/// (overlapping its neighbour, which just recomputes equal values). Empty when `len < block`.
fn block_starts(len: usize, block: usize) -> impl Iterator<Item = usize> {
    let last = len.checked_sub(block);
    (0..len / block)
        .map(move |b| b * block)
        .chain(last.filter(|&l| l % block != 0))
}

// ---------------------------------------------------------------------------------------------
// AVX2: 8 sums per vector.

#[target_feature(enable = "avx2")]
unsafe fn vertical_avx2(
    src: RgbView<'_>,
    y0: usize,
    f: &AxisFilter,
    ys: Range<usize>,
    dst: &mut [u8],
) {
    // SAFETY: this function only runs on CPUs with AVX2 (caller's contract).
    super::vertical_with(src, y0, f, ys, dst, |rows, w, out| unsafe {
        mac_rows_avx2(rows, w, out)
    });
}

#[target_feature(enable = "avx2")]
unsafe fn horizontal_avx2(
    src: RgbView<'_>,
    x0: usize,
    f: &AxisFilter,
    xs: Range<usize>,
    dst: &mut [u8],
) {
    // SAFETY: this function only runs on CPUs with AVX2 (caller's contract).
    super::horizontal_with(src, x0, f, xs, dst, |columns, first, step, w| unsafe {
        mac_columns_avx2(columns, first, step, w)
    });
}

/// `acc + zext(bytes[0..8]) * w`.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn mac8(acc: __m256i, bytes: __m128i, w: __m256i) -> __m256i {
    _mm256_add_epi32(acc, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(bytes), w))
}

/// `clip8` on two vectors of 8 sums, packed into 16 bytes in order.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn clip16(lo: __m256i, hi: __m256i) -> __m128i {
    let shift = _mm_cvtsi32_si128(PRECISION_BITS as i32);
    // Signed saturation to i16 then unsigned saturation to u8 is exactly clamp(0, 255).
    let words = _mm256_packs_epi32(_mm256_sra_epi32(lo, shift), _mm256_sra_epi32(hi, shift));
    // packs works per 128-bit lane: restore the order of the four 64-bit groups.
    let words = _mm256_permute4x64_epi64::<0b11_01_10_00>(words);
    _mm_packus_epi16(
        _mm256_castsi256_si128(words),
        _mm256_extracti128_si256::<1>(words),
    )
}

/// `out[i] = clip8(ROUND_HALF + sum_k rows[k][i] * w[k])`; rows are at least `out.len()` long.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn mac_rows_avx2(rows: &[&[u8]], w: &[i32], out: &mut [u8]) {
    const BLOCK: usize = 32;
    for at in block_starts(out.len(), BLOCK) {
        let mut acc = [_mm256_set1_epi32(ROUND_HALF); 4];
        for (row, &wk) in rows.iter().zip(w) {
            // Slicing checks that the loaded bytes exist.
            let src = &row[at..at + BLOCK];
            let wv = _mm256_set1_epi32(wk);
            for (j, acc) in acc.iter_mut().enumerate() {
                *acc = mac8(*acc, _mm_loadl_epi64(src[8 * j..].as_ptr().cast()), wv);
            }
        }
        let bytes = _mm256_set_m128i(clip16(acc[2], acc[3]), clip16(acc[0], acc[1]));
        _mm256_storeu_si256(out[at..at + BLOCK].as_mut_ptr().cast(), bytes);
    }
    if out.len() < BLOCK {
        super::mac_rows_generic(rows, w, out);
    }
}

/// One output byte for the 16 rows of a strip: `clip8(ROUND_HALF + sum_k col(k) * w[k])`.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn mac_columns_avx2(columns: &[Column], first: usize, step: usize, w: &[i32]) -> Column {
    let mut lo = _mm256_set1_epi32(ROUND_HALF);
    let mut hi = lo;
    for (k, &wk) in w.iter().enumerate() {
        let bytes = _mm_loadu_si128(columns[first + k * step].as_ptr().cast());
        let wv = _mm256_set1_epi32(wk);
        lo = mac8(lo, bytes, wv);
        hi = mac8(hi, _mm_srli_si128::<8>(bytes), wv);
    }
    let mut out = [0u8; STRIP];
    _mm_storeu_si128(out.as_mut_ptr().cast(), clip16(lo, hi));
    out
}

// ---------------------------------------------------------------------------------------------
// AVX-512: 16 sums per vector, so a strip column is exactly one register.

#[target_feature(enable = "avx512f")]
unsafe fn vertical_avx512(
    src: RgbView<'_>,
    y0: usize,
    f: &AxisFilter,
    ys: Range<usize>,
    dst: &mut [u8],
) {
    // SAFETY: this function only runs on CPUs with AVX-512F (caller's contract).
    super::vertical_with(src, y0, f, ys, dst, |rows, w, out| unsafe {
        mac_rows_avx512(rows, w, out)
    });
}

#[target_feature(enable = "avx512f")]
unsafe fn horizontal_avx512(
    src: RgbView<'_>,
    x0: usize,
    f: &AxisFilter,
    xs: Range<usize>,
    dst: &mut [u8],
) {
    // SAFETY: this function only runs on CPUs with AVX-512F (caller's contract).
    super::horizontal_with(src, x0, f, xs, dst, |columns, first, step, w| unsafe {
        mac_columns_avx512(columns, first, step, w)
    });
}

/// `acc + zext(bytes) * w` for 16 bytes.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn mac16(acc: __m512i, bytes: __m128i, w: __m512i) -> __m512i {
    _mm512_add_epi32(acc, _mm512_mullo_epi32(_mm512_cvtepu8_epi32(bytes), w))
}

/// `clip8` on 16 sums: shift, clamp below at 0, then unsigned saturation to 255.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn clip16_512(acc: __m512i) -> __m128i {
    let shifted = _mm512_srai_epi32::<PRECISION_BITS>(acc);
    _mm512_cvtusepi32_epi8(_mm512_max_epi32(shifted, _mm512_setzero_si512()))
}

/// `out[i] = clip8(ROUND_HALF + sum_k rows[k][i] * w[k])`; rows are at least `out.len()` long.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn mac_rows_avx512(rows: &[&[u8]], w: &[i32], out: &mut [u8]) {
    const BLOCK: usize = 64;
    for at in block_starts(out.len(), BLOCK) {
        let mut acc = [_mm512_set1_epi32(ROUND_HALF); 4];
        for (row, &wk) in rows.iter().zip(w) {
            // Slicing checks that the loaded bytes exist.
            let src = &row[at..at + BLOCK];
            let wv = _mm512_set1_epi32(wk);
            for (j, acc) in acc.iter_mut().enumerate() {
                *acc = mac16(*acc, _mm_loadu_si128(src[16 * j..].as_ptr().cast()), wv);
            }
        }
        let dst = &mut out[at..at + BLOCK];
        for (j, acc) in acc.into_iter().enumerate() {
            _mm_storeu_si128(dst[16 * j..].as_mut_ptr().cast(), clip16_512(acc));
        }
    }
    if out.len() < BLOCK {
        mac_rows_avx2(rows, w, out);
    }
}

/// One output byte for the 16 rows of a strip: `clip8(ROUND_HALF + sum_k col(k) * w[k])`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn mac_columns_avx512(columns: &[Column], first: usize, step: usize, w: &[i32]) -> Column {
    let mut acc = _mm512_set1_epi32(ROUND_HALF);
    for (k, &wk) in w.iter().enumerate() {
        let bytes = _mm_loadu_si128(columns[first + k * step].as_ptr().cast());
        acc = mac16(acc, bytes, _mm512_set1_epi32(wk));
    }
    let mut out = [0u8; STRIP];
    _mm_storeu_si128(out.as_mut_ptr().cast(), clip16_512(acc));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::RgbView;

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (state >> 56) as u8
            })
            .collect()
    }

    #[test]
    fn block_starts_cover_with_overlap() {
        assert_eq!(block_starts(64, 32).collect::<Vec<_>>(), [0, 32]);
        assert_eq!(block_starts(70, 32).collect::<Vec<_>>(), [0, 32, 38]);
        assert_eq!(block_starts(31, 32).count(), 0);
    }

    /// Every instruction set this CPU has gives the generic loops' bytes, for widths that leave
    /// partial blocks and strips that are not full.
    #[test]
    fn simd_levels_match_generic() {
        let avx2 = std::arch::is_x86_feature_detected!("avx2");
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        for (w, h, out_w, out_h) in [(45, 37, 20, 50), (130, 21, 77, 9), (7, 70, 12, 33)] {
            let data = noise(w * h * 3, (w * h) as u64);
            let src = RgbView::interleaved(&data, w, h);
            let fv = AxisFilter::bicubic(h, out_h);
            let fh = AxisFilter::bicubic(w, out_w);
            let mut v_ref = vec![0u8; out_h * w * 3];
            super::super::vertical_with(
                src,
                0,
                &fv,
                0..out_h,
                &mut v_ref,
                super::super::mac_rows_generic,
            );
            let mut h_ref = vec![0u8; h * out_w * 3];
            super::super::horizontal_with(
                src,
                0,
                &fh,
                0..out_w,
                &mut h_ref,
                super::super::mac_columns_generic,
            );
            let mut v = vec![0u8; v_ref.len()];
            let mut hz = vec![0u8; h_ref.len()];
            if avx2 {
                // SAFETY: AVX2 support was just checked.
                unsafe {
                    vertical_avx2(src, 0, &fv, 0..out_h, &mut v);
                    horizontal_avx2(src, 0, &fh, 0..out_w, &mut hz);
                }
                assert_eq!(v, v_ref, "AVX2 vertical {w}x{h}");
                assert_eq!(hz, h_ref, "AVX2 horizontal {w}x{h}");
            }
            if avx512 {
                // SAFETY: AVX-512F support was just checked.
                unsafe {
                    vertical_avx512(src, 0, &fv, 0..out_h, &mut v);
                    horizontal_avx512(src, 0, &fh, 0..out_w, &mut hz);
                }
                assert_eq!(v, v_ref, "AVX-512 vertical {w}x{h}");
                assert_eq!(hz, h_ref, "AVX-512 horizontal {w}x{h}");
            }
        }
    }
}
