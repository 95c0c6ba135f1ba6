//! The reserved subscription API (PRODUCT.md §13, WRITE.md §6): webhook and pull-wake
//! subscriptions to streams, by glob pattern or by name.
//!
//! How a wake happens:
//! 1. A durable append (`POST`, `PUT` with a body, `/_broadcast`) calls [`Subscriptions::appended`]
//!    on the node that wrote it. That looks at this node's in-memory copy of the subscriptions
//!    and, when one follows the stream and has no wake in progress, marks it dirty. Nothing else
//!    happens on the request's path.
//! 2. One task per node takes dirty subscriptions, reads each from the store, links a stream a
//!    pattern matched, and, when a linked stream's tail is past what was acknowledged, makes a
//!    wake (new generation) by compare-and-swap. Only the node whose swap wins acts on the wake:
//!    it queues the webhook delivery or writes the wake event into the pull-wake stream. So a
//!    wake is delivered once however many nodes saw appends.
//! 3. The wake ends with `done` (callback, ack, or the receiver's `{"done":true}`), a release,
//!    or its lease running out (a sweeper, on every node, races by compare-and-swap); a new
//!    one follows at once if work is pending.
//!
//! No wake is lost to a race: whenever any node sees a subscription's wake end (its own
//! change, or another node's through the store's watch), it re-checks that subscription's
//! streams, so an append that saw "wake in progress" just before the wake ended is still
//! found (docs/DECISIONS.md, "Subscriptions").

pub mod glob;
pub mod model;
pub mod signing;
pub mod store;
pub mod url_guard;

mod delivery;
mod ops;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::{json, Value};

use crate::config::Config;
use crate::engine::Engine;
use crate::offset::Position;
use crate::storage::StorageError;
use model::{Kind, Record, Wake};

pub use ops::Created;

/// Streams waiting to be linked to glob subscriptions, all subscriptions together; beyond
/// it the stream is not linked (the subscription is still re-checked).
const MAX_DIRTY_LINKS: usize = 10_000;
/// Subscriptions per store.
pub const MAX_SUBSCRIPTIONS: usize = 10_000;
/// How often each node looks for expired leases.
const SWEEP_EVERY: Duration = Duration::from_millis(200);
/// Attempts of one compare-and-swap before giving up on a busy record.
const CAS_ATTEMPTS: usize = 16;

/// A refusal of the subscription API: `{"error":{"code":…,"message":…}}`.
#[derive(Debug, Clone)]
pub struct SubError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    /// More fields of the error object (`current_holder`).
    pub extra: Option<Value>,
}

impl SubError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> SubError {
        SubError { status, code, message: message.into(), extra: None }
    }
    pub fn invalid(message: impl Into<String>) -> SubError {
        SubError::new(400, "INVALID_REQUEST", message)
    }
    fn not_found() -> SubError {
        SubError::new(404, "SUBSCRIPTION_NOT_FOUND", "subscription not found")
    }
    fn storage(e: StorageError) -> SubError {
        log::error!("subscriptions: store failed: {e}");
        SubError::new(503, "UNAVAILABLE", "subscription store unavailable, retry later")
    }
    fn busy() -> SubError {
        SubError::new(503, "UNAVAILABLE", "subscription changed too often concurrently, retry")
    }
}

/// Cheap-to-clone handle.
#[derive(Clone)]
pub struct Subscriptions {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    store: store::Store,
    signer: signing::Signer,
    allow_loopback: bool,
    /// This node's copy of every subscription (for the append hook and the sweeper).
    cache: RwLock<HashMap<String, Arc<Record>>>,
    dirty: Mutex<Dirty>,
    wake_worker: tokio::sync::Notify,
    deliveries: delivery::Queue,
}

#[derive(Default)]
struct Dirty {
    subscriptions: HashMap<String, HashSet<String>>,
    links: usize,
}

/// What to do once a wake is stored (by the node whose swap made it).
enum Action {
    Webhook(delivery::Delivery),
    WakeEvent { stream: String, event: Vec<u8> },
}

/// How long a start waits for the subscription store (cluster mode: its KV bucket).
const START_PATIENCE: std::time::Duration = std::time::Duration::from_secs(20);

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Subscriptions {
    /// Opens the store, loads the signing key and the subscriptions, and starts this node's
    /// background tasks on the current runtime.
    pub async fn start(engine: Engine, config: &Config) -> Result<Subscriptions, StorageError> {
        // A NATS KV bucket made a moment ago (by this node or another) may not answer on every
        // server yet: try again for a while before giving up the start.
        let deadline = std::time::Instant::now() + START_PATIENCE;
        let (store, seed) = loop {
            let opened = async {
                let store = store::Store::open(&engine, config).await?;
                let seed = store.signing_seed(signing::Signer::new_seed()).await?;
                Ok::<_, StorageError>((store, seed))
            };
            match opened.await {
                Ok(opened) => break opened,
                Err(e @ StorageError::Unavailable(_)) if std::time::Instant::now() < deadline => {
                    log::warn!("subscriptions: the store is not ready yet ({e}); trying again");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let allow_loopback = config.ds.webhooks_allow_loopback;
        let subscriptions = Subscriptions {
            inner: Arc::new(Inner {
                engine,
                store: store.clone(),
                signer: signing::Signer::from_seed(seed),
                allow_loopback,
                cache: RwLock::new(HashMap::new()),
                dirty: Mutex::new(Dirty::default()),
                wake_worker: tokio::sync::Notify::new(),
                deliveries: delivery::Queue::new(allow_loopback),
            }),
        };
        for record in store.load_all().await? {
            subscriptions.cache_put(record);
        }
        subscriptions.spawn_tasks();
        Ok(subscriptions)
    }

    fn spawn_tasks(&self) {
        let this = self.clone();
        tokio::spawn(async move { this.wake_loop().await });
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                this.sweep().await;
            }
        });
        if let store::Store::Nats(_) = self.inner.store {
            let this = self.clone();
            tokio::spawn(async move {
                loop {
                    let watcher = this.clone();
                    let result = this
                        .inner
                        .store
                        .watch(move |change| match change {
                            Ok(record) => watcher.cache_put(record),
                            Err(id) => watcher.cache_remove(&id),
                        })
                        .await;
                    if let Err(e) = result {
                        log::warn!("subscriptions: watch of the KV bucket ended: {e}; restarting");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            });
        }
        self.inner.deliveries.start(self.clone());
    }

    pub fn signer(&self) -> &signing::Signer {
        &self.inner.signer
    }

    pub fn allow_loopback(&self) -> bool {
        self.inner.allow_loopback
    }

    /// The append hook: `stream` took a durable append on this node. Cheap when no
    /// subscription follows it, or when the ones that do already have a wake in progress.
    pub fn appended(&self, stream: &str) {
        let hits: Vec<String> = {
            let cache = self.inner.cache.read().expect("subscription cache lock");
            if cache.is_empty() {
                return;
            }
            cache
                .values()
                .filter(|r| r.follows(stream) && !(r.wake.is_some() && r.links.contains_key(stream)))
                .map(|r| r.id.clone())
                .collect()
        };
        if !hits.is_empty() {
            self.mark_dirty(hits, Some(stream));
        }
    }

    fn mark_dirty(&self, ids: Vec<String>, stream: Option<&str>) {
        let mut dirty = self.inner.dirty.lock().expect("dirty lock");
        for id in ids {
            let full = dirty.links >= MAX_DIRTY_LINKS;
            let streams = dirty.subscriptions.entry(id).or_default();
            if let Some(stream) = stream {
                if full {
                    crate::metrics::get().subscription_triggers_dropped.inc();
                } else if streams.insert(stream.to_string()) {
                    dirty.links += 1;
                }
            }
        }
        drop(dirty);
        self.inner.wake_worker.notify_one();
    }

    /// Takes dirty subscriptions and makes the wakes they need, one at a time.
    async fn wake_loop(&self) {
        loop {
            self.inner.wake_worker.notified().await;
            let batch = {
                let mut dirty = self.inner.dirty.lock().expect("dirty lock");
                dirty.links = 0;
                std::mem::take(&mut dirty.subscriptions)
            };
            for (id, streams) in batch {
                if let Err(e) = self.evaluate(&id, streams.into_iter().collect()).await {
                    log::warn!("subscriptions: wake check of {id:?} failed: {}", e.message);
                }
            }
        }
    }

    /// Links `streams` that the pattern matches, and makes a wake if none is in progress and
    /// a linked stream has news.
    async fn evaluate(&self, id: &str, streams: Vec<String>) -> Result<(), SubError> {
        for _ in 0..CAS_ATTEMPTS {
            let Some(read) = self.inner.store.get(id).await.map_err(SubError::storage)? else {
                self.cache_remove(id);
                return Ok(());
            };
            let mut record = read.record.clone();
            let mut changed = false;
            for stream in &streams {
                let matches = record.pattern.as_deref().is_some_and(|p| glob::matches(p, stream));
                if matches && !record.links.contains_key(stream) {
                    if record.links.len() >= model::MAX_LINKS {
                        crate::metrics::get().subscription_triggers_dropped.inc();
                        continue;
                    }
                    record.links.insert(stream.clone(), model::Link { glob: true, ..Default::default() });
                    changed = true;
                }
            }
            let mut action = None;
            if record.wake.is_none() {
                let tails = self.tails(&record).await?;
                action = self.make_wake(&mut record, &tails);
                changed |= action.is_some();
            }
            if !changed {
                return Ok(());
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

    /// Ends wakes whose lease ran out, and makes the next if work is pending.
    async fn sweep(&self) {
        let now = now_ms();
        let expired: Vec<(String, String)> = {
            let cache = self.inner.cache.read().expect("subscription cache lock");
            cache
                .values()
                .filter_map(|r| {
                    let wake = r.wake.as_ref()?;
                    (wake.lease_until_ms? <= now).then(|| (r.id.clone(), wake.id.clone()))
                })
                .collect()
        };
        for (id, wake_id) in expired {
            if let Err(e) = self.expire(&id, &wake_id).await {
                log::warn!("subscriptions: lease expiry of {id:?} failed: {}", e.message);
            }
        }
    }

    async fn expire(&self, id: &str, wake_id: &str) -> Result<(), SubError> {
        for _ in 0..CAS_ATTEMPTS {
            let Some(read) = self.inner.store.get(id).await.map_err(SubError::storage)? else { return Ok(()) };
            let record = read.record.clone();
            match &record.wake {
                Some(wake) if wake.id == wake_id && wake.lease_until_ms.is_some_and(|t| t <= now_ms()) => {}
                _ => return Ok(()),
            }
            if self.end_wake(&read, record).await? {
                return Ok(());
            }
        }
        Err(SubError::busy())
    }

    /// Ends the wake of `record` (a copy of `read`'s), makes the next one if work is pending,
    /// and commits both; once committed, acts on the new wake. `false`: the record moved.
    async fn end_wake(&self, read: &store::Versioned, mut record: Record) -> Result<bool, SubError> {
        record.wake = None;
        let tails = self.tails(&record).await?;
        let action = self.make_wake(&mut record, &tails);
        if !self.commit(read, record).await? {
            return Ok(false);
        }
        if let Some(action) = action {
            self.act(action).await;
        }
        Ok(true)
    }

    /// Each linked stream's tail.
    async fn tails(&self, record: &Record) -> Result<BTreeMap<String, u64>, SubError> {
        let mut tails = BTreeMap::new();
        for path in record.links.keys() {
            let (tail, _) = self.inner.engine.head(path).await.map_err(SubError::storage)?;
            tails.insert(path.clone(), tail.seq);
        }
        Ok(tails)
    }

    /// Starts a wake (next generation) if a linked stream has news; what to do once stored.
    fn make_wake(&self, record: &mut Record, tails: &BTreeMap<String, u64>) -> Option<Action> {
        let pending =
            record.links.iter().find(|(path, link)| tails.get(*path).copied().unwrap_or(0) > link.acked.unwrap_or(0));
        let trigger = pending?.0.clone();
        record.generation += 1;
        let wake_id = format!("w_{}", crate::offset::Epoch::random());
        let now = now_ms();
        let lease_until_ms = match record.kind {
            // Delivery (with its retries) runs inside the lease; see `delivery`.
            Kind::Webhook => Some(now + record.lease_ttl_ms + delivery::BUDGET_MS),
            // Waits for a worker's claim, however long.
            Kind::PullWake => None,
        };
        record.wake = Some(Wake { id: wake_id.clone(), snapshot: tails.clone(), holder: None, lease_until_ms });
        match record.kind {
            Kind::Webhook => {
                let token = self.inner.signer.token(&record.id, record.generation, &wake_id);
                let body = json!({
                    "subscription_id": record.id,
                    "wake_id": wake_id,
                    "generation": record.generation,
                    "streams": self.stream_infos(record, tails),
                    "callback_url": record.callback_url(),
                    "callback_token": token,
                });
                Some(Action::Webhook(delivery::Delivery {
                    subscription: record.id.clone(),
                    wake_id,
                    url: record.webhook_url.clone().unwrap_or_default(),
                    body: body.to_string().into(),
                    lease_ttl_ms: record.lease_ttl_ms,
                }))
            }
            Kind::PullWake => {
                let event = json!({
                    "type": "wake",
                    "subscription_id": record.id,
                    "stream": trigger,
                    "generation": record.generation,
                    "ts": now,
                });
                Some(Action::WakeEvent {
                    stream: record.wake_stream.clone().unwrap_or_default(),
                    event: event.to_string().into_bytes(),
                })
            }
        }
    }

    async fn act(&self, action: Action) {
        match action {
            Action::Webhook(delivery) => self.inner.deliveries.push(delivery),
            Action::WakeEvent { stream, event } => {
                // Through the engine's own write path: durable and ordered like any append. Not
                // through the HTTP hook: a wake event wakes nobody (no loops between
                // subscriptions that follow each other's wake streams).
                let op = crate::writes::WriteOp::Append(crate::writes::Append {
                    content_type: Some("application/json".into()),
                    messages: vec![event.into()],
                    seq: None,
                    close: false,
                    producer: None,
                });
                if let Err(e) = self.inner.engine.write(&stream, op).await {
                    log::warn!("subscriptions: wake event not written to stream {stream:?}: {e:?}");
                }
            }
        }
    }

    /// Stores `record` over what was read. `false`: it changed since.
    async fn commit(&self, read: &store::Versioned, mut record: Record) -> Result<bool, SubError> {
        record.version = read.record.version + 1;
        if !self.inner.store.replace(read, &record).await.map_err(SubError::storage)? {
            return Ok(false);
        }
        self.cache_put(record);
        Ok(true)
    }

    /// Updates this node's copy (never with an older version). A wake that ended makes the
    /// subscription dirty: see the module comment.
    fn cache_put(&self, record: Record) {
        let id = record.id.clone();
        let ended = {
            let mut cache = self.inner.cache.write().expect("subscription cache lock");
            let old = cache.get(&id);
            if old.is_some_and(|old| old.version > record.version) {
                return;
            }
            let ended = old.is_some_and(|old| old.wake.is_some()) && record.wake.is_none();
            cache.insert(id.clone(), Arc::new(record));
            ended
        };
        if ended {
            self.mark_dirty(vec![id], None);
        }
    }

    fn cache_remove(&self, id: &str) {
        self.inner.cache.write().expect("subscription cache lock").remove(id);
    }

    fn cached_wake(&self, id: &str) -> Option<String> {
        let cache = self.inner.cache.read().expect("subscription cache lock");
        cache.get(id)?.wake.as_ref().map(|w| w.id.clone())
    }

    fn count(&self) -> usize {
        self.inner.cache.read().expect("subscription cache lock").len()
    }

    fn token_of(&self, seq: u64) -> String {
        Position { epoch: self.inner.engine.epoch(), seq }.token()
    }

    fn acked_token(&self, acked: Option<u64>) -> String {
        acked.map_or_else(|| "-1".to_string(), |seq| self.token_of(seq))
    }

    /// `[{path, link_type, acked_offset, tail_offset, has_pending}]`.
    fn stream_infos(&self, record: &Record, tails: &BTreeMap<String, u64>) -> Vec<Value> {
        record
            .links
            .iter()
            .map(|(path, link)| {
                let tail = tails.get(path).copied().unwrap_or(0);
                json!({
                    "path": path,
                    "link_type": link.link_type(),
                    "acked_offset": self.acked_token(link.acked),
                    "tail_offset": self.token_of(tail),
                    "has_pending": tail > link.acked.unwrap_or(0),
                })
            })
            .collect()
    }
}
