//! The CNI protocol as the agent speaks it, observed from the plugin side: scripted plugins record
//! the environment and stdin of every call, so the tests check what the spec requires (variables,
//! injected name/version/runtimeConfig/prevResult, DEL in reverse with the cached result, CHECK),
//! how errors and timeouts come back, and that the cache drives DEL after a restart. The real
//! plugins are exercised in tests/network.rs; no root is needed here.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gantry_agent::network::cni::{
    Cni, CniError, Command, ConfList, PortMapping, Protocol, RuntimeConf, port_mappings_arg,
};
use serde_json::{Value, json};

/// A plugin that logs each call to `log/<seq>-<name>` (environment, then `STDIN=` and the JSON)
/// and behaves by its name: `fail` answers a spec error object, `stderr` only complains on stderr,
/// `slow` hangs, the others succeed with a result naming themselves.
const PLUGIN: &str = r#"#!/bin/sh
dir=$(dirname "$0"); name=$(basename "$0")
input=$(cat)
mkdir -p "$dir/log"
seq=$(ls "$dir/log" | wc -l)
{
  echo "CNI_COMMAND=$CNI_COMMAND"
  echo "CNI_CONTAINERID=$CNI_CONTAINERID"
  echo "CNI_NETNS=$CNI_NETNS"
  echo "CNI_IFNAME=$CNI_IFNAME"
  echo "CNI_ARGS=$CNI_ARGS"
  echo "CNI_PATH=$CNI_PATH"
  echo "STDIN=$input"
} > "$dir/log/$(printf %03d "$seq")-$name"
case "$name" in
  fail) echo '{"cniVersion":"1.0.0","code":11,"msg":"try again later","details":"the pool is busy"}'; exit 1 ;;
  stderr) echo "something broke" >&2; exit 2 ;;
  slow) exec sleep 30 ;;
esac
case "$CNI_COMMAND" in
  ADD) echo '{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"'"$CNI_NETNS"'"}],"ips":[{"address":"10.9.0.5/24","gateway":"10.9.0.1","interface":0}],"dns":{"domain":"'"$name"'"}}' ;;
  VERSION) echo '{"cniVersion":"1.0.0","supportedVersions":["0.4.0","1.0.0"]}' ;;
esac
"#;

/// A logged plugin call.
#[derive(Debug)]
struct Call {
    plugin: String,
    env: Vec<(String, String)>,
    stdin: Value,
}

impl Call {
    fn var(&self, name: &str) -> &str {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("{name} not logged"))
    }
}

struct Plugins {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    cache: PathBuf,
}

impl Plugins {
    fn new(names: &[&str]) -> Plugins {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("plugins");
        std::fs::create_dir_all(&dir).unwrap();
        for name in names {
            let path = dir.join(name);
            std::fs::write(&path, PLUGIN).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let cache = tmp.path().join("cache");
        Plugins {
            _tmp: tmp,
            dir,
            cache,
        }
    }

    fn cni(&self, timeout: Duration) -> Cni {
        Cni::new(
            vec![self.dir.join("empty-first"), self.dir.clone()],
            self.cache.clone(),
            timeout,
        )
    }

    /// Calls logged so far, in order, then forgotten.
    fn take_calls(&self) -> Vec<Call> {
        let log = self.dir.join("log");
        let mut names: Vec<_> = match std::fs::read_dir(&log) {
            Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
            Err(_) => return Vec::new(),
        };
        names.sort();
        let calls = names
            .iter()
            .map(|path| {
                let text = std::fs::read_to_string(path).unwrap();
                let (env, stdin) = text.split_once("STDIN=").unwrap();
                let env = env
                    .lines()
                    .map(|l| {
                        let (k, v) = l.split_once('=').unwrap();
                        (k.to_owned(), v.to_owned())
                    })
                    .collect();
                let file = path.file_name().unwrap().to_str().unwrap();
                Call {
                    plugin: file[4..].to_owned(),
                    env,
                    stdin: serde_json::from_str(stdin.trim()).unwrap(),
                }
            })
            .collect();
        std::fs::remove_dir_all(&log).unwrap();
        calls
    }
}

fn conflist(plugins: Value) -> ConfList {
    ConfList::from_value(
        json!({"cniVersion": "1.0.0", "name": "testnet", "plugins": plugins}),
        "test",
    )
    .unwrap()
}

fn runtime(netns: &Path) -> RuntimeConf {
    RuntimeConf {
        container_id: "c1".into(),
        netns: Some(netns.to_owned()),
        ifname: "eth0".into(),
        args: vec![
            ("IgnoreUnknown".into(), "1".into()),
            ("K".into(), "V".into()),
        ],
        capability_args: port_mappings_arg(&[PortMapping {
            host_port: 8080,
            container_port: 80,
            protocol: Protocol::Tcp,
            host_ip: None,
        }]),
    }
}

#[tokio::test]
async fn add_check_del_follow_the_spec() {
    let p = Plugins::new(&["first", "second"]);
    let cni = p.cni(Duration::from_secs(10));
    let list = conflist(json!([
        {"type": "first", "opt": 1},
        {"type": "second", "capabilities": {"portMappings": true}},
    ]));
    let rt = runtime(Path::new("/run/test/netns/c1"));

    let result = cni.add(&list, &rt).await.unwrap();
    assert_eq!(result.ips[0].address.to_string(), "10.9.0.5/24");
    assert_eq!(result.dns.domain.as_deref(), Some("second"));
    let calls = p.take_calls();
    assert_eq!(calls.len(), 2);
    let dirs = format!(
        "{}:{}",
        p.dir.join("empty-first").display(),
        p.dir.display()
    );
    for call in &calls {
        assert_eq!(call.var("CNI_COMMAND"), "ADD");
        assert_eq!(call.var("CNI_CONTAINERID"), "c1");
        assert_eq!(call.var("CNI_NETNS"), "/run/test/netns/c1");
        assert_eq!(call.var("CNI_IFNAME"), "eth0");
        assert_eq!(call.var("CNI_ARGS"), "IgnoreUnknown=1;K=V");
        assert_eq!(call.var("CNI_PATH"), dirs);
        assert_eq!(call.stdin["name"], "testnet");
        assert_eq!(call.stdin["cniVersion"], "1.0.0");
    }
    assert_eq!(calls[0].plugin, "first");
    assert_eq!(calls[0].stdin["opt"], 1);
    assert!(calls[0].stdin.get("prevResult").is_none());
    assert!(calls[0].stdin.get("runtimeConfig").is_none());
    assert_eq!(calls[1].plugin, "second");
    assert_eq!(calls[1].stdin["prevResult"]["dns"]["domain"], "first");
    assert_eq!(
        calls[1].stdin["runtimeConfig"]["portMappings"][0]["hostPort"],
        8080
    );

    cni.check(&list, &rt).await.unwrap();
    let calls = p.take_calls();
    let order: Vec<_> = calls.iter().map(|c| c.plugin.as_str()).collect();
    assert_eq!(order, ["first", "second"]);
    for call in &calls {
        assert_eq!(call.var("CNI_COMMAND"), "CHECK");
        assert_eq!(call.stdin["prevResult"]["dns"]["domain"], "second");
    }

    cni.del(&list, &rt).await.unwrap();
    let calls = p.take_calls();
    let order: Vec<_> = calls.iter().map(|c| c.plugin.as_str()).collect();
    assert_eq!(order, ["second", "first"], "DEL runs in reverse");
    for call in &calls {
        assert_eq!(call.var("CNI_COMMAND"), "DEL");
        assert_eq!(call.var("CNI_ARGS"), "IgnoreUnknown=1;K=V");
        assert_eq!(call.stdin["prevResult"]["dns"]["domain"], "second");
    }
    assert_eq!(
        calls[0].stdin["runtimeConfig"]["portMappings"][0]["containerPort"],
        80
    );
    assert!(cni.cached("testnet", "c1", "eth0").await.unwrap().is_none());

    // A second DEL has no cache: the plugins still get it, without a result.
    let gone = RuntimeConf {
        netns: None,
        ..rt.clone()
    };
    cni.del(&list, &gone).await.unwrap();
    let calls = p.take_calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].var("CNI_NETNS"), "");
    assert!(calls[0].stdin.get("prevResult").is_none());

    // CHECK without an ADD says so.
    assert!(matches!(
        cni.check(&list, &rt).await,
        Err(CniError::NotAdded { .. })
    ));
}

#[tokio::test]
async fn del_after_a_restart_runs_the_cached_chain() {
    let p = Plugins::new(&["first", "second"]);
    let list = conflist(json!([{"type": "first"}, {"type": "second"}]));
    let rt = runtime(Path::new("/run/test/netns/c1"));
    p.cni(Duration::from_secs(10))
        .add(&list, &rt)
        .await
        .unwrap();
    p.take_calls();

    // A new driver (the agent restarted) with a conflist that has changed since.
    let changed = conflist(json!([{"type": "first"}]));
    let cni = p.cni(Duration::from_secs(10));
    let record = cni.cached("testnet", "c1", "eth0").await.unwrap().unwrap();
    assert!(record.complete);
    assert_eq!(record.plugins_added, 2);
    cni.del(&changed, &rt).await.unwrap();
    let order: Vec<_> = p.take_calls().into_iter().map(|c| c.plugin).collect();
    assert_eq!(order, ["second", "first"]);
}

#[tokio::test]
async fn a_plugin_error_object_is_surfaced_and_only_started_plugins_are_deleted() {
    let p = Plugins::new(&["first", "fail", "second"]);
    let cni = p.cni(Duration::from_secs(10));
    let list = conflist(json!([{"type": "first"}, {"type": "fail"}, {"type": "second"}]));
    let rt = runtime(Path::new("/run/test/netns/c1"));
    let err = cni.add(&list, &rt).await.unwrap_err();
    match &err {
        CniError::Plugin {
            plugin,
            command,
            code,
            msg,
            details,
        } => {
            assert_eq!(plugin, "fail");
            assert_eq!(*command, Command::Add);
            assert_eq!(*code, 11);
            assert_eq!(msg, "try again later");
            assert_eq!(details, "the pool is busy");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().contains("try again later"), "{err}");
    let order: Vec<_> = p.take_calls().into_iter().map(|c| c.plugin).collect();
    assert_eq!(order, ["first", "fail"], "the chain stops at the failure");

    let record = cni.cached("testnet", "c1", "eth0").await.unwrap().unwrap();
    assert!(!record.complete);
    assert_eq!(record.plugins_added, 2);
    assert_eq!(record.result.unwrap()["dns"]["domain"], "first");
    // DEL undoes what started (the failing plugin included), not "second", and keeps the
    // record while a DEL fails.
    assert!(cni.del(&list, &rt).await.is_err());
    let order: Vec<_> = p.take_calls().into_iter().map(|c| c.plugin).collect();
    assert_eq!(order, ["fail", "first"]);
    assert!(cni.cached("testnet", "c1", "eth0").await.unwrap().is_some());
}

#[tokio::test]
async fn a_missing_plugin_is_named_and_needs_no_del() {
    let p = Plugins::new(&["first"]);
    let cni = p.cni(Duration::from_secs(10));
    let list = conflist(json!([{"type": "first"}, {"type": "nowhere"}]));
    let rt = runtime(Path::new("/run/test/netns/c1"));
    let err = cni.add(&list, &rt).await.unwrap_err();
    assert!(
        matches!(&err, CniError::PluginNotFound { plugin, .. } if plugin == "nowhere"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("\"nowhere\" not found in"),
        "{err}"
    );
    p.take_calls();
    cni.del(&list, &rt).await.unwrap();
    let order: Vec<_> = p.take_calls().into_iter().map(|c| c.plugin).collect();
    assert_eq!(order, ["first"]);
    assert!(cni.cached("testnet", "c1", "eth0").await.unwrap().is_none());
}

#[tokio::test]
async fn stderr_stands_in_for_a_missing_error_object() {
    let p = Plugins::new(&["stderr"]);
    let cni = p.cni(Duration::from_secs(10));
    let list = conflist(json!([{"type": "stderr"}]));
    let err = cni.add(&list, &runtime(Path::new("/x"))).await.unwrap_err();
    assert!(
        matches!(&err, CniError::Plugin { msg, code: 0, .. } if msg == "something broke"),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_hung_plugin_times_out() {
    let p = Plugins::new(&["slow"]);
    let cni = p.cni(Duration::from_millis(300));
    let list = conflist(json!([{"type": "slow"}]));
    let started = Instant::now();
    let err = cni.add(&list, &runtime(Path::new("/x"))).await.unwrap_err();
    assert!(
        matches!(&err, CniError::Timeout { plugin, command: Command::Add, .. } if plugin == "slow"),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn version_and_validate() {
    let p = Plugins::new(&["first"]);
    let cni = p.cni(Duration::from_secs(10));
    let info = cni.version("first").await.unwrap();
    assert_eq!(info.supported_versions, ["0.4.0", "1.0.0"]);
    let call = p.take_calls().pop().unwrap();
    assert_eq!(call.var("CNI_COMMAND"), "VERSION");
    assert_eq!(call.stdin["cniVersion"], "1.0.0");

    cni.validate(&conflist(json!([{"type": "first"}])))
        .await
        .unwrap();
    let old = ConfList::from_value(
        json!({"cniVersion": "0.3.1", "name": "n", "plugins": [{"type": "first"}]}),
        "t",
    )
    .unwrap();
    assert!(matches!(
        cni.validate(&old).await,
        Err(CniError::UnsupportedByPlugin { .. })
    ));
    assert!(matches!(
        cni.validate(&conflist(json!([{"type": "absent"}]))).await,
        Err(CniError::PluginNotFound { .. })
    ));
}
