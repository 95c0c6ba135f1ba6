//! The storage log used directly (real sled in a temporary directory): the wake-up
//! interleaving, retention deletes, atomic batches, reopen.

use std::time::Duration;

use anycable_ds::hub::Hub;
use anycable_ds::offset::{Offset, Position};
use anycable_ds::storage::{NewMessage, Retention, Storage, StorageOptions};

fn options(retention: Retention) -> StorageOptions {
    StorageOptions {
        cache_capacity: 8 * 1024 * 1024,
        fsync: true,
        retention,
        read_cache_bytes: 1024 * 1024,
        live_chunk_bytes: 4 * 1024 * 1024,
        max_streams_loaded: 100_000,
        max_queued_bytes: 64 * 1024 * 1024,
        tombstone_ttl: std::time::Duration::from_secs(3600),
    }
}

fn message(stream: &str, json: &str) -> NewMessage {
    NewMessage { stream: stream.into(), json: bytes::Bytes::copy_from_slice(json.as_bytes()) }
}

/// Opens a store that this process just closed. sled releases its directory lock when the
/// last reference to its file goes, and tasks on its I/O thread pool (a log write, a file
/// truncation after a trim) and epoch-deferred drops can hold one for a moment after the `Db`
/// is dropped; sled's own test builds wait for the lock for the same reason. So this waits
/// for the lock (up to 10 s); any other error fails at once.
fn reopen(dir: &std::path::Path, options: StorageOptions) -> Storage {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Storage::open(dir, options.clone(), Hub::default()) {
            Ok(storage) => return storage,
            Err(e) if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("reopen: {e}"),
        }
    }
}

/// Exactly the interleaving a live reader fears: it subscribes, reads nothing, an append lands
/// before it starts waiting, then it waits. The wait must return at once.
#[tokio::test]
async fn an_append_between_read_and_wait_wakes_the_reader() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(dir.path(), options(Retention::default()), Hub::default()).unwrap();
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

/// The writer leaves each new batch of a watched stream in the chunk cache, so live readers
/// answer from memory; what they get is exactly what a read from disk returns.
#[tokio::test]
async fn live_readers_find_the_new_batch_in_memory_exactly_as_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(dir.path(), options(Retention::default()), Hub::default()).unwrap();
    storage.append(vec![message("s", "0")]).unwrap().durable().await.unwrap();
    let before = storage.tail("s").unwrap();
    assert!(storage.read_from_memory("w", Offset::At(before), 4 * 1024 * 1024).is_none(), "unknown stream");

    let _watching = storage.hub().subscribe("s");
    let batch = vec![message("s", r#"{"a":1}"#), message("s", "[2]"), message("s", r#""three""#)];
    storage.append(batch).unwrap().durable().await.unwrap();
    let live = own(storage.read_from_memory("s", Offset::At(before), 4 * 1024 * 1024).expect("in memory").unwrap());
    assert_eq!(&live.body[..], br#"[{"a":1},[2],"three"]"#);

    // Nobody watches stream "u": nothing is prepared for it.
    storage.append(vec![message("u", "1")]).unwrap().durable().await.unwrap();
    let u_start = anycable_ds::offset::Position { epoch: storage.epoch(), seq: 0 };
    assert!(storage.read_from_memory("u", Offset::At(u_start), 4 * 1024 * 1024).is_none());
    storage.close().unwrap();
    drop(storage);

    let reopened = reopen(dir.path(), options(Retention::default()));
    assert_eq!(reopened.read("s", Offset::At(before), 4 * 1024 * 1024).unwrap(), live);
}

/// At the chunk limit's edge, the batch prepared in memory is cut exactly as a read from disk.
#[tokio::test]
async fn a_live_chunk_at_the_byte_limit_matches_the_read_from_disk() {
    for (max_bytes, expected) in [(7, "[12,34]"), (6, "[12]")] {
        let dir = tempfile::tempdir().unwrap();
        let options = StorageOptions { live_chunk_bytes: max_bytes, ..options(Retention::default()) };
        let storage = Storage::open(dir.path(), options, Hub::default()).unwrap();
        storage.append(vec![message("s", "0")]).unwrap().durable().await.unwrap();
        let before = storage.tail("s").unwrap();
        let _watching = storage.hub().subscribe("s");
        storage.append(vec![message("s", "12"), message("s", "34")]).unwrap().durable().await.unwrap();
        if let Some(live) = storage.read_from_memory("s", Offset::At(before), max_bytes) {
            assert_eq!(&own(live.unwrap()).body[..], expected.as_bytes(), "limit {max_bytes}");
        }
        assert_eq!(&storage.read("s", Offset::At(before), max_bytes).unwrap().body[..], expected.as_bytes());
    }
}

#[test]
fn batches_span_streams_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::open(dir.path(), options(Retention::default()), Hub::default()).unwrap();
    let pending = storage.append(vec![message("a", "1"), message("b", "2"), message("a", "3")]).unwrap();
    futures_executor(pending.durable()).unwrap();
    assert_eq!(&storage.read("a", Offset::Start, 1024).unwrap().body[..], b"[1,3]");
    assert_eq!(&storage.read("b", Offset::Start, 1024).unwrap().body[..], b"[2]");
    storage.close().unwrap();
    drop(storage);

    let reopened = reopen(dir.path(), options(Retention::default()));
    assert_eq!(&reopened.read("a", Offset::Start, 1024).unwrap().body[..], b"[1,3]");
    assert_eq!(reopened.tail("a").unwrap().seq, 2);
}

#[test]
fn the_retention_task_deletes_what_reads_already_hide() {
    let dir = tempfile::tempdir().unwrap();
    let retention = Retention { max_messages: 2, max_age: Duration::ZERO };
    let storage = Storage::open(dir.path(), options(retention), Hub::default()).unwrap();
    for n in 1..=5 {
        futures_executor(storage.append(vec![message("s", &n.to_string())]).unwrap().durable()).unwrap();
    }
    assert_eq!(&storage.read("s", Offset::Start, 1024).unwrap().body[..], b"[4,5]");
    // (The background pass may have run first: what counts is what is left on disk.)
    storage.trim_now().unwrap();
    assert_eq!(storage.trim_now().unwrap(), 0, "a second pass finds nothing");
    assert_eq!(&storage.read("s", Offset::Start, 1024).unwrap().body[..], b"[4,5]");
    assert_eq!(storage.tail("s").unwrap().seq, 5, "the stream record outlives trimmed messages");
    storage.close().unwrap();
    drop(storage);
    // Without retention, a read shows everything still on disk: exactly the window.
    let reopened = reopen(dir.path(), options(Retention::default()));
    let chunk = reopened.read("s", Offset::Start, 1024).unwrap();
    assert_eq!((&chunk.body[..], chunk.start.seq, chunk.next.seq), (&b"[4,5]"[..], 3, 5));
}

#[test]
fn sequence_numbers_survive_the_expiry_of_every_message_and_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let retention = Retention { max_messages: 0, max_age: Duration::from_millis(30) };
    let storage = Storage::open(dir.path(), options(retention), Hub::default()).unwrap();
    let batch = (1..=3).map(|n| message("s", &n.to_string())).collect();
    futures_executor(storage.append(batch).unwrap().durable()).unwrap();
    futures_executor(storage.append(vec![message("s", "4")]).unwrap().durable()).unwrap();
    // Age is wall-clock time: wait until the messages are past it.
    std::thread::sleep(Duration::from_millis(40));
    let expired = storage.read("s", Offset::Start, 1024).unwrap();
    assert_eq!((expired.count, expired.next.seq), (0, 4), "an expired stream reads as its tail");
    // Nobody watches it: retention hands it to the writer, which removes it (within a second
    // or two of the background pass). A removed stream reads as an unknown one.
    let removed = anycable_ds::metrics::get().streams_removed.get();
    storage.trim_now().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while anycable_ds::metrics::get().streams_removed.get() == removed {
        assert!(std::time::Instant::now() < deadline, "the expired stream was not removed");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Its tombstone keeps its tail: the offset does not run backwards.
    assert_eq!(storage.tail("s").unwrap().seq, 4);
    // Its last token still reads (nothing after it), one beyond does not, nor one before.
    let before = Offset::At(Position { seq: 2, ..expired.next });
    assert!(storage.read("s", before, 1024).is_err());
    let at_tail = Offset::At(Position { seq: 4, ..expired.next });
    assert_eq!(storage.read("s", at_tail, 1024).unwrap().next.seq, 4);
    let beyond = Offset::At(Position { seq: 5, ..expired.next });
    assert!(storage.read("s", beyond, 1024).is_err());
    storage.close().unwrap();
    drop(storage);

    // Reopened, the stream starts again above every number it handed out.
    let reopened = reopen(dir.path(), options(retention));
    futures_executor(reopened.append(vec![message("s", "5")]).unwrap().durable()).unwrap();
    let chunk = reopened.read("s", Offset::Start, 1024).unwrap();
    assert_eq!((&chunk.body[..], chunk.next.seq), (&b"[5]"[..], 5));
    let chunk = reopened.read("s", at_tail, 1024).unwrap();
    assert_eq!(&chunk.body[..], b"[5]", "a reader at the old tail gets the first new message");
}

#[test]
fn a_data_directory_in_use_or_unwritable_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let first = Storage::open(dir.path(), options(Retention::default()), Hub::default()).unwrap();
    let second = Storage::open(dir.path(), options(Retention::default()), Hub::default());
    let error = second.err().expect("second open of the same directory fails").to_string();
    assert!(error.contains(&dir.path().display().to_string()), "{error}");
    drop(first);
}

/// Runs a future to completion on a throwaway runtime (the tests above are sync on purpose).
fn futures_executor<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(future)
}

/// Reads `stream` from `offset` to the tail, chunk by chunk; every chunk checked for size.
fn read_all(storage: &Storage, stream: &str, mut offset: Offset, max_bytes: usize) -> Result<Vec<String>, String> {
    let mut messages = Vec::new();
    loop {
        let chunk = storage.read(stream, offset, max_bytes).map_err(|e| e.to_string())?;
        let values: Vec<serde_json::Value> = serde_json::from_slice(&chunk.body).expect("a chunk is a JSON array");
        assert_eq!(values.len(), chunk.count);
        assert!(chunk.count <= 1 || chunk.body.len() <= max_bytes, "chunk over {max_bytes} bytes");
        assert_eq!(chunk.next.seq - chunk.start.seq, chunk.count as u64, "chunk positions");
        messages.extend(values.into_iter().map(|v| v.as_str().unwrap().to_string()));
        if chunk.up_to_date {
            return Ok(messages);
        }
        assert!(chunk.count > 0, "a chunk short of the tail holds a message");
        offset = Offset::At(chunk.next);
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

    /// Messages written in batches of any size (records of one or many messages, cut at 64 KiB)
    /// read back exactly, in order, from any offset and with any chunk size, with and without
    /// a count limit, before and after the retention pass.
    #[test]
    fn records_read_back_exactly_from_any_offset(
        batches in proptest::collection::vec(proptest::collection::vec(0usize..3000, 1..60), 1..12),
        max_bytes in 1usize..9000,
        limit in 0u64..80,
        offsets in proptest::collection::vec(0u64..700, 4),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention { max_messages: limit, max_age: Duration::ZERO };
        // Live readers read with `max_bytes` and watch the stream, so the writer prepares the
        // chunk of each batch in memory: the reads below meet those too.
        let options = StorageOptions { live_chunk_bytes: max_bytes, ..options(retention) };
        let storage = Storage::open(dir.path(), options.clone(), Hub::default()).unwrap();
        let _watching = storage.hub().subscribe("s");
        let mut written = Vec::new();
        for batch in &batches {
            let messages = batch.iter().map(|&pad| {
                let text = format!("{}:{}", written.len() + 1, "x".repeat(pad));
                written.push(text.clone());
                message("s", &serde_json::Value::String(text).to_string())
            });
            futures_executor(storage.append(messages.collect()).unwrap().durable()).unwrap();
        }
        let tail = written.len() as u64;
        let first_kept = if limit == 0 { 1 } else { tail.saturating_sub(limit) + 1 };
        let epoch = storage.epoch();
        let mut storage = Some(storage);
        for pass in ["before trim", "after trim and reopen"] {
            let store = storage.take().unwrap_or_else(|| reopen(dir.path(), options.clone()));
            let all = read_all(&store, "s", Offset::Start, max_bytes).unwrap();
            proptest::prop_assert_eq!(&all[..], &written[first_kept as usize - 1..], "{}", pass);
            for &at in &offsets {
                let at = at.min(tail);
                let result = read_all(&store, "s", Offset::At(anycable_ds::offset::Position { epoch, seq: at }), max_bytes);
                if at + 1 < first_kept {
                    proptest::prop_assert!(result.is_err(), "offset {} before the window", at);
                } else {
                    proptest::prop_assert_eq!(&result.unwrap()[..], &written[at as usize..], "from {} {}", at, pass);
                }
            }
            // The reads above are cached: the second pass reads what the trim left on disk.
            store.trim_now().unwrap();
            store.close().unwrap();
        }
    }
}

/// A read of a stream that is no fork: its own chunk.
fn own(level: anycable_ds::forks::Level) -> anycable_ds::storage::Chunk {
    match level {
        anycable_ds::forks::Level::Chunk(chunk) => chunk,
        other => panic!("not a fork: {other:?}"),
    }
}
