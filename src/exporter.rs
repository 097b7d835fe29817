//! The metrics exporter: GET /metrics on its own port, and the whole daemon's exposition
//! read on scrape from the app (collections, embedders, group commit, mining). It sits
//! above the app; the counters and histograms it reads live in [`crate::metrics`], at
//! the bottom, handed down to the store and the embedder.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::app::App;
use crate::collections::WritePhase;
use crate::embed::EmbedHandle;
use crate::metrics::{Registry, header, histogram, sample};

/// Serves `render()` at GET /metrics on `listener` until the task is dropped. One
/// request per connection; anything else gets 404. Requests are read with a deadline,
/// so a stalled client cannot hold a task forever.
pub async fn serve(listener: TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1024);
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let line = String::from_utf8_lossy(&buf);
            let target = line.split_whitespace().nth(1).unwrap_or("");
            let ok = line.starts_with("GET ")
                && (target == "/metrics" || target.starts_with("/metrics?"));
            let (status, ctype, body) = if ok {
                (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    render(),
                )
            } else {
                ("404 Not Found", "text/plain", "GET /metrics\n".to_string())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

/// The whole exposition: the daemon's own families, then what the core knows now
/// (collections, embedders, group commit, mining).
pub fn render(app: &App) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = String::with_capacity(8192);
    app.metrics().render_own(&mut out);

    let registry = app.registry();
    let colls: Vec<_> = if registry.is_ready() {
        registry
            .list()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|info| registry.collection(&info.spec.name).ok())
            .collect()
    } else {
        Vec::new()
    };
    header(
        &mut out,
        "likeness_collection_items",
        "gauge",
        "Items stored per collection.",
    );
    for c in &colls {
        sample(
            &mut out,
            "likeness_collection_items",
            &[("collection", c.name())],
            c.len() as f64,
        );
    }
    // The reachability sweeps (issue 20): keys checked, found unreachable, re-linked,
    // stashed; the stash is searched exactly beside the graph.
    let reach: Vec<_> = colls.iter().map(|c| (c.name(), c.reach_counts())).collect();
    type Pick = fn(&crate::index::reach::ReachCounts) -> u64;
    let families: [(&str, &str, &str, Pick); 5] = [
        (
            "likeness_index_reach_checked_total",
            "counter",
            "Keys whose own search a sweep checked.",
            |r| r.checked,
        ),
        (
            "likeness_index_unreachable_total",
            "counter",
            "Keys a search for their own vector could not reach when checked.",
            |r| r.unreachable,
        ),
        (
            "likeness_index_relinked_total",
            "counter",
            "Unreachable keys that a re-insertion made reachable.",
            |r| r.repaired,
        ),
        (
            "likeness_index_stashed_total",
            "counter",
            "Unreachable keys put in the exact stash.",
            |r| r.stashed,
        ),
        (
            "likeness_index_stash_keys",
            "gauge",
            "Keys in the exact stash now, scanned by every search.",
            |r| r.in_stash,
        ),
    ];
    for (name, kind, help, pick) in families {
        header(&mut out, name, kind, help);
        for (coll, r) in &reach {
            sample(&mut out, name, &[("collection", coll)], pick(r) as f64);
        }
    }
    header(
        &mut out,
        "likeness_index_memory_bytes",
        "gauge",
        "Memory of each collection's HNSW index.",
    );
    for c in &colls {
        sample(
            &mut out,
            "likeness_index_memory_bytes",
            &[("collection", c.name())],
            c.index_memory_bytes() as f64,
        );
    }
    header(
        &mut out,
        "likeness_search_expanded_total",
        "counter",
        "Searches whose HNSW expansion grew because a filter starved it.",
    );
    for c in &colls {
        sample(
            &mut out,
            "likeness_search_expanded_total",
            &[("collection", c.name())],
            c.search_stats().expanded.load(Relaxed) as f64,
        );
    }
    header(
        &mut out,
        "likeness_search_fallbacks_total",
        "counter",
        "Searches answered by brute force after the expansion grew.",
    );
    for c in &colls {
        sample(
            &mut out,
            "likeness_search_fallbacks_total",
            &[("collection", c.name())],
            c.search_stats().fallbacks.load(Relaxed) as f64,
        );
    }

    header(
        &mut out,
        "likeness_write_phase_seconds",
        "histogram",
        "Where each write's time went, by phase: writer (waiting for the collection's writer), store (the batch written, not yet durable), commit (the group commit; plain writes), index (HNSW insertion), turn (waiting for earlier batches to publish), catalogue (waiting for the catalogue's write lock).",
    );
    for c in &colls {
        for phase in WritePhase::ALL {
            histogram(
                &mut out,
                "likeness_write_phase_seconds",
                &[("collection", c.name()), ("phase", phase.name())],
                c.write_stats().phase(phase),
            );
        }
    }
    header(
        &mut out,
        "likeness_mine_knn_queries_total",
        "counter",
        "The miner's kNN queries, by path: plain (exclusions applied after a plain HNSW search) or filtered (a filtered walk, when the plain one came up short or keeps doing so).",
    );
    for c in &colls {
        let s = c.search_stats();
        for (path, n) in [("plain", &s.knn_plain), ("filtered", &s.knn_filtered)] {
            sample(
                &mut out,
                "likeness_mine_knn_queries_total",
                &[("collection", c.name()), ("path", path)],
                n.load(Relaxed) as f64,
            );
        }
    }

    header(
        &mut out,
        "likeness_commit_flushes_total",
        "counter",
        "Group-commit flushes of the store (concurrent writers share one).",
    );
    sample(
        &mut out,
        "likeness_commit_flushes_total",
        &[],
        registry.flushes() as f64,
    );
    header(
        &mut out,
        "likeness_commit_flush_duration_seconds",
        "histogram",
        "How long each group-commit flush took.",
    );
    histogram(
        &mut out,
        "likeness_commit_flush_duration_seconds",
        &[],
        registry.flush_latency(),
    );
    header(
        &mut out,
        "likeness_storage_writable",
        "gauge",
        "1 while the store accepts writes; 0 after a write failed (disk full, I/O error) until the storage probe finds the data dir writable again. Reads go on either way.",
    );
    sample(
        &mut out,
        "likeness_storage_writable",
        &[],
        if registry.storage_writable() {
            1.0
        } else {
            0.0
        },
    );
    header(
        &mut out,
        "likeness_storage_failures_total",
        "counter",
        "Times writes to the store started failing.",
    );
    sample(
        &mut out,
        "likeness_storage_failures_total",
        &[],
        registry.storage_failures() as f64,
    );

    render_embedders(&mut out, app.embedder());

    let m = app.miner().counters();
    header(
        &mut out,
        "likeness_mine_streams",
        "gauge",
        "Mining streams and sessions running now.",
    );
    sample(
        &mut out,
        "likeness_mine_streams",
        &[],
        m.active.load(Relaxed) as f64,
    );
    header(
        &mut out,
        "likeness_mine_anchors_total",
        "counter",
        "Anchors mined.",
    );
    sample(
        &mut out,
        "likeness_mine_anchors_total",
        &[],
        m.anchors.load(Relaxed) as f64,
    );
    header(
        &mut out,
        "likeness_mine_triplets_total",
        "counter",
        "Triplets and pairs sent to trainers.",
    );
    sample(
        &mut out,
        "likeness_mine_triplets_total",
        &[],
        m.triplets.load(Relaxed) as f64,
    );
    header(
        &mut out,
        "likeness_mine_batches_total",
        "counter",
        "Mining messages sent to trainers.",
    );
    sample(
        &mut out,
        "likeness_mine_batches_total",
        &[],
        m.batches.load(Relaxed) as f64,
    );
    header(
        &mut out,
        "likeness_mine_jobs_waiting",
        "gauge",
        "Mining jobs whose read-ahead is full, waiting for their trainer to read.",
    );
    sample(
        &mut out,
        "likeness_mine_jobs_waiting",
        &[],
        m.waiting.load(Relaxed) as f64,
    );
    out
}

/// The embedders' families: queue depth, batch sizes, inference time per model.
fn render_embedders(out: &mut String, embedder: &EmbedHandle) {
    use std::sync::atomic::Ordering::Relaxed;
    let models = embedder.batch_stats();
    header(
        out,
        "likeness_embed_queue_depth",
        "gauge",
        "Inputs admitted to a model's queue and not yet answered.",
    );
    for (name, s) in &models {
        sample(
            out,
            "likeness_embed_queue_depth",
            &[("model", name)],
            s.queued.load(Relaxed).max(0) as f64,
        );
    }
    header(
        out,
        "likeness_embed_batch_size",
        "histogram",
        "Inputs per inference batch.",
    );
    for (name, s) in &models {
        histogram(
            out,
            "likeness_embed_batch_size",
            &[("model", name)],
            &s.sizes,
        );
    }
    header(
        out,
        "likeness_embed_inference_seconds",
        "histogram",
        "Time per inference batch.",
    );
    for (name, s) in &models {
        histogram(
            out,
            "likeness_embed_inference_seconds",
            &[("model", name)],
            &s.inference,
        );
    }
}

/// What an embed-only daemon has: its RPCs and its embedders.
pub fn render_embed_only(own: &Registry, embedder: &EmbedHandle) -> String {
    let mut out = String::with_capacity(4096);
    own.render_own(&mut out);
    render_embedders(&mut out, embedder);
    out
}

/// Binds the metrics port (when configured) and serves `render` there; the bound
/// address goes into `own`. A port that cannot be bound fails the start, unless it is
/// the default (`fallback`): another daemon, or a Prometheus exporter, may hold it on this
/// host, and metrics then go to a free port on the same interface, logged.
pub async fn start(
    addr: Option<std::net::SocketAddr>,
    fallback: bool,
    own: &Registry,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> crate::error::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let l = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) if fallback && e.kind() == std::io::ErrorKind::AddrInUse => {
            let free = std::net::SocketAddr::new(addr.ip(), 0);
            let l = TcpListener::bind(free).await?;
            tracing::warn!(default = %addr, addr = %l.local_addr()?, "the default metrics port is taken; serving metrics on a free port (set --metrics-listen to choose)");
            l
        }
        Err(e) => {
            return Err(crate::error::Error::Io(std::io::Error::new(
                e.kind(),
                format!("metrics listener on {addr}: {e}"),
            )));
        }
    };
    let bound = l.local_addr()?;
    let _ = own.address.set(bound);
    tracing::info!(addr = %bound, "metrics at GET /metrics");
    Ok(Some(tokio::spawn(serve(l, render))))
}
