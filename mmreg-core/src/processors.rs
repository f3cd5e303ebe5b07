//! Default input mappers: the image processors a checkpoint's preprocessor_config.json names.

use crate::model::ModalityKind;
use crate::{ModelContext, Result};

/// Forward inputs that the modality's default mapper can produce, selected by
/// `#[register_input_mapper(image)]` (without a function). A model whose inputs type lacks this impl
/// gets a compile error at the registration.
pub trait DefaultMapper<K: ModalityKind>: Sized {
    fn map(ctx: &ModelContext, items: &[K::Item]) -> Result<Self>;
}
