//! Image garbage collection, scheduled: every `interval` (5 minutes by default) and soon after
//! the agent removed a container, the store's filesystem is measured and kubelet's policy
//! ([`crate::image::gc`]) removes the least recently used images once usage passes the
//! high-water mark. What the collector must keep is built here: the images containers hold
//! (the store's own record) and the images every instance assigned to the node names, so an
//! instance between two runs, or about to mount its rootfs, keeps its image.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use super::instance::Env;
use super::session::Desired;
use crate::image::gc::GcPolicy;

/// How long after a removal the collector runs: removals come in bursts (a scale-down, a
/// rollout), one collection covers them all.
const AFTER_REMOVAL: Duration = Duration::from_secs(2);

/// The image references of the instances assigned to the node, as their workloads write them
/// (stopped instances included: their containers may start again).
pub fn assigned_images(desired: Option<&Desired>) -> Vec<String> {
    let Some(desired) = desired else {
        return Vec::new();
    };
    let set: BTreeSet<&str> = desired
        .instances
        .values()
        .filter_map(|a| a.spec.as_deref())
        .map(|spec| spec.image.as_str())
        .collect();
    set.into_iter().map(str::to_owned).collect()
}

/// Collects garbage until `shutdown`: at every `interval`, and 2 s after `removed`
/// is notified. A collection that fails is logged and tried again at the next occasion.
pub async fn run(
    env: Arc<Env>,
    policy: GcPolicy,
    interval: Duration,
    desired: watch::Receiver<Option<Desired>>,
    removed: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: an agent that starts on a full disk collects at once.
    loop {
        tokio::select! {
            () = super::session::stopped(&mut shutdown) => return,
            _ = tick.tick() => {}
            () = removed.notified() => {
                tokio::select! {
                    () = super::session::stopped(&mut shutdown) => return,
                    () = tokio::time::sleep(AFTER_REMOVAL) => {}
                }
            }
        }
        // Until the first assignment set, what is assigned is unknown: collect nothing.
        let Some(assigned) = desired.borrow().as_ref().map(|d| assigned_images(Some(d))) else {
            continue;
        };
        let images = env.images.clone();
        let result =
            tokio::task::spawn_blocking(move || images.collect_garbage(&policy, &assigned)).await;
        match result {
            Ok(Ok(report)) if !report.images.is_empty() => {
                info!(
                    images = report.images.len(),
                    bytes = report.bytes,
                    "image garbage collection removed unused images"
                );
                env.metrics.add_gc(report.images.len() as u64, report.bytes);
            }
            Ok(Ok(_)) => debug!("image garbage collection: nothing to remove"),
            Ok(Err(err)) => warn!(%err, "image garbage collection failed"),
            Err(err) => warn!(%err, "image garbage collection panicked"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Cursor;

    use gantry::workload::Workload;

    use super::*;
    use crate::daemon::reconcile::Assigned;
    use crate::image::ImageStore;
    use crate::image::gc::{Candidate, DiskUsage, in_use, select};

    fn workload(name: &str, image: &str) -> Arc<Workload> {
        let yaml = format!("kind: Service\nname: {name}\nimage: {image}\n");
        let mut parsed =
            gantry::workload::parse(&yaml, gantry::workload::Format::Yaml).expect("workload");
        Arc::new(parsed.remove(0))
    }

    fn assigned(spec: Option<Arc<Workload>>, stop: bool) -> Assigned {
        Assigned {
            workload: "w".to_owned(),
            generation: 1,
            spec,
            stop,
        }
    }

    /// A `docker save` tarball of a one-layer image tagged `tag` whose layer holds `content`.
    fn image_tar(tag: &str, content: &str) -> Vec<u8> {
        use sha2::{Digest as _, Sha256};
        let entry = |builder: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]| {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            builder.append_data(&mut header, path, data).unwrap();
        };
        let mut layer = tar::Builder::new(Vec::new());
        entry(&mut layer, "file", content.as_bytes());
        let layer = layer.into_inner().unwrap();
        let layer_hex = hex::encode(Sha256::digest(&layer));
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":["sha256:{layer_hex}"]}}}}"#
        );
        let config_hex = hex::encode(Sha256::digest(config.as_bytes()));
        let manifest = format!(
            r#"[{{"Config":"{config_hex}.json","RepoTags":["{tag}"],"Layers":["{layer_hex}/layer.tar"]}}]"#
        );
        let mut archive = tar::Builder::new(Vec::new());
        entry(&mut archive, &format!("{layer_hex}/layer.tar"), &layer);
        entry(
            &mut archive,
            &format!("{config_hex}.json"),
            config.as_bytes(),
        );
        entry(&mut archive, "manifest.json", manifest.as_bytes());
        archive.into_inner().unwrap()
    }

    #[test]
    fn assigned_images_of_the_desired_set() {
        assert!(assigned_images(None).is_empty());
        let desired = Desired {
            revision: 7,
            instances: BTreeMap::from([
                (
                    "a-1".to_owned(),
                    assigned(Some(workload("a", "busybox:1")), false),
                ),
                (
                    "a-2".to_owned(),
                    assigned(Some(workload("a", "busybox:1")), false),
                ),
                // Stopped, and may start again: its image stays.
                (
                    "b-1".to_owned(),
                    assigned(Some(workload("b", "gantry.test/b:2")), true),
                ),
                // Not described: nothing to name.
                ("c-1".to_owned(), assigned(None, true)),
            ]),
        };
        assert_eq!(
            assigned_images(Some(&desired)),
            vec!["busybox:1".to_owned(), "gantry.test/b:2".to_owned()]
        );
    }

    /// What the daemon hands the policy, built from a real store: an image a container holds
    /// and an image an assigned instance names are never selected, even on a full disk with
    /// every image old enough; an unused one is.
    #[test]
    fn the_policy_never_gets_an_image_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path().join("images")).unwrap();
        for (tag, content) in [
            ("gantry.test/held:1", "held"),
            ("gantry.test/assigned:1", "assigned"),
            ("gantry.test/unused:1", "unused"),
        ] {
            store.import(Cursor::new(image_tar(tag, content))).unwrap();
        }
        let held = store.resolve("gantry.test/held:1").unwrap().unwrap();
        store.mount_rootfs(&held, "held-1").unwrap();
        let desired = Desired {
            revision: 1,
            instances: BTreeMap::from([(
                "assigned-1".to_owned(),
                assigned(Some(workload("assigned", "gantry.test/assigned:1")), false),
            )]),
        };

        let images = store.list().unwrap();
        let keep = in_use(&images, &store.holds(), &assigned_images(Some(&desired)));
        let digest = |tag: &str| store.resolve(tag).unwrap().unwrap().digest;
        assert_eq!(
            keep,
            BTreeSet::from([
                digest("gantry.test/held:1"),
                digest("gantry.test/assigned:1")
            ])
        );
        let candidates: Vec<Candidate> = images.iter().map(Candidate::from).collect();
        let full = DiskUsage {
            capacity: 1 << 30,
            available: 0,
        };
        let later = images.iter().map(|i| i.created_at).max().unwrap() + 3600;
        let picked = select(&GcPolicy::default(), full, &candidates, &keep, later);
        assert_eq!(picked, vec![digest("gantry.test/unused:1")]);

        store.unmount_rootfs("held-1").unwrap();
    }
}
