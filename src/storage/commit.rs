//! Group commit: one dedicated OS thread flushes sled for every group of waiting appends.
//!
//! Why a thread and not `flush_async`: sled 0.34's `flush_async` deadlocks under concurrent
//! callers (see PITFALLS.md), and a `web::block(flush)` per request costs one fsync per request.
//! Here appenders hand over a ticket and await a oneshot; the thread takes every ticket that is
//! waiting, calls the blocking `flush()` once (which makes every write applied before it
//! durable, across all trees of the `Db`), then publishes the new tails and answers all tickets.
//! Under load, tickets pile up while a flush runs, so the number of fsyncs per second stays
//! bounded by the disk while throughput grows with concurrency.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::cache::StreamEntry;
use super::writer::Done;
use super::StorageError;
use crate::hub::Hub;

/// One group of appends, already applied to sled: the tails to publish and the requests to
/// answer once they are durable.
struct Ticket {
    publish: Vec<(Arc<StreamEntry>, u64)>,
    done: Vec<Done>,
}

pub(crate) struct Committer {
    sender: mpsc::Sender<Ticket>,
    thread: JoinHandle<()>,
}

impl Committer {
    pub(crate) fn start(db: sled::Db, hub: Hub, failed: Arc<AtomicBool>) -> Committer {
        let (sender, receiver) = mpsc::channel::<Ticket>();
        let thread = std::thread::Builder::new()
            .name("ds-commit".into())
            .spawn(move || run(db, hub, failed, receiver))
            .expect("spawn commit thread");
        Committer { sender, thread }
    }

    /// Queues a flush for a group already applied to sled; `done` are answered once it is
    /// durable (and visible to readers).
    pub(crate) fn submit(&self, publish: Vec<(Arc<StreamEntry>, u64)>, done: Vec<Done>) {
        if let Err(mpsc::SendError(ticket)) = self.sender.send(Ticket { publish, done }) {
            for d in ticket.done {
                let _ = d.send(Err(StorageError::Closed));
            }
        }
    }

    /// Finishes the queued tickets and joins the thread.
    pub(crate) fn stop(self) {
        drop(self.sender);
        let _ = self.thread.join();
    }
}

fn run(db: sled::Db, hub: Hub, failed: Arc<AtomicBool>, receiver: mpsc::Receiver<Ticket>) {
    while let Ok(first) = receiver.recv() {
        let mut group = vec![first];
        group.extend(receiver.try_iter());
        let started = std::time::Instant::now();
        let result = db.flush().map(drop).map_err(|e| StorageError::Flush(e.to_string()));
        let requests: usize = group.iter().map(|t| t.done.len()).sum();
        crate::metrics::observe_flush(started.elapsed(), requests);
        if let Err(e) = &result {
            failed.store(true, Ordering::Release);
            log::error!("flush failed, {requests} broadcast(s) not acknowledged: {e}");
        }
        for ticket in group {
            if result.is_ok() {
                for (entry, seq) in &ticket.publish {
                    entry.publish(*seq, &hub);
                }
            }
            for done in ticket.done {
                // The appender may have gone away (client disconnected); the data is durable anyway.
                let _ = done.send(result.clone());
            }
        }
    }
}
