//! `#[derive(ModalityInputs)]`: a modality's typed forward inputs, one `tch::Tensor` per named field,
//! to and from the `TensorMap` they travel in, and joined across prompts. Each field's name is the
//! forward parameter's, so the struct is the whole contract between input mapper and model.

use proc_macro2::{Literal, TokenStream};
use quote::quote;
use syn::ext::IdentExt;
use syn::punctuated::Punctuated;
use syn::{
    Attribute, Data, DeriveInput, Expr, ExprLit, Fields, Ident, Lit, LitStr, Meta, Path, Token,
};

use crate::args::{self, Errors};

/// The keys `#[inputs(...)]` takes on the struct and on a field.
const STRUCT_KEYS: &[&str] = &["crate", "no_concat"];
const FIELD_KEYS: &[&str] = &["pad", "host"];
const PAD_EXAMPLE: &str = "#[inputs(pad = 1)]";

pub fn run(input: TokenStream) -> TokenStream {
    expand(input).unwrap_or_else(syn::Error::into_compile_error)
}

pub fn expand(input: TokenStream) -> syn::Result<TokenStream> {
    let input: DeriveInput = syn::parse2(input)?;
    // Report problems with the struct's options and with its fields together.
    let (options, fields) = args::both(parse_options(&input.attrs), parse_fields(&input))?;
    Ok(emit(&input, &options, &fields))
}

/// What `#[inputs(...)]` on the struct says.
struct Options {
    krate: Path,
    /// False with `no_concat`: the trait's default `concat` then runs each prompt alone.
    concat: bool,
}

/// One tensor: the struct's field and its name in the `TensorMap`.
struct Field {
    member: Ident,
    /// The field's name without `r#`: the forward parameter's name.
    name: LitStr,
    /// `#[inputs(pad = axis)]`: the axis `concat` pads with zeros to the largest.
    pad: Option<usize>,
    /// `#[inputs(host)]`: metadata that stays on the host (`ModalityInputs::HOST`).
    host: bool,
}

fn parse_options(attrs: &[Attribute]) -> syn::Result<Options> {
    let mut errors = Errors::default();
    let mut krate: Option<Path> = None;
    let mut no_concat = false;
    for meta in inputs_metas(attrs, &mut errors) {
        let key = meta.path();
        if key.is_ident("crate") {
            let value = match &meta {
                Meta::NameValue(pair) => Some(&pair.value),
                _ => None,
            };
            let Some(path) = errors.check(args::crate_value(key, value)) else {
                continue;
            };
            if krate.replace(path).is_some() {
                errors.push(syn::Error::new_spanned(&meta, "duplicate `crate = …`"));
            }
        } else if key.is_ident("no_concat") {
            if !matches!(meta, Meta::Path(_)) {
                errors.push(syn::Error::new_spanned(&meta, "`no_concat` takes no value"));
            } else if std::mem::replace(&mut no_concat, true) {
                errors.push(syn::Error::new_spanned(&meta, "duplicate `no_concat`"));
            }
        } else {
            errors.push(unknown_key(
                key,
                "the struct",
                STRUCT_KEYS,
                (FIELD_KEYS, "a field"),
            ));
        }
    }
    errors.finish(Options {
        krate: krate.unwrap_or_else(args::default_crate),
        concat: !no_concat,
    })
}

fn parse_fields(input: &DeriveInput) -> syn::Result<Vec<Field>> {
    let mut errors = Errors::default();
    let fields = named_fields(input)?
        .iter()
        .filter_map(|field| errors.check(parse_field(field)))
        .collect();
    errors.finish(fields)
}

/// The fields of a struct with named fields: their names are the forward parameters' names, so
/// nothing else can say which tensor is which.
fn named_fields(input: &DeriveInput) -> syn::Result<&Punctuated<syn::Field, Token![,]>> {
    let expected = "`ModalityInputs` is derived for a struct with named fields, one per tensor";
    let ident = &input.ident;
    let error = match &input.data {
        Data::Struct(data) => match &data.fields {
            Fields::Named(named) if named.named.is_empty() => syn::Error::new_spanned(
                ident,
                "`ModalityInputs` needs at least one field: the model's forward takes at least one tensor",
            ),
            Fields::Named(named) => return Ok(&named.named),
            Fields::Unnamed(unnamed) => {
                syn::Error::new_spanned(unnamed, format!("{expected}, found a tuple struct"))
            }
            Fields::Unit => syn::Error::new_spanned(ident, format!("{expected}, found a unit struct")),
        },
        Data::Enum(_) => syn::Error::new_spanned(ident, format!("{expected}, found an enum")),
        Data::Union(_) => syn::Error::new_spanned(ident, format!("{expected}, found a union")),
    };
    Err(error)
}

fn parse_field(field: &syn::Field) -> syn::Result<Field> {
    let member = field.ident.clone().expect("named fields have names");
    let mut errors = Errors::default();
    let mut pad: Option<usize> = None;
    let mut host = false;
    for meta in inputs_metas(&field.attrs, &mut errors) {
        if meta.path().is_ident("host") {
            if !matches!(meta, Meta::Path(_)) {
                errors.push(syn::Error::new_spanned(&meta, "`host` takes no value"));
            } else if std::mem::replace(&mut host, true) {
                errors.push(syn::Error::new_spanned(&meta, "duplicate `host`"));
            }
            continue;
        }
        if !meta.path().is_ident("pad") {
            errors.push(unknown_key(
                meta.path(),
                "a field",
                FIELD_KEYS,
                (STRUCT_KEYS, "the struct"),
            ));
            continue;
        }
        let Some(axis) = errors.check(pad_axis(&meta)) else {
            continue;
        };
        if pad.replace(axis).is_some() {
            errors.push(syn::Error::new_spanned(&meta, "duplicate `pad`"));
        }
    }
    let name = LitStr::new(&member.unraw().to_string(), member.span());
    errors.finish(Field {
        member,
        name,
        pad,
        host,
    })
}

/// `pad = axis`, an integer literal so the axis is known when the macro runs. Axis 0 is refused:
/// it is the axis `concat` joins along, and padding it would add zero items.
fn pad_axis(meta: &Meta) -> syn::Result<usize> {
    let Meta::NameValue(pair) = meta else {
        return Err(syn::Error::new_spanned(
            meta,
            format!("expected `pad = axis`, e.g. `{PAD_EXAMPLE}`"),
        ));
    };
    let Expr::Lit(ExprLit {
        lit: Lit::Int(literal),
        ..
    }) = &pair.value
    else {
        return Err(syn::Error::new_spanned(
            &pair.value,
            format!("expected an integer literal axis, e.g. `{PAD_EXAMPLE}`"),
        ));
    };
    match literal.base10_parse::<usize>()? {
        0 => Err(syn::Error::new_spanned(
            literal,
            format!(
                "axis 0 is the axis `concat` joins along; pad a later one, e.g. `{PAD_EXAMPLE}`"
            ),
        )),
        axis => Ok(axis),
    }
}

/// The entries of every `#[inputs(...)]` among `attrs`; malformed lists go to `errors`.
fn inputs_metas(attrs: &[Attribute], errors: &mut Errors) -> Vec<Meta> {
    attrs
        .iter()
        .filter(|attr| attr.path().is_ident("inputs"))
        .filter_map(|attr| {
            errors.check(attr.parse_args_with(Punctuated::<Meta, Token![,]>::parse_terminated))
        })
        .flatten()
        .collect()
}

/// An unknown key, with the valid ones; a key that belongs on the other level says where it goes.
fn unknown_key(key: &Path, place: &str, valid: &[&str], other: (&[&str], &str)) -> syn::Error {
    let text = args::path_text(key);
    let listed: Vec<String> = valid.iter().map(|k| format!("`{k}`")).collect();
    let mut message = format!(
        "unknown `inputs` key `{text}` on {place}; expected one of: {}",
        listed.join(", ")
    );
    let (other_keys, other_place) = other;
    if other_keys.contains(&text.as_str()) {
        message.push_str(&format!(" (`{text}` goes on {other_place})"));
    }
    syn::Error::new_spanned(key, message)
}

fn emit(input: &DeriveInput, options: &Options, fields: &[Field]) -> TokenStream {
    let krate = &options.krate;
    let ident = &input.ident;
    let (impl_generics, type_generics, where_clause) = input.generics.split_for_impl();
    // The `TensorMap` is a `BTreeMap`: its keys come out sorted, and so must `PARAMS`.
    let mut params: Vec<&LitStr> = fields.iter().map(|f| &f.name).collect();
    params.sort_by_key(|name| name.value());
    let mut host: Vec<&LitStr> = fields.iter().filter(|f| f.host).map(|f| &f.name).collect();
    host.sort_by_key(|name| name.value());
    let members: Vec<&Ident> = fields.iter().map(|f| &f.member).collect();
    let names: Vec<&LitStr> = fields.iter().map(|f| &f.name).collect();
    let concat = options.concat.then(|| emit_concat(krate, fields));
    quote! {
        #[automatically_derived]
        impl #impl_generics #krate::ModalityInputs for #ident #type_generics #where_clause {
            const PARAMS: &'static [&'static str] = &[#(#params),*];
            const HOST: &'static [&'static str] = &[#(#host),*];

            fn into_tensors(self) -> #krate::TensorMap {
                let mut tensors = <#krate::TensorMap as ::core::default::Default>::default();
                #(tensors.insert(#names, self.#members);)*
                tensors
            }

            fn from_tensors(mut tensors: #krate::TensorMap) -> #krate::Result<Self> {
                ::core::result::Result::Ok(Self {
                    #(#members: tensors.take(#names)?,)*
                })
            }

            #concat
        }
    }
}

/// `concat`: each field's tensors, one per part, gathered into a column and joined along axis 0.
/// The columns are an array indexed by position, and the fields' names are bound only after `parts`,
/// `part` and `columns` are done with, so no field name can shadow them.
fn emit_concat(krate: &Path, fields: &[Field]) -> TokenStream {
    let count = Literal::usize_unsuffixed(fields.len());
    let indices = (0..fields.len()).map(Literal::usize_unsuffixed);
    let members: Vec<&Ident> = fields.iter().map(|f| &f.member).collect();
    let pads = fields.iter().map(|f| match f.pad {
        Some(axis) => {
            let axis = Literal::usize_unsuffixed(axis);
            quote!(::core::option::Option::Some(#axis))
        }
        None => quote!(::core::option::Option::None),
    });
    let tensor = quote!(#krate::__private::tch::Tensor);
    quote! {
        fn concat(
            parts: ::std::vec::Vec<Self>,
        ) -> #krate::Result<::core::option::Option<Self>> {
            let mut columns: [::std::vec::Vec<#tensor>; #count] =
                ::core::array::from_fn(|_| ::std::vec::Vec::with_capacity(parts.len()));
            for part in parts {
                #(columns[#indices].push(part.#members);)*
            }
            let [#(#members),*] = columns;
            #(
                let ::core::option::Option::Some(#members) =
                    #krate::__private::concat_tensors(#members, #pads)?
                else {
                    return ::core::result::Result::Ok(::core::option::Option::None);
                };
            )*
            ::core::result::Result::Ok(::core::option::Option::Some(Self { #(#members),* }))
        }
    }
}
