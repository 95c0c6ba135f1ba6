//! Every error answer is JSON (PRODUCT.md): `{"error": "..."}`.
//!
//! Our handlers answer errors through [`ApiError`](super::ApiError) already. This middleware
//! catches the rest, made by middleware we do not own: actix-cors refuses a preflight with a
//! plain-text body (`Origin is not allowed to make this request`), and an error returned
//! instead of a response gets actix's plain-text rendering. It sits outside CORS and inside
//! the default headers, so the JSON answer still gets those. Errors of the HTTP/1 dispatcher
//! itself (a request head too large, a malformed request) never reach the application: the
//! actix-http patch gives them JSON bodies (docs/DECISIONS.md).

use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::error::InternalError;
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::Next;
use actix_web::HttpResponse;

/// Longest plain-text error body kept as the JSON error's text.
const MAX_TEXT: u64 = 1024;

/// The middleware, boxed. actix keeps the outermost middleware's future inline in each
/// connection's state for the connection's whole life; this one's (it holds the response
/// across an await) made every connection 640 bytes bigger, an idle SSE one included. Boxed,
/// it takes 16 bytes there, and its heap part is freed once the response head is out.
pub fn json_errors(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> futures_util::future::LocalBoxFuture<'static, Result<ServiceResponse<BoxBody>, actix_web::Error>> {
    Box::pin(answer_json_errors(req, next))
}

async fn answer_json_errors(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let response = match next.call(req).await {
        Ok(response) => response.map_into_boxed_body(),
        // An error instead of a response: the same error, rendered as JSON wherever it is
        // turned into a response. (The request cannot be kept to build a response here: a
        // clone held across the call would break actix's routing, which needs it unshared.)
        Err(error) => {
            let status = error.as_response_error().status_code();
            let message = error.to_string();
            let answer = HttpResponse::build(status).json(serde_json::json!({ "error": message }));
            return Err(InternalError::from_response(message, answer).into());
        }
    };
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return Ok(response);
    }
    // A small plain-text error body becomes the JSON's text; anything else, the status.
    let (request, answer) = response.into_parts();
    let (mut answer, body) = answer.into_parts();
    let text = match body.size() {
        BodySize::Sized(len) if len > 0 && len <= MAX_TEXT => {
            actix_web::body::to_bytes(body).await.ok().and_then(|b| String::from_utf8(b.to_vec()).ok())
        }
        _ => None,
    };
    let text = text
        .filter(|t| !t.trim().is_empty())
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("error").to_ascii_lowercase());
    let body = serde_json::json!({ "error": text.trim() }).to_string();
    answer.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let answer = answer.set_body(BoxBody::new(body));
    Ok(ServiceResponse::new(request, answer))
}
