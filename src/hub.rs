//! The per-stream notify map that wakes live readers.
//!
//! A live reader subscribes to its stream *before* it reads the log, then waits for a change.
//! The storage publishes a stream's new durable tail first and calls [`Hub::wake`] second, so a
//! message either is already visible to the reader's read or bumps the reader's subscription
//! afterwards: it can never fall in between. The hub never carries message bodies; a woken
//! reader reads the log after its own position.
//!
//! The one exception is transient broadcasts (`meta.transient`): they have no offset and are
//! never stored, so the hub hands their bodies to whoever is subscribed at that moment, keeping
//! the last few so a reader that was busy when two arrived still gets both. What is kept is
//! bounded per stream (count and bytes) and in total (`ds.max_transient_bytes`): a batch
//! counts from the moment it is kept until the last holder drops it.
//!
//! Each stream's entry is a `tokio::sync::watch` sender holding the last published tail. Unlike
//! `Notify::notify_waiters`, a watch channel remembers that a change happened while nobody was
//! polling, so there is no missed-wake-up window. Entries exist only while someone is
//! subscribed: the last [`Subscription`] to go removes its stream's entry, so idle streams cost
//! nothing here.
//!
//! The map sits behind a `std::sync::Mutex`, not a tokio one: the lock is held for a hash-map
//! operation only, never across an `.await`, and is taken from the storage's commit thread,
//! which is not async.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;

/// Transient batches a stream keeps for subscribers that have not looked yet.
const TRANSIENT_KEPT: usize = 16;
/// Bytes of transient batches one stream keeps (the newest batch is always kept).
const TRANSIENT_STREAM_BYTES: usize = 1024 * 1024;

/// Messages delivered live only: a JSON array, in one body.
#[derive(Debug)]
pub struct Transient {
    pub id: u64,
    pub body: Bytes,
    budget: Arc<TransientBudget>,
}

impl Drop for Transient {
    fn drop(&mut self) {
        self.budget.bytes.fetch_sub(self.body.len(), std::sync::atomic::Ordering::AcqRel);
    }
}

/// Bytes of transient batches alive, all streams together.
#[derive(Debug, Default)]
struct TransientBudget {
    bytes: std::sync::atomic::AtomicUsize,
    max: usize,
}

/// What a stream's watch channel carries.
#[derive(Debug, Default)]
struct StreamState {
    tail: u64,
    transient: std::collections::VecDeque<Arc<Transient>>,
}

#[derive(Debug, Clone)]
pub struct Hub {
    streams: Arc<Mutex<HashMap<Arc<str>, watch::Sender<StreamState>>>>,
    transient_ids: Arc<std::sync::atomic::AtomicU64>,
    transient_budget: Arc<TransientBudget>,
}

impl Default for Hub {
    fn default() -> Hub {
        Hub::new(64 * 1024 * 1024)
    }
}

impl Hub {
    /// A hub that keeps at most `max_transient_bytes` of transient batches.
    pub fn new(max_transient_bytes: usize) -> Hub {
        Hub {
            streams: Arc::default(),
            transient_ids: Arc::default(),
            transient_budget: Arc::new(TransientBudget { bytes: Default::default(), max: max_transient_bytes }),
        }
    }

    /// Bytes of transient batches alive now.
    pub fn transient_bytes(&self) -> usize {
        self.transient_budget.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Starts watching `stream`. Every [`Hub::wake`] for it after this call resolves the
    /// subscription's next [`Subscription::changed`].
    pub fn subscribe(&self, stream: &str) -> Subscription {
        let mut streams = self.streams.lock().expect("hub lock");
        let receiver = match streams.get(stream) {
            Some(sender) => sender.subscribe(),
            None => {
                let (sender, receiver) = watch::channel(StreamState::default());
                streams.insert(Arc::from(stream), sender);
                receiver
            }
        };
        // Only transient messages sent from now on are this subscriber's.
        let transient_seen = receiver.borrow().transient.back().map_or(0, |t| t.id);
        Subscription { hub: self.clone(), stream: Arc::from(stream), receiver: Some(receiver), transient_seen }
    }

    /// Wakes every subscriber of `stream`; `tail` is the stream's new durable tail.
    pub fn wake(&self, stream: &str, tail: u64) {
        let streams = self.streams.lock().expect("hub lock");
        if let Some(sender) = streams.get(stream) {
            sender.send_modify(|state| state.tail = state.tail.max(tail));
        }
    }

    /// Hands a transient batch (a JSON array body) to the stream's current subscribers; without
    /// subscribers it is dropped, as transient messages are, and so it is when the hub already
    /// keeps `max_transient_bytes` of them (counted in `ds_transient_dropped_total`).
    pub fn push_transient(&self, stream: &str, body: Bytes) {
        use std::sync::atomic::Ordering;
        let streams = self.streams.lock().expect("hub lock");
        let Some(sender) = streams.get(stream) else { return };
        let budget = &self.transient_budget;
        let len = body.len();
        if budget.bytes.fetch_add(len, Ordering::AcqRel) + len > budget.max {
            budget.bytes.fetch_sub(len, Ordering::AcqRel);
            crate::metrics::get().transient_dropped.inc();
            return;
        }
        let id = self.transient_ids.fetch_add(1, Ordering::Relaxed) + 1;
        let batch = Arc::new(Transient { id, body, budget: budget.clone() });
        sender.send_modify(|state| {
            state.transient.push_back(batch);
            let mut kept: usize = state.transient.iter().map(|t| t.body.len()).sum();
            while state.transient.len() > TRANSIENT_KEPT || (state.transient.len() > 1 && kept > TRANSIENT_STREAM_BYTES)
            {
                let Some(oldest) = state.transient.pop_front() else { break };
                kept -= oldest.body.len();
            }
        });
    }

    /// Whether anybody is subscribed to `stream` right now.
    pub fn is_watched(&self, stream: &str) -> bool {
        self.streams.lock().expect("hub lock").contains_key(stream)
    }

    /// Number of streams somebody is waiting on.
    /// The newest tail published for `stream` while it is watched (0 when unwatched).
    pub fn tail(&self, stream: &str) -> u64 {
        let streams = self.streams.lock().expect("hub lock");
        streams.get(stream).map_or(0, |sender| sender.borrow().tail)
    }

    /// Wakes every subscriber of every stream: each re-reads from its own offset (after a
    /// reconnect to a shared log, when wake-ups may have been lost).
    pub fn wake_all(&self) {
        let streams = self.streams.lock().expect("hub lock");
        for sender in streams.values() {
            sender.send_modify(|_| {});
        }
    }

    pub fn streams_watched(&self) -> usize {
        self.streams.lock().expect("hub lock").len()
    }

    /// Number of subscriptions alive across all streams.
    pub fn subscribers(&self) -> usize {
        self.streams.lock().expect("hub lock").values().map(|s| s.receiver_count()).sum()
    }
}

/// A reader's interest in one stream. Dropping it (for example when the client disconnects and
/// actix drops the response) removes the stream's entry if it was the last one.
#[derive(Debug)]
pub struct Subscription {
    hub: Hub,
    stream: Arc<str>,
    receiver: Option<watch::Receiver<StreamState>>,
    transient_seen: u64,
}

impl Subscription {
    /// Resolves once the stream got new messages since the subscription was made or since the
    /// previous call returned.
    pub async fn changed(&mut self) {
        let receiver = self.receiver.as_mut().expect("receiver lives until drop");
        // The sender lives in the map as long as this receiver does, so this cannot fail; if it
        // ever did, returning lets the caller re-read the log, which is always safe.
        let _ = receiver.changed().await;
    }

    /// Transient batches that arrived since the last call (or since subscribing), oldest first.
    pub fn take_transient(&mut self) -> Vec<Arc<Transient>> {
        let receiver = self.receiver.as_ref().expect("receiver lives until drop");
        let state = receiver.borrow();
        let fresh: Vec<Arc<Transient>> =
            state.transient.iter().filter(|t| t.id > self.transient_seen).cloned().collect();
        if let Some(last) = fresh.last() {
            self.transient_seen = last.id;
        }
        fresh
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut streams = self.hub.streams.lock().expect("hub lock");
        // Drop our receiver under the lock, so a concurrent subscribe cannot see a sender that
        // is about to be removed.
        drop(self.receiver.take());
        if streams.get(&*self.stream).is_some_and(|s| s.receiver_count() == 0) {
            streams.remove(&*self.stream);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn wake_reaches_subscribers_of_that_stream_only() {
        let hub = Hub::default();
        let mut a = hub.subscribe("a");
        let mut b = hub.subscribe("b");
        hub.wake("a", 1);
        tokio::time::timeout(Duration::from_secs(1), a.changed()).await.expect("a woken");
        assert!(tokio::time::timeout(Duration::from_millis(50), b.changed()).await.is_err());
    }

    #[tokio::test]
    async fn a_wake_before_waiting_is_not_lost() {
        let hub = Hub::default();
        let mut sub = hub.subscribe("s");
        hub.wake("s", 7);
        tokio::time::timeout(Duration::from_secs(1), sub.changed()).await.expect("woken");
    }

    #[tokio::test]
    async fn transient_batches_reach_current_subscribers_once() {
        let hub = Hub::default();
        hub.push_transient("s", Bytes::from_static(b"[0]")); // nobody listening: dropped
        let mut sub = hub.subscribe("s");
        hub.push_transient("s", Bytes::from_static(b"[1]"));
        hub.push_transient("s", Bytes::from_static(b"[2]"));
        tokio::time::timeout(Duration::from_secs(1), sub.changed()).await.expect("woken");
        let bodies: Vec<Bytes> = sub.take_transient().iter().map(|t| t.body.clone()).collect();
        assert_eq!(bodies, [Bytes::from_static(b"[1]"), Bytes::from_static(b"[2]")]);
        assert!(sub.take_transient().is_empty(), "each batch once");
        let mut late = hub.subscribe("s");
        assert!(late.take_transient().is_empty(), "a later subscriber does not get older batches");
    }

    #[test]
    fn transient_batches_are_bounded_per_stream_and_in_total() {
        let hub = Hub::new(3000);
        let mut a = hub.subscribe("a");
        let _b = hub.subscribe("b");
        for i in 0..20u8 {
            hub.push_transient("a", Bytes::from(vec![i; 100]));
        }
        assert_eq!(hub.transient_bytes(), 16 * 100, "16 batches kept per stream");
        hub.push_transient("b", Bytes::from(vec![0; 1400]));
        assert_eq!(hub.transient_bytes(), 3000);
        hub.push_transient("b", Bytes::from(vec![1; 1]));
        assert_eq!(hub.transient_bytes(), 3000, "over the total: dropped");
        let taken = a.take_transient();
        assert_eq!(taken.first().map(|t| t.body[0]), Some(4), "the oldest went first");
        drop(taken);
        drop(a);
        assert_eq!(hub.transient_bytes(), 1400, "dropped with the last subscriber of the stream");
    }

    #[test]
    fn entries_go_away_with_their_last_subscriber() {
        let hub = Hub::default();
        let a = hub.subscribe("s");
        let b = hub.subscribe("s");
        assert_eq!((hub.streams_watched(), hub.subscribers()), (1, 2));
        drop(a);
        assert_eq!((hub.streams_watched(), hub.subscribers()), (1, 1));
        drop(b);
        assert_eq!((hub.streams_watched(), hub.subscribers()), (0, 0));
        hub.wake("s", 1); // no entry, no effect
        assert_eq!(hub.streams_watched(), 0);
    }
}
