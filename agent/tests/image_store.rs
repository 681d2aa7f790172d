//! The image store end to end on real files: imports of `docker save` tarballs (legacy and
//! Docker 25+) and OCI layouts (directory and tar) built at test time, export, references and
//! removal with shared layers, and every bad archive the store must refuse without recording
//! or leaving anything.

mod support_image;

use std::path::Path;

use gantry_agent::image::{ImageError, ImageStore};
use support_image::*;

fn new_store() -> (tempfile::TempDir, ImageStore) {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(tmp.path().join("images")).unwrap();
    (tmp, store)
}

fn base() -> LayerBlob {
    layer(
        &[
            Entry::Dir("etc/"),
            Entry::File("etc/os-release", b"ID=test\n"),
            Entry::File("etc/shared", b"base"),
        ],
        Compress::Gzip,
    )
}

fn app(name: &'static str) -> LayerBlob {
    layer(
        &[Entry::Dir("app/"), Entry::File("app/name", name.as_bytes())],
        Compress::Zstd,
    )
}

/// The names in a directory, temp entries included.
fn names(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Nothing recorded and nothing stored: a failed import left no trace.
fn assert_empty(store: &ImageStore) {
    assert!(store.list().unwrap().is_empty());
    assert_eq!(
        names(&store.root().join("blobs/sha256")),
        Vec::<String>::new()
    );
    assert_eq!(names(&store.root().join("layers")), Vec::<String>::new());
}

#[test]
fn imports_legacy_docker_save_with_shared_layers() {
    let (_tmp, store) = new_store();
    let one = build(vec![base(), app("one")], &["/bin/sh"]);
    let two = build(vec![base(), app("two")], &["/bin/two"]);
    let tar = docker_save_legacy(&[
        (&one, &["one:1", "reg.example:5000/x/one"]),
        (&two, &["two"]),
    ]);
    let images = store.import(&tar[..]).unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(store.list().unwrap().len(), 2);

    let got = store.resolve("one:1").unwrap().unwrap();
    assert_eq!(got.config_digest, one.config_digest);
    assert_eq!(got.config.cmd, ["/bin/sh"]);
    assert_eq!(
        got.references,
        ["docker.io/library/one:1", "reg.example:5000/x/one:latest"]
    );
    let diff_ids: Vec<_> = got.layers.iter().map(|l| l.diff_id.clone()).collect();
    assert_eq!(
        diff_ids,
        [one.layers[0].diff_id.clone(), one.layers[1].diff_id.clone()]
    );
    assert_eq!(got.chain_ids()[0], one.layers[0].diff_id);
    // By digest, config digest, short id, and with a digest reference.
    for r in [
        got.digest.clone(),
        got.config_digest.clone(),
        hex_of(&got.config_digest)[..12].to_string(),
        format!("one@{}", got.digest),
    ] {
        assert_eq!(
            store.resolve(&r).unwrap().unwrap().digest,
            got.digest,
            "{r}"
        );
    }
    assert!(store.resolve("one:2").unwrap().is_none());
    // The shared base layer is unpacked once.
    assert_eq!(names(&store.root().join("layers")).len(), 3);
    let layer_dir = store.layer_dir(&got.layers[1]);
    assert_eq!(std::fs::read(layer_dir.join("app/name")).unwrap(), b"one");
}

#[test]
fn imports_oci_layouts_and_docker25_archives_alike() {
    let image = build(vec![base(), app("x")], &["/x"]);
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("layout");
    oci_layout_dir(&layout, &[(&image, Some("example.com/x:1"))]);

    let (_t1, s1) = new_store();
    let from_dir = s1.import_layout_dir(&layout).unwrap();
    let (_t2, s2) = new_store();
    let from_tar = s2
        .import(&oci_layout_tar(&[(&image, Some("example.com/x:1"))])[..])
        .unwrap();
    let (_t3, s3) = new_store();
    let from_docker = s3
        .import(&docker25_save(&image, "docker.io/library/x:latest")[..])
        .unwrap();
    for imported in [&from_dir, &from_tar, &from_docker] {
        assert_eq!(imported.len(), 1);
        assert_eq!(imported[0].digest, image.digest);
    }
    assert_eq!(from_dir[0].references, ["example.com/x:1"]);
    assert_eq!(from_docker[0].references, ["docker.io/library/x:latest"]);
    // A bare tag in ref.name names no repository: imported untagged.
    let (_t4, s4) = new_store();
    let untagged = s4
        .import(&oci_layout_tar(&[(&image, Some("1"))])[..])
        .unwrap();
    assert!(untagged[0].references.is_empty());
}

#[test]
fn save_then_import_round_trips() {
    let (_tmp, store) = new_store();
    let image = build(vec![base(), app("rt")], &["/rt"]);
    store
        .import(&docker_save_legacy(&[(&image, &["rt:v1"])])[..])
        .unwrap();
    let mut out = Vec::new();
    store.save("rt:v1", &mut out).unwrap();
    let (_tmp2, other) = new_store();
    let back = other.import(&out[..]).unwrap();
    let original = store.resolve("rt:v1").unwrap().unwrap();
    assert_eq!(back[0].digest, original.digest);
    assert_eq!(back[0].references, ["docker.io/library/rt:v1"]);
    assert_eq!(back[0].layers, original.layers);
    assert!(matches!(
        store.save("absent:1", Vec::new()),
        Err(ImageError::NotFound { .. })
    ));
}

#[test]
fn removal_keeps_what_other_images_share() {
    let (_tmp, store) = new_store();
    let one = build(vec![base(), app("one")], &["/one"]);
    let two = build(vec![base(), app("two")], &["/two"]);
    store
        .import(&docker_save_legacy(&[(&one, &["one"]), (&two, &["two"])])[..])
        .unwrap();
    let blobs = store.root().join("blobs/sha256");
    let layers = store.root().join("layers");
    assert_eq!(names(&blobs).len(), 2 * 2 + 3); // two manifests and configs, three layers
    store.remove("one").unwrap();
    assert!(store.resolve("one").unwrap().is_none());
    let left = store.resolve("two").unwrap().unwrap();
    assert_eq!(names(&layers).len(), 2);
    for l in &left.layers {
        assert!(store.layer_dir(l).is_dir());
        assert!(store.blobs().contains(&l.digest));
    }
    assert!(!store.blobs().contains(&sha256(&one.layers[1].blob)));
    store.remove(&left.digest).unwrap();
    assert_empty(&store);
    assert!(matches!(
        store.remove("two"),
        Err(ImageError::NotFound { .. })
    ));
}

#[test]
fn tags_move_and_untagging_deletes_last() {
    let (_tmp, store) = new_store();
    let one = build(vec![base()], &["/one"]);
    let two = build(vec![base(), app("two")], &["/two"]);
    store
        .import(&docker_save_legacy(&[(&one, &["a:1"]), (&two, &["b:1"])])[..])
        .unwrap();
    store.tag("a:1", "a:also").unwrap();
    store.remove("a:1").unwrap();
    // Legacy archives carry no manifest: the store synthesises one, so compare configs.
    let first = store.resolve("a:also").unwrap().unwrap();
    assert_eq!(first.config_digest, one.config_digest);
    // A tag moved by an import points at the new image; the old one is left dangling.
    store
        .import(&docker_save_legacy(&[(&two, &["a:also"])])[..])
        .unwrap();
    assert_eq!(
        store.resolve("a:also").unwrap().unwrap().config_digest,
        two.config_digest
    );
    let dangling = store.resolve(&first.digest).unwrap().unwrap();
    assert!(dangling.references.is_empty());
    let report = store.prune().unwrap();
    assert_eq!(report.images, std::slice::from_ref(&first.digest));
    assert!(report.blobs >= 2);
    assert_eq!(store.list().unwrap().len(), 1);
}

#[test]
fn refuses_blob_whose_content_does_not_match_its_name() {
    let (_tmp, store) = new_store();
    let image = build(vec![base()], &["/x"]);
    let mut a = Archive::new();
    for (d, data) in image.blobs() {
        let data = if d == sha256(&image.layers[0].blob) {
            b"tampered".to_vec()
        } else {
            data
        };
        a.file(&format!("blobs/sha256/{}", hex_of(&d)), &data);
    }
    a.file("index.json", &serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": image.digest, "size": image.manifest.len()}]
    })).unwrap());
    let err = store.import(&a.finish()[..]).unwrap_err();
    assert!(err.to_string().contains("digest mismatch"), "{err}");
    assert_empty(&store);
}

#[test]
fn refuses_layer_whose_diff_id_does_not_match_the_config() {
    let (_tmp, store) = new_store();
    let image = build_with(vec![base()], &["/x"], |c| {
        c["rootfs"]["diff_ids"][0] = serde_json::json!(sha256(b"something else"));
    });
    let err = store
        .import(&docker_save_legacy(&[(&image, &["bad"])])[..])
        .unwrap_err();
    assert!(matches!(err, ImageError::DiffIdMismatch { .. }), "{err}");
    assert_empty(&store);
}

#[test]
fn refuses_truncated_layers_and_archives() {
    let (_tmp, store) = new_store();
    let mut l = layer(&[Entry::File("big", &[9u8; 200_000])], Compress::Gzip);
    l.blob.truncate(l.blob.len() / 2);
    let image = build(vec![l], &["/x"]);
    let err = store
        .import(&docker_save_legacy(&[(&image, &["cut"])])[..])
        .unwrap_err();
    assert!(matches!(err, ImageError::Unpack { .. }), "{err}");
    assert_empty(&store);

    let good = build(vec![base()], &["/x"]);
    let tar = docker_save_legacy(&[(&good, &["cut"])]);
    let err = store.import(&tar[..tar.len() - 3000]).unwrap_err();
    assert!(
        err.to_string().contains("archive")
            || err.to_string().contains("missing")
            || err.to_string().contains("manifest"),
        "{err}"
    );
    assert_empty(&store);

    let err = store
        .import(&b"this is not a tar archive at all"[..])
        .unwrap_err();
    assert!(matches!(err, ImageError::Import(_)), "{err}");
    assert_empty(&store);
}

#[test]
fn refuses_manifests_naming_missing_blobs() {
    let (_tmp, store) = new_store();
    let image = build(vec![base(), app("m")], &["/x"]);
    // docker save whose manifest.json names a layer the archive lacks.
    let mut a = Archive::new();
    a.file(
        &format!("{}.json", hex_of(&image.config_digest)),
        &image.config,
    );
    a.file("l1/layer.tar", &image.layers[0].blob);
    a.file(
        "manifest.json",
        &serde_json::to_vec(&serde_json::json!([{
            "Config": format!("{}.json", hex_of(&image.config_digest)),
            "RepoTags": ["m:1"],
            "Layers": ["l1/layer.tar", "l2/layer.tar"],
        }]))
        .unwrap(),
    );
    let err = store.import(&a.finish()[..]).unwrap_err();
    assert!(err.to_string().contains("l2/layer.tar"), "{err}");
    assert_empty(&store);

    // OCI layout directory missing a layer blob.
    let tmp = tempfile::tempdir().unwrap();
    oci_layout_dir(tmp.path(), &[(&image, Some("m:1"))]);
    let missing = sha256(&image.layers[1].blob);
    std::fs::remove_file(tmp.path().join("blobs/sha256").join(hex_of(&missing))).unwrap();
    let err = store.import_layout_dir(tmp.path()).unwrap_err();
    assert!(
        matches!(&err, ImageError::MissingBlob { digest, .. } if *digest == missing),
        "{err}"
    );
    assert_empty(&store);

    let err = store.import(&Archive::new().finish()[..]).unwrap_err();
    assert!(err.to_string().contains("no manifest.json"), "{err}");
}

#[test]
fn refuses_unknown_media_types_and_layer_count_mismatch() {
    let (_tmp, store) = new_store();
    let mut l = base();
    l.media_type = "application/vnd.example.unknown";
    let image = build(vec![l], &["/x"]);
    let err = store
        .import(&oci_layout_tar(&[(&image, Some("u:1"))])[..])
        .unwrap_err();
    assert!(err.to_string().contains("unsupported media type"), "{err}");
    assert_empty(&store);

    let image = build_with(vec![base()], &["/x"], |c| {
        c["rootfs"]["diff_ids"] = serde_json::json!([]);
    });
    let err = store
        .import(&oci_layout_tar(&[(&image, Some("u:1"))])[..])
        .unwrap_err();
    assert!(matches!(err, ImageError::LayerCount { .. }), "{err}");
    assert_empty(&store);
}

#[test]
fn escaping_layer_entries_write_nothing_outside_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(tmp.path().join("images")).unwrap();
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let target = outside.to_str().unwrap().to_string();
    let abs = format!("{target}/abs");
    let bad_layers: Vec<(&str, Vec<Entry<'_>>)> = vec![
        ("dotdot", vec![Entry::File("../../outside/x", b"x")]),
        ("absolute", vec![Entry::File(&abs, b"x")]),
        (
            "symlink then file",
            vec![Entry::Symlink("s", &target), Entry::File("s/x", b"x")],
        ),
        (
            "symlink to .. then dir",
            vec![
                Entry::Symlink("up", "../../.."),
                Entry::Dir("up/outside/d/"),
            ],
        ),
        (
            "hardlink outside",
            vec![Entry::Link("h", "../../../etc/passwd")],
        ),
        ("whiteout leaving", vec![Entry::File("d/.wh...", b"")]),
    ];
    for (what, entries) in bad_layers {
        let image = build(vec![layer(&entries, Compress::None)], &["/x"]);
        let err = store
            .import(&docker_save_legacy(&[(&image, &["evil"])])[..])
            .unwrap_err();
        assert!(matches!(err, ImageError::Unpack { .. }), "{what}: {err}");
        assert_eq!(names(&outside), Vec::<String>::new(), "{what}");
        assert_eq!(names(tmp.path()), ["images", "outside"], "{what}");
        assert_empty(&store);
    }
}

#[test]
fn concurrent_imports_of_one_image_agree() {
    let (_tmp, store) = new_store();
    let image = build(vec![base(), app("c")], &["/x"]);
    let tar = docker_save_legacy(&[(&image, &["c:1"])]);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| store.import(&tar[..]).unwrap());
        }
    });
    assert_eq!(store.list().unwrap().len(), 1);
    assert_eq!(names(&store.root().join("layers")).len(), 2);
    store.prune().unwrap();
    assert_eq!(store.list().unwrap().len(), 1);
}

#[test]
fn reopening_keeps_images_and_sweeps_temp_files() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("images");
    let image = build(vec![base()], &["/x"]);
    {
        let store = ImageStore::open(root.clone()).unwrap();
        store
            .import(&docker_save_legacy(&[(&image, &["keep:1"])])[..])
            .unwrap();
    }
    std::fs::write(root.join("blobs/sha256/.tmp-crashed-1-1"), b"half").unwrap();
    std::fs::create_dir(root.join("layers/.tmp-crashed-1-2")).unwrap();
    let store = ImageStore::open(root.clone()).unwrap();
    assert_eq!(
        store.resolve("keep:1").unwrap().unwrap().config_digest,
        image.config_digest
    );
    assert!(
        !names(&root.join("blobs/sha256"))
            .iter()
            .any(|n| n.starts_with(".tmp"))
    );
    assert!(
        !names(&root.join("layers"))
            .iter()
            .any(|n| n.starts_with(".tmp"))
    );
}

#[test]
fn garbage_collection_removes_least_recently_used_unheld_images() {
    use gantry_agent::image::gc::{DiskUsage, GcPolicy};
    let (_tmp, store) = new_store();
    let one = build(vec![base(), app("one")], &["/one"]);
    let two = build(vec![base(), app("two")], &["/two"]);
    store
        .import(&docker_save_legacy(&[(&one, &["one"]), (&two, &["two"])])[..])
        .unwrap();
    let policy = GcPolicy {
        min_age: std::time::Duration::ZERO,
        ..GcPolicy::default()
    };
    let calm = DiskUsage {
        capacity: 1 << 30,
        available: 1 << 29,
    };
    assert!(
        store
            .collect_garbage_with(&policy, calm)
            .unwrap()
            .images
            .is_empty()
    );
    // Just over the mark: freeing one image is enough.
    let full = DiskUsage {
        capacity: 1000,
        available: 140,
    };
    let report = store.collect_garbage_with(&policy, full).unwrap();
    assert_eq!(report.images.len(), 1);
    assert_eq!(store.list().unwrap().len(), 1);
    // The base layer both shared survives with the image left.
    let left = store.list().unwrap().remove(0);
    assert!(store.layer_dir(&left.layers[0]).is_dir());
    // Default policy: images younger than two minutes are never collected.
    let report = store
        .collect_garbage_with(&GcPolicy::default(), full)
        .unwrap();
    assert!(report.images.is_empty());
}

#[test]
fn prune_never_sweeps_an_import_in_progress() {
    let (_tmp, store) = new_store();
    let images: Vec<Built> = (0..4)
        .map(|i| {
            let name: &'static str = Box::leak(format!("p{i}").into_boxed_str());
            build(vec![base(), app(name)], &["/x"])
        })
        .collect();
    std::thread::scope(|s| {
        let pruner = s.spawn(|| {
            for _ in 0..50 {
                store.prune().unwrap();
            }
        });
        for (i, image) in images.iter().enumerate() {
            let store = &store;
            s.spawn(move || {
                let tag = format!("p:{i}");
                let tar = docker_save_legacy(&[(image, &[tag.as_str()])]);
                for _ in 0..5 {
                    store.import(&tar[..]).unwrap();
                }
            });
        }
        pruner.join().unwrap();
    });
    assert_eq!(store.list().unwrap().len(), 4);
    store.prune().unwrap();
    for image in store.list().unwrap() {
        for l in &image.layers {
            assert!(store.layer_dir(l).is_dir());
            assert!(store.blobs().contains(&l.digest));
        }
        assert!(store.blobs().contains(&image.digest));
        assert!(store.blobs().contains(&image.config_digest));
    }
}

#[tokio::test]
async fn pull_policy_uses_the_store_without_a_registry() {
    use gantry_agent::image::{ImageRef, ProgressSink, PullOptions, PullPolicy};
    let (_tmp, store) = new_store();
    let image = build(vec![base()], &["/x"]);
    // A registry on a port nothing listens on: any pull attempt would fail.
    let tag = "127.0.0.1:9/local/img:1";
    let s = store.clone();
    let tar = docker_save_legacy(&[(&image, &[tag])]);
    tokio::task::spawn_blocking(move || s.import(&tar[..]).unwrap())
        .await
        .unwrap();
    let reference = ImageRef::parse(tag).unwrap();
    let opts = PullOptions::default();
    for policy in [PullPolicy::IfNotPresent, PullPolicy::Never] {
        let got = store
            .ensure(&reference, policy, &opts, ProgressSink::none())
            .await
            .unwrap();
        assert_eq!(got.config_digest, image.config_digest);
    }
    let absent = ImageRef::parse("127.0.0.1:9/local/img:2").unwrap();
    let err = store
        .ensure(&absent, PullPolicy::Never, &opts, ProgressSink::none())
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::NotFound { .. }), "{err}");
    let err = store
        .ensure(&reference, PullPolicy::Always, &opts, ProgressSink::none())
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::Pull(_)), "{err}");
    // The failed pull removed nothing that was there.
    assert!(store.resolve(tag).unwrap().is_some());
}

#[test]
fn refuses_an_index_from_the_future_or_corrupt() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("images");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("index.json"), br#"{"version": 99}"#).unwrap();
    let err = ImageStore::open(root.clone()).err().unwrap();
    assert!(
        matches!(err, ImageError::IndexVersion { version: 99, .. }),
        "{err}"
    );
    std::fs::write(root.join("index.json"), b"{not json").unwrap();
    let err = ImageStore::open(root).err().unwrap();
    assert!(matches!(err, ImageError::IndexCorrupt { .. }), "{err}");
}
