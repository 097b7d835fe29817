//! Input checks. Every failure names the field (`items[3].vector`) and the item.

use std::collections::HashMap;

use crate::error::{Error, Field, Result};
use crate::types::{CollectionSpec, Filter, ItemData, Limits, Metric, SearchParams};

/// Collection names: [A-Za-z0-9_.-]{1,64}.
pub fn collection_name(field: &'static str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if name.len() > 64 {
        return Err(Error::invalid(
            field,
            format!("{} bytes, at most 64 allowed", name.len()),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(Error::invalid(
            field,
            format!("{name:?} contains {c:?}; allowed: A-Z a-z 0-9 _ . -"),
        ));
    }
    Ok(())
}

pub fn id(field: &Field, id: &str, limits: &Limits) -> Result<()> {
    if id.is_empty() {
        return Err(Error::invalid(field.clone(), "must not be empty"));
    }
    if id.len() > limits.max_id_bytes {
        return Err(Error::invalid(
            field.clone(),
            format!(
                "id of {} bytes, at most {} allowed",
                id.len(),
                limits.max_id_bytes
            ),
        ));
    }
    Ok(())
}

/// A query or item vector against the collection's dimension and metric.
pub fn vector(field: &Field, who: &str, v: &[f32], spec: &CollectionSpec) -> Result<()> {
    if v.is_empty() {
        return Err(Error::invalid(field.clone(), format!("{who}has no values")));
    }
    if v.len() != spec.dimension as usize {
        return Err(Error::invalid(
            field.clone(),
            format!(
                "{who}has {} values, collection {:?} has dimension {}",
                v.len(),
                spec.name,
                spec.dimension
            ),
        ));
    }
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::invalid(
            field.clone().at(i),
            format!("{who}{} is not a finite number", v[i]),
        ));
    }
    if spec.metric == Metric::Cosine && v.iter().all(|x| *x == 0.0) {
        return Err(Error::invalid(
            field.clone(),
            format!("{who}is all zeros, which has no direction under COSINE"),
        ));
    }
    Ok(())
}

/// A whole upsert batch: nothing is written unless every item passes.
pub fn items(items: &[ItemData], spec: &CollectionSpec, limits: &Limits) -> Result<()> {
    items_but(items, spec, limits, |_| false)
}

/// [`items`], but for the items `embed_later` picks the vector is not checked: they
/// carry an input whose embedding is still to come. Run before embedding, so that an
/// invalid batch is refused before it pays for inference.
pub fn items_but(
    items: &[ItemData],
    spec: &CollectionSpec,
    limits: &Limits,
    embed_later: impl Fn(usize) -> bool,
) -> Result<()> {
    if items.len() > limits.max_batch {
        return Err(Error::invalid(
            "items",
            format!(
                "{} items, at most {} per request",
                items.len(),
                limits.max_batch
            ),
        ));
    }
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = Field::name("items").at(i);
        id(&at.clone().field("id"), &item.id, limits)?;
        let who = format!("item {:?} ", item.id);
        if let Some(first) = seen.insert(&item.id, i) {
            return Err(Error::invalid(
                at.field("id"),
                format!("{who}appears twice in one request (also items[{first}])"),
            ));
        }
        if item.label.len() > limits.max_label_bytes {
            return Err(Error::invalid(
                at.field("label"),
                format!(
                    "{who}label of {} bytes, at most {} allowed",
                    item.label.len(),
                    limits.max_label_bytes
                ),
            ));
        }
        metadata(&at.clone().field("metadata"), &who, item, limits)?;
        if !embed_later(i) {
            vector(&at.field("vector"), &who, &item.vector, spec)?;
        }
    }
    Ok(())
}

fn metadata(field: &Field, who: &str, item: &ItemData, limits: &Limits) -> Result<()> {
    if item.metadata.len() > limits.max_metadata_entries {
        return Err(Error::invalid(
            field.clone(),
            format!(
                "{who}has {} entries, at most {} allowed",
                item.metadata.len(),
                limits.max_metadata_entries
            ),
        ));
    }
    let bytes: usize = item.metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > limits.max_metadata_bytes {
        return Err(Error::invalid(
            field.clone(),
            format!(
                "{who}has {bytes} bytes, at most {} allowed",
                limits.max_metadata_bytes
            ),
        ));
    }
    if item.metadata.keys().any(|k| k.is_empty()) {
        return Err(Error::invalid(
            field.clone(),
            format!("{who}has an empty key"),
        ));
    }
    Ok(())
}

/// Ids of a Get or Delete.
pub fn ids(ids: &[String], limits: &Limits) -> Result<()> {
    if ids.is_empty() {
        return Err(Error::invalid("ids", "must not be empty"));
    }
    if ids.len() > limits.max_batch {
        return Err(Error::invalid(
            "ids",
            format!(
                "{} ids, at most {} per request",
                ids.len(),
                limits.max_batch
            ),
        ));
    }
    for (i, v) in ids.iter().enumerate() {
        id(&Field::name("ids").at(i), v, limits)?;
    }
    Ok(())
}

pub fn search_params(p: &SearchParams, limits: &Limits) -> Result<()> {
    if p.k == 0 {
        return Err(Error::invalid("k", "must be at least 1"));
    }
    if p.k > limits.max_k {
        return Err(Error::invalid(
            "k",
            format!("{} exceeds the limit of {}", p.k, limits.max_k),
        ));
    }
    if p.expansion > limits.max_k.max(4096) {
        return Err(Error::invalid(
            "expansion",
            format!(
                "{} exceeds the limit of {}",
                p.expansion,
                limits.max_k.max(4096)
            ),
        ));
    }
    if p.rerank > MAX_RERANK {
        return Err(Error::invalid(
            "rerank",
            format!("{} exceeds the limit of {MAX_RERANK}", p.rerank),
        ));
    }
    filter(&p.filter)
}

/// The most hits one query may re-rank with a pair model (one inference per hit).
pub const MAX_RERANK: usize = 1000;

fn filter(f: &Filter) -> Result<()> {
    if f.metadata.keys().any(|k| k.is_empty()) {
        return Err(Error::invalid("filter.metadata", "has an empty key"));
    }
    Ok(())
}
