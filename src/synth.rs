//! Deterministic synthetic data for tests and benchmarks: Gaussian clusters.

pub use crate::rng::Rng;

/// `n` vectors around `clusters` Gaussian centres: (vectors, cluster of each).
pub fn clustered(
    n: usize,
    dim: usize,
    clusters: usize,
    spread: f32,
    seed: u64,
) -> (Vec<Vec<f32>>, Vec<usize>) {
    let mut rng = Rng::new(seed);
    let centres: Vec<Vec<f32>> = (0..clusters)
        .map(|_| (0..dim).map(|_| rng.normal()).collect())
        .collect();
    let mut vectors = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    for _ in 0..n {
        let c = rng.below(clusters);
        vectors.push(
            centres[c]
                .iter()
                .map(|x| x + spread * rng.normal())
                .collect(),
        );
        labels.push(c);
    }
    (vectors, labels)
}
