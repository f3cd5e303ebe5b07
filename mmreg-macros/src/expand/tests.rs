//! Expansion snapshots (what `cargo expand` shows, minus linkme's own expansion) and error messages.

use proc_macro2::TokenStream;
use quote::quote;

use super::{expand, inputs, modalities, Kind};

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
    assert_eq!(
        message,
        "unknown modality `imag`; expected one of: `image`, `video`"
    );
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

#[test]
fn video_input_mapper() {
    insta::assert_snapshot!(expanded(Kind::InputMapper, quote!(video = map_videos)));
}

// `crate = path`

/// Each attribute with `crate = path` somewhere in its arguments.
fn with_crate_override() -> Vec<(Kind, TokenStream)> {
    vec![
        (Kind::Model, quote!("Arch", crate = my::reexport)),
        (Kind::Model, quote!(crate = my::reexport, "A", "B")),
        (
            Kind::InputMapper,
            quote!(image, crate = my::reexport, video = f),
        ),
        (Kind::MaxTokens, quote!(crate = my::reexport, image = f)),
        (Kind::DummyData, quote!(f, crate = my::reexport)),
        (Kind::InputProcessor, quote!(crate = my::reexport, f)),
    ]
}

#[test]
fn crate_override_replaces_every_mmreg_core_path() {
    for (kind, attr) in with_crate_override() {
        let out = expanded(kind, attr.clone());
        assert!(!out.contains("mmreg_core"), "{attr}:\n{out}");
        assert!(
            out.contains("my::reexport::__private::Registration"),
            "{attr}:\n{out}"
        );
    }
}

#[test]
fn crate_override_snapshots() {
    insta::assert_snapshot!(expanded(
        Kind::InputMapper,
        quote!(image = Self::map_images, crate = ::foo::mmreg_core)
    ));
    insta::assert_snapshot!(expanded(
        Kind::Model,
        quote!(crate = my::reexport, "LlavaForConditionalGeneration")
    ));
}

#[test]
fn crate_override_keeps_exactly_one_function() {
    let message = error(
        Kind::DummyData,
        quote!(f, g, crate = x),
        quote!(
            struct M;
        ),
    );
    assert_eq!(message, "expected exactly one function");
    let message = error(
        Kind::InputProcessor,
        quote!(crate = x),
        quote!(
            struct M;
        ),
    );
    assert!(message.starts_with("expected a function"), "{message}");
}

#[test]
fn duplicate_crate_is_rejected_where_it_is_written() {
    let attr: TokenStream = "crate = a, f, crate = b".parse().expect("tokens");
    let errors = expand(
        Kind::DummyData,
        attr,
        quote!(
            struct M;
        ),
    )
    .expect_err("is rejected");
    assert_eq!(
        pointed_at(errors),
        pairs(&[("crate = b", "duplicate `crate = …`")])
    );
}

#[test]
fn crate_needs_a_path() {
    let message = error(
        Kind::InputMapper,
        quote!(image, crate),
        quote!(
            struct M;
        ),
    );
    assert!(message.starts_with("expected `crate = path`"), "{message}");
    let message = error(
        Kind::Model,
        quote!("A", crate = "::x"),
        quote!(
            struct M;
        ),
    );
    assert!(
        message.starts_with("expected the path of mmreg-core"),
        "{message}"
    );
}

#[test]
fn crate_errors_are_reported_with_the_others() {
    let errors = expand(
        Kind::InputMapper,
        quote!(crate = a, imag, crate = b),
        quote!(
            fn not_a_model() {}
        ),
    )
    .expect_err("is rejected");
    let messages: Vec<String> = errors.into_iter().map(|e| e.to_string()).collect();
    assert_eq!(
        messages,
        [
            "mmreg registrations go on the model's struct, found a function",
            "duplicate `crate = …`",
            "unknown modality `imag`; expected one of: `image`, `video`",
        ]
    );
}

// `#[derive(ModalityInputs)]`

fn derived(item: TokenStream) -> String {
    pretty(inputs::expand(item).expect("expands"))
}

/// Each error as (the source text it points at, its message): the item is parsed from `source` so that
/// spans have locations.
fn derive_errors(source: &str) -> Vec<(String, String)> {
    let item: TokenStream = source.parse().expect("tokens");
    pointed_at(inputs::expand(item).expect_err("is rejected"))
}

fn pointed_at(errors: syn::Error) -> Vec<(String, String)> {
    errors
        .into_iter()
        .map(|e| (e.span().source_text().unwrap_or_default(), e.to_string()))
        .collect()
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected
        .iter()
        .map(|(text, message)| (text.to_string(), message.to_string()))
        .collect()
}

#[test]
fn derive_modality_inputs() {
    insta::assert_snapshot!(derived(quote! {
        pub struct AnyresPixelValues {
            #[inputs(pad = 1)]
            pub pixel_values: Tensor,
            #[inputs(host)]
            pub image_sizes: Tensor,
        }
    }));
}

#[test]
fn derive_without_concat_and_with_crate_override() {
    insta::assert_snapshot!(derived(quote! {
        #[derive(Debug)]
        #[inputs(no_concat, crate = my::reexport)]
        pub struct Frames<T> where T: Copy {
            pub r#type: Tensor,
            marker: T,
        }
    }));
}

#[test]
fn derive_params_are_sorted_and_unraw() {
    let out = derived(quote! {
        struct Inputs { zeta: Tensor, r#type: Tensor, alpha: Tensor }
    });
    assert!(
        out.contains(r#"const PARAMS: &'static [&'static str] = &["alpha", "type", "zeta"];"#),
        "{out}"
    );
}

#[test]
fn derive_host_params_are_the_marked_fields_sorted() {
    let out = derived(quote! {
        struct Inputs {
            #[inputs(host)]
            zeta: Tensor,
            pixels: Tensor,
            #[inputs(host, pad = 1)]
            alpha: Tensor,
        }
    });
    assert!(
        out.contains(r#"const HOST: &'static [&'static str] = &["alpha", "zeta"];"#),
        "{out}"
    );
    let none = derived(quote! { struct Inputs { pixels: Tensor } });
    assert!(
        none.contains("const HOST: &'static [&'static str] = &[];"),
        "{none}"
    );
}

#[test]
fn derive_host_takes_no_value_and_comes_once() {
    let errors = derive_errors(
        "struct Inputs {
            #[inputs(host = true)]
            a: Tensor,
            #[inputs(host, host)]
            b: Tensor,
        }",
    );
    assert_eq!(
        errors,
        pairs(&[
            ("host = true", "`host` takes no value"),
            ("host", "duplicate `host`"),
        ])
    );
}

#[test]
fn derive_field_names_cannot_shadow_the_generated_locals() {
    let out = derived(quote! {
        struct Inputs { parts: Tensor, part: Tensor, columns: Tensor }
    });
    // The fields are bound only once `parts`, `part` and `columns` are done with.
    let split = out
        .find("let [parts, part, columns] = columns;")
        .expect("split");
    assert!(out[..split].contains("for part in parts"), "{out}");
    assert!(!out[split..].contains("for part"), "{out}");
}

#[test]
fn derive_needs_a_struct_with_named_fields() {
    let expected = "`ModalityInputs` is derived for a struct with named fields, one per tensor";
    for (source, text, found) in [
        ("enum E { A }", "E", "an enum"),
        ("struct T(Tensor);", "(Tensor)", "a tuple struct"),
        ("struct U;", "U", "a unit struct"),
        ("union V { a: u8 }", "V", "a union"),
    ] {
        assert_eq!(
            derive_errors(source),
            pairs(&[(text, &format!("{expected}, found {found}"))])
        );
    }
    assert_eq!(
        derive_errors("struct Empty {}"),
        pairs(&[(
            "Empty",
            "`ModalityInputs` needs at least one field: the model's forward takes at least one tensor"
        )])
    );
}

#[test]
fn derive_unknown_keys_list_the_valid_ones() {
    let errors = derive_errors(
        "#[inputs(pad = 1, concat)]
        struct Inputs {
            #[inputs(no_concat)]
            a: Tensor,
            #[inputs(axis = 2)]
            b: Tensor,
        }",
    );
    assert_eq!(
        errors,
        pairs(&[
            ("pad", "unknown `inputs` key `pad` on the struct; expected one of: `crate`, `no_concat` (`pad` goes on a field)"),
            ("concat", "unknown `inputs` key `concat` on the struct; expected one of: `crate`, `no_concat`"),
            ("no_concat", "unknown `inputs` key `no_concat` on a field; expected one of: `pad`, `host` (`no_concat` goes on the struct)"),
            ("axis", "unknown `inputs` key `axis` on a field; expected one of: `pad`, `host`"),
        ])
    );
}

#[test]
fn derive_pad_must_be_an_integer_literal() {
    let errors = derive_errors(
        r#"struct Inputs {
            #[inputs(pad = AXIS)]
            a: Tensor,
            #[inputs(pad = "1")]
            b: Tensor,
            #[inputs(pad)]
            c: Tensor,
            #[inputs(pad = 0)]
            d: Tensor,
            #[inputs(pad = 1, pad = 2)]
            e: Tensor,
        }"#,
    );
    let literal = "expected an integer literal axis, e.g. `#[inputs(pad = 1)]`";
    assert_eq!(
        errors,
        pairs(&[
            ("AXIS", literal),
            ("\"1\"", literal),
            ("pad", "expected `pad = axis`, e.g. `#[inputs(pad = 1)]`"),
            ("0", "axis 0 is the axis `concat` joins along; pad a later one, e.g. `#[inputs(pad = 1)]`"),
            ("pad = 2", "duplicate `pad`"),
        ])
    );
}

#[test]
fn derive_struct_options_are_checked() {
    let errors = derive_errors(
        r#"#[inputs(crate = a, no_concat = true)]
        #[inputs(crate = b, crate, crate = "c", no_concat, no_concat)]
        struct Inputs { a: Tensor }"#,
    );
    assert_eq!(
        errors,
        pairs(&[
            ("no_concat = true", "`no_concat` takes no value"),
            ("crate = b", "duplicate `crate = …`"),
            (
                "crate",
                "expected `crate = path`, e.g. `crate = ::mmreg_core`"
            ),
            (
                "\"c\"",
                "expected the path of mmreg-core, e.g. `crate = ::mmreg_core`"
            ),
            ("no_concat", "duplicate `no_concat`"),
        ])
    );
}

// `__define_modalities!()`

#[test]
fn modality_enum() {
    insta::assert_snapshot!(pretty(
        modalities::expand(TokenStream::new()).expect("expands")
    ));
}

#[test]
fn modality_enum_takes_no_input() {
    let message = modalities::expand(quote!(Image, Video))
        .expect_err("is rejected")
        .to_string();
    assert!(
        message.starts_with("`__define_modalities!` takes no input"),
        "{message}"
    );
}

#[test]
fn modalities_are_distinct_identifiers() {
    use crate::args::MODALITIES;
    for (i, (name, variant, marker)) in MODALITIES.iter().enumerate() {
        for text in [name, variant, marker] {
            syn::parse_str::<syn::Ident>(text).expect("an identifier");
        }
        assert!(
            MODALITIES[..i]
                .iter()
                .all(|(n, v, _)| n != name && v != variant),
            "`{name}` is listed twice"
        );
    }
}
