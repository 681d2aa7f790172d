//! Resolution of a container's `user` field against the image's own `/etc/passwd` and `/etc/group`.
//!
//! The accepted forms follow Docker: `""`, `name`, `uid`, `name:group`, `uid:gid`, `name:gid` and
//! `uid:group`. Lookups always read the files inside the container rootfs, never the host's, and
//! the rootfs is treated as hostile: files are opened with `openat2(RESOLVE_IN_ROOT)` so symlinks
//! (including absolute ones and `..` chains) resolve relative to the rootfs, only regular files are
//! read, and reads are bounded.
//!
//! Ids are limited to `0..=2147483647` because runtimes and kernels interpret ids as signed 32-bit
//! values in places; a larger id can wrap to root (CVE-2024-40635). Supplementary groups listed in
//! `/etc/group` are always returned, including when the group is given explicitly, because
//! dropping them lets a process bypass group-based deny permissions (CVE-2023-25173).

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};

/// Largest `/etc/passwd` or `/etc/group` (or any file read via [`read_in_root`] by default) that is
/// accepted; real files are a few KiB, so anything bigger is treated as an attack on agent memory.
pub const MAX_FILE_SIZE: u64 = 4 * 1024 * 1024;

/// Largest uid or gid accepted, `i32::MAX`; anything above can be reinterpreted as a negative id
/// and end up as root.
pub const MAX_ID: u32 = i32::MAX as u32;

/// Path of the account database inside the rootfs.
const PASSWD_PATH: &str = "/etc/passwd";
/// Path of the group database inside the rootfs.
const GROUP_PATH: &str = "/etc/group";

/// How many times `openat2` is retried on `EAGAIN`/`EINTR`; the kernel returns `EAGAIN` for
/// `RESOLVE_IN_ROOT` when a concurrent rename could have made `..` resolution unsafe, and asks the
/// caller to retry.
const OPENAT2_ATTEMPTS: usize = 8;

/// Identity a container process should run with, as resolved from its `user` field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    /// Numeric user id.
    pub uid: u32,
    /// Numeric primary group id.
    pub gid: u32,
    /// Supplementary group ids from `/etc/group`, sorted, deduplicated, without `gid`.
    pub additional_gids: Vec<u32>,
    /// Home directory from `/etc/passwd`, or a default when the user has no entry.
    pub home: String,
}

/// Errors from resolving a user or reading a file inside a rootfs.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The user string has more than one `:`.
    #[error("invalid user specification {spec:?}: expected user or user:group")]
    InvalidSpec {
        /// The whole user string as given.
        spec: String,
    },
    /// A numeric uid or gid in the user string is negative, signed or out of range.
    #[error("invalid {field} {value:?}: must be an integer between 0 and 2147483647")]
    InvalidId {
        /// `"uid"` or `"gid"`.
        field: &'static str,
        /// The offending part of the user string.
        value: String,
    },
    /// A matching passwd or group entry carries an id that is negative or out of range.
    #[error(
        "invalid {field} {value:?} for {name} in {file} file: must be an integer between 0 and 2147483647"
    )]
    InvalidEntryId {
        /// `"passwd"` or `"group"`.
        file: &'static str,
        /// Name of the entry.
        name: String,
        /// `"uid"` or `"gid"`.
        field: &'static str,
        /// The id as written in the file.
        value: String,
    },
    /// A user given by name has no entry in the image's passwd file (or the file is missing).
    #[error("unable to find user {user}: no matching entries in passwd file")]
    UserNotFound {
        /// The user name as given.
        user: String,
    },
    /// A group given by name has no entry in the image's group file (or the file is missing).
    #[error("unable to find group {group}: no matching entries in group file")]
    GroupNotFound {
        /// The group name as given.
        group: String,
    },
    /// The rootfs directory itself could not be opened.
    #[error("failed to open rootfs {rootfs}: {source}")]
    OpenRootfs {
        /// Host path of the rootfs.
        rootfs: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// A file inside the rootfs could not be opened (missing, symlink loop, permission, ...).
    #[error("failed to open {path} inside rootfs {rootfs}: {source}")]
    Open {
        /// Host path of the rootfs.
        rootfs: PathBuf,
        /// Path relative to the rootfs.
        path: PathBuf,
        /// Underlying error; `NotFound` when the file does not exist.
        #[source]
        source: io::Error,
    },
    /// The path inside the rootfs is a directory, FIFO, socket or device.
    #[error("{path} inside rootfs {rootfs} is not a regular file")]
    NotRegularFile {
        /// Host path of the rootfs.
        rootfs: PathBuf,
        /// Path relative to the rootfs.
        path: PathBuf,
    },
    /// The file exceeds the read limit.
    #[error("{path} inside rootfs {rootfs} is larger than {limit} bytes")]
    TooLarge {
        /// Host path of the rootfs.
        rootfs: PathBuf,
        /// Path relative to the rootfs.
        path: PathBuf,
        /// The limit that was exceeded.
        limit: u64,
    },
    /// Reading an opened file failed.
    #[error("failed to read {path} inside rootfs {rootfs}: {source}")]
    Read {
        /// Host path of the rootfs.
        rootfs: PathBuf,
        /// Path relative to the rootfs.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
}

impl UserError {
    /// Whether this is an open failure because the file (or a parent directory) does not exist.
    fn is_missing_file(&self) -> bool {
        match self {
            // ENOTDIR means a path component (e.g. /etc) is not a directory, so the file cannot
            // exist either; Docker treats any unreadable passwd file as absent.
            UserError::Open { source, .. } => {
                source.kind() == io::ErrorKind::NotFound
                    || source.raw_os_error() == Some(rustix::io::Errno::NOTDIR.raw_os_error())
            }
            _ => false,
        }
    }
}

/// Resolves a container `user` field against the passwd and group files of the image at `rootfs`.
///
/// Semantics match Docker: an empty string means root; a numeric uid without a passwd entry is
/// used as is with gid 0 and home `/`; a name must exist in `/etc/passwd`; a group name must
/// exist in `/etc/group` while a numeric gid need not. Supplementary groups are every group that
/// lists the user's name as a member, whether or not the group was given explicitly. Missing
/// passwd or group files are fine for numeric ids and an error for names.
pub fn resolve(rootfs: &Path, user: &str) -> Result<ResolvedUser, UserError> {
    let (user_part, group_part) = split_spec(user)?;
    // Validate the numbers before touching the filesystem so a wrapping id is refused even when
    // the image has no passwd file.
    let user_spec = IdSpec::parse(user_part, "uid")?;
    let group_spec = match group_part {
        Some(g) => Some(IdSpec::parse(g, "gid")?),
        None => None,
    };

    let root = open_rootfs(rootfs)?;
    let passwd = read_optional(root.as_fd(), rootfs, PASSWD_PATH)?;
    let groups = read_optional(root.as_fd(), rootfs, GROUP_PATH)?;
    let passwd = passwd.as_deref().map(parse_passwd).unwrap_or_default();
    let groups = groups.as_deref().map(parse_group).unwrap_or_default();

    let (uid, default_gid, home, name) = match &user_spec {
        // Docker resolves an empty user as uid 0 so root's passwd entry still supplies home,
        // primary group and supplementary groups.
        None => match find_user(&passwd, None, 0) {
            Some(e) => (0, e.gid(), e.home_or_default(), Some(e.name)),
            None => (0, Ok(0), "/root".to_owned(), None),
        },
        Some(IdSpec::Name(n)) => match find_user(&passwd, Some(n), u32::MAX) {
            Some(e) => (e.uid()?, e.gid(), e.home_or_default(), Some(e.name)),
            None => return Err(UserError::UserNotFound { user: n.clone() }),
        },
        Some(IdSpec::Id(id)) => match find_user(&passwd, Some(user_part), *id) {
            Some(e) => (e.uid()?, e.gid(), e.home_or_default(), Some(e.name)),
            None => (*id, Ok(0), "/".to_owned(), None),
        },
    };

    let gid = match &group_spec {
        None | Some(None) => default_gid?,
        Some(Some(IdSpec::Name(n))) => match find_group(&groups, n, u32::MAX) {
            Some(g) => g.gid()?,
            None => return Err(UserError::GroupNotFound { group: n.clone() }),
        },
        Some(Some(IdSpec::Id(id))) => match group_part.and_then(|g| find_group(&groups, g, *id)) {
            Some(g) => g.gid()?,
            None => *id,
        },
    };

    let mut additional_gids = Vec::new();
    if let Some(name) = name.as_deref() {
        for g in groups
            .iter()
            .filter(|g| g.members.iter().any(|m| *m == name))
        {
            let sgid = g.gid()?;
            if sgid != gid {
                additional_gids.push(sgid);
            }
        }
    }
    additional_gids.sort_unstable();
    additional_gids.dedup();

    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
        home,
    })
}

/// Opens the regular file `path` read-only inside `rootfs`, resolving every path component
/// (including symlink targets, absolute or `..`) as if `rootfs` were `/`.
///
/// This is the safe way to read anything from an untrusted image or container filesystem:
/// `openat2` with `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS` makes the kernel confine resolution
/// to the rootfs atomically, so there is no check-then-open race with a container rewriting its
/// own files. `path` may be absolute or relative; both are taken relative to `rootfs`. FIFOs,
/// sockets, devices and directories are refused with [`UserError::NotRegularFile`] (FIFOs are
/// opened non-blocking, so this never hangs). The returned file is unbounded: use
/// [`read_in_root`] or `Read::take` to limit how much is read. A missing file is reported as
/// [`UserError::Open`] with an `io::ErrorKind::NotFound` source.
pub fn open_in_root(rootfs: &Path, path: &Path) -> Result<File, UserError> {
    let root = open_rootfs(rootfs)?;
    open_in_root_fd(root.as_fd(), rootfs, path)
}

/// Reads the whole regular file `path` inside `rootfs`, refusing files larger than `limit` bytes.
///
/// Opens the file exactly like [`open_in_root`]; the limit is checked both against the file size
/// and while reading, since pseudo-files report size 0 and a file can grow after `fstat`.
pub fn read_in_root(rootfs: &Path, path: &Path, limit: u64) -> Result<Vec<u8>, UserError> {
    let root = open_rootfs(rootfs)?;
    read_bounded(root.as_fd(), rootfs, path, limit)
}

/// Opens the rootfs directory as an `O_PATH` handle to anchor `openat2` resolution.
fn open_rootfs(rootfs: &Path) -> Result<OwnedFd, UserError> {
    // The rootfs path itself is chosen by the agent, not the image, so following symlinks in it
    // is fine; everything below it is resolved by the kernel under RESOLVE_IN_ROOT.
    rustix::fs::open(
        rootfs,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| UserError::OpenRootfs {
        rootfs: rootfs.to_owned(),
        source: e.into(),
    })
}

/// `openat2` confined to `root`, retried on the transient errors the kernel documents.
fn openat2_in_root(root: BorrowedFd<'_>, path: &Path, flags: OFlags) -> io::Result<OwnedFd> {
    let resolve = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
    let mut attempt = 0;
    loop {
        match rustix::fs::openat2(root, path, flags, Mode::empty(), resolve) {
            Err(e)
                if (e == rustix::io::Errno::AGAIN || e == rustix::io::Errno::INTR)
                    && attempt + 1 < OPENAT2_ATTEMPTS =>
            {
                attempt += 1;
            }
            other => return other.map_err(Into::into),
        }
    }
}

/// Implementation of [`open_in_root`] on an already opened rootfs handle.
fn open_in_root_fd(root: BorrowedFd<'_>, rootfs: &Path, path: &Path) -> Result<File, UserError> {
    let open_err = |source: io::Error| UserError::Open {
        rootfs: rootfs.to_owned(),
        path: path.to_owned(),
        source,
    };
    let not_regular = || UserError::NotRegularFile {
        rootfs: rootfs.to_owned(),
        path: path.to_owned(),
    };
    let stat = |fd: BorrowedFd<'_>| rustix::fs::fstat(fd).map_err(|e| open_err(e.into()));
    let is_regular =
        |st: &rustix::fs::Stat| FileType::from_raw_mode(st.st_mode) == FileType::RegularFile;

    // Probe with O_PATH first: opening a device node for reading can have side effects (tape
    // rewind, terminal acquisition), and O_PATH opens nothing.
    let probe = openat2_in_root(root, path, OFlags::PATH | OFlags::CLOEXEC).map_err(open_err)?;
    let probed = stat(probe.as_fd())?;
    if !is_regular(&probed) {
        return Err(not_regular());
    }

    // O_NONBLOCK so a FIFO swapped in after the probe cannot block the open or the reads;
    // O_NOCTTY so a swapped-in terminal never becomes our controlling tty.
    let fd = openat2_in_root(
        root,
        path,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY,
    )
    .map_err(open_err)?;
    // Re-check the handle we actually read from; the container may have replaced the file.
    let opened = stat(fd.as_fd())?;
    if !is_regular(&opened) || opened.st_dev != probed.st_dev || opened.st_ino != probed.st_ino {
        return Err(not_regular());
    }
    Ok(File::from(fd))
}

/// Opens `path` inside the rootfs and reads at most `limit` bytes of it.
fn read_bounded(
    root: BorrowedFd<'_>,
    rootfs: &Path,
    path: &Path,
    limit: u64,
) -> Result<Vec<u8>, UserError> {
    let file = open_in_root_fd(root, rootfs, path)?;
    let too_large = || UserError::TooLarge {
        rootfs: rootfs.to_owned(),
        path: path.to_owned(),
        limit,
    };
    let read_err = |source: io::Error| UserError::Read {
        rootfs: rootfs.to_owned(),
        path: path.to_owned(),
        source,
    };

    let size = file.metadata().map_err(read_err)?.len();
    if size > limit {
        return Err(too_large());
    }
    let mut buf = Vec::new();
    // Read one byte past the limit to tell "exactly at the limit" from "over it".
    file.take(limit.saturating_add(1))
        .read_to_end(&mut buf)
        .map_err(read_err)?;
    if buf.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(buf)
}

/// Reads a passwd/group file, mapping "does not exist" to `None`.
fn read_optional(
    root: BorrowedFd<'_>,
    rootfs: &Path,
    path: &str,
) -> Result<Option<Vec<u8>>, UserError> {
    match read_bounded(root, rootfs, Path::new(path), MAX_FILE_SIZE) {
        Ok(data) => Ok(Some(data)),
        Err(e) if e.is_missing_file() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Splits `user[:group]`; an empty part means "not given", as in Docker.
fn split_spec(spec: &str) -> Result<(&str, Option<&str>), UserError> {
    let mut parts = spec.splitn(3, ':');
    let user = parts.next().unwrap_or_default();
    let group = parts.next();
    if parts.next().is_some() {
        return Err(UserError::InvalidSpec {
            spec: spec.to_owned(),
        });
    }
    Ok((user, group))
}

/// One half of the user string.
#[derive(Debug)]
enum IdSpec {
    /// Given by name; must exist in the corresponding file.
    Name(String),
    /// Given numerically; need not exist in the corresponding file.
    Id(u32),
}

impl IdSpec {
    /// Parses one half of the user string; `Ok(None)` when it is empty.
    fn parse(value: &str, field: &'static str) -> Result<Option<IdSpec>, UserError> {
        if value.is_empty() {
            return Ok(None);
        }
        match classify_id(value) {
            None => Ok(Some(IdSpec::Name(value.to_owned()))),
            Some(Some(id)) => Ok(Some(IdSpec::Id(id))),
            Some(None) => Err(UserError::InvalidId {
                field,
                value: value.to_owned(),
            }),
        }
    }
}

/// Classifies a string as an id: `None` if it is not numeric at all (a name, or a malformed file
/// field), `Some(None)` if it looks numeric but is signed or above [`MAX_ID`], `Some(Some(id))`
/// if it is a valid id.
fn classify_id(s: &str) -> Option<Option<u32>> {
    let (signed, digits) = match s.strip_prefix(['-', '+']) {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // A sign is refused outright: libc's strtoul turns "-1" into 4294967295, which then wraps.
    if signed {
        return Some(None);
    }
    // u64 parsing fails only for absurdly long strings, which are out of range anyway.
    Some(
        digits
            .parse::<u64>()
            .ok()
            .filter(|&n| n <= u64::from(MAX_ID))
            .and_then(|n| u32::try_from(n).ok()),
    )
}

/// A numeric field of a passwd/group line: valid, or numeric but out of range (kept so a lookup
/// that hits it fails loudly instead of silently ignoring the entry).
#[derive(Debug, Clone)]
enum FileId {
    /// In `0..=MAX_ID`.
    Valid(u32),
    /// Signed or above `MAX_ID`; holds the text as written.
    OutOfRange(String),
}

impl FileId {
    /// Parses a field; `None` makes the whole line malformed.
    fn parse(s: &str) -> Option<FileId> {
        match classify_id(s)? {
            Some(id) => Some(FileId::Valid(id)),
            None => Some(FileId::OutOfRange(s.to_owned())),
        }
    }

    /// The id if valid.
    fn valid(&self) -> Option<u32> {
        match self {
            FileId::Valid(id) => Some(*id),
            FileId::OutOfRange(_) => None,
        }
    }

    /// The id, or an error naming the entry it came from.
    fn require(
        &self,
        file: &'static str,
        name: &str,
        field: &'static str,
    ) -> Result<u32, UserError> {
        match self {
            FileId::Valid(id) => Ok(*id),
            FileId::OutOfRange(value) => Err(UserError::InvalidEntryId {
                file,
                name: name.to_owned(),
                field,
                value: value.clone(),
            }),
        }
    }
}

/// One usable `/etc/passwd` line.
#[derive(Debug, Clone)]
struct PasswdEntry {
    /// Login name.
    name: String,
    /// User id.
    uid: FileId,
    /// Primary group id.
    gid: FileId,
    /// Home directory, possibly empty.
    home: String,
}

impl PasswdEntry {
    /// The entry's uid, refusing an out-of-range value.
    fn uid(&self) -> Result<u32, UserError> {
        self.uid.require("passwd", &self.name, "uid")
    }

    /// The entry's gid; deferred as a `Result` because an explicit group makes it irrelevant.
    fn gid(&self) -> Result<u32, UserError> {
        self.gid.require("passwd", &self.name, "gid")
    }

    /// The home directory, or `/` when the field is empty.
    fn home_or_default(&self) -> String {
        if self.home.is_empty() {
            "/".to_owned()
        } else {
            self.home.clone()
        }
    }
}

/// One usable `/etc/group` line.
#[derive(Debug, Clone)]
struct GroupEntry {
    /// Group name.
    name: String,
    /// Group id.
    gid: FileId,
    /// Member login names.
    members: Vec<String>,
}

impl GroupEntry {
    /// The group's gid, refusing an out-of-range value.
    fn gid(&self) -> Result<u32, UserError> {
        self.gid.require("group", &self.name, "gid")
    }
}

/// Yields the `:`-separated fields of every line that is not blank, a comment, a NIS `+`/`-`
/// include, or invalid UTF-8; lenient like libc so one bad line does not break the whole file.
fn records(data: &[u8]) -> impl Iterator<Item = Vec<&str>> {
    data.split(|&b| b == b'\n').filter_map(|raw| {
        let line = std::str::from_utf8(raw).ok()?;
        // Tolerate files edited on Windows and leading whitespace, as glibc's nss_files does.
        let line = line.strip_suffix('\r').unwrap_or(line).trim_start();
        if line.is_empty() || line.starts_with(['#', '+', '-']) {
            return None;
        }
        let fields: Vec<&str> = line.split(':').collect();
        if fields[0].is_empty() {
            return None;
        }
        Some(fields)
    })
}

/// Parses `/etc/passwd` (`name:password:uid:gid:gecos:home:shell`), skipping malformed lines.
fn parse_passwd(data: &[u8]) -> Vec<PasswdEntry> {
    records(data)
        .filter_map(|f| {
            // uid and gid are required; gecos, home and shell are optional so truncated lines
            // from minimal images still work.
            if f.len() < 4 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_owned(),
                uid: FileId::parse(f[2])?,
                gid: FileId::parse(f[3])?,
                home: f.get(5).copied().unwrap_or_default().to_owned(),
            })
        })
        .collect()
}

/// Parses `/etc/group` (`name:password:gid:member,member`), skipping malformed lines.
fn parse_group(data: &[u8]) -> Vec<GroupEntry> {
    records(data)
        .filter_map(|f| {
            if f.len() < 3 {
                return None;
            }
            let members = f
                .get(3)
                .copied()
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map(str::to_owned)
                .collect();
            Some(GroupEntry {
                name: f[0].to_owned(),
                gid: FileId::parse(f[2])?,
                members,
            })
        })
        .collect()
}

/// First passwd entry whose name equals `name` or whose uid equals `uid` (file order wins, as in
/// runc). Pass `u32::MAX` as `uid` for a name-only lookup; it can never be a valid id.
fn find_user(entries: &[PasswdEntry], name: Option<&str>, uid: u32) -> Option<PasswdEntry> {
    entries
        .iter()
        .find(|e| Some(e.name.as_str()) == name || e.uid.valid() == Some(uid))
        .cloned()
}

/// First group entry whose name equals `name` or whose gid equals `gid` (file order wins).
fn find_group<'a>(entries: &'a [GroupEntry], name: &str, gid: u32) -> Option<&'a GroupEntry> {
    entries
        .iter()
        .find(|g| g.name == name || g.gid.valid() == Some(gid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::sync::mpsc;
    use std::time::Duration;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
alice:x:1000:1000:Alice:/home/alice:/bin/bash
bob:x:1001:1001::/home/bob:/bin/sh
";

    const GROUP: &str = "\
root:x:0:root
daemon:x:1:
alice:x:1000:alice
bob:x:1001:
staff:x:50:alice,bob
wheel:x:10:root,alice
audio:x:29:alice
";

    /// Builds a rootfs with the given passwd/group contents (`None` = file absent).
    fn rootfs(passwd: Option<&str>, group: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("etc")).unwrap();
        if let Some(p) = passwd {
            fs::write(dir.path().join("etc/passwd"), p).unwrap();
        }
        if let Some(g) = group {
            fs::write(dir.path().join("etc/group"), g).unwrap();
        }
        dir
    }

    fn user(uid: u32, gid: u32, extra: &[u32], home: &str) -> ResolvedUser {
        ResolvedUser {
            uid,
            gid,
            additional_gids: extra.to_vec(),
            home: home.to_owned(),
        }
    }

    #[test]
    fn every_form_of_the_user_string() {
        let dir = rootfs(Some(PASSWD), Some(GROUP));
        let r = |s: &str| resolve(dir.path(), s).unwrap();
        assert_eq!(r(""), user(0, 0, &[10], "/root"));
        assert_eq!(r("root"), user(0, 0, &[10], "/root"));
        assert_eq!(r("alice"), user(1000, 1000, &[10, 29, 50], "/home/alice"));
        assert_eq!(r("1000"), user(1000, 1000, &[10, 29, 50], "/home/alice"));
        assert_eq!(
            r("alice:staff"),
            user(1000, 50, &[10, 29, 1000], "/home/alice")
        );
        assert_eq!(r("1000:50"), user(1000, 50, &[10, 29, 1000], "/home/alice"));
        assert_eq!(
            r("alice:4242"),
            user(1000, 4242, &[10, 29, 50, 1000], "/home/alice")
        );
        assert_eq!(r("1001:staff"), user(1001, 50, &[], "/home/bob"));
        assert_eq!(r("bob:"), user(1001, 1001, &[50], "/home/bob"));
        assert_eq!(r(":50"), user(0, 50, &[0, 10], "/root"));
        assert_eq!(r("2147483647"), user(2147483647, 0, &[], "/"));
        assert_eq!(r("5000:2147483647"), user(5000, 2147483647, &[], "/"));
    }

    #[test]
    fn supplementary_groups_are_applied_deduped_and_exclude_primary() {
        let group = "\
alice:x:1000:alice
dup-a:x:300:alice
dup-b:x:300:carol,alice
other:x:200: alice , bob
nobody:x:400:bob
";
        let dir = rootfs(Some(PASSWD), Some(group));
        let r = resolve(dir.path(), "alice").unwrap();
        assert_eq!(r.additional_gids, vec![200, 300]);
        // With an explicit group the supplementary groups are still applied (CVE-2023-25173).
        let r = resolve(dir.path(), "alice:300").unwrap();
        assert_eq!(r.gid, 300);
        assert_eq!(r.additional_gids, vec![200, 1000]);
    }

    #[test]
    fn unknown_user_and_group_give_docker_messages() {
        let dir = rootfs(Some(PASSWD), Some(GROUP));
        let err = resolve(dir.path(), "nope").unwrap_err();
        assert!(matches!(err, UserError::UserNotFound { .. }));
        assert_eq!(
            err.to_string(),
            "unable to find user nope: no matching entries in passwd file"
        );
        let err = resolve(dir.path(), "alice:nogroup").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unable to find group nogroup: no matching entries in group file"
        );
        let err = resolve(dir.path(), "1000:nogroup").unwrap_err();
        assert!(matches!(err, UserError::GroupNotFound { .. }));
    }

    #[test]
    fn numeric_ids_work_without_passwd_or_group() {
        let dir = rootfs(None, None);
        assert_eq!(
            resolve(dir.path(), "1234").unwrap(),
            user(1234, 0, &[], "/")
        );
        assert_eq!(
            resolve(dir.path(), "1234:99").unwrap(),
            user(1234, 99, &[], "/")
        );
        assert_eq!(resolve(dir.path(), "").unwrap(), user(0, 0, &[], "/root"));
        assert!(matches!(
            resolve(dir.path(), "alice"),
            Err(UserError::UserNotFound { .. })
        ));
        assert!(matches!(
            resolve(dir.path(), "1234:staff"),
            Err(UserError::GroupNotFound { .. })
        ));

        // No /etc at all behaves the same.
        let bare = tempfile::tempdir().unwrap();
        assert_eq!(resolve(bare.path(), "7").unwrap(), user(7, 0, &[], "/"));
        // /etc being a regular file means there is no passwd file either.
        let odd = tempfile::tempdir().unwrap();
        fs::write(odd.path().join("etc"), "not a dir").unwrap();
        assert_eq!(resolve(odd.path(), "7:8").unwrap(), user(7, 8, &[], "/"));
    }

    #[test]
    fn numeric_uid_missing_from_existing_passwd_is_allowed() {
        let dir = rootfs(Some(PASSWD), Some(GROUP));
        assert_eq!(
            resolve(dir.path(), "4242").unwrap(),
            user(4242, 0, &[], "/")
        );
    }

    #[test]
    fn out_of_range_ids_are_refused() {
        let dir = rootfs(None, None);
        for (spec, field, value) in [
            ("4294967296", "uid", "4294967296"),
            ("2147483648", "uid", "2147483648"),
            ("4294967295", "uid", "4294967295"),
            ("99999999999999999999999", "uid", "99999999999999999999999"),
            ("0:4294967296", "gid", "4294967296"),
            ("1000:2147483648", "gid", "2147483648"),
        ] {
            let err = resolve(dir.path(), spec).unwrap_err();
            match &err {
                UserError::InvalidId { field: f, value: v } => {
                    assert_eq!((*f, v.as_str()), (field, value), "{spec}");
                }
                other => panic!("{spec}: unexpected {other:?}"),
            }
            assert!(err.to_string().contains(value), "{err}");
        }
    }

    #[test]
    fn negative_and_signed_ids_are_refused() {
        let dir = rootfs(Some(PASSWD), Some(GROUP));
        for (spec, field) in [
            ("-1", "uid"),
            ("+5", "uid"),
            ("1000:-1", "gid"),
            ("alice:-0", "gid"),
        ] {
            let err = resolve(dir.path(), spec).unwrap_err();
            assert!(
                matches!(err, UserError::InvalidId { field: f, .. } if f == field),
                "{spec}: {err:?}"
            );
        }
        assert_eq!(
            resolve(dir.path(), "-1").unwrap_err().to_string(),
            "invalid uid \"-1\": must be an integer between 0 and 2147483647"
        );
    }

    #[test]
    fn out_of_range_ids_in_files_are_refused_when_used() {
        let passwd = "evil:x:4294967296:0::/:/bin/sh\nwrap:x:-1:0::/:/bin/sh\nok:x:5:2147483648::/:/bin/sh\n";
        let group = "big:x:4294967295:ok\n";
        let dir = rootfs(Some(passwd), Some(group));
        let err = resolve(dir.path(), "evil").unwrap_err();
        assert!(
            matches!(err, UserError::InvalidEntryId { field: "uid", .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("4294967296"));
        assert!(matches!(
            resolve(dir.path(), "wrap"),
            Err(UserError::InvalidEntryId { .. })
        ));
        // The bad passwd gid only matters when no explicit group overrides it, but the bad
        // supplementary group always does.
        assert!(matches!(
            resolve(dir.path(), "ok"),
            Err(UserError::InvalidEntryId { field: "gid", .. })
        ));
        assert!(matches!(
            resolve(dir.path(), "ok:7"),
            Err(UserError::InvalidEntryId { file: "group", .. })
        ));
        // A numeric lookup never matches the wrapped entry.
        assert_eq!(resolve(dir.path(), "0").unwrap(), user(0, 0, &[], "/"));
    }

    #[test]
    fn invalid_spec_is_refused() {
        let dir = rootfs(Some(PASSWD), Some(GROUP));
        let err = resolve(dir.path(), "a:b:c").unwrap_err();
        assert!(matches!(err, UserError::InvalidSpec { .. }), "{err:?}");
    }

    #[test]
    fn lenient_parsing_skips_bad_lines() {
        let passwd = "\
# comment
+alice:x:0:0::/nis:/bin/sh
-bob::::::

garbage line without colons
short:x:1
badnum:x:abc:0::/:/bin/sh
   alice:x:1000:1000::/home/alice:/bin/sh\r
";
        let mut group = b"# groups\n+:::\nstaff:x:50:alice\n".to_vec();
        group.extend_from_slice(b"bin\xff:x:60:alice\nnonnum:x:zz:alice\n");
        let dir = rootfs(Some(passwd), None);
        fs::write(dir.path().join("etc/group"), group).unwrap();
        assert_eq!(
            resolve(dir.path(), "alice").unwrap(),
            user(1000, 1000, &[50], "/home/alice")
        );
        assert!(matches!(
            resolve(dir.path(), "badnum"),
            Err(UserError::UserNotFound { .. })
        ));
        assert!(matches!(
            resolve(dir.path(), "+alice"),
            Err(UserError::UserNotFound { .. })
        ));
    }

    #[test]
    fn absolute_symlink_resolves_inside_rootfs() {
        // The "host" file lives in a different tempdir with a distinct uid, so resolving to it
        // would make this test fail.
        let host = tempfile::tempdir().unwrap();
        let host_passwd = host.path().join("passwd");
        fs::write(&host_passwd, "alice:x:4242:4242::/host:/bin/sh\n").unwrap();

        let dir = rootfs(None, None);
        // Same absolute path, but inside the rootfs.
        let inner = dir.path().join(host_passwd.strip_prefix("/").unwrap());
        fs::create_dir_all(inner.parent().unwrap()).unwrap();
        fs::write(&inner, "alice:x:1000:1000::/inside:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink(&host_passwd, dir.path().join("etc/passwd")).unwrap();

        let r = resolve(dir.path(), "alice").unwrap();
        assert_eq!((r.uid, r.home.as_str()), (1000, "/inside"));

        // Without the in-rootfs copy the lookup must fail rather than read the host file.
        fs::remove_file(&inner).unwrap();
        assert!(matches!(
            resolve(dir.path(), "alice"),
            Err(UserError::UserNotFound { .. })
        ));
    }

    #[test]
    fn relative_dotdot_symlink_stays_inside() {
        let outer = tempfile::tempdir().unwrap();
        fs::create_dir_all(outer.path().join("secret")).unwrap();
        fs::write(
            outer.path().join("secret/passwd"),
            "alice:x:6666:6666::/x:/bin/sh\n",
        )
        .unwrap();
        let root = outer.path().join("r/rootfs");
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::create_dir_all(root.join("secret")).unwrap();
        fs::write(
            root.join("secret/passwd"),
            "alice:x:1000:1000::/in:/bin/sh\n",
        )
        .unwrap();
        // On the host this points at <outer>/secret/passwd.
        std::os::unix::fs::symlink("../../../secret/passwd", root.join("etc/passwd")).unwrap();
        assert!(root.join("etc/passwd").exists());
        assert_eq!(resolve(&root, "alice").unwrap().uid, 1000);
    }

    #[test]
    fn etc_symlink_to_parent_stays_inside() {
        let outer = tempfile::tempdir().unwrap();
        fs::write(
            outer.path().join("passwd"),
            "alice:x:6666:6666::/x:/bin/sh\n",
        )
        .unwrap();
        let root = outer.path().join("a/rootfs");
        fs::create_dir_all(&root).unwrap();
        fs::write(root.join("passwd"), "alice:x:1111:1111::/in:/bin/sh\n").unwrap();
        // On the host, <root>/etc/passwd is <outer>/passwd.
        std::os::unix::fs::symlink("../..", root.join("etc")).unwrap();
        assert_eq!(
            fs::read_to_string(root.join("etc/passwd")).unwrap(),
            "alice:x:6666:6666::/x:/bin/sh\n"
        );
        assert_eq!(resolve(&root, "alice").unwrap().uid, 1111);
    }

    #[test]
    fn fifo_passwd_is_refused_without_hanging() {
        let dir = rootfs(None, Some(GROUP));
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.path().join("etc/passwd"),
            FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let path = dir.path().to_owned();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(resolve(&path, "1000"));
        });
        let res = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("resolve hung on a fifo");
        assert!(
            matches!(res, Err(UserError::NotRegularFile { .. })),
            "{res:?}"
        );
    }

    #[test]
    fn directory_passwd_is_refused() {
        let dir = rootfs(None, None);
        fs::create_dir(dir.path().join("etc/passwd")).unwrap();
        assert!(matches!(
            resolve(dir.path(), "0"),
            Err(UserError::NotRegularFile { .. })
        ));
    }

    #[test]
    fn oversized_file_is_refused() {
        let dir = rootfs(Some(PASSWD), None);
        let f = fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join("etc/passwd"))
            .unwrap();
        f.set_len(MAX_FILE_SIZE + 1).unwrap();
        let err = resolve(dir.path(), "alice").unwrap_err();
        assert!(matches!(err, UserError::TooLarge { .. }), "{err:?}");

        // The streaming bound catches it too, independently of fstat.
        fs::write(dir.path().join("big"), vec![b'a'; 101]).unwrap();
        assert!(matches!(
            read_in_root(dir.path(), Path::new("/big"), 100),
            Err(UserError::TooLarge { limit: 100, .. })
        ));
        assert_eq!(
            read_in_root(dir.path(), Path::new("big"), 101)
                .unwrap()
                .len(),
            101
        );
    }

    #[test]
    fn open_in_root_reads_and_reports_missing() {
        let dir = rootfs(Some(PASSWD), None);
        let mut s = String::new();
        open_in_root(dir.path(), Path::new("/etc/passwd"))
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, PASSWD);
        match open_in_root(dir.path(), Path::new("/etc/missing")) {
            Err(UserError::Open { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::NotFound)
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            open_in_root(&dir.path().join("nope"), Path::new("/etc/passwd")),
            Err(UserError::OpenRootfs { .. })
        ));
    }
}
