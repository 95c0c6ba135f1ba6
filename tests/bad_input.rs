//! Every kind of bad input gets a 4xx with a JSON `{"error": ...}` and stores nothing.

mod common;

use common::{temp_dir, Server, KEY};
use serde_json::Value;

async fn expect_error(response: reqwest::Response, status: u16, what: &str) -> Value {
    assert_eq!(response.status().as_u16(), status, "{what}");
    assert!(response.headers().get("content-type").is_some_and(|v| v == "application/json"), "{what}: JSON error body");
    let body: Value = response.json().await.unwrap_or_else(|_| panic!("{what}: JSON body"));
    let error = body["error"].as_str().unwrap_or_else(|| panic!("{what}: error field in {body}"));
    assert!(!error.is_empty());
    body
}

#[tokio::test]
async fn bad_broadcasts_are_refused_whole() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--http_broadcast_max_body", "1500"]);
    let big = format!(r#"{{"stream":"s","data":"{}"}}"#, "x".repeat(2000));
    let cases: Vec<(&str, String, Option<&str>, u16)> = vec![
        ("malformed JSON", "{\"stream\":".into(), Some(KEY), 400),
        ("not JSON at all", "hello".into(), Some(KEY), 400),
        ("missing stream", r#"{"data":"1"}"#.into(), Some(KEY), 400),
        ("empty stream", r#"{"stream":"","data":"1"}"#.into(), Some(KEY), 400),
        ("missing data", r#"{"stream":"s"}"#.into(), Some(KEY), 400),
        ("empty array", "[]".into(), Some(KEY), 400),
        ("a number", "42".into(), Some(KEY), 400),
        ("batch with one bad element", r#"[{"stream":"s","data":"1"},{"stream":"s"}]"#.into(), Some(KEY), 400),
        ("batch with a non-object", r#"[{"stream":"s","data":"1"},"x"]"#.into(), Some(KEY), 400),
        ("control character in name", r#"{"stream":"a\u0001","data":"1"}"#.into(), Some(KEY), 400),
        ("overlong name", format!(r#"{{"stream":"{}","data":"1"}}"#, "n".repeat(1025)), Some(KEY), 400),
        ("wrong key", r#"{"stream":"s","data":"1"}"#.into(), Some("nope"), 401),
        ("missing key", r#"{"stream":"s","data":"1"}"#.into(), None, 401),
        ("oversized body", big, Some(KEY), 413),
    ];
    for (what, body, key, status) in cases {
        let mut request = server.client.post(server.url("/_broadcast")).body(body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        expect_error(request.send().await.unwrap(), status, what).await;
    }
    // Wrong methods on the broadcast endpoint.
    for method in [reqwest::Method::GET, reqwest::Method::PUT, reqwest::Method::DELETE] {
        let response =
            server.client.request(method.clone(), server.url("/_broadcast")).bearer_auth(KEY).send().await.unwrap();
        assert_eq!(response.headers().get("allow").map(|v| v.to_str().unwrap()), Some("POST"));
        expect_error(response, 405, method.as_str()).await;
    }
    let (messages, _, _) = server.read("s", "-1").await;
    assert!(messages.is_empty(), "nothing stored: {messages:?}");
    assert_eq!(server.metric("ds_messages_stored_total").await, 0.0);
}

#[tokio::test]
async fn bad_reads_are_refused() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &[]);
    server.publish("s", common::numbered(1..=1)).await;
    let tail = server.tail("s").await;
    let (epoch, _) = tail.split_once('_').unwrap();
    let long = format!("{}?offset=-1", "n".repeat(1025));
    let cases: Vec<(String, u16)> = vec![
        ("s?offset=garbage".into(), 400),
        ("s?offset=-2".into(), 400),
        (format!("s?offset={epoch}_123"), 400),
        (format!("s?offset={}", tail.to_uppercase()), 400),
        ("s?offset=-1&live=bogus".into(), 400),
        ("s?live=long-poll".into(), 400),
        ("s?live=sse".into(), 400),
        (format!("s?offset={epoch}_{:020}", 99), 410), // beyond the tail
        ("?offset=-1".into(), 400),                    // empty name
        ("a%00b?offset=-1".into(), 400),
        ("a%FFb?offset=-1".into(), 400),
        ("a%0Ab?offset=-1".into(), 400),
        (long, 400),
    ];
    for (query, status) in cases {
        expect_error(server.get(&query).await, status, &query).await;
    }
    // (PUT, POST and DELETE are the write API: tests/write.rs.)
    for method in [reqwest::Method::PATCH, reqwest::Method::from_bytes(b"PURGE").unwrap()] {
        let response = server.client.request(method.clone(), server.ds("s")).send().await.unwrap();
        let allow = response.headers().get("allow").map(|v| v.to_str().unwrap().to_string());
        assert_eq!(allow.as_deref(), Some("GET, HEAD, OPTIONS, PUT, POST, DELETE"));
        expect_error(response, 405, method.as_str()).await;
    }
    let (messages, _, _) = server.read("s", "-1").await;
    assert_eq!(messages.len(), 1, "reads changed nothing");
}

/// A `\u` escape of a lone UTF-16 surrogate has no UTF-8 form. serde_json's `RawValue` lets it
/// through, and the second parse of `data` used to panic the handler (`expect`). Each such body
/// is a 400 naming the field, in a batch too, and stores nothing; so is nesting deeper than
/// 100 levels. A valid surrogate pair still works.
#[tokio::test]
async fn lone_surrogates_and_deep_nesting_are_refused_whole() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &[]);
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let cases: Vec<(&str, String, &str)> = vec![
        ("data", r#"{"stream":"s","data":"\udead"}"#.into(), r#""data" holds an invalid \u escape (lone surrogate)"#),
        ("data, high surrogate then a letter", r#"{"stream":"s","data":"\ud800x"}"#.into(), r#""data""#),
        ("data, high surrogate at the end", r#"{"stream":"s","data":"ab\uD800"}"#.into(), r#""data""#),
        ("data as an object", r#"{"stream":"s","data":{"k":"\udead"}}"#.into(), r#""data""#),
        ("data as JSON text", r#"{"stream":"s","data":"{\"k\":\"\\udead\"}"}"#.into(), r#""data" holds JSON text"#),
        ("stream", r#"{"stream":"\udead","data":"1"}"#.into(), r#""stream" holds an invalid \u escape"#),
        ("stream, after a pair", r#"{"stream":"s\ud83d\ude00\ud83d","data":"1"}"#.into(), r#""stream""#),
        ("meta", r#"{"stream":"s","data":"1","meta":{"note":"\udead"}}"#.into(), r#""meta" holds an invalid \u"#),
        ("transient meta", r#"{"stream":"s","data":"1","meta":{"transient":true,"x":["\udead"]}}"#.into(), r#""meta""#),
        (
            "batch with one bad element",
            r#"[{"stream":"s","data":"1"},{"stream":"s","data":"2"},{"stream":"s","data":"\udead"}]"#.into(),
            r#"message 2: "data" holds an invalid \u escape"#,
        ),
        (
            "batch with a bad stream",
            r#"[{"stream":"s","data":"1"},{"stream":"\udead","data":"2"}]"#.into(),
            r#"message 1: "stream""#,
        ),
        ("200-deep data", format!(r#"{{"stream":"s","data":{deep}}}"#), r#""data" nests deeper than 100 levels"#),
        (
            "200-deep JSON text",
            format!(r#"{{"stream":"s","data":{}}}"#, serde_json::to_string(&deep).unwrap()),
            r#""data" holds JSON text nested deeper than 100 levels"#,
        ),
        (
            "batch with a 100000-deep element",
            format!(
                r#"[{{"stream":"s","data":1}},{{"stream":"s","data":{}1{}}}]"#,
                "[".repeat(100_000),
                "]".repeat(100_000)
            ),
            "message 1: \"data\" nests deeper",
        ),
    ];
    for (what, body, expected) in &cases {
        let response =
            server.client.post(server.url("/_broadcast")).bearer_auth(KEY).body(body.clone()).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 400, "{what}");
        assert!(response.headers().get("content-type").is_some_and(|v| v == "application/json"), "{what}");
        let reply: Value = response.json().await.unwrap();
        let error = reply["error"].as_str().unwrap_or_else(|| panic!("{what}: {reply}"));
        assert!(error.contains(expected), "{what}: {error:?} should contain {expected:?}");
    }
    let (messages, _, _) = server.read("s", "-1").await;
    assert!(messages.is_empty(), "nothing stored: {messages:?}");
    assert_eq!(server.metric("ds_messages_stored_total").await, 0.0);
    assert_eq!(server.metric("broadcast_rejected_total{reason=\"invalid\"}").await, cases.len() as f64);

    // Still serving; valid escapes, pairs and 100 levels are fine, and stored as sent.
    let ok = format!("{}1{}", "[".repeat(100), "]".repeat(100));
    let (status, reply) = server
        .broadcast(&format!(
            r#"[{{"stream":"ok","data":"\ud83d\ude00"}},{{"stream":"ok","data":"\"\\uD83D\\uDE00 \\u00e9\""}},{{"stream":"ok","data":{ok}}}]"#
        ))
        .await;
    assert_eq!(status, 201, "{reply}");
    let response = server.get("ok?offset=-1").await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert_eq!(text, format!(r#"["\ud83d\ude00","\uD83D\uDE00 \u00e9",{ok}]"#));
    let values: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(values[0], "😀");
    assert_eq!(values[1], "😀 é");
}

/// `offset=` (present, empty) is not "from the start": the official conformance suite expects
/// a 400. No offset, `-1` and `0` are the start; `now` is the tail.
#[tokio::test]
async fn an_empty_offset_is_refused() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--ds_poll_interval", "1"]);
    server.publish("s", common::numbered(1..=2)).await;
    for query in ["s?offset=", "s?offset=&live=long-poll", "s?offset=&live=sse", "s?live=&offset="] {
        expect_error(server.get(query).await, 400, query).await;
    }
    for query in ["s", "s?offset=-1", "s?offset=0"] {
        let response = server.get(query).await;
        assert_eq!(response.status(), 200, "{query}");
        let (messages, _, _) = common::read_parts(response).await;
        assert_eq!(messages, common::numbered(1..=2), "{query}");
    }
    let response = server.get("s?offset=now").await;
    assert_eq!(response.status(), 200);
    assert!(common::read_parts(response).await.0.is_empty());
}

#[tokio::test]
async fn repeated_parameters_and_undecodable_queries_are_refused() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--ds_poll_interval", "1"]);
    server.publish("s", common::numbered(1..=2)).await;
    let tail = server.tail("s").await;
    let cases = [
        (format!("s?offset=-1&offset={tail}"), "\"offset\" is repeated"),
        ("s?offset=-1&offset=-1".to_string(), "\"offset\" is repeated"),
        ("s?offset=now&live=sse&live=long-poll".to_string(), "\"live\" is repeated"),
        ("s?offset=-1&cursor=1&cursor=2".to_string(), "\"cursor\" is repeated"),
        ("s?offset=-1&signed=a&signed=b".to_string(), "\"signed\" is repeated"),
        ("s?offset=-1&jid=a&jid=b".to_string(), "\"jid\" is repeated"),
        ("s?offset=%FF".to_string(), "not valid UTF-8"),
    ];
    for (query, expected) in &cases {
        let body = expect_error(server.get(query).await, 400, query).await;
        assert!(body["error"].as_str().unwrap().contains(expected), "{query}: {body}");
    }
    // Other parameters may repeat (the first counts), and `+`/percent-encoding decode.
    let response = server.get("s?offset=-1&x=1&x=2&&").await;
    assert_eq!(common::read_parts(response).await.0, common::numbered(1..=2));
    let response = server.get(&format!("s?offset={}", tail.replace('_', "%5F"))).await;
    assert!(common::read_parts(response).await.0.is_empty());
}

#[tokio::test]
async fn errors_made_outside_our_handlers_are_json_too() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--allowed_origins", "https://app.example"]);
    // actix-cors refuses these preflights; its own answer is plain text.
    for (origin, method, headers) in [
        ("https://evil.example", "GET", "x-signed"),
        ("https://app.example", "PATCH", "x-signed"),
        ("https://app.example", "GET", "x-not-allowed"),
    ] {
        let refused = server
            .client
            .request(reqwest::Method::OPTIONS, server.ds("s?offset=-1"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", method)
            .header("Access-Control-Request-Headers", headers)
            .send()
            .await
            .unwrap();
        let what = format!("preflight from {origin} for {method} with {headers}");
        assert!(refused.status().is_client_error(), "{what}: {}", refused.status());
        let status = refused.status().as_u16();
        expect_error(refused, status, &what).await;
    }
    // A URL or headers over actix's head limit, and a request that is not HTTP: the
    // dispatcher's own answers (431, 400), then the connection closes.
    let long_url = format!("GET /ds/s?offset=-1&pad={} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(64 * 1024));
    let big_header = format!("GET /ds/s?offset=-1 HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n", "b".repeat(256 * 1024));
    let malformed = "GET /ds/s?offset=-1 HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n".to_string();
    for (what, request, expected) in
        [("a 64 KiB URL", long_url, 400), ("a 256 KiB header", big_header, 431), ("no HTTP", malformed, 400)]
    {
        let (status, text) = raw_exchange(&server, request.as_bytes());
        assert_eq!(status, expected, "{what}: {}", &text[..text.len().min(300)]);
        assert!(text.contains("content-type: application/json") && text.contains(r#"{"error":"#), "{what}: {text}");
    }
    // The server still answers.
    assert_eq!(server.get("s?offset=-1").await.status(), 200);
}

/// Sends `request` on a connection of its own and reads until the server closes it.
fn raw_exchange(server: &Server, request: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = server.url("/").trim_start_matches("http://").trim_end_matches('/').to_string();
    let mut socket = std::net::TcpStream::connect(addr).unwrap();
    socket.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    socket.write_all(request).unwrap();
    let mut raw = Vec::new();
    let _ = socket.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    (text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0), text)
}
