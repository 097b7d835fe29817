//! One collection: its spec, its items in the store, its ANN index and its catalogue,
//! and the reads the rest of the daemon makes of them (the miner's read view included).
//!
//! Every method here blocks (disk, HNSW): callers run them off the async workers.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard};

use super::catalogue::{Catalogue, LabelId};
use super::write::{Turns, Writer};
use super::{CollectionInfo, validate};
use crate::error::{Error, Field, Result};
use crate::index::{AnnIndex, snapshot};
use crate::metrics::Histogram;
use crate::store::codec::decode_input;
use crate::store::{ItemsTree, TreeState};
use crate::types::{
    CollectionSpec, Decision, InputData, ItemData, LabelGroups, Limits, QueryTarget,
};

pub struct Collection {
    pub(super) spec: CollectionSpec,
    pub(super) items: ItemsTree,
    pub(super) index: AnnIndex,
    pub(super) catalogue: RwLock<Catalogue>,
    pub(super) writer: Mutex<Writer>,
    pub(super) turns: Turns,
    /// The spec's logistic and thresholds, until Calibrate replaces them.
    pub(super) decision: RwLock<Decision>,
    pub(super) limits: Limits,
    /// Threads for HNSW insertion per batch.
    pub(super) threads: usize,
    pub(super) stats: SearchStats,
    pub(super) writes: WriteStats,
    /// Set when a new generation replaced this collection (Activate): a write that
    /// finds it set is retried against the collection now under this name.
    pub(super) superseded: std::sync::atomic::AtomicBool,
}

/// How often search had to work around its index.
#[derive(Debug, Default)]
pub struct SearchStats {
    /// Filtered searches whose expansion was grown because the filter starved HNSW.
    pub expanded: AtomicU64,
    /// Searches answered by brute force over the store after that.
    pub fallbacks: AtomicU64,
    /// The miner's kNN queries answered by a plain search with the exclusions applied
    /// afterwards, and those that needed the filtered search.
    pub knn_plain: AtomicU64,
    pub knn_filtered: AtomicU64,
    /// Of the recent plain attempts, the share (per mille) that came up short: the
    /// miner's kNN goes straight to the filtered search while it is high (a collection
    /// whose nearest neighbours mostly share the anchor's label), and probes the plain
    /// one now and then to notice when that changes.
    pub(super) knn_shortfall: std::sync::atomic::AtomicU32,
}

/// Where a write's time goes, phase by phase (see [`WritePhase`]): what a write waited
/// for under load.
#[derive(Debug, Default)]
pub struct WriteStats {
    phases: [Histogram; WritePhase::ALL.len()],
}

/// The steps of a write, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WritePhase {
    /// Waiting for the collection's writer (writers go one at a time to the store).
    Writer,
    /// Writing the batch to the store (not yet durable).
    Store,
    /// Waiting for the group commit to make it durable (plain writes only).
    Commit,
    /// Inserting into the HNSW index.
    Index,
    /// Waiting for the batches before it to publish (store order).
    Turn,
    /// Waiting for the catalogue's write lock (readers: searches and mining walks).
    Catalogue,
}

impl WritePhase {
    pub const ALL: [WritePhase; 6] = [
        WritePhase::Writer,
        WritePhase::Store,
        WritePhase::Commit,
        WritePhase::Index,
        WritePhase::Turn,
        WritePhase::Catalogue,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WritePhase::Writer => "writer",
            WritePhase::Store => "store",
            WritePhase::Commit => "commit",
            WritePhase::Index => "index",
            WritePhase::Turn => "turn",
            WritePhase::Catalogue => "catalogue",
        }
    }
}

impl WriteStats {
    pub fn observe(&self, phase: WritePhase, since: std::time::Instant) {
        self.phases[phase as usize].observe_duration(since.elapsed());
    }

    pub fn phase(&self, phase: WritePhase) -> &Histogram {
        &self.phases[phase as usize]
    }
}

/// Whether the ANN index holds exactly the keys the store holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexAudit {
    /// Keys in the store.
    pub stored: usize,
    /// Vectors in the index.
    pub indexed: usize,
    /// Stored keys the index lacks.
    pub missing: Vec<u64>,
}

impl IndexAudit {
    /// Every stored key is indexed, and nothing else is.
    pub fn is_exact(&self) -> bool {
        self.missing.is_empty() && self.stored == self.indexed
    }
}

/// A query's vector and, for id queries, the item's ANN key and id.
pub(super) type Resolved<'q> = (Vec<f32>, Option<(u64, &'q str)>);

impl Collection {
    pub(super) fn create(
        spec: CollectionSpec,
        items: ItemsTree,
        limits: Limits,
        threads: usize,
    ) -> Result<Self> {
        let index = AnnIndex::new(&spec, 0)?;
        Ok(Collection::assemble(
            spec,
            items,
            index,
            Catalogue::default(),
            TreeState::default(),
            limits,
            threads,
        ))
    }

    /// Loads the collection. A clean restart (a snapshot saved at exactly the store's
    /// mutation counter) reads the catalogue file and maps the index file: no scan of
    /// the store. Otherwise the catalogue is scanned from the store and the index loaded
    /// from a matching snapshot or rebuilt. Returns whether the snapshot was used.
    pub(super) fn open(
        spec: CollectionSpec,
        items: ItemsTree,
        snapshots: &Path,
        limits: Limits,
        threads: usize,
    ) -> Result<(Self, bool)> {
        let state = items.state()?;
        let clean = snapshot::current_meta(&spec, snapshots, state.seq).and_then(|meta| {
            let bytes = snapshot::load_catalogue(&spec, snapshots, &meta)?;
            let catalogue = Catalogue::decode(&bytes, state.seq)
                .filter(|c| c.len() == meta.count)
                .or_else(|| {
                    tracing::warn!(collection = %spec.name, "snapshot catalogue unreadable; scanning the store");
                    None
                })?;
            let index = snapshot::load(&spec, snapshots, state.seq, meta.count)?;
            Some((catalogue, index))
        });
        if let Some((catalogue, index)) = clean {
            let coll = Collection::assemble(spec, items, index, catalogue, state, limits, threads);
            return Ok((coll, true));
        }
        Self::open_from_store(spec, items, snapshots, limits, threads)
    }

    fn assemble(
        spec: CollectionSpec,
        items: ItemsTree,
        index: AnnIndex,
        catalogue: Catalogue,
        state: TreeState,
        limits: Limits,
        threads: usize,
    ) -> Self {
        Collection {
            decision: RwLock::new(Decision::of(&spec)),
            spec,
            items,
            index,
            catalogue: RwLock::new(catalogue),
            writer: Mutex::new(Writer::new(state)),
            turns: Turns::default(),
            limits,
            threads,
            stats: SearchStats::default(),
            writes: WriteStats::default(),
            superseded: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The catalogue from a scan of the store; the index from a matching snapshot, or
    /// rebuilt from the store.
    fn open_from_store(
        spec: CollectionSpec,
        items: ItemsTree,
        snapshots: &Path,
        limits: Limits,
        threads: usize,
    ) -> Result<(Self, bool)> {
        let mut state = items.state()?;
        let mut catalogue = Catalogue::default();
        for rec in items.scan(false) {
            let (key, item) = rec?;
            state.next_key = state.next_key.max(key + 1);
            catalogue.insert(key, &item.id, &item.label, item.generation, item.metadata);
        }
        catalogue.set_seq(state.seq);
        let keys = items.key_count();
        if keys != catalogue.len() {
            return Err(Error::Corrupt(format!(
                "collection {:?}: {} items but {} ANN keys",
                spec.name,
                catalogue.len(),
                keys
            )));
        }
        let snapshot = snapshot::load(&spec, snapshots, state.seq, catalogue.len());
        let from_snapshot = snapshot.is_some();
        let index = match snapshot {
            Some(index) => index,
            None => {
                let index = AnnIndex::new(&spec, catalogue.len())?;
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
                let items = items.scan(true).map(|r| r.map(|(k, it)| (k, it.vector)));
                index.sweep(items, threads)?;
                index
            }
        };
        Ok((
            Collection::assemble(spec, items, index, catalogue, state, limits, threads),
            from_snapshot,
        ))
    }

    pub fn spec(&self) -> &CollectionSpec {
        &self.spec
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn len(&self) -> usize {
        self.catalogue().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The spec as it stands now (with Calibrate's fit) and the item count.
    pub fn info(&self) -> CollectionInfo {
        let mut spec = self.spec.clone();
        self.decision().apply(&mut spec);
        CollectionInfo {
            spec,
            count: self.len() as u64,
            activation: None,
        }
    }

    /// What Verify decides with now.
    pub fn decision(&self) -> Decision {
        *self.decision.read().expect("decision lock")
    }

    pub fn search_stats(&self) -> &SearchStats {
        &self.stats
    }

    pub fn write_stats(&self) -> &WriteStats {
        &self.writes
    }

    /// What the index's reachability checks found: nodes search could not reach, and
    /// their repair (see [`crate::index::reach`]).
    pub fn reach_counts(&self) -> crate::index::reach::ReachCounts {
        self.index.reach_counts()
    }

    /// Checks every stored item against the index and repairs what search cannot
    /// reach; [`Collection::sweep_due`] says when one is worth its cost.
    pub fn sweep_reach(&self) -> Result<crate::index::reach::Reach> {
        let items = self
            .items
            .scan(true)
            .map(|r| r.map(|(k, it)| (k, it.vector)));
        self.index.sweep(items, self.threads)
    }

    pub fn sweep_due(&self) -> bool {
        self.index.sweep_due()
    }

    /// Keys added since the last reachability sweep began.
    pub fn unswept(&self) -> usize {
        self.index.unswept()
    }

    pub(super) fn lock_writer(&self) -> Result<std::sync::MutexGuard<'_, Writer>> {
        let w = self.writer.lock().expect("writer lock");
        if w.dropped {
            return Err(Error::not_found(format!("collection {:?}", self.spec.name)));
        }
        Ok(w)
    }

    /// A query's vector, and the stored item it came from (id queries).
    pub(super) fn resolve<'q>(
        &self,
        field: &Field,
        query: &'q QueryTarget,
    ) -> Result<Resolved<'q>> {
        match query {
            QueryTarget::Vector(v) => {
                validate::vector(&field.clone().field("vector"), "", v, &self.spec)?;
                Ok((v.clone(), None))
            }
            QueryTarget::Id(id) => {
                let field = field.clone().field("id");
                validate::id(&field, id, &self.limits)?;
                let Some((key, item)) = self.stored(id, true)? else {
                    return Err(Error::not_found_at(
                        field,
                        format!("item {id:?} in collection {:?}", self.spec.name),
                    ));
                };
                Ok((item.vector, Some((key, id.as_str()))))
            }
        }
    }

    /// An item as reads may see it. While storage is failing, reads keep to what the
    /// catalogue published: sled's memory may hold a batch whose commit failed (never
    /// acknowledged, never published), and sled may fail a read whose path holds a node
    /// split it can no longer write. An item the store cannot give as published is
    /// answered from the catalogue and the index (its vector where the index keeps exact
    /// f32 vectors; else it reads as absent until writes resume).
    fn stored(&self, id: &str, with_vector: bool) -> Result<Option<(u64, ItemData)>> {
        if self.items.writable() {
            return self.items.get(id, with_vector);
        }
        let Some(key) = self.catalogue().key_of(id) else {
            return Ok(None);
        };
        match self.items.get(id, with_vector) {
            Ok(Some((k, item))) if k == key => return Ok(Some((k, item))),
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, id, "store read failed while storage is failing; answering from the index")
            }
        }
        let vector = if with_vector {
            match self.index.vector(key) {
                Some(v) => v,
                None => return Ok(None),
            }
        } else {
            Vec::new()
        };
        let c = self.catalogue();
        let Some(e) = c.get(key) else {
            return Ok(None);
        };
        Ok(Some((
            key,
            ItemData {
                id: id.to_string(),
                label: c.label_name(e.label).to_string(),
                metadata: e.metadata.clone(),
                vector,
                input: None,
                generation: e.generation,
            },
        )))
    }

    /// An item's stored input; while storage is failing, none where the store cannot
    /// read it.
    fn stored_input(&self, id: &str) -> Result<Option<Vec<u8>>> {
        match self.items.input(id) {
            Err(_) if !self.items.writable() => Ok(None),
            other => other,
        }
    }

    /// After the store was reopened (a storage failure): brings the catalogue and the
    /// index in line with what the store holds now, which is every acknowledged write,
    /// and perhaps a failed one that reached the disk after all. Called with the writer
    /// lock held and every published batch's turn done. Returns whether anything
    /// changed.
    pub(super) fn resync(&self, w: &mut Writer) -> Result<bool> {
        let state = self.items.state()?;
        let published = self.catalogue().seq();
        let next_key = w.state.next_key.max(state.next_key);
        if state.seq == published {
            w.state = TreeState {
                seq: state.seq,
                next_key,
            };
            return Ok(false);
        }
        let mut catalogue = Catalogue::default();
        let mut missing = Vec::new();
        for rec in self.items.scan(false) {
            let (key, item) = rec?;
            if !self.index.contains(key) {
                missing.push((key, item.id.clone()));
            }
            catalogue.insert(key, &item.id, &item.label, item.generation, item.metadata);
        }
        catalogue.set_seq(state.seq);
        let stale: Vec<u64> = self
            .catalogue()
            .keys()
            .filter(|k| catalogue.get(*k).is_none())
            .collect();
        let mut vectors = Vec::with_capacity(missing.len());
        for (key, id) in &missing {
            if let Some((_, item)) = self.items.get(id, true)? {
                vectors.push((*key, item.vector));
            }
        }
        let refs: Vec<(u64, &[f32])> = vectors.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        self.index.add_many(&refs, self.threads)?;
        self.index.remove_many(&stale)?;
        tracing::warn!(collection = %self.spec.name, store_seq = state.seq, published, added = refs.len(), removed = stale.len(), "resynced index and catalogue with the reopened store");
        *self.catalogue.write().expect("catalogue lock") = catalogue;
        w.state = TreeState {
            seq: state.seq,
            next_key,
        };
        Ok(true)
    }

    /// The vector of a query (a vector, or a stored item's).
    pub fn query_vector(&self, field: &Field, query: &QueryTarget) -> Result<Vec<f32>> {
        Ok(self.resolve(field, query)?.0)
    }

    /// The items that exist among `ids`, in request order.
    pub fn get_items(
        &self,
        ids: &[String],
        with_vectors: bool,
        with_inputs: bool,
    ) -> Result<Vec<ItemData>> {
        validate::ids(ids, &self.limits)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some((_, mut item)) = self.stored(id, with_vectors)? {
                if with_inputs {
                    item.input = self.stored_input(id)?;
                }
                out.push(item);
            }
        }
        Ok(out)
    }

    /// The decoded stored inputs of those of `ids` that have one.
    pub fn stored_inputs(&self, ids: &[String]) -> Result<HashMap<String, InputData>> {
        let mut out = HashMap::with_capacity(ids.len());
        for id in ids {
            if out.contains_key(id) || (!self.items.writable() && !self.contains(id)) {
                continue;
            }
            if let Some(data) = self.stored_input(id)?.as_deref().and_then(decode_input) {
                out.insert(id.clone(), data);
            }
        }
        Ok(out)
    }

    /// Whether an item exists (for errors that must tell "no such item" from "no input").
    pub fn contains(&self, id: &str) -> bool {
        self.catalogue().key_of(id).is_some()
    }

    /// Every item's id and vector, grouped by label (Calibrate's sample space).
    pub fn labelled_vectors(&self) -> Result<LabelGroups> {
        let mut by_label = LabelGroups::new();
        for rec in self.items.scan(true) {
            let (_, item) = rec?;
            by_label
                .entry(item.label)
                .or_default()
                .push((item.id, item.vector));
        }
        Ok(by_label)
    }

    // The read view the miner builds on.

    /// The catalogue, read-locked: ids, labels, the label index, metadata per key, and
    /// the generation (store sequence number) it reflects. Hold it briefly: writers
    /// publish through it.
    pub fn catalogue(&self) -> RwLockReadGuard<'_, Catalogue> {
        self.catalogue.read().expect("catalogue lock")
    }

    /// The store's mutation counter as of the last write visible to reads.
    pub fn generation(&self) -> u64 {
        self.catalogue().seq()
    }

    /// The vector under an ANN key: one lookup in the index when it keeps exact f32
    /// vectors, else the store (key -> id -> record). None when the key is gone.
    pub fn vector(&self, key: u64) -> Result<Option<Vec<f32>>> {
        if let Some(v) = self.index.vector(key) {
            return Ok(Some(v));
        }
        let Some(id) = self.catalogue().get(key).map(|e| e.id.clone()) else {
            return Ok(None);
        };
        Ok(self
            .items
            .get(&id, true)?
            .filter(|(k, _)| *k == key)
            .map(|(_, it)| it.vector))
    }

    /// The label of an ANN key.
    pub fn label_of(&self, key: u64) -> Option<LabelId> {
        self.catalogue().get(key).map(|e| e.label)
    }

    // Audits.

    /// Compares the index with the store, key by key: what a crash test needs to see
    /// that no acknowledged write lost its index entry.
    pub fn audit_index(&self) -> Result<IndexAudit> {
        let _w = self.writer.lock().expect("writer lock");
        let mut stored = 0;
        let mut missing = Vec::new();
        for rec in self.items.scan(false) {
            let (key, _) = rec?;
            stored += 1;
            if !self.index.contains(key) {
                missing.push(key);
            }
        }
        Ok(IndexAudit {
            stored,
            indexed: self.index.len(),
            missing,
        })
    }

    /// Removes a key from the index behind the store's back. For tests that prove an
    /// audit can see a lost index entry; never called by the daemon.
    #[doc(hidden)]
    pub fn forget_in_index(&self, id: &str) -> Result<bool> {
        let Some(key) = self.catalogue().key_of(id) else {
            return Ok(false);
        };
        self.index.remove_many(&[key])?;
        Ok(true)
    }

    /// Vectors held by the ANN index (equals `len` when store and index agree).
    pub fn index_len(&self) -> usize {
        self.index.len()
    }

    pub fn index_memory_bytes(&self) -> usize {
        self.index.memory_bytes()
    }

    /// Saves the index snapshot with the store state it reflects.
    pub(super) fn save_snapshot(&self, dir: &Path) -> Result<()> {
        let w = self.lock_writer()?;
        // Batches written before the lock may still be inserting into the index.
        self.turns.wait_all(w.next_ticket);
        let catalogue = self.catalogue().encode();
        let meta = snapshot::SnapshotMeta {
            uid: self.spec.uid,
            seq: w.state.seq,
            count: self.len(),
            catalogue: true,
        };
        snapshot::save(dir, &self.spec.name, &self.index, &catalogue, meta)
    }

    /// Records a new spec-level decision (Calibrate) once it is durable.
    pub(super) fn set_decision(&self, d: Decision) {
        *self.decision.write().expect("decision lock") = d;
    }

    /// How many items have a stored input (a scan of the store).
    pub fn stored_input_count(&self) -> usize {
        self.items.input_count()
    }

    /// Whether a new generation replaced this collection (see [`super::generation`]).
    pub fn superseded(&self) -> bool {
        self.superseded.load(Ordering::Acquire)
    }

    pub(super) fn active(&self) -> bool {
        !self.writer.lock().expect("writer lock").dropped
    }

    pub(super) fn count_fallback(&self) {
        self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn count_expanded(&self) {
        self.stats.expanded.fetch_add(1, Ordering::Relaxed);
    }
}
