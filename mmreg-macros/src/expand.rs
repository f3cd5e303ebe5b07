//! Expansion: the user's item untouched, then one `const _: () = { static … }` per registration. The
//! derive and the modality list live in the submodules; all work on `proc_macro2` tokens.

use proc_macro2::{Ident, Span, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::Path;

use crate::args::{self, ModelItem};

pub mod inputs;
pub mod modalities;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Model,
    InputMapper,
    MaxTokens,
    DummyData,
    InputProcessor,
}

/// Expands, or on error re-emits the original item next to the errors so IDEs keep working.
pub fn run(kind: Kind, attr: TokenStream, item: TokenStream) -> TokenStream {
    match expand(kind, attr, item.clone()) {
        Ok(tokens) => tokens,
        Err(error) => {
            let error = error.into_compile_error();
            quote! { #item #error }
        }
    }
}

pub fn expand(kind: Kind, attr: TokenStream, item: TokenStream) -> syn::Result<TokenStream> {
    // Report problems with the item and with the arguments together.
    let model = syn::parse2::<ModelItem>(item.clone());
    let registrations = parse_registrations(kind, attr);
    let (model, (krate, registrations)) = args::both(model, registrations)?;
    let blocks = registrations
        .into_iter()
        .map(|r| r.emit(&model.ident, &krate));
    Ok(quote! {
        #item
        #(#blocks)*
    })
}

/// One registration to emit, already validated.
enum Registration {
    Model(Vec<syn::LitStr>),
    InputMapper(args::ModalityArg),
    MaxTokens(args::ModalityArg),
    DummyData(Path),
    InputProcessor(Path),
}

/// The crate path (`crate = path` or `::mmreg_core`) and the registrations, with the errors of both.
fn parse_registrations(kind: Kind, attr: TokenStream) -> syn::Result<(Path, Vec<Registration>)> {
    let (krate, entries) = args::take_crate(args::parse_entries(attr)?);
    args::both(krate, parse_kind(kind, entries))
}

fn parse_kind(kind: Kind, entries: Vec<syn::Expr>) -> syn::Result<Vec<Registration>> {
    Ok(match kind {
        Kind::Model => vec![Registration::Model(args::parse_architectures(entries)?)],
        Kind::InputMapper => {
            args::parse_modalities(entries, false, "#[register_input_mapper(image)]")?
                .into_iter()
                .map(Registration::InputMapper)
                .collect()
        }
        Kind::MaxTokens => args::parse_modalities(
            entries,
            true,
            "#[register_max_tokens(image = max_image_tokens)]",
        )?
        .into_iter()
        .map(Registration::MaxTokens)
        .collect(),
        Kind::DummyData => {
            vec![Registration::DummyData(args::parse_function(
                entries,
                "#[register_dummy_data(dummy_data)]",
            )?)]
        }
        Kind::InputProcessor => vec![Registration::InputProcessor(args::parse_function(
            entries,
            "#[register_input_processor(input_processor)]",
        )?)],
    })
}

impl Registration {
    /// `krate` is how the user's crate names mmreg-core: every generated path starts with it.
    fn emit(self, model: &Ident, krate: &Path) -> TokenStream {
        let private = quote!(#krate::__private);
        let (key, hook) = match self {
            Registration::Model(architectures) => {
                let load = quote_spanned!(model.span()=> #private::load::<#model>);
                (
                    "MODEL".to_owned(),
                    quote! {
                        #private::Hook::Model { architectures: &[#(#architectures),*], load: #load }
                    },
                )
            }
            Registration::InputMapper(modality) => {
                let variant = format_ident!("{}", modality.variant);
                let marker = format_ident!("{}", modality.marker);
                let types = quote!(#model, #krate::#marker);
                let (function, map) = match modality.function {
                    Some(path) => {
                        let path = resolve_self(path, model);
                        let name = path_name(&path);
                        (
                            quote!(::core::option::Option::Some(#name)),
                            quote! {
                                |ctx, data| #private::map_with::<#types>(#path, ctx, data)
                            },
                        )
                    }
                    None => (
                        quote!(::core::option::Option::None),
                        quote!(#private::map_default::<#types>),
                    ),
                };
                (
                    format!("INPUT_MAPPER__{}", modality.name.to_string().to_uppercase()),
                    quote! {
                        #private::Hook::InputMapper {
                            modality: #krate::Modality::#variant,
                            function: #function,
                            params: #private::params::<#types>(),
                            host: #private::host_params::<#types>(),
                            map: #map,
                            embed: #private::embed::<#types>,
                            concat: #private::concat::<#types>,
                            count: #private::count::<#types>,
                            defaults: #private::modality_defaults::<#types>(),
                        }
                    },
                )
            }
            Registration::MaxTokens(modality) => {
                let variant = format_ident!("{}", modality.variant);
                let path = resolve_self(modality.function.expect("parsed as required"), model);
                let name = path_name(&path);
                (
                    format!("MAX_TOKENS__{}", modality.name.to_string().to_uppercase()),
                    quote! {
                        #private::Hook::MaxTokens {
                            modality: #krate::Modality::#variant,
                            function: #name,
                            max_tokens: #path,
                        }
                    },
                )
            }
            Registration::DummyData(path) => {
                let path = resolve_self(path, model);
                let name = path_name(&path);
                (
                    "DUMMY_DATA".to_owned(),
                    quote! {
                        #private::Hook::DummyData { function: #name, dummy_data: #path }
                    },
                )
            }
            Registration::InputProcessor(path) => {
                let path = resolve_self(path, model);
                let name = path_name(&path);
                (
                    "INPUT_PROCESSOR".to_owned(),
                    quote! {
                        #private::Hook::InputProcessor { function: #name, process: #path }
                    },
                )
            }
        };
        let static_name = format_ident!("__MMREG_{}__{}", key, upper_snake(&model.to_string()));
        quote! {
            const _: () = {
                #[#private::linkme::distributed_slice(#private::REGISTRATIONS)]
                #[linkme(crate = #private::linkme)]
                static #static_name: #private::Registration = #private::Registration {
                    model: #private::ModelId {
                        name: ::core::stringify!(#model),
                        path: ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#model)),
                    },
                    hook: #hook,
                    location: #private::Location {
                        file: ::core::file!(),
                        line: ::core::line!(),
                        column: ::core::column!(),
                    },
                };
            };
        }
    }
}

/// `Self::f` means the model type's associated function; the generated code sits outside any impl.
fn resolve_self(mut path: Path, model: &Ident) -> Path {
    if let Some(first) = path.segments.first_mut() {
        if first.ident == "Self" {
            first.ident = Ident::new(&model.to_string(), first.ident.span());
        }
    }
    path
}

/// The function's path as written, without spaces (`Llava::dummy_data`).
fn path_name(path: &Path) -> syn::LitStr {
    syn::LitStr::new(&args::path_text(path), Span::call_site())
}

fn upper_snake(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.extend(c.to_uppercase());
    }
    out
}

#[cfg(test)]
mod tests;
