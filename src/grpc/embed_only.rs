//! The embed-only mode (`--embed-only`): Embedder and Models, with health and
//! reflection, and no store at all. Such daemons hold no state, so on Kubernetes they run
//! as a Deployment that an autoscaler sizes, apart from the stateful index pods. Items
//! and Collections are not registered (metrics, when on, cover its RPCs and embedders): a call to them answers UNIMPLEMENTED, and a health
//! check of them NOT_FOUND.

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Server;

use super::Security;
use super::embedder::{EmbedderService, ModelsService};
use crate::config::Config;
use crate::embed::{EmbedHandle, Models};
use crate::error::Result;
use crate::pb::embedder_server::EmbedderServer;
use crate::pb::models_server::ModelsServer;

/// Runs the embed-only daemon on `listener` until `shutdown` resolves, then lets
/// in-flight RPCs finish (up to the grace period).
pub(super) async fn serve(
    listener: TcpListener,
    health_listener: Option<TcpListener>,
    config: Config,
    embedder: Option<EmbedHandle>,
    security: std::sync::Arc<Security>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let local = listener.local_addr()?;
    let embedder = match embedder {
        Some(e) => e,
        None => {
            let (specs, batch) = (config.models.clone(), config.batch);
            EmbedHandle::new(
                tokio::task::spawn_blocking(move || Models::load(&specs, batch)).await??,
            )
        }
    };
    let own = std::sync::Arc::new(crate::metrics::Registry::default());
    let exporter = {
        let (own, embedder) = (own.clone(), embedder.clone());
        crate::metrics::start(
            config.metrics_listen,
            &own.clone(),
            std::sync::Arc::new(move || crate::metrics::render_embed_only(&own, &embedder)),
        )
        .await?
    };
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<EmbedderServer<EmbedderService>>()
        .await;
    reporter.set_serving::<ModelsServer<ModelsService>>().await;
    let (reflection, reflection_alpha) = super::reflection()?;
    let limit = config.max_message_bytes;
    let embed = EmbedderServer::new(EmbedderService {
        embedder: embedder.clone(),
    })
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);
    let models = ModelsServer::new(ModelsService {
        embedder,
        store: None,
        app: None,
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let health_port = health_listener.map(|l| super::health::spawn(l, health.clone()));
    let mut stopping = stop_rx.clone();
    let incoming = security.incoming(listener);
    let server = Server::builder()
        .layer(super::metrics::RpcMetricsLayer { registry: own })
        .layer(security.auth())
        .layer(tower::util::MapResponseLayer::new(super::oversize_response))
        .add_service(health)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(embed)
        .add_service(models)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stopping.wait_for(|s| *s).await;
        });
    tracing::info!(addr = %local, mode = "embed-only", tls = security.tls.is_some(), tokens = security.keyring.is_some(), "listening");
    super::drain(
        server,
        stop_rx,
        Duration::from_secs(config.shutdown_grace_secs),
    )
    .await?;
    if let Some(h) = health_port {
        h.abort();
    }
    if let Some(e) = exporter {
        e.abort();
    }
    tracing::info!("stopped");
    Ok(())
}
