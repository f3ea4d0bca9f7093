//! The view lifecycle: versioned views, background warm-up, cutover, hot deploy.
//!
//! A [`Lifecycle`] owns every view version the daemon runs. Deploying a module
//! registers its version (`users` 1.1.0 builds the physical view `users-1_1_0`)
//! in a persisted **registry** and starts a worker that replays the log from the
//! first event in the background (`warming`), at lower priority than the live
//! views. Once it has reached the head and the log had nothing more to give it
//! is `ready`; the name's [`CutoverPolicy`] then makes it `active` at once
//! (`auto`) or waits for [`Lifecycle::promote`] (`manual`). The flip is one
//! atomic registry write: the previous active becomes `standby`, keeps tailing,
//! can be promoted back instantly ([`Lifecycle::rollback`]), and is retired
//! (its column family dropped) after the standby grace period.
//!
//! ```text
//!   deploy ──▶ warming ──caught up──▶ ready ──promote/auto──▶ active ──next promote──▶ standby ──grace──▶ retired
//!                 │                                              ▲                         │
//!                 └──poison (stop)──▶ failed                     └────────rollback─────────┘
//! ```
//!
//! - A version whose module fingerprint equals an existing view's is an
//!   **alias** of that view: ready at once, nothing replayed, reads go to the
//!   physical view ([`DeployOutcome::Alias`]).
//! - Versions are immutable: another module under an existing name+version is
//!   refused ([`LifecycleError::ImmutableVersion`]).
//! - A poison event (the projection fails on it) either stops the version
//!   (`failed`, with position and the guest's message) or is **parked** in the
//!   version's dead-letter list and skipped ([`PoisonPolicy`]).
//! - On restart every version resumes from its checkpoint; states and active
//!   pointers come back from the registry.
//!
//! Readers (the HTTP API) call [`Lifecycle::resolve`] to turn `users`,
//! `users-1_2_0` or `users@^1.2` into the physical [`ViewId`] to read, then
//! [`Lifecycle::get`] / [`Lifecycle::scan`]. A single get or scan page reads one
//! column family, so it is wholly from one version.
//!
//! Files under the data directory: `registry.json` (the registry, replaced
//! atomically by rename), `modules/<view-id>.wasm` (the deployed modules),
//! `views/` (the views RocksDB, one column family per physical view) and
//! `parked/<view-id>.json` (dead letters).

mod parked;
mod registry;
mod watch;
mod worker;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::runtime::{LoadError, Module, ProjectionError, Runtime};
use crate::store::{EventStore, Position, StoreError};
use crate::views::{ViewError, ViewId, ViewStore};

pub use parked::ParkedEvent;
use registry::{Entry, Registry};
use worker::{Priority, Progress, WorkerHandle};

/// Where a view version is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ViewState {
    /// Replaying the log from the first event, in the background.
    Warming,
    /// Caught up (reached the head, the log had nothing more) and tailing live.
    Ready,
    /// What the bare name resolves to. At most one per name.
    Active,
    /// The previous active: still tailing live, can be promoted back instantly.
    Standby,
    /// Stopped; its column family is dropped (unless an alias still reads it).
    Retired,
    /// Stopped on an error (see `last_error`, `failed_position`).
    Failed,
}

impl ViewState {
    /// May a semver requirement (`users@^1`) resolve to a version in this state?
    pub fn is_servable(self) -> bool {
        matches!(
            self,
            ViewState::Ready | ViewState::Active | ViewState::Standby
        )
    }
}

impl std::fmt::Display for ViewState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ViewState::Warming => "warming",
            ViewState::Ready => "ready",
            ViewState::Active => "active",
            ViewState::Standby => "standby",
            ViewState::Retired => "retired",
            ViewState::Failed => "failed",
        })
    }
}

/// When a ready version becomes active.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CutoverPolicy {
    /// As soon as it is ready (the newest ready version wins).
    #[default]
    Auto,
    /// Only on [`Lifecycle::promote`].
    Manual,
}

/// What a version does when its projection fails on an event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoisonPolicy {
    /// The version stops in state `failed` (other views are unaffected).
    #[default]
    Stop,
    /// The event is recorded in the version's dead-letter list and skipped.
    Park,
}

/// Policies of one view name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ViewPolicy {
    pub cutover: CutoverPolicy,
    pub poison: PoisonPolicy,
    /// Overrides [`LifecycleConfig::standby_grace`] for this name, in seconds.
    pub standby_grace_secs: Option<u64>,
}

/// How the lifecycle runs.
#[derive(Clone, Debug)]
pub struct LifecycleConfig {
    /// Holds `registry.json`, `modules/`, `views/` and `parked/`.
    pub data_dir: PathBuf,
    /// A directory of `*.wasm` modules to deploy and watch (top level only);
    /// `None` = no watching.
    pub projections_dir: Option<PathBuf>,
    /// How long a file must be quiet before it is (re)loaded.
    pub watch_debounce: Duration,
    /// Policies of names without an entry in `policies`.
    pub default_policy: ViewPolicy,
    /// Policies per view name.
    pub policies: BTreeMap<String, ViewPolicy>,
    /// How long a standby version keeps tailing before it is retired.
    pub standby_grace: Duration,
    /// Most events a warming version applies per batch (it yields to live
    /// versions between batches).
    pub warmup_batch: usize,
}

impl LifecycleConfig {
    /// Defaults with `data_dir` as the data directory and no watched directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        LifecycleConfig {
            data_dir: data_dir.into(),
            projections_dir: None,
            watch_debounce: Duration::from_millis(300),
            default_policy: ViewPolicy::default(),
            policies: BTreeMap::new(),
            standby_grace: Duration::from_secs(300),
            warmup_batch: 256,
        }
    }

    /// The policies of view name `name`.
    pub fn policy(&self, name: &str) -> &ViewPolicy {
        self.policies.get(name).unwrap_or(&self.default_policy)
    }

    fn grace_of(&self, name: &str) -> Duration {
        self.policy(name)
            .standby_grace_secs
            .map(Duration::from_secs)
            .unwrap_or(self.standby_grace)
    }
}

/// Documents as (key, document) pairs, in key order.
pub type Documents = Vec<(Vec<u8>, Vec<u8>)>;

/// What a view spec resolved to (see [`Lifecycle::resolve_version`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The registered version the spec names, e.g. `users-1_0_1`.
    pub version: ViewId,
    /// The view holding its documents: `version` itself, or the view it is an
    /// alias of.
    pub physical: ViewId,
}

/// How long a view version's batches take to apply and commit, as a
/// Prometheus-style histogram (`kiln_view_batch_seconds`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct BatchLatency {
    /// Batches applied since the daemon started.
    pub count: u64,
    /// Their total time, in seconds.
    pub sum_secs: f64,
    /// Cumulative: (upper bound in seconds, batches that took at most that).
    #[serde(skip)]
    pub buckets: Vec<(f64, u64)>,
}

/// One version's status, as `GET /views` shows it. Times are milliseconds
/// since the Unix epoch.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ViewStatus {
    /// `users-1_2_0`.
    pub id: String,
    pub name: String,
    /// `1.2.0`.
    pub version: String,
    pub state: ViewState,
    /// For an alias: the physical view it reads (`users-1_1_0`).
    pub alias_of: Option<String>,
    /// The module's fingerprint (its logic, version left out): `v2:<hex>`.
    pub fingerprint: String,
    /// Why the deploy aliased this version or gave it a view of its own: the
    /// fingerprints compared and the parts that differed.
    pub deploy_note: Option<String>,
    /// Log position applied up to (the physical view's, for an alias).
    pub checkpoint: u64,
    /// The log's head, as last seen.
    pub head: u64,
    /// `head - checkpoint`.
    pub lag: u64,
    /// Events this version's worker has applied since the daemon started
    /// (0 for an alias: it replays nothing).
    pub events_applied: u64,
    /// Recent apply rate.
    pub events_per_sec: f64,
    /// Batch apply-and-commit times (empty for an alias: it applies nothing).
    pub batch_latency: BatchLatency,
    /// While warming: seconds to catch up at the recent rate.
    pub eta_secs: Option<f64>,
    /// Events in the dead-letter list.
    pub parked: usize,
    pub last_error: Option<String>,
    /// Position of the event the version failed on, when `failed`.
    pub failed_position: Option<u64>,
    pub deployed_at: u64,
    pub ready_at: Option<u64>,
    pub activated_at: Option<u64>,
    pub standby_since: Option<u64>,
    pub retired_at: Option<u64>,
    pub failed_at: Option<u64>,
}

/// What [`Lifecycle::deploy`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeployOutcome {
    /// A new physical view, warming up from the first event.
    Warming(ViewId),
    /// The module's logic equals `of`'s: registered as its alias, ready at once.
    Alias { id: ViewId, of: ViewId },
    /// The very same module was deployed already; nothing changed.
    AlreadyDeployed(ViewId),
}

impl DeployOutcome {
    pub fn id(&self) -> &ViewId {
        match self {
            DeployOutcome::Warming(id)
            | DeployOutcome::Alias { id, .. }
            | DeployOutcome::AlreadyDeployed(id) => id,
        }
    }
}

/// What can go wrong with a lifecycle operation. The API maps variants to HTTP
/// codes: `UnknownView`/`NoActiveVersion`/`NoMatchingVersion`/`NoStandby` →
/// 404, `InvalidSpec`/`Load` → 400, `NotReady`/`ImmutableVersion`/`Failed` →
/// 409, `Timeout` → 504, the rest → 500 (`ShuttingDown` → 503).
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("no view version {spec}")]
    UnknownView { spec: String },
    #[error("view {name} has no active version")]
    NoActiveVersion { name: String },
    #[error("no ready version of view {name} matches {req}")]
    NoMatchingVersion { name: String, req: String },
    #[error("invalid view spec {spec:?}: {reason}")]
    InvalidSpec { spec: String, reason: String },
    #[error("view {id} is {state}; only a ready or standby version can be promoted")]
    NotReady { id: ViewId, state: ViewState },
    #[error(
        "view {id} is already deployed with another module (fingerprint {existing}, this one {new}); versions are immutable: bump the version"
    )]
    ImmutableVersion {
        id: ViewId,
        existing: String,
        new: String,
    },
    #[error("view {name} has no standby version to roll back to")]
    NoStandby { name: String },
    #[error(
        "view {view} did not reach position {position} within {millis} ms (it is at {checkpoint})"
    )]
    Timeout {
        view: ViewId,
        position: Position,
        checkpoint: Position,
        millis: u64,
    },
    #[error("view {id} has failed: {reason}")]
    Failed { id: ViewId, reason: String },
    #[error("view {id} is retired")]
    Retired { id: ViewId },
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    View(#[from] ViewError),
    #[error(transparent)]
    Projection(Box<ProjectionError>),
    #[error("{what} ({path}): {source}")]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("registry {path}: {reason}")]
    CorruptRegistry { path: PathBuf, reason: String },
    #[error("the lifecycle is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<ProjectionError> for LifecycleError {
    fn from(e: ProjectionError) -> Self {
        LifecycleError::Projection(Box::new(e))
    }
}

impl LifecycleError {
    fn io(what: impl Into<String>, path: &Path) -> impl FnOnce(std::io::Error) -> LifecycleError {
        let what = what.into();
        let path = path.to_path_buf();
        move |source| LifecycleError::Io { what, path, source }
    }
}

/// The handle to the lifecycle. Cheap to clone; every clone drives the same views.
#[derive(Clone)]
pub struct Lifecycle {
    inner: Arc<Inner>,
}

struct Inner {
    config: LifecycleConfig,
    store: Arc<dyn EventStore>,
    runtime: Runtime,
    views: ViewStore,
    /// The registry, and the workers it implies. One lock: every transition
    /// reads and writes both together.
    state: Mutex<State>,
    /// Last log head seen (by a worker or the head poller).
    head: AtomicU64,
    priority: Arc<Priority>,
    shutting_down: AtomicBool,
    shutdown_tx: tokio::sync::watch::Sender<bool>,
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

struct State {
    registry: Registry,
    /// One worker per running physical view.
    workers: HashMap<ViewId, WorkerHandle>,
    /// Progress of each physical view (kept after its worker stops, for status).
    progress: HashMap<ViewId, Arc<Progress>>,
}

fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Lifecycle {
    /// Opens the registry and the views under `config.data_dir`, resumes every
    /// version from its checkpoint, and starts the background tasks (standby
    /// retirement, head sampling, and the projections-directory watcher).
    pub async fn start(
        config: LifecycleConfig,
        store: Arc<dyn EventStore>,
        runtime: Runtime,
    ) -> Result<Self, LifecycleError> {
        for dir in [
            config.data_dir.clone(),
            config.data_dir.join("modules"),
            config.data_dir.join("parked"),
        ] {
            std::fs::create_dir_all(&dir)
                .map_err(LifecycleError::io("creating the data directory", &dir))?;
        }
        let views_dir = config.data_dir.join("views");
        let views = tokio::task::spawn_blocking(move || ViewStore::open(views_dir))
            .await
            .map_err(|e| LifecycleError::Internal(e.to_string()))??;
        let registry = Registry::load(&config.data_dir.join("registry.json"))?;
        let head = store.head().await?;
        let (shutdown_tx, _) = tokio::sync::watch::channel(false);
        let inner = Arc::new(Inner {
            config,
            store,
            runtime,
            views,
            state: Mutex::new(State {
                registry,
                workers: HashMap::new(),
                progress: HashMap::new(),
            }),
            head: AtomicU64::new(head),
            priority: Arc::new(Priority::default()),
            shutting_down: AtomicBool::new(false),
            shutdown_tx,
            background: Mutex::new(Vec::new()),
        });
        inner.resume().await?;
        let ticker = tokio::spawn(inner.clone().tick());
        inner.push_background(ticker);
        let lifecycle = Lifecycle { inner };
        if let Some(dir) = lifecycle.inner.config.projections_dir.clone() {
            let task = watch::start(lifecycle.clone(), dir).await?;
            lifecycle.inner.push_background(task);
        }
        Ok(lifecycle)
    }

    /// Registers the module in `wasm` (`label` names it in messages and the
    /// registry: a path, or e.g. `api`). A new physical view starts warming; a
    /// module whose logic equals an existing view's becomes its alias; the same
    /// module again changes nothing; another module under an existing
    /// name+version is refused.
    pub async fn deploy(&self, wasm: &[u8], label: &str) -> Result<DeployOutcome, LifecycleError> {
        self.inner.check_running()?;
        let runtime = self.inner.runtime.clone();
        let (bytes, owned_label) = (wasm.to_vec(), label.to_string());
        let module = tokio::task::spawn_blocking(move || runtime.load(&owned_label, &bytes))
            .await
            .map_err(|e| LifecycleError::Internal(e.to_string()))??;
        self.inner.deploy(module, wasm, label)
    }

    /// Makes `id` (ready or standby) the active version of its name, in one
    /// registry write; the previous active becomes standby.
    pub async fn promote(&self, id: &ViewId) -> Result<(), LifecycleError> {
        self.inner.check_running()?;
        let mut st = self.inner.lock();
        self.inner.promote_locked(&mut st, id)
    }

    /// Promotes the most recent standby version of `name` back to active.
    pub async fn rollback(&self, name: &str) -> Result<ViewId, LifecycleError> {
        self.inner.check_running()?;
        let mut st = self.inner.lock();
        let standby = st
            .registry
            .of_name(name)
            .filter(|e| e.state == ViewState::Standby)
            .max_by_key(|e| e.standby_since.unwrap_or(0))
            .map(|e| e.id.clone());
        let Some(id) = standby else {
            if st.registry.of_name(name).next().is_none() {
                return Err(LifecycleError::UnknownView {
                    spec: name.to_string(),
                });
            }
            return Err(LifecycleError::NoStandby {
                name: name.to_string(),
            });
        };
        self.inner.promote_locked(&mut st, &id)?;
        tracing::info!(view = %id, "rolled back");
        Ok(id)
    }

    /// Retires `id` now: its worker stops and its column family is dropped
    /// (kept while an alias still reads it).
    pub async fn retire(&self, id: &ViewId) -> Result<(), LifecycleError> {
        self.inner.check_running()?;
        self.inner.retire(id).await
    }

    /// Every version's status, in view id order.
    pub fn status(&self) -> Vec<ViewStatus> {
        let st = self.inner.lock();
        st.registry
            .entries
            .values()
            .map(|e| self.inner.status_of(&st, e))
            .collect()
    }

    pub fn status_of(&self, id: &ViewId) -> Option<ViewStatus> {
        let st = self.inner.lock();
        st.registry
            .entries
            .get(id)
            .map(|e| self.inner.status_of(&st, e))
    }

    /// The physical view to read for `spec`: a bare name (`users`, its active
    /// version), an exact id (`users-1_2_0`, any state but retired) or a name
    /// and a semver requirement (`users@^1.2`, the newest ready, active or
    /// standby match). Aliases resolve to the view they read.
    pub fn resolve(&self, spec: &str) -> Result<ViewId, LifecycleError> {
        self.resolve_version(spec).map(|r| r.physical)
    }

    /// Like [`Lifecycle::resolve`], but keeps the registered version `spec`
    /// names (`users-1_0_1`) next to the physical view holding its documents
    /// (`users-1_0_0` when 1.0.1 is an alias of it). The API answers with the
    /// version, so a client sees the version it asked for (or the active one).
    pub fn resolve_version(&self, spec: &str) -> Result<Resolved, LifecycleError> {
        let st = self.inner.lock();
        let e = resolve_entry(&st.registry, spec)?;
        Ok(Resolved {
            version: e.id.clone(),
            physical: e.physical().clone(),
        })
    }

    /// One document of view `view` (an id from [`Lifecycle::resolve`]).
    pub fn get(&self, view: &ViewId, key: &[u8]) -> Result<Option<Vec<u8>>, LifecycleError> {
        let physical = self.inner.physical(view)?;
        self.inner
            .views
            .get(&physical, key)
            .map_err(|e| not_found_as_unknown(e, view))
    }

    /// Up to `limit` documents of `view` whose keys start with `prefix`, in key
    /// order, after key `after` when given (paging).
    pub fn scan(
        &self,
        view: &ViewId,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Documents, LifecycleError> {
        let physical = self.inner.physical(view)?;
        self.inner
            .views
            .scan(&physical, prefix, after, limit)
            .map_err(|e| not_found_as_unknown(e, view))
    }

    /// Read-your-writes: returns once `view`'s checkpoint is at `position` or
    /// beyond (the checkpoint also moves past events the projection does not
    /// want), [`LifecycleError::Timeout`] after `timeout`, or
    /// [`LifecycleError::Failed`] if the view fails meanwhile.
    pub async fn wait_for_position(
        &self,
        view: &ViewId,
        position: u64,
        timeout: Duration,
    ) -> Result<(), LifecycleError> {
        let physical = self.inner.physical(view)?;
        let progress = {
            let st = self.inner.lock();
            st.progress.get(&physical).cloned()
        };
        let Some(progress) = progress else {
            return Err(LifecycleError::UnknownView {
                spec: view.to_string(),
            });
        };
        let mut rx = progress.checkpoint_tx.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if *rx.borrow_and_update() >= position {
                return Ok(());
            }
            if let Some(reason) = self.inner.failure_of(&physical) {
                return Err(LifecycleError::Failed {
                    id: physical,
                    reason,
                });
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    let checkpoint = progress.checkpoint();
                    if checkpoint >= position {
                        return Ok(());
                    }
                    return Err(LifecycleError::Timeout {
                        view: view.clone(),
                        position,
                        checkpoint,
                        millis: timeout.as_millis() as u64,
                    });
                }
            }
        }
    }

    /// The dead-letter list of version `id` (its physical view's, for an alias).
    pub fn parked(&self, id: &ViewId) -> Result<Vec<ParkedEvent>, LifecycleError> {
        let physical = self.inner.physical(id)?;
        parked::load(&self.inner.parked_dir(), &physical)
    }

    /// Runs the parked events of `id` through its projection again; returns how
    /// many succeeded (and left the list).
    pub async fn retry_parked(&self, id: &ViewId) -> Result<usize, LifecycleError> {
        let physical = self.inner.physical(id)?;
        let commands = {
            let st = self.inner.lock();
            st.workers.get(&physical).map(|w| w.commands.clone())
        };
        let Some(commands) = commands else {
            return Err(LifecycleError::NotReady {
                id: physical.clone(),
                state: self
                    .inner
                    .lock()
                    .registry
                    .entries
                    .get(&physical)
                    .map_or(ViewState::Retired, |e| e.state),
            });
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        commands
            .send(worker::Command::RetryParked(tx))
            .await
            .map_err(|_| LifecycleError::ShuttingDown)?;
        rx.await.map_err(|_| LifecycleError::ShuttingDown)?
    }

    /// Where version `id`'s module came from (the `label` it was deployed with).
    pub fn source_of(&self, id: &ViewId) -> Option<String> {
        let st = self.inner.lock();
        st.registry.entries.get(id).map(|e| e.source.clone())
    }

    /// The event store the lifecycle tails.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.inner.store
    }

    /// The views database (for tools and tests: digests, column families).
    pub fn views(&self) -> &ViewStore {
        &self.inner.views
    }

    /// The lifecycle's configuration.
    pub fn config(&self) -> &LifecycleConfig {
        &self.inner.config
    }

    /// Stops the watcher, the background tasks and every worker (each after its
    /// current batch), and writes the registry a last time.
    pub async fn shutdown(self) {
        self.inner.shutting_down.store(true, Ordering::Release);
        let _ = self.inner.shutdown_tx.send(true);
        let background: Vec<_> = match self.inner.background.lock() {
            Ok(mut b) => b.drain(..).collect(),
            Err(_) => Vec::new(),
        };
        for task in background {
            task.abort();
            let _ = task.await;
        }
        let workers: Vec<_> = {
            let mut st = self.inner.lock();
            st.workers.drain().map(|(_, w)| w).collect()
        };
        for w in workers {
            w.stop().await;
        }
        let mut st = self.inner.lock();
        self.inner.sync_checkpoints(&mut st);
        if let Err(e) = st.registry.save() {
            tracing::warn!("writing the registry at shutdown: {e}");
        }
        tracing::info!("lifecycle stopped");
    }
}

fn not_found_as_unknown(e: ViewError, view: &ViewId) -> LifecycleError {
    match e {
        ViewError::NotFound(_) => LifecycleError::UnknownView {
            spec: view.to_string(),
        },
        e => LifecycleError::View(e),
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the registry as the last
        // successful save described it; carry on with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push_background(&self, task: tokio::task::JoinHandle<()>) {
        if let Ok(mut b) = self.background.lock() {
            b.push(task);
        }
    }

    fn check_running(&self) -> Result<(), LifecycleError> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(LifecycleError::ShuttingDown);
        }
        Ok(())
    }

    fn modules_dir(&self) -> PathBuf {
        self.config.data_dir.join("modules")
    }

    fn parked_dir(&self) -> PathBuf {
        self.config.data_dir.join("parked")
    }

    fn module_path(&self, id: &ViewId) -> PathBuf {
        self.modules_dir().join(format!("{id}.wasm"))
    }

    /// The physical view a registered version reads.
    fn physical(&self, id: &ViewId) -> Result<ViewId, LifecycleError> {
        let st = self.lock();
        match st.registry.entries.get(id) {
            Some(e) => Ok(e.physical().clone()),
            None => Err(LifecycleError::UnknownView {
                spec: id.to_string(),
            }),
        }
    }

    fn failure_of(&self, id: &ViewId) -> Option<String> {
        let st = self.lock();
        st.registry
            .entries
            .get(id)
            .filter(|e| e.state == ViewState::Failed)
            .map(|e| e.last_error.clone().unwrap_or_else(|| "failed".into()))
    }

    /// Restarts every version from the registry: workers for running physical
    /// views, column families of retired ones dropped.
    async fn resume(self: &Arc<Self>) -> Result<(), LifecycleError> {
        let existing: Vec<ViewId> = self.views.views()?;
        let mut st = self.lock();
        let ids: Vec<ViewId> = st.registry.entries.keys().cloned().collect();
        let mut drop_cfs = Vec::new();
        for id in &ids {
            let Some(entry) = st.registry.entries.get(id).cloned() else {
                continue;
            };
            if entry.alias_of.is_some() {
                continue;
            }
            let needed = st.registry.needs_physical(id);
            if !needed {
                if existing.contains(id) {
                    drop_cfs.push(id.clone());
                }
                continue;
            }
            let checkpoint = if existing.contains(id) {
                self.views.checkpoint(id)?
            } else {
                0
            };
            let parked = parked::load(&self.parked_dir(), id).map_or(0, |p| p.len());
            let progress = Progress::new(checkpoint, entry.state == ViewState::Warming, parked);
            st.progress.insert(id.clone(), progress.clone());
            if entry.state == ViewState::Failed {
                continue;
            }
            let path = self.module_path(id);
            let module = std::fs::read(&path)
                .map_err(|e| format!("reading {}: {e}", path.display()))
                .and_then(|bytes| {
                    self.runtime
                        .load(&path.display().to_string(), &bytes)
                        .map_err(|e| e.to_string())
                });
            match module {
                Ok(module) => {
                    let poison = self.config.policy(id.name()).poison;
                    let handle = worker::spawn(self, module, progress, poison);
                    st.workers.insert(id.clone(), handle);
                }
                Err(reason) => {
                    tracing::error!(view = %id, "cannot resume: {reason}");
                    if let Some(e) = st.registry.entries.get_mut(id) {
                        e.state = ViewState::Failed;
                        e.failed_at = Some(now_millis());
                        e.last_error = Some(reason);
                    }
                }
            }
        }
        // Column families the registry does not know (a crash between creating
        // one and recording it cannot happen: the record is written first; but
        // a crash between retiring and dropping can).
        for id in &existing {
            if !st.registry.entries.contains_key(id) && !drop_cfs.contains(id) {
                drop_cfs.push(id.clone());
            }
        }
        for id in drop_cfs {
            tracing::info!(view = %id, "dropping the column family of a retired view");
            self.views.drop_view(&id)?;
        }
        let names: Vec<String> = st
            .registry
            .entries
            .keys()
            .map(|id| id.name().to_string())
            .collect();
        for name in names {
            self.auto_cutover(&mut st, &name);
        }
        st.registry.save()?;
        tracing::info!(versions = st.registry.entries.len(), "lifecycle resumed");
        Ok(())
    }

    fn deploy(
        self: &Arc<Self>,
        module: Module,
        wasm: &[u8],
        label: &str,
    ) -> Result<DeployOutcome, LifecycleError> {
        let id = module.view_id().clone();
        let fingerprint = module.fingerprint().to_string();
        let content_hash = module.content_hash().to_hex().to_string();
        let mut st = self.lock();
        if let Some(existing) = st.registry.entries.get(&id) {
            if existing.content_hash != content_hash {
                return Err(LifecycleError::ImmutableVersion {
                    id,
                    existing: existing.fingerprint.clone(),
                    new: fingerprint,
                });
            }
            if existing.state != ViewState::Retired {
                return Ok(DeployOutcome::AlreadyDeployed(id));
            }
            // The same module again after retirement: build it afresh.
            if !st.registry.needs_physical(&id) && self.views.exists(&id) {
                self.views.drop_view(&id)?;
            }
            st.registry.entries.remove(&id);
            st.progress.remove(&id);
        }
        let alias_of = st
            .registry
            .entries
            .values()
            .filter(|e| {
                e.fingerprint == fingerprint
                    && !matches!(e.state, ViewState::Retired | ViewState::Failed)
            })
            .map(|e| e.physical().clone())
            .next();
        let deploy_note = deploy_note(&st.registry, &id, &module, alias_of.as_ref());
        let path = self.module_path(&id);
        registry::write_atomically(&path, wasm, &format!("storing the module of {id}"))?;
        let now = now_millis();
        let entry = Entry {
            id: id.clone(),
            state: if alias_of.is_some() {
                ViewState::Ready
            } else {
                ViewState::Warming
            },
            alias_of: alias_of.clone(),
            fingerprint,
            fingerprint_parts: module.fingerprint_report().part_map(),
            deploy_note: Some(deploy_note),
            content_hash,
            source: label.to_string(),
            checkpoint: 0,
            deployed_at: now,
            ready_at: alias_of.as_ref().map(|_| now),
            activated_at: None,
            standby_since: None,
            retired_at: None,
            failed_at: None,
            failed_position: None,
            last_error: None,
        };
        let before = st.registry.clone();
        st.registry.entries.insert(id.clone(), entry);
        if let Some(of) = alias_of {
            self.auto_cutover(&mut st, id.name());
            if let Err(e) = st.registry.save() {
                st.registry = before;
                return Err(e);
            }
            tracing::info!(view = %id, of = %of, "deployed as an alias (unchanged logic): ready at once");
            return Ok(DeployOutcome::Alias { id, of });
        }
        if let Err(e) = st.registry.save() {
            st.registry = before;
            return Err(e);
        }
        let progress = Progress::new(0, true, 0);
        st.progress.insert(id.clone(), progress.clone());
        let poison = self.config.policy(id.name()).poison;
        let handle = worker::spawn(self, module, progress, poison);
        st.workers.insert(id.clone(), handle);
        tracing::info!(view = %id, source = label, "deployed: warming up from the first event");
        Ok(DeployOutcome::Warming(id))
    }

    /// The flip: `id` becomes active and the name's previous active becomes
    /// standby, in one registry write.
    fn promote_locked(&self, st: &mut State, id: &ViewId) -> Result<(), LifecycleError> {
        let Some(entry) = st.registry.entries.get(id) else {
            return Err(LifecycleError::UnknownView {
                spec: id.to_string(),
            });
        };
        match entry.state {
            ViewState::Active => return Ok(()),
            ViewState::Ready | ViewState::Standby => {}
            state => {
                return Err(LifecycleError::NotReady {
                    id: id.clone(),
                    state,
                });
            }
        }
        let before = st.registry.clone();
        let now = now_millis();
        let previous = st.registry.active(id.name()).map(|e| e.id.clone());
        if let Some(prev) = &previous
            && let Some(e) = st.registry.entries.get_mut(prev)
        {
            e.state = ViewState::Standby;
            e.standby_since = Some(now);
        }
        if let Some(e) = st.registry.entries.get_mut(id) {
            e.state = ViewState::Active;
            e.activated_at = Some(now);
            e.standby_since = None;
        }
        self.sync_checkpoints(st);
        if let Err(e) = st.registry.save() {
            st.registry = before;
            return Err(e);
        }
        match previous {
            Some(prev) => {
                tracing::info!(view = %id, previous = %prev, "cutover: active (previous active is standby)")
            }
            None => tracing::info!(view = %id, "cutover: active"),
        }
        Ok(())
    }

    /// Under the `auto` policy, promotes the newest ready version of `name`
    /// if it is newer than the active one. Errors are logged (the registry
    /// stays as it was).
    fn auto_cutover(&self, st: &mut State, name: &str) {
        if self.config.policy(name).cutover != CutoverPolicy::Auto {
            return;
        }
        let newest_ready = st
            .registry
            .of_name(name)
            .filter(|e| e.state == ViewState::Ready)
            .map(|e| e.id.clone())
            .max();
        let Some(candidate) = newest_ready else {
            return;
        };
        if let Some(active) = st.registry.active(name)
            && active.id > candidate
        {
            return;
        }
        if let Err(e) = self.promote_locked(st, &candidate) {
            tracing::error!(view = %candidate, "automatic cutover failed: {e}");
        }
    }

    /// A warming worker reached the head: `ready`, then the cutover policy.
    fn on_caught_up(&self, id: &ViewId) {
        let mut st = self.lock();
        let Some(entry) = st.registry.entries.get_mut(id) else {
            return;
        };
        if entry.state != ViewState::Warming {
            return;
        }
        entry.state = ViewState::Ready;
        entry.ready_at = Some(now_millis());
        if let Some(p) = st.progress.get(id) {
            p.warming.store(false, Ordering::Release);
        }
        self.sync_checkpoints(&mut st);
        if let Err(e) = st.registry.save() {
            tracing::error!(view = %id, "recording readiness: {e}");
        }
        tracing::info!(view = %id, "caught up: ready");
        self.auto_cutover(&mut st, id.name());
    }

    /// A worker stopped on an error: `failed`, with the position and reason.
    fn on_failed(&self, id: &ViewId, position: Option<Position>, reason: String) {
        let mut st = self.lock();
        st.workers.remove(id);
        if let Some(e) = st.registry.entries.get_mut(id) {
            e.state = ViewState::Failed;
            e.failed_at = Some(now_millis());
            e.failed_position = position;
            e.last_error = Some(reason);
        }
        self.sync_checkpoints(&mut st);
        if let Err(e) = st.registry.save() {
            tracing::error!(view = %id, "recording the failure: {e}");
        }
    }

    async fn retire(&self, id: &ViewId) -> Result<(), LifecycleError> {
        self.retire_if(id, |_| true).await
    }

    /// Retires `id` if `still` holds for its entry when the registry is
    /// locked for the change: the grace-period sweep passes "still a standby
    /// whose grace is over", since a rollback may have promoted it since the
    /// sweep listed it (the sweep awaits each retirement in turn).
    async fn retire_if(
        &self,
        id: &ViewId,
        still: impl FnOnce(&Entry) -> bool,
    ) -> Result<(), LifecycleError> {
        let stopping = {
            let mut st = self.lock();
            let Some(entry) = st.registry.entries.get(id) else {
                return Err(LifecycleError::UnknownView {
                    spec: id.to_string(),
                });
            };
            if entry.state == ViewState::Retired || !still(entry) {
                return Ok(());
            }
            let physical = entry.physical().clone();
            let before = st.registry.clone();
            self.sync_checkpoints(&mut st);
            if let Some(e) = st.registry.entries.get_mut(id) {
                e.state = ViewState::Retired;
                e.retired_at = Some(now_millis());
                e.standby_since = None;
            }
            if let Err(e) = st.registry.save() {
                st.registry = before;
                return Err(e);
            }
            tracing::info!(view = %id, "retired");
            if st.registry.needs_physical(&physical) {
                None
            } else {
                Some((physical.clone(), st.workers.remove(&physical)))
            }
        };
        if let Some((physical, worker)) = stopping {
            if let Some(w) = worker {
                w.stop().await;
            }
            if self.views.exists(&physical) {
                self.views.drop_view(&physical)?;
                tracing::info!(view = %physical, "column family dropped");
            }
        }
        Ok(())
    }

    /// Copies the workers' checkpoints into the registry (before a save).
    fn sync_checkpoints(&self, st: &mut State) {
        let State {
            registry, progress, ..
        } = st;
        for (id, p) in progress.iter() {
            if let Some(e) = registry.entries.get_mut(id) {
                e.checkpoint = p.checkpoint();
            }
        }
    }

    fn status_of(&self, st: &State, e: &Entry) -> ViewStatus {
        let head = self.head.load(Ordering::Acquire);
        let progress = st.progress.get(e.physical());
        let checkpoint = progress.map_or(e.checkpoint, |p| p.checkpoint());
        let own = e.alias_of.is_none();
        let rate = progress.filter(|_| own).map_or(0.0, |p| p.rate());
        let lag = head.saturating_sub(checkpoint);
        ViewStatus {
            id: e.id.to_string(),
            name: e.id.name().to_string(),
            version: e.id.version().to_string(),
            state: e.state,
            alias_of: e.alias_of.as_ref().map(ToString::to_string),
            fingerprint: e.fingerprint.clone(),
            deploy_note: e.deploy_note.clone(),
            checkpoint,
            head,
            lag,
            events_applied: progress
                .filter(|_| own)
                .map_or(0, |p| p.applied.load(Ordering::Relaxed)),
            events_per_sec: rate,
            batch_latency: progress
                .filter(|_| own)
                .map_or_else(BatchLatency::default, |p| p.batch_latency.snapshot()),
            eta_secs: (e.state == ViewState::Warming && rate > 0.0).then(|| lag as f64 / rate),
            parked: progress.map_or(0, |p| p.parked.load(Ordering::Relaxed)),
            last_error: e.last_error.clone(),
            failed_position: e.failed_position,
            deployed_at: e.deployed_at,
            ready_at: e.ready_at,
            activated_at: e.activated_at,
            standby_since: e.standby_since,
            retired_at: e.retired_at,
            failed_at: e.failed_at,
        }
    }

    /// Is `e` a standby whose grace period is over at `now`?
    fn grace_over(&self, e: &Entry, now: u64) -> bool {
        let grace = self.config.grace_of(e.id.name()).as_millis() as u64;
        e.state == ViewState::Standby
            && e.standby_since
                .is_some_and(|since| now >= since.saturating_add(grace))
    }

    /// Every 250 ms: refresh the head, sample rates, retire standbys whose
    /// grace period is over.
    async fn tick(self: Arc<Self>) {
        let mut shutdown = self.shutdown_tx.subscribe();
        let mut interval = tokio::time::interval(Duration::from_millis(250));
        let mut n: u64 = 0;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = interval.tick() => {}
            }
            n += 1;
            if let Ok(head) = self.store.head().await {
                self.head.fetch_max(head, Ordering::AcqRel);
            }
            let expired: Vec<ViewId> = {
                let st = self.lock();
                if n.is_multiple_of(4) {
                    for p in st.progress.values() {
                        p.sample_rate();
                    }
                }
                let now = now_millis();
                st.registry
                    .entries
                    .values()
                    .filter(|e| self.grace_over(e, now))
                    .map(|e| e.id.clone())
                    .collect()
            };
            for id in expired {
                tracing::info!(view = %id, "standby grace period over");
                let still = |e: &Entry| self.grace_over(e, now_millis());
                if let Err(e) = self.retire_if(&id, still).await {
                    tracing::error!(view = %id, "retiring after the grace period: {e}");
                }
            }
        }
    }
}

/// The registry entry `spec` names (see [`Lifecycle::resolve`]).
fn resolve_entry<'a>(reg: &'a Registry, spec: &'a str) -> Result<&'a Entry, LifecycleError> {
    let unknown = || LifecycleError::UnknownView {
        spec: spec.to_string(),
    };
    if let Some((name, req)) = spec.split_once('@') {
        let parsed = semver::VersionReq::parse(req).map_err(|e| LifecycleError::InvalidSpec {
            spec: spec.to_string(),
            reason: format!("bad semver requirement: {e}"),
        })?;
        if reg.of_name(name).next().is_none() {
            return Err(unknown());
        }
        return reg
            .of_name(name)
            .filter(|e| e.state.is_servable() && parsed.matches(e.id.version()))
            .max_by(|a, b| a.id.cmp(&b.id))
            .ok_or_else(|| LifecycleError::NoMatchingVersion {
                name: name.to_string(),
                req: req.to_string(),
            });
    }
    if let Ok(id) = spec.parse::<ViewId>() {
        return match reg.entries.get(&id) {
            Some(e) if e.state == ViewState::Retired => Err(LifecycleError::Retired { id }),
            Some(e) => Ok(e),
            None => Err(unknown()),
        };
    }
    crate::views::check_name(spec).map_err(|e| LifecycleError::InvalidSpec {
        spec: spec.to_string(),
        reason: e.to_string(),
    })?;
    match reg.active(spec) {
        Some(e) => Ok(e),
        None if reg.of_name(spec).next().is_some() => Err(LifecycleError::NoActiveVersion {
            name: spec.to_string(),
        }),
        None => Err(unknown()),
    }
}

/// Why `id` aliases `alias_of`, or else how its fingerprint differs from the
/// nearest other version of its name (the newest below it, else the oldest
/// above), for the operator.
fn deploy_note(
    registry: &Registry,
    id: &ViewId,
    module: &Module,
    alias_of: Option<&ViewId>,
) -> String {
    use crate::runtime::fingerprint;
    let report = module.fingerprint_report();
    if let Some(of) = alias_of {
        return fingerprint::explain_alias(report, &of.to_string());
    }
    let others = || registry.of_name(id.name()).filter(|e| e.id != *id);
    let nearest = others()
        .filter(|e| e.id < *id)
        .max_by(|a, b| a.id.cmp(&b.id))
        .or_else(|| others().min_by(|a, b| a.id.cmp(&b.id)));
    let other_id = nearest.map(|e| e.id.to_string());
    fingerprint::explain_new_view(
        report,
        nearest
            .zip(other_id.as_deref())
            .map(|(e, other)| (other, e.fingerprint.as_str(), &e.fingerprint_parts)),
    )
}
