//! The TTY side of the exec helper (`gantry-agent shim exec DIR JSON NAME` with `tty: true`),
//! single-threaded and without tokio like the rest of the shim: the console socket on which the
//! runtime sends the pseudo-terminal's master, the resize FIFO, and the loop that proxies between
//! the helper's own stdin/stdout (pipes to the agent) and the master until the process exits.
//!
//! Per-exec files in the container's state directory, all named after `NAME` (chosen by the
//! agent, `exec-<agent pid>-<n>`):
//!
//! ```text
//! NAME.resize  FIFO (0600) made by the agent before it starts the helper and held open by the
//!              agent read-write for the exec's life; each line "ROWS COLS\n" is a new window
//!              size. The helper opens it and unlinks it at once, and applies every size with
//!              TIOCSWINSZ on the master (the kernel then sends SIGWINCH to the terminal's
//!              foreground process group). Sizes written before the master arrived wait in the
//!              FIFO and are applied before any input is forwarded.
//! NAME.sock    the console socket (0600), bound by the helper; the runtime connects to it and
//!              sends the master with SCM_RIGHTS. Removed as soon as the master has arrived.
//! NAME.json    the exec's OCI process (`terminal: true`) for libcontainer's tenant builder;
//!              removed once the process runs.
//! NAME.pid     the process's pid from an OCI runtime binary's `exec --detach`; removed after.
//! ```

use std::fs::{File, OpenOptions};
use std::io::{self, IoSliceMut, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};

use super::shim::poll_retry;
use rustix::fs::Mode;
use rustix::io::Errno;
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
use rustix::process::{Pid, PidfdFlags, WaitOptions, pidfd_open, waitpid};
use rustix::termios::{LocalModes, SpecialCodeIndex, Winsize};

/// How long the terminal's output is still drained after the process ended, when something else
/// (a background child) still holds the terminal open.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// How long the helper waits for the runtime to send the master once the process runs.
const MASTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Input read from stdin but not yet taken by the terminal, beyond which stdin is not read.
const MAX_PENDING_INPUT: usize = 64 * 1024;

/// A file removed when this guard drops.
pub(super) struct RemoveOnDrop(PathBuf);

impl RemoveOnDrop {
    pub(super) fn new(path: PathBuf) -> RemoveOnDrop {
        RemoveOnDrop(path)
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Checks that `name` names files directly in the state directory.
pub(super) fn check_name(name: Option<&str>) -> io::Result<&str> {
    match name {
        Some(n) if !n.is_empty() && !n.contains('/') && !n.starts_with('.') => Ok(n),
        _ => Err(io::Error::other(
            "exec with a TTY needs a file name for its console socket and resize FIFO",
        )),
    }
}

/// Binds the console socket `DIR/NAME.sock`, readable and writable by root only. The helper
/// moves into `dir` first and binds a relative name: a socket's path is limited to 108 bytes and
/// state directories of 64-character ids can be longer.
pub(super) fn bind_console_socket(
    dir: &Path,
    name: &str,
) -> io::Result<(UnixListener, RemoveOnDrop)> {
    rustix::process::chdir(dir)?;
    let file = format!("{name}.sock");
    let _ = std::fs::remove_file(&file);
    let old = rustix::process::umask(Mode::from_raw_mode(0o177));
    let bound = UnixListener::bind(&file);
    rustix::process::umask(old);
    let listener = bound?;
    let guard = RemoveOnDrop::new(dir.join(file));
    listener.set_nonblocking(true)?;
    Ok((listener, guard))
}

/// Opens the resize FIFO the agent made for this exec and unlinks it (the agent holds its end
/// open already); `None` when there is none.
pub(super) fn open_resize_fifo(dir: &Path, name: &str) -> io::Result<Option<File>> {
    let path = dir.join(format!("{name}.resize"));
    let opened = OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(&path);
    match opened {
        Ok(f) => {
            let _ = std::fs::remove_file(&path);
            Ok(Some(f))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Accepts the runtime's connection on the console socket and receives the terminal's master.
pub(super) fn receive_master(listener: &UnixListener) -> io::Result<OwnedFd> {
    let deadline = Instant::now() + MASTER_TIMEOUT;
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::other(
                        "the runtime did not connect to the console socket",
                    ));
                }
                let mut fds = [PollFd::new(listener, PollFlags::IN)];
                poll_retry(&mut fds, Some(left))?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    };
    stream.set_read_timeout(Some(MASTER_TIMEOUT))?;
    let mut name = [0u8; 4096];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    loop {
        match recvmsg(
            &stream,
            &mut [IoSliceMut::new(&mut name)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(_) => break,
            Err(Errno::INTR) => {}
            Err(e) => return Err(io::Error::other(format!("receiving the terminal: {e}"))),
        }
    }
    let mut master = None;
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = msg {
            // Extra descriptors, if any, are closed as the iterator drops them.
            for fd in fds {
                master.get_or_insert(fd);
            }
        }
    }
    let master =
        master.ok_or_else(|| io::Error::other("the runtime sent no terminal descriptor"))?;
    if !rustix::termios::isatty(&master) {
        return Err(io::Error::other(
            "the runtime sent a descriptor that is no terminal",
        ));
    }
    Ok(master)
}

/// Removes the links libcontainer's tenant builder left in its container directory
/// (`tenant-tty-*.sock` → our socket) to connect to the console socket.
pub(super) fn remove_console_links(container_dir: &Path, socket: &Path) {
    let Ok(entries) = std::fs::read_dir(container_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with("tenant-tty-")
            && std::fs::read_link(entry.path()).is_ok_and(|target| target == socket)
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Proxies until process `pid` (our child) has exited and the terminal's output is drained:
/// stdin → master when `forward_stdin` (its end becomes the terminal's end-of-file character),
/// master → stdout, window sizes from `resize` → the master. Returns the process's exit code as
/// Docker reports it.
pub(super) fn proxy(
    master: OwnedFd,
    pid: Pid,
    forward_stdin: bool,
    mut resize: Option<File>,
) -> io::Result<i32> {
    rustix::io::ioctl_fionbio(&master, true)?;
    let pidfd = pidfd_open(pid, PidfdFlags::empty())?;
    let stdin = io::stdin();
    let stdin = stdin.as_fd();
    let stdout = io::stdout();
    let stdout = stdout.as_fd();

    let mut stdin_open = forward_stdin;
    let mut master_open = true;
    let mut stdout_ok = true;
    // Input taken from stdin that the terminal has not accepted yet.
    let mut pending: Vec<u8> = Vec::new();
    // Whether the last input byte ended a line (an end-of-file then needs one VEOF, not two).
    let mut at_line_start = true;
    let mut resize_buf: Vec<u8> = Vec::new();
    let mut code: Option<i32> = None;
    let mut exited_at: Option<Instant> = None;
    let mut buf = vec![0u8; 64 * 1024];

    loop {
        if let Some(code) = code
            && !master_open
        {
            return Ok(code);
        }
        let timeout = match exited_at {
            Some(t) => {
                let left = DRAIN_AFTER_EXIT.saturating_sub(t.elapsed());
                if left.is_zero() {
                    return Ok(code.unwrap_or(255));
                }
                Some(left)
            }
            None => None,
        };
        let running = code.is_none();
        let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(4);
        let resize_at = match &resize {
            Some(f) => push(&mut fds, f.as_fd(), PollFlags::IN),
            None => None,
        };
        let master_at = if master_open {
            let mut flags = PollFlags::IN;
            if running && !pending.is_empty() {
                flags |= PollFlags::OUT;
            }
            push(&mut fds, master.as_fd(), flags)
        } else {
            None
        };
        let stdin_at = if stdin_open && running && pending.len() < MAX_PENDING_INPUT {
            push(&mut fds, stdin, PollFlags::IN)
        } else {
            None
        };
        let pidfd_at = if running {
            push(&mut fds, pidfd.as_fd(), PollFlags::IN)
        } else {
            None
        };
        poll_retry(&mut fds, timeout)?;
        let revents =
            |at: Option<usize>| at.map(|i| fds[i].revents()).unwrap_or(PollFlags::empty());
        let (r_resize, r_master, r_stdin, r_pidfd) = (
            revents(resize_at),
            revents(master_at),
            revents(stdin_at),
            revents(pidfd_at),
        );
        drop(fds);

        // Window sizes first: a size sent before some input applies before that input.
        if !r_resize.is_empty()
            && let Some(f) = resize.as_mut()
        {
            match f.read(&mut buf) {
                Ok(0) => resize = None,
                Ok(n) => {
                    resize_buf.extend_from_slice(&buf[..n]);
                    apply_sizes(&master, &mut resize_buf);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => resize = None,
            }
        }
        if !r_pidfd.is_empty() {
            match waitpid(Some(pid), WaitOptions::NOHANG) {
                Ok(Some((_, ws))) => {
                    code = Some(match ws.terminating_signal() {
                        Some(sig) => 128 + sig,
                        None => ws.exit_status().unwrap_or(255),
                    });
                    exited_at = Some(Instant::now());
                }
                Ok(None) | Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if r_master.intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR) {
            match rustix::io::read(&master, &mut buf) {
                Ok(0) => master_open = false,
                Ok(n) => {
                    if stdout_ok && write_all(stdout, &buf[..n]).is_err() {
                        // Nobody reads the output any more: keep the process's terminal going.
                        stdout_ok = false;
                    }
                }
                Err(Errno::AGAIN | Errno::INTR) => {}
                // EIO: every holder of the terminal's slave side has closed it.
                Err(_) => master_open = false,
            }
        }
        if r_master.contains(PollFlags::OUT) && !pending.is_empty() {
            match rustix::io::write(&master, &pending) {
                Ok(n) => {
                    pending.drain(..n);
                }
                Err(Errno::AGAIN | Errno::INTR) => {}
                Err(_) => pending.clear(),
            }
        }
        if !r_stdin.is_empty() {
            let room = MAX_PENDING_INPUT - pending.len();
            match rustix::io::read(stdin, &mut buf[..room.min(16 * 1024)]) {
                Ok(0) | Err(Errno::BADF) => {
                    stdin_open = false;
                    pending.extend_from_slice(&end_of_file(&master, at_line_start));
                }
                Ok(n) => {
                    pending.extend_from_slice(&buf[..n]);
                    at_line_start = matches!(buf[n - 1], b'\n' | b'\r');
                }
                Err(Errno::AGAIN | Errno::INTR) => {}
                Err(_) => {
                    stdin_open = false;
                    pending.extend_from_slice(&end_of_file(&master, at_line_start));
                }
            }
        }
    }
}

/// Adds `fd` to a poll set; returns its index.
fn push<'a>(fds: &mut Vec<PollFd<'a>>, fd: BorrowedFd<'a>, flags: PollFlags) -> Option<usize> {
    fds.push(PollFd::from_borrowed_fd(fd, flags));
    Some(fds.len() - 1)
}

/// What typing end-of-file into the terminal takes: its VEOF character (^D), twice when a line
/// was started (the first only submits that line), once in non-canonical mode.
fn end_of_file(master: &OwnedFd, at_line_start: bool) -> Vec<u8> {
    let Ok(termios) = rustix::termios::tcgetattr(master) else {
        return vec![0x04];
    };
    let veof = match termios.special_codes[SpecialCodeIndex::VEOF] {
        0 => 0x04,
        c => c,
    };
    let canonical = termios.local_modes.contains(LocalModes::ICANON);
    if canonical && !at_line_start {
        vec![veof, veof]
    } else {
        vec![veof]
    }
}

/// Applies the last complete "ROWS COLS" line in `buf` to the terminal and keeps any partial one.
fn apply_sizes(master: &OwnedFd, buf: &mut Vec<u8>) {
    let Some(end) = buf.iter().rposition(|&b| b == b'\n') else {
        return;
    };
    let lines: Vec<u8> = buf.drain(..=end).collect();
    let last = String::from_utf8_lossy(&lines);
    let size = last.lines().rev().find_map(parse_size);
    if let Some((rows, cols)) = size {
        // A terminal whose other side is gone cannot be resized: nothing to report.
        let _ = rustix::termios::tcsetwinsize(
            master,
            Winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            },
        );
    }
}

/// Parses "ROWS COLS".
pub fn parse_size(line: &str) -> Option<(u16, u16)> {
    let mut parts = line.split_whitespace();
    let rows = parts.next()?.parse().ok()?;
    let cols = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((rows, cols))
}

/// Writes all of `data` to `fd`, waiting for room when the fd is non-blocking.
fn write_all(fd: BorrowedFd<'_>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match rustix::io::write(fd, data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(Errno::INTR) => {}
            Err(Errno::AGAIN) => {
                let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::OUT)];
                poll_retry(&mut fds, None)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("40 100"), Some((40, 100)));
        assert_eq!(parse_size(" 1  2 "), Some((1, 2)));
        assert_eq!(parse_size("40"), None);
        assert_eq!(parse_size("40 100 3"), None);
        assert_eq!(parse_size("-1 100"), None);
        assert_eq!(parse_size("70000 1"), None);
    }

    #[test]
    fn names_stay_in_the_state_directory() {
        assert!(check_name(Some("exec-1-2")).is_ok());
        for bad in [None, Some(""), Some("../x"), Some("a/b"), Some(".hidden")] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
