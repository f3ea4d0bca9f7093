//! `kiln serve`'s configuration: a TOML file, then `KILN_*` environment
//! variables, then flags, each overriding the one before; everything has a
//! default, so `kiln serve` alone runs the embedded store in `./data` with
//! `./projections` watched and the API on 127.0.0.1:7070.
//!
//! See `kiln.example.toml` at the repository root for every key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::api::ApiConfig;
use crate::fleet::FleetConfig;
use crate::lifecycle::{CutoverPolicy, LifecycleConfig, PoisonPolicy, ViewPolicy};
use crate::runtime::RuntimeConfig;
use crate::store::embedded::Durability;
use crate::store::jetstream::JetStreamConfig;

/// Which event store the daemon runs on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum StoreBackend {
    /// RocksDB in `<data-dir>/log`: nothing to set up.
    #[default]
    Embedded,
    /// NATS JetStream (the `[jetstream]` table, `--nats-url`).
    Jetstream,
}

/// Options of the embedded store (`[embedded]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmbeddedOptions {
    /// `fsync` (an acknowledged append survives a power loss) or `buffered`
    /// (it survives the process being killed, not a power loss).
    pub durability: Durability,
}

/// View snapshots (`[snapshots]`): where they are kept, how often they are
/// taken. Off unless `dir` or `bucket` is set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotOptions {
    /// A directory to keep snapshots in (any store; the one choice on the
    /// embedded store).
    pub dir: Option<PathBuf>,
    /// A JetStream object store bucket to keep them in (JetStream store
    /// only; created if missing, with the stream's replicas), e.g.
    /// `KILN_VIEWS`. Leases live in `<bucket>_LEASES`.
    pub bucket: Option<String>,
    /// Snapshot live views again every `"<n> events"` or `"<n>s|m|h"`
    /// (unset: only when a warm-up this instance ran catches up, and on
    /// demand).
    pub every: Option<String>,
    /// Snapshots kept per view logic and log.
    pub keep: usize,
    /// Fill fresh versions from a snapshot of their logic when one exists.
    pub bootstrap: bool,
    /// Largest SST file of a snapshot, in MiB.
    pub max_file_mib: u64,
    /// Most MiB of documents a snapshot reads a second (0: no limit).
    pub max_mib_per_sec: u64,
    /// Seconds a publisher's lease lives unless refreshed (bucket or directory).
    pub lease_ttl_secs: u64,
    /// This instance's name in leases and manifests [default: its fleet
    /// instance id in a fleet, else host:pid].
    pub instance: Option<String>,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        SnapshotOptions {
            dir: None,
            bucket: None,
            every: None,
            keep: 3,
            bootstrap: true,
            max_file_mib: 64,
            max_mib_per_sec: 64,
            lease_ttl_secs: 30,
            instance: None,
        }
    }
}

/// Limits of the WebAssembly runtime.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeLimits {
    /// Most linear memory one projection instance may use, in MiB.
    pub memory_mib: usize,
    /// Longest one batch may run, in milliseconds.
    pub batch_deadline_ms: u64,
    /// Cache compiled modules in `<data-dir>/cache`.
    pub compile_cache: bool,
    /// Most bytes of keys and documents one batch may write, in MiB.
    pub batch_write_mib: usize,
    /// Most keys one batch may write (puts and deletes).
    pub batch_write_entries: usize,
    /// Largest result of one `scan`, in MiB.
    pub scan_mib: usize,
    /// Largest module accepted, in MiB.
    pub module_mib: usize,
    /// Largest code section (all function bodies), in MiB.
    pub code_mib: usize,
    /// Largest function body, in KiB.
    pub function_kib: usize,
    /// Deepest nesting of blocks in a function.
    pub block_nesting: usize,
    /// Most functions, globals or table elements in a module.
    pub definitions: usize,
    /// Longest a module may take to compile, in milliseconds.
    pub compile_ms: u64,
}

impl Default for RuntimeLimits {
    fn default() -> Self {
        let l = crate::runtime::Limits::default();
        RuntimeLimits {
            memory_mib: 256,
            batch_deadline_ms: 10_000,
            compile_cache: true,
            batch_write_mib: l.batch_write_bytes >> 20,
            batch_write_entries: l.batch_write_entries,
            scan_mib: l.scan_bytes >> 20,
            module_mib: l.module_bytes >> 20,
            code_mib: l.code_bytes >> 20,
            function_kib: l.function_bytes >> 10,
            block_nesting: l.block_nesting,
            definitions: l.definitions,
            compile_ms: l.compile_time.as_millis() as u64,
        }
    }
}

/// Everything `kiln serve` needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Holds the embedded log (`log/`), the views (`views/`), the registry,
    /// deployed modules, dead letters and the compile cache.
    pub data_dir: PathBuf,
    /// Directory of `*.wasm` modules deployed at start and watched; empty
    /// string in the file or `--no-watch` to disable.
    pub projections_dir: Option<PathBuf>,
    pub store: StoreBackend,
    pub embedded: EmbeddedOptions,
    pub jetstream: JetStreamConfig,
    pub api: ApiConfig,
    /// How long a standby version keeps tailing before it is retired.
    pub standby_grace_secs: u64,
    /// How long a module file must be quiet before it is loaded.
    pub watch_debounce_ms: u64,
    /// Most events a warming version applies between yields to live views.
    pub warmup_batch: usize,
    /// MiB of the log a warming per-stream view reads at a time and applies
    /// grouped by stream (each stream's document decoded and encoded once
    /// per window, not once per event); 0 = apply in log order.
    pub warmup_group_mib: usize,
    /// Workers a warming per-stream view replays with, each the streams of
    /// its hash partition; 0 (the default) = the machine's cores minus one.
    pub warmup_workers: usize,
    /// A live view whose checkpoint has not moved for this many seconds
    /// while the log moved on is reported stalled (`/readyz/{view}` 503).
    pub stall_after_secs: u64,
    /// Policies of view names not listed in `views`.
    pub default_policy: ViewPolicy,
    /// Policies per view name: `[views.users] cutover = "manual"`; a key
    /// a table leaves out is `default_policy`'s.
    pub views: BTreeMap<String, ViewOverrides>,
    pub runtime: RuntimeLimits,
    pub snapshots: SnapshotOptions,
    /// The fleet this instance belongs to (`[fleet]`, JetStream only).
    pub fleet: FleetConfig,
    /// `--recover-registry` (a one-time flag, never in the file): start even
    /// though `registry.json` is missing or corrupt while the data directory
    /// holds views, rebuilding it from the deployed modules.
    #[serde(skip)]
    pub recover_registry: bool,
}

/// One `[views.<name>]` table or `--view` spec: the keys it sets. Every
/// other key is the default policy's (`[default_policy]`, `--cutover`,
/// `--poison`), not the built-in default: a table that sets only `cutover`
/// keeps the `poison` the daemon was given.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ViewOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cutover: Option<CutoverPolicy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub poison: Option<PoisonPolicy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub standby_grace_secs: Option<u64>,
}

impl ViewOverrides {
    /// `default` with these keys set.
    pub fn over(&self, default: &ViewPolicy) -> ViewPolicy {
        ViewPolicy {
            cutover: self.cutover.unwrap_or(default.cutover),
            poison: self.poison.unwrap_or(default.poison),
            standby_grace_secs: self.standby_grace_secs.or(default.standby_grace_secs),
        }
    }
}

/// The largest `warmup_group_mib`: a window is held in memory while it applies.
pub const MAX_WARMUP_GROUP_MIB: usize = 4096;

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            data_dir: PathBuf::from("data"),
            projections_dir: Some(PathBuf::from("projections")),
            store: StoreBackend::Embedded,
            embedded: EmbeddedOptions::default(),
            jetstream: JetStreamConfig::default(),
            api: ApiConfig::default(),
            standby_grace_secs: 300,
            watch_debounce_ms: 300,
            warmup_batch: 256,
            warmup_group_mib: 64,
            warmup_workers: 0,
            stall_after_secs: 30,
            default_policy: ViewPolicy::default(),
            views: BTreeMap::new(),
            runtime: RuntimeLimits::default(),
            snapshots: SnapshotOptions::default(),
            fleet: FleetConfig::default(),
            recover_registry: false,
        }
    }
}

/// `kiln serve`'s flags; each also reads its `KILN_*` environment variable.
#[derive(Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// A TOML configuration file (see kiln.example.toml).
    #[arg(long, env = "KILN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory [default: ./data].
    #[arg(long, env = "KILN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Directory of *.wasm modules to deploy and watch [default: ./projections].
    #[arg(long, env = "KILN_PROJECTIONS")]
    pub projections: Option<PathBuf>,
    /// Do not deploy or watch a projections directory.
    #[arg(long, env = "KILN_NO_WATCH")]
    pub no_watch: bool,
    /// Start even though the registry (data/registry.json) is missing or
    /// corrupt while the data directory holds views: rebuild it from the
    /// deployed modules (each resumes from its checkpoint; none is active until
    /// cut over or promoted). Without it kiln refuses to start and drops nothing.
    #[arg(long)]
    pub recover_registry: bool,
    /// Event store backend [default: embedded].
    #[arg(long, env = "KILN_STORE", value_enum)]
    pub store: Option<StoreBackend>,
    /// Embedded store durability: fsync or buffered [default: fsync].
    #[arg(long, env = "KILN_DURABILITY", value_parser = parse_durability)]
    pub durability: Option<Durability>,
    /// NATS server URL(s), comma-separated (JetStream backend).
    #[arg(long, env = "KILN_NATS_URL", value_delimiter = ',')]
    pub nats_url: Vec<String>,
    /// JetStream stream holding the events [default: KILN].
    #[arg(long, env = "KILN_NATS_STREAM")]
    pub nats_stream: Option<String>,
    /// Address of the HTTP API [default: 127.0.0.1:7070].
    #[arg(long, env = "KILN_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address of the operations listener (probes and metrics only) [default: none].
    #[arg(long, env = "KILN_OPS_LISTEN")]
    pub ops_listen: Option<SocketAddr>,
    /// Bearer token required by the admin endpoints.
    #[arg(long, env = "KILN_ADMIN_TOKEN")]
    pub admin_token: Option<String>,
    /// Bearer token required by reads of views and of the log.
    #[arg(long, env = "KILN_READ_TOKEN")]
    pub read_token: Option<String>,
    /// Bearer token required by appends.
    #[arg(long, env = "KILN_WRITE_TOKEN")]
    pub write_token: Option<String>,
    /// Longest a read-your-writes query waits, in milliseconds [default: 5000].
    #[arg(long, env = "KILN_RYW_MAX_WAIT_MS")]
    pub ryw_max_wait_ms: Option<u64>,
    /// Largest request body in bytes, module uploads included [default: 16 MiB].
    #[arg(long, env = "KILN_BODY_LIMIT")]
    pub body_limit: Option<usize>,
    /// Seconds a standby version keeps tailing before it is retired [default: 300].
    #[arg(long, env = "KILN_STANDBY_GRACE_SECS")]
    pub standby_grace_secs: Option<u64>,
    /// Workers a warming per-stream view replays with [default: 0 = the
    /// cores minus one].
    #[arg(long, env = "KILN_WARMUP_WORKERS")]
    pub warmup_workers: Option<usize>,
    /// Milliseconds a module file must be quiet before it is loaded [default: 300].
    #[arg(long, env = "KILN_WATCH_DEBOUNCE_MS")]
    pub watch_debounce_ms: Option<u64>,
    /// Default cutover policy: auto, manual or auto-if-identical [default: auto].
    #[arg(long, env = "KILN_CUTOVER", value_parser = parse_cutover)]
    pub cutover: Option<CutoverPolicy>,
    /// Default poison-event policy: stop or park [default: stop].
    #[arg(long, env = "KILN_POISON", value_parser = parse_poison)]
    pub poison: Option<PoisonPolicy>,
    /// Per-view policy, `name:key=value` (keys: cutover, poison,
    /// standby_grace_secs); repeatable, e.g. `--view users:cutover=manual`.
    #[arg(long = "view", env = "KILN_VIEWS", value_delimiter = ';')]
    pub view_policies: Vec<String>,
    /// Memory cap per projection instance, in MiB [default: 256].
    #[arg(long, env = "KILN_MEMORY_MIB")]
    pub memory_mib: Option<usize>,
    /// Deadline of one batch, in milliseconds [default: 10000].
    #[arg(long, env = "KILN_BATCH_DEADLINE_MS")]
    pub batch_deadline_ms: Option<u64>,
    /// Keep view snapshots in this directory (and bootstrap from them).
    #[arg(long, env = "KILN_SNAPSHOT_DIR")]
    pub snapshot_dir: Option<PathBuf>,
    /// Keep view snapshots in this JetStream object store bucket (JetStream
    /// store), e.g. KILN_VIEWS.
    #[arg(long, env = "KILN_SNAPSHOT_BUCKET")]
    pub snapshot_bucket: Option<String>,
    /// Snapshot live views every "<n> events" or "<n>s|m|h".
    #[arg(long, env = "KILN_SNAPSHOT_EVERY")]
    pub snapshot_every: Option<String>,
    /// Join this fleet (JetStream only): membership, fleet-wide cutover of
    /// views with `cutover = "fleet"`, digests compared [default: none].
    #[arg(long, env = "KILN_FLEET")]
    pub fleet: Option<String>,
    /// This instance's id in the fleet [default: the host name].
    #[arg(long, env = "KILN_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Members that must have a version ready before the fleet switches to
    /// it [default: 0 = every live member].
    #[arg(long, env = "KILN_FLEET_QUORUM")]
    pub fleet_quorum: Option<usize>,
    /// Milliseconds between two membership records [default: 1000].
    #[arg(long, env = "KILN_FLEET_HEARTBEAT_MS")]
    pub fleet_heartbeat_ms: Option<u64>,
    /// A member silent for this many milliseconds has left [default: 5000].
    #[arg(long, env = "KILN_FLEET_MEMBER_TTL_MS")]
    pub fleet_member_ttl_ms: Option<u64>,
    /// Digest views at every multiple of this log position; 0 = never
    /// [default: 100000].
    #[arg(long, env = "KILN_FLEET_DIGEST_EVERY")]
    pub fleet_digest_every: Option<u64>,
}

fn parse_cutover(s: &str) -> Result<CutoverPolicy, String> {
    match s {
        "auto" => Ok(CutoverPolicy::Auto),
        "manual" => Ok(CutoverPolicy::Manual),
        "auto-if-identical" => Ok(CutoverPolicy::AutoIfIdentical),
        "fleet" => Ok(CutoverPolicy::Fleet),
        _ => Err(format!(
            "{s:?} is not a cutover policy (auto, manual, auto-if-identical or fleet)"
        )),
    }
}

fn parse_durability(s: &str) -> Result<Durability, String> {
    match s {
        "fsync" => Ok(Durability::Fsync),
        "buffered" => Ok(Durability::Buffered),
        _ => Err(format!("{s:?} is not a durability (fsync or buffered)")),
    }
}

fn parse_poison(s: &str) -> Result<PoisonPolicy, String> {
    match s {
        "stop" => Ok(PoisonPolicy::Stop),
        "park" => Ok(PoisonPolicy::Park),
        _ => Err(format!("{s:?} is not a poison policy (stop or park)")),
    }
}

impl ServeConfig {
    /// Reads the file named by `args.config` (if any), then applies the
    /// flags and environment variables over it.
    pub fn load(args: &ServeArgs) -> anyhow::Result<ServeConfig> {
        let mut config = match &args.config {
            Some(path) => ServeConfig::from_file(path)?,
            None => ServeConfig::default(),
        };
        config.apply(args)?;
        config.validate()?;
        Ok(config)
    }

    /// A TOML file's configuration (defaults for what it does not name).
    pub fn from_file(path: &Path) -> anyhow::Result<ServeConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the configuration file {}", path.display()))?;
        let mut config: ServeConfig = toml::from_str(&text)
            .with_context(|| format!("parsing the configuration file {}", path.display()))?;
        if config
            .projections_dir
            .as_ref()
            .is_some_and(|p| p.as_os_str().is_empty())
        {
            config.projections_dir = None;
        }
        Ok(config)
    }

    fn apply(&mut self, a: &ServeArgs) -> anyhow::Result<()> {
        if let Some(d) = &a.data_dir {
            self.data_dir = d.clone();
        }
        if let Some(p) = &a.projections {
            self.projections_dir = Some(p.clone());
        }
        self.recover_registry |= a.recover_registry;
        if a.no_watch {
            self.projections_dir = None;
        }
        if let Some(s) = a.store {
            self.store = s;
        }
        if let Some(d) = a.durability {
            self.embedded.durability = d;
        }
        if !a.nats_url.is_empty() {
            self.jetstream.servers = a.nats_url.clone();
            if a.store.is_none() {
                self.store = StoreBackend::Jetstream;
            }
        }
        if let Some(s) = &a.nats_stream {
            self.jetstream.stream = s.clone();
        }
        if let Some(l) = a.listen {
            self.api.listen = l;
        }
        if let Some(l) = a.ops_listen {
            self.api.ops_listen = Some(l);
        }
        if let Some(t) = &a.admin_token {
            self.api.admin_token = Some(t.clone());
        }
        if let Some(t) = &a.read_token {
            self.api.read_token = Some(t.clone());
        }
        if let Some(t) = &a.write_token {
            self.api.write_token = Some(t.clone());
        }
        if let Some(ms) = a.ryw_max_wait_ms {
            self.api.ryw_max_wait = Duration::from_millis(ms);
        }
        if let Some(b) = a.body_limit {
            self.api.body_limit = b;
        }
        if let Some(g) = a.standby_grace_secs {
            self.standby_grace_secs = g;
        }
        if let Some(d) = a.watch_debounce_ms {
            self.watch_debounce_ms = d;
        }
        if let Some(w) = a.warmup_workers {
            self.warmup_workers = w;
        }
        if let Some(c) = a.cutover {
            self.default_policy.cutover = c;
        }
        if let Some(p) = a.poison {
            self.default_policy.poison = p;
        }
        for spec in a.view_policies.iter().filter(|s| !s.is_empty()) {
            self.apply_view_policy(spec)?;
        }
        if let Some(m) = a.memory_mib {
            self.runtime.memory_mib = m;
        }
        if let Some(d) = a.batch_deadline_ms {
            self.runtime.batch_deadline_ms = d;
        }
        if let Some(d) = &a.snapshot_dir {
            self.snapshots.dir = Some(d.clone());
        }
        if let Some(b) = &a.snapshot_bucket {
            self.snapshots.bucket = Some(b.clone());
        }
        if let Some(e) = &a.snapshot_every {
            self.snapshots.every = Some(e.clone());
        }
        self.apply_fleet(a);
        Ok(())
    }

    fn apply_fleet(&mut self, a: &ServeArgs) {
        let f = &mut self.fleet;
        if let Some(n) = &a.fleet {
            f.name = n.clone();
        }
        if let Some(i) = &a.instance_id {
            f.instance_id = i.clone();
        }
        if let Some(q) = a.fleet_quorum {
            f.quorum = q;
        }
        if let Some(h) = a.fleet_heartbeat_ms {
            f.heartbeat_ms = h;
        }
        if let Some(t) = a.fleet_member_ttl_ms {
            f.member_ttl_ms = t;
        }
        if let Some(k) = a.fleet_digest_every {
            f.digest_every = k;
        }
    }

    /// A fleet needs JetStream, and `cutover = "fleet"` needs a fleet.
    fn validate_fleet(&self) -> anyhow::Result<()> {
        if self.fleet.enabled() {
            self.fleet.validate().context("the [fleet] configuration")?;
            anyhow::ensure!(
                self.store == StoreBackend::Jetstream,
                "fleet {:?}: a fleet coordinates through JetStream's KV; the embedded store has \
                 no fleet (run with --store jetstream, or drop [fleet] name / --fleet)",
                self.fleet.name
            );
        }
        let fleet_names: Vec<String> =
            std::iter::once(("default_policy", self.default_policy.clone()))
                .chain(self.views.keys().map(|n| (n.as_str(), self.policy(n))))
                .filter(|(_, p)| p.cutover == CutoverPolicy::Fleet)
                .map(|(n, _)| n.to_string())
                .collect();
        if !fleet_names.is_empty() && !self.fleet.enabled() {
            anyhow::bail!(
                "cutover = \"fleet\" ({}) needs a fleet: set [fleet] name (or --fleet) and run on \
                 JetStream; the embedded store serves one instance and has no fleet to decide",
                fleet_names.join(", ")
            );
        }
        Ok(())
    }

    /// `users:cutover=manual,poison=park`.
    fn apply_view_policy(&mut self, spec: &str) -> anyhow::Result<()> {
        let (name, settings) = spec.split_once(':').with_context(|| {
            format!("view policy {spec:?}: expected name:key=value[,key=value]")
        })?;
        crate::views::check_name(name).with_context(|| format!("view policy {spec:?}"))?;
        let policy = self.views.entry(name.to_string()).or_default();
        for kv in settings.split(',') {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("view policy {spec:?}: {kv:?} is not key=value"))?;
            let bad = |e: String| anyhow::anyhow!("view policy {spec:?}: {e}");
            match k {
                "cutover" => policy.cutover = Some(parse_cutover(v).map_err(bad)?),
                "poison" => policy.poison = Some(parse_poison(v).map_err(bad)?),
                "standby_grace_secs" => {
                    policy.standby_grace_secs = Some(
                        v.parse()
                            .map_err(|e| bad(format!("standby_grace_secs {v:?}: {e}")))?,
                    )
                }
                _ => {
                    return Err(bad(format!(
                        "unknown key {k:?} (cutover, poison, standby_grace_secs)"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Refuses settings that cannot work, naming the setting.
    pub fn validate(&self) -> anyhow::Result<()> {
        for name in self.views.keys() {
            crate::views::check_name(name).context("a [views.<name>] table")?;
        }
        anyhow::ensure!(
            self.runtime.memory_mib > 0,
            "runtime.memory_mib must be above 0"
        );
        anyhow::ensure!(
            self.runtime.batch_deadline_ms > 0,
            "runtime.batch_deadline_ms must be above 0"
        );
        let r = &self.runtime;
        for (key, value) in [
            ("batch_write_mib", r.batch_write_mib),
            ("batch_write_entries", r.batch_write_entries),
            ("scan_mib", r.scan_mib),
            ("module_mib", r.module_mib),
            ("code_mib", r.code_mib),
            ("function_kib", r.function_kib),
            ("block_nesting", r.block_nesting),
            ("definitions", r.definitions),
            ("compile_ms", r.compile_ms as usize),
        ] {
            anyhow::ensure!(value > 0, "runtime.{key} must be above 0");
        }
        anyhow::ensure!(self.warmup_batch > 0, "warmup_batch must be above 0");
        anyhow::ensure!(
            self.warmup_group_mib <= MAX_WARMUP_GROUP_MIB,
            "warmup_group_mib must be at most {MAX_WARMUP_GROUP_MIB} (0 = apply in log order)"
        );
        anyhow::ensure!(
            self.warmup_workers <= crate::lifecycle::MAX_WARMUP_WORKERS,
            "warmup_workers must be at most {} (0 = the cores minus one)",
            crate::lifecycle::MAX_WARMUP_WORKERS
        );
        if self.store == StoreBackend::Jetstream {
            self.jetstream
                .validate()
                .context("the [jetstream] configuration")?;
        }
        self.snapshot_every()?;
        let s = &self.snapshots;
        anyhow::ensure!(
            !(s.dir.is_some() && s.bucket.is_some()),
            "snapshots: set dir or bucket, not both"
        );
        anyhow::ensure!(
            s.bucket.is_none() || self.store == StoreBackend::Jetstream,
            "snapshots.bucket is a JetStream object store: it needs the JetStream store (on the embedded store use snapshots.dir / --snapshot-dir)"
        );
        if let Some(b) = &s.bucket {
            anyhow::ensure!(
                !b.is_empty()
                    && b.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                "snapshots.bucket {b:?}: letters, digits, '_' and '-' only"
            );
        }
        anyhow::ensure!(s.keep > 0, "snapshots.keep must be above 0");
        anyhow::ensure!(s.max_file_mib > 0, "snapshots.max_file_mib must be above 0");
        anyhow::ensure!(
            s.lease_ttl_secs >= 3,
            "snapshots.lease_ttl_secs must be at least 3"
        );
        self.validate_fleet()?;
        Ok(())
    }

    /// This instance's name in snapshot leases and manifests:
    /// `snapshots.instance`, else its fleet instance id (the host name by
    /// default) in a fleet, else `None` (host:pid). Never empty: an empty
    /// name would make every instance's lease look like its own.
    pub fn snapshot_instance(&self) -> Option<String> {
        match &self.snapshots.instance {
            Some(i) if !i.is_empty() => Some(i.clone()),
            _ if self.fleet.enabled() => Some(self.fleet.instance()),
            _ => None,
        }
    }

    /// `snapshots.every`, parsed.
    pub fn snapshot_every(&self) -> anyhow::Result<Option<crate::snapshots::Every>> {
        self.snapshots
            .every
            .as_deref()
            .map(|e| {
                e.parse()
                    .map_err(|e: String| anyhow::anyhow!("snapshots.every: {e}"))
            })
            .transpose()
    }

    /// The lifecycle's part.
    /// The policy of view name `name`: its `[views.<name>]` keys over the
    /// default policy.
    pub fn policy(&self, name: &str) -> ViewPolicy {
        self.views.get(name).map_or_else(
            || self.default_policy.clone(),
            |o| o.over(&self.default_policy),
        )
    }

    pub fn lifecycle(&self) -> LifecycleConfig {
        let mut c = LifecycleConfig::new(&self.data_dir);
        c.projections_dir = self.projections_dir.clone();
        c.watch_debounce = Duration::from_millis(self.watch_debounce_ms);
        c.default_policy = self.default_policy.clone();
        c.policies = self
            .views
            .keys()
            .map(|n| (n.clone(), self.policy(n)))
            .collect();
        c.standby_grace = Duration::from_secs(self.standby_grace_secs);
        c.warmup_batch = self.warmup_batch;
        c.warmup_group_bytes = self.warmup_group_mib << 20;
        c.warmup_workers = match self.warmup_workers {
            0 => crate::lifecycle::default_warmup_workers(),
            n => n,
        };
        c.stall_after = Duration::from_secs(self.stall_after_secs);
        c.recover_registry = self.recover_registry;
        c
    }

    /// The runtime's part.
    pub fn runtime(&self) -> RuntimeConfig {
        RuntimeConfig {
            memory_cap: self.runtime.memory_mib << 20,
            batch_deadline: Duration::from_millis(self.runtime.batch_deadline_ms),
            cache_dir: self
                .runtime
                .compile_cache
                .then(|| self.data_dir.join("cache")),
            limits: crate::runtime::Limits {
                batch_write_bytes: self.runtime.batch_write_mib << 20,
                batch_write_entries: self.runtime.batch_write_entries,
                scan_bytes: self.runtime.scan_mib << 20,
                module_bytes: self.runtime.module_mib << 20,
                code_bytes: self.runtime.code_mib << 20,
                function_bytes: self.runtime.function_kib << 10,
                block_nesting: self.runtime.block_nesting,
                definitions: self.runtime.definitions,
                compile_time: Duration::from_millis(self.runtime.compile_ms),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_run_embedded_in_data_with_projections_watched() {
        let c = ServeConfig::load(&ServeArgs::default()).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("data"));
        assert_eq!(c.projections_dir, Some(PathBuf::from("projections")));
        assert_eq!(c.store, StoreBackend::Embedded);
        assert_eq!(c.api.listen.to_string(), "127.0.0.1:7070");
    }

    #[test]
    fn file_then_flags_override() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.toml");
        std::fs::write(
            &path,
            r#"
data_dir = "/var/lib/kiln"
store = "jetstream"
standby_grace_secs = 60
[jetstream]
servers = ["nats://a:4222"]
[views.users]
cutover = "manual"
poison = "park"
"#,
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            standby_grace_secs: Some(5),
            ryw_max_wait_ms: Some(250),
            body_limit: Some(1 << 20),
            view_policies: vec!["orders:poison=park,standby_grace_secs=9".into()],
            ..ServeArgs::default()
        };
        let c = ServeConfig::load(&args).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/kiln"));
        assert_eq!(c.store, StoreBackend::Jetstream);
        assert_eq!(c.standby_grace_secs, 5);
        assert_eq!(c.api.ryw_max_wait, Duration::from_millis(250));
        assert_eq!(c.api.body_limit, 1 << 20);
        assert_eq!(c.policy("users").cutover, CutoverPolicy::Manual);
        assert_eq!(c.policy("orders").poison, PoisonPolicy::Park);
        assert_eq!(c.policy("orders").standby_grace_secs, Some(9));
        assert_eq!(c.lifecycle().policy("users").poison, PoisonPolicy::Park);
    }

    /// Found while writing a test: a `[views.chaos]` table that set only
    /// `cutover` took the built-in `poison = "stop"`, not the `--poison
    /// park` (or `[default_policy]`) the daemon was given, so the version
    /// failed on a poison event the operator had asked to park.
    #[test]
    fn a_views_table_takes_the_keys_it_leaves_out_from_the_default_policy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.toml");
        std::fs::write(
            &path,
            "[default_policy]\nstandby_grace_secs = 7\n[views.chaos]\ncutover = \"manual\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            poison: Some(PoisonPolicy::Park),
            view_policies: vec!["users:cutover=manual".into()],
            ..ServeArgs::default()
        };
        let c = ServeConfig::load(&args).unwrap();
        let lc = c.lifecycle();
        for name in ["chaos", "users"] {
            let p = lc.policy(name);
            assert_eq!(p.cutover, CutoverPolicy::Manual, "{name}");
            assert_eq!(p.poison, PoisonPolicy::Park, "{name}");
            assert_eq!(p.standby_grace_secs, Some(7), "{name}");
        }
        assert_eq!(lc.policy("orders").cutover, CutoverPolicy::Auto);
        assert_eq!(lc.policy("orders").poison, PoisonPolicy::Park);
    }

    #[test]
    fn the_example_file_names_every_key_at_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kiln.example.toml");
        let c = ServeConfig::from_file(&path).unwrap();
        let d = ServeConfig::default();
        // Compare as TOML values: every key the file sets is at its default.
        let as_toml = |c: &ServeConfig| toml::Value::try_from(c).unwrap();
        assert_eq!(as_toml(&c), as_toml(&d));
    }

    #[test]
    fn durability_from_file_and_flag() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.toml");
        std::fs::write(&path, "[embedded]\ndurability = \"buffered\"\n").unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            ..ServeArgs::default()
        };
        assert_eq!(
            ServeConfig::load(&args).unwrap().embedded.durability,
            Durability::Buffered
        );
        let args = ServeArgs {
            config: Some(path),
            durability: Some(Durability::Fsync),
            ..ServeArgs::default()
        };
        assert_eq!(
            ServeConfig::load(&args).unwrap().embedded.durability,
            Durability::Fsync
        );
        assert!(
            parse_durability("sometimes")
                .unwrap_err()
                .contains("sometimes")
        );
    }

    #[test]
    fn fleet_cutover_needs_a_fleet_on_jetstream() {
        let args = ServeArgs {
            view_policies: vec!["users:cutover=fleet".into()],
            ..ServeArgs::default()
        };
        let e = ServeConfig::load(&args).unwrap_err();
        assert!(format!("{e:#}").contains("needs a fleet"), "{e:#}");
        let args = ServeArgs {
            view_policies: vec!["users:cutover=fleet".into()],
            fleet: Some("prod".into()),
            ..ServeArgs::default()
        };
        let e = ServeConfig::load(&args).unwrap_err();
        assert!(
            format!("{e:#}").contains("embedded store has no fleet"),
            "{e:#}"
        );
        let args = ServeArgs {
            view_policies: vec!["users:cutover=fleet".into()],
            fleet: Some("prod".into()),
            instance_id: Some("a".into()),
            nats_url: vec!["nats://127.0.0.1:4222".into()],
            ..ServeArgs::default()
        };
        let c = ServeConfig::load(&args).unwrap();
        assert_eq!(c.policy("users").cutover, CutoverPolicy::Fleet);
        assert_eq!(c.fleet.instance(), "a");
        assert_eq!(c.snapshot_instance().as_deref(), Some("a"));
        // Regression (found by reading): a fleet member without an instance
        // id took the empty configured id as its snapshot lease name, the
        // same on every member, so each took the others' leases as its own.
        let args = ServeArgs {
            view_policies: vec!["users:cutover=fleet".into()],
            fleet: Some("prod".into()),
            nats_url: vec!["nats://127.0.0.1:4222".into()],
            ..ServeArgs::default()
        };
        let c = ServeConfig::load(&args).unwrap();
        let name = c.snapshot_instance().expect("a fleet member's name");
        assert!(!name.is_empty());
        assert_eq!(name, c.fleet.instance());
        let args = ServeArgs {
            fleet: Some("no spaces".into()),
            nats_url: vec!["nats://127.0.0.1:4222".into()],
            ..ServeArgs::default()
        };
        let e = ServeConfig::load(&args).unwrap_err();
        assert!(format!("{e:#}").contains("fleet.name"), "{e:#}");
    }

    #[test]
    fn bad_settings_are_named() {
        let args = ServeArgs {
            view_policies: vec!["users:cutover=sometimes".into()],
            ..ServeArgs::default()
        };
        let e = ServeConfig::load(&args).unwrap_err();
        assert!(format!("{e:#}").contains("sometimes"), "{e:#}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.toml");
        std::fs::write(&path, "data_dirr = \"x\"\n").unwrap();
        let e = ServeConfig::from_file(&path).unwrap_err();
        assert!(format!("{e:#}").contains("data_dirr"), "{e:#}");
    }
}
