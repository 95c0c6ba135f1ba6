//! Offline inspection of a data directory (the server must not be running on it): what its
//! live keys and values add up to. sled's files shrink only as its log is compacted, so this
//! is how a test measures that removed streams left nothing behind.

use std::path::Path;

use super::StorageError;

/// The bytes of every live key and value in the store at `dir`, and how many keys.
pub fn live_bytes(dir: &Path) -> Result<(u64, u64), StorageError> {
    let open_error = |e: sled::Error| StorageError::Open { path: dir.display().to_string(), message: e.to_string() };
    let (_slot, db) = super::slot::DbSlot::open(dir, 16 << 20).map_err(open_error)?;
    let (mut bytes, mut keys) = (0u64, 0u64);
    for item in db.iter() {
        let (key, value) = item?;
        bytes += (key.len() + value.len()) as u64;
        keys += 1;
    }
    Ok((bytes, keys))
}
