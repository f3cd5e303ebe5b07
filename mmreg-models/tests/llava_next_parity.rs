//! LLaVA-NeXT against Hugging Face transformers: the token count over a sweep of sizes, and tiny random
//! checkpoints made by `scripts/make_llava_next_fixtures.py` (HF eager attention, float32, CPU).

use std::path::PathBuf;

use mmreg_core::registry::ModelEntry;
use mmreg_core::{
    ImageInput, ImageSize, LoadOptions, Modality, ModelContext, MultiModalData, MultiModalModel,
    ProcessorInputs, Prompt, Registry, SupportsVision, TensorMap, Weights,
};
use mmreg_engine::generate::{prepare, PreparedInputs};
use mmreg_models::llava_next::anyres_layout;
use mmreg_models::{LlavaNext, LlavaNextConfig};
use serde_json::Value;
use sha2::{Digest, Sha256};

mod common;
mod support;
use common::Golden;
use support::fixture;
use tch::Tensor;

fn json(path: PathBuf) -> Value {
    serde_json::from_slice(&std::fs::read(&path).expect("readable")).expect("valid JSON")
}

fn numbers(value: &Value) -> Vec<i64> {
    value
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v.as_i64().expect("integer"))
        .collect()
}

/// The hub's llava-v1.6 configuration (default pinpoints, CLIP 336/14, `default` strategy).
fn hub_config() -> LlavaNextConfig {
    serde_json::from_value(serde_json::json!({})).expect("defaults")
}

#[test]
fn token_count_matches_hf_for_every_size_in_the_sweep() {
    let table = json(fixture("llava-next-token-counts.json"));
    let config = hub_config();
    let (heights, widths) = (numbers(&table["heights"]), numbers(&table["widths"]));
    let mut checked = 0;
    for (i, &h) in heights.iter().enumerate() {
        let row = numbers(&table["tokens"][i]);
        for (j, &w) in widths.iter().enumerate() {
            let size = ImageSize {
                height: h as u32,
                width: w as u32,
            };
            let ours = anyres_layout(&config, size).expect("layout").tokens();
            assert_eq!(ours as i64, row[j], "{h}x{w} (height x width)");
            checked += 1;
        }
    }
    assert!(checked > 6000, "only {checked} sizes");
}

#[test]
fn token_count_matches_the_worked_examples() {
    let config = hub_config();
    let cases = [
        ((336, 336), 1176),
        ((480, 640), 2340),
        ((1024, 1024), 2928),
        ((500, 316), 1526),
        ((1080, 1920), 1948),
        ((899, 1024), 2634),
        ((200, 300), 1464),
        ((100, 1000), 1160),
    ];
    for ((h, w), tokens) in cases {
        let layout = anyres_layout(
            &config,
            ImageSize {
                height: h,
                width: w,
            },
        )
        .expect("layout");
        assert_eq!(layout.tokens(), tokens, "{h}x{w}");
    }
    for example in json(fixture("llava-next-token-counts.json"))["worked_examples"]
        .as_array()
        .expect("list")
    {
        let size = ImageSize {
            height: example["h"].as_u64().expect("h") as u32,
            width: example["w"].as_u64().expect("w") as u32,
        };
        assert_eq!(
            anyres_layout(&config, size).expect("layout").tokens() as u64,
            example["tokens"].as_u64().expect("tokens")
        );
    }
}

struct Checkpoint {
    dir: PathBuf,
    ctx: ModelContext,
    entry: &'static ModelEntry,
    model: Box<dyn MultiModalModel>,
    golden: Golden,
    meta: Value,
}

impl Checkpoint {
    fn open(name: &str) -> Self {
        let dir = fixture(name);
        let ctx = ModelContext::from_dir(&dir).expect("context");
        let entry = Registry::global()
            .for_context(&ctx)
            .expect("LLaVA-NeXT is registered");
        assert_eq!(entry.id.name, "LlavaNext");
        let model = entry
            .load(
                &ctx,
                &Weights::from_dir(&dir).expect("weights"),
                &LoadOptions::default(),
            )
            .expect("loads");
        let golden = Golden::load(&dir);
        let meta = json(dir.join("golden.json"));
        Self {
            dir,
            ctx,
            entry,
            model,
            golden,
            meta,
        }
    }

    fn get(&self, key: &str) -> &Tensor {
        self.golden.get(key)
    }

    fn ids(&self, key: &str) -> Vec<i64> {
        self.golden.ids(key)
    }
}

fn assert_matches_hf(c: &Checkpoint, case: &str, inputs: impl Fn() -> PreparedInputs) {
    common::assert_matches_hf(c.entry, c.model.as_ref(), &c.golden, case, inputs);
}

fn sha256(tensor: &Tensor) -> String {
    let values = Vec::<f32>::try_from(tensor.flatten(0, -1)).expect("f32");
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn tiny_real_matches_hf_for_every_image_shape() {
    let c = Checkpoint::open("llava-next-tiny-real");
    for (case, meta) in c.meta["cases"].as_object().expect("cases") {
        let prompt = meta["prompt"].as_str().expect("prompt").to_owned();
        let names: Vec<String> = meta["images"]
            .as_array()
            .expect("images")
            .iter()
            .map(|v| v.as_str().expect("name").to_owned())
            .collect();
        let inputs = || {
            let images = names
                .iter()
                .map(|n| ImageInput::open(c.dir.join("images").join(n)).expect("image"))
                .collect();
            let request = ProcessorInputs {
                prompt: Prompt::Text(prompt.clone()),
                multimodal: MultiModalData::with_images(images),
            };
            prepare(c.entry, &c.ctx, request, 32768).expect("prepared")
        };
        let prepared = inputs();
        let (_, mapped) = &prepared.mapped[0];
        let get = |name: &str| mapped.iter().find(|(n, _)| *n == name).expect("mapped").1;
        let shape: Vec<i64> = numbers(&meta["pixel_values_shape"]);
        assert_eq!(
            get("pixel_values").size(),
            shape,
            "{case}: pixel_values shape"
        );
        assert_eq!(
            sha256(get("pixel_values")),
            meta["pixel_values_sha256"].as_str().expect("sha"),
            "{case}: pixel_values differ from HF's"
        );
        assert!(
            get("image_sizes").equal(c.get(&format!("{case}.image_sizes"))),
            "{case}: image_sizes"
        );
        let counts: Vec<i64> = prepared
            .processed
            .placeholder_lengths(Modality::Image)
            .iter()
            .map(|&n| n as i64)
            .collect();
        assert_eq!(
            counts,
            numbers(&meta["num_image_tokens"]),
            "{case}: tokens per image"
        );
        assert_matches_hf(&c, case, inputs);
    }
}

#[test]
fn hf_tester_config_matches_hf_including_both_unpad_directions() {
    let c = Checkpoint::open("llava-next-tiny-hf");
    for case in ["one_image", "two_images", "unpad"] {
        let inputs = || {
            let expanded = c.ids(&format!("{case}.input_ids"));
            let ids: Vec<u32> = expanded
                .iter()
                .enumerate()
                .filter(|&(i, &id)| id != 0 || i == 0 || expanded[i - 1] != 0)
                .map(|(_, &id)| id as u32)
                .collect();
            let sizes = c.ids(&format!("{case}.image_sizes"));
            // Images only stand in for their sizes here: HF's pixel values are fed directly.
            let images = sizes
                .chunks(2)
                .map(|hw| {
                    ImageInput::new(
                        "sized",
                        image::DynamicImage::new_rgb8(hw[1] as u32, hw[0] as u32),
                    )
                })
                .collect();
            let request = ProcessorInputs {
                prompt: Prompt::TokenIds(ids),
                multimodal: MultiModalData::with_images(images),
            };
            let processed = c.entry.process(&c.ctx, request).expect("processed");
            let mut mapped = TensorMap::default();
            mapped.insert(
                "pixel_values",
                c.get(&format!("{case}.pixel_values")).shallow_clone(),
            );
            mapped.insert(
                "image_sizes",
                c.get(&format!("{case}.image_sizes")).shallow_clone(),
            );
            PreparedInputs {
                processed,
                mapped: vec![(Modality::Image, mapped)],
            }
        };
        assert_matches_hf(&c, case, inputs);
    }
}

#[test]
fn max_tokens_and_dummy_data_use_the_costliest_size() {
    let ctx = ModelContext::from_dir(fixture("llava-next-tiny-real")).expect("context");
    let entry = Registry::global()
        .by_architecture("LlavaNextForConditionalGeneration")
        .expect("registered");
    assert_eq!(entry.max_tokens(&ctx, Modality::Image).expect("max"), 2928);
    let report = mmreg_core::check::check_model(entry, &ctx, 4096, None).expect("consistent");
    assert_eq!(report.modalities[0].dummy_item_tokens, vec![2928]);
    let size = ImageSize {
        height: 672,
        width: 672,
    };
    assert_eq!(
        LlavaNext::num_image_tokens(&ctx, size).expect("count"),
        2928
    );
}
