//! Authentication of readers by the application over AnyCable's HTTP RPC.
//!
//! AnyCable's default for Durable Streams is "the same authentication flow as WebSocket
//! connections": the application's own `connect` decides (for Rails, `identified_by` and the
//! session cookie). We make the call AnyCable makes: `POST {rpc.host}/connect` with
//! `{"env":{"url":…,"headers":{…}}}`, the bearer secret and AnyCable's metadata headers, and
//! read its `status`: SUCCESS lets the read go on, FAILURE is `401`, anything else (ERROR, a
//! non-200 answer, no answer in time) is `503`: the client did nothing wrong.
//!
//! The application is protected from its readers: at most `rpc.concurrency` calls at once
//! (further reads wait for a slot within the same timeout), a circuit breaker pauses calls to
//! an application that keeps failing (`breaker.rs`), and an optional cache reuses successes
//! (`cache.rs`).
//!
//! Secrets and cookies: the bearer is marked sensitive, cookies live only in the request being
//! made, and errors are logged without URLs or values.

mod breaker;
mod cache;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::http::header::HeaderMap;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use tokio::sync::Semaphore;

use crate::auth::AuthError;
use crate::config::Config;
use crate::metrics;
use breaker::{Breaker, Client, Outcome};

/// AnyCable's RPC protocol version, sent as `X-Anycable-Meta-Protov`.
const PROTO_VERSION: &str = "v1";
/// Largest answer read from the application (a connect answer is a few hundred bytes).
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// The `connect` URL for a configured `rpc.host`, or why it is not usable.
pub fn connect_url(host: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(host).map_err(|e| format!("not a URL ({e}): use http://host:port/path"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "only AnyCable's HTTP RPC is supported (an http:// or https:// URL), not {:?}; \
             set norpc (--norpc) to turn RPC off",
            url.scheme()
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not have a query or fragment".into());
    }
    // `{host}/connect`, whether or not the configured path ends with a slash.
    let path = format!("{}/connect", url.path().trim_end_matches('/'));
    let mut url = url;
    url.set_path(&path);
    Ok(url)
}

/// `rpc.host` fit for a log line: no user name or password.
pub fn display_host(host: &str) -> String {
    match reqwest::Url::parse(host) {
        Ok(mut url) => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.to_string()
        }
        Err(_) => "(invalid URL)".into(),
    }
}

/// What the application is shown of a read (AnyCable's `env`).
#[derive(Debug, serde::Serialize)]
pub struct Env {
    /// The full URL of the read.
    pub url: String,
    /// The proxied request headers (lower-case names) and `REMOTE_ADDR`.
    pub headers: BTreeMap<String, String>,
    /// The reader's address, for the circuit breaker's blame (not sent).
    #[serde(skip)]
    pub client: Option<IpAddr>,
}

/// Why the application did not authenticate a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    /// The application said no (FAILURE): `401`.
    #[error("{0}")]
    Rejected(AuthError),
    /// No usable answer: `503`.
    #[error("auth_unavailable")]
    Unavailable,
}

/// The application's RPC; cheap to clone.
#[derive(Clone)]
pub struct Rpc {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    url: reqwest::Url,
    bearer: Option<HeaderValue>,
    proxy_headers: Vec<String>,
    proxy_cookies: Vec<String>,
    timeout: Duration,
    slots: Semaphore,
    breaker: Mutex<Breaker>,
    cache: Option<cache::Cache>,
    /// When the last warning about failing calls was logged (ms since start), to log at most
    /// one per 10 s while the application is down rather than one per read.
    last_warning_ms: AtomicU64,
    started: Instant,
}

impl Rpc {
    /// The RPC client for `config`, or `None` when readers are not authenticated by the
    /// application (no `rpc.host`, `norpc`, or client authentication skipped).
    pub fn from_config(config: &Config) -> Result<Option<Rpc>, String> {
        let Some(host) = config.effective_rpc_host() else {
            return Ok(None);
        };
        let url = connect_url(host)?;
        let bearer = match config.effective_rpc_secret() {
            Some(secret) => {
                let mut value = HeaderValue::try_from(format!("Bearer {secret}"))
                    .map_err(|_| "rpc.secret: must be printable ASCII".to_string())?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let concurrency = usize::try_from(config.rpc.concurrency).unwrap_or(usize::MAX);
        let http = reqwest::Client::builder()
            // The secret and the cookies go to this host and nowhere else: no redirects, and
            // no proxy from the environment (AnyCable's client uses none either).
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .pool_max_idle_per_host(concurrency)
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("rpc: cannot build the HTTP client: {e}"))?;
        let split = |list: &str| list.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect();
        metrics::get().rpc_capacity.set(config.rpc.concurrency as i64);
        let now = Instant::now();
        Ok(Some(Rpc {
            inner: Arc::new(Inner {
                http,
                url,
                bearer,
                proxy_headers: split(&config.rpc.proxy_headers),
                proxy_cookies: split(&config.rpc.proxy_cookies),
                timeout: Duration::from_millis(config.rpc.request_timeout),
                slots: Semaphore::new(concurrency),
                breaker: Mutex::new(Breaker::new(now)),
                cache: (config.rpc.cache_ttl > 0).then(|| cache::Cache::new(Duration::from_secs(config.rpc.cache_ttl))),
                last_warning_ms: AtomicU64::new(0),
                started: now,
            }),
        }))
    }

    /// The headers the application is shown: those named in `rpc.proxy_headers`, cookies
    /// filtered by `rpc.proxy_cookies`, and `REMOTE_ADDR`.
    pub fn env(&self, url: String, headers: &HeaderMap, remote: Option<IpAddr>) -> Env {
        let mut proxied = BTreeMap::new();
        for name in &self.inner.proxy_headers {
            // A value that is not text cannot be passed on faithfully: it is left out.
            let values: Vec<&str> = headers.get_all(name.as_str()).filter_map(|v| v.to_str().ok()).collect();
            if values.is_empty() {
                continue;
            }
            let value = if name == "cookie" {
                filter_cookies(&values.join("; "), &self.inner.proxy_cookies)
            } else {
                values.join(", ")
            };
            if !value.is_empty() {
                proxied.insert(name.clone(), value);
            }
        }
        if let Some(ip) = remote {
            proxied.insert("REMOTE_ADDR".into(), ip.to_string());
        }
        Env { url, headers: proxied, client: remote }
    }

    /// Asks the application whether this reader may connect: `Ok(identifiers)` when it may.
    pub async fn authenticate(&self, env: Env) -> Result<Option<String>, RpcError> {
        let inner = &self.inner;
        let m = metrics::get();
        let cached = inner.cache.as_ref().map(|cache| (cache, cache.key(&env)));
        if let Some((cache, key)) = &cached {
            if let Some(identifiers) = cache.get(key, Instant::now()) {
                m.rpc_cache_hits.inc();
                m.rpc_results.with_label_values(&["success"]).inc();
                return Ok(identifiers);
            }
        }
        let result = self.call(env).await;
        let label = match &result {
            Ok(_) => "success",
            Err(RpcError::Rejected(_)) => "failure",
            Err(RpcError::Unavailable) => "unavailable",
        };
        m.rpc_results.with_label_values(&[label]).inc();
        if let (Ok(identifiers), Some((cache, key))) = (&result, cached) {
            cache.put(key, identifiers.clone(), Instant::now());
        }
        result
    }

    async fn call(&self, env: Env) -> Result<Option<String>, RpcError> {
        let inner = &self.inner;
        let m = metrics::get();
        let deadline = tokio::time::Instant::now() + inner.timeout;
        // A slot first: reads beyond rpc.concurrency wait here, within the same timeout.
        let _slot = {
            let _pending = metrics::GaugeGuard::new(&m.rpc_pending);
            match tokio::time::timeout_at(deadline, inner.slots.acquire()).await {
                Ok(Ok(permit)) => permit,
                Ok(Err(_closed)) => return Err(RpcError::Unavailable),
                Err(_elapsed) => {
                    m.rpc_timeouts.inc();
                    self.warn("no free RPC slot within rpc.request_timeout (raise rpc.concurrency?)");
                    return Err(RpcError::Unavailable);
                }
            }
        };
        let Some(ticket) = Ticket::take(&self.inner) else {
            m.rpc_breaker_refused.inc();
            return Err(RpcError::Unavailable);
        };
        let _in_flight = metrics::GaugeGuard::new(&m.rpc_in_flight);
        m.rpc_calls.inc();
        let started = Instant::now();
        let client = Client::of(env.client);
        let answer = tokio::time::timeout_at(deadline, self.post(&env)).await;
        drop(env); // the cookie is not kept past the call
        m.rpc_seconds.observe(started.elapsed().as_secs_f64());
        let answer = match answer {
            Ok(answer) => answer,
            Err(_elapsed) => {
                m.rpc_timeouts.inc();
                Err(Failure::Timeout)
            }
        };
        match answer {
            Ok(verdict) => {
                ticket.report(Outcome::Answered);
                verdict
            }
            Err(failure) => {
                ticket.report(failure.outcome(client));
                m.rpc_errors.inc();
                self.warn(&failure.to_string());
                Err(RpcError::Unavailable)
            }
        }
    }

    /// One `POST {rpc.host}/connect`: the application's verdict, or why there is none.
    async fn post(&self, env: &Env) -> Result<Result<Option<String>, RpcError>, Failure> {
        let inner = &self.inner;
        let body = serde_json::to_vec(&serde_json::json!({ "env": env })).map_err(|_| Failure::Encode)?;
        let mut request = inner
            .http
            .post(inner.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("x-anycable-meta-sid", session_id())
            .header("x-anycable-meta-protov", PROTO_VERSION)
            .body(body);
        if let Some(bearer) = &inner.bearer {
            request = request.header(AUTHORIZATION, bearer.clone());
        }
        let mut response = request.send().await.map_err(|e| Failure::Unreachable(e.without_url().to_string()))?;
        let status = response.status();
        if status != reqwest::StatusCode::OK {
            return Err(Failure::Status(status.as_u16()));
        }
        let mut body = Vec::new();
        while let Some(piece) = response.chunk().await.map_err(|e| Failure::Unreachable(e.without_url().to_string()))? {
            if body.len() + piece.len() > MAX_ANSWER_BYTES {
                return Err(Failure::Answer("larger than 1 MiB".into()));
            }
            body.extend_from_slice(&piece);
        }
        parse_answer(&body)
    }

    /// Logs a failing call at most once per 10 s (the application being down would
    /// otherwise log one line per read).
    fn warn(&self, what: &str) {
        let now = self.inner.started.elapsed().as_millis() as u64;
        let last = self.inner.last_warning_ms.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= 10_000)
            && self
                .inner
                .last_warning_ms
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log::warn!("RPC connect to the application failed: {what}; DS reads get 503 until it answers");
        } else {
            log::debug!("RPC connect to the application failed: {what}");
        }
    }
}

/// A call let through by the circuit breaker; its outcome must be reported, and one dropped
/// unreported (the reader went away mid-call) counts as abandoned.
struct Ticket<'a> {
    inner: &'a Inner,
    generation: u64,
    reported: bool,
}

impl<'a> Ticket<'a> {
    fn take(inner: &'a Inner) -> Option<Ticket<'a>> {
        let generation = lock(&inner.breaker).allow(Instant::now())?;
        Some(Ticket { inner, generation, reported: false })
    }

    fn report(mut self, outcome: Outcome) {
        self.reported = true;
        self.finish(outcome);
    }

    fn finish(&self, outcome: Outcome) {
        let mut breaker = lock(&self.inner.breaker);
        let was_open = breaker_open(&mut breaker);
        breaker.report(self.generation, outcome, Instant::now());
        let open = breaker_open(&mut breaker);
        drop(breaker);
        if open != was_open {
            metrics::get().rpc_breaker_open.set(i64::from(open));
            if open {
                log::warn!("the application keeps failing: RPC calls paused for 5 s (DS reads get 503 meanwhile)");
            } else {
                log::info!("the application answers again: RPC calls resumed");
            }
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.reported {
            self.finish(Outcome::Abandoned);
        }
    }
}

fn breaker_open(breaker: &mut Breaker) -> bool {
    !matches!(breaker.state(Instant::now()), breaker::State::Closed)
}

fn lock(breaker: &Mutex<Breaker>) -> std::sync::MutexGuard<'_, Breaker> {
    // The breaker's state is a few counters, valid after any panic: keep using it.
    breaker.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Why a call gave no verdict. Messages never carry the URL, secret or cookies.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("cannot encode the request")]
    Encode,
    #[error("no answer: {0}")]
    Unreachable(String),
    #[error("no answer within rpc.request_timeout")]
    Timeout,
    #[error("the application answered HTTP {0} (401 means rpc.secret does not match the application's)")]
    Status(u16),
    #[error("unusable answer: {0}")]
    Answer(String),
    #[error("the application answered ERROR: {0}")]
    AppError(String),
}

impl Failure {
    /// How the circuit breaker counts it (breaker.rs): no answer at all is the application
    /// failing; an answer that is no verdict may be about this client's input.
    fn outcome(&self, client: Client) -> Outcome {
        match self {
            Failure::Unreachable(_) | Failure::Timeout => Outcome::Failed,
            Failure::Encode | Failure::Status(_) | Failure::Answer(_) | Failure::AppError(_) => {
                Outcome::Unusable(client)
            }
        }
    }
}

/// Reads a connect answer. `status` is AnyCable's enum, as a number (`@anycable/serverless-js`
/// sends 0/1/2) or by name (`ERROR`/`SUCCESS`/`FAILURE`, as in AnyCable's OpenAPI description).
fn parse_answer(body: &[u8]) -> Result<Result<Option<String>, RpcError>, Failure> {
    let answer: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| Failure::Answer(format!("not JSON ({e})")))?;
    let status = match answer.get("status") {
        Some(serde_json::Value::Number(n)) => n.as_i64(),
        Some(serde_json::Value::String(s)) => match s.as_str() {
            "ERROR" => Some(0),
            "SUCCESS" => Some(1),
            "FAILURE" => Some(2),
            _ => None,
        },
        _ => None,
    };
    match status {
        Some(1) => {
            let identifiers =
                answer.get("identifiers").and_then(|v| v.as_str()).filter(|s| !s.is_empty()).map(str::to_string);
            Ok(Ok(identifiers))
        }
        Some(2) => Ok(Err(RpcError::Rejected(if token_expired(&answer) {
            AuthError::TokenExpired
        } else {
            AuthError::Unauthorized
        }))),
        Some(0) => {
            let message = answer.get("error_msg").and_then(|v| v.as_str()).unwrap_or("");
            // The application's own words, shortened: it is a log line, not a dump.
            Err(Failure::AppError(message.chars().take(200).collect()))
        }
        _ => Err(Failure::Answer("no valid \"status\"".into())),
    }
}

/// Whether a FAILURE answer says the client's token expired: AnyCable's apps transmit
/// `{"type":"disconnect","reason":"token_expired",...}` then.
fn token_expired(answer: &serde_json::Value) -> bool {
    let Some(transmissions) = answer.get("transmissions").and_then(|v| v.as_array()) else {
        return false;
    };
    transmissions.iter().filter_map(|t| t.as_str()).any(|t| {
        serde_json::from_str::<serde_json::Value>(t)
            .ok()
            .is_some_and(|message| message.get("reason").and_then(|r| r.as_str()) == Some("token_expired"))
    })
}

/// Keeps the cookies named in `allowed` (all when it is empty). Pairs are split on `;` and
/// trimmed; the name is what comes before the first `=`.
fn filter_cookies(header: &str, allowed: &[String]) -> String {
    if allowed.is_empty() {
        return header.to_string();
    }
    header
        .split(';')
        .map(str::trim)
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(name, _)| name).trim();
            !pair.is_empty() && allowed.iter().any(|a| a == name)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A fresh session id for `X-Anycable-Meta-Sid` (21 characters, as AnyCable's nanoids).
fn session_id() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), 21)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_url_joins_the_path() {
        assert_eq!(connect_url("http://app:3000").unwrap().as_str(), "http://app:3000/connect");
        assert_eq!(connect_url("http://app/_anycable/").unwrap().as_str(), "http://app/_anycable/connect");
        assert_eq!(connect_url("https://app/rpc").unwrap().as_str(), "https://app/rpc/connect");
        assert!(connect_url("localhost:50051").is_err());
        assert!(connect_url("grpc://app:50051").is_err());
        assert!(connect_url("http://app/?x=1").is_err());
        assert_eq!(display_host("http://user:pw@app:3000/rpc"), "http://app:3000/rpc");
    }

    #[test]
    fn cookies_are_filtered_by_name() {
        let allowed = vec!["_session".to_string(), "b".to_string()];
        assert_eq!(filter_cookies("a=1; _session=x=y;b=2 ;c", &allowed), "_session=x=y; b=2");
        assert_eq!(filter_cookies("a=1", &allowed), "");
        assert_eq!(filter_cookies("a=1; b=2", &[]), "a=1; b=2");
    }

    #[test]
    fn answers_by_number_or_name() {
        let ok = |body: &str| parse_answer(body.as_bytes()).map_err(|e| e.to_string());
        assert_eq!(ok(r#"{"status":1,"identifiers":"{\"u\":1}"}"#).unwrap(), Ok(Some("{\"u\":1}".into())));
        assert_eq!(ok(r#"{"status":"SUCCESS","identifiers":""}"#).unwrap(), Ok(None));
        assert_eq!(ok(r#"{"status":2}"#).unwrap(), Err(RpcError::Rejected(AuthError::Unauthorized)));
        let expired =
            r#"{"status":"FAILURE","transmissions":["{\"type\":\"disconnect\",\"reason\":\"token_expired\"}"]}"#;
        assert_eq!(ok(expired).unwrap(), Err(RpcError::Rejected(AuthError::TokenExpired)));
        for bad in [r#"{"status":0,"error_msg":"boom"}"#, r#"{"status":7}"#, r#"{}"#, "[", r#"{"status":"MAYBE"}"#] {
            assert!(ok(bad).is_err(), "{bad}");
        }
    }
}
