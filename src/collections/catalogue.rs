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
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use crate::types::Filter;

/// An interned label.
pub type LabelId = u32;

#[derive(Default)]
pub struct Catalogue {
    by_id: HashMap<Arc<str>, u64>,
    by_key: HashMap<u64, Entry, BuildKeyHasher>,
    labels: Labels,
    /// Every key, densely, so that a uniform sample of the collection is one index.
    all: Vec<u64>,
    /// Label and generation by key, in an array: what the miner's kNN checks for every
    /// candidate HNSW visits (a hash lookup there was a cache miss per visited node).
    tags: Tags,
    /// The store's mutation counter as of the last write published here.
    seq: u64,
    /// Every id, sorted, while some mining pass holds it (see [`Catalogue::sorted_ids`]);
    /// dropped when an id comes or goes.
    sorted: Mutex<Weak<Vec<Arc<str>>>>,
    /// The labelled keys class by class, while some MineBatches pass holds them (see
    /// [`Catalogue::class_layout`]); dropped when a key comes or goes.
    classes: Mutex<Weak<ClassLayout>>,
}

/// Every labelled key, class by class: classes sorted by label name, a class's keys by
/// id. One copy is shared by every MineBatches pass laid out while no key came or went;
/// a pass keeps only a cursor per class into it (a pass held its own shuffled copy of
/// the keys before: 8 bytes per item, 800 KiB per stream at 100k).
#[derive(Default)]
pub struct ClassLayout {
    pub classes: Vec<LayoutClass>,
    /// The keys of class `i` are `keys[classes[i].start..classes[i].end]`.
    pub keys: Vec<u64>,
    /// The class index of each label (by [`LabelId`]), `u32::MAX` for none.
    index: Vec<u32>,
}

pub struct LayoutClass {
    pub label: LabelId,
    pub name: Arc<str>,
    pub start: u32,
    pub end: u32,
}

impl LayoutClass {
    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

impl ClassLayout {
    /// The index into `classes` of a label's class.
    pub fn class_of(&self, label: LabelId) -> Option<usize> {
        match self.index.get(label as usize) {
            Some(&i) if i != u32::MAX => Some(i as usize),
            _ => None,
        }
    }

    /// The keys of class `i`.
    pub fn keys_of(&self, i: usize) -> &[u64] {
        let c = &self.classes[i];
        &self.keys[c.start as usize..c.end as usize]
    }
}

/// What the kNN filters need of a key, 16 bytes, kept densely by key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    pub label: LabelId,
    pub generation: u64,
}

/// Keys per chunk of the tag array: 48 KiB of atomics a chunk.
const CHUNK_BITS: u32 = 12;
const CHUNK: usize = 1 << CHUNK_BITS;

/// One chunk of [`Tag`]s: `CHUNK` consecutive keys.
struct TagChunk {
    /// The label + 1, 0 for no tag: stored after the generation, read before it.
    labels: Box<[AtomicU32]>,
    generations: Box<[AtomicU64]>,
}

impl TagChunk {
    fn new() -> Self {
        TagChunk {
            labels: (0..CHUNK).map(|_| AtomicU32::new(0)).collect(),
            generations: (0..CHUNK).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

/// The chunks by `key >> CHUNK_BITS` (None where no live key is).
type TagDir = Arc<Vec<Option<Arc<TagChunk>>>>;

/// [`Tag`]s by key, in chunks of atomics, so that they can also be read without the
/// catalogue's lock ([`TagView`]): a filtered HNSW walk checks a tag for every node it
/// visits, and holding the catalogue's read lock for a whole walk kept writes waiting
/// to publish (a mining thread, preempted mid-walk, held it for milliseconds). Keys are
/// handed out in increasing order, so the live ones sit in a few chunks; a chunk whose
/// keys are all dead (items replaced or deleted since) is dropped. Memory: 12 bytes per
/// key in chunks that hold a live key.
#[derive(Default)]
struct Tags {
    dir: TagDir,
    /// Live tags per chunk.
    live: Vec<u32>,
}

impl Tags {
    #[inline]
    fn get(&self, key: u64) -> Option<Tag> {
        read_tag(&self.dir, key)
    }

    fn set(&mut self, key: u64, tag: Tag) {
        let ci = (key >> CHUNK_BITS) as usize;
        if self.dir.get(ci).is_none_or(Option::is_none) {
            let dir = Arc::make_mut(&mut self.dir);
            if dir.len() <= ci {
                dir.resize(ci + 1, None);
                self.live.resize(ci + 1, 0);
            }
            dir[ci] = Some(Arc::new(TagChunk::new()));
        }
        let chunk = self.dir[ci].as_ref().expect("chunk just made");
        let i = key as usize & (CHUNK - 1);
        if chunk.labels[i].load(Ordering::Relaxed) == 0 {
            self.live[ci] += 1;
        }
        chunk.generations[i].store(tag.generation, Ordering::Relaxed);
        chunk.labels[i].store(tag.label + 1, Ordering::Release);
    }

    fn clear(&mut self, key: u64) {
        let ci = (key >> CHUNK_BITS) as usize;
        let Some(Some(chunk)) = self.dir.get(ci) else {
            return;
        };
        let i = key as usize & (CHUNK - 1);
        if chunk.labels[i].swap(0, Ordering::Release) == 0 {
            return;
        }
        self.live[ci] -= 1;
        if self.live[ci] == 0 {
            Arc::make_mut(&mut self.dir)[ci] = None;
        }
    }

    /// Chunks held now (tests).
    #[cfg(test)]
    fn chunks(&self) -> usize {
        self.dir.iter().flatten().count()
    }
}

#[inline]
fn read_tag(dir: &TagDir, key: u64) -> Option<Tag> {
    let chunk = dir.get((key >> CHUNK_BITS) as usize)?.as_ref()?;
    let i = key as usize & (CHUNK - 1);
    let label = chunk.labels[i].load(Ordering::Acquire).checked_sub(1)?;
    Some(Tag {
        label,
        generation: chunk.generations[i].load(Ordering::Relaxed),
    })
}

/// The tags as of a moment, read without the catalogue's lock: what a filtered walk
/// checks for every candidate. Keys published after the view was taken may be missed
/// (a newer chunk); a key removed since reads as absent.
#[derive(Clone, Default)]
pub struct TagView(TagDir);

impl TagView {
    #[inline]
    pub fn get(&self, key: u64) -> Option<Tag> {
        read_tag(&self.0, key)
    }
}

/// What the catalogue knows about one ANN key.
pub struct Entry {
    pub id: Arc<str>,
    pub label: LabelId,
    /// This key's position in its label's member list.
    slot: u32,
    /// This key's position in the dense list of every key.
    all_slot: u32,
    /// The writer's generation for this item (a trainer's step or model version).
    pub generation: u64,
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
    pub fn insert(
        &mut self,
        key: u64,
        id: &str,
        label: &str,
        generation: u64,
        metadata: BTreeMap<String, String>,
    ) {
        *self
            .classes
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner) = Weak::new();
        // A re-written id keeps its shared string (mining passes hold it).
        let id: Arc<str> = match self.by_id.get_key_value(id) {
            Some((shared, &old)) => {
                let shared = shared.clone();
                self.drop_key(old);
                shared
            }
            None => {
                *self
                    .sorted
                    .get_mut()
                    .unwrap_or_else(PoisonError::into_inner) = Weak::new();
                Arc::from(id)
            }
        };
        let label = self.labels.intern(label);
        let members = &mut self.labels.members[label as usize];
        let slot = members.len() as u32;
        members.push(key);
        let all_slot = self.all.len() as u32;
        self.all.push(key);
        self.tags.set(key, Tag { label, generation });
        self.by_key.insert(
            key,
            Entry {
                id: id.clone(),
                label,
                slot,
                all_slot,
                generation,
                metadata,
            },
        );
        self.by_id.insert(id, key);
    }

    /// Removes an id; returns the key it had.
    pub fn remove(&mut self, id: &str) -> Option<u64> {
        let key = self.by_id.remove(id)?;
        *self
            .sorted
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner) = Weak::new();
        *self
            .classes
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner) = Weak::new();
        self.drop_key(key);
        Some(key)
    }

    fn drop_key(&mut self, key: u64) {
        let Some(e) = self.by_key.remove(&key) else {
            return;
        };
        self.tags.clear(key);
        let members = &mut self.labels.members[e.label as usize];
        members.swap_remove(e.slot as usize);
        if let Some(&moved) = members.get(e.slot as usize) {
            self.by_key
                .get_mut(&moved)
                .expect("member is catalogued")
                .slot = e.slot;
        }
        self.all.swap_remove(e.all_slot as usize);
        if let Some(&moved) = self.all.get(e.all_slot as usize) {
            self.by_key
                .get_mut(&moved)
                .expect("key is catalogued")
                .all_slot = e.all_slot;
        }
    }

    /// Every id, sorted: one copy shared by every mining pass that asks while no id
    /// came or went (1,000 streams over a 100k collection held 1.6 MB each before).
    pub fn sorted_ids(&self) -> Arc<Vec<Arc<str>>> {
        let mut cached = self.sorted.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(ids) = cached.upgrade() {
            return ids;
        }
        let mut ids: Vec<Arc<str>> = self.by_id.keys().cloned().collect();
        ids.sort_unstable();
        let ids = Arc::new(ids);
        *cached = Arc::downgrade(&ids);
        ids
    }

    /// Every key that carries a label other than `unlabelled`, class by class (see
    /// [`ClassLayout`]): one copy shared by every caller while no key came or went.
    pub fn class_layout(&self, unlabelled: Option<LabelId>) -> Arc<ClassLayout> {
        let mut cached = self.classes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(layout) = cached.upgrade() {
            return layout;
        }
        let mut labels: Vec<LabelId> = self.labels().filter(|&l| Some(l) != unlabelled).collect();
        labels.sort_unstable_by(|a, b| self.label_name(*a).cmp(self.label_name(*b)));
        let mut layout = ClassLayout {
            classes: Vec::with_capacity(labels.len()),
            keys: Vec::with_capacity(self.all.len()),
            index: vec![u32::MAX; self.labels.names.len()],
        };
        for label in labels {
            let start = layout.keys.len();
            layout.keys.extend_from_slice(self.members(label));
            layout.keys[start..].sort_unstable_by(|a, b| self.by_key[a].id.cmp(&self.by_key[b].id));
            layout.index[label as usize] = layout.classes.len() as u32;
            layout.classes.push(LayoutClass {
                label,
                name: self.labels.names[label as usize].clone(),
                start: start as u32,
                end: layout.keys.len() as u32,
            });
        }
        let layout = Arc::new(layout);
        *cached = Arc::downgrade(&layout);
        layout
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
        self.tags.get(key).is_some()
    }

    /// A key's label and generation from the dense array: the cheap lookup for checks
    /// on every HNSW candidate.
    #[inline]
    pub fn tag(&self, key: u64) -> Option<Tag> {
        self.tags.get(key)
    }

    /// The tag array as it is now, to read without this catalogue's lock.
    pub fn tag_view(&self) -> TagView {
        TagView(self.tags.dir.clone())
    }

    /// The key an id has now.
    pub fn key_of(&self, id: &str) -> Option<u64> {
        self.by_id.get(id).copied()
    }

    pub fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.all.iter().copied()
    }

    /// Every key, as one slice in no particular order (index it to sample uniformly).
    pub fn all_keys(&self) -> &[u64] {
        &self.all
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

/// The catalogue's own file beside an index snapshot, so that a clean restart needs no
/// scan of the store: magic, entry count, then per entry its key, id, label, generation and metadata
/// (length-prefixed, little-endian), then an FNV-1a checksum of all that.
const MAGIC: &[u8; 8] = b"LKCAT002";

impl Catalogue {
    /// The catalogue as bytes (see [`MAGIC`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.len() * 48);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.len() as u64).to_le_bytes());
        let put = |out: &mut Vec<u8>, b: &[u8]| {
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        };
        for (key, e) in &self.by_key {
            out.extend_from_slice(&key.to_le_bytes());
            put(&mut out, e.id.as_bytes());
            put(&mut out, self.label_name(e.label).as_bytes());
            out.extend_from_slice(&e.generation.to_le_bytes());
            out.extend_from_slice(&(e.metadata.len() as u32).to_le_bytes());
            for (k, v) in &e.metadata {
                put(&mut out, k.as_bytes());
                put(&mut out, v.as_bytes());
            }
        }
        let sum = fnv1a(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Reads what [`Catalogue::encode`] wrote; None for anything else (a torn or foreign
    /// file), so that the caller falls back to the store.
    pub fn decode(bytes: &[u8], seq: u64) -> Option<Catalogue> {
        let (body, sum) = bytes.split_at_checked(bytes.len().checked_sub(8)?)?;
        if fnv1a(body) != u64::from_le_bytes(sum.try_into().ok()?) {
            return None;
        }
        let mut r = Reader(body.strip_prefix(MAGIC.as_slice())?);
        let count = r.u64()? as usize;
        let mut c = Catalogue::default();
        c.by_id.reserve(count);
        c.by_key.reserve(count);
        for _ in 0..count {
            let key = r.u64()?;
            let id = r.string()?;
            let label = r.string()?;
            let generation = r.u64()?;
            let n = r.u32()? as usize;
            let mut metadata = BTreeMap::new();
            for _ in 0..n {
                let k = r.string()?;
                metadata.insert(k, r.string()?);
            }
            c.insert(key, &id, &label, generation, metadata);
        }
        let r = r.0;
        (c.len() == count && r.is_empty()).then(|| {
            c.seq = seq;
            c
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let (a, b) = self.0.split_at_checked(n)?;
        self.0 = b;
        Some(a)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
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
    fn dense_tags_follow_the_entries_in_any_insertion_order() {
        let mut c = Catalogue::default();
        // Out of order, as a snapshot's hash order gives them.
        let mut rng = crate::rng::Rng::new(5);
        let mut keys: Vec<u64> = (100..5100).collect();
        for i in (1..keys.len()).rev() {
            keys.swap(i, rng.below(i + 1));
        }
        for &k in &keys {
            c.insert(
                k,
                &format!("i{k}"),
                &format!("l{}", k % 7),
                k / 10,
                BTreeMap::new(),
            );
        }
        for k in 90..5110 {
            let want = c.get(k).map(|e| Tag {
                label: e.label,
                generation: e.generation,
            });
            assert_eq!(c.tag(k), want, "key {k}");
        }
        // Replacing every item (new keys) leaves the old front dead, and it is cut off.
        for &k in &keys {
            c.insert(k + 10_000, &format!("i{k}"), "z", 3, BTreeMap::new());
        }
        assert!(c.tag(100).is_none() && c.tag(5099).is_none());
        let z = c.label_id("z").unwrap();
        assert_eq!(c.tag(10_100).map(|t| (t.label, t.generation)), Some((z, 3)));
        // Keys 100..5100 filled chunks 0 and 1 (4096 keys each); all dead now.
        assert_eq!(c.tags.chunks(), 2, "the dead chunks were kept");
        assert!(c.tags.dir[..2].iter().all(Option::is_none));
        // A view taken now reads the live tags without the lock, and still reads what
        // it saw after the catalogue changes (a key removed reads as absent).
        let view = c.tag_view();
        assert_eq!(view.get(10_100), c.tag(10_100));
        assert!(view.get(100).is_none());
        c.remove("i100");
        assert!(c.tag(10_100).is_none());
        assert!(view.get(10_100).is_none());
    }

    #[test]
    fn label_index_follows_inserts_replacements_and_removals() {
        let mut c = Catalogue::default();
        for (key, id, label) in [(0, "a", "x"), (1, "b", "x"), (2, "c", "y"), (3, "d", "x")] {
            c.insert(key, id, label, 0, BTreeMap::new());
        }
        assert_eq!(members(&c, "x"), vec![0, 1, 3]);
        // Replacing "a" with a new key and label moves it between lists.
        c.insert(4, "a", "y", 0, BTreeMap::new());
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

        // The snapshot file round-trips, and a flipped byte is refused.
        let mut meta = BTreeMap::new();
        meta.insert("cam".to_string(), "3".to_string());
        c.insert(9, "e", "x", 7, meta);
        let bytes = c.encode();
        let d = Catalogue::decode(&bytes, 42).unwrap();
        assert_eq!(d.len(), c.len());
        assert_eq!(d.seq(), 42);
        for key in c.keys() {
            let (a, b) = (c.get(key).unwrap(), d.get(key).unwrap());
            assert_eq!(a.id, b.id);
            assert_eq!(c.label_name(a.label), d.label_name(b.label));
            assert_eq!(a.metadata, b.metadata);
        }
        assert_eq!(members(&d, "y"), members(&c, "y"));
        let mut torn = bytes.clone();
        torn[20] ^= 1;
        assert!(Catalogue::decode(&torn, 42).is_none());
        assert!(Catalogue::decode(&bytes[..bytes.len() - 3], 42).is_none());
    }

    #[test]
    fn the_class_layout_is_shared_until_a_key_comes_or_goes() {
        let mut c = Catalogue::default();
        for (key, id, label) in [
            (0, "d", "y"),
            (1, "b", "x"),
            (2, "a", ""),
            (3, "c", "y"),
            (4, "a2", "x"),
        ] {
            c.insert(key, id, label, 0, BTreeMap::new());
        }
        let unlabelled = c.label_id("");
        let layout = c.class_layout(unlabelled);
        // Classes by name, keys by id, the unlabelled items left out.
        let names: Vec<&str> = layout.classes.iter().map(|k| &*k.name).collect();
        assert_eq!(names, ["x", "y"]);
        assert_eq!(layout.keys_of(0), [4, 1]);
        assert_eq!(layout.keys_of(1), [3, 0]);
        assert_eq!(layout.class_of(c.label_id("y").unwrap()), Some(1));
        assert_eq!(layout.class_of(unlabelled.unwrap()), None);
        // Asked again with nothing changed: the same copy.
        assert!(Arc::ptr_eq(&layout, &c.class_layout(unlabelled)));
        // A re-written id (a new key) and a removal each give a new one.
        c.insert(5, "b", "y", 1, BTreeMap::new());
        let after = c.class_layout(unlabelled);
        assert!(!Arc::ptr_eq(&layout, &after));
        assert_eq!(after.keys_of(0), [4]);
        assert_eq!(after.keys_of(1), [5, 3, 0]);
        c.remove("a2");
        let removed = c.class_layout(unlabelled);
        assert!(!Arc::ptr_eq(&after, &removed));
        assert_eq!(removed.classes.len(), 1, "class x has no item left");
        // The copy a holder keeps is what it saw.
        assert_eq!(layout.keys_of(0), [4, 1]);
    }
}
