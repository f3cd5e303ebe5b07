//! The mmreg command line, as a library so that any binary can offer it over the models it links
//! (see `examples/toy-vlm`): `fn main() -> ExitCode { mmreg_cli::main() }` after `use my_models as _;`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod bench_cache;
mod commands;
mod demo;
mod options;
mod serve;

#[derive(Debug, Parser)]
#[command(
    name = "mmreg",
    version,
    about = "Multimodal models on libtorch: list, inspect, check, preprocess, generate, serve"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List every registered architecture, its modalities and registrations with their source locations.
    Models,
    /// Show one registered model in detail, including max tokens per item.
    Inspect(commands::InspectArgs),
    /// Validate the registry, then run a model's dummy data through its processor and mappers.
    Check(commands::CheckArgs),
    /// Write exactly what the model would be fed (input_ids and mapped tensors) to a safetensors file.
    Preprocess(commands::PreprocessArgs),
    /// Generate text for a prompt with images, or for a JSON-lines file of requests.
    Generate(commands::GenerateArgs),
    /// Measure prefill latency, time to first token and decode throughput.
    Bench(bench::BenchArgs),
    /// Serve a model over HTTP with OpenAI's API (chat completions with images, completions, models).
    Serve(serve::ServeArgs),
    /// Check a checkpoint's registered model against the goldens `scripts/parity.py` wrote next to it.
    Parity(commands::ParityArgs),
}

/// Parses the command line, runs the command, prints errors with their causes.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Warnings (a CUDA graph that could not be captured, say) on stderr; MMREG_LOG=debug for more. A
    // server also logs its start-up figures (KV cache, chat template).
    let default_filter = match cli.command {
        Command::Serve(_) => "warn,mmreg_engine=info,mmreg_cli=info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MMREG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Models => commands::models(),
        Command::Inspect(args) => commands::inspect(&args),
        Command::Check(args) => commands::check(&args),
        Command::Preprocess(args) => commands::preprocess(&args),
        Command::Generate(args) => commands::generate(&args),
        Command::Bench(args) => bench::bench(&args),
        Command::Serve(args) => serve::serve(&args),
        Command::Parity(args) => commands::parity(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
