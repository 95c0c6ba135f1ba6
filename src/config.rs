//! Layered settings: built-in defaults < `anycable-ds.toml` < `ANYCABLE_*` env < CLI flags.
//!
//! The `config` crate does the layering and the typed deserialization. `clap` parses the flags
//! and reads the `ANYCABLE_*` variables for each flag: clap already gives an env value a lower
//! precedence than the flag itself, so "env < flag" is clap's job and "file < (env or flag)" is
//! ours, by putting whatever clap found on top of the file as overrides.
//!
//! Names follow AnyCable (`--public_streams`, `ANYCABLE_HISTORY_LIMIT`, ...), underscores and all.

use std::path::{Path, PathBuf};

use clap::Parser;
use serde::{Deserialize, Serialize};

/// File read when `--config` is not given (relative to the current directory; optional).
pub const DEFAULT_CONFIG_FILE: &str = "anycable-ds.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    File { path: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The effective configuration. Field names are the TOML keys.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Application secret: derives `streams.secret`, `jwt.secret` and the broadcast key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Bearer key for `POST /_broadcast`; derived from `secret` when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broadcast_key: Option<String>,
    /// Public mode: every stream is public and clients are not authenticated.
    pub public: bool,
    /// Skip client authentication (streams are still authorized).
    pub noauth: bool,
    /// Turn authentication by the application (HTTP RPC) off, even when `rpc.host` is set.
    pub norpc: bool,
    pub server: ServerConfig,
    pub ds: DsConfig,
    pub broker: BrokerConfig,
    pub storage: StorageConfig,
    pub streams: StreamsConfig,
    pub jwt: JwtConfig,
    pub rpc: RpcConfig,
    pub nats: NatsConfig,
    pub http_broadcast: HttpBroadcastConfig,
    pub metrics: MetricsConfig,
    pub logging: LoggingConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// Comma-separated origins; `*.example.com` matches subdomains; empty allows any origin.
    pub allowed_origins: String,
    pub health_path: String,
    /// HTTP worker threads; 0 means one per CPU core.
    pub workers: usize,
    /// Most open client connections; 0 derives it from the open-file limit. Beyond it new
    /// connections wait in the listen backlog.
    pub max_connections: u64,
    /// Seconds a response may go without the client taking any of it before the connection
    /// is closed (a client that stops reading holds no memory beyond this).
    pub write_timeout: u64,
    /// Seconds a request body (a broadcast) may take to arrive in full; then `408` and the
    /// connection is closed.
    pub body_timeout: u64,
    /// Most bytes of request bodies received and held at once, all connections together;
    /// beyond it requests with a body get `503` + `Retry-After`.
    pub max_body_bytes_in_flight: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DsConfig {
    pub path: String,
    pub skip_auth: bool,
    /// Long-poll wait, seconds.
    pub poll_interval: u64,
    /// Maximum lifetime of one SSE response, seconds.
    pub sse_ttl: u64,
    /// Upper bound on the message bytes of one read response (at least one message is sent).
    pub max_chunk_bytes: u64,
    /// Most long-poll and SSE readers at once (0 = bounded only by connections); beyond it
    /// live reads answer 503.
    pub max_live_readers: u64,
    /// Most bytes of read responses held for clients that have not taken them yet (a buffer
    /// shared by many responses counts once); beyond it reads answer 503.
    pub max_unsent_bytes: u64,
    /// Most bytes of transient (`meta.transient`) batches kept for live readers, all streams
    /// together; beyond it new transient batches are dropped.
    pub max_transient_bytes: u64,
    /// The Durable Streams write API (`PUT`/`POST`/`DELETE`), with the broadcast key;
    /// `false`: those methods answer `405`.
    pub writes: bool,
    /// Unknown streams read as empty JSON streams (AnyCable's behaviour: a reader may
    /// subscribe before the first broadcast); `false`: `404`, as the protocol says.
    pub implicit_streams: bool,
    /// Largest body of one `PUT` or `POST`; beyond it `413`.
    pub max_append_bytes: u64,
    /// Webhook subscriptions may target loopback addresses (`127.0.0.0/8`, `::1`,
    /// `localhost`): for tests and local development only. Every other private, link-local
    /// or metadata address is refused whatever this says.
    pub webhooks_allow_loopback: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Where the log lives: `sled` (embedded, this node) or `nats` (NATS JetStream, shared by
    /// every node: cluster mode).
    pub adapter: String,
    /// Messages kept per stream; 0 = unlimited.
    pub history_limit: u64,
    /// Seconds a message is kept; 0 = unlimited.
    pub history_ttl: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub data_dir: PathBuf,
    /// Acknowledge a broadcast only after it is flushed to disk. `false` is UNSAFE: a crash can
    /// lose acknowledged messages (sled still flushes in the background every 500 ms).
    pub fsync: bool,
    /// sled page cache size in bytes.
    pub cache_capacity: u64,
    /// Byte budget of the cache of recently read chunks (0 disables it).
    pub read_cache_bytes: u64,
    /// Most stream entries kept in memory; entries idle for 30 s leave earlier.
    pub max_streams_loaded: u64,
    /// Most bytes of broadcasts waiting to be written; beyond it broadcasts answer 503.
    pub max_queued_bytes: u64,
    /// Seconds a removed stream's tombstone is kept (its readers get `410` for what they
    /// missed, and its offsets never run backwards); 0: none are kept.
    pub tombstone_ttl: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamsConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    pub public: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    pub param: String,
    pub force: bool,
}

/// Cluster mode: the log in NATS JetStream (`broker.adapter = "nats"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// NATS server URLs, comma-separated.
    pub servers: String,
    /// Replicas of the JetStream stream (1, 3 or 5 in practice).
    pub replicas: u64,
    /// Name of the JetStream stream; two deployments on one NATS use two names.
    pub stream: String,
    /// Seconds a broadcast waits for JetStream's acknowledgement before answering 503.
    pub publish_timeout: u64,
    /// Apply this node's retention and replicas to an existing stream that has others,
    /// instead of refusing to start (for rolling changes).
    pub update_stream: bool,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            servers: "nats://127.0.0.1:4222".into(),
            replicas: 3,
            stream: "ANYCABLE_DS".into(),
            publish_timeout: 5,
            update_stream: false,
        }
    }
}

/// Authentication of readers by the application over AnyCable's HTTP RPC (`connect`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RpcConfig {
    /// Base URL of the application's RPC endpoint (`http://` or `https://`); the server POSTs
    /// `{host}/connect`. Unset: RPC off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Bearer secret sent to the application; derived from `secret` when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Request headers passed on to the application, comma-separated (lower case).
    pub proxy_headers: String,
    /// Cookies passed on, comma-separated; empty passes them all.
    pub proxy_cookies: String,
    /// Milliseconds a read waits for the application's answer (a free slot included).
    pub request_timeout: u64,
    /// Most calls to the application at once.
    pub concurrency: u64,
    /// Seconds a successful answer is reused for the same credentials; 0 = every read asks.
    pub cache_ttl: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpBroadcastConfig {
    pub path: String,
    pub max_body: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub http_path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    pub level: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 8080,
            allowed_origins: String::new(),
            health_path: "/health".into(),
            workers: 0,
            max_connections: 0,
            write_timeout: 30,
            body_timeout: 30,
            max_body_bytes_in_flight: 64 * 1024 * 1024,
        }
    }
}

impl Default for DsConfig {
    fn default() -> Self {
        DsConfig {
            path: "/ds".into(),
            skip_auth: false,
            poll_interval: 10,
            sse_ttl: 60,
            max_chunk_bytes: 4 * 1024 * 1024,
            max_live_readers: 10_000,
            max_unsent_bytes: 256 * 1024 * 1024,
            max_transient_bytes: 64 * 1024 * 1024,
            writes: true,
            implicit_streams: true,
            max_append_bytes: 8 * 1024 * 1024,
            webhooks_allow_loopback: false,
        }
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig { adapter: "sled".into(), history_limit: 100, history_ttl: 300 }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: PathBuf::from("./data"),
            fsync: true,
            cache_capacity: 64 * 1024 * 1024,
            read_cache_bytes: 64 * 1024 * 1024,
            max_streams_loaded: 100_000,
            max_queued_bytes: 64 * 1024 * 1024,
            tombstone_ttl: 7 * 24 * 3600,
        }
    }
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig { secret: None, param: "jid".into(), force: false }
    }
}

impl Default for RpcConfig {
    fn default() -> Self {
        RpcConfig {
            host: None,
            secret: None,
            proxy_headers: "cookie".into(),
            proxy_cookies: String::new(),
            request_timeout: 3000,
            concurrency: 28,
            cache_ttl: 0,
        }
    }
}

impl Default for HttpBroadcastConfig {
    fn default() -> Self {
        HttpBroadcastConfig { path: "/_broadcast".into(), max_body: 1024 * 1024 }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { http_path: "/metrics".into() }
    }
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig { level: "info".into() }
    }
}

/// Command-line flags. Every flag also reads `ANYCABLE_<FLAG IN CAPITALS>`; a flag given on the
/// command line wins over its variable, and both win over the config file.
#[derive(Debug, Default, Parser)]
#[command(name = "anycable-ds", version, about = "Durable Streams server with AnyCable's broadcast API")]
pub struct Cli {
    /// Config file [default: ./anycable-ds.toml if it exists]
    #[arg(long, env = "ANYCABLE_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit
    #[arg(long = "print-config")]
    pub print_config: bool,

    /// Application secret (derives the streams, JWT and broadcast secrets); `none` = not set [default: none]
    #[arg(long, env = "ANYCABLE_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Bearer key for the broadcast endpoint; `none` = not set, derived from secret [default: derived from secret]
    #[arg(long = "broadcast_key", env = "ANYCABLE_BROADCAST_KEY", hide_env_values = true)]
    pub broadcast_key: Option<String>,
    /// Public mode: all streams public, no client authentication [default: false]
    #[arg(long, env = "ANYCABLE_PUBLIC", num_args = 0..=1, default_missing_value = "true")]
    pub public: Option<bool>,
    /// Skip client authentication [default: false]
    #[arg(long, env = "ANYCABLE_NOAUTH", num_args = 0..=1, default_missing_value = "true")]
    pub noauth: Option<bool>,

    /// Listen address (server.host) [default: 127.0.0.1]
    #[arg(long, env = "ANYCABLE_HOST")]
    pub host: Option<String>,
    /// Listen port, 0 picks a free one (server.port; PORT is read too) [default: 8080]
    #[arg(long, env = "ANYCABLE_PORT")]
    pub port: Option<u16>,
    /// Allowed CORS origins, comma-separated, `*.example.com` wildcards [default: any]
    #[arg(long = "allowed_origins", env = "ANYCABLE_ALLOWED_ORIGINS")]
    pub allowed_origins: Option<String>,
    /// Health check path (server.health_path) [default: /health]
    #[arg(long = "health_path", env = "ANYCABLE_HEALTH_PATH")]
    pub health_path: Option<String>,
    /// HTTP worker threads, 0 = one per core, at most 1024 (server.workers) [default: 0]
    #[arg(long = "workers", env = "ANYCABLE_WORKERS")]
    pub workers: Option<usize>,
    /// Most open connections, 0 = from the open-file limit (server.max_connections) [default: 0]
    #[arg(long = "max_connections", env = "ANYCABLE_MAX_CONNECTIONS")]
    pub max_connections: Option<u64>,
    /// Seconds a response may make no progress before its connection is closed (server.write_timeout) [default: 30]
    #[arg(long = "write_timeout", env = "ANYCABLE_WRITE_TIMEOUT")]
    pub write_timeout: Option<u64>,
    /// Seconds a request body may take to arrive in full, then 408 (server.body_timeout) [default: 30]
    #[arg(long = "body_timeout", env = "ANYCABLE_BODY_TIMEOUT")]
    pub body_timeout: Option<u64>,
    /// Most request body bytes held at once, all connections together (server.max_body_bytes_in_flight) [default: 67108864]
    #[arg(long = "max_body_bytes_in_flight", env = "ANYCABLE_MAX_BODY_BYTES_IN_FLIGHT")]
    pub max_body_bytes_in_flight: Option<u64>,

    /// URL prefix of Durable Streams reads (ds.path) [default: /ds]
    #[arg(long = "ds_path", env = "ANYCABLE_DS_PATH")]
    pub ds_path: Option<String>,
    /// Skip client authentication for DS reads (ds.skip_auth) [default: false]
    #[arg(long = "ds_skip_auth", env = "ANYCABLE_DS_SKIP_AUTH", num_args = 0..=1, default_missing_value = "true")]
    pub ds_skip_auth: Option<bool>,
    /// The Durable Streams write API: PUT, POST, DELETE (ds.writes) [default: true]
    #[arg(long = "ds_writes", env = "ANYCABLE_DS_WRITES", num_args = 0..=1, default_missing_value = "true")]
    pub ds_writes: Option<bool>,
    /// Unknown streams read as empty; false: 404 (ds.implicit_streams) [default: true]
    #[arg(long = "ds_implicit_streams", env = "ANYCABLE_DS_IMPLICIT_STREAMS", num_args = 0..=1, default_missing_value = "true")]
    pub ds_implicit_streams: Option<bool>,
    /// Largest PUT/POST body, 1 B..=1 GiB (ds.max_append_bytes) [default: 8388608]
    #[arg(long = "ds_max_append_bytes", env = "ANYCABLE_DS_MAX_APPEND_BYTES")]
    pub ds_max_append_bytes: Option<u64>,
    /// Webhook subscriptions may target loopback addresses; tests only (ds.webhooks_allow_loopback) [default: false]
    #[arg(long = "ds_webhooks_allow_loopback", env = "ANYCABLE_DS_WEBHOOKS_ALLOW_LOOPBACK", num_args = 0..=1, default_missing_value = "true")]
    pub ds_webhooks_allow_loopback: Option<bool>,
    /// Long-poll timeout in seconds, 1..=3600 (ds.poll_interval) [default: 10]
    #[arg(long = "ds_poll_interval", env = "ANYCABLE_DS_POLL_INTERVAL")]
    pub ds_poll_interval: Option<u64>,
    /// Maximum SSE connection lifetime in seconds, 1..=86400 (ds.sse_ttl) [default: 60]
    #[arg(long = "ds_sse_ttl", env = "ANYCABLE_DS_SSE_TTL")]
    pub ds_sse_ttl: Option<u64>,
    /// Maximum message bytes per read response, 1 B..=1 GiB (ds.max_chunk_bytes) [default: 4194304]
    #[arg(long = "ds_max_chunk_bytes", env = "ANYCABLE_DS_MAX_CHUNK_BYTES")]
    pub ds_max_chunk_bytes: Option<u64>,
    /// Most live (long-poll + SSE) readers, 0 = no limit but connections (ds.max_live_readers) [default: 10000]
    #[arg(long = "ds_max_live_readers", env = "ANYCABLE_DS_MAX_LIVE_READERS")]
    pub ds_max_live_readers: Option<u64>,
    /// Most bytes of read responses not yet taken by their clients (ds.max_unsent_bytes) [default: 268435456]
    #[arg(long = "ds_max_unsent_bytes", env = "ANYCABLE_DS_MAX_UNSENT_BYTES")]
    pub ds_max_unsent_bytes: Option<u64>,
    /// Most bytes of transient batches kept for live readers (ds.max_transient_bytes) [default: 67108864]
    #[arg(long = "ds_max_transient_bytes", env = "ANYCABLE_DS_MAX_TRANSIENT_BYTES")]
    pub ds_max_transient_bytes: Option<u64>,

    /// Log engine: sled (embedded) or nats (NATS JetStream, cluster mode) (broker.adapter) [default: sled]
    #[arg(long = "broker", env = "ANYCABLE_BROKER")]
    pub broker: Option<String>,
    /// NATS server URLs, comma-separated (nats.servers) [default: nats://127.0.0.1:4222]
    #[arg(long = "nats_servers", env = "ANYCABLE_NATS_SERVERS")]
    pub nats_servers: Option<String>,
    /// Replicas of the JetStream stream, 1..=5 (nats.replicas) [default: 3]
    #[arg(long = "nats_replicas", env = "ANYCABLE_NATS_REPLICAS")]
    pub nats_replicas: Option<u64>,
    /// Name of the JetStream stream (nats.stream) [default: ANYCABLE_DS]
    #[arg(long = "nats_stream", env = "ANYCABLE_NATS_STREAM")]
    pub nats_stream: Option<String>,
    /// Seconds a broadcast waits for JetStream, 1..=60 (nats.publish_timeout) [default: 5]
    #[arg(long = "nats_publish_timeout", env = "ANYCABLE_NATS_PUBLISH_TIMEOUT")]
    pub nats_publish_timeout: Option<u64>,
    /// Apply this node's retention and replicas to an existing stream (nats.update_stream) [default: false]
    #[arg(long = "nats_update_stream", env = "ANYCABLE_NATS_UPDATE_STREAM", num_args = 0..=1, default_missing_value = "true")]
    pub nats_update_stream: Option<bool>,

    /// Messages kept per stream, 0 = unlimited (broker.history_limit) [default: 100]
    #[arg(long = "history_limit", env = "ANYCABLE_HISTORY_LIMIT")]
    pub history_limit: Option<u64>,
    /// Seconds a message is kept, 0 = unlimited, at most 10 years (broker.history_ttl) [default: 300]
    #[arg(long = "history_ttl", env = "ANYCABLE_HISTORY_TTL")]
    pub history_ttl: Option<u64>,

    /// Data directory (storage.data_dir) [default: ./data]
    #[arg(long = "data_dir", env = "ANYCABLE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Acknowledge broadcasts only once flushed to disk; false is UNSAFE (storage.fsync) [default: true]
    #[arg(long = "storage_fsync", env = "ANYCABLE_STORAGE_FSYNC", num_args = 0..=1, default_missing_value = "true")]
    pub storage_fsync: Option<bool>,
    /// sled cache size in bytes, 1 MiB..=1 TiB (storage.cache_capacity) [default: 67108864]
    #[arg(long = "storage_cache_capacity", env = "ANYCABLE_STORAGE_CACHE_CAPACITY")]
    pub storage_cache_capacity: Option<u64>,
    /// Byte budget of the read chunk cache, 0 disables it, at most 1 TiB (storage.read_cache_bytes) [default: 67108864]
    #[arg(long = "storage_read_cache_bytes", env = "ANYCABLE_STORAGE_READ_CACHE_BYTES")]
    pub storage_read_cache_bytes: Option<u64>,
    /// Most stream entries in memory (storage.max_streams_loaded) [default: 100000]
    #[arg(long = "storage_max_streams_loaded", env = "ANYCABLE_STORAGE_MAX_STREAMS_LOADED")]
    pub storage_max_streams_loaded: Option<u64>,
    /// Most bytes of broadcasts waiting to be written (storage.max_queued_bytes) [default: 67108864]
    #[arg(long = "storage_max_queued_bytes", env = "ANYCABLE_STORAGE_MAX_QUEUED_BYTES")]
    pub storage_max_queued_bytes: Option<u64>,
    /// Seconds a removed stream's tombstone is kept, 0 = none (storage.tombstone_ttl) [default: 604800]
    #[arg(long = "tombstone_ttl", env = "ANYCABLE_TOMBSTONE_TTL")]
    pub tombstone_ttl: Option<u64>,

    /// Secret for signed stream names; `none` = not set, from secret (streams.secret) [default: from secret]
    #[arg(long = "streams_secret", env = "ANYCABLE_STREAMS_SECRET", hide_env_values = true)]
    pub streams_secret: Option<String>,
    /// Accept unsigned stream names (streams.public) [default: false]
    #[arg(long = "public_streams", env = "ANYCABLE_PUBLIC_STREAMS", num_args = 0..=1, default_missing_value = "true")]
    pub public_streams: Option<bool>,

    /// JWT secret; `none` turns JWT off even when secret is set (jwt.secret) [default: from secret]
    #[arg(long = "jwt_secret", env = "ANYCABLE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// JWT query parameter; the header is X-<param> (jwt.param) [default: jid]
    #[arg(long = "jwt_param", env = "ANYCABLE_JWT_PARAM")]
    pub jwt_param: Option<String>,
    /// Refuse clients without a JWT (jwt.force) [default: false]
    #[arg(long = "enforce_jwt", env = "ANYCABLE_ENFORCE_JWT", num_args = 0..=1, default_missing_value = "true")]
    pub enforce_jwt: Option<bool>,

    /// Application RPC URL: DS readers are authenticated by POST {URL}/connect (rpc.host) [default: none, RPC off]
    #[arg(long = "rpc_host", env = "ANYCABLE_RPC_HOST")]
    pub rpc_host: Option<String>,
    /// Bearer secret for the application's RPC; `none` = not set (rpc.secret) [default: derived from secret]
    #[arg(long = "http_rpc_secret", env = "ANYCABLE_HTTP_RPC_SECRET", hide_env_values = true)]
    pub http_rpc_secret: Option<String>,
    /// Request headers passed to the application, comma-separated (rpc.proxy_headers) [default: cookie]
    #[arg(long = "headers", env = "ANYCABLE_HEADERS")]
    pub headers: Option<String>,
    /// Cookies passed to the application, comma-separated (rpc.proxy_cookies) [default: all]
    #[arg(long = "proxy-cookies", env = "ANYCABLE_PROXY_COOKIES")]
    pub proxy_cookies: Option<String>,
    /// Milliseconds to wait for the application, 1..=600000 (rpc.request_timeout) [default: 3000]
    #[arg(long = "rpc_request_timeout", env = "ANYCABLE_RPC_REQUEST_TIMEOUT")]
    pub rpc_request_timeout: Option<u64>,
    /// Most calls to the application at once, 1..=10000 (rpc.concurrency) [default: 28]
    #[arg(long = "rpc_concurrency", env = "ANYCABLE_RPC_CONCURRENCY")]
    pub rpc_concurrency: Option<u64>,
    /// Seconds a successful answer is reused for the same credentials, 0 = off, at most 3600 (rpc.cache_ttl) [default: 0]
    #[arg(long = "rpc_cache_ttl", env = "ANYCABLE_RPC_CACHE_TTL")]
    pub rpc_cache_ttl: Option<u64>,
    /// Turn authentication by the application off even when rpc.host is set (norpc) [default: false]
    #[arg(long, env = "ANYCABLE_NORPC", num_args = 0..=1, default_missing_value = "true")]
    pub norpc: Option<bool>,

    /// Broadcast endpoint path (http_broadcast.path) [default: /_broadcast]
    #[arg(long = "http_broadcast_path", env = "ANYCABLE_HTTP_BROADCAST_PATH")]
    pub http_broadcast_path: Option<String>,
    /// Maximum broadcast body in bytes, 1 B..=1 GiB (http_broadcast.max_body) [default: 1048576]
    #[arg(long = "http_broadcast_max_body", env = "ANYCABLE_HTTP_BROADCAST_MAX_BODY")]
    pub http_broadcast_max_body: Option<u64>,

    /// Prometheus metrics path (metrics.http_path) [default: /metrics]
    #[arg(long = "metrics_http", env = "ANYCABLE_METRICS_HTTP")]
    pub metrics_http: Option<String>,
    /// Log level: error, warn, info, debug, trace (logging.level; RUST_LOG overrides) [default: info]
    #[arg(long = "log_level", env = "ANYCABLE_LOG_LEVEL")]
    pub log_level: Option<String>,
}

impl Cli {
    /// The flag (or env) values as `config` overrides, keyed by TOML key.
    fn overrides(&self) -> Vec<(&'static str, config::Value)> {
        fn push<T: Into<config::Value> + Clone>(
            out: &mut Vec<(&'static str, config::Value)>,
            key: &'static str,
            v: &Option<T>,
        ) {
            if let Some(v) = v {
                out.push((key, v.clone().into()));
            }
        }
        let path_str = |p: &Option<PathBuf>| p.as_ref().map(|p| p.to_string_lossy().into_owned());
        let mut out = Vec::new();
        push(&mut out, "secret", &self.secret);
        push(&mut out, "broadcast_key", &self.broadcast_key);
        push(&mut out, "public", &self.public);
        push(&mut out, "noauth", &self.noauth);
        push(&mut out, "server.host", &self.host);
        push(&mut out, "server.port", &self.port.map(i64::from));
        push(&mut out, "server.allowed_origins", &self.allowed_origins);
        push(&mut out, "server.health_path", &self.health_path);
        push(&mut out, "server.workers", &self.workers.map(|v| v as u64));
        push(&mut out, "server.max_connections", &self.max_connections);
        push(&mut out, "server.write_timeout", &self.write_timeout);
        push(&mut out, "server.body_timeout", &self.body_timeout);
        push(&mut out, "server.max_body_bytes_in_flight", &self.max_body_bytes_in_flight);
        push(&mut out, "ds.path", &self.ds_path);
        push(&mut out, "ds.skip_auth", &self.ds_skip_auth);
        push(&mut out, "ds.writes", &self.ds_writes);
        push(&mut out, "ds.implicit_streams", &self.ds_implicit_streams);
        push(&mut out, "ds.max_append_bytes", &self.ds_max_append_bytes);
        push(&mut out, "ds.webhooks_allow_loopback", &self.ds_webhooks_allow_loopback);
        push(&mut out, "ds.poll_interval", &self.ds_poll_interval);
        push(&mut out, "ds.sse_ttl", &self.ds_sse_ttl);
        push(&mut out, "ds.max_chunk_bytes", &self.ds_max_chunk_bytes);
        push(&mut out, "ds.max_live_readers", &self.ds_max_live_readers);
        push(&mut out, "ds.max_unsent_bytes", &self.ds_max_unsent_bytes);
        push(&mut out, "ds.max_transient_bytes", &self.ds_max_transient_bytes);
        push(&mut out, "broker.adapter", &self.broker);
        push(&mut out, "nats.servers", &self.nats_servers);
        push(&mut out, "nats.replicas", &self.nats_replicas);
        push(&mut out, "nats.stream", &self.nats_stream);
        push(&mut out, "nats.publish_timeout", &self.nats_publish_timeout);
        push(&mut out, "nats.update_stream", &self.nats_update_stream);
        push(&mut out, "broker.history_limit", &self.history_limit);
        push(&mut out, "broker.history_ttl", &self.history_ttl);
        push(&mut out, "storage.data_dir", &path_str(&self.data_dir));
        push(&mut out, "storage.fsync", &self.storage_fsync);
        push(&mut out, "storage.cache_capacity", &self.storage_cache_capacity);
        push(&mut out, "storage.read_cache_bytes", &self.storage_read_cache_bytes);
        push(&mut out, "storage.max_streams_loaded", &self.storage_max_streams_loaded);
        push(&mut out, "storage.max_queued_bytes", &self.storage_max_queued_bytes);
        push(&mut out, "storage.tombstone_ttl", &self.tombstone_ttl);
        push(&mut out, "streams.secret", &self.streams_secret);
        push(&mut out, "streams.public", &self.public_streams);
        push(&mut out, "jwt.secret", &self.jwt_secret);
        push(&mut out, "jwt.param", &self.jwt_param);
        push(&mut out, "jwt.force", &self.enforce_jwt);
        push(&mut out, "rpc.host", &self.rpc_host);
        push(&mut out, "rpc.secret", &self.http_rpc_secret);
        push(&mut out, "rpc.proxy_headers", &self.headers);
        push(&mut out, "rpc.proxy_cookies", &self.proxy_cookies);
        push(&mut out, "rpc.request_timeout", &self.rpc_request_timeout);
        push(&mut out, "rpc.concurrency", &self.rpc_concurrency);
        push(&mut out, "rpc.cache_ttl", &self.rpc_cache_ttl);
        push(&mut out, "norpc", &self.norpc);
        push(&mut out, "http_broadcast.path", &self.http_broadcast_path);
        push(&mut out, "http_broadcast.max_body", &self.http_broadcast_max_body);
        push(&mut out, "metrics.http_path", &self.metrics_http);
        push(&mut out, "logging.level", &self.log_level);
        out
    }
}

impl Config {
    /// Builds the effective configuration from the flags (and env, via clap) and the config file.
    pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
        let defaults = config::Config::try_from(&Config::default()).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let mut builder = config::Config::builder().add_source(defaults);

        let (file, required) = match &cli.config {
            Some(path) => (path.clone(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_FILE), false),
        };
        if required || file.exists() {
            builder = builder.add_source(file_source(&file)?);
        }
        // `PORT` (as set by PaaS platforms) sits below `ANYCABLE_PORT` and `--port`.
        if cli.port.is_none() {
            if let Ok(port) = std::env::var("PORT") {
                let port: u16 =
                    port.parse().map_err(|_| ConfigError::Invalid(format!("PORT: not a port number: {port:?}")))?;
                builder = builder.set_override("server.port", i64::from(port)).expect("static key");
            }
        }
        for (key, value) in cli.overrides() {
            builder = builder.set_override(key, value).expect("static key");
        }
        let merged = builder.build().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let mut config: Config = merged.try_deserialize().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        config.normalize();
        config.validate()?;
        Ok(config)
    }

    /// AnyCable treats a secret spelled `none` (or empty) as "not set", so the derived
    /// secrets fall back to `secret`. The exception is `jwt.secret = "none"`, which is kept as
    /// it is: it turns JWT off even when `secret` is set (see [`Config::effective_jwt_secret`]),
    /// and keeping it makes `--print-config` print it, so the printed TOML means the same.
    fn normalize(&mut self) {
        for secret in [
            &mut self.secret,
            &mut self.broadcast_key,
            &mut self.streams.secret,
            &mut self.rpc.secret,
            &mut self.rpc.host,
        ] {
            if matches!(secret.as_deref(), Some("none") | Some("")) {
                *secret = None;
            }
        }
        if self.jwt.secret.as_deref() == Some("") {
            self.jwt.secret = None;
        }
        // Header names are case-insensitive; AnyCable sends them to the application in lower case.
        let list = |s: &str, lower: bool| {
            s.split(',')
                .map(|item| if lower { item.trim().to_ascii_lowercase() } else { item.trim().to_string() })
                .filter(|item| !item.is_empty())
                .collect::<Vec<_>>()
                .join(",")
        };
        self.rpc.proxy_headers = list(&self.rpc.proxy_headers, true);
        self.rpc.proxy_cookies = list(&self.rpc.proxy_cookies, false);
        // Keep the path prefixes canonical: leading slash, no trailing slash.
        for path in [
            &mut self.ds.path,
            &mut self.http_broadcast.path,
            &mut self.server.health_path,
            &mut self.metrics.http_path,
        ] {
            let trimmed = path.trim_end_matches('/');
            *path = if trimmed.starts_with('/') { trimmed.to_string() } else { format!("/{trimmed}") };
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError::Invalid(format!("{key}: {why}")));
        if self.ds.path == "/" || self.ds.path.is_empty() {
            return bad("ds.path", "must not be the root path");
        }
        /// Every duration and size has a sane range: a value past it is a typo or an attempt at
        /// "infinite" that overflows somewhere (`Instant + Duration` panics) or that a library
        /// refuses (sled panics below a 256-byte cache). Counts that are only compared
        /// (history_limit, max_live_readers, max_connections) need no bound, except the worker
        /// count: each worker is a thread.
        fn in_range(
            key: &str,
            value: u64,
            range: std::ops::RangeInclusive<u64>,
            unit: &str,
        ) -> Result<(), ConfigError> {
            if range.contains(&value) {
                return Ok(());
            }
            let (min, max) = (range.start(), range.end());
            Err(ConfigError::Invalid(format!("{key}: must be between {min} and {max}{unit}, not {value}")))
        }
        const GIB: u64 = 1 << 30;
        const TIB: u64 = 1 << 40;
        const TEN_YEARS: u64 = 10 * 365 * 24 * 3600;
        let ranges = [
            ("ds.poll_interval", self.ds.poll_interval, 1..=3600, " seconds"),
            ("ds.sse_ttl", self.ds.sse_ttl, 1..=86_400, " seconds"),
            ("broker.history_ttl", self.broker.history_ttl, 0..=TEN_YEARS, " seconds (0 = unlimited)"),
            ("ds.max_chunk_bytes", self.ds.max_chunk_bytes, 1..=GIB, " bytes"),
            ("http_broadcast.max_body", self.http_broadcast.max_body, 1..=GIB, " bytes"),
            ("ds.max_append_bytes", self.ds.max_append_bytes, 1..=GIB, " bytes"),
            ("server.workers", self.server.workers as u64, 0..=1024, " (0 = one per core)"),
            ("storage.cache_capacity", self.storage.cache_capacity, 1 << 20..=TIB, " bytes"),
            ("storage.read_cache_bytes", self.storage.read_cache_bytes, 0..=TIB, " bytes (0 = off)"),
            ("server.write_timeout", self.server.write_timeout, 1..=3600, " seconds"),
            ("server.body_timeout", self.server.body_timeout, 1..=3600, " seconds"),
            ("server.max_body_bytes_in_flight", self.server.max_body_bytes_in_flight, 1 << 20..=TIB, " bytes"),
            ("ds.max_unsent_bytes", self.ds.max_unsent_bytes, 1 << 20..=TIB, " bytes"),
            ("ds.max_transient_bytes", self.ds.max_transient_bytes, 0..=TIB, " bytes"),
            ("storage.max_streams_loaded", self.storage.max_streams_loaded, 1..=1 << 32, ""),
            ("storage.max_queued_bytes", self.storage.max_queued_bytes, 1..=TIB, " bytes"),
            ("storage.tombstone_ttl", self.storage.tombstone_ttl, 0..=TEN_YEARS, " seconds (0 = none)"),
            ("rpc.request_timeout", self.rpc.request_timeout, 1..=600_000, " ms"),
            ("rpc.concurrency", self.rpc.concurrency, 1..=10_000, ""),
            ("rpc.cache_ttl", self.rpc.cache_ttl, 0..=3600, " seconds (0 = off)"),
            ("nats.replicas", self.nats.replicas, 1..=5, ""),
            ("nats.publish_timeout", self.nats.publish_timeout, 1..=60, " seconds"),
        ];
        for (key, value, range, unit) in ranges {
            in_range(key, value, range, unit)?;
        }
        if self.server.max_body_bytes_in_flight < self.http_broadcast.max_body {
            return bad(
                "server.max_body_bytes_in_flight",
                &format!(
                    "must be at least http_broadcast.max_body ({} bytes): a broadcast that can never fit would be refused for ever",
                    self.http_broadcast.max_body
                ),
            );
        }
        if self.ds.writes && self.server.max_body_bytes_in_flight < self.ds.max_append_bytes {
            return bad(
                "server.max_body_bytes_in_flight",
                &format!(
                    "must be at least ds.max_append_bytes ({} bytes): an append that can never fit would be refused for ever",
                    self.ds.max_append_bytes
                ),
            );
        }
        if self.jwt.param.is_empty()
            || !self.jwt.param.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return bad("jwt.param", "must be a non-empty name of letters, digits, '-' or '_'");
        }
        if self.jwt.force && self.effective_jwt_secret().is_none() {
            return bad("jwt.force", "needs a JWT secret (jwt.secret or secret; jwt.secret = \"none\" turns JWT off)");
        }
        if !matches!(self.broker.adapter.as_str(), "sled" | "nats") {
            return bad(
                "broker.adapter",
                &format!("must be sled (embedded) or nats (cluster), not {:?}", self.broker.adapter),
            );
        }
        if self.broker.adapter == "nats" && self.nats.servers.split(',').all(|s| s.trim().is_empty()) {
            return bad("nats.servers", "must name at least one NATS server (nats://host:4222)");
        }
        if self.nats.stream.is_empty()
            || self.nats.stream.len() > 128
            || !self.nats.stream.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return bad("nats.stream", "must be 1 to 128 letters, digits, '-' or '_' (a JetStream stream name)");
        }
        if let Some(host) = &self.rpc.host {
            if let Err(why) = crate::rpc::connect_url(host) {
                return bad("rpc.host", &why);
            }
        }
        for name in self.rpc.proxy_headers.split(',').filter(|n| !n.is_empty()) {
            if actix_web::http::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return bad("rpc.proxy_headers", &format!("{name:?} is not a header name"));
            }
        }
        if self.logging.level.parse::<log::LevelFilter>().is_err() {
            return bad("logging.level", "must be one of off, error, warn, info, debug, trace");
        }
        let paths = [
            ("ds.path", &self.ds.path),
            ("http_broadcast.path", &self.http_broadcast.path),
            ("server.health_path", &self.server.health_path),
            ("metrics.http_path", &self.metrics.http_path),
        ];
        for (i, (key, path)) in paths.iter().enumerate() {
            for (other_key, other) in &paths[i + 1..] {
                if path == other {
                    return bad(key, &format!("same path as {other_key}"));
                }
            }
        }
        Ok(())
    }

    /// The effective configuration as TOML; fed back as a config file it gives the same config.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes to TOML")
    }

    /// The key that `POST /_broadcast` requires, if any: `broadcast_key`, else derived from
    /// `secret` as AnyCable does.
    pub fn effective_broadcast_key(&self) -> Option<String> {
        self.broadcast_key.clone().or_else(|| self.secret.as_deref().map(crate::auth::derive_broadcast_key))
    }

    /// The secret that signs stream names (`streams.secret`, else `secret`).
    pub fn effective_streams_secret(&self) -> Option<&str> {
        self.streams.secret.as_deref().or(self.secret.as_deref())
    }

    /// The JWT secret: `jwt.secret`, else `secret`; `None` (JWT off) when neither is set or
    /// when `jwt.secret` is `none`, which turns JWT off even when `secret` is set.
    pub fn effective_jwt_secret(&self) -> Option<&str> {
        match self.jwt.secret.as_deref() {
            Some("none") => None,
            Some(secret) => Some(secret),
            None => self.secret.as_deref(),
        }
    }

    /// The application's RPC base URL when readers are authenticated by it: `rpc.host`, unless
    /// `norpc` or client authentication is skipped.
    pub fn effective_rpc_host(&self) -> Option<&str> {
        match self.rpc.host.as_deref() {
            Some(host) if !self.norpc && !self.skip_client_auth() => Some(host),
            _ => None,
        }
    }

    /// The bearer secret of RPC calls: `rpc.secret`, else derived from `secret` as AnyCable does.
    pub fn effective_rpc_secret(&self) -> Option<String> {
        self.rpc.secret.clone().or_else(|| self.secret.as_deref().map(crate::auth::derive_rpc_secret))
    }

    /// Unsigned stream names are accepted (`streams.public` or `public`).
    pub fn public_streams(&self) -> bool {
        self.public || self.streams.public
    }

    /// Client authentication (JWT) is skipped for DS reads.
    pub fn skip_client_auth(&self) -> bool {
        self.public || self.noauth || self.ds.skip_auth
    }
}

fn file_source(path: &Path) -> Result<config::File<config::FileSourceFile, config::FileFormat>, ConfigError> {
    if !path.is_file() {
        return Err(ConfigError::File { path: path.display().to_string(), message: "not found".into() });
    }
    Ok(config::File::from(path).format(config::FileFormat::Toml).required(true))
}
