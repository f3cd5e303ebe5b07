use image::{Rgb, RgbImage};

use super::*;

fn processor(json: &str) -> Qwen2VlImageProcessor {
    Qwen2VlImageProcessor::new(&PreprocessorConfig::from_json_str(json).unwrap()).unwrap()
}

fn config_error(json: &str) -> String {
    let config = PreprocessorConfig::from_json_str(json).unwrap();
    Qwen2VlImageProcessor::new(&config).unwrap_err().to_string()
}

#[test]
fn smart_resize_examples() {
    let default = |h, w| smart_resize(h, w, 28, 56 * 56, 28 * 28 * 1280).unwrap();
    // Tiny images are scaled up to min_pixels (ceiling branch).
    assert_eq!(default(1, 1), (56, 56));
    assert_eq!(default(5, 7), (56, 84));
    assert_eq!(default(1, 200), (28, 812));
    // Python rounds halves to even: 42 / 28 = 1.5 -> 2, 70 / 28 = 2.5 -> 2, 98 / 28 = 3.5 -> 4.
    assert_eq!(default(42, 70), (56, 56));
    assert_eq!(default(98, 98), (112, 112));
    assert_eq!(default(896, 1120), (896, 1120));
    // Too large: both sides scaled by the same beta and floored.
    assert_eq!(default(2000, 2000), (980, 980));
    // Ratio exactly 200 passes, anything above is refused with HF's message.
    let err = smart_resize(1, 201, 28, 3136, 1003520)
        .unwrap_err()
        .to_string();
    assert!(
        err.ends_with("absolute aspect ratio must be smaller than 200, got 201.0"),
        "{err}"
    );
    assert!(err.starts_with("image is 201x1"), "{err}");
    let err = smart_resize(401, 2, 28, 3136, 1003520)
        .unwrap_err()
        .to_string();
    assert!(err.ends_with("got 200.5"), "{err}");
    assert!(matches!(
        smart_resize(0, 5, 28, 1, 2),
        Err(ImageError::EmptyImage { .. })
    ));
}

#[test]
fn config_keys_and_defaults() {
    let p = processor("{}");
    assert_eq!((p.min_pixels(), p.max_pixels()), (3136, 1003520));
    assert_eq!(
        (p.patch_size(), p.temporal_patch_size(), p.merge_size()),
        (14, 2, 2)
    );
    assert_eq!((p.factor(), p.max_frames(), p.fps()), (28, 768, 24.0));
    let hub = processor(r#"{"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14}"#);
    assert_eq!(hub.max_pixels(), 12845056);
    let v5 =
        processor(r#"{"size": {"shortest_edge": 100, "longest_edge": 5000}, "max_pixels": 6000}"#);
    assert_eq!((v5.min_pixels(), v5.max_pixels()), (100, 6000));
    // A size dict with the old key names counts only once the top-level keys replace them.
    let old = r#"{"size": {"min_pixels": 1, "max_pixels": 2}, "min_pixels": 10, "max_pixels": 20}"#;
    assert_eq!(processor(old).min_pixels(), 10);
    for (json, needle) in [
        (
            r#"{"size": {"min_pixels": 1, "max_pixels": 2}}"#,
            "shortest_edge",
        ),
        (r#"{"size": {"shortest_edge": 3136}}"#, "longest_edge"),
        (
            r#"{"size": {"shortest_edge": 1, "longest_edge": null}}"#,
            "longest_edge",
        ),
        (
            r#"{"size": {"shortest_edge": 1, "longest_edge": 9, "x": 1}}"#,
            "\"x\"",
        ),
        (r#"{"size": 3136}"#, "size must be"),
        (
            r#"{"min_pixels": 0}"#,
            "min_pixels must be a positive integer",
        ),
        (
            r#"{"max_pixels": -5}"#,
            "max_pixels must be a positive integer",
        ),
        (r#"{"merge_size": 0}"#, "merge_size"),
        (r#"{"patch_size": 4611686018427387904}"#, "too large"),
        (r#"{"resample": 2}"#, "BILINEAR"),
        (r#"{"image_std": [1, 0, 1]}"#, "non-zero"),
    ] {
        let err = config_error(json);
        assert!(err.contains(needle), "{json}: {err}");
    }
}

fn gradient(width: u32, height: u32, seed: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(RgbImage::from_fn(width, height, |x, y| {
        Rgb([
            (x * 7 + seed) as u8,
            (y * 5 + seed * 3) as u8,
            (x * y + seed) as u8,
        ])
    }))
}

#[test]
fn layout_is_hfs_permutation() {
    // No resize, raw values: entry (t, c, y, x) must land where HF's reshape
    // [gt, T, C, gh/m, m, p, gw/m, m, p] -> permute (0, 3, 6, 4, 7, 2, 1, 5, 8) puts it.
    let p = processor(
        r#"{"patch_size": 2, "merge_size": 2, "temporal_patch_size": 2, "do_resize": false,
            "do_rescale": false, "do_normalize": false}"#,
    );
    let (h, w) = (8usize, 4usize);
    // Distinct for 2 frames x 3 channels x 32 pixels.
    let value = |t: usize, c: usize, y: usize, x: usize| (t * 96 + c * 32 + y * 4 + x) as u8;
    let frames: Vec<DynamicImage> = (0..2)
        .map(|t| {
            DynamicImage::ImageRgb8(RgbImage::from_fn(w as u32, h as u32, |x, y| {
                Rgb([0, 1, 2].map(|c| value(t, c, y as usize, x as usize)))
            }))
        })
        .collect();
    let out = p.preprocess_video(&frames).unwrap();
    assert_eq!(out.grid_thw, [1, 4, 2]);
    assert_eq!(out.shape, [8, 24]);
    // Mixed-radix decomposition of the flat output index over the permuted shape.
    let dims = [1, 2, 1, 2, 2, 3, 2, 2, 2]; // gt, gh/m, gw/m, m, m, C, T, p, p
    for (i, &got) in out.data.iter().enumerate() {
        let mut rest = i;
        let mut idx = [0; 9];
        for (slot, &d) in idx.iter_mut().zip(&dims).rev() {
            *slot = rest % d;
            rest /= d;
        }
        let [gt, bh, bw, mh, mw, c, tp, ph, pw] = idx;
        let expect = value(
            gt * 2 + tp,
            c,
            (bh * 2 + mh) * 2 + ph,
            (bw * 2 + mw) * 2 + pw,
        );
        assert_eq!(got, f32::from(expect), "index {i} = {idx:?}");
    }
}

#[test]
fn image_is_a_one_frame_video() {
    let p = processor("{}");
    let img = gradient(97, 61, 3);
    let image = p.preprocess(&img).unwrap();
    assert_eq!(image.grid_thw, [1, 4, 6]);
    assert_eq!(image.shape, [24, 3 * 2 * 14 * 14]);
    // The video path pads one frame to two and resizes with torch's 8-bit bicubic, which differs
    // from PIL's by at most one level (1/255/std after normalize).
    let one = p.preprocess_video(std::slice::from_ref(&img)).unwrap();
    assert_eq!(p.preprocess_video(&[img.clone(), img]).unwrap(), one);
    assert_eq!((one.shape, one.grid_thw), (image.shape, image.grid_thw));
    let worst = max_diff(&one.data, &image.data);
    assert!(worst > 0.0 && worst < 0.016, "{worst}");
    // Without a resize only the fused rescale+normalize differs: a few f32 ulps.
    let exact = gradient(84, 56, 3);
    let (a, b) = (
        p.preprocess(&exact).unwrap(),
        p.preprocess_video(std::slice::from_ref(&exact)).unwrap(),
    );
    let worst = max_diff(&a.data, &b.data);
    assert!(
        worst > 0.0 && worst < 1e-6,
        "the video path should round as HF's fused normalize does: {worst}"
    );
    assert_eq!(p.num_tokens(image.grid_thw), 6);
}

#[test]
fn videos_pad_with_the_last_frame() {
    let p = processor(r#"{"temporal_patch_size": 3}"#);
    assert_eq!(p.padded_frame_count(4), 6);
    assert_eq!(p.video_grid(4, 61, 97).unwrap(), [2, 4, 6]);
    let frames: Vec<_> = (0..4).map(|t| gradient(97, 61, t)).collect();
    let mut padded = frames.clone();
    padded.extend([frames[3].clone(), frames[3].clone()]);
    let out = p.preprocess_video(&frames).unwrap();
    assert_eq!(out.grid_thw, [2, 4, 6]);
    assert_eq!(out, p.preprocess_video(&padded).unwrap());
}

#[test]
fn bad_videos_and_images_are_refused() {
    let p = processor("{}");
    let err = p.preprocess_video(&[]).unwrap_err().to_string();
    assert!(err.contains("at least one frame"), "{err}");
    assert!(p.video_grid(0, 10, 10).is_err());
    let err = p
        .preprocess_video(&[
            gradient(10, 20, 0),
            gradient(10, 20, 1),
            gradient(20, 10, 2),
        ])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("frame 0 (10x20), but frame 2 is 20x10"),
        "{err}"
    );
    let err = p.preprocess(&gradient(1, 300, 0)).unwrap_err().to_string();
    assert!(err.contains("got 300.0"), "{err}");
    let fixed = processor(r#"{"do_resize": false}"#);
    assert!(fixed
        .preprocess(&gradient(40, 30, 0))
        .unwrap_err()
        .to_string()
        .contains("multiples"));
    assert_eq!(
        fixed.preprocess(&gradient(56, 28, 0)).unwrap().grid_thw,
        [1, 2, 4]
    );
}

/// A deterministic stream of numbers for sweeps (64-bit LCG, high bits).
fn lcg(seed: u64) -> impl FnMut(u64) -> usize {
    let mut state = seed;
    move |bound| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) % bound) as usize + 1
    }
}

/// Checks that `max_grid` is reached by `largest_size` and that no input of a sweep exceeds it:
/// all sides up to `n`, the ratio-200 family and random large images.
fn check_max_grid(json: &str, n: usize) -> [usize; 3] {
    let p = processor(json);
    let max = p.max_grid();
    assert_eq!(
        p.grid(p.largest_size().0, p.largest_size().1).unwrap(),
        max,
        "{json}"
    );
    let patches = |g: [usize; 3]| g[1] * g[2];
    let check = |h: usize, w: usize| {
        if let Ok(g) = p.grid(h, w) {
            assert!(
                patches(g) <= patches(max),
                "{json}: {h}x{w} -> {g:?} > {max:?}"
            );
        }
    };
    for h in 1..=n {
        for w in h..=n {
            check(h, w);
        }
    }
    for h in 1..=3000 {
        for w in 200 * h - 3..=200 * h + 1 {
            check(h, w);
        }
    }
    let mut next = lcg(7);
    for _ in 0..20_000 {
        let h = next(100_000);
        let w = next(200 * h as u64).max(h);
        check(h, w);
    }
    max
}

#[test]
fn max_grid_bounds_every_input_and_is_reached() {
    for (json, n, expect) in [
        // 1280 units = 32 x 40 factors: more than the square 35 x 35 a huge square image gives.
        ("{}", 1200, Some([1, 64, 80])),
        // max_pixels of 64 units: ratio 200 overshoots it (1 x 113 units).
        (r#"{"max_pixels": 50176}"#, 400, Some([1, 2, 226])),
        // min == max: the ceiling branch overshoots (1 x 29 units at ratio 200).
        (r#"{"max_pixels": 3136}"#, 300, Some([1, 2, 58])),
        (
            r#"{"min_pixels": 100352, "max_pixels": 602112}"#,
            1000,
            None,
        ),
        (r#"{"min_pixels": 784, "max_pixels": 784}"#, 200, None),
        (r#"{"max_pixels": 165424}"#, 600, None), // 211 units, a prime over 200
        (
            r#"{"min_pixels": 4096, "max_pixels": 262144, "patch_size": 16}"#,
            700,
            None,
        ),
        (
            r#"{"min_pixels": 1, "max_pixels": 100, "patch_size": 1, "merge_size": 1}"#,
            120,
            None,
        ),
        (
            r#"{"min_pixels": 9, "max_pixels": 900, "patch_size": 3, "merge_size": 1}"#,
            200,
            None,
        ),
        // Fixed-size configs, and min above max: the ceiling branch decides.
        (r#"{"min_pixels": 200704, "max_pixels": 200704}"#, 700, None),
        (
            r#"{"min_pixels": 12845056, "max_pixels": 12845056}"#,
            300,
            None,
        ),
        (r#"{"min_pixels": 50176, "max_pixels": 3136}"#, 300, None),
    ] {
        let max = check_max_grid(json, n);
        if let Some(expect) = expect {
            assert_eq!(max, expect, "{json}");
        }
    }
    // Without resizing, images must be multiples; the bound is the largest within max_pixels.
    let fixed = processor(r#"{"do_resize": false, "max_pixels": 50176}"#);
    assert_eq!(fixed.largest_size(), (224, 224));
    assert_eq!(fixed.max_grid(), [1, 16, 16]);
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
