//! Expansion snapshots (what `cargo expand` shows, minus linkme's own expansion) and error messages.

use proc_macro2::TokenStream;
use quote::quote;

use super::{expand, Kind};

fn pretty(tokens: TokenStream) -> String {
    prettyplease::unparse(&syn::parse2(tokens).expect("expansion parses as a file"))
}

fn expanded(kind: Kind, attr: TokenStream) -> String {
    let item = quote! { pub struct Llava { tower: VisionTower } };
    pretty(expand(kind, attr, item).expect("expands"))
}

fn error(kind: Kind, attr: TokenStream, item: TokenStream) -> String {
    expand(kind, attr, item)
        .expect_err("is rejected")
        .to_string()
}

#[test]
fn model_registration() {
    insta::assert_snapshot!(expanded(
        Kind::Model,
        quote!("LlavaForConditionalGeneration")
    ));
}

#[test]
fn default_input_mapper() {
    insta::assert_snapshot!(expanded(Kind::InputMapper, quote!(image)));
}

#[test]
fn custom_input_mapper_resolves_self() {
    insta::assert_snapshot!(expanded(
        Kind::InputMapper,
        quote!(image = Self::map_images)
    ));
}

#[test]
fn max_tokens_dummy_data_and_processor() {
    insta::assert_snapshot!(expanded(Kind::MaxTokens, quote!(image = max_image_tokens)));
    insta::assert_snapshot!(expanded(Kind::DummyData, quote!(dummy_data)));
    insta::assert_snapshot!(expanded(
        Kind::InputProcessor,
        quote!(crate::llava::input_processor)
    ));
}

#[test]
fn item_is_emitted_untouched() {
    let item = quote! { #[derive(Debug)] pub struct Toy(u8); };
    let out = expand(Kind::DummyData, quote!(dummy), item.clone())
        .expect("expands")
        .to_string();
    assert!(out.starts_with(&item.to_string()), "{out}");
}

#[test]
fn unknown_modality_lists_the_valid_ones() {
    let message = error(
        Kind::InputMapper,
        quote!(imag),
        quote!(
            struct M;
        ),
    );
    assert_eq!(message, "unknown modality `imag`; expected one of: `image`");
}

#[test]
fn duplicate_modality_is_rejected() {
    let message = error(
        Kind::InputMapper,
        quote!(image, image = f),
        quote!(
            struct M;
        ),
    );
    assert_eq!(message, "duplicate modality `image`");
}

#[test]
fn max_tokens_needs_a_function() {
    let message = error(
        Kind::MaxTokens,
        quote!(image),
        quote!(
            struct M;
        ),
    );
    assert!(
        message.starts_with("expected `image = function`"),
        "{message}"
    );
}

#[test]
fn architectures_must_be_strings() {
    let message = error(
        Kind::Model,
        quote!(Llava),
        quote!(
            struct M;
        ),
    );
    assert!(
        message.starts_with("expected a string literal"),
        "{message}"
    );
    let message = error(
        Kind::Model,
        quote!("A", "A"),
        quote!(
            struct M;
        ),
    );
    assert_eq!(message, "duplicate architecture `A`");
}

#[test]
fn registrations_go_on_a_struct() {
    let message = error(
        Kind::DummyData,
        quote!(f),
        quote!(
            fn not_a_model() {}
        ),
    );
    assert_eq!(
        message,
        "mmreg registrations go on the model's struct, found a function"
    );
}

#[test]
fn generic_models_are_rejected() {
    let message = error(
        Kind::DummyData,
        quote!(f),
        quote!(
            struct M<T>(T);
        ),
    );
    assert!(
        message.starts_with("a generic model type cannot be registered"),
        "{message}"
    );
}

#[test]
fn errors_are_reported_together_and_the_item_is_kept() {
    let item = quote! { fn not_a_model() {} };
    let errors = expand(Kind::InputMapper, quote!(imag), item.clone()).expect_err("is rejected");
    assert_eq!(errors.into_iter().count(), 2);
    let out = super::run(Kind::InputMapper, quote!(imag), item.clone()).to_string();
    assert!(out.starts_with(&item.to_string()), "{out}");
    assert!(out.contains("compile_error"), "{out}");
}
