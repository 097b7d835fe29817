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

pub struct GroupCommit {
    db: sled::Db,
    state: Mutex<State>,
    done: Condvar,
    flushes: AtomicU64,
}

impl GroupCommit {
    pub fn new(db: sled::Db) -> Self {
        GroupCommit {
            db,
            state: Mutex::new(State::default()),
            done: Condvar::new(),
            flushes: AtomicU64::new(0),
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
            let result = self.db.flush();
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
