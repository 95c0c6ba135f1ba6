//! Expiry in cluster mode: `Stream-Expires-At` (absolute) and the sliding `Stream-TTL`,
//! renewed by every read and write on any node, never by HEAD.
//!
//! A write renews in the log itself: messages of a stream with a TTL carry the time they were
//! written (`Ds-At`), which every node learns from the stream's last message and from the
//! wake-up feed. A read stores nothing, so the node that served it records the time and
//! tells the others on core NATS (`P.a.<token>`, fire and forget: reads stay reads). Each
//! node keeps the newest access it knows per stream, and a floor: the moment it may have
//! started missing some (its start, a NATS reconnect, or forgetting entries when the map is
//! full). A stream counts as accessed at least at the floor, so a node that missed accesses
//! keeps a stream longer than it should, never expires it early; the embedded engine counts
//! a restart as an access the same way.
//!
//! A request that finds a stream expired answers as if it did not exist and removes it in
//! the background: a `delete` control message guarded by the last sequence it saw (a write
//! in between renewed the stream, so the removal gives up), then a purge. Streams nobody asks
//! for are swept: each node keeps the deadlines of the streams with an expiry it has seen
//! (requests, and every write through the wake-up feed), and once a second removes those
//! due, after checking with the stream leader (another node may have renewed it). A stream
//! that no running node has seen since it started is removed at its next request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use futures_util::StreamExt;

use super::state::{Marks, StreamState};
use super::{subject, Cluster};
use crate::meta::{SharedMeta, StreamMeta};
use crate::storage::now_ms;

/// Streams whose last access a node remembers; beyond it the map is cleared and the floor
/// raised. Streams whose deadline it keeps for the sweep; beyond it new ones wait for a
/// request.
const MAX_ACCESSES: usize = 100_000;
/// Expired streams the sweep removes per second at most (the rest wait for the next tick).
const SWEEP_PER_TICK: usize = 1000;

/// The newest read or write this node knows of each stream with a TTL, and when the streams
/// with an expiry it has seen are due.
#[derive(Debug)]
pub(super) struct Accesses {
    last: Mutex<HashMap<String, u64>>,
    floor: AtomicU64,
    due: Mutex<HashMap<String, u64>>,
}

impl Default for Accesses {
    fn default() -> Accesses {
        Accesses { last: Mutex::new(HashMap::new()), floor: AtomicU64::new(now_ms()), due: Mutex::new(HashMap::new()) }
    }
}

impl Accesses {
    pub(super) fn record(&self, stream: &str, at_ms: u64) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.len() >= MAX_ACCESSES && !last.contains_key(stream) {
            last.clear();
            self.floor.fetch_max(now_ms(), Ordering::AcqRel);
        }
        let entry = last.entry(stream.to_string()).or_insert(0);
        *entry = (*entry).max(at_ms);
    }

    /// The newest access known (at least the floor).
    pub(super) fn last(&self, stream: &str) -> u64 {
        let known = self.last.lock().unwrap_or_else(|p| p.into_inner()).get(stream).copied().unwrap_or(0);
        known.max(self.floor.load(Ordering::Acquire))
    }

    /// Accesses may have been missed from now on (a NATS reconnect): count every stream as
    /// accessed now.
    pub(super) fn lost_track(&self) {
        self.floor.fetch_max(now_ms(), Ordering::AcqRel);
    }

    /// The stream expires at `deadline` (ms) as far as this node knows.
    fn note_due(&self, stream: &str, deadline: u64) {
        let mut due = self.due.lock().unwrap_or_else(|p| p.into_inner());
        if due.len() < MAX_ACCESSES || due.contains_key(stream) {
            due.insert(stream.to_string(), deadline);
        }
    }

    /// Streams due by `now` (at most `max`), no longer noted.
    fn take_due(&self, now: u64, max: usize) -> Vec<String> {
        let mut due = self.due.lock().unwrap_or_else(|p| p.into_inner());
        let ready: Vec<String> = due.iter().filter(|(_, &at)| at <= now).take(max).map(|(s, _)| s.clone()).collect();
        for stream in &ready {
            due.remove(stream);
        }
        ready
    }
}

/// Whether a stream is there for a request.
#[derive(Debug, Clone)]
pub(super) enum Life {
    Missing,
    /// It exists but has expired (it is removed in the background).
    Expired,
    Live(SharedMeta),
}

impl Life {
    pub(super) fn meta(self) -> Option<SharedMeta> {
        match self {
            Life::Live(meta) => Some(meta),
            _ => None,
        }
    }
}

impl Cluster {
    fn touches(&self) -> String {
        format!("{}.a.*", self.inner.stream)
    }

    /// Other nodes' reads, into this node's accesses.
    pub(super) async fn subscribe_touches(&self) -> Result<(), String> {
        let mut touches = self.inner.client.subscribe(self.touches()).await.map_err(|e| e.to_string())?;
        let accesses = self.inner.accesses.clone();
        tokio::spawn(async move {
            while let Some(message) = touches.next().await {
                let Some(name) = message.subject.rsplit('.').next().and_then(subject::name) else { continue };
                if let Some(at) = std::str::from_utf8(&message.payload).ok().and_then(|t| t.parse().ok()) {
                    accesses.record(&name, at);
                }
            }
        });
        Ok(())
    }

    /// A read (or a write that stored nothing) renews a stream with a TTL: here, and on the
    /// other nodes through a touch.
    pub(super) fn renew(&self, stream: &str, meta: &StreamMeta) {
        if meta.ttl_secs.is_none() {
            return;
        }
        let now = now_ms();
        self.inner.accesses.record(stream, now);
        let client = self.inner.client.clone();
        let subject = format!("{}.a.{}", self.inner.stream, subject::token(stream));
        tokio::spawn(async move {
            if let Err(e) = client.publish(subject, now.to_string().into()).await {
                log::debug!("touch not sent: {e}");
            }
        });
    }

    /// Whether the stream of `state` is there, now.
    pub(super) fn life(&self, stream: &str, state: &StreamState) -> Life {
        let Some(meta) = &state.meta else { return Life::Missing };
        let last = self.inner.accesses.last(stream).max(state.written_ms);
        if let Some(deadline) = meta.deadline_ms(last) {
            if now_ms() >= deadline {
                return Life::Expired;
            }
            self.inner.accesses.note_due(stream, deadline);
        }
        Life::Live(meta.clone())
    }

    /// A write seen on the wake-up feed (any node's): a stream with an expiry is due again.
    pub(super) fn written(&self, stream: &str, marks: &Marks) {
        if let Some(at) = marks.at {
            self.inner.accesses.record(stream, at);
        }
        // Only metadata with an expiry holds these keys (`meta::StreamMeta`'s names).
        let Some(json) = marks.meta.as_deref().filter(|m| m.contains("\"ttl\"") || m.contains("\"exp\"")) else {
            return;
        };
        if let Some(meta) = StreamMeta::decode(json.as_bytes()) {
            if let Some(deadline) = meta.deadline_ms(self.inner.accesses.last(stream).max(marks.at.unwrap_or(0))) {
                self.inner.accesses.note_due(stream, deadline);
            }
        }
    }

    /// Once a second, removes the streams due (see the module docs).
    pub(super) fn sweep(&self) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                for stream in this.inner.accesses.take_due(now_ms(), SWEEP_PER_TICK) {
                    this.expire(&stream);
                }
            }
        });
    }

    /// [`Cluster::life`] for a request: an expired stream is removed in the background, and
    /// the request sees none.
    pub(super) fn live(&self, stream: &str, state: &StreamState) -> Option<SharedMeta> {
        let life = self.life(stream, state);
        if let Life::Expired = life {
            self.expire(stream);
        }
        life.meta()
    }

    /// Removes the stream if it has (still) expired, in the background.
    pub(super) fn expire(&self, stream: &str) {
        let (this, stream) = (self.clone(), stream.to_string());
        tokio::spawn(async move {
            let _turn = this.take_turns(&[&stream]).await;
            let result = async {
                let state = this.stream_state(&stream).await?;
                if let Life::Expired = this.life(&stream, &state) {
                    if this.remove(&stream, &state).await? {
                        log::debug!("stream {stream:?} expired and was removed");
                    }
                }
                Ok::<(), crate::storage::StorageError>(())
            };
            if let Err(e) = tokio::time::timeout(this.inner.publish_timeout, result).await.unwrap_or(Ok(())) {
                log::warn!("removing expired stream {stream:?} failed (the next request tries again): {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_access_is_never_older_than_the_floor() {
        let accesses = Accesses::default();
        let floor = accesses.last("unknown");
        assert!(floor > 0);
        accesses.record("s", floor + 5_000);
        accesses.record("s", floor + 1_000);
        assert_eq!(accesses.last("s"), floor + 5_000, "the newest access wins");
        accesses.record("old", 1);
        assert_eq!(accesses.last("old"), floor, "never before the floor");
    }
}
