//! Broadcast, then catch-up reads: ordering, tokens, offset=now, HEAD, ETag, chunking, headers.

mod common;

use common::{header, numbered, read_parts, temp_dir, Server};
use serde_json::{json, Value};

#[tokio::test]
async fn single_batch_value_and_plain_string_data_come_back_in_order() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &[]);
    let bodies = [
        r#"{"stream":"chat/room-42","data":"{\"text\":\"hi\", \"n\": 1}"}"#,
        r#"[{"stream":"chat/room-42","data":"2"},{"stream":"other","data":"\"x\""},{"stream":"chat/room-42","data":"[3]"}]"#,
        r#"{"stream":"chat/room-42","data":{"as":"value", "big": 12345678901234567890123}}"#,
        r#"{"stream":"chat/room-42","data":"plain text, not JSON","meta":{"note":"ignored"}}"#,
    ];
    for body in bodies {
        let (status, reply) = server.broadcast(body).await;
        assert_eq!(status, 201, "{body}: {reply}");
    }
    let response = server.get("chat/room-42?offset=-1").await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "content-type").as_deref(), Some("application/json"));
    let text = response.text().await.unwrap();
    // Byte-exact: compact, key order and number digits kept.
    assert_eq!(
        text,
        r#"[{"text":"hi","n":1},2,[3],{"as":"value","big":12345678901234567890123},"plain text, not JSON"]"#
    );
    let (messages, _, _) = server.read("other", "-1").await;
    assert_eq!(messages, vec![json!("x")]);
}

#[tokio::test]
async fn every_token_resumes_exactly_after_its_message_and_tokens_sort() {
    let dir = temp_dir();
    // A 1-byte chunk limit makes every response hold exactly one message, so following
    // Stream-Next-Offset visits the token after every single message.
    let server = Server::start(dir.path(), &["--ds_max_chunk_bytes", "1"]);
    let mut tokens = vec![server.tail("s").await];
    server.publish("s", numbered(1..=12)).await;
    for n in 1..=12u64 {
        let (messages, next, up_to_date) = server.read("s", tokens.last().unwrap()).await;
        assert_eq!(messages, numbered(n..=n));
        assert_eq!(up_to_date, n == 12);
        tokens.push(next);
    }
    let mut sorted = tokens.clone();
    sorted.sort();
    assert_eq!(tokens, sorted, "tokens sort in stream order");
    for (n, token) in tokens.iter().enumerate() {
        assert!(token.len() < 64 && !token.contains([',', '&', '=', '?', '/']), "{token}");
        assert!(token != "-1" && token != "now");
        // Re-reading any token, any number of times, gives the same next message.
        let (messages, _, _) = server.read("s", token).await;
        let expected = if n == 12 { vec![] } else { numbered(n as u64 + 1..=n as u64 + 1) };
        assert_eq!(messages, expected, "from token {n}");
    }
}

#[tokio::test]
async fn chunking_gives_up_to_date_only_on_the_last_chunk() {
    let dir = temp_dir();
    // Each message {"n":N} is 8 bytes; 20 bytes hold two of them with the brackets.
    let server = Server::start(dir.path(), &["--ds_max_chunk_bytes", "20"]);
    server.publish("c", numbered(1..=5)).await;
    let mut offset = "-1".to_string();
    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    loop {
        let (messages, next, up_to_date) = server.read("c", &offset).await;
        sizes.push(messages.len());
        seen.extend(messages);
        offset = next;
        if up_to_date {
            break;
        }
    }
    assert_eq!(seen, numbered(1..=5));
    assert_eq!(sizes, [2, 2, 1], "as many messages as fit, then the rest");
    // A single message larger than the limit is still sent, alone.
    server.publish("big", [json!({"text": "x".repeat(100)})]).await;
    let (messages, _, up_to_date) = server.read("big", "-1").await;
    assert_eq!(messages.len(), 1);
    assert!(up_to_date);
}

#[tokio::test]
async fn offset_now_head_and_unknown_streams() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &[]);
    // Unknown stream: empty, tail at position 0.
    let empty_tail = server.tail("nobody-wrote-here").await;
    assert!(empty_tail.ends_with("_00000000000000000000"), "{empty_tail}");
    let (messages, next, up_to_date) = server.read("nobody-wrote-here", "-1").await;
    assert!(messages.is_empty() && up_to_date);
    assert_eq!(next, empty_tail);

    server.publish("s", numbered(1..=3)).await;
    let head = server.client.head(server.ds("s")).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(header(&head, "cache-control").as_deref(), Some("no-store"));
    assert_eq!(header(&head, "content-type").as_deref(), Some("application/json"));
    let tail = header(&head, "stream-next-offset").unwrap();

    let response = server.get("s?offset=now").await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "cache-control").as_deref(), Some("no-store"));
    assert!(header(&response, "etag").is_none());
    let (messages, next, up_to_date) = read_parts(response).await;
    assert!(messages.is_empty() && up_to_date);
    assert_eq!(next, tail);

    server.publish("s", numbered(4..=4)).await;
    let (messages, _, _) = server.read("s", &next).await;
    assert_eq!(messages, numbered(4..=4));
    // offset absent and 0 mean "from the start" (an empty one is a 400: bad_input.rs).
    for query in ["s", "s?offset=0"] {
        let (messages, _, _) = read_parts(server.get(query).await).await;
        assert_eq!(messages, numbered(1..=4), "{query}");
    }
}

#[tokio::test]
async fn read_headers_etag_and_304() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &[]);
    server.publish("e", numbered(1..=2)).await;
    let response = server.get("e?offset=-1").await;
    for (name, value) in [
        ("x-content-type-options", "nosniff"),
        ("cross-origin-resource-policy", "cross-origin"),
        ("cache-control", "public, max-age=60, stale-while-revalidate=300"),
        ("stream-up-to-date", "true"),
    ] {
        assert_eq!(header(&response, name).as_deref(), Some(value), "{name}");
    }
    let cursor: u64 = header(&response, "stream-cursor").unwrap().parse().unwrap();
    assert!(cursor > 3_000_000);
    let etag = header(&response, "etag").expect("ETag");

    let cached = server.client.get(server.ds("e?offset=-1")).header("If-None-Match", &etag).send().await.unwrap();
    assert_eq!(cached.status(), 304);
    assert!(header(&cached, "stream-next-offset").is_some());
    assert!(cached.bytes().await.unwrap().is_empty());

    // A new message changes the body, so the same request no longer matches.
    server.publish("e", numbered(3..=3)).await;
    let fresh = server.client.get(server.ds("e?offset=-1")).header("If-None-Match", &etag).send().await.unwrap();
    assert_eq!(fresh.status(), 200);
    assert_ne!(header(&fresh, "etag").unwrap(), etag);
    let (messages, _, _) = read_parts(fresh).await;
    assert_eq!(messages, numbered(1..=3));
}

#[tokio::test]
async fn stream_names_may_hold_slashes_and_encoded_characters() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &[]);
    let (status, _) = server.broadcast(r#"{"stream":"a/b/c","data":"1"}"#).await;
    assert_eq!(status, 201);
    let (messages, _, _) = server.read("a/b/c", "-1").await;
    assert_eq!(messages, vec![json!(1)], "literal slashes");
    for name in ["a/b/c", "café au lait", "with%percent", "dots/../x"] {
        let body = json!({"stream": name, "data": json!({"name": name}).to_string()}).to_string();
        assert_eq!(server.broadcast(&body).await.0, 201);
        // Fully encoded (slashes as %2F: URL libraries collapse a literal `..` segment).
        let (messages, _, _) = server.read(&percent_encode(name), "-1").await;
        let expected =
            if name == "a/b/c" { vec![json!(1), json!({"name": name})] } else { vec![json!({"name": name})] };
        assert_eq!(messages, expected, "{name}");
    }
}

fn percent_encode(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test]
async fn health_and_metrics_answer() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &[]);
    let health = server.client.get(server.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    server.publish("m", numbered(1..=3)).await;
    assert_eq!(server.metric("ds_messages_stored_total").await, 3.0);
    let missing = server.client.get(server.url("/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.unwrap();
    assert!(body["error"].is_string());
}

#[tokio::test]
async fn every_response_errors_included_carries_nosniff_and_corp() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--ds_max_live_readers", "1", "--ds_poll_interval", "30"]);
    server.publish("s", numbered(1..=1)).await;
    let tail = server.tail("s").await;
    let waiting = tokio::spawn(server.client.get(server.ds("s?offset=now&live=long-poll")).send());
    server.wait_for_metric("ds_poll_clients_num", 1.0, std::time::Duration::from_secs(10)).await;
    let beyond = common::token_at(&tail, 99);
    let client = &server.client;
    let requests = [
        (client.get(server.ds("s?offset=-1")), 200),
        (client.get(server.ds("s?offset=bad")), 400),
        (client.get(server.url("/nowhere")), 404),
        (client.patch(server.ds("s")), 405),
        (client.get(server.ds(&format!("s?offset={beyond}"))), 410),
        (client.post(server.url("/_broadcast")).body("{}"), 401),
        (client.post(server.url("/_broadcast")).bearer_auth(common::KEY).body(vec![b' '; 2 << 20]), 413),
        (client.get(server.ds("s?offset=-1&live=sse")), 503),
        (client.get(server.url("/health")), 200),
    ];
    for (request, status) in requests {
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status);
        assert_eq!(header(&response, "x-content-type-options").as_deref(), Some("nosniff"), "{status}");
        assert_eq!(header(&response, "cross-origin-resource-policy").as_deref(), Some("cross-origin"), "{status}");
        if status == 503 {
            assert_eq!(header(&response, "retry-after").as_deref(), Some("1"));
        }
        if status >= 400 {
            let body: Value = response.json().await.unwrap();
            assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{status}: {body}");
        }
    }
    server.publish("s", numbered(2..=2)).await;
    assert_eq!(waiting.await.unwrap().unwrap().status(), 200);
}

/// A large answer goes out as its head and its body's buffer in one vectored write (the
/// actix-http patch in `vendor/`). Two answers of ~4 MB pipelined on one connection, to a
/// client with a 128 KiB receive buffer that reads 4 KiB at a time, outgrow the server's socket
/// buffer (4 MiB at most), so writes end part-way through a body; both answers must still come
/// back whole and in order.
#[tokio::test]
async fn large_answers_written_in_pieces_arrive_whole_and_in_order() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &[]);
    // 100 messages: what a broadcast stream keeps by default (history_limit).
    let pad = "x".repeat(40_000);
    server.publish("big", (0..100).map(|n| json!({"n": n, "pad": pad}))).await;
    let whole = server.get("big?offset=-1").await.bytes().await.unwrap().to_vec();
    assert!(whole.len() > 3_900_000, "{}: up to the 4 MiB chunk limit", whole.len());
    let tail = server.tail("big").await;
    let from = common::token_at(&tail, 30);
    let second = server.get(&format!("big?offset={from}")).await.bytes().await.unwrap();
    assert!(second.len() > 2_500_000);

    let request = |offset: &str| format!("GET /ds/big?offset={offset} HTTP/1.1\r\nHost: test\r\n\r\n");
    let pipelined = request("-1") + &request(&from);
    let mut socket = common::client_with_receive_buffer(&server, &pipelined, 128 * 1024);
    let received = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        socket.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
        let (mut received, mut buf) = (Vec::new(), [0u8; 4096]);
        let mut bodies = Vec::new();
        while bodies.len() < 2 {
            let n = socket.read(&mut buf).expect("the server keeps writing (20 s watchdog)");
            assert!(n > 0, "the server closed the connection after {} bytes", received.len());
            received.extend_from_slice(&buf[..n]);
            // Every complete response in `received` so far: head, then Content-Length bytes.
            while let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&received[..end]).to_lowercase();
                assert!(head.starts_with("http/1.1 200"), "{head}");
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("a sized answer");
                if received.len() < end + 4 + length {
                    break;
                }
                bodies.push(received[end + 4..end + 4 + length].to_vec());
                received.drain(..end + 4 + length);
            }
        }
        assert!(received.is_empty(), "nothing after the two answers");
        bodies
    })
    .await
    .unwrap();
    assert!(received[0] == whole, "the first answer, byte for byte");
    assert!(received[1] == second, "the second answer, byte for byte");
}
