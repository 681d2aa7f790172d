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
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout};

use super::builtin::RuntimeError;

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
        let Some((_, fifo)) = &self.resize else {
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
