//! What the agent reports about one instance: its state machine, the status record it keeps
//! on disk (so a restarted agent reports the same restart counts and readiness), and the
//! conversion to the wire type.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use gantry::pb;
use serde::{Deserialize, Serialize};

/// Where an instance is in its life on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    /// Assigned, nothing done yet.
    Pending,
    /// Pulling its image.
    Pulling,
    /// Creating and starting its container.
    Starting,
    /// Its process runs; not (yet) ready.
    Running,
    /// Its process runs and it is ready.
    Ready,
    /// Its process ended.
    Exited,
    /// Its process was killed for exceeding its memory limit.
    OomKilled,
    /// It could not run (image, spec or runtime error).
    Failed,
}

/// What happens to an instance, as the worker sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The image is being pulled.
    Pull,
    /// The container is being created and started.
    Start,
    /// The process started.
    Started,
    /// Readiness passed (or there is no readiness probe).
    Ready,
    /// Readiness failed.
    Unready,
    /// The process ended with `code`, killed by the OOM killer or not.
    Exit {
        /// Exit code.
        code: i32,
        /// Whether the OOM killer ended it.
        oom: bool,
    },
    /// Something prevented the run.
    Fail,
}

/// The state after `event` in `state`. Every edge of the instance state machine is here.
pub fn transition(state: State, event: &Event) -> State {
    use State::*;
    match (state, event) {
        // Pending|Exited|OomKilled|Failed --pull--> Pulling (a restart may pull again)
        (_, Event::Pull) => Pulling,
        // * --start--> Starting
        (_, Event::Start) => Starting,
        // Starting --started--> Running
        (_, Event::Started) => Running,
        // Running|Ready --ready--> Ready; a container that is not running cannot be ready
        (Running | Ready, Event::Ready) => Ready,
        (other, Event::Ready) => other,
        // Ready --unready--> Running
        (Ready | Running, Event::Unready) => Running,
        (other, Event::Unready) => other,
        // * --exit--> Exited | OomKilled
        (_, Event::Exit { oom: true, .. }) => OomKilled,
        (_, Event::Exit { oom: false, .. }) => Exited,
        // * --fail--> Failed
        (_, Event::Fail) => Failed,
    }
}

/// How the previous run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastExit {
    /// Exit code.
    pub code: i32,
    /// Exited or OomKilled.
    pub state: State,
    /// Reason, as in [`Status::reason`].
    pub reason: String,
    /// When that run started.
    pub started_at: Option<SystemTime>,
    /// When it ended.
    pub finished_at: Option<SystemTime>,
}

/// Image pull progress, summed over layers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pull {
    /// Bytes downloaded.
    pub bytes_done: u64,
    /// Bytes to download.
    pub bytes_total: u64,
    /// Layers done.
    pub layers_done: u32,
    /// Layers in the image.
    pub layers_total: u32,
}

/// The status of one instance, as reported and as kept on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Instance id.
    pub id: String,
    /// Workload of the instance.
    pub workload: String,
    /// Generation the container runs.
    pub generation: u64,
    /// Current state.
    pub state: State,
    /// Machine-readable reason ("CrashLoopBackOff", "Completed", "ImagePullBackOff").
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
    /// Exit code of the last run, when it ended.
    pub exit_code: Option<i32>,
    /// Times the container was restarted.
    pub restart_count: u32,
    /// Consecutive short runs (the restart backoff's exponent).
    pub failures: u32,
    /// The previous run.
    pub last_exit: Option<LastExit>,
    /// Pull progress.
    pub pull: Option<Pull>,
    /// Image digest once resolved.
    pub image_digest: String,
    /// The container's address.
    pub ip: String,
    /// When the process last started.
    pub started_at: Option<SystemTime>,
    /// When it last became ready.
    pub ready_at: Option<SystemTime>,
    /// When the process last ended.
    pub finished_at: Option<SystemTime>,
    /// When this status was observed.
    pub observed_at: SystemTime,
}

impl Status {
    /// A fresh Pending status.
    pub fn pending(id: &str, workload: &str, generation: u64) -> Status {
        Status {
            id: id.to_owned(),
            workload: workload.to_owned(),
            generation,
            state: State::Pending,
            reason: String::new(),
            message: String::new(),
            exit_code: None,
            restart_count: 0,
            failures: 0,
            last_exit: None,
            pull: None,
            image_digest: String::new(),
            ip: String::new(),
            started_at: None,
            ready_at: None,
            finished_at: None,
            observed_at: SystemTime::now(),
        }
    }

    /// Applies `event` at `now`, with `reason` and `message` describing the new state.
    pub fn apply(&mut self, event: Event, reason: &str, message: &str, now: SystemTime) {
        self.state = transition(self.state, &event);
        self.reason = reason.to_owned();
        self.message = message.to_owned();
        self.observed_at = now;
        match event {
            Event::Started => {
                self.started_at = Some(now);
                self.exit_code = None;
                self.finished_at = None;
            }
            Event::Ready if self.state == State::Ready => self.ready_at = Some(now),
            Event::Exit { code, .. } => {
                self.exit_code = Some(code);
                self.finished_at = Some(now);
            }
            _ => {}
        }
    }

    /// Whether the process runs.
    pub fn is_running(&self) -> bool {
        matches!(self.state, State::Running | State::Ready)
    }
}

/// The file keeping instance `id`'s status under `dir`.
pub fn path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.json"))
}

/// Writes `status` atomically (temp file, then rename) under `dir`.
pub fn save(dir: &Path, status: &Status) -> std::io::Result<()> {
    let data = serde_json::to_vec(status).map_err(std::io::Error::other)?;
    let target = path(dir, &status.id);
    let tmp = dir.join(format!(".tmp-{}.json", status.id));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, &target)
}

/// Reads every status kept under `dir`; unreadable files are skipped (and named in the log).
pub fn load_all(dir: &Path) -> Vec<Status> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut statuses = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".tmp-") || !name.ends_with(".json") {
            continue;
        }
        match std::fs::read(entry.path())
            .map_err(|e| e.to_string())
            .and_then(|data| serde_json::from_slice::<Status>(&data).map_err(|e| e.to_string()))
        {
            Ok(status) => statuses.push(status),
            Err(err) => {
                tracing::warn!(file = %entry.path().display(), %err, "unreadable instance status skipped")
            }
        }
    }
    statuses
}

/// Removes instance `id`'s status file, if any.
pub fn remove(dir: &Path, id: &str) {
    let _ = std::fs::remove_file(path(dir, id));
}

fn state_to_pb(state: State) -> pb::InstanceState {
    match state {
        State::Pending => pb::InstanceState::Pending,
        State::Pulling => pb::InstanceState::Pulling,
        State::Starting => pb::InstanceState::Starting,
        State::Running => pb::InstanceState::Running,
        State::Ready => pb::InstanceState::Ready,
        State::Exited => pb::InstanceState::Exited,
        State::OomKilled => pb::InstanceState::OomKilled,
        State::Failed => pb::InstanceState::Failed,
    }
}

impl From<&Status> for pb::InstanceStatus {
    fn from(s: &Status) -> Self {
        let time = |t: Option<SystemTime>| t.map(prost_types::Timestamp::from);
        pb::InstanceStatus {
            instance_id: s.id.clone(),
            generation: s.generation,
            state: state_to_pb(s.state) as i32,
            reason: s.reason.clone(),
            message: s.message.clone(),
            exit_code: s.exit_code,
            restart_count: s.restart_count,
            last_exit: s.last_exit.as_ref().map(|l| pb::LastExit {
                exit_code: l.code,
                state: state_to_pb(l.state) as i32,
                reason: l.reason.clone(),
                started_at: time(l.started_at),
                finished_at: time(l.finished_at),
            }),
            pull: s.pull.as_ref().map(|p| pb::PullProgress {
                bytes_done: p.bytes_done,
                bytes_total: p.bytes_total,
                layers_done: p.layers_done,
                layers_total: p.layers_total,
            }),
            image_digest: s.image_digest.clone(),
            ip: s.ip.clone(),
            started_at: time(s.started_at),
            ready_at: time(s.ready_at),
            finished_at: time(s.finished_at),
            observed_at: Some(s.observed_at.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_and_event() {
        use State::*;
        let events = [
            Event::Pull,
            Event::Start,
            Event::Started,
            Event::Ready,
            Event::Unready,
            Event::Exit {
                code: 1,
                oom: false,
            },
            Event::Exit {
                code: 137,
                oom: true,
            },
            Event::Fail,
        ];
        let states = [
            Pending, Pulling, Starting, Running, Ready, Exited, OomKilled, Failed,
        ];
        for state in states {
            for event in &events {
                let want = match (state, event) {
                    (_, Event::Pull) => Pulling,
                    (_, Event::Start) => Starting,
                    (_, Event::Started) => Running,
                    (Running | Ready, Event::Ready) => Ready,
                    (Ready, Event::Unready) => Running,
                    (s, Event::Ready | Event::Unready) => s,
                    (_, Event::Exit { oom: true, .. }) => OomKilled,
                    (_, Event::Exit { .. }) => Exited,
                    (_, Event::Fail) => Failed,
                };
                assert_eq!(transition(state, event), want, "{state:?} --{event:?}-->");
            }
        }
    }

    #[test]
    fn statuses_survive_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut status = Status::pending("web-1", "web", 3);
        status.apply(Event::Started, "", "", SystemTime::now());
        status.restart_count = 2;
        save(dir.path(), &status).unwrap();
        std::fs::write(dir.path().join("bad.json"), b"{").unwrap();
        assert_eq!(load_all(dir.path()), vec![status]);
        remove(dir.path(), "web-1");
        assert!(load_all(dir.path()).is_empty());
    }
}
