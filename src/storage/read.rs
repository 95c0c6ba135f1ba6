//! The read path of the embedded engine: a stream's messages after a position, from the
//! chunk cache when it can, else from a sled range scan; the rules for positions from an
//! earlier life of a stream (tombstones), AnyCable's retention window, and a fork's read
//! before its fork point (answered as [`Level::Inherit`], see `forks.rs`).

use std::sync::atomic::Ordering;

use super::{cache, chunks, corrupt, keys, now_ms, tombstones, Chunk, Level, ReadError, Storage, StorageError};
use crate::framing::Framer;
use crate::meta::Framing;
use crate::offset::Offset;

impl Storage {
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
    pub(super) fn buried_tail(&self, stream: &str) -> Result<u64, StorageError> {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::hub::Hub;
    use crate::offset::Position;
    use crate::storage::{NewMessage, Retention, StorageOptions};

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
