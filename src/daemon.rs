//! The composition root: one place that assembles the daemon from its parts (the store
//! and its recovery, the models and the model store, the memory trimmer, the search
//! pool, the app, the metrics exporter, health, activations, shutdown) and hands the app
//! to the transport. The full and the embed-only daemon share it; `grpc` only builds
//! the server from what it is given.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::App;
use crate::collections::Registry;
use crate::config::Config;
use crate::embed::publish::ModelStore;
use crate::embed::{EmbedHandle, Models};
use crate::error::{Error, Result};
use crate::grpc::{Reloader, Transport};
use crate::pool::WorkPool;

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
    // Certificates, tokens and the health port first: a bad file or a taken port fails
    // the start at once, before anything slow.
    let transport = Transport::prepare(&config, reloader).await?;
    if config.embed_only {
        return serve_embed_only(listener, transport, config, embedder, shutdown).await;
    }
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
    let embedder = load_embedder(&config, embedder).await?;
    let model_store = open_model_store(&config, &embedder).await?;
    let health = transport.health();
    health.set_core(false).await;
    // The models are loaded by now: inference serves while the core recovers.
    health.set_inference(true).await;
    let trimmer = spawn_trimmer(&db);
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
        crate::exporter::start(
            config.metrics_listen,
            config.metrics_fallback,
            app.metrics(),
            Arc::new(move || crate::exporter::render(&scraped)),
        )
        .await?
    };

    // Recovery runs beside the server; a failure stops the daemon.
    let (fatal_tx, fatal_rx) = tokio::sync::oneshot::channel::<Error>();
    let recovery = {
        let app = app.clone();
        tokio::spawn(async move {
            let report = match recovered.await {
                Ok(Ok(report)) => report,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "recovery failed");
                    let _ = fatal_tx.send(e);
                    return;
                }
                Err(e) => {
                    let _ = fatal_tx.send(e.into());
                    return;
                }
            };
            for r in &report {
                tracing::info!(collection = %r.name, items = r.items, from_snapshot = r.from_snapshot, took_ms = r.took.as_millis() as u64, "recovered collection");
            }
            health.set_core(true).await;
            tracing::info!(
                collections = report.len(),
                took_ms = started.elapsed().as_millis() as u64,
                "recovery complete; SERVING"
            );
            app.metrics().set_recovery(started.elapsed());
            match app.activations().resume() {
                Ok(0) => {}
                Ok(n) => tracing::info!(activations = n, "resumed activations"),
                Err(e) => tracing::error!(error = %e, "could not resume activations"),
            }
            if let Some(f) = on_serving {
                f(app);
            }
        })
    };

    let (stop, fatal) = stop_signal(shutdown, Some(fatal_rx));
    tracing::info!(data_dir = %config.data_dir.display(), "core assembled");
    let served = transport
        .serve_full(listener, app.clone(), model_store, stop)
        .await;
    recovery.abort();
    trimmer.abort();
    if let Some(e) = exporter {
        e.abort();
    }
    served?;
    if let Some(e) = fatal.lock().expect("fatal lock").take() {
        return Err(e);
    }
    if db.is_ready() {
        tokio::task::spawn_blocking(move || db.shutdown()).await??;
    }
    tracing::info!("stopped");
    Ok(())
}

/// The embed-only daemon: Embedder and Models, with health and reflection, and no store
/// at all. Such daemons hold no state, so on Kubernetes they run as a Deployment that an
/// autoscaler sizes, apart from the stateful index pods.
async fn serve_embed_only(
    listener: TcpListener,
    transport: Transport,
    config: Config,
    embedder: Option<EmbedHandle>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let embedder = load_embedder(&config, embedder).await?;
    let own = Arc::new(crate::metrics::Registry::default());
    let exporter = {
        let (scraped, embedder) = (own.clone(), embedder.clone());
        crate::exporter::start(
            config.metrics_listen,
            config.metrics_fallback,
            &own,
            Arc::new(move || crate::exporter::render_embed_only(&scraped, &embedder)),
        )
        .await?
    };
    transport.health().set_inference(true).await;
    let (stop, _) = stop_signal(shutdown, None);
    let served = transport
        .serve_embed_only(listener, embedder, own, stop)
        .await;
    if let Some(e) = exporter {
        e.abort();
    }
    served?;
    tracing::info!("stopped");
    Ok(())
}

/// The embedder given, else the config's models, loaded off the async workers.
async fn load_embedder(config: &Config, given: Option<EmbedHandle>) -> Result<EmbedHandle> {
    if let Some(e) = given {
        return Ok(e);
    }
    let (specs, batch) = (config.models.clone(), config.batch);
    Ok(EmbedHandle::new(
        tokio::task::spawn_blocking(move || Models::load(&specs, batch)).await??,
    ))
}

/// The models published at run time, kept under the data dir: they join the configured
/// ones before anything is served.
async fn open_model_store(config: &Config, embedder: &EmbedHandle) -> Result<Arc<ModelStore>> {
    let dir = config.data_dir.join("models");
    let max = config.max_model_mb.saturating_mul(1 << 20);
    let embedder = embedder.clone();
    tokio::task::spawn_blocking(move || {
        let store = ModelStore::open(dir, max)?;
        let loaded = store.load_all(&*embedder)?;
        if loaded > 0 {
            tracing::info!(models = loaded, "loaded published models");
        }
        Ok(Arc::new(store))
    })
    .await?
}

/// Once writes go quiet, free heap memory goes back to the system (an ingest leaves
/// tens of MB in malloc's free lists otherwise), and the indexes that grew are swept
/// for nodes search cannot reach (issue 20).
fn spawn_trimmer(db: &Arc<Registry>) -> tokio::task::JoinHandle<()> {
    // Weak: the trimmer must not keep the store open after the daemon stops.
    let db = Arc::downgrade(db);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let (mut last, mut dirty, mut unswept) = (0, false, false);
        loop {
            tick.tick().await;
            let Some(now) = db.upgrade().map(|db| db.flushes()) else {
                return;
            };
            if now != last {
                (last, dirty) = (now, true);
                continue;
            }
            if dirty {
                dirty = false;
                unswept = true;
                let _ = tokio::task::spawn_blocking(crate::memory::trim).await;
            }
            // Checked on every quiet tick while any index holds unswept keys: a sweep
            // that was running, or a catch-up not yet due, when writes went quiet must
            // still come (a single check at the first quiet tick left the tail of an
            // ingest unswept for good).
            if unswept && let Some(db) = db.upgrade() {
                unswept = tokio::task::spawn_blocking(move || db.sweep_due())
                    .await
                    .unwrap_or(false);
            }
        }
    })
}

/// What stops the daemon: the caller's `shutdown`, or a fatal error (a failed recovery),
/// which is kept to be returned once the server has drained.
type Fatal = Arc<Mutex<Option<Error>>>;

fn stop_signal(
    shutdown: impl Future<Output = ()> + Send + 'static,
    fatal_rx: Option<tokio::sync::oneshot::Receiver<Error>>,
) -> (watch::Receiver<bool>, Fatal) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let fatal: Fatal = Arc::default();
    let kept = fatal.clone();
    tokio::spawn(async move {
        let failed = async {
            match fatal_rx {
                Some(rx) => rx.await.ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown => {}
            Some(e) = failed => { *kept.lock().expect("fatal lock") = Some(e); }
        }
        let _ = stop_tx.send(true);
    });
    (stop_rx, fatal)
}
