//! The store core's conformance suite: the executable contract of `EventStore`.
//!
//! Written once, run against every backend: a backend's test file implements
//! [`Harness`] and invokes [`store_conformance!`](crate::store_conformance).
//! Nothing here knows which backend it runs on.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use kiln::store::{
    AppendCondition, AppendRequest, AppendResult, EventStore, ExpectedVersion, NewEvent,
    RecordedEvent, StoreError, StreamHead, StreamId,
};
use tokio::sync::Barrier;
use uuid::Uuid;

/// How a backend's tests get a store.
#[async_trait]
pub trait Harness: Send + Sync + Sized + 'static {
    /// A fresh, empty store on storage of its own.
    async fn start() -> Self;
    /// The store. Drop every handle (and tail) before calling [`Harness::reopen`].
    fn store(&self) -> Arc<dyn EventStore>;
    /// Closes the store and opens it again on the same storage.
    async fn reopen(&mut self);
}

/// Generates one `#[tokio::test]` per conformance case for a harness type.
#[macro_export]
macro_rules! store_conformance {
    ($harness:ty) => {
        $crate::store_conformance!($harness;
            empty_stream_is_version_zero,
            fifty_racers_one_winner,
            expected_version_kinds,
            latest_version_after_every_kind_of_append,
            latest_version_on_a_100k_event_stream,
            multi_event_append_is_all_or_nothing,
            idempotent_retry_returns_original_result,
            eight_tag_racers_one_commits,
            tag_condition_only_sees_its_tags_after_its_position,
            head_is_the_last_event_even_after_a_tagged_append,
            tail_sees_every_event_once_in_order_across_reopen,
            tail_from_the_middle_starts_there,
            read_stream_pages_by_version,
            snapshots_distinguish_missing_from_present,
            bad_input_is_refused_and_nothing_written,
            the_input_contract_table,
            recorded_envelope_round_trips,
        );
    };
    ($harness:ty; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                $crate::conformance::$case::<$harness>().await
            }
        )+
    };
}

pub fn sid(s: &str) -> StreamId {
    StreamId::new(s).expect("test stream ids are valid")
}

pub fn event(n: u64) -> NewEvent {
    NewEvent::json("Counted", &serde_json::json!({ "n": n }))
}

pub fn events(from: u64, count: u64) -> Vec<NewEvent> {
    (from..from + count).map(event).collect()
}

async fn append(
    store: &dyn EventStore,
    stream: &str,
    expected: ExpectedVersion,
    evs: Vec<NewEvent>,
) -> Result<AppendResult, StoreError> {
    store
        .append(AppendRequest::new(sid(stream), expected, evs))
        .await
}

async fn must_append(
    store: &dyn EventStore,
    stream: &str,
    expected: ExpectedVersion,
    evs: Vec<NewEvent>,
) -> AppendResult {
    append(store, stream, expected, evs)
        .await
        .unwrap_or_else(|e| panic!("append to {stream} should succeed: {e}"))
}

async fn version(store: &dyn EventStore, stream: &str) -> u64 {
    store
        .latest_version(&sid(stream))
        .await
        .expect("latest_version")
}

/// Collects events from a tail until `count` have arrived (or panics after 60 s).
pub async fn collect_tail(store: &dyn EventStore, from: u64, count: usize) -> Vec<RecordedEvent> {
    let mut tail = store.tail(from);
    let mut out = Vec::with_capacity(count);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while out.len() < count {
        match tokio::time::timeout_at(deadline, tail.next()).await {
            Ok(Some(Ok(batch))) => {
                assert!(
                    !batch.is_empty(),
                    "a tail must never hand out an empty batch"
                );
                out.extend(batch)
            }
            Ok(Some(Err(e))) => panic!("tail failed: {e}"),
            Ok(None) => panic!("tail ended after {} of {count} events", out.len()),
            Err(_) => panic!("tail saw {} of {count} events within 60 s", out.len()),
        }
    }
    // Nothing more than what was committed may arrive.
    if let Ok(Some(extra)) = tokio::time::timeout(Duration::from_millis(200), tail.next()).await {
        panic!("tail delivered more than the {count} committed events: {extra:?}");
    }
    out
}

fn assert_strictly_increasing(events: &[RecordedEvent]) {
    for w in events.windows(2) {
        assert!(
            w[0].position < w[1].position,
            "positions must strictly increase: {} then {}",
            w[0].position,
            w[1].position
        );
    }
}

pub async fn empty_stream_is_version_zero<H: Harness>() {
    let h = H::start().await;
    let store = h.store();
    assert_eq!(version(&*store, "nobody-1").await, 0);
    assert_eq!(
        store.latest(&sid("nobody-1")).await.unwrap(),
        StreamHead::default()
    );
    assert!(
        store
            .read_stream(&sid("nobody-1"), 1, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.head().await.unwrap(), 0);
}

pub async fn fifty_racers_one_winner<H: Harness>() {
    const RACERS: usize = 50;
    const ROUNDS: u64 = 100;
    let h = H::start().await;
    let store = h.store();
    for round in 0..ROUNDS {
        let barrier = Arc::new(Barrier::new(RACERS));
        let tasks: Vec<_> = (0..RACERS)
            .map(|i| {
                let (store, barrier) = (store.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    append(
                        &*store,
                        "race-1",
                        ExpectedVersion::Exact(round),
                        vec![event(round * 1000 + i as u64)],
                    )
                    .await
                })
            })
            .collect();
        let (mut wins, mut conflicts) = (0, 0);
        for t in tasks {
            match t.await.expect("racer task") {
                Ok(r) => {
                    assert_eq!(r.version, round + 1);
                    wins += 1;
                }
                Err(StoreError::VersionConflict {
                    actual, expected, ..
                }) => {
                    assert_eq!(expected, ExpectedVersion::Exact(round));
                    assert_eq!(actual, round + 1, "a conflict carries the current version");
                    conflicts += 1;
                }
                Err(e) => panic!("round {round}: unexpected error {e}"),
            }
        }
        assert_eq!((wins, conflicts), (1, RACERS - 1), "round {round}");
        assert_eq!(version(&*store, "race-1").await, round + 1);
    }
}

pub async fn expected_version_kinds<H: Harness>() {
    let h = H::start().await;
    let s = &*h.store();
    let conflict = |r: Result<AppendResult, StoreError>, want_actual: u64| match r {
        Err(StoreError::VersionConflict { actual, .. }) => assert_eq!(actual, want_actual),
        other => panic!("expected a version conflict, got {other:?}"),
    };
    conflict(
        append(s, "k-1", ExpectedVersion::Exists, vec![event(0)]).await,
        0,
    );
    conflict(
        append(s, "k-1", ExpectedVersion::Exact(1), vec![event(0)]).await,
        0,
    );
    must_append(s, "k-1", ExpectedVersion::NoStream, vec![event(1)]).await;
    conflict(
        append(s, "k-1", ExpectedVersion::NoStream, vec![event(0)]).await,
        1,
    );
    must_append(s, "k-1", ExpectedVersion::Exists, vec![event(2)]).await;
    conflict(
        append(s, "k-1", ExpectedVersion::Exact(1), vec![event(0)]).await,
        2,
    );
    must_append(s, "k-1", ExpectedVersion::Exact(2), vec![event(3)]).await;
    must_append(s, "k-1", ExpectedVersion::Any, vec![event(4)]).await;
    must_append(s, "k-2", ExpectedVersion::Exact(0), vec![event(5)]).await;
    assert_eq!(version(s, "k-1").await, 4);
    assert_eq!(version(s, "k-2").await, 1);
}

pub async fn latest_version_after_every_kind_of_append<H: Harness>() {
    let h = H::start().await;
    let s = &*h.store();
    assert_eq!(version(s, "lv-1").await, 0);
    let r = must_append(s, "lv-1", ExpectedVersion::NoStream, vec![event(1)]).await;
    assert_eq!((version(s, "lv-1").await, r.version), (1, 1));
    must_append(s, "lv-1", ExpectedVersion::Any, vec![event(2)]).await;
    assert_eq!(version(s, "lv-1").await, 2);
    must_append(s, "lv-1", ExpectedVersion::Exists, events(3, 3)).await;
    assert_eq!(version(s, "lv-1").await, 5);
    let r = must_append(s, "lv-1", ExpectedVersion::Exact(5), events(6, 2)).await;
    assert_eq!((version(s, "lv-1").await, r.version), (7, 7));
    let cond = AppendCondition {
        tags: vec!["lv-tag".into()],
        after: s.head().await.unwrap(),
    };
    let req = AppendRequest::new(sid("lv-1"), ExpectedVersion::Exact(7), vec![event(8)])
        .with_condition(cond);
    let r = s.append(req).await.expect("conditioned append");
    assert_eq!((version(s, "lv-1").await, r.version), (8, 8));
    // Another stream's appends move the log's head but not this stream's version.
    must_append(s, "lv-2", ExpectedVersion::Any, events(0, 4)).await;
    assert_eq!(version(s, "lv-1").await, 8);
    let head = s.latest(&sid("lv-1")).await.unwrap();
    assert_eq!(
        head.position, r.position,
        "latest position is the last event's"
    );
    // A failed append changes nothing.
    let _ = append(s, "lv-1", ExpectedVersion::Exact(1), vec![event(9)]).await;
    assert_eq!(version(s, "lv-1").await, 8);
}

pub async fn latest_version_on_a_100k_event_stream<H: Harness>() {
    const TOTAL: u64 = 100_000;
    const CHUNK: u64 = 500;
    let h = H::start().await;
    let s = &*h.store();
    let mut last = None;
    for i in 0..TOTAL / CHUNK {
        let r = must_append(
            s,
            "long-1",
            ExpectedVersion::Exact(i * CHUNK),
            events(i * CHUNK, CHUNK),
        )
        .await;
        last = Some(r);
    }
    let last = last.expect("appended");
    assert_eq!(last.version, TOTAL);
    assert_eq!(version(s, "long-1").await, TOTAL);
    assert_eq!(
        s.latest(&sid("long-1")).await.unwrap().position,
        last.position
    );
    must_append(
        s,
        "long-1",
        ExpectedVersion::Exact(TOTAL),
        vec![event(TOTAL)],
    )
    .await;
    assert_eq!(version(s, "long-1").await, TOTAL + 1);
    let tail_end = s.read_stream(&sid("long-1"), TOTAL - 1, 10).await.unwrap();
    let versions: Vec<u64> = tail_end.iter().map(|e| e.version).collect();
    assert_eq!(versions, vec![TOTAL - 1, TOTAL, TOTAL + 1]);
}

pub async fn multi_event_append_is_all_or_nothing<H: Harness>() {
    let h = H::start().await;
    let s = &*h.store();
    must_append(s, "atomic-0", ExpectedVersion::Any, vec![event(0)]).await;
    let head = s.head().await.unwrap();
    // Third event is not JSON: the whole append is refused.
    let mut evs = events(1, 2);
    evs.push(NewEvent::new("Broken", "{not json"));
    match append(s, "atomic-1", ExpectedVersion::Any, evs).await {
        Err(StoreError::InvalidEvent { index, reason, .. }) => {
            assert_eq!(index, 2);
            assert!(reason.contains("JSON"), "{reason}");
        }
        other => panic!("expected InvalidEvent, got {other:?}"),
    }
    // A stale expected version: the whole append is refused.
    let r = append(s, "atomic-0", ExpectedVersion::Exact(0), events(1, 5)).await;
    assert!(
        matches!(r, Err(StoreError::VersionConflict { .. })),
        "{r:?}"
    );
    // A later event reuses a committed id: the whole append is refused.
    let committed = s.read_stream(&sid("atomic-0"), 1, 1).await.unwrap()[0].id;
    let evs = vec![event(1), event(2).with_id(committed)];
    let r = append(s, "atomic-1", ExpectedVersion::Any, evs).await;
    assert!(
        matches!(r, Err(StoreError::DuplicateEventId { .. })),
        "{r:?}"
    );
    assert_eq!(version(s, "atomic-1").await, 0);
    assert_eq!(version(s, "atomic-0").await, 1);
    assert!(
        s.read_stream(&sid("atomic-1"), 1, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.head().await.unwrap(),
        head,
        "a refused append writes nothing"
    );
    // And a good multi-event append lands whole, in order.
    let r = must_append(s, "atomic-1", ExpectedVersion::NoStream, events(10, 4)).await;
    assert_eq!(r.version, 4);
    let got = s.read_stream(&sid("atomic-1"), 1, 10).await.unwrap();
    let ns: Vec<_> = got.iter().map(|e| e.data.clone()).collect();
    let want: Vec<_> = events(10, 4).into_iter().map(|e| e.data).collect();
    assert_eq!(ns, want);
    assert_eq!(got[0].position, r.first_position);
    assert_eq!(got[3].position, r.position);
}

pub async fn idempotent_retry_returns_original_result<H: Harness>() {
    let h = H::start().await;
    let s = &*h.store();
    let evs = events(0, 3);
    let first = must_append(s, "idem-1", ExpectedVersion::NoStream, evs.clone()).await;
    let head = s.head().await.unwrap();
    // The same append again, even with an expected version that no longer holds.
    let again = must_append(s, "idem-1", ExpectedVersion::NoStream, evs.clone()).await;
    assert_eq!(again, first, "a retry returns the original result");
    assert_eq!(version(s, "idem-1").await, 3);
    assert_eq!(s.head().await.unwrap(), head, "a retry writes nothing");
    // A retry racing itself still commits once.
    let shared = events(100, 2);
    let handles: Vec<_> = (0..10)
        .map(|_| {
            let (store, evs) = (h.store(), shared.clone());
            tokio::spawn(async move {
                store
                    .append(AppendRequest::new(sid("idem-2"), ExpectedVersion::Any, evs))
                    .await
            })
        })
        .collect();
    let mut results = HashSet::new();
    for t in handles {
        results.insert(t.await.unwrap().expect("every retry succeeds"));
    }
    assert_eq!(
        results.len(),
        1,
        "all retries report one result: {results:?}"
    );
    assert_eq!(version(s, "idem-2").await, 2);
    // Only part of the ids were committed: that is not a retry but a conflict.
    let partial = vec![evs[0].clone(), event(7)];
    let r = append(s, "idem-1", ExpectedVersion::Any, partial).await;
    assert!(
        matches!(r, Err(StoreError::DuplicateEventId { .. })),
        "{r:?}"
    );
    // The same ids on another stream: a conflict too.
    let r = append(s, "idem-3", ExpectedVersion::Any, evs).await;
    assert!(
        matches!(r, Err(StoreError::DuplicateEventId { .. })),
        "{r:?}"
    );
    assert_eq!(version(s, "idem-3").await, 0);
}

pub async fn eight_tag_racers_one_commits<H: Harness>() {
    const RACERS: usize = 8;
    const ROUNDS: usize = 20;
    let h = H::start().await;
    let store = h.store();
    for round in 0..ROUNDS {
        let tag = format!("course-{round}");
        // Every racer decided on the same read of the log.
        let after = store.head().await.unwrap();
        let barrier = Arc::new(Barrier::new(RACERS));
        let tasks: Vec<_> = (0..RACERS)
            .map(|i| {
                let (store, barrier, tag) = (store.clone(), barrier.clone(), tag.clone());
                tokio::spawn(async move {
                    let req = AppendRequest::new(
                        sid(&format!("enrolment-{round}x{i}")),
                        ExpectedVersion::Any,
                        vec![event(i as u64).with_tags([tag.clone()])],
                    )
                    .with_condition(AppendCondition {
                        tags: vec![tag],
                        after,
                    });
                    barrier.wait().await;
                    store.append(req).await
                })
            })
            .collect();
        let (mut wins, mut conflicts) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => wins += 1,
                Err(StoreError::TagConflict {
                    tag: t, position, ..
                }) => {
                    assert_eq!(t, tag);
                    assert!(position > after);
                    conflicts += 1;
                }
                Err(e) => panic!("round {round}: unexpected error {e}"),
            }
        }
        assert_eq!((wins, conflicts), (1, RACERS - 1), "round {round}");
    }
}

pub async fn tag_condition_only_sees_its_tags_after_its_position<H: Harness>() {
    let h = H::start().await;
    let s = &*h.store();
    let tagged = vec![event(1).with_tags(["alpha", "beta"])];
    let r = must_append(s, "tagged-1", ExpectedVersion::Any, tagged).await;
    let conditioned = |tags: &[&str], after: u64| {
        AppendRequest::new(sid("tagged-2"), ExpectedVersion::Any, vec![event(2)]).with_condition(
            AppendCondition {
                tags: tags.iter().map(|t| t.to_string()).collect(),
                after,
            },
        )
    };
    // The tagged event is at r.position: a condition taken at or after it passes.
    s.append(conditioned(&["alpha"], r.position))
        .await
        .expect("not after");
    // Taken before it: fails, naming the tag and the position.
    match s
        .append(conditioned(&["gamma", "beta"], r.position - 1))
        .await
    {
        Err(StoreError::TagConflict { tag, position, .. }) => {
            assert_eq!((tag.as_str(), position), ("beta", r.position))
        }
        other => panic!("expected a tag conflict, got {other:?}"),
    }
    // Tags nobody carries never conflict.
    s.append(conditioned(&["gamma"], 0))
        .await
        .expect("unused tag");
    // Untagged events never move a tag.
    must_append(s, "tagged-3", ExpectedVersion::Any, vec![event(3)]).await;
    s.append(conditioned(&["alpha"], r.position))
        .await
        .expect("still not after");
    let evs = s.read_stream(&sid("tagged-1"), 1, 1).await.unwrap();
    assert_eq!(evs[0].tags, vec!["alpha".to_string(), "beta".to_string()]);
}

/// `head()` is the last *event*'s position, one a tail delivers, even when the
/// backend wrote something after it (JetStream's tag markers): whoever waits
/// for a tail to reach the head (a warming view) would otherwise wait for the
/// next append.
pub async fn head_is_the_last_event_even_after_a_tagged_append<H: Harness>() {
    let h = H::start().await;
    let s = &*h.store();
    let plain = must_append(s, "head-1", ExpectedVersion::Any, vec![event(1)]).await;
    assert_eq!(s.head().await.unwrap(), plain.position);
    let tagged = vec![event(2), event(3).with_tags(["alpha", "beta"])];
    let r = must_append(s, "head-2", ExpectedVersion::Any, tagged).await;
    assert_eq!(s.head().await.unwrap(), r.position, "after a tagged append");
    let conditioned = AppendRequest::new(sid("head-3"), ExpectedVersion::Any, vec![event(4)])
        .with_condition(AppendCondition {
            tags: vec!["beta".into(), "gamma".into()],
            after: r.position,
        });
    let c = s.append(conditioned).await.expect("not after");
    assert_eq!(
        s.head().await.unwrap(),
        c.position,
        "after a conditioned append"
    );
    let last = collect_tail(s, c.position, 1).await;
    assert_eq!(last[0].position, c.position, "a tail delivers the head");
}

pub async fn tail_sees_every_event_once_in_order_across_reopen<H: Harness>() {
    const WRITERS: u64 = 8;
    const APPENDS: u64 = 40;
    let mut h = H::start().await;
    let store = h.store();
    let collector = {
        let store = store.clone();
        tokio::spawn(async move {
            // Each writer appends 1 + (i % 3) events per append.
            let total = (0..APPENDS).map(|i| 1 + i % 3).sum::<u64>() * WRITERS;
            collect_tail(&*store, 1, total as usize).await
        })
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..APPENDS {
                    let evs = events(w * 1000 + i * 10, 1 + i % 3);
                    ids.extend(evs.iter().map(|e| e.id));
                    must_append(&*store, &format!("tail-{w}"), ExpectedVersion::Any, evs).await;
                }
                ids
            })
        })
        .collect();
    let mut appended = HashSet::new();
    for w in writers {
        appended.extend(w.await.unwrap());
    }
    let seen = collector.await.unwrap();
    assert_strictly_increasing(&seen);
    let seen_ids: HashSet<Uuid> = seen.iter().map(|e| e.id).collect();
    assert_eq!(seen_ids.len(), seen.len(), "no event is delivered twice");
    assert_eq!(seen_ids, appended, "every committed event is delivered");
    for w in 0..WRITERS {
        let per_stream: Vec<u64> = seen
            .iter()
            .filter(|e| e.stream.as_str() == format!("tail-{w}"))
            .map(|e| e.version)
            .collect();
        let want: Vec<u64> = (1..=per_stream.len() as u64).collect();
        assert_eq!(
            per_stream, want,
            "stream tail-{w} is delivered in version order"
        );
    }
    let checkpoint = seen.last().unwrap().position;
    drop(store);
    h.reopen().await;
    let store = h.store();
    assert_eq!(
        store.head().await.unwrap(),
        checkpoint,
        "the head survives a reopen"
    );
    let later = events(9000, 5);
    let later_ids: Vec<Uuid> = later.iter().map(|e| e.id).collect();
    let r = must_append(&*store, "tail-after", ExpectedVersion::NoStream, later).await;
    assert!(r.first_position > checkpoint);
    let resumed = collect_tail(&*store, checkpoint + 1, 5).await;
    assert_eq!(resumed.iter().map(|e| e.id).collect::<Vec<_>>(), later_ids);
    let everything = collect_tail(&*store, 1, seen.len() + 5).await;
    assert_eq!(
        &everything[..seen.len()],
        &seen[..],
        "the log reads the same after reopen"
    );
}

pub async fn tail_from_the_middle_starts_there<H: Harness>() {
    let h = H::start().await;
    let s = &*h.store();
    let mut results = Vec::new();
    for i in 0..10 {
        results.push(must_append(s, "mid-1", ExpectedVersion::Any, vec![event(i)]).await);
    }
    let from = results[6].position;
    let got = collect_tail(s, from, 4).await;
    let versions: Vec<u64> = got.iter().map(|e| e.version).collect();
    assert_eq!(versions, vec![7, 8, 9, 10]);
    // A tail past the head waits for the next commit, then delivers it.
    let head = s.head().await.unwrap();
    let waiting = {
        let store = h.store();
        tokio::spawn(async move { collect_tail(&*store, head + 1, 1).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = must_append(s, "mid-2", ExpectedVersion::Any, vec![event(99)]).await;
    let got = waiting.await.unwrap();
    assert_eq!(got[0].position, r.position);
}

pub async fn read_stream_pages_by_version<H: Harness>() {
    let h = H::start().await;
    let s = &*h.store();
    for i in 0..5 {
        must_append(s, "page-1", ExpectedVersion::Any, events(i * 10, 5)).await;
        must_append(s, "page-2", ExpectedVersion::Any, vec![event(i)]).await;
    }
    let mut all = Vec::new();
    let mut from = 1;
    loop {
        let page = s.read_stream(&sid("page-1"), from, 7).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 7);
        from = page.last().unwrap().version + 1;
        all.extend(page);
    }
    let versions: Vec<u64> = all.iter().map(|e| e.version).collect();
    assert_eq!(versions, (1..=25).collect::<Vec<_>>());
    assert!(all.iter().all(|e| e.stream.as_str() == "page-1"));
    assert_strictly_increasing(&all);
    // A stream id that is a prefix of another reads only its own events.
    must_append(s, "page", ExpectedVersion::Any, vec![event(0)]).await;
    assert_eq!(s.read_stream(&sid("page"), 1, 100).await.unwrap().len(), 1);
    assert!(
        s.read_stream(&sid("page-1"), 26, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn snapshots_distinguish_missing_from_present<H: Harness>() {
    let h = H::start().await;
    let s = &*h.store();
    match s.latest_snapshot(&sid("snap-1")).await {
        Err(StoreError::SnapshotNotFound { stream }) => assert_eq!(stream.as_str(), "snap-1"),
        other => panic!("expected SnapshotNotFound, got {other:?}"),
    }
    must_append(s, "snap-1", ExpectedVersion::Any, events(0, 5)).await;
    s.save_snapshot(&sid("snap-1"), 2, "state-at-2".into())
        .await
        .unwrap();
    s.save_snapshot(&sid("snap-1"), 5, "state-at-5".into())
        .await
        .unwrap();
    // An older snapshot arriving late does not replace a newer one.
    s.save_snapshot(&sid("snap-1"), 3, "state-at-3".into())
        .await
        .unwrap();
    let snap = s.latest_snapshot(&sid("snap-1")).await.unwrap();
    assert_eq!((snap.version, &snap.data[..]), (5, &b"state-at-5"[..]));
    match s.save_snapshot(&sid("snap-1"), 6, "ahead".into()).await {
        Err(StoreError::SnapshotAhead {
            version, latest, ..
        }) => assert_eq!((version, latest), (6, 5)),
        other => panic!("expected SnapshotAhead, got {other:?}"),
    }
    assert!(matches!(
        s.latest_snapshot(&sid("snap-2")).await,
        Err(StoreError::SnapshotNotFound { .. })
    ));
}

pub async fn bad_input_is_refused_and_nothing_written<H: Harness>() {
    let h = H::start().await;
    let s = &*h.store();
    for bad in ["", "has space", "dot.ted", "wild*", "tail>", "ünïcode"] {
        let e = StreamId::new(bad).unwrap_err();
        assert!(
            matches!(e, StoreError::InvalidStreamId { .. }),
            "{bad:?}: {e}"
        );
        assert!(e.to_string().contains("invalid stream id"), "{e}");
    }
    let e = StreamId::new("x".repeat(201)).unwrap_err();
    assert!(e.to_string().contains("201 bytes"), "{e}");
    let refusals: Vec<(&str, Vec<NewEvent>)> = vec![
        ("zero events", vec![]),
        ("not JSON", vec![NewEvent::new("T", "hello")]),
        (
            "oversized",
            vec![NewEvent::new("T", format!("\"{}\"", "x".repeat(1 << 20)))],
        ),
        ("duplicate ids", {
            let e = event(1);
            vec![e.clone(), e]
        }),
        ("bad type", vec![NewEvent::new("has space", "{}")]),
        ("bad tag", vec![event(1).with_tags(["no.dots"])]),
    ];
    for (what, evs) in refusals {
        let e = append(s, "bad-1", ExpectedVersion::Any, evs)
            .await
            .expect_err(what);
        let named = matches!(
            e,
            StoreError::NoEvents { .. }
                | StoreError::InvalidEvent { .. }
                | StoreError::TooLarge { .. }
                | StoreError::DuplicateEventId { .. }
                | StoreError::InvalidTag { .. }
        );
        assert!(named, "{what}: {e}");
        assert!(e.to_string().contains("bad-1") || matches!(e, StoreError::InvalidTag { .. }));
    }
    let too_many = events(0, 10_000);
    let e = append(s, "bad-1", ExpectedVersion::Any, too_many)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::TooLarge { .. }), "{e}");
    assert_eq!(s.head().await.unwrap(), 0, "nothing was written");
    assert_eq!(version(s, "bad-1").await, 0);
}

/// One input row: what it is, its events, its condition tags, its verdict.
type Row = (&'static str, Vec<NewEvent>, Option<Vec<String>>, Verdict);

/// What an input row must give: accepted, or refused with this error variant
/// and a message naming the reason.
enum Verdict {
    Accepted,
    Refused(&'static str, &'static str),
}

fn variant(e: &StoreError) -> &'static str {
    match e {
        StoreError::TooLarge { .. } => "TooLarge",
        StoreError::InvalidEvent { .. } => "InvalidEvent",
        StoreError::InvalidTag { .. } => "InvalidTag",
        StoreError::NoEvents { .. } => "NoEvents",
        StoreError::DuplicateEventId { .. } => "DuplicateEventId",
        _ => "another error",
    }
}

/// One input contract: the same appends at and just past every limit either
/// backend stores (tags per event, metadata bytes, messages per append with
/// one tag marker per distinct tag, sizes), with the same verdict and the same
/// named error on every backend. Accepted rows are read back whole.
pub async fn the_input_contract_table<H: Harness>() {
    use Verdict::{Accepted, Refused};
    let h = H::start().await;
    let s = &*h.store();
    let limits = kiln::store::Limits::default();
    let tag = |i: usize| format!("t{i:0>3}");
    let long_tag = |i: usize| format!("{i:0>200}");
    let with_tags = |n: usize, name: &dyn Fn(usize) -> String| {
        vec![event(1).with_tags((0..n).map(name).collect::<Vec<_>>())]
    };
    let metadata = |bytes: usize| vec![event(1).with_metadata("k", "v".repeat(bytes - 1))];
    let one_tag_each = |n: usize, offset: usize| -> Vec<NewEvent> {
        (0..n)
            .map(|i| event(i as u64).with_tags([tag(i + offset)]))
            .collect()
    };
    let big = |bytes: usize| format!("\"{}\"", "x".repeat(bytes - 2));
    let rows: Vec<Row> = vec![
        (
            "64 tags of 200 bytes on one event",
            with_tags(limits.max_tags_per_event, &long_tag),
            None,
            Accepted,
        ),
        (
            "65 tags on one event",
            with_tags(limits.max_tags_per_event + 1, &tag),
            None,
            Refused("TooLarge", "number of tags"),
        ),
        (
            "metadata at the limit",
            metadata(limits.max_metadata_bytes),
            None,
            Accepted,
        ),
        (
            "metadata one byte past the limit",
            metadata(limits.max_metadata_bytes + 1),
            None,
            Refused("TooLarge", "metadata"),
        ),
        (
            "500 events with a tag each: 1000 messages",
            one_tag_each(500, 0),
            None,
            Accepted,
        ),
        (
            "500 events with a tag each and a condition tag: 1001 messages",
            one_tag_each(500, 500),
            Some(vec!["other".to_string()]),
            Refused("TooLarge", "number of messages"),
        ),
        (
            "501 events",
            events(0, 501),
            None,
            Refused("TooLarge", "number of events"),
        ),
        (
            "one event at the largest data size, with full metadata and tags",
            vec![
                NewEvent::new("T", big(limits.max_event_bytes))
                    .with_metadata("k", "v".repeat(limits.max_metadata_bytes - 1))
                    .with_tags(
                        (0..limits.max_tags_per_event)
                            .map(long_tag)
                            .collect::<Vec<_>>(),
                    ),
            ],
            None,
            Accepted,
        ),
        (
            "eight events of 500 KiB (4,000,000 bytes in one append)",
            (0..8).map(|_| NewEvent::new("T", big(500_000))).collect(),
            None,
            Accepted,
        ),
        (
            "nine events of 500 KiB",
            (0..9).map(|_| NewEvent::new("T", big(500_000))).collect(),
            None,
            Refused("TooLarge", "total size"),
        ),
        (
            "a tag past the id length",
            vec![event(1).with_tags(["x".repeat(201)])],
            None,
            Refused("InvalidTag", "201 bytes"),
        ),
    ];
    for (i, (what, evs, condition, verdict)) in rows.into_iter().enumerate() {
        let stream = sid(&format!("row-{i}"));
        let mut req = AppendRequest::new(stream.clone(), ExpectedVersion::NoStream, evs.clone());
        if let Some(tags) = condition {
            req = req.with_condition(AppendCondition { tags, after: 0 });
        }
        let got = s.append(req).await;
        match (verdict, got) {
            (Accepted, Ok(r)) => {
                let read = s.read_stream(&stream, 1, evs.len() + 1).await.unwrap();
                assert_eq!(read.len(), evs.len(), "{what}: read back");
                assert_eq!(r.version, evs.len() as u64, "{what}");
                for (e, rec) in evs.iter().zip(&read) {
                    assert_eq!(
                        (&rec.id, &rec.tags, &rec.metadata, &rec.data),
                        (&e.id, &e.tags, &e.metadata, &e.data),
                        "{what}: read back"
                    );
                }
            }
            (Accepted, Err(e)) => panic!("{what}: should be accepted, got {e}"),
            (Refused(kind, _), Ok(_)) => panic!("{what}: should be refused ({kind}), was accepted"),
            (Refused(kind, words), Err(e)) => {
                assert_eq!(variant(&e), kind, "{what}: {e}");
                assert!(e.to_string().contains(words), "{what}: {e}");
                assert_eq!(s.latest_version(&stream).await.unwrap(), 0, "{what}");
            }
        }
    }
}

pub async fn recorded_envelope_round_trips<H: Harness>() {
    let h = H::start().await;
    let s = &*h.store();
    let ev = NewEvent::json(
        "user.Registered",
        &serde_json::json!({"name": "Ada", "tags": [1, 2]}),
    )
    .with_metadata("correlation-id", "abc-123")
    .with_metadata("causation", "cmd 7")
    .with_tags(["user-7", "tenant:eu"]);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let r = must_append(s, "user-7", ExpectedVersion::NoStream, vec![ev.clone()]).await;
    let got = s.read_stream(&sid("user-7"), 1, 1).await.unwrap();
    let rec = &got[0];
    assert_eq!(rec.id, ev.id);
    assert_eq!(rec.stream.as_str(), "user-7");
    assert_eq!(rec.stream.category(), "user");
    assert_eq!(rec.event_type, "user.Registered");
    assert_eq!(rec.version, 1);
    assert_eq!(rec.position, r.position);
    assert_eq!(rec.metadata, ev.metadata);
    assert_eq!(rec.tags, ev.tags);
    let data: serde_json::Value = serde_json::from_slice(&rec.data).unwrap();
    assert_eq!(data, serde_json::json!({"name": "Ada", "tags": [1, 2]}));
    assert!(
        rec.timestamp + 5_000 >= before,
        "timestamp is the commit time"
    );
    let tailed = collect_tail(s, r.position, 1).await;
    assert_eq!(&tailed[0], rec, "tail and read_stream agree");
}
