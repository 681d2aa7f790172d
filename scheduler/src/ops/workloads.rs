//! Workload use cases: apply (create or update, with a diff), get, list, delete, scale,
//! history and rollback.
//!
//! A workload's spec lives at `workloads/{name}` as a [`WorkloadRecord`]; every spec change
//! bumps its generation and writes a [`RevisionRecord`] at `revisions/{name}/{generation}` in
//! the same transaction, pruning all but the newest [`KEPT_REVISIONS`]. That transaction is
//! guarded by the `mod_revision` of the workload key, so two writers never both win.
//!
//! A workload's `revision` (what callers pass back as `expected_revision`) is the store
//! revision of the last write to its spec or its status. A compare-and-swap succeeds when the
//! spec has not been written since that revision: a status written by the controllers in
//! between does not make it stale, since status never conflicts with a spec.

use std::collections::BTreeMap;

use gantry::workload::{Kind, Mode, Workload};

use super::{
    Cursor, Error, MAX_ATTEMPTS, MAX_RECORD_BYTES, ObjectKind, Page, PageRequest, Result, decode,
    diff, get_at, get_now, key_suffix, paginate, parse_selector, range,
};
use crate::model::{
    self, KEPT_REVISIONS, RevisionRecord, Timestamp, WorkloadRecord, WorkloadStatus, keys,
};
use crate::store::{Compare, KeyValue, Op, Revision, Store};

/// A stored workload: its spec record, its status, and the revision of the last write to
/// either.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadView {
    /// The spec with its generation and times.
    pub record: WorkloadRecord,
    /// What the controllers observed; `None` before they first looked.
    pub status: Option<WorkloadStatus>,
    /// Store revision of the last write to the spec or the status (0 for a workload that
    /// was not written, as in a dry run that creates it).
    pub revision: Revision,
}

impl WorkloadView {
    /// The workload's name.
    pub fn name(&self) -> &str {
        &self.record.spec.name
    }
}

/// What [`apply`] did (or, in a dry run, would do).
#[derive(Debug, Clone, PartialEq)]
pub struct ApplyOutcome {
    /// The workload as stored after the call (in a dry run: as it would be stored).
    pub workload: WorkloadView,
    /// Whether the workload did not exist before.
    pub created: bool,
    /// Whether the spec differs from the stored one (or the workload is new); `false` means
    /// nothing was (or would be) written.
    pub changed: bool,
    /// The changed leaf fields, in path order.
    pub changes: Vec<diff::FieldChange>,
    /// Unified diff of the stored spec against the new one, as canonical YAML; empty when
    /// nothing changed.
    pub diff: String,
}

/// A workload as read at one revision, with what a write needs to guard on.
struct Current {
    view: WorkloadView,
    /// `mod_revision` of the spec key: the compare of every write.
    spec_revision: Revision,
    /// Kept revisions, oldest first.
    revisions: Vec<RevisionRecord>,
}

/// Reads workload `name`, its status and its kept revisions at one store revision.
async fn read(store: &dyn Store, name: &str) -> Result<Option<Current>> {
    let key = keys::workload(name);
    let (kv, at) = get_now(store, &key).await?;
    let Some(kv) = kv else {
        return Ok(None);
    };
    let record: WorkloadRecord = decode(&kv)?;
    let status_kv = get_at(store, &keys::workload_status(name), at).await?;
    let status: Option<WorkloadStatus> = status_kv.as_ref().map(decode).transpose()?;
    let (revision_kvs, _) = range(store, &keys::revisions(name), Some(at)).await?;
    let mut revisions: Vec<RevisionRecord> =
        revision_kvs.iter().map(decode).collect::<Result<_>>()?;
    revisions.sort_by_key(|r| r.generation);
    let revision = kv
        .mod_revision
        .max(status_kv.map_or(0, |kv| kv.mod_revision));
    Ok(Some(Current {
        view: WorkloadView {
            record,
            status,
            revision,
        },
        spec_revision: kv.mod_revision,
        revisions,
    }))
}

async fn read_existing(store: &dyn Store, name: &str) -> Result<Current> {
    read(store, name)
        .await?
        .ok_or_else(|| Error::not_found(ObjectKind::Workload, name))
}

/// Checks a compare-and-swap precondition against what was read.
fn check_expected(name: &str, expected: Option<Revision>, current: Option<&Current>) -> Result<()> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let (ok, actual) = match current {
        None => (expected == 0, 0),
        Some(c) => (
            c.spec_revision <= expected && expected <= c.view.revision,
            c.view.revision,
        ),
    };
    if ok {
        Ok(())
    } else {
        Err(Error::StaleRevision {
            name: name.to_string(),
            expected,
            actual,
        })
    }
}

fn check_size(record: &WorkloadRecord) -> Result<Vec<u8>> {
    let bytes = model::encode(record);
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(Error::TooLarge {
            what: format!("workload {}", record.spec.name),
            size: bytes.len(),
            limit: MAX_RECORD_BYTES,
        });
    }
    Ok(bytes)
}

/// Creates workload `spec.name` at generation 1 if its key is still absent. `None`: it was
/// created meanwhile.
async fn commit_create(
    store: &dyn Store,
    spec: &Workload,
    now: Timestamp,
) -> Result<Option<WorkloadView>> {
    let name = &spec.name;
    let record = WorkloadRecord {
        spec: spec.clone(),
        generation: 1,
        created_at: now,
        updated_at: now,
    };
    let value = check_size(&record)?;
    let revision = RevisionRecord {
        generation: 1,
        spec: spec.clone(),
        created_at: now,
        cause: "apply".to_string(),
    };
    let key = keys::workload(name);
    let result = store
        .txn(
            vec![Compare::mod_revision(key.as_bytes(), 0)],
            vec![
                Op::put(key.as_bytes(), value),
                Op::put(keys::revision(name, 1), model::encode(&revision)),
                // A status left behind by a controller that raced an earlier delete.
                Op::delete(keys::workload_status(name)),
            ],
            Vec::new(),
        )
        .await?;
    Ok(result.succeeded.then_some(WorkloadView {
        record,
        status: None,
        revision: result.revision,
    }))
}

/// The record that [`commit_generation`] would write.
fn next_record(current: &Current, spec: Workload, now: Timestamp) -> WorkloadRecord {
    WorkloadRecord {
        spec,
        generation: current.view.record.generation + 1,
        created_at: current.view.record.created_at,
        updated_at: now,
    }
}

/// Writes `record` (the next generation) with its revision record, pruning revisions beyond
/// [`KEPT_REVISIONS`], if the spec key is unchanged since `current` was read. `None`: it
/// changed meanwhile.
async fn commit_generation(
    store: &dyn Store,
    current: &Current,
    record: WorkloadRecord,
    cause: String,
) -> Result<Option<WorkloadView>> {
    let name = record.spec.name.clone();
    let value = check_size(&record)?;
    let revision = RevisionRecord {
        generation: record.generation,
        spec: record.spec.clone(),
        created_at: record.updated_at,
        cause,
    };
    let key = keys::workload(&name);
    let mut ops = vec![
        Op::put(key.as_bytes(), value),
        Op::put(
            keys::revision(&name, record.generation),
            model::encode(&revision),
        ),
    ];
    // Keep the newest KEPT_REVISIONS, the one written now included.
    let older: Vec<u64> = current
        .revisions
        .iter()
        .map(|r| r.generation)
        .filter(|&g| g != record.generation)
        .collect();
    let excess = (older.len() + 1).saturating_sub(KEPT_REVISIONS);
    ops.extend(
        older[..excess]
            .iter()
            .map(|&g| Op::delete(keys::revision(&name, g))),
    );
    let result = store
        .txn(
            vec![Compare::mod_revision(key.as_bytes(), current.spec_revision)],
            ops,
            Vec::new(),
        )
        .await?;
    Ok(result.succeeded.then(|| WorkloadView {
        record,
        status: current.view.status.clone(),
        revision: result.revision,
    }))
}

fn conflict(name: &str) -> Error {
    Error::Conflict {
        kind: ObjectKind::Workload,
        name: name.to_string(),
        attempts: MAX_ATTEMPTS,
    }
}

/// Creates workload `spec.name` or updates it to `spec`. An unchanged spec writes nothing
/// and creates no generation; a changed one becomes the next generation, with a revision
/// record (cause `apply`), in one transaction. With `dry_run` nothing is written.
///
/// `expected_revision`: apply only if the workload is unchanged since that revision (0: only
/// if it does not exist); [`Error::StaleRevision`] otherwise. Without it, a write that loses
/// a race is retried from a fresh read. Changing the kind of an existing workload is a
/// [`Error::FailedPrecondition`].
pub async fn apply(
    store: &dyn Store,
    spec: Workload,
    dry_run: bool,
    expected_revision: Option<Revision>,
    now: Timestamp,
) -> Result<ApplyOutcome> {
    spec.validate()?;
    let name = spec.name.clone();
    for _ in 0..MAX_ATTEMPTS {
        let current = read(store, &name).await?;
        check_expected(&name, expected_revision, current.as_ref())?;
        let Some(current) = current else {
            let changes = diff::changes(None, Some(&spec));
            let text = diff::unified("/dev/null", &format!("{name} (new)"), None, Some(&spec));
            let outcome = |workload| ApplyOutcome {
                workload,
                created: true,
                changed: true,
                changes: changes.clone(),
                diff: text.clone(),
            };
            if dry_run {
                let record = WorkloadRecord {
                    spec: spec.clone(),
                    generation: 1,
                    created_at: now,
                    updated_at: now,
                };
                check_size(&record)?;
                return Ok(outcome(WorkloadView {
                    record,
                    status: None,
                    revision: 0,
                }));
            }
            match commit_create(store, &spec, now).await? {
                Some(view) => return Ok(outcome(view)),
                None => continue,
            }
        };
        let old = &current.view.record.spec;
        if old.kind != spec.kind {
            return Err(Error::FailedPrecondition(format!(
                "kind cannot change from {} to {}; delete {name} first",
                old.kind, spec.kind
            )));
        }
        if *old == spec {
            return Ok(ApplyOutcome {
                workload: current.view,
                created: false,
                changed: false,
                changes: Vec::new(),
                diff: String::new(),
            });
        }
        let changes = diff::changes(Some(old), Some(&spec));
        let text = diff::unified(
            &format!("{name} (generation {})", current.view.record.generation),
            &format!("{name} (applied)"),
            Some(old),
            Some(&spec),
        );
        let record = next_record(&current, spec.clone(), now);
        let workload = if dry_run {
            check_size(&record)?;
            WorkloadView {
                record,
                status: current.view.status.clone(),
                revision: current.view.revision,
            }
        } else {
            match commit_generation(store, &current, record, "apply".to_string()).await? {
                Some(view) => view,
                None => continue,
            }
        };
        return Ok(ApplyOutcome {
            workload,
            created: false,
            changed: true,
            changes,
            diff: text,
        });
    }
    Err(conflict(&name))
}

/// Workload `name` with its status.
pub async fn get(store: &dyn Store, name: &str) -> Result<WorkloadView> {
    Ok(read_existing(store, name).await?.view)
}

/// One page of the workloads whose labels match `selector` (kubectl syntax; empty: all) and
/// whose kind is `kind` (`None`: all), ordered by name, read at one revision.
pub async fn list(
    store: &dyn Store,
    selector: &str,
    kind: Option<Kind>,
    page: &PageRequest,
) -> Result<Page<WorkloadView>> {
    let selector = parse_selector(selector)?;
    let cursor: Cursor = page.cursor()?;
    let (kvs, at) = range(store, keys::WORKLOADS, cursor.revision).await?;
    let (status_kvs, _) = range(store, keys::WORKLOAD_STATUS, Some(at)).await?;
    let mut statuses: BTreeMap<&str, &KeyValue> = status_kvs
        .iter()
        .filter_map(|kv| Some((key_suffix(kv, keys::WORKLOAD_STATUS)?, kv)))
        .collect();
    let mut views = Vec::new();
    for kv in &kvs {
        let record: WorkloadRecord = decode(kv)?;
        if !selector.matches(&record.spec.labels) || kind.is_some_and(|k| k != record.spec.kind) {
            continue;
        }
        let status_kv = statuses.remove(record.spec.name.as_str());
        let status = status_kv.map(decode).transpose()?;
        let revision = kv
            .mod_revision
            .max(status_kv.map_or(0, |kv| kv.mod_revision));
        views.push(WorkloadView {
            record,
            status,
            revision,
        });
    }
    views.sort_by(|a, b| a.name().cmp(b.name()));
    Ok(paginate(views, |v| v.name().to_string(), &cursor, page, at))
}

/// Deletes workload `name` with its status and revisions, in one transaction; returns it as
/// it was. Its instances are stopped and removed by the controllers afterwards.
pub async fn delete(
    store: &dyn Store,
    name: &str,
    expected_revision: Option<Revision>,
) -> Result<WorkloadView> {
    for _ in 0..MAX_ATTEMPTS {
        let current = read_existing(store, name).await?;
        check_expected(name, expected_revision, Some(&current))?;
        let key = keys::workload(name);
        let result = store
            .txn(
                vec![Compare::mod_revision(key.as_bytes(), current.spec_revision)],
                vec![
                    Op::delete(key.as_bytes()),
                    Op::delete(keys::workload_status(name)),
                    Op::delete_prefix(keys::revisions(name)),
                ],
                Vec::new(),
            )
            .await?;
        if result.succeeded {
            return Ok(current.view);
        }
    }
    Err(conflict(name))
}

/// Sets the replica count of Service `name` as a new generation (cause `scale`). Scaling to
/// the current count writes nothing. Jobs and Daemons cannot be scaled.
pub async fn scale(
    store: &dyn Store,
    name: &str,
    replicas: u32,
    expected_revision: Option<Revision>,
    now: Timestamp,
) -> Result<WorkloadView> {
    for _ in 0..MAX_ATTEMPTS {
        let current = read_existing(store, name).await?;
        check_expected(name, expected_revision, Some(&current))?;
        let spec = &current.view.record.spec;
        let Mode::Service {
            replicas: now_replicas,
        } = spec.mode()
        else {
            let hint = match spec.kind {
                Kind::Job => "change completions or parallelism with `gantry apply`",
                _ => "it runs one instance on every eligible node",
            };
            return Err(Error::FailedPrecondition(format!(
                "only Services can be scaled; {name} is a {}: {hint}",
                spec.kind
            )));
        };
        if now_replicas == replicas {
            return Ok(current.view);
        }
        let mut spec = spec.clone();
        spec.replicas = Some(replicas);
        let record = next_record(&current, spec, now);
        if let Some(view) = commit_generation(store, &current, record, "scale".to_string()).await? {
            return Ok(view);
        }
    }
    Err(conflict(name))
}

/// The kept revisions of workload `name`, newest first.
pub async fn history(store: &dyn Store, name: &str) -> Result<Vec<RevisionRecord>> {
    let mut revisions = read_existing(store, name).await?.revisions;
    revisions.reverse();
    Ok(revisions)
}

/// Rolls Service or Daemon `name` back to kept generation `to_generation` (`None`: the newest
/// kept one before the current generation), as a new generation (cause `rollback to N`) whose
/// spec is the target's, except `replicas`, which keeps its current value (as
/// `kubectl rollout undo`). When that spec equals the current one nothing is written.
pub async fn rollback(
    store: &dyn Store,
    name: &str,
    to_generation: Option<u64>,
    now: Timestamp,
) -> Result<WorkloadView> {
    for _ in 0..MAX_ATTEMPTS {
        let current = read_existing(store, name).await?;
        let spec = &current.view.record.spec;
        if spec.kind == Kind::Job {
            return Err(Error::FailedPrecondition(format!(
                "only Services and Daemons can be rolled back; {name} is a Job: apply the spec you want instead"
            )));
        }
        let generation = current.view.record.generation;
        let target = match to_generation {
            Some(g) => current.revisions.iter().find(|r| r.generation == g),
            None => current
                .revisions
                .iter()
                .rev()
                .find(|r| r.generation < generation),
        };
        let Some(target) = target else {
            let kept = current.revisions.iter().map(|r| r.generation).collect();
            return Err(match to_generation {
                Some(g) => Error::RevisionNotFound {
                    workload: name.to_string(),
                    generation: g,
                    kept,
                },
                None => Error::FailedPrecondition(format!(
                    "workload {name} has no kept revision before generation {generation} to roll back to; see `gantry rollout history {name}`"
                )),
            });
        };
        let mut new_spec = target.spec.clone();
        new_spec.replicas = spec.replicas;
        if new_spec == *spec {
            return Ok(current.view);
        }
        let cause = format!("rollback to {}", target.generation);
        let record = next_record(&current, new_spec, now);
        if let Some(view) = commit_generation(store, &current, record, cause).await? {
            return Ok(view);
        }
    }
    Err(conflict(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::nodes::tests::put;
    use crate::ops::testing::{applied, service, spec, store};

    const T0: Timestamp = Timestamp(1_000);

    async fn revision_keys(store: &dyn Store, name: &str) -> Vec<u64> {
        let (kvs, _) = store
            .range(keys::revisions(name).as_bytes(), None)
            .await
            .unwrap();
        kvs.iter()
            .map(|kv| {
                key_suffix(kv, &keys::revisions(name))
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect()
    }

    #[tokio::test]
    async fn apply_creates_generation_one() {
        let s = store().await;
        let out = applied(&*s.store, service("web", 2), T0).await;
        assert!(out.created && out.changed);
        assert_eq!(out.workload.record.generation, 1);
        assert_eq!(out.workload.record.created_at, T0);
        assert!(out.workload.revision > 1);
        assert!(out.changes.iter().any(|c| c.path == "replicas"));
        assert_eq!(revision_keys(&*s.store, "web").await, [1]);
        let got = get(&*s.store, "web").await.unwrap();
        assert_eq!(got, out.workload);
    }

    #[tokio::test]
    async fn applying_the_same_spec_writes_nothing() {
        let s = store().await;
        let first = applied(&*s.store, service("web", 2), T0).await;
        let before = s.store.current_revision().await.unwrap();
        let again = applied(&*s.store, service("web", 2), Timestamp(2_000)).await;
        assert!(!again.changed && !again.created);
        assert!(again.changes.is_empty() && again.diff.is_empty());
        assert_eq!(again.workload, first.workload);
        assert_eq!(s.store.current_revision().await.unwrap(), before);
        assert_eq!(revision_keys(&*s.store, "web").await, [1]);
    }

    #[tokio::test]
    async fn a_changed_spec_is_the_next_generation_with_a_diff() {
        let s = store().await;
        applied(&*s.store, service("web", 2), T0).await;
        let out = applied(&*s.store, service("web", 3), Timestamp(2_000)).await;
        assert!(out.changed && !out.created);
        assert_eq!(out.workload.record.generation, 2);
        assert_eq!(out.workload.record.created_at, T0);
        assert_eq!(out.workload.record.updated_at, Timestamp(2_000));
        let paths: Vec<&str> = out.changes.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, ["replicas"]);
        assert!(
            out.diff.contains("-replicas: 2\n+replicas: 3\n"),
            "{}",
            out.diff
        );
        assert_eq!(revision_keys(&*s.store, "web").await, [1, 2]);
        let history = history(&*s.store, "web").await.unwrap();
        assert_eq!(history[0].generation, 2);
        assert_eq!(history[0].cause, "apply");
    }

    #[tokio::test]
    async fn dry_run_writes_nothing() {
        let s = store().await;
        let before = s.store.current_revision().await.unwrap();
        let out = apply(&*s.store, service("web", 2), true, None, T0)
            .await
            .unwrap();
        assert!(out.created && out.changed);
        assert_eq!(out.workload.revision, 0);
        assert_eq!(s.store.current_revision().await.unwrap(), before);
        assert!(matches!(
            get(&*s.store, "web").await,
            Err(Error::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn a_stale_expected_revision_is_refused() {
        let s = store().await;
        let first = apply(&*s.store, service("web", 2), false, Some(0), T0)
            .await
            .unwrap();
        let rev1 = first.workload.revision;
        apply(&*s.store, service("web", 3), false, Some(rev1), T0)
            .await
            .unwrap();
        let err = apply(&*s.store, service("web", 4), false, Some(rev1), T0)
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::StaleRevision { expected, actual, .. } if expected == rev1 && actual > rev1),
            "{err:?}"
        );
        let err = apply(&*s.store, service("web", 4), false, Some(0), T0)
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::StaleRevision { expected: 0, .. }),
            "{err:?}"
        );
        let err = apply(&*s.store, service("api", 1), false, Some(5), T0)
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::StaleRevision { actual: 0, .. }),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_status_write_does_not_make_the_spec_stale() {
        let s = store().await;
        let first = applied(&*s.store, service("web", 2), T0).await;
        put(
            &*s.store,
            &keys::workload_status("web"),
            &WorkloadStatus::default(),
        )
        .await;
        let got = get(&*s.store, "web").await.unwrap();
        assert!(got.revision > first.workload.revision);
        assert!(got.status.is_some());
        // Read before the status write: still current, since only the status changed.
        let second = apply(
            &*s.store,
            service("web", 3),
            false,
            Some(first.workload.revision),
            T0,
        )
        .await
        .unwrap();
        assert_eq!(second.workload.record.generation, 2);
        assert!(second.workload.status.is_some());
        apply(
            &*s.store,
            service("web", 4),
            false,
            Some(second.workload.revision),
            T0,
        )
        .await
        .unwrap();
        let err = apply(&*s.store, service("web", 5), false, Some(got.revision), T0)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::StaleRevision { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn only_the_newest_revisions_are_kept() {
        let s = store().await;
        for replicas in 1..=11 {
            applied(&*s.store, service("web", replicas), T0).await;
        }
        assert_eq!(
            revision_keys(&*s.store, "web").await,
            (2..=11).collect::<Vec<u64>>()
        );
        let history = history(&*s.store, "web").await.unwrap();
        assert_eq!(history.len(), KEPT_REVISIONS);
        assert_eq!(history[0].generation, 11);
    }

    #[tokio::test]
    async fn rollback_is_a_new_generation_with_the_target_spec() {
        let s = store().await;
        let v1 = service("web", 2);
        let mut v2 = v1.clone();
        v2.image = "busybox:1.37".into();
        applied(&*s.store, v1.clone(), T0).await;
        applied(&*s.store, v2.clone(), T0).await;
        scale(&*s.store, "web", 5, None, T0).await.unwrap();

        // Default target: the revision before the current generation (3), i.e. 2 — whose
        // spec is v2 with 2 replicas; replicas stay 5, so nothing changes.
        let same = rollback(&*s.store, "web", None, Timestamp(5_000))
            .await
            .unwrap();
        assert_eq!(same.record.generation, 3);

        let back = rollback(&*s.store, "web", Some(1), Timestamp(5_000))
            .await
            .unwrap();
        assert_eq!(back.record.generation, 4);
        let mut expected = v1.clone();
        expected.replicas = Some(5);
        assert_eq!(back.record.spec, expected);
        let history = history(&*s.store, "web").await.unwrap();
        assert_eq!(history[0].cause, "rollback to 1");
        assert_eq!(history[0].generation, 4);

        let again = rollback(&*s.store, "web", None, Timestamp(6_000))
            .await
            .unwrap();
        assert_eq!(again.record.generation, 5);
        assert_eq!(again.record.spec.image, "busybox:1.37");

        let err = rollback(&*s.store, "web", Some(42), T0).await.unwrap_err();
        assert!(
            matches!(err, Error::RevisionNotFound { generation: 42, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("kept: 1, 2, 3, 4, 5"), "{err}");
    }

    #[tokio::test]
    async fn rollback_without_an_earlier_revision_fails() {
        let s = store().await;
        applied(&*s.store, service("web", 1), T0).await;
        let err = rollback(&*s.store, "web", None, T0).await.unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    }

    #[tokio::test]
    async fn delete_removes_spec_status_and_revisions() {
        let s = store().await;
        applied(&*s.store, service("web", 1), T0).await;
        applied(&*s.store, service("web", 2), T0).await;
        applied(&*s.store, service("web-api", 1), T0).await;
        put(
            &*s.store,
            &keys::workload_status("web"),
            &WorkloadStatus::default(),
        )
        .await;
        let gone = delete(&*s.store, "web", None).await.unwrap();
        assert_eq!(gone.record.generation, 2);
        assert!(matches!(
            get(&*s.store, "web").await,
            Err(Error::NotFound { .. })
        ));
        assert!(revision_keys(&*s.store, "web").await.is_empty());
        assert!(
            s.store
                .get(keys::workload_status("web").as_bytes())
                .await
                .unwrap()
                .is_none()
        );
        // Its namesake prefix survives.
        assert_eq!(revision_keys(&*s.store, "web-api").await, [1]);
        assert!(matches!(
            delete(&*s.store, "web", None).await,
            Err(Error::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn kind_cannot_change() {
        let s = store().await;
        applied(&*s.store, service("web", 1), T0).await;
        let job = spec("kind: Job\nname: web\nimage: busybox\n");
        let err = apply(&*s.store, job, false, None, T0).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "kind cannot change from Service to Job; delete web first"
        );
    }

    #[tokio::test]
    async fn scale_changes_services_only() {
        let s = store().await;
        applied(&*s.store, service("web", 1), T0).await;
        let same = scale(&*s.store, "web", 1, None, T0).await.unwrap();
        assert_eq!(same.record.generation, 1);
        let scaled = scale(&*s.store, "web", 4, None, T0).await.unwrap();
        assert_eq!(scaled.record.generation, 2);
        assert_eq!(scaled.record.spec.replicas, Some(4));
        assert_eq!(history(&*s.store, "web").await.unwrap()[0].cause, "scale");

        let job = spec("kind: Job\nname: once\nimage: busybox\n");
        applied(&*s.store, job, T0).await;
        let err = scale(&*s.store, "once", 3, None, T0).await.unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
        assert!(matches!(
            scale(&*s.store, "nope", 3, None, T0).await,
            Err(Error::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn invalid_specs_name_their_fields() {
        let s = store().await;
        let mut bad = service("web", 1);
        bad.image = String::new();
        let err = apply(&*s.store, bad, false, None, T0).await.unwrap_err();
        let Error::InvalidArgument { errors } = err else {
            panic!("{err:?}")
        };
        assert_eq!(errors[0].path, "image");
    }

    #[tokio::test]
    async fn list_filters_by_selector_and_kind_and_pages() {
        let s = store().await;
        for name in ["c", "a", "b"] {
            applied(&*s.store, service(name, 1), T0).await;
        }
        let job = spec("kind: Job\nname: d\nimage: busybox\nlabels: {app: a}\n");
        applied(&*s.store, job, T0).await;
        let names = |page: &Page<WorkloadView>| -> Vec<String> {
            page.items.iter().map(|w| w.name().to_string()).collect()
        };
        let all = list(&*s.store, "", None, &PageRequest::default())
            .await
            .unwrap();
        assert_eq!(names(&all), ["a", "b", "c", "d"]);
        let app_a = list(&*s.store, "app=a", None, &PageRequest::default())
            .await
            .unwrap();
        assert_eq!(names(&app_a), ["a", "d"]);
        let services = list(
            &*s.store,
            "app=a",
            Some(Kind::Service),
            &PageRequest::default(),
        )
        .await
        .unwrap();
        assert_eq!(names(&services), ["a"]);
        let first = list(
            &*s.store,
            "",
            None,
            &PageRequest {
                size: 3,
                token: String::new(),
            },
        )
        .await
        .unwrap();
        assert_eq!(names(&first), ["a", "b", "c"]);
        applied(&*s.store, service("bb", 1), T0).await;
        let second = list(
            &*s.store,
            "",
            None,
            &PageRequest {
                size: 3,
                token: first.next_token.clone(),
            },
        )
        .await
        .unwrap();
        // Read at the first page's revision: `bb`, created since, is not there.
        assert_eq!(names(&second), ["d"]);
        assert_eq!(second.revision, first.revision);
        let err = list(&*s.store, "a b", None, &PageRequest::default())
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err:?}");
    }
}
