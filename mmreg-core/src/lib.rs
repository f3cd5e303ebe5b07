//! mmreg-core: what a multimodal model author touches. The registry and its attribute macros, the model
//! traits, the inputs a request carries, the checkpoint context and weights, the step a forward pass is
//! given, and typed errors.
//!
//! A model crate defines a struct, implements [`LoadModel`], [`MultiModalModel`] and a modality trait
//! such as [`SupportsVision`], and registers it with the attribute macros re-exported here; its layers
//! come from `mmreg-nn`, and `mmreg-engine` runs it. See `docs/adding-a-multimodal-model.md` and
//! `docs/architecture.md`.

extern crate self as mmreg_core;

pub mod check;
mod context;
pub mod defaults;
mod error;
#[doc(hidden)]
#[cfg(feature = "fuzzing")]
pub mod fuzz;
mod inputs;
mod modality;
pub mod model;
pub mod parallel;
pub mod prepare;
pub mod processors;
pub mod registry;
pub mod step;
mod tensors;
pub mod weights;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

pub use context::ModelContext;
pub use error::{Error, Result};
pub use inputs::{
    DummyRequest, ImageInput, ImageSize, ModalityCounts, MultiModalData, MultiModalItem,
    PlaceholderRange, ProcessedInputs, ProcessorInputs, Prompt, PromptPositions, VideoInput,
    MAX_IMAGE_PIXELS,
};
pub use modality::Modality;
pub use model::{
    Image, LanguageModel, LoadModel, LoadOptions, ModalityKind, MultiModalModel, SupportsModality,
    SupportsVideo, SupportsVision, Video,
};
pub use parallel::Collectives;
pub use processors::DefaultMapper;
pub use registry::Registry;
pub use step::{AttentionBatch, KvCacheSpec, PagedKvCache, SlidingLayers, Step};
pub use tensors::{concat_tensors, ModalityInputs, TensorMap};
pub use weights::Weights;

pub use mmreg_macros::{
    register_dummy_data, register_input_mapper, register_input_processor, register_max_tokens,
    register_model, ModalityInputs,
};
