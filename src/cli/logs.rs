//! `gantry logs NAME|INSTANCE`: an instance's output, relayed by the scheduler from its node.
//! A workload name picks its placed instances; with several, each line is prefixed with its
//! instance id (`[web-1a2b00001] …`), as kubectl prefixes pod names.

use std::io::Write;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use clap::Args;
use gantry::client::Client;
use gantry::pb;
use tonic::Code;

use super::output::rfc3339;
use super::{Ctx, error};

/// `gantry logs`.
#[derive(Args, Debug)]
pub struct LogsArgs {
    /// Instance id, or workload name (all its placed instances).
    pub target: String,
    /// Keep streaming new output until the container stops (or Ctrl-C).
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only the last N lines of each instance.
    #[arg(long, value_name = "N")]
    pub tail: Option<u32>,
    /// Only output written within this long (`10m`, `1h30m`, `45` seconds) or since this time
    /// (RFC 3339: `2026-11-28T17:00:00Z`).
    #[arg(long, value_name = "DURATION|TIME", value_parser = parse_since)]
    pub since: Option<Since>,
    /// Prefix each line with the time it was written (RFC 3339, UTC; lines written within a
    /// millisecond of each other share the first one's time).
    #[arg(long)]
    pub timestamps: bool,
    /// Output of the run before the last restart.
    #[arg(long)]
    pub previous: bool,
}

/// `gantry logs`.
pub async fn logs(ctx: &mut Ctx, args: LogsArgs) -> anyhow::Result<()> {
    let client = ctx.client().await?;
    let ids = match lookup(&client, &args.target).await? {
        Target::Instance(id) => vec![id],
        Target::Workload(instances) => instances.into_iter().map(|i| i.id).collect(),
    };
    let prefix = ids.len() > 1;
    let since = args.since.map(|since| match since {
        Since::Ago(d) => SystemTime::now()
            .checked_sub(d)
            .unwrap_or(SystemTime::UNIX_EPOCH)
            .into(),
        Since::At(time) => time,
    });
    let mut streams = tokio::task::JoinSet::new();
    for id in ids {
        let request = pb::LogsRequest {
            instance_id: id.clone(),
            tail_lines: args.tail,
            follow: args.follow,
            since,
            stream: pb::LogStream::Unspecified as i32,
            previous: args.previous,
        };
        let show = Show {
            prefix: prefix.then(|| format!("[{id}] ")),
            timestamps: args.timestamps,
        };
        streams.spawn(stream(client.clone(), request, show));
    }
    while let Some(done) = streams.join_next().await {
        done.context("a log stream failed")??;
    }
    Ok(())
}

/// `--since`: a duration back from now, or a point in time.
#[derive(Debug, Clone, PartialEq)]
pub enum Since {
    /// This long ago.
    Ago(Duration),
    /// This time.
    At(prost_types::Timestamp),
}

fn parse_since(text: &str) -> Result<Since, String> {
    if let Ok(duration) = super::parse_duration(text) {
        return Ok(Since::Ago(duration));
    }
    text.parse::<prost_types::Timestamp>()
        .map(Since::At)
        .map_err(|_| {
            format!(
                "{text:?} is neither a duration (10m, 1h30m, 45 seconds) nor an RFC 3339 time \
                 (2026-11-28T17:00:00Z)"
            )
        })
}

/// What a `NAME|INSTANCE` argument names.
pub enum Target {
    /// An instance, by id.
    Instance(String),
    /// A workload, with its instances that are on a node.
    Workload(Vec<pb::Instance>),
}

/// What `target` names: the instance with that id, or the placed instances of the workload of
/// that name (an error when it has none).
pub async fn lookup(client: &Client, target: &str) -> anyhow::Result<Target> {
    let instance = client
        .instances()
        .get(client.request(pb::GetInstanceRequest { id: target.into() }))
        .await;
    match instance {
        Ok(instance) => return Ok(Target::Instance(instance.into_inner().id)),
        Err(status) if status.code() == Code::NotFound => {}
        Err(status) => return Err(error::api(status, client.address())),
    }
    let workload = client
        .workloads()
        .get(client.request(pb::GetWorkloadRequest {
            name: target.into(),
        }))
        .await;
    match workload {
        Ok(_) => {}
        Err(status) if status.code() == Code::NotFound => bail!(
            "workload {target} not found, nor an instance with that id; see `gantry get workloads` \
             and `gantry get instances`"
        ),
        Err(status) => return Err(error::api(status, client.address())),
    }
    let list = client
        .instances()
        .list(client.request(pb::ListInstancesRequest {
            workload: target.into(),
            ..Default::default()
        }))
        .await
        .map_err(|status| error::api(status, client.address()))?
        .into_inner();
    let placed: Vec<pb::Instance> = list
        .instances
        .into_iter()
        .filter(|i| !i.node.is_empty())
        .collect();
    if placed.is_empty() {
        bail!(
            "workload {target} has no instance on a node yet; see `gantry get instances --workload {target}`"
        );
    }
    Ok(Target::Workload(placed))
}

/// How lines are shown.
#[derive(Debug, Clone)]
pub struct Show {
    /// Put before every line.
    pub prefix: Option<String>,
    /// Put the time before every line.
    pub timestamps: bool,
}

impl Show {
    /// Writes one chunk to stdout or stderr, per its stream.
    pub fn write(&self, chunk: &pb::LogChunk) -> anyhow::Result<()> {
        let text = self.format(chunk);
        let result = if chunk.stream == pb::LogStream::Stderr as i32 {
            let mut err = std::io::stderr().lock();
            err.write_all(&text).and_then(|()| err.flush())
        } else {
            let mut out = std::io::stdout().lock();
            out.write_all(&text).and_then(|()| out.flush())
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                std::process::exit(i32::from(error::EXIT_OK))
            }
            Err(e) => Err(e).context("writing the logs"),
        }
    }

    fn format(&self, chunk: &pb::LogChunk) -> Vec<u8> {
        if self.prefix.is_none() && !self.timestamps {
            return chunk.data.clone();
        }
        let mut head = String::new();
        if self.timestamps {
            let ts = chunk.time.unwrap_or_default();
            let whole = rfc3339(&ts);
            let base = whole.strip_suffix('Z').unwrap_or(&whole);
            head.push_str(&format!("{base}.{:09}Z ", ts.nanos.max(0)));
        }
        if let Some(prefix) = &self.prefix {
            head.push_str(prefix);
        }
        let mut text = Vec::with_capacity(chunk.data.len() + head.len() * 4);
        for line in chunk.data.split_inclusive(|b| *b == b'\n') {
            text.extend_from_slice(head.as_bytes());
            text.extend_from_slice(line);
        }
        text
    }
}

/// Streams one instance's logs to stdout/stderr until the scheduler ends the stream.
pub async fn stream(client: Client, request: pb::LogsRequest, show: Show) -> anyhow::Result<()> {
    // No deadline: a followed stream lasts as long as the container.
    let response = client
        .instances()
        .logs(tonic::Request::new(request))
        .await
        .map_err(|status| error::api(status, client.address()))?;
    let mut chunks = response.into_inner();
    while let Some(chunk) = chunks
        .message()
        .await
        .map_err(|status| error::api(status, client.address()))?
    {
        show.write(&chunk)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(data: &str) -> pb::LogChunk {
        pb::LogChunk {
            stream: pb::LogStream::Stdout as i32,
            data: data.as_bytes().to_vec(),
            time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            }),
        }
    }

    #[test]
    fn since_is_a_duration_or_a_time() {
        assert_eq!(parse_since("10m"), Ok(Since::Ago(Duration::from_secs(600))));
        assert_eq!(parse_since("45"), Ok(Since::Ago(Duration::from_secs(45))));
        assert_eq!(
            parse_since("2026-11-28T17:00:00Z"),
            Ok(Since::At(prost_types::Timestamp {
                seconds: 1_795_885_200,
                nanos: 0,
            }))
        );
        let err = parse_since("yesterday").unwrap_err();
        assert!(
            err.contains("RFC 3339") && err.contains("yesterday"),
            "{err}"
        );
    }

    #[test]
    fn lines_get_their_prefix_and_time() {
        let plain = Show {
            prefix: None,
            timestamps: false,
        };
        assert_eq!(plain.format(&chunk("a\nb\n")), b"a\nb\n");
        let both = Show {
            prefix: Some("[web-1] ".into()),
            timestamps: true,
        };
        assert_eq!(
            String::from_utf8(both.format(&chunk("a\nb"))).unwrap(),
            "2023-11-14T22:13:20.000000005Z [web-1] a\n2023-11-14T22:13:20.000000005Z [web-1] b"
        );
    }
}
