//! `CLIPImageProcessor` (LLaVA-1.5): resize shortest edge, center crop, rescale, normalize.

use std::borrow::Cow;
use std::path::Path;

use image::{DynamicImage, RgbImage};

use crate::config::{PipelineConfig, PreprocessorConfig};
use crate::convert::to_rgb8;
use crate::error::{ImageError, Result};
use crate::pipeline::Pipeline;
use crate::resize::PassOrder;
use crate::view::RgbView;
use crate::PixelValues;

/// Bit-exact port of transformers' `CLIPImageProcessorPil` (the PIL backend).
#[derive(Clone, Debug)]
pub struct ClipImageProcessor {
    pipeline: Pipeline,
}

impl ClipImageProcessor {
    /// Builds the processor from a parsed config; absent keys take the HF class defaults.
    pub fn new(config: &PreprocessorConfig) -> Result<Self> {
        let pipeline = Pipeline::new(PipelineConfig::resolve(config)?, PassOrder::default());
        Ok(ClipImageProcessor { pipeline })
    }

    /// Builds the processor from a `preprocessor_config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::new(&PreprocessorConfig::from_file(path)?)
    }

    /// Reproduces a different Pillow release's resize pass order (default: Pillow 13).
    pub fn with_pass_order(mut self, order: PassOrder) -> Self {
        self.pipeline.order = order;
        self
    }

    /// Output `(height, width)` for an input image of `(height, width)`.
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        self.pipeline.output_size(height, width)
    }

    /// Preprocesses one image into `[1, 3, H, W]`.
    pub fn preprocess(&self, image: &DynamicImage) -> Result<PixelValues> {
        self.preprocess_batch(std::slice::from_ref(image))
    }

    /// Preprocesses one image that is already 8-bit RGB into `[1, 3, H, W]`.
    pub fn preprocess_rgb(&self, image: &RgbImage) -> Result<PixelValues> {
        let mut data = Vec::new();
        let (h, w) = self.pipeline.run(RgbView::from_image(image)?, &mut data);
        Ok(PixelValues {
            data,
            shape: [1, 3, h, w],
        })
    }

    /// Preprocesses several images into `[n, 3, H, W]`; all outputs must have the same size
    /// (always true with center cropping).
    pub fn preprocess_batch(&self, images: &[DynamicImage]) -> Result<PixelValues> {
        let mut data = Vec::new();
        let mut size = None;
        for image in images {
            let rgb = rgb_input(image, self.pipeline.config.convert_rgb)?;
            let hw = self.pipeline.run(RgbView::from_image(&rgb)?, &mut data);
            if *size.get_or_insert(hw) != hw {
                return Err(ImageError::InvalidConfig(format!(
                    "batch images resize to different sizes {:?} and {hw:?}; enable do_center_crop",
                    size.unwrap_or(hw)
                )));
            }
        }
        let (h, w) = size.unwrap_or((0, 0));
        Ok(PixelValues {
            data,
            shape: [images.len(), 3, h, w],
        })
    }
}

/// The image as 8-bit RGB, honouring `do_convert_rgb`.
pub(crate) fn rgb_input(image: &DynamicImage, convert: bool) -> Result<Cow<'_, RgbImage>> {
    match image {
        DynamicImage::ImageRgb8(rgb) => Ok(Cow::Borrowed(rgb)),
        _ if convert => to_rgb8(image),
        other => Err(ImageError::NotRgb(format!("{:?}", other.color()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn processor(json: &str) -> ClipImageProcessor {
        ClipImageProcessor::new(&PreprocessorConfig::from_json_str(json).unwrap()).unwrap()
    }

    #[test]
    fn shapes_follow_config() {
        let p = processor(
            r#"{"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}"#,
        );
        let img = DynamicImage::ImageRgb8(RgbImage::new(40, 30));
        assert_eq!(p.preprocess(&img).unwrap().shape, [1, 3, 336, 336]);
        let batch = p.preprocess_batch(&[img.clone(), img]).unwrap();
        assert_eq!(batch.shape, [2, 3, 336, 336]);
        assert_eq!(batch.data.len(), 2 * 3 * 336 * 336);
        assert_eq!(p.output_size(5, 7), (336, 336));
        let uncropped = processor(r#"{"size": {"shortest_edge": 20}, "do_center_crop": false}"#);
        assert_eq!(uncropped.output_size(30, 40), (20, 26));
    }

    #[test]
    fn errors_name_the_problem() {
        let p = processor("{}");
        let empty = DynamicImage::ImageRgb8(RgbImage::new(0, 4));
        assert!(p
            .preprocess(&empty)
            .unwrap_err()
            .to_string()
            .contains("zero size (0x4)"));
        let no_convert = processor(r#"{"do_convert_rgb": false}"#);
        let gray = DynamicImage::ImageLuma8(image::GrayImage::new(4, 4));
        assert!(no_convert
            .preprocess(&gray)
            .unwrap_err()
            .to_string()
            .contains("do_convert_rgb"));
        let uncropped = processor(r#"{"do_center_crop": false}"#);
        let a = DynamicImage::ImageRgb8(RgbImage::new(10, 20));
        let b = DynamicImage::ImageRgb8(RgbImage::new(20, 10));
        assert!(uncropped.preprocess_batch(&[a, b]).is_err());
    }

    #[test]
    fn gray_equals_replicated_rgb() {
        let p = processor("{}");
        let gray = image::GrayImage::from_fn(50, 31, |x, y| image::Luma([(x * 5 + y * 3) as u8]));
        let rgb = RgbImage::from_fn(50, 31, |x, y| image::Rgb([gray.get_pixel(x, y).0[0]; 3]));
        let a = p.preprocess(&DynamicImage::ImageLuma8(gray)).unwrap();
        let b = p.preprocess_rgb(&rgb).unwrap();
        assert_eq!(a, b);
    }
}
