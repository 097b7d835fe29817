//! The daemon under test: a `likeness serve` child process on 127.0.0.1, a free port and
//! a temp data dir, reached only over gRPC (the generated stubs); and the loads the bench
//! puts on it. Its CPU time and memory come from /proc (see procfs.rs).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use likeness::cli::ConnectArgs;
use likeness::grpc::client::Channel;
use likeness::grpc::pb;
use likeness::grpc::pb::collections_client::CollectionsClient;
use likeness::grpc::pb::embedder_client::EmbedderClient;
use likeness::grpc::pb::items_client::ItemsClient;

use crate::procfs::{Cpu, Meter};

/// The collection every part uses.
pub const COLLECTION: &str = "bench";
/// Queries per SearchBatch call in the batched figure.
pub const BATCH_QUERIES: usize = 16;
/// How long a start or a restart may take before the bench gives up (a rebuild of a
/// large collection takes a while on 2 cores).
const START_LIMIT: Duration = Duration::from_secs(900);

/// How to run the daemon: its executable and the `serve` flags besides --listen and
/// --data-dir; and how to reach it (TLS and a token, for a daemon started with
/// `--daemon-arg=--tls-cert=...` and the like).
#[derive(Debug)]
pub struct Spec {
    pub exe: PathBuf,
    pub flags: Vec<String>,
    pub conn: ConnectArgs,
}

/// A running (or stopped) daemon and its data dir; the process is killed and the dir
/// removed on drop.
pub struct Daemon {
    spec: Arc<Spec>,
    pub url: String,
    /// Holds data/ (the daemon's --data-dir) and one log file per spawn.
    dir: PathBuf,
    child: Option<Child>,
    spawns: usize,
    /// The metrics port of the latest spawn (GET /metrics), unless the flags set their
    /// own --metrics-listen.
    metrics: Option<u16>,
}

/// One timed run of a load: units (queries, vectors, images) per second, per-call
/// latency, and CPU seconds of daemon and clients.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub rate: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub cpu: Cpu,
    pub units: usize,
}

impl Run {
    /// (daemon, client) CPU microseconds per unit.
    pub fn cpu_us(&self) -> (f64, f64) {
        self.cpu.per(self.units)
    }

    fn new(units: usize, elapsed: Duration, mut lat: Vec<Duration>, cpu: Cpu) -> Run {
        lat.sort();
        let p = |q: f64| {
            lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        Run {
            rate: units as f64 / elapsed.as_secs_f64(),
            p50: p(0.5),
            p99: p(0.99),
            cpu,
            units,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Rpc {
    Search,
    /// Search with this `expansion` (HNSW ef).
    SearchAt(u32),
    SearchBatch,
    /// GetCollection: a call that does no work, the fixed cost of a gRPC call.
    Trivial,
}

pub fn status(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// A channel to the daemon at `url`, with the bench's TLS and token flags.
pub async fn connect(spec: &Spec, url: &str) -> Result<Channel, String> {
    spec.conn.connect(url).await
}

pub fn items_client(ch: Channel) -> ItemsClient<Channel> {
    ItemsClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

pub fn search_request(q: Vec<f32>) -> pb::SearchRequest {
    search_request_at(q, 0)
}

/// A k = 10 Search at HNSW ef `expansion` (0: the collection's).
pub fn search_request_at(q: Vec<f32>, expansion: u32) -> pb::SearchRequest {
    pb::SearchRequest {
        collection: COLLECTION.into(),
        query: Some(vector_query(q)),
        k: 10,
        expansion,
        ..Default::default()
    }
}

fn vector_query(values: Vec<f32>) -> pb::Query {
    pb::Query {
        kind: Some(pb::query::Kind::Vector(pb::Vector { values })),
    }
}

/// A port nobody listens on now. The daemon binds it a moment later; should another
/// process take it in between, the start fails and is retried on another port.
fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

impl Daemon {
    /// Spawns the daemon on a fresh temp data dir and waits until it is SERVING.
    pub async fn start(spec: &Arc<Spec>) -> Result<Daemon, String> {
        let mut d = Daemon {
            spec: spec.clone(),
            url: String::new(),
            dir: crate::reference::temp_dir("daemon")?,
            child: None,
            spawns: 0,
            metrics: None,
        };
        let mut tries = 0;
        loop {
            d.spawn()?;
            match d.wait_serving().await {
                Ok(_) => return Ok(d),
                // A port taken between free_port and the daemon's bind: try another.
                Err(e) if tries < 3 && e.contains("cannot listen") => tries += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// How this daemon runs and is reached.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn log_path(&self, spawn: usize) -> PathBuf {
        self.dir.join(format!("daemon-{spawn}.log"))
    }

    /// The log of the latest spawn, without the colour codes of the human log format.
    pub fn log(&self) -> String {
        let log = std::fs::read_to_string(self.log_path(self.spawns.saturating_sub(1)))
            .unwrap_or_default();
        let mut out = String::with_capacity(log.len());
        let mut chars = log.chars();
        while let Some(c) = chars.next() {
            if c == '\x1b' {
                // ESC [ parameters final-letter
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Starts the process on this daemon's data dir and a new free port; returns at once.
    pub fn spawn(&mut self) -> Result<(), String> {
        if self.child.is_some() {
            return Err("the daemon is already running".into());
        }
        let port = free_port()?;
        let log = std::fs::File::create(self.log_path(self.spawns)).map_err(|e| e.to_string())?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        self.spawns += 1;
        let mut cmd = Command::new(&self.spec.exe);
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(self.dir.join("data"));
        // A metrics port of its own, so that two daemons (or a daemon and a test) never
        // contend for the default 20151.
        self.metrics = None;
        if !self
            .spec
            .flags
            .iter()
            .any(|f| f.starts_with("--metrics-listen"))
        {
            let metrics = free_port()?;
            cmd.arg("--metrics-listen")
                .arg(format!("127.0.0.1:{metrics}"));
            self.metrics = Some(metrics);
        }
        let child = cmd
            .args(&self.spec.flags)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.spec.exe.display()))?;
        self.child = Some(child);
        self.url = format!("http://127.0.0.1:{port}");
        Ok(())
    }

    /// An error if the process has exited.
    fn check_alive(&mut self) -> Result<(), String> {
        let Some(child) = self.child.as_mut() else {
            return Err("the daemon is not running".into());
        };
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            self.child = None;
            return Err(format!(
                "the daemon exited ({st}); the end of its log:\n{}",
                self.log_tail()
            ));
        }
        Ok(())
    }

    /// Polls grpc.health.v1 until likeness.v1.Items is SERVING; returns how long it took.
    pub async fn wait_serving(&mut self) -> Result<Duration, String> {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let start = Instant::now();
        let mut health = None;
        loop {
            self.check_alive()?;
            if health.is_none() {
                health = connect(&self.spec, &self.url)
                    .await
                    .ok()
                    .map(HealthClient::new);
            }
            if let Some(h) = health.as_mut()
                && let Ok(r) = h
                    .check(HealthCheckRequest {
                        service: "likeness.v1.Items".into(),
                    })
                    .await
                && r.into_inner().status == ServingStatus::Serving as i32
            {
                return Ok(start.elapsed());
            }
            if start.elapsed() > START_LIMIT {
                return Err(format!(
                    "the daemon was not SERVING after {START_LIMIT:?}; its log:\n{}",
                    self.log_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Spawns the daemon and polls Search (a short retry loop) until it answers; returns
    /// the time from spawn to that first answer.
    pub async fn cold_start(&mut self, query: &[f32]) -> Result<Duration, String> {
        let mut tries = 0;
        'spawn: loop {
            let start = Instant::now();
            self.spawn()?;
            let mut client = None;
            let mut last = String::new();
            loop {
                if let Err(e) = self.check_alive() {
                    if tries < 3 && e.contains("cannot listen") {
                        tries += 1;
                        continue 'spawn;
                    }
                    return Err(e);
                }
                if client.is_none() {
                    client = connect(&self.spec, &self.url).await.ok().map(items_client);
                }
                if let Some(c) = client.as_mut() {
                    match c.search(search_request(query.to_vec())).await {
                        Ok(_) => return Ok(start.elapsed()),
                        Err(s) => last = status(s),
                    }
                }
                if start.elapsed() > START_LIMIT {
                    return Err(format!(
                        "no Search answered within {START_LIMIT:?} of the spawn (last: {last})"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }

    /// SIGTERM, then waits for the exit: a clean shutdown that saves index snapshots.
    /// Returns how long the shutdown took.
    pub async fn terminate(&mut self) -> Result<Duration, String> {
        let Some(pid) = self.pid() else {
            return Ok(Duration::ZERO);
        };
        let start = Instant::now();
        // std can only SIGKILL; kill(1) sends the SIGTERM without a libc binding.
        let st = Command::new("kill")
            .args(["-s", "TERM", &pid.to_string()])
            .status()
            .map_err(|e| format!("kill -s TERM {pid}: {e}"))?;
        if !st.success() {
            return Err(format!("kill -s TERM {pid}: {st}"));
        }
        loop {
            let child = self.child.as_mut().expect("running");
            if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
                self.child = None;
                if !st.success() {
                    return Err(format!(
                        "the daemon exited with {st} after SIGTERM; its log:\n{}",
                        self.log_tail()
                    ));
                }
                return Ok(start.elapsed());
            }
            if start.elapsed() > Duration::from_secs(120) {
                self.kill();
                return Err("the daemon did not exit within 120 s of SIGTERM".into());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// SIGKILL: a crash. The store has every acknowledged write; the index does not.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn items(&self) -> Result<ItemsClient<Channel>, String> {
        Ok(items_client(connect(&self.spec, &self.url).await?))
    }

    async fn collections(&self) -> Result<CollectionsClient<Channel>, String> {
        Ok(CollectionsClient::new(
            connect(&self.spec, &self.url).await?,
        ))
    }

    pub async fn create(&self, dim: usize, metric: pb::Metric) -> Result<(), String> {
        self.create_at(dim, metric, pb::Precision::F32).await
    }

    /// The bench collection with its index at `precision`.
    pub async fn create_at(
        &self,
        dim: usize,
        metric: pb::Metric,
        precision: pb::Precision,
    ) -> Result<(), String> {
        self.collections()
            .await?
            .create_collection(pb::CreateCollectionRequest {
                name: COLLECTION.into(),
                dimension: dim as u32,
                metric: metric as i32,
                precision: precision as i32,
                ..Default::default()
            })
            .await
            .map_err(status)?;
        Ok(())
    }

    /// Creates the collection and upserts every item in batches of `batch` from
    /// `writers` concurrent clients; the rate is acknowledged vectors/s.
    pub async fn ingest(
        &self,
        data: &crate::data::Data,
        batch: usize,
        writers: usize,
    ) -> Result<Run, String> {
        self.create(data.dim, data.pb_metric()).await?;
        self.upsert_all(&data.items, batch, writers).await
    }

    /// Upserts `items` into the existing bench collection in batches of `batch` from
    /// `writers` concurrent clients; the rate is acknowledged vectors/s.
    pub async fn upsert_all(
        &self,
        items: &[pb::Item],
        batch: usize,
        writers: usize,
    ) -> Result<Run, String> {
        let batches: Vec<Vec<pb::Item>> = items.chunks(batch.max(1)).map(<[_]>::to_vec).collect();
        let next = Arc::new(AtomicUsize::new(0));
        let batches = Arc::new(batches);
        let mut clients = Vec::new();
        for _ in 0..writers.max(1) {
            clients.push(self.items().await?);
        }
        let cpu = Meter::start(self.pid());
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for mut client in clients {
            let (next, batches) = (next.clone(), batches.clone());
            tasks.spawn(async move {
                let mut lat = Vec::new();
                loop {
                    let Some(items) = batches.get(next.fetch_add(1, Ordering::Relaxed)) else {
                        return Ok::<_, String>(lat);
                    };
                    let t = Instant::now();
                    client
                        .upsert(pb::UpsertRequest {
                            collection: COLLECTION.into(),
                            items: items.clone(),
                        })
                        .await
                        .map_err(status)?;
                    lat.push(t.elapsed());
                }
            });
        }
        let mut lat = Vec::new();
        while let Some(r) = tasks.join_next().await {
            lat.extend(r.map_err(|e| e.to_string())??);
        }
        Ok(Run::new(items.len(), start.elapsed(), lat, cpu.stop()))
    }

    /// Recall@10 of Search over gRPC against `truth`.
    pub async fn recall(&self, queries: &[Vec<f32>], truth: &[Vec<usize>]) -> Result<f64, String> {
        self.recall_at(queries, truth, 0).await
    }

    /// Recall@10 of Search at HNSW ef `expansion` over gRPC against `truth`.
    pub async fn recall_at(
        &self,
        queries: &[Vec<f32>],
        truth: &[Vec<usize>],
        expansion: u32,
    ) -> Result<f64, String> {
        let mut client = self.items().await?;
        let mut found = Vec::with_capacity(queries.len());
        for q in queries {
            let hits = client
                .search(search_request_at(q.clone(), expansion))
                .await
                .map_err(status)?
                .into_inner()
                .hits;
            found.push(
                hits.iter()
                    .filter_map(|h| h.id.get(1..).and_then(|n| n.parse::<usize>().ok()))
                    .collect::<Vec<_>>(),
            );
        }
        Ok(crate::data::recall(truth, |q| found[q].clone()))
    }

    /// `total` queries (calls of `rpc`) from `clients` concurrent clients, round-robin
    /// over `queries`.
    pub async fn search_qps(
        &self,
        queries: &Arc<Vec<Vec<f32>>>,
        total: usize,
        clients: usize,
        rpc: Rpc,
    ) -> Result<Run, String> {
        let mut conns = Vec::new();
        for _ in 0..clients {
            conns.push((self.items().await?, self.collections().await?));
        }
        let cpu = Meter::start(self.pid());
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for (c, (mut items, mut colls)) in conns.into_iter().enumerate() {
            let queries = queries.clone();
            tasks.spawn(async move {
                let step = match rpc {
                    Rpc::SearchBatch => BATCH_QUERIES,
                    Rpc::Search | Rpc::SearchAt(_) | Rpc::Trivial => 1,
                };
                let mut lat = Vec::with_capacity(total / clients + 1);
                let mut i = c * step;
                while i < total {
                    let t = Instant::now();
                    match rpc {
                        Rpc::Search => {
                            items
                                .search(search_request(queries[i % queries.len()].clone()))
                                .await
                                .map_err(status)?;
                        }
                        Rpc::SearchAt(ef) => {
                            items
                                .search(search_request_at(queries[i % queries.len()].clone(), ef))
                                .await
                                .map_err(status)?;
                        }
                        Rpc::SearchBatch => {
                            let qs = (i..i + step)
                                .map(|j| vector_query(queries[j % queries.len()].clone()))
                                .collect();
                            items
                                .search_batch(pb::SearchBatchRequest {
                                    collection: COLLECTION.into(),
                                    queries: qs,
                                    k: 10,
                                    ..Default::default()
                                })
                                .await
                                .map_err(status)?;
                        }
                        Rpc::Trivial => {
                            colls
                                .get_collection(pb::GetCollectionRequest {
                                    name: COLLECTION.into(),
                                })
                                .await
                                .map_err(status)?;
                        }
                    }
                    lat.push(t.elapsed());
                    i += clients * step;
                }
                Ok::<_, String>(lat)
            });
        }
        let mut lat = Vec::with_capacity(total);
        while let Some(r) = tasks.join_next().await {
            lat.extend(r.map_err(|e| e.to_string())??);
        }
        Ok(Run::new(total, start.elapsed(), lat, cpu.stop()))
    }

    /// `images` inputs embedded in requests of `batch` from `clients` concurrent clients
    /// (images/s; latency per request).
    pub async fn embed_rate(
        &self,
        model: &str,
        inputs: &Arc<Vec<pb::Input>>,
        images: usize,
        batch: usize,
        clients: usize,
    ) -> Result<Run, String> {
        let requests = images.div_ceil(batch);
        let mut conns = Vec::new();
        for _ in 0..clients {
            conns.push(
                EmbedderClient::new(connect(&self.spec, &self.url).await?)
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(64 << 20),
            );
        }
        let cpu = Meter::start(self.pid());
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for (c, mut client) in conns.into_iter().enumerate() {
            let pool = inputs.clone();
            let model = model.to_string();
            tasks.spawn(async move {
                let mut lat = Vec::new();
                let mut r = c;
                while r < requests {
                    let inputs = (0..batch)
                        .map(|i| pool[(r * batch + i) % pool.len()].clone())
                        .collect();
                    let t = Instant::now();
                    client
                        .embed(pb::EmbedRequest {
                            model: model.clone(),
                            inputs,
                        })
                        .await
                        .map_err(status)?;
                    lat.push(t.elapsed());
                    r += clients;
                }
                Ok::<_, String>(lat)
            });
        }
        let mut lat = Vec::new();
        while let Some(r) = tasks.join_next().await {
            lat.extend(r.map_err(|e| e.to_string())??);
        }
        Ok(Run::new(requests * batch, start.elapsed(), lat, cpu.stop()))
    }

    /// For `secs`: `search` = (clients) Search callers and/or `ingest` = (writers, batch)
    /// upserters re-writing the stored items (the same ids and vectors, so the collection
    /// keeps its size). Returns (search run, ingest run, daemon and client CPU).
    pub async fn timed_load(
        &self,
        data: &crate::data::Data,
        queries: &Arc<Vec<Vec<f32>>>,
        search: Option<usize>,
        ingest: Option<(usize, usize)>,
        secs: f64,
    ) -> Result<(Option<Run>, Option<Run>, Cpu), String> {
        let mut searchers = Vec::new();
        for _ in 0..search.unwrap_or(0) {
            searchers.push(self.items().await?);
        }
        let mut writers = Vec::new();
        let batch = ingest.map_or(1, |(_, b)| b.max(1));
        for _ in 0..ingest.map_or(0, |(w, _)| w) {
            writers.push(self.items().await?);
        }
        let batches = Arc::new(
            data.items
                .chunks(batch)
                .map(<[_]>::to_vec)
                .collect::<Vec<_>>(),
        );
        let next_batch = Arc::new(AtomicUsize::new(0));
        let n_clients = searchers.len();
        let cpu = Meter::start(self.pid());
        let start = Instant::now();
        let until = start + Duration::from_secs_f64(secs);
        let mut search_tasks = tokio::task::JoinSet::new();
        for (c, mut client) in searchers.into_iter().enumerate() {
            let queries = queries.clone();
            search_tasks.spawn(async move {
                let mut lat = Vec::new();
                let mut i = c;
                while Instant::now() < until {
                    let t = Instant::now();
                    client
                        .search(search_request(queries[i % queries.len()].clone()))
                        .await
                        .map_err(status)?;
                    lat.push(t.elapsed());
                    i += n_clients;
                }
                Ok::<_, String>((lat, Instant::now()))
            });
        }
        let mut write_tasks = tokio::task::JoinSet::new();
        for mut client in writers {
            let (batches, next) = (batches.clone(), next_batch.clone());
            write_tasks.spawn(async move {
                let mut lat = Vec::new();
                let mut items = 0usize;
                while Instant::now() < until {
                    let b = &batches[next.fetch_add(1, Ordering::Relaxed) % batches.len()];
                    let t = Instant::now();
                    client
                        .upsert(pb::UpsertRequest {
                            collection: COLLECTION.into(),
                            items: b.clone(),
                        })
                        .await
                        .map_err(status)?;
                    lat.push(t.elapsed());
                    items += b.len();
                }
                Ok::<_, String>((items, lat, Instant::now()))
            });
        }
        let mut search_lat = Vec::new();
        let mut search_end = start;
        while let Some(r) = search_tasks.join_next().await {
            let (lat, end) = r.map_err(|e| e.to_string())??;
            search_lat.extend(lat);
            search_end = search_end.max(end);
        }
        let mut upserted = 0;
        let mut write_lat = Vec::new();
        let mut write_end = start;
        while let Some(r) = write_tasks.join_next().await {
            let (n, lat, end) = r.map_err(|e| e.to_string())??;
            upserted += n;
            write_lat.extend(lat);
            write_end = write_end.max(end);
        }
        let cpu = cpu.stop();
        let search_run = search.map(|_| {
            let n = search_lat.len();
            Run::new(n, search_end - start, search_lat, cpu)
        });
        let ingest_run = ingest.map(|_| Run::new(upserted, write_end - start, write_lat, cpu));
        Ok((search_run, ingest_run, cpu))
    }

    /// A new channel to the daemon, with the bench's TLS and token settings.
    pub async fn channel(&self) -> Result<Channel, String> {
        connect(&self.spec, &self.url).await
    }

    /// The data dir the daemon runs on (its --data-dir).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The value of one metric line (`name{labels}` exactly as exported) from GET
    /// /metrics, or None when the daemon exports no such line.
    pub async fn metric(&self, series: &str) -> Result<Option<f64>, String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let port = self
            .metrics
            .ok_or("the daemon has no metrics port of the bench's")?;
        let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("metrics port {port}: {e}"))?;
        sock.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut body = String::new();
        sock.read_to_string(&mut body)
            .await
            .map_err(|e| e.to_string())?;
        Ok(body.lines().find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        }))
    }

    /// The daemon's resident memory now, KiB: (VmRSS, RssAnon, VmHWM).
    pub fn memory_kib(&self) -> Result<(u64, u64, u64), String> {
        let pid = self.pid().ok_or("the daemon is not running")?;
        Ok((
            crate::procfs::status_kib(pid, "VmRSS")?,
            crate::procfs::status_kib(pid, "RssAnon")?,
            crate::procfs::status_kib(pid, "VmHWM")?,
        ))
    }

    /// SIGTERM, then removes the data dir.
    pub async fn stop(mut self) -> Result<(), String> {
        self.terminate().await.map(|_| ())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
