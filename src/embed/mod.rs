//! Embedders: ONNX towers run through ONNX Runtime with dynamic batching.
//!
//! A model is one or more towers mapping into one embedding space (a Siamese/triplet
//! model has one shared tower). Each tower owns its sessions on dedicated threads: requests
//! from all clients queue, and a worker takes up to `max_batch` of them, or whatever
//! arrived within `max_delay`, and runs them as one batch. The queue is bounded: a unary
//! caller finding it full gets RESOURCE_EXHAUSTED, a stream waits.

pub mod image;
pub mod manifest;
pub mod runtime;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ort::session::Session;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::error::{Error, Result};
use manifest::{Manifest, TowerSpec};
pub use runtime::Device;

/// One input to embed.
#[derive(Debug, Clone, PartialEq)]
pub enum InputData {
    /// Encoded image bytes.
    Image(Vec<u8>),
    /// A raw tensor (without the batch axis).
    Tensor { shape: Vec<u32>, values: Vec<f32> },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    pub data: InputData,
    /// Tower name; empty = the model's first tower.
    pub tower: String,
}

/// How batching behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchConfig {
    pub max_batch: usize,
    pub max_delay: Duration,
    /// Inputs that may wait per tower before unary calls are refused.
    pub queue: usize,
    pub device: Device,
    /// Total intra-op threads per tower, split across its sessions.
    pub threads: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_batch: 64,
            max_delay: Duration::from_millis(2),
            queue: 4096,
            device: Device::Auto,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

/// What ListModels/GetModel report.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    pub dimension: u32,
    pub towers: Vec<TowerInfo>,
    pub execution_provider: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TowerInfo {
    pub spec: TowerSpec,
    pub execution_provider: String,
}

/// Every loaded model by name.
#[derive(Default)]
pub struct Models {
    models: BTreeMap<String, Arc<Model>>,
}

impl Models {
    /// Loads `name -> manifest path` pairs.
    pub fn load(specs: &[(String, PathBuf)], config: BatchConfig) -> Result<Models> {
        let mut models = BTreeMap::new();
        for (name, path) in specs {
            let start = Instant::now();
            let model = Model::load(name, path, config)?;
            tracing::info!(model = %name, towers = model.towers.len(), provider = %model.info().execution_provider, took_ms = start.elapsed().as_millis() as u64, "loaded model");
            models.insert(name.clone(), Arc::new(model));
        }
        Ok(Models { models })
    }

    pub fn get(&self, name: &str) -> Result<Arc<Model>> {
        self.models
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("model {name:?}")))
    }

    pub fn list(&self) -> Vec<ModelInfo> {
        self.models.values().map(|m| m.info()).collect()
    }
}

pub struct Model {
    name: String,
    manifest: Manifest,
    towers: Vec<Tower>,
}

struct Tower {
    spec: TowerSpec,
    /// Values per input (the product of the input shape without the batch axis).
    item_shape: Vec<usize>,
    queue: Sender<Job>,
    admission: Arc<Semaphore>,
    /// The admission semaphore's size.
    capacity: usize,
    provider: &'static str,
}

struct Job {
    values: Vec<f32>,
    queued: Instant,
    reply: oneshot::Sender<std::result::Result<Vec<f32>, String>>,
    /// The request's admission; its queue slots free when its last job is done.
    _permit: Arc<OwnedSemaphorePermit>,
}

impl Model {
    fn load(name: &str, path: &Path, config: BatchConfig) -> Result<Model> {
        let manifest = Manifest::load(path)?;
        let mut towers = Vec::with_capacity(manifest.towers.len());
        for spec in &manifest.towers {
            let file = manifest.dir.join(&spec.file);
            // One session whose intra-op threads cover the cores: two sessions of half
            // the threads each split a bounded number of waiting requests between them
            // and ran at half speed (measured: 0.5x with 64 single-image clients).
            let sessions = 1;
            let threads = config.threads.max(1);
            let (tx, rx) = channel::<Job>();
            let rx = Arc::new(Mutex::new(rx));
            let mut provider = "CPUExecutionProvider";
            for i in 0..sessions {
                let (session, p) = runtime::open_session(&file, spec, config.device, threads)?;
                provider = p;
                let (rx, spec, cfg) = (rx.clone(), spec.clone(), config);
                std::thread::Builder::new()
                    .name(format!("embed-{}-{i}", spec.name))
                    .spawn(move || worker(session, &spec, &rx, cfg))
                    .map_err(Error::Io)?;
            }
            let item_shape = match (&spec.image, &spec.tensor) {
                (Some(img), _) => vec![
                    img.channels as usize,
                    img.height as usize,
                    img.width as usize,
                ],
                (None, Some(t)) => t.shape.iter().map(|d| *d as usize).collect(),
                (None, None) => unreachable!("validated manifest"),
            };
            towers.push(Tower {
                spec: spec.clone(),
                item_shape,
                queue: tx,
                admission: Arc::new(Semaphore::new(config.queue)),
                capacity: config.queue,
                provider,
            });
        }
        Ok(Model {
            name: name.to_string(),
            manifest,
            towers,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dimension(&self) -> u32 {
        self.manifest.dimension()
    }

    /// The first tower's spec (metric, margin, threshold of the embedding space).
    pub fn primary(&self) -> &TowerSpec {
        &self.towers[0].spec
    }

    pub fn info(&self) -> ModelInfo {
        ModelInfo {
            name: self.name.clone(),
            version: self.manifest.version.clone(),
            dimension: self.dimension(),
            towers: self
                .towers
                .iter()
                .map(|t| TowerInfo {
                    spec: t.spec.clone(),
                    execution_provider: t.provider.to_string(),
                })
                .collect(),
            execution_provider: self.towers[0].provider.to_string(),
        }
    }

    fn tower_index(&self, field: &str, name: &str) -> Result<usize> {
        if name.is_empty() {
            return Ok(0);
        }
        self.towers
            .iter()
            .position(|t| t.spec.name == name)
            .ok_or_else(|| {
                Error::NotFound(format!("{field}.tower: {name:?} in model {:?}", self.name))
            })
    }

    /// Embeds `inputs`. Every input is decoded and checked first, so a bad one fails the
    /// call (naming its index) before anything is queued. `wait`: block on a full queue
    /// (streams) instead of RESOURCE_EXHAUSTED (unary calls).
    pub async fn embed(&self, inputs: Vec<Input>, wait: bool) -> Result<Vec<Vec<f32>>> {
        if inputs.is_empty() {
            return Err(Error::invalid("inputs", "must not be empty"));
        }
        let mut jobs = Vec::with_capacity(inputs.len());
        for (i, input) in inputs.into_iter().enumerate() {
            let field = format!("inputs[{i}]");
            let t = self.tower_index(&field, &input.tower)?;
            let tower = &self.towers[t];
            jobs.push((
                t,
                field,
                input.data,
                tower.spec.clone(),
                tower.item_shape.clone(),
            ));
        }
        // Decoding is CPU work: off the async workers.
        let tensors = tokio::task::spawn_blocking(move || {
            jobs.into_iter()
                .map(|(t, field, data, spec, shape)| {
                    prepare(&field, data, &spec, &shape).map(|v| (t, v))
                })
                .collect::<Result<Vec<_>>>()
        })
        .await??;
        // Admission for the whole request at once, per tower, so that a refused request
        // leaves nothing queued behind it.
        let mut permits: Vec<Option<Arc<OwnedSemaphorePermit>>> = vec![None; self.towers.len()];
        for (t, tower) in self.towers.iter().enumerate() {
            let n = tensors.iter().filter(|(tt, _)| *tt == t).count() as u32;
            if n == 0 {
                continue;
            }
            if n as usize > tower.capacity {
                return Err(Error::ResourceExhausted(format!(
                    "model {:?}: {n} inputs for tower {:?} exceed its queue of {}; send fewer per request",
                    self.name, tower.spec.name, tower.capacity
                )));
            }
            let refused = || {
                Error::ResourceExhausted(format!(
                    "model {:?}: the embedding queue is full; retry later",
                    self.name
                ))
            };
            let permit = if wait {
                tower
                    .admission
                    .clone()
                    .acquire_many_owned(n)
                    .await
                    .map_err(|_| refused())?
            } else {
                tower
                    .admission
                    .clone()
                    .try_acquire_many_owned(n)
                    .map_err(|_| refused())?
            };
            permits[t] = Some(Arc::new(permit));
        }
        let mut pending = Vec::with_capacity(tensors.len());
        for (t, values) in tensors {
            let (reply, rx) = oneshot::channel();
            self.towers[t]
                .queue
                .send(Job {
                    values,
                    queued: Instant::now(),
                    reply,
                    _permit: permits[t].clone().expect("permit per used tower"),
                })
                .map_err(|_| Error::Unavailable("embedder stopped".into()))?;
            pending.push(rx);
        }
        let mut out = Vec::with_capacity(pending.len());
        for (i, rx) in pending.into_iter().enumerate() {
            let v = rx
                .await
                .map_err(|_| Error::Model("embedder worker stopped".into()))?
                .map_err(|e| Error::Model(format!("inputs[{i}]: {e}")))?;
            out.push(v);
        }
        Ok(out)
    }
}

/// Decodes (images) or checks (tensors) one input into the tower's flat layout.
fn prepare(field: &str, data: InputData, spec: &TowerSpec, shape: &[usize]) -> Result<Vec<f32>> {
    match data {
        InputData::Image(bytes) => {
            let Some(img) = &spec.image else {
                return Err(Error::invalid(
                    format!("{field}.image"),
                    format!("tower {:?} takes tensors, not images", spec.name),
                ));
            };
            image::preprocess(&bytes, img).map_err(|e| Error::invalid(format!("{field}.image"), e))
        }
        InputData::Tensor {
            shape: given,
            values,
        } => {
            let want: Vec<u32> = shape.iter().map(|d| *d as u32).collect();
            if given != want {
                return Err(Error::invalid(
                    format!("{field}.tensor.shape"),
                    format!("{given:?}, tower {:?} takes {want:?}", spec.name),
                ));
            }
            let n: usize = shape.iter().product();
            if values.len() != n {
                return Err(Error::invalid(
                    format!("{field}.tensor.values"),
                    format!("{} values for shape {want:?} ({n})", values.len()),
                ));
            }
            if let Some(j) = values.iter().position(|v| !v.is_finite()) {
                return Err(Error::invalid(
                    format!("{field}.tensor.values[{j}]"),
                    "not a finite number",
                ));
            }
            Ok(values)
        }
    }
}

/// A session's thread: gather a batch (up to max_batch, or what arrives within
/// max_delay of the first job), run it, answer each job.
fn worker(mut session: Session, spec: &TowerSpec, rx: &Mutex<Receiver<Job>>, cfg: BatchConfig) {
    let per_item: usize = match (&spec.image, &spec.tensor) {
        (Some(img), _) => (img.channels * img.height * img.width) as usize,
        (None, Some(t)) => t.shape.iter().map(|d| *d as usize).product(),
        (None, None) => return,
    };
    let item_dims: Vec<i64> = match (&spec.image, &spec.tensor) {
        (Some(img), _) => vec![
            i64::from(img.channels),
            i64::from(img.height),
            i64::from(img.width),
        ],
        (None, Some(t)) => t.shape.iter().map(|d| i64::from(*d)).collect(),
        (None, None) => return,
    };
    loop {
        let mut batch = Vec::with_capacity(cfg.max_batch);
        {
            let rx = rx.lock().expect("embed queue lock");
            match rx.recv() {
                Ok(job) => batch.push(job),
                Err(_) => return, // model dropped
            }
            // The delay runs from when the oldest job was queued: jobs that waited while
            // the previous batch ran go at once with whatever else is there.
            let deadline = batch[0].queued + cfg.max_delay;
            while batch.len() < cfg.max_batch {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        match rx.recv_timeout(left) {
                            Ok(job) => batch.push(job),
                            Err(RecvTimeoutError::Timeout) => break,
                            Err(RecvTimeoutError::Disconnected) => break,
                        }
                    }
                }
            }
        }
        let n = batch.len();
        let mut data = Vec::with_capacity(n * per_item);
        for job in &batch {
            data.extend_from_slice(&job.values);
        }
        let mut shape = vec![n as i64];
        shape.extend_from_slice(&item_dims);
        match run(&mut session, spec, shape, data) {
            Ok(rows) => {
                for (job, row) in batch.into_iter().zip(rows) {
                    let _ = job.reply.send(Ok(row));
                }
            }
            Err(e) => {
                tracing::error!(tower = %spec.name, error = %e, batch = n, "inference failed");
                for job in batch {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

fn run(
    session: &mut Session,
    spec: &TowerSpec,
    shape: Vec<i64>,
    data: Vec<f32>,
) -> std::result::Result<Vec<Vec<f32>>, String> {
    let n = shape[0] as usize;
    let tensor = ort::value::Tensor::from_array((shape, data)).map_err(|e| e.to_string())?;
    let outputs = session
        .run(ort::inputs![spec.input.as_str() => tensor])
        .map_err(|e| e.to_string())?;
    let (out_shape, values) = outputs[spec.output.as_str()]
        .try_extract_tensor::<f32>()
        .map_err(|e| e.to_string())?;
    let dim = spec.dimension as usize;
    if out_shape.len() != 2 || out_shape[0] as usize != n || out_shape[1] as usize != dim {
        return Err(format!("output shape {out_shape:?}, expected [{n}, {dim}]"));
    }
    Ok(values
        .chunks_exact(dim)
        .map(|row| {
            let mut v = row.to_vec();
            if spec.normalize {
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                if norm > 0.0 {
                    v.iter_mut().for_each(|x| *x /= norm);
                }
            }
            v
        })
        .collect())
}

/// The model shipped with the project (compiled-in path, for `likeness serve` with no
/// model flags on the machine that built it).
pub fn default_model() -> (String, PathBuf) {
    (
        "fmnist-triplet".into(),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fmnist-triplet/model.toml"),
    )
}

/// Encodes an input for the store: kind byte, then the image bytes, or the shape and
/// values of a tensor (little-endian).
pub fn encode_input(data: &InputData) -> Vec<u8> {
    match data {
        InputData::Image(bytes) => {
            let mut out = Vec::with_capacity(1 + bytes.len());
            out.push(0);
            out.extend_from_slice(bytes);
            out
        }
        InputData::Tensor { shape, values } => {
            let mut out = Vec::with_capacity(5 + shape.len() * 4 + values.len() * 4);
            out.push(1);
            out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
            shape
                .iter()
                .for_each(|d| out.extend_from_slice(&d.to_le_bytes()));
            values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            out
        }
    }
}

/// Decodes what [`encode_input`] wrote; None when it is not such a record.
pub fn decode_input(raw: &[u8]) -> Option<InputData> {
    let (&kind, rest) = raw.split_first()?;
    match kind {
        0 => Some(InputData::Image(rest.to_vec())),
        1 => {
            let n = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
            let dims = rest.get(4..4 + n * 4)?;
            let shape = dims
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            let values = rest[4 + n * 4..]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            Some(InputData::Tensor { shape, values })
        }
        _ => None,
    }
}
