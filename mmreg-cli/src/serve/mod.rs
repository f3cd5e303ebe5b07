//! `mmreg serve`: an OpenAI-compatible HTTP server over the engine (docs/serving.md).
//!
//! The engine runs on its own threads; the server (tokio, axum) renders chat templates, fetches images,
//! submits requests with [`Engine::submit_with`] and turns their events into responses. SIGTERM or
//! ctrl-c stops it accepting connections and lets the running requests finish.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mmreg_core::Modality;
use mmreg_engine::{Engine, EngineOptions, GenerationConfig, SamplingParams};

mod args;
mod chat_template;
mod detokenize;
mod error;
mod media;
mod metrics;
mod openai;
mod respond;
mod routes;

pub use args::ServeArgs;
use chat_template::ChatTemplate;
use media::{MediaFetcher, MediaPolicy};
use metrics::Metrics;

use crate::options::{parse_device, parse_dtype};

/// What every request handler shares.
pub struct AppState {
    pub engine: Engine,
    pub model_name: String,
    pub api_key: Option<String>,
    pub template: Option<ChatTemplate>,
    pub media: MediaFetcher,
    pub metrics: Arc<Metrics>,
    /// Sampling for what a request leaves unset: generation_config.json, then OpenAI's defaults.
    pub defaults: SamplingParams,
    pub max_model_len: usize,
    pub max_images: usize,
    /// Requests admitted at once (running and waiting); more get 503.
    pub queue_limit: usize,
    pub max_body_bytes: usize,
    pub created: u64,
}

pub fn serve(args: &ServeArgs) -> Result<()> {
    let model = match &args.model {
        Some(model) => model.clone(),
        None => crate::demo::demo_model()?,
    };
    let state = Arc::new(app_state(args, &model)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(listen(args, state))
}

fn app_state(args: &ServeArgs, model: &Path) -> Result<AppState> {
    let device = parse_device(&args.device)?;
    if device.is_cuda() && !tch::Cuda::is_available() {
        bail!(
            "--device {}: CUDA is not available on this machine",
            args.device
        );
    }
    let dtype = match args.dtype.as_str() {
        "auto" => auto_dtype(model, device)?,
        other => parse_dtype(other)?,
    };
    if !(0.0..=1.0).contains(&args.gpu_memory_utilization) || args.gpu_memory_utilization == 0.0 {
        bail!("--gpu-memory-utilization must be within (0, 1]");
    }
    let mut options = EngineOptions {
        device,
        dtype,
        max_model_len: args.max_model_len,
        max_num_seqs: args.max_num_seqs,
        gpu_memory_utilization: args.gpu_memory_utilization,
        cpu_kv_cache_bytes: args
            .cpu_kv_cache_gib
            .map_or(0, |gib| (gib * (1u64 << 30) as f64) as usize),
        ..EngineOptions::default()
    };
    args.scheduler.apply(&mut options)?;
    let template = ChatTemplate::load(model, args.chat_template.as_deref())?;
    let engine = Engine::new(model, options)
        .with_context(|| format!("starting the engine on {}", model.display()))?;
    if engine.context().tokenizer().is_err() {
        bail!("{}: the server needs a tokenizer.json", model.display());
    }
    let generation = GenerationConfig::from_context(engine.context())?;
    if !generation.ignored.is_empty() {
        tracing::warn!(
            "generation_config.json: {} not implemented, ignored",
            generation.ignored.join(", ")
        );
    }
    let max_model_len = engine.profile().max_model_len;
    // OpenAI's defaults, under the checkpoint's; a request without max_tokens runs to the model length.
    let defaults = generation.default_params(&SamplingParams {
        max_tokens: max_model_len,
        temperature: 1.0,
        ..SamplingParams::default()
    });
    let allowed_local_path = args
        .allowed_local_media_path
        .as_ref()
        .map(|dir| {
            dir.canonicalize()
                .with_context(|| format!("--allowed-local-media-path {}", dir.display()))
        })
        .transpose()?;
    let max_media_bytes = (args.max_media_mib * (1 << 20) as f64) as usize;
    let media = MediaFetcher::new(MediaPolicy {
        allowed_domains: args.allowed_media_domains.clone(),
        allowed_local_path,
        timeout: Duration::from_secs_f64(args.media_fetch_timeout),
        max_bytes: max_media_bytes,
    })?;
    tracing::info!(
        chat_template = template.as_ref().map_or("none", |t| t.source.as_str()),
        eos = ?defaults.stop_token_ids,
        max_model_len,
        "serving {}",
        model.display()
    );
    Ok(AppState {
        engine,
        model_name: args
            .served_model_name
            .clone()
            .unwrap_or_else(|| model.display().to_string()),
        api_key: args.api_key.clone(),
        template,
        media,
        metrics: Arc::new(Metrics::new()),
        defaults,
        max_model_len,
        max_images: args
            .scheduler
            .limit_mm_per_prompt
            .get(Modality::Image)
            .count,
        queue_limit: args.max_num_seqs + args.max_waiting_requests,
        // Base64 data URLs are 4/3 of the image, and a prompt may carry several.
        max_body_bytes: max_media_bytes * 4 / 3
            * args.scheduler.limit_mm_per_prompt.max_count().max(1)
            + (1 << 20),
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    })
}

/// f32 on the CPU (exact, and what the parity tests use); the checkpoint's dtype on CUDA.
fn auto_dtype(model: &Path, device: tch::Device) -> Result<tch::Kind> {
    if !device.is_cuda() {
        return Ok(tch::Kind::Float);
    }
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(model.join("config.json"))
            .with_context(|| format!("reading {}", model.join("config.json").display()))?,
    )?;
    let dtype = ["torch_dtype", "dtype"]
        .iter()
        .find_map(|key| config.get(key).and_then(|v| v.as_str()))
        .unwrap_or("bfloat16");
    parse_dtype(dtype)
}

async fn listen(args: &ServeArgs, state: Arc<AppState>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("listening on {}:{}", args.host, args.port))?;
    let address = listener.local_addr()?;
    // Scripts and tests wait for this line (with --port 0 it says which port was picked).
    println!("mmreg serve: listening on http://{address}");
    use std::io::Write as _;
    std::io::stdout().flush()?;
    axum::serve(listener, routes::router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    tracing::info!("stopped: every running request finished");
    Ok(())
}

/// SIGTERM or ctrl-c.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down: no new connections; running requests finish");
}
