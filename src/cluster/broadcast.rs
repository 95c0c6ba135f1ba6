//! Broadcasts in cluster mode: a batch of messages to any streams, stored atomically (one
//! message, or one JetStream atomic batch) and durably (answered once JetStream acknowledged,
//! that is once a quorum of replicas has it), within `nats.publish_timeout`.
//!
//! Like every write, a broadcast is checked against the state of each stream it names (a
//! stream made by the write API takes broadcasts only while it is an open JSON stream,
//! `writes::check_broadcast`) and guarded by the subject's last sequence, so the check holds
//! when the batch lands (see `publish`). A refused batch stores nothing.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::StreamExt;

use super::publish::{back_off, Outgoing, Prev, Publish, PUBLISH_ATTEMPTS};
use super::state::{self, StreamState};
use super::{Cluster, MAX_BATCH};
use crate::meta::{self, SharedMeta};
use crate::storage::{now_ms, NewMessage, StorageError};
use crate::writes::{check_broadcast, WriteError};

/// Leader look-ups of unknown streams one append makes at once.
const LOOKUPS_AT_ONCE: usize = 64;

/// A stream's state for one attempt, and whether it came from this node's memory (a hint,
/// never enough to refuse on).
struct Looked {
    state: StreamState,
    from_memory: bool,
}

impl Cluster {
    /// Appends broadcast messages atomically and durably, or refuses them all.
    pub async fn append(&self, messages: Vec<NewMessage>) -> Result<(), WriteError> {
        if messages.len() > MAX_BATCH {
            return Err(StorageError::BatchTooLarge(MAX_BATCH).into());
        }
        if messages.is_empty() {
            return Ok(());
        }
        let timeout = self.inner.publish_timeout;
        let started = std::time::Instant::now();
        let result = match tokio::time::timeout(timeout, self.append_inner(&messages)).await {
            Ok(result) => result,
            Err(_) => Err(unanswered(timeout).into()),
        };
        crate::metrics::get().nats_publish_seconds.observe(started.elapsed().as_secs_f64());
        result
    }

    async fn append_inner(&self, messages: &[NewMessage]) -> Result<(), WriteError> {
        let mut streams: Vec<&str> = messages.iter().map(|m| &*m.stream).collect();
        streams.sort_unstable();
        streams.dedup();
        let _turns = self.take_turns(&streams).await;
        for attempt in 1..=PUBLISH_ATTEMPTS {
            let looked = self.look_up(&streams).await?;
            // A stream made by the write API that takes no broadcast: refused, on the
            // leader's word only (this node's memory may be behind).
            let mut refused = None;
            for (stream, looked) in &looked {
                if let Some(meta) = &looked.state.meta {
                    if let Err(refusal) = check_broadcast(meta, looked.state.tail) {
                        refused = Some((*stream, looked.from_memory, refusal));
                        break;
                    }
                }
            }
            match refused {
                Some((stream, true, _)) => {
                    self.forget(stream);
                    continue;
                }
                Some((_, false, refusal)) => return Err(refusal.into()),
                None => {}
            }
            let prevs = self.predecessors(&looked).await?;
            let now = now_ms();
            // Each stream's metadata and life, carried on to its new messages.
            let metas: HashMap<&str, (SharedMeta, Option<u64>)> = looked
                .iter()
                .map(|(stream, l)| {
                    (*stream, (l.state.meta.clone().unwrap_or_else(meta::broadcast_stream), l.state.life))
                })
                .collect();
            let outgoing: Vec<Outgoing> = messages
                .iter()
                .map(|m| {
                    let mut headers = async_nats::HeaderMap::new();
                    let (meta, life) = &metas[&*m.stream];
                    state::mark(&mut headers, meta, *life, None, 0, now);
                    Outgoing { stream: &m.stream, payload: m.json.clone(), headers, record: None }
                })
                .collect();
            self.check_sizes(&outgoing)?;
            match self.publish_guarded(&outgoing, &prevs).await {
                Ok(last) => {
                    self.stored_broadcast(&outgoing, last, &metas, now);
                    return Ok(());
                }
                Err(Publish::Moved) => {
                    // Another node wrote one of these streams since: learn and try again.
                    for stream in &streams {
                        self.forget(stream);
                    }
                    log::debug!("expected sequence moved (attempt {attempt}); retrying");
                    back_off(attempt).await;
                }
                Err(Publish::Failed(e)) => return Err(e.into()),
            }
        }
        Err(StorageError::Unavailable("the streams kept moving under concurrent writers".into()).into())
    }

    /// After an acknowledged broadcast: what this node now knows of each stream, renewed
    /// TTLs, and the count retention of broadcast streams.
    fn stored_broadcast(
        &self,
        outgoing: &[Outgoing],
        last: u64,
        metas: &HashMap<&str, (SharedMeta, Option<u64>)>,
        now: u64,
    ) {
        let lasts = self.published(outgoing, last);
        let first = last + 1 - outgoing.len() as u64;
        for (stream, seq) in lasts {
            let (meta, life) = metas[stream].clone();
            let written_ms = if meta.ttl_secs.is_some() { now } else { 0 };
            if written_ms > 0 {
                self.inner.accesses.record(stream, now);
            }
            let created = meta.created;
            self.remember(stream, StreamState { last: seq, tail: seq, meta: Some(meta), written_ms, life });
            if !created {
                let mut positions = outgoing.iter().enumerate().filter(|(_, m)| m.stream == stream);
                let first_here = positions.next().map_or(seq, |(i, _)| first + i as u64);
                let n = outgoing.iter().filter(|m| m.stream == stream).count() as u64;
                self.counted(stream, first_here, seq, n);
            }
        }
    }

    /// The state of each stream: what this node knows, else the leader's answer. Unknown
    /// streams are looked up concurrently (LOOKUPS_AT_ONCE at a time), so a batch to many new
    /// streams costs a few round trips, not one per stream.
    async fn look_up<'s>(&self, streams: &[&'s str]) -> Result<HashMap<&'s str, Looked>, StorageError> {
        let mut looked = HashMap::new();
        let mut unknown = Vec::new();
        for &stream in streams {
            match self.known(stream) {
                Some(state) => {
                    looked.insert(stream, Looked { state, from_memory: true });
                }
                None => unknown.push(stream),
            }
        }
        let answers: Vec<(&str, Result<StreamState, StorageError>)> = futures_util::stream::iter(unknown)
            .map(|stream| async move { (stream, self.stream_state(stream).await) })
            .buffer_unordered(LOOKUPS_AT_ONCE)
            .collect()
            .await;
        for (stream, answer) in answers {
            looked.insert(stream, Looked { state: answer?, from_memory: false });
        }
        Ok(looked)
    }

    /// What each stream's first message in this publish follows. For subjects with nothing
    /// stored (new streams, or streams whose every message retention deleted), the chain
    /// starts where retention stands, asked now that they were seen empty (see the module
    /// docs of `cluster`).
    async fn predecessors<'s>(
        &self,
        looked: &HashMap<&'s str, Looked>,
    ) -> Result<HashMap<&'s str, Prev>, StorageError> {
        let empty: HashSet<&str> = looked.iter().filter(|(_, l)| l.state.last == 0).map(|(s, _)| *s).collect();
        let chain_start = if empty.is_empty() { 0 } else { self.chain_start().await? };
        Ok(looked.iter().map(|(stream, l)| (*stream, Prev::after(l.state.last, chain_start))).collect())
    }
}

/// The answer when JetStream did not acknowledge within `nats.publish_timeout` (the write
/// may still land: the client's retry is at-least-once).
pub(super) fn unanswered(timeout: Duration) -> StorageError {
    StorageError::Unavailable(format!("no acknowledgement from JetStream within {timeout:?}"))
}
