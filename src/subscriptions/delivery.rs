//! Webhook deliveries: signed `POST`s to the subscriber, off the request path.
//!
//! Bounded everywhere: a queue of [`QUEUE`] wakes (a full queue drops the wake and counts it
//! in `ds_webhook_queue_dropped_total`; its lease then runs out and the next wake retries),
//! at most [`IN_FLIGHT`] deliveries at once, each attempt limited by [`TIMEOUT`], the reply
//! read up to [`MAX_REPLY`] bytes, and [`ATTEMPTS`] attempts per wake with exponential
//! backoff. A subscription has at most one wake in progress, so a flood of appends to a
//! stream whose receiver is down makes no deliveries beyond that one.
//!
//! After the last failed attempt the wake keeps its lease (`lease_ttl_ms` from then); when
//! it runs out, a new wake (next generation) is made if work is still pending: a dead
//! receiver sees one round of attempts per lease, not a storm.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, Semaphore};

use super::{now_ms, url_guard, Subscriptions};

/// Wakes waiting for delivery, all subscriptions together.
pub const QUEUE: usize = 1024;
/// Deliveries in progress at once.
pub const IN_FLIGHT: usize = 64;
/// One attempt: connect, send, and read the reply.
pub const TIMEOUT: Duration = Duration::from_secs(5);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts per wake, and the pause before the second (doubling after).
pub const ATTEMPTS: u32 = 4;
pub const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Most reply bytes read (a reply is `{"done":true}` or nothing).
const MAX_REPLY: usize = 64 * 1024;
/// Time a delivery can take with every attempt timing out: added to a webhook wake's lease.
pub const BUDGET_MS: u64 = {
    let mut total = 0u64;
    let mut i = 0;
    while i < ATTEMPTS {
        total += TIMEOUT.as_millis() as u64 + (FIRST_BACKOFF.as_millis() as u64) * (1 << i) * 6 / 5;
        i += 1;
    }
    total
};

/// One wake to deliver.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub subscription: String,
    pub wake_id: String,
    pub url: String,
    pub body: Bytes,
    pub lease_ttl_ms: u64,
}

pub struct Queue {
    tx: mpsc::Sender<Delivery>,
    rx: std::sync::Mutex<Option<mpsc::Receiver<Delivery>>>,
    client: reqwest::Client,
}

impl Queue {
    pub fn new(allow_loopback: bool) -> Queue {
        let (tx, rx) = mpsc::channel(QUEUE);
        let client = reqwest::Client::builder()
            // Names resolve only to addresses that pass the URL check, and reqwest connects
            // to exactly those (no DNS rebinding between check and connect).
            .dns_resolver(Arc::new(url_guard::SafeResolver { allow_loopback }))
            // A redirect could point anywhere, the private network included.
            .redirect(reqwest::redirect::Policy::none())
            // An environment proxy would connect on our behalf to an unchecked address.
            .no_proxy()
            .timeout(TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_max_idle_per_host(2)
            .user_agent(concat!("anycable-ds/", env!("CARGO_PKG_VERSION"), " webhooks"))
            .build()
            .expect("the webhook HTTP client builds");
        Queue { tx, rx: std::sync::Mutex::new(Some(rx)), client }
    }

    /// Queues a wake; drops it (counted) when the queue is full.
    pub fn push(&self, delivery: Delivery) {
        if let Err(e) = self.tx.try_send(delivery) {
            crate::metrics::get().webhook_queue_dropped.inc();
            log::warn!(
                "webhook queue full: wake of subscription {:?} dropped (retried after its lease)",
                e.into_inner().subscription
            );
        }
    }

    /// Starts the dispatcher (once).
    pub fn start(&self, subscriptions: Subscriptions) {
        let Some(mut rx) = self.rx.lock().expect("queue lock").take() else { return };
        let permits = Arc::new(Semaphore::new(IN_FLIGHT));
        tokio::spawn(async move {
            while let Some(delivery) = rx.recv().await {
                let Ok(permit) = permits.clone().acquire_owned().await else { return };
                let subscriptions = subscriptions.clone();
                tokio::spawn(async move {
                    subscriptions.deliver(delivery).await;
                    drop(permit);
                });
            }
        });
    }
}

enum Outcome {
    Done,
    Accepted,
    Failed(String),
}

impl Subscriptions {
    async fn deliver(&self, delivery: Delivery) {
        let m = crate::metrics::get();
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=ATTEMPTS {
            // A wake that ended (acked, expired, subscription deleted) is not delivered again.
            if self.cached_wake(&delivery.subscription).as_deref() != Some(delivery.wake_id.as_str()) {
                m.webhook_deliveries.with_label_values(&["stale"]).inc();
                return;
            }
            match self.attempt(&delivery).await {
                Ok(outcome) => {
                    let result = match outcome {
                        Outcome::Done => self.finish_wake(&delivery.subscription, &delivery.wake_id, true).await,
                        Outcome::Accepted => self.finish_wake(&delivery.subscription, &delivery.wake_id, false).await,
                        Outcome::Failed(why) => {
                            m.webhook_deliveries.with_label_values(&["failed"]).inc();
                            log::debug!("webhook of {:?}, attempt {attempt}: {why}", delivery.subscription);
                            if attempt < ATTEMPTS {
                                let jitter = rand::random_range(0.8..1.2);
                                tokio::time::sleep(backoff.mul_f64(jitter)).await;
                                backoff *= 2;
                            }
                            continue;
                        }
                    };
                    m.webhook_deliveries.with_label_values(&["ok"]).inc();
                    if let Err(e) = result {
                        log::warn!(
                            "webhook of {:?} delivered, state not updated: {}",
                            delivery.subscription,
                            e.message
                        );
                    }
                    return;
                }
                Err(why) => {
                    m.webhook_deliveries.with_label_values(&["refused"]).inc();
                    log::warn!("webhook of {:?} not sent: {why}", delivery.subscription);
                    break;
                }
            }
        }
        m.webhook_deliveries.with_label_values(&["gave_up"]).inc();
        log::warn!(
            "webhook of subscription {:?} gave up after {ATTEMPTS} attempts; next wake after its lease ({} ms)",
            delivery.subscription,
            delivery.lease_ttl_ms
        );
        if let Err(e) = self.finish_wake(&delivery.subscription, &delivery.wake_id, false).await {
            log::warn!("subscriptions: lease of {:?} not updated: {}", delivery.subscription, e.message);
        }
    }

    /// One `POST`. `Err`: the URL may not be used (nothing sent).
    async fn attempt(&self, delivery: &Delivery) -> Result<Outcome, String> {
        // Checked again at each delivery: an IP host here; a name in the resolver.
        let (url, _) = url_guard::check_static(&delivery.url, self.allow_loopback()).map_err(|e| e.0)?;
        let now = now_ms() / 1000;
        let signature = self.signer().signature_header(now, &delivery.body);
        let sent = self
            .inner
            .deliveries
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-signature", signature)
            .body(delivery.body.clone())
            .send()
            .await;
        let mut response = match sent {
            Ok(response) => response,
            // A refused name (resolver) is a failure like a DNS outage: it may pass later.
            Err(e) => return Ok(Outcome::Failed(e.to_string())),
        };
        if !response.status().is_success() {
            return Ok(Outcome::Failed(format!("status {}", response.status())));
        }
        let mut reply = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) if reply.len() + chunk.len() <= MAX_REPLY => reply.extend_from_slice(&chunk),
                // A long or broken reply still means "received": only `done` is lost.
                Ok(Some(_)) | Err(_) => return Ok(Outcome::Accepted),
                Ok(None) => break,
            }
        }
        let done = serde_json::from_slice::<serde_json::Value>(&reply)
            .ok()
            .and_then(|v| v.get("done").and_then(serde_json::Value::as_bool))
            .unwrap_or(false);
        Ok(if done { Outcome::Done } else { Outcome::Accepted })
    }
}
