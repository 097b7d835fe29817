//! The Prometheus endpoint (issue 8): scraped over HTTP and read with Prometheus' own
//! text parser (prometheus-client's, from deploy/tools.sh), after RPCs whose counts
//! and codes the test knows.

use std::collections::HashMap;
use std::net::SocketAddr;

use likeness::grpc::pb;
use likeness::grpc::pb::miner_client::MinerClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;

use crate::common::*;

/// A parsed scrape: (sample name, sorted labels) -> value.
type Samples = HashMap<(String, Vec<(String, String)>), f64>;
/// What the parser script prints per sample.
type Row = (String, Vec<(String, String)>, f64);

async fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

/// Every sample as (name, sorted labels) -> value, through prometheus-client's parser:
/// it fails on anything that is not valid exposition text.
fn parse(text: &str) -> Samples {
    let tools = std::env::var("LIKENESS_TOOLS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap())
                .join(".cache/likeness/deploy-tools")
        });
    let python = tools.join("bin/python");
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append([s.name, sorted(s.labels.items()), s.value])
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new(&python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run deploy/tools.sh once (CI's .ci/run does)",
                python.display()
            )
        });
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused the scrape: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Row> = serde_json::from_slice(&out.stdout).unwrap();
    rows.into_iter().map(|(n, l, v)| ((n, l), v)).collect()
}

fn value(m: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut l: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    l.sort();
    *m.get(&(name.to_string(), l.clone()))
        .unwrap_or_else(|| panic!("no sample {name}{l:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text_and_count_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::light_in(dir.path(), |c| {
        c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let app = server.app().await;
    let addr = *app.metrics().address.get().expect("metrics bound");

    let mut colls = server.collections().await;
    create(&mut colls, "m", 8, pb::Metric::Cosine).await;
    let mut items = server.items().await;
    let mut rng = likeness::rng::Rng::new(1);
    items
        .upsert(pb::UpsertRequest {
            collection: "m".into(),
            items: (0..100)
                .map(|i| {
                    item(
                        &format!("i{i}"),
                        &format!("c{}", i % 4),
                        (0..8).map(|_| rng.normal()).collect(),
                    )
                })
                .collect(),
        })
        .await
        .unwrap();
    let search = |collection: &str| pb::SearchRequest {
        collection: collection.into(),
        query: id_query("i1"),
        k: 3,
        ..Default::default()
    };
    for _ in 0..3 {
        items.search(search("m")).await.unwrap();
    }
    for _ in 0..2 {
        assert_eq!(
            items.search(search("nope")).await.unwrap_err().code(),
            tonic::Code::NotFound
        );
    }
    let mut miner = MinerClient::new(channel(&server.url()).await);
    let mut stream = miner
        .mine_triplets(pb::MineRequest {
            collection: "m".into(),
            strategy: pb::Strategy::Hard as i32,
            batch_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut triplets = 0;
    while let Some(b) = stream.next().await {
        triplets += b.unwrap().triplets.len();
    }

    let (head, body) = http_get(addr, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let m = parse(&body);
    // The stream bound and the reachability sweep (issue 20) are exported.
    assert_eq!(value(&m, "likeness_streams_limit", &[]), 2048.0);
    assert_eq!(value(&m, "likeness_streams_open", &[]), 0.0);
    let _ = value(&m, "likeness_index_stash_keys", &[("collection", "m")]);
    let rpc = |method: &str, code: &str| {
        value(
            &m,
            "likeness_rpc_requests_total",
            &[
                ("service", "likeness.v1.Items"),
                ("method", method),
                ("code", code),
            ],
        )
    };
    assert_eq!(rpc("Search", "OK"), 3.0);
    assert_eq!(rpc("Search", "NOT_FOUND"), 2.0);
    assert_eq!(rpc("Upsert", "OK"), 1.0);
    // The stream counts once it has ended, with its trailers' code.
    assert_eq!(
        value(
            &m,
            "likeness_rpc_requests_total",
            &[
                ("service", "likeness.v1.Miner"),
                ("method", "MineTriplets"),
                ("code", "OK")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            &m,
            "likeness_rpc_duration_seconds_count",
            &[("service", "likeness.v1.Items"), ("method", "Search")]
        ),
        5.0
    );
    assert_eq!(
        value(&m, "likeness_collection_items", &[("collection", "m")]),
        100.0
    );
    assert!(value(&m, "likeness_index_memory_bytes", &[("collection", "m")]) > 0.0);
    assert_eq!(
        value(&m, "likeness_mine_triplets_total", &[]),
        triplets as f64
    );
    assert_eq!(value(&m, "likeness_mine_anchors_total", &[]), 100.0);
    assert!(value(&m, "likeness_commit_flushes_total", &[]) >= 1.0);
    assert!(value(&m, "likeness_commit_flush_duration_seconds_count", &[]) >= 1.0);
    assert!(value(&m, "likeness_recovery_seconds", &[]) >= 0.0);

    // Every series the Grafana dashboard queries is one the daemon exports.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/grafana/likeness.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let exported: std::collections::HashSet<&str> =
        m.keys().map(|(name, _)| name.as_str()).collect();
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (at, _) in expr.match_indices("likeness_") {
                let name: String = expr[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                // A family may have no samples yet (no model loaded): its TYPE line counts.
                let histogram = ["_bucket", "_sum", "_count"].iter().any(|sfx| {
                    name.strip_suffix(sfx)
                        .is_some_and(|base| body.contains(&format!("# TYPE {base} histogram\n")))
                });
                let typed = body.contains(&format!("# TYPE {name} "));
                assert!(
                    exported.contains(name.as_str()) || histogram || typed,
                    "the dashboard queries {name}, which /metrics lacks"
                );
                queried += 1;
            }
        }
    }
    assert!(queried >= 10, "{queried} series in the dashboard");

    // Anything but GET /metrics is a 404.
    let (head, _) = http_get(addr, "/other").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}

/// Issue 20, fault 1: the default metrics port was 9090, a Prometheus server's own, and
/// a second daemon (or Prometheus) on the host made the start fail. The default is now
/// outside Prometheus's allocations, and a daemon whose default is taken serves its
/// metrics on a free port; an address asked for by name still fails the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_default_metrics_port_does_not_stop_the_daemon() {
    let resolved = likeness::Config::resolve(&likeness::config::ServeArgs::default()).unwrap();
    let default = resolved.metrics_listen.expect("metrics on by default");
    assert!(resolved.metrics_fallback);
    assert!(
        default.port() != 9090 && !(9100..=9999).contains(&default.port()),
        "{default} is Prometheus's"
    );
    // Whoever holds it (this test, or another program), the port is taken.
    let _holder = tokio::net::TcpListener::bind(default).await;

    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::light_in(dir.path(), |c| {
        c.metrics_listen = Some(default);
        c.metrics_fallback = true;
    })
    .await;
    let app = server.app().await;
    let bound = *app.metrics().address.get().expect("metrics bound");
    assert_ne!(bound, default);
    assert_eq!(bound.ip(), default.ip());
    let (head, body) = http_get(bound, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.contains("likeness_rpc_requests_total"), "{body}");
    server.stop().await;

    // Asked for by name, a taken port is an error that names it.
    let dir = tempfile::tempdir().unwrap();
    let mut config = likeness::Config::with_data_dir(dir.path());
    config.metrics_listen = Some(default);
    config.metrics_fallback = false;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = likeness::serve(listener, config, std::future::pending())
        .await
        .expect_err("a taken metrics port named by the user fails the start");
    assert!(err.to_string().contains("metrics listener on"), "{err}");
}
