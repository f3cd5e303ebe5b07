//! Attribute macros that register a multimodal model in mmreg's link-time registry.
//!
//! Each attribute sits on the model's struct, re-emits it untouched, and adds one
//! `const _: () = { static … }` block holding a `Registration` in a linkme distributed slice. The work
//! happens in [`expand`], on `proc_macro2` tokens, so it is unit-testable without a compiler. Use the
//! macros through their re-exports in `mmreg_core`.

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
