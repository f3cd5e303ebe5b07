//! torch's antialiased bicubic resize of 8-bit images (`F.resize(uint8, antialias=True)`), which
//! transformers' torchvision-only processors use (Qwen2-VL's video processor). It takes Pillow's
//! filter and taps, but quantises each pass's weights to 16 bits at a precision chosen from the pass's
//! largest weight, where Pillow always uses 22 bits: the two differ by up to one 8-bit level. Width
//! first, then height, each pass only where its size changes.

use crate::resize::bicubic;

/// One axis's taps: each output's first input and its int16 weights, and their fraction bits.
struct Taps {
    starts: Vec<usize>,
    weights: Vec<Vec<i32>>,
    precision: u32,
}

fn taps(in_size: usize, out_size: usize) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let inv = 1.0 / filterscale;
    let mut starts = Vec::with_capacity(out_size);
    let mut float = Vec::with_capacity(out_size);
    for i in 0..out_size {
        let center = scale * (i as f64 + 0.5);
        let min = ((center - support + 0.5) as i64).max(0) as usize;
        let max = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let raw: Vec<f64> = (min..max)
            .map(|j| bicubic((j as f64 - center + 0.5) * inv))
            .collect();
        let sum: f64 = raw.iter().sum();
        let divisor = if sum != 0.0 { sum } else { 1.0 };
        starts.push(min);
        float.push(raw.iter().map(|w| w / divisor).collect::<Vec<_>>());
    }
    // The most fraction bits (up to 22) with which the largest weight still fits an int16.
    let largest = float.iter().flatten().copied().fold(f64::MIN, f64::max);
    let precision = (0..22)
        .find(|&p| (0.5 + largest * f64::from(1u32 << (p + 1))) as i64 >= 1 << 15)
        .unwrap_or(22);
    let weights = float
        .iter()
        .map(|row| {
            row.iter()
                .map(|w| {
                    let v = w * f64::from(1u32 << precision);
                    if v < 0.0 {
                        (v - 0.5) as i32
                    } else {
                        (v + 0.5) as i32
                    }
                })
                .collect()
        })
        .collect();
    Taps {
        starts,
        weights,
        precision,
    }
}

/// One pass over `planes` (`channels` planes of `rows × cols`, row-major) along columns (`along_rows`
/// false: each row resampled from `cols` to `out`) or rows.
fn pass(
    planes: &[u8],
    channels: usize,
    (rows, cols): (usize, usize),
    out: usize,
    along_rows: bool,
) -> Vec<u8> {
    let (in_len, other) = if along_rows {
        (rows, cols)
    } else {
        (cols, rows)
    };
    let t = taps(in_len, out);
    let (out_rows, out_cols) = if along_rows { (out, cols) } else { (rows, out) };
    let mut result = vec![0u8; channels * out_rows * out_cols];
    let round = 1i64 << t.precision.saturating_sub(1);
    for c in 0..channels {
        let src = &planes[c * rows * cols..(c + 1) * rows * cols];
        let dst = &mut result[c * out_rows * out_cols..(c + 1) * out_rows * out_cols];
        for o in 0..out {
            let (start, weights) = (t.starts[o], &t.weights[o]);
            for k in 0..other {
                let mut acc = round;
                for (j, &w) in weights.iter().enumerate() {
                    let sample = if along_rows {
                        src[(start + j) * cols + k]
                    } else {
                        src[k * cols + start + j]
                    };
                    acc += i64::from(w) * i64::from(sample);
                }
                let value = (acc >> t.precision).clamp(0, 255) as u8;
                if along_rows {
                    dst[o * out_cols + k] = value;
                } else {
                    dst[k * out_cols + o] = value;
                }
            }
        }
    }
    result
}

/// `channels` planes of `height × width` resized to `out_h × out_w`, as torch resizes a uint8 tensor.
pub(crate) fn resize_planes(
    planes: &[u8],
    channels: usize,
    (height, width): (usize, usize),
    (out_h, out_w): (usize, usize),
) -> Vec<u8> {
    let mut current = planes.to_vec();
    if width != out_w {
        current = pass(&current, channels, (height, width), out_w, false);
    }
    if height != out_h {
        current = pass(&current, channels, (height, out_w), out_h, true);
    }
    current
}
