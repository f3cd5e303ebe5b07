//! Tensor parallelism on the CPU (c10d's Gloo between rank threads): the engine split over 2 and 4 ranks
//! gives exactly the greedy tokens of one rank, in f32, on the tiny LLaVA, LLaVA-NeXT and Qwen2-VL
//! checkpoints, every parity case in one batch, eager and in fixed-shape decode steps, and with prompts
//! prefilled in chunks. The one-rank tokens are HF's (the parity goldens), so the split ones are too.
//! LLaVA's two key/value heads over 4 ranks are replicated (each shared by two ranks); a checkpoint whose
//! heads do not split is refused at start-up.

mod support;

use std::path::{Path, PathBuf};

use std::sync::atomic::Ordering;

use mmreg_engine::{EncoderTpMode, Engine, EngineOptions, MultiModalLimits};
use mmreg_models as _;
use support::fixture;

/// Every parity case of `dir` through an engine of `tp` ranks, in one batch: their greedy tokens.
fn tokens(dir: &Path, tp: usize, fixed_shapes: bool, chunk: usize) -> Vec<Vec<i64>> {
    let options = EngineOptions {
        tensor_parallel_size: tp,
        max_model_len: Some(4096),
        max_num_batched_tokens: chunk,
        cuda_graphs: Some(fixed_shapes),
        tensor_parallel_timeout: std::time::Duration::from_secs(120),
        ..EngineOptions::default()
    };
    generate(dir, &Engine::new(dir, options).expect("engine"))
}

fn generate(dir: &Path, engine: &Engine) -> Vec<Vec<i64>> {
    mmreg_parity::unpack_tokenizer(dir).expect("tokenizer");
    let goldens = mmreg_parity::Goldens::load(dir).expect("goldens");
    let requests = goldens
        .meta
        .cases
        .iter()
        .filter(|c| c.processor_kwargs.is_empty() || !has_image_kwargs(c))
        .map(|case| goldens.request(dir, case))
        .collect();
    engine
        .generate(requests)
        .into_iter()
        .map(|r| {
            r.expect("completes")
                .token_ids
                .iter()
                .map(|&t| i64::from(t))
                .collect()
        })
        .collect()
}

/// Cases that HF ran with other image-processor settings are left out (the engine reads the
/// checkpoint's).
fn has_image_kwargs(case: &mmreg_parity::Case) -> bool {
    case.processor_kwargs
        .keys()
        .any(|k| k != "add_special_tokens")
}

/// HF's greedy tokens of the same cases.
fn hf_tokens(dir: &Path) -> Vec<Vec<i64>> {
    let goldens = mmreg_parity::Goldens::load(dir).expect("goldens");
    goldens
        .meta
        .cases
        .iter()
        .filter(|c| c.processor_kwargs.is_empty() || !has_image_kwargs(c))
        .map(|c| goldens.ids(&c.name, "generated").expect("golden"))
        .collect()
}

fn check(dir: &Path, sizes: &[usize]) {
    let one = tokens(dir, 1, false, 8192);
    assert_eq!(one, hf_tokens(dir), "one rank against HF");
    for &tp in sizes {
        assert_eq!(tokens(dir, tp, false, 8192), one, "{tp} ranks, eager");
        assert_eq!(
            tokens(dir, tp, true, 64),
            one,
            "{tp} ranks, fixed shapes, 64-token chunks"
        );
    }
}

#[test]
fn llava_splits_over_2_and_4_ranks() {
    // 4 heads, 2 key/value heads: over 4 ranks each kv head serves two.
    check(&fixture("llava-tiny-real"), &[2, 4]);
}

#[test]
fn llava_next_splits_over_2_and_4_ranks() {
    check(&fixture("llava-next-tiny-real"), &[2, 4]);
}

#[test]
fn qwen2_vl_splits_over_2_ranks() {
    // 2 heads, 1 key/value head (replicated), an intermediate size of 37 (split 19 + 18).
    check(&fixture("qwen2-vl-tiny"), &[2]);
}

/// Qwen2-VL over 4 ranks needs 4 heads: the same weights read as 4 heads of 4 dimensions and 2
/// key/value heads (q/k/v keep their shapes), with M-RoPE sections for the smaller head. No HF goldens
/// for it: one rank's tokens are the reference.
#[test]
fn qwen2_vl_with_four_heads_splits_over_4_ranks() {
    let dir = four_head_qwen2_vl();
    let one = tokens(&dir, 1, false, 8192);
    assert_eq!(tokens(&dir, 4, false, 8192), one);
    assert_eq!(tokens(&dir, 4, true, 64), one);
    assert_eq!(tokens(&dir, 2, true, 8192), one);
}

/// The vision tower encoding a share of each step's images on every rank (one image per call of the
/// tower, so a batch's images spread over the ranks), or split over the ranks like the decoder (CLIP's 4
/// heads and 37 MLP features), gives the same tokens.
#[test]
fn images_encoded_on_every_rank_or_by_a_sharded_tower_give_the_same_tokens() {
    let dir = fixture("llava-tiny-real");
    let expected = hf_tokens(&dir);
    for (mode, tp) in [
        (EncoderTpMode::Data, 2),
        (EncoderTpMode::Data, 4),
        (EncoderTpMode::Weights, 2),
        (EncoderTpMode::Weights, 4),
    ] {
        let options = EngineOptions {
            tensor_parallel_size: tp,
            max_model_len: Some(4096),
            mm_encoder_tp_mode: mode,
            limit_mm_per_prompt: MultiModalLimits::parse("image=2,video=2").expect("limits"),
            // Every request in the first step, so that its three images make two calls.
            burst_wait: std::time::Duration::from_secs(2),
            ..EngineOptions::default()
        };
        let engine = Engine::new(&dir, options).expect("engine");
        assert_eq!(generate(&dir, &engine), expected, "{mode:?}, {tp} ranks");
        let elsewhere = engine
            .counters()
            .encoder_calls_on_other_ranks
            .load(Ordering::Relaxed);
        if mode == EncoderTpMode::Data {
            assert!(elsewhere > 0, "no image was encoded off rank 0");
        }
    }
}

#[test]
fn heads_that_do_not_split_are_refused_at_start_up() {
    let options = EngineOptions {
        tensor_parallel_size: 4,
        max_model_len: Some(2048),
        ..EngineOptions::default()
    };
    let dir = fixture("qwen2-vl-tiny");
    mmreg_parity::unpack_tokenizer(&dir).expect("tokenizer");
    let error = match Engine::new(&dir, options) {
        Ok(_) => panic!("2 heads over 4 ranks must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains("2 attention heads do not split over 4 tensor-parallel ranks"),
        "{error}"
    );
}

/// A copy of qwen2-vl-tiny (weights linked) whose config reads its decoder as 4 heads.
fn four_head_qwen2_vl() -> PathBuf {
    let source = fixture("qwen2-vl-tiny");
    mmreg_parity::unpack_tokenizer(&source).expect("tokenizer");
    let dir = std::env::temp_dir().join(format!("mmreg-qwen2-vl-4-heads-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    for entry in std::fs::read_dir(&source).expect("fixture") {
        let path = entry.expect("entry").path();
        let target = dir.join(path.file_name().expect("name"));
        if path.file_name().is_some_and(|n| n == "config.json") || target.exists() {
            continue;
        }
        std::os::unix::fs::symlink(&path, &target).expect("link");
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json")).expect("config"))
            .expect("json");
    let text = &mut config["text_config"];
    text["num_attention_heads"] = 4.into();
    text["num_key_value_heads"] = 2.into();
    text["rope_parameters"]["mrope_section"] = serde_json::json!([1, 1, 0]);
    std::fs::write(dir.join("config.json"), config.to_string()).expect("write");
    dir
}
