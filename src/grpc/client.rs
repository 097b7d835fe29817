//! The client side of the wire, so that tonic stays behind `grpc/` there too: the
//! connection flags every client takes (TLS, a client certificate, a bearer token), a
//! channel to a daemon that sends the token with every call, and the status calls fail
//! with. The CLI (`cli`) and the benchmark harness connect through here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

pub use tonic::Status;

/// A connection to a daemon; every call on it carries the token, when there is one.
pub type Channel = InterceptedService<tonic::transport::Channel, Bearer>;

/// How to reach a daemon that wants TLS or tokens. `global`: the flags may come after a
/// nested subcommand too (`likeness collections list --token ...`).
#[derive(Clone, Default, clap::Args)]
pub struct ConnectArgs {
    /// Use TLS and trust the daemon's certificate if this PEM CA signed it (an http://
    /// address is then dialled as https://).
    #[arg(long, env = "LIKENESS_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// A PEM client certificate to present, for a daemon that requires one (mutual TLS;
    /// with --tls-key and --tls-ca).
    #[arg(long, env = "LIKENESS_CLIENT_CERT", global = true)]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "LIKENESS_CLIENT_KEY", global = true)]
    pub tls_key: Option<PathBuf>,
    /// A bearer token sent with every call (`authorization: Bearer TOKEN`). The env var
    /// keeps it out of the process list.
    #[arg(long, env = "LIKENESS_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
}

// By hand: the token must not reach a debug print.
impl std::fmt::Debug for ConnectArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectArgs")
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("token", &self.token.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

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

/// Connects to `addr` (`http://host:port` or `https://...`) as `args` say.
pub async fn connect(addr: &str, args: &ConnectArgs) -> Result<Channel, String> {
    if args.tls_cert.is_some() != args.tls_key.is_some() {
        return Err("--tls-cert and --tls-key go together".into());
    }
    let tls = args.tls_ca.is_some() || addr.starts_with("https://");
    let url = match addr.strip_prefix("http://") {
        Some(rest) if tls => format!("https://{rest}"),
        _ => addr.to_string(),
    };
    let mut endpoint = Endpoint::from_shared(url)
        .map_err(|e| format!("--addr {addr}: {e}"))?
        .connect_timeout(Duration::from_secs(10));
    if tls {
        // No system roots are built in: the daemon's CA is named.
        let Some(ca) = &args.tls_ca else {
            return Err(format!(
                "{addr}: TLS needs --tls-ca, the CA that signed the daemon's certificate"
            ));
        };
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("tls-ca", ca)?));
        if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
            config = config.identity(Identity::from_pem(
                read("tls-cert", cert)?,
                read("tls-key", key)?,
            ));
        }
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| format!("TLS: {}", with_causes(&e)))?;
    } else if args.tls_cert.is_some() {
        return Err("--tls-cert needs TLS: give --tls-ca too".into());
    }
    let bearer = match &args.token {
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
