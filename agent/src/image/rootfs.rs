//! Container root filesystems: an overlay mount of the image's shared layer directories (top
//! layer first) with a private upper and work directory, or, where overlayfs is unusable, a
//! private copy of the layers with their whiteouts applied.
//!
//! Overlayfs is mounted with the new mount API where the kernel has it (`fsconfig` with one
//! `lowerdir+` per layer, Linux 6.8+), which has no limit on the number of layers; otherwise
//! with `mount(2)` and one option string, which must fit in a page.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{self as rfs, AtFlags, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid};
use rustix::io::Errno;
use rustix::mount::{self as rmount, MountFlags, UnmountFlags};
use serde::{Deserialize, Serialize};

use super::fsutil;
use super::store::{Hold, ImageStore, now};
use super::unpack::{OPAQUE_XATTR, remove_at};
use super::{Image, ImageError};

/// How the store makes root filesystems.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RootfsMode {
    /// Overlayfs if a probe mount works (checked once per store), else a copy.
    #[default]
    Auto,
    /// Always overlayfs; fail if it does not work.
    Overlay,
    /// Always a private copy (slow; for kernels or filesystems without overlayfs).
    Copy,
}

/// How one container's rootfs was made, recorded with its hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MountKind {
    /// An overlay mount at `rootfs`.
    Overlay,
    /// A plain directory tree at `rootfs`.
    Copy,
}

/// Why a rootfs could not be made or taken down.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// A container id that is not a safe directory name.
    #[error("invalid container id {id:?}")]
    InvalidContainerId {
        /// The id as given.
        id: String,
    },
    /// The container already holds another image.
    #[error("container {container} already has a rootfs from image {image}")]
    HeldByOther {
        /// The container.
        container: String,
        /// The image it holds.
        image: String,
    },
    /// The overlay mount failed.
    #[error("mounting overlayfs at {path}: {source}")]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The overlay option string does not fit in a page and the kernel lacks `lowerdir+`.
    #[error("overlay options for {layers} layers are {len} bytes, more than a page")]
    OptionsTooLong {
        /// Number of layers.
        layers: usize,
        /// Length of the option string.
        len: usize,
    },
    /// A path holds a character that overlayfs' option syntax cannot carry.
    #[error("path {path} contains ',' or ':', which overlayfs options cannot carry")]
    UnsafeMountPath {
        /// The path.
        path: PathBuf,
    },
    /// The rootfs is still in use: unmounting it would need a lazy detach.
    #[error("rootfs {path} is busy (still used by a process); not detaching it lazily")]
    Busy {
        /// The mount point.
        path: PathBuf,
    },
    /// Unmounting failed otherwise.
    #[error("unmounting {path}: {source}")]
    Unmount {
        /// The mount point.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Something is still mounted where the store is about to delete.
    #[error("{path} is still a mount point; refusing to delete it")]
    StillMounted {
        /// The path.
        path: PathBuf,
    },
    /// Copying a layer into a private rootfs failed.
    #[error("copying layer into {path}: {op}: {source}")]
    Copy {
        /// The entry being copied.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
}

/// Checks that a container id is a plain, short directory name.
pub fn validate_container_id(id: &str) -> Result<(), RootfsError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(RootfsError::InvalidContainerId { id: id.to_string() })
    }
}

fn mount_err(path: &Path) -> impl FnOnce(Errno) -> RootfsError + use<> {
    let path = path.to_path_buf();
    move |e| RootfsError::Mount {
        path,
        source: e.into(),
    }
}

/// Mounts overlayfs at `target`; `lowers` are top layer first.
fn mount_overlay(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), RootfsError> {
    match mount_overlay_fsconfig(lowers, upper, work, target) {
        Ok(()) => Ok(()),
        // No new mount API, or no `lowerdir+`: the classic option string.
        Err(Errno::NOSYS) | Err(Errno::INVAL) => mount_overlay_legacy(lowers, upper, work, target),
        Err(e) => Err(mount_err(target)(e)),
    }
}

fn mount_overlay_fsconfig(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), Errno> {
    let fs = rmount::fsopen("overlay", rmount::FsOpenFlags::FSOPEN_CLOEXEC)?;
    rmount::fsconfig_set_string(&fs, "source", "gantry")?;
    for lower in lowers {
        rmount::fsconfig_set_string(&fs, "lowerdir+", lower.as_path())?;
    }
    rmount::fsconfig_set_string(&fs, "upperdir", upper)?;
    rmount::fsconfig_set_string(&fs, "workdir", work)?;
    // Layers are shared by many mounts: the inode index would tie a lower to one upper.
    rmount::fsconfig_set_string(&fs, "index", "off")?;
    rmount::fsconfig_create(&fs)?;
    let mnt = rmount::fsmount(
        &fs,
        rmount::FsMountFlags::FSMOUNT_CLOEXEC,
        rmount::MountAttrFlags::empty(),
    )?;
    rmount::move_mount(
        &mnt,
        "",
        rfs::CWD,
        target,
        rmount::MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
}

fn mount_overlay_legacy(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), RootfsError> {
    for p in lowers.iter().map(PathBuf::as_path).chain([upper, work]) {
        if p.as_os_str()
            .as_bytes()
            .iter()
            .any(|b| matches!(b, b',' | b':'))
        {
            return Err(RootfsError::UnsafeMountPath {
                path: p.to_path_buf(),
            });
        }
    }
    let lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
    let options = format!(
        "lowerdir={},upperdir={},workdir={},index=off",
        lowerdir.join(":"),
        upper.display(),
        work.display()
    );
    if options.len() >= 4096 {
        return Err(RootfsError::OptionsTooLong {
            layers: lowers.len(),
            len: options.len(),
        });
    }
    let data = std::ffi::CString::new(options).map_err(|_| RootfsError::UnsafeMountPath {
        path: target.to_path_buf(),
    })?;
    rmount::mount(
        "gantry",
        target,
        "overlay",
        MountFlags::empty(),
        data.as_c_str(),
    )
    .map_err(mount_err(target))
}

/// Unmounts `target` if it is mounted; refuses (rather than detaching lazily) when it is busy.
fn unmount(target: &Path) -> Result<(), RootfsError> {
    match rmount::unmount(target, UnmountFlags::empty()) {
        Ok(()) | Err(Errno::INVAL) | Err(Errno::NOENT) => Ok(()),
        Err(Errno::BUSY) => Err(RootfsError::Busy {
            path: target.to_path_buf(),
        }),
        Err(e) => Err(RootfsError::Unmount {
            path: target.to_path_buf(),
            source: e.into(),
        }),
    }
}

/// The file in a container's directory that records its hold.
pub(crate) const HOLD_FILE: &str = "hold.json";

/// Records `hold` in container directory `dir` (created), before its rootfs is made. No fsync:
/// a hold has to outlive the agent, which the page cache does; after a machine crash the
/// container is gone.
pub(crate) fn write_hold(dir: &Path, hold: &Hold) -> Result<(), ImageError> {
    fs::create_dir_all(dir).map_err(ImageError::io("create", dir))?;
    let path = dir.join(HOLD_FILE);
    let data = serde_json::to_vec(hold)
        .map_err(|e| ImageError::io("encode", &path)(io::Error::other(e)))?;
    fs::write(&path, data).map_err(ImageError::io("write", &path))
}

/// The holds recorded under the containers directory, by container id. A hold file that
/// cannot be read (a write cut short by a crash) is skipped, and named in the log.
pub(crate) fn read_holds(
    containers: &Path,
) -> Result<std::collections::BTreeMap<String, Hold>, ImageError> {
    let mut holds = std::collections::BTreeMap::new();
    let entries = fs::read_dir(containers).map_err(ImageError::io("read", containers))?;
    for entry in entries.flatten() {
        let path = entry.path().join(HOLD_FILE);
        let data = match fs::read(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(ImageError::io("read", &path)(e)),
        };
        match serde_json::from_slice::<Hold>(&data) {
            Ok(hold) => {
                holds.insert(entry.file_name().to_string_lossy().into_owned(), hold);
            }
            Err(err) => tracing::warn!(?path, %err, "skipping an unreadable hold"),
        }
    }
    Ok(holds)
}

/// Tries an overlay mount in a scratch directory under `root`.
fn probe_overlay(root: &Path) -> bool {
    let dir = root.join(fsutil::tmp_name("probe"));
    let result = (|| -> Result<(), RootfsError> {
        let io = |e: io::Error| RootfsError::Mount {
            path: dir.clone(),
            source: e,
        };
        for sub in ["lower", "upper", "work", "merged"] {
            fs::create_dir_all(dir.join(sub)).map_err(io)?;
        }
        fs::write(dir.join("lower/file"), b"x").map_err(io)?;
        let merged = dir.join("merged");
        mount_overlay(
            &[dir.join("lower")],
            &dir.join("upper"),
            &dir.join("work"),
            &merged,
        )?;
        let seen = merged.join("file").exists();
        unmount(&merged)?;
        if seen {
            Ok(())
        } else {
            Err(RootfsError::StillMounted { path: merged })
        }
    })();
    if let Err(e) = &result {
        tracing::info!(error = %e, "overlayfs unusable: container root filesystems will be copies");
    }
    if !crate::sys::is_mount_point(&dir.join("merged")) {
        let _ = fsutil::remove_tree(&dir);
    }
    result.is_ok()
}

impl ImageStore {
    fn overlay_usable(&self) -> bool {
        *self
            .inner
            .overlay_usable
            .get_or_init(|| probe_overlay(&self.inner.root))
    }

    /// The directory of a container's rootfs, upper and work dirs.
    pub fn container_dir(&self, container_id: &str) -> PathBuf {
        self.inner.containers_dir.join(container_id)
    }

    /// Makes `<root>/containers/<id>/rootfs` from the image and returns its path; records
    /// first that the container holds the image, so nothing removes the image while the
    /// container exists. Idempotent for the same container and image. Blocking.
    pub fn mount_rootfs(&self, image: &Image, container_id: &str) -> Result<PathBuf, ImageError> {
        validate_container_id(container_id)?;
        let _container = self.inner.container_locks.lock(container_id);
        let kind = match self.inner.options.rootfs {
            RootfsMode::Overlay => MountKind::Overlay,
            RootfsMode::Copy => MountKind::Copy,
            RootfsMode::Auto if self.overlay_usable() => MountKind::Overlay,
            RootfsMode::Auto => MountKind::Copy,
        };
        let dir = self.container_dir(container_id);
        let rootfs = dir.join("rootfs");
        // The hold is kept in the container's directory, not in the index file: a start
        // rewrites no shared file. `last_used` is kept in memory until the index is written.
        let existing = self.with_index_mut(|index| {
            if !index.images.contains_key(&image.digest) {
                return Err(ImageError::NotFound {
                    reference: image.digest.clone(),
                });
            }
            if let Some(rec) = index.images.get_mut(&image.digest) {
                rec.last_used = now();
            }
            match index.holds.get(container_id) {
                Some(h) if h.image != image.digest => Err(RootfsError::HeldByOther {
                    container: container_id.to_string(),
                    image: h.image.clone(),
                }
                .into()),
                Some(h) => Ok(Some(h.mode)),
                None => {
                    let hold = Hold {
                        image: image.digest.clone(),
                        mode: kind,
                    };
                    write_hold(&dir, &hold)?;
                    index.holds.insert(container_id.to_string(), hold);
                    Ok(None)
                }
            }
        })?;
        match existing {
            Some(MountKind::Overlay) if crate::sys::is_mount_point(&rootfs) => return Ok(rootfs),
            Some(MountKind::Copy) if dir.join("complete").exists() => return Ok(rootfs),
            _ => {}
        }
        let kind = existing.unwrap_or(kind);
        let result = self.build_rootfs(image, &dir, kind);
        if let Err(e) = result {
            // Leave nothing half-made, and drop the hold the failed container never used.
            let _ = self.unmount_locked(container_id);
            return Err(e);
        }
        Ok(rootfs)
    }

    fn build_rootfs(&self, image: &Image, dir: &Path, kind: MountKind) -> Result<(), ImageError> {
        let rootfs = dir.join("rootfs");
        fs::create_dir_all(&rootfs).map_err(ImageError::io("create", &rootfs))?;
        let layer_dirs: Vec<PathBuf> = image.layers.iter().map(|l| self.layer_dir(l)).collect();
        match kind {
            MountKind::Overlay => {
                let upper = dir.join("upper");
                let work = dir.join("work");
                for d in [&upper, &work] {
                    fs::create_dir_all(d).map_err(ImageError::io("create", d))?;
                }
                let mut lowers: Vec<PathBuf> = layer_dirs.into_iter().rev().collect();
                if lowers.is_empty() {
                    // An image without layers: overlayfs still wants a lower directory.
                    let empty = dir.join("empty");
                    fs::create_dir_all(&empty).map_err(ImageError::io("create", &empty))?;
                    lowers.push(empty);
                }
                if crate::sys::is_mount_point(&rootfs) {
                    return Ok(());
                }
                mount_overlay(&lowers, &upper, &work, &rootfs)?;
            }
            MountKind::Copy => {
                fsutil::remove_tree(&rootfs).map_err(ImageError::io("clean", &rootfs))?;
                fs::create_dir(&rootfs).map_err(ImageError::io("create", &rootfs))?;
                for layer in &layer_dirs {
                    copy_layer(layer, &rootfs)?;
                }
                let marker = dir.join("complete");
                fs::write(&marker, b"").map_err(ImageError::io("write", &marker))?;
            }
        }
        Ok(())
    }

    /// Detaches the node's mount of a container's overlay rootfs once the container holds its
    /// own (its init has made it the root of its mount namespace, at create): the container
    /// keeps it, and the overlay goes with the container's last process. The node's mount
    /// table then does not grow with the containers it runs, and every process that reads
    /// it (libcontainer reads it several times per container) stays cheap. The hold, the
    /// directories and the upper layer stay until [`ImageStore::unmount_rootfs`]. Idempotent.
    pub fn detach_rootfs(&self, container_id: &str) -> Result<(), ImageError> {
        validate_container_id(container_id)?;
        let _container = self.inner.container_locks.lock(container_id);
        let rootfs = self.container_dir(container_id).join("rootfs");
        if !crate::sys::is_mount_point(&rootfs) {
            return Ok(());
        }
        match rmount::unmount(&rootfs, UnmountFlags::DETACH) {
            Ok(()) | Err(Errno::INVAL) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(RootfsError::Unmount {
                path: rootfs,
                source: e.into(),
            }
            .into()),
        }
    }

    /// Unmounts (or deletes, for a copy) a container's rootfs, removes its directories and
    /// drops its hold on the image. Idempotent. A busy mount is an error, never detached
    /// lazily. Blocking.
    pub fn unmount_rootfs(&self, container_id: &str) -> Result<(), ImageError> {
        validate_container_id(container_id)?;
        let _container = self.inner.container_locks.lock(container_id);
        self.unmount_locked(container_id)
    }

    fn unmount_locked(&self, container_id: &str) -> Result<(), ImageError> {
        let dir = self.container_dir(container_id);
        let rootfs = dir.join("rootfs");
        unmount(&rootfs)?;
        if crate::sys::is_mount_point(&rootfs) {
            return Err(RootfsError::StillMounted { path: rootfs }.into());
        }
        let kind = self.with_index(|index| index.holds.get(container_id).map(|h| h.mode));
        if kind != Some(MountKind::Copy) {
            // An overlay mount point is empty once unmounted: removing it without recursion
            // means a mount the store does not know about is never descended into.
            match fs::remove_dir(&rootfs) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(ImageError::io("remove", &rootfs)(e)),
            }
        }
        fsutil::remove_tree(&dir).map_err(ImageError::io("remove", &dir))?;
        self.with_index_mut(|index| index.holds.remove(container_id));
        Ok(())
    }

    /// The containers holding images, with the image each holds.
    pub fn holds(&self) -> Vec<(String, String)> {
        self.with_index(|index| {
            index
                .holds
                .iter()
                .map(|(c, h)| (c.clone(), h.image.clone()))
                .collect()
        })
    }
}

fn copy_err(path: &Path, op: &'static str) -> impl FnOnce(Errno) -> RootfsError + use<> {
    let path = path.to_path_buf();
    move |e| RootfsError::Copy {
        path,
        op,
        source: e.into(),
    }
}

/// Applies one unpacked layer on top of `dest`: whiteout devices delete, opaque directories
/// drop what lower layers put there, everything else is copied with its metadata. Both trees
/// are walked by descriptor without following symlinks.
fn copy_layer(layer: &Path, dest: &Path) -> Result<(), RootfsError> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let src = rfs::open(layer, flags, Mode::empty()).map_err(copy_err(layer, "open layer"))?;
    let dst = rfs::open(dest, flags, Mode::empty()).map_err(copy_err(dest, "open rootfs"))?;
    let mut links = std::collections::HashMap::new();
    copy_dir(src.as_fd(), dst.as_fd(), dest, &mut links)
}

/// Files with several links already copied in this layer: (dev, inode) → the destination
/// directory (as a descriptor, never re-resolved by path) and the name there.
type HardLinks = std::collections::HashMap<(u64, u64), (Arc<OwnedFd>, Vec<u8>)>;

fn copy_dir(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    path: &Path,
    links: &mut HardLinks,
) -> Result<(), RootfsError> {
    let chown = rustix::process::geteuid().is_root();
    let mut this_dir: Option<Arc<OwnedFd>> = None;
    let mut buf = [0u8; 2];
    if matches!(rfs::fgetxattr(src, OPAQUE_XATTR, &mut buf), Ok(1) if buf[0] == b'y') {
        let mut names = Vec::new();
        for entry in rfs::Dir::read_from(dst).map_err(copy_err(path, "list"))? {
            let entry = entry.map_err(copy_err(path, "list"))?;
            let n = entry.file_name().to_bytes();
            if n != b"." && n != b".." {
                names.push(n.to_vec());
            }
        }
        for n in names {
            remove_at(dst, OsStr::from_bytes(&n)).map_err(copy_err(path, "remove"))?;
        }
    }
    let mut names = Vec::new();
    for entry in rfs::Dir::read_from(src).map_err(copy_err(path, "list layer"))? {
        let entry = entry.map_err(copy_err(path, "list layer"))?;
        let n = entry.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    for n in names {
        let name = OsStr::from_bytes(&n);
        let here = path.join(name);
        let st =
            rfs::statat(src, name, AtFlags::SYMLINK_NOFOLLOW).map_err(copy_err(&here, "stat"))?;
        let kind = FileType::from_raw_mode(st.st_mode);
        let mode = Mode::from_raw_mode(st.st_mode & 0o7777);
        let (uid, gid) = (Uid::from_raw(st.st_uid), Gid::from_raw(st.st_gid));
        let times = Timestamps {
            last_access: Timespec {
                tv_sec: st.st_atime as i64,
                tv_nsec: 0,
            },
            last_modification: Timespec {
                tv_sec: st.st_mtime as i64,
                tv_nsec: st.st_mtime_nsec as i64,
            },
        };
        let existing = rfs::statat(dst, name, AtFlags::SYMLINK_NOFOLLOW).ok();
        match kind {
            FileType::CharacterDevice if st.st_rdev == 0 => {
                remove_at(dst, name).map_err(copy_err(&here, "whiteout"))?;
            }
            FileType::Directory => {
                let is_dir = existing
                    .is_some_and(|e| FileType::from_raw_mode(e.st_mode) == FileType::Directory);
                if !is_dir {
                    remove_at(dst, name).map_err(copy_err(&here, "replace"))?;
                    rfs::mkdirat(dst, name, Mode::from_raw_mode(0o700))
                        .map_err(copy_err(&here, "mkdir"))?;
                }
                let dir_flags =
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                let s = rfs::openat(src, name, dir_flags, Mode::empty())
                    .map_err(copy_err(&here, "open"))?;
                let d = rfs::openat(dst, name, dir_flags, Mode::empty())
                    .map_err(copy_err(&here, "open"))?;
                copy_dir(s.as_fd(), d.as_fd(), &here, links)?;
                if chown {
                    rfs::fchown(&d, Some(uid), Some(gid)).map_err(copy_err(&here, "chown"))?;
                }
                rfs::fchmod(&d, mode).map_err(copy_err(&here, "chmod"))?;
                rfs::futimens(&d, &times).map_err(copy_err(&here, "set times"))?;
            }
            FileType::RegularFile => {
                remove_at(dst, name).map_err(copy_err(&here, "replace"))?;
                if st.st_nlink > 1
                    && let Some((dir_fd, target)) = links.get(&(st.st_dev, st.st_ino))
                {
                    // A hard link inside the layer stays one in the copy.
                    rfs::linkat(
                        dir_fd.as_fd(),
                        OsStr::from_bytes(target),
                        dst,
                        name,
                        AtFlags::empty(),
                    )
                    .map_err(copy_err(&here, "link"))?;
                    continue;
                }
                let s = rfs::openat(
                    src,
                    name,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(copy_err(&here, "open"))?;
                let d = rfs::openat(
                    dst,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(copy_err(&here, "create"))?;
                let (mut s, mut d) = (fs::File::from(s), fs::File::from(d));
                io::copy(&mut s, &mut d).map_err(|source| RootfsError::Copy {
                    path: here.clone(),
                    op: "copy",
                    source,
                })?;
                if chown {
                    rfs::fchown(&d, Some(uid), Some(gid)).map_err(copy_err(&here, "chown"))?;
                }
                rfs::fchmod(&d, mode).map_err(copy_err(&here, "chmod"))?;
                rfs::futimens(&d, &times).map_err(copy_err(&here, "set times"))?;
                if st.st_nlink > 1 {
                    let dir = match &this_dir {
                        Some(fd) => Arc::clone(fd),
                        None => {
                            let fd = Arc::new(dst.try_clone_to_owned().map_err(|source| {
                                RootfsError::Copy {
                                    path: here.clone(),
                                    op: "dup",
                                    source,
                                }
                            })?);
                            this_dir = Some(Arc::clone(&fd));
                            fd
                        }
                    };
                    links.insert((st.st_dev, st.st_ino), (dir, n.clone()));
                }
            }
            FileType::Symlink => {
                remove_at(dst, name).map_err(copy_err(&here, "replace"))?;
                let target =
                    rfs::readlinkat(src, name, Vec::new()).map_err(copy_err(&here, "readlink"))?;
                rfs::symlinkat(OsStr::from_bytes(target.as_bytes()), dst, name)
                    .map_err(copy_err(&here, "symlink"))?;
                if chown {
                    rfs::chownat(dst, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(copy_err(&here, "chown"))?;
                }
            }
            FileType::Fifo => {
                remove_at(dst, name).map_err(copy_err(&here, "replace"))?;
                rfs::mknodat(dst, name, FileType::Fifo, mode, 0)
                    .map_err(copy_err(&here, "mkfifo"))?;
            }
            _ => {
                tracing::warn!(path = %here.display(), "unexpected file type in layer, skipped");
            }
        }
    }
    Ok(())
}
