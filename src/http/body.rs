//! Response bodies that hold little memory for a client that reads slowly or not at all.
//!
//! actix copies each piece a body yields into the connection's write buffer and keeps polling
//! while that buffer is under 32 KiB; only large chunks of sized bodies are written from their
//! own buffer (our actix-http patch). A 4 MiB SSE frame yielded at once would be copied whole
//! into every connection that sends it, and stay there until the client reads it. So SSE
//! frames yield slices of at most [`PIECE`] bytes of a shared buffer (the chunk cache's), and
//! sized bodies hand actix the shared buffer itself ([`SharedBody`]): a connection holds
//! actix's buffer, a reference, and the kernel's socket buffer; nothing more.
//!
//! What the references keep alive is bounded in total by [`Unsent`] (`ds.max_unsent_bytes`):
//! a buffer counts once however many responses share it (the usual case: many readers of the
//! same range), from the moment a response takes it until the last one lets it go. A client
//! that stops reading is closed by the [`watchdog`](super::watchdog), which ends its share.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Mutex, OnceLock};
use std::task::{Context, Poll};

use actix_web::body::{BodySize, MessageBody};
use bytes::Bytes;

use super::watchdog::WatchGuard;

/// Largest slice handed to actix at once (bigger slices cost fewer, larger socket writes;
/// smaller ones less memory per stalled connection).
pub const PIECE: usize = 64 * 1024;
/// Bodies up to this size go out as they are: the kernel's socket buffer takes them at once,
/// so they never wait in this process for a slow client.
pub const SMALL: usize = 64 * 1024;

/// The budget of bytes referenced by bodies not yet taken by their clients.
pub struct Unsent {
    max: usize,
    state: Mutex<UnsentState>,
}

#[derive(Default)]
struct UnsentState {
    /// Buffer address → (length, bodies holding it).
    buffers: HashMap<usize, (usize, usize)>,
    bytes: usize,
}

static UNSENT: OnceLock<Unsent> = OnceLock::new();

/// Sets the budget (once per process; later calls keep the first).
pub fn init(max_unsent_bytes: usize) {
    UNSENT.get_or_init(|| Unsent { max: max_unsent_bytes, state: Mutex::default() });
}

/// Bytes referenced now.
pub fn unsent_bytes() -> usize {
    UNSENT.get().map_or(0, |u| u.state.lock().expect("unsent lock").bytes)
}

/// One body's share of a buffer; released on drop. It keeps the buffer alive, so its address
/// (the key) cannot be reused by another buffer while it is counted.
pub struct Share {
    key: usize,
    _buffer: Bytes,
}

impl Drop for Share {
    fn drop(&mut self) {
        let Some(unsent) = UNSENT.get() else { return };
        let mut state = unsent.state.lock().expect("unsent lock");
        if let Some((len, holders)) = state.buffers.get_mut(&self.key) {
            *holders -= 1;
            if *holders == 0 {
                let len = *len;
                state.buffers.remove(&self.key);
                state.bytes -= len;
            }
        }
    }
}

/// `ds.max_unsent_bytes` is reached.
#[derive(Debug, Clone, Copy)]
pub struct OverBudget;

/// Takes a share of `data` for a response, or fails when that would go over the budget (a
/// buffer already shared is always granted: it costs nothing more). Small buffers are not
/// counted (`Ok(None)`).
pub fn share(data: &Bytes) -> Result<Option<Share>, OverBudget> {
    let Some(unsent) = UNSENT.get() else { return Ok(None) };
    if data.len() <= SMALL {
        return Ok(None);
    }
    let key = data.as_ptr() as usize;
    let mut state = unsent.state.lock().expect("unsent lock");
    if let Some((_, holders)) = state.buffers.get_mut(&key) {
        *holders += 1;
        return Ok(Some(Share { key, _buffer: data.clone() }));
    }
    // A buffer bigger than the whole budget still goes out when nothing else is held, so a
    // small budget cannot make a chunk impossible to send.
    if state.bytes > 0 && state.bytes + data.len() > unsent.max {
        crate::metrics::get().unsent_refused.inc();
        return Err(OverBudget);
    }
    state.buffers.insert(key, (data.len(), 1));
    state.bytes += data.len();
    Ok(Some(Share { key, _buffer: data.clone() }))
}

/// A sized body (with `Content-Length`) sent straight from a shared buffer.
///
/// The body hands actix the whole buffer as one piece, and the piece owns the body's share of
/// the budget and its watchdog guard. Our actix-http (see `vendor/`, DECISIONS.md) writes a
/// large chunk of a sized body from the chunk's own buffer instead of copying it into the
/// connection's write buffer, and drops it once the socket has taken all of it: only then are
/// the share and the guard released. So a client that stops reading holds a reference, counted
/// in the budget and watched, and no copy; a client that reads gets the body in as few socket
/// writes as its socket buffer allows.
pub struct SharedBody {
    len: u64,
    rest: Option<Piece>,
}

/// What a [`SharedBody`] hands to actix: the data and what must live as long as it does.
struct Piece {
    data: Bytes,
    _share: Option<Share>,
    watch: Option<WatchGuard>,
}

impl AsRef<[u8]> for Piece {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl SharedBody {
    pub fn new(data: Bytes, share: Option<Share>, watch: Option<WatchGuard>) -> SharedBody {
        SharedBody { len: data.len() as u64, rest: Some(Piece { data, _share: share, watch }) }
    }
}

impl MessageBody for SharedBody {
    type Error = std::convert::Infallible;

    fn size(&self) -> BodySize {
        BodySize::Sized(self.len)
    }

    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Bytes, Self::Error>>> {
        match self.rest.take() {
            Some(piece) if !piece.data.is_empty() => {
                if let Some(watch) = &piece.watch {
                    watch.yielded();
                }
                Poll::Ready(Some(Ok(Bytes::from_owner(piece))))
            }
            _ => Poll::Ready(None),
        }
    }
}

/// `data` cut into slices of at most [`PIECE`] bytes (no copy).
pub fn slices(data: &Bytes) -> impl Iterator<Item = Bytes> + '_ {
    (0..data.len()).step_by(PIECE).map(move |at| data.slice(at..(at + PIECE).min(data.len())))
}
