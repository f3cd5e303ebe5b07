//! Prefix caching, the encoder cache and chunked prefill (CPU, f32, the tiny LLaVA-1.5 and LLaVA-NeXT
//! checkpoints with real tokenizers): they change how much is computed, never what is generated.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mmreg_core::{ModelContext, Prompt};
use mmreg_engine::{Engine, EngineOptions, Event, ImageSource, Request, SamplingParams};
use mmreg_models as _;

mod support;
use support::fixture;

const IMAGES: [&str; 5] = [
    "astronaut.png",
    "chelsea.png",
    "next_500x316.png",
    "odd_337x500.png",
    "tall_up_700x300.png",
];

/// Five ways to start a prompt before its image: requests with the same prefix and image share blocks.
const PREFIXES: [&str; 5] = [
    "",
    "A chat between a curious human and an artificial intelligence assistant. ",
    "You describe pictures in a few exact words. ",
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful answers. ",
    "Answer briefly. ",
];

const QUESTIONS: [&str; 3] = [
    "What is shown in this image?",
    "What is shown in this image? Name the colours too.",
    "Describe it.",
];

fn image(name: &str) -> PathBuf {
    fixture("images").join(name)
}

fn request(prompt: String, images: &[PathBuf], max_tokens: usize) -> Request {
    Request {
        videos: Vec::new(),
        prompt: Prompt::Text(prompt),
        images: images.iter().cloned().map(ImageSource::Path).collect(),
        params: SamplingParams {
            max_tokens,
            ..SamplingParams::default()
        },
    }
}

/// A small deterministic generator (xorshift), so that every run draws the same interleaving.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Caching off, whole prompts in one step: what every other run must generate.
fn plain() -> EngineOptions {
    EngineOptions {
        prefix_caching: false,
        encoder_cache_bytes: 0,
        max_num_batched_tokens: 16384,
        ..EngineOptions::default()
    }
}

/// Prefix caching, the encoder cache and chunks of `budget` tokens.
fn cached(budget: usize) -> EngineOptions {
    EngineOptions {
        max_num_batched_tokens: budget,
        ..EngineOptions::default()
    }
}

/// Bytes of KV cache per token of a checkpoint (from an engine's profile).
fn kv_bytes_per_token(dir: &Path) -> usize {
    let engine = Engine::new(dir, plain()).expect("engine");
    let p = engine.profile();
    p.kv_cache_bytes as usize / (p.kv_blocks * p.block_size)
}

struct Run {
    tokens: Vec<Vec<u32>>,
    cached_tokens: usize,
    preemptions: usize,
    encoder_hits: usize,
    encoder_misses: usize,
}

/// `waves` of requests, each wave submitted together a few milliseconds after the one before (while it
/// still runs), with a KV cache small enough that sequences are preempted.
fn run(dir: &Path, options: EngineOptions, waves: &[(Vec<Request>, u64)]) -> Run {
    let engine = Engine::new(dir, options).expect("engine");
    let mut handles = Vec::new();
    for (wave, pause_ms) in waves {
        handles.extend(wave.iter().cloned().map(|r| engine.submit(r)));
        std::thread::sleep(Duration::from_millis(*pause_ms));
    }
    let completions: Vec<_> = handles
        .into_iter()
        .map(|h| h.wait().expect("completes"))
        .collect();
    let lengths = completions.iter().map(|c| c.prompt_tokens);
    eprintln!(
        "prompts of {} to {} tokens",
        lengths.clone().min().unwrap_or(0),
        lengths.max().unwrap_or(0)
    );
    let c = engine.counters();
    let load = |a: &std::sync::atomic::AtomicUsize| a.load(std::sync::atomic::Ordering::Relaxed);
    Run {
        cached_tokens: completions.iter().map(|c| c.cached_tokens).sum(),
        tokens: completions.into_iter().map(|c| c.token_ids).collect(),
        preemptions: load(&c.preemptions),
        encoder_hits: load(&c.encoder_cache_hits),
        encoder_misses: load(&c.encoder_cache_misses),
    }
}

/// 200 requests (5 images × 5 prefixes × 3 questions, drawn at random), arriving in random waves.
fn interleavings(format: impl Fn(&str, &str) -> String, seed: u64) -> Vec<(Vec<Request>, u64)> {
    let mut rng = Rng(seed);
    let mut waves = Vec::new();
    let mut left = 200;
    while left > 0 {
        let n = (1 + rng.below(12)).min(left);
        left -= n;
        let wave = (0..n)
            .map(|_| {
                let prompt = format(PREFIXES[rng.below(5)], QUESTIONS[rng.below(3)]);
                let max_tokens = 1 + rng.below(40);
                request(prompt, &[image(IMAGES[rng.below(5)])], max_tokens)
            })
            .collect();
        waves.push((wave, rng.below(15) as u64));
    }
    waves
}

/// `max_model_len` a little over the longest prompt, and a KV cache of `cache_tokens`: room for about
/// two prompts, so that sequences admitted together run out of blocks as they decode and are preempted.
fn assert_caching_changes_nothing(
    dir: &Path,
    format: impl Fn(&str, &str) -> String,
    seed: u64,
    (max_model_len, cache_tokens): (usize, usize),
) {
    let waves = interleavings(format, seed);
    let per_token = kv_bytes_per_token(dir);
    let small = |mut options: EngineOptions| {
        options.max_model_len = Some(max_model_len);
        options.cpu_kv_cache_bytes = per_token * cache_tokens;
        options
    };
    let expected = run(dir, small(plain()), &waves);
    assert_eq!(expected.cached_tokens, 0);
    for (budget, cuda_graphs) in [(256, Some(true)), (8192, None)] {
        let mut options = small(cached(budget));
        options.cuda_graphs = cuda_graphs;
        let got = run(dir, options, &waves);
        for (i, (got, want)) in got.tokens.iter().zip(&expected.tokens).enumerate() {
            assert_eq!(got, want, "request {i}, chunks of {budget}");
        }
        if budget == 256 {
            // Short chunks keep more sequences half-prefilled, holding blocks: the pool runs dry.
            assert!(got.preemptions > 0, "chunks of {budget}: no preemption");
        }
        assert!(got.cached_tokens > 0, "chunks of {budget}: no prefix hit");
        assert!(got.encoder_hits > 0, "chunks of {budget}: no encoder hit");
        // 5 distinct images: encoded at most once each while the cache holds them all.
        assert_eq!(got.encoder_misses, 5, "chunks of {budget}");
        eprintln!(
            "{}: chunks of {budget}: {} prompt tokens from the prefix cache, encoder {} hits / {} misses, {} preemptions (plain run: {} preemptions)",
            dir.display(),
            got.cached_tokens,
            got.encoder_hits,
            got.encoder_misses,
            got.preemptions,
            expected.preemptions
        );
    }
}

#[test]
fn caching_and_chunks_generate_what_the_plain_engine_does_llava() {
    assert_caching_changes_nothing(
        &fixture("llava-tiny-real"),
        |prefix, question| format!("{prefix}USER: <image>\n{question} ASSISTANT:"),
        0x9e37_79b9_7f4a_7c15,
        (700, 1300),
    );
}

#[test]
fn caching_and_chunks_generate_what_the_plain_engine_does_llava_next() {
    assert_caching_changes_nothing(
        &fixture("llava-next-tiny-real"),
        |prefix, question| format!("[INST] {prefix}<image>\n{question} [/INST]"),
        0xd1b5_4a32_d192_ed03,
        (3100, 4500),
    );
}

/// Expanded prompt ids as the LLaVA-1.5 processor makes them (576 tokens per image).
fn expanded(ctx: &ModelContext, text: &str) -> Vec<u32> {
    let ids = ctx
        .tokenizer()
        .expect("tokenizer")
        .encode(text, true)
        .expect("encodes")
        .get_ids()
        .to_vec();
    ids.into_iter()
        .flat_map(|id| std::iter::repeat_n(id, if id == 32000 { 576 } else { 1 }))
        .collect()
}

#[test]
fn a_seen_image_is_not_encoded_again_and_a_new_one_shares_no_block_past_its_placeholder() {
    let dir = fixture("llava-tiny-real");
    let ctx = ModelContext::from_dir(&dir).expect("context");
    let engine = Engine::new(&dir, EngineOptions::default()).expect("engine");
    let block = engine.profile().block_size;
    let counters = engine.counters();
    let misses = || {
        counters
            .encoder_cache_misses
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let first = "USER: <image>\nWhat is shown in this image? ASSISTANT:";
    let longer = "USER: <image>\nWhat is shown in this image? Name the colours, the shapes and where each one is. ASSISTANT:";
    let (x, y) = (image("chelsea.png"), image("coffee.png"));
    let a = engine
        .submit(request(first.into(), std::slice::from_ref(&x), 6))
        .wait()
        .expect("a");
    assert_eq!(a.cached_tokens, 0);
    assert_eq!(misses(), 1);

    // The same image, a longer prompt: no encoding, and every full block of the shared prefix reused.
    let b = engine
        .submit(request(longer.into(), std::slice::from_ref(&x), 6))
        .wait()
        .expect("b");
    assert_eq!(misses(), 1, "the vision tower ran again for a cached image");
    let (ea, eb) = (expanded(&ctx, first), expanded(&ctx, longer));
    let shared = ea.iter().zip(&eb).take_while(|(p, q)| p == q).count();
    assert!(shared > 576, "the prompts share the image: {shared}");
    assert!(
        b.cached_tokens >= shared / block * block,
        "{} cached tokens for a shared prefix of {shared}",
        b.cached_tokens
    );
    assert!(b.cached_tokens < b.prompt_tokens);

    // The same text, another image: nothing reused past the block where the image starts.
    let c = engine
        .submit(request(longer.into(), std::slice::from_ref(&y), 6))
        .wait()
        .expect("c");
    assert_eq!(misses(), 2);
    let placeholder = eb.iter().position(|&id| id == 32000).expect("an image");
    assert!(
        c.cached_tokens <= placeholder / block * block,
        "{} cached tokens, the image starts at {placeholder}",
        c.cached_tokens
    );

    // Each generates what a cold engine without caching does.
    let cold = Engine::new(&dir, plain()).expect("cold engine");
    for (done, text, img) in [(&b, longer, &x), (&c, longer, &y)] {
        let want = cold
            .submit(request(text.into(), std::slice::from_ref(img), 6))
            .wait()
            .expect("cold");
        assert_eq!(done.token_ids, want.token_ids);
    }
}

/// transformers' greedy tokens for a LLaVA-NeXT prompt with three large images (8515 tokens), made by
/// scripts/make_chunked_prefill_golden.py.
struct LongPrompt {
    prompt: String,
    images: Vec<PathBuf>,
    prompt_tokens: usize,
    generated: Vec<u32>,
}

fn long_prompt() -> LongPrompt {
    let dir = fixture("llava-next-tiny-real");
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("chunked_prefill_golden.json")).expect("golden"),
    )
    .expect("json");
    LongPrompt {
        prompt: golden["prompt"].as_str().expect("prompt").into(),
        images: golden["images"]
            .as_array()
            .expect("images")
            .iter()
            .map(|i| dir.join("images").join(i["file"].as_str().expect("file")))
            .collect(),
        prompt_tokens: golden["num_input_ids"].as_u64().expect("length") as usize,
        generated: golden["generated_token_ids"]
            .as_array()
            .expect("tokens")
            .iter()
            .map(|t| t.as_u64().expect("id") as u32)
            .collect(),
    }
}

#[test]
fn a_prompt_longer_than_a_step_is_prefilled_in_chunks_and_matches_transformers() {
    let long = long_prompt();
    assert!(long.prompt_tokens > 8192);
    let dir = fixture("llava-next-tiny-real");
    for budget in [8192, 1000] {
        let engine = Engine::new(&dir, cached(budget)).expect("engine");
        engine.counters().record_steps();
        let done = engine
            .submit(request(
                long.prompt.clone(),
                &long.images,
                long.generated.len(),
            ))
            .wait()
            .expect("the long prompt completes");
        assert_eq!(done.prompt_tokens, long.prompt_tokens);
        assert_eq!(done.token_ids, long.generated, "chunks of {budget}");
        let steps = engine.counters().take_steps();
        let prefill_steps = steps.iter().filter(|s| s.prefill_tokens > 0).count();
        assert_eq!(
            prefill_steps,
            long.prompt_tokens.div_ceil(budget),
            "chunks of {budget}"
        );
        assert!(steps.iter().all(|s| s.prefill_tokens <= budget));
    }
}

/// Token arrival times of a request, recorded on the engine's thread.
fn timed(engine: &Engine, request: Request) -> (Arc<Mutex<Vec<Instant>>>, mmreg_engine::Canceller) {
    let times = Arc::new(Mutex::new(Vec::new()));
    let record = times.clone();
    let canceller = engine.submit_with(request, move |event| {
        if let Event::Token(_) = event {
            record.lock().expect("times").push(Instant::now());
        }
        true
    });
    (times, canceller)
}

#[test]
fn running_decodes_keep_going_while_a_long_prompt_prefills_in_chunks() {
    let long = long_prompt();
    let dir = fixture("llava-next-tiny-real");
    for budget in [2048, 16384] {
        let engine = Engine::new(&dir, cached(budget)).expect("engine");
        let decodes: Vec<_> = (0..8)
            .map(|i| {
                let prompt = format!("[INST] Count from {i} onwards, slowly. [/INST]");
                timed(&engine, request(prompt, &[], 100_000))
            })
            .collect();
        // Let them reach a steady pace.
        while decodes[0].0.lock().expect("times").len() < 20 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let submitted = Instant::now();
        let done = engine
            .submit(request(long.prompt.clone(), &long.images, 1))
            .wait()
            .expect("the long prompt completes");
        let finished = Instant::now();
        assert_eq!(done.token_ids, long.generated[..1]);
        let mut steady = Vec::new();
        let mut worst = Duration::ZERO;
        for (times, canceller) in &decodes {
            canceller.cancel();
            let times = times.lock().expect("times");
            for pair in times.windows(2) {
                let gap = pair[1] - pair[0];
                if pair[1] < submitted {
                    steady.push(gap);
                } else if pair[0] < finished {
                    worst = worst.max(gap);
                }
            }
            assert!(times.iter().any(|&t| t > submitted), "a decode stalled");
        }
        steady.sort();
        let median = steady[steady.len() / 2];
        eprintln!(
            "chunks of {budget}: while a {}-token prompt prefilled, the longest gap between tokens of 8 running decodes was {:.1} ms; their steady step {:.1} ms ({:.1}x)",
            long.prompt_tokens,
            worst.as_secs_f64() * 1e3,
            median.as_secs_f64() * 1e3,
            worst.as_secs_f64() / median.as_secs_f64()
        );
    }
}

#[test]
fn items_over_the_limits_are_refused_and_items_larger_than_a_step_are_sliced_into_chunks() {
    let dir = fixture("llava-next-tiny-real");
    let long = long_prompt();
    let options = EngineOptions {
        limit_mm_per_prompt: mmreg_engine::MultiModalLimits::parse(
            r#"{"image": {"count": 2, "width": 700, "height": 700}}"#,
        )
        .expect("limits"),
        max_num_batched_tokens: 1000,
        ..EngineOptions::default()
    };
    let engine = Engine::new(&dir, options).expect("engine");
    // Profiled with 2 images of at most 700x700: the largest item is 2928 tokens.
    assert_eq!(
        engine
            .profile()
            .dummy_items
            .get(mmreg_core::Modality::Image),
        2
    );
    assert_eq!(engine.profile().largest_item_tokens, 2928);
    let three = engine
        .submit(request(long.prompt.clone(), &long.images, 1))
        .wait()
        .expect_err("three images are over the limit")
        .to_string();
    assert!(three.contains("3 images given but at most 2"), "{three}");
    let large = engine
        .submit(request(
            "[INST] <image>\nWhat is it? [/INST]".into(),
            &[image("next_1080x1920.png")],
            1,
        ))
        .wait()
        .expect_err("too large")
        .to_string();
    assert!(large.contains("700x700"), "{large}");
    // Within the limits, a 2928-token item is more than a 1000-token step: it is encoded once and
    // sliced into the chunks.
    let two = engine
        .submit(request(
            "[INST] <image>\n<image>\nCompare them. [/INST]".into(),
            &long.images[..2],
            2,
        ))
        .wait()
        .expect("two large images complete");
    assert_eq!(two.token_ids.len(), 2);
}
