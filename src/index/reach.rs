//! Reachability of the HNSW graph: finding the nodes that an unfiltered search cannot
//! reach, re-linking them, and keeping the few that stay out of reach findable anyway
//! (issue 20).
//!
//! An HNSW node whose neighbours all keep closer, more diverse neighbours than it gets no
//! incoming edge (their lists are full and usearch's heuristic prunes it), and a later
//! insertion can prune a node's last incoming edge too. The node is stored, `contains`
//! finds it, the index audit counts it, yet no graph walk arrives at it: to its owner the
//! item is lost. Measured in process (docs/benchmarks.md, "Unreachable nodes"): about 0.1%
//! of 100,000 clustered vectors, whether the graph is built by one thread or by several,
//! and as many in usearch's own build.
//!
//! # The check
//!
//! A key is checked by a search for its own vector at the index's default ef: the very
//! search a k = 1 query at that ef makes, since the walk keeps `ef` candidates whatever k
//! is (see the parent module). The key is *reached* when it is among the results, or when
//! every result is at least as near to the vector as the key itself is (a list filled by
//! exact duplicates, or, under inner product, by items with a larger dot product). It is
//! *unreachable* when the list ends with a result farther than the key, or is short, and
//! lacks the key: a search that had arrived at the key would have kept it.
//!
//! The key's distance to its own vector is usearch's own, not a re-implementation: a
//! scratch index of one vector with the same metric and quantisation measures it, so the
//! comparison holds bit for bit (an exact duplicate is at exactly the same distance).
//! It is needed only for keys missing from their own results.
//!
//! # The repair
//!
//! An unreachable key is removed and added again with the same vector, on one thread, with
//! the index's write lock held: no search, insert or remove runs beside it, so a batch
//! that replaces the item meanwhile cannot see it vanish, nor have its removal undone by
//! the re-add. usearch 2.26 (`index_dense_gt::add_`) gives the re-added key the oldest
//! freed slot (`remove` marks the old one free and keeps it in the graph as a pass-through
//! node; `add` re-links a free slot with `update`): the node gets fresh outgoing links
//! and reverse links from its new neighbours. That reaches about half of them. The rest
//! are pruned out again by the same heuristic (a second try re-links the same way: tried,
//! it repaired none), so they go to the [`Stash`]: an exact list that every search of
//! the index scans beside the graph. With it, the promise is exact: after a check, a k = 1
//! search at the default ef for a checked item's own vector returns the item, or an item
//! at least as near (an exact duplicate at distance 0 under L2 and cosine). A stashed key
//! that a later check finds reachable through the graph leaves the stash.

use std::collections::HashSet;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use usearch::ffi::IndexOptions;

use crate::error::{Error, Result};

/// What the checks and repairs of one index have found, since it was built or loaded.
#[derive(Debug, Default)]
pub struct ReachStats {
    checked: AtomicU64,
    unreachable: AtomicU64,
    repaired: AtomicU64,
    stashed: AtomicU64,
    sweeps: AtomicU64,
    micros: AtomicU64,
}

/// A copy of an index's [`ReachStats`] at one moment, and its stash: what metrics
/// export (as counters, but `in_stash`, a gauge).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReachCounts {
    /// Keys whose own search was checked.
    pub checked: u64,
    /// Keys an unfiltered graph search could not reach when checked.
    pub unreachable: u64,
    /// Of those, keys that a re-link made reachable through the graph.
    pub repaired: u64,
    /// Of those, keys the re-link did not help, put in the stash.
    pub stashed: u64,
    /// Keys in the stash now (searched exactly beside the graph).
    pub in_stash: u64,
    /// Sweeps (checks of every stored key) completed.
    pub sweeps: u64,
    /// Time spent checking and repairing, in microseconds.
    pub micros: u64,
}

impl ReachStats {
    pub(super) fn counts(&self, in_stash: usize) -> ReachCounts {
        ReachCounts {
            checked: self.checked.load(Ordering::Relaxed),
            unreachable: self.unreachable.load(Ordering::Relaxed),
            repaired: self.repaired.load(Ordering::Relaxed),
            stashed: self.stashed.load(Ordering::Relaxed),
            in_stash: in_stash as u64,
            sweeps: self.sweeps.load(Ordering::Relaxed),
            micros: self.micros.load(Ordering::Relaxed),
        }
    }

    pub(super) fn record(&self, r: &Reach, started: Instant) {
        self.checked.fetch_add(r.checked as u64, Ordering::Relaxed);
        self.unreachable
            .fetch_add(r.unreachable as u64, Ordering::Relaxed);
        self.repaired
            .fetch_add(r.repaired as u64, Ordering::Relaxed);
        self.stashed.fetch_add(r.stashed as u64, Ordering::Relaxed);
        self.micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    pub(super) fn swept(&self) {
        self.sweeps.fetch_add(1, Ordering::Relaxed);
    }
}

/// What one check (and the repair after it) found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reach {
    pub checked: usize,
    /// Keys found unreachable through the graph (stashed ones included).
    pub unreachable: usize,
    /// Of those, keys a re-link made reachable.
    pub repaired: usize,
    /// Of those, keys put in the stash (or left there).
    pub stashed: usize,
    /// Stashed keys that the graph reaches now, taken out of the stash.
    pub released: usize,
}

impl std::ops::AddAssign for Reach {
    fn add_assign(&mut self, o: Reach) {
        self.checked += o.checked;
        self.unreachable += o.unreachable;
        self.repaired += o.repaired;
        self.stashed += o.stashed;
        self.released += o.released;
    }
}

/// Whether a search for `vector` at `ef` reaches `key` through the graph (see the module
/// docs). A key that is not in the index is not unreachable: there is nothing to find.
pub fn reaches(index: &usearch::Index, key: u64, vector: &[f32], ef: usize) -> Result<bool> {
    if !index.contains(key) {
        return Ok(true);
    }
    let ef = ef.max(1);
    let m = index.search(vector, ef)?;
    if m.keys.contains(&key) {
        return Ok(true);
    }
    let Some(&farthest) = m.distances.last() else {
        return Ok(false);
    };
    if m.keys.len() < ef {
        // Room was left in the list, and the key did not get there.
        return Ok(false);
    }
    Ok(farthest <= own_distance(index, vector)?)
}

/// An empty index with the metric, quantisation and dimensions of `index`.
fn like(index: &usearch::Index, capacity: usize, threads: usize) -> Result<usearch::Index> {
    let other = usearch::Index::new(&IndexOptions {
        dimensions: index.dimensions(),
        metric: index.metric_kind(),
        quantization: index.scalar_kind(),
        connectivity: 2,
        expansion_add: 0,
        expansion_search: 0,
        multi: false,
    })?;
    other.reserve_capacity_and_threads(capacity.max(1), threads.max(1))?;
    Ok(other)
}

/// usearch's distance from `vector` to itself as `index` stores it: measured by a
/// scratch index of one vector with the same metric and quantisation, so that the same
/// cast and the same kernel produce it.
fn own_distance(index: &usearch::Index, vector: &[f32]) -> Result<f32> {
    let scratch = like(index, 1, 1)?;
    scratch.add(0, vector)?;
    let m = scratch.search(vector, 1)?;
    m.distances
        .first()
        .copied()
        .ok_or_else(|| Error::Index("a one-vector index found nothing for its own vector".into()))
}

/// The entries whose own search at `ef` does not reach them, checked on up to `threads`
/// threads (each holding one of the index's thread slots through `slot`).
pub fn unreachable<'e, G>(
    index: &usearch::Index,
    entries: &[(u64, &'e [f32])],
    ef: usize,
    threads: usize,
    slot: impl Fn() -> G + Sync,
) -> Result<Vec<(u64, &'e [f32])>> {
    const CHUNK: usize = 64;
    let threads = threads.max(1).min(entries.len().div_ceil(CHUNK)).max(1);
    let cursor = AtomicUsize::new(0);
    let check = || -> Result<Vec<(u64, &'e [f32])>> {
        let _slot = slot();
        let mut found = Vec::new();
        loop {
            let start = cursor.fetch_add(CHUNK, Ordering::Relaxed);
            if start >= entries.len() {
                return Ok(found);
            }
            for &(key, v) in &entries[start..(start + CHUNK).min(entries.len())] {
                if !reaches(index, key, v, ef)? {
                    found.push((key, v));
                }
            }
        }
    };
    if threads == 1 {
        return check();
    }
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads).map(|_| s.spawn(check)).collect();
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.join().expect("reach check thread panicked")?);
        }
        Ok(all)
    })
}

/// Re-links the `flagged` keys, each with its vector (see the module docs), and returns
/// those still unreachable after it. The caller holds the index exclusively: nothing
/// else may search, add or remove meanwhile. A key removed since it was flagged is
/// skipped.
pub fn relink<'e>(
    index: &usearch::Index,
    flagged: &[(u64, &'e [f32])],
    ef: usize,
) -> Result<Vec<(u64, &'e [f32])>> {
    let mut left = Vec::new();
    for &(key, vector) in flagged {
        if !index.contains(key) {
            continue;
        }
        index.remove(key)?;
        index.add(key, vector).map_err(|e| {
            Error::Index(format!(
                "re-adding key {key} to repair its reachability failed ({}); the index \
                 lacks it until it is rebuilt",
                e.what()
            ))
        })?;
        if !reaches(index, key, vector, ef)? {
            left.push((key, vector));
        }
    }
    Ok(left)
}

/// The keys that stay out of the graph's reach after a re-link, searched exactly beside
/// it. Kept in a small usearch index of their own with the graph's metric and
/// quantisation, searched by brute force (`exact_search`), so that their distances are
/// the graph's to the bit and the two result lists merge by distance.
///
/// What it costs each search: one distance per stashed key (about 0.1% of the items in
/// the worst measured case: 0.1 x 128-d distances per 100 items).
#[derive(Default)]
pub struct Stash {
    inner: RwLock<Option<StashIndex>>,
}

struct StashIndex {
    index: usearch::Index,
    keys: HashSet<u64>,
}

impl Stash {
    pub fn len(&self) -> usize {
        self.inner
            .read()
            .expect("stash lock")
            .as_ref()
            .map_or(0, |s| s.keys.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, key: u64) -> bool {
        self.inner
            .read()
            .expect("stash lock")
            .as_ref()
            .is_some_and(|s| s.keys.contains(&key))
    }

    /// The stashed keys, in no order (for the snapshot).
    pub fn keys(&self) -> Vec<u64> {
        self.inner
            .read()
            .expect("stash lock")
            .as_ref()
            .map_or_else(Vec::new, |s| s.keys.iter().copied().collect())
    }

    /// Adds keys with their vectors; `like` is the graph they belong to.
    pub fn insert(&self, like_index: &usearch::Index, entries: &[(u64, &[f32])]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut guard = self.inner.write().expect("stash lock");
        if guard.is_none() {
            *guard = Some(StashIndex {
                index: like(like_index, 64, super::SLOTS)?,
                keys: HashSet::new(),
            });
        }
        let stash = guard.as_mut().expect("stash created above");
        for &(key, v) in entries {
            if stash.keys.contains(&key) {
                continue;
            }
            if stash.index.size() + 1 > stash.index.capacity() {
                let grown = (stash.index.capacity() * 2).max(64);
                stash
                    .index
                    .reserve_capacity_and_threads(grown, super::SLOTS)?;
            }
            stash.index.add(key, v)?;
            stash.keys.insert(key);
        }
        Ok(())
    }

    /// Forgets keys (removed from the index, or reachable through the graph again).
    pub fn remove(&self, keys: &[u64]) -> Result<usize> {
        let mut guard = self.inner.write().expect("stash lock");
        let Some(stash) = guard.as_mut() else {
            return Ok(0);
        };
        let mut removed = 0;
        for key in keys {
            if stash.keys.remove(key) {
                stash.index.remove(*key)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Every stashed key passing `keep`, with its raw usearch distance to `query`,
    /// nearest first, at most `count`.
    pub fn search(
        &self,
        query: &[f32],
        count: usize,
        keep: impl Fn(u64) -> bool,
    ) -> Result<Vec<(u64, f32)>> {
        let guard = self.inner.read().expect("stash lock");
        let Some(stash) = guard.as_ref().filter(|s| !s.keys.is_empty()) else {
            return Ok(Vec::new());
        };
        let m = stash.index.exact_search(query, stash.keys.len())?;
        Ok(m.keys
            .into_iter()
            .zip(m.distances)
            .filter(|(k, _)| keep(*k))
            .take(count)
            .collect())
    }
}

/// Merges the stash's hits into the graph's (both nearest first, raw distances): a key
/// found by both counts once.
pub fn merge(graph: &mut Vec<(u64, f32)>, stash: Vec<(u64, f32)>, count: usize) {
    if stash.is_empty() {
        return;
    }
    let seen: HashSet<u64> = graph.iter().map(|(k, _)| *k).collect();
    graph.extend(stash.into_iter().filter(|(k, _)| !seen.contains(k)));
    graph.sort_by(|a, b| a.1.total_cmp(&b.1));
    graph.truncate(count);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::AnnIndex;
    use crate::rng::Rng;
    use crate::types::{CollectionSpec, Metric, Precision};

    fn spec(dimension: u32, metric: Metric, precision: Precision) -> CollectionSpec {
        CollectionSpec {
            dimension,
            precision,
            ..CollectionSpec::for_test("reach", metric)
        }
    }

    fn gaussian(n: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|_| (0..dim).map(|_| rng.normal()).collect())
            .collect()
    }

    fn entries(vectors: &[Vec<f32>]) -> Vec<(u64, &[f32])> {
        vectors
            .iter()
            .enumerate()
            .map(|(i, v)| (i as u64, v.as_slice()))
            .collect()
    }

    /// Batches of 500 from four writers, each on two threads, as the daemon inserts.
    fn concurrent_build(index: &AnnIndex, entries: &[(u64, &[f32])]) {
        let batches: Vec<_> = entries.chunks(500).collect();
        let next = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    while let Some(b) = batches.get(next.fetch_add(1, Ordering::Relaxed)) {
                        index.add_many(b, 2).unwrap();
                    }
                });
            }
        });
    }

    /// The keys whose k = 1 search at the default ef returns another key.
    fn not_first(index: &AnnIndex, entries: &[(u64, &[f32])]) -> Vec<u64> {
        entries
            .iter()
            .filter(|(k, v)| index.search(v, 1, 0).unwrap().first().map(|h| h.0) != Some(*k))
            .map(|(k, _)| *k)
            .collect()
    }

    fn sweep(index: &AnnIndex, vectors: &[Vec<f32>]) -> Reach {
        let items = vectors
            .iter()
            .enumerate()
            .map(|(i, v)| Ok((i as u64, v.clone())));
        index.sweep(items, 2).unwrap()
    }

    #[test]
    fn a_sweep_leaves_every_key_of_a_concurrent_build_its_own_nearest_neighbour() {
        // 30,000 16-d Gaussian vectors, L2: a build of them leaves a few dozen keys that
        // their own search misses (the README's probe found 3 in 4,000).
        let vectors = gaussian(30_000, 16, 11);
        let entries = entries(&vectors);
        let index = AnnIndex::new(&spec(16, Metric::L2, Precision::F32), 0).unwrap();
        index.set_exact_below(0); // the graph itself, not the small-index scan
        concurrent_build(&index, &entries);
        assert!(index.sweep_due());
        let before = index.unreachable(&entries, 2).unwrap();
        let missed = not_first(&index, &entries);
        println!(
            "unreachable after a concurrent build: {}; not first at k = 1: {}",
            before.len(),
            missed.len()
        );
        // Every key the check flags is one that k = 1 misses: no false alarm.
        for key in &before {
            assert!(missed.contains(key), "{key} flagged but found at k = 1");
        }
        let r = sweep(&index, &vectors);
        assert_eq!(r.checked, entries.len());
        assert_eq!(r.unreachable, before.len());
        assert_eq!(r.repaired + r.stashed, before.len(), "{r:?}");
        assert_eq!(index.len(), entries.len());
        assert!(!index.sweep_due());
        let counts = index.reach_counts();
        assert_eq!((counts.sweeps, counts.in_stash), (1, r.stashed as u64));
        // What the graph still misses, the stash finds: no key is lost to search.
        assert_eq!(not_first(&index, &entries), Vec::<u64>::new(), "{r:?}");
        // A repaired key keeps its vector.
        for key in before {
            assert_eq!(index.vector(key).unwrap(), vectors[key as usize]);
        }
        // A second sweep re-links nothing: the stashed keys stay stashed.
        let again = sweep(&index, &vectors);
        assert_eq!(again.repaired, 0, "{again:?}");
        assert_eq!(again.stashed + again.released, r.stashed, "{again:?}");
    }

    #[test]
    fn stashed_keys_are_searched_filtered_and_removed_with_the_index() {
        let vectors = gaussian(2_000, 8, 3);
        let entries = entries(&vectors);
        let index = AnnIndex::new(&spec(8, Metric::L2, Precision::F32), 0).unwrap();
        index.set_exact_below(0); // the graph itself, not the small-index scan
        index.add_many(&entries, 1).unwrap();
        // Stash two reachable keys on purpose: found once each, not twice.
        let guard = index.inner.read().unwrap();
        index.stash.insert(&guard, &entries[5..7]).unwrap();
        drop(guard);
        let hits = index.search(entries[5].1, 3, 0).unwrap();
        assert_eq!(hits[0], (5, 0.0));
        assert_eq!(hits.iter().filter(|h| h.0 == 5).count(), 1);
        let hits = index
            .filtered_search(entries[5].1, 1, 0, |k| k != 5)
            .unwrap();
        assert_ne!(hits[0].0, 5);
        let hits = index
            .filtered_search(entries[6].1, 1, 0, |k| k == 6)
            .unwrap();
        assert_eq!(hits, vec![(6, 0.0)]);
        index.remove_many(&[5]).unwrap();
        assert!(
            index
                .search(entries[5].1, 5, 0)
                .unwrap()
                .iter()
                .all(|h| h.0 != 5)
        );
        assert_eq!(index.stashed_keys(), vec![6]);
        // A check that finds 6 reachable through the graph takes it out of the stash.
        let r = index.ensure_reachable(&entries[6..7], 1).unwrap();
        assert_eq!((r.unreachable, r.released), (0, 1));
        assert!(index.stashed_keys().is_empty());
    }

    #[test]
    fn a_relink_keeps_the_key_and_its_vector_under_every_precision() {
        for precision in [Precision::F32, Precision::F16, Precision::I8] {
            let vectors = gaussian(2_000, 8, 3);
            let entries = entries(&vectors);
            let index = AnnIndex::new(&spec(8, Metric::Cosine, precision), 0).unwrap();
            index.set_exact_below(0); // the graph itself, not the small-index scan
            index.add_many(&entries, 1).unwrap();
            // Reachable keys re-linked on purpose: still there, once, and found.
            let guard = index.inner.write().unwrap();
            let left = relink(&guard, &entries[5..8], 64).unwrap();
            drop(guard);
            assert!(left.is_empty(), "{precision:?}");
            assert_eq!(index.len(), 2_000, "{precision:?}");
            for (key, v) in &entries[5..8] {
                assert_eq!(index.search(v, 1, 0).unwrap()[0].0, *key, "{precision:?}");
            }
            // A quantised index measures a key's own distance as it stores it: no key
            // of a serial build is flagged for quantisation error.
            assert_eq!(
                index.unreachable(&entries, 2).unwrap(),
                Vec::<u64>::new(),
                "{precision:?}"
            );
        }
    }

    #[test]
    fn exact_duplicates_count_as_found_at_distance_zero() {
        // 200 copies of one vector, more than the ef of 64: a search for it returns 64 of
        // them at distance 0, and most copies are not among them. None is unreachable.
        let mut vectors = vec![vec![1.0, 2.0, 3.0, 4.0]; 200];
        vectors.extend(gaussian(500, 4, 5));
        let entries = entries(&vectors);
        let index = AnnIndex::new(&spec(4, Metric::L2, Precision::F32), 0).unwrap();
        index.set_exact_below(0); // the graph itself, not the small-index scan
        index.add_many(&entries, 1).unwrap();
        let hits = index.search(&vectors[0], 1, 0).unwrap();
        assert_eq!(hits[0].1, 0.0);
        assert!(hits[0].0 < 200);
        // No copy is flagged. (A crowd of copies does cut some of the other vectors
        // off: those are flagged, rightly, since k = 1 misses them.)
        let flagged = index.unreachable(&entries, 1).unwrap();
        assert!(flagged.iter().all(|k| *k >= 200), "{flagged:?}");
        let missed = not_first(&index, &entries);
        assert!(flagged.iter().all(|k| missed.contains(k)));
        // After a sweep, every k = 1 search for a stored vector answers it or a copy of
        // it at distance 0.
        sweep(&index, &vectors);
        for (key, v) in &entries {
            let hit = index.search(v, 1, 0).unwrap()[0];
            assert!(
                hit.0 == *key || (*key < 200 && hit.0 < 200 && hit.1 == 0.0),
                "{key}: {hit:?}"
            );
        }
    }

    #[test]
    fn under_inner_product_a_key_outranked_by_larger_vectors_is_not_unreachable() {
        // A short vector among long ones pointing the same way: its own search returns
        // 64 items with a larger dot product and not itself. That is ranking, not reach.
        let mut vectors: Vec<Vec<f32>> = (0..300)
            .map(|i| vec![10.0 + i as f32 * 0.01, 1.0, (i % 7) as f32 * 0.1, 0.0])
            .collect();
        vectors.push(vec![0.1, 0.01, 0.0, 0.0]);
        let entries = entries(&vectors);
        let index = AnnIndex::new(&spec(4, Metric::InnerProduct, Precision::F32), 0).unwrap();
        index.set_exact_below(0); // the graph itself, not the small-index scan
        index.add_many(&entries, 1).unwrap();
        let short = vectors.len() as u64 - 1;
        let hits = index.search(&vectors[short as usize], 64, 0).unwrap();
        assert!(!hits.iter().any(|h| h.0 == short));
        assert_eq!(index.unreachable(&entries, 1).unwrap(), Vec::<u64>::new());
    }

    #[test]
    fn a_key_removed_since_the_check_is_not_added_back() {
        let vectors = gaussian(1_000, 8, 9);
        let entries = entries(&vectors);
        let index = AnnIndex::new(&spec(8, Metric::L2, Precision::F32), 0).unwrap();
        index.set_exact_below(0); // the graph itself, not the small-index scan
        index.add_many(&entries, 1).unwrap();
        index.remove_many(&[3]).unwrap();
        let guard = index.inner.write().unwrap();
        assert!(relink(&guard, &entries[3..4], 64).unwrap().is_empty());
        drop(guard);
        assert!(!index.contains(3));
        assert_eq!(index.len(), 999);
    }

    #[test]
    fn a_snapshot_keeps_its_stash() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(8, Metric::L2, Precision::F32);
        let vectors = gaussian(1_000, 8, 4);
        let entries = entries(&vectors);
        let index = AnnIndex::new(&s, 0).unwrap();
        index.set_exact_below(0); // the graph itself, not the small-index scan
        index.add_many(&entries, 1).unwrap();
        let guard = index.inner.read().unwrap();
        index.stash.insert(&guard, &entries[9..10]).unwrap();
        drop(guard);
        let meta = crate::index::snapshot::SnapshotMeta {
            uid: s.uid,
            seq: 7,
            count: 1_000,
            catalogue: true,
        };
        crate::index::snapshot::save(dir.path(), &s.name, &index, b"", meta).unwrap();
        let loaded = crate::index::snapshot::load(&s, dir.path(), 7, 1_000).unwrap();
        assert_eq!(loaded.stashed_keys(), vec![9]);
        assert_eq!(loaded.search(entries[9].1, 1, 0).unwrap()[0], (9, 0.0));
    }
}
