//! The embedder behind a small trait, so that the application layer does not care
//! whether vectors come from ONNX Runtime ([`Models`]) or from a fake that tests use where
//! the model is beside the point ([`super::fake::FakeEmbedder`]).
//!
//! [`EmbedHandle`] is the cloneable handle the rest of the daemon holds. Calls carry the
//! caller's tracing span into the batch worker threads (see `Job::span`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::manifest::Manifest;
use super::{BatchStats, Input, InputData, ModelInfo, Models};
use crate::error::Result;
use crate::types::ModelDefaults;

/// A boxed future, as the trait's async methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the daemon needs from a set of models.
pub trait Embedder: Send + Sync + 'static {
    /// The embedding space of embedder `model` (NotFound, or InvalidArgument for a pair
    /// model).
    fn space(&self, model: &str) -> Result<ModelDefaults>;

    /// The "same" threshold of pair model `model` (NotFound, or InvalidArgument for an
    /// embedder).
    fn pair_threshold(&self, model: &str) -> Result<f32>;

    /// Embeds `inputs` with `model`, in order. A bad input's field is rooted at its
    /// index (`[2].image`). `wait`: wait for room in a full queue instead of
    /// RESOURCE_EXHAUSTED.
    fn embed<'a>(
        &'a self,
        model: &'a str,
        inputs: Vec<Input>,
        wait: bool,
    ) -> BoxFuture<'a, Result<Vec<Vec<f32>>>>;

    /// Scores pairs with pair model `model`; a bad side is named `[i].a` or `[i].b`.
    fn score<'a>(
        &'a self,
        model: &'a str,
        pairs: Vec<(InputData, InputData)>,
        wait: bool,
    ) -> BoxFuture<'a, Result<Vec<f32>>>;

    /// Every model, by name.
    fn list(&self) -> Vec<ModelInfo>;

    /// One model.
    fn info(&self, name: &str) -> Result<ModelInfo>;

    /// Loads one more model under `name` (Models.Publish). Embedders that cannot load
    /// models at run time refuse with FAILED_PRECONDITION.
    fn add(&self, name: &str, manifest: Manifest) -> Result<ModelInfo> {
        let _ = manifest;
        Err(crate::error::Error::FailedPrecondition(format!(
            "this daemon's embedder cannot load model {name:?} at run time"
        )))
    }

    /// Per graph, how many batches ran and how many jobs they held (empty where the
    /// embedder does not batch).
    fn batch_stats(&self) -> Vec<(String, Arc<BatchStats>)> {
        Vec::new()
    }
}

/// A cloneable handle on an [`Embedder`].
#[derive(Clone)]
pub struct EmbedHandle(Arc<dyn Embedder>);

impl EmbedHandle {
    pub fn new(embedder: impl Embedder) -> Self {
        EmbedHandle(Arc::new(embedder))
    }
}

impl std::ops::Deref for EmbedHandle {
    type Target = dyn Embedder;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl Embedder for Models {
    fn space(&self, model: &str) -> Result<ModelDefaults> {
        let m = self.get(model)?;
        let t = m.primary();
        Ok(ModelDefaults {
            dimension: m.dimension(),
            metric: t.metric,
            dbl_margin: t.dbl_margin,
            dbl_scale: t.dbl_scale,
            threshold: t.threshold,
        })
    }

    fn pair_threshold(&self, model: &str) -> Result<f32> {
        Ok(self.pair(model)?.threshold())
    }

    fn embed<'a>(
        &'a self,
        model: &'a str,
        inputs: Vec<Input>,
        wait: bool,
    ) -> BoxFuture<'a, Result<Vec<Vec<f32>>>> {
        Box::pin(async move { self.get(model)?.embed(inputs, wait).await })
    }

    fn score<'a>(
        &'a self,
        model: &'a str,
        pairs: Vec<(InputData, InputData)>,
        wait: bool,
    ) -> BoxFuture<'a, Result<Vec<f32>>> {
        Box::pin(async move { self.pair(model)?.score(pairs, wait).await })
    }

    fn list(&self) -> Vec<ModelInfo> {
        Models::list(self)
    }

    fn info(&self, name: &str) -> Result<ModelInfo> {
        Models::info(self, name)
    }

    fn add(&self, name: &str, manifest: Manifest) -> Result<ModelInfo> {
        Models::add(self, name, manifest)
    }

    fn batch_stats(&self) -> Vec<(String, Arc<BatchStats>)> {
        Models::batch_stats(self)
    }
}
