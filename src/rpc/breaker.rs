//! A circuit breaker for calls to the application, after the one AnyCable puts in front of
//! its HTTP RPC (sony/gobreaker with the same settings): when most calls of the last ten
//! seconds failed, stop calling for five seconds, then let a few trial calls through and
//! close again once they all succeed.
//!
//! Why: long-poll and SSE readers reconnect on their own. When the application is down or
//! drowning, every reconnect would otherwise be another call piling onto it; with the breaker
//! open those reads get a quick `503` instead and the application gets room to recover.
//!
//! Who is to blame: an application that cannot be reached or does not answer in time is
//! failing whoever asked, and every such call counts. An answer that is there but unusable
//! (a non-200 status, `ERROR`, garbage) may be about one client's input: anycable-rails
//! answers `ERROR` for any exception in `connect`, so a cookie that makes the application
//! raise is in the client's hands. Such a failure counts once per client (its address, an
//! IPv6 client by its /64) per window; more from the same client count as neither success
//! nor failure. One client flooding a bad cookie can thus never pause calls for everyone; an
//! application answering 500 to many clients still trips the breaker.
//!
//! Written here rather than taken from a crate: it is a few counters of state, and the
//! crates available either run the call themselves (we need to count outcomes that happen
//! across `.await`s, cancellations included) or are unmaintained.

use std::collections::HashSet;
use std::net::IpAddr;
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
/// Clients remembered per window as already blamed for an unusable answer; past this many,
/// the failures of clients not remembered all count (that many clients failing is news).
const BLAMED_CLIENTS: usize = 64;
/// While half-open, unusable answers to this many distinct clients open the breaker again.
const TRIAL_CLIENTS: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open { until: Instant },
    HalfOpen,
}

/// Who a call was made for, as far as blame goes: a client address (IPv6 by its /64 prefix,
/// which one host usually holds whole), or `Unknown` when there is none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Client {
    Addr(u128),
    Unknown,
}

impl Client {
    pub fn of(ip: Option<IpAddr>) -> Client {
        match ip.map(|ip| ip.to_canonical()) {
            Some(IpAddr::V4(v4)) => Client::Addr(u128::from(u32::from(v4))),
            Some(IpAddr::V6(v6)) => Client::Addr((u128::from(v6) & !u128::from(u64::MAX)) | (1 << 32)),
            None => Client::Unknown,
        }
    }
}

/// How a call let through by [`Breaker::allow`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The application answered (whatever its verdict on the client).
    Answered,
    /// No answer at all: unreachable or not in time. The application is failing.
    Failed,
    /// An answer that is no verdict (non-200, `ERROR`, unusable) to a call made for this
    /// client: it may be about the client's own input, so it is blamed on the client first.
    Unusable(Client),
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
    /// Clients blamed for an unusable answer in this generation (at most [`BLAMED_CLIENTS`]).
    blamed: HashSet<Client>,
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
            blamed: HashSet::new(),
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
            State::Closed => match self.judge(outcome) {
                Outcome::Failed => {
                    self.failures += 1;
                    if self.calls >= MIN_CALLS && self.failures * 10 >= self.calls * FAILURE_TENTHS {
                        self.set(State::Open { until: now + OPEN_FOR }, now);
                    }
                }
                // A client's repeated failure is no call at all for the ratio.
                Outcome::Abandoned => self.calls = self.calls.saturating_sub(1),
                _ => {}
            },
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
                    // One client's unusable answers cannot keep the breaker open: only
                    // those to several distinct clients reopen it.
                    Outcome::Unusable(client) => {
                        if self.blamed.len() < BLAMED_CLIENTS {
                            self.blamed.insert(client);
                        }
                        if self.blamed.len() >= TRIAL_CLIENTS {
                            self.set(State::Open { until: now + OPEN_FOR }, now);
                        }
                    }
                    Outcome::Abandoned => {}
                }
            }
            State::Open { .. } => {}
        }
    }

    /// What an outcome counts as while closed: an unusable answer is a failure the first time
    /// its client is blamed in this window and neutral (`Abandoned`) after that.
    fn judge(&mut self, outcome: Outcome) -> Outcome {
        let Outcome::Unusable(client) = outcome else {
            return outcome;
        };
        if self.blamed.contains(&client) {
            Outcome::Abandoned
        } else {
            if self.blamed.len() < BLAMED_CLIENTS {
                self.blamed.insert(client);
            }
            Outcome::Failed
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
        self.blamed.clear();
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

    fn unusable(breaker: &mut Breaker, client: Client, n: u32, now: Instant) {
        for _ in 0..n {
            if let Some(generation) = breaker.allow(now) {
                breaker.report(generation, Outcome::Unusable(client), now);
            }
        }
    }

    fn ip(text: &str) -> Client {
        Client::of(Some(text.parse().unwrap()))
    }

    #[test]
    fn one_client_flooding_unusable_answers_never_opens_it() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(t0);
        unusable(&mut breaker, ip("203.0.113.7"), 1000, t0);
        assert_eq!(breaker.state(t0), State::Closed);
        // Nor from one IPv6 host rotating through its /64, nor from a mapped IPv4 address.
        for i in 0..100 {
            unusable(&mut breaker, ip(&format!("2001:db8:1:2::{i:x}")), 1, t0);
        }
        unusable(&mut breaker, ip("::ffff:203.0.113.7"), 10, t0);
        assert_eq!(breaker.state(t0), State::Closed);
        // Many clients getting unusable answers: the application is failing.
        for i in 0..MIN_CALLS {
            unusable(&mut breaker, ip(&format!("198.51.100.{i}")), 1, t0);
        }
        assert!(matches!(breaker.state(t0), State::Open { .. }));
    }

    #[test]
    fn a_flooding_client_cannot_keep_it_open_but_many_clients_can() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(t0);
        fail_calls(&mut breaker, MIN_CALLS, t0);
        let t1 = t0 + OPEN_FOR;
        unusable(&mut breaker, ip("203.0.113.7"), 50, t1);
        assert_eq!(breaker.state(t1), State::HalfOpen, "one client's unusable answers are no verdict");
        for _ in 0..TRIAL_CALLS {
            let trial = breaker.allow(t1).unwrap();
            breaker.report(trial, Outcome::Answered, t1);
        }
        assert_eq!(breaker.state(t1), State::Closed, "the others' trials close it");

        fail_calls(&mut breaker, MIN_CALLS, t1);
        let t2 = t1 + OPEN_FOR;
        for i in 0..TRIAL_CLIENTS {
            unusable(&mut breaker, ip(&format!("198.51.100.{i}")), 1, t2);
        }
        assert!(matches!(breaker.state(t2), State::Open { .. }), "several clients failing reopen it");
    }
}
