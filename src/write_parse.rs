//! Parsers of the write API's request headers and bodies (`Stream-TTL`, `Stream-Expires-At`,
//! a `PUT`'s content type, JSON bodies). Pure functions over client input: they never panic,
//! and each error names what is wrong (the HTTP layer answers it as a `400`).

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::meta::{self, Framing};

/// `Stream-TTL`: seconds, digits without a leading zero (`0` itself allowed).
pub fn ttl(value: &str) -> Result<u64, String> {
    let invalid = || format!("invalid Stream-TTL {value:?}: use whole seconds, like 3600");
    let well_formed = value == "0" || (value.bytes().all(|b| b.is_ascii_digit()) && !value.starts_with('0'));
    if value.is_empty() || !well_formed {
        return Err(invalid());
    }
    // At most ten years, as every duration setting: beyond it is a typo or an overflow.
    value.parse::<u64>().ok().filter(|&secs| secs <= 10 * 365 * 24 * 3600).ok_or_else(invalid)
}

/// `Stream-Expires-At`: an RFC 3339 timestamp; kept as given (echoed verbatim) and in ms.
pub fn expires_at(value: &str) -> Result<(String, i64), String> {
    let parsed = time::OffsetDateTime::parse(value.trim(), &time::format_description::well_known::Rfc3339)
        .map_err(|_| format!("invalid Stream-Expires-At {value:?}: use an RFC 3339 timestamp"))?;
    let ms = i64::try_from(parsed.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
    Ok((value.to_string(), ms))
}

/// The largest integer a JavaScript client can hold exactly (2^53 - 1).
const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// `Producer-Id`, `Producer-Epoch`, `Producer-Seq`: all three or none; the id non-empty, the
/// numbers decimal digits up to 2^53 - 1.
pub fn producer(
    headers: (Option<&str>, Option<&str>, Option<&str>),
) -> Result<Option<crate::writes::Producer>, String> {
    let number = |name: &str, value: &str| {
        value
            .parse::<u64>()
            .ok()
            .filter(|n| value.bytes().all(|b| b.is_ascii_digit()) && *n <= MAX_SAFE_INTEGER)
            .ok_or_else(|| format!("invalid {name} {value:?}: use a whole number up to 2^53 - 1"))
    };
    match headers {
        (None, None, None) => Ok(None),
        (Some(""), _, _) => Err("Producer-Id must not be empty".into()),
        (Some(id), Some(epoch), Some(seq)) => Ok(Some(crate::writes::Producer {
            id: id.to_string(),
            epoch: number("Producer-Epoch", epoch)?,
            seq: number("Producer-Seq", seq)?,
        })),
        _ => Err("Producer-Id, Producer-Epoch and Producer-Seq go together: send all three or none".into()),
    }
}

/// A `PUT`'s content type: as given if it looks like `type/subtype`, else the default.
pub fn create_content_type(given: Option<&str>) -> String {
    let valid = |ct: &str| {
        let essence = ct.split(';').next().unwrap_or("").trim();
        let token =
            |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b));
        essence.split_once('/').is_some_and(|(kind, sub)| token(kind) && token(sub))
    };
    match given {
        Some(ct) if valid(ct) => ct.to_string(),
        _ => meta::DEFAULT_CONTENT_TYPE.to_string(),
    }
}

/// The messages of a body in a stream of `framing`: JSON is validated, compacted and, for a
/// top-level array, flattened one level (each element a message); other types are one
/// message of the bytes as sent. `Err` names the problem.
///
/// A message with nothing to compact is a slice of `body` (no copy: the writer's clones are
/// count increments); the others are compacted into one shared buffer. Nothing keeps a
/// message past the write, so the body is not held longer than the request.
pub fn messages(framing: Framing, body: &Bytes) -> Result<Vec<Bytes>, String> {
    if body.is_empty() {
        return Ok(Vec::new());
    }
    if framing == Framing::Raw {
        return Ok(vec![body.clone()]);
    }
    let text = std::str::from_utf8(body).map_err(|_| "body is not UTF-8 JSON".to_string())?;
    let value: &RawValue = serde_json::from_str(text).map_err(|e| format!("body is not valid JSON: {e}"))?;
    let items: Vec<&RawValue> = match value.get().starts_with('[') {
        true => serde_json::from_str(value.get()).map_err(|e| format!("body is not valid JSON: {e}"))?,
        false => vec![value],
    };
    let mut compacted = Vec::new();
    let parts: Vec<Result<Bytes, std::ops::Range<usize>>> = items
        .into_iter()
        .map(|item| match crate::ingest::has_whitespace(item.get()) {
            // `item` borrows from `text`, which is `body`: always a subset of it.
            false => Ok(body.slice_ref(item.get().as_bytes())),
            true => {
                let start = compacted.len();
                compacted.extend_from_slice(crate::ingest::compact(item.get()).as_bytes());
                Err(start..compacted.len())
            }
        })
        .collect();
    let compacted = Bytes::from(compacted);
    Ok(parts.into_iter().map(|part| part.unwrap_or_else(|range| compacted.slice(range))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_grammar() {
        for good in ["0", "1", "3600", "315360000"] {
            assert!(ttl(good).is_ok(), "{good}");
        }
        for bad in ["", "abc", "-1", "00060", "+60", "60.5", "1e3", " 60", "315360001", "99999999999999999999999"] {
            assert!(ttl(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn expires_at_takes_rfc3339_with_fractions_and_offsets() {
        assert_eq!(expires_at("2026-01-01T00:00:00Z").unwrap().1, 1_767_225_600_000);
        assert_eq!(expires_at("2026-01-01T00:00:00.250+00:00").unwrap().1, 1_767_225_600_250);
        assert_eq!(expires_at("2026-01-01T01:00:00+01:00").unwrap().1, 1_767_225_600_000);
        for bad in ["not-a-timestamp", "", "2026-01-01", "2026-13-01T00:00:00Z"] {
            assert!(expires_at(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn json_bodies_flatten_one_level_and_compact() {
        let m = |s: &'static str| messages(Framing::Json, &Bytes::from_static(s.as_bytes()));
        assert_eq!(m("[[1, 2], [3,4]]").unwrap(), vec![Bytes::from("[1,2]"), Bytes::from("[3,4]")]);
        assert_eq!(m("[[[1,2,3]]]").unwrap(), vec![Bytes::from("[[1,2,3]]")]);
        assert_eq!(m(" {\"a\" : \"b c\"} ").unwrap(), vec![Bytes::from("{\"a\":\"b c\"}")]);
        assert_eq!(m("null").unwrap(), vec![Bytes::from("null")]);
        assert!(m("[]").unwrap().is_empty());
        assert!(m("{").is_err() && m("[1,]").is_err() && m("1 2").is_err());
        // Compact messages are slices of the body; the others share one buffer.
        let body = Bytes::from_static(b"[1, {\"a\": 2}, [3], {\"b\" :4}]");
        let got = messages(Framing::Json, &body).unwrap();
        assert_eq!(got, [&b"1"[..], br#"{"a":2}"#, b"[3]", br#"{"b":4}"#]);
        let inside = |m: &Bytes| body.as_ptr_range().contains(&m.as_ptr());
        assert!(inside(&got[0]) && inside(&got[2]) && !inside(&got[1]) && !inside(&got[3]));
        assert_eq!(got[1].as_ptr().wrapping_add(got[1].len()), got[3].as_ptr(), "one buffer for the compacted");
        let raw = messages(Framing::Raw, &Bytes::from_static(b"\x00\xff[")).unwrap();
        assert_eq!(raw, vec![Bytes::from_static(b"\x00\xff[")]);
    }

    #[test]
    fn put_content_types_fall_back_to_the_default() {
        assert_eq!(create_content_type(Some("text/plain; charset=utf-8")), "text/plain; charset=utf-8");
        assert_eq!(create_content_type(Some("application/x-protobuf")), "application/x-protobuf");
        for bad in [None, Some("garbage"), Some("/x"), Some("a/"), Some("a b/c")] {
            assert_eq!(create_content_type(bad), meta::DEFAULT_CONTENT_TYPE, "{bad:?}");
        }
    }
}
