//! `__define_modalities!()`: mmreg-core's `Modality` enum, generated from [`MODALITIES`] so that the
//! attributes and the enum cannot disagree about which modalities exist.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote};
use syn::LitStr;

use crate::args::{expected_modalities, MODALITIES};

pub fn run(input: TokenStream) -> TokenStream {
    expand(input).unwrap_or_else(syn::Error::into_compile_error)
}

/// The input must be empty: the list comes from [`MODALITIES`], not from the caller.
pub fn expand(input: TokenStream) -> syn::Result<TokenStream> {
    if !input.is_empty() {
        return Err(syn::Error::new_spanned(
            input,
            "`__define_modalities!` takes no input; the modalities are listed in mmreg-macros' `MODALITIES`",
        ));
    }
    Ok(emit())
}

fn emit() -> TokenStream {
    let variants: Vec<_> = MODALITIES
        .iter()
        .map(|(_, variant, _)| format_ident!("{variant}"))
        .collect();
    let names: Vec<_> = MODALITIES
        .iter()
        .map(|(name, _, _)| LitStr::new(name, Span::call_site()))
        .collect();
    let docs = MODALITIES.iter().map(|(name, _, marker)| {
        format!(
            " The `{name}` modality: `#[register_input_mapper({name})]`, items of the marker type `{marker}`."
        )
    });
    let expected = LitStr::new(&expected_modalities(), Span::call_site());
    quote! {
        /// A modality: the key under which a model registers its input mapper, max tokens and forward
        /// parameters. Generated from mmreg-macros' list, which the registration attributes read too.
        #[derive(
            ::core::fmt::Debug,
            ::core::clone::Clone,
            ::core::marker::Copy,
            ::core::cmp::PartialEq,
            ::core::cmp::Eq,
            ::core::cmp::PartialOrd,
            ::core::cmp::Ord,
            ::core::hash::Hash,
        )]
        pub enum Modality {
            #(
                #[doc = #docs]
                #variants,
            )*
        }

        impl Modality {
            /// Every modality, in the order the macros list them in errors.
            pub const ALL: &'static [Modality] = &[#(Modality::#variants),*];

            /// The name used in attributes (`#[register_input_mapper(image)]`) and on the command line.
            pub const fn name(self) -> &'static str {
                match self {
                    #(Modality::#variants => #names,)*
                }
            }
        }

        impl ::core::fmt::Display for Modality {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl ::core::str::FromStr for Modality {
            type Err = ::std::string::String;

            /// The inverse of [`Modality::name`], for the command line.
            fn from_str(name: &str) -> ::core::result::Result<Self, Self::Err> {
                match name {
                    #(#names => ::core::result::Result::Ok(Modality::#variants),)*
                    other => ::core::result::Result::Err(::std::format!(
                        "unknown modality `{}`; expected one of: {}",
                        other,
                        #expected,
                    )),
                }
            }
        }
    }
}
