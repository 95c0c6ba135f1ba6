//! The log the server reads and writes, behind one narrow interface with two engines:
//!
//! - **sled** (`storage`): embedded, on this node's disk. The default.
//! - **NATS JetStream** (`cluster`): one replicated log shared by every node (`--broker nats`).
//!
//! Everything above it (HTTP, authentication, the hub, offsets, limits, metrics) is one piece
//! of code. The walk is the same on both engines: a broadcast is appended, the stream's tail
//! moves, the hub wakes this node's readers of that stream, and each reader reads the log
//! after its own offset.

use bytes::Bytes;

use crate::cluster::Cluster;
use crate::forks::Level;
use crate::hub::Hub;
use crate::meta::SharedMeta;
use crate::offset::{Epoch, Offset, Position};
use crate::storage::{Chunk, NewMessage, ReadError, Storage, StorageError};
use crate::writes::{WriteError, WriteOp, WriteOutcome};

/// A cheap-to-clone handle to the engine chosen at start-up.
#[derive(Clone)]
pub enum Engine {
    Sled(Storage),
    Nats(Cluster),
}

/// Whether the engine can serve reads and writes now (`/health`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Ready,
    /// Not ready, with the reason `/health` reports.
    NotReady(&'static str),
}

impl Engine {
    /// The notify map of this node's live readers.
    pub fn hub(&self) -> &Hub {
        match self {
            Engine::Sled(storage) => storage.hub(),
            Engine::Nats(cluster) => cluster.hub(),
        }
    }

    /// The epoch of every token this engine hands out.
    pub fn epoch(&self) -> Epoch {
        match self {
            Engine::Sled(storage) => storage.epoch(),
            Engine::Nats(cluster) => cluster.epoch(),
        }
    }

    /// Appends broadcast messages atomically (all or none, in order) and resolves once they are
    /// durable; refused (nothing stored) if a stream they name takes no JSON or is closed.
    pub async fn append(&self, messages: Vec<NewMessage>) -> Result<(), WriteError> {
        match self {
            Engine::Sled(storage) => storage.append(messages)?.durable().await.map(drop),
            Engine::Nats(cluster) => cluster.append(messages).await,
        }
    }

    /// A Durable Streams write to one stream; resolves once it is durable, or refused.
    pub async fn write(&self, stream: &str, op: WriteOp) -> Result<WriteOutcome, WriteError> {
        match self {
            Engine::Sled(storage) => storage.write(stream, op)?.durable().await,
            Engine::Nats(cluster) => cluster.write(stream, op).await,
        }
    }

    /// A stream's durable tail, and its metadata if it exists (`None`: never created, removed
    /// or expired; its tail is then where a reader of it stands). Does not renew a TTL. One
    /// lookup answers both.
    pub async fn head(&self, stream: &str) -> Result<(Position, Option<SharedMeta>), StorageError> {
        match self {
            Engine::Sled(storage) => {
                let (storage, stream) = (storage.clone(), stream.to_string());
                blocking(move || match storage.head(&stream)? {
                    Some((tail, meta)) => Ok((tail, Some(meta))),
                    None => Ok((storage.tail(&stream)?, None)),
                })
                .await?
            }
            Engine::Nats(cluster) => cluster.head(stream).await,
        }
    }

    /// Messages after `offset`, at most `max_bytes` of them (but at least one); a fork's are
    /// its sources' up to its fork point, then its own (`forks.rs`).
    pub async fn read(&self, stream: &str, offset: Offset, max_bytes: usize) -> Result<Chunk, ReadError> {
        crate::forks::read(self, stream, offset, max_bytes).await
    }

    /// One level of a read: the stream's own messages after `offset` (up to `cap`, for a
    /// fork's read of its source), or where a fork's inherited messages are.
    pub async fn read_level(
        &self,
        stream: &str,
        offset: Offset,
        max_bytes: usize,
        cap: Option<u64>,
    ) -> Result<Level, ReadError> {
        match self {
            Engine::Sled(storage) => {
                // From memory when possible (a cached chunk of a known stream), else on the
                // blocking pool: a sled scan may touch the disk.
                if cap.is_none() {
                    if let Some(result) = storage.read_from_memory(stream, offset, max_bytes) {
                        return result;
                    }
                }
                let (storage, stream) = (storage.clone(), stream.to_string());
                blocking(move || storage.read_level(&stream, offset, max_bytes, cap)).await?
            }
            Engine::Nats(cluster) => cluster.read_level(stream, offset, max_bytes, cap).await,
        }
    }

    /// Transient messages (`meta.transient`): delivered to live readers, never stored.
    pub fn deliver_transient(&self, stream: &str, body: Bytes) {
        match self {
            Engine::Sled(storage) => storage.hub().push_transient(stream, body),
            Engine::Nats(cluster) => cluster.deliver_transient(stream, body),
        }
    }

    pub fn health(&self) -> Health {
        match self {
            Engine::Sled(storage) if storage.is_writable() => Health::Ready,
            Engine::Sled(_) => Health::NotReady("storage_failed"),
            Engine::Nats(cluster) if cluster.ready() => Health::Ready,
            Engine::Nats(_) => Health::NotReady("nats_unavailable"),
        }
    }

    /// Updates the engine's own gauges before `/metrics` is rendered.
    pub async fn refresh_metrics(&self) {
        let m = crate::metrics::get();
        m.hub_streams.set(self.hub().streams_watched() as i64);
        m.transient_bytes.set(self.hub().transient_bytes() as i64);
        match self {
            Engine::Sled(storage) => {
                m.streams_loaded.set(storage.streams_loaded() as i64);
                m.streams_total.set(storage.streams_created() as i64);
                m.writer_queue_bytes.set(storage.queued_bytes() as i64);
                m.read_cache_bytes.set(storage.read_cache_bytes() as i64);
                let storage = storage.clone();
                let size = blocking(move || storage.size_on_disk()).await.unwrap_or(0);
                m.storage_bytes.set(size as i64);
            }
            Engine::Nats(cluster) => cluster.refresh_metrics().await,
        }
    }

    /// Stops the engine's background work and makes everything acknowledged durable.
    pub async fn close(&self) -> Result<(), StorageError> {
        match self {
            Engine::Sled(storage) => storage.close(),
            Engine::Nats(cluster) => {
                cluster.close().await;
                Ok(())
            }
        }
    }
}

/// Runs a blocking call on the blocking pool, off the async workers. Only fails while the
/// runtime shuts down.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f).await.map_err(|_| StorageError::Closed)
}
