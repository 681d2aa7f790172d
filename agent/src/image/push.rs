//! Pushing an image from the store to an OCI / Docker v2 registry with `oci-client`, as
//! `docker push` does.
//!
//! The blobs go as stored, so the registry ends up with the same digests: the compressed layers
//! (kept after unpacking for this and for `save`), then the config, then the manifest bytes
//! under the reference's tag (or digest). A blob the registry already has (`HEAD` on it) is not
//! sent, so pushing an image twice, or an image sharing layers with one pushed before, sends
//! only what is new. Each blob streams from its file in one `PUT` with its length (a
//! "monolithic" upload in `oci-client`'s terms: one request per blob, not one per 4 MiB chunk),
//! so a layer is never held in memory whole.
//!
//! Credentials and plain HTTP follow the pull's rules (see [`super::pull`]): explicit
//! credentials, else the registry's entry in a docker `config.json`, else anonymous; the bearer
//! token flow (Docker Hub) asks for `pull,push` on the repository. Only the stored manifest is
//! pushed: an image pulled through a multi-platform index goes up as its one platform's
//! manifest.

use std::path::PathBuf;
use std::time::Duration;

use futures_util::{StreamExt as _, TryStreamExt as _};
use oci_client::Client;
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use tokio::io::AsyncReadExt as _;

use super::manifest::MAX_MANIFEST_SIZE;
use super::pull::{
    Credentials, LayerProgress, LayerState, ProgressSink, PullError, oci_reference, registry_auth,
    registry_client,
};
use super::reference::ImageRef;
use super::store::ImageStore;
use super::{Image, ImageError};

/// Bytes read from a blob file per request body chunk.
const READ_CHUNK: usize = 256 << 10;

/// Why a push failed at the registry.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The registry refused the push (HTTP 401 or 403).
    #[error(
        "pushing {reference}: registry {registry} refused {who} (401 unauthorized){hint}",
        who = if *.anonymous { "an anonymous push" } else { "the credentials" },
        hint = if *.anonymous {
            ": give credentials for it in a docker config.json (--registry-config)"
        } else {
            ": check the user name and password, and that the user may push to this repository"
        }
    )]
    Unauthorized {
        /// The reference pushed to.
        reference: String,
        /// The registry host.
        registry: String,
        /// Whether no credentials were given.
        anonymous: bool,
    },
    /// The registry could not be reached.
    #[error(
        "pushing {reference}: registry {registry} is unreachable: {message}; check the address, \
         that the registry runs, and --insecure-registry for a plain-HTTP registry"
    )]
    Unreachable {
        /// The reference pushed to.
        reference: String,
        /// The registry host.
        registry: String,
        /// What the transport said.
        message: String,
    },
    /// Any other registry or transport failure.
    #[error("pushing {reference}: {message}")]
    Registry {
        /// The reference pushed to.
        reference: String,
        /// What the registry or the transport said.
        message: String,
    },
    /// The credentials file is unreadable or malformed.
    #[error("reading registry credentials {path}: {message}")]
    Credentials {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// How to push.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// Credentials for this push; they take precedence over `docker_config`.
    pub credentials: Option<Credentials>,
    /// A docker-style `config.json` to take credentials from.
    pub docker_config: Option<PathBuf>,
    /// Registries (`host` or `host:port`) reached over plain HTTP, besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// Blobs uploaded at once.
    pub max_concurrent_uploads: usize,
    /// Connection and read timeout.
    pub timeout: Duration,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            credentials: None,
            docker_config: None,
            insecure_registries: Vec::new(),
            max_concurrent_uploads: 3,
            timeout: Duration::from_secs(60),
        }
    }
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushReport {
    /// The manifest digest pushed (the registry's digest of the image).
    pub digest: String,
    /// Blobs sent (layers and config), by digest.
    pub uploaded: Vec<String>,
    /// Blobs the registry had already, by digest.
    pub existing: Vec<String>,
    /// Bytes of the blobs sent.
    pub bytes_uploaded: u64,
}

/// One blob to push: its digest and size, and its slot in the progress (layers only).
struct Upload {
    digest: String,
    size: u64,
    progress: Option<usize>,
}

impl ImageStore {
    /// Pushes the image `reference` names in the store to the registry and repository it
    /// names, under its tag (or digest). Progress per layer goes to `progress`; there
    /// [`LayerState::Downloading`] means bytes are being sent and [`LayerState::Exists`] that the
    /// registry had the layer. The store is not changed.
    pub async fn push(
        &self,
        reference: &ImageRef,
        options: &PushOptions,
        progress: ProgressSink,
    ) -> Result<PushReport, ImageError> {
        let name = reference.to_string();
        let store = self.clone();
        let (image, manifest, _lease) = tokio::task::spawn_blocking(move || {
            let image = store
                .resolve(&name)?
                .ok_or(ImageError::NotFound { reference: name })?;
            // The blobs stay while the push reads them, even if the image is removed meanwhile.
            let lease = store.lease();
            for digest in blob_digests(&image) {
                lease.add(digest);
            }
            let manifest = store
                .inner
                .blobs
                .read_small(&image.digest, MAX_MANIFEST_SIZE)?;
            // Checked before the registry is asked anything, so a damaged store fails clearly.
            let config = std::iter::once(("config", &image.config_digest));
            let layers = image.layers.iter().map(|l| ("layer", &l.digest));
            if let Some((what, digest)) = config
                .chain(layers)
                .find(|(_, d)| !store.inner.blobs.contains(d))
            {
                return Err(ImageError::MissingBlob {
                    what,
                    digest: digest.clone(),
                });
            }
            Ok::<_, ImageError>((image, manifest, lease))
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;

        let auth = registry_auth(
            reference,
            options.credentials.as_ref(),
            options.docker_config.as_deref(),
        )
        .map_err(|e| match e {
            PullError::Credentials { path, message } => PushError::Credentials { path, message },
            other => PushError::Registry {
                reference: reference.to_string(),
                message: other.to_string(),
            },
        })?;
        let anonymous = matches!(auth, RegistryAuth::Anonymous);
        let fail = |e: OciDistributionError| map_oci(reference, anonymous, e);
        let client = registry_client(
            &reference.registry,
            &options.insecure_registries,
            options.timeout,
            options.max_concurrent_uploads,
            true,
        );
        let oci_ref = oci_reference(reference);
        // Asks for a `pull,push` token now (bearer registries), so refused credentials fail
        // here, before any upload starts.
        client
            .auth(&oci_ref, &auth, oci_client::RegistryOperation::Push)
            .await
            .map_err(fail)?;

        progress.update(|p| {
            p.layers = image
                .layers
                .iter()
                .map(|l| LayerProgress {
                    digest: l.digest.clone(),
                    done: 0,
                    total: l.size,
                    state: LayerState::Waiting,
                })
                .collect();
        });
        let config_size = self
            .inner
            .blobs
            .size(&image.config_digest)?
            .ok_or_else(|| ImageError::MissingBlob {
                what: "config",
                digest: image.config_digest.clone(),
            })?;
        let mut uploads: Vec<Upload> = image
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| Upload {
                digest: l.digest.clone(),
                size: l.size,
                progress: Some(i),
            })
            .collect();
        // The config last: a registry may check that a manifest's blobs exist, never the order.
        uploads.push(Upload {
            digest: image.config_digest.clone(),
            size: config_size,
            progress: None,
        });

        let parallel = options.max_concurrent_uploads.max(1);
        // Built up front, as in the pull: a stream mapping through a closure over borrowed
        // uploads makes the future not `Send`.
        let sends: Vec<_> = uploads
            .iter()
            .map(|u| self.push_blob(&client, &oci_ref, u, &progress))
            .collect();
        let sent: Vec<Option<u64>> = futures_util::stream::iter(sends)
            .buffered(parallel)
            .map_err(fail)
            .try_collect()
            .await?;

        let media_type = image.media_type.parse().map_err(|_| PushError::Registry {
            reference: reference.to_string(),
            message: format!(
                "manifest media type {:?} is not a header value",
                image.media_type
            ),
        })?;
        client
            .push_manifest_raw(&oci_ref, manifest, media_type)
            .await
            .map_err(fail)?;

        let mut report = PushReport {
            digest: image.digest.clone(),
            uploaded: Vec::new(),
            existing: Vec::new(),
            bytes_uploaded: 0,
        };
        for (upload, sent) in uploads.iter().zip(sent) {
            match sent {
                Some(bytes) => {
                    report.uploaded.push(upload.digest.clone());
                    report.bytes_uploaded += bytes;
                }
                None => report.existing.push(upload.digest.clone()),
            }
        }
        Ok(report)
    }

    /// Sends one blob unless the registry has it; returns the bytes sent (`None`: it had it).
    async fn push_blob(
        &self,
        client: &Client,
        oci_ref: &oci_client::Reference,
        upload: &Upload,
        progress: &ProgressSink,
    ) -> Result<Option<u64>, OciDistributionError> {
        let report = |f: &dyn Fn(&mut LayerProgress)| {
            if let Some(i) = upload.progress {
                progress.layer(i, |l| f(l));
            }
        };
        if client.blob_exists(oci_ref, &upload.digest).await? {
            report(&|l| {
                l.state = LayerState::Exists;
                l.done = l.total;
            });
            return Ok(None);
        }
        report(&|l| l.state = LayerState::Downloading);
        let path = self
            .inner
            .blobs
            .path(&upload.digest)
            .map_err(|e| OciDistributionError::GenericError(Some(e.to_string())))?;
        let file = tokio::fs::File::open(&path).await?;
        let (sink, slot) = (progress.clone(), upload.progress);
        let body = futures_util::stream::try_unfold((file, 0u64), move |(mut file, sent)| {
            let sink = sink.clone();
            async move {
                let mut buf = bytes::BytesMut::zeroed(READ_CHUNK);
                let n = file.read(&mut buf).await?;
                if n == 0 {
                    return Ok(None);
                }
                buf.truncate(n);
                let sent = sent + n as u64;
                if let Some(i) = slot {
                    sink.layer(i, |l| l.done = sent);
                }
                Ok::<_, OciDistributionError>(Some((buf.freeze(), (file, sent))))
            }
        });
        client
            .push_blob_stream(oci_ref, body, &upload.digest, Some(upload.size))
            .await?;
        report(&|l| {
            l.state = LayerState::Done;
            l.done = l.total;
        });
        Ok(Some(upload.size))
    }
}

/// The blobs an image's push reads: manifest, config and layers.
fn blob_digests(image: &Image) -> Vec<String> {
    let mut digests = vec![image.digest.clone(), image.config_digest.clone()];
    digests.extend(image.layers.iter().map(|l| l.digest.clone()));
    digests
}

/// The HTTP status an `oci-client` error carries, if any.
fn status_of(e: &OciDistributionError) -> Option<u16> {
    match e {
        OciDistributionError::ServerError { code, .. } => Some(*code),
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => Some(401),
        OciDistributionError::RequestError(e) => e.status().map(|s| s.as_u16()),
        OciDistributionError::RegistryError { envelope, .. }
            if envelope
                .errors
                .iter()
                .any(|e| matches!(e.code, OciErrorCode::Unauthorized | OciErrorCode::Denied)) =>
        {
            Some(401)
        }
        _ => None,
    }
}

/// The message of an error and of its sources: reqwest hides the cause ("connection refused")
/// in the chain.
fn chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = s.source();
    }
    message
}

fn map_oci(reference: &ImageRef, anonymous: bool, e: OciDistributionError) -> ImageError {
    let registry = reference.registry.clone();
    let reference = reference.to_string();
    let err = match status_of(&e) {
        Some(401 | 403) => PushError::Unauthorized {
            reference,
            registry,
            anonymous,
        },
        _ => match &e {
            OciDistributionError::RequestError(r) if r.is_connect() || r.is_timeout() => {
                PushError::Unreachable {
                    reference,
                    registry,
                    message: chain(&e),
                }
            }
            _ => PushError::Registry {
                reference,
                message: chain(&e),
            },
        },
    };
    err.into()
}
