//! Bodies on the proxied path. Both directions stream frame by frame; nothing is collected.
//!
//! - [`RequestBody`]: the client's body on its way upstream, counted against
//!   `max_request_body`, with request trailers dropped.
//! - [`Body`]: what the client receives: either keygate's own constant JSON, or the
//!   upstream's body with an idle timeout, a byte count, the response header rules applied
//!   to its trailers, and the access log line written when it ends. An error from it makes
//!   hyper end the response abnormally (HTTP/1.1: the connection closes without the final
//!   chunk; HTTP/2: RST_STREAM), so a truncated stream never looks complete. An SSE stream
//!   also gets what [`sse`](crate::forward::sse) adds: keep-alive comments and a final error event.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::error::ProxyError;
use crate::forward::rewrite::Rules;
use crate::forward::sse::Sse;
use crate::forward::upstream::Lease;
use crate::observe::access::{AccessLog, Outcome};
use crate::observe::metrics::Metrics;

pin_project! {
    /// The client's request body, forwarded upstream.
    pub struct RequestBody {
        #[pin]
        inner: Incoming,
        remaining: u64,
        metrics: Arc<Metrics>,
    }
}

impl RequestBody {
    pub fn new(inner: Incoming, limit: u64, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            remaining: limit,
            metrics,
        }
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = ProxyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ProxyError>>> {
        let mut this = self.project();
        loop {
            let frame = match ready!(this.inner.as_mut().poll_frame(cx)) {
                None => return Poll::Ready(None),
                Some(Err(e)) => return Poll::Ready(Some(Err(ProxyError::ClientBody(e.into())))),
                Some(Ok(frame)) => frame,
            };
            let Some(data) = frame.data_ref() else {
                // Request trailers are dropped: they would bypass the header rules.
                continue;
            };
            let len = data.len() as u64;
            if len > *this.remaining {
                return Poll::Ready(Some(Err(ProxyError::BodyTooLarge)));
            }
            *this.remaining -= len;
            this.metrics.body_bytes_in(len);
            return Poll::Ready(Some(Ok(frame)));
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
    /// The body of a response to the client.
    #[project = BodyProj]
    pub enum Body {
        /// keygate's own answer: a constant JSON error or nothing.
        Fixed { data: Option<Bytes> },
        /// The upstream's body, streamed.
        Upstream { #[pin] stream: UpstreamBody },
    }
}

impl Body {
    pub fn fixed(data: &'static str) -> Self {
        Self::Fixed {
            data: (!data.is_empty()).then(|| Bytes::from_static(data.as_bytes())),
        }
    }

    /// The upstream's body; `sse` for a `text/event-stream` response.
    pub fn upstream(
        inner: Incoming,
        idle_timeout: Duration,
        log: AccessLog,
        rules: Arc<Rules>,
        sse: Option<Sse>,
        lease: Option<Lease>,
    ) -> Self {
        Self::Upstream {
            stream: UpstreamBody {
                inner,
                idle: tokio::time::sleep(idle_timeout),
                idle_timeout,
                bytes: 0,
                log: Some(log),
                rules,
                sse,
                failed: None,
                lease,
            },
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = ProxyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ProxyError>>> {
        match self.project() {
            BodyProj::Fixed { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            BodyProj::Upstream { stream } => stream.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Fixed { data } => data.is_none(),
            Self::Upstream { stream } => stream.failed.is_none() && stream.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Fixed { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            // An SSE stream may gain comments and an error event: its length is not the
            // upstream's, so hyper must not announce it.
            Self::Upstream { stream } if stream.sse.is_some() => SizeHint::default(),
            Self::Upstream { stream } => stream.inner.size_hint(),
        }
    }
}

pin_project! {
    /// The upstream's response body: idle-timed, counted, and logged once when it ends.
    pub struct UpstreamBody {
        #[pin]
        inner: Incoming,
        #[pin]
        idle: Sleep,
        idle_timeout: Duration,
        bytes: u64,
        log: Option<AccessLog>,
        rules: Arc<Rules>,
        sse: Option<Sse>,
        // The error to end with, once the SSE error event that announces it is sent.
        failed: Option<Failed>,
        // The upstream connection, back to the pool if the body ends cleanly.
        lease: Option<Lease>,
    }

    impl PinnedDrop for UpstreamBody {
        /// hyper drops the body without reading it to the end when the client goes away (or,
        /// for HEAD and bodiless statuses, when there is nothing to read).
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // A body with nothing to read (HEAD, 204, 304) may never be polled; its connection
            // is clean all the same. Any other lease still held here closes its connection.
            if let Some(lease) = this.lease.take().filter(|_| this.inner.is_end_stream()) {
                lease.release();
            }
            let outcome = if this.inner.is_end_stream() {
                Outcome::Complete
            } else {
                Outcome::ClientClosed
            };
            finish_log(this.log, this.sse.as_ref(), *this.bytes, outcome);
        }
    }
}

/// Writes the access line, once: the first call takes the log, later ones find none.
fn finish_log(log: &mut Option<AccessLog>, sse: Option<&Sse>, bytes: u64, outcome: Outcome<'_>) {
    if let Some(mut log) = log.take() {
        if let Some(sse) = sse {
            log.sse_keepalives = sse.keepalives;
            log.sse_error_event = sse.error_event;
        }
        log.finish(bytes, outcome);
    }
}

/// An upstream stream that broke after the SSE error event was handed to hyper.
enum Failed {
    /// The event is on its way.
    Announced(ProxyError),
    /// hyper has had a turn to write it out.
    Flushed(ProxyError),
}

impl UpstreamBody {
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ProxyError>>> {
        let mut this = self.project();
        match this.failed.take() {
            Some(Failed::Announced(e)) => {
                // Once more round the connection's loop first: it writes out the error event
                // (HTTP/2: hands it to the connection) before the error discards what is
                // still queued.
                *this.failed = Some(Failed::Flushed(e));
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Some(Failed::Flushed(e)) => return Poll::Ready(Some(Err(e))),
            None => {}
        }
        let result = match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(mut frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.bytes += data.len() as u64;
                    if let Some(sse) = this.sse.as_mut() {
                        sse.forwarded(data);
                    }
                }
                if let Some(trailers) = frame.trailers_mut() {
                    this.rules.response_trailers(trailers);
                }
                this.idle
                    .as_mut()
                    .reset(Instant::now() + *this.idle_timeout);
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(None) => {
                if let Some(lease) = this.lease.take() {
                    lease.release();
                }
                None
            }
            Poll::Ready(Some(Err(e))) => Some(ProxyError::UpstreamBody(e)),
            // A keep-alive comment leaves the idle timer alone: the upstream is still silent.
            Poll::Pending => match this.idle.poll(cx) {
                Poll::Ready(()) => Some(ProxyError::UpstreamIdle),
                Poll::Pending => {
                    let sse = this.sse.as_mut().map(|sse| sse.poll_keepalive(cx));
                    let comment = ready!(sse.unwrap_or(Poll::Pending));
                    *this.bytes += comment.len() as u64;
                    return Poll::Ready(Some(Ok(Frame::data(comment))));
                }
            },
        };
        let event = match (&result, this.sse.as_mut()) {
            (Some(e), Some(sse)) => sse.error_event(e),
            _ => None,
        };
        if let Some(event) = &event {
            *this.bytes += event.len() as u64;
        }
        let outcome = result.as_ref().map_or(Outcome::Complete, Outcome::Failed);
        finish_log(this.log, this.sse.as_ref(), *this.bytes, outcome);
        match (result, event) {
            (Some(e), Some(event)) => {
                *this.failed = Some(Failed::Announced(e));
                Poll::Ready(Some(Ok(Frame::data(event))))
            }
            (result, _) => Poll::Ready(result.map(Err)),
        }
    }
}
