//! The Durable Streams write API in cluster mode, where only a cluster can go wrong: several
//! nodes writing one stream at once (check-and-append must be atomic across nodes), a close
//! or a removal on one node seen by the next request on another, retention that must spare
//! streams made by `PUT`, and a sliding TTL renewed by a read on another node. Each test runs
//! three real nats-server processes (`tests/common/nats.rs`). The rest of the write API runs
//! on NATS as `tests/write.rs` in `scripts/test`.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;

use common::ds_write::{bytes, close, post, put, refused, rfc3339, same_stream_seq, write};
use common::nats::NatsCluster;
use common::{cluster_node, header, numbered, temp_dir, Server};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

/// Two nodes on `cluster` sharing the JetStream stream `stream` (their directories first, so
/// they outlive the servers).
fn two_nodes(cluster: &NatsCluster, stream: &str, args: &[&str]) -> ([tempfile::TempDir; 2], Server, Server) {
    let dirs = [temp_dir(), temp_dir()];
    let a = cluster_node(dirs[0].path(), cluster, stream, args);
    let b = cluster_node(dirs[1].path(), cluster, stream, args);
    (dirs, a, b)
}

#[tokio::test]
async fn one_stream_seq_sent_through_two_nodes_at_once_is_accepted_exactly_once() {
    let cluster = NatsCluster::start();
    // Debug logs say when a write found the stream moved by the other node and started over.
    let args = ["--ds_implicit_streams", "false", "--log_level", "debug"];
    let (_dirs, a, b) = two_nodes(&cluster, "Q", &args);
    assert_eq!(put(&a, "seq", "text/plain", b"").await.status(), 201);
    const ROUNDS: usize = 30;
    for round in 0..ROUNDS {
        // Three writers per node, all with the same Stream-Seq, all at once.
        let statuses = same_stream_seq(&[&a, &b], "seq", round, 6).await;
        assert_eq!(statuses.iter().filter(|&&s| s == 204).count(), 1, "round {round}: {statuses:?}");
        assert_eq!(statuses.iter().filter(|&&s| s == 409).count(), 5, "round {round}: {statuses:?}");
    }
    let text = String::from_utf8(bytes(&b, "seq").await).unwrap();
    assert_eq!(text.matches(';').count(), ROUNDS, "one append per round: {text}");
    assert_eq!(bytes(&a, "seq").await, text.as_bytes(), "both nodes read the same bytes");
    let logs = a.logs() + &b.logs();
    assert!(logs.contains("moved under a write"), "the nodes' writes never collided: the test tested nothing");
}

#[tokio::test]
async fn a_close_on_one_node_refuses_the_next_append_on_another() {
    let cluster = NatsCluster::start();
    let (_dirs, a, b) = two_nodes(&cluster, "K", &[]);
    for round in 0..10 {
        let stream = format!("closing-{round}");
        assert_eq!(put(&a, &stream, "application/json", b"[1]").await.status(), 201);
        // Node B knows the stream open (it wrote to it) before node A closes it.
        assert_eq!(post(&b, &stream, "application/json", b"2".to_vec()).await.status(), 204);
        let closed = close(&a, &stream).await;
        assert_eq!(closed.status(), 204);
        let end = header(&closed, "stream-next-offset").unwrap();
        let late = post(&b, &stream, "application/json", b"3".to_vec()).await;
        assert_eq!(header(&late, "stream-closed").as_deref(), Some("true"));
        assert_eq!(header(&late, "stream-next-offset").as_deref(), Some(end.as_str()), "the close's offset");
        assert_eq!(refused(late).await, (409, "stream_closed".to_string()), "round {round}");
        // A broadcast through B is refused too, and a reader on B sees the end.
        let (status, _) = b.broadcast(&json!({"stream": stream, "data": "4"}).to_string()).await;
        assert_eq!(status, 409);
        let read = b.get(&format!("{stream}?offset=-1")).await;
        assert_eq!(header(&read, "stream-closed").as_deref(), Some("true"));
        assert_eq!(read.json::<Vec<i64>>().await.unwrap(), [1, 2]);
    }
}

#[tokio::test]
async fn a_stream_deleted_on_one_node_is_gone_on_another_and_can_be_made_again_at_once() {
    let cluster = NatsCluster::start();
    let (_dirs, a, b) = two_nodes(&cluster, "D", &["--ds_implicit_streams", "false"]);
    for round in 0..5 {
        assert_eq!(put(&a, "again", "text/plain", b"old").await.status(), 201, "round {round}");
        assert_eq!(post(&b, "again", "text/plain", b" and more".to_vec()).await.status(), 204);
        assert_eq!(write(&a, reqwest::Method::DELETE, "again").send().await.unwrap().status(), 204);
        assert_eq!(b.client.head(b.ds("again")).send().await.unwrap().status(), 404);
        assert_eq!(refused(post(&b, "again", "text/plain", b"x".to_vec()).await).await.0, 404);
        let created = put(&b, "again", "application/json", b"[\"new\"]").await;
        assert_eq!(created.status(), 201);
        assert_eq!(a.read("again", "-1").await.0, [json!("new")], "a fresh stream, nothing of the old one");
        assert_eq!(write(&b, reqwest::Method::DELETE, "again").send().await.unwrap().status(), 204);
    }
}

#[tokio::test]
async fn anycable_retention_spares_streams_made_by_put() {
    let cluster = NatsCluster::start();
    let args = ["--history_limit", "3", "--history_ttl", "2"];
    let (_dirs, a, b) = two_nodes(&cluster, "T", &args);
    assert_eq!(put(&a, "kept", "application/json", b"[1,2]").await.status(), 201);
    for n in 3..=8 {
        let node = if n % 2 == 0 { &a } else { &b };
        assert_eq!(post(node, "kept", "application/json", n.to_string().into_bytes()).await.status(), 204);
        node.publish("kept", numbered(n..=n)).await; // a broadcast into a JSON stream made by PUT
        node.publish("trimmed", numbered(n..=n)).await;
    }
    let all: Vec<i64> = (1..=8).flat_map(|n| if n <= 2 { vec![n] } else { vec![n, n] }).collect();
    assert_eq!(b.get("kept?offset=-1").await.json::<Vec<serde_json::Value>>().await.unwrap().len(), all.len());
    assert_eq!(a.read("trimmed", "-1").await.0, numbered(6..=8), "history_limit");
    // Past history_ttl: the broadcast stream is gone, the PUT stream keeps every message.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let deadline = Instant::now() + WAIT;
    while !a.read("trimmed", "-1").await.0.is_empty() {
        assert!(Instant::now() < deadline, "history_ttl never trimmed the broadcast stream");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let kept = b.get("kept?offset=-1").await.json::<Vec<serde_json::Value>>().await.unwrap();
    assert_eq!(kept.len(), all.len(), "{kept:?}");
}

#[tokio::test]
async fn a_read_on_one_node_renews_a_ttl_for_every_node() {
    let cluster = NatsCluster::start();
    let (_dirs, a, b) = two_nodes(&cluster, "R", &["--ds_implicit_streams", "false"]);
    let created = write(&a, reqwest::Method::PUT, "short").header("stream-ttl", "3").send().await.unwrap();
    assert_eq!(created.status(), 201);
    let started = Instant::now();
    // Reads on B (and only there) every second keep it alive on A, well past its TTL.
    while started.elapsed() < Duration::from_secs(6) {
        assert_eq!(b.get("short?offset=-1").await.status(), 200, "at {:?}", started.elapsed());
        let head = a.client.head(a.ds("short")).send().await.unwrap();
        assert_eq!(head.status(), 200, "expired on A at {:?} although read on B", started.elapsed());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Left alone (HEAD renews nothing), it expires on both.
    let deadline = Instant::now() + WAIT;
    while a.client.head(a.ds("short")).send().await.unwrap().status() != 404 {
        assert!(Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(b.get("short?offset=-1").await.status(), 404);
}

#[tokio::test]
async fn appends_over_the_nats_message_limit_are_413_and_store_nothing() {
    let cluster = NatsCluster::start();
    let dir = temp_dir();
    let a = cluster_node(dir.path(), &cluster, "M", &["--ds_max_append_bytes", "4194304"]);
    assert_eq!(put(&a, "big", "application/octet-stream", b"").await.status(), 201);
    // nats-server's default max_payload is 1 MiB.
    let response = post(&a, "big", "application/octet-stream", vec![7; 2 * 1024 * 1024]).await;
    let (status, error) = refused(response).await;
    assert_eq!(status, 413, "{error}");
    assert!(error.contains("max_payload"), "{error}");
    let many = format!("[{}]", vec!["1"; 1001].join(","));
    assert_eq!(put(&a, "many", "application/json", b"").await.status(), 201);
    let response = write(&a, reqwest::Method::POST, "many").header("content-type", "application/json").body(many);
    assert_eq!(refused(response.send().await.unwrap()).await.0, 413);
    assert!(bytes(&a, "big").await.is_empty());
    assert_eq!(a.read("many", "-1").await.0.len(), 0);
    assert_eq!(post(&a, "big", "application/octet-stream", vec![7; 512 * 1024]).await.status(), 204);
}

#[tokio::test]
async fn expired_streams_nobody_asks_for_are_swept_from_jetstream() {
    let cluster = NatsCluster::start();
    let dir = temp_dir();
    let a = cluster_node(dir.path(), &cluster, "X", &["--history_ttl", "0"]);
    let ttl = write(&a, reqwest::Method::PUT, "idle").header("stream-ttl", "1").header("content-type", "text/plain");
    assert_eq!(ttl.body("a").send().await.unwrap().status(), 201);
    // (In the past is a 400: the earliest a PUT can name is a moment from now.)
    let soon = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 2;
    let at = write(&a, reqwest::Method::PUT, "dated").header("stream-expires-at", rfc3339(soon));
    assert_eq!(at.send().await.unwrap().status(), 201);
    assert_eq!(put(&a, "kept", "text/plain", b"b").await.status(), 201);
    // No request touches them again: the sweep removes both from JetStream, nothing else;
    // what is left of each is its tombstone (the `delete` marker, `storage.tombstone_ttl`).
    let js = async_nats::jetstream::new(async_nats::connect(cluster.url(0)).await.unwrap());
    let deadline = Instant::now() + WAIT;
    loop {
        let mut stream = js.get_stream("X").await.unwrap();
        let state = stream.info().await.unwrap().state.clone();
        let mut tombstones = 0;
        for name in ["idle", "dated"] {
            let subject = format!("X.s.s{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(name));
            if let Ok(last) = stream.get_last_raw_message_by_subject(&subject).await {
                tombstones += usize::from(last.headers.get("Ds-Ctl").map(|v| v.as_str()) == Some("delete"));
            }
        }
        if state.messages == 3 && tombstones == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "expired streams still stored: {state:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(bytes(&a, "kept").await, b"b");
}

/// With `Stream-Seq`, a client's retry of a `503` is exactly-once: the state that refuses a
/// repeat is stored with the append it belongs to, so losing a NATS server (the meta leader)
/// in the middle of the writes loses or doubles nothing.
#[tokio::test]
async fn stream_seq_makes_retries_exactly_once_while_a_nats_server_is_lost() {
    let mut cluster = NatsCluster::start();
    let (_dirs, a, b) = two_nodes(&cluster, "F", &[]);
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let node = if w % 2 == 0 { &a } else { &b };
            let (client, url) = (node.client.clone(), node.ds(&format!("f{w}")));
            tokio::spawn(async move {
                let put = client.put(&url).bearer_auth(common::KEY).header("content-type", "text/plain");
                assert_eq!(put.send().await.unwrap().status(), 201);
                let (started, mut n, mut retries) = (Instant::now(), 1u64, 0);
                // Until time is up, and then until the last request is answered: a 503 may
                // still have been stored, and only its retry (409 if so) says.
                let mut unanswered = false;
                while started.elapsed() < Duration::from_secs(6) || unanswered {
                    let response = client
                        .post(&url)
                        .bearer_auth(common::KEY)
                        .header("content-type", "text/plain")
                        .header("stream-seq", format!("{n:06}"))
                        .body(format!("{n};"))
                        .send()
                        .await
                        .unwrap();
                    unanswered = response.status() == 503;
                    match response.status().as_u16() {
                        // Stored now, or by an attempt that was answered 503.
                        204 | 409 => n += 1,
                        503 => {
                            retries += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        other => panic!("append answered {other}"),
                    }
                }
                (n - 1, retries)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let leader = cluster.meta_leader().unwrap_or(0);
    cluster.kill(leader);
    let mut retried = 0;
    for (w, writer) in writers.into_iter().enumerate() {
        let (last, retries) = writer.await.unwrap();
        retried += retries;
        let expected: String = (1..=last).map(|n| format!("{n};")).collect();
        assert!(last > 10, "writer {w} got on");
        assert_eq!(String::from_utf8(bytes(&a, &format!("f{w}")).await).unwrap(), expected, "writer {w}");
    }
    eprintln!("NATS server lost during appends with Stream-Seq: {retried} retries of a 503");
}
