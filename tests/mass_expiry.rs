//! Mass expiry (issue 23): rounds of many new streams, written together, read once by a few
//! keep-alive clients, expiring together a few seconds later while the next rounds are
//! written. sled 0.34.7 could deadlock here for good: a file truncation queued on its shared
//! I/O pool was waited for under the segment accountant, which every pool thread was waiting
//! for (docs/DECISIONS.md, "sled 0.34.7: file truncations on a thread of their own").
//!
//! A watchdog fails the test when any request takes longer than [`REQUEST_LIMIT`] or `/health`
//! stops answering, and prints the server's threads (and their stacks when `gdb` is
//! installed). CI runs [`ROUNDS`] rounds of [`STREAMS`] streams (about a minute on two cores);
//! a longer soak: `ANYCABLE_DS_MASS_EXPIRY_ROUNDS=60 cargo test --release --test mass_expiry`
//! (`ANYCABLE_DS_MASS_EXPIRY_STREAMS` sets the streams per round).

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use common::{temp_dir, Server, KEY};
use serde_json::json;
use tokio::sync::mpsc;

/// Rounds in CI; `ANYCABLE_DS_MASS_EXPIRY_ROUNDS` overrides.
const ROUNDS: usize = 12;
/// New streams per round; `ANYCABLE_DS_MASS_EXPIRY_STREAMS` overrides.
const STREAMS: usize = 10_000;
/// Streams (one message each) per broadcast request.
const BATCH: usize = 2_000;
/// Broadcast requests in flight at once.
const BROADCASTERS: usize = 2;
/// Keep-alive reader clients; each reads its share of every round's streams, one at a time.
const READERS: usize = 4;
/// Seconds a message is kept (`--history_ttl`): rounds expire while later ones are written.
const TTL: usize = 2;
/// Any request slower than this fails the test (reads and broadcasts take milliseconds).
const REQUEST_LIMIT: Duration = Duration::from_secs(10);
/// How often the watchdog asks `/health`.
const HEALTH_EVERY: Duration = Duration::from_millis(250);

struct Params {
    rounds: usize,
    streams: usize,
    batch: usize,
    broadcasters: usize,
    readers: usize,
}

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// `request` (a send plus reading the body) within [`REQUEST_LIMIT`], or a description of
/// what hung.
async fn timed<T>(
    what: impl FnOnce() -> String,
    request: impl Future<Output = Result<T, String>>,
) -> Result<T, String> {
    let started = Instant::now();
    match tokio::time::timeout(REQUEST_LIMIT, request).await {
        Ok(result) => result.map_err(|e| format!("{}: {e}", what())),
        Err(_) => Err(format!("{} took more than {REQUEST_LIMIT:?} (started {:?} ago)", what(), started.elapsed())),
    }
}

/// Fails once `/health` does not answer `200` within [`REQUEST_LIMIT`]; never returns before.
async fn watchdog(url: String) -> String {
    // A connection of its own: a server whose workers are stuck does not answer it either.
    let client = reqwest::Client::new();
    loop {
        let answer = timed(|| "GET /health".to_string(), async {
            client.get(&url).send().await.map(|r| r.status().as_u16()).map_err(|e| e.to_string())
        })
        .await;
        match answer {
            Ok(200) => {}
            Ok(status) => return format!("GET /health answered {status}"),
            Err(e) => return e,
        }
        tokio::time::sleep(HEALTH_EVERY).await;
    }
}

/// Broadcasts every round's streams, hands each batch's names to the readers as soon as it is
/// stored, then waits until retention has removed every stream.
async fn workload(server: &Server, p: &Params) -> Result<(), String> {
    let (rounds, streams) = (p.rounds, p.streams);
    let mut readers = Vec::new();
    let mut to_read = Vec::new();
    for reader in 0..p.readers {
        let (send, mut receive) = mpsc::unbounded_channel::<String>();
        to_read.push(send);
        // Its own client: one keep-alive connection, reused for every read.
        let client = reqwest::Client::new();
        let base = server.ds("");
        readers.push(tokio::spawn(async move {
            let mut reads = 0u64;
            while let Some(stream) = receive.recv().await {
                let url = format!("{base}{stream}?offset=-1");
                let status = timed(|| format!("reader {reader}: GET {stream}?offset=-1"), async {
                    let response = client.get(&url).send().await.map_err(|e| e.to_string())?;
                    let status = response.status().as_u16();
                    response.bytes().await.map_err(|e| e.to_string())?;
                    Ok(status)
                })
                .await?;
                // 200 with the message, or with `[]` once it expired; never an error.
                if status != 200 {
                    return Err(format!("reader {reader}: GET {stream}?offset=-1 answered {status}"));
                }
                reads += 1;
            }
            Ok::<u64, String>(reads)
        }));
    }

    let client = reqwest::Client::new();
    let broadcast_url = server.url("/_broadcast");
    let started = Instant::now();
    for round in 0..rounds {
        let batches: Vec<Vec<String>> = (0..streams)
            .map(|i| format!("r{round}-s{i}"))
            .collect::<Vec<_>>()
            .chunks(p.batch)
            .map(<[String]>::to_vec)
            .collect();
        for group in batches.chunks(p.broadcasters) {
            let sends = group.iter().map(|names| {
                let body = serde_json::Value::Array(
                    names
                        .iter()
                        .map(|name| json!({ "stream": name, "data": json!({ "s": name }).to_string() }))
                        .collect(),
                )
                .to_string();
                let (client, url) = (client.clone(), broadcast_url.clone());
                timed(move || format!("round {round}: broadcast of {} streams", names.len()), async move {
                    let response = client.post(&url).bearer_auth(KEY).body(body).send().await;
                    let response = response.map_err(|e| e.to_string())?;
                    let status = response.status().as_u16();
                    let text = response.text().await.map_err(|e| e.to_string())?;
                    if status == 201 {
                        Ok(())
                    } else {
                        Err(format!("answered {status}: {text}"))
                    }
                })
            });
            for result in futures_util::future::join_all(sends).await {
                result?;
            }
            for (i, name) in group.iter().flatten().enumerate() {
                // A reader that failed has dropped its receiver; its error is reported below.
                let _ = to_read[i % p.readers].send(name.clone());
            }
        }
        eprintln!("round {round}: {streams} streams written at {:.1?}", started.elapsed());
    }
    drop(to_read);
    let mut reads = 0;
    for reader in readers {
        reads += reader.await.map_err(|e| format!("reader task: {e}"))??;
    }
    assert_eq!(reads, (rounds * streams) as u64, "every stream read once");

    // The last rounds expire together too; nothing is left once retention removed them all.
    // Generous: a retention pass over many streams pauses ten times its length after it, and
    // the writer removes at most 5,000 streams a second (so that broadcasts and reads wait
    // little for removals).
    let total = (rounds * streams) as f64;
    let deadline = Instant::now() + Duration::from_secs(120.max(total as u64 / 1000));
    loop {
        let removed = timed(|| "GET /metrics".to_string(), async {
            let text = client.get(server.url("/metrics")).send().await.map_err(|e| e.to_string())?;
            let text = text.text().await.map_err(|e| e.to_string())?;
            Ok(text
                .lines()
                .find_map(|l| l.strip_prefix("ds_streams_removed_total "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0))
        })
        .await?;
        if removed >= total {
            eprintln!("all {total} streams removed at {:.1?}", started.elapsed());
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("only {removed} of {total} streams removed"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The server's threads: name, state and CPU ticks from /proc, and stacks if gdb is there.
fn threads(pid: i32) -> String {
    let mut out = String::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let path = task.path();
            let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
            // After the `(comm)` field: state, ..., utime and stime are fields 14 and 15.
            let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
            let state = fields.first().copied().unwrap_or("?");
            let cpu = fields.get(11).zip(fields.get(12)).map(|(u, s)| format!("{u}+{s}")).unwrap_or_default();
            out += &format!("{:<20} {state} cpu {cpu}\n", comm.trim());
        }
    }
    let gdb = std::process::Command::new("timeout")
        .args(["60", "gdb", "-p", &pid.to_string(), "-batch", "-ex", "thread apply all bt 10"])
        .output();
    if let Ok(gdb) = gdb {
        let text = String::from_utf8_lossy(&gdb.stdout);
        let frames: Vec<&str> =
            text.lines().filter(|l| l.starts_with("Thread ") || (l.starts_with('#') && l.contains(" in "))).collect();
        if !frames.is_empty() {
            out += "\nstacks (gdb):\n";
            out += &frames.join("\n");
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_expiring_together_never_hang_the_server() {
    let p = Params {
        rounds: setting("ANYCABLE_DS_MASS_EXPIRY_ROUNDS", ROUNDS),
        streams: setting("ANYCABLE_DS_MASS_EXPIRY_STREAMS", STREAMS),
        batch: setting("MX_BATCH", BATCH),
        broadcasters: setting("MX_BROADCASTERS", BROADCASTERS),
        readers: setting("MX_READERS", READERS),
    };
    let dir = temp_dir();
    let ttl = setting("MX_TTL", TTL).to_string();
    let mut args = vec!["--history_ttl".to_string(), ttl];
    if let Ok(extra) = std::env::var("MX_ARGS") {
        args.extend(extra.split_whitespace().map(String::from));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(dir.path(), &args);
    let started = Instant::now();
    let result = tokio::select! {
        result = workload(&server, &p) => result,
        failure = watchdog(server.url("/health")) => Err(failure),
    };
    if let Err(failure) = result {
        panic!(
            "{failure} ({:.1?} into the run)\n\nserver threads:\n{}\n\nserver log (tail):\n{}",
            started.elapsed(),
            threads(server.pid()),
            server.logs().lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n"),
        );
    }
}
