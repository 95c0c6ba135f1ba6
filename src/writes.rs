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
}

/// What a write did. `tail` is the stream's sequence number after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// `201`: a new stream.
    Created { tail: u64, closed: bool },
    /// `200`: the same stream was already there; nothing written.
    Exists { tail: u64, closed: bool },
    /// `204`: appended (or closed).
    Appended { tail: u64, closed: bool },
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
}

/// Checks an append against the stream as it is (after the writes before it); returns the
/// metadata after it, or the refusal. Order (WRITE.md §2.1): closed, content type, Stream-Seq.
pub fn check_append(meta: &StreamMeta, tail: u64, append: &Append) -> Result<StreamMeta, Refusal> {
    let close_only = append.messages.is_empty();
    if meta.closed {
        // Closing a closed stream again is idempotent; anything else is refused.
        if close_only && append.close {
            return Ok(meta.clone());
        }
        return Err(Refusal::Closed { tail });
    }
    if !close_only {
        let given = append.content_type.as_deref().map(normalize);
        if given.as_deref() != Some(normalize(&meta.content_type).as_str()) {
            return Err(Refusal::ContentTypeMismatch);
        }
    }
    let mut next = meta.clone();
    if let Some(seq) = &append.seq {
        if meta.stream_seq.as_ref().is_some_and(|last| seq.as_bytes() <= last.as_bytes()) {
            return Err(Refusal::SeqNotIncreasing);
        }
        next.stream_seq = Some(seq.clone());
    }
    if append.close {
        next.closed = true;
    }
    Ok(next)
}

/// Checks a broadcast's messages against a stream: only an open JSON stream takes them.
pub fn check_broadcast(meta: &StreamMeta, tail: u64) -> Result<(), Refusal> {
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
        }
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
