//! On a GPU: the engine with CUDA graphs (vision path, lone prefills, decode steps) generates what it
//! generates without any, at several batch sizes (so several graph buckets, padding rows included), and
//! so does it with async scheduling.
//! Skipped, with a message, on a machine without CUDA.

use mmreg_core::Prompt;
use std::io::Write;

use mmreg_engine::{Engine, EngineOptions, ImageSource, Request, SamplingParams};
use mmreg_models as _;

mod support;
use support::fixture;
use tch::{Device, Kind};

#[test]
fn cuda_graphs_generate_what_plain_steps_generate() {
    if !mmreg_engine::cuda::graphs_available() {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED CUDA graph test: CUDA graphs are not available on this machine"
        );
        return;
    }
    let dir = fixture("llava-tiny-real");
    let image = ImageSource::Path(dir.join("images/a_300x200.png"));
    let requests: Vec<Request> = (0..11)
        .map(|i| Request {
            videos: Vec::new(),
            prompt: Prompt::Text(format!("USER: <image>\nQuestion {i}? ASSISTANT:")),
            images: vec![image.clone()],
            params: SamplingParams {
                max_tokens: 8 + 3 * i,
                seed: Some(i as u64),
                temperature: if i % 3 == 0 { 0.8 } else { 0.0 },
                ..SamplingParams::default()
            },
        })
        .collect();
    let run = |graphs: bool, async_scheduling: bool| {
        // Read when the model loads (vision path) and the engine starts (steps).
        if graphs {
            std::env::remove_var("MMREG_NO_CUDA_GRAPHS");
        } else {
            std::env::set_var("MMREG_NO_CUDA_GRAPHS", "1");
        }
        let options = EngineOptions {
            device: Device::Cuda(0),
            dtype: Kind::Float,
            cuda_graphs: None,
            async_scheduling,
            ..EngineOptions::default()
        };
        let engine = Engine::new(&dir, options).expect("engine");
        engine.counters().record_steps();
        // A lone request (its prefill alone in a step), then 11 finishing at different steps: batches 11
        // down to 1 run through decode buckets 16, 8, 4, 2 and 1.
        let mut outputs = vec![
            engine
                .generate(vec![requests[0].clone()])
                .remove(0)
                .expect("completes")
                .token_ids,
        ];
        outputs.extend(
            engine
                .generate(requests.clone())
                .into_iter()
                .map(|r| r.expect("completes").token_ids),
        );
        let steps = engine.counters().take_steps();
        (outputs, steps.iter().filter(|s| s.overlapped).count())
    };
    let (plain, _) = run(false, false);
    let (graphs, _) = run(true, false);
    assert_eq!(graphs, plain);
    // Async scheduling: the greedy decode steps (once the sampled requests are done) are replayed
    // before the host has read the step before's tokens, fed them on the device.
    let (overlapped, count) = run(true, true);
    assert_eq!(overlapped, plain);
    assert!(count > 0, "no step was issued behind the one before");
    println!(
        "CUDA graphs: {} requests, {} tokens, identical to plain steps; with async scheduling too ({count} steps overlapped)",
        plain.len(),
        plain.iter().map(Vec::len).sum::<usize>()
    );
}
