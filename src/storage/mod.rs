//! The durable per-stream message log, on sled. Knows nothing about HTTP.
//!
//! # Ordering and durability
//!
//! One writer thread ([`writer`]) allocates sequence numbers and writes each group of waiting
//! broadcasts to sled, one log record per stream (each request atomic, see [`writer`]). The
//! messages are then written but not yet durable, so readers must not see them: a reader that saw message 11 before a crash would
//! hold a token for a number that the restarted server hands out again. Each stream therefore
//! has two tails:
//!
//! * `allocated`: the last sequence number written to sled (changed only by the writer);
//! * `visible`: the last one that is durable; readers never read past it.
//!
//! The same thread then flushes sled once for the group, raises `visible` and wakes the hub.
//! Because all numbers up to a stream's `allocated` were applied before that flush began, raising `visible` to the highest flushed number never exposes a gap (the visibility
//! race of PITFALLS.md cannot happen).
//!
//! Stream entries are loaded lazily (a restart reads no history), see [`cache`].

mod cache;
mod chunks;
mod expiry;
pub mod inspect;
mod keys;
mod migrate;
mod read;
mod retention;
mod slot;
mod tombstones;
mod writer;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

pub use crate::forks::Level;
use crate::hub::Hub;
use crate::meta::{Framing, SharedMeta};
use crate::offset::{Epoch, Position};
use crate::writes::{WriteError, WriteOp, WriteOutcome};
use cache::StreamCache;

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
    #[error("storage is recovering from a failed write")]
    Recovering,
    /// `storage.max_queued_bytes` of broadcasts are waiting for the writer.
    #[error("too many broadcasts waiting to be written")]
    Busy,
    /// Cluster mode: NATS JetStream did not answer in time, or refused.
    #[error("log unavailable: {0}")]
    Unavailable(String),
    /// Cluster mode: more messages than JetStream's atomic batch limit.
    #[error("a batch holds at most {0} messages")]
    BatchTooLarge(usize),
    /// Cluster mode: a message bigger than NATS can carry (its server's `max_payload`, less
    /// room for headers).
    #[error("a message holds at most {limit} bytes (NATS max_payload {max_payload})")]
    MessageTooLarge { limit: usize, max_payload: usize },
    /// The engine does not do this (yet).
    #[error("{0} is not supported by this storage engine yet")]
    Unsupported(&'static str),
}

impl From<sled::Error> for StorageError {
    fn from(e: sled::Error) -> Self {
        StorageError::Sled(e.to_string())
    }
}

#[derive(Debug, Clone, thiserror::Error)]
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
    /// Byte budget of the cache of recently read chunks (0 disables it).
    pub read_cache_bytes: usize,
    /// The chunk limit live readers read with (`ds.max_chunk_bytes`): the writer puts each
    /// new batch of a watched stream in the chunk cache under it, see [`writer`].
    pub live_chunk_bytes: usize,
    /// Most stream entries kept in memory; idle ones leave earlier (see [`cache`]).
    pub max_streams_loaded: usize,
    /// Most bytes of broadcasts waiting for the writer; beyond it appends are refused.
    pub max_queued_bytes: usize,
    /// How long a removed stream's tombstone is kept (zero: none are made).
    pub tombstone_ttl: Duration,
}

/// A message ready to append: its stream and its compact JSON text.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// Shared by a broadcast's consecutive messages to one stream.
    pub stream: std::sync::Arc<str>,
    pub json: Bytes,
}

/// One read: the messages after `start`, framed for the stream's content type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// JSON streams: `[m1,m2,...]`, each message's bytes exactly as stored; other streams:
    /// the messages' bytes, concatenated.
    pub body: Bytes,
    pub count: usize,
    /// The position the messages follow.
    pub start: Position,
    /// The position after the last message returned (== `start` when empty).
    pub next: Position,
    /// The chunk reached the stream's durable tail.
    pub up_to_date: bool,
    /// The stream's metadata when it was read (read before its tail, so a closed stream's
    /// chunk that reached the tail holds every message); `None`: the stream does not exist.
    /// Never cached with the chunk: closure may change it.
    pub meta: Option<SharedMeta>,
}

impl Chunk {
    /// The stream was closed and this chunk reached its end.
    pub fn closed(&self) -> bool {
        self.up_to_date && self.meta.as_ref().is_some_and(|m| m.closed)
    }
}

/// Cheap-to-clone handle to the log.
#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<slot::DbSlot>,
    epoch: Epoch,
    hub: Hub,
    retention: Retention,
    cache: Arc<StreamCache>,
    queue: Arc<writer::QueueBudget>,
    streams_created: Arc<std::sync::atomic::AtomicU64>,
    chunks: Arc<chunks::ChunkCache>,
    writer: Mutex<Option<writer::Writer>>,
    trimmer: Mutex<Option<retention::Trimmer>>,
    trimmer_context: retention::Context,
    /// Set by the first failed write or flush. sled 0.34 keeps an I/O error for good, so the
    /// store stays unwritable until the process restarts; `/health` reports it.
    failed: Arc<AtomicBool>,
}

/// A write on its way to disk, answered by the writer thread after the group's flush (right
/// after the apply when `storage.fsync` is off), or refused by its stream.
pub struct PendingWrite(tokio::sync::oneshot::Receiver<Result<WriteOutcome, WriteError>>);

impl PendingWrite {
    /// Resolves once the write is durable (or, with `storage.fsync = false`, applied).
    pub async fn durable(self) -> Result<WriteOutcome, WriteError> {
        self.0.await.unwrap_or(Err(WriteError::Storage(StorageError::Closed)))
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Storage {
    /// Opens (or creates) the store in `dir`, upgrading an older layout, and starts the writer
    /// and retention threads.
    pub fn open(dir: &Path, options: StorageOptions, hub: Hub) -> Result<Storage, StorageError> {
        let open_error = |message: String| StorageError::Open { path: dir.display().to_string(), message };
        std::fs::create_dir_all(dir).map_err(|e| open_error(e.to_string()))?;
        let (db_slot, db) = slot::DbSlot::open(dir, options.cache_capacity).map_err(|e| open_error(e.to_string()))?;
        let state = migrate::prepare(&db).map_err(|e| open_error(e.to_string()))?;

        let failed = Arc::new(AtomicBool::new(false));
        let cache = Arc::new(StreamCache::default());
        let db_slot = Arc::new(db_slot);
        let streams_created = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let chunks = Arc::new(chunks::ChunkCache::new(options.read_cache_bytes));
        let live_chunks = writer::LiveChunks { cache: chunks.clone(), max_bytes: options.live_chunk_bytes };
        let seq_floor = Arc::new(AtomicU64::new(state.seq_floor));
        let removals = writer::Removals::default();
        let queue = Arc::new(writer::QueueBudget { bytes: Default::default(), max: options.max_queued_bytes.max(1) });
        let shared = writer::Shared {
            streams_created: streams_created.clone(),
            slot: db_slot.clone(),
            epoch: state.epoch,
            cache: cache.clone(),
            hub: hub.clone(),
            failed: failed.clone(),
            seq_floor,
            removals: removals.clone(),
            retention: options.retention,
            max_streams_loaded: options.max_streams_loaded.max(1),
            tombstone_ttl_ms: options.tombstone_ttl.as_millis() as u64,
        };
        let writer = writer::Writer::start(shared, state.next_stream_id, options.fsync, live_chunks, queue.clone());
        let context = retention::Context { retention: options.retention, cache: cache.clone(), removals };
        let trimmer = retention::Trimmer::start(db_slot.clone(), context.clone());
        drop(db);
        Ok(Storage {
            inner: Arc::new(Inner {
                db: db_slot,
                epoch: state.epoch,
                hub,
                retention: options.retention,
                cache,
                queue,
                trimmer_context: context,
                streams_created,
                chunks,
                writer: Mutex::new(Some(writer)),
                trimmer: Mutex::new(trimmer),
                failed,
            }),
        })
    }

    /// A named tree of the same database, for state kept beside the log (subscriptions and
    /// the webhook signing key). Opened per use: the database may be reopened after an I/O
    /// failure (`slot`), which would leave a kept handle on the old one.
    pub fn side_tree(&self, name: &str) -> Result<sled::Tree, StorageError> {
        Ok(self.inner.db.get()?.open_tree(name)?)
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
        self.inner.db.get().ok().and_then(|db| db.size_on_disk().ok()).unwrap_or(0)
    }

    /// Streams ever written to this store.
    pub fn streams_created(&self) -> u64 {
        self.inner.streams_created.load(Ordering::Relaxed)
    }

    /// Stream entries in memory now.
    pub fn streams_loaded(&self) -> usize {
        self.inner.cache.len()
    }

    /// Bytes of broadcasts waiting for the writer.
    pub fn queued_bytes(&self) -> usize {
        self.inner.queue.bytes.load(Ordering::Relaxed)
    }

    /// Bytes the chunk cache holds, its per-entry overhead included.
    pub fn read_cache_bytes(&self) -> usize {
        self.inner.chunks.bytes()
    }

    /// Appends broadcast messages atomically (all or none, in order). Does not block: the
    /// writer thread does the work. Await the returned value before acknowledging.
    pub fn append(&self, messages: Vec<NewMessage>) -> Result<PendingWrite, StorageError> {
        self.submit(writer::Op::Broadcast(messages))
    }

    /// A Durable Streams write (create, append or close, delete) to one stream.
    pub fn write(&self, stream: &str, op: WriteOp) -> Result<PendingWrite, StorageError> {
        self.submit(writer::Op::Write { stream: Arc::from(stream), op })
    }

    fn submit(&self, op: writer::Op) -> Result<PendingWrite, StorageError> {
        let writer = self.inner.writer.lock().expect("writer lock");
        let writer = writer.as_ref().ok_or(StorageError::Closed)?;
        writer.submit(op).map(PendingWrite)
    }

    /// Asks the writer to remove an expired stream (fire and forget: it checks again).
    fn expire(&self, stream: &str) {
        let _ = self.submit(writer::Op::Expire { stream: Arc::from(stream) });
    }

    /// The durable tail of a stream (an unknown stream is empty: position 0).
    pub fn tail(&self, stream: &str) -> Result<Position, StorageError> {
        match self.head(stream)? {
            Some((tail, _)) => Ok(tail),
            None => Ok(self.position(self.buried_tail(stream)?)),
        }
    }

    /// The tail and metadata of a live stream; `None` if it does not exist or has expired.
    /// Does not renew a TTL (HEAD never does).
    pub fn head(&self, stream: &str) -> Result<Option<(Position, SharedMeta)>, StorageError> {
        let Some(entry) = self.load(stream)? else { return Ok(None) };
        let meta = entry.meta();
        // A soft-deleted stream answers (`410`) until its last fork goes, expired or not.
        if !meta.deleted && entry.expired(&meta, now_ms()) {
            self.expire(stream);
            return Ok(None);
        }
        Ok(Some((self.position(entry.visible.load(Ordering::Acquire)), meta)))
    }

    /// Flushes everything and stops the background threads. Appends made after this fail.
    pub fn close(&self) -> Result<(), StorageError> {
        if let Some(trimmer) = self.inner.trimmer.lock().expect("trimmer lock").take() {
            trimmer.stop();
        }
        if let Some(writer) = self.inner.writer.lock().expect("writer lock").take() {
            writer.stop();
        }
        self.inner.db.get()?.flush()?;
        Ok(())
    }

    /// Runs one retention pass now (the background task does this periodically).
    pub fn trim_now(&self) -> Result<u64, StorageError> {
        retention::trim(&self.inner.db.get()?, &self.inner.trimmer_context, now_ms())
    }

    fn position(&self, seq: u64) -> Position {
        Position { epoch: self.inner.epoch, seq }
    }

    fn empty_chunk(&self, seq: u64, framing: Framing) -> Chunk {
        let position = self.position(seq);
        let body = crate::framing::empty_body(framing);
        Chunk { body, count: 0, start: position, next: position, up_to_date: true, meta: None }
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

    fn load(&self, stream: &str) -> Result<Option<Arc<cache::StreamEntry>>, StorageError> {
        self.inner.cache.get_or_load(&self.inner.db.get()?, stream)
    }
}

pub(crate) fn corrupt(what: &str) -> StorageError {
    StorageError::Sled(format!("corrupt {what}"))
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(trimmer) = self.trimmer.get_mut().ok().and_then(Option::take) {
            trimmer.stop();
        }
        if let Some(writer) = self.writer.get_mut().ok().and_then(Option::take) {
            writer.stop();
        }
    }
}
