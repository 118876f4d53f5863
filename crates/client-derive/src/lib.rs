//! `#[derive(Event)]` for `skald-client`: implements `skald_client::aggregate::Event` for a
//! serde enum, from what the enum already says. Documented with the trait.
//!
//! It checks at compile time what would otherwise fail at run time: the enum must be
//! `#[serde(tag = "type", content = "data")]` (each variant's name is the stored type, its
//! fields the data), without `rename_all` (the stored types are the variants' names, or their
//! `#[serde(rename)]`).

use proc_macro::TokenStream;
use proc_macro2::Span;
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Error, Fields, LitStr, Meta, Token, parse_macro_input};

/// Implements `Event` for an enum: `TYPES` from its variants, `version` from
/// `#[event(version = N)]` on a variant (1 when absent), `tags` from fields marked `#[tag]`
/// (`field:value`) or `#[tag("name")]` (`name:value`), and `upcasters` from
/// `#[event(upcasters = path)]` on the enum, a function returning `Vec<Upcaster>`.
#[proc_macro_derive(Event, attributes(event, tag))]
pub fn derive_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

fn expand(input: &DeriveInput) -> syn::Result<proc_macro2::TokenStream> {
    let Data::Enum(data) = &input.data else {
        return Err(Error::new(
            Span::call_site(),
            "#[derive(Event)] is for enums: one variant per event type",
        ));
    };
    check_serde(input)?;
    let upcasters = enum_upcasters(input)?;
    let name = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();

    let mut types = Vec::new();
    let mut aliases = Vec::new();
    let mut versions = Vec::new();
    let mut tag_arms = Vec::new();
    for variant in &data.variants {
        let names = serde_names(variant)?;
        let stored = names.stored.unwrap_or_else(|| variant.ident.to_string());
        let version = variant_version(&variant.attrs)?;
        if version != 1 {
            versions.push(quote! { #stored => #version, });
            for alias in &names.aliases {
                versions.push(quote! { #alias => #version, });
            }
        }
        aliases.extend(names.aliases);
        let ident = &variant.ident;
        let mut bindings = Vec::new();
        let mut tags = Vec::new();
        for (index, field) in variant.fields.iter().enumerate() {
            let Some(tag_name) = field_tag(field)? else {
                continue;
            };
            let binding = format_ident!("__tag_{}", index);
            let tag_name = match (tag_name, &field.ident) {
                (Some(name), _) => name,
                (None, Some(ident)) => ident.to_string(),
                (None, None) => {
                    return Err(Error::new(
                        field.span(),
                        "a #[tag] on an unnamed field needs its name: #[tag(\"customer\")]",
                    ));
                }
            };
            match &field.ident {
                Some(ident) => bindings.push(quote! { #ident: #binding }),
                None => {
                    let index = syn::Index::from(index);
                    bindings.push(quote! { #index: #binding });
                }
            }
            // Spanned at the field, so that a field that cannot be a tag is shown there.
            tags.push(
                quote_spanned! { field.span()=> ::skald_client::aggregate::tag(#tag_name, #binding)? },
            );
        }
        let pattern = match &variant.fields {
            Fields::Unit => quote! { Self::#ident },
            _ => quote! { Self::#ident { #(#bindings,)* .. } },
        };
        tag_arms.push(quote! { #pattern => ::std::vec![#(#tags),*], });
        types.push(stored);
    }
    // What one query item may list (skald_core::MAX_ITEM_TYPES): a query of these events
    // lists every name they are stored under.
    if types.len() + aliases.len() > 64 {
        return Err(Error::new(
            input.ident.span(),
            format!(
                "{} event types and aliases: a query lists at most 64; split the enum (a \
                 decision or projection can use an enum of just the events it needs)",
                types.len() + aliases.len()
            ),
        ));
    }
    let upcasters = match upcasters {
        Some(path) => quote! {
            fn upcasters() -> ::std::vec::Vec<::skald_client::aggregate::Upcaster> {
                #path()
            }
        },
        None => quote! {},
    };
    Ok(quote! {
        impl #impl_generics ::skald_client::aggregate::Event for #name #ty_generics #where_clause {
            const TYPES: &'static [&'static str] = &[#(#types),*];
            const ALIASES: &'static [&'static str] = &[#(#aliases),*];

            fn version(event_type: &str) -> u32 {
                match event_type {
                    #(#versions)*
                    _ => 1,
                }
            }

            #[allow(unreachable_patterns)]
            fn tags(
                &self,
            ) -> ::std::result::Result<
                ::std::vec::Vec<::skald_client::skald_core::Tag>,
                ::skald_client::aggregate::CodecError,
            > {
                ::std::result::Result::Ok(match self {
                    #(#tag_arms)*
                })
            }

            #upcasters
        }
    })
}

/// The enum must be stored as `{"type": .., "data": ..}`.
fn check_serde(input: &DeriveInput) -> syn::Result<()> {
    let mut tag = None;
    let mut content = None;
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("serde")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("tag") {
                tag = Some(meta.value()?.parse::<LitStr>()?.value());
            } else if meta.path.is_ident("content") {
                content = Some(meta.value()?.parse::<LitStr>()?.value());
            } else if meta.path.is_ident("rename_all") || meta.path.is_ident("untagged") {
                return Err(meta.error(
                    "#[derive(Event)] stores each variant under its own name: drop this, and \
                     give a variant another name with #[serde(rename = \"..\")]",
                ));
            } else {
                skip_value(&meta)?;
            }
            Ok(())
        })?;
    }
    if tag.as_deref() != Some("type") || content.as_deref() != Some("data") {
        return Err(Error::new(
            input.ident.span(),
            "#[derive(Event)] needs #[serde(tag = \"type\", content = \"data\")] on the enum: \
             each variant's name is the stored event type and its fields the data",
        ));
    }
    Ok(())
}

/// The names a variant's serde attributes give it.
struct Names {
    /// The name it is written under, when not its own.
    stored: Option<String>,
    /// Other names it reads.
    aliases: Vec<String>,
}

/// Reads `rename = ".."` and `alias = ".."` on a variant, and refuses what would store it
/// other than as `{"type": name, "data": ..}` or read it under another name than it is
/// written (`rename(serialize = .., deserialize = ..)`).
fn serde_names(variant: &syn::Variant) -> syn::Result<Names> {
    let mut names = Names {
        stored: None,
        aliases: Vec::new(),
    };
    for attr in variant.attrs.iter().filter(|a| a.path().is_ident("serde")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("rename") {
                if meta.input.peek(Token![=]) {
                    names.stored = Some(meta.value()?.parse::<LitStr>()?.value());
                } else {
                    // Written under one name and read under another, it could not read what
                    // it wrote.
                    return Err(meta.error(
                        "#[derive(Event)]: a variant is read under the name it is written \
                         under; write #[serde(rename = \"New\", alias = \"Old\")] to read an \
                         old name too",
                    ));
                }
            } else if meta.path.is_ident("alias") {
                names.aliases.push(meta.value()?.parse::<LitStr>()?.value());
            } else if [
                "untagged",
                "skip",
                "skip_serializing",
                "skip_deserializing",
                "other",
            ]
            .iter()
            .any(|k| meta.path.is_ident(k))
            {
                return Err(meta.error(
                    "#[derive(Event)]: every variant must be written and read as \
                     {\"type\": its name, \"data\": ..}",
                ));
            } else {
                skip_value(&meta)?;
            }
            Ok(())
        })?;
    }
    // A deserialize name that is the stored one is no alias.
    let stored = names
        .stored
        .clone()
        .unwrap_or_else(|| variant.ident.to_string());
    names.aliases.retain(|a| *a != stored);
    Ok(names)
}

/// Passes over a serde attribute this derive does not read: `key = value`, `key(..)`, or a
/// bare `key`.
fn skip_value(meta: &syn::meta::ParseNestedMeta<'_>) -> syn::Result<()> {
    if meta.input.peek(Token![=]) {
        let _: syn::Expr = meta.value()?.parse()?;
    } else if meta.input.peek(syn::token::Paren) {
        let content;
        syn::parenthesized!(content in meta.input);
        let _: proc_macro2::TokenStream = content.parse()?;
    }
    Ok(())
}

/// `#[event(version = N)]` on a variant; 1 without it.
fn variant_version(attrs: &[syn::Attribute]) -> syn::Result<u32> {
    let mut version = 1;
    for attr in attrs.iter().filter(|a| a.path().is_ident("event")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("version") {
                let lit: syn::LitInt = meta.value()?.parse()?;
                version = lit.base10_parse::<u32>()?;
                if version == 0 {
                    return Err(Error::new(lit.span(), "versions start at 1"));
                }
                Ok(())
            } else {
                Err(meta.error("on a variant, #[event] takes version = N"))
            }
        })?;
    }
    Ok(version)
}

/// `#[event(upcasters = path)]` on the enum.
fn enum_upcasters(input: &DeriveInput) -> syn::Result<Option<syn::Path>> {
    let mut path = None;
    for attr in input.attrs.iter().filter(|a| a.path().is_ident("event")) {
        attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("upcasters") {
                path = Some(meta.value()?.parse::<syn::Path>()?);
                Ok(())
            } else {
                Err(meta.error("on the enum, #[event] takes upcasters = a_function"))
            }
        })?;
    }
    Ok(path)
}

/// `Some(None)` for `#[tag]`, `Some(Some(name))` for `#[tag("name")]`, `None` without.
fn field_tag(field: &syn::Field) -> syn::Result<Option<Option<String>>> {
    let mut found = None;
    for attr in field.attrs.iter().filter(|a| a.path().is_ident("tag")) {
        found = Some(match &attr.meta {
            Meta::Path(_) => None,
            Meta::List(list) => Some(list.parse_args::<LitStr>()?.value()),
            Meta::NameValue(nv) => {
                return Err(Error::new(
                    nv.span(),
                    "write #[tag] or #[tag(\"name\")], not #[tag = ..]",
                ));
            }
        });
    }
    Ok(found)
}
