//! Pull progress as an instance status shows it, from a real registry: Debian's
//! `docker-registry` on 127.0.0.1, filled by `skopeo`. The worker follows a pull with
//! `image::pull::follow`, which hands it the progress summed over the layers; this test follows
//! a real pull the same way and checks what the status would have said. Skipped without the
//! tools on a laptop; fails under CI.

mod support_image;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gantry_agent::image::pull::follow;
use gantry_agent::image::{ImageRef, ImageStore, ProgressSink, PullOptions, PullTotals};
use support_image::registry::{REGISTRY_BIN, Registry, SKOPEO_BIN};
use support_image::*;

fn can_run() -> bool {
    require("docker-registry", Path::new(REGISTRY_BIN).exists())
        && require("skopeo", Path::new(SKOPEO_BIN).exists())
        && require("busybox-static (/bin/busybox)", Path::new(BUSYBOX).exists())
}

/// `len` bytes that no compressor shrinks (xorshift), so the layer is as big on the wire.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Pulls `reference` into `store`, following it as the worker does (but reporting every
/// millisecond, to see many steps); returns the reports and the final totals.
async fn pull_followed(store: &ImageStore, reference: &ImageRef) -> (Vec<PullTotals>, PullTotals) {
    let (sink, progress) = ProgressSink::channel();
    let reports = Arc::new(Mutex::new(Vec::new()));
    let seen = reports.clone();
    let options = PullOptions::default();
    let pulled = follow(
        store.pull(reference, &options, sink),
        progress.clone(),
        Duration::from_millis(1),
        move |t| seen.lock().unwrap().push(t),
    )
    .await;
    pulled.expect("pull");
    let last = progress.borrow().totals();
    let reports = reports.lock().unwrap().clone();
    (reports, last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_progress_sums_the_layers_of_a_real_pull() {
    if !can_run() {
        return;
    }
    let registry = Registry::start(None);
    let data = noise(24 << 20);
    let big = layer(&[Entry::File("big", &data)], Compress::None);
    let image = build(vec![busybox_layer(), big], &["/bin/sh"]);
    let layout = tempfile::tempdir().unwrap();
    oci_layout_dir(layout.path(), &[(&image, Some("v1"))]);
    registry.push(layout.path(), "v1", "test/big:1", &[]);
    let total: u64 = image.layers.iter().map(|l| l.blob.len() as u64).sum();

    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(tmp.path().join("images")).unwrap();
    let reference = ImageRef::parse(&format!("{}/test/big:1", registry.addr)).unwrap();
    let (reports, last) = pull_followed(&store, &reference).await;

    // At the end: every byte and layer done, all of it downloaded.
    assert_eq!(
        last,
        PullTotals {
            bytes_done: total,
            bytes_total: total,
            layers_done: 2,
            layers_total: 2,
            downloaded: total,
        }
    );
    // On the way: the total is known from the manifest on, and nothing goes backwards.
    assert!(!reports.is_empty(), "no progress reported");
    for t in &reports {
        assert!(t.bytes_done <= t.bytes_total, "{t:?}");
        assert!(t.bytes_total == 0 || t.bytes_total == total, "{t:?}");
    }
    for pair in reports.windows(2) {
        assert!(pair[1].bytes_done >= pair[0].bytes_done, "{reports:?}");
        assert!(pair[1].layers_done >= pair[0].layers_done, "{reports:?}");
    }
    assert!(
        reports.iter().any(|t| t.bytes_done < total),
        "a 24 MiB layer showed no intermediate step: {reports:?}"
    );

    // Pulled again: the layers are in the store, done at once, nothing downloaded.
    let (_, again) = pull_followed(&store, &reference).await;
    assert_eq!(
        again,
        PullTotals {
            bytes_done: total,
            bytes_total: total,
            layers_done: 2,
            layers_total: 2,
            downloaded: 0,
        }
    );
}
