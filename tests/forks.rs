//! Forks (WRITE.md §5) as a user meets them: chains of forks read through every level while
//! every level takes appends, deletion in every order (soft delete, cascading removal, and
//! the storage a removed chain used measured gone), reference counts across `kill -9`, expiry
//! releasing a source, and hostile fork headers. The protocol's fine print is the official
//! conformance suite's (`tests/conformance`).

mod common;

use std::time::Duration;

use common::ds_write::{bytes, post, put, refused, write};
use common::{header, temp_dir, Server};

/// The protocol's reading of a stream that is gone, `404` (AnyCable's default reads it as
/// empty): these tests are about streams going.
const NO_IMPLICIT: [&str; 2] = ["--ds_implicit_streams", "false"];

/// `PUT` of a fork of `source` (at `offset`, the source's tail when `None`).
async fn fork(server: &Server, name: &str, source: &str, offset: Option<&str>) -> reqwest::Response {
    let mut request = write(server, reqwest::Method::PUT, name).header("stream-forked-from", format!("/ds/{source}"));
    if let Some(offset) = offset {
        request = request.header("stream-fork-offset", offset);
    }
    request.send().await.unwrap()
}

async fn status(server: &Server, method: reqwest::Method, stream: &str) -> u16 {
    write(server, method, stream).send().await.unwrap().status().as_u16()
}

async fn tail(server: &Server, stream: &str) -> String {
    let response = server.client.head(server.ds(stream)).send().await.unwrap();
    assert_eq!(response.status(), 200, "HEAD {stream}");
    header(&response, "stream-next-offset").unwrap()
}

#[tokio::test]
async fn a_fork_reads_its_source_up_to_the_fork_point_then_only_its_own() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &[]);
    assert_eq!(put(&server, "src", "text/plain", b"one,").await.status(), 201);
    assert_eq!(post(&server, "src", "text/plain", b"two,".to_vec()).await.status(), 204);
    let at = tail(&server, "src").await;
    let created = fork(&server, "f", "src", None).await;
    assert_eq!(created.status(), 201);
    assert_eq!(header(&created, "content-type").as_deref(), Some("text/plain"), "inherited");
    assert_eq!(header(&created, "stream-forked-from"), None);
    let fork_next = header(&created, "stream-next-offset").unwrap();
    let empty = server.get(&format!("f?offset={fork_next}")).await;
    assert_eq!(header(&empty, "stream-up-to-date").as_deref(), Some("true"));
    assert_eq!(empty.bytes().await.unwrap(), "", "the fork's tail is after everything it holds");

    // Source appends after the fork never show in it; the fork's own follow the fork point.
    assert_eq!(post(&server, "src", "text/plain", b"src-only".to_vec()).await.status(), 204);
    assert_eq!(post(&server, "f", "text/plain", b"mine".to_vec()).await.status(), 204);
    assert_eq!(bytes(&server, "f").await, b"one,two,mine");
    assert_eq!(bytes(&server, "src").await, b"one,two,src-only");
    let from_fork_point = server.get(&format!("f?offset={at}")).await;
    assert_eq!(from_fork_point.bytes().await.unwrap(), "mine");

    // A long-poll at the fork's tail wakes for the fork's append only.
    let fork_tail = tail(&server, "f").await;
    let waiting = {
        let url = server.ds(&format!("f?offset={fork_tail}&live=long-poll"));
        let client = server.client.clone();
        tokio::spawn(async move { client.get(url).send().await.unwrap().bytes().await.unwrap() })
    };
    assert_eq!(post(&server, "src", "text/plain", b"not yours".to_vec()).await.status(), 204);
    assert_eq!(post(&server, "f", "text/plain", b"yours".to_vec()).await.status(), 204);
    assert_eq!(tokio::time::timeout(Duration::from_secs(10), waiting).await.unwrap().unwrap(), "yours");

    // JSON: one array across the fork point.
    assert_eq!(put(&server, "j", "application/json", b"[1,2]").await.status(), 201);
    assert_eq!(fork(&server, "jf", "j", None).await.status(), 201);
    assert_eq!(post(&server, "jf", "application/json", b"[3]".to_vec()).await.status(), 204);
    assert_eq!(bytes(&server, "jf").await, b"[1,2,3]");
}

/// Every level of a three-deep chain takes appends while the chain is read: each read of a
/// level is its parent's messages up to its fork point, then its own, in order, whatever is
/// written meanwhile.
#[tokio::test]
async fn chains_three_deep_read_consistently_under_concurrent_appends() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &[]);
    assert_eq!(put(&server, "a", "text/plain", b"a0;").await.status(), 201);
    assert_eq!(post(&server, "a", "text/plain", b"a1;".to_vec()).await.status(), 204);
    assert_eq!(fork(&server, "b", "a", None).await.status(), 201);
    assert_eq!(post(&server, "b", "text/plain", b"b0;".to_vec()).await.status(), 204);
    assert_eq!(fork(&server, "c", "b", None).await.status(), 201);
    let (a_prefix, b_prefix) = ("a0;a1;", "a0;a1;b0;");

    const ROUNDS: usize = 60;
    let appender = |stream: &'static str| {
        let (client, url) = (server.client.clone(), server.ds(stream));
        tokio::spawn(async move {
            for i in 0..ROUNDS {
                let body = format!("{stream}{}:{i};", if stream == "a" { "x" } else { "" });
                let response = client
                    .post(url.clone())
                    .bearer_auth(common::KEY)
                    .header("content-type", "text/plain")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 204);
            }
        })
    };
    let writers = [appender("a"), appender("b"), appender("c")];
    // Reads while the appends run: always the inherited prefix, then the level's own, in order.
    let mut reads = 0;
    while writers.iter().any(|w| !w.is_finished()) || reads < 10 {
        // (`b` has its own `b0;` before the appends.)
        for (stream, prefix) in [("b", "a0;a1;b0;"), ("c", b_prefix)] {
            let body = String::from_utf8(bytes(&server, stream).await).unwrap();
            let own = body.strip_prefix(prefix).unwrap_or_else(|| panic!("{stream}: {body}"));
            let expected: String = (0..ROUNDS).map(|i| format!("{stream}:{i};")).collect();
            assert!(expected.starts_with(own), "{stream}: own part {own:?} is not in order");
            reads += 1;
        }
    }
    for w in writers {
        w.await.unwrap();
    }
    let own = |s: &str| -> String { (0..ROUNDS).map(|i| format!("{s}:{i};")).collect() };
    assert_eq!(String::from_utf8(bytes(&server, "c").await).unwrap(), format!("{b_prefix}{}", own("c")));
    assert_eq!(String::from_utf8(bytes(&server, "b").await).unwrap(), format!("{a_prefix}b0;{}", own("b")));
    let a: String = (0..ROUNDS).map(|i| format!("ax:{i};")).collect();
    assert_eq!(String::from_utf8(bytes(&server, "a").await).unwrap(), format!("{a_prefix}{a}"));
    // Small chunks walk the chain level by level, never skipping or repeating a message.
    let mut server = server;
    server.terminate(Duration::from_secs(30));
    let server = Server::start(dir.path(), &["--ds_max_chunk_bytes", "16"]);
    let mut offset = "-1".to_string();
    let mut walked = Vec::new();
    loop {
        let response = server.get(&format!("c?offset={offset}")).await;
        assert_eq!(response.status(), 200);
        let next = header(&response, "stream-next-offset").unwrap();
        let done = header(&response, "stream-up-to-date").is_some();
        walked.extend_from_slice(&response.bytes().await.unwrap());
        if done {
            break;
        }
        assert_ne!(next, offset, "a read moved nowhere");
        offset = next;
    }
    assert_eq!(String::from_utf8(walked).unwrap(), format!("{b_prefix}{}", own("c")));
}

/// A fork of a fork made at a position the middle stream itself inherits: it reads the root's
/// messages up to that position, then its own, skipping the middle stream entirely.
#[tokio::test]
async fn a_fork_inside_what_its_source_inherits_reads_the_root_up_to_it() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &[]);
    assert_eq!(put(&server, "root", "text/plain", b"r1;").await.status(), 201);
    let first = tail(&server, "root").await;
    assert_eq!(post(&server, "root", "text/plain", b"r2;".to_vec()).await.status(), 204);
    assert_eq!(fork(&server, "middle", "root", None).await.status(), 201);
    assert_eq!(post(&server, "middle", "text/plain", b"m1;".to_vec()).await.status(), 204);
    assert_eq!(fork(&server, "leaf", "middle", Some(&first)).await.status(), 201);
    assert_eq!(bytes(&server, "leaf").await, b"r1;");
    assert_eq!(post(&server, "leaf", "text/plain", b"l1;".to_vec()).await.status(), 204);
    assert_eq!(bytes(&server, "leaf").await, b"r1;l1;");
    assert_eq!(bytes(&server, "middle").await, b"r1;r2;m1;");
}

/// Deleting a chain in every order: a stream with forks is soft-deleted (`410`, its forks
/// still read it), a leaf goes at once (`404`), and the last fork's removal takes its deleted
/// sources with it. Once the whole chain is gone, so is what it stored: measured on disk.
#[tokio::test]
async fn deleting_a_chain_in_every_order_leaves_nothing_behind() {
    let orders: [[&str; 3]; 6] =
        [["a", "b", "c"], ["a", "c", "b"], ["b", "a", "c"], ["b", "c", "a"], ["c", "a", "b"], ["c", "b", "a"]];
    for order in orders {
        let dir = temp_dir();
        let mut server = Server::start(dir.path(), &NO_IMPLICIT);
        // Something that stays, so the store is not empty.
        assert_eq!(put(&server, "keep", "text/plain", b"k").await.status(), 201);
        let before = stored_bytes(&mut server, dir.path()).await;

        let big = vec![b'x'; 256 * 1024];
        assert_eq!(put(&server, "a", "application/octet-stream", b"").await.status(), 201);
        assert_eq!(post(&server, "a", "application/octet-stream", big.clone()).await.status(), 204);
        assert_eq!(fork(&server, "b", "a", None).await.status(), 201);
        assert_eq!(post(&server, "b", "application/octet-stream", big.clone()).await.status(), 204);
        assert_eq!(fork(&server, "c", "b", None).await.status(), 201);
        assert_eq!(post(&server, "c", "application/octet-stream", big.clone()).await.status(), 204);
        let full = stored_bytes(&mut server, dir.path()).await;
        assert!(full >= before + 3 * 256 * 1024, "{full} bytes for the chain, {before} before");

        let mut gone = Vec::new();
        for (i, stream) in order.iter().enumerate() {
            assert_eq!(status(&server, reqwest::Method::DELETE, stream).await, 204, "{order:?}: DELETE {stream}");
            gone.push(*stream);
            // What each stream answers now: a removed one 404, one deleted while a live
            // fork still reads it 410, a live one 200 with its whole content.
            for s in ["a", "b", "c"] {
                let head = server.client.head(server.ds(s)).send().await.unwrap().status().as_u16();
                let live_below = ["a", "b", "c"].iter().skip_while(|x| **x != s).skip(1).any(|x| !gone.contains(x));
                let expected = match (gone.contains(&s), live_below) {
                    (false, _) => 200,
                    (true, true) => 410,
                    (true, false) => 404,
                };
                assert_eq!(head, expected, "{order:?} after {} deletes: HEAD {s}", i + 1);
            }
            if !gone.contains(&"c") {
                assert_eq!(bytes(&server, "c").await.len(), 3 * 256 * 1024, "{order:?}: c reads its whole chain");
            }
        }
        for s in ["a", "b", "c"] {
            assert_eq!(server.get(&format!("{s}?offset=-1")).await.status(), 404, "{order:?}: {s}");
        }
        let after = stored_bytes(&mut server, dir.path()).await;
        // Sled: three tombstones (the names' last tails, for 7 days) and the sequence floor
        // remain. NATS: the three `delete` markers the purges keep (their headers).
        assert!(after < before + 4096, "{order:?}: {after} bytes left, {before} before the chain");
    }
}

/// What the store holds, in bytes: on sled the live keys and values of the stopped store
/// (its files shrink only as sled compacts them), in cluster mode the JetStream stream's
/// bytes (`ds_storage_bytes`; each test server has a JetStream stream of its own).
async fn stored_bytes(server: &mut Server, dir: &std::path::Path) -> u64 {
    if common::nats_engine() {
        return server.metric("ds_storage_bytes").await as u64;
    }
    server.terminate(Duration::from_secs(30));
    let (bytes, _) = anycable_ds::storage::inspect::live_bytes(&dir.join("data")).unwrap();
    server.restart();
    bytes
}

/// The soft-deleted source's answers (WRITE.md §5.9) and its counts surviving `kill -9`.
#[tokio::test]
async fn a_deleted_source_answers_410_and_its_counts_survive_kill_9() {
    let dir = temp_dir();
    let mut server = Server::start(dir.path(), &NO_IMPLICIT);
    assert_eq!(put(&server, "src", "text/plain", b"shared").await.status(), 201);
    assert_eq!(fork(&server, "f1", "src", None).await.status(), 201);
    assert_eq!(fork(&server, "f2", "src", None).await.status(), 201);
    assert_eq!(status(&server, reqwest::Method::DELETE, "src").await, 204);
    server.kill();
    server.restart();
    for method in [reqwest::Method::HEAD, reqwest::Method::GET, reqwest::Method::DELETE] {
        assert_eq!(status(&server, method.clone(), "src").await, 410, "{method}");
    }
    let (code, _) = refused(post(&server, "src", "text/plain", b"x".to_vec()).await).await;
    assert_eq!(code, 410);
    assert_eq!(put(&server, "src", "text/plain", b"").await.status(), 409, "the path is taken");
    assert_eq!(fork(&server, "f3", "src", None).await.status(), 409, "no new forks of a deleted source");
    assert_eq!(bytes(&server, "f1").await, b"shared");
    assert_eq!(status(&server, reqwest::Method::DELETE, "f1").await, 204);
    server.kill();
    server.restart();
    assert_eq!(status(&server, reqwest::Method::HEAD, "src").await, 410, "f2 still reads it");
    assert_eq!(bytes(&server, "f2").await, b"shared");
    assert_eq!(status(&server, reqwest::Method::DELETE, "f2").await, 204);
    assert_eq!(status(&server, reqwest::Method::HEAD, "src").await, 404, "went with its last fork");
    // The name is free again.
    assert_eq!(put(&server, "src", "text/plain", b"new").await.status(), 201);
    assert_eq!(bytes(&server, "src").await, b"new");
}

/// A fork's expiry releases its source like a DELETE; a source that expires under its forks
/// is soft-deleted, and they still read it.
#[tokio::test]
async fn expiry_releases_and_soft_deletes_like_delete() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &NO_IMPLICIT);
    assert_eq!(put(&server, "src", "text/plain", b"s").await.status(), 201);
    let short = write(&server, reqwest::Method::PUT, "short")
        .header("stream-forked-from", "/ds/src")
        .header("stream-ttl", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(short.status(), 201);
    assert_eq!(header(&short, "stream-ttl"), None);
    assert_eq!(status(&server, reqwest::Method::DELETE, "src").await, 204);
    assert_eq!(status(&server, reqwest::Method::HEAD, "src").await, 410);
    // The fork expires (a second later), and its source goes with it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while status(&server, reqwest::Method::HEAD, "src").await != 404 {
        assert!(std::time::Instant::now() < deadline, "the source outlived its last fork");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status(&server, reqwest::Method::HEAD, "short").await, 404);

    // A source with a TTL expires under a fork that has none: soft-deleted, still read.
    let ttl =
        write(&server, reqwest::Method::PUT, "mortal").header("stream-ttl", "1").header("content-type", "text/plain");
    assert_eq!(ttl.body("m").send().await.unwrap().status(), 201);
    let forever = write(&server, reqwest::Method::PUT, "heir")
        .header("stream-forked-from", "/ds/mortal")
        .header("stream-expires-at", common::ds_write::rfc3339(4_000_000_000))
        .send()
        .await
        .unwrap();
    assert_eq!(forever.status(), 201);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let head = status(&server, reqwest::Method::HEAD, "mortal").await;
        if head == 404 || head == 410 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the source never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(bytes(&server, "heir").await, b"m");
}

/// Fork headers from a hostile client: every answer is a JSON 4xx naming the problem, and no
/// stream is made by a refused request.
#[tokio::test]
async fn hostile_fork_headers_are_clear_400s_and_make_nothing() {
    let dir = temp_dir();
    let server = Server::start(dir.path(), &NO_IMPLICIT);
    assert_eq!(put(&server, "src", "text/plain", b"hello").await.status(), 201);
    let source_tail = tail(&server, "src").await;
    let beyond = common::token_at(&source_tail, common::seq_of(&source_tail) + 1);
    let cases: Vec<(Vec<(&str, String)>, u16)> = vec![
        (vec![("stream-fork-offset", "garbage".into())], 400),
        (vec![("stream-fork-sub-offset", "1".into())], 400),
        (vec![("stream-fork-offset", source_tail.clone())], 400),
        (vec![("stream-forked-from", "/ds/src".into()), ("stream-fork-offset", beyond)], 400),
        (vec![("stream-forked-from", "/ds/src".into()), ("stream-fork-offset", "-1".into())], 400),
        (vec![("stream-forked-from", "/ds/src".into()), ("stream-fork-offset", "now".into())], 400),
        (vec![("stream-forked-from", "/ds/src".into()), ("stream-fork-sub-offset", "05".into())], 400),
        (vec![("stream-forked-from", "/ds/src".into()), ("stream-fork-sub-offset", "-1".into())], 400),
        (vec![("stream-forked-from", "/ds/src".into()), ("stream-fork-sub-offset", "1".into())], 400),
        (
            vec![("stream-forked-from", "/ds/src".into()), ("stream-fork-sub-offset", "99999999999999999999".into())],
            400,
        ),
        (
            vec![
                ("stream-forked-from", "/ds/src".into()),
                ("stream-fork-offset", anycable_ds::forks::ZERO_TOKEN.into()),
                ("stream-fork-sub-offset", "6".into()),
            ],
            400,
        ),
        (vec![("stream-forked-from", "/ds/nope".into())], 404),
        (vec![("stream-forked-from", "/ds/".into())], 400),
        (vec![("stream-forked-from", "%ff".into())], 400),
        (vec![("stream-forked-from", "/ds/src".into()), ("content-type", "application/json".into())], 409),
        (vec![("stream-forked-from", "/ds/src".into()), ("stream-ttl", "abc".into())], 400),
    ];
    for (i, (headers, expected)) in cases.iter().enumerate() {
        let name = format!("bad{i}");
        let mut request = write(&server, reqwest::Method::PUT, &name);
        for (k, v) in headers {
            request = request.header(*k, v.as_str());
        }
        let (code, message) = refused(request.send().await.unwrap()).await;
        assert_eq!(code, *expected, "{headers:?}: {message}");
        assert!(!message.is_empty());
        assert_eq!(server.get(&format!("{name}?offset=-1")).await.status(), 404, "{headers:?} made a stream");
    }
    // The zero token with a sub-offset within the first message is a fork of its prefix.
    let ok = write(&server, reqwest::Method::PUT, "prefix")
        .header("stream-forked-from", "/ds/src")
        .header("stream-fork-offset", anycable_ds::forks::ZERO_TOKEN)
        .header("stream-fork-sub-offset", "3")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 201);
    assert_eq!(bytes(&server, "prefix").await, b"hel");
}
