//! The `Workloads` service: apply, get, list, delete, scale, history and rollback of workloads.

use std::sync::Arc;

use gantry::pb;
use gantry::pb::workloads_server::Workloads;
use tonic::{Request, Response, Status};

use super::{Shared, convert, within};
use crate::model::Timestamp;
use crate::ops;

/// The `gantry.v1.Workloads` service over the store.
#[derive(Clone)]
pub struct WorkloadsService {
    shared: Arc<Shared>,
}

impl WorkloadsService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        WorkloadsService { shared }
    }
}

#[tonic::async_trait]
impl Workloads for WorkloadsService {
    async fn apply(
        &self,
        request: Request<pb::ApplyWorkloadRequest>,
    ) -> Result<Response<pb::ApplyWorkloadResponse>, Status> {
        let budget = self.shared.budget(&request);
        let pb::ApplyWorkloadRequest {
            spec,
            dry_run,
            expected_revision,
        } = request.into_inner();
        let spec = convert::spec_from_pb(spec)?;
        let store = &*self.shared.store;
        let outcome = within(
            budget,
            ops::apply(store, spec, dry_run, expected_revision, Timestamp::now()),
        )
        .await?;
        Ok(Response::new((&outcome).into()))
    }

    async fn get(
        &self,
        request: Request<pb::GetWorkloadRequest>,
    ) -> Result<Response<pb::Workload>, Status> {
        let budget = self.shared.budget(&request);
        let pb::GetWorkloadRequest { name } = request.into_inner();
        let view = within(budget, ops::get(&*self.shared.store, &name)).await?;
        Ok(Response::new((&view).into()))
    }

    async fn list(
        &self,
        request: Request<pb::ListWorkloadsRequest>,
    ) -> Result<Response<pb::ListWorkloadsResponse>, Status> {
        let budget = self.shared.budget(&request);
        let pb::ListWorkloadsRequest {
            label_selector,
            kind,
            page_size,
            page_token,
        } = request.into_inner();
        let kind = convert::kind_filter_from_pb("kind", kind)?;
        let page = convert::page(page_size, page_token);
        let store = &*self.shared.store;
        let found = within(budget, ops::list(store, &label_selector, kind, &page)).await?;
        Ok(Response::new(pb::ListWorkloadsResponse {
            workloads: found.items.iter().map(pb::Workload::from).collect(),
            revision: found.revision,
            next_page_token: found.next_token,
        }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteWorkloadRequest>,
    ) -> Result<Response<pb::DeleteWorkloadResponse>, Status> {
        let budget = self.shared.budget(&request);
        let pb::DeleteWorkloadRequest {
            name,
            expected_revision,
        } = request.into_inner();
        let store = &*self.shared.store;
        let gone = within(budget, ops::delete(store, &name, expected_revision)).await?;
        Ok(Response::new(pb::DeleteWorkloadResponse {
            workload: Some((&gone).into()),
        }))
    }

    async fn scale(
        &self,
        request: Request<pb::ScaleWorkloadRequest>,
    ) -> Result<Response<pb::Workload>, Status> {
        let budget = self.shared.budget(&request);
        let pb::ScaleWorkloadRequest {
            name,
            replicas,
            expected_revision,
        } = request.into_inner();
        let store = &*self.shared.store;
        let call = ops::scale(store, &name, replicas, expected_revision, Timestamp::now());
        let view = within(budget, call).await?;
        Ok(Response::new((&view).into()))
    }

    async fn history(
        &self,
        request: Request<pb::WorkloadHistoryRequest>,
    ) -> Result<Response<pb::WorkloadHistoryResponse>, Status> {
        let budget = self.shared.budget(&request);
        let pb::WorkloadHistoryRequest { name } = request.into_inner();
        let revisions = within(budget, ops::history(&*self.shared.store, &name)).await?;
        Ok(Response::new(pb::WorkloadHistoryResponse {
            revisions: revisions.iter().map(pb::WorkloadRevision::from).collect(),
        }))
    }

    async fn rollback(
        &self,
        request: Request<pb::RollbackWorkloadRequest>,
    ) -> Result<Response<pb::Workload>, Status> {
        let budget = self.shared.budget(&request);
        let pb::RollbackWorkloadRequest {
            name,
            to_generation,
        } = request.into_inner();
        let store = &*self.shared.store;
        let call = ops::rollback(store, &name, to_generation, Timestamp::now());
        let view = within(budget, call).await?;
        Ok(Response::new((&view).into()))
    }
}
