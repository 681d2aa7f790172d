//! `gantry image ls|rm|prune [--node NODE]`: the images on the nodes, through the scheduler,
//! which asks each node's agent over its session.
//!
//! A node that cannot be asked does not fail the command: tables name it on stderr, `-o
//! json|yaml` list it under `unavailable` (as `gantry top` does).
//!
//! ```text
//! ImageList  {kind, items: [{kind: "Image", digest, references, sizeBytes, nodes}],
//!             unavailable: [{node, reason, replica, message}]}
//! ```

use clap::{Args, Subcommand};
use gantry::pb;
use serde::Serialize;

use super::error;
use super::output::{OutputArgs, Table};
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

/// `gantry image …`.
pub async fn image(ctx: &mut Ctx, command: ImageCommand) -> anyhow::Result<()> {
    let client = ctx.client().await?;
    match command {
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
