//! The query string of a read, decoded as `application/x-www-form-urlencoded` (the official
//! client builds it with `URLSearchParams`): pairs split on `&`, name and value split on the
//! first `=`, `+` is a space, then percent-decoding. Empty pieces (`&&`) are skipped and a
//! piece without `=` is a name with an empty value, as the URL standard's parser does.
//!
//! Unlike that parser (and the `form_urlencoded` crate), which replace bytes that are not UTF-8
//! with U+FFFD, this one refuses them: a value that silently changed would name another offset,
//! cursor or token than the client sent. Percent signs not followed by two hex digits are kept
//! as they are, as everywhere else. Decoding uses the `percent-encoding` crate.

use std::borrow::Cow;

/// A decoded query string. Parameters keep their order; a name may repeat unless the caller
/// said it may not ([`parse`]'s `single`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    pairs: Vec<(String, String)>,
}

/// Why a query string was refused. The message is the client's 400 error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// A parameter that must appear at most once appeared again (after decoding, so
    /// `offset=1&%6Fffset=2` repeats `offset`).
    #[error("parameter {0:?} is repeated")]
    Repeated(String),
    /// A name or value is not UTF-8 once percent-decoded (`%FF`).
    #[error("query string is not valid UTF-8")]
    NotUtf8,
}

/// Decodes `raw` (the query string without its `?`). Each parameter named in `single` may
/// appear at most once; other parameters may repeat, and all are kept.
pub fn parse(raw: &str, single: &[&str]) -> Result<Query, QueryError> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for piece in raw.split('&').filter(|piece| !piece.is_empty()) {
        let (name, value) = piece.split_once('=').unwrap_or((piece, ""));
        let name = decode(name)?;
        if single.contains(&name.as_str()) && pairs.iter().any(|(seen, _)| *seen == name) {
            return Err(QueryError::Repeated(name));
        }
        pairs.push((name, decode(value)?));
    }
    Ok(Query { pairs })
}

impl Query {
    /// The value of the first parameter named `key` (`Some("")` for `key=` or a bare `key`).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs.iter().find(|(name, _)| name == key).map(|(_, value)| value.as_str())
    }
}

/// One name or value: `+` to space, then percent-decoding, then strict UTF-8.
fn decode(encoded: &str) -> Result<String, QueryError> {
    let plus_as_space: Cow<str> =
        if encoded.contains('+') { Cow::Owned(encoded.replace('+', " ")) } else { Cow::Borrowed(encoded) };
    match percent_encoding::percent_decode_str(&plus_as_space).decode_utf8() {
        Ok(decoded) => Ok(decoded.into_owned()),
        Err(_) => Err(QueryError::NotUtf8),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SINGLE: &[&str] = &["offset", "live", "cursor"];

    fn pairs(raw: &str) -> Vec<(String, String)> {
        parse(raw, SINGLE).unwrap().pairs
    }

    #[test]
    fn decodes_like_url_search_params() {
        let q = parse("offset=-1&live=long-poll&cursor=42&signed=a%2Bb%3D%3D&jid=x+y%20z", SINGLE).unwrap();
        assert_eq!(q.get("offset"), Some("-1"));
        assert_eq!(q.get("live"), Some("long-poll"));
        assert_eq!(q.get("cursor"), Some("42"));
        assert_eq!(q.get("signed"), Some("a+b=="), "%2B is a plus, %3D an equals sign");
        assert_eq!(q.get("jid"), Some("x y z"), "+ and %20 are spaces");
        assert_eq!(q.get("missing"), None);
        assert_eq!(pairs("caf%C3%A9=%E2%9C%93"), [("café".into(), "✓".into())]);
        // Names are decoded too: an encoded name is the same parameter.
        assert_eq!(parse("%6Fffset=now", SINGLE).unwrap().get("offset"), Some("now"));
    }

    #[test]
    fn empty_pieces_values_and_names() {
        assert_eq!(pairs(""), Vec::<(String, String)>::new());
        assert_eq!(pairs("&&&"), Vec::<(String, String)>::new());
        assert_eq!(pairs("offset="), [("offset".into(), String::new())]);
        assert_eq!(pairs("offset"), [("offset".into(), String::new())]);
        assert_eq!(pairs("="), [(String::new(), String::new())]);
        assert_eq!(pairs("=x"), [(String::new(), "x".into())]);
        assert_eq!(pairs("a==b&&c=d=e"), [("a".into(), "=b".into()), ("c".into(), "d=e".into())]);
        assert_eq!(parse("offset=", SINGLE).unwrap().get("offset"), Some(""), "present but empty");
    }

    #[test]
    fn stray_percent_signs_are_kept() {
        assert_eq!(
            pairs("a=%&b=%2&c=%zz&d=100%"),
            [
                ("a".into(), "%".into()),
                ("b".into(), "%2".into()),
                ("c".into(), "%zz".into()),
                ("d".into(), "100%".into())
            ]
        );
        assert_eq!(pairs("a=%252B"), [("a".into(), "%2B".into())], "decoded once");
    }

    #[test]
    fn single_parameters_may_not_repeat() {
        for raw in
            ["offset=-1&offset=now", "offset=-1&offset=-1", "offset&offset", "offset=1&%6Fffset=2", "offset=&offset="]
        {
            let err = parse(raw, SINGLE).unwrap_err();
            assert_eq!(err, QueryError::Repeated("offset".into()), "{raw}");
            assert_eq!(err.to_string(), r#"parameter "offset" is repeated"#);
        }
        assert_eq!(parse("live=sse&x=1&live=sse", SINGLE).unwrap_err().to_string(), r#"parameter "live" is repeated"#);
        // Others may repeat; the first one wins.
        let q = parse("tag=a&tag=b&offset=1", SINGLE).unwrap();
        assert_eq!(q.get("tag"), Some("a"));
        assert_eq!(q.pairs.len(), 3);
        assert!(parse("offset=1&offset=2", &[]).is_ok(), "only names in `single` are checked");
    }

    #[test]
    fn invalid_utf8_is_refused() {
        for raw in ["offset=%FF", "%FF=1", "a=%C3", "a=%C3%28", "a=%ED%A0%80", "a=ok&b=%80"] {
            let err = parse(raw, SINGLE).unwrap_err();
            assert_eq!(err, QueryError::NotUtf8, "{raw}");
            assert_eq!(err.to_string(), "query string is not valid UTF-8");
        }
    }
}
