//! The collections registry: joins the durable store (sled) and the ANN index (usearch)
//! into collections that can be written, read and searched.
//!
//! The store is the truth. Every write goes to sled first as one atomic batch, is
//! flushed by a group commit, then goes into the index, then into the in-memory
//! catalogue that reads use, and is acknowledged. After a crash the index is rebuilt from the
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
use crate::store::backup::BackupWriter;
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

/// How often the storage probe checks whether writes can resume after a storage
/// failure.
pub const STORAGE_PROBE: Duration = Duration::from_millis(500);

/// What a backup wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct BackupInfo {
    pub path: PathBuf,
    /// Each collection's name and item count, in name order.
    pub collections: Vec<(String, u64)>,
    pub items: u64,
    pub bytes: u64,
    pub took: Duration,
    /// The longest time one collection's writes waited for the backup.
    pub longest_pause: Duration,
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
    /// Opens a stored collection (or generation) with this registry's snapshots and
    /// settings; the bool says whether its index came from a snapshot.
    fn open_collection(&self, spec: &CollectionSpec) -> Result<(Collection, bool)> {
        Collection::open(
            spec.clone(),
            self.store.items(spec)?,
            &self.snapshots,
            self.settings.limits.clone(),
            self.settings.index_threads,
        )
    }

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
            let (coll, from_snapshot) = self.open_collection(&spec)?;
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
            let (coll, _) = self.open_collection(&record.spec)?;
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

    /// Every collection now in the map (a snapshot: the map's lock is not held).
    fn all(&self) -> Vec<Arc<Collection>> {
        self.collections
            .read()
            .expect("registry lock")
            .values()
            .cloned()
            .collect()
    }

    pub fn list(&self) -> Result<Vec<CollectionInfo>> {
        self.check_ready()?;
        let colls = self.all();
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
        let Some(written) = coll.write_upsert(items, None, false)? else {
            return Ok(0);
        };
        // Durable first: a batch whose commit fails is dropped here unpublished.
        self.store.commit()?;
        written.publish()
    }

    /// A vector-only upsert (a training Session's write-back): as [`Registry::upsert`],
    /// but each item keeps its stored input. Durable on return.
    pub fn write_back(&self, coll: &Arc<Collection>, items: &[ItemData]) -> Result<usize> {
        validate::items(items, &coll.spec, &self.settings.limits)?;
        let Some(written) = coll.write_upsert(items, None, true)? else {
            return Ok(0);
        };
        self.store.commit()?;
        written.publish()
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
        let Some(written) = coll.write_delete(ids)? else {
            return Ok(0);
        };
        self.store.commit()?;
        written.publish()
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

    /// Whether the store accepts writes (false while storage is failing).
    pub fn storage_writable(&self) -> bool {
        self.store.writable()
    }

    /// How many times storage has failed since the daemon started.
    pub fn storage_failures(&self) -> u64 {
        self.store.failures()
    }

    /// Test-only: see [`Store::inject_fault`].
    #[doc(hidden)]
    pub fn inject_storage_fault(&self, on: bool) {
        self.store.inject_fault(on);
    }

    /// Watches storage from a thread of its own: while writes are failing, every
    /// [`STORAGE_PROBE`] it tries [`Registry::restore_storage`]. The thread ends with
    /// the registry.
    pub fn watch_storage(self: &Arc<Self>) {
        let registry = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("storage-probe".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(STORAGE_PROBE);
                    let Some(registry) = registry.upgrade() else {
                        return;
                    };
                    if registry.storage_writable() || !registry.is_ready() {
                        continue;
                    }
                    if let Err(e) = registry.restore_storage() {
                        tracing::debug!(error = %e, "storage still failing");
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "no storage probe thread: writes will not resume after a storage failure without a restart");
        }
    }

    /// After a storage failure: once the data dir takes a write again, reopens the
    /// store (every writer kept out meanwhile), brings each collection's index and
    /// catalogue in line with what it holds, and resumes writes. Returns whether writes
    /// are accepted now.
    pub fn restore_storage(&self) -> Result<bool> {
        if self.store.writable() {
            return Ok(true);
        }
        if self.store.fault_injected() {
            return Ok(false);
        }
        self.store.probe_space()?;
        let _ddl = self.ddl.lock().expect("ddl lock");
        let colls = self.all();
        // Name order, as the map is: the only place that holds more than one writer.
        let mut writers: Vec<_> = colls
            .iter()
            .map(|c| c.writer.lock().expect("writer lock"))
            .collect();
        for (c, w) in colls.iter().zip(&writers) {
            c.turns.wait_all(w.next_ticket);
        }
        self.store.reopen()?;
        for (c, w) in colls.iter().zip(&mut writers) {
            if !w.dropped {
                c.resync(w)?;
            }
        }
        drop(writers);
        self.reconcile_specs(&colls)?;
        self.store.resume_writes();
        Ok(true)
    }

    /// A create or delete whose commit failed may have reached the disk after all: the
    /// registry follows the reopened store's specs.
    fn reconcile_specs(&self, colls: &[Arc<Collection>]) -> Result<()> {
        let specs = self.store.specs()?;
        for c in colls {
            if !specs.iter().any(|s| s.name == c.name()) {
                tracing::warn!(collection = %c.name(), "collection gone from the reopened store");
                c.writer.lock().expect("writer lock").dropped = true;
                self.collections
                    .write()
                    .expect("registry lock")
                    .remove(c.name());
            }
        }
        for spec in specs {
            if colls.iter().any(|c| c.name() == spec.name) {
                continue;
            }
            tracing::warn!(collection = %spec.name, "collection found in the reopened store");
            let (coll, _) = self.open_collection(&spec)?;
            self.collections
                .write()
                .expect("registry lock")
                .insert(spec.name, Arc::new(coll));
        }
        Ok(())
    }

    /// Writes an online backup to `path` (absent or an empty directory on this
    /// machine, outside the data dir). Each collection is copied under its writer lock,
    /// so its copy holds every write acknowledged before the backup reached it and no
    /// part of a later one; writes to it wait meanwhile, writes to the others go on.
    /// Messages of an UpsertStream still open are visible to the copy as they are to
    /// reads. Creates, deletes and calibrations wait for the whole backup.
    pub fn backup(&self, path: &str) -> Result<BackupInfo> {
        self.check_ready()?;
        let started = Instant::now();
        let to = self.backup_target(path)?;
        let _ddl = self.ddl.lock().expect("ddl lock");
        let mut writer = BackupWriter::create(&to)?;
        let mut collections = Vec::new();
        let mut longest_pause = Duration::ZERO;
        for spec in self.store.specs()? {
            let Ok(coll) = self.collection(&spec.name) else {
                continue;
            };
            let paused = Instant::now();
            let items = {
                let w = coll.writer.lock().expect("writer lock");
                writer.add(&spec, &coll.items, w.state.seq)?
            };
            let pause = paused.elapsed();
            longest_pause = longest_pause.max(pause);
            tracing::info!(collection = %spec.name, items, pause_ms = pause.as_millis() as u64, "backed up collection");
            collections.push((spec.name, items));
        }
        let (_, bytes) = writer.finish()?;
        let info = BackupInfo {
            path: to,
            items: collections.iter().map(|(_, n)| n).sum(),
            collections,
            bytes,
            took: started.elapsed(),
            longest_pause,
        };
        tracing::info!(path = %info.path.display(), items = info.items, bytes, took_ms = info.took.as_millis() as u64, "backup written");
        Ok(info)
    }

    /// A backup path: absolute, and not inside the data dir.
    fn backup_target(&self, path: &str) -> Result<PathBuf> {
        if path.is_empty() {
            return Err(Error::invalid("path", "must not be empty"));
        }
        let to = PathBuf::from(path);
        if !to.is_absolute() {
            return Err(Error::invalid(
                "path",
                format!("{path:?} must be an absolute path on the daemon's machine"),
            ));
        }
        // The nearest existing ancestor, resolved, so that links and `..` cannot hide
        // the data dir.
        let mut existing = to.as_path();
        let mut rest = Vec::new();
        while !existing.exists() {
            let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
                break;
            };
            rest.push(name);
            existing = parent;
        }
        let mut resolved = existing
            .canonicalize()
            .map_err(|e| Error::invalid("path", format!("{path:?}: {e}")))?;
        resolved.extend(rest.iter().rev());
        let data_dir = self.settings.data_dir.canonicalize()?;
        if resolved.starts_with(&data_dir) || data_dir.starts_with(&resolved) {
            return Err(Error::invalid(
                "path",
                format!(
                    "{path:?} overlaps the data dir {}; back up to a directory outside it",
                    data_dir.display()
                ),
            ));
        }
        Ok(to)
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
        if !self.store.writable() {
            // Snapshots would claim states the disk may not hold; the next start
            // rebuilds from the store, which has every acknowledged write.
            tracing::warn!("storage is failing: no index snapshots saved at shutdown");
            return Ok(());
        }
        let colls = self.all();
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
