//! The instance names every node session hands its agent: per workload, the addresses of its
//! Ready instances, which each node's name responder answers as `<workload>.gantry.`.
//!
//! One [`NameTable`] per process is rebuilt from the [`Cache`] at most once per
//! [`NAMES_COALESCE`], and only for the workloads whose Ready addresses changed
//! ([`Cache::take_endpoint_changes`]): a status write that does not change an address costs
//! nothing, and one that does costs the instances of its workload. Each version logs which
//! workloads it changed, so a session sends its agent the complete table once and then only
//! what changed since its last `names` message (the complete table again when it fell more than
//! [`KEPT_VERSIONS`](crate::changelog::KEPT_VERSIONS) versions behind). A message is encoded once per (version, starting point) and
//! shared by every session at that point: N sessions cost one encoding per change, not N.
//!
//! An instance has a name while its record exists without a stop request and its status is
//! Ready with an address ([`crate::cache::endpoint`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gantry::pb;
use tokio::sync::watch;

use crate::cache::{Cache, EndpointChanges, View, endpoint};
use crate::changelog::ChangeLog;

/// Address changes within this window go out in one `names` message.
pub const NAMES_COALESCE: Duration = Duration::from_secs(1);

/// Every workload's Ready addresses, with a log of which workloads each version changed.
#[derive(Debug, Default)]
pub struct NameTable {
    /// Whether the table was built from a view at least once.
    built: bool,
    /// Workload → its Ready instances' addresses, sorted (workloads without any are absent).
    workloads: BTreeMap<String, Vec<String>>,
    /// The version, and which workloads each recent version changed.
    log: ChangeLog,
    /// Messages of the current version, by the version they start from (`None`: complete).
    encoded: HashMap<Option<u64>, Arc<SharedNames>>,
}

/// The content of one `names` message, encoded for every session it goes to.
#[derive(Debug, PartialEq)]
pub struct SharedNames {
    /// Whether the message is a delta.
    pub delta: bool,
    /// An encoded `NameEntries`.
    pub workloads: prost::bytes::Bytes,
    /// Workloads without addresses any more (deltas only).
    pub removed: Vec<String>,
}

impl SharedNames {
    /// Whether the message changes nothing (a delta with no entries).
    pub fn is_empty(&self) -> bool {
        self.delta && self.workloads.is_empty() && self.removed.is_empty()
    }

    /// The wire form.
    pub fn to_pb(&self) -> pb::NameTable {
        pb::NameTable {
            delta: self.delta,
            workloads: self.workloads.clone(),
            removed: self.removed.clone(),
        }
    }
}

/// The addresses of `workload`'s Ready instances in `view`, sorted (as addresses, not text)
/// and without duplicates.
pub fn addresses(view: &View, workload: &str) -> Vec<String> {
    let mut found: Vec<(Option<IpAddr>, &str)> = view
        .instances
        .get(workload)
        .into_iter()
        .flatten()
        .filter(|(_, record)| record.value.stop_requested_at.is_none())
        .filter_map(|(id, _)| endpoint(view.statuses.get(id)?))
        .map(|ip| (ip.parse().ok(), ip))
        .collect();
    found.sort();
    found.dedup();
    found.into_iter().map(|(_, ip)| ip.to_owned()).collect()
}

impl NameTable {
    /// The current version (0 before anything was found).
    pub fn version(&self) -> u64 {
        self.log.version()
    }

    /// Whether the table was built at least once.
    pub fn is_built(&self) -> bool {
        self.built
    }

    /// The addresses of `workload`, if it has any.
    pub fn get(&self, workload: &str) -> Option<&[String]> {
        self.workloads.get(workload).map(Vec::as_slice)
    }

    /// Brings the table up to `view` for the workloads in `changes` (every workload when the
    /// table was never built or `changes.all`).
    pub fn refresh(&mut self, view: &View, changes: EndpointChanges) {
        let candidates: BTreeSet<String> = if changes.all || !self.built {
            view.instances
                .keys()
                .chain(self.workloads.keys())
                .cloned()
                .collect()
        } else {
            changes.workloads
        };
        self.built = true;
        let mut changed = Vec::new();
        for workload in candidates {
            let now = addresses(view, &workload);
            if self
                .workloads
                .get(&workload)
                .map_or(now.is_empty(), |was| *was == now)
            {
                continue;
            }
            if now.is_empty() {
                self.workloads.remove(&workload);
            } else {
                self.workloads.insert(workload.clone(), now);
            }
            changed.push(workload);
        }
        if changed.is_empty() {
            return;
        }
        self.encoded.clear();
        self.log.record(changed);
    }

    /// The message taking a session from version `since` (`None`: nothing sent yet) to the
    /// current version; encoded at most once per starting point.
    pub fn message(&mut self, since: Option<u64>) -> Arc<SharedNames> {
        let changes = since.and_then(|since| self.log.changes_since(since));
        let key = changes.is_some().then_some(since).flatten();
        if let Some(shared) = self.encoded.get(&key) {
            return shared.clone();
        }
        let entry = |workload: &str, addresses: &[String]| pb::WorkloadAddresses {
            workload: workload.to_owned(),
            addresses: addresses.to_vec(),
        };
        let (entries, removed) = match &changes {
            Some(changes) => {
                let mut entries = Vec::new();
                let mut removed = Vec::new();
                for &workload in changes {
                    match self.workloads.get(workload) {
                        Some(addresses) => entries.push(entry(workload, addresses)),
                        None => removed.push(workload.to_owned()),
                    }
                }
                (entries, removed)
            }
            None => (
                self.workloads
                    .iter()
                    .map(|(workload, addresses)| entry(workload, addresses))
                    .collect(),
                Vec::new(),
            ),
        };
        let workloads = if entries.is_empty() {
            prost::bytes::Bytes::new()
        } else {
            prost::Message::encode_to_vec(&pb::NameEntries { workloads: entries }).into()
        };
        let shared = Arc::new(SharedNames {
            delta: key.is_some(),
            workloads,
            removed,
        });
        self.encoded.insert(key, shared.clone());
        shared
    }
}

/// Rebuilds `table` from the cache whenever Ready addresses change, at most once per
/// [`NAMES_COALESCE`], and publishes its version to `tx` until every receiver is gone.
pub async fn maintain(cache: Cache, table: Arc<Mutex<NameTable>>, tx: watch::Sender<u64>) {
    let mut endpoints = cache.endpoints();
    loop {
        endpoints.mark_unchanged();
        {
            let changes = cache.take_endpoint_changes();
            let mut table = table.lock().expect("name table lock");
            table.refresh(&cache.read(), changes);
            let version = table.version();
            tx.send_if_modified(|v| std::mem::replace(v, version) != version);
        }
        tokio::select! {
            changed = endpoints.changed() => if changed.is_err() { return },
            () = tx.closed() => return,
        }
        tokio::time::sleep(NAMES_COALESCE).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Versioned;
    use crate::model::{InstanceRecord, InstanceState, InstanceStatus, Timestamp};

    /// A view builder: instances with their state and address.
    #[derive(Default)]
    struct Cluster {
        view: View,
    }

    impl Cluster {
        fn put(&mut self, workload: &str, id: &str, state: InstanceState, ip: &str) -> &mut Self {
            let record = InstanceRecord {
                id: id.into(),
                workload: workload.into(),
                generation: 1,
                node: Some("n1".into()),
                created_at: Timestamp(0),
                scheduled_at: None,
                placement_failures: Vec::new(),
                stop_requested_at: None,
            };
            self.view
                .instances
                .entry(workload.into())
                .or_default()
                .insert(
                    id.into(),
                    Versioned {
                        value: record,
                        mod_revision: 1,
                    },
                );
            let status = InstanceStatus {
                state,
                ip: ip.into(),
                ..InstanceStatus::default()
            };
            self.view.statuses.insert(id.into(), status);
            self
        }

        fn stop(&mut self, workload: &str, id: &str) -> &mut Self {
            let record = self
                .view
                .instances
                .get_mut(workload)
                .and_then(|ids| ids.get_mut(id))
                .unwrap();
            record.value.stop_requested_at = Some(Timestamp(1));
            self
        }

        fn delete(&mut self, workload: &str, id: &str) -> &mut Self {
            let ids = self.view.instances.get_mut(workload).unwrap();
            ids.remove(id);
            if ids.is_empty() {
                self.view.instances.remove(workload);
            }
            self.view.statuses.remove(id);
            self
        }
    }

    fn changed(workloads: &[&str]) -> EndpointChanges {
        EndpointChanges {
            workloads: workloads.iter().map(|w| (*w).to_owned()).collect(),
            all: false,
        }
    }

    fn decode(shared: &SharedNames) -> Vec<(String, Vec<String>)> {
        <pb::NameEntries as prost::Message>::decode(shared.workloads.clone())
            .unwrap()
            .workloads
            .into_iter()
            .map(|w| (w.workload, w.addresses))
            .collect()
    }

    fn entry(workload: &str, addresses: &[&str]) -> (String, Vec<String>) {
        (
            workload.to_owned(),
            addresses.iter().map(|a| (*a).to_owned()).collect(),
        )
    }

    #[test]
    fn only_ready_instances_with_an_address_and_no_stop_request_have_names() {
        let mut c = Cluster::default();
        c.put("web", "web-1", InstanceState::Ready, "10.88.0.10")
            .put("web", "web-2", InstanceState::Ready, "10.88.0.9")
            .put("web", "web-3", InstanceState::Running, "10.88.0.11")
            .put("web", "web-4", InstanceState::Ready, "")
            .put("web", "web-5", InstanceState::Ready, "10.88.1.2")
            .stop("web", "web-5")
            .put("db", "db-1", InstanceState::Starting, "10.88.0.12");
        // Sorted as addresses: .9 before .10.
        assert_eq!(addresses(&c.view, "web"), ["10.88.0.9", "10.88.0.10"]);
        assert!(addresses(&c.view, "db").is_empty());
        assert!(addresses(&c.view, "nope").is_empty());
    }

    #[test]
    fn the_table_logs_which_workloads_changed_and_sends_deltas() {
        let mut c = Cluster::default();
        c.put("web", "web-1", InstanceState::Ready, "10.88.0.2")
            .put("db", "db-1", InstanceState::Ready, "10.88.1.2");
        let mut table = NameTable::default();
        table.refresh(&c.view, EndpointChanges::default());
        assert_eq!(table.version(), 1);
        let full = table.message(None);
        assert!(!full.delta);
        assert_eq!(
            decode(&full),
            [entry("db", &["10.88.1.2"]), entry("web", &["10.88.0.2"])]
        );
        // Encoded once per starting point.
        assert!(Arc::ptr_eq(&full, &table.message(None)));
        assert!(table.message(Some(1)).is_empty());

        // A second web instance becomes Ready; db's only one stops being Ready.
        c.put("web", "web-2", InstanceState::Ready, "10.88.1.3")
            .put("db", "db-1", InstanceState::Running, "10.88.1.2");
        table.refresh(&c.view, changed(&["web", "db"]));
        assert_eq!(table.version(), 2);
        let delta = table.message(Some(1));
        assert!(delta.delta);
        assert_eq!(decode(&delta), [entry("web", &["10.88.0.2", "10.88.1.3"])]);
        assert_eq!(delta.removed, ["db"]);
        assert_eq!(table.get("db"), None);

        // A change that changes no address is no new version.
        table.refresh(&c.view, changed(&["web", "other"]));
        assert_eq!(table.version(), 2);

        // Deleting the workload's instances removes its name.
        c.delete("web", "web-1").delete("web", "web-2");
        table.refresh(&c.view, changed(&["web"]));
        assert_eq!(table.version(), 3);
        let from_2 = table.message(Some(2));
        assert_eq!(from_2.removed, ["web"]);
        assert!(from_2.workloads.is_empty());
        // From version 1: both workloads changed, both are gone now.
        assert_eq!(table.message(Some(1)).removed, ["db", "web"]);
        // The complete table is empty.
        let full = table.message(None);
        assert!(!full.delta && !full.is_empty() && decode(&full).is_empty());
    }

    #[test]
    fn sessions_too_far_behind_get_the_complete_table() {
        let mut c = Cluster::default();
        let mut table = NameTable::default();
        table.refresh(&c.view, EndpointChanges::default());
        for n in 0..(crate::changelog::KEPT_VERSIONS as u32 + 3) {
            c.put(
                "web",
                "web-1",
                InstanceState::Ready,
                &format!("10.88.0.{}", n % 200 + 2),
            );
            table.refresh(&c.view, changed(&["web"]));
        }
        assert_eq!(table.version(), crate::changelog::KEPT_VERSIONS as u64 + 3);
        assert!(!table.message(Some(1)).delta, "the log does not reach back");
        assert!(table.message(Some(table.version() - 1)).delta);
        // A version from the future (another replica's table) gets the complete table too.
        assert!(!table.message(Some(table.version() + 5)).delta);
    }

    #[test]
    fn a_relisted_view_is_compared_in_full() {
        let mut c = Cluster::default();
        c.put("web", "web-1", InstanceState::Ready, "10.88.0.2");
        let mut table = NameTable::default();
        table.refresh(&c.view, EndpointChanges::default());
        c.delete("web", "web-1")
            .put("api", "api-1", InstanceState::Ready, "10.88.0.3");
        table.refresh(
            &c.view,
            EndpointChanges {
                workloads: BTreeSet::new(),
                all: true,
            },
        );
        assert_eq!(table.get("web"), None);
        assert_eq!(table.get("api"), Some(&["10.88.0.3".to_owned()][..]));
        let delta = table.message(Some(1));
        assert_eq!(decode(&delta), [entry("api", &["10.88.0.3"])]);
        assert_eq!(delta.removed, ["web"]);
    }
}
