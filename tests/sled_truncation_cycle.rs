//! The cycle behind sled's hang under mass expiry (issue 23), forced deterministically. Its own
//! test binary, so no other sled work in the process feeds the I/O pool while the test holds
//! every pool thread (the pool would spawn more threads, and the cycle would not close).

use std::time::Duration;

/// The hang's cycle, forced with sled's real I/O pool (a test hook in the carried copy,
/// `sled::truncation_cycle_for_tests`): a thread holds a lock, every pool thread waits for it,
/// and the lock's holder waits for a file truncation, as `bump_tip` does while it holds the
/// segment accountant. Queued on the shared pool, the way sled 0.34.7 queued it, the
/// truncation never runs: that is the hang, reproduced on every run (the first assertion).
/// On the truncation thread of the fix it runs at once (the second). The random workload of
/// `tests/sled_truncation.rs` never hit the cycle on our machines; this test always does.
#[test]
fn a_truncation_runs_while_every_io_thread_waits_for_its_caller() {
    let wait = Duration::from_secs(2);
    assert!(
        !sled::truncation_cycle_for_tests(true, wait),
        "through the shared pool, the truncation should be stuck behind the waiting threads \
         (if not, this test no longer forces the cycle)"
    );
    assert!(
        sled::truncation_cycle_for_tests(false, wait),
        "the truncation thread must run a truncation while every I/O thread is blocked"
    );
}
