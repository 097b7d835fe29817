//! `likeness publish` (a new model version, streamed to the daemon) and `likeness
//! activate` (a collection switched to it, optionally waiting for the switch).

use std::path::PathBuf;
use std::time::Duration;

use crate::cli::ConnectArgs;
use crate::embed::manifest::Manifest;
use crate::grpc::pb;
use crate::grpc::pb::collections_client::CollectionsClient;
use crate::grpc::pb::models_client::ModelsClient;

/// Bytes per ModelChunk.
const CHUNK: usize = 1 << 20;

#[derive(Debug, clap::Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub conn: ConnectArgs,
    /// The model's TOML manifest; its `name` and `version` say what is published.
    #[arg(long)]
    pub manifest: PathBuf,
    /// The .onnx file [default: the file the manifest's towers name, beside it]. Its
    /// SHA-256 is added to the manifest when the manifest has none.
    #[arg(long)]
    pub onnx: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ActivateArgs {
    #[command(flatten)]
    pub conn: ConnectArgs,
    /// The collection to switch.
    #[arg(long, short)]
    pub collection: String,
    /// The embedder to switch it to.
    #[arg(long)]
    pub model: String,
    /// A published version of it (empty: the model as the daemon loaded it at start).
    #[arg(long, default_value = "")]
    pub version: String,
    /// Wait until the collection has switched, showing progress on stderr.
    #[arg(long)]
    pub wait: bool,
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Publishes; prints the model as served (JSON).
pub async fn publish(daemon: &super::Daemon, args: PublishArgs) -> Result<(), String> {
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let mut text = String::from_utf8(read(&args.manifest)?)
        .map_err(|_| format!("{}: not UTF-8", args.manifest.display()))?;
    let manifest =
        Manifest::parse(&text).map_err(|e| format!("{}: {e}", args.manifest.display()))?;
    let onnx = match &args.onnx {
        Some(p) => p.clone(),
        None => {
            let files = manifest.files();
            let [file] = files.as_slice() else {
                return Err(format!(
                    "{} names {} files; give --onnx",
                    args.manifest.display(),
                    files.len()
                ));
            };
            args.manifest
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join(file)
        }
    };
    let bytes = read(&onnx)?;
    if manifest.sha256.is_none() {
        text = format!("sha256 = \"{}\"\n{text}", sha256_hex(&bytes));
    }
    let mut chunks: Vec<pb::ModelChunk> = bytes
        .chunks(CHUNK)
        .map(|b| pb::ModelChunk {
            bytes: b.to_vec(),
            ..Default::default()
        })
        .collect();
    if chunks.is_empty() {
        chunks.push(pb::ModelChunk::default());
    }
    chunks[0].name = manifest.name.clone();
    chunks[0].manifest = text;
    let info = ModelsClient::new(super::connect(daemon).await?)
        .publish(tokio_stream::iter(chunks))
        .await
        .map_err(super::status)?
        .into_inner();
    println!(
        "{}",
        serde_json::json!({
            "name": info.name,
            "version": info.version,
            "dimension": info.dimension,
            "bytes": bytes.len(),
            "execution_provider": info.execution_provider,
        })
    );
    Ok(())
}

fn activation_json(info: &pb::CollectionInfo) -> serde_json::Value {
    let a = info.activation.clone().unwrap_or_default();
    serde_json::json!({
        "collection": info.name,
        "model": info.model,
        "model_version": info.model_version,
        "count": info.count,
        "activation": {
            "state": a.state().as_str_name(),
            "model": a.model,
            "version": a.version,
            "done": a.done,
            "total": a.total,
            "rate": a.rate,
            "error": a.error,
        },
    })
}

/// Starts an activation; with --wait, follows it to the switch. Prints the collection's
/// state (JSON); a failed activation is an error.
pub async fn activate(daemon: &super::Daemon, args: ActivateArgs) -> Result<(), String> {
    let channel = super::connect(daemon).await?;
    let mut info = ModelsClient::new(channel.clone())
        .activate(pb::ActivateRequest {
            collection: args.collection.clone(),
            model: args.model,
            version: args.version,
        })
        .await
        .map_err(super::status)?
        .into_inner();
    if args.wait {
        let mut colls = CollectionsClient::new(channel);
        loop {
            let a = info.activation.clone().unwrap_or_default();
            match a.state() {
                pb::activation::State::Done => break,
                pb::activation::State::Failed => {
                    return Err(format!("the activation failed: {}", a.error));
                }
                _ => eprint!(
                    "\rre-embedding {}: {} of {} ({:.0} items/s)   ",
                    args.collection, a.done, a.total, a.rate
                ),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            info = colls
                .get_collection(pb::GetCollectionRequest {
                    name: args.collection.clone(),
                })
                .await
                .map_err(super::status)?
                .into_inner();
        }
        eprintln!();
    }
    println!("{}", activation_json(&info));
    Ok(())
}
