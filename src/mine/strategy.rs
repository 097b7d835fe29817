//! The mining strategies as plain functions over distances, exact to
//! ../shared/MINING.md. They know nothing of indexes or streams: the miner hands them an
//! anchor's distances (to its positives, and to negative candidates nearest first) and
//! gets back which candidates to use.

use crate::rng::Rng;

/// A candidate for an anchor: its index in the caller's list, and its distance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub index: usize,
    pub distance: f32,
}

/// HARD: the nearest negatives, after skipping the first `skip` ranks (the very nearest
/// "negatives" are often mislabelled positives). `candidates` are nearest first.
pub fn hard(candidates: &[Candidate], skip: usize, n: usize) -> Vec<Candidate> {
    candidates.iter().skip(skip).take(n).copied().collect()
}

/// SEMI_HARD (FaceNet, Schroff et al. 2015): negatives with d_ap < d_an < d_ap + margin,
/// nearest first. When none exists, the nearest negative with d_an > d_ap, and `true`
/// (a fallback, for the stats). `candidates` are nearest first; None when no candidate
/// lies beyond d_ap at all.
pub fn semi_hard(
    d_ap: f32,
    margin: f32,
    candidates: &[Candidate],
    n: usize,
) -> (Vec<Candidate>, bool) {
    let inside: Vec<Candidate> = candidates
        .iter()
        .filter(|c| c.distance > d_ap && c.distance < d_ap + margin)
        .take(n)
        .copied()
        .collect();
    if !inside.is_empty() {
        return (inside, false);
    }
    let beyond = candidates.iter().find(|c| c.distance > d_ap).copied();
    (beyond.into_iter().collect(), true)
}

/// The log of the density of pairwise distances between points uniform on the unit
/// sphere in `dim` dimensions, up to a constant (Wu et al., ICCV 2017, "Sampling
/// Matters"): ln q(d) = (dim - 2) ln d + ((dim - 3) / 2) ln(1 - d^2 / 4).
pub fn log_sphere_density(dim: usize, d: f64) -> f64 {
    let n = dim as f64;
    (n - 2.0) * d.ln() + ((n - 3.0) / 2.0) * (1.0 - d * d / 4.0).max(1e-12).ln()
}

/// DISTANCE_WEIGHTED sampling probabilities for negatives at `distances` (L2 on unit
/// vectors): proportional to min(lambda, 1 / q(d)), with d clamped to at least `cutoff`
/// (0.5) and weight 0 from `no_loss` (1.4) on, where the margin loss is zero anyway.
/// Computed in log space (the powers overflow at any useful dimension). Returns
/// probabilities that sum to 1, or all zeros when every candidate is past `no_loss`.
pub fn distance_weighted(
    dim: usize,
    distances: &[f32],
    lambda: Option<f64>,
    cutoff: f64,
    no_loss: f64,
) -> Vec<f64> {
    distance_weighted_scaled(
        dim,
        distances,
        &vec![0.0; distances.len()],
        lambda,
        cutoff,
        no_loss,
    )
}

/// [`distance_weighted`] where candidate i also stands for exp(log_scale[i]) items (a
/// uniform sample of m out of M carries ln(M / m) each), so that a pool of the nearest
/// candidates plus a sample of the rest draws as the whole collection would.
pub fn distance_weighted_scaled(
    dim: usize,
    distances: &[f32],
    log_scale: &[f64],
    lambda: Option<f64>,
    cutoff: f64,
    no_loss: f64,
) -> Vec<f64> {
    let log_w: Vec<Option<f64>> = distances
        .iter()
        .zip(log_scale)
        .map(|(&d, &scale)| {
            // Compared as the f32 the distance is, so that 1.4f32 counts as 1.4.
            if d >= no_loss as f32 {
                return None;
            }
            let d = f64::from(d);
            let w = -log_sphere_density(dim, d.max(cutoff));
            Some(
                scale
                    + match lambda {
                        Some(l) => w.min(l.ln()),
                        None => w,
                    },
            )
        })
        .collect();
    let Some(max) = log_w.iter().flatten().copied().reduce(f64::max) else {
        return vec![0.0; distances.len()];
    };
    let w: Vec<f64> = log_w
        .iter()
        .map(|l| l.map_or(0.0, |l| (l - max).exp()))
        .collect();
    let total: f64 = w.iter().sum();
    w.into_iter().map(|x| x / total).collect()
}

/// Draws up to `n` distinct indices with the given probabilities (without replacement:
/// each draw renormalises over what is left).
pub fn sample_without_replacement(rng: &mut Rng, probs: &[f64], n: usize) -> Vec<usize> {
    let mut left: Vec<(usize, f64)> = probs
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, p)| *p > 0.0)
        .collect();
    let mut out = Vec::with_capacity(n.min(left.len()));
    while out.len() < n && !left.is_empty() {
        let total: f64 = left.iter().map(|(_, p)| p).sum();
        let mut x = f64::from(rng.uniform()) * total;
        let mut pick = left.len() - 1;
        for (j, (_, p)) in left.iter().enumerate() {
            if x < *p {
                pick = j;
                break;
            }
            x -= p;
        }
        out.push(left.swap_remove(pick).0);
    }
    out
}

/// BATCH_HARD (Hermans et al. 2017): the farthest positive and the nearest negative.
pub fn batch_hard(
    positives: &[Candidate],
    negatives: &[Candidate],
) -> Option<(Candidate, Candidate)> {
    let p = positives
        .iter()
        .copied()
        .max_by(|a, b| a.distance.total_cmp(&b.distance))?;
    let n = negatives
        .iter()
        .copied()
        .min_by(|a, b| a.distance.total_cmp(&b.distance))?;
    Some((p, n))
}

/// MULTI_SIMILARITY's pair selection (Wang et al., CVPR 2019), with cosine similarity
/// S = 1 - D: keep a negative when S_an + eps > min S_ap, a positive when
/// S_ap - eps < max S_an. Returns the kept positives and negatives.
pub fn multi_similarity(
    positives: &[Candidate],
    negatives: &[Candidate],
    eps: f32,
) -> (Vec<Candidate>, Vec<Candidate>) {
    let s = |c: &Candidate| 1.0 - c.distance;
    let min_sap = positives.iter().map(s).reduce(f32::min);
    let max_san = negatives.iter().map(s).reduce(f32::max);
    let kept_n = match min_sap {
        Some(m) => negatives
            .iter()
            .filter(|n| s(n) + eps > m)
            .copied()
            .collect(),
        None => Vec::new(),
    };
    let kept_p = match max_san {
        Some(m) => positives
            .iter()
            .filter(|p| s(p) - eps < m)
            .copied()
            .collect(),
        None => Vec::new(),
    };
    (kept_p, kept_n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(ds: &[f32]) -> Vec<Candidate> {
        ds.iter()
            .enumerate()
            .map(|(index, &distance)| Candidate { index, distance })
            .collect()
    }

    #[test]
    fn semi_hard_takes_the_band_and_falls_back_beyond_d_ap() {
        let c = cands(&[0.1, 0.3, 0.45, 0.55, 0.9]);
        let (got, fallback) = semi_hard(0.4, 0.2, &c, 5);
        assert!(!fallback);
        assert_eq!(got.iter().map(|c| c.index).collect::<Vec<_>>(), vec![2, 3]);
        // Nothing inside (0.4, 0.45): the nearest beyond 0.4 instead, flagged.
        let (got, fallback) = semi_hard(0.4, 0.05, &cands(&[0.1, 0.3, 0.6, 0.9]), 5);
        assert!(fallback);
        assert_eq!(got[0].index, 2);
        // Nothing beyond d_ap at all.
        assert!(semi_hard(1.0, 0.2, &c, 5).0.is_empty());
    }

    #[test]
    fn hard_skips_the_nearest_ranks() {
        let c = cands(&[0.1, 0.2, 0.3, 0.4]);
        assert_eq!(
            hard(&c, 1, 2).iter().map(|c| c.index).collect::<Vec<_>>(),
            vec![1, 2]
        );
    }

    #[test]
    fn distance_weighted_follows_inverse_sphere_density() {
        let ds = [0.3f32, 0.5, 0.8, 1.0, 1.2, 1.39, 1.4, 1.6];
        let p = distance_weighted(128, &ds, None, 0.5, 1.4);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        // Clamped below the cutoff: 0.3 weighs what 0.5 does.
        assert!((p[0] - p[1]).abs() < 1e-12);
        // No weight from 1.4 on.
        assert_eq!((p[6], p[7]), (0.0, 0.0));
        // In 128-d the density peaks near sqrt(2): nearer means much rarer, much heavier.
        assert!(p[1] > p[2] && p[2] > p[3] && p[3] > p[4]);
        // The ratio of two weights is exactly the inverse density ratio.
        let r = p[2] / p[3];
        let (d2, d3) = (f64::from(ds[2]), f64::from(ds[3]));
        let want = (log_sphere_density(128, d3) - log_sphere_density(128, d2)).exp();
        assert!((r / want - 1.0).abs() < 1e-9, "{r} vs {want}");
        // lambda caps the weights: the nearest ones become equal.
        let capped = distance_weighted(128, &ds, Some(1.0), 0.5, 1.4);
        assert!((capped[1] - capped[2]).abs() < 1e-12);
        assert!(
            distance_weighted(128, &[1.5, 1.8], None, 0.5, 1.4)
                .iter()
                .all(|p| *p == 0.0)
        );
    }

    #[test]
    fn weighted_draws_follow_their_probabilities() {
        let probs = [0.5, 0.3, 0.2, 0.0];
        let mut rng = Rng::new(3);
        let mut hits = [0usize; 4];
        let draws = 20_000;
        for _ in 0..draws {
            hits[sample_without_replacement(&mut rng, &probs, 1)[0]] += 1;
        }
        assert_eq!(hits[3], 0);
        // Pearson's chi-square with 2 degrees of freedom: 13.8 is p = 0.001.
        let chi2: f64 = probs[..3]
            .iter()
            .zip(&hits)
            .map(|(p, h)| {
                let e = p * draws as f64;
                (*h as f64 - e).powi(2) / e
            })
            .sum();
        assert!(chi2 < 13.8, "chi2 {chi2}, {hits:?}");
        // Without replacement: distinct, and no more than the nonzero ones.
        let mut all = sample_without_replacement(&mut rng, &probs, 10);
        all.sort();
        assert_eq!(all, vec![0, 1, 2]);
    }

    #[test]
    fn batch_hard_and_multi_similarity_match_their_definitions() {
        let pos = cands(&[0.2, 0.6, 0.35]);
        let neg = cands(&[0.9, 0.5, 0.75]);
        let (p, n) = batch_hard(&pos, &neg).unwrap();
        assert_eq!((p.index, n.index), (1, 1));
        // S_ap = {0.8, 0.4, 0.65}, min 0.4; S_an = {0.1, 0.5, 0.25}, max 0.5; eps 0.1.
        let (kp, kn) = multi_similarity(&pos, &neg, 0.1);
        // Negatives with S_an + 0.1 > 0.4: only 0.5.
        assert_eq!(kn.iter().map(|c| c.index).collect::<Vec<_>>(), vec![1]);
        // Positives with S_ap - 0.1 < 0.5: only 0.4.
        assert_eq!(kp.iter().map(|c| c.index).collect::<Vec<_>>(), vec![1]);
    }
}
