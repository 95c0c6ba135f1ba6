//! The read path: messages of one DS stream after a position, from any replica (batched
//! Direct Get), checked for what must be there, for gaps left by retention, and framed for
//! the stream's content type. The stream's metadata comes with its messages (`state`): the
//! last message read says what the stream is, so a chunk that reaches the tail of a closed
//! stream says so, and one of a removed or expired stream says it does not exist.

use std::time::Duration;

use super::cache::{Framed, Token};
use super::direct::{Batch, Item};
use super::flights::{Boarding, Pilot};
use super::state::Marks;
use super::state::{Control, StreamState};
use super::{Cluster, READ_TIMEOUT};
use crate::forks::Level;
use crate::framing::{empty_body, Framer};
use crate::meta::{Framing, SharedMeta};
use crate::offset::{Offset, Position};
use crate::storage::{Chunk, ReadError, StorageError};

/// Bytes allowed per read on top of twice the body budget, for stored headers.
const READ_OVERHEAD: usize = 64 * 1024;
/// Longest a read waits for another reader's fetch of the same range (`cache::turn`).
const TURN_WAIT: Duration = Duration::from_millis(500);
/// Most messages one read asks for. Each comes as its own NATS message with ~200 bytes of
/// headers; bigger batches from several readers at once overran the reply subscription.
const READ_BATCH: usize = 1000;

impl Cluster {
    /// One level of a read (`forks.rs`): the stream's own messages, or, for a fork read
    /// before its fork point, where to read on; with `cap`, a fork's read of its source.
    pub async fn read_level(
        &self,
        stream: &str,
        offset: Offset,
        max_bytes: usize,
        cap: Option<u64>,
    ) -> Result<Level, ReadError> {
        if let Some(cap) = cap {
            return self.read_capped(stream, offset, max_bytes, cap).await;
        }
        let chunk = self.read(stream, offset, max_bytes).await?;
        if let Some(meta) = &chunk.meta {
            if let Some(fork) = meta.fork.as_ref().filter(|f| inherits(offset, f.at)) {
                return Ok(Level::Inherit { source: fork.source.clone(), at: fork.at, meta: meta.clone() });
            }
        }
        Ok(Level::Chunk(chunk))
    }

    pub async fn read(&self, stream: &str, offset: Offset, max_bytes: usize) -> Result<Chunk, ReadError> {
        let started = std::time::Instant::now();
        let result = self.read_inner(stream, offset, max_bytes).await;
        crate::metrics::get().nats_read_seconds.observe(started.elapsed().as_secs_f64());
        if let Ok(Chunk { meta: Some(meta), .. }) = &result {
            // A read renews a sliding TTL.
            self.renew(stream, meta);
        }
        result
    }

    async fn read_inner(&self, stream: &str, offset: Offset, max_bytes: usize) -> Result<Chunk, ReadError> {
        let epoch = self.inner.epoch;
        let at = |seq| Position { epoch, seq };
        let (after, from_token) = match offset {
            Offset::Now => {
                let state = self.stream_state(stream).await?;
                let meta = self.live(stream, &state);
                return Ok(empty_chunk(at(state.tail), meta));
            }
            Offset::Start => (0, false),
            Offset::At(position) if position.epoch != epoch => return Err(ReadError::Gone),
            Offset::At(position) => (position.seq, true),
        };
        let subject = self.subject(stream);
        // First the stream-wide position (see `lookup`), then what the answer must reach: the
        // sequence this node was woken for, else the leader's last message.
        let seen = self.seen();
        let woken = self.inner.hub.tail(stream);
        let mut must = woken;
        let mut last = None;
        let mut permit = None;
        if woken <= after {
            permit = Some(self.read_permit().await?);
            last = self.leader_last(&subject).await?;
            must = last.as_ref().map_or(0, |(seq, _)| *seq);
        }
        let mut pilot = None;
        if must > after {
            if let Some(framed) = self.inner.cache.framed(&subject, (after, max_bytes, from_token), must) {
                return Ok(self.reframed(stream, framed, at(after), must));
            }
            // Readers woken together share one trip to JetStream (`flights`); a passenger
            // whose pilot left boards again.
            for _ in 0..3 {
                match self.inner.flights.board((subject.clone(), after, must, max_bytes, from_token)) {
                    Boarding::Passenger(flight) => {
                        // A passenger holds no permit: its pilot may need one.
                        permit = None;
                        match Boarding::wait(flight).await {
                            Some(answer) => return answer,
                            None => continue,
                        }
                    }
                    Boarding::Pilot(p) => {
                        pilot = Some(p);
                        break;
                    }
                }
            }
        }
        if permit.is_none() {
            permit = Some(self.read_permit().await?);
        }
        let result = self
            .read_stored(stream, &subject, (after, from_token), max_bytes, (seen, must, last), pilot.as_mut())
            .await;
        drop(permit);
        if let Some(pilot) = pilot {
            pilot.land(&result);
        }
        result
    }

    /// At most READS_AT_ONCE reads talk to JetStream at a time: each holds up to a chunk of
    /// replies in memory while it is assembled.
    async fn read_permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, StorageError> {
        tokio::time::timeout(READ_TIMEOUT, self.inner.reads.acquire())
            .await
            .map_err(|_| StorageError::Unavailable("too many reads waiting for JetStream".into()))?
            .map_err(|_| StorageError::Closed)
    }

    /// The read from JetStream (and the cache) once what it must reach is known; `pilot`: the
    /// flight it answers for, closed once it has what it fetched.
    async fn read_stored(
        &self,
        stream: &str,
        subject: &str,
        (after, from_token): (u64, bool),
        max_bytes: usize,
        (seen, mut must, mut last): (u64, u64, Option<(u64, Marks)>),
        mut pilot: Option<&mut Pilot>,
    ) -> Result<Chunk, ReadError> {
        let at = |seq| Position { epoch: self.inner.epoch, seq };
        let token = self.inner.cache.token();
        let batch = loop {
            if must <= after {
                let state = match &last {
                    Some((seq, marks)) => StreamState::after(*seq, marks),
                    None => StreamState::empty(seen),
                };
                return self.nothing_after(stream, after, from_token, seen, &state).await;
            }
            let fetched = self.fetch_through(subject, after, must, max_bytes).await?;
            if let Some(pilot) = pilot.as_deref_mut() {
                pilot.close();
            }
            match fetched {
                Some(batch) => break batch,
                // What this node was woken for is no longer stored (a removal purged it):
                // the leader says where the stream ends.
                None => {
                    last = self.leader_last(subject).await?;
                    let leader = last.as_ref().map_or(0, |(seq, _)| *seq);
                    if leader >= must {
                        return Err(StorageError::Unavailable(format!("a replica still lacks message {must}")).into());
                    }
                    must = leader;
                }
            }
        };
        let mut batch = batch;
        if let Some(first) = batch.messages.first().filter(|_| from_token) {
            let prev = predecessor(first).unwrap_or(0);
            // (A fork's first message follows whatever its subject saw before: a reader at or
            // before its fork point missed nothing of it, see `read_level`.)
            if prev > after && !fork_after(first, after) {
                // The message before the first retained one, newer than the reader's
                // position, was deleted by retention: the reader missed it.
                return Err(ReadError::Gone);
            }
        }
        let floor = self.settle(subject, &mut batch, after, from_token, max_bytes).await?;
        self.fill(subject, &mut batch, max_bytes, must).await?;
        let Some(last_item) = batch.messages.last() else {
            // Everything read was a removed life of the stream.
            return Ok(empty_chunk(at(floor), None));
        };
        let state = StreamState::after(last_item.seq, &last_item.marks);
        let Some(meta) = self.live(stream, &state) else {
            return Ok(empty_chunk(at(floor), None));
        };
        let chunk = self.frame(&batch, floor, must, max_bytes, meta);
        if batch.from_cache && floor == after {
            self.inner.cache.keep_framed(subject, token, (after, max_bytes, from_token), &batch, &chunk);
        }
        Ok(chunk)
    }

    /// A chunk framed before from cached messages, with the stream's state checked now.
    fn reframed(&self, stream: &str, framed: Framed, start: Position, must: u64) -> Chunk {
        let state = StreamState::after(framed.state_seq, &framed.state_marks);
        let Some(meta) = self.live(stream, &state) else { return empty_chunk(start, None) };
        Chunk {
            body: framed.body,
            count: framed.count,
            start,
            next: Position { epoch: start.epoch, seq: framed.next },
            up_to_date: framed.complete && framed.last >= must,
            meta: Some(if framed.complete { meta } else { framed.cut_meta.unwrap_or(meta) }),
        }
    }

    /// Drops what a reader never gets: a removed life of the stream (the messages up to a
    /// `delete`, whose purge may not have run yet) and, for a stream made by broadcasts, the
    /// messages outside AnyCable's count window (see `retention`); fetches on while that
    /// leaves nothing but more is stored. Returns the position the rest follows.
    async fn settle(
        &self,
        subject: &str,
        batch: &mut Batch,
        after: u64,
        from_token: bool,
        max_bytes: usize,
    ) -> Result<u64, ReadError> {
        let mut floor = after;
        loop {
            if let Some(i) = batch.messages.iter().rposition(|m| m.marks.control == Some(Control::Delete)) {
                if from_token {
                    // The life of the stream the reader's position is in was removed (as the
                    // embedded engine's tombstones answer).
                    return Err(ReadError::Gone);
                }
                floor = batch.messages[i].seq;
                batch.messages.drain(..=i);
            }
            let first_message = batch.messages.iter().find(|m| m.marks.is_message());
            if first_message.and_then(|m| m.marks.meta()).is_some_and(|meta| !meta.created) {
                // A reader whose next message left the window missed it; one from the start
                // begins inside it.
                if from_token && floor == after && first_message.is_some_and(|m| !self.in_window(m.pending)) {
                    return Err(ReadError::Gone);
                }
                if let Some(skipped) = self.skip_outside_window(batch) {
                    floor = skipped;
                }
            }
            if !batch.messages.is_empty() || batch.pending == 0 {
                return Ok(floor);
            }
            *batch = self.fetch(subject, floor, max_bytes, u64::MAX).await?;
        }
    }

    /// Up to a batch of the subject's messages after `after`, from any replica, and at least
    /// through `must`: a replica behind the leader is asked again. `None`: even the end of
    /// what is stored is before `must` (it was deleted).
    pub(super) async fn fetch_through(
        &self,
        subject: &str,
        after: u64,
        must: u64,
        max_bytes: usize,
    ) -> Result<Option<Batch>, StorageError> {
        let mut attempt = 0;
        loop {
            let batch = self.fetch(subject, after, max_bytes, must).await?;
            let last = batch.messages.last().map_or(0, |m| m.seq);
            // A replica behind the leader: it ended (nothing pending) before what must be there.
            let behind = last < must && batch.pending == 0;
            if !behind {
                return Ok(Some(batch));
            }
            attempt += 1;
            if attempt == 3 {
                // Still missing: is it there at all? (A removal purges what woke readers.)
                let leader = self.leader_last(subject).await?.map_or(0, |(seq, _)| seq);
                if leader < must {
                    return Ok(None);
                }
            }
            if attempt >= 50 {
                return Err(StorageError::Unavailable(format!("a replica still lacks message {must}")));
            }
            tokio::time::sleep(Duration::from_millis(attempt.min(10))).await;
        }
    }

    /// The messages after `after`, about `max_bytes` of them, for a read that must reach
    /// `must`: from the node's cache as far as it covers them (`cache`), the rest by one
    /// batched Direct Get.
    pub(super) async fn fetch(
        &self,
        subject: &str,
        after: u64,
        max_bytes: usize,
        must: u64,
    ) -> Result<Batch, StorageError> {
        // JetStream counts stored bytes (headers included) against `max_bytes`; ask for more
        // and cut at the body budget (`frame`).
        let budget = max_bytes.saturating_mul(2).saturating_add(READ_OVERHEAD);
        let cache = &self.inner.cache;
        let mut turn = None;
        let (hit, token) = loop {
            let token = cache.token();
            let hit = cache.get(subject, after, budget, must);
            // What the run lacks is fetched by one reader at a time; the others look again.
            let lacks = hit.as_ref().map_or_else(|| cache.has_run(subject), |h| h.to_end && h.last < must);
            if lacks && turn.is_none() {
                // Not longer than a moment: a turn held by a fetch JetStream does not answer
                // (it times out after READ_TIMEOUT) must not make every reader wait in line.
                turn = Some(tokio::time::timeout(TURN_WAIT, cache.turn(subject)).await.ok());
                continue;
            }
            match hit {
                Some(hit) => break (hit, token),
                None => return self.fetch_stored(subject, after, budget, token).await,
            }
        };
        if let Some(first) = hit.verify {
            if !self.still_stored(subject, first).await? {
                cache.drop_subject(subject);
                return self.fetch_stored(subject, after, budget, cache.token()).await;
            }
            cache.verified(subject, first);
        }
        if !hit.to_end {
            // More is cached: the chunk is cut before it anyway (streams made by `PUT` have
            // no count window, so `pending` is only "more").
            return Ok(Batch { messages: hit.items, pending: 1, from_cache: true });
        }
        if hit.last >= must {
            // Everything the read must reach is here.
            return Ok(Batch { messages: hit.items, pending: 0, from_cache: true });
        }
        let used: usize = hit.items.iter().map(|i| i.payload.len()).sum();
        let more = self.fetch_stored(subject, hit.last, budget.saturating_sub(used).max(1), token).await?;
        if more.messages.first().is_some_and(|next| predecessor(next) != Some(hit.last)) {
            // The subject's next message does not follow the cached ones: they are of a life
            // removed since (a wake-up with its `delete` was lost). Exact, as `Ds-Prev` is.
            log::warn!("cached messages of {subject} were removed; dropped");
            cache.drop_subject(subject);
            return self.fetch_stored(subject, after, budget, cache.token()).await;
        }
        let mut messages = hit.items;
        messages.extend(more.messages);
        Ok(Batch { messages, pending: more.pending, from_cache: false })
    }

    /// One batched Direct Get of the messages after `after`; kept in the cache if they may be.
    async fn fetch_stored(
        &self,
        subject: &str,
        after: u64,
        budget: usize,
        token: Token,
    ) -> Result<Batch, StorageError> {
        let batch = self
            .inner
            .direct
            .batch(subject, after + 1, READ_BATCH, budget, READ_TIMEOUT)
            .await
            .map_err(|e| StorageError::Unavailable(e.to_string()))?;
        self.inner.cache.put(subject, token, after, &batch);
        Ok(batch)
    }

    /// Whether the subject's message at `seq` is still stored (a removal purges it).
    async fn still_stored(&self, subject: &str, seq: u64) -> Result<bool, StorageError> {
        let batch = self
            .inner
            .direct
            .batch(subject, seq, 1, usize::MAX >> 1, READ_TIMEOUT)
            .await
            .map_err(|e| StorageError::Unavailable(e.to_string()))?;
        Ok(batch.messages.first().is_some_and(|m| m.seq == seq))
    }

    /// Drops the leading messages outside the count window; the last one dropped, if any.
    fn skip_outside_window(&self, batch: &mut Batch) -> Option<u64> {
        let outside = batch.messages.iter().take_while(|m| !self.in_window(m.pending)).count();
        let skipped = batch.messages.get(outside.checked_sub(1)?)?.seq;
        batch.messages.drain(..outside);
        Some(skipped)
    }

    /// More batches while messages are pending, up to the chunk's byte budget, as the sled
    /// engine answers.
    async fn fill(&self, subject: &str, batch: &mut Batch, max_bytes: usize, must: u64) -> Result<(), StorageError> {
        let mut bytes: usize = batch.messages.iter().map(|m| m.payload.len() + 1).sum();
        while batch.pending > 0 && bytes < max_bytes {
            let Some(last) = batch.messages.last().map(|m| m.seq) else { break };
            let mut more = self.fetch(subject, last, max_bytes - bytes, must).await?;
            if more.messages.is_empty() {
                break;
            }
            // The stream may have been removed (and made again) between two fetches: what
            // follows a `delete`, or what does not follow `last` (purged since), belongs to
            // no life this chunk reads. The chunk ends before it; the reader's next read from
            // there says what became of the stream.
            let broken = more.messages.first().and_then(predecessor).is_some_and(|p| p != last);
            let removal = more.messages.iter().position(|m| m.marks.control == Some(Control::Delete));
            batch.from_cache &= more.from_cache;
            if broken || removal.is_some() {
                batch.from_cache = false;
                if !broken {
                    more.messages.truncate(removal.unwrap_or(0));
                    batch.messages.extend(more.messages);
                }
                batch.pending = batch.pending.max(1);
                break;
            }
            bytes += more.messages.iter().map(|m| m.payload.len() + 1).sum::<usize>();
            batch.pending = more.pending;
            batch.messages.extend(more.messages);
        }
        Ok(())
    }

    /// The chunk: as many messages as fit in `max_bytes` of body (at least one), control
    /// messages taken along but never read as messages.
    pub(super) fn frame(&self, batch: &Batch, after: u64, must: u64, max_bytes: usize, meta: SharedMeta) -> Chunk {
        let at = |seq| Position { epoch: self.inner.epoch, seq };
        let framing = meta.framing();
        let mut body = Framer::new(framing, 0);
        let (mut size, mut count, mut taken) = (body.len_closed(), 0, 0);
        for message in &batch.messages {
            if message.marks.is_message() {
                // JSON: a comma before every message but the first.
                let added = message.payload.len() + usize::from(framing == Framing::Json && count > 0);
                if count > 0 && size + added > max_bytes {
                    break;
                }
                size += added;
                count += 1;
            }
            taken += 1;
        }
        body.reserve(size);
        let mut next = after;
        for message in &batch.messages[..taken] {
            if message.marks.is_message() {
                body.push(&message.payload);
            }
            next = next.max(message.marks.position(message.seq).unwrap_or(message.seq));
        }
        let last = batch.messages[..taken].last().map_or(after, |m| m.seq);
        let complete = taken == batch.messages.len() && batch.pending == 0;
        // A chunk cut before the stream's end says nothing about its closure.
        let meta = if complete { meta } else { meta_before(&batch.messages[..taken]).unwrap_or(meta) };
        Chunk {
            count: body.count(),
            body: body.finish(),
            start: at(after),
            next: at(next),
            up_to_date: complete && last >= must,
            meta: Some(meta),
        }
    }

    /// The answer when the subject holds nothing after `after`: `state` is what its last
    /// message left (a subject with nothing stored: `seen`, the stream-wide sequence learned
    /// before asking).
    ///
    /// Where a reader goes on from may move ahead to `seen` whenever nothing of the stream lies
    /// between: no message of it after `after` is stored (the leader just said so) or was
    /// deleted (checked below), and any later one follows `seen`.
    async fn nothing_after(
        &self,
        stream: &str,
        after: u64,
        from_token: bool,
        seen: u64,
        state: &StreamState,
    ) -> Result<Chunk, ReadError> {
        let at = |seq| Position { epoch: self.inner.epoch, seq };
        let meta = self.live(stream, state);
        let made_by_put = meta.as_ref().is_some_and(|m| m.created);
        let chunk = |seq| empty_chunk(at(seq), meta.clone());
        if !from_token {
            // From the start: the position after everything stored before the subject was
            // seen empty (any later message of the stream follows it), as the tail answers.
            return Ok(chunk(if state.last == 0 { seen } else { state.tail }));
        }
        if made_by_put {
            // Retention never deleted anything of a stream made by `PUT`: no gap to look for,
            // and the reader stays where it is (unless past everything ever stored).
            if after > state.last && after > seen && after > self.state().await?.last_sequence {
                return Err(ReadError::Gone);
            }
            return Ok(chunk(after));
        }
        match state.last {
            // At the stream's last message: stay there, unless it is old (`lookup::Aging`).
            last if last > 0 && last == after => {
                let next = if last <= self.inner.aging.old() { after.max(seen) } else { after };
                Ok(chunk(next))
            }
            // Past the stream's last message (a position moved on before): fine unless past
            // everything ever stored.
            last if last > 0 => {
                if after > seen && after > self.state().await?.last_sequence {
                    return Err(ReadError::Gone);
                }
                Ok(chunk(after.max(seen)))
            }
            _ => {
                // Asked after the subject was seen empty: whatever retention deleted before
                // that is before where age retention stands now.
                let (first, last_sequence) = self.horizon().await?;
                if after > last_sequence {
                    return Err(ReadError::Gone);
                }
                if after + 1 < first {
                    // Nothing is left of the stream, and its messages after `after` (if it had
                    // any) would be before the first message still kept: retention may have
                    // deleted messages this reader never got. JetStream forgot the stream's
                    // last sequence with its last message, so a reader that had read it cannot
                    // be told apart (unless it was moved on in time, see `lookup::Aging`):
                    // `410` for both; a re-read from the start costs it nothing.
                    return Err(ReadError::Gone);
                }
                Ok(chunk(after.max(seen)))
            }
        }
    }
}

/// The message of the same stream before `item` (`Ds-Prev`, `Ds-Prev-Back`), if it says.
fn predecessor(item: &Item) -> Option<u64> {
    match (item.prev, item.prev_back) {
        (Some(prev), _) => Some(prev),
        (None, Some(back)) => Some(item.seq.saturating_sub(back)),
        (None, None) => None,
    }
}

/// Whether `item` is a fork's message and `after` at or before its fork point.
fn fork_after(item: &Item, after: u64) -> bool {
    item.marks.meta().and_then(|meta| meta.fork.as_ref().map(|f| f.at)).is_some_and(|at| after <= at)
}

/// The metadata as the last message taken left it (a chunk cut short reports the stream as
/// it was there: a content type, never a closure that comes later).
fn meta_before(taken: &[Item]) -> Option<SharedMeta> {
    taken.last().and_then(|m| m.marks.meta())
}

fn empty_chunk(position: Position, meta: Option<SharedMeta>) -> Chunk {
    let framing = meta.as_ref().map_or(Framing::Json, |m| m.framing());
    Chunk { body: empty_body(framing), count: 0, start: position, next: position, up_to_date: true, meta }
}

/// Whether a read from `offset` of a fork at `at` starts in what the fork inherits.
pub(super) fn inherits(offset: Offset, at: u64) -> bool {
    match offset {
        Offset::Start => true,
        Offset::At(position) => position.seq < at,
        Offset::Now => false,
    }
}
