//! The JetStream backend in production shape: a 3-node cluster on loopback,
//! streams with 3 replicas. The whole conformance suite runs on it unchanged,
//! then what only replicas can break: reading your own writes right after
//! the ack, and a leader killed under load.

use std::time::Duration;

use kiln::store::{AppendRequest, EventStore, ExpectedVersion};
use kiln_tests::conformance::{Harness, event, sid};
use kiln_tests::nats::ClusterHarness;

kiln_tests::store_conformance!(ClusterHarness);

/// `latest` right after each acknowledged append never answers older than
/// the write: direct gets are answered by any replica (the one nearest the
/// connection first), so without `min_last_seq` a follower a few
/// milliseconds behind would answer the previous version. Also right after
/// a retried append (dedupe replay) and a conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn latest_right_after_the_ack_is_never_stale_on_replicas() {
    let h = ClusterHarness::start().await;
    let writer = h.jetstream().clone();
    assert_eq!(writer.durability_warning(), None, "three replicas");
    let stream = sid("ryw-1");
    for v in 1..=300u64 {
        let r = writer
            .append(AppendRequest::new(
                stream.clone(),
                ExpectedVersion::Exact(v - 1),
                vec![event(v)],
            ))
            .await
            .unwrap_or_else(|e| panic!("append {v}: {e}"));
        let head = writer.latest(&stream).await.unwrap();
        assert_eq!((head.version, head.position), (v, r.position), "append {v}");
        let read = writer.read_stream(&stream, v, 1).await.unwrap();
        assert_eq!(read.len(), 1, "read_stream right after append {v}");
    }
    // A second connection learns the position from the first (as an HTTP
    // client passes it along) and its tail reaches it.
    let reader = kiln_tests::nats::connect_when_ready(h.config()).await;
    let last = writer.latest(&stream).await.unwrap().position;
    let mut tail = reader.tail(1);
    let mut reached = 0;
    while reached < last {
        let batch =
            tokio::time::timeout(Duration::from_secs(30), futures::StreamExt::next(&mut tail))
                .await
                .expect("the tail answers within 30 s")
                .expect("the tail goes on")
                .expect("a batch");
        reached = batch.last().map_or(reached, |e| e.position);
    }
}

/// The event stream's cluster state (leader, replicas) as the server reports it.
async fn cluster_info(
    store: &kiln::store::jetstream::JetStreamStore,
) -> Option<async_nats::jetstream::stream::ClusterInfo> {
    let mut stream = store
        .context()
        .get_stream(&store.config().stream)
        .await
        .expect("the event stream");
    stream.info().await.expect("stream info").cluster.clone()
}

/// What one writer saw: its acknowledged appends and the errors in between.
#[derive(Default)]
struct Written {
    acked: Vec<(u64, u64)>,
    acked_at: Vec<std::time::Instant>,
    errors: Vec<(std::time::Instant, String, bool)>,
    last_ok: Option<std::time::Instant>,
}

/// Appends one event at a time to `stream` until `stop`, retrying each
/// append as is (same event id) until it is acknowledged.
async fn writer(
    store: kiln::store::jetstream::JetStreamStore,
    stream: String,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Written {
    let mut out = Written::default();
    let mut v = 0u64;
    while !*stop.borrow() {
        let req = AppendRequest::new(sid(&stream), ExpectedVersion::Exact(v), vec![event(v + 1)]);
        loop {
            match store.append(req.clone()).await {
                Ok(r) => {
                    assert_eq!(r.version, v + 1, "{stream}");
                    out.acked.push((r.version, r.position));
                    out.acked_at.push(std::time::Instant::now());
                    out.last_ok = Some(std::time::Instant::now());
                    break;
                }
                Err(e) => {
                    out.errors
                        .push((std::time::Instant::now(), e.to_string(), e.is_retryable()));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        v += 1;
    }
    out
}

/// The baseline a kiln append window is held to: a raw async-nats client on
/// a connection of its own, publishing plain messages to the same stream (on
/// a probe subject, which no tail hands out), giving up on an ack after
/// 1.5 s (kiln's patience; the library's default of 5 s would make most of
/// the baseline's window its own timeout) and publishing again 50 ms after
/// each failure.
async fn raw_writer(
    urls: Vec<String>,
    subject: String,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Written {
    let client = async_nats::ConnectOptions::new()
        .connect(urls)
        .await
        .expect("a raw client connects");
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(1500))
        .build(client);
    let mut out = Written::default();
    while !*stop.borrow() {
        let acked = match js.publish(subject.clone(), "raw".into()).await {
            Ok(ack) => ack.await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match acked {
            Ok(ack) => {
                out.acked.push((0, ack.sequence));
                out.last_ok = Some(std::time::Instant::now());
            }
            Err(e) => {
                out.errors.push((std::time::Instant::now(), e, true));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    out
}

/// kill -9 of the stream's leader while four writers append and a tail
/// follows: no acknowledged append is lost, the tail delivers every event
/// once in order and resumes within seconds, appends fail only for a few
/// seconds and only with retryable errors ("electing a leader, retry"), and
/// the killed node catches up after its restart. Prints the two windows it
/// measures (the new leader's election takes nats-server about 4-7 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_dies_under_load() {
    a_node_dies_under_load(true).await;
}

/// The same with a follower killed: the leader carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_dies_under_load() {
    a_node_dies_under_load(false).await;
}

/// Bound of the append window; the measured ones are 5-7 s (BENCHMARKS.md).
const FAILOVER_BOUND: Duration = Duration::from_secs(15);
/// How much longer than a raw client's (on its own connection, publishing
/// again 50 ms after each failure) kiln's appends may fail after a node is
/// killed: issue 27's goal. Each retry during an election learns within
/// 0.35 s that there is no leader, and a request in flight when the new
/// leader's advisory or a reconnect arrives is given up at once. Measured
/// over nine leader kills: 0-0.32 s more (1.2-1.9 s more in three of five
/// runs before, when each retry waited up to 2 s to ask whether the stream
/// was deleted); over follower kills, 0-0.01 s (1.5 s before when kiln's
/// connection was to the killed node).
const RAW_MARGIN: Duration = Duration::from_secs(1);
/// Bound of the tail's resumption after appends came back. After a leader
/// change the election advisory recreates the consumer at once (measured
/// under 0.1 s; one to two minutes before issue 17, 6 s more while an idle
/// check waited on the dead leader). A consumer lost with a follower (an
/// ordered consumer has one replica, on any node of the stream) has no
/// advisory: two idle checks find it, 6 s (measured 6.03 s).
const TAIL_RESUME_BOUND: Duration = Duration::from_secs(10);

async fn a_node_dies_under_load(kill_the_leader: bool) {
    let mut h = ClusterHarness::start().await;
    let store = h.jetstream().clone();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let writers: Vec<_> = (0..4)
        .map(|i| tokio::spawn(writer(store.clone(), format!("w-{i}"), stop_rx.clone())))
        .collect();
    let raw = tokio::spawn(raw_writer(
        h.cluster.urls(),
        format!("{}._kiln.probe.raw-baseline", store.config().subject_prefix),
        stop_rx.clone(),
    ));
    let tail_store = store.clone();
    let (tail_stop_tx, mut tail_stop) = tokio::sync::watch::channel(false);
    let (reached_tx, reached_rx) = tokio::sync::watch::channel(0u64);
    let tailer = tokio::spawn(async move {
        let mut tail = tail_store.tail(1);
        let mut seen: Vec<(std::time::Instant, u64)> = Vec::new();
        loop {
            tokio::select! {
                batch = futures::StreamExt::next(&mut tail) => match batch {
                    Some(Ok(batch)) => {
                        let now = std::time::Instant::now();
                        seen.extend(batch.iter().map(|e| (now, e.position)));
                        reached_tx.send_replace(seen.last().map_or(0, |(_, p)| *p));
                    }
                    Some(Err(e)) => panic!("tail failed: {e}"),
                    None => panic!("tail ended"),
                },
                _ = tail_stop.changed() => return seen,
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let leader = cluster_info(&store)
        .await
        .and_then(|c| c.leader)
        .expect("the stream has a leader");
    let leader_index = h.cluster.index_of(&leader).expect("a node of ours leads");
    let index = if kill_the_leader {
        leader_index
    } else {
        (leader_index + 1) % h.cluster.nodes.len()
    };
    let killed_at = std::time::Instant::now();
    let victim = &mut h.cluster.nodes[index];
    tokio::task::block_in_place(|| victim.kill());
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop_tx.send(true).unwrap();
    let mut written = Vec::new();
    for w in writers {
        written.push(w.await.unwrap());
    }
    let raw = raw.await.unwrap();
    let head = store.head().await.unwrap();
    // The tail reaches the head, then stops.
    let mut reached = reached_rx.clone();
    tokio::time::timeout(Duration::from_secs(30), reached.wait_for(|p| *p >= head))
        .await
        .unwrap_or_else(|_| panic!("the tail did not reach the head {head} within 30 s"))
        .unwrap();
    tail_stop_tx.send(true).unwrap();
    let seen = tailer.await.unwrap();
    let positions: Vec<u64> = seen.iter().map(|(_, p)| *p).collect();
    let mut all: Vec<u64> = written
        .iter()
        .flat_map(|w| w.acked.iter().map(|(_, p)| *p))
        .collect();
    all.sort_unstable();
    assert_eq!(
        positions, all,
        "the tail delivers every acknowledged event once, in order"
    );
    assert_eq!(all.last().copied(), Some(head));
    for (i, w) in written.iter().enumerate() {
        // Nothing acknowledged is lost or moved.
        let read = store
            .read_stream(&sid(&format!("w-{i}")), 1, 100_000)
            .await
            .unwrap();
        let got: Vec<(u64, u64)> = read.iter().map(|e| (e.version, e.position)).collect();
        assert_eq!(got, w.acked, "writer {i}");
        for (_, message, retryable) in &w.errors {
            assert!(
                retryable,
                "writer {i}: a non-retryable error during the failover: {message}"
            );
        }
    }
    // The two windows.
    let last_error = written
        .iter()
        .flat_map(|w| w.errors.iter().map(|(t, _, _)| *t))
        .max();
    let append_window = last_error.map_or(Duration::ZERO, |t| t.duration_since(killed_at));
    // The tail has resumed when it delivers the first event acknowledged
    // after appends recovered (after the last error, or the kill if none).
    let recovered_at = last_error.map_or(killed_at, |t| t.max(killed_at));
    let acked: Vec<(u64, std::time::Instant)> = written
        .iter()
        .flat_map(|w| w.acked.iter().zip(&w.acked_at))
        .map(|((_, p), t)| (*p, *t))
        .collect();
    let first_after = kiln_tests::nats::first_appended_after(&acked, recovered_at)
        .expect("appends acknowledged after the failover");
    let resumed = seen
        .iter()
        .find(|(_, p)| *p >= first_after)
        .map(|(t, _)| t.duration_since(killed_at));
    let messages: std::collections::BTreeSet<String> = written
        .iter()
        .flat_map(|w| w.errors.iter().map(|(_, m, _)| m.clone()))
        .collect();
    let raw_window = raw
        .errors
        .iter()
        .map(|(t, _, _)| t.duration_since(killed_at))
        .max()
        .unwrap_or_default();
    let raw_messages: std::collections::BTreeSet<&str> =
        raw.errors.iter().map(|(_, m, _)| m.as_str()).collect();
    eprintln!(
        "{} n{index} killed: a raw client's publishes failed for {raw_window:?} ({} errors: {raw_messages:?}), \
         kiln's appends for {:?} more",
        if kill_the_leader {
            "leader"
        } else {
            "follower"
        },
        raw.errors.len(),
        append_window.saturating_sub(raw_window)
    );
    eprintln!(
        "{} n{index} killed (leader was {leader}): appends failed for {append_window:?} ({} errors: {messages:?}); \
         the tail resumed after {resumed:?}; stalls detected: {}",
        if kill_the_leader {
            "leader"
        } else {
            "follower"
        },
        written.iter().map(|w| w.errors.len()).sum::<usize>(),
        store.health().tail_stalls_total
    );
    assert!(
        append_window < FAILOVER_BOUND,
        "appends failed for {append_window:?}"
    );
    assert!(
        append_window < raw_window + RAW_MARGIN,
        "kiln's appends failed for {append_window:?}, a raw client's publishes for {raw_window:?}"
    );
    let resumed = resumed.expect("the tail delivered events written after the kill");
    assert!(
        resumed.saturating_sub(append_window) < TAIL_RESUME_BOUND,
        "the tail resumed after {resumed:?}, appends after {append_window:?}"
    );
    // The killed node comes back and catches up.
    let victim = &mut h.cluster.nodes[index];
    tokio::task::block_in_place(|| victim.start_again());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let replicas = cluster_info(&store)
            .await
            .map(|c| c.replicas)
            .unwrap_or_default();
        let current = replicas.len() == 2
            && replicas
                .iter()
                .all(|r| r.current && r.lag.unwrap_or(0) == 0);
        if current {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restarted node did not catch up within 30 s: {replicas:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Reads ask for a replica at least as far along as what this process saw
/// (`min_last_seq`); a stream deleted and created again behind that point is
/// read from what it holds, not refused for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recreated_stream_is_read_again() {
    let h = ClusterHarness::start().await;
    let s = h.jetstream().clone();
    let append = |expected, n| {
        s.append(AppendRequest::new(
            sid("again-1"),
            expected,
            (1..=n).map(event).collect(),
        ))
    };
    append(ExpectedVersion::NoStream, 5)
        .await
        .expect("first append");
    s.context().delete_stream(&h.config().stream).await.unwrap();
    drop(kiln_tests::nats::connect_when_ready(h.config()).await);
    let head = tokio::time::timeout(Duration::from_secs(20), s.latest(&sid("again-1")))
        .await
        .expect("latest answers")
        .expect("latest after the stream was recreated");
    assert_eq!(head.version, 0);
    append(ExpectedVersion::NoStream, 1)
        .await
        .expect("append after the stream was recreated");
}
