//! The embedded demo model (assets/shapes-llava, trained by scripts/shapes/train.py): on 200 held-out
//! images and the samples, mmreg's batched greedy captions equal transformers' for every image, and are
//! exactly right for at least 95%.

use mmreg_core::Prompt;
use std::path::Path;

use mmreg_engine::{Engine, EngineOptions, ImageSource, Request, SamplingParams};
use mmreg_models as _;
use serde_json::Value;

#[test]
fn demo_model_captions_match_hf_and_are_right() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/shapes-llava");
    let goldens: Value =
        serde_json::from_slice(&std::fs::read(dir.join("goldens.json")).expect("goldens"))
            .expect("JSON");
    let cases: Vec<&Value> = goldens["goldens"]
        .as_array()
        .into_iter()
        .chain(goldens["samples"].as_array())
        .flatten()
        .collect();
    assert!(cases.len() >= 200, "only {} goldens", cases.len());
    let engine = Engine::new(
        &dir,
        EngineOptions {
            cpu_kv_cache_bytes: 64 << 20,
            ..EngineOptions::default()
        },
    )
    .expect("engine");
    let requests = cases
        .iter()
        .map(|case| {
            let image = case["image"].as_str().expect("image");
            let image = if image.contains('/') {
                dir.join(image)
            } else {
                dir.join("samples").join(image)
            };
            Request {
                videos: Vec::new(),
                prompt: Prompt::Text(case["prompt"].as_str().expect("prompt").to_owned()),
                images: vec![ImageSource::Path(image)],
                params: SamplingParams {
                    max_tokens: 24,
                    stop_token_ids: vec![2],
                    ..SamplingParams::default()
                },
            }
        })
        .collect();
    let results = engine.generate(requests);
    let (mut same_as_hf, mut right) = (0, 0);
    for (case, result) in cases.iter().zip(results) {
        let completion = result.expect("captions");
        let hf: Vec<u32> = case["generated_ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect();
        assert_eq!(
            completion.token_ids, hf,
            "{}: differs from transformers",
            case["image"]
        );
        same_as_hf += 1;
        right += usize::from(completion.text == case["true_caption"].as_str().expect("caption"));
    }
    let accuracy = right as f64 / cases.len() as f64;
    eprintln!(
        "demo model: {same_as_hf}/{} equal to HF, {right}/{} exactly right ({:.1}%)",
        cases.len(),
        cases.len(),
        accuracy * 100.0
    );
    assert!(accuracy >= 0.95, "accuracy {accuracy}");
}
