//! `enable_chunked_prefill` (vLLM's `--enable-chunked-prefill`): on, a step's last prompt is split to
//! fill the step's budget; off, a prompt that fits in a step waits for a step with room for all of it,
//! and only a prompt longer than the budget is still split. Both generate what one-at-a-time generation
//! does.

mod support;

use mmreg_core::{MultiModalData, ProcessorInputs, Prompt};
use mmreg_engine::generate::{generate, prepare};
use mmreg_engine::{Engine, EngineOptions, Request, SamplingParams};
use toy_vlm as _;

const BUDGET: usize = 100;

/// Three prompts of 40 tokens and one of 130, longer than a step.
fn prompts() -> Vec<Vec<u32>> {
    [40u32, 40, 40, 130]
        .iter()
        .enumerate()
        .map(|(i, &len)| (0..len).map(|t| (t * 5 + i as u32) % 14 + 1).collect())
        .collect()
}

#[test]
fn without_chunked_prefill_a_prompt_that_fits_a_step_is_never_split() {
    let dir = tempfile::tempdir().expect("temp dir");
    support::write_checkpoint(dir.path(), 7).expect("checkpoint");
    let (ctx, entry, model) = support::load(dir.path());
    let params = SamplingParams { max_tokens: 6, ..SamplingParams::default() };
    let want: Vec<Vec<u32>> = prompts()
        .into_iter()
        .map(|prompt| {
            let inputs = ProcessorInputs {
                prompt: Prompt::TokenIds(prompt),
                multimodal: MultiModalData::default(),
            };
            let prepared = prepare(entry, &ctx, inputs, 256).expect("prepared");
            generate(entry, model.as_ref(), prepared, &params).expect("generates").token_ids
        })
        .collect();
    let requests: Vec<Request> = prompts()
        .into_iter()
        .map(|prompt| Request {
            prompt: Prompt::TokenIds(prompt),
            images: Vec::new(),
            videos: Vec::new(),
            params: params.clone(),
        })
        .collect();
    // The prompt tokens of each step that prefilled any.
    let prefills = |chunked: bool| -> Vec<usize> {
        let options = EngineOptions {
            max_num_batched_tokens: BUDGET,
            enable_chunked_prefill: chunked,
            // The four requests share the first step.
            burst_wait: std::time::Duration::from_secs(5),
            ..EngineOptions::default()
        };
        let engine = Engine::new(dir.path(), options).expect("engine");
        engine.counters().record_steps();
        let got: Vec<Vec<u32>> = engine
            .generate(requests.clone())
            .into_iter()
            .map(|r| r.expect("completes").token_ids)
            .collect();
        assert_eq!(got, want, "chunked prefill {chunked}");
        let steps = engine.counters().take_steps();
        steps.iter().map(|s| s.prefill_tokens).filter(|&n| n > 0).collect()
    };
    // On: the first step fills its budget with the first two prompts and 20 tokens of the third.
    let on = prefills(true);
    assert_eq!(on[0], BUDGET, "{on:?}");
    // Off: the third waits for the next step, where it goes whole beside the two decodes, and the fourth,
    // longer than any step, takes the rest of that step and then the rest of itself.
    let off = prefills(false);
    assert_eq!(off[..2], [80, 40 + (BUDGET - 2 - 40)], "{off:?}");
    assert_eq!(off.iter().sum::<usize>(), 250, "{off:?}");
}
