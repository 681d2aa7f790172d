//! The agent's answer to the scheduler's `image_request` (`gantry image ls|rm|prune`): the
//! same operations as `gantry-agent image`, on the store the daemon owns.
//!
//! Removing an image a container holds is refused with FAILED_PRECONDITION naming the
//! instances (container id = instance id), whether the reference is a tag or a digest: a tag
//! untagged from a running image would leave it dangling, which is never what the caller of
//! `gantry image rm` wants. The store's `remove` re-checks the holds under its lock, so a
//! container created meanwhile still keeps its image.

use std::sync::Arc;

use gantry::pb;

use super::instance::Env;
use crate::image::{Image, ImageError, ImageStore};

/// gRPC codes of the reply.
mod code {
    pub const OK: i32 = 0;
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const NOT_FOUND: i32 = 5;
    pub const FAILED_PRECONDITION: i32 = 9;
    pub const INTERNAL: i32 = 13;
}

/// Answers an `image_request`; never fails: errors go into the reply's code and message.
pub async fn answer(env: Arc<Env>, request: pb::ImageRequest) -> pb::ImageReply {
    let pb::ImageRequest {
        relay_id,
        action,
        reference,
    } = request;
    let action = pb::ImageAction::try_from(action).unwrap_or(pb::ImageAction::Unspecified);
    let done = tokio::task::spawn_blocking(move || run(&env.images, action, &reference)).await;
    let mut reply = done.unwrap_or_else(|err| error(code::INTERNAL, err.to_string()));
    reply.relay_id = relay_id;
    reply
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
    let ok = |images: Vec<pb::NodeImage>, reclaimed_bytes: u64| pb::ImageReply {
        relay_id: 0,
        code: code::OK,
        message: String::new(),
        images,
        reclaimed_bytes,
    };
    match action {
        pb::ImageAction::Unspecified => error(
            code::INVALID_ARGUMENT,
            "image request without an action".into(),
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
