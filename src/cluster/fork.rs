//! Forks in cluster mode (WRITE.md §5; the shared part is `forks.rs`).
//!
//! Positions are the log's sequence numbers, so a fork's own messages, stored after it was
//! made, all follow its fork point: no base to keep, only the fork point in its metadata.
//! Its source's count of forks is a `meta` control message on the source's subject, stored in
//! the same atomic batch as the fork's first message, each guarded by its subject's last
//! sequence: both or neither, and neither if either stream moved since it was checked (the
//! write then starts over). Removal does the same up the chain: the stream's `delete`, its
//! source's lower count (or, for a deleted source whose last fork this was, its `delete`), and
//! so on, in one batch. A stream with forks is only marked deleted (`meta`), and stays.

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::HeaderMap;
use bytes::Bytes;

use super::access::Life;
use super::direct::Item;
use super::publish::{Outgoing, Prev, Publish};
use super::read::inherits;
use super::state::{self, Control, StreamState};
use super::Cluster;
use crate::forks::{Level, MAX_DEPTH};
use crate::meta::{self, normalize, Framing, StreamMeta};
use crate::offset::{Offset, Position};
use crate::storage::{Chunk, ReadError, StorageError};
use crate::writes::{Refusal, WriteOutcome};

/// The largest JSON `Stream-Fork-Sub-Offset` cluster mode resolves (one read per value; the
/// protocol means it to cut into the message batch after the fork offset).
const MAX_JSON_SUB_OFFSET: u64 = 10_000;

/// A message of a multi-stream publish, before its headers: stream, payload, metadata after
/// it, control, the stream's tail (for `meta`), and its life (see `state`; a `meta` message
/// carries its stream's on, so its producers' records stay current).
type Planned = (String, Bytes, StreamMeta, Option<Control>, u64, Option<u64>);

/// What a removal publishes: the messages, their guards, and the streams removed (whether a
/// producer wrote them: they have records to purge too).
type RemovalPlan = (Vec<Planned>, Vec<(String, Prev)>, Vec<(String, bool)>);

impl Cluster {
    /// A fork's read of its source: the messages after `offset` up to `cap`, whatever the
    /// source's state (deleted, expired), renewing nothing; or, if the source is a fork itself
    /// and the read starts in what it inherits, where to read on.
    pub(super) async fn read_capped(
        &self,
        stream: &str,
        offset: Offset,
        max_bytes: usize,
        cap: u64,
    ) -> Result<Level, ReadError> {
        let epoch = self.inner.epoch;
        let after = match offset {
            Offset::Start => 0,
            Offset::At(position) if position.epoch == epoch => position.seq,
            _ => return Err(ReadError::Gone),
        };
        let state = match self.known(stream) {
            Some(state) if state.meta.is_some() => state,
            _ => self.stream_state(stream).await?,
        };
        let Some(meta) = state.meta.clone() else {
            log::error!("fork source {stream:?} is missing");
            return Err(crate::storage::corrupt("fork (its source is missing)").into());
        };
        if let Some(fork) = meta.fork.as_ref().filter(|f| inherits(offset, f.at)) {
            return Ok(Level::Inherit { source: fork.source.clone(), at: fork.at, meta });
        }
        let subject = self.subject(stream);
        let (mut taken, mut from, mut bytes, mut complete) = (Vec::<Item>::new(), after, 0, after >= cap);
        while !complete && bytes < max_bytes {
            let Some(batch) = self.fetch_through(&subject, from, cap, max_bytes - bytes).await? else {
                return Err(crate::storage::corrupt("fork (its source lost messages)").into());
            };
            let (pending, empty) = (batch.pending, batch.messages.is_empty());
            for item in batch.messages {
                if item.seq > cap {
                    complete = true;
                    break;
                }
                from = item.seq;
                bytes += item.payload.len() + 1;
                taken.push(item);
            }
            complete |= pending == 0 || empty;
        }
        // An earlier life of the name, not purged yet, is not the source's.
        if let Some(i) = taken.iter().rposition(|m| m.marks.control == Some(Control::Delete)) {
            taken.drain(..=i);
        }
        let data = taken.iter().filter(|m| m.marks.is_message()).count();
        let batch = super::direct::Batch { messages: taken, pending: u64::from(!complete), from_cache: false };
        let mut chunk = if batch.messages.is_empty() {
            let at = Position { epoch, seq: after };
            let body = crate::framing::empty_body(meta.framing());
            Chunk { body, count: 0, start: at, next: at, up_to_date: false, meta: Some(meta.clone()) }
        } else {
            self.frame(&batch, after, cap, max_bytes, meta.clone())
        };
        // Everything up to the fork point read: the chunk ends there, even between messages.
        chunk.up_to_date = complete && chunk.count == data;
        if chunk.up_to_date {
            chunk.next = Position { epoch, seq: cap };
        }
        Ok(Level::Chunk(chunk))
    }

    /// A fork `PUT` under a name where no stream lives (`target`): the source checked and
    /// its count raised in the batch that stores the fork. `None`: a subject moved, look again.
    pub(super) async fn create_fork(
        &self,
        stream: &str,
        target: &StreamState,
        requested: &StreamMeta,
        messages: &[Bytes],
        now: u64,
    ) -> Result<Option<Result<WriteOutcome, Refusal>>, StorageError> {
        let Some(fork) = &requested.fork else { return Ok(Some(Err(Refusal::ForkSourceNotFound))) };
        let source = self.stream_state(&fork.source).await?;
        let found = match self.life(&fork.source, &source) {
            Life::Live(meta) => meta,
            Life::Missing | Life::Expired => return Ok(Some(Err(Refusal::ForkSourceNotFound))),
        };
        if found.deleted {
            return Ok(Some(Err(Refusal::ForkSourceDeleted)));
        }
        if !found.created {
            return Ok(Some(Err(Refusal::ForkSourceTrimmed)));
        }
        if normalize(&requested.content_type) != normalize(&found.content_type) {
            return Ok(Some(Err(Refusal::ContentTypeMismatch)));
        }
        if self.depth(&found).await? >= MAX_DEPTH {
            return Ok(Some(Err(Refusal::ForkOffset(format!("the source is {MAX_DEPTH} forks deep already")))));
        }
        if fork.anchor > source.tail {
            let why = format!("past the source's tail {}", source.tail);
            return Ok(Some(Err(Refusal::ForkOffset(why))));
        }
        let at = match Framing::of(&requested.content_type) {
            Framing::Json if fork.sub > 0 => {
                match self.nth_after(&fork.source, fork.anchor, fork.sub, source.tail).await? {
                    Some(at) => at,
                    None => {
                        let why = format!("{} is past the values after the fork offset", fork.sub);
                        return Ok(Some(Err(Refusal::ForkSubOffset(why))));
                    }
                }
            }
            _ => fork.anchor,
        };
        let mut stored = StreamMeta { created: true, created_ms: now, ..requested.clone() };
        if let Some(fork) = &mut stored.fork {
            fork.at = at;
        }
        let counted = StreamMeta { forks: found.forks + 1, ..(*found).clone() };
        let mut planned: Vec<Planned> =
            vec![(fork.source.clone(), Bytes::new(), counted.clone(), Some(Control::Meta), source.tail, source.life)];
        if messages.is_empty() {
            planned.push((stream.to_string(), Bytes::new(), stored.clone(), Some(Control::Create), 0, None));
        } else {
            let during = StreamMeta { closed: false, ..stored.clone() };
            for (i, message) in messages.iter().enumerate() {
                let meta = if i + 1 == messages.len() { stored.clone() } else { during.clone() };
                planned.push((stream.to_string(), message.clone(), meta, None, 0, None));
            }
        }
        let chain_start = if target.last == 0 { self.chain_start().await? } else { 0 };
        let prevs = [
            (fork.source.as_str(), Prev::after(source.last, source.last)),
            (stream, Prev::after(target.last, chain_start)),
        ];
        let Some(lasts) = self.publish_planned(&planned, &prevs, now).await? else {
            self.forget(&fork.source);
            return Ok(None);
        };
        let source_last = lasts[fork.source.as_str()];
        let meta = Arc::new(counted);
        let (tail, written_ms, life) = (source.tail, source.written_ms, source.life);
        self.remember(&fork.source, StreamState { last: source_last, tail, meta: Some(meta), written_ms, life });
        let last = lasts[stream];
        let written_ms = if stored.ttl_secs.is_some() { now } else { 0 };
        if written_ms > 0 {
            self.inner.accesses.record(stream, now);
        }
        let closed = stored.closed;
        self.remember(stream, StreamState { last, tail: last, meta: Some(Arc::new(stored)), written_ms, life: None });
        Ok(Some(Ok(WriteOutcome::Created { tail: last, closed })))
    }

    /// The removal of a stream as one batch (see the module docs): the messages to publish,
    /// their guards, and the subjects to purge once stored. A stream with forks is marked
    /// deleted; one already marked has nothing to do (`None`).
    pub(super) async fn removal(&self, stream: &str, state: &StreamState) -> Result<Option<RemovalPlan>, StorageError> {
        let meta = state.meta.clone().unwrap_or_else(meta::broadcast_stream);
        if meta.deleted {
            return Ok(None);
        }
        let mut prevs = vec![(stream.to_string(), Prev::after(state.last, state.last))];
        if meta.forks > 0 {
            let deleted = StreamMeta { deleted: true, ..(*meta).clone() };
            let planned =
                vec![(stream.to_string(), Bytes::new(), deleted, Some(Control::Meta), state.tail, state.life)];
            return Ok(Some((planned, prevs, Vec::new())));
        }
        let mut planned =
            vec![(stream.to_string(), Bytes::new(), StreamMeta::default(), Some(Control::Delete), 0, None)];
        let mut purged = vec![(stream.to_string(), state.life.is_some())];
        let mut up = meta.fork.clone();
        while let Some(fork) = up.take() {
            let source = self.stream_state(&fork.source).await?;
            let Some(current) = source.meta.clone() else {
                log::error!("fork source {:?} of a removed stream is missing", fork.source);
                break;
            };
            prevs.push((fork.source.clone(), Prev::after(source.last, source.last)));
            let forks = current.forks.saturating_sub(1);
            if forks == 0 && current.deleted {
                planned.push((
                    fork.source.clone(),
                    Bytes::new(),
                    StreamMeta::default(),
                    Some(Control::Delete),
                    0,
                    None,
                ));
                purged.push((fork.source.clone(), source.life.is_some()));
                up = current.fork.clone();
            } else {
                let released = StreamMeta { forks, ..(*current).clone() };
                planned.push((
                    fork.source.clone(),
                    Bytes::new(),
                    released,
                    Some(Control::Meta),
                    source.tail,
                    source.life,
                ));
            }
        }
        Ok(Some((planned, prevs, purged)))
    }

    /// Publishes planned messages of several streams as one guarded batch; the last sequence
    /// of each stream in it, or `None` if a subject moved.
    pub(super) async fn publish_planned(
        &self,
        planned: &[Planned],
        prevs: &[(&str, Prev)],
        now: u64,
    ) -> Result<Option<HashMap<String, u64>>, StorageError> {
        let outgoing: Vec<Outgoing> = planned
            .iter()
            .map(|(stream, payload, meta, control, tail, life)| {
                let mut headers = HeaderMap::new();
                state::mark(&mut headers, meta, *life, *control, *tail, now);
                if *control == Some(Control::Delete) && self.inner.tombstone_ttl > 0 {
                    // The removed stream's tombstone (see `write::remove`).
                    headers.insert("Nats-TTL", format!("{}s", self.inner.tombstone_ttl).as_str());
                }
                Outgoing { stream, payload: payload.clone(), headers, record: None }
            })
            .collect();
        self.check_sizes(&outgoing)?;
        let prevs: HashMap<&str, Prev> = prevs.iter().copied().collect();
        match self.publish_guarded(&outgoing, &prevs).await {
            Ok(last) => {
                let lasts = self.published(&outgoing, last);
                // What this node remembered of them is out of date (callers remember anew).
                for stream in prevs.keys() {
                    self.forget(stream);
                }
                Ok(Some(lasts.into_iter().map(|(s, seq)| (s.to_string(), seq)).collect()))
            }
            Err(Publish::Moved) => {
                for (stream, _) in prevs {
                    self.forget(stream);
                }
                Ok(None)
            }
            Err(Publish::Failed(e)) => Err(e),
        }
    }

    /// How many forks deep `meta`'s stream is (1: no fork).
    async fn depth(&self, meta: &StreamMeta) -> Result<usize, StorageError> {
        let (mut depth, mut up) = (1, meta.fork.clone());
        while let Some(fork) = up.take() {
            depth += 1;
            if depth >= MAX_DEPTH {
                break;
            }
            up = self.stream_state(&fork.source).await?.meta.and_then(|m| m.fork.clone());
        }
        Ok(depth)
    }

    /// The position of the `n`-th message of `stream` after `after` (up to `tail`, through
    /// the chain's levels): a JSON fork's sub-offset. `None`: there are fewer.
    async fn nth_after(&self, stream: &str, after: u64, n: u64, tail: u64) -> Result<Option<u64>, StorageError> {
        if n > MAX_JSON_SUB_OFFSET {
            return Ok(None);
        }
        let (mut position, mut left) = (after, n);
        while left > 0 && position < tail {
            // One message per read: its position is where the chunk ends.
            let offset = Offset::At(Position { epoch: self.inner.epoch, seq: position });
            let engine = crate::engine::Engine::Nats(self.clone());
            let chunk = match crate::forks::read(&engine, stream, offset, 1).await {
                Ok(chunk) => chunk,
                Err(ReadError::Storage(e)) => return Err(e),
                Err(ReadError::Gone) => return Ok(None),
            };
            if chunk.count == 0 || chunk.next.seq <= position {
                return Ok(None);
            }
            position = chunk.next.seq;
            left -= 1;
        }
        Ok((left == 0).then_some(position))
    }
}
