//! WebSocket upgrades. An authenticated HTTP/1.1 request asking for `Upgrade: websocket` is
//! forwarded with its upgrade headers; when the upstream answers 101, the two connections are
//! joined into a byte tunnel that lives in the client's connection task (so it counts against
//! `max_connections` and is drained and cut like any connection) and closes after
//! `idle_timeout` without a byte either way.
//!
//! Every other upgrade is dropped with the hop-by-hop headers: a key-less request is served
//! without the upgrade, and `Upgrade: h2c` is never honoured.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::header::{CONNECTION, UPGRADE};
use http::{HeaderMap, HeaderValue, Method, Request};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use crate::headers::connection_tokens;

const WEBSOCKET: HeaderValue = HeaderValue::from_static("websocket");
const UPGRADE_TOKEN: HeaderValue = HeaderValue::from_static("upgrade");
const TUNNEL_BUFFER: usize = 16 * 1024;

/// The client's connection as the listener hands it over once the 101 response is written:
/// the socket (or TLS stream), with any bytes the client sent after its request in front.
pub trait ClientIo: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> ClientIo for T {}

/// A tunnel waiting for the connection to hand over its socket.
pub(crate) type Tunnel = Box<dyn FnOnce(Box<dyn ClientIo>) -> TunnelFuture + Send>;

/// A running tunnel.
pub(crate) type TunnelFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where the handler leaves a tunnel for the connection task to run once the 101 response is
/// written. One per connection; only HTTP/1.1 connections ever fill it.
#[derive(Default)]
pub struct TunnelSlot(Mutex<Option<Tunnel>>);

impl fmt::Debug for TunnelSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TunnelSlot")
    }
}

impl TunnelSlot {
    pub fn put(&self, tunnel: Tunnel) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(tunnel);
    }

    pub fn take(&self) -> Option<Tunnel> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// Whether the request asks for a WebSocket: HTTP/1.1 GET, `Connection` naming `upgrade`,
/// and `Upgrade: websocket` alone.
pub(crate) fn wants_websocket<B>(req: &Request<B>) -> bool {
    let h = req.headers();
    req.method() == Method::GET
        && req.version() == http::Version::HTTP_11
        && connection_tokens(h).any(|t| t.eq_ignore_ascii_case(b"upgrade"))
        && h.get_all(UPGRADE).iter().count() == 1
        && upgrade_is_websocket(h)
}

/// Whether `Upgrade` names WebSocket: asked for by the client, or, on the upstream's 101,
/// switched to (the only protocol keygate asks for).
pub(crate) fn upgrade_is_websocket(headers: &HeaderMap) -> bool {
    headers
        .get(UPGRADE)
        .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"))
}

/// Puts back the upgrade headers the hop-by-hop rule removed: on the request to the upstream,
/// and on the 101 response to the client.
pub(crate) fn restore_headers(headers: &mut HeaderMap) {
    headers.insert(CONNECTION, UPGRADE_TOKEN);
    headers.insert(UPGRADE, WEBSOCKET);
}

/// The tunnel between the client and the upstream once both have switched protocols. It
/// holds the key's concurrency slot, if any, until it closes.
pub(crate) fn tunnel(
    upstream: OnUpgrade,
    idle_timeout: Duration,
    slot: Option<Box<dyn Any + Send + Sync>>,
) -> Tunnel {
    Box::new(move |client| {
        Box::pin(async move {
            let _slot = slot;
            let upstream = match upstream.await {
                Ok(upstream) => upstream,
                Err(e) => return debug!(error = %e, "upgrade did not complete"),
            };
            let (client_bytes, upstream_bytes) = (AtomicU64::new(0), AtomicU64::new(0));
            let ended = join(
                client,
                TokioIo::new(upstream),
                idle_timeout,
                [&client_bytes, &upstream_bytes],
            )
            .await;
            debug!(
                ended,
                from_client = client_bytes.load(Ordering::Relaxed),
                from_upstream = upstream_bytes.load(Ordering::Relaxed),
                "websocket tunnel closed"
            );
        })
    })
}

/// Copies both ways until both sides have finished, one side fails, or nothing moved either
/// way for `idle_timeout`. Says which of those happened.
async fn join<A, B>(a: A, b: B, idle_timeout: Duration, counts: [&AtomicU64; 2]) -> &'static str
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut a_read, mut a_write) = tokio::io::split(a);
    let (mut b_read, mut b_write) = tokio::io::split(b);
    let last = Mutex::new(Instant::now());
    let a_to_b = copy(&mut a_read, &mut b_write, &last, counts[0]);
    let b_to_a = copy(&mut b_read, &mut a_write, &last, counts[1]);
    let idle = async {
        loop {
            let since = *last.lock().unwrap_or_else(PoisonError::into_inner);
            let deadline = since + idle_timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    };
    tokio::select! {
        done = async { tokio::try_join!(a_to_b, b_to_a) } => match done {
            Ok(_) => "closed",
            Err(_) => "error",
        },
        () = idle => "idle_timeout",
    }
}

/// One direction: read, write, note the time; at the end of input, shut the other side's
/// write half so a half-close passes through.
async fn copy<R, W>(
    from: &mut R,
    to: &mut W,
    last: &Mutex<Instant>,
    count: &AtomicU64,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0; TUNNEL_BUFFER];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        to.flush().await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        *last.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get("/ws");
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn only_a_plain_websocket_upgrade_is_recognised() {
        let ws = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
        ];
        assert!(wants_websocket(&request(&ws)));
        assert!(!wants_websocket(&request(&[("upgrade", "websocket")])));
        assert!(!wants_websocket(&request(&[
            ("connection", "upgrade"),
            ("upgrade", "h2c")
        ])));
        assert!(!wants_websocket(&request(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket, h2c")
        ])));
        assert!(!wants_websocket(&request(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("upgrade", "h2c")
        ])));
        let mut post = request(&ws);
        *post.method_mut() = Method::POST;
        assert!(!wants_websocket(&post));
    }

    #[tokio::test]
    async fn a_silent_tunnel_is_closed_after_the_idle_timeout() {
        let (a, _a_peer) = tokio::io::duplex(64);
        let (b, _b_peer) = tokio::io::duplex(64);
        let counts = (AtomicU64::new(0), AtomicU64::new(0));
        let ended = join(a, b, Duration::from_millis(50), [&counts.0, &counts.1]).await;
        assert_eq!(ended, "idle_timeout");
    }

    #[tokio::test]
    async fn bytes_pass_both_ways_and_a_half_close_passes_through() {
        let (a, mut a_peer) = tokio::io::duplex(64);
        let (b, mut b_peer) = tokio::io::duplex(64);
        let counts = (AtomicU64::new(0), AtomicU64::new(0));
        let tunnel = join(a, b, Duration::from_secs(30), [&counts.0, &counts.1]);
        let peers = async {
            a_peer.write_all(b"ping").await.unwrap();
            a_peer.shutdown().await.unwrap();
            let mut got = Vec::new();
            b_peer.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"ping");
            b_peer.write_all(b"pong").await.unwrap();
            b_peer.shutdown().await.unwrap();
            let mut back = Vec::new();
            a_peer.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"pong");
        };
        let (ended, ()) = tokio::join!(tunnel, peers);
        assert_eq!(ended, "closed");
        assert_eq!(counts.0.load(Ordering::Relaxed), 4);
    }
}
