//! The `Instances` service: list and get instances; Logs and Exec are relayed to the
//! instance's agent over its node session (see [`crate::relay`]).
//!
//! Errors of the relays: NOT_FOUND for an unknown instance, FAILED_PRECONDITION for one that
//! is not placed (or, for Exec, not running), UNAVAILABLE when the node's session is not on
//! this replica: the message names the replica that holds it, if any (a client connects to
//! that replica; calls are not proxied between replicas).

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use gantry::pb;
use gantry::pb::instances_server::Instances;
use tonic::{Request, Response, Status, Streaming};
use tracing::debug;

use super::{Shared, convert, within};
use crate::model::{self, InstanceState, Liveness, keys};
use crate::ops;
use crate::relay::OpenError;

/// The `gantry.v1.Instances` service over the store.
#[derive(Clone)]
pub struct InstancesService {
    shared: Arc<Shared>,
}

impl InstancesService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        InstancesService { shared }
    }
}

/// A stream of server messages.
type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Instances for InstancesService {
    async fn list(
        &self,
        request: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, Status> {
        let budget = self.shared.budget(&request);
        let pb::ListInstancesRequest {
            workload,
            node,
            label_selector,
            states,
            page_size,
            page_token,
        } = request.into_inner();
        let query = ops::InstanceQuery {
            workload: convert::name_filter(workload),
            node: convert::name_filter(node),
            selector: label_selector,
            states: convert::states_from_pb("states", states)?,
        };
        let page = convert::page(page_size, page_token);
        let store = &*self.shared.store;
        let found = within(budget, ops::list_instances(store, &query, &page)).await?;
        Ok(Response::new(pb::ListInstancesResponse {
            instances: found.items.iter().map(pb::Instance::from).collect(),
            revision: found.revision,
            next_page_token: found.next_token,
        }))
    }

    async fn get(
        &self,
        request: Request<pb::GetInstanceRequest>,
    ) -> Result<Response<pb::Instance>, Status> {
        let budget = self.shared.budget(&request);
        let pb::GetInstanceRequest { id } = request.into_inner();
        let instance = within(budget, ops::get_instance(&*self.shared.store, &id)).await?;
        Ok(Response::new((&instance).into()))
    }

    type LogsStream = Streamed<pb::LogChunk>;

    async fn logs(
        &self,
        request: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let budget = self.shared.budget(&request);
        let request = request.into_inner();
        let node = self.placed(budget, &request.instance_id, false).await?;
        let relays = &self.shared.relays;
        match relays.open_logs(&node, request).await {
            Ok(stream) => Ok(Response::new(Box::pin(stream))),
            Err(err) => Err(self.open_failed(err).await),
        }
    }

    type ExecStream = Streamed<pb::ExecOutput>;

    async fn exec(
        &self,
        request: Request<Streaming<pb::ExecInput>>,
    ) -> Result<Response<Self::ExecStream>, Status> {
        let budget = self.shared.budget(&request);
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(budget, inbound.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded("no start message arrived; send `start` first")
            })??;
        let start = match first {
            Some(pb::ExecInput {
                input: Some(pb::exec_input::Input::Start(start)),
            }) => start,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of Exec must be `start` (instance and command)",
                ));
            }
        };
        if start.command.is_empty() || start.command[0].is_empty() {
            return Err(Status::invalid_argument(
                "start.command: required; give the program to run and its arguments",
            ));
        }
        let node = self.placed(budget, &start.instance_id, true).await?;
        let (stream, mut inputs) = match self.shared.relays.open_exec(&node, start).await {
            Ok(opened) => opened,
            Err(err) => return Err(self.open_failed(err).await),
        };
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    () = inputs.closed() => return,
                    message = inbound.message() => message,
                };
                let input = match message {
                    Ok(Some(pb::ExecInput { input: Some(input) })) => input,
                    Ok(Some(pb::ExecInput { input: None })) => continue,
                    Ok(None) => return,
                    Err(status) => {
                        debug!(%status, "exec input stream broke");
                        return;
                    }
                };
                if matches!(input, pb::exec_input::Input::Start(_)) {
                    debug!("a second exec start ignored");
                    continue;
                }
                if !inputs.send(input).await {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn top(
        &self,
        request: Request<pb::TopInstancesRequest>,
    ) -> Result<Response<pb::TopInstancesResponse>, Status> {
        let budget = self.shared.budget(&request);
        let pb::TopInstancesRequest { workload, node } = request.into_inner();
        let response = super::top::instances(&self.shared, budget, workload, node).await?;
        Ok(Response::new(response))
    }
}

impl InstancesService {
    /// The node instance `id` is placed on; with `running`, the instance must also run.
    async fn placed(
        &self,
        budget: std::time::Duration,
        id: &str,
        running: bool,
    ) -> Result<String, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument(
                "instance_id: required; see `gantry get instances`",
            ));
        }
        let instance = within(budget, ops::get_instance(&*self.shared.store, id)).await?;
        let Some(node) = instance.record.node.clone() else {
            return Err(Status::failed_precondition(format!(
                "instance {id} is not placed on a node yet; see `gantry describe instance {id}`"
            )));
        };
        let state = instance.state();
        if running && !matches!(state, InstanceState::Running | InstanceState::Ready) {
            return Err(Status::failed_precondition(format!(
                "instance {id} is not running (it is {state:?}); exec needs a running instance, \
                 see `gantry describe instance {id}`"
            )));
        }
        Ok(node)
    }

    /// The status for a relay that could not be opened; for a node without a session here,
    /// names the replica that holds its session, if any.
    async fn open_failed(&self, err: OpenError) -> Status {
        let OpenError::NoSession { node, replica } = &err else {
            return err.into();
        };
        let live = self.shared.store.get(keys::live(node).as_bytes()).await;
        let holder = match live {
            Ok(Some(kv)) => model::decode::<Liveness>(&kv.value)
                .ok()
                .map(|l| l.scheduler),
            _ => None,
        };
        match holder {
            Some(holder) if holder != *replica => Status::unavailable(format!(
                "node {node} is connected to scheduler replica {holder}, not to this one \
                 ({replica}); logs and exec go through the replica holding the node's session: \
                 point --addr at {holder}"
            )),
            _ => Status::unavailable(format!(
                "node {node} is not connected to the scheduler; logs and exec work again once \
                 its agent reconnects (see `gantry get nodes`)"
            )),
        }
    }
}
