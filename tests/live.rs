//! Live reads: long-poll and SSE, woken by the notify hub; disconnects; shutdown.

mod common;

use std::time::{Duration, Instant};

use common::{header, numbered, read_parts, temp_dir, Server, SseClient};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn long_poll_times_out_with_204_and_the_three_headers() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--ds_poll_interval", "1"]);
    server.publish("s", numbered(1..=2)).await;
    let tail = server.tail("s").await;
    let started = Instant::now();
    let response = server.get(&format!("s?offset={tail}&live=long-poll")).await;
    let waited = started.elapsed();
    assert_eq!(response.status(), 204);
    assert!(waited >= Duration::from_millis(950) && waited < Duration::from_secs(3), "{waited:?}");
    assert_eq!(header(&response, "stream-next-offset"), Some(tail));
    assert_eq!(header(&response, "stream-up-to-date").as_deref(), Some("true"));
    assert!(header(&response, "stream-cursor").is_some_and(|c| c.parse::<u64>().is_ok()));
}

#[tokio::test]
async fn long_poll_answers_at_once_when_data_exists() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &[]);
    server.publish("s", numbered(1..=3)).await;
    let started = Instant::now();
    let response = server.get("s?offset=-1&live=long-poll").await;
    assert_eq!(response.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(2));
    let (messages, _, up_to_date) = read_parts(response).await;
    assert_eq!(messages, numbered(1..=3));
    assert!(up_to_date);
}

#[tokio::test]
async fn a_waiting_long_poll_gets_all_new_messages_right_after_the_broadcast() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--ds_poll_interval", "30"]);
    server.publish("s", numbered(1..=1)).await;
    let tail = server.tail("s").await;
    let poll = tokio::spawn({
        let request = server.client.get(server.ds(&format!("s?offset={tail}&live=long-poll")));
        async move {
            let response = request.send().await.unwrap();
            (Instant::now(), response)
        }
    });
    server.wait_for_metric("ds_poll_clients_num", 1.0, WAIT).await;
    let batch = json!([
        {"stream": "s", "data": "{\"n\":2}"},
        {"stream": "s", "data": "{\"n\":3}"},
        {"stream": "other", "data": "{\"n\":99}"},
    ]);
    let (status, _) = server.broadcast(&batch.to_string()).await;
    let acknowledged = Instant::now();
    assert_eq!(status, 201);
    let (answered, response) = tokio::time::timeout(WAIT, poll).await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    let latency = answered.saturating_duration_since(acknowledged);
    eprintln!("long-poll answered {latency:?} after the broadcast was acknowledged");
    assert!(latency < Duration::from_secs(5), "woken by the broadcast, not a timeout");
    let (messages, next, up_to_date) = read_parts(response).await;
    assert_eq!(messages, numbered(2..=3));
    assert!(up_to_date);
    assert_eq!(next, server.tail("s").await);
}

#[tokio::test]
async fn long_poll_from_now_waits_at_the_tail() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--ds_poll_interval", "30"]);
    server.publish("s", numbered(1..=2)).await;
    let poll = tokio::spawn(server.client.get(server.ds("s?offset=now&live=long-poll")).send());
    server.wait_for_metric("ds_poll_clients_num", 1.0, WAIT).await;
    server.publish("s", numbered(3..=3)).await;
    let response = tokio::time::timeout(WAIT, poll).await.unwrap().unwrap().unwrap();
    let (messages, _, _) = read_parts(response).await;
    assert_eq!(messages, numbered(3..=3), "only what came after `now`");
}

#[tokio::test]
async fn cursor_moves_forward_when_echoed() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--ds_poll_interval", "1"]);
    let response = server.get("s?offset=now&live=long-poll").await;
    let mut cursor: u64 = header(&response, "stream-cursor").unwrap().parse().unwrap();
    for _ in 0..3 {
        let response = server.get(&format!("s?offset=now&live=long-poll&cursor={cursor}")).await;
        let next: u64 = header(&response, "stream-cursor").unwrap().parse().unwrap();
        assert!(next > cursor, "{next} > {cursor}");
        assert!(next <= cursor + 61);
        cursor = next;
    }
    // An old or unparsable cursor is ignored: the answer is the current interval.
    let fresh: u64 = header(&server.get("s?offset=-1&cursor=junk").await, "stream-cursor").unwrap().parse().unwrap();
    let old: u64 = header(&server.get("s?offset=-1&cursor=5").await, "stream-cursor").unwrap().parse().unwrap();
    assert_eq!(fresh, old);
}

/// The lost-wake-up race: broadcasts that land while a poll is between its read and its
/// wait. Each poll is sent and a broadcast fired at once, many times over; a missed wake-up
/// shows as a 204 after the poll interval instead of a 200 with the message.
#[tokio::test]
async fn broadcasts_racing_with_a_poll_are_never_missed() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--ds_poll_interval", "5"]);
    for round in 0..100u64 {
        let stream = format!("race-{round}");
        let tail = server.tail(&stream).await;
        let poll = server.client.get(server.ds(&format!("{stream}?offset={tail}&live=long-poll"))).send();
        let body = json!({"stream": stream, "data": json!({"n": round}).to_string()}).to_string();
        let publish = server.broadcast(&body);
        let (response, (status, _)) = tokio::join!(poll, publish);
        assert_eq!(status, 201);
        let response = response.unwrap();
        assert_eq!(response.status(), 200, "round {round}: the poll missed the broadcast");
        let (messages, _, _) = read_parts(response).await;
        assert_eq!(messages, vec![json!({"n": round})]);
    }
}

#[tokio::test]
async fn sse_framing_on_an_empty_stream_then_live() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &[]);
    let response = server.client.get(server.ds("empty?offset=-1&live=sse")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    for (name, value) in [
        ("content-type", "text/event-stream"),
        ("cache-control", "no-cache"),
        ("x-accel-buffering", "no"),
        ("x-content-type-options", "nosniff"),
    ] {
        assert_eq!(header(&response, name).as_deref(), Some(value), "{name}");
    }
    drop(response);

    let mut sse = SseClient::open(&server, "empty?offset=-1&live=sse").await;
    // Empty stream: no data event, one control event with upToDate.
    let first = sse.next(WAIT).await.unwrap();
    assert_eq!(first.event, "control");
    let control = first.json();
    assert_eq!(control["upToDate"], json!(true));
    assert_eq!(control["streamNextOffset"], json!(server.tail("empty").await));
    assert!(control["streamCursor"].as_str().unwrap().parse::<u64>().is_ok());

    server.publish("empty", numbered(1..=1)).await;
    let data = sse.next(WAIT).await.unwrap();
    assert_eq!(data.event, "data");
    assert_eq!(data.data, r#"[{"n":1}]"#, "exact bytes of the data line");
    let control = sse.next(WAIT).await.unwrap();
    assert_eq!(control.event, "control");
    assert_eq!(control.json()["streamNextOffset"], json!(server.tail("empty").await));
    assert_eq!(control.json()["upToDate"], json!(true));
}

#[tokio::test]
async fn sse_backlog_in_chunks_then_up_to_date() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--ds_max_chunk_bytes", "20"]);
    server.publish("s", numbered(1..=5)).await;
    let mut sse = SseClient::open(&server, "s?offset=-1&live=sse").await;
    let mut seen = Vec::new();
    let mut controls = Vec::new();
    while seen.len() < 5 {
        let (messages, control) = sse.next_batch(WAIT).await.unwrap();
        seen.extend(messages);
        controls.push(control);
    }
    assert_eq!(seen, numbered(1..=5));
    assert_eq!(controls.len(), 3, "chunks of two messages");
    let (last, earlier) = controls.split_last().unwrap();
    assert_eq!(last["upToDate"], json!(true));
    assert!(earlier.iter().all(|c| c.get("upToDate").is_none()), "{earlier:?}");
    // Catch-up chunks the same way.
    let catch_up = server.get("s?offset=-1").await.text().await.unwrap();
    assert_eq!(catch_up, serde_json::to_string(&seen[..2]).unwrap());
}

#[tokio::test]
async fn sse_ends_after_ttl_and_a_reconnect_gets_exactly_the_rest() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--ds_sse_ttl", "1"]);
    server.publish("s", numbered(1..=3)).await;
    let started = Instant::now();
    let mut sse = SseClient::open(&server, "s?offset=-1&live=sse").await;
    let (messages, control) = sse.next_batch(WAIT).await.unwrap();
    assert_eq!(messages, numbered(1..=3));
    let offset = control["streamNextOffset"].as_str().unwrap().to_string();
    assert!(sse.next_batch(WAIT).await.is_none(), "the response ends cleanly");
    let lasted = started.elapsed();
    assert!(lasted >= Duration::from_millis(950) && lasted < Duration::from_secs(5), "{lasted:?}");

    server.publish("s", numbered(4..=5)).await;
    let mut sse = SseClient::open(&server, &format!("s?offset={offset}&live=sse")).await;
    let (messages, control) = sse.next_batch(WAIT).await.unwrap();
    assert_eq!(messages, numbered(4..=5));
    assert_eq!(control["upToDate"], json!(true));
}

#[tokio::test]
async fn clients_that_go_away_free_their_waiters() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--ds_poll_interval", "60"]);
    let mut tasks = Vec::new();
    for i in 0..5 {
        let poll = server.client.get(server.ds(&format!("p{i}?offset=now&live=long-poll")));
        tasks.push(tokio::spawn(async move {
            let _ = poll.send().await;
        }));
        let sse = server.client.get(server.ds(&format!("s{i}?offset=now&live=sse")));
        tasks.push(tokio::spawn(async move {
            let response = sse.send().await.unwrap();
            let _ = response.bytes().await; // reads until the server ends it: never, here
        }));
    }
    server.wait_for_metric("ds_poll_clients_num", 5.0, WAIT).await;
    server.wait_for_metric("ds_sse_clients_num", 5.0, WAIT).await;
    server.wait_for_metric("ds_hub_streams", 10.0, WAIT).await;
    for task in tasks {
        task.abort();
    }
    server.wait_for_metric("ds_poll_clients_num", 0.0, WAIT).await;
    server.wait_for_metric("ds_sse_clients_num", 0.0, WAIT).await;
    server.wait_for_metric("ds_hub_streams", 0.0, WAIT).await;
}

#[tokio::test]
async fn sigterm_answers_polls_ends_sse_and_exits_zero() {
    let dir = temp_dir();
    let mut server = Server::start(dir.path(), &["--ds_poll_interval", "60", "--ds_sse_ttl", "600"]);
    server.publish("s", numbered(1..=2)).await;
    let tail = server.tail("s").await;
    let poll = tokio::spawn(server.client.get(server.ds(&format!("s?offset={tail}&live=long-poll"))).send());
    let mut sse = SseClient::open(&server, "s?offset=-1&live=sse").await;
    assert!(sse.next_batch(WAIT).await.is_some());
    server.wait_for_metric("ds_poll_clients_num", 1.0, WAIT).await;

    let started = Instant::now();
    let exit = tokio::task::spawn_blocking(move || {
        let status = server.terminate(Duration::from_secs(10));
        (status, server)
    });
    let response = tokio::time::timeout(WAIT, poll).await.unwrap().unwrap().unwrap();
    assert_eq!(response.status(), 204, "waiting long-poll answered at shutdown");
    assert_eq!(header(&response, "stream-next-offset"), Some(tail));
    assert!(sse.next_batch(WAIT).await.is_none(), "SSE response ended");
    let (status, mut server) = exit.await.unwrap();
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());

    // Nothing was lost on the way down.
    server.restart();
    let (messages, _, _) = server.read("s", "-1").await;
    assert_eq!(messages, numbered(1..=2));
}

/// Several writers, 10 long-poll and 10 SSE readers that reconnect like real clients (short
/// SSE TTL and poll interval force many reconnects): every reader sees exactly the stored
/// sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storm_of_writers_and_readers_sees_every_message_once() {
    const WRITERS: u64 = 4;
    const PER_WRITER: u64 = 60;
    const TOTAL: usize = (WRITERS * PER_WRITER) as usize;
    let dir = temp_dir();
    // More messages than the default count limit; every one must stay readable for the check.
    let args = ["--ds_poll_interval", "1", "--ds_sse_ttl", "1", "--history_limit", "0"];
    let server = std::sync::Arc::new(Server::start(dir.path(), &args));
    let start = server.tail("storm").await;

    let mut readers = Vec::new();
    for _ in 0..10 {
        let (server, start) = (server.clone(), start.clone());
        readers.push(tokio::spawn(async move {
            let mut offset = start;
            let mut seen: Vec<Value> = Vec::new();
            while seen.len() < TOTAL {
                let response = server.get(&format!("storm?offset={offset}&live=long-poll")).await;
                match response.status().as_u16() {
                    204 => offset = header(&response, "stream-next-offset").unwrap(),
                    200 => {
                        let (messages, next, _) = read_parts(response).await;
                        seen.extend(messages);
                        offset = next;
                    }
                    other => panic!("long-poll status {other}"),
                }
            }
            seen
        }));
    }
    for _ in 0..10 {
        let (server, start) = (server.clone(), start.clone());
        readers.push(tokio::spawn(async move {
            let mut offset = start;
            let mut seen: Vec<Value> = Vec::new();
            while seen.len() < TOTAL {
                let mut sse = SseClient::open(&server, &format!("storm?offset={offset}&live=sse")).await;
                while let Some((messages, control)) = sse.next_batch(WAIT).await {
                    seen.extend(messages);
                    offset = control["streamNextOffset"].as_str().unwrap().to_string();
                    if seen.len() >= TOTAL {
                        break;
                    }
                }
            }
            seen
        }));
    }

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let server = server.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..PER_WRITER {
                let body = json!({"stream": "storm", "data": json!({"w": w, "i": i}).to_string()}).to_string();
                let (status, reply) = server.broadcast(&body).await;
                assert_eq!(status, 201, "{reply}");
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let (stored, _, _) = server.read("storm", "-1").await;
    assert_eq!(stored.len(), TOTAL);
    for w in 0..WRITERS {
        let mine: Vec<u64> = stored.iter().filter(|m| m["w"] == json!(w)).map(|m| m["i"].as_u64().unwrap()).collect();
        assert_eq!(mine, (0..PER_WRITER).collect::<Vec<_>>(), "writer {w}'s messages in its order");
    }
    for (i, reader) in readers.into_iter().enumerate() {
        let seen = tokio::time::timeout(Duration::from_secs(60), reader).await.expect("reader finished").unwrap();
        assert_eq!(seen, stored, "reader {i} saw exactly the stored sequence");
    }
}

/// `meta.transient`: delivered to live readers, never stored, no offset.
#[tokio::test]
async fn transient_broadcasts_reach_live_readers_and_are_not_stored() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--ds_poll_interval", "30"]);
    server.publish("t", numbered(1..=1)).await;
    let tail = server.tail("t").await;
    let poll = tokio::spawn(server.client.get(server.ds(&format!("t?offset={tail}&live=long-poll"))).send());
    let mut sse = SseClient::open(&server, &format!("t?offset={tail}&live=sse")).await;
    let (_, first) = sse.next_batch(WAIT).await.unwrap();
    assert_eq!(first["upToDate"], json!(true));
    server.wait_for_metric("ds_poll_clients_num", 1.0, WAIT).await;

    let body = json!([
        {"stream": "t", "data": "{\"typing\":true}", "meta": {"transient": true}},
        {"stream": "t", "data": "{\"typing\":false}", "meta": {"transient": true}},
    ]);
    let (status, reply) = server.broadcast(&body.to_string()).await;
    assert_eq!(status, 201, "{reply}");
    assert_eq!(reply["stored"], json!(0));

    let response = tokio::time::timeout(WAIT, poll).await.unwrap().unwrap().unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "cache-control").as_deref(), Some("no-store"));
    assert!(header(&response, "etag").is_none());
    let (messages, next, _) = read_parts(response).await;
    assert_eq!(messages, vec![json!({"typing": true}), json!({"typing": false})]);
    assert_eq!(next, tail, "transient messages have no offset");

    let (messages, control) = sse.next_batch(WAIT).await.unwrap();
    assert_eq!(messages, vec![json!({"typing": true}), json!({"typing": false})]);
    assert_eq!(control["streamNextOffset"], json!(tail));

    // Not stored: catch-up and the tail are unchanged.
    let (stored, _, _) = server.read("t", "-1").await;
    assert_eq!(stored, numbered(1..=1));
    assert_eq!(server.tail("t").await, tail);
    // A stored message afterwards flows as usual.
    server.publish("t", numbered(2..=2)).await;
    let (messages, _) = sse.next_batch(WAIT).await.unwrap();
    assert_eq!(messages, numbered(2..=2));
}

#[tokio::test]
async fn sse_frames_carry_ids_and_last_event_id_resumes_a_native_event_source() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--ds_sse_ttl", "1"]);
    server.publish("ids", numbered(1..=3)).await;
    let tail = server.tail("ids").await;
    let first = common::token_at(&tail, 1);

    // Exact framing, as the reference server writes it: `data:` directly followed by the JSON;
    // every data and control event names the offset after it, in an `id:` field that comes
    // last (the official conformance suite wants `data:` right after `event:`).
    let text = server.get("ids?offset=-1&live=sse").await.text().await.unwrap(); // ends at the TTL
    let expected_start = format!("event: data\ndata:[{{\"n\":1}},{{\"n\":2}},{{\"n\":3}}]\nid:{tail}\n\nevent: control\ndata:{{\"streamCursor\":");
    assert!(text.starts_with(&expected_start), "{text}");
    assert!(text.contains(&format!("\"streamNextOffset\":\"{tail}\",\"upToDate\":true}}\nid:{tail}\n\n")), "{text}");

    // A browser's EventSource reconnects to the same URL with the last id it saw: the header
    // wins over `offset=`.
    let response =
        server.client.get(server.ds("ids?offset=-1&live=sse")).header("Last-Event-ID", &first).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.starts_with("event: data\ndata:[{\"n\":2},{\"n\":3}]\nid:"), "resumes right after message 1: {text}");

    // Not an offset of ours: 400, as a bad `offset=` is.
    let response = server
        .client
        .get(server.ds("ids?offset=-1&live=sse"))
        .header("Last-Event-ID", "nonsense")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.json::<Value>().await.unwrap()["error"].as_str().unwrap().contains("Last-Event-ID"));
    // Catch-up reads ignore the header (only EventSource sends it).
    let response = server.client.get(server.ds("ids?offset=-1")).header("Last-Event-ID", &first).send().await.unwrap();
    assert_eq!(read_parts(response).await.0, numbered(1..=3));

    // A page on another origin may send the header (the preflight allows it).
    let preflight = server
        .client
        .request(reqwest::Method::OPTIONS, server.ds("ids"))
        .header("Origin", "https://app.example")
        .header("Access-Control-Request-Method", "GET")
        .header("Access-Control-Request-Headers", "last-event-id")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 200);
    let allowed = header(&preflight, "access-control-allow-headers").unwrap_or_default().to_lowercase();
    assert!(allowed.contains("last-event-id"), "{allowed}");
}

/// Readers woken by one write share one copy of their frame (`ds_sse_frames_shared_total`),
/// and only readers of the same chunk do: two streams whose new frames differ only in their
/// data each get their own, whichever reader built its first. (On the embedded engine the
/// two streams are at the same offsets and the data has the same length; in cluster mode
/// offsets are positions in the shared log, so they differ too.)
#[tokio::test]
async fn sse_readers_share_a_frame_only_with_readers_of_the_same_chunk() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &[]);
    server.publish("a", numbered(1..=1)).await;
    server.publish("b", numbered(1..=1)).await;
    if !common::nats_engine() {
        assert_eq!(server.tail("a").await, server.tail("b").await, "the two streams are at the same offset");
    }
    const PER_STREAM: usize = 30;
    let mut readers = Vec::new();
    for stream in ["a", "b"] {
        let tail = server.tail(stream).await;
        for _ in 0..PER_STREAM {
            let mut sse = SseClient::open(&server, &format!("{stream}?offset={tail}&live=sse")).await;
            let first = sse.next(WAIT).await.expect("the first control event");
            assert_eq!(first.json()["upToDate"], json!(true));
            readers.push((stream, sse));
        }
    }
    server.wait_for_metric("ds_sse_clients_num", (2 * PER_STREAM) as f64, WAIT).await;
    let shared_before = server.metric("ds_sse_frames_shared_total").await;
    let (status, _) =
        server.broadcast(r#"[{"stream":"a","data":"{\"s\":\"a\"}"},{"stream":"b","data":"{\"s\":\"b\"}"}]"#).await;
    assert_eq!(status, 201);
    for (stream, sse) in &mut readers {
        let next = server.tail(stream).await;
        let data = sse.next(WAIT).await.expect("the data event");
        assert_eq!(data.event, "data");
        assert_eq!(data.data, format!(r#"[{{"s":"{stream}"}}]"#), "a reader of {stream}");
        let control = sse.next(WAIT).await.expect("its control event");
        assert_eq!(control.json()["streamNextOffset"], json!(next));
    }
    let shared = server.metric("ds_sse_frames_shared_total").await - shared_before;
    assert!(shared >= 1.0 && shared <= (2 * PER_STREAM - 2) as f64, "frames shared: {shared}");
}

/// An idle SSE response sends a `: ping` comment every 15 s (one timer serves the ping and
/// the TTL), and goes on delivering after it; the TTL still ends it.
#[tokio::test]
async fn an_idle_sse_response_pings_every_15_s_until_its_ttl() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--ds_sse_ttl", "20"]);
    server.publish("s", numbered(1..=1)).await;
    let tail = server.tail("s").await;
    let mut sse = SseClient::open(&server, &format!("s?offset={tail}&live=sse")).await;
    assert_eq!(sse.next(WAIT).await.unwrap().event, "control");
    let opened = Instant::now();
    let ping = sse.next(Duration::from_secs(20)).await.expect("a ping, not the end");
    assert_eq!((ping.event.as_str(), ping.data.as_str()), ("comment", "ping"));
    let after = opened.elapsed();
    assert!(after >= Duration::from_secs(14) && after < Duration::from_secs(17), "pinged after {after:?}");
    server.publish("s", numbered(2..=2)).await;
    let data = sse.next(WAIT).await.unwrap();
    assert_eq!((data.event.as_str(), data.data.as_str()), ("data", r#"[{"n":2}]"#));
    assert_eq!(sse.next(WAIT).await.unwrap().event, "control");
    // The TTL (20 s) comes before the next ping (15 s after the control just sent).
    assert!(sse.next(WAIT).await.is_none(), "the response ends at its TTL");
    let ended = opened.elapsed();
    assert!(ended >= Duration::from_secs(19) && ended < Duration::from_secs(23), "ended after {ended:?}");
}
