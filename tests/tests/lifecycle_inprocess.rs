//! The view lifecycle, in process, on the real embedded store, real RocksDB
//! views and real wasm: warm-up, automatic and manual cutover with readers
//! running, aliases on unchanged logic, immutability, rollback, retirement
//! after the grace period, restart, poison events.
//!
//! "Changed logic" for `users` 1.1.0 is the real `users` module with a manifest
//! that no longer subscribes to `LoginFailed`: a different fingerprint and a
//! visibly different view (`failed_logins` stays 0). 1.2.0 is the same as
//! 1.1.0 with only the version bumped: the same fingerprint.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use kiln::lifecycle::{
    CutoverPolicy, DeployOutcome, LifecycleError, PoisonPolicy, ViewPolicy, ViewState,
};
use kiln::store::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StreamId};
use kiln_tests::lifecycle::{Env, WAIT, append_users, id, state, wait_until};
use kiln_tests::wasm::{self, CHAOS, users_module};
use serde_json::json;

fn failed_logins(doc: &[u8]) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(doc).expect("profile JSON");
    v["failed_logins"].as_u64().expect("failed_logins")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_then_auto_cutover_while_readers_read_one_version_each() {
    let env = Env::new();
    let lc = env.start(env.config()).await;
    let d = lc
        .deploy(&users_module("1.0.0", false), "test")
        .await
        .unwrap();
    assert_eq!(d, DeployOutcome::Warming(id("users-1_0_0")));
    wait_until("1.0.0 active", || {
        state(&lc, "users-1_0_0") == Some(ViewState::Active)
    })
    .await;
    let head = append_users(&env.store, 4000, 0).await;
    lc.wait_for_position(&id("users-1_0_0"), head, WAIT)
        .await
        .unwrap();

    // A reader resolving `users` and reading user-3 continuously: 1.0.0 counts
    // failed logins, 1.1.0 does not, so each document shows which version it
    // came from, and it must be the one `resolve` named.
    let stop = Arc::new(AtomicBool::new(false));
    let (old_reads, new_reads, failures) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let reader = {
        let (lc, stop) = (lc.clone(), stop.clone());
        let (old_reads, new_reads, failures) =
            (old_reads.clone(), new_reads.clone(), failures.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let outcome = lc
                    .resolve("users")
                    .and_then(|v| Ok((lc.get(&v, b"user-3")?, v)));
                match outcome {
                    Ok((Some(doc), v)) if v == id("users-1_0_0") && failed_logins(&doc) > 0 => {
                        old_reads.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok((Some(doc), v)) if v == id("users-1_1_0") && failed_logins(&doc) == 0 => {
                        new_reads.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        eprintln!(
                            "bad read: {:?}",
                            other.map(|(d, v)| (d.map(String::from_utf8), v))
                        );
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::task::yield_now().await;
            }
        })
    };
    wait_until("reads of 1.0.0", || old_reads.load(Ordering::Relaxed) > 10).await;

    let d = lc
        .deploy(&users_module("1.1.0", true), "test")
        .await
        .unwrap();
    assert_eq!(d, DeployOutcome::Warming(id("users-1_1_0")));
    // Appends keep coming while it warms.
    let head = append_users(&env.store, 1000, 4000).await;
    wait_until("1.1.0 active", || {
        state(&lc, "users-1_1_0") == Some(ViewState::Active)
    })
    .await;
    wait_until("reads of 1.1.0", || new_reads.load(Ordering::Relaxed) > 10).await;
    stop.store(true, Ordering::Relaxed);
    reader.await.unwrap();
    assert_eq!(failures.load(Ordering::Relaxed), 0, "failed or mixed reads");

    lc.wait_for_position(&id("users-1_1_0"), head, WAIT)
        .await
        .unwrap();
    let new = lc.status_of(&id("users-1_1_0")).unwrap();
    assert_eq!(
        new.events_applied, head,
        "1.1.0 replayed the log from the first event"
    );
    let (deployed, ready, active) = (
        new.deployed_at,
        new.ready_at.unwrap(),
        new.activated_at.unwrap(),
    );
    assert!(
        deployed <= ready && ready <= active,
        "warming → ready → active"
    );
    assert_eq!(state(&lc, "users-1_0_0"), Some(ViewState::Standby));
    // The standby keeps tailing.
    let head = append_users(&env.store, 100, 5000).await;
    lc.wait_for_position(&id("users-1_0_0"), head, WAIT)
        .await
        .unwrap();
    lc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_logic_is_an_alias_with_nothing_replayed() {
    let env = Env::new();
    let lc = env.start(env.config()).await;
    lc.deploy(&users_module("1.1.0", true), "test")
        .await
        .unwrap();
    let head = append_users(&env.store, 1000, 0).await;
    lc.wait_for_position(&id("users-1_1_0"), head, WAIT)
        .await
        .unwrap();
    wait_until("1.1.0 active", || {
        state(&lc, "users-1_1_0") == Some(ViewState::Active)
    })
    .await;
    let applied_before = lc.status_of(&id("users-1_1_0")).unwrap().events_applied;
    assert_eq!(applied_before, head);

    let d = lc
        .deploy(&users_module("1.2.0", true), "test")
        .await
        .unwrap();
    assert_eq!(
        d,
        DeployOutcome::Alias {
            id: id("users-1_2_0"),
            of: id("users-1_1_0")
        }
    );
    let alias = lc.status_of(&id("users-1_2_0")).unwrap();
    assert_eq!(alias.events_applied, 0, "an alias replays nothing");
    assert_eq!(alias.alias_of.as_deref(), Some("users-1_1_0"));
    assert_eq!(
        alias.state,
        ViewState::Active,
        "ready at once, auto cutover"
    );
    assert_eq!(
        lc.status_of(&id("users-1_1_0")).unwrap().events_applied,
        applied_before,
        "the physical view replayed nothing either"
    );
    assert!(
        !lc.views().exists(&id("users-1_2_0")),
        "no column family of its own"
    );
    assert_eq!(lc.resolve("users").unwrap(), id("users-1_1_0"));
    assert_eq!(lc.resolve("users@^1.2").unwrap(), id("users-1_1_0"));
    assert_eq!(lc.resolve("users-1_2_0").unwrap(), id("users-1_1_0"));
    assert!(lc.get(&id("users-1_2_0"), b"user-1").unwrap().is_some());
    lc.shutdown().await;
}

/// Issue 26: a projection whose `per_stream` promise was false builds a wrong
/// view when warmed in partitions; its fix is the same module without the
/// promise at a bumped version. That must warm a view of its own, never read
/// (and so serve, and snapshot) the wrong one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_per_stream_at_a_bumped_version_never_aliases_the_old_view() {
    let env = Env::new();
    let lc = env.start(env.config()).await;
    let promised = users_module("1.0.0", false);
    assert_eq!(wasm::manifest_of(&promised)["per_stream"], json!(true));
    lc.deploy(&promised, "test").await.unwrap();
    let head = append_users(&env.store, 200, 0).await;
    lc.wait_for_position(&id("users-1_0_0"), head, WAIT)
        .await
        .unwrap();

    let mut manifest = wasm::manifest_of(&users_module("1.0.2", false));
    manifest
        .as_object_mut()
        .expect("the manifest is an object")
        .remove("per_stream");
    let fixed = wasm::with_manifest(&promised, &manifest.to_string());
    let d = lc.deploy(&fixed, "test").await.unwrap();
    assert_eq!(d, DeployOutcome::Warming(id("users-1_0_2")));
    let note = lc
        .status_of(&id("users-1_0_2"))
        .unwrap()
        .deploy_note
        .unwrap_or_default();
    assert!(note.contains("differs from users-1_0_0"), "{note}");
    assert!(note.contains("manifest"), "{note}");
    assert!(!note.contains("code"), "only the manifest differs: {note}");
    lc.wait_for_position(&id("users-1_0_2"), head, WAIT)
        .await
        .unwrap();
    assert_eq!(
        lc.status_of(&id("users-1_0_2")).unwrap().events_applied,
        head,
        "it replayed the log itself"
    );
    lc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_are_immutable() {
    let env = Env::new();
    let lc = env.start(env.config()).await;
    lc.deploy(&users_module("1.0.0", false), "test")
        .await
        .unwrap();
    let again = lc
        .deploy(&users_module("1.0.0", false), "test")
        .await
        .unwrap();
    assert_eq!(again, DeployOutcome::AlreadyDeployed(id("users-1_0_0")));
    let err = lc
        .deploy(&users_module("1.0.0", true), "test")
        .await
        .unwrap_err();
    assert!(
        matches!(err, LifecycleError::ImmutableVersion { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("users-1_0_0"), "{err}");
    lc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_cutover_rollback_and_retirement_after_grace() {
    let env = Env::new();
    let mut config = env.config();
    config.standby_grace = Duration::from_millis(1500);
    config.policies.insert(
        "users".into(),
        ViewPolicy {
            cutover: CutoverPolicy::Manual,
            ..ViewPolicy::default()
        },
    );
    let lc = env.start(config).await;
    let head = append_users(&env.store, 500, 0).await;
    lc.deploy(&users_module("1.0.0", false), "test")
        .await
        .unwrap();
    wait_until("1.0.0 ready", || {
        state(&lc, "users-1_0_0") == Some(ViewState::Ready)
    })
    .await;
    assert!(matches!(
        lc.resolve("users"),
        Err(LifecycleError::NoActiveVersion { .. })
    ));
    lc.promote(&id("users-1_0_0")).await.unwrap();
    lc.deploy(&users_module("1.1.0", true), "test")
        .await
        .unwrap();
    wait_until("1.1.0 ready", || {
        state(&lc, "users-1_1_0") == Some(ViewState::Ready)
    })
    .await;
    assert_eq!(
        lc.resolve("users").unwrap(),
        id("users-1_0_0"),
        "manual: no cutover yet"
    );
    assert!(matches!(
        lc.rollback("users").await,
        Err(LifecycleError::NoStandby { .. })
    ));
    lc.promote(&id("users-1_1_0")).await.unwrap();
    assert_eq!(lc.resolve("users").unwrap(), id("users-1_1_0"));
    assert_eq!(state(&lc, "users-1_0_0"), Some(ViewState::Standby));

    // Rollback is instant: the standby kept tailing.
    let back = lc.rollback("users").await.unwrap();
    assert_eq!(back, id("users-1_0_0"));
    assert_eq!(lc.resolve("users").unwrap(), id("users-1_0_0"));
    assert_eq!(state(&lc, "users-1_1_0"), Some(ViewState::Standby));
    assert!(lc.status_of(&id("users-1_0_0")).unwrap().checkpoint >= head);

    // After the grace period the standby is retired and its column family dropped.
    wait_until("1.1.0 retired", || {
        state(&lc, "users-1_1_0") == Some(ViewState::Retired)
    })
    .await;
    wait_until("1.1.0 dropped", || !lc.views().exists(&id("users-1_1_0"))).await;
    let on_disk = lc.views().views().unwrap();
    assert!(!on_disk.contains(&id("users-1_1_0")), "{on_disk:?}");
    assert!(on_disk.contains(&id("users-1_0_0")), "{on_disk:?}");
    assert!(matches!(
        lc.resolve("users-1_1_0"),
        Err(LifecycleError::Retired { .. })
    ));
    lc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_every_version_from_its_checkpoint() {
    let env = Env::new();
    let lc = env.start(env.config()).await;
    lc.deploy(&users_module("1.0.0", false), "test")
        .await
        .unwrap();
    let head = append_users(&env.store, 1000, 0).await;
    wait_until("1.0.0 active", || {
        state(&lc, "users-1_0_0") == Some(ViewState::Active)
    })
    .await;
    lc.deploy(&users_module("1.1.0", true), "test")
        .await
        .unwrap();
    lc.deploy(&users_module("1.2.0", true), "test")
        .await
        .unwrap();
    for v in ["users-1_0_0", "users-1_1_0"] {
        lc.wait_for_position(&id(v), head, WAIT).await.unwrap();
    }
    wait_until("1.2.0 active", || {
        state(&lc, "users-1_2_0") == Some(ViewState::Active)
    })
    .await;
    let before: Vec<_> = lc.status().into_iter().map(|s| (s.id, s.state)).collect();
    lc.shutdown().await;

    let lc = env.start(env.config()).await;
    let after: Vec<_> = lc.status().into_iter().map(|s| (s.id, s.state)).collect();
    assert_eq!(before, after, "states and the active pointer survive");
    assert_eq!(lc.resolve("users").unwrap(), id("users-1_1_0"));
    let head2 = append_users(&env.store, 100, 1000).await;
    for v in ["users-1_0_0", "users-1_1_0"] {
        lc.wait_for_position(&id(v), head2, WAIT).await.unwrap();
        let s = lc.status_of(&id(v)).unwrap();
        assert_eq!(
            s.events_applied,
            head2 - head,
            "{v} resumed from its checkpoint"
        );
    }
    lc.shutdown().await;
}

async fn chaos_events(store: &Arc<dyn EventStore>) -> u64 {
    let stream = StreamId::new("chaos-1").unwrap();
    let events = vec![
        NewEvent::json("Note", &json!({"text": "one"})),
        NewEvent::json("Fail", &json!({"message": "poison pill"})),
        NewEvent::json("Note", &json!({"text": "three"})),
    ];
    store
        .append(AppendRequest::new(stream, ExpectedVersion::Any, events))
        .await
        .unwrap()
        .position
}

fn chaos_module() -> Vec<u8> {
    std::fs::read(CHAOS).expect("chaos module")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_stop_fails_only_that_view_with_position_and_message() {
    let env = Env::new();
    let lc = env.start(env.config()).await;
    lc.deploy(&users_module("1.0.0", false), "test")
        .await
        .unwrap();
    lc.deploy(&chaos_module(), "test").await.unwrap();
    let head = chaos_events(&env.store).await;
    let chaos = lc.status().into_iter().find(|s| s.name == "chaos").unwrap();
    let chaos_id = id(&chaos.id);
    wait_until("chaos failed", || {
        state(&lc, &chaos.id) == Some(ViewState::Failed)
    })
    .await;
    let s = lc.status_of(&chaos_id).unwrap();
    assert_eq!(s.failed_position, Some(head - 1));
    assert!(s.last_error.unwrap().contains("poison pill"));
    assert_eq!(
        s.checkpoint,
        head - 2,
        "stopped right before the poison event"
    );
    let err = lc
        .wait_for_position(&chaos_id, head, WAIT)
        .await
        .unwrap_err();
    assert!(matches!(err, LifecycleError::Failed { .. }), "{err}");
    // users is unaffected.
    let head = append_users(&env.store, 50, 0).await;
    lc.wait_for_position(&id("users-1_0_0"), head, WAIT)
        .await
        .unwrap();
    lc.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_park_records_the_event_and_goes_on() {
    let env = Env::new();
    let mut config = env.config();
    config.default_policy.poison = PoisonPolicy::Park;
    let lc = env.start(config).await;
    lc.deploy(&chaos_module(), "test").await.unwrap();
    let head = chaos_events(&env.store).await;
    let chaos_id = lc.resolve("chaos").ok();
    let chaos_id = match chaos_id {
        Some(v) => v,
        None => {
            wait_until("chaos active", || lc.resolve("chaos").is_ok()).await;
            lc.resolve("chaos").unwrap()
        }
    };
    lc.wait_for_position(&chaos_id, head, WAIT).await.unwrap();
    let parked = lc.parked(&chaos_id).unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].position, head - 1);
    assert!(
        parked[0].error.contains("poison pill"),
        "{}",
        parked[0].error
    );
    assert_eq!(lc.status_of(&chaos_id).unwrap().parked, 1);
    assert!(
        lc.get(&chaos_id, b"note/chaos-1").unwrap().is_some(),
        "the event after the parked one was applied"
    );
    // It fails again on retry, so it stays parked.
    assert_eq!(lc.retry_parked(&chaos_id).await.unwrap(), 0);
    assert_eq!(lc.parked(&chaos_id).unwrap().len(), 1);
    lc.shutdown().await;
}

/// Hot deploy through the watched directory, named by a relative path (as
/// `kiln serve --projections projections` does): a module written in two
/// halves is loaded whole and once; a module renamed in from a hidden temp file
/// is deployed; removing the active version's file keeps it serving, removing
/// another version's file retires it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watched_directory_deploys_and_retires_modules() {
    let env = Env::new();
    append_users(&env.store, 50, 0).await;
    // A directory under the current one, named relatively; removed on drop.
    let watched = tempfile::Builder::new()
        .prefix(".kiln-watched-")
        .tempdir_in(".")
        .expect("a directory under the current one");
    let name = watched.path().file_name().expect("a name").to_owned();
    let relative = std::path::Path::new(".").join(name);
    assert!(relative.is_relative());
    let mut config = env.config();
    config.projections_dir = Some(relative.clone());
    config.watch_debounce = Duration::from_millis(300);
    let lc = env.start(config).await;

    // Half a module, then (well within the quiet period) the rest.
    let users = std::fs::read(wasm::USERS).expect("users module");
    let path = relative.join("users.wasm");
    std::fs::write(&path, &users[..users.len() / 2]).expect("first half");
    tokio::time::sleep(Duration::from_millis(50)).await;
    std::fs::write(&path, &users).expect("whole module");
    wait_until("users-1_0_0 active", || {
        state(&lc, "users-1_0_0") == Some(ViewState::Active)
    })
    .await;

    // Renamed in from a hidden temporary file, as scripts/build-projections does.
    let orders = std::fs::read(wasm::ORDERS).expect("orders module");
    std::fs::write(relative.join(".orders.wasm.tmp"), &orders).expect("temp file");
    std::fs::rename(
        relative.join(".orders.wasm.tmp"),
        relative.join("orders.wasm"),
    )
    .expect("rename");
    wait_until("orders-1_0_0 active", || {
        state(&lc, "orders-1_0_0") == Some(ViewState::Active)
    })
    .await;

    // users was deployed once, from the whole file.
    let users_versions = lc
        .status()
        .into_iter()
        .filter(|s| s.id.starts_with("users-"))
        .count();
    assert_eq!(users_versions, 1);

    // Removing the active version's file does not take the name down.
    std::fs::remove_file(&path).expect("remove users.wasm");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(state(&lc, "users-1_0_0"), Some(ViewState::Active));
    assert_eq!(lc.resolve("users").unwrap(), id("users-1_0_0"));

    // A new version takes over; the file of the one now standby, removed,
    // retires it.
    std::fs::write(
        relative.join("users-next.wasm"),
        users_module("1.1.0", true),
    )
    .expect("users 1.1.0");
    wait_until("users-1_1_0 active", || {
        state(&lc, "users-1_1_0") == Some(ViewState::Active)
    })
    .await;
    std::fs::write(relative.join("users-old.wasm"), &users).expect("users 1.0.0 again");
    wait_until("users-old.wasm owns 1.0.0", || {
        lc.source_of(&id("users-1_0_0"))
            .is_some_and(|s| s.ends_with("users-old.wasm"))
    })
    .await;
    std::fs::remove_file(relative.join("users-old.wasm")).expect("remove users-old.wasm");
    wait_until("users-1_0_0 retired", || {
        state(&lc, "users-1_0_0") == Some(ViewState::Retired)
    })
    .await;
    assert_eq!(state(&lc, "orders-1_0_0"), Some(ViewState::Active));
    assert_eq!(state(&lc, "users-1_1_0"), Some(ViewState::Active));
    lc.shutdown().await;
}

/// The same events make the same view whatever the batching: a module that
/// counts its calls warms over a log in warm-up batches, then tails live
/// appends one batch at a time; another deployed afterwards only warms. Both
/// say one call (a fresh instance per batch), as `kiln run` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_counting_module_builds_the_same_view_warming_and_tailing() {
    let env = Env::new();
    let mut config = env.config();
    config.warmup_batch = 7;
    let lc = env.start(config).await;
    append_users(&env.store, 100, 0).await;
    lc.deploy(&wasm::call_counter("tailing"), "test")
        .await
        .unwrap();
    let mut head = 0;
    for i in 0..20 {
        head = append_users(&env.store, 10, 100 + i * 10).await;
    }
    lc.deploy(&wasm::call_counter("warming"), "test")
        .await
        .unwrap();
    for view in ["tailing-0_1_0", "warming-0_1_0"] {
        lc.wait_for_position(&id(view), head, WAIT).await.unwrap();
        assert_eq!(
            lc.get(&id(view), b"calls").unwrap().as_deref(),
            Some(&b"1"[..]),
            "{view}"
        );
    }
    lc.shutdown().await;
}

/// A batch's resource fault is not charged to its events: a module growing
/// its memory by 1 MiB per event of the batch goes over a 4 MiB cap in warm-up
/// batches of 10, and fits event by event; under `poison = park` nothing is
/// parked and every event is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_the_memory_cap_parks_none_of_its_events() {
    let env = Env::new();
    let mut config = env.config();
    config.default_policy.poison = PoisonPolicy::Park;
    config.warmup_batch = 10;
    let runtime = kiln::runtime::Runtime::new(kiln::runtime::RuntimeConfig {
        memory_cap: 4 << 20,
        ..Default::default()
    })
    .unwrap();
    let lc = kiln::lifecycle::Lifecycle::start(config, env.store.clone(), runtime)
        .await
        .unwrap();
    let head = append_users(&env.store, 30, 0).await;
    let grower = wasm::wat_raw(
        "grower",
        r#"(import "kiln" "put" (func $put (param i32 i32 i32 i32)))
        (memory (export "memory") 1)
        (data (i32.const 0) "k1")
        (func (export "kiln_alloc") (param i32) (result i32) (i32.const 1024))
        (func (export "kiln_apply") (param i32 i32) (result i32)
            (drop (memory.grow (i32.mul (i32.load (local.get 0)) (i32.const 16))))
            (call $put (i32.const 0) (i32.const 2) (i32.const 1) (i32.const 1))
            (i32.const 0))"#,
    );
    lc.deploy(&grower, "test").await.unwrap();
    let view = id("grower-0_1_0");
    lc.wait_for_position(&view, head, WAIT).await.unwrap();
    assert!(lc.parked(&view).unwrap().is_empty(), "nothing parked");
    assert_eq!(lc.status_of(&view).unwrap().events_applied, head);
    lc.shutdown().await;
}
