//! Generations: a collection re-embedded with another model (Models.Activate) is built
//! as a *shadow*, a collection of the same name in a store tree of its own, kept out of
//! the registry's map, so that every read keeps using the current generation.
//!
//! The shadow is filled through the ordinary write path, so it is as durable as any
//! collection, and recovery reopens it. The re-embedding walks the source's ANN keys in
//! order from a cursor: every write to the source gets a fresh, higher key, so a write
//! made while the walk runs is met again further on, and lands in the new generation
//! too. At the switch, with the source's writer held (writes to it wait), the walk
//! finishes the last keys, deletions are carried over, and one transaction makes the
//! shadow's spec the collection's; then the registry's map points at the shadow. A
//! request holds the `Arc<Collection>` it resolved, so it is answered wholly by the old
//! generation or wholly by the new one, never a mix. Writes that find the old generation
//! superseded are retried by the caller against the new one.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::collection::Collection;
use super::{Registry, validate};
use crate::error::{Error, Result};
use crate::index::snapshot;
use crate::store::ShadowRecord;
use crate::types::{CollectionSpec, ItemData, ModelDefaults};

/// Re-embeds items of the source (their stored inputs) with the new model: given the
/// items with their inputs, returns them with new vectors. Called with the source's
/// writer held during the switch.
pub type Reembed<'a> = dyn FnMut(Vec<ItemData>) -> Result<Vec<ItemData>> + 'a;

/// Items read per step of the walk.
pub const STEP: usize = 256;

impl Registry {
    /// Starts a new generation of `source` with `model`@`version`: persists its shadow
    /// record and returns the shadow (empty) with its record.
    pub fn begin_generation(
        &self,
        source: &Arc<Collection>,
        model: &str,
        version: &str,
        space: ModelDefaults,
    ) -> Result<(Arc<Collection>, ShadowRecord)> {
        self.check_ready()?;
        let _ddl = self.ddl.lock().expect("ddl lock");
        let name = source.name().to_string();
        if !source.active() {
            return Err(Error::not_found(format!("collection {name:?}")));
        }
        if self
            .shadows
            .read()
            .expect("registry lock")
            .contains_key(&name)
        {
            return Err(Error::FailedPrecondition(format!(
                "collection {name:?} is already being re-embedded; wait for it to finish"
            )));
        }
        let uid = super::new_uid();
        let spec = CollectionSpec {
            model: model.to_string(),
            model_version: version.to_string(),
            dbl_margin: space.dbl_margin,
            dbl_scale: space.dbl_scale,
            threshold: space.threshold,
            pair_threshold: source.spec().pair_threshold,
            uid,
            tree: format!("c/{name}~{uid:016x}"),
            ..source.spec().clone()
        };
        let record = ShadowRecord {
            spec: spec.clone(),
            cursor: 0,
            done: 0,
            total: source.len() as u64,
        };
        self.store.put_shadow(&record)?;
        self.store.commit()?;
        let shadow = Arc::new(Collection::create(
            spec,
            self.store.items(&record.spec)?,
            self.settings.limits.clone(),
            self.settings.index_threads,
        )?);
        self.shadows
            .write()
            .expect("registry lock")
            .insert(name, shadow.clone());
        Ok((shadow, record))
    }

    /// The generation being built for `name`, if any.
    pub fn shadow(&self, name: &str) -> Option<Arc<Collection>> {
        self.shadows
            .read()
            .expect("registry lock")
            .get(name)
            .cloned()
    }

    /// Every generation being built, with its progress (recovery resumes them).
    pub fn shadow_records(&self) -> Result<Vec<ShadowRecord>> {
        self.store.shadows()
    }

    /// Up to [`STEP`] items of `source` under keys from `cursor` on, each with its
    /// stored input, and the cursor after them. An item without a stored input fails:
    /// it cannot be re-embedded.
    pub fn source_step(&self, source: &Collection, cursor: u64) -> Result<(Vec<ItemData>, u64)> {
        let keys = source.items.keys_from(cursor, STEP)?;
        let next = keys.last().map_or(cursor, |(k, _)| k + 1);
        let mut out = Vec::with_capacity(keys.len());
        for (key, id) in keys {
            let Some((current, mut item)) = source.items.get(&id, false)? else {
                continue;
            };
            if current != key {
                continue; // rewritten since: met again under its newer key
            }
            item.input = source.items.input(&id)?;
            if item.input.is_none() {
                return Err(Error::FailedPrecondition(format!(
                    "item {id:?} of collection {:?} has no stored input to re-embed",
                    source.name()
                )));
            }
            out.push(item);
        }
        Ok((out, next))
    }

    /// Writes re-embedded items into the shadow, durably, and records the progress.
    pub fn shadow_write(
        &self,
        shadow: &Arc<Collection>,
        items: &[ItemData],
        record: &ShadowRecord,
    ) -> Result<()> {
        let written = if items.is_empty() {
            None
        } else {
            validate::items(items, &shadow.spec, &self.settings.limits)?;
            shadow.write_upsert(items, None, false)?
        };
        self.store.put_shadow(record)?;
        // Durable first, then published (as every write is).
        self.store.commit()?;
        if let Some(w) = written {
            w.publish()?;
        }
        Ok(())
    }

    /// Gives a generation up: its record and tree go; the source is untouched.
    pub fn abandon_generation(&self, name: &str) -> Result<()> {
        let _ddl = self.ddl.lock().expect("ddl lock");
        let shadow = self.shadows.write().expect("registry lock").remove(name);
        if let Some(shadow) = &shadow {
            shadow.lock_writer()?.dropped = true;
        }
        if let Some(record) = self.store.take_shadow(name)? {
            self.store.commit()?;
            self.store.drop_tree(&record.spec.tree_name())?;
        }
        Ok(())
    }

    /// Finishes a generation and switches to it. With the source's writer held: waits
    /// out open UpsertStreams that touched the source, re-embeds the keys from
    /// `record.cursor` on with `reembed`, carries deletions over, checks that both hold
    /// the same ids, then switches durably and in memory. Returns the new collection.
    pub fn switch_generation(
        &self,
        source: &Arc<Collection>,
        shadow: &Arc<Collection>,
        record: &mut ShadowRecord,
        reembed: &mut Reembed<'_>,
    ) -> Result<Arc<Collection>> {
        let _ddl = self.ddl.lock().expect("ddl lock");
        let name = source.name().to_string();
        // An open stream's staged items could still be rolled back, in the source only:
        // switch only when none is open on it. try_lock inside: a stream mid-stage holds
        // its state and waits for this writer.
        let waited = std::time::Instant::now();
        let mut w = loop {
            let w = source.lock_writer()?;
            if !self.txns.touches(&name) {
                break w;
            }
            drop(w);
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        // From here writes to the collection wait: the pause the switch costs them.
        let held_at = std::time::Instant::now();
        // Batches written before the lock may still be publishing.
        source.turns.wait_all(w.next_ticket);
        loop {
            let (items, next) = self.source_step(source, record.cursor)?;
            if next == record.cursor {
                break;
            }
            let items = if items.is_empty() {
                items
            } else {
                reembed(items)?
            };
            record.cursor = next;
            record.done += items.len() as u64;
            self.shadow_write(shadow, &items, record)?;
        }
        // Deletions: ids the shadow holds and the source no longer does.
        let gone: Vec<String> = {
            let src = source.catalogue();
            let live: HashSet<&str> = src
                .keys()
                .filter_map(|k| src.get(k))
                .map(|e| &*e.id)
                .collect();
            let sh = shadow.catalogue();
            sh.keys()
                .filter_map(|k| sh.get(k))
                .filter(|e| !live.contains(&*e.id))
                .map(|e| e.id.to_string())
                .collect()
        };
        if !gone.is_empty() {
            shadow.apply_delete(&gone)?;
        }
        self.store.commit()?;
        if shadow.len() != source.len() {
            return Err(Error::Index(format!(
                "the new generation of {name:?} holds {} items, the current one {}",
                shadow.len(),
                source.len()
            )));
        }
        // The switch itself: durable first, then the map.
        let mut spec = shadow.spec.clone();
        spec.tree = shadow.spec.tree_name();
        self.store.switch_to(&spec)?;
        self.collections
            .write()
            .expect("registry lock")
            .insert(name.clone(), shadow.clone());
        self.shadows.write().expect("registry lock").remove(&name);
        w.dropped = true;
        source.superseded.store(true, Ordering::Release);
        drop(w);
        let held = held_at.elapsed();
        // The old generation's files: its snapshot (stale by uid anyway) and its tree.
        snapshot::remove(&self.snapshots, &name)?;
        self.store.drop_tree(&source.spec.tree_name())?;
        tracing::info!(collection = %name, model = %spec.model_key(), items = shadow.len(), writes_held_ms = held.as_millis() as u64, waited_for_streams_ms = (held_at - waited).as_millis() as u64, "switched to the new generation");
        Ok(shadow.clone())
    }
}
