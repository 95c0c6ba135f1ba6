//! Durable Streams reads: HEAD, catch-up, long-poll and SSE on `{ds.path}/{stream}`.
//!
//! Every mode follows the same rule: a reader owns its position, reads the log after it, and a
//! live reader that finds nothing waits on the hub and reads again. The hub subscription is
//! made *before* the read, so an append that lands between the read and the wait still wakes
//! the reader (see `hub.rs`).

use std::time::Duration;

use actix_web::http::header;
use actix_web::http::Method;
use actix_web::{web, HttpRequest, HttpResponse, HttpResponseBuilder};
use bytes::{BufMut, BytesMut};
use tokio::time::Instant;

use super::body::{self, SharedBody};
use super::watchdog::{self, ConnSocket};
use super::{authorize, Access, ApiError, AppState};
use crate::cursor;
use crate::engine::Engine;
use crate::hub::Transient;
use crate::meta;
use crate::metrics::{self, GaugeGuard};
use crate::offset::{Offset, Position};
use crate::query;
use crate::storage::{Chunk, ReadError};
use crate::streams::stream_from_path;
use std::sync::Arc;

const ALLOW: &str = "GET, HEAD, OPTIONS";

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
pub(super) struct Read {
    pub(super) state: web::Data<AppState>,
    pub(super) stream: String,
    pub(super) offset: Offset,
    access: Access,
    pub(super) cursor: Option<String>,
    pub(super) max_bytes: usize,
    /// The connection's socket, for the watchdog.
    pub(super) socket: Option<ConnSocket>,
}

pub async fn handle(
    req: HttpRequest,
    mut payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let method = req.method().clone();
    let writes = state.config.ds.writes;
    let allow = if writes { super::write::ALLOW_WRITES } else { ALLOW };
    let is_write = method == Method::PUT || method == Method::POST || method == Method::DELETE;
    if !(method == Method::GET || method == Method::HEAD || method == Method::OPTIONS || (writes && is_write)) {
        return Err(ApiError::method_not_allowed(allow));
    }
    if method == Method::OPTIONS {
        // A preflight is answered by the CORS middleware; this is a plain OPTIONS.
        return Ok(HttpResponse::NoContent().insert_header((header::ALLOW, allow)).finish());
    }
    let stream = stream_from_path(req.uri().path(), &state.config.ds.path)?;
    if is_write {
        let result = super::write::handle(&req, &mut payload, &state, stream).await;
        let label = match method.as_str() {
            "PUT" => "create",
            "POST" => "append",
            _ => "delete",
        };
        count(label, &result);
        return result;
    }
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
    count(if method == Method::HEAD { "head" } else { mode.label() }, &result);
    result
}

/// `ds_requests_total{mode, status}`.
fn count(mode: &str, result: &Result<HttpResponse, ApiError>) {
    let status = match result {
        Ok(response) => response.status(),
        Err(e) => actix_web::ResponseError::status_code(e),
    };
    metrics::get().requests.with_label_values(&[mode, status.as_str()]).inc();
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
        return self::head(state, &stream).await;
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
        Mode::Sse => super::sse::sse(read).await,
    }
}

/// HEAD: the tail and the metadata of the write API (never renews a TTL).
async fn head(state: &AppState, stream: &str) -> Result<HttpResponse, ApiError> {
    let (tail, found) = state.engine.head(stream).await.map_err(|e| ApiError::from(ReadError::from(e)))?;
    let meta = match found {
        Some(meta) if meta.deleted => return Err(stream_deleted()),
        Some(meta) => meta,
        None if state.config.ds.implicit_streams => meta::broadcast_stream(),
        None => return Err(stream_not_found()),
    };
    let mut response = HttpResponse::Ok();
    response
        .content_type(meta.content_type.as_str())
        .insert_header(("Stream-Next-Offset", tail.token()))
        .insert_header((header::CACHE_CONTROL, "no-store"));
    if let Some(ttl) = meta.ttl_secs {
        response.insert_header(("Stream-TTL", ttl.to_string()));
    }
    if let Some((raw, _)) = &meta.expires_at {
        response.insert_header(("Stream-Expires-At", raw.as_str()));
    }
    if meta.closed {
        response.insert_header(("Stream-Closed", "true"));
    }
    Ok(response.finish())
}

pub(super) fn stream_not_found() -> ApiError {
    ApiError::new(actix_web::http::StatusCode::NOT_FOUND, "stream_not_found")
}

/// A stream deleted while forks still read it (WRITE.md §5.9).
fn stream_deleted() -> ApiError {
    ApiError::new(actix_web::http::StatusCode::GONE, crate::writes::Refusal::Deleted.to_string())
}

/// Reads a chunk of the stream after `offset`; a stream that does not exist is `404` unless
/// `ds.implicit_streams` reads it as empty.
pub(super) async fn read_chunk(
    engine: &Engine,
    stream: &str,
    offset: Offset,
    max_bytes: usize,
    implicit: bool,
) -> Result<Chunk, ApiError> {
    let chunk = engine.read(stream, offset, max_bytes).await.map_err(|e| read_error(e, stream))?;
    match &chunk.meta {
        None if !implicit => Err(stream_not_found()),
        Some(meta) if meta.deleted => Err(stream_deleted()),
        _ => Ok(chunk),
    }
}

/// The stream's content type (JSON for a stream that does not exist).
pub(super) fn content_type(chunk: &Chunk) -> &str {
    chunk.meta.as_ref().map_or(meta::JSON, |m| m.content_type.as_str())
}

fn read_error(error: ReadError, stream: &str) -> ApiError {
    match error {
        ReadError::Storage(e) => ApiError::unavailable(&e, &format!("read of stream {stream:?} failed")),
        gone => ApiError::from(gone),
    }
}

async fn catch_up(req: &HttpRequest, read: Read) -> Result<HttpResponse, ApiError> {
    let chunk = read.chunk(read.offset).await?;
    if read.offset == Offset::Now {
        // The tail, never cached: it moves.
        let mut response = HttpResponse::Ok();
        response
            .content_type(content_type(&chunk))
            .insert_header(("Stream-Next-Offset", chunk.next.token()))
            .insert_header(("Stream-Up-To-Date", "true"))
            .insert_header(("Stream-Cursor", cursor::next_cursor(read.cursor.as_deref())))
            .insert_header((header::CACHE_CONTROL, "no-store"));
        if chunk.closed() {
            response.insert_header(("Stream-Closed", "true"));
        }
        return Ok(response.body(chunk.body));
    }
    chunk_response(req, &read, chunk)
}

impl Read {
    pub(super) async fn chunk(&self, offset: Offset) -> Result<Chunk, ApiError> {
        let implicit = self.state.config.ds.implicit_streams;
        read_chunk(&self.state.engine, &self.stream, offset, self.max_bytes, implicit).await
    }
}

/// A 200 (or 304) for a chunk of messages, as catch-up and long-poll answer it.
fn chunk_response(req: &HttpRequest, read: &Read, chunk: Chunk) -> Result<HttpResponse, ApiError> {
    // The body is fully determined by the range of messages it holds (messages never change),
    // so the range is a strong validator.
    // A closed stream's last chunk differs from the same range read before the close: it
    // says so (Stream-Closed), so its validator does too.
    let closed = chunk.closed();
    let etag = format!("\"{}:{}{}\"", chunk.start.token(), chunk.next.token(), if closed { ":c" } else { "" });
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
    if closed {
        builder.insert_header(("Stream-Closed", "true"));
    }
    if not_modified {
        return Ok(builder.finish());
    }
    builder.content_type(content_type(&chunk));
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
    let mut chunk = read.chunk(read.offset).await?;
    if chunk.count == 0 {
        let _waiting = GaugeGuard::new(&metrics::get().poll_clients);
        let deadline = Instant::now() + Duration::from_secs(state.config.ds.poll_interval);
        let position = chunk.next;
        loop {
            // At the end of a closed stream there is nothing to wait for.
            if chunk.closed() {
                return Ok(poll_timeout(&read, position, true));
            }
            tokio::select! {
                _ = subscription.changed() => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(poll_timeout(&read, position, false)),
                _ = state.shutdown.cancelled() => return Ok(poll_timeout(&read, position, false)),
            }
            let transient = subscription.take_transient();
            chunk = read.chunk(Offset::At(position)).await?;
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

/// `204`: nothing new within `ds.poll_interval` (or the server is stopping): retry from the
/// same position; or, `closed`, the stream ended there: nothing will come.
fn poll_timeout(read: &Read, position: Position, closed: bool) -> HttpResponse {
    let mut response = HttpResponse::NoContent();
    response
        .insert_header(("Stream-Next-Offset", position.token()))
        .insert_header(("Stream-Up-To-Date", "true"))
        .insert_header((header::CACHE_CONTROL, "no-store"));
    if closed {
        response.insert_header(("Stream-Closed", "true"));
    } else {
        response.insert_header(("Stream-Cursor", cursor::next_cursor(read.cursor.as_deref())));
    }
    response.finish()
}
