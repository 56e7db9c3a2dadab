//! Server-Sent Events fidelity, for responses whose `Content-Type` is `text/event-stream`.
//! `body` asks an [`Sse`] what to add to the upstream's bytes:
//!
//! - **Keep-alive comments.** With `[upstream] sse_keepalive`, a stream that has sent nothing
//!   for that long gets `: keep-alive` and a blank line, a comment every SSE parser skips, so
//!   a load balancer with an idle timeout does not cut a long wait for the first token. The
//!   upstream is still silent, so `idle_timeout` keeps running.
//! - **A final error event.** When the upstream's stream breaks or goes idle, the client gets
//!   `event: error` with an OpenAI-shaped JSON error before the stream ends abnormally.
//!
//! Both are only ever added between events: after a blank line, or before the first byte.
//! Added inside an event, they would join it. A keep-alive that falls due inside an event
//! waits for the next interval; a stream that breaks inside an event ends without the error
//! event, since the client already holds part of an event that can never be completed.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::HeaderMap;
use tokio::time::{Instant, Sleep};

use crate::error::ProxyError;
use crate::observe::metrics::SseCounters;

/// The comment sent to keep a silent stream's connection busy.
pub(crate) const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// Whether a response is an SSE stream.
pub(crate) fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("text/event-stream"))
}

/// The SSE state of one response.
pub struct Sse {
    boundary: Boundary,
    keepalive: Option<KeepAlive>,
    counters: SseCounters,
    /// Keep-alive comments sent, for the access line.
    pub keepalives: u32,
    /// Whether the error event was sent, for the access line.
    pub error_event: bool,
}

struct KeepAlive {
    every: Duration,
    timer: Pin<Box<Sleep>>,
}

impl Sse {
    pub fn new(keepalive: Option<Duration>, counters: SseCounters) -> Self {
        Self {
            boundary: Boundary::default(),
            keepalive: keepalive.map(|every| KeepAlive {
                every,
                timer: Box::pin(tokio::time::sleep(every)),
            }),
            counters,
            keepalives: 0,
            error_event: false,
        }
    }

    /// The upstream's `data` went to the client: the stream is busy again.
    pub fn forwarded(&mut self, data: &[u8]) {
        self.boundary.push(data);
        if let Some(k) = &mut self.keepalive {
            k.timer.as_mut().reset(Instant::now() + k.every);
        }
    }

    /// A keep-alive comment when the stream has been silent for `sse_keepalive` and is
    /// between events; `Pending` otherwise (the timer wakes the task).
    pub fn poll_keepalive(&mut self, cx: &mut Context<'_>) -> Poll<Bytes> {
        let Some(k) = &mut self.keepalive else {
            return Poll::Pending;
        };
        if k.timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        k.timer.as_mut().reset(Instant::now() + k.every);
        if !self.boundary.between_events() {
            // Registers the reset timer's wake-up.
            let _ = k.timer.as_mut().poll(cx);
            return Poll::Pending;
        }
        self.keepalives += 1;
        self.counters.keepalives.inc();
        Poll::Ready(Bytes::from_static(KEEP_ALIVE))
    }

    /// The final `event: error` for `e`, if the stream is between events.
    pub fn error_event(&mut self, e: &ProxyError) -> Option<Bytes> {
        if !self.boundary.between_events() {
            return None;
        }
        self.error_event = true;
        self.counters.error_events.inc();
        Some(Bytes::from(format!("event: error\ndata: {}\n\n", e.body())))
    }
}

/// The last bytes of the stream, enough to tell whether it ends with a blank line.
#[derive(Default)]
struct Boundary {
    tail: [u8; 3],
    len: usize,
    /// Bytes seen in all; a stream that has sent nothing is between events.
    total: u64,
}

impl Boundary {
    fn push(&mut self, data: &[u8]) {
        self.total += data.len() as u64;
        for &b in &data[data.len() - data.len().min(3)..] {
            if self.len == 3 {
                self.tail.rotate_left(1);
                self.tail[2] = b;
            } else {
                self.tail[self.len] = b;
                self.len += 1;
            }
        }
    }

    /// Whether the stream so far ends with two line ends (CRLF, LF or CR each), or is empty.
    fn between_events(&self) -> bool {
        let tail = &self.tail[..self.len];
        let rest = if tail.ends_with(b"\r\n") {
            &tail[..tail.len() - 2]
        } else if tail.ends_with(b"\n") || tail.ends_with(b"\r") {
            &tail[..tail.len() - 1]
        } else {
            return self.total == 0;
        };
        match rest.last() {
            Some(b'\n' | b'\r') => true,
            Some(_) => false,
            // The line end was all there was: a blank line at the start.
            None => self.total == (tail.len() - rest.len()) as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn between(chunks: &[&str]) -> bool {
        let mut b = Boundary::default();
        for c in chunks {
            b.push(c.as_bytes());
        }
        b.between_events()
    }

    #[test]
    fn the_start_and_blank_lines_are_between_events() {
        for chunks in [
            &[][..],
            &["data: 1\n\n"],
            &["data: 1\n", "\n"],
            &["data: 1\r\n\r\n"],
            &["data: 1\r\n", "\r\n"],
            &["data: 1\r", "\r"],
            &["data: 1\n\r\n"],
            &["data: 1\n\n", ""],
            &[": comment\n\n"],
            &["\n"],
            &["data: a\n\ndata: b\n\n"],
        ] {
            assert!(between(chunks), "{chunks:?}");
        }
    }

    #[test]
    fn inside_a_line_or_an_event_is_not_between_events() {
        for chunks in [
            &["data: 1"][..],
            &["data: 1\n"],
            &["data: 1\r\n"],
            &["data: 1\n\ndata: {\"tok"],
            &["data: 1\n\ndata: 2\n"],
            &["event: x\ndata: 1\n", "d"],
            &["data: 1\n\n", "x"],
        ] {
            assert!(!between(chunks), "{chunks:?}");
        }
    }

    #[test]
    fn only_event_stream_content_types_are_sse() {
        for (value, sse) in [
            ("text/event-stream", true),
            ("text/event-stream; charset=utf-8", true),
            ("Text/Event-Stream", true),
            ("application/json", false),
            ("text/event-streams", false),
        ] {
            let mut h = HeaderMap::new();
            h.insert(CONTENT_TYPE, value.parse().unwrap());
            assert_eq!(is_event_stream(&h), sse, "{value}");
        }
        assert!(!is_event_stream(&HeaderMap::new()));
    }
}
