//! A key's `models` and its token usage on the request path, between admission and the
//! upstream. The gateway asks [`plan`] what a request needs, [`read`] reads its body (deciding
//! its model and asking for usage), and the [`Inspection`] it returns sets up the response
//! side: the usage read from the answer, the usage event removed, a model list filtered.
//!
//! # What each request gets
//!
//! For a key with `models`:
//! - `GET /v1/models` and `GET /models` (llama.cpp): the origin's list, filtered to the key's
//!   models ([`filter_model_list`]). The list is read whole (at most [`MODEL_LIST_CAP`]) before
//!   the client is answered, so a list that cannot be read is a 502, never the whole list.
//! - `GET /v1/models/{name}` (SGLang): the name in the path must be allowed.
//! - A request with a body: the body must be one JSON object whose top-level `model` is
//!   allowed, read the way the origin reads it ([`crate::policy::models`]); otherwise 404
//!   `model_not_found` (outside the list) or 400 `model_undecidable`, and never forwarded.
//!   Multipart forms (`/v1/audio/transcriptions`) are refused: their `model` field is not read.
//! - A WebSocket (`/v1/realtime`) is refused: its model travels in messages keygate does not
//!   read. So is a bodiless request whose path is percent-encoded or not plain, which an origin
//!   might read as `/v1/models`.
//! - Any other bodiless request (`GET /props`, `GET /v1/responses/{id}`, …) is forwarded: it
//!   names no model to run.
//!
//! For every keyed request with a body (with a preset: on its inference routes), the
//! response's token usage is read. The body of a key without `models` is read only when it is a
//! POST, not multipart; any other body (an upload, a form) is forwarded unread, as it comes,
//! and so is the rest of a body from its first byte that cannot be JSON. A streamed chat
//! completion or completion that did not ask for `stream_options.include_usage` gets it asked
//! for, the usage-only event being removed from what the client receives
//! ([`crate::forward::usage`]). The client's `Accept-Encoding` is dropped from those requests,
//! so the usage arrives uncompressed.
//!
//! # Reading the body
//!
//! Up to [`READ_AHEAD`] bytes are read before the upstream is contacted. A body that ends
//! within them (nearly every chat request) is decided there: a refused one never reaches the
//! upstream at all, and an allowed one goes with its exact `Content-Length`. A longer body is
//! sent on while it is read: every byte goes upstream as soon as it is scanned, except the top-
//! level object's closing `}` and what follows it, held back until the decision; a refusal ends
//! the upstream request abnormally, so the upstream never holds a complete body. Such a body
//! goes chunked, since an insertion may change its length.
//!
//! A refused body is read on to its end, up to the read-ahead, before the refusal is sent: a
//! client still sending it would otherwise find its connection closed (hyper closes a
//! connection whose request body was not read) and might never read the answer. A longer body
//! refused before its end ends that way, as any early answer to an upload does.
//!
//! Memory per request: the read-ahead (at most [`READ_AHEAD`] plus one frame, of which nothing
//! is copied), the scanner's 2 KiB, and in the response at most
//! [`crate::forward::usage::EVENT_HOLD_CAP`] of one SSE event or
//! [`crate::policy::models::MODEL_LIST_CAP`] of a model list.
//!
//! For a key without `models` a body that turns out not to be JSON is forwarded unchanged, and
//! its usage read if the response has one.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{ACCEPT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::config::models::Models;
use crate::error::ProxyError;
use crate::forward::body::{RequestBody, RequestFilter, ResponseFilter};
use crate::forward::sse;
use crate::forward::usage::{JsonUsage, SseUsage};
use crate::observe::access::AccessLog;
use crate::observe::metrics::Metrics;
use crate::path::plain_path;
use crate::policy::auth::KeyId;
use crate::policy::models::{
    filter_model_list, HoldBack, Scanner, Undecidable, UsageRequest, MODEL_LIST_CAP,
};
use crate::preset::{Class, Table};

/// Bytes of a request body read before the request is sent upstream.
pub(super) const READ_AHEAD: usize = 64 * 1024;

/// What one request needs.
pub(super) enum Plan {
    /// Forwarded as it is.
    Pass,
    /// A model list, to be filtered.
    List(Arc<Models>),
    /// The body forwarded unread, the response read for usage.
    Count,
    /// A body to read: for its model when `models` is set, and for usage.
    Body {
        models: Option<Arc<Models>>,
        /// The route honours `stream_options.include_usage`.
        ask_usage: bool,
    },
}

/// What a request needs, or why it is refused before anything is read. `websocket`: the
/// request asks for an upgrade; `bodiless`: it has no body at all.
fn plan(
    key: Option<&KeyId>,
    preset: Option<&Table>,
    parts: &Parts,
    websocket: bool,
    bodiless: bool,
) -> Result<Plan, ProxyError> {
    let Some(key) = key else {
        return Ok(Plan::Pass);
    };
    let (method, path) = (&parts.method, parts.uri.path());
    let multipart = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("multipart/")
        });
    let ask_usage = path.rsplit('/').next() == Some("completions");
    let Some(models) = key.policy.models.clone() else {
        let admin = preset.and_then(|t| t.class(method, path)) == Some(Class::Admin);
        return Ok(if websocket || bodiless || admin {
            Plan::Pass
        } else if *method == Method::POST && !multipart {
            Plan::Body {
                models: None,
                ask_usage,
            }
        } else {
            Plan::Count
        });
    };
    if websocket {
        return Err(ProxyError::ModelUndecidable(
            "a WebSocket's messages are not read; use a key without models for it",
        ));
    }
    if multipart {
        return Err(ProxyError::ModelUndecidable(
            "multipart form bodies are not read; use a key without models for this route",
        ));
    }
    if !bodiless {
        return Ok(Plan::Body {
            models: Some(models),
            ask_usage,
        });
    }
    if path.contains('%') || !plain_path(path) {
        return Err(ProxyError::ModelUndecidable(
            "the path is percent-encoded or not plain, and could name a model list",
        ));
    }
    if *method != Method::GET {
        return Ok(Plan::Pass);
    }
    if path == "/v1/models" || path == "/models" {
        return Ok(Plan::List(models));
    }
    match path.strip_prefix("/v1/models/") {
        Some(name) if !models.allows(name) => Err(ProxyError::ModelNotFound(name.into())),
        _ => Ok(Plan::Pass),
    }
}

/// What [`read`] needs besides the request.
pub(super) struct Limits<'a> {
    /// What `max_request_body` allows.
    pub max_request_body: u64,
    /// The longest wait for the read-ahead: the upstream's `response_timeout`, which bounds
    /// the same wait when the upstream reads the body itself.
    pub timeout: Duration,
    pub metrics: &'a Arc<Metrics>,
}

/// The body to send upstream for the request (`key` matched, a `websocket` asked for), and
/// what the response will need. A refusal names the model in `log` when the body named one.
pub(super) async fn read(
    key: Option<&KeyId>,
    preset: Option<&Table>,
    websocket: bool,
    parts: &mut Parts,
    mut body: Incoming,
    log: &mut AccessLog,
    limits: &Limits<'_>,
) -> Result<(RequestBody, Option<Inspection>), ProxyError> {
    let deadline = tokio::time::Instant::now() + limits.timeout;
    let plan = match plan(key, preset, parts, websocket, body.is_end_stream()) {
        Ok(plan) => plan,
        Err(e) => {
            linger(&mut body, 0, deadline).await;
            return Err(e);
        }
    };
    let headers = &mut parts.headers;
    let (models, ask_usage) = match plan {
        Plan::Pass => {
            let body = RequestBody::new(body, limits.max_request_body, limits.metrics.clone());
            return Ok((body, None));
        }
        Plan::List(models) => {
            headers.remove(ACCEPT_ENCODING);
            let body = RequestBody::new(body, limits.max_request_body, limits.metrics.clone());
            return Ok((body, Some(Inspection::List(models))));
        }
        Plan::Count => {
            headers.remove(ACCEPT_ENCODING);
            let body = RequestBody::new(body, limits.max_request_body, limits.metrics.clone());
            let decided = Arc::new(Mutex::new(Decided::default()));
            return Ok((body, Some(Inspection::Usage(decided))));
        }
        Plan::Body { models, ask_usage } => (models, ask_usage),
    };
    headers.remove(ACCEPT_ENCODING);
    // The length is the body's own once it is read, or unknown: hyper writes it.
    headers.remove(CONTENT_LENGTH);
    let scanner = match models {
        Some(_) => Scanner::requiring_model(),
        None => Scanner::without_model(),
    };
    let decided = Arc::new(Mutex::new(Decided::default()));
    let mut scan = Scan {
        hold: Some(HoldBack::new(scanner)),
        models,
        ask_usage,
        decided: decided.clone(),
    };
    let mut ahead = VecDeque::new();
    let mut remaining = limits.max_request_body;
    let mut read = 0;
    let ended = loop {
        if read >= READ_AHEAD {
            break false;
        }
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return Err(ProxyError::ClientBody(
                    "the request body did not arrive within response_timeout".into(),
                ))
            }
            Ok(None) => break true,
            Ok(Some(Err(e))) => return Err(ProxyError::ClientBody(e.into())),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let len = data.len() as u64;
        if len > remaining {
            return Err(ProxyError::BodyTooLarge);
        }
        remaining -= len;
        limits.metrics.body_bytes_in(len);
        read += data.len();
        match scan.chunk(data) {
            // Not JSON, for a key without models: nothing more to wait for.
            Ok(pass) if scan.hold.is_none() => {
                ahead.push_back(pass);
                break false;
            }
            Ok(pass) => ahead.push_back(pass),
            Err(e) => {
                log.model = scan.model();
                linger(&mut body, read, deadline).await;
                return Err(e);
            }
        }
    };
    let filter: Option<Box<dyn RequestFilter>> = if ended {
        match scan.end() {
            Ok(tail) => ahead.push_back(tail),
            Err(e) => {
                log.model = scan.model();
                return Err(e);
            }
        }
        log.model = scan.model();
        None
    } else if scan.hold.is_none() {
        // The rest passes unread, at its own length.
        None
    } else {
        Some(Box::new(scan))
    };
    let body = RequestBody::read_ahead(body, remaining, limits.metrics.clone(), ahead, filter);
    Ok((body, Some(Inspection::Usage(decided))))
}

/// Reads and discards the rest of a refused body until it ends, [`READ_AHEAD`] bytes have
/// been read in all (`read` so far), or `deadline`.
async fn linger(body: &mut Incoming, mut read: usize, deadline: tokio::time::Instant) {
    while read < READ_AHEAD {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => read += frame.data_ref().map_or(0, Bytes::len),
            _ => return,
        }
    }
}

/// After the upstream exchange, sent or refused: the model the body named, for the log.
pub(super) fn note(inspection: Option<&Inspection>, log: &mut AccessLog) {
    if let (Some(Inspection::Usage(decided)), None) = (inspection, &log.model) {
        log.model = lock(decided).model.clone();
    }
}

/// What the request's body decided, for the response: shared with the [`Scan`] that sends
/// a long body on, which decides only when the body ends.
#[derive(Debug, Default)]
pub(super) struct Decided {
    model: Option<Arc<str>>,
    /// keygate asked for the usage event: the client does not get it.
    strip: bool,
}

fn lock(decided: &Mutex<Decided>) -> std::sync::MutexGuard<'_, Decided> {
    decided.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The body's scan on its way upstream: what the [`HoldBack`] lets through, the model checked
/// as soon as it is read, usage asked for at the end.
struct Scan {
    /// `None` once a body of a key without `models` turned out not to be JSON: the rest
    /// passes unread.
    hold: Option<HoldBack>,
    models: Option<Arc<Models>>,
    ask_usage: bool,
    decided: Arc<Mutex<Decided>>,
}

impl Scan {
    fn model(&self) -> Option<Arc<str>> {
        lock(&self.decided).model.clone()
    }

    /// Records `model` and refuses it if the key may not use it.
    fn judge(&self, model: &str) -> Result<(), ProxyError> {
        let mut decided = lock(&self.decided);
        if decided.model.as_deref() != Some(model) {
            decided.model = Some(model.into());
        }
        match &self.models {
            Some(models) if !models.allows(model) => Err(ProxyError::ModelNotFound(model.into())),
            _ => Ok(()),
        }
    }

    /// A body that cannot be decided: refused for a key with `models`, otherwise passed on
    /// whole, unread from here.
    fn undecided(&mut self, why: Undecidable) -> Result<Bytes, ProxyError> {
        if self.models.is_some() {
            return Err(ProxyError::ModelUndecidable(phrase(why)));
        }
        let held = match self.hold.take() {
            Some(hold) => hold.finish().1.release(b""),
            None => Bytes::new(),
        };
        Ok(held)
    }
}

impl RequestFilter for Scan {
    fn chunk(&mut self, chunk: Bytes) -> Result<Bytes, ProxyError> {
        let Some(hold) = self.hold.as_mut() else {
            return Ok(chunk);
        };
        match hold.push(chunk) {
            Ok(pass) => {
                if self.models.is_some() && lock(&self.decided).model.is_none() {
                    if let Some(model) = hold.scanner().model() {
                        let model = model.to_owned();
                        self.judge(&model)?;
                    }
                }
                Ok(pass)
            }
            Err(why) => self.undecided(why),
        }
    }

    fn end(&mut self) -> Result<Bytes, ProxyError> {
        let Some(hold) = self.hold.take() else {
            return Ok(Bytes::new());
        };
        let (decision, held) = hold.finish();
        let inspected = match decision {
            Ok(inspected) => inspected,
            Err(why) if self.models.is_some() => {
                return Err(ProxyError::ModelUndecidable(phrase(why)))
            }
            Err(_) => return Ok(held.release(b"")),
        };
        if let Some(model) = &inspected.model {
            self.judge(model)?;
        }
        let insert = match inspected.usage_request() {
            UsageRequest::Insert(insert) if self.ask_usage => insert,
            _ => Bytes::new(),
        };
        lock(&self.decided).strip = !insert.is_empty();
        Ok(held.release(&insert))
    }
}

/// Why the model cannot be decided, in words for the client.
fn phrase(why: Undecidable) -> &'static str {
    match why {
        Undecidable::Json(_) => "the body is not one JSON object",
        Undecidable::TrailingWhitespace => "too much whitespace follows the JSON object",
        Undecidable::MissingModel => "the body has no top-level `model`",
        Undecidable::ModelNotString => "`model` is not a string",
        Undecidable::ModelTooLong => "`model` is longer than 512 bytes",
        Undecidable::ModelLoneSurrogate => "`model` holds an unpaired surrogate escape",
        Undecidable::DuplicateModel => "the body has more than one `model` member",
    }
}

/// What the response of an inspected request needs.
pub(super) enum Inspection {
    /// Its model list filtered.
    List(Arc<Models>),
    /// The filtered list, read from the upstream's answer.
    Listed(Bytes),
    /// Its usage read.
    Usage(Arc<Mutex<Decided>>),
}

impl Inspection {
    /// The upstream answered: a model list is read whole (each wait at most `idle_timeout`)
    /// and filtered, leaving `response`'s body at its end.
    pub(super) async fn answered(
        self,
        response: &mut Response<Incoming>,
        idle_timeout: Duration,
    ) -> Result<Self, ProxyError> {
        let Inspection::List(models) = self else {
            return Ok(self);
        };
        if response.status() != StatusCode::OK {
            return Ok(Inspection::List(models));
        }
        let mut list = BytesMut::new();
        let body = response.body_mut();
        loop {
            let frame = match tokio::time::timeout(idle_timeout, body.frame()).await {
                Err(_) => return Err(ProxyError::UpstreamIdle),
                Ok(None) => break,
                Ok(Some(frame)) => frame.map_err(ProxyError::UpstreamBody)?,
            };
            if let Ok(data) = frame.into_data() {
                if list.len() + data.len() > MODEL_LIST_CAP {
                    return Err(ProxyError::ModelListUnreadable);
                }
                list.extend_from_slice(&data);
            }
        }
        let filtered =
            filter_model_list(&list, &models).map_err(|_| ProxyError::ModelListUnreadable)?;
        Ok(Inspection::Listed(Bytes::from(filtered)))
    }

    /// The filter for the response with `headers` (whose `Content-Length` is changed when
    /// the body changes), or `None` when it is passed on as it is.
    pub(super) fn response(self, headers: &mut HeaderMap) -> Option<Box<dyn ResponseFilter>> {
        let mut length = None;
        let filter: Box<dyn ResponseFilter> = match self {
            Inspection::Listed(list) => {
                length = Some(HeaderValue::from(list.len()));
                Box::new(ListFilter(Some(list)))
            }
            Inspection::List(_) => return None,
            Inspection::Usage(decided) => {
                let reader = if sse::is_event_stream(headers) {
                    if lock(&decided).strip {
                        Reader::Sse(SseUsage::stripping(), false)
                    } else {
                        Reader::Sse(SseUsage::counting(), true)
                    }
                } else {
                    Reader::Json(JsonUsage::new())
                };
                Box::new(UsageFilter { reader, decided })
            }
        };
        if !filter.keeps_length() {
            headers.remove(CONTENT_LENGTH);
        }
        if let Some(length) = length {
            headers.insert(CONTENT_LENGTH, length);
        }
        Some(filter)
    }
}

/// Reads the usage of a JSON response or an SSE stream.
struct UsageFilter {
    reader: Reader,
    decided: Arc<Mutex<Decided>>,
}

enum Reader {
    Json(JsonUsage),
    /// The stream's reader, and whether it passes every byte on.
    Sse(SseUsage, bool),
}

impl ResponseFilter for UsageFilter {
    fn chunk(&mut self, chunk: Bytes) -> Bytes {
        match &mut self.reader {
            Reader::Json(json) => {
                json.push(&chunk);
                chunk
            }
            Reader::Sse(sse, _) => sse.push(&chunk),
        }
    }

    fn end(&mut self) -> Result<Bytes, ProxyError> {
        Ok(match &mut self.reader {
            Reader::Json(_) => Bytes::new(),
            Reader::Sse(sse, _) => sse.finish(),
        })
    }

    fn keeps_length(&self) -> bool {
        match &self.reader {
            Reader::Json(_) => true,
            Reader::Sse(_, counting) => *counting,
        }
    }

    fn record(&mut self, log: &mut AccessLog) {
        let (usage, answered) = match &self.reader {
            Reader::Json(json) => (json.finish(), json.model()),
            Reader::Sse(sse, _) => (sse.usage(), sse.model()),
        };
        if log.model.is_none() {
            log.model = lock(&self.decided)
                .model
                .clone()
                .or_else(|| answered.map(Arc::from));
        }
        match (usage, &self.reader) {
            (Some(usage), _) => {
                log.prompt_tokens = Some(usage.prompt_tokens);
                log.completion_tokens = Some(usage.completion_tokens);
            }
            (None, Reader::Sse(sse, _)) if sse.streamed_tokens() > 0 => {
                log.completion_tokens = Some(sse.streamed_tokens());
                log.tokens_estimated = true;
            }
            (None, _) => {}
        }
    }
}

/// Passes on the filtered model list once the upstream's body (already read) has ended.
struct ListFilter(Option<Bytes>);

impl ResponseFilter for ListFilter {
    fn chunk(&mut self, _chunk: Bytes) -> Bytes {
        Bytes::new()
    }

    fn end(&mut self) -> Result<Bytes, ProxyError> {
        Ok(self.0.take().unwrap_or_default())
    }

    fn keeps_length(&self) -> bool {
        false
    }

    fn record(&mut self, _log: &mut AccessLog) {}
}
