//! The Durable Streams write API on `{ds.path}/{stream}`: `PUT` (create), `POST` (append,
//! close), `DELETE` (PRODUCT.md §13, WRITE.md §1, §2, §4).
//!
//! Everything that depends on the request alone is checked here, before the body is read
//! when possible (method, key, headers) and right after (size, JSON); the checks against the
//! stream (existence, closure, content type, `Stream-Seq`) are the engine's, atomic with the
//! append (`writes.rs`).

use actix_web::http::{header, Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use serde_json::value::RawValue;

use super::{request_body, ApiError, AppState};
use crate::auth;
use crate::meta::{self, Framing, StreamMeta};
use crate::offset::Position;
use crate::writes::{Append, WriteOp, WriteOutcome};

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
    not_yet(req)?;
    let method = req.method();
    if method == Method::DELETE {
        return delete(state, &stream).await;
    }
    let headers = WriteHeaders::parse(req)?;
    let limit = usize::try_from(state.config.ds.max_append_bytes).unwrap_or(usize::MAX);
    let body = request_body::read(req, payload, &state.body_budget, limit, "ds.max_append_bytes")
        .await
        .map_err(|e| e.into_api().1)?;
    if method == Method::PUT {
        create(req, state, &stream, headers, &body.bytes).await
    } else {
        append(state, &stream, headers, &body.bytes).await
    }
}

/// Parts of the protocol that come with the next issue: refused clearly rather than ignored
/// (an ignored producer header would turn a retried write into a duplicate).
fn not_yet(req: &HttpRequest) -> Result<(), ApiError> {
    let unsupported = |what: &str| ApiError::new(StatusCode::NOT_IMPLEMENTED, format!("{what} are not supported yet"));
    let has = |name: &str| req.headers().contains_key(name);
    if has("producer-id") || has("producer-epoch") || has("producer-seq") {
        return Err(unsupported("idempotent producers (Producer-Id, Producer-Epoch, Producer-Seq)"));
    }
    if has("stream-forked-from") || has("stream-fork-offset") || has("stream-fork-sub-offset") {
        return Err(unsupported("forks (Stream-Forked-From)"));
    }
    Ok(())
}

/// The write headers of one request, validated.
struct WriteHeaders {
    /// `Content-Type` as sent (`None`: absent or empty).
    content_type: Option<String>,
    ttl_secs: Option<u64>,
    expires_at: Option<(String, i64)>,
    closed: bool,
    seq: Option<String>,
}

impl WriteHeaders {
    fn parse(req: &HttpRequest) -> Result<WriteHeaders, ApiError> {
        let text = |name: &'static str| -> Result<Option<&str>, ApiError> {
            let mut values = req.headers().get_all(name);
            let Some(value) = values.next() else { return Ok(None) };
            if values.next().is_some() {
                return Err(ApiError::bad_request(format!("{name} is given more than once")));
            }
            value.to_str().map(Some).map_err(|_| ApiError::bad_request(format!("{name} is not visible ASCII")))
        };
        let content_type = text("content-type")?.map(str::trim).filter(|v| !v.is_empty()).map(str::to_string);
        let ttl_secs = text("stream-ttl")?.map(parse_ttl).transpose()?;
        let expires_at = text("stream-expires-at")?.map(parse_expires_at).transpose()?;
        if ttl_secs.is_some() && expires_at.is_some() {
            return Err(ApiError::bad_request("Stream-TTL and Stream-Expires-At cannot both be given"));
        }
        // Present only when `true`, in any case; other values are ignored (PROTOCOL.md §4.1).
        let closed = text("stream-closed")?.is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let seq = match text("stream-seq")? {
            Some("") => return Err(ApiError::bad_request("Stream-Seq must not be empty")),
            seq => seq.map(str::to_string),
        };
        Ok(WriteHeaders { content_type, ttl_secs, expires_at, closed, seq })
    }
}

/// `Stream-TTL`: seconds, digits without a leading zero (`0` itself allowed).
fn parse_ttl(value: &str) -> Result<u64, ApiError> {
    let invalid = || ApiError::bad_request(format!("invalid Stream-TTL {value:?}: use whole seconds, like 3600"));
    let well_formed = value == "0" || (value.bytes().all(|b| b.is_ascii_digit()) && !value.starts_with('0'));
    if value.is_empty() || !well_formed {
        return Err(invalid());
    }
    // At most ten years, as every duration setting: beyond it is a typo or an overflow.
    value.parse::<u64>().ok().filter(|&secs| secs <= 10 * 365 * 24 * 3600).ok_or_else(invalid)
}

/// `Stream-Expires-At`: an RFC 3339 timestamp; kept as given (echoed verbatim) and in ms.
fn parse_expires_at(value: &str) -> Result<(String, i64), ApiError> {
    let parsed =
        time::OffsetDateTime::parse(value.trim(), &time::format_description::well_known::Rfc3339).map_err(|_| {
            ApiError::bad_request(format!("invalid Stream-Expires-At {value:?}: use an RFC 3339 timestamp"))
        })?;
    let ms = i64::try_from(parsed.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
    Ok((value.to_string(), ms))
}

/// A `PUT`'s content type: as given if it looks like `type/subtype`, else the default.
fn create_content_type(given: Option<&str>) -> String {
    let valid = |ct: &str| {
        let essence = ct.split(';').next().unwrap_or("").trim();
        let token =
            |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b));
        essence.split_once('/').is_some_and(|(kind, sub)| token(kind) && token(sub))
    };
    match given {
        Some(ct) if valid(ct) => ct.to_string(),
        _ => meta::DEFAULT_CONTENT_TYPE.to_string(),
    }
}

/// The messages of a body in a stream of `framing`: JSON is validated, compacted and, for a
/// top-level array, flattened one level (each element a message); other types are one
/// message of the bytes as sent. `Err` names the problem.
fn messages(framing: Framing, body: &Bytes) -> Result<Vec<Bytes>, String> {
    if body.is_empty() {
        return Ok(Vec::new());
    }
    if framing == Framing::Raw {
        return Ok(vec![body.clone()]);
    }
    let text = std::str::from_utf8(body).map_err(|_| "body is not UTF-8 JSON".to_string())?;
    let value: &RawValue = serde_json::from_str(text).map_err(|e| format!("body is not valid JSON: {e}"))?;
    if value.get().starts_with('[') {
        let items: Vec<&RawValue> =
            serde_json::from_str(value.get()).map_err(|e| format!("body is not valid JSON: {e}"))?;
        return Ok(items.into_iter().map(|item| Bytes::from(crate::ingest::compact(item.get()))).collect());
    }
    Ok(vec![Bytes::from(crate::ingest::compact(value.get()))])
}

async fn create(
    req: &HttpRequest,
    state: &web::Data<AppState>,
    stream: &str,
    headers: WriteHeaders,
    body: &Bytes,
) -> Result<HttpResponse, ApiError> {
    let meta = StreamMeta {
        content_type: create_content_type(headers.content_type.as_deref()),
        created: true,
        closed: headers.closed,
        ttl_secs: headers.ttl_secs,
        expires_at: headers.expires_at,
        stream_seq: None,
        created_ms: 0,
    };
    let messages = messages(meta.framing(), body).map_err(ApiError::bad_request)?;
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
    response
        .content_type(content_type)
        .insert_header(("Stream-Next-Offset", position(state, tail).token()))
        .insert_header((header::CACHE_CONTROL, "no-store"));
    if closed {
        response.insert_header(("Stream-Closed", "true"));
    }
    Ok(response.finish())
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
        match messages(Framing::of(content_type), body) {
            Ok(messages) if !messages.is_empty() => messages,
            // Invalid JSON (or `[]`): a 400, unless the stream would refuse the write anyway
            // (missing, closed, another content type), which the client must learn first.
            bad => {
                let why = bad.err().unwrap_or_else(|| "an empty JSON array appends nothing".into());
                return Err(refusal_before(state, stream, content_type).await?.unwrap_or(ApiError::bad_request(why)));
            }
        }
    };
    let op = Append { content_type: headers.content_type, messages, seq: headers.seq, close: headers.closed };
    let context = format!("append to stream {stream:?} failed");
    let outcome = engine
        .write(stream, WriteOp::Append(op))
        .await
        .map_err(|e| ApiError::from_write(e, engine.epoch(), &context))?;
    let WriteOutcome::Appended { tail, closed } = outcome else { return Err(unexpected(outcome)) };
    let mut response = HttpResponse::NoContent();
    response.insert_header(("Stream-Next-Offset", position(state, tail).token()));
    if closed {
        response.insert_header(("Stream-Closed", "true"));
    }
    Ok(response.finish())
}

/// The answer the stream would give an append of `content_type` regardless of its body, if
/// it would refuse it (WRITE.md §2.1 ranks these before a malformed body).
async fn refusal_before(
    state: &web::Data<AppState>,
    stream: &str,
    content_type: &str,
) -> Result<Option<ApiError>, ApiError> {
    let engine = &state.engine;
    let head = engine.head(stream).await.map_err(|e| ApiError::unavailable(&e, "stream lookup failed"))?;
    let refusal = match head {
        None => Some(crate::writes::Refusal::NotFound),
        Some((tail, meta)) if meta.closed => Some(crate::writes::Refusal::Closed { tail: tail.seq }),
        Some((_, meta)) if meta::normalize(&meta.content_type) != meta::normalize(content_type) => {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_grammar() {
        for good in ["0", "1", "3600", "315360000"] {
            assert!(parse_ttl(good).is_ok(), "{good}");
        }
        for bad in ["", "abc", "-1", "00060", "+60", "60.5", "1e3", " 60", "315360001", "99999999999999999999999"] {
            assert!(parse_ttl(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn expires_at_takes_rfc3339_with_fractions_and_offsets() {
        assert_eq!(parse_expires_at("2026-01-01T00:00:00Z").unwrap().1, 1_767_225_600_000);
        assert_eq!(parse_expires_at("2026-01-01T00:00:00.250+00:00").unwrap().1, 1_767_225_600_250);
        assert_eq!(parse_expires_at("2026-01-01T01:00:00+01:00").unwrap().1, 1_767_225_600_000);
        for bad in ["not-a-timestamp", "", "2026-01-01", "2026-13-01T00:00:00Z"] {
            assert!(parse_expires_at(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn json_bodies_flatten_one_level_and_compact() {
        let m = |s: &'static str| messages(Framing::Json, &Bytes::from_static(s.as_bytes()));
        assert_eq!(m("[[1, 2], [3,4]]").unwrap(), vec![Bytes::from("[1,2]"), Bytes::from("[3,4]")]);
        assert_eq!(m("[[[1,2,3]]]").unwrap(), vec![Bytes::from("[[1,2,3]]")]);
        assert_eq!(m(" {\"a\" : \"b c\"} ").unwrap(), vec![Bytes::from("{\"a\":\"b c\"}")]);
        assert_eq!(m("null").unwrap(), vec![Bytes::from("null")]);
        assert!(m("[]").unwrap().is_empty());
        assert!(m("{").is_err() && m("[1,]").is_err() && m("1 2").is_err());
        let raw = messages(Framing::Raw, &Bytes::from_static(b"\x00\xff[")).unwrap();
        assert_eq!(raw, vec![Bytes::from_static(b"\x00\xff[")]);
    }

    #[test]
    fn put_content_types_fall_back_to_the_default() {
        assert_eq!(create_content_type(Some("text/plain; charset=utf-8")), "text/plain; charset=utf-8");
        assert_eq!(create_content_type(Some("application/x-protobuf")), "application/x-protobuf");
        for bad in [None, Some("garbage"), Some("/x"), Some("a/"), Some("a b/c")] {
            assert_eq!(create_content_type(bad), meta::DEFAULT_CONTENT_TYPE, "{bad:?}");
        }
    }
}
