//! Property tests of every parser that sees client input: offsets, query strings, broadcast
//! bodies, stream names, signed tokens, JWTs. Arbitrary input never panics, and what is
//! accepted is sound.
//!
//! Broadcast bodies are generated from a model (`Body`): the generator knows what each body
//! means, so the property checks the parser's answer against that meaning, not only that it
//! did not panic. The model reaches the corners serde_json's `RawValue` does not check (lone
//! surrogate escapes, nesting depth) and the ones it does (broken escapes, raw control
//! characters, invalid numbers), plus escapes of every kind, huge numbers, whitespace between
//! every token, a BOM, duplicate keys and every JSON type as `data`. `generator_reaches_*`
//! checks that it does.
//!
//! Bounded (PROPTEST_CASES, default 2000 per property) so CI time stays small.

use std::collections::BTreeMap;

use anycable_ds::auth::{sign_stream, verify_jwt, verify_signed_stream};
use anycable_ds::ingest::{self, MAX_DEPTH};
use anycable_ds::offset::{Epoch, InvalidOffset, Offset, Position};
use anycable_ds::query::{self, QueryError};
use anycable_ds::streams::{stream_from_path, validate_stream_name};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::Value;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    ProptestConfig { cases, ..ProptestConfig::default() }
}

// ------------------------------------------------------------------------------------------
// The model of a broadcast body.

/// One piece of a JSON string literal, as written in the JSON text.
#[derive(Debug, Clone)]
enum Piece {
    /// Written as itself: never `"`, `\` or a control character below U+0020.
    Raw(char),
    /// A two-character escape and the character it stands for.
    Short(&'static str, char),
    /// `\uXXXX` of a character outside the surrogate range (U+0000 included), hex in upper case
    /// or not.
    Unicode(char, bool),
    /// A character beyond U+FFFF as a surrogate pair (`\ud83d\ude00`).
    Pair(char, bool),
    /// Lone surrogate escapes, written so that no neighbour can complete them into a pair:
    /// no character, so nothing a message can hold.
    Lone(String),
    /// Not JSON: `\x`, a `\u` cut short, a raw control character, ...
    Broken(String),
}

const SHORT: &[(&str, char)] = &[
    ("\\n", '\n'),
    ("\\\"", '"'),
    ("\\\\", '\\'),
    ("\\/", '/'),
    ("\\b", '\u{8}'),
    ("\\f", '\u{c}'),
    ("\\r", '\r'),
    ("\\t", '\t'),
];

/// A JSON string literal: its pieces and, maybe, a high surrogate escape right before the
/// closing quote.
#[derive(Debug, Clone)]
struct Str {
    pieces: Vec<Piece>,
    dangling_high: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Flaw {
    /// Lone surrogate: valid grammar, no Unicode text.
    Lone,
    /// Not JSON at all.
    Broken,
}

impl Str {
    fn plain(text: &str) -> Str {
        Str { pieces: text.chars().map(Piece::Raw).collect(), dangling_high: None }
    }

    fn flaw(&self) -> Option<Flaw> {
        let mut flaw = self.dangling_high.map(|_| Flaw::Lone);
        for piece in &self.pieces {
            match piece {
                Piece::Lone(_) => flaw = flaw.max(Some(Flaw::Lone)),
                Piece::Broken(_) => flaw = Some(Flaw::Broken),
                _ => {}
            }
        }
        flaw
    }

    /// The text the literal stands for, when it stands for one.
    fn decoded(&self) -> Option<String> {
        if self.flaw().is_some() {
            return None;
        }
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Raw(c) | Piece::Short(_, c) | Piece::Unicode(c, _) | Piece::Pair(c, _) => out.push(*c),
                Piece::Lone(_) | Piece::Broken(_) => unreachable!(),
            }
        }
        Some(out)
    }

    fn render(&self, out: &mut String) {
        out.push('"');
        for piece in &self.pieces {
            match piece {
                Piece::Raw(c) => out.push(*c),
                Piece::Short(text, _) => out.push_str(text),
                Piece::Unicode(c, upper) => push_unit(out, *c as u32 as u16, *upper),
                Piece::Pair(c, upper) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        push_unit(out, *unit, *upper);
                    }
                }
                Piece::Lone(text) | Piece::Broken(text) => out.push_str(text),
            }
        }
        if let Some(high) = self.dangling_high {
            push_unit(out, high, false);
        }
        out.push('"');
    }
}

fn push_unit(out: &mut String, unit: u16, upper: bool) {
    if upper {
        out.push_str(&format!("\\u{unit:04X}"));
    } else {
        out.push_str(&format!("\\u{unit:04x}"));
    }
}

/// A string literal for `text` with every character written in a randomly chosen valid way.
fn literal(text: &str, seed: u64) -> Str {
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let pieces = text
        .chars()
        .map(|c| {
            let roll = next() % 4;
            let upper = next() % 2 == 0;
            let short = SHORT.iter().find(|(_, s)| *s == c).map(|(text, _)| *text);
            match (roll, short) {
                (0, Some(text)) => Piece::Short(text, c),
                _ if c == '"' || c == '\\' || (c as u32) < 0x20 || roll == 1 => {
                    if (c as u32) > 0xFFFF {
                        Piece::Pair(c, upper)
                    } else {
                        Piece::Unicode(c, upper)
                    }
                }
                _ => Piece::Raw(c),
            }
        })
        .collect();
    Str { pieces, dangling_high: None }
}

/// A JSON value as the publisher wrote it.
#[derive(Debug, Clone)]
enum Json {
    Null,
    Bool(bool),
    /// A number literal; `false` when it is not a valid JSON number.
    Num(String, bool),
    Str(Str),
    Arr(Vec<Json>),
    Obj(Vec<(Str, Json)>),
    /// `depth` arrays (or single-key objects) around `inner`.
    Nest {
        depth: usize,
        objects: bool,
        inner: Box<Json>,
    },
}

impl Json {
    fn flaw(&self) -> Option<Flaw> {
        match self {
            Json::Null | Json::Bool(_) => None,
            Json::Num(_, valid) => (!valid).then_some(Flaw::Broken),
            Json::Str(s) => s.flaw(),
            Json::Arr(items) => items.iter().filter_map(Json::flaw).max(),
            Json::Obj(entries) => entries.iter().flat_map(|(k, v)| [k.flaw(), v.flaw()]).flatten().max(),
            Json::Nest { inner, .. } => inner.flaw(),
        }
    }

    fn depth(&self) -> usize {
        match self {
            Json::Null | Json::Bool(_) | Json::Num(..) | Json::Str(_) => 0,
            Json::Arr(items) => 1 + items.iter().map(Json::depth).max().unwrap_or(0),
            Json::Obj(entries) => 1 + entries.iter().map(|(_, v)| v.depth()).max().unwrap_or(0),
            Json::Nest { depth, inner, .. } => depth + inner.depth(),
        }
    }

    /// What the publisher meant, as a `serde_json::Value`, when one can hold it (not for
    /// numbers out of f64's range, nor beyond serde_json's depth limit).
    fn value(&self) -> Option<Value> {
        if self.flaw().is_some() || self.depth() > 120 {
            return None;
        }
        Some(match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Num(text, _) => serde_json::from_str(text).ok()?,
            Json::Str(s) => Value::String(s.decoded()?),
            Json::Arr(items) => Value::Array(items.iter().map(Json::value).collect::<Option<_>>()?),
            Json::Obj(entries) => {
                let mut map = serde_json::Map::new();
                for (key, value) in entries {
                    map.insert(key.decoded()?, value.value()?); // a repeated key: the last wins
                }
                Value::Object(map)
            }
            Json::Nest { depth, objects, inner } => {
                let mut value = inner.value()?;
                for _ in 0..*depth {
                    value = if *objects { serde_json::json!({ "k": value }) } else { Value::Array(vec![value]) };
                }
                value
            }
        })
    }

    fn render(&self, out: &mut String, ws: &mut Ws) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Num(text, _) => out.push_str(text),
            Json::Str(s) => s.render(out),
            Json::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    ws.push(out);
                    item.render(out, ws);
                    ws.push(out);
                }
                out.push(']');
            }
            Json::Obj(entries) => {
                out.push('{');
                for (i, (key, value)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    ws.push(out);
                    key.render(out);
                    ws.push(out);
                    out.push(':');
                    ws.push(out);
                    value.render(out, ws);
                    ws.push(out);
                }
                out.push('}');
            }
            Json::Nest { depth, objects, inner } => {
                for _ in 0..*depth {
                    out.push_str(if *objects { "{\"k\":" } else { "[" });
                    ws.push(out);
                }
                inner.render(out, ws);
                for _ in 0..*depth {
                    ws.push(out);
                    out.push(if *objects { '}' } else { ']' });
                }
            }
        }
    }

    fn text(&self, ws: &mut Ws) -> String {
        let mut out = String::new();
        self.render(&mut out, ws);
        out
    }

    fn compact(&self) -> String {
        self.text(&mut Ws::none())
    }
}

/// The whitespace put between tokens, in turn.
#[derive(Debug, Clone)]
struct Ws {
    choices: Vec<&'static str>,
    next: usize,
}

impl Ws {
    fn none() -> Ws {
        Ws { choices: vec![""], next: 0 }
    }

    fn push(&mut self, out: &mut String) {
        out.push_str(self.choices[self.next % self.choices.len()]);
        self.next += 1;
    }
}

/// What a key of an item holds.
#[derive(Debug, Clone)]
enum Field {
    Absent,
    Null,
    Value(Json),
}

#[derive(Debug, Clone)]
enum Data {
    Absent,
    Null,
    /// Any JSON value; a string is AnyCable's "string holding JSON text" (or plain text).
    Value(Json),
    /// A string holding this JSON text, written with this whitespace and random escapes.
    Text(Json, u64, Ws),
}

#[derive(Debug, Clone)]
enum Meta {
    Absent,
    Null,
    /// An object with `transient` (any value, usually a boolean) and other keys.
    Object(Option<Json>, Vec<(Str, Json)>),
    NotObject(Json),
}

#[derive(Debug, Clone)]
struct Item {
    stream: Field,
    data: Data,
    meta: Meta,
    /// Keys the server ignores, named `x-...` so that they never decode to a known key.
    extras: Vec<(Str, Json)>,
    /// Write one known key twice.
    duplicate: Option<usize>,
    /// Order of the keys and how their names are escaped.
    seed: u64,
}

#[derive(Debug, Clone)]
enum Element {
    Item(Item),
    /// Not an object (never `{`-shaped): refused as a batch element.
    Other(Json),
}

#[derive(Debug, Clone)]
struct Body {
    elements: Vec<Element>,
    array: bool,
    bom: bool,
    /// Text after the value.
    trailing: Option<&'static str>,
    /// A character that is not JSON whitespace, where whitespace may go.
    bad_ws: Option<&'static str>,
    ws: Ws,
}

/// What one accepted message must be.
#[derive(Debug)]
struct Message {
    stream: String,
    transient: bool,
    /// The exact stored text, when the model knows it.
    json: Option<String>,
    /// What the publisher meant, when a `Value` can hold it.
    value: Option<Value>,
    /// A `data` string of arbitrary text: its decoded text and the literal as written, judged
    /// by serde_json in `check_body`.
    text: Option<(String, String)>,
    /// The parser may refuse the body for this message's `data` instead.
    refusable: bool,
}

#[derive(Debug)]
enum Expect {
    Accepted(Vec<Message>),
    /// The JSON grammar is broken somewhere: refused, with some message.
    Malformed,
    /// Refused for element `index`: the message contains every needle of one of `reasons`
    /// (an element with several problems may be refused for any of them; an empty list of
    /// needles accepts any message).
    Refused {
        index: usize,
        reasons: Vec<Vec<String>>,
    },
}

fn needles(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

impl Item {
    /// The keys of the item in writing order, as (name, value text).
    fn render(&self, out: &mut String, ws: &mut Ws) {
        let mut entries: Vec<(Str, String)> = Vec::new();
        let mut rng = self.seed | 1;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        match &self.stream {
            Field::Absent => {}
            Field::Null => entries.push((literal("stream", next()), "null".into())),
            Field::Value(json) => entries.push((literal("stream", next()), json.text(ws))),
        }
        match &self.data {
            Data::Absent => {}
            Data::Null => entries.push((literal("data", next()), "null".into())),
            Data::Value(json) => entries.push((literal("data", next()), json.text(ws))),
            Data::Text(json, seed, inner_ws) => {
                let mut text = String::new();
                literal(&json.text(&mut inner_ws.clone()), *seed).render(&mut text);
                entries.push((literal("data", next()), text));
            }
        }
        match &self.meta {
            Meta::Absent => {}
            Meta::Null => entries.push((literal("meta", next()), "null".into())),
            Meta::NotObject(json) => entries.push((literal("meta", next()), json.text(ws))),
            Meta::Object(transient, extras) => {
                let mut fields: Vec<(Str, Json)> = extras.clone();
                if let Some(value) = transient {
                    fields.insert(next() as usize % (fields.len() + 1), (literal("transient", next()), value.clone()));
                }
                entries.push((literal("meta", next()), Json::Obj(fields).text(ws)));
            }
        }
        if let Some(which) = self.duplicate {
            if !entries.is_empty() {
                let copy = entries[which % entries.len()].clone();
                entries.push(copy);
            }
        }
        for (key, value) in &self.extras {
            entries.push((key.clone(), value.text(ws)));
        }
        // Shuffle (Fisher-Yates with the item's seed).
        for i in (1..entries.len()).rev() {
            entries.swap(i, next() as usize % (i + 1));
        }
        out.push('{');
        for (i, (key, value)) in entries.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            ws.push(out);
            key.render(out);
            ws.push(out);
            out.push(':');
            ws.push(out);
            out.push_str(value);
            ws.push(out);
        }
        out.push('}');
    }

    fn broken(&self) -> bool {
        let field = |f: &Field| matches!(f, Field::Value(json) if json.flaw() == Some(Flaw::Broken));
        let data = match &self.data {
            Data::Value(json) => json.flaw() == Some(Flaw::Broken),
            _ => false, // Text: the text is inside a valid string literal
        };
        let meta = match &self.meta {
            Meta::Object(transient, extras) => {
                transient.as_ref().is_some_and(|t| t.flaw() == Some(Flaw::Broken))
                    || extras.iter().any(|(k, v)| k.flaw() == Some(Flaw::Broken) || v.flaw() == Some(Flaw::Broken))
            }
            Meta::NotObject(json) => json.flaw() == Some(Flaw::Broken),
            _ => false,
        };
        let extras = self.extras.iter().any(|(k, v)| k.flaw() == Some(Flaw::Broken) || v.flaw() == Some(Flaw::Broken));
        field(&self.stream) || data || meta || extras
    }

    /// Every reason to refuse this item (empty: it is accepted as `Message`).
    fn expect(&self) -> Result<Message, Vec<Vec<String>>> {
        let mut reasons: Vec<Vec<String>> = Vec::new();
        if self.duplicate.is_some() && self.known_keys() > 0 {
            reasons.push(needles(&["duplicate field"]));
        }
        if self.extras.iter().any(|(k, _)| k.flaw().is_some()) {
            reasons.push(vec![]); // serde_json's own words about the key
        }
        let stream = match &self.stream {
            Field::Absent | Field::Null | Field::Value(Json::Null) => {
                reasons.push(needles(&["missing \"stream\""]));
                None
            }
            Field::Value(Json::Str(s)) => match s.decoded() {
                None => {
                    reasons.push(needles(&["\"stream\" holds an invalid \\u escape (lone surrogate)"]));
                    None
                }
                Some(name) if name.is_empty() => {
                    reasons.push(needles(&["\"stream\" must not be empty"]));
                    None
                }
                Some(name) if name.len() > 1024 => {
                    reasons.push(needles(&["\"stream\"", "longer than 1024 bytes"]));
                    None
                }
                Some(name) if name.chars().any(char::is_control) => {
                    reasons.push(needles(&["\"stream\"", "control characters"]));
                    None
                }
                Some(name) => Some(name),
            },
            Field::Value(_) => {
                reasons.push(needles(&["\"stream\" must be a string"]));
                None
            }
        };
        let lone = "holds an invalid \\u escape (lone surrogate)";
        let deep = format!("nests deeper than {MAX_DEPTH} levels");
        let mut message =
            Message { stream: String::new(), transient: false, json: None, value: None, text: None, refusable: false };
        match &self.data {
            Data::Absent | Data::Null | Data::Value(Json::Null) => reasons.push(needles(&["missing \"data\""])),
            Data::Value(Json::Str(s)) => match s.decoded() {
                None => reasons.push(vec!["\"data\" ".to_string() + lone]),
                Some(text) => {
                    let mut written = String::new();
                    s.render(&mut written);
                    // Grammatical JSON text that serde_json cannot hold may be refused (a lone
                    // surrogate or deep nesting in it) or stored (a huge number).
                    message.refusable = serde_json::from_str::<&serde_json::value::RawValue>(&text).is_ok()
                        && serde_json::from_str::<Value>(&text).is_err();
                    message.text = Some((text, written));
                }
            },
            Data::Value(json) => {
                if json.flaw() == Some(Flaw::Lone) {
                    reasons.push(vec!["\"data\" ".to_string() + lone]);
                }
                if json.depth() > MAX_DEPTH {
                    reasons.push(vec!["\"data\" ".to_string() + &deep]);
                }
                message.json = Some(json.compact());
                message.value = json.value();
            }
            Data::Text(json, seed, inner_ws) => match json.flaw() {
                // Not JSON: the message is the string itself, as written.
                Some(Flaw::Broken) => {
                    let text = json.text(&mut inner_ws.clone());
                    let mut written = String::new();
                    literal(&text, *seed).render(&mut written);
                    message.json = Some(written);
                    message.value = Some(Value::String(text));
                }
                flaw => {
                    if flaw == Some(Flaw::Lone) {
                        reasons
                            .push(needles(&["\"data\" holds JSON text with an invalid \\u escape (lone surrogate)"]));
                    }
                    if json.depth() > MAX_DEPTH {
                        reasons.push(vec![format!("\"data\" holds JSON text nested deeper than {MAX_DEPTH} levels")]);
                    }
                    message.json = Some(json.compact());
                    message.value = json.value();
                }
            },
        }
        match &self.meta {
            Meta::Absent | Meta::Null => {}
            Meta::NotObject(json) => {
                reasons.push(needles(&["\"meta\" must be an object"]));
                if json.flaw() == Some(Flaw::Lone) {
                    reasons.push(vec!["\"meta\" ".to_string() + lone]);
                }
            }
            Meta::Object(transient, extras) => {
                let lone_inside = transient.as_ref().is_some_and(|t| t.flaw() == Some(Flaw::Lone))
                    || extras.iter().any(|(k, v)| k.flaw() == Some(Flaw::Lone) || v.flaw() == Some(Flaw::Lone));
                if lone_inside {
                    reasons.push(vec!["\"meta\" ".to_string() + lone]);
                }
                match transient {
                    None | Some(Json::Null) => {}
                    Some(Json::Bool(b)) => message.transient = *b,
                    Some(_) => reasons.push(needles(&["\"meta.transient\" must be true or false"])),
                }
            }
        }
        match stream {
            Some(stream) if reasons.is_empty() => Ok(Message { stream, ..message }),
            _ => Err(reasons),
        }
    }

    fn known_keys(&self) -> usize {
        [!matches!(self.stream, Field::Absent), !matches!(self.data, Data::Absent), !matches!(self.meta, Meta::Absent)]
            .into_iter()
            .filter(|present| *present)
            .count()
    }
}

impl Body {
    fn render(&self) -> String {
        let mut ws = self.ws.clone();
        let mut out = String::new();
        if self.bom {
            out.push('\u{feff}');
        }
        ws.push(&mut out);
        let mut elements = String::new();
        for (i, element) in self.elements.iter().enumerate() {
            if i > 0 {
                elements.push(',');
            }
            ws.push(&mut elements);
            match element {
                Element::Item(item) => item.render(&mut elements, &mut ws),
                Element::Other(json) => json.render(&mut elements, &mut ws),
            }
            ws.push(&mut elements);
        }
        if self.array {
            out.push('[');
            out.push_str(&elements);
            out.push(']');
        } else {
            out.push_str(&elements);
        }
        if let Some(bad) = self.bad_ws {
            let at = out.find(['[', '{', ':', ',']).map_or(0, |i| i + 1);
            out.insert_str(at, bad);
        }
        ws.push(&mut out);
        if let Some(trailing) = self.trailing {
            out.push_str(trailing);
        }
        out
    }

    fn expect(&self) -> Expect {
        let broken = self.elements.iter().any(|e| match e {
            Element::Item(item) => item.broken(),
            Element::Other(json) => json.flaw() == Some(Flaw::Broken),
        });
        if self.bom || self.trailing.is_some() || self.bad_ws.is_some() || broken {
            return Expect::Malformed;
        }
        if self.elements.is_empty() {
            return Expect::Refused { index: 0, reasons: vec![needles(&["empty batch"])] };
        }
        let mut messages = Vec::new();
        for (index, element) in self.elements.iter().enumerate() {
            match element {
                Element::Other(_) => {
                    return Expect::Refused { index, reasons: vec![needles(&["must be an object"])] };
                }
                Element::Item(item) => match item.expect() {
                    Ok(message) => messages.push(message),
                    Err(reasons) => return Expect::Refused { index, reasons },
                },
            }
        }
        Expect::Accepted(messages)
    }
}

// ------------------------------------------------------------------------------------------
// Generators.

fn raw_char() -> impl Strategy<Value = char> {
    prop_oneof![
        // Not a quote, backslash or control character: those move up by 0x100 (no rejects).
        4 => any::<char>().prop_map(|c| match c {
            '"' | '\\' | '\0'..='\u{1f}' => char::from_u32(c as u32 + 0x100).unwrap(),
            c => c,
        }),
        1 => prop::sample::select(vec!['é', '😀', '\u{2028}', '\u{feff}', '\u{7f}', '\u{85}', ' ', '/', '\'', '[', '{', 'x']),
    ]
}

fn clean_piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        6 => raw_char().prop_map(Piece::Raw),
        2 => prop::sample::select(SHORT).prop_map(|(text, c)| Piece::Short(text, c)),
        2 => (prop_oneof![0u32..0x80, 0x80u32..0xD800, 0xE000u32..=0xFFFF], any::<bool>())
            .prop_map(|(u, upper)| Piece::Unicode(char::from_u32(u).unwrap(), upper)),
        1 => (0x10000u32..=0x10FFFF, any::<bool>()).prop_map(|(u, upper)| Piece::Pair(char::from_u32(u).unwrap(), upper)),
    ]
}

fn lone_piece() -> impl Strategy<Value = Piece> {
    let high = 0xD800u16..=0xDBFF;
    let low = 0xDC00u16..=0xDFFF;
    prop_oneof![
        low.clone().prop_map(|l| format!("\\u{l:04x}")),
        Just("\\udead".to_string()),
        (high.clone(), prop::sample::select(vec!["x", "\\u0041", "\\n", "\\ud800x", "\\uDBFFé"]))
            .prop_map(|(h, after)| format!("\\u{h:04X}{after}")),
        (low, high).prop_map(|(l, h)| format!("\\u{l:04x}\\u{h:04x}!")),
    ]
    .prop_map(Piece::Lone)
}

fn broken_piece() -> impl Strategy<Value = Piece> {
    prop::sample::select(vec![
        "\\x", "\\u12G", "\\u12\"", "\\uZZZZ", "\\U0041", "\\'", "\\a", "\\0", "\u{0}", "\u{1}", "\n", "\t", "\u{1f}",
        "\r",
    ])
    .prop_map(|s| Piece::Broken(s.to_string()))
}

fn any_piece() -> impl Strategy<Value = Piece> {
    prop_oneof![8 => clean_piece(), 2 => lone_piece(), 1 => broken_piece()]
}

fn string() -> impl Strategy<Value = Str> {
    prop_oneof![
        10 => prop::collection::vec(clean_piece(), 0..6).prop_map(|pieces| Str { pieces, dangling_high: None }),
        2 => (prop::collection::vec(any_piece(), 1..6), prop::option::weighted(0.2, 0xD800u16..=0xDBFF))
            .prop_map(|(pieces, dangling_high)| Str { pieces, dangling_high }),
    ]
}

const NUMBERS: &[&str] = &[
    "0",
    "-0",
    "1",
    "-1",
    "2.50",
    "1e400",
    "-1e400",
    "1E-400",
    "1e-400",
    "123456789012345678901234567890",
    "-123456789012345678901234567890",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775809",
    "1E+2",
    "6.02214076e23",
    "0.1e-5",
];
const BAD_NUMBERS: &[&str] = &["01", "+1", ".5", "1.", "-", "1e", "0x10", "NaN", "Infinity", "1_000", "--1"];

fn number() -> impl Strategy<Value = Json> {
    prop_oneof![
        4 => prop::sample::select(NUMBERS).prop_map(|n| Json::Num(n.to_string(), true)),
        2 => any::<i64>().prop_map(|n| Json::Num(n.to_string(), true)),
        2 => any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| Json::Num(format!("{f:?}"), true)),
        1 => prop::sample::select(BAD_NUMBERS).prop_map(|n| Json::Num(n.to_string(), false)),
    ]
}

fn json() -> impl Strategy<Value = Json> {
    let leaf =
        prop_oneof![Just(Json::Null), any::<bool>().prop_map(Json::Bool), number(), string().prop_map(Json::Str),];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Arr),
            prop::collection::vec((string(), inner), 0..4).prop_map(Json::Obj),
        ]
    })
}

/// JSON, sometimes nested around the edges of the depth limit and far beyond it.
fn deep_json() -> impl Strategy<Value = Json> {
    let depths = vec![1, 2, MAX_DEPTH - 2, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 127, 128, 200, 20_000];
    prop_oneof![
        4 => json(),
        1 => (prop::sample::select(depths), any::<bool>(), json())
            .prop_map(|(depth, objects, inner)| Json::Nest { depth, objects, inner: Box::new(inner) }),
    ]
}

fn stream_field() -> impl Strategy<Value = Field> {
    prop_oneof![
        40 => ("[a-z0-9:/_-]{1,12}", any::<u64>()).prop_map(|(name, seed)| Field::Value(Json::Str(literal(&name, seed)))),
        6 => string().prop_map(|s| Field::Value(Json::Str(s))),
        1 => Just(Field::Value(Json::Str(Str::plain(&"n".repeat(1025))))),
        1 => json().prop_map(Field::Value),
        1 => Just(Field::Absent),
        1 => Just(Field::Null),
    ]
}

fn data_field() -> impl Strategy<Value = Data> {
    prop_oneof![
        12 => (deep_json(), any::<u64>(), whitespace()).prop_map(|(json, seed, ws)| Data::Text(json, seed, ws)),
        12 => deep_json().prop_map(Data::Value),
        4 => prop_oneof![any::<bool>().prop_map(Json::Bool), number(), string().prop_map(Json::Str)].prop_map(Data::Value),
        1 => Just(Data::Absent),
        1 => Just(Data::Null),
    ]
}

fn extra_key() -> impl Strategy<Value = Str> {
    string().prop_map(|mut s| {
        s.pieces.insert(0, Piece::Raw('x'));
        s.pieces.insert(1, Piece::Raw('-'));
        s
    })
}

fn meta_field() -> impl Strategy<Value = Meta> {
    let transient = prop_oneof![
        20 => any::<bool>().prop_map(Json::Bool),
        1 => Just(Json::Null),
        1 => json(),
    ];
    prop_oneof![
        3 => Just(Meta::Absent),
        1 => Just(Meta::Null),
        6 => (prop::option::of(transient), prop::collection::vec((extra_key(), json()), 0..2))
            .prop_map(|(t, extras)| Meta::Object(t, extras)),
        1 => prop_oneof![number(), string().prop_map(Json::Str), Just(Json::Bool(true)), Just(Json::Arr(vec![]))]
            .prop_map(Meta::NotObject),
    ]
}

fn item() -> impl Strategy<Value = Item> {
    (
        stream_field(),
        data_field(),
        meta_field(),
        prop::collection::vec((extra_key(), deep_json()), 0..2),
        prop::option::weighted(0.05, any::<usize>()),
        any::<u64>(),
    )
        .prop_map(|(stream, data, meta, extras, duplicate, seed)| Item {
            stream,
            data,
            meta,
            extras,
            duplicate,
            seed,
        })
}

fn body() -> impl Strategy<Value = Body> {
    let element = prop_oneof![
        20 => item().prop_map(Element::Item),
        1 => prop_oneof![number(), string().prop_map(Json::Str), Just(Json::Null), Just(Json::Arr(vec![]))]
            .prop_map(Element::Other),
    ];
    (
        prop_oneof![
            12 => item().prop_map(|item| (vec![Element::Item(item)], false)),
            8 => prop::collection::vec(element, 1..4).prop_map(|elements| (elements, true)),
            1 => Just((vec![], true)),
        ],
        prop::bool::weighted(0.02),
        prop::option::weighted(0.02, prop::sample::select(vec!["x", "}", ",", "{}", "[]", "\"\""])),
        prop::option::weighted(
            0.02,
            prop::sample::select(vec!["\u{a0}", "\u{b}", "\u{c}", "\u{2028}", "\u{feff}", "\u{0}"]),
        ),
        whitespace(),
    )
        .prop_map(|((elements, array), bom, trailing, bad_ws, ws)| Body {
            elements,
            array,
            bom,
            trailing,
            bad_ws,
            ws,
        })
}

/// JSON whitespace between tokens: mostly none, sometimes every kind.
fn whitespace() -> impl Strategy<Value = Ws> {
    prop::collection::vec(prop::sample::select(vec!["", "", "", " ", "\n", "\t", "\r\n", " \n\t\r "]), 1..6)
        .prop_map(|choices| Ws { choices, next: 0 })
}

// ------------------------------------------------------------------------------------------
// Checks.

/// Whether JSON text has ASCII whitespace outside its strings.
fn has_insignificant_whitespace(json: &str) -> bool {
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        match (in_string, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (true, false, '"') => in_string = false,
            (false, _, '"') => in_string = true,
            (false, _, ' ' | '\n' | '\r' | '\t') => return true,
            _ => {}
        }
    }
    false
}

/// What every accepted message is, whatever the body: compact JSON that serde_json reads back
/// (a number beyond f64 is the only thing it may refuse), a valid stream name.
fn check_sound(stream: &str, json: &[u8]) -> Result<(), TestCaseError> {
    let text = std::str::from_utf8(json).map_err(|e| TestCaseError::fail(format!("not UTF-8: {e}")))?;
    prop_assert!(serde_json::from_str::<&serde_json::value::RawValue>(text).is_ok(), "not JSON: {}", text);
    prop_assert!(!has_insignificant_whitespace(text), "not compact: {}", text);
    if let Err(e) = serde_json::from_str::<Value>(text) {
        prop_assert!(e.to_string().contains("number out of range"), "{}: {}", e, text);
    }
    prop_assert!(validate_stream_name(stream).is_ok(), "{:?}", stream);
    Ok(())
}

fn check_body(body: &Body) -> Result<(), TestCaseError> {
    let text = body.render();
    let expect = body.expect();
    let result = ingest::parse(text.as_bytes());
    match (&expect, result) {
        (Expect::Accepted(messages), Ok(broadcast)) => {
            let stored: Vec<&Message> = messages.iter().filter(|m| !m.transient).collect();
            let transient: Vec<&Message> = messages.iter().filter(|m| m.transient).collect();
            prop_assert_eq!(stored.len(), broadcast.stored.len(), "{}", text);
            prop_assert_eq!(transient.len(), broadcast.transient.len(), "{}", text);
            let pairs = stored.iter().zip(&broadcast.stored).chain(transient.iter().zip(&broadcast.transient));
            for (expected, got) in pairs {
                check_sound(&got.stream, &got.json)?;
                let json = std::str::from_utf8(&got.json).unwrap();
                prop_assert_eq!(&*got.stream, expected.stream.as_str(), "{}", text);
                if let Some(exact) = &expected.json {
                    prop_assert_eq!(json, exact.as_str(), "body {}", text);
                }
                if let Some(value) = &expected.value {
                    prop_assert_eq!(&serde_json::from_str::<Value>(json).unwrap(), value, "body {}", text);
                }
                if let Some((decoded, written)) = &expected.text {
                    // AnyCable's rule, judged by serde_json: JSON text is the message; text
                    // that is not JSON at all is the message as a string, written as sent.
                    match serde_json::from_str::<Value>(decoded) {
                        Ok(value) => prop_assert_eq!(&serde_json::from_str::<Value>(json).unwrap(), &value),
                        Err(_) if serde_json::from_str::<&serde_json::value::RawValue>(decoded).is_err() => {
                            prop_assert_eq!(json, written.as_str());
                            prop_assert_eq!(
                                serde_json::from_str::<Value>(json).unwrap(),
                                Value::String(decoded.clone())
                            );
                        }
                        Err(_) => {} // grammatical but out of serde_json's range: soundness only
                    }
                }
            }
        }
        (Expect::Malformed, Err(e)) => prop_assert!(!e.0.is_empty()),
        (Expect::Refused { index, reasons }, Err(e)) => {
            let message = if body.array {
                let prefix = format!("message {index}: ");
                if !reasons.iter().any(|r| r.iter().any(|n| n.contains("empty batch"))) {
                    prop_assert!(e.0.starts_with(&prefix), "{:?} should start with {:?}; body {}", e.0, prefix, text);
                }
                e.0.strip_prefix(&prefix).unwrap_or(&e.0).to_string()
            } else {
                e.0.clone()
            };
            prop_assert!(!message.is_empty());
            prop_assert!(
                reasons.iter().any(|needles| needles.iter().all(|n| message.contains(n.as_str()))),
                "{:?} is none of {:?}; body {}",
                e.0,
                reasons,
                text
            );
        }
        (Expect::Accepted(messages), Err(e)) if messages.iter().any(|m| m.refusable) => {
            prop_assert!(e.0.contains("\"data\" holds JSON text"), "{}: {}", e, text);
        }
        (Expect::Accepted(_), Err(e)) => prop_assert!(false, "refused ({}), expected it accepted: {}", e, text),
        (_, Ok(b)) => {
            prop_assert!(false, "accepted {:?}, expected {:?}: {}", b.stored.first().map(|m| &m.json), expect, text)
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// The model's verdict and the parser's agree: accepted bodies give exactly the messages
    /// the publisher meant, refused ones say why. Never a panic, whatever the body.
    #[test]
    fn broadcast_bodies_mean_what_the_publisher_meant(body in body()) {
        check_body(&body)?;
    }
}

/// The generator reaches every corner it is meant to, and gives both verdicts often enough.
#[test]
fn generator_reaches_the_hostile_corners() {
    let mut runner = TestRunner::deterministic();
    let strategy = body();
    let mut seen: BTreeMap<&'static str, usize> = BTreeMap::new();
    for _ in 0..3000 {
        let body = strategy.new_tree(&mut runner).unwrap().current();
        let text = body.render();
        let expect = body.expect();
        let verdict = match (&expect, ingest::parse(text.as_bytes())) {
            (Expect::Accepted(_), Ok(_)) => "accepted",
            (Expect::Malformed, Err(_)) => "malformed",
            (Expect::Refused { .. }, Err(_)) => "refused",
            _ => "disagreement",
        };
        *seen.entry(verdict).or_default() += 1;
        let mut tag = |name: &'static str, on: bool| {
            if on {
                *seen.entry(name).or_default() += 1;
            }
        };
        let accepted = verdict == "accepted";
        tag("bom", body.bom);
        tag("bad whitespace", body.bad_ws.is_some());
        tag("trailing text", body.trailing.is_some());
        tag("empty batch", body.array && body.elements.is_empty());
        tag("whitespace", text.contains(['\n', '\t', '\r']));
        for element in &body.elements {
            let Element::Item(item) = element else {
                tag("non-object element", true);
                continue;
            };
            tag("duplicate key", item.duplicate.is_some());
            if let Some((data, inner)) = match &item.data {
                Data::Value(json) => Some((json, false)),
                Data::Text(json, ..) => Some((json, true)),
                _ => None,
            } {
                let lone = data.flaw() == Some(Flaw::Lone);
                tag("data: lone surrogate", lone && !inner);
                tag("data: JSON text with a lone surrogate", lone && inner);
                tag("data: broken escape or number", data.flaw() == Some(Flaw::Broken));
                tag("data: deeper than the limit", data.depth() > MAX_DEPTH);
                tag("data: accepted at the depth limit", accepted && data.depth() == MAX_DEPTH);
                let text = data.compact();
                tag("data: accepted huge number", accepted && (text.contains("e400") || text.contains("7890")));
                tag("data: accepted surrogate pair", accepted && text.to_lowercase().contains("\\ud"));
                let kind = match data {
                    Json::Null => "data: null (refused)",
                    Json::Bool(_) => "data: boolean",
                    Json::Num(..) => "data: number",
                    Json::Str(_) => "data: string",
                    Json::Arr(_) | Json::Nest { objects: false, .. } => "data: array",
                    Json::Obj(_) | Json::Nest { objects: true, .. } => "data: object",
                };
                tag(kind, (accepted || matches!(data, Json::Null)) && !inner);
                tag("data: JSON text", accepted && inner);
            }
            if let Field::Value(Json::Str(s)) = &item.stream {
                tag("stream: lone surrogate", s.flaw() == Some(Flaw::Lone));
                tag(
                    "stream: raw control character",
                    s.pieces.iter().any(|p| matches!(p, Piece::Broken(b) if b.len() == 1)),
                );
            }
            if let Meta::Object(transient, extras) = &item.meta {
                tag(
                    "meta: lone surrogate",
                    extras.iter().any(|(k, v)| k.flaw() == Some(Flaw::Lone) || v.flaw() == Some(Flaw::Lone)),
                );
                tag("meta: transient accepted", accepted && matches!(transient, Some(Json::Bool(true))));
            }
        }
    }
    eprintln!("{seen:#?}");
    assert_eq!(seen.get("disagreement"), None, "see broadcast_bodies_mean_what_the_publisher_meant");
    for (corner, at_least) in [
        ("accepted", 600),
        ("refused", 300),
        ("malformed", 300),
        ("bom", 20),
        ("bad whitespace", 20),
        ("trailing text", 20),
        ("empty batch", 20),
        ("whitespace", 1000),
        ("non-object element", 20),
        ("duplicate key", 20),
        ("data: lone surrogate", 50),
        ("data: JSON text with a lone surrogate", 50),
        ("data: broken escape or number", 50),
        ("data: deeper than the limit", 50),
        ("data: accepted at the depth limit", 5),
        ("data: accepted huge number", 20),
        ("data: accepted surrogate pair", 20),
        ("data: null (refused)", 5),
        ("data: boolean", 5),
        ("data: number", 5),
        ("data: string", 5),
        ("data: array", 5),
        ("data: object", 5),
        ("data: JSON text", 100),
        ("stream: lone surrogate", 20),
        ("stream: raw control character", 5),
        ("meta: lone surrogate", 10),
        ("meta: transient accepted", 20),
    ] {
        let count = seen.get(corner).copied().unwrap_or(0);
        assert!(count >= at_least, "{corner}: {count} of 3000 bodies, want at least {at_least}");
    }
}

/// Bodies the model once got wrong or that are worth keeping as fixed examples.
#[test]
fn model_examples() {
    let lone = Str { pieces: vec![Piece::Lone("\\udead".into())], dangling_high: None };
    let item = |data: Data| Item {
        stream: Field::Value(Json::Str(Str::plain("s"))),
        data,
        meta: Meta::Absent,
        extras: vec![],
        duplicate: None,
        seed: 1,
    };
    let body = |items: Vec<Item>, array: bool| Body {
        elements: items.into_iter().map(Element::Item).collect(),
        array,
        bom: false,
        trailing: None,
        bad_ws: None,
        ws: Ws { choices: vec![" ", "\n"], next: 0 },
    };
    let cases = [
        body(vec![item(Data::Value(Json::Str(lone.clone())))], false),
        body(vec![item(Data::Value(Json::Num("1".into(), true))), item(Data::Value(Json::Str(lone.clone())))], true),
        body(vec![item(Data::Text(Json::Arr(vec![Json::Str(lone.clone())]), 7, Ws::none()))], false),
        body(vec![item(Data::Text(Json::Num("1e400".into(), true), 7, Ws::none()))], false),
        body(vec![item(Data::Text(Json::Num("01".into(), false), 7, Ws { choices: vec![" "], next: 0 }))], false),
        body(
            vec![item(Data::Value(Json::Nest { depth: 100_000, objects: false, inner: Box::new(Json::Null) }))],
            false,
        ),
    ];
    for case in &cases {
        check_body(case).unwrap();
    }
}

// ------------------------------------------------------------------------------------------
// Other parsers.

/// JSON-ish text: a mix of structure characters and arbitrary strings, so the parser sees
/// both near-valid and garbage bodies.
fn jsonish() -> impl Strategy<Value = String> {
    let atom = prop_oneof![
        Just("{".to_string()),
        Just("}".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just(",".to_string()),
        Just(":".to_string()),
        Just("\"stream\"".to_string()),
        Just("\"data\"".to_string()),
        Just("\"meta\"".to_string()),
        Just("{\"transient\":true}".to_string()),
        Just("null".to_string()),
        Just("12345678901234567890".to_string()),
        Just("\"\\udead\"".to_string()),
        Just("\"\\ud83d\\ude00\"".to_string()),
        Just("\"\\\\udead\"".to_string()),
        Just("\"\\u12\"".to_string()),
        any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
        "[ \\t\\n]{0,3}",
        any::<String>(),
    ];
    proptest::collection::vec(atom, 0..24).prop_map(|parts| parts.concat())
}

/// Characters that make query strings interesting.
fn query_text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            4 => "[a-z0-9_.~-]{1,4}",
            1 => prop::sample::select(vec!["%", "%2", "%zz", "%FF", "%C3", "%C3%A9", "%E2%9C%93", "%00", "%25", "%2B", "%26", "%3D", "%20", "+", "&", "&&", "=", "==", "é", " "]).prop_map(str::to_string),
            1 => prop::sample::select(vec!["offset", "live", "cursor", "signed", "jid", "offset=", "offset=-1", "live=sse"]).prop_map(str::to_string),
        ],
        0..24,
    )
    .prop_map(|parts| parts.concat())
}

const SINGLE: &[&str] = &["offset", "live", "cursor"];

/// `application/x-www-form-urlencoded`, with `+` or `%20` for spaces.
fn form_encode(pairs: &[(String, String)], plus: bool) -> String {
    const SET: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');
    let encode = |s: &str| {
        let encoded = percent_encoding::utf8_percent_encode(s, SET).to_string();
        if plus {
            encoded.replace("%20", "+")
        } else {
            encoded
        }
    };
    pairs.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect::<Vec<_>>().join("&")
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn offsets_never_panic_and_tokens_round_trip(raw in any::<String>(), seq in any::<u64>()) {
        match Offset::parse(Some(&raw)) {
            Ok(Offset::Start) => prop_assert!(raw == "-1" || raw == "0"),
            Ok(Offset::Now) => prop_assert_eq!(raw.as_str(), "now"),
            Ok(Offset::At(position)) => prop_assert_eq!(position.token(), raw),
            Err(InvalidOffset::Empty) => prop_assert!(raw.is_empty()),
            Err(InvalidOffset::Malformed) => prop_assert!(!raw.is_empty()),
        }
        let position = Position { epoch: Epoch::random(), seq };
        prop_assert_eq!(Offset::parse(Some(&position.token())), Ok(Offset::At(position)));
    }

    /// Form-encoded pairs decode to themselves; only a repeated `single` name is refused.
    #[test]
    fn query_strings_decode_what_was_encoded(
        pairs in prop::collection::vec(
            (prop_oneof![prop::sample::select(vec!["offset", "live", "cursor", "signed", "jid", "x", ""]).prop_map(str::to_string), any::<String>()], any::<String>()),
            0..6,
        ),
        plus in any::<bool>(),
    ) {
        let raw = form_encode(&pairs, plus);
        // The first occurrence, in order, of a `single` name seen before.
        let repeated = pairs
            .iter()
            .enumerate()
            .find(|(i, (k, _))| SINGLE.contains(&k.as_str()) && pairs[..*i].iter().any(|(seen, _)| seen == k))
            .map(|(_, (k, _))| k.as_str());
        match (query::parse(&raw, SINGLE), repeated) {
            (Ok(query), None) => {
                for (name, value) in &pairs {
                    let first = pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
                    prop_assert_eq!(query.get(name), first, "{} in {}", value, raw);
                }
            }
            (Err(QueryError::Repeated(name)), Some(expected)) => prop_assert_eq!(name.as_str(), expected),
            (other, expected) => prop_assert!(false, "{:?} for {:?} (repeated {:?})", other, raw, expected),
        }
    }

    /// On any text, the parser agrees with the form decoder actix-web uses (serde_urlencoded,
    /// which replaces bytes that are not UTF-8 with U+FFFD instead of refusing them).
    #[test]
    fn query_strings_agree_with_form_urlencoded(raw in query_text()) {
        let reference: Vec<(String, String)> =
            actix_web::web::Query::<Vec<(String, String)>>::from_query(&raw).unwrap().into_inner();
        match query::parse(&raw, SINGLE) {
            Ok(query) => {
                for (name, value) in &reference {
                    let first = reference.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
                    prop_assert_eq!(query.get(name), first, "{} in {}", value, raw);
                }
                for name in SINGLE {
                    prop_assert!(reference.iter().filter(|(k, _)| k == name).count() <= 1, "{}", raw);
                }
            }
            Err(QueryError::NotUtf8) => {
                prop_assert!(reference.iter().any(|(k, v)| k.contains('\u{FFFD}') || v.contains('\u{FFFD}')), "{}", raw);
            }
            Err(QueryError::Repeated(name)) => {
                prop_assert!(SINGLE.contains(&name.as_str()));
                prop_assert!(reference.iter().filter(|(k, _)| *k == name).count() > 1, "{}", raw);
            }
        }
    }

    #[test]
    fn broadcast_bodies_never_panic_and_accepted_messages_are_valid_json(body in jsonish()) {
        if let Ok(broadcast) = ingest::parse(body.as_bytes()) {
            prop_assert!(!broadcast.stored.is_empty() || !broadcast.transient.is_empty());
            for message in broadcast.stored.iter().chain(&broadcast.transient) {
                check_sound(&message.stream, &message.json)?;
            }
        }
    }

    #[test]
    fn broadcast_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = ingest::parse(&body);
    }

    #[test]
    fn any_string_data_round_trips_through_compaction(data in any::<String>(), stream in "[a-z/:]{1,20}") {
        let body = serde_json::json!({"stream": stream, "data": data}).to_string();
        let broadcast = ingest::parse(body.as_bytes()).unwrap();
        let stored: Value = serde_json::from_slice(&broadcast.stored[0].json).unwrap();
        // The message is the JSON the string held, or the string itself.
        let expected = serde_json::from_str::<Value>(&data).unwrap_or(Value::String(data));
        prop_assert_eq!(stored, expected);
    }

    #[test]
    fn stream_paths_never_panic(path in any::<String>()) {
        if let Ok(name) = stream_from_path(&format!("/ds/{path}"), "/ds") {
            prop_assert!(validate_stream_name(&name).is_ok());
        }
    }

    #[test]
    fn signed_tokens_verify_only_for_their_stream(stream in any::<String>(), other in any::<String>(), garbage in any::<String>()) {
        let token = sign_stream("secret", &stream);
        prop_assert!(verify_signed_stream("secret", &token, &stream).is_ok());
        if other != stream {
            prop_assert!(verify_signed_stream("secret", &token, &other).is_err());
        }
        prop_assert!(verify_signed_stream("another", &token, &stream).is_err());
        let _ = verify_signed_stream("secret", &garbage, &stream);
    }

    #[test]
    fn jwts_never_panic(token in any::<String>(), parts in proptest::collection::vec("[A-Za-z0-9_-]{0,40}", 0..5)) {
        prop_assert!(verify_jwt("secret", &token).is_err() || token.matches('.').count() == 2);
        let _ = verify_jwt("secret", &parts.join("."));
    }
}

#[test]
fn very_long_query_strings_are_linear() {
    let pairs = "tag=x&".repeat(200_000);
    let started = std::time::Instant::now();
    let query = query::parse(&format!("{pairs}offset=-1"), SINGLE).unwrap();
    assert_eq!(query.get("offset"), Some("-1"));
    assert_eq!(query.get("tag"), Some("x"));
    let err = query::parse(&format!("offset=1&{pairs}offset=2"), SINGLE).unwrap_err();
    assert_eq!(err.to_string(), r#"parameter "offset" is repeated"#);
    let garbage = "%".repeat(500_000) + "%FF";
    assert_eq!(query::parse(&garbage, SINGLE), Err(QueryError::NotUtf8));
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
}
