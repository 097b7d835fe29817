//! Models published while the daemon runs (Models.Publish): checked, loaded, then kept
//! under the data dir so that a restart serves them again.
//!
//! Layout: `DATA_DIR/models/NAME/VERSION/` holds `model.toml` (the manifest as
//! uploaded) and the one .onnx file it names. A published model is served as
//! `NAME@VERSION`, beside the models the config loads at start.
//!
//! Nothing half-done is ever served or kept: an upload is written into a temporary
//! folder, checked against its manifest (the SHA-256 of its bytes, its graph against
//! the towers), loaded, and only then renamed into place; a failure at any step removes
//! the folder. Folders left by a crash mid-upload are removed at start.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::manifest::Manifest;
use super::{Embedder, ModelInfo};
use crate::error::{Error, Field, Result};

/// The manifest file in each version's folder.
const MANIFEST: &str = "model.toml";
/// The prefix of an upload's temporary folder.
const TEMP: &str = ".upload-";

/// One upload, as the stream of chunks delivered it.
#[derive(Debug, Default)]
pub struct Upload {
    pub name: String,
    pub manifest: String,
    pub bytes: Vec<u8>,
    /// Chunks received so far.
    chunks: usize,
}

impl Upload {
    /// Adds one chunk of a Publish stream: the first names the model and carries the
    /// manifest; later ones repeat the same or leave both empty. The upload is refused
    /// as soon as it grows past `max_bytes`, nothing stored.
    pub fn push(
        &mut self,
        name: String,
        manifest: String,
        bytes: &[u8],
        max_bytes: usize,
    ) -> Result<()> {
        let n = self.chunks;
        if n == 0 {
            if name.is_empty() {
                return Err(Error::invalid(
                    "name",
                    "the first chunk must name the model",
                ));
            }
            if manifest.is_empty() {
                return Err(Error::invalid(
                    "manifest",
                    "the first chunk must carry the manifest (TOML)",
                ));
            }
            self.name = name;
            self.manifest = manifest;
        } else if !name.is_empty() && name != self.name {
            return Err(Error::invalid(
                Field::name("chunks").at(n).field("name"),
                format!("{name:?} differs from the first chunk's {:?}", self.name),
            ));
        } else if !manifest.is_empty() && manifest != self.manifest {
            return Err(Error::invalid(
                Field::name("chunks").at(n).field("manifest"),
                "only the first chunk carries the manifest",
            ));
        }
        if self.bytes.len() + bytes.len() > max_bytes {
            return Err(Error::ResourceExhausted(format!(
                "bytes: the upload passed the limit of {max_bytes} bytes (--max-model-mb); nothing was stored"
            )));
        }
        self.bytes.extend_from_slice(bytes);
        self.chunks += 1;
        Ok(())
    }

    /// The stream has ended: it must have carried a chunk.
    pub fn finish(&self) -> Result<()> {
        if self.chunks == 0 {
            return Err(Error::invalid("chunks", "the stream carried no chunk"));
        }
        Ok(())
    }
}

/// The name a published model is served under.
pub fn key(name: &str, version: &str) -> String {
    format!("{name}@{version}")
}

/// Where published models are kept.
pub struct ModelStore {
    dir: PathBuf,
    max_bytes: usize,
    /// One upload is stored at a time (two of one version must not race).
    lock: Mutex<()>,
}

fn plain_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && s != "."
        && s != ".."
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `bytes` to `path` and syncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

fn sync_dir(path: &Path) -> Result<()> {
    std::fs::File::open(path)?.sync_all()?;
    Ok(())
}

impl ModelStore {
    /// Opens (or creates) `dir`, removing uploads a crash left unfinished.
    pub fn open(dir: PathBuf, max_bytes: usize) -> Result<Self> {
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with(TEMP) {
                tracing::warn!(path = %entry.path().display(), "removing an unfinished model upload");
                std::fs::remove_dir_all(entry.path())?;
            }
        }
        Ok(ModelStore {
            dir,
            max_bytes,
            lock: Mutex::new(()),
        })
    }

    /// The largest .onnx file Publish accepts, in bytes.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Every stored version: (`NAME@VERSION`, its manifest's path), in name order.
    pub fn stored(&self) -> Result<Vec<(String, PathBuf)>> {
        let mut out = Vec::new();
        for name in std::fs::read_dir(&self.dir)? {
            let name = name?;
            let n = name.file_name().to_string_lossy().into_owned();
            if n.starts_with(TEMP) || !name.file_type()?.is_dir() {
                continue;
            }
            for version in std::fs::read_dir(name.path())? {
                let version = version?;
                let manifest = version.path().join(MANIFEST);
                if manifest.is_file() {
                    let v = version.file_name().to_string_lossy().into_owned();
                    out.push((key(&n, &v), manifest));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Loads every stored version into `embedder`. A version that no longer loads is
    /// logged and skipped: the daemon serves the rest.
    pub fn load_all(&self, embedder: &dyn Embedder) -> Result<usize> {
        let mut loaded = 0;
        for (key, path) in self.stored()? {
            if embedder.info(&key).is_ok() {
                continue;
            }
            match Manifest::load(&path).and_then(|m| embedder.add(&key, m)) {
                Ok(_) => loaded += 1,
                Err(e) => {
                    tracing::error!(model = %key, path = %path.display(), error = %e, "a published model does not load; skipped");
                }
            }
        }
        Ok(loaded)
    }

    /// Checks an upload against its manifest, loads it into `embedder` as
    /// `NAME@VERSION` and keeps it; nothing is stored or served unless every step
    /// passes. Blocking (disk, model load).
    pub fn publish(&self, embedder: &dyn Embedder, upload: Upload) -> Result<ModelInfo> {
        let Upload {
            name,
            manifest: text,
            bytes,
            chunks: _,
        } = upload;
        if !plain_name(&name, 64) {
            return Err(Error::invalid(
                "name",
                format!("{name:?} must match [A-Za-z0-9_.-]{{1,64}}"),
            ));
        }
        let manifest = Manifest::parse(&text).map_err(|e| Error::invalid("manifest", e))?;
        manifest
            .check()
            .map_err(|e| Error::invalid("manifest", e))?;
        if manifest.name != name {
            return Err(Error::invalid(
                "manifest.name",
                format!("{:?} differs from the chunk's name {name:?}", manifest.name),
            ));
        }
        if !plain_name(&manifest.version, 64) {
            return Err(Error::invalid(
                "manifest.version",
                format!("{:?} must match [A-Za-z0-9_.-]{{1,64}}", manifest.version),
            ));
        }
        let files = manifest.files();
        let file = match files.as_slice() {
            [one] => one.to_string_lossy().into_owned(),
            _ => {
                return Err(Error::invalid(
                    "manifest",
                    format!(
                        "names {} .onnx files; a published model is one file, which every tower names",
                        files.len()
                    ),
                ));
            }
        };
        if !plain_name(&file, 128) || file == MANIFEST {
            return Err(Error::invalid(
                "manifest.towers.file",
                format!("{file:?} must be a plain file name ([A-Za-z0-9_.-])"),
            ));
        }
        let Some(want) = manifest.sha256.as_deref() else {
            return Err(Error::invalid(
                "manifest.sha256",
                "is required: the SHA-256 of the .onnx file, in hex",
            ));
        };
        if bytes.is_empty() {
            return Err(Error::invalid("bytes", "the upload has no bytes"));
        }
        if bytes.len() > self.max_bytes {
            return Err(Error::ResourceExhausted(format!(
                "bytes: {} bytes exceed the limit of {} (--max-model-mb)",
                bytes.len(),
                self.max_bytes
            )));
        }
        let got = sha256_hex(&bytes);
        if !got.eq_ignore_ascii_case(want.trim()) {
            return Err(Error::invalid(
                "bytes",
                format!(
                    "their SHA-256 is {got}, manifest.sha256 says {want}: the upload is corrupt or incomplete"
                ),
            ));
        }
        let key = key(&name, &manifest.version);
        let _one = self.lock.lock().expect("model store lock");
        let target = self.dir.join(&name).join(&manifest.version);
        if embedder.info(&key).is_ok() || target.exists() {
            return Err(Error::AlreadyExists(format!(
                "model {name:?} version {:?}",
                manifest.version
            )));
        }
        let temp = self.dir.join(format!(
            "{TEMP}{name}-{}-{}",
            manifest.version,
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&temp);
        std::fs::create_dir_all(&temp)?;
        let kept = (|| -> Result<ModelInfo> {
            write_synced(&temp.join(MANIFEST), text.as_bytes())?;
            write_synced(&temp.join(&file), &bytes)?;
            sync_dir(&temp)?;
            let loaded = Manifest::load(&temp.join(MANIFEST))?;
            let info = embedder.add(&key, loaded).map_err(|e| match e {
                Error::AlreadyExists(_) | Error::FailedPrecondition(_) => e,
                other => Error::invalid(
                    "bytes",
                    format!("the model does not load against its manifest: {other}"),
                ),
            })?;
            std::fs::create_dir_all(self.dir.join(&name))?;
            std::fs::rename(&temp, &target)?;
            sync_dir(&self.dir.join(&name))?;
            sync_dir(&self.dir)?;
            Ok(info)
        })();
        if kept.is_err() {
            let _ = std::fs::remove_dir_all(&temp);
        }
        let info = kept?;
        tracing::info!(model = %key, bytes = bytes.len(), "published model");
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_known_input() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn names_are_plain() {
        assert!(plain_name("fmnist-triplet", 64));
        assert!(plain_name("2.0_rc1", 64));
        for bad in ["", "..", ".", "a/b", "a b", "x\\y"] {
            assert!(!plain_name(bad, 64), "{bad:?}");
        }
    }
}
