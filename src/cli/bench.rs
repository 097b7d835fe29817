//! `likeness bench`: the daemon measured beside its references, in one run, on one
//! machine, on the same data (../shared/BENCHMARKS.md):
//! - durable upserts/s over gRPC vs raw sled insert + flush, and vs usearch's own
//!   in-process add rate (HNSW insertion is the real ceiling);
//! - search QPS over gRPC (k = 10, many concurrent clients) vs usearch in-process on an
//!   index built from the same vectors with the same parameters, recall@10 for both
//!   against exact search.
//!
//! The daemon runs in this process on its own runtime, exactly as `likeness serve` runs
//! it, and is reached over loopback TCP.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use usearch::ffi::{IndexOptions, MetricKind, ScalarKind};

use crate::config::Config;
use crate::pb;
use crate::pb::items_client::ItemsClient;
use crate::store::codec;
use crate::synth;
use crate::types::{IndexParams, ItemData};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Vectors in the collection.
    #[arg(long, default_value_t = 100_000)]
    pub n: usize,
    /// Dimension.
    #[arg(long, default_value_t = 128)]
    pub dim: usize,
    /// Items per Upsert.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Concurrent upsert clients.
    #[arg(long, default_value_t = 4)]
    pub writers: usize,
    /// Concurrent search clients.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Searches per QPS run.
    #[arg(long, default_value_t = 20_000)]
    pub queries: usize,
    /// Queries whose recall@10 is checked against exact search.
    #[arg(long, default_value_t = 500)]
    pub recall_queries: usize,
    /// Runs per figure; the median is reported.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Threads for in-process references and the daemon's index inserts (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Let the daemon's ONNX Runtime threads spin (its --embed-spin).
    #[arg(long)]
    pub embed_spin: bool,
    /// The daemon's ONNX Runtime intra-op threads (its --embed-threads; 0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub embed_threads: usize,
    /// Only run these parts (ingest, search, embed); default all.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

/// Median, min and max of a set of runs.
#[derive(Debug, Clone, Copy)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

fn stat(mut xs: Vec<f64>) -> Stat {
    xs.sort_by(f64::total_cmp);
    Stat {
        median: xs[xs.len() / 2],
        min: xs[0],
        max: xs[xs.len() - 1],
    }
}

impl std::fmt::Display for Stat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.max > self.min * 1.1 {
            write!(
                f,
                "{:.0} (min {:.0}, max {:.0})",
                self.median, self.min, self.max
            )
        } else {
            write!(f, "{:.0}", self.median)
        }
    }
}

pub async fn run(args: BenchArgs) -> Result<(), String> {
    let threads = if args.threads > 0 {
        args.threads
    } else {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    };
    let runs = args.runs.max(1);
    let want = |part: &str| args.only.is_empty() || args.only.iter().any(|p| p == part);
    println!("# likeness bench\n");
    println!("{}", machine());
    println!(
        "data: {} x {} clustered f32 vectors (1,000 clusters), {} runs per figure, median; threads: {threads} for in-process references and index inserts; client and daemon share the machine\n",
        args.n, args.dim, runs
    );
    let (vectors, clusters) =
        synth::clustered(args.n + args.recall_queries, args.dim, 1000, 0.25, 7);
    let (data, queries) = vectors.split_at(args.n);
    let items: Vec<pb::Item> = data
        .iter()
        .enumerate()
        .map(|(i, v)| pb::Item {
            id: format!("v{i}"),
            label: format!("c{}", clusters[i]),
            metadata: Default::default(),
            vector: v.clone(),
            input: None,
        })
        .collect();
    let items = Arc::new(items);
    let params = IndexParams::default();

    let mut daemon: Option<Daemon> = None;
    if want("ingest") {
        let mut sled_rates = Vec::new();
        let mut usearch_rates = Vec::new();
        let mut daemon_rates = Vec::new();
        for run in 0..runs {
            sled_rates.push(raw_sled(&items, args.batch)?);
            usearch_rates.push(usearch_add(data, args.dim, params, threads)?.1);
            if let Some(d) = daemon.take() {
                d.stop().await?;
            }
            let d = Daemon::start(threads, &args).await?;
            daemon_rates.push(d.ingest(&items, args.dim, args.batch, args.writers).await?);
            daemon = Some(d);
            eprintln!(
                "ingest run {}/{runs}: sled {:.0}/s, usearch {:.0}/s, likeness {:.0}/s",
                run + 1,
                sled_rates[run],
                usearch_rates[run],
                daemon_rates[run]
            );
        }
        let (s, u, d) = (stat(sled_rates), stat(usearch_rates), stat(daemon_rates));
        println!(
            "## Durable ingest ({}-d, batches of {}, {} concurrent writers, acknowledged after flush)\n",
            args.dim, args.batch, args.writers
        );
        println!("| system | vectors/s | likeness / it |");
        println!("|---|---|---|");
        println!("| likeness over gRPC (sled + usearch, durable) | {d} | 1.00 |");
        println!(
            "| raw sled insert + flush per batch (1 writer) | {s} | {:.2} |",
            d.median / s.median
        );
        println!(
            "| usearch in-process add ({threads} threads) | {u} | {:.2} |",
            d.median / u.median
        );
        println!();
    }

    if want("search") {
        let d = match daemon.take() {
            Some(d) => d,
            None => {
                let d = Daemon::start(threads, &args).await?;
                d.ingest(&items, args.dim, args.batch, args.writers).await?;
                d
            }
        };
        eprintln!("computing exact neighbours of {} queries", queries.len());
        let truth = exact_knn(data, queries, 10, threads);
        let (index, _) = usearch_add(data, args.dim, params, threads)?;
        let inproc_recall = recall(&truth, |q| {
            index
                .search(&queries[q][..], 10)
                .map(|m| m.keys.iter().map(|k| *k as usize).collect())
                .unwrap_or_default()
        });
        let grpc_recall = d.recall(queries, &truth).await?;
        // The same engine without gRPC: a Db in this process, loaded with the same items.
        let core = core_db(&items, args.dim, threads)?;
        let mut inproc = Vec::new();
        let mut grpc = Vec::new();
        let mut batched = Vec::new();
        let mut core_rates = Vec::new();
        let mut floor = Vec::new();
        let mut lat = Vec::new();
        for run in 0..runs {
            inproc.push(usearch_qps(&index, queries, args.queries, threads));
            core_rates.push(core_qps(&core.0, queries, args.queries, threads));
            let (qps, p50, p99) = d
                .search_qps(queries, args.queries, args.clients, Rpc::Search)
                .await?;
            grpc.push(qps);
            lat.push((p50, p99));
            let (bq, _, _) = d
                .search_qps(queries, args.queries, args.clients, Rpc::SearchBatch)
                .await?;
            batched.push(bq);
            let (fq, _, _) = d
                .search_qps(queries, args.queries, args.clients, Rpc::Trivial)
                .await?;
            floor.push(fq);
            eprintln!(
                "search run {}/{runs}: usearch {:.0} QPS, likeness Search {qps:.0} QPS (p50 {:.2} ms, p99 {:.2} ms), SearchBatch {bq:.0} QPS, GetCollection {fq:.0}/s",
                run + 1,
                inproc[run],
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3
            );
        }
        let (u, g, b, f) = (stat(inproc), stat(grpc), stat(batched), stat(floor));
        let c = stat(core_rates);
        lat.sort();
        let (p50, p99) = lat[lat.len() / 2];
        println!(
            "## Search (k = 10, {} x {}-d, ef = {})\n",
            args.n, args.dim, params.expansion_search
        );
        println!("| system | QPS | recall@10 | likeness / it |");
        println!("|---|---|---|---|");
        println!(
            "| likeness over gRPC ({} concurrent clients; p50 {:.2} ms, p99 {:.2} ms) | {g} | {grpc_recall:.4} | 1.00 |",
            args.clients,
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
        println!(
            "| usearch in-process, same vectors and parameters ({threads} threads) | {u} | {inproc_recall:.4} | {:.2} |",
            g.median / u.median
        );
        println!(
            "| likeness SearchBatch, {BATCH_QUERIES} queries per call, {} clients | {b} | same index | {:.2} (SearchBatch / usearch) |",
            args.clients,
            b.median / u.median
        );
        println!(
            "| likeness engine in-process, no gRPC (Db::search, {threads} threads) | {c} | same index | {:.2} (engine / usearch) |",
            c.median / u.median
        );
        println!(
            "| gRPC floor: GetCollection (no search), {} clients | {f} calls/s | - | - |",
            args.clients
        );
        println!();
        drop(core.0);
        let _ = std::fs::remove_dir_all(&core.1);
        daemon = Some(d);
    }
    if want("embed") {
        let d = match daemon.take() {
            Some(d) => d,
            None => Daemon::start(threads, &args).await?,
        };
        embed_bench(&d, threads, runs).await?;
        daemon = Some(d);
    }
    if let Some(d) = daemon {
        d.stop().await?;
    }
    Ok(())
}

/// Images embedded per run of each embedding figure.
const EMBED_IMAGES: usize = 4096;

/// Embedding throughput: the shipped model in-process (ONNX Runtime alone, on tensors
/// already preprocessed) against the daemon over gRPC (PNG images in), at several batch
/// sizes, and 64 concurrent single-image clients.
async fn embed_bench(d: &Daemon, threads: usize, runs: usize) -> Result<(), String> {
    use crate::embed::{Device, image, manifest::Manifest, runtime};
    let (_, manifest_path) = crate::embed::default_model();
    let manifest = Manifest::load(&manifest_path).map_err(|e| e.to_string())?;
    let tower = manifest.towers[0].clone();
    let spec = tower
        .image
        .clone()
        .ok_or("the default model takes images")?;
    let pngs = super::load::npy_images_as_png(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/fmnist/enrol_images.npy"),
    )?;
    let tensors: Vec<Vec<f32>> = pngs
        .iter()
        .map(|p| image::preprocess(p, &spec).map(|(v, _, _)| v))
        .collect::<Result<_, _>>()?;
    let check = runtime::GraphCheck {
        inputs: vec![(tower.input.as_str(), tower.input_spec().dims())],
        output: &tower.output,
        width: i64::from(tower.dimension),
        score: false,
    };
    let (mut session, provider) = runtime::open_session(
        &manifest.dir.join(&tower.file),
        &check,
        Device::Cpu,
        threads,
        true, // ONNX Runtime's default
    )
    .map_err(|e| e.to_string())?;
    let per = tensors[0].len();
    let png_inputs: Vec<pb::Input> = pngs
        .iter()
        .map(|p| pb::Input {
            kind: Some(pb::input::Kind::Image(p.clone())),
            tower: String::new(),
        })
        .collect();
    let tensor_inputs: Vec<pb::Input> = tensors
        .iter()
        .map(|t| pb::Input {
            kind: Some(pb::input::Kind::Tensor(pb::Tensor {
                shape: vec![spec.channels, spec.height, spec.width],
                values: t.clone(),
            })),
            tower: String::new(),
        })
        .collect();
    let mut grpc_best = (0usize, 0f64);
    let mut inproc_best = (0usize, 0f64);
    println!(
        "## Embedding ({} on {provider}, {threads} intra-op threads in-process; the daemon runs one session per tower with the same threads)\n",
        manifest.name
    );
    println!(
        "| batch | in-process ONNX Runtime, images/s | likeness Embed over gRPC (PNG in), images/s | likeness / in-process |"
    );
    println!("|---|---|---|---|");
    for batch in [1usize, 8, 32, 64, 128] {
        let mut ort_rates = Vec::new();
        let mut grpc_rates = Vec::new();
        for _ in 0..runs {
            let start = Instant::now();
            let mut done = 0;
            while done < EMBED_IMAGES {
                let n = batch.min(EMBED_IMAGES - done);
                let mut data = Vec::with_capacity(n * per);
                for i in 0..n {
                    data.extend_from_slice(&tensors[(done + i) % tensors.len()]);
                }
                let shape = vec![
                    n as i64,
                    i64::from(spec.channels),
                    i64::from(spec.height),
                    i64::from(spec.width),
                ];
                let t = ort::value::Tensor::from_array((shape, data)).map_err(|e| e.to_string())?;
                let out = session
                    .run(ort::inputs![tower.input.as_str() => t])
                    .map_err(|e| e.to_string())?;
                let _ = out[tower.output.as_str()]
                    .try_extract_tensor::<f32>()
                    .map_err(|e| e.to_string())?;
                done += n;
            }
            ort_rates.push(EMBED_IMAGES as f64 / start.elapsed().as_secs_f64());
            // Two clients keep the daemon's pipeline full at this batch size.
            grpc_rates.push(d.embed_rate(&png_inputs, batch, 2).await?.0);
        }
        let (o, g) = (stat(ort_rates), stat(grpc_rates));
        if o.median > inproc_best.1 {
            inproc_best = (batch, o.median);
        }
        if g.median > grpc_best.1 {
            grpc_best = (batch, g.median);
        }
        println!("| {batch} | {o} | {g} | {:.2} |", g.median / o.median);
    }
    let mut single = Vec::new();
    let mut lat = Vec::new();
    for _ in 0..runs {
        let (rate, p50, p99) = d.embed_rate(&png_inputs, 1, 64).await?;
        single.push(rate);
        lat.push((p50, p99));
    }
    lat.sort();
    let (p50, p99) = lat[lat.len() / 2];
    let s1 = stat(single);
    // The same best batch with preprocessed tensors instead of PNGs: what decoding costs.
    let mut raw = Vec::new();
    for _ in 0..runs {
        raw.push(d.embed_rate(&tensor_inputs, grpc_best.0, 2).await?.0);
    }
    let raw = stat(raw);
    println!(
        "\nBatch {}, preprocessed tensors instead of PNGs over gRPC: {raw} images/s, {:.2}x the best in-process batch (PNGs: {:.2}x)",
        grpc_best.0,
        raw.median / inproc_best.1,
        grpc_best.1 / inproc_best.1
    );
    println!();
    println!(
        "64 concurrent clients, one image per request: {s1} images/s (p50 {:.2} ms, p99 {:.2} ms), {:.2}x the best in-process batch ({} at batch {})\n",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        s1.median / inproc_best.1,
        inproc_best.1 as u64,
        inproc_best.0
    );
    Ok(())
}

/// A Db in this process holding `items` (the engine without gRPC), and its temp dir.
fn core_db(
    items: &[pb::Item],
    dim: usize,
    threads: usize,
) -> Result<(crate::db::Db, std::path::PathBuf), String> {
    let dir = tempfile_dir("core")?;
    let mut config = Config::with_data_dir(&dir);
    config.index_threads = threads;
    let db = crate::db::Db::open(&config).map_err(|e| e.to_string())?;
    db.recover().map_err(|e| e.to_string())?;
    db.create_collection(crate::db::CreateCollection {
        name: "bench".into(),
        dimension: dim as u32,
        ..Default::default()
    })
    .map_err(|e| e.to_string())?;
    for chunk in items.chunks(1000) {
        let batch = chunk
            .iter()
            .map(|it| ItemData {
                id: it.id.clone(),
                label: it.label.clone(),
                metadata: Default::default(),
                vector: it.vector.clone(),
                input: None,
            })
            .collect();
        db.upsert("bench", batch).map_err(|e| e.to_string())?;
    }
    Ok((db, dir))
}

/// Db::search from `threads` threads.
fn core_qps(db: &crate::db::Db, queries: &[Vec<f32>], total: usize, threads: usize) -> f64 {
    let params = crate::types::SearchParams {
        k: 10,
        ..Default::default()
    };
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let params = &params;
            s.spawn(move || {
                let mut i = t;
                while i < total {
                    let q = crate::types::QueryTarget::Vector(queries[i % queries.len()].clone());
                    let _ = db.search("bench", &q, params);
                    i += threads;
                }
            });
        }
    });
    total as f64 / start.elapsed().as_secs_f64()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or("?".into(), |kb| {
            format!("{:.1} GiB", kb as f64 / (1u64 << 20) as f64)
        });
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("machine: {cores} cores, {cpu}, {mem} RAM")
}

/// Raw sled: the same records likeness writes, one batch + flush per `batch` items.
fn raw_sled(items: &[pb::Item], batch: usize) -> Result<f64, String> {
    let dir = tempfile_dir("sled")?;
    let db = sled::Config::new()
        .path(&dir)
        .open()
        .map_err(|e| e.to_string())?;
    let tree = db.open_tree("items").map_err(|e| e.to_string())?;
    let start = Instant::now();
    for (b, chunk) in items.chunks(batch).enumerate() {
        let mut wb = sled::Batch::default();
        for (i, it) in chunk.iter().enumerate() {
            let data = ItemData {
                id: it.id.clone(),
                label: it.label.clone(),
                metadata: Default::default(),
                vector: it.vector.clone(),
                input: None,
            };
            wb.insert(
                it.id.as_bytes(),
                codec::encode_item((b * batch + i) as u64, &data),
            );
        }
        tree.apply_batch(wb).map_err(|e| e.to_string())?;
        db.flush().map_err(|e| e.to_string())?;
    }
    let rate = items.len() as f64 / start.elapsed().as_secs_f64();
    drop(tree);
    drop(db);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rate)
}

fn index_options(dim: usize, p: IndexParams) -> IndexOptions {
    IndexOptions {
        dimensions: dim,
        metric: MetricKind::Cos,
        quantization: ScalarKind::F32,
        connectivity: p.connectivity as usize,
        expansion_add: p.expansion_add as usize,
        expansion_search: p.expansion_search as usize,
        multi: false,
    }
}

/// usearch's own add rate on `threads` threads: the index and vectors/s.
fn usearch_add(
    data: &[Vec<f32>],
    dim: usize,
    p: IndexParams,
    threads: usize,
) -> Result<(usearch::Index, f64), String> {
    let index = usearch::Index::new(&index_options(dim, p)).map_err(|e| e.to_string())?;
    index
        .reserve_capacity_and_threads(data.len(), threads)
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    let chunk = data.len().div_ceil(threads);
    std::thread::scope(|s| {
        for (t, part) in data.chunks(chunk).enumerate() {
            let index = &index;
            s.spawn(move || {
                for (i, v) in part.iter().enumerate() {
                    index.add((t * chunk + i) as u64, v).expect("add");
                }
            });
        }
    });
    let rate = data.len() as f64 / start.elapsed().as_secs_f64();
    Ok((index, rate))
}

/// Single-query searches from `threads` threads, round-robin over `queries`.
fn usearch_qps(index: &usearch::Index, queries: &[Vec<f32>], total: usize, threads: usize) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let mut i = t;
                while i < total {
                    let _ = index.search(&queries[i % queries.len()][..], 10);
                    i += threads;
                }
            });
        }
    });
    total as f64 / start.elapsed().as_secs_f64()
}

/// Exact cosine k-NN by brute force.
fn exact_knn(data: &[Vec<f32>], queries: &[Vec<f32>], k: usize, threads: usize) -> Vec<Vec<usize>> {
    let norms: Vec<f32> = data
        .iter()
        .map(|v| v.iter().map(|x| x * x).sum::<f32>().sqrt())
        .collect();
    let mut out = vec![Vec::new(); queries.len()];
    let chunk = queries.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (qs, outs) in queries.chunks(chunk).zip(out.chunks_mut(chunk)) {
            let norms = &norms;
            s.spawn(move || {
                for (q, o) in qs.iter().zip(outs) {
                    let qn = q.iter().map(|x| x * x).sum::<f32>().sqrt();
                    let mut d: Vec<(f32, usize)> = data
                        .iter()
                        .enumerate()
                        .map(|(i, v)| {
                            let dot: f32 = q.iter().zip(v).map(|(a, b)| a * b).sum();
                            (1.0 - dot / (qn * norms[i]), i)
                        })
                        .collect();
                    d.select_nth_unstable_by(k, |a, b| a.0.total_cmp(&b.0));
                    *o = d[..k].iter().map(|(_, i)| *i).collect();
                }
            });
        }
    });
    out
}

fn recall(truth: &[Vec<usize>], mut found: impl FnMut(usize) -> Vec<usize>) -> f64 {
    let mut hit = 0;
    for (q, t) in truth.iter().enumerate() {
        let t: HashSet<usize> = t.iter().copied().collect();
        hit += found(q).iter().filter(|i| t.contains(i)).count();
    }
    hit as f64 / (truth.len() * 10) as f64
}

fn tempfile_dir(tag: &str) -> Result<std::path::PathBuf, String> {
    let dir = std::env::temp_dir().join(format!(
        "likeness-bench-{tag}-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
            ^ synth::Rng::new(std::process::id() as u64).next_u64() as u128
    ));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    Ok(dir)
}

/// The daemon on its own runtime (2 workers, as `likeness serve` on this machine), on a
/// temp data dir, reached over loopback.
struct Daemon {
    url: String,
    dir: std::path::PathBuf,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<Result<(), String>>,
}

impl Daemon {
    async fn start(threads: usize, args: &BenchArgs) -> Result<Daemon, String> {
        let dir = tempfile_dir("daemon")?;
        let mut config = Config::with_data_dir(&dir);
        config.index_threads = threads;
        config.batch.spin = args.embed_spin;
        if args.embed_threads > 0 {
            config.batch.threads = args.embed_threads;
        }
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| e.to_string())?;
        let url = format!(
            "http://{}",
            std_listener.local_addr().map_err(|e| e.to_string())?
        );
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(std_listener).map_err(|e| e.to_string())?;
                crate::serve(listener, config, async {
                    let _ = rx.await;
                })
                .await
                .map_err(|e| e.to_string())
            })
        });
        // Wait until it answers.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(ch) = super::connect(&url).await {
                let mut c = pb::collections_client::CollectionsClient::new(ch);
                if c.list_collections(pb::ListCollectionsRequest {})
                    .await
                    .is_ok()
                {
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err("daemon did not start".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Daemon {
            url,
            dir,
            stop,
            thread,
        })
    }

    async fn client(&self) -> Result<ItemsClient<Channel>, String> {
        Ok(super::items_client(super::connect(&self.url).await?))
    }

    /// Creates the collection and upserts every item; returns acknowledged vectors/s.
    async fn ingest(
        &self,
        items: &Arc<Vec<pb::Item>>,
        dim: usize,
        batch: usize,
        writers: usize,
    ) -> Result<f64, String> {
        let mut c =
            pb::collections_client::CollectionsClient::new(super::connect(&self.url).await?);
        c.create_collection(pb::CreateCollectionRequest {
            name: "bench".into(),
            dimension: dim as u32,
            metric: pb::Metric::Cosine as i32,
            ..Default::default()
        })
        .await
        .map_err(super::status)?;
        let batches: Vec<Vec<pb::Item>> = items.chunks(batch).map(|c| c.to_vec()).collect();
        let batches = Arc::new(std::sync::Mutex::new(batches.into_iter()));
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..writers.max(1) {
            let mut client = self.client().await?;
            let batches = batches.clone();
            tasks.spawn(async move {
                loop {
                    let next = batches.lock().expect("batches").next();
                    let Some(items) = next else {
                        return Ok::<(), String>(());
                    };
                    client
                        .upsert(pb::UpsertRequest {
                            collection: "bench".into(),
                            items,
                        })
                        .await
                        .map_err(super::status)?;
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.map_err(|e| e.to_string())??;
        }
        Ok(items.len() as f64 / start.elapsed().as_secs_f64())
    }

    async fn recall(&self, queries: &[Vec<f32>], truth: &[Vec<usize>]) -> Result<f64, String> {
        let mut client = self.client().await?;
        let mut found = Vec::with_capacity(queries.len());
        for q in queries {
            let hits = client
                .search(search_request(q.clone()))
                .await
                .map_err(super::status)?
                .into_inner()
                .hits;
            found.push(
                hits.iter()
                    .filter_map(|h| h.id[1..].parse::<usize>().ok())
                    .collect::<Vec<_>>(),
            );
        }
        Ok(recall(truth, |q| found[q].clone()))
    }

    /// `total` queries from `clients` concurrent clients: (queries/s, p50, p99 per call).
    async fn search_qps(
        &self,
        queries: &[Vec<f32>],
        total: usize,
        clients: usize,
        rpc: Rpc,
    ) -> Result<(f64, Duration, Duration), String> {
        let queries = Arc::new(queries.to_vec());
        let mut tasks = tokio::task::JoinSet::new();
        let start = Instant::now();
        for c in 0..clients {
            let mut client = self.client().await?;
            let queries = queries.clone();
            let url = self.url.clone();
            tasks.spawn(async move {
                let mut lat = Vec::with_capacity(total / clients + 1);
                let step = match rpc {
                    Rpc::SearchBatch => BATCH_QUERIES,
                    Rpc::Search | Rpc::Trivial => 1,
                };
                let mut colls =
                    pb::collections_client::CollectionsClient::new(super::connect(&url).await?);
                let mut i = c * step;
                while i < total {
                    let t = Instant::now();
                    match rpc {
                        Rpc::Search => {
                            client
                                .search(search_request(queries[i % queries.len()].clone()))
                                .await
                                .map_err(super::status)?;
                        }
                        Rpc::SearchBatch => {
                            let qs = (i..i + step)
                                .map(|j| pb::Query {
                                    kind: Some(pb::query::Kind::Vector(pb::Vector {
                                        values: queries[j % queries.len()].clone(),
                                    })),
                                })
                                .collect();
                            client
                                .search_batch(pb::SearchBatchRequest {
                                    collection: "bench".into(),
                                    queries: qs,
                                    k: 10,
                                    ..Default::default()
                                })
                                .await
                                .map_err(super::status)?;
                        }
                        Rpc::Trivial => {
                            colls
                                .get_collection(pb::GetCollectionRequest {
                                    name: "bench".into(),
                                })
                                .await
                                .map_err(super::status)?;
                        }
                    }
                    lat.push(t.elapsed());
                    i += clients * step;
                }
                Ok::<_, String>(lat)
            });
        }
        let mut lat = Vec::with_capacity(total);
        while let Some(r) = tasks.join_next().await {
            lat.extend(r.map_err(|e| e.to_string())??);
        }
        let qps = total as f64 / start.elapsed().as_secs_f64();
        lat.sort();
        let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
        Ok((qps, p(0.5), p(0.99)))
    }

    /// EMBED_IMAGES images in requests of `batch` from `clients` concurrent clients:
    /// (images/s, p50, p99 per request).
    async fn embed_rate(
        &self,
        inputs: &[pb::Input],
        batch: usize,
        clients: usize,
    ) -> Result<(f64, Duration, Duration), String> {
        let pool = Arc::new(inputs.to_vec());
        let requests = EMBED_IMAGES.div_ceil(batch);
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..clients {
            let ch = super::connect(&self.url).await?;
            let pool = pool.clone();
            tasks.spawn(async move {
                let mut client = pb::embedder_client::EmbedderClient::new(ch);
                let mut lat = Vec::new();
                let mut r = c;
                while r < requests {
                    let inputs = (0..batch)
                        .map(|i| pool[(r * batch + i) % pool.len()].clone())
                        .collect();
                    let t = Instant::now();
                    client
                        .embed(pb::EmbedRequest {
                            model: "fmnist-triplet".into(),
                            inputs,
                        })
                        .await
                        .map_err(super::status)?;
                    lat.push(t.elapsed());
                    r += clients;
                }
                Ok::<_, String>(lat)
            });
        }
        let mut lat = Vec::new();
        while let Some(r) = tasks.join_next().await {
            lat.extend(r.map_err(|e| e.to_string())??);
        }
        let rate = (requests * batch) as f64 / start.elapsed().as_secs_f64();
        lat.sort();
        let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
        Ok((rate, p(0.5), p(0.99)))
    }

    async fn stop(self) -> Result<(), String> {
        let _ = self.stop.send(());
        let r = tokio::task::spawn_blocking(move || self.thread.join())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|_| "daemon thread panicked".to_string())?;
        let _ = std::fs::remove_dir_all(&self.dir);
        r
    }
}

/// Queries per SearchBatch call in the batched figure.
const BATCH_QUERIES: usize = 16;

#[derive(Debug, Clone, Copy)]
enum Rpc {
    Search,
    SearchBatch,
    Trivial,
}

fn search_request(q: Vec<f32>) -> pb::SearchRequest {
    pb::SearchRequest {
        collection: "bench".into(),
        query: Some(pb::Query {
            kind: Some(pb::query::Kind::Vector(pb::Vector { values: q })),
        }),
        k: 10,
        ..Default::default()
    }
}
