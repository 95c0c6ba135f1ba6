//! actix-web wiring: routes, shared state, CORS, and the one place where errors become
//! status codes with a JSON body.

pub mod body;
mod broadcast;
pub mod cors;
mod ds;
mod fork;
mod json_errors;
mod ops;
pub mod request_body;
mod sse;
mod subscriptions;
pub mod watchdog;
mod write;

pub use json_errors::json_errors;

use std::sync::Arc;

use actix_web::http::header;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use tokio_util::sync::CancellationToken;

use crate::auth::{self, AuthError};
use crate::config::Config;
use crate::engine::Engine;
use crate::storage::{ReadError, StorageError};
use crate::streams::InvalidStreamName;
use crate::writes::{Refusal, WriteError};

/// Everything a request handler needs; cheap to clone (one `Arc` per field).
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub config: Arc<Config>,
    /// The broadcast bearer key, resolved once at start.
    broadcast_key: Option<Arc<str>>,
    /// The JWT header, `x-` + `jwt.param`.
    jwt_header: Arc<str>,
    /// Cancelled at shutdown: live responses end, waiting long-polls answer 204.
    pub shutdown: CancellationToken,
    live_readers: Arc<std::sync::atomic::AtomicU64>,
    /// The `Vary` value of credentialed reads: the request headers that carry credentials.
    credential_headers: Arc<str>,
    /// The application's RPC, when it authenticates readers.
    rpc: Option<crate::rpc::Rpc>,
    /// Deadline and shared budget of request bodies.
    body_budget: request_body::BodyBudget,
    /// The reserved subscription API (`None` while the write API is off).
    subscriptions: Option<crate::subscriptions::Subscriptions>,
}

impl AppState {
    pub fn new(
        engine: Engine,
        config: Arc<Config>,
        shutdown: CancellationToken,
        rpc: Option<crate::rpc::Rpc>,
    ) -> AppState {
        let broadcast_key = config.effective_broadcast_key().map(Arc::from);
        let jwt_header: Arc<str> = Arc::from(format!("x-{}", config.jwt.param.to_ascii_lowercase()));
        let mut credential_headers = vec!["X-Signed".to_string(), canonical_header_name(&jwt_header)];
        if rpc.is_some() {
            // What the application is shown decides the read too (Cookie, by default).
            credential_headers
                .extend(config.rpc.proxy_headers.split(',').filter(|h| !h.is_empty()).map(canonical_header_name));
        }
        let credential_headers = Arc::from(credential_headers.join(", "));
        let body_budget = request_body::BodyBudget::new(
            config.server.max_body_bytes_in_flight,
            std::time::Duration::from_secs(config.server.body_timeout),
        );
        AppState {
            body_budget,
            engine,
            config,
            broadcast_key,
            jwt_header,
            shutdown,
            live_readers: Arc::default(),
            credential_headers,
            rpc,
            subscriptions: None,
        }
    }

    /// With the subscription API (and the append hook that wakes subscriptions).
    pub fn with_subscriptions(self, subscriptions: crate::subscriptions::Subscriptions) -> AppState {
        AppState { subscriptions: Some(subscriptions), ..self }
    }

    /// The headers a credentialed read depends on (its `Vary`).
    pub fn credential_headers(&self) -> &str {
        &self.credential_headers
    }

    /// Takes one live-reader slot, or refuses with 503 when `ds.max_live_readers` are busy.
    fn live_slot(&self) -> Result<LiveSlot, ApiError> {
        use std::sync::atomic::Ordering;
        let limit = self.config.ds.max_live_readers;
        let now = self.live_readers.fetch_add(1, Ordering::AcqRel) + 1;
        let slot = LiveSlot(self.live_readers.clone());
        if limit > 0 && now > limit {
            crate::metrics::get().live_readers_refused.inc();
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "too many live readers, retry later"));
        }
        Ok(slot)
    }
}

/// A live reader's place in the `ds.max_live_readers` budget, given back on drop.
pub struct LiveSlot(Arc<std::sync::atomic::AtomicU64>);

impl Drop for LiveSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// An error answered to the client as `{"error": "..."}`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    status: StatusCode,
    message: String,
    allow: Option<&'static str>,
    /// Close the connection after the answer (a request body was left unread).
    close: bool,
    /// Protocol headers the answer carries (`Stream-Closed`, `Stream-Next-Offset`).
    headers: Vec<(&'static str, String)>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), allow: None, close: false, headers: Vec::new() }
    }

    /// The same answer, and the connection is closed after it.
    pub fn closing(self) -> ApiError {
        ApiError { close: true, ..self }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn method_not_allowed(allow: &'static str) -> ApiError {
        ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: "method not allowed".into(),
            allow: Some(allow),
            close: false,
            headers: Vec::new(),
        }
    }

    /// A write its stream refused (nothing was written).
    pub fn refused(refusal: Refusal, epoch: crate::offset::Epoch) -> ApiError {
        let status = match refusal {
            Refusal::NotFound | Refusal::ForkSourceNotFound => StatusCode::NOT_FOUND,
            Refusal::StaleEpoch { .. } => StatusCode::FORBIDDEN,
            Refusal::NewEpochNotAtZero | Refusal::ForkOffset(_) | Refusal::ForkSubOffset(_) => StatusCode::BAD_REQUEST,
            Refusal::Deleted => StatusCode::GONE,
            _ => StatusCode::CONFLICT,
        };
        let mut error = ApiError::new(status, refusal.to_string());
        match refusal {
            Refusal::Closed { tail } => {
                error.headers.push(("Stream-Closed", "true".into()));
                error.headers.push(("Stream-Next-Offset", crate::offset::Position { epoch, seq: tail }.token()));
            }
            Refusal::StaleEpoch { current } => error.headers.push(("Producer-Epoch", current.to_string())),
            Refusal::SeqGap { expected, received } => {
                error.headers.push(("Producer-Expected-Seq", expected.to_string()));
                error.headers.push(("Producer-Received-Seq", received.to_string()));
            }
            _ => {}
        }
        error
    }

    /// A write that failed: refused by its stream, or not stored.
    pub fn from_write(error: WriteError, epoch: crate::offset::Epoch, context: &str) -> ApiError {
        match error {
            WriteError::Refused(refusal) => ApiError::refused(refusal, epoch),
            WriteError::Storage(e) => ApiError::unavailable(&e, context),
        }
    }

    /// Logs server-side failures (the client only learns the kind).
    fn unavailable(error: &StorageError, context: &str) -> ApiError {
        match error {
            StorageError::Busy => {
                return ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many broadcasts waiting to be written, retry later",
                )
            }
            StorageError::BatchTooLarge(limit) => {
                return ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "one broadcast or write holds at most {limit} messages in cluster mode (JetStream's \
                         atomic batch limit)"
                    ),
                )
            }
            StorageError::Unsupported(what) => {
                return ApiError::new(StatusCode::NOT_IMPLEMENTED, format!("{what} is not supported yet"))
            }
            StorageError::MessageTooLarge { limit, max_payload } => {
                return ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "a message holds at most {limit} bytes in cluster mode (the NATS server's max_payload, \
                         {max_payload} bytes, less room for headers)"
                    ),
                )
            }
            _ => {}
        }
        log::error!("{context}: {error}");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "storage unavailable")
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if let Some(allow) = self.allow {
            response.insert_header((header::ALLOW, allow));
        }
        if self.close {
            response.force_close();
        }
        for (name, value) in &self.headers {
            response.insert_header((*name, value.as_str()));
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            // Busy or recovering: a short pause is enough; clients back off on repeats.
            response.insert_header((header::RETRY_AFTER, "1"));
        }
        response.json(serde_json::json!({ "error": self.message }))
    }
}

impl From<InvalidStreamName> for ApiError {
    fn from(e: InvalidStreamName) -> Self {
        ApiError::bad_request(e.to_string())
    }
}

impl From<crate::rpc::RpcError> for ApiError {
    fn from(e: crate::rpc::RpcError) -> Self {
        match e {
            crate::rpc::RpcError::Rejected(e) => ApiError::from(e),
            crate::rpc::RpcError::Unavailable => {
                crate::metrics::get().auth_failures.with_label_values(&["auth_unavailable"]).inc();
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "auth_unavailable")
            }
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        crate::metrics::get().auth_failures.with_label_values(&[e.code()]).inc();
        ApiError::new(StatusCode::UNAUTHORIZED, e.code())
    }
}

impl From<ReadError> for ApiError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Gone => ApiError::new(StatusCode::GONE, "offset is no longer available"),
            ReadError::Storage(e) => ApiError::unavailable(&e, "read failed"),
        }
    }
}

/// Registers every route of the server.
pub fn configure(state: AppState) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        let config = state.config.clone();
        let ds_path = config.ds.path.clone();
        cfg.app_data(web::Data::new(state))
            .service(web::resource(config.http_broadcast.path.clone()).to(broadcast::handle))
            .service(web::resource(config.server.health_path.clone()).to(ops::health))
            .service(web::resource(config.metrics.http_path.clone()).to(ops::metrics))
            // Everything under the DS prefix (`/ds` itself and `/ds/...`, on segment boundaries)
            // goes to the DS handler, which takes the stream name from the raw path itself. A
            // scope matches by plain prefix comparison; the `{stream:.*}` resource it replaces
            // ran a regex over every request's path (visible in profiles of live fan-out).
            // Registered last, so the exact paths above win should one lie under the prefix.
            // The reserved `__ds/` prefix first: it is never a stream (PRODUCT.md §2).
            .service(
                web::scope(&format!("{}/__ds", ds_path.trim_end_matches('/')))
                    .default_service(web::to(subscriptions::handle)),
            )
            .service(web::scope(&ds_path).default_service(web::to(ds::handle)))
            .default_service(web::to(not_found));
    }
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::new(StatusCode::NOT_FOUND, "not found"))
}

/// Whether the read needed credentials (decides `Cache-Control: public` vs `private`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Public,
    Private,
}

/// Client authentication, then stream authorization (spec §6).
///
/// The checks that need nothing but this request (JWT, signed stream name) run first; the
/// call to the application runs last, only for a read that would otherwise be allowed. The
/// answer is the same as in the spec's order except when both fail: a read of a stream it may
/// not read gets its `401` without a call (and so without a `503` when the application is
/// down), and nobody can make us call the application with junk requests.
async fn authorize(
    state: &AppState,
    req: &HttpRequest,
    query: &crate::query::Query,
    stream: &str,
) -> Result<Access, ApiError> {
    let config = &state.config;
    let mut access = Access::Public;
    let mut authenticated = config.skip_client_auth();
    if !authenticated {
        if let Some(secret) = config.effective_jwt_secret() {
            let token = header_value(req, &state.jwt_header).or_else(|| query.get(&config.jwt.param));
            match token {
                Some(token) => {
                    let identity = auth::verify_jwt(secret, token)?;
                    log::debug!("authenticated client {:?} for stream {stream:?}", identity.identifiers);
                    access = Access::Private;
                    authenticated = true;
                }
                None if config.jwt.force => return Err(AuthError::Unauthorized.into()),
                None => {}
            }
        }
    }
    let signed = query.get("signed").or_else(|| header_value(req, "x-signed"));
    match (signed, config.effective_streams_secret()) {
        (Some(token), Some(secret)) => {
            auth::verify_signed_stream(secret, token, stream)?;
            access = Access::Private;
        }
        _ if config.public_streams() => {}
        _ => return Err(AuthError::Unauthorized.into()),
    }
    if let (false, Some(rpc)) = (authenticated, &state.rpc) {
        let env = rpc.env(request_url(req)?, req.headers(), req.peer_addr().map(|a| a.ip()));
        let identifiers = rpc.authenticate(env).await?;
        log::debug!("application authenticated client {identifiers:?} for stream {stream:?}");
        access = Access::Private;
    }
    Ok(access)
}

/// The full URL of a request, as AnyCable gives it to the application: `http://` (this
/// server does not terminate TLS), the `Host` the client asked for, the path and query as sent.
/// The application may trust this URL (its path names the stream), so a `Host` that is not a
/// plain `host[:port]` is refused: `Host: evil.com/ds/other?x=` would show it another URL.
fn request_url(req: &HttpRequest) -> Result<String, ApiError> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    Ok(request_base(req)? + path)
}

/// `http://` and the `Host` the client asked for (see [`request_url`]).
fn request_base(req: &HttpRequest) -> Result<String, ApiError> {
    // No Host, or an empty one (allowed when the request names no authority): the server's.
    let host = match req.headers().get(header::HOST).filter(|v| !v.is_empty()) {
        Some(value) => value.to_str().ok().filter(|h| valid_host(h)),
        None => Some(req.app_config().host()),
    };
    let Some(host) = host else {
        return Err(ApiError::bad_request("invalid Host header"));
    };
    Ok(format!("http://{host}"))
}

/// `host[:port]` as RFC 3986 allows it in an `http` URL: a name of letters, digits, `-`, `.`,
/// `_` and `~` (or an IPv4 address), or an IPv6 address in brackets; the port a number up
/// to 65535.
fn valid_host(value: &str) -> bool {
    let (host, port) = match value.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, after)) if v6.parse::<std::net::Ipv6Addr>().is_ok() => match after {
                "" => return true,
                _ => match after.strip_prefix(':') {
                    Some(port) => ("v6", port),
                    None => return false,
                },
            },
            _ => return false,
        },
        None => match value.rsplit_once(':') {
            Some((host, port)) => (host, port),
            None => (value, "80"),
        },
    };
    let name_ok = !host.is_empty()
        && host.len() <= 253
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'));
    let port_ok = port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok();
    name_ok && port_ok
}

/// `x-jid` → `X-Jid`, for headers we name in responses.
fn canonical_header_name(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map_or_else(String::new, |first| first.to_ascii_uppercase().to_string() + chars.as_str())
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// Headers on every response, errors included (spec §5).
pub fn default_headers() -> actix_web::middleware::DefaultHeaders {
    actix_web::middleware::DefaultHeaders::new()
        .add((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .add(("Cross-Origin-Resource-Policy", "cross-origin"))
}

fn header_value<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_hosts_make_the_url_shown_to_the_application() {
        for good in ["localhost", "localhost:8080", "app.example.com", "10.0.0.1:80", "[::1]", "[::1]:8080", "a_b~c"] {
            assert!(valid_host(good), "{good}");
        }
        for bad in [
            "",
            ":80",
            "evil.com/ds/other?x=",
            "a b",
            "a@b",
            "host:",
            "host:123456",
            "host:8o",
            "[::1",
            "[nope]",
            "[::1]x",
            "a:b:c",
            "h#x",
            "h\\x",
            "h%2F",
            "[::1]:",
            "\u{e9}t\u{e9}",
        ] {
            assert!(!valid_host(bad), "{bad:?}");
        }
    }
}
