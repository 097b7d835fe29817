//! Storage failures and the way back: the store marked failed refuses writes; a probe
//! watches the data dir, and once it takes writes again the store is reopened and every
//! index and catalogue brought in line with what the store holds.

use std::sync::Arc;
use std::time::Duration;

use super::{Collection, Registry};
use crate::error::Result;

/// How often the storage probe checks whether writes can resume after a storage
/// failure.
pub const STORAGE_PROBE: Duration = Duration::from_millis(500);

impl Registry {
    /// Whether the store accepts writes (false while storage is failing).
    pub fn storage_writable(&self) -> bool {
        self.store.writable()
    }

    /// How many times storage has failed since the daemon started.
    pub fn storage_failures(&self) -> u64 {
        self.store.failures()
    }

    /// Test-only: see [`Store::inject_fault`].
    #[doc(hidden)]
    pub fn inject_storage_fault(&self, on: bool) {
        self.store.inject_fault(on);
    }

    /// Watches storage from a thread of its own: while writes are failing, every
    /// [`STORAGE_PROBE`] it tries [`Registry::restore_storage`]. The thread ends with
    /// the registry.
    pub fn watch_storage(self: &Arc<Self>) {
        let registry = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("storage-probe".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(STORAGE_PROBE);
                    let Some(registry) = registry.upgrade() else {
                        return;
                    };
                    if registry.storage_writable() || !registry.is_ready() {
                        continue;
                    }
                    if let Err(e) = registry.restore_storage() {
                        tracing::debug!(error = %e, "storage still failing");
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "no storage probe thread: writes will not resume after a storage failure without a restart");
        }
    }

    /// After a storage failure: once the data dir takes a write again, reopens the
    /// store (every writer kept out meanwhile), brings each collection's index and
    /// catalogue in line with what it holds, and resumes writes. Returns whether writes
    /// are accepted now.
    pub fn restore_storage(&self) -> Result<bool> {
        if self.store.writable() {
            return Ok(true);
        }
        if self.store.fault_injected() {
            return Ok(false);
        }
        self.store.probe_space()?;
        let _ddl = self.ddl.lock().expect("ddl lock");
        let colls = self.all();
        // Name order, as the map is: the only place that holds more than one writer.
        let mut writers: Vec<_> = colls
            .iter()
            .map(|c| c.writer.lock().expect("writer lock"))
            .collect();
        for (c, w) in colls.iter().zip(&writers) {
            c.turns.wait_all(w.next_ticket);
        }
        self.store.reopen()?;
        for (c, w) in colls.iter().zip(&mut writers) {
            if !w.dropped {
                c.resync(w)?;
            }
        }
        drop(writers);
        self.reconcile_specs(&colls)?;
        self.store.resume_writes();
        Ok(true)
    }

    /// A create or delete whose commit failed may have reached the disk after all: the
    /// registry follows the reopened store's specs.
    pub(super) fn reconcile_specs(&self, colls: &[Arc<Collection>]) -> Result<()> {
        let specs = self.store.specs()?;
        for c in colls {
            if !specs.iter().any(|s| s.name == c.name()) {
                tracing::warn!(collection = %c.name(), "collection gone from the reopened store");
                c.writer.lock().expect("writer lock").dropped = true;
                self.collections
                    .write()
                    .expect("registry lock")
                    .remove(c.name());
            }
        }
        for spec in specs {
            if colls.iter().any(|c| c.name() == spec.name) {
                continue;
            }
            tracing::warn!(collection = %spec.name, "collection found in the reopened store");
            let (coll, _) = self.open_collection(&spec)?;
            self.collections
                .write()
                .expect("registry lock")
                .insert(spec.name, Arc::new(coll));
        }
        Ok(())
    }
}
