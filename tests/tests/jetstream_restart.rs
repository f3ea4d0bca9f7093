//! A tail survives a nats-server restart: killed and started again on the same
//! store dir while the tail runs, it resumes and delivers every event exactly once.

use std::collections::HashSet;
use std::time::Duration;

use kiln::store::jetstream::JetStreamStore;
use kiln::store::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StoreError};
use kiln_tests::conformance::{collect_tail, events, sid};
use kiln_tests::nats::{NatsServer, test_config};
use uuid::Uuid;

/// Appends, retrying while the server is away. Retries reuse the event ids, so
/// an append whose ack was lost in the restart is not written twice.
async fn append_until_acked(store: &JetStreamStore, stream: &str, evs: Vec<NewEvent>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let req = AppendRequest::new(sid(stream), ExpectedVersion::Any, evs.clone());
        match store.append(req).await {
            Ok(_) => return,
            Err(e @ (StoreError::Timeout { .. } | StoreError::Backend { .. }))
                if tokio::time::Instant::now() < deadline =>
            {
                eprintln!("append to {stream} while the server restarts: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("append to {stream}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tail_resumes_after_server_restart_exactly_once() {
    const BEFORE: u64 = 60;
    const AFTER: u64 = 60;
    let mut server = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .unwrap();
    let mut config = test_config(&server.url());
    config.request_timeout_ms = 2_000;
    let store = JetStreamStore::connect(config).await.expect("connect");
    let total = (BEFORE + AFTER) as usize;
    let collector = {
        let store = store.clone();
        tokio::spawn(async move { collect_tail(&store, 1, total).await })
    };
    let mut appended = Vec::new();
    for i in 0..BEFORE / 3 {
        let evs = events(i * 3, 3);
        appended.extend(evs.iter().map(|e| e.id));
        append_until_acked(&store, &format!("before-{}", i % 4), evs).await;
    }
    // Give the tail time to be somewhere in the middle, then pull the plug.
    tokio::time::sleep(Duration::from_millis(50)).await;
    server = tokio::task::spawn_blocking(move || {
        server.restart();
        server
    })
    .await
    .unwrap();
    for i in 0..AFTER / 2 {
        let evs = events(1000 + i * 2, 2);
        appended.extend(evs.iter().map(|e| e.id));
        append_until_acked(&store, &format!("after-{}", i % 4), evs).await;
    }
    let seen = collector.await.expect("the tail delivered every event");
    let ids: Vec<Uuid> = seen.iter().map(|e| e.id).collect();
    let unique: HashSet<Uuid> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "no event is delivered twice");
    assert_eq!(unique, appended.iter().copied().collect::<HashSet<_>>());
    for w in seen.windows(2) {
        assert!(w[0].position < w[1].position, "positions strictly increase");
    }
    drop(store);
    drop(server);
}
