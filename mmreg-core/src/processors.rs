//! Default input mappers: a model's inputs type that knows how to build itself from a modality's items
//! (the CLIP image processor for `mmreg_nn::clip::PixelValues`, say) is selected by
//! `#[register_input_mapper(image)]` without a function.

use crate::model::ModalityKind;
use crate::{ModelContext, Result};

/// Forward inputs that the modality's default mapper can produce, selected by
/// `#[register_input_mapper(image)]` (without a function). A model whose inputs type lacks this impl
/// gets a compile error at the registration.
#[diagnostic::on_unimplemented(
    message = "`{Self}` has no default input mapper for this modality",
    label = "no `DefaultMapper` impl",
    note = "name a function instead: `#[register_input_mapper(image = my_mapper)]`, or implement `DefaultMapper` for `{Self}`"
)]
pub trait DefaultMapper<K: ModalityKind>: Sized {
    fn map(ctx: &ModelContext, items: &[K::Item]) -> Result<Self>;
}
