use mmreg_core::{
    register_input_mapper, ImageSize, LanguageModel, ModalityInputs, ModelContext,
    MultiModalModel, Result, SupportsVision,
};
use tch::Tensor;

#[derive(ModalityInputs)]
pub struct Cells {
    pub cells: Tensor,
}

// `Cells` has no default mapper: name a mapper function instead.
#[register_input_mapper(image)]
pub struct Model(Box<dyn LanguageModel>);

impl MultiModalModel for Model {
    fn language_model(&self) -> &dyn LanguageModel {
        &*self.0
    }
}

impl SupportsVision for Model {
    type ImageInputs = Cells;
    fn num_image_tokens(_: &ModelContext, _: ImageSize) -> Result<usize> {
        Ok(1)
    }
    fn image_token_id(_: &ModelContext) -> Result<u32> {
        Ok(0)
    }
    fn largest_image(_: &ModelContext) -> Result<ImageSize> {
        Ok(ImageSize { width: 1, height: 1 })
    }
    fn embed_images(&self, _: Cells) -> Result<Vec<Tensor>> {
        Ok(Vec::new())
    }
}

fn main() {}
