//! Reads of the same range at the same moment share one trip to JetStream.
//!
//! A message broadcast to a stream with a thousand live readers on this node wakes all of
//! them at once, each at the same position and each told the same tail (`Hub::tail`): before
//! this, each made its own batched Direct Get (at most `READS_AT_ONCE` at a time), so the
//! last reader waited for a thousand NATS round trips queued in sixty-fours. Now the first
//! such read is the *pilot* of a flight keyed by what decides its answer (subject, position,
//! the sequence it must reach, its byte budget, whether it came from a token); reads with the
//! same key that arrive while the flight boards wait for the pilot's chunk instead.
//!
//! Why a passenger may take the pilot's answer:
//! - boarding closes as soon as the pilot's first fetch returns, so every passenger arrived
//!   before the pilot asked JetStream for anything it returned, and before the pilot checked
//!   the stream's state (expiry, closure): the answer is one a read made entirely within the
//!   passenger's own request could have returned;
//! - the key holds the sequence the read must reach: a write this node acknowledged before a
//!   passenger arrived moved the hub's tail, so that passenger has another key (read-your-
//!   writes is kept exactly as for a read alone);
//! - a pilot whose request is dropped (its client left) lands nothing: its passengers board
//!   again, one of them as the new pilot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::storage::{Chunk, ReadError};

/// What decides a read's answer: subject, position after, sequence it must reach, byte
/// budget, and whether the position came from a token.
pub(super) type Key = (String, u64, u64, usize, bool);

type Landing = Option<Arc<Result<Chunk, ReadError>>>;

#[derive(Default)]
pub(super) struct Flights {
    boarding: Mutex<HashMap<Key, watch::Receiver<Landing>>>,
}

pub(super) enum Boarding {
    /// Another read of the same key is on its way: wait for it.
    Passenger(watch::Receiver<Landing>),
    /// This read goes to JetStream; others may wait for it.
    Pilot(Pilot),
}

/// The read that goes to JetStream for a flight. Dropping it without landing releases its
/// passengers to board again.
pub(super) struct Pilot {
    flights: Arc<Flights>,
    key: Key,
    landing: watch::Sender<Landing>,
    open: bool,
}

impl Flights {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, watch::Receiver<Landing>>> {
        self.boarding.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Joins the flight boarding for `key`, or opens one.
    pub(super) fn board(self: &Arc<Self>, key: Key) -> Boarding {
        let mut boarding = self.lock();
        if let Some(flight) = boarding.get(&key) {
            // (A pilot dropped without closing is removed by its drop; a closed sender here
            // would be a bug, and the passenger would only board again.)
            return Boarding::Passenger(flight.clone());
        }
        let (landing, flight) = watch::channel(None);
        boarding.insert(key.clone(), flight);
        Boarding::Pilot(Pilot { flights: self.clone(), key, landing, open: true })
    }

    #[cfg(test)]
    fn boarding(&self) -> usize {
        self.lock().len()
    }
}

impl Boarding {
    /// A passenger's answer; `None` when the pilot was dropped before it landed.
    pub(super) async fn wait(mut flight: watch::Receiver<Landing>) -> Option<Result<Chunk, ReadError>> {
        let landed = flight.wait_for(Option::is_some).await.ok()?;
        let landed = landed.as_ref()?;
        Some(landed.as_ref().clone())
    }
}

impl Pilot {
    /// No more passengers: what the pilot does from here may depend on when it is done.
    pub(super) fn close(&mut self) {
        if std::mem::take(&mut self.open) {
            let mut boarding = self.flights.lock();
            if boarding.get(&self.key).is_some_and(|f| f.same_channel(&self.landing.subscribe())) {
                boarding.remove(&self.key);
            }
        }
    }

    /// Hands the answer to every passenger.
    pub(super) fn land(mut self, result: &Result<Chunk, ReadError>) {
        self.close();
        self.landing.send_replace(Some(Arc::new(result.clone())));
    }
}

impl Drop for Pilot {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offset::{Epoch, Position};

    fn key(after: u64) -> Key {
        ("S.s.a".into(), after, 10, 1024, true)
    }

    fn chunk() -> Chunk {
        let at = Position { epoch: Epoch::random(), seq: 3 };
        Chunk { body: "[1]".into(), count: 1, start: at, next: at, up_to_date: true, meta: None }
    }

    #[tokio::test]
    async fn passengers_get_the_pilots_answer_and_boarding_closes() {
        let flights = Arc::new(Flights::default());
        let Boarding::Pilot(pilot) = flights.board(key(1)) else { panic!("first read is the pilot") };
        let Boarding::Passenger(flight) = flights.board(key(1)) else { panic!("same key boards") };
        // Another key is another flight.
        assert!(matches!(flights.board(key(2)), Boarding::Pilot(_)));
        let waiting = tokio::spawn(Boarding::wait(flight));
        let answer = chunk();
        pilot.land(&Ok(answer.clone()));
        assert_eq!(waiting.await.unwrap().unwrap().unwrap(), answer);
        assert_eq!(flights.boarding(), 0, "a landed flight takes no one");
        assert!(matches!(flights.board(key(1)), Boarding::Pilot(_)));
    }

    #[tokio::test]
    async fn a_closed_flight_takes_no_passengers_and_a_dropped_pilot_releases_them() {
        let flights = Arc::new(Flights::default());
        let Boarding::Pilot(mut pilot) = flights.board(key(1)) else { panic!() };
        let Boarding::Passenger(early) = flights.board(key(1)) else { panic!() };
        pilot.close();
        let Boarding::Pilot(second) = flights.board(key(1)) else { panic!("boarding closed") };
        drop(pilot);
        assert!(Boarding::wait(early).await.is_none(), "the pilot left without an answer");
        // The second flight was not closed by the first pilot's drop.
        assert!(matches!(flights.board(key(1)), Boarding::Passenger(_)));
        drop(second);
        assert_eq!(flights.boarding(), 0);
    }
}
