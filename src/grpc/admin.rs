//! likeness.v1.Admin: convert -> [`App`] -> convert.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use crate::app::App;
use crate::grpc::pb;

pub struct AdminService {
    pub app: Arc<App>,
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn backup(
        &self,
        request: Request<pb::BackupRequest>,
    ) -> Result<Response<pb::BackupInfo>, Status> {
        let pb::BackupRequest { path } = request.into_inner();
        let info = self.app.backup(path).await?;
        Ok(Response::new(convert::backup_info(info)))
    }
}
