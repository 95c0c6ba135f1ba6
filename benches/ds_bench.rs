//! ds-bench: the same workloads against anycable-ds and against the `durable-streams` peer
//! server, on this machine, in one run.
//!
//! Each run starts the server itself (temporary data directory, free port), runs a workload,
//! prints the figures (`RESULT` lines), and stops the server. Examples:
//!
//! ```sh
//! cargo bench --bench ds_bench -- ingest --conns 32                 # ours only
//! cargo bench --bench ds_bench -- ingest --conns 32 --target both   # ours, peer, ratio
//! cargo bench --bench ds_bench -- catchup --messages 10000
//! cargo bench --bench ds_bench -- fanout --readers 1000 --mode sse
//! cargo bench --bench ds_bench -- streams --streams 10000
//! cargo bench --bench ds_bench -- restart --messages 1000000
//! cargo bench --bench ds_bench -- idle --connections 10000
//! cargo bench --bench ds_bench -- load --readers 1000 --connections 10000
//! cargo bench --bench ds_bench -- all --target both --plot docs/fanout-latency.svg
//! ```
//!
//! Writes go through each server's own API (ours: `POST /_broadcast`; the peer: `PUT` then
//! `POST /{stream}` with a JSON body); reads use the Durable Streams protocol on both.
//! `scripts/bench` installs the peer and runs the whole comparison.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

const KEY: &str = "bench-key";

#[derive(Clone)]
struct Options {
    workload: String,
    target: String,
    conns: usize,
    batch: usize,
    messages: usize,
    readers: usize,
    mode: String,
    seconds: u64,
    connections: usize,
    streams: usize,
    ours_bin: String,
    peer_bin: String,
    fsync: bool,
    plot: Option<String>,
    /// Cluster mode: NATS URLs for ours (`--broker nats`).
    nats: Option<String>,
    /// Cluster mode: live readers on a second node, the publisher on the first.
    cross_node: bool,
    /// Ours writes with the Durable Streams protocol (`PUT`, then `POST /ds/{stream}` with the
    /// JSON values), as the peer does, instead of `POST /_broadcast`.
    ds_writes: bool,
}

fn parse_options() -> Options {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let mut options = Options {
        workload: String::new(),
        target: "ours".into(),
        conns: 32,
        batch: 1,
        messages: 10_000,
        readers: 100,
        mode: "sse".into(),
        seconds: 10,
        connections: 1000,
        streams: 10_000,
        ours_bin: concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/anycable-ds").into(),
        peer_bin: std::env::var("DS_PEER_BIN").unwrap_or_else(|_| "durable-streams-server".into()),
        fsync: true,
        plot: None,
        nats: None,
        cross_node: false,
        ds_writes: false,
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--target" => options.target = value(),
            "--conns" => options.conns = value().parse().unwrap(),
            "--batch" => options.batch = value().parse().unwrap(),
            "--messages" => options.messages = value().parse().unwrap(),
            "--readers" => options.readers = value().parse().unwrap(),
            "--mode" => options.mode = value(),
            "--seconds" => options.seconds = value().parse().unwrap(),
            "--connections" => options.connections = value().parse().unwrap(),
            "--streams" => options.streams = value().parse().unwrap(),
            "--server-bin" => options.ours_bin = value(),
            "--peer-bin" => options.peer_bin = value(),
            "--no-fsync" => options.fsync = false,
            "--plot" => options.plot = Some(value()),
            "--nats" => options.nats = Some(value()),
            "--cross-node" => options.cross_node = true,
            "--ds-writes" => options.ds_writes = true,
            workload if !workload.starts_with("--") && options.workload.is_empty() => {
                options.workload = workload.into()
            }
            other => panic!("unknown argument {other}"),
        }
    }
    options
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Ours,
    Peer,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Ours => "anycable-ds",
            Kind::Peer => "durable-streams",
        }
    }
}

/// A server under test, killed on drop.
struct Server {
    kind: Kind,
    /// See `Options::ds_writes`.
    ds_writes: bool,
    child: Option<Child>,
    base: String,
    dir: tempfile::TempDir,
    args: Vec<String>,
    bin: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Server {
    fn start(kind: Kind, options: &Options, live_wait_secs: u64) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data").to_string_lossy().into_owned();
        let (bin, args): (String, Vec<String>) = match kind {
            Kind::Ours => {
                let mut args: Vec<String> = [
                    "--port",
                    "0",
                    "--broadcast_key",
                    KEY,
                    "--public_streams",
                    "--history_limit",
                    "0",
                    "--history_ttl",
                    "0",
                    "--log_level",
                    "info",
                    "--data_dir",
                    &data,
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                args.extend(["--storage_fsync".into(), options.fsync.to_string()]);
                args.extend(["--ds_poll_interval".into(), live_wait_secs.to_string()]);
                args.extend(["--ds_sse_ttl".into(), live_wait_secs.to_string()]);
                if let Some(urls) = &options.nats {
                    // Cluster mode: a JetStream stream of its own per run.
                    let stream = format!("BENCH{}", std::process::id() as u64 * 1000 + free_port() as u64);
                    args.extend(
                        ["--broker", "nats", "--nats_servers", urls, "--nats_stream", &stream].map(String::from),
                    );
                }
                (options.ours_bin.clone(), args)
            }
            Kind::Peer => {
                let args = vec![
                    "--port".into(),
                    free_port().to_string(),
                    "--data-dir".into(),
                    data,
                    "--long-poll-timeout-ms".into(),
                    (live_wait_secs * 1000).to_string(),
                ];
                (options.peer_bin.clone(), args)
            }
        };
        let ds_writes = options.ds_writes;
        let mut server = Server { kind, ds_writes, child: None, base: String::new(), dir, args, bin };
        server.spawn();
        server
    }

    fn spawn(&mut self) -> Duration {
        let started = Instant::now();
        let mut child = Command::new(&self.bin)
            .current_dir(self.dir.path())
            .args(&self.args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.bin));
        let (tx, rx) = std::sync::mpsc::channel();
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Some(rest) = line.split("istening on http://").nth(1) {
                        let addr = rest.split_whitespace().next().unwrap_or("").to_string();
                        let _ = tx.send(addr);
                    }
                }
            });
        }
        self.base = format!("http://{}", rx.recv_timeout(Duration::from_secs(600)).expect("server ready"));
        self.child = Some(child);
        started.elapsed()
    }

    /// Another node on the same log (cluster mode): same settings, same JetStream stream.
    fn another_node(&self) -> Server {
        let mut server = Server {
            kind: self.kind,
            ds_writes: self.ds_writes,
            child: None,
            base: String::new(),
            dir: tempfile::tempdir().unwrap(),
            args: self.args.clone(),
            bin: self.bin.clone(),
        };
        server.spawn();
        server
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    fn rss_mib(&self) -> f64 {
        self.status_mib("VmRSS:")
    }

    /// The part of RSS that is the process's own memory (heap, stacks), without the pages of
    /// the binary and libraries mapped from files (shared and reclaimable).
    fn anon_rss_mib(&self) -> f64 {
        self.status_mib("RssAnon:")
    }

    fn status_mib(&self, field: &str) -> f64 {
        let pid = self.child.as_ref().unwrap().id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        kib / 1024.0
    }

    /// CPU time (user + system) the server process has used so far, in seconds.
    fn cpu_seconds(&self) -> f64 {
        let pid = self.child.as_ref().unwrap().id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // Fields after the command name (which is in parentheses and may hold spaces).
        let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        ticks / 100.0 // USER_HZ is 100 on Linux
    }

    fn read_url(&self, stream: &str) -> String {
        match self.kind {
            Kind::Ours => format!("{}/ds/{stream}", self.base),
            Kind::Peer => format!("{}/{stream}", self.base),
        }
    }

    /// Makes the stream exist (the peer needs a `PUT` first; ours creates streams on write,
    /// unless it writes with the Durable Streams protocol too).
    async fn create(&self, client: &reqwest::Client, stream: &str) {
        if self.kind == Kind::Peer || self.ds_writes {
            let response = client
                .put(self.read_url(stream))
                .bearer_auth(KEY)
                .header("content-type", "application/json")
                .send()
                .await
                .expect("create stream");
            assert!(response.status().is_success(), "PUT {stream}: {}", response.status());
        }
    }

    /// Appends `values` to `stream` in one request, durably.
    async fn write(&self, client: &reqwest::Client, stream: &str, values: &[Value]) {
        let request = match self.kind {
            Kind::Ours if self.ds_writes => {
                let body =
                    if values.len() == 1 { values[0].to_string() } else { Value::Array(values.to_vec()).to_string() };
                client.post(self.read_url(stream)).bearer_auth(KEY).body(body)
            }
            Kind::Ours => {
                let items: Vec<Value> =
                    values.iter().map(|v| json!({"stream": stream, "data": v.to_string()})).collect();
                let body = if items.len() == 1 { items[0].to_string() } else { Value::Array(items).to_string() };
                client.post(format!("{}/_broadcast", self.base)).bearer_auth(KEY).body(body)
            }
            Kind::Peer => {
                let body =
                    if values.len() == 1 { values[0].to_string() } else { Value::Array(values.to_vec()).to_string() };
                client.post(self.read_url(stream)).body(body)
            }
        };
        let response = request.header("content-type", "application/json").send().await.expect("write");
        assert!(response.status().is_success(), "write: {} {:?}", response.status(), response.text().await);
    }

    /// Appends to many streams; ours does it in one request, the peer needs one per stream.
    async fn write_many(&self, client: &reqwest::Client, items: &[(String, Value)]) {
        match self.kind {
            Kind::Ours => {
                let body: Vec<Value> = items.iter().map(|(s, v)| json!({"stream": s, "data": v.to_string()})).collect();
                let response = client
                    .post(format!("{}/_broadcast", self.base))
                    .bearer_auth(KEY)
                    .header("content-type", "application/json")
                    .body(Value::Array(body).to_string())
                    .send()
                    .await
                    .unwrap();
                assert!(response.status().is_success());
            }
            Kind::Peer => {
                for (stream, value) in items {
                    self.write(client, stream, std::slice::from_ref(value)).await;
                }
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One measured figure.
#[derive(Clone, Debug)]
struct Figure {
    name: String,
    value: f64,
    unit: &'static str,
    higher_is_better: bool,
}

fn figure(name: impl Into<String>, value: f64, unit: &'static str, higher_is_better: bool) -> Figure {
    Figure { name: name.into(), value, unit, higher_is_better }
}

fn client(pool: usize) -> reqwest::Client {
    reqwest::Client::builder().pool_max_idle_per_host(pool).tcp_nodelay(true).build().unwrap()
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap()
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn message(n: u64, pad: usize) -> Value {
    json!({"n": n, "pad": "x".repeat(pad)})
}

/// Durable ingest: `conns` clients writing `batch` messages per request for `seconds`.
async fn ingest(kind: Kind, options: &Options) -> Vec<Figure> {
    let server = Arc::new(Server::start(kind, options, 10));
    let client = client(options.conns);
    for s in 0..16 {
        server.create(&client, &format!("ingest-{s}")).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(histogram()));
    let started = Instant::now();
    let cpu_before = server.cpu_seconds();
    let mut tasks = Vec::new();
    for c in 0..options.conns {
        let (client, server, stop, sent, latencies) =
            (client.clone(), server.clone(), stop.clone(), sent.clone(), latencies.clone());
        let batch = options.batch;
        tasks.push(tokio::spawn(async move {
            let stream = format!("ingest-{}", c % 16);
            let mut local = histogram();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let values: Vec<Value> = (0..batch as u64).map(|i| message(n + i, 16)).collect();
                let t = Instant::now();
                server.write(&client, &stream, &values).await;
                local.record(t.elapsed().as_micros() as u64).unwrap();
                n += batch as u64;
                sent.fetch_add(batch as u64, Ordering::Relaxed);
            }
            latencies.lock().unwrap().add(local).unwrap();
        }));
    }
    tokio::time::sleep(Duration::from_secs(options.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let sent = sent.load(Ordering::Relaxed) as f64;
    let cpu_per_message = (server.cpu_seconds() - cpu_before) / sent * 1e6;
    let h = latencies.lock().unwrap();
    let api = if options.ds_writes { " (DS POST)" } else { "" };
    let label = format!("ingest{api} conns={} batch={}", options.conns, options.batch);
    vec![
        figure(format!("{label} msgs/s"), sent / elapsed, "msg/s", true),
        figure(format!("{label} server CPU per msg"), cpu_per_message, "µs", false),
        figure(format!("{label} ack p50"), ms(h.value_at_quantile(0.5)), "ms", false),
        figure(format!("{label} ack p99"), ms(h.value_at_quantile(0.99)), "ms", false),
        figure(format!("{label} RSS"), server.rss_mib(), "MiB", false),
    ]
}

/// Catch-up: a stream of `messages` messages read from `-1` and from the middle by `conns`
/// clients for `seconds` each; clients follow `Stream-Next-Offset` until up to date.
async fn catchup(kind: Kind, options: &Options) -> Vec<Figure> {
    let server = Server::start(kind, options, 10);
    let client = client(options.conns);
    server.create(&client, "history").await;
    // Write the first half, remember the tail (the middle), write the second half.
    let mut middle = String::new();
    let mut n = 0;
    while n < options.messages {
        if n >= options.messages / 2 && middle.is_empty() {
            let head = client.head(server.read_url("history")).send().await.unwrap();
            middle = head.headers()["stream-next-offset"].to_str().unwrap().to_string();
        }
        let count = 1000.min(options.messages - n).min((options.messages / 2).max(1));
        let values: Vec<Value> = (0..count as u64).map(|i| message(n as u64 + i, 64)).collect();
        server.write(&client, "history", &values).await;
        n += count;
    }
    let mut figures = Vec::new();
    for (label, offset) in [("from -1", "-1".to_string()), ("from middle", middle)] {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..options.conns {
            let (client, url, stop, counters) =
                (client.clone(), server.read_url("history"), stop.clone(), counters.clone());
            let offset = offset.clone();
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let mut at = offset.clone();
                    loop {
                        let response = client.get(format!("{url}?offset={at}")).send().await.unwrap();
                        let up_to_date = response.headers().contains_key("stream-up-to-date");
                        at = response.headers()["stream-next-offset"].to_str().unwrap().to_string();
                        let body = response.bytes().await.unwrap();
                        counters[0].fetch_add(count_messages(&body), Ordering::Relaxed);
                        counters[1].fetch_add(body.len() as u64, Ordering::Relaxed);
                        if up_to_date {
                            break;
                        }
                    }
                    counters[2].fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(options.seconds)).await;
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            task.await.unwrap();
        }
        let elapsed = started.elapsed().as_secs_f64();
        let name = format!("catchup {} msgs {label}", options.messages);
        figures.push(figure(
            format!("{name} msgs/s"),
            counters[0].load(Ordering::Relaxed) as f64 / elapsed,
            "msg/s",
            true,
        ));
        figures.push(figure(
            format!("{name} MB/s"),
            counters[1].load(Ordering::Relaxed) as f64 / elapsed / 1e6,
            "MB/s",
            true,
        ));
        figures.push(figure(
            format!("{name} reads/s"),
            counters[2].load(Ordering::Relaxed) as f64 / elapsed,
            "read/s",
            true,
        ));
    }
    figures.push(figure(format!("catchup {} msgs RSS", options.messages), server.rss_mib(), "MiB", false));
    figures
}

/// Messages in a JSON array body of `{"n":..,"pad":..}` objects.
fn count_messages(body: &[u8]) -> u64 {
    body.windows(4).filter(|w| w == b"{\"n\"").count() as u64
}

/// Fan-out: `readers` live readers of one stream (`--mode sse` or `long-poll`); a publisher
/// sends 100 messages 50 ms apart, each carrying its send time; every reader records
/// broadcast-to-delivery latency (from just before the write request to the reader having
/// the message).
async fn fanout(kind: Kind, options: &Options, readers: usize, mode: &str) -> Vec<Figure> {
    let label = format!("fanout {mode} readers={readers}");
    let (sse, poll) = if mode == "sse" { (readers, 0) } else { (0, readers) };
    live_load(kind, options, sse, poll, 0, &label).await
}

/// `sse` SSE readers and `poll` long-poll readers of one stream, plus `idle` idle SSE
/// connections spread over other streams; a publisher sends 100 messages 50 ms apart.
async fn live_load(kind: Kind, options: &Options, sse: usize, poll: usize, idle: usize, label: &str) -> Vec<Figure> {
    let server = Server::start(kind, options, 600);
    let setup = client(1);
    server.create(&setup, "fan").await;
    let mut idle_connections = Vec::new();
    let idle_client = client(16);
    for i in 0..idle {
        let stream = format!("idle-{}", i % 1000);
        if i < 1000 {
            server.create(&setup, &stream).await;
        }
        let url = server.read_url(&stream);
        let head = idle_client.head(&url).send().await.unwrap();
        let offset = head.headers()["stream-next-offset"].to_str().unwrap().to_string();
        let response = idle_client.get(format!("{url}?offset={offset}&live=sse")).send().await.unwrap();
        assert!(response.status().is_success(), "idle connection {i}: {}", response.status());
        idle_connections.push(response.bytes_stream());
    }
    let readers = sse + poll;
    // Cross-node: readers on a second node, woken by broadcasts to the first.
    let reading_node = (options.cross_node && options.nats.is_some()).then(|| server.another_node());
    let url = reading_node.as_ref().unwrap_or(&server).read_url("fan");
    let epoch = Instant::now();
    let latencies = Arc::new(Mutex::new(histogram()));
    let received = Arc::new(AtomicU64::new(0));
    let total: u64 = 100;
    let connected = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for reader in 0..readers {
        let (url, latencies, received, connected) =
            (url.clone(), latencies.clone(), received.clone(), connected.clone());
        let sse = reader < sse;
        tasks.push(tokio::spawn(async move {
            let client = client(1);
            let mut local = histogram();
            let mut got = 0;
            let record = |messages: &[Value], local: &mut Histogram<u64>| {
                let now = epoch.elapsed().as_micros() as u64;
                for m in messages {
                    local.record(now.saturating_sub(m["t"].as_u64().unwrap()).max(1)).unwrap();
                }
                messages.len() as u64
            };
            let head = client.head(&url).send().await.unwrap();
            let mut offset = head.headers()["stream-next-offset"].to_str().unwrap().to_string();
            if sse {
                let response = client.get(format!("{url}?offset={offset}&live=sse")).send().await.unwrap();
                let mut body = response.bytes_stream();
                let mut buffer = Vec::new();
                let mut first = true;
                while got < total {
                    let Some(Ok(bytes)) = body.next().await else { break };
                    if first {
                        connected.fetch_add(1, Ordering::Relaxed);
                        first = false;
                    }
                    buffer.extend_from_slice(&bytes);
                    while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
                        let event: Vec<u8> = buffer.drain(..end + 2).collect();
                        let text = String::from_utf8_lossy(&event);
                        if text.starts_with("event: data") || text.starts_with("event:data") {
                            let data: String = text
                                .lines()
                                .filter_map(|l| l.strip_prefix("data:"))
                                .map(|l| l.strip_prefix(' ').unwrap_or(l))
                                .collect::<Vec<_>>()
                                .join("\n");
                            let value: Value = serde_json::from_str(&data).unwrap();
                            let messages = match value {
                                Value::Array(items) => items,
                                other => vec![other],
                            };
                            got += record(&messages, &mut local);
                        }
                    }
                }
            } else {
                let mut first = true;
                while got < total {
                    let request = client.get(format!("{url}?offset={offset}&live=long-poll")).send();
                    if first {
                        connected.fetch_add(1, Ordering::Relaxed);
                        first = false;
                    }
                    let response = request.await.unwrap();
                    offset = response.headers()["stream-next-offset"].to_str().unwrap().to_string();
                    if response.status() == 200 {
                        let messages: Vec<Value> = response.json().await.unwrap();
                        got += record(&messages, &mut local);
                    }
                }
            }
            received.fetch_add(got, Ordering::Relaxed);
            latencies.lock().unwrap().add(local).unwrap();
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while connected.load(Ordering::Relaxed) < readers as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the last connections reach their wait.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = server.rss_mib();
    let cpu_before = server.cpu_seconds();
    for n in 0..total {
        let t = epoch.elapsed().as_micros() as u64;
        server.write(&setup, "fan", &[json!({"n": n, "t": t})]).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if tokio::time::timeout(Duration::from_secs(60), futures_util::future::join_all(tasks)).await.is_err() {
        eprintln!("{}: some readers did not get every message", kind.name());
    }
    // Server CPU from the first broadcast until every reader has every message, per message
    // delivered to one reader (includes the broadcasts and, for long-poll, the re-polls).
    let cpu_per_delivery = (server.cpu_seconds() - cpu_before) / (total * readers as u64) as f64 * 1e6;
    let h = latencies.lock().unwrap();
    let delivered = received.load(Ordering::Relaxed) as f64 / (total * readers as u64) as f64 * 100.0;
    drop(idle_connections);
    vec![
        figure(format!("{label} delivered"), delivered, "%", true),
        figure(format!("{label} p50"), ms(h.value_at_quantile(0.5)), "ms", false),
        figure(format!("{label} p99"), ms(h.value_at_quantile(0.99)), "ms", false),
        figure(format!("{label} server CPU per delivery"), cpu_per_delivery, "µs", false),
        figure(format!("{label} RSS"), rss, "MiB", false),
    ]
}

/// Many streams: `streams` streams with 10 messages each, then `conns` clients doing a 50/50
/// mix of catch-up reads and single-message writes on random streams for `seconds`.
async fn streams(kind: Kind, options: &Options) -> Vec<Figure> {
    let server = Arc::new(Server::start(kind, options, 10));
    let client = client(options.conns);
    let started = Instant::now();
    for chunk in (0..options.streams).collect::<Vec<_>>().chunks(100) {
        let mut items = Vec::new();
        for &s in chunk {
            server.create(&client, &format!("many-{s}")).await;
            for n in 0..10 {
                items.push((format!("many-{s}"), message(n, 16)));
            }
        }
        server.write_many(&client, &items).await;
    }
    let fill = started.elapsed().as_secs_f64();
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..options.conns {
        let (client, server, stop, ops) = (client.clone(), server.clone(), stop.clone(), ops.clone());
        let count = options.streams as u64;
        tasks.push(tokio::spawn(async move {
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ c as u64;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let stream = format!("many-{}", x % count);
                if x & 1 == 0 {
                    let response = client.get(format!("{}?offset=-1", server.read_url(&stream))).send().await.unwrap();
                    assert!(response.status().is_success());
                    let _ = response.bytes().await.unwrap();
                } else {
                    server.write(&client, &stream, &[message(x, 16)]).await;
                }
                ops.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(options.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let label = format!("streams {} x 10 msgs", options.streams);
    vec![
        figure(format!("{label} fill msgs/s"), (options.streams * 10) as f64 / fill, "msg/s", true),
        figure(
            format!("{label} mixed ops/s conns={}", options.conns),
            ops.load(Ordering::Relaxed) as f64 / elapsed,
            "op/s",
            true,
        ),
        figure(format!("{label} RSS"), server.rss_mib(), "MiB", false),
    ]
}

/// Restart to ready with `messages` messages stored (in 100 streams), and RSS at rest.
async fn restart(kind: Kind, options: &Options) -> Vec<Figure> {
    let mut server = Server::start(kind, options, 10);
    let client = client(8);
    for s in 0..100 {
        server.create(&client, &format!("r-{s}")).await;
    }
    let per_stream = options.messages / 100;
    let fill = Arc::new(AtomicU64::new(0));
    let server_ref = &server;
    futures_util::stream::iter(0..100)
        .for_each_concurrent(8, |s| {
            let (client, fill) = (client.clone(), fill.clone());
            async move {
                let mut n = 0;
                while n < per_stream {
                    let count = 1000.min(per_stream - n);
                    let values: Vec<Value> = (0..count as u64).map(|i| message((n + i as usize) as u64, 32)).collect();
                    server_ref.write(&client, &format!("r-{s}"), &values).await;
                    n += count;
                    fill.fetch_add(count as u64, Ordering::Relaxed);
                }
            }
        })
        .await;
    server.stop();
    let ready = server.spawn();
    // Ready means serving reads: a HEAD of a stream answers.
    let started = Instant::now();
    let head = client.head(server.read_url("r-0")).send().await.unwrap();
    assert!(head.status().is_success());
    let first_read = ready + started.elapsed();
    let (rss, anon) = (server.rss_mib(), server.anon_rss_mib());
    vec![
        figure(
            format!("restart with {} msgs: ready", options.messages),
            first_read.as_secs_f64() * 1000.0,
            "ms",
            false,
        ),
        figure(format!("restart with {} msgs: RSS at rest", options.messages), rss, "MiB", false),
        figure(format!("restart with {} msgs: anonymous RSS at rest", options.messages), anon, "MiB", false),
    ]
}

/// Idle SSE connections on distinct streams: RSS before and after, bytes per connection.
async fn idle(kind: Kind, options: &Options) -> Vec<Figure> {
    let server = Server::start(kind, options, 600);
    let setup = client(4);
    let count = options.connections;
    for i in 0..count.min(100) {
        server.create(&setup, &format!("idle-{i}")).await;
    }
    // Warm up workers and allocator.
    for i in 0..50 {
        let _ =
            setup.get(format!("{}?offset=-1", server.read_url(&format!("idle-{}", i % count.min(100))))).send().await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = server.rss_mib();
    let mut open = Vec::new();
    for i in 0..count {
        let client = client(1);
        let url = server.read_url(&format!("idle-{}", i % count.min(100)));
        let head = client.head(&url).send().await.unwrap();
        let offset = head.headers()["stream-next-offset"].to_str().unwrap().to_string();
        let response = client.get(format!("{url}?offset={offset}&live=sse")).send().await.unwrap();
        let mut body = response.bytes_stream();
        let _first = tokio::time::timeout(Duration::from_secs(5), body.next()).await;
        open.push((client, body));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = server.rss_mib();
    drop(open);
    vec![
        figure(format!("idle sse x{count} RSS"), after, "MiB", false),
        figure("idle sse bytes per connection", (after - before).max(0.0) * 1024.0 * 1024.0 / count as f64, "B", false),
    ]
}

async fn run(kind: Kind, options: &Options, workload: &str) -> Vec<Figure> {
    match workload {
        "ingest" => ingest(kind, options).await,
        "catchup" => catchup(kind, options).await,
        "fanout" => fanout(kind, options, options.readers, &options.mode).await,
        "load" => {
            let (sse, poll, idle) = (options.readers, options.readers, options.connections);
            let label = format!("load sse={sse} long-poll={poll} idle={idle}");
            live_load(kind, options, sse, poll, idle, &label).await
        }
        "streams" => streams(kind, options).await,
        "restart" => restart(kind, options).await,
        "idle" => idle(kind, options).await,
        other => panic!("unknown workload {other}"),
    }
}

/// Every workload of issue 7, at its sizes.
async fn all(kind: Kind, options: &Options) -> Vec<Figure> {
    let mut figures = Vec::new();
    for (conns, batch) in [(1, 1), (32, 1), (128, 1), (32, 100)] {
        let o = Options { conns, batch, ..options.clone() };
        figures.extend(ingest(kind, &o).await);
    }
    for messages in [10_000, 1_000_000] {
        let o = Options { messages, conns: 4, ..options.clone() };
        figures.extend(catchup(kind, &o).await);
    }
    for (readers, mode) in [(1, "sse"), (100, "sse"), (1000, "sse"), (1000, "long-poll")] {
        figures.extend(fanout(kind, options, readers, mode).await);
    }
    figures.extend(streams(kind, &Options { streams: 10_000, conns: 32, ..options.clone() }).await);
    figures.extend(restart(kind, &Options { messages: 1_000_000, ..options.clone() }).await);
    figures.extend(idle(kind, &Options { connections: 5_000, ..options.clone() }).await);
    figures
}

fn print(kind: Kind, figures: &[Figure]) {
    for f in figures {
        println!("RESULT {} | {} = {:.2} {}", kind.name(), f.name, f.value, f.unit);
    }
}

/// Ours / peer, oriented so that > 1 means anycable-ds is better.
fn ratio(ours: &Figure, peer: &Figure) -> f64 {
    if ours.higher_is_better {
        ours.value / peer.value
    } else {
        peer.value / ours.value
    }
}

fn print_table(ours: &[Figure], peer: &[Figure]) {
    println!();
    println!("| workload | anycable-ds | durable-streams | ratio (>1: anycable-ds better) |");
    println!("|---|---|---|---|");
    for o in ours {
        if let Some(p) = peer.iter().find(|p| p.name == o.name) {
            println!("| {} | {:.2} {} | {:.2} {} | {:.2} |", o.name, o.value, o.unit, p.value, p.unit, ratio(o, p));
        }
    }
}

/// Delivery latency (p50 and p99) against the number of SSE readers, both servers.
/// (readers, p50 ms, p99 ms) per server.
type LatencySeries = Vec<(Kind, Vec<(usize, f64, f64)>)>;

fn plot(path: &str, series: &LatencySeries) {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).unwrap();
    let max_latency = series.iter().flat_map(|(_, points)| points.iter().map(|p| p.2)).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption("SSE broadcast-to-delivery latency vs readers (one stream)", ("sans-serif", 20))
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((1f64..1000f64).log_scale(), 0f64..max_latency)
        .unwrap();
    chart.configure_mesh().x_desc("SSE readers").y_desc("latency (ms)").draw().unwrap();
    let colors = [(Kind::Ours, BLUE), (Kind::Peer, RED)];
    for (kind, points) in series {
        let color = colors.iter().find(|(k, _)| k == kind).map(|(_, c)| *c).unwrap_or(BLACK);
        for (quantile, index, style) in [("p50", 1, color.stroke_width(2)), ("p99", 2, color.stroke_width(1))] {
            let line: Vec<(f64, f64)> =
                points.iter().map(|p| (p.0 as f64, if index == 1 { p.1 } else { p.2 })).collect();
            chart
                .draw_series(LineSeries::new(line.clone(), style))
                .unwrap()
                .label(format!("{} {quantile}", kind.name()))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            chart.draw_series(line.iter().map(|&(x, y)| Circle::new((x, y), 3, color.filled()))).unwrap();
        }
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().unwrap();
    root.present().unwrap();
}

fn latency_points(figures: &[Figure]) -> Vec<(usize, f64, f64)> {
    [1usize, 100, 1000]
        .iter()
        .filter_map(|&readers| {
            let find = |q: &str| {
                figures.iter().find(|f| f.name == format!("fanout sse readers={readers} {q}")).map(|f| f.value)
            };
            Some((readers, find("p50")?, find("p99")?))
        })
        .collect()
}

fn main() {
    let options = parse_options();
    if options.workload.is_empty() {
        eprintln!("usage: ds_bench ingest|catchup|fanout|streams|restart|idle|all [--target ours|peer|both] ...");
        std::process::exit(2);
    }
    let kinds: Vec<Kind> = match options.target.as_str() {
        "ours" => vec![Kind::Ours],
        "peer" => vec![Kind::Peer],
        "both" => vec![Kind::Ours, Kind::Peer],
        other => panic!("unknown target {other}"),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut results = Vec::new();
    for kind in kinds {
        let figures = runtime.block_on(async {
            if options.workload == "all" {
                all(kind, &options).await
            } else {
                run(kind, &options, &options.workload).await
            }
        });
        print(kind, &figures);
        results.push((kind, figures));
    }
    if let [(_, ours), (_, peer)] = &results[..] {
        print_table(ours, peer);
    }
    if let Some(path) = &options.plot {
        let series: LatencySeries = results.iter().map(|(kind, figures)| (*kind, latency_points(figures))).collect();
        plot(path, &series);
        println!("plot written to {path}");
    }
}
