//! Idempotent producers in cluster mode, where only a cluster can go wrong: a producer's
//! state is stored in the same JetStream atomic batch as the append it accepts, so a client
//! that retries every request it got no answer for writes everything exactly once, whatever
//! dies (a NATS server, a node with `kill -9`); two nodes taking the same request at once
//! append it once; and a stream deleted and made again on one node has forgotten its
//! producers on another. Each test runs three real nats-server processes
//! (`tests/common/nats.rs`). The single-node producer tests of `tests/write.rs` run on NATS in
//! `scripts/test`.

mod common;

use std::time::Duration;

use common::ds_write::{bytes, produce, produced, put, write};
use common::nats::NatsCluster;
use common::{cluster_node, temp_dir, Rng, Server};

/// Two nodes on `cluster` sharing the JetStream stream `stream` (their directories first, so
/// they outlive the servers).
fn two_nodes(cluster: &NatsCluster, stream: &str, args: &[&str]) -> ([tempfile::TempDir; 2], [Server; 2]) {
    let dirs = [temp_dir(), temp_dir()];
    let a = cluster_node(dirs[0].path(), cluster, stream, args);
    let b = cluster_node(dirs[1].path(), cluster, stream, args);
    (dirs, [a, b])
}

/// Producer `p`'s request number `seq` (epoch 0) to `produced`, appending `<seq>;`.
fn request(server: &Server, seq: u64) -> reqwest::RequestBuilder {
    produce(server, "produced", "p", (0, seq), format!("{seq};"))
}

/// One producer, its requests alternating between two nodes, retries every request it got no
/// answer for (a `503`, a connection that died) until it is answered `200` (appended now) or
/// `204` (an earlier attempt had been). Meanwhile the NATS server leading the JetStream stream
/// is lost and the nodes are killed with `kill -9`, each time with a request in flight. In the
/// end every message is there once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_retrying_across_a_lost_nats_server_and_a_killed_node_writes_everything_exactly_once() {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    let mut rng = Rng(seed);
    let mut cluster = NatsCluster::start();
    let (_dirs, mut nodes) = two_nodes(&cluster, "PR", &[]);
    assert_eq!(put(&nodes[0], "produced", "text/plain", b"").await.status(), 201);
    const TOTAL: u64 = 800;
    // At these seqs: the stream's leader goes (once), or a node is killed.
    let lose_nats = 100 + rng.next() % 100;
    let mut kills: Vec<u64> = (0..6).map(|i| 300 + i * 80 + rng.next() % 40).collect();
    let (mut seq, mut unanswered, mut duplicates) = (0u64, 0u64, 0u64);
    let mut lost = false;
    while seq < TOTAL {
        let node = (seq % 2) as usize;
        let kill_node = kills.first() == Some(&seq);
        if (seq == lose_nats && !lost) || kill_node {
            // Cut off with the request in flight (or about to be, or just answered).
            let racing = tokio::spawn(request(&nodes[node], seq).send());
            tokio::time::sleep(Duration::from_micros(rng.next() % 2000)).await;
            if kill_node {
                kills.remove(0);
                nodes[node].kill();
            } else {
                lost = true;
                cluster.kill(cluster.stream_leader("PR").unwrap_or(0));
            }
            let answered = matches!(racing.await.unwrap(), Ok(r) if r.status().is_success());
            unanswered += u64::from(!answered);
            if kill_node {
                nodes[node].restart();
            }
        }
        let response = match request(&nodes[node], seq).send().await {
            Ok(response) => response,
            Err(_) => {
                unanswered += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match response.status().as_u16() {
            200 | 204 => {
                let (status, epoch, answered_seq) = produced(&response);
                // A duplicate names the highest seq accepted: this one.
                assert_eq!((epoch.as_deref(), answered_seq), (Some("0"), Some(seq.to_string())), "seed {seed}");
                duplicates += u64::from(status == 204);
                seq += 1;
            }
            503 => {
                unanswered += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("seq {seq} (seed {seed}): answered {other}: {}", response.text().await.unwrap()),
        }
    }
    assert!(unanswered > 0, "no request went unanswered: the test tested nothing (seed {seed})");
    for node in &nodes {
        let text = String::from_utf8(bytes(node, "produced").await).unwrap();
        let got: Vec<u64> = text.split_terminator(';').map(|n| n.parse().unwrap()).collect();
        assert_eq!(got, (0..TOTAL).collect::<Vec<_>>(), "seed {seed}: every message once, in order");
    }
    eprintln!("producer across a lost NATS server and 6 node kills: {unanswered} unanswered, {duplicates} duplicates");
}

/// The same producer request sent through two nodes at once, six times: one is appended
/// (`200`), the others are duplicates (`204`): the record's guard serializes the producer
/// across nodes.
#[tokio::test]
async fn one_producer_request_sent_through_two_nodes_at_once_is_appended_exactly_once() {
    let cluster = NatsCluster::start();
    // Debug logs say when a write found the stream moved by the other node and started over.
    let (_dirs, nodes) = two_nodes(&cluster, "PC", &["--log_level", "debug"]);
    assert_eq!(put(&nodes[0], "produced", "text/plain", b"").await.status(), 201);
    const ROUNDS: u64 = 20;
    for seq in 0..ROUNDS {
        let attempts = (0..6).map(|i| request(&nodes[i % 2], seq).send());
        let statuses: Vec<u16> =
            futures_util::future::join_all(attempts).await.into_iter().map(|r| r.unwrap().status().as_u16()).collect();
        assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 1, "seq {seq}: {statuses:?}");
        assert_eq!(statuses.iter().filter(|&&s| s == 204).count(), 5, "seq {seq}: {statuses:?}");
    }
    let expected: String = (0..ROUNDS).map(|n| format!("{n};")).collect();
    for node in &nodes {
        assert_eq!(String::from_utf8(bytes(node, "produced").await).unwrap(), expected);
    }
    let logs = nodes[0].logs() + &nodes[1].logs();
    assert!(logs.contains("moved under a write"), "the nodes' writes never collided: the test tested nothing");
}

/// Node B knows producer `p` of a stream (it wrote for it at epoch 1); node A deletes the
/// stream and makes it again: on B, `p` at epoch 0 is the new stream's first producer (`200`:
/// not fenced by the old stream's epoch, nor a duplicate of its sequences).
#[tokio::test]
async fn a_stream_made_again_on_one_node_has_forgotten_its_producers_on_another() {
    let cluster = NatsCluster::start();
    let (_dirs, [a, b]) = two_nodes(&cluster, "PD", &[]);
    for round in 0..5 {
        assert_eq!(put(&a, "produced", "text/plain", b"").await.status(), 201, "round {round}");
        for seq in 0..3 {
            let response = produce(&b, "produced", "p", (1, seq), format!("old{seq};")).send().await.unwrap();
            assert_eq!(response.status(), 200, "round {round}");
        }
        assert_eq!(write(&a, reqwest::Method::DELETE, "produced").send().await.unwrap().status(), 204);
        assert_eq!(put(&a, "produced", "text/plain", b"").await.status(), 201);
        let first = produce(&b, "produced", "p", (0, 0), "new0;".into()).send().await.unwrap();
        assert_eq!(produced(&first), (200, Some("0".into()), Some("0".into())), "round {round}");
        let retry = produce(&a, "produced", "p", (0, 0), "new0;".into()).send().await.unwrap();
        assert_eq!(retry.status(), 204, "round {round}: the new stream's state, on the other node");
        assert_eq!(bytes(&a, "produced").await, b"new0;", "round {round}");
        assert_eq!(write(&b, reqwest::Method::DELETE, "produced").send().await.unwrap().status(), 204);
    }
    // The removals purged the records too (their lives keep them apart even when not).
    let logs = a.logs() + &b.logs();
    assert!(!logs.contains("records stay on disk"), "{logs}");
}

/// A producer's state record takes one place of JetStream's atomic batch (1000 messages): a
/// producer's append of 1000 JSON values is refused whole, and the answer names the limit it
/// has, 999; without producer headers the same body is stored.
#[tokio::test]
async fn a_producer_batch_over_the_limit_is_refused_with_the_limit_it_has() {
    let cluster = NatsCluster::start();
    let dir = temp_dir();
    let node = cluster_node(dir.path(), &cluster, "L", &["--ds_implicit_streams", "false"]);
    assert_eq!(put(&node, "big", "application/json", b"").await.status(), 201);
    let body = format!("[{}]", vec!["1"; 1000].join(","));
    let refused = write(&node, reqwest::Method::POST, "big")
        .header("content-type", "application/json")
        .header("producer-id", "p")
        .header("producer-epoch", "0")
        .header("producer-seq", "0")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    let (status, error) = common::ds_write::refused(refused).await;
    assert_eq!((status, error.contains("999")), (413, true), "{error}");
    assert_eq!(bytes(&node, "big").await, b"[]", "nothing of it stored");
    let plain = write(&node, reqwest::Method::POST, "big").header("content-type", "application/json").body(body);
    assert_eq!(plain.send().await.unwrap().status(), 204);
}
