//! The subcommands.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use mmreg_core::prepare::{self, PreparedInputs};
use mmreg_core::registry::ModelEntry;
use mmreg_core::{
    ImageInput, LoadOptions, ModelContext, MultiModalData, ProcessorInputs, Prompt, Registry,
    VideoInput, Weights,
};
use mmreg_engine::{
    Completion, Engine, EngineOptions, GenerationConfig, ImageSource, Request, RequestHandle,
    SamplingParams,
};
use tch::Tensor;

use crate::options::{parse_device, parse_dtype, SchedulerArgs};

pub fn models() -> Result<()> {
    let registry = Registry::global();
    if registry.models().is_empty() {
        println!("no models are registered in this binary");
    }
    for model in registry.models() {
        let modalities: Vec<_> = model.modalities().iter().map(|m| m.name()).collect();
        println!(
            "{}  ({})  modalities: {}",
            model.architectures().join(", "),
            model.id.path,
            if modalities.is_empty() {
                "none".into()
            } else {
                modalities.join(", ")
            }
        );
        for line in model.listing() {
            println!(
                "    {:<22} {:<36} {}",
                line.what, line.function, line.location
            );
        }
    }
    for problem in registry.problems() {
        println!("problem: {problem}");
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Architecture name, Rust type name or path.
    pub model: String,
    /// A checkpoint directory whose configs to use (default: the configs' defaults).
    #[arg(long = "model-dir")]
    pub model_dir: Option<PathBuf>,
}

pub fn inspect(args: &InspectArgs) -> Result<()> {
    let entry = Registry::global().find(&args.model)?;
    let ctx = context(args.model_dir.as_ref())?;
    println!("model:         {}", entry.id.path);
    println!("architectures: {}", entry.architectures().join(", "));
    for line in entry.listing() {
        println!("{:<24} {:<36} {}", line.what, line.function, line.location);
    }
    for registration in entry.registrations() {
        if let mmreg_core::registry::Hook::InputMapper {
            params,
            host,
            modality,
            ..
        } = &registration.hook
        {
            let listed: Vec<String> = params
                .iter()
                .map(|p| match host.contains(p) {
                    true => format!("{p} (host)"),
                    false => p.to_string(),
                })
                .collect();
            println!("forward parameters ({modality}): {}", listed.join(", "));
        }
    }
    for modality in entry.modalities() {
        match entry.max_tokens(&ctx, modality) {
            Ok(max) => println!("max tokens per {modality}: {max}"),
            Err(e) => println!("max tokens per {modality}: error: {e}"),
        }
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct ParityArgs {
    /// A directory written by `scripts/parity.py` (checkpoint, parity.json, parity.safetensors).
    pub dir: PathBuf,
    /// Also run every case through the engine in one batch.
    #[arg(long)]
    pub engine: bool,
}

/// Prints every comparison with transformers' goldens; fails if one does.
pub fn parity(args: &ParityArgs) -> Result<()> {
    let mut report = mmreg_parity::check(&args.dir)?;
    if args.engine {
        let engine = mmreg_parity::check_engine(&args.dir, EngineOptions::default())?;
        report.checks.extend(engine.checks);
    }
    print!("{}", report.table());
    let failed = report.failures().len();
    anyhow::ensure!(
        failed == 0,
        "{failed} of {} checks differ from transformers",
        report.checks.len()
    );
    println!(
        "{}: all {} checks agree with transformers",
        report.arch,
        report.checks.len()
    );
    Ok(())
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Check one model (architecture or type name); all models when absent.
    pub model: Option<String>,
    /// A checkpoint directory: use its configs, and load its weights to check the model's embeddings.
    #[arg(long = "model-dir")]
    pub model_dir: Option<PathBuf>,
    /// Sequence length the dummy data is asked to fill; default: 4096, or more where one costliest
    /// item of each modality needs it (a long video, say).
    #[arg(long)]
    pub seq_len: Option<usize>,
}

pub fn check(args: &CheckArgs) -> Result<()> {
    let registry = Registry::global();
    registry.validate()?;
    let entries: Vec<&ModelEntry> = match &args.model {
        Some(name) => vec![registry.find(name)?],
        None => registry.models().iter().collect(),
    };
    let ctx = context(args.model_dir.as_ref())?;
    let model = match &args.model_dir {
        Some(dir) => Some(load(entries[0], &ctx, dir, &LoadOptions::default())?),
        None => None,
    };
    for entry in entries {
        let checked = (|| -> Result<mmreg_core::check::CheckReport> {
            let seq_len = match args.seq_len {
                Some(seq_len) => seq_len,
                None => {
                    let items = entry
                        .modalities()
                        .into_iter()
                        .map(|m| entry.max_tokens(&ctx, m))
                        .sum::<mmreg_core::Result<usize>>()
                        .context("max tokens")?;
                    // Room for the items and some text around them.
                    4096.max(items + 64)
                }
            };
            Ok(mmreg_core::check::check_model(
                entry,
                &ctx,
                seq_len,
                model.as_deref(),
            )?)
        })();
        let report = match checked {
            Ok(report) => report,
            // Checking every model without a checkpoint: one whose processor frames its items with
            // text (Gemma 3, Idefics3) needs a tokenizer, which only a checkpoint has.
            Err(e)
                if args.model.is_none() && args.model_dir.is_none() && ctx.tokenizer().is_err() =>
            {
                println!(
                    "skip  {}  needs a checkpoint's tokenizer (--model-dir): {e:#}",
                    entry.id.path
                );
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("checking {}", entry.id.path)),
        };
        println!(
            "ok  {}  dummy prompt: {} tokens",
            entry.id.path, report.prompt_tokens
        );
        for m in report.modalities {
            println!(
                "    {}: max {} tokens per item, dummy items {:?}, mapped {:?}",
                m.modality, m.max_tokens, m.dummy_item_tokens, m.mapped
            );
        }
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct PromptArgs {
    /// Checkpoint directory (config.json, safetensors, tokenizer.json, preprocessor_config.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt text; each `<image>` marks where an image goes.
    #[arg(long)]
    pub prompt: String,
    /// Image files, in the order of the prompt's `<image>` markers.
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    /// A video as its frame files, comma-separated (`--video f1.png,f2.png,...`), in the order of the
    /// prompt's video markers; repeatable.
    #[arg(long = "video", value_parser = parse_frames)]
    pub videos: Vec<Vec<PathBuf>>,
}

#[derive(Debug, Args)]
pub struct PreprocessArgs {
    #[command(flatten)]
    pub prompt: PromptArgs,
    /// Output safetensors file.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn preprocess(args: &PreprocessArgs) -> Result<()> {
    let ctx = ModelContext::from_dir(&args.prompt.model)?;
    let entry = Registry::global().for_context(&ctx)?;
    let prepared = prepare(entry, &ctx, &args.prompt, usize::MAX)?;
    let mut tensors = vec![(
        "input_ids".to_owned(),
        prepared.processed.input_ids().unsqueeze(0),
    )];
    for (_, mapped) in prepared.mapped {
        tensors.extend(mapped.0);
    }
    Tensor::write_safetensors(&tensors, &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    for (name, tensor) in &tensors {
        println!("{name}: {:?} {:?}", tensor.kind(), tensor.size());
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Checkpoint directory (config.json, safetensors, tokenizer.json, preprocessor_config.json);
    /// default: the embedded demo model, a tiny LLaVA that describes shapes (prompt "<image> describe:").
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Prompt text; each `<image>` marks where an image goes.
    #[arg(
        long,
        required_unless_present = "requests",
        conflicts_with = "requests"
    )]
    pub prompt: Option<String>,
    /// Image files, in the order of the prompt's `<image>` markers.
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    /// A video as its frame files, comma-separated (`--video f1.png,f2.png,...`); repeatable.
    #[arg(long = "video", value_parser = parse_frames)]
    pub videos: Vec<Vec<PathBuf>>,
    /// A JSON-lines file of requests (`{"prompt": ..., "images": [...], "videos": [[...]],
    /// "max_tokens": 32, ...}`), run
    /// batched; one JSON object per line is printed, in input order.
    #[arg(long)]
    pub requests: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub top_k: i64,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when the text contains this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Print one JSON object with `text` and `token_ids`.
    #[arg(long)]
    pub json: bool,
    /// With --json, also print the ids of the N most likely tokens at each step (`top_tokens`).
    #[arg(long, default_value_t = 0)]
    pub top_logprobs: usize,
    /// Longest sequence (prompt and output); default: the model's.
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    /// KV cache size on the CPU, in GiB (on CUDA it is profiled); default: room for --max-num-seqs
    /// sequences of --max-model-len tokens, within half the available memory.
    #[arg(long)]
    pub cpu_kv_cache_gib: Option<f64>,
    #[command(flatten)]
    pub scheduler: SchedulerArgs,
}

/// One line of a `--requests` file; absent fields take the command line's values.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestLine {
    /// The prompt as text (placeholders written as the model's markers), or …
    #[serde(default)]
    prompt: Option<String>,
    /// … as token ids, each image or video marked by its one placeholder token (vLLM's
    /// `prompt_token_ids`).
    #[serde(default)]
    prompt_token_ids: Option<Vec<u32>>,
    #[serde(default)]
    images: Vec<PathBuf>,
    /// Each video as its frame files.
    #[serde(default)]
    videos: Vec<Vec<PathBuf>>,
    max_tokens: Option<usize>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    seed: Option<u64>,
    #[serde(default)]
    stop: Vec<String>,
    #[serde(default)]
    stop_token_ids: Vec<u32>,
    ignore_eos: Option<bool>,
}

impl GenerateArgs {
    fn params(&self, eos: &[u32]) -> SamplingParams {
        SamplingParams {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            stop_token_ids: if self.ignore_eos {
                Vec::new()
            } else {
                eos.to_vec()
            },
            stop: self.stop.clone(),
            top_logprobs: self.top_logprobs,
            logprobs: false,
        }
    }

    fn request(&self, line: RequestLine, eos: &[u32]) -> Request {
        let mut params = self.params(eos);
        params.max_tokens = line.max_tokens.unwrap_or(params.max_tokens);
        params.temperature = line.temperature.unwrap_or(params.temperature);
        params.top_p = line.top_p.unwrap_or(params.top_p);
        params.top_k = line.top_k.unwrap_or(params.top_k);
        params.seed = line.seed.or(params.seed);
        params.stop.extend(line.stop);
        if line.ignore_eos == Some(true) {
            params.stop_token_ids.clear();
        }
        params.stop_token_ids.extend(line.stop_token_ids);
        let images = line.images.into_iter().map(ImageSource::Path).collect();
        let videos = line
            .videos
            .into_iter()
            .map(|frames| frames.into_iter().map(ImageSource::Path).collect())
            .collect();
        Request {
            videos,
            prompt: match line.prompt_token_ids {
                Some(ids) => Prompt::TokenIds(ids),
                None => Prompt::Text(line.prompt.unwrap_or_default()),
            },
            images,
            params,
        }
    }
}

pub fn generate(args: &GenerateArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    if let tch::Device::Cuda(_) = device {
        if !tch::Cuda::is_available() {
            bail!(
                "--device {}: CUDA is not available on this machine",
                args.device
            );
        }
    }
    let mut options = EngineOptions {
        device,
        dtype: parse_dtype(&args.dtype)?,
        max_model_len: args.max_model_len,
        max_num_seqs: args.max_num_seqs,
        cpu_kv_cache_bytes: args
            .cpu_kv_cache_gib
            .map_or(0, |gib| (gib * (1u64 << 30) as f64) as usize),
        ..EngineOptions::default()
    };
    args.scheduler.apply(&mut options)?;
    let model = match &args.model {
        Some(model) => model.clone(),
        None => crate::demo::demo_model()?,
    };
    let engine = Engine::new(&model, options)
        .with_context(|| format!("starting the engine on {}", model.display()))?;
    // EOS from generation_config.json (one id or a list), else config.json, as HF's generate stops.
    let eos = GenerationConfig::from_context(engine.context())?.eos_token_ids;
    let eos = eos.as_slice();
    let Some(path) = &args.requests else {
        let line = RequestLine {
            prompt: args.prompt.clone(),
            prompt_token_ids: None,
            images: args.images.clone(),
            videos: args.videos.clone(),
            max_tokens: None,
            temperature: None,
            top_p: None,
            top_k: None,
            seed: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: None,
        };
        let completion = engine.submit(args.request(line, eos)).wait()?;
        if args.json {
            println!("{}", completion_json(&completion, args.top_logprobs));
        } else {
            println!("{}", completion.text);
        }
        return Ok(());
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let progress = indicatif::ProgressBar::new(lines.len() as u64);
    // Submit everything first so the engine batches; a line that does not parse gets its error in place.
    let handles: Vec<std::result::Result<RequestHandle, String>> = lines
        .iter()
        .enumerate()
        .map(
            |(i, line)| match serde_json::from_str::<RequestLine>(line) {
                Ok(line) if line.prompt.is_some() == line.prompt_token_ids.is_some() => {
                    Err(format!(
                        "line {}: give exactly one of `prompt` and `prompt_token_ids`",
                        i + 1
                    ))
                }
                Ok(line) => Ok(engine.submit(args.request(line, eos))),
                Err(e) => Err(format!("line {}: invalid request: {e}", i + 1)),
            },
        )
        .collect();
    for handle in handles {
        let json = match handle.map(|h| h.wait().map_err(|e| e.to_string())) {
            Ok(Ok(completion)) => completion_json(&completion, args.top_logprobs),
            Ok(Err(error)) | Err(error) => serde_json::json!({ "error": error }),
        };
        progress.suspend(|| println!("{json}"));
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok(())
}

fn completion_json(completion: &Completion, top_logprobs: usize) -> serde_json::Value {
    let mut json = serde_json::json!({
        "text": completion.text,
        "token_ids": completion.token_ids,
        "prompt_tokens": completion.prompt_tokens,
        "cached_tokens": completion.cached_tokens,
    });
    if top_logprobs > 0 {
        json["top_tokens"] = serde_json::json!(completion.top_tokens);
    }
    json
}

fn context(dir: Option<&PathBuf>) -> Result<ModelContext> {
    Ok(match dir {
        Some(dir) => ModelContext::from_dir(dir)?,
        None => ModelContext::from_json(serde_json::json!({}), serde_json::json!({})),
    })
}

fn load(
    entry: &ModelEntry,
    ctx: &ModelContext,
    dir: &PathBuf,
    options: &LoadOptions,
) -> Result<Box<dyn mmreg_core::MultiModalModel>> {
    let weights = Weights::from_dir(dir)?;
    Ok(entry.load(ctx, &weights, options)?)
}

fn prepare(
    entry: &ModelEntry,
    ctx: &ModelContext,
    args: &PromptArgs,
    max_len: usize,
) -> Result<PreparedInputs> {
    let images = args
        .images
        .iter()
        .map(ImageInput::open)
        .collect::<mmreg_core::Result<Vec<_>>>()?;
    let videos = args
        .videos
        .iter()
        .map(|frames| open_video(frames))
        .collect::<mmreg_core::Result<Vec<_>>>()?;
    let inputs = ProcessorInputs {
        prompt: Prompt::Text(args.prompt.clone()),
        multimodal: MultiModalData { images, videos },
    };
    Ok(prepare::prepare(entry, ctx, inputs, max_len)?)
}

/// `f1.png,f2.png,...`: a video's frame files.
fn parse_frames(text: &str) -> std::result::Result<Vec<PathBuf>, String> {
    let frames: Vec<PathBuf> = text.split(',').map(PathBuf::from).collect();
    if frames.iter().any(|f| f.as_os_str().is_empty()) {
        return Err(format!(
            "`{text}`: expected frame files separated by commas"
        ));
    }
    Ok(frames)
}

/// A video from its frame files, named after the first.
fn open_video(frames: &[PathBuf]) -> mmreg_core::Result<VideoInput> {
    let name = frames
        .first()
        .map(|f| format!("video {}", f.display()))
        .unwrap_or_else(|| "video".into());
    let frames = frames
        .iter()
        .map(|f| ImageInput::open(f).map(|f| f.image))
        .collect::<mmreg_core::Result<Vec<_>>>()?;
    Ok(VideoInput::new(name, frames))
}
