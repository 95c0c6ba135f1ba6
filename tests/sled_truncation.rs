//! sled on its own, the way mass expiry uses it (issue 23): the log file grows, most of it is
//! freed at once, and it grows again, while many threads write. sled 0.34.7 truncates the
//! freed tail of the file on its shared I/O pool and, once the log grows back to that point,
//! waits for the truncation while holding its segment accountant; when every pool thread was
//! itself waiting for the accountant, nothing ever ran the truncation and sled hung for good.
//! The carried copy runs truncations on a thread of their own (docs/DECISIONS.md).
//!
//! A watchdog fails the test on any round slower than [`ROUND_LIMIT`]. CI runs [`ROUNDS`]
//! rounds (about a minute on two cores); `ANYCABLE_DS_SLED_ROUNDS` sets another number.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Rounds in CI; `ANYCABLE_DS_SLED_ROUNDS` overrides.
const ROUNDS: usize = 40;
/// Threads writing at once: more than sled's seven idle I/O threads can absorb.
const WRITERS: usize = 32;
/// Values each writer inserts per round, then removes.
const VALUES: usize = 2_000;
/// Size of each value: a few of them fill one of sled's 512 KiB segments.
const VALUE_BYTES: usize = 1_000;
/// Any round slower than this is a hang (a round takes well under a second).
const ROUND_LIMIT: Duration = Duration::from_secs(30);

fn round(db: &sled::Db, round: usize) {
    thread::scope(|scope| {
        for writer in 0..WRITERS {
            scope.spawn(move || {
                let tree = db.open_tree(format!("w{writer}")).unwrap();
                let value = vec![round as u8; VALUE_BYTES];
                for i in 0..VALUES {
                    tree.insert(format!("r{round}-{i}"), value.as_slice()).unwrap();
                    if i % 100 == 99 {
                        tree.flush().unwrap();
                    }
                }
                // Everything this writer has goes at once, as when its streams expire.
                for i in 0..VALUES {
                    tree.remove(format!("r{round}-{i}")).unwrap();
                }
                tree.flush().unwrap();
            });
        }
    });
}

#[test]
fn a_log_that_grows_shrinks_and_grows_again_under_many_writers_never_hangs() {
    let rounds = std::env::var("ANYCABLE_DS_SLED_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(ROUNDS);
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(sled::Config::new().path(dir.path()).flush_every_ms(Some(500)).open().unwrap());
    let (done, finished) = mpsc::channel();
    let worker = {
        let db = db.clone();
        thread::spawn(move || {
            for r in 0..rounds {
                let started = Instant::now();
                round(&db, r);
                if done.send((r, started.elapsed())).is_err() {
                    return;
                }
            }
        })
    };
    for expected in 0..rounds {
        match finished.recv_timeout(ROUND_LIMIT) {
            Ok((r, took)) => {
                assert_eq!(r, expected);
                if std::env::var_os("SLED_VERBOSE").is_some() {
                    eprintln!("round {r}: {took:?}, {} bytes", db.size_on_disk().unwrap());
                }
            }
            // The hung threads cannot be stopped; the test process ends with the failure.
            Err(_) => panic!("round {expected} did not finish within {ROUND_LIMIT:?}: sled hangs"),
        }
    }
    worker.join().unwrap();
    eprintln!("{rounds} rounds; {} bytes on disk", db.size_on_disk().unwrap());
}
