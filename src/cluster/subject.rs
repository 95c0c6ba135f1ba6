//! DS stream names as JetStream subjects.
//!
//! A DS stream name is any UTF-8 text up to 1024 bytes; a subject token may not hold
//! whitespace or `.` and is a wildcard when it is `*` or `>`, DEL (0x7F) is stored but never
//! indexed, and the whole protocol line is capped at 4096 bytes. So the name is encoded:
//! base64url without padding (alphabet `A-Za-z0-9-_`, never a wildcard, 1368 bytes at most)
//! behind a fixed `s` so an empty name still gives a non-empty token.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

/// The subject token of a DS stream name.
pub fn token(name: &str) -> String {
    let mut out = String::with_capacity(1 + name.len().div_ceil(3) * 4);
    out.push('s');
    URL_SAFE_NO_PAD.encode_string(name.as_bytes(), &mut out);
    out
}

/// The DS stream name of a subject token, if it is one of ours.
pub fn name(token: &str) -> Option<String> {
    let encoded = token.strip_prefix('s')?;
    String::from_utf8(URL_SAFE_NO_PAD.decode(encoded).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_name_is_one_safe_token_and_comes_back() {
        let names =
            ["", "chat/room-42", "a.b.c", "*", ">", "with space\tand\ttabs\n", "\u{7f}\u{0}é漢字🙂", &"x".repeat(1024)];
        for name in names {
            let t = token(name);
            assert!(t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{t}");
            assert!(t.len() <= 1 + 1368, "{}", t.len());
            assert_eq!(super::name(&t).as_deref(), Some(name));
        }
        assert_eq!(super::name("x"), None);
        assert_eq!(super::name("s!!"), None);
    }
}
