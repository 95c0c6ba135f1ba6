//! Cluster mode: the log in NATS JetStream, shared by every node (`--broker nats`).
//!
//! Layout in JetStream (names below use `P` for `nats.stream`, `ANYCABLE_DS` by default):
//! - one stream `P`, replicated (`nats.replicas`), subjects `P.s.*`: one subject per DS stream,
//!   `P.s.<token>` with the name encoded by [`subject::token`]; and `P.p.*.*`: one subject per
//!   idempotent producer of a DS stream, holding its state record (`producers`);
//! - its RePublish copies each stored message's headers to `P.w.<token>`: every node
//!   subscribes to `P.w.*` and wakes its own live readers (the hub), whoever wrote;
//! - transient broadcasts go to `P.t.<token>` and reads of streams with a `Stream-TTL` to
//!   `P.a.<token>` (core NATS, never stored); every node takes both in.
//!
//! Offsets: `<epoch>_<JetStream stream sequence>`, the same on every node. Sequences of one DS
//! stream have gaps (other streams' messages sit between them), which is fine: tokens are
//! opaque. The epoch is stored in the stream's metadata when anycable-ds creates it, so a
//! re-created stream (sequences start again at 1) gets a new epoch and old tokens are `410`.
//!
//! Writes: every write to a DS stream (a broadcast, `PUT`, `POST`, `DELETE`) is guarded by
//! its subject's last sequence (`Nats-Expected-Last-Subject-Sequence`, checked by JetStream
//! atomically with the store), so it lands only on the state it was checked against
//! (`publish`). The state itself (content type, closure, TTL, `Stream-Seq`) travels on the
//! stream's own messages (`state`): the write API's metadata changes in the very publish or
//! atomic batch that appends (`write`, `broadcast`). Streams made by `PUT` escape
//! AnyCable's retention (`retention`); expiry (`access`).
//!
//! Gaps left by retention: a reader whose token points before messages that were deleted must
//! get `410`, not silently the next retained one. Each message carries its predecessor in the
//! same DS stream (`Ds-Prev`, or `Ds-Prev-Back` = how far back in the same atomic batch); the
//! publisher guards it with `Nats-Expected-Last-Subject-Sequence`, which JetStream checks
//! atomically, so the chain is exact. A read after token T whose first message's predecessor
//! is newer than T has lost that predecessor: `410`.
//!
//! JetStream forgets a subject with its last message, so once retention deleted every message
//! of a DS stream its last sequence is unknown. What is known: those messages are before F,
//! the first message stored less than `max_age` ago (age-based retention deletes the oldest
//! first; `retention` says why not the stream-wide first sequence), asked after the subject
//! was seen empty. So a message written into an empty subject names `F - 1` as its
//! predecessor (`Ds-Prev`; a new stream's F - 1 is at or before any tail handed out for it),
//! and a read after T of an empty subject is `410` when `T + 1 < F`. Both are exact for a
//! reader that missed messages. A reader at the last message would get that `410` too, so
//! readers' positions move on to the stream-wide one while nothing of their stream lies
//! between (`read::nothing_after`, `lookup::Aging`); only a reader away for longer than half
//! of `history_ttl` can still get a `410` it did not need (docs/DECISIONS.md). The sled engine
//! keeps tombstones instead.
//!
//! Read-your-writes: replicas may lag and any replica answers a Direct Get, so a read first
//! learns what must be there (the tail this node was woken for, or the stream leader's last
//! sequence for the subject) and reads again until the replica that answers has it.

mod access;
mod broadcast;
mod cache;
mod direct;
mod flights;
mod fork;
mod lookup;
mod producers;
mod publish;
mod read;
mod retention;
mod rounds;
mod setup;
mod state;
mod subject;
mod write;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures_util::StreamExt;

use crate::config::Config;
use crate::hub::Hub;
use crate::offset::Epoch;
use direct::{header_u64, DirectGet};
use state::{Marks, StreamState};

pub use publish::HEADER_ROOM;

/// JetStream's cap on one atomic batch (nats-server's `max_batch_size` default).
pub const MAX_BATCH: usize = 1000;
/// Predecessor headers (see the module docs).
pub(crate) const PREV: &str = "Ds-Prev";
pub(crate) const PREV_BACK: &str = "Ds-Prev-Back";
/// How long a read waits for one Direct Get or leader lookup.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Reads that talk to JetStream at once on one node; more wait (within READ_TIMEOUT).
const READS_AT_ONCE: usize = 64;
/// Streams whose state a node remembers (beyond it the map is cleared and re-learned).
const MAX_KNOWN: usize = 100_000;

/// Cheap-to-clone handle to the shared log.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: String,
    epoch: Epoch,
    hub: Hub,
    direct: DirectGet,
    publish_timeout: Duration,
    /// How long a removed stream's `delete` marker is kept (`storage.tombstone_ttl`; see
    /// `write::remove`).
    tombstone_ttl: u64,
    /// Prefix of this process's message and batch ids (unique per process).
    node_id: String,
    ids: AtomicU64,
    /// What this node knows of each DS stream it wrote or saw: its state as some message left
    /// it (a hint: the expected-sequence guard corrects it, see `state`).
    known: Mutex<HashMap<String, Known>>,
    /// What this node knows of producers' state records (see `producers`).
    producers: producers::KnownProducers,
    /// Appends in progress per stream on this node (see `take_turns`).
    turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    connected: Arc<AtomicBool>,
    reads: tokio::sync::Semaphore,
    /// The stream has a leader (quorum), as last checked.
    leader: Arc<AtomicBool>,
    /// The highest stream-wide sequence known stored (see `lookup`).
    seen: Arc<AtomicU64>,
    /// Which sequences were stored half of `max_age` ago (see `lookup::Aging`).
    aging: Arc<lookup::Aging>,
    /// The stream's retention as it has it now (see `retention`).
    retention: Arc<retention::Limits>,
    /// Last reads and writes of streams with a `Stream-TTL` (see `access`).
    accesses: Arc<access::Accesses>,
    /// Messages of streams made by `PUT` this node read (see `cache`).
    cache: Arc<cache::ItemCache>,
    /// Reads of the same range at once, sharing one fetch (see `flights`).
    flights: Arc<flights::Flights>,
    /// Leader look-ups of one subject at once, sharing one sent after each began (`rounds`).
    lookups: Arc<rounds::Rounds<lookup::LeaderLast>>,
}

/// A stream this node knows: its state, and the count retention of its broadcasts.
#[derive(Debug, Clone)]
struct Known {
    state: StreamState,
    /// A message of it this node stored, and how many it stored after that one (see
    /// `retention::Cluster::counted`).
    mark: u64,
    since: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to NATS at {servers}: {message}")]
    Connect { servers: String, message: String },
    #[error("JetStream stream {stream}: {message}")]
    Stream { stream: String, message: String },
}

impl Cluster {
    /// Connects to NATS, creates or checks the stream, and starts the wake-up and transient
    /// subscriptions on the current runtime.
    pub async fn connect(config: &Config, hub: Hub) -> Result<Cluster, ConnectError> {
        let servers = config.nats.servers.clone();
        let connected = Arc::new(AtomicBool::new(false));
        let accesses = Arc::new(access::Accesses::default());
        let cache = Arc::new(cache::ItemCache::new(config.storage.read_cache_bytes as usize));
        let events = (connected.clone(), hub.clone(), accesses.clone(), cache.clone());
        let client = async_nats::ConnectOptions::new()
            .name("anycable-ds")
            // Room for the replies of many concurrent Direct Gets (READ_BATCH messages each)
            // before async-nats would drop them as a slow consumer's.
            .subscription_capacity(1 << 18)
            .connection_timeout(Duration::from_secs(5))
            .event_callback(move |event| {
                let (connected, hub, accesses, cache) = events.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            connected.store(true, Ordering::Release);
                            crate::metrics::get().nats_connected.set(1);
                            // Wake-ups published while we were away are lost: every waiting
                            // reader re-reads from its own offset. So are other nodes' reads
                            // of streams with a TTL: count them all as read now.
                            accesses.lost_track();
                            cache.clear();
                            hub.wake_all();
                            log::info!("NATS connection (re)established");
                        }
                        async_nats::Event::Disconnected => {
                            connected.store(false, Ordering::Release);
                            crate::metrics::get().nats_connected.set(0);
                            log::warn!("NATS connection lost; reconnecting");
                        }
                        async_nats::Event::SlowConsumer(sid) => {
                            // Messages were dropped, wake-ups among them perhaps: what the
                            // cache holds may have been removed since.
                            cache.clear();
                            log::warn!("NATS: subscription {sid} dropped messages (slow consumer)");
                        }
                        other => log::debug!("NATS: {other}"),
                    }
                }
            })
            .connect(servers.split(',').map(str::trim).filter(|s| !s.is_empty()).collect::<Vec<_>>())
            .await
            .map_err(|e| ConnectError::Connect { servers: servers.clone(), message: e.to_string() })?;
        connected.store(true, Ordering::Release);
        crate::metrics::get().nats_connected.set(1);
        setup::check_version(&client.server_info().version)
            .map_err(|message| ConnectError::Connect { servers: servers.clone(), message })?;
        let js = jetstream::new(client.clone());
        let name = config.nats.stream.clone();
        let stream_error = |message: String| ConnectError::Stream { stream: name.clone(), message };
        let (epoch, stream_config) = tokio::time::timeout(Duration::from_secs(30), setup::ensure_stream(&js, config))
            .await
            .map_err(|_| stream_error("no answer from JetStream within 30 s".into()))?
            .map_err(stream_error)?;
        let limits = Arc::new(retention::Limits::default());
        limits.learn(&stream_config);
        let direct = DirectGet::new(client.clone(), &name).await.map_err(|e| stream_error(e.to_string()))?;
        let cluster = Cluster {
            inner: Arc::new(Inner {
                client,
                js,
                stream: name,
                epoch,
                hub,
                direct,
                publish_timeout: Duration::from_secs(config.nats.publish_timeout),
                tombstone_ttl: config.storage.tombstone_ttl,
                node_id: format!("{}-{}", Epoch::random(), std::process::id()),
                ids: AtomicU64::new(0),
                known: Mutex::new(HashMap::new()),
                producers: producers::KnownProducers::default(),
                turns: Mutex::new(HashMap::new()),
                connected,
                reads: tokio::sync::Semaphore::new(READS_AT_ONCE),
                leader: Arc::new(AtomicBool::new(true)),
                seen: Arc::new(AtomicU64::new(0)),
                aging: Arc::new(lookup::Aging::new(Duration::from_secs(config.broker.history_ttl))),
                retention: limits,
                accesses,
                cache,
                flights: Arc::default(),
                lookups: Arc::default(),
            }),
        };
        // Where the log stands (`seen` starts here).
        cluster
            .state()
            .await
            .map_err(|e| ConnectError::Stream { stream: config.nats.stream.clone(), message: e.to_string() })?;
        cluster
            .subscribe()
            .await
            .map_err(|e| ConnectError::Stream { stream: config.nats.stream.clone(), message: e })?;
        cluster.watch_health();
        cluster.sweep();
        Ok(cluster)
    }

    /// The JetStream context, for state kept beside the log (subscriptions: a KV bucket).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.inner.js
    }

    pub fn epoch(&self) -> Epoch {
        self.inner.epoch
    }

    pub fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    /// Ready while connected and the stream has a leader (a quorum of its replicas).
    pub fn ready(&self) -> bool {
        self.inner.connected.load(Ordering::Acquire) && self.inner.leader.load(Ordering::Acquire)
    }

    fn subject(&self, stream: &str) -> String {
        format!("{}.s.{}", self.inner.stream, subject::token(stream))
    }

    /// The wake-up feed (RePublish) and the transient feed, into this node's hub.
    async fn subscribe(&self) -> Result<(), String> {
        let inner = &self.inner;
        let mut wakes = inner.client.subscribe(format!("{}.w.*", inner.stream)).await.map_err(|e| e.to_string())?;
        let mut transients =
            inner.client.subscribe(format!("{}.t.*", inner.stream)).await.map_err(|e| e.to_string())?;
        let this = self.clone();
        tokio::spawn(async move {
            while let Some(message) = wakes.next().await {
                let Some(name) = message.subject.rsplit('.').next().and_then(subject::name) else { continue };
                let Some(seq) = header_u64(&message, "Nats-Sequence") else { continue };
                this.saw(seq);
                // RePublish copies every header: the message's marks too.
                let marks = Marks::from_headers(message.headers.as_ref());
                // Before anything else: a read that sees this wake-up must not find what a
                // `delete` removed in the cache.
                this.inner.cache.woken(&this.subject(&name), seq, marks.control);
                this.learned(&name, seq, &marks);
                this.written(&name, &marks);
                this.inner.hub.wake(&name, seq);
            }
        });
        self.subscribe_touches().await?;
        // The wake-up feed is subscribed: everything stored after the stream's last sequence now
        // wakes this node, and the cache is empty, so it may serve reads up to there.
        inner.client.flush().await.map_err(|e| e.to_string())?;
        let last = self.state().await.map_err(|e| e.to_string())?.last_sequence;
        inner.cache.caught_up(last);
        let hub = inner.hub.clone();
        tokio::spawn(async move {
            while let Some(message) = transients.next().await {
                if let Some(name) = message.subject.rsplit('.').next().and_then(subject::name) {
                    hub.push_transient(&name, message.payload);
                }
            }
        });
        Ok(())
    }

    /// Checks every second that the stream has a leader (`/health`), and learns its retention.
    fn watch_health(&self) {
        let (js, name, leader) = (self.inner.js.clone(), self.inner.stream.clone(), self.inner.leader.clone());
        let (seen, aging) = (self.inner.seen.clone(), self.inner.aging.clone());
        let limits = self.inner.retention.clone();
        tokio::spawn(async move {
            loop {
                let ok = match tokio::time::timeout(Duration::from_secs(2), js.get_stream(&name)).await {
                    // `get_stream` is one STREAM.INFO request; its answer is the stream's info.
                    Ok(Ok(stream)) => {
                        let info = stream.cached_info();
                        seen.fetch_max(info.state.last_sequence, Ordering::AcqRel);
                        // Another node may have applied other retention (`--nats_update_stream`).
                        limits.learn(&info.config);
                        info.cluster.as_ref().is_none_or(|c| c.leader.is_some())
                    }
                    _ => false,
                };
                aging.sample(seen.load(Ordering::Acquire));
                if leader.swap(ok, Ordering::AcqRel) != ok {
                    if ok {
                        log::info!("JetStream stream {name} has a leader again: ready");
                    } else {
                        log::warn!("JetStream stream {name} has no leader (no quorum or no NATS): not ready");
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    /// A message stored at `seq` with `marks`, seen on the wake-up feed: the state of a stream
    /// this node knows moves on (a pair of sequence and state from one message, so a guard
    /// that passes on it proves the whole state current).
    fn learned(&self, stream: &str, seq: u64, marks: &Marks) {
        let mut known = self.inner.known.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = known.get_mut(stream) {
            if seq > entry.state.last {
                entry.state = StreamState::after(seq, marks);
            }
        }
    }

    /// The state a publish of this node left (or the leader answered).
    fn remember(&self, stream: &str, state: StreamState) {
        let mut known = self.inner.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= MAX_KNOWN && !known.contains_key(stream) {
            known.clear();
        }
        match known.get_mut(stream) {
            Some(entry) if entry.state.last >= state.last => {}
            Some(entry) => entry.state = state,
            None => {
                known.insert(stream.to_string(), Known { state, mark: 0, since: 0 });
            }
        }
    }

    fn forget(&self, stream: &str) {
        self.inner.known.lock().unwrap_or_else(|p| p.into_inner()).remove(stream);
    }

    fn known(&self, stream: &str) -> Option<StreamState> {
        self.inner.known.lock().unwrap_or_else(|p| p.into_inner()).get(stream).map(|k| k.state.clone())
    }

    fn next_id(&self) -> String {
        format!("{}-{}", self.inner.node_id, self.inner.ids.fetch_add(1, Ordering::Relaxed))
    }

    /// Updates the gauges that describe the shared log.
    pub async fn refresh_metrics(&self) {
        if let Ok(state) = self.state().await {
            let m = crate::metrics::get();
            m.streams_total.set(state.subjects_count as i64);
            m.storage_bytes.set(state.bytes as i64);
        }
        crate::metrics::get().read_cache_bytes.set(self.inner.cache.bytes() as i64);
    }

    /// Transient messages: published on core NATS; every node (this one too) hands them to
    /// its hub.
    pub fn deliver_transient(&self, stream: &str, body: Bytes) {
        let client = self.inner.client.clone();
        let subject = format!("{}.t.{}", self.inner.stream, subject::token(stream));
        tokio::spawn(async move {
            if let Err(e) = client.publish(subject, body).await {
                log::warn!("transient broadcast not sent: {e}");
            }
        });
    }

    pub async fn close(&self) {
        let _ = self.inner.client.flush().await;
    }
}
