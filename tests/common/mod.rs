//! Test harness: runs the real `anycable-ds` binary on a free port with a temporary data
//! directory, and talks HTTP to it.
#![allow(dead_code)]

pub mod app;
pub mod ds_write;
pub mod nats;
pub mod webhooks;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const KEY: &str = "test-broadcast-key";

/// A running server process. Killed when dropped.
pub struct Server {
    child: Option<Child>,
    pub addr: String,
    work_dir: PathBuf,
    pub data_dir: PathBuf,
    args: Vec<String>,
    logs: Arc<Mutex<Vec<String>>>,
    pub client: reqwest::Client,
}

/// A temporary directory that holds the data dir (and is the server's working directory, so
/// the repository's own `anycable-ds.toml` is never picked up by accident).
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("anycable-ds-test").tempdir().expect("temp dir")
}

/// The engine the suite runs against: `sled` (default) or `nats` (cluster mode), from
/// `ANYCABLE_DS_TEST_ENGINE`. With `nats`, `ANYCABLE_DS_TEST_NATS` names the NATS cluster
/// (`scripts/test` starts one with `scripts/nats-cluster`).
pub fn engine() -> String {
    std::env::var("ANYCABLE_DS_TEST_ENGINE").unwrap_or_else(|_| "sled".into())
}

pub fn nats_engine() -> bool {
    engine() == "nats"
}

/// Flags that put a server on the engine under test. Each server gets its own JetStream
/// stream, named after its working directory, so restarts find it again and tests stay apart.
fn engine_args(work_dir: &Path) -> Vec<String> {
    match engine().as_str() {
        "sled" => Vec::new(),
        "nats" => {
            let servers = std::env::var("ANYCABLE_DS_TEST_NATS").expect(
                "ANYCABLE_DS_TEST_ENGINE=nats needs ANYCABLE_DS_TEST_NATS=<nats urls> (scripts/test starts a cluster)",
            );
            let name: String = work_dir
                .file_name()
                .map(|n| n.to_string_lossy().chars().filter(|c| c.is_ascii_alphanumeric()).collect())
                .unwrap_or_default();
            vec![
                "--broker".into(),
                "nats".into(),
                "--nats_servers".into(),
                servers,
                "--nats_stream".into(),
                format!("T{name}"),
            ]
        }
        other => panic!("ANYCABLE_DS_TEST_ENGINE={other}: use sled or nats"),
    }
}

/// Arguments most tests want: public streams and a known broadcast key. Everything else is
/// what a user gets by default (retention on: 100 messages, 300 s); a test about another
/// setting passes it.
pub fn default_args() -> Vec<String> {
    ["--public_streams", "--broadcast_key", KEY].iter().map(|s| s.to_string()).collect()
}

impl Server {
    /// Starts a server with [`default_args`] plus `extra` on a data dir inside `dir`.
    /// A flag in `extra` replaces the default one.
    pub fn start(dir: &Path, extra: &[&str]) -> Server {
        let mut args = Vec::new();
        let defaults = default_args();
        let mut i = 0;
        while i < defaults.len() {
            let flag = &defaults[i];
            let takes_value = defaults.get(i + 1).is_some_and(|v| !v.starts_with("--"));
            if !extra.contains(&flag.as_str()) {
                args.push(flag.clone());
                if takes_value {
                    args.push(defaults[i + 1].clone());
                }
            }
            i += if takes_value { 2 } else { 1 };
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Server::start_with(dir, args)
    }

    /// Starts a server with exactly `args` (plus port, data dir and log level).
    pub fn start_with(dir: &Path, mut args: Vec<String>) -> Server {
        // `--data_dir X` in the arguments replaces the default `dir/data`.
        let data_dir = match args.iter().position(|a| a == "--data_dir") {
            Some(i) => {
                let value = args.remove(i + 1);
                args.remove(i);
                PathBuf::from(value)
            }
            None => dir.join("data"),
        };
        let mut server = Server {
            child: None,
            addr: String::new(),
            work_dir: dir.to_path_buf(),
            data_dir,
            args,
            logs: Arc::new(Mutex::new(Vec::new())),
            // Timeouts only so that a broken server fails a test instead of hanging it: longer
            // than any wait a test asks for (long-polls, SSE pings every 15 s).
            // Idle connections are dropped after 2 s: the server closes a keep-alive connection
            // idle for 5 s (actix's default), and a request sent on one just as it closes fails
            // with `IncompleteMessage` (seen once in CI after a test's writers paused 6 s).
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .pool_idle_timeout(Duration::from_secs(2))
                .connect_timeout(Duration::from_secs(10))
                .read_timeout(Duration::from_secs(90))
                .build()
                .unwrap(),
        };
        server.spawn();
        server
    }

    /// The server binary: this build's, or `ANYCABLE_DS_TEST_BINARY` (to compare builds
    /// with the same test, e.g. a soak before and after a fix).
    pub fn command(dir: &Path) -> Command {
        let binary = std::env::var_os("ANYCABLE_DS_TEST_BINARY")
            .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_anycable-ds")), PathBuf::from);
        let mut command = Command::new(binary);
        command.current_dir(dir);
        for (key, _) in std::env::vars() {
            if key.starts_with("ANYCABLE_") || key == "PORT" || key == "RUST_LOG" {
                command.env_remove(key);
            }
        }
        command
    }

    fn spawn(&mut self) {
        let mut command = Server::command(&self.work_dir);
        command
            .args(["--port", "0", "--data_dir"])
            .arg(&self.data_dir)
            .args(if self.args.iter().any(|a| a == "--broker") { Vec::new() } else { engine_args(&self.work_dir) })
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if !self.args.iter().any(|a| a == "--log_level") {
            command.args(["--log_level", "info"]);
        }
        let mut child = command.spawn().expect("start anycable-ds");
        let stderr = child.stderr.take().unwrap();
        let (ready, listening) = mpsc::channel();
        let logs = self.logs.clone();
        // Keep draining stderr for the server's whole life: a full pipe would block it.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.split("Listening on http://").nth(1) {
                    let _ = ready.send(rest.trim().to_string());
                }
                logs.lock().unwrap().push(line);
            }
        });
        match listening.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => self.addr = addr,
            Err(_) => {
                let _ = child.kill();
                panic!("server did not start:\n{}", self.logs());
            }
        }
        self.child = Some(child);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ds(&self, stream_and_query: &str) -> String {
        self.url(&format!("/ds/{stream_and_query}"))
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Waits until the server's log contains `text` (it is read on another thread).
    pub fn wait_for_log(&self, text: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.logs().contains(text) {
            assert!(Instant::now() < deadline, "no {text:?} in the log:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The server's resident memory (VmRSS), in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .map(|v| v.trim().parse().unwrap())
            .unwrap();
        kib * 1024
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for the exit (at most `limit`).
    pub fn terminate(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("server did not exit within {limit:?} after SIGTERM:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same data directory (new port).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the server first");
        self.spawn();
    }

    pub async fn broadcast(&self, body: &str) -> (u16, Value) {
        self.broadcast_with_key(body, Some(KEY)).await
    }

    pub async fn broadcast_with_key(&self, body: &str, key: Option<&str>) -> (u16, Value) {
        let mut request = self.client.post(self.url("/_broadcast")).body(body.to_string());
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.expect("broadcast request");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Broadcasts one message per value to `stream`, one request each; panics unless 201.
    pub async fn publish(&self, stream: &str, values: impl IntoIterator<Item = Value>) {
        for value in values {
            let body = serde_json::json!({"stream": stream, "data": value.to_string()}).to_string();
            let (status, reply) = self.broadcast(&body).await;
            assert_eq!(status, 201, "{reply}");
        }
    }

    pub async fn get(&self, stream_and_query: &str) -> reqwest::Response {
        self.client.get(self.ds(stream_and_query)).send().await.expect("GET")
    }

    /// Catch-up read: (messages, Stream-Next-Offset, up-to-date).
    pub async fn read(&self, stream: &str, offset: &str) -> (Vec<Value>, String, bool) {
        let response = self.get(&format!("{stream}?offset={offset}")).await;
        assert_eq!(response.status(), 200, "read {stream} from {offset}");
        read_parts(response).await
    }

    /// The stream's tail token (HEAD).
    pub async fn tail(&self, stream: &str) -> String {
        let response = self.client.head(self.ds(stream)).send().await.unwrap();
        assert_eq!(response.status(), 200);
        header(&response, "stream-next-offset").expect("Stream-Next-Offset")
    }

    /// A metric's value from `/metrics` (0 when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.client.get(self.url("/metrics")).send().await.unwrap().text().await.unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }

    /// Waits until `metric` equals `expected` (polling /metrics), or panics after `limit`.
    pub async fn wait_for_metric(&self, metric: &str, expected: f64, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let value = self.metric(metric).await;
            if value == expected {
                return;
            }
            assert!(Instant::now() < deadline, "{metric} is {value}, expected {expected}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A node (public streams, the test broadcast key) on NATS cluster `cluster`, using JetStream
/// stream `stream`; `extra` flags come last.
pub fn cluster_node(dir: &Path, cluster: &nats::NatsCluster, stream: &str, extra: &[&str]) -> Server {
    let mut args: Vec<String> =
        ["--public_streams", "--broadcast_key", KEY, "--broker", "nats", "--nats_stream", stream]
            .iter()
            .map(|s| s.to_string())
            .collect();
    args.extend(["--nats_servers".to_string(), cluster.urls()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    Server::start_with(dir, args)
}

pub fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response.headers().get(name).map(|v| v.to_str().unwrap().to_string())
}

pub async fn read_parts(response: reqwest::Response) -> (Vec<Value>, String, bool) {
    let next = header(&response, "stream-next-offset").expect("Stream-Next-Offset");
    let up_to_date = header(&response, "stream-up-to-date").as_deref() == Some("true");
    let body: Value = response.json().await.expect("JSON body");
    (body.as_array().expect("JSON array").clone(), next, up_to_date)
}

/// `[{"n":from}, ..., {"n":to}]`
pub fn numbered(range: std::ops::RangeInclusive<u64>) -> Vec<Value> {
    range.map(|n| serde_json::json!({ "n": n })).collect()
}

/// An open SSE response, read event by event.
pub struct SseClient {
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
    pub ended: bool,
}

/// One SSE event: `event` is "data", "control" or "comment".
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
    /// The `id:` field, if the event has one.
    pub id: Option<String>,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("{e}: {}", self.data))
    }
}

impl SseClient {
    pub async fn open(server: &Server, stream_and_query: &str) -> SseClient {
        SseClient::open_with(server, server.client.clone(), stream_and_query).await
    }

    /// Opens with a given client (a fresh client per reader gives each its own connection pool).
    pub async fn open_with(server: &Server, client: reqwest::Client, stream_and_query: &str) -> SseClient {
        let response = client.get(server.ds(stream_and_query)).send().await.expect("SSE request");
        assert_eq!(response.status(), 200, "SSE {stream_and_query}");
        assert_eq!(header(&response, "content-type").as_deref(), Some("text/event-stream"));
        SseClient { body: Box::pin(response.bytes_stream()), buffer: String::new(), ended: false }
    }

    /// The next event, or `None` once the server ended the response. Panics after `limit`.
    pub async fn next(&mut self, limit: Duration) -> Option<SseEvent> {
        use futures_util::StreamExt;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = SseEvent { event: String::new(), data: String::new(), id: None };
                for line in block.lines().filter(|l| !l.is_empty()) {
                    if let Some(comment) = line.strip_prefix(':') {
                        event = SseEvent { event: "comment".into(), data: comment.trim().into(), id: None };
                        continue;
                    }
                    // `field:value`, one optional space after the colon (the SSE standard).
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "event" => event.event = value.into(),
                        // Several data lines make one value, joined by newlines.
                        "data" if event.event == "data" && !event.data.is_empty() => {
                            event.data.push('\n');
                            event.data.push_str(value);
                        }
                        "data" => {
                            assert!(event.data.is_empty(), "one data line per control event: {block:?}");
                            event.data = value.into();
                        }
                        "id" => event.id = Some(value.into()),
                        _ => panic!("unexpected SSE line {line:?}"),
                    }
                }
                return Some(event);
            }
            if self.ended {
                assert!(self.buffer.is_empty(), "response ended mid-event: {:?}", self.buffer);
                return None;
            }
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Err(_) => panic!("no SSE event within {limit:?}"),
                Ok(Some(Ok(bytes))) => self.buffer.push_str(std::str::from_utf8(&bytes).unwrap()),
                Ok(Some(Err(e))) => panic!("SSE body error: {e}"),
                Ok(None) => self.ended = true,
            }
        }
    }

    /// Reads a data event and its control event: (messages, control JSON). Skips comments.
    pub async fn next_batch(&mut self, limit: Duration) -> Option<(Vec<Value>, Value)> {
        let mut messages = Vec::new();
        loop {
            let event = self.next(limit).await?;
            match event.event.as_str() {
                "comment" => continue,
                "data" => {
                    assert!(messages.is_empty(), "two data events without a control between");
                    assert!(!event.data.contains('\n'), "a JSON data event is one line: {:?}", event.data);
                    messages = event.json().as_array().expect("data is a JSON array").clone();
                    assert!(!messages.is_empty(), "empty data event");
                }
                "control" => return Some((messages, event.json())),
                other => panic!("unknown event {other}"),
            }
        }
    }
}

/// A tiny deterministic PRNG (xorshift): garbage and random moments that a failing run can
/// replay from its seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    pub fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

/// A connection that sends `request` and then never reads. Its receive buffer is made small,
/// so the kernel does not quietly absorb megabytes for it: the server sees a client that stops
/// reading at once (with default buffers a 4 MiB response fits in the kernel).
pub fn stuck_client(server: &Server, request: &str) -> std::net::TcpStream {
    client_with_receive_buffer(server, request, 4096)
}

/// A connection with a receive buffer of `size` bytes that has sent `request`.
pub fn client_with_receive_buffer(server: &Server, request: &str, size: libc::c_int) -> std::net::TcpStream {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let mut socket = std::net::TcpStream::connect(&server.addr).unwrap();
    // SAFETY: setsockopt reads one int from the pointer it is given.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0);
    socket.write_all(request.as_bytes()).unwrap();
    socket
}

/// `token` (an offset this server handed out) with its sequence number replaced by `seq`.
pub fn token_at(token: &str, seq: u64) -> String {
    format!("{}_{seq:020}", &token[..token.len() - 21])
}

/// The sequence number of an offset token.
pub fn seq_of(token: &str) -> u64 {
    token[token.len() - 20..].parse().unwrap()
}
