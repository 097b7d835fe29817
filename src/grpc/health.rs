//! grpc.health.v1 alone on a plaintext port of its own (`--health-listen`). Kubelet's
//! gRPC probes cannot speak TLS, so once the main port does, they need another door;
//! this one shows the same reporter as the main port and serves nothing else.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

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

/// Serves `health` on `listener` until the returned task is aborted. The daemon aborts
/// it last, so the port keeps answering while in-flight RPCs drain (a liveness probe
/// then still passes) and closes only when the daemon is done.
pub(super) fn spawn(listener: TcpListener, health: Routes) -> JoinHandle<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(addr = %addr, "health listening (plaintext, grpc.health.v1 only)");
    }
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio::spawn(async move {
        let served = Server::builder()
            .add_routes(health)
            .serve_with_incoming(incoming)
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "health port failed");
        }
    })
}
