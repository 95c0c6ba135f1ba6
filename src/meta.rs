//! What a stream is, besides its messages: content type, how it was made, closure, expiry and
//! the last `Stream-Seq` (the Durable Streams write API, PRODUCT.md §13). Shared by both
//! engines; each stores it its own way and changes it only together with the append it
//! belongs to.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The content type of streams made by broadcasts.
pub const JSON: &str = "application/json";
/// The content type of a `PUT` without one.
pub const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

/// A stream's metadata. Broadcast streams that never met the write API have the default:
/// JSON, open, no expiry, made by a broadcast.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamMeta {
    /// As the creator gave it (echoed verbatim); compared in [`normalize`]d form.
    #[serde(rename = "ct")]
    pub content_type: String,
    /// Made by `PUT` (keeps every message until deleted or expired) rather than by a
    /// broadcast (under AnyCable's retention).
    #[serde(rename = "put", default)]
    pub created: bool,
    #[serde(default)]
    pub closed: bool,
    /// `Stream-TTL`, seconds: the stream expires that long after its last read or write.
    #[serde(rename = "ttl", default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// `Stream-Expires-At` as given (echoed verbatim) and as ms since the Unix epoch.
    #[serde(rename = "exp", default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<(String, i64)>,
    /// The last `Stream-Seq` accepted (byte-wise order).
    #[serde(rename = "seq", default, skip_serializing_if = "Option::is_none")]
    pub stream_seq: Option<String>,
    /// When this life of the stream began (ms), for a TTL's first window.
    #[serde(rename = "at", default)]
    pub created_ms: u64,
    /// The producer request that closed the stream, if one did: its retry is a duplicate.
    #[serde(rename = "by", default, skip_serializing_if = "Option::is_none")]
    pub closed_by: Option<crate::writes::Producer>,
    /// A fork: the stream it was forked from and where (WRITE.md §5).
    #[serde(rename = "fork", default, skip_serializing_if = "Option::is_none")]
    pub fork: Option<Box<ForkOf>>,
    /// How many forks name this stream as their source (they read its messages up to their
    /// fork point, so it is only soft-deleted while any is left).
    #[serde(rename = "forks", default, skip_serializing_if = "is_zero")]
    pub forks: u64,
    /// Deleted (or expired) while forks still read it: `410` to its clients, kept for the
    /// forks, removed with the last of them.
    #[serde(rename = "del", default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Where a fork comes from. Its own messages follow `at`; positions up to `at` are its
/// source's (read through it, never copied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkOf {
    /// The source stream's name.
    #[serde(rename = "src")]
    pub source: String,
    /// The fork point: the last position inherited.
    pub at: u64,
    /// `Stream-Fork-Offset` as resolved (before any sub-offset), for an idempotent re-`PUT`.
    #[serde(rename = "anchor")]
    pub anchor: u64,
    /// `Stream-Fork-Sub-Offset` as given (0 when absent), for an idempotent re-`PUT`.
    #[serde(rename = "sub", default)]
    pub sub: u64,
}

impl Default for StreamMeta {
    fn default() -> StreamMeta {
        StreamMeta {
            content_type: JSON.to_string(),
            created: false,
            closed: false,
            ttl_secs: None,
            expires_at: None,
            stream_seq: None,
            created_ms: 0,
            closed_by: None,
            fork: None,
            forks: 0,
            deleted: false,
        }
    }
}

/// Shared, immutable once published: a change publishes a new one.
pub type SharedMeta = Arc<StreamMeta>;

/// The metadata of a stream made by broadcasts (one shared copy).
pub fn broadcast_stream() -> SharedMeta {
    static DEFAULT: std::sync::OnceLock<SharedMeta> = std::sync::OnceLock::new();
    DEFAULT.get_or_init(|| Arc::new(StreamMeta::default())).clone()
}

impl StreamMeta {
    pub fn framing(&self) -> Framing {
        Framing::of(&self.content_type)
    }

    /// Whether the stream has expired at `now_ms`, given its last read or write.
    pub fn expired(&self, now_ms: u64, last_access_ms: u64) -> bool {
        self.deadline_ms(last_access_ms).is_some_and(|deadline| now_ms >= deadline)
    }

    /// When the stream expires (ms), given its last read or write; `None`: never.
    pub fn deadline_ms(&self, last_access_ms: u64) -> Option<u64> {
        let absolute = self.expires_at.as_ref().map(|(_, at)| u64::try_from(*at).unwrap_or(0));
        let sliding =
            self.ttl_secs.map(|ttl| last_access_ms.max(self.created_ms).saturating_add(ttl.saturating_mul(1000)));
        match (absolute, sliding) {
            (Some(absolute), Some(sliding)) => Some(absolute.min(sliding)),
            (absolute, sliding) => absolute.or(sliding),
        }
    }

    /// Whether it expires at all.
    pub fn expires(&self) -> bool {
        self.ttl_secs.is_some() || self.expires_at.is_some()
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("metadata serializes")
    }

    pub fn decode(bytes: &[u8]) -> Option<StreamMeta> {
        serde_json::from_slice(bytes).ok()
    }
}

/// How a stream's messages make a response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `application/json`: a JSON array of the messages.
    Json,
    /// Anything else: the messages' bytes, concatenated.
    Raw,
}

impl Framing {
    pub fn of(content_type: &str) -> Framing {
        // (No allocation: this runs for every append.)
        let essence = content_type.split(';').next().unwrap_or("").trim();
        if essence.eq_ignore_ascii_case(JSON) {
            Framing::Json
        } else {
            Framing::Raw
        }
    }
}

/// A content type for comparison: before any `;`, trimmed, lower case.
pub fn normalize(content_type: &str) -> String {
    content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

/// Whether SSE carries the stream's bytes as text (`text/*` and JSON) or base64.
pub fn sse_is_text(content_type: &str) -> bool {
    let normalized = normalize(content_type);
    normalized == JSON || normalized.starts_with("text/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_compare_normalized() {
        assert_eq!(normalize(" Application/JSON ; charset=utf-8"), "application/json");
        assert_eq!(Framing::of("APPLICATION/JSON"), Framing::Json);
        assert_eq!(Framing::of("application/ld+json"), Framing::Raw);
        assert_eq!(Framing::of(""), Framing::Raw);
        assert!(sse_is_text("text/plain; charset=utf-8") && sse_is_text("application/json"));
        assert!(!sse_is_text("application/octet-stream") && !sse_is_text("image/png"));
    }

    #[test]
    fn ttl_slides_from_the_last_access_and_expires_at_is_absolute() {
        let meta = StreamMeta { ttl_secs: Some(2), created_ms: 1_000, ..StreamMeta::default() };
        assert!(!meta.expired(2_999, 0));
        assert!(meta.expired(3_000, 0));
        assert!(!meta.expired(4_000, 2_500), "renewed at 2.5 s");
        let meta = StreamMeta { expires_at: Some(("x".into(), 5_000)), ..StreamMeta::default() };
        assert!(!meta.expired(4_999, 0) && meta.expired(5_000, 4_999));
        assert_eq!(meta.deadline_ms(9_999), Some(5_000));
        let past = StreamMeta { expires_at: Some(("1960-01-01T00:00:00Z".into(), -1)), ..StreamMeta::default() };
        assert!(past.expired(0, 0));
        assert_eq!(StreamMeta::default().deadline_ms(1), None);
    }

    #[test]
    fn metadata_round_trips_and_garbage_is_refused() {
        let meta = StreamMeta {
            content_type: "text/plain".into(),
            created: true,
            closed: true,
            ttl_secs: Some(60),
            expires_at: None,
            stream_seq: Some("a\u{1}\"".into()),
            created_ms: 7,
            closed_by: Some(crate::writes::Producer { id: "p".into(), epoch: 1, seq: 2 }),
            fork: Some(Box::new(ForkOf { source: "a/b".into(), at: 9, anchor: 7, sub: 2 })),
            forks: 3,
            deleted: true,
        };
        assert_eq!(StreamMeta::decode(&meta.encode()), Some(meta));
        assert_eq!(StreamMeta::decode(b"\xff"), None);
    }
}
