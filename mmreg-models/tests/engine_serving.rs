//! What a server needs from the engine: cancelling a request frees its KV-cache blocks, log-probabilities
//! of the generated tokens, and checkpoints as transformers 5 and the hub lay them out
//! (processor_config.json without preprocessor_config.json, generation_config.json's EOS ids).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mmreg_core::{ModelContext, Prompt};
use mmreg_engine::{
    Engine, EngineOptions, Event, GenerationConfig, ImageSource, Request, SamplingParams,
};
use mmreg_models as _;

mod support;
use support::fixture;

const PROMPT: &str = "USER: <image>\nWhat is shown in this image? ASSISTANT:";

fn image() -> PathBuf {
    fixture("llava-tiny-real/images/a_300x200.png")
}

fn request(params: SamplingParams) -> Request {
    Request {
        videos: Vec::new(),
        prompt: Prompt::Text(PROMPT.into()),
        images: vec![ImageSource::Path(image())],
        params,
    }
}

/// HF's 20 greedy tokens for `PROMPT` with image A.
fn hf_tokens() -> Vec<u32> {
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("llava-tiny-real/golden.json")).expect("golden"),
    )
    .expect("json");
    serde_json::from_value(golden["cases"]["one_image"]["generated"].clone()).expect("ids")
}

/// Waits (bounded) until the scheduler has published a state that satisfies `done`.
fn wait_for(engine: &Engine, what: &str, done: impl Fn(&Engine) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done(engine) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        // Polling the published state (not spinning: the engine needs the cores).
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The default engine, and one whose greedy decode steps are issued before the previous step's tokens
/// are read (async scheduling, over fixed-shape steps).
fn engines() -> [EngineOptions; 2] {
    [
        EngineOptions::default(),
        EngineOptions {
            cuda_graphs: Some(true),
            async_scheduling: true,
            ..EngineOptions::default()
        },
    ]
}

#[test]
fn cancelling_a_request_frees_its_blocks_and_leaves_the_others_alone() {
    for options in engines() {
        cancel_one_of_two(options);
    }
}

fn cancel_one_of_two(options: EngineOptions) {
    let engine = Engine::new(fixture("llava-tiny-real"), options).expect("engine");
    let counters = engine.counters();
    let long = SamplingParams {
        max_tokens: 3000,
        ..SamplingParams::default()
    };
    let doomed = engine.submit(request(long));
    let kept = engine.submit(request(SamplingParams {
        max_tokens: 20,
        ..SamplingParams::default()
    }));
    assert!(matches!(doomed.next_event(), Some(Event::Token(_))));
    wait_for(&engine, "blocks in use", |e| {
        e.counters().kv_blocks_used.load(Ordering::Relaxed) > 0
    });
    doomed.cancel();
    // The doomed stream ends without a Finished event.
    while let Some(event) = doomed.next_event() {
        assert!(matches!(event, Event::Token(_)), "{event:?}");
    }
    assert_eq!(kept.wait().expect("completes").token_ids, hf_tokens());
    wait_for(&engine, "the blocks to be freed", |e| {
        e.counters().kv_blocks_used.load(Ordering::Relaxed) == 0
            && e.counters().running.load(Ordering::Relaxed) == 0
    });
    assert_eq!(counters.cancelled.load(Ordering::Relaxed), 1);
}

#[test]
fn dropping_a_handle_cancels_its_request() {
    for options in engines() {
        drop_a_handle(options);
    }
}

fn drop_a_handle(options: EngineOptions) {
    let engine = Engine::new(fixture("llava-tiny-real"), options).expect("engine");
    let handle = engine.submit(request(SamplingParams {
        max_tokens: 3000,
        ..SamplingParams::default()
    }));
    assert!(matches!(handle.next_event(), Some(Event::Token(_))));
    drop(handle);
    wait_for(&engine, "the request to be dropped", |e| {
        e.counters().cancelled.load(Ordering::Relaxed) == 1
            && e.counters().kv_blocks_used.load(Ordering::Relaxed) == 0
    });
    assert!(engine.counters().steps.load(Ordering::Relaxed) < 3000);
}

#[test]
fn logprobs_are_the_model_distribution_at_each_generated_token() {
    let engine = Engine::new(fixture("llava-tiny-real"), EngineOptions::default()).expect("engine");
    let handle = engine.submit(request(SamplingParams {
        max_tokens: 5,
        logprobs: true,
        top_logprobs: 3,
        ..SamplingParams::default()
    }));
    let mut streamed = Vec::new();
    let completion = loop {
        match handle.next_event().expect("an event") {
            Event::Logprobs(lp) => streamed.push(lp),
            Event::Token(id) => assert_eq!(streamed.last().map(|lp| lp.token), Some(id)),
            Event::Finished(completion) => break completion,
            Event::Failed(error) => panic!("{error}"),
        }
    };
    assert_eq!(completion.logprobs, streamed);
    assert_eq!(completion.token_ids, hf_tokens()[..5]);
    for lp in &completion.logprobs {
        // Greedy: the chosen token is the most likely one, and the top three are in order.
        assert_eq!(lp.top[0], (lp.token, lp.logprob));
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1), "{lp:?}");
        let mass: f32 = lp.top.iter().map(|&(_, l)| l.exp()).sum();
        assert!(lp.logprob < 0.0 && mass <= 1.0 + 1e-5, "{lp:?}");
    }
    // HF's logits at the last prompt position: log p(first token) = logit − logsumexp.
    let golden = tch::Tensor::read_safetensors(fixture("llava-tiny-real/golden.safetensors"))
        .expect("golden");
    let get = |name: &str| &golden.iter().find(|(n, _)| n == name).expect(name).1;
    let last = get("one_image.logits_lse").size()[0] - 1;
    let lse = get("one_image.logits_lse").double_value(&[last]);
    let argmax = get("one_image.logits_argmax").int64_value(&[last]);
    assert_eq!(argmax as u32, completion.token_ids[0]);
    let positions = Vec::<i64>::try_from(get("one_image.logit_positions")).expect("positions");
    let row = positions
        .iter()
        .position(|&p| p == last)
        .expect("last position stored") as i64;
    let logit = get("one_image.logits").double_value(&[row, argmax]);
    let hf = (logit - lse) as f32;
    assert!(
        (completion.logprobs[0].logprob - hf).abs() < 1e-4,
        "{} vs HF {hf}",
        completion.logprobs[0].logprob
    );
}

/// A copy of llava-tiny-real as transformers 5 `save_pretrained` lays out the processor: its settings
/// nested in processor_config.json (written by transformers 5.17 from this checkpoint's processor) and
/// no preprocessor_config.json.
fn transformers5_layout(dir: &Path) {
    let source = fixture("llava-tiny-real");
    for entry in std::fs::read_dir(&source).expect("fixture") {
        let entry = entry.expect("entry");
        let name = entry.file_name();
        if name == "preprocessor_config.json" || name == "processor_config.json" {
            continue;
        }
        std::os::unix::fs::symlink(entry.path(), dir.join(&name)).expect("link");
    }
    std::fs::copy(
        fixture("transformers5-layout/processor_config.json"),
        dir.join("processor_config.json"),
    )
    .expect("copy");
}

#[test]
fn a_transformers5_checkpoint_generates_what_hf_does() {
    let dir = tempfile::tempdir().expect("temp dir");
    transformers5_layout(dir.path());
    assert!(!dir.path().join("preprocessor_config.json").exists());
    let engine = Engine::new(dir.path(), EngineOptions::default()).expect("loads");
    let completion = engine
        .submit(request(SamplingParams {
            max_tokens: 20,
            ..SamplingParams::default()
        }))
        .wait()
        .expect("completes");
    assert_eq!(completion.token_ids, hf_tokens());
}

#[test]
fn generation_config_eos_ids_stop_generation() {
    let ctx = ModelContext::from_dir(fixture("llava-tiny-real")).expect("context");
    let config = GenerationConfig::from_context(&ctx).expect("generation config");
    assert_eq!(config.eos_token_ids, vec![2]);
    // A generated token as EOS, written as a list the way Qwen2-VL's file has it: generation stops there.
    let dir = tempfile::tempdir().expect("temp dir");
    transformers5_layout(dir.path());
    let eos = hf_tokens()[3];
    std::fs::remove_file(dir.path().join("generation_config.json")).expect("unlink");
    std::fs::write(
        dir.path().join("generation_config.json"),
        serde_json::json!({ "eos_token_id": [99999, eos] }).to_string(),
    )
    .expect("write");
    let ctx = ModelContext::from_dir(dir.path()).expect("context");
    let params = GenerationConfig::from_context(&ctx)
        .expect("generation config")
        .default_params(&SamplingParams {
            max_tokens: 20,
            ..SamplingParams::default()
        });
    let engine = Engine::new(dir.path(), EngineOptions::default()).expect("loads");
    let completion = engine.submit(request(params)).wait().expect("completes");
    assert_eq!(completion.token_ids, hf_tokens()[..4]);
    assert_eq!(completion.finish_reason, mmreg_engine::FinishReason::Stop);
}

#[test]
fn the_default_cpu_cache_holds_the_sequence_slots() {
    let engine = Engine::new(
        fixture("llava-tiny-real"),
        EngineOptions {
            max_model_len: Some(1024),
            max_num_seqs: 4,
            ..EngineOptions::default()
        },
    )
    .expect("engine");
    // No size given: room for max_num_seqs sequences of max_model_len, not a fixed GiB.
    assert_eq!(
        engine.profile().kv_blocks * engine.profile().block_size,
        4 * 1024
    );
}
