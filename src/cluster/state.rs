//! A DS stream's state in cluster mode: carried by the headers of its own messages.
//!
//! There is no separate metadata store. A stream made or changed by the write API carries its
//! metadata (`Ds-Meta`, the JSON of [`StreamMeta`]: content type, closure, TTL, Expires-At,
//! the last `Stream-Seq`) on every message it stores, as it stands *after* that message. So the
//! subject's last message says what the stream is now, and a change of metadata is part of
//! the very publish (or atomic batch) that appends the messages it belongs to: an
//! append-and-close, or an append with its `Stream-Seq`, is never stored half. Streams that
//! only broadcasts ever wrote carry nothing (the default metadata: JSON, open).
//!
//! Changes that store no message of the stream are control messages (empty payload,
//! `Ds-Ctl`), never read as messages:
//! - `create`: a `PUT` without a body (the stream exists, empty); it is a position;
//! - `close`: a close-only `POST`; not a position: `Ds-Tail` names the one before it, so a
//!   close does not move the stream's tail, as on the embedded engine;
//! - `delete`: `DELETE` or expiry; the stream does not exist after it (the messages before it
//!   are purged right after, and ignored by reads until then);
//! - `meta`: a change of metadata alone (a fork's source counting its forks, a soft delete);
//!   not a position, like `close`.
//!
//! Every write is guarded by the subject's last sequence (see `publish`), so whoever checks
//! a write against the state of message N and stores it guarded by N knows that state was
//! current: that is what makes check-and-append atomic across nodes.
//!
//! A stream an idempotent producer wrote also carries its life (`Ds-Life`, a random number
//! drawn by the first producer's append after the stream was made) on every message from
//! then on: the producers' state records name it, so a record left from a stream deleted
//! under the same name is never taken for the new one's (see `producers`).

use std::sync::Arc;

use async_nats::HeaderMap;
use base64::Engine as _;

use crate::meta::{self, SharedMeta, StreamMeta};

pub(super) const META: &str = "Ds-Meta";
pub(super) const CONTROL: &str = "Ds-Ctl";
pub(super) const TAIL: &str = "Ds-Tail";
/// When the message was written (ms since the epoch, the writer's clock): streams with a
/// `Stream-TTL` only, whose writes renew it.
pub(super) const AT: &str = "Ds-At";
/// This life of the stream, for its producers' state records (see the module docs).
pub(super) const LIFE: &str = "Ds-Life";
/// A producer's state record: `<epoch> <seq> <life>` (see `producers`).
pub(super) const PRODUCER: &str = "Ds-Producer";

/// What a control message does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Control {
    Create,
    Close,
    Delete,
    Meta,
}

impl Control {
    fn as_str(self) -> &'static str {
        match self {
            Control::Create => "create",
            Control::Close => "close",
            Control::Delete => "delete",
            Control::Meta => "meta",
        }
    }

    fn parse(value: &str) -> Option<Control> {
        match value {
            "create" => Some(Control::Create),
            "close" => Some(Control::Close),
            "delete" => Some(Control::Delete),
            "meta" => Some(Control::Meta),
            _ => None,
        }
    }
}

/// What one stored message says about its stream (our headers, read back).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Marks {
    pub(super) control: Option<Control>,
    /// `Ds-Meta` as stored; parsed only when needed.
    pub(super) meta: Option<Arc<str>>,
    pub(super) tail: Option<u64>,
    pub(super) at: Option<u64>,
    pub(super) life: Option<u64>,
    /// `Ds-Producer` as stored (a producer's state record, never a stream's message).
    pub(super) producer: Option<String>,
}

impl Marks {
    pub(super) fn from_headers(headers: Option<&HeaderMap>) -> Marks {
        let Some(headers) = headers else { return Marks::default() };
        let get = |name: &str| headers.get(name).map(|v| v.as_str());
        Marks {
            control: get(CONTROL).and_then(Control::parse),
            meta: get(META).map(Arc::from),
            tail: get(TAIL).and_then(|v| v.parse().ok()),
            at: get(AT).and_then(|v| v.parse().ok()),
            life: get(LIFE).and_then(|v| v.parse().ok()),
            producer: get(PRODUCER).map(str::to_string),
        }
    }

    /// From the `hdrs` of a `STREAM.MSG.GET` answer: base64 of `NATS/1.0\r\nName: value\r\n…`.
    pub(super) fn from_encoded(hdrs: Option<&str>) -> Marks {
        let Some(block) = hdrs.and_then(|h| base64::engine::general_purpose::STANDARD.decode(h).ok()) else {
            return Marks::default();
        };
        let text = String::from_utf8_lossy(&block);
        let mut headers = HeaderMap::new();
        for line in text.split("\r\n").skip(1) {
            if let Some((name, value)) = line.split_once(':') {
                if [META, CONTROL, TAIL, AT, LIFE, PRODUCER].iter().any(|n| n.eq_ignore_ascii_case(name.trim())) {
                    headers.insert(name.trim(), value.trim());
                }
            }
        }
        Marks::from_headers(Some(&headers))
    }

    /// Whether the message is one of the stream's messages (readers get it), not a control
    /// message.
    pub(super) fn is_message(&self) -> bool {
        self.control.is_none()
    }

    /// The stream's tail after the message stored at `seq` (`None` after a removal).
    pub(super) fn position(&self, seq: u64) -> Option<u64> {
        match self.control {
            None | Some(Control::Create) => Some(seq),
            Some(Control::Close | Control::Meta) => Some(self.tail.unwrap_or(seq)),
            Some(Control::Delete) => None,
        }
    }

    /// The stream's metadata after this message: `None` after a removal; the broadcast
    /// default when it carries none.
    pub(super) fn meta(&self) -> Option<SharedMeta> {
        if self.control == Some(Control::Delete) {
            return None;
        }
        Some(match &self.meta {
            None => meta::broadcast_stream(),
            Some(json) => match StreamMeta::decode(json.as_bytes()) {
                Some(parsed) => Arc::new(parsed),
                None => {
                    log::warn!("unreadable {META} header {json:?}: read as a broadcast stream");
                    meta::broadcast_stream()
                }
            },
        })
    }
}

/// A DS stream as its subject's last message leaves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct StreamState {
    /// The subject's last sequence (0: nothing stored): what the next write's guard expects.
    pub(super) last: u64,
    /// The position after the stream's last message (for a stream that does not exist, one
    /// any later message of it follows).
    pub(super) tail: u64,
    /// `None`: the stream does not exist (nothing stored, or removed).
    pub(super) meta: Option<SharedMeta>,
    /// When it was last written (ms; 0: not recorded, see [`AT`]).
    pub(super) written_ms: u64,
    /// This life of the stream, once a producer wrote it (see [`LIFE`]).
    pub(super) life: Option<u64>,
}

impl StreamState {
    /// A subject with nothing stored; `position` is a stream-wide one taken before it was
    /// seen empty (see `lookup`).
    pub(super) fn empty(position: u64) -> StreamState {
        StreamState { last: 0, tail: position, meta: None, written_ms: 0, life: None }
    }

    /// After the message stored at `seq` with `marks`.
    pub(super) fn after(seq: u64, marks: &Marks) -> StreamState {
        StreamState {
            last: seq,
            tail: marks.position(seq).unwrap_or(seq),
            meta: marks.meta(),
            written_ms: marks.at.unwrap_or(0),
            life: marks.life.filter(|_| marks.control != Some(Control::Delete)),
        }
    }
}

/// Adds the headers that record `meta` (the stream's metadata after this message), its life
/// if it has one and, for a control message, what it does. Streams with the default
/// metadata carry nothing; streams made by `PUT` are kept by JetStream whatever `max_age`
/// says (`Nats-TTL: never`).
pub(super) fn mark(
    headers: &mut HeaderMap,
    meta: &StreamMeta,
    life: Option<u64>,
    control: Option<Control>,
    tail: u64,
    now_ms: u64,
) {
    // (Compared with the one shared default: no allocation per broadcast message.)
    if *meta != *meta::broadcast_stream() {
        headers.insert(META, String::from_utf8_lossy(&meta.encode()).as_ref());
    }
    if meta.created {
        headers.insert("Nats-TTL", "never");
    }
    if meta.ttl_secs.is_some() {
        headers.insert(AT, now_ms.to_string().as_str());
    }
    if let Some(life) = life {
        headers.insert(LIFE, life.to_string().as_str());
    }
    if let Some(control) = control {
        headers.insert(CONTROL, control.as_str());
        if matches!(control, Control::Close | Control::Meta) {
            headers.insert(TAIL, tail.to_string().as_str());
        }
    }
}

/// Bytes our headers take on a message (what counts against NATS' `max_payload`).
pub(super) fn headers_len(headers: &HeaderMap) -> usize {
    let line = |name: &async_nats::HeaderName, value: &async_nats::HeaderValue| {
        AsRef::<str>::as_ref(name).len() + value.as_str().len() + 4
    };
    headers.iter().map(|(name, values)| values.iter().map(|v| line(name, v)).sum::<usize>()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_meta() -> StreamMeta {
        StreamMeta {
            content_type: "text/plain".into(),
            created: true,
            ttl_secs: Some(5),
            stream_seq: Some("a\"b".into()),
            ..StreamMeta::default()
        }
    }

    #[test]
    fn marks_round_trip_through_headers_and_msg_get_blocks() {
        let meta = put_meta();
        let mut headers = HeaderMap::new();
        mark(&mut headers, &meta, Some(9), Some(Control::Close), 41, 1_000);
        assert_eq!(headers.get("Nats-TTL").map(|v| v.as_str()), Some("never"));
        let marks = Marks::from_headers(Some(&headers));
        assert_eq!(marks.control, Some(Control::Close));
        assert_eq!((marks.tail, marks.at, marks.life), (Some(41), Some(1_000), Some(9)));
        assert_eq!(marks.meta().as_deref(), Some(&meta));
        assert_eq!(marks.position(50), Some(41), "a close does not move the tail");
        assert!(!marks.is_message());

        let mut block = String::from("NATS/1.0\r\nNats-Msg-Id: x\r\n");
        for (name, values) in headers.iter() {
            block += &format!("{}: {}\r\n", AsRef::<str>::as_ref(name), values[0].as_str());
        }
        block += "\r\n";
        let encoded = base64::engine::general_purpose::STANDARD.encode(block);
        assert_eq!(Marks::from_encoded(Some(&encoded)), marks);
        assert_eq!(Marks::from_encoded(None), Marks::default());
    }

    #[test]
    fn broadcast_messages_carry_nothing_and_removals_end_a_stream() {
        let mut headers = HeaderMap::new();
        mark(&mut headers, &StreamMeta::default(), None, None, 0, 1);
        assert!(headers.is_empty());
        let plain = Marks::from_headers(Some(&headers));
        assert!(plain.is_message());
        assert_eq!(plain.meta(), Some(meta::broadcast_stream()));
        assert_eq!(
            StreamState::after(7, &plain),
            StreamState { last: 7, tail: 7, meta: plain.meta(), written_ms: 0, life: None }
        );
        let mut headers = HeaderMap::new();
        mark(&mut headers, &put_meta(), Some(3), Some(Control::Delete), 0, 1);
        let removed = Marks::from_headers(Some(&headers));
        assert_eq!((removed.meta(), removed.position(9)), (None, None));
        assert_eq!(StreamState::after(9, &removed).life, None, "a removal ends the life");
        let created = Marks { control: Some(Control::Create), ..Marks::default() };
        assert_eq!(created.position(3), Some(3));
    }
}
