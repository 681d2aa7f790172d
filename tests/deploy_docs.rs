//! Keeps deploy/ and the README true to the binaries: every option the example configs, the
//! systemd units and the README name is one the real binaries accept (with the example's
//! value), every option of the daemons is documented in their example config, the units pass
//! `systemd-analyze verify`, the CLI config example is read by the CLI's own loader, and the
//! example 3-member etcd cluster, started on loopback from its files, serves a scheduler
//! started with the scheduler's example options.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const ETCD_BIN: &str = "/usr/bin/etcd";

/// A binary of the workspace, next to the `gantry` binary cargo built for this test.
fn binary(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_gantry")).with_file_name(name);
    assert!(
        path.exists(),
        "{path:?} is missing: build it with `cargo build --workspace --bins`"
    );
    path
}

fn read(relative: &str) -> String {
    let path = Path::new(ROOT).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path:?}: {e}"))
}

fn run(program: &Path, args: &[String]) -> Output {
    Command::new(program)
        .args(args)
        .env_remove("GANTRY_ADDR")
        .env_remove("GANTRY_CONFIG")
        .env("NO_COLOR", "1")
        .output()
        .unwrap_or_else(|e| panic!("running {program:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Whether the machine has `what` (a program this test needs); under CI a missing one fails.
fn have(what: &str) -> bool {
    if Path::new(what).exists() {
        return true;
    }
    let ci = std::env::var("CI").unwrap_or_default();
    assert!(
        matches!(ci.as_str(), "" | "0" | "false"),
        "{what} is missing and CI={ci}: install it (Debian: etcd-server, systemd)"
    );
    eprintln!("skipping: {what} not found (set CI=true to make this an error)");
    false
}

/// The long options (`--name`) in a text, in order of appearance.
fn long_flags(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let mut flags = Vec::new();
    let mut i = 0;
    while let Some(at) = text[i..].find("--") {
        let start = i + at;
        let mut end = start + 2;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'-') {
            end += 1;
        }
        let preceded_by_word = start > 0 && (bytes[start - 1].is_ascii_alphanumeric());
        let name = &text[start + 2..end];
        if !preceded_by_word && name.starts_with(|c: char| c.is_ascii_lowercase()) {
            flags.push(text[start..end].trim_end_matches('-').to_string());
        }
        i = end.max(start + 2);
    }
    flags
}

/// The options a `--help` output lists (without `--help` and `--version`).
fn help_flags(program: &Path, args: &[&str]) -> BTreeSet<String> {
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    args.push("--help".into());
    let out = run(program, &args);
    assert!(out.status.success(), "{program:?} {args:?}: {}", text(&out));
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    help.lines()
        .filter(|l| l.trim_start().starts_with('-'))
        .flat_map(|l| {
            let option = l.trim_start().split("  ").next().unwrap_or("");
            long_flags(option)
        })
        .filter(|f| f != "--help" && f != "--version")
        .collect()
}

/// The subcommands a clap `--help` lists under `Commands:` (without `help`).
fn subcommands(program: &Path, args: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    args.push("--help".into());
    let help = String::from_utf8_lossy(&run(program, &args).stdout).into_owned();
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// Every option of a clap program and its subcommands, recursively.
fn all_flags(program: &Path, args: &[&str], into: &mut BTreeSet<String>) {
    into.extend(help_flags(program, args));
    for sub in subcommands(program, args) {
        let mut deeper: Vec<&str> = args.to_vec();
        deeper.push(&sub);
        all_flags(program, &deeper, into);
    }
}

/// One `NAME=VALUE` line of an environment file, `#NAME=VALUE` when commented out.
#[derive(Debug)]
struct Assignment {
    name: String,
    value: String,
    commented: bool,
    line: usize,
}

/// The assignments of an environment file as systemd reads it (comments are `#` lines), with
/// the commented-out examples too.
fn env_file(relative: &str) -> Vec<Assignment> {
    let mut found = Vec::new();
    for (i, raw) in read(relative).lines().enumerate() {
        let line = raw.trim();
        let (commented, body) = match line.strip_prefix('#') {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        let Some((name, value)) = body.split_once('=') else {
            assert!(
                commented || line.is_empty(),
                "{relative}:{}: neither a comment nor NAME=VALUE: {raw}",
                i + 1
            );
            continue;
        };
        let is_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if !is_name {
            assert!(commented, "{relative}:{}: bad variable name: {raw}", i + 1);
            continue;
        }
        assert!(
            !value.contains(['"', '\'', '$', '\\']),
            "{relative}:{}: values are plain words (systemd splits them at whitespace): {raw}",
            i + 1
        );
        found.push(Assignment {
            name: name.to_string(),
            value: value.to_string(),
            commented,
            line: i + 1,
        });
    }
    found
}

/// The words of a unit's `ExecStart=`, continuation lines joined.
fn exec_start(relative: &str) -> Vec<String> {
    let unit = read(relative).replace("\\\n", " ");
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap_or_else(|| panic!("{relative} has no ExecStart="));
    line.split_whitespace().map(str::to_string).collect()
}

/// Checks a daemon's example environment file against its binary and its unit:
/// each `OPT_X` holds the option `--x`, each example value is accepted, every option the binary
/// has is there, and the unit passes exactly the file's `OPT_*` variables.
fn check_daemon_options(program: &Path, verb: &[&str], env: &str, unit: &str) {
    let flags = help_flags(program, verb);
    let assignments = env_file(env);
    let mut documented = BTreeSet::new();
    let mut uncommented: Vec<String> = verb.iter().map(|v| v.to_string()).collect();
    for a in &assignments {
        let option = a
            .name
            .strip_prefix("OPT_")
            .unwrap_or_else(|| panic!("{env}:{}: {} is not an OPT_* variable", a.line, a.name));
        let flag = format!("--{}", option.to_lowercase().replace('_', "-"));
        let words: Vec<String> = a.value.split_whitespace().map(str::to_string).collect();
        assert!(
            words
                .first()
                .is_some_and(|w| *w == flag || w.starts_with(&format!("{flag}="))),
            "{env}:{}: {} must hold {flag}, not {:?}",
            a.line,
            a.name,
            a.value
        );
        assert!(
            flags.contains(&flag),
            "{env}:{}: {program:?} {verb:?} has no option {flag}; it has {flags:?}",
            a.line
        );
        // Parsing stops at --help only after every earlier option and value was accepted.
        let mut args: Vec<String> = verb.iter().map(|v| v.to_string()).collect();
        args.extend(words.iter().cloned());
        args.push("--help".into());
        let out = run(program, &args);
        assert!(
            out.status.success(),
            "{env}:{}: {program:?} refuses {:?}: {}",
            a.line,
            a.value,
            text(&out)
        );
        if !a.commented {
            uncommented.extend(words);
        }
        documented.insert(flag);
    }
    let missing: Vec<_> = flags.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "{env} does not document {missing:?} of {program:?} {verb:?}: add an OPT_* line with a comment, and the variable to {unit}"
    );
    for flag in long_flags(&read(env)).into_iter().filter(|f| f != "--help") {
        assert!(
            flags.contains(&flag),
            "{env} mentions {flag}, which {program:?} does not take"
        );
    }
    uncommented.push("--help".into());
    let out = run(program, &uncommented);
    assert!(
        out.status.success(),
        "{env}, all set options together: {}",
        text(&out)
    );

    let words = exec_start(unit);
    assert!(
        words[0].ends_with(&format!(
            "/{}",
            program.file_name().unwrap().to_string_lossy()
        )),
        "{unit} starts {}, not {program:?}",
        words[0]
    );
    assert_eq!(words[1..1 + verb.len()], verb[..], "{unit}: the verb");
    let passed: BTreeSet<&str> = words[1 + verb.len()..]
        .iter()
        .map(|w| {
            w.strip_prefix("$OPT_")
                .unwrap_or_else(|| panic!("{unit}: ExecStart passes {w}; options belong in {env}"))
        })
        .collect();
    let set: BTreeSet<&str> = assignments
        .iter()
        .map(|a| a.name.strip_prefix("OPT_").unwrap())
        .collect();
    assert_eq!(
        passed, set,
        "{unit} must pass exactly the OPT_* variables of {env}"
    );
}

#[test]
fn scheduler_example_options_are_the_schedulers() {
    check_daemon_options(
        &binary("gantry-scheduler"),
        &[],
        "deploy/config/scheduler.env",
        "deploy/systemd/gantry-scheduler.service",
    );
}

#[test]
fn agent_example_options_are_the_agents() {
    check_daemon_options(
        &binary("gantry-agent"),
        &["run"],
        "deploy/config/agent.env",
        "deploy/systemd/gantry-agent.service",
    );
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let agent = read("deploy/systemd/gantry-agent.service");
    for directive in ["KillMode=process", "Delegate=yes", "EnvironmentFile="] {
        assert!(
            agent.lines().any(|l| l.starts_with(directive)),
            "gantry-agent.service needs {directive}"
        );
    }
    if !have("/usr/bin/systemd-analyze") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let units = [
        "deploy/systemd/gantry-scheduler.service",
        "deploy/systemd/gantry-agent.service",
        "deploy/etcd/etcd.service",
    ];
    let mut paths = Vec::new();
    for unit in units {
        // verify wants the programs to exist: point them at the ones just built.
        let mut contents = read(unit);
        for name in ["gantry-scheduler", "gantry-agent"] {
            let built = binary(name);
            contents =
                contents.replace(&format!("/usr/local/bin/{name}"), &built.to_string_lossy());
        }
        if !Path::new(ETCD_BIN).exists() {
            contents = contents.replace(ETCD_BIN, "/bin/true");
        }
        let path = dir.path().join(Path::new(unit).file_name().unwrap());
        std::fs::write(&path, contents).expect("writing a unit");
        paths.push(path);
    }
    let out = Command::new("/usr/bin/systemd-analyze")
        .arg("verify")
        .args(&paths)
        .output()
        .expect("running systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}",
        text(&out)
    );
}

/// Runs `gantry --config FILE get nodes` with a clean environment.
fn gantry_with_config(config: &Path) -> Output {
    let home = config.parent().unwrap();
    Command::new(env!("CARGO_BIN_EXE_gantry"))
        .args(["--config".as_ref(), config.as_os_str()])
        .args(["--timeout", "5s", "get", "nodes"])
        .env_remove("GANTRY_ADDR")
        .env_remove("GANTRY_CONFIG")
        .env_remove("XDG_CONFIG_HOME")
        .env("HOME", home)
        .env("NO_COLOR", "1")
        .output()
        .expect("running gantry")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

#[test]
fn cli_config_example_is_read_by_the_cli() {
    let example = read("deploy/config/cli.yaml");
    let dir = tempfile::tempdir().expect("temp dir");

    // As shipped: the file parses; the CA it names does not exist on this machine.
    let path = dir.path().join("as-shipped.yaml");
    std::fs::write(&path, &example).expect("writing the config");
    let out = gantry_with_config(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr.contains("cannot read the CA certificate /etc/gantry/pki/ca.pem"),
        "{}",
        text(&out)
    );

    // Every key uncommented, the PEM files real, the address a closed port: the loader and the
    // TLS set-up accept it all, and what fails is the connection.
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    std::fs::write(dir.path().join("ca.pem"), cert.pem()).expect("ca");
    std::fs::write(dir.path().join("cert.pem"), cert.pem()).expect("cert");
    std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).expect("key");
    let port = free_port();
    let mut keys = BTreeSet::new();
    let mut config = String::new();
    for line in example.lines() {
        let line = match line.strip_prefix('#') {
            Some(rest) if rest.split_once(':').is_some_and(|(k, _)| is_yaml_key(k)) => rest,
            _ => line,
        };
        let rewritten = match line.split_once(':') {
            Some((k, _)) if is_yaml_key(k) => {
                keys.insert(k.to_string());
                match k {
                    "address" => format!("address: https://127.0.0.1:{port}"),
                    "ca" => "ca: ca.pem".to_string(),
                    "cert" => "cert: cert.pem".to_string(),
                    "key" => "key: key.pem".to_string(),
                    _ => line.to_string(),
                }
            }
            _ => line.to_string(),
        };
        config.push_str(&rewritten);
        config.push('\n');
    }
    let expected: BTreeSet<String> = ["address", "ca", "cert", "key", "token"]
        .map(String::from)
        .into();
    assert_eq!(keys, expected, "deploy/config/cli.yaml documents every key");
    let path = dir.path().join("all-keys.yaml");
    std::fs::write(&path, &config).expect("writing the config");
    let out = gantry_with_config(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr.contains(&format!(
            "cannot reach the scheduler at https://127.0.0.1:{port}"
        )),
        "{config}\n{}",
        text(&out)
    );

    // The same check tells a misspelt key.
    let path = dir.path().join("misspelt.yaml");
    std::fs::write(&path, config.replace("address:", "adress:")).expect("writing the config");
    let out = gantry_with_config(&path);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not valid"),
        "{}",
        text(&out)
    );
}

fn is_yaml_key(key: &str) -> bool {
    !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase())
}

#[test]
fn readme_names_only_options_that_exist() {
    let mut known: BTreeSet<String> = ["--help", "--version"].map(String::from).into();
    all_flags(Path::new(env!("CARGO_BIN_EXE_gantry")), &[], &mut known);
    all_flags(&binary("gantry-scheduler"), &[], &mut known);
    let agent = binary("gantry-agent");
    for verb in ["run", "image", "ctr"] {
        all_flags(&agent, &[verb], &mut known);
    }
    let mut unknown = BTreeSet::new();
    for flag in long_flags(&read("README.md")) {
        if !known.contains(&flag) {
            unknown.insert(flag);
        }
    }
    // Options of cargo and systemctl, which the README shows too.
    for other in [
        "--now",
        "--check",
        "--all-targets",
        "--release",
        "--workspace",
        "--bins",
        "--test",
        "--locked",
    ] {
        unknown.remove(other);
    }
    assert!(
        unknown.is_empty(),
        "README.md names options no Gantry binary has: {unknown:?}"
    );
}

#[test]
fn readme_workload_examples_are_valid() {
    let readme = read("README.md");
    let mut examples = 0;
    let mut rest = readme.as_str();
    while let Some(start) = rest.find("```yaml\n") {
        let block = &rest[start + "```yaml\n".len()..];
        let end = block.find("```").expect("a closed code block");
        let yaml = &block[..end];
        if yaml.lines().any(|l| l.starts_with("kind:")) {
            if let Err(e) =
                gantry::workload::parse_and_validate(yaml, gantry::workload::Format::Yaml)
            {
                panic!("README.md workload example:\n{yaml}\n{e}");
            }
            examples += 1;
        }
        rest = &block[end + 3..];
    }
    assert!(examples > 0, "README.md has a workload example");
}

/// A member of the example etcd cluster, killed on drop.
struct Etcd {
    child: Child,
    client: String,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scheduler process, killed on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A plain HTTP GET on loopback: the status line and body, or why not.
fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The example etcd cluster (deploy/etcd/member-N.env, each address moved to a loopback port)
/// and a scheduler started with the example options of deploy/config/scheduler.env on it.
struct ExampleCluster {
    etcd: Vec<Etcd>,
    _scheduler: Daemon,
    api: String,
    dir: tempfile::TempDir,
}

impl ExampleCluster {
    /// `None` where etcd is missing and the test may skip (never under `CI=true`).
    fn start() -> Option<ExampleCluster> {
        if !have(ETCD_BIN) {
            return None;
        }
        let etcd_flags = {
            let out = run(Path::new(ETCD_BIN), &["--help".to_string()]);
            long_flags(&String::from_utf8_lossy(&out.stdout))
                .into_iter()
                .collect::<BTreeSet<_>>()
        };
        let members: Vec<Vec<Assignment>> = (1..=3)
            .map(|i| env_file(&format!("deploy/etcd/member-{i}.env")))
            .collect();

        // The example addresses, each moved to its own loopback port.
        let mut ports: BTreeMap<String, String> = BTreeMap::new();
        let mut moved = |url: &str, member: usize| -> String {
            let hostport = url.trim_start_matches("http://");
            // Each member's own 127.0.0.1 listener is distinct.
            let key = if hostport.starts_with("127.") {
                format!("{member}/{hostport}")
            } else {
                hostport.to_string()
            };
            let port = ports
                .entry(key)
                .or_insert_with(|| format!("127.0.0.1:{}", free_port()));
            format!("http://{port}")
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let mut advertised = BTreeSet::new();
        let mut cluster = Vec::new();
        for (i, member) in members.iter().enumerate() {
            let file = format!("deploy/etcd/member-{}.env", i + 1);
            let mut env = Vec::new();
            for a in member {
                let flag = a
                    .name
                    .strip_prefix("ETCD_")
                    .map(|f| format!("--{}", f.to_lowercase().replace('_', "-")))
                    .unwrap_or_else(|| panic!("{file}:{}: not an ETCD_* variable", a.line));
                assert!(
                    etcd_flags.contains(&flag),
                    "{file}:{}: etcd has no {flag}",
                    a.line
                );
                if a.commented {
                    continue;
                }
                let value = match a.name.as_str() {
                    "ETCD_DATA_DIR" => dir.path().join(format!("etcd-{i}")).display().to_string(),
                    "ETCD_INITIAL_CLUSTER" => a
                        .value
                        .split(',')
                        .map(|m| {
                            let (name, url) = m.split_once('=').expect("name=url");
                            format!("{name}={}", moved(url, i))
                        })
                        .collect::<Vec<_>>()
                        .join(","),
                    name if name.ends_with("_URLS") => {
                        if name == "ETCD_ADVERTISE_CLIENT_URLS" {
                            advertised.extend(a.value.split(',').map(str::to_string));
                        }
                        a.value
                            .split(',')
                            .map(|u| moved(u, i))
                            .collect::<Vec<_>>()
                            .join(",")
                    }
                    _ => a.value.clone(),
                };
                env.push((a.name.clone(), value));
            }
            let client = env
                .iter()
                .find(|(k, _)| k == "ETCD_ADVERTISE_CLIENT_URLS")
                .map(|(_, v)| v.clone())
                .expect("an advertised client URL");
            let log = std::fs::File::create(dir.path().join(format!("etcd-{i}.log"))).expect("log");
            let child = Command::new(ETCD_BIN)
                .env_clear()
                .envs(env)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("starting etcd");
            cluster.push(Etcd { child, client });
        }
        for member in &cluster {
            let addr = member.client.trim_start_matches("http://").to_string();
            wait_until("the etcd cluster is healthy", || {
                http_get(&addr, "/health").is_ok_and(|a| a.contains(r#""health":"true""#))
            });
        }
        for i in 0..3 {
            let log = std::fs::read_to_string(dir.path().join(format!("etcd-{i}.log"))).unwrap();
            assert!(
                !log.contains("unrecognized environment variable"),
                "member-{}.env: {log}",
                i + 1
            );
        }

        // The scheduler with its example options, its --etcd being the members' client URLs.
        let mut args = Vec::new();
        for a in env_file("deploy/config/scheduler.env") {
            if a.commented {
                continue;
            }
            for word in a.value.split_whitespace() {
                if let Some(urls) = word.strip_prefix("--etcd=") {
                    let named: BTreeSet<String> = urls.split(',').map(str::to_string).collect();
                    assert_eq!(
                        named, advertised,
                        "scheduler.env's --etcd names the members of deploy/etcd"
                    );
                    let urls: Vec<String> = urls.split(',').map(|u| moved(u, 0)).collect();
                    args.push(format!("--etcd={}", urls.join(",")));
                } else if word.starts_with("--listen") || word.starts_with("--metrics-listen") {
                    // Replaced below: the example listens on every address.
                } else {
                    args.push(word.to_string());
                }
            }
        }
        let api = format!("127.0.0.1:{}", free_port());
        let metrics = format!("127.0.0.1:{}", free_port());
        args.extend([
            format!("--listen={api}"),
            format!("--metrics-listen={metrics}"),
        ]);
        args.push(format!(
            "--data-dir={}",
            dir.path().join("scheduler").display()
        ));
        let log = std::fs::File::create(dir.path().join("scheduler.log")).expect("log");
        let scheduler = Daemon(
            Command::new(binary("gantry-scheduler"))
                .args(&args)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("starting gantry-scheduler"),
        );
        wait_until("the scheduler is ready", || {
            http_get(&metrics, "/readyz").is_ok_and(|a| a.starts_with("HTTP/1.1 200"))
        });

        Some(ExampleCluster {
            etcd: cluster,
            _scheduler: scheduler,
            api,
            dir,
        })
    }

    /// Runs `gantry` against the scheduler.
    fn gantry(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_gantry"))
            .args(["--addr", &format!("http://{}", self.api)])
            .args(args)
            .env_remove("GANTRY_CONFIG")
            .env("HOME", self.dir.path())
            .output()
            .expect("running gantry")
    }

    fn scheduler_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("scheduler.log")).unwrap_or_default()
    }

    /// Applies a one-replica Service `web` (it stays pending: the cluster has no nodes).
    fn apply_web(&self) {
        let spec = self.dir.path().join("web.yaml");
        std::fs::write(&spec, "kind: Service\nname: web\nimage: busybox\n").expect("spec");
        let out = self.gantry(&["apply", "-f", &spec.to_string_lossy()]);
        assert!(
            out.status.success(),
            "{}\n{}",
            text(&out),
            self.scheduler_log()
        );
    }
}

#[test]
fn etcd_example_cluster_serves_a_scheduler_with_the_example_options() {
    let Some(cluster) = ExampleCluster::start() else {
        return;
    };
    cluster.apply_web();
    let out = cluster.gantry(&["get", "workloads", "web", "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out));
    let workload: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(workload["name"], "web", "{workload}");
    let out = cluster.gantry(&["delete", "workload", "web"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out),
        cluster.scheduler_log()
    );
}

/// With one of three members down, etcd keeps a quorum; the scheduler should keep answering.
#[test]
fn scheduler_answers_with_one_etcd_member_down() {
    let Some(mut cluster) = ExampleCluster::start() else {
        return;
    };
    cluster.apply_web();
    drop(cluster.etcd.remove(0));
    // Once the dead member is noticed (the store probes members every 500 ms), every call
    // succeeds.
    std::thread::sleep(Duration::from_secs(2));
    for _ in 0..20 {
        let out = cluster.gantry(&["get", "workloads", "web", "-o", "json"]);
        assert!(out.status.success(), "{}", text(&out));
    }
}
