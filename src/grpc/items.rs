//! likeness.v1.Items: thin handlers over [`Db`]. Inputs (images, tensors) in items and
//! queries are embedded here, with the collection's model, before the Db sees vectors.

use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};

use super::convert::{self, QueryIn};
use super::{blocking, oversize_to_exhausted};
use crate::db::{Db, Undo};
use crate::embed::{Input, Models, encode_input};
use crate::error::{Error, Result};
use crate::pb;
use crate::pool::WorkPool;
use crate::types::{ItemData, QueryTarget};

pub struct ItemsService {
    pub db: Arc<Db>,
    pub models: Arc<Models>,
    /// Runs searches off the async workers, on as many threads as cores.
    pub searches: Arc<WorkPool>,
}

impl ItemsService {
    /// Converts items, embedding those sent with an input instead of a vector, and
    /// keeping raw inputs where the collection keeps them. `wait`: a stream waits for
    /// room in the embedding queue instead of failing.
    async fn items(
        &self,
        collection: &str,
        items: Vec<pb::Item>,
        wait: bool,
    ) -> Result<Vec<ItemData>> {
        let mut out = Vec::with_capacity(items.len());
        let mut to_embed: Vec<(usize, Input)> = Vec::new();
        let mut inputs: Vec<(usize, Input)> = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            let (data, input) = convert::item_from(&format!("items[{i}]"), item)?;
            if let Some(input) = input {
                if data.vector.is_empty() {
                    to_embed.push((i, input.clone()));
                }
                inputs.push((i, input));
            }
            out.push(data);
        }
        if inputs.is_empty() {
            return Ok(out);
        }
        let spec = self.db.collection(collection)?.spec().clone();
        if spec.keep_inputs {
            for (i, input) in &inputs {
                out[*i].input = Some(encode_input(&input.data));
            }
        }
        if !to_embed.is_empty() {
            if spec.model.is_empty() {
                let i = to_embed[0].0;
                return Err(Error::invalid(
                    format!("items[{i}].input"),
                    format!(
                        "collection {collection:?} has no model to embed inputs; send a vector"
                    ),
                ));
            }
            let model = self.models.get(&spec.model)?;
            let (index, batch): (Vec<usize>, Vec<Input>) = to_embed.into_iter().unzip();
            let vectors = model
                .embed(batch, wait)
                .await
                .map_err(|e| renumber(e, |j| format!("items[{}].input", index[j])))?;
            for (i, v) in index.into_iter().zip(vectors) {
                out[i].vector = v;
            }
        }
        Ok(out)
    }

    /// A query's target: inputs are embedded with the collection's model.
    async fn query(&self, collection: &str, field: &str, q: QueryIn) -> Result<QueryTarget> {
        match q {
            QueryIn::Target(t) => Ok(t),
            QueryIn::Input(input) => {
                let spec = self.db.collection(collection)?.spec().clone();
                if spec.model.is_empty() {
                    return Err(Error::invalid(
                        format!("{field}.input"),
                        format!(
                            "collection {collection:?} has no model to embed inputs; send a vector"
                        ),
                    ));
                }
                let model = self.models.get(&spec.model)?;
                let mut v = model
                    .embed(vec![input], false)
                    .await
                    .map_err(|e| renumber(e, |_| format!("{field}.input")))?;
                Ok(QueryTarget::Vector(v.remove(0)))
            }
        }
    }
}

/// Rewrites `inputs[j]...` in an embedder error to the caller's field for input j.
fn renumber(e: Error, field: impl Fn(usize) -> String) -> Error {
    let fix = |s: &str| -> Option<String> {
        let rest = s.strip_prefix("inputs[")?;
        let (j, tail) = rest.split_once(']')?;
        Some(format!("{}{tail}", field(j.parse().ok()?)))
    };
    match e {
        Error::InvalidArgument { field: f, reason } => Error::InvalidArgument {
            field: fix(&f).unwrap_or(f),
            reason,
        },
        Error::NotFound(m) => Error::NotFound(fix(&m).unwrap_or(m)),
        other => other,
    }
}

#[tonic::async_trait]
impl pb::items_server::Items for ItemsService {
    async fn upsert(
        &self,
        request: Request<pb::UpsertRequest>,
    ) -> Result<Response<pb::UpsertResponse>, Status> {
        let pb::UpsertRequest { collection, items } = request.into_inner();
        let items = self.items(&collection, items, false).await?;
        let db = self.db.clone();
        let n = blocking(move || db.upsert(&collection, items)).await?;
        Ok(Response::new(pb::UpsertResponse { upserted: n as u64 }))
    }

    async fn upsert_stream(
        &self,
        request: Request<Streaming<pb::UpsertRequest>>,
    ) -> Result<Response<pb::UpsertResponse>, Status> {
        let mut stream = request.into_inner();
        let mut undo = Undo::default();
        let mut total = 0u64;
        let mut index = 0usize;
        let failure: Status = loop {
            let msg = match stream.message().await {
                Ok(Some(msg)) => msg,
                Ok(None) => break Status::ok(""),
                Err(status) => break oversize_to_exhausted(status),
            };
            let pb::UpsertRequest { collection, items } = msg;
            let prefix = format!("messages[{index}].");
            let items = match self.items(&collection, items, true).await {
                Ok(items) => items,
                Err(e) => break e.within(&prefix).into(),
            };
            let db = self.db.clone();
            let (result, back) = blocking(move || {
                let r = db.upsert_staged(&collection, items, &mut undo);
                Ok((r, undo))
            })
            .await?;
            undo = back;
            match result {
                Ok(n) => total += n as u64,
                Err(e) => break e.within(&prefix).into(),
            }
            index += 1;
        };
        let db = self.db.clone();
        if failure.code() == tonic::Code::Ok {
            blocking(move || db.commit()).await?;
            return Ok(Response::new(pb::UpsertResponse { upserted: total }));
        }
        tracing::info!(messages = index, error = %failure.message(), "UpsertStream failed; rolling back");
        blocking(move || db.rollback(undo)).await?;
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
        let db = self.db.clone();
        let items =
            blocking(move || db.get_items(&collection, &ids, with_vectors, with_inputs)).await?;
        Ok(Response::new(pb::GetResponse {
            items: items.into_iter().map(convert::item_to).collect(),
        }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let pb::DeleteRequest { collection, ids } = request.into_inner();
        let db = self.db.clone();
        let n = blocking(move || db.delete_items(&collection, &ids)).await?;
        Ok(Response::new(pb::DeleteResponse { deleted: n as u64 }))
    }

    async fn search(
        &self,
        request: Request<pb::SearchRequest>,
    ) -> Result<Response<pb::SearchResponse>, Status> {
        let (collection, query, params) = convert::search_request(request.into_inner())?;
        let query = self.query(&collection, "query", query).await?;
        let db = self.db.clone();
        let hits = self
            .searches
            .run(move || db.search(&collection, &query, &params))
            .await?;
        Ok(Response::new(convert::hits_to(hits)))
    }

    async fn search_batch(
        &self,
        request: Request<pb::SearchBatchRequest>,
    ) -> Result<Response<pb::SearchBatchResponse>, Status> {
        let (collection, queries, params) = convert::search_batch_request(request.into_inner())?;
        let mut targets = Vec::with_capacity(queries.len());
        for (i, q) in queries.into_iter().enumerate() {
            targets.push(self.query(&collection, &format!("queries[{i}]"), q).await?);
        }
        let db = self.db.clone();
        let results = self
            .searches
            .run(move || db.search_batch(&collection, &targets, &params))
            .await?;
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
        let query = convert::query_from("query", query)?;
        let query = self.query(&collection, "query", query).await?;
        let k = if k == 0 { 10 } else { k as usize };
        let db = self.db.clone();
        let c = self
            .searches
            .run(move || db.classify(&collection, &query, k))
            .await?;
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
        let a = convert::query_from("a", a)?;
        let b = convert::query_from("b", b)?;
        let a = self.query(&collection, "a", a).await?;
        let b = self.query(&collection, "b", b).await?;
        let db = self.db.clone();
        let v = blocking(move || db.verify(&collection, &a, &b)).await?;
        Ok(Response::new(pb::VerifyResponse {
            distance: v.distance,
            similarity: v.similarity,
            probability: v.probability,
            same: v.same,
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
        let pairs = match pairs {
            0 => 2000,
            n if n > 1_000_000 => {
                return Err(Error::invalid("pairs", format!("{n} exceeds 1000000")).into());
            }
            n => n as usize,
        };
        let db = self.db.clone();
        let c = blocking(move || db.calibrate(&collection, pairs, seed)).await?;
        Ok(Response::new(pb::CalibrateResponse {
            dbl_margin: c.dbl_margin,
            threshold: c.threshold,
            accuracy: c.accuracy,
            roc_auc: c.roc_auc,
            pairs: c.pairs,
        }))
    }
}
