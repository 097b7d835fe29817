//! The vectors a run measures with: the synthetic clustered set (`likeness::synth`) or
//! Fashion-MNIST's images as 784-d pixel vectors; exact k-NN and recall@k against it.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use likeness::grpc::pb;
use likeness::synth;
use likeness::types::Metric;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Which {
    /// Clustered Gaussian vectors (1,000 clusters), `--dim` wide, cosine.
    Synthetic,
    /// The same with clusters 1.5 times as wide as the spread of their centres, so they
    /// overlap: a harder set for HNSW (a lower recall at the same ef).
    Overlapping,
    /// Fashion-MNIST: the train images as 784-d vectors (pixel / 255), L2; queries from
    /// the test images (Debian package dataset-fashion-mnist).
    Fmnist,
}

pub struct Data {
    /// One line for the report.
    pub describe: String,
    pub dim: usize,
    pub metric: Metric,
    pub vectors: Vec<Vec<f32>>,
    /// The items the daemon stores: id `v<row>`, the row's label, its vector.
    pub items: Arc<Vec<pb::Item>>,
    /// Queries never stored: the QPS runs go round-robin over all of them, recall uses
    /// the first `recall` of them.
    pub queries: Vec<Vec<f32>>,
    pub recall: usize,
}

impl Data {
    pub fn load(
        which: Which,
        n: Option<usize>,
        dim: usize,
        recall: usize,
        fmnist_dir: &Path,
    ) -> Result<Data, String> {
        let (describe, dim, metric, vectors, labels, queries) = match which {
            Which::Synthetic | Which::Overlapping => {
                let n = n.unwrap_or(100_000);
                let (spread, kind) = match which {
                    Which::Overlapping => (1.5, "f32 vectors in 1,000 overlapping clusters"),
                    _ => (0.25, "clustered f32 vectors (1,000 clusters)"),
                };
                let (mut vectors, clusters) = synth::clustered(n + recall, dim, 1000, spread, 7);
                let queries = vectors.split_off(n);
                let labels = clusters.iter().map(|c| format!("c{c}")).collect();
                (
                    format!("{n} x {dim} {kind}, cosine"),
                    dim,
                    Metric::Cosine,
                    vectors,
                    labels,
                    queries,
                )
            }
            Which::Fmnist => {
                let (mut vectors, mut labels) = fmnist(fmnist_dir, "train")?;
                if let Some(n) = n {
                    vectors.truncate(n);
                    labels.truncate(n);
                }
                let (queries, _) = fmnist(fmnist_dir, "t10k")?;
                let labels: Vec<String> = labels.iter().map(|l| format!("c{l}")).collect();
                (
                    format!(
                        "Fashion-MNIST: {} train images as 784-d f32 vectors (pixel / 255), L2; queries from its {} test images",
                        vectors.len(),
                        queries.len()
                    ),
                    784,
                    Metric::L2,
                    vectors,
                    labels,
                    queries,
                )
            }
        };
        let items = vectors
            .iter()
            .zip(&labels)
            .enumerate()
            .map(|(i, (v, l))| pb::Item {
                id: format!("v{i}"),
                label: l.clone(),
                vector: v.clone(),
                ..Default::default()
            })
            .collect();
        let recall = recall.min(queries.len());
        Ok(Data {
            describe,
            dim,
            metric,
            vectors,
            items: Arc::new(items),
            queries,
            recall,
        })
    }

    /// No data, for a run of parts that need none (embed).
    pub fn none() -> Data {
        Data {
            describe: String::new(),
            dim: 0,
            metric: Metric::Cosine,
            vectors: Vec::new(),
            items: Arc::new(Vec::new()),
            queries: Vec::new(),
            recall: 0,
        }
    }

    pub fn n(&self) -> usize {
        self.vectors.len()
    }

    pub fn pb_metric(&self) -> pb::Metric {
        match self.metric {
            Metric::Cosine => pb::Metric::Cosine,
            Metric::L2 => pb::Metric::L2,
            Metric::InnerProduct => pb::Metric::InnerProduct,
        }
    }

    pub fn recall_queries(&self) -> &[Vec<f32>] {
        &self.queries[..self.recall]
    }
}

/// One half of Fashion-MNIST ("train" or "t10k"): images as pixel / 255, and labels.
/// The idx files may be gzipped (as Debian ships them) or not.
fn fmnist(dir: &Path, half: &str) -> Result<(Vec<Vec<f32>>, Vec<u8>), String> {
    let images = idx(dir, &format!("{half}-images-idx3-ubyte"))?;
    let labels = idx(dir, &format!("{half}-labels-idx1-ubyte"))?;
    let (dims, pixels) = parse_idx(&images, 3)?;
    let (ldims, labels) = parse_idx(&labels, 1)?;
    if dims[0] != ldims[0] {
        return Err(format!(
            "{half}: {} images but {} labels",
            dims[0], ldims[0]
        ));
    }
    let size = dims[1] * dims[2];
    let vectors = pixels
        .chunks_exact(size)
        .map(|px| px.iter().map(|p| f32::from(*p) / 255.0).collect())
        .collect();
    Ok((vectors, labels.to_vec()))
}

/// The bytes of an idx file, from NAME or NAME.gz (decompressed by the system's gzip, so
/// the bench needs no inflate crate of its own).
fn idx(dir: &Path, name: &str) -> Result<Vec<u8>, String> {
    let plain = dir.join(name);
    if plain.exists() {
        return std::fs::read(&plain).map_err(|e| format!("{}: {e}", plain.display()));
    }
    let gz = dir.join(format!("{name}.gz"));
    if !gz.exists() {
        return Err(format!(
            "{} not found (install it: apt-get install -y dataset-fashion-mnist; or give --fmnist-dir)",
            gz.display()
        ));
    }
    let out = std::process::Command::new("gzip")
        .arg("-dc")
        .arg(&gz)
        .output()
        .map_err(|e| format!("gzip -dc {}: {e}", gz.display()))?;
    if !out.status.success() {
        return Err(format!(
            "gzip -dc {}: {}",
            gz.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out.stdout)
}

/// An idx file of unsigned bytes with `rank` dimensions: (dimensions, data).
fn parse_idx(bytes: &[u8], rank: usize) -> Result<(Vec<usize>, &[u8]), String> {
    let header = 4 + 4 * rank;
    if bytes.len() < header || bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 {
        return Err("not an idx file of unsigned bytes".into());
    }
    if bytes[3] as usize != rank {
        return Err(format!("idx rank {}, expected {rank}", bytes[3]));
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| {
            u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize
        })
        .collect();
    let len: usize = dims.iter().product();
    let data = bytes
        .get(header..header + len)
        .ok_or("truncated idx file")?;
    Ok((dims, data))
}

/// Exact k nearest neighbours of each query by brute force (row numbers), on `threads`
/// threads.
pub fn exact_knn(
    data: &[Vec<f32>],
    queries: &[Vec<f32>],
    metric: Metric,
    k: usize,
    threads: usize,
) -> Vec<Vec<usize>> {
    let norms: Vec<f32> = match metric {
        Metric::Cosine => data.iter().map(|v| dot(v, v).sqrt()).collect(),
        _ => Vec::new(),
    };
    let mut out = vec![Vec::new(); queries.len()];
    let chunk = queries.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        for (qs, outs) in queries.chunks(chunk).zip(out.chunks_mut(chunk)) {
            let norms = &norms;
            s.spawn(move || {
                for (q, o) in qs.iter().zip(outs) {
                    let qn = dot(q, q).sqrt();
                    let mut d: Vec<(f32, usize)> = data
                        .iter()
                        .enumerate()
                        .map(|(i, v)| {
                            let d = match metric {
                                Metric::Cosine => 1.0 - dot(q, v) / (qn * norms[i]),
                                Metric::L2 => l2sq(q, v),
                                Metric::InnerProduct => 1.0 - dot(q, v),
                            };
                            (d, i)
                        })
                        .collect();
                    let k = k.min(d.len());
                    if k < d.len() {
                        d.select_nth_unstable_by(k, |a, b| a.0.total_cmp(&b.0));
                    }
                    *o = d[..k].iter().map(|(_, i)| *i).collect();
                }
            });
        }
    });
    out
}

/// Eight independent lanes so the compiler can vectorise the sum.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn l2sq(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| (x - y) * (x - y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            let d = x[l] - y[l];
            acc[l] += d * d;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Recall@k: the share of the true k nearest found.
pub fn recall(truth: &[Vec<usize>], mut found: impl FnMut(usize) -> Vec<usize>) -> f64 {
    let mut hit = 0;
    let mut want = 0;
    for (q, t) in truth.iter().enumerate() {
        let t: HashSet<usize> = t.iter().copied().collect();
        want += t.len();
        hit += found(q).iter().filter(|i| t.contains(i)).count();
    }
    hit as f64 / want.max(1) as f64
}
