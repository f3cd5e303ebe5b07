//! mmreg-engine: runs a registered model for many requests at once. Preprocessing on worker threads, a
//! scheduler that mixes prefills and decodes over one paged KV cache sized by profiling the model's dummy
//! data, CUDA graphs for the fixed-shape steps, and the CUDA shim and kernels underneath.
//!
//! Nothing here names a model: the engine finds one through `mmreg_core::Registry`, drives it through
//! `mmreg_core::MultiModalModel`, and hands each forward a `mmreg_core::Step`.

mod block_pool;
mod blocks;
pub mod cuda;
pub mod cudnn;
pub mod dist;
mod encoder_cache;
mod engine;
pub mod generate;
mod generation_config;
pub mod graphs;
mod items;
pub mod kernels;
mod limits;
mod profile;
mod ranks;
pub mod sampling;
mod scheduler;
mod sliding_pool;
mod step_graphs;
mod switch;
pub mod tuned_gemm;

pub use block_pool::{block_hash, BlockPool, Hash};
pub use blocks::{
    attention_batch, set_bidirectional, set_positions, set_sliding_slots, slots, step_positions,
    BlockAllocator, SeqPositions,
};
pub use encoder_cache::{item_hash, processor_settings, EncoderCache};
pub use engine::{
    Canceller, Completion, EncoderTpMode, Engine, EngineCounters, EngineOptions, EngineProfile,
    Event, FinishReason, ImageSource, Request, RequestHandle, StepTiming, TokenLogprobs,
};
pub use generation_config::GenerationConfig;
pub use limits::{ModalityLimit, MultiModalLimits, DEFAULT_ITEMS_PER_PROMPT};
pub use sampling::SamplingParams;

/// The per-user cache mmreg keeps files in (libtorch's venv, the demo model, tuned products' picks):
/// `$MMREG_CACHE`, else `$XDG_CACHE_HOME/mmreg`, else `~/.cache/mmreg`; `None` without any of them.
pub fn cache_dir() -> Option<std::path::PathBuf> {
    use std::path::PathBuf;
    let set = |var| std::env::var_os(var).filter(|v| !v.is_empty());
    set("MMREG_CACHE").map(PathBuf::from).or_else(|| {
        set("XDG_CACHE_HOME")
            .map(|dir| PathBuf::from(dir).join("mmreg"))
            .or_else(|| set("HOME").map(|home| PathBuf::from(home).join(".cache/mmreg")))
    })
}
