//! The operations of the subscription API, each one compare-and-swap on one record.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::model::{self, Kind, Link, Record, Spec};
use super::{now_ms, url_guard, Action, SubError, Subscriptions, CAS_ATTEMPTS, MAX_SUBSCRIPTIONS};
use crate::offset::Offset;

/// `PUT subscriptions/:id`: created (`201`) or confirmed (`200`).
pub struct Created {
    pub created: bool,
    pub record: Record,
}

/// A callback, ack or release body.
struct WakeRequest {
    wake_id: Option<String>,
    generation: Option<u64>,
    acks: Vec<(String, String)>,
    done: bool,
}

impl WakeRequest {
    fn parse(body: &Value) -> Result<WakeRequest, SubError> {
        let object = body.as_object().ok_or_else(|| SubError::invalid("the body must be a JSON object"))?;
        let mut acks = Vec::new();
        match object.get("acks") {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                for item in items {
                    let stream = item.get("stream").or_else(|| item.get("path")).and_then(Value::as_str);
                    let offset = item.get("offset").and_then(Value::as_str);
                    match (stream, offset) {
                        (Some(s), Some(o)) => acks.push((model::normalize_path(s).to_string(), o.to_string())),
                        _ => return Err(SubError::invalid("each ack needs stream and offset strings")),
                    }
                }
            }
            Some(_) => return Err(SubError::invalid("acks must be an array")),
        }
        Ok(WakeRequest {
            wake_id: object.get("wake_id").and_then(Value::as_str).map(str::to_string),
            generation: object.get("generation").and_then(Value::as_u64),
            acks,
            done: object.get("done").and_then(Value::as_bool).unwrap_or(false),
        })
    }
}

impl Subscriptions {
    async fn read(&self, id: &str) -> Result<super::store::Versioned, SubError> {
        self.inner.store.get(id).await.map_err(SubError::storage)?.ok_or_else(SubError::not_found)
    }

    pub async fn get(&self, id: &str) -> Result<Record, SubError> {
        Ok(self.read(id).await?.record)
    }

    pub async fn put(&self, id: &str, spec: Spec, base_url: String) -> Result<Created, SubError> {
        let hash = spec.hash();
        for _ in 0..CAS_ATTEMPTS {
            if let Some(existing) = self.inner.store.get(id).await.map_err(SubError::storage)? {
                if existing.record.config_hash == hash {
                    return Ok(Created { created: false, record: existing.record });
                }
                return Err(SubError::new(
                    409,
                    "SUBSCRIPTION_ALREADY_EXISTS",
                    "a subscription with this id and another configuration exists",
                ));
            }
            if let Some(url) = &spec.webhook_url {
                url_guard::check(url, self.allow_loopback())
                    .await
                    .map_err(|e| SubError::new(400, "WEBHOOK_URL_REJECTED", e.0))?;
            }
            if self.count() >= MAX_SUBSCRIPTIONS {
                return Err(SubError::new(
                    409,
                    "SUBSCRIPTION_LIMIT",
                    format!("at most {MAX_SUBSCRIPTIONS} subscriptions"),
                ));
            }
            let mut record = Record::new(id, &spec, base_url.clone(), now_ms());
            for stream in &spec.streams {
                let tail = self.tail(stream).await?;
                record.links.insert(stream.clone(), Link { explicit: true, glob: false, acked: Some(tail) });
            }
            if self.inner.store.create(&record).await.map_err(SubError::storage)? {
                self.cache_put(record.clone());
                return Ok(Created { created: true, record });
            }
        }
        Err(SubError::busy())
    }

    pub async fn delete(&self, id: &str) -> Result<(), SubError> {
        self.inner.store.remove(id).await.map_err(SubError::storage)?;
        self.cache_remove(id);
        Ok(())
    }

    /// `POST subscriptions/:id/streams`: explicit links, acknowledged up to their tails now.
    pub async fn add_streams(&self, id: &str, streams: Vec<String>) -> Result<(), SubError> {
        for _ in 0..CAS_ATTEMPTS {
            let read = self.read(id).await?;
            let mut record = read.record.clone();
            for stream in &streams {
                let full = record.links.len() >= model::MAX_LINKS;
                match record.links.get_mut(stream) {
                    Some(link) => link.explicit = true,
                    None if full => {
                        return Err(SubError::invalid(format!(
                            "a subscription follows at most {} streams",
                            model::MAX_LINKS
                        )))
                    }
                    None => {
                        let tail = self.tail(stream).await?;
                        record.links.insert(stream.clone(), Link { explicit: true, glob: false, acked: Some(tail) });
                    }
                }
            }
            if record == read.record || self.commit(&read, record).await? {
                return Ok(());
            }
        }
        Err(SubError::busy())
    }

    /// `DELETE subscriptions/:id/streams/:path`: the explicit link goes (a glob link stays).
    pub async fn remove_stream(&self, id: &str, stream: &str) -> Result<(), SubError> {
        for _ in 0..CAS_ATTEMPTS {
            let read = self.read(id).await?;
            let mut record = read.record.clone();
            if let Some(link) = record.links.get_mut(stream) {
                link.explicit = false;
                if !link.glob {
                    record.links.remove(stream);
                }
            }
            if record == read.record || self.commit(&read, record).await? {
                return Ok(());
            }
        }
        Err(SubError::busy())
    }

    /// `POST …/callback` (webhook), `POST …/ack` (pull-wake): acknowledge, and end the wake
    /// with `done`. `{"ok":true,"next_wake":…}`.
    pub async fn acknowledge(&self, id: &str, kind: Kind, token: &str, body: &Value) -> Result<Value, SubError> {
        let request = WakeRequest::parse(body)?;
        for _ in 0..CAS_ATTEMPTS {
            let read = self.read(id).await?;
            let mut record = read.record.clone();
            self.fence(&record, kind, token, &request)?;
            for (stream, offset) in &request.acks {
                let link = record
                    .links
                    .get(stream)
                    .ok_or_else(|| invalid_offset(format!("{stream:?} is not a stream of this subscription")))?;
                let seq = match Offset::parse(Some(offset)) {
                    Ok(Offset::At(position)) if position.epoch == self.inner.engine.epoch() => position.seq,
                    _ => return Err(invalid_offset(format!("{offset:?} is not an offset of stream {stream:?}"))),
                };
                if seq < link.acked.unwrap_or(0) {
                    return Err(invalid_offset(format!(
                        "offset {offset} is before what stream {stream:?} acknowledged"
                    )));
                }
                if seq > self.tail(stream).await? {
                    return Err(invalid_offset(format!("offset {offset} is beyond the tail of stream {stream:?}")));
                }
                if let Some(link) = record.links.get_mut(stream) {
                    link.acked = Some(seq);
                }
            }
            let mut action = None;
            if request.done {
                record.wake = None;
                let tails = self.tails(&record).await?;
                action = self.make_wake(&mut record, &tails);
            } else if let Some(wake) = record.wake.as_mut() {
                wake.lease_until_ms = Some(now_ms() + record.lease_ttl_ms);
            }
            let next_wake = action.is_some();
            if self.commit(&read, record).await? {
                if let Some(action) = action {
                    self.act(action).await;
                }
                return Ok(json!({ "ok": true, "next_wake": next_wake }));
            }
        }
        Err(SubError::busy())
    }

    /// `POST …/claim`: the pull-wake worker `worker` takes the wake (made now if work is
    /// pending and none was), for `lease_ttl_ms`.
    pub async fn claim(&self, id: &str, worker: &str) -> Result<Value, SubError> {
        for _ in 0..CAS_ATTEMPTS {
            let read = self.read(id).await?;
            let mut record = read.record.clone();
            if record.kind != Kind::PullWake {
                return Err(SubError::invalid("not a pull-wake subscription"));
            }
            let now = now_ms();
            if let Some(wake) = &record.wake {
                if let (Some(holder), Some(until)) = (&wake.holder, wake.lease_until_ms) {
                    if until > now {
                        let mut error = SubError::new(409, "ALREADY_CLAIMED", "the wake is claimed by another worker");
                        error.extra = Some(json!({ "current_holder": holder, "generation": record.generation }));
                        return Err(error);
                    }
                }
            }
            let tails = self.tails(&record).await?;
            let mut action = None;
            if record.wake.as_ref().is_none_or(|w| w.holder.is_some()) {
                // None, or a claim whose lease ran out: a new generation.
                record.wake = None;
                action = self.make_wake(&mut record, &tails);
                if action.is_none() {
                    return Err(SubError::new(
                        409,
                        "NO_PENDING_WORK",
                        "no stream of this subscription has unacknowledged data",
                    ));
                }
            }
            let generation = record.generation;
            let lease_ttl_ms = record.lease_ttl_ms;
            let wake = record.wake.as_mut().expect("a wake was found or made");
            wake.holder = Some(worker.to_string());
            wake.lease_until_ms = Some(now + lease_ttl_ms);
            let wake_id = wake.id.clone();
            let streams = self.stream_infos(&record, &tails);
            if self.commit(&read, record).await? {
                if let Some(action) = action {
                    self.act(action).await;
                }
                let token = self.signer().token(id, generation, &wake_id);
                return Ok(json!({
                    "wake_id": wake_id,
                    "generation": generation,
                    "token": token,
                    "streams": streams,
                    "lease_ttl_ms": lease_ttl_ms,
                }));
            }
        }
        Err(SubError::busy())
    }

    /// `POST …/release`: the worker gives the wake back; the next is made if work is pending.
    pub async fn release(&self, id: &str, token: &str, body: &Value) -> Result<(), SubError> {
        let request = WakeRequest::parse(body)?;
        for _ in 0..CAS_ATTEMPTS {
            let read = self.read(id).await?;
            let record = read.record.clone();
            self.fence(&record, Kind::PullWake, token, &request)?;
            if self.end_wake(&read, record).await? {
                return Ok(());
            }
        }
        Err(SubError::busy())
    }

    /// A webhook receiver answered: with `done`, the wake's snapshot is acknowledged and the
    /// wake ends; otherwise (or after the last failed attempt) its lease runs from now.
    pub(super) async fn finish_wake(&self, id: &str, wake_id: &str, done: bool) -> Result<(), SubError> {
        for _ in 0..CAS_ATTEMPTS {
            let Some(read) = self.inner.store.get(id).await.map_err(SubError::storage)? else { return Ok(()) };
            let mut record = read.record.clone();
            let Some(wake) = record.wake.as_mut().filter(|w| w.id == wake_id) else { return Ok(()) };
            let mut action: Option<Action> = None;
            if !done {
                wake.lease_until_ms = Some(now_ms() + record.lease_ttl_ms);
            } else {
                let snapshot: BTreeMap<String, u64> = wake.snapshot.clone();
                for (stream, tail) in snapshot {
                    if let Some(link) = record.links.get_mut(&stream) {
                        link.acked = Some(link.acked.map_or(tail, |a| a.max(tail)));
                    }
                }
                record.wake = None;
                let tails = self.tails(&record).await?;
                action = self.make_wake(&mut record, &tails);
            }
            if self.commit(&read, record).await? {
                if let Some(action) = action {
                    self.act(action).await;
                }
                return Ok(());
            }
        }
        Err(SubError::busy())
    }

    /// The token must be ours for this subscription (`401`), and name its current wake and
    /// generation, as the body must (`409 FENCED`).
    fn fence(&self, record: &Record, kind: Kind, token: &str, request: &WakeRequest) -> Result<(), SubError> {
        if record.kind != kind {
            return Err(SubError::invalid(format!("not a {} subscription", kind.as_str())));
        }
        let Some((generation, wake_id)) = self.signer().verify_token(&record.id, token) else {
            return Err(SubError::new(401, "TOKEN_INVALID", "the token is not valid for this subscription"));
        };
        let fenced = || SubError::new(409, "FENCED", "this wake generation is over");
        let wake = record.wake.as_ref().ok_or_else(fenced)?;
        let current = wake.id == wake_id
            && generation == record.generation
            && request.generation == Some(record.generation)
            && request.wake_id.as_deref() == Some(wake.id.as_str())
            && (kind == Kind::Webhook || wake.holder.is_some())
            && wake.lease_until_ms.is_none_or(|until| until > now_ms());
        if !current {
            return Err(fenced());
        }
        Ok(())
    }

    async fn tail(&self, stream: &str) -> Result<u64, SubError> {
        Ok(self.inner.engine.head(stream).await.map_err(SubError::storage)?.0.seq)
    }

    /// The subscription as the API shows it (never a secret).
    pub fn view(&self, record: &Record) -> Value {
        let streams: Vec<Value> = record
            .links
            .iter()
            .map(|(path, link)| json!({ "path": path, "link_type": link.link_type(), "acked_offset": self.acked_token(link.acked) }))
            .collect();
        let created_at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(record.created_ms) * 1_000_000)
            .ok()
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok());
        let mut view = json!({
            "id": record.id,
            "subscription_id": record.id,
            "type": record.kind.as_str(),
            "streams": streams,
            "lease_ttl_ms": record.lease_ttl_ms,
            "created_at": created_at,
            "status": "active",
            "generation": record.generation,
        });
        let object = view.as_object_mut().expect("an object");
        if let Some(pattern) = &record.pattern {
            object.insert("pattern".into(), json!(pattern));
        }
        if let Some(description) = &record.description {
            object.insert("description".into(), json!(description));
        }
        if let Some(stream) = &record.wake_stream {
            object.insert("wake_stream".into(), json!(stream));
        }
        if let Some(url) = &record.webhook_url {
            let signing = json!({
                "alg": "ed25519",
                "kid": self.signer().kid(),
                "jwks_url": format!("{}/__ds/jwks.json", record.base_url),
            });
            object.insert("webhook".into(), json!({ "url": url, "signing": signing }));
        }
        view
    }
}

fn invalid_offset(message: String) -> SubError {
    SubError::new(409, "INVALID_OFFSET", message)
}
