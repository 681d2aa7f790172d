//! `gantry run IMAGE [-- CMD ARGS…]`: a workload made from flags, docker-style. With `-d` it is
//! a Service, created, and the command returns. Attached (without `-d`) it is a one-off Job
//! (one instance, restart never, no retry): the command waits for it to start, streams its
//! output (stdout to stdout, stderr to stderr), waits for it to end and exits with its exit
//! code; `--rm` deletes the workload afterwards, also after Ctrl-C. Attached runs take no
//! input (`-i`/`-t` are not offered; use `gantry exec` on a running instance).

use std::collections::BTreeMap;
use std::str::FromStr;

use anyhow::bail;
use clap::Args;
use gantry::client::Client;
use gantry::pb;
use gantry::quantity::{Bytes, Cpu};
use gantry::workload::{Kind, Network, Port, Protocol, RestartPolicy, Workload};
use tonic::Code;

use super::error::{self, UsageError};
use super::events::{Follow, Next};
use super::logs::{self, Show};
use super::{Ctx, print};

/// Exit code of an attached run interrupted with Ctrl-C (128 + SIGINT).
const EXIT_INTERRUPTED: i32 = 130;

/// `gantry run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Image reference (`busybox`, `registry.example:5000/team/web:1.2`).
    pub image: String,
    /// Command and arguments after `--`; they replace the image's CMD.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
    /// Workload name (default: from the image name).
    #[arg(long)]
    pub name: Option<String>,
    /// Environment variable `K=V` (`K` alone takes the value from this environment).
    /// Repeatable.
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Published port `HOST:CONTAINER[/tcp|udp]` (or `CONTAINER[/proto]`, not published).
    /// Repeatable.
    #[arg(short = 'p', long = "publish", value_name = "HOST:CONTAINER[/PROTO]")]
    pub ports: Vec<String>,
    /// CPU limit in cores (`0.5`, `500m`, `2`).
    #[arg(long)]
    pub cpu: Option<String>,
    /// Memory limit (`64Mi`, `1G`).
    #[arg(long)]
    pub memory: Option<String>,
    /// Limit on processes and threads.
    #[arg(long)]
    pub pids: Option<u32>,
    /// Restart policy: always, on-failure or never (`no` also works).
    #[arg(long, value_name = "POLICY")]
    pub restart: Option<String>,
    /// Instances to run.
    #[arg(long)]
    pub replicas: Option<u32>,
    /// Network: bridge (the node's bridge, the default), host (the node's own network) or
    /// none (loopback only).
    #[arg(long = "network", alias = "net", value_name = "MODE")]
    pub network: Option<String>,
    /// Label `K=V` of the workload and its instances. Repeatable.
    #[arg(short = 'l', long = "label", value_name = "K=V")]
    pub labels: Vec<String>,
    /// Create the workload (a Service) and return, instead of running attached.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Attached: delete the workload once it ended (also after Ctrl-C).
    #[arg(long, conflicts_with = "detach")]
    pub rm: bool,
}

/// A workload name from an image reference: its last path segment without tag or digest,
/// made a DNS label (`registry:5000/team/My_App:1.2` → `my-app`).
pub fn name_from_image(image: &str) -> Option<String> {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    let base = last.split(':').next().unwrap_or(last);
    let mut name: String = base
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() { c } else { '-' }
        })
        .collect();
    name.truncate(63);
    let name = name.trim_matches('-').to_string();
    (!name.is_empty()).then_some(name)
}

fn usage(message: String) -> anyhow::Error {
    UsageError(message).into()
}

/// A published port from `HOST:CONTAINER[/PROTO]` or `CONTAINER[/PROTO]`.
pub fn parse_port(text: &str) -> anyhow::Result<Port> {
    let bad = || {
        usage(format!(
            "-p {text}: expected HOST:CONTAINER[/tcp|udp] or CONTAINER[/tcp|udp], like 8080:80"
        ))
    };
    let (ports, protocol) = match text.split_once('/') {
        Some((ports, "tcp")) => (ports, Protocol::Tcp),
        Some((ports, "udp")) => (ports, Protocol::Udp),
        Some(_) => return Err(bad()),
        None => (text, Protocol::Tcp),
    };
    let number = |s: &str| s.parse::<u32>().map_err(|_| bad());
    let (host, container) = match ports.split_once(':') {
        Some((host, container)) => (Some(number(host)?), number(container)?),
        None => (None, number(ports)?),
    };
    Ok(Port {
        container,
        host,
        protocol,
    })
}

fn parse_pair(flag: &str, text: &str, from_env: bool) -> anyhow::Result<(String, String)> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        None if from_env && !text.is_empty() => match std::env::var(text) {
            Ok(v) => Ok((text.to_string(), v)),
            Err(_) => Err(usage(format!(
                "{flag} {text}: no value given and {text} is not set here; use {flag} {text}=VALUE"
            ))),
        },
        _ => Err(usage(format!("{flag} {text}: expected K=V"))),
    }
}

/// The Service the flags describe.
pub fn workload_from(args: &RunArgs) -> anyhow::Result<Workload> {
    let name = match &args.name {
        Some(name) => name.clone(),
        None => name_from_image(&args.image).ok_or_else(|| {
            usage(format!(
                "cannot make a workload name from the image `{}`; give one with --name",
                args.image
            ))
        })?,
    };
    // Every field at its default, as an empty workload file would have it.
    let mut w: Workload = serde_json::from_value(serde_json::json!({
        "kind": "Service",
        "name": name,
        "image": args.image,
    }))?;
    debug_assert_eq!(w.kind, Kind::Service);
    w.args = args.command.clone();
    w.replicas = args.replicas;
    w.env = args
        .env
        .iter()
        .map(|e| parse_pair("-e", e, true))
        .collect::<anyhow::Result<BTreeMap<_, _>>>()?;
    w.labels = args
        .labels
        .iter()
        .map(|l| parse_pair("-l", l, false))
        .collect::<anyhow::Result<BTreeMap<_, _>>>()?;
    w.ports = args
        .ports
        .iter()
        .map(|p| parse_port(p))
        .collect::<anyhow::Result<_>>()?;
    if let Some(cpu) = &args.cpu {
        w.resources.cpu = Some(Cpu::from_str(cpu).map_err(|e| usage(format!("--cpu {cpu}: {e}")))?);
    }
    if let Some(memory) = &args.memory {
        w.resources.memory =
            Some(Bytes::from_str(memory).map_err(|e| usage(format!("--memory {memory}: {e}")))?);
    }
    w.resources.pids = args.pids;
    if let Some(network) = &args.network {
        w.network = match network.as_str() {
            "bridge" | "default" => Network::Bridge,
            "host" => Network::Host,
            "none" => Network::None,
            other => {
                return Err(usage(format!(
                    "--network {other}: expected bridge, host or none"
                )));
            }
        };
    }
    if let Some(restart) = &args.restart {
        w.restart.policy = Some(match restart.as_str() {
            "always" | "unless-stopped" => RestartPolicy::Always,
            "on-failure" => RestartPolicy::OnFailure,
            "never" | "no" => RestartPolicy::Never,
            other => {
                return Err(usage(format!(
                    "--restart {other}: expected always, on-failure or never"
                )));
            }
        });
    }
    if let Err(errors) = w.validate() {
        let lines: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
        bail!(
            "the flags make an invalid workload; nothing was sent to the scheduler:\n  {}",
            lines.join("\n  ")
        );
    }
    Ok(w)
}

/// `gantry run`.
pub async fn run(ctx: &mut Ctx, args: RunArgs) -> anyhow::Result<()> {
    if !args.detach {
        return attached(ctx, args).await;
    }
    let workload = workload_from(&args)?;
    let name = workload.name.clone();
    let client = ctx.client().await?;
    create(&client, workload).await?;
    print(&format!("workload/{name} created\n"))
}

/// Creates `workload`, refusing to change an existing one; returns the store revision it was
/// written at.
async fn create(client: &Client, workload: Workload) -> anyhow::Result<i64> {
    let name = workload.name.clone();
    let request = pb::ApplyWorkloadRequest {
        spec: Some(pb::WorkloadSpec::from(workload)),
        dry_run: false,
        // Create only: `run` never changes an existing workload.
        expected_revision: Some(0),
    };
    match client.workloads().apply(client.request(request)).await {
        Ok(response) => Ok(response.into_inner().workload.map_or(0, |w| w.revision)),
        Err(status) if status.code() == Code::FailedPrecondition => bail!(
            "workload {name} already exists; choose another --name, change it with `gantry apply`, \
             or remove it with `gantry delete workload {name}`"
        ),
        Err(status) => Err(error::api(status, client.address())),
    }
}

/// The one-off Job of an attached run.
pub fn attached_workload(args: &RunArgs) -> anyhow::Result<Workload> {
    if args.replicas.is_some() {
        return Err(usage(
            "--replicas needs -d: an attached run has one instance".into(),
        ));
    }
    if let Some(restart) = args.restart.as_deref()
        && !matches!(restart, "never" | "no")
    {
        return Err(usage(format!(
            "--restart {restart} needs -d: an attached run is never restarted"
        )));
    }
    let mut w = workload_from(args)?;
    w.kind = Kind::Job;
    w.replicas = None;
    w.completions = Some(1);
    w.parallelism = Some(1);
    w.backoff_limit = Some(0);
    w.restart.policy = Some(RestartPolicy::Never);
    if let Err(errors) = w.validate() {
        let lines: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
        bail!(
            "the flags make an invalid workload; nothing was sent to the scheduler:\n  {}",
            lines.join("\n  ")
        );
    }
    Ok(w)
}

/// `gantry run` without `-d`: exits with the container's exit code.
async fn attached(ctx: &mut Ctx, args: RunArgs) -> anyhow::Result<()> {
    let workload = attached_workload(&args)?;
    let name = workload.name.clone();
    let client = ctx.client().await?;
    let revision = create(&client, workload).await?;
    let outcome = tokio::select! {
        outcome = follow(&client, &name, revision) => outcome,
        _ = tokio::signal::ctrl_c() => Ok(EXIT_INTERRUPTED),
    };
    if args.rm {
        let request = pb::DeleteWorkloadRequest {
            name: name.clone(),
            expected_revision: None,
        };
        if let Err(status) = client.workloads().delete(client.request(request)).await
            && status.code() != Code::NotFound
        {
            let err = error::api(status, client.address());
            eprintln!("error: removing workload {name}: {err:#}");
        }
    }
    let code = outcome?;
    std::process::exit(code);
}

/// Waits for the run's instance to start, streams its output until it stops, and returns its
/// exit code.
///
/// The instance is followed on the Events stream from the revision that created the workload,
/// so no change is missed and nothing is polled; its output is streamed as soon as it runs,
/// and the exit code is taken once the output has ended and the instance is seen to have
/// stopped (both are needed: the output may end before the status arrives, and the status may
/// arrive before the last output).
async fn follow(client: &Client, name: &str, from_revision: i64) -> anyhow::Result<i32> {
    let mut events = Follow::new(
        client.clone(),
        pb::WatchRequest {
            from_revision,
            kinds: vec![pb::ObjectKind::Instance as i32],
            workload: name.into(),
            node: String::new(),
            notices: false,
        },
    );
    let mut told_pending = false;
    let mut output: Option<tokio::task::JoinHandle<anyhow::Result<()>>> = None;
    let mut ended: Option<i32> = None;
    loop {
        if let Some(code) = ended {
            // The instance stopped: its output is all that is still awaited.
            if let Some(task) = output.take() {
                task.await??;
            }
            return Ok(code);
        }
        let next = events.next().await?;
        let Next::Event(event) = next else { continue };
        let Some(pb::event::Object::Instance(instance)) = event.object else {
            continue;
        };
        if event.r#type == pb::EventType::Deleted as i32 {
            bail!(
                "instance {} was deleted before it ended (was workload {name} deleted?)",
                instance.id
            );
        }
        let state = instance_state(&instance);
        match state {
            pb::InstanceState::Failed => bail!("{}", failed(&instance)),
            pb::InstanceState::Running
            | pb::InstanceState::Ready
            | pb::InstanceState::Exited
            | pb::InstanceState::OomKilled => {
                if output.is_none() {
                    let request = pb::LogsRequest {
                        instance_id: instance.id.clone(),
                        tail_lines: None,
                        follow: true,
                        since: None,
                        stream: pb::LogStream::Unspecified as i32,
                        previous: false,
                    };
                    let show = Show {
                        prefix: None,
                        timestamps: false,
                    };
                    output = Some(tokio::spawn(logs::stream(client.clone(), request, show)));
                }
                if matches!(
                    state,
                    pb::InstanceState::Exited | pb::InstanceState::OomKilled
                ) {
                    let code = instance.status.as_ref().and_then(|s| s.exit_code);
                    ended = Some(code.unwrap_or(i32::from(error::EXIT_ERROR)));
                }
            }
            _ => {
                if !told_pending && !instance.placement_failures.is_empty() {
                    told_pending = true;
                    eprintln!(
                        "waiting for a node for {}: {}",
                        instance.id,
                        instance.placement_failures.join("; ")
                    );
                }
            }
        }
    }
}

fn instance_state(instance: &pb::Instance) -> pb::InstanceState {
    instance
        .status
        .as_ref()
        .map_or(pb::InstanceState::Pending, |s| s.state())
}

fn failed(instance: &pb::Instance) -> String {
    let (reason, message) = instance
        .status
        .as_ref()
        .map(|s| (s.reason.as_str(), s.message.as_str()))
        .unwrap_or_default();
    format!(
        "instance {} could not run: {reason}: {message}; see `gantry describe instance {}`",
        instance.id, instance.id
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(line: &[&str]) -> RunArgs {
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            run: RunArgs,
        }
        let mut argv = vec!["run"];
        argv.extend(line);
        Wrap::try_parse_from(argv).unwrap().run
    }

    #[test]
    fn names_come_from_images() {
        assert_eq!(name_from_image("busybox").as_deref(), Some("busybox"));
        assert_eq!(
            name_from_image("registry:5000/team/My_App:1.2").as_deref(),
            Some("my-app")
        );
        assert_eq!(name_from_image("web@sha256:abc").as_deref(), Some("web"));
        assert_eq!(name_from_image("___"), None);
    }

    #[test]
    fn ports_read_like_docker() {
        let p = parse_port("8080:80/udp").unwrap();
        assert_eq!(
            (p.host, p.container, p.protocol),
            (Some(8080), 80, Protocol::Udp)
        );
        let p = parse_port("80").unwrap();
        assert_eq!((p.host, p.container, p.protocol), (None, 80, Protocol::Tcp));
        assert!(parse_port("80/sctp").is_err());
        assert!(parse_port("a:b").is_err());
    }

    #[test]
    fn flags_make_a_service() {
        let w = workload_from(&args(&[
            "--name",
            "web",
            "-e",
            "A=1",
            "-p",
            "8080:80",
            "--cpu",
            "500m",
            "--memory",
            "64Mi",
            "--pids",
            "100",
            "--restart",
            "on-failure",
            "--replicas",
            "2",
            "-d",
            "busybox",
            "--",
            "httpd",
            "-f",
        ]))
        .unwrap();
        assert_eq!(w.kind, Kind::Service);
        assert_eq!(w.name, "web");
        assert_eq!(w.image, "busybox");
        assert_eq!(w.args, ["httpd", "-f"]);
        assert_eq!(w.env.get("A").map(String::as_str), Some("1"));
        assert_eq!(w.ports[0].host, Some(8080));
        assert_eq!(
            w.resources.cpu.map(|c| c.to_string()).as_deref(),
            Some("500m")
        );
        assert_eq!(w.resources.pids, Some(100));
        assert_eq!(w.restart.policy, Some(RestartPolicy::OnFailure));
        assert_eq!(w.replicas, Some(2));
        assert_eq!(w.network, Network::Bridge);
        let host = workload_from(&args(&["--network", "host", "busybox"])).unwrap();
        assert_eq!(host.network, Network::Host);
        let err =
            workload_from(&args(&["--network", "none", "-p", "8080:80", "busybox"])).unwrap_err();
        assert!(err.to_string().contains("network none"), "{err}");
    }

    #[test]
    fn attached_runs_are_one_off_jobs() {
        let w = attached_workload(&args(&["--rm", "busybox", "--", "sh", "-c", "exit 3"])).unwrap();
        assert_eq!(w.kind, Kind::Job);
        assert_eq!(
            (w.completions, w.parallelism, w.backoff_limit),
            (Some(1), Some(1), Some(0))
        );
        assert_eq!(w.restart.policy, Some(RestartPolicy::Never));
        assert_eq!(w.args, ["sh", "-c", "exit 3"]);
        for flags in [&["--replicas", "2"][..], &["--restart", "on-failure"]] {
            let mut line = flags.to_vec();
            line.push("busybox");
            let err = attached_workload(&args(&line)).unwrap_err();
            assert_eq!(error::exit_code(&err), error::EXIT_USAGE, "{err}");
            assert!(err.to_string().contains("needs -d"), "{err}");
        }
        assert!(attached_workload(&args(&["--restart", "never", "busybox"])).is_ok());
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        let err = workload_from(&args(&["--memory", "lots", "busybox"])).unwrap_err();
        assert_eq!(error::exit_code(&err), error::EXIT_USAGE);
        assert!(err.to_string().contains("--memory lots"), "{err}");
        let err = workload_from(&args(&["--name", "Bad_Name", "busybox"])).unwrap_err();
        assert!(err.to_string().contains("name:"), "{err}");
        let err = workload_from(&args(&["--network", "overlay", "busybox"])).unwrap_err();
        assert_eq!(error::exit_code(&err), error::EXIT_USAGE);
        assert!(err.to_string().contains("--network overlay"), "{err}");
    }
}
