//! Guarded publishing, shared by broadcasts (`broadcast.rs`) and the write API (`write.rs`):
//! one message, or one JetStream atomic batch (all stored or none), where the first message
//! of each DS stream carries the subject's expected last sequence
//! (`Nats-Expected-Last-Subject-Sequence`). JetStream checks it atomically with the store
//! (serialized per subject, nats-server 2.12+), so a publish is refused if anything was
//! stored in one of its subjects since the writer looked: the writer learns the new state
//! and checks again. That one guard gives every message its exact predecessor (`Ds-Prev`) and
//! makes every check against a stream's state (closed, content type, `Stream-Seq`, existence)
//! atomic with the append it allows, on every node.

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;

use super::{Cluster, MAX_BATCH, PREV, PREV_BACK};
use crate::storage::StorageError;

/// Attempts when another node wrote the same stream in between (expected sequence moved);
/// `nats.publish_timeout` bounds them too.
pub(super) const PUBLISH_ATTEMPTS: usize = 100;
/// Bytes of a message's NATS headers besides our stream marks (ids, predecessor, guard,
/// batch headers: about 300), with room to spare, counted against the server's `max_payload`.
pub const HEADER_ROOM: usize = 1024;

/// A stream's predecessor in a publish: the last sequence its subject must have (the guard)
/// and the one its first message names (`Ds-Prev`). They differ only for a subject with
/// nothing stored.
#[derive(Debug, Clone, Copy)]
pub(super) struct Prev {
    pub(super) expected: u64,
    pub(super) chain: u64,
}

impl Prev {
    /// After the subject's last message `last` (0: none), or, for a subject with nothing
    /// stored, after `chain_start` (see the module docs of `cluster`).
    pub(super) fn after(last: u64, chain_start: u64) -> Prev {
        if last == 0 {
            Prev { expected: 0, chain: chain_start }
        } else {
            Prev { expected: last, chain: last }
        }
    }
}

/// One message to publish: its DS stream, body and stream marks (`state::mark`).
pub(super) struct Outgoing<'a> {
    pub(super) stream: &'a str,
    pub(super) payload: Bytes,
    pub(super) headers: HeaderMap,
    /// Not a message of `stream` but a producer's state record of it (see `producers`),
    /// stored on its own subject in the same atomic batch.
    pub(super) record: Option<Record>,
}

/// Where a producer's state record goes, and its guard: the last sequence its subject must
/// have (0: none), so two writers of one producer never both pass.
#[derive(Debug, Clone)]
pub(super) struct Record {
    pub(super) subject: String,
    pub(super) expected: u64,
}

/// How a publish attempt ended, when not with a sequence.
pub(super) enum Publish {
    /// The expected last sequence of a subject moved (another writer): learn and retry.
    Moved,
    Failed(StorageError),
}

impl Cluster {
    /// Publishes `messages` guarded by `prevs` (one per stream); the sequence of the last one
    /// (a batch takes consecutive sequences).
    pub(super) async fn publish_guarded(
        &self,
        messages: &[Outgoing<'_>],
        prevs: &HashMap<&str, Prev>,
    ) -> Result<u64, Publish> {
        match messages {
            [] => Err(Publish::Failed(StorageError::Unavailable("internal: an empty publish".into()))),
            [one] if one.record.is_none() => self.publish_one(one, prevs[one.stream]).await,
            _ => self.publish_batch(messages, prevs).await,
        }
    }

    fn headers(&self, extra: &HeaderMap, prev_header: (&'static str, u64)) -> HeaderMap {
        let mut headers = extra.clone();
        headers.insert("Nats-Msg-Id", self.next_id().as_str());
        headers.insert(prev_header.0, prev_header.1.to_string().as_str());
        headers
    }

    /// One message: a plain publish guarded by the expected last sequence of its subject.
    async fn publish_one(&self, message: &Outgoing<'_>, prev: Prev) -> Result<u64, Publish> {
        let mut headers = self.headers(&message.headers, (PREV, prev.chain));
        headers.insert("Nats-Expected-Last-Subject-Sequence", prev.expected.to_string().as_str());
        let ack = self
            .inner
            .js
            .publish_with_headers(self.subject(message.stream), headers, message.payload.clone())
            .await
            .map_err(|e| Publish::Failed(StorageError::Unavailable(e.to_string())))?;
        match ack.await {
            Ok(ack) => Ok(ack.sequence),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence || moved(&e) => {
                Err(Publish::Moved)
            }
            Err(e) => Err(Publish::Failed(StorageError::Unavailable(e.to_string()))),
        }
    }

    /// Several messages: one JetStream atomic batch (all stored or none). The first message of
    /// each stream carries the expected-sequence guard; later ones point back inside the batch.
    async fn publish_batch(&self, messages: &[Outgoing<'_>], prevs: &HashMap<&str, Prev>) -> Result<u64, Publish> {
        let batch_id = self.next_id();
        let client = &self.inner.client;
        let mut last_index: HashMap<&str, usize> = HashMap::new();
        let unavailable = |e: String| Publish::Failed(StorageError::Unavailable(e));
        for (i, message) in messages.iter().enumerate() {
            let mut headers = match (&message.record, last_index.get(message.stream).copied()) {
                (Some(record), _) => {
                    let mut headers = message.headers.clone();
                    headers.insert("Nats-Msg-Id", self.next_id().as_str());
                    headers.insert("Nats-Expected-Last-Subject-Sequence", record.expected.to_string().as_str());
                    headers
                }
                (None, None) => {
                    last_index.insert(message.stream, i);
                    let prev = prevs[message.stream];
                    let mut headers = self.headers(&message.headers, (PREV, prev.chain));
                    headers.insert("Nats-Expected-Last-Subject-Sequence", prev.expected.to_string().as_str());
                    headers
                }
                (None, Some(before)) => {
                    last_index.insert(message.stream, i);
                    self.headers(&message.headers, (PREV_BACK, (i - before) as u64))
                }
            };
            headers.insert("Nats-Batch-Id", batch_id.as_str());
            headers.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
            let subject = match &message.record {
                Some(record) => record.subject.clone(),
                None => self.subject(message.stream),
            };
            if i + 1 < messages.len() {
                client
                    .publish_with_headers(subject, headers, message.payload.clone())
                    .await
                    .map_err(|e| unavailable(e.to_string()))?;
            } else {
                headers.insert("Nats-Batch-Commit", "1");
                let reply = client
                    .request_with_headers(subject, headers, message.payload.clone())
                    .await
                    .map_err(|e| unavailable(e.to_string()))?;
                return parse_batch_ack(&reply.payload);
            }
        }
        Err(unavailable("empty batch".into()))
    }

    /// Refuses, before anything is published, what NATS cannot carry: more messages than an
    /// atomic batch holds, or a message whose payload and headers exceed the server's
    /// `max_payload`. Retrying could never help (`413`).
    pub(super) fn check_sizes(&self, messages: &[Outgoing<'_>]) -> Result<(), StorageError> {
        if messages.len() > MAX_BATCH {
            // A producer's state record takes a place of the batch: the client's limit is less.
            let records = messages.iter().filter(|m| m.record.is_some()).count();
            return Err(StorageError::BatchTooLarge(MAX_BATCH - records));
        }
        let max_payload = self.inner.client.server_info().max_payload;
        let room = |m: &Outgoing| HEADER_ROOM + super::state::headers_len(&m.headers);
        if let Some(m) = messages.iter().find(|m| m.payload.len() + room(m) > max_payload) {
            let limit = max_payload.saturating_sub(room(m));
            return Err(StorageError::MessageTooLarge { limit, max_payload });
        }
        Ok(())
    }

    /// Locks the streams (in name order, so two publishes never wait on each other): this
    /// node's writers of one stream take turns, so each knows the state the previous one left
    /// and their guards do not collide (other nodes' still may).
    pub(super) async fn take_turns(&self, streams: &[&str]) -> Turns {
        let mut names: Vec<&str> = streams.to_vec();
        names.sort_unstable();
        names.dedup();
        let locks: Vec<Arc<tokio::sync::Mutex<()>>> = {
            let mut map = self.inner.turns.lock().unwrap_or_else(|p| p.into_inner());
            names.iter().map(|s| map.entry(s.to_string()).or_default().clone()).collect()
        };
        let mut guards = Vec::with_capacity(locks.len());
        for lock in locks {
            guards.push(lock.lock_owned().await);
        }
        Turns { guards, streams: names.iter().map(|s| s.to_string()).collect(), cluster: self.clone() }
    }

    /// After a publish of `messages` acknowledged at `last`: the sequence of each stream's last
    /// message in it (a batch takes `last - n + 1 ..= last`, in order; producers' records
    /// take theirs too), and this node's readers woken (the RePublish feed wakes the other
    /// nodes').
    pub(super) fn published<'m>(&self, messages: &[Outgoing<'m>], last: u64) -> HashMap<&'m str, u64> {
        self.saw(last);
        let first = last + 1 - messages.len() as u64;
        let mut lasts = HashMap::new();
        for (i, message) in messages.iter().enumerate().filter(|(_, m)| m.record.is_none()) {
            lasts.insert(message.stream, first + i as u64);
        }
        for (stream, seq) in &lasts {
            self.inner.hub.wake(stream, *seq);
        }
        lasts
    }
}

/// Before another attempt after a guard moved: at once at first, then a short random pause
/// (two nodes retrying in lockstep would keep colliding).
pub(super) async fn back_off(attempt: usize) {
    if attempt > 2 {
        let pause = rand::random_range(0..(attempt as u64).min(20));
        tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
    }
}

/// The per-stream turns a publish holds; the last holder of a stream removes its entry.
pub(super) struct Turns {
    guards: Vec<tokio::sync::OwnedMutexGuard<()>>,
    streams: Vec<String>,
    cluster: Cluster,
}

impl Drop for Turns {
    fn drop(&mut self) {
        self.guards.clear();
        let mut map = self.cluster.inner.turns.lock().unwrap_or_else(|p| p.into_inner());
        for stream in &self.streams {
            if map.get(stream).is_some_and(|lock| Arc::strong_count(lock) == 1) {
                map.remove(stream);
            }
        }
    }
}

/// Whether a publish failed on an expected-sequence guard that async-nats does not name
/// (10164 "wrong last sequence", which nats-server also answers for single publishes).
fn moved(error: &jetstream::context::PublishError) -> bool {
    use std::error::Error as _;
    let mut source = error.source();
    while let Some(e) = source {
        if let Some(js) = e.downcast_ref::<jetstream::Error>() {
            return matches!(js.error_code().0, 10071 | 10164);
        }
        source = e.source();
    }
    false
}

/// The commit reply of an atomic batch: `{"stream","seq","batch","count"}` or `{"error":…}`.
fn parse_batch_ack(payload: &[u8]) -> Result<u64, Publish> {
    let answer: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|_| Publish::Failed(StorageError::Unavailable("unreadable batch acknowledgement".into())))?;
    if let Some(seq) = answer.get("seq").and_then(|v| v.as_u64()).filter(|_| answer.get("error").is_none()) {
        return Ok(seq);
    }
    match answer.pointer("/error/err_code").and_then(|v| v.as_u64()) {
        // Wrong last sequence (a guarded subject moved).
        Some(10071) | Some(10164) => Err(Publish::Moved),
        Some(10199) => Err(Publish::Failed(StorageError::BatchTooLarge(MAX_BATCH))),
        _ => Err(Publish::Failed(StorageError::Unavailable(format!("batch refused: {answer}")))),
    }
}
