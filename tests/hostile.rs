//! Black-box abuse of the running server: hundreds of malformed bodies, offsets and paths.
//! Never a 5xx, never a crash, nothing stored.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{temp_dir, Rng, Server, KEY};

/// Sends raw bytes as one HTTP/1.1 request and returns the status code.
fn raw_request(addr: &str, request: &[u8]) -> u16 {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(request).unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    while !response.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&response);
    line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn malformed_paths_offsets_and_bodies_never_cause_a_5xx() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--ds_poll_interval", "1"]);
    let mut rng = Rng(0x9e3779b97f4a7c15);

    // Paths, sent raw so no client library normalises them.
    let mut paths: Vec<Vec<u8>> = vec![
        b"/ds/".to_vec(),
        b"/ds//".to_vec(),
        b"/ds/%00".to_vec(),
        b"/ds/a%00b".to_vec(),
        b"/ds/%FF%FE".to_vec(),
        b"/ds/%".to_vec(),
        b"/ds/%zz".to_vec(),
        b"/ds/../../etc/passwd".to_vec(),
        b"/ds/%2e%2e/%2e%2e/x".to_vec(),
        b"/ds/a?offset=now&live=long-poll".to_vec(),
        b"/ds/a?offset=%FF".to_vec(),
        b"/ds/a?offset=%00".to_vec(),
        b"/ds/a?live=%FF&offset=-1".to_vec(),
        b"/ds/a?offset=-1&cursor=99999999999999999999999999".to_vec(),
        format!("/ds/{}", "x".repeat(5000)).into_bytes(),
        format!("/ds/a?offset={}", "9".repeat(500)).into_bytes(),
    ];
    for _ in 0..200 {
        let mut path = b"/ds/".to_vec();
        let len = (rng.next() % 40) as usize;
        // Printable-ish garbage: raw control bytes or spaces would break the request line itself.
        path.extend(rng.bytes(len).into_iter().map(|b| if b.is_ascii_graphic() { b } else { b'%' }));
        let query = rng.pick(&[
            "",
            "?offset=-1",
            "?live=long-poll",
            "?offset=",
            "?live=sse",
            "?offset=abc_00000000000000000001",
        ]);
        path.extend_from_slice(query.as_bytes());
        paths.push(path);
    }
    for path in &paths {
        for method in ["GET", "HEAD"] {
            let mut request = format!("{method} ").into_bytes();
            request.extend_from_slice(path);
            request.extend_from_slice(b" HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
            let status = raw_request(&server.addr, &request);
            assert!((200..500).contains(&status), "{method} {}: status {status}", String::from_utf8_lossy(path));
        }
    }

    // Bodies: random bytes, truncated and mutated valid bodies.
    let valid = r#"[{"stream":"s","data":"{\"a\":1}"},{"stream":"t","data":"2","meta":{"x":1}}]"#;
    let mut bodies: Vec<Vec<u8>> =
        vec![b"".to_vec(), b"\xff\xfe".to_vec(), b"{\"stream\":\"s\",\"data\":\"\xff\"}".to_vec()];
    for _ in 0..300 {
        let body = match rng.next() % 3 {
            0 => {
                let len = (rng.next() % 300) as usize;
                rng.bytes(len)
            }
            1 => valid.as_bytes()[..(rng.next() as usize % valid.len())].to_vec(),
            _ => {
                let mut body = valid.as_bytes().to_vec();
                for _ in 0..3 {
                    let at = rng.next() as usize % body.len();
                    body[at] = rng.next() as u8;
                }
                body
            }
        };
        bodies.push(body);
    }
    // Escape corners spliced into each field: lone surrogates (which serde_json's RawValue does
    // not check) are a 400, valid escapes and pairs are stored, deep nesting is a 400.
    let snippets = [
        (r"\udead", false),
        (r"\ud800", false),
        (r"\ud800x", false),
        (r"\uDBFF\u0041", false),
        (r"\udc00\ud800", false),
        (r"\ud800\ud800\udc00", false),
        (r"\u12", false),
        (r"\x", false),
        ("\u{1}", false),
        (r"\ud83d\ude00", true),
        (r#"\u00e9\/\\\""#, true),
    ];
    let deep = "[".repeat(150) + &"]".repeat(150);
    let mut corners: Vec<(String, bool)> = Vec::new();
    for (snippet, valid) in snippets {
        let at = |text: &str, rng: &mut Rng| {
            let cut = (rng.next() % (text.len() as u64 + 1)) as usize;
            format!("{}{snippet}{}", &text[..cut], &text[cut..])
        };
        let name = at("room", &mut rng);
        let text = at("hello", &mut rng);
        corners.push((format!(r#"{{"stream":"{name}","data":"1"}}"#), valid));
        corners.push((format!(r#"{{"stream":"s","data":"{text}"}}"#), valid));
        corners.push((format!(r#"{{"stream":"s","data":{{"k":["{text}"]}}}}"#), valid));
        corners.push((format!(r#"{{"stream":"s","data":"1","meta":{{"note":"{text}"}}}}"#), valid));
        corners.push((format!(r#"[{{"stream":"s","data":"1"}},{{"stream":"s","data":"{text}"}}]"#), valid));
    }
    corners.push((format!(r#"{{"stream":"s","data":{deep}}}"#), false));
    corners.push((format!(r#"{{"stream":"s","data":"{deep}"}}"#), false));
    for (body, valid) in &corners {
        let response =
            server.client.post(server.url("/_broadcast")).bearer_auth(KEY).body(body.clone()).send().await.unwrap();
        let expected = if *valid { 201 } else { 400 };
        assert_eq!(response.status().as_u16(), expected, "{body}");
    }
    let stored_before = server.metric("ds_messages_stored_total").await;
    let rejected_before = server.metric("broadcast_rejected_total{reason=\"invalid\"}").await;
    assert_eq!(rejected_before as usize, corners.iter().filter(|(_, valid)| !valid).count());

    let mut accepted = 0;
    for body in bodies {
        let response =
            server.client.post(server.url("/_broadcast")).bearer_auth(KEY).body(body.clone()).send().await.unwrap();
        let status = response.status().as_u16();
        assert!(status < 500, "body {:?}: {status}", String::from_utf8_lossy(&body));
        if status == 201 {
            // A mutation can still be a valid broadcast (e.g. it changed a stream name).
            accepted += 1;
        } else {
            assert_eq!(status, 400, "body {:?}", String::from_utf8_lossy(&body));
        }
    }
    assert_eq!(
        server.metric("ds_messages_stored_total").await > stored_before,
        accepted > 0,
        "only accepted broadcasts stored anything"
    );
    let rejected = server.metric("broadcast_rejected_total{reason=\"invalid\"}").await - rejected_before;
    assert!(rejected >= 300.0 - accepted as f64, "{rejected} rejected");

    // Still alive and well.
    let health = server.client.get(server.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}
