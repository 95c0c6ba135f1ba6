//! Stream names: what is allowed, and how one is taken out of a request path.

/// Longest stream name, in bytes.
pub const MAX_NAME_BYTES: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidStreamName {
    #[error("stream name is empty")]
    Empty,
    #[error("stream name is longer than 1024 bytes")]
    TooLong,
    #[error("stream name is not valid UTF-8")]
    NotUtf8,
    #[error("stream name contains control characters")]
    ControlCharacter,
    #[error("stream names under __ds/ are reserved for the subscription API")]
    Reserved,
}

pub fn validate_stream_name(name: &str) -> Result<(), InvalidStreamName> {
    if name.is_empty() {
        Err(InvalidStreamName::Empty)
    } else if name.len() > MAX_NAME_BYTES {
        Err(InvalidStreamName::TooLong)
    } else if name.chars().any(char::is_control) {
        Err(InvalidStreamName::ControlCharacter)
    } else if name == "__ds" || name.starts_with("__ds/") {
        Err(InvalidStreamName::Reserved)
    } else {
        Ok(())
    }
}

/// The stream named by a raw (still percent-encoded) request path under `prefix`:
/// everything after `prefix/`, percent-decoded, `/` allowed.
pub fn stream_from_path(raw_path: &str, prefix: &str) -> Result<String, InvalidStreamName> {
    let encoded =
        raw_path.strip_prefix(prefix).and_then(|rest| rest.strip_prefix('/')).ok_or(InvalidStreamName::Empty)?;
    let decoded =
        percent_encoding::percent_decode_str(encoded).decode_utf8().map_err(|_| InvalidStreamName::NotUtf8)?;
    validate_stream_name(&decoded)?;
    Ok(decoded.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_paths() {
        assert_eq!(stream_from_path("/ds/chat/room-42", "/ds").as_deref(), Ok("chat/room-42"));
        assert_eq!(stream_from_path("/ds/a%20b%2Fc", "/ds").as_deref(), Ok("a b/c"));
        assert_eq!(stream_from_path("/ds/caf%C3%A9", "/ds").as_deref(), Ok("café"));
        assert_eq!(stream_from_path("/ds/", "/ds"), Err(InvalidStreamName::Empty));
        assert_eq!(stream_from_path("/ds", "/ds"), Err(InvalidStreamName::Empty));
        assert_eq!(stream_from_path("/ds/%FF", "/ds"), Err(InvalidStreamName::NotUtf8));
        assert_eq!(stream_from_path("/ds/a%00", "/ds"), Err(InvalidStreamName::ControlCharacter));
        assert_eq!(stream_from_path("/ds/a%0Ab", "/ds"), Err(InvalidStreamName::ControlCharacter));
        let long = format!("/ds/{}", "x".repeat(1025));
        assert_eq!(stream_from_path(&long, "/ds"), Err(InvalidStreamName::TooLong));
        let max = format!("/ds/{}", "x".repeat(1024));
        assert!(stream_from_path(&max, "/ds").is_ok());
        assert_eq!(stream_from_path("/ds/%5F%5Fds/x", "/ds"), Err(InvalidStreamName::Reserved));
        assert_eq!(stream_from_path("/ds/__ds", "/ds"), Err(InvalidStreamName::Reserved));
        assert!(stream_from_path("/ds/__dsx", "/ds").is_ok());
    }
}
