//! Start-up and shutdown: open storage, bind, serve, stop in order on SIGINT/SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpServer};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::engine::Engine;
use crate::http::{self, AppState};
use crate::hub::Hub;
use crate::storage::{Retention, Storage, StorageError, StorageOptions};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("cannot listen on {address}: {source}")]
    Bind { address: String, source: std::io::Error },
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Rpc(String),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ConnectError),
    #[error("subscriptions: {0}")]
    Subscriptions(String),
}

pub fn storage_options(config: &Config) -> StorageOptions {
    StorageOptions {
        cache_capacity: config.storage.cache_capacity,
        read_cache_bytes: usize::try_from(config.storage.read_cache_bytes).unwrap_or(usize::MAX),
        fsync: config.storage.fsync,
        live_chunk_bytes: usize::try_from(config.ds.max_chunk_bytes).unwrap_or(usize::MAX),
        max_streams_loaded: usize::try_from(config.storage.max_streams_loaded).unwrap_or(usize::MAX),
        max_queued_bytes: usize::try_from(config.storage.max_queued_bytes).unwrap_or(usize::MAX),
        tombstone_ttl: Duration::from_secs(config.storage.tombstone_ttl),
        retention: Retention {
            max_messages: config.broker.history_limit,
            max_age: Duration::from_secs(config.broker.history_ttl),
        },
    }
}

/// Runs the server until a signal stops it. Must run inside an actix system.
pub async fn run(config: Config) -> Result<(), ServeError> {
    let config = Arc::new(config);
    let hub = Hub::new(usize::try_from(config.ds.max_transient_bytes).unwrap_or(usize::MAX));
    let engine = match config.broker.adapter.as_str() {
        "nats" => {
            log::info!(
                "cluster mode: log in NATS JetStream stream {} at {} ({} replica(s)); storage.data_dir is not used",
                config.nats.stream,
                config.nats.servers,
                config.nats.replicas
            );
            Engine::Nats(crate::cluster::Cluster::connect(&config, hub).await?)
        }
        _ => Engine::Sled(Storage::open(&config.storage.data_dir, storage_options(&config), hub)?),
    };
    let shutdown = CancellationToken::new();
    // Validated with the configuration already; an error here is the HTTP client's own.
    let rpc = crate::rpc::Rpc::from_config(&config).map_err(ServeError::Rpc)?;
    let mut state = AppState::new(engine.clone(), config.clone(), shutdown.clone(), rpc);
    if config.ds.writes {
        let subscriptions = crate::subscriptions::Subscriptions::start(engine.clone(), &config)
            .await
            .map_err(|e| ServeError::Subscriptions(e.to_string()))?;
        state = state.with_subscriptions(subscriptions);
    }

    http::watchdog::start(Duration::from_secs(config.server.write_timeout));
    http::body::init(usize::try_from(config.ds.max_unsent_bytes).unwrap_or(usize::MAX));
    let app_config = config.clone();
    let mut server = HttpServer::new(move || {
        App::new()
            .wrap(http::cors::CrossOrigin(http::cors::cors(&app_config)))
            .wrap(actix_web::middleware::Condition::new(
                http::cors::allows_credentials(&app_config),
                actix_web::middleware::from_fn(http::cors::credentials),
            ))
            .wrap(actix_web::middleware::from_fn(http::json_errors))
            .wrap(http::default_headers())
            .configure(http::configure(state.clone()))
    })
    // Notice clients that go away while an SSE or long-poll response is idle, so their
    // waiters are freed at once (PITFALLS.md).
    .h1_allow_half_closed(false)
    // actix-web 4.18 leaves Nagle's algorithm on unless told. With it on, the last, short
    // segment of a response (or an SSE frame right after another) waits for the client's
    // delayed ACK, up to 40 ms on Linux; every response here is written whole, so nothing is
    // gained by delaying segments.
    .tcp_nodelay(true)
    // Each connection's socket, for the watchdog that closes connections whose client stopped
    // reading (`http/watchdog.rs`).
    .on_connect(|connection, data| {
        if let Some(socket) =
            connection.downcast_ref::<actix_web::rt::net::TcpStream>().and_then(http::watchdog::ConnSocket::of)
        {
            data.insert(socket);
        }
    })
    .disable_signals()
    .shutdown_timeout(5);
    let workers = match config.server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let max_connections = max_connections(config.server.max_connections);
    // actix counts connections per worker.
    server = server.workers(workers).max_connections((max_connections / workers as u64).max(1) as usize);
    let address = format!("{}:{}", config.server.host, config.server.port);
    let server = server.bind(&address).map_err(|source| ServeError::Bind { address: address.clone(), source })?;
    let addresses = server.addrs();
    let running = server.run();

    banner(&config, &engine, &addresses);
    log::info!("{workers} worker(s), at most {max_connections} connections");

    let handle = running.handle();
    let stopping = shutdown.clone();
    let hub = engine.hub().clone();
    actix_web::rt::spawn(async move {
        wait_for_signal().await;
        log::info!("shutting down: ending live responses, flushing storage");
        // Cancel first: waiting long-polls answer 204 and SSE responses end, so the graceful
        // stop below does not sit out its timeout on them. Waiting SSE responses do not
        // watch the token (it would cost each a future): the wake-up makes them look at it.
        stopping.cancel();
        hub.wake_all();
        handle.stop(true).await;
    });
    running.await?;
    engine.close().await?;
    log::info!("stopped");
    Ok(())
}

/// The connection limit: configured, or what the open-file limit allows with a reserve for
/// the data files, the listener and logs.
fn max_connections(configured: u64) -> u64 {
    if configured > 0 {
        return configured;
    }
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit only writes the struct it is given.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 { limit.rlim_cur } else { 1024 };
    soft.saturating_sub(256).max(64)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        log::error!("cannot install signal handlers; stop the server with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn banner(config: &Config, engine: &Engine, addresses: &[std::net::SocketAddr]) {
    log::info!("anycable-ds {}", env!("CARGO_PKG_VERSION"));
    for address in addresses {
        log::info!("Listening on http://{address}");
        log::info!("  Durable Streams reads at http://{address}{}/{{stream}}", config.ds.path);
        log::info!("  broadcasts at http://{address}{}", config.http_broadcast.path);
    }
    match engine {
        Engine::Sled(storage) => log::info!(
            "data directory {} (epoch {}, storage layout {})",
            config.storage.data_dir.display(),
            storage.epoch(),
            crate::storage::CURRENT_LAYOUT
        ),
        Engine::Nats(cluster) => log::info!("JetStream stream {} (epoch {})", config.nats.stream, cluster.epoch()),
    }
    let unlimited = |v: u64, unit: &str| {
        if v == 0 {
            "unlimited".to_string()
        } else {
            format!("{v}{unit}")
        }
    };
    log::info!(
        "retention: {} message(s) per stream, {}",
        unlimited(config.broker.history_limit, ""),
        unlimited(config.broker.history_ttl, "s")
    );
    log::info!(
        "limits: {} live reader(s), write timeout {}s, {} MiB unsent, {} MiB queued, {} stream(s) in memory",
        unlimited(config.ds.max_live_readers, ""),
        config.server.write_timeout,
        config.ds.max_unsent_bytes >> 20,
        config.storage.max_queued_bytes >> 20,
        config.storage.max_streams_loaded
    );
    if !config.storage.fsync {
        log::warn!("storage.fsync = false: broadcasts are acknowledged before they are on disk (UNSAFE)");
    }
    let jwt = if config.skip_client_auth() {
        "off"
    } else if config.effective_jwt_secret().is_some() {
        if config.jwt.force {
            "required"
        } else {
            "optional"
        }
    } else {
        "off (no secret)"
    };
    let streams = if config.public_streams() { "public (signed names optional)" } else { "signed names required" };
    log::info!("auth: JWT {jwt}; streams {streams}");
    match config.effective_rpc_host() {
        Some(host) => {
            let cache = match config.rpc.cache_ttl {
                0 => "no cache".to_string(),
                ttl => format!("successes cached {ttl}s"),
            };
            log::info!(
                "auth: readers without a JWT are authenticated by the application: POST {} \
                 (headers: {}; timeout {} ms, {} at once, {cache})",
                crate::rpc::display_host(
                    &crate::rpc::connect_url(host).map_or_else(|_| host.to_string(), |u| u.to_string())
                ),
                if config.rpc.proxy_headers.is_empty() { "none" } else { &config.rpc.proxy_headers },
                config.rpc.request_timeout,
                config.rpc.concurrency,
            );
            if config.jwt.force {
                log::warn!("jwt.force refuses every reader without a JWT: the application (rpc.host) is never asked");
            }
            if config.effective_rpc_secret().is_none() {
                log::warn!("RPC calls carry no secret (set rpc.secret or secret): the application cannot tell them from anyone's");
            }
        }
        None if config.skip_client_auth() => {}
        None if config.jwt.force => {}
        None => log::info!("auth: readers without a JWT are not authenticated (no rpc.host): reads are open"),
    }
    if http::cors::allows_credentials(config) {
        log::info!("CORS: credentials (cookies) allowed from {}", config.server.allowed_origins);
    }
    if config.effective_broadcast_key().is_none() {
        log::warn!(
            "{} is OPEN: no broadcast_key or secret is set, anyone who can reach it can publish",
            config.http_broadcast.path
        );
    }
}
