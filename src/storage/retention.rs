//! Background trimming of old messages, and the discovery of streams to remove.
//!
//! Reads already hide what retention would remove (they compute the retained window from the
//! tail and the message timestamps), so this task only gives the space back. That keeps the
//! read-side guarantee independent of how late the task runs. Deletes are not flushed
//! explicitly: if a crash undoes some of them, the messages are still hidden and the next pass
//! deletes them again.
//!
//! The task walks the streams that exist (their `N` keys). A stream whose every message has
//! expired by age is handed to the writer, which removes it (see `writer.rs`), so streams that
//! were written once and never again do not stay on disk, nor in this walk, for ever.

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::cache::StreamCache;
use super::keys::{self, StreamRecord};
use super::writer::Removals;
use super::{now_ms, Retention, StorageError};

/// Shortest pause between two passes; a slow pass (many streams) waits ten times its length.
const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Deletes per sled batch, so one huge stream does not build one huge batch.
const BATCH_DELETES: usize = 10_000;

pub(crate) struct Trimmer {
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

/// What a pass needs besides the database.
#[derive(Clone)]
pub(crate) struct Context {
    pub(crate) retention: Retention,
    pub(crate) cache: Arc<StreamCache>,
    pub(crate) removals: Removals,
}

impl Trimmer {
    /// Starts the task, unless retention is unlimited.
    pub(crate) fn start(db: Arc<super::slot::DbSlot>, context: Context) -> Option<Trimmer> {
        if context.retention == Retention::default() {
            return None;
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("ds-retention".into())
            .spawn(move || {
                let mut pause = MIN_INTERVAL;
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(pause) {
                    let started = Instant::now();
                    // A clone per pass only: the slot may be reopened in between.
                    match db.get().and_then(|db| trim(&db, &context, now_ms())) {
                        Ok(0) => {}
                        Ok(n) => log::debug!("retention removed {n} message(s)"),
                        Err(e) => log::error!("retention pass failed: {e}"),
                    }
                    pause = MIN_INTERVAL.max(started.elapsed() * 10);
                }
            })
            .expect("spawn retention thread");
        Some(Trimmer { stop, thread })
    }

    pub(crate) fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// Deletes every record whose messages are all outside the retention window of their stream,
/// and queues fully expired streams for removal; returns how many messages went.
pub(crate) fn trim(db: &sled::Db, context: &Context, now_ms: u64) -> Result<u64, StorageError> {
    let retention = context.retention;
    let max_age_ms = retention.max_age.as_millis() as u64;
    let expired_before = if max_age_ms == 0 { 0 } else { now_ms.saturating_sub(max_age_ms) };
    let mut removed = 0;
    let mut expired_streams = Vec::new();
    for item in db.scan_prefix([keys::NAME]) {
        let (name_key, id) = item?;
        let (Some(id), Ok(name)) = (keys::decode_u64(&id), std::str::from_utf8(&name_key[1..])) else {
            log::error!("retention: corrupt stream name entry, skipping it");
            continue;
        };
        // Streams the write API made keep every message until deleted or expired.
        if super::cache::stored_meta(db, id).map_or(true, |meta| meta.created) {
            continue;
        }
        let stored = super::cache::stored_tail(db, id)?;
        // The window counts from the durable tail. sled's newest record may not be durable
        // yet (applied, flush pending or failed): an entry in memory knows the durable tail.
        // Read sled first, the entry second: the writer inserts an entry before it applies
        // anything, and evicts one only when everything applied is durable, so either the
        // entry is there to lower the tail, or what sled showed was durable already.
        let tail = match context.cache.peek(name) {
            Some(entry) if entry.id == id => stored.last_seq.min(entry.visible.load(Ordering::Acquire)),
            _ => stored.last_seq,
        };
        let keep_from = match retention.max_messages {
            0 => 1,
            limit => tail.saturating_sub(limit) + 1,
        };
        let all_expired = max_age_ms > 0 && stored.newest_timestamp_ms < expired_before;
        if all_expired {
            expired_streams.push((Arc::from(name), id));
            if stored.newest_timestamp_ms > 0 {
                // Every record is about to go, the newest too: first make the stream record
                // carry the tail, so the next append after a restart does not reuse sequence
                // numbers. Done before the deletes, so sled's crash recovery (a prefix of the
                // log) can never keep the deletes without it.
                raise_last_seq(db, id, tail)?;
            }
        }
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        for item in db.range(keys::record_key(id, 0)..=keys::record_key(id, u64::MAX)) {
            let (key, value) = item?;
            // A record goes as a whole: when it is expired by age (one timestamp for all its
            // messages) or when all its messages fall before the count window. Reads hide the
            // part of a straddling record that is outside the window.
            let Some(record) = keys::LogRecord::parse(&key, &value) else {
                // Never delete what cannot be read; reads of it report the corruption.
                log::error!("retention: corrupt log record of stream id {id}, skipping the stream");
                break;
            };
            if record.last_seq() > tail || (record.last_seq() >= keep_from && record.timestamp_ms >= expired_before) {
                break;
            }
            removed += record.count() as u64;
            crate::metrics::get().messages_trimmed.inc_by(record.count() as u64);
            batch.remove(key);
            in_batch += 1;
            if in_batch == BATCH_DELETES {
                db.apply_batch(std::mem::take(&mut batch))?;
                in_batch = 0;
            }
        }
        if in_batch > 0 {
            db.apply_batch(batch)?;
        }
    }
    // This pass's view replaces the last one (the writer may not have taken it yet).
    *context.removals.lock().expect("removals lock") = expired_streams;
    Ok(removed)
}

/// Sets the stream record's `last_seq` to at least `tail`, atomically with respect to other
/// writers of the record (the writer creates it, and removes it with its stream). A record
/// that is gone stays gone.
fn raise_last_seq(db: &sled::Db, id: u64, tail: u64) -> Result<(), StorageError> {
    db.update_and_fetch(keys::stream_key(id), |old| {
        let old = old?;
        // An unreadable record is left as it is (reads report the corruption).
        let Some(mut record) = StreamRecord::decode(old) else { return Some(old.to_vec()) };
        record.last_seq = record.last_seq.max(tail);
        Some(record.encode())
    })?;
    Ok(())
}
