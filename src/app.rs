//! The application layer: what a request means, across the collections and the models.
//! It embeds what needs embedding (every input of a request in one call, after the
//! request is validated, so an invalid batch never pays for inference), keeps raw inputs
//! where the collection keeps them, and composes search with the judge: re-ranking,
//! classification, verification, calibration.
//!
//! gRPC handlers are convert -> [`App`] -> convert; the miner calls the same methods.
//! A request resolves its collection once and passes the `Arc<Collection>` down.
//! Blocking work (disk, HNSW) runs off the async workers: searches on the search pool
//! (bounded, RESOURCE_EXHAUSTED when full), writes on tokio's blocking threads.

use std::collections::HashMap;
use std::sync::Arc;

use crate::activation::{ActivationInfo, Activations, State};
use crate::collections::{
    Collection, CollectionInfo, CreateCollection, Registry, StreamTxn, validate,
};
use crate::embed::{EmbedHandle, Input, InputData};
use crate::error::{Error, Field, Result};
use crate::judge::{self, Calibration, Classification, RawInput, Verification};
use crate::mine::Miner;
use crate::pool::{WorkPool, blocking};
use crate::store::codec::encode_input;
use crate::types::{Hit, ItemData, NewItem, Query, QueryTarget, SearchParams};

pub struct App {
    registry: Arc<Registry>,
    embedder: EmbedHandle,
    searches: Arc<WorkPool>,
    miner: Miner,
    metrics: Arc<crate::metrics::Registry>,
    activations: Arc<Activations>,
}

/// An UpsertStream in progress (see [`StreamTxn`]): dropped before [`App::commit_stream`],
/// it rolls back.
pub struct UpsertStream {
    txn: Option<StreamTxn>,
    messages: usize,
}

impl App {
    pub fn new(registry: Arc<Registry>, embedder: EmbedHandle, searches: Arc<WorkPool>) -> Self {
        let activations = Arc::new(Activations::new(registry.clone(), embedder.clone()));
        // A Session's write-back is a vector-only write: refused, as Upsert refuses
        // one, while its collection is being re-embedded with another model.
        let gate = {
            let activations = activations.clone();
            Arc::new(move |collection: &str| {
                if activations.running(collection) {
                    return Err(Error::FailedPrecondition(format!(
                        "collection {collection:?} is being re-embedded with another model; write-back resumes once it switches"
                    )));
                }
                Ok(())
            })
        };
        App {
            miner: Miner::new(registry.clone(), searches.clone()).with_write_gate(gate),
            metrics: Arc::default(),
            activations,
            registry,
            embedder,
            searches,
        }
    }

    /// The daemon's own metrics (per-RPC counts and latency, recovery time, the metrics
    /// port once bound).
    pub fn metrics(&self) -> &Arc<crate::metrics::Registry> {
        &self.metrics
    }

    /// Mining jobs over the collections (on the search pool).
    pub fn miner(&self) -> &Miner {
        &self.miner
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn embedder(&self) -> &EmbedHandle {
        &self.embedder
    }

    pub fn searches(&self) -> &Arc<WorkPool> {
        &self.searches
    }

    /// Re-embeddings to another model (Models.Activate), running or finished.
    pub fn activations(&self) -> &Arc<Activations> {
        &self.activations
    }

    // Collections.

    /// Creates a collection, taking dimension, metric and the logistic from its model.
    pub async fn create_collection(&self, mut req: CreateCollection) -> Result<CollectionInfo> {
        if !req.pair_model.is_empty() {
            self.embedder
                .pair_threshold(&req.pair_model)
                .map_err(|e| match e {
                    Error::NotFound { what, .. } => Error::not_found_at("pair_model", what),
                    other => other,
                })?;
        }
        if !req.model.is_empty() {
            req.model_defaults = Some(self.embedder.space(&req.model)?);
        }
        let registry = self.registry.clone();
        blocking(move || registry.create(req)).await
    }

    pub fn collection_info(&self, name: &str) -> Result<CollectionInfo> {
        // The activation first: see [`with_activation`].
        let activation = self.activations.info(name);
        let mut info = self.registry.collection(name)?.info();
        with_activation(&mut info, activation);
        Ok(info)
    }

    pub fn list_collections(&self) -> Result<Vec<CollectionInfo>> {
        let mut activations = self.activations.all();
        let mut all = self.registry.list()?;
        for info in &mut all {
            with_activation(info, activations.remove(&info.spec.name));
        }
        Ok(all)
    }

    pub async fn delete_collection(&self, name: String) -> Result<u64> {
        let registry = self.registry.clone();
        blocking(move || registry.delete(&name)).await
    }

    /// An online backup of every collection (see [`Registry::backup`]).
    pub async fn backup(&self, path: String) -> Result<crate::collections::BackupInfo> {
        let registry = self.registry.clone();
        blocking(move || registry.backup(&path)).await
    }

    // Writes.

    /// Inserts or replaces items, embedding those sent with an input; durable on return.
    /// A write that meets a switch to a new generation (Activate) is made again, from
    /// the inputs, against the new one.
    pub async fn upsert(&self, collection: &str, items: Vec<NewItem>) -> Result<usize> {
        loop {
            let coll = self.registry.collection(collection)?;
            let prepared = self.prepare_items(&coll, items.clone(), false).await?;
            let registry = self.registry.clone();
            let target = coll.clone();
            match blocking(move || registry.upsert(&target, &prepared)).await {
                Err(_) if coll.superseded() => continue,
                other => return other,
            }
        }
    }

    pub fn begin_stream(&self) -> Result<UpsertStream> {
        Ok(UpsertStream {
            txn: Some(self.registry.begin_stream()?),
            messages: 0,
        })
    }

    /// One message of an UpsertStream: applied (visible) now, durable at commit. Errors
    /// name the message (`messages[3].items[0].id`). A stream waits for room in the
    /// embedding queue rather than failing.
    pub async fn stage(
        &self,
        stream: &mut UpsertStream,
        collection: &str,
        items: Vec<NewItem>,
    ) -> Result<usize> {
        let at = Field::name("messages").at(stream.messages);
        let result = async {
            let coll = self.registry.collection(collection)?;
            let items = self.prepare_items(&coll, items, true).await?;
            let txn = stream
                .txn
                .take()
                .ok_or_else(|| Error::Worker("stream already ended".into()))?;
            let registry = self.registry.clone();
            // The transaction travels to the blocking thread and back; if this future
            // is dropped meanwhile, it is dropped there, and rolls back.
            let (txn, r) = blocking(move || {
                let r = registry.stage(&txn, &coll, &items);
                Ok((txn, r))
            })
            .await?;
            stream.txn = Some(txn);
            r
        }
        .await
        .map_err(|e| e.under(&at));
        stream.messages += 1;
        result
    }

    /// Makes a stream's messages durable.
    pub async fn commit_stream(&self, mut stream: UpsertStream) -> Result<()> {
        let txn = stream
            .txn
            .take()
            .ok_or_else(|| Error::Worker("stream already ended".into()))?;
        blocking(move || txn.commit()).await
    }

    /// Undoes a stream's messages, durably (a failed stream).
    pub async fn rollback_stream(&self, mut stream: UpsertStream) -> Result<()> {
        match stream.txn.take() {
            Some(txn) => blocking(move || txn.rollback()).await,
            None => Ok(()),
        }
    }

    /// Validates items (all but the vectors still to embed), embeds the inputs of those
    /// without a vector in one call, and keeps raw inputs where the collection does.
    async fn prepare_items(
        &self,
        coll: &Arc<Collection>,
        items: Vec<NewItem>,
        wait: bool,
    ) -> Result<Vec<ItemData>> {
        let spec = coll.spec();
        let limits = self.registry.limits();
        if items.is_empty() {
            return Err(Error::invalid("items", "must not be empty"));
        }
        let embed_later: Vec<bool> = items
            .iter()
            .map(|it| it.input.is_some() && it.item.vector.is_empty())
            .collect();
        if let Some(i) = embed_later.iter().position(|e| *e)
            && spec.model.is_empty()
        {
            return Err(Error::invalid(
                Field::name("items").at(i).field("input"),
                format!(
                    "collection {:?} has no model to embed inputs; send a vector",
                    spec.name
                ),
            ));
        }
        if self.activations.running(&spec.name)
            && let Some(i) = items.iter().position(|it| it.input.is_none())
        {
            return Err(Error::FailedPrecondition(format!(
                "items[{i}]: collection {:?} is being re-embedded with another model; send inputs, not vectors, until it switches",
                spec.name
            )));
        }
        let (mut out, inputs): (Vec<ItemData>, Vec<Option<Input>>) =
            items.into_iter().map(|n| (n.item, n.input)).unzip();
        validate::items_but(&out, spec, limits, |i| embed_later[i])?;
        if spec.keep_inputs {
            for (item, input) in out.iter_mut().zip(&inputs) {
                if let Some(input) = input {
                    item.input = Some(encode_input(&input.data));
                }
            }
        }
        let (index, batch): (Vec<usize>, Vec<Input>) = inputs
            .into_iter()
            .enumerate()
            .filter(|(i, _)| embed_later[*i])
            .map(|(i, input)| (i, input.expect("an input to embed")))
            .unzip();
        if !batch.is_empty() {
            let vectors = self
                .embedder
                .embed(&spec.model_key(), batch, wait)
                .await
                .map_err(|e| e.rebase(|j| Field::name("items").at(index[j]).field("input")))?;
            for (i, v) in index.into_iter().zip(vectors) {
                out[i].vector = v;
            }
        }
        Ok(out)
    }

    pub async fn delete_items(&self, collection: &str, ids: Vec<String>) -> Result<usize> {
        loop {
            let coll = self.registry.collection(collection)?;
            let (registry, target, ids) = (self.registry.clone(), coll.clone(), ids.clone());
            match blocking(move || registry.delete_items(&target, &ids)).await {
                Err(_) if coll.superseded() => continue,
                other => return other,
            }
        }
    }

    // Reads.

    pub async fn get(
        &self,
        collection: &str,
        ids: Vec<String>,
        with_vectors: bool,
        with_inputs: bool,
    ) -> Result<Vec<ItemData>> {
        let coll = self.registry.collection(collection)?;
        blocking(move || coll.get_items(&ids, with_vectors, with_inputs)).await
    }

    /// Embeds the input queries among `queries` in one call; returns every query as a
    /// vector or a stored item's id. `fields[i]` names query i in errors.
    async fn targets(
        &self,
        coll: &Collection,
        queries: Vec<Query>,
        fields: &[Field],
    ) -> Result<Vec<QueryTarget>> {
        let mut out: Vec<Option<QueryTarget>> = Vec::with_capacity(queries.len());
        let mut index = Vec::new();
        let mut batch = Vec::new();
        for (i, q) in queries.into_iter().enumerate() {
            match q {
                Query::Vector(v) => out.push(Some(QueryTarget::Vector(v))),
                Query::Id(id) => out.push(Some(QueryTarget::Id(id))),
                Query::Input(input) => {
                    if coll.spec().model.is_empty() {
                        return Err(Error::invalid(
                            fields[i].clone().field("input"),
                            format!(
                                "collection {:?} has no model to embed inputs; send a vector",
                                coll.name()
                            ),
                        ));
                    }
                    index.push(i);
                    batch.push(input);
                    out.push(None);
                }
            }
        }
        if !batch.is_empty() {
            let vectors = self
                .embedder
                .embed(&coll.spec().model_key(), batch, false)
                .await
                .map_err(|e| e.rebase(|j| fields[index[j]].clone().field("input")))?;
            for (i, v) in index.into_iter().zip(vectors) {
                out[i] = Some(QueryTarget::Vector(v));
            }
        }
        Ok(out
            .into_iter()
            .map(|t| t.expect("every query resolved"))
            .collect())
    }

    /// The raw input a pair model scores for a query: the input sent, or the stored
    /// input of the item an id query names.
    fn raw_input(
        coll: &Collection,
        field: &Field,
        q: &Query,
        stored: &HashMap<String, InputData>,
    ) -> Result<RawInput> {
        match q {
            Query::Input(input) => Ok(RawInput {
                data: input.data.clone(),
                field: field.clone().field("input"),
            }),
            Query::Id(id) => {
                let field = field.clone().field("id");
                match stored.get(id) {
                    Some(data) => Ok(RawInput {
                        data: data.clone(),
                        field,
                    }),
                    None if !coll.contains(id) => Err(Error::not_found_at(
                        field,
                        format!("item {id:?} in collection {:?}", coll.name()),
                    )),
                    None => Err(Error::invalid(
                        field,
                        format!("item {id:?} has no stored input for the pair model to score"),
                    )),
                }
            }
            Query::Vector(_) => Err(Error::invalid(
                field.clone().field("vector"),
                "the collection's pair model scores inputs: send an input or an item id",
            )),
        }
    }

    /// The stored inputs of the id queries among `queries`.
    async fn stored_inputs_of(
        &self,
        coll: &Arc<Collection>,
        queries: &[&Query],
    ) -> Result<HashMap<String, InputData>> {
        let ids: Vec<String> = queries
            .iter()
            .filter_map(|q| match q {
                Query::Id(id) => Some(id.clone()),
                _ => None,
            })
            .collect();
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let coll = coll.clone();
        blocking(move || coll.stored_inputs(&ids)).await
    }

    /// The collection's pair model, for a request (`field`) that needs one.
    fn pair_model<'c>(coll: &'c Collection, field: &'static str) -> Result<&'c str> {
        let name = &coll.spec().pair_model;
        if name.is_empty() {
            return Err(Error::invalid(
                field,
                format!("collection {:?} has no pair model", coll.name()),
            ));
        }
        Ok(name)
    }

    pub async fn search(
        &self,
        collection: &str,
        query: Query,
        params: SearchParams,
    ) -> Result<Vec<Hit>> {
        let mut results = self
            .search_many(collection, vec![query], params, |_| Field::name("query"))
            .await?;
        Ok(results.remove(0))
    }

    pub async fn search_batch(
        &self,
        collection: &str,
        queries: Vec<Query>,
        params: SearchParams,
    ) -> Result<Vec<Vec<Hit>>> {
        if queries.is_empty() {
            return Err(Error::invalid("queries", "must not be empty"));
        }
        let max = self.registry.limits().max_batch;
        if queries.len() > max {
            return Err(Error::invalid(
                "queries",
                format!("{} queries, at most {max} per request", queries.len()),
            ));
        }
        self.search_many(collection, queries, params, |i| {
            Field::name("queries").at(i)
        })
        .await
    }

    /// Searches for each query: ANN (or exact) by distance on the search pool, all
    /// queries in one job, then the pair model's re-ranking where `params.rerank` asks.
    async fn search_many(
        &self,
        collection: &str,
        queries: Vec<Query>,
        params: SearchParams,
        field: impl Fn(usize) -> Field,
    ) -> Result<Vec<Vec<Hit>>> {
        let coll = self.registry.collection(collection)?;
        validate::search_params(&params, self.registry.limits())?;
        let fields: Vec<Field> = (0..queries.len()).map(field).collect();
        let rerank = if params.rerank > 0 {
            let model = Self::pair_model(&coll, "rerank")?.to_string();
            let refs: Vec<&Query> = queries.iter().collect();
            let stored = self.stored_inputs_of(&coll, &refs).await?;
            let raws = queries
                .iter()
                .zip(&fields)
                .map(|(q, f)| Self::raw_input(&coll, f, q, &stored))
                .collect::<Result<Vec<_>>>()?;
            Some((model, raws))
        } else {
            None
        };
        let targets = self.targets(&coll, queries, &fields).await?;
        let k = params.k;
        let mut p = params;
        p.k = p.k.max(p.rerank);
        // All of a request's queries run as one job on the search pool. (Running a
        // single plain query on the async worker instead was measured: no difference in
        // QPS or daemon CPU per query beyond noise, docs/benchmarks.md.)
        let searched = {
            let coll = coll.clone();
            let fields = fields.clone();
            self.searches
                .run(move || {
                    targets
                        .iter()
                        .zip(&fields)
                        .map(|(t, f)| coll.search(f, t, &p))
                        .collect::<Result<Vec<_>>>()
                })
                .await?
        };
        let Some((model, raws)) = rerank else {
            return Ok(searched);
        };
        let mut out = Vec::with_capacity(searched.len());
        for (hits, raw) in searched.into_iter().zip(&raws) {
            let ids: Vec<String> = hits.iter().map(|h| h.id.clone()).collect();
            let stored = {
                let coll = coll.clone();
                blocking(move || coll.stored_inputs(&ids)).await?
            };
            out.push(judge::rerank(&self.embedder, &model, raw, hits, &stored, k).await?);
        }
        Ok(out)
    }

    /// Identification: a distance-weighted vote over the k nearest items' labels.
    /// Identification: a kNN vote over the `k` nearest (0: [`judge::DEFAULT_VOTERS`]).
    pub async fn classify(&self, collection: &str, query: Query, k: u32) -> Result<Classification> {
        let k = if k == 0 {
            judge::DEFAULT_VOTERS
        } else {
            k as usize
        };
        let coll = self.registry.collection(collection)?;
        let field = Field::name("query");
        let target = self
            .targets(&coll, vec![query], std::slice::from_ref(&field))
            .await?
            .remove(0);
        let params = SearchParams {
            k,
            ..Default::default()
        };
        let hits = {
            let coll = coll.clone();
            self.searches
                .run(move || coll.search(&field, &target, &params))
                .await?
        };
        judge::vote(&hits).ok_or_else(|| {
            Error::invalid(
                "collection",
                format!("{:?} has no items to vote", coll.name()),
            )
        })
    }

    /// Verification of a pair: by distance, and by the pair model where the collection
    /// has one (its decision is then the answer).
    pub async fn verify(&self, collection: &str, a: Query, b: Query) -> Result<Verification> {
        let coll = self.registry.collection(collection)?;
        let fields = [Field::name("a"), Field::name("b")];
        let pair = if coll.spec().pair_model.is_empty() {
            None
        } else {
            let model = Self::pair_model(&coll, "collection")?.to_string();
            let threshold = match coll.decision().pair_threshold {
                Some(t) => t,
                None => self.embedder.pair_threshold(&model)?,
            };
            let stored = self.stored_inputs_of(&coll, &[&a, &b]).await?;
            let ra = Self::raw_input(&coll, &fields[0], &a, &stored)?;
            let rb = Self::raw_input(&coll, &fields[1], &b, &stored)?;
            Some((model, threshold, ra, rb))
        };
        let targets = self.targets(&coll, vec![a, b], &fields).await?;
        let mut v = {
            let coll = coll.clone();
            blocking(move || {
                let va = coll.query_vector(&fields[0], &targets[0])?;
                let vb = coll.query_vector(&fields[1], &targets[1])?;
                Ok(judge::verify(coll.spec().metric, coll.decision(), &va, &vb))
            })
            .await?
        };
        if let Some((model, threshold, ra, rb)) = pair {
            let score = self
                .embedder
                .score(&model, vec![(ra.data.clone(), rb.data.clone())], false)
                .await
                .map_err(|e| {
                    e.rebase_pair(|_, side| {
                        if side == "a" {
                            ra.field.clone()
                        } else {
                            rb.field.clone()
                        }
                    })
                })?[0];
            v.pair_score = Some(score);
            v.same = score >= threshold;
        }
        Ok(v)
    }

    /// Fits the logistic and the thresholds on `pairs` labelled pairs sampled from the
    /// collection (and the pair model's threshold where it has one), then stores them.
    /// Nothing is stored unless everything fitted.
    /// Calibrate on `pairs` sampled labelled pairs (0: the default; see
    /// [`judge::calibration_pairs`]).
    pub async fn calibrate(&self, collection: &str, pairs: u32, seed: u64) -> Result<Calibration> {
        let pairs = judge::calibration_pairs(pairs)?;
        let coll = self.registry.collection(collection)?;
        let (mut cal, sampled) = {
            let coll = coll.clone();
            blocking(move || {
                let groups = coll.labelled_vectors()?;
                judge::calibrate(coll.name(), coll.spec().metric, &groups, pairs, seed)
            })
            .await?
        };
        if !coll.spec().pair_model.is_empty() {
            let model = Self::pair_model(&coll, "collection")?.to_string();
            let mut ids: Vec<String> = sampled
                .iter()
                .flat_map(|(a, b, _)| [a.clone(), b.clone()])
                .collect();
            ids.sort();
            ids.dedup();
            let stored = {
                let coll = coll.clone();
                blocking(move || coll.stored_inputs(&ids)).await?
            };
            cal.pair = Some(
                judge::calibrate_pair(coll.name(), &self.embedder, &model, &sampled, &stored)
                    .await?,
            );
        }
        let registry = self.registry.clone();
        blocking(move || registry.store_calibration(&coll, &cal)).await?;
        Ok(cal)
    }
}

/// A collection's info with its activation, read before it. An activation switches the
/// collection to its generation and only then says it is done, so a reader can find it
/// still running on a collection that already serves the new model: that one is done.
/// (Read the other way round, the switch and the end could both fall between the two
/// reads and show a finished activation beside the old model.)
fn with_activation(info: &mut CollectionInfo, activation: Option<ActivationInfo>) {
    info.activation = activation.map(|mut a| {
        if a.state == State::Running
            && info.spec.model == a.model
            && info.spec.model_version == a.version
        {
            a.state = State::Done;
        }
        a
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{CollectionSpec, Metric};

    fn info(version: &str) -> CollectionInfo {
        CollectionInfo {
            spec: CollectionSpec {
                model_version: version.into(),
                ..CollectionSpec::for_test("c", Metric::Cosine)
            },
            count: 0,
            activation: None,
        }
    }

    fn running(version: &str) -> ActivationInfo {
        ActivationInfo {
            state: State::Running,
            model: "m".into(),
            version: version.into(),
            done: 10,
            total: 10,
            rate: 0.0,
            error: String::new(),
        }
    }

    #[test]
    fn a_running_activation_whose_generation_serves_is_reported_done() {
        // Read before the switch: still running, on the old model.
        let mut before = info("");
        with_activation(&mut before, Some(running("2")));
        assert_eq!(before.activation.unwrap().state, State::Running);
        // The switch fell between the two reads: the new model serves, so it is done.
        let mut after = info("2");
        with_activation(&mut after, Some(running("2")));
        assert_eq!(after.activation.unwrap().state, State::Done);
        let mut none = info("2");
        with_activation(&mut none, None);
        assert!(none.activation.is_none());
    }
}
