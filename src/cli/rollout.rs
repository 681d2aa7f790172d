//! `gantry scale NAME N` and `gantry rollout status|history|undo NAME`.
//!
//! `rollout status` follows the workload's generation at the time it starts: it succeeds when
//! the controllers report that generation rolled out (it became the last good generation; for a
//! Job, Complete), and fails when its rollout failed (`Progressing` False), when the scheduler
//! rolled it back on its own (a newer generation whose cause is `auto-rollback …`; also when
//! the current generation already is such a rollback), or when the workload is deleted. A newer
//! generation applied by someone else is followed in its place.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Args, Subcommand};
use gantry::client::Client;
use gantry::pb;
use indicatif::{ProgressBar, ProgressStyle};

use super::error;
use super::events::{Follow, Next};
use super::output::{self, Format, OutputArgs, Table};
use super::view::RevisionDoc;
use super::{Ctx, print};

/// `gantry scale`.
#[derive(Args, Debug)]
pub struct ScaleArgs {
    /// The Service (`web` or `workload/web`).
    pub name: String,
    /// The new replica count.
    pub replicas: u32,
}

/// `gantry rollout …`.
#[derive(Subcommand, Debug)]
pub enum RolloutCommand {
    /// Wait until the current rollout of a workload ends; exit 1 if it fails or is rolled back.
    Status {
        /// The workload.
        name: String,
    },
    /// List the kept revisions of a workload's spec.
    History {
        /// The workload.
        name: String,
        /// Output format.
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Roll a workload back to an earlier revision (default: the one before the current).
    Undo {
        /// The workload.
        name: String,
        /// The generation to go back to (see `gantry rollout history`).
        #[arg(long, value_name = "GENERATION")]
        to_revision: Option<u64>,
    },
}

/// `web` from `web` or `workload/web`.
pub fn workload_name(arg: &str) -> String {
    match arg.split_once('/') {
        Some((kind, name)) if super::apply::is_workload_word(kind) => name.to_string(),
        _ => arg.to_string(),
    }
}

/// `gantry scale`.
pub async fn scale(ctx: &mut Ctx, args: ScaleArgs) -> anyhow::Result<()> {
    let name = workload_name(&args.name);
    let client = ctx.client().await?;
    let request = pb::ScaleWorkloadRequest {
        name: name.clone(),
        replicas: args.replicas,
        expected_revision: None,
    };
    client
        .workloads()
        .scale(client.request(request))
        .await
        .map_err(|s| error::api(s, client.address()))?;
    print(&format!("workload/{name} scaled to {}\n", args.replicas))
}

/// `gantry rollout …`.
pub async fn rollout(ctx: &mut Ctx, command: RolloutCommand) -> anyhow::Result<()> {
    match command {
        RolloutCommand::Status { name } => status(ctx, &workload_name(&name)).await,
        RolloutCommand::History { name, output } => {
            history(ctx, &workload_name(&name), output.output).await
        }
        RolloutCommand::Undo { name, to_revision } => {
            undo(ctx, &workload_name(&name), to_revision).await
        }
    }
}

async fn get_workload(client: &Client, name: &str) -> anyhow::Result<pb::Workload> {
    Ok(client
        .workloads()
        .get(client.request(pb::GetWorkloadRequest { name: name.into() }))
        .await
        .map_err(|s| error::api(s, client.address()))?
        .into_inner())
}

async fn kept_revisions(client: &Client, name: &str) -> anyhow::Result<Vec<pb::WorkloadRevision>> {
    Ok(client
        .workloads()
        .history(client.request(pb::WorkloadHistoryRequest { name: name.into() }))
        .await
        .map_err(|s| error::api(s, client.address()))?
        .into_inner()
        .revisions)
}

/// Where a rollout stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It finished; the message says how it ended.
    Done(String),
    /// It failed.
    Failed(String),
    /// It goes on; the message says how far it is.
    Waiting(String),
}

/// Where the rollout of generation `target` of `w` stands, from the workload's status alone.
pub fn verdict(w: &pb::Workload, target: u64) -> Verdict {
    let Some(status) = &w.status else {
        return Verdict::Waiting("waiting for the scheduler to act on it".into());
    };
    let condition = |kind: &str| status.conditions.iter().find(|c| c.r#type == kind);
    let holds =
        |kind: &str| condition(kind).is_some_and(|c| c.status == pb::ConditionStatus::True as i32);
    let counts = status.instances.unwrap_or_default();
    let kind = w.spec.as_ref().map_or(0, |s| s.kind);
    if status.observed_generation < target {
        return Verdict::Waiting(format!(
            "waiting for the scheduler to act on generation {target}"
        ));
    }
    if kind == pb::WorkloadKind::Job as i32 {
        if let Some(c) = condition("Failed").filter(|_| holds("Failed")) {
            return Verdict::Failed(format!("job failed: {} ({})", c.message, c.reason));
        }
        if holds("Complete") {
            return Verdict::Done(format!("job complete: {} succeeded", counts.succeeded));
        }
        return Verdict::Waiting(format!(
            "{} succeeded, {} running",
            counts.succeeded, counts.current
        ));
    }
    if let Some(p) = condition("Progressing")
        && p.status == pb::ConditionStatus::False as i32
    {
        return Verdict::Failed(format!(
            "rollout of generation {target} failed: {} ({})",
            p.message, p.reason
        ));
    }
    if status.last_good_generation == target {
        return Verdict::Done(format!(
            "generation {target} rolled out: {} of {} instances ready",
            counts.ready, counts.desired
        ));
    }
    Verdict::Waiting(format!(
        "{} of {} instances updated, {} ready",
        counts.updated, counts.desired, counts.ready
    ))
}

/// Shows progress: a spinner on a terminal, otherwise one line per change.
struct Progress {
    bar: Option<ProgressBar>,
    last: String,
}

impl Progress {
    fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
                bar.set_style(style);
            }
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Progress {
            bar,
            last: String::new(),
        }
    }

    fn show(&mut self, name: &str, message: &str) -> anyhow::Result<()> {
        if message == self.last {
            return Ok(());
        }
        self.last = message.to_string();
        match &self.bar {
            Some(bar) => {
                bar.set_message(format!("waiting for the rollout of {name}: {message}"));
                Ok(())
            }
            None => print(&format!("waiting for the rollout of {name}: {message}\n")),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The failure of a rollout rolled back by the scheduler, if `generation` is such a rollback.
fn auto_rollback(revisions: &[pb::WorkloadRevision], generation: u64) -> Option<String> {
    revisions
        .iter()
        .find(|r| r.generation == generation && r.cause.starts_with("auto-rollback"))
        .map(|r| r.cause.clone())
}

async fn status(ctx: &mut Ctx, name: &str) -> anyhow::Result<()> {
    let client = ctx.client().await?;
    let wait = ctx.timeout_flag;
    let started = Instant::now();
    let deadline = wait.map(|t| tokio::time::Instant::now() + t);
    let mut w = get_workload(&client, name).await?;
    let mut target = w.generation;
    if let Some(cause) = auto_rollback(&kept_revisions(&client, name).await?, target) {
        bail!("rollout of workload {name} failed and was rolled back ({cause})");
    }
    let mut progress = Progress::new();
    let watch = |from_revision| pb::WatchRequest {
        from_revision,
        kinds: vec![pb::ObjectKind::Workload as i32],
        workload: name.to_string(),
        node: String::new(),
        notices: false,
    };
    let mut follow = Follow::new(client.clone(), watch(w.revision + 1));
    let result = loop {
        if w.generation > target {
            let revisions = kept_revisions(&client, name).await?;
            if let Some(cause) = auto_rollback(&revisions, w.generation) {
                break Err(anyhow::anyhow!(
                    "rollout of workload {name} failed and was rolled back ({cause})"
                ));
            }
            progress.show(
                name,
                &format!(
                    "generation {target} was replaced by generation {}",
                    w.generation
                ),
            )?;
            target = w.generation;
        }
        match verdict(&w, target) {
            Verdict::Done(message) => break Ok(message),
            Verdict::Failed(message) => break Err(anyhow::anyhow!("workload {name}: {message}")),
            Verdict::Waiting(message) => progress.show(name, &message)?,
        }
        let next = match deadline {
            Some(at) => match tokio::time::timeout_at(at, follow.next()).await {
                Ok(next) => next?,
                Err(_) => {
                    break Err(anyhow::anyhow!(
                        "timed out after {} waiting for the rollout of workload {name} ({}); it goes on: see `gantry describe workload {name}`",
                        output::short_duration(started.elapsed()),
                        progress.last
                    ));
                }
            },
            None => follow.next().await?,
        };
        match next {
            Next::Event(e) if e.r#type == pb::EventType::Deleted as i32 => {
                break Err(anyhow::anyhow!(
                    "workload {name} was deleted during the rollout"
                ));
            }
            Next::Event(e) => {
                if let Some(pb::event::Object::Workload(new)) = e.object {
                    w = new;
                }
            }
            Next::Compacted { .. } => {
                w = get_workload(&client, name).await?;
                follow = Follow::new(client.clone(), watch(w.revision + 1));
            }
        }
    };
    progress.finish();
    let message = result?;
    print(&format!("workload/{name}: {message}\n"))
}

async fn history(ctx: &mut Ctx, name: &str, format: Format) -> anyhow::Result<()> {
    let client = ctx.client().await?;
    let revisions = kept_revisions(&client, name).await?;
    if format.is_table() {
        let wide = format == Format::Wide;
        let mut header = vec!["GENERATION", "CAUSE", "AGE"];
        if wide {
            header.push("IMAGE");
        }
        let mut table = Table::new(&header, ctx.color);
        let now = std::time::SystemTime::now();
        for r in &revisions {
            let mut row = vec![
                r.generation.to_string(),
                r.cause.clone(),
                output::age(r.created_at.as_ref(), now),
            ];
            if wide {
                row.push(r.spec.as_ref().map(|s| s.image.clone()).unwrap_or_default());
            }
            table.row(row);
        }
        return print(&table.render());
    }
    let items = revisions
        .iter()
        .map(|r| RevisionDoc::new(r, name))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let doc = serde_json::json!({
        "kind": "RevisionList",
        "workload": name,
        "items": items,
    });
    if let Some(text) = output::machine(format, &doc)? {
        print(&text)?;
    }
    Ok(())
}

async fn undo(ctx: &mut Ctx, name: &str, to: Option<u64>) -> anyhow::Result<()> {
    let client = ctx.client().await?;
    let request = pb::RollbackWorkloadRequest {
        name: name.to_string(),
        to_generation: to,
    };
    let w = client
        .workloads()
        .rollback(client.request(request))
        .await
        .map_err(|s| error::api(s, client.address()))?
        .into_inner();
    let target = match to {
        Some(g) => format!("generation {g}"),
        None => "the previous generation".to_string(),
    };
    let image = w.spec.as_ref().map(|s| s.image.clone()).unwrap_or_default();
    print(&format!(
        "workload/{name} rolled back to {target}: now generation {} ({image}); follow it with `gantry rollout status {name}`\n",
        w.generation
    ))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(observed: u64, last_good: u64, progressing: Option<(bool, &str)>) -> pb::Workload {
        pb::Workload {
            spec: Some(pb::WorkloadSpec {
                kind: pb::WorkloadKind::Service as i32,
                name: "web".into(),
                ..Default::default()
            }),
            generation: 2,
            status: Some(pb::WorkloadStatus {
                observed_generation: observed,
                last_good_generation: last_good,
                conditions: progressing
                    .map(|(holds, reason)| pb::Condition {
                        r#type: "Progressing".into(),
                        status: if holds {
                            pb::ConditionStatus::True
                        } else {
                            pb::ConditionStatus::False
                        } as i32,
                        reason: reason.into(),
                        message: "m".into(),
                        ..Default::default()
                    })
                    .into_iter()
                    .collect(),
                instances: Some(pb::InstanceCounts {
                    desired: 3,
                    ready: 3,
                    updated: 3,
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn rollouts_end_when_their_generation_is_the_last_good_one() {
        assert!(matches!(
            verdict(&workload(1, 1, None), 2),
            Verdict::Waiting(_)
        ));
        assert!(matches!(
            verdict(&workload(2, 1, Some((true, "Rolling"))), 2),
            Verdict::Waiting(_)
        ));
        assert!(matches!(
            verdict(&workload(2, 2, Some((true, "RolloutComplete"))), 2),
            Verdict::Done(_)
        ));
        let failed = verdict(
            &workload(2, 1, Some((false, "ProgressDeadlineExceeded"))),
            2,
        );
        assert!(
            matches!(&failed, Verdict::Failed(m) if m.contains("ProgressDeadlineExceeded")),
            "{failed:?}"
        );
    }

    #[test]
    fn only_auto_rollbacks_count_as_failed_rollouts() {
        let revision = |generation, cause: &str| pb::WorkloadRevision {
            generation,
            cause: cause.into(),
            ..Default::default()
        };
        let kept = vec![
            revision(3, "auto-rollback to 1: instance crashed"),
            revision(2, "apply"),
        ];
        assert!(auto_rollback(&kept, 3).is_some());
        assert!(auto_rollback(&kept, 2).is_none());
        assert_eq!(workload_name("workload/web"), "web");
        assert_eq!(workload_name("web"), "web");
    }
}
