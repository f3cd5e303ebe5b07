//! Gemma 3 against HF transformers through the parity harness: the tiny random checkpoint and goldens of
//! `scripts/parity.py gemma3` (real Gemma 3 tokenizer and chat template; 896 px SigLIP pooled to 256
//! tokens; six decoder layers, five of them with a 64-token sliding window, shorter than every prompt
//! and than an image's run of tokens). Token ids, pixel values bit for bit (by SHA-256), f32 prefill
//! logits at every position under the bidirectional-image and sliding-window masks, 20 greedy tokens,
//! a pan-and-scan case (crops of a wide image) and the placeholder counts of a size sweep with and
//! without pan-and-scan; then every case through the engine in one batch.

mod support;

use mmreg_engine::EngineOptions;
use mmreg_models as _;
use support::fixture;

#[test]
fn gemma3_matches_transformers() {
    let report = mmreg_parity::check(&fixture("gemma3-tiny")).expect("runs");
    println!("{}", report.table());
    report.assert_passed();
}

#[test]
fn gemma3_through_the_engine_in_one_batch() {
    let options = EngineOptions {
        max_model_len: Some(2048),
        max_num_batched_tokens: 2048,
        cuda_graphs: Some(false),
        ..EngineOptions::default()
    };
    let report = mmreg_parity::check_engine(&fixture("gemma3-tiny"), options).expect("runs");
    println!("{}", report.table());
    report.assert_passed();
}

/// Chunks of 128 tokens (a chunk never ends inside an image's run, so those steps take the whole run),
/// fixed-shape decode steps and a KV cache small enough to preempt.
#[test]
fn gemma3_in_chunks_with_fixed_shapes_and_preemption() {
    let options = EngineOptions {
        // Room for the largest pan-and-scan image (5 × 256 rows and the text between), which profiling
        // runs through the vision tower.
        max_model_len: Some(1400),
        max_num_batched_tokens: 128,
        cuda_graphs: Some(true),
        // 100 blocks of 16 tokens: the 1073-token pan-and-scan prompt and little else.
        cpu_kv_cache_bytes: 100 * 16 * kv_bytes_per_token(),
        ..EngineOptions::default()
    };
    let report = mmreg_parity::check_engine(&fixture("gemma3-tiny"), options).expect("runs");
    println!("{}", report.table());
    report.assert_passed();
}

/// Keys and values of every layer, f32: layers × 2 × kv heads × head_dim × 4 bytes.
fn kv_bytes_per_token() -> usize {
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("gemma3-tiny").join("config.json")).expect("config"),
    )
    .expect("json");
    let text = &config["text_config"];
    let get = |k: &str| text[k].as_u64().expect(k) as usize;
    get("num_hidden_layers") * 2 * get("num_key_value_heads") * get("head_dim") * 4
}
