//! The view lifecycle end to end: real `kiln serve` processes driven over HTTP
//! (tests/src/daemon.rs), on the embedded store and on JetStream (a real
//! nats-server), with real RocksDB in temp dirs and real wasm.
//!
//! The modules are the real `users` projection under three versions
//! ([`users_module`]): 1.0.0 as built; 1.1.0 whose manifest no longer
//! subscribes to `LoginFailed` (changed logic: a new fingerprint, and
//! `failed_logins` stays 0, so every document shows which logic built it);
//! 1.2.0 is 1.1.0 with only the version bumped (identical logic: an alias).
//! The crash test also deploys 1.N.0 variants of 1.0.0's logic that subscribe
//! to one more (never appended) event type ([`module_version`]): each is a new
//! fingerprint, so each warms from the first event.
//!
//! - `hot_deploy_cutover_alias_rollback_and_retirement_{embedded,jetstream}`:
//!   warm-up and automatic cutover under a continuous reader, an alias with
//!   nothing replayed, rollback, retirement after the grace period and the
//!   dropped column family gone from disk.
//! - `a_version_deployed_after_a_tagged_append_becomes_active_*`: caught up
//!   means the log has nothing more to give, whatever the store wrote last.
//! - `a_rollback_during_the_grace_sweep_keeps_the_version_it_activated`.
//! - `kill_nine_during_warm_up_and_live_tailing_then_every_view_equals_a_clean_rebuild`:
//!   twenty seeded kill -9s (`KILN_CRASH_SEED` replays a schedule).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln::runtime::Projector;
use kiln::store::embedded::{EmbeddedConfig, EmbeddedStore, scan_log};
use kiln::views::{ViewId, ViewStore};
use kiln_tests::daemon::{Api, Daemon, Options, module_version};
use kiln_tests::nats::NatsServer;
use kiln_tests::rng::Rng;
use kiln_tests::wasm::{self, USERS, users_module};
use serde_json::{Value, json};

/// Longest wait for any one condition.
const WAIT: Duration = Duration::from_secs(60);
/// The standby grace period of the lifecycle test's daemon.
const GRACE_SECS: u64 = 5;
/// The document the reader polls during the cutover.
const READ_KEY: &str = "user-3";

// ---------------------------------------------------------------------------
// The workload: user streams with registrations, logins, failed logins and
// renames, appended through the HTTP API.

/// Event `i` (0-based) of stream `user-<u>`.
fn user_event(u: usize, i: usize) -> Value {
    match i {
        0 => {
            json!({ "type": "UserRegistered", "data": { "name": format!("u{u}"), "email": format!("u{u}@x.io") } })
        }
        i if i % 3 == 0 => json!({ "type": "LoginFailed", "data": {} }),
        i if i % 3 == 1 => json!({ "type": "UserLoggedIn", "data": {} }),
        i => json!({ "type": "UserRenamed", "data": { "name": format!("u{u}-{i}") } }),
    }
}

/// Failed logins among the first `n` events of a user stream.
fn failed_logins_in(n: usize) -> u64 {
    (1..n).filter(|i| i % 3 == 0).count() as u64
}

/// Appends `events` to `stream`; the position of the last one.
async fn append(api: &Api, stream: &str, events: Vec<Value>) -> u64 {
    let (s, b) = api
        .post_json(
            &format!("/streams/{stream}/events"),
            &json!({ "events": events }),
        )
        .await;
    assert_eq!(s, 200, "append to {stream}: {b}");
    b["position"].as_u64().expect("position")
}

/// `per_user` events on each of `users` streams, eight appends in flight;
/// the highest position.
async fn fill(api: &Api, users: std::ops::Range<usize>, per_user: usize) -> u64 {
    futures::stream::iter(users)
        .map(|u| {
            let events = (0..per_user).map(|i| user_event(u, i)).collect();
            async move { append(api, &format!("user-{u}"), events).await }
        })
        .buffer_unordered(8)
        .fold(0, |max, p| async move { max.max(p) })
        .await
}

// ---------------------------------------------------------------------------
// Reading `GET /views`.

/// Every version's status, by id.
async fn views(api: &Api) -> BTreeMap<String, Value> {
    let (s, b) = api.get("/views").await;
    assert_eq!(s, 200, "GET /views: {b}");
    b["views"]
        .as_array()
        .expect("views")
        .iter()
        .map(|v| (v["id"].as_str().expect("id").to_string(), v.clone()))
        .collect()
}

fn state(views: &BTreeMap<String, Value>, id: &str) -> String {
    views
        .get(id)
        .and_then(|v| v["state"].as_str())
        .unwrap_or("absent")
        .to_string()
}

fn field(views: &BTreeMap<String, Value>, id: &str, name: &str) -> u64 {
    views
        .get(id)
        .and_then(|v| v[name].as_u64())
        .unwrap_or_else(|| panic!("{id} has no {name}: {:?}", views.get(id)))
}

/// Polls `GET /views` until `done` holds, for at most [`WAIT`]; the last answer.
async fn wait_views(
    api: &Api,
    what: &str,
    mut done: impl FnMut(&BTreeMap<String, Value>) -> bool,
) -> BTreeMap<String, Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = views(api).await;
        if done(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; GET /views: {v:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `GET /views/{view}/{key}` once the view has applied `position`: the answer.
async fn read_at(api: &Api, view: &str, key: &str, position: u64) -> Value {
    let (s, b) = api
        .get(&format!(
            "/views/{view}/{key}?position={position}&wait_ms=30000"
        ))
        .await;
    assert_eq!(s, 200, "GET /views/{view}/{key} at {position}: {b}");
    b
}

/// The value of `metric{view="<view>",...}` in `GET /metrics`.
async fn metric(api: &Api, name: &str, view: &str) -> f64 {
    let res = api
        .http
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(res.status().as_u16(), 200);
    let text = res.text().await.expect("metrics text");
    let prefix = format!("{name}{{view=\"{view}\",");
    text.lines()
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix}...}} in /metrics:\n{text}"))
}

// ---------------------------------------------------------------------------
// The reader: `GET /views/users/{READ_KEY}` in a loop during the cutover.

#[derive(Default, Debug)]
struct Reads {
    old: u64,
    new: u64,
    failures: Vec<String>,
}

/// Reads until `stop`, checking each answer: a 200, from 1.0.0 or 1.1.0 (body
/// and `kiln-view` header agreeing), with exactly that version's document, and
/// never 1.0.0 again once 1.1.0 answered.
async fn reader(
    api: Api,
    old_doc: Value,
    new_doc: Value,
    new_reads: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Reads {
    let mut r = Reads::default();
    let url = format!("{}/views/users/{READ_KEY}", api.base);
    while !stop.load(Ordering::Relaxed) {
        let res = match api.http.get(&url).send().await {
            Ok(res) => res,
            Err(e) => {
                r.failures.push(format!("request failed: {e}"));
                continue;
            }
        };
        let status = res.status().as_u16();
        let header = res
            .headers()
            .get("kiln-view")
            .and_then(|h| h.to_str().ok())
            .map(str::to_string);
        let body: Value = res.json().await.unwrap_or(Value::Null);
        let view = body["view"].as_str().map(str::to_string);
        let ok = status == 200
            && header == view
            && match view.as_deref() {
                Some("users-1_0_0") if r.new == 0 && body["doc"] == old_doc => {
                    r.old += 1;
                    true
                }
                Some("users-1_1_0") if body["doc"] == new_doc => {
                    r.new += 1;
                    new_reads.store(r.new, Ordering::Relaxed);
                    true
                }
                _ => false,
            };
        if !ok {
            r.failures.push(format!(
                "read {} (after {} old, {} new reads): {status} kiln-view {header:?}: {body}",
                r.old + r.new + 1,
                r.old,
                r.new
            ));
        }
    }
    r
}

// ---------------------------------------------------------------------------
// One lifecycle, on either backend; then two bugs it led to.

/// 1. users 1.0.0 active, events appended; 1.1.0 (changed logic) deployed
///    warms, becomes ready and active on its own while a reader polls
///    `GET /views/users/user-3`: no failed read, each wholly one version's.
/// 2. 1.2.0 (1.1.0's logic) is an alias: active at once, nothing replayed.
/// 3. Rollback to the standby 1.1.0; after the grace period the standbys are
///    retired (never earlier), 1.0.0's column family is dropped and gone from
///    the views database on disk, the one the active version reads is kept.
async fn hot_deploy_lifecycle(options: Options) {
    let options = options
        .arg("--standby-grace-secs")
        .arg(&GRACE_SECS.to_string());
    let mut d = Daemon::start_with(options);
    let api = Api::new(&d);

    // 1.0.0 active; 12,000 events on 200 users.
    let (s, b) = api.deploy(users_module("1.0.0", false)).await;
    assert_eq!((s, b["outcome"].as_str()), (202, Some("warming")), "{b}");
    api.wait_state("users-1_0_0", "active", WAIT).await;
    let per_user = 60;
    let head = fill(&api, 0..200, per_user).await;
    let old = read_at(&api, "users", READ_KEY, head).await;
    assert_eq!(old["view"], "users-1_0_0");
    let old_doc = old["doc"].clone();
    assert_eq!(
        old_doc["failed_logins"],
        failed_logins_in(per_user),
        "{old}"
    );
    // What 1.1.0 must show: the same document, failed logins not counted.
    let mut new_doc = old_doc.clone();
    new_doc["failed_logins"] = json!(0);

    let stop = Arc::new(AtomicBool::new(false));
    let new_reads = Arc::new(AtomicU64::new(0));
    let reads = tokio::spawn(reader(
        api.clone(),
        old_doc.clone(),
        new_doc.clone(),
        new_reads.clone(),
        stop.clone(),
    ));
    // Live appends on other users while 1.1.0 warms.
    let appender = {
        let api = api.clone();
        tokio::spawn(async move { fill(&api, 1000..1040, 30).await })
    };

    let (s, b) = api.deploy(users_module("1.1.0", true)).await;
    assert_eq!((s, b["outcome"].as_str()), (202, Some("warming")), "{b}");
    assert_eq!(b["id"], "users-1_1_0");
    // Watch 1.1.0 go warming → (ready) → active. The flip is one registry
    // write: the snapshot that shows 1.1.0 active shows 1.0.0 standby.
    let mut seen: Vec<String> = Vec::new();
    let at_cutover = wait_views(&api, "users-1_1_0 active", |v| {
        let s = state(v, "users-1_1_0");
        if seen.last() != Some(&s) {
            seen.push(s.clone());
        }
        s == "active"
    })
    .await;
    let order = ["warming", "ready", "active"];
    assert!(
        seen.iter().all(|s| order.contains(&s.as_str()))
            && seen.windows(2).all(|w| {
                order.iter().position(|o| *o == w[0]) < order.iter().position(|o| *o == w[1])
            }),
        "1.1.0 went through {seen:?}"
    );
    assert_eq!(state(&at_cutover, "users-1_0_0"), "standby");
    let (deployed, ready, activated) = (
        field(&at_cutover, "users-1_1_0", "deployed_at"),
        field(&at_cutover, "users-1_1_0", "ready_at"),
        field(&at_cutover, "users-1_1_0", "activated_at"),
    );
    assert!(
        deployed <= ready && ready <= activated,
        "deployed {deployed}, ready {ready}, active {activated}"
    );
    let old_standby_since = field(&at_cutover, "users-1_0_0", "standby_since");

    // Keep reading until 1.1.0 answered a few times, then check every read.
    let deadline = Instant::now() + WAIT;
    while new_reads.load(Ordering::Relaxed) < 20 && !reads.is_finished() {
        assert!(Instant::now() < deadline, "the reader never read 1.1.0");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let reads = reads.await.expect("reader");
    assert!(
        reads.failures.is_empty(),
        "{} bad reads of {} ({reads:?})",
        reads.failures.len(),
        reads.old + reads.new + reads.failures.len() as u64
    );
    assert!(reads.old > 0 && reads.new > 0, "{reads:?}");
    eprintln!(
        "cutover under reads: {} from 1.0.0 then {} from 1.1.0, none failed; 1.1.0 went {seen:?}",
        reads.old, reads.new
    );

    // Both versions applied the live appends; each by its own logic, and the
    // standby keeps tailing.
    let live = appender.await.expect("appender");
    let last = append(&api, "user-1039", vec![user_event(1039, 30)]).await;
    assert!(last > live);
    let standby = read_at(&api, "users-1_0_0", "user-1039", last).await;
    assert_eq!(standby["doc"]["failed_logins"], failed_logins_in(31));
    let active = read_at(&api, "users", "user-1039", last).await;
    assert_eq!(active["view"], "users-1_1_0");
    assert_eq!(active["doc"]["failed_logins"], 0);
    assert_eq!(active["doc"]["logins"], standby["doc"]["logins"]);

    // 2. Identical logic under 1.2.0: an alias, active at once, zero replayed.
    let before = views(&api).await;
    let applied_before = field(&before, "users-1_1_0", "events_applied");
    let metric_before = metric(&api, "kiln_view_events_applied_total", "users-1_1_0").await;
    assert_eq!(metric_before, applied_before as f64);
    let (s, b) = api.deploy(users_module("1.2.0", true)).await;
    assert_eq!((s, b["outcome"].as_str()), (200, Some("alias")), "{b}");
    assert_eq!(b["of"], "users-1_1_0");
    let after = views(&api).await;
    assert_eq!(state(&after, "users-1_2_0"), "active", "{after:#?}");
    assert_eq!(state(&after, "users-1_1_0"), "standby", "{after:#?}");
    assert_eq!(after["users-1_2_0"]["alias_of"], "users-1_1_0");
    assert_eq!(field(&after, "users-1_2_0", "events_applied"), 0);
    assert_eq!(
        field(&after, "users-1_1_0", "events_applied"),
        applied_before,
        "the physical view replayed nothing either"
    );
    assert_eq!(
        metric(&api, "kiln_view_events_applied_total", "users-1_2_0").await,
        0.0
    );
    assert_eq!(
        metric(&api, "kiln_view_events_applied_total", "users-1_1_0").await,
        metric_before
    );
    // The bare name reads 1.2.0, backed by 1.1.0's documents.
    for spec in ["users", "users-1_2_0"] {
        let (s, b) = api.get(&format!("/views/{spec}/{READ_KEY}")).await;
        assert_eq!(
            (s, &b["view"], &b["backed_by"], &b["doc"]),
            (200, &json!("users-1_2_0"), &json!("users-1_1_0"), &new_doc),
            "{b}"
        );
    }

    // 3. Rollback: the previous active (1.1.0) is active again at once.
    let (s, b) = api
        .post_json("/admin/views/users/rollback", &json!({}))
        .await;
    assert_eq!((s, b["active"].as_str()), (200, Some("users-1_1_0")), "{b}");
    let rolled = views(&api).await;
    assert_eq!(state(&rolled, "users-1_1_0"), "active", "{rolled:#?}");
    assert_eq!(state(&rolled, "users-1_2_0"), "standby", "{rolled:#?}");
    let alias_standby_since = field(&rolled, "users-1_2_0", "standby_since");
    let (s, b) = api.get(&format!("/views/users/{READ_KEY}")).await;
    assert_eq!(
        (s, &b["view"], &b["doc"]),
        (200, &json!("users-1_1_0"), &new_doc)
    );

    // Retirement after the grace period, not before.
    let retired = wait_views(&api, "both standbys retired", |v| {
        state(v, "users-1_0_0") == "retired" && state(v, "users-1_2_0") == "retired"
    })
    .await;
    let grace_ms = GRACE_SECS * 1000;
    for (id, since) in [
        ("users-1_0_0", old_standby_since),
        ("users-1_2_0", alias_standby_since),
    ] {
        let at = field(&retired, id, "retired_at");
        assert!(
            at >= since + grace_ms,
            "{id} retired {} ms after it became standby (grace {grace_ms} ms)",
            at - since
        );
    }
    assert_eq!(state(&retired, "users-1_1_0"), "active");
    let (s, b) = api.get(&format!("/views/users-1_0_0/{READ_KEY}")).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (409, Some("view_retired")),
        "{b}"
    );
    let (s, b) = api.get(&format!("/views/users/{READ_KEY}")).await;
    assert_eq!((s, &b["doc"]), (200, &new_doc), "{b}");

    // On disk, after the daemon stopped: 1.0.0's column family is gone, the
    // one the active version (and nothing else) reads is there.
    let status = tokio::task::block_in_place(|| d.stop()).expect("the daemon was running");
    assert!(status.success(), "kiln serve exited with {status}");
    let on_disk = ViewStore::open(d.data_dir().join("views"))
        .and_then(|v| v.views())
        .expect("listing the views database's column families");
    let on_disk: Vec<String> = on_disk.iter().map(ToString::to_string).collect();
    assert_eq!(on_disk, ["users-1_1_0"], "column families of the views db");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_deploy_cutover_alias_rollback_and_retirement_embedded() {
    hot_deploy_lifecycle(Options::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_deploy_cutover_alias_rollback_and_retirement_jetstream() {
    let nats = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .expect("starting nats-server");
    hot_deploy_lifecycle(Options::default().jetstream(&nats.url())).await;
    drop(nats);
}

/// A version deployed when the log's last append carried a tag becomes ready
/// and active like any other. (On JetStream a tagged append ends with its tag
/// markers, messages no tail delivers: the stream's last sequence is not an
/// event's, and "caught up" must not wait for a checkpoint equal to it.)
async fn deploy_after_a_tagged_append(options: Options) {
    let d = Daemon::start_with(options);
    let api = Api::new(&d);
    let tagged = |u: usize, i: usize| {
        let mut e = user_event(u, i);
        e["tags"] = json!([format!("account-{u}")]);
        e
    };
    append(&api, "user-1", vec![tagged(1, 0), tagged(1, 1)]).await;
    let (s, b) = api.deploy(users_module("1.0.0", false)).await;
    assert_eq!((s, b["outcome"].as_str()), (202, Some("warming")), "{b}");
    let v = api
        .wait_state("users-1_0_0", "active", Duration::from_secs(20))
        .await;
    assert_eq!(v["lag"], 0, "{v}");
    // And a new version deployed with the live view tailing, after another one.
    let last = append(&api, "user-2", vec![tagged(2, 0)]).await;
    read_at(&api, "users", "user-2", last).await;
    let (s, b) = api.deploy(users_module("1.1.0", true)).await;
    assert_eq!((s, b["outcome"].as_str()), (202, Some("warming")), "{b}");
    let v = api
        .wait_state("users-1_1_0", "active", Duration::from_secs(20))
        .await;
    assert_eq!(v["lag"], 0, "{v}");
    let b = read_at(&api, "users", "user-1", last).await;
    assert_eq!(b["doc"]["logins"], 1, "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_deployed_after_a_tagged_append_becomes_active_embedded() {
    deploy_after_a_tagged_append(Options::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_deployed_after_a_tagged_append_becomes_active_jetstream() {
    let nats = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .expect("starting nats-server");
    deploy_after_a_tagged_append(Options::default().jetstream(&nats.url())).await;
    drop(nats);
}

/// `chaos` at `version`, subscribed to its five event types and `extra` (never
/// appended): each `extra` is another fingerprint, the same behaviour.
fn chaos_variant(version: &str, extra: &str) -> Vec<u8> {
    let bytes = std::fs::read(wasm::CHAOS).expect("chaos module");
    let mut m = wasm::manifest_of(&bytes);
    m["version"] = json!(version);
    m["events"] = json!(["Note", "Panic", "Fail", "Spin", "Hog", extra]);
    wasm::with_manifest(&bytes, &m.to_string())
}

/// A rollback that lands while the grace-period sweep is busy retiring another
/// standby is not undone by the sweep: the version rolled back to was listed
/// as expired, but it is active by the time its turn comes, and it stays so.
///
/// To hold the sweep inside its first retirement, every version is stuck on a
/// `Spin` event (a batch that runs until its deadline): retiring 1.0.0 waits
/// for its worker's batch, and meanwhile the test rolls back to 1.1.0, whose
/// grace expired in the same sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_during_the_grace_sweep_keeps_the_version_it_activated() {
    let d = Daemon::start_with(
        Options::default()
            .arg("--standby-grace-secs")
            .arg("2")
            .arg("--batch-deadline-ms")
            .arg("3000")
            .arg("--poison")
            .arg("park")
            .arg("--cutover")
            .arg("manual"),
    );
    let api = Api::new(&d);
    for (i, version) in ["1.0.0", "1.1.0", "1.2.0"].iter().enumerate() {
        let (s, b) = api
            .deploy(chaos_variant(version, &format!("Variant{i}")))
            .await;
        assert_eq!(s, 202, "{b}");
        let id = format!("chaos-{}", version.replace('.', "_"));
        api.wait_state(&id, "ready", WAIT).await;
    }
    // Promoted one after the other: 1.0.0 and 1.1.0 become standby moments
    // apart, so their grace periods end in the same sweep.
    for id in ["chaos-1_0_0", "chaos-1_1_0", "chaos-1_2_0"] {
        let (s, b) = api
            .post_json(&format!("/admin/views/{id}/promote"), &json!({}))
            .await;
        assert_eq!(s, 200, "{b}");
    }
    // Every worker now spins on this event for up to 2 × 3 s (the batch, then
    // the event alone before it is parked).
    append(&api, "chaos-1", vec![json!({ "type": "Spin", "data": {} })]).await;
    // The sweep flips 1.0.0 to retired, then waits for its worker.
    let v = wait_views(&api, "chaos-1_0_0 retired", |v| {
        state(v, "chaos-1_0_0") == "retired"
    })
    .await;
    assert_eq!(state(&v, "chaos-1_1_0"), "standby", "{v:#?}");
    let (s, b) = api
        .post_json("/admin/views/chaos/rollback", &json!({}))
        .await;
    assert_eq!((s, b["active"].as_str()), (200, Some("chaos-1_1_0")), "{b}");
    // 1.2.0, standby since the rollback, is retired after its own grace
    // period, once the workers are past the spin (it is parked); 1.1.0 stays
    // active and serves the bare name.
    let v = wait_views(&api, "chaos-1_2_0 retired", |v| {
        state(v, "chaos-1_2_0") == "retired"
    })
    .await;
    assert_eq!(state(&v, "chaos-1_1_0"), "active", "{v:#?}");
    let last = append(
        &api,
        "chaos-1",
        vec![json!({ "type": "Note", "data": { "text": "after" } })],
    )
    .await;
    let b = read_at(&api, "chaos", "note/chaos-1", last).await;
    assert_eq!(b["view"], "chaos-1_1_0", "{b}");
}

// ---------------------------------------------------------------------------
// Test 4: kill -9 at random moments, then compare with a clean rebuild.

/// The seed: `KILN_CRASH_SEED` if set, else the clock.
fn crash_seed() -> u64 {
    std::env::var("KILN_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}

/// Appends small batches to 50 user streams until `stop`, riding out the
/// daemon's deaths (a refused or cut request is retried after a pause; whether
/// a cut one committed does not matter: the rebuild reads the same log).
async fn keep_appending(base: String, stop: Arc<AtomicBool>) -> u64 {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("HTTP client");
    let mut acked = 0u64;
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let u = 5000 + n % 50;
        let events: Vec<Value> = (0..10)
            .map(|i| user_event(u, 1 + (n * 10 + i) % 99))
            .collect();
        let sent = http
            .post(format!("{base}/streams/user-{u}/events"))
            .json(&json!({ "events": events }))
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                acked += 1;
                n += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    acked
}

/// Versions in state `warming`, with their checkpoints.
fn warming(v: &BTreeMap<String, Value>) -> Vec<(String, u64)> {
    v.iter()
        .filter(|(_, s)| s["state"] == "warming")
        .map(|(id, s)| (id.clone(), s["checkpoint"].as_u64().unwrap_or(0)))
        .collect()
}

/// A fingerprint of a view's documents, for the report (equality is checked
/// on the documents themselves).
fn digest(docs: &[(Vec<u8>, Vec<u8>)]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (k, v) in docs {
        for b in (k.len() as u64)
            .to_le_bytes()
            .iter()
            .chain(k)
            .chain(&(v.len() as u64).to_le_bytes())
            .chain(v)
        {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// 4. Twenty kill -9s at seeded random moments, ten in the middle of a
///    warm-up and ten while every version tails live appends, each followed by
///    a restart; then every view's documents and checkpoint equal a rebuild
///    from scratch (the in-process runtime replaying the same log into an
///    empty views database).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_during_warm_up_and_live_tailing_then_every_view_equals_a_clean_rebuild() {
    const WARM_KILLS: usize = 10;
    const LIVE_KILLS: usize = 10;
    let seed = crash_seed();
    eprintln!("crash test seed: {seed} (rerun with KILN_CRASH_SEED={seed})");
    let mut rng = Rng(seed);
    let started = Instant::now();

    let mut d = Daemon::start_with(Options::default().arg("--standby-grace-secs").arg("3600"));
    let api = Api::new(&d);
    let (s, b) = api.deploy(users_module("1.0.0", false)).await;
    assert_eq!(s, 202, "{b}");
    api.wait_state("users-1_0_0", "active", WAIT).await;
    fill(&api, 0..300, 100).await; // 30,000 events: each warm-up has work to do

    let stop = Arc::new(AtomicBool::new(false));
    let appender = tokio::spawn(keep_appending(d.url(), stop.clone()));
    let (mut warm_kills, mut live_kills, mut next_minor) = (0, 0, 1);
    let mut rounds = 0;
    while warm_kills < WARM_KILLS || live_kills < LIVE_KILLS {
        rounds += 1;
        assert!(rounds <= 60, "could not place the kills in 60 rounds");
        // W W L W W L ...: two kills in a row may land in the same warm-up.
        let during_warm_up =
            warm_kills < WARM_KILLS && (live_kills >= LIVE_KILLS || rounds % 3 != 0);
        if during_warm_up {
            // Something warming with enough left to stop it at a random point.
            let v = views(&api).await;
            let head = v
                .values()
                .filter_map(|s| s["head"].as_u64())
                .max()
                .unwrap_or(0);
            let (id, from) = match warming(&v)
                .into_iter()
                .find(|(_, cp)| head.saturating_sub(*cp) > 3000)
            {
                Some(w) => w,
                None => {
                    let version = format!("1.{next_minor}.0");
                    let variant = format!("Variant{next_minor}");
                    next_minor += 1;
                    let (s, b) = api
                        .deploy(module_version(USERS, &version, Some(&variant)))
                        .await;
                    assert_eq!((s, b["outcome"].as_str()), (202, Some("warming")), "{b}");
                    (b["id"].as_str().expect("id").to_string(), 0)
                }
            };
            // Kill once it has passed a random point of what is left (up to
            // 90%), polling its checkpoint.
            let target = from + rng.below(head.saturating_sub(from) * 9 / 10 + 1);
            let seen = loop {
                let v = views(&api).await;
                let s = &v[&id];
                if s["state"] != "warming" || s["checkpoint"].as_u64().unwrap_or(0) >= target {
                    break s.clone();
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            };
            tokio::task::block_in_place(|| d.kill9());
            if seen["state"] != "warming" {
                eprintln!("round {rounds}: {id} finished warming before the kill; not counted");
            } else {
                warm_kills += 1;
                eprintln!(
                    "round {rounds}: kill -9 during the warm-up of {id} at {} of {head} (target {target})",
                    seen["checkpoint"]
                );
            }
        } else {
            // Every version caught up and tailing the live appends.
            wait_views(&api, "no version warming", |v| warming(v).is_empty()).await;
            let delay = rng.below(300);
            tokio::time::sleep(Duration::from_millis(delay)).await;
            tokio::task::block_in_place(|| d.kill9());
            live_kills += 1;
            eprintln!("round {rounds}: kill -9 while tailing live, {delay} ms after all caught up");
        }
        tokio::task::block_in_place(|| d.restart());
    }
    stop.store(true, Ordering::Relaxed);
    let acked = appender.await.expect("appender");
    assert!(acked > 0, "no live append succeeded");

    // Let every version catch up with the whole log, then stop the daemon.
    let last = append(&api, "user-0", vec![user_event(0, 100)]).await;
    let end = wait_views(&api, "every version at the head", |v| {
        v.values()
            .all(|s| s["checkpoint"].as_u64().is_some_and(|c| c >= last))
    })
    .await;
    for (id, s) in &end {
        assert!(
            matches!(s["state"].as_str(), Some("active" | "standby")),
            "{id} is {} after the crashes: {s}",
            s["state"]
        );
    }
    let status = tokio::task::block_in_place(|| d.stop()).expect("the daemon was running");
    assert!(status.success(), "kiln serve exited with {status}");

    // The clean rebuild: the same log, replayed in process into empty views.
    let data = d.data_dir().to_path_buf();
    let store = EmbeddedStore::open(EmbeddedConfig::new(data.join("log"))).expect("the log");
    let mut events = Vec::new();
    loop {
        let batch = scan_log(&store, events.len() as u64 + 1, 10_000).expect("reading the log");
        if batch.is_empty() {
            break;
        }
        events.extend(batch);
    }
    assert_eq!(events.last().map(|e| e.position), Some(last));
    let crashed = ViewStore::open(data.join("views")).expect("the daemon's views");
    let clean_dir = tempfile::tempdir().expect("temp dir");
    let clean = ViewStore::open(clean_dir.path()).expect("clean views");
    let rt = wasm::runtime();
    let ids: Vec<ViewId> = crashed.views().expect("views on disk");
    let mut expected: Vec<ViewId> = end.keys().map(|k| k.parse().expect("view id")).collect();
    expected.sort();
    assert_eq!(ids, expected, "one column family per version");
    for id in &ids {
        let module = wasm::load(
            &rt,
            &data
                .join("modules")
                .join(format!("{id}.wasm"))
                .display()
                .to_string(),
        );
        let mut projector = Projector::open(&module, &clean).expect("clean view");
        for chunk in events.chunks(512) {
            projector.apply(chunk).expect("clean replay");
        }
        assert_eq!(
            crashed.checkpoint(id).expect("checkpoint"),
            clean.checkpoint(id).expect("clean checkpoint"),
            "{id}: checkpoint"
        );
        let got = crashed.scan(id, b"", None, usize::MAX).expect("scan");
        let want = clean.scan(id, b"", None, usize::MAX).expect("clean scan");
        if got != want {
            let first = got.iter().zip(&want).find(|(a, b)| a != b).map(|(a, b)| {
                format!(
                    "{} = {} but a clean rebuild has {} = {}",
                    String::from_utf8_lossy(&a.0),
                    String::from_utf8_lossy(&a.1),
                    String::from_utf8_lossy(&b.0),
                    String::from_utf8_lossy(&b.1)
                )
            });
            panic!(
                "{id} differs from a clean rebuild (seed {seed}): {} vs {} documents; {first:?}",
                got.len(),
                want.len()
            );
        }
        eprintln!(
            "{id}: {} documents, digest {:016x} = clean rebuild",
            got.len(),
            digest(&got)
        );
    }
    eprintln!(
        "{WARM_KILLS} kills during warm-ups, {LIVE_KILLS} during live tailing ({rounds} rounds, {} events, {acked} live appends acked) in {:.1} s",
        events.len(),
        started.elapsed().as_secs_f64()
    );
}
