//! A `PUT` with `Stream-Forked-From` (WRITE.md §5.1): its headers, and what the fork takes
//! from its source before the engine makes it (content type, lifetime, fork point, the
//! prefix of a byte stream's sub-offset). The engine checks the source again, atomically
//! with the fork's creation (`storage/writer/forks.rs`); the checks here give the answers in
//! the order the protocol ranks them.

use actix_web::{web, HttpRequest};
use bytes::Bytes;

use super::{ApiError, AppState};
use crate::forks;
use crate::meta::{normalize, ForkOf, Framing, StreamMeta};
use crate::offset::{Offset, Position};
use crate::writes::Refusal;

/// The fork headers of a `PUT`.
pub(super) struct ForkRequest {
    source: String,
    /// `Stream-Fork-Offset` (0: the zero token); `None`: the source's tail.
    anchor: Option<u64>,
    /// `Stream-Fork-Sub-Offset` (0 when absent).
    sub: u64,
}

/// What the request itself set, so a fork takes the rest from its source.
pub(super) struct Given {
    pub(super) content_type: bool,
    pub(super) lifetime: bool,
}

impl ForkRequest {
    /// `None` for a plain `PUT`; fork headers without `Stream-Forked-From` are a `400`.
    pub(super) fn parse(req: &HttpRequest, state: &AppState) -> Result<Option<ForkRequest>, ApiError> {
        let text = |name| super::write::header_text(req, name);
        let anchor = text("stream-fork-offset")?
            .map(|value| forks::fork_offset(value.trim(), state.engine.epoch()))
            .transpose()
            .map_err(ApiError::bad_request)?;
        let sub = text("stream-fork-sub-offset")?;
        let Some(from) = text("stream-forked-from")? else {
            if sub.is_some() || anchor.is_some() {
                let which = if sub.is_some() { "Stream-Fork-Sub-Offset" } else { "Stream-Fork-Offset" };
                return Err(ApiError::bad_request(format!("{which} needs Stream-Forked-From")));
            }
            return Ok(None);
        };
        let sub = sub.map(forks::sub_offset).transpose().map_err(ApiError::bad_request)?.unwrap_or(0);
        let source = forks::source_name(from, &state.config.ds.path).map_err(ApiError::bad_request)?;
        Ok(Some(ForkRequest { source, anchor, sub }))
    }
}

/// Fills `meta` for the fork and returns the byte prefix its sub-offset cuts, if any (the
/// fork's first message).
pub(super) async fn prepare(
    state: &web::Data<AppState>,
    stream: &str,
    request: ForkRequest,
    given: Given,
    meta: &mut StreamMeta,
) -> Result<Option<Bytes>, ApiError> {
    let engine = &state.engine;
    let epoch = engine.epoch();
    let lookup = |e| ApiError::from_write(crate::writes::WriteError::Storage(e), epoch, "stream lookup failed");
    let refused = |refusal| ApiError::refused(refusal, epoch);
    // The target first: a re-`PUT` is compared before anything about the source (§5.6), and
    // what it omits is what the fork has.
    if let (_, Some(existing)) = engine.head(stream).await.map_err(lookup)? {
        if !given.content_type {
            meta.content_type.clone_from(&existing.content_type);
        }
        if !given.lifetime {
            meta.ttl_secs = existing.ttl_secs;
            meta.expires_at.clone_from(&existing.expires_at);
        }
        let anchor = request.anchor.or(existing.fork.as_ref().map(|f| f.anchor)).unwrap_or(0);
        meta.fork = Some(Box::new(ForkOf { source: request.source, at: 0, anchor, sub: request.sub }));
        return Ok(None);
    }
    let (tail, source) = engine.head(&request.source).await.map_err(lookup)?;
    let source = match source {
        None => return Err(refused(Refusal::ForkSourceNotFound)),
        Some(source) if source.deleted => return Err(refused(Refusal::ForkSourceDeleted)),
        Some(source) => source,
    };
    if !given.content_type {
        meta.content_type.clone_from(&source.content_type);
    } else if normalize(&meta.content_type) != normalize(&source.content_type) {
        return Err(refused(Refusal::ContentTypeMismatch));
    }
    if !given.lifetime {
        meta.ttl_secs = source.ttl_secs;
        meta.expires_at.clone_from(&source.expires_at);
    }
    let anchor = request.anchor.unwrap_or(tail.seq);
    if anchor > tail.seq {
        let why = format!("past the source's tail {}", tail.token());
        return Err(refused(Refusal::ForkOffset(why)));
    }
    let mut prefix = None;
    if request.sub > 0 && meta.framing() == Framing::Raw {
        // The first `sub` bytes of the message after the fork offset.
        let from = if anchor == 0 { Offset::Start } else { Offset::At(Position { epoch, seq: anchor }) };
        let chunk = engine.read(&request.source, from, 1).await.map_err(|e| match e {
            crate::storage::ReadError::Storage(e) => lookup(e),
            gone => refused(Refusal::ForkOffset(gone.to_string())),
        })?;
        if chunk.count == 0 {
            return Err(refused(Refusal::ForkSubOffset(format!(
                "{} bytes: no data after the fork offset",
                request.sub
            ))));
        }
        prefix =
            Some(forks::byte_prefix(&chunk.body, request.sub).map_err(|why| refused(Refusal::ForkSubOffset(why)))?);
    }
    meta.fork = Some(Box::new(ForkOf { source: request.source, at: 0, anchor, sub: request.sub }));
    Ok(prefix)
}
