//! The view lifecycle, model-tested: seeded random sequences of operations
//! against a real [`Lifecycle`] (embedded store, RocksDB views, the real
//! `users` module in two logic variants and `tally` posing as `users` (its
//! one document gathers every stream, yet it declares `per_stream`), a
//! watched projections directory),
//! each step checked against the invariants ARCHITECTURE.md lists and a small
//! reference model of what the operator decided:
//!
//! - **I1 never half-built**: the bare name resolves only to an active version
//!   whose view has caught up (or, see I2, a failed one marked stale); right
//!   after a deploy too, before anything settles.
//! - **I2 never lose the last good copy**: once a name served, it keeps
//!   serving: a failed active falls back to a healthy standby, else serves
//!   stale; the grace sweep never retires a standby without a healthy active.
//! - **I3 operator decisions last**: retired versions stay retired through
//!   restarts, crashes and file renames, touches and copies; only an explicit
//!   deploy brings one back. Removing a file retires exactly what the model
//!   says; the active version survives restarts.
//! - **I4 documents are right**: every view that serves (or may: ready,
//!   standby) equals a clean in-process rebuild at its checkpoint.
//! - **I5 state on disk is trusted**: with the registry gone, start refuses and
//!   drops nothing.
//! - **I7 nothing is ahead of its log**: no version's checkpoint is past the
//!   log's head, after a restore took the log back too (and I4 then checks
//!   that no snapshot of the discarded history was used).
//!
//! Operations: deploy (explicit, and the other logic under a taken version),
//! write / rename / remove / touch a module file, promote, rollback, retire,
//! append events, append a poison event (variant A fails on it, B does not
//! read it), let the grace period pass, clean restart, crash, lose the
//! registry, the racing pairs retire ‖ redeploy and rollback ‖ sweep, and a
//! backup restored later (the log, views and registry go back; the watched
//! directory and the snapshot store stay as they are).
//! Warm-ups run with one worker or by 2 or 3 stream partitions (the setting
//! changes across restarts; a warm-up a crash interrupted keeps its own).
//!
//! Odd seeds run under `cutover = "auto-if-identical"` (even ones `auto`):
//! there a version is promoted on its own only after its documents were
//! found identical to the version then active (its `cutover_check` says so),
//! and every check ends (identical, different, or could not be taken).
//!
//! `KILN_MODEL_SEQUENCES` (default 200) sequences of `KILN_MODEL_STEPS`
//! (default 14) steps run in the normal test command; `KILN_MODEL_SEED=<n>`
//! replays the one sequence a failure names.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln::lifecycle::{
    CheckResult, CutoverPolicy, DeployOutcome, Lifecycle, LifecycleConfig, LifecycleError,
    ViewState, ViewStatus,
};
use kiln::runtime::{Module, Runtime, RuntimeConfig};
use kiln::snapshots::dir::DirStore;
use kiln::snapshots::{Every, SnapshotConfig, Snapshots};
use kiln::store::embedded::{EmbeddedConfig, EmbeddedStore};
use kiln::store::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StreamId};
use kiln::views::ViewId;
use kiln_tests::lifecycle::{append_one, read_log, rebuild};
use kiln_tests::rng::Rng;
use kiln_tests::wasm::{self, manifest_of, users_module, with_manifest};
use serde_json::json;

const VERSIONS: [&str; 4] = ["1.0.0", "1.1.0", "1.2.0", "2.0.0"];
const STREAMS: u64 = 5;
const DEBOUNCE: Duration = Duration::from_millis(25);
const SETTLE: Duration = Duration::from_secs(20);
/// "Much later": the grace sweep's clock for a `Grace` step.
const LATER: u64 = 10 * 24 * 3600 * 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Logic {
    /// `users` as built.
    A,
    /// `users` without `LoginFailed`: another fingerprint, another view.
    B,
    /// `tally` under the name `users`: one document gathers every stream,
    /// yet its manifest says `per_stream`. A split warm-up must notice and
    /// warm it again with one worker (I4 checks its `all`).
    Shared,
}

#[derive(Clone, Debug)]
enum Op {
    Deploy(usize),
    DeployOtherLogic(usize),
    WriteFile(usize),
    RenameFile(usize),
    RemoveFile(usize),
    TouchFile(usize),
    Promote(usize),
    Rollback,
    Retire(usize),
    Append(u64),
    Poison,
    Grace,
    Restart,
    Crash,
    LoseRegistry,
    RetireWhileRedeploy(usize),
    RollbackWhileGrace,
    /// `kiln backup` of the running daemon (its log, views, registry and
    /// modules); kept for a later `Restore`.
    Backup,
    /// Append n events (the history a restore discards), stop, `kiln
    /// restore` the last backup (none: nothing happens) into a new data
    /// directory and start on it: the log, views and registry go back to the
    /// backup, the watched directory and the snapshot store do not
    /// (snapshots of the discarded history stay beside the new one).
    Restore(u64),
}

fn gen_op(rng: &mut Rng) -> Op {
    let v = rng.below(VERSIONS.len() as u64) as usize;
    let f = rng.below(8) as usize;
    match rng.below(100) {
        0..=13 => Op::Deploy(v),
        14..=15 => Op::DeployOtherLogic(v),
        16..=25 => Op::WriteFile(v),
        26..=30 => Op::RenameFile(f),
        31..=35 => Op::RemoveFile(f),
        36..=38 => Op::TouchFile(f),
        39..=44 => Op::Promote(v),
        45..=50 => Op::Rollback,
        51..=56 => Op::Retire(v),
        57..=63 => Op::Append(1 + rng.below(40)),
        64..=66 => Op::Backup,
        67..=68 => Op::Restore(rng.below(20)),
        69..=72 => Op::Poison,
        73..=78 => Op::Grace,
        79..=84 => Op::Restart,
        85..=89 => Op::Crash,
        90..=91 => Op::LoseRegistry,
        92..=95 => Op::RetireWhileRedeploy(v),
        _ => Op::RollbackWhileGrace,
    }
}

/// `projections/tally` as `users` at `version`: the users log's events, one
/// document (`all`) gathering every stream, and `per_stream` declared.
fn shared_module(version: &str) -> Vec<u8> {
    let users = users_module(version, false);
    let mut m = manifest_of(&users);
    m["per_stream"] = json!(true);
    let tally = std::fs::read(wasm::TALLY).expect("the tally module");
    with_manifest(&tally, &m.to_string())
}

fn vid(v: usize) -> ViewId {
    ViewId::from_parts("users", VERSIONS[v]).expect("view id")
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Modules and compiled code shared by every sequence.
struct Shared {
    /// Steps after which some version had warmed by stream partitions (so
    /// the run is known to exercise them).
    partitioned: std::sync::atomic::AtomicU64,
    /// Steps after which some version had been bootstrapped from a snapshot.
    bootstrapped: std::sync::atomic::AtomicU64,
    /// Steps after which some version warmed with one worker because a split
    /// warm-up met a shared document.
    unsplit: std::sync::atomic::AtomicU64,
    /// Steps after which some version had applied warm-up windows grouped
    /// by stream.
    grouped: std::sync::atomic::AtomicU64,
    /// Steps after which some version warmed in log order because a grouped
    /// window met a document shared between streams.
    ungrouped: std::sync::atomic::AtomicU64,
    /// Restores that discarded history (a log, views and registry gone back
    /// to a backup older than the log's head).
    restored: std::sync::atomic::AtomicU64,
    runtime: Runtime,
    modules: BTreeMap<(usize, Logic), (Vec<u8>, Module)>,
    _cache: tempfile::TempDir,
}

impl Shared {
    fn new() -> Shared {
        let cache = tempfile::tempdir().expect("cache dir");
        let runtime = Runtime::new(RuntimeConfig {
            cache_dir: Some(cache.path().to_path_buf()),
            ..RuntimeConfig::default()
        })
        .expect("runtime");
        let mut modules = BTreeMap::new();
        for (v, version) in VERSIONS.iter().enumerate() {
            for logic in [Logic::A, Logic::B, Logic::Shared] {
                let bytes = match logic {
                    Logic::Shared => shared_module(version),
                    _ => users_module(version, logic == Logic::B),
                };
                let module = runtime.load("model", &bytes).expect("users loads");
                modules.insert((v, logic), (bytes, module));
            }
        }
        Shared {
            partitioned: std::sync::atomic::AtomicU64::new(0),
            bootstrapped: std::sync::atomic::AtomicU64::new(0),
            unsplit: std::sync::atomic::AtomicU64::new(0),
            grouped: std::sync::atomic::AtomicU64::new(0),
            ungrouped: std::sync::atomic::AtomicU64::new(0),
            restored: std::sync::atomic::AtomicU64::new(0),
            runtime,
            modules,
            _cache: cache,
        }
    }
}

/// Where a version's module came from, as the model sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Source {
    Api,
    File(String),
}

/// One sequence: the system under test and the reference model.
struct Run<'a> {
    seed: u64,
    shared: &'a Shared,
    dir: tempfile::TempDir,
    store: Arc<dyn EventStore>,
    lc: Option<Lifecycle>,
    /// The logic each version has in this sequence.
    logic: [Logic; 4],
    /// Module files in the watched directory: name → version.
    files: BTreeMap<String, usize>,
    file_counter: u32,
    /// Model: each registered version's source.
    source: BTreeMap<usize, Source>,
    /// Model: versions an operator (or the grace sweep) retired; they stay so.
    retired: BTreeSet<usize>,
    /// The name has served; from then on it must keep serving (I2) unless an
    /// operator retired the stale version.
    served: bool,
    /// Head of the log when each physical view started warming (I1).
    warm_from: BTreeMap<ViewId, u64>,
    poisons: u64,
    log: Vec<String>,
    /// The data directory (a restore starts on a new one).
    data: PathBuf,
    /// The last backup and the model as it was then.
    backup: Option<Saved>,
    restores: u32,
}

/// A backup, and the model's state when it was taken: what a restore
/// brings back (the log, the registry's decisions); the watched directory
/// is what it is now.
#[derive(Clone)]
struct Saved {
    dir: PathBuf,
    source: BTreeMap<usize, Source>,
    retired: BTreeSet<usize>,
    served: bool,
    warm_from: BTreeMap<ViewId, u64>,
    poisons: u64,
}

impl<'a> Run<'a> {
    async fn new(seed: u64, shared: &'a Shared, rng: &mut Rng) -> Run<'a> {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("projections")).expect("projections dir");
        let store: Arc<dyn EventStore> = Arc::new(
            EmbeddedStore::open(EmbeddedConfig::new(dir.path().join("log"))).expect("store"),
        );
        let logic = [0; 4].map(|_: i32| match rng.below(5) {
            0 | 1 => Logic::A,
            2 | 3 => Logic::B,
            _ => Logic::Shared,
        });
        let mut run = Run {
            seed,
            shared,
            dir,
            store,
            lc: None,
            logic,
            files: BTreeMap::new(),
            file_counter: 0,
            source: BTreeMap::new(),
            retired: BTreeSet::new(),
            served: false,
            warm_from: BTreeMap::new(),
            poisons: 0,
            log: Vec::new(),
            data: PathBuf::new(),
            backup: None,
            restores: 0,
        };
        run.data = run.dir.path().join("data");
        run.append(20).await;
        run.start().await;
        run
    }

    fn config(&self) -> LifecycleConfig {
        let mut c = LifecycleConfig::new(self.data.clone());
        c.projections_dir = Some(self.projections());
        c.watch_debounce = DEBOUNCE;
        c.standby_grace = Duration::from_secs(3600);
        // Steps of 4 events (log order, partitions, the caught-up slack); a
        // grouped call holds 4 steps (16 events), so a window of this small
        // log is still several units.
        c.warmup_batch = 4;
        // Warm-ups by 1, 2 or 3 stream partitions, whatever their length, the
        // setting changing across restarts (a stored warm-up keeps its own).
        c.warmup_workers = 1 + ((self.seed + self.log.len() as u64) % 3) as usize;
        c.warmup_partition_min_events = 0;
        // Warm-up windows grouped by stream: off, a few events each (many
        // windows, crashes between them), or the whole backlog at once.
        c.warmup_group_bytes = match (self.seed + self.log.len() as u64 / 7) % 3 {
            0 => 0,
            1 => 2048,
            _ => 64 << 20,
        };
        if self.seed % 2 == 1 {
            c.default_policy.cutover = CutoverPolicy::AutoIfIdentical;
        }
        // A third of the sequences keep view snapshots (often): a version
        // built again (retired, then deployed) bootstraps from one, and I4
        // checks what it serves like any other view.
        if self.seed.is_multiple_of(3) {
            let mut sc = SnapshotConfig::new(self.dir.path().join("snapshots-work"));
            sc.every = Some(Every::Events(8));
            let store = DirStore::open(self.dir.path().join("snapshots"), Duration::from_secs(30))
                .expect("snapshot dir");
            c.snapshots = Some(Arc::new(Snapshots::new(Box::new(store), sc)));
        }
        c
    }

    fn projections(&self) -> PathBuf {
        self.dir.path().join("projections")
    }

    fn lc(&self) -> &Lifecycle {
        self.lc.as_ref().expect("running")
    }

    fn fail(&self, what: impl std::fmt::Display) -> ! {
        panic!(
            "model violation (replay with KILN_MODEL_SEED={}): {what}\nsteps:\n  {}\nstatus: {:#?}",
            self.seed,
            self.log.join("\n  "),
            self.lc.as_ref().map(|l| brief(&l.status()))
        );
    }

    async fn start(&mut self) {
        let lc = Lifecycle::start(
            self.config(),
            self.store.clone(),
            self.shared.runtime.clone(),
        )
        .await
        .unwrap_or_else(|e| self.fail(format!("start: {e}")));
        self.lc = Some(lc);
        // The initial scan: every file is loaded (in name order), then the
        // versions whose source file is gone are retired unless active.
        let files: Vec<(String, usize)> = self.files.iter().map(|(f, v)| (f.clone(), *v)).collect();
        for (f, v) in files {
            self.model_load(&f, v);
        }
        let gone: Vec<usize> = self
            .source
            .iter()
            .filter(|(_, s)| matches!(s, Source::File(f) if !self.files.contains_key(f)))
            .map(|(v, _)| *v)
            .collect();
        for v in gone {
            self.model_file_retire(v);
        }
    }

    async fn append(&mut self, n: u64) -> u64 {
        let mut last = 0;
        for i in 0..n {
            let k = self.store.head().await.expect("head") + i;
            let stream = StreamId::new(format!("user-{}", k % STREAMS)).expect("stream");
            let latest = self.store.latest(&stream).await.expect("latest").version;
            let event = match (latest, k % 3) {
                (0, _) => NewEvent::json("UserRegistered", &json!({"name": "u", "email": "e"})),
                (_, 0) => NewEvent::json("LoginFailed", &json!({})),
                _ => NewEvent::json("UserLoggedIn", &json!({})),
            };
            last = append_one(&self.store, stream.as_str(), event).await;
        }
        last
    }

    // ----- the model's rules for the watched directory -----

    /// The watcher loads file `f` holding version `v`.
    fn model_load(&mut self, f: &str, v: usize) {
        if self.retired.contains(&v) {
            return; // A retired version stays retired.
        }
        self.source.insert(v, Source::File(f.to_string()));
    }

    /// A file-driven retirement of `v` (its source file is gone).
    fn model_file_retire(&mut self, v: usize) {
        // What the name serves (active, or stale) is never retired by a file.
        let serving = self.serving_id() == Some(vid(v));
        if !serving && self.source.contains_key(&v) {
            self.retired.insert(v);
        }
    }

    /// File `f` (holding `v`) disappeared.
    fn model_unlink(&mut self, f: &str, v: usize) {
        let other = self
            .files
            .iter()
            .find(|(g, w)| g.as_str() != f && **w == v)
            .map(|(g, _)| g.clone());
        match other {
            Some(g) => self.model_load(&g, v),
            None if self.source.get(&v) == Some(&Source::File(f.to_string())) => {
                self.model_file_retire(v)
            }
            None => {}
        }
    }

    fn write_file(&self, name: &str, bytes: &[u8]) {
        let tmp = self.projections().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, bytes).expect("write module");
        std::fs::rename(&tmp, self.projections().join(name)).expect("rename module");
    }

    fn bytes(&self, v: usize) -> &[u8] {
        &self.shared.modules[&(v, self.logic[v])].0
    }

    // ----- steps -----

    async fn step(&mut self, op: &Op) {
        self.log.push(format!("{op:?}"));
        match *op {
            Op::Deploy(v) => {
                let head = self.store.head().await.expect("head");
                let out = self
                    .lc()
                    .deploy(self.bytes(v), "api")
                    .await
                    .unwrap_or_else(|e| self.fail(format!("deploy {}: {e}", vid(v))));
                if let DeployOutcome::Warming(id) = &out {
                    self.warm_from.insert(id.clone(), head);
                }
                if !matches!(out, DeployOutcome::AlreadyDeployed(_)) {
                    self.source.insert(v, Source::Api);
                }
                self.retired.remove(&v);
                self.check_resolution("right after a deploy");
            }
            Op::DeployOtherLogic(v) => {
                let other = match self.logic[v] {
                    Logic::A => Logic::B,
                    Logic::B | Logic::Shared => Logic::A,
                };
                let registered = self.lc().status_of(&vid(v)).is_some();
                let got = self
                    .lc()
                    .deploy(&self.shared.modules[&(v, other)].0, "api")
                    .await;
                match (registered, got) {
                    (true, Err(LifecycleError::ImmutableVersion { .. })) => {}
                    (true, other) => {
                        self.fail(format!("another module under {} got {other:?}", vid(v)))
                    }
                    (false, Ok(DeployOutcome::Warming(id) | DeployOutcome::Alias { id, .. })) => {
                        // Not registered before: this logic is the version's now.
                        self.logic[v] = other;
                        self.source.insert(v, Source::Api);
                        self.retired.remove(&v);
                        let head = self.store.head().await.expect("head");
                        self.warm_from.entry(id).or_insert(head);
                    }
                    (false, other) => {
                        self.fail(format!("a first deploy of {} got {other:?}", vid(v)))
                    }
                }
            }
            Op::WriteFile(v) => {
                self.file_counter += 1;
                let name = format!("m{:03}.wasm", self.file_counter);
                let head = self.store.head().await.expect("head");
                let was_registered = self.lc().status_of(&vid(v)).is_some();
                self.write_file(&name, self.bytes(v));
                self.files.insert(name.clone(), v);
                self.model_load(&name, v);
                if !was_registered {
                    self.warm_from.insert(vid(v), head);
                    self.wait_for(&format!("{} deployed from {name}", vid(v)), |r| {
                        r.lc().status_of(&vid(v)).is_some()
                    })
                    .await;
                    self.check_resolution("right after a hot deploy");
                } else {
                    tokio::time::sleep(DEBOUNCE * 6).await;
                }
            }
            Op::RenameFile(i) => {
                let Some((f, v)) = self.nth_file(i) else {
                    return;
                };
                self.file_counter += 1;
                let to = format!("m{:03}.wasm", self.file_counter);
                std::fs::rename(self.projections().join(&f), self.projections().join(&to))
                    .expect("rename");
                self.files.remove(&f);
                self.files.insert(to.clone(), v);
                self.model_load(&to, v);
                self.model_unlink(&f, v);
                tokio::time::sleep(DEBOUNCE * 6).await;
            }
            Op::RemoveFile(i) => {
                let Some((f, v)) = self.nth_file(i) else {
                    return;
                };
                std::fs::remove_file(self.projections().join(&f)).expect("remove");
                self.files.remove(&f);
                self.model_unlink(&f, v);
                self.wait_retired_as_modelled().await;
            }
            Op::TouchFile(i) => {
                let Some((f, v)) = self.nth_file(i) else {
                    return;
                };
                self.write_file(&f, self.bytes(v));
                self.model_load(&f, v);
                tokio::time::sleep(DEBOUNCE * 6).await;
            }
            Op::Promote(v) => {
                let before = self.lc().status_of(&vid(v)).map(|s| s.state);
                let got = self.lc().promote(&vid(v)).await;
                match (before, &got) {
                    (Some(ViewState::Ready | ViewState::Standby | ViewState::Active), Ok(())) => {}
                    (Some(ViewState::Ready | ViewState::Standby | ViewState::Active), Err(e)) => {
                        self.fail(format!("promoting a servable {}: {e}", vid(v)))
                    }
                    (_, Ok(())) => self.fail(format!("promoted {} from {before:?}", vid(v))),
                    _ => {}
                }
            }
            Op::Rollback => {
                let standbys: Vec<String> = self
                    .lc()
                    .status()
                    .into_iter()
                    .filter(|s| s.state == ViewState::Standby)
                    .map(|s| s.id)
                    .collect();
                match self.lc().rollback("users").await {
                    Ok(id) if standbys.contains(&id.to_string()) => {}
                    Ok(id) => self.fail(format!("rolled back to {id}, not a standby")),
                    Err(LifecycleError::NoStandby { .. } | LifecycleError::UnknownView { .. })
                        if standbys.is_empty() => {}
                    Err(e) => self.fail(format!("rollback with standbys {standbys:?}: {e}")),
                }
            }
            Op::Retire(v) => {
                let before = self.lc().status_of(&vid(v)).map(|s| s.state);
                let serving = self.serving_id() == Some(vid(v));
                match (before, self.lc().retire(&vid(v)).await) {
                    (None, Err(LifecycleError::UnknownView { .. })) => {}
                    (Some(_), Ok(())) => {
                        if serving {
                            self.served = false; // The operator took the name down.
                        }
                        self.retired.insert(v);
                    }
                    (b, got) => self.fail(format!("retire {} from {b:?}: {got:?}", vid(v))),
                }
            }
            Op::Append(n) => {
                self.append(n).await;
            }
            Op::Poison => {
                self.poisons += 1;
                let stream = StreamId::new(format!("user-{}", self.poisons % STREAMS)).expect("s");
                self.store
                    .append(AppendRequest::new(
                        stream,
                        ExpectedVersion::Any,
                        vec![NewEvent::json("LoginFailed", &json!("poison"))],
                    ))
                    .await
                    .expect("append");
            }
            Op::Grace => {
                let before = self.lc().status();
                self.lc().sweep_at(now_ms() + LATER).await;
                self.check_sweep(&before);
            }
            Op::Restart => {
                let active = self.serving_id();
                self.lc.take().expect("running").shutdown().await;
                self.start().await;
                self.quiesce().await;
                if self.serving_id() != active {
                    self.fail(format!(
                        "a restart moved the name from {active:?} to {:?}",
                        self.serving_id()
                    ));
                }
            }
            Op::Crash => {
                let active = self.serving_id();
                self.lc.take().expect("running").abandon().await;
                self.start().await;
                self.quiesce().await;
                if self.serving_id() != active {
                    self.fail(format!(
                        "a crash moved the name from {active:?} to {:?}",
                        self.serving_id()
                    ));
                }
            }
            Op::LoseRegistry => {
                let views_before = self.lc().views().views().expect("views");
                self.lc.take().expect("running").shutdown().await;
                let registry = self.data.join("registry.json");
                let aside = self.dir.path().join("registry.aside");
                std::fs::rename(&registry, &aside).expect("move the registry away");
                // Anything ever deployed left a module in data/modules.
                let something = !views_before.is_empty() || !self.source.is_empty();
                match Lifecycle::start(
                    self.config(),
                    self.store.clone(),
                    self.shared.runtime.clone(),
                )
                .await
                {
                    Err(LifecycleError::RegistryMissing { .. }) if something => {}
                    Ok(lc) if !something => lc.shutdown().await,
                    Err(e) => self.fail(format!("start without a registry: {e}")),
                    Ok(_) => self.fail("started without a registry, views present"),
                }
                // Nothing was dropped: the same column families are there.
                let reopened =
                    kiln::views::ViewStore::open(self.data.join("views")).expect("views reopen");
                let after = reopened.views().expect("views");
                drop(reopened);
                if after != views_before {
                    self.fail(format!(
                        "views {views_before:?} became {after:?} without a registry"
                    ));
                }
                std::fs::rename(&aside, &registry).expect("restore the registry");
                self.start().await;
            }
            Op::RetireWhileRedeploy(v) => {
                let Some(s) = self.lc().status_of(&vid(v)) else {
                    return;
                };
                if s.state == ViewState::Active {
                    return;
                }
                if self.serving_id() == Some(vid(v)) {
                    self.served = false; // The operator's retire may take the name down.
                }
                let (lc1, lc2) = (self.lc().clone(), self.lc().clone());
                let bytes = self.bytes(v).to_vec();
                let id = vid(v);
                let (r, d) = tokio::join!(async move { lc1.retire(&id).await }, async move {
                    lc2.deploy(&bytes, "api").await
                });
                if let Err(e) = &r {
                    self.fail(format!("retire racing a redeploy: {e}"));
                }
                if let Err(e) = &d {
                    self.fail(format!("redeploy racing a retire: {e}"));
                }
                // Whichever ran last decided; the model follows what it sees.
                self.quiesce().await;
                match self.lc().status_of(&vid(v)).map(|s| s.state) {
                    Some(ViewState::Retired) => {
                        self.retired.insert(v);
                    }
                    Some(ViewState::Failed) if self.logic[v] != Logic::B && self.poisons > 0 => {
                        self.retired.remove(&v);
                        self.source.insert(v, Source::Api);
                    }
                    Some(ViewState::Failed) => {
                        self.fail(format!("{} failed after retire ‖ redeploy", vid(v)))
                    }
                    _ => {
                        self.retired.remove(&v);
                        self.source.insert(v, Source::Api);
                    }
                }
                if let Ok(DeployOutcome::Warming(id)) = d {
                    self.warm_from.entry(id).or_insert(0);
                }
            }
            Op::RollbackWhileGrace => {
                let before = self.lc().status();
                let (lc1, lc2) = (self.lc().clone(), self.lc().clone());
                let _ = tokio::join!(async move { lc1.rollback("users").await }, async move {
                    lc2.sweep_at(now_ms() + LATER).await
                });
                for s in self.lc().status() {
                    let was = before.iter().find(|b| b.id == s.id).map(|b| b.state);
                    if s.state == ViewState::Retired && was != Some(ViewState::Retired) {
                        let v = VERSIONS
                            .iter()
                            .position(|x| *x == s.version)
                            .expect("a known version");
                        self.retired.insert(v);
                    }
                }
                self.check_resolution("after rollback ‖ sweep");
            }
            Op::Backup => self.take_backup().await,
            Op::Restore(n) => {
                let Some(saved) = self.backup.clone() else {
                    return;
                };
                self.append(n).await;
                // Views (and snapshots, every 8 events) past the backup.
                self.quiesce().await;
                let head_before = self.store.head().await.expect("head");
                self.lc.take().expect("running").shutdown().await;
                self.restores += 1;
                self.data = self
                    .dir
                    .path()
                    .join(format!("data-restored-{}", self.restores));
                let manifest = kiln::backup::restore(&saved.dir, &self.data)
                    .unwrap_or_else(|e| self.fail(format!("restore: {e}")));
                self.store = Arc::new(
                    EmbeddedStore::open(EmbeddedConfig::new(self.data.join("log")))
                        .unwrap_or_else(|e| self.fail(format!("the restored log: {e}"))),
                );
                let head = self.store.head().await.expect("head");
                if head != manifest.log_head {
                    self.fail(format!(
                        "the restored log's head is {head}, the backup's {}",
                        manifest.log_head
                    ));
                }
                self.source = saved.source;
                self.retired = saved.retired;
                self.served = saved.served;
                self.warm_from = saved.warm_from;
                self.poisons = saved.poisons;
                // Counted when it discards history (events appended since).
                if manifest.log_head < head_before {
                    self.shared
                        .restored
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                self.start().await;
            }
        }
        self.quiesce().await;
        self.check().await;
    }

    async fn take_backup(&mut self) {
        let dir = self.dir.path().join(format!("backup-{}", self.log.len()));
        if let Err(e) = kiln::backup::create(self.lc(), &dir).await {
            self.fail(format!("backup: {e}"));
        }
        self.backup = Some(Saved {
            dir,
            source: self.source.clone(),
            retired: self.retired.clone(),
            served: self.served,
            warm_from: self.warm_from.clone(),
            poisons: self.poisons,
        });
    }

    fn nth_file(&self, i: usize) -> Option<(String, usize)> {
        if self.files.is_empty() {
            return None;
        }
        let (f, v) = self.files.iter().nth(i % self.files.len())?;
        Some((f.clone(), *v))
    }

    fn serving_id(&self) -> Option<ViewId> {
        self.lc().resolve_version("users").ok().map(|r| r.version)
    }

    async fn wait_for(&self, what: &str, cond: impl Fn(&Run<'_>) -> bool) {
        let start = Instant::now();
        while !cond(self) {
            if start.elapsed() > SETTLE {
                self.fail(format!("timed out waiting for {what}"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn wait_retired_as_modelled(&self) {
        let retired = self.retired.clone();
        self.wait_for("the file removal's retirement", move |r| {
            retired.iter().all(|v| {
                r.lc()
                    .status_of(&vid(*v))
                    .is_none_or(|s| s.state == ViewState::Retired)
            })
        })
        .await;
        tokio::time::sleep(DEBOUNCE * 4).await;
    }

    /// Waits until nothing warms and every running view is at the head.
    async fn quiesce(&self) {
        let head = self.store.head().await.expect("head");
        self.wait_for("the views to settle at the head", |r| {
            r.lc().status().iter().all(|s| match s.state {
                ViewState::Warming => false,
                ViewState::Ready
                    if s.cutover_check
                        .as_ref()
                        .is_some_and(|c| c.result == CheckResult::Pending) =>
                {
                    false
                }
                ViewState::Ready | ViewState::Active | ViewState::Standby => s.checkpoint >= head,
                _ => true,
            })
        })
        .await;
    }

    /// I1 (also mid-flight): the bare name resolves to an active, caught-up
    /// version, or to a failed one marked stale.
    fn check_resolution(&self, when: &str) {
        let Ok(r) = self.lc().resolve_version("users") else {
            return;
        };
        let Some(s) = self.lc().status_of(&r.version) else {
            self.fail(format!("{when}: users resolves to unknown {}", r.version));
        };
        let ok = (s.state == ViewState::Active && !r.stale)
            || (s.state == ViewState::Failed && s.serving_stale && r.stale);
        if !ok {
            self.fail(format!(
                "{when}: users resolves to {} in state {} (stale {})",
                s.id, s.state, r.stale
            ));
        }
        if let Some(p) = self.lc().status_of(&r.physical)
            && p.state == ViewState::Warming
        {
            self.fail(format!("{when}: users reads {}, still warming", r.physical));
        }
        if let Some(from) = self.warm_from.get(&r.physical) {
            let at = self.lc().views().checkpoint(&r.physical).unwrap_or(0);
            if at < *from {
                self.fail(format!(
                    "{when}: users reads {} at {at}, short of the head {from} it had to replay to",
                    r.physical
                ));
            }
        }
    }

    /// Standbys the sweep retired had a healthy active version beside them.
    fn check_sweep(&mut self, before: &[ViewStatus]) {
        let after = self.lc().status();
        let healthy_active = after.iter().any(|s| s.state == ViewState::Active);
        for s in &after {
            let was = before.iter().find(|b| b.id == s.id).map(|b| b.state);
            if s.state == ViewState::Retired && was == Some(ViewState::Standby) {
                if !healthy_active {
                    self.fail(format!(
                        "the sweep retired {} with no healthy active version",
                        s.id
                    ));
                }
                let v = VERSIONS
                    .iter()
                    .position(|x| *x == s.version)
                    .expect("version");
                self.retired.insert(v);
            }
        }
    }

    async fn check(&mut self) {
        self.check_resolution("settled");
        let status = self.lc().status();
        // I7: nothing is ahead of its log (a restore took the log back).
        let head = self.store.head().await.expect("head");
        if let Some(s) = status
            .iter()
            .find(|s| s.state != ViewState::Retired && s.checkpoint > head)
        {
            self.fail(format!(
                "{} is at {}, past the log's head {head}",
                s.id, s.checkpoint
            ));
        }
        if status.iter().any(|s| s.warmup_workers.is_some()) {
            self.shared
                .partitioned
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let warned = |what: &str| {
            status
                .iter()
                .any(|s| s.warning.as_deref().is_some_and(|w| w.contains(what)))
        };
        if warned("partition") {
            self.shared
                .unsplit
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if warned("warm-up window") {
            self.shared
                .ungrouped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if status.iter().any(|s| s.grouped_events > 0) {
            self.shared
                .grouped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if status.iter().any(|s| {
            matches!(
                s.snapshot,
                Some(kiln::snapshots::SnapshotActivity::Bootstrapped { .. })
            )
        }) {
            self.shared
                .bootstrapped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let actives = status
            .iter()
            .filter(|s| s.state == ViewState::Active)
            .count();
        if actives > 1 {
            self.fail("two active versions");
        }
        let resolved = self.lc().resolve_version("users");
        if resolved.is_ok() {
            self.served = true;
        } else if self.served {
            self.fail(format!("users served before and now answers {resolved:?}"));
        }
        // I2: serving stale only when no healthy standby could take over.
        if let Ok(r) = &resolved
            && r.stale
            && status.iter().any(|s| s.state == ViewState::Standby)
        {
            self.fail("serving stale beside a healthy standby");
        }
        // I3: what the operator retired stays retired.
        for v in &self.retired {
            if let Some(s) = self.lc().status_of(&vid(*v))
                && s.state != ViewState::Retired
            {
                self.fail(format!("{} was retired and is {} again", s.id, s.state));
            }
        }
        for v in self.source.keys() {
            let known = self.lc().status_of(&vid(*v));
            if known.is_none() {
                self.fail(format!("{} deployed but unknown", vid(*v)));
            }
        }
        // Promoted on its own under auto-if-identical: found identical to
        // the version it replaced.
        for s in &status {
            let Some(how) = s.activated_by.as_deref() else {
                continue;
            };
            if let Some(rest) = how.strip_prefix("auto-if-identical cutover: identical to ") {
                let against = rest.split(' ').next().unwrap_or("");
                let check = s.cutover_check.as_ref();
                if check.is_none_or(|c| c.result != CheckResult::Identical || c.against != against)
                {
                    self.fail(format!(
                        "{} promoted as identical to {against}: {check:?}",
                        s.id
                    ));
                }
            } else if self.seed % 2 == 1 && how == "auto cutover" {
                self.fail(format!(
                    "{} cut over by plain auto under auto-if-identical",
                    s.id
                ));
            }
        }
        // Aliases read a view of the same logic.
        for s in &status {
            if let Some(of) = &s.alias_of {
                let p = status.iter().find(|p| &p.id == of);
                if p.is_some_and(|p| p.fingerprint != s.fingerprint) {
                    self.fail(format!("{} aliases {of} of other logic", s.id));
                }
            }
        }
        self.check_documents(&status).await;
    }

    /// I4: every view that serves or may serve equals a clean rebuild.
    async fn check_documents(&self, status: &[ViewStatus]) {
        let mut physical: BTreeSet<ViewId> = BTreeSet::new();
        for s in status {
            let live = matches!(
                s.state,
                ViewState::Ready | ViewState::Active | ViewState::Standby
            );
            if live || s.serving_stale {
                let id: ViewId = s.id.parse().expect("id");
                physical.insert(s.alias_of.as_ref().map_or(id, |a| a.parse().expect("id")));
            }
        }
        if physical.is_empty() {
            return;
        }
        let events = read_log(&self.store).await;
        for p in physical {
            let v = VERSIONS
                .iter()
                .position(|x| p.version().to_string() == *x)
                .expect("version");
            let module = &self.shared.modules[&(v, self.logic[v])].1;
            let checkpoint = self.lc().views().checkpoint(&p).expect("checkpoint");
            let expected = rebuild(module, &events, checkpoint);
            let got: BTreeMap<Vec<u8>, Vec<u8>> = self
                .lc()
                .views()
                .scan(&p, b"", None, usize::MAX)
                .expect("scan")
                .into_iter()
                .collect();
            if got != expected {
                self.fail(format!(
                    "{p} at {checkpoint}: {} documents, a clean rebuild has {}",
                    got.len(),
                    expected.len()
                ));
            }
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn brief(status: &[ViewStatus]) -> Vec<String> {
    status
        .iter()
        .map(|s| {
            format!(
                "{} {} at {} alias_of={:?} stale={} src={} err={:?}",
                s.id, s.state, s.checkpoint, s.alias_of, s.serving_stale, s.source, s.last_error
            )
        })
        .collect()
}

async fn run_sequence(seed: u64, steps: u64, shared: &Shared) {
    let mut rng = Rng(seed);
    let mut run = Run::new(seed, shared, &mut rng).await;
    for _ in 0..steps {
        let op = gen_op(&mut rng);
        run.step(&op).await;
    }
    if let Some(lc) = run.lc.take() {
        lc.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_operation_sequences_keep_the_lifecycle_invariants() {
    let shared = Shared::new();
    let steps = env_u64("KILN_MODEL_STEPS", 14);
    if let Ok(seed) = std::env::var("KILN_MODEL_SEED") {
        let seed: u64 = seed.parse().expect("KILN_MODEL_SEED is a number");
        run_sequence(seed, steps, &shared).await;
        return;
    }
    let n = env_u64("KILN_MODEL_SEQUENCES", 200);
    let base = env_u64("KILN_MODEL_BASE", 0x6b69_6c6e);
    let started = Instant::now();
    for i in 0..n {
        run_sequence(base.wrapping_add(i), steps, &shared).await;
    }
    let partitioned = shared
        .partitioned
        .load(std::sync::atomic::Ordering::Relaxed);
    let bootstrapped = shared
        .bootstrapped
        .load(std::sync::atomic::Ordering::Relaxed);
    let unsplit = shared.unsplit.load(std::sync::atomic::Ordering::Relaxed);
    let restored = shared.restored.load(std::sync::atomic::Ordering::Relaxed);
    let grouped = shared.grouped.load(std::sync::atomic::Ordering::Relaxed);
    let ungrouped = shared.ungrouped.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "{n} sequences of {steps} steps in {:.1} s; {partitioned} steps saw a partitioned warm-up, {bootstrapped} a version bootstrapped from a snapshot, {unsplit} a split warm-up undone for a shared document, {grouped} a warm-up grouped by stream, {ungrouped} a grouped window refused for a shared document, {restored} restores discarding history",
        started.elapsed().as_secs_f64()
    );
    assert!(
        n < 20 || partitioned > 0,
        "no sequence warmed a version by stream partitions"
    );
    assert!(
        n < 20 || bootstrapped > 0,
        "no sequence bootstrapped a version from a snapshot"
    );
    assert!(
        n < 20 || restored > 0,
        "no sequence restored a backup older than its log"
    );
    assert!(
        n < 20 || grouped > 0,
        "no sequence warmed a version in windows grouped by stream"
    );
    assert!(
        n < 20 || ungrouped > 0,
        "no grouped window met the shared document of a `Shared` version"
    );
    assert!(
        n < 20 || unsplit > 0,
        "no split warm-up met the shared document of a `Shared` version"
    );
}
