//! The Durable Streams write API on `{ds.path}/{stream}`: `PUT` (create), `POST` (append,
//! close), `DELETE` (PRODUCT.md §13, WRITE.md §1, §2, §4).
//!
//! Everything that depends on the request alone is checked here, before the body is read
//! when possible (method, key, headers) and right after (size, JSON); the checks against the
//! stream (existence, closure, content type, `Stream-Seq`) are the engine's, atomic with the
//! append (`writes.rs`).

use actix_web::http::{header, Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse, HttpResponseBuilder};
use bytes::Bytes;

use super::{fork, request_body, ApiError, AppState};
use crate::meta::{self, Framing, StreamMeta};
use crate::offset::Position;
use crate::writes::{Append, Producer, WriteOp, WriteOutcome};
use crate::{auth, write_parse};

/// Methods of a DS URL when writes are on.
pub const ALLOW_WRITES: &str = "GET, HEAD, OPTIONS, PUT, POST, DELETE";

/// `PUT`, `POST` or `DELETE` of `stream`.
pub async fn handle(
    req: &HttpRequest,
    payload: &mut web::Payload,
    state: &web::Data<AppState>,
    stream: String,
) -> Result<HttpResponse, ApiError> {
    if let Some(key) = &state.broadcast_key {
        let authorization = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        if !auth::bearer_matches(authorization, key) {
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized"));
        }
    }
    let method = req.method();
    if method == Method::DELETE {
        return delete(state, &stream).await;
    }
    let headers = WriteHeaders::parse(req)?;
    // Fork headers mean something on a `PUT` only.
    let fork = if method == Method::PUT { fork::ForkRequest::parse(req, state)? } else { None };
    let limit = usize::try_from(state.config.ds.max_append_bytes).unwrap_or(usize::MAX);
    let body = request_body::read(req, payload, &state.body_budget, limit, "ds.max_append_bytes")
        .await
        .map_err(|e| e.into_api().1)?;
    let result = if method == Method::PUT {
        create(req, state, &stream, headers, fork, &body.bytes).await
    } else {
        append(state, &stream, headers, &body.bytes).await
    };
    super::subscriptions::written(state, &stream, &body.bytes, &result);
    result
}

/// The value of a header sent at most once (`None`: absent); `400` if repeated or not ASCII.
pub(super) fn header_text<'r>(req: &'r HttpRequest, name: &'static str) -> Result<Option<&'r str>, ApiError> {
    let mut values = req.headers().get_all(name);
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(ApiError::bad_request(format!("{name} is given more than once")));
    }
    value.to_str().map(Some).map_err(|_| ApiError::bad_request(format!("{name} is not visible ASCII")))
}

/// The write headers of one request, validated.
struct WriteHeaders {
    /// `Content-Type` as sent (`None`: absent or empty).
    content_type: Option<String>,
    ttl_secs: Option<u64>,
    expires_at: Option<(String, i64)>,
    closed: bool,
    seq: Option<String>,
    producer: Option<Producer>,
}

impl WriteHeaders {
    fn parse(req: &HttpRequest) -> Result<WriteHeaders, ApiError> {
        let text = |name| header_text(req, name);
        let content_type = text("content-type")?.map(str::trim).filter(|v| !v.is_empty()).map(str::to_string);
        let ttl_secs = text("stream-ttl")?.map(write_parse::ttl).transpose().map_err(ApiError::bad_request)?;
        let expires_at =
            text("stream-expires-at")?.map(write_parse::expires_at).transpose().map_err(ApiError::bad_request)?;
        if ttl_secs.is_some() && expires_at.is_some() {
            return Err(ApiError::bad_request("Stream-TTL and Stream-Expires-At cannot both be given"));
        }
        // Present only when `true`, in any case; other values are ignored (PROTOCOL.md §4.1).
        let closed = text("stream-closed")?.is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let seq = match text("stream-seq")? {
            Some("") => return Err(ApiError::bad_request("Stream-Seq must not be empty")),
            seq => seq.map(str::to_string),
        };
        let producer = (text("producer-id")?, text("producer-epoch")?, text("producer-seq")?);
        let producer = write_parse::producer(producer).map_err(ApiError::bad_request)?;
        Ok(WriteHeaders { content_type, ttl_secs, expires_at, closed, seq, producer })
    }
}

async fn create(
    req: &HttpRequest,
    state: &web::Data<AppState>,
    stream: &str,
    headers: WriteHeaders,
    fork: Option<fork::ForkRequest>,
    body: &Bytes,
) -> Result<HttpResponse, ApiError> {
    // A stream that would be gone before anybody used it is a client mistake (or a clock far
    // off), not something to create.
    if let Some((raw, ms)) = &headers.expires_at {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        if i128::from(*ms) <= now as i128 {
            return Err(ApiError::bad_request(format!("Stream-Expires-At {raw:?} is in the past")));
        }
    }
    let given = fork::Given {
        content_type: headers.content_type.is_some(),
        lifetime: headers.ttl_secs.is_some() || headers.expires_at.is_some(),
    };
    let mut meta = StreamMeta {
        content_type: write_parse::create_content_type(headers.content_type.as_deref()),
        created: true,
        closed: headers.closed,
        ttl_secs: headers.ttl_secs,
        expires_at: headers.expires_at,
        stream_seq: None,
        created_ms: 0,
        closed_by: None,
        fork: None,
        forks: 0,
        deleted: false,
    };
    let prefix = match fork {
        Some(fork) => fork::prepare(state, stream, fork, given, &mut meta).await?,
        None => None,
    };
    let mut messages = write_parse::messages(meta.framing(), body).map_err(ApiError::bad_request)?;
    if let Some(prefix) = prefix {
        // A byte fork's sub-offset prefix is its first message, before the body's.
        messages.insert(0, prefix);
    }
    let content_type = meta.content_type.clone();
    let context = format!("create of stream {stream:?} failed");
    let engine = &state.engine;
    let outcome = engine
        .write(stream, WriteOp::Create { meta, messages })
        .await
        .map_err(|e| ApiError::from_write(e, engine.epoch(), &context))?;
    let (mut response, tail, closed) = match outcome {
        WriteOutcome::Created { tail, closed } => {
            let mut response = HttpResponse::Created();
            response.insert_header((header::LOCATION, super::request_base(req)? + req.uri().path()));
            (response, tail, closed)
        }
        WriteOutcome::Exists { tail, closed } => (HttpResponse::Ok(), tail, closed),
        other => return Err(unexpected(other)),
    };
    response.content_type(content_type).insert_header((header::CACHE_CONTROL, "no-store"));
    Ok(with_tail(response, state, tail, closed))
}

async fn append(
    state: &web::Data<AppState>,
    stream: &str,
    headers: WriteHeaders,
    body: &Bytes,
) -> Result<HttpResponse, ApiError> {
    let engine = &state.engine;
    if body.is_empty() && !headers.closed {
        return Err(ApiError::bad_request("empty body: an append needs at least one byte (or Stream-Closed: true)"));
    }
    let messages = if body.is_empty() {
        Vec::new()
    } else {
        let Some(content_type) = headers.content_type.as_deref() else {
            return Err(ApiError::bad_request("Content-Type is required with a body"));
        };
        match write_parse::messages(Framing::of(content_type), body) {
            Ok(messages) if !messages.is_empty() => messages,
            // Invalid JSON (or `[]`): a 400, unless the stream would refuse the write anyway
            // (missing, closed, another content type), which the client must learn first.
            bad => {
                let why = bad.err().unwrap_or_else(|| "an empty JSON array appends nothing".into());
                return Err(refusal_before(state, stream, content_type).await?.unwrap_or(ApiError::bad_request(why)));
            }
        }
    };
    let has_body = !messages.is_empty();
    let op = Append {
        content_type: headers.content_type,
        messages,
        seq: headers.seq,
        close: headers.closed,
        producer: headers.producer,
    };
    let context = format!("append to stream {stream:?} failed");
    let outcome = engine
        .write(stream, WriteOp::Append(op))
        .await
        .map_err(|e| ApiError::from_write(e, engine.epoch(), &context))?;
    Ok(match outcome {
        // A producer's append is `200` (its close-only request `204`), echoing its epoch and seq.
        WriteOutcome::Appended { tail, closed, producer: Some((epoch, seq)) } => {
            let mut response = if has_body { HttpResponse::Ok() } else { HttpResponse::NoContent() };
            response
                .insert_header(("Producer-Epoch", epoch.to_string()))
                .insert_header(("Producer-Seq", seq.to_string()));
            with_tail(response, state, tail, closed)
        }
        WriteOutcome::Appended { tail, closed, producer: None } => {
            with_tail(HttpResponse::NoContent(), state, tail, closed)
        }
        // A retry of what is there: the producer's highest accepted seq.
        WriteOutcome::Duplicate { tail, closed, epoch, seq } => {
            let mut response = HttpResponse::NoContent();
            response
                .insert_header(("Producer-Epoch", epoch.to_string()))
                .insert_header(("Producer-Seq", seq.to_string()));
            with_tail(response, state, tail, closed)
        }
        other => return Err(unexpected(other)),
    })
}

/// The answer with the stream's tail after the write (`Stream-Next-Offset`) and its closure.
fn with_tail(mut response: HttpResponseBuilder, state: &AppState, tail: u64, closed: bool) -> HttpResponse {
    response.insert_header(("Stream-Next-Offset", position(state, tail).token()));
    if closed {
        response.insert_header(("Stream-Closed", "true"));
    }
    response.finish()
}

/// The answer the stream would give an append of `content_type` regardless of its body, if
/// it would refuse it (WRITE.md §2.1 ranks these before a malformed body).
async fn refusal_before(
    state: &web::Data<AppState>,
    stream: &str,
    content_type: &str,
) -> Result<Option<ApiError>, ApiError> {
    let engine = &state.engine;
    let (tail, found) = engine.head(stream).await.map_err(|e| ApiError::unavailable(&e, "stream lookup failed"))?;
    let refusal = match found {
        None => Some(crate::writes::Refusal::NotFound),
        Some(meta) if meta.closed => Some(crate::writes::Refusal::Closed { tail: tail.seq }),
        Some(meta) if meta::normalize(&meta.content_type) != meta::normalize(content_type) => {
            Some(crate::writes::Refusal::ContentTypeMismatch)
        }
        Some(_) => None,
    };
    Ok(refusal.map(|r| ApiError::refused(r, engine.epoch())))
}

async fn delete(state: &web::Data<AppState>, stream: &str) -> Result<HttpResponse, ApiError> {
    let engine = &state.engine;
    let context = format!("delete of stream {stream:?} failed");
    let outcome =
        engine.write(stream, WriteOp::Delete).await.map_err(|e| ApiError::from_write(e, engine.epoch(), &context))?;
    if outcome != WriteOutcome::Deleted {
        return Err(unexpected(outcome));
    }
    Ok(HttpResponse::NoContent().finish())
}

fn position(state: &AppState, seq: u64) -> Position {
    Position { epoch: state.engine.epoch(), seq }
}

fn unexpected(outcome: WriteOutcome) -> ApiError {
    log::error!("internal: unexpected write outcome {outcome:?}");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
}
