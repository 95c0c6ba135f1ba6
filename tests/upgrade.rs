//! Data directories written by earlier storage layouts are upgraded at start-up without losing
//! a message. The fixtures under `tests/fixtures/layoutN/` were written by the last server of
//! layout N; see the READMEs there. Both hold the same history.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{header, temp_dir, Server};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::Value;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Reads `stream` after `offset`: (status, exact body, Stream-Next-Offset).
async fn read_raw(server: &Server, stream: &str, offset: &str) -> (u16, String, String) {
    let path = format!("{}?offset={offset}", utf8_percent_encode(stream, NON_ALPHANUMERIC));
    let response = server.get(&path).await;
    let next = header(&response, "stream-next-offset").unwrap_or_default();
    (response.status().as_u16(), response.text().await.unwrap(), next)
}

/// Every stream of the fixture reads back byte for byte, from the start and from a saved offset.
async fn assert_fixture_history(server: &Server, expected: &Value) {
    for (stream, want) in expected.as_object().unwrap() {
        let (status, body, next) = read_raw(server, stream, "-1").await;
        assert_eq!(status, 200, "{stream}");
        assert_eq!(body, want["body"].as_str().unwrap(), "{stream}: history differs");
        assert_eq!(next, want["next_offset"].as_str().unwrap(), "{stream}: tail token differs");
        if let Some(saved) = want.get("after_100") {
            let (status, body, _) = read_raw(server, stream, saved["offset"].as_str().unwrap()).await;
            assert_eq!(status, 200);
            assert_eq!(body, saved["body"].as_str().unwrap(), "{stream}: resuming a saved offset differs");
        }
    }
}

#[tokio::test]
async fn a_layout_1_store_is_upgraded_at_start_up_without_losing_a_message() {
    let logs = upgrade_fixture("layout1").await;
    assert!(logs.contains("upgrading storage layout 1 -> 2"), "{logs}");
    assert!(logs.contains("done: 223 messages converted"), "{logs}");
    assert!(logs.contains("upgrading storage layout 2 -> 3"), "{logs}");
    assert!(logs.contains("upgrading storage layout 3 -> 4"), "{logs}");
}

#[tokio::test]
async fn a_layout_3_store_is_upgraded_at_start_up_without_losing_a_message() {
    let logs = upgrade_fixture("layout3").await;
    assert!(!logs.contains("upgrading storage layout 2 -> 3"), "{logs}");
    assert!(logs.contains("upgrading storage layout 3 -> 4"), "{logs}");
}

#[tokio::test]
async fn a_layout_2_store_is_upgraded_at_start_up_without_losing_a_message() {
    let logs = upgrade_fixture("layout2").await;
    assert!(!logs.contains("upgrading storage layout 1 -> 2"), "{logs}");
    assert!(logs.contains("upgrading storage layout 2 -> 3"), "{logs}");
}

/// Starts today's server on a copy of `tests/fixtures/{name}`, checks that it serves the
/// fixture's history exactly, continues its sequence numbers and upgrades only once; returns
/// the log of the first start.
async fn upgrade_fixture(name: &str) -> String {
    let fixture = Path::new(FIXTURES).join(name);
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("expected.json")).unwrap()).unwrap();
    let dir = temp_dir();
    let data = dir.path().join("data");
    copy_dir(&fixture.join("store"), &data);

    // Retention off: the fixtures keep more than 100 messages per stream, written long ago.
    let args = ["--data_dir", data.to_str().unwrap(), "--history_limit", "0", "--history_ttl", "0"];
    let mut server = Server::start(dir.path(), &args);
    server.wait_for_log(&format!("storage layout {})", anycable_ds::storage::CURRENT_LAYOUT), Duration::from_secs(5));
    let first_logs = server.logs();
    assert_fixture_history(&server, &expected).await;

    // Appends continue the old sequence: the next message follows the last upgraded one.
    let chat = &expected["chat/1"];
    let old_tail = chat["next_offset"].as_str().unwrap();
    server.publish("chat/1", [serde_json::json!({"n": 171})]).await;
    let (status, body, next) = read_raw(&server, "chat/1", old_tail).await;
    assert_eq!((status, body.as_str()), (200, r#"[{"n":171}]"#));
    assert_eq!(&next[..11], &old_tail[..11], "same epoch");
    assert!(next.ends_with("00000000000000000171"), "{next}");

    // A second start finds the current layout and upgrades nothing; everything is still there.
    assert!(server.terminate(Duration::from_secs(10)).success());
    server.restart();
    // (The harness keeps the log of both runs; an upgrade would print before "Listening on".)
    let logs = server.logs();
    let upgrades = first_logs.matches("upgrading storage layout").count();
    assert!(upgrades > 0, "{first_logs}");
    assert_eq!(logs.matches("upgrading storage layout").count(), upgrades, "{logs}");
    let (_, body, _) = read_raw(&server, "chat/1", old_tail).await;
    assert_eq!(body, r#"[{"n":171}]"#);
    let mut unchanged = expected.clone();
    unchanged.as_object_mut().unwrap().remove("chat/1");
    assert_fixture_history(&server, &unchanged).await;
    first_logs
}
