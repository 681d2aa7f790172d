//! Manifests and indexes (OCI and Docker schema2), their media types, and the choice of the
//! host's platform from an index.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::reference::validate_digest;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker gzip layer.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Every manifest media type the store accepts, for registry `Accept` headers.
pub const ACCEPTED_MANIFESTS: &[&str] = &[OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST];
/// The largest manifest or config the store reads (registries cap manifests at 4 MiB).
pub const MAX_MANIFEST_SIZE: u64 = 4 << 20;

const LAYER_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar",
    DOCKER_LAYER_GZIP,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
];

/// What is wrong with a manifest or an index.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not JSON of a manifest's shape.
    #[error("invalid manifest {digest}: {source}")]
    Parse {
        /// The manifest's digest.
        digest: String,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// A media type the store does not handle (schema1, an artifact, an unknown layer type).
    #[error("unsupported media type {media_type:?} in {digest}")]
    UnsupportedMediaType {
        /// The media type.
        media_type: String,
        /// The manifest that names it.
        digest: String,
    },
    /// A descriptor with a malformed digest.
    #[error("invalid descriptor digest {descriptor:?} in {digest}")]
    BadDescriptor {
        /// The digest in the descriptor.
        descriptor: String,
        /// The manifest that holds it.
        digest: String,
    },
    /// An index without an entry for this platform.
    #[error("no manifest for platform {platform} in index {digest}")]
    NoPlatform {
        /// The platform looked for (`linux/amd64`).
        platform: String,
        /// The index.
        digest: String,
    },
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// The media type of the content.
    #[serde(default)]
    pub media_type: String,
    /// `sha256:…` of the content.
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
    /// The platform, in an index entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Annotations (`org.opencontainers.image.ref.name` names images in a layout).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An index entry's platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture, Go style (`amd64`, `arm64`).
    pub architecture: String,
    /// `linux`.
    pub os: String,
    /// Architecture variant (`v8`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// An image manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 2.
    pub schema_version: u32,
    /// The manifest's own media type (absent in some OCI manifests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The config blob.
    pub config: Descriptor,
    /// The layer blobs, bottom first.
    pub layers: Vec<Descriptor>,
}

/// An image index or manifest list.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// Always 2.
    pub schema_version: u32,
    /// The index's own media type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// One manifest per platform (or per image, in a layout's `index.json`).
    pub manifests: Vec<Descriptor>,
}

/// A parsed manifest blob: one image, or an index of them.
#[derive(Debug, Clone)]
pub enum Parsed {
    /// A single image.
    Manifest(Manifest),
    /// Several manifests.
    Index(Index),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    #[serde(default)]
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<serde_json::Value>,
}

/// Parses a manifest or index blob; `hint` is the media type its referrer (or the registry's
/// Content-Type) gave.
pub fn parse(data: &[u8], digest: &str, hint: Option<&str>) -> Result<Parsed, ManifestError> {
    let parse_err = |source| ManifestError::Parse {
        digest: digest.to_string(),
        source,
    };
    let probe: Probe = serde_json::from_slice(data).map_err(parse_err)?;
    let media_type = probe
        .media_type
        .clone()
        .or_else(|| hint.filter(|h| !h.is_empty()).map(str::to_string));
    let unsupported = |media_type: String| ManifestError::UnsupportedMediaType {
        media_type,
        digest: digest.to_string(),
    };
    if probe.schema_version != 2 {
        return Err(unsupported(format!(
            "schemaVersion {} ({})",
            probe.schema_version,
            media_type.unwrap_or_default()
        )));
    }
    let is_index = match media_type.as_deref() {
        Some(OCI_INDEX | DOCKER_LIST) => true,
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
        None => probe.manifests.is_some(),
        Some(other) => return Err(unsupported(other.to_string())),
    };
    let check = |d: &Descriptor| {
        validate_digest(&d.digest).map_err(|_| ManifestError::BadDescriptor {
            descriptor: d.digest.clone(),
            digest: digest.to_string(),
        })
    };
    if is_index {
        let index: Index = serde_json::from_slice(data).map_err(parse_err)?;
        index.manifests.iter().try_for_each(check)?;
        Ok(Parsed::Index(index))
    } else {
        let manifest: Manifest = serde_json::from_slice(data).map_err(parse_err)?;
        check(&manifest.config)?;
        manifest.layers.iter().try_for_each(check)?;
        let config_ok = matches!(
            manifest.config.media_type.as_str(),
            OCI_CONFIG | DOCKER_CONFIG
        );
        if !config_ok {
            return Err(unsupported(manifest.config.media_type.clone()));
        }
        for layer in &manifest.layers {
            if !LAYER_TYPES.contains(&layer.media_type.as_str()) {
                return Err(unsupported(layer.media_type.clone()));
            }
        }
        Ok(Parsed::Manifest(manifest))
    }
}

/// The host's platform in OCI terms: (`architecture`, `variant`).
pub fn host_platform() -> (&'static str, Option<&'static str>) {
    match std::env::consts::ARCH {
        "x86_64" => ("amd64", None),
        "aarch64" => ("arm64", Some("v8")),
        "arm" => ("arm", None),
        "x86" => ("386", None),
        "powerpc64" if cfg!(target_endian = "little") => ("ppc64le", None),
        "loongarch64" => ("loong64", None),
        other => (other, None),
    }
}

/// Picks the linux manifest for `architecture` from an index: an exact variant match first,
/// then any variant.
pub fn select_platform<'a>(
    index: &'a Index,
    digest: &str,
    architecture: &str,
    variant: Option<&str>,
) -> Result<&'a Descriptor, ManifestError> {
    let candidates: Vec<&Descriptor> = index
        .manifests
        .iter()
        .filter(|d| matches!(d.media_type.as_str(), OCI_MANIFEST | DOCKER_MANIFEST | ""))
        .filter(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == architecture)
        })
        .collect();
    let exact = candidates
        .iter()
        .find(|d| d.platform.as_ref().and_then(|p| p.variant.as_deref()) == variant);
    exact
        .or(candidates.first())
        .copied()
        .ok_or_else(|| ManifestError::NoPlatform {
            platform: format!(
                "linux/{architecture}{}",
                variant.map(|v| format!("/{v}")).unwrap_or_default()
            ),
            digest: digest.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    #[test]
    fn parses_manifests_and_indexes() {
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}",
            "config":{{"mediaType":"{DOCKER_CONFIG}","digest":"{}","size":1}},
            "layers":[{{"mediaType":"{DOCKER_LAYER_GZIP}","digest":"{}","size":2}}]}}"#,
            d(1),
            d(2)
        );
        assert!(matches!(
            parse(m.as_bytes(), "m", None).unwrap(),
            Parsed::Manifest(_)
        ));
        // OCI manifests may omit their own media type.
        let m = format!(
            r#"{{"schemaVersion":2,
            "config":{{"mediaType":"{OCI_CONFIG}","digest":"{}","size":1}},"layers":[]}}"#,
            d(1)
        );
        assert!(matches!(
            parse(m.as_bytes(), "m", None).unwrap(),
            Parsed::Manifest(_)
        ));
        let i = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}",
            "digest":"{}","size":3,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}}]}}"#,
            d(3)
        );
        assert!(matches!(
            parse(i.as_bytes(), "i", None).unwrap(),
            Parsed::Index(_)
        ));
    }

    #[test]
    fn refuses_unknown_media_types() {
        let cases = [
            r#"{"schemaVersion":1,"name":"x","fsLayers":[]}"#.to_string(),
            r#"{"schemaVersion":2,"mediaType":"application/vnd.example+json"}"#.to_string(),
            format!(
                r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.cncf.helm.config.v1+json","digest":"{}","size":1}},"layers":[]}}"#,
                d(1)
            ),
            format!(
                r#"{{"schemaVersion":2,"config":{{"mediaType":"{OCI_CONFIG}","digest":"{}","size":1}},
                "layers":[{{"mediaType":"application/x-unknown","digest":"{}","size":1}}]}}"#,
                d(1),
                d(2)
            ),
        ];
        for c in cases {
            let err = parse(c.as_bytes(), "m", None).unwrap_err();
            assert!(
                matches!(err, ManifestError::UnsupportedMediaType { .. }),
                "{c}: {err}"
            );
        }
        let bad_digest = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"{OCI_CONFIG}","digest":"sha256:../x","size":1}},"layers":[]}}"#
        );
        assert!(matches!(
            parse(bad_digest.as_bytes(), "m", None),
            Err(ManifestError::BadDescriptor { .. })
        ));
    }

    #[test]
    fn selects_the_platform() {
        let entry = |n, arch: &str, variant: Option<&str>| Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: d(n),
            size: 1,
            platform: Some(Platform {
                architecture: arch.into(),
                os: "linux".into(),
                variant: variant.map(Into::into),
            }),
            annotations: BTreeMap::new(),
        };
        let index = Index {
            schema_version: 2,
            media_type: Some(OCI_INDEX.into()),
            manifests: vec![
                entry(1, "amd64", None),
                entry(2, "arm", Some("v6")),
                entry(3, "arm", Some("v7")),
                entry(4, "arm64", Some("v8")),
            ],
        };
        let cases = [
            ("amd64", None, Some(1)),
            ("arm", Some("v7"), Some(3)),
            ("arm", Some("v5"), Some(2)),
            ("arm64", Some("v8"), Some(4)),
            ("arm64", None, Some(4)),
            ("s390x", None, None),
        ];
        for (arch, variant, want) in cases {
            let got = select_platform(&index, "i", arch, variant)
                .ok()
                .map(|d| d.digest.clone());
            assert_eq!(got, want.map(d), "{arch} {variant:?}");
        }
    }
}
