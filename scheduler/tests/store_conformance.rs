//! Conformance suite of the store contract: every case runs against the embedded store
//! (in a temp dir, under paused tokio time) and against a real etcd started by the test.
//!
//! etcd tests need `/usr/bin/etcd` (Debian `etcd-server`): without it they are skipped,
//! unless `CI` is set (to anything but `false` or `0`), where they fail. The etcd harness
//! is in `support/mod.rs`.

use gantry_scheduler as crate_under_test;

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use crate_under_test::store::{
    Compare, EmbeddedOptions, EmbeddedStore, EtcdOptions, EtcdStore, Event, EventKind, KeyValue,
    LeaseId, Op, Revision, Store, StoreError, WatchStream,
};
use futures::StreamExt;
use support::{EtcdServer, etcd_available, free_ports};
use tokio::time::{Instant, sleep, timeout};

/// Upper bound on waiting for one watch event: a guard, never a synchronisation.
const EVENT_WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// Harnesses

/// A store under test and what keeps it alive (temp dir, etcd process). Fields drop in
/// order: the store before its files.
struct Harness {
    store: Arc<dyn Store>,
    _keep: Box<dyn Send>,
}

async fn embedded() -> Result<Harness> {
    let dir = tempfile::tempdir().context("creating temp dir")?;
    let store = EmbeddedStore::open(dir.path().join("store.redb"))
        .await
        .context("opening embedded store")?;
    Ok(Harness {
        store: Arc::new(store),
        _keep: Box::new(dir),
    })
}

async fn etcd() -> Result<Option<Harness>> {
    if !etcd_available() {
        return Ok(None);
    }
    let server = EtcdServer::start().await?;
    let store = EtcdStore::connect(EtcdOptions::new([server.client_url.clone()])).await?;
    Ok(Some(Harness {
        store: Arc::new(store),
        _keep: Box::new(server),
    }))
}

/// Runs each case against both stores: `embedded::case` and `etcd::case`.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(start_paused = true)]
                async fn $case() -> anyhow::Result<()> {
                    let harness = super::embedded().await?;
                    super::$case(harness.store.clone()).await
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test]
                async fn $case() -> anyhow::Result<()> {
                    let Some(harness) = super::etcd().await? else {
                        return Ok(());
                    };
                    super::$case(harness.store.clone()).await
                }
            )*
        }
    };
}

conformance!(
    cas_on_mod_revision,
    create_if_absent_has_one_winner,
    multi_key_txn_is_atomic,
    range_at_past_revision,
    range_of_many_keys_is_one_snapshot,
    watch_from_past_revision_has_no_gap,
    watch_from_compacted_revision_fails,
    delete_events_carry_revision_and_prev,
    delete_prefix_deletes_only_the_prefix,
    lease_expires_without_keep_alive,
    keep_alive_extends_lease,
    revoke_deletes_keys_at_once,
);

// ---------------------------------------------------------------------------------------
// Helpers

fn key(case: &str, name: &str) -> Vec<u8> {
    format!("/gantry/v1/test/{case}/{name}").into_bytes()
}

fn prefix(case: &str) -> Vec<u8> {
    format!("/gantry/v1/test/{case}/").into_bytes()
}

async fn value(store: &Arc<dyn Store>, key: &[u8]) -> Result<Option<Vec<u8>>> {
    Ok(store.get(key).await?.map(|kv| kv.value))
}

async fn put_with_lease(
    store: &Arc<dyn Store>,
    key: &[u8],
    value: &[u8],
    lease: LeaseId,
) -> Result<Revision, StoreError> {
    let result = store
        .txn(
            Vec::new(),
            vec![Op::put_with_lease(key, value, lease)],
            Vec::new(),
        )
        .await?;
    Ok(result.revision)
}

async fn next_event(watch: &mut WatchStream) -> Result<Event> {
    let item = timeout(EVENT_WAIT, watch.next())
        .await
        .context("no watch event in time")?
        .context("watch stream ended")?;
    Ok(item?)
}

fn keys(kvs: &[KeyValue]) -> Vec<String> {
    kvs.iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------
// Cases

async fn cas_on_mod_revision(store: Arc<dyn Store>) -> Result<()> {
    let k = key("cas", "a");
    let created = store
        .txn(
            vec![Compare::absent(k.clone())],
            vec![Op::put(k.clone(), "v1")],
            vec![],
        )
        .await?;
    assert!(created.succeeded);
    let r1 = created.revision;
    let kv = store.get(&k).await?.context("created key is missing")?;
    assert_eq!(
        (
            kv.value.as_slice(),
            kv.create_revision,
            kv.mod_revision,
            kv.version,
            kv.lease
        ),
        (&b"v1"[..], r1, r1, 1, None)
    );

    let swapped = store
        .txn(
            vec![Compare::mod_revision(k.clone(), r1)],
            vec![Op::put(k.clone(), "v2")],
            vec![],
        )
        .await?;
    assert!(
        swapped.succeeded,
        "CAS on the current mod_revision must succeed"
    );
    let r2 = swapped.revision;
    assert_eq!(r2, r1 + 1);

    let stale = store
        .txn(
            vec![Compare::mod_revision(k.clone(), r1)],
            vec![Op::put(k.clone(), "v3")],
            vec![],
        )
        .await?;
    assert!(!stale.succeeded, "CAS on a stale mod_revision must fail");
    assert_eq!(
        stale.revision, r2,
        "a failed txn without ops changes nothing"
    );
    let kv = store.get(&k).await?.context("key vanished")?;
    assert_eq!(
        (
            kv.value.as_slice(),
            kv.create_revision,
            kv.mod_revision,
            kv.version
        ),
        (&b"v2"[..], r1, r2, 2)
    );
    assert_eq!(store.current_revision().await?, r2);

    // The failure branch runs when a compare fails.
    let conflict = key("cas", "conflict");
    let fallback = store
        .txn(
            vec![Compare::mod_revision(k.clone(), r1)],
            vec![Op::put(k.clone(), "never")],
            vec![Op::put(conflict.clone(), "seen")],
        )
        .await?;
    assert!(!fallback.succeeded);
    assert_eq!(fallback.revision, r2 + 1);
    assert_eq!(
        value(&store, &conflict).await?.as_deref(),
        Some(&b"seen"[..])
    );
    assert_eq!(value(&store, &k).await?.as_deref(), Some(&b"v2"[..]));

    // mod_revision 0 means "absent".
    let fresh = key("cas", "fresh");
    let first = store
        .txn(
            vec![Compare::mod_revision(fresh.clone(), 0)],
            vec![Op::put(fresh.clone(), "1")],
            vec![],
        )
        .await?;
    let second = store
        .txn(
            vec![Compare::mod_revision(fresh.clone(), 0)],
            vec![Op::put(fresh.clone(), "2")],
            vec![],
        )
        .await?;
    assert!(first.succeeded && !second.succeeded);

    // Value compares: equal value holds, other value or absent key does not.
    let by_value = store
        .txn(
            vec![Compare::value(k.clone(), "v2")],
            vec![Op::put(k.clone(), "v4")],
            vec![],
        )
        .await?;
    let old_value = store
        .txn(
            vec![Compare::value(k.clone(), "v2")],
            vec![Op::put(k.clone(), "v5")],
            vec![],
        )
        .await?;
    let absent_value = store
        .txn(
            vec![Compare::value(key("cas", "none"), "")],
            vec![Op::put(k.clone(), "v6")],
            vec![],
        )
        .await?;
    assert!(by_value.succeeded && !old_value.succeeded && !absent_value.succeeded);
    assert_eq!(value(&store, &k).await?.as_deref(), Some(&b"v4"[..]));
    Ok(())
}

async fn create_if_absent_has_one_winner(store: Arc<dyn Store>) -> Result<()> {
    let k = key("create", "leader");
    let create = |who: &'static str| {
        let store = store.clone();
        let k = k.clone();
        async move {
            store
                .txn(
                    vec![Compare::absent(k.clone())],
                    vec![Op::put(k, who)],
                    vec![],
                )
                .await
        }
    };
    let (a, b) = tokio::try_join!(create("a"), create("b"))?;
    assert!(
        a.succeeded != b.succeeded,
        "exactly one creator must win: {a:?} {b:?}"
    );
    let winner = if a.succeeded { "a" } else { "b" };
    assert_eq!(value(&store, &k).await?.as_deref(), Some(winner.as_bytes()));

    let again = store
        .txn(
            vec![Compare::absent(k.clone())],
            vec![Op::put(k.clone(), "c")],
            vec![],
        )
        .await?;
    assert!(!again.succeeded);

    let removed = store
        .txn(
            vec![Compare::exists(k.clone())],
            vec![Op::delete(k.clone())],
            vec![],
        )
        .await?;
    let removed_again = store
        .txn(
            vec![Compare::exists(k.clone())],
            vec![Op::delete(k.clone())],
            vec![],
        )
        .await?;
    assert!(removed.succeeded && !removed_again.succeeded);
    assert_eq!(store.get(&k).await?, None);
    Ok(())
}

async fn multi_key_txn_is_atomic(store: Arc<dyn Store>) -> Result<()> {
    let [a, b, c, d, e] = ["a", "b", "c", "d", "e"].map(|n| key("atomic", n));
    let outside = key("atomic-other", "x");
    let before = store.current_revision().await?;
    let mut watch = store.watch(&prefix("atomic"), before + 1).await?;

    let written = store
        .txn(
            vec![Compare::absent(a.clone())],
            vec![
                Op::put(c.clone(), "3"),
                Op::put(a.clone(), "1"),
                Op::put(outside.clone(), "x"),
                Op::put(b.clone(), "2"),
            ],
            vec![],
        )
        .await?;
    assert!(written.succeeded);
    assert_eq!(written.revision, before + 1, "one txn is one revision");
    for k in [&a, &b, &c, &outside] {
        let kv = store.get(k).await?.context("txn key missing")?;
        assert_eq!(kv.mod_revision, written.revision);
    }
    // Events of one txn: same revision, in op order, filtered by prefix.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let event = next_event(&mut watch).await?;
        assert_eq!(
            (event.kind, event.revision()),
            (EventKind::Put, written.revision)
        );
        seen.push(event.kv.key);
    }
    assert_eq!(seen, vec![c.clone(), a.clone(), b.clone()]);

    // Failed compare: nothing of the success branch happens.
    let failed = store
        .txn(
            vec![Compare::absent(a.clone())],
            vec![Op::put(d.clone(), "4"), Op::delete(b.clone())],
            vec![],
        )
        .await?;
    assert!(!failed.succeeded);
    assert_eq!(failed.revision, written.revision);
    assert_eq!(store.get(&d).await?, None);
    assert!(store.get(&b).await?.is_some());

    // An op that fails midway (missing lease) fails the whole txn.
    let missing = LeaseId(0x7e57_0000_0001);
    let err = store
        .txn(
            vec![],
            vec![
                Op::put(e.clone(), "5"),
                Op::put_with_lease(d.clone(), "4", missing),
            ],
            vec![],
        )
        .await
        .expect_err("a put with a missing lease must fail the txn");
    assert!(matches!(err, StoreError::LeaseNotFound { .. }), "{err:?}");
    assert_eq!(store.get(&e).await?, None);

    // Putting and deleting one key in one txn is rejected, as etcd does.
    let err = store
        .txn(
            vec![],
            vec![Op::put(e.clone(), "5"), Op::delete(e.clone())],
            vec![],
        )
        .await
        .expect_err("put + delete of one key must be rejected");
    assert!(matches!(err, StoreError::InvalidArgument { .. }), "{err:?}");
    assert_eq!(store.current_revision().await?, written.revision);

    // Mixed ops: still one revision, and the watch sees exactly them next.
    let mixed = store
        .txn(
            vec![Compare::mod_revision(a.clone(), written.revision)],
            vec![
                Op::put(a.clone(), "1b"),
                Op::delete(b.clone()),
                Op::delete_prefix(c.clone()),
            ],
            vec![],
        )
        .await?;
    assert!(mixed.succeeded);
    assert_eq!(mixed.revision, written.revision + 1);
    let kinds: Vec<(EventKind, Revision)> = [
        next_event(&mut watch).await?,
        next_event(&mut watch).await?,
        next_event(&mut watch).await?,
    ]
    .iter()
    .map(|e| (e.kind, e.revision()))
    .collect();
    assert_eq!(
        kinds,
        vec![
            (EventKind::Put, mixed.revision),
            (EventKind::Delete, mixed.revision),
            (EventKind::Delete, mixed.revision),
        ]
    );
    Ok(())
}

async fn range_at_past_revision(store: Arc<dyn Store>) -> Result<()> {
    let p = prefix("range");
    let [a, b, c] = ["a", "b", "c"].map(|n| key("range", n));
    let r1 = store.put(&a, b"1").await?;
    let r2 = store.put(&b, b"1").await?;
    let r3 = store.put(&a, b"2").await?;
    let r4 = store.delete(&b).await?;
    let r5 = store.put(&c, b"1").await?;
    let r6 = store.put(&key("range-other", "x"), b"1").await?;
    assert_eq!(
        [r2, r3, r4, r5, r6],
        [r1 + 1, r1 + 2, r1 + 3, r1 + 4, r1 + 5]
    );

    let (now, revision) = store.range(&p, None).await?;
    assert_eq!(revision, r6);
    assert_eq!(
        keys(&now),
        ["/gantry/v1/test/range/a", "/gantry/v1/test/range/c"]
    );

    let (at_r3, revision) = store.range(&p, Some(r3)).await?;
    assert_eq!(revision, r3);
    let expected = vec![
        KeyValue {
            key: a.clone(),
            value: b"2".to_vec(),
            create_revision: r1,
            mod_revision: r3,
            version: 2,
            lease: None,
        },
        KeyValue {
            key: b.clone(),
            value: b"1".to_vec(),
            create_revision: r2,
            mod_revision: r2,
            version: 1,
            lease: None,
        },
    ];
    assert_eq!(at_r3, expected);
    let (at_r1, _) = store.range(&p, Some(r1)).await?;
    assert_eq!(
        at_r1.iter().map(|kv| kv.value.clone()).collect::<Vec<_>>(),
        [b"1".to_vec()]
    );
    let (before, _) = store.range(&p, Some(r1 - 1)).await?;
    assert!(before.is_empty());
    // The whole keyspace also works (empty prefix).
    let (all, _) = store.range(b"", Some(r6)).await?;
    assert_eq!(all.len(), 3);

    let err = store
        .range(&p, Some(r6 + 10))
        .await
        .expect_err("future revision");
    assert!(
        matches!(err, StoreError::FutureRevision { requested } if requested == r6 + 10),
        "{err:?}"
    );

    store.compact(r3).await?;
    let err = store
        .range(&p, Some(r2))
        .await
        .expect_err("compacted revision");
    assert!(
        matches!(err, StoreError::Compacted { requested, compacted } if requested == r2 && compacted == r3),
        "{err:?}"
    );
    let (still, _) = store.range(&p, Some(r3)).await?;
    assert_eq!(
        still, expected,
        "the compaction revision itself stays readable"
    );
    Ok(())
}

async fn range_of_many_keys_is_one_snapshot(store: Arc<dyn Store>) -> Result<()> {
    // More keys than one etcd page (1000), written in txns of 100 (etcd allows 128 ops).
    let total = 1205;
    let names: Vec<String> = (0..total).map(|i| format!("k{i:05}")).collect();
    for chunk in names.chunks(100) {
        let ops = chunk
            .iter()
            .map(|n| Op::put(key("many", n), n.as_bytes()))
            .collect();
        store.txn(vec![], ops, vec![]).await?;
    }
    let (kvs, revision) = store.range(&prefix("many"), None).await?;
    assert_eq!(kvs.len(), total);
    assert!(
        kvs.windows(2).all(|w| w[0].key < w[1].key),
        "range must be sorted by key"
    );
    // Change things after the snapshot; a range at the old revision must not see them.
    store
        .txn(
            vec![],
            vec![
                Op::delete_prefix(key("many", "k000")),
                Op::put(key("many", "zz"), "new"),
            ],
            vec![],
        )
        .await?;
    let (again, at) = store.range(&prefix("many"), Some(revision)).await?;
    assert_eq!(at, revision);
    assert_eq!(again, kvs);
    let (now, _) = store.range(&prefix("many"), None).await?;
    assert_eq!(now.len(), total - 100 + 1);
    Ok(())
}

async fn watch_from_past_revision_has_no_gap(store: Arc<dyn Store>) -> Result<()> {
    const MISSED: usize = 300;
    const PER_WRITER: usize = 100;
    let start = store.current_revision().await? + 1;
    let mut written = BTreeSet::new();
    for i in 0..MISSED {
        let k = key("gap", &format!("missed/{i:03}"));
        store.put(&k, b"m").await?;
        written.insert(k);
    }
    // Two concurrent writers; the watch starts while they are running, so catch-up and
    // live events overlap.
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let writer = |name: &'static str, mut signal: Option<tokio::sync::oneshot::Sender<()>>| {
        let store = store.clone();
        tokio::spawn(async move {
            let mut keys = Vec::new();
            for i in 0..PER_WRITER {
                let k = key("gap", &format!("{name}/{i:03}"));
                store.put(&k, name.as_bytes()).await?;
                keys.push(k);
                if i == PER_WRITER / 3
                    && let Some(signal) = signal.take()
                {
                    let _ = signal.send(());
                }
            }
            Ok::<_, StoreError>(keys)
        })
    };
    let a = writer("a", Some(started_tx));
    let b = writer("b", None);
    started_rx.await.context("writer a stopped early")?;
    let mut watch = store.watch(&prefix("gap"), start).await?;

    let total = MISSED + 2 * PER_WRITER;
    let mut events = Vec::with_capacity(total);
    while events.len() < total {
        events.push(next_event(&mut watch).await?);
    }
    written.extend(a.await??);
    written.extend(b.await??);

    // Nothing else writes to this store: each put is exactly the next revision.
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.kind, EventKind::Put);
        assert_eq!(
            event.revision(),
            start + i as Revision,
            "gap, duplicate or reorder at event {i}"
        );
    }
    let seen: BTreeSet<Vec<u8>> = events.iter().map(|e| e.kv.key.clone()).collect();
    assert_eq!(seen, written);

    // No stray duplicate afterwards: the next event is the next write.
    let last = store.put(&key("gap", "last"), b"l").await?;
    let event = next_event(&mut watch).await?;
    assert_eq!((event.revision(), event.kv.key), (last, key("gap", "last")));
    Ok(())
}

async fn watch_from_compacted_revision_fails(store: Arc<dyn Store>) -> Result<()> {
    let [a, b] = ["a", "b"].map(|n| key("compact", n));
    let r1 = store.put(&a, b"1").await?;
    let r2 = store.put(&a, b"2").await?;
    let r3 = store.put(&b, b"1").await?;
    store.compact(r2).await?;

    let err = store
        .watch(&prefix("compact"), r1)
        .await
        .expect_err("watch below the compaction revision must fail");
    assert!(
        matches!(err, StoreError::Compacted { requested, compacted } if requested == r1 && compacted == r2),
        "{err:?}"
    );

    let mut watch = store.watch(&prefix("compact"), r2).await?;
    let first = next_event(&mut watch).await?;
    let second = next_event(&mut watch).await?;
    assert_eq!(
        (first.revision(), first.kv.value.as_slice()),
        (r2, &b"2"[..])
    );
    assert_eq!(
        (second.revision(), second.kv.key.as_slice()),
        (r3, b.as_slice())
    );

    let err = store.compact(r2).await.expect_err("compacting twice");
    assert!(
        matches!(err, StoreError::Compacted { requested, compacted } if requested == r2 && compacted >= r2),
        "{err:?}"
    );
    let err = store
        .compact(r3 + 5)
        .await
        .expect_err("compacting the future");
    assert!(matches!(err, StoreError::FutureRevision { .. }), "{err:?}");
    Ok(())
}

async fn delete_events_carry_revision_and_prev(store: Arc<dyn Store>) -> Result<()> {
    let [a, b, cx] = ["a", "b", "c/x"].map(|n| key("delete", n));
    let ra = store.put(&a, b"va").await?;
    store.put(&b, b"vb").await?;
    store.put(&cx, b"vc").await?;
    let mut watch = store.watch(&prefix("delete"), 0).await?;

    let rd = store.delete(&a).await?;
    let event = next_event(&mut watch).await?;
    assert_eq!(event.kind, EventKind::Delete);
    assert_eq!(
        (
            event.kv.key.as_slice(),
            event.kv.mod_revision,
            event.kv.value.len(),
            event.kv.version
        ),
        (a.as_slice(), rd, 0, 0)
    );
    let prev = event.prev.context("delete event without prev")?;
    assert_eq!((prev.value.as_slice(), prev.mod_revision), (&b"va"[..], ra));

    // Deleting an absent key changes nothing: no revision, no event.
    let unchanged = store.delete(&a).await?;
    assert_eq!(unchanged, rd);

    // An overwrite carries the old value as prev.
    let rb = store.put(&b, b"vb2").await?;
    let event = next_event(&mut watch).await?;
    assert_eq!((event.kind, event.revision()), (EventKind::Put, rb));
    assert_eq!(event.prev.map(|p| p.value), Some(b"vb".to_vec()));

    // A prefix delete: one revision, one event per key, in key order.
    let rp = store
        .txn(vec![], vec![Op::delete_prefix(prefix("delete"))], vec![])
        .await?
        .revision;
    assert_eq!(rp, rb + 1);
    let first = next_event(&mut watch).await?;
    let second = next_event(&mut watch).await?;
    assert_eq!(
        [
            (first.kind, first.revision(), first.kv.key),
            (second.kind, second.revision(), second.kv.key)
        ],
        [
            (EventKind::Delete, rp, b.clone()),
            (EventKind::Delete, rp, cx.clone())
        ]
    );
    assert_eq!(second.prev.map(|p| p.value), Some(b"vc".to_vec()));
    Ok(())
}

async fn delete_prefix_deletes_only_the_prefix(store: Arc<dyn Store>) -> Result<()> {
    let names = ["x/a", "x/b", "x/c/d", "xa", "y"];
    for n in names {
        store.put(&key("prefix", n), n.as_bytes()).await?;
    }
    let before = store.current_revision().await?;
    let deleted = store
        .txn(vec![], vec![Op::delete_prefix(key("prefix", "x/"))], vec![])
        .await?;
    assert_eq!(deleted.revision, before + 1);
    let (left, _) = store.range(&prefix("prefix"), None).await?;
    assert_eq!(
        keys(&left),
        ["/gantry/v1/test/prefix/xa", "/gantry/v1/test/prefix/y"]
    );
    assert!(left.iter().all(|kv| kv.mod_revision < deleted.revision));

    let nothing = store
        .txn(vec![], vec![Op::delete_prefix(key("prefix", "x/"))], vec![])
        .await?;
    assert_eq!(
        nothing.revision, deleted.revision,
        "deleting nothing is no revision"
    );
    Ok(())
}

async fn lease_expires_without_keep_alive(store: Arc<dyn Store>) -> Result<()> {
    let [live, plain, late] = ["live", "plain", "late"].map(|n| key("expire", n));
    let lease = store.grant_lease(Duration::from_secs(2)).await?;
    let granted = Instant::now();
    put_with_lease(&store, &live, b"1", lease).await?;
    store.put(&plain, b"1").await?;
    let kv = store.get(&live).await?.context("leased key missing")?;
    assert_eq!(kv.lease, Some(lease));

    let mut watch = store.watch(&prefix("expire"), 0).await?;
    let event = next_event(&mut watch).await?;
    let waited = granted.elapsed();
    assert_eq!(
        (event.kind, event.kv.key.as_slice()),
        (EventKind::Delete, live.as_slice())
    );
    assert!(
        waited >= Duration::from_millis(1900),
        "expired after only {waited:?}"
    );
    assert_eq!(store.get(&live).await?, None);
    assert!(
        store.get(&plain).await?.is_some(),
        "a key without lease must stay"
    );

    let err = store
        .keep_alive(lease)
        .await
        .expect_err("keep-alive of an expired lease");
    assert!(
        matches!(err, StoreError::LeaseNotFound { lease: l } if l == lease),
        "{err:?}"
    );
    let err = put_with_lease(&store, &late, b"1", lease)
        .await
        .expect_err("put with an expired lease");
    assert!(matches!(err, StoreError::LeaseNotFound { .. }), "{err:?}");
    Ok(())
}

async fn keep_alive_extends_lease(store: Arc<dyn Store>) -> Result<()> {
    let k = key("keepalive", "node");
    let lease = store.grant_lease(Duration::from_secs(2)).await?;
    put_with_lease(&store, &k, b"1", lease).await?;
    let mut watch = store.watch(&prefix("keepalive"), 0).await?;
    let mut last_refresh = Instant::now();
    // Twice the TTL, refreshed every half TTL.
    for _ in 0..4 {
        sleep(Duration::from_secs(1)).await;
        store.keep_alive(lease).await?;
        last_refresh = Instant::now();
    }
    assert!(
        store.get(&k).await?.is_some(),
        "a kept-alive lease must not expire"
    );

    let event = next_event(&mut watch).await?;
    let waited = last_refresh.elapsed();
    assert_eq!(
        (event.kind, event.kv.key.as_slice()),
        (EventKind::Delete, k.as_slice())
    );
    assert!(
        waited >= Duration::from_millis(1500),
        "expired {waited:?} after a keep-alive"
    );
    Ok(())
}

async fn revoke_deletes_keys_at_once(store: Arc<dyn Store>) -> Result<()> {
    let [a, b, c, d] = ["a", "b", "c", "d"].map(|n| key("revoke", n));
    let lease = store.grant_lease(Duration::from_secs(60)).await?;
    put_with_lease(&store, &a, b"1", lease).await?;
    put_with_lease(&store, &b, b"1", lease).await?;
    store.put(&c, b"1").await?;
    put_with_lease(&store, &d, b"1", lease).await?;
    // A put without a lease detaches the key from its lease.
    store.put(&d, b"2").await?;
    let before = store.current_revision().await?;
    let mut watch = store.watch(&prefix("revoke"), before + 1).await?;

    store.revoke_lease(lease).await?;
    assert_eq!(store.get(&a).await?, None);
    assert_eq!(store.get(&b).await?, None);
    assert!(store.get(&c).await?.is_some());
    assert_eq!(value(&store, &d).await?.as_deref(), Some(&b"2"[..]));
    assert_eq!(
        store.current_revision().await?,
        before + 1,
        "a revoke is one revision"
    );
    let first = next_event(&mut watch).await?;
    let second = next_event(&mut watch).await?;
    let mut deleted = vec![first.kv.key.clone(), second.kv.key.clone()];
    deleted.sort();
    assert_eq!(deleted, vec![a.clone(), b.clone()]);
    assert!(
        [&first, &second]
            .iter()
            .all(|e| e.kind == EventKind::Delete && e.revision() == before + 1)
    );

    let err = store.revoke_lease(lease).await.expect_err("revoking twice");
    assert!(matches!(err, StoreError::LeaseNotFound { .. }), "{err:?}");
    let err = store
        .keep_alive(lease)
        .await
        .expect_err("keep-alive after revoke");
    assert!(matches!(err, StoreError::LeaseNotFound { .. }), "{err:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Embedded store only

mod embedded_only {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn survives_reopen_and_revision_continues() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("store.redb");
        let [a, b, leased] = ["a", "b", "leased"].map(|n| key("reopen", n));
        let (r_b, compacted, lease) = {
            let store = EmbeddedStore::open(&path).await?;
            let r_a = store.put(&a, b"1").await?;
            let r_b = store.put(&b, b"2").await?;
            store.compact(r_b).await?;
            let lease = store.grant_lease(Duration::from_secs(10)).await?;
            store
                .txn(
                    vec![],
                    vec![Op::put_with_lease(leased.clone(), "l", lease)],
                    vec![],
                )
                .await?;
            assert_eq!(r_b, r_a + 1);
            (r_b, r_b, lease)
        };
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&path).await?);
        assert_eq!(value(&store, &a).await?.as_deref(), Some(&b"1"[..]));
        assert_eq!(store.current_revision().await?, r_b + 1);
        assert_eq!(
            store.put(&a, b"3").await?,
            r_b + 2,
            "revision continues after reopen"
        );
        let err = store
            .range(&prefix("reopen"), Some(compacted - 1))
            .await
            .expect_err("compaction persists");
        assert!(
            matches!(err, StoreError::Compacted { compacted: c, .. } if c == compacted),
            "{err:?}"
        );
        // History survives too: a watch from before the reopen replays it.
        let mut watch = store.watch(&prefix("reopen"), r_b).await?;
        let revisions = [
            next_event(&mut watch).await?.revision(),
            next_event(&mut watch).await?.revision(),
            next_event(&mut watch).await?.revision(),
        ];
        assert_eq!(revisions, [r_b, r_b + 1, r_b + 2]);
        // The lease survived with a fresh TTL, and still expires.
        store.keep_alive(lease).await?;
        let event = next_event(&mut watch).await?;
        assert_eq!((event.kind, event.kv.key), (EventKind::Delete, leased));
        // A second handle on an open file is refused, not corrupted.
        assert!(EmbeddedStore::open(&path).await.is_err());
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn lagging_watcher_catches_up_from_the_log() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let options = EmbeddedOptions { watch_buffer: 4 };
        let store = EmbeddedStore::open_with(dir.path().join("s.redb"), options).await?;
        let mut watch = store.watch(&prefix("lag"), 0).await?;
        let first = store.put(&key("lag", "0"), b"0").await?;
        // Read one so the watcher is live, then fall far behind the 4-slot channel.
        assert_eq!(next_event(&mut watch).await?.revision(), first);
        for i in 1..100 {
            store.put(&key("lag", &i.to_string()), b"x").await?;
        }
        for i in 1..100 {
            assert_eq!(next_event(&mut watch).await?.revision(), first + i);
        }
        let last = store.put(&key("lag", "last"), b"x").await?;
        assert_eq!(next_event(&mut watch).await?.revision(), last);
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn compaction_overtaking_a_watcher_ends_it_with_compacted() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let options = EmbeddedOptions { watch_buffer: 2 };
        let store = EmbeddedStore::open_with(dir.path().join("s.redb"), options).await?;
        let start = store.current_revision().await? + 1;
        let mut watch = store.watch(&prefix("overtaken"), start).await?;
        for i in 0..10 {
            store.put(&key("overtaken", &i.to_string()), b"x").await?;
        }
        let now = store.current_revision().await?;
        store.compact(now).await?;
        let err = next_event(&mut watch).await.expect_err("history is gone");
        let err = err.downcast::<StoreError>()?;
        assert!(
            matches!(err, StoreError::Compacted { requested, compacted } if requested == start && compacted == now),
            "{err:?}"
        );
        assert!(
            watch.next().await.is_none(),
            "the stream ends after the error"
        );
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_store_ends_watches() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let store = EmbeddedStore::open(dir.path().join("s.redb")).await?;
        let mut watch = store.watch(b"", 0).await?;
        drop(store);
        let err = next_event(&mut watch).await.expect_err("store is gone");
        assert!(matches!(err.downcast::<StoreError>()?, StoreError::Closed));
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// etcd only

mod etcd_only {
    use super::*;

    #[tokio::test]
    async fn unreachable_etcd_is_unavailable_within_the_timeout() -> Result<()> {
        let (port, _) = free_ports()?;
        let mut options = EtcdOptions::new([format!("http://127.0.0.1:{port}")]);
        options.request_timeout = Duration::from_millis(300);
        options.connect_timeout = Duration::from_millis(300);
        let store = EtcdStore::connect(options).await?;
        let started = std::time::Instant::now();
        let err = store
            .current_revision()
            .await
            .expect_err("nothing listens there");
        assert!(err.is_retryable(), "{err:?}");
        assert!(matches!(
            err,
            StoreError::Unavailable {
                operation: "current revision",
                ..
            }
        ));
        assert!(started.elapsed() < Duration::from_secs(3));
        Ok(())
    }

    #[tokio::test]
    async fn watch_resumes_after_etcd_restart() -> Result<()> {
        if !etcd_available() {
            return Ok(());
        }
        let mut server = EtcdServer::start().await?;
        let store = EtcdStore::connect(EtcdOptions::new([server.client_url.clone()])).await?;
        let before = store.put(&key("resume", "a"), b"1").await?;
        let mut watch = store.watch(&prefix("resume"), 0).await?;
        let ra = store.put(&key("resume", "a"), b"2").await?;
        assert_eq!(ra, before + 1);
        assert_eq!(next_event(&mut watch).await?.revision(), ra);

        server.restart().await?;
        // The store may need a moment to reconnect; the write itself is what we wait for.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let rb = loop {
            match store.put(&key("resume", "b"), b"1").await {
                Ok(revision) => break revision,
                Err(err) if err.is_retryable() && std::time::Instant::now() < deadline => {
                    sleep(Duration::from_millis(100)).await;
                }
                Err(err) => return Err(err.into()),
            }
        };
        let event = next_event(&mut watch).await?;
        assert_eq!(
            (event.revision(), event.kv.key),
            (rb, key("resume", "b")),
            "no duplicate, no gap"
        );
        Ok(())
    }
}
