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
//! - [`validate`]: input checks that name the field;
//! - `spec`: a new collection's spec, defaults resolved and checked;
//! - `storage`: the store failed and brought back (the probe, reconciliation);
//! - `backup`: online backups.
//!
//! Every method here blocks (disk, HNSW): callers run them off the async workers.
//! Locks: the registry's map lock is held only to look up, insert or remove a
//! collection, never across disk work; DDL (create, delete, calibration) is serialised
//! by a mutex of its own, so readers never wait for an fsync.

mod backup;
pub mod catalogue;
pub mod collection;
pub mod generation;
pub mod search;
mod spec;
mod storage;
pub mod validate;
pub mod write;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

pub use backup::BackupInfo;
pub use catalogue::{Catalogue, ClassLayout, LabelId, TagView};
pub use collection::{Collection, IndexAudit, SearchStats, WritePhase, WriteStats};
pub use search::{KnnOptions, KnnQuery, KnnResult, Neighbour, knn_parallel};
pub use spec::CreateCollection;
pub use storage::STORAGE_PROBE;
pub use write::StreamTxn;

use crate::error::{Error, Result};
use crate::index::snapshot;
use crate::store::Store;
use crate::types::{Calibration, CollectionSpec, Decision, ItemData, Limits};
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

/// A collection's spec and live item count.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectionInfo {
    pub spec: CollectionSpec,
    pub count: u64,
    /// The latest re-embedding to another model (filled in by the application).
    pub activation: Option<ActivationInfo>,
}

/// Where an activation (Models.Activate, [`crate::activation`]) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivationState {
    Running,
    Done,
    Failed,
}

/// An activation's progress, as GetCollection reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivationInfo {
    pub state: ActivationState,
    pub model: String,
    pub version: String,
    pub done: u64,
    pub total: u64,
    /// Items re-embedded per second since this run started (or resumed).
    pub rate: f64,
    pub error: String,
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
        let t = Instant::now();
        self.store.commit()?;
        coll.writes.observe(WritePhase::Commit, t);
        written.publish()
    }

    /// A vector-only upsert (a training Session's write-back): as [`Registry::upsert`],
    /// but each item keeps its stored input. Durable on return.
    pub fn write_back(&self, coll: &Arc<Collection>, items: &[ItemData]) -> Result<usize> {
        validate::items(items, &coll.spec, &self.settings.limits)?;
        let Some(written) = coll.write_upsert(items, None, true)? else {
            return Ok(0);
        };
        let t = Instant::now();
        self.store.commit()?;
        coll.writes.observe(WritePhase::Commit, t);
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

    /// Sweeps each collection whose index is due (see `AnnIndex::sweep_due`): the HNSW
    /// nodes that search cannot reach are found and repaired. The daemon calls it when
    /// writes go quiet, and again while this returns true: some index still holds keys
    /// no finished sweep has checked. Blocking.
    pub fn sweep_due(&self) -> bool {
        if !self.is_ready() {
            return true; // still recovering: ask again
        }
        let mut unswept = false;
        for coll in self.all() {
            if !coll.sweep_due() {
                unswept |= coll.unswept() > 0;
                continue;
            }
            let started = Instant::now();
            match coll.sweep_reach() {
                Ok(r) => tracing::info!(
                    collection = %coll.name(),
                    checked = r.checked,
                    unreachable = r.unreachable,
                    repaired = r.repaired,
                    stashed = r.stashed,
                    took_ms = started.elapsed().as_millis() as u64,
                    "swept the index for nodes search cannot reach"
                ),
                Err(e) => {
                    tracing::warn!(collection = %coll.name(), error = %e, "index sweep failed")
                }
            }
            unswept |= coll.unswept() > 0; // keys added while it ran
        }
        unswept
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
