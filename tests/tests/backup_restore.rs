//! `kiln backup` (`POST /admin/backup`) of a running daemon's embedded data
//! directory, with appends in flight, and `kiln restore`: a daemon on the
//! restored directory serves the original's log up to the backup's head, and
//! `users` documents equal to a rebuild from scratch over that log. Real
//! daemons, real RocksDB checkpoints, the real `users` wasm projection.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use kiln::store::embedded::{EmbeddedConfig, EmbeddedStore, scan_log};
use kiln::views::{ViewId, ViewStore};
use kiln_tests::daemon::{Api, Daemon, Options, kiln_bin, kiln_cli, projections_dir};
use kiln_tests::wasm::USERS;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);
const TOKEN: &str = "backup-secret";

fn restore(backup: &Path, data_dir: &Path) -> (i32, String, String) {
    let out = Command::new(kiln_bin())
        .arg("restore")
        .arg(backup)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .expect("running kiln restore");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn documents(data_dir: &Path, view: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let views = ViewStore::open(data_dir.join("views")).expect("views db");
    let id: ViewId = view.parse().expect("view id");
    views.scan(&id, b"", None, 1_000_000).expect("scan")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let p = e.expect("entry").path();
        let t = to.join(p.file_name().expect("name"));
        if p.is_dir() {
            copy_dir(&p, &t);
        } else {
            std::fs::copy(&p, &t).expect("copy");
        }
    }
}

async fn append_user_event(api: &Api, n: u64) -> u64 {
    let stream = format!("user-{}", n % 25);
    let (event_type, data) = match n % 5 {
        0 | 1 => (
            "UserRegistered",
            json!({ "name": format!("n{n}"), "email": format!("{n}@x") }),
        ),
        2 => ("UserLoggedIn", json!({})),
        3 => ("LoginFailed", json!({})),
        _ => ("UserRenamed", json!({ "name": format!("r{n}") })),
    };
    let (s, b) = api.append(&stream, json!("any"), event_type, data).await;
    assert_eq!(s, 200, "{b}");
    b["position"].as_u64().expect("position")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_appends_restores_to_the_same_log_and_documents() {
    let tmp = tempfile::tempdir().expect("tmp");
    let projections = projections_dir(&[USERS]);
    let data = tmp.path().join("data");
    let mut original = Daemon::start_with(Options {
        data_dir: Some(data.clone()),
        ..Options::default()
            .projections(projections.path())
            .admin_token(TOKEN)
    });
    let api = Api::new(&original);
    for n in 0..300 {
        append_user_event(&api, n).await;
    }
    api.wait_state("users-1_0_0", "active", WAIT).await;

    // Appends keep flowing while the backup is taken.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let writer = {
        let (api, stop, acked) = (api.clone(), stop.clone(), acked.clone());
        tokio::spawn(async move {
            let mut n = 300;
            while !stop.load(Ordering::Relaxed) {
                let p = append_user_event(&api, n).await;
                acked.fetch_max(p, Ordering::Relaxed);
                n += 1;
            }
            n - 300
        })
    };
    while acked.load(Ordering::Relaxed) < 400 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let before = acked.load(Ordering::Relaxed);
    let backup = tmp.path().join("backup-1");
    let backup_arg = backup.to_str().expect("utf-8");
    let (code, out, err) = tokio::task::spawn_blocking({
        let original_url = original.url();
        let args: Vec<String> = ["backup", backup_arg, "--json", "--token", TOKEN, "--url"]
            .iter()
            .map(|s| s.to_string())
            .chain([original_url])
            .collect();
        move || {
            let out = Command::new(kiln_bin())
                .args(&args)
                .output()
                .expect("kiln backup");
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    })
    .await
    .expect("backup task");
    let after = acked.load(Ordering::Relaxed);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    let answer: Value = serde_json::from_str(out.trim()).expect("JSON answer");
    let head = answer["log_head"].as_u64().expect("log_head");
    println!("backup under appends: acked {before}..={after} around it, {answer}");
    assert!(
        before <= head && head <= after + 1,
        "the backup's head {head} is between the appends acknowledged before ({before}) and \
         after ({after}) it: {answer}"
    );
    assert_eq!(answer["views"], json!(["users-1_0_0"]), "{answer}");
    assert!(backup.join("kiln-backup.json").is_file());
    for _ in 0..50 {
        if acked.load(Ordering::Relaxed) > after + 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.expect("writer");
    assert!(written > 0);

    // Refusals: an existing backup, a relative path, the data dir, no token.
    let (code, _, err) = kiln_cli(&original, &["backup", backup_arg, "--token", TOKEN]);
    assert_ne!(code, 0);
    assert!(err.contains("not empty"), "{err}");
    let (s, b) = api
        .post_json("/admin/backup", &json!({ "dir": "relative/dir" }))
        .await;
    assert_eq!(
        (s, b["error"]["code"].clone()),
        (400, json!("bad_backup_target")),
        "{b}"
    );
    let inside = data.join("backups");
    let (s, b) = api
        .post_json("/admin/backup", &json!({ "dir": inside }))
        .await;
    assert_eq!(s, 400, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("overlaps")),
        "{b}"
    );
    let anonymous = Api {
        token: None,
        ..api.clone()
    };
    let (s, _) = anonymous
        .post_json("/admin/backup", &json!({ "dir": tmp.path().join("b2") }))
        .await;
    assert_eq!(s, 401);
    assert!(!tmp.path().join("b2").exists());

    // Restore into a fresh dir; a non-empty one is refused.
    let restored = tmp.path().join("restored");
    let (code, out, err) = restore(&backup, &restored);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains(&format!("log head {head}")), "{out}");
    let (code, _, err) = restore(&backup, &restored);
    assert_ne!(code, 0);
    assert!(err.contains("not empty"), "{err}");

    // The original's log, now complete and at rest.
    original.stop();
    let original_log = {
        let s = EmbeddedStore::open(EmbeddedConfig::new(data.join("log"))).expect("original log");
        scan_log(&s, 1, 1_000_000).expect("scan")
    };
    assert!(
        original_log.len() as u64 > head,
        "appends went on after the backup"
    );

    // A daemon on the restored dir: the log up to the backup's head, views
    // caught up to it from the checkpoints they were copied with.
    let mut on_restored = Daemon::start_with(Options {
        data_dir: Some(restored.clone()),
        ..Options::default()
            .projections(projections.path())
            .admin_token(TOKEN)
    });
    let rapi = Api::new(&on_restored);
    let v = rapi.wait_state("users-1_0_0", "active", WAIT).await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, b) = rapi.get("/views").await;
        if b["views"][0]["checkpoint"] == json!(head) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not caught up: {b} ({v})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (s, doc) = rapi.get("/views/users/user-3").await;
    assert_eq!(s, 200, "{doc}");
    on_restored.stop();
    let restored_log = {
        let s = EmbeddedStore::open(EmbeddedConfig::new(restored.join("log"))).expect("restored");
        scan_log(&s, 1, 1_000_000).expect("scan")
    };
    assert_eq!(restored_log.len() as u64, head);
    assert_eq!(
        restored_log,
        original_log[..head as usize],
        "the restored log is the original's up to the backup's head"
    );

    // The same documents as a rebuild from scratch over that log.
    let scratch = tmp.path().join("scratch");
    copy_dir(&restored.join("log"), &scratch.join("log"));
    let mut rebuilt = Daemon::start_with(Options {
        data_dir: Some(scratch.clone()),
        ..Options::default().projections(projections.path())
    });
    let sapi = Api::new(&rebuilt);
    let v = sapi.wait_state("users-1_0_0", "active", WAIT).await;
    assert_eq!(v["checkpoint"], json!(head), "{v}");
    rebuilt.stop();
    let expected = documents(&scratch, "users-1_0_0");
    let got = documents(&restored, "users-1_0_0");
    assert_eq!(expected.len(), 25);
    assert_eq!(
        got, expected,
        "restored documents equal a rebuild at the backup's head"
    );
}

/// On JetStream the log is not on the daemon's machine: the call says so and
/// writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_of_a_jetstream_daemon_is_refused_with_the_reason() {
    let nats = kiln_tests::nats::NatsServer::start();
    let d = Daemon::start_with(Options::default().jetstream(&nats.url()));
    let api = Api::new(&d);
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("b");
    let (s, b) = api.post_json("/admin/backup", &json!({ "dir": dir })).await;
    assert_eq!(
        (s, b["error"]["code"].clone()),
        (400, json!("backup_unsupported")),
        "{b}"
    );
    assert!(
        b["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("nats stream backup")),
        "{b}"
    );
    assert!(!dir.exists());
}

/// Regression (issue 25, measured): a snapshot taken after a backup, on the
/// history a restore then discarded, was applied to the restored log: a
/// version built again "bootstrapped at 20" on a log whose head was 13,
/// served documents of events that no longer exist and never applied the
/// new ones. A restore gives the log a new history epoch, so a snapshot of
/// the old one is not even found; a new version replays the restored log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_from_a_history_a_restore_discarded_is_never_applied() {
    let tmp = tempfile::tempdir().expect("tmp");
    let snapshots = tmp.path().join("snapshots");
    let snapshot_dir = snapshots.to_str().expect("utf-8").to_string();
    let with = |data: &Path| Options {
        data_dir: Some(data.to_path_buf()),
        ..Options::default()
            .admin_token(TOKEN)
            .arg("--snapshot-dir")
            .arg(&snapshot_dir)
    };
    let data = tmp.path().join("data");
    let mut original = Daemon::start_with(with(&data));
    let api = Api::new(&original);
    let wasm = kiln_tests::daemon::module_version(USERS, "1.0.0", None);
    let (s, b) = api.deploy(wasm.clone()).await;
    assert_eq!(s, 202, "{b}");
    for n in 0..10 {
        api.register_user(&format!("user-{n}")).await;
    }
    api.wait_state("users-1_0_0", "active", WAIT).await;
    let backup = tmp.path().join("backup");
    let (s, b) = api
        .post_json("/admin/backup", &json!({ "dir": backup }))
        .await;
    assert_eq!((s, b["log_head"].clone()), (200, json!(10)), "{b}");
    for n in 10..20 {
        api.register_user(&format!("user-{n}")).await;
    }
    let (s, b) = api
        .get("/views/users/user-15?position=20&wait_ms=5000")
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, m) = api
        .post_json("/admin/views/users/snapshot", &json!({}))
        .await;
    assert_eq!(
        (s, m["snapshot"]["position"].clone()),
        (200, json!(20)),
        "{m}"
    );
    original.stop();

    let restored = tmp.path().join("restored");
    let (code, out, err) = restore(&backup, &restored);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    let on_restored = Daemon::start_with(with(&restored));
    let rapi = Api::new(&on_restored);
    for n in 101..104 {
        rapi.register_user(&format!("user-{n}")).await;
    }
    let (s, b) = rapi
        .post_json("/admin/views/users-1_0_0/retire", &json!({}))
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = rapi.deploy(wasm).await;
    assert!(s == 200 || s == 202, "{b}");
    rapi.wait_state("users-1_0_0", "active", WAIT).await;
    let v = rapi.view_status("users-1_0_0").await;
    assert_ne!(
        v["snapshot"]["state"], "bootstrapped",
        "a snapshot of the discarded history was applied: {v}"
    );
    assert_eq!(v["events_applied"], 13, "it replayed the restored log: {v}");
    let (s, b) = rapi
        .get("/views/users/user-101?position=13&wait_ms=5000")
        .await;
    assert_eq!(s, 200, "an event of the restored log is applied: {b}");
    let (s, b) = rapi.get("/views/users/user-15").await;
    assert_eq!(s, 404, "an event the restore discarded is not: {b}");
}
