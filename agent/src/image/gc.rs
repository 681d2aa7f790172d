//! Image garbage collection: kubelet's policy as a pure function of disk usage, the images with
//! their sizes and times, the images containers hold, and the current time; and the executor
//! that measures the disk and removes what the policy picked.
//!
//! When usage reaches the high-water mark (85%), unused images are deleted, least recently
//! used first, until the freed bytes would bring usage down to the low-water mark (80%). An
//! image the store got less than `min_age` (2 minutes) ago is never picked, so a pull is not
//! undone before its container starts; an image a container holds is never picked, nor one
//! that an instance assigned to the node names (see [`in_use`]).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use super::reference::ImageRef;
use super::store::{ImageStore, PruneReport, now};
use super::{Image, ImageError};

/// The thresholds of the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcPolicy {
    /// Disk usage (percent) at which collection starts.
    pub high_percent: u8,
    /// Disk usage (percent) collection aims for.
    pub low_percent: u8,
    /// Images younger than this are never collected.
    pub min_age: Duration,
}

impl Default for GcPolicy {
    /// kubelet's defaults: 85% → 80%, two minutes.
    fn default() -> Self {
        GcPolicy {
            high_percent: 85,
            low_percent: 80,
            min_age: Duration::from_secs(120),
        }
    }
}

/// A filesystem's size and free space, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskUsage {
    /// Total bytes.
    pub capacity: u64,
    /// Bytes available to the agent.
    pub available: u64,
}

impl DiskUsage {
    /// Measures the filesystem holding `path`.
    pub fn of(path: &Path) -> std::io::Result<DiskUsage> {
        let st = rustix::fs::statvfs(path)?;
        Ok(DiskUsage {
            capacity: st.f_blocks.saturating_mul(st.f_frsize),
            available: st.f_bavail.saturating_mul(st.f_frsize),
        })
    }

    fn used_percent(&self) -> u64 {
        if self.capacity == 0 {
            return 0;
        }
        100 - (self.available.min(self.capacity) as u128 * 100 / self.capacity as u128) as u64
    }
}

/// What the policy needs to know of one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The manifest digest.
    pub digest: String,
    /// Bytes deleting it would free (an estimate: shared layers free less).
    pub size: u64,
    /// When a container last used it (unix seconds).
    pub last_used: u64,
    /// When the store got it (unix seconds).
    pub created_at: u64,
}

impl From<&Image> for Candidate {
    fn from(image: &Image) -> Candidate {
        Candidate {
            digest: image.digest.clone(),
            size: image.size,
            last_used: image.last_used,
            created_at: image.created_at,
        }
    }
}

/// The images to delete, in deletion order: empty below the high-water mark, and always when
/// the high-water mark is 100% (collection turned off, as with the kubelet).
pub fn select(
    policy: &GcPolicy,
    disk: DiskUsage,
    images: &[Candidate],
    held: &BTreeSet<String>,
    now: u64,
) -> Vec<String> {
    if disk.capacity == 0
        || policy.high_percent >= 100
        || disk.used_percent() < u64::from(policy.high_percent)
    {
        return Vec::new();
    }
    let used = disk.capacity - disk.available.min(disk.capacity);
    let target_used = (disk.capacity as u128 * u128::from(policy.low_percent) / 100) as u64;
    let to_free = used.saturating_sub(target_used);
    let mut order: Vec<&Candidate> = images
        .iter()
        .filter(|c| !held.contains(&c.digest))
        .filter(|c| now.saturating_sub(c.created_at) >= policy.min_age.as_secs())
        .collect();
    // Least recently used first; ties broken by digest so the choice is deterministic.
    order.sort_by(|a, b| {
        a.last_used
            .cmp(&b.last_used)
            .then_with(|| a.digest.cmp(&b.digest))
    });
    let mut freed = 0u64;
    let mut out = Vec::new();
    for c in order {
        if freed >= to_free {
            break;
        }
        freed += c.size;
        out.push(c.digest.clone());
    }
    out
}

/// The manifest digests of the images the collector must keep: every image a container holds
/// (its root filesystem is mounted from the image's layers), and every image that an assigned
/// instance's reference names (`assigned`, as written in the workloads). The second set covers
/// what holds cannot: an instance between two runs (its old container and rootfs removed, the
/// next not mounted yet) and one whose worker resolved its image but has not mounted it, whose
/// image, once collected, could not come back if it was imported rather than pulled.
///
/// A reference names an image when it is one of the image's references once normalised, or
/// when its digest is the image's manifest or index digest. Unparseable references name
/// nothing (their instances cannot start anyway).
pub fn in_use(
    images: &[Image],
    holds: &[(String, String)],
    assigned: &[String],
) -> BTreeSet<String> {
    let mut keep: BTreeSet<String> = holds.iter().map(|(_, image)| image.clone()).collect();
    for reference in assigned {
        let Ok(parsed) = ImageRef::parse(reference) else {
            continue;
        };
        let canonical = parsed.to_string();
        for image in images {
            let by_digest = parsed
                .digest
                .as_ref()
                .is_some_and(|d| *d == image.digest || image.index_digest.as_ref() == Some(d));
            if by_digest || image.references.contains(&canonical) {
                keep.insert(image.digest.clone());
            }
        }
    }
    keep
}

impl ImageStore {
    /// Measures the store's filesystem and removes the images the policy picks, keeping those
    /// containers hold and those the references in `assigned` name ([`in_use`]). Blocking.
    pub fn collect_garbage(
        &self,
        policy: &GcPolicy,
        assigned: &[String],
    ) -> Result<PruneReport, ImageError> {
        let disk = DiskUsage::of(self.root()).map_err(ImageError::io("statvfs", self.root()))?;
        self.collect_garbage_keeping(policy, disk, assigned)
    }

    /// [`ImageStore::collect_garbage`] with a given disk usage and no assigned references (for
    /// callers that measure the disk themselves, and tests).
    pub fn collect_garbage_with(
        &self,
        policy: &GcPolicy,
        disk: DiskUsage,
    ) -> Result<PruneReport, ImageError> {
        self.collect_garbage_keeping(policy, disk, &[])
    }

    fn collect_garbage_keeping(
        &self,
        policy: &GcPolicy,
        disk: DiskUsage,
        assigned: &[String],
    ) -> Result<PruneReport, ImageError> {
        if disk.capacity == 0
            || policy.high_percent >= 100
            || disk.used_percent() < u64::from(policy.high_percent)
        {
            // Nothing to do: skip reading the index.
            return Ok(PruneReport::default());
        }
        let images = self.list()?;
        let candidates: Vec<Candidate> = images.iter().map(Candidate::from).collect();
        let held = in_use(&images, &self.holds(), assigned);
        let victims = select(policy, disk, &candidates, &held, now());
        if victims.is_empty() {
            return Ok(PruneReport::default());
        }
        tracing::info!(images = victims.len(), "image garbage collection");
        self.remove_images(&victims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;

    fn img(name: &str, size: u64, last_used_ago: u64, age: u64) -> Candidate {
        Candidate {
            digest: name.to_string(),
            size,
            last_used: NOW - last_used_ago,
            created_at: NOW - age,
        }
    }

    fn disk(used_percent: u64) -> DiskUsage {
        DiskUsage {
            capacity: 1000,
            available: 1000 - used_percent * 10,
        }
    }

    fn check(used: u64, images: &[Candidate], held: &[&str], want: &[&str]) {
        let held: BTreeSet<String> = held.iter().map(|s| s.to_string()).collect();
        let got = select(&GcPolicy::default(), disk(used), images, &held, NOW);
        assert_eq!(got, want, "used {used}%");
    }

    #[test]
    fn kubelet_policy() {
        let set = [
            img("old", 30, 1000, 5000),
            img("mid", 30, 500, 5000),
            img("new", 30, 10, 5000),
            img("young", 500, 2000, 60),
        ];
        // Below the high-water mark: nothing.
        check(84, &set, &[], &[]);
        check(0, &set, &[], &[]);
        // 85% → 80%: 50 bytes to free, LRU first, the young image skipped.
        check(85, &set, &[], &["old", "mid"]);
        // 90% → 80%: 100 bytes; all three old enough, still not enough, take all.
        check(90, &set, &[], &["old", "mid", "new"]);
        // Held images are never taken.
        check(85, &set, &["old"], &["mid", "new"]);
        check(100, &set, &["old", "mid", "new"], &[]);
        // Exactly enough after one.
        check(
            86,
            &[img("a", 60, 9, 999), img("b", 60, 1, 999)],
            &[],
            &["a"],
        );
        // Ties in last use go by digest.
        check(
            85,
            &[img("b", 100, 5, 999), img("a", 100, 5, 999)],
            &[],
            &["a"],
        );
        // An image exactly min_age old may go.
        check(85, &[img("edge", 100, 0, 120)], &[], &["edge"]);
        // A high-water mark of 100% turns collection off, even on a full disk.
        let off = GcPolicy {
            high_percent: 100,
            low_percent: 100,
            ..GcPolicy::default()
        };
        assert!(select(&off, disk(100), &set, &BTreeSet::new(), NOW).is_empty());
    }

    fn image(digest: &str, references: &[&str], index_digest: Option<&str>) -> Image {
        Image {
            digest: digest.to_owned(),
            media_type: String::new(),
            index_digest: index_digest.map(str::to_owned),
            references: references.iter().map(|r| r.to_string()).collect(),
            config_digest: format!("{digest}-config"),
            config: Default::default(),
            layers: Vec::new(),
            size: 100,
            created_at: 0,
            last_used: 0,
        }
    }

    fn sha(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    #[test]
    fn images_in_use_are_never_selected() {
        let (a, b, c, d, e, f) = (sha('a'), sha('b'), sha('c'), sha('d'), sha('e'), sha('f'));
        let images = [
            // Named by an assigned instance, no container yet (between two runs).
            image(&a, &["docker.io/library/busybox:1.36"], None),
            // Held by a container; its tag has moved on since, so nothing assigned names it.
            image(&b, &[], None),
            // Neither: the only one the collector may take.
            image(&c, &["gantry.test/old:1"], None),
            // Assigned by digest.
            image(&d, &["reg.local:5000/app:2"], None),
            // Pulled through an index; assigned by the index digest.
            image(&e, &[], Some(&f)),
        ];
        let holds = [("web-1".to_owned(), b.clone())];
        let assigned = [
            // Written as users write it: normalised before matching.
            "busybox:1.36".to_owned(),
            format!("reg.local:5000/app@{d}"),
            format!("gantry.test/multi@{f}"),
            // Not an image reference: names nothing, breaks nothing.
            "Not A Reference!".to_owned(),
        ];
        let keep = in_use(&images, &holds, &assigned);
        assert_eq!(keep, [&a, &b, &d, &e].into_iter().cloned().collect());
        // A full disk and every image old enough: only the unused image goes.
        let candidates: Vec<Candidate> = images.iter().map(Candidate::from).collect();
        let full = DiskUsage {
            capacity: 1000,
            available: 0,
        };
        let picked = select(&GcPolicy::default(), full, &candidates, &keep, NOW);
        assert_eq!(picked, vec![c.clone()]);
        // Nothing assigned and no holds: any may go; 200 bytes to free takes two of 100.
        let picked = select(
            &GcPolicy::default(),
            full,
            &candidates,
            &in_use(&images, &[], &[]),
            NOW,
        );
        assert_eq!(picked.len(), 2);
    }

    #[test]
    fn usage_percent_and_empty_disks() {
        assert_eq!(disk(85).used_percent(), 85);
        let none = DiskUsage {
            capacity: 0,
            available: 0,
        };
        assert!(
            select(
                &GcPolicy::default(),
                none,
                &[img("a", 1, 1, 999)],
                &BTreeSet::new(),
                NOW
            )
            .is_empty()
        );
        let full = DiskUsage {
            capacity: 100,
            available: 0,
        };
        assert_eq!(full.used_percent(), 100);
    }
}
