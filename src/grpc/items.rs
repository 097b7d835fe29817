//! likeness.v1.Items: thin handlers over [`Db`].

use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};

use super::{blocking, convert, oversize_to_exhausted};
use crate::db::{Db, Undo};
use crate::pb;
use crate::pool::WorkPool;

pub struct ItemsService {
    pub db: Arc<Db>,
    /// Runs searches off the async workers, on as many threads as cores.
    pub searches: Arc<WorkPool>,
}

#[tonic::async_trait]
impl pb::items_server::Items for ItemsService {
    async fn upsert(
        &self,
        request: Request<pb::UpsertRequest>,
    ) -> Result<Response<pb::UpsertResponse>, Status> {
        let pb::UpsertRequest { collection, items } = request.into_inner();
        let items = items.into_iter().map(convert::item_from).collect();
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
            let items: Vec<_> = items.into_iter().map(convert::item_from).collect();
            let db = self.db.clone();
            let prefix = format!("messages[{index}].");
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
        } = request.into_inner();
        let db = self.db.clone();
        let items = blocking(move || db.get_items(&collection, &ids, with_vectors)).await?;
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
        let db = self.db.clone();
        let results = self
            .searches
            .run(move || db.search_batch(&collection, &queries, &params))
            .await?;
        Ok(Response::new(pb::SearchBatchResponse {
            results: results.into_iter().map(convert::hits_to).collect(),
        }))
    }
}
