//! Cluster mode: several anycable-ds nodes on one NATS JetStream cluster (three real
//! nats-server 2.15.1 processes per test, `tests/common/nats.rs`). What only a cluster has:
//! a broadcast to one node read from another, wake-ups across nodes, read-your-writes,
//! retention gaps, the atomic batch limit, settings shared through the stream, lost NATS
//! servers. (The engine-independent suites also run whole in cluster mode: `scripts/test`.)

mod common;

use std::time::{Duration, Instant};

use common::nats::NatsCluster;
use common::{cluster_node, numbered, temp_dir, Server, SseClient, KEY};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_broadcast_to_one_node_is_read_from_another_at_the_same_offsets() {
    let cluster = NatsCluster::start();
    let (da, db) = (temp_dir(), temp_dir());
    // One message per read, to walk the tokens one by one.
    let a = cluster_node(da.path(), &cluster, "S", &["--ds_max_chunk_bytes", "1"]);
    let b = cluster_node(db.path(), &cluster, "S", &["--ds_max_chunk_bytes", "1"]);
    a.publish("chat/room.1 *>", numbered(1..=3)).await;
    b.publish("other", numbered(1..=1)).await;
    a.publish("chat/room.1 *>", numbered(4..=5)).await;
    let name = "chat%2Froom.1%20*%3E";
    assert_eq!(a.tail(name).await, b.tail(name).await, "HEAD is exact on every node");
    // Each token read on one node resumes exactly after its message on the other.
    let (mut offset, mut seen, mut tokens) = ("-1".to_string(), Vec::new(), Vec::new());
    for i in 0..5 {
        let reader = if i % 2 == 0 { &a } else { &b };
        let (messages, next, up_to_date) = reader.read(name, &offset).await;
        assert_eq!(messages.len(), 1, "one message per read");
        assert_eq!(up_to_date, i == 4, "up to date only at the end");
        seen.extend(messages);
        tokens.push(next.clone());
        offset = next;
    }
    assert_eq!(seen, numbered(1..=5));
    assert_eq!(offset, b.tail(name).await);
    let mut sorted = tokens.clone();
    sorted.sort();
    assert_eq!(tokens, sorted, "tokens sort in stream order");
    let (rest, _, _) = a.read(name, &offset).await;
    assert!(rest.is_empty());
}

#[tokio::test]
async fn readers_on_one_node_are_woken_by_broadcasts_to_another() {
    let cluster = NatsCluster::start();
    let (da, db) = (temp_dir(), temp_dir());
    let a = cluster_node(da.path(), &cluster, "W", &[]);
    let b = cluster_node(db.path(), &cluster, "W", &["--ds_poll_interval", "30"]);
    let mut sse = SseClient::open(&b, "w?offset=now&live=sse").await;
    let (_, control) = sse.next_batch(WAIT).await.expect("the first control event");
    assert_eq!(control["upToDate"], true);
    let poll = tokio::spawn(b.client.get(b.ds("w?offset=now&live=long-poll")).send());
    b.wait_for_metric("ds_poll_clients_num", 1.0, WAIT).await;
    a.publish("w", [json!({"hello": "from a"})]).await;
    let (messages, _) = sse.next_batch(WAIT).await.expect("woken by the broadcast to the other node");
    assert_eq!(messages, [json!({"hello": "from a"})]);
    let response = poll.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Vec<Value>>().await.unwrap(), [json!({"hello": "from a"})]);
    // Transient messages cross nodes too, and are not stored.
    let transient = json!({"stream": "w", "data": "{\"typing\":true}", "meta": {"transient": true}}).to_string();
    assert_eq!(a.broadcast(&transient).await.0, 201);
    let (messages, _) = sse.next_batch(WAIT).await.expect("the transient message");
    assert_eq!(messages, [json!({"typing": true})]);
    assert_eq!(b.read("w", "-1").await.0.len(), 1);
}

#[tokio::test]
async fn a_write_acknowledged_by_one_node_is_in_the_next_read_on_another() {
    let cluster = NatsCluster::start();
    let (da, db) = (temp_dir(), temp_dir());
    let a = cluster_node(da.path(), &cluster, "R", &[]);
    let b = cluster_node(db.path(), &cluster, "R", &[]);
    let mut tail = a.tail("ryw").await;
    for i in 0..200u64 {
        let (writer, reader) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        writer.publish("ryw", [json!({"i": i})]).await;
        let (messages, next, _) = reader.read("ryw", &tail).await;
        assert_eq!(messages, [json!({"i": i})], "write {i} missing from the next read on the other node");
        assert_eq!(reader.tail("ryw").await, next, "HEAD after write {i}");
        tail = next;
    }
}

#[tokio::test]
async fn retention_on_the_shared_stream_and_its_gaps() {
    let cluster = NatsCluster::start();
    let (da, db) = (temp_dir(), temp_dir());
    let a = cluster_node(da.path(), &cluster, "G", &["--history_limit", "2"]);
    let b = cluster_node(db.path(), &cluster, "G", &["--history_limit", "2"]);
    let mut tokens = vec![a.tail("g").await];
    for n in 1..=5u64 {
        a.publish("g", numbered(n..=n)).await;
        b.publish("noise", numbered(n..=n)).await;
        tokens.push(a.tail("g").await);
    }
    // Kept: 4 and 5. Tokens after 3 or later read on; older ones missed messages: 410.
    assert_eq!(b.read("g", "-1").await.0, numbered(4..=5));
    assert_eq!(b.read("g", &tokens[3]).await.0, numbered(4..=5));
    assert_eq!(a.read("g", &tokens[4]).await.0, numbered(5..=5));
    for old in &tokens[..3] {
        let response = b.get(&format!("g?offset={old}")).await;
        assert_eq!(response.status(), 410, "token {old} points before deleted messages");
    }
    // A batch that holds the same stream twice keeps the chain inside the batch.
    let batch = json!([
        {"stream": "g", "data": "{\"n\":6}"},
        {"stream": "noise", "data": "{\"n\":0}"},
        {"stream": "g", "data": "{\"n\":7}"},
    ]);
    assert_eq!(a.broadcast(&batch.to_string()).await.0, 201);
    assert_eq!(b.read("g", "-1").await.0, numbered(6..=7));
    assert_eq!(b.read("g", &tokens[5]).await.0, numbered(6..=7), "after 5: nothing missed");
    assert_eq!(b.get(&format!("g?offset={}", tokens[4])).await.status(), 410, "after 4: 5 was missed");
    // 7's predecessor is 6, two places before it in the same batch.
    let tail = b.tail("g").await;
    let after_six = common::token_at(&tail, common::seq_of(&tail) - 2);
    assert_eq!(a.read("g", &after_six).await.0, numbered(7..=7));
}

#[tokio::test]
async fn a_batch_above_the_atomic_limit_is_413_and_stores_nothing() {
    let cluster = NatsCluster::start();
    let dir = temp_dir();
    // Unlimited history: all 1000 must be there to count.
    let a = cluster_node(dir.path(), &cluster, "B", &["--history_limit", "0"]);
    let items: Vec<Value> = (0..1001).map(|i| json!({"stream": "big", "data": i.to_string()})).collect();
    let (status, body) = a.broadcast(&Value::Array(items.clone()).to_string()).await;
    assert_eq!(status, 413, "{body}");
    assert!(body["error"].as_str().unwrap().contains("1000"), "{body}");
    assert_eq!(a.metric("broadcast_rejected_total{reason=\"too_large\"}").await, 1.0);
    assert!(a.read("big", "-1").await.0.is_empty());
    let (status, _) = a.broadcast(&Value::Array(items[..1000].to_vec()).to_string()).await;
    assert_eq!(status, 201);
    let mut offset = "-1".to_string();
    let mut count = 0;
    loop {
        let (messages, next, up_to_date) = a.read("big", &offset).await;
        count += messages.len();
        offset = next;
        if up_to_date {
            break;
        }
    }
    assert_eq!(count, 1000);
}

#[tokio::test]
async fn retention_lives_on_the_stream_and_a_node_with_other_settings_refuses_to_start() {
    let cluster = NatsCluster::start();
    let dir = temp_dir();
    let a = cluster_node(dir.path(), &cluster, "C", &["--history_limit", "10"]);
    a.publish("c", numbered(1..=1)).await;
    let other = temp_dir();
    let stderr = refused_start(other.path(), &cluster, "C", "20");
    assert!(stderr.contains("broker.history_limit") && stderr.contains("10") && stderr.contains("20"), "{stderr}");
    assert!(stderr.contains("--nats_update_stream"), "{stderr}");
    // Told to, a node applies its own settings (a rolling change). The others learn them
    // from the stream within a second (the count limit is applied by the nodes, see
    // src/cluster/retention.rs).
    let b = cluster_node(other.path(), &cluster, "C", &["--history_limit", "20", "--nats_update_stream"]);
    b.publish("c", numbered(2..=25)).await;
    assert_eq!(b.read("c", "-1").await.0, numbered(6..=25), "20 kept now");
    let deadline = Instant::now() + Duration::from_secs(3);
    while a.read("c", "-1").await.0 != numbered(6..=25) {
        assert!(Instant::now() < deadline, "node A still applies the old limit");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts a node on JetStream stream `stream` with `history_limit`, which must refuse to
/// start; its stderr.
fn refused_start(dir: &std::path::Path, cluster: &NatsCluster, stream: &str, history_limit: &str) -> String {
    let output = Server::command(dir)
        .args(["--port", "0", "--broker", "nats", "--nats_stream", stream, "--history_limit", history_limit])
        .args(["--nats_servers", &cluster.urls()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn a_recreated_stream_gets_a_new_epoch_and_old_tokens_are_410() {
    let cluster = NatsCluster::start();
    let dir = temp_dir();
    let mut a = cluster_node(dir.path(), &cluster, "E", &[]);
    a.publish("e", numbered(1..=3)).await;
    let old = a.tail("e").await;
    a.kill();
    let client = async_nats::connect(cluster.url(0)).await.unwrap();
    async_nats::jetstream::new(client).delete_stream("E").await.unwrap();
    a.restart();
    a.publish("e", numbered(1..=1)).await;
    assert_ne!(old.split('_').next(), a.tail("e").await.split('_').next(), "a new epoch");
    assert_eq!(a.get(&format!("e?offset={old}")).await.status(), 410);
    assert_eq!(a.read("e", "-1").await.0, numbered(1..=1));
}

#[tokio::test]
async fn losing_nats_servers_loses_no_acknowledged_message_and_recovers_without_a_restart() {
    let mut cluster = NatsCluster::start();
    let (da, db) = (temp_dir(), temp_dir());
    // Unlimited history, so every acknowledged message must still be there to count.
    let a = cluster_node(da.path(), &cluster, "F", &["--history_limit", "0"]);
    let b = cluster_node(db.path(), &cluster, "F", &["--history_limit", "0"]);
    // Writers on both nodes while one NATS server is killed.
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let server = if w % 2 == 0 { a.client.clone() } else { b.client.clone() };
            let url = if w % 2 == 0 { a.url("/_broadcast") } else { b.url("/_broadcast") };
            tokio::spawn(async move {
                let (mut acked, mut refused) = (Vec::new(), 0);
                let started = Instant::now();
                let mut i = 0;
                while started.elapsed() < Duration::from_secs(6) {
                    let body = json!({"stream": "f", "data": json!({"w": w, "i": i}).to_string()}).to_string();
                    let response = server.post(&url).bearer_auth(KEY).body(body).send().await.unwrap();
                    match response.status().as_u16() {
                        201 => acked.push(json!({"w": w, "i": i})),
                        503 => {
                            assert!(response.headers().contains_key("retry-after"));
                            refused += 1;
                        }
                        other => panic!("broadcast answered {other}"),
                    }
                    i += 1;
                }
                (acked, refused)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await; // let the writers get going (not a sync)
    let leader = cluster.meta_leader().unwrap_or(0);
    cluster.kill(leader);
    let mut acked = Vec::new();
    let mut refused = 0;
    for writer in writers {
        let (a, r) = writer.await.unwrap();
        acked.extend(a);
        refused += r;
    }
    cluster.wait_ready();
    // One server of three down is still a quorum: ready (spec §12, health by quorum).
    let deadline = Instant::now() + WAIT;
    while a.client.get(a.url("/health")).send().await.unwrap().status() != 200 {
        assert!(Instant::now() < deadline, "not ready with two of three NATS servers up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut stored = Vec::new();
    let mut offset = "-1".to_string();
    loop {
        let (messages, next, up_to_date) = b.read("f", &offset).await;
        stored.extend(messages);
        offset = next;
        if up_to_date {
            break;
        }
    }
    for message in &acked {
        assert_eq!(stored.iter().filter(|m| *m == message).count(), 1, "{message} stored exactly once");
    }
    let mut unique = stored.clone();
    unique.sort_by_key(|v| v.to_string());
    unique.dedup();
    assert_eq!(unique.len(), stored.len(), "no duplicates");
    eprintln!("NATS server loss: {} acknowledged, {} stored, {refused} refused with 503", acked.len(), stored.len());
    assert!(acked.len() > 10, "writes went on");

    // Two of three down: no quorum. Reads and writes 503, health not ready.
    cluster.kill((leader + 1) % 3);
    let deadline = Instant::now() + WAIT;
    loop {
        let health = a.client.get(a.url("/health")).send().await.unwrap();
        if health.status() == 503 {
            break;
        }
        assert!(Instant::now() < deadline, "health still ready without a quorum");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let response = a
        .client
        .post(a.url("/_broadcast"))
        .bearer_auth(KEY)
        .body(json!({"stream": "f", "data": "1"}).to_string())
        .send()
        .await;
    let status = match response {
        Ok(response) => response.status().as_u16(),
        Err(e) => panic!("broadcast without a quorum: {e}\n{}", a.logs()),
    };
    assert_eq!(status, 503);
    // NATS entirely gone: reads 503 too (JSON), health stays not ready.
    cluster.kill((leader + 2) % 3);
    let response = b.get("f?offset=-1").await;
    assert_eq!(response.status(), 503);
    assert!(response.json::<Value>().await.unwrap()["error"].is_string());
    assert_eq!(a.client.get(a.url("/health")).send().await.unwrap().status(), 503);
    // Back: it recovers by itself, without restarting the nodes.
    for i in 0..3 {
        cluster.revive(i);
    }
    cluster.wait_ready();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body = json!({"stream": "f", "data": "{\"after\":true}"}).to_string();
        // A new connection each time: a pooled one may be closed by the server's keep-alive
        // timer while a request waits out the publish timeout.
        let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
        let response = fresh.post(a.url("/_broadcast")).bearer_auth(KEY).body(body).send().await;
        let status = match response {
            Ok(response) => response.status().as_u16(),
            Err(e) => panic!("broadcast while NATS recovers: {e}\n{}", a.logs()),
        };
        if status == 201 {
            break;
        }
        assert!(Instant::now() < deadline, "writes did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Health follows within a few seconds (it checks the stream every second).
    let deadline = Instant::now() + WAIT;
    while a.client.get(a.url("/health")).send().await.unwrap().status() != 200 {
        assert!(Instant::now() < deadline, "health not ready again although writes work");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (messages, _, _) = b.read("f", &offset).await;
    assert_eq!(messages.last(), Some(&json!({"after": true})));
}

#[tokio::test]
async fn waiting_readers_re_read_after_their_node_reconnects_to_nats() {
    let mut cluster = NatsCluster::start();
    let (da, db) = (temp_dir(), temp_dir());
    // B knows one NATS server only (it learns the others from it); A another one.
    let a = {
        let mut args = vec!["--public_streams", "--broadcast_key", KEY, "--broker", "nats", "--nats_stream", "N"];
        let url = cluster.url(0);
        args.extend(["--nats_servers", url.as_str()]);
        Server::start(da.path(), &args)
    };
    let b = {
        let url = cluster.url(2);
        let args = [
            "--public_streams",
            "--broadcast_key",
            KEY,
            "--broker",
            "nats",
            "--nats_stream",
            "N",
            "--nats_servers",
            url.as_str(),
            "--ds_poll_interval",
            "60",
        ];
        Server::start(db.path(), &args)
    };
    a.publish("n", numbered(1..=1)).await;
    let tail = b.tail("n").await;
    let mut sse = SseClient::open(&b, &format!("n?offset={tail}&live=sse")).await;
    sse.next_batch(WAIT).await.expect("the first control event");
    // A long-poll that waits 60 s: only a re-read after the reconnect answers it in time.
    let poll = {
        let (client, url) = (b.client.clone(), b.ds("n"));
        let tail = tail.clone();
        tokio::spawn(async move {
            loop {
                let response = client.get(format!("{url}?offset={tail}&live=long-poll")).send().await.unwrap();
                // 503 while the stream elects a new leader: the client asks again.
                if response.status() != 503 {
                    return response;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    b.wait_for_metric("ds_poll_clients_num", 1.0, WAIT).await;
    // B's server goes away; while B reconnects elsewhere, a broadcast lands through A. Its
    // wake-up may never reach B: B's waiting readers must re-read on their own once B is back.
    cluster.kill(2);
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, _) = a.broadcast(&json!({"stream": "n", "data": "{\"n\":2}"}).to_string()).await;
        if status == 201 {
            break;
        }
        assert!(Instant::now() < deadline, "writes did not resume after losing one NATS server");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let response = tokio::time::timeout(WAIT, poll).await.expect("the long-poll on B was answered in time").unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Vec<Value>>().await.unwrap(), numbered(2..=2));
    // The SSE reader gets it too; if a read failed during the election its response ended,
    // and it comes back from its offset, as clients do.
    let mut offset = tail.clone();
    let messages = loop {
        match sse.next_batch(WAIT).await {
            Some((messages, _)) if !messages.is_empty() => break messages,
            Some((_, control)) => offset = control["streamNextOffset"].as_str().unwrap().to_string(),
            None => {
                assert!(Instant::now() < deadline + WAIT, "the SSE reader on B never got the message");
                sse = SseClient::open(&b, &format!("n?offset={offset}&live=sse")).await;
            }
        }
    };
    assert_eq!(messages, numbered(2..=2));
    assert!(b.logs().contains("NATS connection (re)established"), "{}", b.logs());
}

#[tokio::test]
async fn the_readers_of_a_lost_node_resume_on_another_with_exactly_the_rest() {
    let cluster = NatsCluster::start();
    let (da, db) = (temp_dir(), temp_dir());
    let mut a = cluster_node(da.path(), &cluster, "L", &[]);
    let b = cluster_node(db.path(), &cluster, "L", &[]);
    b.publish("l", numbered(1..=3)).await;
    let mut sse = SseClient::open(&a, "l?offset=-1&live=sse").await;
    let (messages, control) = sse.next_batch(WAIT).await.expect("the backlog from node A");
    assert_eq!(messages, numbered(1..=3));
    let offset = control["streamNextOffset"].as_str().unwrap().to_string();
    a.kill();
    b.publish("l", numbered(4..=6)).await;
    // The reader comes back through node B with its last offset: exactly the rest.
    let mut sse = SseClient::open(&b, &format!("l?offset={offset}&live=sse")).await;
    let (messages, _) = sse.next_batch(WAIT).await.expect("the rest from node B");
    assert_eq!(messages, numbered(4..=6));
}

/// A stream made by an older anycable-ds (its history_limit in JetStream's
/// `max_msgs_per_subject`, no per-message TTL, no producers' subjects) is moved to this layout by a node with the same
/// retention, which reads its messages on, and refused to a node with other retention.
#[tokio::test]
async fn a_stream_made_by_an_older_version_is_moved_to_this_layout() {
    use async_nats::jetstream::stream;
    let cluster = NatsCluster::start();
    let js = async_nats::jetstream::new(async_nats::connect(cluster.url(0)).await.unwrap());
    let old = stream::Config {
        name: "OLD".into(),
        subjects: vec!["OLD.s.*".into()],
        max_messages_per_subject: 5,
        max_age: Duration::from_secs(300),
        num_replicas: 3,
        allow_direct: true,
        allow_atomic_publish: true,
        duplicate_window: Duration::from_secs(120),
        republish: Some(stream::Republish {
            source: "OLD.s.*".into(),
            destination: "OLD.w.{{wildcard(1)}}".into(),
            headers_only: true,
        }),
        metadata: [("anycable_ds_epoch".to_string(), "oldepoch01".to_string())].into(),
        ..Default::default()
    };
    js.create_stream(old).await.unwrap();
    // Two messages of stream "o" as the older version stored them (subject token: `s` +
    // base64url of the name).
    for n in 1..=2u64 {
        js.publish("OLD.s.sbw", json!({"n": n}).to_string().into()).await.unwrap().await.unwrap();
    }
    let refused = temp_dir();
    let stderr = refused_start(refused.path(), &cluster, "OLD", "7");
    assert!(stderr.contains("broker.history_limit: the stream has 5, this node 7"), "{stderr}");

    let dir = temp_dir();
    let a = cluster_node(dir.path(), &cluster, "OLD", &["--history_limit", "5"]);
    assert_eq!(a.read("o", "-1").await.0, numbered(1..=2), "the older version's messages");
    let info = js.get_stream("OLD").await.unwrap().cached_info().config.clone();
    assert_eq!((info.max_messages_per_subject, info.allow_message_ttl), (-1, true));
    assert!(info.allow_rollup && info.subjects.contains(&"OLD.p.*.*".to_string()), "producers' records: {info:?}");
    assert_eq!(info.metadata.get("anycable_ds_history_limit").map(String::as_str), Some("5"));
    a.publish("o", numbered(3..=8)).await;
    assert_eq!(a.read("o", "-1").await.0, numbered(4..=8), "history_limit applied by the node now");
}
