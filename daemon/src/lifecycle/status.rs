//! What the lifecycle answers about its versions: their states, how a name
//! resolves, each version's status, a deploy's outcome.

use super::*;

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

/// What a view spec resolved to (see [`Lifecycle::resolve_version`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The registered version the spec names, e.g. `users-1_0_1`.
    pub version: ViewId,
    /// The view holding its documents: `version` itself, or the view it is an
    /// alias of.
    pub physical: ViewId,
    /// The version failed while active and nothing healthy replaced it: its
    /// documents are served as they were when it stopped (stale).
    pub stale: bool,
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
    /// The module's fingerprint (its logic, version left out): `v3:<hex>`.
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
    /// Workers its warm-up replays (or replayed, since the daemon started)
    /// with, each the streams of one partition; `None`: one worker.
    pub warmup_workers: Option<usize>,
    /// Events its warm-up applied in windows grouped by stream (since the
    /// daemon started; see `warmup_group_mib`).
    pub grouped_events: u64,
    /// Why its worker is paused by a host fault (storage I/O, a full disk,
    /// the log unreadable): it retries with backoff and resumes by itself,
    /// serving its committed documents meanwhile. Not a failure.
    pub paused: Option<String>,
    /// Why its view warms with one worker although its module declares
    /// `per_stream`: a split warm-up found a document touched from two
    /// partitions (`views::owners`), and the view warmed again from the
    /// first event in log order. Its documents are right; the module breaks
    /// its promise.
    pub warning: Option<String>,
    /// Host faults met since the daemon started.
    pub host_faults: u64,
    /// Comparisons and digests waiting for this view to reach a position
    /// (its worker pins it there and goes on; it waits for no one).
    pub awaited: usize,
    /// A live version whose checkpoint has not moved for this many seconds
    /// (at least [`LifecycleConfig::stall_after`]) while the log moved on
    /// without it (lag above 0): a stuck tail, a paused or spinning worker.
    pub stalled_secs: Option<f64>,
    pub last_error: Option<String>,
    /// Position of the event the version failed on, when `failed`.
    pub failed_position: Option<u64>,
    /// Failed while active with no healthy standby: the bare name still
    /// serves its documents, marked stale.
    pub serving_stale: bool,
    /// How it last became active (`auto cutover`, `promote`, `rollback`,
    /// `automatic rollback: <id> failed`, `auto-if-identical cutover: ...`).
    pub activated_by: Option<String>,
    /// Its documents compared with the name's active version's when it
    /// became ready (under `auto-if-identical` and `manual` cutover): what a
    /// promote would change.
    pub cutover_check: Option<CutoverCheck>,
    /// Snapshots: waiting for another instance's, downloading, bootstrapped
    /// from one at a position, refused one, or building (this instance
    /// publishes when caught up). `None`: no snapshots configured, or an
    /// alias.
    pub snapshot: Option<SnapshotActivity>,
    /// Position of the last snapshot this instance published of its view
    /// (or bootstrapped it from) since it started.
    pub last_snapshot: Option<u64>,
    /// Where its module came from (a file path, or `api`).
    pub source: String,
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
    /// A retired version deployed again explicitly whose view was still live
    /// (an alias reads it): back at once, nothing replayed.
    Restored(ViewId),
    /// The watched directory holds a version an operator retired: it stays
    /// retired (only an explicit deploy brings it back).
    StaysRetired(ViewId),
}

impl DeployOutcome {
    pub fn id(&self) -> &ViewId {
        match self {
            DeployOutcome::Warming(id)
            | DeployOutcome::Alias { id, .. }
            | DeployOutcome::AlreadyDeployed(id)
            | DeployOutcome::Restored(id)
            | DeployOutcome::StaysRetired(id) => id,
        }
    }
}

/// What can go wrong with a lifecycle operation. The API maps variants to HTTP
/// codes: `UnknownView`/`NoActiveVersion`/`NoMatchingVersion`/`NoStandby` →
/// 404, `InvalidSpec`/`Load` → 400, `NotReady`/`ImmutableVersion`/`Failed` →
/// 409, `Timeout` → 504, the rest → 500 (`ShuttingDown` → 503).
/// The fleet's version of a name is, here, another module (see
/// [`LifecycleError::FleetOtherLogic`]).
#[derive(Debug)]
pub struct OtherLogic {
    pub version: ViewId,
    /// The fingerprint the fleet decided on.
    pub fleet: String,
    /// The fingerprint of the module deployed here under that version.
    pub here: String,
}
