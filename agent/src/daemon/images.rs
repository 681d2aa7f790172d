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

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use gantry::pb;
use gantry::pb::agent_message::Message as ToScheduler;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::instance::Env;
use crate::image::pull::{LayerState, PullError};
use crate::image::{Image, ImageError, ImageRef, ImageStore, ProgressSink, PullProgress};

/// Progress is sent at most this often.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// Progress is sent at least this often while a pull or import runs.
pub const KEEPALIVE_EVERY: Duration = Duration::from_secs(10);

/// gRPC codes of the reply.
mod code {
    pub const OK: i32 = 0;
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
    } = request;
    let action = pb::ImageAction::try_from(action).unwrap_or(pb::ImageAction::Unspecified);
    let mut reply = match action {
        pb::ImageAction::Pull => pull(&env, relay_id, &reference, out).await,
        pb::ImageAction::Import => {
            import(&env, relay_id, &upload_id, size_bytes, out, channel).await
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

/// Removes a spooled upload when the import is done with it.
struct Spooled(std::path::PathBuf);

impl Drop for Spooled {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
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
    let spooled = Spooled(path.clone());
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
        pb::ImageAction::Pull | pb::ImageAction::Import => error(
            code::INVALID_ARGUMENT,
            "pulls and imports are not store operations of their own".into(),
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
