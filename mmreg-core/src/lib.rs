//! mmreg-core: registries, inputs, image processors, checkpoint loading and generation for multimodal
//! models on libtorch.
//!
//! A model crate defines a struct, implements [`LoadModel`], [`MultiModalModel`] and a modality trait
//! such as [`SupportsVision`], and registers it with the attribute macros re-exported here. See
//! `docs/adding-a-multimodal-model.md`.

extern crate self as mmreg_core;

pub mod attention;
pub mod check;
mod context;
pub mod cuda;
pub mod engine;
mod error;
#[doc(hidden)]
pub mod fuzz;
pub mod generate;
pub mod graphs;
mod inputs;
pub mod kernels;
pub mod kv_cache;
mod modality;
pub mod model;
pub mod processors;
pub mod registry;
pub mod sampling;
mod tensors;
pub mod weights;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

pub use context::ModelContext;
pub use engine::{
    Completion, Engine, EngineOptions, EngineProfile, Event, FinishReason, ImageSource, Request,
    RequestHandle,
};
pub use error::{Error, Result};
pub use inputs::{
    DummyRequest, ImageInput, ImageSize, ModalityCounts, MultiModalData, MultiModalItem,
    PlaceholderRange, ProcessedInputs, ProcessorInputs, Prompt, MAX_IMAGE_PIXELS,
};
pub use kv_cache::{AttentionBatch, DecodeGather, KvCacheSpec, PagedKvCache};
pub use modality::Modality;
pub use model::{
    Image, LoadModel, LoadOptions, ModalityKind, MultiModalModel, SupportsModality, SupportsVision,
};
pub use registry::Registry;
pub use sampling::SamplingParams;
pub use tensors::{AnyresPixelValues, ModalityInputs, PixelValues, TensorMap};
pub use weights::Weights;

pub use mmreg_macros::{
    register_dummy_data, register_input_mapper, register_input_processor, register_max_tokens,
    register_model,
};
