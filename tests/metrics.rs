//! /metrics: Prometheus text format with the documented names, checked by `promtool` when
//! it is installed (scripts/test installs it where it can).

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{numbered, temp_dir, Server, SseClient};

#[tokio::test]
async fn metrics_have_the_documented_names_and_pass_promtool() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--ds_poll_interval", "1"]);
    server.publish("m", numbered(1..=3)).await;
    let _ = server.get("m?offset=-1").await;
    let _ = server.get("m?offset=now&live=long-poll").await;
    let _ = server.get("m?offset=garbage").await;
    let _ = server.broadcast("[]").await;
    let mut sse = SseClient::open(&server, "m?offset=-1&live=sse").await;
    assert!(sse.next_batch(Duration::from_secs(5)).await.is_some());

    let response = server.client.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = response.text().await.unwrap();
    for name in [
        "ds_requests_total{mode=\"catchup\",status=\"200\"}",
        "ds_requests_total{mode=\"catchup\",status=\"400\"}",
        "ds_requests_total{mode=\"poll\",status=\"204\"}",
        "ds_poll_requests_total",
        "ds_sse_requests_total",
        "ds_sse_frames_shared_total",
        "ds_poll_clients_num",
        "ds_sse_clients_num 1",
        "broadcast_msg_total 3",
        "ds_messages_stored_total 3",
        "broadcast_rejected_total{reason=\"invalid\"} 1",
        "ds_append_seconds_bucket",
        "ds_flush_seconds_bucket",
        "ds_storage_bytes",
        "ds_streams_loaded",
        "ds_streams_num 1",
        "ds_hub_streams 1",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }

    // A check that cannot run fails: scripts/test installs promtool (Debian `prometheus`).
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package `prometheus`, installed by scripts/test) checks the format");
    promtool.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let output = promtool.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
