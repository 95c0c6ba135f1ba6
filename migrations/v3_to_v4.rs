//! Layout 3 → 4: stream metadata of the Durable Streams write API.
//!
//! Layout 4 adds keys `D ‖ stream id` holding a stream's metadata (content type, closure,
//! TTL, `Stream-Expires-At`, the last `Stream-Seq`, and whether `PUT` made it) as JSON. A
//! stream without one is what every layout-3 stream is: a JSON stream made by broadcasts, open,
//! never expiring. So nothing needs converting; the step records the new version, so that a
//! layout-3 build refuses a store a layout-4 one has written to (it would append broadcasts to
//! closed streams and byte streams, and trim streams `PUT` made).

use super::Progress;

const LAYOUT_KEY: &[u8] = b"Mlayout";

pub fn run(db: &sled::Db, progress: Progress) -> sled::Result<()> {
    db.insert(LAYOUT_KEY, &4u32.to_be_bytes()[..])?;
    progress("done: nothing to convert");
    Ok(())
}
