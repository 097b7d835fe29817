//! A fixed pool of threads for CPU-bound reads (searches), with bounded queues.
//!
//! Searches are pure CPU work. On tokio's blocking pool every concurrent request gets its
//! own thread, and sixteen threads fighting over two cores spend their time switching;
//! here as many threads as cores drain the queues. A full queue is admission control: the
//! caller gets RESOURCE_EXHAUSTED at once instead of waiting behind unbounded work. A job
//! whose caller has gone away is skipped.
//!
//! Two priorities share the threads: foreground jobs (a client waits on each: Search,
//! Classify, Verify) and background jobs (mining streams, throughput work that a trainer
//! consumes in bulk). A free thread takes the oldest foreground job first, so a mining
//! stream cannot queue ahead of a search; but after [`FOREGROUND_RUN`] foreground jobs in
//! a row with background work waiting it takes one background job, so mining keeps at
//! least a share of the pool under a saturating search load instead of starving.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Condvar, Mutex};

use crate::error::{Error, Result};

type Job = Box<dyn FnOnce() + Send>;

/// Foreground jobs a thread may take in a row while background jobs wait.
pub const FOREGROUND_RUN: u32 = 8;

#[derive(Default)]
struct Queues {
    foreground: VecDeque<Job>,
    background: VecDeque<Job>,
    /// Foreground jobs taken in a row while background work waited.
    streak: u32,
    stopped: bool,
}

struct Shared {
    queues: Mutex<Queues>,
    ready: Condvar,
}

pub struct WorkPool {
    shared: Arc<Shared>,
    capacity: usize,
    threads: usize,
}

/// Which queue a job waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    Foreground,
    Background,
}

impl WorkPool {
    /// `threads` workers; each queue holds at most `capacity` waiting jobs.
    pub fn new(name: &str, threads: usize, capacity: usize) -> Self {
        let shared = Arc::new(Shared {
            queues: Mutex::new(Queues::default()),
            ready: Condvar::new(),
        });
        for i in 0..threads.max(1) {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || worker(&shared))
                .expect("spawn pool thread");
        }
        WorkPool {
            shared,
            capacity: capacity.max(1),
            threads: threads.max(1),
        }
    }

    /// How many jobs run at once.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Queues `f` as foreground work now (or refuses at once when the queue is full);
    /// the returned future yields its result.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> impl Future<Output = Result<T>> + Send + 'static {
        self.run_at(Priority::Foreground, f)
    }

    /// [`WorkPool::run`] at a priority.
    pub fn run_at<T: Send + 'static>(
        &self,
        priority: Priority,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> impl Future<Output = Result<T>> + Send + 'static {
        let (done, result) = tokio::sync::oneshot::channel();
        let span = tracing::Span::current();
        let job: Job = Box::new(move || {
            if done.is_closed() {
                return; // the caller went away
            }
            let _enter = span.enter();
            let _ = done.send(f());
        });
        let refused = {
            let mut q = self.shared.queues.lock().expect("pool queue lock");
            let queue = match priority {
                Priority::Foreground => &mut q.foreground,
                Priority::Background => &mut q.background,
            };
            if queue.len() >= self.capacity {
                Some(Error::ResourceExhausted(format!(
                    "search queue is full ({} waiting); retry later",
                    self.capacity
                )))
            } else {
                queue.push_back(job);
                None
            }
        };
        if refused.is_none() {
            self.shared.ready.notify_one();
        }
        async move {
            if let Some(e) = refused {
                return Err(e);
            }
            result
                .await
                .map_err(|_| Error::Worker("search worker dropped the job".into()))?
        }
    }
}

impl Drop for WorkPool {
    fn drop(&mut self) {
        self.shared.queues.lock().expect("pool queue lock").stopped = true;
        self.shared.ready.notify_all();
    }
}

/// The next job: foreground first, but a background job after a streak of
/// [`FOREGROUND_RUN`] foreground ones while background work waits.
fn next(q: &mut Queues) -> Option<Job> {
    let take_background =
        !q.background.is_empty() && (q.foreground.is_empty() || q.streak >= FOREGROUND_RUN);
    if take_background {
        q.streak = 0;
        return q.background.pop_front();
    }
    let job = q.foreground.pop_front()?;
    if q.background.is_empty() {
        q.streak = 0;
    } else {
        q.streak += 1;
    }
    Some(job)
}

fn worker(shared: &Shared) {
    loop {
        let job = {
            let mut q = shared.queues.lock().expect("pool queue lock");
            loop {
                if let Some(job) = next(&mut q) {
                    break job;
                }
                if q.stopped {
                    return;
                }
                q = shared.ready.wait(q).expect("pool queue lock");
            }
        };
        job();
    }
}

/// Runs blocking work (disk, HNSW, a write's fsync) on tokio's blocking threads, off
/// the async workers.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> crate::error::Result<T> + Send + 'static,
) -> crate::error::Result<T> {
    tokio::task::spawn_blocking(f).await?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_jobs_and_refuses_when_full() {
        let pool = WorkPool::new("t", 1, 1);
        assert_eq!(pool.run(|| Ok(41 + 1)).await.unwrap(), 42);
        // Block the only worker, fill the one queue slot, then the next is refused.
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let (held_tx, held_rx) = tokio::sync::oneshot::channel::<()>();
        let blocker = tokio::spawn(pool.run(move || {
            let _ = held_tx.send(());
            release_rx.recv().ok();
            Ok(())
        }));
        // The only worker is taken once the blocker says so, not after a guessed pause.
        held_rx.await.unwrap();
        let queued = tokio::spawn(pool.run(|| Ok(())));
        let err = pool.run(|| Ok(())).await.unwrap_err();
        assert!(matches!(err, Error::ResourceExhausted(_)), "{err}");
        release_tx.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        queued.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn foreground_goes_first_and_background_keeps_a_share() {
        let pool = WorkPool::new("t", 1, 64);
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let (held_tx, held_rx) = tokio::sync::oneshot::channel::<()>();
        let blocker = tokio::spawn(pool.run(move || {
            let _ = held_tx.send(());
            release_rx.recv().ok();
            Ok(())
        }));
        // The only worker is taken once the blocker says so, not after a guessed pause.
        held_rx.await.unwrap();
        // Queued while the only worker is busy: 2 background, then 20 foreground.
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut pending = Vec::new();
        for i in 0..2 {
            let order = order.clone();
            pending.push(tokio::spawn(pool.run_at(Priority::Background, move || {
                order.lock().unwrap().push(format!("b{i}"));
                Ok(())
            })));
        }
        for i in 0..20 {
            let order = order.clone();
            pending.push(tokio::spawn(pool.run(move || {
                order.lock().unwrap().push(format!("f{i}"));
                Ok(())
            })));
        }
        release_tx.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        for p in pending {
            p.await.unwrap().unwrap();
        }
        let order = order.lock().unwrap().clone();
        let pos = |s: &str| order.iter().position(|o| o == s).unwrap();
        let run = FOREGROUND_RUN as usize;
        // FOREGROUND_RUN searches go first, then one mining job, and so on.
        assert_eq!(pos("b0"), run, "{order:?}");
        assert_eq!(pos("b1"), 2 * run + 1, "{order:?}");
        assert_eq!(order.len(), 22);
    }
}
