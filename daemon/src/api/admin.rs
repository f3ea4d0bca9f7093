//! Admin endpoints: deploy a module, promote, roll back, resume, retire, and list / retry
//! parked events. When the server has an admin token, each needs
//! `Authorization: Bearer <token>` (checked by [`super::access`]).

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::access::BodyKind;
use super::views::{path_error, query_error};
use super::{ApiError, AppState};
use crate::lifecycle::{DeployOutcome, LifecycleError};
use crate::views::ViewId;

/// An exact id (`users-1_2_0`), or a spec the lifecycle resolves (`users@^2`).
fn version_id(state: &AppState, text: &str) -> Result<ViewId, ApiError> {
    match text.parse::<ViewId>() {
        Ok(id) => Ok(id),
        Err(e) if text.contains('@') => {
            let _ = e;
            Ok(state.lifecycle.resolve_version(text)?.version)
        }
        Err(e) => Err(ApiError::bad_request(
            "invalid_view",
            format!("{e} (admin actions take an exact version id like users-1_2_0)"),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployQuery {
    /// Where the module came from, for logs and status (e.g. its file name).
    label: Option<String>,
}

/// `POST /admin/views` with the module's bytes as the body.
pub async fn deploy(
    State(state): State<AppState>,
    query: Result<Query<DeployQuery>, QueryRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(query_error)?;
    let wasm = state
        .read_body(body, BodyKind::Wasm, "the uploaded module")
        .await?;
    if wasm.len() < 8 || &wasm[..4] != b"\0asm" {
        return Err(ApiError::bad_request(
            "invalid_module",
            format!(
                "the uploaded body ({} bytes) is not a WebAssembly module (no \\0asm header)",
                wasm.len()
            ),
        ));
    }
    let label = q.label.unwrap_or_else(|| "upload".to_string());
    let outcome = state.lifecycle.deploy(&wasm, &label).await?;
    let status_now = state.lifecycle.status_of(outcome.id());
    let (status, mut body) = match outcome {
        DeployOutcome::Warming(id) => (
            StatusCode::ACCEPTED,
            json!({ "outcome": "warming", "id": id.to_string() }),
        ),
        DeployOutcome::Alias { id, of } => (
            StatusCode::OK,
            json!({ "outcome": "alias", "id": id.to_string(), "of": of.to_string() }),
        ),
        DeployOutcome::AlreadyDeployed(id) => (
            StatusCode::OK,
            json!({ "outcome": "already_deployed", "id": id.to_string() }),
        ),
        DeployOutcome::Restored(id) => (
            StatusCode::OK,
            json!({ "outcome": "restored", "id": id.to_string() }),
        ),
        // Only the watched directory gets this answer; an API deploy is explicit.
        DeployOutcome::StaysRetired(id) => (
            StatusCode::CONFLICT,
            json!({ "outcome": "retired", "id": id.to_string() }),
        ),
    };
    // Where the version stands now (an alias of a warming view warms with
    // it), and why it aliased or warms: the fingerprints compared, the parts
    // that differed.
    if let Some(v) = status_now {
        body["state"] = json!(v.state);
        body["fingerprint"] = json!(v.fingerprint);
        body["why"] = json!(v.deploy_note);
    }
    Ok((status, Json(body)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupIn {
    /// Absolute path on the daemon's machine, absent or empty.
    dir: std::path::PathBuf,
}

/// `POST /admin/backup` `{"dir": "/abs/path"}`: a consistent copy of the
/// data directory while the daemon runs (see [`crate::backup`]).
pub async fn backup(State(state): State<AppState>, body: Body) -> Result<Json<Value>, ApiError> {
    use crate::backup::BackupError;
    let bytes = state
        .read_body(body, BodyKind::Json, "the backup request")
        .await?;
    let req: BackupIn = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::malformed_body(format!(
            "the backup request is not {{\"dir\": \"/absolute/path\"}}: {e}"
        ))
    })?;
    let started = std::time::Instant::now();
    let manifest = crate::backup::create(&state.lifecycle, &req.dir)
        .await
        .map_err(|e| match e {
            BackupError::BadTarget { .. } => {
                ApiError::bad_request("bad_backup_target", e.to_string())
            }
            BackupError::Unsupported => ApiError::bad_request("backup_unsupported", e.to_string()),
            other => ApiError::internal(other.to_string()),
        })?;
    tracing::info!(
        dir = %req.dir.display(),
        log_head = manifest.log_head,
        files = manifest.files.len(),
        "backup written"
    );
    Ok(Json(json!({
        "dir": req.dir,
        "format": manifest.format,
        "kiln_version": manifest.kiln_version,
        "created_at_ms": manifest.created_at_ms,
        "log_head": manifest.log_head,
        "views": manifest.views,
        "files": manifest.files.len(),
        "bytes": manifest.bytes(),
        "took_ms": started.elapsed().as_millis() as u64,
    })))
}

/// `POST /admin/views/{id}/promote`.
pub async fn promote(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(text) = path.map_err(path_error)?;
    let id = version_id(&state, &text)?;
    state.lifecycle.promote(&id).await?;
    Ok(Json(json!({ "name": id.name(), "active": id.to_string() })))
}

/// `POST /admin/views/{name}/rollback`: the previous active version becomes active.
pub async fn rollback(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(name) = path.map_err(path_error)?;
    let id = state.lifecycle.rollback(&name).await?;
    Ok(Json(json!({ "name": name, "active": id.to_string() })))
}

/// `POST /admin/views/{id}/resume`: a failed version goes on from its
/// checkpoint.
pub async fn resume(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(text) = path.map_err(path_error)?;
    let id = version_id(&state, &text)?;
    state.lifecycle.resume(&id).await?;
    let now = state.lifecycle.status_of(&id).map(|s| s.state);
    Ok(Json(json!({ "resumed": id.to_string(), "state": now })))
}

/// `POST /admin/views/{id}/retire`.
pub async fn retire(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(text) = path.map_err(path_error)?;
    let id = version_id(&state, &text)?;
    state.lifecycle.retire(&id).await?;
    Ok(Json(json!({ "retired": id.to_string() })))
}

/// `GET /admin/views/{id}/parked`.
pub async fn parked(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(text) = path.map_err(path_error)?;
    let id = version_id(&state, &text)?;
    let parked = state.lifecycle.parked(&id)?;
    Ok(Json(json!({ "view": id.to_string(), "parked": parked })))
}

/// `POST /admin/views/{id}/parked/retry`.
pub async fn retry_parked(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(text) = path.map_err(path_error)?;
    let id = version_id(&state, &text)?;
    let retried = state.lifecycle.retry_parked(&id).await?;
    Ok(Json(json!({ "view": id.to_string(), "retried": retried })))
}

/// Examples of each kind a diff shows by default, and at most.
const DIFF_EXAMPLES: usize = 10;
const DIFF_EXAMPLES_MAX: usize = 1000;
/// How long a diff waits for the two versions to meet, by default and at most.
const DIFF_WAIT_MS: u64 = 10_000;
const DIFF_WAIT_MAX_MS: u64 = 60_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffQuery {
    /// Only keys starting with this.
    prefix: Option<String>,
    /// Examples of each kind (only in A, only in B, changed).
    limit: Option<usize>,
    /// Longest wait for the two versions to meet at one position.
    wait_ms: Option<u64>,
}

/// `GET /admin/views/{a}/diff/{b}`: the documents of two versions compared
/// at one log position (see [`crate::lifecycle::Lifecycle::diff`]).
pub async fn diff(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<DiffQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path((a, b)) = path.map_err(path_error)?;
    let Query(q) = query.map_err(query_error)?;
    let examples = q.limit.unwrap_or(DIFF_EXAMPLES);
    if examples > DIFF_EXAMPLES_MAX {
        return Err(ApiError::bad_request(
            "bad_limit",
            format!("limit {examples} is above {DIFF_EXAMPLES_MAX} examples of each kind"),
        ));
    }
    let prefix = q.prefix.unwrap_or_default();
    if !prefix.is_empty() {
        crate::views::check_key(prefix.as_bytes()).map_err(ApiError::bad_key)?;
    }
    let wait =
        std::time::Duration::from_millis(q.wait_ms.unwrap_or(DIFF_WAIT_MS).min(DIFF_WAIT_MAX_MS));
    let opts = crate::views::diff::DiffOptions {
        prefix: prefix.into_bytes(),
        examples,
    };
    // Name the side a refusal is about: which view, and why.
    let mut resolved = Vec::new();
    for (side, spec) in [("a", &a), ("b", &b)] {
        match state.lifecycle.resolve_version(spec) {
            Ok(r) => resolved.push((side, spec, r.version)),
            Err(e) => {
                return Err(diff_refused(e)
                    .with("side", side)
                    .with("view", spec.as_str()));
            }
        }
    }
    // A side retired, failed or stopped while the two meet ends the wait at
    // once with that reason; a daemon stopping answers it too.
    let d = tokio::select! {
        d = state.lifecycle.diff(&a, &b, opts, wait) => d,
        _ = state.stopping() => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                format!("the daemon is stopping; {a} and {b} were not compared"),
            ));
        }
    };
    let d = d.map_err(|e| {
        let about = match &e {
            LifecycleError::Retired { id }
            | LifecycleError::Failed { id, .. }
            | LifecycleError::NotComparable { id, .. } => {
                resolved.iter().find(|(_, _, v)| v == id).cloned()
            }
            _ => None,
        };
        let err = diff_refused(e);
        match about {
            Some((side, spec, _)) => err.with("side", side).with("view", spec.as_str()),
            None => err,
        }
    })?;
    let r = &d.report;
    Ok(Json(json!({
        "a": d.a.version.to_string(),
        "a_backed_by": d.a.physical.to_string(),
        "b": d.b.version.to_string(),
        "b_backed_by": d.b.physical.to_string(),
        "identical": r.identical(),
        "position": r.position,
        "compared": r.compared,
        "only_in_a": r.only_in_a,
        "only_in_b": r.only_in_b,
        "changed": r.changed,
        "same": r.same,
        "examples": r.examples,
        "waited_ms": d.waited.as_millis() as u64,
        "took_ms": d.took.as_millis() as u64,
    })))
}

/// A diff's refusal: a retired side is `404 view_retired` (its documents
/// were dropped); the rest as every route answers it.
fn diff_refused(e: LifecycleError) -> ApiError {
    let retired = matches!(e, LifecycleError::Retired { .. });
    let mut err = ApiError::from(e);
    if retired {
        err.status = StatusCode::NOT_FOUND;
        err.message = format!(
            "{}: its documents were dropped, there is nothing to compare",
            err.message
        );
    }
    err
}

/// `POST /admin/views/{spec}/snapshot`: snapshot a version's view now and
/// publish it (see [`crate::lifecycle::Lifecycle::snapshot`]). `spec` is an
/// exact id, `name@<semver requirement>`, or a bare name (the version the
/// name serves): taking a snapshot changes nothing a reader sees.
pub async fn snapshot(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(spec) = path.map_err(path_error)?;
    let m = state.lifecycle.snapshot(&spec).await?;
    Ok(Json(
        json!({ "snapshot": m, "store": snapshot_store(&state) }),
    ))
}

/// `GET /admin/snapshots`: every snapshot in the store.
pub async fn snapshots(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let all = state.lifecycle.snapshots().await?;
    Ok(Json(
        json!({ "snapshots": all, "store": snapshot_store(&state) }),
    ))
}

fn snapshot_store(state: &AppState) -> Option<String> {
    state
        .lifecycle
        .config()
        .snapshots
        .as_ref()
        .map(|s| s.describe())
}
