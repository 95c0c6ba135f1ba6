//! The read path: messages of one DS stream after a position, from any replica (batched
//! Direct Get), checked for what must be there and for gaps left by retention.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};

use super::{Cluster, READ_TIMEOUT};
use crate::offset::{Offset, Position};
use crate::storage::{Chunk, ReadError, StorageError};

/// Bytes allowed per read on top of twice the JSON budget, for stored headers.
const READ_OVERHEAD: usize = 64 * 1024;
/// Most messages one read asks for. Each comes as its own NATS message with ~200 bytes of
/// headers; bigger batches from several readers at once overran the reply subscription.
const READ_BATCH: usize = 1000;

impl Cluster {
    pub async fn read(&self, stream: &str, offset: Offset, max_bytes: usize) -> Result<Chunk, ReadError> {
        let started = std::time::Instant::now();
        let result = self.read_inner(stream, offset, max_bytes).await;
        crate::metrics::get().nats_read_seconds.observe(started.elapsed().as_secs_f64());
        result
    }

    async fn read_inner(&self, stream: &str, offset: Offset, max_bytes: usize) -> Result<Chunk, ReadError> {
        let epoch = self.inner.epoch;
        let at = |seq| Position { epoch, seq };
        let (after, from_token) = match offset {
            Offset::Now => {
                let tail = self.tail(stream).await?;
                return Ok(empty_chunk(tail));
            }
            Offset::Start => (0, false),
            Offset::At(position) if position.epoch != epoch => return Err(ReadError::Gone),
            Offset::At(position) => (position.seq, true),
        };
        // At most READS_AT_ONCE reads talk to JetStream at a time: each holds up to a chunk
        // of replies in memory while it is assembled.
        let _permit = tokio::time::timeout(READ_TIMEOUT, self.inner.reads.acquire())
            .await
            .map_err(|_| StorageError::Unavailable("too many reads waiting for JetStream".into()))?
            .map_err(|_| StorageError::Closed)?;
        let subject = self.subject(stream);
        // First the stream-wide position (see `lookup`), then what the answer must reach: the
        // tail this node was woken for, else the leader's.
        let seen = self.seen();
        let woken = self.inner.hub.tail(stream);
        let must = if woken > after { Some(woken) } else { self.leader_last(&subject).await? };
        let Some(must) = must.filter(|&must| must > after) else {
            return self.nothing_after(after, from_token, seen, must).await;
        };
        let mut attempt = 0;
        let batch = loop {
            // JetStream counts stored bytes (headers included) against `max_bytes`; ask for
            // more and cut at the JSON budget below.
            let budget = max_bytes.saturating_mul(2).saturating_add(READ_OVERHEAD);
            let batch = self
                .inner
                .direct
                .batch(&subject, after + 1, READ_BATCH, budget, READ_TIMEOUT)
                .await
                .map_err(|e| StorageError::Unavailable(e.to_string()))?;
            let last = batch.messages.last().map_or(0, |m| m.seq);
            // A replica behind the leader: it ended (nothing pending) before what must be there.
            let behind = last < must && batch.pending == 0;
            attempt += 1;
            if !behind || attempt >= 50 {
                break batch;
            }
            tokio::time::sleep(Duration::from_millis(attempt.min(10))).await;
        };
        // Fill the chunk up to its byte budget, as the sled engine does: more batches while
        // messages are pending.
        let mut batch = batch;
        let mut bytes: usize = batch.messages.iter().map(|m| m.payload.len() + 1).sum();
        while batch.pending > 0 && bytes < max_bytes {
            let Some(last) = batch.messages.last().map(|m| m.seq) else { break };
            let budget = (max_bytes - bytes).saturating_mul(2).saturating_add(READ_OVERHEAD);
            let more = self
                .inner
                .direct
                .batch(&subject, last + 1, READ_BATCH, budget, READ_TIMEOUT)
                .await
                .map_err(|e| StorageError::Unavailable(e.to_string()))?;
            if more.messages.is_empty() {
                break;
            }
            bytes += more.messages.iter().map(|m| m.payload.len() + 1).sum::<usize>();
            batch.pending = more.pending;
            batch.messages.extend(more.messages);
        }
        let Some(first) = batch.messages.first() else {
            return Err(StorageError::Unavailable(format!("a replica still lacks message {must}")).into());
        };
        if from_token {
            let prev = match (first.prev, first.prev_back) {
                (Some(prev), _) => prev,
                (None, Some(back)) => first.seq.saturating_sub(back),
                (None, None) => 0,
            };
            if prev > after {
                // The message before the first retained one, newer than the reader's
                // position, was deleted by retention: the reader missed it.
                return Err(ReadError::Gone);
            }
        }
        // As many messages as fit in `max_bytes` of JSON array (at least one), as the sled
        // engine answers.
        let mut size = 2;
        let mut count = 0;
        for message in &batch.messages {
            let more = message.payload.len() + usize::from(count > 0);
            if count > 0 && size + more > max_bytes {
                break;
            }
            size += more;
            count += 1;
        }
        let mut body = BytesMut::with_capacity(size);
        body.put_u8(b'[');
        let mut next = after;
        for (i, message) in batch.messages[..count].iter().enumerate() {
            if i > 0 {
                body.put_u8(b',');
            }
            body.put_slice(&message.payload);
            next = message.seq;
        }
        body.put_u8(b']');
        let complete = count == batch.messages.len() && batch.pending == 0;
        Ok(Chunk {
            body: body.freeze(),
            count,
            start: at(after),
            next: at(next),
            up_to_date: complete && next >= must,
            meta: None,
        })
    }

    /// The answer when the subject holds nothing after `after`: `last` is its last message
    /// (`None`: it holds none), `seen` the stream-wide sequence learned before asking.
    ///
    /// Where a reader goes on from may move ahead to `seen` whenever nothing of the stream lies
    /// between: no message of it after `after` is stored (the leader just said so) or was
    /// deleted (checked below), and any later one follows `seen`.
    async fn nothing_after(
        &self,
        after: u64,
        from_token: bool,
        seen: u64,
        last: Option<u64>,
    ) -> Result<Chunk, ReadError> {
        let at = |seq| Position { epoch: self.inner.epoch, seq };
        if !from_token {
            // From the start: the position after everything stored before the subject was
            // seen empty (any later message of the stream follows it), as the tail answers.
            return Ok(empty_chunk(at(seen)));
        }
        match last {
            // At the stream's last message: stay there, unless it is old (`lookup::Aging`).
            Some(last) if last == after => {
                let next = if last <= self.inner.aging.old() { after.max(seen) } else { after };
                Ok(empty_chunk(at(next)))
            }
            // Past the stream's last message (a position moved on before): fine unless past
            // everything ever stored.
            Some(_) => {
                if after > seen && after > self.state().await?.last_sequence {
                    return Err(ReadError::Gone);
                }
                Ok(empty_chunk(at(after.max(seen))))
            }
            None => {
                // Asked after the subject was seen empty: whatever retention deleted before
                // that is before the stream's first sequence now.
                let state = self.state().await?;
                if after > state.last_sequence {
                    return Err(ReadError::Gone);
                }
                if after + 1 < state.first_sequence {
                    // Nothing is left of the stream, and its messages after `after` (if it had
                    // any) would be before the first sequence still stored: retention may have
                    // deleted messages this reader never got. JetStream forgot the stream's
                    // last sequence with its last message, so a reader that had read it cannot
                    // be told apart (unless it was moved on in time, see `lookup::Aging`):
                    // `410` for both; a re-read from the start costs it nothing.
                    return Err(ReadError::Gone);
                }
                Ok(empty_chunk(at(after.max(seen))))
            }
        }
    }
}

fn empty_chunk(position: Position) -> Chunk {
    Chunk { body: Bytes::from_static(b"[]"), count: 0, start: position, next: position, up_to_date: true, meta: None }
}
