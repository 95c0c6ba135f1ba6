//! `Stream-Cursor`: a coarse clock that lets CDNs tell apart otherwise identical live requests.
//!
//! The cursor is the number of 20-second intervals since 2024-10-09T00:00:00Z. When a client
//! echoes a cursor that is not behind the clock, the answer must still move forward, so the
//! server returns a larger number (one more plus a random jitter of up to 60 intervals), which
//! keeps the cursor monotonic for that client and keeps request URLs from repeating.

use std::time::{SystemTime, UNIX_EPOCH};

use rand::Rng;

/// 2024-10-09T00:00:00Z in Unix seconds.
const CURSOR_EPOCH_SECS: u64 = 1_728_432_000;
const INTERVAL_SECS: u64 = 20;
const MAX_JITTER_INTERVALS: u64 = 60;

/// The cursor interval of the current time.
pub fn current_interval() -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    now.saturating_sub(CURSOR_EPOCH_SECS) / INTERVAL_SECS
}

/// The cursor to answer a request that carried `client` (the raw `cursor` query value).
pub fn next_cursor(client: Option<&str>) -> String {
    next_cursor_at(current_interval(), client).to_string()
}

fn next_cursor_at(now: u64, client: Option<&str>) -> u64 {
    match client.and_then(|c| c.parse::<u64>().ok()) {
        Some(client) if client >= now => {
            let jitter = rand::rng().random_range(0..=MAX_JITTER_INTERVALS);
            client.saturating_add(1 + jitter)
        }
        _ => now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_is_the_interval_count_unless_the_client_is_ahead() {
        assert_eq!(next_cursor_at(1000, None), 1000);
        assert_eq!(next_cursor_at(1000, Some("junk")), 1000);
        assert_eq!(next_cursor_at(1000, Some("999")), 1000);
        for client in [1000u64, 1005] {
            let next = next_cursor_at(1000, Some(&client.to_string()));
            assert!(next > client && next <= client + 1 + MAX_JITTER_INTERVALS, "{next}");
        }
    }

    #[test]
    fn current_interval_matches_the_definition() {
        // 2026 is well past the epoch: about 1.6 million intervals per year.
        assert!(current_interval() > 3_000_000);
    }
}
