//! A module's `per_stream` promise is checked by the host, not trusted
//! (issue 31), through a real `kiln serve` on the embedded store:
//!
//! - `tally` declares `per_stream` but counts every stream's events into one
//!   document, `all`. Warmed with `--warmup-workers 3` over 20,000 events on
//!   64 streams, its split warm-up meets `all` from two partitions, warms
//!   again from the first event with one worker, and serves the right count,
//!   with a warning naming the document that `/views` and `kiln status`
//!   show; after a restart it is still right, still warned, and never split;
//! - `users`, whose every document is its own stream's, warms in partitions
//!   with no warning.

use std::time::Duration;

use kiln_tests::daemon::{Api, Daemon, Options, kiln_cli};
use kiln_tests::wasm;
use serde_json::{Value, json};

const STREAMS: usize = 64;
const EVENTS: usize = 20_000;
/// Events per append: one stream's run, streams taken in turn.
const RUN: usize = 10;
const WAIT: Duration = Duration::from_secs(120);

fn options() -> Options {
    Options::default().arg("--warmup-workers").arg("3")
}

/// Appends [`EVENTS`] events of `event_type` (data `data`) on `prefix-<i>`,
/// [`RUN`] at a time per stream, streams in turn.
async fn fill(api: &Api, prefix: &str, event_type: &str, data: Value) {
    for run in 0..EVENTS / RUN {
        let stream = format!("{prefix}-{}", run % STREAMS);
        let events: Vec<Value> = (0..RUN)
            .map(|_| json!({ "type": event_type, "data": data }))
            .collect();
        let (status, body) = api
            .post_json(
                &format!("/streams/{stream}/events"),
                &json!({ "events": events }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
}

async fn view_of(api: &Api, id: &str) -> Value {
    let (_, body) = api.get("/views").await;
    body["views"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["id"] == id))
        .cloned()
        .unwrap_or_else(|| panic!("{id} is not listed: {body}"))
}

/// The document at `key` of view `view`.
async fn doc(api: &Api, view: &str, key: &str) -> Value {
    let (status, body) = api.get(&format!("/views/{view}/{key}")).await;
    assert_eq!(status, 200, "{view}/{key}: {body}");
    body["doc"].clone()
}

async fn count(api: &Api, key: &str) -> u64 {
    let d = doc(api, "tally", key).await;
    d["events"].as_u64().unwrap_or_else(|| panic!("{key}: {d}"))
}

/// Events [`fill`] appends on stream number `i`.
fn events_of(i: usize) -> u64 {
    ((EVENTS / RUN - i).div_ceil(STREAMS) * RUN) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_shared_by_streams_is_never_built_by_a_split_warm_up() {
    let mut daemon = Daemon::start_with(options());
    let api = Api::new(&daemon);
    fill(&api, "tally", "Tick", json!({})).await;
    let tally = std::fs::read(wasm::TALLY).expect("the tally module");
    let (status, body) = api.deploy(tally).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    let active = api.wait_state(&id, "active", WAIT).await;

    // Every event counted once, in log order: what one worker builds.
    assert_eq!(count(&api, "all").await, EVENTS as u64);
    let all = doc(&api, "tally", "all").await;
    assert_eq!(all["last_position"], json!(EVENTS), "{all}");
    assert_eq!(count(&api, "stream/tally-5").await, events_of(5));
    let warning = active["warning"]
        .as_str()
        .unwrap_or_else(|| panic!("no warning on a view whose module broke per_stream: {active}"));
    assert!(
        warning.contains("per_stream") && warning.contains("\"all\""),
        "{warning}"
    );
    assert!(warning.contains("tally-"), "names no stream: {warning}");
    let (code, out, err) = kiln_cli(&daemon, &["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("warning:") && out.contains("\"all\""), "{out}");

    // Live, then after a restart: still right, still warned.
    let (status, body) = api.append("tally-0", json!("any"), "Tick", json!({})).await;
    assert_eq!(status, 200, "{body}");
    daemon.restart();
    let api = Api::new(&daemon);
    let again = api.wait_state(&id, "active", WAIT).await;
    assert!(again["warning"].is_string(), "{again}");
    let (status, body) = api
        .get("/views/tally/all?stream=tally-0&wait_ms=5000")
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["doc"]["events"], json!(EVENTS + 1), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_that_keeps_to_its_streams_warms_split_without_a_warning() {
    let daemon = Daemon::start_with(options());
    let api = Api::new(&daemon);
    fill(&api, "user", "UserLoggedIn", json!({})).await;
    let users = std::fs::read(wasm::USERS).expect("the users module");
    let (status, body) = api.deploy(users).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    api.wait_state(&id, "active", WAIT).await;
    let v = view_of(&api, &id).await;
    assert_eq!(v["warmup_workers"], json!(3), "it did not warm split: {v}");
    assert!(v["warning"].is_null(), "{v}");
    let profile = doc(&api, "users", "user-5").await;
    assert_eq!(profile["logins"], json!(events_of(5)), "{profile}");
}
