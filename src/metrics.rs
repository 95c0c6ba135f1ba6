//! Prometheus metrics, named after AnyCable's where one exists.
//!
//! One process-wide registry: metrics are written from the HTTP workers and from the storage
//! threads alike, and a global avoids threading a handle through code that has no other
//! reason to know about metrics.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub poll_requests: IntCounter,
    pub sse_requests: IntCounter,
    pub sse_frames_shared: IntCounter,
    pub poll_clients: IntGauge,
    pub sse_clients: IntGauge,
    pub broadcasts: IntCounter,
    pub messages_stored: IntCounter,
    pub broadcast_rejected: IntCounterVec,
    pub auth_failures: IntCounterVec,
    pub append_seconds: Histogram,
    pub flush_seconds: Histogram,
    pub flush_group_size: Histogram,
    pub storage_bytes: IntGauge,
    pub streams_loaded: IntGauge,
    pub streams_total: IntGauge,
    pub hub_streams: IntGauge,
    pub streams_evicted: IntCounter,
    pub streams_removed: IntCounter,
    pub messages_trimmed: IntCounter,
    pub writer_queue_bytes: IntGauge,
    pub writer_queue_refused: IntCounter,
    pub read_cache_bytes: IntGauge,
    pub unsent_bytes: IntGauge,
    pub unsent_refused: IntCounter,
    pub transient_bytes: IntGauge,
    pub transient_dropped: IntCounter,
    pub live_readers_refused: IntCounter,
    pub stalled_disconnects: IntCounterVec,
    pub body_bytes: IntGauge,
    pub body_capacity: IntGauge,
    pub body_refused: IntCounter,
    pub body_timeouts: IntCounter,
    pub rpc_calls: IntCounter,
    pub rpc_results: IntCounterVec,
    pub rpc_errors: IntCounter,
    pub rpc_timeouts: IntCounter,
    pub rpc_pending: IntGauge,
    pub rpc_in_flight: IntGauge,
    pub rpc_capacity: IntGauge,
    pub rpc_seconds: Histogram,
    pub rpc_breaker_open: IntGauge,
    pub rpc_breaker_refused: IntCounter,
    pub rpc_cache_hits: IntCounter,
    pub rpc_cache_entries: IntGauge,
    pub nats_connected: IntGauge,
    pub nats_publish_seconds: Histogram,
    pub nats_read_seconds: Histogram,
    pub nats_direct_gets: IntCounter,
    pub nats_leader_gets: IntCounter,
    pub webhook_deliveries: IntCounterVec,
    pub webhook_queue_dropped: IntCounter,
    pub subscription_triggers_dropped: IntCounter,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    registry.register(Box::new(metric.clone())).expect("unique metric name");
    metric
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let r = Registry::new();
    let latency_buckets = vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];
    Metrics {
        webhook_deliveries: register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "ds_webhook_deliveries_total",
                    "Webhook delivery attempts by result (ok, failed, gave_up, stale, refused)",
                ),
                &["result"],
            )
            .unwrap(),
        ),
        webhook_queue_dropped: register(
            &r,
            IntCounter::new("ds_webhook_queue_dropped_total", "Webhook wakes dropped: the delivery queue was full")
                .unwrap(),
        ),
        subscription_triggers_dropped: register(
            &r,
            IntCounter::new(
                "ds_subscription_triggers_dropped_total",
                "Appends not linked to a glob subscription: too many waiting, or the subscription's link limit",
            )
            .unwrap(),
        ),
        requests: register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "ds_requests_total",
                    "DS requests by mode (catchup, poll, sse, head, create, append, delete) and status",
                ),
                &["mode", "status"],
            )
            .unwrap(),
        ),
        poll_requests: register(&r, IntCounter::new("ds_poll_requests_total", "Long-poll requests").unwrap()),
        sse_requests: register(&r, IntCounter::new("ds_sse_requests_total", "SSE requests").unwrap()),
        sse_frames_shared: register(
            &r,
            IntCounter::new("ds_sse_frames_shared_total", "SSE frames sent as another reader's copy (same chunk)")
                .unwrap(),
        ),
        poll_clients: register(&r, IntGauge::new("ds_poll_clients_num", "Long-poll requests waiting now").unwrap()),
        sse_clients: register(&r, IntGauge::new("ds_sse_clients_num", "SSE responses open now").unwrap()),
        broadcasts: register(&r, IntCounter::new("broadcast_msg_total", "Broadcast requests accepted").unwrap()),
        messages_stored: register(
            &r,
            IntCounter::new("ds_messages_stored_total", "Messages appended to the log").unwrap(),
        ),
        broadcast_rejected: register(
            &r,
            IntCounterVec::new(
                Opts::new("broadcast_rejected_total", "Broadcast requests refused, by reason"),
                &["reason"],
            )
            .unwrap(),
        ),
        auth_failures: register(
            &r,
            IntCounterVec::new(Opts::new("ds_auth_failures_total", "Refused DS reads, by reason"), &["reason"])
                .unwrap(),
        ),
        append_seconds: register(
            &r,
            Histogram::with_opts(
                HistogramOpts::new("ds_append_seconds", "Time to apply one broadcast to the log")
                    .buckets(latency_buckets.clone()),
            )
            .unwrap(),
        ),
        flush_seconds: register(
            &r,
            Histogram::with_opts(
                HistogramOpts::new("ds_flush_seconds", "Time of one group flush to disk").buckets(latency_buckets),
            )
            .unwrap(),
        ),
        flush_group_size: register(
            &r,
            Histogram::with_opts(
                HistogramOpts::new("ds_flush_group_size", "Broadcasts made durable by one flush")
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
            )
            .unwrap(),
        ),
        storage_bytes: register(&r, IntGauge::new("ds_storage_bytes", "Size of the data directory on disk").unwrap()),
        streams_loaded: register(&r, IntGauge::new("ds_streams_loaded", "Streams held in memory").unwrap()),
        streams_total: register(&r, IntGauge::new("ds_streams_num", "Streams ever written to the store").unwrap()),
        hub_streams: register(&r, IntGauge::new("ds_hub_streams", "Streams with live readers waiting").unwrap()),
        streams_evicted: register(
            &r,
            IntCounter::new("ds_streams_evicted_total", "Idle stream entries dropped from memory").unwrap(),
        ),
        streams_removed: register(
            &r,
            IntCounter::new("ds_streams_removed_total", "Streams removed from disk once all their messages expired")
                .unwrap(),
        ),
        messages_trimmed: register(
            &r,
            IntCounter::new("ds_messages_trimmed_total", "Messages deleted from disk by retention").unwrap(),
        ),
        writer_queue_bytes: register(
            &r,
            IntGauge::new("ds_writer_queue_bytes", "Bytes of broadcasts waiting to be written").unwrap(),
        ),
        writer_queue_refused: register(
            &r,
            IntCounter::new("ds_writer_queue_refused_total", "Broadcasts refused because the writer queue was full")
                .unwrap(),
        ),
        read_cache_bytes: register(
            &r,
            IntGauge::new("ds_read_cache_bytes", "Bytes held by the read chunk cache, overhead included").unwrap(),
        ),
        unsent_bytes: register(
            &r,
            IntGauge::new("ds_unsent_bytes", "Bytes of read responses not yet taken by their clients").unwrap(),
        ),
        unsent_refused: register(
            &r,
            IntCounter::new("ds_unsent_refused_total", "Reads refused because ds.max_unsent_bytes was reached")
                .unwrap(),
        ),
        transient_bytes: register(
            &r,
            IntGauge::new("ds_transient_bytes", "Bytes of transient batches kept for live readers").unwrap(),
        ),
        transient_dropped: register(
            &r,
            IntCounter::new("ds_transient_dropped_total", "Transient batches dropped by ds.max_transient_bytes")
                .unwrap(),
        ),
        live_readers_refused: register(
            &r,
            IntCounter::new("ds_live_readers_refused_total", "Live reads refused by ds.max_live_readers").unwrap(),
        ),
        stalled_disconnects: register(
            &r,
            IntCounterVec::new(
                Opts::new("ds_stalled_disconnects_total", "Connections closed because their client stopped reading"),
                &["reason"],
            )
            .unwrap(),
        ),
        body_bytes: register(
            &r,
            IntGauge::new("http_body_bytes", "Bytes of request bodies being received and held now").unwrap(),
        ),
        body_capacity: register(
            &r,
            IntGauge::new(
                "http_body_capacity_bytes",
                "Most request body bytes held at once (max_body_bytes_in_flight)",
            )
            .unwrap(),
        ),
        body_refused: register(
            &r,
            IntCounter::new(
                "http_body_refused_total",
                "Requests refused because server.max_body_bytes_in_flight was reached",
            )
            .unwrap(),
        ),
        body_timeouts: register(
            &r,
            IntCounter::new("http_body_timeout_total", "Requests whose body did not arrive within server.body_timeout")
                .unwrap(),
        ),
        rpc_calls: register(&r, IntCounter::new("rpc_call_total", "Calls made to the application's RPC").unwrap()),
        rpc_results: register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "rpc_result_total",
                    "RPC authentications by outcome: success, failure (rejected), error (app failed), \
                     unavailable (no answer, timeout, breaker open)",
                ),
                &["result"],
            )
            .unwrap(),
        ),
        rpc_errors: register(
            &r,
            IntCounter::new("rpc_error_total", "RPC calls that got no usable answer (timeouts included)").unwrap(),
        ),
        rpc_timeouts: register(
            &r,
            IntCounter::new("rpc_timeout_total", "RPC authentications that ran out of rpc.request_timeout").unwrap(),
        ),
        rpc_pending: register(&r, IntGauge::new("rpc_pending_num", "Reads waiting for a free RPC slot").unwrap()),
        rpc_in_flight: register(&r, IntGauge::new("rpc_in_flight_num", "RPC calls in flight").unwrap()),
        rpc_capacity: register(
            &r,
            IntGauge::new("rpc_capacity_num", "Most RPC calls at once (rpc.concurrency)").unwrap(),
        ),
        rpc_seconds: register(
            &r,
            Histogram::with_opts(
                HistogramOpts::new("rpc_call_seconds", "Duration of one RPC call to the application")
                    .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            )
            .unwrap(),
        ),
        rpc_breaker_open: register(
            &r,
            IntGauge::new("rpc_breaker_open", "1 while calls to a failing application are paused, else 0").unwrap(),
        ),
        rpc_breaker_refused: register(
            &r,
            IntCounter::new("rpc_breaker_refused_total", "Authentications answered 503 without calling the paused app")
                .unwrap(),
        ),
        rpc_cache_hits: register(
            &r,
            IntCounter::new("rpc_cache_hit_total", "Authentications answered from the rpc.cache_ttl cache").unwrap(),
        ),
        rpc_cache_entries: register(
            &r,
            IntGauge::new("rpc_cache_entries_num", "Successful authentications kept by the cache").unwrap(),
        ),
        nats_connected: register(
            &r,
            IntGauge::new("nats_connected", "Cluster mode: 1 while connected to NATS, else 0").unwrap(),
        ),
        nats_publish_seconds: register(
            &r,
            Histogram::with_opts(
                HistogramOpts::new("nats_publish_seconds", "Cluster mode: one broadcast from publish to JetStream ack")
                    .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0]),
            )
            .unwrap(),
        ),
        nats_read_seconds: register(
            &r,
            Histogram::with_opts(
                HistogramOpts::new("nats_read_seconds", "Cluster mode: one read (leader lookup and Direct Get)")
                    .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0]),
            )
            .unwrap(),
        ),
        nats_direct_gets: register(
            &r,
            IntCounter::new(
                "nats_direct_gets_total",
                "Cluster mode: batched Direct Gets sent to JetStream (reads woken together share one)",
            )
            .unwrap(),
        ),
        nats_leader_gets: register(
            &r,
            IntCounter::new(
                "nats_leader_gets_total",
                "Cluster mode: questions to the stream leader (MSG.GET; askers at once share one)",
            )
            .unwrap(),
        ),
        registry: r,
    }
});

pub fn get() -> &'static Metrics {
    &METRICS
}

pub fn observe_flush(took: Duration, group: usize) {
    let m = get();
    m.flush_seconds.observe(took.as_secs_f64());
    m.flush_group_size.observe(group as f64);
}

/// The registry in Prometheus text format.
pub fn render() -> String {
    let mut out = Vec::new();
    TextEncoder::new().encode(&get().registry.gather(), &mut out).expect("text encoding");
    String::from_utf8(out).expect("prometheus text is UTF-8")
}

/// Keeps a gauge raised while alive; the drop lowers it even when actix drops a response
/// because its client went away.
pub struct GaugeGuard(&'static IntGauge);

impl GaugeGuard {
    pub fn new(gauge: &'static IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
