//! CORS (spec §7): allowed origins with `*.suffix` wildcards, the headers browsers may send
//! and read, credentials only for listed origins.
//!
//! actix-cors handles requests that carry an `Origin` (every browser cross-origin request
//! and preflight does). Requests without one (servers, CLIs, same-origin pages that send no
//! `Origin`) bypass it ([`CrossOrigin`]): actix-cors would still add its
//! `Access-Control-Expose-Headers` (13 names, about 250 bytes, joined anew for every
//! response) and a three-name `Vary`, which only a browser reading a cross-origin response
//! uses. Such a response gets `Vary: Origin` alone, so a shared cache never hands it to a
//! cross-origin request that needs the allow headers.

use std::rc::Rc;
use std::sync::Arc;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::Method;
use actix_web::Error;
use futures_util::future::LocalBoxFuture;

use crate::config::Config;

/// Request headers a browser may send to DS endpoints (reads, and the write API's).
pub const CORS_ALLOWED_HEADERS: [&str; 16] = [
    "x-signed",
    "x-jid",
    "if-none-match",
    "last-event-id",
    "content-type",
    "authorization",
    "stream-seq",
    "stream-ttl",
    "stream-expires-at",
    "stream-closed",
    "producer-id",
    "producer-epoch",
    "producer-seq",
    "stream-forked-from",
    "stream-fork-offset",
    "stream-fork-sub-offset",
];
/// Response headers a browser client must be able to read.
pub const CORS_EXPOSED_HEADERS: [&str; 13] = [
    "stream-next-offset",
    "stream-cursor",
    "stream-up-to-date",
    "stream-closed",
    "etag",
    "location",
    "stream-ttl",
    "stream-expires-at",
    "stream-sse-data-encoding",
    "producer-epoch",
    "producer-seq",
    "producer-expected-seq",
    "producer-received-seq",
];

/// CORS per spec §7: allowed origins with `*.suffix` wildcards (empty list = any origin); a
/// foreign origin simply gets no allow header.
pub fn cors(config: &Config) -> actix_cors::Cors {
    let origins: Arc<Vec<String>> = Arc::new(
        config
            .server
            .allowed_origins
            .split(',')
            .map(|o| o.trim().to_ascii_lowercase())
            .filter(|o| !o.is_empty())
            .collect(),
    );
    let mut allowed_headers: Vec<String> = CORS_ALLOWED_HEADERS.iter().map(|h| h.to_string()).collect();
    let jwt_header = format!("x-{}", config.jwt.param.to_ascii_lowercase());
    if !allowed_headers.contains(&jwt_header) {
        allowed_headers.push(jwt_header);
    }
    actix_cors::Cors::default()
        .allowed_origin_fn(move |origin, _| origin_allowed(&origins, origin))
        .allowed_methods(if config.ds.writes {
            vec![Method::GET, Method::HEAD, Method::OPTIONS, Method::PUT, Method::POST, Method::DELETE]
        } else {
            vec![Method::GET, Method::HEAD, Method::OPTIONS]
        })
        .allowed_headers(allowed_headers.iter().map(|h| {
            header::HeaderName::try_from(h.as_str()).expect("fixed names, and jwt.param is validated as [A-Za-z0-9_-]+")
        }))
        .expose_headers(CORS_EXPOSED_HEADERS)
        .max_age(86_400)
        .block_on_origin_mismatch(false)
}

fn origin_allowed(allowed: &[String], origin: &HeaderValue) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.to_ascii_lowercase();
    let host = origin.split_once("://").map_or(origin.as_str(), |(_, host)| host);
    allowed.iter().any(|pattern| match pattern.strip_prefix("*.") {
        Some(suffix) => host.strip_suffix(suffix).is_some_and(|sub| sub.ends_with('.') && sub.len() > 1),
        None => {
            let pattern_host = pattern.split_once("://").map_or(pattern.as_str(), |(_, host)| host);
            if pattern.contains("://") {
                *pattern == origin
            } else {
                pattern_host == host
            }
        }
    })
}

/// Whether browsers may send credentials (cookies) to this server: only when
/// `server.allowed_origins` lists origins. With an empty list ("any origin") every page on the
/// web could read a logged-in user's streams (spec §7).
pub fn allows_credentials(config: &Config) -> bool {
    !config.server.allowed_origins.trim().is_empty()
}

/// `Access-Control-Allow-Credentials: true` on responses that name an allowed origin, so a
/// page there can read with its cookies (RPC authentication). Installed only when
/// [`allows_credentials`]; actix-cors would add the header to every response, those to
/// origins it refused included, so it is added here instead.
pub async fn credentials(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody>,
) -> Result<actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>, actix_web::Error> {
    let mut response = next.call(req).await?;
    let headers = response.headers_mut();
    if headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// actix-cors for requests with an `Origin`; the rest go straight to the app (module docs).
pub struct CrossOrigin(pub actix_cors::Cors);

impl<S, B> Transform<S, ServiceRequest> for CrossOrigin
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Transform = CrossOriginMiddleware<S>;
    type InitError = ();
    type Future = LocalBoxFuture<'static, Result<Self::Transform, ()>>;

    fn new_transform(&self, service: S) -> Self::Future {
        let app = Rc::new(service);
        let cors = self.0.new_transform(Shared(app.clone()));
        Box::pin(async move { Ok(CrossOriginMiddleware { app, cors: cors.await? }) })
    }
}

/// The app's service, shared by the path through actix-cors and the one around it.
pub struct Shared<S>(Rc<S>);

impl<S: Service<ServiceRequest>> Service<ServiceRequest> for Shared<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&self, req: ServiceRequest) -> Self::Future {
        self.0.call(req)
    }
}

pub struct CrossOriginMiddleware<S> {
    app: Rc<S>,
    cors: actix_cors::CorsMiddleware<Shared<S>>,
}

impl<S, B> Service<ServiceRequest> for CrossOriginMiddleware<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = Error;
    type Future = LocalBoxFuture<'static, Result<Self::Response, Error>>;

    actix_web::dev::forward_ready!(app);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        if req.headers().contains_key(header::ORIGIN) {
            return Box::pin(self.cors.call(req));
        }
        let response = self.app.call(req);
        Box::pin(async move {
            let mut response = response.await?;
            // Appended: a credentialed read's own `Vary` stays.
            response.headers_mut().append(header::VARY, HeaderValue::from_static("Origin"));
            Ok(response.map_into_left_body())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_match_exactly_or_by_suffix_wildcard() {
        let allowed: Vec<String> = vec!["*.example.com".into(), "https://app.test".into(), "localhost:3000".into()];
        let ok = |o: &str| origin_allowed(&allowed, &HeaderValue::from_str(o).unwrap());
        assert!(ok("https://a.example.com"));
        assert!(ok("http://x.y.example.com"));
        assert!(!ok("https://example.com"));
        assert!(!ok("https://badexample.com"));
        assert!(ok("https://app.test"));
        assert!(!ok("http://app.test"));
        assert!(ok("http://localhost:3000"));
        assert!(!ok("http://localhost:3001"));
        assert!(origin_allowed(&[], &HeaderValue::from_static("https://any.where")));
    }
}
