//! The engine against one-at-a-time generation: batching, late arrivals, images per request, preemption,
//! sampling, bad requests and a too-small KV cache.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use mmreg_core::{
    ImageInput, LoadOptions, ModelContext, MultiModalData, ProcessorInputs, Prompt, Registry,
    Weights,
};
use mmreg_engine::generate::{generate, prepare};
use mmreg_engine::{Engine, EngineOptions, Event, ImageSource, Request, SamplingParams};
use mmreg_models as _;

mod support;
use support::fixture;

fn request(prompt: &str, images: &[PathBuf], params: SamplingParams) -> Request {
    Request {
        videos: Vec::new(),
        prompt: Prompt::Text(prompt.into()),
        images: images.iter().cloned().map(ImageSource::Path).collect(),
        params,
    }
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ..SamplingParams::default()
    }
}

/// How decode steps run: packed like any step, or in fixed shapes (what CUDA graphs replay on a GPU;
/// run without capture here), with or without async scheduling.
#[derive(Debug, Clone, Copy)]
struct DecodeMode {
    cuda_graphs: Option<bool>,
    async_scheduling: bool,
}

const PACKED: DecodeMode = DecodeMode {
    cuda_graphs: Some(false),
    async_scheduling: false,
};
const FIXED: DecodeMode = DecodeMode {
    cuda_graphs: Some(true),
    async_scheduling: false,
};
/// Each greedy decode step issued before the host has read the previous step's tokens.
const ASYNC: DecodeMode = DecodeMode {
    cuda_graphs: Some(true),
    async_scheduling: true,
};
const DECODE_MODES: [DecodeMode; 3] = [PACKED, FIXED, ASYNC];

fn with_mode(mode: DecodeMode) -> EngineOptions {
    EngineOptions {
        cuda_graphs: mode.cuda_graphs,
        async_scheduling: mode.async_scheduling,
        ..EngineOptions::default()
    }
}

/// The generated tokens of `requests` run together through `engine`.
fn token_ids(engine: &Engine, requests: &[Request]) -> Vec<Vec<u32>> {
    engine
        .generate(requests.to_vec())
        .into_iter()
        .map(|r| r.expect("completes").token_ids)
        .collect()
}

/// `requests` through the engine, both ways of running decode steps, give what one at a time gives.
fn assert_engine_matches_sequential(dir: &Path, requests: &[Request]) {
    let expected = sequential(dir, requests);
    for mode in DECODE_MODES {
        let engine = Engine::new(dir, with_mode(mode)).expect("engine");
        assert_eq!(token_ids(&engine, requests), expected, "{mode:?}");
    }
}

/// The same requests one at a time, without the engine.
fn sequential(dir: &Path, requests: &[Request]) -> Vec<Vec<u32>> {
    let ctx = ModelContext::from_dir(dir).expect("context");
    let entry = Registry::global().for_context(&ctx).expect("registered");
    let model = entry
        .load(
            &ctx,
            &Weights::from_dir(dir).expect("weights"),
            &LoadOptions::default(),
        )
        .expect("loads");
    requests
        .iter()
        .map(|r| {
            let images = r
                .images
                .iter()
                .map(|s| match s {
                    ImageSource::Path(p) => ImageInput::open(p).expect("image"),
                    _ => unreachable!("tests use paths"),
                })
                .collect();
            let inputs = ProcessorInputs {
                prompt: r.prompt.clone(),
                multimodal: MultiModalData::with_images(images),
            };
            let prepared = prepare(entry, &ctx, inputs, usize::MAX).expect("prepared");
            generate(entry, model.as_ref(), prepared, &r.params)
                .expect("generates")
                .token_ids
        })
        .collect()
}

fn llava_requests() -> Vec<Request> {
    let images = fixture("llava-tiny-real/images");
    let (a, b) = (images.join("a_300x200.png"), images.join("b_480x640.png"));
    vec![
        request(
            "USER: <image>\nWhat is shown in this image? ASSISTANT:",
            std::slice::from_ref(&a),
            greedy(12),
        ),
        request(
            "USER: <image>\n<image>\nWhat differs between these images? ASSISTANT:",
            &[a.clone(), b.clone()],
            greedy(7),
        ),
        request("USER: Say something. ASSISTANT:", &[], greedy(9)),
        request("USER: <image>\nDescribe it. ASSISTANT:", &[b], greedy(15)),
        request(
            "USER: <image>\nAnd this? ASSISTANT:",
            &[a],
            SamplingParams {
                temperature: 0.8,
                top_p: 0.9,
                top_k: 50,
                seed: Some(7),
                ..greedy(10)
            },
        ),
    ]
}

#[test]
fn batched_outputs_equal_one_at_a_time_outputs() {
    let dir = fixture("llava-tiny-real");
    let requests = llava_requests();
    assert_engine_matches_sequential(&dir, &requests);
}

#[test]
fn requests_arriving_while_others_decode_get_the_same_outputs() {
    let dir = fixture("llava-tiny-real");
    let requests = llava_requests();
    let expected = sequential(&dir, &requests);
    for mode in DECODE_MODES {
        let engine = Engine::new(&dir, with_mode(mode)).expect("engine");
        let first = engine.submit(requests[0].clone());
        // Wait until the first request is decoding, then send the rest.
        assert!(matches!(first.next_event(), Some(Event::Token(_))));
        let rest: Vec<_> = requests[1..]
            .iter()
            .cloned()
            .map(|r| engine.submit(r))
            .collect();
        let mut outputs = vec![first.wait().expect("completes").token_ids];
        outputs.extend(
            rest.into_iter()
                .map(|h| h.wait().expect("completes").token_ids),
        );
        assert_eq!(outputs, expected, "{mode:?}");
    }
}

#[test]
fn a_small_cache_queues_and_preempts_without_changing_outputs() {
    let dir = fixture("llava-tiny-real");
    let image = fixture("llava-tiny-real/images/a_300x200.png");
    let requests: Vec<Request> = ["What is it?", "Describe it.", "And now?"]
        .iter()
        .map(|q| {
            request(
                &format!("USER: <image>\n{q} ASSISTANT:"),
                std::slice::from_ref(&image),
                greedy(24),
            )
        })
        .collect();
    let expected = sequential(&dir, &requests);
    // 2 layers × 2 KV heads × 8 dims × 2 (K, V) × 4 bytes = 256 bytes per token. 76 blocks of 16 hold two
    // of these ~590-token prompts exactly; their decodes then need more blocks than are free. A long burst
    // wait makes sure that all three are preprocessed before the first step, however loaded the machine.
    for mode in DECODE_MODES {
        let options = EngineOptions {
            max_model_len: Some(1216),
            cpu_kv_cache_bytes: 1216 * 256,
            burst_wait: std::time::Duration::from_secs(30),
            ..with_mode(mode)
        };
        let engine = Engine::new(&dir, options).expect("engine");
        assert_eq!(engine.profile().kv_blocks, 76);
        assert_eq!(token_ids(&engine, &requests), expected, "{mode:?}");
        assert!(
            engine
                .counters()
                .preemptions
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0,
            "no sequence was preempted ({mode:?})"
        );
    }
}

#[test]
fn llava_next_requests_with_different_image_sizes_batch_correctly() {
    let dir = fixture("llava-next-tiny-real");
    let images = dir.join("images");
    let prompt = "[INST] <image>\nWhat is shown in this image? [/INST]";
    let requests: Vec<Request> = [
        "portrait_500x316.png",
        "tiny_10x7.png",
        "landscape_480x640.png",
    ]
    .iter()
    .map(|name| request(prompt, &[images.join(name)], greedy(6)))
    .collect();
    assert_engine_matches_sequential(&dir, &requests);
}

#[test]
fn bad_requests_fail_alone_with_clear_errors() {
    let dir = fixture("llava-tiny-real");
    let good = &llava_requests()[0];
    let engine = Engine::new(
        &dir,
        EngineOptions {
            max_model_len: Some(700),
            ..EngineOptions::default()
        },
    )
    .expect("engine");
    let broken = std::env::temp_dir().join("mmreg-engine-test-broken.png");
    std::fs::write(&broken, b"\x89PNG\r\n\x1a\ntruncated").expect("write");
    let long = "word ".repeat(800);
    let requests = vec![
        request("USER: <image>\nWhat? ASSISTANT:", &[broken], greedy(4)),
        good.clone(),
        request(
            "USER: <image>\n<image>\nTwo? ASSISTANT:",
            &[fixture("llava-tiny-real/images/a_300x200.png")],
            greedy(4),
        ),
        request(&long, &[], greedy(4)),
        request(
            "USER: five images",
            &vec![fixture("llava-tiny-real/images/a_300x200.png"); 5],
            greedy(4),
        ),
        good.clone(),
    ];
    let results = engine.generate(requests);
    let errors: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert!(
        errors[0].contains("mmreg-engine-test-broken.png"),
        "{}",
        errors[0]
    );
    assert_eq!(
        errors[1],
        "the prompt has 2 `<image>` placeholder(s) but 1 image item(s) were given"
    );
    assert!(
        errors[2].starts_with("the prompt is ") && errors[2].contains("at most 699"),
        "{}",
        errors[2]
    );
    assert!(
        errors[3].contains("5 images given but at most 4"),
        "{}",
        errors[3]
    );
    let expected = sequential(&dir, std::slice::from_ref(good));
    assert_eq!(results[1].as_ref().expect("valid").token_ids, expected[0]);
    assert_eq!(results[5].as_ref().expect("valid").token_ids, expected[0]);
}

#[test]
fn stop_strings_and_eos_end_generation() {
    let dir = fixture("llava-tiny-real");
    let engine = Engine::new(&dir, EngineOptions::default()).expect("engine");
    let full = engine
        .submit(llava_requests()[0].clone())
        .wait()
        .expect("completes");
    // Stop on the second generated token's id, and on the text of the first two tokens.
    let mut by_id = llava_requests()[0].clone();
    by_id.params.stop_token_ids = vec![full.token_ids[1]];
    let stopped = engine.submit(by_id).wait().expect("completes");
    assert_eq!(stopped.token_ids, full.token_ids[..2]);
    assert_eq!(stopped.finish_reason, mmreg_engine::FinishReason::Stop);
    let tokenizer = engine.context().tokenizer().expect("tokenizer");
    let second = tokenizer
        .decode(&full.token_ids[2..3], true)
        .expect("decodes");
    let mut by_text = llava_requests()[0].clone();
    by_text.params.stop = vec![second.trim().to_owned()];
    let stopped = engine.submit(by_text).wait().expect("completes");
    assert!(
        stopped.token_ids.len() <= 3 && !stopped.text.contains(second.trim()),
        "{stopped:?}"
    );
}

#[test]
fn async_scheduling_overlaps_greedy_decodes_and_drops_the_rows_of_stopped_sequences() {
    let dir = fixture("llava-tiny-real");
    let mut requests: Vec<Request> = llava_requests()
        .into_iter()
        .filter(|r| r.params.is_greedy())
        .collect();
    // The first request stops on its fifth token (found by a plain run): the step issued behind the one
    // that sampled it has a row for it, which must come to nothing.
    let plain = token_ids(
        &Engine::new(&dir, with_mode(FIXED)).expect("engine"),
        &requests,
    );
    requests[0].params.stop_token_ids = vec![plain[0][4]];
    let expected = sequential(&dir, &requests);
    assert!(expected[0].len() <= 5 && expected[0].len() < plain[0].len());
    for mode in [FIXED, ASYNC] {
        let engine = Engine::new(&dir, with_mode(mode)).expect("engine");
        engine.counters().record_steps();
        assert_eq!(token_ids(&engine, &requests), expected, "{mode:?}");
        let steps = engine.counters().take_steps();
        let overlapped = steps.iter().filter(|s| s.overlapped).count();
        if mode.async_scheduling {
            // The batch changes at 5 of its 15 decode steps; the rest follow the step before.
            assert!(overlapped >= 3, "{overlapped} of {} steps", steps.len());
        } else {
            assert_eq!(overlapped, 0);
        }
        // The last step's sequences all stopped: nothing stays held.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while engine.counters().kv_blocks_used.load(Ordering::Relaxed) > 0 {
            assert!(std::time::Instant::now() < deadline, "blocks still held");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

#[test]
fn a_cache_too_small_for_one_sequence_is_reported_at_startup() {
    let options = EngineOptions {
        cpu_kv_cache_bytes: 64 * 256,
        ..EngineOptions::default()
    };
    let error = Engine::new(fixture("llava-tiny-real"), options)
        .err()
        .expect("too small")
        .to_string();
    assert!(
        error.starts_with("the KV cache holds 64 tokens (4 blocks of 16"),
        "{error}"
    );
    assert!(error.contains("max_model_len = 4096"), "{error}");
}
