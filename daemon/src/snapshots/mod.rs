//! View snapshots: warm a view once, ship it to every instance on the log.
//!
//! A projection is deterministic, so one module fingerprint applied to one
//! log up to position P gives the same documents wherever it runs. A
//! **snapshot** is a view's documents at P written as SST files (key order is
//! RocksDB's already), its dead letters, and a [`SnapshotManifest`]: the
//! fingerprint, the log's identity, P, the event at P (its id and a blake3
//! of all it holds), the documents' count and digest, each file's size and
//! blake3, kiln's snapshot format.
//!
//! - **Where**: a [`SnapshotStore`]: a directory (`dir.rs`, `--snapshot-dir`)
//!   or a JetStream object store bucket (`object.rs`, `--snapshot-bucket`).
//!   Snapshots of one (log, fingerprint) live under one key,
//!   [`snapshot_key`]; the manifest is written **last**, so a listed
//!   manifest names files that are all there.
//! - **Publishing** ([`Snapshots::publish`]) exports from one RocksDB
//!   snapshot (the worker goes on), uploads, prunes to the newest `keep`.
//!   At most one instance publishes a (log, fingerprint) at a time: the
//!   store's **lease** (a JetStream KV entry created only if absent, expiring
//!   unless refreshed; a directory needs none: one process owns a log).
//! - **Bootstrap** ([`Snapshots::bootstrap`], run by a fresh version's worker
//!   before it opens its view): the newest snapshot of the version's
//!   fingerprint on this log is downloaded, each file checked against the
//!   manifest (size, blake3), ingested, and the documents' digest checked
//!   **before** the checkpoint is set (`ViewStore::ingest`); the worker then
//!   tails from P+1. Before anything is downloaded the snapshot is checked
//!   against the log: P at or below the log's head, and the log's event at
//!   P the one the snapshot was built after (so a log restored from a
//!   backup, or otherwise rewritten under the same identity, never takes a
//!   snapshot of a history it no longer holds). Anything wrong refuses the
//!   snapshot with the reason and the version replays from the first event. When none exists yet and
//!   another instance holds the lease (it is building that fingerprint now),
//!   the worker waits for its snapshot instead of replaying the log a second
//!   time; when the lease is free it takes it, replays, and publishes when
//!   the version is caught up (warm once, ship to all).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::store::{EventStore, Position, RecordedEvent};
use crate::views::digest::ViewDigest;
use crate::views::{ViewError, ViewId, ViewStore};

mod bootstrap;
pub mod dir;
mod manifest;
pub mod object;
mod publish;

pub use manifest::*;
use manifest::{check_history, decode_parked};
use publish::hash_file;

/// The snapshot format this kiln writes and reads. 2: the manifest names
/// the event at its position ([`SnapshotManifest::event`]); a format-1
/// snapshot cannot be checked against the log, so it is not used (left in
/// place for the older kilns that read it).
pub const FORMAT: u32 = 2;

/// Name of the manifest within a snapshot.
pub const MANIFEST: &str = "manifest.json";
/// Name of the dead-letter file within a snapshot.
const PARKED_FILE: &str = "parked.bin";

/// What went wrong with a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot store {store}: {op}: {reason}")]
    Store {
        store: String,
        op: String,
        reason: String,
    },
    #[error("snapshot {snapshot}: {reason}")]
    Refused { snapshot: String, reason: String },
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    View(#[from] ViewError),
    #[error("another instance ({0}) is publishing this view's snapshot")]
    LeaseHeld(String),
    #[error("{0}")]
    Internal(String),
}

/// A manifest's bytes, stored at `location` (`<key>/<position>/manifest.json`
/// in the store): `None`, with a warning, when they do not parse or the
/// manifest is not where its own content says (a copied or foreign one:
/// pruning acts on `path()`, so it must never point elsewhere).
pub(crate) fn parse_manifest(bytes: &[u8], location: &str) -> Option<SnapshotManifest> {
    match serde_json::from_slice::<SnapshotManifest>(bytes) {
        Ok(m) if format!("{}/{MANIFEST}", m.path()) == location => Some(m),
        Ok(m) => {
            tracing::warn!(
                "skipping the snapshot manifest {location}: it describes {}",
                m.path()
            );
            None
        }
        Err(e) => {
            tracing::warn!("skipping the snapshot manifest {location}: {e}");
            None
        }
    }
}

pub(crate) fn io(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> SnapshotError {
    move |source| SnapshotError::Io {
        op: op.into(),
        source,
    }
}

/// A lease on a snapshot key: held while building and publishing it.
pub enum Lease {
    /// This instance holds it until [`Lease::release`] (or until it stops
    /// refreshing it and it expires).
    Held(Box<dyn HeldLease>),
    /// Another instance holds it.
    HeldBy(String),
}

/// A lease this instance holds.
#[async_trait]
pub trait HeldLease: Send + Sync {
    /// Whether it was lost: not refreshed before it lapsed, or taken by
    /// another instance since. A lost lease no longer excludes anyone.
    fn is_lost(&self) -> bool;
    async fn release(self: Box<Self>);
}

/// Where snapshots are kept.
#[async_trait]
pub trait SnapshotStore: Send + Sync + 'static {
    /// `directory /x`, `object store KILN_VIEWS`.
    fn describe(&self) -> String;
    /// The manifests under `key` that parse (others are skipped with a warning).
    async fn manifests(&self, key: &str) -> Result<Vec<SnapshotManifest>, SnapshotError>;
    /// Every manifest in the store.
    async fn all_manifests(&self) -> Result<Vec<SnapshotManifest>, SnapshotError>;
    /// Stores local file `from` as `path`. `from` is never written again
    /// (a store on the same filesystem may link it rather than copy it).
    async fn put(&self, path: &str, from: &Path) -> Result<(), SnapshotError>;
    /// Fetches `path` into local file `to`, adding the bytes to `done` as
    /// they arrive.
    async fn get(&self, path: &str, to: &Path, done: &AtomicU64) -> Result<(), SnapshotError>;
    /// Removes the snapshot at `path` (its files and manifest).
    async fn remove(&self, manifest: &SnapshotManifest) -> Result<(), SnapshotError>;
    /// Takes the lease on `key` for `holder`, if free.
    async fn lease(&self, key: &str, holder: &str) -> Result<Lease, SnapshotError>;
    /// Removes what an interrupted upload left under `key`: files of a
    /// snapshot without a manifest. Called by the lease's holder after it
    /// published, so no other upload under `key` can be under way. Returns
    /// how many files went.
    async fn sweep(&self, _key: &str) -> Result<usize, SnapshotError> {
        Ok(0)
    }
}

/// When a live view is snapshotted again (`[snapshots] every`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Every {
    /// When its checkpoint is this many events past the last snapshot.
    Events(u64),
    /// When the last snapshot is this old (and the view moved since).
    Period(Duration),
}

impl std::str::FromStr for Every {
    type Err = String;

    /// `"100000 events"`, `"30s"`, `"10m"`, `"2h"`.
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let bad = || {
            format!(
                "{s:?} is not a snapshot interval (e.g. \"100000 events\", \"30s\", \"10m\", \"2h\")"
            )
        };
        if let Some(n) = t.strip_suffix("events") {
            let n: u64 = n.trim().parse().map_err(|_| bad())?;
            return if n == 0 {
                Err(bad())
            } else {
                Ok(Every::Events(n))
            };
        }
        let (n, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
        let n: u64 = n.parse().map_err(|_| bad())?;
        let secs = match unit.trim() {
            "s" => n,
            "m" => n * 60,
            "h" => n * 3600,
            _ => return Err(bad()),
        };
        if secs == 0 {
            return Err(bad());
        }
        Ok(Every::Period(Duration::from_secs(secs)))
    }
}

/// How snapshots are taken and used.
#[derive(Clone, Debug)]
pub struct SnapshotConfig {
    /// Snapshot live views periodically (`None`: only when a warm-up this
    /// instance ran is caught up, and on demand).
    pub every: Option<Every>,
    /// Snapshots kept per (log, fingerprint); older ones are removed.
    pub keep: usize,
    /// Bootstrap fresh versions from snapshots.
    pub bootstrap: bool,
    /// Largest SST file of a snapshot.
    pub max_file_bytes: u64,
    /// Most bytes of documents an export reads a second (0: no limit).
    pub max_bytes_per_sec: u64,
    /// Who this instance is (the lease's holder, the manifest's `instance`).
    pub instance: String,
    /// Where downloads and exports are staged (on the views' file system,
    /// so ingesting moves files rather than copying them).
    pub work_dir: PathBuf,
}

impl SnapshotConfig {
    pub fn new(work_dir: impl Into<PathBuf>) -> Self {
        SnapshotConfig {
            every: None,
            keep: 3,
            bootstrap: true,
            max_file_bytes: 64 << 20,
            max_bytes_per_sec: 64 << 20,
            instance: default_instance(),
            work_dir: work_dir.into(),
        }
    }
}

/// `<host name>:<pid>`.
pub fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "kiln".into());
    format!("{host}:{}", std::process::id())
}

/// What a version's worker is doing with snapshots, for status.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SnapshotActivity {
    /// Another instance is building this fingerprint: waiting for its snapshot.
    Waiting { holder: String },
    /// Downloading the snapshot at `position`.
    Downloading {
        position: Position,
        done_bytes: u64,
        total_bytes: u64,
    },
    /// Filled from the snapshot at `position`.
    Bootstrapped {
        position: Position,
        bytes: u64,
        millis: u64,
        instance: String,
    },
    /// A snapshot was refused; the version replays.
    Refused { reason: String },
    /// Replaying: no snapshot of its fingerprint on this log (this instance
    /// publishes one when the version is caught up).
    Building,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct SnapshotMetrics {
    pub bootstraps: AtomicU64,
    pub refused: AtomicU64,
    pub downloaded_bytes: AtomicU64,
    pub download_millis: AtomicU64,
    pub published: AtomicU64,
    pub uploaded_bytes: AtomicU64,
    pub upload_millis: AtomicU64,
    pub failures: AtomicU64,
}

/// Snapshots of this instance: the store, its settings, what it published.
pub struct Snapshots {
    store: Box<dyn SnapshotStore>,
    config: SnapshotConfig,
    pub metrics: SnapshotMetrics,
    /// Last snapshot published or found, per physical view: (position, when).
    published: Mutex<HashMap<ViewId, (Position, Instant)>>,
    /// Leases held while building a fingerprint, per physical view.
    leases: tokio::sync::Mutex<HashMap<ViewId, Box<dyn HeldLease>>>,
    /// One publish at a time.
    publishing: tokio::sync::Mutex<()>,
    /// Bootstraps in a row a view's ingest failed on this host's storage.
    ingest_faults: Mutex<HashMap<ViewId, u32>>,
}

/// Bootstraps in a row that may fail ingesting on this host's storage
/// before the version replays instead (the snapshot stays for others).
const INGEST_TRIES: u32 = 3;

impl std::fmt::Debug for Snapshots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshots")
            .field("store", &self.store.describe())
            .field("config", &self.config)
            .finish()
    }
}

/// What [`Snapshots::bootstrap`] decided.
pub enum Bootstrap {
    /// The view holds the snapshot's documents at this position.
    Done(Position),
    /// Replay from the view's checkpoint.
    Replay,
    /// Stopped while waiting.
    Stopped,
}

impl Snapshots {
    pub fn new(store: Box<dyn SnapshotStore>, config: SnapshotConfig) -> Self {
        Snapshots {
            store,
            config,
            metrics: SnapshotMetrics::default(),
            published: Mutex::new(HashMap::new()),
            leases: tokio::sync::Mutex::new(HashMap::new()),
            publishing: tokio::sync::Mutex::new(()),
            ingest_faults: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &SnapshotConfig {
        &self.config
    }

    pub fn describe(&self) -> String {
        self.store.describe()
    }

    /// The newest usable snapshot of `fingerprint` on log `log`.
    pub async fn latest(
        &self,
        log: &str,
        fingerprint: &str,
    ) -> Result<Option<SnapshotManifest>, SnapshotError> {
        let key = snapshot_key(log, fingerprint);
        let found = self.store.manifests(&key).await?;
        let (usable, other): (Vec<_>, Vec<_>) = found
            .into_iter()
            .filter(|m| m.log == log && m.fingerprint == fingerprint)
            .partition(|m| m.format == FORMAT);
        for m in &other {
            tracing::debug!(
                "not using the snapshot at {} ({}): it is snapshot format {}, this kiln reads {FORMAT}",
                m.position,
                m.path(),
                m.format
            );
        }
        Ok(usable.into_iter().max_by_key(|m| m.position))
    }

    /// Every snapshot in the store, newest first per key.
    pub async fn list(&self) -> Result<Vec<SnapshotManifest>, SnapshotError> {
        let mut all = self.store.all_manifests().await?;
        all.sort_by(|a, b| {
            (&a.fingerprint, &a.log, std::cmp::Reverse(a.position)).cmp(&(
                &b.fingerprint,
                &b.log,
                std::cmp::Reverse(b.position),
            ))
        });
        Ok(all)
    }

    /// Whether this instance holds the lease for building `view` (a lease
    /// found lost is let go of here).
    pub async fn holds_lease(&self, view: &ViewId) -> bool {
        let mut leases = self.leases.lock().await;
        match leases.get(view) {
            Some(l) if l.is_lost() => {
                tracing::warn!(view = %view, "the snapshot lease of this view was lost: another instance may build and publish it");
                leases.remove(view);
                false
            }
            Some(_) => true,
            None => false,
        }
    }

    /// Fails when the lease `publish` took for `view` was lost meanwhile:
    /// another instance may be uploading under the same key.
    async fn still_leased(&self, view: &ViewId) -> Result<(), SnapshotError> {
        if self.holds_lease(view).await {
            Ok(())
        } else {
            Err(SnapshotError::LeaseHeld(
                "another instance (this instance's lease lapsed)".into(),
            ))
        }
    }

    /// Lets go of the building lease of `view`, if held.
    pub async fn release(&self, view: &ViewId) {
        let held = self.leases.lock().await.remove(view);
        if let Some(lease) = held {
            lease.release().await;
        }
    }

    /// Releases every lease (at shutdown): others need not wait them out.
    pub async fn release_all(&self) {
        let held: Vec<_> = self.leases.lock().await.drain().collect();
        for (_, lease) in held {
            lease.release().await;
        }
    }

    /// Takes the building lease of `view` when free; whether this instance
    /// holds it now, or who does.
    async fn take_lease(&self, view: &ViewId, key: &str) -> Result<Option<String>, SnapshotError> {
        if self.holds_lease(view).await {
            return Ok(None);
        }
        if self.config.instance.is_empty() {
            // Every instance's lease would look like its own.
            return Err(SnapshotError::Internal(
                "this instance has an empty name for snapshot leases".into(),
            ));
        }
        match self.store.lease(key, &self.config.instance).await? {
            Lease::Held(lease) => {
                self.leases.lock().await.insert(view.clone(), lease);
                Ok(None)
            }
            Lease::HeldBy(holder) => Ok(Some(holder)),
        }
    }

    /// Whether `view`, now at `checkpoint`, is due a periodic snapshot.
    pub fn due(&self, view: &ViewId, checkpoint: Position) -> bool {
        let Some(every) = self.config.every else {
            return false;
        };
        let last = self
            .published
            .lock()
            .ok()
            .and_then(|p| p.get(view).copied());
        match (every, last) {
            (_, Some((at, _))) if checkpoint <= at => false,
            (_, None) => checkpoint > 0,
            (Every::Events(n), Some((at, _))) => checkpoint - at >= n,
            (Every::Period(d), Some((_, when))) => when.elapsed() >= d,
        }
    }

    /// Notes a snapshot found in the store for `view` (so `due` counts from it).
    pub fn note_published(&self, view: &ViewId, position: Position) {
        if let Ok(mut p) = self.published.lock() {
            let e = p.entry(view.clone()).or_insert((position, Instant::now()));
            if e.0 < position {
                *e = (position, Instant::now());
            }
        }
    }

    /// The last snapshot position published or bootstrapped from, per view.
    pub fn last_published(&self, view: &ViewId) -> Option<Position> {
        self.published
            .lock()
            .ok()
            .and_then(|p| p.get(view).map(|e| e.0))
    }
}

fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.')
}

fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::dir::DirStore;
    use super::*;
    use crate::store::embedded::{EmbeddedConfig, EmbeddedStore};
    use crate::store::{AppendRequest, ExpectedVersion, NewEvent, StreamId};

    /// Appends `n` events to `log`, one per stream `user-<first + i>`.
    async fn append(log: &dyn EventStore, first: u64, n: u64) {
        for i in first..first + n {
            let stream = StreamId::try_from(format!("user-{i}")).expect("stream id");
            let event = NewEvent::json("UserRegistered", &serde_json::json!({ "i": i }));
            log.append(AppendRequest::new(
                stream,
                ExpectedVersion::Any,
                vec![event],
            ))
            .await
            .expect("append");
        }
    }

    /// A real embedded log in `dir` holding `n` events.
    async fn log_of(dir: &Path, n: u64) -> Arc<dyn EventStore> {
        let log: Arc<dyn EventStore> =
            Arc::new(EmbeddedStore::open(EmbeddedConfig::new(dir)).expect("log"));
        append(log.as_ref(), 0, n).await;
        log
    }

    #[test]
    fn intervals_parse_and_bad_ones_are_named() {
        assert_eq!("100000 events".parse(), Ok(Every::Events(100_000)));
        assert_eq!("10m".parse(), Ok(Every::Period(Duration::from_secs(600))));
        assert_eq!("2h".parse(), Ok(Every::Period(Duration::from_secs(7200))));
        for bad in ["", "0 events", "10", "ten m", "5d", "0s"] {
            let e = bad.parse::<Every>().expect_err(bad);
            assert!(e.contains("not a snapshot interval"), "{e}");
        }
    }

    #[test]
    fn dead_letters_round_trip_and_truncation_is_caught() {
        let parked = vec![(3, b"{\"a\":1}".to_vec()), (9, Vec::new())];
        let bytes = super::publish::encode_parked(&parked);
        assert_eq!(decode_parked(&bytes), Some(parked));
        assert_eq!(decode_parked(&bytes[..bytes.len() - 1]), None);
    }

    fn docs(n: u32) -> crate::views::Writes {
        (0..n)
            .map(|i| {
                (
                    format!("k{i:04}").into_bytes(),
                    Some(format!("{{\"n\":{i}}}").into_bytes()),
                )
            })
            .collect()
    }

    /// The reason of a refusal (panics on any other activity).
    fn refused(a: Option<SnapshotActivity>) -> String {
        match a {
            Some(SnapshotActivity::Refused { reason }) => reason,
            other => panic!("not refused: {other:?}"),
        }
    }

    /// Bootstraps `view` into a fresh view store under `root`; what it
    /// decided, what status says, and the view's checkpoint and documents.
    async fn bootstrap_fresh(
        snaps: &Snapshots,
        root: &Path,
        view: &ViewId,
        log: &Arc<dyn EventStore>,
    ) -> (Option<Position>, Option<SnapshotActivity>, Position, u64) {
        let views = ViewStore::open(root.join(uuid::Uuid::new_v4().to_string())).expect("views");
        let activity = Mutex::new(None);
        let (_tx, mut rx) = tokio::sync::watch::channel(false);
        let got = snaps
            .bootstrap(&views, view, "v2:fp", log.as_ref(), &activity, &mut rx)
            .await
            .expect("bootstrap");
        // Let go of a lease a replay took, as a caught-up publish would.
        snaps.release(view).await;
        let done = match got {
            Bootstrap::Done(p) => Some(p),
            _ => None,
        };
        views.ensure(view).expect("view");
        let d = views.digest(view).expect("digest");
        let a = activity.lock().expect("activity").clone();
        (done, a, d.position, d.documents)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_or_mismatched_snapshots_are_refused_and_leave_the_view_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let views = ViewStore::open(dir.path().join("views")).expect("views");
        let v = ViewId::from_parts("users", "1.0.0").expect("id");
        views.create(&v).expect("create");
        views.commit(&v, &docs(300), 50).expect("commit");
        let log = log_of(&dir.path().join("log-1"), 50).await;
        let store =
            DirStore::open(dir.path().join("snaps"), Duration::from_secs(30)).expect("store");
        let snaps = Arc::new(Snapshots::new(
            Box::new(store),
            SnapshotConfig::new(dir.path().join("work")),
        ));
        let m = snaps
            .publish(&views, &v, "v2:fp", &log)
            .await
            .expect("publish")
            .expect("a new snapshot");
        assert_eq!((m.position, m.documents), (50, 300));
        let at = dir.path().join("snaps").join(m.path());

        // Good: the view is the snapshot's.
        let (done, a, position, n) = bootstrap_fresh(&snaps, dir.path(), &v, &log).await;
        assert_eq!((done, position, n), (Some(50), 50, 300), "{a:?}");
        assert!(matches!(
            a,
            Some(SnapshotActivity::Bootstrapped { position: 50, .. })
        ));

        // Another log: not found, it replays (and builds).
        let other = log_of(&dir.path().join("log-2"), 60).await;
        let (done, a, position, n) = bootstrap_fresh(&snaps, dir.path(), &v, &other).await;
        assert_eq!((done, position, n), (None, 0, 0));
        assert_eq!(a, Some(SnapshotActivity::Building));

        // Truncated file: refused by size.
        let sst = at.join("docs-0000.sst");
        let original = std::fs::read(&sst).expect("sst");
        std::fs::write(&sst, &original[..original.len() / 2]).expect("truncate");
        let (done, a, position, n) = bootstrap_fresh(&snaps, dir.path(), &v, &log).await;
        assert_eq!((done, position, n), (None, 0, 0));
        let reason = refused(a);
        assert!(
            reason.contains("truncated") && reason.contains("docs-0000.sst"),
            "{reason}"
        );
        // Refused: removed (this instance took the lease to rebuild it).
        assert!(!at.exists(), "a refused snapshot is removed");
        let m = snaps
            .publish(&views, &v, "v2:fp", &log)
            .await
            .expect("publish")
            .expect("published again");
        assert!(sst.exists(), "published again at the same position");

        // A manifest whose digest is not its documents': refused after
        // ingesting, before the checkpoint; the view is left empty.
        let manifest_path = at.join(MANIFEST);
        let text = std::fs::read_to_string(&manifest_path).expect("manifest");
        let mut bad: SnapshotManifest = serde_json::from_str(&text).expect("parse");
        bad.digest = "0".repeat(64);
        std::fs::write(&manifest_path, serde_json::to_vec(&bad).expect("json")).expect("write");
        let (done, a, position, n) = bootstrap_fresh(&snaps, dir.path(), &v, &log).await;
        assert_eq!((done, position, n), (None, 0, 0));
        let reason = refused(a);
        assert!(reason.contains("do not match its manifest"), "{reason}");
        assert!(!at.exists(), "a refused snapshot is removed");
        snaps
            .publish(&views, &v, "v2:fp", &log)
            .await
            .expect("publish")
            .expect("published again");

        // A manifest of another fingerprint under this key (not where its
        // content says it belongs): not listed, not used.
        let mut other = bad.clone();
        other.digest = m.digest.clone();
        other.fingerprint = "v2:other".into();
        std::fs::write(&manifest_path, serde_json::to_vec(&other).expect("json")).expect("write");
        let (done, a, ..) = bootstrap_fresh(&snaps, dir.path(), &v, &log).await;
        assert_eq!(done, None);
        assert_eq!(a, Some(SnapshotActivity::Building));

        // A manifest of another snapshot format: not used either.
        let mut newer = m.clone();
        newer.format = FORMAT + 1;
        std::fs::write(&manifest_path, serde_json::to_vec(&newer).expect("json")).expect("write");
        let (done, ..) = bootstrap_fresh(&snaps, dir.path(), &v, &log).await;
        assert_eq!(done, None);
    }

    /// Regressions (found by reading): a snapshot refused as bad stayed the
    /// newest, so every later instance was refused by it and replayed; a
    /// manifest copied elsewhere in the store was listed, and pruning it
    /// would have removed the snapshot it describes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refused_snapshot_is_removed_and_a_misplaced_manifest_is_never_listed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let views = ViewStore::open(dir.path().join("views")).expect("views");
        let v = ViewId::from_parts("users", "1.0.0").expect("id");
        views.create(&v).expect("create");
        views.commit(&v, &docs(100), 40).expect("commit");
        let log = log_of(&dir.path().join("log"), 40).await;
        let root = dir.path().join("snaps");
        let snaps = Arc::new(Snapshots::new(
            Box::new(DirStore::open(&root, Duration::from_secs(30)).expect("store")),
            SnapshotConfig::new(dir.path().join("work")),
        ));
        let m = snaps
            .publish(&views, &v, "v2:fp", &log)
            .await
            .expect("publish")
            .expect("a snapshot");
        let key = snapshot_key(log.log_identity(), "v2:fp");
        let elsewhere = root.join(&key).join(format!("{:020}", 99));
        std::fs::create_dir_all(&elsewhere).expect("dir");
        std::fs::copy(root.join(m.path()).join(MANIFEST), elsewhere.join(MANIFEST)).expect("copy");
        let listed = snaps.store.manifests(&key).await.expect("list");
        assert_eq!(listed, vec![m.clone()]);

        std::fs::write(root.join(m.path()).join("docs-0000.sst"), b"garbage").expect("tamper");
        let (done, a, ..) = bootstrap_fresh(&snaps, dir.path(), &v, &log).await;
        assert_eq!(done, None);
        assert!(matches!(a, Some(SnapshotActivity::Refused { .. })), "{a:?}");
        assert_eq!(snaps.store.manifests(&key).await.expect("list"), vec![]);
        // The rebuilt view publishes again at the same position.
        let again = snaps
            .publish(&views, &v, "v2:fp", &log)
            .await
            .expect("publish")
            .expect("published again");
        assert_eq!(again.position, 40);
        let (done, ..) = bootstrap_fresh(&snaps, dir.path(), &v, &log).await;
        assert_eq!(done, Some(40));
    }

    /// Regression (issue 25, measured): a snapshot built after a backup was
    /// applied to the log restored from it (same identity), at a position
    /// past its head or over other events. The event at P is checked first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_is_used_only_on_the_history_it_was_built_from() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = log_of(&dir.path().join("log"), 10).await;
        // A copy of the log at 10 (as a backup takes it): the same identity.
        let copy_dir = dir.path().join("copy");
        log.checkpoint_to(&copy_dir).expect("checkpoint");
        append(log.as_ref(), 100, 10).await;
        let views = ViewStore::open(dir.path().join("views")).expect("views");
        let v = ViewId::from_parts("users", "1.0.0").expect("id");
        views.create(&v).expect("create");
        views.commit(&v, &docs(20), 20).expect("commit");
        let snaps = Arc::new(Snapshots::new(
            Box::new(
                DirStore::open(dir.path().join("snaps"), Duration::from_secs(30)).expect("store"),
            ),
            SnapshotConfig::new(dir.path().join("work")),
        ));
        let publish = || async {
            snaps
                .publish(&views, &v, "v2:fp", &log)
                .await
                .expect("publish")
                .expect("a snapshot")
        };
        let m = publish().await;
        let event = m.event.clone().expect("format 2 names the event at P");
        assert_eq!(event.blake3.len(), 64);
        let copy: Arc<dyn EventStore> =
            Arc::new(EmbeddedStore::open(EmbeddedConfig::new(&copy_dir)).expect("copy"));
        assert_eq!(copy.log_identity(), log.log_identity());

        // Its head (13) is before P: refused, removed, replayed.
        append(copy.as_ref(), 200, 3).await;
        let (done, a, position, n) = bootstrap_fresh(&snaps, dir.path(), &v, &copy).await;
        assert_eq!((done, position, n), (None, 0, 0), "{a:?}");
        let reason = refused(a);
        assert!(reason.contains("holds no event at 20"), "{reason}");
        assert_eq!(
            snaps
                .latest(log.log_identity(), "v2:fp")
                .await
                .expect("latest"),
            None
        );

        // Past P now, but another event there: refused too.
        publish().await;
        append(copy.as_ref(), 300, 10).await;
        let (done, a, ..) = bootstrap_fresh(&snaps, dir.path(), &v, &copy).await;
        assert_eq!(done, None);
        let reason = refused(a);
        assert!(
            reason.contains("another history") && reason.contains(&event.id),
            "{reason}"
        );

        // The log it was built from takes it.
        publish().await;
        let (done, ..) = bootstrap_fresh(&snaps, dir.path(), &v, &log).await;
        assert_eq!(done, Some(20));

        // A format-1 snapshot names no event: not used (left for older kilns).
        let manifest_path = dir.path().join("snaps").join(m.path()).join(MANIFEST);
        let mut old = m.clone();
        old.format = 1;
        old.event = None;
        std::fs::write(&manifest_path, serde_json::to_vec(&old).expect("json")).expect("write");
        let (done, a, ..) = bootstrap_fresh(&snaps, dir.path(), &v, &log).await;
        assert_eq!((done, a), (None, Some(SnapshotActivity::Building)));
        assert!(manifest_path.exists());
        // A publish at its position replaces it.
        let again = publish().await;
        assert_eq!((again.format, again.position), (FORMAT, 20));
    }

    /// Regression (issue 25, found by reading): files that match their
    /// manifest but that RocksDB cannot ingest were taken for this host's
    /// fault, and the worker retried them forever. Refused and removed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_rocksdb_cannot_ingest_is_refused_and_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = log_of(&dir.path().join("log"), 30).await;
        let views = ViewStore::open(dir.path().join("views")).expect("views");
        let v = ViewId::from_parts("users", "1.0.0").expect("id");
        views.create(&v).expect("create");
        views.commit(&v, &docs(100), 30).expect("commit");
        let root = dir.path().join("snaps");
        let snaps = Arc::new(Snapshots::new(
            Box::new(DirStore::open(&root, Duration::from_secs(30)).expect("store")),
            SnapshotConfig::new(dir.path().join("work")),
        ));
        let mut m = snaps
            .publish(&views, &v, "v2:fp", &log)
            .await
            .expect("publish")
            .expect("a snapshot");
        // A corrupt publisher: not an SST file, its size and hash in the manifest.
        let garbage = b"not an sst file".repeat(100);
        std::fs::write(root.join(m.path()).join("docs-0000.sst"), &garbage).expect("write");
        for f in &mut m.files {
            if f.name == "docs-0000.sst" {
                f.size = garbage.len() as u64;
                f.blake3 = blake3::hash(&garbage).to_hex().to_string();
            }
        }
        let manifest_path = root.join(m.path()).join(MANIFEST);
        std::fs::write(&manifest_path, serde_json::to_vec(&m).expect("json")).expect("write");
        let (done, a, position, n) = bootstrap_fresh(&snaps, dir.path(), &v, &log).await;
        assert_eq!((done, position, n), (None, 0, 0), "{a:?}");
        let reason = refused(a);
        assert!(reason.contains("cannot ingest"), "{reason}");
        assert!(!manifest_path.exists(), "a refused snapshot is removed");
    }

    #[test]
    fn keys_separate_logs_and_fingerprints() {
        let a = snapshot_key("embedded:1", "v2:ab");
        assert_eq!(a.len(), 32);
        assert_ne!(a, snapshot_key("embedded:2", "v2:ab"));
        assert_ne!(a, snapshot_key("embedded:1", "v2:ac"));
        assert!(!safe_name("../x") && !safe_name("a/b") && safe_name("docs-0001.sst"));
    }
}
