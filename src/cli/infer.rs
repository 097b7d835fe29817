//! The image-in client verbs: `likeness embed` (image files or folders to vectors, as
//! .npy or JSON lines), `likeness classify` and `likeness verify` (identification and
//! verification in a collection, by image file or by stored item id).

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::grpc::client::Channel;

use super::{Daemon, connect, items_client, load, status};
use crate::grpc::client::ConnectArgs;
use crate::pb;
use crate::pb::embedder_client::EmbedderClient;
use crate::pb::models_client::ModelsClient;

/// A folder stands for its files with these extensions (in any case).
const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "webp", "bmp", "gif"];

/// Image bytes per Embed call: half the daemon's default 64 MiB message limit, so that
/// a folder of large photos still goes through in several calls.
const MAX_CALL_BYTES: u64 = 32 << 20;

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

/// Expands folders into their image files (sorted by name); files stay as given, in
/// order. Every path must exist, and a folder must hold at least one image.
pub fn image_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for path in paths {
        let named = |e: std::io::Error| format!("{}: {e}", path.display());
        if !std::fs::metadata(path).map_err(named)?.is_dir() {
            files.push(path.clone());
            continue;
        }
        let mut found = Vec::new();
        for entry in std::fs::read_dir(path).map_err(named)? {
            let entry = entry.map_err(named)?.path();
            let is_image = entry
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
            if is_image && entry.is_file() {
                found.push(entry);
            }
        }
        if found.is_empty() {
            return Err(format!(
                "{}: no image files in this folder (looked for .{})",
                path.display(),
                IMAGE_EXTENSIONS.join(", .")
            ));
        }
        found.sort();
        files.extend(found);
    }
    Ok(files)
}

fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn image_input(bytes: Vec<u8>) -> pb::Input {
    pb::Input {
        kind: Some(pb::input::Kind::Image(bytes)),
        tower: String::new(),
    }
}

/// Runs calls with at most `window` in flight and hands each answer to `each` in the
/// order the calls were made. `calls` yields each call with a context for its answer;
/// it is pulled lazily, so reading the next inputs overlaps the calls in flight.
async fn in_order<C, T, F>(
    mut calls: impl Iterator<Item = Result<(C, F), String>>,
    window: usize,
    mut each: impl FnMut(C, Result<T, crate::grpc::client::Status>) -> Result<(), String>,
) -> Result<(), String>
where
    F: Future<Output = Result<T, crate::grpc::client::Status>> + Send + 'static,
    T: Send + 'static,
{
    let mut pending = VecDeque::new();
    loop {
        while pending.len() < window.max(1) {
            let Some(call) = calls.next() else { break };
            let (context, call) = call?;
            pending.push_back((context, tokio::spawn(call)));
        }
        let Some((context, call)) = pending.pop_front() else {
            return Ok(());
        };
        each(context, call.await.map_err(|e| e.to_string())?)?;
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

/// The files for the next Embed call from `start`: at most `batch`, and at most
/// MAX_CALL_BYTES of them unless a single file is larger.
fn next_chunk(files: &[PathBuf], start: usize, batch: usize) -> Result<Vec<pb::Input>, String> {
    let mut inputs = Vec::new();
    let mut bytes = 0u64;
    for path in files[start..].iter().take(batch) {
        let len = std::fs::metadata(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len();
        if !inputs.is_empty() && bytes + len > MAX_CALL_BYTES {
            break;
        }
        bytes += len;
        inputs.push(image_input(read_file(path)?));
    }
    Ok(inputs)
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

/// Where `embed` writes: a .npy or .jsonl file (through `<out>.partial`, renamed once
/// every row is written, so a failed run leaves no half file), or stdout.
struct Sink {
    npy: bool,
    w: BufWriter<Box<dyn Write>>,
    /// (the file asked for, the partial file written meanwhile)
    file: Option<(PathBuf, PathBuf)>,
    rows: usize,
    dim: Option<usize>,
    written: usize,
}

#[derive(serde::Serialize)]
struct EmbedRow<'a> {
    file: &'a str,
    vector: &'a [f32],
}

impl Sink {
    fn open(out: Option<&Path>, rows: usize) -> Result<Sink, String> {
        let Some(out) = out else {
            return Ok(Sink {
                npy: false,
                w: BufWriter::new(Box::new(std::io::stdout())),
                file: None,
                rows,
                dim: None,
                written: 0,
            });
        };
        let ext = out
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_lowercase);
        let npy = match ext.as_deref() {
            Some("npy") => true,
            Some("jsonl") | Some("ndjson") => false,
            _ => {
                return Err(format!(
                    "--out {}: the extension picks the format: .npy or .jsonl",
                    out.display()
                ));
            }
        };
        let mut partial = out.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let file = File::create(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
        Ok(Sink {
            npy,
            w: BufWriter::new(Box::new(file)),
            file: Some((out.to_path_buf(), partial)),
            rows,
            dim: None,
            written: 0,
        })
    }

    fn where_to(&self) -> String {
        match &self.file {
            Some((out, _)) => out.display().to_string(),
            None => "stdout".into(),
        }
    }

    fn write(&mut self, file: &Path, vector: &[f32]) -> Result<(), String> {
        let written = if self.npy {
            let dim = *self.dim.get_or_insert(vector.len());
            if vector.len() != dim {
                return Err(format!(
                    "{}: a {}-d vector after {dim}-d ones",
                    file.display(),
                    vector.len()
                ));
            }
            let mut bytes = Vec::with_capacity(vector.len() * 4);
            if self.written == 0 {
                bytes.extend(load::npy_header(self.rows, dim));
            }
            bytes.extend(vector.iter().flat_map(|v| v.to_le_bytes()));
            self.w.write_all(&bytes)
        } else {
            let row = EmbedRow {
                file: &file.display().to_string(),
                vector,
            };
            serde_json::to_writer(&mut self.w, &row)
                .map_err(std::io::Error::from)
                .and_then(|()| self.w.write_all(b"\n"))
        };
        written.map_err(|e| format!("{}: {e}", self.where_to()))?;
        self.written += 1;
        Ok(())
    }

    /// Flushes, and puts the file in place.
    fn finish(&mut self) -> Result<(), String> {
        self.w
            .flush()
            .map_err(|e| format!("{}: {e}", self.where_to()))?;
        if let Some((out, partial)) = self.file.take() {
            std::fs::rename(&partial, &out).map_err(|e| format!("{}: {e}", out.display()))?;
        }
        Ok(())
    }
}

impl Drop for Sink {
    /// A sink dropped before `finish` leaves no partial file behind.
    fn drop(&mut self) {
        if let Some((_, partial)) = self.file.take() {
            let _ = std::fs::remove_file(partial);
        }
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
    fn a_folder_is_its_images_sorted_by_name() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.PNG", "a.jpg", "c.txt", "d.gif"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        std::fs::create_dir(dir.path().join("e.png")).unwrap();
        let loose = dir.path().join("c.txt");
        let files = image_files(&[loose.clone(), dir.path().to_path_buf()]).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["c.txt", "a.jpg", "b.PNG", "d.gif"]);
        let err = image_files(&[dir.path().join("nope.png")]).unwrap_err();
        assert!(err.contains("nope.png"), "{err}");
        let empty = dir.path().join("e.png");
        assert!(
            image_files(&[empty])
                .unwrap_err()
                .contains("no image files")
        );
    }

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
