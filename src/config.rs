//! Configuration in two stages: what the user typed (flags, `LIKENESS_*` env vars, an
//! optional TOML file) and the resolved [`Config`] the daemon runs with.
//! Precedence: flag > env > file > default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::embed::{BatchConfig, ConvSearch, Device};
use crate::types::Limits;

/// Where metrics are served unless told otherwise: not 9090 (a Prometheus server's own
/// port) nor 9100-9999 (allocated to Prometheus exporters, all of it), nor Linux's
/// ephemeral range (32768-60999).
pub const DEFAULT_METRICS: &str = "127.0.0.1:20151";

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// `likeness serve` settings, each declared once: a flag, an env var and a TOML key of
/// the same name (`--data-dir` = `LIKENESS_DATA_DIR` = `data_dir`). The file parses into
/// this same struct, and [`Config::resolve`] lays the flags over it, then the defaults
/// under both.
#[derive(Debug, Clone, Default, clap::Args, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML config file; its keys are the flag names with underscores.
    #[arg(long, env = "LIKENESS_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:50051].
    #[arg(long, env = "LIKENESS_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Where Prometheus metrics are served (GET /metrics), or `off`. The default is outside
    /// Prometheus's own ports (9090 is its server's; 9100-9999 are its exporters'); when
    /// it is taken (a second daemon on the host), metrics go to a free port, which is
    /// logged. An address given here that is taken fails the start
    /// [default: 127.0.0.1:20151].
    #[arg(long, env = "LIKENESS_METRICS_LISTEN", value_parser = parse_optional_addr)]
    pub metrics_listen: Option<OptionalAddr>,
    /// Directory for the store and index snapshots [default: ./likeness-data].
    #[arg(long, env = "LIKENESS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Serve inference only: Embedder and Models (with health and reflection), no store.
    /// The data dir is then neither opened nor created, whatever it is set to; Items
    /// and Collections answer UNIMPLEMENTED. For a tier of stateless embedding replicas
    /// [default: false].
    #[arg(long, env = "LIKENESS_EMBED_ONLY", num_args = 0..=1, default_missing_value = "true")]
    pub embed_only: Option<bool>,
    /// Also serve grpc.health.v1, and nothing else, in plaintext on this address (for
    /// Kubernetes' gRPC probes, which cannot speak TLS) [default: off].
    #[arg(long, env = "LIKENESS_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// Serve TLS with this PEM certificate chain (with --tls-key); plaintext is then
    /// refused on the gRPC port. Re-read on SIGHUP [default: plaintext].
    #[arg(long, env = "LIKENESS_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert. Re-read on SIGHUP.
    #[arg(long, env = "LIKENESS_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by these PEM CA certificates (mutual TLS;
    /// needs --tls-cert). Re-read on SIGHUP [default: no client certificates].
    #[arg(long, env = "LIKENESS_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Require a bearer token on every RPC but health and reflection: a file with one
    /// `read TOKEN` or `write TOKEN` per line. Re-read on SIGHUP [default: no tokens].
    #[arg(long, env = "LIKENESS_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// Log format [default: human].
    #[arg(long, env = "LIKENESS_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log filter, tracing-subscriber syntax [default: info,ort=warn].
    #[arg(long, env = "LIKENESS_LOG")]
    pub log: Option<String>,
    /// Largest k a search may ask for [default: 10000].
    #[arg(long, env = "LIKENESS_MAX_K")]
    pub max_k: Option<usize>,
    /// Largest gRPC message, in bytes, before RESOURCE_EXHAUSTED [default: 67108864].
    #[arg(long, env = "LIKENESS_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Most items in one request [default: 100000].
    #[arg(long, env = "LIKENESS_MAX_BATCH")]
    pub max_batch: Option<usize>,
    /// sled page cache, in MiB [default: 32]. The ANN index and the catalogue are in
    /// memory anyway; sled only caches item records, read by Get, id queries and rebuilds.
    #[arg(long, env = "LIKENESS_CACHE_MB")]
    pub cache_mb: Option<u64>,
    /// Threads that insert into an index per batch and at rebuild; 0 = all cores [default: 0].
    #[arg(long, env = "LIKENESS_INDEX_THREADS")]
    pub index_threads: Option<usize>,
    /// Seconds to let in-flight RPCs finish on SIGTERM [default: 30].
    #[arg(long, env = "LIKENESS_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<u64>,
    /// Threads that run searches; 0 = all cores [default: 0].
    #[arg(long, env = "LIKENESS_SEARCH_THREADS")]
    pub search_threads: Option<usize>,
    /// Searches that may wait for a thread before RESOURCE_EXHAUSTED [default: 4096].
    #[arg(long, env = "LIKENESS_SEARCH_QUEUE")]
    pub search_queue: Option<usize>,
    /// Streaming RPCs (UpsertStream, EmbedStream, the mining streams, Publish) open at
    /// once, over all connections; one more is answered RESOURCE_EXHAUSTED. Each open
    /// stream holds memory (its HTTP/2 buffers, mining's read-ahead) [default: 2048].
    #[arg(long, env = "LIKENESS_MAX_STREAMS")]
    pub max_streams: Option<usize>,
    /// The largest .onnx file Models.Publish accepts, MiB [default: 512].
    #[arg(long, env = "LIKENESS_MAX_MODEL_MB")]
    pub max_model_mb: Option<usize>,
    /// Models.Activate re-embeds at most this many items per second, leaving the
    /// model's capacity to live requests (0: as fast as it can) [default: 0].
    #[arg(long, env = "LIKENESS_REEMBED_RATE")]
    pub reembed_rate: Option<u64>,
    /// A model (an embedder or a pair model), NAME=PATH to its TOML manifest or to an
    /// .onnx carrying one (see `likeness pack`); repeatable. None given: the shipped
    /// fmnist-triplet embedder and fmnist-pair pair model.
    /// In the file, a table: `[models]` then `name = "path"` lines.
    #[arg(long = "model", env = "LIKENESS_MODELS", value_delimiter = ',', value_parser = parse_model)]
    #[serde(default, with = "models_table")]
    pub models: Option<Vec<(String, PathBuf)>>,
    /// Where inference runs: auto, cpu, cuda or cuda:N [default: auto].
    #[arg(long, env = "LIKENESS_DEVICE")]
    pub device: Option<String>,
    /// On CUDA, how cuDNN picks convolution algorithms: heuristic, exhaustive (benchmarks
    /// each new batch shape on its first request) or default [default: heuristic].
    #[arg(long, env = "LIKENESS_CUDA_CONV_SEARCH")]
    pub cuda_conv_search: Option<String>,
    /// Largest dynamic batch per model [default: 64].
    #[arg(long, env = "LIKENESS_EMBED_MAX_BATCH")]
    pub embed_max_batch: Option<usize>,
    /// How long a batch waits to fill, in milliseconds [default: 2].
    #[arg(long, env = "LIKENESS_EMBED_MAX_DELAY_MS")]
    pub embed_max_delay_ms: Option<u64>,
    /// Inputs that may queue per tower before unary calls get RESOURCE_EXHAUSTED [default: 4096].
    #[arg(long, env = "LIKENESS_EMBED_QUEUE")]
    pub embed_queue: Option<usize>,
    /// ONNX Runtime intra-op threads per tower; 0 = all cores [default: 0].
    #[arg(long, env = "LIKENESS_EMBED_THREADS")]
    pub embed_threads: Option<usize>,
    /// Let ONNX Runtime's idle intra-op threads spin waiting for work (faster hand-offs,
    /// but they take cores from gRPC and decoding) [default: false].
    #[arg(long, env = "LIKENESS_EMBED_SPIN")]
    pub embed_spin: Option<bool>,
    /// Pad every inference batch to --embed-max-batch rows, so that each run has one
    /// shape: cuDNN is set up again, at a cost of milliseconds, whenever the shape of a
    /// convolution's input changes [default: true on CUDA, false on CPU].
    #[arg(long, env = "LIKENESS_EMBED_PAD")]
    pub embed_pad: Option<bool>,
}

/// An address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct OptionalAddr(pub Option<SocketAddr>);

impl From<OptionalAddr> for String {
    fn from(a: OptionalAddr) -> String {
        a.0.map_or_else(|| "off".to_string(), |a| a.to_string())
    }
}

impl TryFrom<String> for OptionalAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        parse_optional_addr(&s)
    }
}

fn parse_optional_addr(s: &str) -> Result<OptionalAddr, String> {
    if s.eq_ignore_ascii_case("off") || s.is_empty() {
        return Ok(OptionalAddr(None));
    }
    s.parse::<SocketAddr>()
        .map(|a| OptionalAddr(Some(a)))
        .map_err(|e| format!("{s:?}: {e} (an address such as 127.0.0.1:20151, or off)"))
}

fn parse_model(s: &str) -> Result<(String, PathBuf), String> {
    s.split_once('=')
        .filter(|(n, p)| !n.is_empty() && !p.is_empty())
        .map(|(n, p)| (n.to_string(), PathBuf::from(p)))
        .ok_or_else(|| format!("--model {s:?}: expected NAME=PATH"))
}

/// `--model NAME=PATH` flags are a list; the file's `[models]` is a table of the same.
mod models_table {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    type Models = Option<Vec<(String, PathBuf)>>;

    pub fn serialize<S: Serializer>(models: &Models, s: S) -> Result<S::Ok, S::Error> {
        models
            .as_ref()
            .map(|m| m.iter().cloned().collect::<BTreeMap<_, _>>())
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Models, D::Error> {
        let table = Option::<BTreeMap<String, PathBuf>>::deserialize(d)?;
        Ok(table.map(|t| t.into_iter().collect()))
    }
}

/// The resolved configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    /// None: no metrics port.
    pub metrics_listen: Option<SocketAddr>,
    /// `metrics_listen` is the default, not asked for: if taken, use a free port instead.
    pub metrics_fallback: bool,
    pub data_dir: PathBuf,
    /// No store: serve Embedder and Models only (`data_dir` is not used).
    pub embed_only: bool,
    /// A second, plaintext listener with grpc.health.v1 only.
    pub health_listen: Option<SocketAddr>,
    /// TLS on the gRPC port: the certificate chain and its key (both or neither).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS: client certificates must be signed by these CAs.
    pub tls_client_ca: Option<PathBuf>,
    /// Bearer tokens (`read TOKEN` / `write TOKEN` lines); None: no tokens needed.
    pub tokens_file: Option<PathBuf>,
    pub log_format: LogFormat,
    pub log: String,
    pub max_message_bytes: usize,
    pub cache_mb: u64,
    pub index_threads: usize,
    pub shutdown_grace_secs: u64,
    pub search_threads: usize,
    pub search_queue: usize,
    /// Streaming RPCs open at once, beyond which one more is RESOURCE_EXHAUSTED.
    pub max_streams: usize,
    /// The largest .onnx file Models.Publish accepts, in MiB.
    pub max_model_mb: usize,
    /// Items per second Models.Activate re-embeds at most; 0: no cap.
    pub reembed_rate: u64,
    /// Embedders to load (name, manifest). Empty: none.
    pub models: Vec<(String, PathBuf)>,
    pub batch: BatchConfig,
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:50051".parse().expect("valid address"),
            metrics_listen: Some(DEFAULT_METRICS.parse().expect("valid address")),
            metrics_fallback: true,
            data_dir: PathBuf::from("./likeness-data"),
            embed_only: false,
            health_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tokens_file: None,
            log_format: LogFormat::Human,
            log: "info,ort=warn".into(),
            max_message_bytes: 64 << 20,
            cache_mb: 32,
            index_threads: 0,
            shutdown_grace_secs: 30,
            search_threads: 0,
            search_queue: 4096,
            max_streams: 2048,
            max_model_mb: 512,
            reembed_rate: 0,
            // The shipped models, where this binary was built; elsewhere none (a binary
            // copied to another machine names its models with --model).
            models: [
                crate::embed::default_model(),
                crate::embed::default_pair_model(),
            ]
            .into_iter()
            .filter(|(_, path)| path.exists())
            .collect(),
            batch: BatchConfig::default(),
            limits: Limits::default(),
        }
    }
}

impl Config {
    /// A config with defaults and the given data dir (what tests use; no metrics port,
    /// since many run at once).
    pub fn with_data_dir(dir: impl Into<PathBuf>) -> Self {
        Config {
            data_dir: dir.into(),
            metrics_listen: None,
            ..Config::default()
        }
    }

    /// Resolves flags and env (already merged by clap) over the file over defaults.
    pub fn resolve(args: &ServeArgs) -> Result<Config, String> {
        let a = match &args.config {
            Some(path) => over(args, read_file(path)?)
                .map_err(|e| format!("config file {}: {e}", path.display()))?,
            None => args.clone(),
        };
        let d = Config::default();
        let cfg = Config {
            listen: a.listen.unwrap_or(d.listen),
            metrics_listen: a.metrics_listen.map_or(d.metrics_listen, |m| m.0),
            metrics_fallback: a.metrics_listen.is_none(),
            data_dir: a.data_dir.unwrap_or(d.data_dir),
            embed_only: a.embed_only.unwrap_or(d.embed_only),
            health_listen: a.health_listen.or(d.health_listen),
            tls_cert: a.tls_cert,
            tls_key: a.tls_key,
            tls_client_ca: a.tls_client_ca,
            tokens_file: a.tokens_file,
            log_format: a.log_format.unwrap_or(d.log_format),
            log: a.log.unwrap_or(d.log),
            max_message_bytes: a.max_message_bytes.unwrap_or(d.max_message_bytes),
            cache_mb: a.cache_mb.unwrap_or(d.cache_mb),
            index_threads: a.index_threads.unwrap_or(d.index_threads),
            shutdown_grace_secs: a.shutdown_grace_secs.unwrap_or(d.shutdown_grace_secs),
            search_threads: a.search_threads.unwrap_or(d.search_threads),
            search_queue: a.search_queue.unwrap_or(d.search_queue),
            max_streams: a.max_streams.unwrap_or(d.max_streams),
            max_model_mb: a.max_model_mb.unwrap_or(d.max_model_mb),
            reembed_rate: a.reembed_rate.unwrap_or(d.reembed_rate),
            models: a.models.unwrap_or(d.models),
            batch: BatchConfig {
                max_batch: a.embed_max_batch.unwrap_or(d.batch.max_batch),
                max_delay: a
                    .embed_max_delay_ms
                    .map_or(d.batch.max_delay, std::time::Duration::from_millis),
                queue: a.embed_queue.unwrap_or(d.batch.queue),
                device: match a.device {
                    Some(s) => s.parse::<Device>()?,
                    None => d.batch.device,
                },
                conv_search: match a.cuda_conv_search {
                    Some(s) => s.parse::<ConvSearch>()?,
                    None => d.batch.conv_search,
                },
                threads: or_cores(a.embed_threads.unwrap_or(0)),
                spin: a.embed_spin.unwrap_or(d.batch.spin),
                pad: a.embed_pad.or(d.batch.pad),
            },
            limits: Limits {
                max_k: a.max_k.unwrap_or(d.limits.max_k),
                max_batch: a.max_batch.unwrap_or(d.limits.max_batch),
                ..d.limits
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if self.limits.max_k == 0 {
            return Err("max_k must be at least 1".into());
        }
        if self.limits.max_batch == 0 {
            return Err("max_batch must be at least 1".into());
        }
        if self.batch.max_batch == 0 || self.batch.queue == 0 {
            return Err("embed_max_batch and embed_queue must be at least 1".into());
        }
        if self.max_streams == 0 {
            return Err("max_streams must be at least 1".into());
        }
        if self.search_queue == 0 {
            return Err("search_queue must be at least 1".into());
        }
        if self.max_message_bytes < 1024 {
            return Err("max_message_bytes must be at least 1024".into());
        }
        if self.embed_only && self.models.is_empty() {
            return Err("embed_only serves models only, and none is configured (--model)".into());
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("tls_cert and tls_key go together: give both or neither".into());
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return Err("tls_client_ca needs tls_cert and tls_key (mutual TLS is TLS)".into());
        }
        // Port 0 (any free port) may well appear on both.
        if self.health_listen == Some(self.listen) && self.listen.port() != 0 {
            return Err(format!(
                "health_listen {} is the listen address; give the health port its own",
                self.listen
            ));
        }
        Ok(())
    }

    /// Index threads with 0 resolved to the number of cores.
    pub fn index_threads(&self) -> usize {
        or_cores(self.index_threads)
    }

    /// Search threads with 0 resolved to the number of cores.
    pub fn search_threads(&self) -> usize {
        or_cores(self.search_threads)
    }

    /// The core's own settings: what the collections registry needs of this config.
    pub fn core(&self) -> crate::collections::Settings {
        crate::collections::Settings {
            data_dir: self.data_dir.clone(),
            cache_bytes: self.cache_mb << 20,
            limits: self.limits.clone(),
            index_threads: self.index_threads(),
        }
    }
}

fn or_cores(n: usize) -> usize {
    if n > 0 {
        n
    } else {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    }
}

/// The settings given as flags (or env) laid over those of the file: one key at a time,
/// through their serialized form, so that a setting is declared once, in [`ServeArgs`].
fn over(flags: &ServeArgs, file: ServeArgs) -> Result<ServeArgs, serde_json::Error> {
    let mut merged = serde_json::to_value(file)?;
    if let (Some(merged), serde_json::Value::Object(flags)) =
        (merged.as_object_mut(), serde_json::to_value(flags)?)
    {
        for (key, value) in flags {
            if !value.is_null() {
                merged.insert(key, value);
            }
        }
    }
    serde_json::from_value(merged)
}

fn read_file(path: &Path) -> Result<ServeArgs, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("config file {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/likeness.example.toml");
        let file = read_file(&path).unwrap();
        assert_eq!(file.max_k, Some(10_000));
        let args = ServeArgs {
            config: Some(path),
            ..Default::default()
        };
        Config::resolve(&args).unwrap();
    }

    #[test]
    fn flag_beats_file_and_file_beats_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "max_k = 50\ncache_mb = 64\n").unwrap();
        let args = ServeArgs {
            config: Some(path),
            max_k: Some(7),
            ..Default::default()
        };
        let cfg = Config::resolve(&args).unwrap();
        assert_eq!(cfg.limits.max_k, 7);
        assert_eq!(cfg.cache_mb, 64);
        assert_eq!(cfg.listen, Config::default().listen);
    }

    #[test]
    fn gpu_batching_settings_parse_and_a_bad_conv_search_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "cuda_conv_search = \"exhaustive\"\nembed_pad = true\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..Default::default()
        };
        let cfg = Config::resolve(&args).unwrap();
        assert_eq!(cfg.batch.conv_search, ConvSearch::Exhaustive);
        assert_eq!(cfg.batch.pad, Some(true));
        let cfg = Config::resolve(&ServeArgs::default()).unwrap();
        assert_eq!(cfg.batch.conv_search, ConvSearch::Heuristic);
        assert_eq!(cfg.batch.pad, None, "padding decided by the provider");
        let args = ServeArgs {
            cuda_conv_search: Some("fastest".into()),
            ..Default::default()
        };
        let err = Config::resolve(&args).unwrap_err();
        assert!(
            err.contains("\"fastest\"") && err.contains("heuristic"),
            "{err}"
        );
    }

    #[test]
    fn unknown_key_in_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "max_kk = 50\n").unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..Default::default()
        };
        let err = Config::resolve(&args).unwrap_err();
        assert!(err.contains("max_kk"), "{err}");
    }

    #[test]
    fn embed_only_needs_a_model_and_health_needs_its_own_port() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "embed_only = true\n[models]\n").unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..Default::default()
        };
        let err = Config::resolve(&args).unwrap_err();
        assert!(err.contains("embed_only"), "{err}");

        let args = ServeArgs {
            listen: Some("127.0.0.1:7000".parse().unwrap()),
            health_listen: Some("127.0.0.1:7000".parse().unwrap()),
            ..Default::default()
        };
        let err = Config::resolve(&args).unwrap_err();
        assert!(err.contains("health_listen"), "{err}");
    }

    #[test]
    fn tls_key_and_cert_go_together_and_client_ca_needs_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "tls_cert = \"/certs/tls.crt\"\n").unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            ..Default::default()
        };
        let err = Config::resolve(&args).unwrap_err();
        assert!(err.contains("tls_key"), "{err}");
        let args = ServeArgs {
            config: Some(path),
            tls_key: Some("/certs/tls.key".into()),
            tokens_file: Some("/tokens/tokens".into()),
            ..Default::default()
        };
        let cfg = Config::resolve(&args).unwrap();
        assert_eq!(cfg.tls_cert, Some(PathBuf::from("/certs/tls.crt")));
        assert_eq!(cfg.tokens_file, Some(PathBuf::from("/tokens/tokens")));
        let args = ServeArgs {
            tls_client_ca: Some("/certs/ca.crt".into()),
            ..Default::default()
        };
        let err = Config::resolve(&args).unwrap_err();
        assert!(err.contains("tls_client_ca"), "{err}");
    }
}
