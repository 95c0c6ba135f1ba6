//! Key and value encodings of storage layout 1 (see `migrations/README.md`).
//!
//! Everything lives in sled's default tree, split by a one-byte prefix, so one `sled::Batch`
//! (atomic within one tree) can create streams, append messages and move tails together.
//! Integers are big-endian so byte order is numeric order.

pub const NAME: u8 = b'N';
pub const STREAM: u8 = b'S';
pub const LOG: u8 = b'L';

pub const META_LAYOUT: &[u8] = b"Mlayout";
pub const META_EPOCH: &[u8] = b"Mepoch";
pub const META_NEXT_STREAM_ID: &[u8] = b"Mnext_stream_id";

/// `N ‖ name` → stream id.
pub fn name_key(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + name.len());
    key.push(NAME);
    key.extend_from_slice(name.as_bytes());
    key
}

/// `S ‖ id` → [`StreamRecord`].
pub fn stream_key(id: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = STREAM;
    key[1..].copy_from_slice(&id.to_be_bytes());
    key
}

/// `L ‖ id ‖ seq` → timestamp (ms, u64) ‖ message JSON.
pub fn log_key(id: u64, seq: u64) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[0] = LOG;
    key[1..9].copy_from_slice(&id.to_be_bytes());
    key[9..].copy_from_slice(&seq.to_be_bytes());
    key
}

pub fn log_key_seq(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(9..17)?.try_into().ok()?))
}

pub fn stream_key_id(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(1..9)?.try_into().ok()?))
}

pub fn encode_u64(value: u64) -> [u8; 8] {
    value.to_be_bytes()
}

pub fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// Per-stream record. Kept even when every message has expired, so sequence numbers never
/// repeat. `content_type` and `closed` are there for the DS write API (PUT/close) to come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRecord {
    pub last_seq: u64,
    pub closed: bool,
    pub content_type: String,
}

impl StreamRecord {
    pub fn new() -> StreamRecord {
        StreamRecord { last_seq: 0, closed: false, content_type: "application/json".into() }
    }

    /// `last_seq (8) ‖ flags (1) ‖ content type (rest, UTF-8)`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + self.content_type.len());
        out.extend_from_slice(&self.last_seq.to_be_bytes());
        out.push(u8::from(self.closed));
        out.extend_from_slice(self.content_type.as_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<StreamRecord> {
        let last_seq = decode_u64(bytes.get(..8)?)?;
        let closed = *bytes.get(8)? & 1 == 1;
        let content_type = std::str::from_utf8(bytes.get(9..)?).ok()?.to_string();
        Some(StreamRecord { last_seq, closed, content_type })
    }
}

/// Splits a log value into its timestamp and message bytes.
pub fn decode_log_value(value: &[u8]) -> Option<(u64, &[u8])> {
    Some((decode_u64(value.get(..8)?)?, value.get(8..)?))
}

pub fn encode_log_value(timestamp_ms: u64, message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + message.len());
    out.extend_from_slice(&timestamp_ms.to_be_bytes());
    out.extend_from_slice(message);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keys_sort_by_stream_then_seq() {
        let keys = [log_key(1, 1), log_key(1, 2), log_key(1, 256), log_key(2, 0), log_key(256, 1)];
        let mut sorted = keys;
        sorted.sort();
        assert_eq!(keys, sorted);
        assert_eq!(log_key_seq(&log_key(9, 300)), Some(300));
    }

    #[test]
    fn stream_record_round_trips() {
        let record = StreamRecord { last_seq: 42, closed: true, content_type: "application/json".into() };
        assert_eq!(StreamRecord::decode(&record.encode()), Some(record));
        assert_eq!(StreamRecord::decode(b"short"), None);
    }
}
