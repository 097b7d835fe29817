//! The ordered write path of a collection, and stream transactions.
//!
//! Only the store write is serialised (the writer lock): a batch takes its ANN keys and
//! its place in the store's history there, as one atomic sled batch. A plain write is
//! then committed (group commit) before it reaches the index, so a batch whose commit
//! fails never shows in search (see [`Written`]). HNSW insertion, the costly part, runs
//! concurrently with other batches. Batches publish to the
//! catalogue in the order they reached the store (a ticket, see [`Turn`]), so the
//! catalogue, and with it search, always reflects a prefix of the store's history.
//!
//! An UpsertStream is a [`StreamTxn`]: each message is applied as it arrives (visible,
//! not yet durable), with the previous state of every id it touches remembered. Commit
//! makes it durable; anything else undoes it: an explicit rollback, the transaction
//! being dropped (a client that cancels, a task that panics), or the daemon shutting
//! down while it is open. The undo lives here, in the core, not in a handler that a
//! cancelled future never finishes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use super::collection::{Collection, WritePhase};
use crate::error::{Error, Result};
use crate::store::{Mutation, Store, TreeState};
use crate::types::ItemData;

/// Held by whoever mutates a collection: writers to one collection go one at a time
/// through the store, flushes are shared (group commit).
pub(super) struct Writer {
    pub(super) state: TreeState,
    /// Set when the collection is deleted: later writers get NotFound.
    pub(super) dropped: bool,
    /// The next publication ticket.
    pub(super) next_ticket: u64,
}

impl Writer {
    pub(super) fn new(state: TreeState) -> Self {
        Writer {
            state,
            dropped: false,
            next_ticket: 0,
        }
    }

    fn take_ticket(&mut self) -> u64 {
        let t = self.next_ticket;
        self.next_ticket += 1;
        t
    }
}

/// Publication order: batch n publishes to the catalogue after batch n - 1.
///
/// A batch whose index insertion is done hands its catalogue change in ([`Turn::hand_in`])
/// and waits. Whichever thread finds the next batch in order ready publishes it and
/// every ready batch after it at once, under one catalogue lock, then wakes the waiters.
/// (Each batch publishing its own change, in turn, made publication a chain of thread
/// hand-offs: under a full load each link waited for a core, and writes queued for
/// 0.8 s behind it; docs/benchmarks.md, "Load".)
#[derive(Default)]
pub(super) struct Turns {
    state: Mutex<TurnState>,
    cv: std::sync::Condvar,
}

#[derive(Default)]
struct TurnState {
    /// The next ticket to publish: every ticket below it has published.
    next: u64,
    /// Handed-in changes waiting for the tickets before them.
    ready: BTreeMap<u64, Ready>,
    /// Set while a thread publishes a run of ready changes.
    publishing: bool,
    /// Errors met while publishing another thread's change, for it to take.
    failed: HashMap<u64, Error>,
}

/// A batch's catalogue change, owned, as handed in for publication.
enum Ready {
    /// A batch that failed before publishing: it passes its turn on.
    Skip,
    Upsert {
        seq: u64,
        entries: Vec<ReadyItem>,
        /// Keys of the items these replaced, to leave the index once published.
        replaced: Vec<u64>,
    },
    Delete {
        seq: u64,
        ids: Vec<String>,
        keys: Vec<u64>,
    },
}

struct ReadyItem {
    key: u64,
    id: String,
    label: String,
    generation: u64,
    metadata: BTreeMap<String, String>,
}

impl Turns {
    /// Blocks until every ticket below `until` has published.
    pub(super) fn wait_all(&self, until: u64) {
        let mut st = self.state.lock().expect("turn lock");
        while st.next < until {
            st = self.cv.wait(st).expect("turn lock");
        }
    }
}

/// One batch's place in the publication order. Dropped without handing a change in (a
/// failed batch), it hands in a skip, so it never blocks the batches after it.
struct Turn<'a> {
    turns: &'a Turns,
    ticket: u64,
    handed: bool,
}

impl Turn<'_> {
    /// Hands this batch's change in and returns once it is published (by this thread
    /// or another), with the error its publication met, if any.
    fn hand_in(mut self, coll: &Collection, change: Ready) -> Result<()> {
        self.handed = true;
        let turns = self.turns;
        let mut st = turns.state.lock().expect("turn lock");
        st.ready.insert(self.ticket, change);
        loop {
            if st.next > self.ticket {
                return st.failed.remove(&self.ticket).map_or(Ok(()), Err);
            }
            if !st.publishing && st.ready.contains_key(&st.next) {
                // Take the run of consecutive ready changes and publish it unlocked.
                let first = st.next;
                let mut run = Vec::new();
                while let Some(r) = st.ready.remove(&(first + run.len() as u64)) {
                    run.push(r);
                }
                st.publishing = true;
                drop(st);
                let done = Published {
                    turns,
                    upto: first + run.len() as u64,
                    failed: Vec::new(),
                };
                st = done.publish(coll, first, run);
                continue;
            }
            st = turns.cv.wait(st).expect("turn lock");
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if self.handed {
            return;
        }
        let mut st = self.turns.state.lock().expect("turn lock");
        st.ready.insert(self.ticket, Ready::Skip);
        // If the skip is next in line and nobody publishes, move the order past it and
        // any ready run behind it is published by the next thread to hand in or by a
        // waiter woken here.
        if !st.publishing && st.next == self.ticket {
            st.ready.remove(&self.ticket);
            st.next += 1;
        }
        self.turns.cv.notify_all();
    }
}

/// A run being published: ends the run (the order moved past it, waiters woken) when
/// dropped, so that a panic while publishing cannot stop every later write.
struct Published<'a> {
    turns: &'a Turns,
    upto: u64,
    failed: Vec<(u64, Error)>,
}

impl<'a> Published<'a> {
    /// Applies a run of changes (tickets `first..`) to the catalogue under one lock,
    /// then removes replaced and deleted keys from the index; returns the turn state
    /// with the run ended.
    fn publish(
        mut self,
        coll: &Collection,
        first: u64,
        run: Vec<Ready>,
    ) -> MutexGuard<'a, TurnState> {
        {
            let t = Instant::now();
            let mut c = coll.catalogue.write().expect("catalogue lock");
            coll.writes.observe(WritePhase::Catalogue, t);
            for change in &run {
                match change {
                    Ready::Skip => {}
                    Ready::Upsert { seq, entries, .. } => {
                        for e in entries {
                            c.insert(e.key, &e.id, &e.label, e.generation, e.metadata.clone());
                        }
                        c.set_seq(*seq);
                    }
                    Ready::Delete { seq, ids, .. } => {
                        for id in ids {
                            c.remove(id);
                        }
                        c.set_seq(*seq);
                    }
                }
            }
        }
        for (i, change) in run.into_iter().enumerate() {
            let keys = match change {
                Ready::Skip => continue,
                Ready::Upsert { replaced, .. } => replaced,
                Ready::Delete { keys, .. } => keys,
            };
            if let Err(e) = coll.index.remove_many(&keys) {
                self.failed.push((first + i as u64, e));
            }
        }
        let turns = self.turns;
        drop(self);
        turns.state.lock().expect("turn lock")
    }
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        let mut st = self
            .turns
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        st.next = self.upto;
        st.publishing = false;
        st.failed.extend(self.failed.drain(..));
        // A skip handed in while this run was published may now be next.
        while let Some(Ready::Skip) = st.ready.get(&st.next) {
            let next = st.next;
            st.ready.remove(&next);
            st.next += 1;
        }
        self.turns.cv.notify_all();
    }
}

/// The previous state of every id a stream touched, per collection.
#[derive(Default)]
pub(super) struct Undo {
    before: HashMap<(String, String), Option<ItemData>>,
    collections: HashMap<String, Arc<Collection>>,
}

impl Undo {
    fn is_empty(&self) -> bool {
        self.before.is_empty()
    }
}

/// A batch written to the store (not yet durable) that has not reached the index and the
/// catalogue. A plain write commits it first and then publishes it, so that a batch
/// whose commit fails (a full disk) is never seen by search; dropped unpublished, it
/// passes its turn on.
pub(super) struct Written<'a> {
    coll: &'a Collection,
    turn: Turn<'a>,
    seq: u64,
    change: Change<'a>,
}

enum Change<'a> {
    Upsert {
        items: &'a [ItemData],
        keys: Vec<u64>,
        replaced: Vec<u64>,
    },
    Delete {
        found: Vec<(&'a str, u64)>,
    },
}

impl Written<'_> {
    /// Index, then catalogue, in the store's order. Returns how many items it touched.
    pub(super) fn publish(self) -> Result<usize> {
        let coll = self.coll;
        let (n, change) = match self.change {
            Change::Upsert {
                items,
                keys,
                replaced,
            } => {
                let entries: Vec<(u64, &[f32])> = keys
                    .iter()
                    .zip(items)
                    .map(|(k, it)| (*k, it.vector.as_slice()))
                    .collect();
                let t = Instant::now();
                // On an error the turn is dropped here: it hands in a skip.
                coll.index.add_many(&entries, coll.threads)?;
                coll.writes.observe(WritePhase::Index, t);
                let entries = keys
                    .iter()
                    .zip(items)
                    .map(|(key, item)| ReadyItem {
                        key: *key,
                        id: item.id.clone(),
                        label: item.label.clone(),
                        generation: item.generation,
                        metadata: item.metadata.clone(),
                    })
                    .collect();
                let seq = self.seq;
                (
                    items.len(),
                    Ready::Upsert {
                        seq,
                        entries,
                        replaced,
                    },
                )
            }
            Change::Delete { found } => (
                found.len(),
                Ready::Delete {
                    seq: self.seq,
                    ids: found.iter().map(|(id, _)| id.to_string()).collect(),
                    keys: found.iter().map(|(_, k)| *k).collect(),
                },
            ),
        };
        let t = Instant::now();
        self.turn.hand_in(coll, change)?;
        coll.writes.observe(WritePhase::Turn, t);
        Ok(n)
    }
}

impl Collection {
    /// Store, then index, then catalogue, without waiting for durability (stream
    /// messages, undo). Validated input only. With `undo`, the previous state of each
    /// id (input included) is remembered there first.
    pub(super) fn apply_upsert(
        self: &Arc<Self>,
        items: &[ItemData],
        undo: Option<&mut Undo>,
    ) -> Result<usize> {
        match self.write_upsert(items, undo, false)? {
            Some(w) => w.publish(),
            None => Ok(0),
        }
    }

    /// Writes a batch to the store (not yet durable) and takes its place in the
    /// publication order; see [`Written`]. None for no items. With `keep_inputs`, an
    /// item without an input keeps the one stored for its id (a vector-only update).
    pub(super) fn write_upsert<'a>(
        self: &'a Arc<Self>,
        items: &'a [ItemData],
        mut undo: Option<&mut Undo>,
        keep_inputs: bool,
    ) -> Result<Option<Written<'a>>> {
        if items.is_empty() {
            return Ok(None);
        }
        let mut keys = Vec::with_capacity(items.len());
        let mut replaced = Vec::new();
        let t = Instant::now();
        let mut w = self.lock_writer()?;
        self.writes.observe(WritePhase::Writer, t);
        let t = Instant::now();
        self.items.check_writable()?;
        let mut state = w.state;
        let mut m = Mutation::default();
        for item in items {
            // The store, not the catalogue, knows the latest key: an earlier batch
            // may be written but not yet published.
            let old = self.items.get(&item.id, undo.is_some())?;
            if let Some(undo) = undo.as_deref_mut()
                && let std::collections::hash_map::Entry::Vacant(slot) =
                    undo.before.entry((self.spec.name.clone(), item.id.clone()))
            {
                // The first state this stream saw is the one to restore.
                let before = match &old {
                    Some((_, it)) => {
                        let mut it = it.clone();
                        it.input = self.items.input(&item.id)?;
                        Some(it)
                    }
                    None => None,
                };
                slot.insert(before);
                undo.collections
                    .entry(self.spec.name.clone())
                    .or_insert_with(|| self.clone());
            }
            if let Some((old_key, _)) = old {
                m.drop_key(old_key);
                replaced.push(old_key);
            }
            let key = state.next_key;
            state.next_key += 1;
            if keep_inputs && item.input.is_none() {
                m.put_keeping_input(key, item);
            } else {
                m.put(key, item);
            }
            keys.push(key);
        }
        let change = Change::Upsert {
            items,
            keys,
            replaced,
        };
        let written = self.write(&mut w, m, state, change);
        self.writes.observe(WritePhase::Store, t);
        written.map(Some)
    }

    /// Applies `m` with the next state (the mutation counter bumped) and takes the
    /// batch's ticket in the publication order; the writer is held by the caller.
    fn write<'a>(
        &'a self,
        w: &mut Writer,
        m: Mutation,
        mut state: TreeState,
        change: Change<'a>,
    ) -> Result<Written<'a>> {
        state.seq += 1;
        self.items.apply(m, state)?;
        w.state = state;
        Ok(Written {
            coll: self,
            turn: Turn {
                turns: &self.turns,
                ticket: w.take_ticket(),
                handed: false,
            },
            seq: state.seq,
            change,
        })
    }

    /// Removes items by id and publishes at once; returns how many existed. Not durable
    /// until the store commits.
    pub(super) fn apply_delete(&self, ids: &[String]) -> Result<usize> {
        match self.write_delete(ids)? {
            Some(w) => w.publish(),
            None => Ok(0),
        }
    }

    /// Writes a delete to the store (not yet durable); None when no id exists.
    pub(super) fn write_delete<'a>(&'a self, ids: &'a [String]) -> Result<Option<Written<'a>>> {
        let mut found: Vec<(&str, u64)> = Vec::new();
        let mut w = self.lock_writer()?;
        self.items.check_writable()?;
        let mut seen = HashSet::new();
        for id in ids {
            if seen.insert(id.as_str())
                && let Some((key, _)) = self.items.get(id, false)?
            {
                found.push((id.as_str(), key));
            }
        }
        if found.is_empty() {
            return Ok(None);
        }
        let mut m = Mutation::default();
        for (id, key) in &found {
            m.remove(id, *key);
        }
        let state = w.state;
        self.write(&mut w, m, state, Change::Delete { found })
            .map(Some)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxnStatus {
    Open,
    Committed,
    RolledBack,
}

struct TxnState {
    status: TxnStatus,
    undo: Undo,
}

/// Every open stream transaction, so that shutdown can undo them before it flushes.
#[derive(Default)]
pub(super) struct TxnTable {
    open: Mutex<HashMap<u64, Arc<Mutex<TxnState>>>>,
    next: AtomicU64,
    closing: AtomicBool,
}

fn lock(state: &Mutex<TxnState>) -> MutexGuard<'_, TxnState> {
    // A stage that panicked leaves the mutex poisoned; its undo is still what to undo.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl TxnTable {
    /// The open transactions' states, taken out of the table's lock.
    fn open_states(&self) -> Vec<Arc<Mutex<TxnState>>> {
        self.open
            .lock()
            .expect("txn table lock")
            .values()
            .cloned()
            .collect()
    }

    /// Whether an open stream has staged items in collection `name`. A stream whose
    /// state is busy (mid-stage, possibly waiting for that collection's writer) counts
    /// as touching it.
    pub(super) fn touches(&self, name: &str) -> bool {
        let open = self.open_states();
        open.iter().any(|state| match state.try_lock() {
            Ok(st) => st.status == TxnStatus::Open && st.undo.collections.contains_key(name),
            Err(_) => true,
        })
    }

    /// Refuses new stages and rolls back every open transaction (shutdown). Waits for a
    /// stage or a rollback in progress to finish first.
    pub(super) fn close_all(&self, store: &Store, max_batch: usize) -> Result<usize> {
        self.closing.store(true, Ordering::SeqCst);
        let open = self.open_states();
        let mut undone = 0;
        for state in open {
            let mut st = lock(&state);
            if st.status == TxnStatus::Open {
                undo(&mut st, store, max_batch)?;
                undone += 1;
            }
        }
        Ok(undone)
    }
}

/// An UpsertStream in progress. See the module docs.
pub struct StreamTxn {
    id: u64,
    state: Arc<Mutex<TxnState>>,
    table: Arc<TxnTable>,
    store: Arc<Store>,
    max_batch: usize,
}

impl StreamTxn {
    pub(super) fn begin(table: Arc<TxnTable>, store: Arc<Store>, max_batch: usize) -> Self {
        let id = table.next.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(Mutex::new(TxnState {
            status: TxnStatus::Open,
            undo: Undo::default(),
        }));
        table
            .open
            .lock()
            .expect("txn table lock")
            .insert(id, state.clone());
        StreamTxn {
            id,
            state,
            table,
            store,
            max_batch,
        }
    }

    /// Applies one message's validated items: visible now, durable at commit.
    pub(super) fn stage(&self, coll: &Arc<Collection>, items: &[ItemData]) -> Result<usize> {
        let mut st = lock(&self.state);
        if st.status != TxnStatus::Open || self.table.closing.load(Ordering::SeqCst) {
            return Err(Error::Unavailable(
                "the daemon is shutting down; the stream was rolled back".into(),
            ));
        }
        coll.apply_upsert(items, Some(&mut st.undo))
    }

    /// Makes every staged message durable.
    pub fn commit(self) -> Result<()> {
        let mut st = lock(&self.state);
        if st.status != TxnStatus::Open {
            return Err(Error::Unavailable(
                "the daemon is shutting down; the stream was rolled back".into(),
            ));
        }
        self.store.commit()?;
        st.status = TxnStatus::Committed;
        Ok(())
    }

    /// Undoes every staged message, durably.
    pub fn rollback(self) -> Result<()> {
        let mut st = lock(&self.state);
        if st.status != TxnStatus::Open {
            return Ok(());
        }
        undo(&mut st, &self.store, self.max_batch)
    }
}

impl Drop for StreamTxn {
    fn drop(&mut self) {
        let open = lock(&self.state).status == TxnStatus::Open;
        if open {
            // Dropped while open: the client went away, or the task panicked. Undo on a
            // thread of its own (this may be an async worker, or an unwinding one); the
            // table keeps the transaction visible to shutdown until it is undone.
            let (state, table, store, max_batch, id) = (
                self.state.clone(),
                self.table.clone(),
                self.store.clone(),
                self.max_batch,
                self.id,
            );
            let spawned = std::thread::Builder::new()
                .name("stream-rollback".into())
                .spawn(move || {
                    let mut st = lock(&state);
                    if st.status == TxnStatus::Open {
                        tracing::info!(txn = id, "stream dropped before commit; rolling back");
                        if let Err(e) = undo(&mut st, &store, max_batch) {
                            tracing::error!(txn = id, error = %e, "stream rollback failed");
                        }
                    }
                    drop(st);
                    table.open.lock().expect("txn table lock").remove(&id);
                });
            if spawned.is_ok() {
                return;
            }
            // No thread to be had: undo right here.
            let mut st = lock(&self.state);
            if st.status == TxnStatus::Open
                && let Err(e) = undo(&mut st, &self.store, self.max_batch)
            {
                tracing::error!(txn = self.id, error = %e, "stream rollback failed");
            }
        }
        self.table
            .open
            .lock()
            .expect("txn table lock")
            .remove(&self.id);
    }
}

/// Restores every id a transaction touched to its state before the transaction, and
/// commits that. The transaction is rolled back even when this fails part-way (the
/// error is returned): retrying could only make things worse.
fn undo(st: &mut TxnState, store: &Store, max_batch: usize) -> Result<()> {
    st.status = TxnStatus::RolledBack;
    let undo = std::mem::take(&mut st.undo);
    if undo.is_empty() {
        return Ok(());
    }
    let mut by_coll: HashMap<String, (Vec<ItemData>, Vec<String>)> = HashMap::new();
    for ((coll, id), before) in undo.before {
        let entry = by_coll.entry(coll).or_default();
        match before {
            Some(item) => entry.0.push(item),
            None => entry.1.push(id),
        }
    }
    for (name, (restore, remove)) in by_coll {
        let coll = &undo.collections[&name];
        let result = (|| {
            for chunk in restore.chunks(max_batch.max(1)) {
                coll.apply_upsert(chunk, None)?;
            }
            coll.apply_delete(&remove)
        })();
        match result {
            Ok(_) => {}
            Err(Error::NotFound { .. }) => {} // deleted meanwhile: nothing left to undo
            Err(e) => return Err(e),
        }
    }
    store.commit()
}
