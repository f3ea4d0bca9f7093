//! The append endpoint through real HTTP: position and version back, the
//! expected version as a body field or a header, `409` with the current version
//! on a conflict, two client *processes* racing for the same version with exactly
//! one winner, and the same contract on the JetStream backend.

use std::process::{Command, Stdio};

use kiln_tests::daemon::{Api, Daemon, Options, kiln_bin};
use kiln_tests::nats::NatsServer;
use serde_json::json;

async fn append_contract(api: &Api) {
    let (s, b) = api
        .append(
            "acct-1",
            json!("no_stream"),
            "Opened",
            json!({ "owner": "ada" }),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["version"], 1);
    assert_eq!(b["stream"], "acct-1");
    let first = b["position"].as_u64().expect("position");
    assert!(first >= 1);

    // Expected version as a header; two events in one append.
    let res = api
        .http
        .post(format!("{}/streams/acct-1/events", api.base))
        .header("Kiln-Expected-Version", "1")
        .json(&json!([
            { "type": "Deposited", "data": { "amount": 10 } },
            { "type": "Deposited", "data": { "amount": 5 }, "metadata": { "by": "test" } }
        ]))
        .send()
        .await
        .expect("append");
    assert_eq!(res.status().as_u16(), 200);
    let b: serde_json::Value = res.json().await.expect("JSON");
    assert_eq!(b["version"], 3);
    assert!(b["position"].as_u64().expect("position") > first);

    // A stale expected version: 409 carrying the current one.
    let (s, b) = api
        .append("acct-1", json!(1), "Withdrawn", json!({ "amount": 1 }))
        .await;
    assert_eq!(s, 409, "{b}");
    assert_eq!(b["error"]["code"], "version_conflict");
    assert_eq!(b["error"]["current_version"], 3);
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("acct-1"),
        "{b}"
    );
    let (s, b) = api
        .append("acct-1", json!("no_stream"), "Opened", json!({}))
        .await;
    assert_eq!(
        (s, b["error"]["current_version"].as_u64()),
        (409, Some(3)),
        "{b}"
    );

    // Header and field that disagree are refused, not guessed between.
    let res = api
        .http
        .post(format!("{}/streams/acct-1/events", api.base))
        .header("Kiln-Expected-Version", "2")
        .json(&json!({ "expected_version": 3, "events": [{ "type": "X" }] }))
        .send()
        .await
        .expect("append");
    assert_eq!(res.status().as_u16(), 400);

    // The stream's head, O(1) on the store.
    let (s, b) = api.get("/streams/acct-1").await;
    assert_eq!(s, 200);
    assert_eq!(b["version"], 3);
    let (_, b) = api.get("/streams/acct-1/events?from_version=2").await;
    let events = b["events"].as_array().expect("events");
    assert_eq!(events.len(), 2);
    assert_eq!(events[1]["metadata"]["by"], "test");
    assert_eq!(events[1]["data"]["amount"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_returns_position_and_version_and_conflicts_are_409_embedded() {
    let d = Daemon::start();
    append_contract(&Api::new(&d)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_returns_position_and_version_and_conflicts_are_409_jetstream() {
    let nats = NatsServer::start();
    let d = Daemon::start_with(Options::default().jetstream(&nats.url()));
    append_contract(&Api::new(&d)).await;
}

/// Each round, two `kiln append` processes append to the same stream at the
/// same expected version: one exits 0, the other exits 3 (conflict).
#[test]
fn two_client_processes_racing_for_a_version_have_exactly_one_winner() {
    let d = Daemon::start();
    const ROUNDS: u64 = 40;
    let mut wins = 0;
    for round in 0..ROUNDS {
        let spawn = |who: &str| {
            Command::new(kiln_bin())
                .args([
                    "append",
                    "race-1",
                    "Claimed",
                    &format!("{{\"by\": \"{who}\", \"round\": {round}}}"),
                    "--expect",
                    &round.to_string(),
                    "--json",
                ])
                .env("KILN_URL", d.url())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawning kiln append")
        };
        let (a, b) = (spawn("a"), spawn("b"));
        let outs = [a.wait_with_output(), b.wait_with_output()].map(|o| o.expect("kiln append"));
        let codes: Vec<i32> = outs.iter().map(|o| o.status.code().unwrap_or(-1)).collect();
        let mut sorted = codes.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            [0, 3],
            "round {round}: exit codes {codes:?}; stderr: {} / {}",
            String::from_utf8_lossy(&outs[0].stderr),
            String::from_utf8_lossy(&outs[1].stderr)
        );
        for o in &outs {
            let body: serde_json::Value =
                serde_json::from_slice(&o.stdout).expect("--json prints JSON");
            if o.status.success() {
                assert_eq!(body["version"], round + 1);
                wins += 1;
            } else {
                assert_eq!(body["error"]["code"], "version_conflict");
                assert_eq!(body["error"]["current_version"], round + 1);
            }
        }
    }
    assert_eq!(wins, ROUNDS);
    let (status, body) = d.get_raw("/streams/race-1").expect("head");
    assert_eq!(status, 200);
    let head: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(head["version"], ROUNDS, "one event per round, no more");
}

/// A foreign message on a user's subject (another service's publish without
/// kiln's headers) stops nothing: the view carries on past it and serves the
/// next user with read-your-writes, `/store/health` lists it with its
/// position, `/metrics` counts it, and an append to that one stream is a
/// `409 foreign_message` naming the position. The daemon warned at start
/// that its one-replica stream is not synced on every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_message_is_skipped_listed_counted_and_blocks_only_its_stream() {
    let nats = NatsServer::start();
    let dir = kiln_tests::daemon::projections_dir(&[kiln_tests::wasm::USERS]);
    let d = Daemon::start_with(
        Options::default()
            .jetstream(&nats.url())
            .projections(dir.path()),
    );
    let api = Api::new(&d);
    api.wait_state("users-1_0_0", "active", std::time::Duration::from_secs(60))
        .await;
    api.register_user("user-1").await;
    let client = async_nats::connect(nats.url()).await.expect("raw client");
    let reply = client
        .request("kiln.user.user-1", "not a kiln event".into())
        .await
        .expect("raw publish");
    let ack: serde_json::Value = serde_json::from_slice(&reply.payload).expect("ack");
    let foreign = ack["seq"].as_u64().expect("stored");
    api.register_user("user-2").await;
    let (s, b) = api.get("/views/users/user-2?stream=user-2").await;
    assert_eq!(s, 200, "the view carried on past the foreign message: {b}");
    let (s, b) = api.get("/store/health").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["foreign_messages"][0]["position"], foreign, "{b}");
    assert_eq!(
        b["foreign_messages"][0]["subject"], "kiln.user.user-1",
        "{b}"
    );
    let metrics = d
        .get_raw("/metrics")
        .map(|(_, body)| body)
        .unwrap_or_default();
    assert!(
        metrics.contains("kiln_store_foreign_messages_total 1"),
        "{metrics}"
    );
    let (s, b) = api
        .append(
            "user-1",
            json!("any"),
            "UserRenamed",
            json!({ "name": "x" }),
        )
        .await;
    assert_eq!(s, 409, "{b}");
    assert_eq!(b["error"]["code"], "foreign_message", "{b}");
    assert_eq!(b["error"]["position"], foreign, "{b}");
    // One replica on file storage: `kiln serve` said at start what that risks.
    let log = d.log();
    assert!(
        log.contains("has 1 replica") && log.contains("sync_interval: always"),
        "no durability warning in the daemon's log:\n{log}"
    );
}
