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
    #[error("the upgrade step from storage layout {from} did not record its new version")]
    StepDidNotRecord { from: u32 },
    #[error("corrupt store metadata: {0}")]
    Corrupt(&'static str),
    #[error(transparent)]
    Sled(#[from] sled::Error),
}

/// What the rest of storage needs from the store's metadata.
pub(crate) struct StoreState {
    pub epoch: Epoch,
    pub next_stream_id: u64,
    pub seq_floor: u64,
}

/// Initialises a new store, upgrades an old one, or refuses one this build cannot read.
pub(crate) fn prepare(db: &sled::Db) -> Result<StoreState, MigrateError> {
    upgrade(db, CURRENT_LAYOUT, migrations::STEPS)?;
    let epoch = db.get(keys::META_EPOCH)?.ok_or(MigrateError::Corrupt("epoch missing"))?;
    let epoch = Epoch::parse(&epoch).ok_or(MigrateError::Corrupt("epoch"))?;
    let next_stream_id = match db.get(keys::META_NEXT_STREAM_ID)? {
        Some(bytes) => keys::decode_u64(&bytes).ok_or(MigrateError::Corrupt("next stream id"))?,
        None => 1,
    };
    let seq_floor = match db.get(keys::META_SEQ_FLOOR)? {
        Some(bytes) => keys::decode_u64(&bytes).ok_or(MigrateError::Corrupt("sequence floor"))?,
        None => 0,
    };
    Ok(StoreState { epoch, next_stream_id, seq_floor })
}

/// Brings the store to layout `target` with `steps`, one durable step at a time.
fn upgrade(db: &sled::Db, target: u32, steps: &[migrations::Step]) -> Result<(), MigrateError> {
    let mut layout = match read_layout(db)? {
        Some(layout) => layout,
        None if db.is_empty() => initialise(db, target)?,
        None => return Err(MigrateError::Foreign),
    };
    if layout > target {
        return Err(MigrateError::TooNew { found: layout });
    }
    while layout < target {
        let from = layout;
        let step = steps.iter().find(|s| s.from == from).ok_or(MigrateError::MissingStep { from })?;
        log::info!("upgrading storage layout {from} -> {}: {}", from + 1, step.description);
        (step.run)(db, &|progress| log::info!("  {progress}"))?;
        db.flush()?;
        layout = read_layout(db)?.unwrap_or(from);
        if layout != from + 1 {
            return Err(MigrateError::StepDidNotRecord { from });
        }
    }
    Ok(())
}

fn read_layout(db: &sled::Db) -> Result<Option<u32>, MigrateError> {
    match db.get(keys::META_LAYOUT)? {
        Some(bytes) => {
            Ok(Some(u32::from_be_bytes(bytes.as_ref().try_into().map_err(|_| MigrateError::Corrupt("layout"))?)))
        }
        None => Ok(None),
    }
}

/// Writes the metadata of a brand-new store, durably, before anything else can happen.
fn initialise(db: &sled::Db, layout: u32) -> Result<u32, MigrateError> {
    let mut batch = sled::Batch::default();
    batch.insert(keys::META_EPOCH, Epoch::random().as_str().as_bytes());
    batch.insert(keys::META_NEXT_STREAM_ID, &keys::encode_u64(1)[..]);
    batch.insert(keys::META_LAYOUT, &layout.to_be_bytes()[..]);
    db.apply_batch(batch)?;
    db.flush()?;
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::keys::StreamRecord;

    /// A stand-in for a future step (layout 3 -> 4): copies every record key under a new
    /// prefix and records the new version in the same batch.
    /// The layout after today's, for steps made up by the tests.
    const NEXT: u32 = CURRENT_LAYOUT + 1;

    fn copy_log_step(db: &sled::Db, progress: migrations::Progress) -> sled::Result<()> {
        let mut batch = sled::Batch::default();
        let mut copied = 0;
        for item in db.scan_prefix([keys::RECORD]) {
            let (key, value) = item?;
            let mut new_key = key.to_vec();
            new_key[0] = b'X';
            batch.insert(new_key, value);
            copied += 1;
        }
        progress(&format!("copied {copied} records"));
        batch.insert(keys::META_LAYOUT, &NEXT.to_be_bytes()[..]);
        db.apply_batch(batch)
    }

    const STEPS_TO_NEXT: &[migrations::Step] =
        &[migrations::Step { from: CURRENT_LAYOUT, description: "test step", run: copy_log_step }];

    fn temp_db() -> (tempfile::TempDir, sled::Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        (dir, db)
    }

    #[test]
    fn an_older_layout_is_upgraded_step_by_step_keeping_data() {
        let (_dir, db) = temp_db();
        prepare(&db).unwrap();
        db.insert(keys::record_key(1, 1), &b"record"[..]).unwrap();
        let epoch = db.get(keys::META_EPOCH).unwrap();

        upgrade(&db, NEXT, STEPS_TO_NEXT).unwrap();
        assert_eq!(read_layout(&db).unwrap(), Some(NEXT));
        assert_eq!(db.get(keys::record_key(1, 1)).unwrap().as_deref(), Some(&b"record"[..]));
        assert_eq!(db.scan_prefix(b"X").count(), 1);
        assert_eq!(db.get(keys::META_EPOCH).unwrap(), epoch, "the epoch survives upgrades");
        // Already at the target: nothing runs again.
        upgrade(&db, NEXT, STEPS_TO_NEXT).unwrap();
        assert_eq!(db.scan_prefix(b"X").count(), 1);
    }

    #[test]
    fn newer_layouts_missing_steps_and_foreign_data_are_refused() {
        let (_dir, db) = temp_db();
        prepare(&db).unwrap();
        let too_new = upgrade(&db, 1, &[]).unwrap_err();
        assert!(too_new.to_string().contains("newer anycable-ds"), "{too_new}");
        assert!(matches!(upgrade(&db, NEXT + 1, STEPS_TO_NEXT), Err(MigrateError::MissingStep { from: NEXT })));

        let forgetful: &[migrations::Step] =
            &[migrations::Step { from: CURRENT_LAYOUT, description: "forgets", run: |_, _| Ok(()) }];
        let (_dir2, db2) = temp_db();
        prepare(&db2).unwrap();
        assert!(matches!(upgrade(&db2, NEXT, forgetful), Err(MigrateError::StepDidNotRecord { from: CURRENT_LAYOUT })));

        let (_dir3, db3) = temp_db();
        db3.insert(b"something else", &b"x"[..]).unwrap();
        assert!(matches!(prepare(&db3), Err(MigrateError::Foreign)));
    }

    /// Writes a layout-1 store by hand: stream 1 with `messages` (timestamp = 1000 + seq).
    fn layout_1_store(db: &sled::Db, messages: &[&str]) {
        db.insert(keys::META_LAYOUT, &1u32.to_be_bytes()[..]).unwrap();
        db.insert(keys::META_EPOCH, &b"abcdefghij"[..]).unwrap();
        db.insert(keys::META_NEXT_STREAM_ID, &keys::encode_u64(2)[..]).unwrap();
        db.insert(keys::name_key("s"), &keys::encode_u64(1)[..]).unwrap();
        let record = StreamRecord { last_seq: messages.len() as u64, ..StreamRecord::new() };
        db.insert(keys::stream_key(1), record.encode()).unwrap();
        for (i, message) in messages.iter().enumerate() {
            let seq = i as u64 + 1;
            let mut key = keys::record_key(1, seq);
            key[0] = b'L';
            let mut value = (1000 + seq).to_be_bytes().to_vec();
            value.extend_from_slice(message.as_bytes());
            db.insert(key, value).unwrap();
        }
    }

    fn records(db: &sled::Db) -> Vec<(u64, u64, String)> {
        db.scan_prefix([keys::RECORD])
            .map(|item| {
                let (key, value) = item.unwrap();
                let record = keys::LogRecord::parse(&key, &value).unwrap();
                let text = String::from_utf8(record.messages(0, record.count()).unwrap().to_vec()).unwrap();
                (record.first_seq, record.timestamp_ms, text)
            })
            .collect()
    }

    #[test]
    fn layout_1_messages_become_one_message_records() {
        let (_dir, db) = temp_db();
        layout_1_store(&db, &["{\"a\":1}", "\"x,y\"", "12345678901234567890123"]);
        let lines = std::cell::RefCell::new(Vec::new());
        (migrations::STEPS[0].run)(&db, &|line| lines.borrow_mut().push(line.to_string())).unwrap();
        assert_eq!(read_layout(&db).unwrap(), Some(2));
        assert_eq!(
            records(&db),
            [
                (1, 1001, "{\"a\":1}".to_string()),
                (2, 1002, "\"x,y\"".to_string()),
                (3, 1003, "12345678901234567890123".to_string())
            ]
        );
        assert_eq!(db.scan_prefix(b"L").count(), 0, "no layout-1 key is left");
        assert_eq!(lines.into_inner(), ["done: 3 messages converted"]);
        assert!(prepare(&db).is_ok());
    }

    #[test]
    fn an_interrupted_upgrade_finishes_on_the_next_start() {
        let (_dir, db) = temp_db();
        layout_1_store(&db, &["1", "2", "3"]);
        // As if a crash came after the first chunk: message 1 converted, 2 and 3 not yet.
        let mut batch = sled::Batch::default();
        let mut v1_key = keys::record_key(1, 1);
        v1_key[0] = b'L';
        batch.remove(&v1_key[..]);
        batch.insert(&keys::record_key(1, 1)[..], keys::encode_record(1001, &[b"1"]));
        db.apply_batch(batch).unwrap();

        prepare(&db).unwrap();
        assert_eq!(read_layout(&db).unwrap(), Some(CURRENT_LAYOUT));
        let texts: Vec<String> = records(&db).into_iter().map(|(_, _, text)| text).collect();
        assert_eq!(texts, ["1", "2", "3"]);
    }
}
