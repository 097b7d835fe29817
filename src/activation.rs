//! Models.Activate: a collection re-embedded with another model (or a published version
//! of its own) in the background, then switched to at once.
//!
//! The job walks the current generation's items in ANN-key order from a persisted
//! cursor, re-embeds their stored inputs with the new model (waiting for room in the
//! embedder's queue, so it never crowds out requests with RESOURCE_EXHAUSTED), and writes
//! them into the new generation (see [`crate::collections::generation`]). Reads keep
//! using the current generation meanwhile; when the walk has caught up, the switch
//! finishes the last keys with writes held and replaces the collection atomically. A
//! crash leaves the new generation and its cursor in the store, and start-up resumes it.
//! An error (an input the new model refuses, say) gives the new generation up and leaves
//! the collection as it was; the error is reported in GetCollection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub use crate::collections::{ActivationInfo, ActivationState as State};
use crate::collections::{Collection, CollectionInfo, Registry};
use crate::embed::{EmbedHandle, Input, ModelInfo};
use crate::error::{Error, Result};
use crate::pool::blocking;
use crate::store::ShadowRecord;
use crate::store::codec::decode_input;
use crate::types::ItemData;

struct Progress {
    model: String,
    version: String,
    state: Mutex<(State, String)>,
    done: AtomicU64,
    total: AtomicU64,
    /// `done` when this run started, and when: the rate counts this run's work only.
    start: (u64, Instant),
}

impl Progress {
    fn info(&self) -> ActivationInfo {
        let (state, error) = self.state.lock().expect("progress lock").clone();
        let done = self.done.load(Ordering::Relaxed);
        let secs = self.start.1.elapsed().as_secs_f64();
        ActivationInfo {
            state,
            model: self.model.clone(),
            version: self.version.clone(),
            done,
            total: self.total.load(Ordering::Relaxed).max(done),
            rate: if secs > 0.0 {
                done.saturating_sub(self.start.0) as f64 / secs
            } else {
                0.0
            },
            error,
        }
    }

    fn finish(&self, state: State, error: String) {
        *self.state.lock().expect("progress lock") = (state, error);
    }
}

/// The activations this daemon has run or is running, by collection: a component that
/// owns its jobs and holds what they use (the registry, the embedder).
pub struct Activations {
    registry: Arc<Registry>,
    embedder: EmbedHandle,
    jobs: Mutex<HashMap<String, Arc<Progress>>>,
    /// Items re-embedded per second at most (0: as fast as the embedder goes), so that
    /// a large re-embedding leaves the model's capacity to live requests.
    rate: AtomicU64,
}

impl Activations {
    pub fn new(registry: Arc<Registry>, embedder: EmbedHandle) -> Self {
        Activations {
            registry,
            embedder,
            jobs: Mutex::default(),
            rate: AtomicU64::new(0),
        }
    }

    /// Caps re-embedding at `per_second` items (0: no cap).
    pub fn set_rate(&self, per_second: u64) {
        self.rate.store(per_second, Ordering::Relaxed);
    }

    /// The latest activation of `collection`, if there was one since the start.
    pub fn info(&self, collection: &str) -> Option<ActivationInfo> {
        self.jobs
            .lock()
            .expect("activations lock")
            .get(collection)
            .map(|p| p.info())
    }

    /// The latest activation of every collection that had one since the start.
    pub fn all(&self) -> HashMap<String, ActivationInfo> {
        self.jobs
            .lock()
            .expect("activations lock")
            .iter()
            .map(|(name, p)| (name.clone(), p.info()))
            .collect()
    }

    /// Whether `collection` is being re-embedded now. An activation whose generation
    /// the collection already serves is not: only its clean-up is left (the old
    /// generation's files), and GetCollection reports it done (`app::with_activation`),
    /// so a client that waited for that may activate again at once. Whatever starts
    /// next waits for the clean-up on the registry's DDL lock.
    pub fn running(&self, collection: &str) -> bool {
        let Some(a) = self.info(collection) else {
            return false;
        };
        a.state == State::Running
            && !self.registry.collection(collection).is_ok_and(|c| {
                let spec = c.spec();
                spec.model == a.model && spec.model_version == a.version
            })
    }
}

/// The tower of `model` that takes inputs of this kind: the first whose input is an
/// image for an image, a tensor for a tensor.
fn tower_for(model: &ModelInfo, image: bool) -> String {
    model
        .towers
        .iter()
        .find(|t| t.spec.image.is_some() == image)
        .map(|t| t.spec.name.clone())
        .unwrap_or_default()
}

impl Activations {
    /// Starts re-embedding `collection` with `model` (`version`: a published one, or
    /// empty for the model the daemon loaded at start). Returns the collection's info
    /// with the activation RUNNING.
    pub async fn activate(
        self: &Arc<Self>,
        collection: &str,
        model: &str,
        version: &str,
    ) -> Result<CollectionInfo> {
        let running = self.running(collection);
        // Fetched after that check: once it says the last activation switched, this is
        // the generation it switched to.
        let source = self.registry.collection(collection)?;
        let spec = source.spec();
        if model.is_empty() {
            return Err(Error::invalid("model", "must name an embedder"));
        }
        let key = if version.is_empty() {
            model.to_string()
        } else {
            crate::embed::publish::key(model, version)
        };
        let space = self.embedder.space(&key).map_err(|e| match e {
            Error::NotFound { what, .. } if !version.is_empty() => Error::not_found_at(
                "version",
                format!("{what} (publish it first: Models.Publish)"),
            ),
            Error::NotFound { what, .. } => Error::not_found_at("model", what),
            other => other,
        })?;
        if model == spec.model && version == spec.model_version {
            return Err(Error::FailedPrecondition(format!(
                "collection {collection:?} already uses model {key:?}"
            )));
        }
        if space.dimension != spec.dimension {
            return Err(Error::invalid(
                "model",
                format!(
                    "{key:?} embeds into {} dimensions, collection {collection:?} has {}",
                    space.dimension, spec.dimension
                ),
            ));
        }
        if space.metric != spec.metric {
            return Err(Error::invalid(
                "model",
                format!(
                    "{key:?} measures {:?} distance, collection {collection:?} {:?}",
                    space.metric, spec.metric
                ),
            ));
        }
        if spec.model.is_empty() || !spec.keep_inputs {
            return Err(Error::FailedPrecondition(format!(
                "collection {collection:?} keeps no inputs to re-embed (it was created without a model or with keep_inputs = false)"
            )));
        }
        if running {
            return Err(Error::FailedPrecondition(format!(
                "collection {collection:?} is already being re-embedded; wait for it to finish"
            )));
        }
        let (shadow, record) = {
            let (registry, source, model, version) = (
                self.registry.clone(),
                source.clone(),
                model.to_string(),
                version.to_string(),
            );
            blocking(move || {
                // The count first: writes landing meanwhile add inputs as well as items,
                // so they cannot make the check fail. (An item written by vector after
                // it fails the run itself, which then says which.)
                let items = source.len();
                let stored = source.stored_input_count();
                if stored < items {
                    return Err(Error::FailedPrecondition(format!(
                        "{} of the {items} items of collection {:?} have no stored input to re-embed",
                        items - stored,
                        source.name()
                    )));
                }
                registry.begin_generation(&source, &model, &version, space)
            })
            .await?
        };
        self.spawn(shadow, record);
        let mut info = source.info();
        info.activation = self.info(collection);
        Ok(info)
    }

    /// Resumes every activation a previous run left unfinished (after recovery).
    pub fn resume(self: &Arc<Self>) -> Result<usize> {
        let records = self.registry.shadow_records()?;
        let mut resumed = 0;
        for record in records {
            let name = record.spec.name.clone();
            let Some(shadow) = self.registry.shadow(&name) else {
                continue;
            };
            tracing::info!(collection = %name, model = %record.spec.model_key(), done = record.done, total = record.total, "resuming an activation");
            self.spawn(shadow, record);
            resumed += 1;
        }
        Ok(resumed)
    }

    fn spawn(self: &Arc<Self>, shadow: Arc<Collection>, record: ShadowRecord) {
        let name = record.spec.name.clone();
        let progress = Arc::new(Progress {
            model: record.spec.model.clone(),
            version: record.spec.model_version.clone(),
            state: Mutex::new((State::Running, String::new())),
            done: AtomicU64::new(record.done),
            total: AtomicU64::new(record.total),
            start: (record.done, Instant::now()),
        });
        self.jobs
            .lock()
            .expect("activations lock")
            .insert(name.clone(), progress.clone());
        let app = self.clone();
        tokio::spawn(async move {
            let mut record = record;
            let result = loop {
                match app.run(&shadow, record.clone(), &progress).await {
                    // A full disk pauses the run: it goes on from the last persisted step
                    // once the store takes writes again.
                    Err(Error::StorageUnavailable(why)) => {
                        tracing::warn!(collection = %name, reason = %why, "activation paused: storage is failing");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        let registry = app.registry.clone();
                        if let Ok(Ok(records)) =
                            tokio::task::spawn_blocking(move || registry.shadow_records()).await
                            && let Some(r) = records.into_iter().find(|r| r.spec.name == name)
                        {
                            record = r;
                        }
                    }
                    other => break other,
                }
            };
            match result {
                Ok(()) => progress.finish(State::Done, String::new()),
                Err(e) => {
                    tracing::error!(collection = %name, error = %e, "activation failed; the collection keeps its current model");
                    progress.finish(State::Failed, e.to_string());
                    let registry = app.registry.clone();
                    let gone = name.clone();
                    if let Err(e) = blocking(move || registry.abandon_generation(&gone)).await {
                        tracing::error!(collection = %name, error = %e, "could not remove the abandoned generation");
                    }
                }
            }
        });
    }

    /// Re-embeds `items` (with their stored inputs) with the shadow's model.
    async fn reembed(&self, key: &str, mut items: Vec<ItemData>) -> Result<Vec<ItemData>> {
        let model = self.embedder.info(key)?;
        let inputs = items
            .iter()
            .map(|it| {
                let data = it.input.as_deref().and_then(decode_input).ok_or_else(|| {
                    Error::Corrupt(format!("the stored input of item {:?}", it.id))
                })?;
                let tower = tower_for(&model, matches!(data, crate::embed::InputData::Image(_)));
                Ok(Input { data, tower })
            })
            .collect::<Result<Vec<_>>>()?;
        let vectors = self.embedder.embed(key, inputs, true).await?;
        for (it, v) in items.iter_mut().zip(vectors) {
            it.vector = v;
        }
        Ok(items)
    }

    async fn run(
        self: &Arc<Self>,
        shadow: &Arc<Collection>,
        mut record: ShadowRecord,
        progress: &Progress,
    ) -> Result<()> {
        let name = record.spec.name.clone();
        let key = record.spec.model_key();
        loop {
            let source = self.registry.collection(&name)?;
            // What is left is about what the source holds beyond what the new generation
            // already has (writes during the run add to it).
            let left = source.len().saturating_sub(shadow.len()) as u64;
            progress
                .total
                .store(record.total.max(record.done + left), Ordering::Relaxed);
            let (items, next) = {
                let (registry, source, cursor) =
                    (self.registry.clone(), source.clone(), record.cursor);
                blocking(move || registry.source_step(&source, cursor)).await?
            };
            if next == record.cursor {
                // Caught up: the switch finishes the tail with writes held.
                let (registry, shadow, this, handle) = (
                    self.registry.clone(),
                    shadow.clone(),
                    self.clone(),
                    tokio::runtime::Handle::current(),
                );
                let key = key.clone();
                let done = blocking(move || {
                    let mut reembed =
                        |items: Vec<ItemData>| handle.block_on(this.reembed(&key, items));
                    registry.switch_generation(&source, &shadow, &mut record, &mut reembed)?;
                    Ok(record.done)
                })
                .await?;
                progress.done.store(done, Ordering::Relaxed);
                return Ok(());
            }
            let step_started = Instant::now();
            let items = if items.is_empty() {
                items
            } else {
                self.reembed(&key, items).await?
            };
            let rate = self.rate.load(Ordering::Relaxed);
            if rate > 0 {
                let due = std::time::Duration::from_secs_f64(items.len() as f64 / rate as f64);
                tokio::time::sleep(due.saturating_sub(step_started.elapsed())).await;
            }
            record.cursor = next;
            record.done += items.len() as u64;
            let (registry, shadow, rec) = (self.registry.clone(), shadow.clone(), record.clone());
            blocking(move || registry.shadow_write(&shadow, &items, &rec)).await?;
            progress.done.store(record.done, Ordering::Relaxed);
        }
    }
}
