//! Backups: a fresh sled database holding the collection specs and a copy of each
//! collection's tree, beside a manifest (`manifest.json`) with each collection's item
//! count, mutation counter and a checksum of its records. Restore copies the database
//! into an empty data dir and checks it against the manifest; the index is rebuilt from
//! the store when the daemon first starts on it (the store is the truth).
//!
//! Which state of each collection goes into the backup is the registry's business (it
//! holds the collection's writer lock while [`BackupWriter::add`] runs); this module
//! only copies and checks.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{ITEM, ItemsTree};

/// The tree a collection's records go to in a backup: always `c/<name>` (the spec is
/// written with no tree of its own, whatever generation the live one is).
fn tree_name(name: &str) -> Vec<u8> {
    [b"c/", name.as_bytes()].concat()
}
use crate::error::{Error, Result};
use crate::types::CollectionSpec;

/// The manifest's file name in a backup directory.
pub const MANIFEST: &str = "manifest.json";
const FORMAT: u32 = 1;

/// What a backup holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: u32,
    /// Seconds since the Unix epoch when the backup finished.
    pub created_unix: u64,
    pub collections: Vec<CollectionEntry>,
}

/// One collection in a backup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CollectionEntry {
    pub name: String,
    pub items: u64,
    /// The store's mutation counter the copy was taken at.
    pub seq: u64,
    /// Every record of the collection's tree, in key order: FNV-1a 64 over
    /// length-prefixed keys and values, in hex.
    pub checksum: String,
}

/// FNV-1a 64 over length-prefixed records: detects a lost, changed or reordered record.
#[derive(Clone, Copy)]
struct Checksum(u64);

impl Checksum {
    fn new() -> Self {
        Checksum(0xcbf2_9ce4_8422_2325)
    }

    fn bytes(&mut self, b: &[u8]) {
        for &x in (b.len() as u64).to_le_bytes().iter().chain(b) {
            self.0 ^= u64::from(x);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn hex(self) -> String {
        format!("{:016x}", self.0)
    }
}

/// A backup being written; removed from disk unless [`BackupWriter::finish`] succeeds.
pub struct BackupWriter {
    dir: PathBuf,
    /// Whether `dir` was created here (else it was an empty directory, left in place).
    created: bool,
    db: Option<sled::Db>,
    entries: Vec<CollectionEntry>,
    done: bool,
}

/// A directory a backup or a restore may write into: absent, or an empty directory.
pub fn check_target(dir: &Path, field: &'static str) -> Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                Err(Error::FailedPrecondition(format!(
                    "{field} {}: exists and is not empty; give a new or empty directory",
                    dir.display()
                )))
            } else {
                Ok(false)
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => Err(Error::FailedPrecondition(
            format!("{field} {}: exists and is not a directory", dir.display()),
        )),
        Err(e) => Err(Error::invalid(field, format!("{}: {e}", dir.display()))),
    }
}

/// A full disk while writing a backup is the caller's to fix (free space, another
/// path), not the daemon's failure; the store itself is not involved.
fn backup_error(dir: &Path, e: Error) -> Error {
    let full = |io: &std::io::Error| {
        io.kind() == std::io::ErrorKind::StorageFull || io.to_string().contains("No space left")
    };
    match &e {
        Error::Io(io) if full(io) => {}
        Error::StorageIo(io) if full(io) => {}
        _ => return e,
    }
    Error::ResourceExhausted(format!(
        "backup to {}: no space left on device; the partial backup was removed",
        dir.display()
    ))
}

impl BackupWriter {
    /// Starts a backup in `dir`, which must be absent or an empty directory.
    pub fn create(dir: &Path) -> Result<Self> {
        let created = check_target(dir, "path")?;
        std::fs::create_dir_all(dir)?;
        let mut w = BackupWriter {
            dir: dir.to_path_buf(),
            created,
            db: None,
            entries: Vec::new(),
            done: false,
        };
        let db = sled::Config::new()
            .path(dir.join("store"))
            .cache_capacity(16 << 20)
            .open()
            .map_err(|e| backup_error(dir, e.into()))?;
        w.db = Some(db);
        Ok(w)
    }

    /// Copies one collection: its spec and every record of its tree. The caller keeps
    /// the collection's writers out meanwhile, so the copy is one state of it.
    pub fn add(&mut self, spec: &CollectionSpec, items: &ItemsTree, seq: u64) -> Result<u64> {
        let dir = self.dir.clone();
        self.add_inner(spec, items, seq)
            .map_err(|e| backup_error(&dir, e))
    }

    fn add_inner(&mut self, spec: &CollectionSpec, items: &ItemsTree, seq: u64) -> Result<u64> {
        let db = self.db.as_ref().expect("open until finish");
        let spec = CollectionSpec {
            tree: String::new(),
            ..spec.clone()
        };
        let json = serde_json::to_vec(&spec).expect("spec serialises");
        db.open_tree("collections")?
            .insert(spec.name.as_bytes(), json)?;
        let tree = db.open_tree(tree_name(&spec.name))?;
        let mut sum = Checksum::new();
        let mut count = 0u64;
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        for rec in items.records() {
            let (k, v) = rec?;
            sum.bytes(&k);
            sum.bytes(&v);
            if k.first() == Some(&ITEM) {
                count += 1;
            }
            batch.insert(k, v);
            in_batch += 1;
            if in_batch == 4096 {
                tree.apply_batch(std::mem::take(&mut batch))?;
                in_batch = 0;
            }
        }
        tree.apply_batch(batch)?;
        self.entries.push(CollectionEntry {
            name: spec.name.clone(),
            items: count,
            seq,
            checksum: sum.hex(),
        });
        Ok(count)
    }

    /// Flushes the copy, closes it and writes the manifest (synced). Returns the
    /// manifest and the backup's size in bytes.
    pub fn finish(mut self) -> Result<(Manifest, u64)> {
        let dir = self.dir.clone();
        let r = self.finish_inner().map_err(|e| backup_error(&dir, e));
        if r.is_ok() {
            self.done = true;
        }
        r
    }

    fn finish_inner(&mut self) -> Result<(Manifest, u64)> {
        let db = self.db.take().expect("open until finish");
        db.flush()?;
        drop(db);
        let manifest = Manifest {
            format: FORMAT,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            collections: std::mem::take(&mut self.entries),
        };
        write_synced(
            &self.dir.join(MANIFEST),
            &serde_json::to_vec_pretty(&manifest).expect("manifest serialises"),
        )?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok((manifest, dir_size(&self.dir)?))
    }
}

impl Drop for BackupWriter {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        drop(self.db.take());
        // A failed or abandoned backup leaves nothing that could pass for one.
        let removed = if self.created {
            std::fs::remove_dir_all(&self.dir)
        } else {
            std::fs::read_dir(&self.dir).and_then(|entries| {
                for e in entries {
                    let p = e?.path();
                    if p.is_dir() {
                        std::fs::remove_dir_all(&p)?;
                    } else {
                        std::fs::remove_file(&p)?;
                    }
                }
                Ok(())
            })
        };
        if let Err(e) = removed {
            tracing::error!(path = %self.dir.display(), error = %e, "could not remove a partial backup");
        }
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let meta = e.metadata()?;
        total += if meta.is_dir() {
            dir_size(&e.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
            std::fs::File::open(&target)?.sync_all()?;
        }
    }
    std::fs::File::open(to)?.sync_all()?;
    Ok(())
}

/// Reads a backup's manifest.
pub fn read_manifest(from: &Path) -> Result<Manifest> {
    let path = from.join(MANIFEST);
    let bytes = std::fs::read(&path).map_err(|e| {
        Error::FailedPrecondition(format!(
            "{}: {e}; not a likeness backup (or an unfinished one)",
            path.display()
        ))
    })?;
    let m: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))?;
    if m.format != FORMAT {
        return Err(Error::FailedPrecondition(format!(
            "{}: backup format {} (this likeness reads {FORMAT})",
            path.display(),
            m.format
        )));
    }
    Ok(m)
}

/// Restores the backup in `from` into `data_dir` (absent or empty), offline, and checks
/// every collection against the manifest. On any failure nothing is left in `data_dir`.
pub fn restore(from: &Path, data_dir: &Path) -> Result<Manifest> {
    let manifest = read_manifest(from)?;
    let created = check_target(data_dir, "data_dir")?;
    let store = data_dir.join("store");
    let result = (|| {
        copy_dir(&from.join("store"), &store)?;
        verify(&store, &manifest)
    })();
    if let Err(e) = result {
        let _ = if created {
            std::fs::remove_dir_all(data_dir)
        } else {
            std::fs::remove_dir_all(&store)
        };
        return Err(e);
    }
    Ok(manifest)
}

/// Checks a store against a manifest: the same collections, each with the same item
/// count and record checksum.
fn verify(store: &Path, manifest: &Manifest) -> Result<()> {
    let db = sled::Config::new().path(store).open()?;
    let specs = db.open_tree("collections")?;
    let names: Vec<String> = specs
        .iter()
        .keys()
        .map(|k| Ok(String::from_utf8_lossy(&k?).into_owned()))
        .collect::<Result<_>>()?;
    let listed: Vec<&str> = manifest
        .collections
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    if names != listed {
        return Err(Error::Corrupt(format!(
            "the backup's store holds collections {names:?}, its manifest lists {listed:?}"
        )));
    }
    for entry in &manifest.collections {
        let tree = db.open_tree(tree_name(&entry.name))?;
        let mut sum = Checksum::new();
        let mut items = 0;
        for kv in tree.iter() {
            let (k, v) = kv?;
            sum.bytes(&k);
            sum.bytes(&v);
            if k.first() == Some(&ITEM) {
                items += 1;
            }
        }
        if items != entry.items || sum.hex() != entry.checksum {
            return Err(Error::Corrupt(format!(
                "collection {:?} in the backup: {items} items, checksum {} (manifest: {} items, checksum {})",
                entry.name,
                sum.hex(),
                entry.items,
                entry.checksum
            )));
        }
    }
    db.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_sees_order_and_boundaries() {
        let of = |parts: &[&[u8]]| {
            let mut c = Checksum::new();
            for p in parts {
                c.bytes(p);
            }
            c.hex()
        };
        assert_ne!(of(&[b"ab", b"c"]), of(&[b"a", b"bc"]));
        assert_ne!(of(&[b"a", b"b"]), of(&[b"b", b"a"]));
        assert_eq!(of(&[b"a", b"b"]), of(&[b"a", b"b"]));
    }
}
