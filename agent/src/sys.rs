//! The agent's only `unsafe` code: thin wrappers whose safety argument fits in a comment.

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
