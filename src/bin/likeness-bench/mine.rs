//! The mine part: likeness.v1.Miner over gRPC against its two references, per corpus
//! size N (`--mine-n`, each a fresh daemon):
//!
//! - the limit: usearch's own kNN in this process on an index of the same vectors and
//!   parameters, for the same anchors with the same k and expansion, filtered the way
//!   the miner filters (a predicate that drops the anchor's label), on `--threads`
//!   threads; and unfiltered, for context;
//! - what a trainer would run instead: bench/exact_miner.py, an exact miner on faiss's
//!   IndexFlatIP (blocked matrix products on BLAS), on the same vectors, anchors and
//!   positives and as many threads; it also reports how likeness's choices agree with
//!   the exact ones (condition precision, same negative, HARD overlap);
//! - memory: the daemon's RSS while a deliberately slow reader drains a stream capped at
//!   `--mine-memory-triplets`.
//!
//! The corpus: labelled unit vectors, `--dim` wide, cosine, `--mine-per-class` items per
//! class. Classes come in families of ten whose centres share a parent direction, and
//! items scatter around their class centre, so that an anchor's nearest other-class
//! items lie at about the distance of its positives: semi-hard negatives exist for most
//! anchors, and some negatives are nearer than the positive (hard ones), as in a
//! half-trained embedding (a numpy check of this model at 100k: d_ap median 0.23, the
//! nearest negative's median 0.33, a window negative for 96% of anchors).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use likeness::pb;
use likeness::pb::miner_client::MinerClient;
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

/// A labelled corpus: row i is item `v{i}`, label `c{labels[i]}`.
struct Corpus {
    n: usize,
    classes: usize,
    data: Data,
    labels: Vec<u32>,
}

fn unit(v: &mut [f32]) {
    let n = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    v.iter_mut().for_each(|x| *x /= n);
}

/// A Gaussian vector whose expected norm is about `scale`.
fn gaussian(rng: &mut Rng, dim: usize, scale: f32) -> Vec<f32> {
    let s = scale / (dim as f32).sqrt();
    (0..dim).map(|_| s * rng.normal()).collect()
}

impl Corpus {
    fn new(n: usize, dim: usize, per_class: usize, seed: u64) -> Corpus {
        let mut rng = Rng::new(seed);
        let classes = (n / per_class.max(1)).max(2);
        let families: Vec<Vec<f32>> = (0..classes.div_ceil(FAMILY))
            .map(|_| gaussian(&mut rng, dim, 1.0))
            .collect();
        let centres: Vec<Vec<f32>> = (0..classes)
            .map(|c| {
                let off = gaussian(&mut rng, dim, CLASS_SPREAD);
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
            let off = gaussian(&mut rng, dim, ITEM_SPREAD);
            let mut v: Vec<f32> = centres[c].iter().zip(off).map(|(a, b)| a + b).collect();
            unit(&mut v);
            vectors.push(v);
            labels.push(c as u32);
        }
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
        let data = Data {
            describe: format!(
                "{n} x {dim} labelled unit vectors, {classes} classes in families of {FAMILY}, cosine"
            ),
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
    /// Kept only when asked.
    kept: Vec<pb::Triplet>,
    stats: pb::MineStats,
    cpu: crate::procfs::Cpu,
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
    let mut client = miner(d).await?;
    let cpu = Meter::start(d.pid());
    let start = Instant::now();
    let mut stream = client
        .mine_triplets(req)
        .await
        .map_err(status)?
        .into_inner();
    let (mut triplets, mut kept, mut stats) = (0u64, Vec::new(), None);
    while let Some(msg) = stream.next().await {
        let msg = msg.map_err(status)?;
        triplets += msg.triplets.len() as u64;
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
    let stats = stats.ok_or("the stream ended without its last message")?;
    Ok(Mined {
        secs,
        anchors: stats.anchors,
        triplets,
        kept,
        stats,
        cpu: cpu.stop(),
    })
}

// The in-process references.

/// usearch's kNN for every anchor row on `threads` threads: the k nearest of another
/// label (a predicate over a label array, the cheapest filter there is), or with
/// `filtered` false the plain k + 1 nearest. Returns anchors/s, this process's CPU µs
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
                        index.search(&vectors[a][..], K + 1)
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
    likeness: Stat,
    likeness_many: Stat,
    triplets_per_anchor_many: f64,
    usearch_filtered: Stat,
    usearch_plain: Stat,
    exact: Stat,
    /// CPU µs per anchor: likeness (daemon + client), usearch filtered, exact.
    cpu: (f64, f64, f64),
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

/// One corpus size: a fresh daemon, the references, the figures.
async fn one_size(ctx: &Ctx, n: usize) -> Result<SizeResult, String> {
    let args = &ctx.args;
    let runs = ctx.runs;
    let threads = ctx.threads;
    eprintln!("mine: generating {n} labelled vectors");
    let corpus = Corpus::new(n, args.dim, args.mine_per_class, 7);
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
        let (_, _, found) = usearch_knn(&index, &corpus, exact_anchors, threads, true);
        check_reference(&found, &corpus, exact_anchors)?;
        Some(index)
    } else {
        eprintln!(
            "mine: no in-process usearch reference above N = {}",
            args.mine_usearch_max_n
        );
        None
    };
    eprintln!("mine: agreement runs");
    agreement_inputs(&d, &dir, exact_anchors).await?;

    let (mut lk, mut lk_many, mut per_anchor, mut uf, mut up) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut cpu = Vec::new();
    let (mut uf_cpu, mut up_cpu) = (Vec::new(), Vec::new());
    let mut server_rates = Vec::new();
    let mut fallbacks = 0.0;
    let mut second = 0.0;
    for run in 0..runs {
        let one = mine(&d, request(pb::Strategy::SemiHard, &ids, 1, 1), false, None).await?;
        let many = mine(
            &d,
            request(pb::Strategy::SemiHard, &ids, MANY_POSITIVES, 1),
            false,
            None,
        )
        .await?;
        let (f, u) = match &index {
            Some(index) => {
                let (f, f_cpu, _) = usearch_knn(index, &corpus, &anchors, threads, true);
                let (u, u_cpu, _) = usearch_knn(index, &corpus, &anchors, threads, false);
                uf_cpu.push(f_cpu);
                up_cpu.push(u_cpu);
                uf.push(f);
                up.push(u);
                (f, u)
            }
            None => (f64::NAN, f64::NAN),
        };
        let rate = one.anchors as f64 / one.secs;
        eprintln!(
            "mine N={n} run {}/{runs}: likeness {:.0} anchors/s (x{MANY_POSITIVES} positives: {:.0} anchors/s, {:.0} triplets/s), usearch filtered kNN {:.0}/s, plain {:.0}/s",
            run + 1,
            rate,
            many.anchors as f64 / many.secs,
            many.triplets as f64 / many.secs,
            f,
            u
        );
        lk.push(rate);
        lk_many.push(many.anchors as f64 / many.secs);
        per_anchor.push(many.triplets as f64 / many.anchors.max(1) as f64);
        cpu.push(one.cpu.per(one.anchors as usize));
        server_rates.push(one.stats.anchors_per_second);
        fallbacks = one
            .stats
            .fallbacks
            .get("semi_hard_beyond")
            .copied()
            .unwrap_or(0) as f64
            / one.triplets.max(1) as f64;
        second = many
            .stats
            .fallbacks
            .get("second_search")
            .copied()
            .unwrap_or(0) as f64
            / many.triplets.max(1) as f64;
    }
    eprintln!("mine: the exact miner on {} anchors", exact_anchors.len());
    let exact = run_exact(ctx, &dir, args.exact_runs.max(1))?;
    let (lk, lk_many, uf, up) = (stat(lk), stat(lk_many), stat(uf), stat(up));
    let ex = stat(exact.anchors_per_second.clone());
    let ex_many = stat(exact.anchors_per_second_all_positives.clone());
    let per_anchor = stat(per_anchor).median;
    let (dc, cc) = (
        stat(cpu.iter().map(|c| c.0).collect()).median,
        stat(cpu.iter().map(|c| c.1).collect()).median,
    );
    // CPU per anchor: likeness's is the daemon's and the client's together.
    let lk_cpu = stat(cpu.iter().map(|c| c.0 + c.1).collect()).median;
    let uf_cpu = stat(uf_cpu).median;
    let up_cpu = stat(up_cpu).median;
    let ex_cpu = stat(exact.cpu_us_per_anchor.clone()).median;

    println!(
        "### N = {n} ({} classes; {} anchors per run, {} for the exact miner; k = {K}, ef = {})\n",
        corpus.classes,
        anchors.len(),
        exact_anchors.len(),
        params.expansion_search
    );
    println!("| system | anchors/s | likeness / it | CPU µs per anchor | likeness / it, by CPU |");
    println!("|---|---|---|---|---|");
    println!(
        "| likeness MineTriplets over gRPC, SEMI_HARD, 1 positive, 1 negative (daemon {dc:.0} µs + client {cc:.0} µs CPU per anchor; server-side {:.0}/s) | {lk} | 1.00 | {lk_cpu:.0} | 1.00 |",
        stat(server_rates).median
    );
    println!(
        "| likeness, {MANY_POSITIVES} positives per anchor sharing one kNN ({per_anchor:.2} triplets per anchor, {:.0} triplets/s) | {lk_many} | - | - | - |",
        lk_many.median * per_anchor,
    );
    println!(
        "| usearch in-process filtered kNN (anchor's label excluded), {threads} threads | {uf} | {:.2} | {uf_cpu:.0} | {:.2} |",
        lk.median / uf.median,
        uf_cpu / lk_cpu
    );
    println!(
        "| usearch in-process plain kNN (k + 1), {threads} threads | {up} | {:.2} | {up_cpu:.0} | {:.2} |",
        lk.median / up.median,
        up_cpu / lk_cpu
    );
    println!(
        "| exact miner (faiss IndexFlatIP, {threads} threads), 1 positive | {ex} | {:.2} | {ex_cpu:.0} | {:.2} |",
        lk.median / ex.median,
        ex_cpu / lk_cpu
    );
    println!(
        "| exact miner, {MANY_POSITIVES} positives (likeness x{MANY_POSITIVES} / it) | {ex_many} | {:.2} | - | - |",
        lk_many.median / ex_many.median
    );
    println!();
    let pct = |x: Option<f64>| x.map_or("-".into(), |v| format!("{:.2}%", 100.0 * v));
    println!(
        "Agreement on {} triplets ({} anchors x {MANY_POSITIVES} positives), exact distances: condition precision {} ({} of likeness's triplets inside the window); same negative as the exact miner {}; window recall {} (exact found a window negative for {}); extra d_an over the exact pick, median {:.4}, p99 {:.4}; HARD top-{HARD_K} overlap with the exact nearest negatives {}. Fallbacks (no negative inside the window): likeness {:.1}%, exact {:.1}%; the exact miner searched {} whole rows (positive beyond its {K}-pool); likeness ran a second kNN for {:.2}% of its x{MANY_POSITIVES} triplets.\n",
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
    if args.mine_memory_n == n {
        memory(ctx, &d, &corpus).await?;
    }
    d.stop().await?;
    if args.mine_dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(SizeResult {
        n,
        likeness: lk,
        likeness_many: lk_many,
        triplets_per_anchor_many: per_anchor,
        usearch_filtered: uf,
        usearch_plain: up,
        exact: ex,
        cpu: (lk_cpu, uf_cpu, ex_cpu),
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
        "## Mining (SEMI_HARD, margin {MARGIN}, {}-d, cosine, {} items per class; the daemon's search pool on all cores, in-process references and the exact miner on {} threads; {} runs per figure, median)\n",
        ctx.args.dim, ctx.args.mine_per_class, ctx.threads, ctx.runs
    );
    let mut results = Vec::new();
    for n in sizes {
        results.push(one_size(ctx, n).await?);
    }
    println!("### Against the exact miner, by N\n");
    println!(
        "| N | likeness anchors/s | x{MANY_POSITIVES} positives: triplets/s | usearch filtered kNN /s | usearch plain kNN /s | likeness / usearch filtered | exact anchors/s | likeness / exact | CPU µs/anchor: likeness, usearch filtered, exact | by CPU: likeness / usearch filtered, likeness / exact |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &results {
        let (lc, uc, ec) = r.cpu;
        println!(
            "| {} | {} | {:.0} | {} | {} | {:.2} | {} | {:.2} | {lc:.0}, {uc:.0}, {ec:.0} | {:.2}, {:.2} |",
            r.n,
            r.likeness,
            r.likeness_many.median * r.triplets_per_anchor_many,
            r.usearch_filtered,
            r.usearch_plain,
            r.likeness.median / r.usearch_filtered.median,
            r.exact,
            r.likeness.median / r.exact.median,
            uc / lc,
            ec / lc
        );
    }
    println!();
    let by_rate = |r: &SizeResult| r.likeness.median / r.exact.median;
    let by_cpu = |r: &SizeResult| r.cpu.2 / r.cpu.0;
    for (what, ratio) in [
        ("anchors/s", &by_rate as &dyn Fn(&SizeResult) -> f64),
        ("CPU per anchor", &by_cpu),
    ] {
        match crossover(&results, ratio) {
            Some(x) => println!(
                "By {what}, likeness and the exact miner cross at N of about {x:.0} (below it, exact is faster)."
            ),
            None if results.iter().all(|r| ratio(r) > 1.0) => {
                println!("By {what}, likeness is faster than the exact miner at every N measured.")
            }
            None => println!("By {what}, no crossing between the sizes measured."),
        }
    }
    println!();
    Ok(())
}
