//! The per-collection ANN index: a usearch HNSW graph keyed by u64 ANN keys.
//!
//! usearch allows concurrent adds, removes and searches, each holding one of a fixed
//! number of thread slots, but not concurrent with `reserve` or `save`. So operations take
//! a read lock plus a slot, and growth and snapshots take the write lock.
//!
//! # Per-query expansion (ef)
//!
//! usearch's C++ graph search takes its expansion from a per-call config, but the dense
//! index fills that config from one shared field (`expansion_search`) and the Rust binding
//! offers no other way in. Changing that field per query (`change_expansion_search`) is
//! a data race: two searches with different ef would each run at whichever value was
//! written last. What the binding does allow is the result count: the graph search runs
//! with `max(expansion_search, count)` candidates and keeps the `count` best, exactly the
//! top of the same candidate list. So the index is built with `expansion_search = 1` and
//! every search asks for `count = max(k, ef)`: the search is the one usearch would run at
//! that ef, no shared state is written, and concurrent searches at different ef cannot
//! affect each other. The collection's own `expansion_search` becomes the default ef,
//! kept here. The price is that usearch copies `count` (key, distance) pairs out instead
//! of k (12 bytes each); they are cut to k right at this boundary, before any lookup,
//! and the bench measures the copy against usearch's own per-config search
//! (docs/benchmarks.md, "Search at equal recall").
//!
//! # Reachability
//!
//! A few nodes of any HNSW graph end up where no search reaches them ([`reach`]). A
//! sweep ([`AnnIndex::sweep`]) checks every stored key by a search for its own vector,
//! re-links those it does not find, and stashes those a re-link does not help: every
//! search here also scans that stash exactly, so after a sweep each stored item is found
//! by a k = 1 search for its own vector. Sweeps run after a rebuild at recovery and, once
//! writes go quiet, on indexes that grew by half since their last sweep
//! ([`AnnIndex::sweep_due`]); checking each batch as it is inserted instead cost a third
//! of the ingest rate and missed the nodes that later insertions cut off
//! (docs/benchmarks.md, "Unreachable nodes").

pub mod reach;
pub mod snapshot;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use usearch::ffi::{IndexOptions, MetricKind, ScalarKind};

use crate::error::{Error, Result};
use crate::types::{CollectionSpec, Metric, Precision};

/// Concurrent usearch operations per index. Callers beyond this wait for a slot.
const SLOTS: usize = 32;

/// Indexes of at most this many vectors are searched exactly (a scan of every vector)
/// instead of by a graph walk. At this size a walk at the default ef already computes a
/// distance to a large part of the graph, so a scan costs about as much, and a small
/// collection (a new one, a test, a gallery of a few hundred) gets exact answers rather
/// than a graph's near misses. Filters and mining exclusions apply to the scan as well.
pub const EXACT_BELOW: usize = 2048;

/// A sweep of fewer keys than [`AnnIndex::sweep_due`] asks for is due once this many
/// times the last sweep's duration (at least [`SWEEP_MIN`]) has passed since it ended:
/// such catch-up sweeps then take at most a fifth of one core's time.
const SWEEP_CATCH_UP: u32 = 4;
const SWEEP_MIN: Duration = Duration::from_secs(1);

/// Keys a sweep checks at a time: the vectors of one chunk are in memory at once.
const SWEEP_CHUNK: usize = 8192;

/// The expansion usearch itself is configured with: the least it allows (0 means its
/// default, 64). The real ef of each search is its result count (see the module docs).
const ENGINE_EXPANSION: usize = 1;

pub struct AnnIndex {
    inner: RwLock<usearch::Index>,
    metric: Metric,
    precision: Precision,
    /// The ef of a search that names none: the collection's `expansion_search`.
    default_expansion: usize,
    slots: Slots,
    /// Vectors that batches in flight are about to add: capacity is reserved for them
    /// up front, since concurrent batches would otherwise each see room for themselves.
    pending: Mutex<usize>,
    /// The snapshot file this index is memory-mapped from, until the first write loads
    /// a private, writable copy (see [`AnnIndex::view`]).
    viewed: Mutex<Option<(PathBuf, IndexOptions)>>,
    /// Keys added since the last sweep began, and the index's size then.
    grown: AtomicUsize,
    swept_size: AtomicUsize,
    /// When the last sweep ended, and how long it took; sweeps running now.
    last_sweep: Mutex<Option<(Instant, Duration)>>,
    sweeping: AtomicUsize,
    reach: reach::ReachStats,
    stash: reach::Stash,
    /// Searches scan every vector while the index holds at most this many
    /// ([`EXACT_BELOW`]).
    exact_below: AtomicUsize,
}

impl AnnIndex {
    /// An empty index with room for `capacity` vectors.
    pub fn new(spec: &CollectionSpec, capacity: usize) -> Result<Self> {
        let index = usearch::Index::new(&options(spec))?;
        index.reserve_capacity_and_threads(capacity.max(1024), SLOTS)?;
        Ok(AnnIndex {
            inner: RwLock::new(index),
            metric: spec.metric,
            precision: spec.precision,
            default_expansion: default_expansion(spec),
            slots: Slots::new(SLOTS),
            pending: Mutex::new(0),
            viewed: Mutex::new(None),
            grown: AtomicUsize::new(0),
            swept_size: AtomicUsize::new(0),
            last_sweep: Mutex::new(None),
            sweeping: AtomicUsize::new(0),
            reach: reach::ReachStats::default(),
            stash: reach::Stash::default(),
            exact_below: AtomicUsize::new(EXACT_BELOW),
        })
    }

    /// Loads a snapshot written by [`AnnIndex::save`] into memory of its own.
    pub fn load(spec: &CollectionSpec, path: &Path) -> Result<Self> {
        let index = AnnIndex::new(spec, 0)?;
        index.load_private(path, &options(spec), spec.dimension)?;
        Ok(index)
    }

    /// Maps a snapshot written by [`AnnIndex::save`] instead of reading it: a restart
    /// answers searches at once from the page cache, and a read-mostly index stays in
    /// file-backed (reclaimable) memory. The first write loads a private copy first.
    /// Snapshots are replaced by rename, never rewritten in place, so the mapped file
    /// never changes under a reader.
    pub fn view(spec: &CollectionSpec, path: &Path) -> Result<Self> {
        let opts = options(spec);
        let index = usearch::Index::new(&opts)?;
        index.view(path_str(path)?)?;
        check_dimensions(&index, spec.dimension, path)?;
        index.reserve_capacity_and_threads(index.size(), SLOTS)?;
        Ok(AnnIndex {
            inner: RwLock::new(index),
            metric: spec.metric,
            precision: spec.precision,
            default_expansion: default_expansion(spec),
            slots: Slots::new(SLOTS),
            pending: Mutex::new(0),
            viewed: Mutex::new(Some((path.to_path_buf(), opts))),
            grown: AtomicUsize::new(0),
            swept_size: AtomicUsize::new(0),
            last_sweep: Mutex::new(None),
            sweeping: AtomicUsize::new(0),
            reach: reach::ReachStats::default(),
            stash: reach::Stash::default(),
            exact_below: AtomicUsize::new(EXACT_BELOW),
        })
    }

    /// Whether the index is still the mapped snapshot (nothing written since).
    pub fn is_view(&self) -> bool {
        self.viewed.lock().expect("view lock").is_some()
    }

    /// Replaces a mapped snapshot with a private copy that can be written. Searches go
    /// on against the mapping while the copy loads.
    fn promote(&self) -> Result<()> {
        let mut viewed = self.viewed.lock().expect("view lock");
        let Some((path, opts)) = viewed.as_ref() else {
            return Ok(());
        };
        let dimensions = self.inner.read().expect("index lock").dimensions() as u32;
        let copy = usearch::Index::new(opts)?;
        copy.load(path_str(path)?)?;
        check_dimensions(&copy, dimensions, path)?;
        copy.reserve_capacity_and_threads(copy.capacity().max(copy.size() + 1024), SLOTS)?;
        *self.inner.write().expect("index lock") = copy;
        *viewed = None;
        Ok(())
    }

    fn load_private(&self, path: &Path, opts: &IndexOptions, dimensions: u32) -> Result<()> {
        let index = usearch::Index::new(opts)?;
        index.load(path_str(path)?)?;
        check_dimensions(&index, dimensions, path)?;
        let cap = index.capacity().max(index.size() + 1024);
        index.reserve_capacity_and_threads(cap, SLOTS)?;
        *self.inner.write().expect("index lock") = index;
        Ok(())
    }

    /// Writes the index to `path` (readers and writers wait meanwhile).
    pub fn save(&self, path: &Path) -> Result<()> {
        self.promote()?;
        let index = self.inner.write().expect("index lock");
        index.save(path_str(path)?)?;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.inner.read().expect("index lock").size()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn memory_bytes(&self) -> usize {
        self.inner.read().expect("index lock").memory_usage()
    }

    /// Adds vectors (keys must be new), on up to `threads` threads.
    pub fn add_many(&self, entries: &[(u64, &[f32])], threads: usize) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        self.promote()?;
        self.reserve_for(entries.len())?;
        let result = self.add_reserved(entries, threads);
        *self.pending.lock().expect("pending lock") -= entries.len();
        self.grown.fetch_add(entries.len(), Ordering::Relaxed);
        result
    }

    /// Checks that a search for each entry's own vector at the default ef finds it
    /// through the graph; re-links those it does not find, and stashes those a re-link
    /// does not help (see [`reach`]). The check runs on up to `threads` threads beside
    /// searches and inserts; a re-link holds the index alone.
    pub fn ensure_reachable(
        &self,
        entries: &[(u64, &[f32])],
        threads: usize,
    ) -> Result<reach::Reach> {
        let started = Instant::now();
        let ef = self.candidates(1, 0);
        let flagged = self.unreachable_entries(entries, threads)?;
        let mut found = reach::Reach {
            checked: entries.len(),
            unreachable: flagged.len(),
            ..reach::Reach::default()
        };
        // Stashed keys the graph reaches now need the stash no more.
        if !self.stash.is_empty() {
            let flagged: std::collections::HashSet<u64> = flagged.iter().map(|(k, _)| *k).collect();
            let reached: Vec<u64> = entries
                .iter()
                .map(|(k, _)| *k)
                .filter(|k| !flagged.contains(k) && self.stash.contains(*k))
                .collect();
            found.released = self.stash.remove(&reached)?;
        }
        // Stashed keys are not re-linked again: a re-link repeats what failed before.
        let (stashed, fresh): (Vec<_>, Vec<_>) = flagged
            .into_iter()
            .partition(|(k, _)| self.stash.contains(*k));
        if !fresh.is_empty() {
            self.promote()?;
            let index = self.inner.write().expect("index lock");
            let left = reach::relink(&index, &fresh, ef)?;
            // Keys removed since the check count as neither.
            found.repaired = fresh.iter().filter(|(k, _)| index.contains(*k)).count() - left.len();
            self.stash.insert(&index, &left)?;
            found.stashed = left.len();
        }
        found.stashed += stashed.len();
        if found.unreachable > 0 || found.released > 0 {
            tracing::info!(
                checked = found.checked,
                unreachable = found.unreachable,
                repaired = found.repaired,
                stashed = found.stashed,
                released = found.released,
                in_stash = self.stash.len(),
                "HNSW nodes that search could not reach: re-linked, or searched exactly beside the graph"
            );
        }
        self.reach.record(&found, started);
        Ok(found)
    }

    /// Checks every key of `items` (key and vector, in any order: a scan of the store)
    /// with [`AnnIndex::ensure_reachable`], a chunk at a time, and counts a sweep.
    pub fn sweep(
        &self,
        items: impl Iterator<Item = Result<(u64, Vec<f32>)>>,
        threads: usize,
    ) -> Result<reach::Reach> {
        let started = Instant::now();
        // Keys added from here on are counted for the next sweep; those counted so far
        // stay unswept until this one ends.
        let counted = self.grown.load(Ordering::Relaxed);
        self.swept_size.store(self.len(), Ordering::Relaxed);
        self.sweeping.fetch_add(1, Ordering::Relaxed);
        let _done = SweepDone(self, counted);
        let mut total = reach::Reach::default();
        let mut chunk: Vec<(u64, Vec<f32>)> = Vec::with_capacity(SWEEP_CHUNK);
        let mut check = |chunk: &mut Vec<(u64, Vec<f32>)>| -> Result<()> {
            let refs: Vec<(u64, &[f32])> = chunk.iter().map(|(k, v)| (*k, v.as_slice())).collect();
            total += self.ensure_reachable(&refs, threads)?;
            chunk.clear();
            Ok(())
        };
        for item in items {
            chunk.push(item?);
            if chunk.len() == SWEEP_CHUNK {
                check(&mut chunk)?;
            }
        }
        check(&mut chunk)?;
        self.reach.swept();
        *self.last_sweep.lock().expect("sweep lock") = Some((Instant::now(), started.elapsed()));
        Ok(total)
    }

    /// Whether keys were added since the last sweep began, as many as half the index
    /// held then (or any, before a first sweep): a sweep now costs at most about three
    /// checks per key added, whatever the pace of the writes. Fewer are enough once
    /// [`SWEEP_CATCH_UP`] times the last sweep's duration has passed since it ended, so
    /// that the tail of an ingest whose pause set off a sweep midway is not left
    /// unchecked until the index grows by half again.
    pub fn sweep_due(&self) -> bool {
        let grown = self.grown.load(Ordering::Relaxed);
        if grown == 0 || self.sweeping.load(Ordering::Relaxed) > 0 {
            return false;
        }
        if grown * 2 >= self.swept_size.load(Ordering::Relaxed) {
            return true;
        }
        match *self.last_sweep.lock().expect("sweep lock") {
            Some((ended, took)) => ended.elapsed() >= took.max(SWEEP_MIN) * SWEEP_CATCH_UP,
            None => true,
        }
    }

    /// Keys added and not yet checked by a finished sweep (those a running sweep is
    /// checking included).
    pub fn unswept(&self) -> usize {
        self.grown.load(Ordering::Relaxed)
    }

    /// The keys of `entries` that a search for their own vector at the default ef does
    /// not find, checked on up to `threads` threads; nothing is changed.
    pub fn unreachable(&self, entries: &[(u64, &[f32])], threads: usize) -> Result<Vec<u64>> {
        Ok(self
            .unreachable_entries(entries, threads)?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    fn unreachable_entries<'e>(
        &self,
        entries: &[(u64, &'e [f32])],
        threads: usize,
    ) -> Result<Vec<(u64, &'e [f32])>> {
        let index = self.inner.read().expect("index lock");
        reach::unreachable(&index, entries, self.candidates(1, 0), threads, || {
            self.slots.acquire()
        })
    }

    /// What the reachability checks have found since this index was built or loaded.
    pub fn reach_counts(&self) -> reach::ReachCounts {
        self.reach.counts(self.stash.len())
    }

    /// The keys searched exactly beside the graph (see [`reach::Stash`]).
    pub fn stashed_keys(&self) -> Vec<u64> {
        self.stash.keys()
    }

    /// Stashes `keys` again with the vectors this index holds for them (a snapshot's
    /// stash, after a load). Exact for f32 and f16; an i8 vector read back and cast again
    /// may differ from the stored one in its last unit.
    pub fn restore_stash(&self, keys: &[u64]) -> Result<()> {
        let index = self.inner.read().expect("index lock");
        let mut vectors = Vec::with_capacity(keys.len());
        for &key in keys {
            let mut v = vec![0f32; index.dimensions()];
            if index.get(key, &mut v[..])? == 1 {
                vectors.push((key, v));
            }
        }
        let refs: Vec<(u64, &[f32])> = vectors.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        self.stash.insert(&index, &refs)
    }

    fn add_reserved(&self, entries: &[(u64, &[f32])], threads: usize) -> Result<()> {
        let index = self.inner.read().expect("index lock");
        let threads = threads.clamp(1, SLOTS).min(entries.len().div_ceil(64));
        if threads == 1 {
            let _slot = self.slots.acquire();
            for (key, v) in entries {
                index.add(*key, v)?;
            }
            return Ok(());
        }
        // Threads pull small chunks from a shared cursor, so one slow thread (a core
        // busy elsewhere) does not leave the others idle at the end of the batch.
        let cursor = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    let index = &*index;
                    let slots = &self.slots;
                    let cursor = &cursor;
                    s.spawn(move || -> Result<()> {
                        let _slot = slots.acquire();
                        loop {
                            let start = cursor.fetch_add(16, std::sync::atomic::Ordering::Relaxed);
                            if start >= entries.len() {
                                return Ok(());
                            }
                            for (key, v) in &entries[start..(start + 16).min(entries.len())] {
                                index.add(*key, v)?;
                            }
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .try_for_each(|w| w.join().expect("index add thread panicked"))
        })
    }

    pub fn remove_many(&self, keys: &[u64]) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        self.promote()?;
        let index = self.inner.read().expect("index lock");
        let _slot = self.slots.acquire();
        for key in keys {
            index.remove(*key)?;
        }
        self.stash.remove(keys)?;
        Ok(())
    }

    /// Whether the graph holds `key`.
    pub fn contains(&self, key: u64) -> bool {
        self.inner.read().expect("index lock").contains(key)
    }

    /// The vector stored under `key`, when the index keeps vectors exactly (F32): the
    /// miner's one lookup per candidate. None for other precisions or absent keys.
    pub fn vector(&self, key: u64) -> Option<Vec<f32>> {
        if self.precision != Precision::F32 {
            return None;
        }
        let index = self.inner.read().expect("index lock");
        let mut v = vec![0f32; index.dimensions()];
        match index.get(key, &mut v[..]) {
            Ok(1) => Some(v),
            _ => None,
        }
    }

    /// The `k` nearest keys, nearest first, with API distances, found by a graph search
    /// that keeps `expansion` candidates (0: the collection's `expansion_search`; never
    /// fewer than k).
    pub fn search(&self, query: &[f32], k: usize, expansion: usize) -> Result<Vec<(u64, f32)>> {
        let count = self.candidates(k, expansion);
        let index = self.inner.read().expect("index lock");
        let _slot = self.slots.acquire();
        if index.size() <= self.exact_below.load(Ordering::Relaxed) {
            let m = index.exact_search(query, count)?;
            return Ok(self.matches(m, Vec::new(), count, k));
        }
        let m = index.search(query, count)?;
        Ok(self.matches(m, self.stash.search(query, count, |_| true)?, count, k))
    }

    /// The `k` nearest keys that pass `keep`, nearest first, with API distances, from a
    /// graph search that keeps `expansion` passing candidates (as [`AnnIndex::search`]).
    /// Costlier than a plain search: `keep` runs for every candidate visited.
    pub fn filtered_search(
        &self,
        query: &[f32],
        k: usize,
        expansion: usize,
        keep: impl Fn(u64) -> bool,
    ) -> Result<Vec<(u64, f32)>> {
        let count = self.candidates(k, expansion);
        let index = self.inner.read().expect("index lock");
        let _slot = self.slots.acquire();
        let size = index.size();
        if size <= self.exact_below.load(Ordering::Relaxed) {
            // usearch's exact scan takes no predicate: rank everything, then filter.
            let mut m = index.exact_search(query, size.max(1))?;
            let (keys, distances): (Vec<u64>, Vec<f32>) = m
                .keys
                .iter()
                .zip(&m.distances)
                .filter(|(key, _)| keep(**key))
                .take(count)
                .unzip();
            (m.keys, m.distances) = (keys, distances);
            return Ok(self.matches(m, Vec::new(), count, k));
        }
        let m = index.filtered_search(query, count, &keep)?;
        Ok(self.matches(m, self.stash.search(query, count, &keep)?, count, k))
    }

    /// Sets the size up to which searches scan every vector instead of walking the graph
    /// ([`EXACT_BELOW`] by default; 0: always walk). For tests and benchmarks that look
    /// at the graph itself on small data.
    pub fn set_exact_below(&self, n: usize) {
        self.exact_below.store(n, Ordering::Relaxed);
    }

    /// The ef a search runs at: what usearch is asked for (see the module docs).
    pub fn candidates(&self, k: usize, expansion: usize) -> usize {
        let ef = if expansion == 0 {
            self.default_expansion
        } else {
            expansion
        };
        ef.max(k).max(1)
    }

    /// The graph's `count` candidates and the stash's, merged, cut to k, with API
    /// distances.
    fn matches(
        &self,
        m: usearch::ffi::Matches,
        stash: Vec<(u64, f32)>,
        count: usize,
        k: usize,
    ) -> Vec<(u64, f32)> {
        let mut hits: Vec<(u64, f32)> = m.keys.into_iter().zip(m.distances).collect();
        reach::merge(&mut hits, stash, count);
        hits.into_iter()
            .take(k)
            .map(|(k, d)| (k, self.api_distance(d)))
            .collect()
    }

    /// usearch reports squared L2; the API promises Euclidean.
    fn api_distance(&self, d: f32) -> f32 {
        match self.metric {
            Metric::L2 => d.max(0.0).sqrt(),
            Metric::Cosine | Metric::InnerProduct => d,
        }
    }

    /// Makes room for `extra` more vectors beyond what is present and pending.
    fn reserve_for(&self, extra: usize) -> Result<()> {
        let mut pending = self.pending.lock().expect("pending lock");
        let need = {
            let index = self.inner.read().expect("index lock");
            index.size() + *pending + extra
        };
        let capacity = self.inner.read().expect("index lock").capacity();
        if need > capacity {
            let index = self.inner.write().expect("index lock");
            // Grow geometrically so that a stream of small batches reserves rarely.
            index.reserve_capacity_and_threads(need.max(capacity * 2), SLOTS)?;
        }
        *pending += extra;
        Ok(())
    }
}

fn options(spec: &CollectionSpec) -> IndexOptions {
    IndexOptions {
        dimensions: spec.dimension as usize,
        metric: match spec.metric {
            Metric::Cosine => MetricKind::Cos,
            Metric::L2 => MetricKind::L2sq,
            Metric::InnerProduct => MetricKind::IP,
        },
        quantization: match spec.precision {
            Precision::F32 => ScalarKind::F32,
            Precision::F16 => ScalarKind::F16,
            Precision::I8 => ScalarKind::I8,
        },
        connectivity: spec.index.connectivity as usize,
        expansion_add: spec.index.expansion_add as usize,
        expansion_search: ENGINE_EXPANSION,
        multi: false,
    }
}

fn default_expansion(spec: &CollectionSpec) -> usize {
    match spec.index.expansion_search {
        0 => 64,
        ef => ef as usize,
    }
}

fn check_dimensions(index: &usearch::Index, dimensions: u32, path: &Path) -> Result<()> {
    if index.dimensions() != dimensions as usize {
        return Err(Error::Index(format!(
            "snapshot {} has {} dimensions, expected {dimensions}",
            path.display(),
            index.dimensions(),
        )));
    }
    Ok(())
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| Error::Index(format!("path {} is not UTF-8", path.display())))
}

/// A counting semaphore for blocking threads: usearch fails rather than waits when all
/// of its thread slots are taken, so callers queue here first.
struct Slots {
    free: Mutex<usize>,
    cv: Condvar,
}

struct SlotGuard<'a>(&'a Slots);

impl Slots {
    fn new(n: usize) -> Self {
        Slots {
            free: Mutex::new(n),
            cv: Condvar::new(),
        }
    }

    fn acquire(&self) -> SlotGuard<'_> {
        let mut free = self.free.lock().expect("slots lock");
        while *free == 0 {
            free = self.cv.wait(free).expect("slots lock");
        }
        *free -= 1;
        SlotGuard(self)
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().expect("slots lock") += 1;
        self.0.cv.notify_one();
    }
}

/// Ends a sweep however it returns: the keys it was started for are no longer unswept
/// (when it fails too: the next is due by the usual rule, not at once and in a loop).
struct SweepDone<'a>(&'a AnnIndex, usize);

impl Drop for SweepDone<'_> {
    fn drop(&mut self) {
        self.0.grown.fetch_sub(self.1, Ordering::Relaxed);
        self.0.sweeping.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(metric: Metric) -> CollectionSpec {
        CollectionSpec {
            model: String::new(),
            ..CollectionSpec::for_test("t", metric)
        }
    }

    #[test]
    fn concurrent_batches_grow_capacity_safely() {
        let index = AnnIndex::new(&spec(Metric::Cosine), 0).unwrap();
        let batches: Vec<Vec<(u64, Vec<f32>)>> = (0..6u64)
            .map(|b| {
                (0..700u64)
                    .map(|i| {
                        let k = b * 700 + i;
                        (
                            k,
                            vec![1.0 + k as f32, (k % 7) as f32, (k % 11) as f32, 1.0],
                        )
                    })
                    .collect()
            })
            .collect();
        std::thread::scope(|s| {
            for batch in &batches {
                let index = &index;
                s.spawn(move || {
                    let refs: Vec<(u64, &[f32])> =
                        batch.iter().map(|(k, v)| (*k, v.as_slice())).collect();
                    index.add_many(&refs, 2).unwrap();
                });
            }
        });
        assert_eq!(index.len(), 4200);
        assert_eq!(*index.pending.lock().unwrap(), 0);
    }

    #[test]
    fn a_small_index_is_searched_exactly_filters_included() {
        // 200 copies of one vector crowd the graph, so that a walk at a low ef misses
        // some true neighbours of the other 500 vectors; below EXACT_BELOW a search
        // scans, and plain and filtered answers are the brute-force ones.
        let mut rng = crate::rng::Rng::new(5);
        let mut vectors = vec![vec![1.0f32, 2.0, 3.0, 4.0]; 200];
        vectors.extend((0..500).map(|_| (0..4).map(|_| rng.normal()).collect::<Vec<f32>>()));
        let refs: Vec<(u64, &[f32])> = vectors
            .iter()
            .enumerate()
            .map(|(i, v)| (i as u64, v.as_slice()))
            .collect();
        let index = AnnIndex::new(&spec(Metric::L2), 0).unwrap();
        index.add_many(&refs, 1).unwrap();
        index.remove_many(&[250]).unwrap();
        let brute = |q: &[f32], keep: &dyn Fn(u64) -> bool| -> Vec<f32> {
            let mut d: Vec<f32> = refs
                .iter()
                .filter(|(k, _)| *k != 250 && keep(*k))
                .map(|(_, v)| v.iter().zip(q).map(|(a, b)| (a - b) * (a - b)).sum::<f32>())
                .map(f32::sqrt)
                .collect();
            d.sort_by(f32::total_cmp);
            d.truncate(10);
            d
        };
        let same = |hits: &[(u64, f32)], want: &[f32]| {
            hits.len() == want.len()
                && hits.iter().zip(want).all(|(h, w)| (h.1 - w).abs() < 1e-4)
                && hits.iter().all(|h| h.0 != 250)
        };
        let odd = |k: u64| k % 2 == 1;
        let mut walk_misses = 0;
        for (_, v) in &refs[200..] {
            let hits = index.search(v, 10, 16).unwrap();
            assert!(same(&hits, &brute(v, &|_| true)), "{hits:?}");
            let hits = index.filtered_search(v, 10, 16, odd).unwrap();
            assert!(same(&hits, &brute(v, &odd)), "{hits:?}");
            assert!(hits.iter().all(|h| odd(h.0)));
            index.set_exact_below(0);
            walk_misses += !same(&index.search(v, 10, 16).unwrap(), &brute(v, &|_| true)) as usize;
            index.set_exact_below(EXACT_BELOW);
        }
        // The scan is what made those exact: the graph alone misses some.
        assert!(walk_misses > 0);
    }

    #[test]
    fn a_sweep_is_due_after_half_again_or_after_a_quiet_while() {
        let index = AnnIndex::new(&spec(Metric::L2), 0).unwrap();
        let vectors: Vec<Vec<f32>> = (0..1000)
            .map(|i| vec![i as f32, 1.0, (i % 7) as f32, 2.0])
            .collect();
        let refs: Vec<(u64, &[f32])> = vectors
            .iter()
            .enumerate()
            .map(|(i, v)| (i as u64, v.as_slice()))
            .collect();
        let sweep = |upto: usize| {
            let items = refs[..upto].iter().map(|(k, v)| Ok((*k, v.to_vec())));
            index.sweep(items, 1).unwrap();
        };
        index.add_many(&refs[..600], 1).unwrap();
        assert!(index.sweep_due()); // never swept
        sweep(600);
        assert_eq!(index.unswept(), 0);
        assert!(!index.sweep_due());
        index.add_many(&refs[600..700], 1).unwrap();
        assert_eq!(index.unswept(), 100);
        assert!(!index.sweep_due()); // 100 of 600: not yet
        index.add_many(&refs[700..900], 1).unwrap();
        assert!(index.sweep_due()); // 300 of 600: half again
        sweep(900);
        index.add_many(&refs[900..], 1).unwrap();
        assert!(!index.sweep_due());
        // The sweep took well under SWEEP_MIN: the catch-up is due after SWEEP_MIN x 4.
        std::thread::sleep(SWEEP_MIN * SWEEP_CATCH_UP + Duration::from_millis(50));
        assert!(index.sweep_due());
        sweep(1000);
        assert_eq!(index.unswept(), 0);
        assert!(!index.sweep_due());
    }

    #[test]
    fn l2_distances_are_euclidean() {
        let index = AnnIndex::new(&spec(Metric::L2), 0).unwrap();
        index
            .add_many(
                &[
                    (1, &[0.0, 0.0, 0.0, 0.0][..]),
                    (2, &[3.0, 4.0, 0.0, 0.0][..]),
                ],
                1,
            )
            .unwrap();
        let hits = index.search(&[0.0; 4], 2, 0).unwrap();
        assert_eq!(hits[0], (1, 0.0));
        assert_eq!(hits[1].0, 2);
        assert!((hits[1].1 - 5.0).abs() < 1e-5, "{}", hits[1].1);
    }

    #[test]
    fn f32_vectors_come_back_exactly_under_every_metric() {
        // The miner reads vectors from the index: they must be what was added, not a
        // normalised copy.
        for metric in [Metric::Cosine, Metric::L2, Metric::InnerProduct] {
            let index = AnnIndex::new(&spec(metric), 0).unwrap();
            let v = [3.0, -4.0, 0.5, 12.0];
            index.add_many(&[(7, &v[..])], 1).unwrap();
            assert_eq!(index.vector(7).unwrap(), v.to_vec(), "{metric:?}");
            assert!(index.vector(8).is_none());
            assert!(index.contains(7) && !index.contains(8));
        }
    }

    #[test]
    fn a_viewed_snapshot_serves_and_becomes_writable_on_the_first_write() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(Metric::L2);
        let index = AnnIndex::new(&s, 0).unwrap();
        let vectors: Vec<Vec<f32>> = (0..500).map(|i| vec![i as f32, 1.0, 0.0, 2.0]).collect();
        let refs: Vec<(u64, &[f32])> = vectors
            .iter()
            .enumerate()
            .map(|(i, v)| (i as u64, v.as_slice()))
            .collect();
        index.add_many(&refs, 1).unwrap();
        let path = dir.path().join("t.usearch");
        index.save(&path).unwrap();
        let viewed = AnnIndex::view(&s, &path).unwrap();
        assert!(viewed.is_view());
        assert_eq!(viewed.len(), 500);
        assert_eq!(viewed.search(&vectors[42], 1, 0).unwrap()[0].0, 42);
        assert_eq!(viewed.vector(42).unwrap(), vectors[42]);
        viewed
            .add_many(&[(1000, &[7.5, 1.0, 0.0, 2.0][..])], 1)
            .unwrap();
        assert!(!viewed.is_view());
        assert_eq!(viewed.len(), 501);
        assert_eq!(
            viewed.search(&[7.5, 1.0, 0.0, 2.0], 1, 0).unwrap()[0].0,
            1000
        );
        viewed.remove_many(&[42]).unwrap();
        assert_eq!(viewed.len(), 500);
        // The snapshot file itself never changed.
        assert_eq!(AnnIndex::load(&s, &path).unwrap().len(), 500);
    }
}
