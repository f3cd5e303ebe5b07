//! The traits a multimodal model implements: the language-model side the engine drives
//! ([`MultiModalModel`]), loading ([`LoadModel`]), and one typed trait per modality ([`SupportsVision`],
//! or in general [`SupportsModality`]).

use std::any::Any;

use tch::{Device, Kind, Tensor};

use crate::inputs::{ImageInput, ImageSize, MultiModalData};
use crate::kv_cache::{AttentionBatch, KvCacheSpec, PagedKvCache};
use crate::tensors::ModalityInputs;
use crate::weights::Weights;
use crate::{Modality, ModelContext, Result};

/// Lets the registry's generated glue recover a model's concrete type from `&dyn MultiModalModel`.
pub trait AsAny: Any {
    fn as_any(&self) -> &dyn Any;
}

impl<T: Any> AsAny for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Device and dtype for a model's weights and activations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: Kind,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: Kind::Float,
        }
    }
}

/// Builds a model from a checkpoint. `#[register_model("Arch")]` registers this constructor.
pub trait LoadModel: MultiModalModel + Sized {
    fn load(ctx: &ModelContext, weights: &Weights, options: &LoadOptions) -> Result<Self>;
}

/// The language-model side of a multimodal model, object-safe so the engine holds `Box<dyn MultiModalModel>`.
///
/// A step packs the new tokens of every sequence in the batch along one axis (`[tokens, hidden]`):
/// prefills and decodes of different lengths mix freely. The multimodal embeddings are merged into the
/// token embeddings by the caller, at the placeholder positions.
pub trait MultiModalModel: AsAny + Send {
    /// Token embeddings: i64 ids of any shape → that shape plus `[hidden]`.
    fn embed_tokens(&self, token_ids: &Tensor) -> Result<Tensor>;

    /// Runs the decoder over `[tokens, hidden]` embeddings laid out as `batch` describes, writes their
    /// keys and values to `cache`, and returns the logits of `batch.logits_indices` (all rows if none):
    /// `[rows, vocab]`.
    fn forward(
        &self,
        inputs_embeds: &Tensor,
        batch: &AttentionBatch,
        cache: &mut PagedKvCache,
    ) -> Result<Tensor>;

    /// What the KV cache holds per token for this model.
    fn kv_cache_spec(&self) -> KvCacheSpec;

    fn device(&self) -> Device;

    fn dtype(&self) -> Kind;

    /// The longest sequence the model supports (`max_position_embeddings`).
    fn max_model_len(&self) -> usize;

    /// Whether the engine may capture steps as CUDA graphs and replay them with new values in the same
    /// tensors. Return true only if [`Self::embed_tokens`] and [`Self::forward`] run no host
    /// synchronisation and launch kernels that depend on nothing but the batch's tensors and their
    /// shapes, for two kinds of batch: decodes ([`AttentionBatch::decode_gather`] set, `sequences`
    /// empty), and one fresh sequence (`sequences` = one slice with `start` and `context` 0).
    fn supports_cuda_graphs(&self) -> bool {
        false
    }
}

/// A marker type per modality, linking it to the item type a request carries.
pub trait ModalityKind: 'static {
    const MODALITY: Modality;
    type Item: 'static;

    fn items(data: &MultiModalData) -> &[Self::Item];
}

/// Marker for [`Modality::Image`].
pub struct Image;

impl ModalityKind for Image {
    const MODALITY: Modality = Modality::Image;
    type Item = ImageInput;

    fn items(data: &MultiModalData) -> &[ImageInput] {
        &data.images
    }
}

/// A model that accepts modality `K`. Implemented through the per-modality traits such as
/// [`SupportsVision`]; the registration macros are written against this one.
pub trait SupportsModality<K: ModalityKind>: MultiModalModel + Sized {
    /// What the forward pass takes for this modality; the input mapper must produce exactly this.
    type Inputs: ModalityInputs;

    /// The one source of truth for the number of placeholder tokens of an item.
    fn num_tokens(ctx: &ModelContext, item: &K::Item) -> Result<usize>;

    /// Embeds a prompt's items: one `[num_tokens(item), hidden]` tensor per item, in order.
    fn embed(&self, inputs: Self::Inputs) -> Result<Vec<Tensor>>;
}

/// A vision-language model.
pub trait SupportsVision: MultiModalModel + Sized {
    /// The forward parameters for images (e.g. [`crate::PixelValues`]).
    type ImageInputs: ModalityInputs;

    /// Placeholder tokens for one image of this size: the one function the input processor, the dummy
    /// data, the max-tokens registration and the vision path's shape check all call.
    fn num_image_tokens(ctx: &ModelContext, size: ImageSize) -> Result<usize>;

    /// Image features, one `[num_image_tokens, hidden]` tensor per image.
    fn embed_images(&self, inputs: Self::ImageInputs) -> Result<Vec<Tensor>>;
}

impl<T: SupportsVision> SupportsModality<Image> for T {
    type Inputs = T::ImageInputs;

    fn num_tokens(ctx: &ModelContext, item: &ImageInput) -> Result<usize> {
        T::num_image_tokens(ctx, item.size())
    }

    fn embed(&self, inputs: Self::Inputs) -> Result<Vec<Tensor>> {
        self.embed_images(inputs)
    }
}
