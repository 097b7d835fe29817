//! The embed-only mode (`--embed-only`), the plaintext health port (`--health-listen`),
//! and client-side load balancing across embed-only replicas.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use likeness::embed::fake::{FAKE_MODEL, FakeEmbedder};
use likeness::embed::{EmbedHandle, Embedder, Input, InputData, ModelInfo};
use likeness::grpc::pb;
use likeness::grpc::pb::collections_client::CollectionsClient;
use likeness::grpc::pb::embedder_client::EmbedderClient;
use likeness::grpc::pb::items_client::ItemsClient;
use likeness::grpc::pb::models_client::ModelsClient;
use likeness::types::ModelDefaults;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::common::{
    channel, check_health as check, fixture_pngs, health, health_addr, image_input, spawn_daemon,
    wait_for_service as wait_for,
};

const SERVING: i32 = ServingStatus::Serving as i32;

#[tokio::test]
async fn embed_only_daemon_serves_models_and_opens_no_store() {
    let dir = tempfile::tempdir().unwrap();
    // The data dir the helper passes must be neither created nor written.
    let data = dir.path().join("never-created");
    let daemon = spawn_daemon(
        &data,
        &["--embed-only", "--health-listen", "127.0.0.1:0"],
        &[],
    );
    let url = format!("http://{}", daemon.addr);
    wait_for(&url, "likeness.v1.Embedder").await;
    assert_eq!(health(&url, "likeness.v1.Models").await, SERVING);
    // Services that are not there are unknown to health, not NOT_SERVING.
    for service in ["likeness.v1.Items", "likeness.v1.Collections"] {
        assert_eq!(check(&url, service).await, Err(Code::NotFound), "{service}");
    }

    let models = ModelsClient::new(channel(&url).await)
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    let triplet = models
        .iter()
        .find(|m| m.name == "fmnist-triplet")
        .expect("the shipped embedder is listed");
    let pngs = fixture_pngs("enrol_images.npy");
    let vectors = EmbedderClient::new(channel(&url).await)
        .embed(pb::EmbedRequest {
            model: "fmnist-triplet".into(),
            inputs: pngs[..3].iter().map(|p| image_input(p)).collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .embeddings;
    assert_eq!(vectors.len(), 3);
    assert_eq!(vectors[0].values.len(), triplet.dimension as usize);

    let err = CollectionsClient::new(channel(&url).await)
        .list_collections(pb::ListCollectionsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{}", err.message());
    let err = ItemsClient::new(channel(&url).await)
        .get(pb::GetRequest {
            collection: "any".into(),
            ids: vec!["a".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{}", err.message());
    assert!(!data.exists(), "embed-only created its data dir");

    // The health port shows the same statuses, and serves nothing but health.
    let health_url = format!("http://{}", health_addr(&daemon));
    assert_eq!(health(&health_url, "likeness.v1.Embedder").await, SERVING);
    assert_eq!(
        check(&health_url, "likeness.v1.Items").await,
        Err(Code::NotFound)
    );
    let err = ModelsClient::new(channel(&health_url).await)
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{}", err.message());
}

#[tokio::test]
async fn health_port_reports_the_store_services_of_a_full_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = spawn_daemon(dir.path(), &["--health-listen", "127.0.0.1:0"], &[]);
    let health_url = format!("http://{}", health_addr(&daemon));
    let url = format!("http://{}", daemon.addr);
    // Kubelet's probes: readiness and startup on the likeness services.
    wait_for(&health_url, "likeness.v1.Items").await;
    for service in [
        "likeness.v1.Items",
        "likeness.v1.Collections",
        "likeness.v1.Embedder",
        "likeness.v1.Models",
        "",
    ] {
        assert_eq!(
            check(&health_url, service).await,
            check(&url, service).await,
            "{service:?}"
        );
        assert_eq!(
            check(&health_url, service).await,
            Ok(SERVING),
            "{service:?}"
        );
    }
    let err = CollectionsClient::new(channel(&health_url).await)
        .list_collections(pb::ListCollectionsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{}", err.message());
}

#[test]
fn health_port_that_is_taken_fails_the_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_likeness"))
        .args(["serve", "--embed-only", "--listen", "127.0.0.1:0"])
        .args(["--health-listen", &addr])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("health_listen") && err.contains(&addr),
        "{err}"
    );
}

/// The fake embedder, counting the Embed calls that reach this replica: the honest
/// observable of where a balanced client's requests went.
struct Counted {
    calls: Arc<AtomicUsize>,
}

type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl Embedder for Counted {
    fn space(&self, model: &str) -> likeness::Result<ModelDefaults> {
        FakeEmbedder.space(model)
    }

    fn pair_threshold(&self, model: &str) -> likeness::Result<f32> {
        FakeEmbedder.pair_threshold(model)
    }

    fn embed<'a>(
        &'a self,
        model: &'a str,
        inputs: Vec<Input>,
        wait: bool,
    ) -> Boxed<'a, likeness::Result<Vec<Vec<f32>>>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        FakeEmbedder.embed(model, inputs, wait)
    }

    fn score<'a>(
        &'a self,
        model: &'a str,
        pairs: Vec<(InputData, InputData)>,
        wait: bool,
    ) -> Boxed<'a, likeness::Result<Vec<f32>>> {
        FakeEmbedder.score(model, pairs, wait)
    }

    fn list(&self) -> Vec<ModelInfo> {
        FakeEmbedder.list()
    }

    fn info(&self, name: &str) -> likeness::Result<ModelInfo> {
        FakeEmbedder.info(name)
    }
}

/// An embed-only replica on 127.0.0.1:0 (the daemon's own `serve_with`, in process so
/// that its counter can be read); stops when the sender is dropped.
async fn replica() -> (
    SocketAddr,
    Arc<AtomicUsize>,
    tokio::sync::oneshot::Sender<()>,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let config = likeness::Config {
        embed_only: true,
        shutdown_grace_secs: 1,
        // Two replicas at once: neither takes the default metrics port.
        metrics_listen: None,
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let options = likeness::ServeOptions {
        embedder: Some(EmbedHandle::new(Counted {
            calls: calls.clone(),
        })),
        on_serving: None,
        reloader: None,
    };
    tokio::spawn(likeness::serve_with(listener, config, options, async {
        let _ = stopped.await;
    }));
    wait_for(&format!("http://{addr}"), "likeness.v1.Embedder").await;
    (addr, calls, stop)
}

/// One gRPC channel holds one HTTP/2 connection per address it knows: a ClusterIP
/// Service (one address) pins every call to whichever pod the connection landed on.
/// Given every replica's address (what a headless Service's DNS answers), the client
/// spreads calls itself. tonic balances by power of two choices; gRPC's round_robin
/// policy in other languages does the same job.
#[tokio::test]
async fn a_balanced_client_spreads_embed_calls_over_two_replicas() {
    let (a, calls_a, _stop_a) = replica().await;
    let (b, calls_b, _stop_b) = replica().await;
    let endpoints = [a, b].map(|addr| Endpoint::from_shared(format!("http://{addr}")).unwrap());
    let balanced: Channel = Channel::balance_list(endpoints.into_iter());
    const TASKS: usize = 8;
    const CALLS: usize = 10;
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let mut client = EmbedderClient::new(balanced.clone());
        tasks.spawn(async move {
            for c in 0..CALLS {
                let input = pb::Input {
                    kind: Some(pb::input::Kind::Tensor(pb::Tensor {
                        shape: vec![2],
                        values: vec![t as f32, c as f32],
                    })),
                    tower: String::new(),
                };
                let r = tokio::time::timeout(
                    Duration::from_secs(10),
                    client.embed(pb::EmbedRequest {
                        model: FAKE_MODEL.into(),
                        inputs: vec![input],
                    }),
                )
                .await
                .expect("an Embed call took over 10 s");
                assert_eq!(r.unwrap().into_inner().embeddings.len(), 1);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let (na, nb) = (
        calls_a.load(Ordering::SeqCst),
        calls_b.load(Ordering::SeqCst),
    );
    assert_eq!(na + nb, TASKS * CALLS);
    // Random choice puts fewer than 5 of 80 on one replica with probability ~1e-15.
    assert!(na >= 5 && nb >= 5, "calls per replica: {na} and {nb}");

    // A plain channel to one address sends everything there: the ClusterIP case.
    let before = calls_b.load(Ordering::SeqCst);
    let mut single = EmbedderClient::new(channel(&format!("http://{a}")).await);
    for c in 0..10 {
        single
            .embed(pb::EmbedRequest {
                model: FAKE_MODEL.into(),
                inputs: vec![pb::Input {
                    kind: Some(pb::input::Kind::Tensor(pb::Tensor {
                        shape: vec![1],
                        values: vec![c as f32],
                    })),
                    tower: String::new(),
                }],
            })
            .await
            .unwrap();
    }
    assert_eq!(calls_b.load(Ordering::SeqCst), before);
}
