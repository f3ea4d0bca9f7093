//! The HTTP surface of a running daemon (axum): view queries with read-your-writes,
//! the append endpoint, admin (deploy / promote / rollback / retire / parked
//! events), probes, Prometheus metrics and the status page at `/`.
//!
//! The API owns no state of its own beyond request counters: every request asks
//! the [`Lifecycle`] (views) or the store core (appends, stream heads). A query
//! resolves its view spec **once**, so a read is wholly from one view version even
//! while a promote happens. Every error is JSON, `{"error": {"code", "message"}}`
//! (see [`error`]); `docs/api.md` lists the routes and codes.

pub mod access;
pub mod admin;
pub mod error;
pub mod fleet;
pub mod probes;
pub mod server;
pub mod streams;
pub mod views;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::lifecycle::Lifecycle;
pub use error::ApiError;

/// Default address: loopback only; expose it deliberately.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";

/// The HTTP server's knobs. `kiln serve` fills this from its file, its
/// flags and the environment; docs/api.md says which to set in production.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct ApiConfig {
    /// Address of the data API (`--listen`, `KILN_LISTEN`).
    pub listen: SocketAddr,
    /// Address of the operations listener: `/healthz`, `/readyz`,
    /// `/readyz/{view}` and `/metrics` only (`--ops-listen`, `KILN_OPS_LISTEN`).
    pub ops_listen: Option<SocketAddr>,
    /// Bearer token the admin endpoints require, when set (`--admin-token`, `KILN_ADMIN_TOKEN`).
    pub admin_token: Option<String>,
    /// Bearer token reads of views and of the log require, when set
    /// (`--read-token`, `KILN_READ_TOKEN`); the write and admin tokens also do.
    pub read_token: Option<String>,
    /// Bearer token appends require, when set (`--write-token`,
    /// `KILN_WRITE_TOKEN`); the admin token also does.
    pub write_token: Option<String>,
    /// More `Host` names a loopback listener accepts (besides `localhost`,
    /// `127.0.0.1`, `[::1]`); on another listener, the only ones it accepts.
    pub allowed_hosts: Vec<String>,
    /// Longest a read-your-writes query waits for its view (`ryw_max_wait_ms`).
    #[serde(with = "millis", rename = "ryw_max_wait_ms")]
    pub ryw_max_wait: Duration,
    /// Largest request body in bytes: module uploads.
    pub body_limit: usize,
    /// Largest append body in bytes (the store takes at most 4 MiB of data
    /// in one append; this leaves room for the JSON around it).
    pub append_body_limit: usize,
    /// Most documents one listing page returns.
    pub max_page: usize,
    /// Most bytes of documents or events one page returns; the page stops
    /// early (with its `next` cursor) past it.
    pub page_bytes: usize,
    /// Most connections each listener holds; one more is answered 503.
    pub max_connections: usize,
    /// Most `GET /events` followers at once; one more is answered 503.
    pub max_followers: usize,
    /// A connection waiting this long for a request head (new, or idle
    /// between keep-alive requests) is closed.
    #[serde(with = "millis", rename = "header_timeout_ms")]
    pub header_timeout: Duration,
    /// A request body must arrive within this (408 otherwise).
    #[serde(with = "millis", rename = "body_timeout_ms")]
    pub body_timeout: Duration,
    /// A client that takes no data for this long (a follower that stopped
    /// reading) is cut.
    #[serde(with = "millis", rename = "write_timeout_ms")]
    pub write_timeout: Duration,
    /// After SIGTERM, connections still open after this are cut.
    #[serde(with = "millis", rename = "shutdown_grace_ms")]
    pub shutdown_grace: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: DEFAULT_LISTEN.parse().expect("default listen address"),
            ops_listen: None,
            admin_token: None,
            read_token: None,
            write_token: None,
            allowed_hosts: Vec::new(),
            ryw_max_wait: Duration::from_secs(5),
            body_limit: 16 * 1024 * 1024,
            append_body_limit: 5 * 1024 * 1024,
            max_page: 1000,
            page_bytes: 4 * 1024 * 1024,
            max_connections: 512,
            max_followers: 64,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// What every handler sees.
#[derive(Clone)]
pub struct AppState {
    pub lifecycle: Lifecycle,
    pub config: Arc<ApiConfig>,
    pub counters: Arc<Counters>,
    /// Turns true when the daemon begins to stop: followers end their
    /// streams, read-your-writes waiters answer 503.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// One permit per `GET /events` follower.
    pub followers: Arc<tokio::sync::Semaphore>,
    /// The fleet this instance belongs to, if any (`GET /fleet`).
    pub fleet: Option<crate::fleet::Fleet>,
}

impl AppState {
    /// Reads a request body of a route of `kind`, bounded by its limit and
    /// by the body timeout.
    pub async fn read_body(
        &self,
        body: Body,
        kind: access::BodyKind,
        what: &str,
    ) -> Result<Bytes, ApiError> {
        let limit = access::body_limit(self, kind);
        let timeout = self.config.body_timeout;
        match tokio::time::timeout(timeout, read_body(body, limit, what)).await {
            Ok(read) => read,
            Err(_) => Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!("{what} did not arrive within {timeout:?} (body_timeout_ms)"),
            )),
        }
    }

    /// A page's `limit` (100 when not given): 1 to `max_page`, else 400.
    pub fn page_limit(&self, limit: Option<usize>) -> Result<usize, ApiError> {
        let max = self.config.max_page;
        match limit.unwrap_or(100) {
            l @ 1.. if l <= max => Ok(l),
            l => Err(ApiError::bad_request(
                "bad_query",
                format!("limit must be 1 to {max}, got {l}"),
            )),
        }
    }

    /// Resolves when the daemon begins to stop.
    pub async fn stopping(&self) {
        let mut s = self.shutdown.clone();
        let _ = s.wait_for(|s| *s).await;
    }
}

/// Request counters for `/metrics`, by outcome class.
#[derive(Default)]
pub struct Counters {
    pub started: std::sync::OnceLock<Instant>,
    pub requests_2xx: AtomicU64,
    pub requests_4xx: AtomicU64,
    pub requests_5xx: AtomicU64,
    pub appends: AtomicU64,
    pub append_conflicts: AtomicU64,
    pub ryw_waits: AtomicU64,
    pub ryw_timeouts: AtomicU64,
}

impl Counters {
    fn count(&self, status: StatusCode) {
        let c = match status.as_u16() {
            500.. => &self.requests_5xx,
            400..500 => &self.requests_4xx,
            _ => &self.requests_2xx,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Binds `config.listen` (and `config.ops_listen`) and serves until
/// `shutdown` resolves, then drains within `shutdown_grace`.
pub async fn serve(
    lifecycle: Lifecycle,
    config: &ApiConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with_fleet(lifecycle, None, config, shutdown).await
}

/// [`serve`], with `GET /fleet` answered by `fleet`.
pub async fn serve_with_fleet(
    lifecycle: Lifecycle,
    fleet: Option<crate::fleet::Fleet>,
    config: &ApiConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let bind = |addr: SocketAddr, what: &'static str| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("binding the {what} to {addr}: {e}"))
    };
    let listener = bind(config.listen, "HTTP API").await?;
    let ops = match config.ops_listen {
        Some(addr) => Some(bind(addr, "operations listener").await?),
        None => None,
    };
    serve_on_inner(listener, ops, lifecycle, fleet, config, shutdown).await
}

/// [`serve`] on listeners that are already bound (tests bind port 0).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    ops: Option<tokio::net::TcpListener>,
    lifecycle: Lifecycle,
    config: &ApiConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_on_inner(listener, ops, lifecycle, None, config, shutdown).await
}

async fn serve_on_inner(
    listener: tokio::net::TcpListener,
    ops: Option<tokio::net::TcpListener>,
    lifecycle: Lifecycle,
    fleet: Option<crate::fleet::Fleet>,
    config: &ApiConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        for (class, token) in [
            ("admin", &config.admin_token),
            ("read", &config.read_token),
            ("write", &config.write_token),
        ] {
            if token.is_none() {
                tracing::warn!(
                    %addr,
                    "{class} endpoints are open: the data API listens beyond loopback without \
                     --{class}-token (serve probes and metrics with --ops-listen instead)"
                );
            }
        }
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut state = app_state(lifecycle, config.clone(), stop_rx.clone());
    state.fleet = fleet;
    let limits = server::ServerLimits {
        max_connections: config.max_connections.max(1),
        header_timeout: config.header_timeout,
        write_timeout: config.write_timeout,
        shutdown_grace: config.shutdown_grace,
    };
    let mut servers = tokio::task::JoinSet::new();
    let data = router_for(&state, addr, false);
    tracing::info!(%addr, "HTTP API listening");
    servers.spawn(server::run(listener, data, limits, stop_rx.clone()));
    if let Some(ops) = ops {
        let ops_addr = ops.local_addr()?;
        tracing::info!(addr = %ops_addr, "operations listener (probes, metrics) listening");
        let app = router_for(&state, ops_addr, true);
        servers.spawn(server::run(ops, app, limits, stop_rx));
    }
    shutdown.await;
    let _ = stop_tx.send(true);
    while servers.join_next().await.is_some() {}
    Ok(())
}

fn app_state(
    lifecycle: Lifecycle,
    config: ApiConfig,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> AppState {
    let counters = Arc::new(Counters::default());
    let _ = counters.started.set(Instant::now());
    AppState {
        lifecycle,
        followers: Arc::new(tokio::sync::Semaphore::new(config.max_followers)),
        config: Arc::new(config),
        counters,
        shutdown,
        fleet: None,
    }
}

/// Every route, with the state they share (a data listener on loopback).
pub fn router(lifecycle: Lifecycle, config: ApiConfig) -> Router {
    let (_, never) = tokio::sync::watch::channel(false);
    let listen = config.listen;
    router_for(&app_state(lifecycle, config, never), listen, false)
}

/// The routes a listener at `addr` serves: all of them, or on the
/// operations listener only the probes and metrics.
fn router_for(state: &AppState, addr: SocketAddr, ops: bool) -> Router {
    let mut app = Router::new();
    for r in access::routes() {
        if ops && r.listener != access::Listener::Ops {
            continue;
        }
        let guard = access::Guard {
            app: state.clone(),
            access: r.access,
            body: r.body,
        };
        app = app.route(
            r.path,
            (r.handler)().route_layer(axum::middleware::from_fn_with_state(guard, access::guard)),
        );
    }
    let origins = access::Origins::new(addr, &state.config.allowed_hosts);
    app.fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        // Bodies are read with `read_body` against the route's limit; the
        // framework's own limit is lifted so the refusal is our JSON error.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::map_response(close_after_refused_body))
        .layer(axum::middleware::from_fn_with_state(
            origins,
            access::same_origin,
        ))
        .layer(axum::middleware::from_fn_with_state(state.clone(), count))
        .with_state(state.clone())
}

async fn count(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let res = next.run(req).await;
    state.counters.count(res.status());
    res
}

async fn no_route(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_route",
        format!("no route for {} (see GET / and docs/api.md)", uri.path()),
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// A body refused as too large (or too slow) is not read to its end: the connection must
/// not carry another request (the client would read the rest of the body as
/// its answer, or find the connection gone), so the answer closes it.
async fn close_after_refused_body(mut res: axum::response::Response) -> axum::response::Response {
    if matches!(
        res.status(),
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT
    ) {
        res.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    res
}

/// Reads a request body up to `limit` bytes; more is a 413 naming the limit.
/// What comes past the limit is read and dropped (never kept), up to
/// [`DRAIN_PAST_LIMIT`], so a client still sending reads the 413 rather than
/// a reset; the answer then closes the connection.
pub async fn read_body(body: Body, limit: usize, what: &str) -> Result<Bytes, ApiError> {
    use futures::StreamExt;
    let mut frames = body.into_data_stream();
    let mut kept = bytes::BytesMut::new();
    let mut total = 0usize;
    while let Some(frame) = frames.next().await {
        let chunk = frame.map_err(|e| ApiError::malformed_body(format!("reading {what}: {e}")))?;
        total += chunk.len();
        if total <= limit {
            kept.extend_from_slice(&chunk);
        } else if total > limit.saturating_add(DRAIN_PAST_LIMIT) {
            break;
        }
    }
    if total > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("{what} is larger than the body limit of {limit} bytes"),
        )
        .with("limit", limit));
    }
    Ok(kept.freeze())
}

/// Most bytes read and dropped past a body's limit before its 413.
pub const DRAIN_PAST_LIMIT: usize = 32 * 1024 * 1024;
