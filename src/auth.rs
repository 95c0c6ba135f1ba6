//! Secrets and tokens: broadcast key, signed stream names, JWT client authentication.
//!
//! Pure functions over strings, so the published vectors can be unit-tested. Failures carry a
//! short reason for the client (`unauthorized`, `token_expired`, ...) and never say which secret
//! was used or why exactly a signature did not match.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Why a DS read was refused (the `error` of the 401 body).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("unauthorized")]
    Unauthorized,
    #[error("token_expired")]
    TokenExpired,
    #[error("forbidden_stream")]
    ForbiddenStream,
}

impl AuthError {
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Unauthorized => "unauthorized",
            AuthError::TokenExpired => "token_expired",
            AuthError::ForbiddenStream => "forbidden_stream",
        }
    }
}

/// A key AnyCable derives from the application secret: lowercase hex of
/// HMAC-SHA256(key = secret, message = phrase). Both sides (server and app libraries) derive it
/// the same way, so one shared secret is enough.
fn derive_key(secret: &str, phrase: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(phrase.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// AnyCable's broadcast key (phrase `broadcast-cable`).
pub fn derive_broadcast_key(secret: &str) -> String {
    derive_key(secret, "broadcast-cable")
}

/// AnyCable's HTTP RPC secret (phrase `rpc-cable`).
pub fn derive_rpc_secret(secret: &str) -> String {
    derive_key(secret, "rpc-cable")
}

/// Checks an `Authorization` header value against the broadcast key, in constant time.
pub fn bearer_matches(authorization: Option<&str>, key: &str) -> bool {
    let Some(token) = authorization.and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
    else {
        return false;
    };
    token.trim().as_bytes().ct_eq(key.as_bytes()).into()
}

/// Signs a stream name the way Rails' `MessageVerifier` (and `AnyCable::Streams.signed`) does:
/// `base64(JSON(name)) + "--" + hex(HMAC-SHA256(secret, that base64 text))`.
pub fn sign_stream(secret: &str, stream: &str) -> String {
    let json = serde_json::to_string(stream).expect("a string serializes");
    let encoded = base64::engine::general_purpose::STANDARD.encode(json);
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(encoded.as_bytes());
    format!("{encoded}--{}", hex::encode(mac.finalize().into_bytes()))
}

/// Verifies a signed stream token and checks that it names `stream`.
pub fn verify_signed_stream(secret: &str, token: &str, stream: &str) -> Result<(), AuthError> {
    let (encoded, digest) = token.rsplit_once("--").ok_or(AuthError::Unauthorized)?;
    let digest = hex::decode(digest).map_err(|_| AuthError::Unauthorized)?;
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(encoded.as_bytes());
    mac.verify_slice(&digest).map_err(|_| AuthError::Unauthorized)?;
    // Signed by us: now decode what was signed. Rails uses standard base64; accept the URL-safe
    // alphabet too, as some helpers produce it.
    let json = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(encoded))
        .map_err(|_| AuthError::Unauthorized)?;
    let signed_name: String = serde_json::from_slice(&json).map_err(|_| AuthError::Unauthorized)?;
    if signed_name == stream {
        Ok(())
    } else {
        Err(AuthError::ForbiddenStream)
    }
}

/// Who a verified JWT says the client is (AnyCable's `ext` claim, JSON text), for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub identifiers: Option<String>,
}

#[derive(serde::Deserialize)]
struct Claims {
    #[serde(default)]
    ext: Option<serde_json::Value>,
}

/// Verifies an AnyCable JWT: HS256/384/512 only, `exp` and `nbf` honoured when present.
pub fn verify_jwt(secret: &str, token: &str) -> Result<Identity, AuthError> {
    use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, Validation};
    let mut validation = Validation::new(Algorithm::HS256);
    validation.algorithms = vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
    validation.required_spec_claims.clear();
    validation.validate_nbf = true;
    validation.leeway = 0;
    let data = jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(secret.as_bytes()), &validation)
        .map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::TokenExpired,
            _ => AuthError::Unauthorized,
        })?;
    let identifiers = data.claims.ext.map(|ext| match ext {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    });
    Ok(Identity { identifiers })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_key_vector() {
        assert_eq!(derive_broadcast_key("qwerty"), "42923a28b760e667fc92f7c6123bb07a282822b329dd2ef48e7aee7830d98485");
        // echo -n 'rpc-cable' | openssl dgst -sha256 -hmac 'qwerty'
        assert_eq!(derive_rpc_secret("qwerty"), "57c40610d142fe7d7999be4e23dfba4f42c3c542e1f278063e8e3b6a30b0c2bd");
    }

    #[test]
    fn signed_stream_vector() {
        let token = "ImNoYXQ6MjAyMSI=--f9ee45dbccb1da04d8ceb99cc820207804370ba0d06b46fc3b8b373af1315628";
        assert_eq!(sign_stream("s3Krit", "chat:2021"), token);
        assert_eq!(verify_signed_stream("s3Krit", token, "chat:2021"), Ok(()));
        assert_eq!(verify_signed_stream("s3Krit", token, "chat:2022"), Err(AuthError::ForbiddenStream));
        assert_eq!(verify_signed_stream("other", token, "chat:2021"), Err(AuthError::Unauthorized));
        let tampered = token.replace("ImNo", "ImNp");
        assert_eq!(verify_signed_stream("s3Krit", &tampered, "chat:2021"), Err(AuthError::Unauthorized));
        for garbage in ["", "--", "abc", "abc--zz", "ImNoYXQ6MjAyMSI="] {
            assert_eq!(verify_signed_stream("s3Krit", garbage, "chat:2021"), Err(AuthError::Unauthorized));
        }
    }

    #[test]
    fn bearer_header() {
        assert!(bearer_matches(Some("Bearer k1"), "k1"));
        assert!(!bearer_matches(Some("Bearer k2"), "k1"));
        assert!(!bearer_matches(Some("k1"), "k1"));
        assert!(!bearer_matches(None, "k1"));
    }

    fn jwt(alg: jsonwebtoken::Algorithm, secret: &str, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(alg),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn jwt_algorithms_expiry_and_ext() {
        use jsonwebtoken::Algorithm::*;
        let now = crate::storage::now_ms() / 1000;
        let claims = serde_json::json!({"ext": "{\"user\":1}", "exp": now + 60});
        for alg in [HS256, HS384, HS512] {
            let identity = verify_jwt("k", &jwt(alg, "k", claims.clone())).unwrap();
            assert_eq!(identity.identifiers.as_deref(), Some("{\"user\":1}"));
        }
        assert_eq!(verify_jwt("other", &jwt(HS256, "k", claims.clone())), Err(AuthError::Unauthorized));
        let expired = serde_json::json!({"exp": now - 10});
        assert_eq!(verify_jwt("k", &jwt(HS256, "k", expired)), Err(AuthError::TokenExpired));
        let not_yet = serde_json::json!({"nbf": now + 3600});
        assert_eq!(verify_jwt("k", &jwt(HS256, "k", not_yet)), Err(AuthError::Unauthorized));
        assert!(verify_jwt("k", &jwt(HS256, "k", serde_json::json!({}))).is_ok());
        // alg "none": header {"alg":"none"}, no signature.
        let none = "eyJhbGciOiJub25lIn0.eyJleHQiOiJ7fSJ9.";
        assert_eq!(verify_jwt("k", none), Err(AuthError::Unauthorized));
        assert_eq!(verify_jwt("k", "garbage"), Err(AuthError::Unauthorized));
    }
}
