//! Requests of the Durable Streams write API (`PUT`, `POST`, `DELETE`) with the test
//! broadcast key, for the suites that write (`tests/write.rs`, `tests/cluster_writes.rs`).

use serde_json::Value;

use super::{header, Server, KEY};

/// A write request with the broadcast key.
pub fn write(server: &Server, method: reqwest::Method, stream: &str) -> reqwest::RequestBuilder {
    server.client.request(method, server.ds(stream)).bearer_auth(KEY)
}

pub async fn put(server: &Server, stream: &str, content_type: &str, body: &'static [u8]) -> reqwest::Response {
    write(server, reqwest::Method::PUT, stream).header("content-type", content_type).body(body).send().await.unwrap()
}

pub async fn post(server: &Server, stream: &str, content_type: &str, body: Vec<u8>) -> reqwest::Response {
    write(server, reqwest::Method::POST, stream).header("content-type", content_type).body(body).send().await.unwrap()
}

pub async fn close(server: &Server, stream: &str) -> reqwest::Response {
    write(server, reqwest::Method::POST, stream).header("stream-closed", "true").send().await.unwrap()
}

/// Status and JSON error of a refused request.
pub async fn refused(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    assert_eq!(header(&response, "content-type").as_deref(), Some("application/json"), "{status}");
    let body: Value = response.json().await.unwrap();
    (status, body["error"].as_str().expect("an error message").to_string())
}

/// The raw bytes of a catch-up read from the start.
pub async fn bytes(server: &Server, stream: &str) -> Vec<u8> {
    let response = server.get(&format!("{stream}?offset=-1")).await;
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap().to_vec()
}
