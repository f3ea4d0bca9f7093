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
