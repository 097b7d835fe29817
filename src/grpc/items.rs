//! likeness.v1.Items: thin handlers over [`Db`]. Inputs (images, tensors) in items and
//! queries are embedded here, with the collection's model, before the Db sees vectors.

use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};

use super::convert::{self, QueryIn};
use super::{blocking, oversize_to_exhausted};
use crate::db::{Db, SampledPair, Undo};
use std::collections::HashMap;

use crate::embed::{Input, InputData, Models, PairModel, decode_input, encode_input};
use crate::error::{Error, Result};
use crate::pb;
use crate::pool::WorkPool;
use crate::types::{Hit, ItemData, QueryTarget, SearchParams};

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

/// Where a pair model's input comes from, to name it in errors.
struct RawInput {
    data: InputData,
    /// `query.input`, or `query.id` for an item's stored input.
    field: String,
}

impl ItemsService {
    /// The raw input a pair model scores for a query: the input sent, or the stored
    /// input of the item an id query names.
    async fn raw_input(&self, collection: &str, field: &str, q: &QueryIn) -> Result<RawInput> {
        match q {
            QueryIn::Input(input) => Ok(RawInput {
                data: input.data.clone(),
                field: format!("{field}.input"),
            }),
            QueryIn::Target(QueryTarget::Id(id)) => {
                let stored = self.stored_inputs(collection, vec![id.clone()]).await?;
                let field = format!("{field}.id");
                match stored.into_iter().next() {
                    None => Err(Error::NotFound(format!(
                        "{field}: item {id:?} in collection {collection:?}"
                    ))),
                    Some((_, None)) => Err(Error::invalid(
                        field,
                        format!("item {id:?} has no stored input for the pair model to score"),
                    )),
                    Some((_, Some(data))) => Ok(RawInput { data, field }),
                }
            }
            QueryIn::Target(QueryTarget::Vector(_)) => Err(Error::invalid(
                format!("{field}.vector"),
                "the collection's pair model scores inputs: send an input or an item id",
            )),
        }
    }

    /// The stored inputs of these items (those that exist), by id.
    async fn stored_inputs(
        &self,
        collection: &str,
        ids: Vec<String>,
    ) -> Result<Vec<(String, Option<InputData>)>> {
        let db = self.db.clone();
        let collection = collection.to_string();
        let items =
            tokio::task::spawn_blocking(move || db.get_items(&collection, &ids, false, true))
                .await??;
        Ok(items
            .into_iter()
            .map(|it| (it.id, it.input.as_deref().and_then(decode_input)))
            .collect())
    }

    /// The collection's pair model, for a request that needs one.
    fn pair_model(&self, collection: &str, field: &str) -> Result<Arc<PairModel>> {
        let spec = self.db.collection(collection)?.spec().clone();
        if spec.pair_model.is_empty() {
            return Err(Error::invalid(
                field,
                format!("collection {collection:?} has no pair model"),
            ));
        }
        self.models.pair(&spec.pair_model)
    }

    /// Scores each hit's stored input against the query's with the pair model; returns
    /// the k best scores (ties: the nearer first), then the hits that have no stored
    /// input, by distance.
    async fn rerank(
        &self,
        collection: &str,
        pair: &PairModel,
        query: &RawInput,
        hits: Vec<Hit>,
        k: usize,
    ) -> Result<Vec<Hit>> {
        if hits.is_empty() {
            return Ok(hits);
        }
        let ids: Vec<String> = hits.iter().map(|h| h.id.clone()).collect();
        let stored: HashMap<String, InputData> = self
            .stored_inputs(collection, ids)
            .await?
            .into_iter()
            .filter_map(|(id, input)| input.map(|i| (id, i)))
            .collect();
        let (mut scored, mut rest): (Vec<Hit>, Vec<Hit>) =
            hits.into_iter().partition(|h| stored.contains_key(&h.id));
        if !scored.is_empty() {
            let pairs = scored
                .iter()
                .map(|h| (query.data.clone(), stored[&h.id].clone()))
                .collect();
            let scores = pair.score(pairs, false).await.map_err(|e| {
                rename_pair_fields(e, |j, side| match side {
                    "a" => query.field.clone(),
                    _ => format!("stored input of item {:?}", scored[j].id),
                })
            })?;
            for (h, s) in scored.iter_mut().zip(scores) {
                h.pair_score = Some(s);
            }
            scored.sort_by(|a, b| {
                b.pair_score
                    .unwrap_or(f32::NEG_INFINITY)
                    .total_cmp(&a.pair_score.unwrap_or(f32::NEG_INFINITY))
                    .then(a.distance.total_cmp(&b.distance))
            });
        }
        scored.append(&mut rest);
        scored.truncate(k);
        Ok(scored)
    }

    /// Scores Calibrate's sampled pairs with the collection's pair model; returns the
    /// threshold with the best accuracy, that accuracy and the ROC AUC.
    async fn calibrate_pair(
        &self,
        collection: &str,
        sampled: Vec<SampledPair>,
    ) -> Result<(f32, f32, f32)> {
        let pair = self.pair_model(collection, "collection")?;
        let mut ids: Vec<String> = sampled
            .iter()
            .flat_map(|(a, b, _)| [a.clone(), b.clone()])
            .collect();
        ids.sort();
        ids.dedup();
        let stored: HashMap<String, Option<InputData>> = self
            .stored_inputs(collection, ids)
            .await?
            .into_iter()
            .collect();
        // Pairs with an item that keeps no input cannot be scored: left out.
        let (pairs, labels): (Vec<_>, Vec<bool>) = sampled
            .iter()
            .filter_map(|(a, b, same)| {
                let a = stored.get(a).cloned().flatten()?;
                let b = stored.get(b).cloned().flatten()?;
                Some(((a, b), *same))
            })
            .unzip();
        if !labels.contains(&true) || !labels.contains(&false) {
            return Err(Error::invalid(
                "collection",
                format!(
                    "{collection:?}: too few sampled items keep their inputs to calibrate the pair model"
                ),
            ));
        }
        // Calibration may score more pairs than the queue holds: wait for room.
        let mut scores = Vec::with_capacity(pairs.len());
        for chunk in pairs.chunks(1024) {
            scores.extend(pair.score(chunk.to_vec(), true).await?);
        }
        let scored: Vec<(f32, bool)> = scores.into_iter().zip(labels).collect();
        Ok(crate::db::fit_score_threshold(&scored))
    }

    /// One search: ANN (or exact) by distance, then the pair model's re-ranking when
    /// `params.rerank` asks for it.
    async fn search_one(
        &self,
        collection: &str,
        field: &str,
        query: QueryIn,
        params: SearchParams,
    ) -> Result<Vec<Hit>> {
        let rerank = if params.rerank > 0 {
            if params.k == 0 {
                return Err(Error::invalid("k", "must be at least 1"));
            }
            let pair = self.pair_model(collection, "rerank")?;
            let raw = self.raw_input(collection, field, &query).await?;
            Some((pair, raw))
        } else {
            None
        };
        let target = self.query(collection, field, query).await?;
        let k = params.k;
        let mut p = params;
        p.k = p.k.max(p.rerank);
        let db = self.db.clone();
        let (name, f) = (collection.to_string(), field.to_string());
        let hits = self
            .searches
            .run(move || db.search_as(&name, &f, &target, &p))
            .await?;
        match rerank {
            Some((pair, raw)) => self.rerank(collection, &pair, &raw, hits, k).await,
            None => Ok(hits),
        }
    }
}

/// Rewrites `pairs[j].a...` / `pairs[j].b...` in a pair model's error to the caller's
/// field for that side of pair j.
fn rename_pair_fields(e: Error, field: impl Fn(usize, &str) -> String) -> Error {
    let fix = |s: &str| -> Option<String> {
        let rest = s.strip_prefix("pairs[")?;
        let (j, tail) = rest.split_once(']')?;
        let tail = tail.strip_prefix('.')?;
        let side = tail.get(..1)?;
        let tail = &tail[1..];
        Some(format!("{}{tail}", field(j.parse().ok()?, side)))
    };
    match e {
        Error::InvalidArgument { field: f, reason } => Error::InvalidArgument {
            field: fix(&f).unwrap_or(f),
            reason,
        },
        Error::Model(m) => Error::Model(fix(&m).unwrap_or(m)),
        other => other,
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
        let hits = self.search_one(&collection, "query", query, params).await?;
        Ok(Response::new(convert::hits_to(hits)))
    }

    async fn search_batch(
        &self,
        request: Request<pb::SearchBatchRequest>,
    ) -> Result<Response<pb::SearchBatchResponse>, Status> {
        let (collection, queries, params) = convert::search_batch_request(request.into_inner())?;
        if params.rerank > 0 && !queries.is_empty() && queries.len() <= self.db.limits().max_batch {
            // Re-ranking scores every query's hits with the pair model: one at a time.
            let mut results = Vec::with_capacity(queries.len());
            for (i, q) in queries.into_iter().enumerate() {
                let hits = self
                    .search_one(&collection, &format!("queries[{i}]"), q, params.clone())
                    .await?;
                results.push(convert::hits_to(hits));
            }
            return Ok(Response::new(pb::SearchBatchResponse { results }));
        }
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
        // With a pair model, its decision is the answer; both sides need raw inputs.
        let info = self.db.collection(&collection)?.info();
        let pair = if !info.spec.pair_model.is_empty() {
            let model = self.pair_model(&collection, "collection")?;
            let ra = self.raw_input(&collection, "a", &a).await?;
            let rb = self.raw_input(&collection, "b", &b).await?;
            // The collection's calibrated threshold, else the model's own.
            let threshold = info.spec.pair_threshold.unwrap_or(model.threshold());
            Some((model, ra, rb, threshold))
        } else {
            None
        };
        let a = self.query(&collection, "a", a).await?;
        let b = self.query(&collection, "b", b).await?;
        let db = self.db.clone();
        let v = blocking(move || db.verify(&collection, &a, &b)).await?;
        let mut out = pb::VerifyResponse {
            distance: v.distance,
            similarity: v.similarity,
            probability: v.probability,
            same: v.same,
            pair_score: None,
        };
        if let Some((model, ra, rb, threshold)) = pair {
            let score = model
                .score(vec![(ra.data.clone(), rb.data.clone())], false)
                .await
                .map_err(|e| {
                    rename_pair_fields(e, |_, side| {
                        if side == "a" {
                            ra.field.clone()
                        } else {
                            rb.field.clone()
                        }
                    })
                })?[0];
            out.pair_score = Some(score);
            out.same = score >= threshold;
        }
        Ok(Response::new(out))
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
        let name = collection.clone();
        let (c, sampled) = blocking(move || db.calibrate(&name, pairs, seed)).await?;
        let mut out = pb::CalibrateResponse {
            dbl_margin: c.dbl_margin,
            threshold: c.threshold,
            accuracy: c.accuracy,
            roc_auc: c.roc_auc,
            pairs: c.pairs,
            dbl_scale: c.dbl_scale,
            pair_threshold: None,
            pair_accuracy: 0.0,
            pair_roc_auc: 0.0,
        };
        if !self
            .db
            .collection(&collection)?
            .spec()
            .pair_model
            .is_empty()
        {
            let (t, acc, auc) = self.calibrate_pair(&collection, sampled).await?;
            out.pair_threshold = Some(t);
            out.pair_accuracy = acc;
            out.pair_roc_auc = auc;
        }
        // Stored only once everything is fitted: a failed Calibrate changes nothing.
        let (db, pair_threshold) = (self.db.clone(), out.pair_threshold);
        blocking(move || db.store_calibration(&collection, &c, pair_threshold)).await?;
        Ok(Response::new(out))
    }
}
