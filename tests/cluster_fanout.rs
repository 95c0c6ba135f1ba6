//! Live readers on one node woken by writes through another (`src/cluster/flights.rs`): each
//! gets every message, in order, and readers woken together share one trip to JetStream
//! instead of each making its own. Three real nats-server processes (`tests/common/nats.rs`).

mod common;

use std::time::Duration;

use common::ds_write::{post, put};
use common::nats::NatsCluster;
use common::{cluster_node, temp_dir, SseClient};
use futures_util::future::join_all;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);
const READERS: usize = 200;
const ROUNDS: u64 = 5;

#[tokio::test]
async fn readers_woken_together_on_another_node_share_fetches_and_each_gets_every_message() {
    let cluster = NatsCluster::start();
    let (da, db) = (temp_dir(), temp_dir());
    let a = cluster_node(da.path(), &cluster, "F", &[]);
    let b = cluster_node(db.path(), &cluster, "F", &[]);
    // One stream made by broadcasts (never cached by the node: every wake-up is a fetch) and
    // one made by `PUT`.
    a.publish("fan", [json!({"n": 0})]).await;
    assert_eq!(put(&a, "made", "application/json", b"").await.status(), 201);
    for stream in ["fan", "made"] {
        let mut readers = Vec::new();
        for _ in 0..READERS {
            // A client per reader: its own connection.
            readers
                .push(SseClient::open_with(&b, reqwest::Client::new(), &format!("{stream}?offset=now&live=sse")).await);
        }
        for reader in &mut readers {
            let (messages, control) = reader.next_batch(WAIT).await.expect("the first control event");
            assert!(messages.is_empty());
            assert_eq!(control["upToDate"], true);
        }
        let before = b.metric("nats_direct_gets_total").await;
        for n in 1..=ROUNDS {
            if stream == "fan" {
                a.publish(stream, [json!({"n": n})]).await;
            } else {
                let body = json!({"n": n}).to_string().into_bytes();
                assert_eq!(post(&a, stream, "application/json", body).await.status(), 204);
            }
            // Every reader gets exactly the new message.
            let got = join_all(readers.iter_mut().map(|r| r.next_batch(WAIT))).await;
            for (i, batch) in got.into_iter().enumerate() {
                let (messages, control) = batch.unwrap_or_else(|| panic!("reader {i} of {stream} ended"));
                assert_eq!(messages, [json!({"n": n})], "reader {i} of {stream}, round {n}");
                assert_eq!(control["upToDate"], true);
            }
        }
        // Before readers shared fetches, each woken reader made its own: READERS per round.
        let gets = b.metric("nats_direct_gets_total").await - before;
        eprintln!("{stream}: {gets} Direct Gets for {ROUNDS} rounds of {READERS} readers");
        let bound = (ROUNDS as usize * READERS / 10) as f64;
        assert!(
            gets <= bound,
            "{stream}: {gets} Direct Gets for {ROUNDS} rounds of {READERS} readers (at most {bound})"
        );
    }
}

/// Long-poll readers that arrive as the write lands: some find the tail by asking the
/// stream's leader (holding one of the node's read permits), some are woken; all share
/// fetches, and none waits for a permit another holds while it waits for them.
#[tokio::test]
async fn long_polls_arriving_as_a_write_lands_all_get_it() {
    let cluster = NatsCluster::start();
    let (da, db) = (temp_dir(), temp_dir());
    let a = cluster_node(da.path(), &cluster, "L", &[]);
    let b = cluster_node(db.path(), &cluster, "L", &[]);
    a.publish("poll", [json!({"n": 0})]).await;
    let mut offset = b.tail("poll").await;
    let before = b.metric("nats_direct_gets_total").await;
    let asked_before = b.metric("nats_leader_gets_total").await;
    for n in 1..=ROUNDS * 2 {
        let polls: Vec<_> = (0..READERS)
            .map(|_| {
                let request = b.client.get(b.ds(&format!("poll?offset={offset}&live=long-poll")));
                tokio::spawn(request.send())
            })
            .collect();
        a.publish("poll", [json!({"n": n})]).await;
        let mut next = Vec::new();
        for (i, poll) in join_all(polls).await.into_iter().enumerate() {
            let response = poll.unwrap().unwrap();
            if response.status() != 200 {
                let status = response.status();
                panic!("reader {i}, round {n}: {status} {}", response.text().await.unwrap_or_default());
            }
            let (messages, after, _) = common::read_parts(response).await;
            assert_eq!(messages, [json!({"n": n})], "reader {i}, round {n}");
            next.push(after);
        }
        next.dedup();
        assert_eq!(next.len(), 1, "every reader goes on from the same offset");
        offset = next.remove(0);
    }
    let gets = b.metric("nats_direct_gets_total").await - before;
    let asked = b.metric("nats_leader_gets_total").await - asked_before;
    eprintln!(
        "{gets} Direct Gets and {asked} questions to the leader for {} rounds of {READERS} long-polls",
        ROUNDS * 2
    );
    // Each long-poll that finds nothing newer than its position asks the leader where the
    // stream ends; askers at once share questions (`cluster/rounds.rs`).
    let bound = (ROUNDS as usize * 2 * READERS / 4) as f64;
    assert!(asked <= bound, "{asked} questions to the leader (at most {bound})");
}

/// Read-your-writes across nodes while other readers keep the node asking the stream's leader
/// about the same stream: a read that begins after a write was acknowledged on another node
/// has it, though questions sent before the acknowledgement are on their way when it begins
/// (it must not take their answers).
#[tokio::test]
async fn a_read_after_an_acknowledged_write_has_it_while_others_ask_about_the_stream() {
    let cluster = NatsCluster::start();
    let (da, db) = (temp_dir(), temp_dir());
    let a = cluster_node(da.path(), &cluster, "Y", &[]);
    let b = cluster_node(db.path(), &cluster, "Y", &[]);
    a.publish("ryw", [json!({"i": 0})]).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Readers on B that keep asking where the stream ends (HEAD: a question every time).
    let askers: Vec<_> = (0..16)
        .map(|_| {
            let (client, url, stop) = (b.client.clone(), b.ds("ryw"), stop.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let head = client.head(&url).send().await.unwrap();
                    assert_eq!(head.status(), 200);
                }
            })
        })
        .collect();
    let mut tail = b.tail("ryw").await;
    for i in 1..=300u64 {
        a.publish("ryw", [json!({"i": i})]).await;
        let (messages, next, _) = b.read("ryw", &tail).await;
        assert_eq!(messages, [json!({"i": i})], "write {i}, acknowledged by A, missing from the next read on B");
        tail = next;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for asker in askers {
        asker.await.unwrap();
    }
}
