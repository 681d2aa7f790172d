//! The image store: image records and references in `index.json`, derived reference counting
//! of blobs and layers, and the operations the agent calls (see the module map in `image`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::ImageError;
use super::blob::{BlobError, BlobStore};
use super::config::{ImageConfig, parse_config};
use super::fsutil::{self, BlockingKeyLocks};
use super::manifest::{self, MAX_MANIFEST_SIZE, Parsed};
use super::reference::{ImageRef, is_sha256_hex};
use super::unpack::{UnpackOptions, unpack_layer};

/// Hex digits of a diff_id that name its layer directory: 96 bits, short enough that many
/// layer paths fit in overlayfs' option string, long enough that no collision is findable.
const LAYER_ID_LEN: usize = 24;
/// The version of `index.json` this code writes.
const INDEX_VERSION: u32 = 1;

/// Settings of an [`ImageStore`].
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// How container root filesystems are made.
    pub rootfs: super::rootfs::RootfsMode,
}

/// One layer of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// The (usually compressed) blob's digest.
    pub digest: String,
    /// The blob's media type.
    pub media_type: String,
    /// The blob's size.
    pub size: u64,
    /// sha256 of the uncompressed tar.
    pub diff_id: String,
    /// The name of its directory under `layers/`.
    pub id: String,
}

/// An image in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The manifest digest: the image's identity in the store.
    pub digest: String,
    /// The manifest's media type.
    pub media_type: String,
    /// The index (manifest list) it was selected from, if pulled through one.
    pub index_digest: Option<String>,
    /// Normalised references (`docker.io/library/busybox:latest`) pointing at it.
    pub references: Vec<String>,
    /// The config blob's digest (Docker's "image id").
    pub config_digest: String,
    /// The process defaults and metadata from the config.
    pub config: ImageConfig,
    /// Layers, bottom first.
    pub layers: Vec<Layer>,
    /// Bytes of its blobs in the store (manifest, config and layer blobs).
    pub size: u64,
    /// When the store got it (unix seconds).
    pub created_at: u64,
    /// When a container last used it (unix seconds; `created_at` until then).
    pub last_used: u64,
}

impl Image {
    /// The OCI chain ids of the layers, bottom first.
    pub fn chain_ids(&self) -> Vec<String> {
        use sha2::{Digest as _, Sha256};
        let mut out: Vec<String> = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let next = match out.last() {
                None => layer.diff_id.clone(),
                Some(prev) => format!(
                    "sha256:{}",
                    hex::encode(Sha256::digest(format!("{prev} {}", layer.diff_id)))
                ),
            };
            out.push(next);
        }
        out
    }
}

/// What `prune` removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Manifest digests of the images removed.
    pub images: Vec<String>,
    /// Blobs deleted.
    pub blobs: usize,
    /// Unpacked layers deleted.
    pub layers: usize,
    /// Bytes of blobs deleted.
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ImageRecord {
    pub(crate) media_type: String,
    #[serde(default)]
    pub(crate) index_digest: Option<String>,
    pub(crate) config_digest: String,
    pub(crate) config: ImageConfig,
    pub(crate) layers: Vec<Layer>,
    pub(crate) size: u64,
    pub(crate) created_at: u64,
    pub(crate) last_used: u64,
}

/// A container's claim on an image, and how its rootfs was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Hold {
    pub(crate) image: String,
    pub(crate) mode: super::rootfs::MountKind,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct IndexFile {
    pub(crate) version: u32,
    #[serde(default)]
    pub(crate) images: BTreeMap<String, ImageRecord>,
    #[serde(default)]
    pub(crate) references: BTreeMap<String, String>,
    /// Kept per container in `containers/<id>/hold.json` (see `rootfs.rs`), not in the index
    /// file: a container start then rewrites no shared file. Read from an older index file.
    #[serde(default, skip_serializing)]
    pub(crate) holds: BTreeMap<String, Hold>,
}

impl IndexFile {
    fn image(&self, digest: &str) -> Option<Image> {
        let rec = self.images.get(digest)?;
        Some(Image {
            digest: digest.to_string(),
            media_type: rec.media_type.clone(),
            index_digest: rec.index_digest.clone(),
            references: self
                .references
                .iter()
                .filter(|(_, d)| *d == digest)
                .map(|(r, _)| r.clone())
                .collect(),
            config_digest: rec.config_digest.clone(),
            config: rec.config.clone(),
            layers: rec.layers.clone(),
            size: rec.size,
            created_at: rec.created_at,
            last_used: rec.last_used,
        })
    }

    pub(crate) fn holders(&self, digest: &str) -> Vec<String> {
        self.holds
            .iter()
            .filter(|(_, h)| h.image == digest)
            .map(|(c, _)| c.clone())
            .collect()
    }

    /// The manifest digest a reference, digest or id prefix names.
    fn lookup(&self, reference: &str) -> Result<Option<String>, ImageError> {
        if let Some(hex) = reference.strip_prefix("sha256:")
            && is_sha256_hex(hex)
        {
            let found = self.images.iter().find(|(d, r)| {
                *d == reference
                    || r.config_digest == reference
                    || r.index_digest.as_deref() == Some(reference)
            });
            return Ok(found.map(|(d, _)| d.clone()));
        }
        // A short id: 12 to 64 hex digits, unique among manifest and config digests.
        if (12..=64).contains(&reference.len())
            && reference
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            let hits: BTreeSet<&String> = self
                .images
                .iter()
                .filter(|(d, r)| {
                    d["sha256:".len()..].starts_with(reference)
                        || r.config_digest["sha256:".len()..].starts_with(reference)
                })
                .map(|(d, _)| d)
                .collect();
            match hits.len() {
                0 => {}
                1 => return Ok(hits.into_iter().next().cloned()),
                _ => {
                    return Err(ImageError::Ambiguous {
                        reference: reference.to_string(),
                    });
                }
            }
        }
        let parsed = ImageRef::parse(reference)?;
        if let Some(digest) = &parsed.digest {
            let found = self
                .images
                .iter()
                .find(|(d, r)| *d == digest || r.index_digest.as_ref() == Some(digest));
            return Ok(found.map(|(d, _)| d.clone()));
        }
        Ok(self.references.get(&parsed.to_string()).cloned())
    }
}

/// The image store. Cheap to clone; every clone is the same store. Blocking methods do file
/// I/O and may take seconds (unpacking): call them from `spawn_blocking`.
#[derive(Clone)]
pub struct ImageStore {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) root: PathBuf,
    pub(crate) blobs: BlobStore,
    pub(crate) layers_dir: PathBuf,
    pub(crate) containers_dir: PathBuf,
    index_path: PathBuf,
    index: Mutex<IndexFile>,
    layer_locks: BlockingKeyLocks,
    /// Serialises mounting and unmounting one container's rootfs.
    pub(crate) container_locks: BlockingKeyLocks,
    leases: Mutex<BTreeMap<String, usize>>,
    pub(crate) options: StoreOptions,
    pub(crate) overlay_usable: OnceLock<bool>,
}

/// Keeps blobs and layers an unfinished import or pull has written from being swept as
/// unreferenced; dropped when the image is recorded (or the work failed).
pub(crate) struct Lease {
    inner: Arc<Inner>,
    keys: Mutex<Vec<String>>,
}

impl Lease {
    pub(crate) fn add(&self, key: impl Into<String>) {
        let key = key.into();
        *lock(&self.inner.leases).entry(key.clone()).or_default() += 1;
        lock(&self.keys).push(key);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut leases = lock(&self.inner.leases);
        for key in lock(&self.keys).drain(..) {
            if let Some(n) = leases.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    leases.remove(&key);
                }
            }
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The directory name of a layer: a prefix of its diff_id.
pub(crate) fn layer_id(diff_id: &str) -> String {
    diff_id["sha256:".len()..]
        .chars()
        .take(LAYER_ID_LEN)
        .collect()
}

fn layer_key(id: &str) -> String {
    format!("layer:{id}")
}

impl ImageStore {
    /// Opens (creating) a store under `root`, with default options.
    pub fn open(root: PathBuf) -> Result<ImageStore, ImageError> {
        ImageStore::open_with(root, StoreOptions::default())
    }

    /// Opens (creating) a store under `root`. Sweeps temp files a crash left; only one store
    /// may be open on a root at a time.
    pub fn open_with(root: PathBuf, options: StoreOptions) -> Result<ImageStore, ImageError> {
        let root = if root.is_absolute() {
            root
        } else {
            std::env::current_dir()
                .map_err(ImageError::io("resolve", &root))?
                .join(root)
        };
        let layers_dir = root.join("layers");
        let containers_dir = root.join("containers");
        for dir in [&root, &layers_dir, &containers_dir] {
            fs::create_dir_all(dir).map_err(ImageError::io("create", dir))?;
        }
        fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(ImageError::io("chmod", &root))?;
        fsutil::remove_stale_temps(&layers_dir).map_err(ImageError::io("clean", &layers_dir))?;
        fsutil::remove_stale_temps(&root).map_err(ImageError::io("clean", &root))?;
        let blobs = BlobStore::open(&root)?;
        let index_path = root.join("index.json");
        let mut index: IndexFile = match fs::read(&index_path) {
            Ok(data) => {
                serde_json::from_slice(&data).map_err(|source| ImageError::IndexCorrupt {
                    path: index_path.clone(),
                    source,
                })?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => IndexFile {
                version: INDEX_VERSION,
                ..IndexFile::default()
            },
            Err(source) => {
                return Err(ImageError::Index {
                    path: index_path,
                    source,
                });
            }
        };
        if index.version > INDEX_VERSION {
            return Err(ImageError::IndexVersion {
                path: index_path,
                version: index.version,
            });
        }
        // Holds an older agent kept in the index file move to their containers' directories.
        for (container, hold) in &index.holds {
            let dir = containers_dir.join(container);
            if dir.is_dir() && !dir.join(super::rootfs::HOLD_FILE).exists() {
                super::rootfs::write_hold(&dir, hold)?;
            }
        }
        index
            .holds
            .extend(super::rootfs::read_holds(&containers_dir)?);
        Ok(ImageStore {
            inner: Arc::new(Inner {
                root,
                blobs,
                layers_dir,
                containers_dir,
                index_path,
                index: Mutex::new(index),
                layer_locks: BlockingKeyLocks::default(),
                container_locks: BlockingKeyLocks::default(),
                leases: Mutex::new(BTreeMap::new()),
                options,
                overlay_usable: OnceLock::new(),
            }),
        })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The blob store (for export and tests).
    pub fn blobs(&self) -> &BlobStore {
        &self.inner.blobs
    }

    /// The directory of an unpacked layer.
    pub fn layer_dir(&self, layer: &Layer) -> PathBuf {
        self.inner.layers_dir.join(&layer.id)
    }

    pub(crate) fn lease(&self) -> Lease {
        Lease {
            inner: self.inner.clone(),
            keys: Mutex::new(Vec::new()),
        }
    }

    /// Reads the index under its lock.
    /// Changes the index in memory only: for what is kept elsewhere (holds).
    pub(crate) fn with_index_mut<T>(&self, f: impl FnOnce(&mut IndexFile) -> T) -> T {
        f(&mut lock(&self.inner.index))
    }

    pub(crate) fn with_index<T>(&self, f: impl FnOnce(&IndexFile) -> T) -> T {
        f(&lock(&self.inner.index))
    }

    /// Changes the index under its lock and writes it atomically; on error nothing changes.
    pub(crate) fn update_index<T>(
        &self,
        f: impl FnOnce(&mut IndexFile) -> Result<T, ImageError>,
    ) -> Result<T, ImageError> {
        let mut guard = lock(&self.inner.index);
        let mut next = guard.clone();
        let out = f(&mut next)?;
        self.write_index(&next)?;
        *guard = next;
        Ok(out)
    }

    fn write_index(&self, index: &IndexFile) -> Result<(), ImageError> {
        let data = serde_json::to_vec_pretty(index).map_err(|source| ImageError::IndexCorrupt {
            path: self.inner.index_path.clone(),
            source,
        })?;
        fsutil::atomic_write(&self.inner.index_path, &data).map_err(|source| ImageError::Index {
            path: self.inner.index_path.clone(),
            source,
        })
    }

    /// Every image, by manifest digest.
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        Ok(self.with_index(|index| index.images.keys().filter_map(|d| index.image(d)).collect()))
    }

    /// The image a reference (`busybox`, `host/x:t`, `x@sha256:…`), a digest (manifest,
    /// config or index) or an id prefix (12+ hex digits) names.
    pub fn resolve(&self, reference: &str) -> Result<Option<Image>, ImageError> {
        self.with_index(|index| Ok(index.lookup(reference)?.and_then(|d| index.image(&d))))
    }

    /// Points `target` (a reference) at the image `source` names.
    pub fn tag(&self, source: &str, target: &str) -> Result<Image, ImageError> {
        let target = ImageRef::parse(target)?;
        self.update_index(|index| {
            let digest = index.lookup(source)?.ok_or_else(|| ImageError::NotFound {
                reference: source.to_string(),
            })?;
            index.references.insert(target.to_string(), digest.clone());
            Ok(index.image(&digest))
        })?
        .ok_or_else(|| ImageError::NotFound {
            reference: source.to_string(),
        })
    }

    /// Removes a reference, like `docker rmi`: a tag is untagged and its image deleted once no
    /// reference is left; a digest or id deletes the image and all its references. An image
    /// held by a container is never deleted ([`ImageError::InUse`]); its blobs and layers go
    /// unless another image shares them.
    pub fn remove(&self, reference: &str) -> Result<(), ImageError> {
        let is_tag = !reference.starts_with("sha256:")
            && ImageRef::parse(reference).is_ok_and(|r| r.digest.is_none())
            && self.with_index(|i| {
                ImageRef::parse(reference).is_ok_and(|r| i.references.contains_key(&r.to_string()))
            });
        self.update_index(|index| {
            let digest = index
                .lookup(reference)?
                .ok_or_else(|| ImageError::NotFound {
                    reference: reference.to_string(),
                })?;
            if is_tag {
                index
                    .references
                    .remove(&ImageRef::parse(reference)?.to_string());
                if index.references.values().any(|d| *d == digest) {
                    return Ok(());
                }
            }
            let holders = index.holders(&digest);
            if !holders.is_empty() {
                if is_tag {
                    // Untagged but still running: it stays, dangling, until its containers go.
                    return Ok(());
                }
                return Err(ImageError::InUse {
                    digest,
                    containers: holders,
                });
            }
            index.images.remove(&digest);
            index.references.retain(|_, d| *d != digest);
            Ok(())
        })?;
        self.sweep()?;
        Ok(())
    }

    /// Deletes the images no reference names and no container holds, then every blob and
    /// layer no image record names and no work in progress leases.
    pub fn prune(&self) -> Result<PruneReport, ImageError> {
        let images = self.update_index(|index| {
            let referenced: BTreeSet<&String> = index.references.values().collect();
            let held: BTreeSet<&String> = index.holds.values().map(|h| &h.image).collect();
            let dangling: Vec<String> = index
                .images
                .keys()
                .filter(|d| !referenced.contains(d) && !held.contains(d))
                .cloned()
                .collect();
            for d in &dangling {
                index.images.remove(d);
            }
            Ok(dangling)
        })?;
        let mut report = self.sweep()?;
        report.images = images;
        Ok(report)
    }

    /// Deletes the given images (by manifest digest) if no container holds them, removing their
    /// references too: the garbage collector's executor.
    pub(crate) fn remove_images(&self, digests: &[String]) -> Result<PruneReport, ImageError> {
        let removed = self.update_index(|index| {
            let mut removed = Vec::new();
            for d in digests {
                if index.holders(d).is_empty() && index.images.remove(d).is_some() {
                    index.references.retain(|_, v| v != d);
                    removed.push(d.clone());
                }
            }
            Ok(removed)
        })?;
        let mut report = self.sweep()?;
        report.images = removed;
        Ok(report)
    }

    /// Deletes blobs and layer directories that no record names and no lease protects. Runs
    /// under the index lock, so no image is recorded meanwhile; leases are checked per item
    /// under their own lock, so work in progress is never swept.
    pub(crate) fn sweep(&self) -> Result<PruneReport, ImageError> {
        let index = lock(&self.inner.index);
        let mut blobs_used = BTreeSet::new();
        let mut layers_used = BTreeSet::new();
        for (digest, rec) in &index.images {
            blobs_used.insert(digest.clone());
            blobs_used.insert(rec.config_digest.clone());
            for l in &rec.layers {
                blobs_used.insert(l.digest.clone());
                layers_used.insert(l.id.clone());
            }
        }
        let mut report = PruneReport::default();
        for digest in self.inner.blobs.list()? {
            if blobs_used.contains(&digest) {
                continue;
            }
            let leases = lock(&self.inner.leases);
            if leases.contains_key(&digest) {
                continue;
            }
            report.bytes += self.inner.blobs.size(&digest)?.unwrap_or(0);
            self.inner.blobs.remove(&digest)?;
            report.blobs += 1;
        }
        let dir = &self.inner.layers_dir;
        for entry in fs::read_dir(dir).map_err(ImageError::io("list", dir))? {
            let entry = entry.map_err(ImageError::io("list", dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(fsutil::TMP_PREFIX) || layers_used.contains(&name) {
                continue;
            }
            let leases = lock(&self.inner.leases);
            if leases.contains_key(&layer_key(&name)) {
                continue;
            }
            let _unpacking = self.inner.layer_locks.lock(&name);
            fsutil::remove_tree(&entry.path()).map_err(ImageError::io("remove", entry.path()))?;
            report.layers += 1;
        }
        drop(index);
        Ok(report)
    }

    /// Unpacks a layer blob into its directory unless it is there already; verifies the
    /// diff_id. Concurrent callers for one layer unpack it once.
    pub(crate) fn ensure_layer(
        &self,
        lease: &Lease,
        blob_digest: &str,
        diff_id: &str,
    ) -> Result<String, ImageError> {
        let id = layer_id(diff_id);
        lease.add(layer_key(&id));
        let dir = self.inner.layers_dir.join(&id);
        let _guard = self.inner.layer_locks.lock(&id);
        if dir.is_dir() {
            return Ok(id);
        }
        let blob = self
            .inner
            .blobs
            .open_blob(blob_digest)
            .map_err(|e| match e {
                BlobError::NotFound { digest } => ImageError::MissingBlob {
                    what: "layer",
                    digest,
                },
                other => other.into(),
            })?;
        let tmp = self.inner.layers_dir.join(fsutil::tmp_name(&id));
        fs::create_dir(&tmp).map_err(ImageError::io("create", &tmp))?;
        let result = unpack_layer(blob, &tmp, &UnpackOptions::default())
            .map_err(|source| ImageError::Unpack {
                layer: blob_digest.to_string(),
                source,
            })
            .and_then(|stats| {
                if stats.diff_id == diff_id {
                    Ok(())
                } else {
                    Err(ImageError::DiffIdMismatch {
                        layer: blob_digest.to_string(),
                        expected: diff_id.to_string(),
                        actual: stats.diff_id,
                    })
                }
            })
            .and_then(|()| fs::rename(&tmp, &dir).map_err(ImageError::io("rename", &dir)));
        if result.is_err() {
            let _ = fsutil::remove_tree(&tmp);
        }
        result.map(|()| id)
    }

    /// Records the image whose manifest is in the blob store: checks config and layer blobs,
    /// unpacks the layers, then writes the record and points `references` at it, in one index
    /// update. Blocking.
    pub(crate) fn commit_image(
        &self,
        lease: &Lease,
        manifest_digest: &str,
        media_type_hint: Option<&str>,
        index_digest: Option<&str>,
        references: &[ImageRef],
    ) -> Result<Image, ImageError> {
        let blobs = &self.inner.blobs;
        let missing = |what| {
            move |e| match e {
                BlobError::NotFound { digest } => ImageError::MissingBlob { what, digest },
                other => other.into(),
            }
        };
        lease.add(manifest_digest);
        let data = blobs
            .read_small(manifest_digest, MAX_MANIFEST_SIZE)
            .map_err(missing("manifest"))?;
        let manifest = match manifest::parse(&data, manifest_digest, media_type_hint)? {
            Parsed::Manifest(m) => m,
            Parsed::Index(_) => {
                return Err(manifest::ManifestError::UnsupportedMediaType {
                    media_type: "index where an image manifest was expected".into(),
                    digest: manifest_digest.to_string(),
                }
                .into());
            }
        };
        lease.add(manifest.config.digest.clone());
        let config_data = blobs
            .read_small(&manifest.config.digest, MAX_MANIFEST_SIZE)
            .map_err(missing("config"))?;
        let parsed = parse_config(&config_data)?;
        if parsed.diff_ids.len() != manifest.layers.len() {
            return Err(ImageError::LayerCount {
                digest: manifest_digest.to_string(),
                layers: manifest.layers.len(),
                diff_ids: parsed.diff_ids.len(),
            });
        }
        for desc in &manifest.layers {
            lease.add(desc.digest.clone());
            if !blobs.contains(&desc.digest) {
                return Err(ImageError::MissingBlob {
                    what: "layer",
                    digest: desc.digest.clone(),
                });
            }
        }
        let mut layers = Vec::with_capacity(manifest.layers.len());
        let mut size = data.len() as u64 + config_data.len() as u64;
        for (desc, diff_id) in manifest.layers.iter().zip(&parsed.diff_ids) {
            let id = self.ensure_layer(lease, &desc.digest, diff_id)?;
            size += blobs.size(&desc.digest)?.unwrap_or(desc.size);
            layers.push(Layer {
                digest: desc.digest.clone(),
                media_type: desc.media_type.clone(),
                size: desc.size,
                diff_id: diff_id.clone(),
                id,
            });
        }
        let media_type = manifest
            .media_type
            .clone()
            .or(media_type_hint.map(str::to_string))
            .unwrap_or_else(|| manifest::OCI_MANIFEST.to_string());
        let digest = manifest_digest.to_string();
        self.update_index(|index| {
            let now = now();
            let previous = index.images.get(&digest);
            let record = ImageRecord {
                media_type,
                index_digest: index_digest
                    .map(str::to_string)
                    .or_else(|| previous.and_then(|p| p.index_digest.clone())),
                config_digest: manifest.config.digest.clone(),
                config: parsed.config,
                layers,
                size,
                created_at: previous.map_or(now, |p| p.created_at),
                last_used: previous.map_or(now, |p| p.last_used),
            };
            index.images.insert(digest.clone(), record);
            for r in references {
                index.references.insert(r.to_string(), digest.clone());
            }
            Ok(index.image(&digest))
        })?
        .ok_or_else(|| ImageError::NotFound {
            reference: manifest_digest.to_string(),
        })
    }
}
