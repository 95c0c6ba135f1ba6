//! A node-side cache of stored messages, so repeated reads of a range (many clients catching
//! up on one stream, a fork's source read by every fork) cost one look-up at the leader and
//! memory, instead of a batched Direct Get per thousand messages each.
//!
//! What it holds, per subject: one *segment*, the subject's messages with sequences in
//! `(after, last]`, complete: every message of the subject stored in that interval is in it.
//! A Direct Get answer is complete in that sense (a replica holds a prefix of the log), so
//! answers that start inside or at the end of a segment extend it.
//!
//! Only messages of streams made by `PUT` are kept: AnyCable's retention (count and age)
//! never deletes them, so a kept message stays what the log holds until the stream is
//! removed. Removal is a `delete` control message, then a purge of what precedes it; so:
//! - the wake-up feed drops the subject's segment when it carries a `delete`, and bumps the
//!   cache's generation, so a read that fetched before the drop does not put back what it
//!   got (`Token`);
//! - a read uses the cache only once the wake-up feed has passed the sequence that read must
//!   reach (`woken_through >= must`): a `delete` up to there was seen;
//! - a segment not checked for a second is checked before use: its first message must still
//!   be stored (one Direct Get of one message). That bounds what a lost wake-up (a leader
//!   change, a slow consumer) could leave behind to the purge's delay plus a second;
//! - a reconnect or a slow-consumer event (wake-ups lost) clears everything.
//!
//! The budget is `storage.read_cache_bytes`, as on the embedded engine; a segment holds at
//! most a quarter of it (its oldest messages go first), and whole segments are evicted least
//! recently used first (approximately: a second-chance queue, see `State::order`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::direct::{Batch, Item};
use super::state::{Control, Marks};
use crate::meta::{SharedMeta, StreamMeta};
use crate::storage::{now_ms, Chunk};

/// How long a segment is used before its first message is checked to be still stored.
const VERIFY_EVERY_MS: u64 = 1000;
/// Memory an item takes besides its payload: the `Item` in the segment's vector (about 200
/// bytes) and the payload's allocation header.
const ITEM_OVERHEAD: usize = 256;
/// Chunks framed from one segment's messages kept at once (reads from `-1`, from the middle,
/// with another chunk limit...).
const FRAMED_PER_SEGMENT: usize = 4;

pub(super) struct ItemCache {
    budget: usize,
    /// Bumped whenever anything is dropped for being possibly stale.
    generation: AtomicU64,
    /// The highest sequence the wake-up feed has handed over (and invalidated for).
    woken_through: AtomicU64,
    state: Mutex<State>,
    /// Per subject with a run: whose turn it is to fetch what the run lacks (`turn`).
    turns: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

#[derive(Default)]
struct State {
    segments: HashMap<String, Segment>,
    /// Subjects in the order their runs were made (or last given a second chance), with the
    /// clock then: eviction takes the front unless the run was used since (then it goes to
    /// the back), so it costs O(1) amortized, not a scan of every run. Entries of runs gone
    /// are skipped, and dropped when they outnumber the runs.
    order: VecDeque<(String, u64)>,
    bytes: usize,
    clock: u64,
}

struct Segment {
    after: u64,
    last: u64,
    items: Vec<Item>,
    bytes: usize,
    used: u64,
    verified_ms: u64,
    /// Chunks framed from its messages, by position read after, chunk limit, and whether
    /// that position was a token (`Key`); dropped when the segment grows.
    framed: Vec<(Key, Framed)>,
}

impl Segment {
    /// Due for a check that its first message is still stored (see the module docs).
    fn due(&self) -> bool {
        now_ms().saturating_sub(self.verified_ms) >= VERIFY_EVERY_MS
    }
}

/// What a framed chunk answers: a read after this position (a token's, or the start) with
/// this chunk limit (a read from a token is checked for gaps, one from the start is not).
pub(super) type Key = (u64, usize, bool);

/// A chunk framed from cached messages only: handed out again as it is, its stream's state
/// (existence, expiry) checked anew each time from the message it was read from.
#[derive(Clone)]
pub(super) struct Framed {
    pub(super) body: Bytes,
    pub(super) count: usize,
    pub(super) next: u64,
    /// It took every message the read had (else it was cut at the chunk limit).
    pub(super) complete: bool,
    /// The last message it took.
    pub(super) last: u64,
    /// A cut chunk's metadata as its last message left it.
    pub(super) cut_meta: Option<SharedMeta>,
    /// The message the stream's state is read from.
    pub(super) state_seq: u64,
    pub(super) state_marks: Marks,
}

/// What a read saw of the cache before it asked JetStream: what it fetched may be put back
/// only if nothing was invalidated meanwhile.
#[derive(Clone, Copy)]
pub(super) struct Token(u64);

/// Cached messages after a position.
pub(super) struct Hit {
    pub(super) items: Vec<Item>,
    /// The items reach the segment's end (`last`): anything newer must be asked for.
    pub(super) to_end: bool,
    pub(super) last: u64,
    /// The segment's first message, when it is due to be checked.
    pub(super) verify: Option<u64>,
}

fn cost(item: &Item) -> usize {
    item.payload.len() + ITEM_OVERHEAD
}

impl ItemCache {
    pub(super) fn new(budget: usize) -> ItemCache {
        ItemCache {
            budget,
            generation: AtomicU64::new(0),
            woken_through: AtomicU64::new(0),
            state: Mutex::default(),
            turns: Mutex::default(),
        }
    }

    /// Whether `subject` has a run (its stream is one the cache keeps).
    pub(super) fn has_run(&self, subject: &str) -> bool {
        self.lock().segments.contains_key(subject)
    }

    /// Waits for the turn to fetch what `subject`'s run lacks: many readers arriving at once
    /// at a range not cached yet cost one fetch (the others find it cached), as on the
    /// embedded engine. Only for subjects with a run, so streams the cache does not keep are
    /// never read one reader at a time.
    pub(super) async fn turn(&self, subject: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut turns = self.turns.lock().unwrap_or_else(|p| p.into_inner());
            if turns.len() >= 1024 {
                turns.retain(|_, lock| Arc::strong_count(lock) > 1);
            }
            turns.entry(subject.to_string()).or_default().clone()
        };
        lock.lock_owned().await
    }

    pub(super) fn token(&self) -> Token {
        Token(self.generation.load(Ordering::Acquire))
    }

    /// The wake-up feed handed over the message at `seq`; a `delete` drops its subject.
    pub(super) fn woken(&self, subject: &str, seq: u64, control: Option<Control>) {
        if control == Some(Control::Delete) {
            self.drop_subject(subject);
        }
        self.woken_through.fetch_max(seq, Ordering::AcqRel);
    }

    /// Every message up to `seq` was stored before the wake-up feed was subscribed (at start):
    /// the cache, empty then, may serve reads up to there.
    pub(super) fn caught_up(&self, seq: u64) {
        self.woken_through.fetch_max(seq, Ordering::AcqRel);
    }

    pub(super) fn drop_subject(&self, subject: &str) {
        let mut state = self.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let Some(segment) = state.segments.remove(subject) {
            state.bytes -= segment.bytes;
        }
    }

    /// Everything goes (wake-ups may have been lost).
    pub(super) fn clear(&self) {
        let mut state = self.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        state.segments = HashMap::new();
        state.order = VecDeque::new();
        state.bytes = 0;
    }

    /// What `answer` makes of `subject`'s run, if the cache may serve a read that must reach
    /// `must`; a run that answers counts as used.
    fn with_run<T>(&self, subject: &str, must: u64, answer: impl FnOnce(&Segment) -> Option<T>) -> Option<T> {
        if self.budget == 0 || self.woken_through.load(Ordering::Acquire) < must {
            return None;
        }
        let mut state = self.lock();
        state.clock += 1;
        let clock = state.clock;
        let segment = state.segments.get_mut(subject)?;
        let answer = answer(segment)?;
        segment.used = clock;
        Some(answer)
    }

    /// The cached messages of `subject` after `after`, about `budget` bytes of payload (at
    /// least one), if the cache covers `after` and may be used for a read that must reach
    /// `must`.
    pub(super) fn get(&self, subject: &str, after: u64, budget: usize, must: u64) -> Option<Hit> {
        self.with_run(subject, must, |segment| {
            if after < segment.after || after > segment.last {
                return None;
            }
            let verify = segment.due().then(|| segment.items.first().map(|i| i.seq)).flatten();
            let start = segment.items.partition_point(|i| i.seq <= after);
            let mut items = Vec::new();
            let mut bytes = 0;
            for item in &segment.items[start..] {
                if !items.is_empty() && bytes + item.payload.len() > budget {
                    break;
                }
                bytes += item.payload.len();
                items.push(item.clone());
            }
            let to_end = start + items.len() == segment.items.len();
            Some(Hit { items, to_end, last: segment.last, verify })
        })
    }

    /// A chunk framed before for a read as `key` says, if it is still what
    /// such a read answers: the segment did not grow since, and (if the chunk reached its
    /// end) it reaches `must`. Never while the segment is due for a check (the read that
    /// checks it goes the long way).
    pub(super) fn framed(&self, subject: &str, key: Key, must: u64) -> Option<Framed> {
        self.with_run(subject, must, |segment| {
            if segment.due() {
                return None;
            }
            let (_, framed) = segment.framed.iter().find(|(k, _)| *k == key)?;
            (!framed.complete || framed.last >= must).then(|| framed.clone())
        })
    }

    /// Keeps `chunk`, framed from `batch` (all from this cache) for a read as `key` says.
    pub(super) fn keep_framed(&self, subject: &str, token: Token, key: Key, batch: &Batch, chunk: &Chunk) {
        let Some(state_item) = batch.messages.last() else { return };
        // What the framing took: every message up to the one after its `count`th.
        let mut seen = 0;
        let taken = batch
            .messages
            .iter()
            .position(|m| {
                seen += usize::from(m.marks.is_message());
                m.marks.is_message() && seen > chunk.count
            })
            .unwrap_or(batch.messages.len());
        let Some(last) = batch.messages[..taken].last().map(|m| m.seq) else { return };
        let complete = taken == batch.messages.len() && batch.pending == 0;
        let framed = Framed {
            body: chunk.body.clone(),
            count: chunk.count,
            next: chunk.next.seq,
            complete,
            last,
            cut_meta: if complete { None } else { chunk.meta.clone() },
            state_seq: state_item.seq,
            state_marks: state_item.marks.clone(),
        };
        let size = framed.body.len() + ITEM_OVERHEAD;
        let mut state = self.lock();
        if self.budget == 0 || size > self.budget / 4 || self.generation.load(Ordering::Acquire) != token.0 {
            return;
        }
        let State { segments, bytes, .. } = &mut *state;
        let Some(segment) = segments.get_mut(subject) else { return };
        if key.0 < segment.after || state_item.seq > segment.last {
            return;
        }
        if let Some(i) = segment.framed.iter().position(|(k, _)| *k == key) {
            let (_, old) = segment.framed.remove(i);
            segment.bytes -= old.body.len() + ITEM_OVERHEAD;
            *bytes -= old.body.len() + ITEM_OVERHEAD;
        }
        if segment.framed.len() == FRAMED_PER_SEGMENT {
            let (_, old) = segment.framed.remove(0);
            segment.bytes -= old.body.len() + ITEM_OVERHEAD;
            *bytes -= old.body.len() + ITEM_OVERHEAD;
        }
        segment.framed.push((key, framed));
        segment.bytes += size;
        *bytes += size;
        self.evict(&mut state);
    }

    /// The segment's first message was found still stored.
    pub(super) fn verified(&self, subject: &str, first: u64) {
        let mut state = self.lock();
        if let Some(segment) = state.segments.get_mut(subject) {
            if segment.items.first().map(|i| i.seq) == Some(first) {
                segment.verified_ms = now_ms();
            }
        }
    }

    /// Keeps what a Direct Get after `after` answered, if it may be kept (see the module docs).
    pub(super) fn put(&self, subject: &str, token: Token, after: u64, batch: &Batch) {
        if self.budget == 0 || batch.messages.is_empty() || !cacheable(&batch.messages) {
            return;
        }
        let mut state = self.lock();
        if self.generation.load(Ordering::Acquire) != token.0 {
            return;
        }
        state.clock += 1;
        let clock = state.clock;
        let last = batch.messages.last().map_or(after, |i| i.seq);
        {
            let State { segments, bytes, order, .. } = &mut *state;
            let segment = match segments.get_mut(subject) {
                // The answer starts inside the segment or at its end: it extends it.
                Some(segment) if segment.after <= after && after <= segment.last => segment,
                _ => {
                    if let Some(old) = segments.remove(subject) {
                        *bytes -= old.bytes;
                    }
                    let fresh = Segment {
                        after,
                        last: after,
                        items: Vec::new(),
                        bytes: 0,
                        used: clock,
                        verified_ms: now_ms(),
                        framed: Vec::new(),
                    };
                    order.push_back((subject.to_string(), clock));
                    segments.entry(subject.to_string()).or_insert(fresh)
                }
            };
            if last <= segment.last {
                return;
            }
            // Chunks framed before may now stop short of what a read gets.
            for (_, old) in segment.framed.drain(..) {
                segment.bytes -= old.body.len() + ITEM_OVERHEAD;
                *bytes -= old.body.len() + ITEM_OVERHEAD;
            }
            for item in batch.messages.iter().filter(|i| i.seq > segment.last) {
                let mut item = item.clone();
                // Messages of a stream mostly carry the same metadata: keep it once.
                if let (Some(previous), Some(meta)) =
                    (segment.items.last().and_then(|p| p.marks.meta.as_ref()), &item.marks.meta)
                {
                    if previous == meta {
                        item.marks.meta = Some(previous.clone());
                    }
                }
                segment.bytes += cost(&item);
                *bytes += cost(&item);
                segment.items.push(item);
            }
            segment.last = last;
            segment.used = clock;
            // A quarter of the budget at most per subject: the oldest messages go.
            let cap = self.budget / 4;
            if segment.bytes > cap {
                let mut drop = 0;
                let mut freed = 0;
                while segment.bytes - freed > cap && drop < segment.items.len() {
                    freed += cost(&segment.items[drop]);
                    drop += 1;
                }
                segment.after = segment.items[drop - 1].seq;
                segment.items.drain(..drop);
                segment.bytes -= freed;
                *bytes -= freed;
                segment.verified_ms = 0; // its first message changed
            }
        }
        self.evict(&mut state);
    }

    /// Least recently used segments go while over budget (second chance, see `State::order`).
    fn evict(&self, state: &mut State) {
        while state.bytes > self.budget {
            let Some((oldest, queued)) = state.order.pop_front() else { break };
            let Some(segment) = state.segments.get(&oldest) else { continue };
            if segment.used > queued {
                let used = segment.used;
                state.order.push_back((oldest, used));
                continue;
            }
            if let Some(segment) = state.segments.remove(&oldest) {
                state.bytes -= segment.bytes;
            }
        }
        if state.order.len() > 2 * state.segments.len() + 1024 {
            let State { segments, order, .. } = state;
            let mut kept = std::collections::HashSet::new();
            order.retain(|(subject, _)| segments.contains_key(subject) && kept.insert(subject.clone()));
        }
        if state.segments.capacity() > 4 * state.segments.len().max(1024) {
            state.segments.shrink_to_fit();
            state.order.shrink_to_fit();
        }
    }

    pub(super) fn bytes(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether every message is of a stream made by `PUT` (which retention never trims) and none
/// removes it.
fn cacheable(items: &[Item]) -> bool {
    let mut checked: Option<&Arc<str>> = None;
    items.iter().all(|item| {
        if item.marks.control == Some(Control::Delete) {
            return false;
        }
        let Some(meta) = &item.marks.meta else { return false };
        if checked.is_some_and(|c| c == meta) {
            return true;
        }
        let made_by_put = StreamMeta::decode(meta.as_bytes()).is_some_and(|m| m.created);
        checked = Some(meta);
        made_by_put
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::state::Marks;

    const PUT_META: &str = r#"{"ct":"application/json","put":true}"#;

    fn item(seq: u64, meta: Option<&str>, control: Option<Control>) -> Item {
        Item {
            seq,
            prev: None,
            prev_back: None,
            pending: 0,
            marks: Marks { control, meta: meta.map(Arc::from), ..Marks::default() },
            payload: bytes::Bytes::from(vec![b'x'; 100]),
        }
    }

    fn batch(seqs: &[u64]) -> Batch {
        Batch { messages: seqs.iter().map(|&s| item(s, Some(PUT_META), None)).collect(), pending: 0, from_cache: false }
    }

    #[test]
    fn answers_extend_a_segment_and_any_position_inside_it_is_served() {
        let cache = ItemCache::new(1 << 20);
        cache.woken("s", 100, None);
        cache.put("s", cache.token(), 0, &batch(&[3, 7, 9]));
        cache.put("s", cache.token(), 9, &batch(&[12, 20]));
        let hit = cache.get("s", 5, usize::MAX, 20).expect("covered");
        assert_eq!(hit.items.iter().map(|i| i.seq).collect::<Vec<_>>(), vec![7, 9, 12, 20]);
        assert!(hit.to_end && hit.last == 20);
        let cut = cache.get("s", 0, 150, 20).expect("covered");
        assert_eq!(cut.items.len(), 1, "the byte budget cuts (at least one)");
        assert!(!cut.to_end);
        assert!(cache.get("s", 21, usize::MAX, 20).is_none(), "after the segment");
        assert!(cache.get("s", 5, usize::MAX, 101).is_none(), "wake-ups not there yet");
    }

    #[test]
    fn a_delete_drops_the_subject_and_a_read_from_before_cannot_put_back() {
        let cache = ItemCache::new(1 << 20);
        let early = cache.token();
        cache.woken("s", 10, Some(Control::Delete));
        cache.put("s", early, 0, &batch(&[3, 7]));
        assert!(cache.get("s", 0, usize::MAX, 0).is_none());
        cache.put("s", cache.token(), 0, &batch(&[3, 7]));
        assert!(cache.get("s", 0, usize::MAX, 0).is_some());
        cache.woken("s", 11, Some(Control::Delete));
        assert!(cache.get("s", 0, usize::MAX, 0).is_none());
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn only_streams_made_by_put_and_no_removal_are_kept() {
        let cache = ItemCache::new(1 << 20);
        let broadcast = Batch { messages: vec![item(1, None, None)], pending: 0, from_cache: false };
        cache.put("b", cache.token(), 0, &broadcast);
        let implicit = Batch {
            messages: vec![item(1, Some(r#"{"ct":"application/json","put":false}"#), None)],
            pending: 0,
            from_cache: false,
        };
        cache.put("i", cache.token(), 0, &implicit);
        let removed = Batch {
            messages: vec![item(1, Some(PUT_META), None), item(2, None, Some(Control::Delete))],
            pending: 0,
            from_cache: false,
        };
        cache.put("r", cache.token(), 0, &removed);
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn the_budget_holds_per_segment_and_overall() {
        let cache = ItemCache::new(40 * (100 + ITEM_OVERHEAD));
        let seqs: Vec<u64> = (1..=30).collect();
        cache.put("a", cache.token(), 0, &batch(&seqs));
        let hit = cache.get("a", 0, usize::MAX, 0);
        assert!(hit.is_none(), "the oldest went: position 0 is no longer covered");
        let hit = cache.get("a", 20, usize::MAX, 0).expect("the newest stay");
        assert_eq!(hit.items.len(), 10, "a quarter of the budget per subject");
        cache.put("b", cache.token(), 0, &batch(&seqs[..10]));
        cache.put("c", cache.token(), 0, &batch(&seqs[..10]));
        assert!(cache.get("a", 20, usize::MAX, 0).is_some());
        cache.put("d", cache.token(), 0, &batch(&seqs[..10]));
        assert_eq!(cache.bytes(), 40 * (100 + ITEM_OVERHEAD), "full, not over");
        cache.put("e", cache.token(), 0, &batch(&seqs[..10]));
        assert_eq!(cache.bytes(), 40 * (100 + ITEM_OVERHEAD));
        assert!(cache.get("b", 0, usize::MAX, 0).is_none(), "the run not used since it was made went");
        assert!(cache.get("a", 20, usize::MAX, 0).is_some(), "the oldest run, used since, stays");
        for i in 0..10_000 {
            cache.put(&format!("many-{i}"), cache.token(), 0, &batch(&seqs[..1]));
            cache.drop_subject(&format!("many-{}", i / 2));
        }
        assert!(cache.bytes() <= 40 * (100 + ITEM_OVERHEAD));
        let state = cache.lock();
        assert!(state.order.len() <= 2 * state.segments.len() + 1024, "the order queue stays bounded");
    }

    #[test]
    fn a_framed_chunk_is_handed_out_until_the_segment_grows_and_only_for_its_own_key() {
        let cache = ItemCache::new(1 << 20);
        cache.woken("s", 100, None);
        let first = batch(&[3, 7]);
        cache.put("s", cache.token(), 0, &first);
        let position = crate::offset::Position { epoch: crate::offset::Epoch::parse(b"abcdefghij").unwrap(), seq: 0 };
        let chunk = Chunk {
            body: Bytes::from_static(b"[x,x]"),
            count: 2,
            start: position,
            next: crate::offset::Position { seq: 7, ..position },
            up_to_date: true,
            meta: None,
        };
        cache.keep_framed("s", cache.token(), (0, 4096, false), &first, &chunk);
        let framed = cache.framed("s", (0, 4096, false), 7).expect("kept");
        assert!(framed.complete && framed.last == 7 && framed.next == 7 && framed.count == 2);
        assert!(cache.framed("s", (0, 4096, true), 7).is_none(), "a token read is checked for gaps");
        assert!(cache.framed("s", (0, 1024, false), 7).is_none(), "another chunk limit");
        assert!(cache.framed("s", (0, 4096, false), 9).is_none(), "it stops short of what must be read");
        cache.put("s", cache.token(), 7, &batch(&[9]));
        assert!(cache.framed("s", (0, 4096, false), 7).is_none(), "the segment grew");
        let stale = cache.token();
        cache.woken("s", 101, Some(Control::Delete));
        cache.keep_framed("s", stale, (0, 4096, false), &first, &chunk);
        assert_eq!(cache.bytes(), 0);
    }
}
