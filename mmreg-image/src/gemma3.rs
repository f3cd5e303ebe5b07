//! `Gemma3ImageProcessor` (PIL backend): each image resized to a fixed square (bilinear), rescaled and
//! normalized as SigLIP's; with `do_pan_and_scan`, a long image is followed by 2–4 crops along its long
//! side, each processed as an image of its own.

use image::DynamicImage;

use crate::config::PreprocessorConfig;
use crate::error::{ImageError, Result};
use crate::resize::Resample;
use crate::siglip::{Crop, SiglipImageProcessor};
use crate::PixelValues;

/// Pan-and-scan's settings (the processor's defaults: 256, 4, 1.2).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PanAndScan {
    pub min_crop_size: usize,
    pub max_num_crops: usize,
    pub min_ratio_to_activate: f64,
}

/// Bit-exact port of transformers' `Gemma3ImageProcessorPil`.
#[derive(Clone, Debug)]
pub struct Gemma3ImageProcessor {
    image: SiglipImageProcessor,
    pan_and_scan: Option<PanAndScan>,
}

impl Gemma3ImageProcessor {
    /// From a parsed config; absent keys take the class defaults (224 px, bilinear, no pan-and-scan).
    pub fn new(config: &PreprocessorConfig) -> Result<Self> {
        let pan_and_scan = if config.do_pan_and_scan.unwrap_or(false) {
            let positive = |name: &str, v: Option<i64>, default: usize| -> Result<usize> {
                match v {
                    None => Ok(default),
                    Some(v) if v > 0 => Ok(v as usize),
                    Some(v) => Err(ImageError::InvalidConfig(format!(
                        "{name} must be positive, got {v}"
                    ))),
                }
            };
            let ratio = config.pan_and_scan_min_ratio_to_activate.unwrap_or(1.2);
            if !ratio.is_finite() {
                return Err(ImageError::InvalidConfig(format!(
                    "pan_and_scan_min_ratio_to_activate must be finite, got {ratio}"
                )));
            }
            Some(PanAndScan {
                min_crop_size: positive(
                    "pan_and_scan_min_crop_size",
                    config.pan_and_scan_min_crop_size,
                    256,
                )?,
                max_num_crops: positive(
                    "pan_and_scan_max_num_crops",
                    config.pan_and_scan_max_num_crops,
                    4,
                )?,
                min_ratio_to_activate: ratio,
            })
        } else {
            None
        };
        Ok(Self {
            image: SiglipImageProcessor::with_defaults(config, 224, Resample::Bilinear)?,
            pan_and_scan,
        })
    }

    /// The crops pan-and-scan adds to an image of `width × height` (none when it is off or the image
    /// is not long enough), as HF's `pan_and_scan`.
    pub fn crops(&self, width: usize, height: usize) -> Vec<Crop> {
        let Some(p) = self.pan_and_scan else {
            return Vec::new();
        };
        if width == 0 || height == 0 {
            return Vec::new();
        }
        let (w, h) = (width as f64, height as f64);
        let count = |long: f64, short: f64| -> Option<usize> {
            if long / short < p.min_ratio_to_activate {
                return None;
            }
            // Half rounded up, no more than fit at the smallest crop, then within [2, max].
            let n = ((long / short + 0.5).floor() as usize)
                .min((long / p.min_crop_size as f64).floor() as usize);
            Some(n.max(2).min(p.max_num_crops))
        };
        let (across, down) = if width >= height {
            match count(w, h) {
                Some(n) => (n, 1),
                None => return Vec::new(),
            }
        } else {
            match count(h, w) {
                Some(n) => (1, n),
                None => return Vec::new(),
            }
        };
        let crop_w = width.div_ceil(across);
        let crop_h = height.div_ceil(down);
        if crop_w.min(crop_h) < p.min_crop_size {
            return Vec::new();
        }
        let mut crops = Vec::new();
        for row in 0..down {
            for col in 0..across {
                let (x, y) = (crop_w * col, crop_h * row);
                // numpy slicing stops at the image's edge.
                crops.push(Crop {
                    x,
                    y,
                    width: crop_w.min(width - x),
                    height: crop_h.min(height - y),
                });
            }
        }
        crops
    }

    /// Output `(height, width)` of the image and of each crop.
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        self.image.output_size(height, width)
    }

    /// `[1 + crops, 3, H, W]`: the image, then its crops.
    pub fn preprocess(&self, image: &DynamicImage) -> Result<PixelValues> {
        let (width, height) = (image.width() as usize, image.height() as usize);
        let mut regions = vec![Crop::whole(width, height)];
        regions.extend(self.crops(width, height));
        self.image.preprocess_crops(image, &regions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn processor(json: &str) -> Gemma3ImageProcessor {
        Gemma3ImageProcessor::new(&PreprocessorConfig::from_json_str(json).unwrap()).unwrap()
    }

    #[test]
    fn pan_and_scan_crops_the_long_side() {
        let p = processor(r#"{"do_pan_and_scan": true}"#);
        // 1920 / 1080 = 1.78 → 2 crops across, each 960 wide.
        let crops = p.crops(1920, 1080);
        assert_eq!(crops.len(), 2);
        assert_eq!(
            crops[1],
            Crop {
                x: 960,
                y: 0,
                width: 960,
                height: 1080
            }
        );
        // Square-ish: below the 1.2 ratio, nothing.
        assert!(p.crops(500, 450).is_empty());
        // Tall and thin: crops down, but too thin for a 256-pixel crop.
        assert!(p.crops(200, 1000).is_empty());
        assert_eq!(p.crops(300, 1000).len(), 3);
        // Off by default.
        assert!(processor("{}").crops(1920, 1080).is_empty());
    }
}
