//! Durable state in sled: collection specs, items, and the key bookkeeping that lets the
//! ANN index be rebuilt exactly from the store.
//!
//! Layout: tree `collections` maps a name to its [`CollectionSpec`] (JSON). Each
//! collection has a tree `c/<name>` holding
//! - `i<id>`      -> item record (ANN key, label, metadata, f32 vector), see [`codec`];
//! - `k<key: u64 BE>` -> id, so ANN keys map back to ids in key order;
//! - `r<id>`      -> the raw input the vector was embedded from (when kept);
//! - `s`          -> [`TreeState`]: a mutation counter and the next ANN key.
//!
//! A collection's tree is `c/<name>` unless its spec names another
//! ([`CollectionSpec::tree_name`]). Tree `shadows` maps a name to the [`ShadowRecord`] of
//! a new generation being built by Activate, in a tree of its own; the switch replaces
//! the spec and removes the record in one transaction.
//!
//! Every mutation of a collection is one sled batch (atomic), and bumps the counter: an
//! index snapshot is trusted only when it was saved at the counter the store has now.

pub mod backup;
pub mod codec;
pub mod commit;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, Weak};

use crate::error::{Error, Result};
use crate::types::{CollectionSpec, ItemData};
use commit::GroupCommit;

const ITEM: u8 = b'i';
const INPUT: u8 = b'r';
const KEY: u8 = b'k';
const STATE: &[u8] = b"s";

/// The whole store: one sled database.
///
/// When a write or a flush fails with an I/O error (a full disk, most often), sled keeps
/// that error and fails every later write until the database is opened again, even once
/// space is back; reads of the open database go on. So the store marks itself failed:
/// writes are refused at once with [`Error::StorageUnavailable`], reads go on, and
/// [`Store::reopen`] (which the registry's storage probe calls once the data dir takes a
/// write again) swaps every handle for a freshly opened database, which holds exactly
/// what reached the disk.
pub struct Store {
    shared: Arc<Shared>,
    commit: GroupCommit,
}

struct Shared {
    data_dir: PathBuf,
    cache_bytes: u64,
    /// None only while [`Store::reopen`] found no database to open.
    open: RwLock<Option<Open>>,
    /// Every collection tree handed out, so that a reopen can swap them all.
    slots: Mutex<Vec<Weak<Slot>>>,
    /// Cleared by the first failed write, set again by a successful reopen.
    writable: AtomicBool,
    /// Why writes fail, while they do.
    failure: Mutex<String>,
    failures: AtomicU64,
    /// Test-only: flushes fail with ENOSPC while set (see [`Store::inject_fault`]).
    fault: AtomicBool,
}

struct Open {
    db: sled::Db,
    specs: sled::Tree,
    shadows: sled::Tree,
}

/// A generation Activate is building for collection `spec.name`: its spec (model,
/// version and tree of its own) and how far the re-embedding got.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShadowRecord {
    pub spec: CollectionSpec,
    /// The source's items under ANN keys below this one have been re-embedded.
    pub cursor: u64,
    /// Items re-embedded so far.
    pub done: u64,
    /// Items the source held when the run started.
    pub total: u64,
}

/// One collection tree; replaced in place by a reopen.
struct Slot {
    name: Vec<u8>,
    tree: RwLock<Option<sled::Tree>>,
}

fn open_db(path: &Path, cache_bytes: u64) -> Result<Open> {
    let config = sled::Config::new().path(path).cache_capacity(cache_bytes);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let db = loop {
        match config.open() {
            Ok(db) => break db,
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                tracing::warn!(error = %e, "store is locked; retrying");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => return Err(e.into()),
        }
    };
    let specs = db.open_tree("collections")?;
    let shadows = db.open_tree("shadows")?;
    Ok(Open { db, specs, shadows })
}

impl Shared {
    fn unavailable(&self) -> Error {
        let reason = self.failure.lock().expect("failure lock").clone();
        Error::StorageUnavailable(if reason.is_empty() {
            "the store is being reopened".into()
        } else {
            reason
        })
    }

    /// Refuses a write at once while storage is failing.
    fn check_writable(&self) -> Result<()> {
        if self.writable.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(self.unavailable())
        }
    }

    /// The error of any sled call on the live database, a read too: sled's reads finish
    /// splits and merges left half done, which write, so after a failed write they give
    /// back its stored I/O error. An I/O error marks the store failed.
    fn sled_failed(&self, e: sled::Error) -> Error {
        match e {
            sled::Error::Io(io) => self.fail(&io),
            other => other.into(),
        }
    }

    fn fail(&self, io: &std::io::Error) -> Error {
        // sled wraps the OS error in one of its own; say it plainly.
        let reason = if io.kind() == std::io::ErrorKind::StorageFull
            || io.to_string().contains("No space left")
        {
            "No space left on device; writes resume when the data dir has space".to_string()
        } else {
            format!("{io}; writes resume once the data dir takes writes again")
        };
        {
            let mut failure = self.failure.lock().expect("failure lock");
            if self.writable.swap(false, Ordering::AcqRel) {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %io, data_dir = %self.data_dir.display(), "storage failed; refusing writes until it recovers, reads go on");
                *failure = reason;
            }
        }
        self.unavailable()
    }

    fn flush(&self) -> Result<()> {
        self.check_writable()?;
        if self.fault.load(Ordering::Relaxed) {
            return Err(self.fail(&std::io::Error::from_raw_os_error(28)));
        }
        let open = self.open.read().expect("store lock");
        let open = open.as_ref().ok_or_else(|| self.unavailable())?;
        open.db.flush().map_err(|e| self.sled_failed(e))?;
        Ok(())
    }

    fn open(&self) -> Result<RwLockReadGuard<'_, Option<Open>>> {
        let open = self.open.read().expect("store lock");
        if open.is_none() {
            return Err(self.unavailable());
        }
        Ok(open)
    }
}

impl Store {
    /// Opens (or creates) the store. sled holds an exclusive file lock; a predecessor
    /// that is still exiting (a restart, a rolling update) releases it within moments,
    /// so a locked store is retried for up to 10 s before giving up.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self> {
        let open = open_db(&dir.join("store"), cache_bytes)?;
        let shared = Arc::new(Shared {
            data_dir: dir.to_path_buf(),
            cache_bytes,
            open: RwLock::new(Some(open)),
            slots: Mutex::new(Vec::new()),
            writable: AtomicBool::new(true),
            failure: Mutex::new(String::new()),
            failures: AtomicU64::new(0),
            fault: AtomicBool::new(false),
        });
        let commit = {
            let shared = shared.clone();
            GroupCommit::with_flush(Box::new(move || shared.flush()))
        };
        Ok(Store { shared, commit })
    }

    /// Every collection spec, in name order.
    pub fn specs(&self) -> Result<Vec<CollectionSpec>> {
        let open = self.shared.open()?;
        let open = open.as_ref().expect("checked");
        open.specs
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(|e| self.shared.sled_failed(e))?;
                serde_json::from_slice(&v).map_err(|e| {
                    Error::Corrupt(format!("collection {}: {e}", String::from_utf8_lossy(&k)))
                })
            })
            .collect()
    }

    /// Writes a spec durably.
    pub fn put_spec(&self, spec: &CollectionSpec) -> Result<()> {
        self.shared.check_writable()?;
        let json = serde_json::to_vec(spec).expect("spec serialises");
        {
            let open = self.shared.open()?;
            let open = open.as_ref().expect("checked");
            open.specs
                .insert(spec.name.as_bytes(), json)
                .map_err(|e| self.shared.sled_failed(e))?;
        }
        self.commit()
    }

    /// Removes a spec and the collection's items (and a generation being built for it),
    /// durably.
    pub fn remove_collection(&self, spec: &CollectionSpec) -> Result<()> {
        self.shared.check_writable()?;
        let shadow = {
            let open = self.shared.open()?;
            let open = open.as_ref().expect("checked");
            open.specs
                .remove(spec.name.as_bytes())
                .map_err(|e| self.shared.sled_failed(e))?;
            take_shadow(open, &spec.name).map_err(|e| self.shared.sled_failed(e))?
        };
        self.commit()?;
        self.drop_tree(&spec.tree_name())?;
        if let Some(shadow) = shadow {
            self.drop_tree(&shadow.spec.tree_name())?;
        }
        Ok(())
    }

    /// Drops item trees that no spec or shadow names (a crash between the steps of a
    /// delete or of a switch).
    pub fn drop_orphans(&self, live: &[CollectionSpec]) -> Result<usize> {
        let mut trees: Vec<String> = live.iter().map(CollectionSpec::tree_name).collect();
        trees.extend(self.shadows()?.iter().map(|s| s.spec.tree_name()));
        let open = self.shared.open()?;
        let db = &open.as_ref().expect("checked").db;
        let mut dropped = 0;
        for name in db.tree_names() {
            if name.starts_with(b"c/") && !trees.iter().any(|t| t.as_bytes() == &name[..]) {
                db.drop_tree(&name)
                    .map_err(|e| self.shared.sled_failed(e))?;
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    /// The items tree a spec names.
    pub fn items(&self, spec: &CollectionSpec) -> Result<ItemsTree> {
        let open = self.shared.open()?;
        let name = spec.tree_name().into_bytes();
        let tree = open
            .as_ref()
            .expect("checked")
            .db
            .open_tree(&name)
            .map_err(|e| self.shared.sled_failed(e))?;
        let slot = Arc::new(Slot {
            name,
            tree: RwLock::new(Some(tree)),
        });
        let mut slots = self.shared.slots.lock().expect("slots lock");
        slots.retain(|s| s.strong_count() > 0);
        slots.push(Arc::downgrade(&slot));
        Ok(ItemsTree {
            slot,
            shared: self.shared.clone(),
        })
    }

    /// Every generation being built, in name order.
    pub fn shadows(&self) -> Result<Vec<ShadowRecord>> {
        let open = self.shared.open()?;
        let open = open.as_ref().expect("checked");
        open.shadows
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(|e| self.shared.sled_failed(e))?;
                serde_json::from_slice(&v).map_err(|e| {
                    Error::Corrupt(format!("shadow {}: {e}", String::from_utf8_lossy(&k)))
                })
            })
            .collect()
    }

    /// Writes a shadow record (not yet durable: [`Store::commit`]).
    pub fn put_shadow(&self, record: &ShadowRecord) -> Result<()> {
        self.shared.check_writable()?;
        let json = serde_json::to_vec(record).expect("shadow serialises");
        let open = self.shared.open()?;
        open.as_ref()
            .expect("checked")
            .shadows
            .insert(record.spec.name.as_bytes(), json)
            .map_err(|e| self.shared.sled_failed(e))?;
        Ok(())
    }

    /// Removes and returns a shadow record (not yet durable).
    pub fn take_shadow(&self, name: &str) -> Result<Option<ShadowRecord>> {
        self.shared.check_writable()?;
        let open = self.shared.open()?;
        take_shadow(open.as_ref().expect("checked"), name).map_err(|e| self.shared.sled_failed(e))
    }

    /// The switch: `spec` becomes the collection's spec and its shadow record goes, in
    /// one transaction; durable on return.
    pub fn switch_to(&self, spec: &CollectionSpec) -> Result<()> {
        use sled::Transactional;
        self.shared.check_writable()?;
        let json = serde_json::to_vec(spec).expect("spec serialises");
        let name = spec.name.as_bytes();
        {
            let open = self.shared.open()?;
            let open = open.as_ref().expect("checked");
            (&open.specs, &open.shadows)
                .transaction(|(specs, shadows)| {
                    specs.insert(name, json.clone())?;
                    shadows.remove(name)?;
                    Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
                })
                .map_err(|e| match e {
                    sled::transaction::TransactionError::Storage(e) => self.shared.sled_failed(e),
                    sled::transaction::TransactionError::Abort(()) => {
                        Error::Worker("switch transaction aborted".into())
                    }
                })?;
        }
        self.commit()
    }

    /// Drops a tree that nothing names any more (the old generation after a switch, or
    /// a shadow given up). Durable on return.
    pub fn drop_tree(&self, tree: &str) -> Result<()> {
        self.shared.check_writable()?;
        {
            let open = self.shared.open()?;
            open.as_ref()
                .expect("checked")
                .db
                .drop_tree(tree.as_bytes())
                .map_err(|e| self.shared.sled_failed(e))?;
        }
        self.commit()
    }

    /// Returns once every write made before the call is on disk (group commit).
    pub fn commit(&self) -> Result<()> {
        self.commit.commit()
    }

    pub fn flushes(&self) -> u64 {
        self.commit.flushes()
    }

    /// Group-commit flush latency.
    pub fn flush_latency(&self) -> &crate::metrics::Histogram {
        &self.commit.latency
    }

    pub fn flush(&self) -> Result<()> {
        self.shared.flush()
    }

    /// Whether writes are accepted (false from a failed write until a reopen).
    pub fn writable(&self) -> bool {
        self.shared.writable.load(Ordering::Acquire)
    }

    /// How many times storage has failed since the daemon started.
    pub fn failures(&self) -> u64 {
        self.shared.failures.load(Ordering::Relaxed)
    }

    /// Whether the data dir takes a write now: 1 MiB (more than a sled segment) is
    /// written, synced and removed.
    pub fn probe_space(&self) -> Result<()> {
        use std::io::Write;
        let path = self.shared.data_dir.join(".storage-probe");
        let result = (|| {
            let mut f = std::fs::File::create(&path)?;
            f.write_all(&vec![0u8; 1 << 20])?;
            f.sync_all()
        })();
        let _ = std::fs::remove_file(&path);
        Ok(result?)
    }

    /// Drops every handle on the failed database and opens it again: sled clears its
    /// stored error only when it opens, and what it then holds is what reached the disk.
    /// The caller must keep writers out meanwhile, then bring the in-memory state (index,
    /// catalogue) in line with the store, then call [`Store::resume_writes`].
    pub fn reopen(&self) -> Result<()> {
        let mut open = self.shared.open.write().expect("store lock");
        let slots: Vec<Arc<Slot>> = self
            .shared
            .slots
            .lock()
            .expect("slots lock")
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        // Readers wait on these locks while the database is reopened.
        let mut trees: Vec<_> = slots
            .iter()
            .map(|s| s.tree.write().expect("tree lock"))
            .collect();
        for t in &mut trees {
            **t = None;
        }
        *open = None;
        let fresh = open_db(&self.shared.data_dir.join("store"), self.shared.cache_bytes)?;
        for (slot, t) in slots.iter().zip(&mut trees) {
            **t = Some(fresh.db.open_tree(&slot.name)?);
        }
        *open = Some(fresh);
        Ok(())
    }

    /// Accepts writes again (after a [`Store::reopen`] and the caller's resync).
    pub fn resume_writes(&self) {
        let mut failure = self.shared.failure.lock().expect("failure lock");
        failure.clear();
        self.shared.writable.store(true, Ordering::Release);
        tracing::info!("storage recovered; writes resume");
    }

    /// Test-only fault injection: while set, every flush fails with ENOSPC, as sled's
    /// does on a full disk (the batch stays in sled's memory, unflushed). Clearing it is
    /// "space returns": the storage probe then reopens the store.
    #[doc(hidden)]
    pub fn inject_fault(&self, on: bool) {
        self.shared.fault.store(on, Ordering::Relaxed);
    }

    pub(crate) fn fault_injected(&self) -> bool {
        self.shared.fault.load(Ordering::Relaxed)
    }
}

/// Removes and returns a shadow record from an open database.
fn take_shadow(open: &Open, name: &str) -> std::result::Result<Option<ShadowRecord>, sled::Error> {
    match open.shadows.remove(name.as_bytes())? {
        None => Ok(None),
        Some(v) => Ok(serde_json::from_slice(&v).ok()),
    }
}

/// The per-collection counters persisted with every mutation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TreeState {
    /// Bumped by every mutation batch.
    pub seq: u64,
    /// The next ANN key to hand out; keys are never reused.
    pub next_key: u64,
}

/// One collection's items.
#[derive(Clone)]
pub struct ItemsTree {
    slot: Arc<Slot>,
    shared: Arc<Shared>,
}

/// One mutation batch, applied atomically.
#[derive(Default)]
pub struct Mutation {
    batch: sled::Batch,
}

impl Mutation {
    pub fn put(&mut self, key: u64, item: &ItemData) {
        self.batch
            .insert(item_key(&item.id), codec::encode_item(key, item));
        match &item.input {
            Some(raw) => self.batch.insert(input_key(&item.id), raw.clone()),
            None => self.batch.remove(input_key(&item.id)),
        }
        self.batch
            .insert(&ann_key(key)[..], item.id.as_bytes().to_vec());
    }

    /// As [`Mutation::put`], but the input stored for the id (if any) stays.
    pub fn put_keeping_input(&mut self, key: u64, item: &ItemData) {
        self.batch
            .insert(item_key(&item.id), codec::encode_item(key, item));
        self.batch
            .insert(&ann_key(key)[..], item.id.as_bytes().to_vec());
    }

    /// Removes the ANN key of an item (its id record is replaced or removed separately).
    pub fn drop_key(&mut self, key: u64) {
        self.batch.remove(&ann_key(key)[..]);
    }

    pub fn remove(&mut self, id: &str, key: u64) {
        self.batch.remove(item_key(id));
        self.batch.remove(input_key(id));
        self.drop_key(key);
    }
}

impl ItemsTree {
    /// Runs `f` on the tree; UNAVAILABLE while a reopen found no database.
    fn with<T>(&self, f: impl FnOnce(&sled::Tree) -> Result<T>) -> Result<T> {
        let tree = self.slot.tree.read().expect("tree lock");
        match tree.as_ref() {
            Some(t) => f(t),
            None => Err(self.shared.unavailable()),
        }
    }

    /// A sled error of this tree, mapped as every live-store error is.
    fn sled_err(&self, e: sled::Error) -> Error {
        self.shared.sled_failed(e)
    }

    /// A handle for an iteration (the slot's lock is not held across it).
    fn handle(&self) -> Result<sled::Tree> {
        self.with(|t| Ok(t.clone()))
    }

    pub fn state(&self) -> Result<TreeState> {
        match self.with(|t| t.get(STATE).map_err(|e| self.sled_err(e)))? {
            None => Ok(TreeState::default()),
            Some(v) if v.len() == 16 => Ok(TreeState {
                seq: u64::from_le_bytes(v[..8].try_into().expect("8 bytes")),
                next_key: u64::from_le_bytes(v[8..].try_into().expect("8 bytes")),
            }),
            Some(_) => Err(Error::Corrupt("collection state record".into())),
        }
    }

    /// Applies a batch together with the new state, atomically. Not yet durable: call
    /// [`Store::commit`]. Refused at once while storage is failing.
    pub fn apply(&self, mut m: Mutation, state: TreeState) -> Result<()> {
        self.shared.check_writable()?;
        let mut v = Vec::with_capacity(16);
        v.extend_from_slice(&state.seq.to_le_bytes());
        v.extend_from_slice(&state.next_key.to_le_bytes());
        m.batch.insert(STATE, v);
        self.with(|t| {
            t.apply_batch(m.batch)
                .map_err(|e| self.shared.sled_failed(e))
        })
    }

    /// Refuses a write at once while storage is failing (before it reads anything: a
    /// read of a failed database can give back the failure too).
    pub fn check_writable(&self) -> Result<()> {
        self.shared.check_writable()
    }

    /// Whether the store accepts writes (see [`Store::writable`]).
    pub fn writable(&self) -> bool {
        self.shared.writable.load(Ordering::Acquire)
    }

    pub fn get(&self, id: &str, with_vector: bool) -> Result<Option<(u64, ItemData)>> {
        match self.with(|t| t.get(item_key(id)).map_err(|e| self.sled_err(e)))? {
            None => Ok(None),
            Some(v) => codec::decode_item(id, &v, with_vector).map(Some),
        }
    }

    /// The raw input stored for an item, if any.
    pub fn input(&self, id: &str) -> Result<Option<Vec<u8>>> {
        self.with(|t| {
            t.get(input_key(id))
                .map(|v| v.map(|v| v.to_vec()))
                .map_err(|e| self.sled_err(e))
        })
    }

    /// Every item with its ANN key, in id order.
    pub fn scan(&self, with_vectors: bool) -> impl Iterator<Item = Result<(u64, ItemData)>> + '_ {
        self.raw_scan(Some(ITEM)).map(move |kv| {
            let (k, v) = kv?;
            let id = std::str::from_utf8(&k[1..])
                .map_err(|_| Error::Corrupt("item id is not UTF-8".into()))?;
            codec::decode_item(id, &v, with_vectors)
        })
    }

    /// Every record of the tree (or those under a one-byte prefix), in key order.
    fn raw_scan(
        &self,
        prefix: Option<u8>,
    ) -> impl Iterator<Item = Result<(sled::IVec, sled::IVec)>> + use<> {
        let (iter, err) = match self.handle() {
            Ok(t) => (
                Some(match prefix {
                    Some(p) => t.scan_prefix([p]),
                    None => t.iter(),
                }),
                None,
            ),
            Err(e) => (None, Some(Err(e))),
        };
        let shared = self.shared.clone();
        err.into_iter().chain(
            iter.into_iter()
                .flatten()
                .map(move |kv| kv.map_err(|e| shared.sled_failed(e))),
        )
    }

    /// Every record, for a backup.
    pub(crate) fn records(&self) -> impl Iterator<Item = Result<(sled::IVec, sled::IVec)>> {
        self.raw_scan(None)
    }

    /// Up to `limit` (ANN key, id) pairs with keys from `from` on, in key order: the
    /// items written since that key was handed out, each under its latest key.
    pub fn keys_from(&self, from: u64, limit: usize) -> Result<Vec<(u64, String)>> {
        let start = ann_key(from);
        let end = [KEY + 1];
        self.with(|t| {
            t.range(&start[..]..&end[..])
                .take(limit)
                .map(|kv| {
                    let (k, v) = kv.map_err(|e| self.sled_err(e))?;
                    let key = u64::from_be_bytes(k[1..9].try_into().expect("9-byte key record"));
                    let id = String::from_utf8(v.to_vec())
                        .map_err(|_| Error::Corrupt("item id is not UTF-8".into()))?;
                    Ok((key, id))
                })
                .collect()
        })
    }

    /// How many items have a stored input.
    pub fn input_count(&self) -> usize {
        self.raw_scan(Some(INPUT)).count()
    }

    /// How many ANN key records there are (must equal the item count).
    pub fn key_count(&self) -> usize {
        self.raw_scan(Some(KEY)).count()
    }
}

fn item_key(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + id.len());
    k.push(ITEM);
    k.extend_from_slice(id.as_bytes());
    k
}

fn input_key(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + id.len());
    k.push(INPUT);
    k.extend_from_slice(id.as_bytes());
    k
}

fn ann_key(key: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = KEY;
    k[1..].copy_from_slice(&key.to_be_bytes());
    k
}
