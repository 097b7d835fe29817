//! Prometheus metrics at the bottom of the crate: counters and histograms kept in
//! atomics where the work happens (handed down to the store and the embedder), the
//! per-RPC stats, and the text exposition format's helpers (version 0.0.4). It imports
//! nothing of the crate; [`crate::exporter`], above the app, renders the whole daemon
//! on each scrape and serves it on its own port.
//!
//! Names follow Prometheus' conventions: a `likeness_` prefix, base units (`_seconds`,
//! `_bytes`), `_total` on counters. Gauges (items, index memory, queue depths) are read
//! from the core at scrape time rather than kept twice.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    /// Streaming RPCs open now, their bound, and those refused at the bound.
    pub streams: StreamStats,
}

/// The open streams gauge, kept by the transport's stream limit.
#[derive(Debug, Default)]
pub struct StreamStats {
    open: AtomicU64,
    limit: AtomicU64,
    refused: AtomicU64,
}

impl StreamStats {
    pub fn set_limit(&self, n: usize) {
        self.limit.store(n as u64, Ordering::Relaxed);
    }
    pub fn opened(&self) {
        self.open.fetch_add(1, Ordering::Relaxed);
    }
    pub fn closed(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
    pub fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String) {
        header(
            out,
            "likeness_streams_open",
            "gauge",
            "Streaming RPCs open now (each holds one of --max-streams until it ends).",
        );
        sample(out, "likeness_streams_open", &[], self.open() as f64);
        header(
            out,
            "likeness_streams_limit",
            "gauge",
            "The most streaming RPCs served at once (--max-streams).",
        );
        let limit = self.limit.load(Ordering::Relaxed);
        sample(out, "likeness_streams_limit", &[], limit as f64);
        header(
            out,
            "likeness_streams_refused_total",
            "counter",
            "Streams answered RESOURCE_EXHAUSTED because --max-streams were open.",
        );
        let refused = self.refused.load(Ordering::Relaxed);
        sample(out, "likeness_streams_refused_total", &[], refused as f64);
    }
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
        self.streams.render(out);
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
