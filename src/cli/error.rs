//! The CLI's errors and exit codes, and the one place where gRPC statuses become messages that
//! say what was wrong and what to do.
//!
//! | exit code | when |
//! |---|---|
//! | 0 | it worked |
//! | 1 | anything failed: the scheduler refused, was unreachable, a rollout failed, … |
//! | 2 | the command line is wrong (clap's usage errors, and [`UsageError`]) |

use tonic::Code;

/// Exit code of success.
pub const EXIT_OK: u8 = 0;
/// Exit code of a failure.
pub const EXIT_ERROR: u8 = 1;
/// Exit code of a command line that cannot be run.
pub const EXIT_USAGE: u8 = 2;

/// A command line that parsed but cannot be run as given (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// A call the scheduler answered with an error, with its gRPC code kept so that callers can
/// tell "not found" from the rest.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// The gRPC status code.
    pub code: Code,
    /// What to tell the user.
    pub message: String,
}

/// The exit code for an error that ended a command.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<UsageError>().is_some() {
        EXIT_USAGE
    } else {
        EXIT_ERROR
    }
}

/// A status from the scheduler at `address` as an error that says what to do.
pub fn api(status: tonic::Status, address: &str) -> anyhow::Error {
    let code = status.code();
    let message = describe(&status, address);
    ApiError { code, message }.into()
}

/// The message for a status: the scheduler's own messages already say what to do for the
/// codes it makes; transport failures and the codes tonic makes get their own words here.
fn describe(status: &tonic::Status, address: &str) -> String {
    let text = status.message().trim();
    match status.code() {
        Code::InvalidArgument => {
            let lines: Vec<&str> = text.lines().collect();
            if lines.len() > 1 {
                format!(
                    "the scheduler refused the request:\n  {}",
                    lines.join("\n  ")
                )
            } else {
                format!("the scheduler refused the request: {text}")
            }
        }
        Code::Unavailable if transport_failed(status) => format!(
            "cannot reach the scheduler at {address}: {}; is it running? (`gantry up` starts a local cluster)",
            transport_reason(status)
        ),
        Code::Unavailable => {
            format!("the scheduler at {address} is unavailable: {text}; retry in a moment")
        }
        Code::DeadlineExceeded => format!(
            "the scheduler at {address} did not answer in time ({text}); retry, or allow more with --timeout"
        ),
        Code::Cancelled if text.contains("Timeout expired") || text.contains("timeout") => format!(
            "the scheduler at {address} did not answer in time; retry, or allow more with --timeout"
        ),
        Code::Unauthenticated => format!(
            "the scheduler at {address} did not accept the credentials: {text}; check `token`, `cert` and `key` in the config file"
        ),
        Code::PermissionDenied => {
            format!("the scheduler at {address} does not allow this: {text}")
        }
        Code::Unimplemented => format!(
            "the scheduler at {address} does not support this call ({}); upgrade it to the version of this gantry",
            if text.is_empty() {
                "unimplemented"
            } else {
                text
            }
        ),
        Code::Internal | Code::Unknown | Code::DataLoss => {
            format!("the scheduler at {address} failed: {text}; see its log")
        }
        // NOT_FOUND, FAILED_PRECONDITION, ABORTED, RESOURCE_EXHAUSTED, OUT_OF_RANGE: the
        // scheduler's message names the object and the next step.
        _ if text.is_empty() => format!("the scheduler at {address} answered {:?}", status.code()),
        _ => text.to_string(),
    }
}

/// Whether the call failed in the transport (no connection) rather than in the scheduler.
fn transport_failed(status: &tonic::Status) -> bool {
    // The scheduler's own word that its store (etcd) is unreachable quotes the store's
    // transport error: the scheduler answered, so it is not a failure to reach it.
    if status.message().starts_with("store unavailable") {
        return false;
    }
    std::error::Error::source(status).is_some()
        || status.message().contains("transport error")
        || status.message().contains("tcp connect error")
}

fn transport_reason(status: &tonic::Status) -> String {
    match std::error::Error::source(status) {
        Some(source) => gantry::client::root_cause(source),
        None => status.message().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(status: tonic::Status) -> String {
        api(status, "http://127.0.0.1:7700").to_string()
    }

    #[test]
    fn an_unreachable_store_is_not_an_unreachable_scheduler() {
        let m = message(tonic::Status::unavailable(
            "store unavailable during get: transport error: tcp connect error: Connection refused; retry",
        ));
        assert!(m.contains("is unavailable: store unavailable"), "{m}");
        assert!(!m.contains("cannot reach"), "{m}");
    }

    #[test]
    fn field_errors_go_one_per_line() {
        let m = message(tonic::Status::invalid_argument(
            "image: must not be empty\nreplicas: too many",
        ));
        assert_eq!(
            m,
            "the scheduler refused the request:\n  image: must not be empty\n  replicas: too many"
        );
    }

    #[test]
    fn the_schedulers_own_messages_pass_through() {
        let m = message(tonic::Status::not_found(
            "workload web not found; see `gantry get workloads`",
        ));
        assert_eq!(m, "workload web not found; see `gantry get workloads`");
    }

    #[test]
    fn codes_keep_their_meaning() {
        let err = api(tonic::Status::not_found("x"), "a");
        assert_eq!(err.downcast_ref::<ApiError>().unwrap().code, Code::NotFound);
        assert_eq!(exit_code(&err), EXIT_ERROR);
        assert_eq!(exit_code(&UsageError("no".into()).into()), EXIT_USAGE);
        assert!(message(tonic::Status::deadline_exceeded("deadline")).contains("--timeout"));
        assert!(message(tonic::Status::unavailable("shutting down")).contains("retry"));
    }
}
