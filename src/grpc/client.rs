//! The client side of the wire, so that tonic stays behind `grpc/` there too: a channel
//! to a daemon (TLS, a client certificate) that sends a bearer token with every call,
//! and the status calls fail with. The CLI (`cli`, whose `ConnectArgs` are the flags)
//! and the benchmark harness connect through here.

use std::path::Path;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

pub use tonic::Status;

/// A connection to a daemon; every call on it carries the token, when there is one.
pub type Channel = InterceptedService<tonic::transport::Channel, Bearer>;

/// Adds `authorization: Bearer TOKEN` to each call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

fn read(flag: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("--{flag} {}: {e}", path.display()))
}

/// An error with its causes: tonic's own message is "transport error", and the reason
/// (refused, a certificate from an unknown issuer) is further down.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        // Some layers repeat their cause's text in their own.
        let said = c.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        cause = c.source();
    }
    text
}

/// Connects to `addr` (`http://host:port` or `https://...`): over TLS when `tls_ca`
/// (the CA that signed the daemon's certificate) is given or the address says https,
/// presenting `identity` (a PEM certificate and key) when given, and sending `token`
/// with every call. Errors name the option (`tls-ca`, `token`) they are about.
pub async fn connect(
    addr: &str,
    tls_ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
    token: Option<&str>,
) -> Result<Channel, String> {
    let tls = tls_ca.is_some() || addr.starts_with("https://");
    let url = match addr.strip_prefix("http://") {
        Some(rest) if tls => format!("https://{rest}"),
        _ => addr.to_string(),
    };
    let mut endpoint = Endpoint::from_shared(url)
        .map_err(|e| format!("--addr {addr}: {e}"))?
        .connect_timeout(Duration::from_secs(10));
    if tls {
        // No system roots are built in: the daemon's CA is named.
        let Some(ca) = tls_ca else {
            return Err(format!(
                "{addr}: TLS needs --tls-ca, the CA that signed the daemon's certificate"
            ));
        };
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("tls-ca", ca)?));
        if let Some((cert, key)) = identity {
            config = config.identity(Identity::from_pem(
                read("tls-cert", cert)?,
                read("tls-key", key)?,
            ));
        }
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| format!("TLS: {}", with_causes(&e)))?;
    } else if identity.is_some() {
        return Err("--tls-cert needs TLS: give --tls-ca too".into());
    }
    let bearer = match token {
        Some(token) => {
            let mut value = MetadataValue::try_from(format!("Bearer {token}"))
                .map_err(|_| "--token: only printable ASCII can be sent".to_string())?;
            value.set_sensitive(true);
            Some(value)
        }
        None => None,
    };
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {addr}: {}", with_causes(&e)))?;
    Ok(InterceptedService::new(channel, Bearer(bearer)))
}
