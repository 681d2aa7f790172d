//! The scheduler's use cases: what the API does to the store, over domain types only.
//!
//! Every function here takes the store as `&dyn Store` (the watch: `Arc<dyn Store>`), domain
//! values in and domain values out; proto types never get here (the API converts at its edge,
//! in `api::convert`) and neither does the clock (callers pass `now`). Reads are consistent
//! snapshots: a function that reads several prefixes reads them all at one store revision.
//! Writes are single transactions guarded by the `mod_revision` of the key they change, retried
//! on conflict a few times from a fresh read.
//!
//! | module | use cases |
//! |---|---|
//! | [`workloads`] | apply (with diff), get, list, delete, scale, history, rollback |
//! | [`nodes`] | list, get, cordon, uncordon, drain |
//! | [`instances`] | list, get (record joined with its status) |
//! | [`events`] | the change stream behind `Events.Watch` |
//! | [`diff`] | field changes between two specs, and their text rendering |

pub mod diff;
pub mod events;
pub mod instances;
pub mod nodes;
pub mod workloads;

use std::fmt;

use gantry::workload::FieldError;
use serde::de::DeserializeOwned;

use crate::model::{self, WorkloadRecord, keys};
use crate::store::{KeyValue, Revision, Store, StoreError};

pub use diff::FieldChange;
pub use events::{Change, ChangeKind, Object, WatchFilter, WatchQuery, watch};
pub use instances::{InstanceQuery, InstanceView, get_instance, list_instances};
pub use nodes::{DrainOutcome, NodeView, cordon, drain, get_node, list_nodes, uncordon};
pub use workloads::{
    ApplyOutcome, WorkloadView, apply, delete, get, history, list, rollback, scale,
};

/// How often a write that lost a compare-and-swap race is retried from a fresh read.
pub const MAX_ATTEMPTS: usize = 5;
/// Largest encoded workload record accepted. A spec change writes it twice (the workload and
/// its revision) in one transaction, which must stay under etcd's default request limit
/// (1.5 MiB).
pub const MAX_RECORD_BYTES: usize = 512 * 1024;
/// Page size of a list when the request gives none.
pub const DEFAULT_PAGE_SIZE: u32 = 500;
/// Largest page size; larger requests get this many.
pub const MAX_PAGE_SIZE: u32 = 5000;

/// The kinds of object the API serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    /// A workload (`gantry get workloads`).
    Workload,
    /// An instance of a workload (`gantry get instances`).
    Instance,
    /// A node (`gantry node ls`).
    Node,
}

impl ObjectKind {
    /// The CLI command that lists objects of this kind.
    fn list_command(self) -> &'static str {
        match self {
            ObjectKind::Workload => "gantry get workloads",
            ObjectKind::Instance => "gantry get instances",
            ObjectKind::Node => "gantry node ls",
        }
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Workload => "workload",
            ObjectKind::Instance => "instance",
            ObjectKind::Node => "node",
        })
    }
}

/// What can go wrong in a use case. Each message says what was wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object does not exist.
    #[error("{kind} {name} not found; see `{}`", kind.list_command())]
    NotFound {
        /// What kind of object was asked for.
        kind: ObjectKind,
        /// Its name (an id for instances).
        name: String,
    },
    /// A kept revision of a workload that does not exist.
    #[error(
        "workload {workload} has no kept revision {generation} (kept: {}); see `gantry rollout history {workload}`",
        list_generations(kept)
    )]
    RevisionNotFound {
        /// The workload.
        workload: String,
        /// The generation asked for.
        generation: u64,
        /// The generations that are kept, oldest first.
        kept: Vec<u64>,
    },
    /// The request, or the spec in it, is invalid; every problem with its field path.
    #[error("invalid request: {}", list_field_errors(errors))]
    InvalidArgument {
        /// Each problem, with the path of its field.
        errors: Vec<FieldError>,
    },
    /// The object is not in a state that allows the operation; the message says why and
    /// what to do instead.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A compare-and-swap failed: the workload changed since the revision the caller read.
    #[error(
        "workload {name} is at revision {actual}, not {expected}: it changed since you read it; get it again and reapply"
    )]
    StaleRevision {
        /// The workload.
        name: String,
        /// The revision the caller expected (0: that the workload did not exist).
        expected: Revision,
        /// The workload's revision now (0: it does not exist).
        actual: Revision,
    },
    /// The object kept changing under an unconditional write; retrying later may succeed.
    #[error("{kind} {name} kept changing while it was being written ({attempts} attempts); retry")]
    Conflict {
        /// What kind of object.
        kind: ObjectKind,
        /// Its name.
        name: String,
        /// How many times the write was tried.
        attempts: usize,
    },
    /// A record would be larger than the store takes.
    #[error(
        "{what} is {size} bytes encoded, over the limit of {limit} bytes; keep env, commands and labels small and put data in volumes"
    )]
    TooLarge {
        /// What is too large (`workload web`).
        what: String,
        /// Its encoded size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// The caller's deadline passed before the operation finished.
    #[error("deadline exceeded after {0:?}; retry with a longer timeout")]
    DeadlineExceeded(std::time::Duration),
    /// A record in the store could not be decoded.
    #[error("corrupt record at {key}: {source}")]
    Corrupt {
        /// The key of the record.
        key: String,
        /// Why it could not be decoded.
        #[source]
        source: serde_json::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Error {
    /// An invalid request field.
    pub fn invalid(path: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidArgument {
            errors: vec![FieldError {
                path: path.into(),
                message: message.into(),
            }],
        }
    }

    fn not_found(kind: ObjectKind, name: &str) -> Self {
        Error::NotFound {
            kind,
            name: name.to_string(),
        }
    }
}

impl From<gantry::workload::ValidationErrors> for Error {
    fn from(errors: gantry::workload::ValidationErrors) -> Self {
        Error::InvalidArgument { errors: errors.0 }
    }
}

fn list_field_errors(errors: &[FieldError]) -> String {
    let parts: Vec<String> = errors.iter().map(ToString::to_string).collect();
    parts.join("; ")
}

fn list_generations(kept: &[u64]) -> String {
    if kept.is_empty() {
        return "none".to_string();
    }
    let parts: Vec<String> = kept.iter().map(ToString::to_string).collect();
    parts.join(", ")
}

/// Shorthand for results of use cases.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which page of a list to return.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageRequest {
    /// Most items to return; 0 means [`DEFAULT_PAGE_SIZE`], more than [`MAX_PAGE_SIZE`] means
    /// that many.
    pub size: u32,
    /// `next_token` of the previous page; empty for the first page.
    pub token: String,
}

/// One page of a list, read at one store revision.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    /// The items, in the list's order.
    pub items: Vec<T>,
    /// The store revision the list was read at (every page of a list is read at the first
    /// page's revision).
    pub revision: Revision,
    /// Token for the next page; empty on the last page.
    pub next_token: String,
}

/// Where a page starts: the revision of the first page and the position of the last item
/// already returned.
struct Cursor {
    revision: Option<Revision>,
    after: Option<String>,
}

impl PageRequest {
    fn limit(&self) -> usize {
        match self.size {
            0 => DEFAULT_PAGE_SIZE as usize,
            n => n.min(MAX_PAGE_SIZE) as usize,
        }
    }

    /// Decodes the token: `{revision}.{hex of the last position}`.
    fn cursor(&self) -> Result<Cursor> {
        if self.token.is_empty() {
            return Ok(Cursor {
                revision: None,
                after: None,
            });
        }
        let invalid = || {
            Error::invalid(
                "page_token",
                "is not a token this server issued; list again from the first page",
            )
        };
        let (revision, hex) = self.token.split_once('.').ok_or_else(invalid)?;
        let revision: Revision = revision.parse().map_err(|_| invalid())?;
        let after = unhex(hex).ok_or_else(invalid)?;
        Ok(Cursor {
            revision: Some(revision),
            after: Some(after),
        })
    }
}

/// Cuts one page out of `items` (sorted by position), after the cursor.
fn paginate<T>(
    items: Vec<T>,
    position: impl Fn(&T) -> String,
    cursor: &Cursor,
    request: &PageRequest,
    revision: Revision,
) -> Page<T> {
    let limit = request.limit();
    let mut rest: Vec<T> = match &cursor.after {
        Some(after) => items
            .into_iter()
            .filter(|item| position(item).as_str() > after.as_str())
            .collect(),
        None => items,
    };
    let next_token = if rest.len() > limit {
        rest.truncate(limit);
        rest.last()
            .map(|last| format!("{revision}.{}", hex(&position(last))))
            .unwrap_or_default()
    } else {
        String::new()
    };
    Page {
        items: rest,
        revision,
        next_token,
    }
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// Reads a whole prefix at `at` (now when `None`). A compacted revision from a page token
/// means the token expired.
async fn range(
    store: &dyn Store,
    prefix: &str,
    at: Option<Revision>,
) -> Result<(Vec<KeyValue>, Revision)> {
    match store.range(prefix.as_bytes(), at).await {
        Ok(found) => Ok(found),
        Err(StoreError::Compacted { requested, .. }) if at.is_some() => {
            Err(Error::FailedPrecondition(format!(
                "the page token has expired (revision {requested} has been compacted); list again from the first page"
            )))
        }
        Err(err) => Err(err.into()),
    }
}

/// Reads exactly `key` at revision `at` (a range over a prefix also returns longer keys).
async fn get_at(store: &dyn Store, key: &str, at: Revision) -> Result<Option<KeyValue>> {
    let (kvs, _) = store.range(key.as_bytes(), Some(at)).await?;
    Ok(kvs.into_iter().find(|kv| kv.key == key.as_bytes()))
}

/// Reads exactly `key` now, and the store revision of the read.
async fn get_now(store: &dyn Store, key: &str) -> Result<(Option<KeyValue>, Revision)> {
    let (kvs, at) = range(store, key, None).await?;
    Ok((kvs.into_iter().find(|kv| kv.key == key.as_bytes()), at))
}

/// The workload records at revision `at` by name, each reduced by `part` to what the caller
/// needs.
async fn workloads_at<T, C: FromIterator<(String, T)>>(
    store: &dyn Store,
    at: Revision,
    part: impl Fn(WorkloadRecord) -> T,
) -> Result<C> {
    let (kvs, _) = range(store, keys::WORKLOADS, Some(at)).await?;
    kvs.iter()
        .map(|kv| {
            let w: WorkloadRecord = decode(kv)?;
            Ok((w.spec.name.clone(), part(w)))
        })
        .collect()
}

/// Decodes a record, naming its key when it is corrupt.
fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T> {
    model::decode(&kv.value).map_err(|source| Error::Corrupt {
        key: String::from_utf8_lossy(&kv.key).into_owned(),
        source,
    })
}

/// The part of a key after `prefix`, if it has that prefix and is valid UTF-8.
fn key_suffix<'a>(kv: &'a KeyValue, prefix: &str) -> Option<&'a str> {
    std::str::from_utf8(&kv.key).ok()?.strip_prefix(prefix)
}

/// Parses a label selector request field.
fn parse_selector(text: &str) -> Result<gantry::selector::Selector> {
    gantry::selector::parse(text).map_err(|err| Error::invalid("label_selector", err.to_string()))
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers shared by the use-case tests: an embedded store in a temp dir, and specs.

    use std::sync::Arc;

    use gantry::workload::{Format, Workload, parse};

    use crate::model::Timestamp;
    use crate::ops::{ApplyOutcome, apply};
    use crate::store::{EmbeddedStore, Store};

    /// An embedded store and the temp dir that holds it (dropped after the store).
    pub struct TestStore {
        pub store: Arc<dyn Store>,
        _dir: tempfile::TempDir,
    }

    pub async fn store() -> TestStore {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = EmbeddedStore::open(dir.path().join("store.redb"))
            .await
            .expect("open embedded store");
        TestStore {
            store: Arc::new(store),
            _dir: dir,
        }
    }

    /// Applies `workload` at `now`: no dry run, no expected revision, and it must succeed.
    pub async fn applied(store: &dyn Store, workload: Workload, now: Timestamp) -> ApplyOutcome {
        apply(store, workload, false, None, now)
            .await
            .expect("test workload applies")
    }

    /// A workload from YAML.
    pub fn spec(yaml: &str) -> Workload {
        let mut workloads = parse(yaml, Format::Yaml).expect("test spec parses");
        assert_eq!(workloads.len(), 1);
        let w = workloads.remove(0);
        w.validate().expect("test spec is valid");
        w
    }

    /// A Service `name` with `replicas` replicas.
    pub fn service(name: &str, replicas: u32) -> Workload {
        spec(&format!(
            "kind: Service\nname: {name}\nimage: busybox:1.36\nreplicas: {replicas}\nlabels: {{app: {name}}}\n"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip() {
        let items: Vec<String> = (0..5).map(|i| format!("w{i}")).collect();
        let first = PageRequest {
            size: 2,
            token: String::new(),
        };
        let page = paginate(
            items.clone(),
            Clone::clone,
            &first.cursor().unwrap(),
            &first,
            7,
        );
        assert_eq!(page.items, ["w0", "w1"]);
        let second = PageRequest {
            size: 2,
            token: page.next_token.clone(),
        };
        let cursor = second.cursor().unwrap();
        assert_eq!(cursor.revision, Some(7));
        let page = paginate(items.clone(), Clone::clone, &cursor, &second, 7);
        assert_eq!(page.items, ["w2", "w3"]);
        let third = PageRequest {
            size: 2,
            token: page.next_token,
        };
        let page = paginate(items, Clone::clone, &third.cursor().unwrap(), &third, 7);
        assert_eq!(page.items, ["w4"]);
        assert!(page.next_token.is_empty());
    }

    #[test]
    fn bad_page_tokens_are_invalid_arguments() {
        for token in ["x", "1.zz", "a.00", "3.0"] {
            let request = PageRequest {
                size: 0,
                token: token.into(),
            };
            assert!(
                matches!(request.cursor(), Err(Error::InvalidArgument { .. })),
                "{token}"
            );
        }
    }

    #[test]
    fn not_found_says_where_to_look() {
        assert_eq!(
            Error::not_found(ObjectKind::Workload, "web").to_string(),
            "workload web not found; see `gantry get workloads`"
        );
    }
}
