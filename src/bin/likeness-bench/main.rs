//! `likeness-bench`: the daemon measured beside its references, in one run, on one
//! machine, on the same data (../shared/BENCHMARKS.md, docs/benchmarks.md).
//!
//! The daemon under test is a separate process: `likeness serve` (the binary beside this
//! one, or `--daemon PATH`, so one bench can measure two builds) on 127.0.0.1, a free port
//! and a temp data dir, reached only over gRPC. Its CPU time and memory are read from
//! /proc. The references run in this process: raw sled, usearch, an ONNX Runtime session
//! and, for one figure, the collections engine without gRPC.
//!
//! Parts (`--only`, default all but curve, mine, load and sizing, in this order):
//! ingest, search, embed, mixed, memory, restart; and four that run only when named:
//! curve (recall against QPS over an ef sweep) and mine (a daemon per `--mine-n`), with
//! data sets of their own; session (a Session used as a cross-batch memory, with and
//! without write-back); load (1,000 streams beside a mixed unary load for 60 s);
//! sizing (memory and disk by N, dimension and precision, a daemon per cell);
//! activate (a collection re-embedded with a second model under load); and reach (HNSW
//! nodes that search cannot reach, their check and repair, in process).

mod activate;
mod curve;
mod daemon;
mod data;
mod embed;
mod engine;
mod lifecycle;
mod load;
mod mine;
mod mixed;
mod procfs;
mod reach;
mod reference;
mod search;
mod session;
mod sizing;

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;

use crate::daemon::{Daemon, Spec};
use crate::data::Data;

const PARTS: [&str; 14] = [
    "ingest", "search", "embed", "mixed", "memory", "restart", "curve", "mine", "session", "load",
    "streams", "sizing", "activate", "reach",
];
/// Parts that run only when `--only` names them (long, or with data sets of their own).
const ON_REQUEST: [&str; 8] = [
    "curve", "mine", "session", "load", "streams", "sizing", "activate", "reach",
];

#[derive(Debug, Clone, Parser)]
#[command(
    name = "likeness-bench",
    about = "Measure a likeness daemon (a child process, over gRPC) against its references"
)]
pub struct Args {
    /// The likeness binary to run as `likeness serve` [default: `likeness` beside this
    /// executable].
    #[arg(long)]
    pub daemon: Option<PathBuf>,
    /// One more flag for `likeness serve`, e.g. --daemon-arg=--search-threads=1
    /// (repeatable).
    #[arg(long = "daemon-arg", allow_hyphen_values = true)]
    pub daemon_args: Vec<String>,
    /// How the bench's clients reach the daemon: --tls-ca, --tls-cert, --tls-key and
    /// --token, for a daemon given TLS or tokens through --daemon-arg (e.g.
    /// --daemon-arg=--tls-cert=server.pem --daemon-arg=--tls-key=server.key --tls-ca ca.pem).
    #[command(flatten)]
    pub conn: likeness::cli::ConnectArgs,
    /// The vectors: synthetic clusters, or Fashion-MNIST's images (784-d, L2).
    #[arg(long, value_enum, default_value = "synthetic")]
    pub dataset: data::Which,
    /// Where Fashion-MNIST's idx files are (gzipped or not).
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    pub fmnist_dir: PathBuf,
    /// Vectors in the collection [default: 100000 synthetic; the 60000 Fashion-MNIST
    /// train images].
    #[arg(long)]
    pub n: Option<usize>,
    /// Dimension of the synthetic vectors.
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
    /// The daemon's ONNX Runtime intra-op threads (its --embed-threads; 0 = its default,
    /// all cores).
    #[arg(long, default_value_t = 0)]
    pub embed_threads: usize,
    /// The embedder's manifest for the in-process reference; the daemon must serve a
    /// model of the same name (it loads the shipped ones by default).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/models/fmnist-triplet/model.toml"))]
    pub embed_model: PathBuf,
    /// Where the in-process reference session runs: cpu, or cuda / cuda:N (CUDA's own
    /// provider, heuristic cuDNN search, as the daemon's default); on CUDA the figures
    /// add batches of 256 and 512. Give the daemon --device too (--daemon-arg).
    #[arg(long, default_value = "cpu")]
    pub embed_ref_device: String,
    /// The batch sizes of the embedding table (comma-separated) [default: 1, 8, 32, 64,
    /// 128, and on CUDA also 256 and 512].
    #[arg(long, value_delimiter = ',')]
    pub embed_batches: Vec<usize>,
    /// Grayscale images (uint8 N x H x W .npy) for the embedding figures.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/fmnist/enrol_images.npy"))]
    pub embed_images: PathBuf,
    /// Seconds of each load in the mixed part.
    #[arg(long, default_value_t = 10.0)]
    pub mixed_secs: f64,
    /// Restarts per restart figure; the median is reported.
    #[arg(long, default_value_t = 5)]
    pub restarts: usize,
    /// mine: corpus sizes, one fresh daemon each.
    #[arg(long, value_delimiter = ',', default_value = "100000")]
    pub mine_n: Vec<usize>,
    /// mine: items per class (the corpus has N / this classes).
    #[arg(long, default_value_t = 100)]
    pub mine_per_class: usize,
    /// mine: the corpus: cold (unit Gaussian vectors, no class structure, labels
    /// round-robin: an untrained network) or clustered (classes in families: a
    /// half-trained one).
    #[arg(long, value_enum, default_value = "clustered")]
    pub mine_corpus: mine::CorpusKind,
    /// mine: anchors per timed run (a seeded sample of the corpus).
    #[arg(long, default_value_t = 10_000)]
    pub mine_anchors: usize,
    /// mine: anchors the exact miner mines and the agreement covers (the head of the
    /// sample); 0 leaves the exact miner and the agreement out.
    #[arg(long, default_value_t = 2_000)]
    pub exact_anchors: usize,
    /// mine: runs of the exact miner (inside one process; the median is reported).
    #[arg(long, default_value_t = 3)]
    pub exact_runs: usize,
    /// mine: the Python that runs bench/exact_miner.py (needs numpy and faiss-cpu).
    #[arg(long, default_value = "python3")]
    pub python: String,
    /// mine: the exact miner.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/exact_miner.py"))]
    pub exact_script: PathBuf,
    /// mine: one more flag for the exact miner (repeatable), e.g. --exact-arg=--engine=numpy.
    #[arg(long = "exact-arg", allow_hyphen_values = true)]
    pub exact_args: Vec<String>,
    /// mine: keep the .npy files the exact miner reads here (default: a temp dir,
    /// removed).
    #[arg(long)]
    pub mine_dir: Option<PathBuf>,
    /// mine: the largest N that also gets the in-process usearch reference (building it
    /// takes as long as the ingest).
    #[arg(long, default_value_t = usize::MAX)]
    pub mine_usearch_max_n: usize,
    /// mine: the N whose daemon also gets the slow-reader memory figure (0: none).
    #[arg(long, default_value_t = 100_000)]
    pub mine_memory_n: usize,
    /// mine: triplets in the slow reader's stream (its max_triplets).
    #[arg(long, default_value_t = 1_000_000)]
    pub mine_memory_triplets: u64,
    /// mine: how long the slow reader sleeps after each message, ms.
    #[arg(long, default_value_t = 250)]
    pub mine_slow_ms: u64,
    /// session: items in the collection.
    #[arg(long, default_value_t = 100_000)]
    pub session_n: usize,
    /// session: their dimension.
    #[arg(long, default_value_t = 64)]
    pub session_dim: usize,
    /// session: labels (N / this items each).
    #[arg(long, default_value_t = 1000)]
    pub session_labels: usize,
    /// session: the corpus (as --mine-corpus).
    #[arg(long, value_enum, default_value = "cold")]
    pub session_corpus: mine::CorpusKind,
    /// session: measured steps per Session, after the warm-up steps.
    #[arg(long, default_value_t = 300)]
    pub session_steps: usize,
    /// session: warm-up steps, not measured.
    #[arg(long, default_value_t = 20)]
    pub session_warmup: usize,
    /// session: anchors per step.
    #[arg(long, default_value_t = 128)]
    pub session_anchors: usize,
    /// session: HARD negatives per anchor.
    #[arg(long, default_value_t = 16)]
    pub session_negatives: u32,
    /// session: norm of the Gaussian noise added to a stored vector to make the
    /// trainer's fresh one (then unit-normalised).
    #[arg(long, default_value_t = 0.1)]
    pub session_noise: f32,
    /// session: ms the trainer spends between an answer and its next step (its forward
    /// and backward pass, which a write-back hides behind); 0: the next step at once.
    #[arg(long, default_value_t = 0)]
    pub session_think_ms: u64,
    /// session: the steps' HNSW expansion (ef) and kNN pool (`candidates`); 0: the
    /// defaults (ef 64, pool 64). A memory wants its negatives, approximately: a
    /// smaller ef and pool is the main knob on a step's cost.
    #[arg(long, default_value_t = 0)]
    pub session_expansion: u32,
    /// load, streams: concurrent streams held open (EmbedStream, Session, MineTriplets and
    /// UpsertStream in turn).
    #[arg(long, default_value_t = 1000)]
    pub load_streams: usize,
    /// load, streams: only these stream kinds (EmbedStream, Session, MineTriplets,
    /// UpsertStream; streams also MineBatches); default all in turn.
    #[arg(long, value_delimiter = ',')]
    pub load_kinds: Vec<String>,
    /// load, streams: HTTP/2 connections the streams share.
    #[arg(long, default_value_t = 50)]
    pub load_connections: usize,
    /// load: each stream sends (or reads) one message per this many ms.
    #[arg(long, default_value_t = 1000)]
    pub load_interval_ms: u64,
    /// load: concurrent unary callers (Search, Upsert, Embed), each as fast as answered.
    #[arg(long, default_value_t = 32)]
    pub load_unary: usize,
    /// load: seconds the load lasts.
    #[arg(long, default_value_t = 60.0)]
    pub load_secs: f64,
    /// sizing: corpus sizes, one fresh daemon per size, dimension and precision.
    #[arg(long, value_delimiter = ',', default_value = "100000")]
    pub sizing_n: Vec<usize>,
    /// sizing: dimensions.
    #[arg(long, value_delimiter = ',', default_value = "128,512")]
    pub sizing_dims: Vec<usize>,
    /// sizing: index precisions (f32, f16, i8).
    #[arg(long, value_delimiter = ',', default_value = "f32,f16,i8")]
    pub sizing_precisions: Vec<String>,
    /// activate: images enrolled by input, then re-embedded with a second model.
    #[arg(long, default_value_t = 20_000)]
    pub activate_n: usize,
    /// Only run these parts (ingest, search, embed, mixed, memory, restart, curve, mine,
    /// session, load, streams, sizing, activate, reach); default all but the last eight.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// The data sets of the curve part, each with its own daemon and in-process index
    /// (`--n` and `--dim` apply to the synthetic ones).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "synthetic,overlapping,fmnist"
    )]
    pub curve_datasets: Vec<data::Which>,
    /// The ef of the curve's sweep.
    #[arg(long, value_delimiter = ',', default_value = "8,16,32,64,128,256,512")]
    pub curve_efs: Vec<usize>,
    /// Build parameters to compare in the curve part, as M:ef_add (e.g.
    /// 16:128,16:100,32:100): usearch's add rate and its recall/QPS sweep for each, in
    /// process, instead of the daemon's sweep.
    #[arg(long, value_delimiter = ',')]
    pub curve_builds: Vec<String>,
    /// Seconds of usearch's own search per curve run (the query count is set from it,
    /// at most --queries).
    #[arg(long, default_value_t = 1.0)]
    pub curve_secs: f64,
    /// Where the curve part writes its CSV (bench/plot_curve.py draws it)
    /// [default: docs/search-curve.csv in the source tree].
    #[arg(long)]
    pub curve_csv: Option<PathBuf>,
    /// The data sets of the reach part (`--n` and `--dim` apply as in the curve part);
    /// its recall sweep uses `--curve-efs`, its builds `--batch`, `--writers` and
    /// `--threads`.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "fmnist,synthetic"
    )]
    pub reach_datasets: Vec<data::Which>,
}

/// What every part shares.
pub struct Ctx {
    pub args: Args,
    /// Threads of the in-process references and of the daemon's index inserts.
    pub threads: usize,
    pub runs: usize,
    pub data: Data,
    /// The QPS runs' queries, shared by the client tasks.
    pub queries: Arc<Vec<Vec<f32>>>,
    pub spec: Arc<Spec>,
}

impl Ctx {
    /// A fresh daemon holding every item (ingested as the ingest part does).
    pub async fn loaded_daemon(&self) -> Result<Daemon, String> {
        let d = Daemon::start(&self.spec).await?;
        eprintln!("loading {} items into a fresh daemon", self.data.n());
        d.ingest(&self.data, self.args.batch, self.args.writers)
            .await?;
        Ok(d)
    }
}

/// Median, min and max of a set of runs.
#[derive(Debug, Clone, Copy)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn stat(mut xs: Vec<f64>) -> Stat {
    xs.sort_by(f64::total_cmp);
    if xs.is_empty() {
        return Stat {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
        };
    }
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

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    for part in &args.only {
        if !PARTS.contains(&part.as_str()) {
            return Err(format!("--only {part}: the parts are {}", PARTS.join(", ")));
        }
    }
    let cores = procfs::cores();
    let threads = if args.threads > 0 {
        args.threads
    } else {
        cores
    };
    let runs = args.runs.max(1);
    let exe = match &args.daemon {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("likeness"),
    };
    if !exe.exists() {
        return Err(format!(
            "no daemon binary at {} (cargo build --release --bin likeness, or give --daemon PATH)",
            exe.display()
        ));
    }
    let mut flags = vec!["--index-threads".to_string(), threads.to_string()];
    if args.embed_spin {
        flags.extend(["--embed-spin".into(), "true".into()]);
    }
    if args.embed_threads > 0 {
        flags.extend(["--embed-threads".into(), args.embed_threads.to_string()]);
    }
    flags.extend(args.daemon_args.iter().cloned());
    let spec = Arc::new(Spec {
        exe,
        flags,
        conn: args.conn.clone(),
    });
    let only = args.only.clone();
    let want = |part: &str| {
        only.iter().any(|p| p == part) || (only.is_empty() && !ON_REQUEST.contains(&part))
    };
    // curve, mine and sizing generate data sets of their own.
    let needs_data = PARTS
        .iter()
        .filter(|p| {
            !matches!(
                **p,
                "embed" | "curve" | "mine" | "session" | "sizing" | "activate" | "reach"
            )
        })
        .any(|p| want(p));
    let data = if needs_data {
        eprintln!("loading the data");
        Data::load(
            args.dataset,
            args.n,
            args.dim,
            args.recall_queries,
            &args.fmnist_dir,
        )?
    } else {
        Data::none()
    };
    let queries = Arc::new(data.queries.clone());
    let ctx = Ctx {
        threads,
        runs,
        data,
        queries,
        spec,
        args,
    };

    println!("# likeness bench\n");
    println!("{}", procfs::machine());
    if needs_data {
        println!(
            "data: {}; {runs} runs per figure, median",
            ctx.data.describe
        );
    }
    println!(
        "daemon: `{} serve {}` (a child process on 127.0.0.1 and a temp data dir; its tokio runtime and search pool default to all {cores} cores)",
        ctx.spec.exe.display(),
        ctx.spec.flags.join(" ")
    );
    println!(
        "threads: {threads} for in-process references and the daemon's index inserts; the bench's clients run on a tokio runtime of {cores} workers; client and daemon share the machine\n"
    );

    let mut daemon: Option<Daemon> = None;
    if want("ingest") {
        daemon = Some(search::ingest(&ctx).await?);
    }
    if want("search") {
        let d = match daemon.take() {
            Some(d) => d,
            None => ctx.loaded_daemon().await?,
        };
        search::search(&ctx, &d).await?;
        daemon = Some(d);
    }
    if want("embed") {
        let d = match daemon.take() {
            Some(d) => d,
            None => Daemon::start(&ctx.spec).await?,
        };
        embed::run(
            &d,
            &ctx.args.embed_model,
            &ctx.args.embed_images,
            &ctx.args.embed_ref_device,
            &ctx.args.embed_batches,
            threads,
            runs,
        )
        .await?;
        daemon = Some(d);
    }
    if want("mixed") {
        let d = match daemon.take() {
            // The embed part alone leaves a daemon without the collection.
            Some(d) if want("ingest") || want("search") => d,
            _ => ctx.loaded_daemon().await?,
        };
        mixed::run(&ctx, &d).await?;
        daemon = Some(d);
    }
    if let Some(d) = daemon.take() {
        d.stop().await?;
    }
    // Memory and restart get daemons of their own: memory must see a fresh one, and a
    // restart would lose what a running daemon holds in memory.
    let mut loaded = None;
    if want("memory") {
        loaded = Some(lifecycle::memory(&ctx).await?);
    }
    if want("restart") {
        let d = match loaded.take() {
            Some(d) => d,
            None => ctx.loaded_daemon().await?,
        };
        lifecycle::restart(&ctx, d).await?;
    }
    if let Some(d) = loaded {
        d.stop().await?;
    }
    if want("curve") {
        curve::run(&ctx).await?;
    }
    if want("mine") {
        mine::run(&ctx).await?;
    }
    if want("session") {
        session::run(&ctx).await?;
    }
    if want("load") {
        load::run(&ctx).await?;
    }
    if want("streams") {
        load::idle(&ctx).await?;
    }
    if want("sizing") {
        sizing::run(&ctx).await?;
    }
    if want("activate") {
        activate::run(&ctx).await?;
    }
    if want("reach") {
        reach::run(&ctx)?;
    }
    Ok(())
}
