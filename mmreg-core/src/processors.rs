//! Default input mappers: the image processors a checkpoint's preprocessor_config.json configures,
//! from `mmreg-image` (bit-identical to Hugging Face's PIL backend), wrapped into tensors.

use mmreg_image::{ClipImageProcessor, LlavaNextImageProcessor, PreprocessorConfig};
use tch::Tensor;

use crate::model::{Image, ModalityKind};
use crate::{AnyresPixelValues, Error, ImageInput, ModelContext, PixelValues, Result};

/// Forward inputs that the modality's default mapper can produce, selected by
/// `#[register_input_mapper(image)]` (without a function). A model whose inputs type lacks this impl
/// gets a compile error at the registration.
pub trait DefaultMapper<K: ModalityKind>: Sized {
    fn map(ctx: &ModelContext, items: &[K::Item]) -> Result<Self>;
}

/// The CLIP image processor (resize shortest edge, center crop, rescale, normalize): LLaVA-1.5's.
impl DefaultMapper<Image> for PixelValues {
    fn map(ctx: &ModelContext, images: &[ImageInput]) -> Result<Self> {
        let config = ctx.processor_config::<PreprocessorConfig>()?;
        let processor = ClipImageProcessor::new(&config)
            .map_err(|e| Error::config("preprocessor_config.json", e))?;
        let mut data = Vec::new();
        let mut shape = None;
        for image in images {
            let pixels = processor
                .preprocess(&image.image)
                .map_err(|e| Error::bad_input(&*image.name, e))?;
            shape.get_or_insert(pixels.shape);
            data.extend_from_slice(&pixels.data);
        }
        let [_, c, h, w] = shape.unwrap_or([0, 3, 0, 0]).map(|d| d as i64);
        let pixel_values = Tensor::from_slice(&data).reshape([images.len() as i64, c, h, w]);
        Ok(PixelValues { pixel_values })
    }
}

/// The LLaVA-NeXT "anyres" processor: best grid canvas, patches, base image, `image_sizes`.
impl DefaultMapper<Image> for AnyresPixelValues {
    fn map(ctx: &ModelContext, images: &[ImageInput]) -> Result<Self> {
        let config = ctx.processor_config::<PreprocessorConfig>()?;
        let processor = LlavaNextImageProcessor::new(&config)
            .map_err(|e| Error::config("preprocessor_config.json", e))?;
        let outputs = images
            .iter()
            .map(|i| {
                processor
                    .preprocess(&i.image)
                    .map_err(|e| Error::bad_input(&*i.name, e))
            })
            .collect::<Result<Vec<_>>>()?;
        // Pad along the patch axis with 0.0 to the largest patch count, as HF batches them.
        let [_, c, h, w] = outputs
            .first()
            .map(|o| o.pixel_values.shape)
            .unwrap_or([0, 3, 0, 0]);
        let max_patches = outputs
            .iter()
            .map(|o| o.pixel_values.shape[0])
            .max()
            .unwrap_or(0);
        let mut data = vec![0f32; outputs.len() * max_patches * c * h * w];
        for (chunk, output) in data.chunks_mut(max_patches * c * h * w).zip(&outputs) {
            chunk[..output.pixel_values.data.len()].copy_from_slice(&output.pixel_values.data);
        }
        let sizes: Vec<i64> = outputs
            .iter()
            .flat_map(|o| [o.image_size.0 as i64, o.image_size.1 as i64])
            .collect();
        let shape = [outputs.len(), max_patches, c, h, w].map(|d| d as i64);
        Ok(AnyresPixelValues {
            pixel_values: Tensor::from_slice(&data).reshape(shape),
            image_sizes: Tensor::from_slice(&sizes).reshape([images.len() as i64, 2]),
        })
    }
}
