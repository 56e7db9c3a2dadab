//! The idle timer of an HTTP/2 connection. hyper's HTTP/1 server cuts a connection that sends
//! no request head within `header_read_timeout`, at the start and between requests; its
//! HTTP/2 server has no such timer, and its keep-alive pings are answered by any live client.
//! So each HTTP/2 connection counts its open streams (a stream is open from its request
//! until its response body has ended or been dropped), and [`Streams::idle`] completes once
//! none has been open for the timeout: the connection is then closed with GOAWAY.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Instant;

pub(crate) struct Streams {
    open: AtomicUsize,
    /// When the connection opened or its last stream ended.
    quiet_since: Mutex<Instant>,
}

impl Streams {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            open: AtomicUsize::new(0),
            quiet_since: Mutex::new(Instant::now()),
        })
    }

    /// Counts a stream as open until the returned guard is dropped.
    pub(crate) fn opened(self: &Arc<Self>) -> OpenStream {
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenStream(self.clone())
    }

    /// Completes once no stream has been open for `timeout`.
    pub(crate) async fn idle(&self, timeout: Duration) {
        loop {
            let since = *self
                .quiet_since
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let deadline = since + timeout;
            if self.open.load(Ordering::Relaxed) > 0 {
                // A stream is open: nothing can be idle before `timeout` after it ends.
                tokio::time::sleep(timeout).await;
            } else if Instant::now() >= deadline {
                return;
            } else {
                tokio::time::sleep_until(deadline).await;
            }
        }
    }
}

/// One open stream; dropping it (the response body ended or was dropped) ends the stream.
pub(crate) struct OpenStream(Arc<Streams>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        *self
            .0
            .quiet_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project! {
    /// A response body holding its stream open until it ends or is dropped.
    pub struct Tracked<B> {
        #[pin]
        inner: B,
        stream: Option<OpenStream>,
    }
}

impl<B> Tracked<B> {
    pub(crate) fn new(inner: B, stream: Option<OpenStream>) -> Self {
        Self { inner, stream }
    }
}

impl<B: http_body::Body> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_after_its_last_stream_ended() {
        let streams = Streams::new();
        let timeout = Duration::from_secs(10);
        let stream = streams.opened();
        tokio::time::advance(Duration::from_secs(30)).await;
        let idle = tokio::time::timeout(Duration::from_secs(5), streams.idle(timeout));
        assert!(idle.await.is_err(), "idle while a stream was open");
        drop(stream);
        let started = Instant::now();
        streams.idle(timeout).await;
        assert!(started.elapsed() >= timeout);
    }
}
