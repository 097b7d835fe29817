//! Group commit: writers that finish at about the same time share one sled flush.
//!
//! A writer applies its batch, takes a ticket, and waits until a flush that started
//! after its ticket has finished. Whoever finds no flush running starts one that covers
//! every ticket issued so far; the rest wait on the condvar. A std Mutex and Condvar
//! suffice because callers are on blocking threads, never on the async workers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

use crate::error::Result;

#[derive(Default)]
struct State {
    issued: u64,
    flushed: u64,
    flushing: bool,
}

type FlushFn = Box<dyn Fn() -> Result<()> + Send + Sync>;

pub struct GroupCommit {
    flush: FlushFn,
    state: Mutex<State>,
    done: Condvar,
    flushes: AtomicU64,
    /// How long each flush took (metrics).
    pub latency: crate::metrics::Histogram,
}

impl GroupCommit {
    /// Group commit over `flush`, which makes every write made before it durable.
    pub fn with_flush(flush: FlushFn) -> Self {
        GroupCommit {
            flush,
            state: Mutex::new(State::default()),
            done: Condvar::new(),
            flushes: AtomicU64::new(0),
            latency: crate::metrics::Histogram::seconds(),
        }
    }

    /// Returns once everything written before this call is on disk. Blocking.
    pub fn commit(&self) -> Result<()> {
        let mut st = self.state.lock().expect("commit lock");
        st.issued += 1;
        let ticket = st.issued;
        loop {
            if st.flushed >= ticket {
                return Ok(());
            }
            if st.flushing {
                st = self.done.wait(st).expect("commit lock");
                continue;
            }
            st.flushing = true;
            let target = st.issued;
            drop(st);
            let started = std::time::Instant::now();
            let result = (self.flush)();
            self.latency.observe_duration(started.elapsed());
            self.flushes.fetch_add(1, Ordering::Relaxed);
            st = self.state.lock().expect("commit lock");
            st.flushing = false;
            if result.is_ok() {
                st.flushed = st.flushed.max(target);
            }
            self.done.notify_all();
            result?;
        }
    }

    /// How many flushes ran; with concurrent writers this is less than the commits.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn waiting_writers_share_one_flush() {
        // The first flush holds until every writer has taken its ticket (an event, not
        // a guessed pause): they all wait behind it, and one more flush covers them.
        let n = 16;
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let gc = Arc::new(GroupCommit::with_flush(Box::new(move || {
            let _ = release_rx.lock().unwrap().recv();
            Ok(())
        })));
        let threads: Vec<_> = (0..n)
            .map(|_| {
                let gc = gc.clone();
                std::thread::spawn(move || gc.commit().unwrap())
            })
            .collect();
        while gc.state.lock().unwrap().issued < n {
            std::thread::yield_now();
        }
        // Every later flush finds nothing to hold it.
        drop(release_tx);
        for t in threads {
            t.join().unwrap();
        }
        assert!(
            gc.flushes() <= 2,
            "{} flushes for {n} commits",
            gc.flushes()
        );
    }

    #[test]
    fn a_commit_after_a_flush_started_waits_for_another() {
        let gc = GroupCommit::with_flush(Box::new(|| Ok(())));
        gc.commit().unwrap();
        gc.commit().unwrap();
        assert_eq!(
            gc.flushes(),
            2,
            "sequential commits each need their own flush"
        );
    }

    #[test]
    fn a_failed_flush_is_reported() {
        let gc = GroupCommit::with_flush(Box::new(|| {
            Err(crate::error::Error::Io(std::io::Error::other("disk gone")))
        }));
        assert!(gc.commit().is_err());
    }
}
