//! Persistent network namespaces, one per container, kept alive by a bind mount of the namespace
//! file at a path (`<run dir>/netns/<container id>`) so that CNI plugins and the runtime can join
//! them by path, and so they outlive the thread that made them and the agent itself.
//!
//! Namespace syscalls run on a fresh `std::thread` that is thrown away afterwards, never on a
//! tokio worker: `unshare` and `setns` change the calling thread for the rest of its life.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustix::io::Errno;
use rustix::mount::{UnmountFlags, mount_bind, unmount};
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
use tokio::sync::oneshot;

/// `f_type` of a file on the kernel's namespace filesystem (`NSFS_MAGIC`).
const NSFS_MAGIC: u64 = 0x6e73_6673;

/// What can go wrong with a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// A network namespace is already mounted at the path.
    #[error("network namespace {path} already exists")]
    Exists {
        /// The path.
        path: PathBuf,
    },
    /// The mount point file or its directory could not be created.
    #[error("cannot create {path}")]
    Create {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The kernel refused a new network namespace.
    #[error("cannot create a network namespace for {path}")]
    Unshare {
        /// Where it was to be mounted.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The new namespace could not be bind-mounted.
    #[error("cannot bind-mount a network namespace at {path}")]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The namespace could not be unmounted.
    #[error("cannot unmount network namespace {path}")]
    Unmount {
        /// The mount point.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The mount point file could not be removed.
    #[error("cannot remove {path}")]
    Remove {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The namespace directory could not be read.
    #[error("cannot list network namespaces in {dir}")]
    List {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The namespace could not be opened or joined.
    #[error("cannot enter network namespace {path}")]
    Enter {
        /// The namespace file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No thread could be started to work in the namespace.
    #[error("cannot start a thread for network namespace {path}")]
    Thread {
        /// The namespace file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The thread working in the namespace panicked before answering.
    #[error("the thread working in network namespace {path} ended without an answer")]
    ThreadLost {
        /// The namespace file.
        path: PathBuf,
    },
}

/// Creates a new network namespace (with only a loopback device, down) and bind-mounts it at
/// `path`, creating the parent directory. Fails with [`NetnsError::Exists`] when a namespace is
/// already mounted there; a plain file left by an interrupted create is replaced.
pub async fn create(path: &Path) -> Result<(), NetnsError> {
    let owned = path.to_owned();
    on_thread(path, move || create_on_this_thread(&owned)).await?
}

/// Unmounts and removes the namespace at `path`. Succeeds when it is already gone. The namespace
/// itself lives on while a process or another mount still holds it.
pub async fn remove(path: &Path) -> Result<(), NetnsError> {
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || remove_blocking(&owned))
        .await
        .map_err(|_| NetnsError::ThreadLost {
            path: path.to_owned(),
        })?
}

/// Whether `path` is a mounted network namespace (a file on nsfs).
pub async fn exists(path: &Path) -> bool {
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || is_mounted(&owned))
        .await
        .unwrap_or(false)
}

/// Names of the entries in a namespace directory (the container ids), sorted. A missing directory
/// has none.
pub async fn list(dir: &Path) -> Result<Vec<String>, NetnsError> {
    let owned = dir.to_owned();
    tokio::task::spawn_blocking(move || list_blocking(&owned))
        .await
        .map_err(|_| NetnsError::ThreadLost {
            path: dir.to_owned(),
        })?
}

/// Runs `f` on a new thread that has joined the network namespace at `path`, and returns what it
/// returns. Sockets `f` creates belong to that namespace, and so do processes it spawns.
pub async fn run_in<T, F>(path: &Path, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let owned = path.to_owned();
    on_thread(path, move || {
        enter(&owned)?;
        Ok(f())
    })
    .await?
}

/// The blocking form of [`run_in`], for code that is not async (tests, helper threads).
pub fn run_in_blocking<T, F>(path: &Path, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let owned = path.to_owned();
    let handle = std::thread::Builder::new()
        .name("gantry-netns".into())
        .spawn(move || {
            enter(&owned)?;
            Ok(f())
        })
        .map_err(|source| NetnsError::Thread {
            path: path.to_owned(),
            source,
        })?;
    handle.join().map_err(|_| NetnsError::ThreadLost {
        path: path.to_owned(),
    })?
}

/// Runs `f` on a fresh thread that ends with it, so namespace changes die with the thread, and
/// awaits its answer without blocking the runtime.
async fn on_thread<T, F>(path: &Path, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("gantry-netns".into())
        .spawn(move || {
            // The receiver only goes away when the caller stopped waiting.
            let _ = tx.send(f());
        })
        .map_err(|source| NetnsError::Thread {
            path: path.to_owned(),
            source,
        })?;
    rx.await.map_err(|_| NetnsError::ThreadLost {
        path: path.to_owned(),
    })
}

/// Joins the network namespace at `path` with the calling thread.
fn enter(path: &Path) -> Result<(), NetnsError> {
    let enter_err = |source: io::Error| NetnsError::Enter {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(enter_err)?;
    move_into_link_name_space(
        std::os::fd::AsFd::as_fd(&file),
        Some(LinkNameSpaceType::Network),
    )
    .map_err(|e| enter_err(e.into()))
}

/// The body of [`create`]; must run on a thread that is discarded afterwards, since `unshare`
/// leaves the thread in the new namespace.
fn create_on_this_thread(path: &Path) -> Result<(), NetnsError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| NetnsError::Create {
            path: dir.to_owned(),
            source,
        })?;
    }
    if is_mounted(path) {
        return Err(NetnsError::Exists {
            path: path.to_owned(),
        });
    }
    // A file that is not a mount is what an interrupted create leaves behind.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(NetnsError::Remove {
                path: path.to_owned(),
                source,
            });
        }
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(path)
        .map_err(|source| NetnsError::Create {
            path: path.to_owned(),
            source,
        })?;
    let made = crate::sys::unshare_network()
        .map_err(|source| NetnsError::Unshare {
            path: path.to_owned(),
            source,
        })
        .and_then(|()| {
            let own = format!(
                "/proc/self/task/{}/ns/net",
                rustix::thread::gettid().as_raw_nonzero()
            );
            mount_bind(own.as_str(), path).map_err(|e| NetnsError::Mount {
                path: path.to_owned(),
                source: e.into(),
            })
        });
    if made.is_err() {
        let _ = std::fs::remove_file(path);
    }
    made
}

fn remove_blocking(path: &Path) -> Result<(), NetnsError> {
    if is_mounted(path) {
        match unmount(path, UnmountFlags::DETACH) {
            // Someone else unmounted or removed it in between.
            Ok(()) | Err(Errno::INVAL) | Err(Errno::NOENT) => {}
            Err(e) => {
                return Err(NetnsError::Unmount {
                    path: path.to_owned(),
                    source: e.into(),
                });
            }
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetnsError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}

fn is_mounted(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|st| st.f_type as u64 == NSFS_MAGIC)
}

fn list_blocking(dir: &Path) -> Result<Vec<String>, NetnsError> {
    let list_err = |source: io::Error| NetnsError::List {
        dir: dir.to_owned(),
        source,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(list_err(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(list_err)?;
        if let Ok(name) = entry.file_name().into_string() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Sends `RTM_NEWLINK` for interface 1 (loopback in every namespace) with `IFF_UP` set, and
/// reads the kernel's acknowledgement, on a netlink socket of the calling thread's namespace.
pub fn set_loopback_up() -> std::io::Result<()> {
    use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType, recv, send, socket};
    const RTM_NEWLINK: u16 = 16;
    const NLMSG_ERROR: u16 = 2;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_ACK: u16 = 4;
    const IFF_UP: u32 = 1;
    const LOOPBACK_INDEX: i32 = 1;
    // `None` is NETLINK_ROUTE.
    let fd = socket(AddressFamily::NETLINK, SocketType::RAW, None)?;
    let mut msg = Vec::with_capacity(32);
    // struct nlmsghdr: length, type, flags, sequence, port id
    msg.extend_from_slice(&32u32.to_ne_bytes());
    msg.extend_from_slice(&RTM_NEWLINK.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // struct ifinfomsg: family (AF_UNSPEC), padding, type, index, flags, change mask
    msg.extend_from_slice(&[0, 0]);
    msg.extend_from_slice(&0u16.to_ne_bytes());
    msg.extend_from_slice(&LOOPBACK_INDEX.to_ne_bytes());
    msg.extend_from_slice(&IFF_UP.to_ne_bytes());
    msg.extend_from_slice(&IFF_UP.to_ne_bytes());
    send(&fd, &msg, SendFlags::empty())?;
    let mut buf = [0u8; 1024];
    let (n, _) = recv(&fd, &mut buf[..], RecvFlags::empty())?;
    let field = |at: usize, len: usize| buf.get(at..at + len).filter(|_| at + len <= n);
    let kind = field(4, 2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let code = field(16, 4).map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    match (kind, code) {
        (Some(NLMSG_ERROR), Some(0)) => Ok(()),
        (Some(NLMSG_ERROR), Some(code)) => Err(std::io::Error::from_raw_os_error(-code)),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "unexpected rtnetlink answer",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listing_a_missing_directory_is_empty() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(list(&tmp.path().join("nope")).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn removing_what_is_not_there_succeeds() {
        let tmp = tempfile::tempdir().unwrap();
        remove(&tmp.path().join("gone")).await.unwrap();
        // A plain file (an interrupted create) is removed too.
        let file = tmp.path().join("plain");
        std::fs::write(&file, b"").unwrap();
        assert!(!exists(&file).await);
        remove(&file).await.unwrap();
        assert!(!file.exists());
    }
}
