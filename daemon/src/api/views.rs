//! View queries: `GET /views`, `GET /views/{view}` (paged prefix / range
//! listing) and `GET /views/{view}/{key}`.
//!
//! `{view}` is a bare name (its active version), an exact id (`users-1_2_0`) or a
//! semver requirement (`users@^1.2`, the newest ready match). It is resolved once
//! per request; the answer names the version it came from (`view` field and the
//! `kiln-view` header) and the physical view holding that version's documents
//! (`backed_by`: the same id, or the view an alias shares its logic with).
//!
//! **Read-your-writes**: `?stream=user-42` makes the query wait until the view has
//! applied that stream's latest event (its position is read through the store's
//! O(1) `latest`), `?position=N` until it has applied position `N`. The wait is
//! bounded by `?wait_ms=` and the server's `ryw_max_wait`; past it the answer is
//! `504 read_your_writes_timeout` and never an older view.

use std::time::Duration;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, AppState};
use crate::lifecycle::{LifecycleError, Resolved};
use crate::store::StreamId;

/// Longest key accepted, in bytes.
pub use crate::views::MAX_KEY_LEN;

/// `GET /views`: every version the daemon knows, with state and progress,
/// and how many changed module files the directory watcher has not deployed
/// (or retired) yet.
pub async fn list_views(State(state): State<AppState>) -> Json<Value> {
    let pending = state.lifecycle.watch_pending();
    let views = state.lifecycle.status();
    Json(json!({ "views": views, "deploys_pending": pending }))
}

/// Read-your-writes parameters, shared by the document and listing queries.
#[derive(Debug, Default)]
pub struct Consistency {
    /// Wait until the view has applied this stream's latest event.
    pub stream: Option<String>,
    /// Wait until the view has applied this log position.
    pub position: Option<u64>,
    /// How long to wait at most (capped by the server's `ryw_max_wait`).
    pub wait_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocQuery {
    stream: Option<String>,
    position: Option<u64>,
    wait_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only keys starting with this.
    prefix: Option<String>,
    /// Range listing: keys `>= from` ...
    from: Option<String>,
    /// ... and `< to`.
    to: Option<String>,
    /// Paging cursor: the `next` of the previous page (exclusive).
    after: Option<String>,
    limit: Option<usize>,
    /// Return keys only.
    keys_only: Option<bool>,
    stream: Option<String>,
    position: Option<u64>,
    wait_ms: Option<u64>,
}

/// Resolves `spec` to one version and applies the read-your-writes wait.
/// While it waits, `spec` is resolved again every [`RESOLVE_EVERY`]: what it
/// names may change meanwhile (a cutover, a promote, a fleet switch), and
/// the answer is never the version the name has left (issue 25, item 11):
/// the wait goes on with the version it names now, or the fleet's 503 while
/// it switches.
async fn resolve_consistent(
    state: &AppState,
    spec: &str,
    c: Consistency,
) -> Result<Resolved, ApiError> {
    let mut resolved = state.lifecycle.resolve_version(spec)?;
    let target = match (&c.stream, c.position) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "bad_query",
                "give either ?stream= or ?position= for read-your-writes, not both",
            ));
        }
        (Some(stream), None) => {
            let stream = StreamId::new(stream.as_str())?;
            let head = state.lifecycle.store().latest(&stream).await?;
            Some(head.position)
        }
        (None, Some(p)) => Some(p),
        (None, None) => None,
    };
    let Some(position) = target.filter(|p| *p > 0) else {
        return Ok(resolved);
    };
    let max = state.config.ryw_max_wait;
    let wait = c
        .wait_ms
        .map(Duration::from_millis)
        .map_or(max, |w| w.min(max));
    state
        .counters
        .ryw_waits
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + wait;
    let mut head_checked = false;
    loop {
        let id = resolved.version.clone();
        // A position past the log's head is not a write that is coming:
        // say so now rather than wait out the timeout (once: the head
        // only grows).
        if !head_checked
            && state
                .lifecycle
                .checkpoint_of(&id)
                .is_some_and(|c| c < position)
        {
            head_checked = true;
            let head = state.lifecycle.store().head().await?;
            if position > head {
                return Err(ApiError::bad_request(
                    "position_beyond_head",
                    format!("position {position} is beyond the log's head ({head})"),
                )
                .with("position", position)
                .with("head", head));
            }
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let slice = left.min(RESOLVE_EVERY);
        let waited = tokio::select! {
            w = state.lifecycle.wait_for_position(&id, position, slice) => w,
            _ = state.stopping() => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "shutting_down",
                    format!("the daemon is stopping; {id} did not reach position {position} before"),
                ));
            }
        };
        let reached = match waited {
            Ok(()) => true,
            // A slice of the wait is over, not the wait.
            Err(LifecycleError::Timeout { .. }) if slice < left => false,
            Err(LifecycleError::Timeout {
                view, checkpoint, ..
            }) => {
                state
                    .counters
                    .ryw_timeouts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(LifecycleError::Timeout {
                    view,
                    position,
                    checkpoint,
                    millis: wait.as_millis() as u64,
                }
                .into());
            }
            Err(e) => return Err(e.into()),
        };
        let again = state.lifecycle.resolve_version(spec)?;
        if again.version == id && reached {
            return Ok(again);
        }
        resolved = again;
    }
}

/// How often a read-your-writes wait looks again at what its view spec
/// names.
const RESOLVE_EVERY: Duration = Duration::from_millis(50);

fn check_key(key: &str) -> Result<(), ApiError> {
    crate::views::check_key(key.as_bytes()).map_err(ApiError::bad_key)
}

/// A stored document as JSON: documents are JSON; anything else comes back as a
/// string so the answer stays valid JSON.
pub fn doc_value(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// The answer, with the `view` and `backed_by` fields and the `kiln-view` header.
fn view_answer(r: &Resolved, mut body: Value) -> Response {
    body["view"] = Value::from(r.version.to_string());
    body["backed_by"] = Value::from(r.physical.to_string());
    if r.stale {
        // The version failed while active and nothing healthy replaced it.
        body["stale"] = Value::Bool(true);
    }
    let mut res = Json(body).into_response();
    if let Ok(v) = HeaderValue::from_str(&r.version.to_string()) {
        res.headers_mut().insert("kiln-view", v);
    }
    if r.stale {
        res.headers_mut()
            .insert("kiln-stale", HeaderValue::from_static("true"));
    }
    res
}

pub fn path_error(e: PathRejection) -> ApiError {
    ApiError::bad_request("bad_path", format!("malformed path: {e}"))
}

pub fn query_error(e: QueryRejection) -> ApiError {
    ApiError::bad_request("bad_query", format!("malformed query string: {e}"))
}

/// `GET /views/{view}/{key}`.
pub async fn get_doc(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<DocQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path((spec, key)) = path.map_err(path_error)?;
    let Query(q) = query.map_err(query_error)?;
    check_key(&key)?;
    let c = Consistency {
        stream: q.stream,
        position: q.position,
        wait_ms: q.wait_ms,
    };
    let r = resolve_consistent(&state, &spec, c).await?;
    let id = &r.version;
    match state.lifecycle.get(id, key.as_bytes())? {
        Some(doc) => Ok(view_answer(
            &r,
            json!({ "view": null, "backed_by": null, "key": key, "doc": doc_value(&doc) }),
        )),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_key",
            format!("view {id} has no document with key {key:?}"),
        )
        .with("view", id.to_string())
        .with("key", key)),
    }
}

/// `GET /views/{view}?prefix=&from=&to=&after=&limit=`: one page of documents in
/// key order; `next` is the cursor of the following page (absent on the last).
pub async fn list_docs(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(spec) = path.map_err(path_error)?;
    let Query(q) = query.map_err(query_error)?;
    let limit = state.page_limit(q.limit)?;
    let prefix = q.prefix.clone().unwrap_or_default();
    for k in [&q.from, &q.to, &q.after].into_iter().flatten() {
        check_key(k)?;
    }
    if q.prefix.is_some() && (q.from.is_some() || q.to.is_some()) {
        return Err(ApiError::bad_request(
            "bad_query",
            "give either ?prefix= or a ?from=/?to= range, not both",
        ));
    }
    let c = Consistency {
        stream: q.stream,
        position: q.position,
        wait_ms: q.wait_ms,
    };
    let r = resolve_consistent(&state, &spec, c).await?;
    let id = &r.version;

    // `from` is inclusive: look it up, then continue strictly after it.
    let mut items: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut after = q.after.clone();
    if let Some(from) = &q.from {
        let past_cursor = q.after.as_deref().is_some_and(|a| a >= from.as_str());
        if !past_cursor {
            if let Some(doc) = state.lifecycle.get(id, from.as_bytes())? {
                items.push((from.as_bytes().to_vec(), doc));
            }
            after = Some(from.clone());
        }
    }
    // One extra row tells whether there is a next page.
    let want = limit + 1 - items.len();
    let rows = state.lifecycle.scan(
        id,
        prefix.as_bytes(),
        after.as_deref().map(str::as_bytes),
        want,
        state.config.page_bytes,
    )?;
    // The scan stops at `page_bytes`: then the page ends there, with `next`.
    let cut_by_bytes = rows.len() < want
        && rows.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() >= state.config.page_bytes;
    items.extend(rows);
    if let Some(to) = &q.to {
        items.retain(|(k, _)| k.as_slice() < to.as_bytes());
    }
    let more = items.len() > limit || cut_by_bytes;
    items.truncate(limit);
    let next = if more {
        items
            .last()
            .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
    } else {
        None
    };
    let keys_only = q.keys_only.unwrap_or(false);
    let docs: Vec<Value> = items
        .iter()
        .map(|(k, v)| {
            let key = String::from_utf8_lossy(k);
            if keys_only {
                json!({ "key": key })
            } else {
                json!({ "key": key, "doc": doc_value(v) })
            }
        })
        .collect();
    Ok(view_answer(
        &r,
        json!({ "view": null, "backed_by": null, "items": docs, "next": next }),
    ))
}
