//! Layout 1 → 2: each message key `L ‖ id ‖ seq` becomes a one-message log record under
//! `R ‖ id ‖ seq`.
//!
//! Works in chunks: each chunk inserts the records and removes the message keys it converted in
//! one atomic batch, so after a crash the store holds some `L` and some `R` entries, never the
//! same message twice or not at all, and running the step again converts the rest. The layout
//! version is written last.

use super::Progress;

const LAYOUT_KEY: &[u8] = b"Mlayout";
const V1_MESSAGE: u8 = b'L';
const V2_RECORD: u8 = b'R';
/// Messages converted per atomic batch.
const CHUNK: usize = 10_000;
/// A progress line every this many messages.
const REPORT_EVERY: u64 = 100_000;

pub fn run(db: &sled::Db, progress: Progress) -> sled::Result<()> {
    let mut converted: u64 = 0;
    let mut next_report = REPORT_EVERY;
    loop {
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        for item in db.scan_prefix([V1_MESSAGE]).take(CHUNK) {
            let (key, value) = item?;
            let Some(record) = record_from_message(&value) else {
                // A value too short to hold its timestamp was never written by layout 1.
                return Err(sled::Error::Unsupported(format!("corrupt layout-1 message under key {key:?}")));
            };
            let mut record_key = key.to_vec();
            record_key[0] = V2_RECORD;
            batch.insert(record_key, record);
            batch.remove(key);
            in_batch += 1;
        }
        if in_batch == 0 {
            break;
        }
        db.apply_batch(batch)?;
        converted += in_batch as u64;
        if converted >= next_report {
            progress(&format!("{converted} messages converted"));
            next_report += REPORT_EVERY;
        }
    }
    progress(&format!("done: {converted} messages converted"));
    db.insert(LAYOUT_KEY, &2u32.to_be_bytes()[..])?;
    Ok(())
}

/// Layout 1 value `timestamp (u64) ‖ json` → layout 2 record value
/// `timestamp (u64) ‖ count = 1 (u32) ‖ end of the message (u32) ‖ json`.
fn record_from_message(value: &[u8]) -> Option<Vec<u8>> {
    let (timestamp, json) = (value.get(..8)?, value.get(8..)?);
    let mut record = Vec::with_capacity(value.len() + 8);
    record.extend_from_slice(timestamp);
    record.extend_from_slice(&1u32.to_be_bytes());
    record.extend_from_slice(&u32::try_from(json.len()).ok()?.to_be_bytes());
    record.extend_from_slice(json);
    Some(record)
}
