//! ds-bench: load and latency measurements against a real anycable-ds process.
//!
//! It starts the release binary itself (temporary data directory, free port), runs one
//! workload, prints the figures, and stops the server. Run with:
//!
//! ```sh
//! cargo bench --bench ds_bench -- ingest --conns 32
//! cargo bench --bench ds_bench -- ingest --conns 32 --batch 100
//! cargo bench --bench ds_bench -- catchup --messages 10000 --conns 4
//! cargo bench --bench ds_bench -- fanout --readers 1000 --mode sse
//! cargo bench --bench ds_bench -- idle --connections 5000
//! ```
//!
//! `cargo bench` builds in release mode; the server binary is `target/release/anycable-ds`
//! (override with `--server-bin PATH`). Figures go to stdout, one `RESULT` line each, so a
//! script can collect them.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

const KEY: &str = "bench-key";

struct Options {
    workload: String,
    conns: usize,
    batch: usize,
    messages: usize,
    readers: usize,
    mode: String,
    seconds: u64,
    connections: usize,
    server_bin: String,
    fsync: bool,
}

fn parse_options() -> Options {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let mut options = Options {
        workload: String::new(),
        conns: 32,
        batch: 1,
        messages: 10_000,
        readers: 100,
        mode: "sse".into(),
        seconds: 10,
        connections: 1000,
        server_bin: concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/anycable-ds").into(),
        fsync: true,
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--conns" => options.conns = value().parse().unwrap(),
            "--batch" => options.batch = value().parse().unwrap(),
            "--messages" => options.messages = value().parse().unwrap(),
            "--readers" => options.readers = value().parse().unwrap(),
            "--mode" => options.mode = value(),
            "--seconds" => options.seconds = value().parse().unwrap(),
            "--connections" => options.connections = value().parse().unwrap(),
            "--server-bin" => options.server_bin = value(),
            "--no-fsync" => options.fsync = false,
            workload if !workload.starts_with("--") && options.workload.is_empty() => {
                options.workload = workload.into()
            }
            other => panic!("unknown argument {other}"),
        }
    }
    options
}

/// The server under test, killed on drop.
struct Server {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(options: &Options, extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut command = Command::new(&options.server_bin);
        command
            .current_dir(dir.path())
            .args(["--port", "0", "--broadcast_key", KEY, "--public_streams", "--history_limit", "0"])
            .args(["--history_ttl", "0", "--log_level", "info"])
            .args(["--storage_fsync", if options.fsync { "true" } else { "false" }])
            .arg("--data_dir")
            .arg(dir.path().join("data"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().unwrap_or_else(|e| panic!("start {}: {e}", options.server_bin));
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("Listening on http://").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        let base = rx.recv_timeout(Duration::from_secs(30)).expect("server ready");
        Server { child, base, _dir: dir }
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client(pool: usize) -> reqwest::Client {
    reqwest::Client::builder().pool_max_idle_per_host(pool).tcp_nodelay(true).build().unwrap()
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).unwrap()
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

fn result(name: &str, value: impl std::fmt::Display) {
    println!("RESULT {name} = {value}");
}

async fn post(client: &reqwest::Client, base: &str, body: String) {
    let response = client
        .post(format!("{base}/_broadcast"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("broadcast");
    assert_eq!(response.status(), 201, "{:?}", response.text().await);
}

fn batch_body(stream: &str, first: u64, count: usize, pad: usize) -> String {
    let items: Vec<Value> = (0..count as u64)
        .map(|i| json!({"stream": stream, "data": json!({"n": first + i, "pad": "x".repeat(pad)}).to_string()}))
        .collect();
    if count == 1 {
        items[0].to_string()
    } else {
        Value::Array(items).to_string()
    }
}

/// Durable ingest: `conns` clients posting `batch` messages per request for `seconds`.
async fn ingest(options: &Options) {
    let server = Server::start(options, &[]);
    let client = client(options.conns);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(histogram()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..options.conns {
        let (client, base, stop, sent, latencies) =
            (client.clone(), server.base.clone(), stop.clone(), sent.clone(), latencies.clone());
        let batch = options.batch;
        tasks.push(tokio::spawn(async move {
            let stream = format!("ingest-{}", c % 16);
            let mut local = histogram();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let body = batch_body(&stream, n, batch, 16);
                let t = Instant::now();
                post(&client, &format!("http://{base}"), body).await;
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
    let h = latencies.lock().unwrap();
    let label = format!("ingest conns={} batch={} fsync={}", options.conns, options.batch, options.fsync);
    result(&format!("{label} msgs/s"), format!("{:.0}", sent.load(Ordering::Relaxed) as f64 / elapsed));
    result(&format!("{label} requests/s"), format!("{:.0}", h.len() as f64 / elapsed));
    result(&format!("{label} ack p50"), ms(h.value_at_quantile(0.5)));
    result(&format!("{label} ack p99"), ms(h.value_at_quantile(0.99)));
    result(&format!("{label} server RSS"), format!("{} MiB", server.rss_kib() / 1024));
}

/// Catch-up: a stream of `messages` messages read whole from `-1` (and from the middle) by
/// `conns` clients for `seconds`.
async fn catchup(options: &Options) {
    let server = Server::start(options, &[]);
    let base = format!("http://{}", server.base);
    let client = client(options.conns);
    let mut n = 0;
    while n < options.messages {
        let count = 1000.min(options.messages - n);
        post(&client, &base, batch_body("history", n as u64, count, 64)).await;
        n += count;
    }
    let middle_token = {
        let head = client.head(format!("{base}/ds/history")).send().await.unwrap();
        let tail = head.headers()["stream-next-offset"].to_str().unwrap().to_string();
        let (epoch, seq) = tail.split_once('_').unwrap();
        format!("{epoch}_{:020}", seq.parse::<u64>().unwrap() / 2)
    };
    for (label, offset) in [("from -1", "-1".to_string()), ("from middle", middle_token)] {
        let stop = Arc::new(AtomicBool::new(false));
        let (messages, bytes, requests) =
            (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..options.conns {
            let (client, url, stop) = (client.clone(), format!("{base}/ds/history?offset={offset}"), stop.clone());
            let (messages, bytes, requests) = (messages.clone(), bytes.clone(), requests.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let response = client.get(&url).send().await.unwrap();
                    assert!(response.headers().contains_key("stream-up-to-date"), "whole stream in one chunk");
                    let body = response.bytes().await.unwrap();
                    let count = bytecount_messages(&body);
                    messages.fetch_add(count, Ordering::Relaxed);
                    bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                    requests.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(options.seconds)).await;
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            task.await.unwrap();
        }
        let elapsed = started.elapsed().as_secs_f64();
        let name = format!("catchup {}msgs {label} conns={}", options.messages, options.conns);
        result(&format!("{name} msgs/s"), format!("{:.0}", messages.load(Ordering::Relaxed) as f64 / elapsed));
        result(&format!("{name} MB/s"), format!("{:.1}", bytes.load(Ordering::Relaxed) as f64 / elapsed / 1e6));
        result(&format!("{name} requests/s"), format!("{:.0}", requests.load(Ordering::Relaxed) as f64 / elapsed));
    }
    result(&format!("catchup {}msgs server RSS", options.messages), format!("{} MiB", server.rss_kib() / 1024));
}

/// Messages in a JSON array body of `{"n":..,"pad":..}` objects.
fn bytecount_messages(body: &[u8]) -> u64 {
    body.windows(4).filter(|w| w == b"{\"n\"").count() as u64
}

/// Fan-out: `readers` live readers of one stream (`--mode sse` or `long-poll`); a publisher
/// sends `messages` messages 50 ms apart, each carrying its send time; every reader records
/// broadcast-to-delivery latency (from just before the POST to the reader having the message).
async fn fanout(options: &Options) {
    let server = Server::start(options, &["--ds_poll_interval", "30", "--ds_sse_ttl", "600"]);
    let base = format!("http://{}", server.base);
    let epoch = Instant::now();
    let latencies = Arc::new(Mutex::new(histogram()));
    let received = Arc::new(AtomicU64::new(0));
    let total = options.messages.min(200) as u64;
    let mut readers = Vec::new();
    let connected = Arc::new(AtomicU64::new(0));
    for _ in 0..options.readers {
        let (base, latencies, received, connected) =
            (base.clone(), latencies.clone(), received.clone(), connected.clone());
        let sse = options.mode == "sse";
        readers.push(tokio::spawn(async move {
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
            if sse {
                let response = client.get(format!("{base}/ds/fan?offset=now&live=sse")).send().await.unwrap();
                let mut body = response.bytes_stream();
                let mut buffer = Vec::new();
                let mut first = true;
                while got < total {
                    let Some(Ok(bytes)) = body.next().await else {
                        break;
                    };
                    if first {
                        connected.fetch_add(1, Ordering::Relaxed);
                        first = false;
                    }
                    buffer.extend_from_slice(&bytes);
                    while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
                        let event: Vec<u8> = buffer.drain(..end + 2).collect();
                        if let Some(data) = event.strip_prefix(b"event: data\ndata: ") {
                            let messages: Vec<Value> = serde_json::from_slice(&data[..data.len() - 2]).unwrap();
                            got += record(&messages, &mut local);
                        }
                    }
                }
            } else {
                let head = client.head(format!("{base}/ds/fan")).send().await.unwrap();
                let mut offset = head.headers()["stream-next-offset"].to_str().unwrap().to_string();
                let mut first = true;
                while got < total {
                    let request = client.get(format!("{base}/ds/fan?offset={offset}&live=long-poll")).send();
                    if first {
                        // Counted once the first poll is on its way; the publisher waits a bit more.
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
    // Wait until every reader is connected (SSE: first control event seen).
    let deadline = Instant::now() + Duration::from_secs(60);
    while connected.load(Ordering::Relaxed) < options.readers as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_connected = server.rss_kib();
    let publisher = client(1);
    for n in 0..total {
        let t = epoch.elapsed().as_micros() as u64;
        let body = json!({"stream": "fan", "data": json!({"n": n, "t": t}).to_string()}).to_string();
        post(&publisher, &base, body).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all = futures_util::future::join_all(readers);
    if tokio::time::timeout(Duration::from_secs(60), all).await.is_err() {
        eprintln!("some readers did not get every message");
    }
    let h = latencies.lock().unwrap();
    let label = format!("fanout {} readers={}", options.mode, options.readers);
    result(
        &format!("{label} delivered"),
        format!("{} of {}", received.load(Ordering::Relaxed), total * options.readers as u64),
    );
    result(&format!("{label} p50"), ms(h.value_at_quantile(0.5)));
    result(&format!("{label} p99"), ms(h.value_at_quantile(0.99)));
    result(&format!("{label} server RSS connected"), format!("{} MiB", rss_connected / 1024));
}

/// Memory per idle SSE connection: RSS before and after opening `connections` SSE responses
/// on distinct streams.
async fn idle(options: &Options) {
    let server = Server::start(options, &["--ds_sse_ttl", "600"]);
    let base = format!("http://{}", server.base);
    // Warm up the workers and allocator with a few requests first.
    let warm = client(4);
    for i in 0..50 {
        warm.get(format!("{base}/ds/warm{i}?offset=-1")).send().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = server.rss_kib();
    let mut open = Vec::new();
    for i in 0..options.connections {
        let client = client(1);
        let response = client.get(format!("{base}/ds/idle-{i}?offset=now&live=sse")).send().await.unwrap();
        let mut body = response.bytes_stream();
        let _first = body.next().await; // the upToDate control event
        open.push((client, body));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = server.rss_kib();
    let per = (after.saturating_sub(before)) as f64 * 1024.0 / options.connections as f64;
    result(
        &format!("idle sse connections={}", options.connections),
        format!("RSS {} -> {} MiB", before / 1024, after / 1024),
    );
    result("idle sse bytes per connection", format!("{per:.0}"));
    drop(open);
}

fn main() {
    let options = parse_options();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        match options.workload.as_str() {
            "ingest" => ingest(&options).await,
            "catchup" => catchup(&options).await,
            "fanout" => fanout(&options).await,
            "idle" => idle(&options).await,
            "" => eprintln!("usage: ds_bench ingest|catchup|fanout|idle [options]; see the file header"),
            other => panic!("unknown workload {other}"),
        }
    });
}
