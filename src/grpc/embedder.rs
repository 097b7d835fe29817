//! likeness.v1.Embedder and likeness.v1.Models: convert -> embedder -> convert.
//! They need the models only, not the store, so the embed-only mode serves them alone.

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::oversize_to_exhausted;
use crate::embed::manifest::{ImageSpec, PairSpec, TowerSpec};
use std::sync::Arc;

use crate::app::App;
use crate::embed::publish::{ModelStore, Upload};
use crate::embed::{EmbedHandle, Input, ModelInfo};
use crate::error::{Error, Field, Result};
use crate::grpc::pb;

pub struct EmbedderService {
    pub embedder: EmbedHandle,
}

pub struct ModelsService {
    pub embedder: EmbedHandle,
    /// Where Publish keeps models; None in the embed-only mode (no data dir).
    pub store: Option<Arc<ModelStore>>,
    /// The collections Activate re-embeds; None in the embed-only mode.
    pub app: Option<Arc<App>>,
}

impl ModelsService {
    /// Reads a Publish stream into one upload, refusing it as soon as it grows past
    /// the size limit.
    async fn receive(
        store: &ModelStore,
        mut chunks: Streaming<pb::ModelChunk>,
    ) -> Result<Upload, Status> {
        let mut upload = Upload::default();
        while let Some(chunk) = chunks.message().await.map_err(oversize_to_exhausted)? {
            let pb::ModelChunk {
                name,
                manifest,
                bytes,
            } = chunk;
            upload.push(name, manifest, &bytes, store.max_bytes())?;
        }
        upload.finish()?;
        Ok(upload)
    }
}

fn inputs_from(inputs: Vec<pb::Input>) -> Result<Vec<Input>> {
    inputs
        .into_iter()
        .enumerate()
        .map(|(i, input)| super::convert::input_from(Field::name("inputs").at(i), input))
        .collect()
}

async fn embed(
    embedder: &EmbedHandle,
    req: pb::EmbedRequest,
    wait: bool,
) -> Result<pb::EmbedResponse> {
    let pb::EmbedRequest { model, inputs } = req;
    if inputs.is_empty() {
        return Err(Error::invalid("inputs", "must not be empty"));
    }
    let inputs = inputs_from(inputs)?;
    let vectors = embedder
        .embed(&model, inputs, wait)
        .await
        .map_err(|e| e.rebase(|i| Field::name("inputs").at(i)))?;
    Ok(pb::EmbedResponse {
        embeddings: vectors
            .into_iter()
            .map(|values| pb::Vector { values })
            .collect(),
    })
}

type EmbedStream = Pin<Box<dyn Stream<Item = Result<pb::EmbedResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::embedder_server::Embedder for EmbedderService {
    async fn embed(
        &self,
        request: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        Ok(Response::new(
            embed(&self.embedder, request.into_inner(), false).await?,
        ))
    }

    type EmbedStreamStream = EmbedStream;

    async fn embed_stream(
        &self,
        request: Request<Streaming<pb::EmbedRequest>>,
    ) -> Result<Response<Self::EmbedStreamStream>, Status> {
        let mut stream = request.into_inner();
        let embedder = self.embedder.clone();
        // Requests are embedded one after another, so answers come in request order;
        // each request's inputs are batched with everyone else's.
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut index = 0usize;
            loop {
                let msg = match stream.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => return,
                    Err(status) => {
                        let _ = tx.send(Err(oversize_to_exhausted(status))).await;
                        return;
                    }
                };
                let result = embed(&embedder, msg, true)
                    .await
                    .map_err(|e| Status::from(e.under(&Field::name("messages").at(index))));
                let failed = result.is_err();
                if tx.send(result).await.is_err() || failed {
                    return;
                }
                index += 1;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

fn image_spec_to(img: ImageSpec) -> pb::ImageInputSpec {
    let ImageSpec {
        channels,
        height,
        width,
        resize,
        mean,
        std,
    } = img;
    pb::ImageInputSpec {
        channels,
        height,
        width,
        resize: resize.as_str().to_string(),
        mean,
        std,
    }
}

fn info_to(info: ModelInfo) -> pb::ModelInfo {
    let ModelInfo {
        name,
        version,
        dimension,
        towers,
        pair,
        execution_provider,
    } = info;
    let pair = pair.map(|p| {
        let PairSpec {
            file: _,
            inputs,
            output,
            threshold,
            image,
            tensor,
        } = p;
        pb::PairInfo {
            input_names: inputs.to_vec(),
            output_name: output,
            input: match (image, tensor) {
                (Some(img), _) => Some(pb::pair_info::Input::Image(image_spec_to(img))),
                (None, Some(t)) => Some(pb::pair_info::Input::Tensor(pb::TensorInputSpec {
                    shape: t.shape,
                })),
                (None, None) => None,
            },
            threshold,
        }
    });
    pb::ModelInfo {
        name,
        version,
        dimension,
        kind: if pair.is_some() { "pair" } else { "embedder" }.into(),
        pair,
        execution_provider,
        towers: towers
            .into_iter()
            .map(|t| {
                let TowerSpec {
                    name,
                    file: _,
                    input,
                    output,
                    dimension,
                    normalize,
                    metric,
                    dbl_margin,
                    dbl_scale,
                    threshold,
                    image,
                    tensor,
                } = t.spec;
                pb::TowerInfo {
                    name,
                    input_name: input,
                    output_name: output,
                    dimension,
                    normalize,
                    metric: super::convert::metric_to(metric) as i32,
                    input: match (image, tensor) {
                        (Some(img), _) => Some(pb::tower_info::Input::Image(image_spec_to(img))),
                        (None, Some(t)) => {
                            Some(pb::tower_info::Input::Tensor(pb::TensorInputSpec {
                                shape: t.shape,
                            }))
                        }
                        (None, None) => None,
                    },
                    dbl_margin: dbl_margin.unwrap_or(0.0),
                    dbl_scale: dbl_scale.unwrap_or(0.0),
                    threshold: threshold.unwrap_or(0.0),
                    execution_provider: t.execution_provider,
                }
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl pb::models_server::Models for ModelsService {
    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let pb::ListModelsRequest {} = request.into_inner();
        Ok(Response::new(pb::ListModelsResponse {
            models: self.embedder.list().into_iter().map(info_to).collect(),
        }))
    }

    async fn get_model(
        &self,
        request: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let pb::GetModelRequest { name } = request.into_inner();
        Ok(Response::new(info_to(self.embedder.info(&name)?)))
    }

    async fn publish(
        &self,
        request: Request<Streaming<pb::ModelChunk>>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let Some(store) = self.store.clone() else {
            return Err(Error::FailedPrecondition(
                "this daemon runs embed-only, with no data dir to keep models in; publish to an index daemon".into(),
            )
            .into());
        };
        let upload = Self::receive(&store, request.into_inner()).await?;
        let embedder = self.embedder.clone();
        let info = crate::pool::blocking(move || store.publish(&*embedder, upload)).await?;
        Ok(Response::new(info_to(info)))
    }

    async fn activate(
        &self,
        request: Request<pb::ActivateRequest>,
    ) -> Result<Response<pb::CollectionInfo>, Status> {
        let Some(app) = &self.app else {
            return Err(Error::FailedPrecondition(
                "this daemon runs embed-only: it has no collections to activate a model for".into(),
            )
            .into());
        };
        let pb::ActivateRequest {
            collection,
            model,
            version,
        } = request.into_inner();
        let info = app
            .activations()
            .activate(&collection, &model, &version)
            .await?;
        Ok(Response::new(super::convert::collection_info(info)))
    }
}
