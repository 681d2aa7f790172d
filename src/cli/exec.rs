//! `gantry exec [-i] [-t] INSTANCE -- CMD ARGS…`: a command in a running instance, relayed by
//! the scheduler to its node, like `docker exec`. With `-t` on a terminal the local terminal
//! goes to raw mode (restored on exit) and window size changes follow (SIGWINCH). The exit code
//! of `gantry exec` is the command's.

use std::io::{IsTerminal, Write};

use anyhow::{Context, bail};
use clap::Args;
use gantry::client::Client;
use gantry::pb;
use pb::exec_input::Input;
use pb::exec_output::Output;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::Ctx;
use super::error::{self, UsageError};

/// `gantry exec`.
#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Keep stdin open and send it to the command.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Give the command a terminal (its output is then one stream).
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Environment variable `K=V` for the command. Repeatable.
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Working directory in the container.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// User (`uid[:gid]` or name) to run as.
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Instance id (see `gantry get instances`), or workload name: one of its running
    /// instances, Ready ones first (as `kubectl exec deploy/NAME`).
    pub instance: String,
    /// Command and arguments, after `--`.
    #[arg(last = true, value_name = "CMD", required = true)]
    pub command: Vec<String>,
}

/// `gantry exec`: runs the command and exits with its exit code.
pub async fn exec(ctx: &mut Ctx, args: ExecArgs) -> anyhow::Result<()> {
    if args.command.first().is_none_or(String::is_empty) {
        return Err(UsageError("give the command to run after `--`".into()).into());
    }
    let mut env = std::collections::HashMap::new();
    for pair in &args.env {
        match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                env.insert(k.to_owned(), v.to_owned());
            }
            _ => return Err(UsageError(format!("-e {pair}: expected K=V")).into()),
        }
    }
    let client = ctx.client().await?;
    let instance_id = running_instance(&client, &args.instance).await?;
    let start = pb::ExecStart {
        instance_id,
        command: args.command.clone(),
        tty: args.tty,
        stdin: args.interactive,
        env,
        working_dir: args.workdir.clone().unwrap_or_default(),
        user: args.user.clone().unwrap_or_default(),
        size: if args.tty { terminal_size() } else { None },
    };
    let code = attach(&client, start).await?;
    std::process::exit(code);
}

/// The instance `target` names: itself, or a running instance of the workload of that name
/// (Ready first, then the oldest id).
async fn running_instance(client: &Client, target: &str) -> anyhow::Result<String> {
    let instances = match super::logs::lookup(client, target).await? {
        super::logs::Target::Instance(id) => return Ok(id),
        super::logs::Target::Workload(instances) => instances,
    };
    pick_running(&instances).ok_or_else(|| {
        anyhow::anyhow!(
            "workload {target} has no running instance to exec in; see `gantry get instances \
             --workload {target}`"
        )
    })
}

/// A running instance of `instances`: Ready ones first, then by id.
fn pick_running(instances: &[pb::Instance]) -> Option<String> {
    let state = |i: &pb::Instance| i.status.as_ref().map_or(0, |s| s.state);
    let ready = pb::InstanceState::Ready as i32;
    let running = pb::InstanceState::Running as i32;
    instances
        .iter()
        .filter(|i| !i.node.is_empty() && (state(i) == ready || state(i) == running))
        .min_by_key(|i| (state(i) != ready, i.id.clone()))
        .map(|i| i.id.clone())
}

/// Runs `start` attached to this process's stdio and returns the command's exit code.
pub async fn attach(client: &Client, start: pb::ExecStart) -> anyhow::Result<i32> {
    let interactive = start.stdin;
    let tty = start.tty;
    let (tx, rx) = mpsc::channel(16);
    tx.send(pb::ExecInput {
        input: Some(Input::Start(start)),
    })
    .await
    .context("queueing the exec start")?;
    // Raw mode only when the user types into a terminal; restored when this is dropped.
    let raw = if tty && interactive && std::io::stdin().is_terminal() {
        Some(RawMode::enter()?)
    } else {
        None
    };
    if interactive {
        tokio::spawn(forward_stdin(tx.clone()));
    }
    if tty {
        tokio::spawn(forward_resizes(tx.clone()));
    }
    drop(tx);
    let response = client
        .instances()
        .exec(tonic::Request::new(ReceiverStream::new(rx)))
        .await
        .map_err(|status| error::api(status, client.address()))?;
    let mut outputs = response.into_inner();
    let mut exit_code = None;
    loop {
        let message = match outputs.message().await {
            Ok(Some(message)) => message,
            Ok(None) => break,
            Err(status) => {
                drop(raw);
                return Err(error::api(status, client.address()));
            }
        };
        match message.output {
            Some(Output::Stdout(data)) => write(&mut std::io::stdout().lock(), &data)?,
            Some(Output::Stderr(data)) => write(&mut std::io::stderr().lock(), &data)?,
            Some(Output::ExitCode(code)) => exit_code = Some(code),
            None => {}
        }
    }
    drop(raw);
    match exit_code {
        Some(code) => Ok(code),
        None => bail!("the command's stream ended without an exit code; see the agent's log"),
    }
}

fn write(out: &mut impl Write, data: &[u8]) -> anyhow::Result<()> {
    match out.write_all(data).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(e).context("writing the command's output"),
    }
}

/// Sends stdin as it is read, then `close_stdin` at its end.
async fn forward_stdin(tx: mpsc::Sender<pb::ExecInput>) {
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0; 32 * 1024];
    loop {
        let input = match stdin.read(&mut buf).await {
            Ok(0) | Err(_) => Input::CloseStdin(true),
            Ok(n) => Input::Stdin(buf[..n].to_vec()),
        };
        let last = matches!(input, Input::CloseStdin(_));
        if tx.send(pb::ExecInput { input: Some(input) }).await.is_err() || last {
            return;
        }
    }
}

/// Sends the terminal's size whenever it changes.
async fn forward_resizes(tx: mpsc::Sender<pb::ExecInput>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut changes) = signal(SignalKind::window_change()) else {
        return;
    };
    while changes.recv().await.is_some() {
        let Some(size) = terminal_size() else {
            continue;
        };
        let input = pb::ExecInput {
            input: Some(Input::Resize(size)),
        };
        if tx.send(input).await.is_err() {
            return;
        }
    }
}

/// The size of the terminal on stdout (or stdin), if either is one.
fn terminal_size() -> Option<pb::TerminalSize> {
    let size = rustix::termios::tcgetwinsize(std::io::stdout())
        .or_else(|_| rustix::termios::tcgetwinsize(std::io::stdin()))
        .ok()?;
    (size.ws_row > 0 && size.ws_col > 0).then_some(pb::TerminalSize {
        cols: u32::from(size.ws_col),
        rows: u32::from(size.ws_row),
    })
}

/// The local terminal in raw mode until dropped.
struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    fn enter() -> anyhow::Result<RawMode> {
        use rustix::termios::{OptionalActions, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).context("reading the terminal's settings")?;
        let mut raw = saved.clone();
        raw.make_raw();
        tcsetattr(&stdin, OptionalActions::Now, &raw).context("setting raw terminal mode")?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        use rustix::termios::{OptionalActions, tcsetattr};
        let _ = tcsetattr(std::io::stdin(), OptionalActions::Now, &self.saved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str, node: &str, state: pb::InstanceState) -> pb::Instance {
        pb::Instance {
            id: id.into(),
            node: node.into(),
            status: Some(pb::InstanceStatus {
                state: state as i32,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn exec_by_workload_picks_a_ready_instance_first() {
        use pb::InstanceState::*;
        let list = [
            instance("web-3", "n1", Running),
            instance("web-2", "n1", Ready),
            instance("web-1", "", Pending),
            instance("web-0", "n2", Exited),
        ];
        assert_eq!(pick_running(&list).as_deref(), Some("web-2"));
        assert_eq!(pick_running(&list[..1]).as_deref(), Some("web-3"));
        assert_eq!(pick_running(&list[2..]), None);
    }
}
