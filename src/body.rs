//! Bodies on the proxied path. Both directions stream frame by frame; nothing is collected.
//!
//! - [`RequestBody`]: the client's body on its way upstream, counted against
//!   `max_request_body`, with request trailers dropped.
//! - [`Body`]: what the client receives: either keygate's own constant JSON, or the
//!   upstream's body with an idle timeout, a byte count, the response header rules applied
//!   to its trailers, and the access log line written when it ends. An error from it makes
//!   hyper end the response abnormally (HTTP/1.1: the connection closes without the final
//!   chunk; HTTP/2: RST_STREAM), so a truncated stream never looks complete.

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

use crate::access::{AccessLog, Outcome};
use crate::error::ProxyError;
use crate::metrics::Metrics;
use crate::rewrite::Rules;

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

    pub fn upstream(
        inner: Incoming,
        idle_timeout: Duration,
        log: AccessLog,
        rules: Arc<Rules>,
    ) -> Self {
        Self::Upstream {
            stream: UpstreamBody {
                inner,
                idle: tokio::time::sleep(idle_timeout),
                idle_timeout,
                bytes: 0,
                log: Some(log),
                rules,
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
            Self::Upstream { stream } => stream.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Fixed { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
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
    }

    impl PinnedDrop for UpstreamBody {
        /// hyper drops the body without reading it to the end when the client goes away (or,
        /// for HEAD and bodiless statuses, when there is nothing to read).
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(log) = this.log.take() {
                let outcome = if this.inner.is_end_stream() {
                    Outcome::Complete
                } else {
                    Outcome::ClientClosed
                };
                log.finish(*this.bytes, outcome);
            }
        }
    }
}

impl UpstreamBody {
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ProxyError>>> {
        let mut this = self.project();
        let result = match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(mut frame))) => {
                if let Some(data) = frame.data_ref() {
                    *this.bytes += data.len() as u64;
                }
                if let Some(trailers) = frame.trailers_mut() {
                    this.rules.response_trailers(trailers);
                }
                this.idle
                    .as_mut()
                    .reset(Instant::now() + *this.idle_timeout);
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(None) => None,
            Poll::Ready(Some(Err(e))) => Some(ProxyError::UpstreamBody(e)),
            Poll::Pending => {
                ready!(this.idle.poll(cx));
                Some(ProxyError::UpstreamIdle)
            }
        };
        if let Some(log) = this.log.take() {
            let outcome = result.as_ref().map_or(Outcome::Complete, Outcome::Failed);
            log.finish(*this.bytes, outcome);
        }
        Poll::Ready(result.map(Err))
    }
}
