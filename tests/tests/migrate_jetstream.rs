//! `kiln migrate --to-jetstream`: an embedded log (real RocksDB in a temp
//! dir) copied into a real nats-server's JetStream keeps every field
//! projections see, resumes where an interrupted run stopped without
//! duplicates, refuses a target holding anything but a prefix of the log,
//! and the `users` views a daemon rebuilds on the copy equal the embedded
//! ones byte for byte.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kiln::store::embedded::{EmbeddedConfig, EmbeddedStore, scan_log};
use kiln::store::jetstream::JetStreamStore;
use kiln::store::{AppendRequest, EventStore, ExpectedVersion, NewEvent, RecordedEvent, StreamId};
use kiln::views::{ViewId, ViewStore};
use kiln_tests::daemon::{Api, Daemon, Options, kiln_bin, projections_dir};
use kiln_tests::nats::{NatsServer, test_config};
use kiln_tests::wasm::USERS;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);
/// A commit time long before the test runs: a copy that took the server's
/// store time instead would be off by years.
const LONG_AGO: u64 = 1_600_000_000_000;

fn sid(s: &str) -> StreamId {
    StreamId::new(s).expect("valid stream id")
}

/// Fills `<data>/log` with `users` user streams interleaved: registrations,
/// renames, logins and failures, some in multi-event appends, with metadata,
/// tags and explicit old commit times on some. Returns the log.
async fn fill_embedded(data: &Path, users: u64, rounds: u64) -> Vec<RecordedEvent> {
    fill_embedded_with(data, users, rounds, true).await
}

/// [`fill_embedded`], with or without tags.
async fn fill_embedded_with(
    data: &Path,
    users: u64,
    rounds: u64,
    tagged: bool,
) -> Vec<RecordedEvent> {
    let tag = |e: NewEvent, t: String| if tagged { e.with_tags([t]) } else { e };
    let store = EmbeddedStore::open(EmbeddedConfig::new(data.join("log"))).expect("embedded");
    for u in 0..users {
        let ev = NewEvent::json(
            "UserRegistered",
            &json!({ "name": format!("user {u}"), "email": format!("u{u}@x") }),
        )
        .with_metadata("correlation-id", format!("reg-{u}"))
        .with_timestamp(LONG_AGO + u);
        let ev = tag(ev, format!("tenant:{}", u % 3));
        store
            .append(AppendRequest::new(
                sid(&format!("user-{u}")),
                ExpectedVersion::NoStream,
                vec![ev],
            ))
            .await
            .expect("register");
    }
    for r in 0..rounds {
        for u in 0..users {
            let stream = sid(&format!("user-{u}"));
            let events = match (r + u) % 4 {
                0 => vec![
                    NewEvent::json("UserLoggedIn", &json!({})).with_timestamp(LONG_AGO + r * 1000),
                    NewEvent::json("LoginFailed", &json!({})),
                ],
                1 => vec![
                    NewEvent::json("UserRenamed", &json!({ "name": format!("r{r}") }))
                        .with_metadata("by", "admin"),
                ],
                2 => vec![
                    tag(NewEvent::json("LoginFailed", &json!({})), "security".into()),
                    tag(NewEvent::json("LoginFailed", &json!({})), "security".into()),
                    NewEvent::json("UserLoggedIn", &json!({})),
                ],
                _ => vec![NewEvent::json("Audited", &json!({ "round": r }))],
            };
            store
                .append(AppendRequest::new(stream, ExpectedVersion::Any, events))
                .await
                .expect("append");
        }
    }
    let head = store.head().await.expect("head");
    let log = scan_log(&store, 1, 1_000_000).expect("scan");
    assert_eq!(log.len() as u64, head);
    log
}

fn migrate(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(kiln_bin())
        .arg("migrate")
        .args(args)
        .env("KILN_LOG", "warn")
        .output()
        .expect("running kiln migrate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn target(url: &str, stream: &str) -> JetStreamStore {
    let mut config = test_config(url);
    config.stream = stream.to_string();
    JetStreamStore::connect(config).await.expect("target")
}

/// Every event of `store`, from its tail, up to its head.
async fn whole_log(store: &dyn EventStore) -> Vec<RecordedEvent> {
    let head = store.head().await.expect("head");
    let mut out = Vec::new();
    if head == 0 {
        return out;
    }
    let mut tail = store.tail(1);
    while out.last().is_none_or(|e: &RecordedEvent| e.position < head) {
        let batch = tokio::time::timeout(Duration::from_secs(30), tail.next())
            .await
            .expect("the tail answers")
            .expect("the tail goes on")
            .expect("a batch");
        out.extend(batch);
    }
    out
}

/// The two logs hold the same events in the same order, field by field;
/// positions only increase (the target's are its own).
fn assert_same_events(source: &[RecordedEvent], copy: &[RecordedEvent]) {
    assert_eq!(source.len(), copy.len(), "event counts differ");
    let mut last = 0;
    for (i, (a, b)) in source.iter().zip(copy).enumerate() {
        assert!(b.position > last, "#{i}: positions go backwards");
        last = b.position;
        let strip = |e: &RecordedEvent| RecordedEvent {
            position: 0,
            ..e.clone()
        };
        assert_eq!(strip(a), strip(b), "event #{} differs", i + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_keeps_order_versions_ids_metadata_tags_and_timestamps() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let source = fill_embedded(&data, 12, 10).await;
    assert!(source.iter().any(|e| e.timestamp == LONG_AGO));
    let started = Instant::now();
    let (code, out, err) = migrate(&[
        "--to-jetstream",
        &nats.url(),
        "--data-dir",
        data.to_str().expect("utf-8 path"),
        "--nats-stream",
        "MIGRATED",
    ]);
    let took = started.elapsed();
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    let n = source.len();
    assert!(
        out.contains(&format!("migrated {n}/{n} events into stream 'MIGRATED'")),
        "{out}"
    );
    assert!(
        out.contains(&format!("({n} copied now, 0 already there)")),
        "{out}"
    );
    println!(
        "migrated {n} events in {took:?} ({:.0} events/s)",
        n as f64 / took.as_secs_f64()
    );

    let js = target(&nats.url(), "MIGRATED").await;
    let copy = whole_log(&js).await;
    assert_same_events(&source, &copy);
    // Per stream: versions, heads and read_stream agree.
    let embedded = EmbeddedStore::open(EmbeddedConfig::new(data.join("log"))).expect("reopen");
    for u in 0..12 {
        let s = sid(&format!("user-{u}"));
        let ours = embedded.read_stream(&s, 1, 10_000).await.expect("read");
        let theirs = js.read_stream(&s, 1, 10_000).await.expect("read");
        assert_same_events(&ours, &theirs);
        assert_eq!(
            embedded.latest_version(&s).await.expect("v"),
            js.latest_version(&s).await.expect("v"),
        );
    }
    // The copy takes appends where the original left off, OCC intact.
    let s = sid("user-0");
    let v = js.latest_version(&s).await.expect("v");
    let stale = js
        .append(AppendRequest::new(
            s.clone(),
            ExpectedVersion::Exact(v - 1),
            vec![NewEvent::json("UserLoggedIn", &json!({}))],
        ))
        .await;
    assert!(
        stale.is_err_and(|e| e.is_conflict()),
        "a stale version is refused"
    );
    let ok = js
        .append(AppendRequest::new(
            s,
            ExpectedVersion::Exact(v),
            vec![NewEvent::json("UserLoggedIn", &json!({}))],
        ))
        .await
        .expect("append after the copy");
    assert_eq!(ok.version, v + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_migration_resumes_without_duplicates() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let source = fill_embedded(&data, 8, 8).await;
    let n = source.len();
    let dir = data.to_str().expect("utf-8 path");
    let (code, out, err) = migrate(&[
        "--to-jetstream",
        &nats.url(),
        "--data-dir",
        dir,
        "--limit",
        "37",
    ]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(out.contains(&format!("migrated 37/{n} events")), "{out}");
    assert!(out.contains("stopped early"), "{out}");
    let js = target(&nats.url(), "KILN").await;
    assert_same_events(&source[..37], &whole_log(&js).await);

    let (code, out, err) = migrate(&["--to-jetstream", &nats.url(), "--data-dir", dir]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(err.contains("37 of them already there (verified)"), "{err}");
    assert!(
        out.contains(&format!(
            "migrated {n}/{n} events into stream 'KILN' ({} copied now, 37 already there)",
            n - 37
        )),
        "{out}"
    );
    assert_same_events(&source, &whole_log(&js).await);

    // Once more: nothing to do, nothing written twice.
    let head = js.head().await.expect("head");
    let (code, out, err) = migrate(&["--to-jetstream", &nats.url(), "--data-dir", dir]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(
        out.contains(&format!("(0 copied now, {n} already there)")),
        "{out}"
    );
    assert_eq!(js.head().await.expect("head"), head);
    let copy = whole_log(&js).await;
    let mut ids: Vec<_> = copy.iter().map(|e| e.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "no event was copied twice");
}

/// A run killed at a random moment (SIGKILL: an append may be stored and
/// never acknowledged) is finished by running the same command again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_migration_is_finished_by_running_it_again() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    // Tagged: atomic batches, slow enough to be killed in the middle.
    let source = fill_embedded(&data, 40, 30).await;
    let n = source.len();
    let dir = data.to_str().expect("utf-8 path");
    let mut child = Command::new(kiln_bin())
        .args(["migrate", "--to-jetstream", &nats.url(), "--data-dir", dir])
        .env("KILN_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("kiln migrate");
    let js = target(&nats.url(), "KILN").await;
    let deadline = Instant::now() + WAIT;
    while js.head().await.expect("head") < 100 {
        assert!(Instant::now() < deadline, "the copy did not start");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    // An atomic batch the killed process had sent in full may still be
    // committed by the server after it died: read the log once it stopped
    // growing (seen: 70 events read, 74 there when the rerun looked).
    let mut head = js.head().await.expect("head");
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = js.head().await.expect("head");
        if now == head {
            break;
        }
        head = now;
    }
    let partial = whole_log(&js).await;
    assert!(
        !partial.is_empty() && partial.len() < n,
        "killed in the middle: {} of {n}",
        partial.len()
    );
    assert_same_events(&source[..partial.len()], &partial);

    let (code, out, err) = migrate(&["--to-jetstream", &nats.url(), "--data-dir", dir]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(
        err.contains(&format!(
            "{} of them already there (verified)",
            partial.len()
        )),
        "{} events read after the kill; the rerun said: {err}",
        partial.len()
    );
    let copy = whole_log(&js).await;
    assert_same_events(&source, &copy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_holding_other_events_is_refused_naming_the_first_mismatch() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let source = fill_embedded(&data, 4, 3).await;
    let dir = data.to_str().expect("utf-8 path");

    // An unrelated log in the target stream.
    let js = target(&nats.url(), "OTHER").await;
    let foreign = NewEvent::json("OrderPlaced", &json!({}));
    let foreign_id = foreign.id;
    js.append(AppendRequest::new(
        sid("order-1"),
        ExpectedVersion::NoStream,
        vec![foreign],
    ))
    .await
    .expect("unrelated event");
    let head = js.head().await.expect("head");
    let (code, out, err) = migrate(&[
        "--to-jetstream",
        &nats.url(),
        "--data-dir",
        dir,
        "--nats-stream",
        "OTHER",
    ]);
    assert_ne!(code, 0, "refused: {out}");
    assert!(err.contains("already holds other events"), "{err}");
    assert!(err.contains("event #1"), "{err}");
    assert!(
        err.contains(&foreign_id.to_string()),
        "names the target's event: {err}"
    );
    assert!(
        err.contains(&source[0].id.to_string()),
        "names the source's event: {err}"
    );
    assert!(err.contains("the event id differs"), "{err}");
    assert_eq!(js.head().await.expect("head"), head, "nothing was written");

    // A true prefix, then one event of someone else's: refused at that event.
    let nats = NatsServer::start();
    let (code, out, err) = migrate(&[
        "--to-jetstream",
        &nats.url(),
        "--data-dir",
        dir,
        "--limit",
        "5",
    ]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    let kiln = target(&nats.url(), "KILN").await;
    let sixth = &source[5];
    let v = kiln.latest_version(&sixth.stream).await.expect("v");
    let intruder = NewEvent::json("UserLoggedIn", &json!({}));
    kiln.append(AppendRequest::new(
        sixth.stream.clone(),
        ExpectedVersion::Exact(v),
        vec![intruder.clone()],
    ))
    .await
    .expect("intruder");
    let (code, _, err) = migrate(&["--to-jetstream", &nats.url(), "--data-dir", dir]);
    assert_ne!(code, 0);
    assert!(err.contains("event #6"), "{err}");
    assert!(err.contains(&intruder.id.to_string()), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_in_use_or_missing_is_refused_with_the_reason() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let dir = data.to_str().expect("utf-8 path");
    let (code, _, err) = migrate(&["--to-jetstream", "nats://127.0.0.1:1", "--data-dir", dir]);
    assert_ne!(code, 0);
    assert!(err.contains("no embedded log at"), "{err}");
    let _ = fill_embedded(&data, 1, 1).await;
    let _held = EmbeddedStore::open(EmbeddedConfig::new(data.join("log"))).expect("open");
    let (code, _, err) = migrate(&["--to-jetstream", "nats://127.0.0.1:1", "--data-dir", dir]);
    assert_ne!(code, 0);
    assert!(err.contains("is in use by another process"), "{err}");
    assert!(err.contains("kiln serve"), "{err}");
}

/// Every document of `view` in the views database of `data_dir` (offline),
/// raw bytes.
fn documents(data_dir: &Path, view: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let views = ViewStore::open(data_dir.join("views")).expect("views db");
    let id: ViewId = view.parse().expect("view id");
    views.scan(&id, b"", None, 1_000_000).expect("scan")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_rebuilt_on_the_migrated_log_equal_the_embedded_ones_byte_for_byte() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let source = fill_embedded(&data, 40, 12).await;
    let projections = projections_dir(&[USERS]);

    let mut embedded = Daemon::start_with(Options {
        data_dir: Some(data.clone()),
        ..Options::default().projections(projections.path())
    });
    let api = Api::new(&embedded);
    let v = api.wait_state("users-1_0_0", "active", WAIT).await;
    assert_eq!(v["checkpoint"], json!(source.len()), "{v}");
    embedded.stop();
    let ours = documents(&data, "users-1_0_0");
    assert_eq!(ours.len(), 40);

    let (code, out, err) = migrate(&[
        "--to-jetstream",
        &nats.url(),
        "--data-dir",
        data.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");

    let js_data = tmp.path().join("js-data");
    let mut on_js = Daemon::start_with(Options {
        data_dir: Some(js_data.clone()),
        ..Options::default()
            .projections(projections.path())
            .jetstream(&nats.url())
    });
    let api = Api::new(&on_js);
    let v = api.wait_state("users-1_0_0", "active", WAIT).await;
    let js = target(&nats.url(), "KILN").await;
    assert_eq!(
        v["checkpoint"],
        json!(js.head().await.expect("head")),
        "{v}"
    );
    on_js.stop();
    let theirs = documents(&js_data, "users-1_0_0");
    assert_eq!(ours.len(), theirs.len());
    for ((ka, da), (kb, db)) in ours.iter().zip(&theirs) {
        assert_eq!(
            (String::from_utf8_lossy(ka), String::from_utf8_lossy(da)),
            (String::from_utf8_lossy(kb), String::from_utf8_lossy(db))
        );
    }
    assert_eq!(ours, theirs);
    // Registration times are the embedded log's, not the copy's.
    let doc: serde_json::Value = serde_json::from_slice(&theirs[0].1).expect("json doc");
    assert!(
        doc["registered_at"]
            .as_u64()
            .is_some_and(|t| t < LONG_AGO + 1000),
        "{doc}"
    );
}

/// The migration rate on this machine: logs of 200 streams, 7 200 events
/// (runs of one to three events per stream), with tags on a third of the
/// events and without any, copied into a local nats-server.
/// `cargo test --release -p kiln-tests --test migrate_jetstream migration_rate -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn migration_rate() {
    for tagged in [false, true] {
        let nats = NatsServer::start();
        let tmp = tempfile::tempdir().expect("tmp");
        let data = tmp.path().join("data");
        let source = fill_embedded_with(&data, 200, 20, tagged).await;
        let started = Instant::now();
        let (code, out, err) = migrate(&[
            "--to-jetstream",
            &nats.url(),
            "--data-dir",
            data.to_str().expect("utf-8"),
        ]);
        let took = started.elapsed();
        assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
        println!(
            "tags: {tagged}: {} events in {took:?}, process start and connect included: \
             {:.0} events/s\n{out}",
            source.len(),
            source.len() as f64 / took.as_secs_f64()
        );
    }
}
