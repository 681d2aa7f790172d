//! Instance use cases: list and get, each instance's record (what the controllers want)
//! joined with its status (what its agent reported) and its workload's labels.

use std::collections::{BTreeMap, HashMap};

use super::{
    Cursor, Error, ObjectKind, Page, PageRequest, Result, decode, get_at, get_now, key_suffix,
    paginate, parse_selector, range, workloads_at,
};
use crate::model::{InstanceRecord, InstanceState, InstanceStatus, WorkloadRecord, keys};
use crate::store::{KeyValue, Revision, Store};

/// An instance as the API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceView {
    /// What the controllers want of it.
    pub record: InstanceRecord,
    /// What its agent last reported; `None` before the first report.
    pub status: Option<InstanceStatus>,
    /// Its workload's labels (empty once the workload is gone).
    pub labels: BTreeMap<String, String>,
    /// Store revision of the last write to its record or status.
    pub revision: Revision,
}

impl InstanceView {
    /// The reported state; `Pending` before the first report.
    pub fn state(&self) -> InstanceState {
        self.status.as_ref().map(|s| s.state).unwrap_or_default()
    }
}

/// Which instances [`list_instances`] returns; every filter given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceQuery {
    /// Only instances of this workload.
    pub workload: Option<String>,
    /// Only instances assigned to this node.
    pub node: Option<String>,
    /// Label selector over the instances' (their workload's) labels; empty: all.
    pub selector: String,
    /// Only instances in one of these states; empty: all.
    pub states: Vec<InstanceState>,
}

/// One page of the instances matching `query`, ordered by workload then id, read at one
/// revision.
pub async fn list_instances(
    store: &dyn Store,
    query: &InstanceQuery,
    page: &PageRequest,
) -> Result<Page<InstanceView>> {
    let selector = parse_selector(&query.selector)?;
    let cursor: Cursor = page.cursor()?;
    let (instance_prefix, status_prefix) = match &query.workload {
        Some(w) => (keys::instances_of(w), keys::statuses_of(w)),
        None => (keys::INSTANCES.to_string(), keys::STATUS.to_string()),
    };
    let (instance_kvs, at) = range(store, &instance_prefix, cursor.revision).await?;
    let (status_kvs, _) = range(store, &status_prefix, Some(at)).await?;
    let statuses: HashMap<&str, &KeyValue> = status_kvs
        .iter()
        .filter_map(|kv| Some((key_suffix(kv, keys::STATUS)?, kv)))
        .collect();
    let labels: HashMap<String, BTreeMap<String, String>> =
        workloads_at(store, at, |w| w.spec.labels).await?;
    let mut views = Vec::new();
    for kv in &instance_kvs {
        let record: InstanceRecord = decode(kv)?;
        if query.node.is_some() && record.node != query.node {
            continue;
        }
        let labels = labels.get(&record.workload).cloned().unwrap_or_default();
        if !selector.matches(&labels) {
            continue;
        }
        let suffix = format!("{}/{}", record.workload, record.id);
        let status_kv = statuses.get(suffix.as_str()).copied();
        let status = status_kv.map(decode::<InstanceStatus>).transpose()?;
        let status_revision = status_kv.map_or(0, |kv| kv.mod_revision);
        let view = InstanceView {
            revision: kv.mod_revision.max(status_revision),
            record,
            status,
            labels,
        };
        if query.states.is_empty() || query.states.contains(&view.state()) {
            views.push(view);
        }
    }
    views.sort_by(|a, b| {
        (&a.record.workload, &a.record.id).cmp(&(&b.record.workload, &b.record.id))
    });
    Ok(paginate(
        views,
        |v| format!("{}/{}", v.record.workload, v.record.id),
        &cursor,
        page,
        at,
    ))
}

/// Instance `id`. Ids are `{workload}-{suffix}`: the instance is looked up under the
/// workload named by everything before the last `-`, then, if it is not there, everywhere.
pub async fn get_instance(store: &dyn Store, id: &str) -> Result<InstanceView> {
    let not_found = || Error::not_found(ObjectKind::Instance, id);
    let (found, at) = match id.rsplit_once('-') {
        Some((workload, _)) => get_now(store, &keys::instance(workload, id)).await?,
        None => (None, 0),
    };
    let (kv, at) = match found {
        Some(kv) => (kv, at),
        None => {
            let (kvs, at) = range(store, keys::INSTANCES, None).await?;
            let kv = kvs
                .into_iter()
                .find(|kv| {
                    key_suffix(kv, keys::INSTANCES)
                        .and_then(|s| s.split_once('/'))
                        .is_some_and(|(_, i)| i == id)
                })
                .ok_or_else(not_found)?;
            (kv, at)
        }
    };
    let record: InstanceRecord = decode(&kv)?;
    let status_kv = get_at(store, &keys::status(&record.workload, &record.id), at).await?;
    let status = status_kv.as_ref().map(decode).transpose()?;
    let workload_kv = get_at(store, &keys::workload(&record.workload), at).await?;
    let labels = match workload_kv {
        Some(kv) => decode::<WorkloadRecord>(&kv)?.spec.labels,
        None => BTreeMap::new(),
    };
    Ok(InstanceView {
        revision: kv
            .mod_revision
            .max(status_kv.map_or(0, |kv| kv.mod_revision)),
        record,
        status,
        labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Timestamp;
    use crate::ops::nodes::tests::{instance, put, put_instance};
    use crate::ops::testing::{applied, service, store};

    fn status(state: InstanceState) -> InstanceStatus {
        InstanceStatus {
            generation: 1,
            state,
            observed_at: Timestamp(3),
            ..InstanceStatus::default()
        }
    }

    #[tokio::test]
    async fn instances_join_record_status_and_labels() {
        let s = store().await;
        let st = &*s.store;
        applied(st, service("web", 2), Timestamp(1)).await;
        applied(st, service("web-api", 1), Timestamp(1)).await;
        put_instance(st, "web", "a1", Some("n1")).await;
        put_instance(st, "web", "b2", None).await;
        put_instance(st, "web-api", "c3", Some("n1")).await;
        put(
            st,
            &keys::status("web", "web-a1"),
            &status(InstanceState::Ready),
        )
        .await;

        let all = list_instances(st, &InstanceQuery::default(), &PageRequest::default())
            .await
            .unwrap();
        let ids: Vec<&str> = all.items.iter().map(|i| i.record.id.as_str()).collect();
        assert_eq!(ids, ["web-a1", "web-b2", "web-api-c3"]);
        assert_eq!(all.items[0].state(), InstanceState::Ready);
        assert_eq!(all.items[1].state(), InstanceState::Pending);
        assert_eq!(all.items[0].labels["app"], "web");

        let query = |q: InstanceQuery| async move {
            list_instances(st, &q, &PageRequest::default())
                .await
                .unwrap()
                .items
                .into_iter()
                .map(|i| i.record.id)
                .collect::<Vec<_>>()
        };
        let of_web = InstanceQuery {
            workload: Some("web".into()),
            ..InstanceQuery::default()
        };
        assert_eq!(query(of_web).await, ["web-a1", "web-b2"]);
        let on_n1 = InstanceQuery {
            node: Some("n1".into()),
            ..InstanceQuery::default()
        };
        assert_eq!(query(on_n1).await, ["web-a1", "web-api-c3"]);
        let pending = InstanceQuery {
            states: vec![InstanceState::Pending],
            ..InstanceQuery::default()
        };
        assert_eq!(query(pending).await, ["web-b2", "web-api-c3"]);
        let selected = InstanceQuery {
            selector: "app=web-api".into(),
            ..InstanceQuery::default()
        };
        assert_eq!(query(selected).await, ["web-api-c3"]);

        let one = get_instance(st, "web-api-c3").await.unwrap();
        assert_eq!(one.record.workload, "web-api");
        let ready = get_instance(st, "web-a1").await.unwrap();
        assert_eq!(ready.state(), InstanceState::Ready);
        assert!(matches!(
            get_instance(st, "web-zz").await,
            Err(Error::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn get_instance_scans_when_the_id_does_not_name_its_workload() {
        let s = store().await;
        let st = &*s.store;
        let mut odd = instance("web", "x", None);
        odd.id = "strange".into();
        put(st, &keys::instance("web", "strange"), &odd).await;
        let got = get_instance(st, "strange").await.unwrap();
        assert_eq!(got.record.workload, "web");
    }
}
