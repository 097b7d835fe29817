//! Online backups: every collection's store records and index snapshot written, while
//! writes go on, to a directory outside the data dir, consistent as of one point.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::Registry;
use crate::error::{Error, Result};
use crate::store::backup::BackupWriter;

/// What a backup wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct BackupInfo {
    pub path: PathBuf,
    /// Each collection's name and item count, in name order.
    pub collections: Vec<(String, u64)>,
    pub items: u64,
    pub bytes: u64,
    pub took: Duration,
    /// The longest time one collection's writes waited for the backup.
    pub longest_pause: Duration,
}

impl Registry {
    /// Writes an online backup to `path` (absent or an empty directory on this
    /// machine, outside the data dir). Each collection is copied under its writer lock,
    /// so its copy holds every write acknowledged before the backup reached it and no
    /// part of a later one; writes to it wait meanwhile, writes to the others go on.
    /// Messages of an UpsertStream still open are visible to the copy as they are to
    /// reads. Creates, deletes and calibrations wait for the whole backup.
    pub fn backup(&self, path: &str) -> Result<BackupInfo> {
        self.check_ready()?;
        let started = Instant::now();
        let to = self.backup_target(path)?;
        let _ddl = self.ddl.lock().expect("ddl lock");
        let mut writer = BackupWriter::create(&to)?;
        let mut collections = Vec::new();
        let mut longest_pause = Duration::ZERO;
        for spec in self.store.specs()? {
            let Ok(coll) = self.collection(&spec.name) else {
                continue;
            };
            let paused = Instant::now();
            let items = {
                let w = coll.writer.lock().expect("writer lock");
                writer.add(&spec, &coll.items, w.state.seq)?
            };
            let pause = paused.elapsed();
            longest_pause = longest_pause.max(pause);
            tracing::info!(collection = %spec.name, items, pause_ms = pause.as_millis() as u64, "backed up collection");
            collections.push((spec.name, items));
        }
        let (_, bytes) = writer.finish()?;
        let info = BackupInfo {
            path: to,
            items: collections.iter().map(|(_, n)| n).sum(),
            collections,
            bytes,
            took: started.elapsed(),
            longest_pause,
        };
        tracing::info!(path = %info.path.display(), items = info.items, bytes, took_ms = info.took.as_millis() as u64, "backup written");
        Ok(info)
    }

    /// A backup path: absolute, and not inside the data dir.
    fn backup_target(&self, path: &str) -> Result<PathBuf> {
        if path.is_empty() {
            return Err(Error::invalid("path", "must not be empty"));
        }
        let to = PathBuf::from(path);
        if !to.is_absolute() {
            return Err(Error::invalid(
                "path",
                format!("{path:?} must be an absolute path on the daemon's machine"),
            ));
        }
        // The nearest existing ancestor, resolved, so that links and `..` cannot hide
        // the data dir.
        let mut existing = to.as_path();
        let mut rest = Vec::new();
        while !existing.exists() {
            let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
                break;
            };
            rest.push(name);
            existing = parent;
        }
        let mut resolved = existing
            .canonicalize()
            .map_err(|e| Error::invalid("path", format!("{path:?}: {e}")))?;
        resolved.extend(rest.iter().rev());
        let data_dir = self.settings.data_dir.canonicalize()?;
        if resolved.starts_with(&data_dir) || data_dir.starts_with(&resolved) {
            return Err(Error::invalid(
                "path",
                format!(
                    "{path:?} overlaps the data dir {}; back up to a directory outside it",
                    data_dir.display()
                ),
            ));
        }
        Ok(to)
    }
}
