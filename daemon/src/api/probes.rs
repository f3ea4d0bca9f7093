//! Probes, metrics and the status page.
//!
//! - `GET /healthz`: liveness; 200 while the process serves HTTP.
//! - `GET /readyz`: the daemon is ready when the store answers (and its last
//!   write did not fail: a full disk makes it 503 until a write succeeds) and every view
//!   name that has live versions has an active one (503 naming those that do not).
//! - `GET /readyz/{view}`: one version (exact id, bare name or `name@req`); 200 once
//!   it is ready, active or standby, 503 while warming (with progress), failed or
//!   retired, and 503 for a name with no active version or a requirement no
//!   ready version matches yet; 404 only for a name never deployed. Deploy
//!   pipelines poll it before promoting.
//! - `GET /metrics`: Prometheus text, per view version.
//! - `GET /store/health`: what the store noticed about the log: foreign
//!   messages skipped (with their positions and why), tails found stalled.
//! - `GET /`: a status page that polls `GET /views`.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde_json::json;

use super::views::path_error;
use super::{ApiError, AppState};
use crate::lifecycle::{LifecycleError, ViewState, ViewStatus};
use crate::views::ViewId;

/// `GET /healthz`.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz`.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let store = state.lifecycle.store().clone();
    if let Some(why) = store.write_fault() {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!("the event store cannot write: {why}"),
        )
        .into_response();
    }
    match tokio::time::timeout(Duration::from_secs(2), store.head()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                format!("the event store does not answer: {e}"),
            )
            .into_response();
        }
        Err(_) => {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                "the event store did not answer within 2 s",
            )
            .into_response();
        }
    }
    if let Some(why) = state.lifecycle.fleet_unready() {
        return ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "fleet_stale", why).into_response();
    }
    let waiting = names_without_active(&state.lifecycle.status());
    if waiting.is_empty() {
        Json(json!({ "status": "ready" })).into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!("no active version yet for view(s) {}", waiting.join(", ")),
        )
        .with("waiting", waiting)
        .into_response()
    }
}

/// Names with a live (non-retired) version but no active one.
fn names_without_active(views: &[ViewStatus]) -> Vec<String> {
    let mut live: Vec<&str> = views
        .iter()
        .filter(|v| v.state != ViewState::Retired)
        .map(|v| v.name.as_str())
        .collect();
    live.sort_unstable();
    live.dedup();
    live.into_iter()
        .filter(|n| {
            !views
                .iter()
                .any(|v| v.name == *n && v.state == ViewState::Active)
        })
        .map(str::to_string)
        .collect()
}

/// `GET /readyz/{view}`.
pub async fn readyz_view(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(spec) = path.map_err(path_error)?;
    let id = match spec.parse::<ViewId>() {
        Ok(id) => id,
        Err(_) => match state.lifecycle.resolve_version(&spec) {
            Ok(r) => r.version,
            // The name exists but nothing matching serves yet: not ready (503),
            // which is what a deploy pipeline or a kubelet waits on.
            Err(
                e @ (LifecycleError::NoMatchingVersion { .. }
                | LifecycleError::NoActiveVersion { .. }),
            ) => {
                return Ok(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not_ready",
                    e.to_string(),
                )
                .into_response());
            }
            Err(e) => return Err(e.into()),
        },
    };
    let Some(s) = state.lifecycle.status_of(&id) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_view",
            format!("no view version {id}"),
        ));
    };
    let body = json!({
        "id": s.id, "state": s.state, "checkpoint": s.checkpoint, "head": s.head,
        "lag": s.lag, "eta_secs": s.eta_secs,
    });
    if let Some(secs) = s.stalled_secs.filter(|_| s.state.is_servable()) {
        let why = format!(
            "view {} is stalled: at position {} for {secs:.0} s while the log moved on to {}{}",
            s.id,
            s.checkpoint,
            s.head,
            s.paused
                .as_deref()
                .map(|p| format!(" (paused: {p})"))
                .unwrap_or_default()
        );
        return Ok(
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", why)
                .with("view", body)
                .into_response(),
        );
    }
    if s.state.is_servable() {
        Ok(Json(body).into_response())
    } else {
        let why = match s.state {
            ViewState::Warming => format!(
                "view {} is warming: at position {} of {}",
                s.id, s.checkpoint, s.head
            ),
            ViewState::Failed => format!(
                "view {} has failed: {}",
                s.id,
                s.last_error.as_deref().unwrap_or("unknown error")
            ),
            other => format!("view {} is {other}", s.id),
        };
        Ok(
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", why)
                .with("view", body)
                .into_response(),
        )
    }
}

const STATES: [ViewState; 6] = [
    ViewState::Warming,
    ViewState::Ready,
    ViewState::Active,
    ViewState::Standby,
    ViewState::Retired,
    ViewState::Failed,
];

/// A per-view metric: name, Prometheus type, help text, and how to read it.
type PerViewMetric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ViewStatus) -> f64,
);

/// `GET /metrics`: Prometheus text format 0.0.4.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let views = state.lifecycle.status();
    let mut out = String::with_capacity(4096);
    let per_view: [PerViewMetric; 10] = [
        (
            "kiln_view_events_applied_total",
            "counter",
            "Events applied by this view version since the daemon started.",
            |v| v.events_applied as f64,
        ),
        (
            "kiln_view_position",
            "gauge",
            "Log position the view version has applied up to (its checkpoint).",
            |v| v.checkpoint as f64,
        ),
        (
            "kiln_view_lag_events",
            "gauge",
            "Events between the log head and the view version's checkpoint.",
            |v| v.lag as f64,
        ),
        (
            "kiln_view_events_per_second",
            "gauge",
            "Recent apply rate of the view version.",
            |v| v.events_per_sec,
        ),
        (
            "kiln_view_parked_events",
            "gauge",
            "Events parked (dead-lettered) by the view version.",
            |v| v.parked as f64,
        ),
        (
            "kiln_view_serving_stale",
            "gauge",
            "1 while the version failed as the active one and its name serves its documents, stale.",
            |v| f64::from(u8::from(v.serving_stale)),
        ),
        (
            "kiln_view_paused",
            "gauge",
            "1 while the view version is paused by a host fault (it retries by itself).",
            |v| f64::from(u8::from(v.paused.is_some())),
        ),
        (
            "kiln_view_host_faults_total",
            "counter",
            "Host faults (storage I/O, a full disk) that paused the view version.",
            |v| v.host_faults as f64,
        ),
        (
            "kiln_view_stalled_seconds",
            "gauge",
            "How long a live view version's checkpoint has not moved while the log did (0 unless stalled).",
            |v| v.stalled_secs.unwrap_or(0.0),
        ),
        (
            "kiln_view_eta_seconds",
            "gauge",
            "While warming: seconds to catch up at the recent rate (-1 when not warming).",
            |v| v.eta_secs.unwrap_or(-1.0),
        ),
    ];
    for (name, kind, help, value) in per_view {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for v in &views {
            let _ = writeln!(
                out,
                "{name}{{view=\"{}\",name=\"{}\",version=\"{}\"}} {}",
                v.id,
                v.name,
                v.version,
                value(v)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP kiln_view_batch_seconds Time to apply one batch and commit it with its checkpoint.\n# TYPE kiln_view_batch_seconds histogram"
    );
    for v in &views {
        let labels = format!(
            "view=\"{}\",name=\"{}\",version=\"{}\"",
            v.id, v.name, v.version
        );
        let b = &v.batch_latency;
        for (le, n) in &b.buckets {
            let _ = writeln!(
                out,
                "kiln_view_batch_seconds_bucket{{{labels},le=\"{le}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "kiln_view_batch_seconds_bucket{{{labels},le=\"+Inf\"}} {}\nkiln_view_batch_seconds_sum{{{labels}}} {}\nkiln_view_batch_seconds_count{{{labels}}} {}",
            b.count, b.sum_secs, b.count
        );
    }
    let _ = writeln!(
        out,
        "# HELP kiln_view_state 1 for the state the view version is in.\n# TYPE kiln_view_state gauge"
    );
    for v in &views {
        for s in STATES {
            let _ = writeln!(
                out,
                "kiln_view_state{{view=\"{}\",state=\"{s}\"}} {}",
                v.id,
                u8::from(v.state == s)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP kiln_auto_rollbacks_total Times an active version failed and its name rolled back to a healthy standby.\n# TYPE kiln_auto_rollbacks_total counter\nkiln_auto_rollbacks_total {}",
        state.lifecycle.auto_rollbacks()
    );
    let store = state.lifecycle.store();
    let _ = writeln!(
        out,
        "# HELP kiln_store_unwritable 1 while the event store's last write failed (a full disk, an I/O error).\n# TYPE kiln_store_unwritable gauge\nkiln_store_unwritable {}\n# HELP kiln_store_unwritable_seconds_total Time the event store spent unable to write.\n# TYPE kiln_store_unwritable_seconds_total counter\nkiln_store_unwritable_seconds_total {}",
        u8::from(store.write_fault().is_some()),
        store.unwritable_millis() as f64 / 1000.0
    );
    if state.fleet.is_some() {
        let serving = state.lifecycle.fleet_serving();
        let _ = writeln!(
            out,
            "# HELP kiln_fleet_in_contact 1 while this instance holds its fleet membership lease.\n# TYPE kiln_fleet_in_contact gauge\nkiln_fleet_in_contact {}\n# HELP kiln_fleet_view_fenced 1 while a fleet view's bare name answers 503 (the fleet switches, or its version is not caught up here).\n# TYPE kiln_fleet_view_fenced gauge",
            u8::from(state.lifecycle.fleet_in_contact())
        );
        for (name, s) in &serving {
            let _ = writeln!(
                out,
                "kiln_fleet_view_fenced{{name=\"{name}\"}} {}",
                u8::from(s.fenced)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP kiln_watch_module_reads_total Module files the projections-directory watcher read.\n# TYPE kiln_watch_module_reads_total counter\nkiln_watch_module_reads_total {}",
        state.lifecycle.watch_reads()
    );
    let head = views.iter().map(|v| v.head).max().unwrap_or(0);
    let _ = writeln!(
        out,
        "# HELP kiln_log_head Last log position the daemon has seen.\n# TYPE kiln_log_head gauge\nkiln_log_head {head}"
    );
    let c = &state.counters;
    let _ = writeln!(
        out,
        "# HELP kiln_http_requests_total HTTP requests answered, by status class.\n# TYPE kiln_http_requests_total counter"
    );
    for (class, n) in [
        ("2xx", &c.requests_2xx),
        ("4xx", &c.requests_4xx),
        ("5xx", &c.requests_5xx),
    ] {
        let _ = writeln!(
            out,
            "kiln_http_requests_total{{class=\"{class}\"}} {}",
            n.load(Ordering::Relaxed)
        );
    }
    for (name, help, n) in [
        (
            "kiln_api_appends_total",
            "Appends committed through the API.",
            &c.appends,
        ),
        (
            "kiln_api_append_conflicts_total",
            "Appends refused on a version or tag conflict.",
            &c.append_conflicts,
        ),
        (
            "kiln_api_ryw_waits_total",
            "Queries that waited for read-your-writes.",
            &c.ryw_waits,
        ),
        (
            "kiln_api_ryw_timeouts_total",
            "Read-your-writes waits that timed out (504).",
            &c.ryw_timeouts,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            n.load(Ordering::Relaxed)
        );
    }
    let health = state.lifecycle.store().health();
    for (name, help, n) in [
        (
            "kiln_store_foreign_messages_total",
            "Messages on event subjects that are not kiln events, skipped (see GET /store/health).",
            health.foreign_messages_total,
        ),
        (
            "kiln_store_tail_stalls_total",
            "Log tails found stalled (no answer from the server within their idle deadline) and recreated.",
            health.tail_stalls_total,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {n}"
        );
    }
    if let Some(m) = state.lifecycle.snapshot_metrics() {
        let ms = |n: &std::sync::atomic::AtomicU64| n.load(Ordering::Relaxed) as f64 / 1000.0;
        let n = |n: &std::sync::atomic::AtomicU64| n.load(Ordering::Relaxed) as f64;
        for (name, help, value) in [
            (
                "kiln_snapshot_bootstraps_total",
                "View versions filled from a snapshot instead of a replay.",
                n(&m.bootstraps),
            ),
            (
                "kiln_snapshot_refused_total",
                "Snapshots refused (digest, size, manifest) before a version replayed instead.",
                n(&m.refused),
            ),
            (
                "kiln_snapshot_downloaded_bytes_total",
                "Bytes of snapshot files downloaded.",
                n(&m.downloaded_bytes),
            ),
            (
                "kiln_snapshot_download_seconds_total",
                "Time spent downloading, checking and ingesting snapshots.",
                ms(&m.download_millis),
            ),
            (
                "kiln_snapshot_published_total",
                "Snapshots this instance published.",
                n(&m.published),
            ),
            (
                "kiln_snapshot_uploaded_bytes_total",
                "Bytes of snapshot files uploaded.",
                n(&m.uploaded_bytes),
            ),
            (
                "kiln_snapshot_upload_seconds_total",
                "Time spent exporting and uploading snapshots.",
                ms(&m.upload_millis),
            ),
            (
                "kiln_snapshot_failures_total",
                "Snapshots this instance failed to publish.",
                n(&m.failures),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
    }
    let uptime = c.started.get().map_or(0.0, |t| t.elapsed().as_secs_f64());
    let _ = writeln!(
        out,
        "# HELP kiln_uptime_seconds Seconds since the API started.\n# TYPE kiln_uptime_seconds gauge\nkiln_uptime_seconds {uptime:.3}"
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

/// `GET /store/health`: the store's [`StoreHealth`](crate::store::StoreHealth).
pub async fn store_health(State(state): State<AppState>) -> Json<crate::store::StoreHealth> {
    Json(state.lifecycle.store().health())
}

/// `GET /`: the status page (static HTML; its script polls `GET /views`).
pub async fn status_page() -> Html<&'static str> {
    Html(include_str!("status.html"))
}
