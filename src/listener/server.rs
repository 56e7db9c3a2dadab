//! The listener: accept under a connection limit (the loop is in `accept.rs`), complete the TLS
//! handshake when TLS is on, choose the protocol (ALPN over TLS; HTTP/1.1 or h2c by the first
//! bytes otherwise), serve each connection with hyper (HTTP/1.1 through [`h1`], which parks
//! idle connections and hands a WebSocket tunnel its socket), drop an HTTP/1.1 request whose
//! client hangs up before its response ([`hangup`](crate::listener::hangup)), and drain
//! gracefully when the shutdown future completes.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::config::secrets::ProcessSecrets;
use crate::config::{self, Config};
use crate::forward::body::Body;
use crate::forward::rewrite::Peer;
use crate::gateway::Gateway;
use crate::listener::hangup::{ClientGone, ClientSocket, Hangup, Watched};
use crate::listener::preface::{self, Protocol, Rewind};
use crate::listener::redirect::Redirector;
use crate::listener::streams::{Streams, Tracked};
use crate::listener::tls::ServerTls;
use crate::listener::{accept, admin, h1};
use crate::observe::access;
use crate::observe::metrics::Metrics;
use crate::policy::admission::Admission;
use crate::policy::scope::Clock;
use crate::policy::throttle;

/// Largest request head (request line and headers) accepted; over it, 431.
pub(crate) const MAX_HEADER_BYTES: usize = 64 * 1024;
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
pub(crate) const OVERFLOW_CONNECTIONS: usize = 256;
/// How often the key and certificate files are checked for changes.
const FILE_CHECK_EVERY: Duration = Duration::from_secs(2);
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
pub(crate) const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The sockets keygate serves on, bound before `run` so that a caller (or a test) can bind
/// ephemeral ports and learn them.
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: Option<TcpListener>,
    /// The plain listener redirecting to https (`redirect_http_listen`).
    pub redirect: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses the config names; an address that cannot be bound is named with
    /// its listener.
    pub async fn bind(config: &Config) -> Result<Self, BindError> {
        let proxy = bind(config.server.listen, "[server] listen")?;
        let admin = match config.admin {
            Some(addr) => Some(bind(addr, "[admin] listen")?),
            None => None,
        };
        let redirect = match &config.server.redirect {
            Some(r) => Some(bind(r.listen, "[server] redirect_http_listen")?),
            None => None,
        };
        Ok(Self {
            proxy,
            admin,
            redirect,
        })
    }
}

/// Connections the kernel may hold completed but not yet accepted, per listener: nginx's
/// 511 rounded up. The standard library's 128 drops SYNs during a burst of connects, and a
/// dropped SYN costs its client a second before it retries.
const LISTEN_BACKLOG: u32 = 1024;

fn bind(addr: SocketAddr, listener: &'static str) -> Result<TcpListener, BindError> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    };
    socket
        .and_then(|socket| {
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(LISTEN_BACKLOG)
        })
        .map_err(|error| BindError {
            addr,
            listener,
            error,
        })
}

/// A listen address that could not be bound: which one, for which listener, and why.
#[derive(Debug)]
pub struct BindError {
    pub addr: SocketAddr,
    /// The config key the address comes from.
    pub listener: &'static str,
    pub error: io::Error,
}

impl std::fmt::Display for BindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot listen on {} ({}): {}",
            self.addr, self.listener, self.error
        )
    }
}

impl std::error::Error for BindError {}

/// Runs the proxy until `shutdown` completes, then stops accepting, answers the probe with
/// 503, and lets open requests, streams and tunnels finish for up to `shutdown_grace`. Each
/// message on `reloads` (SIGHUP, in the binary) re-reads the key files, the key registry and
/// the certificate.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    reloads: mpsc::UnboundedReceiver<()>,
) -> io::Result<()> {
    run_with_clock(config, Clock::system(), listeners, shutdown, reloads).await
}

/// [`run`], with key expiry read from `clock` (tests move time instead of waiting for it).
pub async fn run_with_clock(
    config: Config,
    clock: Clock,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    reloads: mpsc::UnboundedReceiver<()>,
) -> io::Result<()> {
    let listener = listeners.proxy;
    let settings = config.server.clone();
    let admission = Admission::start(&config.limits)
        .await
        .map_err(io::Error::other)?;
    let server = Arc::new(Connections::new(&config, clock, admission)?);
    let (drain, draining) = watch::channel(false);
    let housekeeping = tokio::spawn(housekeeping(
        server.gateway.clone(),
        server.tls.clone(),
        reloads,
    ));
    let mut side_tasks = JoinSet::new();
    if let Some(admin) = listeners.admin {
        side_tasks.spawn(admin::serve(admin, server.gateway.clone()));
    }
    if let (Some(plain), Some(settings)) = (listeners.redirect, &settings.redirect) {
        let redirect = Redirector::new(settings, server.gateway.clone());
        side_tasks.spawn(redirect.serve(plain, server.http1.clone()));
    }
    let scheme = if server.tls.is_some() {
        "https"
    } else {
        "http"
    };
    info!(listen = %listener.local_addr()?, scheme, "accepting connections");
    // In a set, so that dropping `run` aborts the loop and, with it, its connections.
    let mut accepting = JoinSet::new();
    let serving = server.clone();
    accepting.spawn(accept::accept(
        listener,
        settings.max_connections,
        draining.clone(),
        move |stream, peer, draining| {
            let server = serving.clone();
            async move { server.serve(stream, peer, draining).await }
        },
    ));
    shutdown.await;
    server.gateway.start_draining();
    let _ = drain.send(true);
    let mut connections = accepting
        .join_next()
        .await
        .unwrap_or_else(|| Ok(JoinSet::new()))
        .map_err(io::Error::other)?;
    info!(
        connections = connections.len(),
        grace_s = settings.shutdown_grace.as_secs_f64(),
        "shutting down: draining open connections"
    );
    let drained = async { while connections.join_next().await.is_some() {} };
    match tokio::time::timeout(settings.shutdown_grace, drained).await {
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
    side_tasks.shutdown().await;
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

/// Periodic chores and reloads: writing pending access lines, the failed-authentication and
/// failed-handshake summaries, forgetting the rate state of keys that no longer need it,
/// re-reading the key files, the key registry and the certificate when asked (SIGHUP) or
/// when one of their files changed, and warnings of keys that expire soon or
/// have expired (the first at start-up).
async fn housekeeping(
    gateway: Arc<Gateway>,
    tls: Option<Arc<ServerTls>>,
    mut reloads: mpsc::UnboundedReceiver<()>,
) {
    let mut flush = tokio::time::interval(access::FLUSH_EVERY);
    let mut report = tokio::time::interval(throttle::REPORT_EVERY);
    let mut look_at_files = tokio::time::interval(FILE_CHECK_EVERY);
    loop {
        tokio::select! {
            _ = flush.tick() => access::flush(),
            _ = report.tick() => {
                gateway.report_failed_auth();
                gateway.prune_limits();
                if let Some(tls) = &tls {
                    tls.report_failed_handshakes();
                }
            }
            Some(()) = reloads.recv() => {
                gateway.reload_keys(&ProcessSecrets);
                if let Some(tls) = &tls {
                    tls.reload();
                }
            }
            _ = look_at_files.tick() => {
                if gateway.key_files_changed() {
                    info!("a key file or the key registry changed; re-reading them");
                    gateway.reload_keys(&ProcessSecrets);
                }
                if let Some(tls) = tls.as_ref().filter(|tls| tls.files_changed()) {
                    info!("a certificate file changed; reloading the certificate");
                    tls.reload();
                }
                gateway.warn_of_expiring_keys();
            }
        }
    }
}

/// What every connection shares: the request handler, the certificate and the protocol
/// builders.
struct Connections {
    gateway: Arc<Gateway>,
    tls: Option<Arc<ServerTls>>,
    /// For TLS connections.
    http1: http1::Builder,
    /// For plain connections: with `half_close`, since the response body watches for the
    /// client's hang-up there ([`Watched`]).
    http1_plain: http1::Builder,
    /// For connections over `max_connections`: one request, then close.
    http1_over_capacity: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    header_read_timeout: Duration,
}

impl Connections {
    fn new(config: &Config, clock: Clock, admission: Admission) -> io::Result<Self> {
        let s: &config::Server = &config.server;
        let mut h1 = http1::Builder::new();
        // `max_header_size` makes the limit exact: `max_buf_size` alone is checked only while
        // a head is incomplete, and one read can take the buffer past it with a whole head.
        h1.timer(TokioTimer::new())
            .header_read_timeout(s.header_read_timeout)
            .max_header_size(MAX_HEADER_BYTES)
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
        let mut h1_plain = h1.clone();
        h1_plain.half_close(true);
        let gateway = Arc::new(Gateway::new(config, clock, admission));
        let tls = match &s.tls {
            Some(t) => Some(Arc::new(
                ServerTls::new(t, gateway.metrics().clone()).map_err(io::Error::other)?,
            )),
            None => None,
        };
        Ok(Self {
            gateway,
            tls,
            http1: h1,
            http1_plain: h1_plain,
            http1_over_capacity: h1_over_capacity,
            http2: h2,
            header_read_timeout: s.header_read_timeout,
        })
    }

    async fn serve(&self, stream: TcpStream, client: Peer, draining: watch::Receiver<bool>) {
        let peer = client.addr;
        let _open = OpenConnection::new(self.gateway.metrics());
        // Small SSE events must leave at once, never corked behind Nagle's algorithm.
        if let Err(e) = stream.set_nodelay(true) {
            debug!(%peer, error = %e, "could not set TCP_NODELAY");
        }
        let (mut stream, hangup) = ClientSocket::new(stream);
        if let Some(tls) = &self.tls {
            // Boxed: the handshake's state is large, and inline every connection's task
            // would keep room for it for as long as the connection is open.
            return Box::pin(self.serve_tls(tls, stream, client, hangup, draining)).await;
        }
        let sniffed = tokio::time::timeout(self.header_read_timeout, preface::sniff(&mut stream));
        let (protocol, prefix) = match sniffed.await {
            Ok(Ok(sniffed)) => sniffed,
            Ok(Err(e)) => return debug!(%peer, error = %e, "connection closed before a request"),
            Err(_) => return debug!(%peer, "no request within header_read_timeout; closing"),
        };
        // Boxed, for the same reason.
        let prefix = Bytes::from(prefix);
        Box::pin(self.serve_http(stream, prefix, protocol, client, hangup, draining)).await;
    }

    /// The TLS handshake, bounded like a request head (a client that stalls in it is cut),
    /// then HTTP on the protocol ALPN chose.
    async fn serve_tls(
        &self,
        tls: &ServerTls,
        stream: ClientSocket,
        mut client: Peer,
        hangup: Hangup,
        draining: watch::Receiver<bool>,
    ) {
        let peer = client.addr;
        let handshake =
            tokio::time::timeout(self.header_read_timeout, tls.acceptor().accept(stream));
        let stream = match handshake.await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                tls.handshake_failed(false);
                return debug!(%peer, error = %e, "tls handshake failed");
            }
            Err(_) => {
                tls.handshake_failed(true);
                return debug!(%peer, "tls handshake not done within header_read_timeout; closing");
            }
        };
        let protocol = match stream.get_ref().1.alpn_protocol() {
            Some(b"h2") => Protocol::Http2,
            _ => Protocol::Http1,
        };
        client.tls = true;
        self.serve_http(stream, Bytes::new(), protocol, client, hangup, draining)
            .await;
    }

    /// Serves HTTP on an open connection until it closes, or, when draining starts, until its
    /// requests in flight are answered; an HTTP/1.1 connection may become a WebSocket tunnel
    /// ([`h1::serve`]). `prefix` is what the protocol sniff read. An HTTP/1.1 request whose
    /// client hangs up before its response is dropped and the connection closed; HTTP/2 sees
    /// that by itself.
    async fn serve_http<I>(
        &self,
        io: I,
        prefix: Bytes,
        protocol: Protocol,
        client: Peer,
        hangup: Hangup,
        mut draining: watch::Receiver<bool>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let peer = client.addr;
        let gateway = self.gateway.clone();
        let http1 = if client.over_capacity {
            &self.http1_over_capacity
        } else if client.tls {
            &self.http1
        } else {
            &self.http1_plain
        };
        let client = Arc::new(client);
        let handler_client = client.clone();
        // HTTP/1.1 idles out by hyper's header timer; HTTP/2 by its open streams.
        let streams = (protocol == Protocol::Http2).then(Streams::new);
        let service_streams = streams.clone();
        let request_hangup = (protocol == Protocol::Http1).then(|| hangup.clone());
        let watch_body = !client.tls;
        // Each request's future is boxed: hyper keeps room for one in every connection for as
        // long as it is open, and parking an HTTP/1.1 connection needs it `Unpin`.
        let service = service_fn(move |req| -> ServiceFuture {
            let gateway = gateway.clone();
            let client = handler_client.clone();
            let stream = service_streams.as_ref().map(Streams::opened);
            let hangup = request_hangup.clone();
            Box::pin(async move {
                let response = match &hangup {
                    Some(hangup) => hangup.unless_gone(gateway.handle(&client, req)).await?,
                    None => gateway.handle(&client, req).await,
                };
                let hangup = hangup.filter(|_| watch_body);
                Ok(response.map(|body| Tracked::new(Watched::new(body, hangup), stream)))
            })
        });
        let served = match (protocol, streams) {
            (Protocol::Http2, Some(streams)) => {
                let idle_timeout = self.header_read_timeout;
                // Completes when the connection should close, with how long it may take to: a
                // drain has the shutdown grace, an idle connection (maybe one that never
                // finished its HTTP/2 handshake, which a graceful close would wait for) gets
                // the idle timeout.
                let drain = async move {
                    tokio::select! {
                        _ = draining.wait_for(|&draining| draining) => None,
                        () = streams.idle(idle_timeout) => {
                            debug!(%peer, "idle HTTP/2 connection; closing");
                            Some(idle_timeout)
                        }
                    }
                };
                let io = TokioIo::new(Rewind::new(prefix, io));
                let connection = self.http2.serve_connection(io, service);
                // Boxed: inline, HTTP/2's state would make every HTTP/1.1 connection's future
                // as large, parked ones included.
                Box::pin(until_drained(connection, drain, |c| c.graceful_shutdown())).await
            }
            _ => {
                let connection = h1::Connection {
                    socket: &hangup,
                    tunnel: &client.tunnel,
                    metrics: self.gateway.metrics(),
                    draining: &mut draining,
                };
                h1::serve(http1, io, prefix, service, connection).await
            }
        };
        if let Err(e) = served {
            debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}

/// What the service answers: the gateway's response with its body watched (for the client's
/// hang-up, HTTP/1.1) and tracked (for the idle timer, HTTP/2), or nothing when the client
/// hung up before the response.
type ServiceFuture =
    Pin<Box<dyn Future<Output = Result<Response<Tracked<Watched<Body>>>, ClientGone>> + Send>>;

/// Drives a connection; once `drain` completes (shutdown, or an idle HTTP/2 connection), asks
/// it to finish the requests it has and close, then waits for that, at most as long as
/// `drain` said (the connection is dropped then).
async fn until_drained<C>(
    connection: C,
    drain: impl Future<Output = Option<Duration>>,
    graceful_shutdown: impl FnOnce(Pin<&mut C>),
) -> Result<(), hyper::Error>
where
    C: Future<Output = Result<(), hyper::Error>>,
{
    tokio::pin!(connection, drain);
    let bound = tokio::select! {
        served = connection.as_mut() => return served,
        bound = drain => bound,
    };
    graceful_shutdown(connection.as_mut());
    match bound {
        Some(bound) => tokio::time::timeout(bound, connection)
            .await
            .unwrap_or(Ok(())),
        None => connection.await,
    }
}

/// Connections open at once on a plain side listener (admin, redirect); more wait in the
/// backlog, so a flood there cannot take the file descriptors the proxy needs.
const SIDE_LISTENER_CONNECTIONS: usize = 1024;

/// Accepts on a side listener and serves each connection over HTTP/1.1 with the service
/// `service_for` makes for its peer, until the task is aborted (when [`run`] returns). The
/// connection tasks live in a `JoinSet`, so aborting this closes them too.
pub(crate) async fn serve_plain<S, B>(
    listener: TcpListener,
    builder: http1::Builder,
    service_for: impl Fn(SocketAddr) -> S,
) where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limit = Arc::new(Semaphore::new(SIDE_LISTENER_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                debug!(error = %e, "accept failed on a side listener");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let connection = builder.serve_connection(TokioIo::new(stream), service_for(peer));
        connections.spawn(async move {
            if let Err(e) = connection.await {
                debug!(%peer, error = %e, "side listener connection ended with an error");
            }
            drop(permit);
        });
    }
}
