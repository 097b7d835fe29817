//! The index snapshot format: `<name>.usearch` (usearch's own file) and
//! `<name>.snapshot.json` ([`SnapshotMeta`]: the collection's uid, the store's mutation
//! counter the index reflects, and its size).
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
}

/// The index and meta files of collection `name` under `dir`.
pub fn paths(dir: &Path, name: &str) -> [PathBuf; 2] {
    [
        dir.join(format!("{name}.usearch")),
        dir.join(format!("{name}.snapshot.json")),
    ]
}

/// Writes `index` with `meta` (callers hold the collection's writer, so nothing changes
/// meanwhile).
pub fn save(dir: &Path, name: &str, index: &AnnIndex, meta: SnapshotMeta) -> Result<()> {
    let [index_path, meta_path] = paths(dir, name);
    remove_if_present(&meta_path)?;
    let tmp = index_path.with_extension("usearch.tmp");
    index.save(&tmp)?;
    std::fs::rename(&tmp, &index_path)?;
    let tmp = meta_path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&meta).expect("meta serialises"))?;
    std::fs::rename(&tmp, &meta_path)?;
    Ok(())
}

/// The snapshot, when it was saved at exactly the store's state; else None (rebuild).
pub fn load(spec: &CollectionSpec, dir: &Path, seq: u64, count: usize) -> Option<AnnIndex> {
    let [index_path, meta_path] = paths(dir, &spec.name);
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

/// Removes a collection's snapshot files.
pub fn remove(dir: &Path, name: &str) -> Result<()> {
    for path in paths(dir, name) {
        remove_if_present(&path)?;
    }
    Ok(())
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}
