//! MineBatches: P x K batches whose classes the index chose to be hard for each other,
//! for a trainer that mines inside each batch (Suh et al., CVPR 2019, class-based hard
//! example mining). An in-batch miner reuses every image of a batch O(B) times but sees
//! only the classes in it; with many classes, chance almost never puts a class beside
//! the classes it is confused with. Here each batch is an anchor class, then the labels
//! of its items' nearest negatives (the index knows them), then random classes.
//!
//! A pass: every class hands out its next K items of the shard each time it is put in
//! a batch, in an order the seed decides per class and round (a new order when a round
//! ends). Anchor classes are drawn from the classes whose first round has not ended;
//! the pass ends when none is left, so every item of the shard comes at least once per
//! pass, and a pass is about N / (P K) batches. Items written after a pass began join
//! at the next pass; items deleted meanwhile are skipped. The classes' keys are the
//! catalogue's shared [`ClassLayout`], so an open stream costs a cursor per class.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;

use super::job::{MinedItem, Stats};
use super::spec::Shard;
use crate::collections::{Catalogue, ClassLayout, Collection, KnnOptions, KnnQuery, LabelId};
use crate::error::{Error, Field, Result};
use crate::rng::{Permutation, Rng};

/// Classes per batch when the request leaves it at 0.
pub const DEFAULT_CLASSES: usize = 8;
/// Items per class when the request leaves it at 0.
pub const DEFAULT_PER_CLASS: usize = 4;
/// Nearest negatives looked at per anchor-class item when the request leaves it at 0.
pub const DEFAULT_NEIGHBOUR_CANDIDATES: usize = 32;
/// Classes per batch and items per class, at most.
pub const MAX_CLASSES: usize = 1024;

/// A MineBatches request as it arrives.
#[derive(Debug, Clone, Default)]
pub struct RawBatchSpec {
    pub collection: String,
    pub classes: u32,
    pub per_class: u32,
    pub neighbours: Option<u32>,
    pub seed: u64,
    pub shard: Option<Shard>,
    pub min_generation: u64,
    pub max_batches: u64,
    pub with_vectors: bool,
    pub with_inputs: bool,
    pub expansion: u32,
    pub candidates: u32,
}

/// A validated MineBatches request.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchSpec {
    pub collection: String,
    /// P.
    pub classes: usize,
    /// K.
    pub per_class: usize,
    /// Of the P - 1 classes beside the anchor class, how many are its neighbours.
    pub neighbours: usize,
    pub seed: u64,
    pub shard: Shard,
    pub min_generation: u64,
    /// 0: one pass.
    pub max_batches: u64,
    pub with_vectors: bool,
    pub with_inputs: bool,
    pub expansion: usize,
    pub candidates: usize,
}

impl RawBatchSpec {
    pub fn validate(self, root: &Field) -> Result<BatchSpec> {
        let at = |name: &'static str| Field::name(name).under(root);
        if self.collection.is_empty() {
            return Err(Error::invalid(at("collection"), "must not be empty"));
        }
        let classes = match self.classes as usize {
            0 => DEFAULT_CLASSES,
            p => p,
        };
        if !(2..=MAX_CLASSES).contains(&classes) {
            return Err(Error::invalid(
                at("classes"),
                format!("{classes}: a batch needs 2..={MAX_CLASSES} classes"),
            ));
        }
        let per_class = match self.per_class as usize {
            0 => DEFAULT_PER_CLASS,
            k => k,
        };
        if per_class > MAX_CLASSES {
            return Err(Error::invalid(
                at("per_class"),
                format!("{per_class}, at most {MAX_CLASSES}"),
            ));
        }
        let neighbours = match self.neighbours {
            None => classes - 1,
            Some(n) if (n as usize) < classes => n as usize,
            Some(n) => {
                return Err(Error::invalid(
                    at("neighbours"),
                    format!(
                        "{n}: at most classes - 1 = {} (the anchor class is one of the {classes})",
                        classes - 1
                    ),
                ));
            }
        };
        let candidates = match self.candidates as usize {
            0 => DEFAULT_NEIGHBOUR_CANDIDATES,
            c => c,
        };
        if candidates > super::spec::MAX_CANDIDATES {
            return Err(Error::invalid(
                at("candidates"),
                format!("{candidates}, at most {}", super::spec::MAX_CANDIDATES),
            ));
        }
        let shard = Shard::checked(self.shard, &at("shard"))?;
        Ok(BatchSpec {
            collection: self.collection,
            classes,
            per_class,
            neighbours,
            seed: self.seed,
            shard,
            min_generation: self.min_generation,
            max_batches: self.max_batches,
            with_vectors: self.with_vectors,
            with_inputs: self.with_inputs,
            expansion: self.expansion as usize,
            candidates,
        })
    }
}

/// One message of a MineBatches stream.
#[derive(Debug, Default, Clone)]
pub struct ClassBatch {
    /// Class by class, in the order of `classes`.
    pub items: Vec<MinedItem>,
    pub classes: Vec<Arc<str>>,
    /// How many of classes[1..] are neighbours of classes[0].
    pub neighbours: u32,
    /// Per class: 0 for the anchor class; for a neighbour, the distance from the anchor
    /// class's items to that class's nearest item, averaged over the anchor items; NaN
    /// for a random class.
    pub class_distances: Vec<f32>,
    pub batch: u64,
    pub pass: u64,
    pub generations: Option<(u64, u64)>,
    /// On the last message only.
    pub stats: Option<Stats>,
    pub last: bool,
}

/// Where a pass stands in one class of the layout. The class's keys are visited in the
/// order of a seeded permutation per round (no copy of them is kept), skipping those
/// that are not in this stream's shard, too old, or gone since the layout was made.
#[derive(Clone, Copy, Default)]
struct ClassCursor {
    /// Items of the class that this stream may hand out, as counted at lay-out.
    eligible: u32,
    /// Position in this round's order.
    cursor: u32,
    /// Rounds begun: each has its own order.
    round: u32,
}

/// The state of a stream between batches: a shared [`ClassLayout`] and a cursor per
/// class, about 16 bytes per class.
pub struct Passes {
    coll: Arc<Collection>,
    spec: BatchSpec,
    rng: Rng,
    layout: Arc<ClassLayout>,
    cursors: Vec<ClassCursor>,
    /// Classes with an eligible item (indices into the layout's classes).
    live: Vec<u32>,
    /// Classes whose items have not all come once yet this pass.
    remaining: Vec<u32>,
    pass: u64,
    batch: u64,
    unlabelled: Option<LabelId>,
}

impl Passes {
    /// Checks the request against its collection and lays out the first pass.
    pub fn new(coll: Arc<Collection>, spec: BatchSpec) -> Result<Passes> {
        let unlabelled = coll.catalogue().label_id("");
        let mut p = Passes {
            rng: Rng::new(spec.seed ^ 0x6261_7463_6865_7321),
            coll,
            spec,
            layout: Arc::new(ClassLayout::default()),
            cursors: Vec::new(),
            live: Vec::new(),
            remaining: Vec::new(),
            pass: 0,
            batch: 0,
            unlabelled,
        };
        p.lay_out()?;
        Ok(p)
    }

    /// A new pass over the collection as it stands: every labelled, fresh-enough item
    /// of the shard, class by class (classes by label, items by id, then in an order
    /// the seed decides, so a seed gives the same stream on the same data).
    fn lay_out(&mut self) -> Result<()> {
        let spec = &self.spec;
        {
            let c = self.coll.catalogue();
            self.layout = c.class_layout(self.unlabelled);
            self.cursors = self
                .layout
                .classes
                .iter()
                .enumerate()
                .map(|(i, _)| ClassCursor {
                    eligible: self
                        .layout
                        .keys_of(i)
                        .iter()
                        .filter(|&&k| eligible(&c, spec, k))
                        .count() as u32,
                    ..ClassCursor::default()
                })
                .collect();
        }
        self.live = (0..self.cursors.len() as u32)
            .filter(|&i| self.cursors[i as usize].eligible > 0)
            .collect();
        if self.live.len() < 2 {
            return Err(Error::invalid(
                "collection",
                format!(
                    "collection {:?} has {} labelled classes in this shard; a batch needs two at least",
                    spec.collection,
                    self.live.len()
                ),
            ));
        }
        self.remaining = self.live.clone();
        Ok(())
    }

    /// The order of class `q`'s keys in its current round.
    fn order(&self, q: usize) -> Permutation {
        let round = u64::from(self.cursors[q].round);
        let seed = self.spec.seed
            ^ (q as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ round.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
            ^ self.pass.wrapping_mul(0x1656_67B1_9E37_79F9);
        Permutation::new(self.layout.classes[q].len(), seed)
    }

    /// The next K (or all, for a smaller class) distinct eligible items of class `q`;
    /// a class whose round comes to its end begins the next in a new order and leaves
    /// `remaining`.
    fn take(&mut self, c: &Catalogue, q: usize) -> Vec<u64> {
        let want = self.spec.per_class.min(self.cursors[q].eligible as usize);
        let keys = self.layout.keys_of(q);
        let n = keys.len();
        let mut order = self.order(q);
        let mut out = Vec::with_capacity(want);
        // Items may have gone since the lay-out: two rounds at most.
        let mut budget = 2 * n;
        while out.len() < want && budget > 0 {
            budget -= 1;
            if self.cursors[q].cursor as usize == n {
                self.cursors[q].cursor = 0;
                self.cursors[q].round += 1;
                order = self.order(q);
            }
            let key = keys[order.at(self.cursors[q].cursor as usize)];
            self.cursors[q].cursor += 1;
            if eligible(c, &self.spec, key) && !out.contains(&key) {
                out.push(key);
            }
            if self.cursors[q].cursor as usize == n
                && let Some(pos) = self.remaining.iter().position(|&r| r as usize == q)
            {
                self.remaining.swap_remove(pos);
            }
        }
        out
    }

    /// Builds the next batch, or None when the stream is done (its pass is over and no
    /// more batches were asked for, or `max_batches` is reached).
    pub fn next_batch(&mut self, stats: &mut Stats) -> Result<Option<ClassBatch>> {
        let spec = self.spec.clone();
        if spec.max_batches > 0 && self.batch >= spec.max_batches {
            return Ok(None);
        }
        if self.remaining.is_empty() {
            if spec.max_batches == 0 {
                return Ok(None);
            }
            self.pass += 1;
            self.lay_out()?;
        }
        let anchor = self.remaining[self.rng.below(self.remaining.len())] as usize;
        let anchor_keys = {
            let coll = self.coll.clone();
            let c = coll.catalogue();
            self.take(&c, anchor)
        };
        let p = spec.classes.min(self.live.len());
        let mut chosen: Vec<(usize, f32)> = vec![(anchor, 0.0)];

        // Neighbours: the labels of the anchor-class items' nearest negatives, nearest
        // first, among the classes this shard has.
        let want_neighbours = spec.neighbours.min(p - 1);
        let mut neighbours = 0;
        if want_neighbours > 0 {
            let mut queries = Vec::with_capacity(anchor_keys.len());
            for &key in &anchor_keys {
                if let Some(vector) = self.coll.vector(key)? {
                    queries.push(KnnQuery {
                        vector,
                        exclude_key: Some(key),
                        exclude_label: Some(self.layout.classes[anchor].label),
                        min_distance: None,
                    });
                }
            }
            let opts = KnnOptions {
                k: spec.candidates,
                expansion: spec.expansion,
                exclude_labels: self.unlabelled.into_iter().collect(),
                min_generation: spec.min_generation,
                ..KnnOptions::default()
            };
            let found = self.coll.knn_batch(&queries, &opts)?;
            // A class's distance to the anchor class: per anchor item, the distance to
            // its nearest item of that class among the item's neighbours (the item's
            // farthest neighbour when none is), averaged over the anchor items. One
            // item's nearest negatives are noisy; what several agree on is the class's
            // neighbourhood.
            let lists = &found.neighbours;
            let mut per: HashMap<LabelId, Vec<f32>> = HashMap::new();
            for (qi, list) in lists.iter().enumerate() {
                for n in list {
                    let v = per
                        .entry(n.label)
                        .or_insert_with(|| vec![f32::NAN; lists.len()]);
                    if v[qi].is_nan() || n.distance < v[qi] {
                        v[qi] = n.distance;
                    }
                }
            }
            let horizon: Vec<f32> = lists
                .iter()
                .map(|l| l.last().map_or(f32::INFINITY, |n| n.distance))
                .collect();
            let nearest: HashMap<LabelId, f32> = per
                .into_iter()
                .map(|(l, v)| {
                    let sum: f32 = v
                        .iter()
                        .zip(&horizon)
                        .map(|(d, h)| if d.is_nan() { *h } else { *d })
                        .sum();
                    (l, sum / v.len().max(1) as f32)
                })
                .collect();
            let mut ranked: Vec<(usize, f32)> = nearest
                .into_iter()
                .filter_map(|(l, d)| self.layout.class_of(l).map(|q| (q, d)))
                .filter(|(q, _)| *q != anchor && self.cursors[*q].eligible > 0)
                .collect();
            ranked.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
            for (q, d) in ranked.into_iter().take(want_neighbours) {
                chosen.push((q, d));
                neighbours += 1;
            }
        }
        // The rest at random: first from the classes not yet run out this pass, then
        // from any.
        let mut tries = 64 * p + 64;
        while chosen.len() < p && tries > 0 {
            tries -= 1;
            let q = if !self.remaining.is_empty() && tries > 32 * p {
                self.remaining[self.rng.below(self.remaining.len())] as usize
            } else {
                self.live[self.rng.below(self.live.len())] as usize
            };
            if !chosen.iter().any(|(c, _)| *c == q) {
                chosen.push((q, f32::NAN));
            }
        }
        let random = chosen.len() - 1 - neighbours;

        // K items of each class, then resolved.
        let mut keys_of: Vec<Vec<u64>> = vec![anchor_keys];
        {
            let coll = self.coll.clone();
            let c = coll.catalogue();
            for &(q, _) in &chosen[1..] {
                keys_of.push(self.take(&c, q));
            }
        }
        let mut out = ClassBatch {
            classes: chosen
                .iter()
                .map(|(q, _)| self.layout.classes[*q].name.clone())
                .collect(),
            neighbours: neighbours as u32,
            class_distances: chosen.iter().map(|(_, d)| *d).collect(),
            batch: self.batch,
            pass: self.pass,
            ..ClassBatch::default()
        };
        let mut used: Vec<(u64, Arc<str>, Arc<str>, u64)> = Vec::new();
        {
            let c = self.coll.catalogue();
            for ((q, _), keys) in chosen.iter().zip(&keys_of) {
                for &key in keys {
                    // Deleted or replaced since the pass began: skipped.
                    if let Some(e) = c.get(key) {
                        used.push((
                            key,
                            e.id.clone(),
                            self.layout.classes[*q].name.clone(),
                            e.generation,
                        ));
                    }
                }
            }
        }
        let inputs = if spec.with_inputs {
            let ids: Vec<String> = used.iter().map(|u| u.1.to_string()).collect();
            self.coll.stored_inputs(&ids)?
        } else {
            HashMap::new()
        };
        for (key, id, label, generation) in used {
            let vector = if spec.with_vectors {
                match self.coll.vector(key)? {
                    Some(v) => v,
                    None => continue,
                }
            } else {
                Vec::new()
            };
            out.generations = Some(match out.generations {
                Some((lo, hi)) => (lo.min(generation), hi.max(generation)),
                None => (generation, generation),
            });
            out.items.push(MinedItem {
                input: inputs.get(&*id).cloned(),
                id,
                label,
                vector,
                generation,
            });
        }
        self.batch += 1;
        stats.batches += 1;
        stats.neighbour_classes += neighbours as u64;
        stats.random_classes += random as u64;
        Ok(Some(out))
    }
}

/// Whether this stream hands out `key`: still catalogued, fresh enough, in the shard.
fn eligible(c: &Catalogue, spec: &BatchSpec, key: u64) -> bool {
    c.get(key)
        .is_some_and(|e| e.generation >= spec.min_generation && spec.shard.contains(&e.id))
}

/// Runs a MineBatches stream: one batch at a time on the search pool as background
/// work, each only once the reader has a free slot (the same flow control as
/// MineTriplets); the stats at the end.
pub(super) async fn run(
    passes: Passes,
    pool: Arc<crate::pool::WorkPool>,
    tx: mpsc::Sender<Result<ClassBatch>>,
) {
    let started = Instant::now();
    let passes = Arc::new(Mutex::new(passes));
    let mut stats = Stats::default();
    loop {
        let permit = match tx.reserve().await {
            Ok(permit) => permit,
            Err(_) => return,
        };
        drop(permit);
        let job = {
            let passes = passes.clone();
            move || {
                let mut stats = Stats::default();
                let batch = passes.lock().expect("passes lock").next_batch(&mut stats)?;
                Ok((batch, stats))
            }
        };
        let next = tokio::select! {
            r = super::stream::submit(&pool, job) => r,
            _ = tx.closed() => return,
        };
        match next {
            Ok((Some(batch), s)) => {
                stats.merge(&s);
                if tx.send(Ok(batch)).await.is_err() {
                    return;
                }
            }
            Ok((None, _)) => break,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
    }
    stats.seconds = started.elapsed().as_secs_f64();
    let _ = tx
        .send(Ok(ClassBatch {
            stats: Some(stats),
            last: true,
            ..ClassBatch::default()
        }))
        .await;
}
