//! The Durable Streams write operations as both engines take them: already parsed and
//! validated against the request alone (headers, JSON), checked against the stream by the
//! engine, atomically with the append they belong to (PRODUCT.md §13, WRITE.md §1, §2, §4).

use bytes::Bytes;

use crate::meta::{normalize, StreamMeta};
use crate::storage::StorageError;

/// One write to one stream.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// `PUT`: create the stream with this metadata and these first messages, or find it
    /// already there with the same configuration.
    Create { meta: StreamMeta, messages: Vec<Bytes> },
    /// `POST`: append (and maybe close), or close only (no messages, `close`).
    Append(Append),
    /// `DELETE`.
    Delete,
}

#[derive(Debug, Clone)]
pub struct Append {
    /// The request's `Content-Type`; `None` for a close-only request (which ignores it).
    pub content_type: Option<String>,
    pub messages: Vec<Bytes>,
    /// `Stream-Seq`, if sent.
    pub seq: Option<String>,
    /// `Stream-Closed: true`.
    pub close: bool,
    /// `Producer-Id`, `Producer-Epoch`, `Producer-Seq` (all three, or none).
    pub producer: Option<Producer>,
}

/// An idempotent producer's request (WRITE.md §3).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Producer {
    pub id: String,
    pub epoch: u64,
    pub seq: u64,
}

/// What a stream remembers of one producer: its epoch and the highest sequence accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerState {
    pub epoch: u64,
    pub last_seq: u64,
}

impl ProducerState {
    pub fn encode(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.epoch.to_be_bytes());
        out[8..].copy_from_slice(&self.last_seq.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<ProducerState> {
        let epoch = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let last_seq = u64::from_be_bytes(bytes.get(8..16)?.try_into().ok()?);
        Some(ProducerState { epoch, last_seq })
    }
}

/// What an append does, once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendPlan {
    /// Append (and/or close): the stream's metadata after it, and the producer's new state.
    Write { meta: StreamMeta, producer: Option<ProducerState> },
    /// A producer's retry of a request already applied: nothing is written; `state` is the
    /// producer's (its highest sequence is what the answer names).
    Duplicate { state: ProducerState, closed: bool },
}

/// What a write did. `tail` is the stream's sequence number after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// `201`: a new stream.
    Created { tail: u64, closed: bool },
    /// `200`: the same stream was already there; nothing written.
    Exists { tail: u64, closed: bool },
    /// `204` (`200` for a producer): appended (or closed); `producer` echoes its epoch and seq.
    Appended { tail: u64, closed: bool, producer: Option<(u64, u64)> },
    /// `204`: a producer's retry of what is already there; nothing written.
    Duplicate { tail: u64, closed: bool, epoch: u64, seq: u64 },
    /// `204`: deleted.
    Deleted,
    /// A broadcast was stored.
    Broadcast,
}

/// Why the stream refused a write (nothing was written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("stream_not_found")]
    NotFound,
    /// `PUT` of a stream that exists with another configuration.
    #[error("stream exists with a different configuration")]
    ConfigMismatch,
    /// Appending to (or re-creating open) a closed stream; carries its final tail.
    #[error("stream_closed")]
    Closed { tail: u64 },
    #[error("content_type_mismatch")]
    ContentTypeMismatch,
    /// `Stream-Seq` not greater than the last one accepted.
    #[error("Stream-Seq must be greater than the last one accepted")]
    SeqNotIncreasing,
    /// `403`: the producer's epoch is older than the stream's (a zombie writer).
    #[error("stale producer epoch: the stream has seen epoch {current}")]
    StaleEpoch { current: u64 },
    /// `400`: a new epoch must start at sequence 0.
    #[error("a new Producer-Epoch must start at Producer-Seq 0")]
    NewEpochNotAtZero,
    /// `409`: the producer skipped sequence numbers.
    #[error("Producer-Seq gap: expected {expected}, received {received}")]
    SeqGap { expected: u64, received: u64 },
    /// `410`: the stream was deleted (or expired) while forks still read it.
    #[error("stream_deleted: the stream was deleted; only its forks still read it")]
    Deleted,
    /// `404`: a fork's source does not exist.
    #[error("fork source stream not found")]
    ForkSourceNotFound,
    /// `409`: a fork's source was deleted (soft-deleted: its forks still read it).
    #[error("fork source stream was deleted")]
    ForkSourceDeleted,
    /// `409`: a fork's source is a stream of broadcasts, which AnyCable's retention trims.
    #[error("a stream made by broadcasts cannot be forked: its history is trimmed by retention")]
    ForkSourceTrimmed,
    /// `400`: the fork point is not a position of the source.
    #[error("invalid Stream-Fork-Offset: {0}")]
    ForkOffset(String),
    /// `400`: `Stream-Fork-Sub-Offset` goes past the data after the fork offset.
    #[error("invalid Stream-Fork-Sub-Offset: {0}")]
    ForkSubOffset(String),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// What a `PUT` compares with an existing stream: content type (normalized), TTL, Expires-At
/// (as given) and closure. Equal: `200`; else `409`.
pub fn same_configuration(existing: &StreamMeta, requested: &StreamMeta) -> bool {
    normalize(&existing.content_type) == normalize(&requested.content_type)
        && existing.ttl_secs == requested.ttl_secs
        && existing.expires_at.as_ref().map(|(raw, _)| raw) == requested.expires_at.as_ref().map(|(raw, _)| raw)
        && existing.closed == requested.closed
        && !existing.deleted
        && fork_key(existing) == fork_key(requested)
}

/// What a fork re-`PUT` compares (the fork point itself follows from these and the source).
fn fork_key(meta: &StreamMeta) -> Option<(&str, u64, u64)> {
    meta.fork.as_ref().map(|f| (f.source.as_str(), f.anchor, f.sub))
}

/// Checks an append against the stream as it is (after the writes before it), for a request
/// without producer headers; returns the metadata after it, or the refusal.
pub fn check_append(meta: &StreamMeta, tail: u64, append: &Append) -> Result<StreamMeta, Refusal> {
    match plan_append(meta, tail, append, None)? {
        AppendPlan::Write { meta, .. } => Ok(meta),
        AppendPlan::Duplicate { .. } => Ok(meta.clone()),
    }
}

/// Checks an append against the stream and, for a producer, its state there (`None`: a
/// producer the stream has not seen). Order (WRITE.md §2.1, §3.4, §4): closed (a producer's
/// retry of the request that closed the stream is a duplicate), content type, producer,
/// Stream-Seq.
pub fn plan_append(
    meta: &StreamMeta,
    tail: u64,
    append: &Append,
    producer_state: Option<ProducerState>,
) -> Result<AppendPlan, Refusal> {
    let close_only = append.messages.is_empty();
    if meta.closed {
        if let (Some(p), Some(by)) = (&append.producer, &meta.closed_by) {
            if p == by {
                let state = ProducerState { epoch: p.epoch, last_seq: p.seq };
                return Ok(AppendPlan::Duplicate { state, closed: true });
            }
        }
        // Closing a closed stream again is idempotent; anything else is refused.
        if close_only && append.close && append.producer.is_none() {
            return Ok(AppendPlan::Write { meta: meta.clone(), producer: None });
        }
        return Err(Refusal::Closed { tail });
    }
    if !close_only {
        let given = append.content_type.as_deref().map(normalize);
        if given.as_deref() != Some(normalize(&meta.content_type).as_str()) {
            return Err(Refusal::ContentTypeMismatch);
        }
    }
    let producer = match &append.producer {
        None => None,
        Some(p) => match check_producer(producer_state, p)? {
            ProducerCheck::Accept(state) => Some(state),
            // A retry: whatever its Stream-Seq, nothing is written (and nothing closed).
            ProducerCheck::Duplicate(state) => return Ok(AppendPlan::Duplicate { state, closed: false }),
        },
    };
    let mut next = meta.clone();
    if let Some(seq) = &append.seq {
        if meta.stream_seq.as_ref().is_some_and(|last| seq.as_bytes() <= last.as_bytes()) {
            return Err(Refusal::SeqNotIncreasing);
        }
        next.stream_seq = Some(seq.clone());
    }
    if append.close {
        next.closed = true;
        next.closed_by = append.producer.clone();
    }
    Ok(AppendPlan::Write { meta: next, producer })
}

enum ProducerCheck {
    Accept(ProducerState),
    Duplicate(ProducerState),
}

/// WRITE.md §3.2: per (stream, producer), serialized by the caller.
fn check_producer(state: Option<ProducerState>, p: &Producer) -> Result<ProducerCheck, Refusal> {
    let accept = ProducerState { epoch: p.epoch, last_seq: p.seq };
    match state {
        None if p.seq == 0 => Ok(ProducerCheck::Accept(accept)),
        None => Err(Refusal::SeqGap { expected: 0, received: p.seq }),
        Some(s) if p.epoch < s.epoch => Err(Refusal::StaleEpoch { current: s.epoch }),
        Some(s) if p.epoch > s.epoch => {
            if p.seq == 0 {
                Ok(ProducerCheck::Accept(accept))
            } else {
                Err(Refusal::NewEpochNotAtZero)
            }
        }
        Some(s) if p.seq <= s.last_seq => Ok(ProducerCheck::Duplicate(s)),
        Some(s) if p.seq == s.last_seq + 1 => Ok(ProducerCheck::Accept(accept)),
        Some(s) => Err(Refusal::SeqGap { expected: s.last_seq + 1, received: p.seq }),
    }
}

/// Checks a broadcast's messages against a stream: only an open JSON stream takes them.
pub fn check_broadcast(meta: &StreamMeta, tail: u64) -> Result<(), Refusal> {
    if meta.deleted {
        return Err(Refusal::Deleted);
    }
    if meta.closed {
        return Err(Refusal::Closed { tail });
    }
    if meta.framing() != crate::meta::Framing::Json {
        return Err(Refusal::ContentTypeMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn append(ct: Option<&str>, n: usize, seq: Option<&str>, close: bool) -> Append {
        Append {
            content_type: ct.map(str::to_string),
            messages: vec![Bytes::from_static(b"x"); n],
            seq: seq.map(str::to_string),
            close,
            producer: None,
        }
    }

    #[test]
    fn producers_follow_epochs_and_sequences() {
        let p = |epoch, seq| Producer { id: "p".into(), epoch, seq };
        let s = |epoch, last_seq| Some(ProducerState { epoch, last_seq });
        let accepted = |r: Result<ProducerCheck, Refusal>| matches!(r, Ok(ProducerCheck::Accept(_)));
        let duplicate = |r: Result<ProducerCheck, Refusal>| matches!(r, Ok(ProducerCheck::Duplicate(_)));
        assert!(accepted(check_producer(None, &p(2, 0))), "a new producer at any epoch, seq 0");
        assert_eq!(check_producer(None, &p(0, 3)).err(), Some(Refusal::SeqGap { expected: 0, received: 3 }));
        assert_eq!(check_producer(s(2, 5), &p(1, 6)).err(), Some(Refusal::StaleEpoch { current: 2 }));
        assert!(accepted(check_producer(s(2, 5), &p(3, 0))));
        assert_eq!(check_producer(s(2, 5), &p(3, 1)).err(), Some(Refusal::NewEpochNotAtZero));
        assert!(duplicate(check_producer(s(2, 5), &p(2, 5))) && duplicate(check_producer(s(2, 5), &p(2, 0))));
        assert!(accepted(check_producer(s(2, 5), &p(2, 6))));
        assert_eq!(check_producer(s(2, 5), &p(2, 8)).err(), Some(Refusal::SeqGap { expected: 6, received: 8 }));
    }

    #[test]
    fn a_producer_retry_of_the_closing_request_is_a_duplicate() {
        let producer = Some(Producer { id: "p".into(), epoch: 0, seq: 4 });
        let closed = StreamMeta { closed: true, closed_by: producer.clone(), ..text() };
        let retry = Append { producer: producer.clone(), ..append(Some("text/plain"), 1, None, true) };
        assert!(matches!(plan_append(&closed, 9, &retry, None), Ok(AppendPlan::Duplicate { closed: true, .. })));
        let other = Append { producer: Some(Producer { id: "q".into(), epoch: 0, seq: 4 }), ..retry };
        assert_eq!(plan_append(&closed, 9, &other, None), Err(Refusal::Closed { tail: 9 }));
    }

    fn text() -> StreamMeta {
        StreamMeta { content_type: "text/plain".into(), created: true, ..StreamMeta::default() }
    }

    #[test]
    fn appends_are_checked_closed_first_then_type_then_seq() {
        let open = text();
        assert_eq!(check_append(&open, 3, &append(Some("TEXT/PLAIN; x=y"), 1, None, false)).unwrap(), open);
        assert_eq!(
            check_append(&open, 3, &append(Some("text/html"), 1, None, false)),
            Err(Refusal::ContentTypeMismatch)
        );
        assert_eq!(check_append(&open, 3, &append(None, 1, None, false)), Err(Refusal::ContentTypeMismatch));
        // Close-only ignores the content type.
        assert!(check_append(&open, 3, &append(Some("image/png"), 0, None, true)).unwrap().closed);
        let closed = StreamMeta { closed: true, ..text() };
        assert_eq!(
            check_append(&closed, 3, &append(Some("text/html"), 1, None, false)),
            Err(Refusal::Closed { tail: 3 })
        );
        assert_eq!(check_append(&closed, 3, &append(None, 0, None, true)).unwrap(), closed);
    }

    #[test]
    fn stream_seq_must_grow_byte_wise() {
        let mut meta = text();
        for (seq, ok) in
            [("09", true), ("10", true), ("10", false), ("2", true), ("10", false), ("a", true), ("B", false)]
        {
            match check_append(&meta, 0, &append(Some("text/plain"), 1, Some(seq), false)) {
                Ok(next) => {
                    assert!(ok, "{seq} accepted");
                    meta = next;
                }
                Err(e) => assert!(!ok && e == Refusal::SeqNotIncreasing, "{seq}: {e:?}"),
            }
        }
    }

    #[test]
    fn put_compares_configuration() {
        let a = StreamMeta { ttl_secs: Some(60), ..text() };
        assert!(same_configuration(&a, &StreamMeta { content_type: "Text/Plain".into(), ..a.clone() }));
        assert!(!same_configuration(&a, &StreamMeta { ttl_secs: None, ..a.clone() }));
        assert!(!same_configuration(&a, &StreamMeta { closed: true, ..a.clone() }));
        assert!(!same_configuration(&a, &StreamMeta { content_type: "application/json".into(), ..a.clone() }));
    }
}
