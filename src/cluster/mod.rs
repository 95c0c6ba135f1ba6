//! Cluster mode: the log in NATS JetStream, shared by every node (`--broker nats`).
//!
//! Layout in JetStream (names below use `P` for `nats.stream`, `ANYCABLE_DS` by default):
//! - one stream `P`, replicated (`nats.replicas`), subjects `P.s.*`: one subject per DS stream,
//!   `P.s.<token>` with the name encoded by [`subject::token`];
//! - its RePublish copies each stored message's headers to `P.w.<token>`: every node
//!   subscribes to `P.w.*` and wakes its own live readers (the hub), whoever wrote;
//! - transient broadcasts go to `P.t.<token>` (core NATS, never stored), and every node
//!   hands them to its hub.
//!
//! Offsets: `<epoch>_<JetStream stream sequence>`, the same on every node. Sequences of one DS
//! stream have gaps (other streams' messages sit between them), which is fine: tokens are
//! opaque. The epoch is stored in the stream's metadata when anycable-ds creates it, so a
//! re-created stream (sequences start again at 1) gets a new epoch and old tokens are `410`.
//!
//! Gaps left by retention: a reader whose token points before messages that were deleted must
//! get `410`, not silently the next retained one. Each message carries its predecessor in the
//! same DS stream (`Ds-Prev`, or `Ds-Prev-Back` = how far back in the same atomic batch); the
//! publisher guards it with `Nats-Expected-Last-Subject-Sequence`, which JetStream checks
//! atomically, so the chain is exact. A read after token T whose first message's predecessor
//! is newer than T has lost that predecessor: `410`. A message written into an empty subject
//! (everything before it expired) starts a new chain (`Ds-Prev: 0`), as the sled engine
//! restarts a removed stream.
//!
//! Read-your-writes: replicas may lag and any replica answers a Direct Get, so a read first
//! learns what must be there (the tail this node was woken for, or the stream leader's last
//! sequence for the subject) and reads again until the replica that answers has it.

mod direct;
mod subject;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;

use crate::config::Config;
use crate::hub::Hub;
use crate::offset::{Epoch, Offset, Position};
use crate::storage::{Chunk, NewMessage, ReadError, StorageError};
use direct::{header_u64, DirectGet};

/// JetStream's cap on one atomic batch (nats-server's `max_batch_size` default).
pub const MAX_BATCH: usize = 1000;
/// Stream metadata key holding the epoch of the stream's tokens.
const EPOCH_KEY: &str = "anycable_ds_epoch";
/// Predecessor headers (see the module docs).
pub(crate) const PREV: &str = "Ds-Prev";
pub(crate) const PREV_BACK: &str = "Ds-Prev-Back";
/// How long a read waits for one Direct Get or leader lookup.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long JetStream remembers message ids, so a retried publish is not stored twice.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// Bytes allowed per read on top of twice the JSON budget, for stored headers.
const READ_OVERHEAD: usize = 64 * 1024;
/// Most messages one read asks for. Each comes as its own NATS message with ~200 bytes of
/// headers; bigger batches from several readers at once overran the reply subscription.
const READ_BATCH: usize = 1000;
/// Reads that talk to JetStream at once on one node; more wait (within READ_TIMEOUT).
const READS_AT_ONCE: usize = 64;
/// Stream tails remembered by the publisher (beyond it the map is cleared and re-learned).
const MAX_TAILS: usize = 100_000;
/// Attempts when another node wrote the same stream in between (expected sequence moved);
/// `nats.publish_timeout` bounds them too.
const PUBLISH_ATTEMPTS: usize = 100;

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
    /// Prefix of this process's message and batch ids (unique per process).
    node_id: String,
    ids: AtomicU64,
    /// The last sequence this node knows for each DS stream it wrote or saw (a hint: the
    /// expected-sequence check corrects it).
    tails: Mutex<HashMap<String, u64>>,
    /// Appends in progress per stream on this node (see `take_turns`).
    turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    connected: Arc<AtomicBool>,
    reads: tokio::sync::Semaphore,
    /// The stream has a leader (quorum), as last checked.
    leader: Arc<AtomicBool>,
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
        let events = (connected.clone(), hub.clone());
        let client = async_nats::ConnectOptions::new()
            .name("anycable-ds")
            // Room for the replies of many concurrent Direct Gets (READ_BATCH messages each)
            // before async-nats would drop them as a slow consumer's.
            .subscription_capacity(1 << 18)
            .connection_timeout(Duration::from_secs(5))
            .event_callback(move |event| {
                let (connected, hub) = events.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            connected.store(true, Ordering::Release);
                            crate::metrics::get().nats_connected.set(1);
                            // Wake-ups published while we were away are lost: every waiting
                            // reader re-reads from its own offset.
                            hub.wake_all();
                            log::info!("NATS connection (re)established");
                        }
                        async_nats::Event::Disconnected => {
                            connected.store(false, Ordering::Release);
                            crate::metrics::get().nats_connected.set(0);
                            log::warn!("NATS connection lost; reconnecting");
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
        check_version(&client.server_info().version)
            .map_err(|message| ConnectError::Connect { servers: servers.clone(), message })?;
        let js = jetstream::new(client.clone());
        let name = config.nats.stream.clone();
        let stream_error = |message: String| ConnectError::Stream { stream: name.clone(), message };
        let epoch = tokio::time::timeout(Duration::from_secs(30), ensure_stream(&js, config))
            .await
            .map_err(|_| stream_error("no answer from JetStream within 30 s".into()))?
            .map_err(stream_error)?;
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
                node_id: format!("{}-{}", Epoch::random(), std::process::id()),
                ids: AtomicU64::new(0),
                tails: Mutex::new(HashMap::new()),
                turns: Mutex::new(HashMap::new()),
                connected,
                reads: tokio::sync::Semaphore::new(READS_AT_ONCE),
                leader: Arc::new(AtomicBool::new(true)),
            }),
        };
        cluster
            .subscribe()
            .await
            .map_err(|e| ConnectError::Stream { stream: config.nats.stream.clone(), message: e })?;
        cluster.watch_health();
        Ok(cluster)
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
                this.learned_tail(&name, seq);
                this.inner.hub.wake(&name, seq);
            }
        });
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

    /// Checks every second that the stream has a leader (`/health`).
    fn watch_health(&self) {
        let (js, name, leader) = (self.inner.js.clone(), self.inner.stream.clone(), self.inner.leader.clone());
        tokio::spawn(async move {
            loop {
                let ok = match tokio::time::timeout(Duration::from_secs(2), js.get_stream(&name)).await {
                    // `get_stream` is one STREAM.INFO request; its answer is the stream's info.
                    Ok(Ok(stream)) => stream.cached_info().cluster.as_ref().is_none_or(|c| c.leader.is_some()),
                    _ => false,
                };
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

    fn learned_tail(&self, stream: &str, seq: u64) {
        let mut tails = self.inner.tails.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tail) = tails.get_mut(stream) {
            *tail = (*tail).max(seq);
        }
    }

    fn remember_tail(&self, stream: &str, seq: u64) {
        let mut tails = self.inner.tails.lock().unwrap_or_else(|p| p.into_inner());
        if tails.len() >= MAX_TAILS && !tails.contains_key(stream) {
            tails.clear();
        }
        let tail = tails.entry(stream.to_string()).or_insert(0);
        *tail = (*tail).max(seq);
    }

    fn forget_tail(&self, stream: &str) {
        self.inner.tails.lock().unwrap_or_else(|p| p.into_inner()).remove(stream);
    }

    fn known_tail(&self, stream: &str) -> Option<u64> {
        self.inner.tails.lock().unwrap_or_else(|p| p.into_inner()).get(stream).copied()
    }

    fn next_id(&self) -> String {
        format!("{}-{}", self.inner.node_id, self.inner.ids.fetch_add(1, Ordering::Relaxed))
    }

    /// Appends atomically and durably: answered once JetStream acknowledged (a quorum of
    /// replicas has the messages), within `nats.publish_timeout`.
    pub async fn append(&self, messages: Vec<NewMessage>) -> Result<(), StorageError> {
        if messages.len() > MAX_BATCH {
            return Err(StorageError::BatchTooLarge(MAX_BATCH));
        }
        if messages.is_empty() {
            return Ok(());
        }
        let timeout = self.inner.publish_timeout;
        let started = std::time::Instant::now();
        let result = match tokio::time::timeout(timeout, self.append_inner(&messages)).await {
            Ok(result) => result,
            Err(_) => Err(StorageError::Unavailable(format!("no acknowledgement from JetStream within {timeout:?}"))),
        };
        crate::metrics::get().nats_publish_seconds.observe(started.elapsed().as_secs_f64());
        result
    }

    async fn append_inner(&self, messages: &[NewMessage]) -> Result<(), StorageError> {
        // This node's writers of one stream take turns: each knows the tail the previous one
        // left, so their expected-sequence guards do not collide (other nodes still may).
        let mut streams: Vec<&str> = messages.iter().map(|m| m.stream.as_str()).collect();
        streams.sort_unstable();
        streams.dedup();
        let _turns = self.take_turns(&streams).await;
        for attempt in 1..=PUBLISH_ATTEMPTS {
            // What each stream's predecessor is: what this node knows, or the leader's answer.
            let mut prevs: HashMap<&str, u64> = HashMap::new();
            for message in messages {
                if !prevs.contains_key(message.stream.as_str()) {
                    let prev = match self.known_tail(&message.stream) {
                        Some(seq) => seq,
                        None => self.leader_last(&self.subject(&message.stream)).await?.unwrap_or(0),
                    };
                    prevs.insert(&message.stream, prev);
                }
            }
            let outcome = if messages.len() == 1 {
                self.publish_one(&messages[0], prevs[messages[0].stream.as_str()]).await
            } else {
                self.publish_batch(messages, &prevs).await
            };
            match outcome {
                Ok(last) => {
                    // The batch took `last - n + 1 ..= last`, in order.
                    let first = last + 1 - messages.len() as u64;
                    for (i, message) in messages.iter().enumerate() {
                        self.remember_tail(&message.stream, first + i as u64);
                    }
                    for (i, message) in messages.iter().enumerate().rev() {
                        // Wake this node's readers now; the RePublish feed wakes the others.
                        self.inner.hub.wake(&message.stream, first + i as u64);
                    }
                    return Ok(());
                }
                Err(Publish::Moved) => {
                    // Another node wrote one of these streams since: learn and try again,
                    // after a short random pause once it keeps happening (two nodes
                    // retrying in lockstep would keep colliding).
                    for message in messages {
                        self.forget_tail(&message.stream);
                    }
                    log::debug!("expected sequence moved (attempt {attempt}); retrying");
                    if attempt > 2 {
                        let pause = rand::random_range(0..(attempt as u64).min(20));
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                    }
                }
                Err(Publish::Failed(e)) => return Err(e),
            }
        }
        Err(StorageError::Unavailable("the streams kept moving under concurrent writers".into()))
    }

    /// Locks the streams (in name order, so two appends never wait on each other).
    async fn take_turns(&self, streams: &[&str]) -> Turns {
        let locks: Vec<Arc<tokio::sync::Mutex<()>>> = {
            let mut map = self.inner.turns.lock().unwrap_or_else(|p| p.into_inner());
            streams.iter().map(|s| map.entry(s.to_string()).or_default().clone()).collect()
        };
        let mut guards = Vec::with_capacity(locks.len());
        for lock in locks {
            guards.push(lock.lock_owned().await);
        }
        Turns { guards, streams: streams.iter().map(|s| s.to_string()).collect(), cluster: self.clone() }
    }

    fn headers(&self, prev_header: (&'static str, u64)) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", self.next_id().as_str());
        headers.insert(prev_header.0, prev_header.1.to_string().as_str());
        headers
    }

    /// One message: a plain publish guarded by the expected last sequence of its subject.
    async fn publish_one(&self, message: &NewMessage, prev: u64) -> Result<u64, Publish> {
        let mut headers = self.headers((PREV, prev));
        headers.insert("Nats-Expected-Last-Subject-Sequence", prev.to_string().as_str());
        let ack = self
            .inner
            .js
            .publish_with_headers(self.subject(&message.stream), headers, message.json.clone())
            .await
            .map_err(|e| Publish::Failed(StorageError::Unavailable(e.to_string())))?;
        match ack.await {
            Ok(ack) => Ok(ack.sequence),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence || moved(&e) => {
                Err(Publish::Moved)
            }
            Err(e) => Err(Publish::Failed(StorageError::Unavailable(e.to_string()))),
        }
    }

    /// Several messages: one JetStream atomic batch (all stored or none). The first message of
    /// each stream carries the expected-sequence guard; later ones point back inside the batch.
    async fn publish_batch(&self, messages: &[NewMessage], prevs: &HashMap<&str, u64>) -> Result<u64, Publish> {
        let batch_id = self.next_id();
        let client = &self.inner.client;
        let mut last_index: HashMap<&str, usize> = HashMap::new();
        let unavailable = |e: String| Publish::Failed(StorageError::Unavailable(e));
        for (i, message) in messages.iter().enumerate() {
            let mut headers = match last_index.insert(&message.stream, i) {
                None => {
                    let prev = prevs[message.stream.as_str()];
                    let mut headers = self.headers((PREV, prev));
                    headers.insert("Nats-Expected-Last-Subject-Sequence", prev.to_string().as_str());
                    headers
                }
                Some(before) => self.headers((PREV_BACK, (i - before) as u64)),
            };
            headers.insert("Nats-Batch-Id", batch_id.as_str());
            headers.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
            let subject = self.subject(&message.stream);
            if i + 1 < messages.len() {
                client
                    .publish_with_headers(subject, headers, message.json.clone())
                    .await
                    .map_err(|e| unavailable(e.to_string()))?;
            } else {
                headers.insert("Nats-Batch-Commit", "1");
                let reply = client
                    .request_with_headers(subject, headers, message.json.clone())
                    .await
                    .map_err(|e| unavailable(e.to_string()))?;
                return parse_batch_ack(&reply.payload);
            }
        }
        Err(unavailable("empty batch".into()))
    }

    /// The last sequence of a subject according to the stream leader (which has everything
    /// acknowledged), or `None` when the subject holds no message.
    async fn leader_last(&self, subject: &str) -> Result<Option<u64>, StorageError> {
        let request = serde_json::json!({ "last_by_subj": subject }).to_string();
        let api = format!("$JS.API.STREAM.MSG.GET.{}", self.inner.stream);
        let reply = tokio::time::timeout(READ_TIMEOUT, self.inner.client.request(api, request.into()))
            .await
            .map_err(|_| StorageError::Unavailable("no answer from the stream leader".into()))?
            .map_err(|e| StorageError::Unavailable(e.to_string()))?;
        let answer: serde_json::Value =
            serde_json::from_slice(&reply.payload).map_err(|e| StorageError::Unavailable(e.to_string()))?;
        if let Some(seq) = answer.pointer("/message/seq").and_then(|v| v.as_u64()) {
            return Ok(Some(seq));
        }
        match answer.pointer("/error/err_code").and_then(|v| v.as_u64()) {
            // 10037: no message found.
            Some(10037) => Ok(None),
            _ => Err(StorageError::Unavailable(format!("stream leader answered {answer}"))),
        }
    }

    /// The stream's state: sequences, messages, bytes, subjects.
    async fn state(&self) -> Result<stream::State, StorageError> {
        let stream =
            self.inner.js.get_stream(&self.inner.stream).await.map_err(|e| StorageError::Unavailable(e.to_string()))?;
        Ok(stream.cached_info().state.clone())
    }

    /// The last sequence of the whole stream (a position after everything stored so far).
    async fn stream_last(&self) -> Result<u64, StorageError> {
        Ok(self.state().await?.last_sequence)
    }

    /// Updates the gauges that describe the shared log.
    pub async fn refresh_metrics(&self) {
        if let Ok(state) = self.state().await {
            let m = crate::metrics::get();
            m.streams_total.set(state.subjects_count as i64);
            m.storage_bytes.set(state.bytes as i64);
        }
    }

    /// The position after the last message of `stream` (for an empty one: after everything
    /// stored so far, so any later message of it follows).
    pub async fn tail(&self, stream: &str) -> Result<Position, StorageError> {
        let seq = match self.leader_last(&self.subject(stream)).await? {
            Some(seq) => seq,
            None => self.stream_last().await?,
        };
        Ok(Position { epoch: self.inner.epoch, seq })
    }

    pub async fn read(&self, stream: &str, offset: Offset, max_bytes: usize) -> Result<Chunk, ReadError> {
        let started = std::time::Instant::now();
        let result = self.read_inner(stream, offset, max_bytes).await;
        crate::metrics::get().nats_read_seconds.observe(started.elapsed().as_secs_f64());
        result
    }

    async fn read_inner(&self, stream: &str, offset: Offset, max_bytes: usize) -> Result<Chunk, ReadError> {
        let epoch = self.inner.epoch;
        let at = |seq| Position { epoch, seq };
        let (after, from_token) = match offset {
            Offset::Now => {
                let tail = self.tail(stream).await?;
                return Ok(empty_chunk(tail));
            }
            Offset::Start => (0, false),
            Offset::At(position) if position.epoch != epoch => return Err(ReadError::Gone),
            Offset::At(position) => (position.seq, true),
        };
        // At most READS_AT_ONCE reads talk to JetStream at a time: each holds up to a chunk
        // of replies in memory while it is assembled.
        let _permit = tokio::time::timeout(READ_TIMEOUT, self.inner.reads.acquire())
            .await
            .map_err(|_| StorageError::Unavailable("too many reads waiting for JetStream".into()))?
            .map_err(|_| StorageError::Closed)?;
        let subject = self.subject(stream);
        // What the answer must reach: the tail this node was woken for, else the leader's.
        let woken = self.inner.hub.tail(stream);
        let must = if woken > after { Some(woken) } else { self.leader_last(&subject).await? };
        let Some(must) = must.filter(|&must| must > after) else {
            // Nothing after the position. A read from the start of an empty stream answers
            // the position after everything stored, as the tail does; a token past that was
            // never handed out by this stream.
            let last = if from_token && must.is_some_and(|m| m == after) { after } else { self.stream_last().await? };
            if from_token && after > last {
                return Err(ReadError::Gone);
            }
            return Ok(empty_chunk(at(if from_token { after } else { last })));
        };
        let mut attempt = 0;
        let batch = loop {
            // JetStream counts stored bytes (headers included) against `max_bytes`; ask for
            // more and cut at the JSON budget below.
            let budget = max_bytes.saturating_mul(2).saturating_add(READ_OVERHEAD);
            let batch = self
                .inner
                .direct
                .batch(&subject, after + 1, READ_BATCH, budget, READ_TIMEOUT)
                .await
                .map_err(|e| StorageError::Unavailable(e.to_string()))?;
            let last = batch.messages.last().map_or(0, |m| m.seq);
            // A replica behind the leader: it ended (nothing pending) before what must be there.
            let behind = last < must && batch.pending == 0;
            attempt += 1;
            if !behind || attempt >= 50 {
                break batch;
            }
            tokio::time::sleep(Duration::from_millis(attempt.min(10))).await;
        };
        // Fill the chunk up to its byte budget, as the sled engine does: more batches while
        // messages are pending.
        let mut batch = batch;
        let mut bytes: usize = batch.messages.iter().map(|m| m.payload.len() + 1).sum();
        while batch.pending > 0 && bytes < max_bytes {
            let Some(last) = batch.messages.last().map(|m| m.seq) else { break };
            let budget = (max_bytes - bytes).saturating_mul(2).saturating_add(READ_OVERHEAD);
            let more = self
                .inner
                .direct
                .batch(&subject, last + 1, READ_BATCH, budget, READ_TIMEOUT)
                .await
                .map_err(|e| StorageError::Unavailable(e.to_string()))?;
            if more.messages.is_empty() {
                break;
            }
            bytes += more.messages.iter().map(|m| m.payload.len() + 1).sum::<usize>();
            batch.pending = more.pending;
            batch.messages.extend(more.messages);
        }
        let Some(first) = batch.messages.first() else {
            return Err(StorageError::Unavailable(format!("a replica still lacks message {must}")).into());
        };
        if from_token {
            let prev = match (first.prev, first.prev_back) {
                (Some(prev), _) => prev,
                (None, Some(back)) => first.seq.saturating_sub(back),
                (None, None) => 0,
            };
            if prev > after {
                // The message before the first retained one, newer than the reader's
                // position, was deleted by retention: the reader missed it.
                return Err(ReadError::Gone);
            }
        }
        // As many messages as fit in `max_bytes` of JSON array (at least one), as the sled
        // engine answers.
        let mut size = 2;
        let mut count = 0;
        for message in &batch.messages {
            let more = message.payload.len() + usize::from(count > 0);
            if count > 0 && size + more > max_bytes {
                break;
            }
            size += more;
            count += 1;
        }
        let mut body = BytesMut::with_capacity(size);
        body.put_u8(b'[');
        let mut next = after;
        for (i, message) in batch.messages[..count].iter().enumerate() {
            if i > 0 {
                body.put_u8(b',');
            }
            body.put_slice(&message.payload);
            next = message.seq;
        }
        body.put_u8(b']');
        let complete = count == batch.messages.len() && batch.pending == 0;
        Ok(Chunk { body: body.freeze(), count, start: at(after), next: at(next), up_to_date: complete && next >= must })
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

/// The per-stream turns an append holds; the last holder of a stream removes its entry.
struct Turns {
    guards: Vec<tokio::sync::OwnedMutexGuard<()>>,
    streams: Vec<String>,
    cluster: Cluster,
}

impl Drop for Turns {
    fn drop(&mut self) {
        self.guards.clear();
        let mut map = self.cluster.inner.turns.lock().unwrap_or_else(|p| p.into_inner());
        for stream in &self.streams {
            if map.get(stream).is_some_and(|lock| Arc::strong_count(lock) == 1) {
                map.remove(stream);
            }
        }
    }
}

/// How a publish attempt ended, when not with a sequence.
enum Publish {
    /// The expected last sequence of a subject moved (another writer): retry.
    Moved,
    Failed(StorageError),
}

/// Whether a publish failed on an expected-sequence guard that async-nats does not name
/// (10164 "wrong last sequence", which nats-server also answers for single publishes).
fn moved(error: &jetstream::context::PublishError) -> bool {
    use std::error::Error as _;
    let mut source = error.source();
    while let Some(e) = source {
        if let Some(js) = e.downcast_ref::<jetstream::Error>() {
            return matches!(js.error_code().0, 10071 | 10164);
        }
        source = e.source();
    }
    false
}

/// The commit reply of an atomic batch: `{"stream","seq","batch","count"}` or `{"error":…}`.
fn parse_batch_ack(payload: &[u8]) -> Result<u64, Publish> {
    let answer: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|_| Publish::Failed(StorageError::Unavailable("unreadable batch acknowledgement".into())))?;
    if let Some(seq) = answer.get("seq").and_then(|v| v.as_u64()).filter(|_| answer.get("error").is_none()) {
        return Ok(seq);
    }
    match answer.pointer("/error/err_code").and_then(|v| v.as_u64()) {
        // Wrong last sequence (a guarded subject moved).
        Some(10071) | Some(10164) => Err(Publish::Moved),
        Some(10199) => Err(Publish::Failed(StorageError::BatchTooLarge(MAX_BATCH))),
        _ => Err(Publish::Failed(StorageError::Unavailable(format!("batch refused: {answer}")))),
    }
}

/// Refuses NATS servers older than 2.12: they have no atomic batch publish, and their
/// clustered per-subject expected-sequence checks are not serialized.
fn check_version(version: &str) -> Result<(), String> {
    let mut parts = version.trim_start_matches('v').split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) >= (2, 12) {
        Ok(())
    } else {
        Err(format!("nats-server {version} is too old: cluster mode needs 2.12 or newer (atomic batches)"))
    }
}

fn empty_chunk(position: Position) -> Chunk {
    Chunk { body: Bytes::from_static(b"[]"), count: 0, start: position, next: position, up_to_date: true }
}

/// Creates the stream, or checks that the existing one has this node's settings (or applies
/// them with `nats.update_stream`). Returns the epoch of its tokens.
async fn ensure_stream(js: &jetstream::Context, config: &Config) -> Result<Epoch, String> {
    let name = &config.nats.stream;
    let max_per_subject = match config.broker.history_limit {
        0 => -1,
        n => i64::try_from(n).unwrap_or(i64::MAX),
    };
    let max_age = Duration::from_secs(config.broker.history_ttl);
    let replicas = config.nats.replicas as usize;
    let wanted = |epoch: Epoch| stream::Config {
        name: name.clone(),
        subjects: vec![format!("{name}.s.*")],
        max_messages_per_subject: max_per_subject,
        max_age,
        num_replicas: replicas,
        allow_direct: true,
        allow_atomic_publish: true,
        // JetStream wants the window within max_age.
        duplicate_window: if max_age.is_zero() { DUPLICATE_WINDOW } else { DUPLICATE_WINDOW.min(max_age) },
        storage: stream::StorageType::File,
        republish: Some(stream::Republish {
            source: format!("{name}.s.*"),
            destination: format!("{name}.w.{{{{wildcard(1)}}}}"),
            headers_only: true,
        }),
        metadata: HashMap::from([(EPOCH_KEY.to_string(), epoch.to_string())]),
        ..Default::default()
    };
    let existing = match js.get_stream(name).await {
        Ok(stream) => Some(stream.cached_info().config.clone()),
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref js)
                if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            None
        }
        Err(e) => return Err(e.to_string()),
    };
    let existing = match existing {
        Some(existing) => existing,
        None => match js.create_stream(wanted(Epoch::random())).await {
            Ok(created) => return stream_epoch(&created.cached_info().config),
            // Another node may have created it first: use theirs.
            Err(create) => match js.get_stream(name).await {
                Ok(stream) => stream.cached_info().config.clone(),
                Err(_) => return Err(format!("cannot create it: {create}")),
            },
        },
    };
    let epoch = stream_epoch(&existing)?;
    let differences: Vec<String> = [
        (
            "broker.history_limit (max_msgs_per_subject)",
            existing.max_messages_per_subject.to_string(),
            max_per_subject.to_string(),
        ),
        ("broker.history_ttl (max_age)", format!("{:?}", existing.max_age), format!("{max_age:?}")),
        ("nats.replicas", existing.num_replicas.to_string(), replicas.to_string()),
    ]
    .into_iter()
    .filter(|(_, theirs, ours)| theirs != ours)
    .map(|(key, theirs, ours)| format!("{key}: the stream has {theirs}, this node {ours}"))
    .collect();
    if differences.is_empty() {
        return Ok(epoch);
    }
    if !config.nats.update_stream {
        return Err(format!(
            "exists with other settings ({}); start with the stream's settings, or with --nats_update_stream to apply these",
            differences.join("; ")
        ));
    }
    js.update_stream(wanted(epoch)).await.map_err(|e| e.to_string())?;
    log::warn!("JetStream stream {name} updated: {}", differences.join("; "));
    Ok(epoch)
}

fn stream_epoch(config: &stream::Config) -> Result<Epoch, String> {
    config.metadata.get(EPOCH_KEY).and_then(|e| Epoch::parse(e.as_bytes())).ok_or_else(|| {
        format!("was not created by anycable-ds (no {EPOCH_KEY} in its metadata): use another nats.stream")
    })
}
