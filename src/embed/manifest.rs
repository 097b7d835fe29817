//! A model's manifest: the TOML beside its .onnx files, describing each tower's input,
//! output and preprocessing. Checked against the ONNX graph when the model loads.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::types::Metric;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    #[serde(default = "default_version")]
    pub version: String,
    pub towers: Vec<TowerSpec>,
    /// The directory the manifest was read from; tower files are relative to it.
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
    /// The .onnx file, relative to the manifest.
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
    /// Verification threshold on the distance.
    pub threshold: Option<f32>,
    /// Image input: decoded, resized and normalised into [1, C, H, W].
    pub image: Option<ImageSpec>,
    /// Tensor input of this shape (without the batch axis).
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
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub shape: Vec<u32>,
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::invalid("models", format!("manifest {}: {e}", path.display())))?;
        let mut m: Manifest = toml::from_str(&text)
            .map_err(|e| Error::invalid("models", format!("manifest {}: {e}", path.display())))?;
        m.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        m.validate(path)?;
        Ok(m)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |why: String| {
            Err(Error::invalid(
                "models",
                format!("manifest {}: {why}", path.display()),
            ))
        };
        if self.towers.is_empty() {
            return bad("no towers".into());
        }
        let dim = self.towers[0].dimension;
        for t in &self.towers {
            if t.dimension == 0 {
                return bad(format!("tower {}: dimension 0", t.name));
            }
            if t.dimension != dim {
                return bad(format!(
                    "tower {} has dimension {}, tower {} has {dim}: towers must map into one space",
                    t.name, t.dimension, self.towers[0].name
                ));
            }
            match (&t.image, &t.tensor) {
                (Some(img), None) => {
                    if !matches!(img.channels, 1 | 3) {
                        return bad(format!("tower {}: image.channels must be 1 or 3", t.name));
                    }
                    if img.mean.len() != img.channels as usize
                        || img.std.len() != img.channels as usize
                    {
                        return bad(format!(
                            "tower {}: image.mean and image.std need one value per channel",
                            t.name
                        ));
                    }
                    if img.std.contains(&0.0) {
                        return bad(format!("tower {}: image.std must not be 0", t.name));
                    }
                    if img.height == 0 || img.width == 0 {
                        return bad(format!("tower {}: image size must not be 0", t.name));
                    }
                }
                (None, Some(ts)) => {
                    if ts.shape.is_empty() || ts.shape.contains(&0) {
                        return bad(format!(
                            "tower {}: tensor.shape needs positive dimensions",
                            t.name
                        ));
                    }
                }
                _ => {
                    return bad(format!(
                        "tower {}: give exactly one of [towers.image] or [towers.tensor]",
                        t.name
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn dimension(&self) -> u32 {
        self.towers[0].dimension
    }
}
