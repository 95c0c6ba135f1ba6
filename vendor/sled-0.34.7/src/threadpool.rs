//! A simple adaptive threadpool that returns a oneshot future.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use parking_lot::{Condvar, Mutex};

use crate::{
    debug_delay, warn, Acquire, AtomicUsize, Error, Lazy, OneShot, Result,
    SeqCst,
};

// This is lower for CI reasons.
#[cfg(windows)]
const MAX_THREADS: usize = 16;

#[cfg(not(windows))]
const MAX_THREADS: usize = 128;

const DESIRED_WAITING_THREADS: usize = 7;

static WAITING_THREAD_COUNT: AtomicUsize = AtomicUsize::new(0);
static TOTAL_THREAD_COUNT: AtomicUsize = AtomicUsize::new(0);
static SPAWNS: AtomicUsize = AtomicUsize::new(0);
static SPAWNING: AtomicBool = AtomicBool::new(false);

type Work = Box<dyn FnOnce() + Send + 'static>;

struct Queue {
    cv: Condvar,
    mu: Mutex<VecDeque<Work>>,
}

impl Queue {
    fn recv_timeout(&self, duration: Duration) -> Option<Work> {
        let mut queue = self.mu.lock();

        let cutoff = Instant::now() + duration;

        while queue.is_empty() {
            WAITING_THREAD_COUNT.fetch_add(1, SeqCst);
            let res = self.cv.wait_until(&mut queue, cutoff);
            WAITING_THREAD_COUNT.fetch_sub(1, SeqCst);
            if res.timed_out() {
                break;
            }
        }

        queue.pop_front()
    }

    fn try_recv(&self) -> Option<Work> {
        let mut queue = self.mu.lock();
        queue.pop_front()
    }

    fn send(&self, work: Work) -> usize {
        let mut queue = self.mu.lock();
        queue.push_back(work);

        let len = queue.len();

        // having held the mutex makes this linearized
        // with the notify below.
        drop(queue);

        // anycable-ds patch: wake one waiting thread per task. Upstream calls notify_all,
        // which wakes every idle I/O thread (7) for each log write; see docs/DECISIONS.md.
        self.cv.notify_one();

        len
    }
}

static QUEUE: Lazy<Queue, fn() -> Queue> = Lazy::new(init_queue);
static BROKEN: AtomicBool = AtomicBool::new(false);

fn init_queue() -> Queue {
    debug_delay();
    for _ in 0..DESIRED_WAITING_THREADS {
        debug_delay();
        if let Err(e) = spawn_new_thread(true) {
            log::error!("failed to initialize threadpool: {:?}", e);
        }
    }
    Queue { cv: Condvar::new(), mu: Mutex::new(VecDeque::new()) }
}

fn perform_work(is_immortal: bool) {
    let wait_limit = Duration::from_secs(1);

    let mut performed = 0;
    let mut contiguous_overshoots = 0;

    while is_immortal || performed < 5 || contiguous_overshoots < 3 {
        debug_delay();
        let task_res = QUEUE.recv_timeout(wait_limit);

        if let Some(task) = task_res {
            WAITING_THREAD_COUNT.fetch_sub(1, SeqCst);
            (task)();
            WAITING_THREAD_COUNT.fetch_add(1, SeqCst);
            performed += 1;
        }

        while let Some(task) = QUEUE.try_recv() {
            debug_delay();
            WAITING_THREAD_COUNT.fetch_sub(1, SeqCst);
            (task)();
            WAITING_THREAD_COUNT.fetch_add(1, SeqCst);
            performed += 1;
        }

        debug_delay();

        let waiting = WAITING_THREAD_COUNT.load(Acquire);

        if waiting > DESIRED_WAITING_THREADS {
            contiguous_overshoots += 1;
        } else {
            contiguous_overshoots = 0;
        }
    }
}

// Create up to MAX_THREADS dynamic blocking task worker threads.
// Dynamic threads will terminate themselves if they don't
// receive any work after one second.
fn maybe_spawn_new_thread() -> Result<()> {
    debug_delay();
    let total_workers = TOTAL_THREAD_COUNT.load(Acquire);
    debug_delay();
    let waiting_threads = WAITING_THREAD_COUNT.load(Acquire);

    if waiting_threads >= DESIRED_WAITING_THREADS
        || total_workers >= MAX_THREADS
    {
        return Ok(());
    }

    if !SPAWNING.compare_and_swap(false, true, SeqCst) {
        spawn_new_thread(false)?;
    }

    Ok(())
}

fn spawn_new_thread(is_immortal: bool) -> Result<()> {
    if BROKEN.load(Relaxed) {
        return Err(Error::ReportableBug(
            "IO thread unexpectedly panicked. please report \
            this bug on the sled github repo."
                .to_string(),
        ));
    }

    let spawn_id = SPAWNS.fetch_add(1, SeqCst);

    TOTAL_THREAD_COUNT.fetch_add(1, SeqCst);
    let spawn_res = thread::Builder::new()
        .name(format!("sled-io-{}", spawn_id))
        .spawn(move || {
            SPAWNING.store(false, SeqCst);
            debug_delay();
            let res = std::panic::catch_unwind(|| perform_work(is_immortal));
            TOTAL_THREAD_COUNT.fetch_sub(1, SeqCst);
            if is_immortal || res.is_err() {
                // IO thread panicked, shut down the system
                log::error!(
                    "IO thread unexpectedly terminated.
                    please report this error at the sled github repo. {:?}",
                    res
                );
                BROKEN.store(true, SeqCst);
            }
        });

    if let Err(e) = spawn_res {
        static E: AtomicBool = AtomicBool::new(false);

        SPAWNING.store(false, SeqCst);

        if !E.compare_and_swap(false, true, Relaxed) {
            // only execute this once
            warn!(
                "Failed to dynamically increase the threadpool size: {:?}.",
                e,
            )
        }
    }

    Ok(())
}

/// Spawn a function on the threadpool.
pub fn spawn<F, R>(work: F) -> Result<OneShot<R>>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static + Sized,
{
    let (promise_filler, promise) = OneShot::pair();
    let task = move || {
        let result = (work)();
        promise_filler.fill(result);
    };

    let depth = QUEUE.send(Box::new(task));

    if depth > DESIRED_WAITING_THREADS {
        maybe_spawn_new_thread()?;
    }

    Ok(promise)
}

// anycable-ds patch: file truncations run on a thread of their own, never on the pool above.
// The segment accountant waits for a queued truncation while it holds its own lock
// (`SegmentAccountant::bump_tip`), and every pool thread can be waiting for that lock
// (`IoBufs::sa_stabilize`); a truncation queued behind them never ran, and sled hung for good.
// This thread only shortens and syncs the file: it takes no lock of sled's, so it always gets
// to the truncation. See docs/DECISIONS.md.
type TruncationQueue = Mutex<Option<mpsc::Sender<Work>>>;

static TRUNCATIONS: Lazy<TruncationQueue, fn() -> TruncationQueue> =
    Lazy::new(start_truncation_thread);

fn start_truncation_thread() -> TruncationQueue {
    let (sender, receiver) = mpsc::channel::<Work>();
    let spawned = thread::Builder::new()
        .name("sled-truncate".to_string())
        .spawn(move || {
            // In order, one at a time; ends only if a task panics, and then the
            // tasks sent after it run in place (below).
            for task in receiver {
                (task)();
            }
        });
    match spawned {
        Ok(_) => Mutex::new(Some(sender)),
        Err(e) => {
            warn!("failed to spawn the file truncation thread: {:?}", e);
            Mutex::new(None)
        }
    }
}

/// Runs a file truncation on the truncation thread, or on this thread if there is none.
pub fn spawn_truncation<F, R>(work: F) -> Result<OneShot<R>>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static + Sized,
{
    let (promise_filler, promise) = OneShot::pair();
    let task: Work = Box::new(move || {
        let result = (work)();
        promise_filler.fill(result);
    });

    let unsent = match &*TRUNCATIONS.lock() {
        Some(sender) => sender.send(task).err().map(|mpsc::SendError(task)| task),
        None => Some(task),
    };
    if let Some(task) = unsent {
        (task)();
    }

    Ok(promise)
}

/// anycable-ds test hook (issue 23): the deadlock's cycle, forced with sled's real I/O pool.
/// This thread holds a lock (standing in for the segment accountant) and occupies every pool
/// thread with a task that waits for that lock (as `IoBufs::sa_stabilize` does), then queues a
/// file truncation, through the pool as 0.34.7 did (`through_pool`) or through
/// [`spawn_truncation`], and waits up to `wait` for it (as `bump_tip` does). Returns whether
/// the truncation ran. The lock is released at the end either way, so the pool drains and the
/// process goes on.
#[doc(hidden)]
pub fn truncation_cycle_for_tests(through_pool: bool, wait: Duration) -> bool {
    let accountant = std::sync::Arc::new(Mutex::new(()));
    let held = accountant.lock();
    let started = std::sync::Arc::new(AtomicUsize::new(0));
    // One blocker at a time until every pool thread runs one; the pool then spawns no new
    // thread for a queue as short as the truncation's (see DESIRED_WAITING_THREADS).
    let _ = &*QUEUE; // starts the pool's threads
    let mut submitted = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while started.load(SeqCst) < TOTAL_THREAD_COUNT.load(SeqCst)
        && Instant::now() < deadline
    {
        if started.load(SeqCst) == submitted {
            let (lock, count) = (accountant.clone(), started.clone());
            if spawn(move || {
                count.fetch_add(1, SeqCst);
                drop(lock.lock());
            })
            .is_err()
            {
                break;
            }
            submitted += 1;
        }
        thread::sleep(Duration::from_millis(1));
    }
    let truncation = if through_pool { spawn(|| ()) } else { spawn_truncation(|| ()) };
    let ran = match truncation {
        Ok(mut promise) => promise.wait_timeout(wait).is_ok(),
        Err(_) => false,
    };
    drop(held);
    ran
}
