//! Test images built at test time: layers from hand-written entries or from Debian's
//! busybox-static, assembled as OCI layouts (directory or tar) and `docker save` tarballs
//! (legacy and Docker 25+ formats). Entry paths are written raw, so malicious layers can be
//! built too.
#![allow(dead_code)]

pub mod registry;

use std::io::Write;
use std::path::Path;

use sha2::{Digest as _, Sha256};

pub const BUSYBOX: &str = "/bin/busybox";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Whether a test needing `what` (root, a binary) can run; under CI a missing piece fails.
pub fn require(what: &str, available: bool) -> bool {
    if available {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("this test needs {what}; .ci/run should have provided it");
    }
    eprintln!("skipping: needs {what}");
    false
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

pub fn hex_of(digest: &str) -> &str {
    &digest["sha256:".len()..]
}

/// One entry of a test layer.
pub enum Entry<'a> {
    File(&'a str, &'a [u8]),
    Exec(&'a str, &'a [u8]),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
    Link(&'a str, &'a str),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Compress {
    None,
    Gzip,
    Zstd,
}

/// A layer blob with its diff_id.
#[derive(Clone)]
pub struct LayerBlob {
    pub blob: Vec<u8>,
    pub diff_id: String,
    pub media_type: &'static str,
}

pub fn tar_of(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        let (path, data, link): (&str, &[u8], Option<&str>) = match e {
            Entry::File(p, d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                (p, d, None)
            }
            Entry::Exec(p, d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o755);
                (p, d, None)
            }
            Entry::Dir(p) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                (p, &[], None)
            }
            Entry::Symlink(p, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                (p, &[], Some(t))
            }
            Entry::Link(p, t) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                (p, &[], Some(t))
            }
        };
        h.set_size(data.len() as u64);
        if let Some(t) = link {
            let field = &mut h.as_old_mut().linkname;
            field.fill(0);
            field[..t.len()].copy_from_slice(t.as_bytes());
        }
        let field = &mut h.as_old_mut().name;
        field.fill(0);
        field[..path.len()].copy_from_slice(path.as_bytes());
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

pub fn compress(tar: &[u8], how: Compress) -> (Vec<u8>, &'static str) {
    match how {
        Compress::None => (tar.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
        Compress::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).unwrap();
            (
                e.finish().unwrap(),
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        }
        Compress::Zstd => (
            zstd::encode_all(tar, 1).unwrap(),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
    }
}

pub fn layer(entries: &[Entry<'_>], how: Compress) -> LayerBlob {
    let tar = tar_of(entries);
    let (blob, media_type) = compress(&tar, how);
    LayerBlob {
        blob,
        diff_id: sha256(&tar),
        media_type,
    }
}

/// busybox-static with a few applet links and an /etc/passwd, uncompressed (fast in tests).
pub fn busybox_layer() -> LayerBlob {
    let busybox = std::fs::read(BUSYBOX).unwrap();
    let mut entries = vec![
        Entry::Dir("bin/"),
        Entry::Exec("bin/busybox", &busybox),
        Entry::Dir("etc/"),
        Entry::File("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        Entry::Dir("tmp/"),
    ];
    for applet in ["sh", "cat", "ls", "echo", "test"] {
        entries.push(Entry::Symlink(
            Box::leak(format!("bin/{applet}").into_boxed_str()),
            "busybox",
        ));
    }
    layer(&entries, Compress::None)
}

/// An image: config and manifest blobs over its layers.
#[derive(Clone)]
pub struct Built {
    pub layers: Vec<LayerBlob>,
    pub config: Vec<u8>,
    pub config_digest: String,
    pub manifest: Vec<u8>,
    pub digest: String,
}

pub fn build(layers: Vec<LayerBlob>, cmd: &[&str]) -> Built {
    build_with(layers, cmd, |_| {})
}

/// Builds an image, letting the test tamper with the config JSON first.
pub fn build_with(
    layers: Vec<LayerBlob>,
    cmd: &[&str],
    tweak: impl FnOnce(&mut serde_json::Value),
) -> Built {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let mut config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
    });
    tweak(&mut config);
    let config = serde_json::to_vec(&config).unwrap();
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": layers.iter().map(|l| serde_json::json!({
            "mediaType": l.media_type, "digest": sha256(&l.blob), "size": l.blob.len()
        })).collect::<Vec<_>>(),
    }))
    .unwrap();
    Built {
        digest: sha256(&manifest),
        layers,
        config,
        config_digest,
        manifest,
    }
}

impl Built {
    /// Every blob of the image: (digest, bytes).
    pub fn blobs(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = vec![
            (self.digest.clone(), self.manifest.clone()),
            (self.config_digest.clone(), self.config.clone()),
        ];
        for l in &self.layers {
            out.push((sha256(&l.blob), l.blob.clone()));
        }
        out
    }
}

fn index_json(images: &[(&Built, Option<&str>)]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": images.iter().map(|(b, name)| {
            let mut d = serde_json::json!({
                "mediaType": OCI_MANIFEST, "digest": b.digest, "size": b.manifest.len()
            });
            if let Some(n) = name {
                d["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": n});
            }
            d
        }).collect::<Vec<_>>(),
    }))
    .unwrap()
}

/// Writes an OCI image layout directory; `name` is the ref.name annotation.
pub fn oci_layout_dir(dir: &Path, images: &[(&Built, Option<&str>)]) {
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(dir.join("index.json"), index_json(images)).unwrap();
    for (b, _) in images {
        for (d, data) in b.blobs() {
            std::fs::write(dir.join("blobs/sha256").join(hex_of(&d)), data).unwrap();
        }
    }
}

/// A tar archive builder with plain entries.
pub struct Archive(tar::Builder<Vec<u8>>);

impl Archive {
    pub fn new() -> Archive {
        Archive(tar::Builder::new(Vec::new()))
    }

    pub fn file(&mut self, path: &str, data: &[u8]) -> &mut Archive {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Archive {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// An OCI layout as a tar (index.json last, as some tools write it).
pub fn oci_layout_tar(images: &[(&Built, Option<&str>)]) -> Vec<u8> {
    let mut a = Archive::new();
    a.file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    for (b, _) in images {
        for (d, data) in b.blobs() {
            a.file(&format!("blobs/sha256/{}", hex_of(&d)), &data);
        }
    }
    a.file("index.json", &index_json(images));
    a.finish()
}

/// A legacy `docker save` tarball: `<n>/layer.tar`, `<config hex>.json`, and `manifest.json`
/// last. A layer shared by two images is written once and linked, as Docker does.
pub fn docker_save_legacy(images: &[(&Built, &[&str])]) -> Vec<u8> {
    let mut a = Archive::new();
    let mut manifest = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    for (b, tags) in images {
        let mut layer_paths = Vec::new();
        for l in &b.layers {
            let id = hex_of(&l.diff_id).to_string();
            let path = format!("{id}/layer.tar");
            if seen.contains(&id) {
                // Second copy as a symlink to the first, like Docker's dedup.
                let alias = format!("{}x/layer.tar", &id[..8]);
                a.symlink(&alias, &format!("../{id}/layer.tar"));
                layer_paths.push(alias);
                continue;
            }
            seen.push(id.clone());
            a.file(&format!("{id}/VERSION"), b"1.0");
            a.file(&path, &l.blob);
            layer_paths.push(path);
        }
        let config_path = format!("{}.json", hex_of(&b.config_digest));
        a.file(&config_path, &b.config);
        manifest.push(serde_json::json!({
            "Config": config_path, "RepoTags": tags, "Layers": layer_paths,
        }));
    }
    a.file("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    a.finish()
}

/// A Docker 25+ `docker save` tarball: an OCI layout plus manifest.json.
pub fn docker25_save(image: &Built, name: &str) -> Vec<u8> {
    let mut a = Archive::new();
    for (d, data) in image.blobs() {
        a.file(&format!("blobs/sha256/{}", hex_of(&d)), &data);
    }
    a.file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    let index = serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": image.digest, "size": image.manifest.len(),
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": "latest"}}],
    });
    a.file("index.json", &serde_json::to_vec(&index).unwrap());
    let manifest = serde_json::json!([{
        "Config": format!("blobs/sha256/{}", hex_of(&image.config_digest)),
        "RepoTags": [name],
        "Layers": image.layers.iter().map(|l| format!("blobs/sha256/{}", hex_of(&sha256(&l.blob)))).collect::<Vec<_>>(),
    }]);
    a.file("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    a.finish()
}
