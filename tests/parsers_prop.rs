//! Property tests of every parser that sees client input: offsets, broadcast bodies, stream
//! names, signed tokens, JWTs. Arbitrary input never panics, and what is accepted is sound.
//! Bounded (PROPTEST_CASES, default 2000 per property) so CI time stays small.

use anycable_ds::auth::{sign_stream, verify_jwt, verify_signed_stream};
use anycable_ds::ingest;
use anycable_ds::offset::{Epoch, Offset, Position};
use anycable_ds::streams::{stream_from_path, validate_stream_name};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    ProptestConfig { cases, ..ProptestConfig::default() }
}

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
        any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
        "[ \\t\\n]{0,3}",
        any::<String>(),
    ];
    proptest::collection::vec(atom, 0..24).prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn offsets_never_panic_and_tokens_round_trip(raw in any::<String>(), seq in any::<u64>()) {
        let _ = Offset::parse(Some(&raw));
        let position = Position { epoch: Epoch::random(), seq };
        prop_assert_eq!(Offset::parse(Some(&position.token())), Ok(Offset::At(position)));
    }

    #[test]
    fn broadcast_bodies_never_panic_and_accepted_messages_are_valid_json(body in jsonish()) {
        if let Ok(broadcast) = ingest::parse(body.as_bytes()) {
            prop_assert!(!broadcast.stored.is_empty() || !broadcast.transient.is_empty());
            for message in broadcast.stored.iter().chain(&broadcast.transient) {
                let text = std::str::from_utf8(&message.json).unwrap();
                prop_assert!(serde_json::from_str::<serde_json::Value>(text).is_ok(), "{}", text);
                prop_assert!(!text.contains('\n'), "stored JSON is compact");
                prop_assert!(validate_stream_name(&message.stream).is_ok());
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
        let stored: serde_json::Value = serde_json::from_slice(&broadcast.stored[0].json).unwrap();
        // The message is the JSON the string held, or the string itself.
        let expected = serde_json::from_str::<serde_json::Value>(&data).unwrap_or(serde_json::Value::String(data));
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
