//! The daemon's life outside steady load: its memory for N vectors beyond an empty
//! daemon, and cold restarts (after a clean SIGTERM: from snapshots; after SIGKILL:
//! the index rebuilt from the store).

use std::time::Duration;

use crate::daemon::Daemon;
use crate::{Ctx, stat};

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// VmRSS and RssAnon of an empty daemon, then after ingesting every item; returns the
/// loaded daemon.
pub async fn memory(ctx: &Ctx) -> Result<Daemon, String> {
    let data = &ctx.data;
    let d = Daemon::start(&ctx.spec).await?;
    // Let start-up work (model sessions, recovery) settle before reading.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let empty = d.memory_kib()?;
    eprintln!("loading {} items for the memory figure", data.n());
    d.ingest(data, ctx.args.batch, ctx.args.writers).await?;
    // Settle: the daemon gives free heap memory back once writes have been quiet for
    // half a second.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let full = d.memory_kib()?;
    let n = data.n().max(1) as f64;
    let per = |a: u64, b: u64| (a as f64 - b as f64) * 1024.0 / n;
    let raw = (data.dim * 4) as f64;
    let (rss, anon) = (per(full.0, empty.0), per(full.1, empty.1));
    println!(
        "## Memory ({} x {}-d; /proc/PID/status of the daemon)\n",
        data.n(),
        data.dim
    );
    println!("| daemon | VmRSS | RssAnon | VmHWM (peak RSS) |");
    println!("|---|---|---|---|");
    println!(
        "| empty (models loaded, no collection) | {} | {} | {} |",
        mib(empty.0),
        mib(empty.1),
        mib(empty.2)
    );
    println!(
        "| after ingest of {} vectors | {} | {} | {} |",
        data.n(),
        mib(full.0),
        mib(full.1),
        mib(full.2)
    );
    println!(
        "| bytes per vector beyond the empty daemon | {rss:.0} ({:.2}x the raw f32 vector) | {anon:.0} ({:.2}x) | - |",
        rss / raw,
        anon / raw
    );
    println!(
        "\nA raw f32 vector is {raw:.0} bytes. The figure includes the HNSW graph, the catalogue and sled's page cache (--cache-mb, 512 MiB by default) as far as the ingest filled it.\n"
    );
    Ok(d)
}

/// Which way each restart's log says the index came back.
fn index_source(log: &str) -> &'static str {
    if log.contains("from_snapshot=true") {
        "from snapshot"
    } else if log.contains("from_snapshot=false") {
        "rebuilt from the store"
    } else {
        "?"
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Cold restarts of a daemon that holds every item: after SIGTERM, and after SIGKILL.
pub async fn restart(ctx: &Ctx, mut d: Daemon) -> Result<(), String> {
    let n = ctx.args.restarts.max(1);
    let query = ctx.queries[0].clone();
    let (mut shutdown, mut clean) = (Vec::new(), Vec::new());
    let mut clean_sources = Vec::new();
    for i in 0..n {
        shutdown.push(secs(d.terminate().await?));
        let t = d.cold_start(&query).await?;
        clean.push(secs(t));
        clean_sources.push(index_source(&d.log()));
        eprintln!(
            "restart {}/{n} after SIGTERM: {:.3} s to the first Search (shutdown took {:.3} s; {})",
            i + 1,
            secs(t),
            shutdown[i],
            clean_sources[i]
        );
    }
    let mut crash = Vec::new();
    let mut crash_sources = Vec::new();
    let first = ctx.data.items[0].clone();
    for i in 0..n {
        // One acknowledged write since the last snapshot makes it stale, so the index
        // must come back from the store.
        d.items()
            .await?
            .upsert(likeness::grpc::pb::UpsertRequest {
                collection: crate::daemon::COLLECTION.into(),
                items: vec![first.clone()],
            })
            .await
            .map_err(crate::daemon::status)?;
        d.kill();
        let t = d.cold_start(&query).await?;
        crash.push(secs(t));
        crash_sources.push(index_source(&d.log()));
        eprintln!(
            "restart {}/{n} after SIGKILL: {:.3} s to the first Search ({})",
            i + 1,
            secs(t),
            crash_sources[i]
        );
    }
    let sources = |s: &[&str]| {
        let mut s = s.to_vec();
        s.sort();
        s.dedup();
        s.join(", ")
    };
    let (c, k, s) = (stat(clean), stat(crash), stat(shutdown));
    let fmt = |s: crate::Stat| {
        if s.max > s.min * 1.1 {
            format!("{:.3} (min {:.3}, max {:.3})", s.median, s.min, s.max)
        } else {
            format!("{:.3}", s.median)
        }
    };
    println!(
        "## Restart ({} x {}-d; seconds from spawning `likeness serve` to the first answered Search, median of {n})\n",
        ctx.data.n(),
        ctx.data.dim
    );
    println!("| restart | seconds | index | / rebuild |");
    println!("|---|---|---|---|");
    println!(
        "| after SIGTERM (clean shutdown, snapshots saved) | {} | {} | {:.2} |",
        fmt(c),
        sources(&clean_sources),
        c.median / k.median
    );
    println!(
        "| after SIGKILL, one write after the last snapshot | {} | {} | 1.00 |",
        fmt(k),
        sources(&crash_sources)
    );
    println!(
        "\nThe clean shutdown itself (SIGTERM to exit, saving the snapshots): {} s.\n",
        fmt(s)
    );
    d.stop().await
}
