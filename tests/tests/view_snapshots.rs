//! View snapshots (issue 11): real `kiln serve` processes, real RocksDB,
//! real wasmtime running `projections/users`, a real nats-server.
//!
//! - Three instances on one JetStream log deploy a new version at once: one
//!   replays the log, publishes its snapshot to the object store, the other
//!   two bootstrap from it (the log is replayed once in all), and every
//!   instance's documents equal a clean rebuild's, also after the log grows.
//! - On the embedded store with a snapshot directory: a version built again
//!   bootstraps from its snapshot; a tampered snapshot is refused with the
//!   reason and the version replays to the same documents; another log never
//!   uses this log's snapshots.
//! - Three instances on one JetStream log sharing a snapshot directory: its
//!   file lease lets one build, and the next publisher sweeps a stray upload.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_tests::daemon::{Api, Daemon, Options, kiln_cli, module_version};
use kiln_tests::nats::NatsServer;
use kiln_tests::wasm::USERS;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);

/// Appends `streams` users, each registered with `i % 4` failed logins and a
/// login: `streams * (2 + i % 4)` events in all. Returns the last position.
async fn append_users(api: &Api, from: usize, streams: usize) -> u64 {
    let mut last = 0;
    for i in from..from + streams {
        let mut events = vec![json!({
            "type": "UserRegistered",
            "data": { "name": format!("user {i}"), "email": format!("u{i}@x") }
        })];
        for _ in 0..i % 4 {
            events.push(json!({ "type": "LoginFailed", "data": {} }));
        }
        events.push(json!({ "type": "UserLoggedIn", "data": {} }));
        let (s, b) = api
            .post_json(
                &format!("/streams/user-{i}/events"),
                &json!({ "events": events }),
            )
            .await;
        assert_eq!(s, 200, "{b}");
        last = b["position"].as_u64().expect("position");
    }
    last
}

/// Every document of `view`, in key order, read once `view` has applied
/// `position` (read-your-writes).
async fn documents(api: &Api, view: &str, position: u64) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut path = format!("/views/{view}?limit=1000&position={position}&wait_ms=5000");
        if let Some(a) = &after {
            path.push_str(&format!("&after={a}"));
        }
        let (s, b) = api.get(&path).await;
        assert_eq!(s, 200, "{path}: {b}");
        for item in b["items"].as_array().expect("items") {
            out.push((
                item["key"].as_str().expect("key").to_string(),
                item["doc"].clone(),
            ));
        }
        match b["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => return out,
        }
    }
}

async fn wait_snapshots(api: &Api, at_least: u64) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (s, b) = api.get("/admin/snapshots").await;
        assert_eq!(s, 200, "{b}");
        let all = b["snapshots"].as_array().cloned().unwrap_or_default();
        if all
            .iter()
            .any(|m| m["position"].as_u64().unwrap_or(0) >= at_least)
        {
            return all;
        }
        assert!(
            Instant::now() < deadline,
            "no snapshot at {at_least} or later within {WAIT:?}: {b}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in the metrics:\n{text}"))
}

async fn metrics(api: &Api) -> String {
    let res = api
        .http
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .expect("metrics");
    res.text().await.expect("metrics text")
}

/// Deploys `wasm` (users 1.0.0) to every instance at once and checks that
/// exactly one replayed the log (to `head`) and the others bootstrapped
/// from its snapshot, applying nothing.
async fn one_builder(apis: &[Api], wasm: &[u8], head: u64) {
    let deploys = futures::future::join_all(apis.iter().map(|a| a.deploy(wasm.to_vec()))).await;
    for (s, b) in &deploys {
        assert!(*s == 200 || *s == 202, "{b}");
    }
    for api in apis {
        api.wait_state("users-1_0_0", "active", WAIT).await;
    }
    let mut applied = Vec::new();
    let mut builders = 0;
    for api in apis {
        let v = api.view_status("users-1_0_0").await;
        let n = v["events_applied"].as_u64().expect("events_applied");
        applied.push(n);
        match v["snapshot"]["state"].as_str() {
            Some("bootstrapped") => {
                assert_eq!(v["snapshot"]["position"], head, "{v}");
                assert_eq!(n, 0, "a bootstrapped instance replayed events: {v}");
            }
            Some("building") => {
                builders += 1;
                assert_eq!(n, head, "the builder replayed the whole log: {v}");
            }
            other => panic!("unexpected snapshot state {other:?}: {v}"),
        }
    }
    println!("events applied per instance: {applied:?} (log head {head})");
    assert_eq!(builders, 1, "one instance replays the log: {applied:?}");
    assert_eq!(applied.iter().sum::<u64>(), head, "{applied:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_on_one_log_replay_it_once_and_agree_with_a_clean_rebuild() {
    let nats = NatsServer::start();
    let with_snapshots = || {
        Options::default()
            .jetstream(&nats.url())
            .arg("--snapshot-bucket")
            .arg("KILN_VIEWS")
    };
    let daemons: Vec<Daemon> = (0..3)
        .map(|_| Daemon::start_with(with_snapshots()))
        .collect();
    let apis: Vec<Api> = daemons.iter().map(Api::new).collect();
    let head = append_users(&apis[0], 0, 400).await;
    assert!(head >= 1000, "{head}");

    // The same new version to all three at once.
    let wasm = module_version(USERS, "1.0.0", None);
    one_builder(&apis, &wasm, head).await;

    // A clean rebuild on the same log, without snapshots.
    let clean = Daemon::start_with(Options::default().jetstream(&nats.url()));
    let clean_api = Api::new(&clean);
    let (s, b) = clean_api.deploy(wasm.clone()).await;
    assert!(s == 200 || s == 202, "{b}");
    clean_api.wait_state("users-1_0_0", "active", WAIT).await;
    let expected = documents(&clean_api, "users-1_0_0", head).await;
    assert_eq!(expected.len(), 400);
    for api in &apis {
        assert_eq!(documents(api, "users-1_0_0", head).await, expected);
    }

    // The log grows: bootstrapped instances tail from the snapshot on.
    let head = append_users(&apis[1], 400, 50).await;
    let expected = documents(&clean_api, "users-1_0_0", head).await;
    assert_eq!(expected.len(), 450);
    for api in &apis {
        assert_eq!(documents(api, "users-1_0_0", head).await, expected);
    }
    let published: f64 = {
        let mut n = 0.0;
        for api in &apis {
            n += metric(&metrics(api).await, "kiln_snapshot_published_total");
        }
        n
    };
    assert_eq!(published, 1.0, "one instance published");

    // What a publisher killed mid-upload leaves (files, no manifest) is
    // removed by the next publisher of that key.
    let (_, b) = apis[0].get("/admin/snapshots").await;
    let m = &b["snapshots"][0];
    let key = kiln::snapshots::snapshot_key(
        m["log"].as_str().expect("log"),
        m["fingerprint"].as_str().expect("fingerprint"),
    );
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
    let bucket = js.get_object_store("KILN_VIEWS").await.expect("bucket");
    let stray = format!("{key}/{:020}/docs-0000.sst", 1);
    bucket
        .put(stray.as_str(), &mut &b"not a finished snapshot"[..])
        .await
        .expect("stray object");
    let (s, body) = apis[2]
        .post_json("/admin/views/users-1_0_0/snapshot", &json!({}))
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["snapshot"]["position"], head, "{body}");
    let mut names = Vec::new();
    let mut list = bucket.list().await.expect("list");
    while let Some(info) = futures::StreamExt::next(&mut list).await {
        let info = info.expect("object");
        if !info.deleted {
            names.push(info.name);
        }
    }
    assert!(!names.contains(&stray), "{names:?}");
    assert!(
        names
            .iter()
            .any(|n| n.ends_with(&format!("{head:020}/manifest.json"))),
        "{names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_sharing_a_snapshot_directory_take_its_file_lease() {
    // A volume the three mount: the directory store's lease (O_EXCL files)
    // lets one build; a stray upload there is swept by the next publisher.
    let nats = NatsServer::start();
    let shared = tempfile::tempdir().expect("tempdir");
    let daemons: Vec<Daemon> = (0..3)
        .map(|_| {
            Daemon::start_with(
                Options::default()
                    .jetstream(&nats.url())
                    .arg("--snapshot-dir")
                    .arg(shared.path().to_str().expect("utf-8 path")),
            )
        })
        .collect();
    let apis: Vec<Api> = daemons.iter().map(Api::new).collect();
    let head = append_users(&apis[0], 0, 300).await;
    let wasm = module_version(USERS, "1.0.0", None);
    one_builder(&apis, &wasm, head).await;
    let built = documents(&apis[0], "users-1_0_0", head).await;
    assert_eq!(built.len(), 300);
    for api in &apis[1..] {
        assert_eq!(documents(api, "users-1_0_0", head).await, built);
    }
    let key_dir = newest_snapshot(shared.path())
        .parent()
        .expect("key dir")
        .to_path_buf();
    let stray = key_dir.join(format!("{:020}", 1));
    std::fs::create_dir_all(&stray).expect("stray dir");
    std::fs::write(stray.join("docs-0000.sst"), b"not a finished snapshot").expect("stray");
    let head = append_users(&apis[1], 300, 10).await;
    let (s, body) = apis[2]
        .post_json("/admin/views/users-1_0_0/snapshot", &json!({}))
        .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["snapshot"]["position"], head, "{body}");
    assert!(!stray.exists(), "the stray upload was swept");
    assert!(key_dir.join(".lease").is_dir());
}

/// The newest snapshot directory under `root` (`<key>/<position>`).
fn newest_snapshot(root: &Path) -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir(root)
        .expect("snapshot dir")
        .flatten()
        .flat_map(|k| std::fs::read_dir(k.path()).expect("key dir").flatten())
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n != ".lease"))
        .collect();
    found.sort();
    found.pop().expect("a snapshot")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_version_built_again_bootstraps_and_a_tampered_snapshot_is_refused() {
    let snapshots = tempfile::tempdir().expect("tempdir");
    let dir = snapshots.path().to_str().expect("utf-8").to_string();
    let d = Daemon::start_with(Options::default().arg("--snapshot-dir").arg(&dir));
    let api = Api::new(&d);
    let head = append_users(&api, 0, 300).await;
    let wasm = module_version(USERS, "1.0.0", None);
    let (s, b) = api.deploy(wasm.clone()).await;
    assert_eq!(s, 202, "{b}");
    api.wait_state("users-1_0_0", "active", WAIT).await;
    // Published once caught up: the warm-up ran here.
    let all = wait_snapshots(&api, head).await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["position"], head);
    assert_eq!(all[0]["documents"], 300);
    let built = documents(&api, "users-1_0_0", head).await;

    // Built again (retired, deployed anew): from the snapshot, nothing replayed.
    let (s, b) = api
        .post_json("/admin/views/users-1_0_0/retire", &json!({}))
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = api.deploy(wasm.clone()).await;
    assert!(s == 200 || s == 202, "{b}");
    api.wait_state("users-1_0_0", "active", WAIT).await;
    let v = api.view_status("users-1_0_0").await;
    assert_eq!(v["snapshot"]["state"], "bootstrapped", "{v}");
    assert_eq!(v["snapshot"]["position"], head, "{v}");
    assert_eq!(v["events_applied"], 0, "{v}");
    assert_eq!(documents(&api, "users-1_0_0", head).await, built);

    // The log grows; `kiln snapshot` publishes at the new position. A bare
    // name takes the version it serves.
    let head = append_users(&api, 300, 40).await;
    let (code, out, err) = kiln_cli(&d, &["snapshot", "users"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("users-1_0_0 at position {head}")),
        "{out}"
    );
    let built = documents(&api, "users-1_0_0", head).await;
    assert_eq!(built.len(), 340);

    // One byte of the newest snapshot's documents changed on disk.
    let newest = newest_snapshot(snapshots.path());
    assert!(
        newest.ends_with(format!("{head:020}")),
        "{}",
        newest.display()
    );
    let sst = newest.join("docs-0000.sst");
    let mut bytes = std::fs::read(&sst).expect("sst");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&sst, bytes).expect("tamper");
    let (s, b) = api
        .post_json("/admin/views/users-1_0_0/retire", &json!({}))
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = api.deploy(wasm.clone()).await;
    assert!(s == 200 || s == 202, "{b}");
    api.wait_state("users-1_0_0", "active", WAIT).await;
    let v = api.view_status("users-1_0_0").await;
    assert_eq!(v["snapshot"]["state"], "refused", "{v}");
    let reason = v["snapshot"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("docs-0000.sst") && reason.contains("blake3"),
        "{reason}"
    );
    assert_eq!(v["events_applied"], head, "it replayed: {v}");
    assert_eq!(documents(&api, "users-1_0_0", head).await, built);
    let m = metrics(&api).await;
    assert_eq!(metric(&m, "kiln_snapshot_bootstraps_total"), 1.0);
    assert_eq!(metric(&m, "kiln_snapshot_refused_total"), 1.0);
    // The refused snapshot was removed and the replay published a good one
    // at the same position: the next build bootstraps again (regression:
    // the bad one stayed newest, refusing every later build).
    wait_snapshots(&api, head).await;
    let (s, b) = api
        .post_json("/admin/views/users-1_0_0/retire", &json!({}))
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = api.deploy(wasm.clone()).await;
    assert!(s == 200 || s == 202, "{b}");
    api.wait_state("users-1_0_0", "active", WAIT).await;
    let v = api.view_status("users-1_0_0").await;
    assert_eq!(v["snapshot"]["state"], "bootstrapped", "{v}");
    assert_eq!(v["events_applied"], 0, "{v}");
    assert_eq!(documents(&api, "users-1_0_0", head).await, built);

    // Another log (another data directory) never uses this log's snapshots.
    let other = Daemon::start_with(Options::default().arg("--snapshot-dir").arg(&dir));
    let other_api = Api::new(&other);
    let other_head = append_users(&other_api, 0, 20).await;
    let (s, b) = other_api.deploy(wasm).await;
    assert_eq!(s, 202, "{b}");
    other_api.wait_state("users-1_0_0", "active", WAIT).await;
    let v = other_api.view_status("users-1_0_0").await;
    assert_eq!(v["snapshot"]["state"], "building", "{v}");
    assert_eq!(v["events_applied"], other_head, "{v}");
    assert_eq!(
        documents(&other_api, "users-1_0_0", other_head).await.len(),
        20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_log_gives_no_snapshot() {
    let snapshots = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start_with(
        Options::default()
            .arg("--snapshot-dir")
            .arg(snapshots.path().to_str().expect("utf-8")),
    );
    let api = Api::new(&d);
    let (s, b) = api.deploy(module_version(USERS, "1.0.0", None)).await;
    assert_eq!(s, 202, "{b}");
    api.wait_state("users-1_0_0", "active", WAIT).await;
    let (s, b) = api
        .post_json("/admin/views/users-1_0_0/snapshot", &json!({}))
        .await;
    assert_eq!(s, 409, "{b}");
    assert_eq!(b["error"]["code"], "nothing_to_snapshot", "{b}");
    // Nor did the warm-up publish one when it was caught up.
    let (s, b) = api.get("/admin/snapshots").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["snapshots"], json!([]), "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_off_and_not_ready_versions_are_refused_by_name() {
    let d = Daemon::start();
    let api = Api::new(&d);
    let (s, b) = api
        .post_json("/admin/views/users-1_0_0/snapshot", &json!({}))
        .await;
    assert_eq!(s, 404, "{b}");
    assert_eq!(b["error"]["code"], "snapshots_off", "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("--snapshot-dir"),
        "{b}"
    );
}

/// A config file holding `text`.
fn config_file(text: &str) -> tempfile::NamedTempFile {
    let config = tempfile::NamedTempFile::new().expect("config file");
    std::fs::write(config.path(), text).expect("config");
    config
}

/// A slowly warming daemon on `nats` with the config file `config`.
fn slow_warming_with(nats: &NatsServer, config: &tempfile::NamedTempFile) -> Options {
    kiln_tests::daemon::slow_warming_options()
        .jetstream(&nats.url())
        .arg("--config")
        .arg(config.path().to_str().expect("utf-8"))
}

async fn wait_snapshot_state(api: &Api, id: &str, state: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = api.view_status(id).await;
        if v["snapshot"]["state"] == state {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{id}'s snapshot state did not become {state} within {WAIT:?}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_builder_killed_mid_warm_up_lets_a_waiting_instance_take_over_within_the_lease() {
    let nats = NatsServer::start();
    let config = config_file("[snapshots]\nbucket = \"KILN_VIEWS\"\nlease_ttl_secs = 3\n");
    let options = || slow_warming_with(&nats, &config);
    let mut a = Daemon::start_with(options());
    let b = Daemon::start_with(options());
    let (api_a, api_b) = (Api::new(&a), Api::new(&b));
    // A warms for at least 10 s (each Spin costs the 1 s batch deadline).
    let id = kiln_tests::daemon::deploy_slow_warming_chaos(&api_a, 10).await;
    wait_snapshot_state(&api_a, &id, "building").await;
    let wasm = std::fs::read(kiln_tests::wasm::CHAOS).expect("chaos module");
    let (s, body) = api_b.deploy(wasm.clone()).await;
    assert_eq!(s, 202, "{body}");
    let v = wait_snapshot_state(&api_b, &id, "waiting").await;
    assert!(v["snapshot"]["holder"].is_string(), "{v}");
    assert_eq!(v["events_applied"], 0, "B waits, it does not replay: {v}");
    // The builder dies without letting go: its lease lapses within its TTL.
    let killed = Instant::now();
    a.kill9();
    wait_snapshot_state(&api_b, &id, "building").await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(10), "took over after {took:?}");
    api_b.wait_state(&id, "active", WAIT).await;
    // B published, dead letters included; a third instance bootstraps from it.
    let all = wait_snapshots(&api_b, 1).await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["parked"], 10, "{all:?}");
    let c = Daemon::start_with(options());
    let api_c = Api::new(&c);
    let (s, body) = api_c.deploy(wasm).await;
    assert_eq!(s, 202, "{body}");
    api_c.wait_state(&id, "active", WAIT).await;
    let v = api_c.view_status(&id).await;
    assert_eq!(v["snapshot"]["state"], "bootstrapped", "{v}");
    assert_eq!(v["parked"], 10, "{v}");
    let (s, parked) = api_c.get(&format!("/admin/views/{id}/parked")).await;
    assert_eq!(s, 200, "{parked}");
    let (_, parked_b) = api_b.get(&format!("/admin/views/{id}/parked")).await;
    assert_eq!(parked["parked"], parked_b["parked"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pod_replaced_under_its_name_takes_its_own_lease_at_once() {
    // A StatefulSet pod rescheduled on a fresh disk keeps its name: the
    // lease its killed predecessor held (default TTL, 30 s) is its own.
    let nats = NatsServer::start();
    let config = config_file("[snapshots]\nbucket = \"KILN_VIEWS\"\ninstance = \"kiln-0\"\n");
    let options = || slow_warming_with(&nats, &config);
    let mut first = Daemon::start_with(options());
    let id = kiln_tests::daemon::deploy_slow_warming_chaos(&Api::new(&first), 10).await;
    wait_snapshot_state(&Api::new(&first), &id, "building").await;
    first.kill9();
    let replaced = Daemon::start_with(options());
    let api = Api::new(&replaced);
    let wasm = std::fs::read(kiln_tests::wasm::CHAOS).expect("chaos module");
    let deployed = Instant::now();
    let (s, body) = api.deploy(wasm).await;
    assert_eq!(s, 202, "{body}");
    let v = wait_snapshot_state(&api, &id, "building").await;
    let took = deployed.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "waited {took:?} for its own lease: {v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_snapshots_follow_the_log_and_keep_the_newest() {
    let snapshots = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start_with(
        Options::default()
            .arg("--snapshot-dir")
            .arg(snapshots.path().to_str().expect("utf-8"))
            .arg("--snapshot-every")
            .arg("100 events"),
    );
    let api = Api::new(&d);
    let (s, b) = api.deploy(module_version(USERS, "1.0.0", None)).await;
    assert_eq!(s, 202, "{b}");
    api.wait_state("users-1_0_0", "active", WAIT).await;
    // A check every 2 s may land mid-round: a snapshot is then at some
    // position at least 100 past the last, and once the log is quiet the
    // newest is less than 100 behind its head.
    let mut newest = 0;
    for round in 0..5 {
        // About 140 events a round: past the interval each time.
        let head = append_users(&api, round * 40, 40).await;
        wait_snapshots(&api, head.saturating_sub(99)).await;
        let deadline = Instant::now() + WAIT;
        loop {
            let (_, b) = api.get("/admin/snapshots").await;
            let positions: Vec<u64> = b["snapshots"]
                .as_array()
                .expect("snapshots")
                .iter()
                .filter_map(|m| m["position"].as_u64())
                .collect();
            // Older ones are pruned once the new one is stored.
            if positions.len() <= 3 && positions.first().is_some_and(|p| head - p < 100) {
                assert!(
                    positions.windows(2).all(|w| w[0] >= w[1] + 100),
                    "{positions:?}"
                );
                assert!(
                    positions[0] > newest,
                    "no new snapshot in round {round}: {positions:?}"
                );
                newest = positions[0];
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: {positions:?}, head {head}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let v = api.view_status("users-1_0_0").await;
    assert_eq!(v["last_snapshot"], newest, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_builder_that_stops_building_lets_go_of_its_lease_at_once() {
    let nats = NatsServer::start();
    // The default lease TTL (30 s): only a release explains a quick take-over.
    let options = || {
        kiln_tests::daemon::slow_warming_options()
            .jetstream(&nats.url())
            .arg("--snapshot-bucket")
            .arg("KILN_VIEWS")
    };
    let a = Daemon::start_with(options());
    let b = Daemon::start_with(options());
    let (api_a, api_b) = (Api::new(&a), Api::new(&b));
    let id = kiln_tests::daemon::deploy_slow_warming_chaos(&api_a, 20).await;
    wait_snapshot_state(&api_a, &id, "building").await;
    let wasm = std::fs::read(kiln_tests::wasm::CHAOS).expect("chaos module");
    let (s, body) = api_b.deploy(wasm).await;
    assert_eq!(s, 202, "{body}");
    wait_snapshot_state(&api_b, &id, "waiting").await;
    // A's operator retires the warming version: A builds it no more.
    let retired = Instant::now();
    let (s, body) = api_a
        .post_json(&format!("/admin/views/{id}/retire"), &json!({}))
        .await;
    assert_eq!(s, 200, "{body}");
    wait_snapshot_state(&api_b, &id, "building").await;
    let took = retired.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "B took over after {took:?}: the lease was not let go"
    );
}

/// Regression (issue 25, found by reading): a snapshot whose files match
/// its manifest but that RocksDB cannot ingest (here a corrupt publisher's
/// empty SST file, its size and blake3 in the manifest) was taken for a
/// fault of this host: the worker paused and tried the same snapshot again
/// forever, the version ready nowhere. It is refused, removed, and the
/// version replays to the same documents and publishes a good one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_rocksdb_cannot_ingest_is_refused_and_the_version_replays() {
    let snapshots = tempfile::tempdir().expect("tempdir");
    let dir = snapshots.path().to_str().expect("utf-8").to_string();
    let d = Daemon::start_with(Options::default().arg("--snapshot-dir").arg(&dir));
    let api = Api::new(&d);
    let head = append_users(&api, 0, 50).await;
    let wasm = module_version(USERS, "1.0.0", None);
    let (s, b) = api.deploy(wasm.clone()).await;
    assert_eq!(s, 202, "{b}");
    api.wait_state("users-1_0_0", "active", WAIT).await;
    wait_snapshots(&api, head).await;
    let built = documents(&api, "users-1_0_0", head).await;

    // The SST replaced by an empty file, and the manifest says so.
    let newest = newest_snapshot(snapshots.path());
    let manifest_path = newest.join("manifest.json");
    let mut manifest: Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).expect("manifest")).expect("json");
    let files = manifest["files"].as_array().expect("files").clone();
    let empty = files
        .iter()
        .find(|f| f["name"] == "parked.bin" && f["size"] == 0)
        .cloned()
        .expect("an empty dead-letter file");
    for f in manifest["files"].as_array_mut().expect("files") {
        if f["name"] == "docs-0000.sst" {
            f["size"] = empty["size"].clone();
            f["blake3"] = empty["blake3"].clone();
        }
    }
    std::fs::write(newest.join("docs-0000.sst"), b"").expect("empty sst");
    std::fs::write(
        &manifest_path,
        serde_json::to_vec(&manifest).expect("manifest json"),
    )
    .expect("manifest");

    let (s, b) = api
        .post_json("/admin/views/users-1_0_0/retire", &json!({}))
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = api.deploy(wasm).await;
    assert!(s == 200 || s == 202, "{b}");
    let v = api
        .wait_state("users-1_0_0", "active", Duration::from_secs(30))
        .await;
    assert_eq!(v["snapshot"]["state"], "refused", "{v}");
    let reason = v["snapshot"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("ingest"), "{reason}");
    assert_eq!(v["events_applied"], head, "it replayed: {v}");
    assert_eq!(documents(&api, "users-1_0_0", head).await, built);
    // Removed, and a good one published again at the same position.
    let all = wait_snapshots(&api, head).await;
    let docs = newest_snapshot(snapshots.path()).join("docs-0000.sst");
    assert!(
        std::fs::metadata(&docs).is_ok_and(|m| m.len() > 0),
        "{all:?}"
    );
}

/// The `max_age` of the lease bucket of object store bucket `bucket`, read
/// from the server.
async fn lease_bucket_max_age(js: &async_nats::jetstream::Context, bucket: &str) -> Duration {
    js.get_key_value(format!("{bucket}_LEASES"))
        .await
        .expect("the lease bucket")
        .status()
        .await
        .expect("its status")
        .info
        .config
        .max_age
}

/// Regression (issue 25, found by reading): the lease bucket's `max_age`
/// (a lease's time to live) was fixed when the bucket was made, so raising
/// `lease_ttl_secs` later made every lease lapse long before its holder's
/// first refresh (a third of the new TTL): two instances built at once.
/// Opening the store raises it; a shorter TTL never lowers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_the_lease_ttl_raises_the_lease_buckets_max_age() {
    use kiln::snapshots::object::ObjectStore;
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    // (TTL the store opens with, the bucket's max_age then): made at 2 s,
    // raised to 30 s; a shorter TTL never lowers it (an instance with the
    // longer one may share the bucket).
    for (ttl, max_age) in [(2, 2), (30, 30), (10, 30)] {
        ObjectStore::open(&js, "KILN_VIEWS", 1, Duration::from_secs(ttl))
            .await
            .expect("open");
        assert_eq!(
            lease_bucket_max_age(&js, "KILN_VIEWS").await,
            Duration::from_secs(max_age),
            "opened with a TTL of {ttl} s"
        );
    }
}

/// Issue 25, item 10: an upload cut short left its chunks under a chunk
/// subject no object names; nothing listed them, and they stayed forever.
/// A sweep purges such chunks once they have not grown for a lease TTL
/// since an earlier sweep saw them; an upload still sending chunks, and
/// every whole file, stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chunks_of_an_upload_cut_short_are_purged_and_nothing_else() {
    use kiln::snapshots::SnapshotStore;
    use kiln::snapshots::object::ObjectStore;
    use std::sync::atomic::AtomicU64;
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let ttl = Duration::from_millis(600);
    let store = ObjectStore::open(&js, "KILN_VIEWS", 1, ttl)
        .await
        .expect("open");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("a.sst");
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &bytes).expect("file");
    store.put("k/1/a.sst", &file).await.expect("put");
    // What `put` sends before its object info: chunks under a new subject.
    let chunk = |subject: &'static str| {
        let js = js.clone();
        async move {
            js.publish(subject, vec![7u8; 1024].into())
                .await
                .expect("publish")
                .await
                .expect("ack");
        }
    };
    for _ in 0..3 {
        chunk("$O.KILN_VIEWS.C.cutshort").await;
    }
    chunk("$O.KILN_VIEWS.C.underway").await;
    assert_eq!(store.sweep_chunks().await.expect("sweep"), 0, "first seen");
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    chunk("$O.KILN_VIEWS.C.underway").await;
    assert_eq!(
        store.sweep_chunks().await.expect("sweep"),
        3,
        "the upload cut short, and only it"
    );
    let back = dir.path().join("back.sst");
    store
        .get("k/1/a.sst", &back, &AtomicU64::new(0))
        .await
        .expect("get");
    assert_eq!(std::fs::read(&back).expect("read"), bytes, "the whole file");
    // The other stops growing: a TTL later it goes too.
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    assert_eq!(store.sweep_chunks().await.expect("sweep"), 2);
    assert_eq!(store.sweep_chunks().await.expect("sweep"), 0);
    store
        .get("k/1/a.sst", &back, &AtomicU64::new(0))
        .await
        .expect("get after the sweeps");
}

/// Regression (issue 25, found by reading): a directory lease file's time,
/// set by its holder's clock, was compared with the reader's: a holder whose
/// clock is behind lost its lease while alive (two builders at once), one
/// whose clock is ahead held it long after it died. A lease is judged by
/// whether its file changes, on the reader's own clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_lease_is_judged_by_its_changes_never_by_comparing_clocks() {
    use kiln::snapshots::dir::DirStore;
    use kiln::snapshots::{Lease, SnapshotStore};
    use std::time::SystemTime;
    let dir = tempfile::tempdir().expect("tempdir");
    let ttl = Duration::from_millis(300);
    let b = DirStore::open(dir.path(), ttl).expect("b");
    let holder = |l: Lease| match l {
        Lease::Held(_) => panic!("taken, but its holder is alive"),
        Lease::HeldBy(by) => by,
    };
    // A lease file as a holder on another machine writes it (generation 1).
    let lease_file = |key: &str, by: &str, at: SystemTime| {
        let d = dir.path().join(key).join(".lease");
        std::fs::create_dir_all(&d).expect("lease dir");
        let path = d.join("1");
        std::fs::write(&path, by).expect("lease file");
        let touch = move |at: SystemTime| {
            std::fs::File::options()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_modified(at))
                .expect("touch")
        };
        touch(at);
        touch
    };
    // Alive, its clock an hour behind: refreshed (touched) every third of
    // the TTL, it stays a's for longer than the TTL.
    let behind = SystemTime::now() - Duration::from_secs(3600);
    let touch = lease_file("k", "a", behind);
    for i in 1..=6u64 {
        assert_eq!(
            holder(b.lease("k", "b").await.expect("b")),
            "a",
            "refresh {i}"
        );
        tokio::time::sleep(ttl / 3).await;
        touch(behind + Duration::from_millis(100 * i));
    }
    // It dies: lapsed a TTL after its last touch, by b's clock.
    let died = Instant::now();
    let taken = loop {
        if let Lease::Held(h) = b.lease("k", "b").await.expect("b") {
            break h;
        }
        assert!(
            died.elapsed() < ttl * 10,
            "a dead holder's lease never lapsed"
        );
        tokio::time::sleep(ttl / 10).await;
    };
    assert!(
        died.elapsed() >= ttl,
        "taken {:?} after its last refresh",
        died.elapsed()
    );
    taken.release().await;
    // Dead, its clock an hour ahead: lapsed a TTL after b first saw it.
    let _dead = lease_file("k2", "c", SystemTime::now() + Duration::from_secs(3600));
    assert_eq!(holder(b.lease("k2", "b").await.expect("b")), "c");
    let seen = Instant::now();
    loop {
        if let Lease::Held(h) = b.lease("k2", "b").await.expect("b") {
            h.release().await;
            break;
        }
        assert!(
            seen.elapsed() < ttl * 10,
            "a lease stamped an hour ahead never lapsed"
        );
        tokio::time::sleep(ttl / 10).await;
    }
}

/// Issue 32: a version deployed on an empty log, snapshots on, is caught up
/// having applied nothing: nothing is published and nothing is being built,
/// so its status stops saying `building` (it said so for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_caught_up_on_an_empty_log_is_not_shown_building() {
    let snapshots = tempfile::tempdir().expect("tempdir");
    let dir = snapshots.path().to_str().expect("utf-8").to_string();
    let d = Daemon::start_with(Options::default().arg("--snapshot-dir").arg(&dir));
    let api = Api::new(&d);
    let (s, b) = api.deploy(module_version(USERS, "1.0.0", None)).await;
    assert_eq!(s, 202, "{b}");
    api.wait_state("users-1_0_0", "active", WAIT).await;
    // The caught-up publish runs in the background.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = api.view_status("users-1_0_0").await;
        if v["snapshot"].is_null() {
            assert_eq!(v["checkpoint"], 0, "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (s, all) = api.get("/admin/snapshots").await;
    assert_eq!((s, &all["snapshots"]), (200, &json!([])), "{all}");
}

/// Regression (issue 25, item 4): a builder whose snapshot lease lapsed in
/// an outage of NATS longer than the lease's TTL went on warming, caught up
/// and never published, though nobody else was building: every later
/// instance replayed too. It publishes when no one else has.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_builder_that_lost_its_lease_in_an_outage_still_publishes() {
    let nats = NatsServer::start();
    let proxy =
        kiln_tests::proxy::Proxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], nats.port())))
            .expect("a proxy to nats-server");
    let config = config_file("[snapshots]\nbucket = \"KILN_VIEWS\"\nlease_ttl_secs = 3\n");
    let a = Daemon::start_with(
        kiln_tests::daemon::slow_warming_options()
            .jetstream(&proxy.nats_url())
            .arg("--config")
            .arg(config.path().to_str().expect("utf-8")),
    );
    let api = Api::new(&a);
    // It warms for at least 12 s (each Spin costs the 1 s batch deadline).
    let id = kiln_tests::daemon::deploy_slow_warming_chaos(&api, 12).await;
    wait_snapshot_state(&api, &id, "building").await;
    // Its connection to NATS cut past the lease's TTL (3 s), then back.
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(5)).await;
    proxy.heal();
    api.wait_state(&id, "active", WAIT).await;
    let all = wait_snapshots(&api, 1).await;
    assert_eq!(all.len(), 1, "{all:?}");
    let log = a.log();
    assert!(
        log.contains("snapshot lease was lost")
            || log.contains("snapshot lease failed until it lapsed"),
        "the lease was never lost: the test tested nothing"
    );
}
