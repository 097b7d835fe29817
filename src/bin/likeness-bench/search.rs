//! The ingest and search parts: durable upserts/s over gRPC against raw sled and
//! usearch's own add rate; search QPS and recall@10 over gRPC against usearch in-process
//! on the same vectors, with the CPU each query costs the daemon and the clients.

use likeness::types::IndexParams;

use crate::daemon::{BATCH_QUERIES, Daemon, Rpc, Run};
use crate::data::{exact_knn, recall};
use crate::reference::{raw_sled, usearch_add, usearch_qps};
use crate::{Ctx, stat};

/// Median of each of (daemon, client) CPU µs per unit over runs.
pub fn cpu_us(runs: &[Run]) -> (f64, f64) {
    let (d, c): (Vec<f64>, Vec<f64>) = runs.iter().map(Run::cpu_us).unzip();
    (stat(d).median, stat(c).median)
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs the ingest figure; returns the last run's daemon, loaded, for the next parts.
pub async fn ingest(ctx: &Ctx) -> Result<Daemon, String> {
    let (args, data) = (&ctx.args, &ctx.data);
    let params = IndexParams::default();
    let (mut sled_rates, mut sled_cpu) = (Vec::new(), Vec::new());
    let (mut usearch_rates, mut usearch_cpu) = (Vec::new(), Vec::new());
    let mut daemon_runs = Vec::new();
    let mut daemon: Option<Daemon> = None;
    for run in 0..ctx.runs {
        let (rate, cpu) = raw_sled(&data.items, args.batch)?;
        sled_rates.push(rate);
        sled_cpu.push(cpu * 1e6 / data.n() as f64);
        let (_, rate, cpu) = usearch_add(&data.vectors, data.metric, params, ctx.threads)?;
        usearch_rates.push(rate);
        usearch_cpu.push(cpu * 1e6 / data.n() as f64);
        if let Some(d) = daemon.take() {
            d.stop().await?;
        }
        let d = Daemon::start(&ctx.spec).await?;
        let r = d.ingest(data, args.batch, args.writers).await?;
        daemon = Some(d);
        eprintln!(
            "ingest run {}/{}: sled {:.0}/s, usearch {:.0}/s, likeness {:.0}/s ({:.0} µs daemon CPU per vector)",
            run + 1,
            ctx.runs,
            sled_rates[run],
            usearch_rates[run],
            r.rate,
            r.cpu_us().0
        );
        daemon_runs.push(r);
    }
    let (s, u) = (stat(sled_rates), stat(usearch_rates));
    let d = stat(daemon_runs.iter().map(|r| r.rate).collect());
    let (dc, cc) = cpu_us(&daemon_runs);
    println!(
        "## Durable ingest ({}-d, batches of {}, {} concurrent writers, acknowledged after flush)\n",
        data.dim, args.batch, args.writers
    );
    println!(
        "| system | vectors/s | likeness / it | daemon CPU µs/vector | bench process CPU µs/vector |"
    );
    println!("|---|---|---|---|---|");
    println!("| likeness over gRPC (sled + usearch, durable) | {d} | 1.00 | {dc:.1} | {cc:.1} |");
    println!(
        "| raw sled insert + flush per batch (1 writer) | {s} | {:.2} | - | {:.1} |",
        d.median / s.median,
        stat(sled_cpu).median
    );
    println!(
        "| usearch in-process add ({} threads) | {u} | {:.2} | - | {:.1} |",
        ctx.threads,
        d.median / u.median,
        stat(usearch_cpu).median
    );
    println!();
    daemon.ok_or_else(|| "no ingest run".into())
}

pub async fn search(ctx: &Ctx, d: &Daemon) -> Result<(), String> {
    let (args, data, threads, runs) = (&ctx.args, &ctx.data, ctx.threads, ctx.runs);
    let params = IndexParams::default();
    let rq = data.recall_queries();
    eprintln!("computing exact neighbours of {} queries", rq.len());
    let truth = exact_knn(&data.vectors, rq, data.metric, 10, threads);
    let (index, _, _) = usearch_add(&data.vectors, data.metric, params, threads)?;
    let inproc_recall = recall(&truth, |q| {
        index
            .search(&rq[q][..], 10)
            .map(|m| m.keys.iter().map(|k| *k as usize).collect())
            .unwrap_or_default()
    });
    let grpc_recall = d.recall(rq, &truth).await?;
    eprintln!("the engine without gRPC, in this process");
    let engine = crate::engine::search_qps(data, &ctx.queries, args.queries, threads, runs)?;
    let (mut inproc, mut inproc_cpu) = (Vec::new(), Vec::new());
    let (mut grpc, mut batched, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let (qps, cpu) = usearch_qps(&index, &ctx.queries, args.queries, threads);
        inproc.push(qps);
        inproc_cpu.push(cpu * 1e6 / args.queries as f64);
        let g = d
            .search_qps(&ctx.queries, args.queries, args.clients, Rpc::Search)
            .await?;
        let b = d
            .search_qps(&ctx.queries, args.queries, args.clients, Rpc::SearchBatch)
            .await?;
        let f = d
            .search_qps(&ctx.queries, args.queries, args.clients, Rpc::Trivial)
            .await?;
        eprintln!(
            "search run {}/{runs}: usearch {:.0} QPS, likeness Search {:.0} QPS (p50 {:.2} ms, p99 {:.2} ms; daemon {:.0} µs, client {:.0} µs CPU per query), SearchBatch {:.0} QPS, GetCollection {:.0}/s",
            run + 1,
            inproc[run],
            g.rate,
            ms(g.p50),
            ms(g.p99),
            g.cpu_us().0,
            g.cpu_us().1,
            b.rate,
            f.rate
        );
        grpc.push(g);
        batched.push(b);
        floor.push(f);
    }
    let u = stat(inproc);
    let rates = |rs: &[Run]| stat(rs.iter().map(|r| r.rate).collect());
    let (g, b, f) = (rates(&grpc), rates(&batched), rates(&floor));
    let c = stat(engine.iter().map(|e| e.0).collect());
    let engine_cpu = stat(engine.iter().map(|e| e.1).collect()).median;
    let mut lat: Vec<_> = grpc.iter().map(|r| (r.p50, r.p99)).collect();
    lat.sort();
    let (p50, p99) = lat[lat.len() / 2];
    let ((gd, gc), (bd, bc), (fd, fc)) = (cpu_us(&grpc), cpu_us(&batched), cpu_us(&floor));
    println!(
        "## Search (k = 10, {} x {}-d, ef = {})\n",
        data.n(),
        data.dim,
        params.expansion_search
    );
    println!(
        "| system | QPS | recall@10 | likeness / it | daemon CPU µs/query | bench process CPU µs/query |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| likeness over gRPC ({} concurrent clients; p50 {:.2} ms, p99 {:.2} ms) | {g} | {grpc_recall:.4} | 1.00 | {gd:.0} | {gc:.0} |",
        args.clients,
        ms(p50),
        ms(p99)
    );
    println!(
        "| usearch in-process, same vectors and parameters ({threads} threads) | {u} | {inproc_recall:.4} | {:.2} | - | {:.0} |",
        g.median / u.median,
        stat(inproc_cpu).median
    );
    println!(
        "| likeness SearchBatch, {BATCH_QUERIES} queries per call, {} clients | {b} | same index | {:.2} (SearchBatch / usearch) | {bd:.0} | {bc:.0} |",
        args.clients,
        b.median / u.median
    );
    println!(
        "| likeness engine in-process, no gRPC ({}, {threads} threads) | {c} | same index | {:.2} (engine / usearch) | - | {engine_cpu:.0} |",
        crate::engine::NAME,
        c.median / u.median
    );
    println!(
        "| gRPC floor: GetCollection (no search), {} clients | {f} calls/s | - | - | {fd:.0} per call | {fc:.0} per call |",
        args.clients
    );
    println!();
    println!(
        "Fixed gRPC cost per call (GetCollection, which does no work): {fd:.0} µs of daemon CPU and {fc:.0} µs of client CPU; {:.0} calls/s at most with {} clients on this machine. A Search costs the daemon {gd:.0} µs of CPU, {:.0}% of it that fixed cost; SearchBatch brings it to {bd:.0} µs per query.\n",
        f.median,
        args.clients,
        100.0 * fd / gd
    );
    Ok(())
}
