//! Every kind of bad input gets a 4xx with a JSON `{"error": ...}` and stores nothing.

mod common;

use common::{temp_dir, Server, KEY};
use serde_json::Value;

async fn expect_error(response: reqwest::Response, status: u16, what: &str) {
    assert_eq!(response.status().as_u16(), status, "{what}");
    assert!(response.headers().get("content-type").is_some_and(|v| v == "application/json"), "{what}: JSON error body");
    let body: Value = response.json().await.unwrap_or_else(|_| panic!("{what}: JSON body"));
    let error = body["error"].as_str().unwrap_or_else(|| panic!("{what}: error field in {body}"));
    assert!(!error.is_empty());
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
    for method in [reqwest::Method::POST, reqwest::Method::PUT, reqwest::Method::DELETE, reqwest::Method::PATCH] {
        let response = server.client.request(method.clone(), server.ds("s")).send().await.unwrap();
        assert_eq!(response.headers().get("allow").map(|v| v.to_str().unwrap()), Some("GET, HEAD, OPTIONS"));
        expect_error(response, 405, method.as_str()).await;
    }
    let (messages, _, _) = server.read("s", "-1").await;
    assert_eq!(messages.len(), 1, "reads changed nothing");
}
