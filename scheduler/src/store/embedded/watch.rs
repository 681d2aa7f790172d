//! Watches over the embedded store's commit log plus its live broadcast of commits.
//!
//! # Why there is no gap and no duplicate
//!
//! A watcher tracks `next`, the next revision it owes its consumer, and only ever moves it
//! forward by one revision at a time (or by a log read that covers a whole range).
//!
//! 1. It subscribes to the broadcast *before* reading the current revision `R` from the
//!    database. Writers publish after commit, under the writer lock, in revision order, so
//!    every revision `> R` reaches the subscription, and every revision `<= R` is in the log.
//! 2. Catch-up reads the log from `next` up to the current revision in chunks, each chunk in
//!    one read transaction, then switches to live.
//! 3. Live, a batch below `next` was already read from the log and is skipped; the batch at
//!    `next` is delivered; a batch above `next`, or a `Lagged` notice (the watcher fell more
//!    than the channel's capacity behind), sends the watcher back to catch-up, which
//!    re-reads the missing revisions from the log. The log, not the channel, is the truth.
//!
//! If compaction overtakes a watcher in catch-up, it ends with [`StoreError::Compacted`].

use std::collections::VecDeque;
use std::sync::{Arc, Weak};

use redb::ReadableDatabase;
use tokio::sync::broadcast::{self, error::RecvError};

use super::codec::decode_events;
use super::{Batch, Inner, LOG, META, META_COMPACT, META_REVISION, blocking, db_error, read_meta};
use crate::store::{Event, Result, Revision, StoreError, WatchStream};

/// How many revisions one catch-up step reads in one read transaction.
const CATCH_UP_REVISIONS: i64 = 256;

/// Starts a watch of `prefix` from revision `from` (0: after the current revision).
pub(super) async fn watch(
    inner: &Arc<Inner>,
    prefix: Vec<u8>,
    from: Revision,
) -> Result<WatchStream> {
    if from < 0 {
        return Err(StoreError::InvalidArgument {
            reason: format!("watch from revision {from}: revisions start at 1"),
        });
    }
    // Subscribe first: see the module docs.
    let live = inner.events.subscribe();
    let (current, compacted) = blocking(inner.clone(), "watch", |i| i.revisions()).await?;
    if from > 0 && from < compacted {
        return Err(StoreError::Compacted {
            requested: from,
            compacted,
        });
    }
    let watcher = Watcher {
        store: Arc::downgrade(inner),
        prefix,
        next: if from == 0 { current + 1 } else { from },
        live,
        catching_up: true,
        pending: VecDeque::new(),
        done: false,
    };
    Ok(WatchStream::new(futures::stream::unfold(
        watcher,
        |mut watcher| async move {
            let item = watcher.next_event().await?;
            Some((item, watcher))
        },
    )))
}

/// The state of one watch stream.
struct Watcher {
    /// Weak so that an open watch does not keep the database open.
    store: Weak<Inner>,
    prefix: Vec<u8>,
    /// The next revision this watcher has not yet looked at.
    next: Revision,
    live: broadcast::Receiver<Arc<Batch>>,
    /// Whether revisions before the live position must be read from the log.
    catching_up: bool,
    /// Events read but not yet handed out.
    pending: VecDeque<Event>,
    /// Set after the last item (an error) was handed out.
    done: bool,
}

/// One catch-up read: the matching events of revisions `[next, upto]`.
struct LogChunk {
    events: Vec<Event>,
    upto: Revision,
    current: Revision,
}

impl Watcher {
    async fn next_event(&mut self) -> Option<Result<Event>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(Ok(event));
            }
            if self.done {
                return None;
            }
            let step = if self.catching_up {
                self.catch_up().await
            } else {
                self.receive().await
            };
            if let Err(err) = step {
                self.done = true;
                return Some(Err(err));
            }
        }
    }

    async fn catch_up(&mut self) -> Result<()> {
        let inner = self.store.upgrade().ok_or(StoreError::Closed)?;
        let next = self.next;
        let prefix = self.prefix.clone();
        let chunk = blocking(inner, "watch", move |i| read_log(i, &prefix, next)).await?;
        self.pending.extend(chunk.events);
        self.next = chunk.upto + 1;
        if self.next > chunk.current {
            self.catching_up = false;
        }
        Ok(())
    }

    async fn receive(&mut self) -> Result<()> {
        match self.live.recv().await {
            Ok(batch) if batch.revision < self.next => {}
            Ok(batch) if batch.revision == self.next => {
                self.pending.extend(
                    batch
                        .events
                        .iter()
                        .filter(|e| e.kv.key.starts_with(&self.prefix))
                        .cloned(),
                );
                self.next += 1;
            }
            Ok(_) | Err(RecvError::Lagged(_)) => self.catching_up = true,
            Err(RecvError::Closed) => return Err(StoreError::Closed),
        }
        Ok(())
    }
}

/// Reads up to [`CATCH_UP_REVISIONS`] revisions of the log from `next`, in one snapshot.
fn read_log(inner: &Inner, prefix: &[u8], next: Revision) -> Result<LogChunk> {
    const OP: &str = "watch";
    let rtx = inner.db.begin_read().map_err(db_error(OP))?;
    let meta = rtx.open_table(META).map_err(db_error(OP))?;
    let current = read_meta(&meta, META_REVISION)?;
    let compacted = read_meta(&meta, META_COMPACT)?;
    if next < compacted {
        return Err(StoreError::Compacted {
            requested: next,
            compacted,
        });
    }
    let upto = current.min(next.saturating_add(CATCH_UP_REVISIONS - 1));
    let mut events = Vec::new();
    if upto >= next {
        let log = rtx.open_table(LOG).map_err(db_error(OP))?;
        for entry in log.range(next..=upto).map_err(db_error(OP))? {
            let (revision, bytes) = entry.map_err(db_error(OP))?;
            events.extend(
                decode_events(revision.value(), bytes.value())?
                    .into_iter()
                    .filter(|e| e.kv.key.starts_with(prefix)),
            );
        }
    }
    Ok(LogChunk {
        events,
        upto: upto.max(next - 1),
        current,
    })
}
