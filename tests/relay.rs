//! Logs and exec relayed through the scheduler, end to end: a real scheduler (in the test
//! process), a real `gantry-agent run` and real containers, driven by the real `gantry` CLI:
//! `gantry logs` (tail, a workload name, follow), `gantry exec` (output, exit code, piped
//! stdin, a terminal), attached `gantry run --rm`, and the errors for unknown names.
//!
//! Needs root and Debian's busybox-static; skipped without them on a laptop, failed under CI.
//! The agent binary is the one cargo built next to `gantry` (`cargo build -p gantry-agent`
//! after changing the agent alone).

mod support;

use std::time::Duration;

use support::Cluster;
use support::node::{apply, can_run, instances, start_node, wait};

const IMAGE: &str = "gantry.test/busybox:1";

/// Processes on the machine whose command line is `cmdline` (NUL-separated).
fn processes(cmdline: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == cmdline.as_bytes()))
        .count()
}

#[test]
fn logs_exec_and_attached_run_through_the_scheduler() {
    if !can_run("relay") {
        return;
    }
    let cluster = Cluster::start(0);
    let (data, mut agent) = start_node(&cluster, IMAGE);
    let limit = Duration::from_secs(30);
    wait(&agent, "the node is Ready", limit, || {
        let nodes = cluster.json(&["get", "nodes", "-o", "json"]);
        nodes["items"][0]["status"] == "Ready"
    });

    // A container that prints known lines, then one more line whenever /tmp/go appears.
    apply(
        &cluster,
        "printer",
        &format!(
            "kind: Service\nname: printer\nimage: {IMAGE}\nstopGracePeriod: 1s\n\
             command: [sh, -c, 'echo err1 >&2; sleep 0.3; for i in 1 2 3 4 5; do echo line$i; done; \
             while true; do if test -f /tmp/go; then echo late; rm /tmp/go; fi; sleep 0.1; done']\n"
        ),
    );
    wait(&agent, "the printer is Ready", limit, || {
        instances(&cluster, "printer")
            .first()
            .is_some_and(|i| i["state"] == "Ready")
    });
    let id = instances(&cluster, "printer")[0]["name"]
        .as_str()
        .expect("instance name")
        .to_owned();
    wait(&agent, "the printer printed its lines", limit, || {
        cluster.run(&["logs", &id]).stdout.contains("line5")
    });

    // Everything, by instance id and by workload name; stderr stays stderr.
    let all = cluster.run(&["logs", &id]);
    assert_eq!(all.ok(), "line1\nline2\nline3\nline4\nline5\n");
    assert_eq!(all.stderr, "err1\n");
    let by_name = cluster.run(&["logs", "printer"]);
    assert_eq!(by_name.ok(), all.stdout);

    // --tail 2: the last two lines only.
    let tail = cluster.run(&["logs", &id, "--tail", "2"]);
    let raw = std::fs::read_to_string(
        data.join("runtime/containers")
            .join(&id)
            .join("logs/container.log"),
    )
    .unwrap_or_default();
    assert_eq!(tail.ok(), "line4\nline5\n", "the log file:\n{raw}");
    assert_eq!(tail.stderr, "");

    // --timestamps: each line starts with its RFC 3339 time.
    let stamped = cluster.run(&["logs", &id, "--tail", "1", "--timestamps"]);
    let line = stamped.ok().trim_end();
    let (time, text) = line.split_once(' ').expect("a time, then the line");
    assert!(time.ends_with('Z') && time.contains('T'), "{line}");
    assert_eq!(text, "line5");

    // --since as a point in time: all of it from long ago, nothing from the future.
    let old = cluster.run(&["logs", &id, "--since", "2000-01-01T00:00:00Z"]);
    assert_eq!(old.ok(), all.stdout);
    let future = cluster.run(&["logs", &id, "--since", "2999-01-01T00:00:00Z"]);
    assert_eq!(future.ok(), "");

    // -f: a line written after the call started arrives.
    let mut follow = cluster.spawn(&["logs", "-f", &id]);
    follow.wait_for("the existing lines", |l| l == "line5");
    cluster.run(&["exec", &id, "--", "touch", "/tmp/go"]).ok();
    follow.wait_for("the line written while following", |l| l == "late");
    drop(follow);

    // exec by workload name: one of its running instances.
    let by_workload = cluster.run(&["exec", "printer", "--", "echo", "by-name"]);
    assert_eq!(by_workload.ok(), "by-name\n");

    // exec: output on both streams and the command's exit code as the CLI's.
    let ran = cluster.run(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo hi; echo oops >&2; exit 3",
    ]);
    assert_eq!(ran.code, 3, "{ran:#?}");
    assert_eq!(ran.stdout, "hi\n");
    assert!(ran.stderr.contains("oops"), "{ran:#?}");

    // exec -i: stdin reaches the process, and its end is an end of file.
    let cat = cluster
        .gantry()
        .args(["exec", "-i", &id, "--", "cat"])
        .write_stdin("hello\nworld\n")
        .output()
        .expect("running gantry exec");
    let cat = support::Ran::from(cat);
    assert_eq!(cat.ok(), "hello\nworld\n");

    // exec -t: the process has a terminal.
    let tty = cluster.run(&[
        "exec",
        "-t",
        &id,
        "--",
        "sh",
        "-c",
        "test -t 1 && echo on-a-tty",
    ]);
    assert!(tty.ok().contains("on-a-tty"), "{tty:#?}");

    // A client that goes away stops its exec: the process in the container is killed.
    let sleeper = cluster.spawn(&["exec", &id, "--", "sleep", "1007"]);
    wait(&agent, "the exec'd sleep runs", limit, || {
        processes("sleep\u{0}1007\u{0}") == 1
    });
    drop(sleeper);
    wait(&agent, "the exec'd sleep is killed", limit, || {
        processes("sleep\u{0}1007\u{0}") == 0
    });

    // Unknown names: a clear error, exit code 1.
    let unknown = cluster.run(&["logs", "nosuch"]);
    let err = unknown.fails(1);
    assert!(
        err.contains("nosuch") && err.contains("not found") && err.contains("gantry get"),
        "{err}"
    );
    let unknown = cluster.run(&["exec", "printer-nosuch", "--", "true"]);
    let err = unknown.fails(1);
    assert!(
        err.contains("printer-nosuch") && err.contains("not found"),
        "{err}"
    );

    // Attached run: output streamed, the container's exit code returned, --rm leaves nothing.
    let run = cluster.run(&[
        "run",
        "--name",
        "once",
        "--rm",
        IMAGE,
        "--",
        "sh",
        "-c",
        "echo from-run; echo to-stderr >&2; exit 7",
    ]);
    assert_eq!(run.code, 7, "{run:#?}");
    assert_eq!(run.stdout, "from-run\n");
    assert!(run.stderr.contains("to-stderr"), "{run:#?}");
    let workloads = cluster.json(&["get", "workloads", "-o", "json"]);
    let names: Vec<&str> = workloads["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|w| w["name"].as_str())
        .collect();
    assert_eq!(names, ["printer"], "--rm removed the run's workload");

    // Clean up: no container left behind.
    cluster.run(&["delete", "workload", "printer"]).ok();
    wait(&agent, "every container removed", limit, || {
        agent.containers().is_empty()
    });
    agent.kill();
}
