//! `SiglipImageProcessor` (PaliGemma; Gemma 3's processor without pan-and-scan): resize to a fixed
//! `height × width` (bicubic; Gemma 3's bilinear), rescale, normalize with mean and std 0.5. No crop.

use image::DynamicImage;

use crate::clip::rgb_input;
use crate::config::{
    normalize_of, resample_of, rescale_of, PerChannel, PipelineConfig, PreprocessorConfig,
    ResizeTarget, SizeSpec,
};
use crate::error::{ImageError, Result};
use crate::pipeline::Pipeline;
use crate::resize::{PassOrder, Resample};
use crate::view::RgbView;
use crate::PixelValues;

/// Bit-exact port of transformers' `SiglipImageProcessorPil` (and the per-image path of
/// `Gemma3ImageProcessorPil`).
#[derive(Clone, Debug)]
pub struct SiglipImageProcessor {
    pipeline: Pipeline,
}

/// A rectangle of an image, in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Crop {
    pub x: usize,
    pub y: usize,
    pub width: usize,
    pub height: usize,
}

impl Crop {
    pub fn whole(width: usize, height: usize) -> Self {
        Self {
            x: 0,
            y: 0,
            width,
            height,
        }
    }
}

/// The SigLIP class defaults: 224 × 224, IMAGENET_STANDARD mean and std (0.5).
const DEFAULT_SIDE: usize = 224;

impl SiglipImageProcessor {
    /// Builds the processor from a parsed config; absent keys take `SiglipImageProcessor`'s defaults,
    /// but for the square size and the filter (SigLIP: 224, bicubic; Gemma 3: 896, bilinear).
    pub fn with_defaults(
        config: &PreprocessorConfig,
        default_side: usize,
        default_resample: Resample,
    ) -> Result<Self> {
        let resize = if config.do_resize.unwrap_or(true) {
            Some(match &config.size {
                None => ResizeTarget::Exact(default_side, default_side),
                Some(SizeSpec::Int(side)) if *side > 0 => {
                    ResizeTarget::Exact(*side as usize, *side as usize)
                }
                Some(spec) => match crate::config::size_of(config)? {
                    exact @ ResizeTarget::Exact(..) => exact,
                    ResizeTarget::ShortestEdge(_) => {
                        return Err(ImageError::InvalidConfig(format!(
                            "SigLIP resizes to a fixed size: size must be {{\"height\": h, \"width\": w}}, got {spec:?}"
                        )))
                    }
                },
            })
        } else {
            None
        };
        let half = Some(PerChannel::Scalar(0.5));
        let defaults = PreprocessorConfig {
            image_mean: config.image_mean.clone().or(half.clone()),
            image_std: config.image_std.clone().or(half),
            ..config.clone()
        };
        let pipeline = PipelineConfig {
            convert_rgb: config.do_convert_rgb.unwrap_or(true),
            resize,
            resample: resample_of(config, default_resample)?,
            crop: None,
            rescale: rescale_of(config)?,
            normalize: normalize_of(&defaults)?,
        };
        Ok(Self {
            pipeline: Pipeline::new(pipeline, PassOrder::default()),
        })
    }

    /// [`Self::with_defaults`] with SigLIP's 224 and bicubic.
    pub fn new(config: &PreprocessorConfig) -> Result<Self> {
        Self::with_defaults(config, DEFAULT_SIDE, Resample::Bicubic)
    }

    /// Output `(height, width)` for an input of `(height, width)`.
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        self.pipeline.output_size(height, width)
    }

    /// Preprocesses one image into `[1, 3, H, W]`.
    pub fn preprocess(&self, image: &DynamicImage) -> Result<PixelValues> {
        let (width, height) = (image.width() as usize, image.height() as usize);
        self.preprocess_crops(image, &[Crop::whole(width, height)])
    }

    /// Preprocesses regions of one image (each resized on its own, as a separate image) into
    /// `[crops, 3, H, W]`. Crops must lie inside the image.
    pub fn preprocess_crops(&self, image: &DynamicImage, crops: &[Crop]) -> Result<PixelValues> {
        let rgb = rgb_input(image, self.pipeline.config.convert_rgb)?;
        let view = RgbView::from_image(&rgb)?;
        let mut data = Vec::new();
        let mut size = (0, 0);
        for c in crops {
            if c.width == 0
                || c.height == 0
                || c.x + c.width > view.width
                || c.y + c.height > view.height
            {
                return Err(ImageError::InvalidConfig(format!(
                    "crop {c:?} is outside the {}x{} image",
                    view.width, view.height
                )));
            }
            size = self
                .pipeline
                .run(view.crop(c.x, c.y, c.width, c.height), &mut data);
        }
        Ok(PixelValues {
            data,
            shape: [crops.len(), 3, size.0, size.1],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::RgbImage;

    fn processor(json: &str) -> Result<SiglipImageProcessor> {
        SiglipImageProcessor::new(&PreprocessorConfig::from_json_str(json).unwrap())
    }

    #[test]
    fn resizes_to_the_fixed_size_without_cropping() {
        let p = processor("{}").unwrap();
        assert_eq!(p.output_size(5, 700), (224, 224));
        let p = processor(r#"{"size": {"height": 32, "width": 48}}"#).unwrap();
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(7, 3, image::Rgb([255, 0, 128])));
        let out = p.preprocess(&img).unwrap();
        assert_eq!(out.shape, [1, 3, 32, 48]);
        // A flat image stays flat: 255 → 1.0, 0 → −1.0 under mean and std 0.5.
        assert_eq!(out.data[0], 1.0);
        assert_eq!(out.data[32 * 48], -1.0);
    }

    #[test]
    fn a_shortest_edge_size_is_refused() {
        let err = processor(r#"{"size": {"shortest_edge": 224}}"#).unwrap_err();
        assert!(err.to_string().contains("fixed size"), "{err}");
    }
}
