//! Health probes of one run of a container: the pure counting state machine of a probe
//! ([`Tracker`]), the checks themselves (`exec` through the runtime, `tcp` and `http` to the
//! container's loopback, made from inside its network namespace), and one loop task per probe
//! that checks every period and reports each change of verdict to the instance worker.
//!
//! # Where checks connect
//!
//! Instances run either in the host's network namespace (`network: host`) or in a namespace of
//! their own. Checks always connect to `127.0.0.1:<port>`; for a container with its own
//! namespace the socket is made on a short-lived `std::thread` that joined the namespace
//! (`/proc/<init pid>/ns/net`, opened once per run) — a socket stays in the namespace it was
//! created in — and is then handed to tokio. The tokio workers never change namespace.
//!
//! # HTTP
//!
//! The `http` check is a minimal HTTP/1.1 GET written here over a tokio `TcpStream`: the
//! request line, `Host`, `User-Agent` and `Connection: close`, then only the response's status
//! line is read (200–399 is success). An HTTP client crate (hyper-util) would need a
//! connector that dials through the namespace thread and brings features the probe never
//! uses (bodies, pooling, redirects are not followed by Kubernetes' prober either).

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use gantry::workload::Probe;
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::instance::Env;
use crate::runtime::{ExecSpec, Runtime};

/// Most bytes of an HTTP response head read while looking for the status line.
const MAX_STATUS_LINE: usize = 8 * 1024;
/// Most bytes of an exec check's output kept for the failure message.
const EXEC_OUTPUT_LIMIT: usize = 1024;

/// Why a check failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The check did not finish within the probe's timeout.
    #[error("timed out after {after:?}")]
    Timeout {
        /// The probe's timeout.
        after: Duration,
    },
    /// The container's network namespace could not be opened or joined.
    #[error("cannot enter the network namespace {path}")]
    Netns {
        /// The namespace file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No thread could be started to connect from.
    #[error("cannot start a thread to connect to {addr}")]
    Thread {
        /// Where the check connects.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The connection failed.
    #[error("cannot connect to {addr}")]
    Connect {
        /// Where the check connects.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The HTTP exchange failed after connecting.
    #[error("http get {path} on port {port}")]
    Http {
        /// Port of the check.
        port: u16,
        /// Path of the request.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The HTTP response's status is not success (200–399).
    #[error("http get {path} on port {port}: status {status}")]
    HttpStatus {
        /// Port of the check.
        port: u16,
        /// Path of the request.
        path: String,
        /// The status code.
        status: u16,
    },
    /// A path that cannot go into a request line.
    #[error("http path {path:?} is not a valid request target")]
    HttpPath {
        /// The path.
        path: String,
    },
    /// A port out of range.
    #[error("port {port} is out of range")]
    Port {
        /// The port as written.
        port: u32,
    },
    /// The exec could not run.
    #[error("exec {command:?}")]
    Exec {
        /// The command.
        command: Vec<String>,
        /// Why.
        #[source]
        source: crate::runtime::RuntimeError,
    },
    /// The exec ran and exited non-zero.
    #[error("exec {command:?} exited with code {code}: {output}")]
    ExecExit {
        /// The command.
        command: Vec<String>,
        /// Its exit code.
        code: i32,
        /// The start of its output (stdout, then stderr).
        output: String,
    },
}

/// What a probe decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Whether the instance is ready for traffic.
    Readiness,
    /// Whether the instance is alive; a failed one is killed and restarted.
    Liveness,
}

/// What a probe concluded so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Readiness passed.
    Ready,
    /// Readiness did not pass (yet, or any more).
    Unready,
    /// Liveness has not failed.
    Healthy,
    /// Liveness failed: the container is to be killed.
    Failed,
}

/// The verdict after `successes` or `failures` consecutive results (one of them is 0) in
/// `verdict`. Every edge of a probe's state machine is here.
pub fn transition(
    verdict: Verdict,
    successes: u32,
    failures: u32,
    success_threshold: u32,
    failure_threshold: u32,
) -> Verdict {
    use Verdict::*;
    match verdict {
        // Unready --success_threshold consecutive successes--> Ready
        Unready if successes >= success_threshold => Ready,
        // Ready --failure_threshold consecutive failures--> Unready
        Ready if failures >= failure_threshold => Unready,
        // Healthy --failure_threshold consecutive failures--> Failed
        Healthy if failures >= failure_threshold => Failed,
        // Failed is final for this run: the container is killed and its next run gets a new
        // probe. Anything else stays.
        other => other,
    }
}

/// The counting state of one probe: consecutive successes and failures against the thresholds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracker {
    verdict: Verdict,
    success_threshold: u32,
    failure_threshold: u32,
    successes: u32,
    failures: u32,
}

impl Tracker {
    /// A readiness probe starting `Ready` (a run adopted from an earlier agent that found it
    /// ready) or `Unready` (a new run).
    pub fn readiness(ready: bool, success_threshold: u32, failure_threshold: u32) -> Tracker {
        let verdict = if ready {
            Verdict::Ready
        } else {
            Verdict::Unready
        };
        Tracker::new(verdict, success_threshold, failure_threshold)
    }

    /// A liveness probe: healthy until `failure_threshold` consecutive failures.
    pub fn liveness(failure_threshold: u32) -> Tracker {
        Tracker::new(Verdict::Healthy, 1, failure_threshold)
    }

    fn new(verdict: Verdict, success_threshold: u32, failure_threshold: u32) -> Tracker {
        // Validation keeps thresholds at 1 or more; 0 would mean "at once" anyway.
        Tracker {
            verdict,
            success_threshold: success_threshold.max(1),
            failure_threshold: failure_threshold.max(1),
            successes: 0,
            failures: 0,
        }
    }

    /// The current verdict.
    pub fn verdict(&self) -> Verdict {
        self.verdict
    }

    /// Counts the result of one check; returns the new verdict when it changed.
    pub fn observe(&mut self, success: bool) -> Option<Verdict> {
        if success {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
        }
        let next = transition(
            self.verdict,
            self.successes,
            self.failures,
            self.success_threshold,
            self.failure_threshold,
        );
        (next != self.verdict).then(|| {
            self.verdict = next;
            next
        })
    }
}

/// How long to wait before a probe's first check: `initial_delay` counted from the start of the
/// run (`started_at`), so that a run adopted after an agent restart is not delayed again.
pub fn delay_left(initial_delay: Duration, started_at: SystemTime, now: SystemTime) -> Duration {
    let ran_for = now.duration_since(started_at).unwrap_or_default();
    initial_delay.saturating_sub(ran_for)
}

/// The timing of a probe loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Before the first check.
    pub delay: Duration,
    /// Between checks.
    pub period: Duration,
    /// Bound of each check.
    pub timeout: Duration,
}

impl Timing {
    /// The timing of `probe` for a run that started at `started_at`, seen at `now`.
    pub fn of(probe: &Probe, started_at: SystemTime, now: SystemTime) -> Timing {
        Timing {
            delay: delay_left(probe.initial_delay.get(), started_at, now),
            period: probe.period.get(),
            timeout: probe.timeout.get(),
        }
    }
}

/// The network namespace a check connects in.
#[derive(Debug, Clone)]
pub enum Network {
    /// The agent's own (the container runs with `network: host`).
    Host,
    /// The container's own namespace, held open for the run.
    Container {
        /// The namespace file it was opened from (for messages).
        path: PathBuf,
        /// The open namespace.
        ns: Arc<OwnedFd>,
    },
}

impl Network {
    /// Opens the network namespace file at `path` (`/proc/<init pid>/ns/net`). Holding it open
    /// keeps naming the same namespace even after the pid is reused.
    pub fn open(path: &Path) -> Result<Network, ProbeError> {
        let file = std::fs::File::open(path).map_err(|source| ProbeError::Netns {
            path: path.to_owned(),
            source,
        })?;
        Ok(Network::Container {
            path: path.to_owned(),
            ns: Arc::new(OwnedFd::from(file)),
        })
    }
}

/// Connects to `127.0.0.1:port` in `network`. Unbounded in time when the peer does not answer:
/// the caller bounds it with the probe's timeout (and `timeout` bounds the connecting thread).
pub async fn connect(
    network: &Network,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, ProbeError> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let connect_err = |source| ProbeError::Connect { addr, source };
    match network {
        Network::Host => TcpStream::connect(addr).await.map_err(connect_err),
        Network::Container { path, ns } => {
            let (tx, rx) = oneshot::channel();
            let ns = ns.clone();
            let path = path.clone();
            std::thread::Builder::new()
                .name("gantry-probe".into())
                .spawn(move || {
                    // This thread ends right after: its namespace change dies with it.
                    let joined =
                        move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network))
                            .map_err(|e| ProbeError::Netns {
                                path,
                                source: e.into(),
                            });
                    let connected = joined.and_then(|()| {
                        std::net::TcpStream::connect_timeout(
                            &addr,
                            timeout.max(Duration::from_millis(1)),
                        )
                        .and_then(|s| s.set_nonblocking(true).map(|()| s))
                        .map_err(|source| ProbeError::Connect { addr, source })
                    });
                    // The receiver is gone only when the check timed out.
                    let _ = tx.send(connected);
                })
                .map_err(|source| ProbeError::Thread { addr, source })?;
            let stream = rx.await.map_err(|_| ProbeError::Connect {
                addr,
                source: io::Error::other("the connecting thread ended without an answer"),
            })??;
            TcpStream::from_std(stream).map_err(connect_err)
        }
    }
}

/// A `tcp` check: success when a connection to `port` opens.
pub async fn tcp(network: &Network, port: u32, timeout: Duration) -> Result<(), ProbeError> {
    let port = port16(port)?;
    connect(network, port, timeout).await.map(drop)
}

/// An `http` check: a GET of `path` on `port`; success when the status is 200–399.
pub async fn http(
    network: &Network,
    port: u32,
    path: &str,
    timeout: Duration,
) -> Result<(), ProbeError> {
    let port = port16(port)?;
    if path.is_empty()
        || path
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(ProbeError::HttpPath {
            path: path.to_owned(),
        });
    }
    let mut stream = connect(network, port, timeout).await?;
    let http_err = |source| ProbeError::Http {
        port,
        path: path.to_owned(),
        source,
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: gantry-probe/{}\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(http_err)?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    let status = loop {
        if let Some(status) = status_code(&head) {
            break status.map_err(http_err)?;
        }
        if head.len() >= MAX_STATUS_LINE {
            return Err(http_err(io::Error::new(
                io::ErrorKind::InvalidData,
                "no status line in the first 8 KiB",
            )));
        }
        let n = stream.read(&mut buf).await.map_err(http_err)?;
        if n == 0 {
            return Err(http_err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before a status line",
            )));
        }
        head.extend_from_slice(&buf[..n]);
    };
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(ProbeError::HttpStatus {
            port,
            path: path.to_owned(),
            status,
        })
    }
}

/// The status code of an HTTP response starting with `head`: `None` while the status line is
/// incomplete, an error when it is not `HTTP/1.x NNN …`.
fn status_code(head: &[u8]) -> Option<io::Result<u16>> {
    let end = head.windows(2).position(|w| w == b"\r\n")?;
    let line = String::from_utf8_lossy(&head[..end]);
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    let parsed = if version.starts_with("HTTP/1.") && code.len() == 3 {
        code.parse::<u16>().ok()
    } else {
        None
    };
    Some(parsed.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not an HTTP/1 status line: {line:?}"),
        )
    }))
}

fn port16(port: u32) -> Result<u16, ProbeError> {
    u16::try_from(port)
        .ok()
        .filter(|&p| p != 0)
        .ok_or(ProbeError::Port { port })
}

/// One check, run once per period.
pub trait Check: Send + Sync + 'static {
    /// Runs the check once. The probe loop bounds it with the probe's timeout.
    fn check(&self, timeout: Duration) -> impl Future<Output = Result<(), ProbeError>> + Send;
}

/// What a container check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run a command in the container; exit code 0 is success.
    Exec(Vec<String>),
    /// GET `path` on `port`.
    Http {
        /// Port.
        port: u32,
        /// Path.
        path: String,
    },
    /// Connect to `port`.
    Tcp(u32),
}

impl Action {
    /// The action of `probe`; `None` when it names none (validation prevents that).
    pub fn of(probe: &Probe) -> Option<Action> {
        if let Some(exec) = &probe.exec {
            Some(Action::Exec(exec.command.clone()))
        } else if let Some(http) = &probe.http {
            Some(Action::Http {
                port: http.port,
                path: http.path.clone(),
            })
        } else {
            probe.tcp.as_ref().map(|tcp| Action::Tcp(tcp.port))
        }
    }
}

/// A check of a real container of this node.
pub struct ContainerCheck {
    /// What the workers share (the runtime runs exec checks).
    pub env: Arc<Env>,
    /// The container.
    pub container: String,
    /// What to check.
    pub action: Action,
    /// Where `tcp` and `http` connect.
    pub network: Network,
}

impl Check for ContainerCheck {
    async fn check(&self, timeout: Duration) -> Result<(), ProbeError> {
        match &self.action {
            Action::Tcp(port) => tcp(&self.network, *port, timeout).await,
            Action::Http { port, path } => http(&self.network, *port, path, timeout).await,
            Action::Exec(command) => {
                let mut spec = ExecSpec::new(command.iter().cloned());
                spec.output_limit = EXEC_OUTPUT_LIMIT;
                // On timeout this future is dropped, which kills the exec helper.
                let out = self
                    .env
                    .runtime
                    .exec(&self.container, spec)
                    .await
                    .map_err(|source| ProbeError::Exec {
                        command: command.clone(),
                        source,
                    })?;
                if out.code == 0 {
                    return Ok(());
                }
                let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
                output.push_str(&String::from_utf8_lossy(&out.stderr));
                Err(ProbeError::ExecExit {
                    command: command.clone(),
                    code: out.code,
                    output: output.trim().chars().take(200).collect(),
                })
            }
        }
    }
}

/// A change of a probe's verdict, as reported to the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Which probe.
    pub kind: Kind,
    /// Its new verdict.
    pub verdict: Verdict,
    /// Why, when the last check failed (empty after a success).
    pub message: String,
}

/// The probe loops of one run of a container. Dropping it stops them (the tasks are aborted:
/// an exec check in flight is killed with its helper, a connection is closed).
pub struct Probes {
    tasks: Vec<JoinHandle<()>>,
    // Kept so that `next` waits forever rather than ending when no probe runs.
    tx: mpsc::Sender<Report>,
    rx: mpsc::Receiver<Report>,
}

impl Default for Probes {
    fn default() -> Self {
        Probes::new()
    }
}

impl Probes {
    /// No probes yet.
    pub fn new() -> Probes {
        let (tx, rx) = mpsc::channel(8);
        Probes {
            tasks: Vec::new(),
            tx,
            rx,
        }
    }

    /// Starts a loop for one probe: after `timing.delay`, `check` every `timing.period`, each
    /// bounded by `timing.timeout`, counted by `tracker`; every change of verdict is reported.
    /// A liveness loop ends once it reports `Failed`.
    pub fn spawn<C: Check>(&mut self, kind: Kind, tracker: Tracker, timing: Timing, check: C) {
        let tx = self.tx.clone();
        self.tasks
            .push(tokio::spawn(probe_loop(kind, tracker, timing, check, tx)));
    }

    /// Whether no probe runs.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// The next change of verdict; waits forever when no probe runs.
    pub async fn next(&mut self) -> Report {
        match self.rx.recv().await {
            Some(report) => report,
            // Unreachable: `self.tx` keeps the channel open.
            None => std::future::pending().await,
        }
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn probe_loop<C: Check>(
    kind: Kind,
    mut tracker: Tracker,
    timing: Timing,
    check: C,
    tx: mpsc::Sender<Report>,
) {
    tokio::time::sleep(timing.delay).await;
    let mut ticks = tokio::time::interval(timing.period.max(Duration::from_millis(1)));
    // A check that ran long delays the next one rather than bunching checks up.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let result = match tokio::time::timeout(timing.timeout, check.check(timing.timeout)).await {
            Ok(result) => result,
            Err(_) => Err(ProbeError::Timeout {
                after: timing.timeout,
            }),
        };
        let message = match &result {
            Ok(()) => String::new(),
            Err(err) => error_chain(err),
        };
        tracing::trace!(?kind, ok = result.is_ok(), %message, "probe checked");
        if let Some(verdict) = tracker.observe(result.is_ok()) {
            if tx
                .send(Report {
                    kind,
                    verdict,
                    message,
                })
                .await
                .is_err()
            {
                return;
            }
            if verdict == Verdict::Failed {
                return;
            }
        }
    }
}

/// `err` and its sources, joined with ": ".
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    /// Feeds `outcomes` ('s' success, 'f' failure) to `tracker` and writes what each one
    /// reported: '.' nothing, 'R' Ready, 'U' Unready, 'H' Healthy, 'F' Failed.
    fn run(mut tracker: Tracker, outcomes: &str) -> String {
        outcomes
            .chars()
            .map(|c| match tracker.observe(c == 's') {
                None => '.',
                Some(Verdict::Ready) => 'R',
                Some(Verdict::Unready) => 'U',
                Some(Verdict::Healthy) => 'H',
                Some(Verdict::Failed) => 'F',
            })
            .collect()
    }

    #[test]
    fn readiness_table() {
        // (starts ready, success threshold, failure threshold, outcomes, reports)
        let cases = [
            (false, 1, 3, "s", "R"),
            (false, 1, 3, "fffs", "...R"),
            (false, 1, 3, "sfff", "R..U"),
            (false, 1, 3, "sffsfff", "R.....U"),
            (false, 2, 3, "sfss", "...R"),
            (false, 3, 1, "sssf", "..RU"),
            (false, 1, 1, "sfsf", "RURU"),
            (true, 1, 3, "ssff", "...."),
            (true, 1, 3, "fff", "..U"),
            (true, 2, 2, "ffsfss", ".U...R"),
            (false, 1, 3, "", ""),
        ];
        for (ready, success, failure, outcomes, want) in cases {
            let tracker = Tracker::readiness(ready, success, failure);
            assert_eq!(
                run(tracker, outcomes),
                want,
                "ready {ready}, thresholds {success}/{failure}, {outcomes}"
            );
        }
    }

    #[test]
    fn liveness_table() {
        // (failure threshold, outcomes, reports)
        let cases = [
            (3, "sss", "..."),
            (3, "fff", "..F"),
            (3, "ffsff", "....."),
            (3, "ffsfff", ".....F"),
            (1, "sf", ".F"),
            // Failed is final for the run.
            (1, "fsf", "F.."),
        ];
        for (failure, outcomes, want) in cases {
            assert_eq!(
                run(Tracker::liveness(failure), outcomes),
                want,
                "threshold {failure}, {outcomes}"
            );
        }
    }

    #[test]
    fn every_verdict_and_count() {
        use Verdict::*;
        // (verdict, successes, failures) with thresholds 2 (success) and 3 (failure)
        let cases = [
            (Unready, 1, 0, Unready),
            (Unready, 2, 0, Ready),
            (Unready, 0, 5, Unready),
            (Ready, 5, 0, Ready),
            (Ready, 0, 2, Ready),
            (Ready, 0, 3, Unready),
            (Healthy, 9, 0, Healthy),
            (Healthy, 0, 2, Healthy),
            (Healthy, 0, 3, Failed),
            (Failed, 9, 0, Failed),
            (Failed, 0, 9, Failed),
        ];
        for (verdict, successes, failures, want) in cases {
            assert_eq!(
                transition(verdict, successes, failures, 2, 3),
                want,
                "{verdict:?} after {successes} successes, {failures} failures"
            );
        }
    }

    #[test]
    fn initial_delay_counts_from_the_start_of_the_run() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let s = Duration::from_secs;
        // (initial delay, started at, now, left)
        let cases = [
            (s(0), t0, t0, s(0)),
            (s(10), t0, t0, s(10)),
            (s(10), t0, t0 + s(4), s(6)),
            (s(10), t0, t0 + s(60), s(0)),
            // A clock that went back: the whole delay.
            (s(10), t0, t0 - s(5), s(10)),
        ];
        for (delay, started, now, want) in cases {
            assert_eq!(delay_left(delay, started, now), want);
        }
    }

    #[test]
    fn status_lines() {
        let ok = |head: &[u8]| status_code(head).map(|r| r.ok());
        assert_eq!(ok(b"HTTP/1.1 200 OK\r\n"), Some(Some(200)));
        assert_eq!(
            ok(b"HTTP/1.0 302 Found\r\nLocation: /\r\n"),
            Some(Some(302))
        );
        assert_eq!(ok(b"HTTP/1.1 404\r\n"), Some(Some(404)));
        assert_eq!(ok(b"HTTP/1.1 200 OK"), None, "incomplete");
        assert_eq!(ok(b"SSH-2.0-OpenSSH\r\n"), Some(None));
        assert_eq!(ok(b"HTTP/1.1 2000 OK\r\n"), Some(None));
    }

    /// A one-connection HTTP server answering with `response`; returns its port.
    async fn serve(response: &'static str) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = conn.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                assert!(got.starts_with(b"GET /healthz HTTP/1.1\r\n"), "{got:?}");
                conn.write_all(response.as_bytes()).await.unwrap();
            }
        });
        port
    }

    #[tokio::test]
    async fn http_checks_count_200_to_399() {
        let t = Duration::from_secs(5);
        let ok = serve("HTTP/1.1 204 No Content\r\n\r\n").await;
        http(&Network::Host, ok.into(), "/healthz", t)
            .await
            .unwrap();
        let redirect = serve("HTTP/1.1 301 Moved\r\nLocation: /\r\n\r\n").await;
        http(&Network::Host, redirect.into(), "/healthz", t)
            .await
            .unwrap();
        let bad = serve("HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        let err = http(&Network::Host, bad.into(), "/healthz", t)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ProbeError::HttpStatus { status: 503, .. }),
            "{err}"
        );
        let err = http(&Network::Host, ok.into(), "/a b", t)
            .await
            .unwrap_err();
        assert!(matches!(err, ProbeError::HttpPath { .. }), "{err}");
    }

    #[tokio::test]
    async fn tcp_checks_connect() {
        let t = Duration::from_secs(5);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tcp(&Network::Host, port.into(), t).await.unwrap();
        drop(listener);
        let err = tcp(&Network::Host, port.into(), t).await.unwrap_err();
        assert!(matches!(err, ProbeError::Connect { .. }), "{err}");
        let err = tcp(&Network::Host, 70_000, t).await.unwrap_err();
        assert!(matches!(err, ProbeError::Port { .. }), "{err}");
    }

    /// Joining a namespace by file: the agent's own, through `/proc/self/ns/net` (needs the
    /// privilege of `setns`, so only as root).
    #[tokio::test]
    async fn container_network_connects_from_inside_the_namespace() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipping: setns needs root");
            return;
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let network = Network::open(Path::new("/proc/self/ns/net")).unwrap();
        tcp(&network, port.into(), Duration::from_secs(5))
            .await
            .unwrap();
        let err = Network::open(Path::new("/proc/0/ns/net")).unwrap_err();
        assert!(matches!(err, ProbeError::Netns { .. }), "{err}");
    }

    /// A check that answers from a script ('s' success, 'f' failure, 'h' hang), then succeeds.
    struct Scripted {
        script: Mutex<Vec<char>>,
        calls: AtomicUsize,
    }

    impl Scripted {
        fn new(script: &str) -> Arc<Scripted> {
            Arc::new(Scripted {
                script: Mutex::new(script.chars().rev().collect()),
                calls: AtomicUsize::new(0),
            })
        }
    }

    impl Check for Arc<Scripted> {
        async fn check(&self, _timeout: Duration) -> Result<(), ProbeError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let next = self.script.lock().unwrap().pop().unwrap_or('s');
            match next {
                's' => Ok(()),
                'h' => std::future::pending().await,
                _ => Err(ProbeError::Port { port: 0 }),
            }
        }
    }

    fn fast() -> Timing {
        Timing {
            delay: Duration::ZERO,
            period: Duration::from_millis(5),
            timeout: Duration::from_millis(50),
        }
    }

    async fn next(probes: &mut Probes) -> Report {
        tokio::time::timeout(Duration::from_secs(10), probes.next())
            .await
            .expect("a report")
    }

    #[tokio::test]
    async fn readiness_loop_reports_changes_only() {
        let mut probes = Probes::new();
        let check = Scripted::new("ffsfff");
        probes.spawn(
            Kind::Readiness,
            Tracker::readiness(false, 1, 3),
            fast(),
            check.clone(),
        );
        let report = next(&mut probes).await;
        assert_eq!(
            (report.kind, report.verdict),
            (Kind::Readiness, Verdict::Ready)
        );
        assert_eq!(report.message, "");
        let report = next(&mut probes).await;
        assert_eq!(report.verdict, Verdict::Unready);
        assert_eq!(report.message, "port 0 is out of range");
        assert_eq!(check.calls.load(Ordering::SeqCst), 6);
        let report = next(&mut probes).await;
        assert_eq!(report.verdict, Verdict::Ready);
    }

    #[tokio::test]
    async fn a_hung_check_times_out_and_liveness_ends_after_failing() {
        let mut probes = Probes::new();
        let check = Scripted::new("shh");
        probes.spawn(Kind::Liveness, Tracker::liveness(2), fast(), check.clone());
        let report = next(&mut probes).await;
        assert_eq!(
            (report.kind, report.verdict),
            (Kind::Liveness, Verdict::Failed)
        );
        assert_eq!(report.message, "timed out after 50ms");
        // The loop ended by itself after reporting Failed: no more checks.
        let task = probes.tasks.pop().unwrap();
        task.await.unwrap();
        assert_eq!(check.calls.load(Ordering::SeqCst), 3);
    }

    /// Signals when dropped: the loop's future, which owns the check, was dropped.
    struct Sentinel(Option<oneshot::Sender<()>>);

    impl Drop for Sentinel {
        fn drop(&mut self) {
            if let Some(tx) = self.0.take() {
                let _ = tx.send(());
            }
        }
    }

    struct Guarded {
        check: Arc<Scripted>,
        _sentinel: Sentinel,
    }

    impl Check for Guarded {
        async fn check(&self, timeout: Duration) -> Result<(), ProbeError> {
            self.check.check(timeout).await
        }
    }

    #[tokio::test]
    async fn dropping_probes_stops_the_loops() {
        let mut probes = Probes::new();
        let (tx, dropped) = oneshot::channel();
        let check = Guarded {
            check: Scripted::new(""),
            _sentinel: Sentinel(Some(tx)),
        };
        probes.spawn(
            Kind::Readiness,
            Tracker::readiness(false, 1, 1),
            fast(),
            check,
        );
        assert_eq!(next(&mut probes).await.verdict, Verdict::Ready);
        drop(probes);
        tokio::time::timeout(Duration::from_secs(10), dropped)
            .await
            .expect("the loop stopped")
            .expect("the sentinel signalled");
    }
}
