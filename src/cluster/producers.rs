//! Idempotent producers in cluster mode (WRITE.md §3): each producer's state on a stream (its
//! epoch and highest sequence accepted) is a *record*, the last message of its own subject
//! `P.p.<stream token>.<producer key>`, stored in the same JetStream atomic batch as the
//! append it accepts.
//!
//! - Atomic: the batch holds the stream's messages (or its `close` control message) and the
//!   record; JetStream stores all of it or none, so no crash or lost NATS server leaves an
//!   appended message without the record that makes its retry a duplicate, nor the reverse.
//! - Serialized across nodes: the batch carries two guards, the stream subject's last sequence
//!   and the record subject's (`publish`); a writer that checked against an older state of
//!   either is refused and checks again.
//! - Read from the leader in order: the stream's last message first, then the record. Records
//!   are only ever written together with a message of their stream, right after it, so a
//!   record newer than that message (sequence above it) was written in between: the two do
//!   not describe one moment, and the writer reads again. Otherwise the record is the
//!   producer's state as of the stream's message.
//! - One life: a record names the life of the stream it was written in (`state::LIFE`); a
//!   record of a stream deleted under the same name is not this one's (a removal also purges
//!   its records, but that purge can be lost to a crash).
//! - Bounded memory: a node remembers the records it wrote or read (a hint, corrected by the
//!   guard) for up to [`MAX_KNOWN_PRODUCERS`] producers, dropping the idle ones first.
//!
//! A record is an empty message with `Ds-Producer: <epoch> <seq> <life>`, kept as long as its
//! stream (`Nats-TTL: never` for streams made by `PUT`) and rolled up (`Nats-Rollup: sub`):
//! JetStream keeps one message per producer and stream.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use base64::Engine as _;
use bytes::Bytes;
use sha2::Digest as _;

use super::publish::{Outgoing, Record};
use super::state::{self, Marks};
use super::{subject, Cluster};
use crate::storage::StorageError;
use crate::writes::ProducerState;

/// Producers whose record a node remembers; beyond it the idle ones are dropped.
pub(super) const MAX_KNOWN_PRODUCERS: usize = 100_000;
/// A remembered record unused this long is dropped first.
const IDLE: Duration = Duration::from_secs(60);

/// A producer's record as its subject's last message left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ProducerRecord {
    /// The record subject's last sequence (0: none): what the next record's guard expects.
    pub(super) last: u64,
    /// The state and the life of the stream it belongs to (`None`: no record, or unreadable).
    pub(super) state: Option<(ProducerState, u64)>,
}

impl ProducerRecord {
    pub(super) const NONE: ProducerRecord = ProducerRecord { last: 0, state: None };

    fn read(seq: u64, marks: &Marks) -> ProducerRecord {
        let state = marks.producer.as_deref().and_then(parse);
        if state.is_none() {
            log::warn!("unreadable producer record at {seq}: {:?}", marks.producer);
        }
        ProducerRecord { last: seq, state }
    }

    /// The producer's state in the stream's life `life` (`None`: a producer it has not seen).
    pub(super) fn in_life(&self, life: Option<u64>) -> Option<ProducerState> {
        self.state.filter(|(_, of)| Some(*of) == life).map(|(state, _)| state)
    }
}

/// `<epoch> <seq> <life>`.
fn parse(value: &str) -> Option<(ProducerState, u64)> {
    let mut parts = value.split(' ').map(|p| p.parse::<u64>().ok());
    let (epoch, last_seq, life) = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some((ProducerState { epoch, last_seq }, life))
}

/// The records this node knows, by (stream, producer id).
#[derive(Default)]
pub(super) struct KnownProducers {
    map: Mutex<HashMap<(String, String), (ProducerRecord, Instant)>>,
}

impl KnownProducers {
    fn get(&self, stream: &str, producer: &str) -> Option<ProducerRecord> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.get_mut(&(stream.to_string(), producer.to_string()))?;
        entry.1 = Instant::now();
        Some(entry.0)
    }

    fn put(&self, stream: &str, producer: &str, record: ProducerRecord) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let key = (stream.to_string(), producer.to_string());
        if map.len() >= MAX_KNOWN_PRODUCERS && !map.contains_key(&key) {
            map.retain(|_, (_, used)| used.elapsed() < IDLE);
            if map.len() >= MAX_KNOWN_PRODUCERS / 2 {
                map.clear();
            }
        }
        match map.get_mut(&key) {
            Some((known, used)) => {
                if record.last >= known.last {
                    *known = record;
                }
                *used = Instant::now();
            }
            None => {
                map.insert(key, (record, Instant::now()));
            }
        }
    }

    fn forget(&self, stream: &str, producer: &str) {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).remove(&(stream.to_string(), producer.to_string()));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// The subject token of a producer id: the id may be long and hold anything, so it is hashed
/// (SHA-256, the first 144 bits in base64url: a collision between two producers of one stream
/// is out of reach).
fn producer_key(producer: &str) -> String {
    let digest = sha2::Sha256::digest(producer.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..18])
}

impl Cluster {
    fn producer_subject(&self, stream: &str, producer: &str) -> String {
        format!("{}.p.{}.{}", self.inner.stream, subject::token(stream), producer_key(producer))
    }

    /// The subjects of every producer record of `stream`.
    fn producer_subjects(&self, stream: &str) -> String {
        format!("{}.p.{}.*", self.inner.stream, subject::token(stream))
    }

    /// A producer's record of `stream`: this node's memory unless `ask_leader`, else the stream
    /// leader's. Also whether it came from memory.
    pub(super) async fn producer_record(
        &self,
        stream: &str,
        producer: &str,
        ask_leader: bool,
    ) -> Result<(ProducerRecord, bool), StorageError> {
        if !ask_leader {
            if let Some(record) = self.inner.producers.get(stream, producer) {
                return Ok((record, true));
            }
        }
        let record = match self.leader_last(&self.producer_subject(stream, producer)).await? {
            Some((seq, marks)) => ProducerRecord::read(seq, &marks),
            None => ProducerRecord::NONE,
        };
        self.inner.producers.put(stream, producer, record);
        Ok((record, false))
    }

    /// The record of an accepted append, to publish right after the stream's messages.
    pub(super) fn record_message<'a>(
        &self,
        stream: &'a str,
        producer: &str,
        after: &ProducerRecord,
        state: ProducerState,
        life: u64,
        forever: bool,
    ) -> Outgoing<'a> {
        let mut headers = HeaderMap::new();
        headers.insert(state::PRODUCER, format!("{} {} {life}", state.epoch, state.last_seq).as_str());
        // Only the last record of a producer matters: JetStream drops the ones before it.
        headers.insert("Nats-Rollup", "sub");
        if forever {
            headers.insert("Nats-TTL", "never");
        }
        let record = Record { subject: self.producer_subject(stream, producer), expected: after.last };
        Outgoing { stream, payload: Bytes::new(), headers, record: Some(record) }
    }

    pub(super) fn remember_producer(&self, stream: &str, producer: &str, record: ProducerRecord) {
        self.inner.producers.put(stream, producer, record);
    }

    pub(super) fn forget_producer(&self, stream: &str, producer: &str) {
        self.inner.producers.forget(stream, producer);
    }

    /// After a removal stored at `seq`: deletes the records of the stream written before it
    /// (records of a new life of the stream, written after, stay). Losing this purge loses
    /// nothing but disk space: old records name a life that is over.
    pub(super) async fn purge_producers(&self, stream: &str, seq: u64) -> Result<(), StorageError> {
        self.purge_filter_through(&self.producer_subjects(stream), seq).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_parse_and_belong_to_one_life() {
        let state = ProducerState { epoch: 2, last_seq: 7 };
        assert_eq!(parse("2 7 99"), Some((state, 99)));
        for bad in ["", "2 7", "2 7 99 1", "a 7 99", "2  7 99"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        let record = ProducerRecord { last: 5, state: Some((state, 99)) };
        assert_eq!(record.in_life(Some(99)), Some(state));
        assert_eq!(record.in_life(Some(98)), None, "a record of a deleted stream of the same name");
        assert_eq!(record.in_life(None), None);
    }

    #[test]
    fn producer_keys_are_short_safe_tokens() {
        for id in ["", "p", "a.b *>", &"x".repeat(10_000)] {
            let key = producer_key(id);
            assert_eq!(key.len(), 24);
            assert!(key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{key}");
        }
        assert_ne!(producer_key("p"), producer_key("q"));
    }

    #[test]
    fn remembered_records_only_move_forward_and_stay_bounded() {
        let known = KnownProducers::default();
        let record = |last| ProducerRecord { last, state: None };
        known.put("s", "p", record(5));
        known.put("s", "p", record(3));
        assert_eq!(known.get("s", "p"), Some(record(5)), "an older answer never replaces a newer one");
        known.forget("s", "p");
        assert_eq!(known.get("s", "p"), None);
        for i in 0..MAX_KNOWN_PRODUCERS + 10 {
            known.put("s", &i.to_string(), record(1));
        }
        assert!(known.len() <= MAX_KNOWN_PRODUCERS, "{}", known.len());
    }
}
