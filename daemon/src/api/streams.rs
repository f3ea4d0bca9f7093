//! The log over HTTP: append to a stream (optimistic concurrency), a stream's head,
//! reading a stream, and tailing the whole log as NDJSON. Works on either backend:
//! everything goes through the [`EventStore`](crate::store::EventStore) trait.
//!
//! Append body: `{"expected_version": 3, "events": [{"type": "UserRegistered",
//! "data": {...}, "id": "<uuid>", "metadata": {...}, "tags": [...]}]}` or just the
//! array of events. The expected version may instead come as the
//! `Kiln-Expected-Version` header (`3`, `any`, `no_stream`, `exists`); both at once
//! must agree. A conflict is `409 version_conflict` carrying `current_version`.

use std::collections::BTreeMap;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::access::BodyKind;
use super::views::{path_error, query_error};
use super::{ApiError, AppState};
use crate::store::{AppendCondition, AppendRequest, ExpectedVersion, NewEvent, StreamId};

/// Header carrying the expected version of an append.
pub const EXPECTED_VERSION_HEADER: &str = "kiln-expected-version";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventIn {
    id: Option<Uuid>,
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default)]
    data: Option<Box<serde_json::value::RawValue>>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    tags: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConditionIn {
    tags: Vec<String>,
    after: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppendIn {
    expected_version: Option<Value>,
    events: Vec<EventIn>,
    condition: Option<ConditionIn>,
}

/// Parses `3`, `"3"`, `"any"`, `"no_stream"`, `"exists"`.
pub fn parse_expected(v: &Value) -> Result<ExpectedVersion, String> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .map(ExpectedVersion::Exact)
            .ok_or_else(|| format!("expected version {n} is not a non-negative integer")),
        Value::String(s) => parse_expected_str(s),
        other => Err(format!(
            "expected version must be a number or one of any, no_stream, exists; got {other}"
        )),
    }
}

pub fn parse_expected_str(s: &str) -> Result<ExpectedVersion, String> {
    match s.trim() {
        "any" => Ok(ExpectedVersion::Any),
        "no_stream" => Ok(ExpectedVersion::NoStream),
        "exists" => Ok(ExpectedVersion::Exists),
        n => n.parse().map(ExpectedVersion::Exact).map_err(|_| {
            format!("expected version {s:?} is not a number or one of any, no_stream, exists")
        }),
    }
}

/// `POST /streams/{stream}/events`.
pub async fn append(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Path(stream) = path.map_err(path_error)?;
    let stream = StreamId::new(stream)?;
    let bytes = state
        .read_body(body, BodyKind::Json, "the append body")
        .await?;
    let malformed = |e: serde_json::Error| {
        ApiError::malformed_body(format!(
            "append body for stream '{stream}' is not {{\"events\": [...]}} or an array of events: {e}"
        ))
    };
    // An array is the events alone; anything else must be the full form.
    let is_array = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    let (field, events, condition) = if is_array {
        let events: Vec<EventIn> = serde_json::from_slice(&bytes).map_err(malformed)?;
        (None, events, None)
    } else {
        let a: AppendIn = serde_json::from_slice(&bytes).map_err(malformed)?;
        (a.expected_version, a.events, a.condition)
    };
    let from_field = field
        .as_ref()
        .map(parse_expected)
        .transpose()
        .map_err(|m| ApiError::bad_request("bad_expected_version", m))?;
    let from_header = match headers.get(EXPECTED_VERSION_HEADER) {
        Some(h) => Some(
            h.to_str()
                .map_err(|_| {
                    ApiError::bad_request(
                        "bad_expected_version",
                        "the Kiln-Expected-Version header is not text",
                    )
                })
                .and_then(|s| {
                    parse_expected_str(s)
                        .map_err(|m| ApiError::bad_request("bad_expected_version", m))
                })?,
        ),
        None => None,
    };
    let expected = match (from_header, from_field) {
        (Some(h), Some(f)) if h != f => {
            return Err(ApiError::bad_request(
                "bad_expected_version",
                format!(
                    "the Kiln-Expected-Version header ({h}) and the body's expected_version ({f}) disagree"
                ),
            ));
        }
        (Some(v), _) | (None, Some(v)) => v,
        (None, None) => ExpectedVersion::Any,
    };
    let events = events
        .into_iter()
        .map(|e| NewEvent {
            id: e.id.unwrap_or_else(Uuid::now_v7),
            event_type: e.event_type,
            data: e
                .data
                .map_or_else(|| "{}".to_string(), |d| d.get().to_string())
                .into(),
            metadata: e.metadata,
            tags: e.tags,
            timestamp: None,
        })
        .collect();
    let mut req = AppendRequest::new(stream.clone(), expected, events);
    if let Some(c) = condition {
        req = req.with_condition(AppendCondition {
            tags: c.tags,
            after: c.after,
        });
    }
    let store = state.lifecycle.store().clone();
    match store.append(req).await {
        Ok(r) => {
            state
                .counters
                .appends
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok((
                StatusCode::OK,
                Json(json!({
                    "stream": stream.as_str(),
                    "first_position": r.first_position,
                    "position": r.position,
                    "version": r.version,
                })),
            )
                .into_response())
        }
        Err(e) => {
            if e.is_conflict() {
                state
                    .counters
                    .append_conflicts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e.into())
        }
    }
}

/// `GET /streams/{stream}`: version and position of the stream's last event (O(1)).
pub async fn head(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(stream) = path.map_err(path_error)?;
    let stream = StreamId::new(stream)?;
    let head = state.lifecycle.store().latest(&stream).await?;
    Ok(Json(json!({
        "stream": stream.as_str(),
        "version": head.version,
        "position": head.position,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadQuery {
    from_version: Option<u64>,
    limit: Option<usize>,
}

/// `GET /streams/{stream}/events?from_version=1&limit=100`: at most `limit`
/// events and at most `page_bytes` of them (always at least one); `next`
/// is the `from_version` of the following page, `null` when none is left.
pub async fn read(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(stream) = path.map_err(path_error)?;
    let Query(q) = query.map_err(query_error)?;
    let stream = StreamId::new(stream)?;
    let limit = state.page_limit(q.limit)?;
    let store = state.lifecycle.store();
    let budget = state.config.page_bytes;
    let mut from = q.from_version.unwrap_or(1).max(1);
    let mut events = Vec::new();
    let mut bytes = 0usize;
    let mut more = false;
    // Read in small pages so a page of large events never sits in memory
    // past the budget.
    'pages: while events.len() < limit {
        let want = (limit - events.len()).min(READ_CHUNK) + 1;
        let page = store.read_stream(&stream, from, want).await?;
        let last_page = page.len() < want;
        for e in page {
            if events.len() == limit || (bytes >= budget && !events.is_empty()) {
                more = true;
                break 'pages;
            }
            bytes += e.data.len() + e.event_type.len() + 200;
            from = e.version + 1;
            events.push(e);
        }
        if last_page {
            break;
        }
    }
    let next = if more { Some(from) } else { None };
    Ok(Json(
        json!({ "stream": stream.as_str(), "events": events, "next": next }),
    ))
}

/// Events read from the store at a time by [`read`].
const READ_CHUNK: usize = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TailQuery {
    /// First position to send (default 1).
    from: Option<u64>,
    /// Keep the response open and send new events as they commit (default true).
    follow: Option<bool>,
}

/// `GET /events?from=1&follow=true`: the log as NDJSON, one recorded event a line.
/// Without `follow` it ends at the head as of the request.
///
/// Bounded: at most `max_followers` at once (`503 too_many_followers`); the
/// answer is sent in chunks of about [`CHUNK_BYTES`], each encoded when the
/// client has taken the previous one, so a slow reader holds one store batch
/// (itself bounded in bytes) and one chunk; a reader that takes nothing for
/// `write_timeout` is cut (see [`super::server`]). When the daemon stops, the
/// stream ends cleanly after the last whole line.
pub async fn tail(
    State(state): State<AppState>,
    query: Result<Query<TailQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(query_error)?;
    let from = q.from.unwrap_or(1).max(1);
    let follow = q.follow.unwrap_or(true);
    let permit = state.followers.clone().try_acquire_owned().map_err(|_| {
        let max = state.config.max_followers;
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_followers",
            format!("{max} clients already follow the log (max_followers); retry later"),
        )
        .with("limit", max)
    })?;
    let store = state.lifecycle.store().clone();
    let until = if follow {
        u64::MAX
    } else {
        store.head().await?
    };
    let body = if until < from {
        Body::empty()
    } else {
        let lines = Lines {
            batches: Some(store.tail(from)),
            pending: std::collections::VecDeque::new(),
            until,
            _permit: permit,
        };
        let stopping = {
            let state = state.clone();
            async move { state.stopping().await }
        };
        Body::from_stream(futures::stream::unfold(lines, Lines::next_chunk).take_until(stopping))
    };
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        body,
    )
        .into_response())
}

/// Bytes of NDJSON sent to a follower at a time (one event more when a
/// single event is larger).
pub const CHUNK_BYTES: usize = 64 * 1024;

/// A follower's state: the store's batches, the events of the current one
/// not sent yet, where to stop, and its place among the followers.
struct Lines {
    batches: Option<crate::store::EventBatches>,
    pending: std::collections::VecDeque<crate::store::RecordedEvent>,
    until: u64,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Lines {
    /// The next chunk of lines; the stream ends after `until` or the first
    /// error.
    async fn next_chunk(mut self) -> Option<(Result<String, std::io::Error>, Lines)> {
        if self.pending.is_empty() {
            let batches = self.batches.as_mut()?;
            match batches.next().await? {
                Ok(events) => self.pending.extend(events),
                Err(e) => {
                    self.batches = None;
                    return Some((Err(std::io::Error::other(e.to_string())), self));
                }
            }
        }
        let mut out = String::new();
        while out.len() < CHUNK_BYTES {
            let Some(e) = self.pending.pop_front() else {
                break;
            };
            if e.position > self.until {
                self.batches = None;
                self.pending.clear();
                break;
            }
            match serde_json::to_string(&e) {
                Ok(line) => {
                    out.push_str(&line);
                    out.push('\n');
                }
                Err(err) => {
                    self.batches = None;
                    let msg = format!("encoding event at position {}: {err}", e.position);
                    return Some((Err(std::io::Error::other(msg)), self));
                }
            }
            if e.position >= self.until {
                self.batches = None;
                self.pending.clear();
                break;
            }
        }
        Some((Ok(out), self))
    }
}
