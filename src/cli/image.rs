//! `gantry image ls|rm|prune|pull|import|tag|push|save [--node NODE]`: the images on the nodes,
//! through the scheduler, which asks each node's agent over its session.
//!
//! `tag` works on every Ready node holding the image (a line per node, the others named as
//! skipped); `push` and `save` on one node (`--node`, or the first Ready node holding it).
//! `save` writes `FILE.tmp` and renames it to `FILE` only once the scheduler has ended the
//! stream without error, so a failed save leaves no file.
//!
//! A node that cannot be asked does not fail `ls`, `rm` or `prune`: tables name it on stderr,
//! `-o json|yaml` list it under `unavailable` (as `gantry top` does). `pull` and `import` fail
//! (exit code 1, naming each node and why) when any node asked failed or could not be asked;
//! a node that is not connected fails them only when named with `--node`.
//!
//! `pull` shows one bar per (node, layer) on a terminal (stderr), `import` one bar for the
//! upload; elsewhere they print a line per node and image. `import` sends a file, stdin
//! (`-`), or a directory (an OCI layout, sent as a tar made on the fly) to the scheduler's
//! `Images.Import`, which answers once with every node's result.
//!
//! ```text
//! TagResult  {kind, source, target, tagged: [{node, digest}], missing: [node],
//!             unavailable: [...]}
//! PushResult {kind, reference, node, digest, pushedBlobs, existingBlobs, pushedBytes}
//! ImageList  {kind, items: [{kind: "Image", digest, references, sizeBytes, nodes}],
//!             unavailable: [{node, reason, replica, message}]}
//! PullResult / ImportResult
//!            {kind, items: [{node, ok, code, message, images: [{digest, references, sizeBytes}]}],
//!             unavailable: [{node, reason, replica, message}]}
//! ```

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use gantry::pb;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use super::error;
use super::output::{Format, OutputArgs, Table};
use super::top::UsageList;
use super::{Ctx, print};

/// `gantry image …`.
#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// List the images on the nodes: references, digest, size, and the nodes holding each.
    #[command(visible_alias = "list")]
    Ls(LsArgs),
    /// Remove an image from the nodes (refused while an instance uses it).
    #[command(visible_alias = "remove")]
    Rm(RmArgs),
    /// Remove the images no reference names and no container uses.
    Prune(PruneArgs),
    /// Pull an image from its registry onto every Ready node (or one), always asking the
    /// registry.
    Pull(PullArgs),
    /// Import a `docker save` tarball or an OCI image layout (a directory or a tar; `-` reads
    /// stdin) onto every Ready node (or one).
    Import(ImportArgs),
    /// Give an image a new reference on every Ready node holding it (or one).
    Tag(TagArgs),
    /// Push an image to its registry from one node (the first Ready node holding it, or
    /// --node).
    Push(PushArgs),
    /// Write an image as a `docker save` tarball, from one node (the first Ready node holding
    /// it, or --node).
    Save(SaveArgs),
}

/// `gantry image tag`.
#[derive(Args, Debug)]
pub struct TagArgs {
    /// The image: a reference (`busybox:1`), a digest (`sha256:…`) or an id prefix.
    pub source: String,
    /// The new reference (`registry.example:5000/app:2`).
    pub target: String,
    /// Only on this node.
    #[arg(long, value_name = "NODE")]
    pub node: Option<String>,
    /// Output format (json or yaml; otherwise a line per node).
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `gantry image push`.
#[derive(Args, Debug)]
pub struct PushArgs {
    /// The reference to push, naming the registry (`registry.example:5000/app:2`).
    pub reference: String,
    /// Push from this node.
    #[arg(long, value_name = "NODE")]
    pub node: Option<String>,
    /// Output format of the result (json or yaml; otherwise progress and a line).
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `gantry image save`.
#[derive(Args, Debug)]
pub struct SaveArgs {
    /// The image: a reference (`busybox:1`), a digest (`sha256:…`) or an id prefix.
    pub reference: String,
    /// The file to write (`-`: stdout, refused on a terminal). Written as FILE.tmp and
    /// renamed once whole.
    #[arg(short = 'o', long = "output", value_name = "FILE", default_value = "-")]
    pub output: String,
    /// Save from this node.
    #[arg(long, value_name = "NODE")]
    pub node: Option<String>,
}

/// `gantry image pull`.
#[derive(Args, Debug)]
pub struct PullArgs {
    /// The image reference (`busybox:1`, `registry.example:5000/app:2`, `app@sha256:…`).
    pub reference: String,
    /// Only on this node.
    #[arg(long, value_name = "NODE")]
    pub node: Option<String>,
    /// Output format of the final results (json or yaml; otherwise progress and lines).
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `gantry image import`.
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// A `docker save` tarball, an OCI layout (directory or tar), or `-` for stdin.
    pub path: String,
    /// Only on this node.
    #[arg(long, value_name = "NODE")]
    pub node: Option<String>,
    /// Output format of the final results (json or yaml; otherwise progress and lines).
    #[command(flatten)]
    pub output: OutputArgs,
}

/// An image of a node's pull or import result.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TransferImageDoc {
    /// Manifest digest.
    pub digest: String,
    /// References naming it.
    pub references: Vec<String>,
    /// Bytes of its blobs on the node.
    pub size_bytes: u64,
}

/// One node's pull or import result.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TransferDoc {
    /// The node.
    pub node: String,
    /// Whether it succeeded.
    pub ok: bool,
    /// The gRPC code name of its result (`Ok`, `NotFound`, …).
    pub code: String,
    /// Why it failed; empty when it succeeded.
    pub message: String,
    /// The images pulled or imported.
    pub images: Vec<TransferImageDoc>,
}

impl TransferDoc {
    fn new(r: &pb::ImageTransferResult) -> Self {
        TransferDoc {
            node: r.node.clone(),
            ok: r.code == 0,
            code: format!("{:?}", tonic::Code::from(r.code)),
            message: r.message.clone(),
            images: r
                .images
                .iter()
                .map(|i| TransferImageDoc {
                    digest: i.digest.clone(),
                    references: i.references.clone(),
                    size_bytes: i.size_bytes,
                })
                .collect(),
        }
    }
}

/// `gantry image ls`.
#[derive(Args, Debug)]
pub struct LsArgs {
    /// Only the images on this node.
    #[arg(long, value_name = "NODE")]
    pub node: Option<String>,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArgs,
}

/// `gantry image rm`.
#[derive(Args, Debug)]
pub struct RmArgs {
    /// The image: a reference (`busybox:1`), a digest (`sha256:…`) or an id prefix.
    pub reference: String,
    /// Only on this node.
    #[arg(long, value_name = "NODE")]
    pub node: Option<String>,
}

/// `gantry image prune`.
#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Only on this node.
    #[arg(long, value_name = "NODE")]
    pub node: Option<String>,
}

/// An image and the nodes holding it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageDoc {
    /// Always `Image`.
    pub kind: &'static str,
    /// Manifest digest.
    pub digest: String,
    /// References naming it.
    pub references: Vec<String>,
    /// Bytes of its blobs on one node.
    pub size_bytes: u64,
    /// Nodes holding it.
    pub nodes: Vec<String>,
}

impl ImageDoc {
    fn new(s: &pb::ImageSummary) -> Self {
        ImageDoc {
            kind: "Image",
            digest: s.digest.clone(),
            references: s.references.clone(),
            size_bytes: s.size_bytes,
            nodes: s.nodes.clone(),
        }
    }
}

/// Bytes as `docker images` writes them (`4.2MB`, decimal units).
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if bytes < 1000 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64;
    let mut unit = "B";
    for u in UNITS {
        if value < 1000.0 {
            break;
        }
        value /= 1000.0;
        unit = u;
    }
    format!("{value:.1}{unit}")
}

/// `sha256:0123456789ab…` → `0123456789ab`.
fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex.get(..12).unwrap_or(hex)
}

fn warn_unavailable(unavailable: &[pb::UnavailableNode]) {
    for u in unavailable {
        eprintln!("warning: node {} not asked: {}", u.node, u.message);
    }
}

fn table(images: &[ImageDoc], color: bool) -> String {
    if images.is_empty() {
        return String::new();
    }
    let mut table = Table::new(&["REFERENCE", "DIGEST", "SIZE", "NODES"], color);
    for image in images {
        let nodes = image.nodes.join(",");
        if image.references.is_empty() {
            table.row(vec![
                "<none>".into(),
                short(&image.digest).into(),
                size(image.size_bytes),
                nodes.clone(),
            ]);
        }
        for reference in &image.references {
            table.row(vec![
                reference.clone(),
                short(&image.digest).into(),
                size(image.size_bytes),
                nodes.clone(),
            ]);
        }
    }
    table.render()
}

/// Prints the results of a pull or import (`verb`: "pulled", "imported"; `kind`: the
/// document's kind) and fails naming every node that failed.
fn finish(
    kind: &'static str,
    verb: &str,
    format: Format,
    results: &[pb::ImageTransferResult],
    unavailable: &[pb::UnavailableNode],
    named_node: bool,
) -> anyhow::Result<()> {
    let mut results: Vec<&pb::ImageTransferResult> = results.iter().collect();
    results.sort_by(|a, b| a.node.cmp(&b.node));
    let docs = results.iter().map(|r| TransferDoc::new(r)).collect();
    let doc = UsageList::new(kind, docs, unavailable);
    if let Some(text) = super::output::machine(format, &doc)? {
        print(&text)?;
    } else {
        let mut text = String::new();
        for r in results.iter().filter(|r| r.code == 0) {
            for image in &r.images {
                let name = image.references.first().map_or("<none>", String::as_str);
                text.push_str(&format!("{}: {verb} {name} {}\n", r.node, image.digest));
            }
        }
        print(&text)?;
    }
    let mut failed = Vec::new();
    for r in results.iter().filter(|r| r.code != 0) {
        failed.push(format!("node {}: {}", r.node, r.message));
    }
    let not_connected = pb::UnavailableReason::NotConnected as i32;
    for u in unavailable {
        if u.reason == not_connected && !named_node {
            eprintln!("warning: node {} not asked: {}", u.node, u.message);
        } else {
            failed.push(format!("node {}: {}", u.node, u.message));
        }
    }
    if !failed.is_empty() {
        anyhow::bail!("{}", failed.join("\n"));
    }
    if results.is_empty() {
        anyhow::bail!(
            "no node to {}; see `gantry get nodes`",
            &verb[..verb.len() - 2]
        );
    }
    Ok(())
}

/// Whether progress bars are drawn: on a terminal, unless JSON or YAML is asked for.
fn bars(format: Format) -> bool {
    format.is_table() && std::io::stderr().is_terminal()
}

fn short_layer(digest: &str) -> &str {
    short(digest)
}

/// `gantry image pull`.
async fn pull(client: &gantry::client::Client, args: PullArgs) -> anyhow::Result<()> {
    let request = pb::PullImageRequest {
        reference: args.reference.clone(),
        node: args.node.clone().unwrap_or_default(),
    };
    let mut stream = client
        .images()
        .pull(tonic::Request::new(request))
        .await
        .map_err(|s| error::api(s, client.address()))?
        .into_inner();
    let multi = MultiProgress::with_draw_target(if bars(args.output.output) {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let style =
        ProgressStyle::with_template("{prefix} [{bar:30}] {binary_bytes}/{binary_total_bytes}")
            .context("progress style")?
            .progress_chars("=> ");
    let mut layers: HashMap<(String, String), ProgressBar> = HashMap::new();
    let mut results = Vec::new();
    let mut unavailable = Vec::new();
    while let Some(event) = stream
        .message()
        .await
        .map_err(|s| error::api(s, client.address()))?
    {
        let pb::PullImageEvent {
            node,
            layers: progress,
            result,
            unavailable: left_out,
        } = event;
        for layer in progress {
            let key = (node.clone(), layer.digest.clone());
            let bar = layers.entry(key).or_insert_with(|| {
                let bar = multi.add(ProgressBar::new(layer.total_bytes));
                bar.set_style(style.clone());
                bar.set_prefix(format!("{node} {}", short_layer(&layer.digest)));
                bar
            });
            bar.set_length(layer.total_bytes);
            bar.set_position(layer.done_bytes);
        }
        let finished = result.is_some() || left_out.is_some();
        if finished {
            for ((n, _), bar) in layers.iter() {
                if *n == node {
                    bar.finish();
                }
            }
        }
        if let Some(result) = result {
            results.push(result);
        }
        if let Some(left_out) = left_out {
            unavailable.push(left_out);
        }
    }
    let _ = multi.clear();
    finish(
        "PullResult",
        "pulled",
        args.output.output,
        &results,
        &unavailable,
        args.node.is_some(),
    )
}

/// Bytes of an upload per message (within the API's 1 MiB message limit).
const UPLOAD_CHUNK: usize = 1024 * 1024 - 1024;

/// Sends the `tar` of a directory into chunks, from a blocking thread.
struct ChunkWriter {
    buf: Vec<u8>,
    tx: mpsc::Sender<pb::ImportImageChunk>,
    bar: ProgressBar,
}

impl ChunkWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.buf);
        self.bar.inc(data.len() as u64);
        self.tx
            .blocking_send(pb::ImportImageChunk { header: None, data })
            .map_err(|_| std::io::Error::other("the scheduler ended the upload"))
    }
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        // A message never exceeds one chunk: take what fits, the caller writes the rest.
        let n = data.len().min(UPLOAD_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= UPLOAD_CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// Appends the tree under `dir` to `tar` with names relative to `root`.
fn append_tree<W: std::io::Write>(
    tar: &mut tar::Builder<W>,
    root: &Path,
    dir: &Path,
) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = path.strip_prefix(root).map_err(std::io::Error::other)?;
        if entry.file_type()?.is_dir() {
            tar.append_dir(name, &path)?;
            append_tree(tar, root, &path)?;
        } else {
            tar.append_path_with_name(&path, name)?;
        }
    }
    Ok(())
}

/// Where the bytes of an import come from.
enum Source {
    Stdin,
    File(PathBuf, u64),
    Layout(PathBuf),
}

fn source(path: &str) -> anyhow::Result<Source> {
    if path == "-" {
        return Ok(Source::Stdin);
    }
    let p = PathBuf::from(path);
    let meta = std::fs::metadata(&p).with_context(|| {
        format!("cannot read {path}; give a docker save tarball, an OCI layout or `-` for stdin")
    })?;
    if meta.is_dir() {
        if !p.join("index.json").is_file() {
            anyhow::bail!(
                "{path} is a directory but not an OCI image layout (it has no index.json); \
                 give a layout directory, or a docker save tarball"
            );
        }
        return Ok(Source::Layout(p));
    }
    // Fail now on a file that cannot be opened, not half-way through the upload.
    std::fs::File::open(&p).with_context(|| format!("cannot read {path}"))?;
    Ok(Source::File(p, meta.len()))
}

/// A failed upload's error, and its sender, which must stay open so that the scheduler never
/// sees a truncated upload end normally.
type Failed = (anyhow::Error, mpsc::Sender<pb::ImportImageChunk>);

/// Sends a file or stdin in chunks.
async fn send_reader(
    mut reader: impl tokio::io::AsyncRead + Unpin,
    what: String,
    tx: mpsc::Sender<pb::ImportImageChunk>,
    bar: ProgressBar,
) -> Result<(), Failed> {
    loop {
        let mut data = Vec::with_capacity(UPLOAD_CHUNK);
        let read = (&mut reader)
            .take(UPLOAD_CHUNK as u64)
            .read_to_end(&mut data)
            .await;
        match read {
            Ok(0) => return Ok(()),
            Ok(n) => {
                bar.inc(n as u64);
                if tx
                    .send(pb::ImportImageChunk { header: None, data })
                    .await
                    .is_err()
                {
                    // The scheduler answered already; the call says why.
                    return Ok(());
                }
            }
            Err(err) => return Err((anyhow::anyhow!("reading {what}: {err}"), tx)),
        }
    }
}

/// `gantry image import`.
async fn import(client: &gantry::client::Client, args: ImportArgs) -> anyhow::Result<()> {
    let source = source(&args.path)?;
    let size = match &source {
        Source::File(_, size) => *size,
        Source::Stdin | Source::Layout(_) => 0,
    };
    let bar = if bars(args.output.output) {
        let bar = if size > 0 {
            ProgressBar::new(size)
        } else {
            ProgressBar::new_spinner()
        };
        bar.set_draw_target(ProgressDrawTarget::stderr());
        let template = if size > 0 {
            "uploading [{bar:30}] {binary_bytes}/{binary_total_bytes}"
        } else {
            "uploading {spinner} {binary_bytes}"
        };
        bar.set_style(
            ProgressStyle::with_template(template)
                .context("progress style")?
                .progress_chars("=> "),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let (tx, rx) = mpsc::channel(4);
    let header = pb::ImportImageChunk {
        header: Some(pb::ImportHeader {
            node: args.node.clone().unwrap_or_default(),
            size_bytes: size,
        }),
        data: Vec::new(),
    };
    // The channel is empty: this fits.
    let _ = tx.try_send(header);
    let producer: tokio::task::JoinHandle<Result<(), Failed>> = match source {
        Source::Stdin => tokio::spawn(send_reader(
            tokio::io::stdin(),
            "stdin".into(),
            tx,
            bar.clone(),
        )),
        Source::File(path, _) => {
            let file = tokio::fs::File::open(&path)
                .await
                .with_context(|| format!("cannot read {}", path.display()))?;
            tokio::spawn(send_reader(
                file,
                path.display().to_string(),
                tx,
                bar.clone(),
            ))
        }
        Source::Layout(dir) => {
            let bar = bar.clone();
            tokio::task::spawn_blocking(move || {
                let mut writer = ChunkWriter {
                    buf: Vec::with_capacity(UPLOAD_CHUNK),
                    tx,
                    bar,
                };
                let mut tar = tar::Builder::new(&mut writer);
                tar.follow_symlinks(false);
                let made = append_tree(&mut tar, &dir, &dir).and_then(|()| tar.finish());
                drop(tar);
                match made.and_then(|()| std::io::Write::flush(&mut writer)) {
                    Ok(()) => Ok(()),
                    Err(err) => Err((
                        anyhow::anyhow!("reading the layout {}: {err}", dir.display()),
                        writer.tx,
                    )),
                }
            })
        }
    };
    let mut images = client.images();
    let call = images.import(tonic::Request::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    tokio::pin!(call);
    let mut producer = producer;
    let answered = tokio::select! {
        produced = &mut producer => {
            match produced.context("the upload task failed")? {
                Ok(()) => {}
                Err((err, tx)) => {
                    // The upload must never end normally: the scheduler would import a
                    // truncated archive. The sender stays open until the process exits,
                    // which breaks the call.
                    std::mem::forget(tx);
                    return Err(err);
                }
            }
            bar.finish_and_clear();
            if bars(args.output.output) {
                eprintln!("importing on the nodes…");
            }
            call.await
        }
        answered = &mut call => answered,
    };
    bar.finish_and_clear();
    let response = answered
        .map_err(|s| error::api(s, client.address()))?
        .into_inner();
    finish(
        "ImportResult",
        "imported",
        args.output.output,
        &response.results,
        &response.unavailable,
        args.node.is_some(),
    )
}

/// One node's tag.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TaggedDoc {
    /// The node.
    pub node: String,
    /// The image's manifest digest.
    pub digest: String,
}

/// The result of `gantry image tag`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TagDoc {
    /// Always `TagResult`.
    pub kind: &'static str,
    /// The image tagged.
    pub source: String,
    /// The new reference.
    pub target: String,
    /// The nodes where it was tagged.
    pub tagged: Vec<TaggedDoc>,
    /// The nodes asked that do not hold the image.
    pub missing: Vec<String>,
    /// Nodes that could not be asked.
    pub unavailable: Vec<super::top::UnavailableDoc>,
}

/// `gantry image tag`.
async fn tag(client: &gantry::client::Client, args: TagArgs) -> anyhow::Result<()> {
    let request = pb::TagImageRequest {
        source: args.source.clone(),
        target: args.target.clone(),
        node: args.node.clone().unwrap_or_default(),
    };
    let response = client
        .images()
        .tag(client.request(request))
        .await
        .map_err(|s| error::api(s, client.address()))?
        .into_inner();
    let doc = TagDoc {
        kind: "TagResult",
        source: args.source.clone(),
        target: args.target.clone(),
        tagged: response
            .tagged
            .iter()
            .map(|i| TaggedDoc {
                node: i.node.clone(),
                digest: i.digest.clone(),
            })
            .collect(),
        missing: response.missing.clone(),
        unavailable: response
            .unavailable
            .iter()
            .map(super::top::UnavailableDoc::new)
            .collect(),
    };
    if let Some(text) = super::output::machine(args.output.output, &doc)? {
        return print(&text);
    }
    let mut text = String::new();
    for t in &doc.tagged {
        text.push_str(&format!(
            "{}: tagged {} as {} ({})\n",
            t.node,
            args.source,
            args.target,
            short(&t.digest)
        ));
    }
    for node in &doc.missing {
        text.push_str(&format!("{node}: skipped, no image {}\n", args.source));
    }
    print(&text)?;
    warn_unavailable(&response.unavailable);
    Ok(())
}

/// The result of `gantry image push`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PushDoc {
    /// Always `PushResult`.
    pub kind: &'static str,
    /// The reference pushed to.
    pub reference: String,
    /// The node that pushed.
    pub node: String,
    /// The manifest digest pushed.
    pub digest: String,
    /// Blobs sent.
    pub pushed_blobs: u32,
    /// Blobs the registry had already.
    pub existing_blobs: u32,
    /// Bytes sent.
    pub pushed_bytes: u64,
}

/// `gantry image push`.
async fn push(client: &gantry::client::Client, args: PushArgs) -> anyhow::Result<()> {
    let request = pb::PushImageRequest {
        reference: args.reference.clone(),
        node: args.node.clone().unwrap_or_default(),
    };
    let mut stream = client
        .images()
        .push(tonic::Request::new(request))
        .await
        .map_err(|s| error::api(s, client.address()))?
        .into_inner();
    let drawing = bars(args.output.output);
    let multi = MultiProgress::with_draw_target(if drawing {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let style =
        ProgressStyle::with_template("{prefix} [{bar:30}] {binary_bytes}/{binary_total_bytes}")
            .context("progress style")?
            .progress_chars("=> ");
    let mut layers: HashMap<String, ProgressBar> = HashMap::new();
    let mut announced = false;
    let mut result = None;
    loop {
        let event = match stream.message().await {
            Ok(Some(event)) => event,
            Ok(None) => break,
            Err(status) => {
                let _ = multi.clear();
                return Err(error::api(status, client.address()));
            }
        };
        let pb::PushImageEvent {
            node,
            layers: progress,
            result: last,
        } = event;
        // The agent's first frames may come before it knows it has the image.
        let started = !progress.is_empty() || last.is_some();
        if started && !announced && !drawing && args.output.output.is_table() {
            eprintln!("pushing {} from node {node}", args.reference);
            announced = true;
        }
        for layer in progress {
            let bar = layers.entry(layer.digest.clone()).or_insert_with(|| {
                let bar = multi.add(ProgressBar::new(layer.total_bytes));
                bar.set_style(style.clone());
                bar.set_prefix(format!("{node} {}", short_layer(&layer.digest)));
                bar
            });
            bar.set_length(layer.total_bytes);
            bar.set_position(layer.done_bytes);
        }
        if last.is_some() {
            result = last;
        }
    }
    for bar in layers.values() {
        bar.finish();
    }
    let _ = multi.clear();
    let Some(result) = result else {
        anyhow::bail!("the scheduler ended the push without a result; see its log");
    };
    let doc = PushDoc {
        kind: "PushResult",
        reference: args.reference.clone(),
        node: result.node,
        digest: result.digest,
        pushed_blobs: result.pushed_blobs,
        existing_blobs: result.existing_blobs,
        pushed_bytes: result.pushed_bytes,
    };
    if let Some(text) = super::output::machine(args.output.output, &doc)? {
        return print(&text);
    }
    print(&format!(
        "{}: pushed {} {} ({} blob(s) sent, {} already present, {})\n",
        doc.node,
        doc.reference,
        doc.digest,
        doc.pushed_blobs,
        doc.existing_blobs,
        size(doc.pushed_bytes)
    ))
}

/// A file being written as `FILE.tmp`; removed unless renamed to `FILE`.
struct TempFile {
    tmp: PathBuf,
    done: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// `gantry image save`.
async fn save(client: &gantry::client::Client, args: SaveArgs) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let to_stdout = args.output == "-";
    if to_stdout && std::io::stdout().is_terminal() {
        anyhow::bail!(
            "refusing to write the image tarball to a terminal; give -o FILE or redirect stdout"
        );
    }
    let request = pb::SaveImageRequest {
        reference: args.reference.clone(),
        node: args.node.clone().unwrap_or_default(),
    };
    let mut stream = client
        .images()
        .save(tonic::Request::new(request))
        .await
        .map_err(|s| error::api(s, client.address()))?
        .into_inner();
    let path = PathBuf::from(&args.output);
    let mut tmp = None;
    let mut out: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = if to_stdout {
        Box::new(tokio::io::stdout())
    } else {
        let name = format!("{}.tmp", args.output);
        let file = tokio::fs::File::create(&name)
            .await
            .with_context(|| format!("cannot write {name}"))?;
        tmp = Some(TempFile {
            tmp: PathBuf::from(name),
            done: false,
        });
        Box::new(file)
    };
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new_spinner();
        bar.set_draw_target(ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("saving {spinner} {binary_bytes}")
                .context("progress style")?,
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut node = String::new();
    let mut written = 0u64;
    loop {
        let chunk = match stream.message().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(status) => {
                bar.finish_and_clear();
                return Err(error::api(status, client.address()));
            }
        };
        if !chunk.node.is_empty() {
            node = chunk.node;
        }
        out.write_all(&chunk.data)
            .await
            .with_context(|| format!("writing {}", args.output))?;
        written += chunk.data.len() as u64;
        bar.set_position(written);
    }
    bar.finish_and_clear();
    out.flush()
        .await
        .with_context(|| format!("writing {}", args.output))?;
    drop(out);
    if let Some(mut tmp) = tmp {
        std::fs::rename(&tmp.tmp, &path)
            .with_context(|| format!("renaming {} to {}", tmp.tmp.display(), path.display()))?;
        tmp.done = true;
        eprintln!(
            "{node}: saved {} to {} ({})",
            args.reference,
            path.display(),
            size(written)
        );
    }
    Ok(())
}

/// `gantry image …`.
pub async fn image(ctx: &mut Ctx, command: ImageCommand) -> anyhow::Result<()> {
    let client = ctx.client().await?;
    match command {
        ImageCommand::Pull(args) => pull(&client, args).await,
        ImageCommand::Import(args) => import(&client, args).await,
        ImageCommand::Tag(args) => tag(&client, args).await,
        ImageCommand::Push(args) => push(&client, args).await,
        ImageCommand::Save(args) => save(&client, args).await,
        ImageCommand::Ls(args) => {
            let request = pb::ListImagesRequest {
                node: args.node.unwrap_or_default(),
            };
            let response = client
                .images()
                .list(client.request(request))
                .await
                .map_err(|s| error::api(s, client.address()))?
                .into_inner();
            let items = response.images.iter().map(ImageDoc::new).collect();
            UsageList::new("ImageList", items, &response.unavailable).show(
                args.output.output,
                |list| table(&list.items, ctx.color),
                "asked",
                "no images found",
            )
        }
        ImageCommand::Rm(args) => {
            let request = pb::RemoveImageRequest {
                reference: args.reference.clone(),
                node: args.node.unwrap_or_default(),
            };
            let response = client
                .images()
                .remove(client.request(request))
                .await
                .map_err(|s| error::api(s, client.address()))?
                .into_inner();
            warn_unavailable(&response.unavailable);
            if response.nodes.is_empty() {
                print(&format!("image {} removed from no node\n", args.reference))
            } else {
                print(&format!(
                    "image {} removed from {}\n",
                    args.reference,
                    response.nodes.join(", ")
                ))
            }
        }
        ImageCommand::Prune(args) => {
            let request = pb::PruneImagesRequest {
                node: args.node.unwrap_or_default(),
            };
            let response = client
                .images()
                .prune(client.request(request))
                .await
                .map_err(|s| error::api(s, client.address()))?
                .into_inner();
            warn_unavailable(&response.unavailable);
            let mut text = String::new();
            for image in &response.removed {
                text.push_str(&format!(
                    "removed {} from {}\n",
                    image.digest,
                    image.nodes.join(", ")
                ));
            }
            text.push_str(&format!(
                "{} image(s) removed, {} reclaimed\n",
                response.removed.len(),
                size(response.reclaimed_bytes)
            ));
            print(&text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_save_temp_file_goes_unless_renamed() {
        let dir = tempfile::tempdir().unwrap();
        let failed = dir.path().join("failed.tar.tmp");
        std::fs::write(&failed, b"partial").unwrap();
        drop(TempFile {
            tmp: failed.clone(),
            done: false,
        });
        assert!(!failed.exists(), "a failed save leaves no temp file");
        let kept = dir.path().join("kept.tar");
        std::fs::write(&kept, b"whole").unwrap();
        drop(TempFile {
            tmp: kept.clone(),
            done: true,
        });
        assert!(kept.exists(), "a finished save is not touched");
    }

    #[test]
    fn sizes_and_digests_read_as_docker_writes_them() {
        assert_eq!(size(999), "999B");
        assert_eq!(size(1_500), "1.5kB");
        assert_eq!(size(4_200_000), "4.2MB");
        assert_eq!(short("sha256:0123456789abcdef"), "0123456789ab");
    }

    #[test]
    fn one_row_per_reference_and_dangling_images_as_none() {
        let images = [
            ImageDoc::new(&pb::ImageSummary {
                digest: "sha256:aaaaaaaaaaaaaaaa".into(),
                references: vec!["a:1".into(), "a:latest".into()],
                size_bytes: 2_000_000,
                nodes: vec!["n1".into(), "n2".into()],
            }),
            ImageDoc::new(&pb::ImageSummary {
                digest: "sha256:bbbbbbbbbbbbbbbb".into(),
                references: vec![],
                size_bytes: 10,
                nodes: vec!["n1".into()],
            }),
        ];
        let text = table(&images, false);
        let rows: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(rows[0], ["REFERENCE", "DIGEST", "SIZE", "NODES"]);
        assert_eq!(rows[1], ["a:1", "aaaaaaaaaaaa", "2.0MB", "n1,n2"]);
        assert_eq!(rows[2], ["a:latest", "aaaaaaaaaaaa", "2.0MB", "n1,n2"]);
        assert_eq!(rows[3], ["<none>", "bbbbbbbbbbbb", "10B", "n1"]);
    }
}
