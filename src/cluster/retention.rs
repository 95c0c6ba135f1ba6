//! AnyCable's retention in cluster mode, which streams made by `PUT` escape.
//!
//! - **Age** (`history_ttl`) is the stream's `max_age`; messages of streams made by `PUT`
//!   carry `Nats-TTL: never` (per-message TTL, nats-server 2.11+), which JetStream keeps
//!   whatever `max_age` says.
//! - **Count** (`history_limit`) cannot be JetStream's `max_msgs_per_subject` any more: that
//!   limit applies to every subject alike, `PUT` streams' included. It is kept in the stream's
//!   metadata (`anycable_ds_history_limit`) and applied by the nodes: reads of broadcast
//!   streams skip every message with `history_limit` or more messages of its stream after it
//!   (`Nats-Num-Pending`, which Direct Get gives each message), exactly as JetStream's limit
//!   would have deleted it; and a node that stored `history_limit` messages of a broadcast
//!   stream after one it stored before purges everything up to that one (a purge by
//!   sequence, which can only reach the stream's messages before that one, never a stream
//!   made later under the name). Disk use is so bounded by `history_limit` per node writing
//!   the stream, plus the window itself.
//!
//! The stream-wide first sequence no longer tells where age-based retention stands (a `PUT`
//! stream's first message can hold it back for ever), so the gap rules (see the `cluster` docs)
//! use the first message stored less than `max_age` ago instead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::stream;

use super::{Cluster, READ_TIMEOUT};
use crate::storage::{now_ms, StorageError};

/// Stream metadata key holding `broker.history_limit` (0: unlimited).
pub(super) const HISTORY_LIMIT_KEY: &str = "anycable_ds_history_limit";
/// How much earlier than `max_age` ago a message counts as expired when asking where age
/// retention stands (clock differences between this node and the stream leader).
const CLOCK_MARGIN: Duration = Duration::from_secs(1);

/// `broker.history_limit` of a stream config: its metadata, or, on a stream made before
/// anycable-ds kept it there, its `max_msgs_per_subject`.
pub(super) fn history_limit(config: &stream::Config) -> u64 {
    match config.metadata.get(HISTORY_LIMIT_KEY).and_then(|v| v.parse().ok()) {
        Some(limit) => limit,
        None => u64::try_from(config.max_messages_per_subject).unwrap_or(0),
    }
}

/// The stream's retention as this node last learned it (at start and every second: another
/// node may apply other settings, `--nats_update_stream`).
#[derive(Debug, Default)]
pub(super) struct Limits {
    keep: AtomicU64,
    max_age_ms: AtomicU64,
}

impl Limits {
    pub(super) fn learn(&self, config: &stream::Config) {
        self.keep.store(history_limit(config), Ordering::Release);
        self.max_age_ms.store(config.max_age.as_millis() as u64, Ordering::Release);
    }
}

impl Cluster {
    /// `history_limit` (0: unlimited).
    pub(super) fn keep(&self) -> u64 {
        self.inner.retention.keep.load(Ordering::Acquire)
    }

    /// Whether a message of a broadcast stream with `pending` messages of its stream after it
    /// is inside the count window.
    pub(super) fn in_window(&self, pending: u64) -> bool {
        let keep = self.keep();
        keep == 0 || pending < keep
    }

    /// Counts `n` messages of a broadcast stream this node stored, the first at `first` and
    /// the last at `last`; purges the stream's messages that left the count window for good
    /// once it stored `history_limit` after one it remembers (see the module docs).
    pub(super) fn counted(&self, stream: &str, first: u64, last: u64, n: u64) {
        let keep = self.keep();
        if keep == 0 {
            return;
        }
        let purge_through = {
            let mut known = self.inner.known.lock().unwrap_or_else(|p| p.into_inner());
            let Some(entry) = known.get_mut(stream) else { return };
            if entry.mark == 0 {
                (entry.mark, entry.since) = (first, n - 1);
            } else {
                entry.since += n;
            }
            if entry.since < keep {
                return;
            }
            // `keep` or more messages of the stream follow `mark`: it and everything before
            // it are outside the window.
            let through = entry.mark;
            (entry.mark, entry.since) = (last, 0);
            through
        };
        let this = self.clone();
        let stream = stream.to_string();
        tokio::spawn(async move {
            // The limit may have been raised since this node last looked: ask the stream.
            let limit = match tokio::time::timeout(READ_TIMEOUT, this.inner.js.get_stream(&this.inner.stream)).await {
                Ok(Ok(info)) => history_limit(&info.cached_info().config),
                _ => return,
            };
            if limit == keep {
                if let Err(e) = this.purge_through(&stream, purge_through).await {
                    log::debug!("count retention of stream {stream:?} not applied now: {e}");
                }
            }
        });
    }

    /// Deletes the messages of `stream` stored at or before `seq` (a purge by sequence:
    /// anything stored after it stays).
    pub(super) async fn purge_through(&self, stream: &str, seq: u64) -> Result<(), StorageError> {
        self.purge_filter_through(&self.subject(stream), seq).await
    }

    /// Deletes the messages of the subjects matching `filter` stored at or before `seq`.
    pub(super) async fn purge_filter_through(&self, filter: &str, seq: u64) -> Result<(), StorageError> {
        let request = serde_json::json!({ "filter": filter, "seq": seq + 1 }).to_string();
        let answer = self.stream_api("PURGE", request).await?;
        match answer.get("success").and_then(|v| v.as_bool()) {
            Some(true) => Ok(()),
            _ => Err(StorageError::Unavailable(format!("purge refused: {answer}"))),
        }
    }

    /// Where age-based retention stands: the first sequence stored less than `max_age` ago
    /// (every message of a broadcast stream before it has expired, or is about to), and the
    /// stream-wide last sequence; from the stream leader.
    pub(super) async fn horizon(&self) -> Result<(u64, u64), StorageError> {
        let state = self.state().await?;
        let max_age = Duration::from_millis(self.inner.retention.max_age_ms.load(Ordering::Acquire));
        if max_age.is_zero() {
            return Ok((state.first_sequence, state.last_sequence));
        }
        let since = now_ms().saturating_sub(max_age.saturating_sub(CLOCK_MARGIN.min(max_age / 4)).as_millis() as u64);
        let since = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(since) * 1_000_000)
            .ok()
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
            .ok_or_else(|| StorageError::Unavailable("clock out of range".into()))?;
        let request = serde_json::json!({ "start_time": since }).to_string();
        match self.leader_get(request).await? {
            Some((seq, _)) => Ok((seq.max(state.first_sequence), state.last_sequence)),
            // Nothing stored since: everything stored has expired.
            None => Ok((state.last_sequence + 1, state.last_sequence)),
        }
    }

    /// What a message written into a subject with nothing stored names as its predecessor:
    /// asked *after* the subject was seen empty, so that any message of it retention deleted
    /// lies at or before it (see the `cluster` docs).
    pub(super) async fn chain_start(&self) -> Result<u64, StorageError> {
        Ok(self.horizon().await?.0.saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_history_limit_is_in_the_metadata_or_was_the_per_subject_limit() {
        let mut config = stream::Config { max_messages_per_subject: 100, ..Default::default() };
        assert_eq!(history_limit(&config), 100, "a stream made before");
        config.max_messages_per_subject = -1;
        assert_eq!(history_limit(&config), 0);
        config.metadata.insert(HISTORY_LIMIT_KEY.into(), "7".into());
        assert_eq!(history_limit(&config), 7);
    }
}
