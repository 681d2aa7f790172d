//! The content-addressed blob store: `<root>/blobs/sha256/<hex>`, each file named by the sha256
//! of its bytes.
//!
//! A blob is written to a temp file in the same directory while it is hashed, checked against
//! the expected digest and size, fsynced and renamed into place: a reader never sees a partial
//! or unverified blob. Two writers of the same digest may race harmlessly (the content is the
//! same); downloads take a per-digest lock so concurrent pulls of one blob share one download.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::fsutil::{self, KeyGuard, KeyLocks};
use super::reference::{is_sha256_hex, validate_digest};

/// What went wrong in the blob store.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// A digest that is not `sha256:<64 hex>`.
    #[error("invalid blob digest {digest:?}")]
    InvalidDigest {
        /// The digest as given.
        digest: String,
    },
    /// The store has no blob with this digest.
    #[error("blob {digest} not found")]
    NotFound {
        /// The missing digest.
        digest: String,
    },
    /// The bytes written hash to another digest.
    #[error("blob digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// The digest the writer was told to expect.
        expected: String,
        /// The digest of what arrived.
        actual: String,
    },
    /// More or fewer bytes than the descriptor's size.
    #[error("blob {digest} size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// The digest expected (or the one computed, if none was expected).
        digest: String,
        /// The size the descriptor declared.
        expected: u64,
        /// The number of bytes that arrived (so far, if too many).
        actual: u64,
    },
    /// A filesystem operation failed.
    #[error("blob store: {op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Reading the blob's source failed (a truncated stream, a network error).
    #[error("reading blob {what}: {source}")]
    Source {
        /// The blob being read (its digest, or the path in an archive).
        what: String,
        /// The underlying error.
        source: io::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BlobError + use<> {
    let path = path.to_path_buf();
    move |source| BlobError::Io { op, path, source }
}

/// The blob directory and the per-digest download locks.
pub struct BlobStore {
    dir: PathBuf,
    locks: KeyLocks,
}

/// What a finished write produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    /// `sha256:<hex>` of the content.
    pub digest: String,
    /// The content's length in bytes.
    pub size: u64,
}

impl BlobStore {
    /// Opens (creating) `<root>/blobs/sha256` and removes temp files a crash left behind.
    pub fn open(root: &Path) -> Result<BlobStore, BlobError> {
        let dir = root.join("blobs").join("sha256");
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        fsutil::remove_stale_temps(&dir).map_err(io_err("clean", &dir))?;
        Ok(BlobStore {
            dir,
            locks: KeyLocks::default(),
        })
    }

    /// The directory holding the blobs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path a blob with this digest has (whether or not it exists).
    pub fn path(&self, digest: &str) -> Result<PathBuf, BlobError> {
        validate_digest(digest).map_err(|_| BlobError::InvalidDigest {
            digest: digest.to_string(),
        })?;
        Ok(self.dir.join(&digest["sha256:".len()..]))
    }

    /// Whether the store holds the blob.
    pub fn contains(&self, digest: &str) -> bool {
        self.path(digest).is_ok_and(|p| p.is_file())
    }

    /// The blob's size, if the store holds it.
    pub fn size(&self, digest: &str) -> Result<Option<u64>, BlobError> {
        let path = self.path(digest)?;
        match fs::metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("stat", &path)(e)),
        }
    }

    /// Opens a blob for reading.
    pub fn open_blob(&self, digest: &str) -> Result<File, BlobError> {
        let path = self.path(digest)?;
        File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => BlobError::NotFound {
                digest: digest.to_string(),
            },
            _ => io_err("open", &path)(e),
        })
    }

    /// Reads a small blob (a manifest, a config) whole, refusing one larger than `limit`.
    pub fn read_small(&self, digest: &str, limit: u64) -> Result<Vec<u8>, BlobError> {
        let path = self.path(digest)?;
        let mut data = Vec::new();
        self.open_blob(digest)?
            .take(limit + 1)
            .read_to_end(&mut data)
            .map_err(io_err("read", &path))?;
        if data.len() as u64 > limit {
            return Err(BlobError::SizeMismatch {
                digest: digest.to_string(),
                expected: limit,
                actual: data.len() as u64,
            });
        }
        Ok(data)
    }

    /// Starts writing a blob; `expected` (digest and, when known, size) is checked on commit.
    pub fn writer(
        &self,
        expected_digest: Option<&str>,
        expected_size: Option<u64>,
    ) -> Result<BlobWriter, BlobError> {
        if let Some(d) = expected_digest {
            self.path(d)?;
        }
        let stem = expected_digest
            .map(|d| d["sha256:".len()..].to_string())
            .unwrap_or_else(|| "new".to_string());
        let tmp = self.dir.join(fsutil::tmp_name(&stem));
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        Ok(BlobWriter {
            dir: self.dir.clone(),
            tmp: Some(tmp),
            file: Some(file),
            hasher: Sha256::new(),
            written: 0,
            expected_digest: expected_digest.map(str::to_string),
            expected_size,
        })
    }

    /// Copies a whole stream into the store, verifying it; `what` names the source in errors.
    pub fn write_from(
        &self,
        reader: impl Read,
        what: &str,
        expected_digest: Option<&str>,
        expected_size: Option<u64>,
    ) -> Result<BlobInfo, BlobError> {
        self.write_from_with(reader, what, expected_digest, expected_size, |_| {})
    }

    /// Like [`BlobStore::write_from`], with a hook called with the digest before the blob is
    /// visible.
    pub fn write_from_with(
        &self,
        mut reader: impl Read,
        what: &str,
        expected_digest: Option<&str>,
        expected_size: Option<u64>,
        before_visible: impl FnOnce(&str),
    ) -> Result<BlobInfo, BlobError> {
        let mut writer = self.writer(expected_digest, expected_size)?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(BlobError::Source {
                        what: what.to_string(),
                        source,
                    });
                }
            };
            writer.write_chunk(&buf[..n])?;
        }
        writer.commit_with(before_visible)
    }

    /// Stores bytes already in memory (a manifest the store synthesised).
    pub fn write_bytes(&self, data: &[u8]) -> Result<BlobInfo, BlobError> {
        self.write_from(data, "in-memory blob", None, Some(data.len() as u64))
    }

    /// Deletes a blob; a missing one is not an error.
    pub fn remove(&self, digest: &str) -> Result<(), BlobError> {
        let path = self.path(digest)?;
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", &path)(e)),
            _ => Ok(()),
        }
    }

    /// Every blob digest the store holds (temp files excluded).
    pub fn list(&self) -> Result<Vec<String>, BlobError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err("list", &self.dir))? {
            let entry = entry.map_err(io_err("list", &self.dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if is_sha256_hex(&name) {
                out.push(format!("sha256:{name}"));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Serialises downloads of one digest: the holder downloads, later holders find the blob.
    pub(crate) async fn lock(&self, digest: &str) -> KeyGuard<'_> {
        self.locks.lock(digest).await
    }
}

/// A blob being written: bytes go to a temp file and into the hash; nothing is visible under the
/// blob's name until [`BlobWriter::commit`] has verified it. Dropping it uncommitted removes the
/// temp file.
pub struct BlobWriter {
    dir: PathBuf,
    tmp: Option<PathBuf>,
    file: Option<File>,
    hasher: Sha256,
    written: u64,
    expected_digest: Option<String>,
    expected_size: Option<u64>,
}

impl BlobWriter {
    /// Appends a chunk, failing as soon as the declared size is exceeded.
    pub fn write_chunk(&mut self, chunk: &[u8]) -> Result<(), BlobError> {
        self.written += chunk.len() as u64;
        if let Some(expected) = self.expected_size
            && self.written > expected
        {
            return Err(BlobError::SizeMismatch {
                digest: self.expected_digest.clone().unwrap_or_default(),
                expected,
                actual: self.written,
            });
        }
        self.hasher.update(chunk);
        let tmp = self.tmp.as_deref().unwrap_or(Path::new(""));
        match self.file.as_mut() {
            Some(file) => file.write_all(chunk).map_err(io_err("write", tmp)),
            None => Ok(()),
        }
    }

    /// The number of bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Verifies digest and size, then makes the blob visible under its digest.
    pub fn commit(self) -> Result<BlobInfo, BlobError> {
        self.commit_with(|_| {})
    }

    /// Like [`BlobWriter::commit`], calling `before_visible` with the verified digest just
    /// before the blob gets its name (to lease it against a concurrent sweep).
    pub fn commit_with(mut self, before_visible: impl FnOnce(&str)) -> Result<BlobInfo, BlobError> {
        let actual = format!("sha256:{}", hex::encode(self.hasher.clone().finalize()));
        if let Some(expected) = &self.expected_digest
            && *expected != actual
        {
            return Err(BlobError::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        if let Some(expected) = self.expected_size
            && expected != self.written
        {
            return Err(BlobError::SizeMismatch {
                digest: actual,
                expected,
                actual: self.written,
            });
        }
        let tmp = self.tmp.clone().unwrap_or_default();
        if let Some(file) = self.file.take() {
            file.sync_all().map_err(io_err("sync", &tmp))?;
        }
        before_visible(&actual);
        let dest = self.dir.join(&actual["sha256:".len()..]);
        fs::rename(&tmp, &dest).map_err(io_err("rename", &dest))?;
        self.tmp = None;
        fsutil::sync_dir(&self.dir).map_err(io_err("sync", &self.dir))?;
        Ok(BlobInfo {
            digest: actual,
            size: self.written,
        })
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_chunk(buf).map_err(io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(data: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(data)))
    }

    fn no_temps(store: &BlobStore) {
        let names: Vec<_> = fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(fsutil::TMP_PREFIX))
            .collect();
        assert!(names.is_empty(), "temp files left: {names:?}");
    }

    #[test]
    fn writes_and_reads_verified_blobs() {
        let tmp = tempfile::tempdir().unwrap();
        let store = BlobStore::open(tmp.path()).unwrap();
        let data = b"hello layers".repeat(100_000);
        let digest = sha(&data);
        let info = store
            .write_from(&data[..], "test", Some(&digest), Some(data.len() as u64))
            .unwrap();
        assert_eq!(info.digest, digest);
        assert!(store.contains(&digest));
        let mut back = Vec::new();
        store
            .open_blob(&digest)
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
        assert_eq!(store.list().unwrap(), vec![digest.clone()]);
        // Writing the same content again is harmless.
        store
            .write_from(&data[..], "test", Some(&digest), None)
            .unwrap();
        store.remove(&digest).unwrap();
        store.remove(&digest).unwrap();
        assert!(!store.contains(&digest));
        no_temps(&store);
    }

    #[test]
    fn refuses_wrong_digest_or_size_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = BlobStore::open(tmp.path()).unwrap();
        let wrong = sha(b"other");
        let err = store
            .write_from(&b"data"[..], "test", Some(&wrong), None)
            .unwrap_err();
        assert!(matches!(err, BlobError::DigestMismatch { .. }), "{err}");
        assert!(!store.contains(&wrong));
        assert!(!store.contains(&sha(b"data")));
        let err = store
            .write_from(&b"data"[..], "test", Some(&sha(b"data")), Some(3))
            .unwrap_err();
        assert!(matches!(err, BlobError::SizeMismatch { .. }), "{err}");
        let err = store
            .write_from(&b"data"[..], "test", Some(&sha(b"data")), Some(5))
            .unwrap_err();
        assert!(matches!(err, BlobError::SizeMismatch { .. }), "{err}");
        assert!(store.list().unwrap().is_empty());
        no_temps(&store);
    }

    #[test]
    fn truncated_source_leaves_nothing() {
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "cut"));
                }
                self.0 -= 1;
                buf[0] = b'x';
                Ok(1)
            }
        }
        let tmp = tempfile::tempdir().unwrap();
        let store = BlobStore::open(tmp.path()).unwrap();
        let err = store
            .write_from(Failing(10), "cut", None, None)
            .unwrap_err();
        assert!(matches!(err, BlobError::Source { .. }), "{err}");
        assert!(store.list().unwrap().is_empty());
        no_temps(&store);
    }

    #[test]
    fn open_removes_stale_temps_and_rejects_bad_digests() {
        let tmp = tempfile::tempdir().unwrap();
        let store = BlobStore::open(tmp.path()).unwrap();
        fs::write(store.dir().join(fsutil::tmp_name("x")), b"half").unwrap();
        let store = BlobStore::open(tmp.path()).unwrap();
        no_temps(&store);
        for bad in ["sha256:../../etc/passwd", "md5:abc", "sha256:ABC"] {
            assert!(matches!(
                store.open_blob(bad),
                Err(BlobError::InvalidDigest { .. })
            ));
        }
        assert!(matches!(
            store.open_blob(&sha(b"absent")),
            Err(BlobError::NotFound { .. })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_of_one_digest_share_the_work() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let tmp = tempfile::tempdir().unwrap();
        let store = Arc::new(BlobStore::open(tmp.path()).unwrap());
        let data = Arc::new(vec![7u8; 1 << 20]);
        let digest = sha(&data);
        let downloads = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (store, data, digest, downloads) = (
                store.clone(),
                data.clone(),
                digest.clone(),
                downloads.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let _guard = store.lock(&digest).await;
                if !store.contains(&digest) {
                    downloads.fetch_add(1, Ordering::SeqCst);
                    let store2 = store.clone();
                    tokio::task::spawn_blocking(move || {
                        store2.write_from(&data[..], "t", Some(&digest), None)
                    })
                    .await
                    .unwrap()
                    .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(downloads.load(Ordering::SeqCst), 1);
        assert!(store.contains(&sha(&data)));
        assert!(store.locks.is_idle());
    }
}
