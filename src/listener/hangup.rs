//! Noticing a client that hangs up before its response starts.
//!
//! hyper reads an HTTP/1.1 request body only as fast as the upstream takes it. While keygate
//! connects to the upstream, or while the upstream does not read, the client's socket is not
//! read at all, so a client that closes it is not seen: its request would wait for the
//! upstream (connect, body, response headers) until `connect_timeout` or `response_timeout`,
//! holding both sockets.
//!
//! The listener wraps each accepted socket in a [`ClientSocket`], which serves the connection
//! like the socket itself and leaves a [`Hangup`] behind. The listener races each HTTP/1.1
//! request, from its head to its response headers, against its client's hang-up
//! ([`Hangup::unless_gone`]): once the client has closed its side (FIN or reset), the request
//! is dropped with its upstream attempt (connect abandoned, upstream connection closed,
//! nothing more sent) and the connection is closed without a response, as nginx does without
//! `proxy_ignore_client_abort`. A client that only half-closes (shuts down its sending side,
//! still reading) counts as gone, as hyper already treats it once a request body has been
//! read. At the request's start the kernel is asked directly (`client_now`), so a client
//! that sent its head and part of its body and closed before keygate read them (a FIN behind
//! unread body bytes included) never costs an upstream connection.
//!
//! On a plain connection the response body is watched as well ([`Watched`]): hyper runs
//! there with `half_close`, so it does not read the socket while a response is under way
//! (such a read reserved a fresh 8 KiB read buffer on every request, the one holding the
//! request's head still being in use), and a client that hangs up during a stream, e.g. an
//! SSE stream waiting for its next token, is seen by this watch instead: the body ends with
//! [`ClientGone`], and hyper closes the connection and drops the upstream request. Over TLS
//! hyper keeps reading (the TLS layer has its own end, `close_notify`), and watches for it.
//!
//! HTTP/2 needs none of this: its connection reads frames whatever the streams do, and hyper
//! drops a stream's request when the stream is reset or the connection ends. Over TLS the
//! hang-up is seen on the TCP socket under the TLS stream. A FIN queued at the client behind
//! body bytes that keygate's receive window has no room for cannot arrive until keygate reads
//! them; no proxy can see it sooner.

use std::future::{pending, Future};
use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{ready, Context, Poll};

use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;
use rustix::event::{PollFd, PollFlags, Timespec};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

use crate::error::BoxError;

/// An accepted TCP socket, read and written like the socket itself, that a [`Hangup`] can
/// watch at the same time.
pub(crate) struct ClientSocket(Arc<TcpStream>);

impl ClientSocket {
    pub(crate) fn new(stream: TcpStream) -> (Self, Hangup) {
        let stream = Arc::new(stream);
        let hangup = Hangup(Arc::downgrade(&stream));
        (Self(stream), hangup)
    }
}

impl AsyncRead for ClientSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let stream = &*self.0;
        loop {
            ready!(stream.poll_read_ready(cx))?;
            let wanted = buf.remaining();
            let mut read = 0;
            // A read shorter than asked for has drained the socket. Telling tokio so (as
            // WouldBlock) clears the readiness it saw before the read, as its own TcpStream
            // does: the next read then waits for the socket instead of calling into the
            // kernel to find nothing.
            let result = stream.try_io(Interest::READABLE, || {
                read = stream.try_read_buf(buf)?;
                if read > 0 && read < wanted {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(())
            });
            match result {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && read == 0 => continue,
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Poll::Ready(Err(e)),
                _ => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl AsyncWrite for ClientSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                written => return Poll::Ready(written),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                written => return Poll::Ready(written),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&*self.0).shutdown(Shutdown::Write))
    }
}

/// Watches a [`ClientSocket`] for its client hanging up. It does not keep the socket open.
#[derive(Clone)]
pub(crate) struct Hangup(Weak<TcpStream>);

/// The client hung up before its response: hyper closes the connection without one.
#[derive(Debug)]
pub(crate) struct ClientGone;

impl std::fmt::Display for ClientGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the client hung up before the response")
    }
}

impl std::error::Error for ClientGone {}

impl Hangup {
    /// Runs `request` unless the client hangs up first; then `request` is dropped at once.
    /// The hang-up is looked at first, so a request whose client is already gone (one that
    /// sent its request and closed at once) is never forwarded at all.
    pub(crate) fn unless_gone<'a, F: Future + 'a>(
        &'a self,
        request: F,
    ) -> impl Future<Output = Result<F::Output, ClientGone>> + 'a {
        UnlessGone {
            hangup: self,
            asked_kernel: false,
            unread: None,
            request,
        }
    }

    /// Waits for the client's next bytes and says how many wait, without taking them; 0 when
    /// the client has closed its side (or the connection is gone).
    pub(crate) async fn peek(&self) -> io::Result<usize> {
        let Some(stream) = self.0.upgrade() else {
            return Ok(0);
        };
        stream.peek(&mut [0u8; 1]).await
    }

    /// Whether the client has hung up, by the kernel's word at this moment; `unread` starts
    /// the watch of [`behind_unread_bytes`] when bytes wait in the socket. Costs a system
    /// call, for the one moment where an early answer saves an upstream connection: the
    /// request's start (see [`client_now`]).
    fn gone_now(&self, unread: &mut Option<Watch>) -> bool {
        let Some(stream) = self.0.upgrade() else {
            return true;
        };
        match client_now(&stream) {
            Client::Gone => true,
            Client::Sent => {
                *unread = Some(Box::pin(behind_unread_bytes(stream)));
                false
            }
            Client::Quiet => false,
        }
    }

    /// Whether the client has hung up, for a response body waiting for its next bytes; if
    /// not, the task is woken at the socket's next readiness. `unread` keeps the watch of
    /// [`behind_unread_bytes`] once bytes wait in the socket.
    fn poll_gone(&self, cx: &mut Context<'_>, unread: &mut Option<Watch>) -> bool {
        if let Some(watch) = unread {
            return watch.as_mut().poll(cx).is_ready();
        }
        let Some(stream) = self.0.upgrade() else {
            return true;
        };
        let mut byte = [0u8; 1];
        match stream.poll_peek(cx, &mut ReadBuf::new(&mut byte)) {
            Poll::Pending => false,
            // FIN or reset.
            Poll::Ready(Ok(0) | Err(_)) => true,
            Poll::Ready(Ok(_)) => {
                let mut watch: Watch = Box::pin(behind_unread_bytes(stream));
                let gone = watch.as_mut().poll(cx).is_ready();
                *unread = Some(watch);
                gone
            }
        }
    }
}

type Watch = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The client's side of its socket, as the kernel has it now.
enum Client {
    /// Closed (FIN, also behind bytes not yet read) or reset.
    Gone,
    /// Bytes wait to be read, and the client has not closed.
    Sent,
    Quiet,
}

/// Asks the kernel (`poll` with no wait) rather than the runtime, which learns of a FIN only
/// from the I/O driver's next turn: an accepted socket is assumed readable before its first
/// event, the read of the request head then finds no more bytes and clears that, and a
/// request started before the event comes would open an upstream connection for a client
/// that closed before its head was read. Also sees a FIN queued behind unread body bytes.
fn client_now(stream: &TcpStream) -> Client {
    let mut fds = [PollFd::new(stream, PollFlags::IN | PollFlags::RDHUP)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    if rustix::event::poll(&mut fds, Some(&now)).is_err() {
        return Client::Quiet;
    }
    let seen = fds[0].revents();
    if seen.intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR) {
        Client::Gone
    } else if seen.contains(PollFlags::IN) {
        Client::Sent
    } else {
        Client::Quiet
    }
}

/// Completes once the client closes its side, while bytes it sent wait in the socket for
/// hyper (a request body held back while the upstream is slow, a pipelined request). Taking
/// them is hyper's job, and while they wait, the connection's readiness stays set; so a second
/// registration of the same socket (a duplicate descriptor) watches, one that can clear its
/// own readiness and wake only at the next arrival, the hang-up among them.
async fn behind_unread_bytes(stream: Arc<TcpStream>) {
    let watched = stream
        .as_fd()
        .try_clone_to_owned()
        .and_then(|fd| TcpStream::from_std(fd.into()));
    drop(stream);
    match watched {
        Ok(watched) => until_read_closed(watched).await,
        Err(e) => {
            debug!(error = %e, "cannot watch the client for a hang-up");
            pending().await
        }
    }
}

pin_project! {
    /// A response body on a plain HTTP/1.1 connection, ended with [`ClientGone`] when the
    /// client hangs up while the body waits for more (see the module's doc). The socket is
    /// only looked at when the body has nothing to send.
    pub struct Watched<B> {
        #[pin]
        inner: B,
        hangup: Option<Hangup>,
        unread: Option<Watch>,
    }
}

impl<B> Watched<B> {
    /// `hangup`: the connection's watch; `None` passes the body through untouched.
    pub(crate) fn new(inner: B, hangup: Option<Hangup>) -> Self {
        Self {
            inner,
            hangup,
            unread: None,
        }
    }
}

impl<B> http_body::Body for Watched<B>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        let this = self.project();
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        match this.hangup {
            Some(hangup) if hangup.poll_gone(cx, this.unread) => {
                Poll::Ready(Some(Err(ClientGone.into())))
            }
            _ => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// A request raced against its client's hang-up. A struct rather than `select!` in an
    /// async fn, which would hold the request future twice (as the argument and in its own
    /// slot). The socket is watched through the connection's own registration (as
    /// [`Watched`] does), which costs nothing while the client sends nothing.
    struct UnlessGone<'a, F> {
        hangup: &'a Hangup,
        // Whether `Hangup::gone_now` has been asked, at the first poll.
        asked_kernel: bool,
        unread: Option<Watch>,
        #[pin]
        request: F,
    }
}

impl<F: Future> Future for UnlessGone<'_, F> {
    type Output = Result<F::Output, ClientGone>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if !*this.asked_kernel {
            *this.asked_kernel = true;
            if this.hangup.gone_now(this.unread) {
                return Poll::Ready(Err(ClientGone));
            }
        }
        if this.hangup.poll_gone(cx, this.unread) {
            return Poll::Ready(Err(ClientGone));
        }
        this.request.poll(cx).map(Ok)
    }
}

/// Waits on the duplicate registration until the client's side is closed. Its readiness is
/// cleared after each arrival (closed states are never cleared, so none is missed); the
/// socket itself is never read here.
async fn until_read_closed(watched: TcpStream) {
    loop {
        match watched.ready(Interest::READABLE).await {
            Ok(ready) if ready.is_read_closed() => return,
            Ok(_) => {
                let _ = watched.try_io(Interest::READABLE, || {
                    Err::<(), _>(io::ErrorKind::WouldBlock.into())
                });
            }
            Err(_) => return pending().await,
        }
    }
}
