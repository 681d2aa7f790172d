//! The agent's answer to the scheduler's `image_request` (`gantry image ls|rm|prune`): the
//! same operations as `gantry-agent image`, on the store the daemon owns.
//!
//! Removing an image a container holds is refused with FAILED_PRECONDITION naming the
//! instances (container id = instance id), whether the reference is a tag or a digest: a tag
//! untagged from a running image would leave it dangling, which is never what the caller of
//! `gantry image rm` wants. The store's `remove` re-checks the holds under its lock, so a
//! container created meanwhile still keeps its image.
//!
//! Pulls (`gantry image pull`) always ask the registry, with the daemon's registry settings
//! (the same [`crate::image::PullOptions`] instances pull with). Imports (`gantry image
//! import`) fetch the scheduler's upload with `Images.FetchUpload` over the session's
//! connection into `<data>/uploads/` (removed afterwards, whatever happens) and import it
//! with the store's `import` on a blocking thread. Both send `image_progress` while they run:
//! at most every [`PROGRESS_EVERY`] when something changed, and at least every
//! [`KEEPALIVE_EVERY`], which keeps the scheduler's idle timeout from firing during a long
//! unpack.
//!
//! Tags (`gantry image tag`) run the store's `tag`. Pushes (`gantry image push`) use the
//! registry settings pulls use (credentials, `config.json`, insecure registries) and send
//! per-layer progress like pulls. Saves (`gantry image save`) answer NOT_FOUND before anything
//! else when the node lacks the image; otherwise the store's `save` writes the tarball into
//! `<data>/saves/` on a blocking thread (removed afterwards, whatever happens), and the file
//! streams to the scheduler with `Images.DeliverSave`, its first chunk naming the slot. The
//! reply, sent once the delivery call has ended, is what tells the scheduler whether the
//! tarball went whole: a read error ends the delivery stream early and replies with an error.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use gantry::pb;
use gantry::pb::agent_message::Message as ToScheduler;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::instance::Env;
use crate::image::pull::{LayerState, PullError};
use crate::image::push::PushError;
use crate::image::{
    Image, ImageError, ImageRef, ImageStore, ProgressSink, PullProgress, PushOptions, PushReport,
};

/// Progress is sent at most this often.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// Progress is sent at least this often while a pull or import runs.
pub const KEEPALIVE_EVERY: Duration = Duration::from_secs(10);
/// Largest piece of a saved tarball sent to the scheduler.
const SAVE_CHUNK: usize = 1024 * 1024 - 1024;

/// gRPC codes of the reply.
mod code {
    pub const OK: i32 = 0;
    pub const CANCELLED: i32 = 1;
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const NOT_FOUND: i32 = 5;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const FAILED_PRECONDITION: i32 = 9;
    pub const INTERNAL: i32 = 13;
    pub const UNAVAILABLE: i32 = 14;
}

/// Answers an `image_request`; never fails: errors go into the reply's code and message.
/// Pulls and imports send their progress to `out` first; an import fetches its upload over
/// `channel`.
pub async fn answer(
    env: Arc<Env>,
    request: pb::ImageRequest,
    out: &mpsc::Sender<pb::AgentMessage>,
    channel: tonic::transport::Channel,
) -> pb::ImageReply {
    let pb::ImageRequest {
        relay_id,
        action,
        reference,
        upload_id,
        size_bytes,
        target,
    } = request;
    let action = pb::ImageAction::try_from(action).unwrap_or(pb::ImageAction::Unspecified);
    let mut reply = match action {
        pb::ImageAction::Pull => pull(&env, relay_id, &reference, out).await,
        pb::ImageAction::Import => {
            import(&env, relay_id, &upload_id, size_bytes, out, channel).await
        }
        pb::ImageAction::Push => push(&env, relay_id, &reference, out).await,
        pb::ImageAction::Save => save(&env, relay_id, &reference, &upload_id, out, channel).await,
        pb::ImageAction::Tag => {
            let store = env.images.clone();
            let done = tokio::task::spawn_blocking(move || match store.tag(&reference, &target) {
                Ok(image) => ok(vec![node_image(&image)], 0),
                Err(err) => store_error(err),
            })
            .await;
            done.unwrap_or_else(|err| error(code::INTERNAL, err.to_string()))
        }
        action => {
            let done =
                tokio::task::spawn_blocking(move || run(&env.images, action, &reference)).await;
            done.unwrap_or_else(|err| error(code::INTERNAL, err.to_string()))
        }
    };
    reply.relay_id = relay_id;
    reply
}

/// The layers of a pull's progress, as the wire carries them.
fn wire_layers(progress: &PullProgress) -> Vec<pb::LayerProgress> {
    progress
        .layers
        .iter()
        .map(|layer| pb::LayerProgress {
            digest: layer.digest.clone(),
            done_bytes: match layer.state {
                LayerState::Waiting => 0,
                LayerState::Downloading => layer.done.min(layer.total),
                LayerState::Done | LayerState::Exists => layer.total,
            },
            total_bytes: layer.total,
        })
        .collect()
}

/// Runs `work` to its end, sending `image_progress` with what `snapshot` says: when it
/// changed, at most every [`PROGRESS_EVERY`], and every [`KEEPALIVE_EVERY`] regardless. Never
/// waits on the session's queue (a frame that does not fit is skipped; the next has it all).
async fn with_progress<T>(
    work: impl std::future::Future<Output = T>,
    relay_id: u64,
    out: &mpsc::Sender<pb::AgentMessage>,
    mut snapshot: impl FnMut() -> Vec<pb::LayerProgress>,
) -> T {
    tokio::pin!(work);
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<Vec<pb::LayerProgress>> = None;
    let mut sent_at = tokio::time::Instant::now();
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = tick.tick() => {
                let layers = snapshot();
                let changed = last.as_ref() != Some(&layers);
                if !changed && sent_at.elapsed() < KEEPALIVE_EVERY {
                    continue;
                }
                let frame = pb::AgentMessage {
                    message: Some(ToScheduler::ImageProgress(pb::ImageProgress {
                        relay_id,
                        layers: layers.clone(),
                    })),
                };
                if out.try_send(frame).is_ok() {
                    last = Some(layers);
                    sent_at = tokio::time::Instant::now();
                }
            }
        }
    }
}

/// `IMAGE_ACTION_PULL`: pulls `reference`, always asking the registry.
async fn pull(
    env: &Arc<Env>,
    relay_id: u64,
    reference: &str,
    out: &mpsc::Sender<pb::AgentMessage>,
) -> pb::ImageReply {
    let parsed = match ImageRef::parse(reference) {
        Ok(parsed) => parsed,
        Err(err) => return error(code::INVALID_ARGUMENT, format!("{reference}: {err}")),
    };
    let (sink, progress) = ProgressSink::channel();
    let pulling = env.images.pull(&parsed, &env.pull, sink);
    let pulled = with_progress(pulling, relay_id, out, || wire_layers(&progress.borrow())).await;
    match pulled {
        Ok(image) => ok(vec![node_image(&image)], 0),
        Err(err) => pull_error(err),
    }
}

/// The code and message of a failed pull.
fn pull_error(err: ImageError) -> pb::ImageReply {
    let code = match &err {
        ImageError::Pull(PullError::NotFound { .. }) => code::NOT_FOUND,
        ImageError::Pull(PullError::Unauthorized { .. }) => code::PERMISSION_DENIED,
        ImageError::Pull(PullError::Registry { .. }) => code::UNAVAILABLE,
        ImageError::Reference(_) => code::INVALID_ARGUMENT,
        _ => code::INTERNAL,
    };
    error(code, err.to_string())
}

/// The push options of the daemon: the registry settings its pulls use.
fn push_options(pull: &crate::image::PullOptions) -> PushOptions {
    PushOptions {
        credentials: pull.credentials.clone(),
        docker_config: pull.docker_config.clone(),
        insecure_registries: pull.insecure_registries.clone(),
        max_concurrent_uploads: pull.max_concurrent_downloads,
        timeout: pull.timeout,
    }
}

/// `IMAGE_ACTION_PUSH`: pushes the image `reference` names to its registry.
async fn push(
    env: &Arc<Env>,
    relay_id: u64,
    reference: &str,
    out: &mpsc::Sender<pb::AgentMessage>,
) -> pb::ImageReply {
    let parsed = match ImageRef::parse(reference) {
        Ok(parsed) => parsed,
        Err(err) => return error(code::INVALID_ARGUMENT, format!("{reference}: {err}")),
    };
    let (sink, progress) = ProgressSink::channel();
    let options = push_options(&env.pull);
    let pushing = env.images.push(&parsed, &options, sink);
    let pushed = with_progress(pushing, relay_id, out, || wire_layers(&progress.borrow())).await;
    match pushed {
        Ok(report) => push_reply(report),
        Err(err) => push_error(err),
    }
}

fn push_reply(report: PushReport) -> pb::ImageReply {
    let PushReport {
        digest,
        uploaded,
        existing,
        bytes_uploaded,
    } = report;
    pb::ImageReply {
        pushed_blobs: u32::try_from(uploaded.len()).unwrap_or(u32::MAX),
        existing_blobs: u32::try_from(existing.len()).unwrap_or(u32::MAX),
        pushed_bytes: bytes_uploaded,
        digest,
        ..ok(Vec::new(), 0)
    }
}

/// The code and message of a failed push.
fn push_error(err: ImageError) -> pb::ImageReply {
    let code = match &err {
        ImageError::NotFound { .. } => code::NOT_FOUND,
        ImageError::Push(PushError::Unauthorized { .. }) => code::PERMISSION_DENIED,
        ImageError::Push(PushError::Unreachable { .. } | PushError::Registry { .. }) => {
            code::UNAVAILABLE
        }
        ImageError::Push(PushError::Credentials { .. }) => code::FAILED_PRECONDITION,
        ImageError::Reference(_) => code::INVALID_ARGUMENT,
        _ => code::INTERNAL,
    };
    let message = match err {
        ImageError::NotFound { reference } => format!("image {reference} not found on this node"),
        err => err.to_string(),
    };
    error(code, message)
}

/// A file removed when dropped, whatever happened meanwhile: a tarball saved for delivery, an
/// upload spooled for import.
struct RemovedOnDrop(std::path::PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `IMAGE_ACTION_SAVE`: writes the image `reference` names as a `docker save` tarball into a
/// file under `<data>/saves/`, then delivers the file to slot `slot_id` with
/// `Images.DeliverSave`. The file is removed afterwards, whatever happens.
async fn save(
    env: &Arc<Env>,
    relay_id: u64,
    reference: &str,
    slot_id: &str,
    out: &mpsc::Sender<pb::AgentMessage>,
    channel: tonic::transport::Channel,
) -> pb::ImageReply {
    if slot_id.is_empty() || !slot_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return error(
            code::INVALID_ARGUMENT,
            "image save without a valid slot id".into(),
        );
    }
    let sent = Arc::new(AtomicU64::new(0));
    let total = Arc::new(AtomicU64::new(0));
    let work = write_and_deliver(
        env,
        reference,
        slot_id,
        channel,
        sent.clone(),
        total.clone(),
    );
    let snapshot = || {
        vec![pb::LayerProgress {
            digest: String::new(),
            done_bytes: sent.load(Ordering::Relaxed),
            total_bytes: total.load(Ordering::Relaxed),
        }]
    };
    match with_progress(work, relay_id, out, snapshot).await {
        Ok(image) => ok(vec![node_image(&image)], 0),
        Err(reply) => reply,
    }
}

async fn write_and_deliver(
    env: &Arc<Env>,
    reference: &str,
    slot_id: &str,
    channel: tonic::transport::Channel,
    sent: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
) -> Result<Image, pb::ImageReply> {
    let internal = |what: String| error(code::INTERNAL, what);
    // The status dir is `<data>/instances`; saves go beside it.
    let data = env
        .status_dir
        .parent()
        .unwrap_or(&env.status_dir)
        .to_path_buf();
    let dir = data.join("saves");
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|err| internal(format!("creating {}: {err}", dir.display())))?;
    let path = dir.join(format!("{slot_id}.tar"));
    let saved = RemovedOnDrop(path.clone());
    let store = env.images.clone();
    let name = reference.to_owned();
    let written = tokio::task::spawn_blocking(move || {
        // Resolved first, so that a node without the image answers before any delivery.
        let image = store.resolve(&name)?.ok_or_else(|| ImageError::NotFound {
            reference: name.clone(),
        })?;
        let file = std::fs::File::create(&path).map_err(ImageError::io("creating", &path))?;
        let mut writer = std::io::BufWriter::new(file);
        store.save(&image.digest, &mut writer)?;
        let file = writer
            .into_inner()
            .map_err(|err| ImageError::io("writing", &path)(err.into_error()))?;
        file.sync_all().map_err(ImageError::io("writing", &path))?;
        Ok::<_, ImageError>(image)
    })
    .await
    .map_err(|err| internal(err.to_string()))?;
    let image = written.map_err(|err| match err {
        ImageError::NotFound { reference } => error(
            code::NOT_FOUND,
            format!("image {reference} not found on this node"),
        ),
        err => store_error(err),
    })?;
    let mut file = tokio::fs::File::open(&saved.0)
        .await
        .map_err(|err| internal(format!("opening {}: {err}", saved.0.display())))?;
    let size = file
        .metadata()
        .await
        .map_err(|err| internal(format!("reading {}: {err}", saved.0.display())))?
        .len();
    total.store(size, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel::<pb::SaveChunk>(4);
    let first = pb::SaveChunk {
        slot_id: slot_id.to_owned(),
        data: Vec::new(),
    };
    // The channel is empty: this fits.
    let _ = tx.try_send(first);
    let what = saved.0.display().to_string();
    let reader = tokio::spawn(async move {
        loop {
            let mut data = vec![0u8; SAVE_CHUNK];
            let n = match tokio::io::AsyncReadExt::read(&mut file, &mut data).await {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                // Ending the stream here is safe: the reply, not the stream's end, tells the
                // scheduler whether the tarball is whole.
                Err(err) => return Err(format!("reading {what}: {err}")),
            };
            data.truncate(n);
            sent.fetch_add(n as u64, Ordering::Relaxed);
            if tx
                .send(pb::SaveChunk {
                    slot_id: String::new(),
                    data,
                })
                .await
                .is_err()
            {
                // The call ended; it says why.
                return Ok(());
            }
        }
    });
    let mut client =
        pb::images_client::ImagesClient::new(channel).max_encoding_message_size(4 * 1024 * 1024);
    let delivered = client
        .deliver_save(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(what)) => return Err(internal(what)),
        Err(err) => return Err(internal(err.to_string())),
    }
    match delivered {
        Ok(_) => Ok(image),
        Err(status) => Err(error(
            if status.code() == tonic::Code::Cancelled {
                code::CANCELLED
            } else {
                code::UNAVAILABLE
            },
            format!(
                "delivering the saved image to the scheduler: {:?}: {}",
                status.code(),
                status.message()
            ),
        )),
    }
}

/// `IMAGE_ACTION_IMPORT`: fetches upload `upload_id` (`size` bytes) from the scheduler and
/// imports it.
async fn import(
    env: &Arc<Env>,
    relay_id: u64,
    upload_id: &str,
    size: u64,
    out: &mpsc::Sender<pb::AgentMessage>,
    channel: tonic::transport::Channel,
) -> pb::ImageReply {
    if upload_id.is_empty() || !upload_id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return error(
            code::INVALID_ARGUMENT,
            "image import without a valid upload id".into(),
        );
    }
    let fetched = Arc::new(AtomicU64::new(0));
    let work = fetch_and_import(env, upload_id, channel, fetched.clone());
    let snapshot = || {
        vec![pb::LayerProgress {
            digest: String::new(),
            done_bytes: fetched.load(Ordering::Relaxed),
            total_bytes: size,
        }]
    };
    match with_progress(work, relay_id, out, snapshot).await {
        Ok(images) => ok(images.iter().map(node_image).collect(), 0),
        Err(reply) => reply,
    }
}

async fn fetch_and_import(
    env: &Arc<Env>,
    upload_id: &str,
    channel: tonic::transport::Channel,
    fetched: Arc<AtomicU64>,
) -> Result<Vec<Image>, pb::ImageReply> {
    // The status dir is `<data>/instances`; uploads go beside it.
    let data = env
        .status_dir
        .parent()
        .unwrap_or(&env.status_dir)
        .to_path_buf();
    let dir = data.join("uploads");
    let internal = |what: String| error(code::INTERNAL, what);
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|err| internal(format!("creating {}: {err}", dir.display())))?;
    let path = dir.join(format!("{upload_id}.tar"));
    let spooled = RemovedOnDrop(path.clone());
    let mut file = tokio::fs::File::create(&path)
        .await
        .map_err(|err| internal(format!("creating {}: {err}", path.display())))?;
    let mut client =
        pb::images_client::ImagesClient::new(channel).max_decoding_message_size(4 * 1024 * 1024);
    let fetch_error = |status: tonic::Status| {
        error(
            code::UNAVAILABLE,
            format!(
                "fetching the upload from the scheduler: {:?}: {}",
                status.code(),
                status.message()
            ),
        )
    };
    let request = pb::FetchUploadRequest {
        upload_id: upload_id.to_owned(),
    };
    let mut stream = client
        .fetch_upload(request)
        .await
        .map_err(fetch_error)?
        .into_inner();
    while let Some(chunk) = stream.message().await.map_err(fetch_error)? {
        file.write_all(&chunk.data)
            .await
            .map_err(|err| internal(format!("writing {}: {err}", path.display())))?;
        fetched.fetch_add(chunk.data.len() as u64, Ordering::Relaxed);
    }
    file.flush()
        .await
        .map_err(|err| internal(format!("writing {}: {err}", path.display())))?;
    drop(file);
    let store = env.images.clone();
    let imported = tokio::task::spawn_blocking(move || {
        let file =
            std::fs::File::open(&spooled.0).map_err(ImageError::io("opening", &spooled.0))?;
        store.import(std::io::BufReader::new(file))
    })
    .await
    .map_err(|err| internal(err.to_string()))?;
    imported.map_err(|err| match err {
        err @ ImageError::Import(_) => error(
            code::INVALID_ARGUMENT,
            format!("importing the archive: {err}"),
        ),
        err => error(code::INTERNAL, format!("importing the archive: {err}")),
    })
}

fn ok(images: Vec<pb::NodeImage>, reclaimed_bytes: u64) -> pb::ImageReply {
    pb::ImageReply {
        relay_id: 0,
        code: code::OK,
        message: String::new(),
        images,
        reclaimed_bytes,
        pushed_blobs: 0,
        existing_blobs: 0,
        pushed_bytes: 0,
        digest: String::new(),
    }
}

fn error(code: i32, message: String) -> pb::ImageReply {
    pb::ImageReply {
        code,
        message,
        ..Default::default()
    }
}

fn node_image(image: &Image) -> pb::NodeImage {
    pb::NodeImage {
        digest: image.digest.clone(),
        references: image.references.clone(),
        size_bytes: image.size,
        node: String::new(),
    }
}

/// The code and message of a store error.
fn store_error(err: ImageError) -> pb::ImageReply {
    match err {
        ImageError::NotFound { reference } => error(
            code::NOT_FOUND,
            format!("image {reference} not found on this node"),
        ),
        ImageError::InUse { digest, containers } => in_use(&digest, &containers),
        err @ (ImageError::Reference(_) | ImageError::Ambiguous { .. }) => {
            error(code::INVALID_ARGUMENT, err.to_string())
        }
        err => error(code::INTERNAL, err.to_string()),
    }
}

fn in_use(reference: &str, instances: &[String]) -> pb::ImageReply {
    error(
        code::FAILED_PRECONDITION,
        format!(
            "image {reference} is used by instance {}; delete or update its workload first",
            instances.join(", ")
        ),
    )
}

/// Runs one action on the store. Blocking.
pub fn run(store: &ImageStore, action: pb::ImageAction, reference: &str) -> pb::ImageReply {
    match action {
        pb::ImageAction::Unspecified => error(
            code::INVALID_ARGUMENT,
            "image request without an action".into(),
        ),
        pb::ImageAction::Pull
        | pb::ImageAction::Import
        | pb::ImageAction::Push
        | pb::ImageAction::Save
        | pb::ImageAction::Tag => error(
            code::INVALID_ARGUMENT,
            "pulls, imports, pushes, saves and tags are not answered here".into(),
        ),
        pb::ImageAction::List => match store.list() {
            Ok(images) => ok(images.iter().map(node_image).collect(), 0),
            Err(err) => store_error(err),
        },
        pb::ImageAction::Remove => {
            let image = match store.resolve(reference) {
                Ok(Some(image)) => image,
                Ok(None) => {
                    return store_error(ImageError::NotFound {
                        reference: reference.to_owned(),
                    });
                }
                Err(err) => return store_error(err),
            };
            let holders: Vec<String> = store
                .holds()
                .into_iter()
                .filter(|(_, digest)| *digest == image.digest)
                .map(|(container, _)| container)
                .collect();
            if !holders.is_empty() {
                return in_use(reference, &holders);
            }
            match store.remove(reference) {
                Ok(()) => ok(vec![node_image(&image)], 0),
                Err(err) => store_error(err),
            }
        }
        pb::ImageAction::Prune => {
            // Sizes of the images as they were: the store forgets the ones it prunes.
            let sizes: std::collections::HashMap<String, u64> = store
                .list()
                .unwrap_or_default()
                .into_iter()
                .map(|image| (image.digest, image.size))
                .collect();
            match store.prune() {
                Ok(report) => {
                    let images = report
                        .images
                        .into_iter()
                        .map(|digest| pb::NodeImage {
                            size_bytes: sizes.get(&digest).copied().unwrap_or(0),
                            digest,
                            ..Default::default()
                        })
                        .collect();
                    ok(images, report.bytes)
                }
                Err(err) => store_error(err),
            }
        }
    }
}
