//! Admin and probes through real HTTP: deploy (upload), promote, rollback,
//! retire; the bearer token; liveness, daemon readiness and per-version
//! readiness flipping exactly when the version has caught up.

use std::time::{Duration, Instant};

use kiln_tests::daemon::{Api, Daemon, Options, module_version};
use kiln_tests::wasm::USERS;
use serde_json::{Value, json};

async fn fill(api: &Api, users: usize, events_each: usize) -> u64 {
    let mut last = 0;
    for u in 0..users {
        let mut events = vec![
            json!({ "type": "UserRegistered", "data": { "name": format!("u{u}"), "email": "e" } }),
        ];
        for i in 1..events_each {
            events.push(json!({ "type": "UserRenamed", "data": { "name": format!("u{u}-{i}") } }));
        }
        let (s, b) = api
            .post_json(
                &format!("/streams/user-{u}/events"),
                &json!({ "events": events }),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        last = b["position"].as_u64().expect("position");
    }
    last
}

fn state_of(views: &Value, id: &str) -> Option<String> {
    views["views"]
        .as_array()?
        .iter()
        .find(|v| v["id"] == id)
        .and_then(|v| v["state"].as_str().map(str::to_string))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_warm_promote_rollback_retire_with_probes_that_flip_on_time() {
    let d = Daemon::start();
    let api = Api::new(&d);
    // Liveness and readiness with nothing deployed.
    assert_eq!(api.get("/healthz").await.0, 200);
    assert_eq!(api.get("/readyz").await.0, 200);
    let (s, b) = api.get("/readyz/users-1_0_0").await;
    assert_eq!(s, 404, "{b}");

    let head = fill(&api, 200, 100).await; // 20,000 events to warm through

    // v1: warms from the first event; the daemon is not ready until users has
    // an active version, and readiness never claims it early.
    let (s, b) = api.deploy(module_version(USERS, "1.0.0", None)).await;
    assert_eq!((s, b["outcome"].as_str()), (202, Some("warming")), "{b}");
    assert_eq!(b["id"], "users-1_0_0");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (s, body) = api.get("/readyz/users-1_0_0").await;
        if s == 200 {
            assert!(
                body["checkpoint"].as_u64().unwrap_or(0) >= head,
                "ready before catching up to {head}: {body}"
            );
            break;
        }
        assert_eq!(s, 503, "{body}");
        assert_eq!(body["error"]["code"], "not_ready");
        assert!(Instant::now() < deadline, "users-1_0_0 never became ready");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Polling a warming version's probe is a state, not a fault: no
    // warning per poll (an orchestrator polls every few seconds).
    let log = d.log();
    let warned = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("not_ready"))
        .count();
    assert_eq!(warned, 0, "{log}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (s, body) = api.get("/readyz").await;
        let (_, views) = api.get("/views").await;
        if s == 200 {
            assert_eq!(
                state_of(&views, "users-1_0_0").as_deref(),
                Some("active"),
                "{views}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon never became ready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (s, b) = api.get("/views/users/user-7").await;
    assert_eq!((s, b["doc"]["name"].as_str()), (200, Some("u7-99")), "{b}");

    // The same logic under a new version is an alias, ready at once.
    let (s, b) = api.deploy(module_version(USERS, "1.0.1", None)).await;
    assert_eq!((s, b["outcome"].as_str()), (200, Some("alias")), "{b}");
    assert_eq!(b["of"], "users-1_0_0");
    // The answer says why: the fingerprint both versions share.
    let fingerprint = b["fingerprint"].as_str().unwrap_or_default().to_string();
    assert!(fingerprint.starts_with("v3:"), "{b}");
    let why = b["why"].as_str().unwrap_or_default();
    assert!(
        why.contains("alias of users-1_0_0") && why.contains(&fingerprint),
        "{b}"
    );
    // Reading the alias by id: the answer names the version asked for, and the
    // physical view that holds its documents.
    let (s, b) = api.get("/views/users-1_0_1/user-7").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        (b["view"].as_str(), b["backed_by"].as_str()),
        (Some("users-1_0_1"), Some("users-1_0_0")),
        "{b}"
    );
    assert_eq!(b["doc"]["name"], "u7-99");
    // The very same module again changes nothing.
    let (s, b) = api.deploy(module_version(USERS, "1.0.1", None)).await;
    assert_eq!(
        (s, b["outcome"].as_str()),
        (200, Some("already_deployed")),
        "{b}"
    );
    // Other logic under an existing version is refused.
    let (s, b) = api
        .deploy(module_version(USERS, "1.0.0", Some("SomethingElse")))
        .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (409, Some("immutable_version")),
        "{b}"
    );

    // v2: new logic, warms; its probe is 503 until it has caught up.
    let (s, b) = api
        .deploy(module_version(USERS, "2.0.0", Some("Ignored")))
        .await;
    assert_eq!((s, b["outcome"].as_str()), (202, Some("warming")), "{b}");
    // Why it warms: its manifest (the event types) differs from 1.0.1's, as
    // `GET /views` shows too.
    let why = b["why"].as_str().unwrap_or_default();
    assert!(
        why.contains("differs from users-1_0_1") && why.contains("manifest"),
        "{b}"
    );
    let (_, views) = api.get("/views").await;
    let note = views["views"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["id"] == "users-2_0_0"))
        .map(|v| v["deploy_note"].clone());
    assert_eq!(note.as_ref().and_then(|n| n.as_str()), Some(why), "{views}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (s, body) = api.get("/readyz/users-2_0_0").await;
        if s == 200 {
            assert!(body["checkpoint"].as_u64().unwrap_or(0) >= head, "{body}");
            break;
        }
        assert_eq!(s, 503, "{body}");
        assert!(Instant::now() < deadline, "users-2_0_0 never became ready");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Reads by requirement pick the newest ready match.
    let (s, b) = api.get("/views/users@%5E2/user-3").await;
    assert_eq!((s, b["view"].as_str()), (200, Some("users-2_0_0")), "{b}");

    // Promote v2 (a no-op if the cutover policy already did), roll back to the
    // previous active, promote again, then retire the standby.
    let (s, b) = api
        .post_json("/admin/views/users-2_0_0/promote", &json!({}))
        .await;
    assert_eq!((s, b["active"].as_str()), (200, Some("users-2_0_0")), "{b}");
    let (_, b) = api.get("/views/users/user-3").await;
    assert_eq!(b["view"], "users-2_0_0");
    let (s, b) = api
        .post_json("/admin/views/users/rollback", &json!({}))
        .await;
    assert_eq!(s, 200, "{b}");
    let rolled_back_to = b["active"].as_str().expect("active").to_string();
    assert_ne!(rolled_back_to, "users-2_0_0");
    let (_, b) = api.get("/views/users/user-3").await;
    assert_eq!(b["view"], rolled_back_to.as_str(), "{b}");
    assert_eq!(b["backed_by"], "users-1_0_0", "{b}");
    // A requirement names a version for admin actions too.
    let (s, b) = api
        .post_json("/admin/views/users@%5E2/promote", &json!({}))
        .await;
    assert_eq!((s, b["active"].as_str()), (200, Some("users-2_0_0")), "{b}");
    let (_, b) = api.get("/views/users/user-3").await;
    assert_eq!(
        (b["view"].as_str(), b["backed_by"].as_str()),
        (Some("users-2_0_0"), Some("users-2_0_0")),
        "{b}"
    );
    let (s, b) = api
        .post_json(&format!("/admin/views/{rolled_back_to}/retire"), &json!({}))
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = api.get(&format!("/readyz/{rolled_back_to}")).await;
    assert_eq!(s, 503, "a retired version is not ready: {b}");
    assert_eq!(api.get("/readyz").await.0, 200);

    // Metrics name every version with its state.
    let (status, metrics) = d.get_raw("/metrics").expect("metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("kiln_view_state{view=\"users-2_0_0\",state=\"active\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kiln_view_position{view=\"users-2_0_0\""),
        "{metrics}"
    );
    assert!(metrics.contains("kiln_view_lag_events{"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_need_the_bearer_token_when_one_is_configured() {
    let d = Daemon::start_with(Options::default().admin_token("s3cret"));
    let mut api = Api::new(&d);
    api.token = None;
    let wasm = module_version(USERS, "1.0.0", None);
    let (s, b) = api.deploy(wasm.clone()).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{b}"
    );
    api.token = Some("wrong".into());
    let (s, _) = api.deploy(wasm.clone()).await;
    assert_eq!(s, 401);
    // Every admin route, not just deploy.
    for path in [
        "/admin/views/users-1_0_0/promote",
        "/admin/views/users/rollback",
        "/admin/views/users-1_0_0/retire",
        "/admin/views/users-1_0_0/parked/retry",
    ] {
        let (s, b) = api.post_json(path, &json!({})).await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (401, Some("unauthorized")),
            "{path}: {b}"
        );
    }
    let (s, _) = api.get("/admin/views/users-1_0_0/parked").await;
    assert_eq!(s, 401);
    // Probes and metrics stay open.
    assert_eq!(api.get("/healthz").await.0, 200);
    assert_eq!(d.get_status("/metrics"), Some(200));
    // Queries and appends stay open.
    api.register_user("user-1").await;
    assert_eq!(api.get("/views").await.0, 200);
    api.token = Some("s3cret".into());
    let (s, b) = api.deploy(wasm).await;
    assert_eq!(s, 202, "{b}");
}

/// The value of the sample `name{labels…}` whose labels include `view="id"`.
fn metric(metrics: &str, name: &str, id: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix('{')?;
        let (labels, value) = rest.split_once("} ")?;
        labels
            .split(',')
            .any(|kv| kv == format!("view=\"{id}\""))
            .then(|| value.trim().parse().ok())?
    })
}

/// A version that takes seconds to warm (three poison events, each costing the
/// 1 s batch deadline before it is parked): its probe answers 503 the whole
/// time it warms and 200 from the moment it has caught up, never before; the
/// daemon's readiness follows its cutover; metrics and the parked events show
/// what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_flip_when_a_slow_version_catches_up_and_metrics_and_parked_events_show_it() {
    let d = Daemon::start_with(kiln_tests::daemon::slow_warming_options());
    let api = Api::new(&d);
    assert_eq!(api.get("/readyz").await.0, 200, "nothing deployed: ready");
    let id = kiln_tests::daemon::deploy_slow_warming_chaos(&api, 3).await;
    // The status learns the log's head a moment after the deploy.
    let head = 3 * 41;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, views) = api.get("/views").await;
        match views["views"][0]["head"].as_u64() {
            Some(h) if h == head => break,
            Some(h) if h < head && Instant::now() < deadline => {}
            other => panic!("the log's head is {head}, /views says {other:?}: {views}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (mut warming_seen, mut daemon_unready_seen) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (s, body) = api.get(&format!("/readyz/{id}")).await;
        let (ds, dbody) = api.get("/readyz").await;
        if s == 200 {
            assert!(
                body["checkpoint"].as_u64().unwrap_or(0) >= head,
                "ready before catching up to {head}: {body}"
            );
            break;
        }
        assert_eq!(s, 503, "{body}");
        assert_eq!(body["error"]["code"], "not_ready", "{body}");
        assert_eq!(body["error"]["view"]["state"], "warming", "{body}");
        assert!(body["error"]["view"]["checkpoint"].as_u64() < Some(head));
        warming_seen += 1;
        // By requirement or bare name: nothing ready matches yet, so not ready.
        let (rs, rb) = api.get("/readyz/chaos@%5E1").await;
        if rs != 200 {
            assert_eq!(
                (rs, rb["error"]["code"].as_str()),
                (503, Some("not_ready")),
                "{rb}"
            );
        }
        // GET /views shows the same version warming, with its progress.
        let (_, views) = api.get("/views").await;
        let v = views["views"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["id"] == id.as_str()))
            .cloned()
            .expect("the version in GET /views");
        if v["state"] == "warming" {
            let (cp, h) = (v["checkpoint"].as_u64(), v["head"].as_u64());
            assert_eq!(h, Some(head), "{v}");
            assert_eq!(v["lag"].as_u64(), Some(head - cp.unwrap_or(0)), "{v}");
            assert!(v["events_per_sec"].is_number(), "{v}");
            assert!(v["eta_secs"].is_number() || v["eta_secs"].is_null(), "{v}");
        }
        if ds == 503 {
            assert_eq!(dbody["error"]["waiting"], json!(["chaos"]), "{dbody}");
            daemon_unready_seen += 1;
        }
        assert!(Instant::now() < deadline, "{id} never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        warming_seen > 10,
        "the probe said 503 only {warming_seen} times"
    );
    assert!(daemon_unready_seen > 10, "{daemon_unready_seen}");
    // Auto cutover: active, and the daemon is ready.
    api.wait_state(&id, "active", Duration::from_secs(10)).await;
    assert!(d.wait_for_status("/readyz", 200, Duration::from_secs(10)));
    assert_eq!(api.get("/readyz/chaos@%5E1").await.0, 200);
    assert_eq!(api.get("/readyz/chaos").await.0, 200);
    let (s, b) = api.get("/readyz/nobody").await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (404, Some("unknown_view")),
        "{b}"
    );

    let (status, metrics) = d.get_raw("/metrics").expect("metrics");
    assert_eq!(status, 200);
    let m =
        |name: &str| metric(&metrics, name, &id).unwrap_or_else(|| panic!("no {name}: {metrics}"));
    assert_eq!(
        m("kiln_view_events_applied_total"),
        120.0,
        "three rounds of 40 notes"
    );
    assert_eq!(m("kiln_view_position"), head as f64);
    assert_eq!(m("kiln_view_lag_events"), 0.0);
    assert_eq!(m("kiln_view_parked_events"), 3.0);
    assert!(m("kiln_view_batch_seconds_count") >= 1.0, "{metrics}");
    // The batches that hit a spinning event took the 1 s deadline.
    assert!(m("kiln_view_batch_seconds_sum") > 0.0, "{metrics}");
    assert!(
        metrics.contains(&format!(
            "kiln_view_batch_seconds_bucket{{view=\"{id}\",name=\"chaos\",version=\"1.0.0\",le=\"+Inf\"}}"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "kiln_view_state{{view=\"{id}\",state=\"active\"}} 1"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "kiln_view_state{{view=\"{id}\",state=\"warming\"}} 0"
        )),
        "{metrics}"
    );

    // The three poison events, listed with their positions and the reason.
    let (s, b) = api.get(&format!("/admin/views/{id}/parked")).await;
    assert_eq!(s, 200, "{b}");
    let parked = b["parked"].as_array().expect("parked");
    let positions: Vec<u64> = parked
        .iter()
        .map(|p| p["position"].as_u64().expect("position"))
        .collect();
    assert_eq!(positions, [41, 82, 123], "{b}");
    assert!(parked.iter().all(|p| p["type"] == "Spin"), "{b}");
    // Retrying runs them again: they still spin, so they stay parked.
    let (s, b) = api
        .post_json(&format!("/admin/views/{id}/parked/retry"), &json!({}))
        .await;
    assert_eq!((s, b["retried"].as_u64()), (200, Some(0)), "{b}");
    let (_, b) = api.get(&format!("/admin/views/{id}/parked")).await;
    assert_eq!(b["parked"].as_array().map(Vec::len), Some(3), "{b}");
    let (s, b) = api.get("/admin/views/chaos-9_0_0/parked").await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (404, Some("unknown_view")),
        "{b}"
    );
}
