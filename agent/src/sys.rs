//! The agent's only `unsafe` code: thin wrappers whose safety argument fits in a comment; and
//! small queries of the system.

use std::io;
use std::os::fd::OwnedFd;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Registers an owned pidfd with the tokio reactor for readability (a pidfd polls readable once
/// its process has exited).
#[allow(unsafe_code)]
pub fn async_readable(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the `OwnedFd` is moved into the `AsyncFd` and owned by nothing else, so it stays
    // open and names the same file description until the `AsyncFd` drops it, and `as_raw_fd`
    // of an `OwnedFd` always returns the same number.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| e.into_parts().1)
}

/// Restores the default action of SIGPIPE. Rust's runtime ignores SIGPIPE, and an ignored signal
/// stays ignored across `execve`: without this, every container process would inherit it.
#[allow(unsafe_code)]
pub fn default_sigpipe() -> nix::Result<()> {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: installing SIG_DFL runs no code of ours in signal context, so there is no handler
    // whose async-signal-safety could be violated.
    unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) }.map(|_| ())
}

/// Moves the calling thread (only it) into a new, empty network namespace.
///
/// Call it on a dedicated thread that is not reused afterwards: the thread keeps the new namespace
/// for the rest of its life (see `network::netns`).
#[allow(unsafe_code)]
pub fn unshare_network() -> std::io::Result<()> {
    use rustix::thread::{UnshareFlags, unshare_unsafe};
    // SAFETY: rustix marks `unshare` unsafe only because `UnshareFlags::FILES` can give this
    // thread a file descriptor table other threads do not see, breaking fd ownership. Only
    // `NEWNET` is passed: it changes the network namespace of this thread and touches neither
    // memory nor file descriptors.
    unsafe { unshare_unsafe(UnshareFlags::NEWNET) }.map_err(std::io::Error::from)
}

/// Whether `path` is the root of a mount (its device differs from its parent's).
pub fn is_mount_point(path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(me), Some(Ok(parent))) = (
        std::fs::symlink_metadata(path),
        path.parent().map(std::fs::symlink_metadata),
    ) else {
        return false;
    };
    me.dev() != parent.dev()
}
