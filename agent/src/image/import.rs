//! Import of `docker save` tarballs (the legacy layout, and Docker 25+'s, which is an OCI
//! layout with a `manifest.json` beside it) and of OCI image layouts (a directory or a tar),
//! and export of an image as a Docker 25-style tarball that both `docker load` and this
//! importer read.
//!
//! An archive is read once, as a stream: every file that may be a blob goes into the blob store
//! as it passes (verified against its name when the name is a digest), the few small JSON files
//! are kept in memory, and the images are assembled once the end is reached, since
//! `manifest.json` may come last. Nothing is held in memory but the JSON; a blob the archive
//! lacks is an error, and nothing is recorded for an image that fails.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::blob::{BlobError, BlobInfo};
use super::manifest::{
    self, Descriptor, Index, MAX_MANIFEST_SIZE, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, Parsed,
};
use super::reference::{ImageRef, is_sha256_hex};
use super::store::{ImageStore, Lease};
use super::unpack::Compression;
use super::{Image, ImageError};

/// The annotation containerd and Docker put the full image name in.
const NAME_ANNOTATION: &str = "io.containerd.image.name";
/// The OCI annotation naming an image in a layout (often only a tag).
const REF_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// The largest JSON file read from an archive.
const MAX_JSON: u64 = 16 << 20;
/// How many symlinks deep an alias in an archive may go.
const MAX_ALIASES: usize = 16;

/// Why an archive or layout could not be imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The tar stream could not be read (truncated, not a tar).
    #[error("reading archive: {source}")]
    Archive {
        /// The underlying error.
        source: io::Error,
    },
    /// A JSON file of the archive is too large.
    #[error("{path} in archive is larger than {limit} bytes")]
    TooLarge {
        /// The file.
        path: String,
        /// The limit.
        limit: u64,
    },
    /// A JSON file of the archive is malformed.
    #[error("{path} in archive: {source}")]
    Json {
        /// The file.
        path: String,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// The archive has neither `manifest.json` nor `index.json`.
    #[error("not a docker save archive or OCI layout: no manifest.json or index.json")]
    NoImages,
    /// `manifest.json` names a file the archive does not contain.
    #[error("{what} {path} named by manifest.json is not in the archive")]
    MissingFile {
        /// What the file is (config, layer).
        what: &'static str,
        /// Its path in the archive.
        path: String,
    },
    /// A layout directory could not be read.
    #[error("reading layout {path}: {source}")]
    Layout {
        /// The file.
        path: String,
        /// The underlying error.
        source: io::Error,
    },
}

/// One entry of a docker-save `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SaveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Collapses `./a/../b` to `b`; `None` if it climbs above the archive root.
fn normalize(path: &str) -> Option<String> {
    let mut out: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            c => out.push(c),
        }
    }
    Some(out.join("/"))
}

/// The digest a `blobs/sha256/<hex>` path names.
fn blob_path_digest(path: &str) -> Option<String> {
    let hex = path.strip_prefix("blobs/sha256/")?;
    is_sha256_hex(hex).then(|| format!("sha256:{hex}"))
}

/// What the archive pass collected.
#[derive(Default)]
struct Collected {
    /// Archive path → the blob holding its content.
    files: HashMap<String, BlobInfo>,
    /// Archive path → the path a symlink or hard link entry points at.
    aliases: HashMap<String, String>,
    /// The small JSON files at the top of the archive.
    json: HashMap<String, Vec<u8>>,
}

impl Collected {
    fn lookup(&self, path: &str) -> Option<&BlobInfo> {
        let mut path = normalize(path)?;
        for _ in 0..MAX_ALIASES {
            if let Some(info) = self.files.get(&path) {
                return Some(info);
            }
            path = self.aliases.get(&path)?.clone();
        }
        None
    }
}

fn parse_refs(names: impl IntoIterator<Item = String>) -> Vec<ImageRef> {
    let mut out = Vec::new();
    for name in names {
        match ImageRef::parse(&name) {
            Ok(r) if !out.contains(&r) => out.push(r),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(%name, error = %e, "ignoring unparseable image name in archive")
            }
        }
    }
    out
}

impl ImageStore {
    /// Imports a `docker save` tarball or an OCI layout tarball read as a stream, and returns
    /// the images it held. Blocking: call it from `spawn_blocking`.
    pub fn import(&self, reader: impl Read) -> Result<Vec<Image>, ImageError> {
        let result = self.import_archive(reader);
        self.clean_up_after(result)
    }

    /// After a failed import or pull, deletes what it stored (its lease is gone by now, so
    /// its blobs and layers are unreferenced): nothing is left half-stored.
    pub(crate) fn clean_up_after<T>(&self, result: Result<T, ImageError>) -> Result<T, ImageError> {
        if result.is_err()
            && let Err(e) = self.sweep()
        {
            tracing::warn!(error = %e, "cleaning up after a failed image import");
        }
        result
    }

    fn import_archive(&self, reader: impl Read) -> Result<Vec<Image>, ImageError> {
        let lease = self.lease();
        let collected = self.collect_archive(reader, &lease)?;
        let save_entries: Vec<SaveEntry> = match collected.json.get("manifest.json") {
            Some(data) => serde_json::from_slice(data).map_err(|source| ImportError::Json {
                path: "manifest.json".into(),
                source,
            })?,
            None => Vec::new(),
        };
        if let Some(index) = collected.json.get("index.json") {
            // Docker 25+ and OCI layouts. manifest.json, if any, adds its RepoTags by config.
            let mut tags: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for e in &save_entries {
                if let Some(info) = collected.lookup(&e.config) {
                    tags.entry(info.digest.clone())
                        .or_default()
                        .extend(e.repo_tags.clone().unwrap_or_default());
                }
            }
            let blobs = &self.inner.blobs;
            return self.import_oci(&lease, index, &tags, &|d: &Descriptor| {
                if blobs.contains(&d.digest) {
                    Ok(())
                } else {
                    Err(ImageError::MissingBlob {
                        what: "blob",
                        digest: d.digest.clone(),
                    })
                }
            });
        }
        if collected.json.contains_key("manifest.json") {
            return save_entries
                .iter()
                .map(|e| self.import_legacy(&lease, &collected, e))
                .collect();
        }
        Err(ImportError::NoImages.into())
    }

    /// Imports an OCI image layout directory (`oci-layout`, `index.json`, `blobs/`). Blobs are
    /// copied (and verified) only as the images need them. Blocking.
    pub fn import_layout_dir(&self, dir: &Path) -> Result<Vec<Image>, ImageError> {
        let result = self.import_dir(dir);
        self.clean_up_after(result)
    }

    fn import_dir(&self, dir: &Path) -> Result<Vec<Image>, ImageError> {
        let lease = self.lease();
        let index_path = dir.join("index.json");
        let layout_err = |path: &Path| {
            let path = path.display().to_string();
            move |source| ImportError::Layout { path, source }
        };
        let mut index = Vec::new();
        File::open(&index_path)
            .and_then(|f| f.take(MAX_JSON).read_to_end(&mut index))
            .map_err(layout_err(&index_path))?;
        let blobs = &self.inner.blobs;
        let lease_ref = &lease;
        self.import_oci(&lease, &index, &BTreeMap::new(), &|d: &Descriptor| {
            lease_ref.add(d.digest.clone());
            if blobs.contains(&d.digest) {
                return Ok(());
            }
            let path = dir.join("blobs/sha256").join(&d.digest["sha256:".len()..]);
            let file = File::open(&path).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => ImageError::MissingBlob {
                    what: "blob",
                    digest: d.digest.clone(),
                },
                _ => layout_err(&path)(e).into(),
            })?;
            blobs.write_from(
                file,
                &path.display().to_string(),
                Some(&d.digest),
                Some(d.size),
            )?;
            Ok(())
        })
    }

    /// Streams the archive's entries into the blob store.
    fn collect_archive(&self, reader: impl Read, lease: &Lease) -> Result<Collected, ImageError> {
        let blobs = &self.inner.blobs;
        let mut collected = Collected::default();
        let mut archive = tar::Archive::new(reader);
        let archive_err = |source| ImportError::Archive { source };
        for entry in archive.entries().map_err(archive_err)? {
            let mut entry = entry.map_err(archive_err)?;
            let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let Some(path) = normalize(&raw) else {
                continue;
            };
            let kind = entry.header().entry_type();
            if kind.is_symlink() || kind.is_hard_link() {
                let target = entry
                    .link_name_bytes()
                    .map(|t| String::from_utf8_lossy(&t).into_owned())
                    .unwrap_or_default();
                // A symlink is relative to its directory; a hard link to the archive root.
                let base = if kind.is_symlink() {
                    path.rsplit_once('/').map_or("", |(dir, _)| dir).to_string()
                } else {
                    String::new()
                };
                if let Some(t) = normalize(&format!("{base}/{target}")) {
                    collected.aliases.insert(path, t);
                }
                continue;
            }
            if !kind.is_file() {
                continue;
            }
            let size = entry.size();
            let top_level = !path.contains('/');
            if top_level
                && matches!(
                    path.as_str(),
                    "manifest.json" | "index.json" | "repositories" | "oci-layout"
                )
            {
                if size > MAX_JSON {
                    return Err(ImportError::TooLarge {
                        path,
                        limit: MAX_JSON,
                    }
                    .into());
                }
                let mut data = Vec::with_capacity(size as usize);
                entry.read_to_end(&mut data).map_err(archive_err)?;
                collected.json.insert(path, data);
                continue;
            }
            let expected = blob_path_digest(&path);
            // Legacy docker save: `<id>.json` configs and `<id>/layer.tar` layers, whose
            // digests are computed here. Other files (`<id>/json`, `VERSION`) are not needed.
            let wanted = expected.is_some()
                || (top_level && path.ends_with(".json"))
                || path.ends_with("/layer.tar");
            if !wanted {
                continue;
            }
            if let Some(digest) = &expected {
                lease.add(digest.clone());
                if blobs.contains(digest) {
                    collected.files.insert(
                        path,
                        BlobInfo {
                            digest: digest.clone(),
                            size,
                        },
                    );
                    continue;
                }
            }
            let info = blobs
                .write_from_with(&mut entry, &path, expected.as_deref(), Some(size), |d| {
                    lease.add(d)
                })
                .map_err(|e| match e {
                    BlobError::Source { source, .. } => ImportError::Archive { source }.into(),
                    other => ImageError::from(other),
                })?;
            collected.files.insert(path, info);
        }
        Ok(collected)
    }

    /// Assembles one image of a legacy docker-save archive: its manifest is synthesised (OCI,
    /// with each layer's media type from its compression) and stored as a blob.
    fn import_legacy(
        &self,
        lease: &Lease,
        collected: &Collected,
        entry: &SaveEntry,
    ) -> Result<Image, ImageError> {
        let config = collected
            .lookup(&entry.config)
            .ok_or_else(|| ImportError::MissingFile {
                what: "config",
                path: entry.config.clone(),
            })?;
        let mut layers = Vec::new();
        for path in &entry.layers {
            let info = collected
                .lookup(path)
                .ok_or_else(|| ImportError::MissingFile {
                    what: "layer",
                    path: path.clone(),
                })?;
            let mut magic = [0u8; 8];
            let mut file = self.inner.blobs.open_blob(&info.digest)?;
            let n = read_up_to(&mut file, &mut magic)
                .map_err(|source| ImportError::Archive { source })?;
            let compression =
                Compression::detect(&magic[..n]).map_err(|source| ImageError::Unpack {
                    layer: info.digest.clone(),
                    source,
                })?;
            layers.push(Descriptor {
                media_type: compression.oci_media_type().to_string(),
                digest: info.digest.clone(),
                size: info.size,
                platform: None,
                annotations: BTreeMap::new(),
            });
        }
        let manifest = manifest::Manifest {
            schema_version: 2,
            media_type: Some(OCI_MANIFEST.to_string()),
            config: Descriptor {
                media_type: OCI_CONFIG.to_string(),
                digest: config.digest.clone(),
                size: config.size,
                platform: None,
                annotations: BTreeMap::new(),
            },
            layers,
        };
        let data = serde_json::to_vec(&manifest).map_err(|source| ImportError::Json {
            path: "synthesised manifest".into(),
            source,
        })?;
        let stored = self
            .inner
            .blobs
            .write_from_with(&data[..], "manifest", None, None, |d| lease.add(d))?;
        let refs = parse_refs(entry.repo_tags.clone().unwrap_or_default());
        self.commit_image(lease, &stored.digest, Some(OCI_MANIFEST), None, &refs)
    }

    /// Assembles the images an OCI `index.json` names; `fetch` makes a descriptor's blob
    /// present in the store (or says it is missing).
    fn import_oci(
        &self,
        lease: &Lease,
        index_json: &[u8],
        tags: &BTreeMap<String, Vec<String>>,
        fetch: &dyn Fn(&Descriptor) -> Result<(), ImageError>,
    ) -> Result<Vec<Image>, ImageError> {
        let index: Index =
            serde_json::from_slice(index_json).map_err(|source| ImportError::Json {
                path: "index.json".into(),
                source,
            })?;
        let (arch, variant) = manifest::host_platform();
        let mut images = Vec::new();
        for desc in &index.manifests {
            let mut names = Vec::new();
            if let Some(n) = desc.annotations.get(NAME_ANNOTATION) {
                names.push(n.clone());
            }
            // A bare tag ("latest") names no repository: such an image is imported untagged.
            if let Some(n) = desc.annotations.get(REF_ANNOTATION)
                && (n.contains('/') || n.contains(':'))
            {
                names.push(n.clone());
            }
            fetch(desc)?;
            let data = self
                .inner
                .blobs
                .read_small(&desc.digest, MAX_MANIFEST_SIZE)?;
            let hint = Some(desc.media_type.as_str()).filter(|m| !m.is_empty());
            let (manifest_desc, index_digest) = match manifest::parse(&data, &desc.digest, hint)? {
                Parsed::Manifest(_) => (desc.clone(), None),
                Parsed::Index(inner) => {
                    let chosen = manifest::select_platform(&inner, &desc.digest, arch, variant)?;
                    fetch(chosen)?;
                    (chosen.clone(), Some(desc.digest.clone()))
                }
            };
            let data = self
                .inner
                .blobs
                .read_small(&manifest_desc.digest, MAX_MANIFEST_SIZE)?;
            let hint = Some(manifest_desc.media_type.as_str()).filter(|m| !m.is_empty());
            let Parsed::Manifest(m) = manifest::parse(&data, &manifest_desc.digest, hint)? else {
                return Err(manifest::ManifestError::UnsupportedMediaType {
                    media_type: OCI_INDEX.into(),
                    digest: manifest_desc.digest.clone(),
                }
                .into());
            };
            fetch(&m.config)?;
            for l in &m.layers {
                fetch(l)?;
            }
            names.extend(tags.get(&m.config.digest).cloned().unwrap_or_default());
            let refs = parse_refs(names);
            images.push(self.commit_image(
                lease,
                &manifest_desc.digest,
                hint,
                index_digest.as_deref(),
                &refs,
            )?);
        }
        Ok(images)
    }

    /// Writes the image a reference names as a tarball in Docker 25's `docker save` format (an
    /// OCI layout plus `manifest.json`), which `docker load` and [`ImageStore::import`] read.
    pub fn save(&self, reference: &str, out: impl Write) -> Result<(), ImageError> {
        let image = self
            .resolve(reference)?
            .ok_or_else(|| ImageError::NotFound {
                reference: reference.to_string(),
            })?;
        let blobs = &self.inner.blobs;
        let mut tar = tar::Builder::new(out);
        let write_err = |source| ImportError::Archive { source };
        let add = |tar: &mut tar::Builder<_>, path: &str, size: u64, data: &mut dyn Read| {
            let mut header = tar::Header::new_ustar();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(0o644);
            header.set_size(size);
            header.set_mtime(0);
            header.set_uid(0);
            header.set_gid(0);
            tar.append_data(&mut header, path, data).map_err(write_err)
        };
        let blob_path = |d: &str| format!("blobs/sha256/{}", &d["sha256:".len()..]);
        let mut digests = vec![image.digest.clone(), image.config_digest.clone()];
        digests.extend(image.layers.iter().map(|l| l.digest.clone()));
        for d in &digests {
            let size = blobs.size(d)?.ok_or_else(|| ImageError::MissingBlob {
                what: "blob",
                digest: d.clone(),
            })?;
            let mut file = blobs.open_blob(d)?;
            add(&mut tar, &blob_path(d), size, &mut file)?;
        }
        let manifest_size = blobs.size(&image.digest)?.unwrap_or(0);
        let mut annotations = BTreeMap::new();
        if let Some(r) = image.references.first() {
            annotations.insert(NAME_ANNOTATION.to_string(), r.clone());
            if let Some(tag) = ImageRef::parse(r).ok().and_then(|p| p.tag) {
                annotations.insert(REF_ANNOTATION.to_string(), tag);
            }
        }
        let entries = vec![Descriptor {
            media_type: image.media_type.clone(),
            digest: image.digest.clone(),
            size: manifest_size,
            platform: None,
            annotations,
        }];
        let index = Index {
            schema_version: 2,
            media_type: Some(OCI_INDEX.to_string()),
            manifests: entries,
        };
        let save = vec![SaveEntry {
            config: blob_path(&image.config_digest),
            repo_tags: Some(
                image
                    .references
                    .iter()
                    .filter_map(|r| ImageRef::parse(r).ok())
                    .filter(|r| r.tag.is_some())
                    .map(|r| r.familiar())
                    .collect(),
            ),
            layers: image.layers.iter().map(|l| blob_path(&l.digest)).collect(),
        }];
        let json_err = |path: &str| {
            let path = path.to_string();
            move |source| ImageError::from(ImportError::Json { path, source })
        };
        let files = [
            ("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
            (
                "index.json",
                serde_json::to_vec(&index).map_err(json_err("index.json"))?,
            ),
            (
                "manifest.json",
                serde_json::to_vec(&save).map_err(json_err("manifest.json"))?,
            ),
        ];
        for (path, data) in files {
            add(&mut tar, path, data.len() as u64, &mut &data[..])?;
        }
        tar.into_inner()
            .and_then(|mut w| w.flush())
            .map_err(|source| ImportError::Archive { source })?;
        Ok(())
    }
}

fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_archive_paths() {
        let cases = [
            ("./manifest.json", Some("manifest.json")),
            ("a/../b/layer.tar", Some("b/layer.tar")),
            ("abc/../../x", None),
            ("blobs//sha256/./x", Some("blobs/sha256/x")),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input).as_deref(), want, "{input}");
        }
        let hex = "a".repeat(64);
        assert_eq!(
            blob_path_digest(&format!("blobs/sha256/{hex}")),
            Some(format!("sha256:{hex}"))
        );
        assert_eq!(blob_path_digest("blobs/sha256/../../x"), None);
    }
}
