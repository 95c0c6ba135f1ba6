//! `POST /_broadcast`: AnyCable's HTTP broadcast API, appending to the durable log.

use actix_web::http::{header, Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};

use super::{request_body, ApiError, AppState};
use crate::writes::WriteError;
use crate::{auth, ingest, metrics};

pub async fn handle(
    req: HttpRequest,
    mut payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let result = async {
        if req.method() != Method::POST {
            return Err(("method", ApiError::method_not_allowed("POST")));
        }
        if let Some(key) = &state.broadcast_key {
            let authorization = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
            if !auth::bearer_matches(authorization, key) {
                return Err(("unauthorized", ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized")));
            }
        }
        let limit = usize::try_from(state.config.http_broadcast.max_body).unwrap_or(usize::MAX);
        let body = request_body::read(&req, &mut payload, &state.body_budget, limit, "http_broadcast.max_body")
            .await
            .map_err(request_body::BodyError::into_api)?;
        let broadcast = ingest::parse(&body.bytes).map_err(|e| ("invalid", ApiError::bad_request(e.0)))?;
        Ok((broadcast, body))
    }
    .await;
    // `_body` keeps the body's share of server.max_body_bytes_in_flight until the broadcast
    // is stored: the parsed messages are copies of it.
    let (broadcast, _body) = match result {
        Ok(parsed) => parsed,
        Err((reason, error)) => {
            metrics::get().broadcast_rejected.with_label_values(&[reason]).inc();
            return Err(error);
        }
    };

    let stored = broadcast.stored.len();
    if stored > 0 {
        // The log line of a failure names the streams (built before the messages move on).
        let mut streams: Vec<&str> = broadcast.stored.iter().map(|m| &*m.stream).collect();
        streams.dedup();
        let context = format!("broadcast to {streams:?} not stored");
        // Hands the messages to the writer thread (no blocking here) and waits for the group
        // flush that makes them durable.
        super::subscriptions::append_broadcast(&state, broadcast.stored).await.map_err(|e| match e {
            WriteError::Storage(e) => {
                use crate::storage::StorageError::{BatchTooLarge, MessageTooLarge};
                if let BatchTooLarge(_) | MessageTooLarge { .. } = e {
                    metrics::get().broadcast_rejected.with_label_values(&["too_large"]).inc();
                }
                ApiError::unavailable(&e, &context)
            }
            // A stream the write API made that takes no broadcast (closed, or not JSON):
            // nothing of the batch was stored.
            WriteError::Refused(refusal) => {
                metrics::get().broadcast_rejected.with_label_values(&["conflict"]).inc();
                ApiError::refused(refusal, state.engine.epoch())
            }
        })?;
    }
    deliver_transient(&state, broadcast.transient);
    let m = metrics::get();
    m.broadcasts.inc();
    m.messages_stored.inc_by(stored as u64);
    Ok(HttpResponse::Created().json(serde_json::json!({ "stored": stored })))
}

/// Hands `meta.transient` messages to the live readers of their streams, one JSON array per
/// stream, in order. Nothing is stored, so there is nothing to wait for.
fn deliver_transient(state: &AppState, messages: Vec<crate::storage::NewMessage>) {
    let mut bodies: Vec<(std::sync::Arc<str>, Vec<u8>)> = Vec::new();
    for message in messages {
        let body = match bodies.iter_mut().find(|(stream, _)| *stream == message.stream) {
            Some((_, body)) => {
                body.push(b',');
                body
            }
            None => {
                bodies.push((message.stream, vec![b'[']));
                &mut bodies.last_mut().expect("just pushed").1
            }
        };
        body.extend_from_slice(&message.json);
    }
    for (stream, mut body) in bodies {
        body.push(b']');
        state.engine.deliver_transient(&stream, body.into());
    }
}
