//! A fixed pool of threads for CPU-bound reads (searches), with a bounded queue.
//!
//! Searches are pure CPU work. On tokio's blocking pool every concurrent request gets its
//! own thread, and sixteen threads fighting over two cores spend their time switching;
//! here as many threads as cores drain one queue. A full queue is admission control: the
//! caller gets RESOURCE_EXHAUSTED at once instead of waiting behind unbounded work. A job
//! whose caller has gone away is skipped.

use std::future::Future;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

type Job = Box<dyn FnOnce() + Send>;

pub struct WorkPool {
    tx: SyncSender<Job>,
    capacity: usize,
    threads: usize,
}

impl WorkPool {
    pub fn new(name: &str, threads: usize, capacity: usize) -> Self {
        let (tx, rx) = sync_channel::<Job>(capacity);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || worker(&rx))
                .expect("spawn pool thread");
        }
        WorkPool {
            tx,
            capacity,
            threads: threads.max(1),
        }
    }

    /// How many jobs run at once.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Queues `f` now (or refuses at once when the queue is full); the returned future
    /// yields its result.
    pub fn run<T: Send + 'static>(
        &self,
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
        let refused = match self.tx.try_send(job) {
            Ok(()) => None,
            Err(TrySendError::Full(_)) => Some(Error::ResourceExhausted(format!(
                "search queue is full ({} waiting); retry later",
                self.capacity
            ))),
            Err(TrySendError::Disconnected(_)) => {
                Some(Error::Unavailable("search pool stopped".into()))
            }
        };
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

fn worker(rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = {
            let rx = rx.lock().expect("pool queue lock");
            rx.recv()
        };
        match job {
            Ok(job) => job(),
            Err(_) => return, // pool dropped
        }
    }
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
        let blocker = tokio::spawn(pool.run(move || {
            release_rx.recv().ok();
            Ok(())
        }));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let queued = tokio::spawn(pool.run(|| Ok(())));
        let err = pool.run(|| Ok(())).await.unwrap_err();
        assert!(matches!(err, Error::ResourceExhausted(_)), "{err}");
        release_tx.send(()).unwrap();
        blocker.await.unwrap().unwrap();
        queued.await.unwrap().unwrap();
    }
}
