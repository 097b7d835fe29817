//! Domain types shared by the store, the index and the API layer, free of gRPC.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How distances are measured; every distance is "smaller is closer".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// 1 - cos(a, b)
    Cosine,
    /// |a - b|
    L2,
    /// 1 - a.b
    InnerProduct,
}

impl Metric {
    /// A similarity in which larger is closer: 1 - D for COSINE and INNER_PRODUCT (the
    /// cosine or the dot product), 1 / (1 + D) for L2.
    pub fn similarity(self, distance: f32) -> f32 {
        match self {
            Metric::Cosine | Metric::InnerProduct => 1.0 - distance,
            Metric::L2 => 1.0 / (1.0 + distance),
        }
    }

    /// The distance between two vectors of equal length, computed exactly in f64.
    pub fn distance(self, a: &[f32], b: &[f32]) -> f32 {
        match self {
            Metric::Cosine => {
                let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
                for (x, y) in a.iter().zip(b) {
                    let (x, y) = (f64::from(*x), f64::from(*y));
                    dot += x * y;
                    na += x * x;
                    nb += y * y;
                }
                if na == 0.0 || nb == 0.0 {
                    return 1.0;
                }
                (1.0 - dot / (na.sqrt() * nb.sqrt())) as f32
            }
            Metric::L2 => a
                .iter()
                .zip(b)
                .map(|(x, y)| {
                    let d = f64::from(*x) - f64::from(*y);
                    d * d
                })
                .sum::<f64>()
                .sqrt() as f32,
            Metric::InnerProduct => {
                (1.0 - a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| f64::from(*x) * f64::from(*y))
                    .sum::<f64>()) as f32
            }
        }
    }
}

/// How the ANN index stores vectors (the store always keeps exact f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    F32,
    F16,
    I8,
}

/// HNSW parameters, resolved (never 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexParams {
    pub connectivity: u32,
    pub expansion_add: u32,
    pub expansion_search: u32,
}

/// Read off the recall/QPS curves (README, "Index defaults"; docs/benchmarks.md): ef_add
/// 100 builds a graph as good as 128's and inserts faster; M 32 would be faster at equal
/// recall on hard data but costs 128 bytes more per vector and inserts about a quarter
/// slower; search ef 64 sits at the knee of every measured curve.
impl Default for IndexParams {
    fn default() -> Self {
        IndexParams {
            connectivity: 16,
            expansion_add: 100,
            expansion_search: 64,
        }
    }
}

/// Everything that defines a collection; persisted as JSON in the `collections` tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectionSpec {
    pub name: String,
    pub dimension: u32,
    pub metric: Metric,
    pub index: IndexParams,
    pub precision: Precision,
    pub model: String,
    /// Keep raw inputs beside the vectors, so a later model can re-embed them.
    #[serde(default)]
    pub keep_inputs: bool,
    /// Distance-based logistic margin m for Verify (model manifest or Calibrate).
    #[serde(default)]
    pub dbl_margin: Option<f32>,
    /// The scale s of the distance in that logistic (1 when unset).
    #[serde(default)]
    pub dbl_scale: Option<f32>,
    /// Verification threshold on the distance (model manifest or Calibrate).
    #[serde(default)]
    pub threshold: Option<f32>,
    /// A pair model that decides Verify and re-ranks searches; empty for none.
    #[serde(default)]
    pub pair_model: String,
    /// The pair model's "same" threshold for this collection (Calibrate); None: the
    /// model's own.
    #[serde(default)]
    pub pair_threshold: Option<f32>,
    /// Distinguishes this collection from an earlier one of the same name, so that a
    /// stray snapshot of a deleted collection is never loaded into a new one.
    pub uid: u64,
    /// The published version of `model` the vectors come from; empty: the model as the
    /// daemon loaded it from its config.
    #[serde(default)]
    pub model_version: String,
    /// The store tree holding the items; empty: `c/<name>`. A generation made by
    /// Activate lives in a tree of its own until it replaces the collection.
    #[serde(default)]
    pub tree: String,
}

impl CollectionSpec {
    /// A plain spec for unit tests: model "m" as loaded from the config, 4 dimensions.
    #[cfg(test)]
    pub(crate) fn for_test(name: &str, metric: Metric) -> CollectionSpec {
        CollectionSpec {
            name: name.into(),
            dimension: 4,
            metric,
            index: IndexParams::default(),
            precision: Precision::F32,
            model: "m".into(),
            keep_inputs: false,
            dbl_margin: None,
            dbl_scale: None,
            pair_model: String::new(),
            pair_threshold: None,
            threshold: None,
            uid: 1,
            model_version: String::new(),
            tree: String::new(),
        }
    }

    /// The name the embedder serves this collection's model under: `model`, or
    /// `model@version` for a published version.
    pub fn model_key(&self) -> String {
        if self.model_version.is_empty() {
            self.model.clone()
        } else {
            format!("{}@{}", self.model, self.model_version)
        }
    }

    /// The store tree holding the items.
    pub fn tree_name(&self) -> String {
        if self.tree.is_empty() {
            format!("c/{}", self.name)
        } else {
            self.tree.clone()
        }
    }
}

/// One stored item.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ItemData {
    pub id: String,
    pub label: String,
    pub metadata: BTreeMap<String, String>,
    pub vector: Vec<f32>,
    /// The raw input the vector was embedded from, encoded (kept when the collection
    /// keeps inputs).
    pub input: Option<Vec<u8>>,
    /// Set by the writer: a trainer's step or model version (0 by default). Mining can
    /// leave out vectors older than a bound.
    pub generation: u64,
}

/// What a search is near to.
#[derive(Debug, Clone, PartialEq)]
pub enum QueryTarget {
    Vector(Vec<f32>),
    /// A stored item's vector; the item itself is excluded from the hits.
    Id(String),
}

/// Which items a search may return.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Filter {
    pub labels: Vec<String>,
    pub exclude_labels: Vec<String>,
    pub metadata: BTreeMap<String, String>,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.exclude_labels.is_empty() && self.metadata.is_empty()
    }

    pub fn matches(&self, label: &str, metadata: &BTreeMap<String, String>) -> bool {
        (self.labels.is_empty() || self.labels.iter().any(|l| l == label))
            && !self.exclude_labels.iter().any(|l| l == label)
            && self
                .metadata
                .iter()
                .all(|(k, v)| metadata.get(k).is_some_and(|m| m == v))
    }
}

/// The knobs of one search.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SearchParams {
    pub k: usize,
    pub filter: Filter,
    pub exact: bool,
    /// HNSW ef of this search, above or below the collection's default (0 = its
    /// expansion_search; never fewer than k): see src/index/mod.rs.
    pub expansion: usize,
    pub with_vectors: bool,
    pub with_metadata: bool,
    /// Hits to re-rank with the collection's pair model (0 = off). The gRPC layer,
    /// which holds the models, does the re-ranking; the Db searches max(k, rerank).
    pub rerank: usize,
}

/// One search result.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub id: String,
    pub label: String,
    pub distance: f32,
    pub metadata: BTreeMap<String, String>,
    pub vector: Vec<f32>,
    /// The pair model's score against the query, when re-ranked.
    pub pair_score: Option<f32>,
}

/// Limits on what a request may carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub max_k: usize,
    pub max_id_bytes: usize,
    pub max_label_bytes: usize,
    pub max_metadata_entries: usize,
    pub max_metadata_bytes: usize,
    pub max_dimension: u32,
    pub max_batch: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_k: 10_000,
            max_id_bytes: 256,
            max_label_bytes: 256,
            max_metadata_entries: 64,
            max_metadata_bytes: 4096,
            max_dimension: 65_536,
            max_batch: 100_000,
        }
    }
}

/// An embedder's embedding space, as a collection that uses it sees it: what
/// CreateCollection takes from the model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelDefaults {
    pub dimension: u32,
    pub metric: Metric,
    pub dbl_margin: Option<f32>,
    pub dbl_scale: Option<f32>,
    pub threshold: Option<f32>,
}

/// One input to embed.
#[derive(Debug, Clone, PartialEq)]
pub enum InputData {
    /// Encoded image bytes.
    Image(Vec<u8>),
    /// A raw tensor (without the batch axis).
    Tensor { shape: Vec<u32>, values: Vec<f32> },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    pub data: InputData,
    /// Tower name; empty = the model's first tower.
    pub tower: String,
}

/// A query as a client sends it: a vector, a stored item, or an input for the
/// collection's model to embed.
#[derive(Debug, Clone, PartialEq)]
pub enum Query {
    Vector(Vec<f32>),
    Id(String),
    Input(Input),
}

/// An item as a client sends it: with a vector, or with an input to embed (or both, the
/// input then only kept).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NewItem {
    pub item: ItemData,
    pub input: Option<Input>,
}

// What judging a collection decides with and fits: stored in the collection's spec, so
// they live here, below the collections and the judge.

/// What Verify decides with: the distance-based logistic's margin and scale, the
/// threshold on the distance, and the pair model's threshold for this collection.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Decision {
    pub margin: Option<f32>,
    pub scale: Option<f32>,
    pub threshold: Option<f32>,
    /// Calibrate's threshold for the collection's pair model, over the manifest's.
    pub pair_threshold: Option<f32>,
}

impl Decision {
    pub fn of(spec: &CollectionSpec) -> Decision {
        Decision {
            margin: spec.dbl_margin,
            scale: spec.dbl_scale,
            threshold: spec.threshold,
            pair_threshold: spec.pair_threshold,
        }
    }

    pub fn apply(self, spec: &mut CollectionSpec) {
        spec.dbl_margin = self.margin;
        spec.dbl_scale = self.scale;
        spec.threshold = self.threshold;
        spec.pair_threshold = self.pair_threshold;
    }
}

/// What Calibrate fitted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    pub dbl_margin: f32,
    pub dbl_scale: f32,
    pub threshold: f32,
    pub accuracy: f32,
    pub roc_auc: f32,
    pub pairs: u32,
    /// The pair model's fitted threshold, its accuracy and ROC AUC, when there is one.
    pub pair: Option<(f32, f32, f32)>,
}

/// Items grouped by label: (id, vector) each. Calibrate's sample space.
pub type LabelGroups = BTreeMap<String, Vec<(String, Vec<f32>)>>;
