//! Entry points shared by the fuzz targets (`fuzz/`) and the regression test that replays the cases they
//! found (`tests/fuzz_regressions.rs`). Each must return normally for any input: errors are fine, panics,
//! hangs and huge allocations are not.

use std::path::Path;

use image::DynamicImage;

use crate::{
    select_best_resolution, ClipImageProcessor, LlavaNextImageProcessor, PreprocessorConfig,
    DEFAULT_GRID_PINPOINTS,
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
