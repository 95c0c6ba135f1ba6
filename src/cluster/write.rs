//! The Durable Streams write API in cluster mode: `PUT` (create), `POST` (append, close),
//! `DELETE`, with the rules both engines share (`writes.rs`).
//!
//! Each write reads the stream's state (this node's memory, else the stream leader's last
//! message of the subject, see `state`), checks the request against it, and stores the result
//! guarded by that state's last sequence (`publish`): one message, or one atomic batch that
//! carries the new metadata on its messages. If anything was stored in the subject since,
//! on any node, JetStream refuses the publish and the write starts over with the new state.
//! So a check (closed, content type, `Stream-Seq`, existence, configuration) always holds
//! for the state the write lands on, and a write is answered only once JetStream
//! acknowledged it (a quorum of replicas has it): a close is never acknowledged without
//! being durable, and no crash or lost NATS server can separate an append from its metadata.
//! An answer that stores nothing (`200` on an identical `PUT`, a refusal, a repeated close,
//! a producer's duplicate) is given only from the leader's state, never from this node's
//! memory, which may be behind. An idempotent producer's state goes in the same batch, on
//! its own guarded subject (`producers`).

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::HeaderMap;
use bytes::Bytes;

use super::access::Life;
use super::broadcast::unanswered;
use super::producers::ProducerRecord;
use super::publish::{back_off, Outgoing, Prev, Publish, PUBLISH_ATTEMPTS};
use super::state::{self, Control, StreamState};
use super::Cluster;
use crate::meta::StreamMeta;
use crate::storage::{now_ms, StorageError};
use crate::writes::{
    plan_append, same_configuration, Append, AppendPlan, Producer, ProducerState, Refusal, WriteError, WriteOp,
    WriteOutcome,
};

/// What a write does, given the stream's state.
#[derive(Debug)]
enum Plan {
    /// Nothing to store: the answer.
    Answer(Result<WriteOutcome, Refusal>),
    /// Remove the stream: `DELETE`, or an expired stream in the way of a `PUT` (which then
    /// starts over).
    Remove { then_create: bool },
    /// Store these messages: bodies with the metadata after each, or one control message; and
    /// the producer's state after them, if a producer sent them.
    Store { messages: Vec<(Bytes, StreamMeta, Option<Control>)>, producer: Option<ProducerState>, done: Done },
    /// Make a fork (`fork.rs`): its source is checked and counted in the same batch.
    Fork,
}

/// The outcome of a stored write.
#[derive(Debug, Clone, Copy)]
enum Done {
    Created {
        closed: bool,
    },
    Appended {
        closed: bool,
    },
    /// A close-only `POST`: the tail does not move.
    Closed,
}

impl Cluster {
    /// A write to one stream; resolves once JetStream acknowledged it (or it was refused),
    /// within `nats.publish_timeout`.
    pub async fn write(&self, stream: &str, op: WriteOp) -> Result<WriteOutcome, WriteError> {
        let timeout = self.inner.publish_timeout;
        let started = std::time::Instant::now();
        let result = match tokio::time::timeout(timeout, self.write_inner(stream, &op)).await {
            Ok(result) => result,
            Err(_) => Err(unanswered(timeout).into()),
        };
        crate::metrics::get().nats_publish_seconds.observe(started.elapsed().as_secs_f64());
        result
    }

    async fn write_inner(&self, stream: &str, op: &WriteOp) -> Result<WriteOutcome, WriteError> {
        // This node's writes of the stream take turns; other nodes' are caught by the guard.
        let _turn = self.take_turns(&[stream]).await;
        let producer: Option<&Producer> = match op {
            WriteOp::Append(Append { producer, .. }) => producer.as_ref(),
            _ => None,
        };
        let echo = producer.map(|p| (p.epoch, p.seq));
        let mut ask_leader = false;
        for attempt in 1..=PUBLISH_ATTEMPTS {
            let (state, mut from_memory) = match self.known(stream).filter(|_| !ask_leader) {
                Some(state) => (state, true),
                None => (self.stream_state(stream).await?, false),
            };
            let now = now_ms();
            let life = self.life(stream, &state);
            let expired = matches!(life, Life::Expired);
            // A producer's record: read after the stream's state (see `producers`).
            let mut record = ProducerRecord::NONE;
            if let (Some(p), Life::Live(_)) = (producer, &life) {
                let (read, memory) = self.producer_record(stream, &p.id, ask_leader).await?;
                if !memory && !from_memory && read.last > state.last + 1 {
                    // Stored with a message after the one read: another write came in between.
                    ask_leader = true;
                    back_off(attempt).await;
                    continue;
                }
                from_memory |= memory;
                record = read;
            }
            let (messages, new_state, done) = match plan(op, &state, life, now, record.in_life(state.life)) {
                // Stores nothing: only on the leader's word.
                Plan::Answer(_) | Plan::Remove { .. } if from_memory => {
                    ask_leader = true;
                    continue;
                }
                Plan::Answer(answer) => {
                    if expired {
                        self.expire(stream);
                    }
                    let stored_nothing =
                        matches!(answer, Ok(WriteOutcome::Appended { .. } | WriteOutcome::Duplicate { .. }));
                    if let (true, Some(meta)) = (stored_nothing, &state.meta) {
                        // A repeated close or a producer's retry renews the TTL too, as every
                        // `POST` does.
                        self.renew(stream, meta);
                    }
                    return answer.map_err(Into::into);
                }
                Plan::Remove { then_create } => {
                    let removed = self.remove(stream, &state).await?;
                    if removed && !then_create {
                        return Ok(WriteOutcome::Deleted);
                    }
                    // Removed for a `PUT`, or written in between: look again.
                    ask_leader = true;
                    continue;
                }
                Plan::Fork => {
                    let WriteOp::Create { meta, messages } = op else { unreachable!("a fork is a create") };
                    match self.create_fork(stream, &state, meta, messages, now).await? {
                        Some(answer) => return answer.map_err(Into::into),
                        None => {
                            ask_leader = true;
                            log::debug!(
                                "fork {stream:?} or its source moved under a write (attempt {attempt}); retrying"
                            );
                            back_off(attempt).await;
                            continue;
                        }
                    }
                }
                Plan::Store { messages, producer, done } => (messages, producer, done),
            };
            // A producer's first append in this life of the stream draws the life its records
            // name (see `state`); every later message carries it on.
            let life = match (new_state, state.life) {
                (Some(_), None) => Some(rand::random::<u64>()),
                (_, life) => life,
            };
            // What the stream is after the write: the metadata its last message carries.
            let final_meta = messages.last().map(|(_, meta, _)| meta.clone()).unwrap_or_default();
            let mut outgoing: Vec<Outgoing> = messages
                .into_iter()
                .map(|(payload, meta, control)| {
                    let mut headers = HeaderMap::new();
                    state::mark(&mut headers, &meta, life, control, state.tail, now);
                    Outgoing { stream, payload, headers, record: None }
                })
                .collect();
            let accepted = producer.zip(new_state).zip(life);
            if let Some(((p, new_state), life)) = accepted {
                // In the same atomic batch, right after the messages it accepts.
                outgoing.push(self.record_message(stream, &p.id, &record, new_state, life, final_meta.created));
            }
            self.check_sizes(&outgoing)?;
            // Asked only after the subject was seen empty (see `retention::chain_start`).
            let chain_start = if state.last == 0 { self.chain_start().await? } else { 0 };
            let prevs = HashMap::from([(stream, Prev::after(state.last, chain_start))]);
            match self.publish_guarded(&outgoing, &prevs).await {
                Ok(last) => {
                    let stream_last = self.published(&outgoing, last).get(stream).copied().unwrap_or(last);
                    let tail = if let Done::Closed = done { state.tail } else { stream_last };
                    let written_ms = if final_meta.ttl_secs.is_some() { now } else { 0 };
                    if written_ms > 0 {
                        self.inner.accesses.record(stream, now);
                    }
                    let meta = Some(Arc::new(final_meta));
                    self.remember(stream, StreamState { last: stream_last, tail, meta, written_ms, life });
                    if let Some(((p, new_state), life)) = accepted {
                        // The record is the batch's last message.
                        let record = ProducerRecord { last, state: Some((new_state, life)) };
                        self.remember_producer(stream, &p.id, record);
                    }
                    return Ok(match done {
                        Done::Created { closed } => WriteOutcome::Created { tail, closed },
                        Done::Appended { closed } => WriteOutcome::Appended { tail, closed, producer: echo },
                        Done::Closed => WriteOutcome::Appended { tail, closed: true, producer: echo },
                    });
                }
                Err(Publish::Moved) => {
                    self.forget(stream);
                    if let Some(p) = producer {
                        self.forget_producer(stream, &p.id);
                    }
                    ask_leader = true;
                    log::debug!("stream {stream:?} moved under a write (attempt {attempt}); retrying");
                    back_off(attempt).await;
                }
                Err(Publish::Failed(e)) => return Err(e.into()),
            }
        }
        Err(StorageError::Unavailable("the stream kept moving under concurrent writers".into()).into())
    }

    /// Removes a stream (`DELETE`, expiry): a `delete` control message guarded by `state`'s
    /// last sequence, then a purge of everything before it (and of its producers' records).
    /// The `delete` itself stays for `storage.tombstone_ttl` (its `Nats-TTL`), as the
    /// embedded engine's tombstone: a stream made again under the name follows it
    /// (`Ds-Prev`), so a reader holding a position in the removed life gets `410`, never the
    /// new life's messages as its continuation. Without it the new life's first message
    /// would name the age horizon as its predecessor (see the `cluster` docs), which may be
    /// older than that reader's position.
    /// `Ok(false)`: the stream moved since `state` (a write came in between), nothing removed.
    /// Readers ignore whatever is left before a `delete` message, and producers' records name
    /// the life they belong to, so a purge that fails (logged) loses nothing but disk space
    /// until the next removal under the name.
    pub(super) async fn remove(&self, stream: &str, state: &StreamState) -> Result<bool, StorageError> {
        // With forks: only marked deleted; its last fork's removal takes it (`fork.rs`).
        let Some((planned, prevs, purged)) = self.removal(stream, state).await? else { return Ok(true) };
        let prevs: Vec<(&str, Prev)> = prevs.iter().map(|(s, p)| (s.as_str(), *p)).collect();
        let Some(lasts) = self.publish_planned(&planned, &prevs, 0).await? else { return Ok(false) };
        for (name, had_life) in &purged {
            let last = lasts[name];
            crate::metrics::get().streams_removed.inc();
            let through = if self.inner.tombstone_ttl > 0 { last - 1 } else { last };
            if let Err(e) = self.purge_through(name, through).await {
                log::warn!("stream {name:?} removed, but its messages stay on disk for now: {e}");
            }
            // Only a stream a producer wrote has a life (and records).
            if *had_life {
                if let Err(e) = self.purge_producers(name, last).await {
                    log::warn!("stream {name:?} removed, but its producers' records stay on disk for now: {e}");
                }
            }
        }
        Ok(true)
    }
}

/// What `op` does to a stream in `state` (alive or not: `life`), at `now`; `producer` is the
/// state of the request's producer on the stream, if it sent one and the stream has seen it.
fn plan(op: &WriteOp, state: &StreamState, life: Life, now: u64, producer: Option<ProducerState>) -> Plan {
    match op {
        WriteOp::Create { meta, messages } => match life {
            Life::Live(current) => Plan::Answer(if same_configuration(&current, meta) {
                Ok(WriteOutcome::Exists { tail: state.tail, closed: current.closed })
            } else {
                Err(Refusal::ConfigMismatch)
            }),
            // Forks still read it: its name is taken (`409`) until they go.
            Life::Expired if state.meta.as_ref().is_some_and(|m| m.deleted || m.forks > 0) => {
                Plan::Answer(Err(Refusal::ConfigMismatch))
            }
            Life::Expired => Plan::Remove { then_create: true },
            Life::Missing if meta.fork.is_some() => Plan::Fork,
            Life::Missing => {
                let stored = StreamMeta { created: true, created_ms: now, ..meta.clone() };
                let closed = stored.closed;
                let messages = if messages.is_empty() {
                    vec![(Bytes::new(), stored, Some(Control::Create))]
                } else {
                    with_meta(messages, &stored)
                };
                Plan::Store { messages, producer: None, done: Done::Created { closed } }
            }
        },
        WriteOp::Append(append) => {
            let Life::Live(meta) = life else { return Plan::Answer(Err(Refusal::NotFound)) };
            if meta.deleted {
                return Plan::Answer(Err(Refusal::Deleted));
            }
            // The rules both engines share (`writes`).
            let (next, producer) = match plan_append(&meta, state.tail, append, producer) {
                Ok(AppendPlan::Write { meta, producer }) => (meta, producer),
                Ok(AppendPlan::Duplicate { state: p, closed }) => {
                    let (epoch, seq) = (p.epoch, p.last_seq);
                    return Plan::Answer(Ok(WriteOutcome::Duplicate { tail: state.tail, closed, epoch, seq }));
                }
                Err(refusal) => return Plan::Answer(Err(refusal)),
            };
            if !append.messages.is_empty() {
                let (messages, done) = (with_meta(&append.messages, &next), Done::Appended { closed: next.closed });
                return Plan::Store { messages, producer, done };
            }
            if next == *meta && producer.is_none() {
                // Closing a closed stream again: nothing changes.
                return Plan::Answer(Ok(WriteOutcome::Appended {
                    tail: state.tail,
                    closed: next.closed,
                    producer: None,
                }));
            }
            Plan::Store { messages: vec![(Bytes::new(), next, Some(Control::Close))], producer, done: Done::Closed }
        }
        WriteOp::Delete => match life {
            Life::Live(meta) if meta.deleted => Plan::Answer(Err(Refusal::Deleted)),
            Life::Live(_) => Plan::Remove { then_create: false },
            Life::Missing | Life::Expired => Plan::Answer(Err(Refusal::NotFound)),
        },
    }
}

/// Messages that each carry the stream's metadata after them: open until the last, which
/// carries `after` (an append-and-close closes with its last message, in the same batch).
fn with_meta(messages: &[Bytes], after: &StreamMeta) -> Vec<(Bytes, StreamMeta, Option<Control>)> {
    let during = StreamMeta { closed: false, ..after.clone() };
    let last = messages.len().saturating_sub(1);
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| (m.clone(), if i == last { after.clone() } else { during.clone() }, None))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writes::Append;

    fn live(meta: StreamMeta) -> Life {
        Life::Live(Arc::new(meta))
    }

    fn text() -> StreamMeta {
        StreamMeta { content_type: "text/plain".into(), created: true, ..StreamMeta::default() }
    }

    fn state() -> StreamState {
        StreamState { last: 12, tail: 10, meta: Some(Arc::new(text())), written_ms: 0, life: None }
    }

    fn append(n: usize, close: bool) -> WriteOp {
        WriteOp::Append(Append {
            content_type: Some("text/plain".into()),
            messages: vec![Bytes::from_static(b"x"); n],
            seq: Some("5".into()),
            close,
            producer: None,
        })
    }

    #[test]
    fn an_append_and_close_carries_the_closure_on_its_last_message_only() {
        let Plan::Store { messages, done, .. } = plan(&append(3, true), &state(), live(text()), 1, None) else {
            panic!()
        };
        assert!(matches!(done, Done::Appended { closed: true }));
        let closed: Vec<bool> = messages.iter().map(|(_, meta, _)| meta.closed).collect();
        assert_eq!(closed, [false, false, true]);
        assert!(messages.iter().all(|(_, meta, control)| meta.stream_seq.as_deref() == Some("5") && control.is_none()));
    }

    #[test]
    fn a_close_only_post_is_one_control_message_and_closing_again_stores_nothing() {
        let Plan::Store { messages, done, .. } = plan(&append(0, true), &state(), live(text()), 1, None) else {
            panic!()
        };
        assert!(matches!(done, Done::Closed));
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].2, Some(Control::Close));
        let closed = StreamMeta { closed: true, ..text() };
        let Plan::Answer(answer) = plan(&append(0, true), &state(), live(closed.clone()), 1, None) else { panic!() };
        assert_eq!(answer, Ok(WriteOutcome::Appended { tail: 10, closed: true, producer: None }));
        let Plan::Answer(answer) = plan(&append(1, false), &state(), live(closed), 1, None) else { panic!() };
        assert_eq!(answer, Err(Refusal::Closed { tail: 10 }));
    }

    #[test]
    fn puts_compare_create_or_clear_an_expired_stream_first() {
        let create = WriteOp::Create { meta: text(), messages: Vec::new() };
        let Plan::Answer(answer) = plan(&create, &state(), live(text()), 1, None) else { panic!() };
        assert_eq!(answer, Ok(WriteOutcome::Exists { tail: 10, closed: false }));
        assert!(matches!(plan(&create, &state(), Life::Expired, 1, None), Plan::Remove { then_create: true }));
        let Plan::Store { messages, .. } = plan(&create, &StreamState::empty(3), Life::Missing, 77, None) else {
            panic!()
        };
        assert_eq!(messages[0].2, Some(Control::Create));
        assert_eq!((messages[0].1.created, messages[0].1.created_ms), (true, 77));
        let other = WriteOp::Create { meta: StreamMeta { ttl_secs: Some(1), ..text() }, messages: Vec::new() };
        assert!(matches!(plan(&other, &state(), live(text()), 1, None), Plan::Answer(Err(Refusal::ConfigMismatch))));
        assert!(matches!(
            plan(&WriteOp::Delete, &state(), Life::Expired, 1, None),
            Plan::Answer(Err(Refusal::NotFound))
        ));
        assert!(matches!(
            plan(&append(1, false), &state(), Life::Missing, 1, None),
            Plan::Answer(Err(Refusal::NotFound))
        ));
    }

    #[test]
    fn a_producer_append_carries_its_new_state_and_a_retry_stores_nothing() {
        let WriteOp::Append(mut close) = append(0, true) else { panic!() };
        close.seq = None;
        close.producer = Some(Producer { id: "p".into(), epoch: 1, seq: 3 });
        let seen = Some(ProducerState { epoch: 1, last_seq: 2 });
        let op = WriteOp::Append(close);
        let Plan::Store { messages, producer, done } = plan(&op, &state(), live(text()), 1, seen) else { panic!() };
        assert!(matches!(done, Done::Closed));
        assert_eq!(producer, Some(ProducerState { epoch: 1, last_seq: 3 }));
        assert_eq!(messages[0].1.closed_by.as_ref().map(|p| p.seq), Some(3), "the close names its producer");
        let retry = Some(ProducerState { epoch: 1, last_seq: 3 });
        let Plan::Answer(answer) = plan(&op, &state(), live(text()), 1, retry) else { panic!() };
        assert_eq!(answer, Ok(WriteOutcome::Duplicate { tail: 10, closed: false, epoch: 1, seq: 3 }));
        let newer = Some(ProducerState { epoch: 2, last_seq: 0 });
        let Plan::Answer(answer) = plan(&op, &state(), live(text()), 1, newer) else { panic!() };
        assert_eq!(answer, Err(Refusal::StaleEpoch { current: 2 }));
    }
}
