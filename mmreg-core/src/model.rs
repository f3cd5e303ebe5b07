//! The traits a multimodal model implements: the language-model side the engine drives
//! ([`MultiModalModel`]), loading ([`LoadModel`]), and one typed trait per modality ([`SupportsVision`],
//! or in general [`SupportsModality`]).

use std::any::Any;

use tch::{Device, Kind, Tensor};

use crate::inputs::{ImageInput, ImageSize, MultiModalData, VideoInput};
use crate::step::{KvCacheSpec, Step};
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

/// Device and dtype for a model's weights and activations, and the tensor-parallel group the model is
/// one rank of (its layers then load and compute their slices).
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: Kind,
    pub tensor_parallel: Option<std::sync::Arc<dyn crate::parallel::Collectives>>,
    /// Whether the CLIP/SigLIP vision towers are split over the tensor-parallel group too (by heads and
    /// MLP features, as the decoder), rather than replicated on every rank.
    pub shard_vision_tower: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: Kind::Float,
            tensor_parallel: None,
            shard_vision_tower: false,
        }
    }
}

/// Builds a model from a checkpoint. `#[register_model("Arch")]` registers this constructor.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be registered as a model: it does not implement `LoadModel`",
    note = "#[register_model(\"Arch\")] registers `LoadModel::load` as the constructor: `impl LoadModel for {Self}`"
)]
pub trait LoadModel: MultiModalModel + Sized {
    fn load(ctx: &ModelContext, weights: &Weights, options: &LoadOptions) -> Result<Self>;
}

/// The decoder a multimodal model's merged embeddings go through, object-safe: token embeddings, a
/// forward over one engine [`Step`], and what its KV cache holds. `mmreg_nn::llama::Llama` is one.
///
/// A step packs the new tokens of every sequence in the batch along one axis (`[tokens, hidden]`):
/// prefills and decodes of different lengths mix freely.
pub trait LanguageModel: Send {
    /// Token embeddings: i64 ids of any shape → that shape plus `[hidden]`.
    fn embed_tokens(&self, token_ids: &Tensor) -> Result<Tensor>;

    /// Runs the decoder over the step's `[tokens, hidden]` embeddings and returns the logits of the rows
    /// the step asks for ([`Step::logits_rows`]): `[rows, vocab]`. The attention layers take the step
    /// as it is; the model reads nothing else of it but [`Step::positions`].
    fn forward(&self, inputs_embeds: &Tensor, step: &mut Step) -> Result<Tensor>;

    /// What the KV cache holds per token for this model.
    fn kv_cache_spec(&self) -> KvCacheSpec;

    fn device(&self) -> Device;

    /// The activations' dtype: by default the KV cache's.
    fn dtype(&self) -> Kind {
        self.kv_cache_spec().kind
    }

    /// The longest sequence the model supports (`max_position_embeddings`).
    fn max_model_len(&self) -> usize;

    /// How many rows of positions a step carries (`Step::positions`): 1 (`[tokens]`), or 3 for
    /// Qwen2-VL's M-RoPE (`[3, tokens]`: temporal, height, width).
    fn position_sections(&self) -> usize {
        1
    }

    /// Whether the engine may capture steps as CUDA graphs and replay them with new values in the same
    /// tensors. Return true only if [`Self::embed_tokens`] and [`Self::forward`] run no host
    /// synchronisation and launch kernels that depend on nothing but the step's tensors and their
    /// shapes (true of decoders built from `mmreg-nn`'s layers, whose attention handles both kinds of
    /// captured step: a step of decodes, and one fresh sequence).
    fn supports_cuda_graphs(&self) -> bool {
        false
    }
}

/// A multimodal model as the engine holds it (`Box<dyn MultiModalModel>`): its language model, plus the
/// per-modality paths its `SupportsVision` (…) impls give. Every method but [`Self::language_model`]
/// delegates to it; override one only where the model differs from its decoder.
///
/// The multimodal embeddings are merged into the token embeddings by the engine, at the placeholder
/// positions, before [`Self::forward`].
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a multimodal model: it does not implement `MultiModalModel`",
    note = "implement `MultiModalModel::language_model` for `{Self}` (its decoder, e.g. `mmreg_nn::llama::Llama`)"
)]
pub trait MultiModalModel: AsAny + Send {
    /// The decoder the merged embeddings go through.
    fn language_model(&self) -> &dyn LanguageModel;

    fn embed_tokens(&self, token_ids: &Tensor) -> Result<Tensor> {
        self.language_model().embed_tokens(token_ids)
    }

    fn forward(&self, inputs_embeds: &Tensor, step: &mut Step) -> Result<Tensor> {
        self.language_model().forward(inputs_embeds, step)
    }

    fn kv_cache_spec(&self) -> KvCacheSpec {
        self.language_model().kv_cache_spec()
    }

    fn device(&self) -> Device {
        self.language_model().device()
    }

    fn dtype(&self) -> Kind {
        self.language_model().dtype()
    }

    fn max_model_len(&self) -> usize {
        self.language_model().max_model_len()
    }

    fn supports_cuda_graphs(&self) -> bool {
        self.language_model().supports_cuda_graphs()
    }

    fn position_sections(&self) -> usize {
        self.language_model().position_sections()
    }
}

/// A marker type per modality, linking it to the item type a request carries.
pub trait ModalityKind: 'static {
    const MODALITY: Modality;
    type Item: Clone + 'static;

    fn items(data: &MultiModalData) -> &[Self::Item];

    /// A prompt's data holding just these items.
    fn into_data(items: Vec<Self::Item>) -> MultiModalData;
}

/// Marker for [`Modality::Image`].
pub struct Image;

impl ModalityKind for Image {
    const MODALITY: Modality = Modality::Image;
    type Item = ImageInput;

    fn items(data: &MultiModalData) -> &[ImageInput] {
        &data.images
    }

    fn into_data(images: Vec<ImageInput>) -> MultiModalData {
        MultiModalData {
            images,
            ..MultiModalData::default()
        }
    }
}

/// Marker for [`Modality::Video`]: a video given as its frames.
pub struct Video;

impl ModalityKind for Video {
    const MODALITY: Modality = Modality::Video;
    type Item = VideoInput;

    fn items(data: &MultiModalData) -> &[VideoInput] {
        &data.videos
    }

    fn into_data(videos: Vec<VideoInput>) -> MultiModalData {
        MultiModalData {
            videos,
            ..MultiModalData::default()
        }
    }
}

/// A model that accepts modality `K`. Implemented through the per-modality traits such as
/// [`SupportsVision`]; the registration macros are written against this one.
#[diagnostic::on_unimplemented(
    message = "`{Self}` does not accept this modality",
    note = "#[register_input_mapper(image)] needs `impl SupportsVision for {Self}`"
)]
pub trait SupportsModality<K: ModalityKind>: MultiModalModel + Sized {
    /// What the forward pass takes for this modality; the input mapper must produce exactly this.
    type Inputs: ModalityInputs;

    /// The one source of truth for the number of placeholder tokens of an item.
    fn num_tokens(ctx: &ModelContext, item: &K::Item) -> Result<usize>;

    /// The token id that marks an item in a prompt and fills its placeholder run.
    fn placeholder_token(ctx: &ModelContext) -> Result<u32>;

    /// The costliest item the processor accepts: what max tokens and the profiling dummy data use
    /// unless the model registers its own.
    fn costliest_item(ctx: &ModelContext) -> Result<K::Item>;

    /// Embeds a prompt's items: one `[num_tokens(item), hidden]` tensor per item, in order.
    fn embed(&self, inputs: Self::Inputs) -> Result<Vec<Tensor>>;
}

/// A vision-language model. With this trait, the registrations beyond `#[register_model]` and
/// `#[register_input_mapper(image)]` are optional: max tokens, dummy data and the input processor
/// default to what [`Self::image_token_id`], [`Self::largest_image`] and [`Self::num_image_tokens`] say.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a vision model: it does not implement `SupportsVision`",
    note = "#[register_input_mapper(image)] needs `impl SupportsVision for {Self}`"
)]
pub trait SupportsVision: MultiModalModel + Sized {
    /// The forward parameters for images (e.g. `mmreg_nn::clip::PixelValues`).
    type ImageInputs: ModalityInputs;

    /// Placeholder tokens for one image of this size: the one function the input processor, the dummy
    /// data, the max-tokens registration and the vision path's shape check all call.
    fn num_image_tokens(ctx: &ModelContext, size: ImageSize) -> Result<usize>;

    /// The token that marks an image in a prompt (LLaVA's `<image>`, `image_token_index`), which the
    /// default input processor expands into the image's placeholder run.
    fn image_token_id(ctx: &ModelContext) -> Result<u32>;

    /// The size of the image with the most placeholder tokens the processor produces.
    fn largest_image(ctx: &ModelContext) -> Result<ImageSize>;

    /// Image features, one `[num_image_tokens, hidden]` tensor per image.
    fn embed_images(&self, inputs: Self::ImageInputs) -> Result<Vec<Tensor>>;
}

impl<T: SupportsVision> SupportsModality<Image> for T {
    type Inputs = T::ImageInputs;

    fn num_tokens(ctx: &ModelContext, item: &ImageInput) -> Result<usize> {
        T::num_image_tokens(ctx, item.size())
    }

    fn placeholder_token(ctx: &ModelContext) -> Result<u32> {
        T::image_token_id(ctx)
    }

    fn costliest_item(ctx: &ModelContext) -> Result<ImageInput> {
        let size = T::largest_image(ctx)?;
        let blank = image::DynamicImage::new_rgb8(size.width, size.height);
        Ok(ImageInput::new("dummy image", blank))
    }

    fn embed(&self, inputs: Self::Inputs) -> Result<Vec<Tensor>> {
        self.embed_images(inputs)
    }
}

/// A model that accepts videos, given as their frames. Like [`SupportsVision`], it gives the defaults of
/// max tokens, dummy data and the input processor for the video modality.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a video model: it does not implement `SupportsVideo`",
    note = "#[register_input_mapper(video = ...)] needs `impl SupportsVideo for {Self}`"
)]
pub trait SupportsVideo: MultiModalModel + Sized {
    /// The forward parameters for videos (e.g. Qwen2-VL's `pixel_values_videos`, `video_grid_thw`).
    type VideoInputs: ModalityInputs;

    /// Placeholder tokens for one video: the one count the processor, the dummy data and the video
    /// path's shape check all use.
    fn num_video_tokens(ctx: &ModelContext, video: &VideoInput) -> Result<usize>;

    /// The token that marks a video in a prompt.
    fn video_token_id(ctx: &ModelContext) -> Result<u32>;

    /// The video with the most placeholder tokens the processor's limits allow.
    fn largest_video(ctx: &ModelContext) -> Result<VideoInput>;

    /// Video features, one `[num_video_tokens, hidden]` tensor per video.
    fn embed_videos(&self, inputs: Self::VideoInputs) -> Result<Vec<Tensor>>;
}

impl<T: SupportsVideo> SupportsModality<Video> for T {
    type Inputs = T::VideoInputs;

    fn num_tokens(ctx: &ModelContext, item: &VideoInput) -> Result<usize> {
        T::num_video_tokens(ctx, item)
    }

    fn placeholder_token(ctx: &ModelContext) -> Result<u32> {
        T::video_token_id(ctx)
    }

    fn costliest_item(ctx: &ModelContext) -> Result<VideoInput> {
        T::largest_video(ctx)
    }

    fn embed(&self, inputs: Self::Inputs) -> Result<Vec<Tensor>> {
        self.embed_videos(inputs)
    }
}
