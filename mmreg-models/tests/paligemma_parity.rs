//! PaliGemma against HF transformers through the parity harness: the tiny random checkpoint and goldens
//! of `scripts/parity.py paligemma` (real Gemma tokenizer; 224 px SigLIP, 256 image tokens per image,
//! the out-of-vocabulary `<image>` token of the released checkpoints). Token ids, pixel values bit for
//! bit, f32 prefill logits at every prompt position under the prefix-LM mask, 20 greedy tokens, and
//! the placeholder count over a size sweep; then every case through the engine in one batch.

mod support;

use mmreg_engine::EngineOptions;
use mmreg_models as _;
use support::fixture;

#[test]
fn paligemma_matches_transformers() {
    let report = mmreg_parity::check(&fixture("paligemma-tiny")).expect("runs");
    println!("{}", report.table());
    report.assert_passed();
}

#[test]
fn paligemma_through_the_engine_in_one_batch() {
    let options = EngineOptions {
        max_model_len: Some(1024),
        max_num_batched_tokens: 1024,
        cuda_graphs: Some(false),
        ..EngineOptions::default()
    };
    let report = mmreg_parity::check_engine(&fixture("paligemma-tiny"), options).expect("runs");
    println!("{}", report.table());
    report.assert_passed();
}

/// Fixed-shape decode steps and a KV cache too small for every sequence at once: sequences are preempted
/// and recomputed, prefix-LM mask and all.
#[test]
fn paligemma_with_fixed_shapes_and_preemption() {
    let options = EngineOptions {
        max_model_len: Some(600),
        max_num_batched_tokens: 600,
        cuda_graphs: Some(true),
        // 48 blocks of 16 tokens: two or three of the ~300-token prompts at once.
        cpu_kv_cache_bytes: 48 * 16 * kv_bytes_per_token(),
        ..EngineOptions::default()
    };
    let report = mmreg_parity::check_engine(&fixture("paligemma-tiny"), options).expect("runs");
    println!("{}", report.table());
    report.assert_passed();
}

/// Keys and values of every layer, f32: layers × 2 × kv heads × head_dim × 4 bytes.
fn kv_bytes_per_token() -> usize {
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("paligemma-tiny").join("config.json")).expect("config"),
    )
    .expect("json");
    let text = &config["text_config"];
    let get = |k: &str| text[k].as_u64().expect(k) as usize;
    get("num_hidden_layers") * 2 * get("num_key_value_heads") * get("head_dim") * 4
}

/// The harness notices a model that is close but not right: the same checkpoint with another rotary
/// base. Ids and pixels still agree with HF; the logits do not.
#[test]
fn the_harness_notices_a_wrong_rotary_base() {
    let dir = fixture("paligemma-tiny");
    mmreg_parity::unpack_tokenizer(&dir).expect("tokenizer");
    let copy = tempfile::tempdir().expect("temp dir");
    let images = fixture("images").canonicalize().expect("images");
    for entry in std::fs::read_dir(&dir).expect("fixture") {
        let entry = entry.expect("entry");
        let target = copy.path().join(entry.file_name());
        let text = || std::fs::read_to_string(entry.path()).expect("read");
        match entry.file_name().to_str() {
            Some("config.json") => {
                let mut config: serde_json::Value = serde_json::from_str(&text()).expect("json");
                config["text_config"]["rope_parameters"]["rope_theta"] = 500.0.into();
                std::fs::write(&target, config.to_string()).expect("write");
            }
            // The cases' images are named relative to the fixture.
            Some("parity.json") => std::fs::write(
                &target,
                text().replace("../images/", &format!("{}/", images.display())),
            )
            .expect("write"),
            _ => std::os::unix::fs::symlink(entry.path().canonicalize().expect("path"), &target)
                .expect("link"),
        }
    }
    let report = mmreg_parity::check(copy.path()).expect("runs");
    let failed: Vec<&str> = report.failures().iter().map(|c| c.what.as_str()).collect();
    assert!(failed.contains(&"prefill logits"), "{}", report.table());
    assert!(
        !failed.contains(&"input_ids") && !failed.contains(&"pixel_values"),
        "{}",
        report.table()
    );
}
