//! Parsing of the attributes' arguments, with every error collected and spanned at the offending token.

use proc_macro2::{Span, TokenStream};
use quote::ToTokens;
use syn::parse::{Parse, ParseStream, Parser};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, ExprPath, Ident, Lit, LitStr, Path, Token};

/// The modalities the macros know: attribute name, `Modality` variant, marker type in `mmreg_core`.
/// The one list: `mmreg_core::Modality` is generated from it by `__define_modalities!`, so adding a
/// modality here adds it there (each marker type must exist in `mmreg_core`).
pub const MODALITIES: &[(&str, &str, &str)] =
    &[("image", "Image", "Image"), ("video", "Video", "Video")];

/// The attribute names of every modality, for "expected one of" messages: "`image`, `video`".
pub fn expected_modalities() -> String {
    let names: Vec<String> = MODALITIES
        .iter()
        .map(|(name, _, _)| format!("`{name}`"))
        .collect();
    names.join(", ")
}

/// Errors collected while parsing, so that one build reports every mistake rather than the first.
#[derive(Default)]
pub struct Errors(Option<syn::Error>);

impl Errors {
    pub fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(error),
            None => self.0 = Some(error),
        }
    }

    /// Keeps the error of `result`, if any, and returns its value otherwise.
    pub fn check<T>(&mut self, result: syn::Result<T>) -> Option<T> {
        result.map_err(|error| self.push(error)).ok()
    }

    pub fn finish<T>(self, value: T) -> syn::Result<T> {
        match self.0 {
            Some(errors) => Err(errors),
            None => Ok(value),
        }
    }
}

/// Both values, or every error of the two: problems in different places are reported together.
pub fn both<A, B>(a: syn::Result<A>, b: syn::Result<B>) -> syn::Result<(A, B)> {
    match (a, b) {
        (Ok(a), Ok(b)) => Ok((a, b)),
        (Err(mut a), Err(b)) => {
            a.combine(b);
            Err(a)
        }
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}

/// The path generated code names mmreg-core by, unless `crate = path` overrides it.
pub fn default_crate() -> Path {
    syn::parse_quote!(::mmreg_core)
}

const CRATE_EXAMPLE: &str = "crate = ::mmreg_core";

/// The arguments of a registration attribute, comma separated, before any validation.
pub fn parse_entries(attr: TokenStream) -> syn::Result<Vec<Expr>> {
    Ok(Punctuated::<Expr, Token![,]>::parse_terminated
        .parse2(attr)?
        .into_iter()
        .collect())
}

/// Takes `crate = path` out of an attribute's arguments, wherever it sits, as linkme and serde allow:
/// a crate that re-exports mmreg-core (or mmreg-core itself) names it by a path other than
/// `::mmreg_core`. Returns the crate path (or its errors) and the other arguments, in order.
pub fn take_crate(entries: Vec<Expr>) -> (syn::Result<Path>, Vec<Expr>) {
    let mut errors = Errors::default();
    let mut krate: Option<Path> = None;
    let mut rest = Vec::with_capacity(entries.len());
    for entry in entries {
        let (key, value) = match &entry {
            Expr::Path(ExprPath { path, .. }) if path.is_ident("crate") => (path, None),
            Expr::Assign(assign) => match &*assign.left {
                Expr::Path(ExprPath { path, .. }) if path.is_ident("crate") => {
                    (path, Some(&*assign.right))
                }
                _ => {
                    rest.push(entry);
                    continue;
                }
            },
            _ => {
                rest.push(entry);
                continue;
            }
        };
        let Some(path) = errors.check(crate_value(key, value)) else {
            continue;
        };
        if krate.is_some() {
            errors.push(syn::Error::new_spanned(&entry, "duplicate `crate = …`"));
            continue;
        }
        krate = Some(path);
    }
    (errors.finish(krate.unwrap_or_else(default_crate)), rest)
}

/// The path of `crate = path`; `key` is the `crate` token, for an error when the value is missing.
pub fn crate_value(key: &Path, value: Option<&Expr>) -> syn::Result<Path> {
    match value {
        Some(Expr::Path(ExprPath {
            qself: None, path, ..
        })) => Ok(path.clone()),
        Some(other) => Err(syn::Error::new_spanned(
            other,
            format!("expected the path of mmreg-core, e.g. `{CRATE_EXAMPLE}`"),
        )),
        None => Err(syn::Error::new_spanned(
            key,
            format!("expected `crate = path`, e.g. `{CRATE_EXAMPLE}`"),
        )),
    }
}

/// A path as written, without spaces (`Llava::dummy_data`), for messages and registered names.
pub fn path_text(path: &Path) -> String {
    path.to_token_stream().to_string().replace(' ', "")
}

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
    entries: Vec<Expr>,
    function_required: bool,
    example: &str,
) -> syn::Result<Vec<ModalityArg>> {
    if entries.is_empty() {
        return Err(syn::Error::new(
            Span::call_site(),
            format!("expected a modality, e.g. `{example}`"),
        ));
    }
    let mut errors = Errors::default();
    let mut parsed: Vec<ModalityArg> = Vec::new();
    for entry in entries {
        let Some(arg) = errors.check(parse_modality(&entry, function_required, example)) else {
            continue;
        };
        if parsed.iter().any(|p| p.name == arg.name) {
            errors.push(syn::Error::new_spanned(
                &arg.name,
                format!("duplicate modality `{}`", arg.name),
            ));
            continue;
        }
        parsed.push(arg);
    }
    errors.finish(parsed)
}

/// One `modality` or `modality = function`.
fn parse_modality(
    entry: &Expr,
    function_required: bool,
    example: &str,
) -> syn::Result<ModalityArg> {
    let (key, function) = match entry {
        Expr::Path(ExprPath { path, .. }) => (path, None),
        Expr::Assign(assign) => match (&*assign.left, &*assign.right) {
            (Expr::Path(left), Expr::Path(right)) => (&left.path, Some(right.path.clone())),
            (Expr::Path(_), right) => {
                return Err(syn::Error::new_spanned(
                    right,
                    "expected the path of a function",
                ))
            }
            (left, _) => return Err(syn::Error::new_spanned(left, "expected a modality name")),
        },
        other => {
            return Err(syn::Error::new_spanned(
                other,
                format!("expected `modality` or `modality = function`, e.g. `{example}`"),
            ))
        }
    };
    let Some(name) = key.get_ident().cloned() else {
        return Err(syn::Error::new_spanned(key, "expected a modality name"));
    };
    let Some(&(_, variant, marker)) = MODALITIES.iter().find(|(n, _, _)| name == n) else {
        return Err(syn::Error::new_spanned(
            &name,
            format!(
                "unknown modality `{name}`; expected one of: {}",
                expected_modalities()
            ),
        ));
    };
    if function_required && function.is_none() {
        return Err(syn::Error::new_spanned(
            &name,
            format!("expected `{name} = function`, e.g. `{example}`"),
        ));
    }
    Ok(ModalityArg {
        name,
        variant,
        marker,
        function,
    })
}

/// A single function path: `#[register_dummy_data(function)]`.
pub fn parse_function(entries: Vec<Expr>, example: &str) -> syn::Result<Path> {
    let mut entries = entries.into_iter();
    let first = entries.next();
    if let Some(extra) = entries.next() {
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
            Span::call_site(),
            format!("expected a function, e.g. `{example}`"),
        )),
    }
}

/// One or more architecture names: `#[register_model("LlavaForConditionalGeneration")]`.
pub fn parse_architectures(entries: Vec<Expr>) -> syn::Result<Vec<LitStr>> {
    let example = "#[register_model(\"LlavaForConditionalGeneration\")]";
    if entries.is_empty() {
        return Err(syn::Error::new(
            Span::call_site(),
            format!("expected the Hugging Face `architectures` name(s), e.g. `{example}`"),
        ));
    }
    let mut names: Vec<LitStr> = Vec::new();
    let mut errors = Errors::default();
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
        errors.push(error);
    }
    errors.finish(names)
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
