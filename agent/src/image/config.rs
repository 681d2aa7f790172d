//! The image config (the JSON blob a manifest points at): what the store keeps of it, and the
//! pure merge of its process defaults with a workload's `command`, `args`, `env`,
//! `working_dir` and `user`, exactly as Docker and Kubernetes merge them.
//!
//! Everything in a config is untrusted: strings with NUL bytes are refused here, and the values
//! are only ever used inside the container (a VOLUME or WORKDIR never names a host path).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::reference::validate_digest;

/// Docker's PATH for a process whose image and spec set none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What is wrong with a config, or with the merged process.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config blob is not valid JSON of the expected shape.
    #[error("invalid image config: {source}")]
    Parse {
        /// The JSON error.
        source: serde_json::Error,
    },
    /// A field holds something no process could use.
    #[error("invalid image config: {field}: {reason}")]
    Invalid {
        /// The config field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// Neither the image nor the workload says what to run.
    #[error("no command: the image has no Entrypoint or Cmd and the workload gives no command")]
    NoCommand,
}

/// The process defaults and metadata of an image, as the store records them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `Entrypoint`.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    #[serde(default)]
    pub cmd: Vec<String>,
    /// `Env`, as `KEY=VALUE` strings in image order.
    #[serde(default)]
    pub env: Vec<String>,
    /// `WorkingDir` (empty when unset).
    #[serde(default)]
    pub working_dir: String,
    /// `User` (empty when unset: root).
    #[serde(default)]
    pub user: String,
    /// `ExposedPorts` keys (`80/tcp`).
    #[serde(default)]
    pub exposed_ports: Vec<String>,
    /// `Volumes` keys (container paths).
    #[serde(default)]
    pub volumes: Vec<String>,
    /// `StopSignal`, if set.
    #[serde(default)]
    pub stop_signal: Option<String>,
    /// `Labels`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The `os` the image was built for.
    #[serde(default)]
    pub os: String,
    /// The `architecture` the image was built for.
    #[serde(default)]
    pub architecture: String,
    /// `created`, as the image says (RFC 3339), if it says.
    #[serde(default)]
    pub created: Option<String>,
}

/// A parsed config blob: the recorded part and the layer diff_ids it promises.
#[derive(Debug, Clone)]
pub struct ParsedConfig {
    /// What the store records.
    pub config: ImageConfig,
    /// `rootfs.diff_ids`, bottom layer first.
    pub diff_ids: Vec<String>,
}

#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    created: Option<String>,
    #[serde(default)]
    config: Option<RawConfig>,
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawConfig {
    user: Option<String>,
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    env: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    volumes: Option<BTreeMap<String, serde_json::Value>>,
    working_dir: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    stop_signal: Option<String>,
}

fn no_nul<'a>(
    field: &'static str,
    values: impl IntoIterator<Item = &'a String>,
) -> Result<(), ConfigError> {
    for v in values {
        if v.contains('\0') {
            return Err(ConfigError::Invalid {
                field,
                reason: format!("{v:?} contains a NUL byte"),
            });
        }
    }
    Ok(())
}

/// Parses a config blob (OCI or Docker; the two agree on these fields).
pub fn parse_config(data: &[u8]) -> Result<ParsedConfig, ConfigError> {
    let file: ConfigFile =
        serde_json::from_slice(data).map_err(|source| ConfigError::Parse { source })?;
    if file.rootfs.kind != "layers" {
        return Err(ConfigError::Invalid {
            field: "rootfs.type",
            reason: format!("{:?} is not \"layers\"", file.rootfs.kind),
        });
    }
    for d in &file.rootfs.diff_ids {
        validate_digest(d).map_err(|_| ConfigError::Invalid {
            field: "rootfs.diff_ids",
            reason: format!("{d:?} is not a sha256 digest"),
        })?;
    }
    let raw = file.config.unwrap_or_default();
    let config = ImageConfig {
        entrypoint: raw.entrypoint.unwrap_or_default(),
        cmd: raw.cmd.unwrap_or_default(),
        env: raw.env.unwrap_or_default(),
        working_dir: raw.working_dir.unwrap_or_default(),
        user: raw.user.unwrap_or_default(),
        exposed_ports: raw.exposed_ports.unwrap_or_default().into_keys().collect(),
        volumes: raw.volumes.unwrap_or_default().into_keys().collect(),
        stop_signal: raw.stop_signal.filter(|s| !s.is_empty()),
        labels: raw.labels.unwrap_or_default(),
        os: file.os,
        architecture: file.architecture,
        created: file.created,
    };
    no_nul("Entrypoint", &config.entrypoint)?;
    no_nul("Cmd", &config.cmd)?;
    no_nul("Env", &config.env)?;
    no_nul("WorkingDir", [&config.working_dir])?;
    no_nul("User", [&config.user])?;
    no_nul("Volumes", &config.volumes)?;
    no_nul("StopSignal", &config.stop_signal)?;
    Ok(ParsedConfig {
        config,
        diff_ids: file.rootfs.diff_ids,
    })
}

/// The process a container runs: the image's defaults overridden by the workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedProcess {
    /// argv, never empty.
    pub args: Vec<String>,
    /// `KEY=VALUE` strings.
    pub env: Vec<String>,
    /// The working directory inside the container, absolute.
    pub cwd: PathBuf,
    /// The user (`name`, `uid`, `uid:gid`, `name:group`), resolved later inside the rootfs;
    /// `None` means root.
    pub user: Option<String>,
    /// The signal that asks the process to stop, if the image names one.
    pub stop_signal: Option<String>,
    /// The image's declared volumes (container paths; informational).
    pub volumes: Vec<String>,
    /// The image's exposed ports (informational).
    pub exposed_ports: Vec<String>,
}

/// Merges an image config with a workload's process fields the way Docker does:
///
/// - a non-empty `command` replaces Entrypoint, and then Cmd is dropped (only `args` follow it);
/// - a non-empty `args` replaces Cmd;
/// - `env` entries override image entries of the same key in place and append the others; a
///   PATH is added if neither sets one;
/// - `working_dir` and `user` replace the image's; a relative image WorkingDir is taken from `/`.
pub fn merge(
    config: &ImageConfig,
    command: &[String],
    args: &[String],
    env: &BTreeMap<String, String>,
    working_dir: Option<&Path>,
    user: Option<&str>,
) -> Result<MergedProcess, ConfigError> {
    let (entrypoint, cmd): (&[String], &[String]) = if !command.is_empty() {
        (command, args)
    } else if !args.is_empty() {
        (&config.entrypoint, args)
    } else {
        (&config.entrypoint, &config.cmd)
    };
    let argv: Vec<String> = entrypoint.iter().chain(cmd).cloned().collect();
    if argv.is_empty() {
        return Err(ConfigError::NoCommand);
    }

    let key = |entry: &str| entry.split_once('=').map_or(entry, |(k, _)| k).to_string();
    let mut merged_env: Vec<String> = config.env.clone();
    for (k, v) in env {
        let entry = format!("{k}={v}");
        match merged_env.iter_mut().find(|e| key(e) == *k) {
            Some(existing) => *existing = entry,
            None => merged_env.push(entry),
        }
    }
    if !merged_env.iter().any(|e| key(e) == "PATH") {
        merged_env.push(format!("PATH={DEFAULT_PATH}"));
    }

    let cwd = match working_dir {
        Some(dir) => Path::new("/").join(dir),
        None if config.working_dir.is_empty() => PathBuf::from("/"),
        None => Path::new("/").join(&config.working_dir),
    };
    let user = match user {
        Some(u) if !u.is_empty() => Some(u.to_string()),
        _ if !config.user.is_empty() => Some(config.user.clone()),
        _ => None,
    };
    Ok(MergedProcess {
        args: argv,
        env: merged_env,
        cwd,
        user,
        stop_signal: config.stop_signal.clone(),
        volumes: config.volumes.clone(),
        exposed_ports: config.exposed_ports.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    fn image(entrypoint: &[&str], cmd: &[&str]) -> ImageConfig {
        ImageConfig {
            entrypoint: v(entrypoint),
            cmd: v(cmd),
            env: v(&["PATH=/bin", "A=1", "B=2"]),
            working_dir: "/app".into(),
            user: "nobody".into(),
            stop_signal: Some("SIGQUIT".into()),
            ..ImageConfig::default()
        }
    }

    #[test]
    fn command_and_args_like_docker() {
        // (entrypoint, cmd, command, args) -> argv
        type Argv<'a> = &'a [&'a str];
        let cases: &[(Argv, Argv, Argv, Argv, Argv)] = &[
            (&["/ep"], &["c1"], &[], &[], &["/ep", "c1"]),
            (&["/ep"], &["c1"], &[], &["a1"], &["/ep", "a1"]),
            (&["/ep"], &["c1"], &["/x"], &[], &["/x"]),
            (
                &["/ep"],
                &["c1"],
                &["/x"],
                &["a1", "a2"],
                &["/x", "a1", "a2"],
            ),
            (&[], &["/c"], &[], &[], &["/c"]),
            (&[], &["/c"], &[], &["/a"], &["/a"]),
            (&[], &["/c"], &["/x"], &[], &["/x"]),
            (&["/ep"], &[], &[], &[], &["/ep"]),
        ];
        for (ep, cmd, command, args, want) in cases {
            let got = merge(
                &image(ep, cmd),
                &v(command),
                &v(args),
                &BTreeMap::new(),
                None,
                None,
            )
            .unwrap();
            assert_eq!(got.args, v(want), "{ep:?} {cmd:?} {command:?} {args:?}");
        }
        let err = merge(&image(&[], &[]), &[], &[], &BTreeMap::new(), None, None).unwrap_err();
        assert!(matches!(err, ConfigError::NoCommand));
    }

    #[test]
    fn env_overrides_in_place_and_appends() {
        let env = BTreeMap::from([
            ("B".to_string(), "two".to_string()),
            ("C".to_string(), "3".to_string()),
        ]);
        let got = merge(&image(&["/ep"], &[]), &[], &[], &env, None, None).unwrap();
        assert_eq!(got.env, v(&["PATH=/bin", "A=1", "B=two", "C=3"]));
        let bare = ImageConfig {
            cmd: v(&["/c"]),
            ..ImageConfig::default()
        };
        let got = merge(&bare, &[], &[], &BTreeMap::new(), None, None).unwrap();
        assert_eq!(got.env, vec![format!("PATH={DEFAULT_PATH}")]);
        let path = BTreeMap::from([("PATH".to_string(), "/mine".to_string())]);
        let got = merge(&bare, &[], &[], &path, None, None).unwrap();
        assert_eq!(got.env, v(&["PATH=/mine"]));
    }

    #[test]
    fn working_dir_user_and_signal() {
        let img = image(&["/ep"], &[]);
        let none = BTreeMap::new();
        let got = merge(&img, &[], &[], &none, None, None).unwrap();
        assert_eq!(got.cwd, Path::new("/app"));
        assert_eq!(got.user.as_deref(), Some("nobody"));
        assert_eq!(got.stop_signal.as_deref(), Some("SIGQUIT"));
        let got = merge(
            &img,
            &[],
            &[],
            &none,
            Some(Path::new("/w")),
            Some("1000:1000"),
        )
        .unwrap();
        assert_eq!(got.cwd, Path::new("/w"));
        assert_eq!(got.user.as_deref(), Some("1000:1000"));
        let bare = ImageConfig {
            cmd: v(&["/c"]),
            working_dir: "rel/dir".into(),
            ..ImageConfig::default()
        };
        let got = merge(&bare, &[], &[], &none, None, None).unwrap();
        assert_eq!(got.cwd, Path::new("/rel/dir"));
        assert_eq!(got.user, None);
        let bare = ImageConfig {
            cmd: v(&["/c"]),
            ..ImageConfig::default()
        };
        assert_eq!(
            merge(&bare, &[], &[], &none, None, None).unwrap().cwd,
            Path::new("/")
        );
    }

    #[test]
    fn parses_docker_and_oci_configs() {
        let json = br#"{
            "architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
            "config": {"Entrypoint": null, "Cmd": ["sh"], "Env": ["PATH=/bin"],
                       "ExposedPorts": {"80/tcp": {}}, "Volumes": {"/data": {}},
                       "WorkingDir": "", "User": "", "StopSignal": "SIGINT",
                       "Labels": {"a": "b"}},
            "rootfs": {"type": "layers", "diff_ids": [
                "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"]}
        }"#;
        let parsed = parse_config(json).unwrap();
        assert_eq!(parsed.diff_ids.len(), 1);
        let c = parsed.config;
        assert_eq!(c.cmd, v(&["sh"]));
        assert!(c.entrypoint.is_empty());
        assert_eq!(c.exposed_ports, v(&["80/tcp"]));
        assert_eq!(c.volumes, v(&["/data"]));
        assert_eq!(c.stop_signal.as_deref(), Some("SIGINT"));
        assert_eq!(c.architecture, "amd64");
        // A config without a "config" section is valid (scratch images).
        parse_config(br#"{"rootfs": {"type": "layers", "diff_ids": []}}"#).unwrap();
        let bad: &[&[u8]] = &[
            b"not json",
            br#"{"rootfs": {"type": "other", "diff_ids": []}}"#,
            br#"{"rootfs": {"type": "layers", "diff_ids": ["md5:00"]}}"#,
            br#"{"config": {"Cmd": ["a\u0000b"]}, "rootfs": {"type": "layers"}}"#,
            br#"{"config": {}}"#,
        ];
        for b in bad {
            assert!(parse_config(b).is_err(), "{}", String::from_utf8_lossy(b));
        }
    }
}
