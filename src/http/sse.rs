//! SSE reads (`live=sse`): a `data` event per chunk, each followed by its `control` event, in
//! one of three encodings chosen by the stream's content type: JSON streams send their JSON
//! array, `text/*` streams their text (one `data:` line per line), every other type base64
//! (`Stream-SSE-Data-Encoding: base64`). A closed stream's last `control` says so
//! (`streamClosed`, no cursor) and the response ends.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{self, HeaderValue};
use actix_web::HttpResponse;
use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::stream;
use tokio::time::Instant;

use super::body;
use super::ds::{read_chunk, Read};
use super::watchdog;
use super::ApiError;
use crate::cursor;
use crate::engine::Engine;
use crate::hub::{Subscription, Transient};
use crate::meta;
use crate::metrics::{self, GaugeGuard};
use crate::offset::{Offset, Position};
use crate::storage::Chunk;

const SSE_PING_INTERVAL: Duration = Duration::from_secs(15);

/// How a chunk's bytes travel in `data:` lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    /// The JSON array as is: compact JSON holds no raw newline.
    Json,
    /// Text, one `data:` line per line (split at CRLF, CR and LF).
    Text,
    Base64,
}

impl Encoding {
    fn of(content_type: &str) -> Encoding {
        if meta::Framing::of(content_type) == meta::Framing::Json {
            Encoding::Json
        } else if meta::sse_is_text(content_type) {
            Encoding::Text
        } else {
            Encoding::Base64
        }
    }
}

pub(super) async fn sse(read: Read) -> Result<HttpResponse, ApiError> {
    metrics::get().sse_requests.inc();
    let state = read.state.clone();
    let slot = state.live_slot()?;
    let subscription = state.engine.hub().subscribe(&read.stream);
    // The first read happens before the response starts, so a bad or gone offset still gets
    // its proper status code.
    let first = read.chunk(read.offset).await?;
    let encoding = Encoding::of(super::ds::content_type(&first));
    let now = Instant::now();
    let deadline = now + Duration::from_secs(state.config.ds.sse_ttl);
    // The TTL is enforced from outside too: a client that stops reading stops actix from
    // polling this body, and with it the deadline below.
    let watch = watchdog::watch(read.socket, "sse", Some(deadline.into_std()));
    let sse = SseStream {
        cursor: cursor::next_cursor(read.cursor.as_deref()).parse().unwrap_or(0),
        engine: state.engine.clone(),
        shutdown: state.shutdown.clone(),
        deadline,
        next_ping: now + SSE_PING_INTERVAL,
        position: first.next,
        pending: Some(Box::new(first)),
        pieces: std::collections::VecDeque::new(),
        share: None,
        sent_up_to_date: false,
        more_backlog: false,
        ended: false,
        subscription,
        stream: read.stream,
        max_bytes: read.max_bytes,
        implicit: state.config.ds.implicit_streams,
        encoding,
        _open: GaugeGuard::new(&metrics::get().sse_clients),
        _slot: slot,
        _watch: watch,
    };
    let body = stream::unfold(sse, |mut sse| async move {
        let piece = sse.next_piece().await?;
        Some((Ok::<_, actix_web::Error>(piece), sse))
    });
    let mut response = HttpResponse::Ok();
    response
        .insert_header((header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream")))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"));
    if encoding == Encoding::Base64 {
        response.insert_header(("Stream-SSE-Data-Encoding", "base64"));
    }
    Ok(response.streaming(body))
}

/// The state of one SSE response. Dropping it (the client went away, the TTL passed, or the
/// server is stopping) drops the hub subscription and the open-connections gauge with it.
struct SseStream {
    engine: Engine,
    stream: String,
    subscription: Subscription,
    shutdown: tokio_util::sync::CancellationToken,
    /// Where this reader is: the `streamNextOffset` of the last control event sent.
    position: Position,
    /// A chunk read but not sent yet.
    /// Boxed: a waiting response has none, and inline it would be part of every response's
    /// state (104 bytes).
    pending: Option<Box<Chunk>>,
    /// The rest of the frame being sent, in slices (see `body.rs`).
    pieces: std::collections::VecDeque<Bytes>,
    /// This response's share of the buffer `pieces` slice, if it is a big one.
    share: Option<body::Share>,
    sent_up_to_date: bool,
    /// The last chunk sent did not reach the tail: read the next one when it is taken.
    more_backlog: bool,
    /// A read failed: end the response after what was already queued.
    ended: bool,
    cursor: u64,
    max_bytes: usize,
    /// `ds.implicit_streams`: a stream that is gone reads as empty rather than ending this.
    implicit: bool,
    encoding: Encoding,
    deadline: Instant,
    next_ping: Instant,
    _open: GaugeGuard,
    _slot: super::LiveSlot,
    _watch: Option<watchdog::WatchGuard>,
}

impl SseStream {
    /// The next bytes to send, or `None` to end the response. A frame is handed out in slices
    /// and the next chunk is read only once the last slice is taken, so a reader that does
    /// not read holds at most one chunk (shared with the cache and other readers).
    async fn next_piece(&mut self) -> Option<Bytes> {
        if let Some(watch) = &self._watch {
            watch.polled();
        }
        let piece = loop {
            if let Some(piece) = self.pieces.pop_front() {
                break piece;
            }
            self.share = None;
            let frame = self.next_frame().await?;
            // Never an empty piece: in a chunked response it would read as the end.
            if !frame.is_empty() {
                break frame;
            }
        };
        if let Some(watch) = &self._watch {
            watch.yielded();
        }
        Some(piece)
    }

    /// The next frame: returned whole when small, else queued in `pieces` (and returned empty).
    async fn next_frame(&mut self) -> Option<Bytes> {
        loop {
            if self.ended {
                return None;
            }
            if self.more_backlog {
                self.more_backlog = false;
                // Boxed: a read's future is large (either engine's), and inline it would be
                // part of every SSE response's state, waiting or not (2408 vs 872 bytes).
                self.pending = Box::pin(self.read()).await.map(Box::new);
                self.ended = self.pending.is_none();
                continue;
            }
            if let Some(chunk) = self.pending.take() {
                self.position = chunk.next;
                if chunk.count > 0 || !self.sent_up_to_date || chunk.closed() {
                    if chunk.up_to_date {
                        self.sent_up_to_date = true;
                    }
                    // More backlog: read the next chunk once this one is taken.
                    self.more_backlog = !chunk.up_to_date;
                    return Some(self.frame(&chunk));
                }
            }
            if self.shutdown.is_cancelled() || Instant::now() >= self.deadline {
                return None;
            }
            // What a waiting response holds is what this `select!` holds, for every idle reader:
            // one timer (the next ping or the deadline, whichever comes first), and no future
            // of the shutdown token: shutdown cancels it, then wakes every subscription.
            tokio::select! {
                _ = self.subscription.changed() => {
                    if self.shutdown.is_cancelled() {
                        return None;
                    }
                    let transient = self.subscription.take_transient();
                    self.pending = Some(Box::new(Box::pin(self.read()).await?)); // boxed: see above
                    if !transient.is_empty() {
                        return Some(self.transient_frame(&transient));
                    }
                }
                _ = tokio::time::sleep_until(self.next_ping.min(self.deadline)) => {
                    if Instant::now() >= self.deadline {
                        return None;
                    }
                    self.next_ping = Instant::now() + SSE_PING_INTERVAL;
                    return Some(Bytes::from_static(b": ping\n\n"));
                }
            }
        }
    }

    /// Reads after the current position; `None` ends the response (the client reconnects from
    /// its last offset and gets a proper status for whatever went wrong).
    async fn read(&self) -> Option<Chunk> {
        match read_chunk(&self.engine, &self.stream, Offset::At(self.position), self.max_bytes, self.implicit).await {
            Ok(chunk) => Some(chunk),
            Err(e) => {
                log::warn!("SSE read of stream {:?} failed: {e}", self.stream);
                None
            }
        }
    }

    /// Transient messages as data + control events; the position does not move.
    fn transient_frame(&mut self, transient: &[Arc<Transient>]) -> Bytes {
        let mut out = BytesMut::new();
        for batch in transient {
            out.put_slice(DATA_HEAD);
            out.put_slice(&batch.body);
            put_data_end(&mut out, self.position);
            let at_tail = self.pending.as_ref().is_none_or(|c| c.count == 0);
            self.put_control(&mut out, self.position, at_tail, false);
        }
        out.freeze()
    }

    /// `event: data` (if there are messages) followed by its `event: control`. A small frame
    /// is built in one buffer, as one write (a broadcast to N readers makes N of these); a big
    /// one is queued as slices of the chunk (or of its encoding), which stays shared. After
    /// the last chunk of a closed stream the response ends.
    fn frame(&mut self, chunk: &Chunk) -> Bytes {
        let closed = chunk.closed();
        if closed {
            self.ended = true;
        }
        if chunk.count == 0 {
            let mut out = BytesMut::with_capacity(160);
            self.put_control(&mut out, chunk.next, chunk.up_to_date, closed);
            return out.freeze();
        }
        // Only small frames are kept, so a hit is one (and skips the encoding too).
        let cursor = self.touch_cursor();
        let key = FrameKey {
            body: chunk.body.clone(),
            next: chunk.next,
            up_to_date: chunk.up_to_date,
            closed,
            cursor,
            encoding: self.encoding,
        };
        if let Some(frame) = shared_frame(&key) {
            return frame;
        }
        let data = match self.encoding {
            Encoding::Json => chunk.body.clone(),
            Encoding::Text => text_lines(&chunk.body),
            // Each event decodes on its own: one encoding per event, never concatenated.
            Encoding::Base64 => Bytes::from(base64::engine::general_purpose::STANDARD.encode(&chunk.body)),
        };
        if data.len() <= body::SMALL {
            let mut out = BytesMut::with_capacity(data.len() + 240);
            out.put_slice(DATA_HEAD);
            out.put_slice(&data);
            put_data_end(&mut out, chunk.next);
            write_control(&mut out, chunk.next, chunk.up_to_date, closed, cursor);
            let frame = out.freeze();
            keep_frame(key, frame.clone());
            return frame;
        }
        // Over the unsent budget the response ends; the client reconnects from its offset.
        match body::share(&data) {
            Ok(share) => self.share = share,
            Err(_) => {
                self.ended = true;
                return Bytes::new();
            }
        }
        let mut tail = BytesMut::with_capacity(240);
        put_data_end(&mut tail, chunk.next);
        self.put_control(&mut tail, chunk.next, chunk.up_to_date, closed);
        self.pieces.push_back(Bytes::from_static(DATA_HEAD));
        self.pieces.extend(body::slices(&data));
        self.pieces.push_back(tail.freeze());
        Bytes::new()
    }

    /// Appends one `event: control` for `position` (see [`write_control`]).
    fn put_control(&mut self, out: &mut BytesMut, position: Position, up_to_date: bool, closed: bool) {
        let cursor = self.touch_cursor();
        write_control(out, position, up_to_date, closed, cursor);
    }

    /// What sending a control event does to this response: its cursor moves on to the current
    /// interval (never back) and the next ping is pushed back. Returns the cursor to send.
    fn touch_cursor(&mut self) -> u64 {
        self.cursor = self.cursor.max(cursor::current_interval());
        self.next_ping = Instant::now() + SSE_PING_INTERVAL;
        self.cursor
    }
}

/// Appends one `event: control` for `position`. Written directly rather than through
/// serde_json: tokens are `[a-z0-9_]` and the cursor is digits, so nothing needs escaping.
/// The last one of a closed stream carries `streamClosed` and no cursor.
fn write_control(out: &mut BytesMut, position: Position, up_to_date: bool, closed: bool, cursor: u64) {
    let written = if closed {
        write!(
            out,
            "event: control\ndata:{{\"streamNextOffset\":\"{position}\",\"streamClosed\":true}}\nid:{position}\n\n"
        )
    } else {
        let up_to_date = if up_to_date { ",\"upToDate\":true" } else { "" };
        write!(
            out,
            "event: control\ndata:{{\"streamCursor\":\"{cursor}\",\"streamNextOffset\":\"{position}\"{up_to_date}}}\nid:{position}\n\n"
        )
    };
    written.expect("writing to memory cannot fail");
}

/// Everything a small frame is made of: the same key always makes the same bytes.
struct FrameKey {
    /// The chunk's body, compared by allocation: readers woken by one write all hold the chunk
    /// the writer left in the cache. Kept here, so its allocation cannot be freed and reused
    /// for other bytes while the key is.
    body: Bytes,
    next: Position,
    up_to_date: bool,
    closed: bool,
    cursor: u64,
    encoding: Encoding,
}

impl FrameKey {
    fn same(&self, other: &FrameKey) -> bool {
        self.body.as_ptr() == other.body.as_ptr()
            && self.body.len() == other.body.len()
            && self.next == other.next
            && self.up_to_date == other.up_to_date
            && self.closed == other.closed
            && self.cursor == other.cursor
            && self.encoding == other.encoding
    }
}

thread_local! {
    /// The last small frame built on this worker thread. A write wakes every live reader of
    /// its stream, and the readers on one worker run one after the other, each about to send
    /// the same frame: the first builds it, the others send the same bytes.
    static LAST_FRAME: std::cell::RefCell<Option<(FrameKey, Bytes)>> = const { std::cell::RefCell::new(None) };
}

/// The last frame built on this thread, if it has this key.
fn shared_frame(key: &FrameKey) -> Option<Bytes> {
    let hit = LAST_FRAME.with_borrow(|last| last.as_ref().filter(|(k, _)| k.same(key)).map(|(_, f)| f.clone()));
    if hit.is_some() {
        metrics::get().sse_frames_shared.inc();
    }
    hit
}

/// Keeps a small frame just built, for the next reader on this thread with the same key.
fn keep_frame(key: FrameKey, frame: Bytes) {
    LAST_FRAME.set(Some((key, frame)));
}

/// Text as the value of `data:` lines: its lines (split at CRLF, CR and LF) joined by
/// `\ndata:`, so a line break in the text can never end the event or start a field.
fn text_lines(text: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(text.len() + 16);
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'\r' => {
                out.extend_from_slice(b"\ndata:");
                if text.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => out.extend_from_slice(b"\ndata:"),
            byte => out.push(byte),
        }
        i += 1;
    }
    Bytes::from(out)
}

/// The start of an SSE data event, up to its JSON.
const DATA_HEAD: &[u8] = b"event: data\ndata:";

/// The end of a data event whose messages end at `position`: its `id`, the **last** field (the
/// official conformance suite wants `data:` right after `event:`), which lets a browser's own
/// EventSource resume there (`Last-Event-ID`).
fn put_data_end(out: &mut BytesMut, position: Position) {
    write!(out, "\nid:{position}\n\n").expect("writing to memory cannot fail");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_lines_split_at_every_line_break() {
        assert_eq!(&text_lines(b"a\r\nb\rc\nd")[..], b"a\ndata:b\ndata:c\ndata:d");
        assert_eq!(&text_lines(b"line\n")[..], b"line\ndata:");
        assert_eq!(&text_lines(b"\r\n\r\n")[..], b"\ndata:\ndata:");
        assert_eq!(&text_lines(b"plain")[..], b"plain");
    }

    #[test]
    fn encodings_follow_the_content_type() {
        assert_eq!(Encoding::of("application/json; charset=utf-8"), Encoding::Json);
        assert_eq!(Encoding::of("text/plain"), Encoding::Text);
        assert_eq!(Encoding::of("application/octet-stream"), Encoding::Base64);
        assert_eq!(Encoding::of("image/png"), Encoding::Base64);
    }
}
