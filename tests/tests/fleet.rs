//! A fleet of three real `kiln serve` processes on one nats-server (and on a
//! 3-node cluster): membership, fleet-wide cutover and rollback, a member
//! killed mid-cutover that rejoins and follows, and a corrupted document on
//! one member found by its view digest.
//!
//! Every member runs `users` under `cutover = "fleet"` with a 200 ms
//! heartbeat, a 1.5 s membership TTL and a digest every 10 log positions.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kiln::views::{ViewId, ViewStore, Writes};
use kiln_tests::daemon::{Api, Daemon, Options, fleet_member, kiln_cli, module_version};
use kiln_tests::nats::{NatsServer, ready_cluster};
use kiln_tests::wasm::USERS;
use serde_json::{Value, json};

const IDS: [&str; 3] = ["a", "b", "c"];

fn member(nats_url: &str, id: &str) -> Options {
    fleet_member(nats_url, "t", id)
}

async fn start_members(nats_url: &str) -> (Vec<Daemon>, Vec<Api>) {
    start(IDS.iter().map(|id| member(nats_url, id)).collect()).await
}

/// One member per `options`, started in order.
async fn start(options: Vec<Options>) -> (Vec<Daemon>, Vec<Api>) {
    let mut members = Vec::new();
    for o in options {
        members.push(
            tokio::task::spawn_blocking(move || Daemon::start_with(o))
                .await
                .expect("starting a member"),
        );
    }
    let apis = members.iter().map(Api::new).collect();
    (members, apis)
}

/// Polls `check` every 20 ms until it gives a value, for at most `timeout`.
async fn until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The version a member's bare `users` answers `user-1` from (None: not 200).
async fn answers(api: &Api) -> Option<String> {
    let (s, b) = api.get("/views/users/user-1").await;
    (s == 200).then(|| b["view"].as_str().unwrap_or("").to_string())
}

async fn all_answer(apis: &[Api], view: &str, timeout: Duration) {
    until(&format!("every member answers {view}"), timeout, || async {
        for api in apis {
            if answers(api).await.as_deref() != Some(view) {
                return None;
            }
        }
        Some(())
    })
    .await;
}

async fn deploy_everywhere(apis: &[Api], version: &str, variant: Option<&str>) {
    for api in apis {
        let (s, b) = api.deploy(module_version(USERS, version, variant)).await;
        assert_eq!(s, 202, "{b}");
    }
}

async fn register(api: &Api, users: std::ops::Range<usize>) -> u64 {
    let mut last = 0;
    for u in users {
        last = api.register_user(&format!("user-{u}")).await["position"]
            .as_u64()
            .unwrap_or(0);
    }
    last
}

/// Registers 10 more users (from `*next_user`) through `writer` at a time
/// until `reader`'s `GET /fleet` satisfies `done` within 3 s of a round,
/// for at most 60 s; that answer.
async fn grow_until(
    what: &str,
    writer: &Api,
    reader: &Api,
    next_user: &mut usize,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        register(writer, *next_user..*next_user + 10).await;
        *next_user += 10;
        let round = Instant::now() + Duration::from_secs(3);
        while Instant::now() < round {
            let s = fleet(reader).await;
            if done(&s) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(Instant::now() < deadline, "{what}: not within 60 s");
    }
}

/// Grows the log through `writer` by 10 users at a time until `reader`'s
/// `GET /fleet` shows a digest mismatch all three members digested: that
/// status, and the mismatch.
async fn mismatch_of_three(writer: &Api, reader: &Api, next_user: &mut usize) -> (Value, Value) {
    let three = |m: &Value| m["digests"].as_object().is_some_and(|d| d.len() == 3);
    let status = grow_until(
        "a digest mismatch that all three digested",
        writer,
        reader,
        next_user,
        |s| {
            s["mismatches"]
                .as_array()
                .is_some_and(|m| m.iter().any(three))
        },
    )
    .await;
    let m = status["mismatches"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| three(m)))
        .cloned()
        .unwrap_or_default();
    (status, m)
}

async fn fleet(api: &Api) -> Value {
    let (s, b) = api.get("/fleet").await;
    assert_eq!(s, 200, "{b}");
    b
}

fn instances(status: &Value) -> Vec<String> {
    status["members"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .filter_map(|m| m["instance"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Five users, and `users` 1.0.0 deployed on every member and answered.
async fn serve_1_0_0(apis: &[Api]) {
    register(&apis[0], 1..6).await;
    deploy_everywhere(apis, "1.0.0", None).await;
    all_answer(apis, "users-1_0_0", Duration::from_secs(30)).await;
}

/// Three members with `users` 1.0.0 active fleet-wide over five users.
async fn fleet_at_1_0_0(nats_url: &str) -> (Vec<Daemon>, Vec<Api>) {
    let (members, apis) = start_members(nats_url).await;
    serve_1_0_0(&apis).await;
    let status = fleet(&apis[1]).await;
    assert_eq!(instances(&status), IDS, "{status}");
    assert_eq!(
        status["decisions"]["users"]["active"], "users-1_0_0",
        "{status}"
    );
    (members, apis)
}

/// Reads `user-1` through the bare name from each member in turn until
/// stopped; every answer: (member, version or None for a refusal).
fn round_robin_reader(
    apis: Vec<Api>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(usize, Option<String>)>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            let m = i % apis.len();
            seen.push((m, answers(&apis[m]).await));
            i += 1;
        }
        seen
    })
}

/// No answer is from a version older than one answered before it.
fn assert_monotonic(seen: &[(usize, Option<String>)]) {
    let mut newest: Option<(ViewId, usize)> = None;
    for (n, (m, v)) in seen.iter().enumerate() {
        let Some(v) = v else { continue };
        let id: ViewId = v.parse().expect("a view id");
        if let Some((top, at)) = &newest {
            assert!(
                id >= *top,
                "read {n} (member {}) answered {id} after read {at} answered {top}",
                IDS[*m]
            );
        }
        if newest.as_ref().is_none_or(|(top, _)| id > *top) {
            newest = Some((id, n));
        }
    }
}

async fn cutover_and_rollback(nats_url: &str) {
    let (members, apis) = fleet_at_1_0_0(nats_url).await;
    let stop = Arc::new(AtomicBool::new(false));
    let reader = round_robin_reader(apis.clone(), stop.clone());
    // Live appends all along.
    let appender = {
        let (api, stop) = (apis[0].clone(), stop.clone());
        tokio::spawn(async move {
            let mut u = 100;
            while !stop.load(Ordering::Relaxed) {
                api.register_user(&format!("user-{u}")).await;
                u += 1;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };
    deploy_everywhere(&apis, "1.1.0", Some("Variant1")).await;
    all_answer(&apis, "users-1_1_0", Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = reader.await.expect("reader");
    appender.await.expect("appender");
    assert_monotonic(&seen);
    let versions: std::collections::BTreeSet<&str> =
        seen.iter().filter_map(|(_, v)| v.as_deref()).collect();
    assert_eq!(
        versions.into_iter().collect::<Vec<_>>(),
        ["users-1_0_0", "users-1_1_0"],
        "the reader saw both versions"
    );
    let refused = seen.iter().filter(|(_, v)| v.is_none()).count();
    eprintln!(
        "{} reads across the cutover, {refused} refused while the fleet switched",
        seen.len()
    );
    let status = fleet(&apis[0]).await;
    let d = &status["decisions"]["users"];
    assert_eq!(
        (d["active"].as_str(), &d["next"]),
        (Some("users-1_1_0"), &Value::Null),
        "{status}"
    );

    // A rollback asked of c flips all three, and sticks.
    let (code, out, err) =
        tokio::task::block_in_place(|| kiln_cli(&members[2], &["rollback", "users"]));
    assert_eq!(code, 0, "{out}{err}");
    all_answer(&apis, "users-1_0_0", Duration::from_secs(10)).await;
    let status = fleet(&apis[1]).await;
    let d = &status["decisions"]["users"];
    assert_eq!(
        (d["active"].as_str(), &d["next"]),
        (Some("users-1_0_0"), &Value::Null),
        "{status}"
    );
    let held_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < held_until {
        for api in &apis {
            let v = answers(api).await;
            assert!(
                v.as_deref() != Some("users-1_1_0"),
                "the rolled-back version came back"
            );
        }
    }
    // The rollback survives a restart of a member (the decision is the
    // fleet's, in its KV bucket).
    let mut members = members;
    tokio::task::block_in_place(|| members[0].restart());
    let a = Api::new(&members[0]);
    until(
        "a answers users-1_0_0 after its restart",
        Duration::from_secs(20),
        || {
            let a = a.clone();
            async move {
                match answers(&a).await.as_deref() {
                    Some("users-1_0_0") => Some(()),
                    Some(v) => panic!("a answered {v} after a restart under a rollback"),
                    None => None,
                }
            }
        },
    )
    .await;
    let (code, out, err) =
        tokio::task::block_in_place(|| kiln_cli(&members[0], &["fleet", "status"]));
    assert_eq!(code, 0, "{out}{err}");
    let metrics = reqwest::get(members[1].at("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    for line in [
        "kiln_fleet_in_contact 1",
        "kiln_fleet_view_fenced{name=\"users\"} 0",
    ] {
        assert!(metrics.contains(line), "{line} missing from /metrics");
    }
    for needle in ["a ", "b ", "c ", "users-1_0_0", "decisions"] {
        assert!(out.contains(needle), "{needle:?} missing from:\n{out}");
    }
    // A graceful stop leaves the fleet at once (not after the TTL) and is
    // not held up by the fleet.
    let stopping = Instant::now();
    let status = tokio::task::block_in_place(|| members[2].stop()).expect("c was running");
    assert!(status.success(), "c exited with {status}");
    assert!(
        stopping.elapsed() < Duration::from_secs(4),
        "c took {:?} to stop",
        stopping.elapsed()
    );
    assert_eq!(instances(&fleet(&apis[0]).await), ["a", "b"]);
    drop(members);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reader_across_three_members_never_goes_back_and_a_rollback_from_one_flips_all() {
    let nats = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .expect("nats-server");
    cutover_and_rollback(&nats.url()).await;
    drop(nats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_fleet_cutover_on_a_three_node_cluster() {
    // The cluster's meta leader elected and the event stream made.
    let (cluster, store) = ready_cluster().await;
    drop(store);
    cutover_and_rollback(&cluster.urls().join(",")).await;
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_killed_during_the_cutover_drops_out_rejoins_and_follows() {
    let nats = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .expect("nats-server");
    let (mut members, apis) = fleet_at_1_0_0(&nats.url()).await;
    // Enough log that 1.1.0 warms for a while.
    for s in 0..40 {
        let events: Vec<Value> = (0..100)
            .map(|i| json!({ "type": "UserRenamed", "data": { "name": format!("n{i}") } }))
            .collect();
        let (st, b) = apis[0]
            .post_json(
                &format!("/streams/user-{s}/events"),
                &json!({ "events": events }),
            )
            .await;
        assert_eq!(st, 200, "{b}");
    }
    // The rollout reaches a and b; c dies before it gets the new module.
    deploy_everywhere(&apis[..2], "1.1.0", Some("Variant1")).await;
    tokio::task::block_in_place(|| members[2].kill9());
    let killed_at = Instant::now();
    // c drops out within its TTL; a and b switch without it.
    until(
        "c drops out of the fleet",
        Duration::from_secs(5),
        || async { (instances(&fleet(&apis[0]).await) == ["a", "b"]).then_some(()) },
    )
    .await;
    eprintln!("c dropped out {:?} after the kill", killed_at.elapsed());
    all_answer(&apis[..2], "users-1_1_0", Duration::from_secs(60)).await;

    // c comes back with only 1.0.0: it refuses the name rather than answer
    // what the fleet left, saying the fleet's version is not deployed
    // there, and is not ready.
    tokio::task::block_in_place(|| members[2].restart());
    let c = Api::new(&members[2]);
    let behind_until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < behind_until {
        let (s, b) = c.get("/views/users/user-1").await;
        assert_eq!(s, 503, "c answered {b} while the fleet serves users-1_1_0");
        assert_eq!(
            (b["error"]["code"].as_str(), b["error"]["why"].as_str()),
            (Some("fleet_version_missing"), Some("not deployed")),
            "{b}"
        );
        let (s, b) = c.get("/readyz").await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (503, Some("fleet_stale")),
            "{b}"
        );
    }
    // Its module arrives: it warms what the fleet serves and follows.
    deploy_everywhere(&apis[2..], "1.1.0", Some("Variant1")).await;
    let refusals = std::sync::atomic::AtomicUsize::new(0);
    until(
        "c follows the fleet to users-1_1_0",
        Duration::from_secs(60),
        || {
            let (c, refusals) = (c.clone(), &refusals);
            async move {
                match answers(&c).await {
                    Some(v) if v == "users-1_1_0" => Some(()),
                    Some(v) => panic!("c answered {v} after rejoining a fleet serving users-1_1_0"),
                    None => {
                        refusals.fetch_add(1, Ordering::Relaxed);
                        None
                    }
                }
            }
        },
    )
    .await;
    eprintln!(
        "c refused {} read(s) while warming what the fleet serves",
        refusals.load(Ordering::Relaxed)
    );
    // It warmed what the fleet serves at the live views' priority (the
    // log is long enough that it was still warming when it looked).
    assert!(
        members[2]
            .log()
            .contains("the fleet serves it: warming it first"),
        "c did not warm the fleet's version first"
    );
    until("c is a member again", Duration::from_secs(5), || async {
        (instances(&fleet(&apis[1]).await) == IDS).then_some(())
    })
    .await;
    until("c is ready", Duration::from_secs(10), || async {
        (c.get("/readyz").await.0 == 200).then_some(())
    })
    .await;
    drop(members);
    drop(nats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupted_document_on_one_member_is_flagged_by_its_digest() {
    let nats = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .expect("nats-server");
    let (mut members, apis) = start_members(&nats.url()).await;
    // Positions 1..12, then users 1.0.0 everywhere, then 13..22 live.
    register(&apis[0], 1..13).await;
    deploy_everywhere(&apis, "1.0.0", None).await;
    all_answer(&apis, "users-1_0_0", Duration::from_secs(30)).await;
    // A member whose digest task started after a batch had already carried
    // its view past the next multiple of 10 digests the one after: the log
    // grows by 10 until two members' digests met and agreed.
    let mut next_user = 13;
    let status = grow_until(
        "two members' digests at one position agree",
        &apis[0],
        &apis[0],
        &mut next_user,
        |s| s["digests_agreeing"].as_u64() >= Some(1),
    )
    .await;
    assert_eq!(status["mismatches"], json!([]), "{status}");
    let took: Vec<u64> = status["members"][0]["digests"]
        .as_array()
        .map(|d| d.iter().filter_map(|d| d["took_ms"].as_u64()).collect())
        .unwrap_or_default();
    eprintln!("digest took {took:?} ms");

    // One byte of one document of c changes behind kiln's back.
    tokio::task::block_in_place(|| members[2].kill9());
    {
        let store = ViewStore::open(members[2].data_dir().join("views")).expect("c's views");
        let view: ViewId = "users-1_0_0".parse().expect("id");
        let at = store.checkpoint(&view).expect("checkpoint");
        let doc = store
            .get(&view, b"user-3")
            .expect("read")
            .expect("user-3 exists");
        let mut doc: Value = serde_json::from_slice(&doc).expect("json");
        doc["name"] = json!("corrupted");
        let mut writes = Writes::new();
        writes.insert(
            b"user-3".to_vec(),
            Some(serde_json::to_vec(&doc).expect("json")),
        );
        store.commit(&view, &writes, at).expect("write");
    }
    tokio::task::block_in_place(|| members[2].restart());
    let c = Api::new(&members[2]);
    until("c is back", Duration::from_secs(20), || async {
        (answers(&c).await.as_deref() == Some("users-1_0_0")).then_some(())
    })
    .await;
    // All three digest a position past the corruption (with two, a tie
    // names both).
    let (status, m) = mismatch_of_three(&apis[0], &apis[1], &mut next_user).await;
    assert_eq!(m["view"], "users-1_0_0", "{status}");
    assert_eq!(m["suspects"], json!(["c"]), "{status}");
    assert_eq!(m["digests"]["a"], m["digests"]["b"], "{status}");
    let (code, out, err) =
        tokio::task::block_in_place(|| kiln_cli(&members[0], &["fleet", "status"]));
    assert_eq!(code, 9, "{out}{err}");
    assert!(out.contains("DIGEST MISMATCH"), "{out}");
    // The status page of any member shows the fleet, and c as the suspect.
    let dom = tokio::task::spawn_blocking({
        let url = members[0].url() + "/";
        move || kiln_tests::browser::rendered_dom(&url)
    })
    .await
    .expect("chromium task");
    let section = dom
        .split_once(r#"id="fleet""#)
        .map(|(_, rest)| rest.split("</section>").next().unwrap_or(""))
        .unwrap_or_else(|| panic!("no fleet section:\n{dom}"));
    assert!(section.contains("fleet t"), "{section}");
    for id in IDS {
        assert!(
            section.contains(&format!(r#"data-member="{id}""#)),
            "{id}: {section}"
        );
    }
    let row_of_c = section
        .split(r#"data-member="c""#)
        .nth(1)
        .and_then(|r| r.split("</tr>").next())
        .unwrap_or("");
    assert!(row_of_c.contains("digest mismatch"), "{row_of_c}");
    let row_of_a = section
        .split(r#"data-member="a""#)
        .nth(1)
        .and_then(|r| r.split("</tr>").next())
        .unwrap_or("");
    assert!(!row_of_a.contains("digest mismatch"), "{row_of_a}");
    assert!(
        section.contains(r#"data-mismatch="users-1_0_0""#) && section.contains("suspects: c"),
        "{section}"
    );
    assert!(
        section.contains(r#"data-decision="users""#)
            && section.contains("users: active users-1_0_0"),
        "{section}"
    );
    drop(members);
    drop(nats);
}

/// Issue 25, item 1: on JetStream a tagged append's tag marker has a
/// position no view ever stands at (a checkpoint is always an event's). With
/// a digest every 10 positions, 8 plain appends, a tagged one (event 9,
/// its marker 10) and 5 more, the view must reach the head and
/// read-your-writes answer; the digest is taken at the first checkpoint at or
/// past 10 (the event at 11), the same on every member.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_digest_at_a_tag_marker_position_never_freezes_a_view() {
    let nats = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .expect("nats-server");
    let o = member(&nats.url(), "a");
    let daemon = tokio::task::spawn_blocking(move || Daemon::start_with(o))
        .await
        .expect("starting a member");
    let api = Api::new(&daemon);
    assert_eq!(register(&api, 1..9).await, 8);
    deploy_everywhere(std::slice::from_ref(&api), "1.0.0", None).await;
    all_answer(
        std::slice::from_ref(&api),
        "users-1_0_0",
        Duration::from_secs(30),
    )
    .await;
    // The view's digest task (started within 250 ms of it tailing live)
    // waits for it at 10 before the log passes 10: else it would aim at 20.
    until(
        "the digest task waiting at 10",
        Duration::from_secs(10),
        || async {
            let (_, views) = api.get("/views").await;
            views["views"]
                .as_array()
                .and_then(|vs| vs.iter().find(|v| v["id"] == "users-1_0_0"))
                .is_some_and(|v| v["awaited"].as_u64() >= Some(1))
                .then_some(())
        },
    )
    .await;
    let (s, b) = api
        .post_json(
            "/streams/user-9/events",
            &json!({ "events": [{
                "type": "UserRegistered",
                "data": { "name": "a", "email": "b" },
                "tags": ["account-9"],
            }] }),
        )
        .await;
    assert_eq!((s, b["position"].as_u64()), (200, Some(9)), "{b}");
    let last = register(&api, 10..15).await;
    assert_eq!(last, 15, "the tag marker took position 10");
    let (s, b) = api
        .get(&format!(
            "/views/users/user-14?position={last}&wait_ms=10000"
        ))
        .await;
    assert_eq!(s, 200, "read-your-writes at the head: {b}");
    let status = until(
        "a digest at the first checkpoint at or past 10",
        Duration::from_secs(10),
        || async {
            let s = fleet(&api).await;
            let at_11 = s["members"][0]["digests"].as_array().is_some_and(|d| {
                d.iter()
                    .any(|d| d["view"] == "users-1_0_0" && d["position"] == 11)
            });
            at_11.then_some(s)
        },
    )
    .await;
    let positions: Vec<u64> = status["members"][0]["digests"]
        .as_array()
        .map(|d| d.iter().filter_map(|d| d["position"].as_u64()).collect())
        .unwrap_or_default();
    assert_eq!(positions, [11], "{status}");
    drop(daemon);
    drop(nats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_fleet_members_answer_their_last_version_marked_stale() {
    let mut nats = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .expect("nats-server");
    let (members, apis) = fleet_at_1_0_0(&nats.url()).await;
    tokio::task::block_in_place(|| nats.kill());
    let lost_at = Instant::now();
    let mut stale_after = Vec::new();
    for api in &apis {
        let b = until("a stale answer", Duration::from_secs(10), || async {
            let (s, b) = api.get("/views/users/user-1").await;
            (s == 200 && b["stale"] == true).then_some(b)
        })
        .await;
        stale_after.push(lost_at.elapsed());
        assert_eq!(b["view"], "users-1_0_0", "{b}");
    }
    eprintln!("members answered stale {stale_after:?} after NATS went away");
    for api in &apis {
        assert_eq!(api.get("/readyz").await.0, 503);
    }
    tokio::task::block_in_place(|| nats.start_again());
    for api in &apis {
        until(
            "a fresh answer and ready",
            Duration::from_secs(30),
            || async {
                let (s, b) = api.get("/views/users/user-1").await;
                let fresh = s == 200 && b["stale"].is_null() && b["view"] == "users-1_0_0";
                (fresh && api.get("/readyz").await.0 == 200).then_some(())
            },
        )
        .await;
    }
    drop(members);
}

#[test]
fn cutover_fleet_is_refused_on_the_embedded_store() {
    let out = std::process::Command::new(kiln_tests::daemon::kiln_bin())
        .args([
            "serve",
            "--no-watch",
            "--view",
            "users:cutover=fleet",
            "--fleet",
            "t",
        ])
        .output()
        .expect("kiln serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("embedded store has no fleet"), "{err}");
}

/// Regression (issue 25, found by reading): a member's record left its
/// retired versions out, so the guard against proposing a version retired
/// on some member never ran: with a quorum of two, a version ready on a
/// and b but retired on c was proposed, and c answered 503 until someone
/// deployed it there again. The records here are the members' own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_version_retired_on_one_member_is_never_proposed_to_the_fleet() {
    let nats = NatsServer::start();
    let (_members, apis) = start(
        IDS.iter()
            .map(|id| member(&nats.url(), id).arg("--fleet-quorum").arg("2"))
            .collect(),
    )
    .await;
    serve_1_0_0(&apis).await;

    // c's operator deploys 1.1.0 and retires it there.
    let c = &apis[2];
    let (s, b) = c
        .deploy(module_version(USERS, "1.1.0", Some("Variant1")))
        .await;
    assert_eq!(s, 202, "{b}");
    c.wait_state("users-1_1_0", "ready", Duration::from_secs(30))
        .await;
    let (s, b) = c
        .post_json("/admin/views/users-1_1_0/retire", &json!({}))
        .await;
    assert_eq!(s, 200, "{b}");
    // Ready on a and b: a quorum, were c not retired on it.
    deploy_everywhere(&apis[..2], "1.1.0", Some("Variant1")).await;
    let state_on = |status: &Value, instance: &str| -> Option<String> {
        status["members"]
            .as_array()?
            .iter()
            .find(|m| m["instance"] == instance)?["views"]
            .as_array()?
            .iter()
            .find(|v| v["id"] == "users-1_1_0")
            .and_then(|v| v["state"].as_str().map(str::to_string))
    };
    let seen = until(
        "1.1.0 ready on a and b",
        Duration::from_secs(30),
        || async {
            let s = fleet(&apis[0]).await;
            (state_on(&s, "a").as_deref() == Some("ready")
                && state_on(&s, "b").as_deref() == Some("ready"))
            .then_some(s)
        },
    )
    .await;
    assert_eq!(
        state_on(&seen, "c").as_deref(),
        Some("retired"),
        "c's record carries the version it retired: {seen}"
    );
    // Every member wrote three more records (and drove the cutover after
    // each): nothing was proposed.
    let since: Vec<u64> = IDS.iter().map(|i| heartbeat_of(&seen, i)).collect();
    let status = until("three more heartbeats", Duration::from_secs(10), || async {
        let s = fleet(&apis[1]).await;
        IDS.iter()
            .zip(&since)
            .all(|(i, t)| heartbeat_of(&s, i) >= t + 600)
            .then_some(s)
    })
    .await;
    let d = &status["decisions"]["users"];
    assert_eq!(
        (d["active"].as_str(), &d["next"]),
        (Some("users-1_0_0"), &Value::Null),
        "{status}"
    );
    all_answer(&apis, "users-1_0_0", Duration::from_secs(1)).await;
    // Nor by an operator's promote: refused, naming c.
    promote_is_refused(&apis[0], "users-1_1_0", "retired on c").await;
}

/// A promote of `id` on `api` answers `409 fleet_refused` saying `why`.
async fn promote_is_refused(api: &Api, id: &str, why: &str) {
    let (s, b) = api
        .post_json(&format!("/admin/views/{id}/promote"), &json!({}))
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (409, Some("fleet_refused")),
        "{b}"
    );
    let message = b["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(why), "{message}");
}

/// Found by the fleet model test (seed 24): a retire on one member was
/// answered before its record said so; a promote asked next on another
/// member passed, and the fleet switched to a version that member can never
/// answer. And what the fleet serves cannot be retired from under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retire_is_known_to_the_fleet_before_it_is_answered() {
    let nats = NatsServer::start();
    let (_members, apis) = fleet_at_1_0_0(&nats.url()).await;
    deploy_everywhere(&apis, "1.1.0", Some("Variant1")).await;
    all_answer(&apis, "users-1_1_0", Duration::from_secs(30)).await;
    let (s, b) = apis[1]
        .post_json("/admin/views/users/rollback", &json!({}))
        .await;
    assert_eq!(s, 200, "{b}");
    all_answer(&apis, "users-1_0_0", Duration::from_secs(30)).await;

    // Retired on a, then at once promoted on c: refused, naming a.
    let (s, b) = apis[0]
        .post_json("/admin/views/users-1_1_0/retire", &json!({}))
        .await;
    assert_eq!(s, 200, "{b}");
    promote_is_refused(&apis[2], "users-1_1_0", "retired on a").await;
    let d = &fleet(&apis[2]).await["decisions"]["users"];
    assert_eq!(
        (d["active"].as_str(), &d["next"]),
        (Some("users-1_0_0"), &Value::Null),
        "{d}"
    );
    all_answer(&apis, "users-1_0_0", Duration::from_secs(1)).await;
}

/// Issue 25, item 7: a corrupted its view, then published its snapshot; b
/// bootstrapped from it; c replayed the log (it has no snapshot store; a
/// member that bootstrapped from a's earlier, healthy snapshot would be of
/// a's lineage too, and the vote a tie all the same). Counted per member, a and b
/// outvoted c and the healthy member was the one blamed. Counted per
/// lineage it is one witness against one: all three are suspects, and the
/// mismatch says b's documents were built by a.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_filled_from_one_corrupt_snapshot_never_outvote_a_replay() {
    let nats = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .expect("nats-server");
    // c runs without the snapshot store: it replays whatever a publishes.
    let snapshots = tempfile::tempdir().expect("snapshot dir");
    let mut members = Vec::new();
    for id in IDS {
        let mut o = member(&nats.url(), id);
        if id != "c" {
            o = o
                .arg("--snapshot-dir")
                .arg(snapshots.path().to_str().expect("utf-8 path"));
        }
        members.push(
            tokio::task::spawn_blocking(move || Daemon::start_with(o))
                .await
                .expect("starting a member"),
        );
    }
    let apis: Vec<Api> = members.iter().map(Api::new).collect();
    register(&apis[0], 1..13).await;
    // a and c replay the log; b has not got the module yet.
    let replaying = [apis[0].clone(), apis[2].clone()];
    deploy_everywhere(&replaying, "1.0.0", None).await;
    all_answer(&replaying, "users-1_0_0", Duration::from_secs(30)).await;
    // One document of a changes behind kiln's back; then a publishes.
    tokio::task::block_in_place(|| members[0].kill9());
    {
        let store = ViewStore::open(members[0].data_dir().join("views")).expect("a's views");
        let view: ViewId = "users-1_0_0".parse().expect("id");
        let at = store.checkpoint(&view).expect("checkpoint");
        let mut writes = Writes::new();
        writes.insert(
            b"user-3".to_vec(),
            Some(br#"{"name":"corrupted"}"#.to_vec()),
        );
        store.commit(&view, &writes, at).expect("write");
    }
    tokio::task::block_in_place(|| members[0].restart());
    let a = Api::new(&members[0]);
    a.wait_state("users-1_0_0", "active", Duration::from_secs(30))
        .await;
    // Past the snapshot a published when it caught up (healthy), so the
    // next one is of the corrupted view.
    let position = register(&a, 13..16).await;
    let (s, b) = a
        .get(&format!("/views/users-1_0_0/user-15?position={position}"))
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = a
        .post_json("/admin/views/users-1_0_0/snapshot", &json!({}))
        .await;
    assert!(s < 300, "{s} {b}");
    // b bootstraps from a's snapshot.
    let (s, b) = apis[1].deploy(module_version(USERS, "1.0.0", None)).await;
    assert!(s == 202 || s == 200, "{b}");
    let v = apis[1]
        .wait_state("users-1_0_0", "active", Duration::from_secs(30))
        .await;
    assert_eq!(v["snapshot"]["state"], "bootstrapped", "{v}");
    assert_eq!(v["snapshot"]["instance"], "a", "{v}");
    assert_eq!(v["snapshot"]["position"], position, "{v}");
    let mut next_user = 16;
    let (status, m) = mismatch_of_three(&apis[0], &apis[2], &mut next_user).await;
    assert_eq!(m["digests"]["a"], m["digests"]["b"], "{status}");
    assert_ne!(m["digests"]["a"], m["digests"]["c"], "{status}");
    assert_eq!(m["suspects"], json!(["a", "b", "c"]), "{status}");
    assert_eq!(m["built_by"], json!({ "b": "a" }), "{status}");
}

/// When `instance`'s record was written, by its clock (0: not listed).
fn heartbeat_of(status: &Value, instance: &str) -> u64 {
    status["members"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["instance"] == instance))
        .and_then(|m| m["heartbeat_at"].as_u64())
        .unwrap_or(0)
}

/// Regression (issue 25 item 11): two processes under one instance id
/// wrote one member record in turn, so the fleet's fence read whichever
/// wrote last, and a graceful stop of one deleted the other's record. Now
/// the newer process takes the id over and the older leaves the fleet:
/// not ready, its fleet names stale, its log naming why; its stop leaves
/// the newer one's record alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_process_under_one_instance_id_takes_it_over_and_the_first_steps_out() {
    let nats = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .expect("nats-server");
    let (mut members, apis) = fleet_at_1_0_0(&nats.url()).await;
    let o = member(&nats.url(), "a");
    let mut second = tokio::task::spawn_blocking(move || Daemon::start_with(o))
        .await
        .expect("a second process as a");
    let second_api = Api::new(&second);
    let (s, b) = second_api
        .deploy(module_version(USERS, "1.0.0", None))
        .await;
    assert_eq!(s, 202, "{b}");
    let first = &members[0];
    until(
        "the first process as a leaves the fleet",
        Duration::from_secs(10),
        || async { (first.get_status("/readyz") == Some(503)).then_some(()) },
    )
    .await;
    assert!(
        first
            .log()
            .contains("another process took over instance id a"),
        "{}",
        first.log()
    );
    let second_ref = &second;
    until(
        "the second process as a is ready",
        Duration::from_secs(20),
        || async { (second_ref.get_status("/readyz") == Some(200)).then_some(()) },
    )
    .await;
    // The fleet's record of a is the second process's, and stays so.
    let second_addr = second.addr().to_string();
    let until_t = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until_t {
        let status = fleet(&apis[1]).await;
        let a = status["members"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["instance"] == "a"))
            .cloned()
            .unwrap_or(Value::Null);
        assert_eq!(a["api"], second_addr.as_str(), "{status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The first's graceful stop leaves the second's record in place.
    tokio::task::block_in_place(|| members[0].stop());
    let until_t = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until_t {
        assert!(
            instances(&fleet(&apis[1]).await).contains(&"a".to_string()),
            "the first process's stop removed the second's record"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::task::block_in_place(|| second.stop());
    drop(members);
}

/// Regression (found reading the model test's logs): re-reading a decision
/// it had already applied, a member announced it as a change, which woke
/// its heartbeat loop at once: every member of a fleet with a decision
/// rewrote its record and re-read the fleet without pause (about a third of
/// a core each, idle). Idle, a member now writes about once a heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_fleet_writes_its_records_once_a_heartbeat() {
    let nats = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .expect("nats-server");
    let (members, _apis) = fleet_at_1_0_0(&nats.url()).await;
    let client = async_nats::connect(nats.url()).await.expect("client");
    let js = async_nats::jetstream::new(client);
    let mut stream = js
        .get_stream("KV_kiln-fleet-t-members")
        .await
        .expect("the members bucket");
    let before = stream.info().await.expect("info").state.last_sequence;
    let window = Duration::from_secs(3);
    tokio::time::sleep(window).await;
    let writes = stream.info().await.expect("info").state.last_sequence - before;
    // Three members, a 200 ms heartbeat: 45 writes in 3 s; twice that at most.
    assert!(
        writes <= 90,
        "{writes} member record writes in {window:?} from an idle fleet of three"
    );
    eprintln!("{writes} record writes in {window:?}");
    drop(members);
}

/// Three members serving `users` 1.0.0, c reaching nats-server through a
/// proxy the test can cut.
async fn c_behind_a_proxy() -> (NatsServer, kiln_tests::proxy::Proxy, Vec<Daemon>, Vec<Api>) {
    let nats = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .expect("nats-server");
    let target = std::net::SocketAddr::from(([127, 0, 0, 1], nats.port()));
    let proxy = kiln_tests::proxy::Proxy::start(target).expect("a proxy to nats-server");
    let (members, apis) = start(vec![
        member(&nats.url(), "a"),
        member(&nats.url(), "b"),
        member(&proxy.nats_url(), "c"),
    ])
    .await;
    serve_1_0_0(&apis).await;
    (nats, proxy, members, apis)
}

/// Regression (found by the fleet model with a NATS partition, seed 111): a
/// member cut off from NATS noticed it only in its heartbeat loop, whose
/// calls each wait up to a third of the TTL, so it answered its version
/// unmarked for up to half a second after the others had dropped it and
/// switched without it. Contact ends at the lease's deadline, on every
/// answer: a member cut off answers stale before the fleet stops counting it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_cut_off_answers_stale_before_the_fleet_drops_it() {
    let (_nats, proxy, members, apis) = c_behind_a_proxy().await;
    for round in 0..3 {
        proxy.cut();
        let cut = Instant::now();
        // Until the fleet no longer counts c (its record expired)...
        let dropped = until("the fleet drops c", Duration::from_secs(10), || async {
            (!instances(&fleet(&apis[0]).await).contains(&"c".to_string())).then(|| cut.elapsed())
        })
        .await;
        // ...then c, asked, never answers unmarked: the others may switch
        // without it from now on.
        let (s, b) = apis[2].get("/views/users/user-1").await;
        eprintln!(
            "round {round}: the fleet dropped c {dropped:?} after the cut; c answers {s} {b}"
        );
        assert!(
            s != 200 || b["stale"] == true,
            "round {round}: the fleet dropped c {dropped:?} after the cut, and c still answers unmarked: {s} {b}"
        );
        proxy.heal();
        until("c back, fresh", Duration::from_secs(30), || async {
            let (s, b) = apis[2].get("/views/users/user-1").await;
            (s == 200
                && b["stale"].is_null()
                && instances(&fleet(&apis[0]).await).contains(&"c".to_string()))
            .then_some(())
        })
        .await;
    }
    drop(members);
}

/// Regression (found by review): a member back in contact after an outage
/// answered unmarked from its first successful heartbeat, before it had
/// read the decisions taken while it was out, so a reader could see the
/// version the fleet had rolled back from. It comes back only once it has
/// read them: its first unmarked answer is the fleet's version.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_back_in_contact_answers_what_was_decided_while_it_was_out() {
    let (_nats, proxy, members, apis) = c_behind_a_proxy().await;
    deploy_everywhere(&apis, "1.1.0", Some("Variant1")).await;
    all_answer(&apis, "users-1_1_0", Duration::from_secs(30)).await;
    for round in 0..4 {
        proxy.cut();
        until("the fleet drops c", Duration::from_secs(10), || async {
            (!instances(&fleet(&apis[0]).await).contains(&"c".to_string())).then_some(())
        })
        .await;
        // Decided without c: back to 1.0.0, then forward to 1.1.0 again.
        let (path, target) = if round % 2 == 0 {
            ("/admin/views/users/rollback".to_string(), "users-1_0_0")
        } else {
            (
                "/admin/views/users-1_1_0/promote".to_string(),
                "users-1_1_0",
            )
        };
        let (s, b) = apis[0].post_json(&path, &json!({})).await;
        assert!(s < 300, "round {round}: {path}: {s} {b}");
        all_answer(&apis[..2], target, Duration::from_secs(30)).await;
        proxy.heal();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (s, b) = apis[2].get("/views/users/user-1").await;
            if s == 200 && b["stale"] != true {
                assert_eq!(
                    b["view"], target,
                    "round {round}: c, back, answered unmarked before following what the fleet decided while it was out: {b}"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: c never came back: {s} {b}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    drop(members);
}

/// Regression (found by the fleet model, seed 23): while c was cut off, the
/// fleet switched to `users-1_1_0` as a and b build it; c runs another
/// module under that id. Back in contact, c fences it, and a promote of
/// `users-1_1_0` asked on c waited 20 s for c to follow what it never will,
/// then answered 504 `fleet_pending`. It is refused at once, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_promote_of_what_the_fleet_serves_under_another_module_is_refused_at_once() {
    let (_nats, proxy, members, apis) = c_behind_a_proxy().await;
    // One id, two builds: the fleet never proposes it while c's record
    // shows c's.
    deploy_everywhere(&apis[2..], "1.1.0", Some("Variant2")).await;
    apis[2]
        .wait_state("users-1_1_0", "ready", Duration::from_secs(30))
        .await;
    deploy_everywhere(&apis[..2], "1.1.0", Some("Variant1")).await;
    for api in &apis[..2] {
        api.wait_state("users-1_1_0", "ready", Duration::from_secs(30))
            .await;
    }
    assert_eq!(answers(&apis[0]).await.as_deref(), Some("users-1_0_0"));
    // Without c, it is switched to.
    proxy.cut();
    all_answer(&apis[..2], "users-1_1_0", Duration::from_secs(30)).await;
    proxy.heal();
    // As soon as c has read the decision (it fences the name), before or
    // after its own record is back: the model's promote came that early.
    until("c fences users", Duration::from_secs(30), || async {
        let (_, b) = apis[2].get("/views/users/user-1").await;
        (b["error"]["code"] == "fleet_other_logic").then_some(())
    })
    .await;
    let asked = Instant::now();
    let (s, b) = apis[2]
        .post_json("/admin/views/users-1_1_0/promote", &json!({}))
        .await;
    let took = asked.elapsed();
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (503, Some("fleet_other_logic")),
        "a promote on c of the version the fleet serves under another module: {s} {b} after {took:?}"
    );
    assert!(took < Duration::from_secs(5), "refused only after {took:?}");
    // The fleet goes on serving a's and b's build, and c still never answers it.
    assert_eq!(answers(&apis[0]).await.as_deref(), Some("users-1_1_0"));
    let (s, b) = apis[2].get("/views/users/user-1").await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (503, Some("fleet_other_logic")),
        "{b}"
    );
    drop(members);
}
