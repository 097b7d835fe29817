//! A fixed pool of threads for CPU-bound reads (searches, mining), with bounded queues.
//!
//! Searches are pure CPU work. On tokio's blocking pool every concurrent request gets its
//! own thread, and sixteen threads fighting over two cores spend their time switching;
//! here as many threads as cores drain the queues. A full queue is admission control: the
//! caller gets RESOURCE_EXHAUSTED at once instead of waiting behind unbounded work. A job
//! whose caller has gone away is skipped.
//!
//! Two priorities, each with threads of its own: foreground jobs (a client waits on each:
//! Search, Classify, Verify) and background jobs (mining, throughput work that a trainer
//! consumes in bulk). The background threads run at a lower CPU priority (nice
//! [`BACKGROUND_NICE`]), so the kernel gives a core to searches, writes (tokio's blocking
//! threads) and embedding first whenever they want one, and mining takes the rest: all
//! of the cores on an otherwise idle machine, about a tenth of them under a saturating
//! load (a nice-10 thread weighs 110 against 1024). A queue order alone could not do
//! this: the writes that starved under the full load test (1,000 streams) waited for the
//! collection's writer lock, whose holders the mining threads kept off the cores, not
//! for a place in this pool (docs/benchmarks.md, "Load").

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Condvar, Mutex};

use crate::error::{Error, Result};

type Job = Box<dyn FnOnce() + Send>;

/// The nice value of the background threads (0 is the daemon's own; 19 the lowest).
pub const BACKGROUND_NICE: i32 = 10;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    stopped: bool,
}

struct Shared {
    foreground: (Mutex<Queue>, Condvar),
    background: (Mutex<Queue>, Condvar),
}

impl Shared {
    fn queue(&self, priority: Priority) -> &(Mutex<Queue>, Condvar) {
        match priority {
            Priority::Foreground => &self.foreground,
            Priority::Background => &self.background,
        }
    }
}

pub struct WorkPool {
    shared: Arc<Shared>,
    capacity: usize,
    threads: usize,
}

/// Which queue, and so which threads, a job runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    Foreground,
    Background,
}

impl WorkPool {
    /// `threads` workers per priority; each queue holds at most `capacity` waiting jobs.
    pub fn new(name: &str, threads: usize, capacity: usize) -> Self {
        let shared = Arc::new(Shared {
            foreground: Default::default(),
            background: Default::default(),
        });
        for priority in [Priority::Foreground, Priority::Background] {
            for i in 0..threads.max(1) {
                let shared = shared.clone();
                let name = match priority {
                    Priority::Foreground => format!("{name}-{i}"),
                    Priority::Background => format!("{name}-bg-{i}"),
                };
                std::thread::Builder::new()
                    .name(name)
                    .spawn(move || {
                        if priority == Priority::Background {
                            lower_priority(BACKGROUND_NICE);
                        }
                        worker(shared.queue(priority))
                    })
                    .expect("spawn pool thread");
            }
        }
        WorkPool {
            shared,
            capacity: capacity.max(1),
            threads: threads.max(1),
        }
    }

    /// How many jobs of one priority run at once.
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
        let (queue, ready) = self.shared.queue(priority);
        let refused = {
            let mut q = queue.lock().expect("pool queue lock");
            if q.jobs.len() >= self.capacity {
                Some(Error::ResourceExhausted(format!(
                    "search queue is full ({} waiting); retry later",
                    self.capacity
                )))
            } else {
                q.jobs.push_back(job);
                None
            }
        };
        if refused.is_none() {
            ready.notify_one();
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
        for (queue, ready) in [&self.shared.foreground, &self.shared.background] {
            queue.lock().expect("pool queue lock").stopped = true;
            ready.notify_all();
        }
    }
}

fn worker((queue, ready): &(Mutex<Queue>, Condvar)) {
    loop {
        let job = {
            let mut q = queue.lock().expect("pool queue lock");
            loop {
                if let Some(job) = q.jobs.pop_front() {
                    break job;
                }
                if q.stopped {
                    return;
                }
                q = ready.wait(q).expect("pool queue lock");
            }
        };
        job();
    }
}

/// Raises the calling thread's nice value by `by` (a lower CPU priority; always allowed,
/// unlike the way back). Linux keeps a nice value per thread; elsewhere this does
/// nothing.
fn lower_priority(by: i32) {
    #[cfg(target_os = "linux")]
    {
        let tid = current_tid();
        // SAFETY: getpriority/setpriority read and set one thread's nice value.
        unsafe {
            let now = getpriority(PRIO_PROCESS, tid);
            if setpriority(PRIO_PROCESS, tid, (now + by).min(19)) != 0 {
                tracing::warn!("could not lower the background threads' priority");
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = by;
}

#[cfg(target_os = "linux")]
const PRIO_PROCESS: i32 = 0;

#[cfg(target_os = "linux")]
unsafe extern "C" {
    fn getpriority(which: i32, who: u32) -> i32;
    fn setpriority(which: i32, who: u32, prio: i32) -> i32;
    fn gettid() -> i32;
}

/// The calling thread's kernel id.
#[cfg(target_os = "linux")]
fn current_tid() -> u32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { gettid() as u32 }
}

/// The calling thread's nice value (tests and the pool's own check).
#[cfg(target_os = "linux")]
pub fn current_nice() -> i32 {
    // SAFETY: see lower_priority.
    unsafe { getpriority(PRIO_PROCESS, current_tid()) }
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
    async fn background_work_runs_on_threads_of_its_own_at_a_lower_priority() {
        let pool = WorkPool::new("t", 2, 64);
        // Every background thread held: foreground jobs still run at once.
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        let mut held = Vec::new();
        let mut blockers = Vec::new();
        for _ in 0..2 {
            let (held_tx, held_rx) = tokio::sync::oneshot::channel::<()>();
            let release_rx = release_rx.clone();
            blockers.push(tokio::spawn(pool.run_at(Priority::Background, move || {
                let _ = held_tx.send(());
                release_rx.lock().unwrap().recv().ok();
                Ok(())
            })));
            held.push(held_rx);
        }
        for h in held {
            h.await.unwrap();
        }
        let queued = tokio::spawn(pool.run_at(Priority::Background, || Ok(current_nice())));
        for _ in 0..10 {
            pool.run(|| Ok(())).await.unwrap();
        }
        assert!(!queued.is_finished());
        let foreground_nice = pool.run(|| Ok(current_nice())).await.unwrap();
        for _ in 0..2 {
            release_tx.send(()).unwrap();
        }
        for b in blockers {
            b.await.unwrap().unwrap();
        }
        let background_nice = queued.await.unwrap().unwrap();
        // The foreground runs at the process's own priority, the background lower.
        assert_eq!(foreground_nice, current_nice());
        assert_eq!(
            background_nice,
            (foreground_nice + BACKGROUND_NICE).min(19),
            "{background_nice} vs {foreground_nice}"
        );
    }
}
