//! Container stdout/stderr logs: the CRI log file format, a sync writer with size-based rotation
//! for the shim, a line splitter for pipe data, and an async reader (tail, since, follow across
//! rotations) for the agent.
//!
//! A container's log directory holds `container.log`, the file being written, and up to
//! `max_files - 1` rotated files `container.log.1` (newest) … `container.log.N` (oldest). Every
//! line is one entry in the Kubernetes CRI format:
//!
//! ```text
//! 2026-11-28T05:26:57.123456789Z stdout F hello
//! ```
//!
//! that is an RFC 3339 UTC timestamp with nanoseconds, the stream, a tag (`F` for a full line,
//! `P` for a piece of a longer line that continues in the next entry) and the content, which
//! never contains a newline. The writer is one process (the shim) and readers are others (the
//! agent, possibly restarted), so everything the two sides share is in the files themselves:
//! readers find rotations by inode, not by any signal from the writer.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;
use time::format_description::StaticFormatDescription;
use time::format_description::well_known::Rfc3339;
use tokio::io::AsyncReadExt;

/// Longest content of one entry, in bytes: longer lines are split into `P` entries followed by
/// one `F` entry.
pub const MAX_LINE_SIZE: usize = 16 * 1024;

/// Name of the file being written in a log directory; rotated files add `.1`, `.2`, ….
pub const LOG_FILE_NAME: &str = "container.log";

/// Smallest accepted [`LogConfig::max_size`]: smaller files would rotate on nearly every line.
pub const MIN_MAX_SIZE: u64 = 4096;

/// Largest accepted [`LogConfig::max_files`]; readers ignore rotated files past this index, so
/// that a stray `container.log.4000000000` cannot make them probe billions of names.
pub const MAX_MAX_FILES: u32 = 10_000;

/// How often a following reader looks for new data or a rotation.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Size of one read, forwards or backwards.
const READ_CHUNK: usize = 64 * 1024;

/// Longest line a reader accepts. Our writer stays far below (header + [`MAX_LINE_SIZE`]); the
/// slack tolerates other writers, and the bound keeps a corrupt file from eating memory.
const MAX_READ_LINE: usize = 4 * MAX_LINE_SIZE;

/// Bytes of a line kept while scanning backwards: enough for the header, which is all that
/// counting entries needs.
const HEADER_PREFIX: usize = 256;

/// How many times a directory scan is retried when the current file changed during it.
const SCAN_ATTEMPTS: usize = 16;

/// Timestamp layout of written entries: fixed width (always nine fraction digits) so that lines
/// sort and align; readers accept any RFC 3339 timestamp, as Kubernetes writes trimmed ones.
const TIMESTAMP_FORMAT: StaticFormatDescription = time::macros::format_description!(
    "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:9]Z"
);

/// Errors of writing, parsing and reading container logs.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A file system operation on a log file or directory failed.
    #[error("cannot {op} {}: {source}", .path.display())]
    Io {
        /// What was being done, e.g. `"open"` or `"rename"`.
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A [`LogConfig`] is out of range.
    #[error("invalid log config: {reason}")]
    InvalidConfig {
        /// Which limit is broken.
        reason: String,
    },
    /// Content given to [`LogWriter::write_entry`] contains a newline, which the format cannot
    /// hold; [`LineSplitter`] produces content without them.
    #[error("log content contains a newline")]
    NewlineInContent,
    /// A time cannot be written as an RFC 3339 timestamp (before year 0 or after 9999).
    #[error("time {time:?} is outside the range of log timestamps")]
    TimeOutOfRange {
        /// The time given.
        time: SystemTime,
    },
    /// A line is not in the CRI log format.
    #[error("malformed log line {line:?}: {reason}")]
    Malformed {
        /// What is wrong with it.
        reason: &'static str,
        /// The start of the line, lossily decoded, for the message.
        line: String,
    },
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> LogError {
    LogError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Which output of the container an entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stream {
    /// The container's standard output.
    Stdout,
    /// The container's standard error.
    Stderr,
}

impl Stream {
    /// The stream's name in the log format: `stdout` or `stderr`.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }

    fn from_bytes(b: &[u8]) -> Option<Self> {
        match b {
            b"stdout" => Some(Stream::Stdout),
            b"stderr" => Some(Stream::Stderr),
            _ => None,
        }
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of a log file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// When the shim read the data from the container.
    pub time: SystemTime,
    /// The stream it came from.
    pub stream: Stream,
    /// True for a piece of a long line (`P`): the line continues in the next entry of the same
    /// stream, and no newline follows this content.
    pub partial: bool,
    /// The data, without the newline.
    pub content: Vec<u8>,
}

/// The fields of a line that precede its content.
struct Header {
    time: SystemTime,
    stream: Stream,
    partial: bool,
    /// Offset of the content in the line.
    content_start: usize,
}

/// Parses one line of a log file (a trailing newline is allowed).
///
/// Accepts what Kubernetes writes too: any RFC 3339 timestamp (fraction digits trimmed or
/// absent, any offset), extra `:`-separated tags after `F`/`P`, and a line that ends right
/// after the tag (empty content).
pub fn parse_line(line: &[u8]) -> Result<LogEntry, LogError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let header = parse_header(line)?;
    Ok(LogEntry {
        time: header.time,
        stream: header.stream,
        partial: header.partial,
        content: line[header.content_start..].to_vec(),
    })
}

fn parse_header(line: &[u8]) -> Result<Header, LogError> {
    let malformed = |reason| LogError::Malformed {
        reason,
        line: String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned(),
    };
    let (ts, rest) = split_field(line).ok_or_else(|| malformed("no stream after the timestamp"))?;
    let (stream, rest) = split_field(rest).ok_or_else(|| malformed("no tag after the stream"))?;
    let (tag, content_start) = match rest.iter().position(|&b| b == b' ') {
        Some(i) => (&rest[..i], line.len() - rest.len() + i + 1),
        None => (rest, line.len()),
    };
    let time = std::str::from_utf8(ts)
        .ok()
        .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok())
        .and_then(to_system_time)
        .ok_or_else(|| malformed("invalid timestamp"))?;
    let stream = Stream::from_bytes(stream).ok_or_else(|| malformed("unknown stream"))?;
    let partial = match tag.split(|&b| b == b':').next() {
        Some(b"P") => true,
        Some(b"F") => false,
        _ => return Err(malformed("unknown tag")),
    };
    Ok(Header {
        time,
        stream,
        partial,
        content_start,
    })
}

/// Splits `b` at its first space: the field before and everything after.
fn split_field(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = b.iter().position(|&c| c == b' ')?;
    Some((&b[..i], &b[i + 1..]))
}

fn to_system_time(t: OffsetDateTime) -> Option<SystemTime> {
    let secs = t.unix_timestamp();
    let nanos = Duration::from_nanos(u64::from(t.nanosecond()));
    if secs >= 0 {
        UNIX_EPOCH
            .checked_add(Duration::from_secs(secs.unsigned_abs()))?
            .checked_add(nanos)
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(secs.unsigned_abs()))?
            .checked_add(nanos)
    }
}

fn to_datetime(time: SystemTime) -> Result<OffsetDateTime, LogError> {
    let err = || LogError::TimeOutOfRange { time };
    // Any Duration's nanoseconds fit an i128, so the conversions below cannot fail.
    let nanos = match time.duration_since(UNIX_EPOCH) {
        Ok(d) => i128::try_from(d.as_nanos()).map_err(|_| err())?,
        Err(e) => -i128::try_from(e.duration().as_nanos()).map_err(|_| err())?,
    };
    let t = OffsetDateTime::from_unix_timestamp_nanos(nanos).map_err(|_| err())?;
    // RFC 3339 has four-digit years only.
    if t.year() < 0 {
        return Err(err());
    }
    Ok(t)
}

/// Rotation settings of a container's logs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogConfig {
    /// Size in bytes that `container.log` may reach before it is rotated; at least
    /// [`MIN_MAX_SIZE`]. A single entry bigger than this still goes into a file of its own.
    pub max_size: u64,
    /// Number of files kept, `container.log` included; 1 to [`MAX_MAX_FILES`]. With 1, a full
    /// `container.log` is deleted and started anew.
    pub max_files: u32,
}

impl Default for LogConfig {
    /// 10 MiB × 5 files, the kubelet's default.
    fn default() -> Self {
        LogConfig {
            max_size: 10 * 1024 * 1024,
            max_files: 5,
        }
    }
}

impl LogConfig {
    /// Checks that the limits are in range.
    pub fn validate(&self) -> Result<(), LogError> {
        let reason = if self.max_size < MIN_MAX_SIZE {
            format!(
                "max_size {} is below the minimum of {MIN_MAX_SIZE} bytes",
                self.max_size
            )
        } else if self.max_files < 1 {
            "max_files must be at least 1".to_owned()
        } else if self.max_files > MAX_MAX_FILES {
            format!(
                "max_files {} is above the maximum of {MAX_MAX_FILES}",
                self.max_files
            )
        } else {
            return Ok(());
        };
        Err(LogError::InvalidConfig { reason })
    }
}

fn rotated_path(dir: &Path, index: u32) -> PathBuf {
    dir.join(format!("{LOG_FILE_NAME}.{index}"))
}

/// The index `k` of a file named `container.log.k`, k ≥ 1.
fn rotated_index(name: &std::ffi::OsStr) -> Option<u32> {
    let digits = name
        .to_str()?
        .strip_prefix(LOG_FILE_NAME)?
        .strip_prefix('.')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&k| k >= 1)
}

/// Indices of the rotated files in `dir`; none when `dir` does not exist.
fn rotated_indices(dir: &Path) -> Result<Vec<u32>, LogError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("list", dir, e)),
    };
    let mut indices = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_err("list", dir, e))?;
        if let Some(k) = rotated_index(&entry.file_name()) {
            indices.push(k);
        }
    }
    Ok(indices)
}

fn ignore_not_found(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Writes a container's log files; used by the shim, synchronously.
///
/// Each entry goes to the file in a single `write(2)` with no user-space buffering, so readers
/// in other processes see it as soon as `write_entry` returns (it is not fsynced).
#[derive(Debug)]
pub struct LogWriter {
    dir: PathBuf,
    path: PathBuf,
    config: LogConfig,
    /// `None` after a rotation whose new file could not be created yet; the next write retries.
    file: Option<File>,
    /// Current size of `container.log`.
    size: u64,
    /// The file may end in the middle of a line (a failed write, or a writer that died), so the
    /// next entry must start with a newline lest it be glued onto that fragment.
    torn: bool,
    /// The entry being written, kept to avoid an allocation per entry.
    line: Vec<u8>,
}

impl LogWriter {
    /// Opens `dir/container.log` for appending, creating `dir` (mode 0750) and the file (mode
    /// 0640) if needed.
    pub fn open(dir: &Path, config: LogConfig) -> Result<LogWriter, LogError> {
        config.validate()?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(|e| io_err("create directory", dir, e))?;
        let mut writer = LogWriter {
            dir: dir.to_path_buf(),
            path: dir.join(LOG_FILE_NAME),
            config,
            file: None,
            size: 0,
            torn: false,
            line: Vec::with_capacity(MAX_LINE_SIZE + 64),
        };
        writer.file = Some(writer.open_current()?);
        Ok(writer)
    }

    /// Opens `container.log`, setting `size` and `torn` from what is there.
    fn open_current(&mut self) -> Result<File, LogError> {
        let path = &self.path;
        let opts = || {
            let mut o = OpenOptions::new();
            o.read(true).append(true);
            o
        };
        // Try to create first, so that only a file made here gets its mode forced.
        let (file, created) = match opts().create_new(true).mode(0o640).open(path) {
            Ok(f) => (f, true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => (
                opts().open(path).map_err(|e| io_err("open", path, e))?,
                false,
            ),
            Err(e) => return Err(io_err("create", path, e)),
        };
        let meta = file.metadata().map_err(|e| io_err("stat", path, e))?;
        if created && meta.permissions().mode() & 0o777 != 0o640 {
            // The umask may have taken bits away (or a lax one added none): be exact.
            file.set_permissions(Permissions::from_mode(0o640))
                .map_err(|e| io_err("chmod", path, e))?;
        }
        let size = meta.len();
        let mut torn = false;
        if size > 0 {
            let mut last = [0u8; 1];
            file.read_exact_at(&mut last, size - 1)
                .map_err(|e| io_err("read", path, e))?;
            torn = last[0] != b'\n';
        }
        self.size = size;
        self.torn = torn;
        Ok(file)
    }

    /// Appends one entry, rotating first if it would make `container.log` exceed `max_size`.
    ///
    /// `content` must not contain a newline. Content longer than [`MAX_LINE_SIZE`] is written as
    /// several entries, all but the last marked partial (the last one keeps `partial`). On
    /// error nothing more of `content` is written; the writer stays usable.
    pub fn write_entry(
        &mut self,
        stream: Stream,
        time: SystemTime,
        content: &[u8],
        partial: bool,
    ) -> Result<(), LogError> {
        if content.contains(&b'\n') {
            return Err(LogError::NewlineInContent);
        }
        let datetime = to_datetime(time)?;
        let mut rest = content;
        loop {
            let n = rest.len().min(MAX_LINE_SIZE);
            let more = n < rest.len();
            self.write_line(stream, time, datetime, &rest[..n], partial || more)?;
            rest = &rest[n..];
            if !more {
                return Ok(());
            }
        }
    }

    fn write_line(
        &mut self,
        stream: Stream,
        time: SystemTime,
        datetime: OffsetDateTime,
        content: &[u8],
        partial: bool,
    ) -> Result<(), LogError> {
        self.line.clear();
        datetime
            .format_into(&mut self.line, TIMESTAMP_FORMAT)
            .map_err(|_| LogError::TimeOutOfRange { time })?;
        self.line.push(b' ');
        self.line.extend_from_slice(stream.as_str().as_bytes());
        self.line
            .extend_from_slice(if partial { b" P " } else { b" F " });
        self.line.extend_from_slice(content);
        self.line.push(b'\n');
        let len = self.line.len() as u64;

        if self.size > 0 && self.size.saturating_add(len) > self.config.max_size {
            self.rotate()?;
        }
        let file = match self.file.take() {
            Some(f) => f,
            None => self.open_current()?,
        };
        let result = self.append(&file, len);
        self.file = Some(file);
        result
    }

    fn append(&mut self, mut file: &File, len: u64) -> Result<(), LogError> {
        if self.torn {
            file.write_all(b"\n")
                .map_err(|e| io_err("write to", &self.path, e))?;
            self.torn = false;
            self.size += 1;
        }
        if let Err(e) = file.write_all(&self.line) {
            // Part of the line may have reached the file: learn how much, and make sure the
            // next entry starts on a line of its own.
            match file.metadata() {
                Ok(meta) => {
                    self.torn |= meta.len() != self.size;
                    self.size = meta.len();
                }
                Err(_) => self.torn = true,
            }
            return Err(io_err("write to", &self.path, e));
        }
        self.size += len;
        Ok(())
    }

    /// Shifts `container.log.k` to `.k+1`, dropping what would exceed `max_files`, and moves
    /// `container.log` to `.1`. The new `container.log` is created by the caller.
    fn rotate(&mut self) -> Result<(), LogError> {
        let max = self.config.max_files;
        // Files left from an earlier, larger max_files would otherwise stay forever.
        for k in rotated_indices(&self.dir)? {
            if k >= max {
                let path = rotated_path(&self.dir, k);
                ignore_not_found(fs::remove_file(&path)).map_err(|e| io_err("remove", &path, e))?;
            }
        }
        // Oldest first, so each rename replaces only the file that falls off the end. Readers
        // rely on this order: a file only ever moves to a higher index.
        for k in (1..max.saturating_sub(1)).rev() {
            let from = rotated_path(&self.dir, k);
            ignore_not_found(fs::rename(&from, rotated_path(&self.dir, k + 1)))
                .map_err(|e| io_err("rename", &from, e))?;
        }
        // From here on, a failure leaves no file open: the next write reopens container.log
        // (the old one, if it is still there, or a new one) instead of writing to a moved file.
        self.file = None;
        let moved = if max == 1 {
            fs::remove_file(&self.path)
        } else {
            fs::rename(&self.path, rotated_path(&self.dir, 1))
        };
        ignore_not_found(moved).map_err(|e| io_err("rotate", &self.path, e))?;
        self.size = 0;
        self.torn = false;
        Ok(())
    }
}

/// Cuts the data read from one of a container's pipes into entry contents; used by the shim.
///
/// Each complete line is emitted without its newline as a full (`F`) piece. Data without a
/// newline is buffered; as soon as [`MAX_LINE_SIZE`] bytes of it are pending they are emitted
/// as a partial (`P`) piece, which bounds memory. Concatenating a line's `P` pieces and its
/// final `F` piece always gives the line back. Where exactly a long line is cut can depend on
/// how the data was chunked: a line of exactly `MAX_LINE_SIZE` bytes is one `F` piece when its
/// newline arrives in the same chunk, a `P` piece and an empty `F` piece otherwise.
#[derive(Debug)]
pub struct LineSplitter {
    /// Pending data of an unterminated line, shorter than `max`.
    buf: Vec<u8>,
    max: usize,
    /// A `P` piece was emitted and its line has not been ended by an `F` piece yet.
    in_partial: bool,
}

impl Default for LineSplitter {
    fn default() -> Self {
        LineSplitter::new()
    }
}

impl LineSplitter {
    /// A splitter with the standard [`MAX_LINE_SIZE`].
    pub fn new() -> Self {
        LineSplitter::with_max_line_size(MAX_LINE_SIZE)
    }

    /// A splitter cutting pieces of at most `max` bytes (at least 1).
    pub fn with_max_line_size(max: usize) -> Self {
        let max = max.max(1);
        LineSplitter {
            buf: Vec::with_capacity(max),
            max,
            in_partial: false,
        }
    }

    /// Feeds the next bytes read from the pipe; `emit(content, partial)` is called for every
    /// piece that is complete, in order. Pieces are taken straight from `chunk` when possible.
    pub fn push(&mut self, mut chunk: &[u8], mut emit: impl FnMut(&[u8], bool)) {
        while !chunk.is_empty() {
            match chunk.iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    self.end_line(&chunk[..nl], &mut emit);
                    chunk = &chunk[nl + 1..];
                }
                None => {
                    self.push_unterminated(chunk, &mut emit);
                    return;
                }
            }
        }
    }

    /// Ends the current line with `line`, its last bytes before the newline.
    fn end_line(&mut self, mut line: &[u8], emit: &mut impl FnMut(&[u8], bool)) {
        if !self.buf.is_empty() {
            if self.buf.len() + line.len() <= self.max {
                self.buf.extend_from_slice(line);
                emit(&self.buf, false);
                self.buf.clear();
                self.in_partial = false;
                return;
            }
            let take = self.max - self.buf.len();
            self.buf.extend_from_slice(&line[..take]);
            emit(&self.buf, true);
            self.buf.clear();
            line = &line[take..];
        }
        while line.len() > self.max {
            emit(&line[..self.max], true);
            line = &line[self.max..];
        }
        emit(line, false);
        self.in_partial = false;
    }

    /// Takes data that holds no newline.
    fn push_unterminated(&mut self, mut data: &[u8], emit: &mut impl FnMut(&[u8], bool)) {
        while !data.is_empty() {
            if self.buf.is_empty() && data.len() >= self.max {
                emit(&data[..self.max], true);
                self.in_partial = true;
                data = &data[self.max..];
                continue;
            }
            let take = (self.max - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == self.max {
                emit(&self.buf, true);
                self.buf.clear();
                self.in_partial = true;
            }
        }
    }

    /// At end of input: the pending data as a final, full piece `(content, false)`. When a `P`
    /// piece was the last thing emitted, this is an empty `F` piece that ends its line, so that
    /// readers never see a line left open. `None` when there is nothing to end.
    pub fn finish(&mut self) -> Option<(Vec<u8>, bool)> {
        if self.buf.is_empty() && !self.in_partial {
            return None;
        }
        self.in_partial = false;
        Some((std::mem::take(&mut self.buf), false))
    }
}

/// What to read with a [`LogReader`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// Only the last this many entries (after the `since` filter) of those already written;
    /// entries are lines of the files, so a long line's `P` pieces count one each.
    pub tail: Option<usize>,
    /// Only entries with a time at or after this.
    pub since: Option<SystemTime>,
    /// After the existing entries, wait for new ones (see [`LogReader`]).
    pub follow: bool,
}

/// Identity of a file, which survives renames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(meta: &fs::Metadata) -> Self {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

fn file_id(path: &Path) -> Result<Option<FileId>, LogError> {
    match fs::metadata(path) {
        Ok(meta) => Ok(Some(FileId::of(&meta))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("stat", path, e)),
    }
}

async fn file_id_async(path: &Path) -> Result<Option<FileId>, LogError> {
    match tokio::fs::metadata(path).await {
        Ok(meta) => Ok(Some(FileId::of(&meta))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("stat", path, e)),
    }
}

/// An open log file found by [`scan_chain`].
#[derive(Debug)]
struct ChainFile {
    file: File,
    id: FileId,
    path: PathBuf,
    /// Size when it was opened.
    len: u64,
}

/// The log files of a directory, all open, newest first.
#[derive(Debug)]
struct Chain {
    files: Vec<ChainFile>,
    /// Identity of `container.log`, if it existed and stayed the same during the scan.
    current: Option<FileId>,
}

/// Opens every log file of `dir`, newest first, each once. A missing directory has none.
///
/// The writer may rotate meanwhile. Files are opened from the newest name to the oldest, and a
/// rotation only moves files to higher indices, so a file cannot be skipped and two files
/// cannot be swapped; one seen twice is kept once. A rotation also replaces `container.log`,
/// which would let a new file slip in after older ones: when that is seen, the scan is redone.
fn scan_chain(dir: &Path) -> Result<Chain, LogError> {
    let current_path = dir.join(LOG_FILE_NAME);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let before = file_id(&current_path)?;
        let max = rotated_indices(dir)?
            .into_iter()
            .filter(|&k| k <= MAX_MAX_FILES)
            .max()
            .unwrap_or(0);
        let mut files: Vec<ChainFile> = Vec::new();
        // One past the highest listed index, for the file an ongoing rotation moves there.
        for k in 0..=max + 1 {
            let path = if k == 0 {
                current_path.clone()
            } else {
                rotated_path(dir, k)
            };
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("open", &path, e)),
            };
            let meta = file.metadata().map_err(|e| io_err("stat", &path, e))?;
            let id = FileId::of(&meta);
            if files.iter().all(|f| f.id != id) {
                files.push(ChainFile {
                    file,
                    id,
                    path,
                    len: meta.len(),
                });
            }
        }
        let after = file_id(&current_path)?;
        if before == after || attempt >= SCAN_ATTEMPTS {
            let current = after.filter(|_| before == after);
            return Ok(Chain { files, current });
        }
    }
}

/// A file to read, as decided when a reader starts.
#[derive(Debug)]
struct Planned {
    file: ChainFile,
    /// Offset to start reading at (the file is positioned there).
    start: u64,
    /// Offset to stop at: the end of the current file when not following.
    limit: Option<u64>,
    /// The file is not `container.log` any more.
    rotated: bool,
}

/// Decides which files a reader reads and from where, oldest first. With `tail`, files are
/// scanned backwards from the newest and only those holding the wanted entries are kept.
fn plan(dir: &Path, opts: &ReadOptions) -> Result<Vec<Planned>, LogError> {
    let chain = scan_chain(dir)?;
    let mut need = opts.tail;
    let mut planned = Vec::new();
    for (i, f) in chain.files.into_iter().enumerate() {
        let live = i == 0 && chain.current == Some(f.id);
        let mut start = 0;
        let mut enough = false;
        if let Some(need) = need.as_mut()
            && let Some(offset) = tail_start(&f.file, &f.path, f.len, live, opts.since, need)?
        {
            start = offset;
            enough = true;
        }
        if start > 0 {
            (&f.file)
                .seek(SeekFrom::Start(start))
                .map_err(|e| io_err("seek", &f.path, e))?;
        }
        planned.push(Planned {
            limit: (live && !opts.follow).then_some(f.len),
            rotated: !live,
            file: f,
            start,
        });
        if enough {
            break;
        }
    }
    planned.reverse();
    Ok(planned)
}

/// Scans the first `end` bytes of `file` backwards for the start of the last `*need` entries
/// that pass `since`. Returns their offset, or `None` if the file holds fewer, having taken
/// those it holds off `*need`. Bytes after the last newline are an entry in the making in the
/// `live` file and do not count; in a rotated file they are its final entry.
fn tail_start(
    file: &File,
    path: &Path,
    end: u64,
    live: bool,
    since: Option<SystemTime>,
    need: &mut usize,
) -> Result<Option<u64>, LogError> {
    if *need == 0 && !live {
        return Ok(Some(end));
    }
    let mut block = vec![0u8; READ_CHUNK];
    // The segment (line) being assembled, whose start is not found yet: its first bytes and
    // its length so far.
    let mut head: Vec<u8> = Vec::with_capacity(HEADER_PREFIX);
    let mut seg_len: u64 = 0;
    let mut unterminated = true;
    let mut pos = end;
    loop {
        if pos == 0 {
            let seg = Segment {
                head: &head,
                len: seg_len,
                start: 0,
                unterminated,
            };
            return Ok(seg.count(live, since, need));
        }
        let n = usize::try_from(pos.min(READ_CHUNK as u64)).unwrap_or(READ_CHUNK);
        pos -= n as u64;
        file.read_exact_at(&mut block[..n], pos)
            .map_err(|e| io_err("read", path, e))?;
        let mut hi = n;
        while let Some(i) = block[..hi].iter().rposition(|&b| b == b'\n') {
            prepend_capped(&mut head, &block[i + 1..hi]);
            seg_len += (hi - i - 1) as u64;
            let seg = Segment {
                head: &head,
                len: seg_len,
                start: pos + i as u64 + 1,
                unterminated,
            };
            if let Some(start) = seg.count(live, since, need) {
                return Ok(Some(start));
            }
            head.clear();
            seg_len = 0;
            unterminated = false;
            hi = i;
        }
        prepend_capped(&mut head, &block[..hi]);
        seg_len += hi as u64;
    }
}

/// A line found while scanning backwards.
struct Segment<'a> {
    /// Its first bytes, at most [`HEADER_PREFIX`].
    head: &'a [u8],
    len: u64,
    start: u64,
    /// It is the part after the file's last newline.
    unterminated: bool,
}

impl Segment<'_> {
    /// Counts the segment against `need` if it is an entry the reader would yield; returns its
    /// start once `need` is met.
    fn count(&self, live: bool, since: Option<SystemTime>, need: &mut usize) -> Option<u64> {
        if self.unterminated {
            if live {
                return (*need == 0).then_some(self.start);
            }
            if self.len == 0 {
                return None;
            }
        }
        if *need == 0 {
            return Some(self.start);
        }
        // The forward reader skips over-long lines, so they must not count here either.
        if self.len > MAX_READ_LINE as u64 {
            return None;
        }
        match parse_header(self.head) {
            Ok(h) if since.is_none_or(|s| h.time >= s) => {
                *need -= 1;
                (*need == 0).then_some(self.start)
            }
            _ => None,
        }
    }
}

/// Puts `piece` in front of `head`, keeping only the first [`HEADER_PREFIX`] bytes.
fn prepend_capped(head: &mut Vec<u8>, piece: &[u8]) {
    if piece.len() >= HEADER_PREFIX {
        head.clear();
        head.extend_from_slice(&piece[..HEADER_PREFIX]);
        return;
    }
    head.truncate(HEADER_PREFIX - piece.len());
    head.splice(0..0, piece.iter().copied());
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    dir: &Path,
    work: impl FnOnce() -> Result<T, LogError> + Send + 'static,
) -> Result<T, LogError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(e) => Err(io_err("scan", dir, io::Error::other(e))),
    }
}

/// A log file being read forwards.
#[derive(Debug)]
struct Cursor {
    file: tokio::fs::File,
    id: FileId,
    path: PathBuf,
    /// Offset of the next byte to read.
    pos: u64,
    limit: Option<u64>,
    /// No more data will be appended: bytes after the last newline form a final entry.
    rotated: bool,
    /// Read but not yet consumed data starts at `head`.
    buf: Vec<u8>,
    head: usize,
    /// `buf[head..scanned]` has no newline.
    scanned: usize,
    /// An over-long line is being dropped up to its newline.
    skipping: bool,
}

impl Cursor {
    fn new(planned: Planned) -> Self {
        Cursor {
            file: tokio::fs::File::from_std(planned.file.file),
            id: planned.file.id,
            path: planned.file.path,
            pos: planned.start,
            limit: planned.limit,
            rotated: planned.rotated,
            buf: Vec::new(),
            head: 0,
            scanned: 0,
            skipping: false,
        }
    }

    /// The range in `buf` of the next complete line, without its newline.
    fn take_line(&mut self) -> Option<Range<usize>> {
        loop {
            let Some(i) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') else {
                self.scanned = self.buf.len();
                if self.skipping || self.buf.len() - self.head > MAX_READ_LINE {
                    // Nothing valid can come of an over-long line: drop it now rather than
                    // buffer it, and the rest of it as it arrives.
                    self.skipping = true;
                    self.buf.clear();
                    self.head = 0;
                    self.scanned = 0;
                }
                return None;
            };
            let start = self.head;
            let end = self.scanned + i;
            self.head = end + 1;
            self.scanned = end + 1;
            if std::mem::take(&mut self.skipping) || end - start > MAX_READ_LINE {
                continue;
            }
            return Some(start..end);
        }
    }

    /// Reads more data into `buf`; 0 at the end of the file or of the limit.
    async fn fill(&mut self, chunk: &mut [u8]) -> Result<usize, LogError> {
        let mut want = chunk.len();
        if let Some(limit) = self.limit {
            want = want.min(usize::try_from(limit.saturating_sub(self.pos)).unwrap_or(want));
        }
        if want == 0 {
            return Ok(0);
        }
        // Cancel safety: tokio's `read` loses no data when dropped (an unfinished read is kept
        // by the file for the next call), and `self` is changed only after it completes.
        let n = self
            .file
            .read(&mut chunk[..want])
            .await
            .map_err(|e| io_err("read", &self.path, e))?;
        if self.head > 0 {
            self.buf.drain(..self.head);
            self.scanned -= self.head;
            self.head = 0;
        }
        self.buf.extend_from_slice(&chunk[..n]);
        self.pos += n as u64;
        Ok(n)
    }

    /// The entry formed by the bytes after the last newline of a finished rotated file, left by
    /// a writer that failed or died mid-line.
    fn final_entry(&self, since: Option<SystemTime>) -> Option<LogEntry> {
        let rest = &self.buf[self.head..];
        if !self.rotated || self.skipping || rest.is_empty() || rest.len() > MAX_READ_LINE {
            return None;
        }
        parse_line(rest)
            .ok()
            .filter(|e| since.is_none_or(|s| e.time >= s))
    }
}

/// Reads a container's log entries, oldest first, across rotated files; used by the agent.
///
/// Without `follow`, [`next`](Self::next) yields the entries present when reading starts and
/// then `None`: with `tail`, only files holding the last entries are read (found by scanning
/// backwards from the newest), and in `container.log` nothing past its size at the start.
///
/// With `follow`, it then keeps yielding entries as they are written, polling every 100 ms.
/// When the writer rotates, the old file is read to its end before the next one (found by
/// inode, however many rotations happened in between), so no entry is lost or repeated unless
/// the writer rotates a file away (past `max_files`) before the reader got to it. It never ends
/// by itself: see [`stop_following`](Self::stop_following).
///
/// Malformed lines are skipped silently. An error from `next` does not end the reader: calling
/// `next` again retries.
#[derive(Debug)]
pub struct LogReader {
    dir: PathBuf,
    opts: ReadOptions,
    /// The files to read were chosen (on the first `next`).
    started: bool,
    stopping: bool,
    done: bool,
    /// Files being read, oldest first. When following, the newest stays here (at the back)
    /// until its successor is found.
    files: VecDeque<Cursor>,
    /// Read buffer.
    chunk: Vec<u8>,
}

impl LogReader {
    /// A reader of the logs in `dir`. Only checks that `dir` is a directory (one `stat`); the
    /// files are looked at on the first [`next`](Self::next), off the async threads. A
    /// directory without log files yet is fine: it reads as empty, or is waited on when
    /// following.
    pub fn open(dir: &Path, opts: ReadOptions) -> Result<LogReader, LogError> {
        let meta = fs::metadata(dir).map_err(|e| io_err("open log directory", dir, e))?;
        if !meta.is_dir() {
            let e = io::Error::from(io::ErrorKind::NotADirectory);
            return Err(io_err("open log directory", dir, e));
        }
        Ok(LogReader {
            dir: dir.to_path_buf(),
            opts,
            started: false,
            stopping: false,
            done: false,
            files: VecDeque::new(),
            chunk: vec![0; READ_CHUNK],
        })
    }

    /// Makes a following reader end once it has caught up: from now on, when it reaches the end
    /// of the data (`container.log` read to its end, no rotation pending), `next` returns
    /// `None` instead of waiting.
    ///
    /// Every entry written before this call is still yielded, including those in files rotated
    /// meanwhile; entries written after it may or may not be. So call it once the writer is
    /// done, e.g. when the shim has reported the container's exit. An unterminated last line
    /// of `container.log` (a write cut short) is dropped. No effect without `follow`.
    pub fn stop_following(&mut self) {
        self.stopping = true;
    }

    /// The next entry; `None` at the end (see [`LogReader`]), and on every call after that.
    ///
    /// Cancel safety: this method is cancel safe, so it can be a branch of `tokio::select!`.
    /// If the future is dropped before completing, no entry is lost or repeated: the reader's
    /// state only changes when an operation completes, and an unfinished read is kept by the
    /// file for the next call.
    pub async fn next(&mut self) -> Option<Result<LogEntry, LogError>> {
        let since = self.opts.since;
        loop {
            if self.done {
                return None;
            }
            if !self.started {
                let (dir, opts) = (self.dir.clone(), self.opts.clone());
                match blocking(&self.dir, move || plan(&dir, &opts)).await {
                    Ok(planned) => {
                        self.files = planned.into_iter().map(Cursor::new).collect();
                        self.started = true;
                    }
                    Err(e) => return Some(Err(e)),
                }
                continue;
            }
            if self.files.is_empty() {
                if !self.opts.follow {
                    self.done = true;
                    return None;
                }
                match self.adopt_oldest().await {
                    Ok(true) => continue,
                    Ok(false) if self.stopping => {
                        self.done = true;
                        return None;
                    }
                    Ok(false) => tokio::time::sleep(POLL_INTERVAL).await,
                    Err(e) => return Some(Err(e)),
                }
                continue;
            }
            let Some(cur) = self.files.front_mut() else {
                continue;
            };
            if let Some(range) = cur.take_line() {
                match parse_line(&cur.buf[range]) {
                    Ok(entry) if since.is_none_or(|s| entry.time >= s) => return Some(Ok(entry)),
                    // Filtered out, or malformed: one damaged line must not hide the rest.
                    _ => continue,
                }
            }
            match cur.fill(&mut self.chunk).await {
                Ok(0) => {}
                Ok(_) => continue,
                Err(e) => return Some(Err(e)),
            }
            // The front file has no more data for now.
            if self.files.len() > 1 || !self.opts.follow {
                // It is finished: a rotated file gets no more data, and without follow the
                // current one is read only up to where it ended at the start.
                if let Some(cur) = self.files.pop_front()
                    && let Some(entry) = cur.final_entry(since)
                {
                    return Some(Ok(entry));
                }
                continue;
            }
            match self.follow_rotation().await {
                Ok(true) => {}
                Ok(false) if self.stopping => {
                    self.done = true;
                    return None;
                }
                Ok(false) => tokio::time::sleep(POLL_INTERVAL).await,
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// When following and nothing was there at the start: starts with the oldest file, if any
    /// appeared (everything in it is new).
    async fn adopt_oldest(&mut self) -> Result<bool, LogError> {
        let dir = self.dir.clone();
        let chain = blocking(&self.dir, move || scan_chain(&dir)).await?;
        let current = chain.current;
        let Some(file) = chain.files.into_iter().last() else {
            return Ok(false);
        };
        self.files.push_back(Cursor::new(Planned {
            rotated: current != Some(file.id),
            file,
            start: 0,
            limit: None,
        }));
        Ok(true)
    }

    /// When following and the newest file is read to its end: if it was rotated, queues the
    /// file that came after it and returns true; the old file is then read to its end once
    /// more, since the writer may have appended to it between our last read and the rotation.
    async fn follow_rotation(&mut self) -> Result<bool, LogError> {
        let Some(id) = self.files.front().map(|c| c.id) else {
            return Ok(false);
        };
        let current = file_id_async(&self.dir.join(LOG_FILE_NAME)).await?;
        if current == Some(id) {
            return Ok(false);
        }
        let dir = self.dir.clone();
        let chain = blocking(&self.dir, move || scan_chain(&dir)).await?;
        let next = match chain.files.iter().position(|f| f.id == id) {
            // Still the newest: the new container.log is not there yet.
            Some(0) => return Ok(false),
            Some(p) => chain.files.into_iter().nth(p - 1),
            // Rotated away or deleted: whatever is left is newer, so start at the oldest.
            None => chain.files.into_iter().last(),
        };
        let Some(file) = next else {
            return Ok(false);
        };
        if let Some(cur) = self.files.front_mut() {
            cur.rotated = true;
        }
        self.files.push_back(Cursor::new(Planned {
            rotated: chain.current != Some(file.id),
            file,
            start: 0,
            limit: None,
        }));
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const TIMEOUT: Duration = Duration::from_secs(20);

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_795_000_000 + secs)
    }

    fn small(max_files: u32) -> LogConfig {
        LogConfig {
            max_size: MIN_MAX_SIZE,
            max_files,
        }
    }

    fn line(i: usize) -> Vec<u8> {
        format!("line {i:06} some padding text").into_bytes()
    }

    fn write_lines(w: &mut LogWriter, range: Range<usize>) {
        for i in range {
            w.write_entry(Stream::Stdout, SystemTime::now(), &line(i), false)
                .unwrap();
        }
    }

    fn numbers(entries: &[LogEntry]) -> Vec<usize> {
        entries
            .iter()
            .map(|e| {
                let s = std::str::from_utf8(&e.content).unwrap();
                s[5..11].parse().unwrap()
            })
            .collect()
    }

    fn names(dir: &Path) -> BTreeSet<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    }

    async fn read_all(dir: &Path, opts: ReadOptions) -> Vec<LogEntry> {
        let mut reader = LogReader::open(dir, opts).unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(TIMEOUT, async {
            while let Some(entry) = reader.next().await {
                out.push(entry.unwrap());
            }
        })
        .await
        .unwrap();
        out
    }

    async fn next_entry(reader: &mut LogReader) -> LogEntry {
        tokio::time::timeout(TIMEOUT, reader.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    }

    #[test]
    fn format_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let time = SystemTime::from(
            OffsetDateTime::parse("2026-11-28T05:26:57.123456789Z", &Rfc3339).unwrap(),
        );
        let mut w = LogWriter::open(dir.path(), LogConfig::default()).unwrap();
        let cases: Vec<(Stream, &[u8], bool)> = vec![
            (Stream::Stdout, b"hello", false),
            (Stream::Stderr, b"", false),
            (Stream::Stdout, b"  spaced  out \t", true),
            (Stream::Stderr, b"\xff\x00 not utf-8 \r", false),
        ];
        for (stream, content, partial) in &cases {
            w.write_entry(*stream, time, content, *partial).unwrap();
        }
        let early = UNIX_EPOCH + Duration::from_nanos(5);
        w.write_entry(Stream::Stdout, early, b"x", false).unwrap();

        let text = fs::read(dir.path().join(LOG_FILE_NAME)).unwrap();
        let lines: Vec<&[u8]> = text.split_inclusive(|&b| b == b'\n').collect();
        assert_eq!(
            lines[0],
            b"2026-11-28T05:26:57.123456789Z stdout F hello\n".as_slice()
        );
        assert_eq!(
            lines[2],
            b"2026-11-28T05:26:57.123456789Z stdout P   spaced  out \t\n"
        );
        assert_eq!(lines[4], b"1970-01-01T00:00:00.000000005Z stdout F x\n");
        for ((stream, content, partial), l) in cases.iter().zip(&lines) {
            let e = parse_line(l).unwrap();
            assert_eq!(
                e,
                LogEntry {
                    time,
                    stream: *stream,
                    partial: *partial,
                    content: content.to_vec(),
                }
            );
        }
        assert_eq!(parse_line(lines[4]).unwrap().time, early);
    }

    #[test]
    fn parse_accepts_cri_variants() {
        let base =
            SystemTime::from(OffsetDateTime::parse("2026-11-28T05:26:57Z", &Rfc3339).unwrap());
        let e = parse_line(b"2026-11-28T05:26:57.1Z stderr P:x:y a b").unwrap();
        assert_eq!(e.time, base + Duration::from_millis(100));
        assert_eq!(
            (e.stream, e.partial, e.content.as_slice()),
            (Stream::Stderr, true, &b"a b"[..])
        );
        let e = parse_line(b"2026-11-28T07:26:57+02:00 stdout F").unwrap();
        assert_eq!(e.time, base);
        assert!(e.content.is_empty());
        assert!(!e.partial);
        let e = parse_line(b"2026-11-28T05:26:57Z stdout F \n").unwrap();
        assert!(e.content.is_empty());
    }

    #[test]
    fn parse_rejects_malformed_lines() {
        let bad: &[&[u8]] = &[
            b"",
            b"garbage",
            b"2026-11-28T05:26:57Z",
            b"2026-11-28T05:26:57Z stdout",
            b"2026-11-28 stdout F x",
            b"2026-13-28T05:26:57Z stdout F x",
            b"2026-11-28T05:26:57Z stdin F x",
            b"2026-11-28T05:26:57Z stdout X x",
            b"2026-11-28T05:26:57Z stdout  x",
            b"\xff026-11-28T05:26:57Z stdout F x",
        ];
        for line in bad {
            match parse_line(line) {
                Err(e @ LogError::Malformed { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.starts_with("malformed log line"), "{msg}");
                }
                other => panic!("{:?} parsed as {other:?}", String::from_utf8_lossy(line)),
            }
        }
    }

    #[test]
    fn config_is_validated() {
        let dir = tempfile::tempdir().unwrap();
        assert!(LogConfig::default().validate().is_ok());
        assert!(small(1).validate().is_ok());
        for bad in [
            LogConfig {
                max_size: MIN_MAX_SIZE - 1,
                max_files: 5,
            },
            LogConfig {
                max_size: MIN_MAX_SIZE,
                max_files: 0,
            },
            LogConfig {
                max_size: MIN_MAX_SIZE,
                max_files: MAX_MAX_FILES + 1,
            },
        ] {
            let err = LogWriter::open(dir.path(), bad).unwrap_err();
            assert!(matches!(err, LogError::InvalidConfig { .. }), "{err}");
            assert!(err.to_string().starts_with("invalid log config: "));
        }
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn writer_creates_dir_and_mode_then_appends() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        let mut w = LogWriter::open(&dir, LogConfig::default()).unwrap();
        write_lines(&mut w, 0..1);
        drop(w);
        let mut w = LogWriter::open(&dir, LogConfig::default()).unwrap();
        write_lines(&mut w, 1..2);
        let path = dir.join(LOG_FILE_NAME);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let text = fs::read(&path).unwrap();
        let entries: Vec<LogEntry> = text
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| parse_line(l).unwrap())
            .collect();
        assert_eq!(numbers(&entries), [0, 1]);
    }

    #[test]
    fn writer_splits_long_content_and_rejects_newlines() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path(), LogConfig::default()).unwrap();
        let content = vec![b'a'; 2 * MAX_LINE_SIZE + 10];
        w.write_entry(Stream::Stdout, at(0), &content, false)
            .unwrap();
        let err = w
            .write_entry(Stream::Stdout, at(0), b"a\nb", false)
            .unwrap_err();
        assert!(matches!(err, LogError::NewlineInContent));
        let text = fs::read(dir.path().join(LOG_FILE_NAME)).unwrap();
        let entries: Vec<LogEntry> = text
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| parse_line(l).unwrap())
            .collect();
        let shape: Vec<(usize, bool)> = entries
            .iter()
            .map(|e| (e.content.len(), e.partial))
            .collect();
        assert_eq!(
            shape,
            [(MAX_LINE_SIZE, true), (MAX_LINE_SIZE, true), (10, false)]
        );
    }

    #[tokio::test]
    async fn writer_ends_a_torn_line_before_appending() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(LOG_FILE_NAME),
            b"2026-11-28T05:26:57Z stdout F first\n2026-11-28T05:26:58Z stdout F cut sho",
        )
        .unwrap();
        let mut w = LogWriter::open(dir.path(), LogConfig::default()).unwrap();
        w.write_entry(Stream::Stdout, at(0), b"after", false)
            .unwrap();
        let entries = read_all(dir.path(), ReadOptions::default()).await;
        let contents: Vec<&[u8]> = entries.iter().map(|e| e.content.as_slice()).collect();
        assert_eq!(contents, [&b"first"[..], b"cut sho", b"after"]);
    }

    fn split_all(s: &mut LineSplitter, chunks: &[&[u8]]) -> Vec<(Vec<u8>, bool)> {
        let mut out = Vec::new();
        for chunk in chunks {
            s.push(chunk, |c, p| out.push((c.to_vec(), p)));
        }
        out.extend(s.finish());
        out
    }

    fn piece(s: &str, partial: bool) -> (Vec<u8>, bool) {
        (s.as_bytes().to_vec(), partial)
    }

    #[test]
    fn splitter_emits_lines_across_chunks() {
        let mut s = LineSplitter::new();
        let out = split_all(&mut s, &[b"ab", b"c\nde\n\nf", b"g\nh"]);
        assert_eq!(
            out,
            [
                piece("abc", false),
                piece("de", false),
                piece("", false),
                piece("fg", false),
                piece("h", false)
            ]
        );
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn splitter_cuts_long_lines_into_partials() {
        let mut s = LineSplitter::with_max_line_size(4);
        let out = split_all(&mut s, &[b"abcdefghij\nxy", b"z", b"abcd"]);
        assert_eq!(
            out,
            [
                piece("abcd", true),
                piece("efgh", true),
                piece("ij", false),
                piece("xyza", true),
                piece("bcd", false),
            ]
        );
        // A partial as the very last piece is ended by an empty full one.
        let out = split_all(&mut s, &[b"ab", b"cd"]);
        assert_eq!(out, [piece("abcd", true), piece("", false)]);
        // Whatever the chunking, pieces are bounded and reassemble to the lines.
        let data: Vec<u8> = (0..200u8)
            .map(|i| if i % 37 == 0 { b'\n' } else { b'a' + i % 26 })
            .collect();
        for size in [1, 3, 7, 64, 200] {
            let chunks: Vec<&[u8]> = data.chunks(size).collect();
            let out = split_all(&mut s, &chunks);
            let mut joined = Vec::new();
            for (content, partial) in &out {
                assert!(content.len() <= 4);
                joined.extend_from_slice(content);
                if !partial {
                    joined.push(b'\n');
                }
            }
            let mut expected = data.clone();
            expected.push(b'\n');
            assert_eq!(joined, expected, "chunk size {size}");
        }
    }

    #[test]
    fn splitter_uses_the_real_max_line_size() {
        let mut s = LineSplitter::new();
        let mut data = vec![b'x'; MAX_LINE_SIZE * 2 + 5];
        data.push(b'\n');
        let out = split_all(&mut s, &[&data[..100], &data[100..]]);
        let shape: Vec<(usize, bool)> = out.iter().map(|(c, p)| (c.len(), *p)).collect();
        assert_eq!(
            shape,
            [(MAX_LINE_SIZE, true), (MAX_LINE_SIZE, true), (5, false)]
        );
    }

    #[tokio::test]
    async fn rotation_keeps_max_files_and_drops_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        // Left over from a larger max_files: must go at the first rotation.
        fs::write(rotated_path(dir.path(), 7), b"").unwrap();
        let mut w = LogWriter::open(dir.path(), small(3)).unwrap();
        write_lines(&mut w, 0..500);
        let expected: BTreeSet<String> = ["container.log", "container.log.1", "container.log.2"]
            .map(String::from)
            .into();
        assert_eq!(names(dir.path()), expected);
        for name in &expected {
            assert!(fs::metadata(dir.path().join(name)).unwrap().len() <= MIN_MAX_SIZE);
        }
        let got = numbers(&read_all(dir.path(), ReadOptions::default()).await);
        let first = got[0];
        assert!(first > 0, "the oldest lines were dropped");
        assert_eq!(got, (first..500).collect::<Vec<_>>());
        // The oldest file holds the oldest of what is left.
        let oldest = fs::read(rotated_path(dir.path(), 2)).unwrap();
        let oldest = parse_line(oldest.split(|&b| b == b'\n').next().unwrap()).unwrap();
        assert_eq!(numbers(&[oldest]), [first]);
    }

    #[tokio::test]
    async fn rotation_with_one_file_keeps_only_the_current_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path(), small(1)).unwrap();
        write_lines(&mut w, 0..200);
        assert_eq!(
            names(dir.path()),
            BTreeSet::from(["container.log".to_owned()])
        );
        let got = numbers(&read_all(dir.path(), ReadOptions::default()).await);
        assert_eq!(got.last(), Some(&199));
        assert!(got[0] > 0);
    }

    #[tokio::test]
    async fn tail_spans_rotated_files_and_reads_only_what_it_needs() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path(), small(5)).unwrap();
        write_lines(&mut w, 0..300);
        let per_file = fs::read(dir.path().join(LOG_FILE_NAME))
            .unwrap()
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        let n = per_file + 20;
        let tail = |n| ReadOptions {
            tail: Some(n),
            ..ReadOptions::default()
        };
        let got = numbers(&read_all(dir.path(), tail(n)).await);
        assert_eq!(got, (300 - n..300).collect::<Vec<_>>());
        assert_eq!(plan(dir.path(), &tail(n)).unwrap().len(), 2);
        assert_eq!(plan(dir.path(), &tail(3)).unwrap().len(), 1);
        assert!(read_all(dir.path(), tail(0)).await.is_empty());
        let all = numbers(&read_all(dir.path(), tail(100_000)).await);
        assert_eq!(
            all,
            numbers(&read_all(dir.path(), ReadOptions::default()).await)
        );
        assert_eq!(all.last(), Some(&299));
    }

    #[tokio::test]
    async fn since_filters_before_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path(), small(5)).unwrap();
        for i in 0..10 {
            w.write_entry(Stream::Stdout, at(i as u64), &line(i), false)
                .unwrap();
        }
        let since = |tail| ReadOptions {
            tail,
            since: Some(at(5)),
            follow: false,
        };
        assert_eq!(
            numbers(&read_all(dir.path(), since(None)).await),
            [5, 6, 7, 8, 9]
        );
        assert_eq!(numbers(&read_all(dir.path(), since(Some(2))).await), [8, 9]);
        assert_eq!(
            numbers(&read_all(dir.path(), since(Some(50))).await),
            [5, 6, 7, 8, 9]
        );
    }

    #[tokio::test]
    async fn malformed_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let good = |i: usize| format!("2026-11-28T05:26:5{i}Z stdout F line {i:06}\n");
        let mut text = String::new();
        text += &good(0);
        text += "garbage\n\n";
        text += &good(1);
        text += "2026-11-28T05:26:57Z stdin F nope\n";
        text += &format!(
            "2026-11-28T05:26:57Z stdout F {}\n",
            "x".repeat(MAX_READ_LINE)
        );
        text += &good(2);
        text += "2026-11-28T05:26:57Z std";
        fs::write(rotated_path(dir.path(), 1), text.as_bytes()).unwrap();
        fs::write(
            dir.path().join(LOG_FILE_NAME),
            format!("oops\n{}junk\n", good(3)),
        )
        .unwrap();
        let got = numbers(&read_all(dir.path(), ReadOptions::default()).await);
        assert_eq!(got, [0, 1, 2, 3]);
        let tail = ReadOptions {
            tail: Some(3),
            ..ReadOptions::default()
        };
        assert_eq!(numbers(&read_all(dir.path(), tail).await), [1, 2, 3]);
    }

    #[tokio::test]
    async fn reader_rejects_a_missing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let err = LogReader::open(&dir.path().join("nope"), ReadOptions::default()).unwrap_err();
        assert!(matches!(err, LogError::Io { .. }));
        assert!(
            err.to_string().starts_with("cannot open log directory "),
            "{err}"
        );
    }

    #[tokio::test]
    async fn follow_sees_new_lines() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path(), LogConfig::default()).unwrap();
        write_lines(&mut w, 0..3);
        let opts = ReadOptions {
            tail: Some(2),
            since: None,
            follow: true,
        };
        let mut reader = LogReader::open(dir.path(), opts).unwrap();
        assert_eq!(numbers(&[next_entry(&mut reader).await]), [1]);
        assert_eq!(numbers(&[next_entry(&mut reader).await]), [2]);
        // Nothing new yet: the reader waits.
        let waited = tokio::time::timeout(Duration::from_millis(300), reader.next()).await;
        assert!(waited.is_err());
        write_lines(&mut w, 3..5);
        assert_eq!(numbers(&[next_entry(&mut reader).await]), [3]);
        assert_eq!(numbers(&[next_entry(&mut reader).await]), [4]);
    }

    /// Writes `count` lines from a blocking thread, rotating often.
    fn spawn_writer(dir: &Path, count: usize) -> tokio::task::JoinHandle<()> {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || {
            // Enough files that none is rotated away before the reader gets to it.
            let mut w = LogWriter::open(&dir, small(1000)).unwrap();
            for i in 0..count {
                write_lines(&mut w, i..i + 1);
                // Pacing, not synchronisation: lets rotations happen both while the reader
                // reads and while it sleeps between polls.
                if i % 50 == 49 {
                    std::thread::sleep(Duration::from_millis(3));
                }
            }
        })
    }

    #[tokio::test]
    async fn follow_across_rotations_loses_and_repeats_nothing() {
        let dir = tempfile::tempdir().unwrap();
        // Started before the writer created anything.
        let mut reader = LogReader::open(dir.path(), follow_opts()).unwrap();
        let writer = spawn_writer(dir.path(), 2000);
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), async {
            while got.len() < 2000 {
                got.push(reader.next().await.unwrap().unwrap());
            }
        })
        .await
        .unwrap();
        writer.await.unwrap();
        assert!(
            names(dir.path()).len() > 20,
            "the writer rotated many times"
        );
        assert_eq!(numbers(&got), (0..2000).collect::<Vec<_>>());
        reader.stop_following();
        assert!(
            tokio::time::timeout(TIMEOUT, reader.next())
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn next_is_cancel_safe() {
        let dir = tempfile::tempdir().unwrap();
        let mut reader = LogReader::open(dir.path(), follow_opts()).unwrap();
        let writer = spawn_writer(dir.path(), 600);
        let mut got = Vec::new();
        let mut cancelled = 0;
        tokio::time::timeout(Duration::from_secs(60), async {
            while got.len() < 600 {
                tokio::select! {
                    entry = reader.next() => got.push(entry.unwrap().unwrap()),
                    _ = tokio::time::sleep(Duration::from_micros(200)) => cancelled += 1,
                }
            }
        })
        .await
        .unwrap();
        writer.await.unwrap();
        assert!(cancelled > 0);
        assert_eq!(numbers(&got), (0..600).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn stop_following_drains_then_ends() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path(), small(100)).unwrap();
        write_lines(&mut w, 0..10);
        let mut reader = LogReader::open(dir.path(), follow_opts()).unwrap();
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(next_entry(&mut reader).await);
        }
        // Several rotations after the reader opened its files.
        write_lines(&mut w, 10..300);
        reader.stop_following();
        tokio::time::timeout(TIMEOUT, async {
            while let Some(entry) = reader.next().await {
                got.push(entry.unwrap());
            }
        })
        .await
        .unwrap();
        assert_eq!(numbers(&got), (0..300).collect::<Vec<_>>());
        assert!(reader.next().await.is_none());

        // With nothing written at all, stopping ends the reader at once.
        let empty = tempfile::tempdir().unwrap();
        let mut reader = LogReader::open(empty.path(), follow_opts()).unwrap();
        reader.stop_following();
        assert!(
            tokio::time::timeout(TIMEOUT, reader.next())
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn rotation_seen_right_after_end_of_file_still_drains_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path(), small(100)).unwrap();
        write_lines(&mut w, 0..3);
        let mut reader = LogReader::open(dir.path(), follow_opts()).unwrap();
        for _ in 0..3 {
            next_entry(&mut reader).await;
        }
        // The reader has found the end of container.log; now the writer appends to it and
        // rotates before the reader looks again, which it does by checking for a rotation.
        write_lines(&mut w, 3..100);
        assert!(rotated_path(dir.path(), 1).exists());
        assert!(reader.follow_rotation().await.unwrap());
        reader.stop_following();
        let mut got = Vec::new();
        while let Some(entry) = tokio::time::timeout(TIMEOUT, reader.next()).await.unwrap() {
            got.push(entry.unwrap());
        }
        assert_eq!(numbers(&got), (3..100).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_follower_outrun_by_rotation_skips_ahead_without_repeating() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path(), small(2)).unwrap();
        write_lines(&mut w, 0..3);
        let mut reader = LogReader::open(dir.path(), follow_opts()).unwrap();
        for _ in 0..3 {
            next_entry(&mut reader).await;
        }
        // Many rotations with two files kept: the files after the reader's are gone.
        write_lines(&mut w, 3..400);
        reader.stop_following();
        let mut got = Vec::new();
        while let Some(entry) = tokio::time::timeout(TIMEOUT, reader.next()).await.unwrap() {
            got.push(entry.unwrap());
        }
        let got = numbers(&got);
        assert!(got.len() < 397, "lines in dropped files cannot be read");
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "in order, no repeats: {got:?}"
        );
        assert_eq!(got.first(), Some(&3), "the reader's own file is drained");
        assert_eq!(got.last(), Some(&399));
        let current = read_all(dir.path(), ReadOptions::default()).await;
        assert!(got.ends_with(&numbers(&current)));
    }

    /// Numbers of the first and last complete lines among the first `len` bytes of `file`.
    fn first_and_last(file: &File, len: u64) -> Option<(usize, usize)> {
        let mut data = vec![0; usize::try_from(len).unwrap()];
        file.read_exact_at(&mut data, 0).unwrap();
        let lines: Vec<LogEntry> = data
            .split_inclusive(|&b| b == b'\n')
            .filter(|l| l.ends_with(b"\n"))
            .map(|l| parse_line(l).unwrap())
            .collect();
        let n = numbers(&lines);
        Some((*n.first()?, *n.last()?))
    }

    #[test]
    fn scan_during_rotations_sees_a_consistent_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let writer = std::thread::spawn(move || {
            let mut w = LogWriter::open(&path, small(20)).unwrap();
            for i in 0..20_000 {
                write_lines(&mut w, i..i + 1);
                // Pacing, so that some scans complete between rotations.
                if i % 20 == 0 {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        });
        let mut checked = 0;
        while !writer.is_finished() {
            let chain = scan_chain(dir.path()).unwrap();
            if chain.current.is_none() {
                continue;
            }
            // Newest first, and each file starts right after where the next older one ends:
            // nothing skipped, repeated or out of order.
            let ranges: Vec<Option<(usize, usize)>> = chain
                .files
                .iter()
                .map(|f| first_and_last(&f.file, f.len))
                .collect();
            for pair in ranges.windows(2) {
                if let [Some((newer_first, _)), Some((_, older_last))] = pair {
                    assert_eq!(older_last + 1, *newer_first, "{ranges:?}");
                }
            }
            checked += 1;
        }
        writer.join().unwrap();
        assert!(checked > 10, "only {checked} scans checked");
    }

    #[test]
    fn reader_can_be_driven_from_a_spawned_task() {
        fn assert_send<T: Send>(_: &T) {}
        let dir = tempfile::tempdir().unwrap();
        let mut reader = LogReader::open(dir.path(), follow_opts()).unwrap();
        assert_send(&reader.next());
    }

    fn follow_opts() -> ReadOptions {
        ReadOptions {
            follow: true,
            ..ReadOptions::default()
        }
    }
}
