//! The curve part: recall@10 against QPS over an HNSW ef sweep, the ann-benchmarks
//! picture, for likeness over gRPC and usearch in-process on the same vectors, on each
//! data set of `--curve-datasets`. Search is judged at equal recall, so the report gives
//! the QPS each reaches at recall 0.9, 0.95 and 0.99, and the CPU each query costs the
//! daemon against usearch's own search at the same ef plus the fixed cost of a gRPC call.
//!
//! Two in-process usearch figures per ef: its own search with `expansion_search = ef`
//! and k = 10 results (the engine's ideal, set between runs, never while searching), and
//! the way the daemon asks for a per-query ef (`expansion_search = 1`, ef results, cut to
//! 10: src/index/mod.rs), so the cost of that indirection is measured, not assumed.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use likeness::types::IndexParams;

use crate::daemon::{Daemon, Rpc, Run};
use crate::data::{Data, Which, exact_knn, recall};
use crate::reference::usearch_add;
use crate::{Ctx, Stat, stat};

/// The recall levels a system is judged at.
pub const LEVELS: [f64; 3] = [0.9, 0.95, 0.99];
const K: usize = 10;

/// One ef of one data set, medians over runs.
#[derive(Debug, Clone)]
struct Point {
    ef: usize,
    usearch_recall: f64,
    usearch_qps: Stat,
    usearch_cpu: f64,
    /// usearch asked the daemon's way: expansion 1, ef results.
    count_qps: Stat,
    count_cpu: f64,
    grpc_recall: f64,
    grpc_qps: Stat,
    daemon_cpu: f64,
    client_cpu: f64,
}

/// The fixed cost of a gRPC call on this machine: GetCollection, which does no work.
struct Floor {
    calls: Stat,
    daemon_cpu: f64,
}

pub async fn run(ctx: &Ctx) -> Result<(), String> {
    let args = &ctx.args;
    let csv_path = args
        .curve_csv
        .clone()
        .unwrap_or_else(|| default_csv().to_path_buf());
    let mut csv =
        std::fs::File::create(&csv_path).map_err(|e| format!("{}: {e}", csv_path.display()))?;
    writeln!(
        csv,
        "dataset,ef,system,recall,qps,qps_min,qps_max,server_cpu_us,client_cpu_us,grpc_floor_cpu_us,build_vectors_per_s"
    )
    .map_err(|e| e.to_string())?;
    let mut summary = Vec::new();
    for which in &args.curve_datasets {
        let data = Data::load(
            *which,
            match which {
                Which::Fmnist => args.n.map(|n| n.min(60_000)),
                _ => args.n,
            },
            args.dim,
            args.recall_queries,
            &args.fmnist_dir,
        )?;
        let name = dataset_name(*which);
        if !args.curve_builds.is_empty() {
            builds(ctx, name, &data, &mut csv)?;
            continue;
        }
        let (points, floor) = sweep(ctx, &data).await?;
        report(name, &data, &points, &floor, ctx);
        write_csv(&mut csv, name, &points, &floor).map_err(|e| e.to_string())?;
        summary.push((name, points, floor));
    }
    if summary.is_empty() {
        return Ok(());
    }
    println!("## QPS at equal recall: likeness over gRPC / usearch in-process\n");
    println!(
        "Each system at the smallest ef of the sweep that reaches the recall; '-' where none does.\n"
    );
    println!("| data | recall >= 0.9 | recall >= 0.95 | recall >= 0.99 |");
    println!("|---|---|---|---|");
    for (name, points, _) in &summary {
        let cells: Vec<String> = LEVELS
            .iter()
            .map(|&r| {
                let u = at_recall(points, r, |p| (p.usearch_recall, p.usearch_qps.median));
                let g = at_recall(points, r, |p| (p.grpc_recall, p.grpc_qps.median));
                match (u, g) {
                    (Some((ue, u)), Some((ge, g))) => {
                        format!("{:.2}x ({g:.0} at ef {ge} / {u:.0} at ef {ue})", g / u)
                    }
                    _ => "-".into(),
                }
            })
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
    println!("\nThe curve as CSV: {}\n", csv_path.display());
    Ok(())
}

fn dataset_name(which: Which) -> &'static str {
    match which {
        Which::Synthetic => "clustered",
        Which::Overlapping => "overlapping",
        Which::Fmnist => "fashion-mnist",
    }
}

/// The smallest ef whose recall reaches `level` (the cheapest point of the curve that
/// does; bench/plot_curve.py picks the same), and its QPS.
fn at_recall(
    points: &[Point],
    level: f64,
    f: impl Fn(&Point) -> (f64, f64),
) -> Option<(usize, f64)> {
    points
        .iter()
        .filter(|p| f(p).0 >= level)
        .map(|p| (p.ef, f(p).1))
        .min_by_key(|p| p.0)
}

async fn sweep(ctx: &Ctx, data: &Data) -> Result<(Vec<Point>, Floor), String> {
    let (args, threads, runs) = (&ctx.args, ctx.threads, ctx.runs);
    let rq = data.recall_queries();
    eprintln!(
        "[{}] exact neighbours of {} queries",
        data.describe,
        rq.len()
    );
    let truth = exact_knn(&data.vectors, rq, data.metric, K, threads);
    eprintln!("[{}] building the in-process usearch index", data.describe);
    let (index, _, _) = usearch_add(&data.vectors, data.metric, IndexParams::default(), threads)?;
    let d = Daemon::start(&ctx.spec).await?;
    eprintln!(
        "[{}] loading {} items into a fresh daemon",
        data.describe,
        data.n()
    );
    d.ingest(data, args.batch, args.writers).await?;
    wait_for_sweep(&d, &data.describe).await;
    eprintln!("[{}] ingested; measuring", data.describe);
    let queries: Arc<Vec<Vec<f32>>> = Arc::new(data.queries.clone());

    // The fixed gRPC cost, with the same clients.
    let floor_n = args.queries;
    d.search_qps(&queries, floor_n / 4, args.clients, Rpc::Trivial)
        .await?;
    let mut floor_runs = Vec::new();
    for _ in 0..runs {
        floor_runs.push(
            d.search_qps(&queries, floor_n, args.clients, Rpc::Trivial)
                .await?,
        );
    }
    let floor = Floor {
        calls: stat(floor_runs.iter().map(|r| r.rate).collect()),
        daemon_cpu: stat(floor_runs.iter().map(|r| r.cpu_us().0).collect()).median,
    };

    let mut points = Vec::new();
    for &ef in &args.curve_efs {
        index.change_expansion_search(ef);
        let usearch_recall = recall(&truth, |q| {
            index
                .search(&rq[q][..], K)
                .map(|m| m.keys.iter().map(|k| *k as usize).collect())
                .unwrap_or_default()
        });
        let grpc_recall = d.recall_at(rq, &truth, ef as u32).await?;
        // Queries per run: about --curve-secs of usearch's own search at this ef.
        let probe = 200;
        let (qps, _) = own_qps(&index, &queries, ef, probe, threads, false);
        let n = ((qps * args.curve_secs) as usize).clamp(probe, args.queries);
        // Warm-up of each path at this ef.
        own_qps(&index, &queries, ef, n / 4, threads, true);
        d.search_qps(&queries, n / 4, args.clients, Rpc::SearchAt(ef as u32))
            .await?;
        let (mut own, mut own_cpu, mut count, mut count_cpu) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut grpc: Vec<Run> = Vec::new();
        for _ in 0..runs {
            let (q, c) = own_qps(&index, &queries, ef, n, threads, false);
            own.push(q);
            own_cpu.push(c * 1e6 / n as f64);
            let (q, c) = own_qps(&index, &queries, ef, n, threads, true);
            count.push(q);
            count_cpu.push(c * 1e6 / n as f64);
            grpc.push(
                d.search_qps(&queries, n, args.clients, Rpc::SearchAt(ef as u32))
                    .await?,
            );
        }
        let p = Point {
            ef,
            usearch_recall,
            usearch_qps: stat(own),
            usearch_cpu: stat(own_cpu).median,
            count_qps: stat(count),
            count_cpu: stat(count_cpu).median,
            grpc_recall,
            grpc_qps: stat(grpc.iter().map(|r| r.rate).collect()),
            daemon_cpu: stat(grpc.iter().map(|r| r.cpu_us().0).collect()).median,
            client_cpu: stat(grpc.iter().map(|r| r.cpu_us().1).collect()).median,
        };
        eprintln!(
            "[{}] ef {ef}: usearch recall {:.4} {:.0} QPS {:.0} µs/q (count path {:.0} QPS {:.0} µs/q); likeness recall {:.4} {:.0} QPS, daemon {:.0} µs/q",
            data.describe,
            p.usearch_recall,
            p.usearch_qps.median,
            p.usearch_cpu,
            p.count_qps.median,
            p.count_cpu,
            p.grpc_recall,
            p.grpc_qps.median,
            p.daemon_cpu
        );
        points.push(p);
    }
    d.stop().await?;
    Ok((points, floor))
}

/// Waits until the daemon has swept its index after the ingest (it does once writes go
/// quiet; src/index/reach.rs), so that the sweep neither runs beside the measurements
/// nor is missing from the recall. A daemon from before issue 20 never logs one: it is
/// given 120 s.
async fn wait_for_sweep(d: &Daemon, describe: &str) {
    let start = Instant::now();
    while start.elapsed().as_secs() < 120 {
        if d.log().contains("swept the index") {
            eprintln!(
                "[{describe}] the daemon swept its index {:.1} s after the ingest",
                start.elapsed().as_secs_f64()
            );
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    eprintln!("[{describe}] no sweep logged within 120 s; measuring anyway");
}

/// `total` single-query k = 10 searches at `ef` from `threads` threads: queries/s and
/// CPU seconds of this process. `daemon_way`: as the daemon asks (expansion 1, ef
/// results cut to 10); otherwise usearch's own (expansion ef, 10 results). Sets the
/// index's expansion_search, so never runs beside another search of the same index.
fn own_qps(
    index: &usearch::Index,
    queries: &[Vec<f32>],
    ef: usize,
    total: usize,
    threads: usize,
    daemon_way: bool,
) -> (f64, f64) {
    let (expansion, count) = if daemon_way { (1, ef.max(K)) } else { (ef, K) };
    index.change_expansion_search(expansion);
    let cpu = crate::procfs::Meter::start(None);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let mut i = t;
                while i < total {
                    if let Ok(mut m) = index.search(&queries[i % queries.len()][..], count) {
                        m.keys.truncate(K);
                        m.distances.truncate(K);
                        std::hint::black_box(&m);
                    }
                    i += threads;
                }
            });
        }
    });
    let qps = total as f64 / start.elapsed().as_secs_f64();
    let cpu = cpu.stop().client;
    index.change_expansion_search(ef);
    (qps, cpu)
}

fn report(name: &str, data: &Data, points: &[Point], floor: &Floor, ctx: &Ctx) {
    println!(
        "## Recall@10 against QPS, {name}: {} (k = 10, index defaults M {}, ef_add {})\n",
        data.describe,
        IndexParams::default().connectivity,
        IndexParams::default().expansion_add
    );
    println!(
        "likeness: `--clients` {} concurrent gRPC Search clients (SearchRequest.expansion = ef); usearch: in-process on {} threads, same vectors and parameters, its own search at expansion_search = ef. Medians of {} runs. gRPC floor (GetCollection, no work): {} calls/s, {:.0} µs of daemon CPU per call.\n",
        ctx.args.clients, ctx.threads, ctx.runs, floor.calls, floor.daemon_cpu
    );
    println!(
        "| ef | usearch recall | usearch QPS | usearch CPU µs/q | usearch the daemon's way: QPS, CPU µs/q | likeness recall | likeness QPS | likeness / usearch QPS | daemon CPU µs/q | daemon CPU / (usearch CPU + floor) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for p in points {
        println!(
            "| {} | {:.4} | {} | {:.0} | {}, {:.0} | {:.4} | {} | {:.2} | {:.0} | {:.2} |",
            p.ef,
            p.usearch_recall,
            p.usearch_qps,
            p.usearch_cpu,
            p.count_qps,
            p.count_cpu,
            p.grpc_recall,
            p.grpc_qps,
            p.grpc_qps.median / p.usearch_qps.median,
            p.daemon_cpu,
            p.daemon_cpu / (p.usearch_cpu + floor.daemon_cpu)
        );
    }
    println!();
}

fn write_csv(
    out: &mut impl Write,
    name: &str,
    points: &[Point],
    floor: &Floor,
) -> std::io::Result<()> {
    for p in points {
        let rows = [
            (
                "usearch",
                p.usearch_recall,
                p.usearch_qps,
                p.usearch_cpu,
                p.usearch_cpu,
            ),
            (
                "usearch-daemon-way",
                p.usearch_recall,
                p.count_qps,
                p.count_cpu,
                p.count_cpu,
            ),
            (
                "likeness-grpc",
                p.grpc_recall,
                p.grpc_qps,
                p.daemon_cpu,
                p.client_cpu,
            ),
        ];
        for (system, r, q, server, client) in rows {
            writeln!(
                out,
                "{name},{},{system},{r:.4},{:.1},{:.1},{:.1},{server:.1},{client:.1},{:.1},",
                p.ef, q.median, q.min, q.max, floor.daemon_cpu
            )?;
        }
    }
    out.flush()
}

/// Where the CSV goes by default: docs/, beside the plots drawn from it.
pub fn default_csv() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/search-curve.csv"
    ))
}

/// The build parameters of `--curve-builds` ("M:ef_add"), in-process only: usearch's
/// add rate on `--threads` threads and its recall and QPS over the same ef sweep, so the
/// defaults can be read off the curves.
fn builds(ctx: &Ctx, name: &str, data: &Data, csv: &mut impl Write) -> Result<(), String> {
    let (args, threads) = (&ctx.args, ctx.threads);
    let rq = data.recall_queries();
    let truth = exact_knn(&data.vectors, rq, data.metric, K, threads);
    println!(
        "## Build parameters, {name} (usearch in-process, {threads} threads; QPS medians of {} runs)\n",
        ctx.runs
    );
    println!("| M | ef_add | adds/s | ef: recall, QPS |");
    println!("|---|---|---|---|");
    for b in &args.curve_builds {
        let (m, ea) = b
            .split_once(':')
            .and_then(|(m, e)| Some((m.parse::<u32>().ok()?, e.parse::<u32>().ok()?)))
            .ok_or_else(|| format!("--curve-builds {b}: expected M:ef_add"))?;
        let params = IndexParams {
            connectivity: m,
            expansion_add: ea,
            ..IndexParams::default()
        };
        let (index, rate, _) = usearch_add(&data.vectors, data.metric, params, threads)?;
        let mut cells = Vec::new();
        for &ef in &args.curve_efs {
            index.change_expansion_search(ef);
            let r = recall(&truth, |q| {
                index
                    .search(&rq[q][..], K)
                    .map(|m| m.keys.iter().map(|k| *k as usize).collect())
                    .unwrap_or_default()
            });
            let (qps, _) = own_qps(&index, &data.queries, ef, 200, threads, false);
            let n = ((qps * args.curve_secs) as usize).clamp(200, args.queries);
            let runs: Vec<(f64, f64)> = (0..ctx.runs)
                .map(|_| own_qps(&index, &data.queries, ef, n, threads, false))
                .collect();
            let q = stat(runs.iter().map(|r| r.0).collect());
            let cpu = stat(runs.iter().map(|r| r.1 * 1e6 / n as f64).collect()).median;
            eprintln!(
                "[{name}] M {m} ef_add {ea} ({rate:.0} adds/s): ef {ef} recall {r:.4}, {:.0} QPS",
                q.median
            );
            cells.push(format!("{ef}: {r:.3}, {:.0}", q.median));
            writeln!(
                csv,
                "{name},{ef},usearch-M{m}-efadd{ea},{r:.4},{:.1},{:.1},{:.1},{cpu:.1},{cpu:.1},,{rate:.0}",
                q.median, q.min, q.max
            )
            .map_err(|e| e.to_string())?;
        }
        println!("| {m} | {ea} | {rate:.0} | {} |", cells.join("; "));
    }
    println!();
    Ok(())
}
