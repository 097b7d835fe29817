//! A new collection's spec: CreateCollection's request with every default resolved (from
//! the collection's model where it has one) and checked, naming the field.

use super::{Registry, new_uid};
use crate::error::{Error, Result};
use crate::types::{CollectionSpec, IndexParams, Metric, ModelDefaults, Precision};

/// What CreateCollection asks for; zeros and `None` mean defaults.
#[derive(Debug, Clone, Default)]
pub struct CreateCollection {
    pub name: String,
    pub dimension: u32,
    pub metric: Option<Metric>,
    pub index: IndexParams,
    pub precision: Option<Precision>,
    pub model: String,
    pub keep_inputs: Option<bool>,
    /// A pair model's name (checked by the caller, who knows the models); empty for none.
    pub pair_model: String,
    /// What the named model implies (resolved by the caller, who knows the models).
    pub model_defaults: Option<ModelDefaults>,
}

impl Registry {
    /// A new collection's spec: the request with every default filled in, checked.
    pub(super) fn resolve_spec(&self, mut req: CreateCollection) -> Result<CollectionSpec> {
        if let Some(d) = req.model_defaults.filter(|_| !req.model.is_empty()) {
            if req.dimension == 0 {
                req.dimension = d.dimension;
            } else if req.dimension != d.dimension {
                return Err(Error::invalid(
                    "dimension",
                    format!(
                        "{} differs from model {:?}'s {}",
                        req.dimension, req.model, d.dimension
                    ),
                ));
            }
        }
        let max_dimension = self.settings.limits.max_dimension;
        if req.dimension == 0 || req.dimension > max_dimension {
            return Err(Error::invalid(
                "dimension",
                format!("{} is out of range 1..={max_dimension}", req.dimension),
            ));
        }
        let d = IndexParams::default();
        let pick = |v: u32, default: u32| if v == 0 { default } else { v };
        let index = IndexParams {
            connectivity: pick(req.index.connectivity, d.connectivity),
            expansion_add: pick(req.index.expansion_add, d.expansion_add),
            expansion_search: pick(req.index.expansion_search, d.expansion_search),
        };
        if !(2..=256).contains(&index.connectivity) {
            return Err(Error::invalid(
                "index.connectivity",
                format!("{} is out of range 2..=256", index.connectivity),
            ));
        }
        for (field, v) in [
            ("index.expansion_add", index.expansion_add),
            ("index.expansion_search", index.expansion_search),
        ] {
            if v > 4096 {
                return Err(Error::invalid(
                    field,
                    format!("{v} is out of range 1..=4096"),
                ));
            }
        }
        let defaults = match (req.model.is_empty(), req.model_defaults) {
            (true, _) => None,
            (false, Some(d)) => Some(d),
            (false, None) => return Err(Error::not_found(format!("model {:?}", req.model))),
        };
        if !req.pair_model.is_empty() && req.keep_inputs == Some(false) {
            return Err(Error::invalid(
                "keep_inputs",
                format!(
                    "pair model {:?} scores the items' stored inputs: the collection must keep them",
                    req.pair_model
                ),
            ));
        }
        Ok(CollectionSpec {
            name: req.name,
            dimension: req.dimension,
            metric: req
                .metric
                .or(defaults.map(|d| d.metric))
                .unwrap_or(Metric::Cosine),
            index,
            precision: req.precision.unwrap_or(Precision::F32),
            keep_inputs: req
                .keep_inputs
                .unwrap_or(defaults.is_some() || !req.pair_model.is_empty()),
            dbl_margin: defaults.and_then(|d| d.dbl_margin),
            dbl_scale: defaults.and_then(|d| d.dbl_scale),
            threshold: defaults.and_then(|d| d.threshold),
            pair_model: req.pair_model,
            pair_threshold: None,
            model: req.model,
            uid: new_uid(),
            model_version: String::new(),
            tree: String::new(),
        })
    }
}
