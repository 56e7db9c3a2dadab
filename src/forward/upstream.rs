//! The upstream side: a pool of HTTP/1.1 connections (over TLS for an `https://` upstream,
//! with the URL's host as SNI and in `Host`), the URI rewrite (keeping the upstream URL's
//! path prefix), the response timeout, and the classification of upstream failures.
//!
//! A request borrows one idle connection, or opens one, and sends on it directly; the
//! response body holds the connection as a [`Lease`] and gives it back to the pool only when
//! the body ended cleanly. Dropping the future returned by [`Upstream::send`] (a connect in
//! progress is abandoned), or a body that has not ended, drops the connection: its socket is
//! closed at once, which is how an inference server learns that the client is gone.

use std::future::Future;
use std::io::ErrorKind;
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use pin_project_lite::pin_project;
use socket2::Socket;
use tokio::net::TcpStream;
use tokio::task::AbortHandle;
use tower_service::Service;
use tracing::debug;

use crate::config;
use crate::error::ProxyError;
use crate::forward::body::RequestBody;
use crate::forward::replay::Outgoing;
use crate::forward::tls_client;

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept at most; more are closed when they come back.
const POOL_MAX_IDLE: usize = 1024;

pub(crate) struct Upstream {
    connector: HttpsConnector<HttpConnector>,
    pool: Arc<Pool>,
    /// Scheme and authority only: what the connector dials.
    base: Uri,
    scheme: Scheme,
    authority: Authority,
    path_prefix: String,
    pub response_timeout: Duration,
    connect_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Upstream {
    pub(crate) fn new(config: &config::Upstream) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(60)));
        connector.enforce_http(false);
        // An http:// upstream never reaches the TLS code; it gets an empty trust store.
        let tls = if config.tls {
            tls_client::upstream_client(config.ca_certificates.as_deref())
        } else {
            tls_client::client_trusting(rustls::RootCertStore::empty())
        };
        // HTTP/1.1 only, as on plain connections: closing the connection is how a cancelled
        // request reaches the upstream.
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let base = Uri::builder()
            .scheme(config.scheme.clone())
            .authority(config.authority.clone())
            .path_and_query("/")
            .build()
            .expect("a validated scheme and authority make a URI");
        Self {
            connector,
            pool: Arc::new(Pool::default()),
            base,
            scheme: config.scheme.clone(),
            authority: config.authority.clone(),
            path_prefix: config.path_prefix.clone(),
            response_timeout: config.response_timeout,
            connect_timeout: config.connect_timeout,
            idle_timeout: config.idle_timeout,
        }
    }

    /// The request target for the upstream, in origin form: its path prefix, then the
    /// client's path and query unchanged. Asterisk-form (`OPTIONS *`) cannot be forwarded
    /// under a prefix and is refused.
    pub(crate) fn uri(&self, target: &Uri) -> Result<Uri, ProxyError> {
        let path_and_query = target.path_and_query().map_or("/", PathAndQuery::as_str);
        if !path_and_query.starts_with('/') {
            return Err(ProxyError::BadRequest);
        }
        let path_and_query = if self.path_prefix.is_empty() {
            PathAndQuery::try_from(path_and_query)
        } else {
            PathAndQuery::try_from(format!("{}{path_and_query}", self.path_prefix))
        }
        .map_err(|_| ProxyError::BadRequest)?;
        Ok(Uri::from(path_and_query))
    }

    /// Whether a TCP connection to the upstream opens within `connect_timeout`.
    pub(crate) async fn reachable(&self) -> bool {
        let default_port = if self.scheme == Scheme::HTTPS {
            443
        } else {
            80
        };
        let port = self.authority.port_u16().unwrap_or(default_port);
        let connect = tokio::net::TcpStream::connect((self.authority.host(), port));
        matches!(
            tokio::time::timeout(self.connect_timeout, connect).await,
            Ok(Ok(_))
        )
    }

    /// Sends the request and waits for the response headers, at most `response_timeout`.
    /// The [`Lease`] is the connection, to be given back once the response body has ended.
    pub(crate) async fn send(
        &self,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Lease), ProxyError> {
        *req.version_mut() = Version::HTTP_11;
        tokio::time::timeout(self.response_timeout, self.exchange(req))
            .await
            .unwrap_or(Err(ProxyError::UpstreamTimeout))
    }

    async fn exchange(
        &self,
        req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Lease), ProxyError> {
        let (parts, body) = req.into_parts();
        let (body, replay) = Outgoing::recording(body);
        let mut req = Request::from_parts(parts, body);
        let mut resent = false;
        loop {
            // A resend goes on a new connection: the pool may hold more that the upstream
            // closed the same way.
            let pooled = if resent { None } else { self.pool.checkout() };
            let (mut connection, reused) = match pooled {
                Some(connection) => (connection, true),
                // Boxed: opening a connection is a large future and rare. Inline, it would
                // grow every request's future, which hyper keeps allocated for the life of
                // each client connection.
                None => (Box::pin(self.connect()).await?, false),
            };
            // What a resend would need: a reused connection's request is resent at most once,
            // and only with a body that can be sent again.
            let head = (reused && !resent && replay.is_some()).then(|| head_of(&req));
            match connection.sender.try_send_request(req).await {
                Ok(response) => {
                    let lease = Lease {
                        connection: Some(connection),
                        pool: self.pool.clone(),
                    };
                    return Ok((response, lease));
                }
                Err(mut failed) => match failed.take_message() {
                    // A pooled connection that the upstream closed while it sat idle: the
                    // request was not sent, so it goes out on another connection.
                    Some(unsent) if reused => {
                        debug!(error = %failed.error(), "pooled upstream connection was closed; retrying");
                        req = unsent;
                    }
                    _ => {
                        let error = failed.into_error();
                        let again = head
                            .filter(|_| lost_with_the_connection(&error))
                            .and_then(|head| Some((head, replay.as_ref()?.again()?)));
                        let Some((head, body)) = again else {
                            return Err(classify(error));
                        };
                        debug!(%error, "reused upstream connection closed before answering; resending");
                        req = Request::from_parts(head, body);
                        resent = true;
                    }
                },
            }
        }
    }

    /// Opens a connection (TCP, then TLS for https) and starts its HTTP/1.1 state machine.
    async fn connect(&self) -> Result<Connection, ProxyError> {
        let io = self
            .connector
            .clone()
            .call(self.base.clone())
            .await
            .map_err(ProxyError::UpstreamUnreachable)?;
        let probe = tcp_of(&io)
            .as_fd()
            .try_clone_to_owned()
            .ok()
            .map(Socket::from);
        let (sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| ProxyError::UpstreamUnreachable(e.into()))?;
        // The connection runs beside the requests that use it; it ends when the upstream
        // closes it, when it hands its socket to a WebSocket tunnel, or when it is dropped.
        let task = tokio::spawn(Driven {
            connection: connection.with_upgrades(),
        });
        Ok(Connection {
            sender,
            task: Some(task.abort_handle()),
            probe,
        })
    }
}

pin_project! {
    /// An upstream connection's task: hyper's connection future, its error logged. Not an
    /// async block, which would keep the connection twice for the task's life (the value it
    /// captured and the future it awaits), 1.7 KB more per open upstream connection.
    struct Driven<F> {
        #[pin]
        connection: F,
    }
}

impl<F: Future<Output = hyper::Result<()>>> Future for Driven<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if let Err(e) = ready!(self.project().connection.poll(cx)) {
            debug!(error = %e, "upstream connection ended with an error");
        }
        Poll::Ready(())
    }
}

/// A copy of the request's head, for sending it again.
fn head_of<B>(req: &Request<B>) -> http::request::Parts {
    let mut copy = Request::new(());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy.into_parts().0
}

/// Whether the upstream closed the connection under a request before any byte of an
/// answer: it ended, or was reset, while the request was being sent or awaited.
fn lost_with_the_connection(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
            );
        }
        source = cause.source();
    }
    false
}

/// The TCP socket under an upstream connection, TLS or not.
fn tcp_of(io: &MaybeHttpsStream<TokioIo<TcpStream>>) -> &TcpStream {
    match io {
        MaybeHttpsStream::Http(tcp) => tcp.inner(),
        MaybeHttpsStream::Https(tls) => tls.inner().get_ref().0.inner().inner(),
    }
}

/// An upstream connection: where requests are sent, and the task that runs it.
struct Connection {
    sender: SendRequest<Outgoing>,
    /// `None` once the connection has become a WebSocket tunnel, which its task hands over.
    task: Option<AbortHandle>,
    /// A second descriptor of the connection's socket, to look at it while it is idle.
    /// `None` once the socket belongs to a tunnel (or if the descriptor could not be had).
    probe: Option<Socket>,
}

impl Connection {
    /// Whether the upstream has closed the connection, or sent something unasked, while it
    /// sat idle: either way it must not carry another request. An upstream may close right
    /// after a response without saying so (llama-server does after every stream); its FIN
    /// then waits in the socket before hyper's task for the connection has read it, and a
    /// request sent meanwhile would fail as a 502. One non-blocking peek sees it.
    fn closed_by_upstream(&self) -> bool {
        let Some(probe) = &self.probe else {
            return false;
        };
        let mut byte = [MaybeUninit::uninit()];
        !matches!(probe.peek(&mut byte), Err(e) if e.kind() == ErrorKind::WouldBlock)
    }
}

impl Drop for Connection {
    /// Closes the socket at once. Left to itself, hyper would first write out the rest of a
    /// request body it holds, for as long as an upstream that does not read takes.
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Idle upstream connections, most recently used last.
#[derive(Default)]
struct Pool {
    idle: Mutex<Vec<(Connection, Instant)>>,
}

impl Pool {
    /// The most recently used connection that is ready for a request now. One that is not
    /// ready yet (finishing its last exchange, or still writing a request body that the
    /// upstream answered without reading) stays for later and is never waited for, so no
    /// request queues behind another's exchange. Closed and expired ones are dropped.
    fn checkout(&self) -> Option<Connection> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let (connection, since) = &idle[i];
            if connection.sender.is_closed()
                || since.elapsed() > POOL_IDLE_TIMEOUT
                || connection.closed_by_upstream()
            {
                idle.remove(i);
            } else if connection.sender.is_ready() {
                return Some(idle.remove(i).0);
            }
        }
        None
    }

    /// Not peeked here: the checkout peeks just before the connection is used again, which
    /// is when it matters, and one system call per request is saved.
    fn checkin(&self, connection: Connection) {
        if connection.sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        // The oldest entry is the first: drop it once it has been idle too long.
        if idle
            .first()
            .is_some_and(|(_, since)| since.elapsed() > POOL_IDLE_TIMEOUT)
        {
            idle.remove(0);
        }
        if idle.len() < POOL_MAX_IDLE {
            idle.push((connection, Instant::now()));
        }
    }
}

/// An upstream connection lent to one exchange. [`Lease::release`] gives it back to the pool;
/// dropping the lease closes the connection.
pub struct Lease {
    connection: Option<Connection>,
    pool: Arc<Pool>,
}

impl Lease {
    /// Gives the connection back for the next request: only after a response body that
    /// ended cleanly, so no unread byte is left on it.
    pub fn release(mut self) {
        if let Some(connection) = self.connection.take() {
            self.pool.checkin(connection);
        }
    }

    /// The connection answered 101 and becomes a WebSocket tunnel: its task hands the socket
    /// over and ends by itself, and the connection never goes back to the pool.
    pub fn into_tunnel(mut self) {
        if let Some(connection) = self.connection.as_mut() {
            connection.task = None;
            connection.probe = None;
        }
    }
}

/// Names a failure of a sent request. A failure caused by the client's own body (too large,
/// the client hung up mid-upload, or a model refused while the body was on its way) is the
/// client's, not the upstream's.
fn classify(e: hyper::Error) -> ProxyError {
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        let proxy_error = cause.downcast_ref::<ProxyError>();
        if let Some(refusal) = proxy_error.and_then(ProxyError::refusal) {
            return refusal;
        }
        match proxy_error {
            Some(ProxyError::BodyTooLarge) => return ProxyError::BodyTooLarge,
            Some(ProxyError::ClientBody(_)) => return ProxyError::ClientBody(Box::new(e)),
            _ => source = cause.source(),
        }
    }
    ProxyError::UpstreamFailed(e)
}
