//! The mining job: resolves and orders the anchors, mines them batch by batch on the
//! search pool, and hands the batches to the caller through a channel of a few slots.
//!
//! Flow control is the channel: the job waits for a free slot before it mines the next
//! batch, so a slow reader keeps the job (and the server's memory) still, and a reader
//! that goes away stops it: the job watches the channel while a batch is being mined and
//! raises a flag that every chunk checks between anchors.
//!
//! Order: the anchors' ids sorted, then permuted by the seed; each anchor draws from its
//! own generator (seed and id), so a seed gives the same stream on the same data
//! however the batch was split among threads.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::batches::{ClassBatch, Passes, RawBatchSpec};
use super::job::{self, AnchorIn, ChunkOut, MinedItem, Mode, Pair, Rules, Stats, Triplet};
use super::spec::{Anchors, MineSpec, RawSpec};
use crate::collections::{Catalogue, Collection, Registry, validate};
use crate::error::{Error, Field, Result};
use crate::pool::{Priority, WorkPool};
use crate::rng::Permutation;
use crate::types::ItemData;

/// Batches a job may run ahead of its reader.
const AHEAD: usize = 2;
/// Anchors below which a batch is not split among threads.
const MIN_CHUNK: usize = 16;

/// One message of a mining stream.
#[derive(Debug, Default)]
pub struct Batch {
    pub triplets: Vec<Triplet>,
    pub pairs: Vec<Pair>,
    pub items: Vec<MinedItem>,
    /// Oldest and newest item generation used.
    pub generations: Option<(u64, u64)>,
    /// Session: the step this answers.
    pub step: u64,
    /// On the last message of a stream, and on every Session answer.
    pub stats: Option<Stats>,
    pub last: bool,
    /// Session with write-back: the last step whose write-back is durable.
    pub written_step: Option<u64>,
}

/// One step of a Session, converted.
#[derive(Debug, Default)]
pub struct Step {
    pub step: u64,
    pub request: Option<RawSpec>,
    pub anchors: Vec<StepAnchor>,
    /// Write the anchors' vectors back after mining (a cross-batch memory step).
    pub write_back: bool,
}

/// An anchor of a Session step: a stored id (with or without a fresh vector), or a new
/// id with a label and a vector.
#[derive(Debug, Default, Clone)]
pub struct StepAnchor {
    pub id: String,
    pub label: String,
    pub vector: Vec<f32>,
}

/// Mining across all jobs, for tests and metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Jobs running now.
    pub active: AtomicU64,
    /// Messages handed to readers.
    pub batches: AtomicU64,
    /// Jobs that have filled their read-ahead and wait for their reader to take one.
    pub waiting: AtomicU64,
    pub anchors: AtomicU64,
    pub triplets: AtomicU64,
}

/// Whether a collection takes vector-only writes now (the daemon refuses them while a
/// collection is being re-embedded with another model): handed in by the layer that
/// knows, so that the miner does not depend on it.
pub type WriteGate = Arc<dyn Fn(&str) -> Result<()> + Send + Sync>;

/// Starts mining jobs against the registry's collections.
pub struct Miner {
    registry: Arc<Registry>,
    pool: Arc<WorkPool>,
    counters: Arc<Counters>,
    write_gate: WriteGate,
}

/// A collection made ready for one request.
struct Prepared {
    coll: Arc<Collection>,
    spec: Arc<MineSpec>,
    exclude: Arc<HashSet<u64>>,
    unlabelled: Option<u32>,
}

impl Miner {
    pub fn new(registry: Arc<Registry>, pool: Arc<WorkPool>) -> Self {
        Miner {
            registry,
            pool,
            counters: Arc::default(),
            write_gate: Arc::new(|_| Ok(())),
        }
    }

    /// Session write-backs ask `gate` first.
    pub fn with_write_gate(mut self, gate: WriteGate) -> Self {
        self.write_gate = gate;
        self
    }

    /// Checks a MineBatches request against its collection and starts the stream.
    pub async fn mine_batches(
        &self,
        raw: RawBatchSpec,
    ) -> Result<mpsc::Receiver<Result<ClassBatch>>> {
        let spec = raw.validate(&Field::default())?;
        let coll = self
            .registry
            .collection(&spec.collection)
            .map_err(|e| e.under(&Field::name("collection")))?;
        let passes = tokio::task::spawn_blocking(move || Passes::new(coll, spec))
            .await
            .map_err(|e| Error::Worker(format!("mining set-up: {e}")))??;
        let pool = self.pool.clone();
        Ok(self.spawn_stream(|tx| super::batches::run(passes, pool, tx)))
    }

    /// Runs a stream's job, counted as active while it runs; returns its receiver.
    fn spawn_stream<T, F>(
        &self,
        job: impl FnOnce(mpsc::Sender<Result<T>>) -> F,
    ) -> mpsc::Receiver<Result<T>>
    where
        T: Send + 'static,
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(AHEAD);
        let counters = self.counters.clone();
        counters.active.fetch_add(1, Ordering::Relaxed);
        let job = job(tx);
        tokio::spawn(async move {
            job.await;
            counters.active.fetch_sub(1, Ordering::Relaxed);
        });
        rx
    }

    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// Checks the request against its collection and starts the job. Errors in the
    /// request come back here, before any message.
    pub async fn mine(&self, raw: RawSpec, mode: Mode) -> Result<mpsc::Receiver<Result<Batch>>> {
        let spec = raw.validate(&Field::default())?;
        let coll = self
            .registry
            .collection(&spec.collection)
            .map_err(|e| e.under(&Field::name("collection")))?;
        let (prepared, pass) = tokio::task::spawn_blocking(move || {
            let prepared = prepare(coll, spec, &Field::default(), false)?;
            let pass = AnchorPass::new(&prepared)?;
            Ok::<_, Error>((prepared, pass))
        })
        .await
        .map_err(|e| Error::Worker(format!("mining set-up: {e}")))??;
        let (pool, counters) = (self.pool.clone(), self.counters.clone());
        Ok(self.spawn_stream(move |tx| async move {
            run(prepared, pass, mode, pool, &counters, tx).await
        }))
    }

    /// A Session: one answer per step, in step order, each mined against the
    /// collection as it stands when the step arrives.
    pub fn session(
        &self,
        mut steps: mpsc::Receiver<Result<Step>>,
    ) -> mpsc::Receiver<Result<Batch>> {
        let (tx, rx) = mpsc::channel(AHEAD);
        let registry = self.registry.clone();
        let pool = self.pool.clone();
        let counters = self.counters.clone();
        counters.active.fetch_add(1, Ordering::Relaxed);
        let gate = self.write_gate.clone();
        tokio::spawn(async move {
            let mut current: Option<Prepared> = None;
            let mut n = 0usize;
            // The write-back in flight (its step and the write), and what is durable.
            let mut pending: Option<(u64, tokio::task::JoinHandle<Result<usize>>)> = None;
            let mut written_step: Option<u64> = None;
            let mut written = 0u64;
            while let Some(step) = steps.recv().await {
                // The previous step's write-back is done before this step is mined, so
                // that it sees those vectors.
                if let Some((s, write)) = pending.take() {
                    match write.await {
                        Ok(Ok(k)) => {
                            written_step = Some(s);
                            written += k as u64;
                        }
                        Ok(Err(e)) => {
                            let _ = tx.send(Err(e)).await;
                            break;
                        }
                        Err(e) => {
                            let _ = tx
                                .send(Err(Error::Worker(format!("session write-back: {e}"))))
                                .await;
                            break;
                        }
                    }
                }
                let root = Field::name("steps").at(n);
                n += 1;
                let answer = match step {
                    Ok(step) => {
                        session_step(
                            &registry,
                            &pool,
                            &gate,
                            &mut current,
                            step,
                            &root,
                            &counters,
                            &tx,
                        )
                        .await
                    }
                    Err(e) => Err(e),
                };
                let (answer, write) = match answer {
                    Ok((mut batch, write)) => {
                        batch.written_step = written_step;
                        if let Some(stats) = batch.stats.as_mut() {
                            stats.written = written;
                        }
                        (Ok(batch), write)
                    }
                    Err(e) => (Err(e), None),
                };
                let fail = answer.is_err();
                let sent = tx.send(answer).await;
                // The write starts once the answer is on its way: the trainer's next
                // forward and backward pass hide it.
                if let Some((s, coll, items)) = write {
                    let registry = registry.clone();
                    pending = Some((
                        s,
                        tokio::task::spawn_blocking(move || registry.write_back(&coll, &items)),
                    ));
                }
                if sent.is_err() || fail {
                    break;
                }
                counters.batches.fetch_add(1, Ordering::Relaxed);
            }
            // A session that ends still makes its last write-back durable.
            if let Some((step, write)) = pending.take() {
                let failed = match write.await {
                    Ok(Ok(_)) => None,
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(e) => Some(e.to_string()),
                };
                if let Some(error) = failed {
                    tracing::warn!(step, error, "a closing session's last write-back failed");
                }
            }
            counters.active.fetch_sub(1, Ordering::Relaxed);
        });
        rx
    }
}

/// Resolves the collection-dependent parts of a request: a stream's collection must
/// have two labels at least (a Session's may start empty: a cross-batch memory fills it
/// by write-back, and a step with nothing to mine against answers with no triplets);
/// excluded ids become keys.
fn prepare(coll: Arc<Collection>, spec: MineSpec, root: &Field, session: bool) -> Result<Prepared> {
    let c = coll.catalogue();
    let unlabelled = c.label_id("");
    let labels = c
        .labels()
        .filter(|l| Some(*l) != unlabelled)
        .take(2)
        .count();
    if labels < 2 && !session {
        return Err(Error::invalid(
            Field::name("collection").under(root),
            format!(
                "collection {:?} has {} labelled classes; mining needs items of two labels at least",
                spec.collection, labels
            ),
        ));
    }
    let exclude: HashSet<u64> = spec
        .exclude_ids
        .iter()
        .filter_map(|id| c.key_of(id))
        .collect();
    drop(c);
    Ok(Prepared {
        coll,
        spec: Arc::new(spec),
        exclude: Arc::new(exclude),
        unlabelled,
    })
}

/// Whether `key` may be an anchor: labelled, not excluded, fresh enough, in the shard.
fn usable(p: &Prepared, c: &Catalogue, key: u64) -> bool {
    let spec = &p.spec;
    c.get(key).is_some_and(|e| {
        Some(e.label) != p.unlabelled
            && e.generation >= spec.min_generation
            && !p.exclude.contains(&key)
            && spec.shard.contains(&e.id)
    })
}

/// The anchors of a whole pass, in the seed's order, taken a batch at a time.
///
/// The ids are sorted and visited through a seeded [`Permutation`] of their positions,
/// and each is checked when its batch is taken, so a pass holds no table of its own: a
/// whole-collection pass shares the catalogue's sorted ids with every other pass begun
/// while no id came or went (an idle MineTriplets stream held 1.8 MB at 100k items when
/// each pass kept its own shuffled copy).
struct AnchorPass {
    ids: Arc<Vec<Arc<str>>>,
    order: Permutation,
    next: usize,
}

impl AnchorPass {
    /// Resolves the request's anchor set. Ids and labels are checked (and filtered) at
    /// once, so that an unknown one is an error before any message.
    fn new(p: &Prepared) -> Result<Self> {
        let spec = &p.spec;
        let c = p.coll.catalogue();
        let ids: Arc<Vec<Arc<str>>> = match &spec.anchors {
            Anchors::All => c.sorted_ids(),
            Anchors::Ids(given) => {
                let mut out = Vec::with_capacity(given.len());
                for (i, id) in given.iter().enumerate() {
                    let Some(key) = c.key_of(id) else {
                        return Err(Error::invalid(
                            Field::name("anchors").field("ids").at(i),
                            format!("no item {id:?} in collection {:?}", spec.collection),
                        ));
                    };
                    if usable(p, &c, key) {
                        out.push(c.get(key).expect("catalogued").id.clone());
                    }
                }
                Arc::new(sorted(out))
            }
            Anchors::Labels(labels) => {
                let mut out = Vec::new();
                for (i, name) in labels.iter().enumerate() {
                    let members = c.label_id(name).map(|l| c.members(l)).unwrap_or_default();
                    if members.is_empty() {
                        return Err(Error::invalid(
                            Field::name("anchors").field("labels").at(i),
                            format!(
                                "no item has label {name:?} in collection {:?}",
                                spec.collection
                            ),
                        ));
                    }
                    out.extend(
                        members
                            .iter()
                            .filter(|k| usable(p, &c, **k))
                            .filter_map(|k| c.get(*k).map(|e| e.id.clone())),
                    );
                }
                Arc::new(sorted(out))
            }
        };
        let order = Permutation::new(ids.len(), spec.seed);
        Ok(AnchorPass {
            ids,
            order,
            next: 0,
        })
    }

    /// The next `size` anchors of the pass that are usable now (fewer at its end; none
    /// once it is over). An id deleted since the pass began is skipped.
    fn take(&mut self, p: &Prepared, size: usize) -> Vec<Arc<str>> {
        let c = p.coll.catalogue();
        let mut out = Vec::with_capacity(size);
        while out.len() < size && self.next < self.ids.len() {
            let id = &self.ids[self.order.at(self.next)];
            self.next += 1;
            if c.key_of(id).is_some_and(|key| usable(p, &c, key)) {
                out.push(id.clone());
            }
        }
        out
    }
}

fn sorted(mut ids: Vec<Arc<str>>) -> Vec<Arc<str>> {
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The stored anchors of `ids` as they are now (an id deleted meanwhile is skipped).
fn stored_anchors(coll: &Collection, ids: &[Arc<str>]) -> Result<Vec<AnchorIn>> {
    // Resolved under the catalogue lock; vectors are read after it is released.
    let found: Vec<(u64, AnchorIn)> = {
        let c = coll.catalogue();
        ids.iter()
            .filter_map(|id| {
                let key = c.key_of(id)?;
                let e = c.get(key)?;
                let anchor = AnchorIn {
                    id: e.id.clone(),
                    key: Some(key),
                    label: Some(e.label),
                    label_name: Arc::from(c.label_name(e.label)),
                    vector: Vec::new(),
                    generation: e.generation,
                };
                Some((key, anchor))
            })
            .collect()
    };
    let mut out = Vec::with_capacity(found.len());
    for (key, mut anchor) in found {
        if let Some(vector) = coll.vector(key)? {
            anchor.vector = vector;
            out.push(anchor);
        }
    }
    Ok(out)
}

/// Where the anchors of one batch come from.
#[derive(Clone)]
enum Source {
    /// Stored ids: resolved (key, label, vector) on the pool thread that mines them.
    Ids(Vec<Arc<str>>),
    /// Already resolved (a Session step's).
    Resolved(Vec<AnchorIn>),
}

/// Mines one batch: split into chunks, run in parallel on the pool, joined in order.
/// Returns None when the reader went away meanwhile.
async fn mine_batch(
    p: &Prepared,
    mode: Mode,
    source: Source,
    pool: &WorkPool,
    tx: &mpsc::Sender<Result<Batch>>,
) -> Option<Result<ChunkOut>> {
    let cancel = Arc::new(AtomicBool::new(false));
    let len = match &source {
        Source::Ids(v) => v.len(),
        Source::Resolved(v) => v.len(),
    };
    let chunks = pool.threads().min(len.div_ceil(MIN_CHUNK)).max(1);
    let per = len.div_ceil(chunks).max(1);
    let mut parts: Vec<Source> = Vec::with_capacity(chunks);
    match source {
        Source::Ids(v) => parts.extend(v.chunks(per).map(|c| Source::Ids(c.to_vec()))),
        Source::Resolved(v) => parts.extend(v.chunks(per).map(|c| Source::Resolved(c.to_vec()))),
    }
    let mut pending = Vec::with_capacity(parts.len());
    for part in parts {
        let (coll, spec, exclude, unlabelled, cancel) = (
            p.coll.clone(),
            p.spec.clone(),
            p.exclude.clone(),
            p.unlabelled,
            cancel.clone(),
        );
        let job = move || {
            let anchors = match part {
                Source::Ids(ids) => stored_anchors(&coll, &ids)?,
                Source::Resolved(a) => a,
            };
            let rules = Rules {
                spec: &spec,
                mode,
                exclude,
                unlabelled,
                cancel: &cancel,
            };
            job::mine_chunk(&coll, &anchors, &rules)
        };
        pending.push(submit(pool, job));
    }
    let joined = async {
        let mut out = ChunkOut::default();
        for p in pending {
            let part = p.await?;
            out.triplets.extend(part.triplets);
            out.pairs.extend(part.pairs);
            let mut seen: HashSet<Arc<str>> = out.items.iter().map(|i| i.id.clone()).collect();
            out.items
                .extend(part.items.into_iter().filter(|i| seen.insert(i.id.clone())));
            out.generations = match (out.generations, part.generations) {
                (Some((a, b)), Some((c, d))) => Some((a.min(c), b.max(d))),
                (a, b) => a.or(b),
            };
            out.stats.merge(&part.stats);
        }
        Ok(out)
    };
    tokio::select! {
        r = joined => Some(r),
        _ = tx.closed() => {
            cancel.store(true, Ordering::Relaxed);
            None
        }
    }
}

/// Queues a job on the search pool as background work (searches go first), waiting
/// (briefly, repeatedly) while its queue is full: a mining stream is a long job that
/// should yield to searches, not fail.
///
/// The job is queued when this is called, not when the future is first polled: the
/// chunks of one batch are submitted one after another and awaited in order, and a
/// lazy submit would run them one at a time (it did: a batch used one core of two).
pub(super) fn submit<T: Send + 'static>(
    pool: &WorkPool,
    job: impl FnOnce() -> Result<T> + Send + Clone + 'static,
) -> impl std::future::Future<Output = Result<T>> {
    let first = pool.run_at(Priority::Background, job.clone());
    async move {
        let mut answer = first.await;
        while let Err(Error::ResourceExhausted(_)) = answer {
            tokio::time::sleep(Duration::from_millis(2)).await;
            answer = pool.run_at(Priority::Background, job.clone()).await;
        }
        answer
    }
}

/// A whole pass: batches until the anchors or `max_triplets` run out, then the stats.
async fn run(
    p: Prepared,
    mut pass: AnchorPass,
    mode: Mode,
    pool: Arc<WorkPool>,
    counters: &Counters,
    tx: mpsc::Sender<Result<Batch>>,
) {
    let started = Instant::now();
    let mut stats = Stats::default();
    let limit = p.spec.max_triplets;
    let mut emitted = 0u64;
    loop {
        // Wait for a free slot before mining: the reader sets the pace. (This job is
        // the channel's only sender, so a full channel now stays full until a read.)
        let full = tx.capacity() == 0;
        if full {
            counters.waiting.fetch_add(1, Ordering::Relaxed);
        }
        let reserved = tx.reserve().await;
        if full {
            counters.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        let Ok(permit) = reserved else {
            return;
        };
        drop(permit);
        let chunk = pass.take(&p, p.spec.batch_size);
        if chunk.is_empty() {
            break;
        }
        let Some(r) = mine_batch(&p, mode, Source::Ids(chunk), &pool, &tx).await else {
            return;
        };
        let mut out = match r {
            Ok(out) => out,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        if limit > 0 {
            let left = (limit - emitted) as usize;
            out.triplets.truncate(left);
            out.pairs.truncate(left);
        }
        let made = (out.triplets.len() + out.pairs.len()) as u64;
        emitted += made;
        stats.merge(&out.stats);
        counters
            .anchors
            .fetch_add(out.stats.anchors, Ordering::Relaxed);
        counters.triplets.fetch_add(made, Ordering::Relaxed);
        let batch = Batch {
            triplets: out.triplets,
            pairs: out.pairs,
            items: out.items,
            generations: out.generations,
            ..Batch::default()
        };
        if tx.send(Ok(batch)).await.is_err() {
            return;
        }
        counters.batches.fetch_add(1, Ordering::Relaxed);
        if limit > 0 && emitted >= limit {
            break;
        }
    }
    if mode == Mode::Pairs {
        stats.pairs = emitted;
    } else {
        stats.triplets = emitted;
    }
    stats.seconds = started.elapsed().as_secs_f64();
    let _ = tx
        .send(Ok(Batch {
            stats: Some(stats),
            last: true,
            ..Batch::default()
        }))
        .await;
}

/// One Session step: (re)prepares on a new request, resolves the step's anchors, mines.
#[allow(clippy::too_many_arguments)]
async fn session_step(
    registry: &Registry,
    pool: &WorkPool,
    gate: &WriteGate,
    current: &mut Option<Prepared>,
    step: Step,
    root: &Field,
    counters: &Counters,
    tx: &mpsc::Sender<Result<Batch>>,
) -> Result<(Batch, Option<WriteBack>)> {
    let started = Instant::now();
    if let Some(raw) = step.request {
        let request = Field::name("request").under(root);
        let spec = raw.validate(&request)?;
        let coll = registry
            .collection(&spec.collection)
            .map_err(|e| e.under(&Field::name("collection").under(&request)))?;
        let req = request.clone();
        *current = Some(
            tokio::task::spawn_blocking(move || prepare(coll, spec, &req, true))
                .await
                .map_err(|e| Error::Worker(format!("session set-up: {e}")))??,
        );
    }
    let Some(p) = current.as_ref() else {
        return Err(Error::invalid(
            Field::name("request").under(root),
            "the first step must carry the request",
        ));
    };
    if step.anchors.is_empty() {
        return Err(Error::invalid(
            Field::name("anchors").under(root),
            "must not be empty",
        ));
    }
    if step.anchors.len() > super::spec::MAX_BATCH {
        return Err(Error::invalid(
            Field::name("anchors").under(root),
            format!(
                "{} anchors, at most {} per step",
                step.anchors.len(),
                super::spec::MAX_BATCH
            ),
        ));
    }
    let write = if step.write_back {
        gate(&p.coll.spec().name).map_err(|e| e.under(&Field::name("write_back").under(root)))?;
        Some(write_back_items(&p.coll, &step.anchors, step.step))
    } else {
        None
    };
    // The anchors' own checks first (their vectors, by anchor), then what only the
    // write needs.
    let anchors = step_anchors(&p.coll, step.anchors, root)?;
    if let Some(items) = write.as_ref().filter(|i| !i.is_empty()) {
        validate::items(items, p.coll.spec(), registry.limits())
            .map_err(|e| e.under(&Field::name("write_back").under(root)))?;
    }
    let Some(r) = mine_batch(p, Mode::Triplets, Source::Resolved(anchors), pool, tx).await else {
        return Err(Error::Unavailable("the session's reader went away".into()));
    };
    let mut out = r?;
    out.stats.seconds = started.elapsed().as_secs_f64();
    counters
        .anchors
        .fetch_add(out.stats.anchors, Ordering::Relaxed);
    counters
        .triplets
        .fetch_add(out.triplets.len() as u64, Ordering::Relaxed);
    let batch = Batch {
        triplets: out.triplets,
        pairs: Vec::new(),
        items: out.items,
        generations: out.generations,
        step: step.step,
        stats: Some(out.stats),
        last: false,
        written_step: None,
    };
    Ok((
        batch,
        write
            .filter(|items| !items.is_empty())
            .map(|items| (step.step, p.coll.clone(), items)),
    ))
}

/// A write-back to run: the step, its collection, the items.
type WriteBack = (u64, Arc<Collection>, Vec<ItemData>);

/// The items a write-back step writes: each anchor that carries a vector, with its
/// label (or the stored one), the step as generation, and its stored metadata
/// (stored inputs are kept by the write itself). An id sent twice in a step (a sampler
/// that draws with replacement) is written once, with its last vector.
fn write_back_items(coll: &Collection, anchors: &[StepAnchor], step: u64) -> Vec<ItemData> {
    let c = coll.catalogue();
    let mut last: HashMap<&str, usize> = HashMap::with_capacity(anchors.len());
    for (i, a) in anchors.iter().enumerate() {
        if !a.vector.is_empty() {
            last.insert(&a.id, i);
        }
    }
    anchors
        .iter()
        .enumerate()
        .filter(|(i, a)| last.get(a.id.as_str()) == Some(i))
        .map(|(_, a)| a)
        .map(|a| {
            let stored = c.key_of(&a.id).and_then(|k| c.get(k));
            let label = if a.label.is_empty() {
                stored.map_or("", |e| c.label_name(e.label)).to_string()
            } else {
                a.label.clone()
            };
            ItemData {
                id: a.id.clone(),
                label,
                metadata: stored.map(|e| e.metadata.clone()).unwrap_or_default(),
                vector: a.vector.clone(),
                input: None,
                generation: step,
            }
        })
        .collect()
}

/// Resolves a step's anchors: a stored id keeps its label and uses the fresh vector
/// when one is given; a new id needs a label and a vector.
fn step_anchors(coll: &Collection, given: Vec<StepAnchor>, root: &Field) -> Result<Vec<AnchorIn>> {
    let spec = coll.spec();
    let mut out = Vec::with_capacity(given.len());
    for (j, a) in given.into_iter().enumerate() {
        let at = Field::name("anchors").at(j).under(root);
        if a.id.is_empty() {
            return Err(Error::invalid(at.field("id"), "must not be empty"));
        }
        if !a.vector.is_empty() {
            validate::vector(&at.clone().field("vector"), "", &a.vector, spec)?;
        }
        let stored = {
            let c = coll.catalogue();
            c.key_of(&a.id).and_then(|key| {
                c.get(key).map(|e| {
                    (
                        key,
                        e.label,
                        Arc::<str>::from(c.label_name(e.label)),
                        e.generation,
                        e.id.clone(),
                    )
                })
            })
        };
        match stored {
            Some((key, label, label_name, generation, id)) => {
                let vector = if a.vector.is_empty() {
                    match coll.vector(key)? {
                        Some(v) => v,
                        None => continue,
                    }
                } else {
                    a.vector
                };
                out.push(AnchorIn {
                    id,
                    key: Some(key),
                    label: Some(label),
                    label_name,
                    vector,
                    generation,
                });
            }
            None => {
                if a.label.is_empty() {
                    return Err(Error::invalid(
                        at.field("label"),
                        format!(
                            "no item {:?} is stored, so the anchor needs its label",
                            a.id
                        ),
                    ));
                }
                if a.vector.is_empty() {
                    return Err(Error::invalid(
                        at.field("vector"),
                        format!(
                            "no item {:?} is stored, so the anchor needs its vector",
                            a.id
                        ),
                    ));
                }
                let label = coll.catalogue().label_id(&a.label);
                out.push(AnchorIn {
                    id: Arc::from(a.id),
                    key: None,
                    label,
                    label_name: Arc::from(a.label),
                    vector: a.vector,
                    generation: 0,
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chunks of a batch are submitted one after another and awaited in order; they
    /// must run at once. Two jobs that each wait for the other (a barrier of two) finish
    /// only if the second was queued before the first was awaited.
    #[tokio::test]
    async fn submitted_jobs_run_before_they_are_awaited() {
        let pool = WorkPool::new("t", 2, 16);
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let job = |b: Arc<std::sync::Barrier>| {
            move || {
                b.wait();
                Ok(())
            }
        };
        let first = submit(&pool, job(barrier.clone()));
        let second = submit(&pool, job(barrier.clone()));
        let both = async {
            first.await?;
            second.await
        };
        tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .expect("the second job never started: submit is lazy")
            .unwrap();
    }
}
