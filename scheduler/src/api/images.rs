//! The `Images` service: list, remove and prune the images of the nodes, asked of their agents
//! over the node sessions this replica serves (see [`crate::relay::Relays::images`]).
//!
//! Every node concerned is asked at once, each given at most [`super::top::ASK_TIMEOUT`]; a
//! node that cannot be asked is listed in `unavailable` (as for `Top`). Remove answers
//! NOT_FOUND only when every node asked says it has no such image, and FAILED_PRECONDITION,
//! naming the instances and their nodes, when containers use it anywhere (it is still removed
//! from the nodes where none does, as `docker rmi` would be on each of them).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use gantry::pb;
use gantry::pb::images_server::Images;
use tonic::{Code, Request, Response, Status};

use super::Shared;
use super::top::{ask_timeout, connected, nodes_named, unavailable};
use crate::ops::NodeView;

/// The `gantry.v1.Images` service over the node sessions.
#[derive(Clone)]
pub struct ImagesService {
    shared: Arc<Shared>,
}

impl ImagesService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        ImagesService { shared }
    }

    /// Asks every node of `nodes` at once; the replies in the same order.
    async fn ask_all(
        &self,
        budget: Duration,
        nodes: &[NodeView],
        action: pb::ImageAction,
        reference: &str,
    ) -> Vec<Result<pb::ImageReply, pb::UnavailableNode>> {
        let shared = &self.shared;
        futures::future::join_all(nodes.iter().map(|node| async move {
            connected(node)?;
            shared
                .relays
                .images(
                    &node.record.name,
                    action,
                    reference.to_owned(),
                    ask_timeout(budget),
                )
                .await
                .map_err(|err| unavailable(shared, node, err))
        }))
        .await
    }
}

/// A node's reply that is an error other than those the caller handles, as an `unavailable`
/// entry.
fn failed(node: &NodeView, reply: &pb::ImageReply) -> pb::UnavailableNode {
    pb::UnavailableNode {
        node: node.record.name.clone(),
        reason: pb::UnavailableReason::Failed as i32,
        replica: String::new(),
        message: format!(
            "the agent of node {} answered {:?}: {}",
            node.record.name,
            Code::from(reply.code),
            reply.message
        ),
    }
}

/// Images of several nodes merged by digest.
#[derive(Default)]
struct Merged {
    by_digest: BTreeMap<String, (BTreeSet<String>, u64, BTreeSet<String>)>,
}

impl Merged {
    fn add(&mut self, node: &str, images: Vec<pb::NodeImage>) {
        for image in images {
            let pb::NodeImage {
                digest,
                references,
                size_bytes,
                node: _,
            } = image;
            let (refs, size, nodes) = self.by_digest.entry(digest).or_default();
            refs.extend(references);
            *size = (*size).max(size_bytes);
            nodes.insert(node.to_owned());
        }
    }

    /// Ordered by first reference (dangling images last), then digest.
    fn into_summaries(self) -> Vec<pb::ImageSummary> {
        let mut out: Vec<pb::ImageSummary> = self
            .by_digest
            .into_iter()
            .map(
                |(digest, (references, size_bytes, nodes))| pb::ImageSummary {
                    digest,
                    references: references.into_iter().collect(),
                    size_bytes,
                    nodes: nodes.into_iter().collect(),
                },
            )
            .collect();
        out.sort_by(|a, b| {
            let key =
                |s: &pb::ImageSummary| (s.references.is_empty(), s.references.first().cloned());
            key(a).cmp(&key(b)).then_with(|| a.digest.cmp(&b.digest))
        });
        out
    }
}

#[tonic::async_trait]
impl Images for ImagesService {
    async fn list(
        &self,
        request: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let budget = self.shared.budget(&request);
        let pb::ListImagesRequest { node } = request.into_inner();
        let nodes = nodes_named(&self.shared, budget, &node).await?;
        let replies = self
            .ask_all(budget, &nodes, pb::ImageAction::List, "")
            .await;
        let mut merged = Merged::default();
        let mut response = pb::ListImagesResponse::default();
        for (node, reply) in nodes.iter().zip(replies) {
            match reply {
                Ok(reply) if reply.code == 0 => merged.add(&node.record.name, reply.images),
                Ok(reply) => response.unavailable.push(failed(node, &reply)),
                Err(entry) => response.unavailable.push(entry),
            }
        }
        response.images = merged.into_summaries();
        Ok(Response::new(response))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveImageRequest>,
    ) -> Result<Response<pb::RemoveImageResponse>, Status> {
        let budget = self.shared.budget(&request);
        let pb::RemoveImageRequest { reference, node } = request.into_inner();
        if reference.trim().is_empty() {
            return Err(Status::invalid_argument(
                "reference: required; give an image reference or digest (see `gantry image ls`)",
            ));
        }
        let nodes = nodes_named(&self.shared, budget, &node).await?;
        let replies = self
            .ask_all(budget, &nodes, pb::ImageAction::Remove, &reference)
            .await;
        let mut response = pb::RemoveImageResponse::default();
        let mut in_use = Vec::new();
        let mut not_found = 0;
        for (node, reply) in nodes.iter().zip(replies) {
            match reply {
                Ok(reply) => match Code::from(reply.code) {
                    Code::Ok => response.nodes.push(node.record.name.clone()),
                    Code::NotFound => not_found += 1,
                    Code::FailedPrecondition => {
                        in_use.push(format!("node {}: {}", node.record.name, reply.message))
                    }
                    _ => response.unavailable.push(failed(node, &reply)),
                },
                Err(entry) => response.unavailable.push(entry),
            }
        }
        if !in_use.is_empty() {
            let removed = if response.nodes.is_empty() {
                String::new()
            } else {
                format!(" (removed from {})", response.nodes.join(", "))
            };
            return Err(Status::failed_precondition(format!(
                "{}{removed}",
                in_use.join("; ")
            )));
        }
        if not_found > 0 && not_found == nodes.len() {
            return Err(Status::not_found(format!(
                "image {reference} not found on any node; see `gantry image ls`"
            )));
        }
        response.nodes.sort();
        response.unavailable.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(Response::new(response))
    }

    async fn prune(
        &self,
        request: Request<pb::PruneImagesRequest>,
    ) -> Result<Response<pb::PruneImagesResponse>, Status> {
        let budget = self.shared.budget(&request);
        let pb::PruneImagesRequest { node } = request.into_inner();
        let nodes = nodes_named(&self.shared, budget, &node).await?;
        let replies = self
            .ask_all(budget, &nodes, pb::ImageAction::Prune, "")
            .await;
        let mut merged = Merged::default();
        let mut response = pb::PruneImagesResponse::default();
        for (node, reply) in nodes.iter().zip(replies) {
            match reply {
                Ok(reply) if reply.code == 0 => {
                    response.reclaimed_bytes += reply.reclaimed_bytes;
                    merged.add(&node.record.name, reply.images);
                }
                Ok(reply) => response.unavailable.push(failed(node, &reply)),
                Err(entry) => response.unavailable.push(entry),
            }
        }
        response.removed = merged.into_summaries();
        Ok(Response::new(response))
    }
}
