//! Logs and exec relays: the `Instances.Logs` and `Instances.Exec` calls of clients, carried
//! over the node sessions this replica serves.
//!
//! [`Relays`] is the registry of one process's node sessions: node name → the session's
//! outbound sender and its table of open relays, keyed by a `relay_id` unique in the process
//! (so unique within every session). The session registers itself with [`Relays::attach`] and
//! hands every relay frame of its agent to [`NodeRelays::deliver`]; the API handlers open
//! relays with [`Relays::open_logs`] and [`Relays::open_exec`] and return the
//! [`RelayStream`] as the response stream.
//!
//! Invariants:
//! - The session loop never waits on a client: frames go into each relay's bounded channel
//!   ([`RELAY_QUEUE`] frames, each at most 64 KiB by the protocol) with `try_send`. A relay
//!   whose client does not keep up is aborted with RESOURCE_EXHAUSTED and cancelled at the
//!   agent, so one slow reader never stalls the other instances of its node.
//! - A client that goes away (its response stream dropped) cancels the relay: it leaves the
//!   table and the agent gets `relay_cancel`.
//! - The agent's `relay_end` ends the client's stream with the code and message it carries,
//!   after every frame delivered before it.
//! - A session that ends, or is replaced by a newer session of its node, fails its open relays
//!   with UNAVAILABLE.
//!
//! Sessions of a node held by another replica are not reachable from here: the API answers
//! UNAVAILABLE naming the replica that holds it (from the node's live key).
//!
//! Requests with one answer (the node's resource usage, [`Relays::stats`]; its images,
//! [`Relays::images`]) use the same
//! `relay_id` space: the request waits on a oneshot kept in the session's table of pending
//! asks, which the session fills from the agent's reply without waiting. An ask that is not
//! answered within its timeout leaves the table (a late reply is dropped); a session that ends
//! drops its pending asks, so their callers hear at once that it ended.
//!
//! Image pulls and imports ([`Relays::images_following`]) are asks that take long: the agent
//! sends `image_progress` frames before its one reply. Their timeout is an idle timeout (no
//! frame for that long), not a total one; progress frames go to the caller without waiting
//! (a frame the caller has not taken yet is replaced by nothing: the next one carries the
//! whole state again).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::Stream;
use gantry::pb;
use gantry::pb::scheduler_message::Message as ToAgent;
use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Status};
use tracing::debug;

/// Frames buffered per relay before a client that does not read them loses its relay.
pub const RELAY_QUEUE: usize = 128;
/// Relays open at once on one node.
pub const MAX_RELAYS_PER_NODE: usize = 256;
/// Requests with one answer (stats, images) waiting at once on one node.
pub const MAX_ASKS_PER_NODE: usize = 64;
/// Progress frames of one pull or import buffered for its caller; more are dropped.
pub const PROGRESS_QUEUE: usize = 16;

/// The sender of one session's messages to its agent.
pub(crate) type Outbound = mpsc::Sender<Result<pb::SchedulerMessage, Status>>;

/// Why a relay could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The node has no session on this replica.
    #[error("node {node} has no session on scheduler replica {replica}")]
    NoSession {
        /// The node.
        node: String,
        /// This replica.
        replica: String,
    },
    /// The node has too many relays open.
    #[error(
        "node {node} already has {MAX_RELAYS_PER_NODE} logs and exec streams open; close some and retry"
    )]
    TooMany {
        /// The node.
        node: String,
    },
}

/// Why a request with one answer (stats, images) got none.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AskError {
    /// The node has no session on this replica.
    #[error("node {node} has no session on scheduler replica {replica}")]
    NoSession {
        /// The node.
        node: String,
        /// This replica.
        replica: String,
    },
    /// The node has too many requests waiting.
    #[error("node {node} already has {MAX_ASKS_PER_NODE} requests waiting; retry shortly")]
    TooMany {
        /// The node.
        node: String,
    },
    /// The agent did not answer in time.
    #[error("node {node} did not answer within {}s", after.as_secs_f64())]
    TimedOut {
        /// The node.
        node: String,
        /// How long it was given.
        after: std::time::Duration,
    },
    /// The agent sent nothing about a long request (a pull, an import) for too long.
    #[error(
        "node {node} sent no progress for {}s; its agent may be stuck (see its log)",
        after.as_secs_f64()
    )]
    Silent {
        /// The node.
        node: String,
        /// How long it stayed silent.
        after: std::time::Duration,
    },
    /// The session ended before the agent answered.
    #[error(
        "the session of node {node} ended before its agent answered; retry once it has reconnected"
    )]
    Ended {
        /// The node.
        node: String,
    },
    /// The agent answered with an error.
    #[error("the agent of node {node} could not answer: {message}")]
    Failed {
        /// The node.
        node: String,
        /// The agent's error.
        message: String,
    },
}

impl From<OpenError> for Status {
    fn from(err: OpenError) -> Self {
        match err {
            OpenError::NoSession { .. } => Status::unavailable(err.to_string()),
            OpenError::TooMany { .. } => Status::resource_exhausted(err.to_string()),
        }
    }
}

/// The relays of every node session in this process. Cheap to clone.
#[derive(Clone)]
pub struct Relays {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Relays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relays")
            .field("replica", &self.inner.replica)
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// The name of this replica, for error messages.
    replica: String,
    nodes: Mutex<HashMap<String, NodeEntry>>,
    next_relay: AtomicU64,
    next_session: AtomicU64,
}

struct NodeEntry {
    session: u64,
    out: Outbound,
    relays: HashMap<u64, Sink>,
    /// Requests waiting for their one answer, by relay id.
    asks: HashMap<u64, oneshot::Sender<Reply>>,
    /// Where the progress frames of the asks that have them go, by relay id.
    progress: HashMap<u64, mpsc::Sender<pb::ImageProgress>>,
}

/// Where the frames of one relay go.
struct Sink {
    data: SinkData,
    /// The relay's final status (OK included).
    end: oneshot::Sender<Status>,
}

enum SinkData {
    Logs(mpsc::Sender<pb::LogChunk>),
    Exec(mpsc::Sender<pb::ExecOutput>),
}

/// A relay frame from an agent.
#[derive(Debug)]
pub enum Frame {
    /// Log output.
    Logs(pb::LogsFrame),
    /// Exec output.
    Exec(pb::ExecOutputFrame),
    /// The end of a relay.
    End(pb::RelayEnd),
    /// The answer to a stats request.
    Stats(pb::StatsReply),
    /// The answer to an image request.
    Images(pb::ImageReply),
    /// Progress of an image pull or import.
    ImageProgress(pb::ImageProgress),
}

/// The one answer to a request.
#[derive(Debug)]
enum Reply {
    Stats(pb::StatsReply),
    Images(pb::ImageReply),
}

fn wrong_reply(node: &str) -> AskError {
    AskError::Failed {
        node: node.to_owned(),
        message: "the agent answered with a reply of another kind".into(),
    }
}

impl Relays {
    /// An empty registry for replica `replica`.
    pub fn new(replica: impl Into<String>) -> Self {
        Relays {
            inner: Arc::new(Inner {
                replica: replica.into(),
                nodes: Mutex::new(HashMap::new()),
                next_relay: AtomicU64::new(1),
                next_session: AtomicU64::new(1),
            }),
        }
    }

    /// The name of this replica.
    pub fn replica(&self) -> &str {
        &self.inner.replica
    }

    /// Registers the session of `node` whose messages go to `out`; a previous session of the
    /// node fails its relays. The registration lasts as long as the returned value.
    pub fn attach(&self, node: &str, out: Outbound) -> NodeRelays {
        let session = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        let previous = self.inner.lock().insert(
            node.to_owned(),
            NodeEntry {
                session,
                out,
                relays: HashMap::new(),
                asks: HashMap::new(),
                progress: HashMap::new(),
            },
        );
        if let Some(previous) = previous {
            fail_all(node, previous.relays);
        }
        NodeRelays {
            inner: self.inner.clone(),
            node: node.to_owned(),
            session,
        }
    }

    /// Opens a logs relay to `node`'s agent.
    pub async fn open_logs(
        &self,
        node: &str,
        request: pb::LogsRequest,
    ) -> Result<RelayStream<pb::LogChunk>, OpenError> {
        let (stream, out, _) = self.open(node, SinkData::Logs)?;
        let open = ToAgent::Logs(pb::LogsOpen {
            relay_id: stream.relay_id(),
            request: Some(request),
        });
        if !send(&out, open).await {
            return Err(self.no_session(node));
        }
        Ok(stream)
    }

    /// Opens an exec relay to `node`'s agent; input for it goes through the returned
    /// [`ExecInputs`].
    pub async fn open_exec(
        &self,
        node: &str,
        start: pb::ExecStart,
    ) -> Result<(RelayStream<pb::ExecOutput>, ExecInputs), OpenError> {
        let (stream, out, closed) = self.open(node, SinkData::Exec)?;
        let relay_id = stream.relay_id();
        let open = ToAgent::ExecStart(pb::ExecOpen {
            relay_id,
            start: Some(start),
        });
        if !send(&out, open).await {
            return Err(self.no_session(node));
        }
        let inputs = ExecInputs {
            relay_id,
            out,
            closed,
        };
        Ok((stream, inputs))
    }

    /// Asks `node`'s agent for the resource usage of the node and of `instance_ids` (empty:
    /// every running instance), waiting at most `timeout` for the answer.
    pub async fn stats(
        &self,
        node: &str,
        instance_ids: Vec<String>,
        timeout: std::time::Duration,
    ) -> Result<pb::StatsReply, AskError> {
        let request = |relay_id| {
            ToAgent::StatsRequest(pb::StatsRequest {
                relay_id,
                instance_ids,
            })
        };
        let reply = match self.ask(node, timeout, request).await? {
            Reply::Stats(reply) => reply,
            Reply::Images(_) => return Err(wrong_reply(node)),
        };
        if reply.error.is_empty() {
            Ok(reply)
        } else {
            Err(AskError::Failed {
                node: node.to_owned(),
                message: reply.error,
            })
        }
    }

    /// Asks `node`'s agent to list, remove or prune its images, waiting at most `timeout`.
    /// The agent's own refusal (NOT_FOUND, FAILED_PRECONDITION, ...) is in the reply's `code`.
    pub async fn images(
        &self,
        node: &str,
        action: pb::ImageAction,
        reference: String,
        timeout: std::time::Duration,
    ) -> Result<pb::ImageReply, AskError> {
        let request = |relay_id| {
            ToAgent::ImageRequest(pb::ImageRequest {
                relay_id,
                action: action as i32,
                reference,
                upload_id: String::new(),
                size_bytes: 0,
                target: String::new(),
            })
        };
        match self.ask(node, timeout, request).await? {
            Reply::Images(reply) => Ok(reply),
            Reply::Stats(_) => Err(wrong_reply(node)),
        }
    }

    /// Asks `node`'s agent for a long image action (a pull, an import: `request`, whose
    /// `relay_id` is chosen here), handing each progress frame to `progress` as it comes, and
    /// giving up once the agent has sent nothing for `idle`. The agent's own refusal is in
    /// the reply's `code`.
    pub async fn images_following(
        &self,
        node: &str,
        request: pb::ImageRequest,
        idle: std::time::Duration,
        mut progress: impl FnMut(pb::ImageProgress),
    ) -> Result<pb::ImageReply, AskError> {
        let (relay_id, out, mut rx, frames, _guard) = self.register(node, true)?;
        let mut frames = frames.expect("asked with progress");
        let request = ToAgent::ImageRequest(pb::ImageRequest {
            relay_id,
            ..request
        });
        let ended = || AskError::Ended {
            node: node.to_owned(),
        };
        if !send(&out, request).await {
            return Err(ended());
        }
        let silent = || AskError::Silent {
            node: node.to_owned(),
            after: idle,
        };
        loop {
            tokio::select! {
                biased;
                frame = frames.recv() => match frame {
                    Some(frame) => progress(frame),
                    // The session dropped its table: the reply sender went with it.
                    None => {
                        return match tokio::time::timeout(idle, &mut rx).await {
                            Ok(Ok(Reply::Images(reply))) => Ok(reply),
                            Ok(Ok(Reply::Stats(_))) => Err(wrong_reply(node)),
                            Ok(Err(_)) => Err(ended()),
                            Err(_) => Err(silent()),
                        };
                    }
                },
                reply = &mut rx => return match reply {
                    Ok(Reply::Images(reply)) => Ok(reply),
                    Ok(Reply::Stats(_)) => Err(wrong_reply(node)),
                    Err(_) => Err(ended()),
                },
                () = tokio::time::sleep(idle) => return Err(silent()),
            }
        }
    }

    /// Sends the request `request(relay_id)` to `node`'s agent and waits at most `timeout` for
    /// its reply.
    async fn ask(
        &self,
        node: &str,
        timeout: std::time::Duration,
        request: impl FnOnce(u64) -> ToAgent,
    ) -> Result<Reply, AskError> {
        let (relay_id, out, rx, _, _guard) = self.register(node, false)?;
        let request = request(relay_id);
        let asked = async {
            if !send(&out, request).await {
                return Err(AskError::Ended {
                    node: node.to_owned(),
                });
            }
            rx.await.map_err(|_| AskError::Ended {
                node: node.to_owned(),
            })
        };
        tokio::time::timeout(timeout, asked)
            .await
            .map_err(|_| AskError::TimedOut {
                node: node.to_owned(),
                after: timeout,
            })?
    }

    /// Puts a new ask into `node`'s table (with a progress queue when `with_progress`);
    /// it leaves the table when the returned guard is dropped.
    #[allow(clippy::type_complexity)]
    fn register(
        &self,
        node: &str,
        with_progress: bool,
    ) -> Result<
        (
            u64,
            Outbound,
            oneshot::Receiver<Reply>,
            Option<mpsc::Receiver<pb::ImageProgress>>,
            AskGuard,
        ),
        AskError,
    > {
        let mut nodes = self.inner.lock();
        let Some(entry) = nodes.get_mut(node) else {
            return Err(AskError::NoSession {
                node: node.to_owned(),
                replica: self.inner.replica.clone(),
            });
        };
        if entry.asks.len() >= MAX_ASKS_PER_NODE {
            return Err(AskError::TooMany {
                node: node.to_owned(),
            });
        }
        let relay_id = self.inner.next_relay.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        entry.asks.insert(relay_id, tx);
        let frames = with_progress.then(|| {
            let (tx, rx) = mpsc::channel(PROGRESS_QUEUE);
            entry.progress.insert(relay_id, tx);
            rx
        });
        let guard = AskGuard {
            inner: self.inner.clone(),
            node: node.to_owned(),
            session: entry.session,
            relay_id,
        };
        Ok((relay_id, entry.out.clone(), rx, frames, guard))
    }

    /// Requests with one answer waiting on `node` (tests and diagnostics).
    pub fn asks_waiting(&self, node: &str) -> usize {
        self.inner
            .lock()
            .get(node)
            .map_or(0, |entry| entry.asks.len())
    }

    /// Relays open on `node` (tests and diagnostics).
    pub fn open_count(&self, node: &str) -> usize {
        self.inner
            .lock()
            .get(node)
            .map_or(0, |entry| entry.relays.len())
    }

    fn no_session(&self, node: &str) -> OpenError {
        OpenError::NoSession {
            node: node.to_owned(),
            replica: self.inner.replica.clone(),
        }
    }

    /// Puts a new relay into `node`'s table; returns its stream, the session's outbound
    /// sender, and what completes once the stream is dropped.
    #[allow(clippy::type_complexity)]
    fn open<T>(
        &self,
        node: &str,
        data: impl FnOnce(mpsc::Sender<T>) -> SinkData,
    ) -> Result<(RelayStream<T>, Outbound, oneshot::Receiver<()>), OpenError> {
        let mut nodes = self.inner.lock();
        let Some(entry) = nodes.get_mut(node) else {
            return Err(self.no_session(node));
        };
        if entry.relays.len() >= MAX_RELAYS_PER_NODE {
            return Err(OpenError::TooMany {
                node: node.to_owned(),
            });
        }
        let relay_id = self.inner.next_relay.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(RELAY_QUEUE);
        let (end_tx, end_rx) = oneshot::channel();
        entry.relays.insert(
            relay_id,
            Sink {
                data: data(tx),
                end: end_tx,
            },
        );
        let (closed_tx, closed_rx) = oneshot::channel();
        let stream = RelayStream {
            rx,
            end: Some(end_rx),
            finished: false,
            guard: Guard {
                inner: self.inner.clone(),
                node: node.to_owned(),
                session: entry.session,
                relay_id,
                _closed: closed_tx,
            },
        };
        Ok((stream, entry.out.clone(), closed_rx))
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, NodeEntry>> {
        self.nodes.lock().expect("relays lock")
    }

    /// Removes relay `relay_id` of `node`'s session `session`, if it is still open.
    fn take(&self, node: &str, session: u64, relay_id: u64) -> Option<(Sink, Outbound)> {
        let mut nodes = self.lock();
        let entry = nodes.get_mut(node).filter(|e| e.session == session)?;
        let sink = entry.relays.remove(&relay_id)?;
        Some((sink, entry.out.clone()))
    }
}

/// One session's registration; dropping it fails the session's open relays with
/// UNAVAILABLE.
pub struct NodeRelays {
    inner: Arc<Inner>,
    node: String,
    session: u64,
}

impl NodeRelays {
    /// Hands a frame from the agent to its relay, without waiting: a frame for a relay that is
    /// gone is dropped; a relay whose client does not keep up is aborted with
    /// RESOURCE_EXHAUSTED and cancelled at the agent.
    pub fn deliver(&self, frame: Frame) {
        let relay_id = match &frame {
            Frame::Logs(f) => f.relay_id,
            Frame::Exec(f) => f.relay_id,
            Frame::End(f) => f.relay_id,
            Frame::Stats(f) => f.relay_id,
            Frame::Images(f) => f.relay_id,
            Frame::ImageProgress(f) => f.relay_id,
        };
        let mut nodes = self.inner.lock();
        let Some(entry) = nodes
            .get_mut(&self.node)
            .filter(|e| e.session == self.session)
        else {
            return;
        };
        let frame = match frame {
            Frame::Stats(reply) => return self.answer(entry, relay_id, Reply::Stats(reply)),
            Frame::Images(reply) => return self.answer(entry, relay_id, Reply::Images(reply)),
            Frame::ImageProgress(frame) => {
                if let Some(tx) = entry.progress.get(&relay_id) {
                    // A caller behind on progress misses a frame; the next one has it all.
                    let _ = tx.try_send(frame);
                }
                return;
            }
            frame => frame,
        };
        let Some(sink) = entry.relays.get(&relay_id) else {
            debug!(node = %self.node, relay_id, "frame of a relay that is gone dropped");
            return;
        };
        let full = match (frame, &sink.data) {
            (Frame::End(end), _) => {
                let pb::RelayEnd {
                    relay_id: _,
                    code,
                    message,
                } = end;
                if let Some(sink) = entry.relays.remove(&relay_id) {
                    let _ = sink.end.send(Status::new(Code::from(code), message));
                }
                return;
            }
            (
                Frame::Logs(pb::LogsFrame {
                    relay_id: _,
                    chunk: Some(chunk),
                }),
                SinkData::Logs(tx),
            ) => is_full(tx.try_send(chunk)),
            (
                Frame::Exec(pb::ExecOutputFrame {
                    relay_id: _,
                    output: Some(output),
                }),
                SinkData::Exec(tx),
            ) => is_full(tx.try_send(output)),
            _ => {
                debug!(node = %self.node, relay_id, "relay frame of the wrong kind or empty dropped");
                false
            }
        };
        if full && let Some(sink) = entry.relays.remove(&relay_id) {
            debug!(node = %self.node, relay_id, "client too slow; relay aborted");
            let _ = sink.end.send(Status::resource_exhausted(format!(
                "the client read the stream too slowly ({RELAY_QUEUE} messages waiting); \
                 the stream was stopped: read it faster, or ask for less (--tail, --since)"
            )));
            cancel(&entry.out, relay_id);
        }
    }
}

impl NodeRelays {
    /// Hands a reply to the request waiting for it.
    fn answer(&self, entry: &mut NodeEntry, relay_id: u64, reply: Reply) {
        entry.progress.remove(&relay_id);
        match entry.asks.remove(&relay_id) {
            // A caller that has just given up drops the reply with its receiver.
            Some(tx) => drop(tx.send(reply)),
            None => debug!(node = %self.node, relay_id, "late or unknown reply dropped"),
        }
    }
}

impl Drop for NodeRelays {
    fn drop(&mut self) {
        let mut nodes = self.inner.lock();
        if nodes
            .get(&self.node)
            .is_some_and(|e| e.session == self.session)
            && let Some(entry) = nodes.remove(&self.node)
        {
            drop(nodes);
            fail_all(&self.node, entry.relays);
        }
    }
}

/// Whether a `try_send` found the channel full (a closed one means the client is gone, which
/// its stream's drop handles).
fn is_full<T>(result: Result<(), mpsc::error::TrySendError<T>>) -> bool {
    matches!(result, Err(mpsc::error::TrySendError::Full(_)))
}

fn fail_all(node: &str, relays: HashMap<u64, Sink>) {
    for (_, sink) in relays {
        let _ = sink.end.send(Status::unavailable(format!(
            "the session of node {node} ended; retry once its agent has reconnected"
        )));
    }
}

/// Sends one message to the agent; false when the session is gone.
async fn send(out: &Outbound, message: ToAgent) -> bool {
    out.send(Ok(pb::SchedulerMessage {
        message: Some(message),
    }))
    .await
    .is_ok()
}

/// Tells the agent to stop relay `relay_id`, without waiting on a full outbound queue.
fn cancel(out: &Outbound, relay_id: u64) {
    let message = Ok(pb::SchedulerMessage {
        message: Some(ToAgent::RelayCancel(pb::RelayCancel { relay_id })),
    });
    match out.try_send(message) {
        Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
        Err(mpsc::error::TrySendError::Full(message)) => {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let out = out.clone();
                runtime.spawn(async move {
                    let _ = out.send(message).await;
                });
            }
        }
    }
}

/// Takes a request with one answer out of its session's table when its caller stops waiting.
struct AskGuard {
    inner: Arc<Inner>,
    node: String,
    session: u64,
    relay_id: u64,
}

impl Drop for AskGuard {
    fn drop(&mut self) {
        let mut nodes = self.inner.lock();
        if let Some(entry) = nodes
            .get_mut(&self.node)
            .filter(|e| e.session == self.session)
        {
            entry.asks.remove(&self.relay_id);
            entry.progress.remove(&self.relay_id);
        }
    }
}

/// Cancels its relay when the client's stream is dropped before the relay ended.
struct Guard {
    inner: Arc<Inner>,
    node: String,
    session: u64,
    relay_id: u64,
    /// Dropped with the stream: tells the exec input forwarder to stop.
    _closed: oneshot::Sender<()>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some((_, out)) = self.inner.take(&self.node, self.session, self.relay_id) {
            debug!(node = %self.node, relay_id = self.relay_id, "client gone; relay cancelled");
            cancel(&out, self.relay_id);
        }
    }
}

/// The client's side of a relay: the frames, then the end status (nothing more when OK).
pub struct RelayStream<T> {
    rx: mpsc::Receiver<T>,
    end: Option<oneshot::Receiver<Status>>,
    finished: bool,
    guard: Guard,
}

impl<T> RelayStream<T> {
    /// The relay id (unique in the process).
    pub fn relay_id(&self) -> u64 {
        self.guard.relay_id
    }
}

impl<T> Stream for RelayStream<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.finished {
            return Poll::Ready(None);
        }
        if let Some(item) = std::task::ready!(this.rx.poll_recv(cx)) {
            return Poll::Ready(Some(Ok(item)));
        }
        let Some(end) = this.end.as_mut() else {
            this.finished = true;
            return Poll::Ready(None);
        };
        let status = match std::task::ready!(Pin::new(end).poll(cx)) {
            Ok(status) => status,
            Err(_) => Status::unavailable("the relay ended without a result; retry"),
        };
        this.end = None;
        this.finished = true;
        if status.code() == Code::Ok {
            Poll::Ready(None)
        } else {
            Poll::Ready(Some(Err(status)))
        }
    }
}

/// Forwards a client's exec input to the agent.
pub struct ExecInputs {
    relay_id: u64,
    out: Outbound,
    closed: oneshot::Receiver<()>,
}

impl ExecInputs {
    /// Sends one input (stdin, close_stdin or resize); false when the session is gone.
    pub async fn send(&self, input: pb::exec_input::Input) -> bool {
        let frame = pb::ExecInputFrame {
            relay_id: self.relay_id,
            input: Some(pb::ExecInput { input: Some(input) }),
        };
        send(&self.out, ToAgent::ExecInput(frame)).await
    }

    /// Completes once the relay's output stream has been dropped.
    pub async fn closed(&mut self) {
        let _ = (&mut self.closed).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    fn session(
        relays: &Relays,
        node: &str,
    ) -> (
        NodeRelays,
        mpsc::Receiver<Result<pb::SchedulerMessage, Status>>,
    ) {
        let (tx, rx) = mpsc::channel(64);
        (relays.attach(node, tx), rx)
    }

    /// The next message to the agent, which must be there already.
    fn sent(rx: &mut mpsc::Receiver<Result<pb::SchedulerMessage, Status>>) -> ToAgent {
        rx.try_recv()
            .expect("a message to the agent")
            .expect("not an error")
            .message
            .expect("a message")
    }

    fn chunk(relay_id: u64, text: &str) -> Frame {
        Frame::Logs(pb::LogsFrame {
            relay_id,
            chunk: Some(pb::LogChunk {
                stream: pb::LogStream::Stdout as i32,
                data: text.as_bytes().to_vec(),
                time: None,
            }),
        })
    }

    fn end(relay_id: u64, code: Code, message: &str) -> Frame {
        Frame::End(pb::RelayEnd {
            relay_id,
            code: code as i32,
            message: message.into(),
        })
    }

    fn request(id: &str) -> pb::LogsRequest {
        pb::LogsRequest {
            instance_id: id.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_node_without_a_session_is_unavailable_and_named() {
        let relays = Relays::new("sched-a");
        let err = relays
            .open_logs("n1", request("web-1"))
            .await
            .err()
            .unwrap();
        assert_eq!(
            err,
            OpenError::NoSession {
                node: "n1".into(),
                replica: "sched-a".into()
            }
        );
        let status = Status::from(err);
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("n1"), "{status:?}");
    }

    #[tokio::test]
    async fn frames_reach_the_client_and_the_end_closes_the_stream() {
        let relays = Relays::new("s");
        let (node, mut agent) = session(&relays, "n1");
        let mut stream = relays.open_logs("n1", request("web-1")).await.unwrap();
        let ToAgent::Logs(open) = sent(&mut agent) else {
            panic!("expected a logs open")
        };
        assert_eq!(open.relay_id, stream.relay_id());
        assert_eq!(open.request.unwrap().instance_id, "web-1");
        node.deliver(chunk(open.relay_id, "a\n"));
        node.deliver(chunk(open.relay_id, "b\n"));
        node.deliver(end(open.relay_id, Code::Ok, ""));
        // A frame of an unknown relay is ignored.
        node.deliver(chunk(999, "stray\n"));
        let got: Vec<_> = (&mut stream).collect().await;
        let data: Vec<Vec<u8>> = got.into_iter().map(|c| c.unwrap().data).collect();
        assert_eq!(data, [b"a\n".to_vec(), b"b\n".to_vec()]);
        assert_eq!(relays.open_count("n1"), 0);
        drop(stream);
        assert!(agent.try_recv().is_err(), "an ended relay is not cancelled");
    }

    #[tokio::test]
    async fn the_agents_error_becomes_the_clients_status() {
        let relays = Relays::new("s");
        let (node, mut agent) = session(&relays, "n1");
        let mut stream = relays.open_logs("n1", request("web-1")).await.unwrap();
        let id = stream.relay_id();
        let _ = sent(&mut agent);
        node.deliver(end(id, Code::NotFound, "instance web-1 has no container"));
        let status = stream.next().await.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), "instance web-1 has no container");
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn a_client_that_goes_away_cancels_its_relay() {
        let relays = Relays::new("s");
        let (_node, mut agent) = session(&relays, "n1");
        let stream = relays.open_logs("n1", request("web-1")).await.unwrap();
        let id = stream.relay_id();
        let _ = sent(&mut agent);
        assert_eq!(relays.open_count("n1"), 1);
        drop(stream);
        let ToAgent::RelayCancel(cancel) = sent(&mut agent) else {
            panic!("expected a cancel")
        };
        assert_eq!(cancel.relay_id, id);
        assert_eq!(relays.open_count("n1"), 0);
    }

    #[tokio::test]
    async fn a_session_that_ends_fails_its_relays() {
        let relays = Relays::new("s");
        let (node, _agent) = session(&relays, "n1");
        let mut stream = relays.open_logs("n1", request("web-1")).await.unwrap();
        drop(node);
        let status = stream.next().await.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("n1"), "{status:?}");
        assert!(relays.open_logs("n1", request("web-1")).await.is_err());

        // A newer session of the node fails the older one's relays and keeps its own.
        let (old, _a) = session(&relays, "n1");
        let mut before = relays.open_logs("n1", request("web-1")).await.unwrap();
        let (new, _b) = session(&relays, "n1");
        let status = before.next().await.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::Unavailable);
        drop(old);
        let after = relays.open_logs("n1", request("web-1")).await.unwrap();
        new.deliver(chunk(after.relay_id(), "x\n"));
        assert_eq!(relays.open_count("n1"), 1);
    }

    #[tokio::test]
    async fn a_slow_client_loses_its_relay_without_stalling_the_session() {
        let relays = Relays::new("s");
        let (node, mut agent) = session(&relays, "n1");
        let mut slow = relays.open_logs("n1", request("web-1")).await.unwrap();
        let mut other = relays.open_logs("n1", request("web-2")).await.unwrap();
        let _ = sent(&mut agent);
        let _ = sent(&mut agent);
        // Never blocks, however far the client is behind.
        for _ in 0..RELAY_QUEUE + 10 {
            node.deliver(chunk(slow.relay_id(), "line\n"));
        }
        let ToAgent::RelayCancel(cancel) = sent(&mut agent) else {
            panic!("expected a cancel")
        };
        assert_eq!(cancel.relay_id, slow.relay_id());
        // The other relay of the node carries on.
        node.deliver(chunk(other.relay_id(), "fine\n"));
        assert_eq!(other.next().await.unwrap().unwrap().data, b"fine\n");
        let mut delivered = 0;
        let status = loop {
            match slow.next().await.unwrap() {
                Ok(_) => delivered += 1,
                Err(status) => break status,
            }
        };
        assert_eq!(delivered, RELAY_QUEUE);
        assert_eq!(status.code(), Code::ResourceExhausted);
    }

    fn stats_reply(relay_id: u64, instance: &str) -> Frame {
        Frame::Stats(pb::StatsReply {
            relay_id,
            node: Some(pb::NodeUsage {
                cpu_cores: 0.5,
                ..Default::default()
            }),
            instances: vec![pb::InstanceUsage {
                instance_id: instance.into(),
                ..Default::default()
            }],
            error: String::new(),
        })
    }

    const ASK: std::time::Duration = std::time::Duration::from_secs(5);

    #[tokio::test]
    async fn stats_replies_reach_their_asker_by_relay_id() {
        let relays = Relays::new("s");
        let (node, mut agent) = session(&relays, "n1");
        let first = tokio::spawn({
            let relays = relays.clone();
            async move { relays.stats("n1", vec!["web-1".into()], ASK).await }
        });
        let second = tokio::spawn({
            let relays = relays.clone();
            async move { relays.stats("n1", vec![], ASK).await }
        });
        let mut asked = Vec::new();
        while asked.len() < 2 {
            match agent.recv().await.unwrap().unwrap().message.unwrap() {
                ToAgent::StatsRequest(request) => asked.push(request),
                other => panic!("expected a stats request, got {other:?}"),
            }
        }
        asked.sort_by_key(|r| r.instance_ids.len());
        let (all, one) = (&asked[0], &asked[1]);
        assert_eq!(one.instance_ids, ["web-1"]);
        assert_ne!(all.relay_id, one.relay_id);
        // Answered in the other order; each asker gets its own reply; strays are dropped.
        node.deliver(stats_reply(999, "stray"));
        node.deliver(stats_reply(all.relay_id, "for-all"));
        node.deliver(stats_reply(one.relay_id, "for-one"));
        let got = first.await.unwrap().unwrap();
        assert_eq!(got.instances[0].instance_id, "for-one");
        let got = second.await.unwrap().unwrap();
        assert_eq!(got.instances[0].instance_id, "for-all");
        assert_eq!(relays.asks_waiting("n1"), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stats_request_times_out_and_a_late_reply_is_dropped() {
        let relays = Relays::new("s");
        let (node, mut agent) = session(&relays, "n1");
        let err = relays.stats("n1", vec![], ASK).await.unwrap_err();
        assert_eq!(
            err,
            AskError::TimedOut {
                node: "n1".into(),
                after: ASK
            }
        );
        assert!(err.to_string().contains("within 5s"), "{err}");
        assert_eq!(relays.asks_waiting("n1"), 0);
        let ToAgent::StatsRequest(request) = sent(&mut agent) else {
            panic!("expected a stats request")
        };
        node.deliver(stats_reply(request.relay_id, "late"));
        assert_eq!(relays.asks_waiting("n1"), 0);
    }

    #[tokio::test]
    async fn stats_of_an_unknown_node_an_ended_session_and_an_agent_error() {
        let relays = Relays::new("sched-a");
        let err = relays.stats("n1", vec![], ASK).await.unwrap_err();
        assert_eq!(
            err,
            AskError::NoSession {
                node: "n1".into(),
                replica: "sched-a".into()
            }
        );

        let (node, mut agent) = session(&relays, "n1");
        let asking = tokio::spawn({
            let relays = relays.clone();
            async move { relays.stats("n1", vec![], ASK).await }
        });
        let Ok(Some(ToAgent::StatsRequest(_))) = agent.recv().await.unwrap().map(|m| m.message)
        else {
            panic!("expected a stats request")
        };
        drop(node);
        let err = asking.await.unwrap().unwrap_err();
        assert_eq!(err, AskError::Ended { node: "n1".into() });

        let (node, mut agent) = session(&relays, "n1");
        let asking = tokio::spawn({
            let relays = relays.clone();
            async move { relays.stats("n1", vec![], ASK).await }
        });
        let Ok(Some(ToAgent::StatsRequest(request))) =
            agent.recv().await.unwrap().map(|m| m.message)
        else {
            panic!("expected a stats request")
        };
        node.deliver(Frame::Stats(pb::StatsReply {
            relay_id: request.relay_id,
            error: "listing containers: no runtime".into(),
            ..Default::default()
        }));
        let err = asking.await.unwrap().unwrap_err();
        assert_eq!(
            err,
            AskError::Failed {
                node: "n1".into(),
                message: "listing containers: no runtime".into()
            }
        );
    }

    #[tokio::test]
    async fn image_replies_reach_their_asker_with_the_agents_code() {
        let relays = Relays::new("s");
        let (node, mut agent) = session(&relays, "n1");
        let asking = tokio::spawn({
            let relays = relays.clone();
            async move {
                relays
                    .images("n1", pb::ImageAction::Remove, "busybox:1".into(), ASK)
                    .await
            }
        });
        let Ok(Some(ToAgent::ImageRequest(request))) =
            agent.recv().await.unwrap().map(|m| m.message)
        else {
            panic!("expected an image request")
        };
        assert_eq!(request.action, pb::ImageAction::Remove as i32);
        assert_eq!(request.reference, "busybox:1");
        // A stats reply under another id does not answer it.
        node.deliver(stats_reply(request.relay_id + 1, "stray"));
        node.deliver(Frame::Images(pb::ImageReply {
            relay_id: request.relay_id,
            code: Code::FailedPrecondition as i32,
            message: "image busybox:1 is used by instance web-1".into(),
            ..Default::default()
        }));
        let reply = asking.await.unwrap().unwrap();
        assert_eq!(reply.code, Code::FailedPrecondition as i32);
        assert!(reply.message.contains("web-1"));
        assert_eq!(relays.asks_waiting("n1"), 0);
    }

    fn pull_request() -> pb::ImageRequest {
        pb::ImageRequest {
            relay_id: 0,
            action: pb::ImageAction::Pull as i32,
            reference: "busybox:1".into(),
            upload_id: String::new(),
            size_bytes: 0,
            target: String::new(),
        }
    }

    fn progress(relay_id: u64, done: u64) -> Frame {
        Frame::ImageProgress(pb::ImageProgress {
            relay_id,
            layers: vec![pb::LayerProgress {
                digest: "sha256:aa".into(),
                done_bytes: done,
                total_bytes: 100,
            }],
        })
    }

    /// Starts a pull on `n1`, collecting its progress; returns its relay id and the task.
    async fn following(
        relays: &Relays,
        agent: &mut mpsc::Receiver<Result<pb::SchedulerMessage, Status>>,
        idle: std::time::Duration,
    ) -> (
        u64,
        tokio::task::JoinHandle<(Result<pb::ImageReply, AskError>, Vec<u64>)>,
    ) {
        let task = tokio::spawn({
            let relays = relays.clone();
            async move {
                let mut seen = Vec::new();
                let reply = relays
                    .images_following("n1", pull_request(), idle, |p| {
                        seen.push(p.layers[0].done_bytes)
                    })
                    .await;
                (reply, seen)
            }
        });
        let Ok(Some(ToAgent::ImageRequest(request))) =
            agent.recv().await.unwrap().map(|m| m.message)
        else {
            panic!("expected an image request")
        };
        assert_eq!(request.action, pb::ImageAction::Pull as i32);
        (request.relay_id, task)
    }

    #[tokio::test(start_paused = true)]
    async fn progress_frames_reach_the_caller_before_the_reply_and_reset_the_idle_timeout() {
        let relays = Relays::new("s");
        let (node, mut agent) = session(&relays, "n1");
        let idle = std::time::Duration::from_secs(60);
        let (id, task) = following(&relays, &mut agent, idle).await;
        // Frames 50 s apart: longer in all than the idle timeout, never idle that long.
        for done in [10, 60, 100] {
            tokio::time::sleep(std::time::Duration::from_secs(50)).await;
            node.deliver(progress(id, done));
            tokio::task::yield_now().await;
        }
        node.deliver(Frame::Images(pb::ImageReply {
            relay_id: id,
            images: vec![pb::NodeImage {
                digest: "sha256:bb".into(),
                ..Default::default()
            }],
            ..Default::default()
        }));
        let (reply, seen) = task.await.unwrap();
        assert_eq!(reply.unwrap().images[0].digest, "sha256:bb");
        assert_eq!(seen, [10, 60, 100]);
        assert_eq!(relays.asks_waiting("n1"), 0);
        // A late frame of the finished pull is dropped.
        node.deliver(progress(id, 100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pull_that_goes_silent_times_out_and_leaves_the_table() {
        let relays = Relays::new("s");
        let (node, mut agent) = session(&relays, "n1");
        let idle = std::time::Duration::from_secs(60);
        let (id, task) = following(&relays, &mut agent, idle).await;
        node.deliver(progress(id, 10));
        let (reply, seen) = task.await.unwrap();
        let err = reply.unwrap_err();
        assert_eq!(
            err,
            AskError::Silent {
                node: "n1".into(),
                after: idle
            }
        );
        assert!(err.to_string().contains("no progress for 60s"), "{err}");
        assert_eq!(seen, [10]);
        assert_eq!(relays.asks_waiting("n1"), 0);
    }

    #[tokio::test]
    async fn a_session_that_ends_fails_a_pull_at_once() {
        let relays = Relays::new("s");
        let (node, mut agent) = session(&relays, "n1");
        let idle = std::time::Duration::from_secs(3600);
        let (id, task) = following(&relays, &mut agent, idle).await;
        node.deliver(progress(id, 10));
        drop(node);
        let (reply, _) = tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("failed at once")
            .unwrap();
        assert_eq!(reply.unwrap_err(), AskError::Ended { node: "n1".into() });
    }

    #[tokio::test]
    async fn exec_input_follows_the_start_and_stops_with_the_stream() {
        let relays = Relays::new("s");
        let (node, mut agent) = session(&relays, "n1");
        let start = pb::ExecStart {
            instance_id: "web-1".into(),
            command: vec!["cat".into()],
            stdin: true,
            ..Default::default()
        };
        let (mut stream, mut inputs) = relays.open_exec("n1", start).await.unwrap();
        let ToAgent::ExecStart(open) = sent(&mut agent) else {
            panic!("expected an exec start")
        };
        assert_eq!(open.start.unwrap().command, ["cat"]);
        assert!(
            inputs
                .send(pb::exec_input::Input::Stdin(b"hi".to_vec()))
                .await
        );
        assert!(inputs.send(pb::exec_input::Input::CloseStdin(true)).await);
        let ToAgent::ExecInput(first) = sent(&mut agent) else {
            panic!("expected input")
        };
        assert_eq!(first.relay_id, open.relay_id);
        assert_eq!(
            first.input.unwrap().input,
            Some(pb::exec_input::Input::Stdin(b"hi".to_vec()))
        );
        let ToAgent::ExecInput(second) = sent(&mut agent) else {
            panic!("expected input")
        };
        assert_eq!(
            second.input.unwrap().input,
            Some(pb::exec_input::Input::CloseStdin(true))
        );
        let output = |output| {
            Frame::Exec(pb::ExecOutputFrame {
                relay_id: open.relay_id,
                output: Some(pb::ExecOutput {
                    output: Some(output),
                }),
            })
        };
        node.deliver(output(pb::exec_output::Output::Stdout(b"hi".to_vec())));
        node.deliver(output(pb::exec_output::Output::ExitCode(3)));
        node.deliver(end(open.relay_id, Code::Ok, ""));
        let got: Vec<_> = (&mut stream).map(|o| o.unwrap().output).collect().await;
        assert_eq!(
            got,
            [
                Some(pb::exec_output::Output::Stdout(b"hi".to_vec())),
                Some(pb::exec_output::Output::ExitCode(3))
            ]
        );
        drop(stream);
        // The forwarder hears that the client's stream is gone.
        tokio::time::timeout(std::time::Duration::from_secs(5), inputs.closed())
            .await
            .unwrap();
    }
}
