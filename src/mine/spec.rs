//! What a mining request asks for, validated: the core's own form of `MineRequest`,
//! with its defaults filled in and every bad field named.

use crate::error::{Error, Field, Result};

/// Anchors per message, at most.
pub const MAX_BATCH: usize = 4096;
/// ANN candidates per anchor, at most.
pub const MAX_CANDIDATES: usize = 4096;
/// Negatives (and positives) per anchor, at most.
pub const MAX_PER_ANCHOR: usize = 1024;
/// ANN candidates per anchor when the request leaves it at 0.
pub const DEFAULT_CANDIDATES: usize = 64;
/// Uniform negatives drawn beside the kNN pool when the request leaves it at 0.
pub const DEFAULT_SAMPLE: usize = 64;
/// Anchors per message when the request leaves it at 0.
pub const DEFAULT_BATCH: usize = 256;
/// The triplet margin when the request leaves it unset.
pub const DEFAULT_MARGIN: f32 = 0.2;
/// BATCH_HARD and MULTI_SIMILARITY look at this many members of the anchor's label at
/// most (a uniform sample of larger groups).
pub const POSITIVE_SAMPLE: usize = 256;
/// MULTI_SIMILARITY's epsilon.
pub const MS_EPSILON: f32 = 0.1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    Random,
    Hard,
    SemiHard,
    DistanceWeighted,
    BatchHard,
    MultiSimilarity,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Random => "random",
            Strategy::Hard => "hard",
            Strategy::SemiHard => "semi-hard",
            Strategy::DistanceWeighted => "distance-weighted",
            Strategy::BatchHard => "batch-hard",
            Strategy::MultiSimilarity => "multi-similarity",
        }
    }
}

/// Which items are anchors.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Anchors {
    #[default]
    All,
    Ids(Vec<String>),
    Labels(Vec<String>),
}

/// A part of the anchors: those whose id hashes to `index` modulo `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    /// A request's shard: unset (or 0 of 0, proto3's unset) is the whole; an index not
    /// below its count is refused, naming `field`.index.
    pub fn checked(shard: Option<Shard>, field: &Field) -> Result<Shard> {
        match shard {
            None | Some(Shard { index: 0, count: 0 }) => Ok(Shard { index: 0, count: 1 }),
            Some(s) if s.index >= s.count => Err(Error::invalid(
                field.clone().field("index"),
                format!("{} is not below count {}", s.index, s.count),
            )),
            Some(s) => Ok(s),
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.count <= 1 || fnv1a(id.as_bytes()) % u64::from(self.count) == u64::from(self.index)
    }
}

/// FNV-1a, 64 bits: the shard hash (stable across versions and platforms, and easy to
/// compute in any client).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// A validated mining request.
#[derive(Debug, Clone, PartialEq)]
pub struct MineSpec {
    pub collection: String,
    pub strategy: Strategy,
    pub margin: f32,
    pub negatives: usize,
    pub positives: usize,
    pub anchors: Anchors,
    pub batch_size: usize,
    /// 0: no limit (one pass over the anchors).
    pub max_triplets: u64,
    pub seed: u64,
    pub candidates: usize,
    /// Uniform negatives beside the kNN pool (window strategies, DISTANCE_WEIGHTED).
    pub sample: usize,
    pub skip_nearest: usize,
    pub min_distance: Option<f32>,
    pub max_distance: Option<f32>,
    pub pos_margin: Option<f32>,
    pub neg_margin: Option<f32>,
    pub exclude_ids: Vec<String>,
    pub min_generation: u64,
    pub shard: Shard,
    pub with_vectors: bool,
    pub with_inputs: bool,
    /// 0: the collection's.
    pub expansion: usize,
}

/// A mining request as it arrives, before defaults and checks.
#[derive(Debug, Clone, Default)]
pub struct RawSpec {
    pub collection: String,
    pub strategy: Option<Strategy>,
    pub margin: Option<f32>,
    pub negatives: u32,
    pub positives: u32,
    pub anchors: Anchors,
    pub batch_size: u32,
    pub max_triplets: u64,
    pub seed: u64,
    pub candidates: u32,
    pub sample: u32,
    pub skip_nearest: u32,
    pub min_distance: Option<f32>,
    pub max_distance: Option<f32>,
    pub pos_margin: Option<f32>,
    pub neg_margin: Option<f32>,
    pub exclude_ids: Vec<String>,
    pub min_generation: u64,
    pub shard: Option<Shard>,
    pub with_vectors: bool,
    pub with_inputs: bool,
    pub expansion: u32,
}

impl RawSpec {
    /// Fills in defaults and checks every field that can be checked without the
    /// collection; errors name the field under `root` (e.g. `request.margin` in a
    /// Session step).
    pub fn validate(self, root: &Field) -> Result<MineSpec> {
        let at = |name: &'static str| Field::name(name).under(root);
        let finite = |name: &'static str, v: Option<f32>| match v {
            Some(x) if !x.is_finite() => Err(Error::invalid(at(name), "must be finite")),
            _ => Ok(v),
        };
        if self.collection.is_empty() {
            return Err(Error::invalid(at("collection"), "must not be empty"));
        }
        let Some(strategy) = self.strategy else {
            return Err(Error::invalid(
                at("strategy"),
                "unspecified: choose RANDOM, HARD, SEMI_HARD, DISTANCE_WEIGHTED, BATCH_HARD or MULTI_SIMILARITY",
            ));
        };
        let margin = finite("margin", self.margin)?.unwrap_or(DEFAULT_MARGIN);
        if margin < 0.0 {
            return Err(Error::invalid(
                at("margin"),
                format!("{margin} is negative"),
            ));
        }
        let per_anchor = |name: &'static str, n: u32| {
            let n = (n as usize).max(1);
            if n > MAX_PER_ANCHOR {
                return Err(Error::invalid(
                    at(name),
                    format!("{n}, at most {MAX_PER_ANCHOR}"),
                ));
            }
            Ok(n)
        };
        let negatives = per_anchor("negatives_per_anchor", self.negatives)?;
        let positives = per_anchor("positives_per_anchor", self.positives)?;
        let batch_size = match self.batch_size as usize {
            0 => DEFAULT_BATCH,
            b => b,
        };
        if batch_size > MAX_BATCH {
            return Err(Error::invalid(
                at("batch_size"),
                format!("{batch_size}: at most {MAX_BATCH} anchors"),
            ));
        }
        let skip_nearest = self.skip_nearest as usize;
        let candidates = match self.candidates as usize {
            0 => DEFAULT_CANDIDATES.max(skip_nearest + 4 * negatives),
            c => c,
        };
        if candidates > MAX_CANDIDATES {
            return Err(Error::invalid(
                at("candidates"),
                format!("{candidates}, at most {MAX_CANDIDATES}"),
            ));
        }
        let sample = match self.sample as usize {
            0 => DEFAULT_SAMPLE,
            s => s,
        };
        if sample > MAX_CANDIDATES {
            return Err(Error::invalid(
                at("sample"),
                format!("{sample}, at most {MAX_CANDIDATES}"),
            ));
        }
        if skip_nearest >= candidates {
            return Err(Error::invalid(
                at("skip_nearest"),
                format!("{skip_nearest} skips every one of the {candidates} candidates"),
            ));
        }
        let min_distance = finite("min_distance", self.min_distance)?;
        let max_distance = finite("max_distance", self.max_distance)?;
        if let (Some(lo), Some(hi)) = (min_distance, max_distance)
            && lo > hi
        {
            return Err(Error::invalid(
                at("max_distance"),
                format!("{hi} is below min_distance {lo}"),
            ));
        }
        let pos_margin = finite("pos_margin", self.pos_margin)?;
        let neg_margin = finite("neg_margin", self.neg_margin)?;
        let shard = Shard::checked(self.shard, &at("shard"))?;
        match &self.anchors {
            Anchors::Ids(ids) if ids.is_empty() => {
                return Err(Error::invalid(
                    at("anchors").field("ids"),
                    "must not be empty",
                ));
            }
            Anchors::Labels(l) if l.is_empty() => {
                return Err(Error::invalid(
                    at("anchors").field("labels"),
                    "must not be empty",
                ));
            }
            _ => {}
        }
        Ok(MineSpec {
            collection: self.collection,
            strategy,
            margin,
            negatives,
            positives,
            anchors: self.anchors,
            batch_size,
            max_triplets: self.max_triplets,
            seed: self.seed,
            candidates,
            sample,
            skip_nearest,
            min_distance,
            max_distance,
            pos_margin,
            neg_margin,
            exclude_ids: self.exclude_ids,
            min_generation: self.min_generation,
            shard,
            with_vectors: self.with_vectors,
            with_inputs: self.with_inputs,
            expansion: self.expansion as usize,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw() -> RawSpec {
        RawSpec {
            collection: "c".into(),
            strategy: Some(Strategy::SemiHard),
            batch_size: 8,
            ..Default::default()
        }
    }

    #[test]
    fn defaults_fill_in() {
        let s = raw().validate(&Field::default()).unwrap();
        assert_eq!((s.negatives, s.positives), (1, 1));
        assert_eq!(s.margin, DEFAULT_MARGIN);
        assert_eq!(s.candidates, DEFAULT_CANDIDATES);
        assert_eq!(s.shard, Shard { index: 0, count: 1 });
    }

    #[test]
    fn bad_fields_are_named() {
        let field = |r: RawSpec| match r.validate(&Field::default()) {
            Err(Error::InvalidArgument { field, .. }) => field.to_string(),
            other => panic!("expected InvalidArgument, got {other:?}"),
        };
        assert_eq!(
            field(RawSpec {
                strategy: None,
                ..raw()
            }),
            "strategy"
        );
        assert_eq!(
            field(RawSpec {
                margin: Some(-0.1),
                ..raw()
            }),
            "margin"
        );
        // 0 is proto3's unset: the default, not an error.
        assert_eq!(
            RawSpec {
                batch_size: 0,
                ..raw()
            }
            .validate(&Field::default())
            .unwrap()
            .batch_size,
            DEFAULT_BATCH
        );
        assert_eq!(
            field(RawSpec {
                sample: 5000,
                ..raw()
            }),
            "sample"
        );
        assert_eq!(
            field(RawSpec {
                batch_size: 5000,
                ..raw()
            }),
            "batch_size"
        );
        assert_eq!(
            field(RawSpec {
                shard: Some(Shard { index: 2, count: 2 }),
                ..raw()
            }),
            "shard.index"
        );
        assert_eq!(
            field(RawSpec {
                candidates: 10,
                skip_nearest: 10,
                ..raw()
            }),
            "skip_nearest"
        );
    }

    #[test]
    fn shards_partition_ids() {
        let ids: Vec<String> = (0..1000).map(|i| format!("item-{i}")).collect();
        for count in [1, 2, 3, 8] {
            for id in &ids {
                let owners = (0..count)
                    .filter(|&index| Shard { index, count }.contains(id))
                    .count();
                assert_eq!(owners, 1, "{id} in {owners} of {count} shards");
            }
        }
    }
}
