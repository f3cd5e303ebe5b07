//! `enable_chunked_prefill` (vLLM's `--enable-chunked-prefill`): on, a prompt is split to fill what is
//! left of a step's budget where that lets a waiting prompt finish a step sooner; off, a prompt that
//! fits in a step waits for a step with room for all of it, and only a prompt longer than the budget is
//! still split. Both generate what one-at-a-time generation does. (Requests go in one at a time, each
//! once the one before has its first token, or together as a burst of prompts of one length: which
//! requests share a first step otherwise depends on when their preprocessing ends.)

mod support;

use mmreg_core::{MultiModalData, ProcessorInputs, Prompt};
use mmreg_engine::generate::{generate, prepare};
use mmreg_engine::{Engine, EngineOptions, Event, Request, SamplingParams};
use toy_vlm as _;

const BUDGET: usize = 100;

/// A prompt of `len` tokens, the `i`-th of its test, generating `max_tokens`.
fn request(i: u32, len: u32, max_tokens: usize) -> Request {
    Request {
        prompt: Prompt::TokenIds((0..len).map(|t| (t * 5 + i) % 14 + 1).collect()),
        images: Vec::new(),
        videos: Vec::new(),
        params: SamplingParams { max_tokens, ..SamplingParams::default() },
    }
}

/// What one-at-a-time generation gives for `request`.
fn alone(dir: &std::path::Path, request: &Request) -> Vec<u32> {
    let (ctx, entry, model) = support::load(dir);
    let inputs =
        ProcessorInputs { prompt: request.prompt.clone(), multimodal: MultiModalData::default() };
    let prepared = prepare(entry, &ctx, inputs, 256).expect("prepared");
    generate(entry, model.as_ref(), prepared, &request.params).expect("generates").token_ids
}

/// `requests` through an engine with the step budget and `chunked`, each submitted once the one before
/// has its first token; their tokens must be one-at-a-time generation's. The prompt tokens of each
/// step that prefilled any.
fn prefills(dir: &std::path::Path, requests: &[Request], chunked: bool) -> Vec<usize> {
    let options = EngineOptions {
        max_num_batched_tokens: BUDGET,
        enable_chunked_prefill: chunked,
        ..EngineOptions::default()
    };
    let engine = Engine::new(dir, options).expect("engine");
    engine.counters().record_steps();
    let mut handles: Vec<mmreg_engine::RequestHandle> = Vec::new();
    for request in requests {
        if let Some(before) = handles.last() {
            assert!(matches!(before.next_event(), Some(Event::Token(_))), "a first token");
        }
        handles.push(engine.submit(request.clone()));
    }
    for (handle, request) in handles.into_iter().zip(requests) {
        let tokens = handle.wait().expect("completes").token_ids;
        assert_eq!(tokens, alone(dir, request), "chunked prefill {chunked}");
    }
    let steps = engine.counters().take_steps();
    steps.iter().map(|s| s.prefill_tokens).filter(|&n| n > 0).collect()
}

/// `requests`, all of one prompt length, submitted together to an idle engine (`Engine::generate`: its
/// first step waits for the whole burst); their tokens must be one-at-a-time generation's. The prompt
/// tokens of each step that prefilled any.
fn burst(dir: &std::path::Path, requests: &[Request], chunked: bool) -> Vec<usize> {
    let options = EngineOptions {
        max_num_batched_tokens: BUDGET,
        enable_chunked_prefill: chunked,
        // Long enough for three token prompts' preprocessing on a loaded machine.
        burst_wait: std::time::Duration::from_secs(2),
        ..EngineOptions::default()
    };
    let engine = Engine::new(dir, options).expect("engine");
    engine.counters().record_steps();
    for (result, request) in engine.generate(requests.to_vec()).into_iter().zip(requests) {
        let tokens = result.expect("completes").token_ids;
        assert_eq!(tokens, alone(dir, request), "chunked prefill {chunked}");
    }
    let steps = engine.counters().take_steps();
    steps.iter().map(|s| s.prefill_tokens).filter(|&n| n > 0).collect()
}

fn checkpoint() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    support::write_checkpoint(dir.path(), 7).expect("checkpoint");
    dir
}

/// A prompt of the whole budget arrives while another request decodes: on, it takes the 99 tokens the
/// decode leaves and its last one in the next step; off, it waits for a step with room for all 100 (here
/// once the other request is done).
#[test]
fn without_chunked_prefill_a_prompt_that_fits_a_step_waits_for_room() {
    let dir = checkpoint();
    let requests = [request(0, 40, 150), request(1, BUDGET as u32, 6)];
    assert_eq!(prefills(dir.path(), &requests, true), [40, 99, 1]);
    assert_eq!(prefills(dir.path(), &requests, false), [40, 100]);
}

/// A prompt longer than any step is split with chunked prefill off too (vLLM would refuse it).
#[test]
fn a_prompt_longer_than_a_step_is_split_either_way() {
    let dir = checkpoint();
    let long = [request(3, 130, 6)];
    assert_eq!(prefills(dir.path(), &long, false), [100, 30]);
    assert_eq!(prefills(dir.path(), &long, true), [100, 30]);
}

/// Three 60-token prompts at once: splitting the second to fill the first step lets the third finish
/// in the second step (100 + 80 tokens); kept whole, each would take a step of its own. Three 40-token
/// prompts: the third finishes in the second step whether or not 20 of its tokens go in the first, so
/// it is not split (80 + 40, no tail attending to its cached head).
#[test]
fn chunked_prefill_splits_a_prompt_only_where_a_waiting_prompt_then_finishes_sooner() {
    let dir = checkpoint();
    let sixties: Vec<Request> = (0..3).map(|i| request(i, 60, 6)).collect();
    assert_eq!(burst(dir.path(), &sixties, true), [100, 80]);
    assert_eq!(burst(dir.path(), &sixties, false), [60, 60, 60]);
    let forties: Vec<Request> = (0..3).map(|i| request(i, 40, 6)).collect();
    assert_eq!(burst(dir.path(), &forties, true), [80, 40]);
    assert_eq!(burst(dir.path(), &forties, false), [80, 40]);
}
