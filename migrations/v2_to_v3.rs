//! Layout 2 → 3: streams may be removed, and their numbers live on in a store-wide floor.
//!
//! Layout 3 adds the key `Mseq_floor` and an optional base in stream records (flag bit 1),
//! and lets the server delete a stream whose every message expired. Nothing stored at layout 2
//! needs converting: a missing floor is 0 and a record without the flag has base 0. The step
//! only records the new version, so that a layout-2 build refuses a store that a layout-3 one
//! has written to (it would misread a base as part of the content type and, not knowing the
//! floor, hand out a removed stream's numbers again).

use super::Progress;

const LAYOUT_KEY: &[u8] = b"Mlayout";

pub fn run(db: &sled::Db, progress: Progress) -> sled::Result<()> {
    db.insert(LAYOUT_KEY, &3u32.to_be_bytes()[..])?;
    progress("done: nothing to convert");
    Ok(())
}
