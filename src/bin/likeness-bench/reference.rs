//! The references the daemon is measured against, in this process: raw sled (insert +
//! flush) and usearch (add, search) on the same vectors with the same parameters.

use std::time::Instant;

use likeness::grpc::pb;
use likeness::types::{IndexParams, Metric};
use usearch::ffi::{IndexOptions, MetricKind, ScalarKind};

/// A temp dir of its own under the system temp dir.
pub fn temp_dir(tag: &str) -> Result<std::path::PathBuf, String> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "likeness-bench-{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// An item record as likeness's store lays it out (version, ANN key, label, metadata,
/// vector; see src/store/codec.rs), so sled writes the same number of bytes per item.
fn record(key: u64, item: &pb::Item) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + 8 + 4 + item.label.len() + 4 + 4 + item.vector.len() * 4);
    out.push(1);
    out.extend_from_slice(&key.to_le_bytes());
    out.extend_from_slice(&(item.label.len() as u32).to_le_bytes());
    out.extend_from_slice(item.label.as_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // no metadata
    out.extend_from_slice(&(item.vector.len() as u32).to_le_bytes());
    for x in &item.vector {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Raw sled: the same records likeness writes, one batch + flush per `batch` items.
/// Returns vectors/s and this process's CPU seconds.
pub fn raw_sled(items: &[pb::Item], batch: usize) -> Result<(f64, f64), String> {
    let dir = temp_dir("sled")?;
    let db = sled::Config::new()
        .path(&dir)
        .open()
        .map_err(|e| e.to_string())?;
    let tree = db.open_tree("items").map_err(|e| e.to_string())?;
    let cpu = crate::procfs::Meter::start(None);
    let start = Instant::now();
    for (b, chunk) in items.chunks(batch.max(1)).enumerate() {
        let mut wb = sled::Batch::default();
        for (i, it) in chunk.iter().enumerate() {
            wb.insert(it.id.as_bytes(), record((b * batch + i) as u64, it));
        }
        tree.apply_batch(wb).map_err(|e| e.to_string())?;
        db.flush().map_err(|e| e.to_string())?;
    }
    let rate = items.len() as f64 / start.elapsed().as_secs_f64();
    let cpu = cpu.stop().client;
    drop(tree);
    drop(db);
    let _ = std::fs::remove_dir_all(&dir);
    Ok((rate, cpu))
}

fn index_options(dim: usize, metric: Metric, p: IndexParams) -> IndexOptions {
    IndexOptions {
        dimensions: dim,
        // As the daemon maps its metrics (src/index): L2 is searched as squared L2.
        metric: match metric {
            Metric::Cosine => MetricKind::Cos,
            Metric::L2 => MetricKind::L2sq,
            Metric::InnerProduct => MetricKind::IP,
        },
        quantization: ScalarKind::F32,
        connectivity: p.connectivity as usize,
        expansion_add: p.expansion_add as usize,
        expansion_search: p.expansion_search as usize,
        multi: false,
    }
}

/// usearch's own add rate on `threads` threads: the index, vectors/s and CPU seconds.
pub fn usearch_add(
    data: &[Vec<f32>],
    metric: Metric,
    p: IndexParams,
    threads: usize,
) -> Result<(usearch::Index, f64, f64), String> {
    let dim = data.first().map_or(0, Vec::len);
    let index = usearch::Index::new(&index_options(dim, metric, p)).map_err(|e| e.to_string())?;
    index
        .reserve_capacity_and_threads(data.len(), threads)
        .map_err(|e| e.to_string())?;
    let cpu = crate::procfs::Meter::start(None);
    let start = Instant::now();
    let chunk = data.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (t, part) in data.chunks(chunk).enumerate() {
            let index = &index;
            s.spawn(move || {
                for (i, v) in part.iter().enumerate() {
                    index.add((t * chunk + i) as u64, v).expect("usearch add");
                }
            });
        }
    });
    let rate = data.len() as f64 / start.elapsed().as_secs_f64();
    Ok((index, rate, cpu.stop().client))
}

/// `total` single-query searches from `threads` threads, round-robin over `queries`:
/// queries/s and CPU seconds.
pub fn usearch_qps(
    index: &usearch::Index,
    queries: &[Vec<f32>],
    total: usize,
    threads: usize,
) -> (f64, f64) {
    let cpu = crate::procfs::Meter::start(None);
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
    let qps = total as f64 / start.elapsed().as_secs_f64();
    (qps, cpu.stop().client)
}
