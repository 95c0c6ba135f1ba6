//! Questions to the stream leader about one subject, asked at the same moment, share one
//! answer: but only an answer to a question *sent after* each asker arrived.
//!
//! A read must see every write acknowledged before it began, wherever it was acknowledged,
//! so it asks the leader where the subject ends (`lookup::leader_last`). A thousand long-poll
//! readers re-polling one stream, or readers re-reading it in a loop, asked a thousand times
//! (about 0.45 ms of NATS servers' CPU each). Now the askers of one subject form rounds, as
//! writers form a group commit: up to [`RUNNING`] questions may be on their way (running
//! rounds, one asker each, so a few concurrent readers never wait for each other); beyond
//! that, newcomers gather in the next round; when the oldest running one is answered, the
//! first of them sends the next question, and all of them take its answer. Each asker's
//! answer was asked for after it arrived, so it is as fresh as one it would have asked for
//! alone; an asker waits for at most two questions.
//!
//! An asker whose request is dropped (its client left) while it leads a round releases the
//! others: each then asks alone.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

type Answer<T> = watch::Receiver<Option<T>>;

/// Questions about one subject on their way at once before newcomers gather (measured: one
/// at a time made 8 readers re-reading a stream wait for each other; 1000 long-poll readers
/// re-polling at once still ask about 5 times instead of 1000).
const RUNNING: usize = 4;

/// The rounds of every subject being asked about.
pub(super) struct Rounds<T> {
    subjects: Mutex<HashMap<String, Subject<T>>>,
}

struct Subject<T> {
    /// The questions on their way, oldest first.
    running: VecDeque<Answer<T>>,
    /// Who gathers for the next question, once the oldest running one is answered.
    next: Option<Answer<T>>,
}

impl<T> Default for Rounds<T> {
    fn default() -> Self {
        Rounds { subjects: Mutex::new(HashMap::new()) }
    }
}

enum Place<T> {
    /// Nobody is asking: ask now.
    Lead(watch::Sender<Option<T>>),
    /// A question is on its way: lead the next one once it is answered.
    LeadNext(watch::Sender<Option<T>>, Answer<T>),
    /// The next round has a leader: take its answer.
    Follow(Answer<T>),
}

impl<T: Clone> Rounds<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Subject<T>>> {
        self.subjects.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `ask`'s answer, or that of a round of `subject` whose question was sent after this call
    /// began.
    pub(super) async fn ask<F, Fut>(self: &Arc<Self>, subject: &str, ask: F) -> T
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let place = {
            let mut subjects = self.lock();
            let entry = subjects.entry(subject.to_string()).or_insert(Subject { running: VecDeque::new(), next: None });
            match (entry.running.front(), &entry.next) {
                (Some(oldest), None) if entry.running.len() >= RUNNING => {
                    let (answer, next) = watch::channel(None);
                    let oldest = oldest.clone();
                    entry.next = Some(next);
                    Place::LeadNext(answer, oldest)
                }
                (_, None) => {
                    let (answer, running) = watch::channel(None);
                    entry.running.push_back(running);
                    Place::Lead(answer)
                }
                (_, Some(next)) => Place::Follow(next.clone()),
            }
        };
        let answer = match place {
            Place::Follow(mut next) => {
                let answer = next.wait_for(Option::is_some).await.ok().and_then(|answer| answer.clone());
                // `None`: its leader left without asking; ask alone.
                return match answer {
                    Some(answer) => answer,
                    None => ask().await,
                };
            }
            Place::Lead(answer) => answer,
            Place::LeadNext(answer, mut running) => {
                // The guard keeps the entry right if this asker is dropped while it waits.
                let leader = Leader { rounds: self.clone(), subject, answer: Some(answer) };
                // Answered or abandoned, the oldest question is done with: the leader that
                // leaves it hands its running place to this round (`leave`).
                let _ = running.wait_for(Option::is_some).await;
                leader.take_running();
                return leader.finish(ask().await);
            }
        };
        let leader = Leader { rounds: self.clone(), subject, answer: Some(answer) };
        leader.finish(ask().await)
    }

    #[cfg(test)]
    fn subjects(&self) -> usize {
        self.lock().len()
    }
}

/// The asker leading a round: hands its place on when done or dropped.
struct Leader<'a, T> {
    rounds: Arc<Rounds<T>>,
    subject: &'a str,
    answer: Option<watch::Sender<Option<T>>>,
}

impl<T> Leader<'_, T> {
    fn is_ours(&self, round: Option<&Answer<T>>) -> bool {
        let Some(answer) = &self.answer else { return false };
        round.is_some_and(|r| r.same_channel(&answer.subscribe()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Subject<T>>> {
        self.rounds.subjects.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This round (the next one) becomes the running one, if the leader before did not make
    /// it so already; newcomers gather for another.
    fn take_running(&self) {
        let mut subjects = self.lock();
        if let Some(entry) = subjects.get_mut(self.subject) {
            if self.is_ours(entry.next.as_ref()) {
                entry.running.extend(entry.next.take());
            }
        }
    }

    fn finish(mut self, value: T) -> T
    where
        T: Clone,
    {
        self.leave();
        if let Some(answer) = self.answer.take() {
            answer.send_replace(Some(value.clone()));
        }
        value
    }

    /// Out of the entry: running, it hands its place to the next round (whose leader is about
    /// to ask); next, its followers are released. The entry goes when empty.
    fn leave(&self) {
        let mut subjects = self.lock();
        let Some(entry) = subjects.get_mut(self.subject) else { return };
        if let Some(i) = entry.running.iter().position(|r| self.is_ours(Some(r))) {
            entry.running.remove(i);
            if i == 0 {
                // The next round's leader waits for the oldest question.
                entry.running.extend(entry.next.take());
            }
        } else if self.is_ours(entry.next.as_ref()) {
            entry.next = None;
        }
        if entry.running.is_empty() && entry.next.is_none() {
            subjects.remove(self.subject);
        }
    }
}

impl<T> Drop for Leader<'_, T> {
    fn drop(&mut self) {
        if self.answer.is_some() {
            self.leave();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "current_thread")]
    async fn askers_during_a_question_share_the_next_and_none_takes_an_older_answer() {
        let rounds = Arc::new(Rounds::<usize>::default());
        let asked = Arc::new(AtomicUsize::new(0));
        let (release, gate) = watch::channel(0usize);
        let ask = |rounds: Arc<Rounds<usize>>, asked: Arc<AtomicUsize>, mut gate: watch::Receiver<usize>| async move {
            rounds
                .ask("s", || async move {
                    // The question's number, answered when the gate reaches it.
                    let n = asked.fetch_add(1, Ordering::SeqCst) + 1;
                    let _ = gate.wait_for(|g| *g >= n).await;
                    n
                })
                .await
        };
        let first: Vec<_> =
            (0..RUNNING).map(|_| tokio::spawn(ask(rounds.clone(), asked.clone(), gate.clone()))).collect();
        tokio::task::yield_now().await;
        assert_eq!(asked.load(Ordering::SeqCst), RUNNING, "a few askers at once each ask");
        // Three askers arrive while those are on their way: they share the next question.
        let later: Vec<_> = (0..3).map(|_| tokio::spawn(ask(rounds.clone(), asked.clone(), gate.clone()))).collect();
        tokio::task::yield_now().await;
        assert_eq!(asked.load(Ordering::SeqCst), RUNNING, "no more questions on their way");
        release.send_replace(RUNNING);
        for (i, asker) in first.into_iter().enumerate() {
            assert_eq!(asker.await.unwrap(), i + 1);
        }
        release.send_replace(RUNNING + 1);
        for asker in later {
            assert_eq!(asker.await.unwrap(), RUNNING + 1, "an answer asked for after the asker arrived");
        }
        assert_eq!(asked.load(Ordering::SeqCst), RUNNING + 1);
        assert_eq!(rounds.subjects(), 0, "nothing left once answered");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_leader_that_leaves_releases_its_followers() {
        let rounds = Arc::new(Rounds::<u32>::default());
        let slow: Vec<_> = (0..RUNNING)
            .map(|_| {
                let rounds = rounds.clone();
                tokio::spawn(async move { rounds.ask("s", std::future::pending::<u32>).await })
            })
            .collect();
        tokio::task::yield_now().await;
        let next_leader = {
            let rounds = rounds.clone();
            tokio::spawn(async move { rounds.ask("s", || async { 7 }).await })
        };
        tokio::task::yield_now().await;
        let follower = {
            let rounds = rounds.clone();
            tokio::spawn(async move { rounds.ask("s", || async { 9 }).await })
        };
        tokio::task::yield_now().await;
        // The next round's leader leaves while it waits: its follower asks alone.
        next_leader.abort();
        assert_eq!(tokio::time::timeout(Duration::from_secs(5), follower).await.unwrap().unwrap(), 9);
        // The running leaders leave: a newcomer is not stuck behind them.
        for asker in slow {
            asker.abort();
            let _ = asker.await;
        }
        let fresh = tokio::time::timeout(Duration::from_secs(5), rounds.ask("s", || async { 3 })).await;
        assert_eq!(fresh.unwrap(), 3);
        assert_eq!(rounds.subjects(), 0);
    }
}
