//! Storage layout history: one upgrade step per layout change.
//!
//! This file is compiled into the server (`src/storage/migrate.rs` includes it). A step
//! upgrades a store from layout `from` to `from + 1` and must record the new version in the
//! same atomic batch as its last change, so a crash mid-migration leaves either the old layout
//! or the new one, never a mix marked as done. See `README.md` beside this file for what each
//! layout looks like.

/// The layout this build reads and writes.
pub const CURRENT_LAYOUT: u32 = 1;

/// Reports progress of a long step (one line each).
pub type Progress<'a> = &'a dyn Fn(&str);

/// One upgrade step.
pub struct Step {
    pub from: u32,
    pub description: &'static str,
    pub run: fn(&sled::Db, Progress) -> sled::Result<()>,
}

/// Steps in order; `STEPS[i].from == i + 1`. Layout 1 is the first layout, so none yet.
pub const STEPS: &[Step] = &[];
