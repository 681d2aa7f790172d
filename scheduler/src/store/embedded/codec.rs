//! Byte layouts of the embedded store's rows: key records and commit-log entries.
//!
//! Each encoding starts with a format byte so that a later layout can be told apart.
//! Integers are little-endian; lease 0 means "no lease" (lease ids start at 1).

use crate::store::{Event, EventKind, KeyValue, LeaseId, Result, Revision, StoreError};

/// Format byte of a key record.
const KV_FORMAT: u8 = 1;
/// Format byte of a commit-log entry.
const LOG_FORMAT: u8 = 1;
const KIND_PUT: u8 = 0;
const KIND_DELETE: u8 = 1;

/// Encodes everything of `kv` but its key (the table key): format, create, mod, version,
/// lease, then the value bytes to the end.
pub(super) fn encode_kv(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(33 + kv.value.len());
    out.push(KV_FORMAT);
    out.extend_from_slice(&kv.create_revision.to_le_bytes());
    out.extend_from_slice(&kv.mod_revision.to_le_bytes());
    out.extend_from_slice(&kv.version.to_le_bytes());
    out.extend_from_slice(&kv.lease.map_or(0, |l| l.0).to_le_bytes());
    out.extend_from_slice(&kv.value);
    out
}

/// Decodes a key record written by [`encode_kv`].
pub(super) fn decode_kv(key: &[u8], bytes: &[u8]) -> Result<KeyValue> {
    let mut r = Reader::new(bytes, || {
        format!("record of key {}", String::from_utf8_lossy(key))
    });
    r.format(KV_FORMAT)?;
    let create_revision = r.i64()?;
    let mod_revision = r.i64()?;
    let version = r.i64()?;
    let lease = r.i64()?;
    Ok(KeyValue {
        key: key.to_vec(),
        value: r.rest().to_vec(),
        create_revision,
        mod_revision,
        version,
        lease: (lease != 0).then_some(LeaseId(lease)),
    })
}

/// Encodes the events of one revision, in order. A put stores its new record, a delete
/// only its key (its `mod_revision` is the entry's revision); both store `prev`.
pub(super) fn encode_events(events: &[Event]) -> Result<Vec<u8>> {
    let mut out = vec![LOG_FORMAT];
    put_len(&mut out, events.len())?;
    for event in events {
        match event.kind {
            EventKind::Put => {
                out.push(KIND_PUT);
                put_bytes(&mut out, &event.kv.key)?;
                put_bytes(&mut out, &encode_kv(&event.kv))?;
            }
            EventKind::Delete => {
                out.push(KIND_DELETE);
                put_bytes(&mut out, &event.kv.key)?;
            }
        }
        match &event.prev {
            None => out.push(0),
            Some(prev) => {
                out.push(1);
                put_bytes(&mut out, &encode_kv(prev))?;
            }
        }
    }
    Ok(out)
}

/// Decodes the events of log entry `revision` written by [`encode_events`].
pub(super) fn decode_events(revision: Revision, bytes: &[u8]) -> Result<Vec<Event>> {
    let mut r = Reader::new(bytes, || format!("log entry of revision {revision}"));
    r.format(LOG_FORMAT)?;
    let count = r.len()?;
    let mut events = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        let kind = r.u8()?;
        let key = r.bytes()?;
        let (kind, kv) = match kind {
            KIND_PUT => (EventKind::Put, decode_kv(key, r.bytes()?)?),
            KIND_DELETE => (
                EventKind::Delete,
                KeyValue {
                    key: key.to_vec(),
                    value: Vec::new(),
                    create_revision: 0,
                    mod_revision: revision,
                    version: 0,
                    lease: None,
                },
            ),
            other => return Err(r.corrupt(&format!("unknown event kind {other}"))),
        };
        let prev = match r.u8()? {
            0 => None,
            1 => Some(decode_kv(key, r.bytes()?)?),
            other => return Err(r.corrupt(&format!("bad prev flag {other}"))),
        };
        events.push(Event { kind, kv, prev });
    }
    if !r.rest().is_empty() {
        return Err(r.corrupt("trailing bytes"));
    }
    Ok(events)
}

fn put_len(out: &mut Vec<u8>, len: usize) -> Result<()> {
    let len = u32::try_from(len).map_err(|_| StoreError::InvalidArgument {
        reason: format!("{len} bytes or items do not fit in one store record"),
    })?;
    out.extend_from_slice(&len.to_le_bytes());
    Ok(())
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) -> Result<()> {
    put_len(out, bytes.len())?;
    out.extend_from_slice(bytes);
    Ok(())
}

/// A bounds-checked cursor whose errors name the record being read.
struct Reader<'a, F: Fn() -> String> {
    bytes: &'a [u8],
    what: F,
}

impl<'a, F: Fn() -> String> Reader<'a, F> {
    fn new(bytes: &'a [u8], what: F) -> Self {
        Self { bytes, what }
    }

    fn corrupt(&self, problem: &str) -> StoreError {
        StoreError::Corrupt {
            detail: format!("{}: {problem}", (self.what)()),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.bytes.len() < n {
            return Err(self.corrupt("truncated"));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn format(&mut self, expected: u8) -> Result<()> {
        let found = self.u8()?;
        if found != expected {
            return Err(self.corrupt(&format!(
                "format {found}, this build reads format {expected}"
            )));
        }
        Ok(())
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn i64(&mut self) -> Result<i64> {
        let mut buf = [0u8; 8];
        buf.copy_from_slice(self.take(8)?);
        Ok(i64::from_le_bytes(buf))
    }

    fn len(&mut self) -> Result<usize> {
        let mut buf = [0u8; 4];
        buf.copy_from_slice(self.take(4)?);
        usize::try_from(u32::from_le_bytes(buf)).map_err(|_| self.corrupt("length overflows"))
    }

    fn bytes(&mut self) -> Result<&'a [u8]> {
        let len = self.len()?;
        self.take(len)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str, rev: Revision, lease: Option<i64>) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.into(),
            create_revision: 2,
            mod_revision: rev,
            version: 3,
            lease: lease.map(LeaseId),
        }
    }

    #[test]
    fn kv_round_trips() {
        for record in [kv("a", "", 5, None), kv("a/b", "value\0bytes", 9, Some(7))] {
            let decoded = decode_kv(&record.key, &encode_kv(&record));
            assert_eq!(decoded.ok(), Some(record));
        }
    }

    #[test]
    fn events_round_trip() -> Result<()> {
        let events = vec![
            Event {
                kind: EventKind::Put,
                kv: kv("a", "1", 9, Some(3)),
                prev: Some(kv("a", "0", 4, None)),
            },
            Event {
                kind: EventKind::Delete,
                kv: KeyValue {
                    key: b"b".to_vec(),
                    value: Vec::new(),
                    create_revision: 0,
                    mod_revision: 9,
                    version: 0,
                    lease: None,
                },
                prev: Some(kv("b", "x", 8, None)),
            },
            Event {
                kind: EventKind::Put,
                kv: kv("c", "new", 9, None),
                prev: None,
            },
        ];
        assert_eq!(decode_events(9, &encode_events(&events)?)?, events);
        Ok(())
    }

    #[test]
    fn damaged_bytes_are_corrupt_not_panics() -> Result<()> {
        let bytes = encode_events(&[Event {
            kind: EventKind::Put,
            kv: kv("a", "1", 9, None),
            prev: None,
        }])?;
        for cut in 0..bytes.len() {
            assert!(matches!(
                decode_events(9, &bytes[..cut]),
                Err(StoreError::Corrupt { .. })
            ));
        }
        let mut wrong_format = bytes.clone();
        wrong_format[0] = 99;
        assert!(matches!(
            decode_events(9, &wrong_format),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(
            decode_kv(b"k", &[KV_FORMAT, 1, 2]),
            Err(StoreError::Corrupt { .. })
        ));
        Ok(())
    }
}
