//! Access control: broadcast key, signed streams, JWT, public streams, CORS, no secrets in logs.

mod common;

use std::time::Duration;

use anycable_ds::auth::sign_stream;
use common::{header, numbered, temp_dir, Server, SseClient};
use serde_json::{json, Value};

const SECRET: &str = "app-secret-for-tests";
const STREAMS_SECRET: &str = "s3Krit";
const JWT_SECRET: &str = "jwt-secret-for-tests";

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn jwt(alg: jsonwebtoken::Algorithm, secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn valid_jwt() -> String {
    jwt(jsonwebtoken::Algorithm::HS256, JWT_SECRET, json!({"ext": "{\"user_id\":42}", "exp": now() + 3600}))
}

/// A server whose streams all need a signed name.
fn private_server(dir: &std::path::Path, extra: &[&str]) -> Server {
    let mut args: Vec<String> =
        ["--secret", SECRET, "--streams_secret", STREAMS_SECRET, "--history_limit", "0", "--history_ttl", "0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    Server::start_with(dir, args)
}

async fn broadcast_with_derived_key(server: &Server, stream: &str) {
    let key = anycable_ds::auth::derive_broadcast_key(SECRET);
    let body = json!({"stream": stream, "data": "{\"n\":1}"}).to_string();
    let (status, reply) = server.broadcast_with_key(&body, Some(&key)).await;
    assert_eq!(status, 201, "{reply}");
}

#[tokio::test]
async fn published_vectors_work_end_to_end() {
    let dir = temp_dir();
    let server = Server::start_with(
        dir.path(),
        vec!["--secret".into(), "qwerty".into(), "--streams_secret".into(), "s3Krit".into()],
    );
    let key = "42923a28b760e667fc92f7c6123bb07a282822b329dd2ef48e7aee7830d98485";
    let (status, _) = server.broadcast_with_key(r#"{"stream":"chat:2021","data":"1"}"#, Some(key)).await;
    assert_eq!(status, 201, "the broadcast key derived from `qwerty`");
    let token = "ImNoYXQ6MjAyMSI=--f9ee45dbccb1da04d8ceb99cc820207804370ba0d06b46fc3b8b373af1315628";
    let response = server.get(&format!("chat:2021?offset=-1&signed={token}")).await;
    assert_eq!(response.status(), 200);
    // A credentialed read: never answered from a cache to a request with other credentials.
    assert_eq!(header(&response, "cache-control").as_deref(), Some("no-store"));
    let vary = all_values(&response, "vary");
    assert!(vary.contains("X-Signed") && vary.contains("X-Jid") && vary.contains("Origin"), "{vary}");
    assert_eq!(response.text().await.unwrap(), "[1]");
    let response = server.client.get(server.ds("chat:2021?offset=-1")).header("X-Signed", token).send().await.unwrap();
    assert_eq!(response.status(), 200, "token in the X-Signed header");
}

/// (description, how to present the token) for every bad token.
fn bad_tokens(stream: &str) -> Vec<(&'static str, Option<String>)> {
    let good = sign_stream(STREAMS_SECRET, stream);
    let (encoded, digest) = good.rsplit_once("--").unwrap();
    let mut tampered_digest = digest.to_string();
    tampered_digest.replace_range(0..1, if digest.starts_with('0') { "1" } else { "0" });
    vec![
        ("no token", None),
        ("token for another stream", Some(sign_stream(STREAMS_SECRET, "someone-else"))),
        ("token signed with another key", Some(sign_stream("another-key", stream))),
        ("tampered digest", Some(format!("{encoded}--{tampered_digest}"))),
        ("tampered name", Some(format!("{}--{digest}", sign_stream(STREAMS_SECRET, "x").split_once("--").unwrap().0))),
        ("garbage", Some("not-a-token".to_string())),
    ]
}

#[tokio::test]
async fn every_read_mode_refuses_bad_stream_tokens() {
    let dir = temp_dir();
    let server = private_server(dir.path(), &["--ds_poll_interval", "1"]);
    broadcast_with_derived_key(&server, "room").await;
    let good = sign_stream(STREAMS_SECRET, "room");
    for mode in ["", "&live=long-poll", "&live=sse"] {
        for (what, token) in bad_tokens("room") {
            let mut request = server.client.get(server.ds(&format!("room?offset=-1{mode}")));
            if let Some(token) = &token {
                request = request.header("X-Signed", token);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 401, "{what} {mode}");
            let body: Value = response.json().await.unwrap();
            let error = body["error"].as_str().unwrap();
            assert!(["unauthorized", "forbidden_stream"].contains(&error), "{what}: {error}");
            if what == "token for another stream" {
                assert_eq!(error, "forbidden_stream");
            }
        }
        let ok = server.client.get(server.ds(&format!("room?offset=-1{mode}&signed={good}"))).send().await.unwrap();
        assert_eq!(ok.status(), 200, "good token {mode}");
    }
    for (what, token) in bad_tokens("room") {
        let mut request = server.client.head(server.ds("room"));
        if let Some(token) = &token {
            request = request.header("X-Signed", token);
        }
        assert_eq!(request.send().await.unwrap().status(), 401, "HEAD {what}");
    }
    let head = server.client.head(server.ds("room")).header("X-Signed", &good).send().await.unwrap();
    assert_eq!(head.status(), 200);
}

#[tokio::test]
async fn public_streams_allow_unsigned_reads_but_still_check_given_tokens() {
    let dir = temp_dir();
    let server = private_server(dir.path(), &["--public_streams"]);
    broadcast_with_derived_key(&server, "open").await;
    let response = server.get("open?offset=-1").await;
    assert_eq!(response.status(), 200);
    assert_eq!(header(&response, "cache-control").as_deref(), Some("public, max-age=60, stale-while-revalidate=300"));
    let wrong = sign_stream(STREAMS_SECRET, "other");
    assert_eq!(server.get(&format!("open?offset=-1&signed={wrong}")).await.status(), 401);
    // `public = true` means public streams and no client authentication.
    let dir = temp_dir();
    let public = private_server(dir.path(), &["--public", "--enforce_jwt"]);
    assert_eq!(public.get("anything?offset=-1").await.status(), 200);
}

#[tokio::test]
async fn jwt_in_header_or_query_with_every_hmac_algorithm() {
    use jsonwebtoken::Algorithm::*;
    let dir = temp_dir();
    let server = private_server(dir.path(), &["--jwt_secret", JWT_SECRET, "--public_streams", "--enforce_jwt"]);
    for alg in [HS256, HS384, HS512] {
        let token = jwt(alg, JWT_SECRET, json!({"ext": "{}", "exp": now() + 60}));
        let by_header = server.client.get(server.ds("s?offset=-1")).header("X-JID", &token).send().await.unwrap();
        assert_eq!(by_header.status(), 200, "{alg:?} in X-JID");
        assert_eq!(header(&by_header, "cache-control").as_deref(), Some("no-store"));
        assert!(header(&by_header, "vary").unwrap_or_default().contains("X-Jid"));
        assert_eq!(server.get(&format!("s?offset=-1&jid={token}")).await.status(), 200, "{alg:?} in ?jid=");
    }
    let expired = jwt(HS256, JWT_SECRET, json!({"exp": now() - 60}));
    let refused = [
        ("wrong key", jwt(HS256, "not-the-secret", json!({"exp": now() + 60})), "unauthorized"),
        ("alg none", "eyJhbGciOiJub25lIn0.eyJleHQiOiJ7fSJ9.".to_string(), "unauthorized"),
        ("garbage", "garbage".to_string(), "unauthorized"),
        ("expired", expired, "token_expired"),
    ];
    for mode in ["", "&live=long-poll", "&live=sse"] {
        for (what, token, error) in &refused {
            let response = server
                .client
                .get(server.ds(&format!("s?offset=-1{mode}")))
                .header("X-JID", token)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 401, "{what}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"], json!(error), "{what}");
        }
        let missing = server.get(&format!("s?offset=-1{mode}")).await;
        assert_eq!(missing.status(), 401, "--enforce_jwt without a token");
    }
}

#[tokio::test]
async fn jwt_is_optional_without_enforce_and_skipped_with_ds_skip_auth() {
    let dir = temp_dir();
    let optional = private_server(dir.path(), &["--jwt_secret", JWT_SECRET, "--public_streams"]);
    assert_eq!(optional.get("s?offset=-1").await.status(), 200, "no token, not enforced");
    let bad = optional.client.get(optional.ds("s?offset=-1")).header("X-JID", "garbage").send().await.unwrap();
    assert_eq!(bad.status(), 401, "a token that is present must be valid");
    let ok = optional.client.get(optional.ds("s?offset=-1")).header("X-JID", valid_jwt()).send().await.unwrap();
    assert_eq!(ok.status(), 200);

    let dir = temp_dir();
    let skip = private_server(dir.path(), &["--jwt_secret", JWT_SECRET, "--enforce_jwt", "--ds_skip_auth"]);
    broadcast_with_derived_key(&skip, "room").await;
    let signed = sign_stream(STREAMS_SECRET, "room");
    assert_eq!(skip.get(&format!("room?offset=-1&signed={signed}")).await.status(), 200, "client auth skipped");
    assert_eq!(skip.get("room?offset=-1").await.status(), 401, "stream authorization still applies");
    // --noauth does the same.
    let dir = temp_dir();
    let noauth = private_server(dir.path(), &["--jwt_secret", JWT_SECRET, "--enforce_jwt", "--noauth"]);
    assert_eq!(noauth.get(&format!("room?offset=-1&signed={signed}")).await.status(), 200);
}

#[tokio::test]
async fn cors_preflight_and_simple_requests() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--allowed_origins", "https://app.example,*.trusted.dev"]);
    server.publish("s", numbered(1..=1)).await;
    for origin in ["https://app.example", "https://a.trusted.dev"] {
        let preflight = server
            .client
            .request(reqwest::Method::OPTIONS, server.ds("s?offset=-1"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "GET")
            .header("Access-Control-Request-Headers", "x-signed, x-jid, if-none-match")
            .send()
            .await
            .unwrap();
        assert!(preflight.status().is_success(), "{origin}: {}", preflight.status());
        assert_eq!(header(&preflight, "access-control-allow-origin").as_deref(), Some(origin));
        let methods = header(&preflight, "access-control-allow-methods").unwrap();
        for method in ["GET", "HEAD", "OPTIONS"] {
            assert!(methods.contains(method), "{methods}");
        }
        let allowed = header(&preflight, "access-control-allow-headers").unwrap().to_lowercase();
        for h in ["x-signed", "x-jid", "if-none-match"] {
            assert!(allowed.contains(h), "{allowed}");
        }
        let simple = server.client.get(server.ds("s?offset=-1")).header("Origin", origin).send().await.unwrap();
        assert_eq!(header(&simple, "access-control-allow-origin").as_deref(), Some(origin));
        let exposed = header(&simple, "access-control-expose-headers").unwrap().to_lowercase();
        for h in ["stream-next-offset", "stream-cursor", "stream-up-to-date", "etag"] {
            assert!(exposed.contains(h), "{exposed}");
        }
    }
    let foreign =
        server.client.get(server.ds("s?offset=-1")).header("Origin", "https://evil.example").send().await.unwrap();
    assert!(header(&foreign, "access-control-allow-origin").is_none());
    let preflight = server
        .client
        .request(reqwest::Method::OPTIONS, server.ds("s"))
        .header("Origin", "https://evil.example")
        .header("Access-Control-Request-Method", "GET")
        .send()
        .await
        .unwrap();
    assert!(header(&preflight, "access-control-allow-origin").is_none());
    // No `Origin` (no browser cross-origin request): no CORS response headers, and a `Vary`
    // that keeps a shared cache from serving this to a cross-origin request.
    let plain = server.client.get(server.ds("s?offset=-1")).send().await.unwrap();
    assert_eq!(plain.status(), 200);
    for name in ["access-control-allow-origin", "access-control-expose-headers", "access-control-allow-credentials"] {
        assert!(header(&plain, name).is_none(), "{name} without an Origin");
    }
    assert!(all_values(&plain, "vary").split(',').any(|v| v.trim() == "Origin"), "{:?}", all_values(&plain, "vary"));
    assert_eq!(plain.text().await.unwrap(), r#"[{"n":1}]"#);
}

/// Every value of a header, joined as one list.
fn all_values(response: &reqwest::Response, name: &str) -> String {
    let values: Vec<&str> = response.headers().get_all(name).iter().map(|v| v.to_str().unwrap()).collect();
    values.join(", ")
}

#[tokio::test]
async fn secrets_never_reach_the_logs() {
    let dir = temp_dir();
    let server =
        private_server(dir.path(), &["--jwt_secret", JWT_SECRET, "--log_level", "trace", "--ds_poll_interval", "1"]);
    broadcast_with_derived_key(&server, "room").await;
    let derived_key = anycable_ds::auth::derive_broadcast_key(SECRET);
    // Failures of every kind, successes too.
    let _ = server.broadcast_with_key(r#"{"stream":"room","data":"1"}"#, Some("wrong")).await;
    for (_, token) in bad_tokens("room") {
        let mut request = server.client.get(server.ds("room?offset=-1"));
        if let Some(token) = token {
            request = request.header("X-Signed", token);
        }
        let _ = request.send().await.unwrap();
    }
    let signed = sign_stream(STREAMS_SECRET, "room");
    let _ = server.client.get(server.ds("room?offset=-1")).header("X-JID", "garbage").send().await.unwrap();
    let _ = server
        .client
        .get(server.ds(&format!("room?offset=-1&signed={signed}")))
        .header("X-JID", valid_jwt())
        .send()
        .await
        .unwrap();
    let mut sse = SseClient::open(&server, &format!("room?offset=-1&live=sse&signed={signed}")).await;
    assert!(sse.next_batch(Duration::from_secs(5)).await.is_some());
    let metrics = server.client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();

    let logs = server.logs();
    assert!(logs.contains("DEBUG") || logs.contains("TRACE"), "debug logging is on");
    for secret in [SECRET, STREAMS_SECRET, JWT_SECRET, derived_key.as_str()] {
        assert!(!logs.contains(secret), "secret {secret:?} leaked into the log");
        assert!(!metrics.contains(secret), "secret {secret:?} leaked into metrics");
    }
}
