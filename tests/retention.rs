//! Retention as a user meets it: streams go quiet for longer than `history_ttl` (the default
//! configuration's everyday case), their messages expire, the streams are removed from disk,
//! and every reader keeps working: from the start, from a saved token, from the tail, live.
//! Short TTLs (1 s) stand in for the default 300 s; the tests wait for the events (an empty
//! read, the removal metric), not for fixed times.

mod common;

use std::time::Duration;

use common::{header, numbered, read_parts, seq_of, temp_dir, token_at, Server, SseClient};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(15);

/// Reads `stream` from `-1` until every message has expired (the read answers `[]`).
async fn wait_until_expired(server: &Server, stream: &str) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (messages, next, up_to_date) = server.read(stream, "-1").await;
        if messages.is_empty() {
            assert!(up_to_date);
            return next;
        }
        assert!(std::time::Instant::now() < deadline, "{stream} never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_expired_stream_answers_its_tail_and_keeps_its_readers_working() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--history_ttl", "1", "--ds_poll_interval", "30"]);
    server.publish("room", numbered(1..=3)).await;
    let tail = server.tail("room").await;
    assert_eq!(seq_of(&tail), 3);
    // A live reader keeps the stream watched (so it is not removed): only its messages go.
    let mut sse = SseClient::open(&server, &format!("room?offset={tail}&live=sse")).await;
    assert_eq!(sse.next_batch(WAIT).await.unwrap().0, Vec::<Value>::new());

    // From the start: nothing, and the tail, never a position before the deleted messages,
    // both while the expired messages are still on disk and once retention deleted them.
    let next = wait_until_expired(&server, "room").await;
    assert_eq!(next, tail);
    server.wait_for_metric("ds_messages_trimmed_total", 3.0, WAIT).await;
    let (messages, next, _) = server.read("room", "-1").await;
    assert!(messages.is_empty());
    assert_eq!(next, tail, "a read from the start of an expired stream answers the tail");
    assert_eq!(server.tail("room").await, tail);
    // A token inside the deleted range is a gap; the tail is not.
    for inside in [0, 1, 2] {
        let response = server.get(&format!("room?offset={}", token_at(&tail, inside))).await;
        assert_eq!(response.status(), 410, "token {inside} is inside the deleted range");
        assert_eq!(response.json::<Value>().await.unwrap()["error"], "offset is no longer available");
    }
    let (messages, next, up_to_date) = server.read("room", &tail).await;
    assert_eq!((messages.len(), next.as_str(), up_to_date), (0, tail.as_str(), true));

    // The next broadcast reaches every reader that took the tail from the answers above.
    let poll = tokio::spawn(server.client.get(server.ds(&format!("room?offset={next}&live=long-poll"))).send());
    server.wait_for_metric("ds_poll_clients_num", 1.0, WAIT).await;
    server.publish("room", [json!({"n": 4})]).await;
    let polled = poll.await.unwrap().unwrap();
    assert_eq!(polled.status(), 200);
    let (messages, polled_next, _) = read_parts(polled).await;
    assert_eq!(messages, [json!({"n": 4})]);
    assert_eq!(seq_of(&polled_next), 4, "numbers continue after the expired ones");
    let (messages, control) = sse.next_batch(WAIT).await.unwrap();
    assert_eq!(messages, [json!({"n": 4})]);
    assert_eq!(control["streamNextOffset"], polled_next);
    let (messages, _, _) = server.read("room", &tail).await;
    assert_eq!(messages, [json!({"n": 4})]);
    let (messages, _, _) = server.read("room", "-1").await;
    assert_eq!(messages, [json!({"n": 4})]);
}

#[tokio::test]
async fn a_removed_stream_keeps_its_readers_tokens_and_never_reuses_a_number() {
    let dir = temp_dir();
    let mut server = Server::start(dir.path(), &["--history_ttl", "1"]);
    server.publish("quiet", numbered(1..=3)).await;
    let tail = server.tail("quiet").await;
    // Nobody watches it: once its messages expire, the stream is removed from disk.
    server.wait_for_metric("ds_streams_removed_total", 1.0, WAIT).await;
    // Its tombstone keeps its offsets from running backwards: HEAD and a read from the start
    // answer its old tail, the tail token still reads, a token before it missed messages
    // (410, never a silent skip), and one no stream ever handed out is refused.
    assert_eq!(server.tail("quiet").await, tail);
    let (messages, next, _) = server.read("quiet", "-1").await;
    assert_eq!((messages.len(), next.as_str()), (0, tail.as_str()));
    let (messages, next, up_to_date) = server.read("quiet", &tail).await;
    assert_eq!((messages.len(), next.as_str(), up_to_date), (0, tail.as_str(), true));
    for missed in [0, 1, 2, 4] {
        assert_eq!(server.get(&format!("quiet?offset={}", token_at(&tail, missed))).await.status(), 410, "{missed}");
    }

    // Reopened by a broadcast, the stream numbers above everything it handed out before.
    let poll = tokio::spawn(server.client.get(server.ds(&format!("quiet?offset={tail}&live=long-poll"))).send());
    server.wait_for_metric("ds_poll_clients_num", 1.0, WAIT).await;
    server.publish("quiet", [json!({"n": 4})]).await;
    let (messages, next, _) = read_parts(poll.await.unwrap().unwrap()).await;
    assert_eq!(messages, [json!({"n": 4})]);
    assert_eq!(seq_of(&next), 4);
    let response = server.get(&format!("quiet?offset={}", token_at(&tail, 0))).await;
    assert_eq!(response.status(), 410, "a reader from before the first life missed messages 1 to 3");

    // Any new stream starts above the floor; the floor survives a crash (a durable append
    // after the removal makes the removal durable too: sled recovers a prefix of its log).
    server.wait_for_metric("ds_streams_removed_total", 2.0, WAIT).await;
    server.publish("fresh", [json!({"n": 1})]).await;
    assert_eq!(seq_of(&server.tail("fresh").await), 5);
    server.kill();
    server.restart();
    server.publish("fresher", [json!({"n": 1})]).await;
    assert_eq!(seq_of(&server.tail("fresher").await), 5);
    assert_eq!(seq_of(&server.tail("fresh").await), 5);
    let (messages, next_after, _) = server.read("quiet", &next).await;
    assert_eq!((messages.len(), next_after), (0, next), "the removed stream's last token still reads");
}

#[tokio::test]
async fn readers_that_start_from_an_expired_stream_get_the_next_message() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--history_ttl", "1", "--ds_poll_interval", "1", "--ds_sse_ttl", "1"]);
    server.publish("live", numbered(1..=2)).await;
    let tail = server.tail("live").await;
    server.wait_for_metric("ds_messages_trimmed_total", 2.0, WAIT).await;
    // A page that opens now reads from the start, then follows live from what it was told,
    // reconnecting every second: the tail, before and after the stream's removal (its
    // tombstone keeps it).
    let (messages, start, _) = server.read("live", "-1").await;
    assert!(messages.is_empty());
    assert_eq!(start, tail);
    let poller = {
        let (client, url) = (server.client.clone(), server.ds("live"));
        let mut offset = start.clone();
        tokio::spawn(async move {
            loop {
                let response = client.get(format!("{url}?offset={offset}&live=long-poll")).send().await.unwrap();
                match response.status().as_u16() {
                    204 => offset = header(&response, "stream-next-offset").unwrap(),
                    200 => return read_parts(response).await,
                    other => panic!("long-poll answered {other}"),
                }
            }
        })
    };
    let sse_reader = {
        let server_url = server.ds("live");
        let client = server.client.clone();
        let mut offset = start.clone();
        tokio::spawn(async move {
            loop {
                let response = client.get(format!("{server_url}?offset={offset}&live=sse")).send().await.unwrap();
                assert_eq!(response.status(), 200, "SSE reconnect from {offset}");
                let text = response.text().await.unwrap(); // ends with the TTL
                for block in text.split("\n\n") {
                    if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data:")) {
                        let value: Value = serde_json::from_str(data).unwrap();
                        if block.contains("event: data") {
                            return value;
                        }
                        offset = value["streamNextOffset"].as_str().unwrap().to_string();
                    }
                }
            }
        })
    };
    server.wait_for_metric("ds_poll_clients_num", 1.0, WAIT).await;
    server.publish("live", [json!({"n": 3})]).await;
    let (messages, next, _) = poller.await.unwrap();
    assert_eq!(messages, [json!({"n": 3})]);
    assert_eq!(seq_of(&next), 3);
    assert_eq!(sse_reader.await.unwrap(), json!([{"n": 3}]));
    // (No catch-up from `start` here: with a 1 s TTL, message 3 may already be deleted by
    // then, and a 410 for a reader that missed it is the right answer. It failed that way on
    // a loaded machine.)
}
