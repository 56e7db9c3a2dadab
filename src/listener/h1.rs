//! HTTP/1.1 connections, served by hyper one session at a time: a keep-alive connection that
//! has waited [`PARK_AFTER`] for its next request is parked. hyper's connection is dropped
//! with its read and write buffers (8 KiB each), the request future's slot and its header
//! timer, and only the socket is kept, watched for the next bytes. When they come, a new hyper
//! connection takes the socket over, with whatever the last one had read. An idle connection
//! then holds about 4 KB of heap instead of about 29 KB; nginx frees an idle connection's
//! buffers the same way.
//!
//! Where hyper stands is read from its header timer, which this module provides
//! ([`HeadTimer`]): hyper starts one whenever it waits for a request head, and it waits for a
//! second head in a session only once the first exchange is over and the connection is kept
//! alive. So when the timer of a session's second (or later) head has run for [`PARK_AFTER`],
//! hyper is idle between requests: asked to shut down gracefully it closes at once, and
//! `without_shutdown` hands back the socket and any bytes of the next head it has read.
//!
//! The deadline hyper set for that head (the previous response's end plus
//! `header_read_timeout`) still holds while the connection is parked and for the head when it
//! comes: an idle connection is closed when it would have been without parking, and a slow
//! head gets no more time. Everything else is hyper's decision as before: when hyper ends a
//! session by itself (the client asked to close, an HTTP/1.0 client, keep-alive off, a
//! drain), the socket is shut down as hyper would have done; on an error it is dropped. A 101
//! response ends the session too, and the socket goes to the WebSocket tunnel the gateway left
//! in the connection's [`TunnelSlot`].

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::error::BoxError;
use crate::forward::upgrade::TunnelSlot;
use crate::listener::hangup::Hangup;
use crate::listener::preface::Rewind;
use crate::observe::metrics::Metrics;

/// How long a keep-alive connection waits for its next request before it is parked. Shorter
/// would rebuild hyper's connection between the requests of a busy client; the header timer
/// wakes the connection here once per wait anyway.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// What [`serve`] needs of a connection besides its stream and service.
pub(crate) struct Connection<'a> {
    /// Watches the TCP socket under the stream.
    pub socket: &'a Hangup,
    /// Where the gateway leaves a WebSocket tunnel for the stream.
    pub tunnel: &'a TunnelSlot,
    pub metrics: &'a Metrics,
    /// Turns true when keygate drains.
    pub draining: &'a mut watch::Receiver<bool>,
}

/// Serves `io` until the client or hyper closes it, keygate drains and the requests under
/// way are answered, or it becomes a WebSocket tunnel (which then runs here). `prefix` is
/// what was read from `io` before.
pub(crate) async fn serve<IO, S, B>(
    builder: &http1::Builder,
    io: IO,
    prefix: Bytes,
    service: S,
    connection: Connection<'_>,
) -> Result<(), hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Clone + Unpin,
    S::Future: Unpin,
    S::Error: Into<BoxError>,
    B: http_body::Body + 'static,
    B::Error: Into<BoxError>,
{
    let Connection {
        socket,
        tunnel,
        metrics,
        draining,
    } = connection;
    let waits = Arc::new(HeadWaits::default());
    let mut builder = builder.clone();
    builder.timer(HeadTimer(waits.clone()));
    let mut io = Rewind::new(prefix, io);
    loop {
        // Boxed: a parked connection holds none of it.
        let mut conn = Box::new(builder.serve_connection(TokioIo::new(io), service.clone()));
        let mut asked = None;
        {
            let mut drain = pin!(async {
                let _ = draining.wait_for(|&draining| draining).await;
            });
            poll_fn(|cx| loop {
                if let Poll::Ready(ended) = conn.poll_without_shutdown(cx) {
                    return Poll::Ready(ended);
                }
                if asked.is_some() {
                    return Poll::Pending;
                }
                if drain.as_mut().poll(cx).is_ready() {
                    asked = Some(Asked::Drain);
                } else if let Some(deadline) = waits.take_park() {
                    asked = Some(Asked::Park(deadline));
                } else {
                    return Poll::Pending;
                }
                Pin::new(&mut *conn).graceful_shutdown();
            })
            .await?;
        }
        // The box is freed here, not at the end of the loop's turn.
        let parts = {
            let conn = conn;
            (*conn).into_parts()
        };
        let (unread, inner) = parts.io.into_inner().into_parts();
        let mut back = Rewind::new(concat(parts.read_buf, unread), inner);
        if let Some(tunnel) = tunnel.take() {
            tunnel(Box::new(back)).await;
            return Ok(());
        }
        let Some(Asked::Park(deadline)) = asked else {
            shut_down(&mut back).await;
            return Ok(());
        };
        if !back.has_unread() {
            let _parked = Parked::new(metrics);
            match parked(socket, deadline, draining).await {
                Wake::Bytes => {}
                Wake::End | Wake::Drain => {
                    shut_down(&mut back).await;
                    return Ok(());
                }
                // As hyper's header timer or a failed read would: the socket is dropped.
                Wake::Timeout | Wake::Reset => return Ok(()),
            }
        }
        waits.resume(deadline);
        io = back;
    }
}

/// Why the driver asked hyper to end a session.
enum Asked {
    Drain,
    /// With the deadline of the head hyper was waiting for.
    Park(Instant),
}

/// What ended a parked connection's wait.
enum Wake {
    Bytes,
    /// The client closed its side.
    End,
    Reset,
    Timeout,
    Drain,
}

/// Counts a connection as parked for as long as it lives, also when its task is aborted.
struct Parked<'a>(&'a Metrics);

impl<'a> Parked<'a> {
    fn new(metrics: &'a Metrics) -> Self {
        metrics.connection_parked();
        Self(metrics)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.connection_unparked();
    }
}

/// Waits, holding nothing but the socket, for the client's next bytes, its end, the
/// deadline of the next head, or a drain.
async fn parked(socket: &Hangup, deadline: Instant, draining: &mut watch::Receiver<bool>) -> Wake {
    let next = async {
        match socket.peek().await {
            Ok(0) => Wake::End,
            Ok(_) => Wake::Bytes,
            Err(_) => Wake::Reset,
        }
    };
    tokio::select! {
        biased;
        _ = draining.wait_for(|&draining| draining) => Wake::Drain,
        wake = next => wake,
        () = tokio::time::sleep_until(deadline.into()) => Wake::Timeout,
    }
}

/// What hyper does at the end of a connection it closes: shut down the sending side (over
/// TLS, `close_notify` first). A failure leaves nothing to do but drop the socket.
async fn shut_down<IO: AsyncWrite + Unpin>(io: &mut IO) {
    if let Err(e) = io.shutdown().await {
        tracing::debug!(error = %e, "shutting down an HTTP/1.1 connection failed");
    }
}

/// `first` then `then`. An empty result holds no buffer: hyper's empty read buffer would
/// keep its 8 KiB allocation alive.
fn concat(first: Bytes, then: Bytes) -> Bytes {
    if first.is_empty() {
        return then;
    }
    if then.is_empty() {
        return first;
    }
    let mut both = BytesMut::with_capacity(first.len() + then.len());
    both.extend_from_slice(&first);
    both.extend_from_slice(&then);
    both.freeze()
}

/// The connection's head waits, as its [`HeadTimer`] sees them.
#[derive(Default)]
struct HeadWaits {
    waits: Mutex<Waits>,
    /// The wait under way has lasted [`PARK_AFTER`].
    park: AtomicBool,
}

#[derive(Default)]
struct Waits {
    /// Numbers the waits, so that a timer dropped late cannot end its successor's wait.
    last: u64,
    /// Waits started in this session; from the second on, hyper is idle between requests.
    in_session: u32,
    /// The deadline of the wait under way.
    deadline: Option<Instant>,
    /// The deadline the next session's first wait keeps: that of the wait under way when
    /// the connection was parked.
    carried: Option<Instant>,
}

impl HeadWaits {
    fn lock(&self) -> std::sync::MutexGuard<'_, Waits> {
        self.waits.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// hyper waits for a head until `deadline`: the wait's number, its deadline (never later
    /// than a carried one), and when it may park the connection.
    fn start(&self, deadline: Instant) -> (u64, Instant, Option<Instant>) {
        let mut w = self.lock();
        w.last += 1;
        w.in_session += 1;
        let deadline = match w.carried.take() {
            Some(carried) => carried.min(deadline),
            None => deadline,
        };
        w.deadline = Some(deadline);
        self.park.store(false, Ordering::Relaxed);
        let park_at =
            Some(now() + PARK_AFTER).filter(|park_at| w.in_session >= 2 && *park_at < deadline);
        (w.last, deadline, park_at)
    }

    fn ended(&self, wait: u64) {
        let mut w = self.lock();
        if w.last == wait {
            w.deadline = None;
            self.park.store(false, Ordering::Relaxed);
        }
    }

    fn park_due(&self, wait: u64) {
        if self.lock().last == wait {
            self.park.store(true, Ordering::Relaxed);
        }
    }

    /// The deadline of the wait under way, once the connection should be parked.
    fn take_park(&self) -> Option<Instant> {
        if !self.park.swap(false, Ordering::Relaxed) {
            return None;
        }
        self.lock().deadline
    }

    /// A new session starts on the parked connection.
    fn resume(&self, deadline: Instant) {
        let mut w = self.lock();
        w.in_session = 0;
        w.carried = Some(deadline);
    }
}

/// The time on tokio's clock, which the sleeps run on (and tests may pause).
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// hyper's timer for one connection: tokio's, and it tells the connection's [`HeadWaits`].
/// hyper uses it for nothing but `header_read_timeout`.
struct HeadTimer(Arc<HeadWaits>);

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(now() + duration)
    }

    fn now(&self) -> Instant {
        now()
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let (wait, deadline, park_at) = self.0.start(deadline);
        Box::pin(HeadSleep {
            sleep: tokio::time::sleep_until(park_at.unwrap_or(deadline).into()),
            deadline,
            park_at,
            waits: self.0.clone(),
            wait,
        })
    }
}

pin_project! {
    /// A head wait's timer. It first runs to the parking point, if the wait has one, marks
    /// the connection for parking there and runs on to the deadline.
    struct HeadSleep {
        #[pin]
        sleep: tokio::time::Sleep,
        deadline: Instant,
        park_at: Option<Instant>,
        waits: Arc<HeadWaits>,
        wait: u64,
    }

    impl PinnedDrop for HeadSleep {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            this.waits.ended(*this.wait);
        }
    }
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        loop {
            ready!(this.sleep.as_mut().poll(cx));
            if this.park_at.take().is_none() {
                return Poll::Ready(());
            }
            this.waits.park_due(*this.wait);
            this.sleep.as_mut().reset((*this.deadline).into());
        }
    }
}

impl hyper::rt::Sleep for HeadSleep {}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_secs(secs: u64) -> Instant {
        Instant::now() + Duration::from_secs(secs)
    }

    #[test]
    fn only_a_sessions_second_head_wait_may_park() {
        let waits = HeadWaits::default();
        let (_, _, park_at) = waits.start(in_secs(60));
        assert!(park_at.is_none(), "the first head: hyper is not idle yet");
        let (_, _, park_at) = waits.start(in_secs(60));
        assert!(park_at.is_some());
    }

    #[test]
    fn a_wait_that_ends_before_its_parking_point_has_none() {
        let waits = HeadWaits::default();
        waits.start(in_secs(60));
        let (_, _, park_at) = waits.start(Instant::now() + PARK_AFTER / 2);
        assert!(park_at.is_none());
    }

    #[test]
    fn the_parked_deadline_bounds_the_next_sessions_first_wait_only() {
        let waits = HeadWaits::default();
        waits.start(in_secs(60));
        let (wait, deadline, _) = waits.start(in_secs(10));
        waits.park_due(wait);
        assert_eq!(waits.take_park(), Some(deadline));
        assert_eq!(waits.take_park(), None, "taken once");
        waits.resume(deadline);
        let (_, first, park_at) = waits.start(in_secs(60));
        assert_eq!(first, deadline);
        assert!(park_at.is_none(), "a resumed session's first head");
        let later = in_secs(60);
        let (_, second, _) = waits.start(later);
        assert_eq!(second, later);
    }

    #[test]
    fn a_timer_dropped_late_leaves_its_successors_wait_alone() {
        let waits = HeadWaits::default();
        let (old, _, _) = waits.start(in_secs(60));
        let (new, deadline, _) = waits.start(in_secs(60));
        waits.ended(old);
        waits.park_due(old);
        assert_eq!(waits.take_park(), None);
        waits.park_due(new);
        assert_eq!(waits.take_park(), Some(deadline));
        waits.ended(new);
        waits.park_due(new);
        assert_eq!(waits.take_park(), None, "no wait under way");
    }
}
