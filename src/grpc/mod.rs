//! The gRPC server: services, health, reflection, limits and graceful shutdown.

mod admin;
mod auth;
pub mod client;
mod collections;
pub mod convert;
mod embed_only;
mod embedder;
mod health;
mod items;
mod metrics;
mod miner;
mod status;
mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tonic::Status;
use tonic::transport::Server;

use crate::app::App;
use crate::collections::Registry;
use crate::config::Config;
use crate::embed::{EmbedHandle, Models};
use crate::error::{Error, Result};
use crate::pb;
use crate::pool::WorkPool;
use collections::CollectionsService;
use embedder::{EmbedderService, ModelsService};
use items::ItemsService;
use miner::MinerService;

/// The encoded descriptor set of likeness.v1, served by reflection.
pub const DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/likeness_descriptor.bin"));

/// Runs the daemon on `listener` until `shutdown` resolves, then drains in-flight RPCs
/// (up to the grace period), saves index snapshots and flushes the store.
///
/// Recovery starts at once and the embedders load beside it (connections wait in the
/// listen backlog meanwhile); then the port answers, and health reports NOT_SERVING for
/// the likeness services, which answer UNAVAILABLE, until recovery has loaded every
/// collection.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    serve_with(listener, config, ServeOptions::default(), shutdown).await
}

/// What an embedding program (a test, a tool) may change about [`serve`].
/// With `config.embed_only` there is no store: the embed-only mode serves Embedder and
/// Models alone, and `on_serving` is never called.
#[derive(Default)]
pub struct ServeOptions {
    /// An embedder instead of the config's models (tests use
    /// [`crate::embed::fake::FakeEmbedder`] where the model is beside the point).
    pub embedder: Option<EmbedHandle>,
    /// Called with the application once recovery is done and the services are SERVING
    /// (tests reach the core behind the server through it).
    pub on_serving: Option<Box<dyn FnOnce(Arc<App>) + Send>>,
    /// Re-reads the TLS certificates and the tokens file when asked (the binary asks on
    /// SIGHUP; tests ask directly).
    pub reloader: Option<Reloader>,
}

/// A handle that makes a running daemon re-read its certificate, key, client CA and
/// tokens files, without a restart. Connections that are up keep going; new handshakes
/// and calls see the new files. A file that fails to load is reported and the daemon
/// keeps what it had.
#[derive(Clone, Default)]
pub struct Reloader {
    target: Arc<std::sync::Mutex<Option<Arc<Security>>>>,
}

impl Reloader {
    pub fn new() -> Reloader {
        Reloader::default()
    }

    /// Re-reads the files now; an error says which could not be used (the old ones
    /// stay in force). Before the daemon has started, there is nothing to reload.
    pub fn reload(&self) -> std::result::Result<(), String> {
        let target = self.target.lock().expect("reloader lock").clone();
        match target {
            Some(security) => security.reload(),
            None => Ok(()),
        }
    }
}

/// TLS and tokens, as configured: what the gRPC port accepts and whom it serves.
struct Security {
    tls: Option<Arc<tls::Tls>>,
    keyring: Option<Arc<auth::Keyring>>,
}

impl Security {
    /// Loads the configured files; an error names the flag and the path.
    fn load(config: &Config, reloader: Option<Reloader>) -> Result<Arc<Security>> {
        let setup = |e: String| Error::Io(std::io::Error::other(e));
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(Arc::new(
                tls::Tls::load(tls::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: config.tls_client_ca.clone(),
                })
                .map_err(setup)?,
            )),
            _ => None,
        };
        let keyring = match &config.tokens_file {
            Some(path) => Some(Arc::new(auth::Keyring::load(path).map_err(setup)?)),
            None => None,
        };
        let security = Arc::new(Security { tls, keyring });
        if let Some(r) = reloader {
            *r.target.lock().expect("reloader lock") = Some(security.clone());
        }
        Ok(security)
    }

    /// Each part independently: a bad tokens file does not hold back a new certificate.
    fn reload(&self) -> std::result::Result<(), String> {
        let mut errors = Vec::new();
        if let Some(tls) = &self.tls {
            match tls.reload() {
                Ok(()) => tracing::info!("TLS certificates reloaded"),
                Err(e) => errors.push(e),
            }
        }
        if let Some(keyring) = &self.keyring {
            match keyring.reload() {
                Ok(()) => tracing::info!("tokens reloaded"),
                Err(e) => errors.push(e),
            }
        }
        for e in &errors {
            tracing::error!(error = %e, "reload failed; keeping the previous files");
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    fn incoming(&self, listener: TcpListener) -> tls::Incoming {
        tls::incoming(listener, self.tls.clone())
    }

    fn auth(&self) -> auth::AuthLayer {
        auth::AuthLayer {
            keyring: self.keyring.clone(),
        }
    }
}

/// [`serve`] with [`ServeOptions`].
pub async fn serve_with(
    listener: TcpListener,
    config: Config,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let ServeOptions {
        embedder,
        on_serving,
        reloader,
    } = options;
    // Certificates and tokens first, and the health port: a bad file or a taken port
    // fails the start at once, before anything slow.
    let security = Security::load(&config, reloader)?;
    let health_listener = health::bind(config.health_listen).await?;
    if config.embed_only {
        return embed_only::serve(
            listener,
            health_listener,
            config,
            embedder,
            security,
            shutdown,
        )
        .await;
    }
    let local: SocketAddr = listener.local_addr()?;
    let db = {
        let settings = config.core();
        Arc::new(tokio::task::spawn_blocking(move || Registry::open(settings)).await??)
    };
    db.watch_storage();
    // Recovery starts now, on a blocking thread, while the models load beside it.
    let started = Instant::now();
    let recovered = {
        let db = db.clone();
        tokio::task::spawn_blocking(move || db.recover())
    };
    let embedder = match embedder {
        Some(e) => e,
        None => {
            let (specs, batch) = (config.models.clone(), config.batch);
            EmbedHandle::new(
                tokio::task::spawn_blocking(move || Models::load(&specs, batch)).await??,
            )
        }
    };
    // Published models join the configured ones before anything is served.
    let model_store = {
        let dir = config.data_dir.join("models");
        let max = config.max_model_mb.saturating_mul(1 << 20);
        let embedder = embedder.clone();
        tokio::task::spawn_blocking(move || {
            let store = crate::embed::publish::ModelStore::open(dir, max)?;
            let loaded = store.load_all(&*embedder)?;
            if loaded > 0 {
                tracing::info!(models = loaded, "loaded published models");
            }
            Ok::<_, Error>(Arc::new(store))
        })
        .await??
    };
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_not_serving::<pb::items_server::ItemsServer<ItemsService>>()
        .await;
    reporter
        .set_not_serving::<pb::collections_server::CollectionsServer<CollectionsService>>()
        .await;
    reporter
        .set_not_serving::<pb::miner_server::MinerServer<MinerService>>()
        .await;
    // The models are loaded by now: inference serves while the core recovers.
    reporter
        .set_serving::<pb::embedder_server::EmbedderServer<EmbedderService>>()
        .await;
    reporter
        .set_serving::<pb::models_server::ModelsServer<ModelsService>>()
        .await;
    let (reflection, reflection_alpha) = reflection()?;

    // Once writes go quiet, free heap memory goes back to the system: an ingest leaves
    // tens of MB in malloc's free lists otherwise. Indexes that grew are swept then too.
    let trimmer = {
        // Weak: the trimmer must not keep the store open after the daemon stops.
        let db = Arc::downgrade(&db);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            let (mut last, mut dirty) = (0, false);
            loop {
                tick.tick().await;
                let Some(now) = db.upgrade().map(|db| db.flushes()) else {
                    return;
                };
                if now != last {
                    (last, dirty) = (now, true);
                } else if dirty {
                    dirty = false;
                    let _ = tokio::task::spawn_blocking(crate::memory::trim).await;
                    // The same quiet moment checks the indexes that grew (issue 20).
                    if let Some(db) = db.upgrade() {
                        let _ = tokio::task::spawn_blocking(move || sweep_due(&db)).await;
                    }
                }
            }
        })
    };
    let limit = config.max_message_bytes;
    let searches = Arc::new(WorkPool::new(
        "search",
        config.search_threads(),
        config.search_queue,
    ));
    let app = Arc::new(App::new(db.clone(), embedder, searches));
    app.activations().set_rate(config.reembed_rate);

    // Prometheus metrics on their own port, scraped from the core on demand.
    let exporter = {
        let scraped = app.clone();
        crate::metrics::start(
            config.metrics_listen,
            app.metrics(),
            Arc::new(move || crate::metrics::render(&scraped)),
        )
        .await?
    };

    // Recovery runs beside the server; a failure stops the daemon.
    let (fatal_tx, fatal_rx) = tokio::sync::oneshot::channel::<Error>();
    let recovery = {
        let reporter = reporter.clone();
        let app = app.clone();
        tokio::spawn(async move {
            match recovered.await {
                Ok(Ok(report)) => {
                    for r in &report {
                        tracing::info!(collection = %r.name, items = r.items, from_snapshot = r.from_snapshot, took_ms = r.took.as_millis() as u64, "recovered collection");
                    }
                    reporter
                        .set_serving::<pb::items_server::ItemsServer<ItemsService>>()
                        .await;
                    reporter
                        .set_serving::<pb::collections_server::CollectionsServer<CollectionsService>>()
                        .await;
                    reporter
                        .set_serving::<pb::miner_server::MinerServer<MinerService>>()
                        .await;
                    tracing::info!(
                        collections = report.len(),
                        took_ms = started.elapsed().as_millis() as u64,
                        "recovery complete; SERVING"
                    );
                    app.metrics().set_recovery(started.elapsed());
                    match app.resume_activations() {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(activations = n, "resumed activations"),
                        Err(e) => tracing::error!(error = %e, "could not resume activations"),
                    }
                    if let Some(f) = on_serving {
                        f(app);
                    }
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "recovery failed");
                    let _ = fatal_tx.send(e);
                }
                Err(e) => {
                    let _ = fatal_tx.send(e.into());
                }
            }
        })
    };

    let items = pb::items_server::ItemsServer::new(ItemsService { app: app.clone() })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let colls =
        pb::collections_server::CollectionsServer::new(CollectionsService { app: app.clone() })
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
    let embedder = pb::embedder_server::EmbedderServer::new(EmbedderService {
        embedder: app.embedder().clone(),
    })
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);
    let miner = pb::miner_server::MinerServer::new(MinerService { app: app.clone() })
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let admin = pb::admin_server::AdminServer::new(admin::AdminService { app: app.clone() });
    let app_metrics = app.metrics().clone();
    let models_svc = pb::models_server::ModelsServer::new(ModelsService {
        embedder: app.embedder().clone(),
        store: Some(model_store),
        app: Some(app.clone()),
    })
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);

    // Shutdown starts on the caller's signal or on a failed recovery.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let fatal = Arc::new(std::sync::Mutex::new(None::<Error>));
    {
        let fatal = fatal.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown => {}
                Ok(e) = fatal_rx => { *fatal.lock().expect("fatal lock") = Some(e); }
            }
            let _ = stop_tx.send(true);
        });
    }
    let health_port = health_listener.map(|l| health::spawn(l, health.clone()));
    let mut stopping = stop_rx.clone();
    let incoming = security.incoming(listener);
    // Outermost first: metrics see the refusals of auth, by code.
    let server = Server::builder()
        .layer(metrics::RpcMetricsLayer {
            registry: app_metrics,
        })
        .layer(security.auth())
        .layer(tower::util::MapResponseLayer::new(oversize_response))
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(colls)
        .add_service(items)
        .add_service(embedder)
        .add_service(models_svc)
        .add_service(miner)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stopping.wait_for(|s| *s).await;
        });
    tracing::info!(addr = %local, data_dir = %config.data_dir.display(), tls = security.tls.is_some(), mtls = config.tls_client_ca.is_some(), tokens = security.keyring.is_some(), "listening");
    drain(
        server,
        stop_rx,
        Duration::from_secs(config.shutdown_grace_secs),
    )
    .await?;
    recovery.abort();
    trimmer.abort();
    if let Some(e) = exporter {
        e.abort();
    }
    if let Some(h) = health_port {
        h.abort();
    }
    if let Some(e) = fatal.lock().expect("fatal lock").take() {
        return Err(e);
    }
    if db.is_ready() {
        tokio::task::spawn_blocking(move || db.shutdown()).await??;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Runs the server until it ends by itself (its shutdown signal drained every RPC) or,
/// once `stop` is set, until the grace period has passed; then what is still running
/// is dropped.
/// Sweeps each collection whose index is due (see `AnnIndex::sweep_due`): the HNSW
/// nodes that search cannot reach are found and repaired while writes are quiet.
fn sweep_due(db: &Registry) {
    let Ok(infos) = db.list() else {
        return; // still recovering
    };
    for info in infos {
        let Ok(coll) = db.collection(&info.spec.name) else {
            continue;
        };
        if !coll.sweep_due() {
            continue;
        }
        let started = Instant::now();
        match coll.sweep_reach() {
            Ok(r) => tracing::info!(
                collection = %coll.name(),
                checked = r.checked,
                unreachable = r.unreachable,
                repaired = r.repaired,
                stashed = r.stashed,
                took_ms = started.elapsed().as_millis() as u64,
                "swept the index for nodes search cannot reach"
            ),
            Err(e) => tracing::warn!(collection = %coll.name(), error = %e, "index sweep failed"),
        }
    }
}

async fn drain<E: std::error::Error + Send + Sync + 'static>(
    server: impl Future<Output = std::result::Result<(), E>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    grace: Duration,
) -> Result<()> {
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r.map_err(|e| Error::Io(std::io::Error::other(e)))?,
        () = async {
            let _ = stop.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => tracing::warn!(grace_secs = grace.as_secs(), "grace period over; closing remaining RPCs"),
    }
    Ok(())
}

/// Both reflection protocols: grpcurl speaks v1; Python's grpc_reflection and many older
/// tools speak only v1alpha.
fn reflection() -> Result<(
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Io(std::io::Error::other(e)))?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| Error::Io(std::io::Error::other(e)))?;
    Ok((v1, v1alpha))
}

/// tonic answers an over-long message with OUT_OF_RANGE; gRPC's convention, and our
/// contract, is RESOURCE_EXHAUSTED.
pub(crate) fn oversize_to_exhausted(status: Status) -> Status {
    if status.code() == tonic::Code::OutOfRange && status.message().contains("too large") {
        Status::resource_exhausted(status.message().to_string())
    } else {
        status
    }
}

fn oversize_response<B>(mut res: http::Response<B>) -> http::Response<B> {
    let h = res.headers_mut();
    let oversize = h.get("grpc-status").is_some_and(|v| v == "11")
        && h.get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|m| m.contains("too%20large") || m.contains("too large"));
    if oversize {
        h.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    res
}
