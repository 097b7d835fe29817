//! Where `likeness embed` writes its vectors: a .npy or a .jsonl file, written whole or
//! not at all (through a partial file renamed at the end), or stdout.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Where `embed` writes: a .npy or .jsonl file (through `<out>.partial`, renamed once
/// every row is written, so a failed run leaves no half file), or stdout.
pub(super) struct Sink {
    npy: bool,
    w: BufWriter<Box<dyn Write>>,
    /// (the file asked for, the partial file written meanwhile)
    file: Option<(PathBuf, PathBuf)>,
    rows: usize,
    dim: Option<usize>,
    written: usize,
}

#[derive(serde::Serialize)]
pub(super) struct EmbedRow<'a> {
    file: &'a str,
    vector: &'a [f32],
}

impl Sink {
    pub(super) fn open(out: Option<&Path>, rows: usize) -> Result<Sink, String> {
        let Some(out) = out else {
            return Ok(Sink {
                npy: false,
                w: BufWriter::new(Box::new(std::io::stdout())),
                file: None,
                rows,
                dim: None,
                written: 0,
            });
        };
        let ext = out
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_lowercase);
        let npy = match ext.as_deref() {
            Some("npy") => true,
            Some("jsonl") | Some("ndjson") => false,
            _ => {
                return Err(format!(
                    "--out {}: the extension picks the format: .npy or .jsonl",
                    out.display()
                ));
            }
        };
        let mut partial = out.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let file = File::create(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
        Ok(Sink {
            npy,
            w: BufWriter::new(Box::new(file)),
            file: Some((out.to_path_buf(), partial)),
            rows,
            dim: None,
            written: 0,
        })
    }

    pub(super) fn where_to(&self) -> String {
        match &self.file {
            Some((out, _)) => out.display().to_string(),
            None => "stdout".into(),
        }
    }

    pub(super) fn write(&mut self, file: &Path, vector: &[f32]) -> Result<(), String> {
        let written = if self.npy {
            let dim = *self.dim.get_or_insert(vector.len());
            if vector.len() != dim {
                return Err(format!(
                    "{}: a {}-d vector after {dim}-d ones",
                    file.display(),
                    vector.len()
                ));
            }
            let mut bytes = Vec::with_capacity(vector.len() * 4);
            if self.written == 0 {
                bytes.extend(super::load::npy_header(self.rows, dim));
            }
            bytes.extend(vector.iter().flat_map(|v| v.to_le_bytes()));
            self.w.write_all(&bytes)
        } else {
            let row = EmbedRow {
                file: &file.display().to_string(),
                vector,
            };
            serde_json::to_writer(&mut self.w, &row)
                .map_err(std::io::Error::from)
                .and_then(|()| self.w.write_all(b"\n"))
        };
        written.map_err(|e| format!("{}: {e}", self.where_to()))?;
        self.written += 1;
        Ok(())
    }

    /// Flushes, and puts the file in place.
    pub(super) fn finish(&mut self) -> Result<(), String> {
        self.w
            .flush()
            .map_err(|e| format!("{}: {e}", self.where_to()))?;
        if let Some((out, partial)) = self.file.take() {
            std::fs::rename(&partial, &out).map_err(|e| format!("{}: {e}", out.display()))?;
        }
        Ok(())
    }
}

impl Drop for Sink {
    /// A sink dropped before `finish` leaves no partial file behind.
    fn drop(&mut self) {
        if let Some((_, partial)) = self.file.take() {
            let _ = std::fs::remove_file(partial);
        }
    }
}
