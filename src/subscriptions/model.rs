//! What a subscription is, as stored (one JSON record per subscription), and the JSON the API
//! takes and answers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::streams::validate_stream_name;

/// Lease of a wake (webhook or pull-wake claim) unless the subscription says otherwise.
pub const DEFAULT_LEASE_TTL_MS: u64 = 30_000;
pub const MIN_LEASE_TTL_MS: u64 = 1_000;
pub const MAX_LEASE_TTL_MS: u64 = 600_000;
/// What a subscription id escapes in a URL path segment: all but RFC 3986's unreserved.
const SEGMENT: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');
/// Streams one subscription follows (explicit and glob links together); a glob match beyond
/// it is not linked (and counted in `ds_subscription_links_refused_total`).
pub const MAX_LINKS: usize = 10_000;
/// Longest subscription id, pattern, description, worker name.
pub const MAX_ID_BYTES: usize = 256;
pub const MAX_DESCRIPTION_BYTES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Webhook,
    PullWake,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Webhook => "webhook",
            Kind::PullWake => "pull-wake",
        }
    }
}

/// One stream a subscription follows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    /// Named in `streams` (or added with `POST …/streams`).
    #[serde(default)]
    pub explicit: bool,
    /// Matched the pattern when appended to.
    #[serde(default)]
    pub glob: bool,
    /// Acknowledged up to this position (`None`: nothing, `-1`).
    pub acked: Option<u64>,
}

/// A wake in progress: the subscriber was (or is being) told that streams have news.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wake {
    pub id: String,
    /// Each linked stream's tail when the wake was made; a webhook's `{"done":true}` acks these.
    pub snapshot: BTreeMap<String, u64>,
    /// Pull-wake: the worker holding the claim.
    pub holder: Option<String>,
    /// The wake is given up (and another made if work is pending) after this, Unix ms.
    /// `None`: an unclaimed pull-wake, waiting for a worker.
    pub lease_until_ms: Option<u64>,
}

/// A stored subscription.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: Kind,
    pub pattern: Option<String>,
    pub webhook_url: Option<String>,
    pub wake_stream: Option<String>,
    pub lease_ttl_ms: u64,
    pub description: Option<String>,
    pub config_hash: String,
    pub created_ms: u64,
    /// `http://host[:port]{ds.path}` as the creating request named this server: the base of
    /// the callback URL the webhook receiver calls back.
    pub base_url: String,
    pub links: BTreeMap<String, Link>,
    /// Bumped by every wake; a token of an older one is fenced.
    pub generation: u64,
    pub wake: Option<Wake>,
    /// Bumped by every stored change (orders updates of the in-memory copies).
    #[serde(default)]
    pub version: u64,
}

/// A `PUT subscriptions/:id` body, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub kind: Kind,
    pub pattern: Option<String>,
    pub streams: Vec<String>,
    pub webhook_url: Option<String>,
    pub wake_stream: Option<String>,
    pub lease_ttl_ms: u64,
    pub description: Option<String>,
}

/// `a/b/` and `/a/b` name stream `a/b`.
pub fn normalize_path(path: &str) -> &str {
    path.trim_matches('/')
}

/// A stream path in a request body, validated as a stream name.
pub fn stream_path(raw: &str, what: &str) -> Result<String, String> {
    let path = normalize_path(raw);
    validate_stream_name(path).map_err(|e| format!("{what}: {e}"))?;
    Ok(path.to_string())
}

impl Spec {
    pub fn parse(body: &Value) -> Result<Spec, String> {
        let object = body.as_object().ok_or("the body must be a JSON object")?;
        let kind = match object.get("type").and_then(Value::as_str) {
            Some("webhook") => Kind::Webhook,
            Some("pull-wake") => Kind::PullWake,
            _ => return Err("type must be \"webhook\" or \"pull-wake\"".into()),
        };
        let pattern = match object.get("pattern") {
            None | Some(Value::Null) => None,
            Some(Value::String(p)) if normalize_path(p).is_empty() => None,
            Some(Value::String(p)) => Some(stream_path(p, "pattern")?),
            Some(_) => return Err("pattern must be a string".into()),
        };
        let mut streams = match object.get("streams") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|s| {
                    s.as_str()
                        .ok_or_else(|| "streams must hold strings".to_string())
                        .and_then(|s| stream_path(s, "streams"))
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(_) => return Err("streams must be an array of strings".into()),
        };
        streams.sort();
        streams.dedup();
        if streams.len() > MAX_LINKS {
            return Err(format!("at most {MAX_LINKS} streams"));
        }
        if pattern.is_none() && streams.is_empty() {
            return Err("at least one of pattern or streams is required".into());
        }
        let lease_ttl_ms = match object.get("lease_ttl_ms") {
            None | Some(Value::Null) => DEFAULT_LEASE_TTL_MS,
            Some(v) => v
                .as_u64()
                .filter(|ms| (MIN_LEASE_TTL_MS..=MAX_LEASE_TTL_MS).contains(ms))
                .ok_or(format!("lease_ttl_ms must be an integer from {MIN_LEASE_TTL_MS} to {MAX_LEASE_TTL_MS}"))?,
        };
        let webhook_url = match (kind, object.get("webhook")) {
            (Kind::Webhook, Some(Value::Object(w))) => match w.get("url") {
                Some(Value::String(url)) if !url.is_empty() && url.len() <= 2048 => Some(url.clone()),
                _ => return Err("webhook.url must be a URL of at most 2048 bytes".into()),
            },
            (Kind::Webhook, _) => return Err("webhook subscriptions require webhook.url".into()),
            (Kind::PullWake, _) => None,
        };
        let wake_stream = match (kind, object.get("wake_stream")) {
            (Kind::PullWake, Some(Value::String(s))) => Some(stream_path(s, "wake_stream")?),
            (Kind::PullWake, _) => return Err("pull-wake subscriptions require wake_stream".into()),
            (Kind::Webhook, _) => None,
        };
        let description = match object.get("description") {
            None | Some(Value::Null) => None,
            Some(Value::String(d)) if d.len() <= MAX_DESCRIPTION_BYTES => Some(d.clone()),
            Some(_) => return Err(format!("description must be a string of at most {MAX_DESCRIPTION_BYTES} bytes")),
        };
        Ok(Spec { kind, pattern, streams, webhook_url, wake_stream, lease_ttl_ms, description })
    }

    /// The hash that tells an identical re-`PUT` (`200`) from a different one (`409`).
    pub fn hash(&self) -> String {
        let canonical = json!({
            "type": self.kind.as_str(),
            "pattern": self.pattern,
            "streams": self.streams,
            "webhook": self.webhook_url,
            "wake_stream": self.wake_stream,
            "lease_ttl_ms": self.lease_ttl_ms,
            "description": self.description,
        });
        hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
    }
}

/// A subscription id from a URL segment: 1..=256 bytes, no control characters.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_BYTES && !id.chars().any(char::is_control)
}

impl Record {
    pub fn new(id: &str, spec: &Spec, base_url: String, now_ms: u64) -> Record {
        Record {
            id: id.to_string(),
            kind: spec.kind,
            pattern: spec.pattern.clone(),
            webhook_url: spec.webhook_url.clone(),
            wake_stream: spec.wake_stream.clone(),
            lease_ttl_ms: spec.lease_ttl_ms,
            description: spec.description.clone(),
            config_hash: spec.hash(),
            created_ms: now_ms,
            base_url,
            links: BTreeMap::new(),
            generation: 0,
            wake: None,
            version: 0,
        }
    }

    /// Whether appends to `stream` concern this subscription.
    pub fn follows(&self, stream: &str) -> bool {
        self.links.contains_key(stream) || self.pattern.as_deref().is_some_and(|p| super::glob::matches(p, stream))
    }

    /// The callback URL of a webhook wake.
    pub fn callback_url(&self) -> String {
        let id = percent_encoding::utf8_percent_encode(&self.id, SEGMENT).to_string();
        format!("{}/__ds/subscriptions/{id}/callback", self.base_url)
    }
}

impl Link {
    pub fn link_type(&self) -> &'static str {
        if self.explicit {
            "explicit"
        } else {
            "glob"
        }
    }
}
