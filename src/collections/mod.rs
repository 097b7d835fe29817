//! The collections registry: joins the durable store (sled) and the ANN index (usearch)
//! into collections that can be written, read and searched.
//!
//! The store is the truth. Every write goes to sled first as one atomic batch, then into
//! the index, then into the in-memory catalogue that reads use; it is acknowledged only
//! after a group commit has flushed it. After a crash the index is rebuilt from the
//! store, so the two always agree.
//!
//! - [`collection`]: one collection, and the read view the miner builds on;
//! - [`write`]: the ordered write path and stream transactions;
//! - [`catalogue`]: ids, interned labels, the label index, metadata per ANN key;
//! - [`search`]: ANN, exact and batched kNN;
//! - [`validate`]: input checks that name the field.
//!
//! Every method here blocks (disk, HNSW): callers run them off the async workers.
//! Locks: the registry's map lock is held only to look up, insert or remove a
//! collection, never across disk work; DDL (create, delete, calibration) is serialised
//! by a mutex of its own, so readers never wait for an fsync.

pub mod catalogue;
pub mod collection;
pub mod generation;
pub mod search;
pub mod validate;
pub mod write;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

pub use catalogue::{Catalogue, LabelId};
pub use collection::{Collection, IndexAudit, SearchStats};
pub use search::{KnnOptions, KnnQuery, KnnResult, Neighbour, knn_parallel};
pub use write::StreamTxn;

use crate::error::{Error, Result};
use crate::index::snapshot;
use crate::judge::{Calibration, Decision};
use crate::store::Store;
use crate::types::{
    CollectionSpec, IndexParams, ItemData, Limits, Metric, ModelDefaults, Precision,
};
use write::TxnTable;

/// What the core needs to know, and nothing of the server's: no listen address, no
/// models, no log format.
#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    /// sled's page cache.
    pub cache_bytes: u64,
    pub limits: Limits,
    /// Threads that insert one batch into HNSW (and rebuild an index at recovery).
    pub index_threads: usize,
}

impl Settings {
    /// Defaults for a data dir (tests, tools).
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Settings {
            data_dir: data_dir.into(),
            cache_bytes: 64 << 20,
            limits: Limits::default(),
            index_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

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

/// A collection's spec and live item count.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectionInfo {
    pub spec: CollectionSpec,
    pub count: u64,
    /// The latest re-embedding to another model (filled in by the application).
    pub activation: Option<crate::activation::ActivationInfo>,
}

/// How recovery went, per collection.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovered {
    pub name: String,
    pub items: usize,
    pub from_snapshot: bool,
    pub took: Duration,
}

pub struct Registry {
    store: Arc<Store>,
    snapshots: PathBuf,
    settings: Settings,
    collections: RwLock<BTreeMap<String, Arc<Collection>>>,
    /// Generations being built by Activate, by collection name (see [`generation`]):
    /// never read from until they replace their collection.
    shadows: RwLock<BTreeMap<String, Arc<Collection>>>,
    /// Serialises create, delete and calibration writes (each an fsync of the specs).
    ddl: Mutex<()>,
    ready: AtomicBool,
    txns: Arc<TxnTable>,
}

impl Registry {
    /// Opens the store. Collections are not usable until [`Registry::recover`] has run.
    pub fn open(settings: Settings) -> Result<Self> {
        std::fs::create_dir_all(&settings.data_dir)?;
        let snapshots = settings.data_dir.join("index");
        std::fs::create_dir_all(&snapshots)?;
        let store = Store::open(&settings.data_dir, settings.cache_bytes)?;
        Ok(Registry {
            store: Arc::new(store),
            snapshots,
            settings,
            collections: RwLock::new(BTreeMap::new()),
            shadows: RwLock::new(BTreeMap::new()),
            ddl: Mutex::new(()),
            ready: AtomicBool::new(false),
            txns: Arc::new(TxnTable::default()),
        })
    }

    /// Loads every collection: its index from a snapshot when the snapshot matches the
    /// store, else rebuilt from the store. Then the registry serves.
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
                self.store.items(&spec)?,
                &self.snapshots,
                self.settings.limits.clone(),
                self.settings.index_threads,
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
        // Generations being built: reopened (their index rebuilt from their tree) for
        // the application to resume; one whose collection is gone is dropped.
        for record in self.store.shadows()? {
            let name = record.spec.name.clone();
            if !self
                .collections
                .read()
                .expect("registry lock")
                .contains_key(&name)
            {
                tracing::warn!(collection = %name, "dropping a generation whose collection is gone");
                self.store.take_shadow(&name)?;
                self.store.commit()?;
                self.store.drop_tree(&record.spec.tree_name())?;
                continue;
            }
            let (coll, _) = Collection::open(
                record.spec.clone(),
                self.store.items(&record.spec)?,
                &self.snapshots,
                self.settings.limits.clone(),
                self.settings.index_threads,
            )?;
            tracing::info!(collection = %name, items = coll.len(), of = record.total, "reopened a generation being built");
            self.shadows
                .write()
                .expect("registry lock")
                .insert(name, Arc::new(coll));
        }
        self.ready.store(true, Ordering::Release);
        Ok(report)
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn limits(&self) -> &Limits {
        &self.settings.limits
    }

    /// Flushes performed by group commit so far.
    pub fn flushes(&self) -> u64 {
        self.store.flushes()
    }

    /// Group-commit flush latency.
    pub fn flush_latency(&self) -> &crate::metrics::Histogram {
        self.store.flush_latency()
    }

    fn check_ready(&self) -> Result<()> {
        if self.is_ready() {
            Ok(())
        } else {
            Err(Error::Unavailable("recovery is still running".into()))
        }
    }

    /// A collection by name; resolve it once per request and pass it down.
    pub fn collection(&self, name: &str) -> Result<Arc<Collection>> {
        self.check_ready()?;
        self.collections
            .read()
            .expect("registry lock")
            .get(name)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("collection {name:?}")))
    }

    pub fn create(&self, req: CreateCollection) -> Result<CollectionInfo> {
        self.check_ready()?;
        validate::collection_name("name", &req.name)?;
        let spec = self.resolve_spec(req)?;
        let _ddl = self.ddl.lock().expect("ddl lock");
        if self
            .collections
            .read()
            .expect("registry lock")
            .contains_key(&spec.name)
        {
            return Err(Error::AlreadyExists(format!("collection {:?}", spec.name)));
        }
        let items = self.store.items(&spec)?;
        let coll = Collection::create(
            spec.clone(),
            items,
            self.settings.limits.clone(),
            self.settings.index_threads,
        )?;
        self.store.put_spec(&spec)?;
        self.collections
            .write()
            .expect("registry lock")
            .insert(spec.name.clone(), Arc::new(coll));
        tracing::info!(collection = %spec.name, dimension = spec.dimension, metric = ?spec.metric, "created collection");
        Ok(CollectionInfo {
            spec,
            count: 0,
            activation: None,
        })
    }

    /// A new collection's spec: the request with every default filled in, checked.
    fn resolve_spec(&self, mut req: CreateCollection) -> Result<CollectionSpec> {
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

    pub fn list(&self) -> Result<Vec<CollectionInfo>> {
        self.check_ready()?;
        let colls: Vec<Arc<Collection>> = self
            .collections
            .read()
            .expect("registry lock")
            .values()
            .cloned()
            .collect();
        Ok(colls.iter().map(|c| c.info()).collect())
    }

    /// Deletes a collection; returns how many items it held.
    pub fn delete(&self, name: &str) -> Result<u64> {
        self.check_ready()?;
        validate::collection_name("name", name)?;
        let _ddl = self.ddl.lock().expect("ddl lock");
        let coll = self.collection(name)?;
        {
            // Writers from here on get NotFound; reads go on until the map forgets it.
            let mut w = coll.writer.lock().expect("writer lock");
            self.store.remove_collection(&coll.spec)?;
            w.dropped = true;
        }
        // A generation being built for it goes too (its job stops at its next step).
        if let Some(shadow) = self.shadows.write().expect("registry lock").remove(name) {
            shadow.writer.lock().expect("writer lock").dropped = true;
        }
        self.collections
            .write()
            .expect("registry lock")
            .remove(name);
        snapshot::remove(&self.snapshots, name)?;
        tracing::info!(collection = name, "deleted collection");
        Ok(coll.len() as u64)
    }

    /// Inserts or replaces validated-here items; durable on return.
    pub fn upsert(&self, coll: &Arc<Collection>, items: &[ItemData]) -> Result<usize> {
        if items.is_empty() {
            return Err(Error::invalid("items", "must not be empty"));
        }
        validate::items(items, &coll.spec, &self.settings.limits)?;
        let n = coll.apply_upsert(items, None)?;
        self.store.commit()?;
        Ok(n)
    }

    /// Starts an UpsertStream: see [`StreamTxn`].
    pub fn begin_stream(&self) -> Result<StreamTxn> {
        self.check_ready()?;
        Ok(StreamTxn::begin(
            self.txns.clone(),
            self.store.clone(),
            self.settings.limits.max_batch,
        ))
    }

    /// One message of an UpsertStream: validated and applied, durable at commit.
    pub fn stage(
        &self,
        txn: &StreamTxn,
        coll: &Arc<Collection>,
        items: &[ItemData],
    ) -> Result<usize> {
        validate::items(items, &coll.spec, &self.settings.limits)?;
        txn.stage(coll, items)
    }

    /// Deletes items by id; durable on return. Returns how many existed.
    pub fn delete_items(&self, coll: &Collection, ids: &[String]) -> Result<usize> {
        validate::ids(ids, &self.settings.limits)?;
        let n = coll.apply_delete(ids)?;
        if n > 0 {
            self.store.commit()?;
        }
        Ok(n)
    }

    /// Stores what Calibrate fitted; Verify decides with it from now on.
    pub fn store_calibration(&self, coll: &Collection, cal: &Calibration) -> Result<()> {
        let _ddl = self.ddl.lock().expect("ddl lock");
        if !coll.active() {
            return Err(Error::not_found(format!("collection {:?}", coll.name())));
        }
        let mut next: Decision = coll.decision();
        next.margin = Some(cal.dbl_margin);
        next.scale = Some(cal.dbl_scale);
        next.threshold = Some(cal.threshold);
        if let Some((t, _, _)) = cal.pair {
            next.pair_threshold = Some(t);
        }
        let mut spec = coll.spec.clone();
        next.apply(&mut spec);
        self.store.put_spec(&spec)?;
        coll.set_decision(next);
        Ok(())
    }

    /// Rolls back open streams, saves every index snapshot and flushes the store (clean
    /// shutdown).
    pub fn shutdown(&self) -> Result<()> {
        let undone = self
            .txns
            .close_all(&self.store, self.settings.limits.max_batch)?;
        if undone > 0 {
            tracing::info!(
                streams = undone,
                "rolled back streams still open at shutdown"
            );
        }
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
            tracing::info!(collection = %coll.name(), items = coll.len(), took_ms = start.elapsed().as_millis() as u64, "saved index snapshot");
        }
        self.store.flush()
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
