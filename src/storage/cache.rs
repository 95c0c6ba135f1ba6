//! The in-memory stream entries: loaded lazily, never evicted while the process runs.
//!
//! The writer inserts a new stream's entry *before* applying the batch that creates it, so a
//! reader that loads the stream from sled concurrently always ends up sharing the writer's
//! entry and never publishes a tail that is not durable yet.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use super::keys::{self, StreamRecord};
use super::{corrupt, StorageError};
use crate::hub::Hub;

/// In-memory state of one stream.
#[derive(Debug)]
pub(crate) struct StreamEntry {
    pub(crate) name: Arc<str>,
    pub(crate) id: u64,
    /// Last sequence number written to sled (changed only by the writer thread).
    pub(crate) allocated: AtomicU64,
    /// Last sequence number that is durable; readers never read past it.
    pub(crate) visible: AtomicU64,
    /// Timestamp of the newest message; new messages never get an older one, so per-stream
    /// timestamps are monotonic even if the wall clock steps back, and age-based retention
    /// can stop at the first message young enough.
    pub(crate) last_timestamp_ms: AtomicU64,
}

impl StreamEntry {
    pub(crate) fn new(name: Arc<str>, id: u64, last_seq: u64, last_timestamp_ms: u64) -> StreamEntry {
        StreamEntry {
            name,
            id,
            allocated: AtomicU64::new(last_seq),
            visible: AtomicU64::new(last_seq),
            last_timestamp_ms: AtomicU64::new(last_timestamp_ms),
        }
    }

    /// Makes messages up to `seq` readable and wakes the stream's live readers.
    pub(crate) fn publish(&self, seq: u64, hub: &Hub) {
        let previous = self.visible.fetch_max(seq, Ordering::AcqRel);
        if seq > previous {
            hub.wake(&self.name, seq);
        }
    }
}

/// A stream's last sequence number and newest timestamp as stored: the newest log record's,
/// or the stream record's `last_seq` once retention has deleted every record.
pub(crate) fn durable_tail(db: &sled::Db, id: u64) -> Result<(u64, u64), StorageError> {
    let floor = match db.get(keys::stream_key(id))? {
        Some(bytes) => StreamRecord::decode(&bytes).ok_or_else(|| corrupt("stream record"))?.last_seq,
        None => 0,
    };
    match db.range(keys::record_key(id, 0)..=keys::record_key(id, u64::MAX)).next_back() {
        Some(item) => {
            let (key, value) = item?;
            let record = keys::LogRecord::parse(&key, &value).ok_or_else(|| corrupt("log record"))?;
            Ok((record.last_seq().max(floor), record.timestamp_ms))
        }
        None => Ok((floor, 0)),
    }
}

#[derive(Default)]
pub(crate) struct StreamCache {
    entries: RwLock<HashMap<Arc<str>, Arc<StreamEntry>>>,
}

impl StreamCache {
    /// The stream's entry: cached, or loaded from sled; `None` if the stream was never written.
    pub(crate) fn get_or_load(&self, db: &sled::Db, stream: &str) -> Result<Option<Arc<StreamEntry>>, StorageError> {
        if let Some(entry) = self.entries.read().expect("stream cache lock").get(stream) {
            return Ok(Some(entry.clone()));
        }
        let Some(id) = db.get(keys::name_key(stream))? else {
            return Ok(None);
        };
        let id = keys::decode_u64(&id).ok_or_else(|| corrupt("stream id"))?;
        let (last_seq, last_timestamp) = durable_tail(db, id)?;
        let name: Arc<str> = Arc::from(stream);
        let entry = Arc::new(StreamEntry::new(name.clone(), id, last_seq, last_timestamp));
        let mut entries = self.entries.write().expect("stream cache lock");
        Ok(Some(entries.entry(name).or_insert(entry).clone()))
    }

    /// The stream's entry if it is in memory (never touches sled).
    pub(crate) fn get(&self, stream: &str) -> Option<Arc<StreamEntry>> {
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

    pub(crate) fn len(&self) -> usize {
        self.entries.read().expect("stream cache lock").len()
    }
}
