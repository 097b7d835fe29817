//! The index snapshot format: `<name>.usearch` (usearch's own file),
//! `<name>.catalogue` (the collection's catalogue: ids, labels and metadata per ANN key,
//! so that a clean restart reads one small file instead of scanning the store), and
//! `<name>.snapshot.json` ([`SnapshotMeta`]: the collection's uid, the store's mutation
//! counter the files reflect, and the item count), and `<name>.stash`, when the index
//! has keys that search reaches only through its stash (see [`super::reach`]): their
//! ANN keys as JSON. Without it a clean restart would lose them to search again.
//!
//! The trust rule: a snapshot is loaded only when uid, counter and count all match the
//! store; otherwise the index is rebuilt from the store, which is the truth. A save
//! removes the old meta first and writes the new one last (each via a rename), so a
//! crash in between leaves no meta, hence no snapshot to trust.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::AnnIndex;
use crate::error::Result;
use crate::types::CollectionSpec;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub uid: u64,
    pub seq: u64,
    pub count: usize,
    /// Whether a catalogue file was saved with the index (older snapshots have none).
    #[serde(default)]
    pub catalogue: bool,
}

/// The index, meta and catalogue files of collection `name` under `dir`.
pub fn paths(dir: &Path, name: &str) -> [PathBuf; 3] {
    [
        dir.join(format!("{name}.usearch")),
        dir.join(format!("{name}.snapshot.json")),
        dir.join(format!("{name}.catalogue")),
    ]
}

/// The stash file of collection `name` under `dir`.
fn stash_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.stash"))
}

/// Writes `index` and the encoded `catalogue` with `meta` (callers hold the collection's
/// writer, so nothing changes meanwhile). An index still mapped from the snapshot it was
/// loaded from has not changed since: its file stays as it is.
pub fn save(
    dir: &Path,
    name: &str,
    index: &AnnIndex,
    catalogue: &[u8],
    meta: SnapshotMeta,
) -> Result<()> {
    let [index_path, meta_path, catalogue_path] = paths(dir, name);
    remove_if_present(&meta_path)?;
    if !index.is_view() {
        let tmp = index_path.with_extension("usearch.tmp");
        index.save(&tmp)?;
        std::fs::rename(&tmp, &index_path)?;
    }
    let tmp = catalogue_path.with_extension("catalogue.tmp");
    std::fs::write(&tmp, catalogue)?;
    std::fs::rename(&tmp, &catalogue_path)?;
    let stashed = index.stashed_keys();
    let stash = stash_path(dir, name);
    if stashed.is_empty() {
        remove_if_present(&stash)?;
    } else {
        let tmp = stash.with_extension("stash.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&stashed).expect("keys serialise"))?;
        std::fs::rename(&tmp, &stash)?;
    }
    let tmp = meta_path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&meta).expect("meta serialises"))?;
    std::fs::rename(&tmp, &meta_path)?;
    Ok(())
}

/// The snapshot's meta, when there is one that belongs to this collection and was saved
/// at exactly the store's mutation counter `seq`.
pub fn current_meta(spec: &CollectionSpec, dir: &Path, seq: u64) -> Option<SnapshotMeta> {
    let [_, meta_path, _] = paths(dir, &spec.name);
    let meta: SnapshotMeta = serde_json::from_slice(&std::fs::read(&meta_path).ok()?).ok()?;
    if meta.uid != spec.uid || meta.seq != seq {
        tracing::info!(collection = %spec.name, snapshot_seq = meta.seq, store_seq = seq, "index snapshot is stale; rebuilding");
        return None;
    }
    Some(meta)
}

/// The catalogue file saved with a current snapshot.
pub fn load_catalogue(spec: &CollectionSpec, dir: &Path, meta: &SnapshotMeta) -> Option<Vec<u8>> {
    if !meta.catalogue {
        return None;
    }
    let [_, _, catalogue_path] = paths(dir, &spec.name);
    std::fs::read(catalogue_path).ok()
}

/// The snapshot's index, when it was saved at exactly the store's state (`seq`, and
/// `count` items); else None (rebuild). The file is memory-mapped: searches read it in
/// place, and the first write loads a private copy ([`AnnIndex::view`]).
pub fn load(spec: &CollectionSpec, dir: &Path, seq: u64, count: usize) -> Option<AnnIndex> {
    let [index_path, _, _] = paths(dir, &spec.name);
    let meta = current_meta(spec, dir, seq)?;
    if meta.count != count {
        tracing::info!(collection = %spec.name, snapshot = meta.count, store = count, "index snapshot count differs; rebuilding");
        return None;
    }
    match AnnIndex::view(spec, &index_path) {
        Ok(index) if index.len() == count => {
            restore_stash(spec, dir, &index)?;
            Some(index)
        }
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

/// Stashes the keys of the snapshot's stash file again, if it has one. None (rebuild,
/// which sweeps) when the file is unreadable.
fn restore_stash(spec: &CollectionSpec, dir: &Path, index: &AnnIndex) -> Option<()> {
    let bytes = match std::fs::read(stash_path(dir, &spec.name)) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some(()),
        Err(e) => {
            tracing::warn!(collection = %spec.name, error = %e, "index stash unreadable; rebuilding");
            return None;
        }
    };
    let restored = serde_json::from_slice::<Vec<u64>>(&bytes)
        .map_err(|e| e.to_string())
        .and_then(|keys| index.restore_stash(&keys).map_err(|e| e.to_string()));
    match restored {
        Ok(()) => Some(()),
        Err(e) => {
            tracing::warn!(collection = %spec.name, error = %e, "index stash unreadable; rebuilding");
            None
        }
    }
}

/// Removes a collection's snapshot files.
pub fn remove(dir: &Path, name: &str) -> Result<()> {
    for path in paths(dir, name) {
        remove_if_present(&path)?;
    }
    remove_if_present(&stash_path(dir, name))
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}
