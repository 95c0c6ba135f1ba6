//! The writer thread: the only code that appends to the log, and its group commit.
//!
//! Broadcast handlers hand their messages over a channel and await a oneshot. The thread takes
//! every request that is waiting, allocates sequence numbers, turns each stream's messages into
//! a log record and writes the group with one `sled::Batch`, or with plain inserts when every
//! request is a single key (either way each request is stored whole or not at all). It then
//! calls the blocking `Db::flush()` once, which makes every write applied before it durable,
//! and `fdatasync`s sled's file (see `slot.rs`); then it publishes the new tails, wakes the hub
//! and answers every request of the group. While it works, the next requests pile up in the
//! channel and form the next group, so syncs per second stay bounded by the disk while
//! throughput grows with concurrency.
//!
//! Why this shape (all measured with `ds_bench ingest`, see docs/PERFORMANCE.md):
//! - not `flush_async`: it deadlocks under concurrent callers in sled 0.34 (PITFALLS.md);
//! - not one batch per request under a lock: sled's `apply_batch` takes a tree-wide lock and
//!   costs ~150 µs under load, which capped ingest at ~7k requests/s;
//! - not a separate flush thread: the extra wake-up per group cost more than the overlap of
//!   apply and flush gained (19k vs 23k msgs/s at 32 connections on 2 cores).
//!
//! Being the only writer also makes sequence allocation simple: no lock, and no visibility race
//! between two appenders of one stream (PITFALLS.md).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::oneshot;

use super::cache::{StoredTail, StreamCache, StreamEntry};
use super::chunks::{CachedChunk, ChunkCache};
use super::keys::{self, StreamRecord};
use super::slot::DbSlot;
use super::tombstones::{self, Ending, NextLife, Tombstone};
use super::{now_ms, Chunk, NewMessage, Retention, StorageError};
use crate::hub::Hub;
use crate::writes::{WriteError, WriteOp, WriteOutcome};

mod forks;
mod ops;
use crate::offset::{Epoch, Position};

/// Most requests taken into one group (bounds the batch size under a burst).
const MAX_GROUP_REQUESTS: usize = 512;

/// A log record is closed once it holds this many bytes: big enough that a batch of small
/// messages is one sled value, small enough that sled keeps it inline in its leaf nodes.
const MAX_RECORD_BYTES: usize = 64 * 1024;

/// The messages one group appends to one stream, cut into log records.
struct Run {
    entry: Arc<StreamEntry>,
    /// Timestamp of this group's messages: never older than the stream's newest (see
    /// `StreamEntry::last_timestamp_ms`).
    timestamp_ms: u64,
    last_seq: u64,
    /// Every message of the run, in order (reference-counted, not copied).
    messages: Vec<Bytes>,
    /// Index in `messages` of the open record's first message, and that record's JSON bytes.
    record_start: usize,
    record_bytes: usize,
}

impl Run {
    fn new(entry: Arc<StreamEntry>, now: u64) -> Run {
        let timestamp_ms = entry.last_timestamp_ms.load(Ordering::Acquire).max(now);
        let last_seq = entry.allocated.load(Ordering::Acquire);
        Run { entry, timestamp_ms, last_seq, messages: Vec::new(), record_start: 0, record_bytes: 0 }
    }

    fn push(&mut self, json: &Bytes, records: &mut Vec<([u8; 17], Vec<u8>)>) {
        let open = self.messages.len() - self.record_start;
        if open > 0 && keys::record_len(open + 1, self.record_bytes + json.len()) > MAX_RECORD_BYTES {
            self.close(records);
        }
        self.messages.push(json.clone());
        self.record_bytes += json.len();
        self.last_seq += 1;
    }

    /// Adds the open record to `records` (key, value) and starts the next one.
    fn close(&mut self, records: &mut Vec<([u8; 17], Vec<u8>)>) {
        let open = &self.messages[self.record_start..];
        if open.is_empty() {
            return;
        }
        let first_seq = self.last_seq - open.len() as u64 + 1;
        records.push((keys::record_key(self.entry.id, first_seq), keys::encode_record(self.timestamp_ms, open)));
        self.record_start = self.messages.len();
        self.record_bytes = 0;
    }
}

/// Where the writer leaves each new batch of a watched stream, ready for its live readers.
///
/// Live readers all wait at the stream's previous tail, and all read with the same chunk limit
/// (`ds.max_chunk_bytes`). Putting the chunk they are about to read into the chunk cache before
/// waking them lets every one of them, the first included, answer from memory: no trip to the
/// blocking pool, no log scan, and no race of several readers missing the cache at once.
pub(crate) struct LiveChunks {
    pub(crate) cache: Arc<ChunkCache>,
    pub(crate) max_bytes: usize,
}

pub(crate) type Done = oneshot::Sender<Result<WriteOutcome, WriteError>>;

/// What one request asks of the writer.
pub(crate) enum Op {
    /// `POST /_broadcast`: messages to one or more streams, all or none.
    Broadcast(Vec<NewMessage>),
    /// A Durable Streams write to one stream.
    Write { stream: Arc<str>, op: WriteOp },
    /// Remove the stream if it has expired (`Stream-TTL`, `Stream-Expires-At`); found by a
    /// request or by the expiry sweep. Answers `Deleted` or `NotFound`.
    Expire { stream: Arc<str> },
}

impl Op {
    /// Ops that create or remove a stream are committed alone (see `ops.rs`).
    fn is_structural(&self) -> bool {
        matches!(self, Op::Write { op: WriteOp::Create { .. } | WriteOp::Delete, .. } | Op::Expire { .. })
    }
}

struct Request {
    op: Op,
    /// What the request counts against `max_queued_bytes` until the writer takes it.
    bytes: usize,
    done: Done,
}

pub(crate) struct Writer {
    sender: mpsc::Sender<Request>,
    thread: JoinHandle<()>,
    queue: Arc<QueueBudget>,
}

/// Bytes of broadcasts handed to the writer and not taken yet (`storage.max_queued_bytes`).
pub(crate) struct QueueBudget {
    pub(crate) bytes: AtomicUsize,
    pub(crate) max: usize,
}

/// Streams the retention task found fully expired; the writer removes them (it is the only
/// code that may, see [`State::remove_expired`]).
pub(crate) type Removals = Arc<Mutex<Vec<(Arc<str>, u64)>>>;

/// Streams a group creates: name, id and stream record.
type Created = Vec<(Arc<str>, u64, StreamRecord)>;

/// What the writer needs beyond the database: shared with `Storage`.
pub(crate) struct Shared {
    pub(crate) streams_created: Arc<AtomicU64>,
    pub(crate) slot: Arc<DbSlot>,
    pub(crate) epoch: Epoch,
    pub(crate) cache: Arc<StreamCache>,
    pub(crate) hub: Hub,
    pub(crate) failed: Arc<AtomicBool>,
    /// The store's sequence floor (see `keys::META_SEQ_FLOOR`); raised by the writer only.
    pub(crate) seq_floor: Arc<AtomicU64>,
    pub(crate) removals: Removals,
    pub(crate) retention: Retention,
    /// Most stream entries kept in memory (`storage.max_streams_loaded`).
    pub(crate) max_streams_loaded: usize,
    /// How long tombstones are kept (`storage.tombstone_ttl`, ms; 0: none are made).
    pub(crate) tombstone_ttl_ms: u64,
}

/// What the writer thread owns.
struct State {
    /// Ids handed out so far, for the streams metric (`next_stream_id - 1` once applied).
    streams_created: Arc<AtomicU64>,
    slot: Arc<DbSlot>,
    epoch: Epoch,
    cache: Arc<StreamCache>,
    hub: Hub,
    failed: Arc<AtomicBool>,
    seq_floor: Arc<AtomicU64>,
    removals: Removals,
    retention: Retention,
    max_streams_loaded: usize,
    tombstone_ttl_ms: u64,
    /// When removals and eviction last ran (at most once per `MAINTENANCE_INTERVAL`).
    last_maintenance: Instant,
    last_idle_sweep: Instant,
    next_stream_id: u64,
    /// `storage.fsync`: flush before answering (off is unsafe: answer right after the apply).
    fsync: bool,
    /// When recovery was last tried (at most once per `RECOVERY_INTERVAL`).
    last_recovery: Option<std::time::Instant>,
    live: LiveChunks,
    queue: Arc<QueueBudget>,
}

impl Writer {
    pub(crate) fn start(
        shared: Shared,
        next_stream_id: u64,
        fsync: bool,
        live: LiveChunks,
        queue: Arc<QueueBudget>,
    ) -> Writer {
        shared.streams_created.store(next_stream_id - 1, Ordering::Relaxed);
        let state = State {
            streams_created: shared.streams_created,
            slot: shared.slot,
            epoch: shared.epoch,
            cache: shared.cache,
            hub: shared.hub,
            failed: shared.failed,
            seq_floor: shared.seq_floor,
            removals: shared.removals,
            retention: shared.retention,
            max_streams_loaded: shared.max_streams_loaded,
            tombstone_ttl_ms: shared.tombstone_ttl_ms,
            last_maintenance: Instant::now(),
            last_idle_sweep: Instant::now(),
            next_stream_id,
            fsync,
            last_recovery: None,
            live,
            queue: queue.clone(),
        };
        let (sender, receiver) = mpsc::channel::<Request>();
        let thread = std::thread::Builder::new()
            .name("ds-writer".into())
            .spawn(move || run(state, receiver))
            .expect("spawn writer thread");
        Writer { sender, thread, queue }
    }

    /// Queues a request; the receiver answers once it is durable (or refused). Refused with
    /// [`StorageError::Busy`] while `max_queued_bytes` are waiting for the writer.
    pub(crate) fn submit(&self, op: Op) -> Result<oneshot::Receiver<Result<WriteOutcome, WriteError>>, StorageError> {
        let bytes = match &op {
            Op::Broadcast(messages) => messages.iter().map(|m| m.json.len() + m.stream.len()).sum::<usize>(),
            Op::Write { stream, op } => stream.len() + ops::op_bytes(op),
            Op::Expire { stream } => stream.len(),
        };
        let queued = self.queue.bytes.fetch_add(bytes, Ordering::AcqRel) + bytes;
        // A request larger than the whole budget still goes through when nothing else waits.
        if queued > self.queue.max && queued > bytes {
            self.queue.bytes.fetch_sub(bytes, Ordering::AcqRel);
            crate::metrics::get().writer_queue_refused.inc();
            return Err(StorageError::Busy);
        }
        let (done, receiver) = oneshot::channel();
        self.sender.send(Request { op, bytes, done }).map_err(|_| {
            self.queue.bytes.fetch_sub(bytes, Ordering::AcqRel);
            StorageError::Closed
        })?;
        Ok(receiver)
    }

    /// Finishes the queued requests and joins the thread.
    pub(crate) fn stop(self) {
        drop(self.sender);
        let _ = self.thread.join();
    }
}

/// Whether every request of `group` is stored in a single key (so plain inserts keep each
/// request atomic): no stream is created, no metadata changes, each stream's messages make one
/// record, and no request names two streams.
fn each_request_in_one_key(group: &[Request], runs: usize, records: usize, writes_more_keys: bool) -> bool {
    !writes_more_keys
        && records == runs
        && group.iter().all(|r| match &r.op {
            Op::Broadcast(messages) => messages.iter().all(|m| m.stream == messages[0].stream),
            _ => true,
        })
}

/// How often a failed store checks whether the disk takes writes again.
const RECOVERY_INTERVAL: Duration = Duration::from_secs(1);
/// How often the writer removes expired streams and evicts idle stream entries.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(1);
/// Most expired streams removed per maintenance tick.
const REMOVALS_PER_TICK: usize = 5_000;
/// Streams removed per sled batch. Applying a batch takes sled's concurrency-control lock
/// exclusively, so every read waits for it: one batch of 100,000 removals stalled reads for
/// over 10 s (issue 23's mass-expiry runs).
const REMOVALS_PER_BATCH: usize = 500;
/// Most entries of the expiry index handled per maintenance tick.
const EXPIRIES_PER_TICK: usize = 1_000;
/// Most tombstones swept per maintenance tick.
const TOMBSTONES_PER_TICK: usize = 1_000;
/// How often idle stream entries and chunks are looked for.
const IDLE_SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// A stream entry (or a cached chunk) unused for this long leaves memory (unless somebody
/// watches the stream).
const STREAM_IDLE: Duration = Duration::from_secs(30);

fn run(mut state: State, receiver: mpsc::Receiver<Request>) {
    loop {
        match receiver.recv_timeout(RECOVERY_INTERVAL) {
            Ok(first) => {
                let mut taken = vec![first];
                taken.extend(receiver.try_iter().take(MAX_GROUP_REQUESTS - 1));
                let bytes: usize = taken.iter().map(|r| r.bytes).sum();
                state.queue.bytes.fetch_sub(bytes, Ordering::AcqRel);
                // Requests that create or remove a stream are committed alone; the appends
                // around them form groups, in arrival order.
                let mut group = Vec::new();
                for request in taken {
                    if request.op.is_structural() {
                        state.commit_and_answer(std::mem::take(&mut group));
                        state.commit_and_answer(vec![request]);
                    } else {
                        group.push(request);
                    }
                }
                state.commit_and_answer(group);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => state.recover_if_failed(),
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        // Between groups every applied message is durable and published: the moment at which
        // entries may be evicted and streams removed (see `cache.rs`).
        state.maintain();
    }
}

impl State {
    fn commit_and_answer(&mut self, group: Vec<Request>) {
        if group.is_empty() {
            return;
        }
        let results = self.commit(&group);
        for (request, result) in group.into_iter().zip(results) {
            // The client may have gone away meanwhile; what was stored stays stored.
            let _ = request.done.send(result);
        }
    }

    /// Applies, flushes and publishes one group; one answer per request.
    fn commit(&mut self, group: &[Request]) -> Vec<Result<WriteOutcome, WriteError>> {
        let failed = |e: StorageError| vec![Err(WriteError::Storage(e)); group.len()];
        if self.failed.load(Ordering::Acquire) {
            self.recover_if_failed();
        }
        if self.failed.load(Ordering::Acquire) {
            // Nothing is accepted until the store was reopened (see `slot.rs`).
            return failed(StorageError::Recovering);
        }
        let db = match self.slot.get() {
            Ok(db) => db,
            Err(e) => return failed(e),
        };
        let started = std::time::Instant::now();
        let applied = match self.apply(&db, group) {
            Ok(applied) => applied,
            Err(e) => return failed(e),
        };
        crate::metrics::get().append_seconds.observe(started.elapsed().as_secs_f64());
        if self.fsync && applied.wrote {
            if let Err(e) = self.flush(&db, group.len()) {
                return failed(e);
            }
        }
        self.publish(applied.runs, applied.metas, applied.removed);
        applied.results.into_iter().map(|r| r.map_err(WriteError::Refused)).collect()
    }

    /// Makes what a durable group wrote visible: new tails first, then metadata (a reader
    /// that sees a close then reads the tail sees every message before it), then removals.
    fn publish(&self, runs: Vec<Run>, metas: Vec<(Arc<StreamEntry>, crate::meta::SharedMeta)>, removed: Vec<Arc<str>>) {
        for run in runs {
            self.prefill_live_chunk(&run);
            if metas.iter().any(|(entry, _)| Arc::ptr_eq(entry, &run.entry)) {
                // Woken below, once the metadata is out too: a reader woken by an
                // append-and-close sees the messages and the close together.
                run.entry.raise_visible(run.last_seq);
            } else {
                run.entry.publish(run.last_seq, &self.hub);
            }
        }
        for (entry, meta) in metas {
            entry.publish_meta(meta, &self.hub);
        }
        for name in removed {
            self.cache.remove(&name);
            // Live readers read again, and find the stream gone.
            self.hub.wake(&name, 0);
        }
    }

    /// After a failed write: reopen the store once the disk takes data again, and bring every
    /// stream in memory back to what is on disk.
    fn recover_if_failed(&mut self) {
        if !self.failed.load(Ordering::Acquire) || self.last_recovery.is_some_and(|at| at.elapsed() < RECOVERY_INTERVAL)
        {
            return;
        }
        self.last_recovery = Some(std::time::Instant::now());
        let Some(db) = self.slot.reopen() else { return };
        match super::migrate::prepare(&db) {
            Ok(store) if store.epoch == self.epoch => {
                self.next_stream_id = self.next_stream_id.max(store.next_stream_id)
            }
            refused => {
                // Cannot happen for the same directory; keep serving reads, refuse writes.
                log::error!("storage: the reopened store does not match ({:?}); staying read-only", refused.err());
                self.slot.put(db);
                return;
            }
        }
        // Messages applied but never flushed before the failure are gone: allocation restarts
        // from the durable tail. Nothing past `visible` was ever shown, and what became durable
        // on its own is published now.
        let refreshed = self.cache.for_each(|entry| {
            let last = super::cache::stored_tail(&db, entry.id).map_or(0, |tail| tail.last_seq);
            let last = last.max(entry.visible.load(Ordering::Acquire));
            entry.allocated.store(last, Ordering::Release);
            entry.publish(last, &self.hub);
        });
        // Streams created in memory but never made durable are forgotten with their ids.
        self.cache.retain(|entry| {
            entry.visible.load(Ordering::Acquire) > 0 || db.get(keys::stream_key(entry.id)).ok().flatten().is_some()
        });
        self.slot.put(db);
        self.failed.store(false, Ordering::Release);
        log::warn!("storage: writable again ({refreshed} stream(s) in memory refreshed)");
    }

    fn flush(&self, db: &sled::Db, requests: usize) -> Result<(), StorageError> {
        let started = std::time::Instant::now();
        let result = db
            .flush()
            .map(drop)
            .map_err(|e| StorageError::Flush(e.to_string()))
            .and_then(|()| self.slot.sync_log().map_err(|e| StorageError::Flush(e.to_string())));
        crate::metrics::observe_flush(started.elapsed(), requests);
        if let Err(e) = &result {
            self.failed.store(true, Ordering::Release);
            log::error!("flush failed, {requests} broadcast(s) not acknowledged: {e}");
        }
        result
    }

    /// Caches the chunk that live readers of `run`'s stream will read next (see [`LiveChunks`]),
    /// exactly as `Storage::scan` would build it; skipped when nobody watches the stream, or
    /// when such a read would not return exactly this run.
    fn prefill_live_chunk(&self, run: &Run) {
        let count = run.messages.len();
        let after = run.last_seq - count as u64;
        let framing = run.entry.meta().framing();
        let message_bytes: usize = run.messages.iter().map(Bytes::len).sum();
        // `Storage::scan` always takes the first message, then stops before one that would
        // take the body past the limit.
        let fits = count == 1 || crate::framing::framed_len(framing, count, message_bytes) <= self.live.max_bytes;
        // (A batch longer than the retention count limit needs no check: reads at `after` are
        // then answered 410 before the cache is consulted.)
        let readers_wait_at_after = run.entry.visible.load(Ordering::Acquire) == after;
        if !fits || !readers_wait_at_after || !self.hub.is_watched(&run.entry.name) {
            return;
        }
        let mut body = crate::framing::Framer::new(framing, crate::framing::framed_len(framing, count, message_bytes));
        for message in &run.messages {
            body.push(message);
        }
        let chunk = Chunk {
            body: body.finish(),
            count,
            start: Position { epoch: self.epoch, seq: after },
            next: Position { epoch: self.epoch, seq: run.last_seq },
            up_to_date: true,
            meta: None,
        };
        let cached = CachedChunk { chunk, last: run.last_seq, first_timestamp_ms: run.timestamp_ms, full: false };
        self.live.cache.put(run.entry.id, after, self.live.max_bytes, cached);
    }

    /// Makes a new stream's entry; `apply` writes its name and stream record. Its numbers
    /// start above the store's sequence floor, so a stream that existed before under this
    /// name (and was removed) never hands out one of its old tokens again.
    /// A stream that retention removed continues after its old tail (see `tombstones.rs`).
    fn create(&mut self, db: &sled::Db, stream: &str, created: &mut Created) -> Result<Arc<StreamEntry>, StorageError> {
        let tombstone = super::tombstones::get(db, stream)?;
        let floor = self.seq_floor.load(Ordering::Acquire);
        let (base, prev_tail) = Tombstone::next_life(tombstone.as_ref(), floor, NextLife::Broadcast);
        let id = self.next_stream_id;
        self.next_stream_id += 1;
        let tail = StoredTail { last_seq: base, newest_timestamp_ms: 0, base, prev_tail };
        let entry = Arc::new(StreamEntry::new(Arc::from(stream), id, tail));
        self.cache.insert(entry.clone());
        let record = StreamRecord { prev_tail, ..StreamRecord::with_base(base) };
        created.push((entry.name.clone(), id, record));
        Ok(entry)
    }

    /// Drops the entries of streams whose creating batch was not applied.
    fn forget(&self, created: &Created) {
        for (name, _, _) in created {
            self.cache.remove(name);
        }
    }

    /// Removes the streams retention found expired, and evicts idle stream entries; at most
    /// once per [`MAINTENANCE_INTERVAL`].
    fn maintain(&mut self) {
        if self.last_maintenance.elapsed() < MAINTENANCE_INTERVAL || self.failed.load(Ordering::Acquire) {
            return;
        }
        self.last_maintenance = Instant::now();
        let candidates = {
            let mut removals = self.removals.lock().expect("removals lock");
            // At most REMOVALS_PER_TICK per tick: broadcasts wait while the writer removes.
            // The rest stay for the next tick, unless retention's next pass replaced the list
            // meanwhile (its view then holds whatever is still to remove).
            let now = removals.len().min(REMOVALS_PER_TICK);
            let rest = removals.split_off(now);
            std::mem::replace(&mut *removals, rest)
        };
        // One sled batch per REMOVALS_PER_BATCH streams, so reads get sled's lock in between.
        for chunk in candidates.chunks(REMOVALS_PER_BATCH) {
            match self.slot.get().and_then(|db| self.remove_expired(&db, chunk.to_vec())) {
                Ok(0) => {}
                Ok(n) => log::debug!("removed {n} expired stream(s)"),
                Err(e) => {
                    log::error!("removing expired streams failed: {e}");
                    break;
                }
            }
        }
        match self.slot.get().and_then(|db| self.sweep_expired(&db, EXPIRIES_PER_TICK)) {
            Ok(0) => {}
            Ok(n) => log::debug!("removed {n} stream(s) past their TTL or Expires-At"),
            Err(e) => log::error!("sweeping expired streams failed: {e}"),
        }
        if self.tombstone_ttl_ms > 0 {
            let before = now_ms().saturating_sub(self.tombstone_ttl_ms);
            match self.slot.get().and_then(|db| tombstones::sweep(&db, before, TOMBSTONES_PER_TICK)) {
                Ok(0) => {}
                Ok(n) => log::debug!("swept {n} tombstone(s)"),
                Err(e) => log::error!("sweeping tombstones failed: {e}"),
            }
        }
        // Idle sweeps walk every entry (under the caches' locks), so they run less often; the
        // cap is checked every time (a length is cheap).
        let (idle_before, expired_chunks) = if self.last_idle_sweep.elapsed() >= IDLE_SWEEP_INTERVAL {
            self.last_idle_sweep = Instant::now();
            let idle_before = now_ms().saturating_sub(STREAM_IDLE.as_millis() as u64);
            (idle_before, self.live.cache.expire_idle(idle_before))
        } else if self.cache.len() > self.max_streams_loaded {
            (0, 0)
        } else {
            return;
        };
        let hub = &self.hub;
        let evicted = self.cache.evict(idle_before, self.max_streams_loaded, |e| hub.is_watched(&e.name));
        if evicted > 0 {
            crate::metrics::get().streams_evicted.inc_by(evicted as u64);
        }
        if evicted + expired_chunks >= 1000 {
            release_freed_memory();
        }
    }

    /// Removes streams whose every message has expired and that nobody watches: their name,
    /// stream record and any record retention left. The store's sequence floor is raised to
    /// their tail first (in memory, then in the same batch), so a token of a removed stream
    /// stays valid for its holders (`Storage::read`) and a new stream under the same name
    /// starts above it. Only the writer may do this: it is the only appender, so nothing can
    /// be written to a stream between the check and the removal.
    fn remove_expired(&mut self, db: &sled::Db, candidates: Vec<(Arc<str>, u64)>) -> Result<usize, StorageError> {
        let max_age_ms = self.retention.max_age.as_millis() as u64;
        if max_age_ms == 0 {
            return Ok(0);
        }
        let expired_before = now_ms().saturating_sub(max_age_ms);
        let mut batch = sled::Batch::default();
        let mut removed = Vec::new();
        let mut floor = self.seq_floor.load(Ordering::Acquire);
        for (name, id) in candidates {
            if self.hub.is_watched(&name) {
                continue;
            }
            let still_this_stream = db.get(keys::name_key(&name))?.and_then(|v| keys::decode_u64(&v)) == Some(id);
            let cached = self.cache.peek(&name);
            let written_since = cached
                .as_ref()
                .is_some_and(|e| e.id != id || e.last_timestamp_ms.load(Ordering::Acquire) >= expired_before);
            let tail = super::cache::stored_tail(db, id)?;
            if !still_this_stream || written_since || tail.newest_timestamp_ms >= expired_before {
                continue;
            }
            floor = floor.max(tail.last_seq);
            ops::remove_stream_keys(db, &mut batch, &name, id)?;
            // A broadcast may revive it: readers at its tail then read on (tombstones.rs).
            let tombstone = Tombstone { last_seq: tail.last_seq, removed_ms: now_ms(), ending: Ending::Continues };
            tombstones::bury(db, &mut batch, &name, tombstone, self.tombstone_ttl_ms)?;
            removed.push(name);
        }
        if removed.is_empty() {
            return Ok(0);
        }
        // Raised before the names go: a reader that finds the stream gone already accepts its
        // tokens (see `Storage::read`).
        self.seq_floor.fetch_max(floor, Ordering::AcqRel);
        batch.insert(keys::META_SEQ_FLOOR, &keys::encode_u64(floor)[..]);
        db.apply_batch(batch)?;
        for name in &removed {
            self.cache.remove(name);
        }
        crate::metrics::get().streams_removed.inc_by(removed.len() as u64);
        Ok(removed.len())
    }
}

/// Gives memory freed by a large eviction back to the operating system (glibc keeps freed
/// heap pages otherwise, so RSS would stay at its high-water mark).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(streams: &[&str]) -> Request {
        let messages = streams.iter().map(|s| NewMessage { stream: (*s).into(), json: Bytes::from_static(b"1") });
        Request { op: Op::Broadcast(messages.collect()), bytes: 0, done: oneshot::channel().0 }
    }

    #[test]
    fn plain_inserts_only_when_each_request_is_one_key() {
        let single = [request(&["a"]), request(&["b", "b"]), request(&["a"])];
        assert!(each_request_in_one_key(&single, 2, 2, false));
        assert!(!each_request_in_one_key(&single, 2, 2, true), "creating a stream writes several keys");
        assert!(!each_request_in_one_key(&single, 2, 3, false), "a stream's messages cut into two records");
        let spanning = [request(&["a"]), request(&["a", "b"])];
        assert!(!each_request_in_one_key(&spanning, 2, 2, false), "a request naming two streams");
    }
}
