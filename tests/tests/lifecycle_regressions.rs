//! Named regressions of the blue-green lifecycle: each test is a defect an
//! outside reading or an operator's walk found, written to fail on the code
//! that had it (issue 9). The generated sequences of `lifecycle_model.rs`
//! look for more of the same kind.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kiln::lifecycle::{DeployOutcome, LifecycleConfig, LifecycleError, ViewState};
use kiln::store::{AppendRequest, ExpectedVersion, NewEvent, StreamId};
use kiln_tests::conformance::Harness;
use kiln_tests::lifecycle::{
    Env, WAIT, append_poison, append_users, deploy_active, id, state, wait_until,
};
use kiln_tests::nats::JetStreamHarness;
use kiln_tests::wasm::users_module;
use serde_json::json;

const LATER: u64 = 10 * 24 * 3600 * 1000;

/// A watched projections directory holding `users` modules (file, version,
/// changed logic), and a config watching it with a short debounce.
fn watched(env: &Env, files: &[(&str, &str, bool)]) -> (std::path::PathBuf, LifecycleConfig) {
    let dir = env.dir.path().join("projections");
    std::fs::create_dir_all(&dir).unwrap();
    for (file, version, changed) in files {
        std::fs::write(dir.join(file), users_module(version, *changed)).unwrap();
    }
    let mut config = env.config();
    config.projections_dir = Some(dir.clone());
    config.watch_debounce = Duration::from_millis(50);
    (dir, config)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// 1. An alias of a version still warming was `ready` at once, and auto
///    cutover made it active: `users` answered from a half-built view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alias_of_a_warming_version_warms_with_it_and_never_serves_early() {
    let env = Env::new();
    let mut config = env.config();
    config.warmup_batch = 1; // A warm-up long enough to be seen.
    let lc = env.start(config).await;
    lc.deploy(&users_module("1.0.0", false), "test")
        .await
        .unwrap();
    let head = append_users(&env.store, 60_000, 0).await;
    lc.wait_for_position(&id("users-1_0_0"), head, WAIT)
        .await
        .unwrap();

    let d = lc
        .deploy(&users_module("1.1.0", true), "test")
        .await
        .unwrap();
    assert_eq!(d, DeployOutcome::Warming(id("users-1_1_0")));
    let d = lc
        .deploy(&users_module("1.1.1", true), "test")
        .await
        .unwrap();
    assert_eq!(
        d,
        DeployOutcome::Alias {
            id: id("users-1_1_1"),
            of: id("users-1_1_0")
        }
    );
    assert_eq!(
        (state(&lc, "users-1_1_0"), state(&lc, "users-1_1_1")),
        (Some(ViewState::Warming), Some(ViewState::Warming)),
        "warms with 1.1.0"
    );
    assert_eq!(lc.resolve("users").unwrap(), id("users-1_0_0"));
    // Until 1.1.0 has caught up, the name never reads it.
    let start = Instant::now();
    while state(&lc, "users-1_1_0") == Some(ViewState::Warming) {
        let r = lc.resolve_version("users").unwrap();
        assert_eq!(r.physical, id("users-1_0_0"), "read a warming view");
        assert!(start.elapsed() < WAIT, "1.1.0 never caught up");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    wait_until("1.1.1 active", || {
        state(&lc, "users-1_1_1") == Some(ViewState::Active)
    })
    .await;
    let s = lc.status_of(&id("users-1_1_1")).unwrap();
    assert!(s.checkpoint >= head, "{s:?}");
    lc.shutdown().await;
}

/// 1b. An alias of a view that later fails fails with it, and the name falls
///     back to its standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alias_fails_with_the_view_it_reads_and_the_name_falls_back() {
    let env = Env::new();
    let lc = env.start(env.config()).await;
    append_users(&env.store, 200, 0).await;
    // 1.0.0 does not read LoginFailed: the poison cannot hurt it.
    deploy_active(&lc, "1.0.0", true).await;
    lc.deploy(&users_module("1.1.0", false), "test")
        .await
        .unwrap();
    deploy_active(&lc, "1.1.1", false).await;
    assert_eq!(state(&lc, "users-1_0_0"), Some(ViewState::Standby));
    let poison = append_poison(&env.store, 3).await;
    wait_until("1.1.0 failed", || {
        state(&lc, "users-1_1_0") == Some(ViewState::Failed)
    })
    .await;
    wait_until("1.1.1 failed", || {
        state(&lc, "users-1_1_1") == Some(ViewState::Failed)
    })
    .await;
    let alias = lc.status_of(&id("users-1_1_1")).unwrap();
    assert!(
        alias
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("users-1_1_0"),
        "{alias:?}"
    );
    assert_eq!(
        lc.status_of(&id("users-1_1_0")).unwrap().failed_position,
        Some(poison)
    );
    let r = lc.resolve_version("users").unwrap();
    assert_eq!((r.version, r.stale), (id("users-1_0_0"), false));
    assert_eq!(state(&lc, "users-1_0_0"), Some(ViewState::Active));
    assert_eq!(lc.auto_rollbacks(), 1);
    lc.wait_for_position(&id("users-1_0_0"), poison, WAIT)
        .await
        .unwrap();
    lc.shutdown().await;
}

/// 2. `mv users.wasm users-v1.wasm` in the watched directory (running, then
///    stopped) retired the active version and dropped its view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renaming_a_module_file_keeps_its_version_running_or_stopped() {
    let env = Env::new();
    append_users(&env.store, 100, 0).await;
    let (dir, config) = watched(&env, &[("users.wasm", "1.0.0", false)]);
    let lc = env.start(config.clone()).await;
    wait_until("1.0.0 active", || {
        state(&lc, "users-1_0_0") == Some(ViewState::Active)
    })
    .await;
    // A second version, so that a retirement would not be refused as active.
    std::fs::write(dir.join("users-next.wasm"), users_module("1.1.0", true)).unwrap();
    wait_until("1.1.0 active", || {
        state(&lc, "users-1_1_0") == Some(ViewState::Active)
    })
    .await;

    std::fs::rename(dir.join("users.wasm"), dir.join("users-v1.wasm")).unwrap();
    std::fs::rename(dir.join("users-next.wasm"), dir.join("users-v2.wasm")).unwrap();
    wait_until("the renamed files own their versions", || {
        lc.source_of(&id("users-1_0_0"))
            .is_some_and(|s| s.ends_with("users-v1.wasm"))
            && lc
                .source_of(&id("users-1_1_0"))
                .is_some_and(|s| s.ends_with("users-v2.wasm"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(state(&lc, "users-1_0_0"), Some(ViewState::Standby));
    assert_eq!(state(&lc, "users-1_1_0"), Some(ViewState::Active));
    lc.shutdown().await;

    // Renamed while stopped.
    std::fs::rename(dir.join("users-v1.wasm"), dir.join("users-one.wasm")).unwrap();
    std::fs::rename(dir.join("users-v2.wasm"), dir.join("users-two.wasm")).unwrap();
    let lc = env.start(config).await;
    assert_eq!(state(&lc, "users-1_0_0"), Some(ViewState::Standby));
    assert_eq!(state(&lc, "users-1_1_0"), Some(ViewState::Active));
    assert!(lc.views().exists(&id("users-1_0_0")));
    assert!(
        lc.source_of(&id("users-1_0_0"))
            .unwrap()
            .ends_with("users-one.wasm")
    );
    lc.shutdown().await;
}

/// 3. A failed active answered 404 and the grace sweep then dropped the
///    healthy standby: now the name rolls back by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_active_rolls_back_to_its_standby_which_the_sweep_keeps() {
    let env = Env::new();
    let lc = env.start(env.config()).await;
    append_users(&env.store, 100, 0).await;
    deploy_active(&lc, "1.0.0", true).await;
    deploy_active(&lc, "2.0.0", false).await;
    append_poison(&env.store, 1).await;
    wait_until("2.0.0 failed", || {
        state(&lc, "users-2_0_0") == Some(ViewState::Failed)
    })
    .await;
    let r = lc.resolve_version("users").unwrap();
    assert_eq!((r.version, r.stale), (id("users-1_0_0"), false));
    let s = lc.status_of(&id("users-1_0_0")).unwrap();
    assert_eq!(s.state, ViewState::Active);
    assert_eq!(
        s.activated_by.as_deref(),
        Some("automatic rollback: users-2_0_0 failed")
    );
    assert!(
        lc.status_of(&id("users-2_0_0"))
            .unwrap()
            .last_error
            .unwrap()
            .contains("rolled back to users-1_0_0"),
    );
    assert_eq!(lc.auto_rollbacks(), 1);
    lc.sweep_at(now_ms() + LATER).await;
    assert_eq!(state(&lc, "users-1_0_0"), Some(ViewState::Active));
    // It survives a restart.
    lc.shutdown().await;
    let lc = env.start(env.config()).await;
    assert_eq!(lc.resolve("users").unwrap(), id("users-1_0_0"));
    lc.shutdown().await;
}

/// 3b. With no standby to fall back to, the failed active keeps serving its
///     committed documents, marked stale, and the sweep retires nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_active_without_a_standby_serves_its_documents_marked_stale() {
    let env = Env::new();
    let lc = env.start(env.config()).await;
    let head = append_users(&env.store, 100, 0).await;
    deploy_active(&lc, "1.0.0", false).await;
    let poison = append_poison(&env.store, 1).await;
    wait_until("1.0.0 failed", || {
        state(&lc, "users-1_0_0") == Some(ViewState::Failed)
    })
    .await;
    let r = lc.resolve_version("users").unwrap();
    assert_eq!((r.version.clone(), r.stale), (id("users-1_0_0"), true));
    assert!(
        lc.get(&r.physical, b"user-1").unwrap().is_some(),
        "its documents are still served"
    );
    let s = lc.status_of(&id("users-1_0_0")).unwrap();
    assert!(s.serving_stale && s.checkpoint >= head && s.failed_position == Some(poison));
    lc.sweep_at(now_ms() + LATER).await;
    lc.shutdown().await;
    let lc = env.start(env.config()).await;
    assert!(
        lc.resolve_version("users").unwrap().stale,
        "still served after a restart"
    );
    // A new version takes the name back.
    deploy_active(&lc, "1.1.0", true).await;
    let r = lc.resolve_version("users").unwrap();
    assert_eq!((r.version, r.stale), (id("users-1_1_0"), false));
    assert!(!lc.status_of(&id("users-1_0_0")).unwrap().serving_stale);
    lc.shutdown().await;
}

/// 4. A rolled-back version, retired after the grace period, came back on a
///    restart (its file was still in the watched directory) and became active.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_version_stays_retired_through_restarts_and_file_changes() {
    let env = Env::new();
    append_users(&env.store, 100, 0).await;
    let (dir, config) = watched(
        &env,
        &[
            ("users-1.wasm", "1.0.0", false),
            ("users-2.wasm", "2.0.0", true),
        ],
    );
    let lc = env.start(config.clone()).await;
    wait_until("2.0.0 active", || {
        state(&lc, "users-2_0_0") == Some(ViewState::Active)
    })
    .await;
    assert_eq!(lc.rollback("users").await.unwrap(), id("users-1_0_0"));
    lc.sweep_at(now_ms() + LATER).await;
    assert_eq!(state(&lc, "users-2_0_0"), Some(ViewState::Retired));
    lc.shutdown().await;

    for _ in 0..2 {
        let lc = env.start(config.clone()).await;
        assert_eq!(state(&lc, "users-2_0_0"), Some(ViewState::Retired));
        assert_eq!(lc.resolve("users").unwrap(), id("users-1_0_0"));
        // Touched, renamed, copied: still retired.
        std::fs::write(dir.join("users-2.wasm"), users_module("2.0.0", true)).unwrap();
        std::fs::copy(dir.join("users-2.wasm"), dir.join("users-2-copy.wasm")).unwrap();
        std::fs::rename(dir.join("users-2-copy.wasm"), dir.join("users-two.wasm")).unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(state(&lc, "users-2_0_0"), Some(ViewState::Retired));
        std::fs::remove_file(dir.join("users-two.wasm")).unwrap();
        lc.shutdown().await;
    }
    // Only an explicit deploy brings it back (rebuilt: its view was dropped).
    let lc = env.start(config).await;
    let d = lc
        .deploy(&users_module("2.0.0", true), "api")
        .await
        .unwrap();
    assert_eq!(d, DeployOutcome::Warming(id("users-2_0_0")));
    wait_until("2.0.0 active", || {
        state(&lc, "users-2_0_0") == Some(ViewState::Active)
    })
    .await;
    lc.shutdown().await;
}

/// 4b. A retired version still backing an alias, deployed again, became an
///     alias of itself with no worker tailing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_view_backing_an_alias_comes_back_as_itself() {
    let env = Env::new();
    let lc = env.start(env.config()).await;
    append_users(&env.store, 100, 0).await;
    deploy_active(&lc, "1.0.0", false).await;
    deploy_active(&lc, "1.0.1", false).await;
    lc.retire(&id("users-1_0_0")).await.unwrap();
    assert!(
        lc.views().exists(&id("users-1_0_0")),
        "1.0.1 still reads it"
    );
    let d = lc
        .deploy(&users_module("1.0.0", false), "api")
        .await
        .unwrap();
    assert_eq!(d, DeployOutcome::Restored(id("users-1_0_0")));
    let s = lc.status_of(&id("users-1_0_0")).unwrap();
    assert_eq!((s.state, s.alias_of), (ViewState::Ready, None));
    // Its worker tails: a new event reaches it.
    let head = append_users(&env.store, 10, 100).await;
    lc.wait_for_position(&id("users-1_0_0"), head, WAIT)
        .await
        .unwrap();
    lc.shutdown().await;
    let lc = env.start(env.config()).await;
    let head = append_users(&env.store, 10, 110).await;
    lc.wait_for_position(&id("users-1_0_0"), head, WAIT)
        .await
        .unwrap();
    lc.shutdown().await;
}

/// 5. A missing registry.json was read as empty and every view dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_registry_refuses_to_start_and_drops_nothing_until_recovery_is_asked() {
    let env = Env::new();
    let lc = env.start(env.config()).await;
    let head = append_users(&env.store, 100, 0).await;
    deploy_active(&lc, "1.0.0", false).await;
    lc.wait_for_position(&id("users-1_0_0"), head, WAIT)
        .await
        .unwrap();
    let doc = lc.get(&id("users-1_0_0"), b"user-1").unwrap();
    lc.shutdown().await;
    std::fs::remove_file(env.dir.path().join("data/registry.json")).unwrap();

    let err = kiln::lifecycle::Lifecycle::start(
        env.config(),
        env.store.clone(),
        kiln_tests::wasm::runtime(),
    )
    .await
    .err()
    .expect("refuses to start");
    assert!(
        matches!(err, LifecycleError::RegistryMissing { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("users-1_0_0") && msg.contains("--recover-registry"),
        "{msg}"
    );
    let views = kiln::views::ViewStore::open(env.dir.path().join("data/views")).unwrap();
    assert_eq!(
        views.views().unwrap(),
        vec![id("users-1_0_0")],
        "nothing dropped"
    );
    drop(views);

    let mut config = env.config();
    config.recover_registry = true;
    let lc = env.start(config).await;
    wait_until("1.0.0 active again", || {
        state(&lc, "users-1_0_0") == Some(ViewState::Active)
    })
    .await;
    assert_eq!(lc.get(&id("users-1_0_0"), b"user-1").unwrap(), doc);
    assert_eq!(
        lc.status_of(&id("users-1_0_0")).unwrap().events_applied,
        0,
        "resumed from its checkpoint, nothing replayed"
    );
    lc.shutdown().await;
}

/// 5b. A corrupt registry is refused too, and kept aside on recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_registry_refuses_to_start_and_recovery_keeps_it_aside() {
    let env = Env::new();
    let lc = env.start(env.config()).await;
    lc.deploy(&users_module("1.0.0", false), "test")
        .await
        .unwrap();
    lc.shutdown().await;
    std::fs::write(env.dir.path().join("data/registry.json"), b"{\"format\":2,").unwrap();
    let err = kiln::lifecycle::Lifecycle::start(
        env.config(),
        env.store.clone(),
        kiln_tests::wasm::runtime(),
    )
    .await
    .err()
    .expect("refuses to start");
    assert!(
        matches!(err, LifecycleError::CorruptRegistry { .. }),
        "{err}"
    );
    let mut config = env.config();
    config.recover_registry = true;
    let lc = env.start(config).await;
    assert!(state(&lc, "users-1_0_0").is_some());
    let aside = std::fs::read_dir(env.dir.path().join("data"))
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("registry.json.corrupt-")
        });
    assert!(aside, "the corrupt registry is kept");
    lc.shutdown().await;
}

/// 7. Retire racing a redeploy of the same bytes could end with the new
///    version failed ("view does not exist") or its column family dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retire_racing_a_redeploy_of_the_same_bytes_ends_retired_or_whole() {
    let env = Env::new();
    let lc = env.start(env.config()).await;
    append_users(&env.store, 2000, 0).await;
    deploy_active(&lc, "1.0.0", true).await;
    let bytes = users_module("1.1.0", false);
    lc.deploy(&bytes, "test").await.unwrap();
    for round in 0..12 {
        let (a, b) = (lc.clone(), lc.clone());
        let bytes2 = bytes.clone();
        let delay = Duration::from_micros(round * 150);
        let (r, d) = tokio::join!(
            async move { a.retire(&id("users-1_1_0")).await },
            async move {
                tokio::time::sleep(delay).await;
                b.deploy(&bytes2, "test").await
            }
        );
        r.unwrap();
        d.unwrap();
        let head = append_users(&env.store, 10, 2000 + round as usize * 10).await;
        match state(&lc, "users-1_1_0") {
            Some(ViewState::Retired) => {
                wait_until("dropped", || !lc.views().exists(&id("users-1_1_0"))).await;
            }
            Some(_) => {
                lc.wait_for_position(&id("users-1_1_0"), head, WAIT)
                    .await
                    .unwrap_or_else(|e| panic!("round {round}: {e}"));
                assert!(lc.views().exists(&id("users-1_1_0")));
            }
            None => panic!("round {round}: 1.1.0 unknown"),
        }
        if state(&lc, "users-1_1_0") == Some(ViewState::Active) {
            lc.promote(&id("users-1_0_0")).await.unwrap();
        }
    }
    lc.shutdown().await;
}

/// 8. The watcher re-read every module about three times a second, forever,
///    triggered by the access events of its own reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_watched_directory_is_not_read_again() {
    let env = Env::new();
    let (dir, config) = watched(
        &env,
        &[
            ("users.wasm", "1.0.0", false),
            ("users-b.wasm", "1.1.0", true),
        ],
    );
    let lc = env.start(config).await;
    wait_until("1.1.0 active", || {
        state(&lc, "users-1_1_0") == Some(ViewState::Active)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let settled = lc.watch_reads();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(lc.watch_reads(), settled, "an idle directory is not read");
    // A real change is still seen, once.
    std::fs::write(dir.join("users-c.wasm"), users_module("1.2.0", false)).unwrap();
    wait_until("1.2.0 deployed", || state(&lc, "users-1_2_0").is_some()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = lc.watch_reads();
    assert!(
        (settled + 1..=settled + 3).contains(&after),
        "{settled} → {after}"
    );
    lc.shutdown().await;
}

/// 9. Caught up meant `checkpoint >= head` read after each batch: under a
///    steady append rate a warm-up could stay warming forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_becomes_ready_while_the_log_grows_steadily_embedded() {
    let env = Env::new();
    ready_under_steady_appends(&env, 1_000_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_becomes_ready_while_the_log_grows_steadily_jetstream() {
    let h = JetStreamHarness::start().await;
    let env = Env::with_store(h.store());
    ready_under_steady_appends(&env, 1_000_000).await;
}

async fn ready_under_steady_appends(env: &Env, events: usize) {
    let lc = env.start(env.config()).await;
    append_bulk(env, events).await;
    lc.deploy(&users_module("1.0.0", false), "test")
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // ~3,000 events/s while the version warms.
    let writer = {
        let (store, stop) = (env.store.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let batch: Vec<NewEvent> = (0..30)
                    .map(|_| NewEvent::json("UserLoggedIn", &json!({})))
                    .collect();
                let stream = StreamId::new(format!("user-{}", n % 50)).unwrap();
                store
                    .append(AppendRequest::new(stream, ExpectedVersion::Any, batch))
                    .await
                    .expect("append");
                n += 1;
            }
            n * 30
        })
    };
    let started = Instant::now();
    let limit = Duration::from_secs(240);
    while state(&lc, "users-1_0_0") != Some(ViewState::Active) {
        assert!(
            started.elapsed() < limit,
            "still {:?} after {limit:?} under steady appends: {:?}",
            state(&lc, "users-1_0_0"),
            lc.status_of(&id("users-1_0_0"))
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let warm = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let appended = writer.await.unwrap();
    assert!(appended > 0);
    let head = env.store.head().await.unwrap();
    lc.wait_for_position(&id("users-1_0_0"), head, WAIT)
        .await
        .unwrap();
    eprintln!(
        "{events} events warmed in {:.1} s while {appended} more were appended",
        warm.as_secs_f64()
    );
    lc.shutdown().await;
}

/// Appends `n` registrations and logins over 1,000 users, 500 per append.
async fn append_bulk(env: &Env, n: usize) {
    let mut left = n;
    let mut k = 0usize;
    while left > 0 {
        let take = left.min(500);
        let user = k % 1000;
        let events: Vec<NewEvent> = (0..take)
            .map(|i| {
                if k < 1000 && i == 0 {
                    NewEvent::json("UserRegistered", &json!({"name": "u", "email": "e"}))
                } else {
                    NewEvent::json("UserLoggedIn", &json!({}))
                }
            })
            .collect();
        env.store
            .append(AppendRequest::new(
                StreamId::new(format!("user-{user}")).unwrap(),
                ExpectedVersion::Any,
                events,
            ))
            .await
            .expect("append");
        left -= take;
        k += 1;
    }
}

/// 9b. Warm-up waited for every live worker to be idle: two live views busy
///     all the time starved it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_up_moves_while_two_live_views_are_busy() {
    let env = Env::new();
    let lc = env.start(env.config()).await;
    append_users(&env.store, 20_000, 0).await;
    lc.deploy(&users_module("1.0.0", false), "test")
        .await
        .unwrap();
    lc.deploy(&users_module("1.1.0", true), "test")
        .await
        .unwrap();
    wait_until("both live", || {
        state(&lc, "users-1_1_0") == Some(ViewState::Active)
            && state(&lc, "users-1_0_0") == Some(ViewState::Standby)
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (store, stop) = (env.store.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let batch: Vec<NewEvent> = (0..50)
                    .map(|_| NewEvent::json("UserLoggedIn", &json!({})))
                    .collect();
                let stream = StreamId::new(format!("user-{}", (n * 4 + w) % 10)).unwrap();
                store
                    .append(AppendRequest::new(stream, ExpectedVersion::Any, batch))
                    .await
                    .expect("append");
                n += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    lc.deploy(&users_module("2.0.0", false), "test")
        .await
        .unwrap();
    let start = Instant::now();
    let first = lc.status_of(&id("users-2_0_0")).unwrap().checkpoint;
    wait_until("the warm-up to move", || {
        lc.status_of(&id("users-2_0_0")).unwrap().checkpoint > first + 5_000
    })
    .await;
    eprintln!(
        "5,000 events of warm-up in {:?} beside two busy live views",
        start.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    lc.shutdown().await;
}

/// Found by the generated sequences (seed 1802071181): a crash right after a
/// rollback re-promoted a ready version newer than the one rolled back to
/// (a restart re-ran the auto cutover). Now a version is cut over when it
/// becomes ready, in the same registry write, and a restart decides nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_a_rollback_keeps_the_version_rolled_back_to() {
    let env = Env::new();
    let lc = env.start(env.config()).await;
    append_users(&env.store, 100, 0).await;
    deploy_active(&lc, "1.0.0", false).await;
    deploy_active(&lc, "2.0.0", true).await;
    // Ready, but older than the active 2.0.0: auto cutover leaves it ready.
    lc.deploy(&users_module("1.5.0", true), "test")
        .await
        .unwrap();
    wait_until("1.5.0 ready", || {
        state(&lc, "users-1_5_0") == Some(ViewState::Ready)
    })
    .await;
    assert_eq!(lc.rollback("users").await.unwrap(), id("users-1_0_0"));
    lc.abandon().await;
    let lc = env.start(env.config()).await;
    assert_eq!(
        lc.resolve("users").unwrap(),
        id("users-1_0_0"),
        "after a crash"
    );
    assert_eq!(state(&lc, "users-1_5_0"), Some(ViewState::Ready));
    lc.shutdown().await;
    let lc = env.start(env.config()).await;
    assert_eq!(
        lc.resolve("users").unwrap(),
        id("users-1_0_0"),
        "after a restart"
    );
    lc.shutdown().await;
}

/// Issue 32: logic deployed again after its view was retired warms a view
/// of its own, and its note says why (the version with that logic is
/// retired), never that one module lacks the linker's relocations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logic_deployed_again_after_a_retire_says_why_it_is_not_an_alias() {
    let env = Env::new();
    let lc = env.start(env.config()).await;
    append_users(&env.store, 10, 0).await;
    deploy_active(&lc, "1.0.0", false).await;
    lc.retire(&id("users-1_0_0")).await.unwrap();
    let d = lc
        .deploy(&users_module("1.1.0", false), "api")
        .await
        .unwrap();
    assert_eq!(d, DeployOutcome::Warming(id("users-1_1_0")));
    let note = lc
        .status_of(&id("users-1_1_0"))
        .and_then(|s| s.deploy_note)
        .unwrap_or_default();
    assert!(!note.contains("relocations"), "{note}");
    assert!(
        note.contains("the same logic as users-1_0_0, which is retired"),
        "{note}"
    );
    lc.shutdown().await;
}
