//! mmreg-nn: the building blocks mmreg's models are written with, public so that a model in any crate
//! reuses them instead of copying them.
//!
//! - Loading by checkpoint name: [`Loader`] (`loader.pp("layers").pp(3)`, as candle's `vb.pp`).
//! - Layers: [`Linear`] (also stacking `q_proj`/`k_proj`/`v_proj` or `gate_proj`/`up_proj` into one
//!   matrix multiply), [`Embedding`], [`RmsNorm`] (with the residual-add variant), [`LayerNorm`],
//!   [`Activation`], [`rotary`] embeddings.
//! - [`Attention`]: attention over the paged KV cache. It owns the cache write, the paged read, the
//!   fused kernels and the choice between them; a model calls `attn.forward(q, k, v, step)`.
//! - Towers and decoders: [`clip`] (the CLIP vision tower and its `PixelValues` inputs), [`llama`] (the
//!   Llama/Mistral decoder), [`projector`] (LLaVA's multimodal projector), [`siglip`] (the SigLIP
//!   vision tower), [`gemma`] (the Gemma and Gemma 3 decoders).
//! - Tensor parallelism: [`parallel`] (column- and row-parallel linear layers, the vocab-parallel
//!   embedding and LM head); the Llama decoder is built from them and runs sharded when its model is
//!   loaded as a rank of a group.

mod activation;
pub mod attention;
pub mod clip;
pub mod gemma;
mod linear;
pub mod llama;
mod loader;
mod norm;
pub mod parallel;
mod patch;
pub mod projector;
pub mod rotary;
pub mod siglip;

pub use activation::Activation;
pub use attention::Attention;
pub use linear::{Embedding, Linear};
pub use loader::Loader;
pub use norm::{LayerNorm, RmsNorm};
pub use parallel::{LmHead, RowParallelLinear};
pub use patch::patch_embedding;
