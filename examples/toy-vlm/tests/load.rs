//! Load test: 1000 concurrent requests, valid and invalid, through one engine. Every request gets its
//! result or its error exactly once, valid outputs equal their one-at-a-time outputs, and a second round
//! does not grow the process's memory.

mod support;

use toy_vlm as _; // links the toy's registrations

use mmreg_core::{
    ImageInput, LoadOptions, ModelContext, MultiModalData, ProcessorInputs, Prompt, Registry,
    Weights,
};
use mmreg_engine::generate::{generate, prepare};
use mmreg_engine::{Engine, EngineOptions, ImageSource, Request, SamplingParams};

fn png(width: u32, height: u32, shade: u8) -> Vec<u8> {
    let mut bytes = Vec::new();
    image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([shade, (x * 7) as u8, (y * 5) as u8])
    })
    .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
    .expect("encodes");
    bytes
}

/// Request `i`: valid ones vary their prompt, images and sampling; every fifth is broken in some way.
fn request(i: usize) -> (Request, bool) {
    let image = |k: usize| ImageSource::Bytes {
        name: format!("image {k}"),
        bytes: png(8 + (k % 5) as u32 * 4, 8 + (k % 3) as u32 * 8, k as u8),
    };
    let params = SamplingParams {
        max_tokens: 1 + i % 6,
        temperature: if i.is_multiple_of(3) { 0.7 } else { 0.0 },
        seed: Some(i as u64),
        ..SamplingParams::default()
    };
    let ids = |n: usize| (0..n).map(|k| 1 + ((i + k) % 13) as u32).collect::<Vec<u32>>();
    match i % 10 {
        0 => (
            Request {
                videos: Vec::new(),
                prompt: Prompt::TokenIds(vec![15, 2]),
                images: vec![],
                params,
            },
            false,
        ), // marker, no image
        5 => (
            Request {
                videos: Vec::new(),
                prompt: Prompt::TokenIds(vec![15, 3]),
                images: vec![ImageSource::Bytes {
                    name: "broken".into(),
                    bytes: b"\x89PNG\r\n\x1a\nxx".to_vec(),
                }],
                params,
            },
            false,
        ),
        7 if i % 20 == 7 => (
            Request {
                videos: Vec::new(),
                prompt: Prompt::TokenIds(ids(300)),
                images: vec![],
                params,
            },
            false,
        ), // over max_model_len
        1 | 4 => {
            let mut prompt = vec![15];
            prompt.extend(ids(3));
            prompt.push(15);
            (
                Request {
                    videos: Vec::new(),
                    prompt: Prompt::TokenIds(prompt),
                    images: vec![image(i), image(i + 1)],
                    params,
                },
                true,
            )
        }
        _ => {
            let mut prompt = ids(2 + i % 4);
            prompt.insert(1, 15);
            (
                Request {
                    videos: Vec::new(),
                    prompt: Prompt::TokenIds(prompt),
                    images: vec![image(i)],
                    params,
                },
                true,
            )
        }
    }
}

fn sequential(ctx: &ModelContext, dir: &std::path::Path, request: Request) -> Vec<u32> {
    let entry = Registry::global().for_context(ctx).expect("registered");
    let model = entry
        .load(ctx, &Weights::from_dir(dir).expect("weights"), &LoadOptions::default())
        .expect("loads");
    let images = request
        .images
        .into_iter()
        .map(|s| match s {
            ImageSource::Bytes { name, bytes } => {
                ImageInput::decode(name, &bytes).expect("valid image")
            }
            _ => unreachable!("the load test sends bytes"),
        })
        .collect();
    let inputs =
        ProcessorInputs { prompt: request.prompt, multimodal: MultiModalData::with_images(images) };
    let prepared = prepare(entry, ctx, inputs, usize::MAX).expect("prepared");
    generate(entry, model.as_ref(), prepared, &request.params).expect("generates").token_ids
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).unwrap_or(0) * 4096
}

#[test]
fn a_thousand_concurrent_requests_each_get_their_answer() {
    let dir = tempfile::tempdir().expect("temp dir");
    support::write_checkpoint(dir.path(), 11).expect("checkpoint");
    let options =
        EngineOptions { cpu_kv_cache_bytes: 8 << 20, max_num_seqs: 32, ..EngineOptions::default() };
    let engine = Engine::new(dir.path(), options).expect("engine");
    let ctx = ModelContext::from_dir(dir.path()).expect("context");
    let mut rounds = Vec::new();
    for _round in 0..2 {
        let handles: Vec<_> = (0..1000).map(|i| engine.submit(request(i).0)).collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.wait()).collect();
        assert_eq!(results.len(), 1000);
        for (i, result) in results.iter().enumerate() {
            let (_, valid) = request(i);
            assert_eq!(result.is_ok(), valid, "request {i}: {result:?}");
        }
        // Valid outputs equal their one-at-a-time outputs (a sample, to keep the test quick).
        for i in (0..1000).filter(|i| request(*i).1).step_by(37) {
            let expected = sequential(&ctx, dir.path(), request(i).0);
            assert_eq!(results[i].as_ref().expect("valid").token_ids, expected, "request {i}");
        }
        rounds.push(resident_bytes());
    }
    let growth = rounds[1].saturating_sub(rounds[0]);
    assert!(
        growth < 32 << 20,
        "resident memory grew by {growth} bytes in the second round ({rounds:?})"
    );
}
