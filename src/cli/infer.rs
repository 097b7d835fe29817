//! The image-in client verbs: `likeness embed` (image files or folders to vectors, as
//! .npy or JSON lines), `likeness classify` and `likeness verify` (identification and
//! verification in a collection, by image file or by stored item id).

use std::fmt;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use crate::grpc::client::Channel;

use super::images::{image_files, image_input, next_chunk, read_file};
use super::sink::Sink;
use super::window::in_order;
use super::{Daemon, connect, items_client, load, status};
use crate::cli::ConnectArgs;
use crate::grpc::pb;
use crate::grpc::pb::embedder_client::EmbedderClient;
use crate::grpc::pb::models_client::ModelsClient;

/// Classify calls in flight at once (answers are printed in query order).
const CLASSIFY_WINDOW: usize = 4;

#[derive(Debug, clap::Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub conn: ConnectArgs,
    /// Image files (PNG, JPEG, WebP, BMP, GIF), or folders: a folder stands for its
    /// image files, sorted by name. Vectors come out in this order.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// The embedder (see ListModels). Unset: the daemon's first embedder by name.
    #[arg(long)]
    pub model: Option<String>,
    /// Write the vectors here; the extension picks the format: .npy (2-D float32, one
    /// row per image) or .jsonl ({"file", "vector"} per line). Unset: JSON lines on
    /// stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Images per Embed call (a call also stops at 32 MiB of image bytes).
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Embed calls in flight at once.
    #[arg(long, default_value_t = 2)]
    pub concurrency: usize,
}

#[derive(Debug, clap::Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    pub conn: ConnectArgs,
    /// A collection with a model (for image queries) or any collection (for --id).
    #[arg(long, short)]
    pub collection: String,
    /// Image files to classify, or folders (their image files, sorted by name).
    #[arg(required_unless_present = "id")]
    pub files: Vec<PathBuf>,
    /// Classify a stored item (repeatable); the item itself does not vote. Answered
    /// after the files.
    #[arg(long)]
    pub id: Vec<String>,
    /// Neighbours that vote.
    #[arg(long, short, default_value_t = 10)]
    pub k: u32,
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub conn: ConnectArgs,
    /// The collection whose metric, logistic, threshold and pair model judge the pair.
    #[arg(long, short)]
    pub collection: String,
    /// One side of the pair: an image file, or `id:ITEM_ID` for a stored item (write a
    /// file whose name starts with "id:" as ./id:...).
    pub a: String,
    /// The other side, as A.
    pub b: String,
}

/// A query as the user named it: an image file or a stored item.
#[derive(Debug, Clone)]
enum Target {
    File(PathBuf),
    Id(String),
}

impl Target {
    /// `id:ITEM_ID`, else a file path.
    fn parse(arg: &str) -> Target {
        match arg.strip_prefix("id:") {
            Some(id) => Target::Id(id.to_string()),
            None => Target::File(PathBuf::from(arg)),
        }
    }

    /// The query to send; reads the file.
    fn query(&self) -> Result<pb::Query, String> {
        let kind = match self {
            Target::File(path) => pb::query::Kind::Input(image_input(read_file(path)?)),
            Target::Id(id) => pb::query::Kind::Id(id.clone()),
        };
        Ok(pb::Query { kind: Some(kind) })
    }

    /// `(file, id)`: which of the two a JSON line names.
    fn fields(&self) -> (Option<String>, Option<String>) {
        match self {
            Target::File(path) => (Some(path.display().to_string()), None),
            Target::Id(id) => (None, Some(id.clone())),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::File(path) => write!(f, "{}", path.display()),
            Target::Id(id) => write!(f, "id:{id}"),
        }
    }
}

/// The daemon's first embedder by name: what `--model` means when it is not given.
/// (The daemon has no default model: Embed needs a name.)
async fn default_model(channel: Channel) -> Result<String, String> {
    let models = ModelsClient::new(channel)
        .list_models(pb::ListModelsRequest {})
        .await
        .map_err(status)?
        .into_inner()
        .models;
    let embedders: Vec<&str> = models
        .iter()
        .filter(|m| m.kind == "embedder")
        .map(|m| m.name.as_str())
        .collect();
    match embedders[..] {
        [] => Err("the daemon has no embedder; it needs one loaded (serve --model)".into()),
        [only] => Ok(only.to_string()),
        [first, ..] => {
            eprintln!(
                "note: no --model; using {first}, the first of {}",
                embedders.join(", ")
            );
            Ok(first.to_string())
        }
    }
}

/// A failed Embed call's status, naming the file when the status names an input
/// (`inputs[3].image: undecodable image ...`).
fn naming_input(s: crate::grpc::client::Status, files: &[PathBuf]) -> String {
    let index = s.message().find("inputs[").and_then(|at| {
        let rest = &s.message()[at + "inputs[".len()..];
        rest[..rest.find(']')?].parse::<usize>().ok()
    });
    match index.and_then(|i| files.get(i)) {
        Some(file) => format!("{}: {}", file.display(), status(s)),
        None => status(s),
    }
}

pub async fn embed(daemon: &Daemon, args: EmbedArgs) -> Result<(), String> {
    let files = image_files(&args.inputs)?;
    let mut sink = Sink::open(args.out.as_deref(), files.len())?;
    let channel = connect(daemon).await?;
    let model = match args.model {
        Some(model) => model,
        None => default_model(channel.clone()).await?,
    };
    let client = EmbedderClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let start = Instant::now();
    let progress = load::Progress::counting(files.len(), "images");
    let batch = args.batch.max(1);
    let mut next = 0;
    let calls = std::iter::from_fn(|| {
        if next >= files.len() {
            return None;
        }
        Some(next_chunk(&files, next, batch).map(|inputs| {
            let range = next..next + inputs.len();
            next = range.end;
            let mut c = client.clone();
            let req = pb::EmbedRequest {
                model: model.clone(),
                inputs,
            };
            (
                range,
                async move { c.embed(req).await.map(|r| r.into_inner()) },
            )
        }))
    });
    let mut done = 0;
    in_order(calls, args.concurrency, |range, answer| {
        let chunk = &files[range];
        let answer = answer.map_err(|s| naming_input(s, chunk))?;
        if answer.embeddings.len() != chunk.len() {
            return Err(format!(
                "the daemon answered {} vectors for {} images",
                answer.embeddings.len(),
                chunk.len()
            ));
        }
        for (file, v) in chunk.iter().zip(&answer.embeddings) {
            sink.write(file, &v.values)?;
        }
        done += chunk.len();
        progress.show(done, start.elapsed());
        Ok(())
    })
    .await?;
    progress.finish();
    sink.finish()?;
    if let Some(out) = &args.out {
        let secs = start.elapsed().as_secs_f64();
        println!(
            "embedded {done} images with {model} into {} in {secs:.2} s ({:.0} images/s)",
            out.display(),
            done as f64 / secs.max(1e-9)
        );
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct ClassifyRow {
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    label: String,
    confidence: f32,
    votes: Vec<VoteRow>,
}

#[derive(serde::Serialize)]
struct VoteRow {
    label: String,
    weight: f32,
    count: u32,
}

pub async fn classify(daemon: &Daemon, args: ClassifyArgs) -> Result<(), String> {
    let targets: Vec<Target> = image_files(&args.files)?
        .into_iter()
        .map(Target::File)
        .chain(args.id.into_iter().map(Target::Id))
        .collect();
    let client = items_client(connect(daemon).await?);
    let calls = targets.into_iter().map(|target| {
        let req = pb::ClassifyRequest {
            collection: args.collection.clone(),
            query: Some(target.query()?),
            k: args.k,
        };
        let mut c = client.clone();
        Ok((target, async move {
            c.classify(req).await.map(|r| r.into_inner())
        }))
    });
    let mut stdout = std::io::stdout().lock();
    in_order(calls, CLASSIFY_WINDOW, |target, answer| {
        let pb::ClassifyResponse {
            label,
            confidence,
            votes,
        } = answer.map_err(|s| format!("{target}: {}", status(s)))?;
        let (file, id) = target.fields();
        let row = ClassifyRow {
            file,
            id,
            label,
            confidence,
            votes: votes
                .into_iter()
                .map(
                    |pb::Vote {
                         label,
                         weight,
                         count,
                     }| VoteRow {
                        label,
                        weight,
                        count,
                    },
                )
                .collect(),
        };
        let line = serde_json::to_string(&row).map_err(|e| e.to_string())?;
        writeln!(stdout, "{line}").map_err(|e| format!("stdout: {e}"))
    })
    .await
}

#[derive(serde::Serialize)]
struct VerifyRow {
    a: String,
    b: String,
    distance: f32,
    similarity: f32,
    probability: f32,
    same: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pair_score: Option<f32>,
}

pub async fn verify(daemon: &Daemon, args: VerifyArgs) -> Result<(), String> {
    let (a, b) = (Target::parse(&args.a), Target::parse(&args.b));
    let req = pb::VerifyRequest {
        collection: args.collection,
        a: Some(a.query()?),
        b: Some(b.query()?),
    };
    let mut client = items_client(connect(daemon).await?);
    let pb::VerifyResponse {
        distance,
        similarity,
        probability,
        same,
        pair_score,
    } = client.verify(req).await.map_err(status)?.into_inner();
    let row = VerifyRow {
        a: a.to_string(),
        b: b.to_string(),
        distance,
        similarity,
        probability,
        same,
        pair_score,
    };
    println!(
        "{}",
        serde_json::to_string(&row).map_err(|e| e.to_string())?
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_naming_an_input_names_its_file() {
        let files = [PathBuf::from("x.png"), PathBuf::from("y.png")];
        let s = crate::grpc::client::Status::invalid_argument("inputs[1].image: undecodable image");
        let msg = naming_input(s, &files);
        assert!(
            msg.starts_with("y.png: InvalidArgument: inputs[1]"),
            "{msg}"
        );
        let s = crate::grpc::client::Status::not_found("model \"m\"");
        assert_eq!(naming_input(s, &files), "NotFound: model \"m\"");
    }

    #[test]
    fn a_side_is_a_file_or_an_id() {
        assert!(matches!(Target::parse("id:e7"), Target::Id(id) if id == "e7"));
        assert!(matches!(Target::parse("./id:e7"), Target::File(_)));
        assert_eq!(Target::parse("id:e7").to_string(), "id:e7");
    }
}
