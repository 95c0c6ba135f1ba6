//! A circuit breaker for calls to the application, after the one AnyCable puts in front of
//! its HTTP RPC (sony/gobreaker with the same settings): when most calls of the last ten
//! seconds failed, stop calling for five seconds, then let a few trial calls through and
//! close again once they all succeed.
//!
//! Why: long-poll and SSE readers reconnect on their own. When the application is down or
//! drowning, every reconnect would otherwise be another call piling onto it; with the breaker
//! open those reads get a quick `503` instead and the application gets room to recover.
//!
//! Written here rather than taken from a crate: it is forty lines of state, and the crates
//! available either run the call themselves (we need to count outcomes that happen across
//! `.await`s, cancellations included) or are unmaintained.

use std::time::{Duration, Instant};

/// The window in which failures are counted while closed.
const WINDOW: Duration = Duration::from_secs(10);
/// Fewest calls in a window before the failure ratio can open the breaker.
const MIN_CALLS: u32 = 10;
/// Open when at least this share of the window's calls failed (in tenths).
const FAILURE_TENTHS: u32 = 8;
/// How long calls stay paused once open.
const OPEN_FOR: Duration = Duration::from_secs(5);
/// Trial calls let through while half-open; this many successes in a row close the breaker.
const TRIAL_CALLS: u32 = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open { until: Instant },
    HalfOpen,
}

/// How a call let through by [`Breaker::allow`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The application answered (whatever its verdict on the client).
    Answered,
    /// No usable answer: unreachable, timeout, non-200, `ERROR`.
    Failed,
    /// The call was abandoned before it ended (the reader went away): counts as neither.
    Abandoned,
}

#[derive(Debug)]
pub struct Breaker {
    state: State,
    /// Bumped at every state change and window reset: outcomes of calls allowed under an
    /// older generation no longer count.
    generation: u64,
    window_start: Instant,
    calls: u32,
    failures: u32,
    trials_in_flight: u32,
    trial_successes: u32,
}

impl Breaker {
    pub fn new(now: Instant) -> Breaker {
        Breaker {
            state: State::Closed,
            generation: 0,
            window_start: now,
            calls: 0,
            failures: 0,
            trials_in_flight: 0,
            trial_successes: 0,
        }
    }

    pub fn state(&mut self, now: Instant) -> State {
        self.refresh(now);
        self.state
    }

    /// May a call go out now? `Some(generation)` to report its outcome with, or `None`.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        self.refresh(now);
        match self.state {
            State::Open { .. } => None,
            State::HalfOpen if self.trials_in_flight >= TRIAL_CALLS => None,
            State::HalfOpen => {
                self.trials_in_flight += 1;
                Some(self.generation)
            }
            State::Closed => {
                self.calls += 1;
                Some(self.generation)
            }
        }
    }

    /// Reports how a call allowed under `generation` ended.
    pub fn report(&mut self, generation: u64, outcome: Outcome, now: Instant) {
        self.refresh(now);
        if generation != self.generation {
            return;
        }
        match self.state {
            State::Closed => {
                if outcome == Outcome::Failed {
                    self.failures += 1;
                    if self.calls >= MIN_CALLS && self.failures * 10 >= self.calls * FAILURE_TENTHS {
                        self.set(State::Open { until: now + OPEN_FOR }, now);
                    }
                }
            }
            State::HalfOpen => {
                self.trials_in_flight = self.trials_in_flight.saturating_sub(1);
                match outcome {
                    Outcome::Answered => {
                        self.trial_successes += 1;
                        if self.trial_successes >= TRIAL_CALLS {
                            self.set(State::Closed, now);
                        }
                    }
                    Outcome::Failed => self.set(State::Open { until: now + OPEN_FOR }, now),
                    Outcome::Abandoned => {}
                }
            }
            State::Open { .. } => {}
        }
    }

    fn refresh(&mut self, now: Instant) {
        match self.state {
            State::Open { until } if now >= until => self.set(State::HalfOpen, now),
            State::Closed if now.duration_since(self.window_start) >= WINDOW => self.set(State::Closed, now),
            _ => {}
        }
    }

    fn set(&mut self, state: State, now: Instant) {
        self.state = state;
        self.generation += 1;
        self.window_start = now;
        self.calls = 0;
        self.failures = 0;
        self.trials_in_flight = 0;
        self.trial_successes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail_calls(breaker: &mut Breaker, n: u32, now: Instant) {
        for _ in 0..n {
            let generation = breaker.allow(now).expect("closed breaker lets calls through");
            breaker.report(generation, Outcome::Failed, now);
        }
    }

    #[test]
    fn opens_on_mostly_failing_calls_and_recovers_through_trials() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(t0);
        fail_calls(&mut breaker, MIN_CALLS - 1, t0);
        assert_eq!(breaker.state(t0), State::Closed, "too few calls to judge");
        fail_calls(&mut breaker, 1, t0);
        assert!(matches!(breaker.state(t0), State::Open { .. }));
        assert_eq!(breaker.allow(t0 + Duration::from_secs(4)), None, "paused while open");

        // Half-open: TRIAL_CALLS trials, no more, until they report.
        let t1 = t0 + OPEN_FOR;
        let trials: Vec<u64> = (0..TRIAL_CALLS).map(|_| breaker.allow(t1).expect("trial")).collect();
        assert_eq!(breaker.allow(t1), None, "no more than the trial calls");
        for generation in trials {
            breaker.report(generation, Outcome::Answered, t1);
        }
        assert_eq!(breaker.state(t1), State::Closed);
    }

    #[test]
    fn a_failed_trial_opens_again_and_abandoned_trials_free_their_place() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(t0);
        fail_calls(&mut breaker, MIN_CALLS, t0);
        let t1 = t0 + OPEN_FOR;
        let trial = breaker.allow(t1).unwrap();
        breaker.report(trial, Outcome::Abandoned, t1);
        assert_eq!(breaker.state(t1), State::HalfOpen);
        let trial = breaker.allow(t1).unwrap();
        breaker.report(trial, Outcome::Failed, t1);
        assert!(matches!(breaker.state(t1), State::Open { .. }));
    }

    #[test]
    fn answers_and_old_windows_keep_it_closed() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(t0);
        // 7 failures out of 10 is below the ratio.
        for i in 0..10 {
            let generation = breaker.allow(t0).unwrap();
            breaker.report(generation, if i < 7 { Outcome::Failed } else { Outcome::Answered }, t0);
        }
        assert_eq!(breaker.state(t0), State::Closed);
        // A failure reported after the window moved on does not count in the new one.
        let old = breaker.allow(t0).unwrap();
        let later = t0 + WINDOW;
        fail_calls(&mut breaker, MIN_CALLS - 1, later);
        breaker.report(old, Outcome::Failed, later);
        assert_eq!(breaker.state(later), State::Closed);
    }
}
