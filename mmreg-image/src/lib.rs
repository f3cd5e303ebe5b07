//! PIL-compatible image processors for LLaVA-style, Qwen2-VL, SigLIP-based (PaliGemma, Gemma 3) and
//! Idefics3 / SmolVLM models, in pure Rust.
//!
//! The processors reproduce Hugging Face transformers' PIL backend (`CLIPImageProcessorPil`,
//! `LlavaNextImageProcessorPil`, `Qwen2VLImageProcessorPil`, `Idefics3ImageProcessorPil`,
//! `SmolVLMImageProcessorPil`, transformers 5.17 with Pillow 13) **bit for bit**: same `u8` resize
//! (Pillow's fixed-point bicubic, bilinear or Lanczos), same crop/pad geometry, same `f32` rounding
//! in rescale and normalize, same patch layout. `tests/hf_parity.rs`, `tests/qwen2_vl_parity.rs`
//! and `tests/idefics3_parity.rs` check SHA-256 hashes of HF's outputs.
//!
//! ```no_run
//! use mmreg_image::ClipImageProcessor;
//! # fn main() -> Result<(), mmreg_image::ImageError> {
//! let processor = ClipImageProcessor::from_file("preprocessor_config.json")?;
//! let image = image::open("cat.png")?;
//! let pixels = processor.preprocess(&image)?; // shape [1, 3, 336, 336], CHW, RGB
//! # Ok(()) }
//! ```
//!
//! Resampling filters: bicubic (`resample: 3`) everywhere; bilinear (2) where SigLIP / Gemma 3 use
//! it, Lanczos (1) for Idefics3 / SmolVLM (and SigLIP). JPEG decoding is not part of the exactness
//! claim: PIL's libjpeg and the `image` crate's decoder can differ by a few levels.

mod clip;
mod config;
mod convert;
mod decode;
mod error;
#[doc(hidden)]
#[cfg(feature = "fuzzing")]
pub mod fuzz;
mod gemma3;
mod idefics3;
mod kernels;
mod llava_next;
mod pipeline;
mod qwen2_vl;
mod resize;
mod siglip;
mod torch_resize;
mod view;

pub use clip::ClipImageProcessor;
pub use config::{
    PerChannel, PreprocessorConfig, SizeSpec, DEFAULT_GRID_PINPOINTS, OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
};
pub use convert::to_rgb8;
pub use decode::decode;
pub use error::{ImageError, Result};
pub use gemma3::{Gemma3ImageProcessor, PanAndScan};
pub use idefics3::{
    idefics3_image_prompt, idefics3_image_seq_len, Idefics3Grid, Idefics3ImageProcessor,
    Idefics3Pixels, Idefics3PromptTokens, PixelMask, SmolVlmImageProcessor,
    IDEFICS3_MAX_IMAGE_SIZE,
};
pub use llava_next::{
    get_patch_output_size, select_best_resolution, LlavaNextImageProcessor, NextBatch,
    NextPixelValues,
};
pub use qwen2_vl::{smart_resize, Qwen2VlImageProcessor, QwenPatches};
pub use resize::{resize_bicubic, PassOrder, Resample};
pub use siglip::{Crop, SiglipImageProcessor};

/// Preprocessed images: `f32` values in row-major `[n, 3, H, W]` order (CHW per image, RGB).
#[derive(Clone, Debug, PartialEq)]
pub struct PixelValues {
    /// `n * 3 * H * W` values.
    pub data: Vec<f32>,
    /// `[n, 3, H, W]`.
    pub shape: [usize; 4],
}

impl PixelValues {
    /// The values of image `i` (`3 * H * W` of them), if there is such an image.
    pub fn image(&self, i: usize) -> Option<&[f32]> {
        let len = self.shape[1] * self.shape[2] * self.shape[3];
        self.data.get(i * len..(i + 1) * len)
    }
}
