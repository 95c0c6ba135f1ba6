//! Where subscriptions live: beside the log, in the engine's own store, so they survive
//! restarts and (in cluster mode) every node sees the same ones.
//!
//! - sled: tree `ds_subscriptions` (one JSON record per id) and tree `ds_keys` (the webhook
//!   signing seed) in the same database; flushed before a change is answered.
//! - NATS: KV bucket `<nats.stream>_SUBS` with keys `s.<base64url id>` and `key.webhook`;
//!   replicated like the stream.
//!
//! Every change is a compare-and-swap against the version read (sled: the old bytes; NATS:
//! the KV revision), so concurrent changes (two nodes claiming one wake, a callback racing a
//! lease expiry) never both win: the loser reads again and decides again.

use std::time::Duration;

use async_nats::jetstream::kv;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;

use super::model::Record;
use crate::config::Config;
use crate::engine::Engine;
use crate::storage::{Storage, StorageError};

const SLED_TREE: &str = "ds_subscriptions";
const SLED_KEYS: &str = "ds_keys";
const SIGNING_KEY: &str = "webhook-ed25519";
const NATS_SIGNING_KEY: &str = "key.webhook";
const NATS_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub enum Store {
    Sled(Storage),
    Nats(Box<kv::Store>),
}

/// A record as read, with what a later compare-and-swap compares against.
#[derive(Debug, Clone)]
pub struct Versioned {
    pub record: Record,
    rev: Rev,
}

#[derive(Debug, Clone)]
enum Rev {
    Sled(sled::IVec),
    Nats(u64),
}

fn unavailable(e: impl std::fmt::Display) -> StorageError {
    StorageError::Unavailable(e.to_string())
}

fn nats_key(id: &str) -> String {
    format!("s.{}", URL_SAFE_NO_PAD.encode(id))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, StorageError> {
    tokio::task::spawn_blocking(f).await.map_err(|_| StorageError::Closed)?
}

async fn timed<T, E: std::fmt::Display>(f: impl std::future::Future<Output = Result<T, E>>) -> Result<T, StorageError> {
    tokio::time::timeout(NATS_TIMEOUT, f).await.map_err(|_| unavailable("NATS KV timed out"))?.map_err(unavailable)
}

impl Store {
    /// The engine's store, creating the KV bucket in cluster mode.
    pub async fn open(engine: &Engine, config: &Config) -> Result<Store, StorageError> {
        match engine {
            Engine::Sled(storage) => Ok(Store::Sled(storage.clone())),
            Engine::Nats(cluster) => {
                let js = cluster.jetstream();
                let bucket = format!("{}_SUBS", config.nats.stream);
                let store = match timed(js.get_key_value(bucket.clone())).await {
                    Ok(store) => store,
                    Err(_) => {
                        let created = js.create_key_value(kv::Config {
                            bucket: bucket.clone(),
                            description: "anycable-ds subscriptions".into(),
                            history: 1,
                            num_replicas: config.nats.replicas as usize,
                            ..Default::default()
                        });
                        match timed(created).await {
                            Ok(store) => store,
                            // Another node made it first.
                            Err(_) => timed(js.get_key_value(bucket)).await?,
                        }
                    }
                };
                Ok(Store::Nats(Box::new(store)))
            }
        }
    }

    pub async fn get(&self, id: &str) -> Result<Option<Versioned>, StorageError> {
        match self {
            Store::Sled(storage) => {
                let (storage, id) = (storage.clone(), id.to_string());
                let found = blocking(move || Ok(storage.side_tree(SLED_TREE)?.get(id.as_bytes())?)).await?;
                Ok(found.and_then(|bytes| decode(&bytes).map(|record| Versioned { record, rev: Rev::Sled(bytes) })))
            }
            Store::Nats(kv) => {
                // From the stream leader, not `kv.entry` (a direct get, which any replica may
                // answer, a little behind): a compare-and-swap loser must see the winner's
                // record when it reads again, or it would retry against the same old revision.
                let subject = format!("{}{}", kv.prefix, nats_key(id));
                let found = tokio::time::timeout(NATS_TIMEOUT, kv.stream.get_last_raw_message_by_subject(&subject))
                    .await
                    .map_err(|_| unavailable("NATS KV timed out"))?;
                let message = match found {
                    Ok(message) => message,
                    Err(e) if e.kind() == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                        return Ok(None)
                    }
                    Err(e) => return Err(unavailable(e)),
                };
                // A delete or purge leaves a marker with `KV-Operation` and no value.
                if message.headers.get("KV-Operation").is_some() {
                    return Ok(None);
                }
                Ok(decode(&message.payload).map(|record| Versioned { record, rev: Rev::Nats(message.sequence) }))
            }
        }
    }

    /// Stores `record` if no subscription has its id. `false`: one does.
    pub async fn create(&self, record: &Record) -> Result<bool, StorageError> {
        let bytes = encode(record);
        match self {
            Store::Sled(storage) => {
                let (storage, id) = (storage.clone(), record.id.clone());
                blocking(move || {
                    let tree = storage.side_tree(SLED_TREE)?;
                    let swapped = tree.compare_and_swap(id.as_bytes(), None as Option<&[u8]>, Some(bytes))?;
                    if swapped.is_ok() {
                        tree.flush()?;
                    }
                    Ok(swapped.is_ok())
                })
                .await
            }
            Store::Nats(kv) => {
                match tokio::time::timeout(NATS_TIMEOUT, kv.create(nats_key(&record.id), bytes.into())).await {
                    Err(_) => Err(unavailable("NATS KV timed out")),
                    Ok(Ok(_)) => Ok(true),
                    Ok(Err(e)) if e.kind() == kv::CreateErrorKind::AlreadyExists || lost_race(&e) => Ok(false),
                    Ok(Err(e)) => Err(unavailable(e)),
                }
            }
        }
    }

    /// Replaces what was read with `record`. `false`: it changed since (read again).
    pub async fn replace(&self, read: &Versioned, record: &Record) -> Result<bool, StorageError> {
        let bytes = encode(record);
        match (self, &read.rev) {
            (Store::Sled(storage), Rev::Sled(old)) => {
                let (storage, id, old) = (storage.clone(), record.id.clone(), old.clone());
                blocking(move || {
                    let tree = storage.side_tree(SLED_TREE)?;
                    let swapped = tree.compare_and_swap(id.as_bytes(), Some(old), Some(bytes))?;
                    if swapped.is_ok() {
                        tree.flush()?;
                    }
                    Ok(swapped.is_ok())
                })
                .await
            }
            (Store::Nats(kv), Rev::Nats(revision)) => {
                match tokio::time::timeout(NATS_TIMEOUT, kv.update(nats_key(&record.id), bytes.into(), *revision)).await
                {
                    Err(_) => Err(unavailable("NATS KV timed out")),
                    Ok(Ok(_)) => Ok(true),
                    Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision || lost_race(&e) => Ok(false),
                    Ok(Err(e)) => Err(unavailable(e)),
                }
            }
            _ => Err(StorageError::Unsupported("mixing subscription stores")),
        }
    }

    pub async fn remove(&self, id: &str) -> Result<(), StorageError> {
        match self {
            Store::Sled(storage) => {
                let (storage, id) = (storage.clone(), id.to_string());
                blocking(move || {
                    let tree = storage.side_tree(SLED_TREE)?;
                    if tree.remove(id.as_bytes())?.is_some() {
                        tree.flush()?;
                    }
                    Ok(())
                })
                .await
            }
            Store::Nats(kv) => timed(kv.purge(nats_key(id))).await,
        }
    }

    /// Every subscription (sled; cluster mode learns them from [`Store::watch`]).
    pub async fn load_all(&self) -> Result<Vec<Record>, StorageError> {
        match self {
            Store::Sled(storage) => {
                let storage = storage.clone();
                blocking(move || {
                    let tree = storage.side_tree(SLED_TREE)?;
                    let mut records = Vec::new();
                    for item in tree.iter() {
                        let (_, value) = item?;
                        match decode(&value) {
                            Some(record) => records.push(record),
                            None => log::error!("subscriptions: an unreadable record was skipped"),
                        }
                    }
                    Ok(records)
                })
                .await
            }
            Store::Nats(_) => Ok(Vec::new()),
        }
    }

    /// Cluster mode: every record now and every later change (`None`: removed), for the
    /// in-memory copy of each node. Returns when the watch ends (the caller starts another).
    pub async fn watch(&self, mut apply: impl FnMut(Result<Record, String>)) -> Result<(), String> {
        use futures_util::StreamExt;
        let Store::Nats(kv) = self else { return Ok(()) };
        let mut watch = kv.watch_with_history(">").await.map_err(|e| e.to_string())?;
        while let Some(entry) = watch.next().await {
            let entry = entry.map_err(|e| e.to_string())?;
            let Some(encoded) = entry.key.strip_prefix("s.") else { continue };
            match entry.operation {
                kv::Operation::Put => match decode(&entry.value) {
                    Some(record) => apply(Ok(record)),
                    None => log::error!("subscriptions: an unreadable record was skipped"),
                },
                _ => {
                    let id = URL_SAFE_NO_PAD.decode(encoded).ok().and_then(|b| String::from_utf8(b).ok());
                    if let Some(id) = id {
                        apply(Err(id));
                    }
                }
            }
        }
        Ok(())
    }

    /// The webhook signing seed, made on first use. Every node of a cluster reads the same.
    pub async fn signing_seed(&self, fresh: [u8; 32]) -> Result<[u8; 32], StorageError> {
        let seed = match self {
            Store::Sled(storage) => {
                let storage = storage.clone();
                blocking(move || {
                    let tree = storage.side_tree(SLED_KEYS)?;
                    let kept = match tree.compare_and_swap(SIGNING_KEY, None as Option<&[u8]>, Some(&fresh[..]))? {
                        Ok(()) => {
                            tree.flush()?;
                            fresh.to_vec()
                        }
                        Err(existing) => existing.current.map(|v| v.to_vec()).unwrap_or_default(),
                    };
                    Ok(kept)
                })
                .await?
            }
            Store::Nats(kv) => {
                match tokio::time::timeout(NATS_TIMEOUT, kv.create(NATS_SIGNING_KEY, Bytes::copy_from_slice(&fresh)))
                    .await
                {
                    Ok(Ok(_)) => fresh.to_vec(),
                    // Read from the stream leader, as `get` does: a replica of a bucket made a
                    // moment ago may not hold its stream yet ("no stream found").
                    Ok(Err(e)) if e.kind() == kv::CreateErrorKind::AlreadyExists || lost_race(&e) => {
                        let subject = format!("{}{}", kv.prefix, NATS_SIGNING_KEY);
                        timed(kv.stream.get_last_raw_message_by_subject(&subject)).await?.payload.to_vec()
                    }
                    Ok(Err(e)) => return Err(unavailable(e)),
                    Err(_) => return Err(unavailable("NATS KV timed out")),
                }
            }
        };
        seed.try_into().map_err(|_| StorageError::Sled("the stored webhook signing key is not 32 bytes".into()))
    }
}

/// A compare-and-swap that another writer won. NATS 2.12 answers a stale expected sequence
/// with error code 10164 (`wrong last sequence`, without the number), which async-nats 0.51
/// does not map to `WrongLastRevision` (it knows 10071 only): recognised by its text.
fn lost_race(error: &dyn std::error::Error) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(error);
    while let Some(e) = source {
        if e.to_string().contains("wrong last sequence") {
            return true;
        }
        source = e.source();
    }
    false
}

fn encode(record: &Record) -> Vec<u8> {
    serde_json::to_vec(record).expect("a record serializes")
}

fn decode(bytes: &[u8]) -> Option<Record> {
    serde_json::from_slice(bytes).ok()
}
