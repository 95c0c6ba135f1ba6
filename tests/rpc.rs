//! Readers authenticated by the application over AnyCable's HTTP RPC (`--rpc_host`): the
//! exact request, every read mode, what each answer becomes, the limits that protect the
//! application (concurrency, circuit breaker), the optional cache, CORS with credentials.

mod common;

use std::time::{Duration, Instant};

use common::app::{Mode, RpcApp};
use common::{header, numbered, temp_dir, Server, SseClient};
use serde_json::{json, Value};

/// The application secret; its RPC secret is HMAC-SHA256(it, "rpc-cable"), from
/// `echo -n 'rpc-cable' | openssl dgst -sha256 -hmac 'qwerty'`.
const SECRET: &str = "qwerty";
const DERIVED_RPC_SECRET: &str = "57c40610d142fe7d7999be4e23dfba4f42c3c542e1f278063e8e3b6a30b0c2bd";
const GOOD: &str = "session=good-alice";

fn start(dir: &std::path::Path, app: &RpcApp, extra: &[&str]) -> Server {
    let mut args = vec!["--secret", SECRET, "--rpc_host", app.url.as_str()];
    args.extend_from_slice(extra);
    Server::start(dir, &args)
}

async fn get(server: &Server, stream_and_query: &str, cookie: Option<&str>) -> reqwest::Response {
    let mut request = server.client.get(server.ds(stream_and_query));
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    request.send().await.unwrap()
}

async fn error_of(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    (status, body["error"].as_str().unwrap_or_default().to_string())
}

#[tokio::test]
async fn the_call_is_the_one_anycable_makes() {
    let app = RpcApp::start();
    let dir = temp_dir();
    let server = start(dir.path(), &app, &["--headers", "Cookie,X-Api-Version", "--proxy-cookies", "session,locale"]);
    server.publish("room", numbered(1..=2)).await;

    let response = server
        .client
        .get(server.ds("room?offset=-1&token=t1"))
        .header("cookie", format!("{GOOD}; tracking=1; locale=en"))
        .header("x-api-version", "3")
        .header("x-other", "not proxied")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Vec<Value>>().await.unwrap(), numbered(1..=2));

    let calls = app.calls();
    assert_eq!(calls.len(), 1, "one call per read");
    let call = &calls[0];
    assert_eq!(call.path, "/_anycable/connect");
    assert_eq!(call.headers["authorization"], format!("Bearer {DERIVED_RPC_SECRET}"));
    assert_eq!(call.headers["content-type"], "application/json");
    assert_eq!(call.headers["x-anycable-meta-protov"], "v1");
    let sid = &call.headers["x-anycable-meta-sid"];
    assert!(sid.len() >= 16 && sid.bytes().all(|b| b.is_ascii_alphanumeric()), "sid {sid:?}");
    assert_eq!(
        call.body,
        json!({"env": {
            "url": server.ds("room?offset=-1&token=t1"),
            "headers": {
                "cookie": "session=good-alice; locale=en",
                "x-api-version": "3",
                "REMOTE_ADDR": "127.0.0.1",
            },
        }})
    );

    // A fresh session id per call; a header left out when the reader has none.
    let response = get(&server, "room?offset=-1", Some(GOOD)).await;
    assert_eq!(response.status(), 200);
    let calls = app.calls();
    assert_ne!(calls[1].headers["x-anycable-meta-sid"], *sid);
    assert_eq!(calls[1].env_headers(), json!({"cookie": GOOD, "REMOTE_ADDR": "127.0.0.1"}));
}

#[tokio::test]
async fn hostile_header_values_reach_the_application_intact_or_not_at_all() {
    let app = RpcApp::start();
    let dir = temp_dir();
    let server = start(dir.path(), &app, &[]);
    // Quotes, backslashes, braces and a JSON-looking escape: passed on as the same text.
    let tricky = r#"session=good"\{}\u0000; x="a;b""#;
    let response = get(&server, "a?offset=-1", Some(tricky)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(app.calls()[0].env_headers()["cookie"], tricky);
    // Bytes that are not text: left out (the application sees no cookie and refuses).
    let response = server
        .client
        .get(server.ds("a?offset=-1"))
        .header("cookie", reqwest::header::HeaderValue::from_bytes(b"session=good\xff\xfe").unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(response).await, (401, "unauthorized".into()));
    assert_eq!(app.calls()[1].env_headers(), json!({"REMOTE_ADDR": "127.0.0.1"}));
    // An empty or whitespace cookie is no cookie.
    let response = get(&server, "a?offset=-1", Some(" ")).await;
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn a_host_header_that_is_not_a_plain_host_never_reaches_the_application() {
    let app = RpcApp::start();
    let dir = temp_dir();
    let server = start(dir.path(), &app, &[]);
    let read = |host: &'static str| {
        let request = server.client.get(server.ds("room?offset=-1")).header("cookie", GOOD).header("host", host);
        async move { request.send().await.unwrap() }
    };
    // Another stream's URL, a user part, a path, a bad port, spaces: 400, no call.
    for host in ["evil.com/ds/other?x=", "evil.com@127.0.0.1", "a b", "host:99999", "h:1/x", "[::1]junk", "h?x"] {
        assert_eq!(error_of(read(host).await).await, (400, "invalid Host header".into()), "{host:?}");
    }
    assert_eq!(app.call_count(), 0);
    // Plain hosts, as proxies and browsers send them: the URL is built from them.
    for (host, url) in [
        ("app.example.com", "http://app.example.com/ds/room?offset=-1"),
        ("[::1]:8080", "http://[::1]:8080/ds/room?offset=-1"),
    ] {
        assert_eq!(read(host).await.status(), 200, "{host}");
        assert_eq!(app.calls().last().unwrap().body["env"]["url"], url);
    }
}

#[tokio::test]
async fn an_explicit_rpc_secret_wins_over_the_derived_one() {
    let app = RpcApp::start();
    let dir = temp_dir();
    let server = start(dir.path(), &app, &["--http_rpc_secret", "rpc-s3cret"]);
    assert_eq!(get(&server, "a?offset=-1", Some(GOOD)).await.status(), 200);
    assert_eq!(app.calls()[0].headers["authorization"], "Bearer rpc-s3cret");
}

#[tokio::test]
async fn every_read_mode_asks_the_application() {
    let app = RpcApp::start();
    let dir = temp_dir();
    let server = start(dir.path(), &app, &["--ds_poll_interval", "1", "--ds_sse_ttl", "1"]);
    server.publish("room", numbered(1..=3)).await;
    let modes: [(&str, &str); 4] = [
        ("HEAD", "room"),
        ("catch-up", "room?offset=-1"),
        ("long-poll", "room?offset=-1&live=long-poll"),
        ("sse", "room?offset=-1&live=sse"),
    ];
    for (mode, query) in modes {
        for (cookie, expected) in [(Some(GOOD), 200), (None, 401), (Some("session=bad"), 401)] {
            let before = app.call_count();
            let request =
                if mode == "HEAD" { server.client.head(server.ds(query)) } else { server.client.get(server.ds(query)) };
            let request = match cookie {
                Some(cookie) => request.header("cookie", cookie),
                None => request,
            };
            let response = request.send().await.unwrap();
            assert_eq!(response.status().as_u16(), expected, "{mode} with {cookie:?}");
            assert_eq!(app.call_count(), before + 1, "{mode} with {cookie:?}: one call");
            if expected == 200 && mode != "sse" {
                // Cookie-authenticated: never reused for another (or no) cookie.
                assert_eq!(header(&response, "cache-control").as_deref(), Some("no-store"), "{mode}");
            }
            if expected == 200 && (mode == "catch-up" || mode == "long-poll") {
                let vary = header(&response, "vary").unwrap_or_default();
                assert!(vary.contains("Cookie"), "{mode}: Vary {vary:?}");
            }
            if expected == 401 && mode != "HEAD" {
                assert_eq!(error_of(response).await, (401, "unauthorized".into()));
            }
        }
    }
    let response = get(&server, "room?offset=-1", Some("session=expired")).await;
    assert_eq!(error_of(response).await, (401, "token_expired".into()));

    // SSE with the cookie streams the backlog.
    let mut sse = SseClient::open_with(&server, cookie_client(GOOD), "room?offset=-1&live=sse").await;
    let (batch, _) = sse.next_batch(Duration::from_secs(5)).await.expect("a data event");
    assert_eq!(batch, numbered(1..=3));
}

fn cookie_client(cookie: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("cookie", cookie.parse().unwrap());
    reqwest::Client::builder().default_headers(headers).build().unwrap()
}

#[tokio::test]
async fn a_jwt_skips_the_application_and_norpc_turns_it_off() {
    let app = RpcApp::start();
    let dir = temp_dir();
    let server = start(dir.path(), &app, &[]);
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"ext": "{\"user\":1}"}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let response = server.client.get(server.ds("a?offset=-1")).header("x-jid", &token).send().await.unwrap();
    assert_eq!(response.status(), 200);
    // A bad JWT is refused on its own, also without asking the application.
    let response = server
        .client
        .get(server.ds("a?offset=-1"))
        .header("x-jid", "garbage")
        .header("cookie", GOOD)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(app.call_count(), 0);
    drop(server);

    let dir = temp_dir();
    let server = start(dir.path(), &app, &["--norpc"]);
    assert_eq!(get(&server, "a?offset=-1", None).await.status(), 200);
    assert_eq!(app.call_count(), 0);
    assert!(server.logs().contains("reads are open"), "{}", server.logs());
}

#[tokio::test]
async fn an_application_that_cannot_answer_is_a_quick_503() {
    let app = RpcApp::start();
    let dir = temp_dir();
    let server = start(dir.path(), &app, &["--rpc_request_timeout", "300"]);
    let check = |what: &'static str| {
        let server = &server;
        async move {
            let started = Instant::now();
            let response = get(server, "a?offset=-1", Some(GOOD)).await;
            let took = started.elapsed();
            assert!(header(&response, "retry-after").is_some(), "{what}: Retry-After");
            assert_eq!(error_of(response).await, (503, "auth_unavailable".into()), "{what}");
            assert!(took < Duration::from_millis(1500), "{what}: took {took:?}");
        }
    };
    app.set_mode(Mode::Http500);
    check("HTTP 500").await;
    app.set_mode(Mode::StatusError);
    check("status ERROR").await;
    app.set_mode(Mode::Garbage);
    check("an answer that is not JSON").await;
    app.set_mode(Mode::Huge);
    check("an answer over 1 MiB").await;
    app.set_mode(Mode::Normal);
    app.set_delay(Duration::from_secs(3));
    check("slower than rpc.request_timeout").await;
    app.set_delay(Duration::ZERO);
    assert_eq!(get(&server, "a?offset=-1", Some(GOOD)).await.status(), 200, "answers again");
    app.stop().await;
    check("application down").await;
    assert!(server.metric("rpc_timeout_total").await >= 1.0);
}

#[tokio::test]
async fn at_most_rpc_concurrency_calls_under_200_readers() {
    let app = RpcApp::start();
    app.set_delay(Duration::from_millis(20));
    let dir = temp_dir();
    let server = start(dir.path(), &app, &["--rpc_concurrency", "4", "--rpc_request_timeout", "20000"]);
    server.publish("room", numbered(1..=1)).await;
    let reads = (0..200).map(|i| {
        let request = server.client.get(server.ds("room?offset=-1")).header("cookie", format!("session=good-{i}"));
        async move { request.send().await.unwrap().status().as_u16() }
    });
    let statuses = futures_util::future::join_all(reads).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(app.call_count(), 200);
    assert_eq!(app.max_in_flight(), 4, "the limit is reached and never passed");
    assert_eq!(server.metric("rpc_pending_num").await, 0.0);
}

/// A client whose connections come from loopback address `127.0.0.{n}`: the server sees
/// another client address (Linux routes all of 127/8 to the loopback interface).
fn client_from(n: u8) -> reqwest::Client {
    reqwest::Client::builder().local_address(std::net::IpAddr::from([127, 0, 0, n])).build().unwrap()
}

#[tokio::test]
async fn a_failing_application_is_not_stampeded_and_is_used_again_once_it_answers() {
    let app = RpcApp::start();
    app.set_mode(Mode::Http500);
    let dir = temp_dir();
    let server = start(dir.path(), &app, &[]);
    // Forty readers, each from an address of its own: HTTP 500 to all of them is the
    // application failing (one client's 500s could be about its own input: next test).
    for i in 0..40 {
        let response = client_from(2 + i).get(server.ds("a?offset=-1")).header("cookie", GOOD).send().await.unwrap();
        assert_eq!(response.status(), 503);
    }
    let calls = app.call_count();
    assert!(calls <= 12, "{calls} calls reached the failing application for 40 reads");
    assert_eq!(server.metric("rpc_breaker_open").await, 1.0);
    assert!(server.metric("rpc_breaker_refused_total").await >= 28.0);

    app.set_mode(Mode::Normal);
    let fixed = Instant::now();
    loop {
        let status = get(&server, "a?offset=-1", Some(GOOD)).await.status();
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(fixed.elapsed() < Duration::from_secs(12), "not used again within 12 s of answering");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovered = fixed.elapsed();
    assert!(recovered < Duration::from_secs(10), "recovered after {recovered:?}");
    // Trial calls close the breaker again.
    for _ in 0..5 {
        assert_eq!(get(&server, "a?offset=-1", Some(GOOD)).await.status(), 200);
    }
    assert_eq!(server.metric("rpc_breaker_open").await, 0.0);
}

#[tokio::test]
async fn one_client_flooding_a_cookie_the_application_fails_on_cannot_switch_reads_off() {
    let app = RpcApp::start();
    let dir = temp_dir();
    let server = start(dir.path(), &app, &[]);
    server.publish("room", numbered(1..=1)).await;
    // `session=boom` makes the application answer ERROR (an exception in `connect`),
    // `session=crash` HTTP 500: input in the client's hands, 503 for that client alone.
    let flooder = client_from(66);
    for round in 0..60 {
        let cookie = if round % 2 == 0 { "session=boom" } else { "session=crash" };
        let response = flooder.get(server.ds("room?offset=-1")).header("cookie", cookie).send().await.unwrap();
        assert_eq!(error_of(response).await, (503, "auth_unavailable".into()), "round {round}");
        if round % 10 == 9 {
            let good = get(&server, "room?offset=-1", Some(GOOD)).await;
            assert_eq!(good.status(), 200, "a good cookie during the flood (round {round})");
        }
    }
    assert_eq!(server.metric("rpc_breaker_open").await, 0.0);
    assert_eq!(server.metric("rpc_breaker_refused_total").await, 0.0);
    assert_eq!(app.call_count(), 66, "every read asked the application");
}

#[tokio::test]
async fn the_cache_reuses_successes_and_never_failures() {
    let app = RpcApp::start();
    let dir = temp_dir();
    let server = start(dir.path(), &app, &["--rpc_cache_ttl", "60"]);
    server.publish("room", numbered(1..=2)).await;
    let tail = get(&server, "room?offset=-1", Some(GOOD)).await;
    let tail = header(&tail, "stream-next-offset").unwrap();
    for query in [format!("room?offset={tail}"), format!("room?offset={tail}&live=long-poll&cursor=1")] {
        let status = get(&server, &query, Some(GOOD)).await.status().as_u16();
        assert!(status == 200 || status == 204, "{query}: {status}");
    }
    assert_eq!(app.call_count(), 1, "the same reader reconnecting is one call");
    assert_eq!(get(&server, "room?offset=-1", Some("session=good-bob")).await.status(), 200);
    assert_eq!(get(&server, "other?offset=-1", Some(GOOD)).await.status(), 200);
    assert_eq!(app.call_count(), 3, "other credentials, other stream: asked");
    for _ in 0..2 {
        assert_eq!(get(&server, "room?offset=-1", Some("session=bad")).await.status(), 401);
    }
    assert_eq!(app.call_count(), 5, "refusals are not cached");
    assert_eq!(server.metric("rpc_cache_hit_total").await, 2.0);
}

#[tokio::test]
async fn secrets_and_cookies_stay_out_of_logs_and_metrics() {
    let app = RpcApp::start();
    let dir = temp_dir();
    let server = start(dir.path(), &app, &["--log_level", "debug", "--rpc_request_timeout", "300"]);
    let cookie = "session=good-c00kie-value-xyz";
    assert_eq!(get(&server, "a?offset=-1", Some(cookie)).await.status(), 200);
    app.set_mode(Mode::Http500);
    assert_eq!(get(&server, "a?offset=-1", Some(cookie)).await.status(), 503);
    app.stop().await;
    assert_eq!(get(&server, "a?offset=-1", Some(cookie)).await.status(), 503);
    let metrics = server.client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for (what, text) in [("log", server.logs()), ("metrics", metrics)] {
        for secret in [SECRET, DERIVED_RPC_SECRET, "c00kie-value"] {
            assert!(!text.contains(secret), "{what} contains {secret:?}:\n{text}");
        }
    }
    assert!(server.logs().contains("RPC connect to the application failed"), "{}", server.logs());
}

#[tokio::test]
async fn cookies_cross_origin_only_for_listed_origins() {
    let app = RpcApp::start();
    let dir = temp_dir();
    let server = start(dir.path(), &app, &["--allowed_origins", "https://page.test"]);
    let from = |origin: &'static str| {
        server.client.get(server.ds("a?offset=-1")).header("origin", origin).header("cookie", GOOD).send()
    };
    let listed = from("https://page.test").await.unwrap();
    assert_eq!(header(&listed, "access-control-allow-origin").as_deref(), Some("https://page.test"));
    assert_eq!(header(&listed, "access-control-allow-credentials").as_deref(), Some("true"));
    let other = from("https://evil.test").await.unwrap();
    assert_eq!(header(&other, "access-control-allow-origin"), None);
    assert_eq!(header(&other, "access-control-allow-credentials"), None);

    // A preflight carries no cookies and never reaches the application.
    let calls = app.call_count();
    let preflight = server
        .client
        .request(reqwest::Method::OPTIONS, server.ds("a?offset=-1"))
        .header("origin", "https://page.test")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "last-event-id")
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success());
    assert_eq!(header(&preflight, "access-control-allow-credentials").as_deref(), Some("true"));
    assert_eq!(app.call_count(), calls);
    drop(server);

    // Any origin (empty list): never with credentials.
    let dir = temp_dir();
    let server = start(dir.path(), &app, &[]);
    let response =
        server.client.get(server.ds("a?offset=-1")).header("origin", "https://any.test").send().await.unwrap();
    assert_eq!(header(&response, "access-control-allow-origin").as_deref(), Some("https://any.test"));
    assert_eq!(header(&response, "access-control-allow-credentials"), None);
}

#[test]
fn an_rpc_host_that_is_not_http_stops_start_up() {
    for (host, expected) in [("localhost:50051", "rpc.host"), ("grpc://app:50051", "HTTP RPC")] {
        let dir = temp_dir();
        let output = Server::command(dir.path())
            .args(["--port", "0", "--data_dir"])
            .arg(dir.path().join("data"))
            .args(["--rpc_host", host])
            .output()
            .unwrap();
        assert!(!output.status.success(), "{host}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{host}: {stderr}");
    }
}
