//! The access log: one line per request, written when the response is finished (its body
//! fully sent, broken, or abandoned by the client), so the line carries the real byte count
//! and outcome of a stream.
//!
//! Fields are stable names; the path is logged without its query, and no header value other
//! than the request id (sanitised by `rewrite::request_id`) is ever logged.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Method, Request, StatusCode};

use crate::error::ProxyError;

/// tracing target of access lines, so they can be filtered apart from diagnostics.
pub const TARGET: &str = "keygate::access";

/// How a response ended.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    /// The whole body was sent.
    Complete,
    /// The client went away before the body ended; the upstream request was dropped with it.
    ClientClosed,
    /// keygate answered itself, or the upstream stream broke after the headers were sent.
    Failed(&'a ProxyError),
}

impl Outcome<'_> {
    fn as_str(self) -> &'static str {
        match self {
            Self::Complete => "complete",
            Self::ClientClosed => "client_closed",
            Self::Failed(e) => e.reason(),
        }
    }
}

/// The facts of one request gathered along the path, written once by [`AccessLog::finish`].
#[derive(Debug)]
pub struct AccessLog {
    started: Instant,
    method: Method,
    path: String,
    peer: SocketAddr,
    request_id: HeaderValue,
    pub key: Option<Arc<str>>,
    pub status: StatusCode,
    pub upstream_ttfb: Option<Duration>,
}

impl AccessLog {
    pub fn new<B>(
        req: &Request<B>,
        peer: SocketAddr,
        started: Instant,
        request_id: HeaderValue,
    ) -> Self {
        Self {
            started,
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            peer,
            request_id,
            key: None,
            status: StatusCode::OK,
            upstream_ttfb: None,
        }
    }

    /// Writes the line. `bytes` is the response body bytes sent to the client. A failure is
    /// logged here and nowhere else, with its cause in `error`.
    pub fn finish(self, bytes: u64, outcome: Outcome<'_>) {
        let error = match outcome {
            Outcome::Failed(e) if e.has_cause() => Some(tracing::field::display(e)),
            _ => None,
        };
        // Milliseconds with microsecond resolution.
        let ms = |d: Duration| d.as_micros() as f64 / 1000.0;
        tracing::info!(
            target: TARGET,
            method = %self.method,
            path = %self.path,
            status = self.status.as_u16(),
            duration_ms = ms(self.started.elapsed()),
            upstream_ttfb_ms = self.upstream_ttfb.map(ms),
            bytes = bytes,
            key = self.key.as_deref().unwrap_or("-"),
            request_id = self.request_id.to_str().unwrap_or("-"),
            client = %self.peer.ip(),
            outcome = outcome.as_str(),
            error,
            "request"
        );
    }
}
