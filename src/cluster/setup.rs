//! Start-up: the NATS server's version, and the JetStream stream with this node's settings.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, stream};

use super::retention;
use crate::config::Config;
use crate::offset::Epoch;

/// Stream metadata key holding the epoch of the stream's tokens.
const EPOCH_KEY: &str = "anycable_ds_epoch";
/// How long JetStream remembers message ids, so a retried publish is not stored twice.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Refuses NATS servers older than 2.12: they have no atomic batch publish, and their
/// clustered per-subject expected-sequence checks are not serialized.
pub(super) fn check_version(version: &str) -> Result<(), String> {
    let mut parts = version.trim_start_matches('v').split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) >= (2, 12) {
        Ok(())
    } else {
        Err(format!("nats-server {version} is too old: cluster mode needs 2.12 or newer (atomic batches)"))
    }
}

/// Creates the stream, or checks that the existing one has this node's settings (or applies
/// them with `nats.update_stream`). Returns the epoch of its tokens and its config.
///
/// `broker.history_limit` lives in the stream's metadata, not in `max_msgs_per_subject`,
/// which would trim streams made by `PUT` too (see `retention`); a stream made by an older
/// anycable-ds (the limit in `max_msgs_per_subject`, no per-message TTL) is moved to this
/// layout when its retention is this node's.
pub(super) async fn ensure_stream(js: &jetstream::Context, config: &Config) -> Result<(Epoch, stream::Config), String> {
    let name = &config.nats.stream;
    let history_limit = config.broker.history_limit;
    let max_age = Duration::from_secs(config.broker.history_ttl);
    let replicas = config.nats.replicas as usize;
    let wanted = |epoch: Epoch| stream::Config {
        name: name.clone(),
        subjects: vec![format!("{name}.s.*"), producer_subjects(name)],
        max_messages_per_subject: -1,
        max_age,
        allow_message_ttl: true,
        num_replicas: replicas,
        allow_direct: true,
        allow_atomic_publish: true,
        // Producers' records roll up (`producers`).
        allow_rollup: true,
        // JetStream wants the window within max_age.
        duplicate_window: if max_age.is_zero() { DUPLICATE_WINDOW } else { DUPLICATE_WINDOW.min(max_age) },
        storage: stream::StorageType::File,
        republish: Some(stream::Republish {
            source: format!("{name}.s.*"),
            destination: format!("{name}.w.{{{{wildcard(1)}}}}"),
            headers_only: true,
        }),
        metadata: HashMap::from([
            (EPOCH_KEY.to_string(), epoch.to_string()),
            (retention::HISTORY_LIMIT_KEY.to_string(), history_limit.to_string()),
        ]),
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
            Ok(created) => {
                let config = created.cached_info().config.clone();
                return Ok((stream_epoch(&config)?, config));
            }
            // Another node may have created it first: use theirs.
            Err(create) => match js.get_stream(name).await {
                Ok(stream) => stream.cached_info().config.clone(),
                Err(_) => return Err(format!("cannot create it: {create}")),
            },
        },
    };
    let epoch = stream_epoch(&existing)?;
    let differences: Vec<String> = [
        ("broker.history_limit", retention::history_limit(&existing).to_string(), history_limit.to_string()),
        ("broker.history_ttl (max_age)", format!("{:?}", existing.max_age), format!("{max_age:?}")),
        ("nats.replicas", existing.num_replicas.to_string(), replicas.to_string()),
    ]
    .into_iter()
    .filter(|(_, theirs, ours)| theirs != ours)
    .map(|(key, theirs, ours)| format!("{key}: the stream has {theirs}, this node {ours}"))
    .collect();
    let old_layout = existing.max_messages_per_subject != -1
        || !existing.allow_message_ttl
        || !existing.allow_rollup
        || !existing.subjects.contains(&producer_subjects(name))
        || !existing.metadata.contains_key(retention::HISTORY_LIMIT_KEY);
    if differences.is_empty() && !old_layout {
        return Ok((epoch, existing));
    }
    if differences.is_empty() {
        let updated = js.update_stream(wanted(epoch)).await.map_err(|e| e.to_string())?;
        log::warn!(
            "JetStream stream {name} moved to this version's layout (history_limit {history_limit} in its \
             metadata, per-message TTL on, producers' subjects); nodes of an older version still \
             running show more history until they are replaced"
        );
        return Ok((epoch, updated.config));
    }
    if !config.nats.update_stream {
        return Err(format!(
            "exists with other settings ({}); start with the stream's settings, or with --nats_update_stream to apply these",
            differences.join("; ")
        ));
    }
    let updated = js.update_stream(wanted(epoch)).await.map_err(|e| e.to_string())?;
    log::warn!("JetStream stream {name} updated: {}", differences.join("; "));
    Ok((epoch, updated.config))
}

/// The subjects of idempotent producers' state records (see `producers`).
fn producer_subjects(name: &str) -> String {
    format!("{name}.p.*.*")
}

fn stream_epoch(config: &stream::Config) -> Result<Epoch, String> {
    config.metadata.get(EPOCH_KEY).and_then(|e| Epoch::parse(e.as_bytes())).ok_or_else(|| {
        format!("was not created by anycable-ds (no {EPOCH_KEY} in its metadata): use another nats.stream")
    })
}
