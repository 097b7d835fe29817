//! Configuration in two stages: what the user typed (flags, `LIKENESS_*` env vars, an
//! optional TOML file) and the resolved [`Config`] the daemon runs with.
//! Precedence: flag > env > file > default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::embed::{BatchConfig, ConvSearch, Device};
use crate::types::Limits;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// `likeness serve` flags. Every one has an env var and a TOML key of the same name
/// (`--data-dir` = `LIKENESS_DATA_DIR` = `data_dir`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML config file; its keys are the flag names with underscores.
    #[arg(long, env = "LIKENESS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:50051].
    #[arg(long, env = "LIKENESS_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Where Prometheus metrics are served (GET /metrics), or `off`
    /// [default: 127.0.0.1:9090].
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
    #[arg(long = "model", env = "LIKENESS_MODELS", value_delimiter = ',', value_parser = parse_model)]
    pub models: Vec<(String, PathBuf)>,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct OptionalAddr(pub Option<SocketAddr>);

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
        .map_err(|e| format!("{s:?}: {e} (an address such as 127.0.0.1:9090, or off)"))
}

fn parse_model(s: &str) -> Result<(String, PathBuf), String> {
    s.split_once('=')
        .filter(|(n, p)| !n.is_empty() && !p.is_empty())
        .map(|(n, p)| (n.to_string(), PathBuf::from(p)))
        .ok_or_else(|| format!("--model {s:?}: expected NAME=PATH"))
}

/// The TOML file: the same keys as the flags, all optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub metrics_listen: Option<OptionalAddr>,
    pub data_dir: Option<PathBuf>,
    pub embed_only: Option<bool>,
    pub health_listen: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub tokens_file: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    pub log: Option<String>,
    pub max_k: Option<usize>,
    pub max_message_bytes: Option<usize>,
    pub max_batch: Option<usize>,
    pub cache_mb: Option<u64>,
    pub index_threads: Option<usize>,
    pub shutdown_grace_secs: Option<u64>,
    pub search_threads: Option<usize>,
    pub search_queue: Option<usize>,
    pub max_model_mb: Option<usize>,
    pub reembed_rate: Option<u64>,
    /// name -> manifest path
    pub models: Option<std::collections::BTreeMap<String, PathBuf>>,
    pub device: Option<String>,
    pub cuda_conv_search: Option<String>,
    pub embed_max_batch: Option<usize>,
    pub embed_max_delay_ms: Option<u64>,
    pub embed_queue: Option<usize>,
    pub embed_threads: Option<usize>,
    pub embed_spin: Option<bool>,
    pub embed_pad: Option<bool>,
}

/// The resolved configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    /// None: no metrics port.
    pub metrics_listen: Option<SocketAddr>,
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
            metrics_listen: Some("127.0.0.1:9090".parse().expect("valid address")),
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
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let d = Config::default();
        let cfg = Config {
            listen: args.listen.or(file.listen).unwrap_or(d.listen),
            metrics_listen: args
                .metrics_listen
                .or(file.metrics_listen)
                .map_or(d.metrics_listen, |a| a.0),
            data_dir: args
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or(d.data_dir),
            embed_only: args.embed_only.or(file.embed_only).unwrap_or(d.embed_only),
            health_listen: args
                .health_listen
                .or(file.health_listen)
                .or(d.health_listen),
            tls_cert: args.tls_cert.clone().or(file.tls_cert),
            tls_key: args.tls_key.clone().or(file.tls_key),
            tls_client_ca: args.tls_client_ca.clone().or(file.tls_client_ca),
            tokens_file: args.tokens_file.clone().or(file.tokens_file),
            log_format: args.log_format.or(file.log_format).unwrap_or(d.log_format),
            log: args.log.clone().or(file.log).unwrap_or(d.log),
            max_message_bytes: args
                .max_message_bytes
                .or(file.max_message_bytes)
                .unwrap_or(d.max_message_bytes),
            cache_mb: args.cache_mb.or(file.cache_mb).unwrap_or(d.cache_mb),
            index_threads: args
                .index_threads
                .or(file.index_threads)
                .unwrap_or(d.index_threads),
            shutdown_grace_secs: args
                .shutdown_grace_secs
                .or(file.shutdown_grace_secs)
                .unwrap_or(d.shutdown_grace_secs),
            search_threads: args
                .search_threads
                .or(file.search_threads)
                .unwrap_or(d.search_threads),
            search_queue: args
                .search_queue
                .or(file.search_queue)
                .unwrap_or(d.search_queue),
            max_model_mb: args
                .max_model_mb
                .or(file.max_model_mb)
                .unwrap_or(d.max_model_mb),
            reembed_rate: args
                .reembed_rate
                .or(file.reembed_rate)
                .unwrap_or(d.reembed_rate),
            models: if !args.models.is_empty() {
                args.models.clone()
            } else if let Some(m) = file.models {
                m.into_iter().collect()
            } else {
                d.models
            },
            batch: BatchConfig {
                max_batch: args
                    .embed_max_batch
                    .or(file.embed_max_batch)
                    .unwrap_or(d.batch.max_batch),
                max_delay: args
                    .embed_max_delay_ms
                    .or(file.embed_max_delay_ms)
                    .map_or(d.batch.max_delay, std::time::Duration::from_millis),
                queue: args
                    .embed_queue
                    .or(file.embed_queue)
                    .unwrap_or(d.batch.queue),
                device: match args.device.clone().or(file.device) {
                    Some(s) => s.parse::<Device>()?,
                    None => d.batch.device,
                },
                conv_search: match args.cuda_conv_search.clone().or(file.cuda_conv_search) {
                    Some(s) => s.parse::<ConvSearch>()?,
                    None => d.batch.conv_search,
                },
                threads: or_cores(args.embed_threads.or(file.embed_threads).unwrap_or(0)),
                spin: args.embed_spin.or(file.embed_spin).unwrap_or(d.batch.spin),
                pad: args.embed_pad.or(file.embed_pad).or(d.batch.pad),
            },
            limits: Limits {
                max_k: args.max_k.or(file.max_k).unwrap_or(d.limits.max_k),
                max_batch: args
                    .max_batch
                    .or(file.max_batch)
                    .unwrap_or(d.limits.max_batch),
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

fn read_file(path: &Path) -> Result<FileConfig, String> {
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
