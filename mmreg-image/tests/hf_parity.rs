//! Bit-exact parity with Hugging Face's PIL image processors.
//!
//! `fixtures/image-goldens.json` (written by `scripts/make_image_goldens.py`) records, for every
//! image in `fixtures/images/`, the SHA-256 of HF's `float32` output bytes plus a few sampled
//! values. This test runs the Rust processors on the same PNGs and compares hashes; on a mismatch
//! it reports the image, the processor and the first recorded sample that differs.

mod common;

use common::{fixtures, pass_order, read_json, sha256_hex};
use image::DynamicImage;
use mmreg_image::{ClipImageProcessor, LlavaNextImageProcessor};
use serde::Deserialize;

#[derive(Deserialize)]
struct Goldens {
    transformers: String,
    pillow: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    image: String,
    pil_mode: String,
    size_hw: [usize; 2],
    clip: Expected,
    llava_next: ExpectedNext,
}

#[derive(Deserialize)]
struct Expected {
    shape: Vec<usize>,
    sha256: String,
    /// `f64` sum of each `[tile, channel]` plane.
    plane_sums: Vec<f64>,
    samples: Vec<(usize, f32)>,
}

#[derive(Deserialize)]
struct ExpectedNext {
    #[serde(flatten)]
    out: Expected,
    image_size: [usize; 2],
    num_patches: usize,
}

fn load_goldens() -> Goldens {
    read_json("image-goldens.json")
}

/// Compares one output with its golden; returns a human-readable problem on mismatch.
fn check(what: &str, shape: &[usize], values: &[f32], expected: &Expected) -> Option<String> {
    if shape != expected.shape.as_slice() {
        return Some(format!("{what}: shape {shape:?}, HF {:?}", expected.shape));
    }
    let got = sha256_hex(values);
    if got == expected.sha256 {
        return None;
    }
    let plane = shape[shape.len() - 2..].iter().product::<usize>();
    let width = shape[shape.len() - 1];
    // Which plane differs: sums are accumulated in another order than numpy's, hence the
    // tolerance; one pixel off by a single level moves a sum by about 0.015.
    let mut planes = values.chunks(plane).zip(&expected.plane_sums).enumerate();
    let bad_plane = planes.find_map(|(p, (vals, &want))| {
        let sum: f64 = vals.iter().map(|&v| f64::from(v)).sum();
        let differs = (sum - want).abs() > 1e-6 * want.abs().max(1.0);
        differs.then(|| {
            format!(
                "plane (tile {}, channel {}) sums to {sum}, HF {want}",
                p / 3,
                p % 3
            )
        })
    });
    let first_bad = expected
        .samples
        .iter()
        .find(|&&(i, v)| values.get(i).map(|g| g.to_bits()) != Some(v.to_bits()));
    let sample = match first_bad {
        Some(&(i, want)) => {
            let got_v = values.get(i).copied().unwrap_or(f32::NAN);
            let (p, rem) = (i / plane, i % plane);
            let (tile, channel, y, x) = (p / 3, p % 3, rem / width, rem % width);
            format!(
                "first differing recorded sample: index {i} (tile {tile}, channel {channel}, y {y}, x {x}) \
                 = {got_v:e}, HF {want:e}"
            )
        }
        None => format!("all {} recorded samples match", expected.samples.len()),
    };
    let detail = bad_plane.map_or(sample.clone(), |plane| format!("{plane}; {sample}"));
    Some(format!(
        "{what}: sha256 {got} != HF {}; {detail}",
        expected.sha256
    ))
}

#[test]
fn matches_hf_pil_backend() {
    let goldens = load_goldens();
    let order = pass_order(&goldens.pillow);
    let root = fixtures();
    let clip =
        ClipImageProcessor::from_file(root.join("configs/llava-1.5/preprocessor_config.json"))
            .expect("llava-1.5 config")
            .with_pass_order(order);
    let next = LlavaNextImageProcessor::from_file(
        root.join("configs/llava-v1.6/preprocessor_config.json"),
    )
    .expect("llava-v1.6 config")
    .with_pass_order(order);

    let mut failures = Vec::new();
    for case in &goldens.cases {
        let name = format!(
            "{} ({}, {}x{})",
            case.image, case.pil_mode, case.size_hw[0], case.size_hw[1]
        );
        let image: DynamicImage = match image::open(root.join(&case.image)) {
            Ok(image) => image,
            Err(e) => {
                failures.push(format!("{name}: cannot decode: {e}"));
                continue;
            }
        };
        match clip.preprocess(&image) {
            Ok(out) => failures.extend(check(
                &format!("{name} clip"),
                &out.shape[1..],
                &out.data,
                &case.clip,
            )),
            Err(e) => failures.push(format!("{name} clip: {e}")),
        }
        match next.preprocess(&image) {
            Ok(out) => {
                let what = format!("{name} llava_next");
                let px = &out.pixel_values;
                failures.extend(check(&what, &px.shape, &px.data, &case.llava_next.out));
                let hf_size = (case.llava_next.image_size[0], case.llava_next.image_size[1]);
                if out.image_size != hf_size {
                    failures.push(format!(
                        "{what}: image_size {:?}, HF {hf_size:?}",
                        out.image_size
                    ));
                }
                let predicted = next.num_patches(out.image_size.0, out.image_size.1);
                if predicted != case.llava_next.num_patches {
                    failures.push(format!(
                        "{what}: num_patches() {predicted}, HF {}",
                        case.llava_next.num_patches
                    ));
                }
            }
            Err(e) => failures.push(format!("{name} llava_next: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} outputs differ from transformers {} / Pillow {} ({order:?}):\n  {}",
        failures.len(),
        2 * goldens.cases.len(),
        goldens.transformers,
        goldens.pillow,
        failures.join("\n  ")
    );
}

#[test]
fn goldens_cover_the_interesting_cases() {
    let goldens = load_goldens();
    let modes: Vec<&str> = goldens.cases.iter().map(|c| c.pil_mode.as_str()).collect();
    for mode in ["RGB", "L", "LA", "RGBA", "P", "I;16", "1"] {
        assert!(modes.contains(&mode), "no golden with PIL mode {mode}");
    }
    // At least one image that Pillow 13 resizes vertically first (h > 2w with w > 336).
    assert!(goldens
        .cases
        .iter()
        .any(|c| c.size_hw[0] > 2 * c.size_hw[1] && c.size_hw[1] > 336));
}
