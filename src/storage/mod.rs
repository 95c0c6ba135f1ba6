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
use crate::framing::Framer;
use crate::hub::Hub;
use crate::meta::{Framing, SharedMeta};
use crate::offset::{Epoch, Offset, Position};
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
    pub stream: String,
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

    /// Reads messages after `offset`, at most `max_bytes` of them (but always at least one);
    /// a fork read before its fork point answers where to read on ([`Level::Inherit`]).
    /// `cap`: a fork's read of its source, up to the fork point; it sees the source whatever
    /// its state (deleted, expired) and renews nothing. Blocking (may scan sled): call it off
    /// the async workers.
    pub fn read_level(
        &self,
        stream: &str,
        offset: Offset,
        max_bytes: usize,
        cap: Option<u64>,
    ) -> Result<Level, ReadError> {
        self.read_inner(stream, offset, max_bytes, true, cap).expect("a blocking read always answers")
    }

    /// [`Storage::read_level`] of a stream's own messages (a fork's inherited ones are read
    /// through `Engine::read`, which stitches the levels).
    pub fn read(&self, stream: &str, offset: Offset, max_bytes: usize) -> Result<Chunk, ReadError> {
        match self.read_level(stream, offset, max_bytes, None)? {
            Level::Chunk(chunk) => Ok(chunk),
            Level::Inherit { .. } => Err(StorageError::Unsupported("a fork's inherited messages here").into()),
        }
    }

    /// [`Storage::read`] if it can be answered from memory alone (known stream, cached chunk),
    /// so the caller can skip a trip to the blocking pool; `None` otherwise.
    pub fn read_from_memory(&self, stream: &str, offset: Offset, max_bytes: usize) -> Option<Result<Level, ReadError>> {
        self.read_inner(stream, offset, max_bytes, false, None)
    }

    fn read_inner(
        &self,
        stream: &str,
        offset: Offset,
        max_bytes: usize,
        may_block: bool,
        cap: Option<u64>,
    ) -> Option<Result<Level, ReadError>> {
        let entry = if may_block {
            match self.load(stream) {
                Ok(entry) => entry,
                Err(e) => return Some(Err(e.into())),
            }
        } else {
            Some(self.inner.cache.get(stream)?)
        };
        let Some(entry) = entry else {
            if cap.is_some() {
                // A fork's source is kept while the fork lives: its absence is a lost record.
                log::error!("fork source {stream:?} is missing");
                return Some(Err(corrupt("fork (its source is missing)").into()));
            }
            return Some(self.read_unknown(stream, offset).map(Level::Chunk));
        };
        // Metadata before the tail: see `Chunk::meta`.
        let meta = entry.meta();
        let now = now_ms();
        if cap.is_none() {
            if entry.expired(&meta, now) && !meta.deleted {
                if !may_block {
                    return None;
                }
                self.expire(stream);
                return Some(self.read_unknown(stream, offset).map(Level::Chunk));
            }
            // A read renews a sliding TTL.
            entry.renew(now);
        }
        let visible = entry.visible.load(Ordering::Acquire);
        let tail = cap.map_or(visible, |cap| cap.min(visible));
        let with_meta = |result: Result<Chunk, ReadError>| {
            Some(result.map(|chunk| Level::Chunk(Chunk { meta: Some(meta.clone()), ..chunk })))
        };
        if meta.deleted && cap.is_none() {
            // `410` to its own clients (the caller tells by the metadata).
            return with_meta(Ok(self.empty_chunk(tail, meta.framing())));
        }
        if let Some(fork) = &meta.fork {
            // Before the fork point: the source's messages (the caller reads them there).
            let inherited = match offset {
                Offset::Start => true,
                Offset::At(position) => position.seq < entry.base,
                Offset::Now => false,
            };
            if inherited {
                let (source, at) = (fork.source.clone(), entry.base);
                return Some(Ok(Level::Inherit { source, at, meta: meta.clone() }));
            }
        }
        // AnyCable's retention applies to streams broadcasts made, never to those `PUT` made.
        let (window_start, expired_before) =
            if meta.created { (1, 0) } else { (self.window_start(tail), self.expiry_cutoff_ms()) };
        // Positions up to the stream's base are before its current life: read from its start.
        let window_start = window_start.max(entry.base + 1);
        let (after, must_start_at_next) = match offset {
            Offset::Now => return with_meta(Ok(self.empty_chunk(tail, meta.framing()))),
            Offset::Start => (window_start - 1, false),
            Offset::At(position) => {
                // A token from before this life of the stream reads it from its start only if
                // it missed nothing: it is the previous life's tail (a broadcast continued a
                // stream retention removed), or 0 (before anything; a reader that came before
                // the first broadcast). Any other is from a life that ended: 410.
                let after = if position.seq >= entry.base {
                    position.seq
                } else if Some(position.seq) == entry.prev_tail || (position.seq == 0 && entry.prev_tail.is_none()) {
                    entry.base
                } else {
                    return Some(Err(ReadError::Gone));
                };
                if position.epoch != self.inner.epoch || after > tail || after + 1 < window_start {
                    return Some(Err(ReadError::Gone));
                }
                (after, true)
            }
        };
        if after >= tail {
            return with_meta(Ok(self.empty_chunk(after, meta.framing())));
        }
        // A capped read is not the stream's chunk: it neither uses nor fills the cache.
        let cache = if cap.is_some() { None } else { Some(&self.inner.chunks) };
        let _scan = loop {
            let Some(chunks) = cache else { break None };
            if let Some(cached) = chunks.get(entry.id, after, max_bytes) {
                let still_complete = cached.full || cached.last == tail;
                if still_complete && cached.first_timestamp_ms >= expired_before {
                    let mut chunk = cached.chunk;
                    chunk.up_to_date = cached.last >= tail;
                    return with_meta(Ok(chunk));
                }
            }
            if !may_block {
                return None;
            }
            // One scan per range at a time; after waiting for another one, look again. With the
            // cache off there is nothing to share: scan at once.
            if !chunks.is_enabled() {
                break None;
            }
            match chunks.begin_scan(entry.id, after, max_bytes) {
                Some(scan) => break Some(scan),
                None => continue,
            }
        };
        // sled range scans are not snapshots: retention deleting records ahead of the scan
        // shows up as a hole, which `scan` reports. Retention only deletes from the front, so
        // a second scan starts after what it took and answers correctly (a gap, or the new
        // start of the stream).
        for _ in 0..SCAN_ATTEMPTS {
            let range = Range {
                after,
                tail,
                must_start_at_next,
                expired_before,
                framing: meta.framing(),
                cache: cap.is_none(),
            };
            match self.scan(&entry, range, max_bytes) {
                Err(ScanError::Torn) => continue,
                Err(ScanError::Read(e)) => return Some(Err(e)),
                Ok(chunk) => return with_meta(Ok(chunk)),
            }
        }
        // Retention deletes from the front and removal deletes a whole stream in one batch, so
        // a hole that outlives several scans is not a race: the log lost a record.
        log::error!("stream {stream:?}: a log record is missing in the middle of its log");
        Some(Err(corrupt("log (a record is missing)").into()))
    }

    /// A read of a stream that does not exist: never written, or removed (deleted, expired,
    /// or all its messages gone). Its tail is its tombstone's, or position 0 (see
    /// `tombstones.rs`): a token at the tail reads nothing, any other missed something: 410.
    fn read_unknown(&self, stream: &str, offset: Offset) -> Result<Chunk, ReadError> {
        let tail = self.buried_tail(stream)?;
        match offset {
            Offset::Now | Offset::Start => Ok(self.empty_chunk(tail, Framing::Json)),
            Offset::At(position) if position.epoch == self.inner.epoch && position.seq == tail => {
                Ok(self.empty_chunk(tail, Framing::Json))
            }
            Offset::At(_) => Err(ReadError::Gone),
        }
    }

    /// The tail of a stream that does not exist: its tombstone's, else 0.
    fn buried_tail(&self, stream: &str) -> Result<u64, StorageError> {
        Ok(tombstones::get(&self.inner.db.get()?, stream)?.map_or(0, |t| t.last_seq))
    }

    /// Reads the log of `entry` in `range`, and caches what it read.
    fn scan(&self, entry: &cache::StreamEntry, range: Range, max_bytes: usize) -> Result<Chunk, ScanError> {
        let Range { after, tail, must_start_at_next, expired_before, framing, cache } = range;
        let mut body = Framer::new(framing, 0);
        let mut count = 0;
        let mut start = after;
        let mut last = after;
        let mut first_timestamp_ms = 0;
        let mut full = false;
        let db = self.inner.db.get()?;
        // Start at the record that holds `after + 1`: the last one starting at or before it.
        let holding_next = db.range(keys::record_key(entry.id, 0)..=keys::record_key(entry.id, after + 1)).next_back();
        let first_key = match holding_next {
            Some(item) => item.map_err(StorageError::from)?.0,
            None => keys::record_key(entry.id, after + 1)[..].into(),
        };
        'records: for item in db.range(first_key..=sled::IVec::from(&keys::record_key(entry.id, tail)[..])) {
            let (key, value) = item.map_err(StorageError::from)?;
            let record = keys::LogRecord::parse(&key, &value).ok_or_else(|| corrupt("log record"))?;
            // Message indexes of this record within (after, tail].
            let from = after.saturating_sub(record.first_seq - 1).min(record.count() as u64) as usize;
            let to = (tail + 1).saturating_sub(record.first_seq).min(record.count() as u64) as usize;
            if from >= to {
                continue;
            }
            let first_here = record.first_seq + from as u64;
            if count == 0 {
                let expired = record.timestamp_ms < expired_before;
                if must_start_at_next && (first_here != after + 1 || expired) {
                    // The next message was trimmed (or is being trimmed): a gap.
                    return Err(ScanError::Read(ReadError::Gone));
                }
                if expired {
                    // Reading from the start: skip what age-based retention has not deleted yet.
                    last = record.first_seq + to as u64 - 1;
                    continue;
                }
                start = first_here - 1;
                first_timestamp_ms = record.timestamp_ms;
                // Size the body once from this record's mean message size instead of letting
                // a multi-megabyte chunk grow by doubling (each step copies it all again).
                let per_message = record.body_len() / record.count() + 1;
                let expected = (tail - start).saturating_mul(per_message as u64).saturating_add(2);
                body.reserve(expected.min(max_bytes as u64) as usize);
            } else if first_here != last + 1 {
                // A record between the last one and this one vanished during the scan.
                return Err(ScanError::Torn);
            }
            // Take as many messages as fit with the closing bracket (always at least one per
            // chunk), then copy them at once.
            let mut end = from;
            let mut size = body.len_closed();
            while end < to {
                // JSON: a comma before every message but the chunk's first.
                let comma = usize::from(framing == Framing::Json && count + end - from > 0);
                let added = record.message_len(end) + comma;
                if count + end - from > 0 && size + added > max_bytes {
                    full = true;
                    break;
                }
                size += added;
                end += 1;
            }
            if end > from {
                push_record(&mut body, &record, from, end).ok_or_else(|| corrupt("log record"))?;
                count += end - from;
                last = record.first_seq + end as u64 - 1;
            }
            if full {
                break 'records;
            }
        }
        if count == 0 {
            if must_start_at_next {
                // Nothing left after a position before the tail: deleted (or being deleted).
                return Err(ScanError::Read(ReadError::Gone));
            }
            // From the start, and every message has expired: the reader goes to the tail,
            // never to a position before deleted messages.
            return Ok(self.empty_chunk(tail, framing));
        }
        if !full && last < tail {
            // The scan ended early: records up to the tail vanished while it ran.
            return Err(ScanError::Torn);
        }
        let chunk = Chunk {
            body: body.finish(),
            count,
            start: self.position(start),
            next: self.position(last),
            up_to_date: last >= tail,
            meta: None,
        };
        // Keyed by the position the chunk really follows: a read from the start that skipped
        // expired messages must not answer a later read from before them (that one is a gap).
        if cache {
            let cached = chunks::CachedChunk { chunk: chunk.clone(), last, first_timestamp_ms, full };
            self.inner.chunks.put(entry.id, start, max_bytes, cached);
        }
        Ok(chunk)
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

/// Adds `to - from` consecutive messages of a record, as stored (JSON: already joined by
/// commas, so one copy; raw: one copy per message, without the separators).
fn push_record(body: &mut Framer, record: &keys::LogRecord, from: usize, to: usize) -> Option<()> {
    match body.framing() {
        Framing::Json => body.push_joined(record.messages(from, to)?, to - from),
        Framing::Raw => {
            for i in from..to {
                body.push(record.message(i)?);
            }
        }
    }
    Some(())
}

/// What one scan reads.
#[derive(Debug, Clone, Copy)]
struct Range {
    /// The position the read follows.
    after: u64,
    tail: u64,
    /// The read follows a token: the next message must be there (else it is a gap, `410`).
    must_start_at_next: bool,
    /// Messages older than this (ms) have expired (AnyCable's `history_ttl`; 0: none).
    expired_before: u64,
    framing: Framing,
    /// Whether the chunk goes to the chunk cache (not a capped read).
    cache: bool,
}

/// Scans of one read before it gives up on a stream whose records keep vanishing.
const SCAN_ATTEMPTS: usize = 4;

/// Why one scan did not produce a chunk.
enum ScanError {
    /// Records vanished in the middle of the scan (retention ran concurrently): scan again.
    Torn,
    Read(ReadError),
}

impl From<StorageError> for ScanError {
    fn from(e: StorageError) -> Self {
        ScanError::Read(ReadError::Storage(e))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> StorageOptions {
        StorageOptions {
            cache_capacity: 1 << 20,
            fsync: true,
            retention: Retention::default(),
            read_cache_bytes: 0,
            live_chunk_bytes: 1 << 20,
            max_streams_loaded: 100,
            max_queued_bytes: 1 << 20,
            tombstone_ttl: Duration::from_secs(3600),
        }
    }

    fn append(storage: &Storage, json: &'static str) {
        let message = NewMessage { stream: "s".into(), json: Bytes::from_static(json.as_bytes()) };
        let pending = storage.append(vec![message]).unwrap();
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(pending.durable()).unwrap();
    }

    /// A record missing in the middle of a log (never the result of retention, which deletes
    /// from the front) is reported, never read across as if the messages were not there.
    #[test]
    fn a_hole_in_a_log_is_reported_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), options(), Hub::default()).unwrap();
        for json in ["1", "2", "3"] {
            append(&storage, json); // one record each
        }
        let id = storage.inner.cache.get("s").unwrap().id;
        storage.inner.db.get().unwrap().remove(keys::record_key(id, 2)).unwrap();
        let read = |offset| storage.read("s", offset, 1024);
        let from_start = read(Offset::Start);
        assert!(matches!(from_start, Err(ReadError::Storage(_))), "{from_start:?}");
        let epoch = storage.epoch();
        let from_1 = read(Offset::At(Position { epoch, seq: 1 }));
        assert!(matches!(from_1, Err(ReadError::Gone)), "the next message is gone: {from_1:?}");
        let from_2 = read(Offset::At(Position { epoch, seq: 2 })).unwrap();
        assert_eq!(&from_2.body[..], b"[3]");
    }
}
