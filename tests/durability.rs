//! History survives restarts (graceful and SIGKILL); retention; epochs.

mod common;

use std::time::Duration;

use common::{numbered, temp_dir, Server};

#[tokio::test]
async fn graceful_restart_keeps_history_and_tokens() {
    let dir = temp_dir();
    let mut server = Server::start(dir.path(), &[]);
    server.publish("s", numbered(1..=5)).await;
    let (_, token_after_5, _) = server.read("s", "-1").await;
    let status = server.terminate(Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");

    server.restart();
    server.publish("s", numbered(6..=7)).await;
    let (messages, _, _) = server.read("s", &token_after_5).await;
    assert_eq!(messages, numbered(6..=7), "old token resumes exactly after its message");
    let (all, _, _) = server.read("s", "-1").await;
    assert_eq!(all, numbered(1..=7), "sequence continues");
}

#[tokio::test]
async fn sigkill_loses_no_acknowledged_message() {
    let dir = temp_dir();
    let mut server = Server::start(dir.path(), &[]);
    let start = server.tail("s").await;
    // Batches and single messages, each acknowledged with 201 before the kill.
    server.publish("s", numbered(1..=3)).await;
    let batch: Vec<_> =
        (4..=10).map(|n| serde_json::json!({"stream": "s", "data": format!("{{\"n\":{n}}}")})).collect();
    assert_eq!(server.broadcast(&serde_json::Value::Array(batch).to_string()).await.0, 201);
    let (_, token_after_10, _) = server.read("s", &start).await;
    server.kill();

    server.restart();
    let (messages, next, _) = server.read("s", &start).await;
    assert_eq!(messages, numbered(1..=10));
    assert_eq!(next, token_after_10);
    server.publish("s", numbered(11..=11)).await;
    let (messages, _, _) = server.read("s", &token_after_10).await;
    assert_eq!(messages, numbered(11..=11), "no sequence number reused after the crash");
}

#[tokio::test]
async fn retention_by_count() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--history_limit", "3"]);
    let start = server.tail("s").await;
    let mut tokens = vec![start];
    for n in 1..=5 {
        server.publish("s", numbered(n..=n)).await;
        tokens.push(server.tail("s").await);
    }
    // Messages 3, 4, 5 are retained.
    let (messages, _, _) = server.read("s", "-1").await;
    assert_eq!(messages, numbered(3..=5), "trimmed history is never returned");
    // Token after 2 = oldest retained (3) minus one: not a gap.
    let (messages, _, _) = server.read("s", &tokens[2]).await;
    assert_eq!(messages, numbered(3..=5));
    // Tokens after 0 and 1 point into trimmed history.
    for token in &tokens[..2] {
        let response = server.get(&format!("s?offset={token}")).await;
        assert_eq!(response.status(), 410, "{token}");
    }
    // The background task really deletes them too; reads stay the same after it ran.
    server.publish("s", numbered(6..=6)).await;
    let (messages, _, _) = server.read("s", "-1").await;
    assert_eq!(messages, numbered(4..=6));
}

#[tokio::test]
async fn retention_by_age() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--history_ttl", "1"]);
    let start = server.tail("s").await;
    server.publish("s", numbered(1..=2)).await;
    let token_after_2 = server.tail("s").await;
    // Age-based retention is about wall-clock time: let message 1 and 2 age past one second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    server.publish("s", numbered(3..=3)).await;
    let (messages, _, _) = server.read("s", "-1").await;
    assert_eq!(messages, numbered(3..=3));
    assert_eq!(server.get(&format!("s?offset={start}")).await.status(), 410);
    let (messages, _, _) = server.read("s", &token_after_2).await;
    assert_eq!(messages, numbered(3..=3), "the token just before the oldest retained message is not a gap");
    // Everything expires: the stream reads empty at its tail, and numbering goes on.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let tail = server.tail("s").await;
    let (messages, next, up_to_date) = server.read("s", "-1").await;
    assert!(messages.is_empty() && up_to_date);
    assert_eq!(next, tail);
    server.publish("s", numbered(4..=4)).await;
    let (messages, _, _) = server.read("s", &tail).await;
    assert_eq!(messages, numbered(4..=4));
}

#[tokio::test]
async fn token_from_another_data_directory_is_gone() {
    let (dir_a, dir_b) = (temp_dir(), temp_dir());
    let a = Server::start(dir_a.path(), &[]);
    let b = Server::start(dir_b.path(), &[]);
    a.publish("s", numbered(1..=2)).await;
    b.publish("s", numbered(1..=2)).await;
    let token_a = a.tail("s").await;
    let token_b = b.tail("s").await;
    assert_ne!(token_a, token_b, "each data directory has its own epoch");
    assert_eq!(b.get(&format!("s?offset={token_a}")).await.status(), 410);
    assert_eq!(a.get(&format!("s?offset={token_b}")).await.status(), 410);
}

#[tokio::test]
async fn a_store_from_a_newer_layout_is_refused_with_a_clear_message() {
    let dir = temp_dir();
    let mut server = Server::start(dir.path(), &[]);
    server.publish("s", numbered(1..=1)).await;
    assert!(server.terminate(Duration::from_secs(10)).success());
    {
        let db = sled::open(&server.data_dir).unwrap();
        db.insert("Mlayout", &99u32.to_be_bytes()[..]).unwrap();
        db.flush().unwrap();
    }
    let output =
        Server::command(dir.path()).args(["--port", "0", "--data_dir"]).arg(&server.data_dir).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("layout 99") && stderr.contains("newer anycable-ds"), "{stderr}");
}
