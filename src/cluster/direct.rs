//! Batched Direct Get: messages of one subject from a sequence on, in one request.
//!
//! async-nats 0.51 has no batched Direct Get, so the request is made by hand: a JSON request to
//! `$JS.API.DIRECT.GET.<stream>` with a reply subject; one replica answers with the messages
//! (payload = the stored body; headers `Nats-Sequence`, `Nats-Num-Pending` and the stored
//! ones) and ends with an empty `204 EOB` status message, or only a `404` when nothing matches.
//!
//! Replies come to one long-lived wildcard inbox per node and are routed by their last token,
//! so a read costs one publish, not a subscribe and unsubscribe too.
//!
//! Any replica may answer and a replica may lag the leader (nats-server 2.15 has no "at least
//! sequence N" option), so callers that know what must be there check for it and ask again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{Client, Message};
use futures_util::StreamExt;
use tokio::sync::mpsc;

#[derive(Debug, serde::Serialize)]
struct Request<'a> {
    seq: u64,
    next_by_subj: &'a str,
    batch: usize,
    max_bytes: usize,
}

/// One stored message, as much of it as a read needs. The payload is copied out of the
/// connection's read buffer and the rest of the NATS message is dropped at once: a reply of
/// 1000 messages holds about their payloads, not 1000 header maps.
#[derive(Debug, Clone)]
pub struct Item {
    pub seq: u64,
    /// The `Ds-Prev` and `Ds-Prev-Back` headers (see the cluster module docs).
    pub prev: Option<u64>,
    pub prev_back: Option<u64>,
    /// Messages of the subject after this one (on the answering replica).
    pub pending: u64,
    /// What the message says about its stream (see `state`).
    pub marks: super::state::Marks,
    pub payload: bytes::Bytes,
}

/// What one batched get returned.
#[derive(Debug, Default)]
pub struct Batch {
    pub messages: Vec<Item>,
    /// Messages of the subject left after the last one returned (from the answering replica).
    pub pending: u64,
    /// Every message came from the node's cache (`cache`), through all a read must reach.
    pub from_cache: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("NATS: {0}")]
    Nats(String),
    #[error("unexpected answer status {0}")]
    Status(u16),
}

type Routes = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<Message>>>>;

/// The node's reply inbox for Direct Gets.
#[derive(Clone)]
pub struct DirectGet {
    client: Client,
    api: String,
    prefix: String,
    next: Arc<AtomicU64>,
    routes: Routes,
}

impl DirectGet {
    /// Subscribes the inbox; the routing task runs on the current runtime until the client
    /// closes.
    pub async fn new(client: Client, stream: &str) -> Result<DirectGet, async_nats::SubscribeError> {
        let prefix = client.new_inbox();
        let mut inbox = client.subscribe(format!("{prefix}.*")).await?;
        let routes: Routes = Arc::default();
        let table = routes.clone();
        tokio::spawn(async move {
            while let Some(message) = inbox.next().await {
                let Some(id) = message.subject.rsplit('.').next().and_then(|t| t.parse::<u64>().ok()) else {
                    continue;
                };
                let route = table.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned();
                if let Some(route) = route {
                    let _ = route.send(message);
                }
            }
        });
        Ok(DirectGet {
            client,
            api: format!("$JS.API.DIRECT.GET.{stream}"),
            prefix,
            next: Arc::new(AtomicU64::new(1)),
            routes,
        })
    }

    /// Up to `batch` messages of `subject` with sequence ≥ `from`, stopping once `max_bytes`
    /// are reached (at least one message is always returned).
    pub async fn batch(
        &self,
        subject: &str,
        from: u64,
        batch: usize,
        max_bytes: usize,
        timeout: Duration,
    ) -> Result<Batch, GetError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        crate::metrics::get().nats_direct_gets.inc();
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.lock().insert(id, tx);
        let _route = RouteGuard { routes: &self.routes, id };
        let request = serde_json::to_vec(&Request { seq: from, next_by_subj: subject, batch, max_bytes })
            .map_err(|e| GetError::Nats(e.to_string()))?;
        self.client
            .publish_with_reply(self.api.clone(), format!("{}.{id}", self.prefix), request.into())
            .await
            .map_err(|e| GetError::Nats(e.to_string()))?;
        let mut out = Batch::default();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let message = match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(message)) => message,
                Ok(None) => return Err(GetError::Nats("reply inbox closed".into())),
                Err(_) => return Err(GetError::Timeout(timeout)),
            };
            match message.status.map(|s| s.as_u16()) {
                None => {
                    out.pending = header_u64(&message, "Nats-Num-Pending").unwrap_or(0);
                    out.messages.push(Item {
                        seq: header_u64(&message, "Nats-Sequence").unwrap_or(0),
                        prev: header_u64(&message, super::PREV),
                        prev_back: header_u64(&message, super::PREV_BACK),
                        pending: out.pending,
                        marks: super::state::Marks::from_headers(message.headers.as_ref()),
                        payload: bytes::Bytes::copy_from_slice(&message.payload),
                    });
                }
                Some(204) => {
                    out.pending = header_u64(&message, "Nats-Num-Pending").unwrap_or(out.pending);
                    return Ok(out);
                }
                // Nothing at or after `from`.
                Some(404) => return Ok(out),
                Some(408) => return Err(GetError::Timeout(timeout)),
                Some(status) => return Err(GetError::Status(status)),
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, mpsc::UnboundedSender<Message>>> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Removes a route when its get ends, however it ends (a cancelled read included).
struct RouteGuard<'a> {
    routes: &'a Routes,
    id: u64,
}

impl Drop for RouteGuard<'_> {
    fn drop(&mut self) {
        self.routes.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

/// A numeric header of a message.
pub fn header_u64(message: &Message, name: &str) -> Option<u64> {
    message.headers.as_ref()?.get(name)?.as_str().parse().ok()
}
