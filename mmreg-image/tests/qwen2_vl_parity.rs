//! Bit-exact parity of the Qwen2-VL processor with transformers' `Qwen2VLImageProcessorPil`.
//!
//! `fixtures/qwen2-vl-image/` (written by `scripts/make_qwen2_vl_image_goldens.py`) records HF's
//! outputs: SHA-256 of the `float32` pixel values and the grid of every fixture image under two
//! pixel bounds, of three videos (4, 3 and 1 frames; PIL's resize per frame, then HF's video
//! processor's normalization and layout), how each test config resolves, and `smart_resize` over a
//! sweep of sizes, refusals included.

mod common;

use std::collections::BTreeMap;

use common::{fixtures, pass_order, read_json, sha256_hex};
use image::DynamicImage;
use mmreg_image::{
    smart_resize, ImageError, PreprocessorConfig, Qwen2VlImageProcessor, QwenPatches,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Goldens {
    transformers: String,
    pillow: String,
    pixel_settings: Vec<Setting>,
    configs: Vec<ConfigCase>,
    images: Vec<ImageCase>,
    videos: Vec<VideoCase>,
}

#[derive(Deserialize)]
struct Setting {
    name: String,
    min_pixels: usize,
    max_pixels: usize,
}

/// A config and what HF resolved it to (preprocessing a 30x40 image), or HF's error.
#[derive(Deserialize)]
struct ConfigCase {
    config: serde_json::Value,
    error: Option<String>,
    min_pixels: Option<usize>,
    max_pixels: Option<usize>,
    patch_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    merge_size: Option<usize>,
    grid_thw_30x40: Option<[usize; 3]>,
    row_len: Option<usize>,
}

#[derive(Deserialize)]
struct Expected {
    shape: [usize; 2],
    grid_thw: [usize; 3],
    sha256: String,
    samples: Vec<(usize, f32)>,
}

#[derive(Deserialize)]
struct ImageCase {
    image: String,
    pil_mode: String,
    size_hw: [usize; 2],
    /// One output per pixel setting, keyed by its name.
    #[serde(flatten)]
    outputs: BTreeMap<String, Expected>,
}

#[derive(Deserialize)]
struct VideoCase {
    setting: String,
    min_pixels: usize,
    max_pixels: usize,
    frames: Vec<String>,
    #[serde(flatten)]
    out: Expected,
    torchvision_video_processor: Torchvision,
}

/// HF's torchvision `Qwen2VLVideoProcessor` on the same frames.
#[derive(Deserialize)]
struct Torchvision {
    grid_thw: [usize; 3],
    sha256: String,
}

#[derive(Deserialize)]
struct Sweep {
    sides: Vec<usize>,
    extra_pairs: Vec<usize>,
    refusals: Vec<(usize, usize, String)>,
    settings: Vec<SweepSetting>,
}

#[derive(Deserialize)]
struct SweepSetting {
    min_pixels: usize,
    max_pixels: usize,
    patch_size: usize,
    merge_size: usize,
    /// Flat `(height, width) / factor` per pair; `0, 0` where HF refuses.
    units: Vec<usize>,
}

fn processor(json: &str, pillow: &str) -> Qwen2VlImageProcessor {
    let config = PreprocessorConfig::from_json_str(json).expect("a valid config");
    Qwen2VlImageProcessor::new(&config)
        .expect("a valid Qwen2-VL config")
        .with_pass_order(pass_order(pillow))
}

fn bounds(min_pixels: usize, max_pixels: usize) -> String {
    format!(r#"{{"min_pixels": {min_pixels}, "max_pixels": {max_pixels}}}"#)
}

fn open(relative: &str) -> DynamicImage {
    let path = fixtures().join(relative);
    image::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Compares one output with its golden; names the first recorded sample that differs.
fn check(what: &str, got: &QwenPatches, expected: &Expected, patch: usize) -> Option<String> {
    if (got.shape, got.grid_thw) != (expected.shape, expected.grid_thw) {
        return Some(format!(
            "{what}: shape {:?} grid {:?}, HF {:?} grid {:?}",
            got.shape, got.grid_thw, expected.shape, expected.grid_thw
        ));
    }
    let hash = sha256_hex(&got.data);
    if hash == expected.sha256 {
        return None;
    }
    let first_bad = expected
        .samples
        .iter()
        .find(|&&(i, v)| got.data.get(i).map(|g| g.to_bits()) != Some(v.to_bits()));
    let detail = match first_bad {
        Some(&(i, want)) => {
            let (row, col) = (i / got.shape[1], i % got.shape[1]);
            let (c, rest) = (col / (got.shape[1] / 3), col % (got.shape[1] / 3));
            let (t, y, x) = (rest / (patch * patch), rest / patch % patch, rest % patch);
            format!(
                "first differing sample {i} (row {row}, channel {c}, frame {t}, y {y}, x {x}) = {:e}, HF {want:e}",
                got.data[i]
            )
        }
        None => format!("all {} recorded samples match", expected.samples.len()),
    };
    Some(format!(
        "{what}: sha256 {hash} != HF {}; {detail}",
        expected.sha256
    ))
}

#[test]
fn images_match_hf_pil_backend() {
    let goldens: Goldens = read_json("qwen2-vl-image/goldens.json");
    let mut failures = Vec::new();
    let mut outputs = 0;
    for setting in &goldens.pixel_settings {
        let p = processor(
            &bounds(setting.min_pixels, setting.max_pixels),
            &goldens.pillow,
        );
        for case in &goldens.images {
            let name = format!(
                "{} ({}, {}x{}) {}",
                case.image, case.pil_mode, case.size_hw[0], case.size_hw[1], setting.name
            );
            let expected = &case.outputs[&setting.name];
            outputs += 1;
            let grid = p.grid(case.size_hw[0], case.size_hw[1]);
            if grid.as_ref().ok() != Some(&expected.grid_thw) {
                failures.push(format!(
                    "{name}: grid() {grid:?}, HF {:?}",
                    expected.grid_thw
                ));
            }
            match p.preprocess(&open(&case.image)) {
                Ok(out) => failures.extend(check(&name, &out, expected, p.patch_size())),
                Err(e) => failures.push(format!("{name}: {e}")),
            }
        }
    }
    assert!(outputs >= 54, "only {outputs} image outputs in the goldens");
    assert!(
        failures.is_empty(),
        "{} of {outputs} outputs differ from transformers {} / Pillow {}:\n  {}",
        failures.len(),
        goldens.transformers,
        goldens.pillow,
        failures.join("\n  ")
    );
}

#[test]
fn videos_match_hf_layout_and_grid() {
    let goldens: Goldens = read_json("qwen2-vl-image/goldens.json");
    let mut counts = Vec::new();
    for case in &goldens.videos {
        let p = processor(&bounds(case.min_pixels, case.max_pixels), &goldens.pillow);
        let frames: Vec<DynamicImage> = case.frames.iter().map(|f| open(f)).collect();
        let name = format!("{} frames, {}", frames.len(), case.setting);
        let out = p
            .preprocess_video(&frames)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (w, h) = (frames[0].width() as usize, frames[0].height() as usize);
        assert_eq!(
            p.video_grid(frames.len(), h, w).unwrap(),
            out.grid_thw,
            "{name}"
        );
        // HF's video processor: torch's 8-bit antialiased bicubic per frame, then its fused
        // rescale+normalize and patchify, bit for bit.
        let hf = &case.torchvision_video_processor;
        assert_eq!(hf.grid_thw, out.grid_thw, "{name}");
        assert_eq!(case.out.shape, out.shape, "{name}");
        assert_eq!(
            sha256_hex(&out.data),
            hf.sha256,
            "{name}: pixel values differ from HF's video processor"
        );
        counts.push(frames.len());
    }
    for n in [4, 3, 1] {
        assert!(counts.contains(&n), "no video golden with {n} frames");
    }
}

#[test]
fn configs_resolve_as_hf() {
    let goldens: Goldens = read_json("qwen2-vl-image/goldens.json");
    let image = DynamicImage::ImageRgb8(image::RgbImage::from_pixel(40, 30, image::Rgb([128; 3])));
    for case in &goldens.configs {
        let json = case.config.to_string();
        let outcome = PreprocessorConfig::from_json_str(&json)
            .and_then(|config| Qwen2VlImageProcessor::new(&config))
            .and_then(|p| p.preprocess(&image).map(|out| (p, out)));
        match (&case.error, outcome) {
            (Some(_), Err(_)) => {}
            (Some(hf), Ok((_, out))) => {
                panic!(
                    "{json}: HF refuses ({hf}) but Rust gives {:?}",
                    out.grid_thw
                )
            }
            (None, Err(e)) => panic!("{json}: HF accepts it but Rust refuses: {e}"),
            (None, Ok((p, out))) => {
                let got = [
                    p.min_pixels(),
                    p.max_pixels(),
                    p.patch_size(),
                    p.temporal_patch_size(),
                    p.merge_size(),
                ];
                let hf = [
                    case.min_pixels,
                    case.max_pixels,
                    case.patch_size,
                    case.temporal_patch_size,
                    case.merge_size,
                ];
                assert_eq!(hf, got.map(Some), "{json}");
                assert_eq!(Some(out.grid_thw), case.grid_thw_30x40, "{json}");
                assert_eq!(Some(out.shape[1]), case.row_len, "{json}");
            }
        }
    }
}

/// Every `(height, width)` of the sweep, in the goldens' order.
fn sweep_pairs(sweep: &Sweep) -> Vec<(usize, usize)> {
    let grid = sweep
        .sides
        .iter()
        .flat_map(|&h| sweep.sides.iter().map(move |&w| (h, w)));
    grid.chain(sweep.extra_pairs.chunks_exact(2).map(|p| (p[0], p[1])))
        .collect()
}

#[test]
fn smart_resize_matches_hf_on_the_sweep() {
    let sweep: Sweep = read_json("qwen2-vl-image/smart-resize.json");
    let pairs = sweep_pairs(&sweep);
    assert!(pairs.len() >= 5000, "only {} pairs", pairs.len());
    let refusals: BTreeMap<(usize, usize), &str> = sweep
        .refusals
        .iter()
        .map(|(h, w, msg)| ((*h, *w), msg.as_str()))
        .collect();
    assert!(refusals.len() > 100, "too few refusals in the sweep");
    let mut failures = Vec::new();
    for s in &sweep.settings {
        let factor = s.patch_size * s.merge_size;
        for (&(h, w), units) in pairs.iter().zip(s.units.chunks_exact(2)) {
            let got = smart_resize(h, w, factor, s.min_pixels, s.max_pixels);
            let ok = match (got, units) {
                (Err(ImageError::AspectRatio { .. }), [0, 0]) => {
                    let message = got_message(h, w, factor, s);
                    refusals
                        .get(&(h, w))
                        .is_some_and(|hf| message.ends_with(hf))
                }
                (Ok((rh, rw)), &[uh, uw]) => (rh, rw) == (uh * factor, uw * factor),
                _ => false,
            };
            if !ok {
                failures.push(format!(
                    "{h}x{w} (min {}, max {}, factor {factor}): Rust {:?} / {}, HF {units:?} units / {:?}",
                    s.min_pixels,
                    s.max_pixels,
                    smart_resize(h, w, factor, s.min_pixels, s.max_pixels),
                    got_message(h, w, factor, s),
                    refusals.get(&(h, w))
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} results differ:\n  {}",
        failures.len(),
        pairs.len() * sweep.settings.len(),
        failures
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n  ")
    );
}

fn got_message(h: usize, w: usize, factor: usize, s: &SweepSetting) -> String {
    smart_resize(h, w, factor, s.min_pixels, s.max_pixels)
        .err()
        .map_or_else(String::new, |e| e.to_string())
}

#[test]
fn max_grid_bounds_the_sweep() {
    let sweep: Sweep = read_json("qwen2-vl-image/smart-resize.json");
    for s in &sweep.settings {
        let json = format!(
            r#"{{"min_pixels": {}, "max_pixels": {}, "patch_size": {}, "merge_size": {}}}"#,
            s.min_pixels, s.max_pixels, s.patch_size, s.merge_size
        );
        let p = processor(&json, "13");
        let [_, mh, mw] = p.max_grid();
        let per_unit = s.merge_size * s.merge_size;
        let most = s
            .units
            .chunks_exact(2)
            .map(|u| u[0] * u[1] * per_unit)
            .max()
            .unwrap_or(0);
        assert!(
            most <= mh * mw,
            "{json}: HF gives {most} patches, max_grid {:?}",
            p.max_grid()
        );
    }
}

/// HF's actual video processor (transformers 5.17 has only the torchvision one), as
/// `scripts/make_qwen2_vl_fixtures.py` recorded it (fixtures/qwen2-vl-processor/pixels.json): 4 frames,
/// 3 frames (padded with the last) and 1 frame that need no resize, and 2 frames that do, bit for bit.
#[test]
fn videos_equal_hf_video_processor() {
    let pixels: serde_json::Value = read_json("qwen2-vl-processor/pixels.json");
    let settings = &pixels["settings"];
    let p = processor(
        &bounds(
            settings["min_pixels"].as_u64().expect("min") as usize,
            settings["max_pixels"].as_u64().expect("max") as usize,
        ),
        "13.0.0",
    );
    let mut checked = 0;
    for (name, video) in pixels["videos"].as_object().expect("videos") {
        let frames: Vec<DynamicImage> = video["frames"]
            .as_array()
            .expect("frames")
            .iter()
            .map(|f| open(&format!("qwen2-vl-processor/{}", f.as_str().expect("name"))))
            .collect();
        let out = p.preprocess_video(&frames).expect("preprocesses");
        let grid: Vec<usize> = video["video_grid_thw"]
            .as_array()
            .expect("grid")
            .iter()
            .map(|d| d.as_u64().expect("int") as usize)
            .collect();
        assert_eq!(out.grid_thw.to_vec(), grid, "{name}");
        assert_eq!(
            sha256_hex(&out.data),
            video["sha256_f32le"].as_str().expect("sha256"),
            "{name}: pixel values differ from HF's video processor"
        );
        checked += 1;
    }
    assert_eq!(
        checked, 4,
        "the 4-, 3- and 1-frame videos and the resized one"
    );
}
