//! The view store and the projector: checkpoints commit atomically with the
//! batch's documents, restarts resume from the checkpoint, failed batches
//! leave no trace, views are created and dropped as column families.

use kiln::runtime::{Projector, Runtime, RuntimeConfig};
use kiln::views::{ViewError, ViewId, ViewStore, Writes};
use kiln_tests::wasm::{self, CHAOS, EventLog, USERS, with_manifest};
use serde_json::json;

fn users_events(n: usize) -> EventLog {
    let mut log = EventLog::new();
    for i in 0..n {
        log.push(&format!("user-{}", i % 3), "UserLoggedIn", json!({}));
    }
    log
}

fn listed(views: &ViewStore) -> Vec<String> {
    views
        .views()
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn views_are_column_families_listed_in_semver_order() {
    let dir = tempfile::tempdir().unwrap();
    let views = ViewStore::open(dir.path()).unwrap();
    let ids: Vec<ViewId> = ["users-1_10_0", "users-1_2_0", "orders-1_0_0"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    for id in &ids {
        views.create(id).unwrap();
    }
    assert!(matches!(
        views.create(&ids[0]),
        Err(ViewError::AlreadyExists(_))
    ));
    assert_eq!(
        listed(&views),
        ["orders-1_0_0", "users-1_2_0", "users-1_10_0"]
    );
    views.drop_view(&ids[1]).unwrap();
    drop(views);
    let views = ViewStore::open(dir.path()).unwrap();
    assert_eq!(listed(&views), ["orders-1_0_0", "users-1_10_0"]);
    let e = views.checkpoint(&ids[1]).unwrap_err();
    assert!(matches!(e, ViewError::NotFound(_)), "{e}");
}

#[test]
fn commit_writes_documents_and_checkpoint_together() {
    let dir = tempfile::tempdir().unwrap();
    let views = ViewStore::open(dir.path()).unwrap();
    let id: ViewId = "users-1_0_0".parse().unwrap();
    views.create(&id).unwrap();
    assert_eq!(views.checkpoint(&id).unwrap(), 0);
    let mut w = Writes::new();
    w.insert(b"a".to_vec(), Some(b"1".to_vec()));
    w.insert(b"b".to_vec(), Some(b"2".to_vec()));
    views.commit(&id, &w, 10).unwrap();
    let mut w = Writes::new();
    w.insert(b"a".to_vec(), None);
    w.insert(b"c".to_vec(), Some(b"3".to_vec()));
    views.commit(&id, &w, 12).unwrap();
    drop(views);
    let views = ViewStore::open(dir.path()).unwrap();
    assert_eq!(views.checkpoint(&id).unwrap(), 12);
    let all = views.scan(&id, b"", None, 10).unwrap();
    assert_eq!(
        all,
        [
            (b"b".to_vec(), b"2".to_vec()),
            (b"c".to_vec(), b"3".to_vec())
        ]
    );
    // Paging: after "b", one at a time.
    assert_eq!(
        views.scan(&id, b"", Some(b"b"), 1).unwrap(),
        [(b"c".to_vec(), b"3".to_vec())]
    );
}

#[test]
fn projector_resumes_from_its_checkpoint_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let rt = wasm::runtime();
    let module = wasm::load(&rt, USERS);
    let log = users_events(30);
    {
        let views = ViewStore::open(dir.path()).unwrap();
        let mut p = Projector::open(&module, &views).unwrap();
        p.apply(&log.events()[..20]).unwrap();
        assert_eq!(p.checkpoint(), 20);
    }
    let views = ViewStore::open(dir.path()).unwrap();
    let mut p = Projector::open(&module, &views).unwrap();
    assert_eq!(p.checkpoint(), 20);
    // Re-delivering events 11..=30 applies only 21..=30: logins are not double counted.
    p.apply(&log.events()[10..]).unwrap();
    assert_eq!(p.checkpoint(), 30);
    let logins: u64 = views
        .scan(p.view(), b"user-", None, 10)
        .unwrap()
        .iter()
        .map(|(_, v)| {
            serde_json::from_slice::<serde_json::Value>(v).unwrap()["logins"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert_eq!(logins, 30);
}

#[test]
fn a_failed_batch_commits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let views = ViewStore::open(dir.path()).unwrap();
    let rt = wasm::runtime();
    let module = wasm::load(&rt, CHAOS);
    let mut p = Projector::open(&module, &views).unwrap();
    let mut log = EventLog::new();
    log.push("s-1", "Note", json!({"text": "kept"}))
        .push("s-2", "Note", json!({"text": "lost"}))
        .push("s-2", "Panic", json!({"message": "boom"}));
    p.apply(&log.events()[..1]).unwrap();
    let e = p.apply(&log.events()[1..]).unwrap_err();
    assert!(e.to_string().contains("position 3"), "{e}");
    assert_eq!(p.checkpoint(), 1);
    assert_eq!(views.checkpoint(p.view()).unwrap(), 1);
    let keys: Vec<_> = views
        .scan(p.view(), b"", None, 10)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, [b"note/s-1".to_vec()]);
}

#[test]
fn fingerprint_ignores_the_version_but_not_the_logic_or_name() {
    let rt = wasm::runtime();
    let original = std::fs::read(USERS).unwrap();
    let mut manifest = wasm::manifest_of(&original);
    let base = rt.load("users", &original).unwrap();

    manifest["version"] = json!("1.0.1");
    let bumped = rt
        .load(
            "users-bumped",
            &with_manifest(&original, &manifest.to_string()),
        )
        .unwrap();
    assert_eq!(bumped.view_id().to_string(), "users-1_0_1");
    assert_eq!(bumped.fingerprint(), base.fingerprint());
    assert_ne!(bumped.content_hash(), base.content_hash());

    manifest["name"] = json!("people");
    let renamed = rt
        .load("people", &with_manifest(&original, &manifest.to_string()))
        .unwrap();
    assert_ne!(renamed.fingerprint(), base.fingerprint());

    let other = wasm::load(&rt, wasm::ORDERS);
    assert_ne!(other.fingerprint(), base.fingerprint());
}

#[test]
fn compiled_modules_are_cached_on_disk_by_content_hash() {
    let cache = tempfile::tempdir().unwrap();
    let config = RuntimeConfig {
        cache_dir: Some(cache.path().to_path_buf()),
        ..RuntimeConfig::default()
    };
    let first = Runtime::new(config.clone())
        .unwrap()
        .load_file(USERS)
        .unwrap();
    assert!(!first.from_cache());
    assert_eq!(kiln_tests::wasm::cache_entries(cache.path()).len(), 1);
    // A restart: a new runtime (engine) reads the compiled code instead of compiling.
    let second = Runtime::new(config.clone())
        .unwrap()
        .load_file(USERS)
        .unwrap();
    assert!(second.from_cache());
    assert_eq!(second.fingerprint(), first.fingerprint());
    // A corrupt cache entry is ignored and replaced.
    let entry = kiln_tests::wasm::cache_entries(cache.path()).remove(0);
    let mut bytes = std::fs::read(&entry).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&entry, bytes).unwrap();
    let third = Runtime::new(config).unwrap().load_file(USERS).unwrap();
    assert!(!third.from_cache());
    let views = tempfile::tempdir().unwrap();
    let views = ViewStore::open(views.path()).unwrap();
    let mut p = Projector::open(&third, &views).unwrap();
    p.apply(users_events(3).events()).unwrap();
    assert_eq!(p.checkpoint(), 3);
}
