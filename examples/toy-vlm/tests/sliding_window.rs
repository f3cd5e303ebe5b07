//! Sliding-window attention (`mmreg_nn::Attention::with_sliding_window`, as Mistral's and Gemma 3's local
//! layers): the toy with `"sliding_window": 5` in its config. Its prefill logits equal a dense reference
//! with HF's window mask, and the engine (batched decodes attending in one gathered call, fixed-shape
//! decode steps, chunked prefill) generates what one-at-a-time generation does.

mod support;

use mmreg_core::{LoadOptions, ModelContext, MultiModalData, ProcessorInputs, Prompt, Weights};
use mmreg_engine::generate::{embed_prompt, generate, prefill_logits, prepare};
use mmreg_engine::{Engine, EngineOptions, Request, SamplingParams};
use tch::{Kind, Tensor};
use toy_vlm as _;

const WINDOW: i64 = 5;

fn checkpoint() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    support::write_checkpoint(dir.path(), 5).expect("checkpoint");
    let path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("config")).expect("json");
    config["sliding_window"] = WINDOW.into();
    std::fs::write(&path, config.to_string()).expect("config");
    dir
}

fn prompt(i: u32) -> Vec<u32> {
    (0..9 + i).map(|t| (t * 7 + i) % 14 + 1).collect()
}

#[test]
fn prefill_logits_equal_a_dense_reference_with_the_window() {
    let _guard = tch::no_grad_guard();
    let dir = checkpoint();
    let (ctx, entry, model) = support::load(dir.path());
    let inputs = ProcessorInputs {
        prompt: Prompt::TokenIds(prompt(3)),
        multimodal: MultiModalData::default(),
    };
    let prepared = prepare(entry, &ctx, inputs, 256).expect("prepared");
    let embeds = embed_prompt(entry, model.as_ref(), prepared).expect("embeds");
    let got = prefill_logits(model.as_ref(), &embeds).expect("logits");

    let len = embeds.size()[0];
    let q = Tensor::arange(len, (Kind::Int64, tch::Device::Cpu)).view([-1, 1]);
    let k = Tensor::arange(len, (Kind::Int64, tch::Device::Cpu)).view([1, -1]);
    let allowed = k.le_tensor(&q).logical_and(&(&q - &k).lt(WINDOW));
    let want = support::dense_toy_logits(dir.path(), &embeds, &allowed);
    let diff = (&got - &want).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "max |Δ| = {diff}");
    // Past the window the mask matters: the same weights without it attend to every earlier key.
    let mut config = ctx.config_json().clone();
    config["sliding_window"] = serde_json::Value::Null;
    let plain = ModelContext::from_json(config, serde_json::json!({}));
    let full = entry
        .load(&plain, &Weights::from_dir(dir.path()).expect("weights"), &LoadOptions::default())
        .expect("loads");
    let full = prefill_logits(full.as_ref(), &embeds).expect("logits");
    let later = (&full - &got).narrow(0, WINDOW, len - WINDOW).abs().max().double_value(&[]);
    assert!(later > 1e-3, "the window changed nothing: {later}");
}

#[test]
fn the_engine_generates_what_generate_does_with_a_window() {
    let dir = checkpoint();
    let (ctx, entry, model) = support::load(dir.path());
    let params = SamplingParams { max_tokens: 10, ..SamplingParams::default() };
    let want: Vec<Vec<u32>> = (0..6)
        .map(|i| {
            let inputs = ProcessorInputs {
                prompt: Prompt::TokenIds(prompt(i)),
                multimodal: MultiModalData::default(),
            };
            let prepared = prepare(entry, &ctx, inputs, 256).expect("prepared");
            generate(entry, model.as_ref(), prepared, &params).expect("generates").token_ids
        })
        .collect();
    let requests: Vec<Request> = (0..6)
        .map(|i| Request {
            prompt: Prompt::TokenIds(prompt(i)),
            images: Vec::new(),
            videos: Vec::new(),
            params: params.clone(),
        })
        .collect();
    for (budget, cuda_graphs) in [(4, Some(false)), (64, Some(true)), (64, Some(false))] {
        let options = EngineOptions {
            max_num_batched_tokens: budget,
            cuda_graphs,
            ..EngineOptions::default()
        };
        let engine = Engine::new(dir.path(), options).expect("engine");
        let got: Vec<Vec<u32>> = engine
            .generate(requests.clone())
            .into_iter()
            .map(|r| r.expect("completes").token_ids)
            .collect();
        assert_eq!(got, want, "budget {budget}, fixed shapes {cuda_graphs:?}");
    }
}
