//! likeness.v1.Collections: thin handlers over [`Db`].

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{blocking, convert};
use crate::db::Db;
use crate::embed::Models;
use crate::pb;

pub struct CollectionsService {
    pub db: Arc<Db>,
    pub models: Arc<Models>,
}

#[tonic::async_trait]
impl pb::collections_server::Collections for CollectionsService {
    async fn create_collection(
        &self,
        request: Request<pb::CreateCollectionRequest>,
    ) -> Result<Response<pb::CollectionInfo>, Status> {
        let req = convert::create_collection(request.into_inner(), &self.models)?;
        let db = self.db.clone();
        let info = blocking(move || db.create_collection(req)).await?;
        Ok(Response::new(convert::collection_info(info)))
    }

    async fn get_collection(
        &self,
        request: Request<pb::GetCollectionRequest>,
    ) -> Result<Response<pb::CollectionInfo>, Status> {
        let pb::GetCollectionRequest { name } = request.into_inner();
        let info = self.db.collection(&name)?.info();
        Ok(Response::new(convert::collection_info(info)))
    }

    async fn list_collections(
        &self,
        request: Request<pb::ListCollectionsRequest>,
    ) -> Result<Response<pb::ListCollectionsResponse>, Status> {
        let pb::ListCollectionsRequest {} = request.into_inner();
        let collections = self
            .db
            .list_collections()?
            .into_iter()
            .map(convert::collection_info)
            .collect();
        Ok(Response::new(pb::ListCollectionsResponse { collections }))
    }

    async fn delete_collection(
        &self,
        request: Request<pb::DeleteCollectionRequest>,
    ) -> Result<Response<pb::DeleteCollectionResponse>, Status> {
        let pb::DeleteCollectionRequest { name } = request.into_inner();
        let db = self.db.clone();
        let deleted = blocking(move || db.delete_collection(&name)).await?;
        Ok(Response::new(pb::DeleteCollectionResponse { deleted }))
    }
}
