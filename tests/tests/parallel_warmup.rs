//! Parallel warm-up by stream partition (a per-stream projection warmed by K
//! workers), in process on the real embedded store, real RocksDB views and
//! the real `users` module (its manifest says `per_stream`):
//!
//! - K workers build, byte for byte, the documents and dead letters one
//!   worker builds, on an interleaved log with a poison event parked;
//! - a crash mid-warm-up leaves every partition's checkpoint stored; the
//!   restarted daemon (another `warmup_workers`) resumes each partition from
//!   its own and the result is again the clean rebuild;
//! - a projection without `per_stream` warms with one worker whatever
//!   `warmup_workers` says;
//! - a partitioned warm-up that goes on while the log grows ends caught up
//!   and equal.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kiln::lifecycle::{Lifecycle, LifecycleConfig, PoisonPolicy, ViewPolicy, ViewState};
use kiln::store::embedded::{Durability, EmbeddedConfig, EmbeddedStore};
use kiln::store::{EventStore, NewEvent};
use kiln::views::{ViewId, ViewStore};
use kiln_tests::lifecycle::{Env, WAIT, append_one, id, read_log, rebuild, state, wait_until};
use kiln_tests::wasm::{self, users_module, with_manifest};
use serde_json::json;

const USERS: u64 = 600;

/// An embedded store without fsync (the tests append many single events).
fn env() -> Env {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = EmbeddedConfig::new(dir.path().join("log"));
    config.durability = Durability::Buffered;
    let store: Arc<dyn EventStore> = Arc::new(EmbeddedStore::open(config).expect("embedded store"));
    Env { dir, store }
}

/// `rounds` events on each of [`USERS`] streams, interleaved event by event
/// (round-robin over the streams): a registration, then logins and failed
/// logins. With `poison`, a `LoginFailed` the module refuses on `user-7` in
/// the middle. Returns the head.
async fn fill(store: &Arc<dyn EventStore>, rounds: u64, first_round: u64, poison: bool) -> u64 {
    let mut head = 0;
    for round in first_round..first_round + rounds {
        for user in 0..USERS {
            let event = match round {
                0 => NewEvent::json(
                    "UserRegistered",
                    &json!({"name": format!("u{user}"), "email": format!("u{user}@x")}),
                ),
                r if (r + user) % 3 == 0 => NewEvent::json("LoginFailed", &json!({})),
                _ => NewEvent::json("UserLoggedIn", &json!({})),
            };
            head = append(store, user, event).await;
        }
        if poison && round == first_round + rounds / 2 {
            head = append(store, 7, NewEvent::json("LoginFailed", &json!("poison"))).await;
        }
    }
    head
}

async fn append(store: &Arc<dyn EventStore>, user: u64, event: NewEvent) -> u64 {
    append_one(store, &format!("user-{user}"), event).await
}

/// Does `view` hold what a clean in-memory rebuild of the log up to `head`
/// holds, byte for byte?
async fn equals_clean_rebuild(env: &Env, views: &ViewStore, view: &ViewId, head: u64) -> bool {
    let loaded = wasm::load(&wasm::runtime(), wasm::USERS);
    documents(views, view) == rebuild(&loaded, &read_log(&env.store).await, head)
}

fn config(env: &Env, data: &str, workers: usize) -> LifecycleConfig {
    let mut c = LifecycleConfig::new(env.dir.path().join(data));
    c.standby_grace = Duration::from_secs(3600);
    c.warmup_workers = workers;
    c.default_policy = ViewPolicy {
        poison: PoisonPolicy::Park,
        ..ViewPolicy::default()
    };
    c
}

async fn start(env: &Env, config: LifecycleConfig) -> Lifecycle {
    Lifecycle::start(config, env.store.clone(), wasm::runtime())
        .await
        .expect("lifecycle starts")
}

/// Every document of `view`, in key order.
fn documents(views: &ViewStore, view: &ViewId) -> BTreeMap<Vec<u8>, Vec<u8>> {
    views
        .scan(view, b"", None, usize::MAX)
        .expect("scan")
        .into_iter()
        .collect()
}

async fn deploy_and_wait_active(lc: &Lifecycle, module: &[u8], v: &str) {
    lc.deploy(module, "test").await.expect("deploy");
    let start = std::time::Instant::now();
    loop {
        let st = state(lc, v);
        if st == Some(ViewState::Active) {
            return;
        }
        assert!(
            st != Some(ViewState::Failed),
            "{v} failed: {:?}",
            lc.status_of(&id(v)).and_then(|s| s.last_error)
        );
        assert!(
            start.elapsed() < WAIT * 4,
            "timed out waiting for {v} active"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_warm_up_builds_what_one_worker_builds() {
    let env = env();
    let head = fill(&env.store, 60, 0, true).await;
    let module = users_module("1.0.0", false);
    assert_eq!(wasm::manifest_of(&module)["per_stream"], json!(true));
    let v = id("users-1_0_0");

    let three = start(&env, config(&env, "three", 3)).await;
    deploy_and_wait_active(&three, &module, "users-1_0_0").await;
    let one = start(&env, config(&env, "one", 1)).await;
    deploy_and_wait_active(&one, &module, "users-1_0_0").await;

    let status = three.status_of(&v).expect("status");
    assert_eq!(status.warmup_workers, Some(3), "{status:?}");
    assert_eq!(status.checkpoint, head);
    assert_eq!(one.status_of(&v).expect("status").warmup_workers, None);
    assert_eq!(
        three.views().partitions(&v).expect("partitions"),
        None,
        "merged"
    );
    assert_eq!(three.views().checkpoint(&v).expect("checkpoint"), head);

    let (a, b) = (documents(three.views(), &v), documents(one.views(), &v));
    assert_eq!(a.len() as u64, USERS);
    assert!(a == b, "3 workers and 1 worker built different documents");
    assert!(
        equals_clean_rebuild(&env, three.views(), &v, head).await,
        "the documents differ from a clean rebuild"
    );
    // The poison event parked alike: same position, nothing else.
    let parked = |lc: &Lifecycle| -> Vec<u64> {
        let all = lc.views().parked(&v).expect("parked");
        all.iter().map(|p| p.0).collect()
    };
    let (parked_a, parked_b) = (parked(&three), parked(&one));
    assert_eq!(parked_a.len(), 1);
    assert_eq!(parked_a, parked_b);

    // Live after the merge: appends keep flowing into the view as usual.
    let at = append(&env.store, 3, NewEvent::json("LoginFailed", &json!({}))).await;
    three
        .wait_for_position(&v, at, WAIT)
        .await
        .expect("live after the warm-up");
    three.shutdown().await;
    one.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_mid_warm_up_resumes_every_partition_from_its_own_checkpoint() {
    let env = env();
    let head = fill(&env.store, 250, 0, false).await;
    let module = users_module("1.0.0", false);
    let v = id("users-1_0_0");

    // Grouped windows of 256 KiB: many commits per partition to crash between.
    let mut c = config(&env, "data", 3);
    c.warmup_group_bytes = 256 << 10;
    let lc = start(&env, c).await;
    lc.deploy(&module, "test").await.expect("deploy");
    // Crash once the partitions have applied some of the log, not all.
    let stored = loop {
        // (The view's column family appears when its worker opens it.)
        if let Ok(Some(parts)) = lc.views().partitions(&v)
            && parts.iter().all(|p| *p > 0)
        {
            break parts;
        }
        assert_ne!(
            state(&lc, "users-1_0_0"),
            Some(ViewState::Active),
            "the warm-up ended before the crash: make the log longer"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    lc.abandon().await;
    assert_eq!(stored.len(), 3);
    assert!(
        stored.iter().all(|p| *p < head),
        "crashed mid-warm-up: {stored:?} of {head}"
    );

    // What survived the crash: each partition's checkpoint, committed with
    // its documents; the view's own still where the warm-up split.
    let views = ViewStore::open(env.dir.path().join("data/views")).expect("views");
    let after = views
        .partitions(&v)
        .expect("partitions")
        .expect("still partitioned");
    assert_eq!(after.len(), 3);
    assert!(after.iter().zip(&stored).all(|(a, s)| a >= s));
    assert_eq!(views.checkpoint(&v).expect("split at"), 0);
    drop(views);

    // Restart with one worker configured: the stored warm-up finishes as it
    // began, with three partitions, each from its own checkpoint.
    let mut c = config(&env, "data", 1);
    c.warmup_group_bytes = 256 << 10;
    let lc = start(&env, c).await;
    wait_until("users-1_0_0 active after the restart", || {
        state(&lc, "users-1_0_0") == Some(ViewState::Active)
    })
    .await;
    let status = lc.status_of(&v).expect("status");
    assert_eq!(status.warmup_workers, Some(3), "{status:?}");
    assert_eq!(lc.views().partitions(&v).expect("partitions"), None);
    assert!(
        status.events_applied < head,
        "the restart replayed from the first event ({} applied of {head})",
        status.events_applied
    );
    assert!(
        equals_clean_rebuild(&env, lc.views(), &v, head).await,
        "after the crash the documents differ from a clean rebuild"
    );
    lc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_projection_not_per_stream_warms_with_one_worker() {
    let env = env();
    let head = fill(&env.store, 20, 0, false).await;
    let module = users_module("1.0.0", false);
    let mut manifest = wasm::manifest_of(&module);
    manifest
        .as_object_mut()
        .expect("manifest object")
        .remove("per_stream");
    let general = with_manifest(&module, &manifest.to_string());
    let lc = start(&env, config(&env, "data", 3)).await;
    deploy_and_wait_active(&lc, &general, "users-1_0_0").await;
    let status = lc.status_of(&id("users-1_0_0")).expect("status");
    assert_eq!(status.warmup_workers, None);
    assert_eq!(status.checkpoint, head);
    lc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_warm_up_catches_up_with_a_growing_log() {
    let env = env();
    fill(&env.store, 40, 0, false).await;
    let v = id("users-1_0_0");
    let lc = start(&env, config(&env, "data", 2)).await;
    lc.deploy(&users_module("1.0.0", false), "test")
        .await
        .expect("deploy");
    // Append while it warms, until it is active.
    let mut round = 40;
    while state(&lc, "users-1_0_0") != Some(ViewState::Active) {
        assert!(round < 400, "never caught up with a growing log");
        fill(&env.store, 1, round, false).await;
        round += 1;
    }
    let head = env.store.head().await.expect("head");
    lc.wait_for_position(&v, head, WAIT).await.expect("live");
    assert_eq!(
        lc.status_of(&v).expect("status").warmup_workers,
        Some(2),
        "the warm-up did not run in partitions"
    );
    assert!(equals_clean_rebuild(&env, lc.views(), &v, head).await);
    lc.shutdown().await;
}

// Grouped warm-up (issue 28): windows of the log applied with each stream's
// events together, checked against log order.

/// `config` with warm-up windows of `group_kib` KiB (0: log order) and
/// `warmup_batch` events per warming step (a grouped call: 4 × that).
fn grouped_config(env: &Env, data: &str, workers: usize, group_kib: usize) -> LifecycleConfig {
    let mut c = config(env, data, workers);
    c.warmup_group_bytes = group_kib << 10;
    c.warmup_batch = 16;
    c.warmup_partition_min_events = 0;
    c
}

async fn wait_failed(lc: &Lifecycle, v: &str) -> kiln::lifecycle::ViewStatus {
    wait_until("the version fails", || {
        state(lc, v) == Some(ViewState::Failed)
    })
    .await;
    lc.status_of(&id(v)).expect("status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grouped_warm_up_builds_and_parks_what_log_order_does() {
    let env = env();
    let head = fill(&env.store, 40, 0, true).await;
    let module = users_module("1.0.0", false);
    let v = id("users-1_0_0");
    // Windows of 256 KiB: many of them, one holding the poison event.
    for (workers, data) in [(1, "grouped"), (2, "grouped-split")] {
        let grouped = start(&env, grouped_config(&env, data, workers, 256)).await;
        deploy_and_wait_active(&grouped, &module, "users-1_0_0").await;
        let in_order = start(
            &env,
            grouped_config(&env, &format!("{data}-log"), workers, 0),
        )
        .await;
        deploy_and_wait_active(&in_order, &module, "users-1_0_0").await;

        let (g, o) = (
            grouped.status_of(&v).expect("status"),
            in_order.status_of(&v).expect("status"),
        );
        assert!(g.grouped_events > 0, "{data}: nothing grouped: {g:?}");
        assert_eq!(o.grouped_events, 0, "{data}: grouped with windows off");
        assert_eq!(g.warning, None, "{data}");
        assert_eq!((g.checkpoint, o.checkpoint), (head, head));
        let docs = documents(grouped.views(), &v);
        assert_eq!(docs.len() as u64, USERS);
        assert!(
            docs == documents(in_order.views(), &v),
            "{data}: grouped and log order built different documents"
        );
        assert!(
            equals_clean_rebuild(&env, grouped.views(), &v, head).await,
            "{data}: the documents differ from a clean rebuild"
        );
        // The poison event parked alike: the same event, position and
        // reason (only when it was parked differs).
        let parked = |lc: &Lifecycle| {
            let mut all = lc.parked(&v).expect("parked");
            all.iter_mut().for_each(|p| p.parked_at = 0);
            all
        };
        let (pg, po) = (parked(&grouped), parked(&in_order));
        assert_eq!(pg.len(), 1, "{data}");
        assert_eq!(pg, po, "{data}: dead letters differ");
        grouped.shutdown().await;
        in_order.shutdown().await;
    }
}

/// Two events the module refuses in one window: on `user-5`, then later on
/// `user-1`, whose events come first in the window (it registered first).
/// Grouped by stream, `user-1`'s would be met first; the version must fail
/// on `user-5`'s, the first in log order, as it does in log order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grouped_warm_up_fails_on_the_first_poison_event_in_log_order() {
    let env = env();
    fill(&env.store, 6, 0, false).await;
    let first = append(
        &env.store,
        5,
        NewEvent::json("LoginFailed", &json!("poison")),
    )
    .await;
    fill(&env.store, 2, 6, false).await;
    let later = append(&env.store, 1, NewEvent::json("UserRenamed", &json!(7))).await;
    fill(&env.store, 4, 8, false).await;
    let module = users_module("1.0.0", false);
    let mut outcomes = Vec::new();
    for (data, kib) in [("grouped", 4096), ("log", 0)] {
        let mut c = grouped_config(&env, data, 1, kib);
        c.default_policy.poison = PoisonPolicy::Stop;
        let lc = start(&env, c).await;
        lc.deploy(&module, "test").await.expect("deploy");
        let status = wait_failed(&lc, "users-1_0_0").await;
        outcomes.push((status.failed_position, status.last_error.clone()));
        lc.shutdown().await;
    }
    assert!(first < later);
    assert_eq!(outcomes[0].0, Some(first), "grouped: {:?}", outcomes[0]);
    assert_eq!(
        outcomes[0], outcomes[1],
        "grouped and log order failed apart"
    );
}

/// `tally` declaring `per_stream` (its `all` document gathers every stream,
/// and records the last position counted): grouped windows meet `all` from
/// two units, apply the window in log order instead and say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grouped_window_that_shares_a_document_is_applied_in_log_order() {
    let env = env();
    let head = fill(&env.store, 20, 0, false).await;
    let users = users_module("1.0.0", false);
    let mut manifest = wasm::manifest_of(&users);
    manifest["per_stream"] = json!(true);
    let tally = std::fs::read(wasm::TALLY).expect("the tally module");
    let lying = with_manifest(&tally, &manifest.to_string());
    let lc = start(&env, grouped_config(&env, "data", 1, 64)).await;
    deploy_and_wait_active(&lc, &lying, "users-1_0_0").await;
    let v = id("users-1_0_0");
    let status = lc.status_of(&v).expect("status");
    let warning = status.warning.clone().unwrap_or_default();
    assert!(
        warning.contains("\"all\"") && warning.contains("warm-up window"),
        "{status:?}"
    );
    let loaded = wasm::runtime().load("tally", &lying).expect("tally loads");
    assert!(
        documents(lc.views(), &v) == rebuild(&loaded, &read_log(&env.store).await, head),
        "the documents differ from a clean rebuild"
    );
    lc.shutdown().await;
}
