//! The image layer of the node agent: references, the content-addressed blob store, layer
//! unpacking, image metadata, import/export, registry pulls and pushes, container root
//! filesystems and garbage collection.
//!
//! # What the rest of the agent calls
//!
//! - [`ImageStore::open`] once, on the agent's data directory; the store is `Clone + Send +
//!   Sync` and every clone is the same store.
//! - [`ImageStore::ensure`] (policy-aware) or [`ImageStore::pull`] (async) to fetch an image,
//!   with [`PullOptions`] and a [`ProgressSink`] whose watch receiver shows per-layer bytes.
//! - [`ImageStore::import`] / [`ImageStore::import_layout_dir`] / [`ImageStore::save`]
//!   (blocking) for `docker save` tarballs and OCI layouts.
//! - [`ImageStore::resolve`], [`ImageStore::list`], [`ImageStore::tag`],
//!   [`ImageStore::remove`], [`ImageStore::prune`] for the image verbs.
//! - [`ImageStore::mount_rootfs`] before creating a container and
//!   [`ImageStore::unmount_rootfs`] after deleting it (blocking); [`merge`] to build the
//!   container's process from the image config and the workload.
//! - [`ImageStore::collect_garbage`] periodically (kubelet's thresholds, [`gc::GcPolicy`]),
//!   with the references of the instances assigned to the node, whose images it keeps.
//! - [`ImageStore::push`] (async) to send an image to a registry, with [`PushOptions`].
//! - [`pull::follow`] to run a pull while reporting its [`PullTotals`] at a bounded rate.
//!
//! Blocking methods do file I/O and unpacking: call them from `spawn_blocking`.
//!
//! # Layout on disk (`root` is the store's directory)
//!
//! ```text
//! root/index.json                 images and references (one JSON file)
//! root/blobs/sha256/<hex>         manifests, configs and layer blobs, named by their digest
//! root/layers/<24 hex>/           one unpacked layer, an overlayfs lower dir (id = diff_id prefix)
//! root/containers/<id>/{upper,work,rootfs}   one container's writable layer and mount point
//! root/containers/<id>/hold.json  the image the container holds, and how its rootfs is made
//! ```
//!
//! # Invariants
//!
//! - Nothing is visible under a final name before it is complete and verified: blobs are
//!   renamed from a temp file after their sha256 (and size) checked out, layers from a temp
//!   directory after their diff_id matched the config, `index.json` from a temp file after
//!   fsync. Temp names start with `.tmp-` and are swept when the store opens.
//! - The metadata is one small JSON file rewritten atomically under a mutex, so a tag moving
//!   from one image to another, or an image and its references, change together. A node holds
//!   tens to hundreds of images: the whole file is cheap to rewrite.
//! - Reference counting is derived, never stored: a blob or unpacked layer is in use while an
//!   image record names it, or while an import or pull in progress holds a lease on it.
//!   Removing an image deletes exactly the blobs and layers no other record names and nobody
//!   leases, so shared layers stay.
//! - A container holds its image (`hold.json` in its directory, written before the mount, and
//!   kept in memory with the index): an image held by a container is never removed, by
//!   `remove`, `prune` or the garbage collector. Holds are not in `index.json`, so a container
//!   start rewrites no shared file and takes no fsync (an older index's holds move to their
//!   directories when the store opens).
//! - Layer blobs are kept after unpacking, so `save` can write the image back with the same
//!   digests, and a pull of an image sharing layers skips both download and unpack.

pub mod blob;
pub mod config;
mod fsutil;
pub mod gc;
pub mod import;
pub mod manifest;
pub mod pull;
pub mod push;
pub mod reference;
pub mod rootfs;
pub mod store;
pub mod unpack;

use std::io;
use std::path::PathBuf;

pub use config::{ConfigError, ImageConfig, MergedProcess, merge};
pub use pull::{ProgressSink, PullOptions, PullProgress, PullTotals};
pub use push::{PushOptions, PushReport};
pub use reference::{ImageRef, PullDecision, PullPolicy, ReferenceError};
pub use store::{Image, ImageStore, Layer, PruneReport, StoreOptions};

/// Errors of the image store's public operations.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A malformed reference.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// The blob store failed (digest mismatch, truncated source, I/O).
    #[error(transparent)]
    Blob(#[from] blob::BlobError),
    /// A manifest or index is malformed or of an unsupported type.
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    /// An image config is malformed.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A layer could not be unpacked.
    #[error("layer {layer}: {source}")]
    Unpack {
        /// The layer blob's digest.
        layer: String,
        /// What went wrong.
        source: unpack::UnpackError,
    },
    /// A layer's uncompressed content does not match the config's diff_id.
    #[error("layer {layer}: diff_id mismatch: config says {expected}, content is {actual}")]
    DiffIdMismatch {
        /// The layer blob's digest.
        layer: String,
        /// The diff_id in the config.
        expected: String,
        /// The sha256 of the uncompressed layer.
        actual: String,
    },
    /// The manifest and config disagree on the number of layers.
    #[error("image {digest}: {layers} layers but {diff_ids} diff_ids in the config")]
    LayerCount {
        /// The manifest digest.
        digest: String,
        /// Layers in the manifest.
        layers: usize,
        /// diff_ids in the config.
        diff_ids: usize,
    },
    /// A blob an image needs is not in the store (or not in the archive being imported).
    #[error("{what} {digest} is missing")]
    MissingBlob {
        /// What the blob is (manifest, config, layer).
        what: &'static str,
        /// Its digest.
        digest: String,
    },
    /// No image matches the reference.
    #[error("image {reference} not found")]
    NotFound {
        /// The reference as given.
        reference: String,
    },
    /// A short id matches several images.
    #[error("image id {reference} is ambiguous")]
    Ambiguous {
        /// The prefix as given.
        reference: String,
    },
    /// The image is held by containers.
    #[error("image {digest} is in use by containers {containers:?}")]
    InUse {
        /// The image's manifest digest.
        digest: String,
        /// The containers holding it.
        containers: Vec<String>,
    },
    /// `index.json` could not be read or written.
    #[error("image index {path}: {source}")]
    Index {
        /// The index file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// `index.json` is not valid.
    #[error("image index {path} is corrupt: {source}")]
    IndexCorrupt {
        /// The index file.
        path: PathBuf,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// An archive or layout could not be imported.
    #[error(transparent)]
    Import(#[from] import::ImportError),
    /// A registry pull failed.
    #[error(transparent)]
    Pull(#[from] pull::PullError),
    /// A registry push failed.
    #[error(transparent)]
    Push(#[from] push::PushError),
    /// A container rootfs could not be made or removed.
    #[error(transparent)]
    Rootfs(#[from] rootfs::RootfsError),
    /// `index.json` was written by a newer agent.
    #[error("image index {path} has version {version}, newer than this agent understands")]
    IndexVersion {
        /// The index file.
        path: PathBuf,
        /// Its version.
        version: u32,
    },
    /// Another filesystem operation of the store failed.
    #[error("image store: {op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

impl ImageError {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> ImageError {
        let path = path.into();
        move |source| ImageError::Io { op, path, source }
    }
}
