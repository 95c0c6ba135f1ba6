//! rpc-bench: what authenticating readers through the application (HTTP RPC) costs.
//!
//! ```text
//! cargo bench --bench rpc_bench -- latency                      # open vs RPC vs RPC + cache
//! cargo bench --bench rpc_bench -- latency --conns 32 --requests 20000
//! cargo bench --bench rpc_bench -- reconnects --readers 1000 --seconds 180
//! cargo bench --bench rpc_bench -- reconnects --readers 1000 --seconds 180 --cache-ttl 300
//! cargo bench --bench rpc_bench -- latency --app-url http://127.0.0.1:3000/_anycable --rpc-secret S  # your app
//! ```
//!
//! The application is, unless `--app-url` names another, an in-process stand-in (actix-web on
//! its own thread) whose `connect` answers SUCCESS at once: the figures are what anycable-ds
//! and the RPC round trip add, not what a real application's `connect` costs on top (a Rails
//! session lookup, say). Each run starts the release binary on a free port with a temporary
//! data directory.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hdrhistogram::Histogram;

const KEY: &str = "bench-key";

struct Options {
    workload: String,
    requests: usize,
    conns: usize,
    readers: usize,
    seconds: u64,
    cache_ttl: u64,
    sse_ttl: u64,
    app_url: Option<String>,
    rpc_secret: Option<String>,
    bin: String,
}

fn parse_options() -> Options {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let mut options = Options {
        workload: String::new(),
        requests: 5000,
        conns: 1,
        readers: 1000,
        seconds: 180,
        cache_ttl: 0,
        sse_ttl: 60,
        app_url: None,
        rpc_secret: None,
        bin: concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/anycable-ds").into(),
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--requests" => options.requests = value().parse().unwrap(),
            "--conns" => options.conns = value().parse().unwrap(),
            "--readers" => options.readers = value().parse().unwrap(),
            "--seconds" => options.seconds = value().parse().unwrap(),
            "--cache-ttl" => options.cache_ttl = value().parse().unwrap(),
            "--sse-ttl" => options.sse_ttl = value().parse().unwrap(),
            "--app-url" => options.app_url = Some(value()),
            "--rpc-secret" => options.rpc_secret = Some(value()),
            "--server-bin" => options.bin = value(),
            workload if !workload.starts_with("--") && options.workload.is_empty() => {
                options.workload = workload.into()
            }
            other => panic!("unknown argument {other}"),
        }
    }
    options
}

fn main() {
    let options = parse_options();
    actix_web::rt::System::new().block_on(async move {
        match options.workload.as_str() {
            "latency" => latency(&options).await,
            "reconnects" => reconnects(&options).await,
            other => panic!("unknown workload {other:?}: latency or reconnects"),
        }
    });
}

/// The stand-in application: SUCCESS for every `connect`, with the time of each call.
struct App {
    url: String,
    calls: Arc<Mutex<Vec<Instant>>>,
}

impl App {
    fn start() -> App {
        use actix_web::{web, HttpResponse, HttpServer};
        let calls = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let recorded = calls.clone();
        std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let server = HttpServer::new(move || {
                    let recorded = recorded.clone();
                    actix_web::App::new().default_service(web::to(move |_body: web::Bytes| {
                        recorded.lock().unwrap().push(Instant::now());
                        async {
                            HttpResponse::Ok().json(serde_json::json!({
                                "status": 1, "identifiers": "{\"user_id\":1}", "transmissions": []
                            }))
                        }
                    }))
                })
                .workers(1)
                .bind(("127.0.0.1", 0))
                .unwrap();
                let addr = server.addrs()[0];
                tx.send(addr).unwrap();
                let _ = server.disable_signals().run().await;
            })
        });
        let addr = rx.recv().unwrap();
        App { url: format!("http://{addr}/_anycable"), calls }
    }

    fn count(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
}

struct Server {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(bin: &str, extra: &[String]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(bin)
            .current_dir(dir.path())
            .args(["--port", "0", "--broadcast_key", KEY, "--public_streams", "--log_level", "warn"])
            .arg("--data_dir")
            .arg(dir.path().join("data"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {bin}: {e} (cargo build --release first)"));
        // The "Listening on" line is at info level: ask for it by pid instead.
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || for _ in BufReader::new(stderr).lines() {});
        let pid = child.id();
        let base = wait_for_port(pid);
        Server { child, base, _dir: dir }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The server's listening address, from /proc (it logs at warn level here).
fn wait_for_port(pid: u32) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(port) = listening_port(pid) {
            let base = format!("http://127.0.0.1:{port}");
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return base;
            }
        }
        assert!(Instant::now() < deadline, "server {pid} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn listening_port(pid: u32) -> Option<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_string))
        .collect();
    let tcp = std::fs::read_to_string("/proc/net/tcp").ok()?;
    tcp.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // state 0A = LISTEN
        (f.get(3) == Some(&"0A") && inodes.iter().any(|i| Some(&i.as_str()) == f.get(9)))
            .then(|| u16::from_str_radix(f[1].rsplit(':').next()?, 16).ok())
            .flatten()
    })
}

async fn publish(client: &reqwest::Client, server: &Server, stream: &str) {
    let body = serde_json::json!({"stream": stream, "data": "{\"hello\":1}"}).to_string();
    let response = client.post(server.url("/_broadcast")).bearer_auth(KEY).body(body).send().await.unwrap();
    assert!(response.status().is_success());
}

fn client(pool: usize) -> reqwest::Client {
    reqwest::Client::builder().pool_max_idle_per_host(pool).tcp_nodelay(true).build().unwrap()
}

/// Long-polls that answer at once (a message is there), sequentially (`--conns 1`) or from
/// `--conns` clients: open, with RPC, with RPC and the cache. Client `c` sends the cookie
/// `session=reader-{c}`.
async fn latency(options: &Options) {
    let app = App::start();
    let app_url = options.app_url.clone().unwrap_or_else(|| app.url.clone());
    let mut rpc = vec!["--rpc_host".to_string(), app_url];
    if let Some(secret) = &options.rpc_secret {
        rpc.extend(["--http_rpc_secret".into(), secret.clone()]);
    }
    let cached = [rpc.clone(), vec!["--rpc_cache_ttl".into(), "60".into()]].concat();
    let setups: [(&str, Vec<String>); 3] =
        [("open (no authentication)", vec![]), ("RPC", rpc), ("RPC + cache 60 s", cached)];
    println!("long-polls answered at once, {} requests, {} connection(s)", options.requests, options.conns);
    println!(
        "{:<26} {:>9} {:>9} {:>9} {:>9} {:>11} {:>10}",
        "setup", "p50 ms", "p90 ms", "p99 ms", "mean ms", "req/s", "app calls"
    );
    for (label, extra) in setups {
        let server = Server::start(&options.bin, &extra);
        let http = client(options.conns);
        publish(&http, &server, "bench").await;
        let url = server.url("/ds/bench?offset=-1&live=long-poll");
        let histogram = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap()));
        let before = app.count();
        let next = Arc::new(AtomicU64::new(0));
        let warmup = 200.min(options.requests as u64);
        let total = options.requests as u64 + warmup;
        let started = Arc::new(Mutex::new(None::<Instant>));
        let workers = (0..options.conns).map(|c| {
            let (http, url, next, histogram, started) =
                (http.clone(), url.clone(), next.clone(), histogram.clone(), started.clone());
            let cookie = format!("session=reader-{c}");
            async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= total {
                        break;
                    }
                    if i == warmup {
                        *started.lock().unwrap() = Some(Instant::now());
                    }
                    let t = Instant::now();
                    let response = http.get(&url).header("cookie", &cookie).send().await.unwrap();
                    assert_eq!(response.status(), 200);
                    let _ = response.bytes().await.unwrap();
                    if i >= warmup {
                        histogram.lock().unwrap().record(t.elapsed().as_micros().max(1) as u64).unwrap();
                    }
                }
            }
        });
        futures_util::future::join_all(workers).await;
        let elapsed = started.lock().unwrap().map_or(Duration::ZERO, |s| s.elapsed());
        let h = histogram.lock().unwrap();
        let ms = |us: u64| us as f64 / 1000.0;
        println!(
            "{:<26} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>11.0} {:>10}",
            label,
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.9)),
            ms(h.value_at_quantile(0.99)),
            h.mean() / 1000.0,
            options.requests as f64 / elapsed.as_secs_f64(),
            if options.app_url.is_some() { "-".to_string() } else { (app.count() - before).to_string() }
        );
    }
}

/// `--readers` SSE readers, each with its own session cookie, that reconnect whenever the
/// server ends their response (every `--sse-ttl` seconds), for `--seconds`: how many calls
/// reach the application per minute.
async fn reconnects(options: &Options) {
    let app = App::start();
    let mut extra = vec![
        "--rpc_host".to_string(),
        app.url.clone(),
        "--ds_sse_ttl".into(),
        options.sse_ttl.to_string(),
        "--rpc_cache_ttl".into(),
        options.cache_ttl.to_string(),
    ];
    extra.extend(["--ds_max_live_readers".into(), "0".into()]);
    let server = Server::start(&options.bin, &extra);
    let http = client(options.readers + 8);
    publish(&http, &server, "bench").await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(options.seconds);
    let connects = Arc::new(AtomicU64::new(0));
    let readers = (0..options.readers).map(|r| {
        let (http, url, connects) = (http.clone(), server.url("/ds/bench?offset=-1&live=sse"), connects.clone());
        // Readers arrive over the first 5 s, as real ones do not all come at once.
        let arrival = Duration::from_millis(5000 * r as u64 / options.readers.max(1) as u64);
        async move {
            actix_web::rt::time::sleep(arrival).await;
            while Instant::now() < deadline {
                connects.fetch_add(1, Ordering::Relaxed);
                let Ok(response) = http.get(&url).header("cookie", format!("session=reader-{r}")).send().await else {
                    continue;
                };
                assert_eq!(response.status(), 200, "reader {r}");
                let mut body = response.bytes_stream();
                let remaining = deadline.saturating_duration_since(Instant::now());
                let _ = actix_web::rt::time::timeout(remaining, async { while body.next().await.is_some() {} }).await;
            }
        }
    });
    futures_util::future::join_all(readers).await;
    let calls = app.calls.lock().unwrap().clone();
    let minutes = options.seconds.div_ceil(60) as usize;
    let mut per_minute = vec![0usize; minutes];
    for call in &calls {
        let minute = (call.duration_since(started).as_secs() / 60) as usize;
        if minute < minutes {
            per_minute[minute] += 1;
        }
    }
    println!(
        "{} SSE readers, ds.sse_ttl {} s, rpc.cache_ttl {} s, {} s: {} connects, {} RPC calls",
        options.readers,
        options.sse_ttl,
        options.cache_ttl,
        options.seconds,
        connects.load(Ordering::Relaxed),
        calls.len()
    );
    for (minute, count) in per_minute.iter().enumerate() {
        println!("  minute {}: {count} calls", minute + 1);
    }
    println!("  mean: {:.0} calls per minute", calls.len() as f64 * 60.0 / options.seconds as f64);
}
