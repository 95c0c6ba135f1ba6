//! The in-memory stream entries: loaded lazily, evicted when idle.
//!
//! The writer inserts a new stream's entry *before* applying the batch that creates it, so a
//! reader that loads the stream from sled concurrently always ends up sharing the writer's
//! entry and never publishes a tail that is not durable yet.
//!
//! Eviction keeps that true: it runs on the writer thread only, between two groups, when every
//! applied message is durable and published (`allocated == visible` for every entry). A
//! stream loaded again after that reads a durable tail from sled; the next append to it loads
//! (and inserts) the entry before it applies anything, exactly as for a stream never loaded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::keys::{self, StreamRecord};
use super::{corrupt, now_ms, StorageError};
use crate::hub::Hub;
use crate::meta::{SharedMeta, StreamMeta};

/// In-memory state of one stream.
#[derive(Debug)]
pub(crate) struct StreamEntry {
    pub(crate) name: Arc<str>,
    pub(crate) id: u64,
    /// Positions up to `base` are before this life of the stream (see `StreamRecord::base`).
    pub(crate) base: u64,
    /// The previous life's tail, when this life continues it (see `StreamRecord::prev_tail`).
    pub(crate) prev_tail: Option<u64>,
    /// Last sequence number written to sled (changed only by the writer thread).
    pub(crate) allocated: AtomicU64,
    /// Last sequence number that is durable; readers never read past it.
    pub(crate) visible: AtomicU64,
    /// Timestamp of the newest message; new messages never get an older one, so per-stream
    /// timestamps are monotonic even if the wall clock steps back, and age-based retention
    /// can stop at the first message young enough.
    pub(crate) last_timestamp_ms: AtomicU64,
    /// When the entry was last looked up (for idle eviction).
    last_used_ms: AtomicU64,
    /// The stream's metadata as durable: the writer replaces it after the flush that made a
    /// change durable, and after raising `visible` (so a reader that sees "closed" and then
    /// reads the tail sees every message written before the close).
    meta: RwLock<SharedMeta>,
    /// The last read or write (ms), for a sliding `Stream-TTL`. In memory only: a restart
    /// counts as an access (a stream may outlive its TTL by the downtime, never die early).
    pub(crate) last_access_ms: AtomicU64,
}

impl StreamEntry {
    pub(crate) fn new(name: Arc<str>, id: u64, tail: StoredTail) -> StreamEntry {
        StreamEntry::with_meta(name, id, tail, Arc::new(StreamMeta::default()))
    }

    pub(crate) fn with_meta(name: Arc<str>, id: u64, tail: StoredTail, meta: SharedMeta) -> StreamEntry {
        StreamEntry {
            meta: RwLock::new(meta),
            last_access_ms: AtomicU64::new(now_ms()),
            name,
            id,
            base: tail.base,
            prev_tail: tail.prev_tail,
            allocated: AtomicU64::new(tail.last_seq),
            visible: AtomicU64::new(tail.last_seq),
            last_timestamp_ms: AtomicU64::new(tail.newest_timestamp_ms),
            last_used_ms: AtomicU64::new(now_ms()),
        }
    }

    /// Makes messages up to `seq` readable and wakes the stream's live readers.
    pub(crate) fn publish(&self, seq: u64, hub: &Hub) {
        if self.raise_visible(seq) {
            hub.wake(&self.name, seq);
        }
    }

    /// Makes messages up to `seq` readable without waking anybody (the caller wakes them);
    /// whether the tail moved.
    pub(crate) fn raise_visible(&self, seq: u64) -> bool {
        seq > self.visible.fetch_max(seq, Ordering::AcqRel)
    }

    pub(crate) fn meta(&self) -> SharedMeta {
        self.meta.read().expect("stream meta lock").clone()
    }

    /// Publishes durable metadata and wakes the stream's live readers (a close moves no tail,
    /// and they must learn of it). Writer thread only, after the flush.
    pub(crate) fn publish_meta(&self, meta: SharedMeta, hub: &Hub) {
        *self.meta.write().expect("stream meta lock") = meta;
        hub.wake(&self.name, self.visible.load(Ordering::Acquire));
    }

    /// Whether the stream has expired (`Stream-TTL`, `Stream-Expires-At`) at `now`.
    pub(crate) fn expired(&self, meta: &StreamMeta, now: u64) -> bool {
        meta.expires() && meta.expired(now, self.last_access_ms.load(Ordering::Acquire))
    }

    /// A read or write renews a sliding TTL (HEAD does not).
    pub(crate) fn renew(&self, now: u64) {
        self.last_access_ms.fetch_max(now, Ordering::AcqRel);
    }

    fn touch(&self) {
        self.last_used_ms.store(now_ms(), Ordering::Relaxed);
    }
}

/// What sled holds about a stream's end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StoredTail {
    /// The newest log record's last seq, or the stream record's `last_seq` once retention
    /// deleted every record (whichever is larger).
    pub(crate) last_seq: u64,
    /// The newest record's timestamp (0 without records).
    pub(crate) newest_timestamp_ms: u64,
    pub(crate) base: u64,
    pub(crate) prev_tail: Option<u64>,
}

/// A stream's tail as stored. Includes records applied but not flushed yet: callers that must
/// only see durable data compare with the entry's `visible` tail (see `retention.rs`).
pub(crate) fn stored_tail(db: &sled::Db, id: u64) -> Result<StoredTail, StorageError> {
    let record = match db.get(keys::stream_key(id))? {
        Some(bytes) => StreamRecord::decode(&bytes).ok_or_else(|| corrupt("stream record"))?,
        None => StreamRecord::new(),
    };
    let mut tail = StoredTail {
        last_seq: record.last_seq,
        newest_timestamp_ms: 0,
        base: record.base,
        prev_tail: record.prev_tail,
    };
    if let Some(item) = db.range(keys::record_key(id, 0)..=keys::record_key(id, u64::MAX)).next_back() {
        let (key, value) = item?;
        let newest = keys::LogRecord::parse(&key, &value).ok_or_else(|| corrupt("log record"))?;
        tail.last_seq = tail.last_seq.max(newest.last_seq());
        tail.newest_timestamp_ms = newest.timestamp_ms;
    }
    Ok(tail)
}

/// A stream's metadata as stored (the defaults of a broadcast stream if it has none).
pub(crate) fn stored_meta(db: &sled::Db, id: u64) -> Result<StreamMeta, StorageError> {
    match db.get(keys::meta_key(id))? {
        Some(bytes) => StreamMeta::decode(&bytes).ok_or_else(|| corrupt("stream metadata")),
        None => Ok(StreamMeta::default()),
    }
}

#[derive(Default)]
pub(crate) struct StreamCache {
    entries: RwLock<HashMap<Arc<str>, Arc<StreamEntry>>>,
}

impl StreamCache {
    /// The stream's entry: cached, or loaded from sled; `None` if the stream does not exist.
    pub(crate) fn get_or_load(&self, db: &sled::Db, stream: &str) -> Result<Option<Arc<StreamEntry>>, StorageError> {
        if let Some(entry) = self.get(stream) {
            return Ok(Some(entry));
        }
        let Some(id) = db.get(keys::name_key(stream))? else {
            return Ok(None);
        };
        let id = keys::decode_u64(&id).ok_or_else(|| corrupt("stream id"))?;
        let tail = stored_tail(db, id)?;
        let meta = stored_meta(db, id)?;
        let name: Arc<str> = Arc::from(stream);
        let entry = Arc::new(StreamEntry::with_meta(name.clone(), id, tail, Arc::new(meta)));
        let mut entries = self.entries.write().expect("stream cache lock");
        Ok(Some(entries.entry(name).or_insert(entry).clone()))
    }

    /// The stream's entry if it is in memory (never touches sled).
    pub(crate) fn get(&self, stream: &str) -> Option<Arc<StreamEntry>> {
        let entry = self.entries.read().expect("stream cache lock").get(stream).cloned()?;
        entry.touch();
        Some(entry)
    }

    /// [`StreamCache::get`] without counting as a use (for background tasks).
    pub(crate) fn peek(&self, stream: &str) -> Option<Arc<StreamEntry>> {
        self.entries.read().expect("stream cache lock").get(stream).cloned()
    }

    pub(crate) fn insert(&self, entry: Arc<StreamEntry>) {
        self.entries.write().expect("stream cache lock").insert(entry.name.clone(), entry);
    }

    pub(crate) fn remove(&self, name: &str) {
        self.entries.write().expect("stream cache lock").remove(name);
    }

    /// Calls `f` on every entry; returns how many there were.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&Arc<StreamEntry>)) -> usize {
        let entries = self.entries.read().expect("stream cache lock");
        entries.values().for_each(&mut f);
        entries.len()
    }

    /// Keeps only the entries for which `keep` is true.
    pub(crate) fn retain(&self, mut keep: impl FnMut(&StreamEntry) -> bool) {
        self.entries.write().expect("stream cache lock").retain(|_, entry| keep(entry));
    }

    /// Drops entries unused since `idle_before_ms`, then, while more than `max_entries`
    /// remain, the least recently used ones; `pinned` entries always stay. Returns how many
    /// went. Writer thread only (see the module docs).
    pub(crate) fn evict(
        &self,
        idle_before_ms: u64,
        max_entries: usize,
        pinned: impl Fn(&StreamEntry) -> bool,
    ) -> usize {
        let mut entries = self.entries.write().expect("stream cache lock");
        let before = entries.len();
        entries.retain(|_, e| e.last_used_ms.load(Ordering::Relaxed) >= idle_before_ms || pinned(e));
        if entries.len() > max_entries {
            // Cut to 90% of the cap, so a full cache is not swept on every call.
            let target = max_entries - max_entries / 10;
            let mut by_age: Vec<(u64, Arc<str>)> = entries
                .values()
                .filter(|e| !pinned(e))
                .map(|e| (e.last_used_ms.load(Ordering::Relaxed), e.name.clone()))
                .collect();
            by_age.sort_unstable_by_key(|(used, _)| *used);
            let excess = entries.len().saturating_sub(target);
            for (_, name) in by_age.into_iter().take(excess) {
                entries.remove(&name);
            }
        }
        let evicted = before - entries.len();
        if evicted > 0 && entries.capacity() > 4 * entries.len().max(1024) {
            entries.shrink_to_fit();
        }
        evicted
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.read().expect("stream cache lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, id: u64) -> Arc<StreamEntry> {
        Arc::new(StreamEntry::new(Arc::from(name), id, StoredTail::default()))
    }

    #[test]
    fn idle_entries_go_then_the_least_recently_used_beyond_the_cap() {
        let cache = StreamCache::default();
        for i in 0..10 {
            let e = entry(&format!("s{i}"), i);
            e.last_used_ms.store(1000 + i, Ordering::Relaxed);
            cache.insert(e);
        }
        // Idle before 1003: s0, s1, s2 go, except the pinned s1.
        assert_eq!(cache.evict(1003, 100, |e| &*e.name == "s1"), 2);
        assert_eq!(cache.len(), 8);
        assert!(cache.get("s1").is_some() && cache.get("s0").is_none());
        // s1 was just used (get touches it). Cap 5 cuts to 90% of it (5 - 0 = 5): the oldest go.
        assert_eq!(cache.evict(0, 5, |_| false), 3);
        let kept: Vec<bool> = ["s1", "s3", "s4", "s5", "s9"].iter().map(|s| cache.get(s).is_some()).collect();
        assert_eq!(kept, [true, false, false, false, true]);
        assert_eq!(cache.len(), 5);
    }
}
