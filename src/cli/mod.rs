//! The client side of the binary: `likeness collections|upsert|search|get|delete` and
//! `embed|classify|verify`, `mine` and `backup` talk to a running daemon at `--addr`;
//! `restore` works offline on a data dir.

pub mod admin;
mod images;
pub mod infer;
pub mod load;
pub mod mine;
pub mod models;
mod sink;
mod window;

use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::ServeArgs;
use crate::grpc::client::Channel;
use crate::grpc::pb;
use crate::grpc::pb::collections_client::CollectionsClient;
use crate::grpc::pb::items_client::ItemsClient;

#[derive(Debug, Parser)]
#[command(
    name = "likeness",
    version,
    about = "Similarity learning as a service: durable vectors, ANN search, hard-negative mining over gRPC"
)]
pub struct Cli {
    /// Address of the daemon the client subcommands talk to.
    #[arg(
        long,
        env = "LIKENESS_ADDR",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub addr: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    // Boxed: the flags outweigh every client subcommand.
    Serve(Box<ServeArgs>),
    /// Create, list, inspect and delete collections.
    Collections(CollectionsArgs),
    /// Bulk-load items from .npy, JSONL or CSV.
    Upsert(UpsertArgs),
    /// Nearest neighbours of a vector or of a stored item.
    Search(SearchArgs),
    /// Fetch items by id (JSON lines).
    Get(GetArgs),
    /// Delete items by id.
    Delete(DeleteArgs),
    /// Embed image files or folders with a model: .npy, .jsonl, or JSON lines on stdout.
    Embed(infer::EmbedArgs),
    /// Identify images or stored items: a kNN vote in a collection (JSON lines).
    Classify(infer::ClassifyArgs),
    /// Are two images (or stored items) the same? Distance, probability, decision (JSON).
    Verify(infer::VerifyArgs),
    /// Mine triplets (or pairs) from a collection: JSON lines, then the stream's stats.
    Mine(mine::MineArgs),
    /// Write a copy of a model's .onnx that carries its TOML manifest in the ONNX
    /// metadata_props, so that `--model NAME=FILE.onnx` needs no TOML beside it.
    Pack(PackArgs),
    /// Ask the daemon for an online backup of its data dir into a directory on its
    /// machine (JSON summary).
    Backup(admin::BackupArgs),
    /// Restore a backup into a new data dir, offline; `likeness serve --data-dir` then
    /// serves it.
    Restore(admin::RestoreArgs),
    /// Publish a new version of a model to the daemon (manifest + .onnx; JSON out).
    Publish(models::PublishArgs),
    /// Switch a collection to another model or version: re-embedded in the background,
    /// then switched at once (`--wait` follows it).
    Activate(models::ActivateArgs),
}

#[derive(Debug, clap::Args)]
pub struct PackArgs {
    /// The model's TOML manifest (its towers or pair model must use one .onnx file).
    #[arg(long)]
    pub manifest: std::path::PathBuf,
    /// Where to write the .onnx.
    #[arg(long)]
    pub out: std::path::PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum MetricArg {
    Cosine,
    L2,
    Ip,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PrecisionArg {
    F32,
    F16,
    I8,
}

#[derive(Debug, clap::Args)]
pub struct CollectionsArgs {
    #[command(subcommand)]
    pub cmd: CollectionsCmd,
    #[command(flatten)]
    pub conn: ConnectArgs,
}

#[derive(Debug, Subcommand)]
pub enum CollectionsCmd {
    /// Create a collection.
    Create {
        name: String,
        /// Vector length (0 = the model's).
        #[arg(long, default_value_t = 0)]
        dimension: u32,
        /// Unset: the model's metric, or cosine.
        #[arg(long, value_enum)]
        metric: Option<MetricArg>,
        #[arg(long, value_enum, default_value = "f32")]
        precision: PrecisionArg,
        /// HNSW degree M (0 = server default).
        #[arg(long, default_value_t = 0)]
        connectivity: u32,
        /// HNSW ef at insertion (0 = server default).
        #[arg(long, default_value_t = 0)]
        expansion_add: u32,
        /// HNSW ef at search (0 = server default).
        #[arg(long, default_value_t = 0)]
        expansion_search: u32,
        /// An embedder that embeds items' and queries' inputs.
        #[arg(long, default_value = "")]
        model: String,
        /// A pair model for Verify and for re-ranking searches.
        #[arg(long, default_value = "")]
        pair_model: String,
    },
    /// List collections.
    List,
    /// Show one collection.
    Get { name: String },
    /// Delete a collection and its items.
    Delete { name: String },
}

#[derive(Debug, clap::Args)]
pub struct UpsertArgs {
    #[command(flatten)]
    pub conn: ConnectArgs,
    /// Target collection.
    #[arg(long, short)]
    pub collection: String,
    /// Input file: .npy (float32/float64, 2-D), .jsonl ({"id","label","metadata","vector"}) or .csv (header `id,label,<one column per dimension>`).
    pub file: std::path::PathBuf,
    /// Override the format guessed from the extension.
    #[arg(long, value_enum)]
    pub format: Option<load::Format>,
    /// For .npy: ids are this prefix plus the row number.
    #[arg(long, default_value = "")]
    pub id_prefix: String,
    /// For .npy: a text file with one label per row.
    #[arg(long)]
    pub labels: Option<std::path::PathBuf>,
    /// Items per request.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
}

#[derive(Debug, clap::Args)]
pub struct SearchArgs {
    #[command(flatten)]
    pub conn: ConnectArgs,
    #[arg(long, short)]
    pub collection: String,
    /// Query vector, comma-separated.
    #[arg(long, conflicts_with = "id", allow_hyphen_values = true)]
    pub vector: Option<String>,
    /// Query by a stored item's id.
    #[arg(long)]
    pub id: Option<String>,
    #[arg(long, short, default_value_t = 10)]
    pub k: u32,
    /// Only these labels (repeatable).
    #[arg(long)]
    pub label: Vec<String>,
    /// Never these labels (repeatable).
    #[arg(long)]
    pub exclude_label: Vec<String>,
    /// Metadata that must match, key=value (repeatable).
    #[arg(long, value_parser = parse_kv)]
    pub meta: Vec<(String, String)>,
    /// Brute force instead of the ANN index.
    #[arg(long)]
    pub exact: bool,
    /// HNSW ef for this query, below or above the collection's expansion_search (0 = that
    /// default).
    #[arg(long, default_value_t = 0)]
    pub expansion: u32,
}

#[derive(Debug, clap::Args)]
pub struct GetArgs {
    #[command(flatten)]
    pub conn: ConnectArgs,
    #[arg(long, short)]
    pub collection: String,
    #[arg(required = true)]
    pub ids: Vec<String>,
    #[arg(long)]
    pub with_vectors: bool,
}

#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub conn: ConnectArgs,
    #[arg(long, short)]
    pub collection: String,
    #[arg(required = true)]
    pub ids: Vec<String>,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

/// The daemon a client subcommand talks to, and how (TLS, token).
pub struct Daemon {
    pub addr: String,
    pub conn: ConnectArgs,
}

/// Runs one client subcommand; errors are the server's status, printed by `main`.
pub async fn run(addr: String, command: Command) -> Result<(), String> {
    let to = |conn: &ConnectArgs| Daemon {
        addr: addr.clone(),
        conn: conn.clone(),
    };
    match command {
        Command::Serve(_) => unreachable!("serve is handled by main"),
        Command::Pack(args) => {
            crate::embed::manifest::pack(&args.manifest, &args.out)?;
            println!("wrote {}", args.out.display());
            Ok(())
        }
        Command::Collections(args) => collections(&to(&args.conn), args.cmd).await,
        Command::Upsert(args) => upsert(&to(&args.conn), args).await,
        Command::Search(args) => search(&to(&args.conn), args).await,
        Command::Get(args) => get(&to(&args.conn), args).await,
        Command::Delete(args) => delete(&to(&args.conn), args).await,
        Command::Embed(args) => infer::embed(&to(&args.conn), args).await,
        Command::Classify(args) => infer::classify(&to(&args.conn), args).await,
        Command::Verify(args) => infer::verify(&to(&args.conn), args).await,
        Command::Mine(args) => mine::mine(&to(&args.conn), args).await,
        Command::Backup(args) => admin::backup(&to(&args.conn), args).await,
        Command::Restore(args) => admin::restore(args),
        Command::Publish(args) => models::publish(&to(&args.conn), args).await,
        Command::Activate(args) => models::activate(&to(&args.conn), args).await,
    }
}

/// A connected channel (TLS and the token as the target says).
pub async fn connect(daemon: &Daemon) -> Result<Channel, String> {
    daemon.conn.connect(&daemon.addr).await
}

fn items_client(ch: Channel) -> ItemsClient<Channel> {
    ItemsClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

pub(crate) fn status(s: crate::grpc::client::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

fn metric_name(m: i32) -> &'static str {
    match pb::Metric::try_from(m) {
        Ok(pb::Metric::L2) => "l2",
        Ok(pb::Metric::InnerProduct) => "ip",
        _ => "cosine",
    }
}

fn precision_name(p: i32) -> &'static str {
    match pb::Precision::try_from(p) {
        Ok(pb::Precision::F16) => "f16",
        Ok(pb::Precision::I8) => "i8",
        _ => "f32",
    }
}

/// A name, or "-" for none (so that columns stay put).
fn or_dash(name: &str) -> &str {
    if name.is_empty() { "-" } else { name }
}

fn print_info(c: &pb::CollectionInfo) {
    let idx = c.index.unwrap_or_default();
    println!(
        "{}\tdimension={}\tmetric={}\tprecision={}\tcount={}\tM={}\tef_add={}\tef_search={}\tmodel={}\tpair_model={}",
        c.name,
        c.dimension,
        metric_name(c.metric),
        precision_name(c.precision),
        c.count,
        idx.connectivity,
        idx.expansion_add,
        idx.expansion_search,
        or_dash(&c.model),
        or_dash(&c.pair_model)
    );
}

async fn collections(daemon: &Daemon, cmd: CollectionsCmd) -> Result<(), String> {
    let mut client = CollectionsClient::new(connect(daemon).await?);
    match cmd {
        CollectionsCmd::Create {
            name,
            dimension,
            metric,
            precision,
            connectivity,
            expansion_add,
            expansion_search,
            model,
            pair_model,
        } => {
            let info = client
                .create_collection(pb::CreateCollectionRequest {
                    name,
                    dimension,
                    metric: match metric {
                        None => pb::Metric::Unspecified,
                        Some(MetricArg::Cosine) => pb::Metric::Cosine,
                        Some(MetricArg::L2) => pb::Metric::L2,
                        Some(MetricArg::Ip) => pb::Metric::InnerProduct,
                    } as i32,
                    index: Some(pb::IndexParams {
                        connectivity,
                        expansion_add,
                        expansion_search,
                    }),
                    precision: match precision {
                        PrecisionArg::F32 => pb::Precision::F32,
                        PrecisionArg::F16 => pb::Precision::F16,
                        PrecisionArg::I8 => pb::Precision::I8,
                    } as i32,
                    model,
                    keep_inputs: None,
                    pair_model,
                })
                .await
                .map_err(status)?
                .into_inner();
            print_info(&info);
        }
        CollectionsCmd::List => {
            let list = client
                .list_collections(pb::ListCollectionsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            for c in &list.collections {
                print_info(c);
            }
        }
        CollectionsCmd::Get { name } => {
            let info = client
                .get_collection(pb::GetCollectionRequest { name })
                .await
                .map_err(status)?
                .into_inner();
            print_info(&info);
        }
        CollectionsCmd::Delete { name } => {
            let r = client
                .delete_collection(pb::DeleteCollectionRequest { name: name.clone() })
                .await
                .map_err(status)?
                .into_inner();
            println!("deleted collection {name} ({} items)", r.deleted);
        }
    }
    Ok(())
}

async fn upsert(daemon: &Daemon, args: UpsertArgs) -> Result<(), String> {
    let format = match args.format {
        Some(f) => f,
        None => load::Format::guess(&args.file)?,
    };
    let items = load::read(&args.file, format, &args.id_prefix, args.labels.as_deref())?;
    let total = items.len();
    let client = items_client(connect(daemon).await?);
    let batch = args.batch.max(1);
    let start = Instant::now();
    let mut done = 0usize;
    let mut inflight = tokio::task::JoinSet::new();
    let mut chunks = items.chunks(batch).map(|c| c.to_vec());
    let progress = load::Progress::new(total);
    loop {
        while inflight.len() < args.concurrency.max(1) {
            let Some(chunk) = chunks.next() else { break };
            let mut c = client.clone();
            let collection = args.collection.clone();
            inflight.spawn(async move {
                c.upsert(pb::UpsertRequest {
                    collection,
                    items: chunk,
                })
                .await
                .map(|r| r.into_inner().upserted as usize)
            });
        }
        let Some(res) = inflight.join_next().await else {
            break;
        };
        done += res.map_err(|e| e.to_string())?.map_err(status)?;
        progress.show(done, start.elapsed());
    }
    progress.finish();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "upserted {done} items into {} in {secs:.2} s ({:.0} items/s)",
        args.collection,
        done as f64 / secs.max(1e-9)
    );
    Ok(())
}

async fn search(daemon: &Daemon, args: SearchArgs) -> Result<(), String> {
    let kind = match (args.vector, args.id) {
        (Some(v), None) => pb::query::Kind::Vector(pb::Vector {
            values: load::parse_floats(&v)?,
        }),
        (None, Some(id)) => pb::query::Kind::Id(id),
        _ => return Err("give --vector or --id".into()),
    };
    let mut client = items_client(connect(daemon).await?);
    let r = client
        .search(pb::SearchRequest {
            collection: args.collection,
            query: Some(pb::Query { kind: Some(kind) }),
            k: args.k,
            filter: Some(pb::Filter {
                labels: args.label,
                exclude_labels: args.exclude_label,
                metadata: args.meta.into_iter().collect(),
            }),
            exact: args.exact,
            expansion: args.expansion,
            with_vectors: false,
            with_metadata: true,
            rerank: 0,
        })
        .await
        .map_err(status)?
        .into_inner();
    println!("rank\tdistance\tid\tlabel\tmetadata");
    for (i, h) in r.hits.iter().enumerate() {
        let meta: Vec<String> = h.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{}\t{:.6}\t{}\t{}\t{}",
            i + 1,
            h.distance,
            h.id,
            h.label,
            meta.join(",")
        );
    }
    Ok(())
}

async fn get(daemon: &Daemon, args: GetArgs) -> Result<(), String> {
    let mut client = items_client(connect(daemon).await?);
    let r = client
        .get(pb::GetRequest {
            collection: args.collection,
            ids: args.ids,
            with_vectors: args.with_vectors,
            with_inputs: false,
        })
        .await
        .map_err(status)?
        .into_inner();
    for item in r.items {
        let mut obj =
            serde_json::json!({ "id": item.id, "label": item.label, "metadata": item.metadata });
        if args.with_vectors {
            obj["vector"] = serde_json::json!(item.vector);
        }
        println!("{obj}");
    }
    Ok(())
}

async fn delete(daemon: &Daemon, args: DeleteArgs) -> Result<(), String> {
    let mut client = items_client(connect(daemon).await?);
    let r = client
        .delete(pb::DeleteRequest {
            collection: args.collection,
            ids: args.ids,
        })
        .await
        .map_err(status)?
        .into_inner();
    println!("deleted {} items", r.deleted);
    Ok(())
}

/// How to reach a daemon that wants TLS or tokens: the flags every client command takes.
/// `global`: the flags may come after a
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

impl ConnectArgs {
    /// A channel to `addr` as these flags say.
    pub async fn connect(&self, addr: &str) -> Result<Channel, String> {
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("--tls-cert and --tls-key go together".into());
        }
        let identity = self.tls_cert.as_deref().zip(self.tls_key.as_deref());
        crate::grpc::client::connect(
            addr,
            self.tls_ca.as_deref(),
            identity,
            self.token.as_deref(),
        )
        .await
    }
}
