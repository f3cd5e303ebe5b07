//! Parsing of the attributes' arguments, with every error collected and spanned at the offending token.

use proc_macro2::{Span, TokenStream};
use syn::parse::{Parse, ParseStream, Parser};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, ExprPath, Ident, Lit, LitStr, Path, Token};

/// The modalities the macros know: attribute name, `Modality` variant, marker type in `mmreg_core`.
/// Keep in step with `mmreg_core::Modality`.
pub const MODALITIES: &[(&str, &str, &str)] = &[("image", "Image", "Image")];

#[derive(Debug, Clone)]
pub struct ModalityArg {
    pub name: Ident,
    /// The variant of `mmreg_core::Modality`.
    pub variant: &'static str,
    /// The marker type implementing `ModalityKind`.
    pub marker: &'static str,
    /// `image = f`: the user's function; `None` for `image` alone.
    pub function: Option<Path>,
}

/// `modality` or `modality = function`, comma separated.
pub fn parse_modalities(
    attr: TokenStream,
    function_required: bool,
    example: &str,
) -> syn::Result<Vec<ModalityArg>> {
    let entries = Punctuated::<Expr, Token![,]>::parse_terminated.parse2(attr)?;
    if entries.is_empty() {
        return Err(syn::Error::new(
            Span::call_site(),
            format!("expected a modality, e.g. `{example}`"),
        ));
    }
    let mut errors: Option<syn::Error> = None;
    let mut push = |e: syn::Error| match &mut errors {
        Some(all) => all.combine(e),
        None => errors = Some(e),
    };
    let mut parsed: Vec<ModalityArg> = Vec::new();
    for entry in entries {
        let (key, function) = match &entry {
            Expr::Path(ExprPath { path, .. }) => (path.clone(), None),
            Expr::Assign(assign) => match (&*assign.left, &*assign.right) {
                (Expr::Path(left), Expr::Path(right)) => {
                    (left.path.clone(), Some(right.path.clone()))
                }
                (Expr::Path(_), right) => {
                    push(syn::Error::new_spanned(
                        right,
                        "expected the path of a function",
                    ));
                    continue;
                }
                (left, _) => {
                    push(syn::Error::new_spanned(left, "expected a modality name"));
                    continue;
                }
            },
            other => {
                push(syn::Error::new_spanned(
                    other,
                    format!("expected `modality` or `modality = function`, e.g. `{example}`"),
                ));
                continue;
            }
        };
        let Some(name) = key.get_ident().cloned() else {
            push(syn::Error::new_spanned(&key, "expected a modality name"));
            continue;
        };
        let Some(&(_, variant, marker)) = MODALITIES.iter().find(|(n, _, _)| name == n) else {
            let valid: Vec<String> = MODALITIES
                .iter()
                .map(|(n, _, _)| format!("`{n}`"))
                .collect();
            push(syn::Error::new_spanned(
                &name,
                format!(
                    "unknown modality `{name}`; expected one of: {}",
                    valid.join(", ")
                ),
            ));
            continue;
        };
        if function_required && function.is_none() {
            push(syn::Error::new_spanned(
                &name,
                format!("expected `{name} = function`, e.g. `{example}`"),
            ));
            continue;
        }
        if parsed.iter().any(|p| p.name == name) {
            push(syn::Error::new_spanned(
                &name,
                format!("duplicate modality `{name}`"),
            ));
            continue;
        }
        parsed.push(ModalityArg {
            name,
            variant,
            marker,
            function,
        });
    }
    match errors {
        Some(errors) => Err(errors),
        None => Ok(parsed),
    }
}

/// A single function path: `#[register_dummy_data(function)]`.
pub fn parse_function(attr: TokenStream, example: &str) -> syn::Result<Path> {
    if attr.is_empty() {
        return Err(syn::Error::new(
            Span::call_site(),
            format!("expected a function, e.g. `{example}`"),
        ));
    }
    let span = attr.span();
    let entries = Punctuated::<Expr, Token![,]>::parse_terminated.parse2(attr)?;
    let mut iter = entries.into_iter();
    let first = iter.next();
    if let Some(extra) = iter.next() {
        return Err(syn::Error::new_spanned(
            extra,
            "expected exactly one function",
        ));
    }
    match first {
        Some(Expr::Path(ExprPath { path, .. })) => Ok(path),
        Some(other) => Err(syn::Error::new_spanned(
            other,
            format!("expected the path of a function, e.g. `{example}`"),
        )),
        None => Err(syn::Error::new(
            span,
            format!("expected a function, e.g. `{example}`"),
        )),
    }
}

/// One or more architecture names: `#[register_model("LlavaForConditionalGeneration")]`.
pub fn parse_architectures(attr: TokenStream) -> syn::Result<Vec<LitStr>> {
    let example = "#[register_model(\"LlavaForConditionalGeneration\")]";
    let entries = Punctuated::<Expr, Token![,]>::parse_terminated.parse2(attr)?;
    if entries.is_empty() {
        return Err(syn::Error::new(
            Span::call_site(),
            format!("expected the Hugging Face `architectures` name(s), e.g. `{example}`"),
        ));
    }
    let mut names: Vec<LitStr> = Vec::new();
    let mut errors: Option<syn::Error> = None;
    for entry in entries {
        let error = match &entry {
            Expr::Lit(ExprLit {
                lit: Lit::Str(name),
                ..
            }) if name.value().is_empty() => {
                syn::Error::new_spanned(name, "the architecture name is empty")
            }
            Expr::Lit(ExprLit {
                lit: Lit::Str(name),
                ..
            }) if names.iter().any(|n| n.value() == name.value()) => {
                syn::Error::new_spanned(name, format!("duplicate architecture `{}`", name.value()))
            }
            Expr::Lit(ExprLit {
                lit: Lit::Str(name),
                ..
            }) => {
                names.push(name.clone());
                continue;
            }
            other => syn::Error::new_spanned(
                other,
                format!("expected a string literal, e.g. `{example}`"),
            ),
        };
        match &mut errors {
            Some(all) => all.combine(error),
            None => errors = Some(error),
        }
    }
    match errors {
        Some(errors) => Err(errors),
        None => Ok(names),
    }
}

/// The item an attribute sits on: it must be a non-generic struct or enum.
pub struct ModelItem {
    pub ident: Ident,
}

impl Parse for ModelItem {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let item: syn::Item = input.parse()?;
        let (ident, generics) = match &item {
            syn::Item::Struct(s) => (&s.ident, &s.generics),
            syn::Item::Enum(e) => (&e.ident, &e.generics),
            other => {
                let found = match other {
                    syn::Item::Fn(_) => "a function",
                    syn::Item::Impl(_) => "an impl block",
                    syn::Item::Mod(_) => "a module",
                    syn::Item::Trait(_) => "a trait",
                    syn::Item::Static(_) | syn::Item::Const(_) => "a constant",
                    _ => "another item",
                };
                return Err(syn::Error::new(
                    item_span(other),
                    format!("mmreg registrations go on the model's struct, found {found}"),
                ));
            }
        };
        if !generics.params.is_empty() {
            return Err(syn::Error::new_spanned(
                generics,
                "a generic model type cannot be registered; register a concrete type (e.g. a newtype)",
            ));
        }
        Ok(ModelItem {
            ident: ident.clone(),
        })
    }
}

fn item_span(item: &syn::Item) -> Span {
    match item {
        syn::Item::Fn(f) => f.sig.ident.span(),
        syn::Item::Impl(i) => i.impl_token.span,
        syn::Item::Mod(m) => m.ident.span(),
        syn::Item::Trait(t) => t.ident.span(),
        syn::Item::Static(s) => s.ident.span(),
        syn::Item::Const(c) => c.ident.span(),
        other => other.span(),
    }
}
