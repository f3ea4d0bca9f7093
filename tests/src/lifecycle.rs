//! In-process lifecycle harness: a [`Lifecycle`] on a real embedded store and
//! real RocksDB views in a temp dir, and helpers to fill the log and wait.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln::lifecycle::{Lifecycle, LifecycleConfig, ViewState};
use kiln::store::embedded::{EmbeddedConfig, EmbeddedStore};
use std::collections::BTreeMap;

use futures::StreamExt;
use kiln::runtime::{Instance, Module};
use kiln::store::{AppendRequest, EventStore, ExpectedVersion, NewEvent, RecordedEvent, StreamId};
use kiln::views::{SharedDocuments, ViewId};
use serde_json::json;

/// How long a test waits for a state before failing.
pub const WAIT: Duration = Duration::from_secs(30);

/// A view id that must parse.
pub fn id(s: &str) -> ViewId {
    s.parse().expect("view id")
}

/// A temp dir with an embedded store (`log/`); lifecycles use `data/`.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub store: Arc<dyn EventStore>,
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().expect("temp dir");
        let store: Arc<dyn EventStore> = Arc::new(
            EmbeddedStore::open(EmbeddedConfig::new(dir.path().join("log")))
                .expect("embedded store"),
        );
        Env { dir, store }
    }

    /// A temp dir for the lifecycle's data beside another store (JetStream).
    pub fn with_store(store: Arc<dyn EventStore>) -> Env {
        Env {
            dir: tempfile::tempdir().expect("temp dir"),
            store,
        }
    }

    /// Defaults, `data/` as the data directory, a grace period of an hour.
    pub fn config(&self) -> LifecycleConfig {
        let mut c = LifecycleConfig::new(self.dir.path().join("data"));
        c.standby_grace = Duration::from_secs(3600);
        c
    }

    pub async fn start(&self, config: LifecycleConfig) -> Lifecycle {
        Lifecycle::start(config, self.store.clone(), crate::wasm::runtime())
            .await
            .expect("lifecycle starts")
    }
}

/// Appends `n` events over 10 users: a registration each, then logins and
/// failed logins alternating. Returns the head.
pub async fn append_users(store: &Arc<dyn EventStore>, n: usize, offset: usize) -> u64 {
    let mut head = 0;
    for chunk in (offset..offset + n).collect::<Vec<_>>().chunks(200) {
        for user in 0..10 {
            let events: Vec<NewEvent> = chunk
                .iter()
                .filter(|i| *i % 10 == user)
                .map(|i| match i / 10 {
                    0 => NewEvent::json(
                        "UserRegistered",
                        &json!({"name": format!("u{user}"), "email": "x@y"}),
                    ),
                    k if k % 2 == 1 => NewEvent::json("LoginFailed", &json!({})),
                    _ => NewEvent::json("UserLoggedIn", &json!({})),
                })
                .collect();
            if events.is_empty() {
                continue;
            }
            let stream = StreamId::new(format!("user-{user}")).expect("stream id");
            let r = store
                .append(AppendRequest::new(stream, ExpectedVersion::Any, events))
                .await
                .expect("append");
            head = head.max(r.position);
        }
    }
    head
}

/// Appends one event to `stream` at any version; its position.
pub async fn append_one(store: &Arc<dyn EventStore>, stream: &str, event: NewEvent) -> u64 {
    let stream = StreamId::new(stream).expect("stream id");
    store
        .append(AppendRequest::new(
            stream,
            ExpectedVersion::Any,
            vec![event],
        ))
        .await
        .expect("append")
        .position
}

/// Appends a `LoginFailed` whose data is not an object: the `users` module
/// (which reads `LoginFailed`) refuses it; the variant without `LoginFailed`
/// never sees it. Returns its position.
pub async fn append_poison(store: &Arc<dyn EventStore>, user: usize) -> u64 {
    let stream = StreamId::new(format!("user-{user}")).expect("stream id");
    store
        .append(AppendRequest::new(
            stream,
            ExpectedVersion::Any,
            vec![NewEvent::json("LoginFailed", &json!("poison"))],
        ))
        .await
        .expect("append")
        .position
}

/// Polls `cond` every 10 ms until it holds; fails after [`WAIT`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Deploys `users` at `version` (`changed`: the variant without
/// `LoginFailed`, another fingerprint) and waits until it is active.
pub async fn deploy_active(lc: &Lifecycle, version: &str, changed: bool) {
    lc.deploy(&crate::wasm::users_module(version, changed), "test")
        .await
        .expect("deploy");
    let v = format!("users-{}", version.replace('.', "_"));
    wait_until(&format!("{v} active"), || {
        state(lc, &v) == Some(ViewState::Active)
    })
    .await;
}

/// The state of version `v`, if registered.
pub fn state(lc: &Lifecycle, v: &str) -> Option<ViewState> {
    lc.status_of(&id(v)).map(|s| s.state)
}

/// Every event of the log up to its head, read by a tail.
pub async fn read_log(store: &Arc<dyn EventStore>) -> Vec<RecordedEvent> {
    let head = store.head().await.expect("head");
    let mut out = Vec::new();
    if head == 0 {
        return out;
    }
    let mut tail = store.tail(1);
    while let Some(batch) = tail.next().await {
        out.extend(batch.expect("tail"));
        if out.last().is_some_and(|e| e.position >= head) {
            break;
        }
    }
    out
}

/// The documents `module` builds from the log up to `checkpoint`, in memory.
pub fn rebuild(
    module: &Module,
    events: &[RecordedEvent],
    checkpoint: u64,
) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let docs = SharedDocuments::default();
    let mut instance = Instance::new(module, Box::new(docs.clone())).expect("instance");
    for e in events.iter().filter(|e| e.position <= checkpoint) {
        // Event by event: a poison event would fail only itself; the live
        // view never applies one either (it stopped before it).
        if let Ok(writes) = instance.apply(std::slice::from_ref(e)) {
            docs.apply(writes);
        }
    }
    docs.snapshot()
}
