//! Request bodies (broadcasts today, `PUT`/`POST` appends of the write API later), read with a
//! deadline and within one budget for all connections.
//!
//! Without them, a client that sends most of a body and stalls holds what it sent for as long
//! as it keeps the connection open, and enough such clients hold any amount of memory (300
//! connections stalled 1 MB into a 1 MiB broadcast held 350 MB for good). So:
//! - a body must arrive in full within `server.body_timeout` seconds of its request's
//!   headers: then `408` and the connection is closed (its unread rest cannot be skipped);
//! - the bytes of all bodies being received or held (`server.max_body_bytes_in_flight`) are
//!   bounded: a request takes its declared `Content-Length` from the budget before reading a
//!   byte, a chunked one takes each piece as it arrives, and the share goes back when the
//!   request is done with its body. A request that does not fit gets `503` + `Retry-After`
//!   (it may well succeed a moment later) and its connection is closed.
//!
//! The deadline is a timer around our own reading of the payload: actix polls the handler
//! when the timer fires whether or not the client sends anything (unlike a response body,
//! which is only polled while the client reads: PITFALLS.md).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest};
use futures_util::StreamExt;

use super::ApiError;
use crate::metrics;

/// The shared budget of request body bytes; cheap to clone.
#[derive(Clone)]
pub struct BodyBudget {
    inner: Arc<Inner>,
}

struct Inner {
    max: usize,
    used: AtomicUsize,
    timeout: Duration,
}

impl BodyBudget {
    pub fn new(max: u64, timeout: Duration) -> BodyBudget {
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        metrics::get().body_capacity.set(i64::try_from(max).unwrap_or(i64::MAX));
        BodyBudget { inner: Arc::new(Inner { max, used: AtomicUsize::new(0), timeout }) }
    }

    /// Takes `bytes` from the budget, or `false` when they do not fit.
    fn take(&self, bytes: usize) -> bool {
        let inner = &self.inner;
        let fits = inner
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&total| total <= inner.max)
            })
            .is_ok();
        if fits {
            metrics::get().body_bytes.add(bytes as i64);
        }
        fits
    }

    fn give_back(&self, bytes: usize) {
        self.inner.used.fetch_sub(bytes, Ordering::AcqRel);
        metrics::get().body_bytes.sub(bytes as i64);
    }
}

/// A body read in full, with its share of the budget: keep it while the body (or what is
/// parsed from it) is held.
pub struct Body {
    pub bytes: web::Bytes,
    _share: Share,
}

/// Bytes taken from the budget, given back on drop.
struct Share {
    budget: BodyBudget,
    bytes: usize,
}

impl Share {
    fn grow(&mut self, bytes: usize) -> bool {
        let fits = self.budget.take(bytes);
        if fits {
            self.bytes += bytes;
        }
        fits
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

/// Why a body was not read; each is an answer for the client ([`BodyError::into_api`]).
#[derive(Debug)]
pub enum BodyError {
    /// Over `limit` bytes (declared or sent): `413`.
    TooLarge { limit: usize, what: &'static str },
    /// Not in full within `server.body_timeout`: `408`, connection closed.
    Timeout(Duration),
    /// `server.max_body_bytes_in_flight` is taken: `503`, connection closed.
    Busy,
    /// The client broke off or sent a malformed body encoding: `400`.
    Read(String),
}

impl BodyError {
    /// The metric label (`broadcast_rejected_total{reason}`) and the answer.
    pub fn into_api(self) -> (&'static str, ApiError) {
        match self {
            BodyError::TooLarge { limit, what } => (
                "too_large",
                // Closed: the rest of the body is not waited for.
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("body is larger than {limit} bytes ({what})"))
                    .closing(),
            ),
            BodyError::Timeout(timeout) => (
                "timeout",
                ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("body did not arrive in full within {} s (server.body_timeout)", timeout.as_secs()),
                )
                .closing(),
            ),
            BodyError::Busy => (
                "busy",
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "too many request bodies in flight (server.max_body_bytes_in_flight), retry later",
                )
                .closing(),
            ),
            BodyError::Read(e) => ("body", ApiError::bad_request(format!("cannot read body: {e}"))),
        }
    }
}

/// Reads `payload` in full: at most `limit` bytes (`what` names the limit's setting), within
/// `server.body_timeout`, within the shared budget.
pub async fn read(
    req: &HttpRequest,
    payload: &mut web::Payload,
    budget: &BodyBudget,
    limit: usize,
    what: &'static str,
) -> Result<Body, BodyError> {
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(BodyError::TooLarge { limit, what });
    }
    // The declared length up front: what the body will hold once it has arrived.
    let mut share = Share { budget: budget.clone(), bytes: 0 };
    let declared = declared.map_or(0, |len| len as usize);
    if !share.grow(declared) {
        metrics::get().body_refused.inc();
        return Err(BodyError::Busy);
    }
    let timeout = budget.inner.timeout;
    let reading = async {
        let mut body = web::BytesMut::with_capacity(declared);
        while let Some(piece) = payload.next().await {
            let piece = piece.map_err(|e| BodyError::Read(e.to_string()))?;
            if body.len() + piece.len() > limit {
                return Err(BodyError::TooLarge { limit, what });
            }
            // Past the declared length (chunked, or none declared): take as it arrives.
            let beyond = (body.len() + piece.len()).saturating_sub(share.bytes);
            if beyond > 0 && !share.grow(beyond) {
                metrics::get().body_refused.inc();
                return Err(BodyError::Busy);
            }
            body.extend_from_slice(&piece);
        }
        Ok(body.freeze())
    };
    match tokio::time::timeout(timeout, reading).await {
        Ok(Ok(bytes)) => Ok(Body { bytes, _share: share }),
        Ok(Err(e)) => Err(e),
        Err(_elapsed) => {
            metrics::get().body_timeouts.inc();
            Err(BodyError::Timeout(timeout))
        }
    }
}
