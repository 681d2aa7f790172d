//! Small filesystem helpers shared by the image modules: unique temp names, atomic file writes,
//! tree removal that copes with read-only directories, and per-key locks.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// The prefix of every temporary entry the store creates; nothing else starts with it, so a
/// crash's leftovers are recognisable and never mistaken for content.
pub(crate) const TMP_PREFIX: &str = ".tmp-";

/// A name no other writer in this or another process uses: `.tmp-<stem>-<pid>-<counter>`.
pub(crate) fn tmp_name(stem: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{TMP_PREFIX}{stem}-{}-{n}", std::process::id())
}

/// Writes `data` to `path` so that readers see either the old file or the whole new one:
/// a temp file in the same directory, fsync, rename, fsync of the directory.
pub(crate) fn atomic_write(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let stem = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(tmp_name(&stem));
    let result = (|| {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(data)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Flushes a directory's entries (a rename is durable only once its directory is).
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Removes a directory tree without following symlinks; a missing tree is not an error.
/// Directories without write permission (layers may have them) are made writable first, which
/// matters when not running as root.
pub(crate) fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            make_dirs_writable(path)?;
            fs::remove_dir_all(path)
        }
        Err(e) => Err(e),
    }
}

fn make_dirs_writable(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Ok(());
    }
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
    for entry in fs::read_dir(path)? {
        make_dirs_writable(&entry?.path())?;
    }
    Ok(())
}

/// Removes the temp entries a crashed writer left in `dir`.
pub(crate) fn remove_stale_temps(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                remove_tree(&path)?;
            } else {
                fs::remove_file(&path)?;
            }
        }
    }
    Ok(())
}

/// One lock per key (a digest, a layer id), created on first use and dropped when nobody holds
/// or waits for it: concurrent workers on the same key run one after the other, and the later
/// ones find the work done.
#[derive(Default)]
pub(crate) struct KeyLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds one key's lock until dropped.
pub(crate) struct KeyGuard<'a> {
    owner: &'a KeyLocks,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyLocks {
    fn entry(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(key.to_string()).or_default().clone()
    }

    /// Whether no key is locked or waited for (the map has shrunk back to empty).
    #[cfg(test)]
    pub(crate) fn is_idle(&self) -> bool {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Waits for the key's lock without blocking the async runtime.
    pub(crate) async fn lock(&self, key: &str) -> KeyGuard<'_> {
        let guard = self.entry(key).lock_owned().await;
        KeyGuard {
            owner: self,
            key: key.to_string(),
            guard: Some(guard),
        }
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self.owner.locks.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map holds it now: nobody waits, so the entry can go.
        if locks
            .get(&self.key)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            locks.remove(&self.key);
        }
    }
}

/// Per-key exclusion for blocking code (unpacking a layer, deleting it): a set of busy keys and a
/// condition variable. Unlike [`KeyLocks`] it never touches the async runtime, so it is safe to
/// use from any thread.
#[derive(Default)]
pub(crate) struct BlockingKeyLocks {
    busy: Mutex<HashSet<String>>,
    freed: Condvar,
}

/// Holds one key of a [`BlockingKeyLocks`] until dropped.
pub(crate) struct BlockingKeyGuard<'a> {
    owner: &'a BlockingKeyLocks,
    key: String,
}

impl BlockingKeyLocks {
    /// Blocks until nobody holds `key`, then holds it.
    pub(crate) fn lock(&self, key: &str) -> BlockingKeyGuard<'_> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        while busy.contains(key) {
            busy = self.freed.wait(busy).unwrap_or_else(|p| p.into_inner());
        }
        busy.insert(key.to_string());
        BlockingKeyGuard {
            owner: self,
            key: key.to_string(),
        }
    }
}

impl Drop for BlockingKeyGuard<'_> {
    fn drop(&mut self) {
        let mut busy = self.owner.busy.lock().unwrap_or_else(|p| p.into_inner());
        busy.remove(&self.key);
        self.owner.freed.notify_all();
    }
}
