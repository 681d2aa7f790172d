//! `gantry-agent image import|pull|push|tag|save|ls`: node-local images without a scheduler —
//! `docker load`, `pull`, `push`, `tag`, `save` and `images` for the agent's image store
//! (`<data-dir>/images`).
//!
//! # Beside a running agent
//!
//! The image store is not safe to open from two processes: a store caches `index.json` in
//! memory and rewrites it whole under an in-process mutex (an agent would overwrite, and never
//! see, an image another process recorded), and opening a store sweeps the temp files an
//! unfinished pull of the other process is writing. So every verb but `ls` refuses while a
//! `gantry-agent run` uses the same data directory (found through /proc; stop it with
//! `gantry down --keep`, whose containers keep running, import, then `gantry up`). `ls` never
//! opens the store: it only reads `index.json`, which is always replaced atomically, so it is
//! safe at any time.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use gantry_agent::image::{ImageRef, ImageStore, ProgressSink, PullOptions, PushOptions};
use serde::Deserialize;

/// The data directory `gantry-agent run` uses when given none.
const DEFAULT_DATA_DIR: &str = "/var/lib/gantry/agent";

/// Options of `gantry-agent image`.
#[derive(Parser, Debug)]
#[command(name = "gantry-agent image", about = "manage the node's local images")]
pub struct ImageCmd {
    /// The agent's data directory (images are in `images/` below it).
    #[arg(
        long,
        global = true,
        default_value = DEFAULT_DATA_DIR,
        env = "GANTRY_AGENT_DATA_DIR"
    )]
    data_dir: PathBuf,
    /// What to do.
    #[command(subcommand)]
    command: Verb,
}

/// The verbs of `gantry-agent image`.
#[derive(Subcommand, Debug)]
enum Verb {
    /// Import a `docker save` or OCI layout tarball (`-`: standard input); prints the
    /// references and digests imported. Refused while an agent runs on the data directory.
    Import {
        /// The tarball, or `-` for standard input.
        file: String,
    },
    /// Pull an image from a registry and unpack its layers; prints the reference and digest.
    /// Plain HTTP for loopback registries and those given with `--insecure-registry`.
    /// Refused while an agent runs on the data directory.
    Pull {
        /// Image reference (`busybox`, `127.0.0.1:5000/team/web:1.2`, `name@sha256:…`).
        reference: String,
        /// A registry (`host` or `host:port`) reached over plain HTTP. Repeatable.
        #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
        insecure_registries: Vec<String>,
        /// A docker-style `config.json` with registry credentials.
        #[arg(long, value_name = "FILE")]
        registry_config: Option<PathBuf>,
        /// Layers downloaded at once.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
        max_concurrent_downloads: u16,
    },
    /// Push an image of the store to the registry its reference names (tag it first to push
    /// it under another name); prints the reference, digest and blobs sent. Plain HTTP for
    /// loopback registries and those given with `--insecure-registry`. Refused while an agent
    /// runs on the data directory.
    Push {
        /// Image reference (`127.0.0.1:5000/team/web:1.2`).
        reference: String,
        /// A registry (`host` or `host:port`) reached over plain HTTP. Repeatable.
        #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
        insecure_registries: Vec<String>,
        /// A docker-style `config.json` with registry credentials.
        #[arg(long, value_name = "FILE")]
        registry_config: Option<PathBuf>,
        /// Blobs uploaded at once.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
        max_concurrent_uploads: u16,
    },
    /// Give an image another reference (`docker tag`). Refused while an agent runs on the data
    /// directory.
    Tag {
        /// The image: a reference, digest or id prefix.
        source: String,
        /// The new reference.
        target: String,
    },
    /// Write an image as a `docker save` tarball (Docker 25's format: an OCI layout plus
    /// `manifest.json`), which `docker load` and `import` read. Refused while an agent runs on
    /// the data directory.
    Save {
        /// The image: a reference, digest or id prefix.
        reference: String,
        /// The tarball to write (`-`: standard output).
        #[arg(short, long, value_name = "FILE")]
        output: String,
    },
    /// List the images: REFERENCE DIGEST SIZE.
    #[command(visible_alias = "list")]
    Ls,
}

/// Runs `gantry-agent image …`.
pub fn main(cmd: ImageCmd) -> Result<()> {
    match cmd.command {
        Verb::Import { file } => import(&cmd.data_dir, &file),
        Verb::Pull {
            reference,
            insecure_registries,
            registry_config,
            max_concurrent_downloads,
        } => {
            let options = PullOptions {
                docker_config: registry_config,
                insecure_registries,
                max_concurrent_downloads: max_concurrent_downloads.into(),
                ..PullOptions::default()
            };
            pull(&cmd.data_dir, &reference, &options)
        }
        Verb::Push {
            reference,
            insecure_registries,
            registry_config,
            max_concurrent_uploads,
        } => {
            let options = PushOptions {
                docker_config: registry_config,
                insecure_registries,
                max_concurrent_uploads: max_concurrent_uploads.into(),
                ..PushOptions::default()
            };
            push(&cmd.data_dir, &reference, &options)
        }
        Verb::Tag { source, target } => tag(&cmd.data_dir, &source, &target),
        Verb::Save { reference, output } => save(&cmd.data_dir, &reference, &output),
        Verb::Ls => ls(&cmd.data_dir),
    }
}

/// Opens the image store of `data_dir` for `verb`, refusing while an agent runs on it.
fn open_alone(data_dir: &Path, verb: &str) -> Result<ImageStore> {
    if let Some(pid) = agents_on(data_dir).first() {
        bail!(
            "an agent (pid {pid}) is running on {}: its image store cannot be changed from another \
             process; stop it first (`gantry down --keep` keeps the containers running), {verb}, \
             then start it again (`gantry up`)",
            data_dir.display()
        );
    }
    ImageStore::open(data_dir.join("images"))
        .with_context(|| format!("opening the image store in {}", data_dir.display()))
}

fn pull(data_dir: &Path, reference: &str, options: &PullOptions) -> Result<()> {
    let reference = ImageRef::parse(reference)?;
    let store = open_alone(data_dir, "pull")?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let image = runtime
        .block_on(store.pull(&reference, options, ProgressSink::none()))
        .with_context(|| format!("pulling {reference}"))?;
    println!("pulled {reference} {}", image.digest);
    Ok(())
}

fn push(data_dir: &Path, reference: &str, options: &PushOptions) -> Result<()> {
    let reference = ImageRef::parse(reference)?;
    let store = open_alone(data_dir, "push")?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let report = runtime
        .block_on(store.push(&reference, options, ProgressSink::none()))
        .with_context(|| format!("pushing {reference}"))?;
    println!(
        "pushed {reference} {} ({} blobs sent, {} bytes; {} already in the registry)",
        report.digest,
        report.uploaded.len(),
        report.bytes_uploaded,
        report.existing.len()
    );
    Ok(())
}

fn tag(data_dir: &Path, source: &str, target: &str) -> Result<()> {
    let store = open_alone(data_dir, "tag")?;
    let image = store
        .tag(source, target)
        .with_context(|| format!("tagging {source} as {target}"))?;
    let target = ImageRef::parse(target)?;
    println!("tagged {target} {}", image.digest);
    Ok(())
}

fn save(data_dir: &Path, reference: &str, output: &str) -> Result<()> {
    let store = open_alone(data_dir, "save")?;
    if output == "-" {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        store
            .save(reference, &mut out)
            .with_context(|| format!("saving {reference}"))?;
        return out
            .flush()
            .context("writing the tarball to standard output");
    }
    // Written beside the target and renamed, so a failed save leaves no partial tarball.
    let tmp = PathBuf::from(format!("{output}.tmp-{}", std::process::id()));
    let written = (|| -> Result<()> {
        let file =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut out = std::io::BufWriter::new(file);
        store
            .save(reference, &mut out)
            .with_context(|| format!("saving {reference}"))?;
        let file = out
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("writing {}", tmp.display()))?;
        file.sync_all()
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, output)
            .with_context(|| format!("renaming {} to {output}", tmp.display()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    println!("saved {reference} to {output}");
    Ok(())
}

fn import(data_dir: &Path, file: &str) -> Result<()> {
    let store = open_alone(data_dir, "import")?;
    let images = if file == "-" {
        store.import(std::io::stdin().lock())
    } else {
        let reader = std::fs::File::open(file).with_context(|| format!("opening {file}"))?;
        store.import(std::io::BufReader::new(reader))
    }
    .with_context(|| format!("importing {file}"))?;
    let mut out = String::new();
    for image in images {
        if image.references.is_empty() {
            out.push_str(&format!("imported <none> {}\n", image.digest));
        }
        for reference in &image.references {
            out.push_str(&format!("imported {reference} {}\n", image.digest));
        }
    }
    print!("{out}");
    Ok(())
}

/// The part of the store's `index.json` that `ls` shows (see `image::store`); unknown fields
/// are ignored.
#[derive(Debug, Default, Deserialize)]
struct Index {
    #[serde(default)]
    images: BTreeMap<String, Record>,
    #[serde(default)]
    references: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct Record {
    size: u64,
}

fn ls(data_dir: &Path) -> Result<()> {
    let path = data_dir.join("images").join("index.json");
    let index: Index = match std::fs::read(&path) {
        Ok(data) => serde_json::from_slice(&data)
            .with_context(|| format!("reading the image index {}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Index::default(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    print!("{}", table(&index));
    Ok(())
}

/// The `ls` table: a row per reference, and one per image no reference names.
fn table(index: &Index) -> String {
    let mut rows = vec![[
        "REFERENCE".to_owned(),
        "DIGEST".to_owned(),
        "SIZE".to_owned(),
    ]];
    for (digest, record) in &index.images {
        let refs: Vec<&String> = index
            .references
            .iter()
            .filter(|(_, d)| *d == digest)
            .map(|(r, _)| r)
            .collect();
        let none = "<none>".to_owned();
        let names = if refs.is_empty() { vec![&none] } else { refs };
        for name in names {
            rows.push([name.clone(), short(digest), human(record.size)]);
        }
    }
    let width = |col: usize| rows.iter().map(|r| r[col].len()).max().unwrap_or(0);
    let (w0, w1) = (width(0), width(1));
    rows.iter()
        .map(|[a, b, c]| format!("{a:<w0$}   {b:<w1$}   {c}\n"))
        .collect()
}

/// `sha256:` and the first 12 hex digits, as `docker images` shows ids.
fn short(digest: &str) -> String {
    digest.chars().take("sha256:".len() + 12).collect()
}

/// Bytes in binary units, one decimal.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

/// Pids of the `gantry-agent run` processes whose data directory is `data_dir`.
fn agents_on(data_dir: &Path) -> Vec<u32> {
    agents_under(Path::new("/proc"), data_dir, std::process::id())
}

/// [`agents_on`] over a proc root (a temp dir in tests), skipping `own` pid.
fn agents_under(proc_root: &Path, data_dir: &Path, own: u32) -> Vec<u32> {
    let wanted = canonical(data_dir);
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != own)
        .filter(|pid| {
            let dir = proc_root.join(pid.to_string());
            agent_data_dir(&dir).is_some_and(|d| canonical(&d) == wanted)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// The data directory of the `gantry-agent run` process whose /proc directory is `proc_dir`,
/// as its flag, its environment or the default gives it; `None` for any other process.
fn agent_data_dir(proc_dir: &Path) -> Option<PathBuf> {
    let cmdline = std::fs::read(proc_dir.join("cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .collect();
    let program = Path::new(OsStr::from_bytes(args.first()?));
    if program.file_name() != Some(OsStr::new("gantry-agent")) || args.get(1)? != b"run" {
        return None;
    }
    let mut flag = None;
    for (i, arg) in args.iter().enumerate().skip(2) {
        if *arg == b"--data-dir" {
            flag = args.get(i + 1).map(|v| v.to_vec());
        } else if let Some(value) = arg.strip_prefix(b"--data-dir=") {
            flag = Some(value.to_vec());
        }
    }
    let from_env = || {
        let environ = std::fs::read(proc_dir.join("environ")).ok()?;
        environ.split(|b| *b == 0).find_map(|kv| {
            kv.strip_prefix(b"GANTRY_AGENT_DATA_DIR=")
                .map(<[u8]>::to_vec)
        })
    };
    let dir = flag
        .or_else(from_env)
        .map(|bytes| PathBuf::from(OsStr::from_bytes(&bytes)))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    if dir.is_relative() {
        let cwd = std::fs::read_link(proc_dir.join("cwd")).ok()?;
        return Some(cwd.join(dir));
    }
    Some(dir)
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(root: &Path, pid: u32, cmdline: &[&str], environ: &[&str]) {
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let join = |parts: &[&str]| parts.iter().map(|p| format!("{p}\0")).collect::<String>();
        std::fs::write(dir.join("cmdline"), join(cmdline)).unwrap();
        std::fs::write(dir.join("environ"), join(environ)).unwrap();
    }

    #[test]
    fn finds_only_agents_on_the_same_data_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let proc_root = tmp.path().join("proc");
        let data = tmp.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let d = data.to_str().unwrap();
        process(
            &proc_root,
            10,
            &["/x/gantry-agent", "run", "--data-dir", d],
            &[],
        );
        process(
            &proc_root,
            11,
            &["gantry-agent", "run", &format!("--data-dir={d}")],
            &[],
        );
        process(
            &proc_root,
            12,
            &["gantry-agent", "run"],
            &[&format!("GANTRY_AGENT_DATA_DIR={d}")],
        );
        process(&proc_root, 13, &["gantry-agent", "run"], &[]);
        process(&proc_root, 14, &["gantry-agent", "shim", "run", d], &[]);
        process(
            &proc_root,
            15,
            &["gantry-agent", "run", "--data-dir", "/elsewhere"],
            &[],
        );
        process(&proc_root, 16, &["/bin/sh", "run", "--data-dir", d], &[]);
        process(
            &proc_root,
            17,
            &["gantry-agent", "run", "--data-dir", d],
            &[],
        );
        assert_eq!(agents_under(&proc_root, &data, 17), vec![10, 11, 12]);
        assert_eq!(
            agent_data_dir(&proc_root.join("13")),
            Some(PathBuf::from(DEFAULT_DATA_DIR))
        );
    }

    #[test]
    fn the_table_has_a_row_per_reference() {
        let index: Index = serde_json::from_str(
            r#"{"version": 1,
                "images": {"sha256:aaaaaaaaaaaaaaaaaaaa": {"size": 2097152, "other": 1},
                           "sha256:bbbbbbbbbbbbbbbbbbbb": {"size": 10}},
                "references": {"gantry.local/busybox:1": "sha256:aaaaaaaaaaaaaaaaaaaa",
                               "gantry.local/busybox:latest": "sha256:aaaaaaaaaaaaaaaaaaaa"}}"#,
        )
        .unwrap();
        assert_eq!(
            table(&index),
            "REFERENCE                     DIGEST                SIZE\n\
             gantry.local/busybox:1        sha256:aaaaaaaaaaaa   2.0MiB\n\
             gantry.local/busybox:latest   sha256:aaaaaaaaaaaa   2.0MiB\n\
             <none>                        sha256:bbbbbbbbbbbb   10B\n"
        );
    }
}
