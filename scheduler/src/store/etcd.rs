//! The [`Store`] contract on an etcd 3.4+ cluster, through `etcd-client`.
//!
//! Every unary call is bounded by [`EtcdOptions::request_timeout`]; a call that times out
//! or cannot reach etcd fails with [`StoreError::Unavailable`]. Watch streams are
//! long-lived and not bounded: HTTP/2 keep-alive notices a dead connection, and the watch
//! resumes on a new stream from the revision after the last one it delivered.
//!
//! # Members that go down
//!
//! etcd-client balances requests over all endpoints and keeps sending some to a member that
//! refuses connections (every such call fails at once). With more than one endpoint, a
//! background task probes each member's client port every [`EtcdOptions::probe_interval`]
//! (a TCP connect bounded by the same interval), takes a member that does not answer out of
//! the balancer and puts it back once it answers again. The last member is never taken out.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, CompareOp, ConnectOptions, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use tracing::{debug, warn};

use super::{
    Compare, Event, EventKind, KeyValue, LeaseId, Op, Result, Revision, Store, StoreError,
    TxnResult, WatchStream, validate_txn,
};

/// Keys per page of a range; pages of one range are read at one pinned revision.
const RANGE_PAGE: i64 = 1000;
/// A key only used to learn etcd's compaction revision (see `EtcdStore::compaction_revision`).
const PROBE_KEY: &[u8] = b"\0gantry-compaction-probe";

/// How to reach and talk to etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Upper bound of every unary request (get, range, txn, compact, lease calls).
    pub request_timeout: Duration,
    /// Upper bound of establishing a connection.
    pub connect_timeout: Duration,
    /// HTTP/2 keep-alive ping interval; a connection that misses a ping reply for
    /// `keep_alive_timeout` is dropped, which makes watches resume elsewhere.
    pub keep_alive_interval: Duration,
    /// See `keep_alive_interval`.
    pub keep_alive_timeout: Duration,
    /// How many times in a row a broken watch stream is re-established (with exponential
    /// backoff from 100 ms to 2 s) before the stream ends with [`StoreError::Unavailable`].
    pub watch_resume_attempts: u32,
    /// How often each member is probed when there are several (see the module docs).
    pub probe_interval: Duration,
}

impl EtcdOptions {
    /// Default options for `endpoints`: 5 s request and connect timeouts.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            keep_alive_interval: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(5),
            watch_resume_attempts: 10,
            probe_interval: Duration::from_millis(500),
        }
    }
}

/// The etcd-backed [`Store`]. Cheap to clone: clones share one connection pool.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    options: EtcdOptions,
    /// The member prober (several endpoints only); stopped with the last clone.
    _prober: Option<Arc<AbortOnDrop>>,
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The `host:port` of an endpoint URL (`http://10.0.0.1:2379` → `10.0.0.1:2379`).
fn endpoint_authority(endpoint: &str) -> Option<String> {
    let rest = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or_default();
    (!authority.is_empty()).then(|| authority.to_owned())
}

/// Probes every endpoint forever, taking members that refuse or ignore connections out of
/// the client's balancer and putting them back when they answer (never removing the last).
async fn probe_members(client: Client, endpoints: Vec<String>, interval: Duration) {
    let mut out: BTreeSet<String> = BTreeSet::new();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        for endpoint in &endpoints {
            let Some(authority) = endpoint_authority(endpoint) else {
                continue;
            };
            let up = matches!(
                tokio::time::timeout(interval, tokio::net::TcpStream::connect(&authority)).await,
                Ok(Ok(_))
            );
            let is_out = out.contains(endpoint);
            if up && is_out {
                match client.add_endpoint(endpoint).await {
                    Ok(()) => {
                        out.remove(endpoint);
                        warn!(%endpoint, "etcd member answers again: back in use");
                    }
                    Err(err) => debug!(%endpoint, %err, "putting an etcd member back"),
                }
            } else if !up && !is_out && out.len() + 1 < endpoints.len() {
                match client.remove_endpoint(endpoint).await {
                    Ok(()) => {
                        out.insert(endpoint.clone());
                        warn!(%endpoint, "etcd member does not answer: not used until it does");
                    }
                    Err(err) => debug!(%endpoint, %err, "taking an etcd member out"),
                }
            }
        }
    }
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.options.endpoints)
            .finish_non_exhaustive()
    }
}

/// A request that got no answer in time.
#[derive(Debug, thiserror::Error)]
#[error("etcd did not answer within {after:?}")]
struct TimedOut {
    after: Duration,
}

/// Why one etcd call failed, before it becomes a [`StoreError`].
#[derive(Debug)]
enum CallError {
    TimedOut(Duration),
    Etcd(etcd_client::Error),
}

impl CallError {
    fn message(&self) -> Option<&str> {
        match self {
            CallError::Etcd(etcd_client::Error::GRpcStatus(status)) => Some(status.message()),
            CallError::Etcd(etcd_client::Error::LeaseKeepAliveError(message)) => Some(message),
            _ => None,
        }
    }

    fn is_compacted(&self) -> bool {
        self.message()
            .is_some_and(|m| m.contains("required revision has been compacted"))
    }

    fn is_future_revision(&self) -> bool {
        self.message()
            .is_some_and(|m| m.contains("required revision is a future revision"))
    }

    fn is_lease_not_found(&self) -> bool {
        self.message()
            .is_some_and(|m| m.contains("lease not found"))
    }

    /// Classifies the failure of `operation`: unreachable or slow etcd is `Unavailable`,
    /// a rejected request `InvalidArgument`, anything else `Backend`.
    fn into_store(self, operation: &'static str) -> StoreError {
        use tonic::Code;
        match self {
            CallError::TimedOut(after) => StoreError::Unavailable {
                operation,
                source: Box::new(TimedOut { after }),
            },
            CallError::Etcd(etcd_client::Error::GRpcStatus(status)) => match status.code() {
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Aborted
                | Code::ResourceExhausted => StoreError::Unavailable {
                    operation,
                    source: Box::new(status),
                },
                Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                    StoreError::InvalidArgument {
                        reason: format!("etcd rejected {operation}: {}", status.message()),
                    }
                }
                _ => StoreError::Backend {
                    operation,
                    source: Box::new(status),
                },
            },
            CallError::Etcd(
                err @ (etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_)),
            ) => StoreError::Unavailable {
                operation,
                source: Box::new(err),
            },
            CallError::Etcd(err) => StoreError::Backend {
                operation,
                source: Box::new(err),
            },
        }
    }
}

/// Bounds `call` by `timeout`.
async fn bounded<T>(
    timeout: Duration,
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, CallError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result.map_err(CallError::Etcd),
        Err(_) => Err(CallError::TimedOut(timeout)),
    }
}

/// The first key after every key starting with `prefix` (etcd's `range_end` for a prefix);
/// `\0` (no end) when there is none. An empty prefix is every key: `[\0, \0)`.
fn prefix_range(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    if prefix.is_empty() {
        return (vec![0], vec![0]);
    }
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return (prefix.to_vec(), end);
        }
    }
    (prefix.to_vec(), vec![0])
}

fn from_etcd_kv(kv: etcd_client::KeyValue) -> KeyValue {
    let (create_revision, mod_revision, version, lease) = (
        kv.create_revision(),
        kv.mod_revision(),
        kv.version(),
        kv.lease(),
    );
    let (key, value) = kv.into_key_value();
    KeyValue {
        key,
        value,
        create_revision,
        mod_revision,
        version,
        lease: (lease != 0).then_some(LeaseId(lease)),
    }
}

fn from_etcd_event(event: &etcd_client::Event) -> Result<Event> {
    let kv = event
        .kv()
        .cloned()
        .map(from_etcd_kv)
        .ok_or_else(|| StoreError::Corrupt {
            detail: "etcd watch event without a key".to_owned(),
        })?;
    let prev = event.prev_kv().cloned().map(from_etcd_kv);
    Ok(match event.event_type() {
        etcd_client::EventType::Put => Event {
            kind: EventKind::Put,
            kv,
            prev,
        },
        etcd_client::EventType::Delete => Event {
            kind: EventKind::Delete,
            kv: KeyValue {
                value: Vec::new(),
                create_revision: 0,
                version: 0,
                lease: None,
                ..kv
            },
            prev,
        },
    })
}

fn to_etcd_compare(compare: Compare) -> etcd_client::Compare {
    match compare {
        Compare::ModRevision { key, revision } => {
            etcd_client::Compare::mod_revision(key, CompareOp::Equal, revision)
        }
        Compare::Value { key, value } => etcd_client::Compare::value(key, CompareOp::Equal, value),
        Compare::Exists { key } => etcd_client::Compare::version(key, CompareOp::Greater, 0),
        Compare::Absent { key } => etcd_client::Compare::version(key, CompareOp::Equal, 0),
    }
}

fn to_etcd_op(op: Op) -> TxnOp {
    match op {
        Op::Put { key, value, lease } => {
            TxnOp::put(key, value, lease.map(|l| PutOptions::new().with_lease(l.0)))
        }
        Op::Delete { key } => TxnOp::delete(key, None),
        Op::DeletePrefix { prefix } => {
            TxnOp::delete(prefix, Some(DeleteOptions::new().with_prefix()))
        }
    }
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<Revision> {
    header
        .map(etcd_client::ResponseHeader::revision)
        .ok_or_else(|| StoreError::Corrupt {
            detail: "etcd response without a header".to_owned(),
        })
}

impl EtcdStore {
    /// Creates a client for `options.endpoints`. The connection is made lazily: an
    /// unreachable etcd shows up as [`StoreError::Unavailable`] on the first call.
    pub async fn connect(options: EtcdOptions) -> Result<Self> {
        let connect = ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            .with_keep_alive(options.keep_alive_interval, options.keep_alive_timeout)
            .with_keep_alive_while_idle(true);
        let client = bounded(
            options.connect_timeout,
            Client::connect(&options.endpoints, Some(connect)),
        )
        .await
        .map_err(|err| err.into_store("connect"))?;
        let prober = (options.endpoints.len() > 1).then(|| {
            Arc::new(AbortOnDrop(tokio::spawn(probe_members(
                client.clone(),
                options.endpoints.clone(),
                options.probe_interval,
            ))))
        });
        Ok(Self {
            client,
            options,
            _prober: prober,
        })
    }

    async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, CallError> {
        bounded(self.options.request_timeout, call).await
    }

    /// Learns etcd's compaction revision, which its range and compact errors do not carry:
    /// a watch from `below` (known to be compacted) is cancelled by etcd at once with the
    /// compaction revision. Falls back to `below + 1`, a lower bound, if that fails.
    async fn compaction_revision(&self, below: Revision) -> Revision {
        let fallback = below + 1;
        if below <= 0 {
            return fallback;
        }
        let options = WatchOptions::new().with_start_revision(below);
        let mut watch = self.client.watch_client();
        let probe = async {
            let mut stream = watch.watch(PROBE_KEY, Some(options)).await?;
            while let Some(response) = stream.message().await? {
                if response.canceled() {
                    return Ok(Some(response.compact_revision()));
                }
            }
            Ok(None)
        };
        match self.call(probe).await {
            Ok(Some(revision)) if revision > 0 => revision,
            Ok(_) => fallback,
            Err(err) => {
                debug!(?err, "could not learn the etcd compaction revision");
                fallback
            }
        }
    }

    /// Maps a failure of a call that read or compacted at `requested`.
    async fn revision_error(
        &self,
        operation: &'static str,
        requested: Revision,
        err: CallError,
    ) -> StoreError {
        if err.is_compacted() {
            StoreError::Compacted {
                requested,
                compacted: self.compaction_revision(requested).await,
            }
        } else if err.is_future_revision() {
            StoreError::FutureRevision { requested }
        } else {
            err.into_store(operation)
        }
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>> {
        let mut kv = self.client.kv_client();
        let mut response = self
            .call(kv.get(key, None))
            .await
            .map_err(|e| e.into_store("get"))?;
        Ok(response.take_kvs().into_iter().next().map(from_etcd_kv))
    }

    async fn range(
        &self,
        prefix: &[u8],
        at: Option<Revision>,
    ) -> Result<(Vec<KeyValue>, Revision)> {
        if let Some(at) = at
            && at <= 0
        {
            return Err(StoreError::InvalidArgument {
                reason: format!("range at revision {at}: revisions start at 1"),
            });
        }
        let (mut from, end) = prefix_range(prefix);
        // 0 asks etcd for the current revision; later pages are pinned to the first's.
        let mut revision = at.unwrap_or(0);
        let mut out = Vec::new();
        let mut kv = self.client.kv_client();
        loop {
            let options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(RANGE_PAGE)
                .with_revision(revision);
            let mut response = match self.call(kv.get(from.clone(), Some(options))).await {
                Ok(response) => response,
                Err(err) => return Err(self.revision_error("range", revision, err).await),
            };
            if revision == 0 {
                revision = header_revision(response.header())?;
            }
            let more = response.more();
            let page = response.take_kvs();
            if let Some(last) = page.last() {
                from = last.key().to_vec();
                from.push(0);
            }
            out.extend(page.into_iter().map(from_etcd_kv));
            if !more {
                return Ok((out, revision));
            }
        }
    }

    async fn txn(
        &self,
        compares: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    ) -> Result<TxnResult> {
        validate_txn(&compares, &success, &failure)?;
        // etcd does not say which lease it missed: name the first one the txn uses.
        let first_lease = success.iter().chain(&failure).find_map(|op| match op {
            Op::Put { lease, .. } => *lease,
            _ => None,
        });
        let txn = Txn::new()
            .when(
                compares
                    .into_iter()
                    .map(to_etcd_compare)
                    .collect::<Vec<_>>(),
            )
            .and_then(success.into_iter().map(to_etcd_op).collect::<Vec<_>>())
            .or_else(failure.into_iter().map(to_etcd_op).collect::<Vec<_>>());
        let mut kv = self.client.kv_client();
        let response = match self.call(kv.txn(txn)).await {
            Ok(response) => response,
            Err(err) if err.is_lease_not_found() => {
                return Err(StoreError::LeaseNotFound {
                    lease: first_lease.unwrap_or(LeaseId(0)),
                });
            }
            Err(err) => return Err(err.into_store("txn")),
        };
        Ok(TxnResult {
            succeeded: response.succeeded(),
            revision: header_revision(response.header())?,
        })
    }

    async fn watch(&self, prefix: &[u8], from: Revision) -> Result<WatchStream> {
        if from < 0 {
            return Err(StoreError::InvalidArgument {
                reason: format!("watch from revision {from}: revisions start at 1"),
            });
        }
        // Pin "now" to a revision so that a resumed stream knows where to start.
        let from = if from == 0 {
            self.current_revision().await? + 1
        } else {
            from
        };
        let mut watcher = Watcher {
            store: self.clone(),
            prefix: prefix.to_vec(),
            next: from,
            stream: None,
            pending: VecDeque::new(),
            done: false,
        };
        let (stream, created_at) = watcher.open().await.map_err(|e| e.into_store("watch"))?;
        if from <= created_at {
            // etcd reports a compacted start revision only later, on the stream. Ask now,
            // so that the caller gets the error from `watch` itself.
            let mut kv = self.client.kv_client();
            let probe = GetOptions::new().with_count_only().with_revision(from);
            if let Err(err) = self.call(kv.get(PROBE_KEY, Some(probe))).await {
                return Err(self.revision_error("watch", from, err).await);
            }
        }
        watcher.stream = Some(stream);
        Ok(WatchStream::new(futures::stream::unfold(
            watcher,
            |mut watcher| async move {
                let item = watcher.next_event().await?;
                Some((item, watcher))
            },
        )))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        let mut kv = self.client.kv_client();
        match self.call(kv.compact(revision, None)).await {
            Ok(_) => Ok(()),
            Err(err) if err.is_compacted() => Err(StoreError::Compacted {
                requested: revision,
                // `revision` itself may be the compaction revision: probe below it.
                compacted: self.compaction_revision(revision - 1).await.max(revision),
            }),
            Err(err) => Err(self.revision_error("compact", revision, err).await),
        }
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        if ttl.is_zero() {
            return Err(StoreError::InvalidArgument {
                reason: "lease ttl must be positive".to_owned(),
            });
        }
        // etcd counts whole seconds: round up so a lease never lives shorter than asked.
        let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let seconds = i64::try_from(seconds).unwrap_or(i64::MAX);
        let mut lease = self.client.lease_client();
        let response = self
            .call(lease.grant(seconds, None))
            .await
            .map_err(|e| e.into_store("grant lease"))?;
        Ok(LeaseId(response.id()))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let mut client = self.client.lease_client();
        // etcd-client sends one keep-alive and waits for its answer; dropping the keeper
        // closes the stream again.
        match self.call(client.keep_alive(lease.0)).await {
            Ok(_) => Ok(()),
            Err(err) if err.is_lease_not_found() => Err(StoreError::LeaseNotFound { lease }),
            Err(err) => Err(err.into_store("keep lease alive")),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let mut client = self.client.lease_client();
        match self.call(client.revoke(lease.0)).await {
            Ok(_) => Ok(()),
            Err(err) if err.is_lease_not_found() => Err(StoreError::LeaseNotFound { lease }),
            Err(err) => Err(err.into_store("revoke lease")),
        }
    }

    async fn current_revision(&self) -> Result<Revision> {
        let mut kv = self.client.kv_client();
        let options = GetOptions::new().with_count_only();
        let response = self
            .call(kv.get(PROBE_KEY, Some(options)))
            .await
            .map_err(|e| e.into_store("current revision"))?;
        header_revision(response.header())
    }
}

/// The state of one etcd watch stream, resumable from `next`.
struct Watcher {
    store: EtcdStore,
    prefix: Vec<u8>,
    /// The first revision not yet delivered: where a resumed stream starts.
    next: Revision,
    stream: Option<etcd_client::WatchStream>,
    pending: VecDeque<Event>,
    done: bool,
}

impl Watcher {
    /// Opens an etcd watch from `self.next` and waits for etcd to confirm it; returns the
    /// stream and etcd's revision at creation.
    async fn open(&self) -> Result<(etcd_client::WatchStream, Revision), CallError> {
        let mut options = WatchOptions::new()
            .with_start_revision(self.next)
            .with_prev_key();
        options = if self.prefix.is_empty() {
            options.with_all_keys()
        } else {
            options.with_prefix()
        };
        let mut client = self.store.client.watch_client();
        let prefix = self.prefix.clone();
        self.store
            .call(async move {
                let mut stream = client.watch(prefix, Some(options)).await?;
                match stream.message().await? {
                    Some(response) if response.created() && !response.canceled() => {
                        let revision = response.header().map_or(0, |h| h.revision());
                        Ok((stream, revision))
                    }
                    Some(response) => Err(etcd_client::Error::WatchError(format!(
                        "etcd did not create the watch: {}",
                        response.cancel_reason()
                    ))),
                    None => Err(etcd_client::Error::WatchError(
                        "watch stream closed before it was created".to_owned(),
                    )),
                }
            })
            .await
    }

    async fn next_event(&mut self) -> Option<Result<Event>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(Ok(event));
            }
            if self.done {
                return None;
            }
            if let Err(err) = self.step().await {
                self.done = true;
                return Some(Err(err));
            }
        }
    }

    /// Receives one response (resuming the stream first if it broke).
    async fn step(&mut self) -> Result<()> {
        let Some(stream) = self.stream.as_mut() else {
            return self.resume().await;
        };
        match stream.message().await {
            Ok(Some(response)) if response.canceled() => {
                if response.compact_revision() > 0 {
                    return Err(StoreError::Compacted {
                        requested: self.next,
                        compacted: response.compact_revision(),
                    });
                }
                warn!(
                    reason = response.cancel_reason(),
                    next = self.next,
                    "etcd cancelled a watch, resuming"
                );
                self.stream = None;
            }
            Ok(Some(response)) => {
                for event in response.events() {
                    let event = from_etcd_event(event)?;
                    // Events come in revision order; a response never splits a revision.
                    self.next = self.next.max(event.revision() + 1);
                    self.pending.push_back(event);
                }
            }
            Ok(None) => {
                debug!(next = self.next, "etcd watch stream ended, resuming");
                self.stream = None;
            }
            Err(err) => {
                debug!(?err, next = self.next, "etcd watch stream failed, resuming");
                self.stream = None;
            }
        }
        Ok(())
    }

    /// Re-opens the watch from `self.next`, with backoff.
    async fn resume(&mut self) -> Result<()> {
        let mut delay = Duration::from_millis(100);
        let mut last = None;
        for _ in 0..self.store.options.watch_resume_attempts.max(1) {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
            match self.open().await {
                Ok((stream, _)) => {
                    self.stream = Some(stream);
                    return Ok(());
                }
                Err(err) => {
                    debug!(?err, next = self.next, "resuming an etcd watch failed");
                    last = Some(err);
                }
            }
        }
        Err(match last {
            Some(err) => match err.into_store("watch") {
                StoreError::Unavailable { source, .. } | StoreError::Backend { source, .. } => {
                    StoreError::Unavailable {
                        operation: "watch",
                        source,
                    }
                }
                other => other,
            },
            None => StoreError::Closed,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn endpoint_authorities_are_host_and_port() {
        assert_eq!(
            endpoint_authority("http://10.0.0.1:2379").as_deref(),
            Some("10.0.0.1:2379")
        );
        assert_eq!(
            endpoint_authority("https://etcd-1.example:2379/").as_deref(),
            Some("etcd-1.example:2379")
        );
        assert_eq!(
            endpoint_authority("127.0.0.1:2379").as_deref(),
            Some("127.0.0.1:2379")
        );
        assert_eq!(endpoint_authority("http://"), None);
    }

    use super::*;

    #[test]
    fn prefix_ranges_match_etcd() {
        assert_eq!(prefix_range(b""), (vec![0], vec![0]));
        assert_eq!(prefix_range(b"foo1"), (b"foo1".to_vec(), b"foo2".to_vec()));
        assert_eq!(
            prefix_range(b"foo\xff"),
            (b"foo\xff".to_vec(), b"fop".to_vec())
        );
        assert_eq!(prefix_range(b"\xff\xff"), (b"\xff\xff".to_vec(), vec![0]));
    }
}
