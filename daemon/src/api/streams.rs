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

use super::views::{path_error, query_error};
use super::{ApiError, AppState, read_body};
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
    let bytes = read_body(body, state.config.body_limit, "the append body").await?;
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

/// `GET /streams/{stream}/events?from_version=1&limit=100`.
pub async fn read(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Path(stream) = path.map_err(path_error)?;
    let Query(q) = query.map_err(query_error)?;
    let stream = StreamId::new(stream)?;
    let limit = q.limit.unwrap_or(100).clamp(1, state.config.max_page);
    let events = state
        .lifecycle
        .store()
        .read_stream(&stream, q.from_version.unwrap_or(1).max(1), limit)
        .await?;
    Ok(Json(json!({ "stream": stream.as_str(), "events": events })))
}

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
pub async fn tail(
    State(state): State<AppState>,
    query: Result<Query<TailQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(query_error)?;
    let from = q.from.unwrap_or(1).max(1);
    let follow = q.follow.unwrap_or(true);
    let store = state.lifecycle.store().clone();
    let until = if follow {
        u64::MAX
    } else {
        store.head().await?
    };
    let body = if until < from {
        Body::empty()
    } else {
        // Ends right after the batch holding `until` (without waiting for the
        // log to grow), or at the first error.
        let batches = store.tail(from);
        let lines = futures::stream::unfold(Some(batches), move |batches| async move {
            let mut batches = batches?;
            let item = match batches.next().await? {
                Ok(events) => encode_lines(events, until),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            match item {
                Ok((text, false)) => Some((Ok(text), Some(batches))),
                Ok((text, true)) => Some((Ok(text), None)),
                Err(e) => Some((Err(e), None)),
            }
        });
        Body::from_stream(lines)
    };
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        body,
    )
        .into_response())
}

/// NDJSON lines of `events` up to position `until`, and whether `until` was
/// reached (the tail is then done).
fn encode_lines(
    events: Vec<crate::store::RecordedEvent>,
    until: u64,
) -> Result<(String, bool), std::io::Error> {
    let mut out = String::new();
    for e in events {
        if e.position > until {
            return Ok((out, true));
        }
        let line = serde_json::to_string(&e).map_err(|err| {
            std::io::Error::other(format!("encoding event at position {}: {err}", e.position))
        })?;
        out.push_str(&line);
        out.push('\n');
        if e.position >= until {
            return Ok((out, true));
        }
    }
    Ok((out, false))
}
