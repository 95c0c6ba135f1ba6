//! The server's webhook signing key (Ed25519) and the tokens of wakes.
//!
//! One key per data directory (sled) or per cluster (NATS): the engine's store keeps its
//! 32-byte seed, so every node signs with the same key and one JWKS document verifies all of
//! them. Receivers fetch `{ds.path}/__ds/jwks.json` and check `Webhook-Signature:
//! t=<unix seconds>,kid=<kid>,ed25519=<base64url signature of "<t>.<raw body>">`.
//!
//! Wake tokens (the webhook `callback_token`, the pull-wake claim `token`) are HMAC-SHA256
//! over the subscription, generation and wake id, with a key derived from the same seed:
//! any node can check any token without a lookup, and a token of an old generation is
//! recognised as genuine but stale (`409 FENCED`) rather than unknown (`401`).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

pub struct Signer {
    key: SigningKey,
    kid: String,
    token_key: [u8; 32],
}

impl Signer {
    pub fn from_seed(seed: [u8; 32]) -> Signer {
        let key = SigningKey::from_bytes(&seed);
        let public = key.verifying_key().to_bytes();
        let kid = format!("ds_{}", &URL_SAFE_NO_PAD.encode(Sha256::digest(public))[..16]);
        let mut mac = Hmac::<Sha256>::new_from_slice(&seed).expect("HMAC takes any key length");
        mac.update(b"anycable-ds wake tokens");
        let token_key = mac.finalize().into_bytes().into();
        Signer { key, kid, token_key }
    }

    /// A fresh random seed, for a store that has none yet.
    pub fn new_seed() -> [u8; 32] {
        rand::random()
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The JWKS document (`application/jwk-set+json`).
    pub fn jwks(&self) -> serde_json::Value {
        let x = URL_SAFE_NO_PAD.encode(self.key.verifying_key().to_bytes());
        serde_json::json!({
            "keys": [{ "kty": "OKP", "crv": "Ed25519", "kid": self.kid, "alg": "EdDSA", "use": "sig", "x": x }]
        })
    }

    /// The `Webhook-Signature` value for `body` sent at `unix_secs`.
    pub fn signature_header(&self, unix_secs: u64, body: &[u8]) -> String {
        let mut signed = Vec::with_capacity(body.len() + 24);
        signed.extend_from_slice(unix_secs.to_string().as_bytes());
        signed.push(b'.');
        signed.extend_from_slice(body);
        let signature = self.key.sign(&signed);
        format!("t={unix_secs},kid={},ed25519={}", self.kid, URL_SAFE_NO_PAD.encode(signature.to_bytes()))
    }

    /// The token of one wake of one subscription.
    pub fn token(&self, subscription: &str, generation: u64, wake_id: &str) -> String {
        let claims = format!("{generation}.{wake_id}");
        format!("{}.{}", URL_SAFE_NO_PAD.encode(&claims), URL_SAFE_NO_PAD.encode(self.mac(subscription, &claims)))
    }

    /// The generation and wake id of a genuine token of `subscription`; `None`: not one of ours.
    pub fn verify_token(&self, subscription: &str, token: &str) -> Option<(u64, String)> {
        let (claims, mac) = token.split_once('.')?;
        let claims = String::from_utf8(URL_SAFE_NO_PAD.decode(claims).ok()?).ok()?;
        let mac = URL_SAFE_NO_PAD.decode(mac).ok()?;
        let mut check = Hmac::<Sha256>::new_from_slice(&self.token_key).expect("HMAC takes any key length");
        check.update(subscription.as_bytes());
        check.update(b"\0");
        check.update(claims.as_bytes());
        check.verify_slice(&mac).ok()?;
        let (generation, wake_id) = claims.split_once('.')?;
        Some((generation.parse().ok()?, wake_id.to_string()))
    }

    fn mac(&self, subscription: &str, claims: &str) -> Vec<u8> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.token_key).expect("HMAC takes any key length");
        mac.update(subscription.as_bytes());
        mac.update(b"\0");
        mac.update(claims.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signature, Verifier, VerifyingKey};

    #[test]
    fn signatures_verify_with_the_published_key() {
        let signer = Signer::from_seed([7; 32]);
        let header = signer.signature_header(1_700_000_000, b"{\"a\":1}");
        let sig = header.rsplit_once("ed25519=").unwrap().1;
        let jwks = signer.jwks();
        let x = URL_SAFE_NO_PAD.decode(jwks["keys"][0]["x"].as_str().unwrap()).unwrap();
        let key = VerifyingKey::from_bytes(&x.try_into().unwrap()).unwrap();
        let sig = Signature::from_slice(&URL_SAFE_NO_PAD.decode(sig).unwrap()).unwrap();
        assert!(key.verify(b"1700000000.{\"a\":1}", &sig).is_ok());
        assert!(header.starts_with(&format!("t=1700000000,kid={},", signer.kid())));
        assert!(signer.kid().starts_with("ds_"));
    }

    #[test]
    fn tokens_name_their_subscription_and_generation() {
        let signer = Signer::from_seed([1; 32]);
        let token = signer.token("sub-1", 3, "w_abc");
        assert_eq!(signer.verify_token("sub-1", &token), Some((3, "w_abc".into())));
        assert_eq!(signer.verify_token("sub-2", &token), None);
        assert_eq!(Signer::from_seed([2; 32]).verify_token("sub-1", &token), None);
        assert_eq!(signer.verify_token("sub-1", "garbage"), None);
        assert_eq!(signer.verify_token("sub-1", ""), None);
    }
}
