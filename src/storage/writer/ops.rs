//! What the writer does with each kind of request: the checks a write makes against its
//! stream and the keys it writes. All of it runs on the writer thread, the only appender, so
//! nothing can come between a check (closed, content type, `Stream-Seq`, existence) and the
//! append it allows: that is what makes check-and-append atomic per stream.
//!
//! Appends (broadcasts and `POST`s) are grouped: each request is checked against the stream
//! as the requests before it in the group left it, and a refused request writes nothing.
//! Requests that create or remove a stream are committed alone (`writer::run`), which keeps
//! the bookkeeping of names, ids and the sequence floor to one request at a time.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use super::forks::Removal;
use super::{each_request_in_one_key, Op, Request, Run, State};
use crate::meta::{SharedMeta, StreamMeta};
use crate::storage::cache::{StoredTail, StreamEntry};
use crate::storage::expiry;
use crate::storage::keys::{self, StreamRecord};
use crate::storage::tombstones::{self, Ending, NextLife, Tombstone};
use crate::storage::{now_ms, StorageError};
use crate::writes::{
    check_broadcast, plan_append, same_configuration, Append, AppendPlan, ProducerState, Refusal, WriteOp, WriteOutcome,
};

/// What applying one group did, to publish after its flush.
pub(in crate::storage) struct Applied {
    pub(super) runs: Vec<Run>,
    /// Metadata changed by the group, published after the tails.
    pub(super) metas: Vec<(Arc<StreamEntry>, SharedMeta)>,
    /// Streams removed (their entries leave memory after the flush).
    pub(super) removed: Vec<Arc<str>>,
    /// One per request.
    pub(super) results: Vec<Result<WriteOutcome, Refusal>>,
    /// Whether anything was written (else there is nothing to flush).
    pub(super) wrote: bool,
}

impl Applied {
    fn answer(result: Result<WriteOutcome, Refusal>) -> Applied {
        Applied { runs: Vec::new(), metas: Vec::new(), removed: Vec::new(), results: vec![result], wrote: false }
    }
}

/// Bytes a write op holds while it waits for the writer.
pub(super) fn op_bytes(op: &WriteOp) -> usize {
    match op {
        WriteOp::Create { meta, messages } => meta.content_type.len() + messages.iter().map(Bytes::len).sum::<usize>(),
        WriteOp::Append(append) => {
            append.messages.iter().map(Bytes::len).sum::<usize>() + append.seq.as_ref().map_or(0, String::len)
        }
        WriteOp::Delete => 0,
    }
}

/// The group's view of the streams it touched: their open runs and changed metadata.
#[derive(Default)]
struct Group {
    runs: Vec<Run>,
    /// Stream name → index in `runs`.
    index: HashMap<Arc<str>, usize>,
    /// Stream id → metadata as the group's requests so far left it.
    metas: HashMap<u64, (Arc<StreamEntry>, SharedMeta)>,
    records: Vec<([u8; 17], Vec<u8>)>,
    created: super::Created,
    /// (stream id, producer id) → producer state after the group's requests so far.
    producers: HashMap<(u64, String), ProducerState>,
}

impl Group {
    fn meta(&self, entry: &StreamEntry) -> SharedMeta {
        self.metas.get(&entry.id).map_or_else(|| entry.meta(), |(_, meta)| meta.clone())
    }

    /// The stream's tail as the group's requests so far left it.
    fn tail(&self, entry: &StreamEntry) -> u64 {
        match self.index.get(&entry.name) {
            Some(&i) => self.runs[i].last_seq,
            None => entry.allocated.load(Ordering::Acquire),
        }
    }

    /// A producer's state on a stream: as the group left it, else as stored.
    fn producer_state(&self, db: &sled::Db, id: u64, producer: &str) -> Result<Option<ProducerState>, StorageError> {
        if let Some(state) = self.producers.get(&(id, producer.to_string())) {
            return Ok(Some(*state));
        }
        match db.get(keys::producer_key(id, producer))? {
            Some(bytes) => {
                ProducerState::decode(&bytes).map(Some).ok_or_else(|| crate::storage::corrupt("producer state"))
            }
            None => Ok(None),
        }
    }

    /// The entry of a stream the group already touched.
    fn entry(&self, stream: &str) -> Option<Arc<StreamEntry>> {
        self.index.get(stream).map(|&i| self.runs[i].entry.clone())
    }

    /// Adds `messages` to the stream's run (made on the first message: a write without any
    /// makes none).
    fn push<'m>(&mut self, entry: &Arc<StreamEntry>, messages: impl IntoIterator<Item = &'m Bytes>, now: u64) {
        let mut messages = messages.into_iter().peekable();
        if messages.peek().is_none() {
            return;
        }
        let i = match self.index.get(&entry.name) {
            Some(&i) => i,
            None => {
                self.runs.push(Run::new(entry.clone(), now));
                self.index.insert(entry.name.clone(), self.runs.len() - 1);
                self.runs.len() - 1
            }
        };
        let run = &mut self.runs[i];
        for message in messages {
            run.push(message, &mut self.records);
        }
    }
}

impl State {
    /// Applies a group (or one structural request) to sled, unflushed.
    pub(super) fn apply(&mut self, db: &sled::Db, group: &[Request]) -> Result<Applied, StorageError> {
        match group {
            [Request { op: Op::Write { stream, op: WriteOp::Create { meta, messages } }, .. }] => {
                self.apply_create(db, stream, meta, messages)
            }
            [Request { op: Op::Write { stream, op: WriteOp::Delete }, .. }] => self.apply_remove(db, stream, false),
            [Request { op: Op::Expire { stream }, .. }] => self.apply_remove(db, stream, true),
            _ => self.apply_appends(db, group),
        }
    }

    /// Appends of a group: each stream's messages become one log record (more if they exceed
    /// the record size), so sled sees one key per stream per group, not one per message.
    fn apply_appends(&mut self, db: &sled::Db, requests: &[Request]) -> Result<Applied, StorageError> {
        let now = now_ms();
        let mut group = Group::default();
        let mut results = Vec::with_capacity(requests.len());
        for request in requests {
            let result = match &request.op {
                Op::Broadcast(messages) => self.plan_broadcast(db, &mut group, messages, now),
                Op::Write { stream, op: WriteOp::Append(append) } => {
                    self.plan_append(db, &mut group, stream, append, now)
                }
                // `writer::run` commits these alone.
                _ => Err(StorageError::Sled("internal: a structural write in an append group".into())),
            };
            match result {
                Ok(result) => results.push(result),
                Err(e) => {
                    self.forget(&group.created);
                    return Err(e);
                }
            }
        }
        let Group { mut runs, metas, mut records, created, producers, .. } = group;
        for run in &mut runs {
            run.close(&mut records);
        }
        let wrote = !records.is_empty() || !created.is_empty() || !metas.is_empty() || !producers.is_empty();
        if wrote {
            // Each request must be stored whole or not at all. When every request names one
            // stream, and each stream's messages fit one record, every request lies in a single
            // key, which a plain `insert` stores atomically. sled's `apply_batch` is dearer than
            // it looks: it rolls the log buffer and writes and syncs it on the spot, on top of
            // the group's flush (see docs/PERFORMANCE.md).
            let more_keys = !created.is_empty() || !metas.is_empty() || !producers.is_empty();
            let applied = if each_request_in_one_key(requests, runs.len(), records.len(), more_keys) {
                records.iter().try_for_each(|(key, value)| db.insert(key, &value[..]).map(drop))
            } else {
                let mut batch = sled::Batch::default();
                for (key, value) in records {
                    batch.insert(&key[..], value);
                }
                for (name, id, record) in &created {
                    batch.insert(keys::name_key(name), &keys::encode_u64(*id)[..]);
                    batch.insert(&keys::stream_key(*id)[..], record.encode());
                    if let Err(e) = tombstones::clear(db, &mut batch, name) {
                        self.forget(&created);
                        return Err(e);
                    }
                }
                if !created.is_empty() {
                    batch.insert(keys::META_NEXT_STREAM_ID, &keys::encode_u64(self.next_stream_id)[..]);
                }
                for (entry, meta) in metas.values() {
                    batch.insert(&keys::meta_key(entry.id)[..], meta.encode());
                }
                for ((id, producer), state) in &producers {
                    batch.insert(keys::producer_key(*id, producer), &state.encode()[..]);
                }
                db.apply_batch(batch)
            };
            if let Err(e) = applied {
                self.failed.store(true, Ordering::Release);
                self.forget(&created);
                log::error!("append failed: {e}");
                return Err(e.into());
            }
        }
        if !created.is_empty() {
            self.streams_created.store(self.next_stream_id - 1, Ordering::Relaxed);
        }
        for run in &runs {
            run.entry.allocated.store(run.last_seq, Ordering::Release);
            run.entry.last_timestamp_ms.store(run.timestamp_ms, Ordering::Release);
        }
        Ok(Applied { runs, metas: metas.into_values().collect(), removed: Vec::new(), results, wrote })
    }

    /// A broadcast: every stream it names must take JSON messages (or not exist yet), else
    /// the whole request is refused and none of it is written.
    fn plan_broadcast(
        &mut self,
        db: &sled::Db,
        group: &mut Group,
        messages: &[crate::storage::NewMessage],
        now: u64,
    ) -> Result<Result<WriteOutcome, Refusal>, StorageError> {
        let mut entries: HashMap<&str, Option<Arc<StreamEntry>>> = HashMap::new();
        // A batch's messages usually come in runs to one stream: each run costs one look-up.
        let runs = || messages.chunk_by(|a, b| a.stream == b.stream);
        for run in runs() {
            let stream: &str = &run[0].stream;
            if entries.contains_key(stream) {
                continue;
            }
            let entry = match group.entry(stream) {
                Some(entry) => Some(entry),
                None => self.cache.get_or_load(db, stream)?,
            };
            if let Some(entry) = &entry {
                if let Err(refusal) = check_broadcast(&group.meta(entry), group.tail(entry)) {
                    return Ok(Err(refusal));
                }
            }
            entries.insert(stream, entry);
        }
        for run in runs() {
            let stream: &str = &run[0].stream;
            let entry = match entries.get(stream).cloned().flatten() {
                Some(entry) => entry,
                None => {
                    let entry = self.create(db, stream, &mut group.created)?;
                    entries.insert(stream, Some(entry.clone()));
                    entry
                }
            };
            entry.renew(now);
            group.push(&entry, run.iter().map(|m| &m.json), now);
        }
        Ok(Ok(WriteOutcome::Broadcast))
    }

    /// A `POST`: append and/or close, after the checks of WRITE.md §2.1.
    fn plan_append(
        &mut self,
        db: &sled::Db,
        group: &mut Group,
        stream: &str,
        append: &Append,
        now: u64,
    ) -> Result<Result<WriteOutcome, Refusal>, StorageError> {
        let entry = match group.entry(stream) {
            Some(entry) => entry,
            None => match self.cache.get_or_load(db, stream)? {
                Some(entry) => entry,
                None => return Ok(Err(Refusal::NotFound)),
            },
        };
        let meta = group.meta(&entry);
        if meta.deleted {
            return Ok(Err(Refusal::Deleted));
        }
        if entry.expired(&meta, now) {
            return Ok(Err(Refusal::NotFound));
        }
        let producer_state = match &append.producer {
            Some(p) => group.producer_state(db, entry.id, &p.id)?,
            None => None,
        };
        entry.renew(now);
        let tail = group.tail(&entry);
        let (next, producer) = match plan_append(&meta, tail, append, producer_state) {
            Ok(AppendPlan::Write { meta, producer }) => (meta, producer),
            Ok(AppendPlan::Duplicate { state, closed }) => {
                return Ok(Ok(WriteOutcome::Duplicate { tail, closed, epoch: state.epoch, seq: state.last_seq }));
            }
            Err(refusal) => return Ok(Err(refusal)),
        };
        group.push(&entry, &append.messages, now);
        if let (Some(p), Some(state)) = (&append.producer, producer) {
            // Written in the same batch as the messages: a retry after any crash finds both
            // or neither (WRITE.md §3.4).
            group.producers.insert((entry.id, p.id.clone()), state);
        }
        let closed = next.closed;
        if next != *meta {
            group.metas.insert(entry.id, (entry.clone(), Arc::new(next)));
        }
        let echo = append.producer.as_ref().map(|p| (p.epoch, p.seq));
        Ok(Ok(WriteOutcome::Appended { tail: group.tail(&entry), closed, producer: echo }))
    }

    /// A `PUT`: the stream is there with the same configuration (`200`, nothing written), or
    /// with another one (`409`), or it is created with its first messages (an expired stream
    /// under the name is purged in the same batch).
    fn apply_create(
        &mut self,
        db: &sled::Db,
        stream: &Arc<str>,
        requested: &StreamMeta,
        messages: &[Bytes],
    ) -> Result<Applied, StorageError> {
        let now = now_ms();
        let mut batch = sled::Batch::default();
        let mut buried = tombstones::get(db, stream)?;
        let mut released = Removal::default();
        if let Some(entry) = self.cache.get_or_load(db, stream)? {
            let current = entry.meta();
            // A stream forks still read is there for a `PUT` even once expired (its path is
            // taken until the last fork goes: `409`).
            if current.deleted || current.forks > 0 || !entry.expired(&current, now) {
                let tail = entry.visible.load(Ordering::Acquire);
                return Ok(Applied::answer(if same_configuration(&current, requested) {
                    Ok(WriteOutcome::Exists { tail, closed: current.closed })
                } else {
                    Err(Refusal::ConfigMismatch)
                }));
            }
            // Purged and replaced in this batch: no tombstone, but the new stream starts
            // after the expired one's tail, as if it had one.
            let tail = entry.allocated.load(Ordering::Acquire);
            self.remove_stream(db, &mut batch, &entry, None, &mut released)?;
            buried = Some(Tombstone { last_seq: tail, removed_ms: now, ending: Ending::Ended });
        }
        let fork = match &requested.fork {
            Some(fork) => match self.plan_fork(db, fork, &requested.content_type)? {
                Ok(plan) => Some(plan),
                Err(refusal) => return Ok(Applied::answer(Err(refusal))),
            },
            None => None,
        };
        tombstones::clear(db, &mut batch, stream)?;
        let floor = self.seq_floor.load(Ordering::Acquire);
        // A fork shares its source's positions up to the fork point: its own follow it.
        let base = match &fork {
            Some(plan) => plan.at,
            None => Tombstone::next_life(buried.as_ref(), floor, NextLife::Put).0,
        };
        let id = self.next_stream_id;
        self.next_stream_id += 1;
        let mut stored = StreamMeta { created: true, created_ms: now, ..requested.clone() };
        if let (Some(plan), Some(fork)) = (&fork, &mut stored.fork) {
            fork.at = plan.at;
        }
        let opening = Arc::new(StreamMeta { closed: false, ..stored.clone() });
        let tail = StoredTail { last_seq: base, newest_timestamp_ms: 0, base, prev_tail: None };
        let entry = Arc::new(StreamEntry::with_meta(stream.clone(), id, tail, opening));
        let mut run = Run::new(entry.clone(), now);
        let mut records = Vec::new();
        for message in messages {
            run.push(message, &mut records);
        }
        run.close(&mut records);
        for (key, value) in records {
            batch.insert(&key[..], value);
        }
        batch.insert(keys::name_key(stream), &keys::encode_u64(id)[..]);
        batch.insert(&keys::stream_key(id)[..], StreamRecord::with_base(base).encode());
        batch.insert(&keys::meta_key(id)[..], stored.encode());
        batch.insert(keys::META_NEXT_STREAM_ID, &keys::encode_u64(self.next_stream_id)[..]);
        if let Some(deadline) = stored.deadline_ms(now) {
            expiry::schedule(&mut batch, deadline, id, stream);
        }
        let mut metas = released.metas;
        if let Some(plan) = fork {
            // The source's count goes up in the fork's own batch: both or neither.
            batch.insert(&keys::meta_key(plan.source.id)[..], plan.source_meta.encode());
            metas.push((plan.source, Arc::new(plan.source_meta)));
        }
        // Replaces an expired stream's entry, if there was one.
        self.cache.insert(entry.clone());
        if let Err(e) = db.apply_batch(batch) {
            self.failed.store(true, Ordering::Release);
            self.cache.remove(stream);
            log::error!("creating stream {stream:?} failed: {e}");
            return Err(e.into());
        }
        self.streams_created.store(self.next_stream_id - 1, Ordering::Relaxed);
        entry.allocated.store(run.last_seq, Ordering::Release);
        entry.last_timestamp_ms.store(run.timestamp_ms, Ordering::Release);
        let result = Ok(WriteOutcome::Created { tail: run.last_seq, closed: stored.closed });
        let runs = if messages.is_empty() { Vec::new() } else { vec![run] };
        metas.push((entry, Arc::new(stored)));
        // (A purged fork's released sources that went with it; not the name just made.)
        released.removed.retain(|name| name != stream);
        Ok(Applied { runs, metas, removed: released.removed, results: vec![result], wrote: true })
    }

    /// `DELETE` (or, with `only_if_expired`, the removal of an expired stream).
    fn apply_remove(
        &mut self,
        db: &sled::Db,
        stream: &Arc<str>,
        only_if_expired: bool,
    ) -> Result<Applied, StorageError> {
        let Some(entry) = self.cache.get_or_load(db, stream)? else {
            return Ok(Applied::answer(Err(Refusal::NotFound)));
        };
        let meta = entry.meta();
        if meta.deleted {
            // Soft-deleted already: `410` to a DELETE; nothing more to expire.
            let refusal = if only_if_expired { Refusal::NotFound } else { Refusal::Deleted };
            return Ok(Applied::answer(Err(refusal)));
        }
        let expired = entry.expired(&meta, now_ms());
        if only_if_expired && !expired {
            return Ok(Applied::answer(Err(Refusal::NotFound)));
        }
        let mut batch = sled::Batch::default();
        let mut removal = Removal::default();
        self.remove_stream(db, &mut batch, &entry, Some(Ending::Ended), &mut removal)?;
        if let Err(e) = db.apply_batch(batch) {
            self.failed.store(true, Ordering::Release);
            log::error!("removing stream {stream:?} failed: {e}");
            return Err(e.into());
        }
        crate::metrics::get().streams_removed.inc_by(removal.removed.len() as u64);
        // An expired stream is gone for its clients already: its DELETE is a 404.
        let result = if expired { Err(Refusal::NotFound) } else { Ok(WriteOutcome::Deleted) };
        Ok(Applied {
            runs: Vec::new(),
            metas: removal.metas,
            removed: removal.removed,
            results: vec![result],
            wrote: true,
        })
    }

    /// Removes streams whose TTL or Expires-At passed and that nobody touched since, from the
    /// expiry index: at most `max` entries. An entry whose stream was renewed moves to its new
    /// deadline; one whose stream is gone is dropped. Returns how many streams went.
    pub(super) fn sweep_expired(&mut self, db: &sled::Db, max: usize) -> Result<usize, StorageError> {
        let now = now_ms();
        let mut removed = 0;
        for due in expiry::due(db, now, max)? {
            let mut batch = sled::Batch::default();
            batch.remove(due.key.clone());
            match self.cache.get_or_load(db, &due.name)? {
                Some(entry) if entry.id == due.id => {
                    let meta = entry.meta();
                    if entry.expired(&meta, now) {
                        let applied = self.apply_remove(db, &Arc::from(due.name.as_str()), true)?;
                        removed += applied.removed.len();
                        self.publish(applied.runs, applied.metas, applied.removed);
                    } else if let Some(deadline) = meta.deadline_ms(entry.last_access_ms.load(Ordering::Acquire)) {
                        expiry::schedule(&mut batch, deadline.max(now + 1), entry.id, &entry.name);
                    }
                }
                // Deleted, replaced, or an unreadable entry.
                _ => {}
            }
            db.apply_batch(batch)?;
        }
        Ok(removed)
    }

    /// Adds the removal of every key of `entry`'s stream to `batch` (and its tombstone, if
    /// `ending`), and raises the store's sequence floor to its tail first (in memory, and in
    /// the batch), so no later stream hands out a token the removed one handed out.
    pub(super) fn remove_keys(
        &self,
        db: &sled::Db,
        batch: &mut sled::Batch,
        entry: &StreamEntry,
        ending: Option<Ending>,
    ) -> Result<(), StorageError> {
        let tail = entry.allocated.load(Ordering::Acquire);
        let floor = self.seq_floor.fetch_max(tail, Ordering::AcqRel).max(tail);
        batch.insert(keys::META_SEQ_FLOOR, &keys::encode_u64(floor)[..]);
        if let Some(ending) = ending {
            let tombstone = Tombstone { last_seq: tail, removed_ms: now_ms(), ending };
            tombstones::bury(db, batch, &entry.name, tombstone, self.tombstone_ttl_ms)?;
        }
        remove_stream_keys(db, batch, &entry.name, entry.id)
    }
}

/// Adds the removal of a stream's name, records and metadata to `batch`.
pub(in crate::storage) fn remove_stream_keys(
    db: &sled::Db,
    batch: &mut sled::Batch,
    name: &str,
    id: u64,
) -> Result<(), StorageError> {
    batch.remove(keys::name_key(name));
    batch.remove(&keys::stream_key(id)[..]);
    batch.remove(&keys::meta_key(id)[..]);
    for item in db.range(keys::record_key(id, 0)..=keys::record_key(id, u64::MAX)) {
        batch.remove(item?.0);
    }
    for item in db.scan_prefix(keys::producer_prefix(id)) {
        batch.remove(item?.0);
    }
    Ok(())
}
