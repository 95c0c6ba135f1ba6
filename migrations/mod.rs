//! Storage layout history: one upgrade step per layout change.
//!
//! This directory is compiled into the server (`src/storage/migrate.rs` includes it). A step
//! upgrades a store from layout `from` to `from + 1`. It must be safe to interrupt at any
//! point: either it makes all its changes and records the new version in one atomic batch, or
//! it works in atomic chunks that each leave the store a valid mix (so running the step again
//! finishes the job) and records the new version last. Each step carries its own copy of the
//! encodings it converts between, because the server's current ones move on with later
//! layouts. See `README.md` beside this file for what each layout looks like.

mod v1_to_v2;
mod v2_to_v3;
mod v3_to_v4;

/// The layout this build reads and writes.
pub const CURRENT_LAYOUT: u32 = 4;

/// Reports progress of a long step (one line each).
pub type Progress<'a> = &'a dyn Fn(&str);

/// One upgrade step.
pub struct Step {
    pub from: u32,
    pub description: &'static str,
    pub run: fn(&sled::Db, Progress) -> sled::Result<()>,
}

/// Steps in order; `STEPS[i].from == i + 1`.
pub const STEPS: &[Step] = &[
    Step {
        from: 1,
        description: "one log record per group of messages instead of one key per message",
        run: v1_to_v2::run,
    },
    Step { from: 2, description: "expired streams may be removed (store-wide sequence floor)", run: v2_to_v3::run },
    Step {
        from: 3,
        description: "stream metadata of the write API (content type, closure, expiry)",
        run: v3_to_v4::run,
    },
];
