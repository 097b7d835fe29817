//! likeness.v1.Collections: convert -> [`App`] -> convert.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use crate::app::App;
use crate::grpc::pb;

pub struct CollectionsService {
    pub app: Arc<App>,
}

#[tonic::async_trait]
impl pb::collections_server::Collections for CollectionsService {
    async fn create_collection(
        &self,
        request: Request<pb::CreateCollectionRequest>,
    ) -> Result<Response<pb::CollectionInfo>, Status> {
        let req = convert::create_collection(request.into_inner())?;
        let info = self.app.create_collection(req).await?;
        Ok(Response::new(convert::collection_info(info)))
    }

    async fn get_collection(
        &self,
        request: Request<pb::GetCollectionRequest>,
    ) -> Result<Response<pb::CollectionInfo>, Status> {
        let pb::GetCollectionRequest { name } = request.into_inner();
        let info = self.app.collection_info(&name)?;
        Ok(Response::new(convert::collection_info(info)))
    }

    async fn list_collections(
        &self,
        request: Request<pb::ListCollectionsRequest>,
    ) -> Result<Response<pb::ListCollectionsResponse>, Status> {
        let pb::ListCollectionsRequest {} = request.into_inner();
        let collections = self
            .app
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
        let deleted = self.app.delete_collection(name).await?;
        Ok(Response::new(pb::DeleteCollectionResponse { deleted }))
    }
}
