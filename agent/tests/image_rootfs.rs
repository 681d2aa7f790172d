//! Container root filesystems from imported images, as root: overlayfs over the shared layer
//! directories (and the private-copy fallback) shows files from every layer, honours whiteouts
//! and opaque directories, keeps writes out of the layers, runs busybox, and holds its image
//! against removal. Skipped without root on a laptop; fails under CI.

mod support_image;

use std::path::Path;
use std::process::Command;

use gantry_agent::image::rootfs::{RootfsError, RootfsMode};
use gantry_agent::image::{Image, ImageError, ImageStore, StoreOptions};
use support_image::*;

fn can_run() -> bool {
    require("root", is_root())
        && require("busybox-static (/bin/busybox)", Path::new(BUSYBOX).exists())
}

fn two_layer_image() -> Built {
    let mut lower = busybox_layer();
    let extra = tar_of(&[
        Entry::File("etc/shared", b"lower"),
        Entry::Dir("opq/"),
        Entry::File("opq/old", b"old"),
        Entry::Dir("gone/"),
        Entry::File("gone/file", b"g"),
        Entry::File("etc/keep", b"keep"),
        Entry::Link("etc/keep-link", "etc/keep"),
    ]);
    // Append the extra entries to busybox's layer (strip its two end-of-archive blocks).
    let tar_len = lower.blob.len();
    let mut joined = lower.blob[..tar_len - 1024].to_vec();
    joined.extend_from_slice(&extra);
    lower.diff_id = sha256(&joined);
    lower.blob = joined;
    let upper = layer(
        &[
            Entry::File("hello", b"hello from layer two\n"),
            Entry::File("etc/.wh.shared", b""),
            Entry::Dir("opq/"),
            Entry::File("opq/.wh..wh..opq", b""),
            Entry::File("opq/new", b"new"),
            Entry::File(".wh.gone", b""),
        ],
        Compress::Gzip,
    );
    build(vec![lower, upper], &["/bin/sh"])
}

fn import(store: &ImageStore, image: &Built, tag: &str) -> Image {
    store
        .import(&oci_layout_tar(&[(image, Some(tag))])[..])
        .unwrap()
        .remove(0)
}

fn check_rootfs(store: &ImageStore, image: &Image, rootfs: &Path) {
    assert!(rootfs.join("bin/busybox").is_file());
    assert_eq!(
        std::fs::read(rootfs.join("hello")).unwrap(),
        b"hello from layer two\n"
    );
    assert_eq!(std::fs::read(rootfs.join("etc/keep")).unwrap(), b"keep");
    assert!(!rootfs.join("etc/shared").exists(), "whiteout ignored");
    assert!(!rootfs.join("gone").exists(), "directory whiteout ignored");
    assert!(!rootfs.join("opq/old").exists(), "opaque directory ignored");
    assert_eq!(std::fs::read(rootfs.join("opq/new")).unwrap(), b"new");

    // busybox runs from it.
    let out = Command::new("chroot")
        .arg(rootfs)
        .args(["/bin/sh", "-c", "cat /hello; ls /opq"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from layer two\nnew\n"
    );

    // Writes stay in the container.
    std::fs::write(rootfs.join("etc/keep"), b"changed").unwrap();
    std::fs::write(rootfs.join("written"), b"w").unwrap();
    std::fs::remove_file(rootfs.join("opq/new")).unwrap();
    for l in &image.layers {
        let dir = store.layer_dir(l);
        assert!(!dir.join("written").exists());
    }
    let lower = store.layer_dir(&image.layers[0]);
    assert_eq!(std::fs::read(lower.join("etc/keep")).unwrap(), b"keep");
    let upper = store.layer_dir(&image.layers[1]);
    assert_eq!(std::fs::read(upper.join("opq/new")).unwrap(), b"new");
}

fn holds_and_releases(store: &ImageStore, image: &Image, id: &str) {
    // The hold is kept with the container, not in the index file, and outlives the store.
    assert!(store.container_dir(id).join("hold.json").is_file());
    let index = std::fs::read_to_string(store.root().join("index.json")).unwrap();
    assert!(
        !index.contains(&format!("\"{id}\"")),
        "the index file names {id}:\n{index}"
    );
    assert!(matches!(
        store.remove(&image.digest),
        Err(ImageError::InUse { .. })
    ));
    // Untagging a held image keeps it; prune keeps it too.
    store.remove(&image.references[0]).unwrap();
    store.prune().unwrap();
    assert!(store.resolve(&image.digest).unwrap().is_some());
    assert!(store.layer_dir(&image.layers[0]).is_dir());

    store.unmount_rootfs(id).unwrap();
    assert!(!store.container_dir(id).exists());
    store.unmount_rootfs(id).unwrap();
    assert!(store.holds().is_empty());
    store.prune().unwrap();
    assert!(store.list().unwrap().is_empty());
    assert!(store.blobs().list().unwrap().is_empty());
}

#[test]
fn overlay_rootfs_shows_layers_and_applies_whiteouts() {
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        rootfs: RootfsMode::Overlay,
    };
    let store = ImageStore::open_with(tmp.path().join("images"), options).unwrap();
    let image = import(&store, &two_layer_image(), "example.com/two:1");
    let rootfs = store.mount_rootfs(&image, "c1").unwrap();
    assert_eq!(rootfs, store.container_dir("c1").join("rootfs"));
    // Idempotent.
    assert_eq!(store.mount_rootfs(&image, "c1").unwrap(), rootfs);
    check_rootfs(&store, &image, &rootfs);
    let upper = store.container_dir("c1").join("upper");
    assert_eq!(std::fs::read(upper.join("written")).unwrap(), b"w");

    // A busy mount is reported, not detached behind the caller's back.
    let open = std::fs::File::open(rootfs.join("hello")).unwrap();
    let err = store.unmount_rootfs("c1").unwrap_err();
    assert!(
        matches!(err, ImageError::Rootfs(RootfsError::Busy { .. })),
        "{err}"
    );
    assert!(rootfs.join("hello").exists());
    drop(open);

    holds_and_releases(&store, &image, "c1");
}

#[test]
fn copied_rootfs_is_the_same_tree() {
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        rootfs: RootfsMode::Copy,
    };
    let store = ImageStore::open_with(tmp.path().join("images"), options).unwrap();
    let image = import(&store, &two_layer_image(), "example.com/two:1");
    let rootfs = store.mount_rootfs(&image, "copy-1").unwrap();
    use std::os::unix::fs::MetadataExt;
    let ino = |p: &str| std::fs::metadata(rootfs.join(p)).unwrap().ino();
    assert_eq!(
        ino("etc/keep"),
        ino("etc/keep-link"),
        "hard link lost in the copy"
    );
    check_rootfs(&store, &image, &rootfs);
    holds_and_releases(&store, &image, "copy-1");
}

#[test]
fn a_hold_outlives_the_store_and_an_older_index_files_holds_move() {
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("images");
    let options = || StoreOptions {
        rootfs: RootfsMode::Copy,
    };
    let store = ImageStore::open_with(root.clone(), options()).unwrap();
    let image = import(&store, &two_layer_image(), "example.com/two:1");
    store.mount_rootfs(&image, "kept").unwrap();
    drop(store);

    // An older agent kept holds in the index file: one more, for a container directory.
    let index_path = root.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["holds"] = serde_json::json!({"older": {"image": image.digest, "mode": "copy"}});
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::create_dir_all(root.join("containers/older/rootfs")).unwrap();

    let store = ImageStore::open_with(root.clone(), options()).unwrap();
    let mut holds = store.holds();
    holds.sort();
    let expected = vec![
        ("kept".to_owned(), image.digest.clone()),
        ("older".to_owned(), image.digest.clone()),
    ];
    assert_eq!(holds, expected);
    assert!(root.join("containers/older/hold.json").is_file());
    assert!(matches!(
        store.remove(&image.digest),
        Err(ImageError::InUse { .. })
    ));
    // Written without holds now, the index file loses nothing: they are in the directories.
    store.remove(&image.references[0]).unwrap();
    drop(store);
    let store = ImageStore::open_with(root.clone(), options()).unwrap();
    assert_eq!(store.holds().len(), 2);
    store.unmount_rootfs("kept").unwrap();
    store.unmount_rootfs("older").unwrap();
    assert!(store.holds().is_empty());
    store.prune().unwrap();
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn many_layers_do_not_hit_the_option_length_limit() {
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        rootfs: RootfsMode::Overlay,
    };
    let store = ImageStore::open_with(tmp.path().join("images"), options).unwrap();
    let names: Vec<String> = (0..120).map(|i| format!("f{i}")).collect();
    let layers = names
        .iter()
        .map(|n| layer(&[Entry::File(n, n.as_bytes())], Compress::None))
        .collect();
    let image = import(&store, &build(layers, &["/x"]), "example.com/many:1");
    let rootfs = store.mount_rootfs(&image, "many").unwrap();
    assert_eq!(std::fs::read(rootfs.join("f0")).unwrap(), b"f0");
    assert_eq!(std::fs::read(rootfs.join("f119")).unwrap(), b"f119");
    store.unmount_rootfs("many").unwrap();
}

#[test]
fn a_container_holds_one_image_and_ids_are_checked() {
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(tmp.path().join("images")).unwrap();
    let one = import(&store, &two_layer_image(), "example.com/one:1");
    let other = build(
        vec![layer(&[Entry::File("x", b"x")], Compress::None)],
        &["/x"],
    );
    let two = import(&store, &other, "example.com/other:1");
    store.mount_rootfs(&one, "held").unwrap();
    let err = store.mount_rootfs(&two, "held").unwrap_err();
    assert!(
        matches!(err, ImageError::Rootfs(RootfsError::HeldByOther { .. })),
        "{err}"
    );
    for bad in ["", "../x", "a/b", ".hidden", &"x".repeat(200)] {
        let err = store.mount_rootfs(&two, bad).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::Rootfs(RootfsError::InvalidContainerId { .. })
            ),
            "{bad}: {err}"
        );
    }
    store.unmount_rootfs("held").unwrap();
}

#[test]
fn concurrent_mounts_of_one_container_mount_once() {
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(tmp.path().join("images")).unwrap();
    let image = import(&store, &two_layer_image(), "example.com/two:1");
    let paths: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| store.mount_rootfs(&image, "racy").unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(paths.windows(2).all(|w| w[0] == w[1]));
    // One unmount leaves nothing mounted (no mount was stacked on another).
    store.unmount_rootfs("racy").unwrap();
    assert!(!paths[0].exists());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(paths[0].to_str().unwrap()));
}
