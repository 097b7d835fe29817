//! Shared test harness: a real server on 127.0.0.1:0 with a temp data dir, shut down
//! gracefully on `stop` (or abruptly when dropped), and data generators.
#![allow(dead_code)]

pub mod corpus;
pub mod store;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use likeness::Config;
use likeness::grpc::pb;
use likeness::grpc::pb::collections_client::CollectionsClient;
use likeness::grpc::pb::items_client::ItemsClient;
use tonic::transport::Channel;

pub struct TestServer {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<likeness::Result<()>>>,
    app: Option<tokio::sync::oneshot::Receiver<Arc<likeness::app::App>>>,
    /// Makes the server re-read its certificate and tokens files.
    pub reloader: likeness::Reloader,
}

impl TestServer {
    /// A server with the shipped ONNX models on a fresh temp dir (kept alive by the
    /// returned guard).
    pub async fn start() -> (TestServer, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let server = TestServer::start_in(dir.path(), |_| {}).await;
        (server, dir)
    }

    /// A server for tests where the model is beside the point: no ONNX model loads;
    /// the fake embedder ("fake", "fake-pair") stands in.
    pub async fn light() -> (TestServer, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let server = TestServer::light_in(dir.path(), |_| {}).await;
        (server, dir)
    }

    /// [`TestServer::light`] on `dir`, with `tweak` applied to the config.
    pub async fn light_in(dir: &Path, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let server = TestServer::launch(dir, tweak, true).await;
        wait_serving(&server.url()).await;
        server
    }

    /// The application behind the server (its core included), once it is SERVING.
    pub async fn app(&mut self) -> Arc<likeness::app::App> {
        self.app
            .take()
            .expect("app() once per server")
            .await
            .unwrap()
    }

    /// A server on `dir`, with `tweak` applied to the default config; returns once it
    /// is SERVING.
    pub async fn start_in(dir: &Path, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let server = TestServer::launch(dir, tweak, false).await;
        wait_serving(&server.url()).await;
        server
    }

    /// Like `light_in`, but returns as soon as the port is bound, while recovery runs.
    pub async fn light_recovering(dir: &Path, tweak: impl FnOnce(&mut Config)) -> TestServer {
        TestServer::launch(dir, tweak, true).await
    }

    async fn launch(dir: &Path, tweak: impl FnOnce(&mut Config), light: bool) -> TestServer {
        let mut config = Config::with_data_dir(dir);
        config.cache_mb = 64;
        config.shutdown_grace_secs = 5;
        if light {
            config.models.clear();
        }
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (app_tx, app_rx) = tokio::sync::oneshot::channel();
        let reloader = likeness::Reloader::new();
        let options = likeness::ServeOptions {
            embedder: light
                .then(|| likeness::embed::EmbedHandle::new(likeness::embed::fake::FakeEmbedder)),
            on_serving: Some(Box::new(move |app| {
                let _ = app_tx.send(app);
            })),
            reloader: Some(reloader.clone()),
        };
        let task = tokio::spawn(likeness::serve_with(listener, config, options, async {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            dir: dir.to_path_buf(),
            stop: Some(tx),
            task: Some(task),
            app: Some(app_rx),
            reloader,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn items(&self) -> ItemsClient<Channel> {
        ItemsClient::connect(self.url())
            .await
            .unwrap()
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(128 << 20)
    }

    pub async fn collections(&self) -> CollectionsClient<Channel> {
        CollectionsClient::connect(self.url()).await.unwrap()
    }

    /// Graceful shutdown: drain, snapshot, flush. Panics if the server failed.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The real binary as a child process (`likeness serve` on 127.0.0.1:0, JSON logs).
pub struct Daemon {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A failed assertion must not leave a daemon running.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary on `dir` with extra flags and env vars; returns once it listens.
pub fn spawn_daemon(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Daemon {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_likeness"));
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--cache-mb",
        "32",
    ])
    .arg("--data-dir")
    .arg(dir)
    .args(args)
    .envs(envs.iter().copied());
    spawn_command(cmd)
}

/// Runs `cmd`, a `likeness serve` that logs JSON, and returns once it listens.
pub fn spawn_command(mut cmd: Command) -> Daemon {
    // Many daemons run at once: each gets its own metrics port unless the test chose one
    // (a flag, or this variable, overrides a config file).
    if !cmd.get_envs().any(|(k, _)| k == "LIKENESS_METRICS_LISTEN") {
        cmd.env("LIKENESS_METRICS_LISTEN", "127.0.0.1:0");
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v["fields"]["message"] == "listening"
            {
                let _ = tx.send(
                    v["fields"]["addr"]
                        .as_str()
                        .unwrap()
                        .parse::<SocketAddr>()
                        .unwrap(),
                );
            }
            sink.lock().unwrap().push(line);
        }
    });
    let addr = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(addr) => addr,
        Err(e) => panic!(
            "daemon never said where it listens ({e}); its log:\n{}",
            log.lock().unwrap().join("\n")
        ),
    };
    Daemon { child, addr, log }
}

/// The address the daemon logged for its plaintext health port (`--health-listen`).
pub fn health_addr(daemon: &Daemon) -> SocketAddr {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let found = daemon.log.lock().unwrap().iter().find_map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            let message = v["fields"]["message"].as_str()?;
            message
                .starts_with("health listening")
                .then(|| v["fields"]["addr"].as_str()?.parse().ok())?
        });
        if let Some(addr) = found {
            return addr;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon never logged its health port"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Health's Check of `service` at `url`: its status, or the call's error code.
pub async fn check_health(url: &str, service: &str) -> Result<i32, tonic::Code> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    HealthClient::new(channel(url).await)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status)
        .map_err(|s| s.code())
}

/// Waits until `service` is SERVING at `url` (60 s at most).
pub async fn wait_for_service(url: &str, service: &str) {
    use tonic_health::pb::health_check_response::ServingStatus;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while check_health(url, service).await != Ok(ServingStatus::Serving as i32) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{service:?} at {url} never became SERVING"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls grpc.health.v1 until likeness.v1.Items is SERVING (10 s at most).
pub async fn wait_serving(url: &str) {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(ch) = Channel::from_shared(url.to_string())
            .unwrap()
            .connect()
            .await
        {
            let mut c = HealthClient::new(ch);
            let r = c
                .check(HealthCheckRequest {
                    service: "likeness.v1.Items".into(),
                })
                .await;
            if let Ok(r) = r
                && r.into_inner().status == ServingStatus::Serving as i32
            {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "server at {url} never became SERVING"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn create(
    c: &mut CollectionsClient<Channel>,
    name: &str,
    dimension: u32,
    metric: pb::Metric,
) -> pb::CollectionInfo {
    c.create_collection(pb::CreateCollectionRequest {
        name: name.into(),
        dimension,
        metric: metric as i32,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}

/// The largest absolute difference between two equally long vectors.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// GetCollection on `server`.
pub async fn collection_info(server: &TestServer, name: &str) -> pb::CollectionInfo {
    server
        .collections()
        .await
        .get_collection(pb::GetCollectionRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
}

pub async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// The health status of one service.
pub async fn health(url: &str, service: &str) -> i32 {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let mut c = HealthClient::new(channel(url).await);
    c.check(HealthCheckRequest {
        service: service.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .status
}

pub fn item(id: &str, label: &str, vector: Vec<f32>) -> pb::Item {
    pb::Item {
        id: id.into(),
        label: label.into(),
        metadata: Default::default(),
        vector,
        input: None,
        generation: 0,
    }
}

pub fn vector_query(v: Vec<f32>) -> Option<pb::Query> {
    Some(pb::Query {
        kind: Some(pb::query::Kind::Vector(pb::Vector { values: v })),
    })
}

pub fn id_query(id: &str) -> Option<pb::Query> {
    Some(pb::Query {
        kind: Some(pb::query::Kind::Id(id.into())),
    })
}

#[allow(unused_imports)]
pub use likeness::synth::{Rng, clustered};

/// A .npy array from the fixtures: its shape and values widened to f64 (u1, i4, i8, f4).
pub fn read_npy(path: &Path) -> (Vec<usize>, Vec<f64>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}", path.display());
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    let descr = header
        .split("'descr': '")
        .nth(1)
        .unwrap()
        .split('\'')
        .next()
        .unwrap();
    let shape: Vec<usize> = header
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap()
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let data = &bytes[10 + header_len..];
    let values = match descr {
        "|u1" => data.iter().map(|b| f64::from(*b)).collect(),
        "<i4" => data
            .chunks_exact(4)
            .map(|c| f64::from(i32::from_le_bytes(c.try_into().unwrap())))
            .collect(),
        "<i8" => data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        "<f4" => data
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())))
            .collect(),
        d => panic!("{}: dtype {d}", path.display()),
    };
    (shape, values)
}

/// The fixture's 28x28 grey images encoded as PNG, as a client would send them.
pub fn fixture_pngs(name: &str) -> Vec<Vec<u8>> {
    fixture_pngs_in("fmnist", name)
}

/// The same from tests/fixtures/`set` (fmnist, cjk).
pub fn fixture_pngs_in(set: &str, name: &str) -> Vec<Vec<u8>> {
    likeness::cli::load::npy_images_as_png(&fixture_path(set, name)).unwrap()
}

fn fixture_path(set: &str, name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(set)
        .join(name)
}

/// An image input.
pub fn image_input(png: &[u8]) -> likeness::grpc::pb::Input {
    likeness::grpc::pb::Input {
        kind: Some(likeness::grpc::pb::input::Kind::Image(png.to_vec())),
        tower: String::new(),
    }
}

/// A query by image.
pub fn input_query(png: &[u8]) -> Option<likeness::grpc::pb::Query> {
    Some(likeness::grpc::pb::Query {
        kind: Some(likeness::grpc::pb::query::Kind::Input(image_input(png))),
    })
}

pub fn fixture(name: &str) -> (Vec<usize>, Vec<f64>) {
    fixture_in("fmnist", name)
}

/// An array of tests/fixtures/`set`.
pub fn fixture_in(set: &str, name: &str) -> (Vec<usize>, Vec<f64>) {
    read_npy(&fixture_path(set, name))
}

/// The model card's figures for the fixture (tests/fixtures/fmnist/expected.json).
pub fn expected() -> serde_json::Value {
    expected_in("fmnist")
}

/// The figures of tests/fixtures/`set`/expected.json.
pub fn expected_in(set: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture_path(set, "expected.json")).unwrap())
        .unwrap()
}

/// Asserts a bad-input case: the status code, and that the message names each needle.
pub fn assert_status(case: &str, err: &tonic::Status, code: tonic::Code, needles: &[&str]) {
    assert_eq!(err.code(), code, "{case}: {}", err.message());
    for n in needles {
        assert!(
            err.message().contains(n),
            "{case}: {:?} lacks {n:?}",
            err.message()
        );
    }
}

/// The item count GetCollection reports.
pub async fn count(
    c: &mut pb::collections_client::CollectionsClient<tonic::transport::Channel>,
    name: &str,
) -> u64 {
    c.get_collection(pb::GetCollectionRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
        .count
}

/// Items.Get: the items that exist among `ids`, in request order.
pub async fn get(
    items: &mut ItemsClient<Channel>,
    collection: &str,
    ids: Vec<String>,
    with_vectors: bool,
) -> Vec<pb::Item> {
    items
        .get(pb::GetRequest {
            collection: collection.into(),
            ids,
            with_vectors,
            with_inputs: false,
        })
        .await
        .unwrap()
        .into_inner()
        .items
}

/// Upserts `vectors` as items `p0`, `p1`, ... labelled `c<cluster>`, 2,000 per request.
pub async fn upsert_clustered(
    items: &mut ItemsClient<Channel>,
    collection: &str,
    vectors: &[Vec<f32>],
    clusters: &[usize],
) {
    for (b, chunk) in vectors.chunks(2000).enumerate() {
        let batch = chunk
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let n = b * 2000 + i;
                item(&format!("p{n}"), &format!("c{}", clusters[n]), v.clone())
            })
            .collect();
        upsert_ok(items, collection, batch).await;
    }
}

/// Upserts `batch` into `collection`; panics unless it is acknowledged.
pub async fn upsert_ok(items: &mut ItemsClient<Channel>, collection: &str, batch: Vec<pb::Item>) {
    items
        .upsert(pb::UpsertRequest {
            collection: collection.into(),
            items: batch,
        })
        .await
        .unwrap();
}

/// The binary as a client of `url`: (exit success, stdout, stderr).
pub async fn cli(url: &str, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_likeness"));
    cmd.arg("--addr").arg(url).args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits until `coll`'s index has been swept for unreachable nodes since its last write
/// (the daemon sweeps once writes go quiet), so that a test sees the graph settled.
pub async fn wait_for_sweep(coll: &likeness::collections::Collection, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    while coll.reach_counts().sweeps == 0 || coll.unswept() > 0 || coll.sweep_due() {
        assert!(
            std::time::Instant::now() < deadline,
            "no sweep after the ingest"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
