//! The storage log used directly (real sled in a temporary directory): the wake-up
//! interleaving, retention deletes, atomic batches, reopen.

use std::time::Duration;

use anycable_ds::hub::Hub;
use anycable_ds::offset::Offset;
use anycable_ds::storage::{NewMessage, Retention, Storage, StorageOptions};

fn options(retention: Retention) -> StorageOptions {
    StorageOptions { cache_capacity: 8 * 1024 * 1024, fsync: true, retention, read_cache_bytes: 1024 * 1024 }
}

fn message(stream: &str, json: &str) -> NewMessage {
    NewMessage { stream: stream.into(), json: bytes::Bytes::copy_from_slice(json.as_bytes()) }
}

/// Exactly the interleaving a live reader fears: it subscribes, reads nothing, an append lands
/// before it starts waiting, then it waits. The wait must return at once.
#[tokio::test]
async fn an_append_between_read_and_wait_wakes_the_reader() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(dir.path(), options(Retention::default()), Hub::new()).unwrap();
    let mut subscription = storage.hub().subscribe("s");
    let chunk = storage.read("s", Offset::Start, 1024).unwrap();
    assert_eq!(chunk.count, 0);

    let appender = storage.clone();
    tokio::task::spawn_blocking(move || appender.append(vec![message("s", "1")]))
        .await
        .unwrap()
        .unwrap()
        .durable()
        .await
        .unwrap();

    tokio::time::timeout(Duration::from_secs(1), subscription.changed()).await.expect("woken");
    let chunk = storage.read("s", Offset::At(chunk.next), 1024).unwrap();
    assert_eq!(&chunk.body[..], b"[1]");
    storage.close().unwrap();
}

#[test]
fn batches_span_streams_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(dir.path(), options(Retention::default()), Hub::new()).unwrap();
    let pending = storage.append(vec![message("a", "1"), message("b", "2"), message("a", "3")]).unwrap();
    futures_executor(pending.durable()).unwrap();
    assert_eq!(&storage.read("a", Offset::Start, 1024).unwrap().body[..], b"[1,3]");
    assert_eq!(&storage.read("b", Offset::Start, 1024).unwrap().body[..], b"[2]");
    storage.close().unwrap();
    drop(storage);

    let reopened = Storage::open(dir.path(), options(Retention::default()), Hub::new()).unwrap();
    assert_eq!(&reopened.read("a", Offset::Start, 1024).unwrap().body[..], b"[1,3]");
    assert_eq!(reopened.tail("a").unwrap().seq, 2);
}

#[test]
fn the_retention_task_deletes_what_reads_already_hide() {
    let dir = tempfile::tempdir().unwrap();
    let retention = Retention { max_messages: 2, max_age: Duration::ZERO };
    let storage = Storage::open(dir.path(), options(retention), Hub::new()).unwrap();
    for n in 1..=5 {
        futures_executor(storage.append(vec![message("s", &n.to_string())]).unwrap().durable()).unwrap();
    }
    assert_eq!(&storage.read("s", Offset::Start, 1024).unwrap().body[..], b"[4,5]");
    // The background pass may already have run; together they removed exactly 3 messages.
    let removed_now = storage.trim_now().unwrap();
    assert!(removed_now <= 3);
    assert_eq!(storage.trim_now().unwrap(), 0, "a second pass finds nothing");
    assert_eq!(&storage.read("s", Offset::Start, 1024).unwrap().body[..], b"[4,5]");
    assert_eq!(storage.tail("s").unwrap().seq, 5, "the stream record outlives trimmed messages");
}

#[test]
fn a_data_directory_in_use_or_unwritable_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let first = Storage::open(dir.path(), options(Retention::default()), Hub::new()).unwrap();
    let second = Storage::open(dir.path(), options(Retention::default()), Hub::new());
    let error = second.err().expect("second open of the same directory fails").to_string();
    assert!(error.contains(&dir.path().display().to_string()), "{error}");
    drop(first);
}

/// Runs a future to completion on a throwaway runtime (the tests above are sync on purpose).
fn futures_executor<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(future)
}
