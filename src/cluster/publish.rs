//! The publish path: appends (one message, or one JetStream atomic batch) guarded by each
//! stream's expected last sequence, which also gives every message its predecessor.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::HeaderMap;
use futures_util::StreamExt;

use super::{Cluster, MAX_BATCH, PREV, PREV_BACK};
use crate::storage::{NewMessage, StorageError};

/// Attempts when another node wrote the same stream in between (expected sequence moved);
/// `nats.publish_timeout` bounds them too.
const PUBLISH_ATTEMPTS: usize = 100;
/// Leader look-ups of unknown streams one append makes at once.
const LOOKUPS_AT_ONCE: usize = 64;
/// Bytes of a message's NATS headers (ids, predecessor, guard, batch headers: about 300),
/// with room to spare, counted against the server's `max_payload`.
pub const HEADER_ROOM: usize = 1024;

/// A stream's predecessor in an append: the last sequence its subject must have (the guard)
/// and the one its first message names (`Ds-Prev`). They differ only for a subject with
/// nothing stored.
#[derive(Debug, Clone, Copy)]
struct Prev {
    expected: u64,
    chain: u64,
}

impl Cluster {
    /// Appends atomically and durably: answered once JetStream acknowledged (a quorum of
    /// replicas has the messages), within `nats.publish_timeout`.
    pub async fn append(&self, messages: Vec<NewMessage>) -> Result<(), StorageError> {
        if messages.len() > MAX_BATCH {
            return Err(StorageError::BatchTooLarge(MAX_BATCH));
        }
        if messages.is_empty() {
            return Ok(());
        }
        self.check_sizes(&messages)?;
        let timeout = self.inner.publish_timeout;
        let started = std::time::Instant::now();
        let result = match tokio::time::timeout(timeout, self.append_inner(&messages)).await {
            Ok(result) => result,
            Err(_) => Err(StorageError::Unavailable(format!("no acknowledgement from JetStream within {timeout:?}"))),
        };
        crate::metrics::get().nats_publish_seconds.observe(started.elapsed().as_secs_f64());
        result
    }

    async fn append_inner(&self, messages: &[NewMessage]) -> Result<(), StorageError> {
        // This node's writers of one stream take turns: each knows the tail the previous one
        // left, so their expected-sequence guards do not collide (other nodes still may).
        let mut streams: Vec<&str> = messages.iter().map(|m| m.stream.as_str()).collect();
        streams.sort_unstable();
        streams.dedup();
        let _turns = self.take_turns(&streams).await;
        for attempt in 1..=PUBLISH_ATTEMPTS {
            let prevs = self.predecessors(messages).await?;
            let outcome = if messages.len() == 1 {
                self.publish_one(&messages[0], prevs[messages[0].stream.as_str()]).await
            } else {
                self.publish_batch(messages, &prevs).await
            };
            match outcome {
                Ok(last) => {
                    self.saw(last);
                    // The batch took `last - n + 1 ..= last`, in order.
                    let first = last + 1 - messages.len() as u64;
                    for (i, message) in messages.iter().enumerate() {
                        self.remember_tail(&message.stream, first + i as u64);
                    }
                    for (i, message) in messages.iter().enumerate().rev() {
                        // Wake this node's readers now; the RePublish feed wakes the others.
                        self.inner.hub.wake(&message.stream, first + i as u64);
                    }
                    return Ok(());
                }
                Err(Publish::Moved) => {
                    // Another node wrote one of these streams since: learn and try again,
                    // after a short random pause once it keeps happening (two nodes
                    // retrying in lockstep would keep colliding).
                    for message in messages {
                        self.forget_tail(&message.stream);
                    }
                    log::debug!("expected sequence moved (attempt {attempt}); retrying");
                    if attempt > 2 {
                        let pause = rand::random_range(0..(attempt as u64).min(20));
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                    }
                }
                Err(Publish::Failed(e)) => return Err(e),
            }
        }
        Err(StorageError::Unavailable("the streams kept moving under concurrent writers".into()))
    }

    /// Locks the streams (in name order, so two appends never wait on each other).
    async fn take_turns(&self, streams: &[&str]) -> Turns {
        let locks: Vec<Arc<tokio::sync::Mutex<()>>> = {
            let mut map = self.inner.turns.lock().unwrap_or_else(|p| p.into_inner());
            streams.iter().map(|s| map.entry(s.to_string()).or_default().clone()).collect()
        };
        let mut guards = Vec::with_capacity(locks.len());
        for lock in locks {
            guards.push(lock.lock_owned().await);
        }
        Turns { guards, streams: streams.iter().map(|s| s.to_string()).collect(), cluster: self.clone() }
    }

    /// Refuses, before anything is published, a message NATS cannot carry: its payload and
    /// our headers must fit the server's `max_payload`. Retrying could never help (`413`).
    fn check_sizes(&self, messages: &[NewMessage]) -> Result<(), StorageError> {
        let max_payload = self.inner.client.server_info().max_payload;
        let limit = max_payload.saturating_sub(HEADER_ROOM);
        if messages.iter().any(|m| m.json.len() > limit) {
            crate::metrics::get().broadcast_rejected.with_label_values(&["too_large"]).inc();
            return Err(StorageError::MessageTooLarge { limit, max_payload });
        }
        Ok(())
    }

    /// What each stream's first message in this append follows: what this node knows, else
    /// the leader's answer. Unknown streams are looked up concurrently (LOOKUPS_AT_ONCE at a
    /// time), so a batch to many new streams costs a few round trips, not one per stream.
    async fn predecessors<'m>(&self, messages: &'m [NewMessage]) -> Result<HashMap<&'m str, Prev>, StorageError> {
        let mut prevs: HashMap<&str, Prev> = HashMap::new();
        let mut unknown: Vec<&str> = Vec::new();
        let mut asked: HashSet<&str> = HashSet::new();
        for message in messages {
            let stream = message.stream.as_str();
            if prevs.contains_key(stream) || asked.contains(stream) {
                continue;
            }
            match self.known_tail(stream) {
                Some(seq) => {
                    prevs.insert(stream, Prev { expected: seq, chain: seq });
                }
                None => {
                    asked.insert(stream);
                    unknown.push(stream);
                }
            }
        }
        let answers: Vec<(&str, Result<Option<u64>, StorageError>)> = futures_util::stream::iter(unknown)
            .map(|stream| async move { (stream, self.leader_last(&self.subject(stream)).await) })
            .buffer_unordered(LOOKUPS_AT_ONCE)
            .collect()
            .await;
        let mut empty = Vec::new();
        for (stream, answer) in answers {
            match answer? {
                Some(seq) => {
                    prevs.insert(stream, Prev { expected: seq, chain: seq });
                }
                None => empty.push(stream),
            }
        }
        if !empty.is_empty() {
            // Nothing stored in these subjects: new streams, or streams whose every message
            // retention deleted. Those messages are before the stream-wide first sequence,
            // asked now that the subjects were seen empty; the new chain starts there, so a
            // reader from a position before it gets `410` (see the module docs).
            let chain = self.state().await?.first_sequence.saturating_sub(1);
            for stream in empty {
                prevs.insert(stream, Prev { expected: 0, chain });
            }
        }
        Ok(prevs)
    }

    fn headers(&self, prev_header: (&'static str, u64)) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", self.next_id().as_str());
        headers.insert(prev_header.0, prev_header.1.to_string().as_str());
        headers
    }

    /// One message: a plain publish guarded by the expected last sequence of its subject.
    async fn publish_one(&self, message: &NewMessage, prev: Prev) -> Result<u64, Publish> {
        let mut headers = self.headers((PREV, prev.chain));
        headers.insert("Nats-Expected-Last-Subject-Sequence", prev.expected.to_string().as_str());
        let ack = self
            .inner
            .js
            .publish_with_headers(self.subject(&message.stream), headers, message.json.clone())
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
    async fn publish_batch(&self, messages: &[NewMessage], prevs: &HashMap<&str, Prev>) -> Result<u64, Publish> {
        let batch_id = self.next_id();
        let client = &self.inner.client;
        let mut last_index: HashMap<&str, usize> = HashMap::new();
        let unavailable = |e: String| Publish::Failed(StorageError::Unavailable(e));
        for (i, message) in messages.iter().enumerate() {
            let mut headers = match last_index.insert(&message.stream, i) {
                None => {
                    let prev = prevs[message.stream.as_str()];
                    let mut headers = self.headers((PREV, prev.chain));
                    headers.insert("Nats-Expected-Last-Subject-Sequence", prev.expected.to_string().as_str());
                    headers
                }
                Some(before) => self.headers((PREV_BACK, (i - before) as u64)),
            };
            headers.insert("Nats-Batch-Id", batch_id.as_str());
            headers.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
            let subject = self.subject(&message.stream);
            if i + 1 < messages.len() {
                client
                    .publish_with_headers(subject, headers, message.json.clone())
                    .await
                    .map_err(|e| unavailable(e.to_string()))?;
            } else {
                headers.insert("Nats-Batch-Commit", "1");
                let reply = client
                    .request_with_headers(subject, headers, message.json.clone())
                    .await
                    .map_err(|e| unavailable(e.to_string()))?;
                return parse_batch_ack(&reply.payload);
            }
        }
        Err(unavailable("empty batch".into()))
    }
}

/// The per-stream turns an append holds; the last holder of a stream removes its entry.
struct Turns {
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

/// How a publish attempt ended, when not with a sequence.
enum Publish {
    /// The expected last sequence of a subject moved (another writer): retry.
    Moved,
    Failed(StorageError),
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
