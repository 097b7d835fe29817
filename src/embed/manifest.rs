//! A model's manifest: TOML beside its .onnx files, or the same TOML stored in the ONNX
//! file's metadata_props under [`METADATA_KEY`]. It describes each tower's input, output
//! and preprocessing (an embedder), or the two inputs and the score of a pair model.
//! Checked against the ONNX graph when the model loads.

use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::types::Metric;

/// The metadata_props key whose value is the manifest's TOML.
pub const METADATA_KEY: &str = "likeness.manifest";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    #[serde(default = "default_version")]
    pub version: String,
    /// An embedder's towers (one for a Siamese/triplet model, one per input kind for a
    /// two-tower model). Empty for a pair model.
    #[serde(default)]
    pub towers: Vec<TowerSpec>,
    /// A pair model: two inputs in, one match score out.
    pub pair: Option<PairSpec>,
    /// The SHA-256 of the model's .onnx file, hex. Publish requires it and checks the
    /// upload against it; a manifest on disk may leave it out.
    #[serde(default)]
    pub sha256: Option<String>,
    /// The directory the manifest was read from; files are relative to it.
    #[serde(skip)]
    pub dir: PathBuf,
}

fn default_version() -> String {
    "1".into()
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TowerSpec {
    pub name: String,
    /// The .onnx file, relative to the manifest (ignored in metadata_props: there it is
    /// the file that carries the manifest).
    #[serde(default)]
    pub file: PathBuf,
    /// Graph input and output names.
    pub input: String,
    pub output: String,
    pub dimension: u32,
    /// L2-normalise the output (a no-op when the graph already does).
    #[serde(default)]
    pub normalize: bool,
    #[serde(default = "default_metric")]
    pub metric: Metric,
    /// Distance-based logistic margin m (Vo & Hays 2016).
    pub dbl_margin: Option<f32>,
    /// Scale s applied to the distance in that logistic (1 when absent).
    pub dbl_scale: Option<f32>,
    /// Verification threshold on the distance.
    pub threshold: Option<f32>,
    /// Image input: decoded, resized and normalised into [1, C, H, W].
    pub image: Option<ImageSpec>,
    /// Tensor input of this shape (without the batch axis).
    pub tensor: Option<TensorSpec>,
}

/// A pair model (Zagoruyko & Komodakis 2015): a 2-channel network or a Siamese tower
/// with a decision network, scoring how alike two inputs are.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairSpec {
    /// The .onnx file, relative to the manifest (ignored in metadata_props).
    #[serde(default)]
    pub file: PathBuf,
    /// The graph's two input names: first and second of the pair.
    pub inputs: [String; 2],
    /// The graph output: one score per pair, shaped [batch] or [batch, 1].
    pub output: String,
    /// The pair is "the same" when score >= threshold.
    pub threshold: f32,
    /// Both inputs take this: an image or a tensor.
    pub image: Option<ImageSpec>,
    pub tensor: Option<TensorSpec>,
}

fn default_metric() -> Metric {
    Metric::Cosine
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// 1 (grey) or 3 (RGB).
    pub channels: u32,
    /// The size images are resized to; with `resize = "keep"`, the largest size kept
    /// (bigger images are scaled down to fit, keeping their aspect ratio).
    pub height: u32,
    pub width: u32,
    #[serde(default = "default_resize")]
    pub resize: Resize,
    /// Per channel, applied after scaling pixels to [0, 1].
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

fn default_resize() -> Resize {
    Resize::Bilinear
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resize {
    Bilinear,
    Nearest,
    /// Keep each image's own size (graphs with dynamic spatial dims, e.g. spatial
    /// pyramid pooling); only same-sized images are batched together.
    Keep,
}

impl Resize {
    pub fn as_str(self) -> &'static str {
        match self {
            Resize::Bilinear => "bilinear",
            Resize::Nearest => "nearest",
            Resize::Keep => "keep",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub shape: Vec<u32>,
}

/// What one graph input takes, shared by towers and pair models.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InputSpec<'a> {
    Image(&'a ImageSpec),
    Tensor(&'a TensorSpec),
}

impl InputSpec<'_> {
    /// Dimensions without the batch axis; -1 where each input keeps its own size.
    pub fn dims(&self) -> Vec<i64> {
        match self {
            InputSpec::Image(img) if img.resize == Resize::Keep => {
                vec![i64::from(img.channels), -1, -1]
            }
            InputSpec::Image(img) => vec![
                i64::from(img.channels),
                i64::from(img.height),
                i64::from(img.width),
            ],
            InputSpec::Tensor(t) => t.shape.iter().map(|d| i64::from(*d)).collect(),
        }
    }
}

impl<'a> InputSpec<'a> {
    /// The one of `image` and `tensor` a validated manifest gives.
    fn of(image: &'a Option<ImageSpec>, tensor: &'a Option<TensorSpec>) -> Self {
        match (image, tensor) {
            (Some(img), _) => InputSpec::Image(img),
            (None, Some(t)) => InputSpec::Tensor(t),
            (None, None) => unreachable!("validated manifest"),
        }
    }
}

impl TowerSpec {
    pub fn input_spec(&self) -> InputSpec<'_> {
        InputSpec::of(&self.image, &self.tensor)
    }
}

impl PairSpec {
    pub fn input_spec(&self) -> InputSpec<'_> {
        InputSpec::of(&self.image, &self.tensor)
    }
}

impl Manifest {
    /// Reads a manifest: a TOML file, or an .onnx file carrying one in its metadata_props.
    pub fn load(path: &Path) -> Result<Manifest> {
        let fail = |why: String| Error::invalid("models", format!("{}: {why}", path.display()));
        let is_onnx = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("onnx"));
        let text = if is_onnx {
            onnx_metadata(path, METADATA_KEY)
                .map_err(|e| fail(e.to_string()))?
                .ok_or_else(|| {
                    fail(format!(
                        "no manifest: the ONNX metadata_props have no {METADATA_KEY:?} entry \
                         (add one with `likeness model pack`, or give the TOML manifest's path)"
                    ))
                })?
        } else {
            std::fs::read_to_string(path).map_err(|e| fail(format!("manifest: {e}")))?
        };
        let mut m = Manifest::parse(&text).map_err(|e| fail(format!("manifest: {e}")))?;
        m.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if is_onnx {
            // A manifest in metadata_props describes the file that carries it.
            let own = PathBuf::from(path.file_name().unwrap_or_default());
            for t in &mut m.towers {
                t.file = own.clone();
            }
            if let Some(p) = &mut m.pair {
                p.file = own;
            }
        }
        m.validate()
            .map_err(|why| fail(format!("manifest: {why}")))?;
        Ok(m)
    }

    /// A manifest from its TOML text, unchecked (see [`Manifest::check`]); `dir` unset.
    pub fn parse(text: &str) -> std::result::Result<Manifest, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Whether the manifest is consistent in itself (not yet against a graph).
    pub fn check(&self) -> std::result::Result<(), String> {
        self.validate()
    }

    /// Every .onnx file the manifest names (towers or pair), deduplicated, in order.
    pub fn files(&self) -> Vec<&Path> {
        let mut out: Vec<&Path> = Vec::new();
        let all = self
            .towers
            .iter()
            .map(|t| t.file.as_path())
            .chain(self.pair.as_ref().map(|p| p.file.as_path()));
        for f in all {
            if !out.contains(&f) {
                out.push(f);
            }
        }
        out
    }

    fn validate(&self) -> std::result::Result<(), String> {
        match (&self.pair, self.towers.is_empty()) {
            (None, true) => return Err("no towers and no [pair]".into()),
            (Some(_), false) => {
                return Err(
                    "give [[towers]] (an embedder) or [pair] (a pair model), not both".into(),
                );
            }
            (Some(p), true) => {
                if p.file.as_os_str().is_empty() {
                    return Err("pair.file is missing".into());
                }
                if p.inputs[0] == p.inputs[1] {
                    return Err("pair.inputs must be two different graph inputs".into());
                }
                if !p.threshold.is_finite() {
                    return Err("pair.threshold must be a finite number".into());
                }
                check_input("pair", p.image.as_ref(), p.tensor.as_ref())?;
                if let Some(img) = &p.image
                    && img.resize == Resize::Keep
                {
                    return Err("pair.image.resize = \"keep\" is not supported: both inputs of a pair are batched together".into());
                }
            }
            (None, false) => {}
        }
        let dim = self.towers.first().map_or(0, |t| t.dimension);
        for (i, t) in self.towers.iter().enumerate() {
            let name = &t.name;
            if self.towers[..i].iter().any(|o| o.name == *name) {
                return Err(format!("two towers are named {name:?}"));
            }
            if t.file.as_os_str().is_empty() {
                return Err(format!("tower {name}: file is missing"));
            }
            if t.dimension == 0 {
                return Err(format!("tower {name}: dimension 0"));
            }
            if t.dimension != dim {
                return Err(format!(
                    "tower {name} has dimension {}, tower {} has {dim}: towers must map into one space",
                    t.dimension, self.towers[0].name
                ));
            }
            if let Some(s) = t.dbl_scale
                && !(s.is_finite() && s > 0.0)
            {
                return Err(format!("tower {name}: dbl_scale must be positive"));
            }
            check_input(
                &format!("tower {name}"),
                t.image.as_ref(),
                t.tensor.as_ref(),
            )?;
        }
        Ok(())
    }

    pub fn dimension(&self) -> u32 {
        self.towers.first().map_or(0, |t| t.dimension)
    }
}

fn check_input(
    what: &str,
    image: Option<&ImageSpec>,
    tensor: Option<&TensorSpec>,
) -> std::result::Result<(), String> {
    match (image, tensor) {
        (Some(img), None) => {
            if !matches!(img.channels, 1 | 3) {
                return Err(format!("{what}: image.channels must be 1 or 3"));
            }
            if img.mean.len() != img.channels as usize || img.std.len() != img.channels as usize {
                return Err(format!(
                    "{what}: image.mean and image.std need one value per channel"
                ));
            }
            if img.std.contains(&0.0) {
                return Err(format!("{what}: image.std must not be 0"));
            }
            if img.height == 0 || img.width == 0 {
                return Err(format!("{what}: image size must not be 0"));
            }
            Ok(())
        }
        (None, Some(ts)) => {
            if ts.shape.is_empty() || ts.shape.contains(&0) {
                return Err(format!("{what}: tensor.shape needs positive dimensions"));
            }
            Ok(())
        }
        _ => Err(format!("{what}: give exactly one of image or tensor")),
    }
}

// ONNX files are protobuf ModelProto messages; metadata_props is field 14, a repeated
// StringStringEntryProto {key = 1, value = 2}. Only the top level is walked, and every
// other field is skipped without being read, so large weights cost a seek, not a read.
const METADATA_FIELD: u64 = 14;

fn read_varint(r: &mut impl Read) -> std::io::Result<Option<u64>> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let mut b = [0u8];
        if r.read(&mut b)? == 0 {
            return if shift == 0 {
                Ok(None)
            } else {
                Err(std::io::Error::other("truncated varint"))
            };
        }
        v |= u64::from(b[0] & 0x7f) << shift;
        if b[0] & 0x80 == 0 {
            return Ok(Some(v));
        }
    }
    Err(std::io::Error::other("varint too long"))
}

/// The value of metadata_props entry `key` in an ONNX file, if it has one.
pub fn onnx_metadata(path: &Path, key: &str) -> std::io::Result<Option<String>> {
    let file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    let mut r = BufReader::new(file);
    let bad = |why: &str| std::io::Error::other(format!("not an ONNX model: {why}"));
    let mut found = None;
    while let Some(tag) = read_varint(&mut r)? {
        if tag >> 3 == 0 {
            return Err(bad("field number 0"));
        }
        let (field, wire) = (tag >> 3, tag & 7);
        match wire {
            0 => {
                read_varint(&mut r)?.ok_or_else(|| bad("truncated"))?;
            }
            1 => {
                r.seek(SeekFrom::Current(8))?;
            }
            5 => {
                r.seek(SeekFrom::Current(4))?;
            }
            2 => {
                let len = read_varint(&mut r)?.ok_or_else(|| bad("truncated"))?;
                if r.stream_position()?.saturating_add(len) > size {
                    return Err(bad("truncated"));
                }
                if field == METADATA_FIELD {
                    if len > 64 << 20 {
                        return Err(bad("metadata entry over 64 MiB"));
                    }
                    let mut entry = vec![0u8; len as usize];
                    r.read_exact(&mut entry)?;
                    if let Some((k, v)) = string_pair(&entry)
                        && k == key
                    {
                        found = Some(v);
                    }
                } else {
                    r.seek(SeekFrom::Current(
                        i64::try_from(len).map_err(|_| bad("length"))?,
                    ))?;
                }
            }
            _ => return Err(bad("unexpected wire type")),
        }
    }
    Ok(found)
}

/// Decodes a StringStringEntryProto.
fn string_pair(mut buf: &[u8]) -> Option<(String, String)> {
    let (mut key, mut value) = (String::new(), String::new());
    while !buf.is_empty() {
        let tag = read_varint(&mut buf).ok()??;
        if tag & 7 != 2 {
            return None;
        }
        let len = read_varint(&mut buf).ok()?? as usize;
        let bytes = buf.get(..len)?;
        buf = &buf[len..];
        let s = String::from_utf8(bytes.to_vec()).ok()?;
        match tag >> 3 {
            1 => key = s,
            2 => value = s,
            _ => {}
        }
    }
    Some((key, value))
}

/// Appends a metadata_props entry to a serialized ONNX model (a protobuf message may
/// carry its repeated fields anywhere, so appending is a valid edit).
pub fn append_metadata(model: &mut Vec<u8>, key: &str, value: &str) {
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    let mut entry = Vec::with_capacity(key.len() + value.len() + 8);
    for (field, s) in [(1u64, key), (2, value)] {
        varint(&mut entry, (field << 3) | 2);
        varint(&mut entry, s.len() as u64);
        entry.extend_from_slice(s.as_bytes());
    }
    varint(model, (METADATA_FIELD << 3) | 2);
    varint(model, entry.len() as u64);
    model.extend_from_slice(&entry);
}

/// Writes `out`: the one .onnx file a TOML manifest describes, carrying that manifest in
/// its metadata_props, so that the .onnx alone is a complete model. Checks the result
/// reads back as the same manifest.
pub fn pack(manifest: &Path, out: &Path) -> std::result::Result<(), String> {
    let m = Manifest::load(manifest).map_err(|e| e.to_string())?;
    let mut files: Vec<&PathBuf> = m.towers.iter().map(|t| &t.file).collect();
    files.extend(m.pair.as_ref().map(|p| &p.file));
    files.dedup();
    let [file] = files[..] else {
        return Err(format!(
            "{}: the towers use {} files; one .onnx can only carry a manifest for itself",
            manifest.display(),
            files.len()
        ));
    };
    let src = m.dir.join(file);
    if onnx_metadata(&src, METADATA_KEY)
        .map_err(|e| format!("{}: {e}", src.display()))?
        .is_some()
    {
        return Err(format!("{} already carries a manifest", src.display()));
    }
    let text = std::fs::read_to_string(manifest).map_err(|e| e.to_string())?;
    let mut bytes = std::fs::read(&src).map_err(|e| format!("{}: {e}", src.display()))?;
    append_metadata(&mut bytes, METADATA_KEY, &text);
    std::fs::write(out, &bytes).map_err(|e| format!("{}: {e}", out.display()))?;
    let back = Manifest::load(out).map_err(|e| e.to_string())?;
    if (&back.towers.len(), &back.pair.is_some(), &back.name)
        != (&m.towers.len(), &m.pair.is_some(), &m.name)
    {
        return Err(format!("{}: the manifest did not read back", out.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_through_an_onnx_file() {
        let dir = tempfile::tempdir().unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fmnist-triplet/model.onnx");
        let mut bytes = std::fs::read(src).unwrap();
        let path = dir.path().join("m.onnx");
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(onnx_metadata(&path, METADATA_KEY).unwrap(), None);
        append_metadata(&mut bytes, "other", "x");
        append_metadata(&mut bytes, METADATA_KEY, "name = \"é\"\n");
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(
            onnx_metadata(&path, METADATA_KEY).unwrap().as_deref(),
            Some("name = \"é\"\n")
        );
        assert_eq!(onnx_metadata(&path, "other").unwrap().as_deref(), Some("x"));
        std::fs::write(&path, b"\x0a\xff\xff\xff\xff\x0f").unwrap();
        assert!(onnx_metadata(&path, METADATA_KEY).is_err());
    }
}
