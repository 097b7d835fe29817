//! Judging with a collection: identification (a kNN vote), verification (is this pair
//! the same?), calibration (fitting the distance-based logistic and the thresholds on
//! labelled pairs) and re-ranking with a pair model.
//!
//! Pure functions over distances, hits and scores: the application layer fetches what
//! they need (hits, vectors, stored inputs, pair scores) and the miner reuses them.

use std::collections::{BTreeMap, HashMap};

use crate::embed::{EmbedHandle, InputData};
use crate::error::{Error, Field, Result};
use crate::rng::Rng;
pub use crate::types::{Calibration, Decision, LabelGroups};
use crate::types::{Hit, Metric};

/// Distance-weighted kNN vote.
#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    pub label: String,
    pub confidence: f32,
    /// (label, weight, count), by weight descending.
    pub votes: Vec<(String, f32, u32)>,
}

/// Is this pair the same?
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verification {
    pub distance: f32,
    pub similarity: f32,
    pub probability: f32,
    pub same: bool,
    /// The pair model's score, when the collection has one (it then decides `same`).
    pub pair_score: Option<f32>,
}

/// A labelled pair Calibrate sampled: two item ids, and whether their labels agree.
pub type SampledPair = (String, String, bool);

/// Neighbours that vote when a Classify request leaves k at 0.
pub const DEFAULT_VOTERS: usize = 10;

/// Pairs Calibrate samples when a request leaves it at 0, and the most it may ask for.
pub const DEFAULT_CALIBRATION_PAIRS: usize = 2000;
pub const MAX_CALIBRATION_PAIRS: u32 = 1_000_000;

/// The pairs a Calibrate request asks for, resolved: 0 is the default, and more than
/// [`MAX_CALIBRATION_PAIRS`] is refused, naming the field.
pub fn calibration_pairs(requested: u32) -> Result<usize> {
    match requested {
        0 => Ok(DEFAULT_CALIBRATION_PAIRS),
        n if n > MAX_CALIBRATION_PAIRS => Err(Error::invalid(
            "pairs",
            format!("{n} exceeds {MAX_CALIBRATION_PAIRS}"),
        )),
        n => Ok(n as usize),
    }
}

/// Identification: a distance-weighted vote (1 / (d + 0.001)) over the hits' labels.
pub fn vote(hits: &[Hit]) -> Option<Classification> {
    if hits.is_empty() {
        return None;
    }
    let mut votes: BTreeMap<&str, (f32, u32)> = BTreeMap::new();
    for h in hits {
        let v = votes.entry(h.label.as_str()).or_default();
        v.0 += 1.0 / (h.distance.max(0.0) + 1e-3);
        v.1 += 1;
    }
    let total: f32 = votes.values().map(|v| v.0).sum();
    let mut votes: Vec<(String, f32, u32)> = votes
        .into_iter()
        .map(|(l, (w, c))| (l.to_string(), w, c))
        .collect();
    votes.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Some(Classification {
        label: votes[0].0.clone(),
        confidence: votes[0].1 / total,
        votes,
    })
}

/// Verification of two vectors by distance, with the collection's logistic and threshold.
pub fn verify(metric: Metric, decision: Decision, a: &[f32], b: &[f32]) -> Verification {
    let distance = metric.distance(a, b);
    let probability = dbl_probability(
        distance,
        decision.margin.unwrap_or(0.0),
        decision.scale.unwrap_or(1.0),
    );
    let same = match decision.threshold {
        Some(t) => distance < t,
        None => probability > 0.5,
    };
    Verification {
        distance,
        similarity: metric.similarity(distance),
        probability,
        same,
        pair_score: None,
    }
}

/// Samples `pairs` labelled pairs (half same label, half not) from items grouped by
/// label, `(id, vector)` each, and fits the logistic and the distance threshold on them.
/// Returns the fit (without a pair model's part) and the pairs, for a pair model to score.
pub fn calibrate(
    collection: &str,
    metric: Metric,
    by_label: &LabelGroups,
    pairs: usize,
    seed: u64,
) -> Result<(Calibration, Vec<SampledPair>)> {
    let groups: Vec<&Vec<(String, Vec<f32>)>> = by_label.values().collect();
    let same_ok: Vec<usize> = (0..groups.len())
        .filter(|g| groups[*g].len() >= 2)
        .collect();
    if same_ok.is_empty() || groups.len() < 2 {
        return Err(Error::invalid(
            "collection",
            format!("{collection:?} needs two labels, one with two items, to calibrate"),
        ));
    }
    let mut rng = Rng::new(if seed == 0 { 0x5EED } else { seed });
    let mut scored: Vec<(f32, bool)> = Vec::with_capacity(pairs);
    let mut sampled = Vec::with_capacity(pairs);
    for i in 0..pairs {
        let (a, b, same) = if i % 2 == 0 {
            let g = groups[same_ok[rng.below(same_ok.len())]];
            let a = rng.below(g.len());
            let mut b = rng.below(g.len() - 1);
            if b >= a {
                b += 1;
            }
            (&g[a], &g[b], true)
        } else {
            let ga = rng.below(groups.len());
            let mut gb = rng.below(groups.len() - 1);
            if gb >= ga {
                gb += 1;
            }
            let (a, b) = (groups[ga], groups[gb]);
            (&a[rng.below(a.len())], &b[rng.below(b.len())], false)
        };
        scored.push((metric.distance(&a.1, &b.1), same));
        sampled.push((a.0.clone(), b.0.clone(), same));
    }
    let (threshold, accuracy) = best_threshold(&mut scored);
    let roc_auc = roc_auc(&scored);
    let (dbl_margin, dbl_scale) = fit_logistic(&scored);
    let cal = Calibration {
        dbl_margin,
        dbl_scale,
        threshold,
        accuracy,
        roc_auc,
        pairs: scored.len() as u32,
        pair: None,
    };
    Ok((cal, sampled))
}

/// A pair model's side of a comparison: an input and the request field it came from.
#[derive(Debug, Clone)]
pub struct RawInput {
    pub data: InputData,
    pub field: Field,
}

/// Scores each hit's stored input against the query's with pair model `model`; returns
/// the k best scores (ties: the nearer first), then the hits that have no stored input,
/// by distance.
pub async fn rerank(
    embedder: &EmbedHandle,
    model: &str,
    query: &RawInput,
    hits: Vec<Hit>,
    stored: &HashMap<String, InputData>,
    k: usize,
) -> Result<Vec<Hit>> {
    let (mut scored, mut rest): (Vec<Hit>, Vec<Hit>) =
        hits.into_iter().partition(|h| stored.contains_key(&h.id));
    if !scored.is_empty() {
        let pairs = scored
            .iter()
            .map(|h| (query.data.clone(), stored[&h.id].clone()))
            .collect();
        let scores = embedder.score(model, pairs, false).await.map_err(|e| {
            e.rebase_pair(|j, side| match side {
                "a" => query.field.clone(),
                _ => Field::name(format!("stored input of item {:?}", scored[j].id)),
            })
        })?;
        for (h, s) in scored.iter_mut().zip(scores) {
            h.pair_score = Some(s);
        }
        scored.sort_by(|a, b| {
            b.pair_score
                .unwrap_or(f32::NEG_INFINITY)
                .total_cmp(&a.pair_score.unwrap_or(f32::NEG_INFINITY))
                .then(a.distance.total_cmp(&b.distance))
        });
    }
    scored.append(&mut rest);
    scored.truncate(k);
    Ok(scored)
}

/// Scores Calibrate's sampled pairs with pair model `model`, `stored` holding the
/// sampled items' inputs; returns the threshold with the best accuracy, that accuracy and
/// the ROC AUC. Pairs with an item that keeps no input are left out.
pub async fn calibrate_pair(
    collection: &str,
    embedder: &EmbedHandle,
    model: &str,
    sampled: &[SampledPair],
    stored: &HashMap<String, InputData>,
) -> Result<(f32, f32, f32)> {
    let (pairs, labels): (Vec<_>, Vec<bool>) = sampled
        .iter()
        .filter_map(|(a, b, same)| {
            let a = stored.get(a)?.clone();
            let b = stored.get(b)?.clone();
            Some(((a, b), *same))
        })
        .unzip();
    if !labels.contains(&true) || !labels.contains(&false) {
        return Err(Error::invalid(
            "collection",
            format!(
                "{collection:?}: too few sampled items keep their inputs to calibrate the pair model"
            ),
        ));
    }
    // Calibration may score more pairs than the queue holds: wait for room.
    let mut scores = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(1024) {
        scores.extend(embedder.score(model, chunk.to_vec(), true).await?);
    }
    let scored: Vec<(f32, bool)> = scores.into_iter().zip(labels).collect();
    Ok(fit_score_threshold(&scored))
}

/// Distance-based logistic (Vo & Hays 2016): p(match) = (1 + e^-m) / (1 + e^(sD - m)),
/// with the distance D scaled by s (s = 1 is the paper's form).
pub fn dbl_probability(distance: f32, m: f32, s: f32) -> f32 {
    let (d, m, s) = (f64::from(distance), f64::from(m), f64::from(s));
    ((1.0 + (-m).exp()) / (1.0 + (s * d - m).exp())).clamp(0.0, 1.0) as f32
}

/// The threshold with the best accuracy of `distance < threshold` (midway between two
/// neighbouring distances), and that accuracy. Sorts `scored` by distance.
fn best_threshold(scored: &mut [(f32, bool)]) -> (f32, f32) {
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n = scored.len();
    let negatives = scored.iter().filter(|s| !s.1).count();
    // Threshold below everything: every pair called "different".
    let (mut best, mut best_at) = (negatives, scored.first().map_or(0.0, |s| s.0));
    let mut correct = negatives;
    for i in 0..n {
        correct = if scored[i].1 {
            correct + 1
        } else {
            correct - 1
        };
        let at = if i + 1 < n {
            (scored[i].0 + scored[i + 1].0) / 2.0
        } else {
            scored[i].0 + 1e-6
        };
        if correct > best && (i + 1 == n || scored[i + 1].0 > scored[i].0) {
            best = correct;
            best_at = at;
        }
    }
    (best_at, best as f32 / n.max(1) as f32)
}

/// The threshold on a score (same when score >= threshold) with the best accuracy on
/// labelled pairs; returns it, that accuracy, and the score's ROC AUC.
pub fn fit_score_threshold(scores: &[(f32, bool)]) -> (f32, f32, f32) {
    // Higher scores mean "same": rank by the negated score as if it were a distance.
    let mut negated: Vec<(f32, bool)> = scores.iter().map(|(s, y)| (-s, *y)).collect();
    let (t, accuracy) = best_threshold(&mut negated);
    (-t, accuracy, roc_auc(&negated))
}

/// ROC AUC of "smaller distance = same": the probability that a random same pair is
/// closer than a random different pair (ties count half).
fn roc_auc(scored: &[(f32, bool)]) -> f32 {
    let mut sorted: Vec<(f32, bool)> = scored.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut pos_before, mut sum) = (0f64, 0f64);
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j < sorted.len() && sorted[j].0 == sorted[i].0 {
            j += 1;
        }
        let (p, q) =
            sorted[i..j].iter().fold(
                (0f64, 0f64),
                |(p, q), s| if s.1 { (p + 1.0, q) } else { (p, q + 1.0) },
            );
        sum += q * (pos_before + p / 2.0);
        pos_before += p;
        i = j;
    }
    let positives = pos_before;
    let negatives = sorted.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return 0.5;
    }
    (sum / (positives * negatives)) as f32
}

/// The margin m and scale s that maximise the pairs' log-likelihood under
/// [`dbl_probability`], m in [-10, 10] and s in [0.1, 1000]: a coarse grid, then two
/// finer grids around the best point.
///
/// The scale is what gives the fit an interior optimum: with s fixed at 1, distances of
/// unit vectors (at most 2) cannot push p near 0, and the likelihood keeps rising as m
/// falls, towards p = e^-D.
fn fit_logistic(scored: &[(f32, bool)]) -> (f32, f32) {
    let ll = |m: f64, s: f64| -> f64 {
        let lift = (1.0 + (-m).exp()).ln();
        scored
            .iter()
            .map(|(d, same)| {
                // ln p = ln(1 + e^-m) - ln(1 + e^(sD - m)), computed without overflow.
                let z = s * f64::from(*d) - m;
                let ln_p = (lift - softplus(z)).min(-1e-12);
                if *same {
                    ln_p
                } else {
                    // ln(1 - p), with p close to 1 handled by expm1.
                    (-ln_p.exp_m1()).max(1e-300).ln()
                }
            })
            .sum()
    };
    let (mut m, mut ln_s) = (0.0f64, 0.0f64);
    let (mut m_step, mut s_step) = (0.5f64, 0.25f64);
    let (mut m_span, mut s_span) = (20i32, 20i32);
    let (m_lo, m_hi, s_lo, s_hi) = (-10.0, 10.0, 0.1f64.ln(), 1000f64.ln());
    let mut best = f64::NEG_INFINITY;
    for round in 0..3 {
        let (m0, s0) = if round == 0 { (0.0, 2.0) } else { (m, ln_s) };
        for i in -m_span..=m_span {
            let mi = (m0 + f64::from(i) * m_step).clamp(m_lo, m_hi);
            for j in -s_span..=s_span {
                let sj = (s0 + f64::from(j) * s_step).clamp(s_lo, s_hi);
                let v = ll(mi, sj.exp());
                if v > best {
                    (best, m, ln_s) = (v, mi, sj);
                }
            }
        }
        (m_step, s_step) = (m_step / 10.0, s_step / 10.0);
        (m_span, s_span) = (10, 10);
    }
    (m as f32, ln_s.exp() as f32)
}

/// ln(1 + e^z), stable for large |z|.
fn softplus(z: f64) -> f64 {
    if z > 30.0 { z } else { z.exp().ln_1p() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dbl_probability_is_one_at_zero_distance_and_falls() {
        assert!((dbl_probability(0.0, 0.5, 1.0) - 1.0).abs() < 1e-6);
        assert!(dbl_probability(0.5, 0.5, 1.0) > dbl_probability(1.0, 0.5, 1.0));
        assert!((dbl_probability(0.5, 0.5, 1.0) - (1.0 + (-0.5f32).exp()) / 2.0).abs() < 1e-6);
        assert!((dbl_probability(0.25, 0.5, 2.0) - dbl_probability(0.5, 0.5, 1.0)).abs() < 1e-6);
    }

    #[test]
    fn logistic_fit_recovers_the_generating_parameters() {
        // Pairs drawn from the model itself, m = 3, s = 8: the fit must land near them,
        // not on the edge of its search box.
        let mut rng = crate::rng::Rng::new(7);
        let scored: Vec<(f32, bool)> = (0..20_000)
            .map(|_| {
                let d = rng.below(1_000_000) as f32 / 1_000_000.0;
                let p = dbl_probability(d, 3.0, 8.0);
                (d, (rng.below(1_000_000) as f32) < p * 1_000_000.0)
            })
            .collect();
        let (m, s) = fit_logistic(&scored);
        assert!((m - 3.0).abs() < 0.4, "m = {m}");
        assert!((s - 8.0).abs() < 1.0, "s = {s}");
    }

    #[test]
    fn threshold_separates_separable_pairs() {
        let mut s = vec![
            (0.1, true),
            (0.2, true),
            (0.3, true),
            (0.7, false),
            (0.8, false),
        ];
        let (t, acc) = best_threshold(&mut s);
        assert!(t > 0.3 && t < 0.7, "{t}");
        assert_eq!(acc, 1.0);
        assert_eq!(roc_auc(&s), 1.0);
        let flipped: Vec<(f32, bool)> = s.iter().map(|(d, y)| (*d, !*y)).collect();
        assert_eq!(roc_auc(&flipped), 0.0);
    }
}
