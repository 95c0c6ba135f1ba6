//! The open sled database, and its replacement after an I/O failure.
//!
//! sled 0.34 remembers the first I/O error of a `Db` (a full disk, say) and fails every later
//! write with it, even after space returns. The only way back is to close the database and
//! open it again, which replays its log from disk. So the `Db` lives in this slot: users take
//! a clone per operation and never keep one, and the writer thread, which sees the failures,
//! empties the slot and reopens the store once a probe write shows the disk accepts data again.
//! While the slot is empty, storage calls answer [`StorageError::Recovering`].

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use super::StorageError;

pub(crate) struct DbSlot {
    db: RwLock<Option<sled::Db>>,
    dir: PathBuf,
    cache_capacity: u64,
    /// sled's log file, opened on first use, for [`DbSlot::sync_log`].
    log_file: Mutex<Option<File>>,
}

/// Bytes written (and removed) to check that the disk takes data again.
const PROBE_BYTES: usize = 1024 * 1024;

impl DbSlot {
    pub(crate) fn open(dir: &Path, cache_capacity: u64) -> Result<(DbSlot, sled::Db), sled::Error> {
        let db = open_db(dir, cache_capacity)?;
        let slot = DbSlot {
            db: RwLock::new(Some(db.clone())),
            dir: dir.to_path_buf(),
            cache_capacity,
            log_file: Mutex::new(None),
        };
        Ok((slot, db))
    }

    /// The database, for one operation (do not keep the clone).
    pub(crate) fn get(&self) -> Result<sled::Db, StorageError> {
        self.db.read().expect("db slot lock").clone().ok_or(StorageError::Recovering)
    }

    /// Closes and reopens the database if the disk accepts writes again. Returns the new
    /// database, or `None` when it is not time yet (the caller retries later).
    pub(crate) fn reopen(&self) -> Option<sled::Db> {
        if let Err(e) = self.probe() {
            log::debug!("storage still not writable: {e}");
            return None;
        }
        log::warn!("storage: the disk accepts writes again, reopening {}", self.dir.display());
        drop(self.db.write().expect("db slot lock").take());
        drop(self.log_file.lock().expect("log file lock").take());
        // Readers may still hold a clone for the operation they are in; sled's file lock is
        // released when the last one is gone.
        for _ in 0..250 {
            match open_db(&self.dir, self.cache_capacity) {
                Ok(db) => return Some(db),
                Err(e) => {
                    log::debug!("reopen: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        log::error!("storage: could not reopen {}; will retry", self.dir.display());
        None
    }

    /// `fdatasync` of sled's log file, after `Db::flush`.
    ///
    /// sled 0.34 makes its log durable with `sync_file_range` on Linux, which waits for the
    /// data to reach the device but neither flushes a volatile device write cache nor the
    /// file's metadata: a power cut could take back acknowledged writes. `fdatasync` does both
    /// (for the file, whichever descriptor it is called on). See docs/DURABILITY.md.
    pub(crate) fn sync_log(&self) -> std::io::Result<()> {
        let mut file = self.log_file.lock().expect("log file lock");
        if file.is_none() {
            // sled 0.34 keeps its whole log in one file named `db` in its directory.
            *file = Some(File::open(self.dir.join("db"))?);
        }
        file.as_ref().expect("opened above").sync_data()
    }

    /// Puts a (re)opened database in the slot.
    pub(crate) fn put(&self, db: sled::Db) {
        *self.db.write().expect("db slot lock") = Some(db);
    }

    fn probe(&self) -> std::io::Result<()> {
        use std::io::Write;
        let path = self.dir.join(".write-probe");
        let result = (|| {
            let mut file = std::fs::File::create(&path)?;
            file.write_all(&vec![0u8; PROBE_BYTES])?;
            file.sync_all()
        })();
        let _ = std::fs::remove_file(&path);
        result
    }
}

pub(crate) fn open_db(dir: &Path, cache_capacity: u64) -> Result<sled::Db, sled::Error> {
    sled::Config::new().path(dir).cache_capacity(cache_capacity).flush_every_ms(Some(500)).open()
}
