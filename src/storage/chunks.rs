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
}

#[derive(Default)]
struct State {
    entries: HashMap<Key, CachedChunk>,
    order: VecDeque<Key>,
    bytes: usize,
}

impl ChunkCache {
    pub(crate) fn new(budget: usize) -> ChunkCache {
        ChunkCache { budget, state: Mutex::default() }
    }

    pub(crate) fn get(&self, stream_id: u64, after: u64, max_bytes: usize) -> Option<CachedChunk> {
        if self.budget == 0 {
            return None;
        }
        self.state.lock().expect("chunk cache lock").entries.get(&(stream_id, after, max_bytes)).cloned()
    }

    pub(crate) fn put(&self, stream_id: u64, after: u64, max_bytes: usize, cached: CachedChunk) {
        let size = cost(&cached);
        if size > self.budget / 4 {
            return; // one huge chunk would evict everything else
        }
        let key = (stream_id, after, max_bytes);
        let mut state = self.state.lock().expect("chunk cache lock");
        if let Some(previous) = state.entries.insert(key, cached) {
            state.bytes -= cost(&previous);
        } else {
            state.order.push_back(key);
        }
        state.bytes += size;
        while state.bytes > self.budget {
            let Some(oldest) = state.order.pop_front() else { break };
            if let Some(evicted) = state.entries.remove(&oldest) {
                state.bytes -= cost(&evicted);
            }
        }
        if state.entries.capacity() > 4 * state.entries.len().max(1024) {
            state.entries.shrink_to_fit();
            state.order.shrink_to_fit();
        }
    }

    /// Bytes the cache accounts for now (bodies and per-entry overhead).
    pub(crate) fn bytes(&self) -> usize {
        self.state.lock().expect("chunk cache lock").bytes
    }
}
