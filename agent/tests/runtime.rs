//! The node runtime against real containers: isolation and hardening, cgroup limits, stop and
//! exit semantics, logs, exec, bad input, cleanup, and re-adoption after the agent is killed.
//! Needs root and Debian's busybox-static; skipped without them on a laptop, failed under CI.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gantry_agent::logs::{LogConfig, LogReader, ReadOptions};
use gantry_agent::runtime::cgroups::Layout;
use gantry_agent::runtime::state::{self, ContainerDir, ProcessRecord, RuntimeKind};
use gantry_agent::runtime::{
    BuiltinRuntime, ContainerSpec, ContainerState, ExecSpec, Runtime, RuntimeConfig, RuntimeError,
};

const AGENT: &str = env!("CARGO_BIN_EXE_gantry-agent");
const BUSYBOX: &str = "/bin/busybox";

/// Whether the environment can run containers; under CI a missing piece is a failure.
fn can_run() -> bool {
    let missing = if !rustix::process::geteuid().is_root() {
        Some("root")
    } else if !Path::new(BUSYBOX).exists() {
        Some("busybox-static (/bin/busybox)")
    } else {
        None
    };
    match missing {
        None => true,
        Some(what) if std::env::var_os("CI").is_some() => {
            panic!("runtime tests need {what}; .ci/run should have provided it")
        }
        Some(what) => {
            eprintln!("skipping: runtime tests need {what}");
            false
        }
    }
}

/// A root filesystem made of busybox-static and its applet links.
fn busybox_rootfs(dir: &Path) -> PathBuf {
    let rootfs = dir.join("rootfs");
    for d in ["bin", "etc", "proc", "dev", "sys", "tmp", "root"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).unwrap();
    let list = std::process::Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet));
        }
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .unwrap();
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    rootfs
}

struct Env {
    _tmp: tempfile::TempDir,
    rootfs: PathBuf,
    config: RuntimeConfig,
    rt: BuiltinRuntime,
}

impl Env {
    /// A runtime with its own state root and its own cgroup parent, named after the test.
    fn new(name: &str) -> Env {
        Env::with(name, |_| {})
    }

    fn with(name: &str, tweak: impl FnOnce(&mut RuntimeConfig)) -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let rootfs = busybox_rootfs(tmp.path());
        let config = test_config(tmp.path(), name, tweak);
        let rt = BuiltinRuntime::open(config.clone()).unwrap();
        Env {
            _tmp: tmp,
            rootfs,
            config,
            rt,
        }
    }

    fn spec(&self, id: &str, args: &[&str]) -> ContainerSpec {
        let mut spec = ContainerSpec::new(id, &self.rootfs, args.iter().copied());
        spec.hostname = Some(format!("host-{id}"));
        spec
    }

    async fn run(&self, spec: ContainerSpec) -> String {
        let id = spec.id.clone();
        self.rt.create(spec).await.unwrap();
        self.rt.start(&id).await.unwrap();
        id
    }

    async fn logs(&self, id: &str) -> String {
        let info = self.rt.state(id).await.unwrap();
        log_text(&info.log_dir).await
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.rt.release_cgroups();
    }
}

fn test_config(dir: &Path, name: &str, tweak: impl FnOnce(&mut RuntimeConfig)) -> RuntimeConfig {
    let proc_self = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let default = Layout::discover(Path::new("/sys/fs/cgroup"), &proc_self, None).unwrap();
    let parent = default
        .own()
        .join(format!("gantry-test-{}-{name}", std::process::id()));
    let mut config =
        RuntimeConfig::new(&dir.join("state"), Path::new(AGENT), Some(&parent)).unwrap();
    tweak(&mut config);
    config
}

async fn log_text(dir: &Path) -> String {
    let mut reader = LogReader::open(
        dir,
        ReadOptions {
            tail: None,
            since: None,
            follow: false,
        },
    )
    .unwrap();
    let mut out = String::new();
    while let Some(entry) = reader.next().await {
        out.push_str(&String::from_utf8_lossy(&entry.unwrap().content));
        out.push('\n');
    }
    out
}

/// Polls `cond` every 20 ms for up to `limit`.
async fn eventually(limit: Duration, mut cond: impl AsyncFnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_namespaces() {
    if !can_run() {
        return;
    }
    let env = Env::new("iso");
    let id = env
        .run(env.spec(
            "iso",
            &[
                "sh",
                "-c",
                "echo pid=$$; echo host=$(hostname); echo nets=$(ls /sys/class/net); \
                 echo procs=$(ls /proc | grep -c '^[0-9]'); cat /etc/hostname",
            ],
        ))
        .await;
    let exit = env.rt.wait(&id).await.unwrap();
    assert_eq!(exit.code, 0);
    let logs = env.logs(&id).await;
    assert!(logs.contains("pid=1\n"), "{logs}");
    assert!(logs.contains("host=host-iso\n"), "{logs}");
    assert!(logs.contains("nets=lo\n"), "{logs}");
    // sh, the command substitution's subshell and ls/grep: never the host's hundreds.
    let procs: usize = logs
        .lines()
        .find_map(|l| l.strip_prefix("procs="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(procs <= 4, "{logs}");
    env.rt.delete(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_hardening_defaults() {
    if !can_run() {
        return;
    }
    let env = Env::new("hard");
    let script = "grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status; \
         unshare -m true 2>&1; echo unshare=$?; \
         echo kcore=$(cat /proc/kcore | wc -c); \
         echo keys=$(cat /proc/keys 2>/dev/null | wc -c); \
         echo 1 > /proc/sys/kernel/ns_last_pid 2>/dev/null; echo procsys=$?; \
         touch /sys/x 2>/dev/null; echo sys=$?; \
         ls /dev | tr '\\n' ' '; echo; \
         ulimit -n; ulimit -Hn";
    let id = env.run(env.spec("hard", &["sh", "-c", script])).await;
    env.rt.wait(&id).await.unwrap();
    let logs = env.logs(&id).await;
    let field = |name: &str| -> String {
        logs.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("{name} missing in {logs}"))
            .trim()
            .to_string()
    };
    assert_eq!(field("CapEff"), "00000000a80425fb");
    assert_eq!(field("CapPrm"), "00000000a80425fb");
    assert_eq!(field("CapBnd"), "00000000a80425fb");
    assert_eq!(field("CapInh"), "0000000000000000");
    assert_eq!(field("CapAmb"), "0000000000000000");
    assert_eq!(field("NoNewPrivs"), "1");
    assert_eq!(field("Seccomp"), "2");
    assert!(logs.contains("Operation not permitted"), "{logs}");
    assert!(!logs.contains("unshare=0"), "{logs}");
    assert!(logs.contains("kcore=0\n"), "{logs}");
    assert!(logs.contains("keys=0\n"), "{logs}");
    assert!(!logs.contains("procsys=0"), "{logs}");
    assert!(!logs.contains("sys=0"), "{logs}");
    // Docker's 1024:524288, capped by what this process may grant (raising a hard limit needs
    // CAP_SYS_RESOURCE).
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .map_or(524_288, |m| m.min(524_288));
    assert!(logs.contains(&format!("1024\n{hard}\n")), "{logs}");
    for dev in [
        "null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "mqueue",
    ] {
        assert!(
            logs.contains(&format!(" {dev} ")) || logs.contains(&format!("{dev} ")),
            "{dev}: {logs}"
        );
    }
    env.rt.delete(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_oom_kill_is_reported() {
    if !can_run() {
        return;
    }
    let env = Env::new("oom");
    let mut spec = env.spec(
        "oom",
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
    );
    spec.resources.memory_bytes = Some(16 << 20);
    let id = env.run(spec).await;
    let exit = env.rt.wait(&id).await.unwrap();
    assert!(exit.oom_killed, "{exit:?}");
    assert_eq!(exit.signal, Some(9), "{exit:?}");
    assert_eq!(exit.code, 137);
    env.rt.delete(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pids_limit_stops_a_fork_bomb() {
    if !can_run() {
        return;
    }
    let env = Env::new("pids");
    // Within the limit: eight sleeps and the shell.
    let mut spec = env.spec(
        "pids-ok",
        &[
            "sh",
            "-c",
            "i=0; while [ $i -lt 8 ]; do sleep 30 & i=$((i+1)); done; echo spawned; wait",
        ],
    );
    spec.resources.pids = Some(10);
    let ok = env.run(spec).await;
    assert!(
        eventually(Duration::from_secs(10), async || env
            .logs(&ok)
            .await
            .contains("spawned"))
        .await
    );
    let stats = env.rt.stats(&ok).await.unwrap();
    assert_eq!(stats.pids_limit, Some(10));
    assert_eq!(stats.pids_current, 9, "{stats:?}");
    env.rt.stop(&ok, "SIGKILL", Duration::ZERO).await.unwrap();

    // A fork bomb: the eleventh fork fails and the shell gives up.
    let mut spec = env.spec(
        "pids-bomb",
        &[
            "sh",
            "-c",
            "i=0; while [ $i -lt 40 ]; do sleep 30 & i=$((i+1)); done; echo spawned-all",
        ],
    );
    spec.resources.pids = Some(10);
    let bomb = env.run(spec).await;
    let exit = env.rt.wait(&bomb).await.unwrap();
    let logs = env.logs(&bomb).await;
    assert_eq!(exit.code, 2, "{logs}");
    assert!(
        logs.contains("can't fork: Resource temporarily unavailable"),
        "{logs}"
    );
    assert!(!logs.contains("spawned-all"), "{logs}");
    for id in [ok, bomb] {
        env.rt.delete(&id).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_quota_is_set_and_throttles() {
    if !can_run() {
        return;
    }
    let env = Env::new("cpu");
    let mut spec = env.spec("cpu", &["sh", "-c", "while :; do :; done"]);
    spec.resources.cpu_millis = Some(200);
    let id = env.run(spec).await;
    let dirs = env.config.cgroups.container_dirs(&id).unwrap();
    let cpu_dir = dirs
        .iter()
        .find(|d| d.join("cpu.cfs_quota_us").exists() || d.join("cpu.max").exists())
        .expect("a cpu cgroup");
    let quota = std::fs::read_to_string(cpu_dir.join("cpu.cfs_quota_us"))
        .or_else(|_| std::fs::read_to_string(cpu_dir.join("cpu.max")))
        .unwrap();
    assert!(
        quota.trim() == "20000" || quota.starts_with("20000 100000"),
        "{quota}"
    );
    let before = env.rt.stats(&id).await.unwrap();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = env.rt.stats(&id).await.unwrap();
    let used = (after.cpu_usage_ns - before.cpu_usage_ns) as f64 / t0.elapsed().as_nanos() as f64;
    assert!(after.cpu_throttled_periods > 0, "{after:?}");
    assert!(used < 0.35, "a 0.2 CPU quota used {used:.2} CPU");
    env.rt.stop(&id, "SIGKILL", Duration::ZERO).await.unwrap();
    env.rt.delete(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_sends_the_signal_then_kills_after_the_grace_period() {
    if !can_run() {
        return;
    }
    let env = Env::new("stop");
    // Handles SIGTERM: exits with its own code.
    let polite = env
        .run(env.spec(
            "polite",
            &[
                "sh",
                "-c",
                "trap 'echo got-term; exit 3' TERM; echo ready; while :; do sleep 0.05; done",
            ],
        ))
        .await;
    // Ignores SIGTERM: killed after the grace period.
    let stubborn = env
        .run(env.spec(
            "stubborn",
            &[
                "sh",
                "-c",
                "trap '' TERM; echo ready; while :; do sleep 0.05; done",
            ],
        ))
        .await;
    for id in [&polite, &stubborn] {
        assert!(
            eventually(Duration::from_secs(10), async || env
                .logs(id)
                .await
                .contains("ready"))
            .await
        );
    }
    let exit = env
        .rt
        .stop(&polite, "SIGTERM", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!((exit.code, exit.signal), (3, None));
    assert!(env.logs(&polite).await.contains("got-term"));

    let t0 = Instant::now();
    let exit = env
        .rt
        .stop(&stubborn, "SIGTERM", Duration::from_secs(1))
        .await
        .unwrap();
    let took = t0.elapsed();
    assert_eq!(
        (exit.code, exit.signal, exit.oom_killed),
        (137, Some(9), false)
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "{took:?}"
    );
    for id in [polite, stubborn] {
        env.rt.delete(&id).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_and_signals_are_reported_exactly() {
    if !can_run() {
        return;
    }
    let env = Env::new("exit");
    let code = env.run(env.spec("code", &["sh", "-c", "exit 42"])).await;
    let exit = env.rt.wait(&code).await.unwrap();
    assert_eq!((exit.code, exit.signal, exit.oom_killed), (42, None, false));

    let killed = env.run(env.spec("killed", &["sleep", "100"])).await;
    env.rt.kill(&killed, "SIGKILL").await.unwrap();
    let exit = env.rt.wait(&killed).await.unwrap();
    assert_eq!((exit.code, exit.signal), (137, Some(9)));

    // A handled signal other than TERM ends the process with its own status.
    let usr = env
        .run(env.spec(
            "usr",
            &[
                "sh",
                "-c",
                "trap 'exit 9' USR1; echo ready; while :; do sleep 0.05; done",
            ],
        ))
        .await;
    assert!(
        eventually(Duration::from_secs(10), async || env
            .logs(&usr)
            .await
            .contains("ready"))
        .await
    );
    env.rt.kill(&usr, "USR1").await.unwrap();
    assert_eq!(env.rt.wait(&usr).await.unwrap().code, 9);

    // A program that exists but cannot be executed: 127 and the reason in the logs.
    std::fs::write(env.rootfs.join("bin/junk"), b"\x7fELF-not-really").unwrap();
    std::fs::set_permissions(
        env.rootfs.join("bin/junk"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let junk = env.run(env.spec("junk", &["/bin/junk"])).await;
    assert_eq!(env.rt.wait(&junk).await.unwrap().code, 127);
    assert!(
        env.logs(&junk).await.contains("exec: /bin/junk:"),
        "{}",
        env.logs(&junk).await
    );
    for id in [code, killed, usr, junk] {
        env.rt.delete(&id).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_specs_are_refused_before_anything_is_created() {
    if !can_run() {
        return;
    }
    let env = Env::new("bad");
    let cases: Vec<(ContainerSpec, &str)> = vec![
        (
            env.spec("nope", &["/bin/nope"]),
            "process.args[0]: exec: /bin/nope: no such file or directory",
        ),
        (
            {
                let mut s = env.spec("user", &["true"]);
                s.process.user = "ghost".into();
                s
            },
            "process.user: unable to find user ghost",
        ),
        (
            {
                let mut s = env.spec("mem", &["true"]);
                s.resources.memory_bytes = Some(10);
                s
            },
            "resources.memoryBytes: 10 is below the minimum",
        ),
        (
            {
                let mut s = env.spec("pids", &["true"]);
                s.resources.pids = Some(-5);
                s
            },
            "resources.pids: -5 is out of range",
        ),
        (
            {
                let mut s = env.spec("cwd", &["true"]);
                s.process.cwd = Some("relative/dir".into());
                s
            },
            "process.cwd: \"relative/dir\" is not an absolute path",
        ),
    ];
    for (spec, want) in cases {
        let id = spec.id.clone();
        let err = env.rt.create(spec).await.unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
        assert!(matches!(err, RuntimeError::InvalidSpec(_)));
        if id == "nope" {
            assert_eq!(err.exit_code(), Some(127));
        }
        assert!(!env.config.root.join("containers").join(&id).exists());
        for dir in env.config.cgroups.container_dirs(&id).unwrap() {
            assert!(!dir.exists(), "{dir:?} left behind");
        }
    }
    assert!(env.rt.list().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_leaves_no_cgroup_mount_process_or_state() {
    if !can_run() {
        return;
    }
    let env = Env::new("del");
    let mut spec = env.spec("del", &["sleep", "100"]);
    spec.resources.memory_bytes = Some(32 << 20);
    let id = env.run(spec).await;
    let ContainerState::Running { pid, .. } = env.rt.state(&id).await.unwrap().state else {
        panic!("not running")
    };
    let dirs = env.config.cgroups.container_dirs(&id).unwrap();
    assert!(dirs.iter().any(|d| d.exists()));
    // Deleting a running container is refused.
    assert!(matches!(
        env.rt.delete(&id).await,
        Err(RuntimeError::WrongState { .. })
    ));
    env.rt
        .stop(&id, "SIGTERM", Duration::from_secs(1))
        .await
        .unwrap();
    env.rt.delete(&id).await.unwrap();
    for d in &dirs {
        assert!(!d.exists(), "{d:?} left behind");
    }
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "init {pid} still there"
    );
    let state_dir = env.config.root.join("containers").join(&id);
    assert!(!state_dir.exists());
    assert!(!env.config.log_root.join(&id).exists(), "logs left behind");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(state_dir.to_str().unwrap()),
        "mount left behind"
    );
    assert!(
        !mounts.contains(env.rootfs.to_str().unwrap()),
        "mount left behind"
    );
    assert!(matches!(
        env.rt.state(&id).await,
        Err(RuntimeError::NotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_on_a_tmpfs_and_logs_on_disk() {
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(tmp.path());
    let config = test_config(tmp.path(), "tmpfs", |c| c.state_tmpfs = true);
    let containers = config.root.join("containers");
    let tmpfs_line = |dir: &Path| {
        let needle = format!(" {} ", dir.display());
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .find(|l| l.contains(&needle))
            .map(str::to_owned)
    };
    // Logs of a container whose state is gone (as after a reboot) go when the runtime opens.
    std::fs::create_dir_all(config.log_root.join("ghost")).unwrap();
    let rt = BuiltinRuntime::open(config.clone()).unwrap();
    assert!(!config.log_root.join("ghost").exists());
    let line = tmpfs_line(&containers).expect("a mount on the containers directory");
    assert!(line.contains(" - tmpfs "), "{line}");

    let spec = ContainerSpec::new("talk", &rootfs, ["echo", "hello"]);
    rt.create(spec).await.unwrap();
    rt.start("talk").await.unwrap();
    rt.wait("talk").await.unwrap();
    let info = rt.state("talk").await.unwrap();
    assert_eq!(log_text(&info.log_dir).await, "hello\n");
    // On disk, under the log root; linked from the state directory.
    assert!(config.log_root.join("talk/container.log").is_file());
    assert!(containers.join("talk/logs").is_symlink());
    // A tmpfs holding a container stays; once none is left it goes.
    assert!(!rt.release_state_tmpfs().unwrap());
    rt.delete("talk").await.unwrap();
    assert!(!config.log_root.join("talk").exists());
    assert!(rt.release_state_tmpfs().unwrap());
    assert!(tmpfs_line(&containers).is_none());
    let _ = rt.release_cgroups();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_in_the_container() {
    if !can_run() {
        return;
    }
    let env = Env::new("exec");
    let id = env.run(env.spec("exec", &["sleep", "100"])).await;
    let out = env
        .rt
        .exec(
            &id,
            ExecSpec::new([
                "sh",
                "-c",
                "hostname; ls /sys/class/net; echo oops >&2; exit 5",
            ]),
        )
        .await
        .unwrap();
    assert_eq!(out.code, 5);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "host-exec\nlo\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
    let mut as_nobody = ExecSpec::new(["id", "-u"]);
    as_nobody.user = "nobody".into();
    let out = env.rt.exec(&id, as_nobody).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "65534\n");
    let out = env
        .rt
        .exec(&id, ExecSpec::new(["/bin/nope"]))
        .await
        .unwrap();
    assert_eq!(out.code, 127, "{out:?}");
    env.rt.stop(&id, "SIGKILL", Duration::ZERO).await.unwrap();
    env.rt.delete(&id).await.unwrap();

    // Without a user of its own, an exec runs as the container's user.
    let mut spec = env.spec("exec-nobody", &["sleep", "100"]);
    spec.process.user = "nobody".into();
    let id = env.run(spec).await;
    let out = env
        .rt
        .exec(
            &id,
            ExecSpec::new([
                "sh",
                "-c",
                "id -u; ulimit -n; ulimit -Hn; echo ${TERM:-none}",
            ]),
        )
        .await
        .unwrap();
    // The container's open-files limit, not libcontainer's default of 1024:1024.
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .map_or(524_288, |m| m.min(524_288));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("65534\n1024\n{hard}\nnone\n"),
        "{out:?}"
    );
    env.rt.stop(&id, "SIGKILL", Duration::ZERO).await.unwrap();
    env.rt.delete(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_rotate_and_a_follower_loses_nothing() {
    if !can_run() {
        return;
    }
    let env = Env::with("logs", |c| {
        c.log = LogConfig {
            max_size: 4096,
            max_files: 3,
        }
    });
    let id = env
        .run(env.spec(
            "logs",
            &["sh", "-c", "i=0; while [ $i -lt 400 ]; do echo line-$i; i=$((i+1)); usleep 1000; done; echo done"],
        ))
        .await;
    let info = env.rt.state(&id).await.unwrap();
    let mut reader = LogReader::open(
        &info.log_dir,
        ReadOptions {
            tail: None,
            since: None,
            follow: true,
        },
    )
    .unwrap();
    let mut seen = Vec::new();
    let collect = async {
        while let Some(e) = reader.next().await {
            let line = String::from_utf8(e.unwrap().content).unwrap();
            if line == "done" {
                break;
            }
            seen.push(line);
        }
    };
    tokio::time::timeout(Duration::from_secs(30), collect)
        .await
        .unwrap();
    let want: Vec<String> = (0..400).map(|i| format!("line-{i}")).collect();
    assert_eq!(seen, want);
    let files: Vec<String> = std::fs::read_dir(&info.log_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(files.len() <= 3, "{files:?}");
    assert!(files.contains(&"container.log.1".to_string()), "{files:?}");
    env.rt.wait(&id).await.unwrap();
    env.rt.delete(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runc_as_the_oci_runtime_binary() {
    if !can_run() {
        return;
    }
    let runc = ["/usr/sbin/runc", "/usr/bin/runc"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(runc) = runc else {
        assert!(
            std::env::var_os("CI").is_none(),
            "runc is missing; .ci/run should install it"
        );
        return;
    };
    let env = Env::with("runc", |c| c.runtime = RuntimeKind::Oci(runc.into()));
    let id = env
        .run(env.spec("viarunc", &["sh", "-c", "echo pid=$$; exit 7"]))
        .await;
    let exit = env.rt.wait(&id).await.unwrap();
    assert_eq!(exit.code, 7);
    assert!(env.logs(&id).await.contains("pid=1"));
    env.rt.delete(&id).await.unwrap();
    for d in env.config.cgroups.container_dirs(&id).unwrap() {
        assert!(!d.exists(), "{d:?} left behind");
    }
}

/// kill -9 of the agent while 20 containers run: all keep running; a new agent re-adopts all 20,
/// their logs continue, the exit of one that ended while no agent ran is still reported, and no
/// duplicate is started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_survive_agent_kill_and_are_readopted() {
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let rootfs = busybox_rootfs(tmp.path());
    let config = test_config(tmp.path(), "adopt", |_| {});
    let mut spec_files = Vec::new();
    for i in 0..20 {
        let script = if i == 0 {
            // Ends on its own while no agent runs.
            "sleep 2; echo bye; exit 7"
        } else {
            "i=0; while :; do echo tick-$i; i=$((i+1)); sleep 0.2; done"
        };
        let spec = ContainerSpec::new(&format!("adopt-{i}"), &rootfs, ["sh", "-c", script]);

        let path = tmp.path().join(format!("spec-{i}.json"));
        std::fs::write(&path, serde_json::to_vec(&spec).unwrap()).unwrap();
        spec_files.push(path);
    }
    // The first agent: runs the 20 containers attached, as an agent would hold them.
    let mut agent = std::process::Command::new(AGENT)
        .arg("ctr")
        .arg("--root")
        .arg(&config.root)
        .arg("--cgroup-parent")
        .arg(config.cgroups.parent())
        .arg("run")
        .args(&spec_files)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Watch the state directories (the agent holds the runtime lock, as a second agent must not
    // open the same root) until every container has started.
    let records = || -> BTreeMap<String, ProcessRecord> {
        (0..20)
            .filter_map(|i| {
                let id = format!("adopt-{i}");
                let dir = ContainerDir::new(&config.root, &id);
                let r: Option<ProcessRecord> = state::read_json(&dir.process()).ok().flatten();
                r.filter(|r| r.started_at.is_some()).map(|r| (id, r))
            })
            .collect()
    };
    let started = eventually(Duration::from_secs(60), async || records().len() == 20).await;
    assert!(started, "20 containers did not start");
    assert!(
        BuiltinRuntime::open(config.clone()).is_err(),
        "a second agent must not open a state root in use"
    );
    let pids_before: BTreeMap<String, i32> = records()
        .into_iter()
        .map(|(id, r)| (id, r.init.pid))
        .collect();
    // kill -9 the agent.
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&agent),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    agent.wait().unwrap();
    let killed_at = std::time::SystemTime::now();
    tokio::time::sleep(Duration::from_millis(2500)).await;

    // The new agent.
    let rt = BuiltinRuntime::open(config.clone()).unwrap();
    let list = rt.list().await.unwrap();
    assert_eq!(list.len(), 20, "no container lost, none duplicated");
    for c in &list {
        if c.id == "adopt-0" {
            let ContainerState::Stopped(exit) = &c.state else {
                panic!("adopt-0 should have exited: {:?}", c.state)
            };
            assert_eq!(exit.code, 7);
            assert!(log_text(&c.log_dir).await.contains("bye"));
        } else {
            let ContainerState::Running { pid, .. } = c.state else {
                panic!("{} not running after the agent died: {:?}", c.id, c.state)
            };
            assert_eq!(pid, pids_before[&c.id], "{} was restarted", c.id);
            // Logs went on while no agent ran.
            let mut reader = LogReader::open(
                &c.log_dir,
                ReadOptions {
                    tail: None,
                    since: Some(killed_at + Duration::from_millis(500)),
                    follow: false,
                },
            )
            .unwrap();
            assert!(
                reader.next().await.is_some(),
                "{}: no logs after the agent died",
                c.id
            );
        }
    }
    let cgroups = config.cgroups.list().unwrap();
    assert_eq!(cgroups.len(), 19, "{cgroups:?}");
    // The new agent can stop and remove what it adopted.
    for c in list {
        rt.stop(&c.id, "SIGKILL", Duration::ZERO).await.unwrap();
        rt.delete(&c.id).await.unwrap();
    }
    assert!(config.cgroups.list().unwrap().is_empty());
    let _ = rt.release_cgroups();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileged_and_cap_add_are_the_ways_out() {
    if !can_run() {
        return;
    }
    let env = Env::new("priv");
    let script = "grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status";
    let mut privileged = env.spec("privileged", &["sh", "-c", script]);
    privileged.privileged = true;
    let mut net_admin = env.spec("netadmin", &["sh", "-c", script]);
    net_admin.cap_add = vec!["NET_ADMIN".into()];
    let host_bnd = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:").map(|v| v.trim().to_string()))
        .unwrap();
    for (spec, cap_eff, nnp, seccomp) in [
        (privileged, host_bnd.as_str(), "0", "0"),
        // CAP_NET_ADMIN is bit 12 (0x1000) on top of Docker's default mask.
        (net_admin, "00000000a80435fb", "1", "2"),
    ] {
        let id = env.run(spec).await;
        assert_eq!(env.rt.wait(&id).await.unwrap().code, 0);
        let logs = env.logs(&id).await;
        assert!(
            logs.contains(&format!("CapEff:\t{cap_eff}")),
            "{id}: {logs}"
        );
        assert!(
            logs.contains(&format!("NoNewPrivs:\t{nnp}")),
            "{id}: {logs}"
        );
        assert!(
            logs.contains(&format!("Seccomp:\t{seccomp}")),
            "{id}: {logs}"
        );
        env.rt.delete(&id).await.unwrap();
    }
}

/// Reads from `r` into `buf` until `buf` contains `needle`, for up to 10 s; whether it did.
async fn read_until(
    r: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut Vec<u8>,
    needle: &str,
) -> bool {
    use tokio::io::AsyncReadExt;
    let read = async {
        while !String::from_utf8_lossy(buf).contains(needle) {
            let mut chunk = [0u8; 4096];
            match r.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        true
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .unwrap_or(false)
}

/// Everything left in `r`, for up to 10 s.
async fn read_rest(r: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut out))
        .await
        .expect("the output did not end")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_streams_stdin_and_closes_it() {
    use tokio::io::AsyncWriteExt;
    if !can_run() {
        return;
    }
    let env = Env::new("execin");
    let id = env.run(env.spec("execin", &["sleep", "100"])).await;
    let mut spec = ExecSpec::new(["cat"]);
    spec.stdin = true;
    let mut cat = env.rt.spawn_exec(&id, spec).await.unwrap();
    assert!(!cat.tty());
    assert!(cat.resize(40, 100).is_err(), "resize without a TTY");
    let mut stdin = cat.take_stdin().expect("stdin was asked for");
    let mut stdout = cat.take_stdout().unwrap();
    let mut stderr = cat.take_stderr().expect("stderr without a TTY");
    // The first line comes back while stdin is still open: streamed, not collected at the end.
    stdin.write_all(b"first line\n").await.unwrap();
    let mut out = Vec::new();
    assert!(
        read_until(&mut stdout, &mut out, "first line\n").await,
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    stdin.write_all(b"second line\n").await.unwrap();
    // Shutting stdin down closes it (the handle itself is still alive here): cat sees EOF.
    stdin.shutdown().await.unwrap();
    assert!(stdin.write_all(b"more").await.is_err());
    let rest = read_rest(&mut stdout).await;
    assert_eq!(
        format!("{}{rest}", String::from_utf8_lossy(&out)),
        "first line\nsecond line\n"
    );
    assert_eq!(read_rest(&mut stderr).await, "");
    let code = tokio::time::timeout(Duration::from_secs(10), cat.wait())
        .await
        .expect("cat did not exit after its stdin closed")
        .unwrap();
    assert_eq!(code, 0);
    drop(stdin);

    // Without `stdin`, the process reads /dev/null: cat ends at once.
    let mut cat = env
        .rt
        .spawn_exec(&id, ExecSpec::new(["cat"]))
        .await
        .unwrap();
    assert!(cat.take_stdin().is_none());
    let mut stdout = cat.take_stdout().unwrap();
    assert_eq!(read_rest(&mut stdout).await, "");
    assert_eq!(cat.wait().await.unwrap(), 0);
    env.rt.stop(&id, "SIGKILL", Duration::ZERO).await.unwrap();
    env.rt.delete(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_with_a_tty_gets_a_controlling_terminal() {
    use tokio::io::AsyncWriteExt;
    if !can_run() {
        return;
    }
    let env = Env::new("exectty");
    let id = env.run(env.spec("exectty", &["sleep", "100"])).await;
    let mut spec = ExecSpec::new([
        "sh",
        "-c",
        "tty; test -t 0 && echo is-a-tty; echo term=$TERM; echo to-stderr >&2; exit 3",
    ]);
    spec.tty = true;
    let mut p = env.rt.spawn_exec(&id, spec).await.unwrap();
    assert!(p.tty());
    assert!(p.take_stdin().is_none());
    assert!(p.take_stderr().is_none(), "a TTY has one output stream");
    let mut stdout = p.take_stdout().unwrap();
    let out = read_rest(&mut stdout).await;
    assert_eq!(p.wait().await.unwrap(), 3, "{out}");
    assert!(out.contains("/dev/pts/"), "{out}");
    assert!(out.contains("is-a-tty"), "{out}");
    assert!(out.contains("term=xterm"), "{out}");
    // The terminal turns \n into \r\n; stderr is on it too.
    assert!(out.contains("to-stderr\r\n"), "{out}");

    // Through `exec`: the output is collected on stdout.
    let mut spec = ExecSpec::new(["sh", "-c", "test -t 1 && echo out; echo err >&2"]);
    spec.tty = true;
    let collected = env.rt.exec(&id, spec).await.unwrap();
    assert_eq!(collected.code, 0);
    assert_eq!(String::from_utf8_lossy(&collected.stdout), "out\r\nerr\r\n");
    assert!(collected.stderr.is_empty());

    // A program that cannot run: 127 and the reason on the terminal.
    let mut spec = ExecSpec::new(["/bin/nope"]);
    spec.tty = true;
    let nope = env.rt.exec(&id, spec).await.unwrap();
    assert_eq!(nope.code, 127, "{nope:?}");
    assert!(
        String::from_utf8_lossy(&nope.stdout).contains("/bin/nope"),
        "{nope:?}"
    );

    // The same user, capabilities and hardening as an exec without a TTY.
    let script = "grep -E '^(Uid|Gid|Groups|CapEff|CapPrm|CapBnd|CapAmb|NoNewPrivs|Seccomp):' \
                  /proc/self/status; pwd; cat /proc/self/cgroup; ulimit -n; ulimit -Hn";
    for user in ["", "nobody"] {
        let mut plain = ExecSpec::new(["sh", "-c", script]);
        plain.user = user.into();
        let mut with_tty = plain.clone();
        with_tty.tty = true;
        let plain = env.rt.exec(&id, plain).await.unwrap();
        let with_tty = env.rt.exec(&id, with_tty).await.unwrap();
        assert_eq!(plain.code, 0, "{plain:?}");
        assert_eq!(
            String::from_utf8_lossy(&with_tty.stdout).replace("\r\n", "\n"),
            String::from_utf8_lossy(&plain.stdout),
            "user {user:?}"
        );
    }

    // Closing stdin types end-of-file: after a partial line it takes two, and cat exits.
    let mut spec = ExecSpec::new(["cat"]);
    spec.tty = true;
    spec.stdin = true;
    let mut cat = env.rt.spawn_exec(&id, spec).await.unwrap();
    let mut stdin = cat.take_stdin().unwrap();
    let mut stdout = cat.take_stdout().unwrap();
    stdin.write_all(b"one\npartial").await.unwrap();
    drop(stdin);
    let out = read_rest(&mut stdout).await;
    let code = tokio::time::timeout(Duration::from_secs(10), cat.wait())
        .await
        .expect("cat did not see end-of-file")
        .unwrap();
    assert_eq!(code, 0, "{out}");
    // Echoed by the terminal, and written by cat.
    assert_eq!(out.matches("one\r\n").count(), 2, "{out:?}");
    assert_eq!(out.matches("partial").count(), 2, "{out:?}");

    env.rt.stop(&id, "SIGKILL", Duration::ZERO).await.unwrap();
    env.rt.delete(&id).await.unwrap();
}

/// Runs `script` with a TTY sized 40x100 before it reads its first line ("go"); returns its exit
/// code and everything it printed.
async fn tty_exec_sized(env: &Env, id: &str, script: &str) -> (i32, String) {
    use tokio::io::AsyncWriteExt;
    let mut spec = ExecSpec::new(["sh", "-c", script]);
    spec.tty = true;
    spec.stdin = true;
    let mut p = env.rt.spawn_exec(id, spec).await.unwrap();
    p.resize(40, 100).unwrap();
    let mut stdin = p.take_stdin().unwrap();
    let mut stdout = p.take_stdout().unwrap();
    stdin.write_all(b"go\n").await.unwrap();
    let out = read_rest(&mut stdout).await;
    (p.wait().await.unwrap(), out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_tty_resizes() {
    if !can_run() {
        return;
    }
    let env = Env::new("execsize");
    let id = env.run(env.spec("execsize", &["sleep", "100"])).await;
    // Sized before the process reads its input.
    let (code, out) = tty_exec_sized(&env, &id, "read go; stty size").await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("40 100\r\n"), "{out:?}");

    // Resized while it runs: SIGWINCH, and the new size.
    let mut spec = ExecSpec::new([
        "sh",
        "-c",
        "trap 'echo winch; stty size' WINCH; echo ready; \
         while [ ! -e /tmp/stop ]; do sleep 0.05; done; echo done",
    ]);
    spec.tty = true;
    let mut p = env.rt.spawn_exec(&id, spec).await.unwrap();
    let mut stdout = p.take_stdout().unwrap();
    let mut out = Vec::new();
    assert!(read_until(&mut stdout, &mut out, "ready").await);
    p.resize(50, 120).unwrap();
    assert!(
        read_until(&mut stdout, &mut out, "winch\r\n50 120\r\n").await,
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    let touch = env
        .rt
        .exec(&id, ExecSpec::new(["touch", "/tmp/stop"]))
        .await;
    assert_eq!(touch.unwrap().code, 0);
    let rest = read_rest(&mut stdout).await;
    assert_eq!(p.wait().await.unwrap(), 0);
    assert!(rest.contains("done"), "{rest:?}");
    // The helper removed its files from the state directory.
    let dir = env.config.root.join("containers").join(&id);
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("exec-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let links: Vec<String> = std::fs::read_dir(dir.join("oci").join(&id))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tenant-tty-"))
        .collect();
    assert!(links.is_empty(), "{links:?}");
    env.rt.stop(&id, "SIGKILL", Duration::ZERO).await.unwrap();
    env.rt.delete(&id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runc_exec_with_a_tty_and_stdin() {
    use tokio::io::AsyncWriteExt;
    if !can_run() {
        return;
    }
    let Some(runc) = ["/usr/sbin/runc", "/usr/bin/runc"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "runc is missing; .ci/run should install it"
        );
        return;
    };
    let env = Env::with("runcexec", |c| c.runtime = RuntimeKind::Oci(runc.into()));
    let id = env.run(env.spec("runcexec", &["sleep", "100"])).await;
    let (code, out) = tty_exec_sized(&env, &id, "read go; tty; stty size; exit 4").await;
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("/dev/pts/"), "{out:?}");
    assert!(out.contains("40 100\r\n"), "{out:?}");

    let mut spec = ExecSpec::new(["cat"]);
    spec.stdin = true;
    let mut cat = env.rt.spawn_exec(&id, spec).await.unwrap();
    let mut stdin = cat.take_stdin().unwrap();
    let mut stdout = cat.take_stdout().unwrap();
    stdin.write_all(b"via runc\n").await.unwrap();
    drop(stdin);
    assert_eq!(read_rest(&mut stdout).await, "via runc\n");
    assert_eq!(cat.wait().await.unwrap(), 0);
    env.rt.stop(&id, "SIGKILL", Duration::ZERO).await.unwrap();
    env.rt.delete(&id).await.unwrap();
}
