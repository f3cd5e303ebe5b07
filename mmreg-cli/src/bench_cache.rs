//! `mmreg bench --scenario …`: what prefix caching, the encoder cache and chunked prefill change, each
//! measured both ways in one process on one device, printed as one JSON object.
//!
//! - `chat`: one image, 8 turns, each prompt the whole history (the last prompt, its answer, a new user
//!   turn) as token ids: time to first token per turn with prefix caching on and off.
//! - `shared-images`: 32 requests over the 4 `--image`s, each prompt with its own text before the image
//!   (so no prefix is shared): calls of the vision path and throughput with the encoder cache on and off.
//! - `long-prefill`: 8 text-only decodes run; then `--prompt` with all its images arrives: the longest gap
//!   between their tokens while it prefills, in chunks of each `--chunk` size and in one step.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mmreg_core::{ImageInput, Prompt};
use mmreg_engine::{Engine, EngineOptions, Event, ImageSource, Request, SamplingParams};

use crate::bench::BenchArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Prefill and decode of one request repeated (the default).
    Decode,
    Chat,
    SharedImages,
    LongPrefill,
}

pub fn run(args: &BenchArgs, options: EngineOptions) -> Result<serde_json::Value> {
    match args.scenario {
        Scenario::Decode => bail!("not a caching scenario"),
        Scenario::Chat => chat(args, options),
        Scenario::SharedImages => shared_images(args, options),
        Scenario::LongPrefill => long_prefill(args, options),
    }
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        stop_token_ids: Vec::new(),
        ..SamplingParams::default()
    }
}

fn images(args: &BenchArgs) -> Vec<ImageSource> {
    args.prompt
        .images
        .iter()
        .cloned()
        .map(ImageSource::Path)
        .collect()
}

fn counter(
    engine: &Engine,
    pick: impl Fn(&mmreg_engine::EngineCounters) -> &std::sync::atomic::AtomicUsize,
) -> usize {
    pick(engine.counters()).load(Ordering::Relaxed)
}

/// Seconds to the first token of `request`, and its completion.
fn first_token(engine: &Engine, request: Request) -> Result<(f64, mmreg_engine::Completion)> {
    let t = Instant::now();
    let handle = engine.submit(request);
    let mut ttft = None;
    while let Some(event) = handle.next_event() {
        match event {
            Event::Token(_) => {
                ttft.get_or_insert(t.elapsed().as_secs_f64());
            }
            Event::Finished(completion) => {
                return Ok((ttft.unwrap_or_default(), completion));
            }
            Event::Failed(e) => return Err(e.into()),
            Event::Logprobs(_) => {}
        }
    }
    bail!("the engine stopped")
}

/// An image no measured request uses, for the warm-up passes (each pass meets every shape, kernel and
/// CUDA graph of the measured one first).
fn warm_up_image(shade: u8) -> ImageSource {
    let image = image::RgbImage::from_pixel(480, 640, image::Rgb([shade, 255 - shade, shade / 2]));
    ImageSource::Decoded(ImageInput::new(
        format!("warm-up {shade}"),
        image::DynamicImage::ImageRgb8(image),
    ))
}

/// Eight turns over one image: per turn, TTFT in ms, cached tokens and prompt tokens.
fn conversation(
    engine: &Engine,
    args: &BenchArgs,
    picture: ImageSource,
) -> Result<(Vec<f64>, Vec<usize>, Vec<usize>)> {
    let tokenizer = engine.context().tokenizer()?;
    let ids = |text: &str, special: bool| -> Result<Vec<u32>> {
        Ok(tokenizer
            .encode(text, special)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .get_ids()
            .to_vec())
    };
    let mut history = ids(&args.prompt.prompt, true)?;
    let (mut ttfts, mut cached, mut lengths) = (Vec::new(), Vec::new(), Vec::new());
    for turn in 0..8 {
        let (ttft, done) = first_token(
            engine,
            Request {
                prompt: Prompt::TokenIds(history.clone()),
                images: vec![picture.clone()],
                videos: Vec::new(),
                params: greedy(args.max_tokens),
            },
        )?;
        ttfts.push(ttft * 1e3);
        cached.push(done.cached_tokens);
        lengths.push(done.prompt_tokens);
        // Random weights may generate an added token (the image marker among them): the history
        // carries the base vocabulary only.
        let base = tokenizer.get_vocab_size(false) as u32;
        history.extend(done.token_ids.iter().map(|&t| if t < base { t } else { 0 }));
        history.extend(ids(
            &format!(
                " USER: Turn {}: tell me more about it. ASSISTANT:",
                turn + 2
            ),
            false,
        )?);
    }
    Ok((ttfts, cached, lengths))
}

fn chat(args: &BenchArgs, options: EngineOptions) -> Result<serde_json::Value> {
    let picture = images(args)
        .into_iter()
        .next()
        .context("--scenario chat takes one --image")?;
    let mut out = serde_json::Map::new();
    for caching in [true, false] {
        let engine = Engine::new(
            &args.prompt.model,
            EngineOptions {
                prefix_caching: caching,
                ..options.clone()
            },
        )?;
        conversation(&engine, args, warm_up_image(0))?;
        let (ttfts, cached, lengths) = conversation(&engine, args, picture.clone())?;
        let key = if caching {
            "prefix_caching"
        } else {
            "no_prefix_caching"
        };
        out.insert(
            key.into(),
            serde_json::json!({ "ttft_ms": ttfts, "cached_tokens": cached, "prompt_tokens": lengths }),
        );
    }
    Ok(out.into())
}

fn shared_images(args: &BenchArgs, options: EngineOptions) -> Result<serde_json::Value> {
    let pictures = images(args);
    if pictures.len() < 2 {
        bail!("--scenario shared-images takes several --image (4 in the benchmark)");
    }
    let (question, marker) = args
        .prompt
        .prompt
        .split_once("<image>")
        .context("--prompt needs an <image>")?;
    let requests = |pictures: &[ImageSource]| -> Vec<Request> {
        (0..32)
            .map(|i| Request {
                prompt: Prompt::Text(format!("{question}Request {i}. <image>{marker}")),
                images: vec![pictures[i % pictures.len()].clone()],
                videos: Vec::new(),
                params: greedy(args.max_tokens),
            })
            .collect()
    };
    let warm_up: Vec<ImageSource> = (0..pictures.len() as u8)
        .map(|k| warm_up_image(40 * k + 1))
        .collect();
    let mut out = serde_json::Map::new();
    for encoder_cache in [true, false] {
        let engine = Engine::new(
            &args.prompt.model,
            EngineOptions {
                prefix_caching: false,
                encoder_cache_bytes: if encoder_cache { 1 << 30 } else { 0 },
                ..options.clone()
            },
        )?;
        // The same workload over other images first.
        for result in engine.generate(requests(&warm_up)) {
            result?;
        }
        let (hits, misses) = (
            counter(&engine, |c| &c.encoder_cache_hits),
            counter(&engine, |c| &c.encoder_cache_misses),
        );
        let t = Instant::now();
        let done = engine.generate(requests(&pictures));
        let seconds = t.elapsed().as_secs_f64();
        let tokens: usize = done
            .into_iter()
            .map(|r| r.map(|c| c.token_ids.len()))
            .sum::<mmreg_core::Result<usize>>()?;
        let key = if encoder_cache {
            "encoder_cache"
        } else {
            "no_encoder_cache"
        };
        out.insert(
            key.into(),
            serde_json::json!({
                "vision_items_encoded": counter(&engine, |c| &c.encoder_cache_misses) - misses,
                "encoder_cache_hits": counter(&engine, |c| &c.encoder_cache_hits) - hits,
                "seconds": seconds,
                "generated_tokens": tokens,
                "tok_per_s": tokens as f64 / seconds,
            }),
        );
    }
    Ok(out.into())
}

/// 8 decodes running, then `long` submitted: its TTFT and completion, the decodes' median gap before it
/// and their longest and mean gaps while it prefilled (ms).
fn decodes_beside(
    engine: &Engine,
    decode: &Request,
    long: &Request,
) -> Result<(f64, mmreg_engine::Completion, f64, f64, f64)> {
    let streams: Vec<_> = (0..8)
        .map(|_| {
            let times = Arc::new(Mutex::new(Vec::new()));
            let record = times.clone();
            let canceller = engine.submit_with(decode.clone(), move |event| {
                if let Event::Token(_) = event {
                    record.lock().map(|mut t| t.push(Instant::now())).ok();
                }
                true
            });
            (times, canceller)
        })
        .collect();
    let count = |i: usize| streams[i].0.lock().map_or(0, |t| t.len());
    while count(0) < 64 {
        std::thread::sleep(Duration::from_millis(2));
    }
    let submitted = Instant::now();
    let (ttft, done) = first_token(engine, long.clone())?;
    let finished = Instant::now();
    // A few more steps after it, then stop the decodes.
    let after = count(0) + 16;
    while count(0) < after {
        std::thread::sleep(Duration::from_millis(2));
    }
    let (mut steady, mut during) = (Vec::new(), Vec::new());
    for (times, canceller) in &streams {
        canceller.cancel();
        let times = times.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        for pair in times.windows(2) {
            let gap = (pair[1] - pair[0]).as_secs_f64() * 1e3;
            if pair[1] < submitted {
                steady.push(gap);
            } else if pair[0] < finished {
                during.push(gap);
            }
        }
    }
    steady.sort_by(f64::total_cmp);
    let median = steady.get(steady.len() / 2).copied().unwrap_or_default();
    let worst = during.iter().copied().fold(0.0, f64::max);
    let mean_during = during.iter().sum::<f64>() / during.len().max(1) as f64;
    Ok((ttft, done, median, worst, mean_during))
}

fn long_prefill(args: &BenchArgs, options: EngineOptions) -> Result<serde_json::Value> {
    let text_only = args.prompt.prompt.replace("<image>", "");
    let mut out = serde_json::Map::new();
    let unchunked = 1 << 16;
    for budget in args.chunk.iter().copied().chain([unchunked]) {
        let engine = Engine::new(
            &args.prompt.model,
            EngineOptions {
                max_num_batched_tokens: budget,
                prefix_caching: false,
                encoder_cache_bytes: 0,
                ..options.clone()
            },
        )?;
        let long = Request {
            prompt: Prompt::Text(args.prompt.prompt.clone()),
            images: images(args),
            videos: Vec::new(),
            params: greedy(1),
        };
        let decode = Request {
            prompt: Prompt::Text(text_only.clone()),
            images: Vec::new(),
            videos: Vec::new(),
            params: greedy(100_000),
        };
        // The first pass meets every shape and CUDA graph the measured one needs.
        decodes_beside(&engine, &decode, &long)?;
        let (ttft, done, median, worst, mean_during) = decodes_beside(&engine, &decode, &long)?;
        let key = if budget == unchunked {
            "unchunked".into()
        } else {
            format!("chunked_{budget}")
        };
        out.insert(
            key,
            serde_json::json!({
                "prompt_tokens": done.prompt_tokens,
                "ttft_ms": ttft * 1e3,
                "decode_steady_gap_ms": median,
                "decode_longest_gap_ms": worst,
                "decode_mean_gap_during_ms": mean_during,
                "longest_over_steady": worst / median,
            }),
        );
    }
    Ok(out.into())
}
