//! The lifecycle's configuration: per-name policies (cutover, poison
//! events, standby grace) over defaults, and where things live.

use super::*;

/// When a ready version becomes active.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CutoverPolicy {
    /// As soon as it is ready (the newest ready version wins).
    #[default]
    Auto,
    /// Only on [`Lifecycle::promote`].
    Manual,
    /// When ready, its documents are compared with the active version's at
    /// one log position: identical, it becomes active at once (a refactor,
    /// a faster build); different, or the comparison cannot be taken, it
    /// waits for [`Lifecycle::promote`] with the comparison in its status.
    /// With no healthy active version (a first deploy) it is `auto`.
    #[serde(rename = "auto-if-identical", alias = "auto_if_identical")]
    AutoIfIdentical,
    /// The fleet decides (`[fleet]`, JetStream only): the name's active
    /// version is one key in the fleet's KV bucket, changed by
    /// compare-and-set; this instance follows it (see [`crate::fleet`]).
    /// [`Lifecycle::promote`] and [`Lifecycle::rollback`] change the
    /// fleet's decision, never this instance alone.
    Fleet,
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
    /// Bytes of the log a warming per-stream view applies grouped by
    /// stream (see `worker/grouped.rs`); 0: in log order.
    pub warmup_group_bytes: usize,
    /// Workers a warming per-stream view (manifest `per_stream`) replays
    /// with, each the streams of its hash partition with its own instance and
    /// checkpoint; 1 = one worker, as any other view.
    pub warmup_workers: usize,
    /// A warm-up with fewer events than this left to replay uses one worker
    /// (splitting and merging would cost more than they save).
    pub warmup_partition_min_events: u64,
    /// Start even though `registry.json` is missing or unreadable while the
    /// data directory holds views or modules: the registry is rebuilt from
    /// `modules/`, each version resuming from its view's checkpoint, none
    /// active until it catches up and is cut over or promoted. Off by default:
    /// kiln refuses to guess (`kiln serve --recover-registry`).
    pub recover_registry: bool,
    /// A live version whose checkpoint has not moved for this long while the
    /// log moved on is reported stalled (`GET /views`, `/readyz/{view}` 503,
    /// `kiln_view_stalled_seconds`).
    pub stall_after: Duration,
    /// View snapshots: published when a warm-up this instance ran is caught
    /// up (and periodically), bootstrapped from by fresh versions
    /// (see [`crate::snapshots`]). `None`: no snapshots.
    pub snapshots: Option<Arc<Snapshots>>,
}

/// Most workers one view warms with (and the most partitions a stored
/// warm-up may have).
pub const MAX_WARMUP_WORKERS: usize = 64;

/// The default of `warmup_workers`: the machine's cores minus one (at least 1),
/// so live views and the API keep a core.
pub fn default_warmup_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get().saturating_sub(1))
        .unwrap_or(1)
        .clamp(1, MAX_WARMUP_WORKERS)
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
            warmup_group_bytes: 64 << 20,
            warmup_workers: 1,
            warmup_partition_min_events: 4096,
            recover_registry: false,
            stall_after: Duration::from_secs(30),
            snapshots: None,
        }
    }

    /// The policies of view name `name`.
    pub fn policy(&self, name: &str) -> &ViewPolicy {
        self.policies.get(name).unwrap_or(&self.default_policy)
    }

    pub(super) fn grace_of(&self, name: &str) -> Duration {
        self.policy(name)
            .standby_grace_secs
            .map(Duration::from_secs)
            .unwrap_or(self.standby_grace)
    }
}

/// Documents as (key, document) pairs, in key order.
pub type Documents = Vec<(Vec<u8>, Vec<u8>)>;
