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
//! Every transition is a pure function of the registry in [`machine`]
//! (model-tested there over generated sequences); this module runs their
//! effects: workers, column families, files. Operations that change the
//! registry (deploy, promote, rollback, retire, the grace sweep) run one at a
//! time under the operations lock, so a retirement, its worker's stop and
//! its column family's drop are never interleaved with a redeploy.
//!
//! Operator safety:
//! - A name resolves only to a version whose view has caught up. An alias of a
//!   warming view warms with it (ready when it is); an alias of a failed view
//!   fails with it.
//! - The last good copy of a name is never dropped by the daemon on its own:
//!   when the active version fails, the name falls back to its newest healthy
//!   standby ([`Lifecycle::auto_rollbacks`] counts it), or else keeps serving
//!   the failed version's documents marked stale ([`Resolved::stale`]); the
//!   grace sweep retires standbys only while the name's active version is
//!   healthy; the active version cannot be retired.
//! - Operator decisions last: a retired version never comes back from the
//!   watched directory (only from an explicit deploy), and a module file that
//!   is renamed or copied keeps owning its version.
//! - State on disk is trusted, never guessed: a missing registry with views or
//!   modules present refuses to start ([`LifecycleError::RegistryMissing`])
//!   unless [`LifecycleConfig::recover_registry`] is set.
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

mod compare;
mod config;
mod error;
mod fleet;
mod machine;
mod parked;
mod registry;
mod snapshot;
mod status;
mod watch;
mod worker;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::runtime::{LoadError, Module, ProjectionError, Runtime};
use crate::snapshots::{SnapshotActivity, SnapshotError, SnapshotManifest, Snapshots};
use crate::store::{EventStore, Position, StoreError};
use crate::views::{ViewError, ViewId, ViewStore};

pub use compare::{CheckResult, CutoverCheck, Diff, Unmet};
pub use config::*;
pub use error::LifecycleError;
pub use fleet::{FLEET_ROLLBACK, FleetCoordinator, FleetDecision, FleetServing};
use machine::{Cutover, DeployPlan, Fallback, NewVersion, Origin, Physical};
pub use parked::ParkedEvent;
use registry::{Entry, Loaded, Registry};
pub use status::*;
use worker::{Priority, Progress, WorkerHandle};

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
    /// Held by every operation that changes the registry and awaits effects
    /// (deploy, promote, rollback, retire, the grace sweep): they run one at
    /// a time. Never taken by workers or readers.
    ops: tokio::sync::Mutex<()>,
    /// Automatic rollbacks after an active version failed.
    auto_rollbacks: AtomicU64,
    /// Module files the watcher read (an idle directory reads none).
    watch_reads: AtomicU64,
    /// Files of the watched directory that changed and are not settled yet
    /// (waiting out the debounce, or being read and deployed).
    watch_pending: AtomicUsize,
    /// Changes notify reported that the watcher has not taken in yet.
    watch_queued: Arc<AtomicUsize>,
    /// Last log head seen (by a worker or the head poller).
    head: AtomicU64,
    priority: Arc<Priority>,
    /// `config.warmup_workers`, changeable while running (for benchmarks).
    warmup_workers: AtomicUsize,
    /// The fleet's decisions and contact (`cutover = "fleet"`, see [`fleet`]).
    fleet: fleet::FleetLink,
    shutting_down: AtomicBool,
    shutdown_tx: tokio::sync::watch::Sender<bool>,
    /// Bumped on every registry write (comparisons watch their versions'
    /// states through it).
    registry_tx: tokio::sync::watch::Sender<u64>,
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
        for dir in [config.data_dir.clone(), config.data_dir.join("modules")] {
            std::fs::create_dir_all(&dir)
                .map_err(LifecycleError::io("creating the data directory", &dir))?;
        }
        let views_dir = config.data_dir.join("views");
        let views = tokio::task::spawn_blocking(move || ViewStore::open(views_dir))
            .await
            .map_err(|e| LifecycleError::Internal(e.to_string()))??;
        let registry = open_registry(&config, &views, &runtime)?;
        let moved = parked::migrate_files(&config.data_dir.join("parked"), &views)?;
        if moved > 0 {
            tracing::info!(
                moved,
                "dead letters moved from parked/*.json into the views database"
            );
        }
        // Written in this format from now on (an older kiln refuses it).
        registry.save()?;
        let head = store.head().await?;
        let (shutdown_tx, _) = tokio::sync::watch::channel(false);
        let (registry_tx, _) = tokio::sync::watch::channel(0u64);
        let warmup_workers = config.warmup_workers.clamp(1, MAX_WARMUP_WORKERS);
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
            ops: tokio::sync::Mutex::new(()),
            auto_rollbacks: AtomicU64::new(0),
            watch_reads: AtomicU64::new(0),
            watch_pending: AtomicUsize::new(0),
            watch_queued: Arc::new(AtomicUsize::new(0)),
            head: AtomicU64::new(head),
            priority: Arc::new(Priority::default()),
            warmup_workers: AtomicUsize::new(warmup_workers),
            fleet: fleet::FleetLink::default(),
            shutting_down: AtomicBool::new(false),
            shutdown_tx,
            registry_tx,
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
    ///
    /// This is an explicit deploy (API, CLI): it also brings back a retired
    /// version, which the watched directory never does.
    pub async fn deploy(&self, wasm: &[u8], label: &str) -> Result<DeployOutcome, LifecycleError> {
        self.deploy_from(wasm, label, Origin::Explicit).await
    }

    async fn deploy_from(
        &self,
        wasm: &[u8],
        label: &str,
        origin: Origin,
    ) -> Result<DeployOutcome, LifecycleError> {
        self.inner.check_running()?;
        let runtime = self.inner.runtime.clone();
        let (bytes, owned_label) = (wasm.to_vec(), label.to_string());
        // Compiled before the operations lock: a slow compile holds up no one.
        let module = tokio::task::spawn_blocking(move || runtime.load(&owned_label, &bytes))
            .await
            .map_err(|e| LifecycleError::Internal(e.to_string()))??;
        let outcome = {
            let _ops = self.inner.ops.lock().await;
            self.inner.check_running()?;
            self.inner.deploy(module, wasm, label, origin)?
        };
        // A fleet member's record lists it before the deploy is answered
        // (`kiln fleet status` right after shows it, logic included).
        if !matches!(outcome, DeployOutcome::AlreadyDeployed(_)) {
            self.inner.announce(outcome.id()).await;
        }
        Ok(outcome)
    }

    /// Makes `id` (ready or standby) the active version of its name, in one
    /// registry write; the previous active becomes standby.
    pub async fn promote(&self, id: &ViewId) -> Result<(), LifecycleError> {
        self.inner.check_running()?;
        if let Some(done) = self.promote_via_fleet(id, "promote").await {
            return done;
        }
        let _ops = self.inner.ops.lock().await;
        let mut st = self.inner.lock();
        self.inner.promote_locked(&mut st, id, "promote")
    }

    /// Promotes the most recent standby version of `name` (whose view is
    /// live) back to active.
    pub async fn rollback(&self, name: &str) -> Result<ViewId, LifecycleError> {
        self.inner.check_running()?;
        if let Some(done) = self.rollback_via_fleet(name).await {
            return done;
        }
        let _ops = self.inner.ops.lock().await;
        let mut st = self.inner.lock();
        let Some(id) = st.registry.rollback_target(name) else {
            if st.registry.of_name(name).next().is_none() {
                return Err(LifecycleError::UnknownView {
                    spec: name.to_string(),
                });
            }
            return Err(LifecycleError::NoStandby {
                name: name.to_string(),
            });
        };
        self.inner.promote_locked(&mut st, &id, "rollback")?;
        tracing::info!(view = %id, "rolled back");
        Ok(id)
    }

    /// Retires `id` now: its worker stops and its column family is dropped
    /// (kept while an alias still reads it). An operator's decision: the
    /// active version too (its name then has no active version).
    pub async fn retire(&self, id: &ViewId) -> Result<(), LifecycleError> {
        self.inner.check_running()?;
        let _ops = self.inner.ops.lock().await;
        self.inner.retire_if(id, true, |_, _| true).await
    }

    /// Retires `id` unless it is the active version
    /// ([`LifecycleError::RetireActive`]): what the daemon does on its own
    /// when a module file is removed.
    async fn retire_unless_active(&self, id: &ViewId) -> Result<(), LifecycleError> {
        self.inner.check_running()?;
        let _ops = self.inner.ops.lock().await;
        self.inner.retire_if(id, false, |_, _| true).await
    }

    /// Resumes failed version `id` (its physical view, and every failed
    /// version reading it) from its checkpoint, after an operator dealt with
    /// the cause (parked the poison event, freed the disk): it warms from
    /// there, nothing before it replayed, and is ready once caught up (a
    /// version that served its name stale is active again then).
    pub async fn resume(&self, id: &ViewId) -> Result<(), LifecycleError> {
        self.inner.check_running()?;
        let physical = self.inner.physical(id)?;
        let path = self.inner.module_path(&physical);
        let bytes = tokio::fs::read(&path).await.map_err(LifecycleError::io(
            format!("reading the module of {physical}"),
            &path,
        ))?;
        let runtime = self.inner.runtime.clone();
        let label = path.display().to_string();
        let module = tokio::task::spawn_blocking(move || runtime.load(&label, &bytes))
            .await
            .map_err(|e| LifecycleError::Internal(e.to_string()))??;
        let _ops = self.inner.ops.lock().await;
        let inner = &self.inner;
        let mut st = inner.lock();
        let before = st.registry.clone();
        st.registry.resume(&physical)?;
        inner.commit(&mut st, before)?;
        let checkpoint = inner.views.checkpoint(&physical).unwrap_or(0);
        let parked = parked::count(&inner.views, &physical);
        let progress = Progress::new(checkpoint, true, parked);
        st.progress.insert(physical.clone(), progress.clone());
        let poison = inner.config.policy(physical.name()).poison;
        let handle = worker::spawn(inner, module, progress, poison);
        st.workers.insert(physical.clone(), handle);
        tracing::info!(view = %physical, checkpoint, "resumed from its checkpoint");
        Ok(())
    }

    /// Runs the standby grace sweep as if the clock read `now_millis` (ms
    /// since the Unix epoch). The daemon runs it every 250 ms with the real
    /// clock; tests use this to let the grace period pass.
    #[doc(hidden)]
    pub async fn sweep_at(&self, now_millis: u64) {
        self.inner.sweep(now_millis).await;
    }

    /// Automatic rollbacks since start (the active version failed and a
    /// healthy standby took over), for `/metrics`.
    pub fn auto_rollbacks(&self) -> u64 {
        self.inner.auto_rollbacks.load(Ordering::Relaxed)
    }

    /// Module files the directory watcher has read since start, for
    /// `/metrics` (an idle directory reads none).
    pub fn watch_reads(&self) -> u64 {
        self.inner.watch_reads.load(Ordering::Relaxed)
    }

    /// Files of the watched directory that changed and are not deployed (or
    /// retired) yet: `kiln status --wait` waits for them too, so a module
    /// copied in just before it is not missed.
    pub fn watch_pending(&self) -> usize {
        // Queued first: the watcher counts a change as pending before it
        // takes it off the queue, so one of the two always holds it.
        let queued = self.inner.watch_queued.load(Ordering::Acquire);
        queued + self.inner.watch_pending.load(Ordering::Acquire)
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

    /// The instance whose replay built physical view `view`'s documents,
    /// when it was filled from a snapshot (`None`: replayed here).
    pub fn lineage_of(&self, view: &ViewId) -> Option<String> {
        self.inner.views.lineage(view).ok().flatten()
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
        if let Some(fleet) = self.resolve_fleet(&st.registry, spec) {
            return fleet;
        }
        let e = resolve_entry(&st.registry, spec)?;
        Ok(Resolved {
            version: e.id.clone(),
            physical: e.physical().clone(),
            stale: e.serving_stale,
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
    /// order, after key `after` when given (paging), stopping once they hold
    /// `max_bytes` (at least one).
    pub fn scan(
        &self,
        view: &ViewId,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Documents, LifecycleError> {
        let physical = self.inner.physical(view)?;
        self.inner
            .views
            .scan_bounded(&physical, prefix, after, limit, max_bytes)
            .map_err(|e| not_found_as_unknown(e, view))
    }

    /// The checkpoint of `view` (its physical view's), if it is deployed.
    pub fn checkpoint_of(&self, view: &ViewId) -> Option<u64> {
        let physical = self.inner.physical(view).ok()?;
        let st = self.inner.lock();
        st.progress.get(&physical).map(|p| p.checkpoint())
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
        Ok(parked::load(&self.inner.views, &physical)?
            .iter()
            .map(parked::Parked::to_api)
            .collect())
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

    /// The blake3 hex of version `id`'s module bytes.
    pub fn content_hash_of(&self, id: &ViewId) -> Option<String> {
        let st = self.inner.lock();
        st.registry.entries.get(id).map(|e| e.content_hash.clone())
    }

    /// The event store the lifecycle tails.
    /// Holds off admin operations (deploy, promote, rollback, retire,
    /// resume, the standby sweep) while the guard lives, so no view is created
    /// or dropped meanwhile: a backup copies the registry and the views whole.
    pub async fn pause_operations(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.inner.ops.lock().await
    }

    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.inner.store
    }

    /// The views database (for tools and tests: digests, column families).
    pub fn views(&self) -> &ViewStore {
        &self.inner.views
    }

    /// Sets the workers of warm-ups that start from now on (see
    /// [`LifecycleConfig::warmup_workers`]; for benchmarks comparing them in
    /// one process).
    #[doc(hidden)]
    pub fn set_warmup_workers(&self, workers: usize) {
        self.inner
            .warmup_workers
            .store(workers.clamp(1, MAX_WARMUP_WORKERS), Ordering::Relaxed);
    }

    pub fn config(&self) -> &LifecycleConfig {
        &self.inner.config
    }

    /// Stops the watcher, the background tasks and every worker (each after its
    /// current batch), and writes the registry a last time.
    pub async fn shutdown(self) {
        let workers = self.stop_background().await;
        for w in workers {
            w.stop().await;
        }
        if let Some(s) = &self.inner.config.snapshots {
            // Others waiting for a snapshot this instance was building take
            // over now rather than after the lease's time to live.
            s.release_all().await;
        }
        {
            let mut st = self.inner.lock();
            self.inner.sync_checkpoints(&mut st);
            if let Err(e) = st.registry.save() {
                tracing::warn!("writing the registry at shutdown: {e}");
            }
        }
        self.release().await;
        tracing::info!("lifecycle stopped");
    }

    /// Stops everything at its next await point without a last registry
    /// write, as `kill -9` would (the registry on disk is the last one a
    /// transition wrote). For crash tests; the views database is closed when
    /// this returns, so the same data directory can be started again.
    #[doc(hidden)]
    pub async fn abandon(self) {
        let workers = self.stop_background().await;
        for w in workers {
            w.abort().await;
        }
        self.release().await;
    }

    /// Refuses new operations, stops the watcher and background tasks, and
    /// hands back the workers.
    async fn stop_background(&self) -> Vec<worker::WorkerHandle> {
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
        let mut st = self.inner.lock();
        st.workers.drain().map(|(_, w)| w).collect()
    }

    /// Waits (a bounded while) until this handle is the last user of the
    /// lifecycle and its views database: a blocking batch whose worker was
    /// stopped may still be finishing.
    async fn release(self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&self.inner) > 1 || self.inner.views.handles() > 1 {
            if tokio::time::Instant::now() >= deadline {
                tracing::debug!("the lifecycle is still referenced after stopping");
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Reads `registry.json`, migrating an older format. A missing or unreadable
/// registry is a fresh start only when the data directory holds no views and
/// no modules; otherwise kiln refuses, unless `recover_registry` is set.
fn open_registry(
    config: &LifecycleConfig,
    views: &ViewStore,
    runtime: &Runtime,
) -> Result<Registry, LifecycleError> {
    let path = config.data_dir.join("registry.json");
    let lost = match Registry::load(&path) {
        Ok(Loaded::Current(r)) => return Ok(r),
        Ok(Loaded::Older { registry, format }) => {
            tracing::info!(format, "registry of an older format: migrating it");
            return Ok(registry);
        }
        Ok(Loaded::Missing(empty)) => {
            let Some(what) = data_present(config, views)? else {
                return Ok(empty); // A fresh data directory.
            };
            if !config.recover_registry {
                return Err(LifecycleError::RegistryMissing { path, what });
            }
            what
        }
        Err(e @ LifecycleError::CorruptRegistry { .. }) if config.recover_registry => {
            let aside = path.with_extension(format!("json.corrupt-{}", now_millis()));
            std::fs::rename(&path, &aside).map_err(LifecycleError::io(
                "moving the corrupt registry aside",
                &path,
            ))?;
            tracing::warn!(kept = %aside.display(), "{e}: rebuilding it");
            format!("a corrupt registry (kept as {})", aside.display())
        }
        Err(e) => return Err(e),
    };
    tracing::warn!(
        "--recover-registry: rebuilding the registry from the deployed modules ({lost})"
    );
    let mut registry = Registry::empty(&path);
    let modules = config.data_dir.join("modules");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&modules)
        .map_err(LifecycleError::io(
            "reading the modules directory",
            &modules,
        ))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
        .collect();
    files.sort();
    for file in files {
        let loaded = std::fs::read(&file)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                runtime
                    .load(&file.display().to_string(), &bytes)
                    .map(|m| (m, bytes))
                    .map_err(|e| e.to_string())
            });
        let module = match loaded {
            Ok((m, _)) => m,
            Err(e) => {
                tracing::error!(file = %file.display(), "not recovered (its view, if any, is left in place): {e}");
                continue;
            }
        };
        let id = module.view_id().clone();
        registry.deploy(
            NewVersion {
                id: id.clone(),
                fingerprint: module.fingerprint().to_string(),
                content_hash: module.content_hash().to_hex().to_string(),
                source: format!("recovered from {}", file.display()),
                now: now_millis(),
            },
            Origin::Explicit,
            |_| false,
        )?;
        if let Some(e) = registry.entries.get_mut(&id) {
            e.fingerprint_parts = module.fingerprint_report().part_map();
            e.deploy_note = Some("recovered with --recover-registry".into());
        }
        tracing::info!(view = %id, "recovered: resumes from its view's checkpoint, warming until it catches up");
    }
    Ok(registry)
}

/// What of a previous run the data directory holds (views, modules), if anything.
fn data_present(
    config: &LifecycleConfig,
    views: &ViewStore,
) -> Result<Option<String>, LifecycleError> {
    let mut found = Vec::new();
    let ids = views.views()?;
    if !ids.is_empty() {
        let list: Vec<String> = ids.iter().map(ToString::to_string).collect();
        found.push(format!("views {}", list.join(", ")));
    }
    let modules = config.data_dir.join("modules");
    let wasm = std::fs::read_dir(&modules)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "wasm"))
                .count()
        })
        .unwrap_or(0);
    if wasm > 0 {
        found.push(format!(
            "{wasm} deployed module(s) in {}",
            modules.display()
        ));
    }
    Ok((!found.is_empty()).then(|| found.join(" and ")))
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

    /// Reads and loads (compiles) the deployed module of physical view `id`.
    fn load_module(&self, id: &ViewId) -> Result<Module, String> {
        let path = self.module_path(id);
        std::fs::read(&path)
            .map_err(|e| format!("reading {}: {e}", path.display()))
            .and_then(|bytes| {
                self.runtime
                    .load(&path.display().to_string(), &bytes)
                    .map_err(|e| e.to_string())
            })
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

    /// Saves the registry after a transition (checkpoints copied in first);
    /// on failure the registry goes back to `before` and nothing happened.
    fn commit(&self, st: &mut State, before: Registry) -> Result<(), LifecycleError> {
        self.sync_checkpoints(st);
        if let Err(e) = st.registry.save() {
            st.registry = before;
            return Err(e);
        }
        self.registry_tx.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Restarts every version from the registry: workers for the physical
    /// views still read, column families nothing reads dropped.
    async fn resume(self: &Arc<Self>) -> Result<(), LifecycleError> {
        let existing: Vec<ViewId> = self.views.views()?;
        // Compiled before the state lock is taken (and off the async
        // threads): a slow compile holds up no one.
        let to_load: BTreeSet<ViewId> = {
            let st = self.lock();
            st.registry
                .entries
                .values()
                .map(|e| e.physical().clone())
                .collect()
        };
        let this = self.clone();
        let mut loaded = tokio::task::spawn_blocking(move || {
            to_load
                .into_iter()
                .map(|id| {
                    let module = this.load_module(&id);
                    (id, module)
                })
                .collect::<HashMap<ViewId, Result<Module, String>>>()
        })
        .await
        .map_err(|e| LifecycleError::Internal(e.to_string()))?;
        let mut st = self.lock();
        let physicals: BTreeSet<ViewId> = st
            .registry
            .entries
            .values()
            .map(|e| e.physical().clone())
            .collect();
        let mut drop_cfs = Vec::new();
        for id in &physicals {
            let state = st.registry.physical_state(id);
            if state == Physical::Gone {
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
            let parked = parked::count(&self.views, id);
            let progress = Progress::new(checkpoint, state == Physical::Warming, parked);
            st.progress.insert(id.clone(), progress.clone());
            if state == Physical::Failed {
                continue;
            }
            let module = match loaded.remove(id) {
                Some(module) => module,
                None => self.load_module(id),
            };
            match module {
                Ok(module) => {
                    let poison = self.config.policy(id.name()).poison;
                    let handle = worker::spawn(self, module, progress, poison);
                    st.workers.insert(id.clone(), handle);
                }
                Err(reason) => {
                    tracing::error!(view = %id, "cannot resume: {reason}");
                    let reason = format!("cannot resume: {reason}");
                    for fb in st.registry.failed(id, None, &reason, now_millis()) {
                        self.log_fallback(&fb);
                    }
                }
            }
        }
        // A column family the registry does not know is left alone: state on
        // disk is never guessed away.
        for id in &existing {
            if !physicals.contains(id) {
                tracing::warn!(view = %id, "a view column family the registry does not know: left in place");
            }
        }
        for id in drop_cfs {
            tracing::info!(view = %id, "dropping the column family of a retired view");
            self.views.drop_view(&id)?;
        }
        // No cutover decision here: a version is cut over when it becomes
        // ready, in the same registry write; a restart re-decides nothing
        // (an operator's rollback beside a newer ready version stays).
        st.registry.save()?;
        tracing::info!(versions = st.registry.entries.len(), "lifecycle resumed");
        // A cutover check a stop interrupted is taken again.
        let unfinished: Vec<(ViewId, ViewId)> = st
            .registry
            .entries
            .values()
            .filter(|e| e.state == ViewState::Ready)
            .filter_map(|e| {
                let c = e.cutover_check.as_ref()?;
                let against = c.against.parse().ok()?;
                (c.result == CheckResult::Pending).then(|| (e.id.clone(), against))
            })
            .collect();
        drop(st);
        for (candidate, against) in unfinished {
            let promote =
                self.config.policy(candidate.name()).cutover == CutoverPolicy::AutoIfIdentical;
            self.start_check(candidate, against, promote);
        }
        Ok(())
    }

    fn deploy(
        self: &Arc<Self>,
        module: Module,
        wasm: &[u8],
        label: &str,
        origin: Origin,
    ) -> Result<DeployOutcome, LifecycleError> {
        let id = module.view_id().clone();
        let mut st = self.lock();
        let before = st.registry.clone();
        let running: HashSet<ViewId> = st.workers.keys().cloned().collect();
        let plan = st.registry.deploy(
            NewVersion {
                id: id.clone(),
                fingerprint: module.fingerprint().to_string(),
                content_hash: module.content_hash().to_hex().to_string(),
                source: label.to_string(),
                now: now_millis(),
            },
            origin,
            |p| running.contains(p),
        )?;
        let (alias_of, state, start_worker) = match plan {
            DeployPlan::Already => {
                let moved = before.entries.get(&id).map(|e| e.source.as_str()) != Some(label);
                if moved {
                    // A renamed or copied file: it owns the version now.
                    let from = before.entries.get(&id).map(|e| e.source.clone());
                    self.commit(&mut st, before)?;
                    tracing::info!(view = %id, from = from.as_deref().unwrap_or("?"), to = label, "its module file was renamed or copied: it keeps its version");
                }
                return Ok(DeployOutcome::AlreadyDeployed(id));
            }
            DeployPlan::StaysRetired => return Ok(DeployOutcome::StaysRetired(id)),
            DeployPlan::Registered {
                alias_of,
                state,
                start_worker,
            } => (alias_of, state, start_worker),
        };
        let note = if alias_of.is_none() && !start_worker {
            "a retired version brought back: its view was still read by an alias, nothing replayed"
                .to_string()
        } else {
            deploy_note(&st.registry, &id, &module, alias_of.as_ref())
        };
        if let Some(e) = st.registry.entries.get_mut(&id) {
            e.fingerprint_parts = module.fingerprint_report().part_map();
            e.deploy_note = Some(note);
        }
        let stored = registry::write_atomically(
            &self.module_path(&id),
            wasm,
            &format!("storing the module of {id}"),
        );
        if let Err(e) = stored {
            st.registry = before;
            return Err(e);
        }
        if start_worker && !running.contains(&id) && self.views.exists(&id) {
            // A retired version built afresh: its old documents go first (no
            // worker writes them: retirements run one at a time with deploys).
            if let Err(e) = self.views.drop_view(&id) {
                st.registry = before;
                return Err(e.into());
            }
        }
        let cutover = self.cutover(&mut st.registry, id.name());
        self.commit(&mut st, before)?;
        self.after_cutover(cutover);
        if start_worker {
            let progress = Progress::new(0, true, 0);
            // Deployed after the fleet chose it (a member back with its
            // modules): warmed first from the start, not from the next
            // time the decision is applied.
            if self.fleet_role(&id) == Some("active") {
                progress.fleet_first.store(true, Ordering::Release);
                tracing::info!(view = %id, "the fleet serves it: warming it first");
            }
            st.progress.insert(id.clone(), progress.clone());
            let poison = self.config.policy(id.name()).poison;
            let handle = worker::spawn(self, module, progress, poison);
            st.workers.insert(id.clone(), handle);
        }
        let outcome = match alias_of {
            Some(of) => {
                tracing::info!(view = %id, of = %of, %state, "deployed as an alias (unchanged logic): reads {of}, nothing replayed");
                DeployOutcome::Alias { id, of }
            }
            None if start_worker => {
                tracing::info!(view = %id, source = label, "deployed: warming up from the first event");
                DeployOutcome::Warming(id)
            }
            None => {
                tracing::info!(view = %id, %state, "a retired version brought back: its view was still live");
                DeployOutcome::Restored(id)
            }
        };
        Ok(outcome)
    }

    /// The flip: `id` becomes active and the name's previous active becomes
    /// standby, in one registry write.
    fn promote_locked(&self, st: &mut State, id: &ViewId, how: &str) -> Result<(), LifecycleError> {
        let before = st.registry.clone();
        let previous = st.registry.promote(id, now_millis(), how)?;
        if before.entries.get(id).map(|e| e.state) == Some(ViewState::Active) {
            return Ok(());
        }
        self.commit(st, before)?;
        log_cutover(id, previous.as_ref(), how);
        Ok(())
    }

    /// The name's cutover policy, now that a version of it may be ready
    /// ([`Registry::cutover_plan`]): a promote happens in `reg` (the caller
    /// commits, then calls [`Self::after_cutover`]); a comparison is
    /// recorded as pending and started by [`Self::after_cutover`].
    fn cutover(&self, reg: &mut Registry, name: &str) -> Option<Planned> {
        let policy = self.config.policy(name).cutover;
        match reg.cutover_plan(name, policy, now_millis())? {
            Cutover::Promote(candidate) => {
                let how = match policy {
                    CutoverPolicy::AutoIfIdentical => {
                        "auto-if-identical cutover (no active version to compare with, or the same view)"
                    }
                    _ => "auto cutover",
                };
                match reg.promote(&candidate, now_millis(), how) {
                    Ok(previous) => Some(Planned::Promoted(candidate, previous)),
                    Err(e) => {
                        tracing::error!(view = %candidate, "automatic cutover failed: {e}");
                        None
                    }
                }
            }
            Cutover::Compare {
                candidate,
                against,
                promote_if_identical,
            } => Some(Planned::Compare(candidate, against, promote_if_identical)),
        }
    }

    /// What [`Self::cutover`] planned, once the registry is committed.
    fn after_cutover(self: &Arc<Self>, planned: Option<Planned>) {
        match planned {
            Some(Planned::Promoted(to, previous)) => {
                log_cutover(&to, previous.as_ref(), "auto cutover")
            }
            Some(Planned::Compare(candidate, against, promote)) => {
                tracing::info!(view = %candidate, against = %against, "ready: comparing its documents with the active version's");
                self.start_check(candidate, against, promote);
            }
            None => {}
        }
    }

    /// A warming physical view reached the head: it and its aliases are
    /// `ready`, then the cutover policy.
    fn on_caught_up(self: &Arc<Self>, id: &ViewId) {
        let mut st = self.lock();
        if st.registry.physical_state(id) != Physical::Warming {
            return;
        }
        let before = st.registry.clone();
        let names = st.registry.caught_up(id, now_millis());
        // Ready and its cutover land in one registry write: a crash between
        // the two cannot leave a version ready that auto would have promoted.
        let cutovers: Vec<_> = names
            .iter()
            .filter_map(|name| self.cutover(&mut st.registry, name))
            .collect();
        if let Err(e) = self.commit(&mut st, before) {
            // Still warming; the worker tries again after its next batch.
            tracing::error!(view = %id, "recording readiness: {e}");
            return;
        }
        if let Some(p) = st.progress.get(id) {
            p.warming.store(false, Ordering::Release);
        }
        tracing::info!(view = %id, "caught up: ready");
        let fingerprint = st.registry.entries.get(id).map(|e| e.fingerprint.clone());
        drop(st);
        for planned in cutovers {
            self.after_cutover(Some(planned));
        }
        if let (Some(snapshots), Some(fingerprint)) = (self.config.snapshots.clone(), fingerprint) {
            self.ship_built(snapshots, id, fingerprint);
        }
    }

    /// A worker stopped on an error: its versions are `failed`; a name whose
    /// active version it was falls back (see [`Registry::failed`]).
    fn on_failed(&self, id: &ViewId, position: Option<Position>, reason: String) {
        if let Some(s) = self.config.snapshots.clone() {
            // A failed warm-up publishes nothing: instances waiting for its
            // snapshot build (and fail, or not, on their own).
            let id = id.clone();
            self.push_background(tokio::spawn(async move { s.release(&id).await }));
        }
        let mut st = self.lock();
        st.workers.remove(id);
        let fallbacks = st.registry.failed(id, position, &reason, now_millis());
        for fb in &fallbacks {
            self.log_fallback(fb);
        }
        self.sync_checkpoints(&mut st);
        if let Err(e) = st.registry.save() {
            tracing::error!(view = %id, "recording the failure: {e}");
        }
    }

    fn log_fallback(&self, fb: &Fallback) {
        match &fb.to {
            Some(to) => {
                self.auto_rollbacks.fetch_add(1, Ordering::Relaxed);
                tracing::error!(view = %fb.failed, rolled_back_to = %to, "the active version failed: rolled back to its standby automatically");
            }
            None => {
                tracing::error!(view = %fb.failed, "the active version failed and has no healthy standby: it keeps serving its documents, marked stale")
            }
        }
    }

    /// Retires `id` if `still` holds when the registry is locked for the
    /// change (the grace sweep passes "still an expired standby"). The caller
    /// holds the operations lock, so no deploy runs between the retirement,
    /// the worker's stop and the drop of the column family.
    async fn retire_if(
        &self,
        id: &ViewId,
        active_too: bool,
        still: impl FnOnce(&Registry, &Entry) -> bool,
    ) -> Result<(), LifecycleError> {
        let release = {
            let mut st = self.lock();
            let Some(entry) = st.registry.entries.get(id) else {
                return Err(LifecycleError::UnknownView {
                    spec: id.to_string(),
                });
            };
            if entry.state == ViewState::Retired || !still(&st.registry, entry) {
                return Ok(());
            }
            if let Some(role) = self.fleet_role(id) {
                return Err(LifecycleError::RetireFleetVersion {
                    id: id.clone(),
                    role,
                });
            }
            let before = st.registry.clone();
            let release = st.registry.retire(id, now_millis(), active_too)?;
            self.commit(&mut st, before)?;
            tracing::info!(view = %id, "retired");
            release.map(|p| {
                let worker = st.workers.remove(&p);
                (p, worker)
            })
        };
        if let Some((physical, worker)) = release {
            if let Some(w) = worker {
                w.stop().await;
            }
            // Building it no more: instances waiting for its snapshot build.
            if let Some(s) = &self.config.snapshots {
                s.release(&physical).await;
            }
            let st = self.lock();
            if !st.registry.needs_physical(&physical)
                && !st.workers.contains_key(&physical)
                && self.views.exists(&physical)
            {
                self.views.drop_view(&physical)?;
                tracing::info!(view = %physical, "column family dropped");
            }
        }
        self.announce(id).await;
        Ok(())
    }

    /// Copies the workers' checkpoints into the registry (before a save).
    fn sync_checkpoints(&self, st: &mut State) {
        let State {
            registry, progress, ..
        } = st;
        for e in registry.entries.values_mut() {
            if let Some(p) = progress.get(e.physical()) {
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
            warmup_workers: progress
                .map(|p| p.partitions.load(Ordering::Relaxed))
                .filter(|n| *n > 1),
            grouped_events: progress
                .filter(|_| own)
                .map_or(0, |p| p.grouped.load(Ordering::Relaxed)),
            paused: progress.and_then(|p| p.paused()),
            warning: progress.and_then(|p| p.warning()),
            host_faults: progress.map_or(0, |p| p.faults.load(Ordering::Relaxed)),
            awaited: progress.filter(|_| own).map_or(0, |p| p.marks.awaited()),
            stalled_secs: progress
                .filter(|_| {
                    lag > 0
                        && matches!(
                            e.state,
                            ViewState::Ready | ViewState::Active | ViewState::Standby
                        )
                })
                .map(|p| p.still_for())
                .filter(|d| *d >= self.config.stall_after)
                .map(|d| d.as_secs_f64()),
            last_error: e.last_error.clone(),
            failed_position: e.failed_position,
            serving_stale: e.serving_stale,
            activated_by: e.activated_by.clone(),
            cutover_check: e.cutover_check.clone(),
            snapshot: progress
                .filter(|_| own)
                .and_then(|p| p.snapshot.lock().ok().and_then(|g| g.clone())),
            last_snapshot: self
                .config
                .snapshots
                .as_ref()
                .filter(|_| own)
                .and_then(|s| s.last_published(e.physical())),
            source: e.source.clone(),
            deployed_at: e.deployed_at,
            ready_at: e.ready_at,
            activated_at: e.activated_at,
            standby_since: e.standby_since,
            retired_at: e.retired_at,
            failed_at: e.failed_at,
        }
    }

    /// The grace-period sweep at clock reading `now`: retires the standbys
    /// whose grace is over, of names whose active version is healthy.
    async fn sweep(&self, now: u64) {
        let grace = |name: &str| self.config.grace_of(name).as_millis() as u64;
        let expired = self.lock().registry.expired_standbys(now, grace);
        // What the fleet serves or switches to stays, grace or not.
        for id in expired
            .into_iter()
            .filter(|id| self.fleet_role(id).is_none())
        {
            let _ops = self.ops.lock().await;
            tracing::info!(view = %id, "standby grace period over");
            let still = |reg: &Registry, e: &Entry| reg.standby_expired(e, now, grace(e.id.name()));
            if let Err(e) = self.retire_if(&id, false, still).await {
                tracing::error!(view = %id, "retiring after the grace period: {e}");
            }
        }
    }

    async fn tick(self: Arc<Self>) {
        let mut shutdown = self.shutdown_tx.subscribe();
        let mut interval = tokio::time::interval(Duration::from_millis(250));
        let mut n: u64 = 0;
        // The periodic snapshot pass under way (aborted with the ticker).
        let mut snapshot_running = AbortOnDrop(None);
        // Warming views' applied counts, for stuck builders.
        let mut builders = HashMap::new();
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = interval.tick() => {}
            }
            n += 1;
            if let Ok(head) = self.store.head().await {
                self.head.fetch_max(head, Ordering::AcqRel);
            }
            if n.is_multiple_of(4) {
                {
                    let st = self.lock();
                    for p in st.progress.values() {
                        p.sample_rate();
                    }
                }
                self.release_stuck_builders(&mut builders).await;
            }
            self.sweep(now_millis()).await;
            if n.is_multiple_of(8)
                && let Some(snapshots) = self.config.snapshots.clone()
                && snapshots.config().every.is_some()
                && snapshot_running.0.as_ref().is_none_or(|t| t.is_finished())
            {
                let this = self.clone();
                snapshot_running.0 = Some(tokio::spawn(async move {
                    this.periodic_snapshots(&snapshots).await;
                }));
            }
        }
    }
}

/// A task aborted when this is dropped.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            t.abort();
        }
    }
}

/// A cutover [`Inner::cutover`] made or asked for.
enum Planned {
    /// Promoted: the new active version and the previous one.
    Promoted(ViewId, Option<ViewId>),
    /// A comparison to run: candidate, active version, promote if identical.
    Compare(ViewId, ViewId, bool),
}

fn log_cutover(id: &ViewId, previous: Option<&ViewId>, how: &str) {
    match previous {
        Some(prev) => {
            tracing::info!(view = %id, previous = %prev, how, "cutover: active (previous active is standby)")
        }
        None => tracing::info!(view = %id, how, "cutover: active"),
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
    match reg.serving(spec) {
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
    if let Some(e) = nearest.filter(|e| e.fingerprint == report.fingerprint.to_string()) {
        // The same logic, yet no alias: that version's view is not kept.
        return format!(
            "new view: fingerprint {}, the same logic as {}, which is {}: its view is not \
             kept, so this version builds one of its own",
            report.fingerprint, e.id, e.state
        );
    }
    let other_id = nearest.map(|e| e.id.to_string());
    fingerprint::explain_new_view(
        report,
        nearest
            .zip(other_id.as_deref())
            .map(|(e, other)| (other, e.fingerprint.as_str(), &e.fingerprint_parts)),
    )
}
