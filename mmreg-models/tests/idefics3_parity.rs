//! Idefics3 and SmolVLM against HF transformers through the parity harness: the tiny random checkpoints
//! and goldens of `scripts/parity.py idefics3` and `scripts/parity.py smolvlm` (Llama-2's tokenizer with
//! the Idefics3 tags). Images split into a grid of tiles plus a global view, placeholders interleaved with
//! `<fake_token_around_image>` / `<row_r_col_c>` / `<global-img>` text tokens, the pixel-shuffle
//! connector: token ids, pixel values bit for bit (by SHA-256), f32 logits at every prompt position, 20
//! greedy tokens, a case without splitting, and the placeholder counts of a size sweep; then every case
//! through the engine in one batch, in chunks, with fixed-shape steps and preemption.

mod support;

use mmreg_engine::EngineOptions;
use mmreg_models as _;
use support::fixture;

const FIXTURES: [&str; 2] = ["idefics3-tiny", "smolvlm-tiny"];

#[test]
fn idefics3_and_smolvlm_match_transformers() {
    for name in FIXTURES {
        let report = mmreg_parity::check(&fixture(name)).expect("runs");
        println!("{name}:\n{}", report.table());
        report.assert_passed();
    }
}

#[test]
fn idefics3_and_smolvlm_through_the_engine_in_one_batch() {
    for name in FIXTURES {
        let options = EngineOptions {
            max_model_len: Some(2048),
            max_num_batched_tokens: 2048,
            cuda_graphs: Some(false),
            ..EngineOptions::default()
        };
        let report = mmreg_parity::check_engine(&fixture(name), options).expect("runs");
        println!("{name}:\n{}", report.table());
        report.assert_passed();
    }
}

/// 100-token chunks (an item spans several; its rows are sliced into each), fixed-shape decode steps
/// and a KV cache of 1600 tokens for every case twice over: sequences are preempted and recomputed.
#[test]
fn idefics3_and_smolvlm_in_chunks_with_fixed_shapes_and_preemption() {
    for name in FIXTURES {
        let options = EngineOptions {
            max_model_len: Some(1400),
            max_num_batched_tokens: 100,
            cuda_graphs: Some(true),
            cpu_kv_cache_bytes: 100 * 16 * kv_bytes_per_token(name),
            ..EngineOptions::default()
        };
        let report = mmreg_parity::check_engine(&fixture(name), options).expect("runs");
        println!("{name}:\n{}", report.table());
        report.assert_passed();
    }
}

/// Keys and values of every layer, f32: layers × 2 × kv heads × head_dim × 4 bytes.
fn kv_bytes_per_token(name: &str) -> usize {
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(name).join("config.json")).expect("config"),
    )
    .expect("json");
    let text = &config["text_config"];
    let get = |k: &str| text[k].as_u64().expect(k) as usize;
    let heads = get("num_attention_heads");
    let kv = text["num_key_value_heads"]
        .as_u64()
        .map_or(heads, |k| k as usize);
    let head_dim = text["head_dim"]
        .as_u64()
        .map_or(get("hidden_size") / heads, |d| d as usize);
    get("num_hidden_layers") * 2 * kv * head_dim * 4
}
