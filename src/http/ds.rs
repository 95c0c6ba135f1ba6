//! Durable Streams reads: HEAD, catch-up, long-poll and SSE on `{ds.path}/{stream}`.
//!
//! Every mode follows the same rule: a reader owns its position, reads the log after it, and a
//! live reader that finds nothing waits on the hub and reads again. The hub subscription is
//! made *before* the read, so an append that lands between the read and the wait still wakes
//! the reader (see `hub.rs`).

use std::fmt::Write as _;
use std::time::Duration;

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::Method;
use actix_web::{web, HttpRequest, HttpResponse, HttpResponseBuilder};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::stream;
use tokio::time::Instant;

use super::body::{self, SharedBody};
use super::watchdog::{self, ConnSocket};
use super::{authorize, Access, ApiError, AppState};
use crate::cursor;
use crate::engine::Engine;
use crate::hub::{Subscription, Transient};
use crate::metrics::{self, GaugeGuard};
use crate::offset::{Offset, Position};
use crate::query;
use crate::storage::{Chunk, ReadError};
use crate::streams::stream_from_path;
use std::sync::Arc;

const ALLOW: &str = "GET, HEAD, OPTIONS";
const SSE_PING_INTERVAL: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    CatchUp,
    LongPoll,
    Sse,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::CatchUp => "catchup",
            Mode::LongPoll => "poll",
            Mode::Sse => "sse",
        }
    }
}

/// One validated read request.
struct Read {
    state: web::Data<AppState>,
    stream: String,
    offset: Offset,
    access: Access,
    cursor: Option<String>,
    max_bytes: usize,
    /// The connection's socket, for the watchdog.
    socket: Option<ConnSocket>,
}

pub async fn handle(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let method = req.method().clone();
    if method != Method::GET && method != Method::HEAD && method != Method::OPTIONS {
        return Err(ApiError::method_not_allowed(ALLOW));
    }
    if method == Method::OPTIONS {
        // A preflight is answered by the CORS middleware; this is a plain OPTIONS.
        return Ok(HttpResponse::NoContent().insert_header((header::ALLOW, ALLOW)).finish());
    }
    let stream = stream_from_path(req.uri().path(), &state.config.ds.path)?;
    // Parameters that mean one thing each: a second value is a client bug, not a choice.
    let single = ["offset", "live", "cursor", "signed", state.config.jwt.param.as_str()];
    let query = query::parse(req.query_string(), &single).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mode = match query.get("live") {
        None | Some("") | Some("false") => Mode::CatchUp,
        Some("long-poll") => Mode::LongPoll,
        Some("sse") => Mode::Sse,
        Some(other) => return Err(ApiError::bad_request(format!("invalid live mode {other:?}: use long-poll or sse"))),
    };
    let result = read(&req, &state, &query, stream, mode, method == Method::HEAD).await;
    let status = match &result {
        Ok(response) => response.status(),
        Err(e) => actix_web::ResponseError::status_code(e),
    };
    let mode_label = if method == Method::HEAD { "head" } else { mode.label() };
    metrics::get().requests.with_label_values(&[mode_label, status.as_str()]).inc();
    result
}

async fn read(
    req: &HttpRequest,
    state: &web::Data<AppState>,
    query: &query::Query,
    stream: String,
    mode: Mode,
    head: bool,
) -> Result<HttpResponse, ApiError> {
    let access = authorize(state, req, query, &stream).await?;
    if head {
        let tail = state.engine.tail(&stream).await.map_err(|e| ApiError::from(ReadError::from(e)))?;
        return Ok(HttpResponse::Ok()
            .content_type("application/json")
            .insert_header(("Stream-Next-Offset", tail.token()))
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .finish());
    }
    // A browser's own EventSource resumes with the id of the last event it got, and keeps the
    // URL (with its first offset) as it was: the header wins.
    let last_event_id = match mode {
        Mode::Sse => req.headers().get("last-event-id").map(|v| v.to_str().unwrap_or("\u{fffd}")),
        _ => None,
    };
    let raw_offset = last_event_id.or(query.get("offset"));
    if mode != Mode::CatchUp && raw_offset.is_none() {
        return Err(ApiError::bad_request("offset is required for live reads (use -1, now or a token)"));
    }
    let offset = Offset::parse(raw_offset).map_err(|e| match last_event_id {
        Some(_) => ApiError::bad_request("invalid Last-Event-ID: not an offset of this server"),
        None => ApiError::bad_request(e.to_string()),
    })?;
    let read = Read {
        state: state.clone(),
        stream,
        offset,
        access,
        cursor: query.get("cursor").map(str::to_string),
        max_bytes: usize::try_from(state.config.ds.max_chunk_bytes).unwrap_or(usize::MAX),
        socket: req.conn_data::<ConnSocket>().copied(),
    };
    match mode {
        Mode::CatchUp => catch_up(req, read).await,
        Mode::LongPoll => long_poll(req, read).await,
        Mode::Sse => sse(read).await,
    }
}

/// Reads a chunk of the stream after `offset`.
async fn read_chunk(engine: &Engine, stream: &str, offset: Offset, max_bytes: usize) -> Result<Chunk, ApiError> {
    engine.read(stream, offset, max_bytes).await.map_err(|e| read_error(e, stream))
}

fn read_error(error: ReadError, stream: &str) -> ApiError {
    match error {
        ReadError::Storage(e) => ApiError::unavailable(&e, &format!("read of stream {stream:?} failed")),
        gone => ApiError::from(gone),
    }
}

async fn catch_up(req: &HttpRequest, read: Read) -> Result<HttpResponse, ApiError> {
    let chunk = read_chunk(&read.state.engine, &read.stream, read.offset, read.max_bytes).await?;
    if read.offset == Offset::Now {
        // The tail, never cached: it moves.
        return Ok(HttpResponse::Ok()
            .content_type("application/json")
            .insert_header(("Stream-Next-Offset", chunk.next.token()))
            .insert_header(("Stream-Up-To-Date", "true"))
            .insert_header(("Stream-Cursor", cursor::next_cursor(read.cursor.as_deref())))
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .body(chunk.body));
    }
    chunk_response(req, &read, chunk)
}

/// A 200 (or 304) for a chunk of messages, as catch-up and long-poll answer it.
fn chunk_response(req: &HttpRequest, read: &Read, chunk: Chunk) -> Result<HttpResponse, ApiError> {
    // The body is fully determined by the range of messages it holds (messages never change),
    // so the range is a strong validator.
    let etag = format!("\"{}:{}\"", chunk.start.token(), chunk.next.token());
    let not_modified = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|candidate| candidate.trim() == etag || candidate.trim() == "*"));
    let mut builder = if not_modified { HttpResponse::NotModified() } else { HttpResponse::Ok() };
    builder
        .insert_header(("Stream-Next-Offset", chunk.next.token()))
        .insert_header(("Stream-Cursor", cursor::next_cursor(read.cursor.as_deref())))
        .insert_header((header::ETAG, etag));
    cache_headers(&mut builder, read);
    if chunk.up_to_date {
        builder.insert_header(("Stream-Up-To-Date", "true"));
    }
    if not_modified {
        return Ok(builder.finish());
    }
    builder.content_type("application/json");
    if chunk.body.len() <= body::SMALL {
        return Ok(builder.body(chunk.body));
    }
    // Big enough to wait in this process for a slow client: sent from the shared buffer,
    // counted against ds.max_unsent_bytes, and watched for a client that stops reading.
    let share = body::share(&chunk.body).map_err(|_| unsent_budget_full())?;
    let watch = watchdog::watch(read.socket, "read", None);
    Ok(builder.body(SharedBody::new(chunk.body, share, watch)))
}

fn unsent_budget_full() -> ApiError {
    ApiError::new(actix_web::http::StatusCode::SERVICE_UNAVAILABLE, "server busy sending responses, retry later")
}

/// `Cache-Control` (and `Vary`) of a readable response. A read that needed credentials must
/// never be answered from a cache to a later request with other credentials or none (a page
/// that logged out, a token that expired): `no-store`, and a `Vary` naming the credential
/// headers for any cache that keeps it anyway. Public reads stay cacheable, as the protocol
/// intends.
fn cache_headers(builder: &mut HttpResponseBuilder, read: &Read) {
    match read.access {
        Access::Public => {
            builder.insert_header((header::CACHE_CONTROL, "public, max-age=60, stale-while-revalidate=300"));
        }
        Access::Private => {
            builder
                .insert_header((header::CACHE_CONTROL, "no-store"))
                .insert_header((header::VARY, read.state.credential_headers()));
        }
    }
}

async fn long_poll(req: &HttpRequest, read: Read) -> Result<HttpResponse, ApiError> {
    metrics::get().poll_requests.inc();
    let state = &read.state;
    let _slot = state.live_slot()?;
    // Subscribe before the first read: nothing appended after this point can be missed.
    let mut subscription = state.engine.hub().subscribe(&read.stream);
    let mut chunk = read_chunk(&state.engine, &read.stream, read.offset, read.max_bytes).await?;
    if chunk.count == 0 {
        let _waiting = GaugeGuard::new(&metrics::get().poll_clients);
        let deadline = Instant::now() + Duration::from_secs(state.config.ds.poll_interval);
        let position = chunk.next;
        loop {
            tokio::select! {
                _ = subscription.changed() => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(poll_timeout(&read, position)),
                _ = state.shutdown.cancelled() => return Ok(poll_timeout(&read, position)),
            }
            let transient = subscription.take_transient();
            chunk = read_chunk(&state.engine, &read.stream, Offset::At(position), read.max_bytes).await?;
            if !transient.is_empty() {
                return Ok(with_transient(&read, chunk, &transient));
            }
            if chunk.count > 0 {
                break;
            }
        }
    }
    chunk_response(req, &read, chunk)
}

/// A long-poll answer that carries transient messages (after the stored ones, if any). Such a
/// body exists once, so it is neither cached nor given an ETag.
fn with_transient(read: &Read, chunk: Chunk, transient: &[Arc<Transient>]) -> HttpResponse {
    let mut body = BytesMut::with_capacity(chunk.body.len() + transient.iter().map(|t| t.body.len()).sum::<usize>());
    body.put_slice(&chunk.body[..chunk.body.len() - 1]); // without its closing bracket
    for batch in transient {
        if body.len() > 1 {
            body.put_u8(b',');
        }
        body.put_slice(&batch.body[1..batch.body.len() - 1]);
    }
    body.put_u8(b']');
    let mut builder = HttpResponse::Ok();
    builder
        .content_type("application/json")
        .insert_header(("Stream-Next-Offset", chunk.next.token()))
        .insert_header(("Stream-Cursor", cursor::next_cursor(read.cursor.as_deref())))
        .insert_header((header::CACHE_CONTROL, "no-store"));
    if chunk.up_to_date {
        builder.insert_header(("Stream-Up-To-Date", "true"));
    }
    builder.body(body.freeze())
}

/// `204`: nothing new within `ds.poll_interval` (or the server is stopping); retry from the
/// same position.
fn poll_timeout(read: &Read, position: Position) -> HttpResponse {
    HttpResponse::NoContent()
        .insert_header(("Stream-Next-Offset", position.token()))
        .insert_header(("Stream-Up-To-Date", "true"))
        .insert_header(("Stream-Cursor", cursor::next_cursor(read.cursor.as_deref())))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .finish()
}

async fn sse(read: Read) -> Result<HttpResponse, ApiError> {
    metrics::get().sse_requests.inc();
    let state = read.state.clone();
    let slot = state.live_slot()?;
    let subscription = state.engine.hub().subscribe(&read.stream);
    // The first read happens before the response starts, so a bad or gone offset still gets
    // its proper status code.
    let first = read_chunk(&state.engine, &read.stream, read.offset, read.max_bytes).await?;
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
        pending: Some(first),
        pieces: std::collections::VecDeque::new(),
        share: None,
        sent_up_to_date: false,
        more_backlog: false,
        ended: false,
        subscription,
        stream: read.stream,
        max_bytes: read.max_bytes,
        _open: GaugeGuard::new(&metrics::get().sse_clients),
        _slot: slot,
        _watch: watch,
    };
    let body = stream::unfold(sse, |mut sse| async move {
        let piece = sse.next_piece().await?;
        Some((Ok::<_, actix_web::Error>(piece), sse))
    });
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream")))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
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
    pending: Option<Chunk>,
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
                self.pending = Box::pin(self.read()).await;
                self.ended = self.pending.is_none();
                continue;
            }
            if let Some(chunk) = self.pending.take() {
                self.position = chunk.next;
                if chunk.count > 0 || !self.sent_up_to_date {
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
            tokio::select! {
                _ = self.subscription.changed() => {
                    let transient = self.subscription.take_transient();
                    self.pending = Some(Box::pin(self.read()).await?); // boxed: see above
                    if !transient.is_empty() {
                        return Some(self.transient_frame(&transient));
                    }
                }
                _ = tokio::time::sleep_until(self.next_ping) => {
                    self.next_ping = Instant::now() + SSE_PING_INTERVAL;
                    return Some(Bytes::from_static(b": ping\n\n"));
                }
                _ = tokio::time::sleep_until(self.deadline) => return None,
                _ = self.shutdown.cancelled() => return None,
            }
        }
    }

    /// Reads after the current position; `None` ends the response (the client reconnects from
    /// its last offset and gets a proper status for whatever went wrong).
    async fn read(&self) -> Option<Chunk> {
        match read_chunk(&self.engine, &self.stream, Offset::At(self.position), self.max_bytes).await {
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
            self.put_control(&mut out, self.position, at_tail);
        }
        out.freeze()
    }

    /// `event: data` (if there are messages) followed by its `event: control`. A small frame
    /// is built in one buffer, as one write (a broadcast to N readers makes N of these); a big
    /// one is queued as slices of the chunk, which stays shared.
    fn frame(&mut self, chunk: &Chunk) -> Bytes {
        if chunk.count == 0 {
            let mut out = BytesMut::with_capacity(160);
            self.put_control(&mut out, chunk.next, chunk.up_to_date);
            return out.freeze();
        }
        // Stored messages are compact JSON: the array holds no raw newline.
        if chunk.body.len() <= body::SMALL {
            let mut out = BytesMut::with_capacity(chunk.body.len() + 240);
            out.put_slice(DATA_HEAD);
            out.put_slice(&chunk.body);
            put_data_end(&mut out, chunk.next);
            self.put_control(&mut out, chunk.next, chunk.up_to_date);
            return out.freeze();
        }
        // Over the unsent budget the response ends; the client reconnects from its offset.
        match body::share(&chunk.body) {
            Ok(share) => self.share = share,
            Err(_) => {
                self.ended = true;
                return Bytes::new();
            }
        }
        let mut tail = BytesMut::with_capacity(240);
        put_data_end(&mut tail, chunk.next);
        self.put_control(&mut tail, chunk.next, chunk.up_to_date);
        self.pieces.push_back(Bytes::from_static(DATA_HEAD));
        self.pieces.extend(body::slices(&chunk.body));
        self.pieces.push_back(tail.freeze());
        Bytes::new()
    }

    /// Appends one `event: control` for `position`. Written directly rather than through
    /// serde_json: tokens are `[a-z0-9_]` and the cursor is digits, so nothing needs escaping.
    fn put_control(&mut self, out: &mut BytesMut, position: Position, up_to_date: bool) {
        self.cursor = self.cursor.max(cursor::current_interval());
        self.next_ping = Instant::now() + SSE_PING_INTERVAL;
        let up_to_date = if up_to_date { ",\"upToDate\":true" } else { "" };
        write!(
            out,
            "event: control\ndata:{{\"streamCursor\":\"{}\",\"streamNextOffset\":\"{position}\"{up_to_date}}}\nid:{position}\n\n",
            self.cursor
        )
        .expect("writing to memory cannot fail");
    }
}

/// The start of an SSE data event, up to its JSON.
const DATA_HEAD: &[u8] = b"event: data\ndata:";

/// The end of a data event whose messages end at `position`: its `id`, the **last** field (the
/// official conformance suite wants `data:` right after `event:`), which lets a browser's own
/// EventSource resume there (`Last-Event-ID`).
fn put_data_end(out: &mut BytesMut, position: Position) {
    write!(out, "\nid:{position}\n\n").expect("writing to memory cannot fail");
}
