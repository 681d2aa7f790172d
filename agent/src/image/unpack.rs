//! Unpacking one layer tarball into its own directory, in the form overlayfs expects of a lower
//! directory, without ever writing outside it.
//!
//! The tar crate's `unpack`/`unpack_in` is not used: every entry is placed here by walking its
//! parent path one component at a time with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`
//! from a descriptor of the layer root, and creating the final name relative to the parent's
//! descriptor with `O_NOFOLLOW`/`O_EXCL`. So `..`, absolute paths, a symlink followed by a file
//! written through it, and hard links to anything outside the layer are refused, not merely
//! checked (no check-then-use race: the layer directory is private while it is unpacked).
//!
//! Entries are applied in tar order and a later entry replaces an earlier one of the same name,
//! as `tar` and Docker do. Whiteouts become what overlayfs reads in a lower directory: `.wh.X`
//! becomes a 0:0 character device `X`, and `.wh..wh..opq` the xattr `trusted.overlay.opaque=y`
//! on its directory. Device nodes are skipped (a layer is shared by every container of every
//! image that uses it, privileged or not). Of the xattrs only `user.*` and
//! `security.capability` are kept: `trusted.overlay.*` from an image would steer overlayfs.
//!
//! The diff_id (sha256 of the uncompressed tar stream, trailing padding included) is computed
//! while reading; the caller checks it against the image config.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{
    self as rfs, AtFlags, FileType, Gid, Mode, OFlags, ResolveFlags, Timespec, Timestamps, Uid,
    XattrFlags,
};
use rustix::io::Errno;
use sha2::{Digest as _, Sha256};

/// Linux's limit on one path component.
const NAME_MAX: usize = 255;
/// Linux's limit on a path.
const PATH_MAX: usize = 4096;
/// The prefix of a whiteout entry.
pub(crate) const WHITEOUT_PREFIX: &str = ".wh.";
/// The name of an opaque-directory marker entry.
pub(crate) const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// The xattr overlayfs reads to treat a lower directory as opaque.
pub(crate) const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Why a layer could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The blob is compressed with something other than gzip or zstd.
    #[error("unsupported layer compression: {kind}")]
    UnsupportedCompression {
        /// The format recognised by its magic bytes.
        kind: &'static str,
    },
    /// The compressed or tar stream could not be read (truncated, corrupt).
    #[error("reading layer stream: {source}")]
    Read {
        /// The underlying error.
        source: io::Error,
    },
    /// An entry tried to leave the layer directory, or to go through a symlink.
    #[error("layer entry {path:?} refused: {reason}")]
    UnsafePath {
        /// The entry's path as in the tar.
        path: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A path component longer than 255 bytes or a path longer than 4096.
    #[error("layer entry {path:?} refused: name too long")]
    NameTooLong {
        /// The entry's path (shortened).
        path: String,
    },
    /// A tar entry type that has no meaning in a layer.
    #[error("layer entry {path:?}: unsupported entry type {kind}")]
    UnsupportedEntry {
        /// The entry's path.
        path: String,
        /// The tar type.
        kind: String,
    },
    /// A uid or gid outside what Linux can represent.
    #[error("layer entry {path:?}: invalid owner {uid}:{gid}")]
    InvalidOwner {
        /// The entry's path.
        path: String,
        /// The uid in the header.
        uid: u64,
        /// The gid in the header.
        gid: u64,
    },
    /// A filesystem operation inside the layer directory failed.
    #[error("layer entry {path:?}: {op}: {source}")]
    Fs {
        /// The entry's path.
        path: String,
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        source: io::Error,
    },
}

/// The compression of a layer blob, recognised by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar stream.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// Recognises the compression from the first bytes of a blob.
    pub fn detect(magic: &[u8]) -> Result<Compression, UnpackError> {
        let unsupported = |kind| Err(UnpackError::UnsupportedCompression { kind });
        if magic.starts_with(&[0x1f, 0x8b]) {
            Ok(Compression::Gzip)
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Ok(Compression::Zstd)
        } else if magic.starts_with(b"BZh") {
            unsupported("bzip2")
        } else if magic.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            unsupported("xz")
        } else {
            Ok(Compression::None)
        }
    }

    /// The OCI layer media type of a blob in this compression.
    pub fn oci_media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// What unpacking a layer produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackStats {
    /// `sha256:` of the uncompressed tar stream.
    pub diff_id: String,
    /// Bytes of the uncompressed tar stream.
    pub tar_size: u64,
    /// Entries applied.
    pub entries: u64,
    /// Device nodes skipped.
    pub skipped_devices: u64,
}

/// How entries are applied.
#[derive(Debug, Clone, Copy)]
pub struct UnpackOptions {
    /// Apply the entries' uid/gid (needs root; off when unpacking as another user in tests).
    pub chown: bool,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions {
            chown: rustix::process::geteuid().is_root(),
        }
    }
}

/// A reader that hashes and counts what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Returns the stream decompressed according to its first bytes.
pub(crate) fn decompress<'a>(
    reader: impl Read + 'a,
) -> Result<(Compression, Box<dyn Read + 'a>), UnpackError> {
    let mut reader = BufReader::with_capacity(128 * 1024, reader);
    let magic = reader
        .fill_buf()
        .map_err(|source| UnpackError::Read { source })?;
    let compression = Compression::detect(magic)?;
    let stream: Box<dyn Read> = match compression {
        Compression::None => Box::new(reader),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(reader)),
        Compression::Zstd => Box::new(
            zstd::Decoder::with_buffer(reader).map_err(|source| UnpackError::Read { source })?,
        ),
    };
    Ok((compression, stream))
}

/// Unpacks a layer blob into `dest`, an existing empty directory, and returns its diff_id.
pub fn unpack_layer(
    blob: impl Read,
    dest: &Path,
    options: &UnpackOptions,
) -> Result<UnpackStats, UnpackError> {
    let (_, stream) = decompress(blob)?;
    let root = rfs::open(
        dest,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| fs_err("", "open layer directory", e))?;
    let mut archive = tar::Archive::new(Hashing {
        inner: stream,
        hasher: Sha256::new(),
        count: 0,
    });
    let mut stats = UnpackStats {
        diff_id: String::new(),
        tar_size: 0,
        entries: 0,
        skipped_devices: 0,
    };
    let mut dirs = BTreeMap::new();
    let read_err = |source| UnpackError::Read { source };
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        apply_entry(root.as_fd(), &mut entry, options, &mut dirs, &mut stats)?;
    }
    // Directory metadata last: creating entries inside a directory changes its mtime, and a
    // read-only mode would stop the entries being created. Deepest first.
    let mut dirs: Vec<_> = dirs.into_iter().collect();
    dirs.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
    for (components, meta) in dirs {
        apply_dir_meta(root.as_fd(), &components, &meta, options)?;
    }
    // The diff_id covers the whole stream, including the zero blocks after the last entry.
    let mut hashing = archive.into_inner();
    io::copy(&mut hashing, &mut io::sink()).map_err(read_err)?;
    stats.diff_id = format!("sha256:{}", hex::encode(hashing.hasher.finalize()));
    stats.tar_size = hashing.count;
    Ok(stats)
}

/// The metadata of one tar entry that is applied to what it creates.
#[derive(Debug, Clone)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    xattrs: Vec<(String, Vec<u8>)>,
}

fn fs_err(path: &str, op: &'static str, errno: Errno) -> UnpackError {
    UnpackError::Fs {
        path: path.to_string(),
        op,
        source: errno.into(),
    }
}

fn display(path: &[u8]) -> String {
    let s = String::from_utf8_lossy(path);
    if s.len() > 200 {
        let mut cut = 200;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}…", &s[..cut])
    } else {
        s.into_owned()
    }
}

/// Splits a tar path into its components, refusing anything that could leave the root.
/// `./a//b/` is `[a, b]`; `.` is `[]` (the root itself).
pub(crate) fn split_path(path: &[u8]) -> Result<Vec<&OsStr>, UnpackError> {
    let unsafe_path = |reason| UnpackError::UnsafePath {
        path: display(path),
        reason,
    };
    if path.starts_with(b"/") {
        return Err(unsafe_path("absolute path"));
    }
    if path.len() > PATH_MAX {
        return Err(UnpackError::NameTooLong {
            path: display(path),
        });
    }
    let mut out = Vec::new();
    for component in path.split(|&b| b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => return Err(unsafe_path("path contains \"..\"")),
            name if name.len() > NAME_MAX => {
                return Err(UnpackError::NameTooLong {
                    path: display(path),
                });
            }
            name => out.push(OsStr::from_bytes(name)),
        }
    }
    Ok(out)
}

/// The resolve flags for every step inside a layer: stay beneath, follow no symlink.
fn resolve_flags() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

/// Opens one directory component below `dir` without following symlinks.
fn open_component(dir: BorrowedFd<'_>, name: &OsStr, flags: OFlags) -> Result<OwnedFd, Errno> {
    rfs::openat2(
        dir,
        name,
        // RESOLVE_NO_SYMLINKS refuses a symlink in the last component too, with ELOOP.
        flags | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        resolve_flags(),
    )
}

/// Walks `components` from `root`, one at a time, creating missing directories (0755, as tar
/// does for implied parents) when `create` is set. Refuses symlinks and non-directories.
pub(crate) fn open_dir(
    root: BorrowedFd<'_>,
    components: &[&OsStr],
    create: bool,
    path: &[u8],
) -> Result<OwnedFd, UnpackError> {
    let mut current = rfs::openat(
        root,
        ".",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| fs_err(&display(path), "open layer root", e))?;
    for name in components {
        let next = match open_component(current.as_fd(), name, OFlags::PATH) {
            Err(Errno::NOENT) if create => {
                match rfs::mkdirat(current.as_fd(), *name, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(fs_err(&display(path), "create parent directory", e)),
                }
                open_component(current.as_fd(), name, OFlags::PATH)
            }
            other => other,
        };
        current = next.map_err(|e| match e {
            Errno::LOOP => UnpackError::UnsafePath {
                path: display(path),
                reason: "a parent directory is a symlink",
            },
            Errno::NOTDIR => UnpackError::UnsafePath {
                path: display(path),
                reason: "a parent is not a directory",
            },
            Errno::XDEV => UnpackError::UnsafePath {
                path: display(path),
                reason: "path leaves the layer",
            },
            e => fs_err(&display(path), "open parent directory", e),
        })?;
    }
    Ok(current)
}

fn entry_meta(entry: &mut tar::Entry<'_, impl Read>, path: &[u8]) -> Result<Meta, UnpackError> {
    let header = entry.header();
    let read_err = |source| UnpackError::Read { source };
    let mode = header.mode().map_err(read_err)? & 0o7777;
    let uid = header.uid().map_err(read_err)?;
    let gid = header.gid().map_err(read_err)?;
    let mtime = header.mtime().map_err(read_err)?;
    // u32::MAX is "no id" to chown; larger ids do not exist (CVE-2024-40635 was a wrap).
    let (Ok(uid32), Ok(gid32)) = (u32::try_from(uid), u32::try_from(gid)) else {
        return Err(UnpackError::InvalidOwner {
            path: display(path),
            uid,
            gid,
        });
    };
    if uid32 == u32::MAX || gid32 == u32::MAX {
        return Err(UnpackError::InvalidOwner {
            path: display(path),
            uid,
            gid,
        });
    }
    let mut xattrs = Vec::new();
    if let Some(extensions) = entry.pax_extensions().map_err(read_err)? {
        for ext in extensions {
            let ext = ext.map_err(read_err)?;
            let Ok(key) = ext.key() else { continue };
            let Some(name) = key.strip_prefix("SCHILY.xattr.") else {
                continue;
            };
            if name.starts_with("user.") || name == "security.capability" {
                xattrs.push((name.to_string(), ext.value_bytes().to_vec()));
            }
        }
    }
    Ok(Meta {
        mode,
        uid: uid32,
        gid: gid32,
        mtime: i64::try_from(mtime).unwrap_or(i64::MAX),
        xattrs,
    })
}

/// What is at a name inside a directory, not following symlinks.
fn existing(dir: BorrowedFd<'_>, name: &OsStr) -> Result<Option<rfs::Stat>, Errno> {
    match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn is_whiteout_device(st: &rfs::Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice && st.st_rdev == 0
}

/// Removes whatever is at `name` (a directory with its contents) so an entry can replace it.
pub(crate) fn remove_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<(), Errno> {
    let Some(st) = existing(dir, name)? else {
        return Ok(());
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return rfs::unlinkat(dir, name, AtFlags::empty());
    }
    let sub = open_component(dir, name, OFlags::RDONLY)?;
    // Make sure the directory can be emptied even if its mode says otherwise.
    let _ = rfs::fchmod(&sub, Mode::from_raw_mode(0o700));
    let mut names = Vec::new();
    for entry in rfs::Dir::read_from(&sub)? {
        let entry = entry?;
        let n = entry.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    for n in names {
        remove_at(sub.as_fd(), OsStr::from_bytes(&n))?;
    }
    rfs::unlinkat(dir, name, AtFlags::REMOVEDIR)
}

fn set_xattrs(fd: BorrowedFd<'_>, meta: &Meta, path: &str) -> Result<(), UnpackError> {
    for (name, value) in &meta.xattrs {
        match rfs::fsetxattr(fd, name.as_str(), value, XattrFlags::empty()) {
            Ok(()) => {}
            Err(Errno::OPNOTSUPP) | Err(Errno::PERM) => {
                tracing::warn!(path, xattr = %name, "xattr not supported here, skipped");
            }
            Err(e) => return Err(fs_err(path, "set xattr", e)),
        }
    }
    Ok(())
}

/// Sets the owner (when `chown`) and times of `name` in `parent` without following it, for
/// entries that cannot be opened: symlinks and FIFOs. The failing operation comes with the error.
fn owner_and_times(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    meta: &Meta,
    chown: bool,
) -> Result<(), (&'static str, Errno)> {
    if chown {
        rfs::chownat(
            parent,
            name,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| ("chown", e))?;
    }
    rfs::utimensat(
        parent,
        name,
        &timestamps(meta.mtime),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| ("set times", e))
}

fn timestamps(mtime: i64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Owner, mode, xattrs and times of something opened as `fd` (order matters: chown clears
/// setuid bits, so the mode comes after it).
fn apply_meta_fd(
    fd: BorrowedFd<'_>,
    meta: &Meta,
    options: &UnpackOptions,
    path: &str,
) -> Result<(), UnpackError> {
    if options.chown {
        rfs::fchown(
            fd,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
        )
        .map_err(|e| fs_err(path, "chown", e))?;
    }
    rfs::fchmod(fd, Mode::from_raw_mode(meta.mode)).map_err(|e| fs_err(path, "chmod", e))?;
    set_xattrs(fd, meta, path)?;
    rfs::futimens(fd, &timestamps(meta.mtime)).map_err(|e| fs_err(path, "set times", e))
}

fn apply_dir_meta(
    root: BorrowedFd<'_>,
    components: &[Vec<u8>],
    meta: &Meta,
    options: &UnpackOptions,
) -> Result<(), UnpackError> {
    let joined = components.join(&b'/');
    let comps: Vec<&OsStr> = components.iter().map(|c| OsStr::from_bytes(c)).collect();
    let fd = match comps.split_last() {
        None => rfs::openat(
            root,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        ),
        Some((name, parents)) => {
            let parent = open_dir(root, parents, false, &joined)?;
            open_component(parent.as_fd(), name, OFlags::RDONLY)
        }
    };
    match fd {
        Ok(fd) => apply_meta_fd(fd.as_fd(), meta, options, &display(&joined)),
        // A later entry replaced the directory with something else: nothing to apply.
        Err(Errno::NOENT) | Err(Errno::NOTDIR) | Err(Errno::LOOP) => Ok(()),
        Err(e) => Err(fs_err(&display(&joined), "open directory", e)),
    }
}

fn apply_entry(
    root: BorrowedFd<'_>,
    entry: &mut tar::Entry<'_, impl Read>,
    options: &UnpackOptions,
    dirs: &mut BTreeMap<Vec<Vec<u8>>, Meta>,
    stats: &mut UnpackStats,
) -> Result<(), UnpackError> {
    use tar::EntryType;
    let kind = entry.header().entry_type();
    if matches!(kind, EntryType::XGlobalHeader) {
        return Ok(());
    }
    let raw_path = entry.path_bytes().into_owned();
    let shown = display(&raw_path);
    let components = split_path(&raw_path)?;
    let meta = entry_meta(entry, &raw_path)?;
    stats.entries += 1;

    let Some((name, parents)) = components.split_last() else {
        // The layer root itself ("./"): only its metadata matters.
        if kind == EntryType::Directory {
            dirs.insert(Vec::new(), meta);
        }
        return Ok(());
    };
    let name_bytes = name.as_bytes();

    if matches!(kind, EntryType::Char | EntryType::Block) {
        tracing::warn!(path = %shown, "device node in layer skipped");
        stats.skipped_devices += 1;
        return Ok(());
    }

    let parent = open_dir(root, parents, true, &raw_path)?;
    let parent = parent.as_fd();

    if let Some(target) = name_bytes.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
        return apply_whiteout(parent, target, &shown);
    }

    let err = |op: &'static str| {
        let shown = shown.clone();
        move |e| fs_err(&shown, op, e)
    };
    let prior = existing(parent, name).map_err(err("stat"))?;
    let replaced_whiteout = prior.as_ref().is_some_and(is_whiteout_device);
    let prior_is_dir = prior
        .as_ref()
        .is_some_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory);

    match kind {
        EntryType::Directory => {
            if !prior_is_dir {
                remove_at(parent, name).map_err(err("replace"))?;
                rfs::mkdirat(parent, *name, Mode::from_raw_mode(0o700)).map_err(err("mkdir"))?;
            }
            if replaced_whiteout {
                // `.wh.X` then `X/` in one layer: the new directory hides the lower one.
                let fd = open_component(parent, name, OFlags::RDONLY).map_err(err("open"))?;
                rfs::fsetxattr(&fd, OPAQUE_XATTR, b"y", XattrFlags::empty())
                    .map_err(err("set opaque xattr"))?;
            }
            let key = components.iter().map(|c| c.as_bytes().to_vec()).collect();
            dirs.insert(key, meta);
        }
        EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
            remove_at(parent, name).map_err(err("replace"))?;
            let fd = rfs::openat(
                parent,
                *name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(err("create"))?;
            let mut file = File::from(fd);
            io::copy(entry, &mut file).map_err(|source| UnpackError::Read { source })?;
            apply_meta_fd(file.as_fd(), &meta, options, &shown)?;
        }
        EntryType::Symlink => {
            let target = entry
                .link_name_bytes()
                .map(|t| t.into_owned())
                .unwrap_or_default();
            if target.is_empty() || target.len() > PATH_MAX {
                return Err(UnpackError::UnsafePath {
                    path: shown,
                    reason: "symlink target empty or too long",
                });
            }
            remove_at(parent, name).map_err(err("replace"))?;
            // The target is stored verbatim: it is resolved only inside the container.
            rfs::symlinkat(OsStr::from_bytes(&target), parent, *name).map_err(err("symlink"))?;
            owner_and_times(parent, name, &meta, options.chown)
                .map_err(|(op, e)| fs_err(&shown, op, e))?;
        }
        EntryType::Link => {
            let target = entry
                .link_name_bytes()
                .map(|t| t.into_owned())
                .unwrap_or_default();
            let target_components = split_path(&target).map_err(|e| match e {
                UnpackError::UnsafePath { reason, .. } => UnpackError::UnsafePath {
                    path: shown.clone(),
                    reason: if reason == "absolute path" {
                        "hard link to an absolute path"
                    } else {
                        "hard link target leaves the layer"
                    },
                },
                other => other,
            })?;
            let Some((target_name, target_parents)) = target_components.split_last() else {
                return Err(UnpackError::UnsafePath {
                    path: shown,
                    reason: "hard link to the layer root",
                });
            };
            let target_dir =
                open_dir(root, target_parents, false, &raw_path).map_err(|e| match e {
                    UnpackError::Fs { .. } => UnpackError::UnsafePath {
                        path: shown.clone(),
                        reason: "hard link target is not in this layer",
                    },
                    other => other,
                })?;
            let Some(target_stat) =
                existing(target_dir.as_fd(), target_name).map_err(err("stat link target"))?
            else {
                return Err(UnpackError::UnsafePath {
                    path: shown,
                    reason: "hard link target is not in this layer",
                });
            };
            if FileType::from_raw_mode(target_stat.st_mode) == FileType::Directory {
                return Err(UnpackError::UnsafePath {
                    path: shown,
                    reason: "hard link to a directory",
                });
            }
            if let Some(st) = &prior
                && st.st_ino == target_stat.st_ino
                && st.st_dev == target_stat.st_dev
            {
                return Ok(());
            }
            remove_at(parent, name).map_err(err("replace"))?;
            rfs::linkat(
                target_dir.as_fd(),
                *target_name,
                parent,
                *name,
                AtFlags::empty(),
            )
            .map_err(err("hard link"))?;
        }
        EntryType::Fifo => {
            remove_at(parent, name).map_err(err("replace"))?;
            rfs::mknodat(
                parent,
                *name,
                FileType::Fifo,
                Mode::from_raw_mode(meta.mode),
                0,
            )
            .map_err(err("mkfifo"))?;
            owner_and_times(parent, name, &meta, options.chown)
                .map_err(|(op, e)| fs_err(&shown, op, e))?;
        }
        other => {
            return Err(UnpackError::UnsupportedEntry {
                path: shown,
                kind: format!("{other:?}"),
            });
        }
    }
    Ok(())
}

/// `.wh..wh..opq` marks its directory opaque; `.wh.X` hides the lower `X` with a 0:0 device,
/// unless this layer itself holds an `X` (which hides the lower one by itself; a directory gets
/// the opaque mark so that the lower directory's entries are hidden too).
fn apply_whiteout(parent: BorrowedFd<'_>, target: &[u8], shown: &str) -> Result<(), UnpackError> {
    let err = |op| move |e| fs_err(shown, op, e);
    if target.starts_with(WHITEOUT_PREFIX.as_bytes()) {
        if target == &OPAQUE_MARKER.as_bytes()[WHITEOUT_PREFIX.len()..] {
            let dir = rfs::openat(
                parent,
                ".",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(err("open directory"))?;
            rfs::fsetxattr(&dir, OPAQUE_XATTR, b"y", XattrFlags::empty())
                .map_err(err("set opaque xattr"))?;
        }
        // Other `.wh..wh.` names are aufs bookkeeping: meaningless here.
        return Ok(());
    }
    if target.is_empty() || target == b"." || target == b".." {
        return Err(UnpackError::UnsafePath {
            path: shown.to_string(),
            reason: "whiteout target leaves its directory",
        });
    }
    let name = OsStr::from_bytes(target);
    match existing(parent, name).map_err(err("stat"))? {
        Some(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
            let fd = open_component(parent, name, OFlags::RDONLY).map_err(err("open"))?;
            rfs::fsetxattr(&fd, OPAQUE_XATTR, b"y", XattrFlags::empty())
                .map_err(err("set opaque xattr"))
        }
        Some(_) => Ok(()),
        None => rfs::mknodat(
            parent,
            name,
            FileType::CharacterDevice,
            Mode::empty(),
            rfs::makedev(0, 0),
        )
        .map_err(err("create whiteout")),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::PathBuf;

    /// One entry of a hand-made layer; paths and link targets are written raw, so tests can
    /// build what `tar::Builder` would refuse.
    pub(crate) enum E<'a> {
        File(&'a str, &'a [u8]),
        Dir(&'a str),
        Symlink(&'a str, &'a str),
        Link(&'a str, &'a str),
        Char(&'a str, u32, u32),
        Fifo(&'a str),
    }

    pub(crate) fn tar_of(entries: &[E<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(1_700_000_000);
            h.set_uid(0);
            h.set_gid(0);
            let (path, data, link): (&str, &[u8], Option<&str>) = match e {
                E::File(p, d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(0o644);
                    (p, d, None)
                }
                E::Dir(p) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    (p, &[], None)
                }
                E::Symlink(p, t) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    (p, &[], Some(t))
                }
                E::Link(p, t) => {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_mode(0o644);
                    (p, &[], Some(t))
                }
                E::Char(p, maj, min) => {
                    h.set_entry_type(tar::EntryType::Char);
                    h.set_mode(0o666);
                    h.set_device_major(*maj).unwrap();
                    h.set_device_minor(*min).unwrap();
                    (p, &[], None)
                }
                E::Fifo(p) => {
                    h.set_entry_type(tar::EntryType::Fifo);
                    h.set_mode(0o600);
                    (p, &[], None)
                }
            };
            h.set_size(data.len() as u64);
            if let Some(t) = link {
                let field = &mut h.as_old_mut().linkname;
                field.fill(0);
                field[..t.len()].copy_from_slice(t.as_bytes());
            }
            if path.len() <= 100 {
                let field = &mut h.as_old_mut().name;
                field.fill(0);
                field[..path.len()].copy_from_slice(path.as_bytes());
                h.set_cksum();
                b.append(&h, data).unwrap();
            } else {
                b.append_data(&mut h, path, data).unwrap();
            }
        }
        b.into_inner().unwrap()
    }

    pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    pub(crate) fn sha(data: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(data)))
    }

    /// Whether root-only behaviour (whiteout devices, trusted xattrs) can be tested; under CI
    /// it must.
    pub(crate) fn is_root_or_skip(what: &str) -> bool {
        if rustix::process::geteuid().is_root() {
            return true;
        }
        if std::env::var_os("CI").is_some() {
            panic!("{what} needs root; CI runs tests as root");
        }
        eprintln!("skipping {what}: needs root");
        false
    }

    /// A layer dir beside a directory the layer must never reach.
    struct Sandbox {
        _tmp: tempfile::TempDir,
        top: PathBuf,
        layer: PathBuf,
        outside: PathBuf,
    }

    impl Sandbox {
        fn new() -> Sandbox {
            let tmp = tempfile::tempdir().unwrap();
            let top = tmp.path().to_path_buf();
            let layer = top.join("layer");
            let outside = top.join("outside");
            std::fs::create_dir(&layer).unwrap();
            std::fs::create_dir(&outside).unwrap();
            Sandbox {
                _tmp: tmp,
                top,
                layer,
                outside,
            }
        }

        fn unpack(&self, blob: &[u8]) -> Result<UnpackStats, UnpackError> {
            unpack_layer(blob, &self.layer, &UnpackOptions::default())
        }

        /// Nothing appeared beside the layer nor in the outside directory.
        fn assert_contained(&self) {
            let outside: Vec<_> = std::fs::read_dir(&self.outside).unwrap().collect();
            assert!(outside.is_empty(), "written outside: {outside:?}");
            let mut top: Vec<_> = std::fs::read_dir(&self.top)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            top.sort();
            assert_eq!(top, ["layer", "outside"]);
        }

        fn refuse(&self, entries: &[E<'_>], want: &str) {
            let err = self.unpack(&tar_of(entries)).unwrap_err();
            assert!(
                err.to_string().contains(want),
                "error {err:?} should mention {want:?}"
            );
            self.assert_contained();
        }
    }

    #[test]
    fn unpacks_entries_with_metadata() {
        let sb = Sandbox::new();
        let tar = tar_of(&[
            E::Dir("./"),
            E::Dir("etc/"),
            E::File("etc/hosts", b"127.0.0.1 localhost\n"),
            E::File("deep/implied/file", b"x"),
            E::Symlink("etc/abs", "/etc/passwd"),
            E::Symlink("up", "../../../../"),
            E::Link("etc/hosts2", "etc/hosts"),
            E::Fifo("fifo"),
        ]);
        let stats = sb.unpack(&tar).unwrap();
        assert_eq!(stats.diff_id, sha(&tar));
        assert_eq!(stats.tar_size, tar.len() as u64);
        let l = &sb.layer;
        assert_eq!(
            std::fs::read(l.join("etc/hosts")).unwrap(),
            b"127.0.0.1 localhost\n"
        );
        let m = std::fs::metadata(l.join("etc/hosts")).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o644);
        assert_eq!(m.mtime(), 1_700_000_000);
        assert_eq!(m.nlink(), 2);
        assert_eq!(
            std::fs::metadata(l.join("etc/hosts2")).unwrap().ino(),
            m.ino()
        );
        assert_eq!(
            std::fs::read_link(l.join("etc/abs")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert_eq!(
            std::fs::read_link(l.join("up")).unwrap(),
            Path::new("../../../../")
        );
        let etc = std::fs::metadata(l.join("etc")).unwrap();
        assert_eq!(etc.permissions().mode() & 0o7777, 0o755);
        assert_eq!(etc.mtime(), 1_700_000_000);
        assert_eq!(
            std::fs::metadata(l.join("deep/implied"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
        use std::os::unix::fs::FileTypeExt;
        assert!(
            std::fs::symlink_metadata(l.join("fifo"))
                .unwrap()
                .file_type()
                .is_fifo()
        );
        sb.assert_contained();
    }

    #[test]
    fn compressions_give_the_same_diff_id() {
        let tar = tar_of(&[E::File("a", b"hello"), E::File("b/c", &[1u8; 10_000])]);
        let zst = zstd::encode_all(&tar[..], 3).unwrap();
        for (what, blob) in [("plain", tar.clone()), ("gzip", gzip(&tar)), ("zstd", zst)] {
            let sb = Sandbox::new();
            let stats = sb.unpack(&blob).unwrap();
            assert_eq!(stats.diff_id, sha(&tar), "{what}");
            assert_eq!(
                std::fs::read(sb.layer.join("a")).unwrap(),
                b"hello",
                "{what}"
            );
        }
    }

    #[test]
    fn later_entries_replace_earlier_ones() {
        let sb = Sandbox::new();
        sb.unpack(&tar_of(&[
            E::File("a", b"first"),
            E::File("a", b"second"),
            E::Dir("d/"),
            E::File("d/x", b"x"),
            E::File("d", b"now a file"),
            E::File("f", b"f"),
            E::Dir("f/"),
            E::File("f/y", b"y"),
        ]))
        .unwrap();
        assert_eq!(std::fs::read(sb.layer.join("a")).unwrap(), b"second");
        assert_eq!(std::fs::read(sb.layer.join("d")).unwrap(), b"now a file");
        assert_eq!(std::fs::read(sb.layer.join("f/y")).unwrap(), b"y");
        sb.assert_contained();
    }

    #[test]
    fn whiteouts_become_overlay_markers() {
        if !is_root_or_skip("whiteout unpacking") {
            return;
        }
        let sb = Sandbox::new();
        sb.unpack(&tar_of(&[
            E::File(".wh.gone", b""),
            E::Dir("opaque/"),
            E::File("opaque/.wh..wh..opq", b""),
            E::File("opaque/new", b"n"),
            E::File(".wh..wh.plnk", b""),
            E::File("kept", b"k"),
            E::File(".wh.kept", b""),
        ]))
        .unwrap();
        let gone = std::fs::symlink_metadata(sb.layer.join("gone")).unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(gone.file_type().is_char_device());
        assert_eq!(gone.rdev(), 0);
        let mut buf = [0u8; 4];
        let n = rfs::getxattr(sb.layer.join("opaque").as_path(), OPAQUE_XATTR, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"y");
        assert!(!sb.layer.join(".wh..wh.plnk").exists());
        assert_eq!(std::fs::read(sb.layer.join("kept")).unwrap(), b"k");
        sb.assert_contained();
    }

    #[test]
    fn image_xattrs_cannot_steer_overlayfs() {
        let sb = Sandbox::new();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_pax_extensions([
            ("SCHILY.xattr.trusted.overlay.opaque", &b"y"[..]),
            ("SCHILY.xattr.trusted.overlay.redirect", &b"/etc"[..]),
        ])
        .unwrap();
        b.append_data(&mut h, "d/", &[][..]).unwrap();
        sb.unpack(&b.into_inner().unwrap()).unwrap();
        let mut buf = [0u8; 16];
        assert!(rfs::getxattr(sb.layer.join("d").as_path(), OPAQUE_XATTR, &mut buf).is_err());
        sb.assert_contained();
    }

    #[test]
    fn refuses_dotdot_paths() {
        Sandbox::new().refuse(&[E::File("../escape", b"x")], "\"..\"");
        Sandbox::new().refuse(&[E::File("a/../../escape", b"x")], "\"..\"");
        Sandbox::new().refuse(&[E::Dir("../outside/d/")], "\"..\"");
    }

    #[test]
    fn refuses_absolute_paths() {
        let sb = Sandbox::new();
        let target = format!("{}/abs", sb.outside.display());
        sb.refuse(&[E::File(&target, b"x")], "absolute path");
    }

    #[test]
    fn refuses_writing_through_a_symlink() {
        let sb = Sandbox::new();
        let outside = sb.outside.to_str().unwrap().to_string();
        sb.refuse(
            &[E::Symlink("evil", &outside), E::File("evil/file", b"x")],
            "symlink",
        );
        let sb = Sandbox::new();
        let outside = sb.outside.to_str().unwrap().to_string();
        sb.refuse(
            &[E::Symlink("evil", &outside), E::Dir("evil/sub/")],
            "symlink",
        );
    }

    #[test]
    fn refuses_symlink_to_dotdot_then_dir_under_it() {
        Sandbox::new().refuse(
            &[E::Symlink("up", ".."), E::Dir("up/outside/d/")],
            "symlink",
        );
        Sandbox::new().refuse(
            &[E::Symlink("up", "../.."), E::File("up/x", b"x")],
            "symlink",
        );
    }

    #[test]
    fn refuses_hardlinks_outside_the_layer() {
        let sb = Sandbox::new();
        std::fs::write(sb.top.join("secret"), b"s").unwrap();
        let err = sb
            .unpack(&tar_of(&[E::Link("h", "../secret")]))
            .unwrap_err();
        assert!(err.to_string().contains("leaves the layer"), "{err}");
        std::fs::remove_file(sb.top.join("secret")).unwrap();
        sb.assert_contained();
        let sb = Sandbox::new();
        sb.refuse(&[E::Link("h", "/etc/passwd")], "absolute");
        let sb = Sandbox::new();
        sb.refuse(&[E::Link("h", "etc/passwd")], "not in this layer");
        // Through a symlink that points out of the layer.
        let sb = Sandbox::new();
        let outside = sb.outside.to_str().unwrap().to_string();
        std::fs::write(sb.outside.join("f"), b"s").unwrap();
        let err = sb
            .unpack(&tar_of(&[E::Symlink("s", &outside), E::Link("h", "s/f")]))
            .unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        assert_eq!(std::fs::metadata(sb.outside.join("f")).unwrap().nlink(), 1);
    }

    #[test]
    fn refuses_whiteouts_that_leave_their_directory() {
        Sandbox::new().refuse(&[E::File(".wh..", b"")], "whiteout target");
        Sandbox::new().refuse(&[E::File("a/.wh...", b"")], "whiteout target");
        let sb = Sandbox::new();
        let outside = sb.outside.to_str().unwrap().to_string();
        std::fs::write(sb.outside.join("victim"), b"v").unwrap();
        let err = sb
            .unpack(&tar_of(&[
                E::Symlink("s", &outside),
                E::File("s/.wh.victim", b""),
            ]))
            .unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        assert_eq!(std::fs::read(sb.outside.join("victim")).unwrap(), b"v");
    }

    #[test]
    fn skips_device_nodes() {
        let sb = Sandbox::new();
        let stats = sb
            .unpack(&tar_of(&[
                E::Char("dev/kmsg", 1, 11),
                E::Char("zero-zero", 0, 0),
                E::File("ok", b"1"),
            ]))
            .unwrap();
        assert_eq!(stats.skipped_devices, 2);
        assert!(!sb.layer.join("dev/kmsg").exists());
        assert!(std::fs::symlink_metadata(sb.layer.join("zero-zero")).is_err());
        sb.assert_contained();
    }

    #[test]
    fn refuses_too_long_names() {
        let long = "n".repeat(300);
        Sandbox::new().refuse(&[E::File(&long, b"x")], "name too long");
        let deep = format!("{}/f", vec!["d"; 2100].join("/"));
        Sandbox::new().refuse(&[E::File(&deep, b"x")], "name too long");
    }

    #[test]
    fn refuses_truncated_and_unknown_streams() {
        let tar = tar_of(&[E::File("big", &[7u8; 100_000])]);
        let gz = gzip(&tar);
        let sb = Sandbox::new();
        let err = sb.unpack(&gz[..gz.len() / 2]).unwrap_err();
        assert!(matches!(err, UnpackError::Read { .. }), "{err:?}");
        let sb = Sandbox::new();
        let err = sb.unpack(&tar[..tar.len() / 2]).unwrap_err();
        assert!(matches!(err, UnpackError::Read { .. }), "{err:?}");
        let sb = Sandbox::new();
        let err = sb
            .unpack(&[0xfd, b'7', b'z', b'X', b'Z', 0, 1, 2])
            .unwrap_err();
        assert!(
            matches!(err, UnpackError::UnsupportedCompression { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn refuses_owners_linux_cannot_represent() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(0);
        h.set_mode(0o644);
        h.set_uid(1 << 40);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_data(&mut h, "f", &[][..]).unwrap();
        let err = Sandbox::new().unpack(&b.into_inner().unwrap()).unwrap_err();
        assert!(matches!(err, UnpackError::InvalidOwner { .. }), "{err:?}");
    }
}
