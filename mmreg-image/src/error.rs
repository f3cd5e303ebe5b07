//! Error type shared by every processor in this crate.

use std::path::PathBuf;

/// Everything that can go wrong while configuring a processor or preparing an image.
///
/// Messages name the offending value so a bad `preprocessor_config.json` or an unusable
/// input image can be fixed without reading this crate's source.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The input has no pixels (PIL refuses to resize such an image too).
    #[error("image has zero size ({width}x{height}); width and height must both be at least 1")]
    EmptyImage {
        /// Width in pixels.
        width: usize,
        /// Height in pixels.
        height: usize,
    },

    /// A resample filter the processor does not implement was requested.
    #[error(
        "unsupported resample filter {0} (PIL {name}); CLIP, LLaVA-NeXT and Qwen2-VL implement only \
         3 (BICUBIC), SigLIP, Gemma 3, Idefics3 and SmolVLM also 2 (BILINEAR) and 1 (LANCZOS)",
        name = resample_name(*.0)
    )]
    UnsupportedResample(i64),

    /// The pixel layout cannot be converted the way PIL would (e.g. floating-point images).
    #[error("unsupported pixel layout {0}; expected 8/16-bit L, LA, RGB or RGBA")]
    UnsupportedPixelLayout(String),

    /// `do_convert_rgb` is false but the image is not already 8-bit RGB.
    #[error("image is {0} but do_convert_rgb is false; only 8-bit RGB input can skip conversion")]
    NotRgb(String),

    /// The image is too elongated for the processor: Qwen2-VL's `smart_resize` refuses aspect
    /// ratios over 200 (the message ends with HF's own).
    #[error(
        "image is {width}x{height}: absolute aspect ratio must be smaller than {limit}, got {ratio:?}"
    )]
    AspectRatio {
        /// Width in pixels.
        width: usize,
        /// Height in pixels.
        height: usize,
        /// `max(height, width) / min(height, width)`.
        ratio: f64,
        /// The largest ratio accepted.
        limit: u32,
    },

    /// A video's frames cannot be processed together (no frames, or frames of different sizes).
    #[error("invalid video: {0}")]
    InvalidVideo(String),

    /// A configuration value is out of range or inconsistent.
    #[error("invalid preprocessor config: {0}")]
    InvalidConfig(String),

    /// The configuration JSON could not be parsed.
    #[error("cannot parse preprocessor config: {0}")]
    ConfigJson(#[from] serde_json::Error),

    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// The header claims more pixels than allowed (a decompression bomb, or just too large).
    #[error("the image is {width}x{height} = {pixels} pixels, over the limit of {max_pixels}", pixels = u64::from(*.width) * u64::from(*.height))]
    TooLarge {
        /// Width in the header.
        width: u32,
        /// Height in the header.
        height: u32,
        /// The limit.
        max_pixels: u64,
    },

    /// An image file could not be decoded.
    #[error("cannot decode image: {0}")]
    Decode(#[from] image::ImageError),
}

/// Convenience alias used across the crate.
pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// PIL's names for its `Image.Resampling` integer codes, for error messages.
fn resample_name(code: i64) -> &'static str {
    match code {
        0 => "NEAREST",
        1 => "LANCZOS",
        2 => "BILINEAR",
        3 => "BICUBIC",
        4 => "BOX",
        5 => "HAMMING",
        _ => "unknown",
    }
}
