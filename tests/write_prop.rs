//! Property tests of the write API's input: the header and body parsers on their own (what is
//! accepted is exactly the grammar, and means what it says), then the server under hostile
//! header combinations (never a 5xx, a JSON error for every refusal, and a refused `PUT`
//! creates nothing).
//!
//! Bounded (PROPTEST_CASES, default 2000 per parser property; 300 requests) for CI time.

mod common;

use anycable_ds::meta::Framing;
use anycable_ds::write_parse;
use bytes::Bytes;
use common::{header, temp_dir, Rng, Server, KEY};
use proptest::prelude::*;
use serde_json::Value;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    ProptestConfig { cases, ..ProptestConfig::default() }
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian), for the expected values.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// A TTL-like value: digits with and without leading zeros, signs, fractions, exponents,
/// spaces, huge numbers, and anything at all.
fn ttl_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{1,25}",
        "0[0-9]{1,4}",
        "[+-][0-9]{1,5}",
        "[0-9]{1,4}[.eE][0-9]{0,3}",
        " ?[0-9]{1,4} ?",
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn stream_ttl_is_exactly_its_grammar(value in ttl_text()) {
        let grammar = value == "0"
            || (!value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) && !value.starts_with('0'));
        let in_range = value.parse::<u64>().is_ok_and(|secs| secs <= 10 * 365 * 24 * 3600);
        match write_parse::ttl(&value) {
            Ok(secs) => {
                prop_assert!(grammar && in_range, "{value:?} accepted");
                prop_assert_eq!(Some(secs), value.parse().ok());
            }
            Err(e) => {
                prop_assert!(!(grammar && in_range), "{value:?} refused");
                prop_assert!(e.contains("Stream-TTL"), "{}", e);
            }
        }
    }

    #[test]
    fn expires_at_reads_every_rfc3339_spelling(
        (year, month, day) in (1970i64..=9999, 1i64..=12).prop_flat_map(|(y, m)| (Just(y), Just(m), 1..=days_in_month(y, m))),
        (hour, minute, second) in (0i64..24, 0i64..60, 0i64..60),
        fraction in "[0-9]{0,9}",
        zone in prop_oneof![Just(None), (-23i64..=23, 0i64..60).prop_map(Some)],
        lower in any::<bool>(),
    ) {
        let t = if lower { "t" } else { "T" };
        let zone_text = match zone {
            None if lower => "z".to_string(),
            None => "Z".to_string(),
            Some((h, m)) => format!("{}{:02}:{m:02}", if h < 0 { '-' } else { '+' }, h.abs()),
        };
        let dot = if fraction.is_empty() { String::new() } else { format!(".{fraction}") };
        let text = format!("{year:04}-{month:02}-{day:02}{t}{hour:02}:{minute:02}:{second:02}{dot}{zone_text}");
        let offset_secs = zone.map_or(0, |(h, m)| h.signum() * (h.abs() * 3600 + m * 60) + if h == 0 { m * 60 } else { 0 });
        let ms_fraction = format!("{fraction:0<3}")[..3].parse::<i64>().unwrap();
        let expected = (days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset_secs) * 1000
            + ms_fraction;
        let (raw, ms) = write_parse::expires_at(&text).map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
        prop_assert_eq!(raw, text.clone());
        prop_assert_eq!(ms, expected, "{}", text);
    }

    #[test]
    fn expires_at_never_panics_and_names_the_header(value in any::<String>()) {
        if let Err(e) = write_parse::expires_at(&value) {
            prop_assert!(e.contains("Stream-Expires-At"), "{}", e);
        }
    }

    #[test]
    fn json_bodies_flatten_one_level_into_compact_messages(value in json(), pretty in any::<bool>()) {
        let text = if pretty { serde_json::to_string_pretty(&value) } else { serde_json::to_string(&value) }.unwrap();
        let messages = write_parse::messages(Framing::Json, &Bytes::from(text.clone())).unwrap();
        // (Parsed back from the text, as the messages are: serde_json's float parsing is not
        // exact to the last bit, and the text, not the value, is what is stored.)
        let value: Value = serde_json::from_str(&text).unwrap();
        let expected: Vec<Value> = match &value {
            Value::Array(items) => items.clone(),
            other => vec![other.clone()],
        };
        prop_assert_eq!(messages.len(), expected.len());
        for (message, want) in messages.iter().zip(&expected) {
            prop_assert!(!message.contains(&b'\n') && !message.contains(&b'\r'), "one SSE line: {:?}", message);
            let got: Value = serde_json::from_slice(message).unwrap();
            prop_assert_eq!(&got, want);
        }
    }

    #[test]
    fn any_body_is_a_message_list_or_a_named_error(body in proptest::collection::vec(any::<u8>(), 0..200)) {
        let body = Bytes::from(body);
        match write_parse::messages(Framing::Json, &body) {
            Ok(messages) => prop_assert!(messages.iter().all(|m| serde_json::from_slice::<Value>(m).is_ok())),
            Err(e) => prop_assert!(e.contains("JSON"), "{}", e),
        }
        let raw = write_parse::messages(Framing::Raw, &body).unwrap();
        prop_assert_eq!(raw.concat(), body.to_vec());
    }
}

/// JSON values with every type, escapes, control characters and non-BMP text in strings.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        "(\\PC|[\\x00-\\x1f\"\\\\\u{2028}\u{1F600}]){0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z\"\\\\]{0,4}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Header values a client may send (reqwest refuses control characters but tab, as HTTP does).
const HOSTILE: &[&str] = &[
    "",
    " ",
    "\t",
    "true",
    "TRUE",
    "false",
    "0",
    "00060",
    "60",
    "-1",
    "1e3",
    "18446744073709551616",
    "2030-01-01T00:00:00Z",
    "2030-01-01T00:00:00.123+05:30",
    "1999-12-31t23:59:60z",
    "not-a-timestamp",
    "text/plain",
    "application/json",
    "APPLICATION/JSON; charset=utf-8",
    "a/b/c",
    "/",
    "é",
    "/ds/h1",
    "h2",
    "/ds/h%33",
    "/ds/",
    "%ff%fe",
    "0000000000000000_0000000000000000",
    "9999999999999999_9999999999999999",
    "3",
    "05",
];

const HEADERS: &[&str] = &[
    "content-type",
    "stream-ttl",
    "stream-expires-at",
    "stream-closed",
    "stream-seq",
    "stream-forked-from",
    "stream-fork-offset",
    "stream-fork-sub-offset",
];

/// Requests with random hostile header combinations (empty, repeated, huge, odd case): never
/// a 5xx, a JSON error for every refusal, and a stream exists only if a `PUT` said so.
#[tokio::test]
async fn hostile_write_headers_get_a_4xx_or_do_what_they_say() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &["--ds_implicit_streams", "false"]);
    let cases: u64 = std::env::var("ANYCABLE_DS_HOSTILE_WRITES").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut created = std::collections::HashSet::new();
    for case in 0..cases {
        let stream = format!("h{}", rng.next() % 8);
        let method = if rng.next() % 2 == 0 { reqwest::Method::PUT } else { reqwest::Method::POST };
        let mut request = server.client.request(method.clone(), server.ds(&stream)).bearer_auth(KEY);
        let mut sent = Vec::new();
        for _ in 0..rng.next() % 5 {
            let name = rng.pick(HEADERS);
            let name = if rng.next() % 3 == 0 { name.to_ascii_uppercase() } else { name.to_string() };
            let value = match rng.next() % 10 {
                0 => "9".repeat(4000),
                // Any byte a header may carry: visible ASCII, tab, obs-text (as UTF-8).
                1 => String::from_utf8_lossy(&rng.bytes(8))
                    .chars()
                    .map(|c| if (c < ' ' && c != '\t') || c == '\u{7f}' { '?' } else { c })
                    .collect(),
                _ => rng.pick(HOSTILE).to_string(),
            };
            sent.push((name.clone(), value.clone()));
            request = request.header(name, value);
        }
        let body: Vec<u8> = match rng.next() % 4 {
            0 => Vec::new(),
            1 => b"[1,{\"a\":\"\\u0000\"}]".to_vec(),
            2 => {
                let len = (rng.next() % 64) as usize;
                rng.bytes(len)
            }
            _ => b"plain text".to_vec(),
        };
        let response = request.body(body).send().await.unwrap();
        let status = response.status().as_u16();
        let context = format!("case {case}: {method} {stream} {sent:?} -> {status}");
        assert!(status < 500 || status == 501, "{context}");
        if status >= 400 {
            assert_eq!(header(&response, "content-type").as_deref(), Some("application/json"), "{context}");
            let error: Value = response.json().await.unwrap();
            assert!(error["error"].as_str().is_some_and(|e| !e.is_empty()), "{context}: {error}");
        } else if method == reqwest::Method::PUT {
            created.insert(stream.clone());
        }
        let head = server.client.head(server.ds(&stream)).send().await.unwrap().status().as_u16();
        assert_eq!(head == 200, created.contains(&stream), "{context}: HEAD {head}");
    }
    assert!(!created.is_empty(), "some PUT must have succeeded");
}
