//! The reserved subscription API (`{ds.path}/__ds/`): webhooks signed with the server's
//! Ed25519 key and checked against its JWKS, callbacks and fencing, pull-wake claims, what a
//! slow, dead or garbage-answering receiver does to the server (nothing: bounded retries,
//! bounded memory, writes at full speed), and webhook URLs that must be refused. Hostile URL
//! spellings are `tests/subscriptions_urls.rs`. Every test runs on both engines; webhooks go
//! to 127.0.0.1 only (`--ds_webhooks_allow_loopback`).

mod common;

use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use common::ds_write::{post, put, write};
use common::webhooks::{dead_url, Receiver, Reply};
use common::{nats_engine, temp_dir, Server, KEY};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde_json::{json, Value};

const LOOPBACK: &str = "--ds_webhooks_allow_loopback";

fn sub_url(server: &Server, rest: &str) -> String {
    server.ds(&format!("__ds/{rest}"))
}

/// A subscription API request with the write key.
async fn call(server: &Server, method: reqwest::Method, rest: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = server.client.request(method, sub_url(server, rest)).bearer_auth(KEY);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() })
}

async fn subscribe(server: &Server, id: &str, spec: Value) -> Value {
    let (status, body) = call(server, reqwest::Method::PUT, &format!("subscriptions/{id}"), Some(spec)).await;
    assert_eq!(status, 201, "{body}");
    body
}

/// Checks `Webhook-Signature` against the JWKS the server publishes.
fn verify(signature: &str, body: &[u8], jwks: &Value) {
    let parts: Vec<&str> = signature.split(',').collect();
    assert_eq!(parts.len(), 3, "{signature}");
    let t = parts[0].strip_prefix("t=").unwrap();
    let kid = parts[1].strip_prefix("kid=").unwrap();
    let sig = parts[2].strip_prefix("ed25519=").unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(now.abs_diff(t.parse().unwrap()) < 60, "timestamp {t}");
    let key = jwks["keys"].as_array().unwrap().iter().find(|k| k["kid"] == kid).expect("the kid is in the JWKS");
    assert_eq!(
        (key["kty"].as_str(), key["crv"].as_str(), key["alg"].as_str()),
        (Some("OKP"), Some("Ed25519"), Some("EdDSA"))
    );
    let x: [u8; 32] = URL_SAFE_NO_PAD.decode(key["x"].as_str().unwrap()).unwrap().try_into().unwrap();
    let key = VerifyingKey::from_bytes(&x).unwrap();
    let sig = Signature::from_slice(&URL_SAFE_NO_PAD.decode(sig).unwrap()).unwrap();
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(body);
    key.verify(&signed, &sig).expect("the signature verifies");
    let mut tampered = signed.clone();
    *tampered.last_mut().unwrap() ^= 1;
    assert!(key.verify(&tampered, &sig).is_err());
}

async fn jwks(server: &Server) -> Value {
    let response = server.client.get(sub_url(server, "jwks.json")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(common::header(&response, "content-type").as_deref(), Some("application/jwk-set+json"));
    response.json().await.unwrap()
}

#[tokio::test]
async fn webhooks_are_signed_acked_and_fenced() {
    let dir = temp_dir();
    let mut server = Server::start(dir.path(), &[LOOPBACK]);
    let receiver = Receiver::start(Reply::Json("{}")).await;
    let spec =
        json!({ "type": "webhook", "pattern": "orders/*", "webhook": { "url": receiver.url }, "lease_ttl_ms": 60000 });
    // Managing subscriptions takes the write key; nothing under __ds/ is ever a stream.
    let anonymous = server.client.put(sub_url(&server, "subscriptions/s1")).json(&spec).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let created = subscribe(&server, "s1", spec.clone()).await;
    assert_eq!(created["webhook"]["signing"]["jwks_url"], format!("http://{}/ds/__ds/jwks.json", server.addr));
    assert!(created.get("webhook_secret").is_none() && created["webhook"].get("secret").is_none());
    assert_eq!(call(&server, reqwest::Method::PUT, "subscriptions/s1", Some(spec.clone())).await.0, 200);
    let mut other = spec.clone();
    other["pattern"] = json!("other/*");
    let (status, body) = call(&server, reqwest::Method::PUT, "subscriptions/s1", Some(other)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("SUBSCRIPTION_ALREADY_EXISTS")));
    for path in ["%5F%5Fds/subscriptions/s1", "__ds/x", "__ds"] {
        let response =
            write(&server, reqwest::Method::PUT, path).header("content-type", "text/plain").send().await.unwrap();
        assert!([400, 404, 405].contains(&response.status().as_u16()), "PUT {path}: never a stream");
        assert!([400, 404].contains(&server.get(path).await.status().as_u16()), "GET {path}: never a stream");
    }

    assert_eq!(put(&server, "orders/1", "application/json", br#"{"n":1}"#).await.status(), 201);
    let hit = receiver.wait_for(1, Duration::from_secs(10)).await.remove(0);
    let keys = jwks(&server).await;
    verify(hit.signature.as_deref().expect("signed"), &hit.body, &keys);
    let wake = hit.json();
    assert_eq!(wake["subscription_id"], "s1");
    assert_eq!(wake["callback_url"], format!("http://{}/ds/__ds/subscriptions/s1/callback", server.addr));
    let stream = &wake["streams"][0];
    assert_eq!(
        (stream["path"].as_str(), stream["link_type"].as_str(), stream["has_pending"].as_bool()),
        (Some("orders/1"), Some("glob"), Some(true))
    );
    assert_eq!(stream["tail_offset"].as_str().unwrap(), server.tail("orders/1").await);

    // More appends during the wake make no second delivery.
    assert_eq!(post(&server, "orders/1", "application/json", br#"{"n":2}"#.to_vec()).await.status(), 204);
    let callback = |token: &str, body: Value| {
        server.client.post(wake["callback_url"].as_str().unwrap()).bearer_auth(token).json(&body).send()
    };
    let token = wake["callback_token"].as_str().unwrap();
    let ack = json!({ "wake_id": wake["wake_id"], "generation": wake["generation"], "acks": [{ "stream": "orders/1", "offset": stream["tail_offset"] }], "done": true });
    assert_eq!(callback("forged", ack.clone()).await.unwrap().status(), 401);
    let answer = callback(token, ack.clone()).await.unwrap();
    assert_eq!(answer.status(), 200);
    // The second append is pending: the next wake follows at once.
    assert_eq!(answer.json::<Value>().await.unwrap(), json!({ "ok": true, "next_wake": true }));
    let replay = callback(token, ack).await.unwrap();
    assert_eq!(replay.status(), 409);
    assert_eq!(replay.json::<Value>().await.unwrap()["error"]["code"], "FENCED");
    let next = receiver.wait_for(2, Duration::from_secs(10)).await.remove(1).json();
    assert_eq!(next["generation"], wake["generation"].as_u64().unwrap() + 1);
    assert_eq!(receiver.hits().len(), 2);

    // Subscriptions and the signing key survive a restart (same kid, same acked offsets).
    server.terminate(Duration::from_secs(10));
    server.restart();
    assert_eq!(jwks(&server).await, keys);
    let (status, body) = call(&server, reqwest::Method::GET, "subscriptions/s1", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["streams"][0]["acked_offset"], stream["tail_offset"]);
    assert_eq!(call(&server, reqwest::Method::DELETE, "subscriptions/s1", None).await.0, 204);
    assert_eq!(call(&server, reqwest::Method::GET, "subscriptions/s1", None).await.0, 404);
}

#[tokio::test]
async fn done_auto_acks_and_explicit_links_come_and_go() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &[LOOPBACK]);
    let receiver = Receiver::start(Reply::Json(r#"{"done":true}"#)).await;
    subscribe(&server, "s2", json!({ "type": "webhook", "streams": ["a", "b"], "webhook": { "url": receiver.url } }))
        .await;
    assert_eq!(
        call(&server, reqwest::Method::POST, "subscriptions/s2/streams", Some(json!({ "streams": ["c/d"] }))).await.0,
        204
    );
    assert_eq!(call(&server, reqwest::Method::DELETE, "subscriptions/s2/streams/a", None).await.0, 204);
    put(&server, "c/d", "text/plain", b"x").await;
    receiver.wait_for(1, Duration::from_secs(10)).await;
    let tail = server.tail("c/d").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = call(&server, reqwest::Method::GET, "subscriptions/s2", None).await;
        let paths: Vec<&str> =
            body["streams"].as_array().unwrap().iter().map(|s| s["path"].as_str().unwrap()).collect();
        assert_eq!(paths, ["b", "c/d"]);
        if body["streams"][1]["acked_offset"] == tail.as_str() {
            break;
        }
        assert!(Instant::now() < deadline, "the done reply acked the snapshot: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    put(&server, "a", "text/plain", b"x").await; // no longer followed
    tokio::time::sleep(Duration::from_millis(500)).await; // absence: give a wrong wake time to show
    assert_eq!(receiver.hits().len(), 1);
}

#[tokio::test]
async fn pull_wake_claims_are_exclusive_across_nodes() {
    let dir = temp_dir();
    let first = Server::start(dir.path(), &[]);
    // In cluster mode a second node shares the stream (and the KV bucket) with the first.
    let dir2 = temp_dir();
    let second = if nats_engine() {
        let stream = first
            .logs()
            .split("JetStream stream ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap()
            .to_string();
        let urls = std::env::var("ANYCABLE_DS_TEST_NATS").unwrap();
        let args = [
            "--public_streams",
            "--broadcast_key",
            KEY,
            "--broker",
            "nats",
            "--nats_servers",
            &urls,
            "--nats_stream",
            &stream,
        ];
        Some(Server::start_with(dir2.path(), args.iter().map(|s| s.to_string()).collect()))
    } else {
        None
    };
    let nodes: Vec<&Server> = std::iter::once(&first).chain(second.as_ref()).collect();
    put(&first, "wakes", "application/json", b"[]").await;
    subscribe(
        &first,
        "p1",
        json!({ "type": "pull-wake", "pattern": "jobs/**", "wake_stream": "wakes", "lease_ttl_ms": 1000 }),
    )
    .await;
    put(nodes[nodes.len() - 1], "jobs/x/1", "application/json", br#"{"job":1}"#).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while first.read("wakes", "-1").await.0.is_empty() {
        assert!(Instant::now() < deadline, "no wake event");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (events, _, _) = first.read("wakes", "-1").await;
    assert_eq!((events[0]["type"].as_str(), events[0]["stream"].as_str()), (Some("wake"), Some("jobs/x/1")));
    // Eight workers through every node at once: exactly one wins.
    let claims = (0..8).map(|i| {
        let node = nodes[i % nodes.len()];
        async move {
            call(node, reqwest::Method::POST, "subscriptions/p1/claim", Some(json!({ "worker": format!("w{i}") })))
                .await
        }
    });
    let results = futures_util::future::join_all(claims).await;
    let won: Vec<&Value> = results.iter().filter(|(s, _)| *s == 200).map(|(_, b)| b).collect();
    assert_eq!(won.len(), 1, "{results:?}");
    for (status, body) in results.iter().filter(|(s, _)| *s != 200) {
        assert_eq!((*status, body["error"]["code"].as_str()), (409, Some("ALREADY_CLAIMED")));
    }
    let claim = won[0];
    let ack = |node: &Server, token: &str, body: Value| {
        node.client.post(sub_url(node, "subscriptions/p1/ack")).bearer_auth(token).json(&body).send()
    };
    let tail = claim["streams"][0]["tail_offset"].clone();
    let body = json!({ "wake_id": claim["wake_id"], "generation": claim["generation"], "acks": [{ "stream": "jobs/x/1", "offset": tail }], "done": true });
    let answer = ack(nodes[nodes.len() - 1], claim["token"].as_str().unwrap(), body.clone()).await.unwrap();
    assert_eq!(answer.json::<Value>().await.unwrap(), json!({ "ok": true, "next_wake": false }));
    let (status, body) =
        call(&first, reqwest::Method::POST, "subscriptions/p1/claim", Some(json!({ "worker": "late" }))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (409, Some("NO_PENDING_WORK")));
    // An expired claim is fenced, and the work goes to the next claimer.
    post(&first, "jobs/x/1", "application/json", br#"{"job":2}"#.to_vec()).await;
    let (status, claim) =
        call(&first, reqwest::Method::POST, "subscriptions/p1/claim", Some(json!({ "worker": "slow" }))).await;
    assert_eq!(status, 200, "{claim}\n{}", first.logs());
    tokio::time::sleep(Duration::from_millis(1300)).await; // the 1 s lease runs out
    let (status, again) =
        call(&first, reqwest::Method::POST, "subscriptions/p1/claim", Some(json!({ "worker": "fast" }))).await;
    assert_eq!(status, 200, "{again}");
    assert!(again["generation"].as_u64() > claim["generation"].as_u64());
    let stale = json!({ "wake_id": claim["wake_id"], "generation": claim["generation"], "done": true });
    let answer = ack(&first, claim["token"].as_str().unwrap(), stale).await.unwrap();
    assert_eq!(answer.status(), 409);
    let release = json!({ "wake_id": again["wake_id"], "generation": again["generation"] });
    let answer = first
        .client
        .post(sub_url(&first, "subscriptions/p1/release"))
        .bearer_auth(again["token"].as_str().unwrap())
        .json(&release)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 204);
}

/// Attempts, metric and log of a receiver that never takes the wake.
async fn gives_up(reply: Reply) {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &[LOOPBACK]);
    let receiver = Receiver::start(reply).await;
    subscribe(
        &server,
        "bad",
        json!({ "type": "webhook", "streams": ["s"], "webhook": { "url": receiver.url }, "lease_ttl_ms": 600000 }),
    )
    .await;
    let started = Instant::now();
    put(&server, "s", "text/plain", b"x").await;
    // 4 attempts (backoff 0.25 s, 0.5 s, 1 s, ±20 %), then nothing until the lease runs out.
    receiver.wait_for(4, Duration::from_secs(30)).await;
    server.wait_for_metric("ds_webhook_deliveries_total{result=\"gave_up\"}", 1.0, Duration::from_secs(30)).await;
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await; // absence of a fifth attempt
    assert_eq!(receiver.hits().len(), 4, "{reply:?}");
    eprintln!("{reply:?}: 4 attempts, gave up after {took:?}");
    // The server still writes and reads at once.
    assert_eq!(post(&server, "s", "text/plain", b"y".to_vec()).await.status(), 204);
    assert_eq!(server.get("s?offset=-1").await.status(), 200);
}

#[tokio::test]
async fn failing_receivers_get_bounded_retries() {
    gives_up(Reply::Status(500)).await;
    gives_up(Reply::Garbage).await;
}

#[tokio::test]
async fn a_hanging_receiver_times_out_per_attempt() {
    gives_up(Reply::Hang).await;
}

/// p50 and p99 of `n` sequential appends to `stream`, in ms.
async fn append_latency(server: &Server, stream: &str, n: usize) -> (f64, f64) {
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        let status = post(server, stream, "application/json", format!("{{\"i\":{i}}}").into_bytes()).await.status();
        times.push(start.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(status, 204);
    }
    times.sort_by(f64::total_cmp);
    (times[n / 2], times[n * 99 / 100])
}

#[tokio::test]
async fn broken_receivers_leave_writes_fast_and_memory_bounded() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &[LOOPBACK]);
    put(&server, "plain/1", "application/json", b"[]").await;
    let baseline = append_latency(&server, "plain/1", 300).await;

    let hanging = Receiver::start(Reply::Hang).await;
    subscribe(
        &server,
        "slow",
        json!({ "type": "webhook", "pattern": "slow/*", "webhook": { "url": hanging.url }, "lease_ttl_ms": 1000 }),
    )
    .await;
    put(&server, "slow/1", "application/json", b"[]").await;
    let with_slow = append_latency(&server, "slow/1", 300).await;
    subscribe(&server, "dead", json!({ "type": "webhook", "pattern": "flood/*", "webhook": { "url": dead_url().await }, "lease_ttl_ms": 1000 })).await;

    // A flood of appends to 100 subscribed streams whose receiver is down.
    let flood = |from: usize, to: usize| {
        let tasks = (0..16).map(|t| {
            let server = &server;
            async move {
                for i in (from + t..to).step_by(16) {
                    let stream = format!("flood/{}", i % 100);
                    let response = write(server, reqwest::Method::POST, &stream)
                        .header("content-type", "application/json")
                        .body(format!("{{\"i\":{i}}}"))
                        .send()
                        .await
                        .unwrap();
                    assert!(response.status() == 204 || response.status() == 404, "{}", response.status());
                    if response.status() == 404 {
                        put(server, &stream, "application/json", b"[]").await;
                    }
                }
            }
        });
        futures_util::future::join_all(tasks)
    };
    flood(0, 2_000).await;
    let warm = server.rss();
    let started = Instant::now();
    flood(2_000, 12_000).await;
    let rate = 10_000.0 / started.elapsed().as_secs_f64();
    let end = server.rss();
    let with_dead = append_latency(&server, "flood/1", 300).await;
    let attempts = server.metric("ds_webhook_deliveries_total{result=\"failed\"}").await;
    eprintln!(
        "append latency p50/p99 ms: no subscription {baseline:.2?}, hanging receiver {with_slow:.2?}, dead receiver \
         after flood {with_dead:.2?}; flood {rate:.0} appends/s; RSS {} -> {} MiB; {attempts} failed attempts",
        warm >> 20,
        end >> 20
    );
    assert!(end < warm + (48 << 20), "RSS grew from {} to {} MiB", warm >> 20, end >> 20);
    for (p50, p99) in [with_slow, with_dead] {
        assert!(p50 < baseline.0 * 3.0 + 5.0 && p99 < baseline.1 * 3.0 + 50.0, "{baseline:?} vs {p50} / {p99}");
    }
    assert!(attempts >= 1.0, "deliveries to the dead receiver were attempted");
}

#[tokio::test]
async fn unsafe_webhook_urls_are_refused() {
    let dir = temp_dir();
    let strict = Server::start(dir.path(), &[]);
    let dir2 = temp_dir();
    let lax = Server::start(dir2.path(), &[LOOPBACK]);
    let always = [
        "http://10.0.0.1/hook",
        "http://192.168.1.10/",
        "http://172.16.5.4/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/",
        "http://[::ffff:127.0.0.1]/",
        "http://0.0.0.0:8080/",
        "http://100.64.1.1/",
        "http://[fe80::1]/",
        "http://user:pw@127.0.0.1/",
        "file:///etc/passwd",
        "http://",
    ];
    let loopback =
        ["http://127.0.0.1:9/", "http://[::1]/", "http://localhost/", "http://LocalHost./x", "http://2130706433/"];
    for (server, refused) in
        [(&strict, always.iter().chain(&loopback).collect::<Vec<_>>()), (&lax, always.iter().collect())]
    {
        for url in refused {
            let spec = json!({ "type": "webhook", "pattern": "x/*", "webhook": { "url": url } });
            let (status, body) = call(server, reqwest::Method::PUT, "subscriptions/u", Some(spec)).await;
            assert_eq!((status, body["error"]["code"].as_str()), (400, Some("WEBHOOK_URL_REJECTED")), "{url}: {body}");
        }
    }
    for (i, url) in loopback.iter().enumerate() {
        let spec = json!({ "type": "webhook", "pattern": "x/*", "webhook": { "url": url } });
        assert_eq!(call(&lax, reqwest::Method::PUT, &format!("subscriptions/ok{i}"), Some(spec)).await.0, 201, "{url}");
    }
}
