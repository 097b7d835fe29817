//! The gRPC transport: thin services (convert -> app -> convert), the one Error ->
//! Status map, health (also alone on a plaintext port), reflection, TLS with
//! certificates reloaded in place, bearer tokens, limits and the graceful drain. The
//! daemon is assembled in [`crate::daemon`]; [`Transport`] builds the server from the
//! app it is given. Only this module knows about tonic.

mod admin;
mod auth;
pub mod client;
mod collections;
pub mod convert;
mod embedder;
mod health;
mod items;
mod metrics;
mod miner;
mod server;
mod status;
mod streams;
mod tls;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::Status;

use crate::config::Config;
use crate::error::{Error, Result};
pub use server::{Health, Transport};

/// The generated protobuf types and gRPC stubs of `likeness.v1`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("likeness.v1");
}

/// The encoded descriptor set of likeness.v1, served by reflection.
pub const DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/likeness_descriptor.bin"));

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

/// Runs the server until it ends by itself (its shutdown signal drained every RPC) or,
/// once `stop` is set, until the grace period has passed; then what is still running
/// is dropped.
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
