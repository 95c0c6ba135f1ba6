//! Request bodies that never finish arriving (issue 23): a deadline for each
//! (`server.body_timeout`) and one budget for all of them (`server.max_body_bytes_in_flight`).
//! Without them, 300 connections that each sent 1 MB of a 1 MiB broadcast and stalled held
//! 350 MB of the server's memory for as long as they stayed open.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{temp_dir, Server, KEY};
use serde_json::Value;

/// Opens a connection and sends a broadcast's headers (declaring `declared` bytes, or chunked
/// when `None`) and the first `sent` bytes of its body, then nothing more.
fn stalled_broadcast(server: &Server, declared: Option<usize>, sent: usize) -> TcpStream {
    let addr = server.url("/").trim_start_matches("http://").trim_end_matches('/').to_string();
    let mut socket = TcpStream::connect(addr).unwrap();
    let length = match declared {
        Some(len) => format!("Content-Length: {len}\r\n"),
        None => "Transfer-Encoding: chunked\r\n".to_string(),
    };
    let head = format!(
        "POST /_broadcast HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\n{length}\r\n"
    );
    let mut body = vec![b' '; sent];
    if declared.is_none() {
        let mut chunked = format!("{sent:x}\r\n").into_bytes();
        chunked.append(&mut body);
        chunked.extend_from_slice(b"\r\n");
        body = chunked;
    }
    // The server may refuse at once and close: a write error then is part of the answer.
    let _ = socket.write_all(head.as_bytes()).and_then(|()| socket.write_all(&body));
    socket
}

/// What the server answered on `socket` (status and body), once it closed the connection.
fn answer_then_close(mut socket: TcpStream, limit: Duration) -> (u16, Value) {
    socket.set_read_timeout(Some(limit)).unwrap();
    let mut raw = Vec::new();
    // Until EOF: the server must close the connection after such an answer.
    if let Err(e) = socket.read_to_end(&mut raw) {
        // A reset after the answer (unread request bytes) is a close too, once it is there.
        assert!(
            e.kind() == std::io::ErrorKind::ConnectionReset && !raw.is_empty(),
            "no answer and close within {limit:?}: {e} (got {:?})",
            String::from_utf8_lossy(&raw)
        );
    }
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not HTTP: {text:?}"));
    let lower = text.to_ascii_lowercase();
    assert!(lower.contains("content-type: application/json"), "{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    (status, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_broadcast_bodies_hold_bounded_memory() {
    let dir = temp_dir();
    // The defaults a user gets: 1 MiB broadcasts, a 64 MiB budget, a 30 s deadline. The bound:
    // the budget, and as much again for 300 connections' own buffers (before: +330 MiB).
    let server = Server::start(dir.path(), &[]);
    let before = server.rss();
    let sockets: Vec<TcpStream> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..10)
            .map(|_| {
                scope
                    .spawn(|| (0..30).map(|_| stalled_broadcast(&server, Some(1 << 20), 1_000_000)).collect::<Vec<_>>())
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect::<Vec<_>>()
    });
    assert_eq!(sockets.len(), 300);
    // Each body takes its declared 1 MiB: 64 fit in the budget, the other 236 are refused
    // before a byte of them is read.
    server.wait_for_metric("http_body_bytes", (64 << 20) as f64, Duration::from_secs(20)).await;
    server.wait_for_metric("http_body_refused_total", 236.0, Duration::from_secs(20)).await;
    let grown = server.rss().saturating_sub(before);
    eprintln!("RSS {} MiB -> {} MiB", before >> 20, (before + grown) >> 20);
    assert!(grown < 128 << 20, "RSS grew by {} MiB with 300 stalled 1 MiB bodies", grown >> 20);

    // A broadcast now does not fit either: 503, JSON, retry later.
    let (status, body) = server.broadcast(r#"{"stream":"s","data":"1"}"#).await;
    assert_eq!((status, body["error"].as_str().unwrap_or_default().contains("max_body_bytes_in_flight")), (503, true));
    drop(sockets);
    // Clients gone: their shares come back and broadcasts are stored again.
    server.wait_for_metric("http_body_bytes", 0.0, Duration::from_secs(20)).await;
    assert_eq!(server.broadcast(r#"{"stream":"s","data":"2"}"#).await.0, 201);
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_408_and_its_connection_closed() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--body_timeout", "2"]);
    for declared in [Some(1000), None] {
        let started = Instant::now();
        let socket = stalled_broadcast(&server, declared, 10);
        let (status, body) = answer_then_close(socket, Duration::from_secs(10));
        let took = started.elapsed();
        assert_eq!(status, 408, "{declared:?}: {body}");
        assert!(body["error"].as_str().unwrap().contains("server.body_timeout"), "{body}");
        assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(6), "{declared:?}: after {took:?}");
    }
    assert_eq!(server.metric("http_body_timeout_total").await, 2.0);
    assert_eq!(server.metric("http_body_bytes").await, 0.0);
    // Nothing of either was stored, and a body that arrives in time is.
    let (messages, _, _) = server.read("s", "-1").await;
    assert!(messages.is_empty());
    assert_eq!(server.broadcast(r#"{"stream":"s","data":"1"}"#).await.0, 201);
}

#[tokio::test]
async fn a_body_over_the_budget_is_refused_before_it_is_read() {
    let dir = temp_dir();
    // The smallest budget: one 1 MiB broadcast (the largest allowed) fills it.
    let args = ["--max_body_bytes_in_flight", "1048576", "--ds_max_append_bytes", "1048576"];
    let server = Server::start(dir.path(), &args);
    let holder = stalled_broadcast(&server, Some(1 << 20), 100);
    server.wait_for_metric("http_body_bytes", (1 << 20) as f64, Duration::from_secs(10)).await;
    // Declared: refused before a byte is read. Chunked: refused at its first piece.
    for declared in [Some(100), None] {
        let socket = stalled_broadcast(&server, declared, 10);
        let (status, body) = answer_then_close(socket, Duration::from_secs(10));
        assert_eq!(status, 503, "{declared:?}: {body}");
        assert!(body["error"].as_str().unwrap().contains("max_body_bytes_in_flight"), "{body}");
    }
    assert_eq!(server.metric("http_body_refused_total").await, 2.0);
    assert_eq!(server.metric("http_body_capacity_bytes").await, 1048576.0);
    drop(holder);
    server.wait_for_metric("http_body_bytes", 0.0, Duration::from_secs(10)).await;
    assert_eq!(server.broadcast(r#"{"stream":"s","data":"1"}"#).await.0, 201);
}

#[test]
fn a_budget_smaller_than_one_broadcast_stops_start_up() {
    let dir = temp_dir();
    let output = Server::command(dir.path())
        .args(["--max_body_bytes_in_flight", "1048576", "--http_broadcast_max_body", "4194304", "--print-config"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("server.max_body_bytes_in_flight") && stderr.contains("http_broadcast.max_body"),
        "{stderr}"
    );
}
