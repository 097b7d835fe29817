//! Bulk readers for `likeness upsert` (.npy, JSONL, CSV), the .npy writer `likeness embed`
//! streams into, and a progress line.

use std::collections::HashMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use crate::grpc::pb;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Npy,
    Jsonl,
    Csv,
}

impl Format {
    pub fn guess(path: &Path) -> Result<Format, String> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("npy") => Ok(Format::Npy),
            Some("jsonl") | Some("ndjson") => Ok(Format::Jsonl),
            Some("csv") => Ok(Format::Csv),
            _ => Err(format!(
                "{}: cannot tell the format from the extension; pass --format",
                path.display()
            )),
        }
    }
}

/// Reads every item of a file.
pub fn read(
    path: &Path,
    format: Format,
    id_prefix: &str,
    labels: Option<&Path>,
) -> Result<Vec<pb::Item>, String> {
    let ctx = |e: String| format!("{}: {e}", path.display());
    match format {
        Format::Npy => {
            let bytes = std::fs::read(path).map_err(|e| ctx(e.to_string()))?;
            let (rows, dim, values) = parse_npy(&bytes).map_err(ctx)?;
            let labels = match labels {
                Some(p) => {
                    let text =
                        std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
                    let l: Vec<String> = text.lines().map(str::to_string).collect();
                    if l.len() != rows {
                        return Err(format!(
                            "{}: {} labels for {rows} rows",
                            p.display(),
                            l.len()
                        ));
                    }
                    l
                }
                None => vec![String::new(); rows],
            };
            Ok(labels
                .into_iter()
                .enumerate()
                .map(|(i, label)| pb::Item {
                    id: format!("{id_prefix}{i}"),
                    label,
                    metadata: HashMap::new(),
                    vector: values[i * dim..(i + 1) * dim].to_vec(),
                    input: None,
                    generation: 0,
                })
                .collect())
        }
        Format::Jsonl => {
            let file = std::fs::File::open(path).map_err(|e| ctx(e.to_string()))?;
            let mut items = Vec::new();
            for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
                let line = line.map_err(|e| ctx(e.to_string()))?;
                if line.trim().is_empty() {
                    continue;
                }
                let row: JsonItem =
                    serde_json::from_str(&line).map_err(|e| ctx(format!("line {}: {e}", n + 1)))?;
                items.push(pb::Item {
                    id: row.id,
                    label: row.label,
                    metadata: row.metadata,
                    vector: row.vector,
                    input: None,
                    generation: row.generation,
                });
            }
            Ok(items)
        }
        Format::Csv => {
            let text = std::fs::read_to_string(path).map_err(|e| ctx(e.to_string()))?;
            parse_csv(&text).map_err(ctx)
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonItem {
    id: String,
    #[serde(default)]
    label: String,
    #[serde(default)]
    metadata: HashMap<String, String>,
    vector: Vec<f32>,
    #[serde(default)]
    generation: u64,
}

/// `id,label,x0,x1,...` with a header row; no quoting (ids and labels without commas).
pub fn parse_csv(text: &str) -> Result<Vec<pb::Item>, String> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let Some((_, header)) = lines.next() else {
        return Ok(Vec::new());
    };
    let cols: Vec<&str> = header.split(',').map(str::trim).collect();
    if cols.first() != Some(&"id") {
        return Err("the CSV header must start with `id`".into());
    }
    let has_label = cols.get(1) == Some(&"label");
    let first_value = if has_label { 2 } else { 1 };
    let dim = cols.len() - first_value;
    let mut items = Vec::new();
    for (n, line) in lines {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() != cols.len() {
            return Err(format!(
                "line {}: {} fields, the header has {}",
                n + 1,
                fields.len(),
                cols.len()
            ));
        }
        let vector = fields[first_value..]
            .iter()
            .map(|f| f.parse::<f32>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("line {}: {e}", n + 1))?;
        debug_assert_eq!(vector.len(), dim);
        items.push(pb::Item {
            id: fields[0].to_string(),
            label: if has_label {
                fields[1].to_string()
            } else {
                String::new()
            },
            metadata: HashMap::new(),
            vector,
            input: None,
            generation: 0,
        });
    }
    Ok(items)
}

/// Parses a 2-D little-endian C-order float32 or float64 .npy array: (rows, dim, values).
pub fn parse_npy(bytes: &[u8]) -> Result<(usize, usize, Vec<f32>), String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file".into());
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = bytes
        .get(start..start + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or("truncated .npy header")?;
    let descr = dict_value(header, "descr").ok_or("no descr in .npy header")?;
    let descr = descr
        .strip_prefix(['\'', '"'])
        .and_then(|d| d.split(['\'', '"']).next())
        .ok_or("bad descr in .npy header")?;
    let width = match descr {
        "<f4" => 4,
        "<f8" => 8,
        d => return Err(format!("dtype {d} unsupported: use float32 or float64")),
    };
    if dict_value(header, "fortran_order").is_some_and(|v| v.starts_with("True")) {
        return Err("Fortran-order arrays are unsupported".into());
    }
    let shape = dict_value(header, "shape").ok_or("no shape in .npy header")?;
    let dims: Vec<usize> = shape
        .trim_start_matches('(')
        .split(')')
        .next()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|e| format!("shape {shape}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let [rows, dim] = dims[..] else {
        return Err(format!("shape {dims:?}: need a 2-D array"));
    };
    let data = &bytes[start + header_len..];
    let need = rows
        .checked_mul(dim)
        .and_then(|n| n.checked_mul(width))
        .ok_or("shape overflows")?;
    if data.len() < need {
        return Err(format!("truncated data: {} bytes, need {need}", data.len()));
    }
    let values = if width == 4 {
        data[..need]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()
    } else {
        data[..need]
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect()
    };
    Ok((rows, dim, values))
}

/// The text after `'key':` in a Python dict literal, up to the end.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'"))?;
    let rest = &header[at + key.len() + 2..];
    Some(rest.trim_start().strip_prefix(':')?.trim_start())
}

/// Writes a 2-D float32 .npy.
pub fn write_npy(rows: usize, dim: usize, values: &[f32]) -> Vec<u8> {
    let mut out = npy_header(rows, dim);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// The header of a 2-D little-endian float32 .npy; the rows' values follow it, so a
/// writer that knows the shape can stream them.
pub fn npy_header(rows: usize, dim: usize) -> Vec<u8> {
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dim}), }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out
}

/// Reads an N x H x W uint8 .npy (a stack of grey images): (height, width, the pixels
/// of each image).
pub fn npy_images(path: &Path) -> Result<(u32, u32, Vec<Vec<u8>>), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(format!("{}: not a .npy file", path.display()));
    }
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(bytes.get(10..10 + header_len).ok_or("truncated header")?)
        .map_err(|e| e.to_string())?;
    if !header.contains("'|u1'") {
        return Err(format!("{}: expected uint8 images", path.display()));
    }
    let shape = dict_value(header, "shape").ok_or("no shape")?;
    let dims: Vec<u32> = shape
        .trim_start_matches('(')
        .split(')')
        .next()
        .unwrap_or("")
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let [n, h, w] = dims[..] else {
        return Err(format!(
            "{}: shape {dims:?}, need N x H x W",
            path.display()
        ));
    };
    let pixels = &bytes[10 + header_len..];
    let size = (h * w) as usize;
    if pixels.len() < n as usize * size {
        return Err(format!("{}: truncated data", path.display()));
    }
    let images = pixels
        .chunks(size)
        .take(n as usize)
        .map(<[u8]>::to_vec)
        .collect();
    Ok((h, w, images))
}

/// Reads an N x H x W uint8 .npy (a stack of grey images) and PNG-encodes each image,
/// as a client would send them (the committed Fashion-MNIST fixtures are such files).
pub fn npy_images_as_png(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let (h, w, images) = npy_images(path)?;
    images
        .into_iter()
        .map(|px| {
            let img = image::GrayImage::from_raw(w, h, px).ok_or("bad image size")?;
            let mut out = std::io::Cursor::new(Vec::new());
            img.write_to(&mut out, image::ImageFormat::Png)
                .map_err(|e| e.to_string())?;
            Ok(out.into_inner())
        })
        .collect()
}

pub fn parse_floats(s: &str) -> Result<Vec<f32>, String> {
    s.split(',')
        .map(|x| {
            x.trim()
                .parse::<f32>()
                .map_err(|e| format!("--vector {x:?}: {e}"))
        })
        .collect()
}

/// A one-line progress bar on stderr (only on a terminal).
pub struct Progress {
    total: usize,
    tty: bool,
    unit: &'static str,
}

impl Progress {
    pub fn new(total: usize) -> Self {
        Progress::counting(total, "items")
    }

    /// A bar whose rate counts `unit` ("images").
    pub fn counting(total: usize, unit: &'static str) -> Self {
        Progress {
            total,
            tty: std::io::stderr().is_terminal(),
            unit,
        }
    }

    pub fn show(&self, done: usize, elapsed: Duration) {
        if !self.tty {
            return;
        }
        let width = 30;
        let filled = (done * width).checked_div(self.total).unwrap_or(width);
        let rate = done as f64 / elapsed.as_secs_f64().max(1e-9);
        eprint!(
            "\r[{}{}] {done}/{} {rate:.0} {}/s",
            "=".repeat(filled),
            " ".repeat(width - filled.min(width)),
            self.total,
            self.unit
        );
        let _ = std::io::stderr().flush();
    }

    pub fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trip() {
        let values: Vec<f32> = (0..12).map(|i| i as f32 * 0.5).collect();
        let bytes = write_npy(3, 4, &values);
        let (rows, dim, back) = parse_npy(&bytes).unwrap();
        assert_eq!((rows, dim), (3, 4));
        assert_eq!(back, values);
    }

    #[test]
    fn npy_rejects_other_dtypes_and_truncation() {
        let mut bytes = write_npy(2, 2, &[1.0, 2.0, 3.0, 4.0]);
        let truncated = &bytes[..bytes.len() - 1];
        assert!(parse_npy(truncated).unwrap_err().contains("truncated"));
        let pos = bytes.windows(3).position(|w| w == b"<f4").unwrap();
        bytes[pos + 1] = b'i';
        assert!(parse_npy(&bytes).unwrap_err().contains("unsupported"));
    }

    #[test]
    fn csv_with_and_without_labels() {
        let items = parse_csv("id,label,a,b\nx,cat,1,2\ny,dog,3,4.5\n").unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[1].label, "dog");
        assert_eq!(items[1].vector, vec![3.0, 4.5]);
        let items = parse_csv("id,a\nx,1\n").unwrap();
        assert_eq!(items[0].vector, vec![1.0]);
        assert!(parse_csv("id,a\nx,1,2\n").unwrap_err().contains("fields"));
        assert!(parse_csv("id,a\nx,abc\n").is_err());
    }
}
