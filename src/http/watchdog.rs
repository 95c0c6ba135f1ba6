//! Closing connections whose client stopped reading.
//!
//! actix-web only polls a response body while the connection's write buffer has room, so a
//! client that stops reading stops the polling: a deadline checked inside the body (the SSE
//! TTL) never fires, and nothing else in actix notices (PITFALLS.md). This module watches such
//! responses from outside, on its own thread:
//!
//! * every response that may outlive its handler (SSE, and catch-up or long-poll bodies larger
//!   than what the kernel takes at once) registers its connection's socket here;
//! * once a second the thread reads the socket's unsent byte count (`SIOCOUTQ`); a socket that
//!   has unsent bytes and has not taken any for `server.write_timeout` seconds is stalled;
//! * an SSE response still alive past its TTL (plus a grace period) is overdue;
//! * either way the thread shuts the socket down (`shutdown(2)`): actix's next write fails, it
//!   drops the connection and, with it, the response and everything the response held.
//!
//! A socket is named by its file descriptor *and* the inode of the socket behind it (checked
//! with `fstat` right before every use), so a descriptor number that was closed and reused by
//! another connection is never mistaken for the watched one.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How often the thread looks at the watched sockets.
const TICK: Duration = Duration::from_millis(500);
/// How long past its deadline an SSE response may still be finishing its last write.
const DEADLINE_GRACE: Duration = Duration::from_secs(2);

/// The socket of one connection, recorded when it is accepted (`HttpServer::on_connect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnSocket {
    fd: RawFd,
    inode: u64,
}

impl ConnSocket {
    pub fn of(stream: &impl AsRawFd) -> Option<ConnSocket> {
        let fd = stream.as_raw_fd();
        Some(ConnSocket { fd, inode: inode(fd)? })
    }

    /// Whether the descriptor still refers to this connection's socket.
    fn is_current(&self) -> bool {
        inode(self.fd) == Some(self.inode)
    }

    /// Bytes written to the socket and not yet acknowledged by the peer.
    fn unsent(&self) -> Option<u64> {
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int.
        let ok = unsafe { libc::ioctl(self.fd, libc::TIOCOUTQ, &mut queued) } == 0;
        ok.then_some(queued.max(0) as u64)
    }

    /// Ends the connection: a zero linger makes its close a reset that drops the bytes still
    /// queued for the client (otherwise the kernel keeps them, and the socket, until a client
    /// that does not read takes them), and the shutdown makes actix's next write fail.
    fn shut_down(&self) {
        if self.is_current() {
            let linger = libc::linger { l_onoff: 1, l_linger: 0 };
            // SAFETY: setsockopt reads the struct it is given; shutdown takes a descriptor we
            // just checked and closes nothing.
            unsafe {
                libc::setsockopt(
                    self.fd,
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                );
                libc::shutdown(self.fd, libc::SHUT_RDWR);
            }
        }
    }
}

fn inode(fd: RawFd) -> Option<u64> {
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat fills the struct it is given, or fails.
    if unsafe { libc::fstat(fd, stat.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: fstat succeeded.
    Some(unsafe { stat.assume_init() }.st_ino)
}

/// Held by a watched response body; dropping it says the body is finished (what is left is
/// in actix's and the kernel's buffers).
pub struct WatchGuard(Arc<WatchState>);

#[derive(Default)]
struct WatchState {
    finished: AtomicBool,
    /// The body handed actix a piece and has not been polled since: actix may be stuck on a
    /// full socket. A body waiting for data (an idle SSE stream) is not, and costs the
    /// watchdog no system call.
    yielded: AtomicBool,
}

impl WatchGuard {
    /// The body is handing actix a piece.
    pub fn yielded(&self) {
        self.0.yielded.store(true, Ordering::Relaxed);
    }

    /// actix polls the body again: what it was given so far is in its buffer or the socket.
    pub fn polled(&self) {
        self.0.yielded.store(false, Ordering::Relaxed);
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.finished.store(true, Ordering::Release);
    }
}

struct Watched {
    socket: ConnSocket,
    state: Arc<WatchState>,
    /// The body must have finished by then (SSE TTL + grace).
    deadline: Option<Instant>,
    last_unsent: u64,
    last_progress: Instant,
    kind: &'static str,
}

struct Watchdog {
    write_timeout: Duration,
    watched: Mutex<Vec<Watched>>,
}

static WATCHDOG: OnceLock<Watchdog> = OnceLock::new();

/// Starts the watchdog thread (once per process; later calls keep the first timeout).
pub fn start(write_timeout: Duration) {
    let mut started = false;
    WATCHDOG.get_or_init(|| {
        started = true;
        Watchdog { write_timeout, watched: Mutex::new(Vec::new()) }
    });
    if started {
        std::thread::Builder::new()
            .name("ds-watchdog".into())
            .spawn(|| loop {
                std::thread::sleep(TICK);
                if let Some(watchdog) = WATCHDOG.get() {
                    watchdog.tick(Instant::now());
                }
            })
            .expect("spawn watchdog thread");
    }
}

/// Watches the connection of a response until it is delivered. `kind` labels the metric;
/// `deadline` is when the body must have ended. `None` when there is nothing to watch (no
/// socket known, or the watchdog is not running).
pub fn watch(socket: Option<ConnSocket>, kind: &'static str, deadline: Option<Instant>) -> Option<WatchGuard> {
    let watchdog = WATCHDOG.get()?;
    let state = Arc::new(WatchState::default());
    let entry = Watched {
        socket: socket?,
        state: state.clone(),
        deadline,
        last_unsent: 0,
        last_progress: Instant::now(),
        kind,
    };
    watchdog.watched.lock().expect("watchdog lock").push(entry);
    Some(WatchGuard(state))
}

impl Watchdog {
    fn tick(&self, now: Instant) {
        let mut watched = self.watched.lock().expect("watchdog lock");
        watched.retain_mut(|w| {
            let finished = w.state.finished.load(Ordering::Acquire);
            let overdue = !finished && w.deadline.is_some_and(|d| now > d + DEADLINE_GRACE);
            if !finished && !overdue && !w.state.yielded.load(Ordering::Relaxed) {
                // Waiting for data, not for the client: nothing to look at.
                w.last_progress = now;
                return true;
            }
            if !w.socket.is_current() {
                return false; // the connection is gone
            }
            let unsent = w.socket.unsent().unwrap_or(0);
            if unsent == 0 || unsent != w.last_unsent {
                w.last_progress = now;
            }
            w.last_unsent = unsent;
            if unsent == 0 && finished {
                return false; // delivered
            }
            let stalled = now.duration_since(w.last_progress) > self.write_timeout;
            if overdue || stalled {
                let reason = if overdue { "deadline" } else { "stalled" };
                log::debug!("closing a {} connection whose client stopped reading ({reason})", w.kind);
                crate::metrics::get().stalled_disconnects.with_label_values(&[reason]).inc();
                w.socket.shut_down();
                return false;
            }
            true
        });
    }
}
