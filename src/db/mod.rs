//! The collections registry: joins the durable store (sled) and the ANN index
//! (usearch) into collections that can be written, read and searched.
//!
//! The store is the truth. Every write goes to sled first as one atomic batch, then into
//! the index, then into the in-memory catalogue that search filters read; it is
//! acknowledged only after a group commit has flushed it. After a crash the index is
//! rebuilt from the store, so the two always agree.
//!
//! Every method here blocks (disk, HNSW); the gRPC layer calls them from blocking threads.

pub mod validate;

use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::index::AnnIndex;
use crate::store::{ItemsTree, Mutation, Store, TreeState};
use crate::types::{
    CollectionSpec, Hit, IndexParams, ItemData, Limits, Metric, Precision, QueryTarget,
    SearchParams,
};

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

/// A model's embedding space, as a collection that uses it sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelDefaults {
    pub dimension: u32,
    pub metric: Metric,
    pub dbl_margin: Option<f32>,
    pub dbl_scale: Option<f32>,
    pub threshold: Option<f32>,
}

/// Distance-weighted kNN vote.
#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    pub label: String,
    pub confidence: f32,
    /// (label, weight, count), by weight descending.
    pub votes: Vec<(String, f32, u32)>,
}

/// Is this pair the same?
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verification {
    pub distance: f32,
    pub similarity: f32,
    pub probability: f32,
    pub same: bool,
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
}

/// A labelled pair Calibrate sampled: two item ids, and whether their labels agree.
pub type SampledPair = (String, String, bool);

/// A collection's spec and live item count.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectionInfo {
    pub spec: CollectionSpec,
    pub count: u64,
}

/// How recovery went, per collection.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovered {
    pub name: String,
    pub items: usize,
    pub from_snapshot: bool,
    pub took: Duration,
}

/// The previous state of ids an UpsertStream touched, so a failed stream can be undone.
#[derive(Default)]
pub struct Undo {
    before: HashMap<String, Option<ItemData>>,
}

pub struct Db {
    store: Store,
    snapshots: PathBuf,
    limits: Limits,
    index_threads: usize,
    collections: RwLock<BTreeMap<String, Arc<Collection>>>,
    ready: AtomicBool,
}

pub struct Collection {
    spec: CollectionSpec,
    items: ItemsTree,
    index: AnnIndex,
    live: RwLock<Live>,
    writer: Mutex<Writer>,
    turns: Turns,
    /// The spec's logistic and threshold, until Calibrate replaces them.
    calibration: RwLock<Dbl>,
}

/// What Verify decides with: the distance-based logistic's margin and scale, and the
/// threshold on the distance.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Dbl {
    margin: Option<f32>,
    scale: Option<f32>,
    threshold: Option<f32>,
    /// The pair model's threshold for this collection (Calibrate), over the manifest's.
    pair_threshold: Option<f32>,
}

impl Dbl {
    fn of(spec: &CollectionSpec) -> Dbl {
        Dbl {
            margin: spec.dbl_margin,
            scale: spec.dbl_scale,
            threshold: spec.threshold,
            pair_threshold: spec.pair_threshold,
        }
    }

    fn apply(self, spec: &mut CollectionSpec) {
        spec.dbl_margin = self.margin;
        spec.dbl_scale = self.scale;
        spec.threshold = self.threshold;
        spec.pair_threshold = self.pair_threshold;
    }
}

/// The in-memory catalogue: which ANN key each id has now, and what search filters and
/// hits need to know about each key without touching the store.
#[derive(Default)]
struct Live {
    by_id: HashMap<Arc<str>, u64>,
    by_key: HashMap<u64, Arc<Entry>, BuildKeyHasher>,
}

/// ANN keys are dense counters that callers cannot choose, so SipHash's defence against
/// hash flooding buys nothing here; a multiplicative hash makes the filter callback,
/// which runs for every candidate HNSW visits, several times cheaper.
#[derive(Default, Clone, Copy)]
struct BuildKeyHasher;

#[derive(Default)]
struct KeyHasher(u64);

impl std::hash::BuildHasher for BuildKeyHasher {
    type Hasher = KeyHasher;
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(0)
    }
}

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, k: u64) {
        self.0 = (self.0 ^ k).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

struct Entry {
    id: Arc<str>,
    label: String,
    metadata: BTreeMap<String, String>,
}

/// Held by whoever mutates a collection: writers to one collection go one at a time
/// (each batch is inserted into the index on several threads), flushes are shared.
struct Writer {
    state: TreeState,
    dropped: bool,
    /// The next publication ticket (see [`Collection::apply_upsert`]).
    next_ticket: u64,
}

impl Writer {
    fn new(state: TreeState) -> Self {
        Writer {
            state,
            dropped: false,
            next_ticket: 0,
        }
    }

    fn take_ticket(&mut self) -> u64 {
        let t = self.next_ticket;
        self.next_ticket += 1;
        t
    }
}

/// Publication order: batch n publishes to the catalogue after batch n - 1.
#[derive(Default)]
struct Turns {
    next: Mutex<u64>,
    cv: std::sync::Condvar,
}

impl Turns {
    /// Blocks until every ticket below `until` has published.
    fn wait_all(&self, until: u64) {
        let mut next = self.next.lock().expect("turn lock");
        while *next < until {
            next = self.cv.wait(next).expect("turn lock");
        }
    }
}

/// One batch's place in the publication order; passes the turn on when dropped, on the
/// error path too, so a failed batch never blocks the ones after it.
struct Turn<'a> {
    turns: &'a Turns,
    ticket: u64,
}

impl<'a> Turn<'a> {
    fn new(turns: &'a Turns, ticket: u64) -> Self {
        Turn { turns, ticket }
    }

    fn wait(&self) {
        self.turns.wait_all(self.ticket);
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.wait();
        let mut next = self.turns.next.lock().expect("turn lock");
        *next = self.ticket + 1;
        self.turns.cv.notify_all();
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct SnapshotMeta {
    uid: u64,
    seq: u64,
    count: usize,
}

impl Db {
    /// Opens the store. Collections are not usable until [`Db::recover`] has run.
    pub fn open(config: &Config) -> Result<Self> {
        std::fs::create_dir_all(&config.data_dir)?;
        let snapshots = config.data_dir.join("index");
        std::fs::create_dir_all(&snapshots)?;
        let store = Store::open(&config.data_dir, config.cache_mb << 20)?;
        Ok(Db {
            store,
            snapshots,
            limits: config.limits.clone(),
            index_threads: config.index_threads(),
            collections: RwLock::new(BTreeMap::new()),
            ready: AtomicBool::new(false),
        })
    }

    /// Loads every collection: its index from a snapshot when the snapshot matches the
    /// store, else rebuilt from the store. Then the Db serves.
    pub fn recover(&self) -> Result<Vec<Recovered>> {
        let specs = self.store.specs()?;
        let orphans = self.store.drop_orphans(&specs)?;
        if orphans > 0 {
            tracing::warn!(orphans, "dropped item trees of deleted collections");
        }
        let mut report = Vec::new();
        for spec in specs {
            let start = Instant::now();
            let (coll, from_snapshot) = Collection::open(
                spec.clone(),
                self.store.items(&spec.name)?,
                &self.snapshots,
                self.index_threads,
            )?;
            report.push(Recovered {
                name: spec.name.clone(),
                items: coll.len(),
                from_snapshot,
                took: start.elapsed(),
            });
            self.collections
                .write()
                .expect("registry lock")
                .insert(spec.name.clone(), Arc::new(coll));
        }
        self.ready.store(true, Ordering::Release);
        Ok(report)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Flushes performed by group commit so far.
    pub fn flushes(&self) -> u64 {
        self.store.flushes()
    }

    fn check_ready(&self) -> Result<()> {
        if self.is_ready() {
            Ok(())
        } else {
            Err(Error::Unavailable("recovery is still running".into()))
        }
    }

    pub fn collection(&self, name: &str) -> Result<Arc<Collection>> {
        self.check_ready()?;
        self.collections
            .read()
            .expect("registry lock")
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("collection {name:?}")))
    }

    pub fn create_collection(&self, req: CreateCollection) -> Result<CollectionInfo> {
        self.check_ready()?;
        validate::collection_name("name", &req.name)?;
        let mut req = req;
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
        if req.dimension == 0 || req.dimension > self.limits.max_dimension {
            return Err(Error::invalid(
                "dimension",
                format!(
                    "{} is out of range 1..={}",
                    req.dimension, self.limits.max_dimension
                ),
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
        let defaults = match (&req.model.is_empty(), req.model_defaults) {
            (true, _) => None,
            (false, Some(d)) => Some(d),
            (false, None) => return Err(Error::NotFound(format!("model {:?}", req.model))),
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
        let mut registry = self.collections.write().expect("registry lock");
        if registry.contains_key(&req.name) {
            return Err(Error::AlreadyExists(format!("collection {:?}", req.name)));
        }
        let spec = CollectionSpec {
            name: req.name.clone(),
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
        };
        let items = self.store.items(&spec.name)?;
        let coll = Collection::create(spec.clone(), items)?;
        self.store.put_spec(&spec)?;
        registry.insert(spec.name.clone(), Arc::new(coll));
        tracing::info!(collection = %spec.name, dimension = spec.dimension, metric = ?spec.metric, "created collection");
        Ok(CollectionInfo { spec, count: 0 })
    }

    pub fn list_collections(&self) -> Result<Vec<CollectionInfo>> {
        self.check_ready()?;
        Ok(self
            .collections
            .read()
            .expect("registry lock")
            .values()
            .map(|c| c.info())
            .collect())
    }

    /// Deletes a collection; returns how many items it held.
    pub fn delete_collection(&self, name: &str) -> Result<u64> {
        self.check_ready()?;
        validate::collection_name("name", name)?;
        let mut registry = self.collections.write().expect("registry lock");
        let Some(coll) = registry.get(name).cloned() else {
            return Err(Error::NotFound(format!("collection {name:?}")));
        };
        let mut w = coll.writer.lock().expect("writer lock");
        self.store.remove_collection(name)?;
        registry.remove(name);
        w.dropped = true;
        for path in snapshot_paths(&self.snapshots, name) {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        tracing::info!(collection = name, "deleted collection");
        Ok(coll.len() as u64)
    }

    /// Inserts or replaces items; durable on return.
    pub fn upsert(&self, collection: &str, items: Vec<ItemData>) -> Result<usize> {
        let coll = self.collection(collection)?;
        if items.is_empty() {
            return Err(Error::invalid("items", "must not be empty"));
        }
        validate::items(&items, &coll.spec, &self.limits)?;
        let n = coll.apply_upsert(&items, None, self.index_threads)?;
        self.store.commit()?;
        Ok(n)
    }

    /// One message of an UpsertStream: validated and applied, not yet durable; what it
    /// replaced is remembered in `undo`.
    pub fn upsert_staged(
        &self,
        collection: &str,
        items: Vec<ItemData>,
        undo: &mut Undo,
    ) -> Result<usize> {
        let coll = self.collection(collection)?;
        validate::items(&items, &coll.spec, &self.limits)?;
        coll.apply_upsert(&items, Some(undo), self.index_threads)
    }

    /// Makes everything applied so far durable (the end of an UpsertStream).
    pub fn commit(&self) -> Result<()> {
        self.store.commit()
    }

    /// Undoes the staged messages of a failed UpsertStream, durably.
    pub fn rollback(&self, undo: Undo) -> Result<()> {
        let mut by_coll: BTreeMap<String, Vec<(String, Option<ItemData>)>> = BTreeMap::new();
        for (key, before) in undo.before {
            let (coll, id) = key.split_once('\0').expect("undo key has a separator");
            by_coll
                .entry(coll.to_string())
                .or_default()
                .push((id.to_string(), before));
        }
        for (name, entries) in by_coll {
            let Ok(coll) = self.collection(&name) else {
                continue; // deleted meanwhile: nothing left to undo
            };
            let (restore, remove): (Vec<_>, Vec<_>) =
                entries.into_iter().partition(|(_, b)| b.is_some());
            let restore: Vec<ItemData> = restore.into_iter().filter_map(|(_, b)| b).collect();
            let remove: Vec<String> = remove.into_iter().map(|(id, _)| id).collect();
            for chunk in restore.chunks(self.limits.max_batch) {
                coll.apply_upsert(chunk, None, self.index_threads)?;
            }
            coll.apply_delete(&remove)?;
        }
        self.store.commit()
    }

    /// Deletes items by id; durable on return. Returns how many existed.
    pub fn delete_items(&self, collection: &str, ids: &[String]) -> Result<usize> {
        let coll = self.collection(collection)?;
        validate::ids(ids, &self.limits)?;
        let n = coll.apply_delete(ids)?;
        if n > 0 {
            self.store.commit()?;
        }
        Ok(n)
    }

    /// The items that exist among `ids`, in request order.
    pub fn get_items(
        &self,
        collection: &str,
        ids: &[String],
        with_vectors: bool,
        with_inputs: bool,
    ) -> Result<Vec<ItemData>> {
        let coll = self.collection(collection)?;
        validate::ids(ids, &self.limits)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some((_, mut item)) = coll.items.get(id, with_vectors)? {
                if with_inputs {
                    item.input = coll.items.input(id)?;
                }
                out.push(item);
            }
        }
        Ok(out)
    }

    /// Identification: a distance-weighted vote over the labels of the k nearest items.
    pub fn classify(
        &self,
        collection: &str,
        query: &QueryTarget,
        k: usize,
    ) -> Result<Classification> {
        let params = SearchParams {
            k,
            ..Default::default()
        };
        let hits = self.search(collection, query, &params)?;
        if hits.is_empty() {
            return Err(Error::invalid(
                "collection",
                format!("{collection:?} has no items to vote"),
            ));
        }
        let mut votes: BTreeMap<&str, (f32, u32)> = BTreeMap::new();
        for h in &hits {
            let v = votes.entry(h.label.as_str()).or_default();
            v.0 += 1.0 / (h.distance.max(0.0) + 1e-3);
            v.1 += 1;
        }
        let total: f32 = votes.values().map(|v| v.0).sum();
        let mut votes: Vec<(String, f32, u32)> = votes
            .into_iter()
            .map(|(l, (w, c))| (l.to_string(), w, c))
            .collect();
        votes.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Ok(Classification {
            label: votes[0].0.clone(),
            confidence: votes[0].1 / total,
            votes,
        })
    }

    /// Verification of a pair, with the collection's metric, margin and threshold.
    pub fn verify(
        &self,
        collection: &str,
        a: &QueryTarget,
        b: &QueryTarget,
    ) -> Result<Verification> {
        let coll = self.collection(collection)?;
        let va = coll.resolve("a", a)?.0;
        let vb = coll.resolve("b", b)?.0;
        let distance = coll.spec.metric.distance(&va, &vb);
        let cal = *coll.calibration.read().expect("calibration lock");
        let probability = dbl_probability(
            distance,
            cal.margin.unwrap_or(0.0),
            cal.scale.unwrap_or(1.0),
        );
        let same = match cal.threshold {
            Some(t) => distance < t,
            None => probability > 0.5,
        };
        Ok(Verification {
            distance,
            similarity: coll.spec.metric.similarity(distance),
            probability,
            same,
        })
    }

    /// Fits m, s and the threshold on `pairs` labelled pairs sampled from the collection
    /// (half same label, half not), and reports accuracy and ROC AUC; also returns the
    /// sampled pairs, for a pair model to score. Nothing is stored: see
    /// [`Db::store_calibration`].
    pub fn calibrate(
        &self,
        collection: &str,
        pairs: usize,
        seed: u64,
    ) -> Result<(Calibration, Vec<SampledPair>)> {
        let coll = self.collection(collection)?;
        let mut by_label: BTreeMap<String, Vec<(String, Vec<f32>)>> = BTreeMap::new();
        for rec in coll.items.scan(true) {
            let (_, item) = rec?;
            by_label
                .entry(item.label)
                .or_default()
                .push((item.id, item.vector));
        }
        let groups: Vec<&Vec<(String, Vec<f32>)>> = by_label.values().collect();
        let same_ok: Vec<usize> = (0..groups.len())
            .filter(|g| groups[*g].len() >= 2)
            .collect();
        if same_ok.is_empty() || groups.len() < 2 {
            return Err(Error::invalid(
                "collection",
                format!("{collection:?} needs two labels, one with two items, to calibrate"),
            ));
        }
        let mut rng = crate::synth::Rng::new(if seed == 0 { 0x5EED } else { seed });
        let metric = coll.spec.metric;
        let mut scored: Vec<(f32, bool)> = Vec::with_capacity(pairs);
        let mut sampled = Vec::with_capacity(pairs);
        for i in 0..pairs {
            let (a, b, same) = if i % 2 == 0 {
                let g = groups[same_ok[rng.below(same_ok.len())]];
                let a = rng.below(g.len());
                let mut b = rng.below(g.len() - 1);
                if b >= a {
                    b += 1;
                }
                (&g[a], &g[b], true)
            } else {
                let ga = rng.below(groups.len());
                let mut gb = rng.below(groups.len() - 1);
                if gb >= ga {
                    gb += 1;
                }
                let (a, b) = (groups[ga], groups[gb]);
                (&a[rng.below(a.len())], &b[rng.below(b.len())], false)
            };
            scored.push((metric.distance(&a.1, &b.1), same));
            sampled.push((a.0.clone(), b.0.clone(), same));
        }
        let (threshold, accuracy) = best_threshold(&mut scored);
        let roc_auc = roc_auc(&scored);
        let (dbl_margin, dbl_scale) = fit_logistic(&scored);
        let cal = Calibration {
            dbl_margin,
            dbl_scale,
            threshold,
            accuracy,
            roc_auc,
            pairs: scored.len() as u32,
        };
        Ok((cal, sampled))
    }

    /// Stores what Calibrate fitted, with the pair model's threshold where it fitted
    /// one; Verify decides with them from now on.
    pub fn store_calibration(
        &self,
        collection: &str,
        cal: &Calibration,
        pair_threshold: Option<f32>,
    ) -> Result<()> {
        let coll = self.collection(collection)?;
        self.update_calibration(&coll, |d| {
            d.margin = Some(cal.dbl_margin);
            d.scale = Some(cal.dbl_scale);
            d.threshold = Some(cal.threshold);
            if pair_threshold.is_some() {
                d.pair_threshold = pair_threshold;
            }
        })
    }

    /// Changes what Verify decides with, and persists it with the collection's spec.
    fn update_calibration(&self, coll: &Collection, change: impl FnOnce(&mut Dbl)) -> Result<()> {
        let _registry = self.collections.write().expect("registry lock");
        let mut cal = coll.calibration.write().expect("calibration lock");
        let mut next = *cal;
        change(&mut next);
        let mut spec = coll.spec.clone();
        next.apply(&mut spec);
        self.store.put_spec(&spec)?;
        *cal = next;
        Ok(())
    }

    pub fn search(
        &self,
        collection: &str,
        query: &QueryTarget,
        params: &SearchParams,
    ) -> Result<Vec<Hit>> {
        self.search_as(collection, "query", query, params)
    }

    /// [`Db::search`], naming the query `field` in errors.
    pub fn search_as(
        &self,
        collection: &str,
        field: &str,
        query: &QueryTarget,
        params: &SearchParams,
    ) -> Result<Vec<Hit>> {
        let coll = self.collection(collection)?;
        validate::search_params(params, &self.limits)?;
        coll.search(field, query, params)
    }

    pub fn search_batch(
        &self,
        collection: &str,
        queries: &[QueryTarget],
        params: &SearchParams,
    ) -> Result<Vec<Vec<Hit>>> {
        let coll = self.collection(collection)?;
        validate::search_params(params, &self.limits)?;
        if queries.is_empty() {
            return Err(Error::invalid("queries", "must not be empty"));
        }
        if queries.len() > self.limits.max_batch {
            return Err(Error::invalid(
                "queries",
                format!(
                    "{} queries, at most {} per request",
                    queries.len(),
                    self.limits.max_batch
                ),
            ));
        }
        queries
            .iter()
            .enumerate()
            .map(|(i, q)| coll.search(&format!("queries[{i}]"), q, params))
            .collect()
    }

    /// Saves every index snapshot and flushes the store (clean shutdown).
    pub fn shutdown(&self) -> Result<()> {
        let colls: Vec<_> = self
            .collections
            .read()
            .expect("registry lock")
            .values()
            .cloned()
            .collect();
        for coll in colls {
            let start = Instant::now();
            coll.save_snapshot(&self.snapshots)?;
            tracing::info!(collection = %coll.spec.name, items = coll.len(), took_ms = start.elapsed().as_millis() as u64, "saved index snapshot");
        }
        self.store.flush()
    }
}

impl Collection {
    fn create(spec: CollectionSpec, items: ItemsTree) -> Result<Self> {
        let index = AnnIndex::new(&spec, 0)?;
        Ok(Collection {
            calibration: RwLock::new(Dbl::of(&spec)),
            spec,
            items,
            index,
            live: RwLock::new(Live::default()),
            writer: Mutex::new(Writer::new(TreeState::default())),
            turns: Turns::default(),
        })
    }

    /// Loads the catalogue from the store and the index from a matching snapshot, or
    /// rebuilds the index. Returns whether the snapshot was used.
    fn open(
        spec: CollectionSpec,
        items: ItemsTree,
        snapshots: &Path,
        threads: usize,
    ) -> Result<(Self, bool)> {
        let mut state = items.state()?;
        let mut live = Live::default();
        for rec in items.scan(false) {
            let (key, item) = rec?;
            state.next_key = state.next_key.max(key + 1);
            live.insert(key, &item.id, item.label, item.metadata);
        }
        let keys = items.key_count();
        if keys != live.by_id.len() {
            return Err(Error::Corrupt(format!(
                "collection {:?}: {} items but {} ANN keys",
                spec.name,
                live.by_id.len(),
                keys
            )));
        }
        let snapshot = load_snapshot(&spec, snapshots, state.seq, live.by_id.len());
        let from_snapshot = snapshot.is_some();
        let index = match snapshot {
            Some(index) => index,
            None => {
                let index = AnnIndex::new(&spec, live.by_id.len())?;
                let mut chunk: Vec<(u64, Vec<f32>)> = Vec::with_capacity(8192);
                let flush = |chunk: &mut Vec<(u64, Vec<f32>)>| -> Result<()> {
                    let refs: Vec<(u64, &[f32])> =
                        chunk.iter().map(|(k, v)| (*k, v.as_slice())).collect();
                    index.add_many(&refs, threads)?;
                    chunk.clear();
                    Ok(())
                };
                for rec in items.scan(true) {
                    let (key, item) = rec?;
                    chunk.push((key, item.vector));
                    if chunk.len() == chunk.capacity() {
                        flush(&mut chunk)?;
                    }
                }
                flush(&mut chunk)?;
                index
            }
        };
        Ok((
            Collection {
                calibration: RwLock::new(Dbl::of(&spec)),
                spec,
                items,
                index,
                live: RwLock::new(live),
                writer: Mutex::new(Writer::new(state)),
                turns: Turns::default(),
            },
            from_snapshot,
        ))
    }

    pub fn spec(&self) -> &CollectionSpec {
        &self.spec
    }

    pub fn len(&self) -> usize {
        self.live.read().expect("live lock").by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn info(&self) -> CollectionInfo {
        let mut spec = self.spec.clone();
        self.calibration
            .read()
            .expect("calibration lock")
            .apply(&mut spec);
        CollectionInfo {
            spec,
            count: self.len() as u64,
        }
    }

    /// A query's vector, and the stored item it came from (id queries).
    fn resolve<'q>(&self, field: &str, query: &'q QueryTarget) -> Result<Resolved<'q>> {
        match query {
            QueryTarget::Vector(v) => {
                validate::vector(&format!("{field}.vector"), "", v, &self.spec)?;
                Ok((v.clone(), None))
            }
            QueryTarget::Id(id) => {
                validate::id(&format!("{field}.id"), id, &Limits::default())?;
                let Some((key, item)) = self.items.get(id, true)? else {
                    return Err(Error::NotFound(format!(
                        "{field}.id: item {id:?} in collection {:?}",
                        self.spec.name
                    )));
                };
                Ok((item.vector, Some((key, id.as_str()))))
            }
        }
    }

    /// Vectors held by the ANN index (equals `len` when store and index agree).
    pub fn index_len(&self) -> usize {
        self.index.len()
    }

    fn lock_writer(&self) -> Result<std::sync::MutexGuard<'_, Writer>> {
        let w = self.writer.lock().expect("writer lock");
        if w.dropped {
            return Err(Error::NotFound(format!("collection {:?}", self.spec.name)));
        }
        Ok(w)
    }

    /// Store, then index, then catalogue. Validated input only. Not durable until commit.
    ///
    /// Only the store write is serialised (the writer lock); HNSW insertion, the costly
    /// part, runs concurrently with other batches. Batches then publish to the catalogue
    /// in the order they were written to the store (a ticket), so the catalogue, and
    /// with it search, always reflects a prefix of the store's history.
    fn apply_upsert(
        &self,
        items: &[ItemData],
        undo: Option<&mut Undo>,
        threads: usize,
    ) -> Result<usize> {
        if items.is_empty() {
            return Ok(0);
        }
        let mut keys = Vec::with_capacity(items.len());
        let mut replaced = Vec::new();
        let ticket = {
            let mut w = self.lock_writer()?;
            let mut state = w.state;
            let mut m = Mutation::default();
            let mut undo = undo;
            for item in items {
                // The store, not the catalogue, knows the latest key: an earlier batch
                // may be written but not yet published.
                let old = self.items.get(&item.id, undo.is_some())?;
                if let Some(undo) = undo.as_deref_mut() {
                    let slot = format!("{}\0{}", self.spec.name, item.id);
                    undo.before
                        .entry(slot)
                        .or_insert_with(|| old.as_ref().map(|(_, it)| it.clone()));
                }
                if let Some((old_key, _)) = old {
                    m.drop_key(old_key);
                    replaced.push(old_key);
                }
                let key = state.next_key;
                state.next_key += 1;
                m.put(key, item);
                keys.push(key);
            }
            state.seq += 1;
            self.items.apply(m, state)?;
            w.state = state;
            w.take_ticket()
        };
        let turn = Turn::new(&self.turns, ticket);
        let entries: Vec<(u64, &[f32])> = keys
            .iter()
            .zip(items)
            .map(|(k, it)| (*k, it.vector.as_slice()))
            .collect();
        self.index.add_many(&entries, threads)?;
        turn.wait();
        {
            let mut live = self.live.write().expect("live lock");
            for (key, item) in keys.iter().zip(items) {
                live.insert(*key, &item.id, item.label.clone(), item.metadata.clone());
            }
        }
        self.index.remove_many(&replaced)?;
        Ok(items.len())
    }

    fn apply_delete(&self, ids: &[String]) -> Result<usize> {
        let mut found: Vec<(&str, u64)> = Vec::new();
        let ticket = {
            let mut w = self.lock_writer()?;
            let mut seen = HashSet::new();
            for id in ids {
                if seen.insert(id.as_str())
                    && let Some((key, _)) = self.items.get(id, false)?
                {
                    found.push((id.as_str(), key));
                }
            }
            if found.is_empty() {
                return Ok(0);
            }
            let mut m = Mutation::default();
            for (id, key) in &found {
                m.remove(id, *key);
            }
            let mut state = w.state;
            state.seq += 1;
            self.items.apply(m, state)?;
            w.state = state;
            w.take_ticket()
        };
        let turn = Turn::new(&self.turns, ticket);
        turn.wait();
        {
            let mut live = self.live.write().expect("live lock");
            for (id, key) in &found {
                live.by_id.remove(*id);
                live.by_key.remove(key);
            }
        }
        let keys: Vec<u64> = found.iter().map(|(_, k)| *k).collect();
        self.index.remove_many(&keys)?;
        Ok(found.len())
    }

    fn search(&self, field: &str, query: &QueryTarget, p: &SearchParams) -> Result<Vec<Hit>> {
        let (vector, exclude) = self.resolve(field, query)?;
        if p.exact {
            return self.exact_search(&vector, exclude.map(|e| e.1), p);
        }
        let exclude_key = exclude.map(|e| e.0);
        let hits = {
            let live = self.live.read().expect("live lock");
            let keep = |key: u64| {
                Some(key) != exclude_key
                    && live.by_key.get(&key).is_some_and(|e| {
                        p.filter.is_empty() || p.filter.matches(&e.label, &e.metadata)
                    })
            };
            let count = p.k.max(p.expansion);
            let mut found = if p.filter.is_empty() {
                // The common case takes usearch's plain search, which is about twice as
                // fast as a filtered one; what the catalogue no longer holds (a copy being
                // replaced right now) and the query item itself are dropped afterwards,
                // and only a shortfall takes the filtered path.
                let extra = usize::from(exclude_key.is_some());
                let mut found = self.index.search(&vector, count + extra)?;
                found.retain(|(k, _)| keep(*k));
                let available = live.by_key.len().saturating_sub(extra);
                if found.len() < p.k.min(available) {
                    self.index.filtered_search(&vector, count, keep)?
                } else {
                    found
                }
            } else {
                self.index.filtered_search(&vector, count, keep)?
            };
            found.truncate(p.k);
            if found.len() < p.k {
                // HNSW can miss matches behind a selective filter; k hits are promised
                // whenever k items match, so count them and fall back to brute force.
                let matching = live.by_key.keys().filter(|k| keep(**k)).count();
                if matching > found.len() {
                    None
                } else {
                    Some(self.hits(&live, found, p)?)
                }
            } else {
                Some(self.hits(&live, found, p)?)
            }
        };
        match hits {
            Some(h) => Ok(h),
            None => self.exact_search(&vector, exclude.map(|e| e.1), p),
        }
    }

    fn hits(&self, live: &Live, found: Vec<(u64, f32)>, p: &SearchParams) -> Result<Vec<Hit>> {
        let mut hits = Vec::with_capacity(found.len());
        for (key, distance) in found {
            let Some(e) = live.by_key.get(&key) else {
                continue;
            };
            let vector = if p.with_vectors {
                self.items
                    .get(&e.id, true)?
                    .map(|(_, it)| it.vector)
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            hits.push(Hit {
                id: e.id.to_string(),
                label: e.label.clone(),
                distance,
                metadata: if p.with_metadata {
                    e.metadata.clone()
                } else {
                    BTreeMap::new()
                },
                vector,
                pair_score: None,
            });
        }
        Ok(hits)
    }

    /// Brute force over the store with exact f64 distances.
    fn exact_search(
        &self,
        query: &[f32],
        exclude: Option<&str>,
        p: &SearchParams,
    ) -> Result<Vec<Hit>> {
        let mut heap: BinaryHeap<Ranked> = BinaryHeap::with_capacity(p.k + 1);
        for rec in self.items.scan(true) {
            let (_, item) = rec?;
            if Some(item.id.as_str()) == exclude || !p.filter.matches(&item.label, &item.metadata) {
                continue;
            }
            let d = self.spec.metric.distance(query, &item.vector);
            if heap.len() < p.k {
                heap.push(Ranked(d, item));
            } else if heap.peek().is_some_and(|top| d < top.0) {
                heap.pop();
                heap.push(Ranked(d, item));
            }
        }
        Ok(heap
            .into_sorted_vec()
            .into_iter()
            .map(|Ranked(distance, item)| Hit {
                id: item.id,
                label: item.label,
                distance,
                metadata: if p.with_metadata {
                    item.metadata
                } else {
                    BTreeMap::new()
                },
                vector: if p.with_vectors {
                    item.vector
                } else {
                    Vec::new()
                },
                pair_score: None,
            })
            .collect())
    }

    fn save_snapshot(&self, dir: &Path) -> Result<()> {
        let w = self.lock_writer()?;
        // Batches written before the lock may still be inserting into the index.
        self.turns.wait_all(w.next_ticket);
        let [index_path, meta_path] = snapshot_paths(dir, &self.spec.name);
        // Drop the old meta first: a crash mid-save then leaves no snapshot to trust.
        match std::fs::remove_file(&meta_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let tmp = index_path.with_extension("usearch.tmp");
        self.index.save(&tmp)?;
        std::fs::rename(&tmp, &index_path)?;
        let meta = SnapshotMeta {
            uid: self.spec.uid,
            seq: w.state.seq,
            count: self.len(),
        };
        let tmp = meta_path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&meta).expect("meta serialises"))?;
        std::fs::rename(&tmp, &meta_path)?;
        Ok(())
    }
}

impl Live {
    fn insert(&mut self, key: u64, id: &str, label: String, metadata: BTreeMap<String, String>) {
        let id: Arc<str> = Arc::from(id);
        let entry = Arc::new(Entry {
            id: id.clone(),
            label,
            metadata,
        });
        self.by_key.insert(key, entry);
        if let Some(old) = self.by_id.insert(id, key) {
            self.by_key.remove(&old);
        }
    }
}

/// A query's vector and, for id queries, the item's ANN key and id.
type Resolved<'q> = (Vec<f32>, Option<(u64, &'q str)>);

/// A search candidate ordered by distance (NaN never occurs: inputs are finite).
struct Ranked(f32, ItemData);

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0 && self.1.id == other.1.id
    }
}
impl Eq for Ranked {}
impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0
            .total_cmp(&other.0)
            .then_with(|| self.1.id.cmp(&other.1.id))
    }
}

fn snapshot_paths(dir: &Path, name: &str) -> [PathBuf; 2] {
    [
        dir.join(format!("{name}.usearch")),
        dir.join(format!("{name}.snapshot.json")),
    ]
}

/// The snapshot, when it was saved at exactly the store's state; else None (rebuild).
fn load_snapshot(spec: &CollectionSpec, dir: &Path, seq: u64, count: usize) -> Option<AnnIndex> {
    let [index_path, meta_path] = snapshot_paths(dir, &spec.name);
    let meta: SnapshotMeta = serde_json::from_slice(&std::fs::read(&meta_path).ok()?).ok()?;
    if meta.uid != spec.uid || meta.seq != seq || meta.count != count {
        tracing::info!(collection = %spec.name, snapshot_seq = meta.seq, store_seq = seq, "index snapshot is stale; rebuilding");
        return None;
    }
    match AnnIndex::load(spec, &index_path) {
        Ok(index) if index.len() == count => Some(index),
        Ok(index) => {
            tracing::warn!(collection = %spec.name, snapshot = index.len(), store = count, "index snapshot size differs from the store; rebuilding");
            None
        }
        Err(e) => {
            tracing::warn!(collection = %spec.name, error = %e, "index snapshot unreadable; rebuilding");
            None
        }
    }
}

fn new_uid() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Distance-based logistic (Vo & Hays 2016): p(match) = (1 + e^-m) / (1 + e^(sD - m)),
/// with the distance D scaled by s (s = 1 is the paper's form).
pub fn dbl_probability(distance: f32, m: f32, s: f32) -> f32 {
    let (d, m, s) = (f64::from(distance), f64::from(m), f64::from(s));
    ((1.0 + (-m).exp()) / (1.0 + (s * d - m).exp())).clamp(0.0, 1.0) as f32
}

/// The threshold with the best accuracy of `distance < threshold` (midway between two
/// neighbouring distances), and that accuracy. Sorts `scored` by distance.
fn best_threshold(scored: &mut [(f32, bool)]) -> (f32, f32) {
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n = scored.len();
    let negatives = scored.iter().filter(|s| !s.1).count();
    // Threshold below everything: every pair called "different".
    let (mut best, mut best_at) = (negatives, scored.first().map_or(0.0, |s| s.0));
    let mut correct = negatives;
    for i in 0..n {
        correct = if scored[i].1 {
            correct + 1
        } else {
            correct - 1
        };
        let at = if i + 1 < n {
            (scored[i].0 + scored[i + 1].0) / 2.0
        } else {
            scored[i].0 + 1e-6
        };
        if correct > best && (i + 1 == n || scored[i + 1].0 > scored[i].0) {
            best = correct;
            best_at = at;
        }
    }
    (best_at, best as f32 / n.max(1) as f32)
}

/// The threshold on a score (same when score >= threshold) with the best accuracy on
/// labelled pairs; returns it, that accuracy, and the score's ROC AUC.
pub fn fit_score_threshold(scores: &[(f32, bool)]) -> (f32, f32, f32) {
    // Higher scores mean "same": rank by the negated score as if it were a distance.
    let mut negated: Vec<(f32, bool)> = scores.iter().map(|(s, y)| (-s, *y)).collect();
    let (t, accuracy) = best_threshold(&mut negated);
    (-t, accuracy, roc_auc(&negated))
}

/// ROC AUC of "smaller distance = same": the probability that a random same pair is
/// closer than a random different pair (ties count half).
fn roc_auc(scored: &[(f32, bool)]) -> f32 {
    let mut sorted: Vec<(f32, bool)> = scored.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut pos_before, mut sum) = (0f64, 0f64);
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j < sorted.len() && sorted[j].0 == sorted[i].0 {
            j += 1;
        }
        let (p, q) =
            sorted[i..j].iter().fold(
                (0f64, 0f64),
                |(p, q), s| if s.1 { (p + 1.0, q) } else { (p, q + 1.0) },
            );
        sum += q * (pos_before + p / 2.0);
        pos_before += p;
        i = j;
    }
    let positives = pos_before;
    let negatives = sorted.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return 0.5;
    }
    (sum / (positives * negatives)) as f32
}

/// The margin m and scale s that maximise the pairs' log-likelihood under
/// [`dbl_probability`], m in [-10, 10] and s in [0.1, 1000]: a coarse grid, then two
/// finer grids around the best point.
///
/// The scale is what gives the fit an interior optimum: with s fixed at 1, distances of
/// unit vectors (at most 2) cannot push p near 0, and the likelihood keeps rising as m
/// falls, towards p = e^-D.
fn fit_logistic(scored: &[(f32, bool)]) -> (f32, f32) {
    let ll = |m: f64, s: f64| -> f64 {
        let lift = (1.0 + (-m).exp()).ln();
        scored
            .iter()
            .map(|(d, same)| {
                // ln p = ln(1 + e^-m) - ln(1 + e^(sD - m)), computed without overflow.
                let z = s * f64::from(*d) - m;
                let ln_p = (lift - softplus(z)).min(-1e-12);
                if *same {
                    ln_p
                } else {
                    // ln(1 - p), with p close to 1 handled by expm1.
                    (-ln_p.exp_m1()).max(1e-300).ln()
                }
            })
            .sum()
    };
    let (mut m, mut ln_s) = (0.0f64, 0.0f64);
    let (mut m_step, mut s_step) = (0.5f64, 0.25f64);
    let (mut m_span, mut s_span) = (20i32, 20i32);
    let (m_lo, m_hi, s_lo, s_hi) = (-10.0, 10.0, 0.1f64.ln(), 1000f64.ln());
    let mut best = f64::NEG_INFINITY;
    for round in 0..3 {
        let (m0, s0) = if round == 0 { (0.0, 2.0) } else { (m, ln_s) };
        for i in -m_span..=m_span {
            let mi = (m0 + f64::from(i) * m_step).clamp(m_lo, m_hi);
            for j in -s_span..=s_span {
                let sj = (s0 + f64::from(j) * s_step).clamp(s_lo, s_hi);
                let v = ll(mi, sj.exp());
                if v > best {
                    (best, m, ln_s) = (v, mi, sj);
                }
            }
        }
        (m_step, s_step) = (m_step / 10.0, s_step / 10.0);
        (m_span, s_span) = (10, 10);
    }
    (m as f32, ln_s.exp() as f32)
}

/// ln(1 + e^z), stable for large |z|.
fn softplus(z: f64) -> f64 {
    if z > 30.0 { z } else { z.exp().ln_1p() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dbl_probability_is_one_at_zero_distance_and_falls() {
        assert!((dbl_probability(0.0, 0.5, 1.0) - 1.0).abs() < 1e-6);
        assert!(dbl_probability(0.5, 0.5, 1.0) > dbl_probability(1.0, 0.5, 1.0));
        assert!((dbl_probability(0.5, 0.5, 1.0) - (1.0 + (-0.5f32).exp()) / 2.0).abs() < 1e-6);
        assert!((dbl_probability(0.25, 0.5, 2.0) - dbl_probability(0.5, 0.5, 1.0)).abs() < 1e-6);
    }

    #[test]
    fn logistic_fit_recovers_the_generating_parameters() {
        // Pairs drawn from the model itself, m = 3, s = 8: the fit must land near them,
        // not on the edge of its search box.
        let mut rng = crate::synth::Rng::new(7);
        let scored: Vec<(f32, bool)> = (0..20_000)
            .map(|_| {
                let d = rng.below(1_000_000) as f32 / 1_000_000.0;
                let p = dbl_probability(d, 3.0, 8.0);
                (d, (rng.below(1_000_000) as f32) < p * 1_000_000.0)
            })
            .collect();
        let (m, s) = fit_logistic(&scored);
        assert!((m - 3.0).abs() < 0.4, "m = {m}");
        assert!((s - 8.0).abs() < 1.0, "s = {s}");
    }

    #[test]
    fn threshold_separates_separable_pairs() {
        let mut s = vec![
            (0.1, true),
            (0.2, true),
            (0.3, true),
            (0.7, false),
            (0.8, false),
        ];
        let (t, acc) = best_threshold(&mut s);
        assert!(t > 0.3 && t < 0.7, "{t}");
        assert_eq!(acc, 1.0);
        assert_eq!(roc_auc(&s), 1.0);
        let flipped: Vec<(f32, bool)> = s.iter().map(|(d, y)| (*d, !*y)).collect();
        assert_eq!(roc_auc(&flipped), 0.0);
    }
}
