//! Offset tokens: the only place that knows their format.
//!
//! A token names the position "after message N of a stream, in store epoch E" and is written
//! `<epoch>_<N as 20 decimal digits>`. Zero padding makes tokens of one epoch sort
//! lexicographically in stream order; the epoch makes a token from another life of the store
//! detectable. The format uses only `[a-z0-9_]`, so it is URL-safe and can never be `-1` or `now`.

use std::fmt;

/// Width of the zero-padded sequence number (u64::MAX has 20 digits).
const SEQ_DIGITS: usize = 20;
/// Length of a store epoch id.
pub const EPOCH_LEN: usize = 10;

/// The random id of one life of a data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Epoch([u8; EPOCH_LEN]);

impl Epoch {
    /// A fresh random epoch of lowercase letters and digits.
    pub fn random() -> Epoch {
        use rand::Rng;
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let mut rng = rand::rng();
        let mut id = [0u8; EPOCH_LEN];
        for b in &mut id {
            *b = ALPHABET[rng.random_range(0..ALPHABET.len())];
        }
        Epoch(id)
    }

    pub fn parse(text: &[u8]) -> Option<Epoch> {
        let id: [u8; EPOCH_LEN] = text.try_into().ok()?;
        id.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()).then_some(Epoch(id))
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("epoch is ASCII")
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A position in a stream: "after message `seq`". `seq == 0` is the start of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub epoch: Epoch,
    pub seq: u64,
}

impl Position {
    pub fn token(&self) -> String {
        self.to_string()
    }
}

/// The position as its token (`<epoch>_<20-digit seq>`).
impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}_{:0width$}", self.epoch, self.seq, width = SEQ_DIGITS)
    }
}

/// What a client asked for with `offset=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offset {
    /// `-1`, `0` (AnyCable's alias) or absent: from the oldest retained message.
    Start,
    /// `now`: the current tail.
    Now,
    /// A token this server handed out.
    At(Position),
}

/// An `offset=` value that names no position. The message is the client's 400 error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidOffset {
    /// `offset=` with nothing after it: not "from the start" (that is `-1`, or no `offset` at
    /// all); the official conformance suite expects a 400.
    #[error("offset must not be empty (use -1, now or a token)")]
    Empty,
    #[error("invalid offset")]
    Malformed,
}

impl Offset {
    /// `raw` is the decoded `offset` query parameter, `None` when there is none.
    pub fn parse(raw: Option<&str>) -> Result<Offset, InvalidOffset> {
        match raw {
            None | Some("-1") | Some("0") => Ok(Offset::Start),
            Some("") => Err(InvalidOffset::Empty),
            Some("now") => Ok(Offset::Now),
            Some(token) => parse_token(token).map(Offset::At).ok_or(InvalidOffset::Malformed),
        }
    }
}

fn parse_token(token: &str) -> Option<Position> {
    let (epoch, seq) = token.split_once('_')?;
    if seq.len() != SEQ_DIGITS || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(Position { epoch: Epoch::parse(epoch.as_bytes())?, seq: seq.parse().ok()? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_sort_in_stream_order() {
        let epoch = Epoch::random();
        let seqs = [0u64, 1, 9, 10, 11, 99, 100, 12345, u64::MAX];
        let tokens: Vec<String> = seqs.iter().map(|&seq| Position { epoch, seq }.token()).collect();
        let mut sorted = tokens.clone();
        sorted.sort();
        assert_eq!(tokens, sorted);
        for (token, &seq) in tokens.iter().zip(&seqs) {
            assert!(token.len() < 64);
            assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'), "{token}");
            assert_eq!(Offset::parse(Some(token)), Ok(Offset::At(Position { epoch, seq })));
        }
    }

    #[test]
    fn special_offsets() {
        for raw in [None, Some("-1"), Some("0")] {
            assert_eq!(Offset::parse(raw), Ok(Offset::Start));
        }
        assert_eq!(Offset::parse(Some("now")), Ok(Offset::Now));
    }

    #[test]
    fn an_empty_offset_is_an_error_not_the_start() {
        assert_eq!(Offset::parse(Some("")), Err(InvalidOffset::Empty));
        assert_eq!(InvalidOffset::Empty.to_string(), "offset must not be empty (use -1, now or a token)");
        // Nothing trims: whitespace is not a special offset either.
        for raw in [" ", " -1", "now ", "-1\n"] {
            assert_eq!(Offset::parse(Some(raw)), Err(InvalidOffset::Malformed), "{raw:?}");
        }
    }

    #[test]
    fn garbage_is_refused() {
        let good = Position { epoch: Epoch::random(), seq: 5 }.token();
        let bad = [
            "abc",
            "-2",
            "NOW",
            "_00000000000000000005",
            &good[..good.len() - 1],
            &format!("{good}0"),
            &good.to_uppercase(),
            "abcdefghij_0000000000000000000a",
            "abcdefghij_99999999999999999999", // overflows u64
            "abcdefghij-00000000000000000005",
        ];
        for raw in bad {
            assert_eq!(Offset::parse(Some(raw)), Err(InvalidOffset::Malformed), "{raw}");
        }
    }
}
