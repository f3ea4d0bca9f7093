//! `kiln diff` and `GET /admin/views/{a}/diff/{b}` against a real daemon
//! (real RocksDB, real wasmtime, modules built from `projections/users`),
//! and the `auto-if-identical` cutover policy built on them.
//!
//! Logic variants of `users`: the same code with its manifest subscribing to
//! fewer event types (the host never hands it the others), or to one more
//! that is never appended (a new fingerprint, a view of its own, the same
//! documents).

use std::time::{Duration, Instant};

use kiln_tests::daemon::{
    Api, Daemon, Options, deploy_slow_warming_chaos, kiln_cli, module_version, slow_warming_options,
};
use kiln_tests::wasm::{CHAOS, USERS, manifest_of, users_module, with_manifest};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

/// `users` at `version`, subscribing to every event type but `dropped`.
fn users_without(version: &str, dropped: &[&str]) -> Vec<u8> {
    let bytes = std::fs::read(USERS).expect("users module");
    let mut m = manifest_of(&bytes);
    m["version"] = Value::from(version);
    let events: Vec<Value> = m["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| !dropped.iter().any(|d| *e == d))
        .cloned()
        .collect();
    m["events"] = Value::from(events);
    with_manifest(&bytes, &m.to_string())
}

/// `users` at `version` with the same logic as 1.0.0 but a view of its own.
fn users_same_logic(version: &str) -> Vec<u8> {
    module_version(USERS, version, Some("NeverAppended"))
}

async fn append(api: &Api, stream: &str, event_type: &str, data: Value) -> u64 {
    let (s, b) = api.append(stream, json!("any"), event_type, data).await;
    assert_eq!(s, 200, "{b}");
    b["position"].as_u64().expect("position")
}

async fn deploy(api: &Api, wasm: Vec<u8>, id: &str, state: &str) -> Value {
    let (s, b) = api.deploy(wasm).await;
    assert!(s == 200 || s == 202, "{b}");
    assert_eq!(b["id"], id, "{b}");
    api.wait_state(id, state, WAIT).await
}

async fn diff(api: &Api, a: &str, b: &str, query: &str) -> Value {
    let (s, body) = api.get(&format!("/admin/views/{a}/diff/{b}{query}")).await;
    assert_eq!(s, 200, "diff {a} {b}: {body}");
    body
}

/// user-1: registered only; user-2: registered, two failed logins;
/// user-3: registered, one login; user-4: one login, never registered.
async fn append_users(api: &Api) -> u64 {
    let reg = |n: &str| json!({ "name": n, "email": format!("{n}@x") });
    append(api, "user-1", "UserRegistered", reg("one")).await;
    append(api, "user-2", "UserRegistered", reg("two")).await;
    append(api, "user-2", "LoginFailed", json!({})).await;
    append(api, "user-2", "LoginFailed", json!({})).await;
    append(api, "user-3", "UserRegistered", reg("three")).await;
    append(api, "user-3", "UserLoggedIn", json!({})).await;
    append(api, "user-4", "UserLoggedIn", json!({})).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diff_names_changed_fields_added_and_removed_keys_with_cli_exit_codes() {
    let d = Daemon::start_with(Options::default().arg("--cutover").arg("manual"));
    let api = Api::new(&d);
    let head = append_users(&api).await;
    deploy(&api, users_module("1.0.0", false), "users-1_0_0", "ready").await;
    let (s, b) = api
        .post_bytes("/admin/views/users-1_0_0/promote", vec![])
        .await;
    assert_eq!(s, 200, "{b}");
    deploy(&api, users_same_logic("1.0.1"), "users-1_0_1", "ready").await;
    deploy(&api, users_module("1.1.0", true), "users-1_1_0", "ready").await;

    // Identical logic under new code: a view of its own, the same documents.
    let same = diff(&api, "users", "users-1_0_1", "").await;
    assert_eq!(same["identical"], true, "{same}");
    assert_eq!(
        same["a"], "users-1_0_0",
        "a bare name is its active version"
    );
    assert_eq!(
        same["b_backed_by"], "users-1_0_1",
        "its own view, not an alias"
    );
    assert_eq!(
        (same["compared"].as_u64(), same["same"].as_u64()),
        (Some(4), Some(4))
    );
    assert_eq!(same["position"], head, "{same}");

    // One changed field: exactly the key whose document it changes.
    let changed = diff(&api, "users-1_0_0", "users-1_1_0", "").await;
    assert_eq!(changed["identical"], false);
    assert_eq!(
        (
            changed["changed"].as_u64(),
            changed["only_in_a"].as_u64(),
            changed["only_in_b"].as_u64()
        ),
        (Some(1), Some(0), Some(0)),
        "{changed}"
    );
    assert_eq!(
        changed["examples"]["changed"],
        json!([{ "key": "user-2", "fields": [{ "path": "/failed_logins", "old": 2, "new": 0 }], "more_fields": 0 }])
    );

    // Keys added and removed: A never sees logins, B never sees registrations.
    deploy(
        &api,
        users_without("1.2.0", &["UserLoggedIn"]),
        "users-1_2_0",
        "ready",
    )
    .await;
    deploy(
        &api,
        users_without("1.3.0", &["UserRegistered"]),
        "users-1_3_0",
        "ready",
    )
    .await;
    let moved = diff(&api, "users-1_2_0", "users-1_3_0", "?limit=5").await;
    assert_eq!(
        (
            moved["only_in_a"].as_u64(),
            moved["only_in_b"].as_u64(),
            moved["changed"].as_u64()
        ),
        (Some(1), Some(1), Some(2)),
        "{moved}"
    );
    assert_eq!(moved["examples"]["only_in_a"][0]["key"], "user-1");
    assert_eq!(moved["examples"]["only_in_a"][0]["doc"]["name"], "one");
    assert_eq!(moved["examples"]["only_in_b"][0]["key"], "user-4");
    assert_eq!(moved["examples"]["only_in_b"][0]["doc"]["logins"], 1);
    let paths: Vec<&str> = moved["examples"]["changed"][1]["fields"]
        .as_array()
        .expect("fields")
        .iter()
        .filter_map(|f| f["path"].as_str())
        .collect();
    assert_eq!(moved["examples"]["changed"][1]["key"], "user-3");
    for p in ["/id", "/name", "/email", "/logins", "/last_login"] {
        assert!(paths.contains(&p), "{p} in {paths:?}");
    }
    // A prefix limits the key range; limit=0 keeps the counts, no examples.
    let one = diff(&api, "users-1_2_0", "users-1_3_0", "?prefix=user-4&limit=0").await;
    assert_eq!(
        (one["compared"].as_u64(), one["only_in_b"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(one["examples"]["only_in_b"], json!([]));

    // The CLI: 0 identical, 9 different, --json for pipelines, 4 unknown.
    let (code, out, err) = kiln_cli(&d, &["diff", "users", "users-1_0_1"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("identical"), "{out}");
    let (code, out, err) = kiln_cli(&d, &["diff", "users-1_0_0", "users-1_1_0"]);
    assert_eq!(code, 9, "{out}{err}");
    assert!(
        out.contains("user-2") && out.contains("/failed_logins: 2 -> 0"),
        "{out}"
    );
    let (code, out, _) = kiln_cli(
        &d,
        &[
            "diff",
            "users-1_2_0",
            "users-1_3_0",
            "--json",
            "--prefix",
            "user-1",
        ],
    );
    assert_eq!(code, 9);
    let body: Value = serde_json::from_str(out.trim()).expect("one JSON document");
    assert_eq!(
        (body["compared"].as_u64(), body["only_in_a"].as_u64()),
        (Some(1), Some(1))
    );
    let (code, _, err) = kiln_cli(&d, &["diff", "users", "users-9_9_9"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("users-9_9_9"), "{err}");

    // The manual policy still compared each ready version with the active one.
    let (_, views) = api.get("/views").await;
    let v = views["views"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["id"] == "users-1_1_0"))
        .cloned()
        .expect("users-1_1_0");
    let check = &v["cutover_check"];
    assert_eq!(check["against"], "users-1_0_0", "{v}");
    assert_eq!(check["result"], "different", "{v}");
    assert_eq!(check["summary"]["changed"], 1);
    let (_, out, _) = kiln_cli(&d, &["status"]);
    assert!(
        out.lines().any(|l| l.starts_with("users-1_1_0")
            && l.contains("1 changed")
            && l.contains("/failed_logins")),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ids_and_retired_versions_are_refused_naming_the_view_and_why() {
    let d = Daemon::start_with(slow_warming_options());
    let api = Api::new(&d);
    append_users(&api).await;
    deploy(&api, users_module("1.0.0", false), "users-1_0_0", "active").await;
    deploy(&api, users_same_logic("1.1.0"), "users-1_1_0", "active").await;
    let (s, b) = api
        .post_bytes("/admin/views/users-1_0_0/retire", vec![])
        .await;
    assert_eq!(s, 200, "{b}");
    // A version still warming would hold the live one for its whole replay.
    let warming = deploy_slow_warming_chaos(&api, 5).await;
    let (s, body) = api.get(&format!("/admin/views/users/diff/{warming}")).await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (409, Some("not_comparable")),
        "{body}"
    );
    assert_eq!(body["error"]["view"], warming.as_str(), "{body}");
    assert_eq!(body["error"]["state"], "warming", "{body}");
    let (code, _, err) = kiln_cli(&d, &["diff", "users", &warming]);
    assert_eq!(code, 3, "{err}");
    for (a, other, status, code, side, why) in [
        (
            "users",
            "users-9_9_9",
            404,
            "unknown_view",
            "b",
            "no view version users-9_9_9",
        ),
        ("nobody", "users", 404, "unknown_view", "a", "nobody"),
        ("Bad%20Name", "users", 400, "invalid_view", "a", "Bad Name"),
        ("users@%5Ezz", "users", 400, "invalid_view", "a", "semver"),
        ("users-1_0_0", "users", 404, "view_retired", "a", "dropped"),
    ] {
        let (s, body) = api.get(&format!("/admin/views/{a}/diff/{other}")).await;
        assert_eq!(s, status, "{a} vs {other}: {body}");
        let e = &body["error"];
        assert_eq!(e["code"], code, "{body}");
        assert_eq!(e["side"], side, "{body}");
        let msg = e["message"].as_str().unwrap_or("");
        assert!(msg.contains(why), "{msg:?} lacks {why:?}");
    }
    let (s, body) = api.get("/admin/views/users/diff/users?limit=5000").await;
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (400, Some("bad_limit")),
        "{body}"
    );
}

/// Both versions keep tailing a log that grows all along; every diff is
/// taken at one position. Same logic in both, so a diff that mixed two
/// positions would find the documents the events in between changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diff_while_both_versions_tail_a_growing_log_is_taken_at_one_position() {
    let d = Daemon::start_with(Options::default());
    let api = Api::new(&d);
    for u in 0..20 {
        api.register_user(&format!("user-{u}")).await;
    }
    deploy(&api, users_module("1.0.0", false), "users-1_0_0", "active").await;
    deploy(&api, users_same_logic("1.1.0"), "users-1_1_0", "active").await;
    let writer = {
        let api = api.clone();
        tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs(6);
            let mut n = 0u64;
            while Instant::now() < until {
                append(&api, &format!("user-{}", n % 20), "UserLoggedIn", json!({})).await;
                n += 1;
            }
            n
        })
    };
    let mut positions = Vec::new();
    tokio::time::sleep(Duration::from_millis(200)).await;
    while !writer.is_finished() {
        let r = diff(&api, "users-1_0_0", "users-1_1_0", "").await;
        assert_eq!(r["identical"], true, "a diff mixed two positions: {r}");
        assert_eq!(r["compared"], 20, "{r}");
        let p = r["position"].as_u64().expect("position");
        assert!(
            positions.last().is_none_or(|last| *last <= p),
            "{positions:?} then {p}"
        );
        positions.push(p);
    }
    let appended = writer.await.expect("writer");
    assert!(appended > 100, "the log grew by {appended} events only");
    assert!(positions.len() >= 3, "{positions:?}");
    positions.dedup();
    assert!(
        positions.len() >= 3,
        "every diff at a new position: {positions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_if_identical_promotes_identical_logic_and_waits_on_a_change() {
    let d = Daemon::start_with(Options::default().arg("--cutover").arg("auto-if-identical"));
    let api = Api::new(&d);
    append_users(&api).await;
    // A first deploy has nothing to compare with: promoted like auto.
    let v = deploy(&api, users_module("1.0.0", false), "users-1_0_0", "active").await;
    assert!(
        v["activated_by"]
            .as_str()
            .unwrap_or("")
            .starts_with("auto-if-identical"),
        "{v}"
    );
    // Identical documents: promoted, saying so.
    let v = deploy(&api, users_same_logic("1.1.0"), "users-1_1_0", "active").await;
    let how = v["activated_by"].as_str().unwrap_or("");
    assert!(
        how.starts_with("auto-if-identical cutover: identical to users-1_0_0 at position"),
        "{v}"
    );
    assert_eq!(v["cutover_check"]["result"], "identical", "{v}");
    // Different documents: ready, waiting for a promote, the diff in its status.
    deploy(&api, users_module("1.2.0", true), "users-1_2_0", "ready").await;
    let deadline = Instant::now() + WAIT;
    let v = loop {
        let v = api.wait_state("users-1_2_0", "ready", WAIT).await;
        if v["cutover_check"]["result"] != "pending" && !v["cutover_check"].is_null() {
            break v;
        }
        assert!(Instant::now() < deadline, "no check: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let check = &v["cutover_check"];
    assert_eq!(check["result"], "different", "{v}");
    assert_eq!(check["against"], "users-1_1_0");
    assert_eq!(check["summary"]["changed"], 1);
    assert_eq!(check["summary"]["examples"]["changed"][0]["key"], "user-2");
    assert_eq!(
        check["summary"]["examples"]["changed"][0]["fields"][0]["path"],
        "/failed_logins"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, views) = api.get("/views").await;
    let active: Vec<&Value> = views["views"]
        .as_array()
        .expect("views")
        .iter()
        .filter(|v| v["state"] == "active")
        .collect();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0]["id"], "users-1_1_0", "a different version waits");
    let (code, out, err) = kiln_cli(&d, &["promote", "users-1_2_0"]);
    assert_eq!(code, 0, "{out}{err}");
    api.wait_state("users-1_2_0", "active", WAIT).await;
}

/// `chaos` at `version`, handed only the event types `events` (each set a
/// logic, and a view, of its own).
fn chaos_with(version: &str, events: &[&str]) -> Vec<u8> {
    let bytes = std::fs::read(CHAOS).expect("chaos module");
    let mut m = manifest_of(&bytes);
    m["version"] = Value::from(version);
    m["events"] = json!(events);
    with_manifest(&bytes, &m.to_string())
}

/// A daemon whose projections get a 1 s batch deadline, `poison` policy.
fn slow_options(poison: &str) -> Options {
    Options::default()
        .arg("--cutover")
        .arg("manual")
        .arg("--batch-deadline-ms")
        .arg("1000")
        .arg("--poison")
        .arg(poison)
}

async fn post_ok(api: &Api, path: &str) {
    let (s, b) = api.post_bytes(path, vec![]).await;
    assert_eq!(s, 200, "{path}: {b}");
}

/// Two versions of `chaos` at the head of a log of notes: a quick one,
/// handed notes only, and a slow one, handed spins and failures too (under
/// a 1 s batch deadline each `Spin` costs it three deadlines, its batch then
/// the event alone twice, before it is parked or fails it). `slow_first`:
/// the slow one is 1.0.0, promoted, then the quick 1.1.0 promoted over it
/// (the slow one is standby); else the quick 1.0.0 is active and the slow
/// 1.1.0 ready. Returns (quick, slow).
async fn quick_and_slow(api: &Api, slow_first: bool) -> (&'static str, &'static str) {
    const QUICK: &[&str] = &["Note"];
    const SLOW: &[&str] = &["Note", "Spin", "Fail"];
    append(api, "chaos-0", "Note", json!({ "text": "first" })).await;
    let (first, second) = if slow_first {
        (SLOW, QUICK)
    } else {
        (QUICK, SLOW)
    };
    deploy(api, chaos_with("1.0.0", first), "chaos-1_0_0", "ready").await;
    post_ok(api, "/admin/views/chaos-1_0_0/promote").await;
    deploy(api, chaos_with("1.1.0", second), "chaos-1_1_0", "ready").await;
    if slow_first {
        post_ok(api, "/admin/views/chaos-1_1_0/promote").await;
        ("chaos-1_1_0", "chaos-1_0_0")
    } else {
        ("chaos-1_0_0", "chaos-1_1_0")
    }
}

/// Appends `n` spins, each on a stream of its own, and waits until the
/// quick version (what the bare name serves) has applied them: the slow one
/// is behind it from then on, for about 1 + 2n seconds.
async fn spins(api: &Api, n: usize) {
    let mut last = 0;
    for i in 0..n {
        last = append(api, &format!("chaos-spin{i}"), "Spin", json!({})).await;
    }
    let (s, b) = api
        .get(&format!("/views/chaos?position={last}&wait_ms=10000"))
        .await;
    assert_eq!(s, 200, "the quick version at {last}: {b}");
}

/// `GET /admin/views/{a}/diff/{b}?wait_ms=` in the background: its status,
/// answer and how long it took.
fn pending_diff(
    api: &Api,
    a: &str,
    b: &str,
    wait_ms: u64,
) -> tokio::task::JoinHandle<(u16, Value, Duration)> {
    let (api, path) = (
        api.clone(),
        format!("/admin/views/{a}/diff/{b}?wait_ms={wait_ms}"),
    );
    tokio::spawn(async move {
        let t = Instant::now();
        let (s, body) = api.get(&path).await;
        (s, body, t.elapsed())
    })
}

/// Polls `GET /views` until a comparison waits for `id` to reach a position.
async fn until_awaited(api: &Api, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = api.get("/views").await;
        let v = body["views"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["id"] == id))
            .cloned()
            .unwrap_or_default();
        if v["awaited"].as_u64() >= Some(1) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no comparison waits for {id}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A diff waiting for the slow side of [`quick_and_slow`].
struct WaitingDiff {
    d: Daemon,
    api: Api,
    quick: &'static str,
    slow: &'static str,
    /// `GET /admin/views/{quick}/diff/{slow}?wait_ms=30000`, under way.
    pending: tokio::task::JoinHandle<(u16, Value, Duration)>,
}

/// A daemon started with `options`, [`quick_and_slow`], `n` spins, and a
/// diff of the quick version against the slow one waiting for the slow one.
async fn a_diff_waiting_for_a_slow_side(
    options: Options,
    slow_first: bool,
    n: usize,
) -> WaitingDiff {
    let d = Daemon::start_with(options);
    let api = Api::new(&d);
    let (quick, slow) = quick_and_slow(&api, slow_first).await;
    spins(&api, n).await;
    let pending = pending_diff(&api, quick, slow, 30_000);
    until_awaited(&api, slow).await;
    WaitingDiff {
        d,
        api,
        quick,
        slow,
        pending,
    }
}

/// Issue 32: a diff waiting for a slow candidate never holds the version a
/// name serves (read-your-writes on it answers at the head), nor another
/// comparison; retiring the candidate ends it at once with `404
/// view_retired`, naming the side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retiring_the_side_a_diff_waits_for_ends_it_at_once_and_nothing_else_waits() {
    let WaitingDiff {
        d: _d,
        api,
        quick,
        slow,
        pending,
    } = a_diff_waiting_for_a_slow_side(slow_options("park"), false, 4).await;
    let p = append(&api, "chaos-late", "Note", json!({ "text": "late" })).await;
    let (s, b) = api
        .get(&format!("/views/chaos?position={p}&wait_ms=5000"))
        .await;
    assert_eq!(s, 200, "read-your-writes on the served version: {b}");
    let t = Instant::now();
    let r = diff(&api, quick, quick, "?wait_ms=5000").await;
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "an unrelated diff waited {:?} for the stuck one",
        t.elapsed()
    );
    assert_eq!(r["identical"], true, "{r}");
    assert!(!pending.is_finished(), "the slow side caught up too soon");
    // The retire itself waits for the spinning batch to end; the diff does
    // not wait for the retire.
    let retired_at = Instant::now();
    let retire = {
        let api = api.clone();
        tokio::spawn(async move { post_ok(&api, &format!("/admin/views/{slow}/retire")).await })
    };
    ended_retired_at_once(pending, retired_at).await;
    retire.await.expect("retire");
}

/// The pending diff ends within 3 s of `retired_at` with `404
/// view_retired`, naming side b.
async fn ended_retired_at_once(
    pending: tokio::task::JoinHandle<(u16, Value, Duration)>,
    retired_at: Instant,
) {
    let (s, body, _) = pending.await.expect("diff task");
    let after = retired_at.elapsed();
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (404, Some("view_retired")),
        "{body}"
    );
    assert_eq!(body["error"]["side"], "b", "{body}");
    assert!(
        after < Duration::from_secs(3),
        "ended {after:?} after the retire"
    );
}

/// Issue 32's known gap: a side that is an alias (its own version, reading
/// another's view) retired while the diff waited for the view it reads:
/// the view tails on for the version it belongs to, so nothing ended the
/// diff, which ran to its own wait limit. It ends at once now, `404
/// view_retired` naming the alias's side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retiring_an_alias_a_diff_waits_on_ends_it_at_once() {
    let d = Daemon::start_with(slow_options("park"));
    let api = Api::new(&d);
    let (quick, slow) = quick_and_slow(&api, false).await;
    const SLOW: &[&str] = &["Note", "Spin", "Fail"];
    let alias = deploy(&api, chaos_with("1.1.1", SLOW), "chaos-1_1_1", "ready").await;
    assert_eq!(alias["alias_of"], slow, "{alias}");
    spins(&api, 4).await;
    let pending = pending_diff(&api, quick, "chaos-1_1_1", 30_000);
    until_awaited(&api, slow).await;
    let retired_at = Instant::now();
    post_ok(&api, "/admin/views/chaos-1_1_1/retire").await;
    ended_retired_at_once(pending, retired_at).await;
    drop(d);
}

/// Found while testing the alias case: a diff waiting for the slow side to
/// reach a position that is a parked poison event (the log's last) was
/// answered only by the slow side's next commit, and none came: it waited
/// out its limit (504) although both sides stood at that position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diff_waiting_for_a_parked_event_ends_when_it_is_parked() {
    let d = Daemon::start_with(slow_options("park"));
    let api = Api::new(&d);
    let (quick, slow) = quick_and_slow(&api, false).await;
    spins(&api, 1).await;
    let pending = pending_diff(&api, quick, slow, 30_000);
    let (s, body, took) = pending.await.expect("diff task");
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["identical"], true, "{body}");
    assert!(took < Duration::from_secs(15), "took {took:?}");
    drop(d);
}

/// Issue 32: the side a diff waits for failing ends it at once with `409
/// view_failed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_side_a_diff_waits_for_failing_ends_it_at_once() {
    let WaitingDiff {
        d: _d,
        api,
        slow,
        pending,
        ..
    } = a_diff_waiting_for_a_slow_side(slow_options("stop"), false, 1).await;
    let failed = api.wait_state(slow, "failed", WAIT).await;
    let failed_at = Instant::now();
    let (s, body, _) = pending.await.expect("diff task");
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (409, Some("view_failed")),
        "{body} (failed: {failed})"
    );
    assert_eq!(body["error"]["side"], "b", "{body}");
    assert!(failed_at.elapsed() < Duration::from_secs(3));
}

/// Issue 32: the grace sweep retiring the standby a diff waits for ends the
/// diff at once (it froze the active version for a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grace_sweep_retiring_the_side_a_diff_waits_for_ends_it_at_once() {
    // The slow standby about 13 s behind: past the 6 s grace.
    let options = slow_options("park").arg("--standby-grace-secs").arg("6");
    let WaitingDiff {
        d: _d,
        api,
        slow: standby,
        pending,
        ..
    } = a_diff_waiting_for_a_slow_side(options, true, 6).await;
    api.wait_state(standby, "retired", Duration::from_secs(20))
        .await;
    let retired_at = Instant::now();
    let (s, body, took) = pending.await.expect("diff task");
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (404, Some("view_retired")),
        "{body}"
    );
    assert!(
        retired_at.elapsed() < Duration::from_secs(3),
        "the diff took {took:?}"
    );
}

/// Issue 32: SIGTERM during a pending diff answers it `503 shutting_down`,
/// and the daemon stops without waiting out its shutdown grace (10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_a_pending_diff_shutting_down_and_stops_within_its_grace() {
    let WaitingDiff { mut d, pending, .. } =
        a_diff_waiting_for_a_slow_side(slow_options("park"), false, 1).await;
    let t = Instant::now();
    let stopped = tokio::task::spawn_blocking(move || {
        let status = d.stop();
        (status, t.elapsed())
    });
    let (s, body, _) = pending.await.expect("diff task");
    assert_eq!(
        (s, body["error"]["code"].as_str()),
        (503, Some("shutting_down")),
        "{body}"
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let (status, took) = stopped.await.expect("stop");
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(took < Duration::from_secs(8), "the stop took {took:?}");
}
