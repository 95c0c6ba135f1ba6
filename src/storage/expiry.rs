//! The expiry index of streams made with `Stream-TTL` or `Stream-Expires-At`: keys
//! `X ‖ deadline ms ‖ stream id` → name, in deadline order, so the writer finds the streams
//! due with one range scan from the start (never a walk of every stream).
//!
//! Requests check expiry themselves, exactly, at the time of the request (`StreamEntry::expired`);
//! this index is how a stream that nobody touches again leaves the disk. A deadline here may be
//! too early, never too late: a sliding TTL is renewed in memory by every read and write, so
//! when an entry comes due the writer checks the stream itself and either removes it or moves
//! its entry to the new deadline. Entries of streams removed meanwhile (deleted, replaced) are
//! dropped when they come due: their id no longer matches the name's.

use super::keys::{decode_u64, encode_u64};
use super::StorageError;

pub const EXPIRY: u8 = b'X';

fn key(deadline_ms: u64, id: u64) -> [u8; 17] {
    let mut key = [0u8; 17];
    key[0] = EXPIRY;
    key[1..9].copy_from_slice(&encode_u64(deadline_ms));
    key[9..].copy_from_slice(&encode_u64(id));
    key
}

/// Adds `id`'s entry at `deadline_ms` to `batch`.
pub(crate) fn schedule(batch: &mut sled::Batch, deadline_ms: u64, id: u64, name: &str) {
    batch.insert(&key(deadline_ms, id)[..], name.as_bytes());
}

/// An index entry that came due.
pub(crate) struct Due {
    pub(crate) key: sled::IVec,
    pub(crate) id: u64,
    pub(crate) name: String,
}

/// Up to `max` entries whose deadline is at or before `now_ms`, earliest first. Unreadable
/// entries are returned with an empty name (the caller drops them).
pub(crate) fn due(db: &sled::Db, now_ms: u64, max: usize) -> Result<Vec<Due>, StorageError> {
    let mut out = Vec::new();
    for item in db.range(key(0, 0)..=key(now_ms, u64::MAX)).take(max) {
        let (key, name) = item?;
        let id = key.get(9..17).and_then(decode_u64).unwrap_or(0);
        let name = std::str::from_utf8(&name).unwrap_or_default().to_string();
        out.push(Due { key, id, name });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_due_in_deadline_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let mut batch = sled::Batch::default();
        schedule(&mut batch, 300, 1, "c");
        schedule(&mut batch, 100, 2, "a");
        schedule(&mut batch, 200, 3, "b");
        db.apply_batch(batch).unwrap();
        let names: Vec<String> = due(&db, 250, 10).unwrap().into_iter().map(|d| d.name).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(due(&db, 1000, 1).unwrap()[0].id, 2);
    }
}
