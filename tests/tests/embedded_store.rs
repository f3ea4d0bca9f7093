//! The store conformance suite on the embedded RocksDB backend, plus what only
//! the embedded backend promises (gap-free positions).

use kiln::store::{AppendRequest, ExpectedVersion};
use kiln_tests::conformance::{Harness, collect_tail, events, sid};
use kiln_tests::embedded::EmbeddedHarness;

kiln_tests::store_conformance!(EmbeddedHarness);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn positions_are_gap_free_from_one() {
    let h = EmbeddedHarness::start().await;
    let s = h.store();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let s = h.store();
            tokio::spawn(async move {
                s.append(AppendRequest::new(
                    sid(&format!("gap-{i}")),
                    ExpectedVersion::Any,
                    events(0, 1 + i % 4),
                ))
                .await
                .expect("append")
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let head = s.head().await.unwrap();
    let all = collect_tail(&*s, 1, head as usize).await;
    let positions: Vec<u64> = all.iter().map(|e| e.position).collect();
    assert_eq!(positions, (1..=head).collect::<Vec<_>>());
}

/// A tail still held (by a worker being stopped, or a task reading it
/// ahead) must not keep the log's database open: dropping the store lets
/// the same directory be opened again at once (a restart in one process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_left_open_does_not_keep_the_log_open() {
    use futures::StreamExt;
    use kiln::store::EventStore;
    use kiln::store::embedded::{EmbeddedConfig, EmbeddedStore};
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(EmbeddedConfig::new(dir.path())).expect("open");
    store
        .append(AppendRequest::new(
            sid("held-1"),
            ExpectedVersion::Any,
            events(0, 3),
        ))
        .await
        .expect("append");
    let mut tail = store.tail(1);
    let first = tail.next().await.expect("a batch").expect("read");
    assert_eq!(first.len(), 3);
    drop(store);
    let again = EmbeddedStore::open(EmbeddedConfig::new(dir.path()))
        .expect("the log opens again while an old tail is still held");
    assert_eq!(again.head().await.expect("head"), 3);
    // The old tail ends instead of reading a closed store.
    assert!(tail.next().await.is_none());
}
