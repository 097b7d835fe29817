//! Shared test harness: a real server on 127.0.0.1:0 with a temp data dir, shut down
//! gracefully on `stop` (or abruptly when dropped), and data generators.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use likeness::Config;
use likeness::pb;
use likeness::pb::collections_client::CollectionsClient;
use likeness::pb::items_client::ItemsClient;
use tonic::transport::Channel;

pub struct TestServer {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<likeness::Result<()>>>,
}

impl TestServer {
    /// A server on a fresh temp dir (kept alive by the returned guard).
    pub async fn start() -> (TestServer, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let server = TestServer::start_in(dir.path(), |_| {}).await;
        (server, dir)
    }

    /// A server on `dir`, with `tweak` applied to the default config.
    pub async fn start_in(dir: &Path, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = Config::with_data_dir(dir);
        config.cache_mb = 64;
        config.shutdown_grace_secs = 5;
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(likeness::serve(listener, config, async {
            let _ = rx.await;
        }));
        let server = TestServer {
            addr,
            dir: dir.to_path_buf(),
            stop: Some(tx),
            task: Some(task),
        };
        wait_serving(&server.url()).await;
        server
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

/// Polls grpc.health.v1 until likeness.v1.Items is SERVING (10 s at most).
pub async fn wait_serving(url: &str) {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(ch) = Channel::from_shared(url.to_string()).unwrap().connect().await {
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

pub async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

pub fn item(id: &str, label: &str, vector: Vec<f32>) -> pb::Item {
    pb::Item {
        id: id.into(),
        label: label.into(),
        metadata: Default::default(),
        vector,
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
