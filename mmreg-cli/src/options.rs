//! Command-line values shared by the subcommands.

use anyhow::{anyhow, bail, Result};
use mmreg_engine::{EngineOptions, MultiModalLimits};
use tch::{Device, Kind};

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(text: &str) -> Result<Device> {
    match text {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => text
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| anyhow!("--device: `{text}`: expected cpu, cuda or cuda:N")),
    }
}

/// Parses `f32`, `bf16` or `f16`.
pub fn parse_dtype(text: &str) -> Result<Kind> {
    match text {
        "f32" | "float32" => Ok(Kind::Float),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        "f16" | "float16" => Ok(Kind::Half),
        _ => bail!("--dtype: `{text}`: expected f32, bf16 or f16"),
    }
}

/// The scheduler's and the caches' flags, shared by `generate` and `serve` (named as vLLM names them).
#[derive(Debug, clap::Args)]
pub struct SchedulerArgs {
    /// Tokens one step computes at most; a longer prompt is prefilled in chunks over several steps,
    /// beside the running decodes.
    #[arg(long, default_value_t = 8192)]
    pub max_num_batched_tokens: usize,
    #[command(flatten)]
    pub chunked_prefill: ChunkedPrefillArgs,
    /// Compute every prompt from scratch: no reuse of the KV-cache blocks of a prefix seen before.
    #[arg(long)]
    pub no_prefix_caching: bool,
    /// MiB of vision-encoder outputs kept by image hash for reuse (0: none).
    #[arg(long, default_value_t = 1024.0)]
    pub encoder_cache_mib: f64,
    /// Items per prompt and modality, `image=N,video=N`, or vLLM's JSON form with an optional largest
    /// size, `{"image": {"count": 1, "width": 512, "height": 512}}`. Startup profiling reserves memory for
    /// that many of the largest; a request over the limits is refused.
    #[arg(long, value_parser = MultiModalLimits::parse, default_value = "image=4,video=4")]
    pub limit_mm_per_prompt: MultiModalLimits,
    /// Issue each greedy decode step (CUDA graphs) before the host has read the previous step's tokens,
    /// so the GPU does not wait while the host streams them: the default, kept as vLLM's flag.
    #[arg(long, conflicts_with = "no_async_scheduling")]
    pub async_scheduling: bool,
    /// Read each step's tokens before issuing the next (also `MMREG_ASYNC_SCHEDULING=0`).
    #[arg(long)]
    pub no_async_scheduling: bool,
    #[command(flatten)]
    pub parallel: ParallelArgs,
}

/// Chunked prefill on or off (`generate`, `serve`, `bench`), named as vLLM names it.
#[derive(Debug, Clone, clap::Args)]
pub struct ChunkedPrefillArgs {
    /// Split prompts over steps so that each step fills --max-num-batched-tokens, where that lets a
    /// waiting prompt finish a step sooner: the default, kept as vLLM's flag.
    #[arg(long, conflicts_with = "no_enable_chunked_prefill")]
    pub enable_chunked_prefill: bool,
    /// Prefill each prompt in one step: a prompt that does not fit in what is left of a step waits for
    /// the next (one longer than --max-num-batched-tokens is still split).
    #[arg(long)]
    pub no_enable_chunked_prefill: bool,
}

impl ChunkedPrefillArgs {
    pub fn apply(&self, options: &mut EngineOptions) {
        options.enable_chunked_prefill = !self.no_enable_chunked_prefill;
    }
}

/// Tensor parallelism (`generate`, `serve`, `bench`).
#[derive(Debug, Clone, clap::Args)]
pub struct ParallelArgs {
    /// Devices the decoder is split over (its heads, MLP and vocabulary): cuda:i … cuda:i+N−1 from
    /// `--device cuda:i` (NCCL), or N ranks on the CPU (Gloo). One thread per rank.
    #[arg(long, default_value_t = 1)]
    pub tensor_parallel_size: usize,
    /// How the vision tower runs over the ranks: replicated and run on rank 0 (`rank0`), replicated with
    /// each rank encoding a share of a step's items (`data`), or split over the ranks like the decoder
    /// (`weights`; CLIP and SigLIP towers), as vLLM's `--mm-encoder-tp-mode`.
    #[arg(long, value_enum, default_value = "rank0")]
    pub mm_encoder_tp_mode: EncoderMode,
}

/// `--mm-encoder-tp-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EncoderMode {
    Rank0,
    Data,
    Weights,
}

impl ParallelArgs {
    /// Sets the engine's tensor-parallel size.
    pub fn apply(&self, options: &mut EngineOptions) -> Result<()> {
        if self.tensor_parallel_size == 0 {
            bail!("--tensor-parallel-size must be at least 1");
        }
        options.tensor_parallel_size = self.tensor_parallel_size;
        options.mm_encoder_tp_mode = match self.mm_encoder_tp_mode {
            EncoderMode::Rank0 => mmreg_engine::EncoderTpMode::Rank0,
            EncoderMode::Data => mmreg_engine::EncoderTpMode::Data,
            EncoderMode::Weights => mmreg_engine::EncoderTpMode::Weights,
        };
        Ok(())
    }
}

impl SchedulerArgs {
    /// Sets these flags' fields of the engine's options.
    pub fn apply(&self, options: &mut EngineOptions) -> Result<()> {
        if self.max_num_batched_tokens == 0 {
            bail!("--max-num-batched-tokens must be at least 1");
        }
        if self.encoder_cache_mib.is_nan() || self.encoder_cache_mib < 0.0 {
            bail!("--encoder-cache-mib must be 0 or more");
        }
        options.max_num_batched_tokens = self.max_num_batched_tokens;
        self.chunked_prefill.apply(options);
        options.prefix_caching = !self.no_prefix_caching;
        options.encoder_cache_bytes = (self.encoder_cache_mib * (1u64 << 20) as f64) as usize;
        options.limit_mm_per_prompt = self.limit_mm_per_prompt.clone();
        options.async_scheduling = match (self.async_scheduling, self.no_async_scheduling) {
            (true, _) => true,
            (_, true) => false,
            _ => options.async_scheduling,
        };
        self.parallel.apply(options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        scheduler: SchedulerArgs,
    }

    fn async_scheduling(args: &[&str], default: bool) -> Result<bool> {
        let cli = Cli::try_parse_from(std::iter::once("mmreg").chain(args.iter().copied()))?;
        let mut options = EngineOptions {
            async_scheduling: default,
            ..EngineOptions::default()
        };
        cli.scheduler.apply(&mut options)?;
        Ok(options.async_scheduling)
    }

    #[test]
    fn async_scheduling_follows_the_flags_over_the_default() {
        for default in [true, false] {
            assert_eq!(async_scheduling(&[], default).unwrap(), default);
            assert!(async_scheduling(&["--async-scheduling"], default).unwrap());
            assert!(!async_scheduling(&["--no-async-scheduling"], default).unwrap());
        }
        let both = ["--async-scheduling", "--no-async-scheduling"];
        assert!(async_scheduling(&both, true).is_err(), "conflicting flags");
    }

    #[test]
    fn chunked_prefill_is_on_unless_switched_off() {
        let chunked = |args: &[&str]| -> Result<bool> {
            let cli = Cli::try_parse_from(std::iter::once("mmreg").chain(args.iter().copied()))?;
            let mut options = EngineOptions::default();
            cli.scheduler.apply(&mut options)?;
            Ok(options.enable_chunked_prefill)
        };
        assert!(chunked(&[]).unwrap());
        assert!(chunked(&["--enable-chunked-prefill"]).unwrap());
        assert!(!chunked(&["--no-enable-chunked-prefill"]).unwrap());
        let both = ["--enable-chunked-prefill", "--no-enable-chunked-prefill"];
        assert!(chunked(&both).is_err(), "conflicting flags");
    }
}
