//! Which keys each version of a table changed, for tables that many node sessions follow
//! (routes, names): a session that sent version `v` sends only what changed since, and the
//! complete table once it falls further behind than the log reaches.

use std::collections::{BTreeSet, VecDeque};

/// Versions a session can catch up on with a delta.
pub const KEPT_VERSIONS: usize = 64;

/// A table's version and the keys each of its last [`KEPT_VERSIONS`] versions changed.
#[derive(Debug, Default)]
pub struct ChangeLog {
    /// One more per change of content (0: nothing recorded yet).
    version: u64,
    /// (version, the keys it changed), oldest first.
    log: VecDeque<(u64, Vec<String>)>,
}

impl ChangeLog {
    /// The current version.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Records a new version changing `keys`; returns it.
    pub fn record(&mut self, keys: Vec<String>) -> u64 {
        self.version += 1;
        self.log.push_back((self.version, keys));
        while self.log.len() > KEPT_VERSIONS {
            self.log.pop_front();
        }
        self.version
    }

    /// The keys changed after version `since`; `None` when the log does not reach back (or
    /// `since` is from the future).
    pub fn changes_since(&self, since: u64) -> Option<BTreeSet<&str>> {
        if since == self.version {
            return Some(BTreeSet::new());
        }
        let oldest = self.log.front()?.0;
        if since + 1 < oldest || since > self.version {
            return None;
        }
        Some(
            self.log
                .iter()
                .filter(|(version, _)| *version > since)
                .flat_map(|(_, keys)| keys.iter().map(String::as_str))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_listed_while_the_log_reaches_back() {
        let mut log = ChangeLog::default();
        assert_eq!(log.changes_since(0), Some(BTreeSet::new()));
        assert_eq!(log.record(vec!["a".into()]), 1);
        assert_eq!(log.record(vec!["b".into(), "a".into()]), 2);
        assert_eq!(log.changes_since(0), Some(["a", "b"].into()));
        assert_eq!(log.changes_since(1), Some(["a", "b"].into()));
        assert_eq!(log.changes_since(2), Some(BTreeSet::new()));
        assert_eq!(log.changes_since(9), None);
        for n in 0..KEPT_VERSIONS {
            log.record(vec![format!("k{n}")]);
        }
        assert_eq!(log.changes_since(1), None);
        assert!(log.changes_since(log.version() - 1).is_some());
    }
}
