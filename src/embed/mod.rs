//! Embedders: ONNX towers run through ONNX Runtime with dynamic batching.
//!
//! A model is one or more towers mapping into one embedding space (a Siamese/triplet
//! model has one shared tower). Each tower owns its sessions on dedicated threads: requests
//! from all clients queue, and a worker takes up to `max_batch` of them, or whatever
//! arrived within `max_delay`, and runs them as one batch. The queue is bounded: a unary
//! caller finding it full gets RESOURCE_EXHAUSTED, a stream waits.
//!
//! A pair model is one graph that takes two inputs and scores how alike they are
//! (Zagoruyko & Komodakis 2015); it is batched the same way.

mod batching;
pub mod fake;
mod handle;
pub mod image;
pub mod manifest;
pub mod publish;
pub mod runtime;

pub use batching::BatchStats;
use batching::{Batcher, Graph, collect};
pub use handle::{EmbedHandle, Embedder};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Field, Result};
pub use crate::types::{Input, InputData};
use manifest::{InputSpec, Manifest, PairSpec, TowerSpec};
pub use runtime::{ConvSearch, Device};

/// How batching behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchConfig {
    pub max_batch: usize,
    pub max_delay: Duration,
    /// Inputs that may wait per tower before unary calls are refused.
    pub queue: usize,
    pub device: Device,
    /// cuDNN's convolution algorithm choice on CUDA.
    pub conv_search: ConvSearch,
    /// Intra-op threads per graph.
    pub threads: usize,
    /// Let idle intra-op threads spin (ONNX Runtime's default) instead of sleeping.
    pub spin: bool,
    /// Pad every batch to `max_batch` rows so that each run has the same shape. None:
    /// on CUDA only. There ONNX Runtime sets cuDNN up again whenever a convolution's
    /// input shape differs from its previous run, which costs milliseconds of CPU, far
    /// more than the GPU spends on the padding rows; dynamic batches change size all
    /// the time (measured on an H200: 2,900 images/s unpadded, see docs/benchmarks.md).
    pub pad: Option<bool>,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_batch: 64,
            max_delay: Duration::from_millis(2),
            queue: 4096,
            device: Device::Auto,
            conv_search: ConvSearch::Heuristic,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            spin: false,
            pad: None,
        }
    }
}

/// What ListModels/GetModel report.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    pub version: String,
    /// The embedding dimension; 0 for a pair model.
    pub dimension: u32,
    pub towers: Vec<TowerInfo>,
    /// A pair model's inputs, score and threshold.
    pub pair: Option<PairSpec>,
    pub execution_provider: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TowerInfo {
    pub spec: TowerSpec,
    pub execution_provider: String,
}

/// Every loaded model by name: embedders and pair models share one namespace. Models
/// published while the daemon runs join it under `NAME@VERSION` (see [`publish`]).
#[derive(Default)]
pub struct Models {
    embedders: std::sync::RwLock<BTreeMap<String, Arc<Model>>>,
    pairs: std::sync::RwLock<BTreeMap<String, Arc<PairModel>>>,
    /// How models loaded later are batched: as the ones loaded at start.
    config: Option<BatchConfig>,
}

impl Models {
    /// Loads `name -> manifest path` pairs (a TOML manifest, or an .onnx file carrying
    /// its manifest in metadata_props).
    pub fn load(specs: &[(String, PathBuf)], config: BatchConfig) -> Result<Models> {
        let models = Models {
            config: Some(config),
            ..Models::default()
        };
        for (name, path) in specs {
            models.add(name, Manifest::load(path)?)?;
        }
        Ok(models)
    }

    /// Loads one more model under `name` (its graphs checked against the manifest);
    /// AlreadyExists when the name is taken.
    pub fn add(&self, name: &str, manifest: Manifest) -> Result<ModelInfo> {
        let config = self.config.unwrap_or_default();
        if self.contains(name) {
            return Err(Error::AlreadyExists(format!("model {name:?}")));
        }
        let start = Instant::now();
        let info = if manifest.pair.is_some() {
            let m = PairModel::load(name, manifest, config)?;
            let info = m.info();
            self.pairs
                .write()
                .expect("models lock")
                .insert(name.to_string(), Arc::new(m));
            info
        } else {
            let m = Model::load(name, manifest, config)?;
            let info = m.info();
            self.embedders
                .write()
                .expect("models lock")
                .insert(name.to_string(), Arc::new(m));
            info
        };
        tracing::info!(model = %name, version = %info.version, kind = if info.pair.is_some() { "pair" } else { "embedder" }, towers = info.towers.len(), provider = %info.execution_provider, took_ms = start.elapsed().as_millis() as u64, "loaded model");
        Ok(info)
    }

    /// Whether a model (embedder or pair) has this name.
    pub fn contains(&self, name: &str) -> bool {
        self.embedders
            .read()
            .expect("models lock")
            .contains_key(name)
            || self.pairs.read().expect("models lock").contains_key(name)
    }

    /// An embedder.
    pub fn get(&self, name: &str) -> Result<Arc<Model>> {
        if self.pairs.read().expect("models lock").contains_key(name) {
            return Err(Error::invalid(
                "model",
                format!("{name:?} is a pair model: it scores pairs and does not embed"),
            ));
        }
        self.embedders
            .read()
            .expect("models lock")
            .get(name)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("model {name:?}")))
    }

    /// A pair model.
    pub fn pair(&self, name: &str) -> Result<Arc<PairModel>> {
        if self
            .embedders
            .read()
            .expect("models lock")
            .contains_key(name)
        {
            return Err(Error::invalid(
                "pair_model",
                format!("{name:?} is an embedder, not a pair model"),
            ));
        }
        self.pairs
            .read()
            .expect("models lock")
            .get(name)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("pair model {name:?}")))
    }

    pub fn info(&self, name: &str) -> Result<ModelInfo> {
        let pair = self.pairs.read().expect("models lock").get(name).cloned();
        match pair {
            Some(p) => Ok(p.info()),
            None => self.get(name).map(|m| m.info()),
        }
    }

    /// Per graph (`model/tower`, or `model` for a pair model), its batch counters.
    pub fn batch_stats(&self) -> Vec<(String, Arc<BatchStats>)> {
        let mut out = Vec::new();
        for (name, m) in self.embedders.read().expect("models lock").iter() {
            for t in &m.towers {
                out.push((format!("{name}/{}", t.spec.name), t.batcher.stats.clone()));
            }
        }
        for (name, p) in self.pairs.read().expect("models lock").iter() {
            out.push((name.clone(), p.batcher.stats.clone()));
        }
        out
    }

    /// Every model, by name.
    pub fn list(&self) -> Vec<ModelInfo> {
        let mut all: Vec<ModelInfo> = self
            .embedders
            .read()
            .expect("models lock")
            .values()
            .map(|m| m.info())
            .chain(
                self.pairs
                    .read()
                    .expect("models lock")
                    .values()
                    .map(|p| p.info()),
            )
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}

/// An embedder: towers mapping into one space.
pub struct Model {
    name: String,
    manifest: Manifest,
    towers: Vec<Tower>,
}

struct Tower {
    spec: Arc<TowerSpec>,
    batcher: Batcher,
}

impl Model {
    fn load(name: &str, manifest: Manifest, config: BatchConfig) -> Result<Model> {
        let mut towers = Vec::with_capacity(manifest.towers.len());
        for spec in &manifest.towers {
            let file = manifest.dir.join(&spec.file);
            let check = runtime::GraphCheck {
                inputs: vec![(spec.input.as_str(), spec.input_spec().dims())],
                output: &spec.output,
                width: i64::from(spec.dimension),
                score: false,
            };
            let graph = Graph {
                label: spec.name.clone(),
                inputs: vec![spec.input.clone()],
                output: spec.output.clone(),
                width: spec.dimension as usize,
                normalize: spec.normalize,
            };
            towers.push(Tower {
                spec: Arc::new(spec.clone()),
                batcher: Batcher::start(&file, &check, graph, config)?,
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
                    spec: (*t.spec).clone(),
                    execution_provider: t.batcher.provider.to_string(),
                })
                .collect(),
            pair: None,
            execution_provider: self.towers[0].batcher.provider.to_string(),
        }
    }

    fn tower_index(&self, field: Field, name: &str) -> Result<usize> {
        if name.is_empty() {
            return Ok(0);
        }
        self.towers
            .iter()
            .position(|t| t.spec.name == name)
            .ok_or_else(|| {
                Error::not_found_at(
                    field.field("tower"),
                    format!("{name:?} in model {:?}", self.name),
                )
            })
    }

    /// Embeds `inputs`. Every input is decoded and checked first, so a bad one fails the
    /// call before anything is queued, naming its index as a field path (`[3].image`)
    /// that the caller re-roots at its own field ([`Error::rebase`]). `wait`: block on a full queue
    /// (streams) instead of RESOURCE_EXHAUSTED (unary calls).
    pub async fn embed(&self, inputs: Vec<Input>, wait: bool) -> Result<Vec<Vec<f32>>> {
        if inputs.is_empty() {
            return Err(Error::invalid(Field::default(), "no inputs to embed"));
        }
        let mut jobs = Vec::with_capacity(inputs.len());
        for (i, input) in inputs.into_iter().enumerate() {
            let t = if input.tower.is_empty() {
                0
            } else {
                self.tower_index(Field::index(i), &input.tower)?
            };
            jobs.push((t, input.data, self.towers[t].spec.clone()));
        }
        let bytes: usize = jobs.iter().map(|j| input_bytes(&j.1)).sum();
        let decode = move || {
            jobs.into_iter()
                .enumerate()
                .map(|(i, (t, data, spec))| {
                    prepare(Field::index(i), data, &spec.name, spec.input_spec()).map(|v| (t, v))
                })
                .collect::<Result<Vec<_>>>()
        };
        let tensors = off_async_if_large(bytes, decode).await?;
        // Admission for the whole request at once, per tower, so that a refused request
        // leaves nothing queued behind it.
        let mut permits = Vec::with_capacity(self.towers.len());
        for (t, tower) in self.towers.iter().enumerate() {
            let n = tensors.iter().filter(|(tt, _)| *tt == t).count();
            permits.push(if n == 0 {
                None
            } else {
                let what = format!("tower {:?}", tower.spec.name);
                Some(tower.batcher.admit(&self.name, &what, n, wait).await?)
            });
        }
        let mut pending = Vec::with_capacity(tensors.len());
        for (t, (values, dims)) in tensors {
            let permit = permits[t].as_ref().expect("permit per used tower");
            pending.push(self.towers[t].batcher.send(vec![values], dims, permit)?);
        }
        collect(pending, "input").await
    }
}

/// A pair model: one graph taking two inputs and returning a match score.
pub struct PairModel {
    name: String,
    version: String,
    spec: PairSpec,
    batcher: Batcher,
}

impl PairModel {
    fn load(name: &str, manifest: Manifest, config: BatchConfig) -> Result<PairModel> {
        let spec = manifest.pair.clone().expect("a pair manifest");
        let file = manifest.dir.join(&spec.file);
        let dims = spec.input_spec().dims();
        let check = runtime::GraphCheck {
            inputs: vec![
                (spec.inputs[0].as_str(), dims.clone()),
                (spec.inputs[1].as_str(), dims),
            ],
            output: &spec.output,
            width: 1,
            score: true,
        };
        let graph = Graph {
            label: format!("{name}-pair"),
            inputs: spec.inputs.to_vec(),
            output: spec.output.clone(),
            width: 1,
            normalize: false,
        };
        Ok(PairModel {
            name: name.to_string(),
            version: manifest.version,
            batcher: Batcher::start(&file, &check, graph, config)?,
            spec,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A pair is "the same" when its score reaches this.
    pub fn threshold(&self) -> f32 {
        self.spec.threshold
    }

    pub fn info(&self) -> ModelInfo {
        ModelInfo {
            name: self.name.clone(),
            version: self.version.clone(),
            dimension: 0,
            towers: Vec::new(),
            pair: Some(self.spec.clone()),
            execution_provider: self.batcher.provider.to_string(),
        }
    }

    /// Scores each pair; a bad input fails the call before anything is queued, naming
    /// `[i].a` or `[i].b` for the caller to re-root.
    pub async fn score(&self, pairs: Vec<(InputData, InputData)>, wait: bool) -> Result<Vec<f32>> {
        if pairs.is_empty() {
            return Err(Error::invalid(Field::default(), "no pairs to score"));
        }
        let spec = self.spec.clone();
        let bytes: usize = pairs
            .iter()
            .map(|(a, b)| input_bytes(a) + input_bytes(b))
            .sum();
        let prepared = off_async_if_large(bytes, move || {
            pairs
                .into_iter()
                .enumerate()
                .map(|(i, (a, b))| {
                    let (va, dims) =
                        prepare(Field::index(i).field("a"), a, "pair", spec.input_spec())?;
                    let (vb, _) =
                        prepare(Field::index(i).field("b"), b, "pair", spec.input_spec())?;
                    Ok((vec![va, vb], dims))
                })
                .collect::<Result<Vec<_>>>()
        })
        .await?;
        let permit = self
            .batcher
            .admit(&self.name, "pairs", prepared.len(), wait)
            .await?;
        let pending = prepared
            .into_iter()
            .map(|(values, dims)| self.batcher.send(values, dims, &permit))
            .collect::<Result<Vec<_>>>()?;
        Ok(collect(pending, "pair")
            .await?
            .into_iter()
            .map(|row| row[0])
            .collect())
    }
}

/// Inputs up to this many bytes in all are decoded on the calling async worker: a small
/// image decodes in microseconds, less than a hand-off to the blocking pool costs.
const INLINE_DECODE_BYTES: usize = 64 << 10;

fn input_bytes(data: &InputData) -> usize {
    match data {
        InputData::Image(b) => b.len(),
        InputData::Tensor { values, .. } => values.len() * 4,
    }
}

/// Runs `f` (decoding: CPU work) inline when the inputs are small, else on the blocking
/// pool, off the async workers. One request decodes on one core: splitting a large one
/// over all cores was measured on a 16-core GPU host and gained nothing (see
/// docs/benchmarks.md, "CUDA").
async fn off_async_if_large<T: Send + 'static>(
    bytes: usize,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    if bytes <= INLINE_DECODE_BYTES {
        f()
    } else {
        tokio::task::spawn_blocking(f).await?
    }
}

/// Decodes (images) or checks (tensors) one input into a graph input's flat layout;
/// returns the values and their shape without the batch axis.
fn prepare(
    field: Field,
    data: InputData,
    owner: &str,
    spec: InputSpec<'_>,
) -> Result<(Vec<f32>, Vec<i64>)> {
    match (data, spec) {
        (InputData::Image(bytes), InputSpec::Image(img)) => {
            let (values, h, w) = image::preprocess(&bytes, img)
                .map_err(|e| Error::invalid(field.clone().field("image"), e))?;
            Ok((
                values,
                vec![i64::from(img.channels), i64::from(h), i64::from(w)],
            ))
        }
        (InputData::Image(_), InputSpec::Tensor(_)) => Err(Error::invalid(
            field.field("image"),
            format!("{owner:?} takes tensors, not images"),
        )),
        (
            InputData::Tensor {
                shape: given,
                values,
            },
            spec,
        ) => {
            let want = match spec {
                InputSpec::Tensor(t) => t.shape.clone(),
                InputSpec::Image(img) if img.resize != manifest::Resize::Keep => {
                    vec![img.channels, img.height, img.width]
                }
                InputSpec::Image(img) => {
                    // Keeps its size: any positive spatial dims up to the limit.
                    match given[..] {
                        [c, h, w]
                            if c == img.channels
                                && h > 0
                                && w > 0
                                && h <= img.height
                                && w <= img.width =>
                        {
                            given.clone()
                        }
                        _ => {
                            return Err(Error::invalid(
                                field.field("tensor").field("shape"),
                                format!(
                                    "{given:?}, {owner:?} takes [{}, 1..={}, 1..={}]",
                                    img.channels, img.height, img.width
                                ),
                            ));
                        }
                    }
                }
            };
            if given != want {
                return Err(Error::invalid(
                    field.field("tensor").field("shape"),
                    format!("{given:?}, {owner:?} takes {want:?}"),
                ));
            }
            let n: usize = want.iter().map(|d| *d as usize).product();
            if values.len() != n {
                return Err(Error::invalid(
                    field.field("tensor").field("values"),
                    format!("{} values for shape {want:?} ({n})", values.len()),
                ));
            }
            if let Some(j) = values.iter().position(|v| !v.is_finite()) {
                return Err(Error::invalid(
                    field.field("tensor").field("values").at(j),
                    "not a finite number",
                ));
            }
            Ok((values, want.iter().map(|d| i64::from(*d)).collect()))
        }
    }
}

/// The embedder shipped with the project (compiled-in path, for `likeness serve` with
/// no model flags on the machine that built it).
pub fn default_model() -> (String, PathBuf) {
    (
        "fmnist-triplet".into(),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fmnist-triplet/model.toml"),
    )
}

/// The pair model shipped with the project.
pub fn default_pair_model() -> (String, PathBuf) {
    (
        "fmnist-pair".into(),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fmnist-pair/model.toml"),
    )
}
