//! Where a DS stream ends: the stream leader's answers, and the stream-wide sequence this node
//! has seen.
//!
//! The order of questions matters (PITFALLS.md, "A cluster read must learn the stream-wide last
//! sequence before asking for a subject's last message"): a position answered for a stream
//! with nothing stored must come from *before* the subject was seen empty. A stream-wide
//! sequence learned after could already be past a message of that stream stored in between,
//! and a reader going on from there would never get it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream::stream;

use super::state::{Marks, StreamState};
use super::{Cluster, READ_TIMEOUT};

/// How long one request to the stream's API waits before it is sent again.
const API_ATTEMPT: std::time::Duration = std::time::Duration::from_millis(500);
/// Pause after a request nobody could take (no responders), before the next one.
const API_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);
use crate::meta::SharedMeta;
use crate::offset::Position;
use crate::storage::StorageError;

/// The stream leader's answer about a subject's last message (`leader_last`).
pub(super) type LeaderLast = Result<Option<(u64, Marks)>, StorageError>;

impl Cluster {
    /// The highest sequence of the whole JetStream stream this node knows to be stored: from
    /// its own acknowledgements, the wake-up feed (every stored message, whoever wrote it) and
    /// the health check's stream info (every second). It never passes the stream's real last
    /// sequence, and any message stored after it is read has a higher sequence.
    pub(super) fn seen(&self) -> u64 {
        self.inner.seen.load(Ordering::Acquire)
    }

    pub(super) fn saw(&self, seq: u64) {
        self.inner.seen.fetch_max(seq, Ordering::AcqRel);
    }

    /// The last message of a subject according to the stream leader (which has everything
    /// acknowledged): its sequence and marks, or `None` when the subject holds no message.
    ///
    /// Askers of one subject at the same moment share a question sent after each of them
    /// asked (`rounds`): the answer is as fresh as one asked alone.
    pub(super) async fn leader_last(&self, subject: &str) -> LeaderLast {
        let ask = || self.leader_get(serde_json::json!({ "last_by_subj": subject }).to_string());
        self.inner.lookups.ask(subject, ask).await
    }

    /// A request to the stream's JetStream API (`$JS.API.STREAM.<what>.<stream>`), which the
    /// stream leader answers; its JSON answer. Only for idempotent requests (a read, a purge up
    /// to a sequence): while the stream has no leader (a NATS server was lost) a request is
    /// never answered, so it is sent again every [`API_ATTEMPT`] until one is, within
    /// `READ_TIMEOUT` (one request timing out the whole budget failed reads for 5 s after a
    /// new leader was up, seen in tests/cluster_writes.rs).
    pub(super) async fn stream_api(&self, what: &str, request: String) -> Result<serde_json::Value, StorageError> {
        let api = format!("$JS.API.STREAM.{what}.{}", self.inner.stream);
        let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
        let payload = bytes::Bytes::from(request);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(StorageError::Unavailable("no answer from the stream leader".into()));
            }
            let attempt = self.inner.client.request(api.clone(), payload.clone());
            match tokio::time::timeout(left.min(API_ATTEMPT), attempt).await {
                Ok(Ok(reply)) => {
                    return serde_json::from_slice(&reply.payload).map_err(|e| StorageError::Unavailable(e.to_string()))
                }
                // No responders (nobody leads yet): a moment, then again.
                Ok(Err(e)) if left > API_ATTEMPT => {
                    log::debug!("stream API {what}: {e}, asking again");
                    tokio::time::sleep(API_RETRY_PAUSE).await;
                }
                Ok(Err(e)) => return Err(StorageError::Unavailable(e.to_string())),
                Err(_elapsed) => log::debug!("stream API {what}: no answer yet, asking again"),
            }
        }
    }

    /// One `$JS.API.STREAM.MSG.GET` (which only the leader answers).
    pub(super) async fn leader_get(&self, request: String) -> Result<Option<(u64, Marks)>, StorageError> {
        crate::metrics::get().nats_leader_gets.inc();
        let answer = self.stream_api("MSG.GET", request).await?;
        if let Some(seq) = answer.pointer("/message/seq").and_then(|v| v.as_u64()) {
            let hdrs = answer.pointer("/message/hdrs").and_then(|v| v.as_str());
            return Ok(Some((seq, Marks::from_encoded(hdrs))));
        }
        match answer.pointer("/error/err_code").and_then(|v| v.as_u64()) {
            // 10037: no message found.
            Some(10037) => Ok(None),
            _ => Err(StorageError::Unavailable(format!("stream leader answered {answer}"))),
        }
    }

    /// The stream's state from its leader: sequences, messages, bytes, subjects.
    pub(super) async fn state(&self) -> Result<stream::State, StorageError> {
        let info = tokio::time::timeout(READ_TIMEOUT, self.inner.js.get_stream(&self.inner.stream))
            .await
            .map_err(|_| StorageError::Unavailable("no answer from the stream leader".into()))?
            .map_err(|e| StorageError::Unavailable(e.to_string()))?;
        let state = info.cached_info().state.clone();
        self.saw(state.last_sequence);
        Ok(state)
    }

    /// The state of `stream` from the stream leader. For a stream with nothing stored, its
    /// position is the stream-wide sequence seen *before* asking (any later message of it
    /// follows that).
    pub(super) async fn stream_state(&self, stream: &str) -> Result<StreamState, StorageError> {
        let seen = self.seen();
        Ok(match self.leader_last(&self.subject(stream)).await? {
            Some((seq, marks)) => StreamState::after(seq, &marks),
            None => StreamState::empty(seen),
        })
    }

    /// The position after the last message of `stream` (see `stream_state`).
    pub async fn tail(&self, stream: &str) -> Result<Position, StorageError> {
        let state = self.stream_state(stream).await?;
        Ok(Position { epoch: self.inner.epoch, seq: state.tail })
    }

    /// The tail and metadata of a stream that exists and has not expired (HEAD: never renews).
    pub async fn head(&self, stream: &str) -> Result<(Position, Option<SharedMeta>), StorageError> {
        let state = self.stream_state(stream).await?;
        Ok((Position { epoch: self.inner.epoch, seq: state.tail }, self.live(stream, &state)))
    }
}

/// Which sequences are old: stored at least half of `max_age` ago. From samples of `seen`
/// taken once a second by the health check.
///
/// A reader at the last message L of a quiet stream is moved on (its next position becomes the
/// stream-wide one) once L is old: when retention deletes L, JetStream forgets the stream's last
/// sequence, and a reader still at L could not be told apart from one that missed messages
/// (`read::nothing_after`). Live readers come back every `ds.poll_interval` or `ds.sse_ttl`, well
/// within half of `history_ttl` by default. A fresh L is left alone: a re-read at the tail
/// keeps its offset, as on the embedded engine.
pub(super) struct Aging {
    half: Duration,
    samples: Mutex<VecDeque<(Instant, u64)>>,
    old: AtomicU64,
}

impl Aging {
    pub(super) fn new(max_age: Duration) -> Aging {
        Aging { half: max_age / 2, samples: Mutex::new(VecDeque::new()), old: AtomicU64::new(0) }
    }

    /// Records that `seen` was stored by now.
    pub(super) fn sample(&self, seen: u64) {
        if self.half.is_zero() {
            return; // nothing ever expires
        }
        let now = Instant::now();
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples.push_back((now, seen));
        let old_enough = |at: Instant| now.duration_since(at) >= self.half;
        while samples.len() > 1 && old_enough(samples[1].0) {
            samples.pop_front();
        }
        if let Some(&(_, seq)) = samples.front().filter(|(at, _)| old_enough(*at)) {
            self.old.fetch_max(seq, Ordering::AcqRel);
        }
    }

    /// Every sequence up to this one is old (0: none known to be).
    pub(super) fn old(&self) -> u64 {
        self.old.load(Ordering::Acquire)
    }
}
