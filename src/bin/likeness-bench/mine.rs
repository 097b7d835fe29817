//! The mine part: likeness.v1.Miner over gRPC against its references, per corpus size N
//! (`--mine-n`, each a fresh daemon):
//!
//! - the limit: usearch's own kNN in this process on an index of the same vectors and
//!   parameters, for the same anchors with the same k and expansion, on `--threads`
//!   threads: plain (k nearest, nothing excluded: the real limit, since the miner's kNN
//!   now runs a plain search and drops excluded items afterwards) and filtered the way a
//!   filtered walk filters (a predicate that drops the anchor's label);
//! - likeness itself for HARD (the kNN pool alone) and SEMI_HARD (the pool, a uniform
//!   sample beside it, and a second search when neither holds a window negative), with
//!   where its negatives came from (MineStats.sources) and which kNN path its queries
//!   took (the daemon's likeness_mine_knn_queries_total, plain or filtered);
//! - what a trainer would run instead: bench/exact_miner.py, an exact miner on faiss's
//!   IndexFlatIP (blocked matrix products on BLAS), on the same vectors, anchors and
//!   positives and as many threads; it also reports how likeness's choices agree with
//!   the exact ones (condition precision, same negative, HARD overlap). `--exact-anchors
//!   0` leaves it out;
//! - memory: the daemon's RSS while a deliberately slow reader drains a stream capped at
//!   `--mine-memory-triplets`.
//!
//! Two corpora (`--mine-corpus`), labelled unit vectors, `--dim` wide, cosine,
//! `--mine-per-class` items per class:
//!
//! - clustered (the default): classes come in families of ten whose centres share a
//!   parent direction, and items scatter around their class centre, so that an anchor's
//!   nearest other-class items lie at about the distance of its positives: semi-hard
//!   negatives exist for most anchors, and some negatives are nearer than the positive
//!   (hard ones), as in a half-trained embedding (a numpy check of this model at 100k:
//!   d_ap median 0.23, the nearest negative's median 0.33, a window negative for 96% of
//!   anchors);
//! - cold: what an untrained network emits, unit Gaussian vectors with no class
//!   structure, labels assigned round-robin. Every distance is near 1, positives are as
//!   far as anything else, and the SEMI_HARD window (d_ap, d_ap + margin) lies far
//!   beyond the nearest neighbours: the kNN pool cannot hold it, the uniform sample must.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use likeness::grpc::pb;
use likeness::grpc::pb::miner_client::MinerClient;
use likeness::rng::Rng;
use likeness::types::{IndexParams, Metric};
use tokio_stream::StreamExt;

use crate::daemon::{COLLECTION, Daemon, connect, status};
use crate::data::Data;
use crate::procfs::Meter;
use crate::{Ctx, Stat, stat};

/// Classes per family (they share a parent direction).
const FAMILY: usize = 10;
/// Spread of class centres around their family's direction, and of items around their
/// class centre (norm of the Gaussian offset, relative to a unit direction).
const CLASS_SPREAD: f32 = 0.8;
const ITEM_SPREAD: f32 = 0.7;
/// The miner's default candidate pool (k of its kNN), which the references use too.
const K: usize = 64;
/// Negatives per anchor in the HARD agreement run (its overlap with the exact nearest).
const HARD_K: usize = 10;
/// Positives per anchor in the "several positives share one kNN" figure.
const MANY_POSITIVES: u32 = 4;
/// Anchors per message.
const BATCH: u32 = 256;
const MARGIN: f32 = 0.2;

/// Which labelled corpus a run mines (see the module's doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CorpusKind {
    /// Unit Gaussian vectors, no class structure, labels round-robin: an untrained
    /// network's embedding.
    Cold,
    /// Classes in families around shared directions: a half-trained embedding.
    Clustered,
}

impl CorpusKind {
    pub fn name(self) -> &'static str {
        match self {
            CorpusKind::Cold => "cold",
            CorpusKind::Clustered => "clustered",
        }
    }
}

/// A labelled corpus: row i is item `v{i}`, label `c{labels[i]}`.
pub struct Corpus {
    pub n: usize,
    pub classes: usize,
    pub data: Data,
    pub labels: Vec<u32>,
}

pub fn unit(v: &mut [f32]) {
    let n = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    v.iter_mut().for_each(|x| *x /= n);
}

/// A Gaussian vector whose expected norm is about `scale`.
pub fn gaussian(rng: &mut Rng, dim: usize, scale: f32) -> Vec<f32> {
    let s = scale / (dim as f32).sqrt();
    (0..dim).map(|_| s * rng.normal()).collect()
}

impl Corpus {
    pub fn new(kind: CorpusKind, n: usize, dim: usize, per_class: usize, seed: u64) -> Corpus {
        let mut rng = Rng::new(seed);
        let classes = (n / per_class.max(1)).max(2);
        let (vectors, labels) = match kind {
            CorpusKind::Cold => Self::cold(&mut rng, n, dim, classes),
            CorpusKind::Clustered => Self::clustered(&mut rng, n, dim, classes),
        };
        let items = vectors
            .iter()
            .zip(&labels)
            .enumerate()
            .map(|(i, (v, l))| pb::Item {
                id: format!("v{i}"),
                label: format!("c{l}"),
                vector: v.clone(),
                ..Default::default()
            })
            .collect();
        let describe = match kind {
            CorpusKind::Cold => format!(
                "{n} x {dim} unit Gaussian vectors (cold: no class structure), {classes} labels round-robin, cosine"
            ),
            CorpusKind::Clustered => format!(
                "{n} x {dim} labelled unit vectors, {classes} classes in families of {FAMILY}, cosine"
            ),
        };
        let data = Data {
            describe,
            dim,
            metric: Metric::Cosine,
            vectors,
            items: Arc::new(items),
            queries: Vec::new(),
            recall: 0,
        };
        Corpus {
            n,
            classes,
            data,
            labels,
        }
    }

    /// An untrained network's output: no structure at all; item i has label i mod
    /// classes.
    fn cold(rng: &mut Rng, n: usize, dim: usize, classes: usize) -> (Vec<Vec<f32>>, Vec<u32>) {
        let vectors = (0..n)
            .map(|_| {
                let mut v = gaussian(rng, dim, 1.0);
                unit(&mut v);
                v
            })
            .collect();
        let labels = (0..n).map(|i| (i % classes) as u32).collect();
        (vectors, labels)
    }

    fn clustered(rng: &mut Rng, n: usize, dim: usize, classes: usize) -> (Vec<Vec<f32>>, Vec<u32>) {
        let families: Vec<Vec<f32>> = (0..classes.div_ceil(FAMILY))
            .map(|_| gaussian(rng, dim, 1.0))
            .collect();
        let centres: Vec<Vec<f32>> = (0..classes)
            .map(|c| {
                let off = gaussian(rng, dim, CLASS_SPREAD);
                families[c / FAMILY]
                    .iter()
                    .zip(off)
                    .map(|(a, b)| a + b)
                    .collect()
            })
            .collect();
        let mut vectors = Vec::with_capacity(n);
        let mut labels = Vec::with_capacity(n);
        for _ in 0..n {
            let c = rng.below(classes);
            let off = gaussian(rng, dim, ITEM_SPREAD);
            let mut v: Vec<f32> = centres[c].iter().zip(off).map(|(a, b)| a + b).collect();
            unit(&mut v);
            vectors.push(v);
            labels.push(c as u32);
        }
        (vectors, labels)
    }
}

/// Row of an item id `v{row}`.
fn row(id: &str) -> Option<usize> {
    id.strip_prefix('v')?.parse().ok()
}

// .npy files for the exact miner (format version 1.0, little-endian, C order).

fn write_npy(path: &Path, descr: &str, shape: &[usize], bytes: &[u8]) -> Result<(), String> {
    let dims: Vec<String> = shape.iter().map(ToString::to_string).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + bytes.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(bytes);
    std::fs::write(path, out).map_err(|e| format!("{}: {e}", path.display()))
}

fn npy_f32(path: &Path, rows: &[Vec<f32>]) -> Result<(), String> {
    let dim = rows.first().map_or(0, Vec::len);
    let bytes: Vec<u8> = rows
        .iter()
        .flatten()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    write_npy(path, "<f4", &[rows.len(), dim], &bytes)
}

fn npy_i64(path: &Path, shape: &[usize], values: &[i64]) -> Result<(), String> {
    let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
    write_npy(path, "<i8", shape, &bytes)
}

fn npy_u8(path: &Path, shape: &[usize], values: &[u8]) -> Result<(), String> {
    write_npy(path, "|u1", shape, values)
}

// Mining over gRPC.

/// One mining stream read to its end.
struct Mined {
    /// Wall time from the request to the last message, as the client sees it.
    secs: f64,
    anchors: u64,
    triplets: u64,
    /// Anchors with at least one triplet that is not a fallback (SEMI_HARD: a negative
    /// inside the window).
    in_window: u64,
    /// Non-fallback SEMI_HARD triplets whose reported distances break the window
    /// (d_ap < d_an < d_ap + margin): should be 0.
    window_broken: u64,
    /// Kept only when asked.
    kept: Vec<pb::Triplet>,
    stats: pb::MineStats,
    cpu: crate::procfs::Cpu,
    /// The daemon's kNN queries during the stream, by path (plain, filtered); None when
    /// it exports no such metric.
    knn: Option<(f64, f64)>,
}

impl Mined {
    fn rate(&self) -> f64 {
        self.anchors as f64 / self.secs
    }

    fn source(&self, name: &str) -> u64 {
        self.stats.sources.get(name).copied().unwrap_or(0)
    }
}

/// The daemon's kNN query counters (plain, filtered).
async fn knn_paths(d: &Daemon) -> Option<(f64, f64)> {
    let series = |path: &str| {
        format!("likeness_mine_knn_queries_total{{collection=\"{COLLECTION}\",path=\"{path}\"}}")
    };
    let plain = d.metric(&series("plain")).await.ok().flatten()?;
    let filtered = d.metric(&series("filtered")).await.ok().flatten()?;
    Some((plain, filtered))
}

fn request(
    strategy: pb::Strategy,
    anchors: &[String],
    positives: u32,
    negatives: u32,
) -> pb::MineRequest {
    pb::MineRequest {
        collection: COLLECTION.into(),
        strategy: strategy as i32,
        margin: Some(MARGIN),
        negatives_per_anchor: negatives,
        positives_per_anchor: positives,
        anchors: Some(pb::AnchorSet {
            kind: Some(pb::anchor_set::Kind::Ids(pb::AnchorIds {
                ids: anchors.to_vec(),
            })),
        }),
        batch_size: BATCH,
        seed: 7,
        ..Default::default()
    }
}

async fn miner(d: &Daemon) -> Result<MinerClient<likeness::grpc::client::Channel>, String> {
    Ok(MinerClient::new(connect(d.spec(), &d.url).await?)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

/// Runs one MineTriplets stream to its end; `pause` between messages makes a slow
/// reader.
async fn mine(
    d: &Daemon,
    req: pb::MineRequest,
    keep: bool,
    pause: Option<Duration>,
) -> Result<Mined, String> {
    let semi_hard = req.strategy == pb::Strategy::SemiHard as i32;
    let margin = req.margin.unwrap_or(MARGIN);
    let mut client = miner(d).await?;
    let knn_before = knn_paths(d).await;
    let cpu = Meter::start(d.pid());
    let start = Instant::now();
    let mut stream = client
        .mine_triplets(req)
        .await
        .map_err(status)?
        .into_inner();
    let (mut triplets, mut kept, mut stats) = (0u64, Vec::new(), None);
    let mut in_window = std::collections::HashSet::new();
    let mut window_broken = 0u64;
    while let Some(msg) = stream.next().await {
        let msg = msg.map_err(status)?;
        triplets += msg.triplets.len() as u64;
        for t in msg.triplets.iter().filter(|t| !t.fallback) {
            if semi_hard && t.d_an.iter().any(|&d| !(d > t.d_ap && d < t.d_ap + margin)) {
                window_broken += 1;
            }
            if !in_window.contains(&t.anchor_id) {
                in_window.insert(t.anchor_id.clone());
            }
        }
        if keep {
            kept.extend(msg.triplets);
        }
        if msg.last {
            stats = msg.stats;
            break;
        }
        if let Some(p) = pause {
            tokio::time::sleep(p).await;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu.stop();
    let knn = match (knn_before, knn_paths(d).await) {
        (Some(a), Some(b)) => Some((b.0 - a.0, b.1 - a.1)),
        _ => None,
    };
    let stats = stats.ok_or("the stream ended without its last message")?;
    Ok(Mined {
        secs,
        anchors: stats.anchors,
        triplets,
        in_window: in_window.len() as u64,
        window_broken,
        kept,
        stats,
        cpu,
        knn,
    })
}

// The in-process references.

/// usearch's kNN for every anchor row on `threads` threads: the k nearest of another
/// label (a predicate over a label array, the cheapest filter there is), or with
/// `filtered` false the plain k nearest (nothing excluded: the least work any kNN miner
/// can do per anchor). Returns anchors/s, this process's CPU µs
/// per anchor and the neighbours.
fn usearch_knn(
    index: &usearch::Index,
    corpus: &Corpus,
    anchors: &[usize],
    threads: usize,
    filtered: bool,
) -> (f64, f64, Vec<Vec<u64>>) {
    let mut out = vec![Vec::new(); anchors.len()];
    let chunk = anchors.len().div_ceil(threads.max(1)).max(1);
    let labels = &corpus.labels;
    let vectors = &corpus.data.vectors;
    let cpu = Meter::start(None);
    let start = Instant::now();
    std::thread::scope(|s| {
        for (part, outs) in anchors.chunks(chunk).zip(out.chunks_mut(chunk)) {
            s.spawn(move || {
                for (&a, o) in part.iter().zip(outs) {
                    let m = if filtered {
                        let own = labels[a];
                        index.filtered_search(&vectors[a][..], K, |key: u64| {
                            labels[key as usize] != own
                        })
                    } else {
                        index.search(&vectors[a][..], K)
                    };
                    *o = m.map(|m| m.keys).unwrap_or_default();
                }
            });
        }
    });
    let rate = anchors.len() as f64 / start.elapsed().as_secs_f64();
    (rate, cpu.stop().per(anchors.len()).1, out)
}

/// The exact miner's report (bench/exact_miner.py's JSON).
#[derive(Debug, Default, serde::Deserialize)]
struct Exact {
    anchors_per_second: Vec<f64>,
    cpu_us_per_anchor: Vec<f64>,
    anchors_per_second_all_positives: Vec<f64>,
    #[serde(default)]
    exact_fallback_share: f64,
    #[serde(default)]
    full_row_searches: u64,
    triplets_compared: Option<u64>,
    likeness_in_window: Option<u64>,
    exact_in_window: Option<u64>,
    condition_precision: Option<f64>,
    same_as_exact: Option<f64>,
    window_recall: Option<f64>,
    median_extra_distance: Option<f64>,
    p99_extra_distance: Option<f64>,
    hard_overlap: Option<f64>,
}

fn run_exact(ctx: &Ctx, dir: &Path, runs: usize) -> Result<Exact, String> {
    let args = &ctx.args;
    let out = std::process::Command::new(&args.python)
        .arg(&args.exact_script)
        .arg(dir)
        .args(["--threads", &ctx.threads.to_string()])
        .args(["--runs", &runs.to_string()])
        .args(["--margin", &MARGIN.to_string()])
        .args(["--pool", &K.to_string()])
        .args(["--hard-k", &HARD_K.to_string()])
        .args(&args.exact_args)
        .output()
        .map_err(|e| format!("{} {}: {e}", args.python, args.exact_script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "the exact miner failed ({}): {}\n(install its dependencies: python3 -m pip install --user numpy faiss-cpu)",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).map_err(|e| format!("the exact miner's report {line:?}: {e}"))
}

/// What one corpus size gave.
pub struct SizeResult {
    n: usize,
    hard: Stat,
    semi: Stat,
    likeness_many: Stat,
    triplets_per_anchor_many: f64,
    usearch_filtered: Stat,
    usearch_plain: Stat,
    /// None when the exact miner was left out.
    exact: Option<Stat>,
    /// CPU µs per anchor: likeness HARD, SEMI_HARD (daemon + client), usearch plain,
    /// usearch filtered, exact.
    cpu: Cpu5,
    /// SEMI_HARD: the share of anchors with a triplet inside the window.
    in_window: f64,
}

#[derive(Debug, Clone, Copy)]
struct Cpu5 {
    hard: f64,
    semi: f64,
    plain: f64,
    filtered: f64,
    exact: f64,
}

/// Writes the agreement inputs: likeness's SEMI_HARD choices (several positives) and
/// HARD negatives for the exact subset of anchors.
async fn agreement_inputs(d: &Daemon, dir: &Path, anchors: &[usize]) -> Result<(), String> {
    let ids: Vec<String> = anchors.iter().map(|a| format!("v{a}")).collect();
    let slot: HashMap<usize, usize> = anchors.iter().enumerate().map(|(i, a)| (*a, i)).collect();
    let p = MANY_POSITIVES as usize;
    let semi = mine(
        d,
        request(pb::Strategy::SemiHard, &ids, MANY_POSITIVES, 1),
        true,
        None,
    )
    .await?;
    let hard = mine(
        d,
        request(pb::Strategy::Hard, &ids, 1, HARD_K as u32),
        true,
        None,
    )
    .await?;
    let a = anchors.len();
    let mut positives = vec![-1i64; a * p];
    let mut negatives = vec![-1i64; a * p];
    let mut fallback = vec![0u8; a * p];
    let mut filled = vec![0usize; a];
    for t in &semi.kept {
        let (Some(ar), Some(pr)) = (row(&t.anchor_id), row(&t.positive_id)) else {
            continue;
        };
        let Some(&i) = slot.get(&ar) else { continue };
        if filled[i] == p {
            continue;
        }
        let j = i * p + filled[i];
        filled[i] += 1;
        positives[j] = pr as i64;
        negatives[j] = t
            .negative_ids
            .first()
            .and_then(|n| row(n))
            .map_or(-1, |r| r as i64);
        fallback[j] = u8::from(t.fallback);
    }
    let mut hard_rows = vec![-1i64; a * HARD_K];
    for t in &hard.kept {
        let Some(&i) = row(&t.anchor_id).and_then(|r| slot.get(&r)) else {
            continue;
        };
        for (j, n) in t.negative_ids.iter().take(HARD_K).enumerate() {
            hard_rows[i * HARD_K + j] = row(n).map_or(-1, |r| r as i64);
        }
    }
    let rows: Vec<i64> = anchors.iter().map(|&r| r as i64).collect();
    npy_i64(&dir.join("anchors.npy"), &[a], &rows)?;
    npy_i64(&dir.join("positives.npy"), &[a, p], &positives)?;
    npy_i64(&dir.join("likeness_semi.npy"), &[a, p], &negatives)?;
    npy_u8(&dir.join("likeness_fallback.npy"), &[a, p], &fallback)?;
    npy_i64(&dir.join("likeness_hard.npy"), &[a, HARD_K], &hard_rows)?;
    Ok(())
}

/// A sanity check of the filtered reference: it never returns the anchor's own label,
/// and says when it found fewer than k.
fn check_reference(found: &[Vec<u64>], corpus: &Corpus, anchors: &[usize]) -> Result<(), String> {
    let short = found.iter().filter(|f| f.len() < K).count();
    let wrong = found
        .iter()
        .zip(anchors)
        .filter(|(f, a)| {
            f.iter()
                .any(|k| corpus.labels[*k as usize] == corpus.labels[**a])
        })
        .count();
    if wrong > 0 {
        return Err(format!(
            "the filtered reference returned the anchor's own label for {wrong} anchors"
        ));
    }
    if short > 0 {
        eprintln!(
            "note: the filtered reference found fewer than {K} neighbours for {short} anchors"
        );
    }
    Ok(())
}

/// The memory figure: RSS sampled every 20 ms while a reader that sleeps `pause` after
/// each message drains a stream of `cap` triplets.
async fn memory(ctx: &Ctx, d: &Daemon, corpus: &Corpus) -> Result<(), String> {
    let cap = ctx.args.mine_memory_triplets;
    let pause = Duration::from_millis(ctx.args.mine_slow_ms);
    let positives = (cap as usize).div_ceil(corpus.n).clamp(1, 1024) as u32;
    let pid = d.pid().ok_or("the daemon is not running")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (before, before_anon, _) = d.memory_kib()?;
    let peak = Arc::new(AtomicU64::new(before));
    let peak_anon = Arc::new(AtomicU64::new(before_anon));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, peak_anon, done) = (peak.clone(), peak_anon.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                if let Ok(kib) = crate::procfs::status_kib(pid, "VmRSS") {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
                if let Ok(kib) = crate::procfs::status_kib(pid, "RssAnon") {
                    peak_anon.fetch_max(kib, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let req = pb::MineRequest {
        collection: COLLECTION.into(),
        strategy: pb::Strategy::SemiHard as i32,
        positives_per_anchor: positives,
        batch_size: BATCH,
        max_triplets: cap,
        seed: 11,
        ..Default::default()
    };
    eprintln!(
        "memory: a reader sleeping {} ms per message drains {cap} triplets ({positives} positives per anchor)",
        pause.as_millis()
    );
    let mut client = miner(d).await?;
    let start = Instant::now();
    let mut stream = client
        .mine_triplets(req)
        .await
        .map_err(status)?
        .into_inner();
    let (mut triplets, mut messages, mut bytes) = (0u64, 0u64, 0usize);
    while let Some(msg) = stream.next().await {
        let msg = msg.map_err(status)?;
        messages += 1;
        triplets += msg.triplets.len() as u64;
        bytes += prost::Message::encoded_len(&msg);
        if msg.last {
            break;
        }
        tokio::time::sleep(pause).await;
    }
    let secs = start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    let (after, after_anon, _) = d.memory_kib()?;
    let mib = |k: u64| k as f64 / 1024.0;
    let (peak, peak_anon) = (
        peak.load(Ordering::Relaxed),
        peak_anon.load(Ordering::Relaxed),
    );
    println!(
        "### Memory while a slow reader drains {triplets} triplets (N = {}, {positives} positives per anchor, {BATCH} anchors per message)\n",
        corpus.n
    );
    println!("| | VmRSS MiB | RssAnon MiB |");
    println!("|---|---|---|");
    println!(
        "| before the stream | {:.0} | {:.0} |",
        mib(before),
        mib(before_anon)
    );
    println!(
        "| peak during it (sampled every 20 ms) | {:.0} (+{:.1}) | {:.0} (+{:.1}) |",
        mib(peak),
        mib(peak.saturating_sub(before)),
        mib(peak_anon),
        mib(peak_anon.saturating_sub(before_anon))
    );
    println!("| after it | {:.0} | {:.0} |", mib(after), mib(after_anon));
    println!();
    println!(
        "The reader slept {} ms after each of {messages} messages ({:.0} s in all); the stream carried {:.1} MiB of protobuf, so a server that buffered it would have grown by at least that much.\n",
        pause.as_millis(),
        secs,
        bytes as f64 / (1 << 20) as f64
    );
    Ok(())
}

/// Anchors whose filtered reference answer is checked (never the anchor's own label).
const CHECKED: usize = 500;

/// `a` per CPU-second over `b` per CPU-second, from CPU µs per anchor.
fn by_cpu(a_us: f64, b_us: f64) -> f64 {
    b_us / a_us
}

/// One corpus size: a fresh daemon, the references, the figures.
async fn one_size(ctx: &Ctx, n: usize) -> Result<SizeResult, String> {
    let args = &ctx.args;
    let runs = ctx.runs;
    let threads = ctx.threads;
    let kind = args.mine_corpus;
    eprintln!(
        "mine: generating {n} labelled vectors ({} corpus)",
        kind.name()
    );
    let corpus = Corpus::new(kind, n, args.dim, args.mine_per_class, 7);

    // The anchors: a seeded sample; the exact subset is its head.
    let mut rng = Rng::new(99);
    let mut order: Vec<usize> = (0..n).collect();
    let take = args.mine_anchors.min(n);
    for i in 0..take {
        let j = i + rng.below(n - i);
        order.swap(i, j);
    }
    let anchors: Vec<usize> = order[..take].to_vec();
    let exact_anchors = &anchors[..args.exact_anchors.min(take)];
    let ids: Vec<String> = anchors.iter().map(|a| format!("v{a}")).collect();

    // The exact miner's inputs, only when it runs.
    let dir = if exact_anchors.is_empty() {
        None
    } else {
        let dir = match &args.mine_dir {
            Some(d) => {
                let d = d.join(format!("n{n}"));
                std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
                d
            }
            None => crate::reference::temp_dir("mine")?,
        };
        npy_f32(&dir.join("vectors.npy"), &corpus.data.vectors)?;
        let labels: Vec<i64> = corpus.labels.iter().map(|&l| i64::from(l)).collect();
        npy_i64(&dir.join("labels.npy"), &[n], &labels)?;
        Some(dir)
    };

    let d = Daemon::start(&ctx.spec).await?;
    eprintln!("mine: loading {n} items into a fresh daemon");
    let ingest = d.ingest(&corpus.data, args.batch, args.writers).await?;
    eprintln!("mine: ingest {:.0} vectors/s", ingest.rate);
    let params = IndexParams::default();
    // Building the reference costs as much as the ingest: above --mine-usearch-max-n it
    // is left out (the exact miner still runs).
    let index = if n <= args.mine_usearch_max_n {
        let (index, add_rate, _) =
            crate::reference::usearch_add(&corpus.data.vectors, Metric::Cosine, params, threads)?;
        eprintln!("mine: usearch add {add_rate:.0} vectors/s");
        let checked = &anchors[..take.min(CHECKED)];
        let (_, _, found) = usearch_knn(&index, &corpus, checked, threads, true);
        check_reference(&found, &corpus, checked)?;
        Some(index)
    } else {
        eprintln!(
            "mine: no in-process usearch reference above N = {}",
            args.mine_usearch_max_n
        );
        None
    };
    if let Some(dir) = &dir {
        eprintln!("mine: agreement runs");
        agreement_inputs(&d, dir, exact_anchors).await?;
    }
    // A short pass of each strategy first, untimed: the daemon's pools start, its pages
    // come in, and its kNN settles on a path (plain or filtered).
    let warm = &ids[..ids.len().min(1000)];
    for strategy in [pb::Strategy::Hard, pb::Strategy::SemiHard] {
        mine(&d, request(strategy, warm, 1, 1), false, None).await?;
    }

    let (mut hard_rate, mut semi_rate, mut many_rate, mut per_anchor) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut uf, mut up, mut uf_cpu, mut up_cpu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut hard_cpu, mut semi_cpu) = (Vec::new(), Vec::new());
    let (mut hard_server, mut semi_server) = (Vec::new(), Vec::new());
    let mut last = None;
    for run in 0..runs {
        let hard = mine(&d, request(pb::Strategy::Hard, &ids, 1, 1), false, None).await?;
        let semi = mine(&d, request(pb::Strategy::SemiHard, &ids, 1, 1), false, None).await?;
        let many = mine(
            &d,
            request(pb::Strategy::SemiHard, &ids, MANY_POSITIVES, 1),
            false,
            None,
        )
        .await?;
        let (f, u) = match &index {
            Some(index) => {
                let (u, u_cpu, _) = usearch_knn(index, &corpus, &anchors, threads, false);
                let (f, f_cpu, _) = usearch_knn(index, &corpus, &anchors, threads, true);
                uf_cpu.push(f_cpu);
                up_cpu.push(u_cpu);
                uf.push(f);
                up.push(u);
                (f, u)
            }
            None => (f64::NAN, f64::NAN),
        };
        eprintln!(
            "mine N={n} run {}/{runs}: likeness HARD {:.0} anchors/s, SEMI_HARD {:.0} anchors/s (x{MANY_POSITIVES} positives: {:.0} anchors/s, {:.0} triplets/s); usearch plain kNN {u:.0}/s, filtered {f:.0}/s",
            run + 1,
            hard.rate(),
            semi.rate(),
            many.rate(),
            many.triplets as f64 / many.secs,
        );
        hard_rate.push(hard.rate());
        semi_rate.push(semi.rate());
        many_rate.push(many.rate());
        per_anchor.push(many.triplets as f64 / many.anchors.max(1) as f64);
        hard_cpu.push(hard.cpu.per(hard.anchors as usize));
        semi_cpu.push(semi.cpu.per(semi.anchors as usize));
        hard_server.push(hard.stats.anchors_per_second);
        semi_server.push(semi.stats.anchors_per_second);
        last = Some((hard, semi, many));
    }
    let (hard, semi, many) = last.ok_or("no runs")?;
    let exact = match &dir {
        Some(dir) => {
            eprintln!("mine: the exact miner on {} anchors", exact_anchors.len());
            Some(run_exact(ctx, dir, args.exact_runs.max(1))?)
        }
        None => None,
    };
    let (hr, sr, lk_many, uf, up) = (
        stat(hard_rate),
        stat(semi_rate),
        stat(many_rate),
        stat(uf),
        stat(up),
    );
    let per_anchor = stat(per_anchor).median;
    let med =
        |xs: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| stat(xs.iter().map(f).collect()).median;
    // CPU per anchor: likeness's is the daemon's and the client's together.
    let (hd, hc) = (med(&hard_cpu, |c| c.0), med(&hard_cpu, |c| c.1));
    let (sd, sc) = (med(&semi_cpu, |c| c.0), med(&semi_cpu, |c| c.1));
    let cpu = Cpu5 {
        hard: med(&hard_cpu, |c| c.0 + c.1),
        semi: med(&semi_cpu, |c| c.0 + c.1),
        plain: stat(up_cpu).median,
        filtered: stat(uf_cpu).median,
        exact: exact
            .as_ref()
            .map_or(f64::NAN, |e| stat(e.cpu_us_per_anchor.clone()).median),
    };
    let ex = exact.as_ref().map(|e| stat(e.anchors_per_second.clone()));
    let ex_many = exact
        .as_ref()
        .map(|e| stat(e.anchors_per_second_all_positives.clone()));

    println!(
        "### N = {n} ({} corpus, {} classes; {} anchors per run{}; k = {K}, ef = {}, {threads} threads for the references)\n",
        kind.name(),
        corpus.classes,
        anchors.len(),
        if exact_anchors.is_empty() {
            String::from(", the exact miner left out")
        } else {
            format!(", {} for the exact miner", exact_anchors.len())
        },
        params.expansion_search
    );
    println!(
        "| system | anchors/s | CPU µs per anchor | ÷ usearch plain, by rate | ÷ usearch plain, by CPU | ÷ usearch filtered, by rate | ÷ usearch filtered, by CPU |"
    );
    println!("|---|---|---|---|---|---|---|");
    let row = |what: String, rate: Stat, cpu_us: f64| {
        let c = |x: f64| {
            if x.is_nan() {
                "-".to_string()
            } else {
                format!("{x:.0}")
            }
        };
        let r = |x: f64| {
            if x.is_nan() {
                "-".to_string()
            } else {
                format!("{x:.2}")
            }
        };
        println!(
            "| {what} | {rate} | {} | {} | {} | {} | {} |",
            c(cpu_us),
            r(rate.median / up.median),
            r(by_cpu(cpu_us, cpu.plain)),
            r(rate.median / uf.median),
            r(by_cpu(cpu_us, cpu.filtered)),
        );
    };
    row(
        format!(
            "likeness MineTriplets over gRPC, HARD, 1 negative (daemon {hd:.0} µs + client {hc:.0} µs CPU per anchor; server-side {:.0}/s)",
            stat(hard_server).median
        ),
        hr,
        cpu.hard,
    );
    row(
        format!(
            "likeness MineTriplets over gRPC, SEMI_HARD, 1 positive, 1 negative (daemon {sd:.0} µs + client {sc:.0} µs; server-side {:.0}/s)",
            stat(semi_server).median
        ),
        sr,
        cpu.semi,
    );
    row(
        format!(
            "likeness SEMI_HARD, {MANY_POSITIVES} positives per anchor sharing one kNN ({per_anchor:.2} triplets per anchor, {:.0} triplets/s)",
            lk_many.median * per_anchor
        ),
        lk_many,
        f64::NAN,
    );
    row(
        format!("usearch in-process plain kNN (k = {K}), {threads} threads"),
        up,
        cpu.plain,
    );
    row(
        format!(
            "usearch in-process filtered kNN (k = {K}, anchor's label excluded), {threads} threads"
        ),
        uf,
        cpu.filtered,
    );
    if let (Some(ex), Some(ex_many)) = (ex, ex_many) {
        row(
            format!("exact miner (faiss IndexFlatIP, {threads} threads), 1 positive"),
            ex,
            cpu.exact,
        );
        row(
            format!("exact miner, {MANY_POSITIVES} positives"),
            ex_many,
            f64::NAN,
        );
    }
    println!();
    println!(
        "SEMI_HARD / HARD: {:.2} by rate, {:.2} by CPU (anchors per CPU-second). By CPU, a ratio is the row's anchors per CPU-second over the reference's (likeness: daemon + client).\n",
        sr.median / hr.median,
        by_cpu(cpu.semi, cpu.hard)
    );

    // Where the negatives came from, and which path the kNN took (the last run).
    let share = |x: u64, of: u64| format!("{x} ({:.1}%)", 100.0 * x as f64 / of.max(1) as f64);
    println!("| last run | HARD | SEMI_HARD | SEMI_HARD, {MANY_POSITIVES} positives |");
    println!("|---|---|---|---|");
    let cells =
        |f: &dyn Fn(&Mined) -> String| format!("{} | {} | {} |", f(&hard), f(&semi), f(&many));
    println!("| anchors | {}", cells(&|m| m.anchors.to_string()));
    println!(
        "| anchors without a triplet | {}",
        cells(&|m| share(m.stats.anchors_without_triplet, m.anchors))
    );
    println!(
        "| anchors with a non-fallback triplet (SEMI_HARD: inside the window) | {}",
        cells(&|m| share(m.in_window, m.anchors))
    );
    println!("| triplets | {}", cells(&|m| m.triplets.to_string()));
    for source in ["knn", "sample", "second_search"] {
        println!(
            "| negatives from `{source}` | {}",
            cells(&|m| share(m.source(source), m.triplets))
        );
    }
    let others: Vec<&String> = [&hard, &semi, &many]
        .iter()
        .flat_map(|m| m.stats.sources.keys())
        .filter(|k| !matches!(k.as_str(), "knn" | "sample" | "second_search"))
        .collect();
    if !others.is_empty() {
        println!(
            "| other sources | {}",
            cells(&|m| format!("{:?}", m.stats.sources))
        );
    }
    println!(
        "| fallbacks | {}",
        cells(&|m| {
            if m.stats.fallbacks.is_empty() {
                "none".into()
            } else {
                m.stats
                    .fallbacks
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        })
    );
    println!(
        "| kNN queries, plain / filtered walk (the daemon's counters) | {}",
        cells(&|m| m
            .knn
            .map_or("-".into(), |(p, f)| format!("{p:.0} / {f:.0}")))
    );
    println!(
        "| candidates examined per anchor | {}",
        cells(&|m| format!(
            "{:.1}",
            m.stats.candidates_examined as f64 / m.anchors.max(1) as f64
        ))
    );
    println!();
    let broken = semi.window_broken + many.window_broken;
    if broken > 0 {
        println!(
            "**Check failed:** {broken} SEMI_HARD triplets not flagged as fallbacks report a d_an outside (d_ap, d_ap + {MARGIN}).\n"
        );
    }

    if let Some(exact) = &exact {
        let pct = |x: Option<f64>| x.map_or("-".into(), |v| format!("{:.2}%", 100.0 * v));
        let fallbacks = semi
            .stats
            .fallbacks
            .get("semi_hard_beyond")
            .copied()
            .unwrap_or(0) as f64
            / semi.triplets.max(1) as f64;
        let second = many.source("second_search") as f64 / many.triplets.max(1) as f64;
        println!(
            "Agreement on {} triplets ({} anchors x {MANY_POSITIVES} positives), exact distances: condition precision {} ({} of likeness's triplets inside the window); same negative as the exact miner {}; window recall {} (exact found a window negative for {}); extra d_an over the exact pick, median {:.4}, p99 {:.4}; HARD top-{HARD_K} overlap with the exact nearest negatives {}. Fallbacks (no negative inside the window): likeness {:.1}%, exact {:.1}%; the exact miner searched {} whole rows (positive beyond its {K}-pool); {:.2}% of likeness's x{MANY_POSITIVES} negatives came from a second search.\n",
            exact.triplets_compared.unwrap_or(0),
            exact_anchors.len(),
            pct(exact.condition_precision),
            exact.likeness_in_window.unwrap_or(0),
            pct(exact.same_as_exact),
            pct(exact.window_recall),
            exact.exact_in_window.unwrap_or(0),
            exact.median_extra_distance.unwrap_or(f64::NAN),
            exact.p99_extra_distance.unwrap_or(f64::NAN),
            pct(exact.hard_overlap),
            100.0 * fallbacks,
            100.0 * exact.exact_fallback_share,
            exact.full_row_searches,
            100.0 * second,
        );
    }
    if args.mine_memory_n == n {
        memory(ctx, &d, &corpus).await?;
    }
    d.stop().await?;
    if let (Some(dir), None) = (&dir, &args.mine_dir) {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(SizeResult {
        n,
        hard: hr,
        semi: sr,
        likeness_many: lk_many,
        triplets_per_anchor_many: per_anchor,
        usearch_filtered: uf,
        usearch_plain: up,
        exact: ex,
        cpu,
        in_window: semi.in_window as f64 / semi.anchors.max(1) as f64,
    })
}

/// The N at which likeness and the exact miner cross (`ratio` of likeness over exact
/// goes through 1), interpolated on log N between the sizes that bracket it.
fn crossover(results: &[SizeResult], ratio: impl Fn(&SizeResult) -> f64) -> Option<f64> {
    for w in results.windows(2) {
        let (a, b) = (ratio(&w[0]).ln(), ratio(&w[1]).ln());
        if a <= 0.0 && b > 0.0 {
            let (la, lb) = ((w[0].n as f64).ln(), (w[1].n as f64).ln());
            return Some((la + (lb - la) * (-a) / (b - a)).exp());
        }
    }
    None
}

pub async fn run(ctx: &Ctx) -> Result<(), String> {
    let mut sizes = ctx.args.mine_n.clone();
    sizes.sort_unstable();
    sizes.dedup();
    println!(
        "## Mining (HARD and SEMI_HARD, margin {MARGIN}; {} corpus, {}-d, cosine, {} items per class; the daemon's search pool on all cores, in-process references and the exact miner on {} threads; {} runs per figure, median)\n",
        ctx.args.mine_corpus.name(),
        ctx.args.dim,
        ctx.args.mine_per_class,
        ctx.threads,
        ctx.runs
    );
    let mut results = Vec::new();
    for n in sizes {
        results.push(one_size(ctx, n).await?);
    }
    println!("### By N\n");
    println!(
        "| N | HARD anchors/s | SEMI_HARD anchors/s | SEMI_HARD / HARD | usearch plain kNN /s | usearch filtered kNN /s | by rate: HARD ÷ plain, SEMI_HARD ÷ plain, SEMI_HARD ÷ filtered | by CPU: HARD ÷ plain, SEMI_HARD ÷ plain, SEMI_HARD ÷ filtered | CPU µs/anchor: HARD, SEMI_HARD, plain, filtered | SEMI_HARD inside the window | x{MANY_POSITIVES} positives: triplets/s | exact anchors/s | SEMI_HARD ÷ exact: rate, CPU |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &results {
        let c = r.cpu;
        let (ex, ex_ratio) = match r.exact {
            Some(e) => (
                e.to_string(),
                format!(
                    "{:.2}, {:.2}",
                    r.semi.median / e.median,
                    by_cpu(c.semi, c.exact)
                ),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {} | {} | {} | {:.2} | {} | {} | {:.2}, {:.2}, {:.2} | {:.2}, {:.2}, {:.2} | {:.0}, {:.0}, {:.0}, {:.0} | {:.1}% | {:.0} | {ex} | {ex_ratio} |",
            r.n,
            r.hard,
            r.semi,
            r.semi.median / r.hard.median,
            r.usearch_plain,
            r.usearch_filtered,
            r.hard.median / r.usearch_plain.median,
            r.semi.median / r.usearch_plain.median,
            r.semi.median / r.usearch_filtered.median,
            by_cpu(c.hard, c.plain),
            by_cpu(c.semi, c.plain),
            by_cpu(c.semi, c.filtered),
            c.hard,
            c.semi,
            c.plain,
            c.filtered,
            100.0 * r.in_window,
            r.likeness_many.median * r.triplets_per_anchor_many,
        );
    }
    println!();
    if results.iter().all(|r| r.exact.is_some()) {
        let by_rate = |r: &SizeResult| r.semi.median / r.exact.map_or(f64::NAN, |e| e.median);
        let by_cpu = |r: &SizeResult| r.cpu.exact / r.cpu.semi;
        for (what, ratio) in [
            ("anchors/s", &by_rate as &dyn Fn(&SizeResult) -> f64),
            ("CPU per anchor", &by_cpu),
        ] {
            match crossover(&results, ratio) {
                Some(x) => println!(
                    "By {what}, likeness SEMI_HARD and the exact miner cross at N of about {x:.0} (below it, exact is faster)."
                ),
                None if results.iter().all(|r| ratio(r) > 1.0) => println!(
                    "By {what}, likeness SEMI_HARD is faster than the exact miner at every N measured."
                ),
                None => println!("By {what}, no crossing between the sizes measured."),
            }
        }
        println!();
    }
    Ok(())
}
