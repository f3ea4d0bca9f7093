//! Who may call what: every route is classified here, once, and the router is
//! built from this table ([`ROUTES`]), so a route cannot exist without saying
//! which listener serves it, which token it needs and what body it takes.
//!
//! - **Listeners**: the data listener (`--listen`) serves every route; the
//!   operations listener (`--ops-listen`, when set) serves only the
//!   [`Listener::Ops`] ones (health, readiness, metrics), so probes and
//!   Prometheus can reach a pod without reaching its data.
//! - **Tokens** (bearer, compared in constant time): [`Access::Read`] routes
//!   need the read token when one is set (the write or admin token also
//!   does), [`Access::Write`] the write token (or the admin token),
//!   [`Access::Admin`] the admin token. A class whose token is not set is open.
//! - **Browsers**: a request whose `Origin` is not the origin it was sent to
//!   is refused (`403 foreign_origin`): a web page in an operator's browser
//!   cannot write to a daemon on loopback, even with a body a browser sends
//!   without asking (`text/plain`) or none at all. On a loopback listener
//!   the `Host` must be a loopback name (`localhost`, `*.localhost`,
//!   `127.0.0.1`, `[::1]`) or one of `allowed_hosts` (`403 foreign_host`):
//!   a DNS-rebinding page cannot read either.
//! - **Bodies**: a JSON route takes `Content-Type: application/json`, a module
//!   upload `application/wasm` (`415 unsupported_media_type` otherwise).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use futures::StreamExt;

use super::{ApiError, AppState, admin, fleet, probes, streams, views};

/// Which token a route needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Liveness, readiness, metrics: never a token.
    Probe,
    /// Reads of views and of the log: the read token, when set.
    Read,
    /// Appends: the write token, when set.
    Write,
    /// Deploy, promote, rollback, retire, resume, parked events.
    Admin,
}

/// Which listeners serve a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// The data listener only.
    Data,
    /// The data listener and the operations listener.
    Ops,
}

/// What a route's request body is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// No body is read.
    None,
    /// JSON, at most `append_body_limit` bytes.
    Json,
    /// A WebAssembly module, at most `body_limit` bytes.
    Wasm,
}

/// One route and its classification.
pub struct RouteSpec {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
    pub listener: Listener,
    pub body: BodyKind,
    pub handler: fn() -> MethodRouter<AppState>,
}

macro_rules! route {
    ($method:ident $path:literal, $access:ident, $listener:ident, $body:ident, $handler:expr) => {
        RouteSpec {
            method: Method::$method,
            path: $path,
            access: Access::$access,
            listener: Listener::$listener,
            body: BodyKind::$body,
            handler: || $handler,
        }
    };
}

/// Every route of the API. docs/api.md lists each (a test keeps them equal).
pub fn routes() -> Vec<RouteSpec> {
    vec![
        route!(GET "/", Read, Data, None, get(probes::status_page)),
        route!(GET "/healthz", Probe, Ops, None, get(probes::healthz)),
        route!(GET "/readyz", Probe, Ops, None, get(probes::readyz)),
        route!(GET "/readyz/{view}", Probe, Ops, None, get(probes::readyz_view)),
        route!(GET "/metrics", Probe, Ops, None, get(probes::metrics)),
        route!(GET "/store/health", Read, Data, None, get(probes::store_health)),
        route!(GET "/fleet", Read, Data, None, get(fleet::status)),
        route!(GET "/views", Read, Data, None, get(views::list_views)),
        route!(GET "/views/{view}", Read, Data, None, get(views::list_docs)),
        route!(GET "/views/{view}/{*key}", Read, Data, None, get(views::get_doc)),
        route!(GET "/streams/{stream}", Read, Data, None, get(streams::head)),
        route!(GET "/streams/{stream}/events", Read, Data, None, get(streams::read)),
        route!(POST "/streams/{stream}/events", Write, Data, Json, post(streams::append)),
        route!(GET "/events", Read, Data, None, get(streams::tail)),
        route!(POST "/admin/views", Admin, Data, Wasm, post(admin::deploy)),
        route!(POST "/admin/views/{id}/promote", Admin, Data, None, post(admin::promote)),
        route!(POST "/admin/views/{name}/rollback", Admin, Data, None, post(admin::rollback)),
        route!(POST "/admin/views/{id}/retire", Admin, Data, None, post(admin::retire)),
        route!(POST "/admin/views/{id}/resume", Admin, Data, None, post(admin::resume)),
        route!(GET "/admin/views/{id}/parked", Admin, Data, None, get(admin::parked)),
        route!(GET "/admin/views/{a}/diff/{b}", Admin, Data, None, get(admin::diff)),
        route!(POST "/admin/views/{id}/parked/retry", Admin, Data, None, post(admin::retry_parked)),
        route!(POST "/admin/views/{id}/snapshot", Admin, Data, None, post(admin::snapshot)),
        route!(GET "/admin/snapshots", Admin, Data, None, get(admin::snapshots)),
        route!(POST "/admin/backup", Admin, Data, Json, post(admin::backup)),
    ]
}

/// The guard of one route: its token and its body's type.
#[derive(Clone)]
pub struct Guard {
    pub app: AppState,
    pub access: Access,
    pub body: BodyKind,
}

/// Checks a request against its route's classification.
pub async fn guard(State(g): State<Guard>, req: Request, next: Next) -> Response {
    if let Some(refusal) = refusal(&g.app, g.access, req.headers()) {
        // Drain (without keeping) what the client still sends, within the
        // body limits, so it reads the refusal rather than a reset; then
        // the connection closes.
        let limit = body_limit(&g.app, g.body);
        drain(req.into_body(), limit, g.app.config.body_timeout).await;
        return close(refusal);
    }
    if let Err(e) = check_content_type(g.body, req.headers()) {
        return close(e.into_response());
    }
    next.run(req).await
}

/// The largest body a route of this kind reads.
pub fn body_limit(app: &AppState, kind: BodyKind) -> usize {
    match kind {
        BodyKind::None => 0,
        BodyKind::Json => app.config.append_body_limit.min(app.config.body_limit),
        BodyKind::Wasm => app.config.body_limit,
    }
}

fn close(mut res: Response) -> Response {
    res.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    res
}

async fn drain(body: Body, limit: usize, within: std::time::Duration) {
    let mut frames = body.into_data_stream();
    let mut read = 0usize;
    let discard = async {
        while let Some(Ok(chunk)) = frames.next().await {
            read += chunk.len();
            if read > limit {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(within, discard).await;
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
}

/// The `401` for a request without a token good enough for `access`.
fn refusal(app: &AppState, access: Access, headers: &HeaderMap) -> Option<Response> {
    let c = &app.config;
    let accepted: Vec<&String> = match access {
        Access::Probe => return None,
        Access::Read => match &c.read_token {
            None => return None,
            Some(t) => [Some(t), c.write_token.as_ref(), c.admin_token.as_ref()]
                .into_iter()
                .flatten()
                .collect(),
        },
        Access::Write => match &c.write_token {
            None => return None,
            Some(t) => [Some(t), c.admin_token.as_ref()]
                .into_iter()
                .flatten()
                .collect(),
        },
        Access::Admin => match &c.admin_token {
            None => return None,
            Some(t) => vec![t],
        },
    };
    let given = bearer(headers);
    // Every candidate is compared, so the time does not say which matched.
    let ok = accepted.iter().fold(false, |ok, t| {
        ok | given.is_some_and(|g| constant_time_eq(g.as_bytes(), t.as_bytes()))
    });
    if ok {
        return None;
    }
    let which = match access {
        Access::Read => "read",
        Access::Write => "write",
        _ => "admin",
    };
    let message = if given.is_some() {
        format!("the bearer token is wrong for {which} endpoints")
    } else {
        format!("{which} endpoints need an 'Authorization: Bearer <token>' header")
    };
    let mut res = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    if let Ok(v) = header::HeaderValue::from_str(&format!("Bearer realm=\"kiln {which}\"")) {
        res.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    Some(res)
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // blake3::Hash's equality is constant time.
    blake3::hash(a) == blake3::hash(b)
}

fn check_content_type(kind: BodyKind, headers: &HeaderMap) -> Result<(), ApiError> {
    let want = match kind {
        BodyKind::None => return Ok(()),
        BodyKind::Json => "application/json",
        BodyKind::Wasm => "application/wasm",
    };
    let given = headers
        .get(header::CONTENT_TYPE)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let essence = given.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case(want) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        format!(
            "this route takes Content-Type: {want}, got {}",
            if given.is_empty() {
                "none".to_string()
            } else {
                format!("{given:?}")
            }
        ),
    )
    .with("expected", want))
}

/// What a listener accepts as `Host`, and so as `Origin`.
#[derive(Clone)]
pub struct Origins {
    /// The listener is on loopback: only loopback names (and the allow-list).
    loopback: bool,
    allowed: Arc<Vec<String>>,
}

impl Origins {
    pub fn new(addr: SocketAddr, allowed_hosts: &[String]) -> Self {
        Origins {
            loopback: addr.ip().is_loopback(),
            allowed: Arc::new(
                allowed_hosts
                    .iter()
                    .map(|h| h.to_ascii_lowercase())
                    .collect(),
            ),
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        let loopback_name = host == "localhost"
            || host.ends_with(".localhost")
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        let listed = self.allowed.contains(&host);
        listed || (self.loopback && loopback_name) || (!self.loopback && self.allowed.is_empty())
    }
}

/// `host[:port]` without the port.
fn host_name(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or("");
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

/// Most bytes of request headers a listener takes (names, values, separators).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Refuses foreign `Host` names on a loopback listener and any `Origin` that
/// is not the one the request was sent to (see the module docs).
pub async fn same_origin(State(o): State<Origins>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    // hyper refuses oversized headers only while it is still reading them;
    // a request whose headers arrived whole in one read would pass. The
    // same bound, whatever the reads.
    let header_bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return close(
            ApiError::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
                format!(
                    "the request's headers are {header_bytes} bytes, more than the                      {MAX_HEADER_BYTES} the server reads"
                ),
            )
            .into_response(),
        );
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    if let Some(host) = host
        && !o.host_allowed(host_name(host))
    {
        return close(
            ApiError::new(
                StatusCode::FORBIDDEN,
                "foreign_host",
                format!(
                    "Host {host:?} is not a name of this server (a loopback listener takes \
                     localhost, 127.0.0.1 or [::1]; add others to allowed_hosts)"
                ),
            )
            .into_response(),
        );
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let authority = origin.split_once("://").map_or("", |(_, a)| a);
        let same = host.is_some_and(|h| authority.eq_ignore_ascii_case(h));
        if !same {
            return close(
                ApiError::new(
                    StatusCode::FORBIDDEN,
                    "foreign_origin",
                    format!(
                        "requests from the web origin {origin:?} are refused: kiln's API \
                         is not for pages of other sites"
                    ),
                )
                .into_response(),
            );
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        assert_eq!(host_name("127.0.0.1:7070"), "127.0.0.1");
        assert_eq!(host_name("[::1]:7070"), "::1");
        assert_eq!(host_name("localhost"), "localhost");
        let lo = Origins::new("127.0.0.1:7070".parse().unwrap(), &["kiln.internal".into()]);
        for ok in [
            "localhost",
            "127.0.0.1",
            "::1",
            "app.localhost",
            "KILN.internal",
        ] {
            assert!(lo.host_allowed(ok), "{ok}");
        }
        for no in ["evil.example", "127.0.0.1.evil.example", "localhost.evil"] {
            assert!(!lo.host_allowed(no), "{no}");
        }
        let open = Origins::new("0.0.0.0:7070".parse().unwrap(), &[]);
        assert!(open.host_allowed("kiln.default.svc"));
    }

    /// Every route is in docs/api.md, and docs/api.md names no route that
    /// is not one; POSTs need a token class that writes; bodies only on POSTs.
    #[test]
    fn the_route_table_is_classified_and_documented() {
        let doc = include_str!("../../../docs/api.md");
        let table = routes();
        for r in &table {
            let line = format!("`{} {}", r.method, r.path.replace("{*", "{"));
            assert!(
                doc.contains(&line),
                "docs/api.md does not list {line}` (add it with its listener, token and body)"
            );
            if r.method == Method::POST {
                assert!(
                    matches!(r.access, Access::Write | Access::Admin),
                    "{}",
                    r.path
                );
            } else {
                assert_eq!(r.body, BodyKind::None, "{}", r.path);
            }
            if r.listener == Listener::Ops {
                assert_eq!(r.access, Access::Probe, "{}", r.path);
            }
        }
        for line in doc
            .lines()
            .filter(|l| l.starts_with("| `GET /") || l.starts_with("| `POST /"))
        {
            let route = line
                .trim_start_matches("| `")
                .split('`')
                .next()
                .unwrap_or("");
            let (method, path) = route.split_once(' ').unwrap_or(("", ""));
            let path = path.split('?').next().unwrap_or("");
            assert!(
                table
                    .iter()
                    .any(|r| r.method.as_str() == method && r.path.replace("{*", "{") == path),
                "docs/api.md lists {method} {path}, which is not a route"
            );
        }
    }
}
