//! Mining a chunk of anchors against one collection: positives from the label index,
//! negative candidates from the batched kNN (the anchor's label excluded, so a dense
//! same-label cluster never starves them), then the strategy's choice among them, and
//! the keys turned back into ids, labels, generations and (when asked) vectors and
//! inputs. Runs on a search-pool thread; everything here blocks.
//!
//! Per anchor the cost is one HNSW walk (two for a SEMI_HARD anchor whose positives all
//! lie beyond its candidate pool), a few vector lookups for its positives, and for
//! RANDOM and DISTANCE_WEIGHTED a uniform sample from the dense key list: never a scan.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::spec::{MS_EPSILON, MineSpec, POSITIVE_SAMPLE, Strategy};
use super::strategy::{self, Candidate};
use crate::collections::{Catalogue, Collection, KnnOptions, KnnQuery, LabelId, Neighbour};
use crate::error::Result;
use crate::rng::Rng;
use crate::types::{InputData, Metric};

/// DISTANCE_WEIGHTED: distances are clamped to at least this (Wu et al.)...
const DW_CUTOFF: f64 = 0.5;
/// ...and candidates from this distance on get no weight (their margin loss is 0).
const DW_NO_LOSS: f64 = 1.4;

/// Triplets or pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Triplets,
    Pairs,
}

/// One anchor to mine, resolved.
#[derive(Debug, Clone)]
pub struct AnchorIn {
    pub id: Arc<str>,
    /// The stored item, when the anchor is one (it is then never its own positive or
    /// negative).
    pub key: Option<u64>,
    /// None: a label no stored item has (every item is then a negative).
    pub label: Option<LabelId>,
    pub label_name: Arc<str>,
    /// The vector to measure from: the trainer's fresh one, or the stored one.
    pub vector: Vec<f32>,
    pub generation: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Triplet {
    pub anchor: Arc<str>,
    pub positive: Arc<str>,
    pub negatives: Vec<Arc<str>>,
    pub d_ap: f32,
    pub d_an: Vec<f32>,
    pub fallback: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub a: Arc<str>,
    pub b: Arc<str>,
    pub same: bool,
    pub distance: f32,
}

/// An item a message uses, sent once per message when the request asks for vectors or
/// inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct MinedItem {
    pub id: Arc<str>,
    pub label: Arc<str>,
    pub vector: Vec<f32>,
    pub input: Option<InputData>,
    pub generation: u64,
}

/// What mining did: counts, and per rule what it turned away.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub anchors: u64,
    pub anchors_without_triplet: u64,
    pub triplets: u64,
    pub pairs: u64,
    pub candidates_examined: u64,
    pub rejections: BTreeMap<&'static str, u64>,
    pub fallbacks: BTreeMap<&'static str, u64>,
    /// Per source ("knn", "sample", "second_search", "random"), the negatives used.
    pub sources: BTreeMap<&'static str, u64>,
    /// Session write-back: items written.
    pub written: u64,
    /// MineBatches: batches, and the classes chosen as neighbours and at random.
    pub batches: u64,
    pub neighbour_classes: u64,
    pub random_classes: u64,
    pub seconds: f64,
}

impl Stats {
    pub fn merge(&mut self, o: &Stats) {
        self.anchors += o.anchors;
        self.anchors_without_triplet += o.anchors_without_triplet;
        self.triplets += o.triplets;
        self.pairs += o.pairs;
        self.candidates_examined += o.candidates_examined;
        for (k, v) in &o.rejections {
            *self.rejections.entry(k).or_default() += v;
        }
        for (k, v) in &o.fallbacks {
            *self.fallbacks.entry(k).or_default() += v;
        }
        for (k, v) in &o.sources {
            *self.sources.entry(k).or_default() += v;
        }
        self.written += o.written;
        self.batches += o.batches;
        self.neighbour_classes += o.neighbour_classes;
        self.random_classes += o.random_classes;
    }

    fn reject(&mut self, rule: &'static str, n: usize) {
        if n > 0 {
            *self.rejections.entry(rule).or_default() += n as u64;
        }
    }

    fn fall_back(&mut self, kind: &'static str) {
        *self.fallbacks.entry(kind).or_default() += 1;
    }
}

/// What a chunk of anchors yields.
#[derive(Debug, Default)]
pub struct ChunkOut {
    pub triplets: Vec<Triplet>,
    pub pairs: Vec<Pair>,
    pub items: Vec<MinedItem>,
    /// Oldest and newest generation of the items used.
    pub generations: Option<(u64, u64)>,
    pub stats: Stats,
}

/// The rules every anchor of a job shares.
pub struct Rules<'a> {
    pub spec: &'a MineSpec,
    pub mode: Mode,
    /// Keys of `exclude_ids`.
    pub exclude: Arc<HashSet<u64>>,
    /// The empty label, when some item has it: unlabelled items are never used.
    pub unlabelled: Option<LabelId>,
    pub cancel: &'a AtomicBool,
}

/// Where a negative candidate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum From {
    /// The batched kNN: the anchor's nearest negatives.
    Knn,
    /// A uniform sample of the collection's negatives.
    Sample,
    /// SEMI_HARD's look beyond d_ap.
    Beyond,
    /// RANDOM's uniform draw.
    Random,
}

impl From {
    fn name(self) -> &'static str {
        match self {
            From::Knn => "knn",
            From::Sample => "sample",
            From::Beyond => "second_search",
            From::Random => "random",
        }
    }
}

/// A positive or negative as the strategies see it: a key, its distance, and (for a
/// negative) where it was found.
#[derive(Debug, Clone, Copy)]
struct Near {
    key: u64,
    distance: f32,
    from: From,
}

/// One anchor's choice, still in keys.
struct Chosen {
    positive: Near,
    negatives: Vec<Near>,
    fallback: bool,
}

/// Per-anchor seed: the job's seed and the anchor's id, so that the stream does not
/// depend on how anchors were split among threads.
fn anchor_rng(seed: u64, id: &str) -> Rng {
    Rng::new(seed ^ super::spec::fnv1a(id.as_bytes()).rotate_left(17))
}

/// Mines every anchor of `anchors` (in order) under `rules`.
pub fn mine_chunk(coll: &Collection, anchors: &[AnchorIn], rules: &Rules) -> Result<ChunkOut> {
    let spec = rules.spec;
    let metric = coll.spec().metric;
    let dim = coll.spec().dimension as usize;
    let mut out = ChunkOut::default();

    // Negative candidates for every anchor in one batched kNN (RANDOM needs none).
    let knn = if spec.strategy == Strategy::Random {
        None
    } else {
        let queries: Vec<KnnQuery> = anchors
            .iter()
            .map(|a| KnnQuery {
                vector: a.vector.clone(),
                exclude_key: a.key,
                exclude_label: a.label,
                min_distance: None,
            })
            .collect();
        let opts = knn_options(spec, rules, spec.candidates);
        let r = coll.knn_batch(&queries, &opts)?;
        if r.expanded > 0 {
            *out.stats.fallbacks.entry("expanded_search").or_default() += r.expanded;
        }
        Some(r.neighbours)
    };

    let mut chosen_all: Vec<(usize, Vec<Chosen>)> = Vec::with_capacity(anchors.len());
    for (i, anchor) in anchors.iter().enumerate() {
        if rules.cancel.load(Ordering::Relaxed) {
            break;
        }
        out.stats.anchors += 1;
        let mut rng = anchor_rng(spec.seed, &anchor.id);
        let want = match spec.strategy {
            Strategy::BatchHard | Strategy::MultiSimilarity => POSITIVE_SAMPLE,
            _ => spec.positives,
        };
        let positive_keys = sample_positives(coll, anchor, rules, want, &mut rng, &mut out.stats);
        let mut positives: Vec<Near> = Vec::with_capacity(positive_keys.len());
        for key in positive_keys {
            if let Some(v) = coll.vector(key)? {
                positives.push(Near {
                    key,
                    distance: metric.distance(&anchor.vector, &v),
                    from: From::Knn,
                });
            }
        }
        let pool: Vec<Near> = match &knn {
            Some(n) => {
                let n = &n[i];
                out.stats.candidates_examined += n.len() as u64;
                out.stats
                    .reject("skip_nearest", n.len().min(spec.skip_nearest));
                n.iter()
                    .skip(spec.skip_nearest)
                    .map(|n| near(n, From::Knn))
                    .collect()
            }
            None => Vec::new(),
        };
        let chosen = choose(
            coll,
            anchor,
            rules,
            &positives,
            &pool,
            metric,
            dim,
            &mut rng,
            &mut out.stats,
        )?;
        chosen_all.push((i, chosen));
    }
    resolve(coll, anchors, rules, chosen_all, &mut out)?;
    Ok(out)
}

fn near(n: &Neighbour, from: From) -> Near {
    Near {
        key: n.key,
        distance: n.distance,
        from,
    }
}

fn knn_options(spec: &MineSpec, rules: &Rules, k: usize) -> KnnOptions {
    KnnOptions {
        k,
        expansion: spec.expansion,
        exclude_keys: (*rules.exclude).clone(),
        exclude_labels: rules.unlabelled.into_iter().collect(),
        min_distance: spec.min_distance,
        max_distance: spec.max_distance,
        min_generation: spec.min_generation,
    }
}

/// Up to `want` distinct members of the anchor's label: not the anchor, not excluded,
/// fresh enough. Uniform: all of them when the group is small, else random draws.
fn sample_positives(
    coll: &Collection,
    anchor: &AnchorIn,
    rules: &Rules,
    want: usize,
    rng: &mut Rng,
    stats: &mut Stats,
) -> Vec<u64> {
    let Some(label) = anchor.label else {
        return Vec::new();
    };
    if Some(label) == rules.unlabelled {
        return Vec::new();
    }
    let c = coll.catalogue();
    let members = c.members(label);
    let mut stale = 0;
    let mut ok = |key: u64, c: &Catalogue| {
        if Some(key) == anchor.key || rules.exclude.contains(&key) {
            return false;
        }
        let fresh = c
            .get(key)
            .is_some_and(|e| e.generation >= rules.spec.min_generation);
        stale += usize::from(!fresh);
        fresh
    };
    let picked = if members.len() <= want.saturating_mul(2).max(16) {
        let mut all: Vec<u64> = members.iter().copied().filter(|k| ok(*k, &c)).collect();
        // A partial Fisher-Yates shuffle: the first `want` are a uniform sample.
        let take = want.min(all.len());
        for j in 0..take {
            let r = j + rng.below(all.len() - j);
            all.swap(j, r);
        }
        all.truncate(take);
        all
    } else {
        let mut seen = HashSet::with_capacity(want);
        let mut picked = Vec::with_capacity(want);
        let mut tries = want * 8 + 16;
        while picked.len() < want && tries > 0 {
            tries -= 1;
            let key = members[rng.below(members.len())];
            if seen.insert(key) && ok(key, &c) {
                picked.push(key);
            }
        }
        picked
    };
    stats.reject("stale_positive", stale);
    picked
}

/// Up to `n` distinct uniform negatives for an anchor: other label, not unlabelled,
/// not excluded, fresh enough, not in `taken`, within the distance bounds. Rejection
/// sampling from the dense key list, checked against the dense tag array: O(n).
#[allow(clippy::too_many_arguments)]
fn random_negatives(
    coll: &Collection,
    anchor: &AnchorIn,
    rules: &Rules,
    n: usize,
    taken: &HashSet<u64>,
    from: From,
    rng: &mut Rng,
    stats: &mut Stats,
) -> Result<Vec<Near>> {
    let spec = rules.spec;
    let metric = coll.spec().metric;
    if n == 0 {
        return Ok(Vec::new());
    }
    let keys: Vec<u64> = {
        let c = coll.catalogue();
        let all = c.all_keys();
        if all.is_empty() {
            return Ok(Vec::new());
        }
        let mut seen = HashSet::with_capacity(n * 2);
        let mut keys = Vec::with_capacity(n * 2);
        // Draw a few more than needed: some fall outside the distance bounds.
        let target = if spec.min_distance.is_some() || spec.max_distance.is_some() {
            n * 4
        } else {
            n
        };
        let mut tries = target * 16 + 64;
        while keys.len() < target && tries > 0 {
            tries -= 1;
            let key = all[rng.below(all.len())];
            if !seen.insert(key) || taken.contains(&key) || Some(key) == anchor.key {
                continue;
            }
            let Some(t) = c.tag(key) else { continue };
            if Some(t.label) == anchor.label
                || Some(t.label) == rules.unlabelled
                || t.generation < spec.min_generation
                || (!rules.exclude.is_empty() && rules.exclude.contains(&key))
            {
                continue;
            }
            keys.push(key);
        }
        keys
    };
    let mut out = Vec::with_capacity(n);
    for key in keys {
        if out.len() == n {
            break;
        }
        let Some(v) = coll.vector(key)? else { continue };
        let d = metric.distance(&anchor.vector, &v);
        if spec.min_distance.is_some_and(|m| d < m) || spec.max_distance.is_some_and(|m| d > m) {
            stats.reject("distance_bounds", 1);
            continue;
        }
        out.push(Near {
            key,
            distance: d,
            from,
        });
    }
    stats.candidates_examined += out.len() as u64;
    Ok(out)
}

/// The distance DISTANCE_WEIGHTED weighs: Euclidean between unit vectors, which for
/// COSINE (and INNER_PRODUCT on unit vectors) is sqrt(2 D).
fn sphere_distance(metric: Metric, d: f32) -> f32 {
    match metric {
        Metric::L2 => d,
        Metric::Cosine | Metric::InnerProduct => (2.0 * d).max(0.0).sqrt(),
    }
}

/// The strategy's choice for one anchor: per positive, its negatives.
///
/// `pool` is the anchor's kNN (nearest first). Strategies whose target may lie beyond
/// it (a window: SEMI_HARD, MULTI_SIMILARITY; DISTANCE_WEIGHTED's whole distribution)
/// also draw a uniform sample of the collection's negatives, choose by the exact
/// distances of both, and count where each chosen negative came from. The sample is
/// drawn only when the pool cannot settle the choice alone.
#[allow(clippy::too_many_arguments)]
fn choose(
    coll: &Collection,
    anchor: &AnchorIn,
    rules: &Rules,
    positives: &[Near],
    pool: &[Near],
    metric: Metric,
    dim: usize,
    rng: &mut Rng,
    stats: &mut Stats,
) -> Result<Vec<Chosen>> {
    let spec = rules.spec;
    let n = spec.negatives;
    if positives.is_empty() {
        return Ok(Vec::new());
    }
    let as_cands = |v: &[Near]| -> Vec<Candidate> {
        v.iter()
            .enumerate()
            .map(|(index, c)| Candidate {
                index,
                distance: c.distance,
            })
            .collect()
    };
    let pick =
        |v: &[Near], cs: &[Candidate]| -> Vec<Near> { cs.iter().map(|c| v[c.index]).collect() };
    // The pool holds the nearest `candidates`; when it was cut there, it says nothing
    // past its last one.
    let full = pool.len() + spec.skip_nearest >= spec.candidates;
    let farthest = pool.last().map_or(f32::NEG_INFINITY, |c| c.distance);
    // Whether the pool sees every negative nearer than `d`.
    let covers = |d: f32| !full || farthest >= d;
    // The pool and a uniform sample of the rest, nearest first: drawn only when a
    // strategy needs it, and only as far as it needs.
    let mut mixed: Option<Mixed> = None;
    let mut widen_until =
        |enough: &dyn Fn(&[Near]) -> bool, rng: &mut Rng, stats: &mut Stats| -> Result<Vec<Near>> {
            let m = mixed.get_or_insert_with(|| Mixed::new(pool, spec.sample));
            while !enough(&m.all) && m.widen(coll, anchor, rules, rng, stats)? {}
            Ok(m.all.clone())
        };
    let mut chosen = Vec::new();
    match spec.strategy {
        Strategy::Random => {
            for p in positives {
                let negs = random_negatives(
                    coll,
                    anchor,
                    rules,
                    n,
                    &HashSet::new(),
                    From::Random,
                    rng,
                    stats,
                )?;
                if !negs.is_empty() {
                    chosen.push(Chosen {
                        positive: *p,
                        negatives: negs,
                        fallback: false,
                    });
                }
            }
        }
        Strategy::Hard => {
            let negs: Vec<Near> = pool.iter().take(n).copied().collect();
            if !negs.is_empty() {
                for p in positives {
                    chosen.push(Chosen {
                        positive: *p,
                        negatives: negs.clone(),
                        fallback: false,
                    });
                }
            }
        }
        Strategy::SemiHard => {
            for p in positives {
                let (lo, hi) = (p.distance, p.distance + spec.margin);
                let inside = |v: &[Near]| {
                    v.iter()
                        .filter(|c| c.distance > lo && c.distance < hi)
                        .count()
                };
                // The pool alone when it sees the whole window or already holds enough
                // of it; else the pool and the sample (the window lies past the pool:
                // early in training, or a far positive).
                let cands = if covers(hi) || inside(pool) >= n {
                    pool.to_vec()
                } else {
                    widen_until(&|v| inside(v) >= n, rng, stats)?
                };
                let cs = as_cands(&cands);
                let (got, fallback) = strategy::semi_hard(lo, spec.margin, &cs, n);
                let (got, fallback) = if fallback
                    && !covers(hi)
                    && within_reach(coll, anchor, rules, &cands, lo, stats)
                {
                    // Neither held a window negative, and the window lies past the
                    // pool: the nearest negatives beyond d_ap decide (the first of them
                    // is inside the window if any negative is).
                    let beyond = beyond(coll, anchor, rules, lo, n, stats)?;
                    let (got, fallback) =
                        strategy::semi_hard(lo, spec.margin, &as_cands(&beyond), n);
                    (pick(&beyond, &got), fallback)
                } else {
                    (pick(&cands, &got), fallback)
                };
                if got.is_empty() {
                    continue;
                }
                if fallback {
                    stats.fall_back("semi_hard_beyond");
                } else {
                    stats.reject("semi_hard_window", cands.len() - inside(&cands));
                }
                chosen.push(Chosen {
                    positive: *p,
                    negatives: got,
                    fallback,
                });
            }
        }
        Strategy::DistanceWeighted => {
            // The nearest candidates stand for themselves; a uniform sample of the
            // rest stands for all of the rest, so the draw follows the target over the
            // whole collection and not only near the anchor.
            let all = widen_until(&|_| false, rng, stats)?;
            let sampled = all.iter().filter(|c| c.from == From::Sample).count();
            let rest = eligible_negatives(coll, anchor, rules).saturating_sub(pool.len()) as f64;
            let scale = if sampled == 0 {
                0.0
            } else {
                (rest / sampled as f64).max(1.0).ln()
            };
            let distances: Vec<f32> = all
                .iter()
                .map(|c| sphere_distance(metric, c.distance))
                .collect();
            let log_scale: Vec<f64> = all
                .iter()
                .map(|c| if c.from == From::Sample { scale } else { 0.0 })
                .collect();
            let probs = strategy::distance_weighted_scaled(
                dim, &distances, &log_scale, None, DW_CUTOFF, DW_NO_LOSS,
            );
            stats.reject("no_loss", probs.iter().filter(|p| **p == 0.0).count());
            for p in positives {
                let idx = strategy::sample_without_replacement(rng, &probs, n);
                if !idx.is_empty() {
                    chosen.push(Chosen {
                        positive: *p,
                        negatives: idx.into_iter().map(|j| all[j]).collect(),
                        fallback: false,
                    });
                }
            }
        }
        Strategy::BatchHard => {
            let pc = as_cands(positives);
            let farthest = pc
                .iter()
                .max_by(|a, b| a.distance.total_cmp(&b.distance))
                .map(|c| positives[c.index]);
            let negs: Vec<Near> = pool.iter().take(n).copied().collect();
            if let (Some(p), false) = (farthest, negs.is_empty()) {
                chosen.push(Chosen {
                    positive: p,
                    negatives: negs,
                    fallback: false,
                });
            }
        }
        Strategy::MultiSimilarity => {
            // A negative is kept when d_an < max d_ap + eps: a window from 0 up. When the
            // pool keeps fewer than asked and the window reaches past it, the sample
            // adds the rest.
            let max_dap = positives
                .iter()
                .map(|p| p.distance)
                .fold(f32::NEG_INFINITY, f32::max);
            let rule = |v: &[Near]| {
                strategy::multi_similarity(&as_cands(positives), &as_cands(v), MS_EPSILON)
            };
            let (kp, kn) = rule(pool);
            let (cands, kp, kn) = if kn.len() < n && !covers(max_dap + MS_EPSILON) {
                let m = widen_until(&|v| rule(v).1.len() >= n, rng, stats)?;
                let (kp, kn) = rule(&m);
                (m, kp, kn)
            } else {
                (pool.to_vec(), kp, kn)
            };
            stats.reject(
                "multi_similarity",
                positives.len() - kp.len() + cands.len() - kn.len(),
            );
            let mut kp = pick(positives, &kp);
            // Hardest positives first: the farthest.
            kp.sort_by(|a, b| b.distance.total_cmp(&a.distance));
            let kn: Vec<Near> = pick(&cands, &kn).into_iter().take(n).collect();
            if !kn.is_empty() {
                for p in kp.into_iter().take(spec.positives) {
                    chosen.push(Chosen {
                        positive: p,
                        negatives: kn.clone(),
                        fallback: false,
                    });
                }
            }
        }
    }
    Ok(chosen)
}

/// Uniform negatives drawn per step of a growing sample: a window that holds a fair
/// share of the collection is found in the first step.
const SAMPLE_STEP: usize = 16;

/// An anchor's kNN pool and a uniform sample of the rest of its negatives, nearest
/// first. The sample grows [`SAMPLE_STEP`] at a time up to `budget` (the request's
/// `sample`), as far as the strategy asks.
struct Mixed {
    all: Vec<Near>,
    taken: HashSet<u64>,
    drawn: usize,
    budget: usize,
}

impl Mixed {
    fn new(pool: &[Near], budget: usize) -> Mixed {
        Mixed {
            all: pool.to_vec(),
            taken: pool.iter().map(|c| c.key).collect(),
            drawn: 0,
            budget,
        }
    }

    /// Draws the next step of the sample; false once the budget is spent.
    fn widen(
        &mut self,
        coll: &Collection,
        anchor: &AnchorIn,
        rules: &Rules,
        rng: &mut Rng,
        stats: &mut Stats,
    ) -> Result<bool> {
        if self.drawn >= self.budget {
            return Ok(false);
        }
        let want = SAMPLE_STEP.min(self.budget - self.drawn);
        // Counted as drawn even when fewer come back (a small collection runs out).
        self.drawn += want;
        let more = random_negatives(
            coll,
            anchor,
            rules,
            want,
            &self.taken,
            From::Sample,
            rng,
            stats,
        )?;
        self.taken.extend(more.iter().map(|c| c.key));
        self.all.extend(more);
        self.all.sort_by(|a, b| a.distance.total_cmp(&b.distance));
        Ok(true)
    }
}

/// How far down an anchor's neighbour list SEMI_HARD's second look can see: its
/// filtered walk grows from the default 64 candidates x4 three times.
const SECOND_SEARCH_REACH: f64 = 4096.0;

/// Whether SEMI_HARD's second look could reach d_ap: the uniform sample estimates d_ap's
/// rank among the anchor's negatives (the share of sampled negatives nearer than it,
/// times how many negatives there are). A positive farther than the walk can get (an
/// unstructured embedding puts most positives there) would cost the longest walk there
/// is and find nothing: the choice then stays with what the pool and the sample hold
/// (`fallbacks["beyond_reach"]`).
fn within_reach(
    coll: &Collection,
    anchor: &AnchorIn,
    rules: &Rules,
    seen: &[Near],
    d_ap: f32,
    stats: &mut Stats,
) -> bool {
    let sampled = seen.iter().filter(|c| c.from == From::Sample);
    let (drawn, nearer) = sampled.fold((0usize, 0usize), |(d, b), c| {
        (d + 1, b + usize::from(c.distance <= d_ap))
    });
    if drawn == 0 {
        return true;
    }
    let rank = nearer as f64 / drawn as f64 * eligible_negatives(coll, anchor, rules) as f64;
    let reach = rank <= SECOND_SEARCH_REACH;
    if !reach {
        stats.fall_back("beyond_reach");
    }
    reach
}

/// SEMI_HARD's second look: the nearest negatives strictly beyond `d_ap`.
fn beyond(
    coll: &Collection,
    anchor: &AnchorIn,
    rules: &Rules,
    d_ap: f32,
    n: usize,
    stats: &mut Stats,
) -> Result<Vec<Near>> {
    let opts = knn_options(rules.spec, rules, n.max(8));
    let q = KnnQuery {
        vector: anchor.vector.clone(),
        exclude_key: anchor.key,
        exclude_label: anchor.label,
        min_distance: Some(d_ap),
    };
    let r = coll.knn_batch(std::slice::from_ref(&q), &opts)?;
    stats.fall_back("second_search");
    let found: Vec<Near> = r.neighbours[0]
        .iter()
        .filter(|c| c.distance > d_ap)
        .map(|n| near(n, From::Beyond))
        .collect();
    stats.candidates_examined += found.len() as u64;
    Ok(found)
}

/// How many items could be an anchor's negative (other label, labelled, not excluded):
/// from the label index, in O(1).
fn eligible_negatives(coll: &Collection, anchor: &AnchorIn, rules: &Rules) -> usize {
    let c = coll.catalogue();
    let own = anchor.label.map_or(0, |l| c.members(l).len());
    let unlabelled = rules.unlabelled.map_or(0, |l| c.members(l).len());
    c.len()
        .saturating_sub(own)
        .saturating_sub(unlabelled)
        .saturating_sub(rules.exclude.len())
}

/// Turns keys into ids (items replaced or deleted meanwhile drop their triplet), builds
/// pairs in pair mode, and gathers the items the chunk used.
fn resolve(
    coll: &Collection,
    anchors: &[AnchorIn],
    rules: &Rules,
    chosen: Vec<(usize, Vec<Chosen>)>,
    out: &mut ChunkOut,
) -> Result<()> {
    let spec = rules.spec;
    let mut used: HashMap<u64, (Arc<str>, Arc<str>, u64)> = HashMap::new();
    let mut generations: Option<(u64, u64)> = None;
    let mut seen_gen = |g: u64| {
        generations = Some(match generations {
            Some((lo, hi)) => (lo.min(g), hi.max(g)),
            None => (g, g),
        });
    };
    {
        let c = coll.catalogue();
        let mut id_of = |key: u64| -> Option<Arc<str>> {
            if let Some((id, _, _)) = used.get(&key) {
                return Some(id.clone());
            }
            let e = c.get(key)?;
            let label: Arc<str> = Arc::from(c.label_name(e.label));
            used.insert(key, (e.id.clone(), label, e.generation));
            Some(e.id.clone())
        };
        for (i, picks) in chosen {
            let anchor = &anchors[i];
            let mut any = false;
            match rules.mode {
                Mode::Triplets => {
                    for ch in picks {
                        let Some(positive) = id_of(ch.positive.key) else {
                            continue;
                        };
                        let mut negatives = Vec::with_capacity(ch.negatives.len());
                        let mut d_an = Vec::with_capacity(ch.negatives.len());
                        for n in &ch.negatives {
                            if let Some(id) = id_of(n.key) {
                                negatives.push(id);
                                d_an.push(n.distance);
                                *out.stats.sources.entry(n.from.name()).or_default() += 1;
                            }
                        }
                        if negatives.is_empty() {
                            continue;
                        }
                        any = true;
                        out.triplets.push(Triplet {
                            anchor: anchor.id.clone(),
                            positive,
                            negatives,
                            d_ap: ch.positive.distance,
                            d_an,
                            fallback: ch.fallback,
                        });
                    }
                }
                Mode::Pairs => {
                    let mut seen = HashSet::new();
                    for ch in picks {
                        let p = ch.positive;
                        if seen.insert(p.key) {
                            if spec.pos_margin.is_some_and(|m| p.distance <= m) {
                                out.stats.reject("pos_margin", 1);
                            } else if let Some(b) = id_of(p.key) {
                                any = true;
                                out.pairs.push(Pair {
                                    a: anchor.id.clone(),
                                    b,
                                    same: true,
                                    distance: p.distance,
                                });
                            }
                        }
                        for n in ch.negatives {
                            if !seen.insert(n.key) {
                                continue;
                            }
                            if spec.neg_margin.is_some_and(|m| n.distance >= m) {
                                out.stats.reject("neg_margin", 1);
                            } else if let Some(b) = id_of(n.key) {
                                any = true;
                                *out.stats.sources.entry(n.from.name()).or_default() += 1;
                                out.pairs.push(Pair {
                                    a: anchor.id.clone(),
                                    b,
                                    same: false,
                                    distance: n.distance,
                                });
                            }
                        }
                    }
                }
            }
            if any {
                if let Some(k) = anchor.key {
                    id_of(k);
                }
            } else {
                out.stats.anchors_without_triplet += 1;
            }
        }
    }
    // Every key in `used` was a positive or negative (or an anchor) of an emitted
    // triplet or pair, or was looked up for one that then dropped; count only the
    // former for generations.
    let mut emitted: HashSet<&str> = HashSet::new();
    for t in &out.triplets {
        emitted.insert(&t.anchor);
        emitted.insert(&t.positive);
        emitted.extend(t.negatives.iter().map(|n| &**n));
    }
    for p in &out.pairs {
        emitted.insert(&p.a);
        emitted.insert(&p.b);
    }
    for (id, _, g) in used.values() {
        if emitted.contains(&**id) {
            seen_gen(*g);
        }
    }
    out.generations = generations;
    out.stats.triplets += out.triplets.len() as u64;
    out.stats.pairs += out.pairs.len() as u64;
    if spec.with_vectors || spec.with_inputs {
        let mut items: Vec<(u64, Arc<str>, Arc<str>, u64)> = used
            .into_iter()
            .filter(|(_, (id, _, _))| emitted.contains(&**id))
            .map(|(k, (id, label, g))| (k, id, label, g))
            .collect();
        items.sort_by(|a, b| a.1.cmp(&b.1));
        let inputs = if spec.with_inputs {
            let ids: Vec<String> = items.iter().map(|i| i.1.to_string()).collect();
            coll.stored_inputs(&ids)?
        } else {
            HashMap::new()
        };
        for (key, id, label, generation) in items {
            let vector = if spec.with_vectors {
                coll.vector(key)?.unwrap_or_default()
            } else {
                Vec::new()
            };
            out.items.push(MinedItem {
                input: inputs.get(&*id).cloned(),
                id,
                label,
                vector,
                generation,
            });
        }
    }
    Ok(())
}
