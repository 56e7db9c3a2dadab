//! The listener: accept under a connection limit, choose HTTP/1.1 or h2c, serve each
//! connection with hyper, and drain gracefully when the shutdown future completes.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::config::{self, Config};
use crate::handler::Gateway;
use crate::metrics::Metrics;
use crate::preface::{self, Protocol, Rewind};
use crate::rewrite::Peer;
use crate::secrets::ProcessSecrets;
use crate::throttle;
use crate::{access, admin};

/// Largest request head (request line and headers) accepted; over it, 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Concurrent streams per HTTP/2 connection.
const H2_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Streams a client may reset before we accept them (rapid-reset protection).
const H2_MAX_PENDING_RESETS: usize = 20;
/// Streams keygate may reset for a client's protocol errors before closing the connection.
const H2_MAX_LOCAL_RESETS: usize = 256;
/// HTTP/2 keep-alive ping: detects dead peers on idle connections.
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Connections accepted beyond `max_connections`, one request each, so that the probe stays
/// answerable and other clients get a clear 503 instead of waiting in the listen backlog.
/// Beyond these, new connections wait in the backlog.
pub const OVERFLOW_CONNECTIONS: usize = 256;
/// How often the key files are checked for changes.
const KEY_FILE_CHECK_EVERY: Duration = Duration::from_secs(2);
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
pub(crate) const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The sockets keygate serves on, bound before `run` so that a caller (or a test) can bind
/// ephemeral ports and learn them.
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses the config names.
    pub async fn bind(config: &Config) -> io::Result<Self> {
        let proxy = TcpListener::bind(config.server.listen).await?;
        let admin = match config.admin {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        Ok(Self { proxy, admin })
    }
}

/// Runs the proxy until `shutdown` completes, then stops accepting, answers the probe with
/// 503, and lets open requests finish for up to `shutdown_grace`. Each message on `reloads`
/// (SIGHUP, in the binary) re-reads the key files.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    reloads: mpsc::UnboundedReceiver<()>,
) -> io::Result<()> {
    let listener = listeners.proxy;
    let settings = config.server.clone();
    let server = Arc::new(Connections::new(&config));
    let limit = Arc::new(Semaphore::new(settings.max_connections));
    let overflow = Arc::new(Semaphore::new(OVERFLOW_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    let housekeeping = tokio::spawn(housekeeping(server.gateway.clone(), reloads));
    let admin = listeners
        .admin
        .map(|admin| tokio::spawn(admin::serve(admin, server.gateway.clone())));
    info!(listen = %listener.local_addr()?, "accepting connections");
    // Every connection task lives in this set: finished ones are reaped as the loop goes, and
    // those still open when the grace expires are aborted, so nothing outlives `run`.
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (permit, over_capacity) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            permit = limit.clone().acquire_owned() => (permit, false),
            permit = overflow.clone().acquire_owned() => (permit, true),
        };
        let Ok(permit) = permit else { break };
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "accept failed; retrying shortly");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        if over_capacity {
            debug!(%peer, "at max_connections: serving only the probe on this connection");
        }
        let server = server.clone();
        let watcher = graceful.watcher();
        connections.spawn(async move {
            server
                .serve(stream, Peer::new(peer, over_capacity), watcher)
                .await;
            drop(permit);
        });
    }
    drop(listener);
    server.gateway.start_draining();
    info!(
        connections = graceful.count(),
        grace_s = settings.shutdown_grace.as_secs_f64(),
        "shutting down: draining open connections"
    );
    match tokio::time::timeout(settings.shutdown_grace, graceful.shutdown()).await {
        Ok(()) => info!("all connections drained"),
        Err(_) => {
            warn!(
                connections = connections.len(),
                "shutdown grace expired; closing the remaining connections"
            );
            connections.shutdown().await;
        }
    }
    housekeeping.abort();
    if let Some(admin) = admin {
        admin.abort();
    }
    access::flush();
    Ok(())
}

/// Counts a connection in the `connections` gauge for as long as it lives, also when its task
/// is aborted.
struct OpenConnection<'a>(&'a Metrics);

impl<'a> OpenConnection<'a> {
    fn new(metrics: &'a Metrics) -> Self {
        metrics.connection_opened();
        Self(metrics)
    }
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}

/// Periodic chores and reloads: writing pending access lines, the failed-authentication
/// summary, and re-reading the key files when asked (SIGHUP) or when one of them changed.
async fn housekeeping(gateway: Arc<Gateway>, mut reloads: mpsc::UnboundedReceiver<()>) {
    let mut flush = tokio::time::interval(access::FLUSH_EVERY);
    let mut report = tokio::time::interval(throttle::REPORT_EVERY);
    let mut look_at_key_files = tokio::time::interval(KEY_FILE_CHECK_EVERY);
    loop {
        tokio::select! {
            _ = flush.tick() => access::flush(),
            _ = report.tick() => gateway.report_failed_auth(),
            Some(()) = reloads.recv() => gateway.reload_keys(&ProcessSecrets),
            _ = look_at_key_files.tick() => {
                if gateway.key_files_changed() {
                    info!("a key file changed; re-reading the key files");
                    gateway.reload_keys(&ProcessSecrets);
                }
            }
        }
    }
}

/// What every connection shares: the request handler and the protocol builders.
struct Connections {
    gateway: Arc<Gateway>,
    http1: http1::Builder,
    /// For connections over `max_connections`: one request, then close.
    http1_over_capacity: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    header_read_timeout: Duration,
}

impl Connections {
    fn new(config: &Config) -> Self {
        let s: &config::Server = &config.server;
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(s.header_read_timeout)
            .max_buf_size(MAX_HEADER_BYTES);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
            .max_local_error_reset_streams(H2_MAX_LOCAL_RESETS)
            .keep_alive_interval(H2_PING_INTERVAL)
            .keep_alive_timeout(H2_PING_TIMEOUT);
        let mut h1_over_capacity = h1.clone();
        h1_over_capacity.keep_alive(false);
        Self {
            gateway: Arc::new(Gateway::new(config)),
            http1: h1,
            http1_over_capacity: h1_over_capacity,
            http2: h2,
            header_read_timeout: s.header_read_timeout,
        }
    }

    async fn serve(&self, mut stream: TcpStream, client: Peer, watcher: Watcher) {
        let peer = client.addr;
        let _open = OpenConnection::new(self.gateway.metrics());
        // Small SSE events must leave at once, never corked behind Nagle's algorithm.
        if let Err(e) = stream.set_nodelay(true) {
            debug!(%peer, error = %e, "could not set TCP_NODELAY");
        }
        let sniffed = tokio::time::timeout(self.header_read_timeout, preface::sniff(&mut stream));
        let (protocol, prefix) = match sniffed.await {
            Ok(Ok(sniffed)) => sniffed,
            Ok(Err(e)) => return debug!(%peer, error = %e, "connection closed before a request"),
            Err(_) => return debug!(%peer, "no request within header_read_timeout; closing"),
        };
        let io = TokioIo::new(Rewind::new(prefix, stream));
        let gateway = self.gateway.clone();
        let http1 = if client.over_capacity {
            &self.http1_over_capacity
        } else {
            &self.http1
        };
        let client = Arc::new(client);
        let service = service_fn(move |req| {
            let gateway = gateway.clone();
            let client = client.clone();
            async move { Ok::<_, Infallible>(gateway.handle(&client, req).await) }
        });
        let served = match protocol {
            Protocol::Http1 => watcher.watch(http1.serve_connection(io, service)).await,
            Protocol::Http2 => {
                watcher
                    .watch(self.http2.serve_connection(io, service))
                    .await
            }
        };
        if let Err(e) = served {
            debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}
