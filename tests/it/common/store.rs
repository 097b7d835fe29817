//! Helpers the store-level and backup tests share: a registry opened on a directory,
//! generated items, a collection made through the library API, item numbers with
//! distinct vectors, and a size-limited filesystem.

use std::process::Command;

use likeness::collections::{CreateCollection, Recovered, Registry, Settings};
use likeness::grpc::pb;
use likeness::types::{ItemData, Metric};

use super::{clustered, item};

/// The dimension of [`vector_of`]'s vectors.
pub const DIM: usize = 8;

pub fn open(dir: &std::path::Path) -> (Registry, Vec<Recovered>) {
    let mut settings = Settings::new(dir);
    settings.cache_bytes = 32 << 20;
    let db = Registry::open(settings).unwrap();
    let report = db.recover().unwrap();
    (db, report)
}

pub fn items(from: usize, n: usize, dim: usize) -> Vec<ItemData> {
    let (vectors, labels) = clustered(n, dim, 10, 0.2, from as u64 + 1);
    vectors
        .into_iter()
        .zip(labels)
        .enumerate()
        .map(|(i, (vector, l))| ItemData {
            id: format!("i{}", from + i),
            label: format!("L{l}"),
            vector,
            ..Default::default()
        })
        .collect()
}

pub fn create(db: &Registry, name: &str, dim: u32) {
    db.create(CreateCollection {
        name: name.into(),
        dimension: dim,
        metric: Some(Metric::Cosine),
        ..Default::default()
    })
    .unwrap();
}

/// A distinct vector per item number.
pub fn vector_of(n: usize) -> Vec<f32> {
    (0..DIM)
        .map(|j| ((n as f32) * 0.7311 + (j as f32) * 1.37 + 0.1).sin())
        .collect()
}

/// Item `id` number `n`, with a label and metadata derived from them.
pub fn full_item(id: &str, n: usize) -> pb::Item {
    let mut it = item(id, &format!("l{}", n % 7), vector_of(n));
    it.metadata = [("n".to_string(), n.to_string())].into();
    it.generation = n as u64;
    it
}

/// A size-limited filesystem, mounted for the test where the machine allows (root, a
/// kernel that lets it mount tmpfs); None, with the reason printed, elsewhere.
pub struct Tmpfs {
    pub path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mnt");
        std::fs::create_dir_all(&path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs { path, _dir: dir }),
            Ok(o) => {
                eprintln!(
                    "SKIPPED: cannot mount a {size} tmpfs here: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount: {e}");
                None
            }
        }
    }

    /// Fills the filesystem; returns the filler's path (remove it to free the space).
    pub fn fill(&self) -> std::path::PathBuf {
        self.fill_as("filler")
    }

    /// [`Tmpfs::fill`] with a filler of the given name.
    pub fn fill_as(&self, name: &str) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.path.join(name);
        let mut f = std::fs::File::create(&path).unwrap();
        let buf = vec![7u8; 1 << 16];
        while f.write_all(&buf).is_ok() {}
        // The last partial page, byte by byte.
        while f.write_all(&[7u8]).is_ok() {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
