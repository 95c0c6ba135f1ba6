//! The reserved subscription API under `{ds.path}/__ds/` (PRODUCT.md §13, WRITE.md §6).
//! Routed before stream operations: nothing under `__ds/` ever reads or writes a stream.
//!
//! Who may call what (docs/DECISIONS.md, "Subscriptions"):
//! - managing subscriptions (`PUT`/`GET`/`DELETE subscriptions/:id`, `…/streams`) and
//!   claiming a pull-wake: the write API's key (`Authorization: Bearer <broadcast key>` when
//!   one is in force), as `PUT`/`POST` on streams;
//! - `…/callback`, `…/ack`, `…/release`: the wake's own token (`Bearer <token>`);
//! - `jwks.json`: anyone (public keys).

// The helpers here answer early with a finished response as their error: it lives for one
// request, so its size does not matter.
#![allow(clippy::result_large_err)]

use actix_web::http::{header, Method, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use serde_json::{json, Value};

use super::{request_body, ApiError, AppState};
use crate::storage::NewMessage;
use crate::subscriptions::model::{self, Kind, Spec};
use crate::subscriptions::SubError;
use crate::writes::WriteError;
use crate::{auth, metrics};

/// Largest body of a subscription API request.
const MAX_BODY: usize = 64 * 1024;

/// The append hook of `PUT`/`POST` on a stream: a write that stored data wakes the
/// subscriptions that follow the stream.
pub fn written(state: &AppState, stream: &str, body: &[u8], result: &Result<HttpResponse, ApiError>) {
    if let (Some(subscriptions), false, Ok(_)) = (&state.subscriptions, body.is_empty(), result) {
        subscriptions.appended(stream);
    }
}

/// A broadcast's append, and then the append hook for each stream it stored to.
pub async fn append_broadcast(state: &AppState, messages: Vec<NewMessage>) -> Result<(), WriteError> {
    let Some(subscriptions) = &state.subscriptions else { return state.engine.append(messages).await };
    let mut streams: Vec<std::sync::Arc<str>> = messages.iter().map(|m| m.stream.clone()).collect();
    streams.sort();
    streams.dedup();
    state.engine.append(messages).await?;
    for stream in &streams {
        subscriptions.appended(stream);
    }
    Ok(())
}

fn error(e: SubError) -> HttpResponse {
    let mut object = json!({ "code": e.code, "message": e.message });
    if let (Some(extra), Some(map)) = (e.extra, object.as_object_mut()) {
        if let Some(fields) = extra.as_object() {
            map.extend(fields.clone());
        }
    }
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = HttpResponse::build(status);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.insert_header((header::RETRY_AFTER, "1"));
    }
    response.json(json!({ "error": object }))
}

fn method_not_allowed(allow: &'static str) -> HttpResponse {
    let mut response = error(SubError::new(405, "METHOD_NOT_ALLOWED", "method not allowed"));
    response.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static(allow));
    response
}

/// Everything under `{ds.path}/__ds/`.
pub async fn handle(req: HttpRequest, mut payload: web::Payload, state: web::Data<AppState>) -> HttpResponse {
    let result = route(&req, &mut payload, &state).await;
    let response = result.unwrap_or_else(|e| e);
    metrics::get().requests.with_label_values(&["subscriptions", response.status().as_str()]).inc();
    response
}

async fn route(req: &HttpRequest, payload: &mut web::Payload, state: &AppState) -> Result<HttpResponse, HttpResponse> {
    let Some(subscriptions) = state.subscriptions.clone() else {
        return Err(error(SubError::new(404, "NOT_FOUND", "the subscription API is off (ds.writes = false)")));
    };
    let prefix = format!("{}/__ds/", state.config.ds.path.trim_end_matches('/'));
    let rest = req.uri().path().strip_prefix(prefix.as_str()).unwrap_or("");
    let method = req.method().clone();
    if rest == "jwks.json" {
        if method != Method::GET && method != Method::HEAD {
            return Err(method_not_allowed("GET, HEAD"));
        }
        return Ok(HttpResponse::Ok()
            .content_type("application/jwk-set+json")
            .insert_header((header::CACHE_CONTROL, "public, max-age=300"))
            .body(subscriptions.signer().jwks().to_string()));
    }
    let not_found = || error(SubError::new(404, "NOT_FOUND", "no such subscription API endpoint"));
    let rest = rest.strip_prefix("subscriptions/").ok_or_else(not_found)?;
    let (raw_id, action) = rest.split_once('/').unwrap_or((rest, ""));
    let id = percent_encoding::percent_decode_str(raw_id)
        .decode_utf8()
        .ok()
        .filter(|id| model::valid_id(id))
        .ok_or_else(|| {
            error(SubError::invalid("invalid subscription id (1 to 256 bytes of UTF-8, no control characters)"))
        })?
        .into_owned();
    let bearer = || {
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
    };
    let managed = |state: &AppState| -> Result<(), HttpResponse> {
        match &state.broadcast_key {
            Some(key)
                if !auth::bearer_matches(
                    req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()),
                    key,
                ) =>
            {
                Err(error(SubError::new(401, "UNAUTHORIZED", "the write API key is required")))
            }
            _ => Ok(()),
        }
    };
    let wake_token = || {
        bearer()
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .ok_or_else(|| error(SubError::new(401, "TOKEN_INVALID", "Authorization: Bearer <token> is required")))
    };
    match (action, &method) {
        ("", &Method::PUT) => {
            managed(state)?;
            let body = json_body(req, payload, state).await?;
            let spec = Spec::parse(&body).map_err(|e| error(SubError::invalid(e)))?;
            let base =
                super::request_base(req).map_err(|e| e.error_response())? + state.config.ds.path.trim_end_matches('/');
            let created = subscriptions.put(&id, spec, base).await.map_err(error)?;
            let status = if created.created { StatusCode::CREATED } else { StatusCode::OK };
            Ok(HttpResponse::build(status).json(subscriptions.view(&created.record)))
        }
        ("", &Method::GET) => {
            managed(state)?;
            let record = subscriptions.get(&id).await.map_err(error)?;
            Ok(HttpResponse::Ok().json(subscriptions.view(&record)))
        }
        ("", &Method::DELETE) => {
            managed(state)?;
            subscriptions.delete(&id).await.map_err(error)?;
            Ok(HttpResponse::NoContent().finish())
        }
        ("", _) => Err(method_not_allowed("GET, PUT, DELETE")),
        ("streams", &Method::POST) => {
            managed(state)?;
            let body = json_body(req, payload, state).await?;
            let streams = body
                .get("streams")
                .and_then(Value::as_array)
                .filter(|s| !s.is_empty() && s.len() <= model::MAX_LINKS)
                .ok_or_else(|| error(SubError::invalid("streams must be a non-empty array of stream paths")))?
                .iter()
                .map(|s| {
                    s.as_str()
                        .ok_or("streams must hold strings".to_string())
                        .and_then(|s| model::stream_path(s, "streams"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| error(SubError::invalid(e)))?;
            subscriptions.add_streams(&id, streams).await.map_err(error)?;
            Ok(HttpResponse::NoContent().finish())
        }
        ("streams", _) => Err(method_not_allowed("POST")),
        (action, &Method::DELETE) if action.starts_with("streams/") => {
            managed(state)?;
            let raw = &action["streams/".len()..];
            let path = percent_encoding::percent_decode_str(raw)
                .decode_utf8()
                .map_err(|_| error(SubError::invalid("the stream path is not UTF-8")))?;
            let path = model::stream_path(&path, "stream").map_err(|e| error(SubError::invalid(e)))?;
            subscriptions.remove_stream(&id, &path).await.map_err(error)?;
            Ok(HttpResponse::NoContent().finish())
        }
        (action, _) if action.starts_with("streams/") => Err(method_not_allowed("DELETE")),
        ("callback" | "ack" | "release" | "claim", m) if m != Method::POST => Err(method_not_allowed("POST")),
        ("callback", _) => {
            let token = wake_token()?;
            let body = json_body(req, payload, state).await?;
            let answer = subscriptions.acknowledge(&id, Kind::Webhook, &token, &body).await.map_err(error)?;
            Ok(HttpResponse::Ok().json(answer))
        }
        ("ack", _) => {
            let token = wake_token()?;
            let body = json_body(req, payload, state).await?;
            let answer = subscriptions.acknowledge(&id, Kind::PullWake, &token, &body).await.map_err(error)?;
            Ok(HttpResponse::Ok().json(answer))
        }
        ("release", _) => {
            let token = wake_token()?;
            let body = json_body(req, payload, state).await?;
            subscriptions.release(&id, &token, &body).await.map_err(error)?;
            Ok(HttpResponse::NoContent().finish())
        }
        ("claim", _) => {
            managed(state)?;
            let body = json_body(req, payload, state).await?;
            let worker = body
                .get("worker")
                .and_then(Value::as_str)
                .filter(|w| model::valid_id(w))
                .ok_or_else(|| error(SubError::invalid("worker must be a string of 1 to 256 bytes")))?;
            let answer = subscriptions.claim(&id, worker).await.map_err(error)?;
            Ok(HttpResponse::Ok().json(answer))
        }
        _ => Err(not_found()),
    }
}

/// The request's JSON body (`{}` when empty).
async fn json_body(req: &HttpRequest, payload: &mut web::Payload, state: &AppState) -> Result<Value, HttpResponse> {
    let body = request_body::read(req, payload, &state.body_budget, MAX_BODY, "the subscription API's 64 KiB")
        .await
        .map_err(|e| e.into_api().1.error_response())?;
    if body.bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(&body.bytes).map_err(|e| error(SubError::invalid(format!("invalid JSON body: {e}"))))
}
