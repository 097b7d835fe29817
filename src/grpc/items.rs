//! likeness.v1.Items: convert -> [`App`] -> convert.

use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};

use super::convert;
use super::oversize_to_exhausted;
use crate::app::App;
use crate::error::{Error, Field};
use crate::grpc::pb;
use crate::types::NewItem;

pub struct ItemsService {
    pub app: Arc<App>,
}

fn items_from(items: Vec<pb::Item>) -> Result<Vec<NewItem>, Error> {
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| convert::item_from(Field::name("items").at(i), item))
        .collect()
}

#[tonic::async_trait]
impl pb::items_server::Items for ItemsService {
    async fn upsert(
        &self,
        request: Request<pb::UpsertRequest>,
    ) -> Result<Response<pb::UpsertResponse>, Status> {
        let pb::UpsertRequest { collection, items } = request.into_inner();
        let n = self.app.upsert(&collection, items_from(items)?).await?;
        Ok(Response::new(pb::UpsertResponse { upserted: n as u64 }))
    }

    async fn upsert_stream(
        &self,
        request: Request<Streaming<pb::UpsertRequest>>,
    ) -> Result<Response<pb::UpsertResponse>, Status> {
        let mut messages = request.into_inner();
        // Rolls back on drop: a client that cancels, or anything that ends this handler
        // early, leaves nothing of the stream behind.
        let mut stream = self.app.begin_stream()?;
        let mut total = 0u64;
        let mut index = 0usize;
        let failure: Status = loop {
            let msg = match messages.message().await {
                Ok(Some(msg)) => msg,
                Ok(None) => {
                    self.app.commit_stream(stream).await?;
                    return Ok(Response::new(pb::UpsertResponse { upserted: total }));
                }
                Err(status) => break oversize_to_exhausted(status),
            };
            let pb::UpsertRequest { collection, items } = msg;
            let items = match items_from(items) {
                Ok(items) => items,
                Err(e) => break e.under(&Field::name("messages").at(index)).into(),
            };
            match self.app.stage(&mut stream, &collection, items).await {
                Ok(n) => total += n as u64,
                Err(e) => break e.into(),
            }
            index += 1;
        };
        tracing::info!(messages = index, error = %failure.message(), "UpsertStream failed; rolling back");
        self.app.rollback_stream(stream).await?;
        Err(failure)
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let pb::GetRequest {
            collection,
            ids,
            with_vectors,
            with_inputs,
        } = request.into_inner();
        let items = self
            .app
            .get(&collection, ids, with_vectors, with_inputs)
            .await?;
        Ok(Response::new(pb::GetResponse {
            items: items.into_iter().map(convert::item_to).collect(),
        }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let pb::DeleteRequest { collection, ids } = request.into_inner();
        let n = self.app.delete_items(&collection, ids).await?;
        Ok(Response::new(pb::DeleteResponse { deleted: n as u64 }))
    }

    async fn search(
        &self,
        request: Request<pb::SearchRequest>,
    ) -> Result<Response<pb::SearchResponse>, Status> {
        let (collection, query, params) = convert::search_request(request.into_inner())?;
        let hits = self.app.search(&collection, query, params).await?;
        Ok(Response::new(convert::hits_to(hits)))
    }

    async fn search_batch(
        &self,
        request: Request<pb::SearchBatchRequest>,
    ) -> Result<Response<pb::SearchBatchResponse>, Status> {
        let (collection, queries, params) = convert::search_batch_request(request.into_inner())?;
        let results = self.app.search_batch(&collection, queries, params).await?;
        Ok(Response::new(pb::SearchBatchResponse {
            results: results.into_iter().map(convert::hits_to).collect(),
        }))
    }

    async fn classify(
        &self,
        request: Request<pb::ClassifyRequest>,
    ) -> Result<Response<pb::ClassifyResponse>, Status> {
        let pb::ClassifyRequest {
            collection,
            query,
            k,
        } = request.into_inner();
        let query = convert::query_from(Field::name("query"), query)?;
        let c = self.app.classify(&collection, query, k).await?;
        Ok(Response::new(pb::ClassifyResponse {
            label: c.label,
            confidence: c.confidence,
            votes: c
                .votes
                .into_iter()
                .map(|(label, weight, count)| pb::Vote {
                    label,
                    weight,
                    count,
                })
                .collect(),
        }))
    }

    async fn verify(
        &self,
        request: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let pb::VerifyRequest { collection, a, b } = request.into_inner();
        let a = convert::query_from(Field::name("a"), a)?;
        let b = convert::query_from(Field::name("b"), b)?;
        let v = self.app.verify(&collection, a, b).await?;
        Ok(Response::new(pb::VerifyResponse {
            distance: v.distance,
            similarity: v.similarity,
            probability: v.probability,
            same: v.same,
            pair_score: v.pair_score,
        }))
    }

    async fn calibrate(
        &self,
        request: Request<pb::CalibrateRequest>,
    ) -> Result<Response<pb::CalibrateResponse>, Status> {
        let pb::CalibrateRequest {
            collection,
            pairs,
            seed,
        } = request.into_inner();
        let c = self.app.calibrate(&collection, pairs, seed).await?;
        let (pair_threshold, pair_accuracy, pair_roc_auc) = match c.pair {
            Some((t, acc, auc)) => (Some(t), acc, auc),
            None => (None, 0.0, 0.0),
        };
        Ok(Response::new(pb::CalibrateResponse {
            dbl_margin: c.dbl_margin,
            threshold: c.threshold,
            accuracy: c.accuracy,
            roc_auc: c.roc_auc,
            pairs: c.pairs,
            dbl_scale: c.dbl_scale,
            pair_threshold,
            pair_accuracy,
            pair_roc_auc,
        }))
    }
}
