//! What a request carries before and after its model's input processor.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use image::DynamicImage;

use crate::{Error, Modality, Result};

/// A prompt as the user gives it: text to tokenize, or token ids that already contain the model's
/// multimodal marker tokens (e.g. one `<image>` id per image).
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    TokenIds(Vec<u32>),
}

/// The most pixels an image may have (64 Mi, e.g. 8192x8192): larger ones are refused from their header.
pub const MAX_IMAGE_PIXELS: u64 = 64 << 20;

/// One decoded image and a name for it (its path, or `image #i`) used in error messages.
#[derive(Debug, Clone)]
pub struct ImageInput {
    pub name: Arc<str>,
    pub image: DynamicImage,
}

impl ImageInput {
    pub fn new(name: impl Into<Arc<str>>, image: DynamicImage) -> Self {
        Self {
            name: name.into(),
            image,
        }
    }

    /// Decodes an image file, with a clear error that names the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| Error::bad_input(&name, e))?;
        Self::decode(name, &bytes)
    }

    /// Decodes encoded image bytes (PNG, JPEG, …). The size in the header is checked against
    /// [`MAX_IMAGE_PIXELS`] before any pixel is allocated, so a decompression bomb costs nothing.
    pub fn decode(name: impl Into<Arc<str>>, bytes: &[u8]) -> Result<Self> {
        let name = name.into();
        let image = mmreg_image::decode(bytes, MAX_IMAGE_PIXELS)
            .map_err(|e| Error::bad_input(&*name, e))?;
        Ok(Self { name, image })
    }

    pub fn size(&self) -> ImageSize {
        ImageSize {
            width: self.image.width(),
            height: self.image.height(),
        }
    }
}

/// One video given as its decoded frames (all of one size), with a name for error messages.
#[derive(Debug, Clone)]
pub struct VideoInput {
    pub name: Arc<str>,
    pub frames: Vec<DynamicImage>,
    /// Frames per second, where known (HF's `video_metadata.fps`); models that space temporal positions
    /// by time read it.
    pub fps: Option<f64>,
}

impl VideoInput {
    pub fn new(name: impl Into<Arc<str>>, frames: Vec<DynamicImage>) -> Self {
        Self {
            name: name.into(),
            frames,
            fps: None,
        }
    }

    pub fn with_fps(self, fps: f64) -> Self {
        Self {
            fps: Some(fps),
            ..self
        }
    }
}

/// An image's size in pixels, the input of token-count functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ImageSize {
    pub width: u32,
    pub height: u32,
}

/// One multimodal item, whatever its modality.
#[derive(Debug, Clone, Copy)]
pub enum MultiModalItem<'a> {
    Image(&'a ImageInput),
    Video(&'a VideoInput),
}

impl MultiModalItem<'_> {
    pub fn modality(&self) -> Modality {
        match self {
            MultiModalItem::Image(_) => Modality::Image,
            MultiModalItem::Video(_) => Modality::Video,
        }
    }
}

/// The multimodal data of one prompt, per modality, in prompt order.
#[derive(Debug, Clone, Default)]
pub struct MultiModalData {
    pub images: Vec<ImageInput>,
    pub videos: Vec<VideoInput>,
}

impl MultiModalData {
    pub fn with_images(images: Vec<ImageInput>) -> Self {
        Self {
            images,
            ..Self::default()
        }
    }

    /// The number of items of each modality present.
    pub fn counts(&self) -> ModalityCounts {
        let mut counts = ModalityCounts::default();
        for &modality in Modality::ALL {
            let n = self.len(modality);
            if n > 0 {
                counts.0.insert(modality, n);
            }
        }
        counts
    }

    /// How many items of `modality` there are.
    pub fn len(&self, modality: Modality) -> usize {
        match modality {
            Modality::Image => self.images.len(),
            Modality::Video => self.videos.len(),
        }
    }

    /// The items of one modality.
    pub fn items(&self, modality: Modality) -> Vec<MultiModalItem<'_>> {
        match modality {
            Modality::Image => self.images.iter().map(MultiModalItem::Image).collect(),
            Modality::Video => self.videos.iter().map(MultiModalItem::Video).collect(),
        }
    }

    /// Moves every item of `other` after this one's.
    pub fn append(&mut self, mut other: MultiModalData) {
        self.images.append(&mut other.images);
        self.videos.append(&mut other.videos);
    }

    pub fn is_empty(&self) -> bool {
        Modality::ALL.iter().all(|&m| self.len(m) == 0)
    }
}

/// Number of items per modality (vLLM's `mm_counts`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModalityCounts(pub BTreeMap<Modality, usize>);

impl ModalityCounts {
    /// `count` items of each of `modalities`.
    pub fn each(modalities: &[Modality], count: usize) -> Self {
        Self(modalities.iter().map(|&m| (m, count)).collect())
    }

    pub fn get(&self, modality: Modality) -> usize {
        self.0.get(&modality).copied().unwrap_or(0)
    }

    pub fn set(&mut self, modality: Modality, count: usize) {
        self.0.insert(modality, count);
    }
}

/// A request's inputs as given to the model's input processor.
#[derive(Debug, Clone)]
pub struct ProcessorInputs {
    pub prompt: Prompt,
    pub multimodal: MultiModalData,
}

/// Where one item's placeholder tokens sit in the processed prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaceholderRange {
    pub modality: Modality,
    /// Index of the item within its modality.
    pub item: usize,
    pub offset: usize,
    pub length: usize,
    /// Which tokens of the range take the item's embedding rows, in order, when the run interleaves
    /// them with plain text tokens (Idefics3's `<row_1_col_1>` between image tokens; vLLM's
    /// `PromptUpdateDetails.select_token_id`). `None`: every token does.
    pub is_embed: Option<Arc<[bool]>>,
}

impl PlaceholderRange {
    /// How many embedding rows the item gives: the range's length, or its embedded tokens.
    pub fn embedded(&self) -> usize {
        match &self.is_embed {
            Some(mask) => mask.iter().filter(|&&e| e).count(),
            None => self.length,
        }
    }
}

/// The output of an input processor: token ids with every placeholder expanded, and where each item's
/// placeholders are. The multimodal data goes on to the input mapper.
#[derive(Debug, Clone)]
pub struct ProcessedInputs {
    pub token_ids: Vec<u32>,
    pub placeholders: Vec<PlaceholderRange>,
    pub multimodal: MultiModalData,
    /// Positions the model computes for this prompt (Qwen2-VL's M-RoPE); `None`: `0..len`.
    pub positions: Option<PromptPositions>,
    /// Runs of the prompt whose tokens attend to each other both ways (Gemma 3's image tokens,
    /// PaliGemma's image and prefix); every other pair is causal. The engine computes each run in one
    /// step (a prefill chunk never ends inside one) and hashes a run's tokens into the KV-cache blocks that
    /// overlap it. Empty: a causal prompt.
    pub bidirectional: Vec<std::ops::Range<usize>>,
}

/// Positions a model computes for its prompt instead of `0..len`, in `sections` rows (Qwen2-VL's M-RoPE:
/// temporal, height and width). Prompt token `i` sits at `ids[s * len + i]` in section `s`; a token after
/// the prompt (a generated one, at index `i ≥ len`) at `i + delta` in every section, as HF's
/// `rope_deltas` continue them. The engine keeps them per sequence through batching, preemption and CUDA
/// graphs; the model reads a step's positions as `[sections, tokens]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptPositions {
    pub sections: usize,
    /// `sections × len` positions, section-major.
    pub ids: Vec<i64>,
    pub delta: i64,
}

impl PromptPositions {
    /// The prompt's length.
    pub fn len(&self) -> usize {
        self.ids.len() / self.sections.max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Position of token `i` of the sequence in `section`.
    pub fn at(&self, section: usize, i: usize) -> i64 {
        let len = self.len();
        if i < len {
            self.ids[section * len + i]
        } else {
            i as i64 + self.delta
        }
    }
}

impl ProcessedInputs {
    /// The token ids as a 1-D i64 tensor on the CPU, as the model (and `mmreg preprocess`) takes them.
    pub fn input_ids(&self) -> tch::Tensor {
        let ids: Vec<i64> = self.token_ids.iter().map(|&t| i64::from(t)).collect();
        tch::Tensor::from_slice(&ids)
    }

    /// Placeholder lengths for one modality, in item order.
    pub fn placeholder_lengths(&self, modality: Modality) -> Vec<usize> {
        let mut ranges: Vec<_> = self
            .placeholders
            .iter()
            .filter(|r| r.modality == modality)
            .collect();
        ranges.sort_by_key(|r| r.item);
        ranges.iter().map(|r| r.length).collect()
    }
}

/// What the engine asks a dummy-data function for: a prompt of at most `seq_len` tokens after processing,
/// with `counts` items of each modality, each as costly as the model allows.
#[derive(Debug, Clone)]
pub struct DummyRequest {
    pub seq_len: usize,
    pub counts: ModalityCounts,
}
