//! The writer thread: the only code that appends to the log, and its group commit.
//!
//! Broadcast handlers hand their messages over a channel and await a oneshot. The thread takes
//! every request that is waiting, allocates sequence numbers, applies **one** `sled::Batch` for
//! the whole group (atomic: each request is stored whole or not at all, and so is the group),
//! calls the blocking `Db::flush()` once (which makes every write applied before it durable),
//! then publishes the new tails, wakes the hub and answers every request of the group. While it
//! works, the next requests pile up in the channel and form the next group, so fsyncs per
//! second stay bounded by the disk while throughput grows with concurrency.
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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::cache::{StreamCache, StreamEntry};
use super::keys::{self, StreamRecord};
use super::{now_ms, NewMessage, StorageError};
use crate::hub::Hub;

/// Most requests taken into one group (bounds the batch size under a burst).
const MAX_GROUP_REQUESTS: usize = 512;

pub(crate) type Done = oneshot::Sender<Result<(), StorageError>>;

struct Request {
    messages: Vec<NewMessage>,
    done: Done,
}

pub(crate) struct Writer {
    sender: mpsc::Sender<Request>,
    thread: JoinHandle<()>,
}

/// What the writer thread owns.
struct State {
    db: sled::Db,
    cache: Arc<StreamCache>,
    hub: Hub,
    failed: Arc<AtomicBool>,
    next_stream_id: u64,
    /// `storage.fsync`: flush before answering (off is unsafe: answer right after the apply).
    fsync: bool,
}

impl Writer {
    pub(crate) fn start(
        db: sled::Db,
        cache: Arc<StreamCache>,
        hub: Hub,
        failed: Arc<AtomicBool>,
        next_stream_id: u64,
        fsync: bool,
    ) -> Writer {
        let state = State { db, cache, hub, failed, next_stream_id, fsync };
        let (sender, receiver) = mpsc::channel::<Request>();
        let thread = std::thread::Builder::new()
            .name("ds-writer".into())
            .spawn(move || run(state, receiver))
            .expect("spawn writer thread");
        Writer { sender, thread }
    }

    /// Queues messages for appending; the receiver answers once they are durable.
    pub(crate) fn submit(
        &self,
        messages: Vec<NewMessage>,
    ) -> Result<oneshot::Receiver<Result<(), StorageError>>, StorageError> {
        let (done, receiver) = oneshot::channel();
        self.sender.send(Request { messages, done }).map_err(|_| StorageError::Closed)?;
        Ok(receiver)
    }

    /// Finishes the queued requests and joins the thread.
    pub(crate) fn stop(self) {
        drop(self.sender);
        let _ = self.thread.join();
    }
}

fn run(mut state: State, receiver: mpsc::Receiver<Request>) {
    while let Ok(first) = receiver.recv() {
        let mut group = vec![first];
        group.extend(receiver.try_iter().take(MAX_GROUP_REQUESTS - 1));
        let started = std::time::Instant::now();
        let applied = state.apply(&group);
        let metrics = crate::metrics::get();
        metrics.append_seconds.observe(started.elapsed().as_secs_f64());
        let result = applied.and_then(|published| {
            if state.fsync {
                state.flush(group.len())?;
            }
            for (entry, seq) in published {
                entry.publish(seq, &state.hub);
            }
            Ok(())
        });
        for request in group {
            // The client may have gone away meanwhile; what was stored stays stored.
            let _ = request.done.send(result.clone());
        }
    }
}

impl State {
    fn flush(&self, requests: usize) -> Result<(), StorageError> {
        let started = std::time::Instant::now();
        let result = self.db.flush().map(drop).map_err(|e| StorageError::Flush(e.to_string()));
        crate::metrics::observe_flush(started.elapsed(), requests);
        if let Err(e) = &result {
            self.failed.store(true, Ordering::Release);
            log::error!("flush failed, {requests} broadcast(s) not acknowledged: {e}");
        }
        result
    }

    /// Applies a group of requests as one batch; returns each touched stream's new last seq.
    fn apply(&mut self, group: &[Request]) -> Result<Vec<(Arc<StreamEntry>, u64)>, StorageError> {
        let now = now_ms();
        let mut batch = sled::Batch::default();
        let mut created: Vec<Arc<str>> = Vec::new();
        // (entry, last seq, last timestamp) per stream touched; a linear search is fine for
        // the few streams a group usually names, and an index keeps big fan-in groups linear.
        let mut touched: Vec<(Arc<StreamEntry>, u64, u64)> = Vec::new();
        let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for message in group.iter().flat_map(|r| &r.messages) {
            let i = match index.get(message.stream.as_str()) {
                Some(&i) => i,
                None => {
                    let entry = match self.cache.get_or_load(&self.db, &message.stream) {
                        Ok(Some(entry)) => entry,
                        Ok(None) => self.create(&message.stream, &mut batch, &mut created),
                        Err(e) => {
                            self.forget(&created);
                            return Err(e);
                        }
                    };
                    let (seq, ts) =
                        (entry.allocated.load(Ordering::Acquire), entry.last_timestamp_ms.load(Ordering::Acquire));
                    touched.push((entry, seq, ts));
                    index.insert(&message.stream, touched.len() - 1);
                    touched.len() - 1
                }
            };
            let (entry, seq, ts) = &mut touched[i];
            *seq += 1;
            *ts = (*ts).max(now);
            batch.insert(&keys::log_key(entry.id, *seq)[..], keys::encode_log_value(*ts, &message.json));
        }
        for (entry, seq, _) in &touched {
            let record = StreamRecord { last_seq: *seq, ..StreamRecord::new() };
            batch.insert(&keys::stream_key(entry.id)[..], record.encode());
        }
        if !created.is_empty() {
            batch.insert(keys::META_NEXT_STREAM_ID, &keys::encode_u64(self.next_stream_id)[..]);
        }
        if let Err(e) = self.db.apply_batch(batch) {
            self.failed.store(true, Ordering::Release);
            self.forget(&created);
            log::error!("append failed: {e}");
            return Err(e.into());
        }
        Ok(touched
            .into_iter()
            .map(|(entry, seq, ts)| {
                entry.allocated.store(seq, Ordering::Release);
                entry.last_timestamp_ms.store(ts, Ordering::Release);
                (entry, seq)
            })
            .collect())
    }

    /// Makes a new stream's entry and adds its name to `batch`.
    fn create(&mut self, stream: &str, batch: &mut sled::Batch, created: &mut Vec<Arc<str>>) -> Arc<StreamEntry> {
        let id = self.next_stream_id;
        self.next_stream_id += 1;
        batch.insert(keys::name_key(stream), &keys::encode_u64(id)[..]);
        let entry = Arc::new(StreamEntry::new(Arc::from(stream), id, 0, 0));
        self.cache.insert(entry.clone());
        created.push(entry.name.clone());
        entry
    }

    /// Drops the entries of streams whose creating batch was not applied.
    fn forget(&self, created: &[Arc<str>]) {
        for name in created {
            self.cache.remove(name);
        }
    }
}
