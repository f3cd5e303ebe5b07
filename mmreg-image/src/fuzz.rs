//! Entry points shared by the fuzz targets (`fuzz/`) and the regression test that replays the cases they
//! found (`tests/fuzz_regressions.rs`). Each must return normally for any input: errors are fine, panics,
//! hangs and huge allocations are not.

use std::path::Path;

use image::DynamicImage;

use crate::{
    select_best_resolution, smart_resize, ClipImageProcessor, Gemma3ImageProcessor,
    Idefics3ImageProcessor, LlavaNextImageProcessor, PreprocessorConfig, Qwen2VlImageProcessor,
    SiglipImageProcessor, DEFAULT_GRID_PINPOINTS,
};

/// Keeps each run fast: images are bounded far below the production limit.
const MAX_FUZZ_PIXELS: u64 = 1 << 20;

fn llava15() -> PreprocessorConfig {
    PreprocessorConfig::from_json_str(
        r#"{"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}, "resample": 3}"#,
    )
    .expect("a valid config")
}

/// Arbitrary bytes as an image file, through the size-limited decoder and both processors.
pub fn decode_and_preprocess(bytes: &[u8]) {
    let Ok(image) = crate::decode(bytes, MAX_FUZZ_PIXELS) else {
        return;
    };
    preprocess_both(&llava15(), &image);
}

/// Arbitrary bytes as preprocessor_config.json, then both processors on a small image.
pub fn config_then_preprocess(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let Ok(config) = PreprocessorConfig::from_json_str(text) else {
        return;
    };
    let image = DynamicImage::ImageRgb8(image::RgbImage::from_fn(23, 17, |x, y| {
        image::Rgb([x as u8 * 9, y as u8 * 13, 77])
    }));
    preprocess_both(&config, &image);
}

fn preprocess_both(config: &PreprocessorConfig, image: &DynamicImage) {
    preprocess_clip_and_next(config, image);
    preprocess_siglip_family(config, image);
}

/// SigLIP (PaliGemma), Gemma 3 (with its pan-and-scan crops) and Idefics3 / SmolVLM (tiles), each
/// skipped where the config would make its output enormous.
fn preprocess_siglip_family(config: &PreprocessorConfig, image: &DynamicImage) {
    let (height, width) = (image.height() as usize, image.width() as usize);
    let small = |frames: usize, (h, w): (usize, usize)| {
        (frames as u64)
            .saturating_mul(h as u64)
            .saturating_mul(w as u64)
            <= MAX_FUZZ_PIXELS
    };
    if let Ok(siglip) = SiglipImageProcessor::new(config) {
        if small(1, siglip.output_size(height, width)) {
            let _ = siglip.preprocess(image);
        }
    }
    if let Ok(gemma3) = Gemma3ImageProcessor::new(config) {
        let crops = gemma3.crops(width, height);
        assert!(
            crops.iter().all(|c| c.width > 0
                && c.height > 0
                && c.x + c.width <= width
                && c.y + c.height <= height),
            "a pan-and-scan crop outside the {width}x{height} image: {crops:?}"
        );
        if small(1 + crops.len(), gemma3.output_size(height, width)) {
            let _ = gemma3.preprocess(image);
        }
    }
    if let Ok(idefics3) = Idefics3ImageProcessor::new(config) {
        if let Ok(grid) = idefics3.grid(height, width) {
            if small(grid.frames(), (grid.tile, grid.tile)) && small(1, grid.resized) {
                let _ = idefics3.preprocess(image);
            }
        }
    }
}

fn preprocess_clip_and_next(config: &PreprocessorConfig, image: &DynamicImage) {
    if let Ok(clip) = ClipImageProcessor::new(config) {
        // Refuse configs that would make the output itself enormous.
        let (h, w) = clip.output_size(image.height() as usize, image.width() as usize);
        if (h as u64).saturating_mul(w as u64) <= MAX_FUZZ_PIXELS {
            let _ = clip.preprocess(image);
        }
    }
    if let Ok(next) = LlavaNextImageProcessor::new(config) {
        let canvas: u64 = next
            .grid_pinpoints()
            .iter()
            .map(|&(h, w)| (h as u64).saturating_mul(w as u64))
            .max()
            .unwrap_or(0);
        let (h, w) = next.base_size();
        let base = (h as u64).saturating_mul(w as u64);
        if canvas <= 4 * MAX_FUZZ_PIXELS && base <= MAX_FUZZ_PIXELS {
            let _ = next.preprocess(image);
        }
    }
}

/// Arbitrary image sizes and pinpoints through the anyres grid selection.
pub fn best_resolution(bytes: &[u8]) {
    let numbers: Vec<usize> = bytes
        .chunks(2)
        .map(|c| c.iter().fold(0usize, |n, &b| n << 8 | b as usize))
        .collect();
    let [h, w, rest @ ..] = numbers.as_slice() else {
        return;
    };
    let pinpoints: Vec<(usize, usize)> = rest.chunks_exact(2).map(|p| (p[0], p[1])).collect();
    let defaults: Vec<(usize, usize)> = DEFAULT_GRID_PINPOINTS
        .iter()
        .map(|&[a, b]| (a, b))
        .collect();
    let _ = select_best_resolution((*h, *w), &pinpoints);
    let _ = select_best_resolution((*h, *w), &defaults);
}

/// Arbitrary bytes as an image file, through the Qwen2-VL processor as an image (default and small
/// pixel bounds) and as a three-frame video.
pub fn qwen2_vl_decode_and_preprocess(bytes: &[u8]) {
    let Ok(image) = crate::decode(bytes, MAX_FUZZ_PIXELS) else {
        return;
    };
    let processor = |json: &str| {
        let config = PreprocessorConfig::from_json_str(json).expect("a valid config");
        Qwen2VlImageProcessor::new(&config).expect("a valid Qwen2-VL config")
    };
    // Default bounds: at most about 2^20 pixels out, like the input.
    let _ = processor("{}").preprocess(&image);
    let small = processor(r#"{"min_pixels": 3136, "max_pixels": 50176}"#);
    let _ = small.preprocess(&image);
    let _ = small.preprocess_video(&[image.clone(), image.clone(), image]);
}

/// Arbitrary numbers as image sizes and Qwen2-VL settings, through `smart_resize`, the grids and
/// the search for the largest grid.
pub fn qwen2_vl_sizes(bytes: &[u8]) {
    let numbers: Vec<usize> = bytes
        .chunks(4)
        .map(|c| c.iter().fold(0usize, |n, &b| n << 8 | b as usize))
        .collect();
    let [h, w, lo, hi, patch, merge, frames, ..] = numbers[..] else {
        return;
    };
    let _ = smart_resize(h, w, patch, lo, hi);
    let json = format!(
        r#"{{"min_pixels": {lo}, "max_pixels": {hi}, "patch_size": {patch}, "merge_size": {merge}}}"#
    );
    let Ok(processor) = PreprocessorConfig::from_json_str(&json)
        .and_then(|config| Qwen2VlImageProcessor::new(&config))
    else {
        return;
    };
    let _ = processor.grid(h, w);
    let _ = processor.video_grid(frames, h, w);
    // The search is O(sqrt(max_pixels) / factor) plus a band of small inputs (up to factor / 2
    // wide): keep each run short.
    let f = processor.factor();
    if f <= 64 && hi / (f * f) <= 1 << 14 && lo / (f * f) <= 1 << 14 {
        let grid = processor.max_grid();
        let (h, w) = processor.largest_size();
        assert_eq!(processor.grid(h, w).ok(), Some(grid), "{json}");
    }
}

/// Runs every file in `dir` (a `fuzz/regressions/<target>/` folder, absent while it would be empty)
/// through `run` and returns how many there were, so that a test can insist on some. Shared by the
/// regression tests of every crate with fuzz targets.
pub fn replay(dir: &Path, run: impl Fn(&[u8])) -> usize {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
        Err(e) => panic!("{}: {e}", dir.display()),
    };
    let mut paths: Vec<_> = entries
        .map(|entry| entry.expect("a readable directory entry").path())
        .collect();
    paths.sort();
    for path in &paths {
        // Shown with the test's output if `run` panics.
        eprintln!("replaying {}", path.display());
        run(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
    }
    paths.len()
}
