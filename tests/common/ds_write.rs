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

/// Producer `id`'s request (`epoch`, `seq`) appending `body` to the `text/plain` stream
/// `stream`.
pub fn produce(
    server: &Server,
    stream: &str,
    id: &str,
    (epoch, seq): (u64, u64),
    body: String,
) -> reqwest::RequestBuilder {
    write(server, reqwest::Method::POST, stream)
        .header("content-type", "text/plain")
        .header("producer-id", id)
        .header("producer-epoch", epoch.to_string())
        .header("producer-seq", seq.to_string())
        .body(body)
}

/// Status, `Producer-Epoch` and `Producer-Seq` of an answer to a producer.
pub fn produced(response: &reqwest::Response) -> (u16, Option<String>, Option<String>) {
    (response.status().as_u16(), header(response, "producer-epoch"), header(response, "producer-seq"))
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
    let status = response.status();
    let body = response.bytes().await.unwrap().to_vec();
    assert_eq!(status, 200, "read of {stream}: {}", String::from_utf8_lossy(&body));
    body
}

/// One round of `writers` concurrent appends to `stream`, all with the same `Stream-Seq`
/// (`round`, zero-padded), sent through `nodes` in turn; their statuses.
pub async fn same_stream_seq(nodes: &[&Server], stream: &str, round: usize, writers: usize) -> Vec<u16> {
    let seq = format!("{round:04}");
    let attempts = (0..writers).map(|i| {
        write(nodes[i % nodes.len()], reqwest::Method::POST, stream)
            .header("content-type", "text/plain")
            .header("stream-seq", seq.as_str())
            .body(format!("{round}.{i};"))
            .send()
    });
    futures_util::future::join_all(attempts).await.into_iter().map(|r| r.unwrap().status().as_u16()).collect()
}

/// `secs` since the Unix epoch as RFC 3339 (UTC), without a date library.
pub fn rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}
