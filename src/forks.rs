//! Forks (WRITE.md §5): a stream that shares its source's offset space up to a fork point and
//! has its own messages after it. Nothing is copied: a read before the fork point is answered
//! from the source (and its source, for a chain), capped at each level's fork point, and
//! stitched with the fork's own messages into one response. Shared by both engines: an engine
//! only answers one level at a time ([`Level`]).
//!
//! The fork's request headers are parsed here too: pure functions over client input.

use bytes::{Bytes, BytesMut};

use crate::engine::Engine;
use crate::meta::{Framing, SharedMeta};
use crate::offset::{Offset, Position};
use crate::storage::{Chunk, ReadError};

/// The reference implementation's token for "the start of the source", which the official
/// suite sends (WRITE.md §0.1): accepted as position 0.
pub const ZERO_TOKEN: &str = "0000000000000000_0000000000000000";

/// Levels of a fork chain a read goes through at most; a chain deeper than this is refused
/// when it is made, so a read never loops.
pub const MAX_DEPTH: usize = 64;

/// One level of a read.
#[derive(Debug)]
pub enum Level {
    /// The messages the stream itself holds after the offset.
    Chunk(Chunk),
    /// A fork read before its fork point `at`: the messages are `source`'s, up to `at`.
    /// `meta` is the fork's own.
    Inherit { source: String, at: u64, meta: SharedMeta },
}

/// Reads `stream` after `offset` through every level of its fork chain: the messages of its
/// sources up to each fork point, then its own, in one chunk of at most `max_bytes` (but at
/// least one message). A stream that is no fork is one engine read.
pub async fn read(engine: &Engine, stream: &str, offset: Offset, max_bytes: usize) -> Result<Chunk, ReadError> {
    let (source, at, meta) = match engine.read_level(stream, offset, max_bytes, None).await? {
        Level::Chunk(chunk) => return Ok(chunk),
        Level::Inherit { source, at, meta } => (source, at, meta),
    };
    // Walk down the chain to the level that holds the first message after `offset`,
    // remembering each level above it (its name and fork point) to come back up through.
    let mut above: Vec<(String, u64)> = vec![(stream.to_string(), at)];
    let (mut name, mut cap) = (source, at);
    let mut chunk = loop {
        match engine.read_level(&name, offset, max_bytes, Some(cap)).await? {
            Level::Chunk(chunk) => break chunk,
            Level::Inherit { source, at, .. } => {
                if above.len() >= MAX_DEPTH {
                    return Err(crate::storage::corrupt("fork chain (too deep)").into());
                }
                let at = at.min(cap);
                above.push((name, at));
                (name, cap) = (source, at);
            }
        }
    };
    // Then each level above, from its fork point, while the chunk reached the level's cap and
    // has room left. The top level (the stream itself) is read uncapped.
    let framing = meta.framing();
    while let Some((name, from)) = above.pop() {
        if chunk.next.seq < from || chunk.body.len() >= max_bytes {
            chunk.up_to_date = false;
            break;
        }
        let cap = above.last().map(|&(_, at)| at);
        let top = above.is_empty();
        if cap.is_some_and(|cap| from >= cap) {
            // A fork made inside what this level inherits: none of this level's own messages
            // are below the fork point above it (and reading from `from` would inherit again).
            continue;
        }
        let offset = Offset::At(Position { epoch: engine.epoch(), seq: from });
        let room = max_bytes - chunk.body.len();
        let next = match engine.read_level(&name, offset, room, if top { None } else { cap }).await? {
            Level::Chunk(next) => next,
            Level::Inherit { .. } => {
                return Err(crate::storage::corrupt("fork chain (a level inherits its own range)").into())
            }
        };
        chunk = join(chunk, next, framing);
    }
    chunk.meta = Some(meta);
    Ok(chunk)
}

/// Two consecutive chunks as one (the second follows the first's `next`).
fn join(first: Chunk, second: Chunk, framing: Framing) -> Chunk {
    let body = match (first.count, second.count) {
        (_, 0) => first.body,
        (0, _) => second.body,
        _ => match framing {
            Framing::Raw => {
                let mut body = BytesMut::with_capacity(first.body.len() + second.body.len());
                body.extend_from_slice(&first.body);
                body.extend_from_slice(&second.body);
                body.freeze()
            }
            // `[a,b]` and `[c]` make `[a,b,c]`: one JSON array across the fork point.
            Framing::Json => {
                let mut body = BytesMut::with_capacity(first.body.len() + second.body.len());
                body.extend_from_slice(&first.body[..first.body.len() - 1]);
                body.extend_from_slice(b",");
                body.extend_from_slice(&second.body[1..]);
                body.freeze()
            }
        },
    };
    Chunk {
        body,
        count: first.count + second.count,
        start: first.start,
        next: second.next,
        up_to_date: second.up_to_date,
        meta: second.meta,
    }
}

/// `Stream-Fork-Offset`: a token of this server, or [`ZERO_TOKEN`] (position 0). `Err`
/// names the problem.
pub fn fork_offset(value: &str, epoch: crate::offset::Epoch) -> Result<u64, String> {
    if value == ZERO_TOKEN {
        return Ok(0);
    }
    match Offset::parse(Some(value)) {
        Ok(Offset::At(position)) if position.epoch == epoch => Ok(position.seq),
        Ok(Offset::At(_)) => Err(format!("Stream-Fork-Offset {value:?} is from another epoch of this server")),
        _ => Err(format!("invalid Stream-Fork-Offset {value:?}: use a Stream-Next-Offset of the source")),
    }
}

/// `Stream-Fork-Sub-Offset`: digits without a leading zero (`0` itself allowed).
pub fn sub_offset(value: &str) -> Result<u64, String> {
    let invalid = || format!("invalid Stream-Fork-Sub-Offset {value:?}: use a whole number, like 3");
    let well_formed = value == "0" || (value.bytes().all(|b| b.is_ascii_digit()) && !value.starts_with('0'));
    if value.is_empty() || !well_formed {
        return Err(invalid());
    }
    value.parse().map_err(|_| invalid())
}

/// The stream `Stream-Forked-From` names: a path under `ds_path` (the official suite sends
/// `/v1/stream/<name>`), or, without that prefix, a name relative to it. Percent-escapes
/// are decoded as in a request path.
pub fn source_name(value: &str, ds_path: &str) -> Result<String, String> {
    let path = value.trim();
    let prefix = ds_path.trim_end_matches('/');
    let relative = match path.strip_prefix(prefix) {
        Some(rest) if !prefix.is_empty() && rest.starts_with('/') => &rest[1..],
        _ => path.trim_start_matches('/'),
    };
    let name = percent_encoding::percent_decode_str(relative)
        .decode_utf8()
        .map_err(|_| format!("Stream-Forked-From {value:?} is not UTF-8 once decoded"))?;
    if name.is_empty() {
        return Err(format!("Stream-Forked-From {value:?} names no stream"));
    }
    Ok(name.into_owned())
}

/// The first `n` bytes of the message after a byte stream's fork offset, materialized as the
/// fork's first message (WRITE.md §5.3); `Err` if the message is shorter.
pub fn byte_prefix(message: &Bytes, n: u64) -> Result<Bytes, String> {
    match usize::try_from(n) {
        Ok(n) if n <= message.len() => Ok(message.slice(..n)),
        _ => Err(format!("{n} is past the {} bytes after the fork offset", message.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_offsets_are_plain_whole_numbers() {
        assert_eq!(sub_offset("0"), Ok(0));
        assert_eq!(sub_offset("42"), Ok(42));
        for bad in ["", "-1", "abc", "1.5", "05", "+1", " 1", "99999999999999999999999"] {
            assert!(sub_offset(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn forked_from_is_resolved_under_the_ds_path() {
        assert_eq!(source_name("/v1/stream/a-b", "/v1/stream").unwrap(), "a-b");
        assert_eq!(source_name("/v1/stream/a/b%20c", "/v1/stream/").unwrap(), "a/b c");
        assert_eq!(source_name("/other/x", "/v1/stream").unwrap(), "other/x");
        assert_eq!(source_name("x", "/ds").unwrap(), "x");
        assert_eq!(source_name("/dsx", "/ds").unwrap(), "dsx");
        assert!(source_name("/v1/stream/", "/v1/stream").is_err());
        assert!(source_name("%ff", "/ds").is_err());
    }

    #[test]
    fn the_zero_token_is_position_zero() {
        let epoch = crate::offset::Epoch::parse(b"abcdefghij").unwrap();
        assert_eq!(fork_offset(ZERO_TOKEN, epoch), Ok(0));
        assert!(fork_offset("9999999999999999_9999999999999999", epoch).is_err());
        assert!(fork_offset("garbage", epoch).is_err());
        assert!(fork_offset("-1", epoch).is_err() && fork_offset("now", epoch).is_err());
    }

    #[test]
    fn byte_prefixes_stop_at_the_message() {
        let m = Bytes::from_static(b"hello");
        assert_eq!(byte_prefix(&m, 3).unwrap(), Bytes::from_static(b"hel"));
        assert_eq!(byte_prefix(&m, 5).unwrap(), m);
        assert!(byte_prefix(&m, 6).is_err());
    }
}
