//! Parsing of AnyCable broadcast bodies into messages ready to store.
//!
//! A message is stored as compact JSON text, made once here and then served byte for byte by
//! every read mode. Compacting only strips insignificant whitespace from text serde_json has
//! already validated: numbers, key order, duplicate keys and escapes stay exactly as the
//! publisher wrote them (a round trip through `serde_json::Value` would round big numbers and
//! reorder keys).

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::storage::NewMessage;
use crate::streams::{validate_stream_name, InvalidStreamName};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadBroadcast(pub String);

/// A parsed broadcast: messages to store and messages only for live readers.
#[derive(Debug, Default)]
pub struct Broadcast {
    pub stored: Vec<NewMessage>,
    /// `meta.transient = true`: not stored (no offset).
    pub transient: Vec<NewMessage>,
}

#[derive(Deserialize)]
struct Item<'a> {
    #[serde(borrow)]
    stream: Option<&'a RawValue>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    meta: Option<&'a RawValue>,
}

/// `meta`: only `transient` matters; other keys are accepted and ignored.
#[derive(Deserialize)]
struct Meta<'a> {
    #[serde(borrow)]
    transient: Option<&'a RawValue>,
}

/// Parses a whole body: one object or a non-empty array of them. Nothing is returned unless
/// every element is valid, so a batch is accepted whole or refused whole.
pub fn parse(body: &[u8]) -> Result<Broadcast, BadBroadcast> {
    let text = std::str::from_utf8(body).map_err(|_| BadBroadcast("body is not UTF-8".into()))?;
    // One serde pass over the whole body into borrowed items. Only if that fails does the
    // slower path below walk the body again, to say which element is wrong and how.
    let items = match text.trim_start().as_bytes().first() {
        Some(b'[') => serde_json::from_str::<Vec<Item>>(text).ok(),
        Some(b'{') => serde_json::from_str::<Item>(text).ok().map(|item| vec![item]),
        _ => None,
    };
    match items {
        Some(items) if !items.is_empty() => {
            let batch = items.len() > 1 || text.trim_start().starts_with('[');
            let mut builder = Builder::new(text.len(), items.len());
            for (index, item) in items.into_iter().enumerate() {
                builder.add(item).map_err(|BadBroadcast(e)| match batch {
                    true => BadBroadcast(format!("message {index}: {e}")),
                    false => BadBroadcast(e),
                })?;
            }
            Ok(builder.finish())
        }
        _ => parse_slowly(text),
    }
}

/// [`parse`] element by element, for the error message of a body that did not parse at once.
fn parse_slowly(text: &str) -> Result<Broadcast, BadBroadcast> {
    let root: &RawValue = serde_json::from_str(text).map_err(|e| BadBroadcast(format!("malformed JSON: {e}")))?;
    let mut builder = Builder::new(text.len(), 1);
    match root.get().as_bytes().first() {
        Some(b'[') => {
            let items: Vec<&RawValue> =
                serde_json::from_str(root.get()).map_err(|e| BadBroadcast(format!("malformed JSON: {e}")))?;
            if items.is_empty() {
                return Err(BadBroadcast("empty batch: send at least one message".into()));
            }
            for (index, item) in items.iter().enumerate() {
                builder.parse_item(item).map_err(|BadBroadcast(e)| BadBroadcast(format!("message {index}: {e}")))?;
            }
        }
        Some(b'{') => builder.parse_item(root)?,
        _ => return Err(BadBroadcast("body must be an object or an array of objects".into())),
    }
    Ok(builder.finish())
}

/// Collects a body's messages without an allocation per message: every message's bytes go
/// into one buffer (never longer than the body: decoding escapes and dropping whitespace only
/// shorten text), which becomes one `Bytes` that each message is a slice of; consecutive
/// messages to one stream share its name. The writer clones each message's `Bytes` (a count
/// increment on a shared buffer, where a `Bytes` made from its own `Vec` would allocate on the
/// first clone). Nothing keeps a message's slice past the write, so the buffer does not
/// outlive the request by much.
struct Builder<'a> {
    arena: Vec<u8>,
    /// Each message: its stream, its bytes in `arena`, transient or not.
    messages: Vec<(Arc<str>, Range<usize>, bool)>,
    /// The last stream name as sent (escapes and all) and as decoded.
    last_stream: Option<(&'a str, Arc<str>)>,
}

impl<'a> Builder<'a> {
    fn new(body_len: usize, messages: usize) -> Builder<'a> {
        Builder { arena: Vec::with_capacity(body_len), messages: Vec::with_capacity(messages), last_stream: None }
    }

    fn parse_item(&mut self, raw: &'a RawValue) -> Result<(), BadBroadcast> {
        if !raw.get().starts_with('{') {
            return Err(BadBroadcast("must be an object with \"stream\" and \"data\"".into()));
        }
        let item: Item =
            serde_json::from_str(raw.get()).map_err(|e| BadBroadcast(format!("malformed message: {e}")))?;
        self.add(item)
    }

    fn add(&mut self, item: Item<'a>) -> Result<(), BadBroadcast> {
        let stream = match item.stream {
            None => return Err(BadBroadcast("missing \"stream\"".into())),
            Some(raw) => self.stream(raw.get())?,
        };
        let start = self.arena.len();
        match item.data {
            Some(raw) if raw.get() != "null" => message_into(raw, &mut self.arena)?,
            _ => return Err(BadBroadcast("missing \"data\"".into())),
        }
        let range = start..self.arena.len();
        let transient = match item.meta {
            Some(raw) if raw.get() != "null" => transient(raw.get())?,
            _ => false,
        };
        self.messages.push((stream, range, transient));
        Ok(())
    }

    /// The decoded, validated name of `raw` (a `"stream"` value as sent).
    fn stream(&mut self, raw: &'a str) -> Result<Arc<str>, BadBroadcast> {
        if let Some((last_raw, last)) = &self.last_stream {
            if *last_raw == raw {
                return Ok(last.clone());
            }
        }
        if !raw.starts_with('"') {
            return Err(BadBroadcast("\"stream\" must be a string".into()));
        }
        check_value(raw).map_err(|e| e.of("\"stream\""))?;
        // Checked above: a string whose escapes all decode, so this cannot fail; if it ever
        // did, the client gets a 400, never a panic.
        let name = serde_json::from_str::<String>(raw).map_err(|e| BadBroadcast(format!("\"stream\": {e}")))?;
        validate_stream_name(&name).map_err(|e| match e {
            InvalidStreamName::Empty => BadBroadcast("\"stream\" must not be empty".into()),
            other => BadBroadcast(format!("\"stream\": {other}")),
        })?;
        let name: Arc<str> = name.into();
        self.last_stream = Some((raw, name.clone()));
        Ok(name)
    }

    fn finish(self) -> Broadcast {
        let arena = Bytes::from(self.arena);
        let mut broadcast = Broadcast::default();
        for (stream, range, transient) in self.messages {
            let message = NewMessage { stream, json: arena.slice(range) };
            match transient {
                true => broadcast.transient.push(message),
                false => broadcast.stored.push(message),
            }
        }
        broadcast
    }
}

/// `meta.transient` of a `meta` value as sent.
fn transient(meta: &str) -> Result<bool, BadBroadcast> {
    check_value(meta).map_err(|e| e.of("\"meta\""))?;
    if !meta.starts_with('{') {
        return Err(BadBroadcast("\"meta\" must be an object".into()));
    }
    let meta: Meta = serde_json::from_str(meta).map_err(|e| BadBroadcast(format!("\"meta\": {e}")))?;
    // `null` counts as absent, as for the other keys.
    match meta.transient.map(RawValue::get) {
        None | Some("null") | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(_) => Err(BadBroadcast("\"meta.transient\" must be true or false".into())),
    }
}

/// Appends to `out` the message a `data` value stands for, as compact JSON text.
fn message_into(data: &RawValue, out: &mut Vec<u8>) -> Result<(), BadBroadcast> {
    let text = data.get();
    check_value(text).map_err(|e| e.of("\"data\""))?;
    if !text.starts_with('"') {
        compact_into(text, out); // already a JSON value
        return Ok(());
    }
    // AnyCable's convention: a string holding JSON text. If it does not hold JSON, the message
    // is the string itself. The string's escapes were checked above, so decoding it cannot
    // fail; should it, that is the client's 400, never a panic.
    let start = out.len();
    if unescape_into(text, out).is_none() {
        out.truncate(start);
        return Err(BadBroadcast("\"data\" holds an invalid escape".into()));
    }
    let compacted = match serde_json::from_slice::<&RawValue>(&out[start..]) {
        Ok(value) => {
            // JSON text, as far as serde_json's grammar check goes: it lets lone surrogate
            // escapes and any depth through, and the message must not have either.
            check_value(value.get()).map_err(Unfit::in_data_text)?;
            if value.get().len() == out.len() - start && !has_whitespace(value.get()) {
                return Ok(()); // already compact: the common case
            }
            compact(value.get())
        }
        // Not JSON: the string itself (a string literal has nothing to compact).
        Err(_) => text.to_string(),
    };
    out.truncate(start);
    out.extend_from_slice(compacted.as_bytes());
    Ok(())
}

/// Decodes a JSON string literal (quotes included) that serde_json's grammar check and
/// [`check_value`] have passed, appending its UTF-8 text to `out`. `None` for anything else
/// (which those checks make impossible); never panics, whatever the input.
fn unescape_into(literal: &str, out: &mut Vec<u8>) -> Option<()> {
    let bytes = literal.strip_prefix('"')?.strip_suffix('"')?.as_bytes();
    let mut i = 0;
    loop {
        // Runs without escapes are copied as they are; they are cut at `\` (ASCII), so the
        // output stays UTF-8.
        let rest = bytes.get(i..)?;
        let run = rest.iter().position(|&b| b == b'\\').unwrap_or(rest.len());
        out.extend_from_slice(&rest[..run]);
        i += run;
        let Some(&escape) = bytes.get(i + 1) else {
            return (i == bytes.len()).then_some(());
        };
        let c = match escape {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let unit = hex_escape(bytes, i)?;
                i += 4;
                let code = match unit {
                    0xD800..=0xDBFF => match hex_escape(bytes, i + 2)? {
                        low @ 0xDC00..=0xDFFF => {
                            i += 6;
                            0x10000 + ((u32::from(unit) - 0xD800) << 10) + (u32::from(low) - 0xDC00)
                        }
                        _ => return None,
                    },
                    0xDC00..=0xDFFF => return None,
                    _ => u32::from(unit),
                };
                char::from_u32(code)?
            }
            _ => return None,
        };
        i += 2;
        out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
    }
}

/// [`compact`], appended to `out`.
fn compact_into(json: &str, out: &mut Vec<u8>) {
    if !has_whitespace(json) {
        out.extend_from_slice(json.as_bytes());
    } else {
        out.extend_from_slice(compact(json).as_bytes());
    }
}

/// Most levels of arrays and objects a message (or `meta`) may nest. serde_json's `RawValue`
/// has no depth limit (it skips values without recursion), but a message is parsed again by
/// its readers: serde_json's own default limit is 128 levels, so 100 keeps every stored
/// message readable by it and by parsers like it.
pub const MAX_DEPTH: usize = 100;

/// What serde_json's grammar check (`RawValue`) lets through but a message must not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unfit {
    /// A `\u` escape of a UTF-16 surrogate that is not part of a high+low pair: no Unicode
    /// character, so no UTF-8 text (and no Rust or serde_json string) can hold it.
    LoneSurrogate,
    /// A `\` not followed by a valid escape (only in text serde_json did not check).
    BadEscape,
    /// Arrays and objects nested more than [`MAX_DEPTH`] levels.
    TooDeep,
}

impl Unfit {
    /// The client's error, naming `what` (e.g. `"data"`).
    fn of(self, what: &str) -> BadBroadcast {
        BadBroadcast(match self {
            Unfit::LoneSurrogate => format!("{what} holds an invalid \\u escape (lone surrogate)"),
            Unfit::BadEscape => format!("{what} holds an invalid escape"),
            Unfit::TooDeep => format!("{what} nests deeper than {MAX_DEPTH} levels"),
        })
    }

    /// The client's error for JSON text held in a `data` string.
    fn in_data_text(self) -> BadBroadcast {
        BadBroadcast(match self {
            Unfit::LoneSurrogate => "\"data\" holds JSON text with an invalid \\u escape (lone surrogate)".into(),
            Unfit::BadEscape => "\"data\" holds JSON text with an invalid escape".into(),
            Unfit::TooDeep => format!("\"data\" holds JSON text nested deeper than {MAX_DEPTH} levels"),
        })
    }
}

/// Checks JSON text that serde_json's grammar check has passed for lone surrogate escapes and
/// for nesting beyond [`MAX_DEPTH`]. One pass over the bytes, no recursion, no allocation;
/// never panics, whatever the input.
fn check_value(json: &str) -> Result<(), Unfit> {
    let bytes = json.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'"' => {
                i = skip_string(bytes, i + 1)?;
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(Unfit::TooDeep);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

/// From just after a string's opening quote to just after its closing one (or the end),
/// checking each `\u` escape.
fn skip_string(bytes: &[u8], mut i: usize) -> Result<usize, Unfit> {
    while let Some(&b) = bytes.get(i) {
        match b {
            b'"' => return Ok(i + 1),
            b'\\' if bytes.get(i + 1) == Some(&b'u') => {
                let unit = hex_escape(bytes, i).ok_or(Unfit::BadEscape)?;
                i += 6;
                match unit {
                    0xD800..=0xDBFF => match hex_escape(bytes, i) {
                        Some(0xDC00..=0xDFFF) => i += 6,
                        _ => return Err(Unfit::LoneSurrogate),
                    },
                    0xDC00..=0xDFFF => return Err(Unfit::LoneSurrogate),
                    _ => {}
                }
            }
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    Ok(i)
}

/// The code unit of the `\uXXXX` escape starting at `at`, if there is one.
fn hex_escape(bytes: &[u8], at: usize) -> Option<u16> {
    match bytes.get(at..at + 6)? {
        [b'\\', b'u', hex @ ..] => {
            let hex = std::str::from_utf8(hex).ok()?;
            if hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                u16::from_str_radix(hex, 16).ok()
            } else {
                None
            }
        }
        _ => None,
    }
}

pub fn has_whitespace(json: &str) -> bool {
    json.bytes().any(|b| matches!(b, b' ' | b'\n' | b'\r' | b'\t'))
}

/// Removes insignificant whitespace from valid JSON text. Only ASCII whitespace outside
/// strings is dropped; everything else is copied as runs of the input `&str`, cut at ASCII
/// bytes (always character boundaries), so there is nothing to re-validate and nothing that
/// can fail, whatever the input.
pub fn compact(json: &str) -> String {
    if !has_whitespace(json) {
        return json.to_string();
    }
    let mut out = String::with_capacity(json.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut run_start = 0;
    for (i, b) in json.bytes().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        } else if matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
            out.push_str(&json[run_start..i]);
            run_start = i + 1;
        }
    }
    out.push_str(&json[run_start..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(body: &str) -> Vec<(String, String)> {
        parse(body.as_bytes())
            .unwrap()
            .stored
            .into_iter()
            .map(|m| (m.stream.to_string(), String::from_utf8(m.json.to_vec()).unwrap()))
            .collect()
    }

    #[test]
    fn data_as_json_text_as_value_and_as_plain_string() {
        assert_eq!(stored(r#"{"stream":"a","data":"{\"text\": \"hi\"}"}"#), [("a".into(), r#"{"text":"hi"}"#.into())]);
        assert_eq!(
            stored(r#"{"stream":"a","data":{"n": 1, "s": "x y"}}"#),
            [("a".into(), r#"{"n":1,"s":"x y"}"#.into())]
        );
        assert_eq!(stored(r#"{"stream":"a","data":"not json"}"#), [("a".into(), r#""not json""#.into())]);
        assert_eq!(stored(r#"{"stream":"a","data":"42"}"#), [("a".into(), "42".into())]);
        assert_eq!(stored(r#"{"stream":"a","data":7}"#), [("a".into(), "7".into())]);
        assert_eq!(stored(r#"{"stream":"a","data":""}"#), [("a".into(), r#""""#.into())]);
    }

    #[test]
    fn compacting_keeps_numbers_order_and_escapes() {
        let text = "{ \"b\" : 12345678901234567890123, \"a\":[1, 2.50],\n \"s\": \"a \\\" b\\n\" }";
        assert_eq!(compact(text), r#"{"b":12345678901234567890123,"a":[1,2.50],"s":"a \" b\n"}"#);
    }

    #[test]
    fn batches_keep_order_and_split_transient() {
        let b = parse(br#"[{"stream":"a","data":"1"},{"stream":"b","data":"2","meta":{"transient":true}},{"stream":"a","data":"3","meta":{}}]"#)
            .unwrap();
        assert_eq!(b.stored.iter().map(|m| &m.json[..]).collect::<Vec<_>>(), [&b"1"[..], b"3"]);
        assert_eq!(b.transient.len(), 1);
        let b = parse(br#"[{"stream":"a","data":1,"meta":{"transient":null,"x":[1]}},{"stream":"a","data":2,"meta":{"transient":false}}]"#)
            .unwrap();
        assert_eq!((b.stored.len(), b.transient.len()), (2, 0), "null and false are not transient");
    }

    #[test]
    fn bad_bodies_name_the_problem() {
        let cases = [
            ("", "malformed JSON"),
            ("{", "malformed JSON"),
            ("[]", "empty batch"),
            ("42", "object or an array"),
            (r#"{"data":"1"}"#, "missing \"stream\""),
            (r#"{"stream":"","data":"1"}"#, "must not be empty"),
            (r#"{"stream":5,"data":"1"}"#, "must be a string"),
            (r#"{"stream":"a"}"#, "missing \"data\""),
            (r#"{"stream":"a","data":null}"#, "missing \"data\""),
            (r#"[{"stream":"a","data":"1"},{"stream":"a"}]"#, "message 1: missing \"data\""),
            (r#"[{"stream":"a","data":"1"}, 3]"#, "message 1: must be an object"),
            (r#"{"stream":"a\u0000b","data":"1"}"#, "control"),
            (r#"{"stream":"a","data":"1","meta":5}"#, "\"meta\" must be an object"),
            (r#"{"stream":"a","data":"1","meta":{"transient":"yes"}}"#, "\"meta.transient\" must be true or false"),
            (r#"{"stream":"a","data":"1","meta":{"transient":1e400}}"#, "\"meta.transient\" must be true or false"),
            (r#"{"stream":"a","data":"1","meta":{"transient":true,"transient":true}}"#, "\"meta\": duplicate field"),
            // Lone surrogate escapes: serde_json's RawValue lets them through, the second parse
            // of the string does not (this panicked in `message_json`).
            (r#"{"stream":"a","data":"\udead"}"#, r#""data" holds an invalid \u escape (lone surrogate)"#),
            (r#"{"stream":"a","data":"\ud800"}"#, "\"data\" holds an invalid \\u escape"),
            (r#"{"stream":"a","data":"x\ud800y"}"#, "\"data\" holds an invalid \\u escape"),
            (r#"{"stream":"a","data":"\ud800\u0041"}"#, "\"data\" holds an invalid \\u escape"),
            (r#"{"stream":"a","data":"\ud800\ud800\udc00"}"#, "\"data\" holds an invalid \\u escape"),
            (r#"{"stream":"a","data":"\udc00\ud800"}"#, "\"data\" holds an invalid \\u escape"),
            (r#"{"stream":"a","data":{"k":["\uDEAD"]}}"#, "\"data\" holds an invalid \\u escape"),
            (r#"{"stream":"a","data":{"\udead":1}}"#, "\"data\" holds an invalid \\u escape"),
            (r#"{"stream":"a","data":"[\"\\udead\"]"}"#, "\"data\" holds JSON text with an invalid \\u escape"),
            (r#"{"stream":"\udead","data":"1"}"#, "\"stream\" holds an invalid \\u escape (lone surrogate)"),
            (r#"{"stream":"a\ud83d","data":"1"}"#, "\"stream\" holds an invalid \\u escape"),
            (r#"{"stream":"a","data":"1","meta":{"x":"\udead"}}"#, "\"meta\" holds an invalid \\u escape"),
            (r#"{"stream":"a","data":"1","meta":{"transient":true,"\udead":1}}"#, "\"meta\" holds an invalid"),
            (r#"[{"stream":"a","data":"1"},{"stream":"a","data":"\udead"}]"#, "message 1: \"data\" holds an invalid"),
            // Grammar errors in escapes are malformed JSON.
            (r#"{"stream":"a","data":"\x"}"#, "malformed JSON"),
            (r#"{"stream":"a","data":"\u12"}"#, "malformed JSON"),
            ("{\"stream\":\"a\",\"data\":\"\u{1}\"}", "malformed JSON"),
            ("\u{feff}{\"stream\":\"a\",\"data\":1}", "malformed JSON"),
            (r#"{"stream":"a","data":1,"data":2}"#, "duplicate field"),
        ];
        for (body, expected) in cases {
            let err = parse(body.as_bytes()).expect_err(body).0;
            assert!(err.contains(expected), "{body}: {err}");
            assert_eq!(parse_slowly(body).expect_err(body).0, err, "both paths give the same error");
        }
    }

    #[test]
    fn escapes_that_decode_are_kept_as_sent() {
        // Valid escapes, a surrogate pair in either case, in a value and in JSON text.
        assert_eq!(
            stored(r#"{"stream":"a","data":["\n\"\\\/\u00e9","\ud83d\ude00","\uD83D\uDE00"]}"#),
            [("a".into(), r#"["\n\"\\\/\u00e9","\ud83d\ude00","\uD83D\uDE00"]"#.into())]
        );
        assert_eq!(stored(r#"{"stream":"a","data":"\ud83d\ude00"}"#), [("a".into(), r#""\ud83d\ude00""#.into())]);
        assert_eq!(stored(r#"{"stream":"a","data":"\"\\ud83d\\ude00\""}"#), [("a".into(), r#""\ud83d\ude00""#.into())]);
        assert_eq!(stored(r#"{"stream":"\u00e9\ud83d\ude00","data":1}"#), [("é😀".into(), "1".into())]);
        // Text that is not JSON is the message, escapes and all: a backslash-u in a path.
        assert_eq!(stored(r#"{"stream":"a","data":"C:\\udead"}"#), [("a".into(), r#""C:\\udead""#.into())]);
        // Big and odd numbers are kept verbatim.
        assert_eq!(
            stored(r#"{"stream":"a","data":[1e400, -0, 1E-400, 123456789012345678901234567890]}"#),
            [("a".into(), "[1e400,-0,1E-400,123456789012345678901234567890]".into())]
        );
    }

    #[test]
    fn nesting_is_limited_without_recursion() {
        let nested = |depth: usize, open: &str, close: &str| format!("{}1{}", open.repeat(depth), close.repeat(depth));
        for (open, close) in [("[", "]"), ("{\"k\":", "}")] {
            let ok = nested(MAX_DEPTH, open, close);
            assert_eq!(stored(&format!(r#"{{"stream":"a","data":{ok}}}"#))[0].1, ok);
            serde_json::from_str::<serde_json::Value>(&ok).expect("serde_json reads what is stored");
            let as_text = serde_json::to_string(&ok).unwrap();
            assert_eq!(stored(&format!(r#"{{"stream":"a","data":{as_text}}}"#))[0].1, ok);
            // Deeper than serde_json's recursion limit and far deeper than a thread's stack.
            for depth in [MAX_DEPTH + 1, 200, 100_000] {
                let deep = nested(depth, open, close);
                let err = parse(format!(r#"{{"stream":"a","data":{deep}}}"#).as_bytes()).unwrap_err().0;
                assert_eq!(err, "\"data\" nests deeper than 100 levels");
                let as_text = serde_json::to_string(&deep).unwrap();
                let err = parse(format!(r#"{{"stream":"a","data":{as_text}}}"#).as_bytes()).unwrap_err().0;
                assert_eq!(err, "\"data\" holds JSON text nested deeper than 100 levels");
                let err = parse(format!(r#"{{"stream":"a","data":1,"meta":{{"x":{deep}}}}}"#).as_bytes()).unwrap_err();
                assert!(err.0.contains("\"meta\" nests deeper"), "{err}");
                // A deep body around the message is refused as a shape error, not by recursion.
                assert!(parse(deep.as_bytes()).is_err());
            }
        }
        // Brackets inside strings do not count.
        let text = format!(r#"{{"stream":"a","data":["{}"]}}"#, "[".repeat(500));
        assert_eq!(parse(text.as_bytes()).unwrap().stored.len(), 1);
    }

    #[test]
    fn the_checker_and_compact_never_panic_on_garbage() {
        for text in ["\"\\u", "\"\\u12", "\"\\ud800\\u", "\"\\", "\"é\\ué", "]]]]", "\"\\ud800\\uzzzz\""] {
            let _ = check_value(text);
            let _ = compact(text);
        }
        assert_eq!(check_value("\"\\u12\""), Err(Unfit::BadEscape));
        assert_eq!(compact(" é \"a b\" \n😀 "), "é\"a b\"😀");
    }

    #[test]
    fn the_one_pass_parse_agrees_with_the_element_by_element_one() {
        let bodies = [
            r#"{"stream":"a","data":"{\"x\": [1, 2]}"}"#,
            r#" [ {"stream":"a","data":"1"} , {"stream":"b","data":{"k" : "v w"},"extra":1} ] "#,
            r#"[{"stream":"a","data":" 42 "},{"stream":"a","data":"\" spaced \""}]"#,
            r#"{"stream":"a","data":"x","meta":{"transient":true}}"#,
            r#"{"stream":"\u0061","data":"\ud83d\ude00","meta":{"x":"\ud83d\ude00"},"y":"\udead"}"#,
        ];
        let flatten = |b: Broadcast| {
            let all = b.stored.into_iter().map(|m| (m.stream, m.json, false));
            all.chain(b.transient.into_iter().map(|m| (m.stream, m.json, true))).collect::<Vec<_>>()
        };
        for body in bodies {
            assert_eq!(flatten(parse(body.as_bytes()).unwrap()), flatten(parse_slowly(body).unwrap()), "{body}");
        }
    }

    #[test]
    fn a_batch_shares_one_buffer_and_one_name_per_run_of_a_stream() {
        let b = parse(br#"[{"stream":"a","data":"1"},{"stream":"a","data":{"x": 2}},{"stream":"b","data":"3"},{"stream":"a","data":"\"4\""}]"#)
            .unwrap();
        let m = &b.stored;
        assert_eq!(m.iter().map(|m| &m.json[..]).collect::<Vec<_>>(), [&b"1"[..], br#"{"x":2}"#, b"3", br#""4""#]);
        assert!(std::sync::Arc::ptr_eq(&m[0].stream, &m[1].stream), "a run to one stream shares its name");
        assert_eq!((&*m[2].stream, &*m[3].stream), ("b", "a"));
        // Every message is a slice of one buffer, in order.
        let at = |i: usize| m[i].json.as_ptr() as usize;
        assert!((0..3).all(|i| at(i) + m[i].json.len() == at(i + 1)), "one buffer, back to back");
    }

    /// Strings with every kind of escape, as JSON text: `unescape_into` decodes them exactly
    /// as serde_json does, and refuses what serde_json refuses.
    fn literal() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let piece = prop_oneof![
            "[a-zA-Z0-9 ,:{}\\[\\]]{0,4}",
            Just(r#"\""#.to_string()),
            Just(r"\\".to_string()),
            Just(r"\/".to_string()),
            prop::sample::select(vec![r"\b", r"\f", r"\n", r"\r", r"\t", r"\x", r"\"]).prop_map(String::from),
            any::<u16>().prop_map(|u| format!("\\u{u:04x}")),
            any::<u16>().prop_map(|u| format!("\\u{u:04X}")),
            (0xD800u16..0xDC00, 0xDC00u16..0xE000).prop_map(|(h, l)| format!("\\u{h:04x}\\u{l:04X}")),
            any::<char>().prop_map(String::from),
        ];
        prop::collection::vec(piece, 0..8).prop_map(|pieces| format!("\"{}\"", pieces.concat()))
    }

    proptest::proptest! {
        #[test]
        fn unescaping_agrees_with_serde_json(text in literal()) {
            let mut out = b"prefix".to_vec();
            let ours = unescape_into(&text, &mut out).map(|()| String::from_utf8(out[6..].to_vec()).unwrap());
            let grammar_ok = serde_json::from_str::<&RawValue>(&text).is_ok() && check_value(&text).is_ok();
            let theirs = serde_json::from_str::<String>(&text).ok();
            if grammar_ok {
                proptest::prop_assert_eq!(ours, theirs);
            }
            // And a whole broadcast of it never panics, whatever it holds.
            let _ = parse(format!(r#"{{"stream":"s","data":{text}}}"#).as_bytes());
        }
    }
}
