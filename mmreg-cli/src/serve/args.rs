//! `mmreg serve`'s flags, named as vLLM's `vllm serve` names them where it has the same one.

use std::path::PathBuf;

use clap::Args;

use crate::options::SchedulerArgs;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Checkpoint directory; default: the embedded demo model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Address to listen on (0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on; 0 picks a free one. The address is printed on stdout once the server listens.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The model name clients send and `/v1/models` lists; default: --model as given.
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Require `Authorization: Bearer KEY` on /v1/ routes (also read from $MMREG_API_KEY).
    #[arg(long, env = "MMREG_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Longest sequence (prompt and output); default: the model's.
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Share of the GPU's free memory the engine may use (weights, activations and KV cache).
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    #[command(flatten)]
    pub scheduler: SchedulerArgs,
    /// A chat template (a file, or the template itself) used instead of the checkpoint's.
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
    /// Hosts http(s) image URLs may be fetched from (comma-separated, or repeated); `*` allows any.
    /// Without it, http(s) image URLs are refused.
    #[arg(long, value_delimiter = ',')]
    pub allowed_media_domains: Vec<String>,
    /// Serve `file://` image URLs from under this directory (and nowhere else).
    #[arg(long)]
    pub allowed_local_media_path: Option<PathBuf>,
    /// Seconds an image download may take.
    #[arg(long, default_value_t = 10.0)]
    pub media_fetch_timeout: f64,
    /// Largest image download or file, in MiB.
    #[arg(long, default_value_t = 20.0)]
    pub max_media_mib: f64,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Requests that may wait beyond the --max-num-seqs running ones; more get 503 with Retry-After.
    #[arg(long, default_value_t = 256)]
    pub max_waiting_requests: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, bf16, f16, or auto: f32 on the CPU, the checkpoint's `torch_dtype` on CUDA.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// KV cache size on the CPU, in GiB; default: room for --max-num-seqs sequences of --max-model-len
    /// tokens, within half the available memory.
    #[arg(long)]
    pub cpu_kv_cache_gib: Option<f64>,
}
