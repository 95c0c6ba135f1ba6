//! A stand-in for the application side of AnyCable's HTTP RPC, for the Rust tests: a real HTTP
//! server (actix-web, on its own thread and system) on a free loopback port that answers
//! `POST …/connect` as an AnyCable application does, and records every call.
//!
//! Its `connect` decides by the `session` cookie it is shown: `session=good…` is SUCCESS,
//! `session=expired` is FAILURE with AnyCable's `token_expired` disconnect, `session=boom` is
//! ERROR (what anycable-rails answers when `connect` raises), `session=crash` is HTTP 500,
//! anything else is FAILURE. A test can switch it to misbehave (HTTP 500, status ERROR, slow answers). The
//! end-to-end suite runs the real `@anycable/serverless-js` instead (tests/e2e).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::http::KeepAlive;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use serde_json::{json, Value};

/// How the application answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// By the session cookie, as described above.
    Normal,
    /// HTTP 500 with an HTML body.
    Http500,
    /// HTTP 200 with `status: ERROR`.
    StatusError,
    /// HTTP 200 with a body that is not JSON.
    Garbage,
    /// HTTP 200 with a 2 MiB JSON body.
    Huge,
}

/// One call as the application received it.
#[derive(Debug, Clone)]
pub struct Call {
    pub path: String,
    /// Request headers, lower-case names.
    pub headers: BTreeMap<String, String>,
    pub body: Value,
}

impl Call {
    pub fn env_headers(&self) -> Value {
        self.body["env"]["headers"].clone()
    }
}

#[derive(Default)]
struct Shared {
    calls: Mutex<Vec<Call>>,
    mode: Mutex<Option<Mode>>,
    delay_ms: AtomicU64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

pub struct RpcApp {
    /// Base URL to give as `--rpc_host` (with a path prefix, as Rails mounts it).
    pub url: String,
    addr: std::net::SocketAddr,
    shared: Arc<Shared>,
    handle: actix_web::dev::ServerHandle,
}

impl RpcApp {
    pub fn start() -> RpcApp {
        let shared = Arc::new(Shared::default());
        let (tx, rx) = std::sync::mpsc::channel();
        let app_shared = shared.clone();
        std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let data = web::Data::from(app_shared);
                // No keep-alive: once stopped, nothing answers, not even a connection the server
                // under test kept open from an earlier call.
                let server =
                    HttpServer::new(move || App::new().app_data(data.clone()).default_service(web::to(connect)))
                        .keep_alive(KeepAlive::Disabled)
                        .workers(2)
                        .bind(("127.0.0.1", 0))
                        .expect("bind the test application");
                let addr = server.addrs()[0];
                let server = server.disable_signals().shutdown_timeout(1).run();
                tx.send((addr, server.handle())).unwrap();
                let _ = server.await;
            })
        });
        let (addr, handle) = rx.recv_timeout(Duration::from_secs(10)).expect("test application started");
        RpcApp { url: format!("http://{addr}/_anycable"), addr, shared, handle }
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap() = Some(mode);
    }

    /// Every answer waits this long first.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.shared.calls.lock().unwrap().clone()
    }

    pub fn call_count(&self) -> usize {
        self.shared.calls.lock().unwrap().len()
    }

    /// The most calls that were in progress at once.
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// Stops answering, and returns once connections to its port are refused: a stop is
    /// not immediate (the listener closes after the call returns), and a test that reads
    /// right after it must find the application down.
    pub async fn stop(&self) {
        self.handle.stop(false).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(self.addr).await.is_ok() {
            assert!(std::time::Instant::now() < deadline, "the test application still accepts connections");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn connect(req: HttpRequest, body: web::Bytes, shared: web::Data<Shared>) -> HttpResponse {
    let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let delay = shared.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        actix_web::rt::time::sleep(Duration::from_millis(delay)).await;
    }
    let headers = req
        .headers()
        .iter()
        .map(|(name, value)| (name.as_str().to_string(), value.to_str().unwrap_or("<binary>").to_string()))
        .collect();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let cookie = body["env"]["headers"]["cookie"].as_str().unwrap_or("").to_string();
    shared.calls.lock().unwrap().push(Call { path: req.path().to_string(), headers, body });
    let mode = shared.mode.lock().unwrap().unwrap_or(Mode::Normal);
    shared.in_flight.fetch_sub(1, Ordering::SeqCst);
    match mode {
        Mode::Http500 => HttpResponse::InternalServerError().body("<html>boom</html>"),
        Mode::StatusError => HttpResponse::Ok().json(json!({"status": 0, "error_msg": "Internal error"})),
        Mode::Garbage => HttpResponse::Ok().content_type("application/json").body("<html>{\"status\":1"),
        Mode::Huge => HttpResponse::Ok().json(json!({"status": 1, "pad": "x".repeat(2 << 20)})),
        Mode::Normal => {
            let session = cookie.split(';').map(str::trim).find_map(|pair| pair.strip_prefix("session="));
            let answer = match session {
                Some("boom") => json!({"status": 0, "error_msg": "NoMethodError in connect"}),
                Some("crash") => return HttpResponse::InternalServerError().body("<html>crash</html>"),
                Some(s) if s.starts_with("good") => json!({
                    "status": 1,
                    "identifiers": "{\"user_id\":42}",
                    "transmissions": ["{\"type\":\"welcome\"}"],
                }),
                Some("expired") => json!({
                    "status": 2,
                    "transmissions": ["{\"type\":\"disconnect\",\"reason\":\"token_expired\",\"reconnect\":false}"],
                }),
                _ => json!({
                    "status": 2,
                    "transmissions": ["{\"type\":\"disconnect\",\"reason\":\"unauthorized\"}"],
                }),
            };
            HttpResponse::Ok().json(answer)
        }
    }
}
