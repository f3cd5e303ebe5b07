//! Bit-exact parity of the Idefics3 / SmolVLM processor with transformers'
//! `Idefics3ImageProcessorPil` and `SmolVLMImageProcessorPil`, and of the prompt text with
//! `Idefics3Processor` / SmolVLM's `get_image_prompt_string`.
//!
//! `fixtures/idefics3-image/goldens.json` (written by `scripts/make_idefics3_image_goldens.py`)
//! records, for every image in `fixtures/images/` and four configs (Idefics3-8B, SmolVLM-256M, no
//! splitting, no first resize with bicubic), the SHA-256 of HF's `float32` pixel values and
//! `int64` pixel mask plus the tile grid; the grid HF picks for 200 sizes under six configs; the
//! prompt strings for several grids; and `image_seq_len` for a few models.

mod common;

use std::collections::BTreeMap;

use common::{fixtures, pass_order, read_json, sha256_hex};
use image::DynamicImage;
use mmreg_image::{
    idefics3_image_prompt, idefics3_image_seq_len, Idefics3ImageProcessor, Idefics3PromptTokens,
    PreprocessorConfig,
};
use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Deserialize)]
struct Goldens {
    transformers: String,
    pillow: String,
    configs: BTreeMap<String, ConfigEntry>,
    images: Vec<ImageCase>,
    sweep: Sweep,
    prompts: Prompts,
    image_seq_len: Vec<SeqLenCase>,
}

#[derive(Deserialize)]
struct ConfigEntry {
    class: String,
    config: serde_json::Value,
    image_seq_len: usize,
}

#[derive(Deserialize)]
struct ImageCase {
    image: String,
    pil_mode: String,
    size_hw: [usize; 2],
    /// One output per config, keyed by the config's name.
    #[serde(flatten)]
    outputs: BTreeMap<String, Output>,
}

/// HF's output for one image under one config, or its error.
#[derive(Deserialize)]
struct Output {
    error: Option<String>,
    shape: Option<[usize; 4]>,
    rows: Option<usize>,
    cols: Option<usize>,
    sha256: Option<String>,
    #[serde(default)]
    samples: Vec<(usize, f32)>,
    mask: Option<Mask>,
}

#[derive(Deserialize)]
struct Mask {
    shape: [usize; 3],
    sum: usize,
    sha256: String,
}

#[derive(Deserialize)]
struct Sweep {
    sizes_hw: Vec<[usize; 2]>,
    configs: BTreeMap<String, SweepConfig>,
}

#[derive(Deserialize)]
struct SweepConfig {
    config: serde_json::Value,
    image_seq_len: usize,
    /// Per size: rows, cols, frames, `<image>` tokens in the prompt, then HF's
    /// `get_number_of_image_patches` (num_patches, rows, cols), which the processor does not use.
    rows_cols_frames_image_tokens_helper: Vec<[usize; 7]>,
}

#[derive(Deserialize)]
struct Prompts {
    default_tokens: Vec<PromptCase>,
    custom_tokens: Vec<CustomPromptCase>,
}

#[derive(Deserialize)]
struct PromptCase {
    rows: usize,
    cols: usize,
    image_seq_len: usize,
    same_for_both: bool,
    image_tokens: usize,
    idefics3: Option<String>,
    smolvlm: Option<String>,
    idefics3_sha256: Option<String>,
    smolvlm_sha256: Option<String>,
    chars: Option<usize>,
}

#[derive(Deserialize)]
struct CustomPromptCase {
    rows: usize,
    cols: usize,
    image_seq_len: usize,
    tokens: [String; 3],
    smolvlm: String,
}

#[derive(Deserialize)]
struct SeqLenCase {
    model: String,
    image_size: usize,
    patch_size: usize,
    scale_factor: usize,
    image_seq_len: usize,
}

fn load() -> Goldens {
    read_json("idefics3-image/goldens.json")
}

fn processor(config: &serde_json::Value, pillow: &str) -> Idefics3ImageProcessor {
    let config = PreprocessorConfig::from_json_str(&config.to_string()).expect("config parses");
    Idefics3ImageProcessor::new(&config)
        .expect("config accepted")
        .with_pass_order(pass_order(pillow))
}

fn sha256_text(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// SHA-256 of the mask as HF's `int64` little-endian bytes.
fn sha256_mask(mask: &[bool]) -> String {
    let mut hasher = Sha256::new();
    for &m in mask {
        hasher.update(i64::from(m).to_le_bytes());
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Compares one output with HF's; returns the problems found.
fn check(what: &str, p: &Idefics3ImageProcessor, image: &DynamicImage, hf: &Output) -> Vec<String> {
    let out = match (p.preprocess(image), &hf.error) {
        (Ok(out), None) => out,
        (Err(e), None) => return vec![format!("{what}: error {e}, HF succeeded")],
        (Ok(_), Some(hf_err)) => return vec![format!("{what}: succeeded, HF failed: {hf_err}")],
        (Err(_), Some(_)) => return Vec::new(),
    };
    let mut problems = Vec::new();
    let px = &out.pixel_values;
    if Some(px.shape) != hf.shape {
        problems.push(format!("{what}: shape {:?}, HF {:?}", px.shape, hf.shape));
    }
    let grid = (out.grid.rows, out.grid.cols);
    if (Some(grid.0), Some(grid.1)) != (hf.rows, hf.cols) {
        problems.push(format!(
            "{what}: rows/cols {grid:?}, HF {:?}",
            (hf.rows, hf.cols)
        ));
    }
    let got = sha256_hex(&px.data);
    if Some(&got) != hf.sha256.as_ref() {
        let first_bad = hf
            .samples
            .iter()
            .find(|&&(i, v)| px.data.get(i).map(|g| g.to_bits()) != Some(v.to_bits()));
        let detail = match first_bad {
            Some(&(i, want)) => {
                let plane = px.shape[2] * px.shape[3];
                let (frame, channel, rem) = (i / plane / 3, i / plane % 3, i % plane);
                format!(
                    "first differing sample: index {i} (frame {frame}, channel {channel}, y {}, x {}) = {:e}, HF {want:e}",
                    rem / px.shape[3],
                    rem % px.shape[3],
                    px.data.get(i).copied().unwrap_or(f32::NAN)
                )
            }
            None => format!("all {} recorded samples match", hf.samples.len()),
        };
        problems.push(format!(
            "{what}: sha256 {got} != HF {:?}; {detail}",
            hf.sha256
        ));
    }
    match (&out.pixel_attention_mask, &hf.mask) {
        (None, None) => {}
        (Some(mask), Some(want)) => {
            let sum = mask.data.iter().filter(|&&m| m).count();
            let hash = sha256_mask(&mask.data);
            if mask.shape != want.shape || sum != want.sum || hash != want.sha256 {
                problems.push(format!(
                    "{what}: mask {:?} sum {sum} sha256 {hash}, HF {:?} sum {} sha256 {}",
                    mask.shape, want.shape, want.sum, want.sha256
                ));
            }
        }
        (got, want) => problems.push(format!(
            "{what}: mask present {}, HF {}",
            got.is_some(),
            want.is_some()
        )),
    }
    problems
}

/// Images checked under the two configs whose debug-build run is slowest (both cover every kind of
/// input under `idefics3` already): grids 3x4, 4x3, 1x4, 2x4 and 4x2, a palette image, and an image
/// Pillow 13 resizes vertically first. `--include-ignored` checks every image.
const SUBSET: [&str; 6] = [
    "images/next_1080x1920.png",
    "images/next_1920x1080.png",
    "images/next_100x1000.png",
    "images/tiny_2x4.png",
    "images/mode_P_trns.png",
    "images/tall_vfirst_1000x450.png",
];

/// Runs the processor of config `config` on the fixture images (all, or those in `only`) and
/// compares with HF.
fn check_config(config: &str, only: Option<&[&str]>) {
    let goldens = load();
    let root = fixtures();
    let entry = &goldens.configs[config];
    let p = processor(&entry.config, &goldens.pillow);
    let mut failures = Vec::new();
    let cases: Vec<&ImageCase> = goldens
        .images
        .iter()
        .filter(|c| only.is_none_or(|only| only.contains(&c.image.as_str())))
        .collect();
    assert!(!cases.is_empty());
    for case in &cases {
        let name = format!(
            "{} ({}, {}x{})",
            case.image, case.pil_mode, case.size_hw[0], case.size_hw[1]
        );
        let Some(hf) = case.outputs.get(config) else {
            failures.push(format!("{name}: no golden for config {config}"));
            continue;
        };
        match image::open(root.join(&case.image)) {
            Ok(image) => failures.extend(check(&format!("{name} {config}"), &p, &image, hf)),
            Err(e) => failures.push(format!("{name}: cannot decode: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} problems in {} images under {config} ({}) vs transformers {} / Pillow {}:\n  {}",
        failures.len(),
        cases.len(),
        entry.class,
        goldens.transformers,
        goldens.pillow,
        failures.join("\n  ")
    );
}

// One test per config, so that the test harness runs them in parallel. In a debug build the four
// configs on every image take about 80 s of CPU (Lanczos resizes of up to 2048 x 2048, unoptimised),
// hence the subsets by default.

#[test]
fn pixels_match_hf_idefics3_8b() {
    check_config("idefics3", None);
}

#[test]
fn pixels_match_hf_smolvlm_256m() {
    check_config("smolvlm", Some(&SUBSET));
}

#[test]
fn pixels_match_hf_without_splitting() {
    check_config("idefics3_nosplit", Some(&SUBSET));
}

#[test]
fn pixels_match_hf_without_first_resize_bicubic() {
    check_config("smolvlm_noresize_bicubic", None);
}

#[test]
#[ignore = "slow in debug builds (about a minute); run with --include-ignored"]
fn pixels_match_hf_every_image() {
    check_config("smolvlm", None);
    check_config("idefics3_nosplit", None);
}

#[test]
fn every_config_is_checked() {
    let goldens = load();
    let tested = [
        "idefics3",
        "smolvlm",
        "idefics3_nosplit",
        "smolvlm_noresize_bicubic",
    ];
    let names: Vec<&str> = goldens.configs.keys().map(String::as_str).collect();
    for name in &names {
        assert!(tested.contains(name), "config {name} has no test");
    }
}

#[test]
fn grids_match_hf_on_the_size_sweep() {
    let goldens = load();
    let tokens = Idefics3PromptTokens::default();
    let mut failures = Vec::new();
    for (name, sweep) in &goldens.sweep.configs {
        let p = processor(&sweep.config, &goldens.pillow);
        assert_eq!(
            sweep.rows_cols_frames_image_tokens_helper.len(),
            goldens.sweep.sizes_hw.len()
        );
        for (&[h, w], row) in goldens
            .sweep
            .sizes_hw
            .iter()
            .zip(&sweep.rows_cols_frames_image_tokens_helper)
        {
            let [rows, cols, frames, image_tokens, ..] = *row;
            let grid = match p.grid(h, w) {
                Ok(grid) => grid,
                Err(e) => {
                    failures.push(format!("{name} {h}x{w}: {e}"));
                    continue;
                }
            };
            let prompt = idefics3_image_prompt(grid.rows, grid.cols, sweep.image_seq_len, &tokens);
            let got = [
                grid.rows,
                grid.cols,
                grid.frames(),
                prompt.matches("<image>").count(),
            ];
            if got != [rows, cols, frames, image_tokens]
                || grid.image_tokens(sweep.image_seq_len) != image_tokens
            {
                failures.push(format!(
                    "{name} {h}x{w}: rows, cols, frames, image tokens {got:?} (grid {grid:?}), HF {:?}",
                    [rows, cols, frames, image_tokens]
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} sweep mismatches:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
}

#[test]
fn prompt_strings_match_hf() {
    let goldens = load();
    let tokens = Idefics3PromptTokens::default();
    for case in &goldens.prompts.default_tokens {
        let what = format!("{}x{} x {}", case.rows, case.cols, case.image_seq_len);
        assert!(case.same_for_both, "{what}: HF's two processors differ");
        let text = idefics3_image_prompt(case.rows, case.cols, case.image_seq_len, &tokens);
        assert_eq!(text.matches("<image>").count(), case.image_tokens, "{what}");
        for want in [&case.idefics3, &case.smolvlm].into_iter().flatten() {
            assert_eq!(&text, want, "{what}");
        }
        for want in [&case.idefics3_sha256, &case.smolvlm_sha256]
            .into_iter()
            .flatten()
        {
            assert_eq!(&sha256_text(&text), want, "{what}");
        }
        if let Some(chars) = case.chars {
            assert_eq!(text.len(), chars, "{what}");
        }
    }
    for case in &goldens.prompts.custom_tokens {
        let [fake, image, global] = case.tokens.clone();
        let tokens = Idefics3PromptTokens {
            fake_image_token: fake,
            image_token: image,
            global_image_token: global,
        };
        let text = idefics3_image_prompt(case.rows, case.cols, case.image_seq_len, &tokens);
        assert_eq!(
            text, case.smolvlm,
            "{}x{} custom tokens",
            case.rows, case.cols
        );
    }
}

#[test]
fn image_seq_len_matches_the_models_formula() {
    for case in load().image_seq_len {
        assert_eq!(
            idefics3_image_seq_len(case.image_size, case.patch_size, case.scale_factor),
            Some(case.image_seq_len),
            "{}",
            case.model
        );
    }
}

#[test]
fn goldens_cover_the_interesting_cases() {
    let goldens = load();
    let modes: Vec<&str> = goldens.images.iter().map(|c| c.pil_mode.as_str()).collect();
    for mode in ["RGB", "L", "LA", "RGBA", "P", "I;16", "1"] {
        assert!(modes.contains(&mode), "no golden with PIL mode {mode}");
    }
    let classes: Vec<&str> = goldens.configs.values().map(|c| c.class.as_str()).collect();
    assert!(
        classes.contains(&"Idefics3ImageProcessorPil")
            && classes.contains(&"SmolVLMImageProcessorPil")
    );
    // Split and unsplit outputs, and one image split into a single row.
    let grids: Vec<(usize, usize)> = goldens
        .images
        .iter()
        .flat_map(|c| c.outputs.values())
        .filter_map(|o| Some((o.rows?, o.cols?)))
        .collect();
    assert!(grids.contains(&(0, 0)) && grids.contains(&(4, 4)) && grids.contains(&(1, 4)));
    assert!(goldens.configs.values().all(|c| c.image_seq_len > 0));
}
