//! `mmreg bench`: prefill latency, time to first token and decode throughput of the engine on one
//! checkpoint, printed as one JSON object.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use mmreg_core::Prompt;
use mmreg_engine::{
    cuda, Engine, EngineOptions, Event, ImageSource, Request, SamplingParams, StepTiming,
};

use crate::bench_cache::Scenario;
use crate::options::{parse_device, parse_dtype};

use crate::commands::PromptArgs;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Batch sizes to measure (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub batch: Vec<usize>,
    /// Tokens generated per request in the decode measurement.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    #[arg(long, default_value = "cuda")]
    pub device: String,
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    #[command(flatten)]
    pub parallel: crate::options::ParallelArgs,
    /// Tokens one step computes at most (longer prompts, or more of them, prefill over several steps).
    #[arg(long, default_value_t = 8192)]
    pub max_num_batched_tokens: usize,
    #[command(flatten)]
    pub chunked_prefill: crate::options::ChunkedPrefillArgs,
    /// Timed repetitions of the prefill.
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
    /// What to measure: `decode` (prefill and decode of the prompt repeated), or what caching and
    /// chunked prefill change: `chat`, `shared-images`, `long-prefill` (see docs/benchmarks.md).
    #[arg(long, value_enum, default_value = "decode")]
    pub scenario: Scenario,
    /// `--scenario long-prefill`: tokens per step of its chunked runs (comma separated); one more run
    /// takes the whole prompt in one step.
    #[arg(long, value_delimiter = ',', default_value = "256,2048")]
    pub chunk: Vec<usize>,
    /// Also profile (CUDA): write Chrome traces of one lone prefill (`prefill_bs1.json`), of 8 prefills
    /// together (`prefill_bs8.json`), of one request of 16 tokens (`decode_bs1.json`), of 8
    /// (`decode_bs8.json`) and of 32 (`decode_bs32.json`, whose first steps also prefill) into this
    /// folder.
    #[arg(long)]
    pub trace: Option<PathBuf>,
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    // Every measurement repeats one request: caching would serve the repeats from the first, so the
    // prefill and decode figures are measured without it.
    let mut options = EngineOptions {
        device,
        dtype: parse_dtype(&args.dtype)?,
        prefix_caching: false,
        encoder_cache_bytes: 0,
        max_num_batched_tokens: args.max_num_batched_tokens.max(1),
        ..EngineOptions::default()
    };
    args.parallel.apply(&mut options)?;
    args.chunked_prefill.apply(&mut options);
    if args.scenario != Scenario::Decode {
        let options = EngineOptions {
            prefix_caching: true,
            encoder_cache_bytes: EngineOptions::default().encoder_cache_bytes,
            ..options
        };
        println!("{}", crate::bench_cache::run(args, options)?);
        return Ok(());
    }
    let started = Instant::now();
    let (options_async, step_budget, chunked) = (
        options.async_scheduling,
        options.max_num_batched_tokens,
        options.enable_chunked_prefill,
    );
    let engine = Engine::new(&args.prompt.model, options)?;
    let load_s = started.elapsed().as_secs_f64();
    let profile = engine.profile().clone();
    eprintln!("engine ready in {load_s:.1}s: {profile:?}");
    // The images are each request's own (`Batches`).
    let request = Request {
        videos: Vec::new(),
        prompt: Prompt::Text(args.prompt.prompt.clone()),
        images: Vec::new(),
        params: SamplingParams {
            max_tokens: args.max_tokens,
            ..SamplingParams::default()
        },
    };
    // The traces take up to 32 requests.
    let most = args.batch.iter().copied().max().unwrap_or(1);
    let most = most.max(if args.trace.is_some() { 32 } else { 1 });
    let batch = Batches::new(&request, &args.prompt.images, most)?;
    let mut results = serde_json::Map::new();
    results.insert("load_s".into(), load_s.into());
    // What the KV cache holds: blocks of the global layers, and of the sliding-window layers' own
    // pool (0 without one).
    results.insert("kv_cache_bytes".into(), profile.kv_cache_bytes.into());
    results.insert("kv_blocks".into(), profile.kv_blocks.into());
    results.insert("sliding_blocks".into(), profile.sliding_blocks.into());
    results.insert("block_size".into(), profile.block_size.into());
    results.insert("async_scheduling".into(), options_async.into());
    results.insert("max_num_batched_tokens".into(), step_budget.into());
    results.insert("enable_chunked_prefill".into(), chunked.into());
    // Whether unmasked attention calls cuDNN directly (else libtorch's attention; on with MMREG_CUDNN_ATTENTION=1).
    let cudnn = mmreg_engine::cudnn::available() && mmreg_engine::cudnn::enabled();
    results.insert("cudnn_attention".into(), cudnn.into());
    // Whether products libtorch would run go through their shape's tuned cuBLASLt configuration, and up
    // to how many rows (on by default; MMREG_TUNED_GEMM=0 off, MMREG_TUNED_GEMM_ROWS).
    let tuned = mmreg_engine::tuned_gemm::available() && mmreg_engine::tuned_gemm::enabled();
    results.insert("tuned_gemm".into(), tuned.into());
    results.insert(
        "tuned_gemm_rows".into(),
        mmreg_engine::tuned_gemm::max_rows().into(),
    );
    // Each request of a batch has images of its own (see `Batches`).
    results.insert("distinct_images".into(), true.into());
    for &b in &args.batch {
        // Warm-up, then `repeat` prefills of `b` requests: the model time of the steps that prefill
        // (vision tower, projector, decoder; preprocessing happens before, on the workers). The warm-up
        // also runs one pass as the timed ones do (one token each): with decodes beside them, the
        // warm-up's later steps split the prompts elsewhere, and a timed pass would meet those steps'
        // shapes first (a graph to capture, attention plans to build: run 91's 1.4-s first pass).
        engine.generate(batch.of(b, args.max_tokens));
        engine.generate(batch.of(b, 1));
        // Each pass's steps (`generate` returns once every request has its token).
        let prefill_passes = |time_embeddings: bool| {
            let counters = engine.counters();
            counters
                .time_embeddings
                .store(time_embeddings, std::sync::atomic::Ordering::Relaxed);
            counters.record_steps();
            let passes: Vec<Vec<StepTiming>> = (0..args.repeat)
                .map(|_| {
                    engine.generate(batch.of(b, 1));
                    counters.take_steps()
                })
                .collect();
            counters
                .time_embeddings
                .store(false, std::sync::atomic::Ordering::Relaxed);
            passes
        };
        let passes = prefill_passes(false);
        // A second series waits for the embeddings to time them (which delays the rest of the step).
        let embed_passes = prefill_passes(true);
        let mean = |values: &[f64]| values.iter().sum::<f64>() / values.len().max(1) as f64;
        // Each pass's sum of `of` over its prefill steps, in ms.
        let over = |passes: &[Vec<StepTiming>], of: fn(&StepTiming) -> f64| -> Vec<f64> {
            let prefills = |p: &[StepTiming]| {
                p.iter()
                    .filter(|s| s.prefill_tokens > 0)
                    .map(of)
                    .sum::<f64>()
            };
            passes.iter().map(|p| prefills(p) * 1000.0).collect()
        };
        let ms = over(&passes, |s| s.seconds);
        results.insert(format!("prefill_bs{b}_ms"), mean(&ms).into());
        // The mean's passes, and their median: one slow pass (a GPU clocked down under a long
        // prefill) moves the mean and not the median.
        results.insert(format!("prefill_bs{b}_median_ms"), median(&ms).into());
        results.insert(format!("prefill_bs{b}_passes_ms"), ms.into());
        let embed_ms = over(&embed_passes, |s| s.embed_seconds);
        results.insert(format!("prefill_embed_bs{b}_ms"), mean(&embed_ms).into());
        // The host's share: until each prefill step's forward was issued (a step that waits for the
        // device inside its forward shows it here).
        let issue_ms = over(&passes, |s| s.issued_seconds);
        results.insert(format!("prefill_issue_bs{b}_ms"), mean(&issue_ms).into());
        let steps: Vec<f64> = passes.iter().map(|p| p.len() as f64).collect();
        results.insert(format!("prefill_steps_bs{b}"), mean(&steps).into());
        // The last pass step by step: new prompt tokens, decodes, issued and landed (ms).
        let last = passes.last().map(Vec::as_slice).unwrap_or_default();
        let detail: Vec<serde_json::Value> = last
            .iter()
            .map(|s| {
                serde_json::json!([
                    s.prefill_tokens,
                    s.decodes,
                    s.issued_seconds * 1000.0,
                    s.seconds * 1000.0
                ])
            })
            .collect();
        results.insert(format!("prefill_step_detail_bs{b}"), detail.into());

        // Time to first token and decode throughput of `b` concurrent requests. Each request's events
        // are read as they come (a thread each), so that decode is timed from the moment the last
        // request had its first token: before it, steps still prefill other prompts.
        engine.counters().record_steps();
        let t = Instant::now();
        let handles: Vec<_> = batch
            .of(b, args.max_tokens)
            .into_iter()
            .map(|request| engine.submit(request))
            .collect();
        let streams: Vec<Result<(Vec<f64>, usize)>> = std::thread::scope(|scope| {
            let readers: Vec<_> = handles
                .into_iter()
                .map(|handle| {
                    scope.spawn(move || -> Result<(Vec<f64>, usize)> {
                        let mut times = Vec::new();
                        while let Some(event) = handle.next_event() {
                            match event {
                                Event::Token(_) => times.push(t.elapsed().as_secs_f64()),
                                Event::Finished(completion) => {
                                    return Ok((times, completion.prompt_tokens))
                                }
                                Event::Failed(e) => return Err(e.into()),
                                Event::Logprobs(_) => {}
                            }
                        }
                        Ok((times, 0))
                    })
                })
                .collect();
            readers
                .into_iter()
                .map(|r| {
                    r.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("a reader panicked")))
                })
                .collect()
        });
        let streams = streams.into_iter().collect::<Result<Vec<_>>>()?;
        let total = t.elapsed().as_secs_f64();
        if let Some((_, prompt_tokens)) = streams.first() {
            results.insert("prompt_tokens".into(), (*prompt_tokens).into());
        }
        let firsts: Vec<f64> = streams
            .iter()
            .map(|(times, _)| times.first().copied().unwrap_or(total))
            .collect();
        let ttft = firsts.iter().copied().fold(f64::INFINITY, f64::min);
        let all_prefilled = firsts.iter().copied().fold(0.0, f64::max);
        let times: Vec<&[f64]> = streams.iter().map(|(t, _)| t.as_slice()).collect();
        let DecodeRates {
            decoded,
            full_batch: full_rate,
            with_tail,
        } = decode_rates(&times, all_prefilled);
        results.insert(format!("ttft_bs{b}_ms"), (ttft * 1000.0).into());
        results.insert(
            format!("ttft_last_bs{b}_ms"),
            (all_prefilled * 1000.0).into(),
        );
        results.insert(format!("decode_tok_per_s_bs{b}"), full_rate.into());
        results.insert(
            format!("decode_with_tail_tok_per_s_bs{b}"),
            with_tail.into(),
        );
        // Where a decode step's time goes on the host: the steps in which all `b` requests decoded,
        // from the step's start until its forward was issued, and from then until its tokens were
        // on the host (the GPU's work, if the host waited for it); against the interval between
        // steps, the rest is host time in which the GPU has nothing queued.
        let steps: Vec<_> = engine
            .counters()
            .take_steps()
            .into_iter()
            .filter(|s| s.prefill_tokens == 0 && s.decodes == b)
            .collect();
        if !steps.is_empty() && decoded > 0 {
            let mean = |steps: &[&mmreg_engine::StepTiming],
                        f: &dyn Fn(&mmreg_engine::StepTiming) -> f64| {
                1000.0 * steps.iter().map(|&s| f(s)).sum::<f64>() / steps.len() as f64
            };
            let all: Vec<_> = steps.iter().collect();
            let interval = 1000.0 * b as f64 / full_rate;
            results.insert(format!("decode_step_ms_bs{b}"), interval.into());
            results.insert(
                format!("decode_issue_ms_bs{b}"),
                mean(&all, &|s| s.issued_seconds).into(),
            );
            // Steps issued behind the one before (async scheduling): the host waited for nothing.
            let waited: Vec<_> = steps.iter().filter(|s| !s.overlapped).collect();
            results.insert(
                format!("decode_overlapped_bs{b}"),
                (1.0 - waited.len() as f64 / steps.len() as f64).into(),
            );
            if !waited.is_empty() {
                results.insert(
                    format!("decode_wait_ms_bs{b}"),
                    mean(&waited, &|s| s.seconds - s.issued_seconds).into(),
                );
            }
        }
    }
    if let Some(dir) = &args.trace {
        std::fs::create_dir_all(dir)?;
        for (name, requests) in [
            ("prefill_bs1.json", batch.of(1, 1)),
            ("prefill_bs8.json", batch.of(8, 1)),
            ("decode_bs1.json", batch.of(1, 16)),
            ("decode_bs8.json", batch.of(8, 16)),
            ("decode_bs32.json", batch.of(32, 16)),
        ] {
            // Warm (graphs captured), then traced.
            engine.generate(requests.clone());
            cuda::start_profiler()?;
            let results = engine.generate(requests);
            cuda::stop_profiler(&dir.join(name))?;
            for result in results {
                result?;
            }
        }
    }
    // The shapes this process timed (at start-up and in the runs) and the seconds that took: 0 where the
    // picks file had them all.
    let tuning = mmreg_engine::tuned_gemm::tuning();
    results.insert("tuned_gemm_shapes_timed".into(), tuning.shapes.into());
    results.insert("tuned_gemm_tuning_s".into(), tuning.seconds.into());
    if let tch::Device::Cuda(i) = device {
        if let Some(stats) = cuda::memory_stats(i) {
            results.insert(
                "peak_mem_gib".into(),
                (stats.peak_allocated as f64 / (1u64 << 30) as f64).into(),
            );
        }
    }
    println!("{}", serde_json::Value::Object(results));
    Ok(())
}

/// The requests of a measured batch: the prompt of `--prompt`, each request with images of its own. The
/// engine encodes an item that several sequences of a step share once (as vLLM's encoder cache does), so
/// a batch repeating one image would leave most of the vision tower's work out of its prefill, work that
/// a batch of users' different images does. Request `i` takes each image with its first pixel's red and
/// green values moved by `i` (mod 256): the same shapes and the same work, different items.
struct Batches {
    request: Request,
    /// The images of request `i`, for `i` below the largest batch.
    images: Vec<Vec<ImageSource>>,
}

impl Batches {
    fn new(request: &Request, paths: &[PathBuf], most: usize) -> Result<Self> {
        let decoded = paths
            .iter()
            .map(|path| {
                image::open(path)
                    .map(|image| image.to_rgb8())
                    .with_context(|| format!("reading {}", path.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        let images = (0..most)
            .map(|i| {
                decoded
                    .iter()
                    .zip(paths)
                    .map(|(image, path)| -> Result<ImageSource> {
                        let mut image = image.clone();
                        if let Some(pixel) = image.pixels_mut().next() {
                            pixel.0[0] = pixel.0[0].wrapping_add(i as u8);
                            pixel.0[1] = pixel.0[1].wrapping_add((i >> 8) as u8);
                        }
                        let mut bytes = Vec::new();
                        image.write_to(
                            &mut std::io::Cursor::new(&mut bytes),
                            image::ImageFormat::Png,
                        )?;
                        let name = format!("{} (request {i})", path.display());
                        Ok(ImageSource::Bytes { name, bytes })
                    })
                    .collect()
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            request: request.clone(),
            images,
        })
    }

    /// `b` requests of `max_tokens` new tokens each.
    fn of(&self, b: usize, max_tokens: usize) -> Vec<Request> {
        (0..b)
            .map(|i| Request {
                images: self.images[i % self.images.len()].clone(),
                params: SamplingParams {
                    max_tokens,
                    ..self.request.params.clone()
                },
                ..self.request.clone()
            })
            .collect()
    }
}

/// The middle value of `values` (the mean of the two middle ones for an even count; 0 for none).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Decode throughput of one batch from each request's token arrival times (seconds), from
/// `all_prefilled` (the last request's first token) on.
struct DecodeRates {
    /// Tokens counted in `full_batch`.
    decoded: usize,
    /// Tokens per second while all requests decode: up to the first request's last token. Past that
    /// the batch shrinks: requests that prefilled in an earlier step (a batch whose prompts exceed a
    /// step's token budget) finish earlier, and the last steps decode fewer rows at about a full
    /// step's cost. The anchor's decode is timed the same way (a static batch).
    full_batch: f64,
    /// Tokens per second up to the last token, the shrinking tail included.
    with_tail: f64,
}

fn decode_rates(streams: &[&[f64]], all_prefilled: f64) -> DecodeRates {
    // Tokens after `from` up to `to` (and up to `slack` past it), over the time from `from` to `to`.
    let rate = |from: f64, to: f64, slack: f64| {
        let tokens = streams
            .iter()
            .flat_map(|times| times.iter())
            .filter(|&&time| time > from && time <= to + slack)
            .count();
        (tokens, tokens as f64 / (to - from))
    };
    let last = streams
        .iter()
        .filter_map(|times| times.last().copied())
        .fold(all_prefilled, f64::max);
    // The request that finished first, and its tokens in the window.
    let (first_done, steps) = streams
        .iter()
        .filter_map(|times| {
            let steps = times.iter().filter(|&&t| t > all_prefilled).count();
            times.last().map(|&t| (t, steps))
        })
        .fold((last, 0), |a, b| if b.0 < a.0 { b } else { a });
    // The window's last step hands its tokens to every request's reader, which see them a little
    // apart: those seen after the first request's last token still count (up to half a step).
    let slack = match steps {
        0 => 0.0,
        n => 0.5 * (first_done - all_prefilled) / n as f64,
    };
    let with_tail = rate(all_prefilled, last, 0.0);
    let (decoded, full_batch) = match rate(all_prefilled, first_done, slack) {
        (0, _) => with_tail,
        counted => counted,
    };
    DecodeRates {
        decoded,
        full_batch,
        with_tail: with_tail.1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Token times of requests that each get a token every `step` seconds from the step after their
    /// first (`first`), `tokens` in all, each reader seeing it `late` seconds after the step.
    fn arrivals(first: usize, tokens: usize, step: f64, late: f64) -> Vec<f64> {
        (first..first + tokens)
            .map(|i| i as f64 * step + late)
            .collect()
    }

    /// A batch that prefilled in two steps: the requests that came first finish a step early, and the
    /// last step decodes half the batch. The full-batch rate leaves that step out.
    #[test]
    fn decode_is_timed_while_the_whole_batch_decodes() {
        let step = 0.01;
        let early = arrivals(1, 10, step, 0.0);
        let late = arrivals(2, 10, step, 0.0);
        let streams = [early.as_slice(), &early, &late, &late];
        let all_prefilled = 2.0 * step;
        let rates = decode_rates(&streams, all_prefilled);
        // Steps 3..=10: all four decode, 4 tokens a step.
        assert_eq!(rates.decoded, 32);
        assert!(
            (rates.full_batch - 400.0).abs() < 1e-6,
            "{}",
            rates.full_batch
        );
        // Step 11 decodes two: 34 tokens over 9 steps.
        assert!(
            (rates.with_tail - 34.0 / 0.09).abs() < 1e-6,
            "{}",
            rates.with_tail
        );
    }

    /// Readers see a step's tokens a little apart; the one that sees the last step first must not
    /// leave the others' tokens of that step out.
    #[test]
    fn the_last_step_counts_whole_though_its_readers_see_it_apart() {
        let step = 0.005;
        let streams: Vec<Vec<f64>> = (0..8)
            .map(|r| arrivals(1, 128, step, r as f64 * 20e-6))
            .collect();
        let streams: Vec<&[f64]> = streams.iter().map(Vec::as_slice).collect();
        let all_prefilled = step + 7.0 * 20e-6;
        let rates = decode_rates(&streams, all_prefilled);
        assert_eq!(rates.decoded, 8 * 127);
        assert!(
            (rates.full_batch / 1600.0 - 1.0).abs() < 1e-3,
            "{}",
            rates.full_batch
        );
        // One request: nothing to leave out, the two rates are one.
        let one = decode_rates(&streams[..1], step);
        assert_eq!(one.full_batch, one.with_tail);
    }

    /// The median leaves one slow pass out where the mean takes it in.
    #[test]
    fn the_median_of_passes_ignores_one_slow_pass() {
        assert_eq!(median(&[505.0, 557.0, 501.0, 503.0, 509.0]), 505.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[7.0]), 7.0);
        assert_eq!(median(&[]), 0.0);
    }

    /// Every request of a batch gets its own images (different bytes, same size), and only the first
    /// pixel differs from the file's.
    #[test]
    fn each_request_of_a_batch_has_images_of_its_own() {
        let path = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fixtures/llava-tiny-real/images/b_480x640.png"
        ));
        let request = Request {
            videos: Vec::new(),
            prompt: Prompt::Text("<image>".into()),
            images: Vec::new(),
            params: SamplingParams::default(),
        };
        let batch = Batches::new(&request, std::slice::from_ref(&path), 8).unwrap();
        let requests = batch.of(8, 3);
        assert_eq!(requests.len(), 8);
        let original = image::open(&path).unwrap().to_rgb8();
        let mut seen = std::collections::HashSet::new();
        for (i, r) in requests.iter().enumerate() {
            assert_eq!(r.params.max_tokens, 3);
            let [ImageSource::Bytes { bytes, .. }] = &r.images[..] else {
                panic!("request {i}: expected one image from bytes")
            };
            let image = image::load_from_memory(bytes).unwrap().to_rgb8();
            assert_eq!(image.dimensions(), original.dimensions());
            let changed = image
                .pixels()
                .zip(original.pixels())
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(changed, usize::from(i % 256 != 0), "request {i}");
            assert!(
                seen.insert(image.into_raw()),
                "request {i} repeats an image"
            );
        }
    }
}
