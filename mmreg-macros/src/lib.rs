//! Attribute macros that register a multimodal model in mmreg's link-time registry.
//!
//! Each attribute sits on the model's struct, re-emits it untouched, and adds one
//! `const _: () = { static … }` block holding a `Registration` in a linkme distributed slice. The work
//! happens in [`expand`], on `proc_macro2` tokens, so it is unit-testable without a compiler. Use the
//! macros through their re-exports in `mmreg_core`.
//!
//! Generated code names mmreg-core `::mmreg_core`; a crate that reaches it through a re-export says so
//! with `crate = path` in any attribute (`#[register_model("Arch", crate = my::reexport)]`) or with
//! `#[inputs(crate = path)]` on a `#[derive(ModalityInputs)]` struct.

use proc_macro::TokenStream;

mod args;
mod expand;

/// Registers the model under its Hugging Face `architectures` name(s), with `LoadModel::load` as the
/// constructor: `#[register_model("LlavaForConditionalGeneration")]`.
#[proc_macro_attribute]
pub fn register_model(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::run(expand::Kind::Model, attr.into(), item.into()).into()
}

/// Registers the input mapper of a modality: `#[register_input_mapper(image)]` for the default mapper
/// (configured from the checkpoint's preprocessor_config.json) or `#[register_input_mapper(image = f)]`.
#[proc_macro_attribute]
pub fn register_input_mapper(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::run(expand::Kind::InputMapper, attr.into(), item.into()).into()
}

/// Registers the maximum number of placeholder tokens of one item: `#[register_max_tokens(image = f)]`.
#[proc_macro_attribute]
pub fn register_max_tokens(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::run(expand::Kind::MaxTokens, attr.into(), item.into()).into()
}

/// Registers the dummy data used to profile memory at startup: `#[register_dummy_data(f)]`.
#[proc_macro_attribute]
pub fn register_dummy_data(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::run(expand::Kind::DummyData, attr.into(), item.into()).into()
}

/// Registers the input processor that expands a prompt's placeholders: `#[register_input_processor(f)]`.
#[proc_macro_attribute]
pub fn register_input_processor(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::run(expand::Kind::InputProcessor, attr.into(), item.into()).into()
}

/// Implements `ModalityInputs` for a struct whose named fields are the forward parameters' tensors:
/// `PARAMS` (the names, sorted), `into_tensors`, `from_tensors`, and `concat`, which joins each field
/// along axis 0. `#[inputs(pad = 1)]` on a field pads that axis with zeros to the largest part;
/// `#[inputs(host)]` on a field keeps it on the host (`HOST`: metadata such as image sizes, which the
/// model reads as numbers); `#[inputs(no_concat)]` on the struct keeps the trait's `concat` (each prompt runs alone);
/// `#[inputs(crate = path)]` names mmreg-core.
#[proc_macro_derive(ModalityInputs, attributes(inputs))]
pub fn derive_modality_inputs(input: TokenStream) -> TokenStream {
    expand::inputs::run(input.into()).into()
}

/// Defines `Modality` (with `ALL`, `name`, `Display` and `FromStr`) from the macros' own modality list,
/// so that the enum and the attributes cannot disagree. Called once, by mmreg-core: `__define_modalities!()`.
#[doc(hidden)]
#[proc_macro]
pub fn __define_modalities(input: TokenStream) -> TokenStream {
    expand::modalities::run(input.into()).into()
}
