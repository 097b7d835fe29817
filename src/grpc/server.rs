//! The server built from what the daemon assembled: the services over the app (or, in
//! the embed-only mode, over the embedder alone), with the metrics and auth layers,
//! health, reflection and the graceful drain.
//!
//! The embed-only mode (`--embed-only`) registers Embedder and Models only: Items and
//! Collections answer UNIMPLEMENTED, and a health check of them NOT_FOUND.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use super::collections::CollectionsService;
use super::embedder::{EmbedderService, ModelsService};
use super::items::ItemsService;
use super::miner::MinerService;
use super::{
    Reloader, Security, admin, drain, health, metrics, oversize_response, reflection, streams,
};
use crate::app::App;
use crate::config::Config;
use crate::embed::EmbedHandle;
use crate::embed::publish::ModelStore;
use crate::error::Result;
use crate::grpc::pb;

/// What the probes are told: the core's services (Items, Collections, Miner) serve once
/// recovery is done; inference (Embedder, Models) once the models are loaded.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
}

impl Health {
    pub async fn set_core(&self, serving: bool) {
        self.set(
            &[
                pb::items_server::SERVICE_NAME,
                pb::collections_server::SERVICE_NAME,
                pb::miner_server::SERVICE_NAME,
            ],
            serving,
        )
        .await;
    }

    pub async fn set_inference(&self, serving: bool) {
        self.set(
            &[
                pb::embedder_server::SERVICE_NAME,
                pb::models_server::SERVICE_NAME,
            ],
            serving,
        )
        .await;
    }

    async fn set(&self, services: &[&str], serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for service in services {
            self.reporter.set_service_status(*service, status).await;
        }
    }
}

/// The gRPC side of a daemon, prepared before anything slow: certificates and tokens
/// loaded, the health port bound, the health reporter made.
pub struct Transport {
    security: Arc<Security>,
    health_listener: Option<TcpListener>,
    reporter: HealthReporter,
    /// The health service alone, for the health port.
    health: Routes,
    /// The health service, to which the main port's services are added.
    base: Routes,
    limit: usize,
    max_streams: usize,
    grace: Duration,
}

impl Transport {
    /// Loads the configured files and binds the health port; an error names the flag and
    /// the path (or the address).
    pub async fn prepare(config: &Config, reloader: Option<Reloader>) -> Result<Transport> {
        let security = Security::load(config, reloader)?;
        let health_listener = health::bind(config.health_listen).await?;
        let (reporter, service) = tonic_health::server::health_reporter();
        Ok(Transport {
            security,
            health_listener,
            reporter,
            health: Routes::new(service.clone()),
            base: Routes::new(service),
            limit: config.max_message_bytes,
            max_streams: config.max_streams,
            grace: Duration::from_secs(config.shutdown_grace_secs),
        })
    }

    pub fn health(&self) -> Health {
        Health {
            reporter: self.reporter.clone(),
        }
    }

    /// Serves every likeness service over `app` until `stop` is set, then drains.
    pub async fn serve_full(
        self,
        listener: TcpListener,
        app: Arc<App>,
        model_store: Arc<ModelStore>,
        stop: watch::Receiver<bool>,
    ) -> Result<()> {
        let limit = self.limit;
        let routes = self
            .base
            .clone()
            .add_service(
                pb::collections_server::CollectionsServer::new(CollectionsService {
                    app: app.clone(),
                })
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            )
            .add_service(
                pb::items_server::ItemsServer::new(ItemsService { app: app.clone() })
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(limit),
            )
            .add_service(
                pb::embedder_server::EmbedderServer::new(EmbedderService {
                    embedder: app.embedder().clone(),
                })
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            )
            .add_service(
                pb::models_server::ModelsServer::new(ModelsService {
                    embedder: app.embedder().clone(),
                    store: Some(model_store),
                    app: Some(app.clone()),
                })
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            )
            .add_service(
                pb::miner_server::MinerServer::new(MinerService { app: app.clone() })
                    .max_decoding_message_size(limit)
                    .max_encoding_message_size(limit),
            )
            .add_service(pb::admin_server::AdminServer::new(admin::AdminService {
                app: app.clone(),
            }));
        self.serve(listener, routes, app.metrics().clone(), "full", stop)
            .await
    }

    /// Serves Embedder and Models over `embedder` alone until `stop` is set, then drains.
    pub async fn serve_embed_only(
        self,
        listener: TcpListener,
        embedder: EmbedHandle,
        own: Arc<crate::metrics::Registry>,
        stop: watch::Receiver<bool>,
    ) -> Result<()> {
        let limit = self.limit;
        let routes = self
            .base
            .clone()
            .add_service(
                pb::embedder_server::EmbedderServer::new(EmbedderService {
                    embedder: embedder.clone(),
                })
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            )
            .add_service(pb::models_server::ModelsServer::new(ModelsService {
                embedder,
                store: None,
                app: None,
            }));
        self.serve(listener, routes, own, "embed-only", stop).await
    }

    async fn serve(
        self,
        listener: TcpListener,
        routes: Routes,
        rpc_metrics: Arc<crate::metrics::Registry>,
        mode: &'static str,
        stop: watch::Receiver<bool>,
    ) -> Result<()> {
        let local = listener.local_addr()?;
        let (reflection, reflection_alpha) = reflection()?;
        let health_port = self
            .health_listener
            .map(|l| health::spawn(l, self.health.clone()));
        let mut stopping = stop.clone();
        let incoming = self.security.incoming(listener);
        // Outermost first: metrics see the refusals of auth and of the stream bound, by
        // code; a caller refused by auth takes no stream.
        let server = Server::builder()
            .layer(metrics::RpcMetricsLayer {
                registry: rpc_metrics.clone(),
            })
            .layer(self.security.auth())
            .layer(streams::StreamLimitLayer::new(
                self.max_streams,
                rpc_metrics,
            ))
            .layer(tower::util::MapResponseLayer::new(oversize_response))
            .add_routes(routes.add_service(reflection).add_service(reflection_alpha))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stopping.wait_for(|s| *s).await;
            });
        tracing::info!(addr = %local, mode, tls = self.security.tls.is_some(), tokens = self.security.keyring.is_some(), "listening");
        let drained = drain(server, stop, self.grace).await;
        // The health port closes last, so a liveness probe passes while RPCs drain.
        if let Some(h) = health_port {
            h.abort();
        }
        drained
    }
}
