//! The HTTP surface of a running daemon (axum): view queries with read-your-writes,
//! the append endpoint, admin (deploy / promote / rollback / retire / parked
//! events), probes, Prometheus metrics and the status page at `/`.
//!
//! The API owns no state of its own beyond request counters: every request asks
//! the [`Lifecycle`] (views) or the store core (appends, stream heads). A query
//! resolves its view spec **once**, so a read is wholly from one view version even
//! while a promote happens. Every error is JSON, `{"error": {"code", "message"}}`
//! (see [`error`]); `docs/api.md` lists the routes and codes.

pub mod admin;
pub mod error;
pub mod probes;
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
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use crate::lifecycle::Lifecycle;
pub use error::ApiError;

/// Default address: loopback only; expose it deliberately.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7070";

/// The HTTP server's knobs. `kiln serve` fills this from its flags / environment.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct ApiConfig {
    /// Address to bind (`--listen`, `KILN_LISTEN`).
    pub listen: SocketAddr,
    /// Bearer token the admin endpoints require, when set (`--admin-token`, `KILN_ADMIN_TOKEN`).
    pub admin_token: Option<String>,
    /// Longest a read-your-writes query waits for its view (`ryw_max_wait_ms`).
    #[serde(with = "millis", rename = "ryw_max_wait_ms")]
    pub ryw_max_wait: Duration,
    /// Largest request body in bytes, uploads of modules included.
    pub body_limit: usize,
    /// Most documents one listing page returns.
    pub max_page: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: DEFAULT_LISTEN.parse().expect("default listen address"),
            admin_token: None,
            ryw_max_wait: Duration::from_secs(5),
            body_limit: 16 * 1024 * 1024,
            max_page: 1000,
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

/// Binds `config.listen` and serves until `shutdown` resolves, then drains.
pub async fn serve(
    lifecycle: Lifecycle,
    config: &ApiConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding the HTTP API to {}: {e}", config.listen))?;
    serve_on(listener, lifecycle, config, shutdown).await
}

/// [`serve`] on a listener that is already bound (tests bind port 0).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    lifecycle: Lifecycle,
    config: &ApiConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    if config.admin_token.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "admin endpoints are open: the API listens beyond loopback without --admin-token");
    }
    let app = router(lifecycle, config.clone());
    tracing::info!(%addr, "HTTP API listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

/// Every route, with the state they share.
pub fn router(lifecycle: Lifecycle, config: ApiConfig) -> Router {
    let counters = Arc::new(Counters::default());
    let _ = counters.started.set(Instant::now());
    let state = AppState {
        lifecycle,
        config: Arc::new(config),
        counters: counters.clone(),
    };
    let admin = Router::new()
        .route("/admin/views", post(admin::deploy))
        .route("/admin/views/{id}/promote", post(admin::promote))
        .route("/admin/views/{name}/rollback", post(admin::rollback))
        .route("/admin/views/{id}/retire", post(admin::retire))
        .route("/admin/views/{id}/resume", post(admin::resume))
        .route("/admin/views/{id}/parked", get(admin::parked))
        .route("/admin/views/{id}/parked/retry", post(admin::retry_parked))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            admin::require_token,
        ));
    Router::new()
        .route("/", get(probes::status_page))
        .route("/healthz", get(probes::healthz))
        .route("/readyz", get(probes::readyz))
        .route("/readyz/{view}", get(probes::readyz_view))
        .route("/metrics", get(probes::metrics))
        .route("/store/health", get(probes::store_health))
        .route("/views", get(views::list_views))
        .route("/views/{view}", get(views::list_docs))
        .route("/views/{view}/{*key}", get(views::get_doc))
        .route("/streams/{stream}", get(streams::head))
        .route(
            "/streams/{stream}/events",
            post(streams::append).get(streams::read),
        )
        .route("/events", get(streams::tail))
        .merge(admin)
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        // Bodies are read with `read_body` against the configured limit; the
        // framework's own limit is lifted so the refusal is our JSON error.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::map_response(close_after_refused_body))
        .layer(axum::middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
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

/// A body refused as too large is not read to its end: the connection must
/// not carry another request (the client would read the rest of the body as
/// its answer, or find the connection gone), so the answer closes it.
async fn close_after_refused_body(mut res: axum::response::Response) -> axum::response::Response {
    if res.status() == StatusCode::PAYLOAD_TOO_LARGE {
        res.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    res
}

/// Reads a request body up to `limit` bytes; more is a 413 naming the limit.
pub async fn read_body(body: Body, limit: usize, what: &str) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let mut too_large = false;
        let mut cause: Option<&dyn std::error::Error> = Some(&e);
        while let Some(c) = cause {
            too_large |= c.to_string().contains("length limit exceeded");
            cause = c.source();
        }
        if too_large {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("{what} is larger than the body limit of {limit} bytes"),
            )
            .with("limit", limit)
        } else {
            ApiError::malformed_body(format!("reading {what}: {e}"))
        }
    })
}
