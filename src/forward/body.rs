//! Bodies on the proxied path. Both directions stream frame by frame; nothing is collected.
//!
//! - [`RequestBody`]: the client's body on its way upstream, counted against
//!   `max_request_body`, with request trailers dropped; what keygate read of it ahead of
//!   sending the request goes first, and a [`RequestFilter`] may hold back or add bytes.
//! - [`Body`]: what the client receives: either keygate's own JSON, or the
//!   upstream's body with an idle timeout, a byte count, the response header rules applied
//!   to its trailers, a [`ResponseFilter`] if the gateway set one, and the access log line
//!   written when it ends. An error from it makes
//!   hyper end the response abnormally (HTTP/1.1: the connection closes without the final
//!   chunk; HTTP/2: RST_STREAM), so a truncated stream never looks complete. An SSE stream
//!   also gets what [`sse`](crate::forward::sse) adds: keep-alive comments and a final error event.

use std::collections::VecDeque;
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

/// What the gateway does to a request body on its way upstream beyond counting it (reading
/// it for its model, asking for token usage): it sees every chunk and says what to send.
pub(crate) trait RequestFilter: Send {
    /// The bytes to send upstream now for `chunk`, possibly none. An error ends the body
    /// abnormally, which aborts the upstream request: the upstream never sees all of it.
    fn chunk(&mut self, chunk: Bytes) -> Result<Bytes, ProxyError>;

    /// The client's body has ended: the bytes still to send, or why the request is refused.
    fn end(&mut self) -> Result<Bytes, ProxyError>;
}

/// What the gateway does to a response body beyond passing it on (reading its token usage,
/// removing the usage event it asked for, filtering a model list). A filtered response
/// loses its trailers, which would have to follow bytes the filter may still hold.
pub trait ResponseFilter: Send {
    /// The bytes to pass to the client for the upstream's `chunk`, possibly none.
    fn chunk(&mut self, chunk: Bytes) -> Bytes;

    /// The upstream's body has ended: the bytes still to pass on, or why the response
    /// cannot be completed.
    fn end(&mut self) -> Result<Bytes, ProxyError>;

    /// Whether the client gets exactly the upstream's bytes, so that its length holds.
    fn keeps_length(&self) -> bool;

    /// Puts what the filter read into the access log, just before the line is written.
    fn record(&mut self, log: &mut AccessLog);
}

/// The client's request body, forwarded upstream. Kept to 64 bytes: it travels inside the
/// request through hyper's queue to the upstream connection, whose first block (32 requests
/// wide) is allocated with the connection and lives as long; at this size the block takes a
/// 10 KiB allocation instead of 12.
pub(crate) struct RequestBody {
    /// `None` once the client's body has ended (and a filter's end has been taken).
    inner: Option<Incoming>,
    remaining: u64,
    metrics: Arc<Metrics>,
    /// What was read ahead and the filter; `None` for a body that passes as it comes.
    more: Option<Box<More>>,
}

struct More {
    /// Bytes read and counted before the request was sent; they go first.
    ahead: VecDeque<Bytes>,
    filter: Option<Box<dyn RequestFilter>>,
}

impl RequestBody {
    pub(crate) fn new(inner: Incoming, limit: u64, metrics: Arc<Metrics>) -> Self {
        Self::read_ahead(inner, limit, metrics, VecDeque::new(), None)
    }

    /// A body of which `ahead` was read already (and counted); `remaining` is what
    /// `max_request_body` still allows. With a `filter`, the body's length is not known
    /// until it ends, so it goes chunked.
    pub(crate) fn read_ahead(
        inner: Incoming,
        remaining: u64,
        metrics: Arc<Metrics>,
        ahead: VecDeque<Bytes>,
        filter: Option<Box<dyn RequestFilter>>,
    ) -> Self {
        let ended = inner.is_end_stream() && filter.is_none();
        let more =
            (!ahead.is_empty() || filter.is_some()).then(|| Box::new(More { ahead, filter }));
        Self {
            inner: (!ended).then_some(inner),
            remaining,
            metrics,
            more,
        }
    }

    fn ahead_len(&self) -> u64 {
        self.more
            .as_ref()
            .map_or(0, |more| more.ahead.iter().map(|b| b.len() as u64).sum())
    }

    fn ahead_is_empty(&self) -> bool {
        self.more.as_ref().is_none_or(|more| more.ahead.is_empty())
    }

    fn filter(&mut self) -> Option<&mut Box<dyn RequestFilter>> {
        self.more.as_mut().and_then(|more| more.filter.as_mut())
    }

    fn has_filter(&self) -> bool {
        self.more.as_ref().is_some_and(|more| more.filter.is_some())
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = ProxyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ProxyError>>> {
        let this = self.get_mut();
        loop {
            if let Some(data) = this.more.as_mut().and_then(|more| more.ahead.pop_front()) {
                if data.is_empty() {
                    continue;
                }
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            let Some(inner) = this.inner.as_mut() else {
                return Poll::Ready(None);
            };
            let frame = match ready!(Pin::new(inner).poll_frame(cx)) {
                None => {
                    this.inner = None;
                    if let Some(more) = this.more.as_mut() {
                        if let Some(filter) = more.filter.as_mut() {
                            match filter.end() {
                                Ok(tail) => more.ahead.push_back(tail),
                                Err(e) => return Poll::Ready(Some(Err(e))),
                            }
                        }
                    }
                    continue;
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(ProxyError::ClientBody(e.into())))),
                Some(Ok(frame)) => frame,
            };
            let Ok(data) = frame.into_data() else {
                // Request trailers are dropped: they would bypass the header rules.
                continue;
            };
            let len = data.len() as u64;
            if len > this.remaining {
                return Poll::Ready(Some(Err(ProxyError::BodyTooLarge)));
            }
            this.remaining -= len;
            this.metrics.body_bytes_in(len);
            let data = match this.filter() {
                Some(filter) => match filter.chunk(data) {
                    Ok(data) if data.is_empty() => continue,
                    Ok(data) => data,
                    Err(e) => return Poll::Ready(Some(Err(e))),
                },
                None => data,
            };
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ahead_is_empty()
            && self
                .inner
                .as_ref()
                .is_none_or(|inner| !self.has_filter() && inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.has_filter() && self.inner.is_some() {
            return SizeHint::default();
        }
        let ahead = self.ahead_len();
        let rest = match &self.inner {
            Some(inner) if !inner.is_end_stream() => inner.size_hint(),
            _ => SizeHint::with_exact(0),
        };
        if let Some(exact) = rest.exact() {
            return SizeHint::with_exact(exact + ahead);
        }
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + ahead);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + ahead);
        }
        hint
    }
}

pin_project! {
    /// The body of a response to the client.
    #[project = BodyProj]
    pub enum Body {
        /// keygate's own answer: a JSON error or nothing.
        Fixed { data: Option<Bytes> },
        /// The upstream's body, streamed.
        Upstream { #[pin] stream: UpstreamBody },
    }
}

impl Body {
    pub fn fixed(data: impl Into<Bytes>) -> Self {
        let data = data.into();
        Self::Fixed {
            data: (!data.is_empty()).then_some(data),
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
        filter: Option<Box<dyn ResponseFilter>>,
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
                filter,
                drained: false,
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
            Self::Upstream { stream } => {
                stream.failed.is_none()
                    && stream.inner.is_end_stream()
                    && (stream.filter.is_none() || stream.drained)
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Fixed { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            // An SSE stream may gain comments and an error event: its length is not the
            // upstream's, so hyper must not announce it.
            Self::Upstream { stream }
                if stream.sse.is_some()
                    || stream.filter.as_ref().is_some_and(|f| !f.keeps_length()) =>
            {
                SizeHint::default()
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
        sse: Option<Sse>,
        // The error to end with, once the SSE error event that announces it is sent.
        failed: Option<Failed>,
        // The upstream connection, back to the pool if the body ends cleanly.
        lease: Option<Lease>,
        filter: Option<Box<dyn ResponseFilter>>,
        // The upstream's body has ended and the filter's last bytes have been passed on.
        drained: bool,
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
            let ended = Ended {
                sse: this.sse.as_ref(),
                filter: this.filter.as_deref_mut(),
                bytes: *this.bytes,
            };
            finish_log(this.log, ended, outcome);
        }
    }
}

/// What the response body knows when it ends.
struct Ended<'a> {
    sse: Option<&'a Sse>,
    filter: Option<&'a mut (dyn ResponseFilter + 'static)>,
    bytes: u64,
}

/// Writes the access line, once: the first call takes the log, later ones find none.
fn finish_log(log: &mut Option<AccessLog>, ended: Ended<'_>, outcome: Outcome<'_>) {
    if let Some(mut log) = log.take() {
        if let Some(sse) = ended.sse {
            log.sse_keepalives = sse.keepalives;
            log.sse_error_event = sse.error_event;
        }
        if let Some(filter) = ended.filter {
            filter.record(&mut log);
        }
        log.finish(ended.bytes, outcome);
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
        let result = loop {
            if *this.drained {
                break None;
            }
            match this.inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(mut frame))) => {
                    this.idle
                        .as_mut()
                        .reset(Instant::now() + *this.idle_timeout);
                    if let Some(filter) = this.filter.as_mut() {
                        // Trailers are dropped: a filter may still hold bytes that must
                        // come before them.
                        let Ok(data) = frame.into_data() else {
                            continue;
                        };
                        let out = filter.chunk(data);
                        if out.is_empty() {
                            continue;
                        }
                        frame = Frame::data(out);
                    }
                    if let Some(data) = frame.data_ref() {
                        *this.bytes += data.len() as u64;
                        if let Some(sse) = this.sse.as_mut() {
                            sse.forwarded(data);
                        }
                    }
                    if let Some(trailers) = frame.trailers_mut() {
                        this.rules.response_trailers(trailers);
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(None) => {
                    if let Some(lease) = this.lease.take() {
                        lease.release();
                    }
                    let Some(filter) = this.filter.as_mut() else {
                        break None;
                    };
                    *this.drained = true;
                    match filter.end() {
                        Ok(tail) if tail.is_empty() => break None,
                        Ok(tail) => {
                            *this.bytes += tail.len() as u64;
                            if let Some(sse) = this.sse.as_mut() {
                                sse.forwarded(&tail);
                            }
                            return Poll::Ready(Some(Ok(Frame::data(tail))));
                        }
                        Err(e) => break Some(e),
                    }
                }
                Poll::Ready(Some(Err(e))) => break Some(ProxyError::UpstreamBody(e)),
                // A keep-alive comment leaves the idle timer alone: the upstream is still silent.
                Poll::Pending => match this.idle.as_mut().poll(cx) {
                    Poll::Ready(()) => break Some(ProxyError::UpstreamIdle),
                    Poll::Pending => {
                        let sse = this.sse.as_mut().map(|sse| sse.poll_keepalive(cx));
                        let comment = ready!(sse.unwrap_or(Poll::Pending));
                        *this.bytes += comment.len() as u64;
                        return Poll::Ready(Some(Ok(Frame::data(comment))));
                    }
                },
            }
        };
        let event = match (&result, this.sse.as_mut()) {
            (Some(e), Some(sse)) => sse.error_event(e),
            _ => None,
        };
        if let Some(event) = &event {
            *this.bytes += event.len() as u64;
        }
        let outcome = result.as_ref().map_or(Outcome::Complete, Outcome::Failed);
        let ended = Ended {
            sse: this.sse.as_ref(),
            filter: this.filter.as_deref_mut(),
            bytes: *this.bytes,
        };
        finish_log(this.log, ended, outcome);
        match (result, event) {
            (Some(e), Some(event)) => {
                *this.failed = Some(Failed::Announced(e));
                Poll::Ready(Some(Ok(Frame::data(event))))
            }
            (result, _) => Poll::Ready(result.map(Err)),
        }
    }
}
