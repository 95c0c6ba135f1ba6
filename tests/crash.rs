//! Crash test: concurrent writers, SIGKILL at random moments, restart, check that every
//! acknowledged message is there exactly once and in order, that every broadcast request is
//! there whole or not at all (acknowledged or not, one stream or two), and that tokens saved
//! before the crash still resume exactly after their message.
//!
//! CI runs a few cycles; `ANYCABLE_DS_SOAK_CYCLES=200 cargo test --release --test crash` runs a
//! long soak.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{temp_dir, Rng, Server};
use serde_json::{json, Value};

const WRITERS: u64 = 4;
/// Messages per request of writers 1 and 3 (writers 0 and 2 send one). Writer 3's requests
/// alternate streams message by message, so they span both.
const BATCH: u64 = 5;

fn stream_of(writer: u64, request_start: u64, index: u64) -> &'static str {
    if writer == 3 {
        STREAMS[(index % 2) as usize]
    } else {
        STREAMS[(request_start % 2) as usize]
    }
}
const STREAMS: [&str; 2] = ["crash-a", "crash-b"];

#[derive(Default)]
struct Acked {
    /// (stream, writer, index) of every message answered 201.
    messages: HashSet<(String, u64, u64)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_concurrent_writes_loses_no_acknowledged_message() {
    let cycles: u64 = std::env::var("ANYCABLE_DS_SOAK_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(6);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("crash test: {cycles} cycles, seed {seed}");
    let mut rng = Rng(seed);

    let dir = temp_dir();
    // Durability, not retention: every acknowledged message must still be there to check.
    let mut server = Server::start(dir.path(), &["--history_limit", "0"]);
    let acked = Arc::new(Mutex::new(Acked::default()));
    let mut next_index = vec![0u64; WRITERS as usize];
    // Tokens saved before a crash: (stream, token, messages the stream held up to that token).
    let mut saved: Vec<(String, String, Vec<Value>)> = Vec::new();
    let mut checked = 0usize;

    for cycle in 0..cycles {
        // Keep the tokens of the first and the latest cycles: old ones stay checked without
        // the check growing with the soak's length.
        if saved.len() > 8 {
            saved.drain(2..saved.len() - 6);
        }
        let base = server.url("");
        let starts = next_index.clone();
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let (acked, base, client) = (acked.clone(), base.clone(), server.client.clone());
            let start = next_index[w as usize];
            let batch = if w % 2 == 1 { BATCH } else { 1 };
            writers.push(tokio::spawn(async move {
                let mut i = start;
                loop {
                    let items: Vec<Value> = (i..i + batch)
                        .map(|k| json!({"stream": stream_of(w, i, k), "data": json!({"w": w, "i": k}).to_string()}))
                        .collect();
                    let body = if batch == 1 { items[0].to_string() } else { Value::Array(items).to_string() };
                    let sent =
                        client.post(format!("{base}/_broadcast")).bearer_auth(common::KEY).body(body).send().await;
                    match sent {
                        Ok(response) if response.status() == 201 => {
                            let mut acked = acked.lock().unwrap();
                            for k in i..i + batch {
                                acked.messages.insert((stream_of(w, i, k).to_string(), w, k));
                            }
                        }
                        Ok(response) => panic!("unexpected status {}", response.status()),
                        Err(_) => return i, // the server died under us: not acknowledged
                    }
                    i += batch;
                }
            }));
        }
        // Let the writers run, save a token mid-flight, then kill at a random moment.
        tokio::time::sleep(Duration::from_millis(50 + rng.next() % 150)).await;
        for stream in STREAMS {
            if let Ok(response) = server.client.get(server.ds(&format!("{stream}?offset=-1"))).send().await {
                if response.status() == 200 {
                    let (messages, token, _) = common::read_parts(response).await;
                    saved.push((stream.to_string(), token, messages));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.next() % 200)).await;
        server.kill();
        for (w, writer) in writers.into_iter().enumerate() {
            // Indices after a failed request may or may not have been stored: skip past them
            // so no (writer, index) pair is ever sent twice.
            next_index[w] = writer.await.unwrap() + 10;
        }

        server.restart();
        let acked_now = std::mem::take(&mut acked.lock().unwrap().messages);
        // Every request of this cycle is there whole or not at all, even one that was never
        // answered and even one that spans both streams.
        let mut present: HashSet<(String, u64, u64)> = HashSet::new();
        for stream in STREAMS {
            let (messages, _, _) = server.read(stream, "-1").await;
            present.extend(
                messages.iter().map(|m| (stream.to_string(), m["w"].as_u64().unwrap(), m["i"].as_u64().unwrap())),
            );
        }
        for (_, w, k) in present.iter().filter(|(_, w, k)| w % 2 == 1 && *k >= starts[*w as usize]) {
            let request_start = starts[*w as usize] + (k - starts[*w as usize]) / BATCH * BATCH;
            for member in request_start..request_start + BATCH {
                let expected = (stream_of(*w, request_start, member).to_string(), *w, member);
                assert!(
                    present.contains(&expected),
                    "cycle {cycle}: request {w}/{request_start} half stored (seed {seed})"
                );
            }
        }
        for stream in STREAMS {
            let (messages, _, up_to_date) = server.read(stream, "-1").await;
            assert!(up_to_date, "one chunk holds the whole stream");
            let pairs: Vec<(u64, u64)> =
                messages.iter().map(|m| (m["w"].as_u64().unwrap(), m["i"].as_u64().unwrap())).collect();
            let unique: HashSet<_> = pairs.iter().collect();
            assert_eq!(unique.len(), pairs.len(), "cycle {cycle}: a message stored twice in {stream}");
            for w in 0..WRITERS {
                let mine: Vec<u64> = pairs.iter().filter(|(pw, _)| *pw == w).map(|(_, i)| *i).collect();
                assert!(mine.windows(2).all(|p| p[0] < p[1]), "cycle {cycle}: writer {w} out of order in {stream}");
            }
            for (s, w, i) in acked_now.iter().filter(|(s, _, _)| s == stream) {
                assert!(unique.contains(&(*w, *i)), "cycle {cycle}: acknowledged ({s}, {w}, {i}) lost (seed {seed})");
                checked += 1;
            }
            // Every token saved before any crash resumes exactly after its message.
            for (_, token, before) in saved.iter().filter(|(s, _, _)| s == stream) {
                let (rest, _, _) = server.read(stream, token).await;
                assert_eq!(messages[..before.len()], before[..], "cycle {cycle}: history rewritten");
                assert_eq!(rest, messages[before.len()..], "cycle {cycle}: token {token} resumes elsewhere");
            }
        }
        // Checked again after every later crash too.
        acked.lock().unwrap().messages.extend(acked_now);
    }
    eprintln!(
        "crash test: {cycles} SIGKILL cycles, {checked} acknowledged-message checks, {} saved tokens",
        saved.len()
    );
}

/// SIGKILL while retention keeps trimming (a small count limit): after each restart the
/// retained window is exactly the newest messages, contiguous, with no duplicate, and a token
/// saved before the crash either resumes exactly or is reported gone (410), never wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_retention_trims_keeps_a_consistent_window() {
    const LIMIT: usize = 20;
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    let mut rng = Rng(seed);
    let dir = temp_dir();
    let mut server = Server::start(dir.path(), &["--history_limit", &LIMIT.to_string()]);
    let mut next = 0u64;
    for cycle in 0..4 {
        let (base, client) = (server.url(""), server.client.clone());
        let writer = tokio::spawn(async move {
            let mut n = next;
            loop {
                let body = json!({"stream": "trimmed", "data": json!({"n": n}).to_string()}).to_string();
                match client.post(format!("{base}/_broadcast")).bearer_auth(common::KEY).body(body).send().await {
                    Ok(response) if response.status() == 201 => n += 1,
                    _ => return n,
                }
            }
        });
        // Let several retention passes run (one per second) while writing, then kill.
        tokio::time::sleep(Duration::from_millis(1100 + rng.next() % 900)).await;
        let (seen, saved, _) = server.read("trimmed", "-1").await;
        let last_seen = seen.last().and_then(|m| m["n"].as_u64());
        server.kill();
        let acknowledged = writer.await.unwrap();
        next = acknowledged + 1;

        server.restart();
        let (messages, _, _) = server.read("trimmed", "-1").await;
        let ns: Vec<u64> = messages.iter().map(|m| m["n"].as_u64().unwrap()).collect();
        assert_eq!(ns.len(), LIMIT, "cycle {cycle} (seed {seed}): the window holds the newest {LIMIT}");
        assert!(ns.windows(2).all(|w| w[1] == w[0] + 1), "cycle {cycle}: contiguous, no duplicate: {ns:?}");
        assert!(*ns.last().unwrap() + 1 >= acknowledged, "cycle {cycle}: the newest acknowledged message is there");
        let response = server.get(&format!("trimmed?offset={saved}")).await;
        match response.status().as_u16() {
            200 => {
                let (rest, _, _) = common::read_parts(response).await;
                let first = rest.first().and_then(|m| m["n"].as_u64());
                if let (Some(first), Some(last_seen)) = (first, last_seen) {
                    assert_eq!(first, last_seen + 1, "cycle {cycle}: resumes exactly after the saved token");
                }
            }
            410 => {}
            other => panic!("cycle {cycle}: status {other}"),
        }
    }
}
