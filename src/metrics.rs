//! Prometheus metrics: counters and histograms kept in atomics where the work happens,
//! and the text exposition format (version 0.0.4) rendered on each scrape, served on
//! its own port by a tiny HTTP/1.1 responder (GET /metrics).
//!
//! Names follow Prometheus' conventions: a `likeness_` prefix, base units (`_seconds`,
//! `_bytes`), `_total` on counters. Gauges (items, index memory, queue depths) are read
//! from the core at scrape time rather than kept twice.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Upper bounds of the latency buckets, in seconds.
pub const SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Upper bounds of the batch-size buckets.
pub const SIZES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// A histogram with fixed buckets; observations are lock-free.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), plus one for +Inf.
    counts: Vec<AtomicU64>,
    /// The sum, in millionths of the unit.
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn seconds() -> Self {
        Histogram::new(SECONDS)
    }

    pub fn observe(&self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((v.max(0.0) * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Writes `name_bucket`, `name_sum` and `name_count` lines with `labels`.
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut acc = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, c) in self.counts.iter().enumerate() {
            acc += c.load(Ordering::Relaxed);
            let le = match self.bounds.get(i) {
                Some(b) => format!("{b}"),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {acc}");
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = |l: &str| {
            if l.is_empty() {
                String::new()
            } else {
                format!("{{{l}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {acc}", braces(labels));
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::seconds()
    }
}

/// Per RPC method: calls by status code, and latency.
#[derive(Debug)]
pub struct RpcStats {
    /// By gRPC status code, 0 ..= 16.
    pub codes: [AtomicU64; 17],
    pub latency: Histogram,
}

impl Default for RpcStats {
    fn default() -> Self {
        RpcStats {
            codes: std::array::from_fn(|_| AtomicU64::new(0)),
            latency: Histogram::seconds(),
        }
    }
}

/// The metrics the daemon keeps itself (the rest is read from the core on scrape).
#[derive(Debug, Default)]
pub struct Registry {
    /// By full method path, `/likeness.v1.Items/Search`.
    rpcs: Mutex<BTreeMap<String, Arc<RpcStats>>>,
    /// Seconds recovery took, once it finished (f64 bits).
    recovery_seconds: AtomicU64,
    /// Where GET /metrics answers, once bound.
    pub address: std::sync::OnceLock<std::net::SocketAddr>,
}

impl Registry {
    /// The stats of one method (created on first use).
    pub fn rpc(&self, path: &str) -> Arc<RpcStats> {
        let mut rpcs = self.rpcs.lock().expect("metrics lock");
        if let Some(s) = rpcs.get(path) {
            return s.clone();
        }
        let s = Arc::new(RpcStats::default());
        rpcs.insert(path.to_string(), s.clone());
        s
    }

    pub fn set_recovery(&self, d: Duration) {
        self.recovery_seconds
            .store(d.as_secs_f64().to_bits(), Ordering::Relaxed);
    }

    /// The RPC families and recovery time.
    pub fn render_own(&self, out: &mut String) {
        let rpcs: Vec<(String, Arc<RpcStats>)> = self
            .rpcs
            .lock()
            .expect("metrics lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        header(
            out,
            "likeness_rpc_requests_total",
            "counter",
            "RPCs handled, by method and gRPC status code.",
        );
        for (path, s) in &rpcs {
            let (service, method) = split_path(path);
            for (code, n) in s.codes.iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "likeness_rpc_requests_total{{service=\"{service}\",method=\"{method}\",code=\"{}\"}} {n}",
                        code_name(code)
                    );
                }
            }
        }
        header(
            out,
            "likeness_rpc_duration_seconds",
            "histogram",
            "RPC latency, from the request to the end of the response (streams: to their last message).",
        );
        for (path, s) in &rpcs {
            let (service, method) = split_path(path);
            s.latency.render(
                out,
                "likeness_rpc_duration_seconds",
                &format!("service=\"{service}\",method=\"{method}\""),
            );
        }
        header(
            out,
            "likeness_recovery_seconds",
            "gauge",
            "How long start-up recovery of the collections took.",
        );
        let _ = writeln!(
            out,
            "likeness_recovery_seconds {}",
            f64::from_bits(self.recovery_seconds.load(Ordering::Relaxed))
        );
    }
}

/// `/likeness.v1.Items/Search` -> ("likeness.v1.Items", "Search").
fn split_path(path: &str) -> (&str, &str) {
    let p = path.trim_start_matches('/');
    p.split_once('/').unwrap_or((p, ""))
}

/// gRPC's names for its status codes, as Prometheus exporters label them.
pub fn code_name(code: usize) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES.get(code).copied().unwrap_or("UNKNOWN")
}

/// `# HELP` and `# TYPE` lines.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// One sample line, `name{labels} value`.
pub fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    let _ = write!(out, "{name}");
    if !labels.is_empty() {
        let parts: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect();
        let _ = write!(out, "{{{}}}", parts.join(","));
    }
    let _ = writeln!(out, " {value}");
}

/// A histogram with label pairs.
pub fn histogram(out: &mut String, name: &str, labels: &[(&str, &str)], h: &Histogram) {
    let labels: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    h.render(out, name, &labels.join(","));
}

/// Label values escape backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

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
pub fn render(app: &crate::app::App) -> String {
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
    out
}

/// The embedders' families: queue depth, batch sizes, inference time per model.
fn render_embedders(out: &mut String, embedder: &crate::embed::EmbedHandle) {
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
pub fn render_embed_only(own: &Registry, embedder: &crate::embed::EmbedHandle) -> String {
    let mut out = String::with_capacity(4096);
    own.render_own(&mut out);
    render_embedders(&mut out, embedder);
    out
}

/// Binds the metrics port (when configured) and serves `render` there; the bound
/// address goes into `own`. A port that cannot be bound fails the start.
pub async fn start(
    addr: Option<std::net::SocketAddr>,
    own: &Registry,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> crate::error::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let l = TcpListener::bind(addr).await.map_err(|e| {
        crate::error::Error::Io(std::io::Error::new(
            e.kind(),
            format!("metrics listener on {addr}: {e}"),
        ))
    })?;
    let bound = l.local_addr()?;
    let _ = own.address.set(bound);
    tracing::info!(addr = %bound, "metrics at GET /metrics");
    Ok(Some(tokio::spawn(serve(l, render))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[1.0, 2.0]);
        for v in [0.5, 1.5, 1.5, 9.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"2\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_sum{a=\"b\"} 12.5\n"), "{out}");
        assert!(out.contains("x_count{a=\"b\"} 4\n"), "{out}");
    }
}
