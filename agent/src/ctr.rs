//! `gantry-agent ctr …`: drives the node runtime directly, without a scheduler — create, start,
//! run, list, signal, stop, remove, logs and exec of containers from `ContainerSpec` JSON files,
//! like containerd's `ctr`. Every invocation re-adopts the containers under `--root`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use gantry_agent::logs::{LogReader, ReadOptions, Stream};
use gantry_agent::runtime::state::RuntimeKind;
use gantry_agent::runtime::{
    BuiltinRuntime, ContainerSpec, ContainerState, ExecSpec, Runtime, RuntimeConfig, builtin,
};
use std::io::Write;

/// Options of `gantry-agent ctr`.
#[derive(Parser, Debug)]
#[command(name = "gantry-agent ctr", about = "drive the node runtime directly")]
pub struct Ctr {
    /// State root of the runtime.
    #[arg(
        long,
        default_value = "/var/lib/gantry/runtime",
        env = "GANTRY_RUNTIME_ROOT"
    )]
    root: PathBuf,
    /// `builtin` (libcontainer in the shim) or the path of an OCI runtime binary (runc, crun).
    #[arg(long, default_value = "builtin")]
    runtime: String,
    /// Parent cgroup for containers (default: a `gantry` child of this process's cgroup).
    #[arg(long)]
    cgroup_parent: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create containers from spec files without starting them.
    Create { specs: Vec<PathBuf> },
    /// Start created containers.
    Start { ids: Vec<String> },
    /// Create and start containers; without --detach, stream their logs and wait for them all,
    /// exiting with the exit code of the first spec's container.
    Run {
        /// Return once started.
        #[arg(short, long)]
        detach: bool,
        specs: Vec<PathBuf>,
    },
    /// List containers.
    Ps,
    /// Send a signal.
    Kill {
        id: String,
        #[arg(short, long, default_value = "SIGTERM")]
        signal: String,
    },
    /// Stop: the signal, then SIGKILL after the grace period.
    Stop {
        id: String,
        #[arg(short, long, default_value = "SIGTERM")]
        signal: String,
        /// Grace period in seconds.
        #[arg(short, long, default_value_t = 10)]
        time: u64,
    },
    /// Wait for a container to exit and print its status.
    Wait { id: String },
    /// Remove stopped containers.
    Rm {
        /// Stop running ones first (SIGKILL).
        #[arg(short, long)]
        force: bool,
        ids: Vec<String>,
    },
    /// Print a container's logs.
    Logs {
        id: String,
        #[arg(short, long)]
        follow: bool,
        #[arg(long)]
        tail: Option<usize>,
        #[arg(short, long)]
        timestamps: bool,
    },
    /// Run a command in a running container.
    Exec {
        /// Keep stdin open and forward it.
        #[arg(short, long)]
        interactive: bool,
        id: String,
        #[arg(trailing_var_arg = true, required = true)]
        args: Vec<String>,
    },
    /// Print a container's resource usage.
    Stats { id: String },
}

/// Runs `gantry-agent ctr` with the arguments after `ctr`; returns the process exit code.
pub async fn main(ctr: Ctr) -> Result<i32> {
    let shim = std::env::current_exe().context("finding the agent binary")?;
    let mut config = RuntimeConfig::new(&ctr.root, &shim, ctr.cgroup_parent.as_deref())?;
    if ctr.runtime != "builtin" {
        config.runtime = RuntimeKind::Oci(ctr.runtime.clone().into());
    }
    builtin::become_subreaper().context("becoming a child subreaper")?;
    let rt = BuiltinRuntime::open(config).context("opening the runtime")?;
    match ctr.cmd {
        Cmd::Create { specs } => {
            for path in specs {
                let info = rt.create(read_spec(&path)?).await?;
                println!("{}", info.id);
            }
        }
        Cmd::Start { ids } => {
            for id in ids {
                rt.start(&id).await?;
            }
        }
        Cmd::Run { detach, specs } => {
            let mut ids = Vec::new();
            for path in &specs {
                let spec = read_spec(path)?;
                let id = spec.id.clone();
                rt.create(spec).await?;
                rt.start(&id).await?;
                ids.push(id);
            }
            if detach {
                for id in ids {
                    println!("{id}");
                }
                return Ok(0);
            }
            let mut tasks = Vec::new();
            for id in &ids {
                let info = rt.state(id).await?;
                let prefix = (ids.len() > 1).then(|| format!("{id} | "));
                tasks.push(tokio::spawn(stream_logs(info.log_dir, prefix)));
            }
            let mut first = 0;
            for (i, id) in ids.iter().enumerate() {
                let exit = rt.wait(id).await?;
                eprintln!(
                    "{id}: exited with code {} (oom: {})",
                    exit.code, exit.oom_killed
                );
                if i == 0 {
                    first = exit.code;
                }
            }
            // Give the log streams a moment to drain what the shims wrote last.
            tokio::time::sleep(Duration::from_millis(200)).await;
            for t in tasks {
                t.abort();
            }
            return Ok(first);
        }
        Cmd::Ps => {
            println!("{:<32} {:<10} {:<8} COMMAND", "ID", "STATE", "PID");
            for c in rt.list().await? {
                let (state, pid) = match &c.state {
                    ContainerState::Created { pid } => ("created".to_string(), *pid),
                    ContainerState::Running { pid, .. } => ("running".to_string(), *pid),
                    ContainerState::Stopped(e) => (format!("exited({})", e.code), 0),
                };
                println!(
                    "{:<32} {:<10} {:<8} {}",
                    c.id,
                    state,
                    pid,
                    c.spec.process.args.join(" ")
                );
            }
        }
        Cmd::Kill { id, signal } => rt.kill(&id, &signal).await?,
        Cmd::Stop { id, signal, time } => {
            let exit = rt.stop(&id, &signal, Duration::from_secs(time)).await?;
            println!("{}", serde_json::to_string(&exit)?);
        }
        Cmd::Wait { id } => {
            let exit = rt.wait(&id).await?;
            println!("{}", serde_json::to_string(&exit)?);
            return Ok(exit.code);
        }
        Cmd::Rm { force, ids } => {
            for id in ids {
                if force {
                    rt.stop(&id, "SIGKILL", Duration::ZERO).await?;
                }
                rt.delete(&id).await?;
            }
        }
        Cmd::Logs {
            id,
            follow,
            tail,
            timestamps,
        } => {
            let info = rt.state(&id).await?;
            let mut reader = LogReader::open(
                &info.log_dir,
                ReadOptions {
                    tail,
                    since: None,
                    follow,
                },
            )?;
            let mut out = std::io::stdout().lock();
            while let Some(entry) = reader.next().await {
                let entry = entry?;
                if timestamps {
                    write!(out, "{} ", humantime(entry.time))?;
                }
                out.write_all(&entry.content)?;
                if !entry.partial {
                    out.write_all(b"\n")?;
                }
                out.flush()?;
            }
        }
        Cmd::Exec {
            interactive,
            id,
            args,
        } => {
            let mut spec = ExecSpec::new(args);
            spec.stdin = interactive;
            return exec_attached(&rt, &id, spec).await;
        }
        Cmd::Stats { id } => {
            let stats = rt.stats(&id).await?;
            println!("{stats:#?}");
        }
    }
    Ok(0)
}

/// Runs an exec attached to this process's stdio, like `docker exec [-i]`. (A terminal, `-t`,
/// is offered by the runtime API but not wired to this debugging command yet.)
async fn exec_attached(rt: &BuiltinRuntime, id: &str, spec: ExecSpec) -> Result<i32> {
    let mut process = rt.spawn_exec(id, spec).await?;
    let stdin_task = process.take_stdin().map(|mut input| {
        tokio::spawn(async move {
            let mut local = tokio::io::stdin();
            let _ = tokio::io::copy(&mut local, &mut input).await;
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut input).await;
        })
    });
    let out = process.take_stdout().map(|mut o| {
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut o, &mut tokio::io::stdout()).await;
        })
    });
    let err = process.take_stderr().map(|mut e| {
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut e, &mut tokio::io::stderr()).await;
        })
    });
    let code = process.wait().await;
    for task in [out, err].into_iter().flatten() {
        let _ = task.await;
    }
    if let Some(t) = stdin_task {
        t.abort();
    }
    Ok(code?)
}

fn read_spec(path: &PathBuf) -> Result<ContainerSpec> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path:?}"))?;
    let spec = serde_json::from_str(&text).with_context(|| format!("parsing {path:?}"))?;
    Ok(spec)
}

async fn stream_logs(dir: PathBuf, prefix: Option<String>) -> Result<()> {
    let mut reader = LogReader::open(
        &dir,
        ReadOptions {
            tail: None,
            since: None,
            follow: true,
        },
    )?;
    while let Some(entry) = reader.next().await {
        let entry = entry?;
        let mut line = Vec::with_capacity(entry.content.len() + 40);
        if let Some(p) = &prefix {
            line.extend_from_slice(p.as_bytes());
        }
        line.extend_from_slice(&entry.content);
        if !entry.partial {
            line.push(b'\n');
        }
        match entry.stream {
            Stream::Stdout => std::io::stdout().write_all(&line)?,
            Stream::Stderr => std::io::stderr().write_all(&line)?,
        }
    }
    bail!("log stream of {dir:?} ended")
}

fn humantime(t: std::time::SystemTime) -> String {
    let dt = time::OffsetDateTime::from(t);
    dt.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
