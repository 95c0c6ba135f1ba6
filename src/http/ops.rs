//! Health and metrics endpoints.

use actix_web::http::Method;
use actix_web::{web, HttpRequest, HttpResponse};

use super::{ApiError, AppState};
use crate::metrics;

pub async fn health(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Err(ApiError::method_not_allowed("GET, HEAD"));
    }
    // Storage is opened before the listener binds, so answering at all means it is open; it
    // is writable until a write or flush fails.
    if state.storage.is_writable() {
        Ok(HttpResponse::Ok().json(serde_json::json!({ "status": "ok" })))
    } else {
        Ok(HttpResponse::ServiceUnavailable().json(serde_json::json!({ "status": "storage_failed" })))
    }
}

pub async fn metrics(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    if req.method() != Method::GET {
        return Err(ApiError::method_not_allowed("GET"));
    }
    let m = metrics::get();
    m.streams_loaded.set(state.storage.streams_loaded() as i64);
    m.streams_total.set(state.storage.streams_created() as i64);
    m.hub_streams.set(state.storage.hub().streams_watched() as i64);
    m.transient_bytes.set(state.storage.hub().transient_bytes() as i64);
    m.writer_queue_bytes.set(state.storage.queued_bytes() as i64);
    m.read_cache_bytes.set(state.storage.read_cache_bytes() as i64);
    m.unsent_bytes.set(super::body::unsent_bytes() as i64);
    let storage = state.storage.clone();
    let size = web::block(move || storage.size_on_disk()).await.unwrap_or(0);
    m.storage_bytes.set(size as i64);
    Ok(HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(metrics::render()))
}
