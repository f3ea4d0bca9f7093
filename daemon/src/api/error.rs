//! The API's one error type: every failure is answered as
//! `{"error": {"code": "...", "message": "..."}}` with an HTTP status that fits.
//!
//! Codes are stable (clients and the CLI match on them); messages are for people
//! and name the thing (which view, which stream, which key, which limit).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::lifecycle::LifecycleError;
use crate::store::StoreError;
use crate::views::ViewError;

/// An error answer: status, stable code, message, and optional extra fields
/// placed next to `code` and `message` (e.g. `current_version` on a conflict).
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub extra: Map<String, Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: Map::new(),
        }
    }

    pub fn with(mut self, field: &str, value: impl Into<Value>) -> Self {
        self.extra.insert(field.to_string(), value.into());
        self
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn malformed_body(message: impl Into<String>) -> Self {
        ApiError::bad_request("malformed_body", message)
    }

    pub fn bad_key(message: impl Into<String>) -> Self {
        ApiError::bad_request("bad_key", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // A probe's "not ready" is a state the orchestrator polls for (every
        // few seconds through a warm-up), not a fault: kept out of the warnings.
        if self.code == "not_ready" {
            tracing::debug!(code = self.code, status = %self.status, "{}", self.message);
        } else if self.status.is_server_error() {
            tracing::warn!(code = self.code, status = %self.status, "{}", self.message);
        }
        let mut body = Map::new();
        body.insert("code".into(), Value::from(self.code));
        body.insert("message".into(), Value::from(self.message));
        body.extend(self.extra);
        (self.status, axum::Json(json!({ "error": body }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let message = e.to_string();
        match e {
            StoreError::VersionConflict {
                stream,
                expected,
                actual,
            } => ApiError::new(StatusCode::CONFLICT, "version_conflict", message)
                .with("stream", stream.as_str())
                .with("expected", expected_text(expected))
                .with("current_version", actual),
            StoreError::TagConflict {
                stream,
                tag,
                position,
                ..
            } => ApiError::new(StatusCode::CONFLICT, "tag_conflict", message)
                .with("stream", stream.as_str())
                .with("tag", tag)
                .with("position", position),
            StoreError::InvalidStreamId { .. } => {
                ApiError::bad_request("invalid_stream_id", message)
            }
            StoreError::InvalidTag { .. } => ApiError::bad_request("invalid_tag", message),
            StoreError::InvalidEvent { .. } => ApiError::bad_request("invalid_event", message),
            StoreError::NoEvents { .. } => ApiError::bad_request("no_events", message),
            StoreError::DuplicateEventId { .. } => {
                ApiError::new(StatusCode::CONFLICT, "duplicate_event_id", message)
            }
            StoreError::TooLarge { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "append_too_large", message)
            }
            StoreError::Timeout { .. } => {
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, "store_timeout", message)
            }
            StoreError::ForeignMessage {
                stream, position, ..
            } => ApiError::new(StatusCode::CONFLICT, "foreign_message", message)
                .with("stream", stream.as_str())
                .with("position", position),
            StoreError::Unavailable { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_retry", message)
            }
            StoreError::Closed | StoreError::Backend { .. } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                message,
            ),
            _ => ApiError::internal(format!("event store: {message}")),
        }
    }
}

impl From<ViewError> for ApiError {
    fn from(e: ViewError) -> Self {
        let message = e.to_string();
        match e {
            ViewError::InvalidName { .. }
            | ViewError::InvalidId { .. }
            | ViewError::InvalidVersion { .. } => ApiError::bad_request("invalid_view", message),
            ViewError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "unknown_view", message),
            ViewError::AlreadyExists(_) => {
                ApiError::new(StatusCode::CONFLICT, "already_exists", message)
            }
            _ => ApiError::internal(format!("view store: {message}")),
        }
    }
}

impl From<LifecycleError> for ApiError {
    fn from(e: LifecycleError) -> Self {
        let message = e.to_string();
        match e {
            LifecycleError::UnknownView { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_view", message)
            }
            LifecycleError::NoActiveVersion { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "no_active_version", message)
            }
            LifecycleError::NoMatchingVersion { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "no_matching_version", message)
            }
            LifecycleError::InvalidSpec { .. } => ApiError::bad_request("invalid_view", message),
            LifecycleError::NotReady { .. } => {
                ApiError::new(StatusCode::CONFLICT, "not_ready", message)
            }
            LifecycleError::ImmutableVersion { .. } => {
                ApiError::new(StatusCode::CONFLICT, "immutable_version", message)
            }
            LifecycleError::NoStandby { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "no_standby", message)
            }
            LifecycleError::Timeout {
                view,
                position,
                checkpoint,
                millis,
            } => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "read_your_writes_timeout",
                message,
            )
            .with("view", view.to_string())
            .with("position", position)
            .with("checkpoint", checkpoint)
            .with("waited_ms", millis),
            LifecycleError::Failed { .. } => {
                ApiError::new(StatusCode::CONFLICT, "view_failed", message)
            }
            LifecycleError::Retired { .. } => {
                ApiError::new(StatusCode::CONFLICT, "view_retired", message)
            }
            LifecycleError::NotComparable { ref id, state } => {
                ApiError::new(StatusCode::CONFLICT, "not_comparable", message)
                    .with("view", id.to_string())
                    .with("state", state.to_string())
            }
            LifecycleError::NoCommonPosition(u) => {
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, "no_common_position", message)
                    .with("a", u.a.to_string())
                    .with("a_at", u.a_at)
                    .with("b", u.b.to_string())
                    .with("b_at", u.b_at)
                    .with("position", u.target)
                    .with("waited_ms", u.millis)
            }
            LifecycleError::NotFailed { .. } => {
                ApiError::new(StatusCode::CONFLICT, "not_failed", message)
            }
            LifecycleError::WarmingInPartitions { .. } => {
                ApiError::new(StatusCode::CONFLICT, "warming_in_partitions", message)
            }
            LifecycleError::SnapshotsOff => {
                ApiError::new(StatusCode::NOT_FOUND, "snapshots_off", message)
            }
            LifecycleError::NotSnapshottable { ref id, state } => {
                ApiError::new(StatusCode::CONFLICT, "not_snapshottable", message)
                    .with("view", id.to_string())
                    .with("state", state.to_string())
            }
            LifecycleError::NothingToSnapshot { .. } => {
                ApiError::new(StatusCode::CONFLICT, "nothing_to_snapshot", message)
            }
            LifecycleError::SnapshotBusy { ref holder, .. } => {
                let holder = holder.clone();
                ApiError::new(StatusCode::CONFLICT, "snapshot_busy", message).with("holder", holder)
            }
            LifecycleError::Load(_) => ApiError::bad_request("invalid_module", message),
            LifecycleError::Store(e) => e.into(),
            LifecycleError::View(e) => e.into(),
            LifecycleError::ShuttingDown => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", message)
            }
            LifecycleError::FleetSwitching { ref name, ref to } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "fleet_switching", message)
                    .with("name", name.clone())
                    .with("to", to.to_string())
            }
            LifecycleError::FleetCatchingUp {
                ref name,
                ref version,
            } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "fleet_catching_up",
                message,
            )
            .with("name", name.clone())
            .with("version", version.to_string()),
            LifecycleError::FleetVersionMissing {
                ref name,
                ref version,
                why,
            } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "fleet_version_missing",
                message,
            )
            .with("name", name.clone())
            .with("version", version.to_string())
            .with("why", why),
            LifecycleError::RetireFleetVersion { ref id, role } => {
                ApiError::new(StatusCode::CONFLICT, "fleet_version", message)
                    .with("view", id.to_string())
                    .with("role", role)
            }
            LifecycleError::FleetOtherLogic(ref o) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "fleet_other_logic",
                message,
            )
            .with("name", o.version.name().to_string())
            .with("version", o.version.to_string())
            .with("fleet_fingerprint", o.fleet.clone())
            .with("fingerprint", o.here.clone()),
            LifecycleError::FleetPending { .. } => {
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, "fleet_pending", message)
            }
            LifecycleError::FleetRefused { .. } => {
                ApiError::new(StatusCode::CONFLICT, "fleet_refused", message)
            }
            LifecycleError::FleetUnavailable(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "fleet_unavailable",
                message,
            ),
            // Projection, I/O, registry and internal failures: the daemon's fault.
            _ => ApiError::internal(message),
        }
    }
}

/// `3`, `"any"`, `"no_stream"` or `"exists"`: the wire form of an expected version.
pub fn expected_text(expected: crate::store::ExpectedVersion) -> Value {
    use crate::store::ExpectedVersion::*;
    match expected {
        Any => "any".into(),
        NoStream => "no_stream".into(),
        Exists => "exists".into(),
        Exact(v) => v.into(),
    }
}
