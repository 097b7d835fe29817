//! The in-memory catalogue of one collection: which ANN key each id has now, and what
//! search filters, hits and the miner need to know about each key without touching the
//! store: its id, its label and its metadata.
//!
//! Labels are interned: each distinct label gets a [`LabelId`] once, and the catalogue
//! keeps, per label, the keys that carry it (a dense list, so a uniform sample of a
//! label's members is one index). Everything here changes only under the collection's
//! catalogue lock, in the order writes reached the store, so it always reflects a prefix
//! of the store's history: [`Catalogue::seq`] says which.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::types::Filter;

/// An interned label.
pub type LabelId = u32;

#[derive(Default)]
pub struct Catalogue {
    by_id: HashMap<Arc<str>, u64>,
    by_key: HashMap<u64, Entry, BuildKeyHasher>,
    labels: Labels,
    /// The store's mutation counter as of the last write published here.
    seq: u64,
}

/// What the catalogue knows about one ANN key.
pub struct Entry {
    pub id: Arc<str>,
    pub label: LabelId,
    /// This key's position in its label's member list.
    slot: u32,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Default)]
struct Labels {
    names: Vec<Arc<str>>,
    ids: HashMap<Arc<str>, LabelId>,
    /// Per label, the keys that carry it, in no particular order.
    members: Vec<Vec<u64>>,
}

impl Catalogue {
    /// Publishes `key` for `id`; the id's previous key, if any, leaves the catalogue.
    pub fn insert(&mut self, key: u64, id: &str, label: &str, metadata: BTreeMap<String, String>) {
        if let Some(old) = self.by_id.get(id).copied() {
            self.drop_key(old);
        }
        let id: Arc<str> = Arc::from(id);
        let label = self.labels.intern(label);
        let members = &mut self.labels.members[label as usize];
        let slot = members.len() as u32;
        members.push(key);
        self.by_key.insert(
            key,
            Entry {
                id: id.clone(),
                label,
                slot,
                metadata,
            },
        );
        self.by_id.insert(id, key);
    }

    /// Removes an id; returns the key it had.
    pub fn remove(&mut self, id: &str) -> Option<u64> {
        let key = self.by_id.remove(id)?;
        self.drop_key(key);
        Some(key)
    }

    fn drop_key(&mut self, key: u64) {
        let Some(e) = self.by_key.remove(&key) else {
            return;
        };
        let members = &mut self.labels.members[e.label as usize];
        members.swap_remove(e.slot as usize);
        if let Some(&moved) = members.get(e.slot as usize) {
            self.by_key
                .get_mut(&moved)
                .expect("member is catalogued")
                .slot = e.slot;
        }
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn get(&self, key: u64) -> Option<&Entry> {
        self.by_key.get(&key)
    }

    pub fn contains_key(&self, key: u64) -> bool {
        self.by_key.contains_key(&key)
    }

    /// The key an id has now.
    pub fn key_of(&self, id: &str) -> Option<u64> {
        self.by_id.get(id).copied()
    }

    pub fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.by_key.keys().copied()
    }

    pub fn label_name(&self, label: LabelId) -> &str {
        &self.labels.names[label as usize]
    }

    pub fn label_id(&self, name: &str) -> Option<LabelId> {
        self.labels.ids.get(name).copied()
    }

    /// The keys that carry `label` (empty for a label no item has any more).
    pub fn members(&self, label: LabelId) -> &[u64] {
        self.labels
            .members
            .get(label as usize)
            .map_or(&[], |m| m.as_slice())
    }

    /// Every label that some item carries now.
    pub fn labels(&self) -> impl Iterator<Item = LabelId> + '_ {
        (0..self.labels.names.len() as LabelId).filter(|l| !self.members(*l).is_empty())
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn set_seq(&mut self, seq: u64) {
        self.seq = self.seq.max(seq);
    }

    /// `filter` with its labels resolved to ids, for checks on every HNSW candidate.
    pub fn compile(&self, filter: &Filter) -> CompiledFilter {
        CompiledFilter {
            empty: filter.is_empty(),
            include: (!filter.labels.is_empty()).then(|| {
                filter
                    .labels
                    .iter()
                    .filter_map(|l| self.label_id(l))
                    .collect()
            }),
            exclude: filter
                .exclude_labels
                .iter()
                .filter_map(|l| self.label_id(l))
                .collect(),
            metadata: filter.metadata.clone(),
        }
    }
}

impl Labels {
    fn intern(&mut self, name: &str) -> LabelId {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        let id = self.names.len() as LabelId;
        let name: Arc<str> = Arc::from(name);
        self.names.push(name.clone());
        self.ids.insert(name, id);
        self.members.push(Vec::new());
        id
    }
}

/// A [`Filter`] whose labels are interned ids.
#[derive(Debug, Clone, Default)]
pub struct CompiledFilter {
    empty: bool,
    /// None: any label; Some: one of these (an empty list matches nothing).
    include: Option<Vec<LabelId>>,
    exclude: Vec<LabelId>,
    metadata: BTreeMap<String, String>,
}

impl CompiledFilter {
    pub fn is_empty(&self) -> bool {
        self.empty
    }

    pub fn matches(&self, e: &Entry) -> bool {
        self.empty
            || (self.include.as_ref().is_none_or(|l| l.contains(&e.label))
                && !self.exclude.contains(&e.label)
                && self
                    .metadata
                    .iter()
                    .all(|(k, v)| e.metadata.get(k).is_some_and(|m| m == v)))
    }
}

/// ANN keys are dense counters that callers cannot choose, so SipHash's defence against
/// hash flooding buys nothing here; a multiplicative hash makes the filter callback,
/// which runs for every candidate HNSW visits, several times cheaper.
#[derive(Default, Clone, Copy)]
pub struct BuildKeyHasher;

#[derive(Default)]
pub struct KeyHasher(u64);

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

#[cfg(test)]
mod tests {
    use super::*;

    fn members(c: &Catalogue, label: &str) -> Vec<u64> {
        let mut m = c.members(c.label_id(label).unwrap()).to_vec();
        m.sort();
        m
    }

    #[test]
    fn label_index_follows_inserts_replacements_and_removals() {
        let mut c = Catalogue::default();
        for (key, id, label) in [(0, "a", "x"), (1, "b", "x"), (2, "c", "y"), (3, "d", "x")] {
            c.insert(key, id, label, BTreeMap::new());
        }
        assert_eq!(members(&c, "x"), vec![0, 1, 3]);
        // Replacing "a" with a new key and label moves it between lists.
        c.insert(4, "a", "y", BTreeMap::new());
        assert_eq!(members(&c, "x"), vec![1, 3]);
        assert_eq!(members(&c, "y"), vec![2, 4]);
        assert!(c.get(0).is_none());
        assert_eq!(c.remove("b"), Some(1));
        assert_eq!(members(&c, "x"), vec![3]);
        // Every surviving entry's slot still points at itself.
        for l in c.labels().collect::<Vec<_>>() {
            for (i, k) in c.members(l).iter().enumerate() {
                assert_eq!(c.get(*k).unwrap().slot as usize, i);
            }
        }
        assert_eq!(c.len(), 3);
        let f = c.compile(&Filter {
            labels: vec!["y".into(), "nope".into()],
            ..Default::default()
        });
        assert!(f.matches(c.get(2).unwrap()));
        assert!(!f.matches(c.get(3).unwrap()));
        let none = c.compile(&Filter {
            labels: vec!["nope".into()],
            ..Default::default()
        });
        assert!(!none.matches(c.get(2).unwrap()));
    }
}
