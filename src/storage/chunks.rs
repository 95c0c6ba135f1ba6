//! A cache of recently read chunks, so repeated reads of the same range, such as many live
//! readers woken at the same position, or many clients catching up from `-1`, cost one log
//! scan and then a reference-counted buffer each.
//!
//! A chunk's bytes never change (messages are immutable), so an entry stays correct for as
//! long as retention has not removed its first message and, for a chunk that reached the tail
//! when it was read, the tail has not moved. `Storage::read` checks both before using one.
//! Entries are keyed by (stream id, position read after, chunk limit) and evicted oldest-first
//! once the cache holds more than its byte budget. An entry counts its body plus
//! [`ENTRY_OVERHEAD`], so many tiny chunks (one per stream of many streams) cannot hold much
//! more memory than the budget says.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use super::Chunk;

/// A chunk as it was read.
#[derive(Debug, Clone)]
pub(crate) struct CachedChunk {
    pub chunk: Chunk,
    /// Sequence number of the last message in the chunk.
    pub last: u64,
    /// Timestamp of the first message (age-based retention may expire it).
    pub first_timestamp_ms: u64,
    /// The chunk stopped at the byte limit, not at the tail: it stays complete as the tail grows.
    pub full: bool,
}

type Key = (u64, u64, usize);

/// Memory an entry takes besides its body: the map slot and the order queue slot (key and
/// `CachedChunk`, at the map's load factor), and the body buffer's allocation header.
/// Measured: 200k one-message chunks took ~270 bytes each beyond their bodies.
pub(crate) const ENTRY_OVERHEAD: usize = 320;

fn cost(cached: &CachedChunk) -> usize {
    cached.chunk.body.len() + ENTRY_OVERHEAD
}

pub(crate) struct ChunkCache {
    budget: usize,
    state: Mutex<State>,
    /// Scans running now, by key: a reader that misses the cache while another one scans the
    /// same range waits for that scan and takes its chunk, instead of scanning (and holding)
    /// its own copy. Many clients arriving at once at a cold range cost one scan.
    scanning: Mutex<std::collections::HashSet<Key>>,
    scanned: std::sync::Condvar,
}

/// The right to scan one range; dropping it lets the readers that waited for it go on.
pub(crate) struct Scan<'a> {
    cache: &'a ChunkCache,
    key: Key,
}

impl Drop for Scan<'_> {
    fn drop(&mut self) {
        self.cache.scanning.lock().expect("scan lock").remove(&self.key);
        self.cache.scanned.notify_all();
    }
}

#[derive(Default)]
struct State {
    /// Each entry with when it was last used (ms).
    entries: HashMap<Key, (CachedChunk, u64)>,
    order: VecDeque<Key>,
    bytes: usize,
}

impl ChunkCache {
    pub(crate) fn new(budget: usize) -> ChunkCache {
        ChunkCache { budget, state: Mutex::default(), scanning: Mutex::default(), scanned: Default::default() }
    }

    /// Waits until no other reader scans this range, then takes the right to scan it. Returns
    /// `None` when it had to wait (the caller looks in the cache again first). Blocking: for
    /// the blocking pool only; pointless with the cache off (nothing to share).
    pub(crate) fn begin_scan(&self, stream_id: u64, after: u64, max_bytes: usize) -> Option<Scan<'_>> {
        let key = (stream_id, after, max_bytes);
        let mut scanning = self.scanning.lock().expect("scan lock");
        let mut waited = false;
        while scanning.contains(&key) {
            waited = true;
            scanning = self.scanned.wait(scanning).expect("scan lock");
        }
        if waited {
            return None;
        }
        scanning.insert(key);
        Some(Scan { cache: self, key })
    }

    pub(crate) fn get(&self, stream_id: u64, after: u64, max_bytes: usize) -> Option<CachedChunk> {
        if self.budget == 0 {
            return None;
        }
        let mut state = self.state.lock().expect("chunk cache lock");
        let (cached, used) = state.entries.get_mut(&(stream_id, after, max_bytes))?;
        *used = super::now_ms();
        Some(cached.clone())
    }

    pub(crate) fn put(&self, stream_id: u64, after: u64, max_bytes: usize, cached: CachedChunk) {
        let size = cost(&cached);
        if size > self.budget / 4 {
            return; // one huge chunk would evict everything else
        }
        let key = (stream_id, after, max_bytes);
        let mut state = self.state.lock().expect("chunk cache lock");
        if let Some((previous, _)) = state.entries.insert(key, (cached, super::now_ms())) {
            state.bytes -= cost(&previous);
        } else {
            state.order.push_back(key);
        }
        state.bytes += size;
        while state.bytes > self.budget {
            let Some(oldest) = state.order.pop_front() else { break };
            if let Some((evicted, _)) = state.entries.remove(&oldest) {
                state.bytes -= cost(&evicted);
            }
        }
        if state.entries.capacity() > 4 * state.entries.len().max(1024) {
            state.entries.shrink_to_fit();
            state.order.shrink_to_fit();
        }
    }

    /// Drops entries unused since `idle_before_ms`: a burst of one-off reads (many streams read
    /// once) does not keep the cache full once it is over. Returns how many went.
    pub(crate) fn expire_idle(&self, idle_before_ms: u64) -> usize {
        let mut state = self.state.lock().expect("chunk cache lock");
        let before = state.entries.len();
        let mut freed = 0;
        state.entries.retain(|_, (cached, used)| {
            let keep = *used >= idle_before_ms;
            if !keep {
                freed += cost(cached);
            }
            keep
        });
        state.bytes -= freed;
        let State { entries, order, .. } = &mut *state;
        order.retain(|key| entries.contains_key(key));
        if entries.capacity() > 4 * entries.len().max(1024) {
            entries.shrink_to_fit();
            order.shrink_to_fit();
        }
        before - state.entries.len()
    }

    pub(crate) fn is_enabled(&self) -> bool {
        self.budget > 0
    }

    /// Bytes the cache accounts for now (bodies and per-entry overhead).
    pub(crate) fn bytes(&self) -> usize {
        self.state.lock().expect("chunk cache lock").bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offset::{Epoch, Position};
    use bytes::Bytes;

    fn chunk(body: &'static [u8]) -> CachedChunk {
        let position = Position { epoch: Epoch::parse(b"abcdefghij").unwrap(), seq: 0 };
        let chunk = Chunk {
            body: Bytes::from_static(body),
            count: 1,
            start: position,
            next: position,
            up_to_date: true,
            meta: None,
        };
        CachedChunk { chunk, last: 1, first_timestamp_ms: 0, full: false }
    }

    #[test]
    fn entries_count_their_overhead_and_idle_ones_expire() {
        let cache = ChunkCache::new(10 * (ENTRY_OVERHEAD + 3));
        for stream in 0..20 {
            cache.put(stream, 0, 100, chunk(b"[1]"));
        }
        // Ten entries fit the budget once their overhead counts (body bytes alone: all 20).
        assert_eq!(cache.bytes(), 10 * (ENTRY_OVERHEAD + 3));
        assert!(cache.get(9, 0, 100).is_none() && cache.get(10, 0, 100).is_some());
        let now = crate::storage::now_ms();
        assert_eq!(cache.expire_idle(now + 1), 10, "all unused since");
        assert_eq!(cache.bytes(), 0);
        cache.put(1, 0, 100, chunk(b"[1]"));
        assert_eq!(cache.expire_idle(now.saturating_sub(60_000)), 0, "recently used entries stay");
    }
}
