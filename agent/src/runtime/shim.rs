//! The per-container shim: `gantry-agent shim run|exec|delete DIR`. A small single-threaded
//! process (no tokio) that creates the container — with libcontainer, which clones and runs Rust
//! code in its children and so must never run in a multi-threaded process, or with an OCI runtime
//! binary — stays the parent of its init, pumps its stdout/stderr into rotating log files, and
//! records how it ended in `exit.json`. It outlives the agent; the agent only talks to it through
//! the state directory, FIFOs, signals and pidfds.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use libcontainer::container::Container;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::oci_spec::runtime::Spec;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use rustix::event::{PollFd, PollFlags, poll};
use rustix::pipe::{PipeFlags, pipe_with};
use rustix::process::{Pid, PidfdFlags, WaitOptions, pidfd_open, waitpid};

use super::ExitStatus;
use super::proc::ProcId;
use super::seccomp_bpf;
use super::spec::{ContainerSpec, ExecSpec};
use super::state::{self, ContainerDir, ProcessRecord, RuntimeKind, ShimConfig};
use super::{tty, user};
use crate::logs::{LineSplitter, LogWriter, Stream};

/// How long output is still drained after the init process ended (its descendants in the same
/// PID namespace are killed with it, so the pipes close almost at once).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// Entry point of `gantry-agent shim …`; returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    let (cmd, dir) = match args {
        [cmd, dir, ..] => (cmd.as_str(), ContainerDir::from_path(dir.into())),
        _ => {
            eprintln!("usage: gantry-agent shim run|exec|delete STATE_DIR [EXEC_JSON [TTY_NAME]]");
            return 2;
        }
    };
    let result = match cmd {
        "run" => run(&dir).map(|()| 0),
        "exec" => match args.get(2) {
            Some(json) => exec(&dir, json, args.get(3).map(String::as_str)),
            None => Err(io::Error::other("exec needs the exec spec as JSON")),
        },
        "delete" => delete(&dir).map(|()| 0),
        other => Err(io::Error::other(format!("unknown shim command {other:?}"))),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("shim {cmd}: {err}");
            if cmd == "exec" { 127 } else { 1 }
        }
    }
}

/// A created container, whichever runtime made it.
enum Created {
    Builtin(Box<Container>),
    Oci { binary: std::path::PathBuf },
}

fn run(dir: &ContainerDir) -> io::Result<()> {
    let config: ShimConfig = state::read_json(&dir.shim_config())?
        .ok_or_else(|| io::Error::other("shim.json is missing"))?;
    // Our stdout is the agent's "ready" pipe: keep it aside for one answer, then point stdout at
    // /dev/null so nothing else ever reaches the agent through it.
    let ready = rustix::io::dup(io::stdout())?;
    let devnull = File::open("/dev/null")?;
    rustix::stdio::dup2_stdout(&devnull)?;
    let mut ready = File::from(ready);

    // Our own session: terminal signals to the agent's process group must not reach us.
    rustix::process::setsid()?;
    // Reparented orphans (the init of an OCI runtime binary after `create`, exec helpers) become
    // our children so we can reap them and learn their exit status.
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))?;

    let (out_r, out_w) = pipe_with(PipeFlags::CLOEXEC)?;
    let (err_r, err_w) = pipe_with(PipeFlags::CLOEXEC)?;
    let created = match create(dir, &config, devnull, out_w, err_w) {
        Ok(c) => c,
        Err(err) => {
            let _ = writeln!(ready, "error: {err}");
            cleanup(dir, &config);
            return Err(err);
        }
    };
    let (mut created, init_pid) = created;
    let init = ProcId::of(init_pid)?;
    let mut record = ProcessRecord {
        shim: ProcId::of(rustix::process::getpid().as_raw_nonzero().get())?,
        init,
        created_at: SystemTime::now(),
        started_at: None,
    };
    state::write_json(&dir.process(), &record)?;
    let start_fifo = OpenOptions::new()
        .read(true)
        .write(true) // keeps a writer open so poll never reports a hang-up on the FIFO
        .custom_flags(libc_flags::O_NONBLOCK)
        .open(dir.start_fifo())?;
    let pid = Pid::from_raw(init_pid).ok_or_else(|| io::Error::other("init pid is zero"))?;
    let init_fd = pidfd_open(pid, PidfdFlags::empty())?;
    // The agent may have died since it asked: the container lives on regardless.
    let _ = writeln!(ready, "ok {init_pid}");
    drop(ready);

    let mut status = None;
    // Phase 1: created, waiting to be started (or killed before that).
    let started = loop {
        let mut fds = [
            PollFd::new(&start_fifo, PollFlags::IN),
            PollFd::new(&init_fd, PollFlags::IN),
        ];
        poll_retry(&mut fds, None)?;
        let (start_ready, init_ready) =
            (!fds[0].revents().is_empty(), !fds[1].revents().is_empty());
        if init_ready {
            reap(pid, &mut status);
            if status.is_some() {
                break false;
            }
        }
        if start_ready {
            let mut b = [0u8; 16];
            let _ = (&start_fifo).read(&mut b);
            let answer = start(dir, &config, &mut created);
            if answer.is_ok() {
                record.started_at = Some(SystemTime::now());
                state::write_json(&dir.process(), &record)?;
            }
            reply_started(dir, &answer);
            if answer.is_ok() {
                break true;
            }
        }
    };
    drop(start_fifo);

    // Phase 2: pump output into the logs until the init exits and the pipes close.
    if started {
        pump(dir, &config, pid, &init_fd, out_r, err_r, &mut status)?;
    }
    let wait = status.unwrap_or({
        // Someone else reaped it (cannot happen while we are its parent); record what we know.
        WaitResult {
            code: 255,
            signal: None,
        }
    });
    let oom_kills = config.cgroups.oom_kills(&config.id).unwrap_or(0);
    cleanup_created(dir, &config, created);
    let exit = ExitStatus {
        code: wait.code,
        signal: wait.signal,
        oom_killed: oom_kills > 0,
        finished_at: SystemTime::now(),
        reason: (!started).then(|| "killed before it was started".to_string()),
    };
    state::write_json(&dir.exit(), &exit)
}

/// `O_NONBLOCK` for `OpenOptions::custom_flags`, taken from rustix so no libc dependency is needed.
mod libc_flags {
    pub const O_NONBLOCK: i32 = rustix::fs::OFlags::NONBLOCK.bits() as i32;
}

fn create(
    dir: &ContainerDir,
    config: &ShimConfig,
    stdin: File,
    out_w: OwnedFd,
    err_w: OwnedFd,
) -> io::Result<(Created, i32)> {
    std::fs::create_dir_all(dir.oci_root())?;
    match &config.runtime {
        RuntimeKind::Builtin => {
            let executor = GantryExecutor::load(dir)?;
            let container = ContainerBuilder::new(config.id.clone(), SyscallType::default())
                .with_root_path(dir.oci_root())
                .and_then(|b| b.validate_id())
                .map(|b| {
                    b.with_executor(executor)
                        .with_stdin(stdin)
                        .with_stdout(out_w)
                        .with_stderr(err_w)
                        .as_init(dir.bundle())
                        .with_systemd(false)
                        .with_detach(true)
                })
                .and_then(|b| b.build())
                .map_err(|e| io::Error::other(format!("create: {e}")))?;
            let pid = container
                .pid()
                .ok_or_else(|| io::Error::other("create: container has no init pid"))?;
            Ok((Created::Builtin(Box::new(container)), pid.as_raw()))
        }
        RuntimeKind::Oci(binary) => {
            let pid_file = dir.path().join("init.pid");
            let out = Command::new(binary)
                .arg("--root")
                .arg(dir.oci_root())
                .arg("create")
                .arg("--bundle")
                .arg(dir.bundle())
                .arg("--pid-file")
                .arg(&pid_file)
                .arg(&config.id)
                .stdin(stdin)
                .stdout(Stdio::from(out_w))
                .stderr(Stdio::from(err_w))
                .output()?;
            if !out.status.success() {
                return Err(io::Error::other(format!(
                    "{} create failed ({})",
                    binary.display(),
                    out.status
                )));
            }
            let pid: i32 = std::fs::read_to_string(&pid_file)?
                .trim()
                .parse()
                .map_err(|e| io::Error::other(format!("bad pid file {pid_file:?}: {e}")))?;
            Ok((
                Created::Oci {
                    binary: binary.clone(),
                },
                pid,
            ))
        }
    }
}

fn start(dir: &ContainerDir, config: &ShimConfig, created: &mut Created) -> io::Result<()> {
    match created {
        Created::Builtin(c) => c
            .start()
            .map_err(|e| io::Error::other(format!("start: {e}"))),
        Created::Oci { binary } => {
            let out = Command::new(&*binary)
                .arg("--root")
                .arg(dir.oci_root())
                .args(["start", &config.id])
                .stdin(Stdio::null())
                .output()?;
            if out.status.success() {
                Ok(())
            } else {
                Err(io::Error::other(format!(
                    "start: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )))
            }
        }
    }
}

/// Answers a start request on the `started` FIFO. The agent opened its read end before asking;
/// if it has gone since (ENXIO), nobody is waiting and the answer is dropped.
fn reply_started(dir: &ContainerDir, answer: &io::Result<()>) {
    let opened = OpenOptions::new()
        .write(true)
        .custom_flags(libc_flags::O_NONBLOCK)
        .open(dir.started_fifo());
    if let Ok(mut f) = opened {
        let _ = match answer {
            Ok(()) => f.write_all(b"ok\n"),
            Err(e) => f.write_all(format!("error: {e}\n").as_bytes()),
        };
    }
}

/// The init's end, as waitpid reported it.
#[derive(Debug, Clone, Copy)]
struct WaitResult {
    code: i32,
    signal: Option<i32>,
}

/// Reaps every exited child; records the init's status when it is among them.
fn reap(init: Pid, status: &mut Option<WaitResult>) {
    loop {
        // `wait` is wait4(-1): any child. (`waitpid(None)` would be our process group only, and
        // the container's init is in a session of its own.)
        match rustix::process::wait(WaitOptions::NOHANG) {
            Ok(Some((pid, ws))) => {
                if pid == init {
                    *status = Some(match ws.terminating_signal() {
                        Some(sig) => WaitResult {
                            code: 128 + sig,
                            signal: Some(sig),
                        },
                        None => WaitResult {
                            code: ws.exit_status().unwrap_or(255),
                            signal: None,
                        },
                    });
                }
            }
            Ok(None) | Err(_) => return,
        }
    }
}

/// `poll` that retries when a signal interrupts it.
pub(super) fn poll_retry(fds: &mut [PollFd<'_>], timeout: Option<Duration>) -> io::Result<usize> {
    let ts = timeout.map(|d| rustix::event::Timespec {
        tv_sec: d.as_secs() as i64,
        tv_nsec: d.subsec_nanos() as i64,
    });
    loop {
        match poll(fds, ts.as_ref()) {
            Err(rustix::io::Errno::INTR) => continue,
            other => return other.map_err(io::Error::from),
        }
    }
}

fn pump(
    dir: &ContainerDir,
    config: &ShimConfig,
    init: Pid,
    init_fd: &OwnedFd,
    out_r: OwnedFd,
    err_r: OwnedFd,
    status: &mut Option<WaitResult>,
) -> io::Result<()> {
    let mut logs = LogWriter::open(&dir.logs(), config.log.clone())
        .map_err(|e| io::Error::other(e.to_string()))?;
    let mut streams = [
        (Some(File::from(out_r)), LineSplitter::new(), Stream::Stdout),
        (Some(File::from(err_r)), LineSplitter::new(), Stream::Stderr),
    ];
    let mut buf = vec![0u8; 64 * 1024];
    let mut exited_at: Option<Instant> = None;
    loop {
        if status.is_none() {
            reap(init, status);
        }
        if status.is_some() && exited_at.is_none() {
            exited_at = Some(Instant::now());
        }
        let open: Vec<usize> = (0..2).filter(|&i| streams[i].0.is_some()).collect();
        if open.is_empty() && status.is_some() {
            return Ok(());
        }
        let timeout = match exited_at {
            Some(t) => {
                let left = DRAIN_AFTER_EXIT.saturating_sub(t.elapsed());
                if left.is_zero() {
                    return Ok(());
                }
                Some(left)
            }
            None => None,
        };
        let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(3);
        for &i in &open {
            if let Some(f) = &streams[i].0 {
                fds.push(PollFd::new(f, PollFlags::IN));
            }
        }
        let watch_init = status.is_none();
        if watch_init {
            fds.push(PollFd::new(init_fd, PollFlags::IN));
        }
        poll_retry(&mut fds, timeout)?;
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        drop(fds);
        for (slot, &i) in open.iter().enumerate() {
            if !ready[slot] {
                continue;
            }
            let (file, splitter, stream) = &mut streams[i];
            let n = match file.as_mut().map(|f| f.read(&mut buf)) {
                Some(Ok(n)) => n,
                Some(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Some(Err(_)) | None => 0,
            };
            let now = SystemTime::now();
            if n == 0 {
                if let Some((line, partial)) = splitter.finish() {
                    write_log(&mut logs, *stream, now, &line, partial);
                }
                *file = None;
                continue;
            }
            let stream = *stream;
            splitter.push(&buf[..n], |line, partial| {
                write_log(&mut logs, stream, now, line, partial)
            });
        }
    }
}

fn write_log(logs: &mut LogWriter, stream: Stream, time: SystemTime, line: &[u8], partial: bool) {
    if let Err(e) = logs.write_entry(stream, time, line, partial) {
        // Losing a log line must not kill the container's shim: say so on the shim's stderr.
        eprintln!("shim: writing log: {e}");
    }
}

/// Removes what the runtime holds for a container whose init has ended: its cgroup and the
/// runtime's own state.
fn cleanup_created(dir: &ContainerDir, config: &ShimConfig, created: Created) {
    match created {
        Created::Builtin(_) => {
            // The init is reaped, so its PID namespace and every process in it are gone: what
            // libcontainer's delete would still do is remove the cgroup (below) and its state
            // directory. Doing that directly saves it re-deriving every cgroup path from procfs
            // (~3 ms a container).
            let root = dir.oci_root().join(&config.id);
            if let Err(e) = std::fs::remove_dir_all(&root) {
                eprintln!("shim: removing {root:?}: {e}");
            }
        }
        Created::Oci { .. } => cleanup(dir, config),
    }
    if let Err(e) = config.cgroups.remove(&config.id) {
        eprintln!("shim: removing cgroup: {e}");
    }
}

/// Best-effort removal of a container's runtime state and cgroup by id, when no live `Container`
/// value is at hand (a failed create, or a shim that died).
fn cleanup(dir: &ContainerDir, config: &ShimConfig) {
    match &config.runtime {
        RuntimeKind::Builtin => {
            let root = dir.oci_root().join(&config.id);
            if root.exists() {
                match Container::load(root) {
                    Ok(mut c) => {
                        if let Err(e) = c.delete(true) {
                            eprintln!("shim: delete: {e}");
                        }
                    }
                    Err(e) => eprintln!("shim: load container state: {e}"),
                }
            }
        }
        RuntimeKind::Oci(binary) => {
            let _ = Command::new(binary)
                .arg("--root")
                .arg(dir.oci_root())
                .args(["delete", "--force", &config.id])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
    if let Err(e) = config.cgroups.remove(&config.id) {
        eprintln!("shim: removing cgroup: {e}");
    }
}

fn delete(dir: &ContainerDir) -> io::Result<()> {
    let config: ShimConfig = state::read_json(&dir.shim_config())?
        .ok_or_else(|| io::Error::other("shim.json is missing"))?;
    cleanup(dir, &config);
    Ok(())
}

/// `shim exec DIR JSON [TTY_NAME]`: runs a process in the container and exits with its exit code
/// (128 + signal when killed, 127 when it could not be run). Without a TTY the process gets this
/// process's stdio; with one (`tty: true`, see `super::tty`) this process proxies between its
/// stdio and the terminal, and its own errors go to stdout, the one output stream.
fn exec(dir: &ContainerDir, json: &str, tty_name: Option<&str>) -> io::Result<i32> {
    let exec: ExecSpec =
        serde_json::from_str(json).map_err(|e| io::Error::other(format!("exec spec: {e}")))?;
    if exec.tty {
        rustix::stdio::dup2_stderr(io::stdout())?;
    }
    let config: ShimConfig = state::read_json(&dir.shim_config())?
        .ok_or_else(|| io::Error::other("shim.json is missing"))?;
    let spec: ContainerSpec =
        state::read_json(&dir.spec())?.ok_or_else(|| io::Error::other("spec.json is missing"))?;
    if exec.args.is_empty() {
        return Err(io::Error::other("exec: no command given"));
    }
    // Like `docker exec`: the container's user unless the exec names one.
    let user_spec = if exec.user.is_empty() {
        &spec.process.user
    } else {
        &exec.user
    };
    // The container's own view of its root: the node's mount of the rootfs is detached once
    // the container exists (see `ImageStore::detach_rootfs`).
    let root = match state::read_json::<ProcessRecord>(&dir.process())? {
        Some(record) if record.init.open()?.is_some() => {
            std::path::PathBuf::from(format!("/proc/{}/root", record.init.pid))
        }
        _ => spec.rootfs.clone(),
    };
    let resolved =
        Some(user::resolve(&root, user_spec).map_err(|e| io::Error::other(e.to_string()))?);
    if exec.tty {
        return exec_tty(
            dir,
            &config,
            &spec,
            &exec,
            resolved.as_ref(),
            tty::check_name(tty_name)?,
        );
    }
    match &config.runtime {
        RuntimeKind::Builtin => {
            let name = format!("exec-{}", rustix::process::getpid().as_raw_nonzero());
            let process_file = write_process_file(dir, &spec, &exec, resolved.as_ref(), &name)?;
            let pid = ContainerBuilder::new(config.id.clone(), SyscallType::default())
                .with_root_path(dir.oci_root())
                .map_err(|e| io::Error::other(e.to_string()))?
                .with_executor(GantryExecutor::load(dir)?)
                .as_tenant()
                .with_process(Some(process_file.path()))
                .with_detach(false)
                .build()
                .map_err(|e| io::Error::other(e.to_string()))?;
            let pid = Pid::from_raw(pid.as_raw()).ok_or_else(|| io::Error::other("pid 0"))?;
            loop {
                match waitpid(Some(pid), WaitOptions::empty()) {
                    Ok(Some((_, ws))) => {
                        return Ok(match ws.terminating_signal() {
                            Some(sig) => 128 + sig,
                            None => ws.exit_status().unwrap_or(255),
                        });
                    }
                    Ok(None) => continue,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        RuntimeKind::Oci(binary) => {
            let mut cmd = Command::new(binary);
            cmd.arg("--root").arg(dir.oci_root()).arg("exec");
            oci_exec_options(&mut cmd, &exec.env, &exec, resolved.as_ref());
            cmd.arg(&config.id).args(&exec.args);
            let status = cmd.status()?;
            Ok(status.code().unwrap_or(255))
        }
    }
}

/// The options of `<oci runtime> exec` for `exec`'s directory and user, and the variables `env`.
fn oci_exec_options(
    cmd: &mut Command,
    env: &[String],
    exec: &ExecSpec,
    resolved: Option<&user::ResolvedUser>,
) {
    for kv in env {
        cmd.arg("--env").arg(kv);
    }
    if let Some(cwd) = &exec.cwd {
        cmd.arg("--cwd").arg(cwd);
    }
    if let Some(u) = resolved {
        cmd.arg("--user").arg(format!("{}:{}", u.uid, u.gid));
        for g in &u.additional_gids {
            cmd.arg("--additional-gids").arg(g.to_string());
        }
    }
}

/// The environment an exec gets on top of the OCI spec's: the container's, then the exec's own.
fn exec_env(spec: &ContainerSpec, exec: &ExecSpec) -> HashMap<String, String> {
    let mut env: HashMap<String, String> = HashMap::new();
    for kv in spec.process.env.iter().chain(exec.env.iter()) {
        if let Some((k, v)) = kv.split_once('=') {
            env.insert(k.to_string(), v.to_string());
        }
    }
    env
}

/// An exec with a pseudo-terminal: the runtime creates the terminal in the container, makes it
/// the process's controlling terminal and stdio, and sends its master to our console socket;
/// then `tty::proxy` runs until the process has exited.
fn exec_tty(
    dir: &ContainerDir,
    config: &ShimConfig,
    spec: &ContainerSpec,
    exec: &ExecSpec,
    resolved: Option<&user::ResolvedUser>,
    name: &str,
) -> io::Result<i32> {
    let (listener, socket) = tty::bind_console_socket(dir.path(), name)?;
    let resize = tty::open_resize_fifo(dir.path(), name)?;
    let pid = match &config.runtime {
        RuntimeKind::Builtin => {
            let process_file = write_process_file(dir, spec, exec, resolved, name)?;
            let built = ContainerBuilder::new(config.id.clone(), SyscallType::default())
                .with_root_path(dir.oci_root())
                .map_err(|e| io::Error::other(e.to_string()))?
                .with_executor(GantryExecutor::load(dir)?)
                .with_console_socket(Some(socket.path()))
                .as_tenant()
                .with_process(Some(process_file.path()))
                // "Detached" only tells libcontainer that a console socket is expected; the
                // process is our child either way.
                .with_detach(true)
                .build();
            tty::remove_console_links(&dir.oci_root().join(&config.id), socket.path());
            let pid = built.map_err(|e| io::Error::other(e.to_string()))?;
            Pid::from_raw(pid.as_raw()).ok_or_else(|| io::Error::other("pid 0"))?
        }
        RuntimeKind::Oci(binary) => {
            // `exec --detach` returns once the process runs; it is reparented to us, its
            // subreaper, so that we can wait for it.
            rustix::process::set_child_subreaper(Some(rustix::process::getpid()))?;
            let pid_file = tty::RemoveOnDrop::new(dir.path().join(format!("{name}.pid")));
            let mut env = exec.env.clone();
            let has_term = |kv: &String| kv.starts_with("TERM=");
            if !spec.process.env.iter().any(has_term) && !env.iter().any(has_term) {
                env.push("TERM=xterm".into());
            }
            let mut cmd = Command::new(binary);
            cmd.arg("--root")
                .arg(dir.oci_root())
                .arg("exec")
                .arg("--tty")
                .arg("--detach")
                // Through our working directory, the state directory, as a socket's path must be
                // short (see bind_console_socket); the runtime binary changes its own.
                .arg("--console-socket")
                .arg(format!(
                    "/proc/{}/cwd/{name}.sock",
                    rustix::process::getpid().as_raw_nonzero()
                ))
                .arg("--pid-file")
                .arg(pid_file.path());
            oci_exec_options(&mut cmd, &env, exec, resolved);
            cmd.arg(&config.id).args(&exec.args).stdin(Stdio::null());
            let status = cmd.status()?;
            if !status.success() {
                return Err(io::Error::other(format!(
                    "{} exec failed ({status})",
                    binary.display()
                )));
            }
            let pid: i32 = std::fs::read_to_string(pid_file.path())?
                .trim()
                .parse()
                .map_err(|e| io::Error::other(format!("bad pid file: {e}")))?;
            Pid::from_raw(pid).ok_or_else(|| io::Error::other("pid 0"))?
        }
    };
    let master = match tty::receive_master(&listener) {
        Ok(m) => m,
        Err(e) => {
            // The process runs without anyone at its terminal: end it, then report.
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            let _ = waitpid(Some(pid), WaitOptions::empty());
            return Err(e);
        }
    };
    drop(listener);
    drop(socket);
    tty::proxy(master, pid, exec.stdin, resize)
}

/// Writes the OCI process of an exec to `DIR/NAME.json` (0600), removed when the returned guard
/// drops. libcontainer's tenant builder takes the container's rlimits and `terminal` only from
/// such a file, never from its own options (whose default process has 1024:1024 open files).
fn write_process_file(
    dir: &ContainerDir,
    spec: &ContainerSpec,
    exec: &ExecSpec,
    resolved: Option<&user::ResolvedUser>,
    name: &str,
) -> io::Result<tty::RemoveOnDrop> {
    let oci = Spec::load(dir.bundle().join("config.json"))
        .map_err(|e| io::Error::other(format!("loading config.json: {e}")))?;
    let process = tenant_process(&oci, spec, exec, resolved)?;
    let file = tty::RemoveOnDrop::new(dir.path().join(format!("{name}.json")));
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file.path())?
        .write_all(&serde_json::to_vec(&process).map_err(io::Error::other)?)?;
    Ok(file)
}

/// The OCI process of an exec: what libcontainer's tenant builder makes from its options
/// (`adapt_spec_for_tenant`: the default process with the exec's arguments, environment,
/// directory and user, the container's no-new-privileges and capabilities), plus the
/// container's rlimits, and with a TTY `terminal: true` and `TERM=xterm` unless a `TERM` is set,
/// as Docker does.
fn tenant_process(
    oci: &Spec,
    spec: &ContainerSpec,
    exec: &ExecSpec,
    resolved: Option<&user::ResolvedUser>,
) -> io::Result<libcontainer::oci_spec::runtime::Process> {
    use libcontainer::oci_spec::runtime::{LinuxCapabilities, ProcessBuilder, UserBuilder};
    let err = |e: libcontainer::oci_spec::OciSpecError| io::Error::other(e.to_string());
    let spec_process = oci.process().as_ref();
    let spec_env = spec_process
        .and_then(|p| p.env().clone())
        .unwrap_or_default();
    let mut overrides = exec_env(spec, exec);
    let key = |kv: &String| kv.split('=').next().unwrap_or("").to_string();
    if exec.tty && !overrides.contains_key("TERM") && !spec_env.iter().any(|kv| key(kv) == "TERM") {
        overrides.insert("TERM".into(), "xterm".into());
    }
    let mut env: Vec<String> = spec_env
        .into_iter()
        .filter(|kv| !overrides.contains_key(&key(kv)))
        .collect();
    env.extend(overrides.iter().map(|(k, v)| format!("{k}={v}")));

    let mut builder = ProcessBuilder::default()
        .args(exec.args.clone())
        .env(env)
        .terminal(exec.tty);
    if let Some(rlimits) = spec_process.and_then(|p| p.rlimits().clone()) {
        builder = builder.rlimits(rlimits);
    }
    if let Some(cwd) = &exec.cwd {
        if cwd.is_relative() {
            return Err(io::Error::other(
                "current working directory must be an absolute path",
            ));
        }
        builder = builder.cwd(cwd.clone());
    }
    if let Some(affinity) = spec_process.and_then(|p| p.exec_cpu_affinity().clone()) {
        builder = builder.exec_cpu_affinity(affinity);
    }
    if let Some(nnp) = spec_process.and_then(|p| p.no_new_privileges()) {
        builder = builder.no_new_privileges(nnp);
    }
    let empty = || Some(Default::default());
    let mut caps = LinuxCapabilities::default();
    match spec_process.and_then(|p| p.capabilities().as_ref()) {
        Some(c) => {
            caps.set_bounding(c.bounding().clone().or_else(empty));
            caps.set_effective(c.effective().clone().or_else(empty));
            caps.set_permitted(c.permitted().clone().or_else(empty));
            // Ambient capabilities only with inheritable ones, as runc does.
            match c.inheritable() {
                Some(inheritable) => {
                    caps.set_ambient(c.ambient().clone().or_else(empty));
                    caps.set_inheritable(Some(inheritable.clone()));
                }
                None => {
                    caps.set_ambient(None);
                    caps.set_inheritable(None);
                }
            }
        }
        None => {
            caps.set_bounding(empty());
            caps.set_effective(empty());
            caps.set_permitted(empty());
            caps.set_ambient(None);
            caps.set_inheritable(None);
        }
    }
    builder = builder.capabilities(caps);
    let mut user = UserBuilder::default();
    if let Some(u) = resolved {
        if !u.additional_gids.is_empty() {
            user = user.additional_gids(u.additional_gids.clone());
        }
        user = user.uid(u.uid).gid(u.gid);
    }
    builder
        .user(user.build().map_err(err)?)
        .build()
        .map_err(err)
}

/// Runs the container's program, and when it cannot be run says why on the container's stderr and
/// exits 127, as a shell and Docker do, so the failure shows in the logs and the exit status.
/// Installs the container's precompiled seccomp filter last, right before `execve`.
#[derive(Clone)]
struct GantryExecutor {
    filter: Option<std::sync::Arc<Vec<seccompiler::sock_filter>>>,
}

impl GantryExecutor {
    /// The executor for the container in `dir`, with its compiled filter if it has one.
    fn load(dir: &ContainerDir) -> io::Result<GantryExecutor> {
        let filter = match std::fs::read(dir.seccomp_bpf()) {
            Ok(bytes) => Some(std::sync::Arc::new(
                seccomp_bpf::decode(&bytes).map_err(|e| io::Error::other(e.to_string()))?,
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok(GantryExecutor { filter })
    }
}

impl Executor for GantryExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        let args = spec
            .process()
            .as_ref()
            .and_then(|p| p.args().as_ref())
            .filter(|a| !a.is_empty())
            .ok_or(ExecutorError::InvalidArg)?;
        if let Some(filter) = &self.filter
            && let Err(e) = seccomp_bpf::install(filter)
        {
            let _ = writeln!(io::stderr(), "{e}");
            std::process::exit(127);
        }
        let err = exec_program(args);
        let _ = writeln!(io::stderr(), "exec: {}: {err}", args[0]);
        std::process::exit(127);
    }

    fn validate(&self, _spec: &Spec) -> Result<(), ExecutorValidationError> {
        // The agent validated the program inside the rootfs before creating the container.
        Ok(())
    }
}

/// Replaces this process with `args`, looking the program up in `PATH` like execvp but without
/// glibc's fallback of running a non-executable file with /bin/sh: a file that is not a valid
/// executable fails with "exec format error", as with runc. Returns only on failure, with the
/// reason worded as Docker words it.
fn exec_program(args: &[String]) -> String {
    use std::ffi::CString;
    let to_c = |s: &str| CString::new(s).map_err(|_| "argument contains a NUL byte".to_string());
    let argv: Result<Vec<CString>, String> = args.iter().map(|a| to_c(a)).collect();
    let env: Result<Vec<CString>, String> = std::env::vars()
        .map(|(k, v)| to_c(&format!("{k}={v}")))
        .collect();
    let (argv, env) = match (argv, env) {
        (Ok(a), Ok(e)) => (a, e),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    if let Err(e) = crate::sys::default_sigpipe() {
        return format!("restoring SIGPIPE: {e}");
    }
    let prog = &args[0];
    let candidates: Vec<String> = if prog.contains('/') {
        vec![prog.clone()]
    } else {
        let path = std::env::var("PATH").unwrap_or_else(|_| super::spec::DEFAULT_PATH.into());
        path.split(':')
            .filter(|d| !d.is_empty())
            .map(|d| format!("{d}/{prog}"))
            .collect()
    };
    let mut last = nix::errno::Errno::ENOENT;
    for candidate in candidates {
        let Ok(c) = to_c(&candidate) else { continue };
        let Err(errno) = nix::unistd::execve(&c, &argv, &env);
        // Keep looking along PATH only when this entry does not exist, as execvp does.
        last = errno;
        if !matches!(
            errno,
            nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR
        ) {
            break;
        }
    }
    match last {
        nix::errno::Errno::ENOENT if !prog.contains('/') => {
            "executable file not found in $PATH".to_string()
        }
        errno => errno.desc().to_lowercase(),
    }
}
