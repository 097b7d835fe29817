//! Sizing: memory and disk for N vectors of dimension d at each index precision, one
//! fresh daemon per cell, so that deploy/README.md's table is measured, not guessed.
//!
//! Per cell: the daemon's RSS empty, after ingesting N vectors (settled), its peak RSS,
//! the index's own memory (its metric `likeness_index_memory_bytes`), RSS after a clean
//! restart (the index mapped from its snapshot, sled's page cache cold) and after the
//! first write that follows (the index a private copy again), and the data dir on
//! disk after the clean shutdown, split into the store (sled) and the rest (index
//! snapshots, catalogue).

use std::path::Path;
use std::time::Duration;

use likeness::grpc::pb;

use crate::Ctx;
use crate::daemon::{COLLECTION, Daemon};

/// One cell of the table.
struct Cell {
    n: usize,
    dim: usize,
    precision: &'static str,
    empty_kib: u64,
    loaded_kib: u64,
    peak_kib: u64,
    restarted_kib: u64,
    written_kib: u64,
    index_bytes: f64,
    store_bytes: u64,
    other_bytes: u64,
    ingest_rate: f64,
}

fn precision(name: &str) -> Result<pb::Precision, String> {
    match name {
        "f32" => Ok(pb::Precision::F32),
        "f16" => Ok(pb::Precision::F16),
        "i8" => Ok(pb::Precision::I8),
        other => Err(format!(
            "--sizing-precisions {other}: the precisions are f32, f16, i8"
        )),
    }
}

/// Bytes under `dir`, and those under its subfolder `store` (sled).
fn disk(dir: &Path) -> Result<(u64, u64), String> {
    fn walk(p: &Path, total: &mut u64) -> Result<(), String> {
        let meta = std::fs::symlink_metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(p).map_err(|e| format!("{}: {e}", p.display()))? {
                walk(&entry.map_err(|e| e.to_string())?.path(), total)?;
            }
        } else {
            *total += meta.len();
        }
        Ok(())
    }
    let (mut all, mut store) = (0, 0);
    walk(dir, &mut all)?;
    let s = dir.join("store");
    if s.exists() {
        walk(&s, &mut store)?;
    }
    Ok((all, store))
}

/// Items as the other parts store them: id `v<row>`, label `c<cluster>`, no metadata.
fn items(n: usize, dim: usize) -> Vec<pb::Item> {
    let (vectors, clusters) = likeness::synth::clustered(n, dim, 1000, 0.25, 11);
    vectors
        .into_iter()
        .zip(clusters)
        .enumerate()
        .map(|(row, (values, c))| pb::Item {
            id: format!("v{row}"),
            label: format!("c{c}"),
            vector: values,
            ..Default::default()
        })
        .collect()
}

async fn cell(
    ctx: &Ctx,
    n: usize,
    dim: usize,
    prec_name: &'static str,
    items: &[pb::Item],
) -> Result<Cell, String> {
    let mut d = Daemon::start(&ctx.spec).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let empty = d.memory_kib()?;
    d.create_at(dim, pb::Metric::Cosine, precision(prec_name)?)
        .await?;
    let run = d
        .upsert_all(items, ctx.args.batch, ctx.args.writers)
        .await?;
    // The daemon gives free heap back once writes have been quiet for half a second.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded = d.memory_kib()?;
    let series = format!("likeness_index_memory_bytes{{collection=\"{COLLECTION}\"}}");
    let index_bytes = d
        .metric(&series)
        .await?
        .ok_or_else(|| format!("the daemon exports no {series}"))?;
    d.terminate().await?;
    let (all, store) = disk(&d.data_dir())?;
    // A cold restart: the index comes from its snapshot, sled's cache starts empty.
    d.spawn()?;
    d.wait_serving().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let restarted = d.memory_kib()?;
    // The first write replaces the mapped snapshot with a private copy of the index:
    // the memory of a daemon that takes writes.
    d.upsert_all(&items[..1], 1, 1).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let written = d.memory_kib()?;
    d.stop().await?;
    Ok(Cell {
        n,
        dim,
        precision: prec_name,
        empty_kib: empty.0,
        loaded_kib: loaded.0,
        peak_kib: loaded.2,
        restarted_kib: restarted.0,
        written_kib: written.0,
        index_bytes,
        store_bytes: store,
        other_bytes: all - store,
        ingest_rate: run.rate,
    })
}

pub async fn run(ctx: &Ctx) -> Result<(), String> {
    let args = &ctx.args;
    let mut cells = Vec::new();
    for &n in &args.sizing_n {
        for &dim in &args.sizing_dims {
            eprintln!("sizing: generating {n} x {dim}");
            let items = items(n, dim);
            for p in &args.sizing_precisions {
                let name: &'static str = match p.as_str() {
                    "f32" => "f32",
                    "f16" => "f16",
                    "i8" => "i8",
                    other => return Err(precision(other).unwrap_err()),
                };
                eprintln!("sizing: {n} x {dim} at {name}");
                cells.push(cell(ctx, n, dim, name, &items).await?);
            }
        }
    }
    println!(
        "## Sizing: memory and disk by N, dimension and index precision (one fresh daemon per row; cosine; ids `v<row>`, labels `c<cluster>`, no metadata, no kept inputs; ingest in batches of {} from {} writers)\n",
        args.batch, args.writers
    );
    println!(
        "| N | d | precision | RSS empty | RSS after ingest | peak RSS | RSS after restart | RSS after restart and a write | index memory | store on disk | snapshots on disk | per vector: RSS after a write - empty | index | store | snapshots | ingest, vectors/s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mib = |b: f64| format!("{:.1} MiB", b / (1024.0 * 1024.0));
    for c in &cells {
        let per = |b: f64| format!("{:.0} B", b / c.n as f64);
        let kib = |k: u64| k as f64 * 1024.0;
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} |",
            c.n,
            c.dim,
            c.precision,
            mib(kib(c.empty_kib)),
            mib(kib(c.loaded_kib)),
            mib(kib(c.peak_kib)),
            mib(kib(c.restarted_kib)),
            mib(kib(c.written_kib)),
            mib(c.index_bytes),
            mib(c.store_bytes as f64),
            mib(c.other_bytes as f64),
            per(kib(c.written_kib) - kib(c.empty_kib)),
            per(c.index_bytes),
            per(c.store_bytes as f64),
            per(c.other_bytes as f64),
            c.ingest_rate,
        );
    }
    println!(
        "\nRSS after ingest includes sled's page cache as far as the ingest filled it (bounded by --cache-mb, 32 MiB by default); after a clean restart the index is a mapping of its snapshot, paged in as searches touch it; the first write replaces it with a private copy, so RSS after a restart and a write is what a daemon that takes writes holds (with sled's cache still cold). A raw f32 vector of d components is 4d bytes.\n"
    );
    Ok(())
}
