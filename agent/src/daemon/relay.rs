//! The agent's side of the logs and exec relays: requests arrive over the node session
//! (`logs`, `exec_start`, `exec_input`, `relay_cancel`), each relay runs as its own task and
//! streams its frames back, ending with `relay_end`.
//!
//! - Logs read the instance's container log files with [`LogReader`] (tail, since, follow,
//!   stream filter) and send chunks of whole lines of one stream, at most 64 KiB, lines within
//!   [`CHUNK_SPAN`] of the chunk's first line (so the chunk's time is each line's time to
//!   within that). A following relay ends once the container has stopped and its log is read.
//!   Logs of a previous run are not kept: a restart removes the old container with its logs.
//! - Exec runs the command with the runtime's streaming exec; stdin, `close_stdin` (EOF) and
//!   resizes are applied in order; the last output frame carries the exit code.
//! - `relay_cancel`, and the end of the session, stop a relay: an exec's process is killed.
//! - `stats_request` and `image_request` are answered by one `stats` or `images` message from
//!   a task of their own ([`super::stats::measure`], [`super::images::answer`]), which needs no
//!   cancelling: it ends within its window or its store operation (a pull or an import, which
//!   sends `image_progress` frames first, ends with its download).
//!
//! Relay frames go to the session through their own bounded queue, which the session sends
//! after its own messages (heartbeats, status reports), so relays never hold those up; relay
//! tasks wait on that queue, which paces log reading to what the session can carry. Input for
//! an exec is queued without waiting ([`EXEC_INPUT_QUEUE`] frames); an exec whose process reads
//! its stdin slower than it arrives is ended with RESOURCE_EXHAUSTED rather than stall the
//! session.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use gantry::pb;
use gantry::pb::agent_message::Message as ToScheduler;
use gantry::pb::scheduler_message::Message as FromScheduler;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use super::instance::Env;
use crate::logs::{LogEntry, LogReader, ReadOptions, Stream};
use crate::runtime::builtin::RuntimeError;
use crate::runtime::exec::ExecControl;
use crate::runtime::{ContainerState, ExecSpec, Runtime};

/// Largest log chunk, in bytes (the protocol's bound).
pub const MAX_CHUNK: usize = 64 * 1024;
/// Lines joining one log chunk are at most this much younger than its first line.
pub const CHUNK_SPAN: Duration = Duration::from_millis(1);
/// Exec input frames queued for a process before its relay is ended.
pub const EXEC_INPUT_QUEUE: usize = 256;
/// Relay frames queued for the session.
pub const OUTBOUND_QUEUE: usize = 16;
/// A log chunk that is not full waits this long for more lines.
const FLUSH_AFTER: Duration = Duration::from_millis(20);
/// Largest read of exec output.
const EXEC_READ: usize = 32 * 1024;
/// How long an exec's output is still read after its process exited (a child of it may hold
/// the pipes open).
const OUTPUT_GRACE: Duration = Duration::from_secs(1);

/// gRPC codes of `relay_end`.
mod code {
    pub const OK: i32 = 0;
    pub const CANCELLED: i32 = 1;
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const NOT_FOUND: i32 = 5;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const FAILED_PRECONDITION: i32 = 9;
    pub const INTERNAL: i32 = 13;
}

/// How a relay ended: a gRPC code and message.
type End = (i32, String);

/// Tells a relay task to stop, and how to end; a dropped sender (the session ended) stops it
/// as cancelled.
type Cancel = oneshot::Receiver<End>;

/// How a relay stopped by `cancel` ends.
fn cancelled(reason: Result<End, oneshot::error::RecvError>) -> End {
    reason.unwrap_or_else(|_| (code::CANCELLED, "the session ended".into()))
}

/// What the relays of every session share: the agent's runtime.
#[derive(Clone)]
pub struct Relays {
    env: Arc<Env>,
}

impl Relays {
    /// Relays over the agent's environment.
    pub fn new(env: Arc<Env>) -> Self {
        Relays { env }
    }

    /// The relays of one session, whose frames go to `out`; `channel` is the session's
    /// connection to the scheduler (image imports fetch their uploads over it).
    pub fn session(
        &self,
        out: mpsc::Sender<pb::AgentMessage>,
        channel: tonic::transport::Channel,
    ) -> SessionRelays {
        SessionRelays {
            env: self.env.clone(),
            out,
            channel,
            open: HashMap::new(),
        }
    }
}

/// The relays of one session. Dropping it stops them all (exec processes are killed).
pub struct SessionRelays {
    env: Arc<Env>,
    out: mpsc::Sender<pb::AgentMessage>,
    channel: tonic::transport::Channel,
    open: HashMap<u64, Open>,
}

struct Open {
    /// Sent (with how the relay ends) or dropped to stop the relay.
    cancel: oneshot::Sender<End>,
    /// Exec input, for exec relays.
    input: Option<mpsc::Sender<pb::exec_input::Input>>,
    task: tokio::task::JoinHandle<()>,
}

impl SessionRelays {
    /// Handles a relay request of the scheduler; never waits.
    pub fn handle(&mut self, message: FromScheduler) {
        self.open.retain(|_, open| !open.task.is_finished());
        match message {
            FromScheduler::Logs(pb::LogsOpen { relay_id, request }) => {
                let Some(request) = request else {
                    self.refuse(relay_id, "logs request without `request`");
                    return;
                };
                let env = self.env.clone();
                self.start(relay_id, None, move |out, cancel| {
                    logs(env, relay_id, request, out, cancel)
                });
            }
            FromScheduler::ExecStart(pb::ExecOpen { relay_id, start }) => {
                let Some(start) = start else {
                    self.refuse(relay_id, "exec request without `start`");
                    return;
                };
                let env = self.env.clone();
                let (tx, rx) = mpsc::channel(EXEC_INPUT_QUEUE);
                self.start(relay_id, Some(tx), move |out, cancel| {
                    exec(env, relay_id, start, rx, out, cancel)
                });
            }
            FromScheduler::ExecInput(pb::ExecInputFrame { relay_id, input }) => {
                let Some(input) = input.and_then(|i| i.input) else {
                    return;
                };
                let Some(open) = self.open.get(&relay_id) else {
                    debug!(relay_id, "input for a relay that is gone dropped");
                    return;
                };
                let Some(tx) = &open.input else {
                    return;
                };
                if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(input) {
                    debug!(
                        relay_id,
                        "exec input arrives faster than the process reads it"
                    );
                    if let Some(open) = self.open.remove(&relay_id) {
                        let _ = open.cancel.send((
                            code::RESOURCE_EXHAUSTED,
                            "the process reads its input slower than it arrives; the exec was stopped"
                                .into(),
                        ));
                    }
                }
            }
            FromScheduler::RelayCancel(pb::RelayCancel { relay_id }) => {
                if let Some(open) = self.open.remove(&relay_id) {
                    let _ = open
                        .cancel
                        .send((code::CANCELLED, "cancelled by the client".into()));
                }
            }
            FromScheduler::StatsRequest(request) => {
                let env = self.env.clone();
                let out = self.out.clone();
                tokio::spawn(async move {
                    let reply = super::stats::measure(env, request).await;
                    let message = pb::AgentMessage {
                        message: Some(ToScheduler::Stats(reply)),
                    };
                    // A session that ended meanwhile has no one to answer.
                    let _ = out.send(message).await;
                });
            }
            FromScheduler::ImageRequest(request) => {
                let env = self.env.clone();
                let out = self.out.clone();
                let channel = self.channel.clone();
                tokio::spawn(async move {
                    let reply = super::images::answer(env, request, &out, channel).await;
                    let message = pb::AgentMessage {
                        message: Some(ToScheduler::Images(reply)),
                    };
                    let _ = out.send(message).await;
                });
            }
            FromScheduler::Welcome(_)
            | FromScheduler::Assignments(_)
            | FromScheduler::AssignmentDelta(_)
            | FromScheduler::Network(_)
            | FromScheduler::Names(_) => {}
        }
    }

    fn start<F, Fut>(
        &mut self,
        relay_id: u64,
        input: Option<mpsc::Sender<pb::exec_input::Input>>,
        run: F,
    ) where
        F: FnOnce(mpsc::Sender<pb::AgentMessage>, Cancel) -> Fut,
        Fut: Future<Output = End> + Send + 'static,
    {
        if self.open.contains_key(&relay_id) {
            self.refuse(relay_id, "relay id already in use");
            return;
        }
        let (cancel_tx, cancel_rx) = oneshot::channel();
        let out = self.out.clone();
        let relay = run(out.clone(), cancel_rx);
        let task = tokio::spawn(async move {
            let ended = relay.await;
            let _ = out.send(end_message(relay_id, ended)).await;
        });
        self.open.insert(
            relay_id,
            Open {
                cancel: cancel_tx,
                input,
                task,
            },
        );
    }

    fn refuse(&self, relay_id: u64, message: &str) {
        end(
            &self.out,
            relay_id,
            (code::INVALID_ARGUMENT, message.to_owned()),
        );
    }
}

fn end_message(relay_id: u64, (code, message): End) -> pb::AgentMessage {
    pb::AgentMessage {
        message: Some(ToScheduler::RelayEnd(pb::RelayEnd {
            relay_id,
            code,
            message,
        })),
    }
}

/// Sends `relay_end` from the (synchronous) session loop without waiting there.
fn end(out: &mpsc::Sender<pb::AgentMessage>, relay_id: u64, ended: End) {
    let out = out.clone();
    tokio::spawn(async move {
        let _ = out.send(end_message(relay_id, ended)).await;
    });
}

fn runtime_end(instance: &str, err: &RuntimeError) -> End {
    match err {
        RuntimeError::NotFound(_) => (
            code::NOT_FOUND,
            format!(
                "instance {instance} has no container on this node (not started yet, or removed); \
                 see `gantry describe instance {instance}`"
            ),
        ),
        RuntimeError::WrongState { .. } => (
            code::FAILED_PRECONDITION,
            format!("instance {instance}: {err}"),
        ),
        _ => (code::INTERNAL, format!("instance {instance}: {err}")),
    }
}

/// A log chunk being filled.
struct Chunk {
    stream: Stream,
    time: SystemTime,
    data: Vec<u8>,
}

impl Chunk {
    fn takes(&self, entry: &LogEntry) -> bool {
        entry.stream == self.stream
            && self.data.len() + entry.content.len() < MAX_CHUNK
            && entry
                .time
                .duration_since(self.time)
                .is_ok_and(|d| d <= CHUNK_SPAN)
    }

    fn push(&mut self, entry: LogEntry) {
        self.data.extend_from_slice(&entry.content);
        if !entry.partial {
            self.data.push(b'\n');
        }
    }

    fn frame(self, relay_id: u64) -> pb::AgentMessage {
        pb::AgentMessage {
            message: Some(ToScheduler::Logs(pb::LogsFrame {
                relay_id,
                chunk: Some(pb::LogChunk {
                    stream: match self.stream {
                        Stream::Stdout => pb::LogStream::Stdout,
                        Stream::Stderr => pb::LogStream::Stderr,
                    } as i32,
                    data: self.data,
                    time: Some(self.time.into()),
                }),
            })),
        }
    }
}

/// One logs relay.
async fn logs(
    env: Arc<Env>,
    relay_id: u64,
    request: pb::LogsRequest,
    out: mpsc::Sender<pb::AgentMessage>,
    mut cancel: Cancel,
) -> End {
    let pb::LogsRequest {
        instance_id,
        tail_lines,
        follow,
        since,
        stream,
        previous,
    } = request;
    if previous {
        return (
            code::FAILED_PRECONDITION,
            format!(
                "logs of the previous run of {instance_id} are not kept: a restart replaces the \
                 container together with its logs"
            ),
        );
    }
    let only = match pb::LogStream::try_from(stream) {
        Ok(pb::LogStream::Unspecified) => None,
        Ok(pb::LogStream::Stdout) => Some(Stream::Stdout),
        Ok(pb::LogStream::Stderr) => Some(Stream::Stderr),
        Err(_) => {
            return (
                code::INVALID_ARGUMENT,
                format!("stream: unknown value {stream}; expected stdout or stderr"),
            );
        }
    };
    let since = match since.map(SystemTime::try_from).transpose() {
        Ok(since) => since,
        Err(err) => return (code::INVALID_ARGUMENT, format!("since: {err}")),
    };
    let info = match env.runtime.state(&instance_id).await {
        Ok(info) => info,
        Err(err) => return runtime_end(&instance_id, &err),
    };
    let options = ReadOptions {
        tail: tail_lines.map(|n| n as usize),
        since,
        follow,
    };
    let mut reader = match LogReader::open(&info.log_dir, options) {
        Ok(reader) => reader,
        Err(err) => return (code::INTERNAL, format!("reading the logs: {err}")),
    };
    let mut following = follow;
    if following && matches!(info.state, ContainerState::Stopped(_)) {
        reader.stop_following();
        following = false;
    }
    // Resolves when the container stops (the runtime watches its process; nothing is polled).
    let stopped = env.runtime.wait(&instance_id);
    tokio::pin!(stopped);
    let mut chunk: Option<Chunk> = None;
    let mut flush_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            biased;
            reason = &mut cancel => return cancelled(reason),
            entry = reader.next() => match entry {
                None => break,
                Some(Err(err)) => return (code::INTERNAL, format!("reading the logs: {err}")),
                Some(Ok(entry)) => {
                    if only.is_some_and(|s| s != entry.stream) {
                        continue;
                    }
                    if let Some(open) = chunk.take_if(|c| !c.takes(&entry))
                        && out.send(open.frame(relay_id)).await.is_err()
                    {
                        return (code::CANCELLED, "session ended".into());
                    }
                    let open = chunk.get_or_insert_with(|| Chunk {
                        stream: entry.stream,
                        time: entry.time,
                        data: Vec::new(),
                    });
                    open.push(entry);
                    flush_at.get_or_insert_with(|| tokio::time::Instant::now() + FLUSH_AFTER);
                }
            },
            () = sleep_until(flush_at) => {
                flush_at = None;
                if let Some(open) = chunk.take()
                    && out.send(open.frame(relay_id)).await.is_err()
                {
                    return (code::CANCELLED, "session ended".into());
                }
            }
            _ = &mut stopped, if following => {
                // The log writer (the shim) has exited: what is in the files is all there is.
                reader.stop_following();
                following = false;
            }
        }
    }
    if let Some(open) = chunk.take()
        && out.send(open.frame(relay_id)).await.is_err()
    {
        return (code::CANCELLED, "session ended".into());
    }
    (code::OK, String::new())
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The runtime's exec of an `ExecStart`.
fn exec_spec(start: pb::ExecStart) -> (String, ExecSpec, Option<pb::TerminalSize>) {
    let pb::ExecStart {
        instance_id,
        command,
        tty,
        stdin,
        env,
        working_dir,
        user,
        size,
    } = start;
    let mut spec = ExecSpec::new(command);
    let mut env: Vec<String> = env.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.sort();
    spec.env = env;
    spec.cwd = (!working_dir.is_empty()).then(|| working_dir.into());
    spec.user = user;
    spec.tty = tty;
    spec.stdin = stdin;
    (instance_id, spec, size)
}

fn output(relay_id: u64, output: pb::exec_output::Output) -> pb::AgentMessage {
    pb::AgentMessage {
        message: Some(ToScheduler::ExecOutput(pb::ExecOutputFrame {
            relay_id,
            output: Some(pb::ExecOutput {
                output: Some(output),
            }),
        })),
    }
}

fn resize(control: &ExecControl, size: pb::TerminalSize) {
    let pb::TerminalSize { cols, rows } = size;
    let clamp = |n: u32| u16::try_from(n).unwrap_or(u16::MAX);
    if rows > 0
        && cols > 0
        && let Err(err) = control.resize(clamp(rows), clamp(cols))
    {
        debug!(%err, "exec resize failed");
    }
}

/// Sends what `pipe` yields as output frames made by `make` until its end.
async fn pump(
    mut pipe: impl AsyncRead + Unpin,
    out: mpsc::Sender<pb::AgentMessage>,
    relay_id: u64,
    make: fn(Vec<u8>) -> pb::exec_output::Output,
) {
    let mut buf = vec![0; EXEC_READ];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if out
                    .send(output(relay_id, make(buf[..n].to_vec())))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

/// One exec relay.
async fn exec(
    env: Arc<Env>,
    relay_id: u64,
    start: pb::ExecStart,
    mut input: mpsc::Receiver<pb::exec_input::Input>,
    out: mpsc::Sender<pb::AgentMessage>,
    mut cancel: Cancel,
) -> End {
    let (instance_id, spec, size) = exec_spec(start);
    if spec.args.first().is_none_or(String::is_empty) {
        return (
            code::INVALID_ARGUMENT,
            "command: required; give the program to run".into(),
        );
    }
    let mut process = match env.runtime.spawn_exec(&instance_id, spec).await {
        Ok(process) => process,
        Err(err) => return runtime_end(&instance_id, &err),
    };
    let control = process.control();
    if let Some(size) = size {
        resize(&control, size);
    }
    // Input: applied in order by one task, so that a slow reader of stdin holds up nothing
    // but the input behind it.
    let mut stdin = process.take_stdin();
    let input_task = tokio::spawn({
        let control = control.clone();
        async move {
            while let Some(next) = input.recv().await {
                match next {
                    pb::exec_input::Input::Stdin(data) => {
                        if let Some(w) = stdin.as_mut()
                            && w.write_all(&data).await.is_err()
                        {
                            stdin = None;
                        }
                    }
                    pb::exec_input::Input::CloseStdin(_) => {
                        if let Some(mut w) = stdin.take() {
                            let _ = w.shutdown().await;
                        }
                    }
                    pb::exec_input::Input::Resize(size) => resize(&control, size),
                    pb::exec_input::Input::Start(_) => {}
                }
            }
        }
    });
    let stdout = process.take_stdout().map(|p| {
        tokio::spawn(pump(
            p,
            out.clone(),
            relay_id,
            pb::exec_output::Output::Stdout,
        ))
    });
    let stderr = process.take_stderr().map(|p| {
        tokio::spawn(pump(
            p,
            out.clone(),
            relay_id,
            pb::exec_output::Output::Stderr,
        ))
    });
    let waited = tokio::select! {
        reason = &mut cancel => Err(cancelled(reason)),
        code = process.wait() => Ok(code),
    };
    input_task.abort();
    let code = match waited {
        Ok(Ok(code)) => code,
        Ok(Err(err)) => {
            for task in [stdout, stderr].into_iter().flatten() {
                task.abort();
            }
            return (code::INTERNAL, format!("exec in {instance_id}: {err}"));
        }
        Err(ended) => {
            control.kill();
            let _ = tokio::time::timeout(OUTPUT_GRACE, process.wait()).await;
            for task in [stdout, stderr].into_iter().flatten() {
                task.abort();
            }
            return ended;
        }
    };
    for task in [stdout, stderr].into_iter().flatten() {
        let abort = task.abort_handle();
        if tokio::time::timeout(OUTPUT_GRACE, task).await.is_err() {
            abort.abort();
        }
    }
    if out
        .send(output(relay_id, pb::exec_output::Output::ExitCode(code)))
        .await
        .is_err()
    {
        return (code::CANCELLED, "the session ended".into());
    }
    (code::OK, String::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(stream: Stream, at_micros: u64, text: &str, partial: bool) -> LogEntry {
        LogEntry {
            time: SystemTime::UNIX_EPOCH + Duration::from_micros(at_micros),
            stream,
            partial,
            content: text.as_bytes().to_vec(),
        }
    }

    #[test]
    fn chunks_hold_whole_lines_of_one_stream_written_together() {
        let first = entry(Stream::Stdout, 1_000, "a", false);
        let mut chunk = Chunk {
            stream: first.stream,
            time: first.time,
            data: Vec::new(),
        };
        chunk.push(first);
        let same_burst = entry(Stream::Stdout, 1_900, "b", false);
        assert!(chunk.takes(&same_burst));
        chunk.push(same_burst);
        // A piece of a long line gets no newline of its own.
        chunk.push(entry(Stream::Stdout, 1_900, "c", true));
        assert_eq!(chunk.data, b"a\nb\nc");
        assert!(!chunk.takes(&entry(Stream::Stderr, 1_000, "e", false)));
        assert!(!chunk.takes(&entry(Stream::Stdout, 2_001, "late", false)));
        let big = "x".repeat(MAX_CHUNK);
        assert!(!chunk.takes(&entry(Stream::Stdout, 1_000, &big, false)));
        let pb::AgentMessage {
            message: Some(ToScheduler::Logs(frame)),
        } = chunk.frame(7)
        else {
            panic!("a logs frame")
        };
        assert_eq!(frame.relay_id, 7);
        let sent = frame.chunk.unwrap();
        assert_eq!(sent.stream, pb::LogStream::Stdout as i32);
        assert_eq!(sent.data, b"a\nb\nc");
        assert_eq!(sent.time.unwrap().nanos, 1_000_000);
    }

    #[test]
    fn exec_starts_become_runtime_execs() {
        let (id, spec, size) = exec_spec(pb::ExecStart {
            instance_id: "web-1".into(),
            command: vec!["sh".into(), "-c".into(), "env".into()],
            tty: true,
            stdin: true,
            env: [
                ("B".to_owned(), "2".to_owned()),
                ("A".to_owned(), "1".to_owned()),
            ]
            .into(),
            working_dir: "/tmp".into(),
            user: "1000".into(),
            size: Some(pb::TerminalSize { cols: 80, rows: 24 }),
        });
        assert_eq!(id, "web-1");
        assert_eq!(spec.args, ["sh", "-c", "env"]);
        assert_eq!(spec.env, ["A=1", "B=2"]);
        assert_eq!(spec.cwd.as_deref(), Some(std::path::Path::new("/tmp")));
        assert_eq!(spec.user, "1000");
        assert!(spec.tty && spec.stdin);
        assert_eq!(size.map(|s| (s.rows, s.cols)), Some((24, 80)));
        let (_, spec, _) = exec_spec(pb::ExecStart {
            command: vec!["true".into()],
            ..Default::default()
        });
        assert_eq!(spec.cwd, None);
        assert!(!spec.tty && !spec.stdin);
    }
}
