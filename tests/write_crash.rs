//! Crash test of the write API: writers append to `PUT` streams with increasing `Stream-Seq`
//! while others close streams, and the server is killed with SIGKILL at random moments. After
//! each restart: every acknowledged append is there exactly once and in order, nothing follows
//! an acknowledged close (and the stream is still closed), and the `Stream-Seq` state of every
//! acknowledged append survived (a repeat is refused). Sled only: it is about the embedded
//! store's durability (cluster mode's is JetStream's, tested in tests/cluster_faults.rs).
//!
//! CI runs a few cycles; `ANYCABLE_DS_SOAK_CYCLES=100` runs a soak.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{header, temp_dir, Rng, Server, KEY};

const WRITERS: usize = 4;

#[derive(Default)]
struct Log {
    /// Per stream: indexes whose append was answered 204.
    acked: HashMap<String, Vec<u64>>,
    /// Streams whose close was answered 204.
    closed: Vec<String>,
}

/// Appends `w{writer}:{i};` to `stream` with `Stream-Seq` = `i` (zero-padded, so byte order
/// is numeric order) until the server dies or the stream is closed; returns the next index.
async fn writer(client: reqwest::Client, url: String, writer: usize, mut i: u64, log: Arc<Mutex<Log>>) -> u64 {
    let stream = url.rsplit('/').next().unwrap().to_string();
    loop {
        let sent = client
            .post(&url)
            .bearer_auth(KEY)
            .header("content-type", "text/plain")
            .header("stream-seq", format!("{i:012}"))
            .body(format!("w{writer}:{i};"))
            .send()
            .await;
        match sent {
            Ok(response) if response.status() == 204 => {
                log.lock().unwrap().acked.entry(stream.clone()).or_default().push(i)
            }
            // Closed by the closer: this writer is done.
            Ok(response) if response.status() == 409 && header(&response, "stream-closed").is_some() => return i + 1,
            Ok(response) => panic!("append {stream} {i}: unexpected {}", response.status()),
            Err(_) => return i + 1, // the server died under us: not acknowledged
        }
        i += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_appends_and_closes_loses_nothing_acknowledged() {
    let cycles: u64 = std::env::var("ANYCABLE_DS_SOAK_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("write crash test: {cycles} cycles, seed {seed}");
    let mut rng = Rng(seed);
    let dir = temp_dir();
    let mut server = Server::start(dir.path(), &["--ds_implicit_streams", "false"]);
    let log = Arc::new(Mutex::new(Log::default()));
    let mut next = [0u64; WRITERS];
    let mut checked = 0;
    for cycle in 0..cycles {
        // Each writer has its own stream per cycle; the closer closes one of them mid-flight.
        let streams: Vec<String> = (0..WRITERS).map(|w| format!("c{cycle}-w{w}")).collect();
        for stream in &streams {
            let created = server
                .client
                .put(server.ds(stream))
                .bearer_auth(KEY)
                .header("content-type", "text/plain")
                .send()
                .await
                .unwrap();
            assert_eq!(created.status(), 201);
        }
        let tasks: Vec<_> = streams
            .iter()
            .enumerate()
            .map(|(w, stream)| tokio::spawn(writer(server.client.clone(), server.ds(stream), w, next[w], log.clone())))
            .collect();
        let victim = streams[(rng.next() % WRITERS as u64) as usize].clone();
        tokio::time::sleep(Duration::from_millis(20 + rng.next() % 100)).await;
        let closing = server.client.post(server.ds(&victim)).bearer_auth(KEY).header("stream-closed", "true").send();
        if let Ok(response) = closing.await {
            assert_eq!(response.status(), 204, "close of {victim}");
            log.lock().unwrap().closed.push(victim.clone());
        }
        tokio::time::sleep(Duration::from_millis(rng.next() % 150)).await;
        server.kill();
        for (w, task) in tasks.into_iter().enumerate() {
            next[w] = task.await.unwrap() + 5;
        }

        server.restart();
        let (acked_all, closed) = {
            let log = log.lock().unwrap();
            (log.acked.clone(), log.closed.clone())
        };
        for (stream, acked) in &acked_all {
            let response = server.get(&format!("{stream}?offset=-1")).await;
            assert_eq!(response.status(), 200, "{stream}");
            let text = response.text().await.unwrap();
            let indexes: Vec<u64> =
                text.split_terminator(';').map(|record| record.split_once(':').unwrap().1.parse().unwrap()).collect();
            // Stored in order, each once: Stream-Seq was checked against durable state.
            assert!(indexes.windows(2).all(|p| p[0] < p[1]), "cycle {cycle} (seed {seed}): {stream}: {indexes:?}");
            let present: BTreeMap<u64, ()> = indexes.iter().map(|&i| (i, ())).collect();
            for i in acked {
                assert!(present.contains_key(i), "cycle {cycle} (seed {seed}): acknowledged {stream}/{i} lost");
                checked += 1;
            }
            // The state of the last acknowledged Stream-Seq survived: repeating it is refused.
            if let Some(last) = acked.last() {
                let repeat = server
                    .client
                    .post(server.ds(stream))
                    .bearer_auth(KEY)
                    .header("content-type", "text/plain")
                    .header("stream-seq", format!("{last:012}"))
                    .body("again;")
                    .send()
                    .await
                    .unwrap();
                assert_eq!(repeat.status(), 409, "cycle {cycle} (seed {seed}): {stream} accepted seq {last} twice");
            }
        }
        // An acknowledged close is never undone, and nothing is appended after it.
        for stream in &closed {
            let head = server.client.head(server.ds(stream)).send().await.unwrap();
            assert_eq!(header(&head, "stream-closed").as_deref(), Some("true"), "cycle {cycle}: {stream} reopened");
            let late = server
                .client
                .post(server.ds(stream))
                .bearer_auth(KEY)
                .header("content-type", "text/plain")
                .body("late;")
                .send()
                .await
                .unwrap();
            assert_eq!(late.status(), 409, "cycle {cycle}: append after a close");
        }
    }
    eprintln!("write crash test: {cycles} SIGKILL cycles, {checked} acknowledged appends checked");
}

/// An idempotent producer that retries every request it got no answer for, across SIGKILL
/// restarts, ends with every message exactly once and in order: its state is written in the
/// same batch as the messages, so a retry of an applied request is a duplicate (`204`) and a
/// retry of a lost one is appended (`200`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_retrying_across_sigkill_writes_everything_exactly_once() {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    let mut rng = Rng(seed);
    let dir = temp_dir();
    let mut server = Server::start(dir.path(), &[]);
    let created = server.client.put(server.ds("produced")).bearer_auth(KEY).header("content-type", "text/plain");
    assert_eq!(created.send().await.unwrap().status(), 201);
    let total = 3_000u64;
    let mut seq = 0u64;
    let kills = [rng.next() % 1000 + 200, rng.next() % 1000 + 1500];
    let mut killed = 0;
    while seq < total {
        if killed < kills.len() && seq == kills[killed] {
            // Kill with a request in flight: its answer is lost, and the producer retries it.
            let racing = tokio::spawn(produce(&server, seq).send());
            tokio::time::sleep(Duration::from_micros(rng.next() % 2000)).await;
            server.kill();
            let _ = racing.await;
            server.restart();
            killed += 1;
        }
        let response = produce(&server, seq).send().await.unwrap();
        // 200: appended now; 204: the request before the kill had been applied.
        assert!(matches!(response.status().as_u16(), 200 | 204), "seq {seq} (seed {seed}): {}", response.status());
        assert_eq!(header(&response, "producer-seq").as_deref(), Some(seq.to_string().as_str()));
        seq += 1;
    }
    let text = server.get("produced?offset=-1").await.text().await.unwrap();
    let got: Vec<u64> = text.split_terminator(';').map(|n| n.parse().unwrap()).collect();
    assert_eq!(got, (0..total).collect::<Vec<_>>(), "seed {seed}: every message once, in order");
}

/// Producer `p`'s request number `seq` (epoch 0) to the stream `produced`.
fn produce(server: &Server, seq: u64) -> reqwest::RequestBuilder {
    server
        .client
        .post(server.ds("produced"))
        .bearer_auth(KEY)
        .header("content-type", "text/plain")
        .header("producer-id", "p")
        .header("producer-epoch", "0")
        .header("producer-seq", seq.to_string())
        .body(format!("{seq};"))
}
