//! Response bodies from a stream's messages, the same on both engines: a JSON array for
//! `application/json` streams, the raw concatenation of the messages for every other type
//! (PRODUCT.md §13, WRITE.md §2.4, §2.5).

use bytes::Bytes;

use crate::meta::Framing;

/// Length of `count` messages of `message_bytes` in all, framed.
pub(crate) fn framed_len(framing: Framing, count: usize, message_bytes: usize) -> usize {
    match framing {
        Framing::Json => message_bytes + count.saturating_sub(1) + 2,
        Framing::Raw => message_bytes,
    }
}

/// Builds a chunk body: a JSON array, or the messages concatenated.
pub(crate) struct Framer {
    framing: Framing,
    body: Vec<u8>,
    count: usize,
}

impl Framer {
    pub(crate) fn new(framing: Framing, capacity: usize) -> Framer {
        let mut body = Vec::with_capacity(capacity);
        if framing == Framing::Json {
            body.push(b'[');
        }
        Framer { framing, body, count: 0 }
    }

    pub(crate) fn framing(&self) -> Framing {
        self.framing
    }

    /// Adds one message.
    pub(crate) fn push(&mut self, message: &[u8]) {
        if self.framing == Framing::Json && self.count > 0 {
            self.body.push(b',');
        }
        self.body.extend_from_slice(message);
        self.count += 1;
    }

    /// Adds `count` JSON messages already joined by commas (one copy for all of them).
    pub(crate) fn push_joined(&mut self, joined: &[u8], count: usize) {
        if self.framing == Framing::Json && self.count > 0 {
            self.body.push(b',');
        }
        self.body.extend_from_slice(joined);
        self.count += count;
    }

    /// Messages so far.
    pub(crate) fn count(&self) -> usize {
        self.count
    }

    /// Bytes so far plus what closing the body adds.
    pub(crate) fn len_closed(&self) -> usize {
        self.body.len() + usize::from(self.framing == Framing::Json)
    }

    pub(crate) fn reserve(&mut self, additional: usize) {
        self.body.reserve(additional);
    }

    pub(crate) fn finish(mut self) -> Bytes {
        if self.framing == Framing::Json {
            self.body.push(b']');
        }
        Bytes::from(self.body)
    }
}

/// The body of a chunk with no message: `[]` or nothing.
pub(crate) fn empty_body(framing: Framing) -> Bytes {
    match framing {
        Framing::Json => Bytes::from_static(b"[]"),
        Framing::Raw => Bytes::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_an_array_and_raw_is_the_bytes_concatenated() {
        for (framing, expected) in [(Framing::Json, &b"[1,\"a\",[2,3]]"[..]), (Framing::Raw, &b"1\"a\"[2,3]"[..])] {
            let mut body = Framer::new(framing, 0);
            body.push(b"1");
            body.push(b"\"a\"");
            body.push_joined(b"[2,3]", 1);
            assert_eq!(body.count(), 3);
            assert_eq!(body.len_closed(), expected.len());
            assert_eq!(&body.finish()[..], expected);
            assert_eq!(framed_len(framing, 3, 1 + 3 + 5), expected.len());
        }
        assert_eq!(&empty_body(Framing::Json)[..], b"[]");
        assert!(empty_body(Framing::Raw).is_empty());
    }
}
