//! The cluster node's cache of messages it read (`src/cluster/cache.rs`): what it must never
//! do is answer with messages a removal took, so these tests remove and re-make streams on
//! one node while another node, whose cache holds them, reads them. Each test runs three real
//! nats-server processes (`tests/common/nats.rs`).

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::ds_write::{post, put, write};
use common::nats::NatsCluster;
use common::{cluster_node, read_parts, temp_dir, Server};
use serde_json::{json, Value};

/// More than one Direct Get holds (1000), so a read of it joins cached and fetched parts.
const MESSAGES: usize = 1600;

/// `n` JSON values of life `life`, numbered from `from`.
fn values(life: usize, from: usize, n: usize) -> Vec<u8> {
    let items: Vec<Value> = (from..from + n).map(|i| json!({"life": life, "i": i})).collect();
    serde_json::to_vec(&items).unwrap()
}

/// Makes the stream again as life `life` with `MESSAGES` messages (two appends).
async fn make(node: &Server, stream: &str, life: usize) {
    assert_eq!(put(node, stream, "application/json", b"").await.status(), 201);
    for (from, n) in [(0, 800), (800, MESSAGES - 800)] {
        assert_eq!(post(node, stream, "application/json", values(life, from, n)).await.status(), 204);
    }
}

/// Everything a reader gets from `-1` to the end, in order.
async fn read_all(node: &Server, stream: &str) -> Vec<Value> {
    match try_read_all(node, stream).await {
        Ok(all) => all,
        Err(e) => panic!("{e}"),
    }
}

/// [`read_all`], or `Err` with what the server answered instead of `200`.
async fn try_read_all(node: &Server, stream: &str) -> Result<Vec<Value>, String> {
    let mut all = Vec::new();
    let mut offset = "-1".to_string();
    loop {
        let response = node.get(&format!("{stream}?offset={offset}")).await;
        if response.status() != 200 {
            let status = response.status();
            return Err(format!("read {stream} from {offset}: {status} {}", response.text().await.unwrap_or_default()));
        }
        let (messages, next, up_to_date) = read_parts(response).await;
        all.extend(messages);
        offset = next;
        if up_to_date {
            return Ok(all);
        }
    }
}

/// What a read of a stream made by [`make`] may be: one life's messages from its first, in
/// order (a prefix while that life is written). The life, if any.
fn one_life(read: &[Value]) -> Result<Option<u64>, String> {
    let Some(first) = read.first() else { return Ok(None) };
    let life = first["life"].as_u64().ok_or("no life")?;
    for (i, value) in read.iter().enumerate() {
        if value != &json!({"life": life, "i": i}) {
            return Err(format!("message {i} of a read of life {life} is {value}"));
        }
    }
    Ok(Some(life))
}

#[tokio::test]
async fn a_stream_removed_and_made_again_on_one_node_is_never_read_old_from_anothers_cache() {
    let cluster = NatsCluster::start();
    let (da, db) = (temp_dir(), temp_dir());
    let a = cluster_node(da.path(), &cluster, "C", &[]);
    let b = cluster_node(db.path(), &cluster, "C", &[]);
    for life in 0..8 {
        make(&a, "again", life).await;
        // Twice: the first read fills B's cache, the second is served from it.
        for _ in 0..2 {
            let read = read_all(&b, "again").await;
            assert_eq!(read.len(), MESSAGES, "life {life}");
            assert_eq!(one_life(&read), Ok(Some(life as u64)));
        }
        assert!(b.metric("ds_read_cache_bytes").await > 0.0, "node B cached nothing: the test tests nothing");
        assert_eq!(write(&a, reqwest::Method::DELETE, "again").send().await.unwrap().status(), 204);
        // At once: B may not have had the removal's wake-up yet.
        let read = read_all(&b, "again").await;
        assert!(read.is_empty(), "life {life}: read after its removal: {} messages", read.len());
    }
}

#[tokio::test]
async fn readers_of_one_node_see_one_life_at_a_time_while_another_node_removes_and_remakes() {
    let cluster = NatsCluster::start();
    let (da, db) = (temp_dir(), temp_dir());
    let a = cluster_node(da.path(), &cluster, "R", &[]);
    let b = Arc::new(cluster_node(db.path(), &cluster, "R", &[]));
    make(&a, "churn", 0).await;
    let stop = Arc::new(AtomicBool::new(false));
    let full_reads = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (b, stop, full_reads) = (b.clone(), stop.clone(), full_reads.clone());
            tokio::spawn(async move {
                let mut lives = 0;
                while !stop.load(Ordering::Acquire) {
                    let read = match try_read_all(&b, "churn").await {
                        Ok(read) => read,
                        // The life it was reading was removed under it: the protocol's answer.
                        Err(e) if e.contains(": 410 Gone") => continue,
                        Err(e) => panic!("{e}"),
                    };
                    if let Err(e) = one_life(&read) {
                        panic!("a read mixed lives or skipped messages: {e}");
                    }
                    if read.len() == MESSAGES {
                        full_reads.fetch_add(1, Ordering::Relaxed);
                    }
                    lives += 1;
                }
                lives
            })
        })
        .collect();
    let started = Instant::now();
    for life in 1..=12 {
        assert_eq!(write(&a, reqwest::Method::DELETE, "churn").send().await.unwrap().status(), 204);
        make(&a, "churn", life).await;
        // Let the readers read this life whole (and from the cache) a few times.
        let seen = full_reads.load(Ordering::Relaxed);
        while full_reads.load(Ordering::Relaxed) < seen + 4 {
            assert!(started.elapsed() < Duration::from_secs(120), "readers stopped getting whole lives");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    stop.store(true, Ordering::Release);
    for reader in readers {
        assert!(reader.await.unwrap() > 0);
    }
    assert!(b.metric("ds_read_cache_bytes").await > 0.0, "node B cached nothing");
}
