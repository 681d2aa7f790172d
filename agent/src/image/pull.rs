//! Pulling images from OCI / Docker v2 registries with `oci-client`, blob by blob into the
//! blob store (never the whole image in memory).
//!
//! The manifest is fetched with every accepted media type; an index or manifest list is
//! resolved to `linux/<host architecture>`. The config and the layers stream into the blob
//! store (layers in parallel, [`PullOptions::max_concurrent_downloads`] at a time), each
//! verified against its descriptor's digest and size; a blob already stored is not fetched, and
//! concurrent pulls of one blob share one download. Progress per layer is published on a
//! `tokio::sync::watch` channel.
//!
//! Authentication: explicit credentials, else the registry's entry in a docker-style
//! `config.json` (`auths.<registry>.auth` or `username`/`password`; credential helpers are not
//! run), else anonymous; oci-client does the bearer-token dance (Docker Hub) or basic auth as
//! the registry's challenge asks. Plain HTTP is used only for registries listed as insecure and
//! for loopback registries (`localhost`, `127.0.0.0/8`, `::1`), as Docker does.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use futures_util::{StreamExt as _, TryStreamExt as _};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use super::blob::BlobError;
use super::manifest::{self, ACCEPTED_MANIFESTS, Descriptor, MAX_MANIFEST_SIZE, Parsed};
use super::reference::{ImageRef, PullDecision, PullPolicy};
use super::store::{ImageStore, Lease};
use super::{Image, ImageError};

/// Why a pull failed at the registry.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The registry refused the credentials (or demands some).
    #[error("pulling {reference}: unauthorized (wrong or missing credentials)")]
    Unauthorized {
        /// The reference pulled.
        reference: String,
    },
    /// The repository, tag or digest does not exist.
    #[error("pulling {reference}: not found in the registry")]
    NotFound {
        /// The reference pulled.
        reference: String,
    },
    /// The registry sent something other than what was asked for.
    #[error("pulling {reference}: registry returned {what} {actual}, expected {expected}")]
    Mismatch {
        /// The reference pulled.
        reference: String,
        /// What was checked.
        what: &'static str,
        /// What was expected.
        expected: String,
        /// What came.
        actual: String,
    },
    /// Any other registry or transport failure.
    #[error("pulling {reference}: {message}")]
    Registry {
        /// The reference pulled.
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

/// User name and password for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Credentials for this pull; they take precedence over `docker_config`.
    pub credentials: Option<Credentials>,
    /// A docker-style `config.json` to take credentials from.
    pub docker_config: Option<PathBuf>,
    /// Registries (`host` or `host:port`) reached over plain HTTP, besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// Layers downloaded at once.
    pub max_concurrent_downloads: usize,
    /// Architecture and variant to pick from an index; `None` means the host's.
    pub platform: Option<(String, Option<String>)>,
    /// Connection and read timeout.
    pub timeout: Duration,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            credentials: None,
            docker_config: None,
            insecure_registries: Vec::new(),
            max_concurrent_downloads: 3,
            platform: None,
            timeout: Duration::from_secs(60),
        }
    }
}

/// Where a layer's download stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerState {
    /// Not started (waiting for a download slot).
    Waiting,
    /// Bytes are arriving.
    Downloading,
    /// Downloaded and verified.
    Done,
    /// Already in the store: not downloaded.
    Exists,
}

/// One layer's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerProgress {
    /// The layer blob's digest.
    pub digest: String,
    /// Bytes received.
    pub done: u64,
    /// The blob's size.
    pub total: u64,
    /// Where it stands.
    pub state: LayerState,
}

/// A pull's progress, layer by layer (bottom first).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PullProgress {
    /// The image's layers; empty until the manifest is known.
    pub layers: Vec<LayerProgress>,
}

/// A pull's progress summed over its layers: what an instance status shows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PullTotals {
    /// Bytes of the layers that are done, in the store already, or arriving.
    pub bytes_done: u64,
    /// Bytes of all the layers.
    pub bytes_total: u64,
    /// Layers downloaded or found in the store.
    pub layers_done: u32,
    /// Layers of the image.
    pub layers_total: u32,
    /// Bytes that came over the network (layers already stored count in `bytes_done`, not
    /// here): what the pull cost.
    pub downloaded: u64,
}

impl PullProgress {
    /// The sums over the layers. A layer found in the store counts as done, so an image that
    /// shares most of its layers shows most of its bytes done at once, as `docker pull` does.
    pub fn totals(&self) -> PullTotals {
        let mut t = PullTotals {
            layers_total: u32::try_from(self.layers.len()).unwrap_or(u32::MAX),
            ..PullTotals::default()
        };
        for layer in &self.layers {
            t.bytes_total += layer.total;
            // A registry may send more than the descriptor said (the blob store refuses it
            // later); the sum never shows more than all.
            let done = layer.done.min(layer.total);
            match layer.state {
                LayerState::Waiting => {}
                LayerState::Downloading => {
                    t.bytes_done += done;
                    t.downloaded += layer.done;
                }
                LayerState::Done => {
                    t.bytes_done += layer.total;
                    t.downloaded += layer.done;
                    t.layers_done += 1;
                }
                LayerState::Exists => {
                    t.bytes_done += layer.total;
                    t.layers_done += 1;
                }
            }
        }
        t
    }
}

/// Runs `pull` to its end while calling `report` with the progress's totals at most once per
/// `every` (and only when they changed): a status report per received chunk would flood the
/// scheduler. The last totals are not reported here; the caller has the pull's result.
pub async fn follow<T>(
    pull: impl std::future::Future<Output = T>,
    mut progress: watch::Receiver<PullProgress>,
    every: Duration,
    mut report: impl FnMut(PullTotals),
) -> T {
    tokio::pin!(pull);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = None;
    loop {
        tokio::select! {
            result = &mut pull => return result,
            _ = tick.tick() => {
                if !progress.has_changed().unwrap_or(false) {
                    continue;
                }
                let totals = progress.borrow_and_update().totals();
                if last != Some(totals) {
                    last = Some(totals);
                    report(totals);
                }
            }
        }
    }
}

/// Where a pull reports progress: nowhere, or a watch channel whose receivers see the latest
/// state (so a slow reader never slows the download).
#[derive(Debug, Clone, Default)]
pub struct ProgressSink(Option<Arc<watch::Sender<PullProgress>>>);

impl ProgressSink {
    /// Reports nothing.
    pub fn none() -> ProgressSink {
        ProgressSink(None)
    }

    /// A sink and a receiver of its updates.
    pub fn channel() -> (ProgressSink, watch::Receiver<PullProgress>) {
        let (tx, rx) = watch::channel(PullProgress::default());
        (ProgressSink(Some(Arc::new(tx))), rx)
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut PullProgress)) {
        if let Some(tx) = &self.0 {
            tx.send_modify(f);
        }
    }

    pub(crate) fn layer(&self, index: usize, f: impl FnOnce(&mut LayerProgress)) {
        self.update(|p| {
            if let Some(l) = p.layers.get_mut(index) {
                f(l);
            }
        });
    }
}

/// Whether a registry is reached over plain HTTP: a loopback one, or one `insecure` lists (as
/// `host:port` or `host`). Pushes follow the same rule.
pub(crate) fn is_insecure_registry(registry: &str, insecure: &[String]) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => host,
        _ => registry,
    };
    let loopback = host == "localhost"
        || host == "[::1]"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback());
    loopback || insecure.iter().any(|r| r == registry || r == host)
}

/// A registry client for `registry`: HTTPS unless the registry is insecure, with timeouts.
pub(crate) fn registry_client(
    registry: &str,
    insecure: &[String],
    timeout: Duration,
    concurrency: usize,
    monolithic_push: bool,
) -> Client {
    let mut config = ClientConfig {
        protocol: if is_insecure_registry(registry, insecure) {
            ClientProtocol::HttpsExcept(vec![registry.to_string()])
        } else {
            ClientProtocol::Https
        },
        platform_resolver: None,
        max_concurrent_download: concurrency.max(1),
        max_concurrent_upload: concurrency.max(1),
        use_monolithic_push: monolithic_push,
        connect_timeout: Some(timeout),
        read_timeout: Some(timeout),
        ..ClientConfig::default()
    };
    config.user_agent = "gantry-agent";
    Client::new(config)
}

/// The `oci-client` reference of an image reference (a bare name means `latest`).
pub(crate) fn oci_reference(reference: &ImageRef) -> Reference {
    let (registry, repository) = (reference.registry.clone(), reference.repository.clone());
    match (&reference.tag, &reference.digest) {
        (Some(tag), Some(digest)) => {
            Reference::with_tag_and_digest(registry, repository, tag.clone(), digest.clone())
        }
        (_, Some(digest)) => Reference::with_digest(registry, repository, digest.clone()),
        (Some(tag), None) => Reference::with_tag(registry, repository, tag.clone()),
        (None, None) => Reference::with_tag(
            registry,
            repository,
            super::reference::DEFAULT_TAG.to_string(),
        ),
    }
}

#[derive(serde::Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(serde::Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

/// The registry a `config.json` key names: `https://index.docker.io/v1/` is `docker.io`.
fn config_key_registry(key: &str) -> String {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = key.split('/').next().unwrap_or(key);
    match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
        other => other.to_string(),
    }
}

/// The credentials for `registry` in a docker `config.json`, if it has any.
pub fn credentials_from_docker_config(
    data: &[u8],
    registry: &str,
) -> Result<Option<RegistryAuth>, String> {
    let config: DockerConfig = serde_json::from_slice(data).map_err(|e| e.to_string())?;
    let Some((_, entry)) = config
        .auths
        .iter()
        .find(|(key, _)| config_key_registry(key) == registry)
    else {
        return Ok(None);
    };
    if let Some(token) = &entry.registrytoken {
        return Ok(Some(RegistryAuth::Bearer(token.clone())));
    }
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok(Some(RegistryAuth::Basic(u.clone(), p.clone())));
    }
    if let Some(auth) = &entry.auth {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|e| format!("auth of {registry} is not base64: {e}"))?;
        let decoded =
            String::from_utf8(decoded).map_err(|_| format!("auth of {registry} is not UTF-8"))?;
        let (u, p) = decoded
            .split_once(':')
            .ok_or_else(|| format!("auth of {registry} is not user:password"))?;
        return Ok(Some(RegistryAuth::Basic(u.to_string(), p.to_string())));
    }
    Ok(None)
}

fn auth_for(reference: &ImageRef, options: &PullOptions) -> Result<RegistryAuth, PullError> {
    registry_auth(
        reference,
        options.credentials.as_ref(),
        options.docker_config.as_deref(),
    )
}

/// The credentials to present to `reference`'s registry: `credentials`, else its entry in the
/// docker `config.json` at `docker_config` (a missing file means none), else anonymous.
pub(crate) fn registry_auth(
    reference: &ImageRef,
    credentials: Option<&Credentials>,
    docker_config: Option<&std::path::Path>,
) -> Result<RegistryAuth, PullError> {
    if let Some(c) = credentials {
        return Ok(RegistryAuth::Basic(c.username.clone(), c.password.clone()));
    }
    let Some(path) = docker_config else {
        return Ok(RegistryAuth::Anonymous);
    };
    let cred_err = |message: String| PullError::Credentials {
        path: path.to_path_buf(),
        message,
    };
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RegistryAuth::Anonymous),
        Err(e) => return Err(cred_err(e.to_string())),
    };
    Ok(credentials_from_docker_config(&data, &reference.registry)
        .map_err(cred_err)?
        .unwrap_or(RegistryAuth::Anonymous))
}

fn map_oci(reference: &ImageRef, e: OciDistributionError) -> PullError {
    let reference = reference.to_string();
    let unauthorized = || PullError::Unauthorized {
        reference: reference.clone(),
    };
    let not_found = || PullError::NotFound {
        reference: reference.clone(),
    };
    match e {
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => unauthorized(),
        OciDistributionError::ImageManifestNotFoundError(_) => not_found(),
        OciDistributionError::ServerError {
            code: 401 | 403, ..
        } => unauthorized(),
        OciDistributionError::ServerError { code: 404, .. } => not_found(),
        OciDistributionError::RegistryError { ref envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::BlobUnknown
                )
            }) {
                not_found()
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                unauthorized()
            } else {
                PullError::Registry {
                    reference,
                    message: e.to_string(),
                }
            }
        }
        other => PullError::Registry {
            reference,
            message: other.to_string(),
        },
    }
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Runs blocking store work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ImageError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

impl ImageStore {
    /// The image for `reference` under a pull policy: the stored one, or a fresh pull.
    pub async fn ensure(
        &self,
        reference: &ImageRef,
        policy: PullPolicy,
        options: &PullOptions,
        progress: ProgressSink,
    ) -> Result<Image, ImageError> {
        let local = self.resolve(&reference.to_string())?;
        match (policy.decide(local.is_some()), local) {
            (PullDecision::UseLocal, Some(image)) => Ok(image),
            (PullDecision::Missing, _) | (PullDecision::UseLocal, None) => {
                Err(ImageError::NotFound {
                    reference: reference.to_string(),
                })
            }
            (PullDecision::Pull, _) => self.pull(reference, options, progress).await,
        }
    }

    /// Pulls an image and records it under `reference`; returns it once its layers are
    /// unpacked. Blobs already stored are not downloaded again; after a failure nothing of
    /// this pull is left in the store.
    pub async fn pull(
        &self,
        reference: &ImageRef,
        options: &PullOptions,
        progress: ProgressSink,
    ) -> Result<Image, ImageError> {
        let result = self.pull_image(reference, options, progress).await;
        if result.is_ok() {
            return result;
        }
        let store = self.clone();
        blocking(move || store.clean_up_after(result)).await
    }

    async fn pull_image(
        &self,
        reference: &ImageRef,
        options: &PullOptions,
        progress: ProgressSink,
    ) -> Result<Image, ImageError> {
        let lease = Arc::new(self.lease());
        let client = registry_client(
            &reference.registry,
            &options.insecure_registries,
            options.timeout,
            options.max_concurrent_downloads,
            false,
        );
        let auth = auth_for(reference, options)?;
        let oci_ref = oci_reference(reference);

        let (data, digest) = self
            .fetch_manifest(
                &client,
                &auth,
                reference,
                &oci_ref,
                reference.digest.as_deref(),
            )
            .await?;
        let (data, digest, index_digest) = match manifest::parse(&data, &digest, None)? {
            Parsed::Manifest(_) => (data, digest, None),
            Parsed::Index(index) => {
                let (arch, variant) = match &options.platform {
                    Some((a, v)) => (a.clone(), v.clone()),
                    None => {
                        let (a, v) = manifest::host_platform();
                        (a.to_string(), v.map(str::to_string))
                    }
                };
                let chosen = manifest::select_platform(&index, &digest, &arch, variant.as_deref())?;
                let by_digest = Reference::with_digest(
                    reference.registry.clone(),
                    reference.repository.clone(),
                    chosen.digest.clone(),
                );
                let (data, chosen_digest) = self
                    .fetch_manifest(&client, &auth, reference, &by_digest, Some(&chosen.digest))
                    .await?;
                (data, chosen_digest, Some(digest))
            }
        };
        let Parsed::Manifest(m) = manifest::parse(&data, &digest, None)? else {
            return Err(manifest::ManifestError::UnsupportedMediaType {
                media_type: "nested index".into(),
                digest,
            }
            .into());
        };

        // The manifest goes in first so the layers' lease and record can refer to it.
        let store = self.clone();
        let (l, d) = (lease.clone(), digest.clone());
        blocking(move || {
            store
                .inner
                .blobs
                .write_from_with(&data[..], "manifest", Some(&d), None, |x| l.add(x))?;
            Ok(())
        })
        .await?;

        progress.update(|p| {
            p.layers = m
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
        self.fetch_blob(&client, reference, &oci_ref, &m.config, &lease, None)
            .await?;
        let parallel = options.max_concurrent_downloads.max(1);
        // The futures are made up front: a stream mapping through a closure over borrowed
        // descriptors makes the whole pull future not `Send` (a rustc limitation with
        // higher-ranked lifetimes), and callers spawn it.
        let fetches: Vec<_> = m
            .layers
            .iter()
            .enumerate()
            .map(|(i, layer)| {
                self.fetch_blob(
                    &client,
                    reference,
                    &oci_ref,
                    layer,
                    &lease,
                    Some((&progress, i)),
                )
            })
            .collect();
        futures_util::stream::iter(fetches)
            .buffer_unordered(parallel)
            .try_collect::<Vec<()>>()
            .await?;

        let store = self.clone();
        let reference = reference.clone();
        blocking(move || {
            store.commit_image(&lease, &digest, None, index_digest.as_deref(), &[reference])
        })
        .await
    }

    /// Fetches a manifest and checks its digest (against `expected` when the reference pins
    /// one) and size.
    async fn fetch_manifest(
        &self,
        client: &Client,
        auth: &RegistryAuth,
        reference: &ImageRef,
        oci_ref: &Reference,
        expected: Option<&str>,
    ) -> Result<(bytes::Bytes, String), ImageError> {
        let (data, _) = client
            .pull_manifest_raw(oci_ref, auth, ACCEPTED_MANIFESTS)
            .await
            .map_err(|e| map_oci(reference, e))?;
        if data.len() as u64 > MAX_MANIFEST_SIZE {
            return Err(PullError::Registry {
                reference: reference.to_string(),
                message: format!("manifest of {} bytes is too large", data.len()),
            }
            .into());
        }
        let digest = sha256(&data);
        if let Some(expected) = expected
            && expected != digest
        {
            return Err(PullError::Mismatch {
                reference: reference.to_string(),
                what: "manifest digest",
                expected: expected.to_string(),
                actual: digest,
            }
            .into());
        }
        Ok((data, digest))
    }

    /// Downloads one blob into the store unless it is there; one download per digest at a
    /// time across the store.
    async fn fetch_blob(
        &self,
        client: &Client,
        reference: &ImageRef,
        oci_ref: &Reference,
        desc: &Descriptor,
        lease: &Arc<Lease>,
        progress: Option<(&ProgressSink, usize)>,
    ) -> Result<(), ImageError> {
        let report = |f: &dyn Fn(&mut LayerProgress)| {
            if let Some((sink, i)) = progress {
                sink.layer(i, |l| f(l));
            }
        };
        lease.add(desc.digest.clone());
        let _downloading = self.inner.blobs.lock(&desc.digest).await;
        if self.inner.blobs.contains(&desc.digest) {
            report(&|l| {
                l.state = LayerState::Exists;
                l.done = l.total;
            });
            return Ok(());
        }
        report(&|l| l.state = LayerState::Downloading);
        let mut stream = client
            .pull_blob_stream(oci_ref, desc.digest.as_str())
            .await
            .map_err(|e| map_oci(reference, e))?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(16);
        let store = self.clone();
        let (digest, size) = (desc.digest.clone(), desc.size);
        // The digest is leased above; the writer holds no lease of its own, so a pull that
        // failed and dropped its downloads releases everything at once.
        let writer = tokio::task::spawn_blocking(move || -> Result<(), BlobError> {
            let mut w = store.inner.blobs.writer(Some(&digest), Some(size))?;
            while let Some(chunk) = rx.blocking_recv() {
                w.write_chunk(&chunk)?;
            }
            w.commit()?;
            Ok(())
        });
        let mut done = 0u64;
        let mut stream_error = None;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => {
                    done += chunk.len() as u64;
                    report(&|l| l.done = done);
                    if tx.send(chunk).await.is_err() {
                        break; // The writer failed; its error is reported below.
                    }
                }
                Err(e) => {
                    stream_error = Some(e);
                    break;
                }
            }
        }
        drop(tx);
        let written = writer
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        if let Some(e) = stream_error {
            // Whatever the writer made of a cut stream, it did not commit it.
            return Err(PullError::Registry {
                reference: reference.to_string(),
                message: format!("downloading {}: {e}", desc.digest),
            }
            .into());
        }
        written?;
        report(&|l| l.state = LayerState::Done);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(total: u64, done: u64, state: LayerState) -> LayerProgress {
        LayerProgress {
            digest: format!("sha256:{total}"),
            done,
            total,
            state,
        }
    }

    #[test]
    fn totals_sum_the_layers() {
        use LayerState::*;
        let check = |layers: Vec<LayerProgress>, want: (u64, u64, u32, u32, u64)| {
            let t = PullProgress {
                layers: layers.clone(),
            }
            .totals();
            let got = (
                t.bytes_done,
                t.bytes_total,
                t.layers_done,
                t.layers_total,
                t.downloaded,
            );
            assert_eq!(got, want, "{layers:?}");
        };
        // Manifest not known yet.
        check(vec![], (0, 0, 0, 0, 0));
        // Waiting layers count in the total only.
        check(
            vec![layer(100, 0, Waiting), layer(50, 0, Waiting)],
            (0, 150, 0, 2, 0),
        );
        // Arriving bytes, a finished layer, a layer found in the store (done, not downloaded).
        check(
            vec![
                layer(100, 40, Downloading),
                layer(50, 50, Done),
                layer(1000, 1000, Exists),
            ],
            (1090, 1150, 2, 3, 90),
        );
        // A registry sending more than the descriptor says never shows more than all.
        check(vec![layer(10, 15, Downloading)], (10, 10, 0, 1, 15));
    }

    #[tokio::test(start_paused = true)]
    async fn follow_reports_at_most_every_interval_and_only_changes() {
        let (sink, rx) = ProgressSink::channel();
        let pull = {
            let sink = sink.clone();
            async move {
                sink.update(|p| p.layers = vec![layer(1000, 0, LayerState::Waiting)]);
                // 100 chunks, one every 20 ms: 2 s of download.
                for i in 1..=100u64 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    sink.layer(0, |l| {
                        l.state = LayerState::Downloading;
                        l.done = i * 10;
                    });
                }
                // Then 2 s of unpacking with no change.
                tokio::time::sleep(Duration::from_secs(2)).await;
                "pulled"
            }
        };
        let mut reports = Vec::new();
        let started = tokio::time::Instant::now();
        let result = follow(pull, rx, Duration::from_millis(500), |t| {
            reports.push((started.elapsed(), t.bytes_done))
        })
        .await;
        assert_eq!(result, "pulled");
        // Ticks at 0, 0.5, 1, 1.5, 2 (and 2.5) s, the first seeing only the manifest (when the
        // pull ran first); nothing once the download ended, although the pull runs 2 s longer.
        assert!(
            (4..=6).contains(&reports.len()),
            "{} reports: {reports:?}",
            reports.len()
        );
        for pair in reports.windows(2) {
            assert!(
                pair[1].0 - pair[0].0 >= Duration::from_millis(500),
                "{reports:?}"
            );
            assert!(
                pair[1].1 > pair[0].1,
                "only changes are reported: {reports:?}"
            );
        }
        assert!(
            reports.last().unwrap().0 <= Duration::from_millis(2500),
            "{reports:?}"
        );
    }

    #[test]
    fn insecure_only_for_loopback_and_listed() {
        let listed = PullOptions {
            insecure_registries: vec!["reg.lan:5000".into(), "other.lan".into()],
            ..PullOptions::default()
        };
        let cases = [
            ("localhost:5000", true),
            ("localhost", true),
            ("127.0.0.1:5000", true),
            ("127.1.2.3", true),
            ("[::1]:5000", true),
            ("docker.io", false),
            ("reg.lan:5000", true),
            ("reg.lan:5001", false),
            ("other.lan:443", true),
            ("128.0.0.1:5000", false),
        ];
        for (registry, want) in cases {
            assert_eq!(
                is_insecure_registry(registry, &listed.insecure_registries),
                want,
                "{registry}"
            );
        }
    }

    #[test]
    fn reads_docker_config_credentials() {
        let b64 = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        let json = format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{b64}"}},
                "127.0.0.1:5000": {{"username": "bob", "password": "pw"}},
                "http://tok.example/v2/": {{"registrytoken": "T"}}
            }}, "credsStore": "desktop"}}"#
        );
        let get = |r| credentials_from_docker_config(json.as_bytes(), r).unwrap();
        assert!(
            matches!(get("docker.io"), Some(RegistryAuth::Basic(u, p)) if u == "alice" && p == "s3cret")
        );
        assert!(matches!(get("127.0.0.1:5000"), Some(RegistryAuth::Basic(u, _)) if u == "bob"));
        assert!(matches!(get("tok.example"), Some(RegistryAuth::Bearer(t)) if t == "T"));
        assert!(get("quay.io").is_none());
        let bad = r#"{"auths": {"x.io": {"auth": "!!"}}}"#;
        assert!(credentials_from_docker_config(bad.as_bytes(), "x.io").is_err());
        let debug = format!(
            "{:?}",
            Credentials {
                username: "u".into(),
                password: "hunter2".into()
            }
        );
        assert!(!debug.contains("hunter2"));
    }
}
