//! Parsing of AnyCable broadcast bodies into messages ready to store.
//!
//! A message is stored as compact JSON text, made once here and then served byte for byte by
//! every read mode. Compacting only strips insignificant whitespace from text serde_json has
//! already validated: numbers, key order, duplicate keys and escapes stay exactly as the
//! publisher wrote them (a round trip through `serde_json::Value` would round big numbers and
//! reorder keys).

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

#[derive(Deserialize, Default)]
struct Meta {
    #[serde(default)]
    transient: bool,
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
            let mut broadcast = Broadcast::default();
            for (index, item) in items.into_iter().enumerate() {
                add_item(item, &mut broadcast).map_err(|BadBroadcast(e)| match batch {
                    true => BadBroadcast(format!("message {index}: {e}")),
                    false => BadBroadcast(e),
                })?;
            }
            Ok(broadcast)
        }
        _ => parse_slowly(text),
    }
}

/// [`parse`] element by element, for the error message of a body that did not parse at once.
fn parse_slowly(text: &str) -> Result<Broadcast, BadBroadcast> {
    let root: &RawValue = serde_json::from_str(text).map_err(|e| BadBroadcast(format!("malformed JSON: {e}")))?;
    let mut broadcast = Broadcast::default();
    match root.get().as_bytes().first() {
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_str(root.get()).expect("validated array");
            if items.is_empty() {
                return Err(BadBroadcast("empty batch: send at least one message".into()));
            }
            for (index, item) in items.iter().enumerate() {
                parse_item(item, &mut broadcast)
                    .map_err(|BadBroadcast(e)| BadBroadcast(format!("message {index}: {e}")))?;
            }
        }
        Some(b'{') => parse_item(root, &mut broadcast)?,
        _ => return Err(BadBroadcast("body must be an object or an array of objects".into())),
    }
    Ok(broadcast)
}

fn parse_item(raw: &RawValue, out: &mut Broadcast) -> Result<(), BadBroadcast> {
    if !raw.get().starts_with('{') {
        return Err(BadBroadcast("must be an object with \"stream\" and \"data\"".into()));
    }
    let item: Item = serde_json::from_str(raw.get()).map_err(|e| BadBroadcast(format!("malformed message: {e}")))?;
    add_item(item, out)
}

fn add_item(item: Item, out: &mut Broadcast) -> Result<(), BadBroadcast> {
    let stream = match item.stream {
        None => return Err(BadBroadcast("missing \"stream\"".into())),
        Some(raw) => {
            serde_json::from_str::<String>(raw.get()).map_err(|_| BadBroadcast("\"stream\" must be a string".into()))?
        }
    };
    validate_stream_name(&stream).map_err(|e| match e {
        InvalidStreamName::Empty => BadBroadcast("\"stream\" must not be empty".into()),
        other => BadBroadcast(format!("\"stream\": {other}")),
    })?;
    let data = match item.data {
        Some(raw) if raw.get() != "null" => message_json(raw),
        _ => return Err(BadBroadcast("missing \"data\"".into())),
    };
    let meta: Meta = match item.meta {
        Some(raw) if raw.get() != "null" => {
            serde_json::from_str(raw.get()).map_err(|_| BadBroadcast("\"meta\" must be an object".into()))?
        }
        _ => Meta::default(),
    };
    let message = NewMessage { stream, json: Bytes::from(data) };
    if meta.transient {
        out.transient.push(message);
    } else {
        out.stored.push(message);
    }
    Ok(())
}

/// The message a `data` value stands for, as compact JSON text.
fn message_json(data: &RawValue) -> String {
    let text = data.get();
    if !text.starts_with('"') {
        return compact(text); // already a JSON value
    }
    // AnyCable's convention: a string holding JSON text. If it does not hold JSON, the message
    // is the string itself.
    let inner: String = serde_json::from_str(text).expect("validated string");
    match serde_json::from_str::<&RawValue>(&inner) {
        Ok(value) if value.get().len() == inner.len() && !has_whitespace(&inner) => inner,
        Ok(value) => compact(value.get()),
        Err(_) => compact(text),
    }
}

fn has_whitespace(json: &str) -> bool {
    json.bytes().any(|b| matches!(b, b' ' | b'\n' | b'\r' | b'\t'))
}

/// Removes insignificant whitespace from valid JSON text. Works on bytes: every byte it looks
/// at (quote, backslash, whitespace) is ASCII, and UTF-8 never uses ASCII bytes inside a
/// multi-byte character, so the output is valid UTF-8 whenever the input is.
pub fn compact(json: &str) -> String {
    if !has_whitespace(json) {
        return json.to_string();
    }
    let mut out = Vec::with_capacity(json.len());
    let mut in_string = false;
    let mut escaped = false;
    for &b in json.as_bytes() {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
            out.push(b);
        } else if !matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
            out.push(b);
        }
    }
    String::from_utf8(out).expect("compacting keeps UTF-8 valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(body: &str) -> Vec<(String, String)> {
        parse(body.as_bytes())
            .unwrap()
            .stored
            .into_iter()
            .map(|m| (m.stream, String::from_utf8(m.json.to_vec()).unwrap()))
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
        ];
        for (body, expected) in cases {
            let err = parse(body.as_bytes()).expect_err(body).0;
            assert!(err.contains(expected), "{body}: {err}");
            assert_eq!(parse_slowly(body).expect_err(body).0, err, "both paths give the same error");
        }
    }

    #[test]
    fn the_one_pass_parse_agrees_with_the_element_by_element_one() {
        let bodies = [
            r#"{"stream":"a","data":"{\"x\": [1, 2]}"}"#,
            r#" [ {"stream":"a","data":"1"} , {"stream":"b","data":{"k" : "v w"},"extra":1} ] "#,
            r#"[{"stream":"a","data":" 42 "},{"stream":"a","data":"\" spaced \""}]"#,
            r#"{"stream":"a","data":"x","meta":{"transient":true}}"#,
        ];
        let flatten = |b: Broadcast| {
            let all = b.stored.into_iter().map(|m| (m.stream, m.json, false));
            all.chain(b.transient.into_iter().map(|m| (m.stream, m.json, true))).collect::<Vec<_>>()
        };
        for body in bodies {
            assert_eq!(flatten(parse(body.as_bytes()).unwrap()), flatten(parse_slowly(body).unwrap()), "{body}");
        }
    }
}
