//! What can go wrong, typed: every refusal an operator or a client sees
//! names the thing and the reason.

use super::*;

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
    #[error(
        "view {id} is warming in {partitions} partitions: its parked events can be retried once it has caught up"
    )]
    WarmingInPartitions { id: ViewId, partitions: usize },
    #[error(
        "snapshots are off: start kiln with --snapshot-dir (or [snapshots] dir), or --snapshot-bucket on JetStream"
    )]
    SnapshotsOff,
    #[error(
        "view {id} is {state}: only a caught-up version (ready, active or standby) is snapshotted"
    )]
    NotSnapshottable { id: ViewId, state: ViewState },
    #[error("view {id} has applied no event yet: there is nothing to snapshot")]
    NothingToSnapshot { id: ViewId },
    #[error("another instance ({holder}) is publishing a snapshot of {id}'s logic now")]
    SnapshotBusy { id: ViewId, holder: String },
    #[error("snapshot of {id}: {reason}")]
    Snapshot { id: ViewId, reason: String },
    #[error(
        "view {id} is {state}: only a caught-up version tailing live (ready, active or standby) can be compared"
    )]
    NotComparable { id: ViewId, state: ViewState },
    #[error(transparent)]
    NoCommonPosition(Box<compare::Unmet>),
    #[error("view {id} is {state}, not failed: there is nothing to resume")]
    NotFailed { id: ViewId, state: ViewState },
    #[error(
        "view {id} is what {} serves: it stays (promote or roll back to another version first, or retire it explicitly through the API or CLI)",
        id.name()
    )]
    RetireActive { id: ViewId },
    #[error(
        "view {id} is the fleet's {role} version of {}: every member keeps it (promote or roll the fleet back to another version first)",
        id.name()
    )]
    RetireFleetVersion { id: ViewId, role: &'static str },
    #[error(
        "the registry {path} is missing, yet the data directory holds {what}: refusing to start rather than guess which versions were active or retired (nothing was dropped). Restore registry.json from a backup, or start once with --recover-registry to rebuild it from the deployed modules (each resumes from its view's checkpoint; none is active until it is cut over or promoted)"
    )]
    RegistryMissing { path: PathBuf, what: String },
    #[error("dead letter at position {position} of {view}: {reason}")]
    CorruptParked {
        view: ViewId,
        position: u64,
        reason: String,
    },
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
    #[error(
        "the fleet is switching view {name} to {to}: every member stops answering the old version first; retry shortly"
    )]
    FleetSwitching { name: String, to: ViewId },
    #[error(
        "the fleet serves {version} for view {name}, which is not caught up on this instance yet; retry shortly or ask another member"
    )]
    FleetCatchingUp { name: String, version: ViewId },
    #[error(
        "the fleet serves {version} for view {name}, which is {why} on this instance: it answers again once {version} is deployed here (or the fleet moves to another version); ask another member"
    )]
    FleetVersionMissing {
        name: String,
        version: ViewId,
        why: &'static str,
    },
    #[error(
        "the fleet serves {} for view {} built from module {}, but {} here runs module {}: this instance does not answer it; deploy the fleet's build under a new version everywhere",
        .0.version, .0.version.name(), .0.fleet, .0.version, .0.here
    )]
    FleetOtherLogic(Box<OtherLogic>),
    #[error(
        "the fleet has not made {id} active within {millis} ms (proposed; see `kiln fleet status`)"
    )]
    FleetPending { id: ViewId, millis: u64 },
    #[error("the fleet refused to make {id} active: {reason}")]
    FleetRefused { id: ViewId, reason: String },
    #[error("the fleet cannot be reached: {0}")]
    FleetUnavailable(String),
    #[error("no digest of {view} at position {at}: the view is at {checkpoint}")]
    DigestMissed {
        view: ViewId,
        at: Position,
        checkpoint: Position,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<ProjectionError> for LifecycleError {
    fn from(e: ProjectionError) -> Self {
        LifecycleError::Projection(Box::new(e))
    }
}

impl LifecycleError {
    pub(super) fn io(
        what: impl Into<String>,
        path: &Path,
    ) -> impl FnOnce(std::io::Error) -> LifecycleError {
        let what = what.into();
        let path = path.to_path_buf();
        move |source| LifecycleError::Io { what, path, source }
    }
}
