//! Where errors become gRPC statuses: the one `From<ops::Error>` and the one
//! `From<StoreError>` for [`Status`], and the few statuses the API makes on its own.
//!
//! | error | code |
//! |---|---|
//! | invalid request or spec (one `path: message` line per problem) | INVALID_ARGUMENT |
//! | no such workload, revision, instance, node | NOT_FOUND |
//! | stale `expected_revision`, wrong kind for the operation, expired page token | FAILED_PRECONDITION |
//! | a write that kept losing races | ABORTED |
//! | a record or request over its size limit | RESOURCE_EXHAUSTED |
//! | a compacted or future revision (with `gantry-compact-revision` metadata) | OUT_OF_RANGE |
//! | the caller's deadline | DEADLINE_EXCEEDED |
//! | store unreachable, scheduler shutting down (also ends Watch streams) | UNAVAILABLE |
//! | anything else (corrupt data, a bug) | INTERNAL |

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};
use tracing::error;

use crate::ops;
use crate::store::StoreError;

/// Trailing metadata of a compacted Watch: the oldest revision still available.
pub const COMPACT_REVISION_METADATA: &str = "gantry-compact-revision";

impl From<ops::Error> for Status {
    fn from(err: ops::Error) -> Self {
        use ops::Error as E;
        match err {
            E::InvalidArgument { errors } => {
                let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
                Status::invalid_argument(lines.join("\n"))
            }
            E::NotFound { .. } | E::RevisionNotFound { .. } => Status::not_found(err.to_string()),
            E::FailedPrecondition(_) | E::StaleRevision { .. } => {
                Status::failed_precondition(err.to_string())
            }
            E::Conflict { .. } => Status::aborted(err.to_string()),
            E::TooLarge { .. } => Status::resource_exhausted(err.to_string()),
            E::DeadlineExceeded(_) => Status::deadline_exceeded(err.to_string()),
            E::Corrupt { .. } => {
                error!(%err, "corrupt record in the store");
                Status::internal(err.to_string())
            }
            E::Store(err) => err.into(),
        }
    }
}

impl From<StoreError> for Status {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Compacted {
                requested,
                compacted,
            } => {
                let mut status = Status::out_of_range(format!(
                    "revision {requested} has been compacted; oldest available is {compacted}"
                ));
                status
                    .metadata_mut()
                    .insert(COMPACT_REVISION_METADATA, MetadataValue::from(compacted));
                status
            }
            StoreError::FutureRevision { requested } => Status::out_of_range(format!(
                "revision {requested} has not been written yet; watch from the last revision you saw + 1"
            )),
            StoreError::Unavailable { .. } => {
                Status::unavailable(format!("{}; retry", chain(&err)))
            }
            StoreError::Closed => {
                Status::unavailable("this scheduler replica is shutting down; retry on another one")
            }
            StoreError::LeaseNotFound { .. }
            | StoreError::InvalidArgument { .. }
            | StoreError::Backend { .. }
            | StoreError::Corrupt { .. } => {
                error!(err = %chain(&err), "store request failed");
                Status::internal(chain(&err))
            }
        }
    }
}

/// An error with its sources: `a: b: c`.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The status that ends open streams when the server shuts down.
pub fn shutting_down() -> Status {
    Status::unavailable(
        "this scheduler replica is shutting down; resume from the last revision you saw + 1 on another one",
    )
}

/// The status of an RPC that is not served yet.
pub fn unimplemented(what: &str) -> Status {
    Status::unimplemented(what.to_string())
}

/// Rewrites tonic's answer to a request over the size limit (OUT_OF_RANGE, "decoded message
/// length too large") into RESOURCE_EXHAUSTED, as the API documents. The answer is a
/// trailers-only response, so its status is in the headers.
pub async fn request_too_large(mut response: axum::response::Response) -> axum::response::Response {
    let Some(status) = Status::from_header_map(response.headers()) else {
        return response;
    };
    if status.code() == Code::OutOfRange
        && status
            .message()
            .starts_with("Error, decoded message length too large")
    {
        let limit = status
            .message()
            .rsplit_once("the limit is: ")
            .map_or("the limit", |(_, limit)| limit);
        let replaced = Status::resource_exhausted(format!(
            "request is larger than {limit}; split it or make it smaller"
        ));
        // Only fails for a message that cannot be a header value, which this one can.
        let _ = replaced.add_header(response.headers_mut());
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::ObjectKind;
    use gantry::workload::FieldError;

    #[test]
    fn codes_follow_the_table() {
        let field = |path: &str| FieldError {
            path: path.into(),
            message: "is wrong".into(),
        };
        let cases: Vec<(ops::Error, Code)> = vec![
            (
                ops::Error::InvalidArgument {
                    errors: vec![field("image"), field("replicas")],
                },
                Code::InvalidArgument,
            ),
            (
                ops::Error::NotFound {
                    kind: ObjectKind::Node,
                    name: "n1".into(),
                },
                Code::NotFound,
            ),
            (
                ops::Error::StaleRevision {
                    name: "web".into(),
                    expected: 3,
                    actual: 4,
                },
                Code::FailedPrecondition,
            ),
            (
                ops::Error::TooLarge {
                    what: "workload web".into(),
                    size: 2,
                    limit: 1,
                },
                Code::ResourceExhausted,
            ),
            (
                ops::Error::Store(StoreError::Unavailable {
                    operation: "txn",
                    source: "connection refused".into(),
                }),
                Code::Unavailable,
            ),
            (ops::Error::Store(StoreError::Closed), Code::Unavailable),
            (
                ops::Error::Store(StoreError::Backend {
                    operation: "txn",
                    source: "boom".into(),
                }),
                Code::Internal,
            ),
        ];
        for (err, code) in cases {
            let text = err.to_string();
            assert_eq!(Status::from(err).code(), code, "{text}");
        }
    }

    #[test]
    fn field_errors_are_one_per_line() {
        let status = Status::from(ops::Error::InvalidArgument {
            errors: vec![
                FieldError {
                    path: "image".into(),
                    message: "must not be empty".into(),
                },
                FieldError {
                    path: "ports[0].container".into(),
                    message: "must be 1-65535".into(),
                },
            ],
        });
        assert_eq!(
            status.message(),
            "image: must not be empty\nports[0].container: must be 1-65535"
        );
    }

    #[test]
    fn compaction_carries_the_oldest_revision() {
        let status = Status::from(StoreError::Compacted {
            requested: 3,
            compacted: 10,
        });
        assert_eq!(status.code(), Code::OutOfRange);
        assert_eq!(
            status.message(),
            "revision 3 has been compacted; oldest available is 10"
        );
        assert_eq!(
            status.metadata().get(COMPACT_REVISION_METADATA).unwrap(),
            "10"
        );
    }
}
