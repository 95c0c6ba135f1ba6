//! The durable per-stream message log, on sled. Knows nothing about HTTP.
//!
//! # Ordering and durability
//!
//! Appends take one writer lock, allocate sequence numbers, and apply a single `sled::Batch`
//! (atomic: a broadcast batch is stored whole or not at all). The messages are then written but
//! not yet durable, so readers must not see them: a reader that saw message 11 before a crash
//! would hold a token for a number that the restarted server hands out again. Each stream
//! therefore has two tails:
//!
//! * `allocated`: the last sequence number written to sled (changed only under the writer lock);
//! * `visible`: the last one that is durable; readers never read past it.
//!
//! The commit thread (see [`commit`]) flushes sled once for every group of waiting appends, then
//! raises `visible` and wakes the hub. Because all numbers up to a stream's `allocated` were
//! applied before that flush began, raising `visible` to the highest flushed number never
//! exposes a gap (the visibility race of PITFALLS.md cannot happen).
//!
//! # Stream cache
//!
//! Stream entries are loaded lazily (a restart reads no history) and are never evicted while
//! the process runs: a writer inserts the entry *before* applying its batch, so a concurrent
//! reader that loads the stream from sled always ends up sharing the writer's entry and never
//! publishes a tail that is not durable yet.

pub mod commit;
mod keys;
mod migrate;
mod retention;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::hub::Hub;
use crate::offset::{Epoch, Offset, Position};
use keys::StreamRecord;

pub use migrate::CURRENT_LAYOUT;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    #[error("cannot open data directory {path}: {message}")]
    Open { path: String, message: String },
    #[error("storage error: {0}")]
    Sled(String),
    #[error("flush to disk failed: {0}")]
    Flush(String),
    #[error("storage is shutting down")]
    Closed,
}

impl From<sled::Error> for StorageError {
    fn from(e: sled::Error) -> Self {
        StorageError::Sled(e.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The position is in the trimmed past, beyond the tail, or from another epoch.
    #[error("offset is no longer available")]
    Gone,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Retention settings; zero means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    pub max_messages: u64,
    pub max_age: Duration,
}

#[derive(Debug, Clone)]
pub struct StorageOptions {
    pub cache_capacity: u64,
    /// Acknowledge appends only after a flush (see module docs). `false` is unsafe.
    pub fsync: bool,
    pub retention: Retention,
}

/// A message ready to append: its stream and its compact JSON text.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub stream: String,
    pub json: Bytes,
}

/// One read: a JSON array of messages after `start`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// `[m1,m2,...]`, each message's bytes exactly as stored.
    pub body: Bytes,
    pub count: usize,
    /// The position the messages follow.
    pub start: Position,
    /// The position after the last message returned (== `start` when empty).
    pub next: Position,
    /// The chunk reached the stream's durable tail.
    pub up_to_date: bool,
}

/// Cheap-to-clone handle to the log.
#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

struct Inner {
    db: sled::Db,
    epoch: Epoch,
    hub: Hub,
    retention: Retention,
    streams: RwLock<HashMap<Arc<str>, Arc<StreamEntry>>>,
    writer: Mutex<Writer>,
    committer: Mutex<Option<commit::Committer>>,
    trimmer: Mutex<Option<retention::Trimmer>>,
    /// Set by the first failed write or flush. sled 0.34 keeps an I/O error for good, so the
    /// store stays unwritable until the process restarts; `/health` reports it.
    failed: Arc<std::sync::atomic::AtomicBool>,
}

struct Writer {
    next_stream_id: u64,
}

/// In-memory state of one stream.
#[derive(Debug)]
pub(crate) struct StreamEntry {
    name: Arc<str>,
    id: u64,
    allocated: AtomicU64,
    visible: AtomicU64,
    /// Timestamp of the newest message; new messages never get an older one, so per-stream
    /// timestamps are monotonic even if the wall clock steps back, and age-based retention
    /// can stop at the first message young enough.
    last_timestamp_ms: AtomicU64,
}

impl StreamEntry {
    /// Makes messages up to `seq` readable and wakes the stream's live readers.
    pub(crate) fn publish(&self, seq: u64, hub: &Hub) {
        let previous = self.visible.fetch_max(seq, Ordering::AcqRel);
        if seq > previous {
            hub.wake(&self.name, seq);
        }
    }
}

/// How an append becomes durable.
pub enum PendingAppend {
    /// Waits for the group flush that covers this append.
    Flush(tokio::sync::oneshot::Receiver<Result<(), StorageError>>),
    /// Already visible; durability left to sled's background flush (unsafe mode).
    Done,
}

impl PendingAppend {
    pub async fn durable(self) -> Result<(), StorageError> {
        match self {
            PendingAppend::Flush(receiver) => receiver.await.unwrap_or(Err(StorageError::Closed)),
            PendingAppend::Done => Ok(()),
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Storage {
    /// Opens (or creates) the store in `dir`, upgrading an older layout, and starts the commit
    /// and retention threads.
    pub fn open(dir: &Path, options: StorageOptions, hub: Hub) -> Result<Storage, StorageError> {
        let open_error = |message: String| StorageError::Open { path: dir.display().to_string(), message };
        std::fs::create_dir_all(dir).map_err(|e| open_error(e.to_string()))?;
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(options.cache_capacity)
            .flush_every_ms(Some(500))
            .open()
            .map_err(|e| open_error(e.to_string()))?;
        let state = migrate::prepare(&db).map_err(|e| open_error(e.to_string()))?;

        let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let committer = options.fsync.then(|| commit::Committer::start(db.clone(), hub.clone(), failed.clone()));
        let trimmer = retention::Trimmer::start(db.clone(), options.retention);
        Ok(Storage {
            inner: Arc::new(Inner {
                db,
                epoch: state.epoch,
                hub,
                retention: options.retention,
                streams: RwLock::new(HashMap::new()),
                writer: Mutex::new(Writer { next_stream_id: state.next_stream_id }),
                committer: Mutex::new(committer),
                trimmer: Mutex::new(trimmer),
                failed,
            }),
        })
    }

    pub fn epoch(&self) -> Epoch {
        self.inner.epoch
    }

    pub fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    /// False once a write or flush failed (see `Inner::failed`).
    pub fn is_writable(&self) -> bool {
        !self.inner.failed.load(Ordering::Acquire)
    }

    /// Bytes the store takes on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.inner.db.size_on_disk().unwrap_or(0)
    }

    /// Streams loaded into memory since start.
    pub fn streams_loaded(&self) -> usize {
        self.inner.streams.read().expect("streams lock").len()
    }

    /// Appends messages atomically (all or none, in order). Blocking: call it off the async
    /// workers. Await the returned value before acknowledging.
    pub fn append(&self, messages: &[NewMessage]) -> Result<PendingAppend, StorageError> {
        let inner = &*self.inner;
        let now = now_ms();
        let mut writer = inner.writer.lock().expect("writer lock");
        let mut batch = sled::Batch::default();
        let mut created: Vec<Arc<str>> = Vec::new();
        // (entry, last seq, last timestamp) per stream touched; batches name few streams, so a
        // linear search beats a map.
        let mut touched: Vec<(Arc<StreamEntry>, u64, u64)> = Vec::new();
        for message in messages {
            let index = match touched.iter().position(|(entry, _, _)| *entry.name == *message.stream) {
                Some(index) => index,
                None => {
                    let entry = match self.load(&message.stream)? {
                        Some(entry) => entry,
                        None => self.create(&message.stream, &mut writer, &mut batch, &mut created),
                    };
                    let (seq, ts) =
                        (entry.allocated.load(Ordering::Acquire), entry.last_timestamp_ms.load(Ordering::Acquire));
                    touched.push((entry, seq, ts));
                    touched.len() - 1
                }
            };
            let (entry, seq, ts) = &mut touched[index];
            *seq += 1;
            *ts = (*ts).max(now);
            batch.insert(&keys::log_key(entry.id, *seq)[..], keys::encode_log_value(*ts, &message.json));
        }
        for (entry, seq, _) in &touched {
            let record = StreamRecord { last_seq: *seq, ..StreamRecord::new() };
            batch.insert(&keys::stream_key(entry.id)[..], record.encode());
        }
        if !created.is_empty() {
            batch.insert(keys::META_NEXT_STREAM_ID, &keys::encode_u64(writer.next_stream_id)[..]);
        }
        if let Err(e) = inner.db.apply_batch(batch) {
            inner.failed.store(true, Ordering::Release);
            let mut streams = inner.streams.write().expect("streams lock");
            for name in &created {
                streams.remove(name);
            }
            return Err(e.into());
        }
        for (entry, seq, ts) in &touched {
            entry.allocated.store(*seq, Ordering::Release);
            entry.last_timestamp_ms.store(*ts, Ordering::Release);
        }
        let published: Vec<(Arc<StreamEntry>, u64)> = touched.into_iter().map(|(e, seq, _)| (e, seq)).collect();
        // Handing the ticket over while still holding the writer lock keeps tickets in append
        // order; the commit thread relies on nothing more than that.
        let committer = inner.committer.lock().expect("committer lock");
        match committer.as_ref() {
            Some(committer) => committer.submit(published).map(PendingAppend::Flush),
            None => {
                drop(writer);
                for (entry, seq) in published {
                    entry.publish(seq, &inner.hub);
                }
                Ok(PendingAppend::Done)
            }
        }
    }

    /// The durable tail of a stream (an unknown stream is empty: position 0).
    pub fn tail(&self, stream: &str) -> Result<Position, StorageError> {
        let seq = self.load(stream)?.map_or(0, |e| e.visible.load(Ordering::Acquire));
        Ok(self.position(seq))
    }

    /// Reads messages after `offset`, at most `max_bytes` of them (but always at least one).
    pub fn read(&self, stream: &str, offset: Offset, max_bytes: usize) -> Result<Chunk, ReadError> {
        let entry = self.load(stream)?;
        let tail = entry.as_ref().map_or(0, |e| e.visible.load(Ordering::Acquire));
        let window_start = self.window_start(tail);
        let (after, must_start_at_next) = match offset {
            Offset::Now => return Ok(self.empty_chunk(tail)),
            Offset::Start => (window_start - 1, false),
            Offset::At(position) => {
                if position.epoch != self.inner.epoch || position.seq > tail {
                    return Err(ReadError::Gone);
                }
                if position.seq + 1 < window_start {
                    return Err(ReadError::Gone);
                }
                (position.seq, true)
            }
        };
        let Some(entry) = entry.filter(|_| after < tail) else {
            return Ok(self.empty_chunk(after));
        };

        let expired_before = self.expiry_cutoff_ms();
        let mut body = Vec::with_capacity(256);
        body.push(b'[');
        let mut count = 0;
        let mut start = after;
        let mut last = after;
        let range = keys::log_key(entry.id, after + 1)..=keys::log_key(entry.id, tail);
        for item in self.inner.db.range(range) {
            let (key, value) = item.map_err(StorageError::from)?;
            let seq = keys::log_key_seq(&key).ok_or_else(|| corrupt("log key"))?;
            let (timestamp, json) = keys::decode_log_value(&value).ok_or_else(|| corrupt("log value"))?;
            if count == 0 {
                let expired = timestamp < expired_before;
                if must_start_at_next && (seq != after + 1 || expired) {
                    // The next message was trimmed (or is being trimmed): a gap.
                    return Err(ReadError::Gone);
                }
                if expired {
                    // Reading from the start: skip what age-based retention has not deleted yet.
                    last = seq;
                    continue;
                }
                start = seq - 1;
            } else if body.len() + json.len() + 1 > max_bytes {
                break;
            }
            if count > 0 {
                body.push(b',');
            }
            body.extend_from_slice(json);
            count += 1;
            last = seq;
        }
        body.push(b']');
        if count == 0 {
            // Everything from the start had expired.
            return Ok(self.empty_chunk(last));
        }
        Ok(Chunk {
            body: Bytes::from(body),
            count,
            start: self.position(start),
            next: self.position(last),
            up_to_date: last >= tail,
        })
    }

    /// Flushes everything and stops the background threads. Appends made after this fail.
    pub fn close(&self) -> Result<(), StorageError> {
        if let Some(trimmer) = self.inner.trimmer.lock().expect("trimmer lock").take() {
            trimmer.stop();
        }
        if let Some(committer) = self.inner.committer.lock().expect("committer lock").take() {
            committer.stop();
        }
        self.inner.db.flush()?;
        Ok(())
    }

    /// Runs one retention pass now (the background task does this periodically).
    pub fn trim_now(&self) -> Result<u64, StorageError> {
        retention::trim(&self.inner.db, self.inner.retention, now_ms())
    }

    fn position(&self, seq: u64) -> Position {
        Position { epoch: self.inner.epoch, seq }
    }

    fn empty_chunk(&self, seq: u64) -> Chunk {
        let position = self.position(seq);
        Chunk { body: Bytes::from_static(b"[]"), count: 0, start: position, next: position, up_to_date: true }
    }

    /// The first sequence number the count limit keeps, given the tail.
    fn window_start(&self, tail: u64) -> u64 {
        match self.inner.retention.max_messages {
            0 => 1,
            limit => tail.saturating_sub(limit) + 1,
        }
    }

    fn expiry_cutoff_ms(&self) -> u64 {
        match self.inner.retention.max_age.as_millis() as u64 {
            0 => 0,
            age => now_ms().saturating_sub(age),
        }
    }

    /// The stream's entry: cached, or loaded from sled; `None` if the stream was never written.
    fn load(&self, stream: &str) -> Result<Option<Arc<StreamEntry>>, StorageError> {
        let inner = &*self.inner;
        if let Some(entry) = inner.streams.read().expect("streams lock").get(stream) {
            return Ok(Some(entry.clone()));
        }
        let Some(id) = inner.db.get(keys::name_key(stream))? else {
            return Ok(None);
        };
        let id = keys::decode_u64(&id).ok_or_else(|| corrupt("stream id"))?;
        let record = match inner.db.get(keys::stream_key(id))? {
            Some(bytes) => StreamRecord::decode(&bytes).ok_or_else(|| corrupt("stream record"))?,
            None => StreamRecord::new(),
        };
        let last_timestamp = match inner.db.get(keys::log_key(id, record.last_seq))? {
            Some(value) => keys::decode_log_value(&value).map_or(0, |(ts, _)| ts),
            None => 0,
        };
        let name: Arc<str> = Arc::from(stream);
        let entry = Arc::new(StreamEntry {
            name: name.clone(),
            id,
            allocated: AtomicU64::new(record.last_seq),
            visible: AtomicU64::new(record.last_seq),
            last_timestamp_ms: AtomicU64::new(last_timestamp),
        });
        let mut streams = inner.streams.write().expect("streams lock");
        Ok(Some(streams.entry(name).or_insert(entry).clone()))
    }

    /// Makes a new stream's entry (under the writer lock) and adds its name to `batch`.
    fn create(
        &self,
        stream: &str,
        writer: &mut Writer,
        batch: &mut sled::Batch,
        created: &mut Vec<Arc<str>>,
    ) -> Arc<StreamEntry> {
        let id = writer.next_stream_id;
        writer.next_stream_id += 1;
        batch.insert(keys::name_key(stream), &keys::encode_u64(id)[..]);
        let name: Arc<str> = Arc::from(stream);
        let entry = Arc::new(StreamEntry {
            name: name.clone(),
            id,
            allocated: AtomicU64::new(0),
            visible: AtomicU64::new(0),
            last_timestamp_ms: AtomicU64::new(0),
        });
        self.inner.streams.write().expect("streams lock").insert(name.clone(), entry.clone());
        created.push(name);
        entry
    }
}

fn corrupt(what: &str) -> StorageError {
    StorageError::Sled(format!("corrupt {what}"))
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(trimmer) = self.trimmer.get_mut().ok().and_then(Option::take) {
            trimmer.stop();
        }
        if let Some(committer) = self.committer.get_mut().ok().and_then(Option::take) {
            committer.stop();
        }
    }
}
