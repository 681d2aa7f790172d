//! `gantry image ls|rm|prune|pull|import [--node NODE]`: the images on the nodes, through the
//! scheduler, which asks each node's agent over its session.
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

/// `gantry image …`.
pub async fn image(ctx: &mut Ctx, command: ImageCommand) -> anyhow::Result<()> {
    let client = ctx.client().await?;
    match command {
        ImageCommand::Pull(args) => pull(&client, args).await,
        ImageCommand::Import(args) => import(&client, args).await,
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
