//! Health and metrics endpoints.

use actix_web::http::Method;
use actix_web::{web, HttpRequest, HttpResponse};

use super::{ApiError, AppState};
use crate::engine::Health;
use crate::metrics;

pub async fn health(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Err(ApiError::method_not_allowed("GET, HEAD"));
    }
    // Storage is opened before the listener binds, so answering at all means it is open; it
    // is writable until a write or flush fails.
    match state.engine.health() {
        Health::Ready => Ok(HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))),
        Health::NotReady(why) => Ok(HttpResponse::ServiceUnavailable().json(serde_json::json!({ "status": why }))),
    }
}

pub async fn metrics(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    if req.method() != Method::GET {
        return Err(ApiError::method_not_allowed("GET"));
    }
    let m = metrics::get();
    m.unsent_bytes.set(super::body::unsent_bytes() as i64);
    state.engine.refresh_metrics().await;
    Ok(HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(metrics::render()))
}
