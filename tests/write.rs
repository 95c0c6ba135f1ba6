//! The Durable Streams write API (`PUT`, `POST`, `DELETE`) as AnyCable users meet it: the
//! broadcast key, broadcasts and `PUT` streams in one log, retention, byte streams in every
//! read mode, closure waking live readers, bad input, and `kill -9`. The protocol's fine
//! print is the official conformance suite's job (`tests/conformance`).
//!
//! Every test runs on both engines (`ANYCABLE_DS_TEST_ENGINE`, see `tests/common`; `scripts/test`
//! runs this file again in cluster mode). On NATS, `kill -9` kills the node, and what must
//! survive is what JetStream acknowledged; what only a cluster has (several nodes writing one
//! stream) is in `tests/cluster_writes.rs`.

mod common;

use std::time::Duration;

use common::ds_write::{bytes, close, post, produce, produced, put, refused, rfc3339, same_stream_seq, write};
use common::{header, temp_dir, Server, SseClient};
use serde_json::{json, Value};

#[tokio::test]
async fn writes_need_the_broadcast_key_and_can_be_turned_off() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &[]);
    for method in [reqwest::Method::PUT, reqwest::Method::POST, reqwest::Method::DELETE] {
        let response = server.client.request(method.clone(), server.ds("locked")).body("x").send().await.unwrap();
        assert_eq!(refused(response).await, (401, "unauthorized".to_string()), "{method}");
        let response =
            server.client.request(method.clone(), server.ds("locked")).bearer_auth("wrong").send().await.unwrap();
        assert_eq!(response.status(), 401, "{method}");
    }
    assert_eq!(put(&server, "locked", "text/plain", b"").await.status(), 201);
    assert_eq!(post(&server, "locked", "text/plain", b"a".to_vec()).await.status(), 204);
    assert_eq!(bytes(&server, "locked").await, b"a", "only the keyed append was stored");

    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--ds_writes", "false"]);
    for method in [reqwest::Method::PUT, reqwest::Method::POST, reqwest::Method::DELETE] {
        let response = write(&server, method.clone(), "off").body("x").send().await.unwrap();
        assert_eq!(header(&response, "allow").as_deref(), Some("GET, HEAD, OPTIONS"));
        assert_eq!(refused(response).await.0, 405, "{method}");
    }
    server.publish("off", [json!(1)]).await;
    assert_eq!(server.read("off", "-1").await.0, vec![json!(1)], "broadcasts still work");
}

#[tokio::test]
async fn broadcasts_and_put_streams_share_one_log_and_conflicts_store_nothing() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &[]);
    // A JSON stream made by PUT takes broadcasts; reads show both kinds of writes in order.
    assert_eq!(put(&server, "room", "application/json", b"[{\"n\":1}]").await.status(), 201);
    server.publish("room", [json!({"n": 2})]).await;
    assert_eq!(post(&server, "room", "application/json", b"{\"n\":3}".to_vec()).await.status(), 204);
    assert_eq!(server.read("room", "-1").await.0, vec![json!({"n":1}), json!({"n":2}), json!({"n":3})]);

    // A text stream and a closed stream refuse broadcasts, and a batch naming one of them
    // stores nothing at all.
    assert_eq!(put(&server, "text", "text/plain", b"hello").await.status(), 201);
    let batch = json!([{"stream": "fresh", "data": "1"}, {"stream": "text", "data": "2"}]).to_string();
    let (status, body) = server.broadcast(&batch).await;
    assert_eq!((status, body["error"].as_str()), (409, Some("content_type_mismatch")), "{body}");
    assert_eq!(close(&server, "room").await.status(), 204);
    let batch = json!([{"stream": "fresh", "data": "1"}, {"stream": "room", "data": "2"}]).to_string();
    let (status, body) = server.broadcast(&batch).await;
    assert_eq!((status, body["error"].as_str()), (409, Some("stream_closed")), "{body}");
    assert_eq!(server.read("fresh", "-1").await.0, Vec::<Value>::new(), "nothing of either batch");
    assert_eq!(bytes(&server, "text").await, b"hello");
    assert_eq!(server.read("room", "-1").await.0.len(), 3);

    // A PUT on a broadcast stream compares as a JSON stream without TTL.
    server.publish("made-by-broadcast", [json!(1)]).await;
    assert_eq!(put(&server, "made-by-broadcast", "application/json", b"").await.status(), 200);
    assert_eq!(put(&server, "made-by-broadcast", "text/plain", b"").await.status(), 409);
}

#[tokio::test]
async fn anycable_retention_trims_broadcast_streams_but_never_put_streams() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--history_limit", "2"]);
    assert_eq!(put(&server, "kept", "application/json", b"[1,2,3]").await.status(), 201);
    for n in 4..=6 {
        assert_eq!(post(&server, "kept", "application/json", n.to_string().into_bytes()).await.status(), 204);
        server.publish("trimmed", [json!(n)]).await;
    }
    assert_eq!(server.read("kept", "-1").await.0, (1..=6).map(|n| json!(n)).collect::<Vec<_>>());
    assert_eq!(server.read("trimmed", "-1").await.0, vec![json!(5), json!(6)]);
}

#[tokio::test]
async fn every_byte_value_survives_catch_up_long_poll_and_sse() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &[]);
    let all: Vec<u8> = (0..=255).collect();
    let created = put(&server, "bin", "application/octet-stream", b"").await;
    assert_eq!(header(&created, "location"), Some(server.ds("bin")));
    let tail = header(&created, "stream-next-offset").unwrap();
    assert_eq!(post(&server, "bin", "application/octet-stream", all.clone()).await.status(), 204);
    assert_eq!(post(&server, "bin", "application/octet-stream", b"\r\n\0".to_vec()).await.status(), 204);
    let mut expected = all.clone();
    expected.extend_from_slice(b"\r\n\0");
    assert_eq!(bytes(&server, "bin").await, expected);

    let poll = server.get(&format!("bin?offset={tail}&live=long-poll")).await;
    assert_eq!(poll.status(), 200);
    assert_eq!(header(&poll, "content-type").as_deref(), Some("application/octet-stream"));
    assert_eq!(poll.bytes().await.unwrap().to_vec(), expected);

    let response = server.get("bin?offset=-1&live=sse").await;
    assert_eq!(header(&response, "stream-sse-data-encoding").as_deref(), Some("base64"));
    drop(response);
    let mut sse = SseClient::open(&server, "bin?offset=-1&live=sse").await;
    let data = sse.next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(data.event, "data");
    use base64::Engine as _;
    assert_eq!(base64::engine::general_purpose::STANDARD.decode(&data.data).unwrap(), expected);
    assert_eq!(sse.next(Duration::from_secs(10)).await.unwrap().event, "control");
}

#[tokio::test]
async fn closing_wakes_waiting_long_polls_and_ends_sse() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--ds_poll_interval", "30"]);
    let created = put(&server, "ending", "text/plain", b"line one\nline two").await;
    let tail = header(&created, "stream-next-offset").unwrap();
    let mut sse = SseClient::open(&server, &format!("ending?offset={tail}&live=sse")).await;
    assert_eq!(sse.next(Duration::from_secs(10)).await.unwrap().event, "control");
    let waiting = {
        let (client, url) = (server.client.clone(), server.ds(&format!("ending?offset={tail}&live=long-poll")));
        tokio::spawn(async move { client.get(url).send().await.unwrap() })
    };
    server.wait_for_metric("ds_poll_clients_num", 1.0, Duration::from_secs(10)).await;
    let closed = write(&server, reqwest::Method::POST, "ending")
        .header("content-type", "text/plain")
        .header("stream-closed", "true")
        .body("last\r\nwords")
        .send()
        .await
        .unwrap();
    assert_eq!(closed.status(), 204);
    assert_eq!(header(&closed, "stream-closed").as_deref(), Some("true"));

    // The waiting long-poll gets the last message, then a poll at the end is a 204 at once.
    let woken = tokio::time::timeout(Duration::from_secs(10), waiting).await.unwrap().unwrap();
    assert_eq!(woken.status(), 200);
    assert_eq!(header(&woken, "stream-closed").as_deref(), Some("true"));
    let end = header(&woken, "stream-next-offset").unwrap();
    assert_eq!(woken.text().await.unwrap(), "last\r\nwords");
    let started = std::time::Instant::now();
    let at_end = server.get(&format!("ending?offset={end}&live=long-poll")).await;
    assert_eq!((at_end.status().as_u16(), header(&at_end, "stream-closed").as_deref()), (204, Some("true")));
    assert!(started.elapsed() < Duration::from_secs(5));

    // SSE: the data (text mode, one data line per line), then the final control, then the end.
    let data = sse.next(Duration::from_secs(10)).await.unwrap();
    assert_eq!((data.event.as_str(), data.data.as_str()), ("data", "last\nwords"));
    let control = sse.next(Duration::from_secs(10)).await.unwrap().json();
    assert_eq!(control["streamClosed"], json!(true));
    assert!(control.get("streamCursor").is_none(), "{control}");
    assert!(sse.next(Duration::from_secs(10)).await.is_none(), "the response ends");

    // Appending to a closed stream is refused with its final offset.
    let late = post(&server, "ending", "text/plain", b"x".to_vec()).await;
    assert_eq!(header(&late, "stream-next-offset").as_deref(), Some(end.as_str()));
    assert_eq!(refused(late).await, (409, "stream_closed".to_string()));
}

#[tokio::test]
async fn concurrent_appends_with_one_stream_seq_are_accepted_once() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &[]);
    assert_eq!(put(&server, "seq", "text/plain", b"").await.status(), 201);
    for round in 0..20 {
        let statuses = same_stream_seq(&[&server], "seq", round, 8).await;
        assert_eq!(statuses.iter().filter(|&&s| s == 204).count(), 1, "round {round}: {statuses:?}");
        assert_eq!(statuses.iter().filter(|&&s| s == 409).count(), 7, "round {round}: {statuses:?}");
    }
    let text = String::from_utf8(bytes(&server, "seq").await).unwrap();
    assert_eq!(text.matches(';').count(), 20, "{text}");
}

#[tokio::test]
async fn bad_writes_get_a_clear_4xx_and_store_nothing() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--ds_max_append_bytes", "1024", "--ds_implicit_streams", "false"]);
    assert_eq!(put(&server, "j", "application/json", b"[1]").await.status(), 201);
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (write(&server, reqwest::Method::PUT, "t").header("stream-ttl", "00060"), 400, "Stream-TTL"),
        (write(&server, reqwest::Method::PUT, "t").header("stream-ttl", "99999999999999999999999"), 400, "Stream-TTL"),
        (write(&server, reqwest::Method::PUT, "t").header("stream-expires-at", "tomorrow"), 400, "Stream-Expires-At"),
        (
            write(&server, reqwest::Method::PUT, "t")
                .header("stream-ttl", "5")
                .header("stream-expires-at", "2030-01-01T00:00:00Z"),
            400,
            "both",
        ),
        (write(&server, reqwest::Method::PUT, "t").header("content-type", "application/json").body("{"), 400, "JSON"),
        (write(&server, reqwest::Method::PUT, "t").body(vec![b'x'; 2048]), 413, "ds.max_append_bytes"),
        (
            write(&server, reqwest::Method::POST, "j").header("content-type", "application/json").body("[]"),
            400,
            "empty",
        ),
        (write(&server, reqwest::Method::POST, "j").header("content-type", "application/json").body("{"), 400, "JSON"),
        (write(&server, reqwest::Method::POST, "j").body("1"), 400, "Content-Type"),
        (write(&server, reqwest::Method::POST, "j").header("content-type", "application/json"), 400, "empty body"),
        (
            write(&server, reqwest::Method::POST, "j").header("content-type", "text/plain").body("1"),
            409,
            "content_type",
        ),
        (write(&server, reqwest::Method::POST, "j").header("stream-seq", ""), 400, "Stream-Seq"),
        (write(&server, reqwest::Method::POST, "j").header("producer-id", "p"), 400, "all three"),
        (
            write(&server, reqwest::Method::POST, "j")
                .header("producer-id", "p")
                .header("producer-epoch", "0")
                .header("producer-seq", "9007199254740992"),
            400,
            "Producer-Seq",
        ),
        (write(&server, reqwest::Method::PUT, "f").header("stream-forked-from", "/ds/missing"), 404, "fork source"),
        (
            write(&server, reqwest::Method::POST, "missing").header("content-type", "application/json").body("1"),
            404,
            "stream_not_found",
        ),
        (write(&server, reqwest::Method::DELETE, "missing"), 404, "stream_not_found"),
    ];
    for (request, status, needle) in cases {
        let (got, error) = refused(request.send().await.unwrap()).await;
        assert_eq!(got, status, "{needle}: {error}");
        assert!(error.contains(needle), "{needle}: {error}");
    }
    assert_eq!(server.read("j", "-1").await.0, vec![json!(1)], "nothing appended");
    for stream in ["t", "f", "missing"] {
        assert_eq!(server.get(&format!("{stream}?offset=-1")).await.status(), 404, "{stream} was not created");
    }
}

#[tokio::test]
async fn a_deleted_stream_can_be_created_again_at_once_and_starts_empty() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--ds_implicit_streams", "false"]);
    assert_eq!(put(&server, "again", "text/plain", b"old").await.status(), 201);
    let delete = write(&server, reqwest::Method::DELETE, "again").send().await.unwrap();
    assert_eq!(delete.status(), 204);
    assert_eq!(server.get("again?offset=-1").await.status(), 404);
    assert_eq!(server.client.head(server.ds("again")).send().await.unwrap().status(), 404);
    let created = put(&server, "again", "application/json", b"[\"new\"]").await;
    assert_eq!(created.status(), 201);
    assert_eq!(server.read("again", "-1").await.0, vec![json!("new")]);
}

/// Everything a write acknowledged survives `kill -9`: content, content type, closure, TTL,
/// and the `Stream-Seq` state (a repeat is still refused). (In cluster mode the node
/// restarts on the same JetStream stream.)
#[tokio::test]
async fn acknowledged_writes_and_their_metadata_survive_kill_9() {
    let dir = temp_dir();
    let mut server = Server::start(dir.path(), &["--ds_implicit_streams", "false"]);
    let ttl = write(&server, reqwest::Method::PUT, "ttl").header("stream-ttl", "3600").send().await.unwrap();
    assert_eq!(ttl.status(), 201);
    assert_eq!(put(&server, "text", "text/plain; charset=utf-8", b"a").await.status(), 201);
    let seq = |server: &Server, s: &'static str| {
        write(server, reqwest::Method::POST, "text")
            .header("content-type", "text/plain")
            .header("stream-seq", s)
            .body(s)
    };
    assert_eq!(seq(&server, "1").send().await.unwrap().status(), 204);
    assert_eq!(seq(&server, "2").send().await.unwrap().status(), 204);
    assert_eq!(put(&server, "done", "application/json", b"[1]").await.status(), 201);
    assert_eq!(close(&server, "done").await.status(), 204);
    server.kill();
    server.restart();

    assert_eq!(bytes(&server, "text").await, b"a12");
    let head = server.client.head(server.ds("text")).send().await.unwrap();
    assert_eq!(header(&head, "content-type").as_deref(), Some("text/plain; charset=utf-8"));
    assert_eq!(refused(seq(&server, "2").send().await.unwrap()).await.0, 409, "Stream-Seq state survived");
    let head = server.client.head(server.ds("ttl")).send().await.unwrap();
    assert_eq!(header(&head, "stream-ttl").as_deref(), Some("3600"));
    let head = server.client.head(server.ds("done")).send().await.unwrap();
    assert_eq!(header(&head, "stream-closed").as_deref(), Some("true"));
    assert_eq!(refused(post(&server, "done", "application/json", b"2".to_vec()).await).await.0, 409);
}

/// An idempotent producer's state survives `kill -9` with the stream (a retry of an applied
/// request is still a duplicate, a zombie epoch still fenced), and goes with it: the stream
/// made next under the name has never seen the producer.
#[tokio::test]
async fn producer_state_survives_kill_9_and_goes_with_its_stream() {
    let dir = temp_dir();
    let mut server = Server::start(dir.path(), &["--ds_implicit_streams", "false"]);
    assert_eq!(put(&server, "p", "text/plain", b"").await.status(), 201);
    let send = |server: &Server, epoch, seq, body: &str| produce(server, "p", "writer", (epoch, seq), body.to_string());
    let ok = |epoch: u64, seq: u64| (200, Some(epoch.to_string()), Some(seq.to_string()));
    assert_eq!(produced(&send(&server, 1, 0, "a").send().await.unwrap()), ok(1, 0));
    assert_eq!(produced(&send(&server, 1, 1, "b").send().await.unwrap()), ok(1, 1));
    server.kill();
    server.restart();

    let retry = send(&server, 1, 0, "a").send().await.unwrap();
    assert_eq!(produced(&retry), (204, Some("1".into()), Some("1".into())), "a duplicate names the highest seq");
    let zombie = send(&server, 0, 2, "z").send().await.unwrap();
    assert_eq!((zombie.status().as_u16(), header(&zombie, "producer-epoch")), (403, Some("1".into())));
    let gap = send(&server, 1, 3, "x").send().await.unwrap();
    assert_eq!(
        (gap.status().as_u16(), header(&gap, "producer-expected-seq"), header(&gap, "producer-received-seq")),
        (409, Some("2".into()), Some("3".into()))
    );
    // Append-and-close with the producer; its retry is a duplicate of the close.
    let last = send(&server, 1, 2, "c").header("stream-closed", "true").send().await.unwrap();
    assert_eq!((produced(&last), header(&last, "stream-closed")), (ok(1, 2), Some("true".into())));
    let again = send(&server, 1, 2, "c").header("stream-closed", "true").send().await.unwrap();
    assert_eq!((again.status().as_u16(), header(&again, "stream-closed")), (204, Some("true".into())));
    assert_eq!(bytes(&server, "p").await, b"abc");

    assert_eq!(write(&server, reqwest::Method::DELETE, "p").send().await.unwrap().status(), 204);
    assert_eq!(put(&server, "p", "text/plain", b"").await.status(), 201);
    let fresh = send(&server, 1, 1, "late").send().await.unwrap();
    assert_eq!(header(&fresh, "producer-expected-seq").as_deref(), Some("0"), "a new stream knows no producer");
    assert_eq!(produced(&send(&server, 0, 0, "new").send().await.unwrap()), ok(0, 0), "not a duplicate");
    assert_eq!(bytes(&server, "p").await, b"new");
}

/// AnyCable's default (implicit streams): a deleted stream's readers learn what they missed.
/// Its tombstone keeps its offsets from running backwards, a token before its end is `410`,
/// its end token reads nothing, and the stream made next under the name is another one: no old
/// token reads it. Once the tombstone is swept (`storage.tombstone_ttl`), old tokens are `410`.
#[tokio::test]
async fn a_deleted_stream_leaves_a_tombstone_and_old_tokens_never_read_its_successor() {
    // Tombstones are the embedded engine's (src/storage/tombstones.rs); cluster mode answers
    // removed lives by its own rules (src/cluster/mod.rs): HEAD moves past the old tail, and
    // every old token, the tail's too, is 410 (docs/DECISIONS.md).
    if common::nats_engine() {
        return;
    }
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--tombstone_ttl", "2"]);
    assert_eq!(put(&server, "gone", "application/json", b"[1,2,3]").await.status(), 201);
    let end = server.tail("gone").await;
    let after_one = common::token_at(&end, common::seq_of(&end) - 2);
    assert_eq!(write(&server, reqwest::Method::DELETE, "gone").send().await.unwrap().status(), 204);

    assert_eq!(server.tail("gone").await, end, "HEAD: the old tail, not 0");
    let (messages, next, _) = server.read("gone", "-1").await;
    assert_eq!((messages.len(), next.as_str()), (0, end.as_str()));
    assert_eq!(server.read("gone", &end).await.0.len(), 0);
    assert_eq!(server.get(&format!("gone?offset={after_one}")).await.status(), 410, "messages 2 and 3 were missed");

    // A new stream under the name: neither old token reads it as if nothing happened.
    assert_eq!(put(&server, "gone", "application/json", b"[\"new\"]").await.status(), 201);
    for old in [&end, &after_one] {
        assert_eq!(server.get(&format!("gone?offset={old}")).await.status(), 410, "{old}");
    }
    assert_eq!(server.read("gone", "-1").await.0, vec![json!("new")]);

    // A tombstone lives for storage.tombstone_ttl, then its tail token is refused too.
    assert_eq!(put(&server, "brief", "text/plain", b"x").await.status(), 201);
    let brief_end = server.tail("brief").await;
    assert_eq!(write(&server, reqwest::Method::DELETE, "brief").send().await.unwrap().status(), 204);
    assert_eq!(server.get(&format!("brief?offset={brief_end}")).await.status(), 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while server.get(&format!("brief?offset={brief_end}")).await.status() != 410 {
        assert!(std::time::Instant::now() < deadline, "the tombstone was never swept");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(common::seq_of(&server.tail("brief").await), 0, "no tombstone: an unknown stream");
}

/// A stream past its `Stream-TTL` that nobody touches again leaves the disk (swept from the
/// expiry index), while one that is read on stays; requests never see an expired stream.
#[tokio::test]
async fn streams_past_their_ttl_are_swept_while_renewed_ones_stay() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--ds_implicit_streams", "false"]);
    for name in ["idle", "busy"] {
        let created = write(&server, reqwest::Method::PUT, name).header("stream-ttl", "1").send().await.unwrap();
        assert_eq!(created.status(), 201);
    }
    let soon = (std::time::SystemTime::now() + Duration::from_millis(1500))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let at = rfc3339(soon);
    let dated = write(&server, reqwest::Method::PUT, "dated").header("stream-expires-at", at).send().await.unwrap();
    assert_eq!(dated.status(), 201);
    // Keep "busy" alive with reads while the other two expire and are swept.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while server.metric("ds_streams_removed_total").await < 2.0 {
        assert!(std::time::Instant::now() < deadline, "expired streams were not swept");
        assert_eq!(server.get("busy?offset=-1").await.status(), 200, "a stream read on never expires");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for gone in ["idle", "dated"] {
        assert_eq!(server.client.head(server.ds(gone)).send().await.unwrap().status(), 404, "{gone}");
    }
    assert_eq!(server.get("busy?offset=-1").await.status(), 200);
    // Left alone, it goes too.
    server.wait_for_metric("ds_streams_removed_total", 3.0, Duration::from_secs(20)).await;
    assert_eq!(server.client.head(server.ds("busy")).send().await.unwrap().status(), 404);
}
