//! Tombstones: what is left of a removed stream, so that its readers learn what they missed
//! (PRODUCT.md §3).
//!
//! A stream goes away three ways: AnyCable's retention removes it once every message expired
//! ([`Ending::Continues`]: a later broadcast revives the same stream, after its old tail), or
//! `DELETE`, or its `Stream-TTL` / `Stream-Expires-At` passed ([`Ending::Ended`]: a later
//! `PUT` or broadcast makes a new stream, and no token of the old one reads it). The removal
//! batch writes `T ‖ name` → (last seq, removal ms, ending) and an index key
//! `U ‖ removal ms ‖ name`, from which the writer sweeps tombstones older than
//! `storage.tombstone_ttl` (never a walk of every stream).
//!
//! While the tombstone lives, the name reads as an empty stream at its old tail (offsets never
//! run backwards), a token equal to that tail reads `[]`, any other token is `410`. Once it is
//! gone a token of the removed stream is `410`: a spurious `410` costs a client one re-read, a
//! silent gap costs it data.

use super::keys::{self, decode_u64, encode_u64};
use super::StorageError;

pub const TOMBSTONE: u8 = b'T';
pub const TOMBSTONE_INDEX: u8 = b'U';

/// How the stream's life ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Removed by AnyCable's retention: a broadcast continues it after `last_seq`.
    Continues,
    /// Deleted or expired: the next stream under the name is another one.
    Ended,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tombstone {
    pub(crate) last_seq: u64,
    pub(crate) removed_ms: u64,
    pub(crate) ending: Ending,
}

impl Tombstone {
    fn encode(&self) -> [u8; 17] {
        let mut out = [0u8; 17];
        out[..8].copy_from_slice(&encode_u64(self.last_seq));
        out[8..16].copy_from_slice(&encode_u64(self.removed_ms));
        out[16] = match self.ending {
            Ending::Continues => 0,
            Ending::Ended => 1,
        };
        out
    }

    fn decode(bytes: &[u8]) -> Option<Tombstone> {
        let ending = match bytes.get(16)? {
            0 => Ending::Continues,
            1 => Ending::Ended,
            _ => return None,
        };
        Some(Tombstone { last_seq: decode_u64(bytes.get(..8)?)?, removed_ms: decode_u64(bytes.get(8..16)?)?, ending })
    }

    /// Where the next stream under this name starts: its base (the position before its first
    /// message) and the old tail a token may still hold to read it from its start.
    pub(crate) fn next_life(tombstone: Option<&Tombstone>, floor: u64, kind: NextLife) -> (u64, Option<u64>) {
        match (tombstone, kind) {
            (None, _) => (floor, None),
            (Some(t), NextLife::Broadcast) if t.ending == Ending::Continues => {
                (floor.max(t.last_seq), Some(t.last_seq))
            }
            // A new stream: above every token the old one handed out, so none of them
            // (not even its tail) reads the new one as if nothing happened.
            (Some(t), _) => (floor.max(t.last_seq) + 1, None),
        }
    }
}

/// What makes the next stream under a buried name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NextLife {
    Broadcast,
    Put,
}

fn key(name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + name.len());
    key.push(TOMBSTONE);
    key.extend_from_slice(name.as_bytes());
    key
}

fn index_key(removed_ms: u64, name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(9 + name.len());
    key.push(TOMBSTONE_INDEX);
    key.extend_from_slice(&encode_u64(removed_ms));
    key.extend_from_slice(name.as_bytes());
    key
}

/// The tombstone of `name`, if it has one.
pub(crate) fn get(db: &sled::Db, name: &str) -> Result<Option<Tombstone>, StorageError> {
    match db.get(key(name))? {
        Some(bytes) => Tombstone::decode(&bytes).map(Some).ok_or_else(|| super::corrupt("tombstone")),
        None => Ok(None),
    }
}

/// Adds the tombstone of a stream being removed to its removal `batch` (replacing an older
/// one and its index entry). Nothing when tombstones are off (`ttl_ms` 0).
pub(crate) fn bury(
    db: &sled::Db,
    batch: &mut sled::Batch,
    name: &str,
    tombstone: Tombstone,
    ttl_ms: u64,
) -> Result<(), StorageError> {
    clear(db, batch, name)?;
    if ttl_ms > 0 {
        batch.insert(key(name), &tombstone.encode()[..]);
        batch.insert(index_key(tombstone.removed_ms, name), &[][..]);
    }
    Ok(())
}

/// Adds the removal of `name`'s tombstone (if any) to `batch`: a new stream takes the name.
pub(crate) fn clear(db: &sled::Db, batch: &mut sled::Batch, name: &str) -> Result<(), StorageError> {
    if let Some(old) = get(db, name)? {
        batch.remove(key(name));
        batch.remove(index_key(old.removed_ms, name));
    }
    Ok(())
}

/// Removes up to `max` tombstones made before `before_ms`, oldest first; returns how many.
pub(crate) fn sweep(db: &sled::Db, before_ms: u64, max: usize) -> Result<usize, StorageError> {
    let mut batch = sled::Batch::default();
    let mut swept = 0;
    let end = index_key(before_ms, "");
    for item in db.range(vec![TOMBSTONE_INDEX]..end).take(max) {
        let (index, _) = item?;
        let removed_ms = index.get(1..9).and_then(decode_u64);
        let name = index.get(9..).and_then(|n| std::str::from_utf8(n).ok());
        batch.remove(index.clone());
        if let (Some(removed_ms), Some(name)) = (removed_ms, name) {
            // Only the tombstone this index entry was made for (a newer one has its own).
            if get(db, name)?.is_some_and(|t| t.removed_ms == removed_ms) {
                batch.remove(key(name));
            }
        }
        swept += 1;
    }
    if swept > 0 {
        db.apply_batch(batch)?;
    }
    Ok(swept)
}

/// Keeps `keys` honest about the prefixes this module owns.
const _: () = assert!(TOMBSTONE != keys::NAME && TOMBSTONE != keys::STREAM && TOMBSTONE != keys::RECORD);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tombstones_round_trip_and_refuse_garbage() {
        let t = Tombstone { last_seq: 42, removed_ms: 7, ending: Ending::Ended };
        assert_eq!(Tombstone::decode(&t.encode()), Some(t));
        assert_eq!(Tombstone::decode(&t.encode()[..16]), None);
        let mut bad = t.encode();
        bad[16] = 9;
        assert_eq!(Tombstone::decode(&bad), None);
    }

    #[test]
    fn the_next_life_starts_after_the_old_tail_unless_a_broadcast_continues_it() {
        let continues = Tombstone { last_seq: 10, removed_ms: 0, ending: Ending::Continues };
        let ended = Tombstone { ending: Ending::Ended, ..continues };
        assert_eq!(Tombstone::next_life(None, 5, NextLife::Put), (5, None));
        assert_eq!(Tombstone::next_life(Some(&continues), 12, NextLife::Broadcast), (12, Some(10)));
        assert_eq!(Tombstone::next_life(Some(&continues), 12, NextLife::Put), (13, None));
        assert_eq!(Tombstone::next_life(Some(&ended), 10, NextLife::Broadcast), (11, None));
    }

    #[test]
    fn sweeping_takes_only_old_tombstones() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let mut batch = sled::Batch::default();
        for (name, at) in [("a", 100), ("b", 200), ("c", 300)] {
            let t = Tombstone { last_seq: 1, removed_ms: at, ending: Ending::Ended };
            bury(&db, &mut batch, name, t, 1).unwrap();
        }
        db.apply_batch(batch).unwrap();
        // "b" buried again later: its first index entry no longer owns the tombstone.
        let mut batch = sled::Batch::default();
        bury(&db, &mut batch, "b", Tombstone { last_seq: 2, removed_ms: 400, ending: Ending::Ended }, 1).unwrap();
        db.apply_batch(batch).unwrap();
        assert_eq!(sweep(&db, 250, 100).unwrap(), 1, "a only (b's old index entry was replaced)");
        assert!(get(&db, "a").unwrap().is_none());
        assert_eq!(get(&db, "b").unwrap().map(|t| t.last_seq), Some(2));
        assert!(get(&db, "c").unwrap().is_some());
        assert_eq!(sweep(&db, 1000, 100).unwrap(), 2);
        assert_eq!(db.len(), 0);
    }
}
