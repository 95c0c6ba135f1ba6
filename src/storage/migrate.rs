//! Layout check and upgrades at open. The steps themselves live in `migrations/`.

use super::keys;
use crate::offset::Epoch;

#[path = "../../migrations/mod.rs"]
mod migrations;

pub use migrations::CURRENT_LAYOUT;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("not an anycable-ds data directory (it holds data but no layout version)")]
    Foreign,
    #[error("storage layout {found} was written by a newer anycable-ds (this build reads layout {CURRENT_LAYOUT}); upgrade anycable-ds or use another data directory")]
    TooNew { found: u32 },
    #[error("no upgrade step from storage layout {from}")]
    MissingStep { from: u32 },
    #[error("corrupt store metadata: {0}")]
    Corrupt(&'static str),
    #[error(transparent)]
    Sled(#[from] sled::Error),
}

/// What the rest of storage needs from the store's metadata.
pub(crate) struct StoreState {
    pub epoch: Epoch,
    pub next_stream_id: u64,
}

/// Initialises a new store, upgrades an old one, or refuses one this build cannot read.
pub(crate) fn prepare(db: &sled::Db) -> Result<StoreState, MigrateError> {
    let layout = match db.get(keys::META_LAYOUT)? {
        Some(bytes) => u32::from_be_bytes(bytes.as_ref().try_into().map_err(|_| MigrateError::Corrupt("layout"))?),
        None if db.is_empty() => initialise(db)?,
        None => return Err(MigrateError::Foreign),
    };
    if layout > CURRENT_LAYOUT {
        return Err(MigrateError::TooNew { found: layout });
    }
    for from in layout..CURRENT_LAYOUT {
        let step = migrations::STEPS.iter().find(|s| s.from == from).ok_or(MigrateError::MissingStep { from })?;
        log::info!("upgrading storage layout {from} -> {}: {}", from + 1, step.description);
        (step.run)(db, &|progress| log::info!("  {progress}"))?;
        db.flush()?;
    }
    let epoch = db.get(keys::META_EPOCH)?.ok_or(MigrateError::Corrupt("epoch missing"))?;
    let epoch = Epoch::parse(&epoch).ok_or(MigrateError::Corrupt("epoch"))?;
    let next_stream_id = match db.get(keys::META_NEXT_STREAM_ID)? {
        Some(bytes) => keys::decode_u64(&bytes).ok_or(MigrateError::Corrupt("next stream id"))?,
        None => 1,
    };
    Ok(StoreState { epoch, next_stream_id })
}

/// Writes the metadata of a brand-new store, durably, before anything else can happen.
fn initialise(db: &sled::Db) -> Result<u32, MigrateError> {
    let mut batch = sled::Batch::default();
    batch.insert(keys::META_EPOCH, Epoch::random().as_str().as_bytes());
    batch.insert(keys::META_NEXT_STREAM_ID, &keys::encode_u64(1)[..]);
    batch.insert(keys::META_LAYOUT, &CURRENT_LAYOUT.to_be_bytes()[..]);
    db.apply_batch(batch)?;
    db.flush()?;
    Ok(CURRENT_LAYOUT)
}
