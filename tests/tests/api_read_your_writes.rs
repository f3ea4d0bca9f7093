//! Read-your-writes through real HTTP: a query naming a stream (or a position)
//! never answers from a view older than that write, and a wait that cannot be
//! met is a clear `504`, never stale data.

use std::time::{Duration, Instant};

use kiln_tests::daemon::{
    Api, Daemon, Options, deploy_slow_warming_chaos, module_version, projections_dir,
    slow_warming_options,
};
use kiln_tests::wasm::USERS;
use serde_json::json;

/// 1,000 write-then-read pairs, from 4 concurrent clients on their own users:
/// every read that names the stream sees its own write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_naming_the_stream_never_returns_a_view_older_than_the_write() {
    let dir = projections_dir(&[USERS]);
    let d = Daemon::start_with(Options::default().projections(dir.path()));
    let api = Api::new(&d);
    api.wait_state("users-1_0_0", "active", Duration::from_secs(60))
        .await;

    const CLIENTS: usize = 4;
    const PAIRS: usize = 250;
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let api = api.clone();
        tasks.push(tokio::spawn(async move {
            let stream = format!("user-ryw{c}");
            let (s, b) = api
                .append(
                    &stream,
                    json!("no_stream"),
                    "UserRegistered",
                    json!({ "name": "n0", "email": "e" }),
                )
                .await;
            assert_eq!(s, 200, "{b}");
            for i in 1..=PAIRS {
                let name = format!("n{i}");
                let (s, b) = api
                    .append(&stream, json!(i), "UserRenamed", json!({ "name": name }))
                    .await;
                assert_eq!(s, 200, "{b}");
                // Alternate the two forms: by stream, and by the returned position.
                let path = if i % 2 == 0 {
                    format!("/views/users/{stream}?stream={stream}")
                } else {
                    format!("/views/users/{stream}?position={}", b["position"])
                };
                let (s, doc) = api.get(&path).await;
                assert_eq!(s, 200, "pair {i} of {stream}: {doc}");
                assert_eq!(
                    doc["doc"]["name"], name,
                    "pair {i} of {stream}: stale read {doc}"
                );
                assert_eq!(doc["doc"]["renames"], i, "pair {i} of {stream}: {doc}");
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    let (_, metrics) = d.get_raw("/metrics").expect("metrics");
    let waits = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kiln_api_ryw_waits_total "))
        .and_then(|n| n.trim().parse::<u64>().ok());
    assert_eq!(waits, Some((CLIENTS * PAIRS) as u64), "{metrics}");
}

/// A wait for a version still warming past the position times out as a
/// `504` naming the version and the position; a position beyond the log's
/// head answers `400` at once (no write is coming there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_that_cannot_be_met_is_a_504_naming_the_view_and_position() {
    let d = Daemon::start_with(slow_warming_options());
    let api = Api::new(&d);
    let id = deploy_slow_warming_chaos(&api, 6).await;
    let (_, head) = api.get("/streams/chaos-5").await;
    let position = head["position"].as_u64().expect("position");
    let started = Instant::now();
    let (s, b) = api
        .get(&format!("/views/{id}?position={position}&wait_ms=300"))
        .await;
    let waited = started.elapsed();
    assert_eq!(s, 504, "{b}");
    assert_eq!(b["error"]["code"], "read_your_writes_timeout");
    let message = b["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains(&id) && message.contains(&position.to_string()),
        "{message}"
    );
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "waited {waited:?} for a 300 ms bound"
    );
    // Beyond the head: refused at once, naming the head.
    let started = Instant::now();
    let (s, b) = api
        .get(&format!("/views/{id}?position=1000000&wait_ms=3000"))
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("position_beyond_head")),
        "{b}"
    );
    assert_eq!(b["error"]["head"], position, "{b}");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "it did not wait"
    );
    // An unknown stream is version 0, position 0: nothing to wait for.
    let (s, b) = api.get(&format!("/views/{id}?stream=user-nobody")).await;
    assert_eq!(s, 200, "{b}");
}

/// The server caps every wait (`[api] ryw_max_wait_ms` in the configuration
/// file): a client asking for a minute gets its 504 after the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configured_cap_bounds_what_a_client_asks_to_wait() {
    let config = tempfile::tempdir().expect("temp dir");
    let path = config.path().join("kiln.toml");
    std::fs::write(&path, "[api]\nryw_max_wait_ms = 400\n").expect("writing the config");
    let d = Daemon::start_with(
        slow_warming_options()
            .arg("--config")
            .arg(path.to_str().expect("utf-8 path")),
    );
    let api = Api::new(&d);
    let id = deploy_slow_warming_chaos(&api, 6).await;
    let (_, head) = api.get("/streams/chaos-5").await;
    let position = head["position"].as_u64().expect("position");
    let started = Instant::now();
    let (s, b) = api
        .get(&format!("/views/{id}?position={position}&wait_ms=60000"))
        .await;
    let waited = started.elapsed();
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (504, Some("read_your_writes_timeout")),
        "{b}"
    );
    assert_eq!(b["error"]["waited_ms"], 400, "{b}");
    assert!(
        waited >= Duration::from_millis(350) && waited < Duration::from_secs(10),
        "waited {waited:?} under a 400 ms cap"
    );
    let (_, metrics) = d.get_raw("/metrics").expect("metrics");
    assert!(
        metrics.contains("kiln_api_ryw_timeouts_total 1"),
        "{metrics}"
    );
}

/// Issue 25, item 11: a read that resolved the name to its active version,
/// then waited for a position, answered that version after the name had
/// moved on (here a promote; in a fleet, a switch every other member had
/// made). It is resolved again after the wait: the version the name serves
/// now answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_waiting_through_a_promote_answers_the_version_promoted() {
    let d = Daemon::start_with(
        slow_warming_options()
            .arg("--view")
            .arg("chaos:cutover=manual"),
    );
    let api = Api::new(&d);
    let chaos = std::fs::read(kiln_tests::wasm::CHAOS).expect("the chaos module");
    let (s, b) = api.deploy(chaos).await;
    assert_eq!(s, 202, "{b}");
    api.wait_state("chaos-1_0_0", "ready", Duration::from_secs(30))
        .await;
    let (s, b) = api
        .post_json("/admin/views/chaos-1_0_0/promote", &json!({}))
        .await;
    assert_eq!(s, 200, "{b}");
    // 1.1.0 takes only an event type never appended: it skips the spins.
    let variant = module_version(kiln_tests::wasm::CHAOS, "1.1.0", Some("Variant"));
    let (s, b) = api.deploy(variant).await;
    assert_eq!(s, 202, "{b}");
    api.wait_state("chaos-1_1_0", "ready", Duration::from_secs(30))
        .await;
    // Each spin holds 1.0.0 for its 1 s batch deadline.
    for n in 0..4 {
        let events = json!({ "events": [
            { "type": "Note", "data": { "text": format!("n{n}") } },
            { "type": "Spin", "data": {} },
        ]});
        let (s, b) = api
            .post_json(&format!("/streams/chaos-{n}/events"), &events)
            .await;
        assert_eq!(s, 200, "{b}");
    }
    let (_, head) = api.get("/streams/chaos-3").await;
    let position = head["position"].as_u64().expect("position");
    let reader = {
        let api = api.clone();
        tokio::spawn(async move {
            api.get(&format!("/views/chaos?position={position}&wait_ms=10000"))
                .await
        })
    };
    // The read waits on 1.0.0; 1.1.0 passes the position, and is promoted.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, v) = api.get("/views").await;
        let at = v["views"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["id"] == "chaos-1_1_0"))
            .and_then(|v| v["checkpoint"].as_u64())
            .unwrap_or(0);
        if at >= position {
            break;
        }
        assert!(Instant::now() < deadline, "1.1.0 did not reach {position}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (s, b) = api
        .post_json("/admin/views/chaos-1_1_0/promote", &json!({}))
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = reader.await.expect("reader");
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["view"], "chaos-1_1_0",
        "the read answered the version the name left: {b}"
    );
}
