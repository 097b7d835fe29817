//! grpc.health.v1 alone on a plaintext port of its own (`--health-listen`). Kubelet's
//! gRPC probes cannot speak TLS, so once the main port does, they need another door;
//! this one shows the same reporter as the main port and serves nothing else.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::pb::health_server::{Health, HealthServer};

use crate::error::{Error, Result};

/// Binds the health port, if one is configured; called before anything slow, so that a
/// taken port fails the start at once.
pub(super) async fn bind(addr: Option<SocketAddr>) -> Result<Option<TcpListener>> {
    let Some(addr) = addr else { return Ok(None) };
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        Error::Io(std::io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} (health_listen): {e}"),
        ))
    })?;
    Ok(Some(listener))
}

/// Serves `health` on `listener` until `stop` turns true.
pub(super) fn spawn<H: Health>(
    listener: TcpListener,
    health: HealthServer<H>,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(addr = %addr, "health listening (plaintext, grpc.health.v1 only)");
    }
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio::spawn(async move {
        let served = Server::builder()
            .add_service(health)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "health port failed");
        }
    })
}
