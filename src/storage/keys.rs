//! Key and value encodings of storage layout 2 (see `migrations/README.md`).
//!
//! Everything lives in sled's default tree, split by a one-byte prefix, so one `sled::Batch`
//! (atomic within one tree) can create streams, append messages and move tails together.
//! Integers are big-endian so byte order is numeric order.

pub const NAME: u8 = b'N';
pub const STREAM: u8 = b'S';
pub const RECORD: u8 = b'R';
/// `D ‖ id` → the stream's [`crate::meta::StreamMeta`] (layout 4): only for streams the write
/// API made or changed; a stream without one is a broadcast stream with the defaults.
pub const META: u8 = b'D';

pub const META_LAYOUT: &[u8] = b"Mlayout";
pub const META_EPOCH: &[u8] = b"Mepoch";
pub const META_NEXT_STREAM_ID: &[u8] = b"Mnext_stream_id";
/// The store-wide sequence floor (u64): at least the tail of every stream ever removed. A
/// stream created later starts above it, so no token is ever reused (layout 3).
pub const META_SEQ_FLOOR: &[u8] = b"Mseq_floor";

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

/// `D ‖ id` → stream metadata (see [`META`]).
pub fn meta_key(id: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = META;
    key[1..].copy_from_slice(&id.to_be_bytes());
    key
}

/// `P ‖ id ‖ producer id` → a producer's state on the stream (epoch, highest seq accepted),
/// written in the batch of the append it belongs to (layout 4).
pub const PRODUCER: u8 = b'P';

pub fn producer_prefix(id: u64) -> [u8; 9] {
    let mut key = [0u8; 9];
    key[0] = PRODUCER;
    key[1..].copy_from_slice(&id.to_be_bytes());
    key
}

pub fn producer_key(id: u64, producer: &str) -> Vec<u8> {
    let mut key = producer_prefix(id).to_vec();
    key.extend_from_slice(producer.as_bytes());
    key
}

/// `R ‖ id ‖ first seq` → a [`LogRecord`]: one or more consecutive messages of the stream.
pub fn record_key(id: u64, first_seq: u64) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[0] = RECORD;
    key[1..9].copy_from_slice(&id.to_be_bytes());
    key[9..].copy_from_slice(&first_seq.to_be_bytes());
    key
}

pub fn record_key_seq(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(9..17)?.try_into().ok()?))
}

pub fn encode_u64(value: u64) -> [u8; 8] {
    value.to_be_bytes()
}

pub fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// Per-stream record, written when the stream is created. Appends do not touch it (so a
/// one-record append is a single sled insert): the stream's tail is the newest log record's
/// last seq. Retention raises `last_seq` before it deletes records, so the tail survives the
/// deletion of every message and sequence numbers never repeat. `content_type` and `closed`
/// are there for the DS write API (PUT/close) to come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRecord {
    /// At most the stream's tail; equal to it once retention deleted every record.
    pub last_seq: u64,
    /// The store's sequence floor when this life of the stream began: its first message is
    /// `base + 1`, and positions up to `base` are "before this life" (layout 3; 0 before).
    pub base: u64,
    pub closed: bool,
    pub content_type: String,
    /// The tail of the stream's previous life, when this one continues it (a broadcast
    /// revived a stream retention had removed): a token at it reads this life from its start
    /// (layout 4; see `tombstones.rs`).
    pub prev_tail: Option<u64>,
}

/// Flag bits of [`StreamRecord`].
const FLAG_CLOSED: u8 = 1;
const FLAG_HAS_BASE: u8 = 2;
const FLAG_HAS_PREV: u8 = 4;

impl StreamRecord {
    pub fn new() -> StreamRecord {
        StreamRecord::with_base(0)
    }

    /// A new stream's record whose sequence numbers start after `base`.
    pub fn with_base(base: u64) -> StreamRecord {
        StreamRecord { last_seq: base, base, closed: false, content_type: "application/json".into(), prev_tail: None }
    }

    /// `last_seq (8) ‖ flags (1) ‖ [base (8), if flag bit 1] ‖ [previous tail (8), if flag bit
    /// 2] ‖ content type (rest, UTF-8)`. A record without a base is byte for byte the layout-2
    /// encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(17 + self.content_type.len());
        out.extend_from_slice(&self.last_seq.to_be_bytes());
        let mut flags = 0;
        if self.closed {
            flags |= FLAG_CLOSED;
        }
        if self.base > 0 {
            flags |= FLAG_HAS_BASE;
        }
        if self.prev_tail.is_some() {
            flags |= FLAG_HAS_PREV;
        }
        out.push(flags);
        if self.base > 0 {
            out.extend_from_slice(&self.base.to_be_bytes());
        }
        if let Some(prev) = self.prev_tail {
            out.extend_from_slice(&prev.to_be_bytes());
        }
        out.extend_from_slice(self.content_type.as_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<StreamRecord> {
        let last_seq = decode_u64(bytes.get(..8)?)?;
        let flags = *bytes.get(8)?;
        let (base, rest) = if flags & FLAG_HAS_BASE != 0 { (decode_u64(bytes.get(9..17)?)?, 17) } else { (0, 9) };
        let (prev_tail, rest) = if flags & FLAG_HAS_PREV != 0 {
            (Some(decode_u64(bytes.get(rest..rest + 8)?)?), rest + 8)
        } else {
            (None, rest)
        };
        let content_type = std::str::from_utf8(bytes.get(rest..)?).ok()?.to_string();
        Some(StreamRecord { last_seq, base, closed: flags & FLAG_CLOSED != 0, content_type, prev_tail })
    }
}

/// Size of the fixed part of a record value: timestamp (u64) and message count (u32).
const RECORD_HEADER: usize = 12;

/// A stored run of consecutive messages of one stream, written by one group commit.
///
/// Value layout: `timestamp ms (u64) ‖ count (u32) ‖ end offset of each message in the body
/// (u32 × count) ‖ body`, where the body is the messages' JSON joined by `,`. Storing a run as
/// one value costs sled one key per group instead of one per message (its per-key copy-on-write
/// dominated batched ingest), and any slice of consecutive messages is one contiguous piece of
/// the body, ready to be copied into a JSON array as is.
#[derive(Debug, Clone, Copy)]
pub struct LogRecord<'a> {
    pub first_seq: u64,
    pub timestamp_ms: u64,
    count: usize,
    ends: &'a [u8],
    body: &'a [u8],
}

impl<'a> LogRecord<'a> {
    /// Reads a record stored under `key`; `None` if key or value are malformed.
    pub fn parse(key: &[u8], value: &'a [u8]) -> Option<LogRecord<'a>> {
        let first_seq = record_key_seq(key)?;
        let timestamp_ms = decode_u64(value.get(..8)?)?;
        let count = u32::from_be_bytes(value.get(8..RECORD_HEADER)?.try_into().ok()?) as usize;
        let body_start = RECORD_HEADER.checked_add(count.checked_mul(4)?)?;
        let ends = value.get(RECORD_HEADER..body_start)?;
        let body = value.get(body_start..)?;
        let record = LogRecord { first_seq, timestamp_ms, count, ends, body };
        // Sequence numbers start at 1 and never wrap; the last end closes the body.
        let seqs_valid = first_seq > 0 && first_seq.checked_add(count as u64).is_some();
        (count > 0 && seqs_valid && record.end(count - 1) == body.len()).then_some(record)
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn last_seq(&self) -> u64 {
        self.first_seq + self.count as u64 - 1
    }

    /// End (exclusive) of message `i` in the body.
    fn end(&self, i: usize) -> usize {
        let bytes = &self.ends[i * 4..i * 4 + 4];
        u32::from_be_bytes(bytes.try_into().expect("4 bytes")) as usize
    }

    /// Start of message `i` in the body (just after the comma that ends message `i - 1`).
    fn start(&self, i: usize) -> usize {
        if i == 0 {
            0
        } else {
            self.end(i - 1) + 1
        }
    }

    /// Bytes of the whole body (messages and the commas between them).
    pub fn body_len(&self) -> usize {
        self.body.len()
    }

    /// Length of message `i` in bytes.
    pub fn message_len(&self, i: usize) -> usize {
        self.end(i).saturating_sub(self.start(i))
    }

    /// Message `i` alone; `None` if the stored offsets are inconsistent.
    pub fn message(&self, i: usize) -> Option<&'a [u8]> {
        if i >= self.count {
            return None;
        }
        self.body.get(self.start(i)..self.end(i))
    }

    /// Messages `from..to` (indexes into this record) joined by commas; `None` if the stored
    /// offsets are inconsistent.
    pub fn messages(&self, from: usize, to: usize) -> Option<&'a [u8]> {
        if from >= to || to > self.count {
            return Some(&[]);
        }
        self.body.get(self.start(from)..self.end(to - 1))
    }
}

/// Bytes a record of `count` messages totalling `message_bytes` takes; see [`LogRecord`].
pub fn record_len(count: usize, message_bytes: usize) -> usize {
    RECORD_HEADER + 4 * count + message_bytes + count.saturating_sub(1)
}

/// Encodes one record value (see [`LogRecord`]) in a single exact-size allocation.
pub fn encode_record<M: AsRef<[u8]>>(timestamp_ms: u64, messages: &[M]) -> Vec<u8> {
    let message_bytes = messages.iter().map(|m| m.as_ref().len()).sum();
    let mut out = Vec::with_capacity(record_len(messages.len(), message_bytes));
    out.extend_from_slice(&timestamp_ms.to_be_bytes());
    out.extend_from_slice(&(messages.len() as u32).to_be_bytes());
    let mut end = 0;
    for (i, message) in messages.iter().enumerate() {
        end += message.as_ref().len() + usize::from(i > 0);
        out.extend_from_slice(&(end as u32).to_be_bytes());
    }
    for (i, message) in messages.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(message.as_ref());
    }
    debug_assert_eq!(out.len(), out.capacity());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_keys_sort_by_stream_then_seq() {
        let keys = [record_key(1, 1), record_key(1, 2), record_key(1, 256), record_key(2, 0), record_key(256, 1)];
        let mut sorted = keys;
        sorted.sort();
        assert_eq!(keys, sorted);
        assert_eq!(record_key_seq(&record_key(9, 300)), Some(300));
    }

    #[test]
    fn records_round_trip_and_slice_at_message_boundaries() {
        let value = encode_record(77, &[&b"{\"a\":1}"[..], b"\"x,y\"", b"[]"]);
        assert_eq!(value.len(), record_len(3, 7 + 5 + 2));
        let key = record_key(3, 10);
        let record = LogRecord::parse(&key, &value).unwrap();
        assert_eq!((record.first_seq, record.last_seq(), record.timestamp_ms, record.count()), (10, 12, 77, 3));
        assert_eq!(record.messages(0, 3), Some(&b"{\"a\":1},\"x,y\",[]"[..]));
        assert_eq!(record.messages(1, 2), Some(&b"\"x,y\""[..]));
        assert_eq!(record.messages(2, 3), Some(&b"[]"[..]));
        assert_eq!(record.messages(2, 2), Some(&b""[..]));
        assert_eq!(record.message_len(1), 5);
    }

    #[test]
    fn malformed_records_are_refused_not_panicked_on() {
        let key = record_key(1, 1);
        let value = encode_record(1, &[b"123"]);
        for cut in 0..value.len() {
            assert!(LogRecord::parse(&key, &value[..cut]).is_none(), "cut at {cut}");
        }
        let mut huge_count = value.clone();
        huge_count[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(LogRecord::parse(&key, &huge_count).is_none());
        assert!(LogRecord::parse(&key[..5], &value).is_none());
        assert!(LogRecord::parse(&record_key(1, 0), &value).is_none(), "sequence numbers start at 1");
        assert!(LogRecord::parse(&record_key(1, u64::MAX), &value).is_none(), "no wrap");
    }

    #[test]
    fn stream_record_round_trips() {
        let record = StreamRecord {
            last_seq: 42,
            base: 0,
            closed: true,
            content_type: "application/json".into(),
            prev_tail: None,
        };
        assert_eq!(StreamRecord::decode(&record.encode()), Some(record.clone()));
        // Without a base, the layout-2 encoding: last seq, flags, content type.
        assert_eq!(record.encode()[8..], b"\x01application/json"[..]);
        let based = StreamRecord { last_seq: 50, base: 7, ..record };
        assert_eq!(StreamRecord::decode(&based.encode()), Some(based.clone()));
        assert_eq!(StreamRecord::decode(&based.encode()[..12]), None);
        let revived = StreamRecord { prev_tail: Some(40), ..based.clone() };
        assert_eq!(StreamRecord::decode(&revived.encode()), Some(revived.clone()));
        assert_eq!(StreamRecord::decode(&revived.encode()[..20]), None);
        assert_eq!(StreamRecord::decode(b"short"), None);
    }
}
