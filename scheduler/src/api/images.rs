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
//!
//! Tag asks every Ready node (or the one named) at once; nodes without the image are listed,
//! and only none holding it is NOT_FOUND. Push and Save work on one node: the one named, or
//! else the Ready nodes by name, asked in turn until one does not answer NOT_FOUND. Push
//! streams that node's progress and then its result. Save opens a download slot (a random id
//! holding the caller's stream) for the node asked; the agent writes the tarball and delivers
//! it with DeliverSave, whose chunks go straight to the caller through a bounded queue, so
//! neither side holds the tarball and a slow caller slows the agent. A caller that goes away
//! fails the delivery (CANCELLED), which stops the agent. The stream ends without error only
//! after the agent's OK reply, which it sends once its delivery call has ended: anything else
//! ends it with a status, so a client never mistakes a cut tarball for a whole one.

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
    saves: SaveSlots,
}

/// Where the chunks of a Save go: its caller's stream.
type SaveSender = mpsc::Sender<Result<pb::SaveImageChunk, Status>>;

/// Chunks of a saved tarball queued for the Save's caller; a full queue holds the agent's
/// delivery back.
const SAVE_QUEUE: usize = 8;

/// The download slots of the running Saves, by id.
#[derive(Clone, Default)]
struct SaveSlots {
    slots: Arc<Mutex<HashMap<String, SaveSlot>>>,
}

/// A running Save waiting for (or receiving) one node's tarball.
struct SaveSlot {
    /// The node asked to deliver it.
    node: String,
    /// The Save's caller.
    tx: SaveSender,
    /// Whether a delivery has claimed it.
    claimed: bool,
}

/// Removes a slot when its Save stops waiting for the node.
struct SlotGuard {
    slots: SaveSlots,
    id: String,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slots
            .slots
            .lock()
            .expect("saves lock")
            .remove(&self.id);
    }
}

impl SaveSlots {
    /// A new slot for `node`'s delivery to `tx`, under `id`.
    fn open(&self, id: String, node: &str, tx: SaveSender) -> SlotGuard {
        self.slots.lock().expect("saves lock").insert(
            id.clone(),
            SaveSlot {
                node: node.to_owned(),
                tx,
                claimed: false,
            },
        );
        SlotGuard {
            slots: self.clone(),
            id,
        }
    }

    /// Claims slot `id` for a delivery, whose caller `allowed` checks against the node asked.
    /// Returns the node and where the chunks go.
    fn claim(
        &self,
        id: &str,
        allowed: impl FnOnce(&str) -> bool,
    ) -> Result<(String, SaveSender), Status> {
        let mut slots = self.slots.lock().expect("saves lock");
        let Some(slot) = slots.get_mut(id) else {
            return Err(Status::not_found(
                "no image save with this slot id is running; it ends with its Save call",
            ));
        };
        if !allowed(&slot.node) {
            return Err(Status::permission_denied(
                "the client certificate does not name the node asked to save this image",
            ));
        }
        if slot.claimed {
            return Err(Status::failed_precondition(
                "this save slot was delivered to already",
            ));
        }
        if slot.tx.is_closed() {
            return Err(Status::cancelled("the caller of the image save went away"));
        }
        slot.claimed = true;
        Ok((slot.node.clone(), slot.tx.clone()))
    }
}

/// Passes a delivery's chunks (after the first, whose data is `first`) on to the Save's
/// caller, waiting while its queue is full. CANCELLED once the caller has gone away, which
/// ends the agent's delivery. Returns the bytes passed on.
async fn forward(
    node: String,
    first: Vec<u8>,
    mut chunks: impl Stream<Item = Result<pb::SaveChunk, Status>> + Unpin,
    tx: SaveSender,
) -> Result<u64, Status> {
    let gone = || Status::cancelled("the caller of the image save went away");
    let mut size = first.len() as u64;
    let head = pb::SaveImageChunk { node, data: first };
    tx.send(Ok(head)).await.map_err(|_| gone())?;
    while let Some(chunk) = chunks.next().await {
        let pb::SaveChunk { slot_id, data } = chunk?;
        if !slot_id.is_empty() {
            return Err(Status::invalid_argument(
                "deliver save: a slot id after the first message; send it once, first",
            ));
        }
        size += data.len() as u64;
        let chunk = pb::SaveImageChunk {
            node: String::new(),
            data,
        };
        tx.send(Ok(chunk)).await.map_err(|_| gone())?;
    }
    Ok(size)
}

/// Whether a node's reply or failure lets the search for a node holding the image go on:
/// NOT_FOUND, or a node that could not be asked, unless the caller named it.
enum Outcome {
    /// The node did it.
    Done(pb::ImageReply),
    /// The node does not hold the image.
    Missing,
    /// The node could not be asked.
    Unavailable(pb::UnavailableNode),
    /// The node failed; ends the call with this status.
    Failed(Status),
}

/// One node's answer while a push or save looks for a node holding the image: `None` to try
/// the next node (this one lacks the image or cannot be asked, and no node was named; an
/// unavailable one goes to `left`), else the reply or the status that ends the call.
fn first_holder(
    outcome: Outcome,
    named: bool,
    reference: &str,
    node: &str,
    left: &mut Vec<pb::UnavailableNode>,
) -> Option<Result<pb::ImageReply, Status>> {
    match outcome {
        Outcome::Done(reply) => Some(Ok(reply)),
        Outcome::Missing if !named => None,
        Outcome::Missing => Some(Err(Status::not_found(format!(
            "image {reference} not found on node {node}; see `gantry image ls`"
        )))),
        Outcome::Unavailable(entry) if !named => {
            left.push(entry);
            None
        }
        Outcome::Unavailable(entry) => Some(Err(Status::failed_precondition(entry.message))),
        Outcome::Failed(status) => Some(Err(status)),
    }
}

fn outcome(
    shared: &Shared,
    node: &NodeView,
    answer: Result<pb::ImageReply, crate::relay::AskError>,
) -> Outcome {
    match answer {
        Ok(reply) => match Code::from(reply.code) {
            Code::Ok => Outcome::Done(reply),
            Code::NotFound => Outcome::Missing,
            // The agent's message says what went wrong; INVALID_ARGUMENT is the caller's
            // input, any other failure is the node's (or its registry's), never this
            // scheduler's: clients must not take it for one of theirs (UNAVAILABLE reads as
            // an unreachable scheduler).
            Code::InvalidArgument => Outcome::Failed(Status::invalid_argument(format!(
                "node {}: {}",
                node.record.name, reply.message
            ))),
            _ => Outcome::Failed(Status::failed_precondition(format!(
                "node {}: {}",
                node.record.name, reply.message
            ))),
        },
        Err(err) => Outcome::Unavailable(unavailable(shared, node, err)),
    }
}

/// The status of a Push or Save that found no node to do it: NOT_FOUND naming the image,
/// and the nodes that could not be asked.
fn none_holds(what: &str, reference: &str, unavailable: &[pb::UnavailableNode]) -> Status {
    if unavailable.is_empty() {
        return Status::not_found(format!(
            "image {reference} not found on any node; see `gantry image ls`"
        ));
    }
    let left: Vec<String> = unavailable
        .iter()
        .map(|u| format!("node {}: {}", u.node, u.message))
        .collect();
    Status::not_found(format!(
        "image {reference} not found on any node that could be asked to {what} it; {}",
        left.join("; ")
    ))
}

/// The connected nodes among `nodes`, by name; the others as `unavailable` entries (an error
/// when `named`: the caller asked for that node).
fn ready_by_name(
    nodes: Vec<NodeView>,
    named: bool,
) -> Result<(Vec<NodeView>, Vec<pb::UnavailableNode>), Status> {
    let mut ready = Vec::new();
    let mut left = Vec::new();
    for node in nodes {
        match connected(&node) {
            Ok(()) => ready.push(node),
            Err(entry) if named => return Err(Status::failed_precondition(entry.message)),
            Err(entry) => left.push(entry),
        }
    }
    ready.sort_by(|a, b| a.record.name.cmp(&b.record.name));
    Ok((ready, left))
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
            saves: SaveSlots::default(),
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
        pushed_blobs: _,
        existing_blobs: _,
        pushed_bytes: _,
        digest: _,
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
type PushStream = Pin<Box<dyn Stream<Item = Result<pb::PushImageEvent, Status>> + Send>>;
type SaveStream = Pin<Box<dyn Stream<Item = Result<pb::SaveImageChunk, Status>> + Send>>;

/// An image request for `action` on `reference`.
fn image_request(
    action: pb::ImageAction,
    reference: &str,
    upload_id: &str,
    target: &str,
) -> pb::ImageRequest {
    pb::ImageRequest {
        relay_id: 0,
        action: action as i32,
        reference: reference.to_owned(),
        upload_id: upload_id.to_owned(),
        size_bytes: 0,
        target: target.to_owned(),
    }
}

#[tonic::async_trait]
impl Images for ImagesService {
    type PullStream = PullStream;
    type FetchUploadStream = FetchStream;
    type PushStream = PushStream;
    type SaveStream = SaveStream;

    async fn tag(
        &self,
        request: Request<pb::TagImageRequest>,
    ) -> Result<Response<pb::TagImageResponse>, Status> {
        let budget = self.shared.budget(&request);
        let pb::TagImageRequest {
            source,
            target,
            node,
        } = request.into_inner();
        if source.trim().is_empty() || target.trim().is_empty() {
            return Err(Status::invalid_argument(
                "tag: give the image and the new reference, as in `gantry image tag busybox:1 \
                 registry.example:5000/busybox:1`",
            ));
        }
        let nodes = nodes_named(&self.shared, budget, &node).await?;
        let named = !node.is_empty();
        let (ready, mut left) = ready_by_name(nodes, named)?;
        let shared = &self.shared;
        let request = image_request(pb::ImageAction::Tag, &source, "", &target);
        let answers = futures::future::join_all(ready.iter().map(|node| {
            let request = request.clone();
            async move {
                let answer = shared
                    .relays
                    .images_following(&node.record.name, request, ask_timeout(budget), |_| {})
                    .await;
                outcome(shared, node, answer)
            }
        }))
        .await;
        let mut response = pb::TagImageResponse::default();
        for (node, answer) in ready.iter().zip(answers) {
            match answer {
                Outcome::Done(reply) => {
                    response
                        .tagged
                        .extend(reply.images.into_iter().map(|image| pb::NodeImage {
                            node: node.record.name.clone(),
                            ..image
                        }))
                }
                Outcome::Missing => response.missing.push(node.record.name.clone()),
                Outcome::Unavailable(entry) => left.push(entry),
                Outcome::Failed(status) => return Err(status),
            }
        }
        if response.tagged.is_empty() && left.is_empty() {
            return Err(Status::not_found(format!(
                "image {source} not found on any node; see `gantry image ls`"
            )));
        }
        left.sort_by(|a, b| a.node.cmp(&b.node));
        response.unavailable = left;
        Ok(Response::new(response))
    }

    async fn push(
        &self,
        request: Request<pb::PushImageRequest>,
    ) -> Result<Response<PushStream>, Status> {
        let budget = self.shared.budget(&request);
        let pb::PushImageRequest { reference, node } = request.into_inner();
        if reference.trim().is_empty() {
            return Err(Status::invalid_argument(
                "reference: required; give the reference to push, naming its registry, such as \
                 registry.example:5000/app:1",
            ));
        }
        let named = !node.is_empty();
        let nodes = nodes_named(&self.shared, budget, &node).await?;
        let (ready, mut left) = ready_by_name(nodes, named)?;
        let (tx, rx) = mpsc::channel(64);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            for node in ready {
                let name = node.record.name.clone();
                let request = image_request(pb::ImageAction::Push, &reference, "", "");
                let answer = shared
                    .relays
                    .images_following(&name, request, TRANSFER_IDLE, |frame| {
                        let event = pb::PushImageEvent {
                            node: name.clone(),
                            layers: layers(frame),
                            result: None,
                        };
                        // Never waits: a client behind on progress misses some.
                        let _ = tx.try_send(Ok(event));
                    })
                    .await;
                let answer = outcome(&shared, &node, answer);
                let Some(answer) = first_holder(answer, named, &reference, &name, &mut left) else {
                    continue;
                };
                let last = answer.map(|reply| pb::PushImageEvent {
                    node: name.clone(),
                    layers: Vec::new(),
                    result: Some(pb::PushImageResult {
                        node: name.clone(),
                        digest: reply.digest,
                        pushed_blobs: reply.pushed_blobs,
                        existing_blobs: reply.existing_blobs,
                        pushed_bytes: reply.pushed_bytes,
                    }),
                });
                let _ = tx.send(last).await;
                return;
            }
            let _ = tx.send(Err(none_holds("push", &reference, &left))).await;
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn save(
        &self,
        request: Request<pb::SaveImageRequest>,
    ) -> Result<Response<SaveStream>, Status> {
        let budget = self.shared.budget(&request);
        let pb::SaveImageRequest { reference, node } = request.into_inner();
        if reference.trim().is_empty() {
            return Err(Status::invalid_argument(
                "reference: required; give an image reference or digest (see `gantry image ls`)",
            ));
        }
        let named = !node.is_empty();
        let nodes = nodes_named(&self.shared, budget, &node).await?;
        let (ready, mut left) = ready_by_name(nodes, named)?;
        let (tx, rx) = mpsc::channel(SAVE_QUEUE);
        let shared = self.shared.clone();
        let slots = self.saves.clone();
        tokio::spawn(async move {
            for node in ready {
                let name = node.record.name.clone();
                let id = match upload_id() {
                    Ok(id) => id,
                    Err(err) => {
                        let status = Status::internal(format!("reading /dev/urandom: {err}"));
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                let guard = slots.open(id.clone(), &name, tx.clone());
                let request = image_request(pb::ImageAction::Save, &reference, &id, "");
                let answer = shared
                    .relays
                    .images_following(&name, request, TRANSFER_IDLE, |_| {})
                    .await;
                // The delivery is over once the agent replies: the slot goes.
                drop(guard);
                let answer = outcome(&shared, &node, answer);
                let Some(answer) = first_holder(answer, named, &reference, &name, &mut left) else {
                    continue;
                };
                // A whole tarball is said by ending the stream.
                if let Err(status) = answer {
                    let _ = tx.send(Err(status)).await;
                }
                return;
            }
            let _ = tx.send(Err(none_holds("save", &reference, &left))).await;
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn deliver_save(
        &self,
        request: Request<Streaming<pb::SaveChunk>>,
    ) -> Result<Response<pb::DeliverSaveResponse>, Status> {
        let certs = request.peer_certs();
        let mut stream = request.into_inner();
        let first = stream.message().await?.ok_or_else(|| {
            Status::invalid_argument("deliver save: no slot id; the first message must carry it")
        })?;
        let pb::SaveChunk { slot_id, data } = first;
        // With mTLS only the agent asked may deliver.
        let leaf = certs.as_ref().and_then(|chain| chain.first().cloned());
        let allowed = |node: &str| {
            leaf.as_ref()
                .is_none_or(|leaf| crate::session::check_identity(leaf, node).is_ok())
        };
        let (node, tx) = self.saves.claim(&slot_id, allowed)?;
        let size = forward(node, data, stream, tx).await?;
        Ok(Response::new(pb::DeliverSaveResponse { size_bytes: size }))
    }

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
                        target: String::new(),
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
                target: String::new(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(data: &[u8]) -> Result<pb::SaveChunk, Status> {
        Ok(pb::SaveChunk {
            slot_id: String::new(),
            data: data.to_vec(),
        })
    }

    #[test]
    fn a_slot_takes_one_delivery_from_its_node_while_its_save_runs() {
        let slots = SaveSlots::default();
        let (tx, _rx) = mpsc::channel(SAVE_QUEUE);
        let guard = slots.open("s1".into(), "n1", tx);

        let unknown = slots.claim("s2", |_| true).expect_err("unknown slot");
        assert_eq!(unknown.code(), Code::NotFound);
        let stranger = slots
            .claim("s1", |node| node == "n2")
            .expect_err("other node");
        assert_eq!(stranger.code(), Code::PermissionDenied);

        let (node, _tx) = slots
            .claim("s1", |node| node == "n1")
            .expect("the node asked");
        assert_eq!(node, "n1");
        let again = slots.claim("s1", |_| true).expect_err("claimed twice");
        assert_eq!(again.code(), Code::FailedPrecondition);

        drop(guard);
        let finished = slots.claim("s1", |_| true).expect_err("finished save");
        assert_eq!(finished.code(), Code::NotFound);
    }

    #[test]
    fn a_slot_whose_caller_went_away_refuses_the_delivery() {
        let slots = SaveSlots::default();
        let (tx, rx) = mpsc::channel(SAVE_QUEUE);
        let _guard = slots.open("s1".into(), "n1", tx);
        drop(rx);
        let gone = slots.claim("s1", |_| true).expect_err("caller gone");
        assert_eq!(gone.code(), Code::Cancelled);
    }

    #[tokio::test]
    async fn chunks_reach_the_caller_in_order_with_the_node_first() {
        let (tx, mut rx) = mpsc::channel(SAVE_QUEUE);
        let chunks = futures::stream::iter(vec![chunk(b"bc"), chunk(b"d")]);
        let size = forward("n1".into(), b"a".to_vec(), chunks, tx)
            .await
            .expect("forwarded");
        assert_eq!(size, 4);
        let mut got = Vec::new();
        while let Some(Ok(c)) = rx.recv().await {
            got.push((c.node, c.data));
        }
        assert_eq!(
            got,
            [
                ("n1".to_owned(), b"a".to_vec()),
                (String::new(), b"bc".to_vec()),
                (String::new(), b"d".to_vec()),
            ]
        );
    }

    #[tokio::test]
    async fn a_caller_going_away_cancels_the_delivery() {
        let (tx, mut rx) = mpsc::channel(1);
        let (chunks_tx, chunks_rx) = mpsc::channel(4);
        let chunks = tokio_stream::wrappers::ReceiverStream::new(chunks_rx);
        let delivery = tokio::spawn(forward("n1".into(), Vec::new(), chunks, tx));
        chunks_tx.send(chunk(b"x")).await.unwrap();
        // The caller reads the head, then goes away.
        assert!(rx.recv().await.is_some());
        drop(rx);
        let _ = chunks_tx.send(chunk(b"y")).await;
        let ended = delivery.await.unwrap().expect_err("cancelled");
        assert_eq!(ended.code(), Code::Cancelled);
        // The delivery stopped reading: the agent's sender sees the stream gone.
        assert!(chunks_tx.is_closed());
    }

    #[tokio::test]
    async fn a_second_slot_id_in_a_delivery_is_refused() {
        let (tx, _rx) = mpsc::channel(SAVE_QUEUE);
        let chunks = futures::stream::iter(vec![Ok(pb::SaveChunk {
            slot_id: "s1".into(),
            data: Vec::new(),
        })]);
        let err = forward("n1".into(), Vec::new(), chunks, tx)
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument);
    }
}
