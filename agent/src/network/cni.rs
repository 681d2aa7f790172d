//! CNI, the Container Network Interface, spoken directly: network configuration lists, running
//! their plugins per the CNI spec (ADD, CHECK, DEL and VERSION for spec versions 0.3.x, 0.4.0 and
//! 1.0.0), typed results and errors, and a per-container cache of what ADD did — the conflist, the
//! runtime arguments and the result — so DEL and CHECK work after an agent restart (libcni keeps
//! the same cache under /var/lib/cni/results).
//!
//! Plugins are executables found by their `type` in the plugin directories. Each call gets the
//! environment the spec defines (`CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`,
//! `CNI_ARGS`, `CNI_PATH`) and on stdin its own configuration with `name`, `cniVersion`,
//! `runtimeConfig` (the capabilities it declares, such as `portMappings`) and `prevResult`.

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::io::AsyncWriteExt;
use tracing::{debug, warn};

/// Spec versions this code speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// The version sent with VERSION: the newest this code speaks.
const NEWEST_VERSION: &str = "1.0.0";

/// Marks the cache format, so a future format can tell old records apart.
const CACHE_KIND: &str = "gantryCniCacheV1";

/// The standard plugins race with one another when two of them create a shared iptables chain or
/// bridge for the first time ("Chain already exists"). A chain that may create shared objects
/// therefore runs alone (write lock): the first ADD of a network in this process (it makes the
/// bridge), a chain with the firewall plugin (it makes CNI-FORWARD and CNI-ADMIN on every ADD),
/// and a chain publishing ports (portmap makes its CNI-HOSTPORT chains). Every other chain of a
/// network already set up only makes objects of its own container (a veth, an address from
/// host-local, which locks its own store) and runs concurrently with the others (read lock), as
/// container runtimes run pod networking concurrently.
static CHAIN_LOCK: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Networks that completed an ADD in this process (by their whole configuration, so that two
/// networks of one name on different bridges count apart): their bridge exists.
static SET_UP: std::sync::Mutex<BTreeSet<String>> = std::sync::Mutex::new(BTreeSet::new());

/// Whether a plugin of type `plugin_type` would do nothing for a call with `capability_args`,
/// and is skipped: portmap without port mappings passes the previous result through on ADD
/// (it creates nothing), so its DEL has nothing to remove either. A plugin process is ~5 ms.
fn has_nothing_to_do(plugin_type: &str, capability_args: &Map<String, Value>) -> bool {
    plugin_type == "portmap"
        && capability_args
            .get("portMappings")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
}

/// A held [`CHAIN_LOCK`], shared or exclusive.
#[allow(dead_code)] // held for its drop
enum ChainGuard {
    Shared(tokio::sync::RwLockReadGuard<'static, ()>),
    Alone(tokio::sync::RwLockWriteGuard<'static, ()>),
}

/// Takes [`CHAIN_LOCK`] as a chain of `list` with `capability_args` needs it.
async fn lock_chain(list: &ConfList, capability_args: &Map<String, Value>) -> ChainGuard {
    let set_up = SET_UP
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .contains(&list.to_value().to_string());
    let firewall = list.plugins.iter().any(|p| p.plugin_type == "firewall");
    let ports = capability_args
        .get("portMappings")
        .and_then(Value::as_array)
        .is_some_and(|m| !m.is_empty());
    if set_up && !firewall && !ports {
        ChainGuard::Shared(CHAIN_LOCK.read().await)
    } else {
        ChainGuard::Alone(CHAIN_LOCK.write().await)
    }
}

/// A CNI operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach a container to the network.
    Add,
    /// Detach it and release what ADD took.
    Del,
    /// Verify that an attachment is still as ADD left it.
    Check,
    /// Ask a plugin which spec versions it speaks.
    Version,
}

impl Command {
    /// The value of `CNI_COMMAND`.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What can go wrong talking CNI.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// A configuration file could not be read.
    #[error("cannot read network configuration {path}")]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A configuration is not a valid conflist.
    #[error("invalid network configuration {origin}: {reason}")]
    InvalidConfig {
        /// Where it came from (a path, or a description).
        origin: String,
        /// What is wrong.
        reason: String,
    },
    /// A name used in file names (container id, interface name) is unusable.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        /// Which name ("container id", "interface name").
        what: &'static str,
        /// The value.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// No plugin directory holds the plugin.
    #[error("cni plugin {plugin:?} not found in {}", display_dirs(.dirs))]
    PluginNotFound {
        /// The plugin type.
        plugin: String,
        /// The directories searched.
        dirs: Vec<PathBuf>,
    },
    /// The plugin could not be started or talked to.
    #[error("cannot run cni plugin {plugin} ({path}) for {command}")]
    Exec {
        /// The plugin type.
        plugin: String,
        /// Its executable.
        path: PathBuf,
        /// The operation.
        command: Command,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The plugin did not finish in time and was killed.
    #[error("cni plugin {plugin} {command} timed out after {timeout:?}")]
    Timeout {
        /// The plugin type.
        plugin: String,
        /// The operation.
        command: Command,
        /// The limit.
        timeout: Duration,
    },
    /// The plugin failed and said why (the spec's error object, or its stderr).
    #[error("cni plugin {plugin} {command} failed: {msg} (code {code}){}", display_details(.details))]
    Plugin {
        /// The plugin type.
        plugin: String,
        /// The operation.
        command: Command,
        /// The spec's error code (1–99 are the spec's, 100+ the plugin's; 0 when none was given).
        code: u32,
        /// The plugin's message.
        msg: String,
        /// The plugin's details, if any.
        details: String,
    },
    /// The plugin succeeded but its output is not a result.
    #[error("cni plugin {plugin} {command} returned an invalid result: {reason}")]
    InvalidResult {
        /// The plugin type.
        plugin: String,
        /// The operation.
        command: Command,
        /// What is wrong.
        reason: String,
    },
    /// A plugin does not speak the network's spec version.
    #[error("cni plugin {plugin} does not support version {version} (it supports {})", .supported.join(", "))]
    UnsupportedByPlugin {
        /// The plugin type.
        plugin: String,
        /// The network's version.
        version: String,
        /// What the plugin speaks.
        supported: Vec<String>,
    },
    /// The network's spec version has no CHECK (before 0.4.0).
    #[error("network {network} uses cni {version}, which has no CHECK")]
    CheckUnsupported {
        /// The network name.
        network: String,
        /// Its version.
        version: String,
    },
    /// CHECK needs the result of an ADD, and there is none.
    #[error("network {network} has no completed ADD for container {container} ({ifname})")]
    NotAdded {
        /// The network name.
        network: String,
        /// The container id.
        container: String,
        /// The interface name.
        ifname: String,
    },
    /// The cache could not be read or written.
    #[error("cni cache {path}")]
    Cache {
        /// The cache file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A cache file does not hold a record.
    #[error("cni cache {path} is corrupt")]
    CacheCorrupt {
        /// The cache file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

fn display_dirs(dirs: &[PathBuf]) -> String {
    let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    dirs.join(":")
}

fn display_details(details: &str) -> String {
    if details.is_empty() {
        String::new()
    } else {
        format!(": {details}")
    }
}

/// A network configuration list: a named network and the chain of plugins that build it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfList {
    /// Spec version every plugin is called with.
    pub cni_version: String,
    /// Network name (plugins use it, for example, to name their host-local store and rules).
    pub name: String,
    /// Whether CHECK is disabled for this network.
    pub disable_check: bool,
    /// The plugins, in ADD order.
    pub plugins: Vec<PluginConf>,
}

/// One plugin of a conflist.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConf {
    /// The plugin's `type`: the executable's name.
    pub plugin_type: String,
    /// The plugin's whole configuration object, passed on to it.
    pub raw: Map<String, Value>,
}

impl PluginConf {
    /// The capabilities the plugin declares (`"capabilities": {"portMappings": true}`).
    pub fn capabilities(&self) -> impl Iterator<Item = &str> {
        self.raw
            .get("capabilities")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter(|(_, on)| on.as_bool() == Some(true))
            .map(|(name, _)| name.as_str())
    }
}

impl ConfList {
    /// Reads a conflist (or a single-plugin `.conf`, treated as a list of one) from a file.
    pub async fn load(path: &Path) -> Result<ConfList, CniError> {
        let bytes = tokio::fs::read(path)
            .await
            .map_err(|source| CniError::ReadConfig {
                path: path.to_owned(),
                source,
            })?;
        ConfList::from_slice(&bytes, &path.display().to_string())
    }

    /// Parses a conflist from JSON bytes; `origin` names it in errors.
    pub fn from_slice(bytes: &[u8], origin: &str) -> Result<ConfList, CniError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| CniError::InvalidConfig {
            origin: origin.to_owned(),
            reason: e.to_string(),
        })?;
        ConfList::from_value(value, origin)
    }

    /// Builds a conflist from JSON; `origin` names it in errors.
    pub fn from_value(value: Value, origin: &str) -> Result<ConfList, CniError> {
        let invalid = |reason: String| CniError::InvalidConfig {
            origin: origin.to_owned(),
            reason,
        };
        let Value::Object(mut top) = value else {
            return Err(invalid("not a JSON object".into()));
        };
        let cni_version = match top.get("cniVersion") {
            Some(Value::String(v)) => v.clone(),
            _ => return Err(invalid("cniVersion is missing or not a string".into())),
        };
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(invalid(format!(
                "cniVersion {cni_version} is not supported (supported: {})",
                SUPPORTED_VERSIONS.join(", ")
            )));
        }
        let name = match top.get("name") {
            Some(Value::String(n)) => n.clone(),
            _ => return Err(invalid("name is missing or not a string".into())),
        };
        check_name("network name", &name).map_err(|e| invalid(e.to_string()))?;
        let disable_check = top
            .get("disableCheck")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let raw_plugins = match top.remove("plugins") {
            Some(Value::Array(plugins)) => plugins,
            Some(_) => return Err(invalid("plugins is not a list".into())),
            // A single-plugin `.conf`: the object itself is the plugin.
            None if top.contains_key("type") => vec![Value::Object(top)],
            None => return Err(invalid("plugins is missing".into())),
        };
        if raw_plugins.is_empty() {
            return Err(invalid("plugins is empty".into()));
        }
        let mut plugins = Vec::with_capacity(raw_plugins.len());
        for (i, plugin) in raw_plugins.into_iter().enumerate() {
            let Value::Object(raw) = plugin else {
                return Err(invalid(format!("plugins[{i}] is not an object")));
            };
            let plugin_type = match raw.get("type") {
                Some(Value::String(t)) => t.clone(),
                _ => return Err(invalid(format!("plugins[{i}].type is missing"))),
            };
            check_name("plugin type", &plugin_type).map_err(|e| invalid(e.to_string()))?;
            plugins.push(PluginConf { plugin_type, raw });
        }
        Ok(ConfList {
            cni_version,
            name,
            disable_check,
            plugins,
        })
    }

    /// The conflist as JSON, as stored in the cache.
    pub fn to_value(&self) -> Value {
        json!({
            "cniVersion": self.cni_version,
            "name": self.name,
            "disableCheck": self.disable_check,
            "plugins": self.plugins.iter().map(|p| Value::Object(p.raw.clone())).collect::<Vec<_>>(),
        })
    }

    /// The stdin of one plugin call: the plugin's own configuration with the network's name and
    /// version, the runtime arguments it declared a capability for, and the previous result.
    pub fn plugin_config(
        &self,
        plugin: &PluginConf,
        capability_args: &Map<String, Value>,
        prev_result: Option<&Value>,
    ) -> Value {
        let mut conf = plugin.raw.clone();
        conf.insert("name".into(), Value::String(self.name.clone()));
        conf.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        let mut runtime = match conf.remove("runtimeConfig") {
            Some(Value::Object(existing)) => existing,
            _ => Map::new(),
        };
        for cap in plugin.capabilities() {
            if let Some(arg) = capability_args.get(cap) {
                runtime.insert(cap.to_owned(), arg.clone());
            }
        }
        if !runtime.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(runtime));
        }
        if let Some(prev) = prev_result {
            conf.insert("prevResult".into(), prev.clone());
        }
        Value::Object(conf)
    }

    /// Whether the network's version is at least `major.minor.patch` given as a string.
    fn version_at_least(&self, other: &str) -> bool {
        parse_version(&self.cni_version) >= parse_version(other)
    }
}

fn parse_version(v: &str) -> (u32, u32, u32) {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

/// Accepts names that are safe as file name parts and plugin names: ASCII letters, digits, `-`,
/// `_` and `.`, not starting with `.` or `-`, at most 128 bytes.
fn check_name(what: &'static str, value: &str) -> Result<(), CniError> {
    let invalid = |reason| CniError::InvalidName {
        what,
        value: value.to_owned(),
        reason,
    };
    if value.is_empty() {
        return Err(invalid("empty"));
    }
    if value.len() > 128 {
        return Err(invalid("longer than 128 bytes"));
    }
    if value.starts_with('.') || value.starts_with('-') {
        return Err(invalid("starts with '.' or '-'"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(invalid(
            "only letters, digits, '-', '_' and '.' are allowed",
        ));
    }
    Ok(())
}

/// Checks a container id for use as a file name and as `CNI_CONTAINERID`.
pub fn check_container_id(id: &str) -> Result<(), CniError> {
    check_name("container id", id)
}

/// Checks an interface name: what Linux accepts (1–15 bytes, no `/`, `:` or whitespace).
pub fn check_ifname(name: &str) -> Result<(), CniError> {
    let invalid = |reason| CniError::InvalidName {
        what: "interface name",
        value: name.to_owned(),
        reason,
    };
    if name.is_empty() || name.len() > 15 {
        return Err(invalid("must be 1 to 15 bytes"));
    }
    if name == "." || name == ".." {
        return Err(invalid("reserved"));
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || !b.is_ascii_graphic())
    {
        return Err(invalid("contains '/', ':', whitespace or a non-ASCII byte"));
    }
    Ok(())
}

/// The transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

/// A published port, in the `portMappings` capability format of the portmap plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    /// Port on the node.
    pub host_port: u16,
    /// Port inside the container.
    pub container_port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// Node address to publish on; all of them when `None`.
    #[serde(rename = "hostIP", default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<IpAddr>,
}

/// The runtime side of a plugin call: which container, namespace and interface, and the
/// arguments passed through `CNI_ARGS` and `runtimeConfig`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RuntimeConf {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`; `None` for a DEL whose namespace is already gone.
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`: the interface to create inside the namespace.
    pub ifname: String,
    /// `CNI_ARGS`, as `key=value` pairs.
    pub args: Vec<(String, String)>,
    /// Capability arguments by capability name (`portMappings`), given to plugins declaring them.
    pub capability_args: Map<String, Value>,
}

/// The result of ADD (the spec's "Success" object), 0.3.x/0.4.0 and 1.0.0 alike.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    /// Version of the result.
    #[serde(default)]
    pub cni_version: String,
    /// Interfaces created or used, on the host and in the container.
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    /// Addresses assigned.
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    /// Routes added in the container.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// DNS settings the network suggests.
    #[serde(default)]
    pub dns: Dns,
}

/// An interface in a result.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    /// Interface name.
    pub name: String,
    /// Hardware address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// MTU (1.0.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Network namespace path for a container interface; absent or empty on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

impl Interface {
    /// Whether the interface is inside a container's namespace.
    pub fn in_container(&self) -> bool {
        self.sandbox.as_deref().is_some_and(|s| !s.is_empty())
    }
}

/// An address in a result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    /// The address with its prefix length (`10.88.1.5/24`).
    pub address: IpNet,
    /// The gateway, if the network has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into the result's interfaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// A route in a result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Route {
    /// Destination.
    pub dst: IpNet,
    /// Next hop; the network's gateway when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

/// DNS settings in a result.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Dns {
    /// Name servers.
    #[serde(default)]
    pub nameservers: Vec<String>,
    /// Local domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Search domains.
    #[serde(default)]
    pub search: Vec<String>,
    /// Resolver options.
    #[serde(default)]
    pub options: Vec<String>,
}

impl CniResult {
    /// Parses a result object.
    pub fn from_value(value: &Value) -> Result<CniResult, serde_json::Error> {
        CniResult::deserialize(value)
    }
}

/// What a plugin answers to VERSION.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    /// Version of the answer.
    #[serde(default)]
    pub cni_version: String,
    /// Spec versions the plugin speaks.
    #[serde(default)]
    pub supported_versions: Vec<String>,
}

/// The spec's error object.
#[derive(Deserialize)]
struct PluginErrorObject {
    #[serde(default)]
    code: u32,
    #[serde(default)]
    msg: String,
    #[serde(default)]
    details: String,
}

/// What the cache keeps per (network, container, interface): everything a later DEL or CHECK
/// needs, written before ADD starts and updated as it goes, so even an ADD interrupted by a crash
/// can be undone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheRecord {
    /// Format marker.
    pub kind: String,
    /// Container id.
    pub container_id: String,
    /// Network name.
    pub network_name: String,
    /// Interface name.
    pub if_name: String,
    /// Namespace path given to ADD.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// `CNI_ARGS` given to ADD.
    #[serde(default)]
    pub cni_args: Vec<(String, String)>,
    /// Capability arguments given to ADD.
    #[serde(default)]
    pub capability_args: Map<String, Value>,
    /// The conflist ADD ran, so DEL runs the same plugins even if the file changed since.
    pub config: Value,
    /// How many plugins ADD started (from the first): DEL undoes exactly those.
    pub plugins_added: usize,
    /// The result of the last plugin that succeeded; the final result once ADD completed.
    #[serde(default)]
    pub result: Option<Value>,
    /// Whether the whole chain succeeded.
    #[serde(default)]
    pub complete: bool,
}

/// Runs CNI plugins, with their directories, a per-call time limit and the result cache.
#[derive(Debug, Clone)]
pub struct Cni {
    plugin_dirs: Vec<PathBuf>,
    cache_dir: PathBuf,
    timeout: Duration,
}

impl Cni {
    /// A CNI driver looking up plugins in `plugin_dirs` (also passed to them as `CNI_PATH`),
    /// caching under `cache_dir` (`<cache_dir>/results/…`), killing plugin calls after `timeout`.
    pub fn new(plugin_dirs: Vec<PathBuf>, cache_dir: PathBuf, timeout: Duration) -> Cni {
        Cni {
            plugin_dirs,
            cache_dir,
            timeout,
        }
    }

    /// The plugin directories.
    pub fn plugin_dirs(&self) -> &[PathBuf] {
        &self.plugin_dirs
    }

    /// ADD: runs the chain in order, each plugin getting the previous one's result, and caches
    /// the final result. On failure the cache keeps what is needed to DEL the plugins that ran;
    /// the caller should DEL (the spec asks runtimes to).
    pub async fn add(&self, list: &ConfList, rt: &RuntimeConf) -> Result<CniResult, CniError> {
        check_container_id(&rt.container_id)?;
        check_ifname(&rt.ifname)?;
        let _chain = lock_chain(list, &rt.capability_args).await;
        let mut record = CacheRecord {
            kind: CACHE_KIND.into(),
            container_id: rt.container_id.clone(),
            network_name: list.name.clone(),
            if_name: rt.ifname.clone(),
            netns: rt.netns.clone(),
            cni_args: rt.args.clone(),
            capability_args: rt.capability_args.clone(),
            config: list.to_value(),
            plugins_added: 0,
            result: None,
            complete: false,
        };
        let mut prev: Option<Value> = None;
        for (i, plugin) in list.plugins.iter().enumerate() {
            if has_nothing_to_do(&plugin.plugin_type, &rt.capability_args) {
                record.plugins_added = i + 1;
                continue;
            }
            // Recorded before the plugin runs, so that a crash during the call still leaves a
            // record that DELs it (a DEL of what was never added succeeds).
            record.plugins_added = i + 1;
            record.result = prev.clone();
            self.write_record(&record).await?;
            let stdin = list.plugin_config(plugin, &rt.capability_args, prev.as_ref());
            let outcome = self
                .exec(&plugin.plugin_type, Command::Add, Some(rt), &stdin)
                .await
                .and_then(|out| parse_result(&plugin.plugin_type, &out));
            match outcome {
                Ok(value) => prev = Some(value),
                Err(err) => {
                    // A plugin that never started changed nothing and needs no DEL.
                    if matches!(err, CniError::PluginNotFound { .. }) {
                        record.plugins_added = i;
                    }
                    record.result = prev;
                    if let Err(cache_err) = self.write_record(&record).await {
                        warn!(?cache_err, "cannot record a failed cni add");
                    }
                    return Err(err);
                }
            }
        }
        record.result = prev.clone();
        record.complete = true;
        self.write_record(&record).await?;
        SET_UP
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(list.to_value().to_string());
        let last = list
            .plugins
            .last()
            .map(|p| p.plugin_type.clone())
            .unwrap_or_default();
        let value = prev.unwrap_or(Value::Null);
        CniResult::from_value(&value).map_err(|e| CniError::InvalidResult {
            plugin: last,
            command: Command::Add,
            reason: e.to_string(),
        })
    }

    /// DEL: runs the chain in reverse with the cached result as `prevResult` (0.4.0+), using the
    /// cached conflist and arguments when there is a record (so it works after a restart and
    /// after the conflist changed), else `list` without a result. Every plugin gets its DEL even
    /// after one fails, so as much as possible is released; the first failure is returned and the
    /// record kept for a retry. The record is removed on success.
    pub async fn del(&self, list: &ConfList, rt: &RuntimeConf) -> Result<(), CniError> {
        check_container_id(&rt.container_id)?;
        check_ifname(&rt.ifname)?;
        let record = self
            .read_record(&list.name, &rt.container_id, &rt.ifname)
            .await?;
        let (conf, prev, count, call) = match record {
            Some(rec) => {
                let conf = ConfList::from_value(rec.config, "the cni cache")?;
                let count = rec.plugins_added.min(conf.plugins.len());
                let call = RuntimeConf {
                    args: rec.cni_args,
                    capability_args: rec.capability_args,
                    ..rt.clone()
                };
                (conf, rec.result, count, call)
            }
            None => (list.clone(), None, list.plugins.len(), rt.clone()),
        };
        let prev = if conf.version_at_least("0.4.0") {
            prev
        } else {
            None
        };
        let _chain = lock_chain(&conf, &call.capability_args).await;
        let mut first_err = None;
        for plugin in conf.plugins[..count].iter().rev() {
            if has_nothing_to_do(&plugin.plugin_type, &call.capability_args) {
                continue;
            }
            let stdin = conf.plugin_config(plugin, &call.capability_args, prev.as_ref());
            if let Err(err) = self
                .exec(&plugin.plugin_type, Command::Del, Some(&call), &stdin)
                .await
            {
                if released_already(&err) {
                    // Debian's bridge plugin fails its DEL when the rules it would delete are
                    // gone already (removed by hand, or by an earlier DEL that failed later on);
                    // nothing is left to release, so a retry would fail forever.
                    debug!(container = %rt.container_id, network = %conf.name, ?err, "cni del found its rules gone");
                    continue;
                }
                warn!(container = %rt.container_id, network = %conf.name, ?err, "cni del failed");
                first_err.get_or_insert(err);
            }
        }
        match first_err {
            Some(err) => Err(err),
            None => self.forget(&list.name, &rt.container_id, &rt.ifname).await,
        }
    }

    /// CHECK: runs the chain in order with the cached result, using the cached conflist.
    pub async fn check(&self, list: &ConfList, rt: &RuntimeConf) -> Result<(), CniError> {
        check_container_id(&rt.container_id)?;
        check_ifname(&rt.ifname)?;
        let not_added = || CniError::NotAdded {
            network: list.name.clone(),
            container: rt.container_id.clone(),
            ifname: rt.ifname.clone(),
        };
        let _chain = CHAIN_LOCK.read().await;
        let record = self
            .read_record(&list.name, &rt.container_id, &rt.ifname)
            .await?
            .ok_or_else(not_added)?;
        if !record.complete {
            return Err(not_added());
        }
        let conf = ConfList::from_value(record.config, "the cni cache")?;
        if !conf.version_at_least("0.4.0") {
            return Err(CniError::CheckUnsupported {
                network: conf.name,
                version: conf.cni_version,
            });
        }
        if conf.disable_check {
            return Ok(());
        }
        let call = RuntimeConf {
            args: record.cni_args,
            capability_args: record.capability_args,
            ..rt.clone()
        };
        for plugin in &conf.plugins {
            let stdin = conf.plugin_config(plugin, &call.capability_args, record.result.as_ref());
            self.exec(&plugin.plugin_type, Command::Check, Some(&call), &stdin)
                .await?;
        }
        Ok(())
    }

    /// VERSION: which spec versions a plugin speaks.
    pub async fn version(&self, plugin: &str) -> Result<VersionInfo, CniError> {
        check_name("plugin type", plugin)?;
        let out = self
            .exec(
                plugin,
                Command::Version,
                None,
                &json!({ "cniVersion": NEWEST_VERSION }),
            )
            .await?;
        serde_json::from_slice(&out).map_err(|e| CniError::InvalidResult {
            plugin: plugin.to_owned(),
            command: Command::Version,
            reason: e.to_string(),
        })
    }

    /// Checks that every plugin of `list` is installed and speaks the list's version.
    pub async fn validate(&self, list: &ConfList) -> Result<(), CniError> {
        for plugin in &list.plugins {
            let info = self.version(&plugin.plugin_type).await?;
            if !info.supported_versions.contains(&list.cni_version) {
                return Err(CniError::UnsupportedByPlugin {
                    plugin: plugin.plugin_type.clone(),
                    version: list.cni_version.clone(),
                    supported: info.supported_versions,
                });
            }
        }
        Ok(())
    }

    /// The cache record of a (network, container, interface), if any.
    pub async fn cached(
        &self,
        network: &str,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<CacheRecord>, CniError> {
        check_container_id(container_id)?;
        check_ifname(ifname)?;
        self.read_record(network, container_id, ifname).await
    }

    /// Every cache record; unreadable records are logged and skipped.
    pub async fn cached_all(&self) -> Result<Vec<CacheRecord>, CniError> {
        let dir = self.results_dir();
        let mut entries = match tokio::fs::read_dir(&dir).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(CniError::Cache { path: dir, source }),
        };
        let mut records = Vec::new();
        loop {
            let entry = match entries.next_entry().await {
                Ok(Some(entry)) => entry,
                Ok(None) => break,
                Err(source) => return Err(CniError::Cache { path: dir, source }),
            };
            let path = entry.path();
            // Records being written are hidden files; network names cannot start with a dot.
            if entry.file_name().as_encoded_bytes().starts_with(b".") {
                continue;
            }
            match read_record_file(&path).await {
                Ok(Some(record)) => records.push(record),
                Ok(None) => {}
                Err(err) => {
                    warn!(path = %path.display(), ?err, "skipping unreadable cni cache record")
                }
            }
        }
        records.sort_by(|a, b| {
            (&a.container_id, &a.network_name, &a.if_name).cmp(&(
                &b.container_id,
                &b.network_name,
                &b.if_name,
            ))
        });
        Ok(records)
    }

    /// Removes the cache record of a (network, container, interface); succeeds when absent.
    pub async fn forget(
        &self,
        network: &str,
        container_id: &str,
        ifname: &str,
    ) -> Result<(), CniError> {
        let path = self.record_path(network, container_id, ifname);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(CniError::Cache { path, source }),
        }
    }

    fn results_dir(&self) -> PathBuf {
        self.cache_dir.join("results")
    }

    /// `<network>+<container>+<ifname>`: libcni joins them with `-`, which names may contain
    /// (network "a-b" with container "c" would meet network "a" with container "b-c"); network
    /// names and container ids cannot contain `+`, so these names never collide. Names are
    /// checked before they get here.
    fn record_path(&self, network: &str, container_id: &str, ifname: &str) -> PathBuf {
        self.results_dir()
            .join(format!("{network}+{container_id}+{ifname}"))
    }

    async fn read_record(
        &self,
        network: &str,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<CacheRecord>, CniError> {
        read_record_file(&self.record_path(network, container_id, ifname)).await
    }

    /// Writes a record atomically (temporary file, then rename), readable by root only. No
    /// fsync, as libcni: a record has to outlive the agent, which the page cache does; after a
    /// machine crash the namespaces it names are gone.
    async fn write_record(&self, record: &CacheRecord) -> Result<(), CniError> {
        let dir = self.results_dir();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|source| CniError::Cache {
                path: dir.clone(),
                source,
            })?;
        let path = self.record_path(&record.network_name, &record.container_id, &record.if_name);
        let tmp = dir.join(format!(
            ".{}+{}+{}.tmp",
            record.network_name, record.container_id, record.if_name
        ));
        let bytes = serde_json::to_vec(record).map_err(|e| CniError::Cache {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        let write = async {
            let mut file = tokio::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .await?;
            file.write_all(&bytes).await?;
            tokio::fs::rename(&tmp, &path).await
        };
        write
            .await
            .map_err(|source| CniError::Cache { path, source })
    }

    /// Finds a plugin's executable in the plugin directories.
    async fn find(&self, plugin: &str) -> Result<PathBuf, CniError> {
        use std::os::unix::fs::PermissionsExt;
        for dir in &self.plugin_dirs {
            let path = dir.join(plugin);
            if let Ok(meta) = tokio::fs::metadata(&path).await
                && meta.is_file()
                && meta.permissions().mode() & 0o111 != 0
            {
                return Ok(path);
            }
        }
        Err(CniError::PluginNotFound {
            plugin: plugin.to_owned(),
            dirs: self.plugin_dirs.clone(),
        })
    }

    /// Runs one plugin call and returns its stdout; a failure becomes [`CniError::Plugin`] with
    /// the plugin's error object (or its stderr when it printed none).
    async fn exec(
        &self,
        plugin: &str,
        command: Command,
        rt: Option<&RuntimeConf>,
        stdin: &Value,
    ) -> Result<Vec<u8>, CniError> {
        let path = self.find(plugin).await?;
        let exec_err = |source: io::Error| CniError::Exec {
            plugin: plugin.to_owned(),
            path: path.clone(),
            command,
            source,
        };
        let paths =
            std::env::join_paths(&self.plugin_dirs).map_err(|e| exec_err(io::Error::other(e)))?;
        let mut cmd = tokio::process::Command::new(&path);
        cmd.env("CNI_COMMAND", command.as_str())
            .env("CNI_PATH", paths)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        match rt {
            Some(rt) => {
                let args: Vec<String> = rt.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
                cmd.env("CNI_CONTAINERID", &rt.container_id)
                    .env(
                        "CNI_NETNS",
                        rt.netns.as_deref().map(Path::as_os_str).unwrap_or_default(),
                    )
                    .env("CNI_IFNAME", &rt.ifname)
                    .env("CNI_ARGS", args.join(";"));
            }
            None => {
                for var in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS"] {
                    cmd.env_remove(var);
                }
            }
        }
        let input = serde_json::to_vec(stdin).map_err(|e| exec_err(io::Error::other(e)))?;
        debug!(plugin, %command, "running cni plugin");
        let mut child = cmd.spawn().map_err(exec_err)?;
        let mut pipe = child.stdin.take();
        let feed = async move {
            if let Some(pipe) = pipe.as_mut() {
                // A plugin may exit without reading stdin; its exit status tells what happened.
                match pipe.write_all(&input).await {
                    Err(e) if e.kind() != io::ErrorKind::BrokenPipe => return Err(e),
                    _ => {}
                }
            }
            drop(pipe);
            Ok(())
        };
        let run = async { tokio::join!(feed, child.wait_with_output()) };
        let (fed, output) =
            tokio::time::timeout(self.timeout, run)
                .await
                .map_err(|_| CniError::Timeout {
                    plugin: plugin.to_owned(),
                    command,
                    timeout: self.timeout,
                })?;
        let output = output.map_err(exec_err)?;
        fed.map_err(exec_err)?;
        if output.status.success() {
            if !output.stderr.is_empty() {
                debug!(plugin, %command, stderr = %String::from_utf8_lossy(&output.stderr), "cni plugin stderr");
            }
            return Ok(output.stdout);
        }
        let (code, msg, details) = match serde_json::from_slice::<PluginErrorObject>(&output.stdout)
        {
            Ok(err) if !err.msg.is_empty() || err.code != 0 => (err.code, err.msg, err.details),
            _ => {
                let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
                let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
                let msg = [stderr, stdout]
                    .into_iter()
                    .find(|s| !s.is_empty())
                    .unwrap_or_else(|| format!("exited with {}", output.status));
                (0, msg, String::new())
            }
        };
        Err(CniError::Plugin {
            plugin: plugin.to_owned(),
            command,
            code,
            msg,
            details,
        })
    }
}

fn parse_result(plugin: &str, stdout: &[u8]) -> Result<Value, CniError> {
    let invalid = |reason: String| CniError::InvalidResult {
        plugin: plugin.to_owned(),
        command: Command::Add,
        reason,
    };
    let value: Value = serde_json::from_slice(stdout).map_err(|e| invalid(e.to_string()))?;
    if !value.is_object() {
        return Err(invalid("not a JSON object".into()));
    }
    CniResult::from_value(&value).map_err(|e| invalid(e.to_string()))?;
    Ok(value)
}

async fn read_record_file(path: &Path) -> Result<Option<CacheRecord>, CniError> {
    let bytes = match tokio::fs::read(path).await {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CniError::Cache {
                path: path.to_owned(),
                source,
            });
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| CniError::CacheCorrupt {
            path: path.to_owned(),
            source,
        })
}

/// Whether a DEL failed only because the iptables objects it removes are gone already (the
/// messages of iptables-legacy and iptables-nft).
fn released_already(err: &CniError) -> bool {
    let CniError::Plugin { msg, .. } = err else {
        return false;
    };
    msg.contains("iptables")
        && (msg.contains("does not exist")
            || msg.contains("No chain/target/match by that name")
            || msg.contains("does a matching rule exist"))
}

/// Port mappings as the `portMappings` capability argument.
pub fn port_mappings_arg(ports: &[PortMapping]) -> Map<String, Value> {
    let mut args = Map::new();
    if !ports.is_empty() {
        args.insert("portMappings".into(), json!(ports));
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list() -> ConfList {
        ConfList::from_value(
            json!({
                "cniVersion": "1.0.0",
                "name": "gantry",
                "plugins": [
                    {"type": "bridge", "bridge": "gt0", "ipam": {"type": "host-local"}},
                    {"type": "portmap", "capabilities": {"portMappings": true, "other": false}},
                ]
            }),
            "test",
        )
        .unwrap()
    }

    #[test]
    fn conflist_parses() {
        let l = list();
        assert_eq!(l.cni_version, "1.0.0");
        assert_eq!(l.name, "gantry");
        assert!(!l.disable_check);
        let types: Vec<_> = l.plugins.iter().map(|p| p.plugin_type.as_str()).collect();
        assert_eq!(types, ["bridge", "portmap"]);
        assert_eq!(
            l.plugins[1].capabilities().collect::<Vec<_>>(),
            ["portMappings"]
        );
        // Round trip through the cache form.
        assert_eq!(ConfList::from_value(l.to_value(), "again").unwrap(), l);
    }

    #[test]
    fn single_plugin_conf_is_a_list_of_one() {
        let l = ConfList::from_value(
            json!({"cniVersion": "0.4.0", "name": "lo", "type": "loopback"}),
            "t",
        )
        .unwrap();
        assert_eq!(l.plugins.len(), 1);
        assert_eq!(l.plugins[0].plugin_type, "loopback");
    }

    #[test]
    fn bad_conflists_are_refused_with_a_reason() {
        let cases = [
            (json!([]), "not a JSON object"),
            (json!({"name": "n", "plugins": []}), "cniVersion"),
            (
                json!({"cniVersion": "2.0.0", "name": "n", "plugins": [{"type": "x"}]}),
                "not supported",
            ),
            (
                json!({"cniVersion": "1.0.0", "plugins": [{"type": "x"}]}),
                "name",
            ),
            (
                json!({"cniVersion": "1.0.0", "name": "a/b", "plugins": [{"type": "x"}]}),
                "network name",
            ),
            (
                json!({"cniVersion": "1.0.0", "name": "n", "plugins": []}),
                "empty",
            ),
            (
                json!({"cniVersion": "1.0.0", "name": "n"}),
                "plugins is missing",
            ),
            (
                json!({"cniVersion": "1.0.0", "name": "n", "plugins": [{"bridge": "x"}]}),
                "plugins[0].type",
            ),
            (
                json!({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "../../bin/sh"}]}),
                "plugin type",
            ),
        ];
        for (value, want) in cases {
            let err = ConfList::from_value(value.clone(), "t")
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{value}: {err:?} lacks {want:?}");
        }
    }

    #[test]
    fn plugin_config_injects_name_version_capabilities_and_prev_result() {
        let l = list();
        let mut caps = port_mappings_arg(&[PortMapping {
            host_port: 8080,
            container_port: 80,
            protocol: Protocol::Tcp,
            host_ip: None,
        }]);
        caps.insert("bandwidth".into(), json!({"ingressRate": 1}));
        let prev = json!({"cniVersion": "1.0.0", "ips": []});

        let bridge = l.plugin_config(&l.plugins[0], &caps, None);
        assert_eq!(bridge["name"], "gantry");
        assert_eq!(bridge["cniVersion"], "1.0.0");
        assert_eq!(bridge["bridge"], "gt0");
        // bridge declares no capability: no runtimeConfig, and no prevResult for the first.
        assert!(bridge.get("runtimeConfig").is_none());
        assert!(bridge.get("prevResult").is_none());

        let portmap = l.plugin_config(&l.plugins[1], &caps, Some(&prev));
        assert_eq!(
            portmap["runtimeConfig"],
            json!({"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]})
        );
        assert_eq!(portmap["prevResult"], prev);
    }

    #[test]
    fn results_of_0_4_0_and_1_0_0_parse() {
        let v040 = json!({
            "cniVersion": "0.4.0",
            "interfaces": [
                {"name": "gt0", "mac": "aa:bb:cc:dd:ee:ff"},
                {"name": "eth0", "mac": "aa:bb:cc:dd:ee:01", "sandbox": "/run/netns/x"}
            ],
            "ips": [{"version": "4", "interface": 1, "address": "10.1.2.3/24", "gateway": "10.1.2.1"}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {}
        });
        let r = CniResult::from_value(&v040).unwrap();
        assert_eq!(r.ips[0].address.to_string(), "10.1.2.3/24");
        assert_eq!(r.ips[0].gateway, Some("10.1.2.1".parse().unwrap()));
        assert_eq!(r.ips[0].interface, Some(1));
        assert!(r.interfaces[1].in_container() && !r.interfaces[0].in_container());
        assert_eq!(r.routes[0].dst.to_string(), "0.0.0.0/0");

        let v100 = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "mtu": 1500, "sandbox": "/x"}],
            "ips": [{"address": "fd00::5/64", "interface": 0}],
            "routes": [{"dst": "::/0", "gw": "fd00::1"}],
            "dns": {"nameservers": ["10.0.0.10"], "search": ["svc"]}
        });
        let r = CniResult::from_value(&v100).unwrap();
        assert_eq!(r.interfaces[0].mtu, Some(1500));
        assert_eq!(r.ips[0].address.to_string(), "fd00::5/64");
        assert_eq!(r.dns.nameservers, ["10.0.0.10"]);
        // An empty result (loopback without prevResult in some versions) is fine too.
        assert_eq!(
            CniResult::from_value(&json!({"cniVersion": "1.0.0"}))
                .unwrap()
                .ips,
            []
        );
        assert!(parse_result("x", b"[]").is_err());
        assert!(parse_result("x", br#"{"ips": [{"address": "nonsense"}]}"#).is_err());
    }

    #[test]
    fn names_are_checked() {
        for ok in ["abc", "a-b_c.d", "0123456789abcdef"] {
            check_container_id(ok).unwrap();
        }
        for bad in ["", ".", "..", "../x", "a/b", "-rf", "a b", &"x".repeat(129)] {
            assert!(check_container_id(bad).is_err(), "{bad:?}");
        }
        for ok in ["eth0", "lo", "net1"] {
            check_ifname(ok).unwrap();
        }
        for bad in ["", "..", "a/b", "a:b", "sixteen-bytes-xx", "a b"] {
            assert!(check_ifname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn versions_compare() {
        assert!(parse_version("1.0.0") > parse_version("0.4.0"));
        assert!(parse_version("0.4.0") > parse_version("0.3.1"));
        assert_eq!(parse_version("0.4.0"), (0, 4, 0));
    }

    #[test]
    fn plugin_errors_display_plugin_command_and_message() {
        let err = CniError::Plugin {
            plugin: "bridge".into(),
            command: Command::Add,
            code: 7,
            msg: "invalid subnet".into(),
            details: "10.300.0.0/24".into(),
        };
        assert_eq!(
            err.to_string(),
            "cni plugin bridge ADD failed: invalid subnet (code 7): 10.300.0.0/24"
        );
    }

    #[test]
    fn a_del_that_finds_its_rules_gone_has_released_them() {
        let del = |msg: &str| CniError::Plugin {
            plugin: "bridge".into(),
            command: Command::Del,
            code: 999,
            msg: msg.into(),
            details: String::new(),
        };
        assert!(released_already(&del(
            "running [/usr/sbin/iptables -t nat -D POSTROUTING -s 10.160.0.2 -j CNI-ebcc]: exit \
             status 2: iptables v1.8.9 (nf_tables): Chain 'CNI-ebcc' does not exist"
        )));
        assert!(released_already(&del(
            "running [/usr/sbin/iptables -t nat -X CNI-1]: iptables: No chain/target/match by that name."
        )));
        assert!(!released_already(&del(
            "failed to delete veth: device busy"
        )));
        assert!(!released_already(&CniError::Timeout {
            plugin: "bridge".into(),
            command: Command::Del,
            timeout: Duration::from_secs(1),
        }));
    }
}
