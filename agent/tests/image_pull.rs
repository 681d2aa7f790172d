//! Pulls from a real registry: Debian's `docker-registry` on 127.0.0.1, filled by `skopeo`
//! from OCI layouts built at test time from busybox-static. OCI and Docker schema2 manifests, a
//! multi-platform index, progress, shared blobs, the rootfs of a pulled image running busybox,
//! and the failures (missing tag, missing or wrong credentials). Skipped without the tools on
//! a laptop; fails under CI.

mod support_image;

use std::path::Path;
use std::process::Command;

use gantry_agent::image::pull::{Credentials, LayerState, PullError};
use gantry_agent::image::{ImageError, ImageRef, ImageStore, ProgressSink, PullOptions};
use support_image::registry::{REGISTRY_BIN, Registry, SKOPEO_BIN};
use support_image::*;

fn can_run() -> bool {
    require("docker-registry", Path::new(REGISTRY_BIN).exists())
        && require("skopeo", Path::new(SKOPEO_BIN).exists())
        && require("busybox-static (/bin/busybox)", Path::new(BUSYBOX).exists())
}

fn busybox_image(extra: &'static [u8]) -> Built {
    let app = layer(&[Entry::File("app/marker", extra)], Compress::Gzip);
    build(vec![busybox_layer(), app], &["/bin/sh"])
}

fn store() -> (tempfile::TempDir, ImageStore) {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(tmp.path().join("images")).unwrap();
    (tmp, store)
}

fn r(s: &str) -> ImageRef {
    ImageRef::parse(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_an_oci_image_and_runs_busybox_from_it() {
    if !can_run() {
        return;
    }
    let registry = Registry::start(None);
    let image = busybox_image(b"oci");
    let layout = tempfile::tempdir().unwrap();
    oci_layout_dir(layout.path(), &[(&image, Some("v1"))]);
    registry.push(layout.path(), "v1", "test/busybox:1", &[]);

    let (_tmp, store) = store();
    let reference = r(&format!("{}/test/busybox:1", registry.addr));
    let (sink, mut rx) = ProgressSink::channel();
    let pulled = store
        .pull(&reference, &PullOptions::default(), sink)
        .await
        .unwrap();
    assert_eq!(pulled.digest, image.digest);
    assert_eq!(pulled.config_digest, image.config_digest);
    assert_eq!(pulled.references, [reference.to_string()]);
    let diff_ids: Vec<_> = pulled.layers.iter().map(|l| l.diff_id.clone()).collect();
    assert_eq!(
        diff_ids,
        [
            image.layers[0].diff_id.clone(),
            image.layers[1].diff_id.clone()
        ]
    );
    let progress = rx.borrow_and_update().clone();
    assert_eq!(progress.layers.len(), 2);
    for l in &progress.layers {
        assert_eq!(l.state, LayerState::Done, "{l:?}");
        assert_eq!(l.done, l.total);
    }
    assert_eq!(progress.layers[0].total, image.layers[0].blob.len() as u64);

    // Pulling again (by digest) downloads nothing.
    let by_digest = r(&format!("{}/test/busybox@{}", registry.addr, image.digest));
    let (sink, rx) = ProgressSink::channel();
    let again = store
        .pull(&by_digest, &PullOptions::default(), sink)
        .await
        .unwrap();
    assert_eq!(again.digest, image.digest);
    assert!(
        rx.borrow()
            .layers
            .iter()
            .all(|l| l.state == LayerState::Exists)
    );

    if require("root", is_root()) {
        let s = store.clone();
        let rootfs = tokio::task::spawn_blocking(move || s.mount_rootfs(&again, "pulled"))
            .await
            .unwrap()
            .unwrap();
        let out = Command::new("chroot")
            .arg(&rootfs)
            .args(["/bin/busybox", "cat", "/app/marker"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(out.stdout, b"oci");
        store.unmount_rootfs("pulled").unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_docker_schema2_and_resolves_a_multi_platform_index() {
    if !can_run() {
        return;
    }
    let registry = Registry::start(None);
    let image = busybox_image(b"multi");
    let foreign = build_with(
        vec![layer(&[Entry::File("foreign", b"s390x")], Compress::Gzip)],
        &["/x"],
        |c| c["architecture"] = serde_json::json!("s390x"),
    );
    let layout = tempfile::tempdir().unwrap();
    oci_layout_dir(layout.path(), &[(&image, Some("single")), (&foreign, None)]);
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": foreign.digest, "size": foreign.manifest.len(),
             "platform": {"architecture": "s390x", "os": "linux"}},
            {"mediaType": OCI_MANIFEST, "digest": image.digest, "size": image.manifest.len(),
             "platform": {"architecture": arch, "os": "linux"}},
        ]
    }))
    .unwrap();
    let index_digest = sha256(&index);
    std::fs::write(
        layout
            .path()
            .join("blobs/sha256")
            .join(hex_of(&index_digest)),
        &index,
    )
    .unwrap();
    let top = serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": image.digest, "size": image.manifest.len(),
             "annotations": {"org.opencontainers.image.ref.name": "single"}},
            {"mediaType": OCI_INDEX, "digest": index_digest, "size": index.len(),
             "annotations": {"org.opencontainers.image.ref.name": "multi"}},
        ]
    });
    std::fs::write(
        layout.path().join("index.json"),
        serde_json::to_vec(&top).unwrap(),
    )
    .unwrap();
    registry.push(
        layout.path(),
        "multi",
        "test/multi:1",
        &["--multi-arch", "all"],
    );
    registry.push(
        layout.path(),
        "single",
        "test/docker:1",
        &["--format", "v2s2"],
    );

    let (_tmp, store) = store();
    let opts = PullOptions {
        max_concurrent_downloads: 1,
        ..PullOptions::default()
    };
    let multi = store
        .pull(
            &r(&format!("{}/test/multi:1", registry.addr)),
            &opts,
            ProgressSink::none(),
        )
        .await
        .unwrap();
    assert_eq!(multi.digest, image.digest);
    assert_eq!(multi.index_digest.as_deref(), Some(index_digest.as_str()));
    // The index digest names the image too.
    assert_eq!(
        store.resolve(&index_digest).unwrap().unwrap().digest,
        image.digest
    );

    let docker = store
        .pull(
            &r(&format!("{}/test/docker:1", registry.addr)),
            &opts,
            ProgressSink::none(),
        )
        .await
        .unwrap();
    assert_eq!(
        docker.media_type,
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(docker.config.cmd, ["/bin/sh"]);
    assert_eq!(docker.layers.len(), 2);
    assert_eq!(docker.layers[1].diff_id, image.layers[1].diff_id);
    assert_eq!(store.list().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_tags_and_repositories_are_not_found() {
    if !can_run() {
        return;
    }
    let registry = Registry::start(None);
    let image = busybox_image(b"nf");
    let layout = tempfile::tempdir().unwrap();
    oci_layout_dir(layout.path(), &[(&image, Some("v1"))]);
    registry.push(layout.path(), "v1", "test/present:1", &[]);
    let (_tmp, store) = store();
    for missing in ["test/present:2", "test/absent:1"] {
        let err = store
            .pull(
                &r(&format!("{}/{missing}", registry.addr)),
                &PullOptions::default(),
                ProgressSink::none(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, ImageError::Pull(PullError::NotFound { .. })),
            "{missing}: {err}"
        );
    }
    // A pinned digest the registry does not have.
    let wrong = format!("{}/test/present@{}", registry.addr, sha256(b"nothing"));
    let err = store
        .pull(&r(&wrong), &PullOptions::default(), ProgressSink::none())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ImageError::Pull(PullError::NotFound { .. })),
        "{err}"
    );
    assert!(store.list().unwrap().is_empty());
    assert!(store.blobs().list().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_from_options_and_docker_config() {
    if !can_run() {
        return;
    }
    let registry = Registry::start(Some(("gantry", "pa55word")));
    let image = busybox_image(b"auth");
    let layout = tempfile::tempdir().unwrap();
    oci_layout_dir(layout.path(), &[(&image, Some("v1"))]);
    registry.push(
        layout.path(),
        "v1",
        "private/busybox:1",
        &["--dest-creds", "gantry:pa55word"],
    );
    let reference = r(&format!("{}/private/busybox:1", registry.addr));
    let (_tmp, store) = store();

    let anonymous = store
        .pull(&reference, &PullOptions::default(), ProgressSink::none())
        .await
        .unwrap_err();
    assert!(
        matches!(anonymous, ImageError::Pull(PullError::Unauthorized { .. })),
        "{anonymous}"
    );
    let wrong = PullOptions {
        credentials: Some(Credentials {
            username: "gantry".into(),
            password: "not-the-password-xyz".into(),
        }),
        ..PullOptions::default()
    };
    let err = store
        .pull(&reference, &wrong, ProgressSink::none())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ImageError::Pull(PullError::Unauthorized { .. })),
        "{err}"
    );
    assert!(
        !format!("{err} {err:?}").contains("not-the-password"),
        "credentials leaked: {err:?}"
    );
    assert!(store.list().unwrap().is_empty());

    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("config.json");
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode("gantry:pa55word");
    std::fs::write(
        &config,
        format!(
            r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#,
            registry.addr
        ),
    )
    .unwrap();
    let from_file = PullOptions {
        docker_config: Some(config),
        ..PullOptions::default()
    };
    let pulled = store
        .pull(&reference, &from_file, ProgressSink::none())
        .await
        .unwrap();
    assert_eq!(pulled.digest, image.digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pulls_of_one_image_share_blobs() {
    if !can_run() {
        return;
    }
    let registry = Registry::start(None);
    let image = busybox_image(b"concurrent");
    let layout = tempfile::tempdir().unwrap();
    oci_layout_dir(layout.path(), &[(&image, Some("v1"))]);
    registry.push(layout.path(), "v1", "test/c:1", &[]);
    registry.push(layout.path(), "v1", "test/c:2", &[]);
    let (_tmp, store) = store();
    let one = r(&format!("{}/test/c:1", registry.addr));
    let two = r(&format!("{}/test/c:2", registry.addr));
    let opts = PullOptions::default();
    let (sink_a, rx_a) = ProgressSink::channel();
    let (sink_b, rx_b) = ProgressSink::channel();
    let (a, b) = tokio::join!(
        store.pull(&one, &opts, sink_a),
        store.pull(&two, &opts, sink_b)
    );
    assert_eq!(a.unwrap().digest, b.unwrap().digest);
    // Each layer was downloaded by exactly one of the two pulls.
    let (pa, pb) = (rx_a.borrow().clone(), rx_b.borrow().clone());
    for i in 0..2 {
        let states = [pa.layers[i].state, pb.layers[i].state];
        assert!(
            states.contains(&LayerState::Done) && states.contains(&LayerState::Exists),
            "layer {i}: {states:?}"
        );
    }
    let image = store.resolve(&one.to_string()).unwrap().unwrap();
    assert_eq!(image.references.len(), 2);
    assert_eq!(store.blobs().list().unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_or_truncated_blobs_are_refused_and_nothing_is_kept() {
    if !can_run() {
        return;
    }
    let registry = Registry::start(None);
    let image = busybox_image(b"corrupt");
    let layout = tempfile::tempdir().unwrap();
    oci_layout_dir(layout.path(), &[(&image, Some("v1"))]);
    registry.push(layout.path(), "v1", "test/corrupt:1", &[]);
    let reference = r(&format!("{}/test/corrupt:1", registry.addr));
    let layer = sha256(&image.layers[1].blob);
    let file = registry.blob_file(&layer);
    let good = std::fs::read(&file).unwrap();
    let (_tmp, store) = store();

    // Truncated: the registry serves half the layer.
    std::fs::write(&file, &good[..good.len() / 2]).unwrap();
    let err = store
        .pull(&reference, &PullOptions::default(), ProgressSink::none())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("size") || err.to_string().contains("digest"),
        "{err}"
    );
    assert!(store.list().unwrap().is_empty());
    assert!(
        store.blobs().list().unwrap().is_empty(),
        "half-stored blobs kept: {:?}",
        store.blobs().list().unwrap()
    );
    assert!(
        std::fs::read_dir(store.root().join("layers"))
            .unwrap()
            .next()
            .is_none()
    );

    // Same size, other bytes: the digest check catches it.
    let mut garbage = good.clone();
    let last = garbage.len() - 1;
    garbage[last] ^= 0xff;
    std::fs::write(&file, &garbage).unwrap();
    let err = store
        .pull(&reference, &PullOptions::default(), ProgressSink::none())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("digest"), "{err}");
    assert!(store.blobs().list().unwrap().is_empty());

    // Repaired, the same store pulls it.
    std::fs::write(&file, &good).unwrap();
    let pulled = store
        .pull(&reference, &PullOptions::default(), ProgressSink::none())
        .await
        .unwrap();
    assert_eq!(pulled.digest, image.digest);
}
