//! Gemma 3 against HF transformers through the parity harness: the tiny random checkpoint and goldens of
//! `scripts/parity.py gemma3` (real Gemma 3 tokenizer and chat template; 896 px SigLIP pooled to 256
//! tokens; six decoder layers, five of them with a 64-token sliding window, shorter than every prompt
//! and than an image's run of tokens). Token ids, pixel values bit for bit (by SHA-256), f32 prefill
//! logits at every position under the bidirectional-image and sliding-window masks, 20 greedy tokens,
//! a pan-and-scan case (crops of a wide image) and the placeholder counts of a size sweep with and
//! without pan-and-scan; then every case through the engine in one batch, and with the sliding-window
//! layers' blocks kept apart and freed as the window passes them.

mod support;

use std::sync::atomic::Ordering;

use mmreg_engine::{Engine, EngineOptions};
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
        // Each step's tokens read before the next is issued (the sliding-window test issues it first).
        async_scheduling: false,
        ..EngineOptions::default()
    };
    let report = mmreg_parity::check_engine(&fixture("gemma3-tiny"), options).expect("runs");
    println!("{}", report.table());
    report.assert_passed();
}

/// Two sequence slots: the sliding-window layers' pool is sized for two windows of 64 tokens (and one
/// step's chunk), about 23 blocks of 16 tokens where the prompts take up to 68; the memory this frees
/// goes to the global layer's blocks. Every case must still give HF's greedy tokens, which it can only
/// if the blocks a window no longer sees go back to the pool; a long prompt run twice reuses its
/// cached prefix in both pools and gives the same tokens. Decode steps run with async scheduling (each
/// issued before the previous one's tokens are read), which frees a window's blocks a step later.
#[test]
fn gemma3_sliding_layers_hold_only_their_window() {
    let dir = fixture("gemma3-tiny");
    let options = EngineOptions {
        max_model_len: Some(1400),
        max_num_seqs: 2,
        max_num_batched_tokens: 128,
        cuda_graphs: Some(true),
        async_scheduling: true,
        cpu_kv_cache_bytes: 100 * 16 * kv_bytes_per_token(),
        ..EngineOptions::default()
    };
    let report = mmreg_parity::check_engine(&dir, options.clone()).expect("runs");
    println!("{}", report.table());
    report.assert_passed();

    mmreg_parity::unpack_tokenizer(&dir).expect("tokenizer");
    let goldens = mmreg_parity::Goldens::load(&dir).expect("goldens");
    let case = goldens
        .meta
        .cases
        .iter()
        .find(|c| c.name == "long_text_after_image")
        .expect("case");
    let expected = goldens.ids(&case.name, "generated").expect("golden");
    let engine = Engine::new(&dir, options).expect("engine");
    let profile = engine.profile().clone();
    println!(
        "global blocks {}, sliding-window blocks {}",
        profile.kv_blocks, profile.sliding_blocks
    );
    // The five sliding layers' share of 100 blocks of every layer went to the global one.
    assert!(profile.sliding_blocks > 0 && profile.sliding_blocks < 30);
    assert!(
        profile.kv_blocks > 400,
        "{} global blocks",
        profile.kv_blocks
    );
    let request = || goldens.request(&dir, case);
    let first = engine.generate(vec![request()]).remove(0).expect("first");
    let again = engine.generate(vec![request()]).remove(0).expect("again");
    let tokens = |c: &mmreg_engine::Completion| -> Vec<i64> {
        c.token_ids.iter().map(|&t| i64::from(t)).collect()
    };
    assert_eq!(tokens(&first), expected);
    assert_eq!(tokens(&again), expected);
    assert!(
        first.prompt_tokens > 64 * 4,
        "{} prompt tokens",
        first.prompt_tokens
    );
    assert_eq!(first.cached_tokens, 0);
    assert!(
        again.cached_tokens > 64,
        "{} cached tokens of {}",
        again.cached_tokens,
        again.prompt_tokens
    );
    // Between steps one sequence holds its window's blocks: ⌈63 / 16⌉ + 1.
    let counters = engine.counters();
    let peak = counters.kv_sliding_blocks_peak.load(Ordering::Relaxed);
    assert!(peak > 0 && peak <= 5, "{peak} sliding-window blocks held");
    // The scheduler publishes what is held after the step that finished the request.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while counters.kv_sliding_blocks_used.load(Ordering::Relaxed) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "sliding-window blocks never freed"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
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
