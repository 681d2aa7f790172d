//! The agent's side of a streaming exec ([`BuiltinRuntime::spawn_exec`]): the running exec
//! helper (`gantry-agent shim exec`) and the exec's streams, exit code and window size.
//!
//! Without a TTY the exec'd process inherits the helper's stdio: its stdin is the write end held
//! here (or /dev/null), its stdout and stderr are pipes read here. With a TTY the helper proxies
//! between its stdio and the terminal's master (see `super::tty`): one output stream, and window
//! sizes travel through the `<name>.resize` FIFO in the container's state directory, one
//! "ROWS COLS\n" line each.
//!
//! [`BuiltinRuntime::spawn_exec`]: super::BuiltinRuntime::spawn_exec

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout};

use rustix::process::{Signal, pidfd_send_signal};

use super::builtin::RuntimeError;
use super::proc::ProcId;

/// A process running in a container, started with [`BuiltinRuntime::spawn_exec`].
///
/// Dropping it kills the exec helper: with a TTY the process then gets a hang-up (SIGHUP), without
/// one it runs on with its pipes closed.
///
/// [`BuiltinRuntime::spawn_exec`]: super::BuiltinRuntime::spawn_exec
#[derive(Debug)]
pub struct ExecProcess {
    child: Child,
    tty: bool,
    stdin: Option<ExecStdin>,
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    /// The resize FIFO and the agent's read-write handle on it (TTY only).
    resize: Option<(PathBuf, File)>,
}

impl ExecProcess {
    pub(super) fn new(mut child: Child, tty: bool, resize: Option<(PathBuf, File)>) -> Self {
        ExecProcess {
            stdin: child.stdin.take().map(|s| ExecStdin { inner: Some(s) }),
            stdout: child.stdout.take(),
            stderr: child.stderr.take(),
            child,
            tty,
            resize,
        }
    }

    /// A handle that resizes the terminal and kills the exec while another task waits for it.
    pub fn control(&self) -> ExecControl {
        let helper = self.child.id().and_then(|pid| {
            let pid = i32::try_from(pid).ok()?;
            let fd = ProcId::of(pid).ok()?.open().ok()??;
            Some((pid, fd))
        });
        ExecControl {
            helper: helper.map(|(pid, fd)| (pid, Arc::new(fd))),
            resize: self
                .resize
                .as_ref()
                .and_then(|(_, fifo)| Some(Arc::new(fifo.try_clone().ok()?))),
        }
    }

    /// Whether the process has a pseudo-terminal.
    pub fn tty(&self) -> bool {
        self.tty
    }

    /// The process's stdin, when the exec asked for it (`ExecSpec::stdin`). Dropping or shutting
    /// it down ends the input: without a TTY the process reads end-of-file; with one, the
    /// terminal's end-of-file character is typed (as at a keyboard: twice after a partial line).
    pub fn take_stdin(&mut self) -> Option<ExecStdin> {
        self.stdin.take()
    }

    /// The process's stdout; with a TTY, everything the terminal shows (stdout and stderr, echoed
    /// input), and error messages of the exec helper.
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.stdout.take()
    }

    /// The process's stderr; `None` with a TTY, where it goes to the one output stream.
    pub fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.stderr.take()
    }

    /// Sets the terminal's window size; the process gets SIGWINCH. A size set before the process
    /// runs applies before it reads any input. Fails without a TTY.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), RuntimeError> {
        write_size(self.resize.as_ref().map(|(_, fifo)| fifo), rows, cols)
    }

    /// Waits for the process to exit and returns its exit code the way Docker reports it: the
    /// process's code, 128 + signal when a signal ended it, 127 when it could not be run. Closes
    /// stdin first if it was not taken. Output not read by then is still readable afterwards.
    pub async fn wait(&mut self) -> Result<i32, RuntimeError> {
        drop(self.stdin.take());
        let status = self.child.wait().await.map_err(|source| RuntimeError::Io {
            context: "waiting for the exec helper".into(),
            source,
        })?;
        self.remove_fifo();
        Ok(std::os::unix::process::ExitStatusExt::signal(&status)
            .map(|s| 128 + s)
            .or(status.code())
            .unwrap_or(255))
    }

    fn remove_fifo(&mut self) {
        // The helper unlinks the FIFO once it has opened it; this covers a helper that never
        // got that far. Our handle stays open: later resizes go nowhere, harmlessly.
        if let Some((path, _)) = &self.resize {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for ExecProcess {
    fn drop(&mut self) {
        self.remove_fifo();
    }
}

/// The stdin of an exec: an [`AsyncWrite`] whose shutdown (or drop) closes the pipe, so that the
/// process sees its input end.
#[derive(Debug)]
pub struct ExecStdin {
    inner: Option<ChildStdin>,
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the exec's stdin is closed")
}

impl AsyncWrite for ExecStdin {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.inner.as_mut() {
            Some(w) => Pin::new(w).poll_write(cx, buf),
            None => Poll::Ready(Err(closed())),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.inner.as_mut() {
            Some(w) => Pin::new(w).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(w) = self.inner.as_mut() {
            std::task::ready!(Pin::new(w).poll_flush(cx))?;
        }
        self.inner = None;
        Poll::Ready(Ok(()))
    }
}

/// Writes a window size into an exec's resize FIFO (`None`: the exec has no TTY).
fn write_size(fifo: Option<&File>, rows: u16, cols: u16) -> Result<(), RuntimeError> {
    let Some(fifo) = fifo else {
        return Err(RuntimeError::Io {
            context: "resizing the exec's terminal".into(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "the exec has no TTY"),
        });
    };
    // One write of less than PIPE_BUF bytes: atomic, never interleaved with another.
    let line = format!("{rows} {cols}\n");
    match (&*fifo).write(line.as_bytes()) {
        Ok(n) if n == line.len() => Ok(()),
        Ok(_) => Err(RuntimeError::Io {
            context: "resizing the exec's terminal".into(),
            source: io::ErrorKind::WriteZero.into(),
        }),
        Err(source) => Err(RuntimeError::Io {
            context: "resizing the exec's terminal".into(),
            source,
        }),
    }
}

/// Resizes and kills an exec from another task than the one waiting for it (see
/// [`ExecProcess::control`]). Cheap to clone.
#[derive(Debug, Clone)]
pub struct ExecControl {
    /// The exec helper: its pid and a pidfd pinning it.
    helper: Option<(i32, Arc<OwnedFd>)>,
    /// The resize FIFO (TTY only).
    resize: Option<Arc<File>>,
}

impl ExecControl {
    /// Sets the terminal's window size, as [`ExecProcess::resize`].
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), RuntimeError> {
        write_size(self.resize.as_deref(), rows, cols)
    }

    /// Kills the exec'd process and its helper with SIGKILL: the process (the helper's child)
    /// first, so that it does not outlive a helper without a terminal; the helper then exits
    /// with 137. Does nothing once the helper has exited.
    pub fn kill(&self) {
        let Some((pid, helper)) = &self.helper else {
            return;
        };
        // While the helper lives its children cannot be reaped by anyone else, so their pids
        // stay theirs; each is still pinned by a pidfd and checked again before the signal.
        for child in children_of(*pid) {
            let Ok(Some(fd)) = ProcId::of(child).and_then(|id| id.open()) else {
                continue;
            };
            if parent_of(child) == Some(*pid) {
                let _ = pidfd_send_signal(&fd, Signal::KILL);
            }
        }
        let _ = pidfd_send_signal(&**helper, Signal::KILL);
    }
}

/// The pids whose parent is `pid`, from /proc.
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| parent_of(p) == Some(pid))
        .collect()
}

/// Field 4 of /proc/PID/stat.
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}
