//! A fake embedder for tests where the model is beside the point (keep_inputs rules,
//! re-ranking order, field names in errors): no ONNX Runtime, no model files, answers
//! in microseconds, and deterministic.
//!
//! `fake` embeds any input (image bytes or tensor) to a unit vector of dimension 8 derived
//! from a hash of its bytes, so equal inputs embed equally and different ones do not.
//! `fake-pair` scores a pair as (1 + cos) / 2 of those embeddings. An empty image is
//! refused as undecodable, as the real image decoder would.

use super::handle::BoxFuture;
use super::manifest::{PairSpec, TensorSpec, TowerSpec};
use super::{Embedder, Input, InputData, ModelInfo, TowerInfo};
use crate::error::{Error, Field, Result};
use crate::types::{Metric, ModelDefaults};

pub const FAKE_MODEL: &str = "fake";
pub const FAKE_PAIR_MODEL: &str = "fake-pair";
pub const FAKE_DIMENSION: u32 = 8;

#[derive(Debug, Clone, Copy, Default)]
pub struct FakeEmbedder;

impl FakeEmbedder {
    /// The fake embedding of one input.
    pub fn vector(data: &InputData) -> Vec<f32> {
        let bytes: Vec<u8> = match data {
            InputData::Image(b) => b.clone(),
            InputData::Tensor { values, .. } => {
                values.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
        };
        let mut v: Vec<f32> = (0..FAKE_DIMENSION as u64)
            .map(|d| {
                // FNV-1a over the bytes, seeded per dimension.
                let mut h = 0xcbf2_9ce4_8422_2325u64 ^ d.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                for b in &bytes {
                    h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
                }
                (h >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        v.iter_mut().for_each(|x| *x /= norm);
        v
    }

    fn check(field: Field, data: &InputData) -> Result<()> {
        match data {
            InputData::Image(b) if b.is_empty() => Err(Error::invalid(
                field.field("image"),
                "undecodable image: no bytes",
            )),
            _ => Ok(()),
        }
    }

    fn tower() -> TowerSpec {
        TowerSpec {
            name: "main".into(),
            file: Default::default(),
            input: "x".into(),
            output: "y".into(),
            dimension: FAKE_DIMENSION,
            normalize: true,
            metric: Metric::Cosine,
            dbl_margin: Some(0.0),
            dbl_scale: Some(1.0),
            threshold: Some(0.5),
            image: None,
            tensor: Some(TensorSpec {
                shape: vec![FAKE_DIMENSION],
            }),
        }
    }
}

impl Embedder for FakeEmbedder {
    fn space(&self, model: &str) -> Result<ModelDefaults> {
        match model {
            FAKE_MODEL => Ok(ModelDefaults {
                dimension: FAKE_DIMENSION,
                metric: Metric::Cosine,
                dbl_margin: Some(0.0),
                dbl_scale: Some(1.0),
                threshold: Some(0.5),
            }),
            FAKE_PAIR_MODEL => Err(Error::invalid(
                "model",
                format!("{model:?} is a pair model: it scores pairs and does not embed"),
            )),
            _ => Err(Error::not_found(format!("model {model:?}"))),
        }
    }

    fn pair_threshold(&self, model: &str) -> Result<f32> {
        match model {
            FAKE_PAIR_MODEL => Ok(0.9),
            FAKE_MODEL => Err(Error::invalid(
                "pair_model",
                format!("{model:?} is an embedder, not a pair model"),
            )),
            _ => Err(Error::not_found(format!("pair model {model:?}"))),
        }
    }

    fn embed<'a>(
        &'a self,
        model: &'a str,
        inputs: Vec<Input>,
        _wait: bool,
    ) -> BoxFuture<'a, Result<Vec<Vec<f32>>>> {
        Box::pin(async move {
            self.space(model)?;
            for (i, input) in inputs.iter().enumerate() {
                Self::check(Field::index(i), &input.data)?;
            }
            Ok(inputs.iter().map(|i| Self::vector(&i.data)).collect())
        })
    }

    fn score<'a>(
        &'a self,
        model: &'a str,
        pairs: Vec<(InputData, InputData)>,
        _wait: bool,
    ) -> BoxFuture<'a, Result<Vec<f32>>> {
        Box::pin(async move {
            self.pair_threshold(model)?;
            for (i, (a, b)) in pairs.iter().enumerate() {
                Self::check(Field::index(i).field("a"), a)?;
                Self::check(Field::index(i).field("b"), b)?;
            }
            Ok(pairs
                .iter()
                .map(|(a, b)| {
                    let cos: f32 = Self::vector(a)
                        .iter()
                        .zip(Self::vector(b))
                        .map(|(x, y)| x * y)
                        .sum();
                    (1.0 + cos) / 2.0
                })
                .collect())
        })
    }

    fn list(&self) -> Vec<ModelInfo> {
        [FAKE_MODEL, FAKE_PAIR_MODEL]
            .iter()
            .map(|m| self.info(m).expect("known model"))
            .collect()
    }

    fn info(&self, name: &str) -> Result<ModelInfo> {
        match name {
            FAKE_MODEL => Ok(ModelInfo {
                name: name.into(),
                version: "1".into(),
                dimension: FAKE_DIMENSION,
                towers: vec![TowerInfo {
                    spec: Self::tower(),
                    execution_provider: "fake".into(),
                }],
                pair: None,
                execution_provider: "fake".into(),
            }),
            FAKE_PAIR_MODEL => Ok(ModelInfo {
                name: name.into(),
                version: "1".into(),
                dimension: 0,
                towers: Vec::new(),
                pair: Some(PairSpec {
                    file: Default::default(),
                    inputs: ["a".into(), "b".into()],
                    output: "score".into(),
                    threshold: 0.9,
                    image: None,
                    tensor: Some(TensorSpec {
                        shape: vec![FAKE_DIMENSION],
                    }),
                }),
                execution_provider: "fake".into(),
            }),
            _ => Err(Error::not_found(format!("model {name:?}"))),
        }
    }
}
