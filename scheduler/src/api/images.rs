//! The `Images` service: list, remove and prune the images of the nodes, asked of their agents
//! over the node sessions this replica serves (see [`crate::relay::Relays::images`]).
//!
//! Every node concerned is asked at once, each given at most [`super::top::ASK_TIMEOUT`]; a
//! node that cannot be asked is listed in `unavailable` (as for `Top`). Remove answers
//! NOT_FOUND only when every node asked says it has no such image, and FAILED_PRECONDITION,
//! naming the instances and their nodes, when containers use it anywhere (it is still removed
//! from the nodes where none does, as `docker rmi` would be on each of them).
//!
//! Pull and Import are long asks ([`crate::relay::Relays::images_following`]): each node is
//! given [`TRANSFER_IDLE`] without any progress frame before it counts as timed out. Pull
//! streams each node's layer progress and then its result. Import spools the client's upload
//! to a file under [`super::ApiConfig::upload_dir`] (refused above
//! [`super::ApiConfig::max_upload_bytes`]), registers it under a random id for as long as the
//! call runs, and asks each node to import it; the agents fetch the bytes with FetchUpload
//! over their own connection. The file and the id go when the call ends, however it ends
//! (a dropped call drops its guard). Import answers once, with every node's result.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use gantry::pb;
use gantry::pb::images_server::Images;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{debug, warn};

use super::Shared;
use super::top::{ask_timeout, connected, nodes_named, unavailable};
use crate::ops::NodeView;

/// How long a node pulling or importing may send nothing before it counts as timed out.
pub const TRANSFER_IDLE: Duration = Duration::from_secs(60);
/// Largest piece of an upload sent to an agent.
const UPLOAD_CHUNK: usize = 1024 * 1024 - 1024;

/// The `gantry.v1.Images` service over the node sessions.
#[derive(Clone)]
pub struct ImagesService {
    shared: Arc<Shared>,
    uploads: Arc<Mutex<HashMap<String, Upload>>>,
}

/// An upload of a running Import.
#[derive(Clone)]
struct Upload {
    path: PathBuf,
    /// The nodes asked to fetch it.
    nodes: Vec<String>,
}

/// Removes an upload's file and its registration when the Import call ends.
struct UploadGuard {
    uploads: Arc<Mutex<HashMap<String, Upload>>>,
    id: String,
    path: PathBuf,
}

impl Drop for UploadGuard {
    fn drop(&mut self) {
        self.uploads.lock().expect("uploads lock").remove(&self.id);
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => warn!(path = %self.path.display(), %err, "upload not removed"),
        }
    }
}

/// A random, unguessable upload id (128 bits from the kernel).
fn upload_id() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl ImagesService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        ImagesService {
            shared,
            uploads: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Receives an Import's upload into a file; the guard removes it.
    async fn spool(
        &self,
        stream: &mut Streaming<pb::ImportImageChunk>,
        announced: u64,
    ) -> Result<(UploadGuard, u64), Status> {
        let config = &self.shared.config;
        let max = config.max_upload_bytes;
        let too_big = |size: u64| {
            Status::resource_exhausted(format!(
                "the image archive ({size} bytes) is larger than the scheduler's upload limit \
                 of {max} bytes; raise gantry-scheduler --max-upload-size, or import it with \
                 `gantry-agent image import` on each node"
            ))
        };
        if announced > max {
            return Err(too_big(announced));
        }
        let dir = &config.upload_dir;
        tokio::fs::create_dir_all(dir).await.map_err(|err| {
            Status::internal(format!("creating the upload dir {}: {err}", dir.display()))
        })?;
        let id =
            upload_id().map_err(|err| Status::internal(format!("reading /dev/urandom: {err}")))?;
        let path = dir.join(format!("{id}.tar"));
        let guard = UploadGuard {
            uploads: self.uploads.clone(),
            id,
            path: path.clone(),
        };
        let write_error =
            |err: std::io::Error| Status::internal(format!("writing {}: {err}", path.display()));
        let mut file = tokio::fs::File::create(&path).await.map_err(write_error)?;
        let mut size = 0u64;
        while let Some(chunk) = stream.message().await? {
            let pb::ImportImageChunk { header, data } = chunk;
            if header.is_some() {
                return Err(Status::invalid_argument(
                    "import: a header after the first message; send it once, first",
                ));
            }
            size += data.len() as u64;
            if size > max {
                return Err(too_big(size));
            }
            file.write_all(&data).await.map_err(write_error)?;
        }
        file.flush().await.map_err(write_error)?;
        file.sync_all().await.map_err(write_error)?;
        if size == 0 {
            return Err(Status::invalid_argument(
                "import: the upload is empty; give a docker save tarball or an OCI image layout",
            ));
        }
        Ok((guard, size))
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

/// A node's reply as its result.
fn result(node: &str, reply: pb::ImageReply) -> pb::ImageTransferResult {
    let pb::ImageReply {
        relay_id: _,
        code,
        message,
        images,
        reclaimed_bytes: _,
    } = reply;
    pb::ImageTransferResult {
        node: node.to_owned(),
        code,
        message,
        images,
    }
}

/// The layers of a progress frame.
fn layers(frame: pb::ImageProgress) -> Vec<pb::LayerProgress> {
    let pb::ImageProgress {
        relay_id: _,
        layers,
    } = frame;
    layers
}

type PullStream = Pin<Box<dyn Stream<Item = Result<pb::PullImageEvent, Status>> + Send>>;
type FetchStream = Pin<Box<dyn Stream<Item = Result<pb::UploadChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Images for ImagesService {
    type PullStream = PullStream;
    type FetchUploadStream = FetchStream;

    async fn pull(
        &self,
        request: Request<pb::PullImageRequest>,
    ) -> Result<Response<PullStream>, Status> {
        let budget = self.shared.budget(&request);
        let pb::PullImageRequest { reference, node } = request.into_inner();
        if reference.trim().is_empty() {
            return Err(Status::invalid_argument(
                "reference: required; give an image reference such as busybox:1",
            ));
        }
        let nodes = nodes_named(&self.shared, budget, &node).await?;
        let (tx, rx) = mpsc::channel(64);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let asks = nodes.into_iter().map(|node| {
                let tx = tx.clone();
                let shared = shared.clone();
                let reference = reference.clone();
                async move {
                    let name = node.record.name.clone();
                    let event = |layers, result, unavailable| pb::PullImageEvent {
                        node: name.clone(),
                        layers,
                        result,
                        unavailable,
                    };
                    if let Err(entry) = connected(&node) {
                        let _ = tx.send(Ok(event(Vec::new(), None, Some(entry)))).await;
                        return;
                    }
                    let request = pb::ImageRequest {
                        relay_id: 0,
                        action: pb::ImageAction::Pull as i32,
                        reference,
                        upload_id: String::new(),
                        size_bytes: 0,
                    };
                    let answer = shared
                        .relays
                        .images_following(&name, request, TRANSFER_IDLE, |frame| {
                            // Never waits: a client behind on progress misses some.
                            let _ = tx.try_send(Ok(event(layers(frame), None, None)));
                        })
                        .await;
                    let last = match answer {
                        Ok(reply) => event(Vec::new(), Some(result(&name, reply)), None),
                        Err(err) => event(Vec::new(), None, Some(unavailable(&shared, &node, err))),
                    };
                    let _ = tx.send(Ok(last)).await;
                }
            });
            futures::future::join_all(asks).await;
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn import(
        &self,
        request: Request<Streaming<pb::ImportImageChunk>>,
    ) -> Result<Response<pb::ImportImageResponse>, Status> {
        let budget = self.shared.budget(&request);
        let mut stream = request.into_inner();
        let first = stream.message().await?.ok_or_else(|| {
            Status::invalid_argument("import: no header; the first message must carry it")
        })?;
        let pb::ImportImageChunk { header, data } = first;
        let Some(pb::ImportHeader { node, size_bytes }) = header else {
            return Err(Status::invalid_argument(
                "import: the first message must carry the header (node, size)",
            ));
        };
        if !data.is_empty() {
            return Err(Status::invalid_argument(
                "import: the header message carries no data; send the bytes after it",
            ));
        }
        let nodes = nodes_named(&self.shared, budget, &node).await?;
        let (guard, size) = self.spool(&mut stream, size_bytes).await?;
        let mut response = pb::ImportImageResponse {
            size_bytes: size,
            ..Default::default()
        };
        let mut targets = Vec::new();
        for node in nodes {
            match connected(&node) {
                Ok(()) => targets.push(node),
                Err(entry) => response.unavailable.push(entry),
            }
        }
        self.uploads.lock().expect("uploads lock").insert(
            guard.id.clone(),
            Upload {
                path: guard.path.clone(),
                nodes: targets.iter().map(|n| n.record.name.clone()).collect(),
            },
        );
        let shared = &self.shared;
        let upload_id = &guard.id;
        let answers = futures::future::join_all(targets.iter().map(|node| async move {
            let request = pb::ImageRequest {
                relay_id: 0,
                action: pb::ImageAction::Import as i32,
                reference: String::new(),
                upload_id: upload_id.clone(),
                size_bytes: size,
            };
            shared
                .relays
                .images_following(&node.record.name, request, TRANSFER_IDLE, |_| {})
                .await
        }))
        .await;
        drop(guard);
        for (node, answer) in targets.iter().zip(answers) {
            match answer {
                Ok(reply) => response.results.push(result(&node.record.name, reply)),
                Err(err) => response.unavailable.push(unavailable(shared, node, err)),
            }
        }
        response.results.sort_by(|a, b| a.node.cmp(&b.node));
        response.unavailable.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(Response::new(response))
    }

    async fn fetch_upload(
        &self,
        request: Request<pb::FetchUploadRequest>,
    ) -> Result<Response<FetchStream>, Status> {
        let certs = request.peer_certs();
        let pb::FetchUploadRequest { upload_id } = request.into_inner();
        let upload = self
            .uploads
            .lock()
            .expect("uploads lock")
            .get(&upload_id)
            .cloned();
        let Some(upload) = upload else {
            return Err(Status::not_found(
                "no image upload with this id is running; it ends with its Import call",
            ));
        };
        // With mTLS only an agent asked to import it may read it.
        if let Some(leaf) = certs.as_ref().and_then(|chain| chain.first()) {
            let allowed = upload
                .nodes
                .iter()
                .any(|node| crate::session::check_identity(leaf, node).is_ok());
            if !allowed {
                return Err(Status::permission_denied(
                    "the client certificate names none of the nodes asked to import this upload",
                ));
            }
        }
        let mut file = tokio::fs::File::open(&upload.path)
            .await
            .map_err(|err| Status::not_found(format!("the upload is gone: {err}")))?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let mut data = vec![0u8; UPLOAD_CHUNK];
                let n = match file.read(&mut data).await {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(err) => {
                        let _ = tx
                            .send(Err(Status::internal(format!("reading the upload: {err}"))))
                            .await;
                        return;
                    }
                };
                data.truncate(n);
                if tx.send(Ok(pb::UploadChunk { data })).await.is_err() {
                    debug!("upload fetch ended by the agent");
                    return;
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).boxed();
        Ok(Response::new(stream))
    }

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
