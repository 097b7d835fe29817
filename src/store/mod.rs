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

pub mod codec;
pub mod commit;

use std::path::Path;

use crate::error::{Error, Result};
use crate::types::{CollectionSpec, ItemData};
use commit::GroupCommit;

const ITEM: u8 = b'i';
const INPUT: u8 = b'r';
const KEY: u8 = b'k';
const STATE: &[u8] = b"s";

/// The whole store: one sled database.
pub struct Store {
    db: sled::Db,
    specs: sled::Tree,
    shadows: sled::Tree,
    commit: GroupCommit,
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

impl Store {
    /// Opens (or creates) the store. sled holds an exclusive file lock; a predecessor
    /// that is still exiting (a restart, a rolling update) releases it within moments,
    /// so a locked store is retried for up to 10 s before giving up.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self> {
        let config = sled::Config::new()
            .path(dir.join("store"))
            .cache_capacity(cache_bytes);
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
        let commit = GroupCommit::new(db.clone());
        Ok(Store {
            db,
            specs,
            shadows,
            commit,
        })
    }

    /// Every collection spec, in name order.
    pub fn specs(&self) -> Result<Vec<CollectionSpec>> {
        self.specs
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                serde_json::from_slice(&v).map_err(|e| {
                    Error::Corrupt(format!("collection {}: {e}", String::from_utf8_lossy(&k)))
                })
            })
            .collect()
    }

    /// Writes a spec durably.
    pub fn put_spec(&self, spec: &CollectionSpec) -> Result<()> {
        let json = serde_json::to_vec(spec).expect("spec serialises");
        self.specs.insert(spec.name.as_bytes(), json)?;
        self.commit()
    }

    /// Removes a spec and the collection's items (and a generation being built for it),
    /// durably.
    pub fn remove_collection(&self, spec: &CollectionSpec) -> Result<()> {
        self.specs.remove(spec.name.as_bytes())?;
        let shadow = self.take_shadow(&spec.name)?;
        self.commit()?;
        self.db.drop_tree(spec.tree_name())?;
        if let Some(shadow) = shadow {
            self.db.drop_tree(shadow.spec.tree_name())?;
        }
        self.commit()
    }

    /// Drops item trees that no spec or shadow names (a crash between the steps of a
    /// delete or of a switch).
    pub fn drop_orphans(&self, live: &[CollectionSpec]) -> Result<usize> {
        let mut trees: Vec<String> = live.iter().map(CollectionSpec::tree_name).collect();
        trees.extend(self.shadows()?.iter().map(|s| s.spec.tree_name()));
        let mut dropped = 0;
        for name in self.db.tree_names() {
            if name.starts_with(b"c/") && !trees.iter().any(|t| t.as_bytes() == &name[..]) {
                self.db.drop_tree(&name)?;
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    /// The items tree a spec names.
    pub fn items(&self, spec: &CollectionSpec) -> Result<ItemsTree> {
        Ok(ItemsTree {
            tree: self.db.open_tree(spec.tree_name())?,
        })
    }

    /// Every generation being built, in name order.
    pub fn shadows(&self) -> Result<Vec<ShadowRecord>> {
        self.shadows
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                serde_json::from_slice(&v).map_err(|e| {
                    Error::Corrupt(format!("shadow {}: {e}", String::from_utf8_lossy(&k)))
                })
            })
            .collect()
    }

    /// Writes a shadow record (not yet durable: [`Store::commit`]).
    pub fn put_shadow(&self, record: &ShadowRecord) -> Result<()> {
        let json = serde_json::to_vec(record).expect("shadow serialises");
        self.shadows.insert(record.spec.name.as_bytes(), json)?;
        Ok(())
    }

    /// Removes and returns a shadow record (not yet durable).
    pub fn take_shadow(&self, name: &str) -> Result<Option<ShadowRecord>> {
        match self.shadows.remove(name.as_bytes())? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| Error::Corrupt(format!("shadow {name}: {e}"))),
        }
    }

    /// The switch: `spec` becomes the collection's spec and its shadow record goes, in
    /// one transaction; durable on return.
    pub fn switch_to(&self, spec: &CollectionSpec) -> Result<()> {
        use sled::Transactional;
        let json = serde_json::to_vec(spec).expect("spec serialises");
        let name = spec.name.as_bytes();
        (&self.specs, &self.shadows)
            .transaction(|(specs, shadows)| {
                specs.insert(name, json.clone())?;
                shadows.remove(name)?;
                Ok::<(), sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                sled::transaction::TransactionError::Storage(e) => Error::Storage(e),
                sled::transaction::TransactionError::Abort(()) => {
                    Error::Worker("switch transaction aborted".into())
                }
            })?;
        self.commit()
    }

    /// Drops a tree that nothing names any more (the old generation after a switch, or
    /// a shadow given up). Durable on return.
    pub fn drop_tree(&self, tree: &str) -> Result<()> {
        self.db.drop_tree(tree.as_bytes())?;
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
        self.db.flush()?;
        Ok(())
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
    tree: sled::Tree,
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
    pub fn state(&self) -> Result<TreeState> {
        match self.tree.get(STATE)? {
            None => Ok(TreeState::default()),
            Some(v) if v.len() == 16 => Ok(TreeState {
                seq: u64::from_le_bytes(v[..8].try_into().expect("8 bytes")),
                next_key: u64::from_le_bytes(v[8..].try_into().expect("8 bytes")),
            }),
            Some(_) => Err(Error::Corrupt("collection state record".into())),
        }
    }

    /// Applies a batch together with the new state, atomically. Not yet durable: call
    /// [`Store::commit`].
    pub fn apply(&self, mut m: Mutation, state: TreeState) -> Result<()> {
        let mut v = Vec::with_capacity(16);
        v.extend_from_slice(&state.seq.to_le_bytes());
        v.extend_from_slice(&state.next_key.to_le_bytes());
        m.batch.insert(STATE, v);
        self.tree.apply_batch(m.batch)?;
        Ok(())
    }

    pub fn get(&self, id: &str, with_vector: bool) -> Result<Option<(u64, ItemData)>> {
        match self.tree.get(item_key(id))? {
            None => Ok(None),
            Some(v) => codec::decode_item(id, &v, with_vector).map(Some),
        }
    }

    /// The raw input stored for an item, if any.
    pub fn input(&self, id: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.tree.get(input_key(id))?.map(|v| v.to_vec()))
    }

    /// Every item with its ANN key, in id order.
    pub fn scan(&self, with_vectors: bool) -> impl Iterator<Item = Result<(u64, ItemData)>> + '_ {
        self.tree.scan_prefix([ITEM]).map(move |kv| {
            let (k, v) = kv?;
            let id = std::str::from_utf8(&k[1..])
                .map_err(|_| Error::Corrupt("item id is not UTF-8".into()))?;
            codec::decode_item(id, &v, with_vectors)
        })
    }

    /// Up to `limit` (ANN key, id) pairs with keys from `from` on, in key order: the
    /// items written since that key was handed out, each under its latest key.
    pub fn keys_from(&self, from: u64, limit: usize) -> Result<Vec<(u64, String)>> {
        let start = ann_key(from);
        let end = [KEY + 1];
        self.tree
            .range(&start[..]..&end[..])
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                let key = u64::from_be_bytes(k[1..9].try_into().expect("9-byte key record"));
                let id = String::from_utf8(v.to_vec())
                    .map_err(|_| Error::Corrupt("item id is not UTF-8".into()))?;
                Ok((key, id))
            })
            .collect()
    }

    /// How many items have a stored input.
    pub fn input_count(&self) -> usize {
        self.tree.scan_prefix([INPUT]).count()
    }

    /// How many ANN key records there are (must equal the item count).
    pub fn key_count(&self) -> usize {
        self.tree.scan_prefix([KEY]).count()
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
