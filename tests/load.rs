//! Bounded load test (CI size): many SSE and long-poll readers of one stream plus idle SSE
//! connections on many other streams; every reader gets every broadcast, in order. The full
//! size (1000 + 1000 readers, 10k idle) runs with `cargo bench --bench ds_bench -- load`;
//! figures in docs/PERFORMANCE.md.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{header, read_parts, temp_dir, Server, SseClient};
use serde_json::{json, Value};

const SSE_READERS: usize = 200;
const POLL_READERS: usize = 200;
const IDLE: usize = 1000;
const MESSAGES: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_live_readers_and_idle_connections_all_get_served() {
    let dir = temp_dir();
    let server = Arc::new(Server::start(dir.path(), &["--ds_poll_interval", "30", "--ds_sse_ttl", "300"]));
    let start = server.tail("hot").await;

    let mut idle = Vec::new();
    for i in 0..IDLE {
        idle.push(
            SseClient::open_with(&server, reqwest::Client::new(), &format!("cold-{i}?offset=now&live=sse")).await,
        );
    }
    let mut readers = Vec::new();
    for _ in 0..SSE_READERS {
        let (server, start) = (server.clone(), start.clone());
        readers.push(tokio::spawn(async move {
            let mut sse =
                SseClient::open_with(&server, reqwest::Client::new(), &format!("hot?offset={start}&live=sse")).await;
            let mut seen: Vec<Value> = Vec::new();
            while seen.len() < MESSAGES as usize {
                let (messages, _) = sse.next_batch(Duration::from_secs(30)).await.expect("stream stays open");
                seen.extend(messages);
            }
            seen
        }));
    }
    for _ in 0..POLL_READERS {
        let (server, start) = (server.clone(), start.clone());
        readers.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut offset = start;
            let mut seen: Vec<Value> = Vec::new();
            while seen.len() < MESSAGES as usize {
                let response =
                    client.get(server.ds(&format!("hot?offset={offset}&live=long-poll"))).send().await.unwrap();
                offset = header(&response, "stream-next-offset").unwrap();
                if response.status() == 200 {
                    seen.extend(read_parts(response).await.0);
                }
            }
            seen
        }));
    }
    server.wait_for_metric("ds_sse_clients_num", (SSE_READERS + IDLE) as f64, Duration::from_secs(60)).await;
    server.wait_for_metric("ds_poll_clients_num", POLL_READERS as f64, Duration::from_secs(60)).await;
    for n in 0..MESSAGES {
        server.publish("hot", [json!({ "n": n })]).await;
    }
    let expected: Vec<Value> = (0..MESSAGES).map(|n| json!({ "n": n })).collect();
    for reader in readers {
        let seen = tokio::time::timeout(Duration::from_secs(60), reader).await.expect("reader done").unwrap();
        assert_eq!(seen, expected);
    }
    // The finished readers' connections close; the idle ones stay open.
    server.wait_for_metric("ds_sse_clients_num", IDLE as f64, Duration::from_secs(30)).await;
    drop(idle);
    server.wait_for_metric("ds_sse_clients_num", 0.0, Duration::from_secs(30)).await;
}
