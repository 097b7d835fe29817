//! The batching policy: one graph behind a bounded queue, run in batches on a thread of
//! its own. Admission is all or nothing per request (RESOURCE_EXHAUSTED for a unary
//! caller on a full queue, a wait for a stream); the worker takes what is queued, up to
//! `max_batch`, waits up to `max_delay` for more while the batch is smaller than the
//! previous one, runs each group of same-shaped jobs (padded to one shape on CUDA) and
//! answers each job on its own channel.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::Instant;

use ort::session::Session;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use super::{BatchConfig, runtime};
use crate::error::{Error, Result};

/// One graph behind a bounded queue, run in batches on a dedicated thread.
pub(super) struct Batcher {
    queue: Sender<Job>,
    admission: Arc<Semaphore>,
    /// The admission semaphore's size.
    capacity: usize,
    pub(super) provider: &'static str,
    pub(super) stats: Arc<BatchStats>,
}

/// What a graph's batch worker has done: batches run and the jobs (inputs or pairs)
/// they held, so jobs / batches is the mean batch size.
#[derive(Debug)]
pub struct BatchStats {
    pub batches: std::sync::atomic::AtomicU64,
    pub jobs: std::sync::atomic::AtomicU64,
    /// Inputs per batch run.
    pub sizes: crate::metrics::Histogram,
    /// Seconds per batch run.
    pub inference: crate::metrics::Histogram,
    /// Inputs admitted and not yet answered (the queue's depth).
    pub queued: std::sync::atomic::AtomicI64,
}

impl Default for BatchStats {
    fn default() -> Self {
        BatchStats {
            batches: Default::default(),
            jobs: Default::default(),
            sizes: crate::metrics::Histogram::new(crate::metrics::SIZES),
            inference: crate::metrics::Histogram::seconds(),
            queued: Default::default(),
        }
    }
}

/// What a batch worker feeds its graph and reads back.
pub(super) struct Graph {
    /// For logs: the tower's name, or "pair".
    pub(super) label: String,
    pub(super) inputs: Vec<String>,
    pub(super) output: String,
    /// Output values per row (the dimension, or 1 for a pair score).
    pub(super) width: usize,
    pub(super) normalize: bool,
}

struct Job {
    /// One tensor per graph input, each shaped `dims`.
    values: Vec<Vec<f32>>,
    /// The item's shape without the batch axis; only equal shapes batch together.
    dims: Vec<i64>,
    queued: Instant,
    reply: oneshot::Sender<std::result::Result<Vec<f32>, String>>,
    /// The request's admission; its queue slots free when its last job is done.
    _permit: Arc<OwnedSemaphorePermit>,
    /// The caller's span: the batch that runs this job follows from it.
    span: tracing::Span,
}

type Reply = oneshot::Receiver<std::result::Result<Vec<f32>, String>>;

impl Batcher {
    pub(super) fn start(
        file: &Path,
        check: &runtime::GraphCheck<'_>,
        graph: Graph,
        config: BatchConfig,
    ) -> Result<Batcher> {
        // One session whose intra-op threads cover the cores: two sessions of half the
        // threads each split a bounded number of waiting requests between them and ran
        // at half speed (measured: 0.5x with 64 single-image clients).
        let (session, provider) = runtime::open_session(
            file,
            check,
            config.device,
            config.conv_search,
            config.threads.max(1),
            config.spin,
        )?;
        let (tx, rx) = channel::<Job>();
        let stats = Arc::new(BatchStats::default());
        let counted = stats.clone();
        let pad = config
            .pad
            .unwrap_or(provider == "CUDAExecutionProvider")
            .then_some(config.max_batch);
        std::thread::Builder::new()
            .name(format!("embed-{}", graph.label))
            .spawn(move || worker(session, &graph, &rx, config, pad, &counted))
            .map_err(Error::Io)?;
        Ok(Batcher {
            queue: tx,
            admission: Arc::new(Semaphore::new(config.queue)),
            capacity: config.queue,
            provider,
            stats,
        })
    }

    /// Room for `n` inputs of one request, all or nothing. `wait`: block on a full
    /// queue (streams) instead of RESOURCE_EXHAUSTED (unary calls).
    pub(super) async fn admit(
        &self,
        model: &str,
        what: &str,
        n: usize,
        wait: bool,
    ) -> Result<Arc<OwnedSemaphorePermit>> {
        if n > self.capacity {
            return Err(Error::ResourceExhausted(format!(
                "model {model:?}: {n} inputs for {what} exceed its queue of {}; send fewer per request",
                self.capacity
            )));
        }
        let refused =
            || Error::ResourceExhausted(format!("model {model:?}: the queue is full; retry later"));
        let permit = if wait {
            self.admission
                .clone()
                .acquire_many_owned(n as u32)
                .await
                .map_err(|_| refused())?
        } else {
            self.admission
                .clone()
                .try_acquire_many_owned(n as u32)
                .map_err(|_| refused())?
        };
        Ok(Arc::new(permit))
    }

    pub(super) fn send(
        &self,
        values: Vec<Vec<f32>>,
        dims: Vec<i64>,
        permit: &Arc<OwnedSemaphorePermit>,
    ) -> Result<Reply> {
        let (reply, rx) = oneshot::channel();
        self.stats
            .queued
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.queue
            .send(Job {
                values,
                dims,
                queued: Instant::now(),
                reply,
                _permit: permit.clone(),
                span: tracing::Span::current(),
            })
            .map_err(|_| Error::Unavailable("model worker stopped".into()))?;
        Ok(rx)
    }
}

/// Waits for every reply, naming the failed input (`what` 3).
pub(super) async fn collect(pending: Vec<Reply>, what: &str) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(pending.len());
    for (i, rx) in pending.into_iter().enumerate() {
        let v = rx
            .await
            .map_err(|_| Error::Model("model worker stopped".into()))?
            .map_err(|e| Error::Model(format!("{what} {i}: {e}")))?;
        out.push(v);
    }
    Ok(out)
}

/// A batch worker's thread: gather a batch (what is queued, up to max_batch; then, while
/// fewer jobs than the previous batch had, what arrives within max_delay of the oldest),
/// run each group of same-shaped jobs, answer each job.
fn worker(
    mut session: Session,
    graph: &Graph,
    rx: &Receiver<Job>,
    cfg: BatchConfig,
    pad: Option<usize>,
    stats: &BatchStats,
) {
    // Jobs in the previous batch: how many concurrent callers to wait for.
    let mut previous = 0usize;
    loop {
        let mut batch = Vec::with_capacity(cfg.max_batch);
        match rx.recv() {
            Ok(job) => batch.push(job),
            Err(_) => return, // model dropped
        }
        // The delay runs from when the oldest job was queued: jobs that waited while the
        // previous batch ran go at once with whatever else is there.
        let deadline = batch[0].queued + cfg.max_delay;
        while batch.len() < cfg.max_batch {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => {
                    // Wait for company only up to the previous batch's size: N steady
                    // clients are all here once N jobs are, and waiting out max_delay
                    // for more would add it to every request (a lone client, or two,
                    // would pay 2 ms a call for nothing). Growth still batches: jobs
                    // already queued are always taken, up to max_batch.
                    if batch.len() >= previous {
                        break;
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match rx.recv_timeout(left) {
                        Ok(job) => batch.push(job),
                        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                    }
                }
            }
        }
        previous = batch.len();
        // Graphs with dynamic spatial dims get inputs of many sizes: one run per size.
        let mut groups: Vec<Vec<Job>> = Vec::new();
        for job in batch {
            match groups.iter_mut().find(|g| g[0].dims == job.dims) {
                Some(g) => g.push(job),
                None => groups.push(vec![job]),
            }
        }
        for jobs in groups {
            let n = jobs.len();
            stats
                .batches
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            stats
                .jobs
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            // One batch serves many callers: its span follows from each of theirs, so a
            // trace of a request leads to the batch that ran it.
            let span = tracing::debug_span!("batch", graph = %graph.label, size = n);
            for job in &jobs {
                span.follows_from(&job.span);
            }
            let _enter = span.enter();
            stats.sizes.observe(n as f64);
            let started = Instant::now();
            let result = run(&mut session, graph, &jobs, pad);
            stats.inference.observe_duration(started.elapsed());
            stats
                .queued
                .fetch_sub(n as i64, std::sync::atomic::Ordering::Relaxed);
            match result {
                Ok(rows) => {
                    for (job, row) in jobs.into_iter().zip(rows) {
                        let _ = job.reply.send(Ok(row));
                    }
                }
                Err(e) => {
                    tracing::error!(graph = %graph.label, error = %e, batch = n, "inference failed");
                    for job in jobs {
                        let _ = job.reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }
}

/// Runs one batch of same-shaped jobs, padded with rows of zeros up to `pad` rows when
/// given (whose outputs are dropped).
fn run(
    session: &mut Session,
    graph: &Graph,
    jobs: &[Job],
    pad: Option<usize>,
) -> std::result::Result<Vec<Vec<f32>>, String> {
    let n = jobs.len();
    let rows = pad.map_or(n, |p| p.max(n));
    let mut shape = vec![rows as i64];
    shape.extend_from_slice(&jobs[0].dims);
    let mut inputs = Vec::with_capacity(graph.inputs.len());
    for (i, name) in graph.inputs.iter().enumerate() {
        let per = jobs[0].values[i].len();
        let mut data = Vec::with_capacity(rows * per);
        for job in jobs {
            data.extend_from_slice(&job.values[i]);
        }
        data.resize(rows * per, 0.0);
        let tensor =
            ort::value::Tensor::from_array((shape.clone(), data)).map_err(|e| e.to_string())?;
        inputs.push((name.as_str(), tensor));
    }
    let outputs = session.run(inputs).map_err(|e| e.to_string())?;
    let (out_shape, values) = outputs[graph.output.as_str()]
        .try_extract_tensor::<f32>()
        .map_err(|e| e.to_string())?;
    let dim = graph.width;
    let ok = match out_shape.len() {
        1 => dim == 1 && out_shape[0] as usize == rows,
        2 => out_shape[0] as usize == rows && out_shape[1] as usize == dim,
        _ => false,
    };
    if !ok {
        return Err(format!(
            "output shape {out_shape:?}, expected [{rows}, {dim}]"
        ));
    }
    Ok(values[..n * dim]
        .chunks_exact(dim)
        .map(|row| {
            let mut v = row.to_vec();
            if graph.normalize {
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                if norm > 0.0 {
                    v.iter_mut().for_each(|x| *x /= norm);
                }
            }
            v
        })
        .collect())
}
