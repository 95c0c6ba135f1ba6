//! cluster-bench: figures only a cluster has. Starts its own three nats-server processes
//! (tests/common/nats.rs) and one anycable-ds node in cluster mode.
//!
//! ```text
//! cargo bench --bench cluster_bench -- streams --streams 100000   # memory per node and NATS server
//! cargo bench --bench cluster_bench -- rejoin                     # a killed NATS server rejoins
//! cargo bench --bench cluster_bench -- sync                       # cost of sync_interval: always
//! ```

#[path = "../tests/common/nats.rs"]
mod nats;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

const KEY: &str = "bench-key";

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

struct Node {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(cluster: &nats::NatsCluster, extra: &[&str]) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/anycable-ds"))
            .current_dir(dir.path())
            .args(["--port", "0", "--broadcast_key", KEY, "--public_streams", "--broker", "nats", "--nats_servers"])
            .arg(cluster.urls())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cargo build --release first");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("Listening on http://").nth(1) {
                    let _ = tx.send(rest.trim().to_string());
                }
            }
        });
        let base = format!("http://{}", rx.recv_timeout(Duration::from_secs(60)).expect("node ready"));
        Node { child, base, _dir: dir }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn memory(label: &str, cluster: &nats::NatsCluster, node: &Node) {
    let servers: Vec<String> =
        (0..3).filter_map(|i| cluster.pid(i)).map(|pid| format!("{:.0}", rss_mib(pid))).collect();
    println!("{label}: anycable-ds node {:.1} MiB; NATS servers {} MiB", rss_mib(node.child.id()), servers.join(" / "));
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let workload = args.first().cloned().unwrap_or_default();
    let streams: usize = args.iter().position(|a| a == "--streams").map_or(100_000, |i| args[i + 1].parse().unwrap());
    actix_web::rt::System::new().block_on(async move {
        match workload.as_str() {
            "streams" => many_streams(streams).await,
            "rejoin" => rejoin().await,
            "sync" => sync_cost().await,
            other => panic!("unknown workload {other:?}: streams or rejoin"),
        }
    });
}

/// `streams` distinct streams, one message each (in atomic batches of 1000), then each read
/// back once by 32 clients.
async fn many_streams(streams: usize) {
    let cluster = nats::NatsCluster::start();
    let node = Node::start(&cluster, &["--history_limit", "0", "--history_ttl", "0"]);
    let http = reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap();
    memory("empty", &cluster, &node);
    let started = Instant::now();
    for first in (0..streams).step_by(1000) {
        let items: Vec<Value> = (first..(first + 1000).min(streams))
            .map(|i| json!({"stream": format!("s-{i}"), "data": "{\"n\":1}"}))
            .collect();
        let response = http
            .post(format!("{}/_broadcast", node.base))
            .bearer_auth(KEY)
            .body(Value::Array(items).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "{:?}", response.text().await);
    }
    let wrote = started.elapsed();
    memory(&format!("{streams} streams written in {wrote:.1?}"), &cluster, &node);
    let started = Instant::now();
    let reads = futures_util::stream::iter(0..streams)
        .map(|i| {
            let (http, url) = (http.clone(), format!("{}/ds/s-{i}?offset=-1", node.base));
            async move {
                let response = http.get(url).send().await.unwrap();
                assert_eq!(response.status(), 200);
                let body: Vec<Value> = response.json().await.unwrap();
                assert_eq!(body.len(), 1);
            }
        })
        .buffer_unordered(32)
        .count()
        .await;
    let read = started.elapsed();
    memory(&format!("{reads} streams read back in {read:.1?}"), &cluster, &node);
}

/// A NATS server killed while writes go on, then restarted: time until the cluster is ready
/// again with it current.
async fn rejoin() {
    let mut cluster = nats::NatsCluster::start();
    let node = Node::start(&cluster, &["--history_limit", "0"]);
    let http = reqwest::Client::new();
    let write = |n: usize| {
        let items: Vec<Value> =
            (0..100).map(|i| json!({"stream": format!("r-{}", i % 10), "data": (n * 100 + i).to_string()})).collect();
        http.post(format!("{}/_broadcast", node.base)).bearer_auth(KEY).body(Value::Array(items).to_string()).send()
    };
    for n in 0..100 {
        assert_eq!(write(n).await.unwrap().status(), 201);
    }
    let victim = (cluster.meta_leader().unwrap_or(0) + 1) % 3;
    cluster.kill(victim);
    for n in 100..200 {
        let _ = write(n).await;
    }
    let started = Instant::now();
    cluster.restart(victim);
    println!("NATS server {victim} (not the meta leader) killed during writes of 10000 messages: rejoined and current in {:.2?}", started.elapsed());
    let leader = cluster.meta_leader().unwrap_or(0);
    cluster.kill(leader);
    let started = Instant::now();
    cluster.restart(leader);
    println!("the meta leader killed and restarted: cluster ready with it current in {:.2?}", started.elapsed());
}

/// Durable ingest (single messages from 1 and 32 connections, 5 s each) on a cluster with
/// NATS's default sync (every 2 min) and with `sync_interval: always`.
async fn sync_cost() {
    for always in [false, true] {
        if always {
            std::env::set_var("ANYCABLE_DS_NATS_SYNC_ALWAYS", "1");
        }
        let cluster = nats::NatsCluster::start();
        let node = Node::start(&cluster, &["--history_limit", "0"]);
        for conns in [1usize, 32] {
            let http = reqwest::Client::builder().pool_max_idle_per_host(conns).build().unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            let started = Instant::now();
            let workers = (0..conns).map(|c| {
                let (http, url) = (http.clone(), format!("{}/_broadcast", node.base));
                async move {
                    let mut latencies = Vec::new();
                    while Instant::now() < deadline {
                        let body = json!({"stream": format!("sync-{}", c % 16), "data": "{\"n\":1}"}).to_string();
                        let t = Instant::now();
                        let response = http.post(&url).bearer_auth(KEY).body(body).send().await.unwrap();
                        assert_eq!(response.status(), 201);
                        latencies.push(t.elapsed());
                    }
                    latencies
                }
            });
            let mut latencies: Vec<Duration> = futures_util::future::join_all(workers).await.concat();
            latencies.sort();
            let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize].as_secs_f64() * 1000.0;
            println!(
                "sync {}: {conns} conns: {:.0} msgs/s, ack p50 {:.2} ms, p99 {:.2} ms",
                if always { "always" } else { "default (2 min)" },
                latencies.len() as f64 / started.elapsed().as_secs_f64(),
                at(0.5),
                at(0.99)
            );
        }
    }
}
