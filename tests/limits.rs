//! Resource bounds and storage failures: live-reader cap, unusable data directories, a full
//! disk.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{numbered, temp_dir, Server, KEY};
use serde_json::Value;

#[tokio::test]
async fn live_readers_beyond_the_cap_get_503() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--ds_max_live_readers", "2", "--ds_poll_interval", "30"]);
    let first = tokio::spawn(server.client.get(server.ds("a?offset=now&live=long-poll")).send());
    let second = tokio::spawn(server.client.get(server.ds("b?offset=now&live=long-poll")).send());
    server.wait_for_metric("ds_poll_clients_num", 2.0, Duration::from_secs(10)).await;
    for query in ["c?offset=now&live=long-poll", "c?offset=-1&live=sse"] {
        let refused = server.get(query).await;
        assert_eq!(refused.status(), 503, "{query}");
        let body: Value = refused.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("too many live readers"));
    }
    // Catch-up reads are not live readers.
    assert_eq!(server.get("c?offset=-1").await.status(), 200);
    // One finishes; its slot is free again.
    server.publish("a", numbered(1..=1)).await;
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    let third = tokio::spawn(server.client.get(server.ds("c?offset=now&live=long-poll")).send());
    server.wait_for_metric("ds_poll_clients_num", 2.0, Duration::from_secs(10)).await;
    server.publish("b", numbered(1..=1)).await;
    server.publish("c", numbered(1..=1)).await;
    assert_eq!(second.await.unwrap().unwrap().status(), 200);
    assert_eq!(third.await.unwrap().unwrap().status(), 200);
}

#[test]
fn a_data_directory_that_is_a_file_stops_start_up_with_a_clear_message() {
    let dir = temp_dir();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").unwrap();
    let output = Server::command(dir.path()).args(["--port", "0", "--data_dir"]).arg(&file).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot open data directory") && stderr.contains("not-a-dir"), "{stderr}");
}

/// A small tmpfs mounted inside `dir`, unmounted on drop. Mounting needs root (as on CI):
/// where it is not allowed, the test fails rather than pass without having run.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, options: &str) -> Tmpfs {
        let point = dir.join("mnt");
        std::fs::create_dir_all(&point).unwrap();
        let status = Command::new("mount").args(["-t", "tmpfs", "-o", options, "tmpfs"]).arg(&point).status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "cannot mount a tmpfs here (needs root): this test cannot run, so it fails"
        );
        Tmpfs(point)
    }

    fn remount(&self, options: &str) {
        let status = Command::new("mount").args(["-o", &format!("remount,{options}")]).arg(&self.0).status().unwrap();
        assert!(status.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_read_only_data_directory_stops_start_up_with_a_clear_message() {
    let dir = temp_dir();
    let mount = Tmpfs::mount(dir.path(), "size=4m,ro");
    let data = mount.0.join("data");
    let output = Server::command(dir.path()).args(["--port", "0", "--data_dir"]).arg(&data).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot open data directory") && stderr.contains("Read-only"), "{stderr}");
}

#[tokio::test]
async fn a_full_disk_answers_503_acknowledges_nothing_more_and_loses_nothing() {
    let dir = temp_dir();
    let mount = Tmpfs::mount(dir.path(), "size=3m");
    let data = mount.0.join("data").to_string_lossy().into_owned();
    // Fills the disk with more messages than the default count limit keeps, all checked after.
    let mut server = Server::start(dir.path(), &["--data_dir", &data, "--history_limit", "0"]);
    let pad = "x".repeat(3000);
    let mut acknowledged = 0u64;
    let mut refused = None;
    for n in 1..=5000u64 {
        let body = serde_json::json!({"stream": "s", "data": {"n": n, "pad": pad}}).to_string();
        let response = server.client.post(server.url("/_broadcast")).bearer_auth(KEY).body(body).send().await.unwrap();
        match response.status().as_u16() {
            201 => acknowledged = n,
            503 => {
                refused = Some(response.json::<Value>().await.unwrap());
                break;
            }
            other => panic!("status {other}"),
        }
    }
    let refused = refused.expect("the disk filled up");
    assert_eq!(refused["error"], "storage unavailable");
    let health = server.client.get(server.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 503, "health reports the failed storage");
    // Every acknowledged message is still readable.
    let (messages, _, _) = server.read("s", "-1").await;
    assert_eq!(messages.len() as u64, acknowledged);

    // Space comes back: the server notices by itself and takes broadcasts again, no restart.
    mount.remount("size=16m");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while server.client.get(server.url("/health")).send().await.unwrap().status() != 200 {
        assert!(std::time::Instant::now() < deadline, "storage did not recover:\n{}", server.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = serde_json::json!({"stream": "s", "data": "\"recovered\""}).to_string();
    assert_eq!(server.broadcast(&body).await.0, 201, "writable again without a restart");
    let (messages, _, _) = server.read("s", "-1").await;
    assert_eq!(messages.last(), Some(&serde_json::json!("recovered")));

    // And everything acknowledged survives a crash too.
    server.kill();
    server.restart();
    let (messages, _, _) = server.read("s", "-1").await;
    let ns: Vec<u64> = messages.iter().filter_map(|m| m["n"].as_u64()).collect();
    assert!(ns.len() as u64 >= acknowledged, "no acknowledged message lost");
    assert_eq!(ns[..acknowledged as usize], (1..=acknowledged).collect::<Vec<_>>()[..]);
    assert_eq!(messages.last(), Some(&serde_json::json!("recovered")));
    let body = serde_json::json!({"stream": "s", "data": "\"after\""}).to_string();
    assert_eq!(server.broadcast(&body).await.0, 201, "writable after the restart");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_writer_queue_answers_503_and_stores_nothing_of_a_refused_batch() {
    let dir = temp_dir();
    // A budget of one byte: a broadcast is taken only while nothing else waits for the writer.
    let server = Server::start(dir.path(), &["--storage_max_queued_bytes", "1", "--history_limit", "0"]);
    let mut requests = Vec::new();
    for i in 0..64 {
        let body = serde_json::json!([{"stream": "a", "data": i.to_string()}, {"stream": "b", "data": i.to_string()}]);
        let request = server.client.post(server.url("/_broadcast")).bearer_auth(KEY).body(body.to_string());
        requests.push(tokio::spawn(request.send()));
    }
    let (mut accepted, mut refused) = (Vec::new(), 0);
    for (i, request) in requests.into_iter().enumerate() {
        let response = request.await.unwrap().unwrap();
        match response.status().as_u16() {
            201 => accepted.push(i as u64),
            503 => {
                assert_eq!(response.headers().get("retry-after").unwrap(), "1");
                let body: Value = response.json().await.unwrap();
                assert!(body["error"].as_str().unwrap().contains("retry later"), "{body}");
                refused += 1;
            }
            other => panic!("status {other}"),
        }
    }
    assert!(refused > 0 && !accepted.is_empty(), "{} accepted, {refused} refused", accepted.len());
    assert_eq!(server.metric("ds_writer_queue_refused_total").await, refused as f64);
    // Both streams hold exactly the accepted broadcasts: nothing of a refused one.
    for stream in ["a", "b"] {
        let (messages, _, _) = server.read(stream, "-1").await;
        let mut got: Vec<u64> = messages.iter().map(|m| m.as_u64().unwrap()).collect();
        got.sort_unstable();
        assert_eq!(got, accepted, "stream {stream}");
    }
    assert_eq!(server.metric("ds_writer_queue_bytes").await, 0.0);
}

#[tokio::test]
async fn reads_beyond_the_unsent_budget_get_503_until_the_stuck_client_is_gone() {
    let dir = temp_dir();
    // A budget of one 4 MiB chunk, the chunk cache off (each read is its own buffer). A chunk
    // this big does not fit in the kernel's buffers, so the stuck read keeps holding it.
    let args = ["--ds_max_unsent_bytes", "4194304", "--write_timeout", "2"];
    let args = [&args[..], &["--history_limit", "0", "--storage_read_cache_bytes", "0"]].concat();
    let server = Server::start(dir.path(), &args);
    let pad = "x".repeat(1000);
    let batch: Vec<Value> = (0..900)
        .map(|i| serde_json::json!({"stream": "big", "data": serde_json::json!({"i": i, "pad": pad})}))
        .collect();
    for _ in 0..10 {
        let (status, reply) = server.broadcast(&serde_json::to_string(&batch).unwrap()).await;
        assert_eq!(status, 201, "{reply}");
    }
    let tail = server.tail("big").await;
    let at = |seq: u64| format!("big?offset={}", common::token_at(&tail, seq));
    // A client that asks for the first chunk and never reads it.
    let stuck = common::stuck_client(&server, "GET /ds/big?offset=-1 HTTP/1.1\r\nHost: test\r\n\r\n");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server.metric("ds_unsent_bytes").await < 4_000_000.0 {
        assert!(std::time::Instant::now() < deadline, "the stuck read holds no chunk");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Another distinct chunk would take the budget over: 503 with Retry-After.
    let refused = server.get(&at(5000)).await;
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers().get("retry-after").unwrap(), "1");
    assert_eq!(server.metric("ds_unsent_refused_total").await, 1.0);
    // Small bodies are not counted: a read that fits the socket at once still goes out.
    assert_eq!(server.get(&at(8999)).await.status(), 200);
    // Once the watchdog resets the stuck client, the budget is free again.
    server.wait_for_metric("ds_unsent_bytes", 0.0, Duration::from_secs(20)).await;
    assert_eq!(server.get(&at(5000)).await.status(), 200);
    drop(stuck);
}
