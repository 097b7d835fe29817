//! Search over one collection: ANN through the index, exact by brute force over the
//! store, and the batched kNN the miner runs (exclusions, distance bounds, a
//! generation).
//!
//! Locks: an unfiltered search walks the HNSW graph holding no catalogue lock, and takes
//! the read lock only to turn keys into hits, so writers publishing a batch never queue
//! behind a search. A filtered search consults the catalogue for every candidate and so
//! holds the read lock while it walks.
//!
//! When a filter starves HNSW (fewer than k hits while more items match), the search
//! first grows its expansion, a few times; only then does it fall back to brute force.
//! Both are counted ([`super::collection::SearchStats`]). The miner's batched kNN never
//! falls back: each of its queries stays O(log N).

use std::collections::{BTreeMap, BinaryHeap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::catalogue::{Catalogue, LabelId, Tag};
use super::collection::Collection;
use super::validate;
use crate::error::{Field, Result};
use crate::pool::WorkPool;
use crate::types::{Hit, ItemData, QueryTarget, SearchParams};

/// How many times a starved search multiplies its expansion (by 4) before brute force.
const GROWTH_ROUNDS: usize = 3;

/// One query of a batched kNN.
#[derive(Debug, Clone, Default)]
pub struct KnnQuery {
    pub vector: Vec<f32>,
    /// A key never to return (the anchor itself).
    pub exclude_key: Option<u64>,
    /// A label never to return (the anchor's own, when mining negatives).
    pub exclude_label: Option<LabelId>,
    /// This query's own lower bound on distance (with the options' one, the larger
    /// holds): SEMI_HARD's second look beyond d_ap.
    pub min_distance: Option<f32>,
}

/// What every query of a batched kNN shares.
#[derive(Debug, Clone, Default)]
pub struct KnnOptions {
    /// Neighbours per query.
    pub k: usize,
    /// HNSW ef: candidates each query's graph search keeps (0: the collection's
    /// `expansion_search`; never fewer than k). Below the collection's default is
    /// allowed and really searches less.
    pub expansion: usize,
    pub exclude_keys: HashSet<u64>,
    pub exclude_labels: Vec<LabelId>,
    /// Only neighbours at least this far...
    pub min_distance: Option<f32>,
    /// ...and at most this far.
    pub max_distance: Option<f32>,
    /// Leave out items written with an older generation.
    pub min_generation: u64,
}

/// A neighbour found by a batched kNN.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Neighbour {
    pub key: u64,
    pub label: LabelId,
    pub distance: f32,
}

/// A batched kNN's answer.
#[derive(Debug, Clone, Default)]
pub struct KnnResult {
    /// Per query, nearest first.
    pub neighbours: Vec<Vec<Neighbour>>,
    /// Every write up to this generation (the store's sequence number) was visible to
    /// every query.
    pub generation: u64,
    /// Queries whose expansion had to grow to find k neighbours.
    pub expanded: u64,
}

impl Collection {
    /// k nearest to a vector or a stored item (which is itself left out), filtered.
    pub fn search(&self, field: &Field, query: &QueryTarget, p: &SearchParams) -> Result<Vec<Hit>> {
        validate::search_params(p, &self.limits)?;
        let (vector, exclude) = self.resolve(field, query)?;
        if p.exact {
            return self.exact_search(&vector, exclude.map(|e| e.1), p);
        }
        let exclude_key = exclude.map(|e| e.0);
        if p.filter.is_empty() {
            // usearch's plain search is about twice as fast as a filtered one. What the
            // catalogue no longer holds (a copy being replaced right now) and the query
            // item itself are dropped afterwards; only a shortfall takes the filtered path.
            let extra = usize::from(exclude_key.is_some());
            let found = self.index.search(&vector, p.k + extra, p.expansion)?;
            let c = self.catalogue();
            let mut found: Vec<(u64, f32)> = found
                .into_iter()
                .filter(|(k, _)| Some(*k) != exclude_key && c.contains_key(*k))
                .collect();
            if found.len() >= p.k.min(c.len().saturating_sub(extra)) {
                found.truncate(p.k);
                return self.hits(&c, found, p);
            }
        }
        let hits = {
            let c = self.catalogue();
            let filter = c.compile(&p.filter);
            let keep = |key: u64| {
                Some(key) != exclude_key && c.get(key).is_some_and(|e| filter.matches(e))
            };
            let mut ef = self.index.candidates(p.k, p.expansion);
            let mut matching = None;
            let mut answer = None;
            for round in 0..=GROWTH_ROUNDS {
                let found = self.index.filtered_search(&vector, p.k, ef, keep)?;
                if found.len() >= p.k {
                    answer = Some(found);
                    break;
                }
                // k hits are promised whenever k items match: count them.
                let m = *matching.get_or_insert_with(|| c.keys().filter(|k| keep(*k)).count());
                if found.len() >= m {
                    answer = Some(found);
                    break;
                }
                if round < GROWTH_ROUNDS {
                    self.count_expanded();
                    ef = ef.saturating_mul(4);
                }
            }
            match answer {
                Some(found) => Some(self.hits(&c, found, p)?),
                None => None,
            }
        };
        match hits {
            Some(h) => Ok(h),
            None => {
                self.count_fallback();
                self.exact_search(&vector, exclude.map(|e| e.1), p)
            }
        }
    }

    fn hits(&self, c: &Catalogue, found: Vec<(u64, f32)>, p: &SearchParams) -> Result<Vec<Hit>> {
        let mut hits = Vec::with_capacity(found.len());
        for (key, distance) in found {
            let Some(e) = c.get(key) else {
                continue;
            };
            let vector = if p.with_vectors {
                match self.index.vector(key) {
                    Some(v) => v,
                    None => self
                        .items
                        .get(&e.id, true)?
                        .map(|(_, it)| it.vector)
                        .unwrap_or_default(),
                }
            } else {
                Vec::new()
            };
            hits.push(Hit {
                id: e.id.to_string(),
                label: c.label_name(e.label).to_string(),
                distance,
                metadata: if p.with_metadata {
                    e.metadata.clone()
                } else {
                    BTreeMap::new()
                },
                vector,
                pair_score: None,
            });
        }
        Ok(hits)
    }

    /// Brute force over the store with exact f64 distances.
    fn exact_search(
        &self,
        query: &[f32],
        exclude: Option<&str>,
        p: &SearchParams,
    ) -> Result<Vec<Hit>> {
        let mut heap: BinaryHeap<Ranked> = BinaryHeap::with_capacity(p.k + 1);
        for rec in self.items.scan(true) {
            let (_, item) = rec?;
            if Some(item.id.as_str()) == exclude || !p.filter.matches(&item.label, &item.metadata) {
                continue;
            }
            let d = self.spec.metric.distance(query, &item.vector);
            if heap.len() < p.k {
                heap.push(Ranked(d, item));
            } else if heap.peek().is_some_and(|top| d < top.0) {
                heap.pop();
                heap.push(Ranked(d, item));
            }
        }
        Ok(heap
            .into_sorted_vec()
            .into_iter()
            .map(|Ranked(distance, item)| Hit {
                id: item.id,
                label: item.label,
                distance,
                metadata: if p.with_metadata {
                    item.metadata
                } else {
                    BTreeMap::new()
                },
                vector: if p.with_vectors {
                    item.vector
                } else {
                    Vec::new()
                },
                pair_score: None,
            })
            .collect())
    }

    /// Batched kNN for the miner: per query, the k nearest keys that are not excluded
    /// (the query's own key and label, `opts`' keys and labels, older generations) and
    /// lie within the distance bounds. Each query walks the graph; a starved one grows
    /// its expansion up to three times and then returns what it found, never a scan of
    /// the store.
    ///
    /// Most queries need no filter inside the walk: with many labels the anchor's own
    /// rarely fills its neighbourhood, so a plain search for k plus a little slack,
    /// with the exclusions dropped afterwards, is enough, at usearch's plain speed
    /// (a filtered walk calls back into Rust for every node it visits). Only a query
    /// that comes up short takes the filtered walk. Where the exclusions do fill the
    /// neighbourhood (a trained embedding, whose nearest items share the anchor's
    /// label), the collection remembers that plain attempts keep coming up short and
    /// goes straight to the filtered walk, probing the plain one every
    /// [`PLAIN_PROBE`]th query. Either way the predicate reads the catalogue's dense
    /// tag array, not its hash map.
    pub fn knn_batch(&self, queries: &[KnnQuery], opts: &KnnOptions) -> Result<KnnResult> {
        let mut out = KnnResult {
            neighbours: Vec::with_capacity(queries.len()),
            generation: self.generation(),
            expanded: 0,
        };
        let base = self.index.candidates(opts.k, opts.expansion);
        let plain_count = self
            .index
            .candidates(opts.k + knn_slack(opts.k), opts.expansion);
        let hint = self.stats.knn_shortfall.load(Ordering::Relaxed);
        let (mut tried, mut short, mut plain, mut filtered) = (0u32, 0u32, 0u64, 0u64);
        for (qi, q) in queries.iter().enumerate() {
            let min_distance = match (opts.min_distance, q.min_distance) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            let within = |d: f32| {
                min_distance.is_none_or(|m| d >= m) && opts.max_distance.is_none_or(|m| d <= m)
            };
            // A floor on distance excludes the nearest: the plain walk cannot serve it.
            let try_plain =
                min_distance.is_none() && (hint < SHORTFALL_LIMIT || qi % PLAIN_PROBE == 0);
            if try_plain {
                tried += 1;
                let raw = self.index.search(&q.vector, plain_count, plain_count)?;
                let walked_all = raw.len() < plain_count;
                let c = self.catalogue();
                let keep = |key: u64| keep_key(&c, q, opts, key);
                let mut found: Vec<Neighbour> = Vec::with_capacity(opts.k);
                for (key, d) in raw {
                    if found.len() == opts.k {
                        break;
                    }
                    if within(d) && keep(key) {
                        let label = c.tag(key).map_or(0, |t| t.label);
                        found.push(Neighbour {
                            key,
                            label,
                            distance: d,
                        });
                    }
                }
                if found.len() == opts.k || walked_all {
                    plain += 1;
                    out.neighbours.push(found);
                    continue;
                }
                short += 1;
            }
            filtered += 1;
            // The walk reads tags without the catalogue's lock: a writer waiting to
            // publish would otherwise wait for the whole walk (and every reader behind
            // the writer with it).
            let (tags, eligible) = {
                let c = self.catalogue();
                // How many keys could pass at most: the label index makes this cheap.
                let mut labels: Vec<LabelId> = opts.exclude_labels.clone();
                labels.extend(q.exclude_label);
                labels.sort_unstable();
                labels.dedup();
                let excluded: usize = labels.iter().map(|l| c.members(*l).len()).sum();
                (c.tag_view(), c.len().saturating_sub(excluded))
            };
            let keep = |key: u64| keep_tag(tags.get(key), q, opts, key);
            let mut count = base;
            let mut found;
            let mut round = 0;
            loop {
                // All `count` candidates come back, not just k: the distance bounds are
                // applied to them here, so a floor can skip the nearest few.
                let raw = self.index.filtered_search(&q.vector, count, count, keep)?;
                let farthest = raw.last().map(|h| h.1);
                let walked = raw.len();
                found = raw
                    .into_iter()
                    .filter(|(_, d)| within(*d))
                    .collect::<Vec<_>>();
                let enough = found.len() >= opts.k;
                // Every eligible key seen, or the walk already went past max_distance
                // (hits come nearest first): more expansion cannot add anything.
                let done = walked >= eligible
                    || opts.max_distance.zip(farthest).is_some_and(|(m, f)| f > m);
                if enough || done || round == GROWTH_ROUNDS {
                    break;
                }
                out.expanded += u64::from(round == 0);
                count = count.saturating_mul(4);
                round += 1;
            }
            found.truncate(opts.k);
            out.neighbours.push(
                found
                    .into_iter()
                    .filter_map(|(key, distance)| {
                        tags.get(key).map(|t| Neighbour {
                            key,
                            label: t.label,
                            distance,
                        })
                    })
                    .collect(),
            );
        }
        if out.expanded > 0 {
            self.stats
                .expanded
                .fetch_add(out.expanded, Ordering::Relaxed);
        }
        self.stats.knn_plain.fetch_add(plain, Ordering::Relaxed);
        self.stats
            .knn_filtered
            .fetch_add(filtered, Ordering::Relaxed);
        if let Some(now) = (short * 1000).checked_div(tried) {
            // Half the old reading, half this call's: a few calls change the mode.
            self.stats
                .knn_shortfall
                .store((hint + now) / 2, Ordering::Relaxed);
        }
        Ok(out)
    }
}

/// Plain kNN attempts that may come up short before the miner's kNN goes straight to
/// the filtered walk (per mille).
const SHORTFALL_LIMIT: u32 = 250;
/// While it does, every this many-th query still tries the plain walk.
const PLAIN_PROBE: usize = 16;

/// How many more than k a plain kNN asks for, to make up for the few it will drop (the
/// anchor's own label, excluded ids). Within the walk's own ef this costs nothing.
fn knn_slack(k: usize) -> usize {
    (k / 8).max(4)
}

/// Whether a key may be returned for `q`: in the catalogue (not a copy being replaced),
/// not excluded by key or label, fresh enough. Reads the dense tag array only.
#[inline]
fn keep_key(c: &Catalogue, q: &KnnQuery, opts: &KnnOptions, key: u64) -> bool {
    keep_tag(c.tag(key), q, opts, key)
}

/// [`keep_key`] on a key's tag, however it was read.
#[inline]
fn keep_tag(tag: Option<Tag>, q: &KnnQuery, opts: &KnnOptions, key: u64) -> bool {
    Some(key) != q.exclude_key
        && tag.is_some_and(|t| {
            Some(t.label) != q.exclude_label
                && t.generation >= opts.min_generation
                && !opts.exclude_labels.contains(&t.label)
        })
        && (opts.exclude_keys.is_empty() || !opts.exclude_keys.contains(&key))
}

/// [`Collection::knn_batch`] split into chunks that run in parallel on the search pool.
pub async fn knn_parallel(
    pool: &WorkPool,
    coll: Arc<Collection>,
    queries: Arc<Vec<KnnQuery>>,
    opts: Arc<KnnOptions>,
    chunks: usize,
) -> Result<KnnResult> {
    let generation = coll.generation();
    let per = queries.len().div_ceil(chunks.max(1)).max(1);
    let mut pending = Vec::new();
    for start in (0..queries.len()).step_by(per) {
        let end = (start + per).min(queries.len());
        let (coll, queries, opts) = (coll.clone(), queries.clone(), opts.clone());
        pending.push(pool.run(move || coll.knn_batch(&queries[start..end], &opts)));
    }
    let mut out = KnnResult {
        neighbours: Vec::with_capacity(queries.len()),
        generation,
        expanded: 0,
    };
    for p in pending {
        let r = p.await?;
        out.neighbours.extend(r.neighbours);
        out.expanded += r.expanded;
    }
    Ok(out)
}

/// A search candidate ordered by distance (NaN never occurs: inputs are finite).
struct Ranked(f32, ItemData);

impl PartialEq for Ranked {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0 && self.1.id == other.1.id
    }
}
impl Eq for Ranked {}
impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0
            .total_cmp(&other.0)
            .then_with(|| self.1.id.cmp(&other.1.id))
    }
}
