//! The access log: one line per request, written when the response is finished (its body
//! fully sent, broken, or abandoned by the client), so the line carries the real byte count
//! and outcome of a stream.
//!
//! Fields are stable names; the path is logged without its query, and no header value other
//! than the request id (sanitised by `rewrite::request_id`) is ever logged.
//!
//! The line is formatted here straight into the pending batch (see `PENDING`), in the same
//! shape as tracing's own lines (`timestamp`, `level`, `message`, `target`,
//! then the fields). Going through tracing-subscriber's JSON formatter cost 28 % of all
//! instructions per proxied request (callgrind); it still decides whether the line is written,
//! through the `[log] level` filter on target `keygate::access`. Batches reach stdout through
//! `logging`'s bounded queue and writer thread, so a stalled log reader never holds up a
//! request: it costs lines, which are counted.

use std::any::Any;
use std::cell::RefCell;
use std::fmt;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderValue, Method, Request, StatusCode, Uri};

use crate::config::LogFormat;
use crate::error::ProxyError;
use crate::observe::metrics::{Finished, Metrics};

/// The target of access lines, so a filter can keep or drop them apart from diagnostics.
pub(crate) const TARGET: &str = "keygate::access";

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
    /// The request target as received (a reference-counted copy); only its path is logged.
    uri: Uri,
    /// The client's IP address as text.
    client: HeaderValue,
    request_id: HeaderValue,
    pub key: Option<Arc<str>>,
    pub status: StatusCode,
    pub upstream_ttfb: Option<Duration>,
    /// The key's concurrency slot, if it has a limit: held as long as the request is, and
    /// released once its line is written (or the request is dropped).
    pub slot: Option<Box<dyn Any + Send + Sync>>,
    /// The request's place in flight to the upstream under `max_in_flight` (a fair-queue
    /// permit): held, like the slot, as long as the request is.
    pub held_upstream: Option<Box<dyn Any + Send + Sync>>,
    /// How long the request waited in the upstream queue; `None` when it did not go through
    /// the queue (no `max_in_flight`, no key, a WebSocket, or refused before it).
    pub queue_wait: Option<Duration>,
    /// Keep-alive comments sent into an SSE stream.
    pub sse_keepalives: u32,
    /// Whether an SSE stream that broke got the final error event.
    pub sse_error_event: bool,
    /// The model the request named (read from its body), or else the one the response named.
    pub model: Option<Arc<str>>,
    /// The tokens the response reported in its `usage`; `None` when it reported none that
    /// could be read. Both are set together, before [`AccessLog::finish`], except for a
    /// stream that ended before its usage event: then only `completion_tokens`, estimated
    /// from the events streamed, with `tokens_estimated`. Only reported usage is counted in
    /// `keygate_tokens_total`; the key's token budget is charged either way.
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub tokens_estimated: bool,
    /// Charges the usage to the key's token budget when the line is written; only for a
    /// key with `tokens_per_minute` whose request was admitted.
    pub debit: Option<Debit>,
    metrics: Arc<Metrics>,
    /// Set once the line is written; a log dropped before that records a client hang-up.
    written: bool,
}

/// Access lines not yet handed to the log writer. One `write` per request cost 8 % of the
/// CPU of a proxied request, so lines go out in batches, as Envoy writes its file access
/// logs: when [`FLUSH_AT`] bytes are pending, every [`FLUSH_EVERY`], and at shutdown. Each
/// batch is one piece in the log queue and one write to stdout, made by the writer thread,
/// never here. A process killed with SIGKILL loses at most the last second of lines.
static PENDING: Mutex<String> = Mutex::new(String::new());

/// Pending bytes that trigger a hand-over.
const FLUSH_AT: usize = 32 * 1024;

/// Longest time an access line waits before it is handed over.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// A fresh batch's room: [`FLUSH_AT`] and the line that crosses it.
const BATCH_CAPACITY: usize = FLUSH_AT + 4 * 1024;

impl AccessLog {
    pub fn new<B>(
        req: &Request<B>,
        client: &HeaderValue,
        started: Instant,
        request_id: HeaderValue,
        metrics: Arc<Metrics>,
    ) -> Self {
        metrics.request_started();
        Self {
            started,
            method: req.method().clone(),
            uri: req.uri().clone(),
            client: client.clone(),
            request_id,
            key: None,
            status: StatusCode::OK,
            upstream_ttfb: None,
            slot: None,
            held_upstream: None,
            queue_wait: None,
            sse_keepalives: 0,
            sse_error_event: false,
            model: None,
            prompt_tokens: None,
            tokens_estimated: false,
            completion_tokens: None,
            debit: None,
            metrics,
            written: false,
        }
    }

    /// Prompt plus completion tokens, if the upstream reported either.
    fn tokens_used(&self) -> Option<u64> {
        match (self.prompt_tokens, self.completion_tokens) {
            (None, None) => None,
            (prompt, completion) => {
                Some(prompt.unwrap_or(0).saturating_add(completion.unwrap_or(0)))
            }
        }
    }

    /// Writes the line and counts the request in the metrics. `bytes` is the response body
    /// bytes sent to the client. A failure is logged here and nowhere else, with its cause in
    /// `error`.
    pub fn finish(mut self, bytes: u64, outcome: Outcome<'_>) {
        self.write(bytes, outcome);
    }

    fn write(&mut self, bytes: u64, outcome: Outcome<'_>) {
        self.written = true;
        if let (Some(debit), Some(tokens)) = (self.debit.take(), self.tokens_used()) {
            (debit.0)(tokens);
        }
        let duration = self.started.elapsed();
        self.metrics.request_finished(Finished {
            key: self.key.as_ref(),
            method: &self.method,
            status: self.status.as_u16(),
            duration,
            upstream_ttfb: self.upstream_ttfb,
            bytes_out: bytes,
            model: self.model.as_ref(),
            tokens: self.prompt_tokens.zip(self.completion_tokens),
            error: match outcome {
                Outcome::Failed(e) => Some(e),
                _ => None,
            },
        });
        if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
            return;
        }
        let fields = Fields {
            log: self,
            bytes,
            outcome,
            duration,
        };
        let mut pending = PENDING.lock().unwrap_or_else(PoisonError::into_inner);
        match crate::observe::logging::format() {
            LogFormat::Json => fields.json(&mut pending),
            LogFormat::Text => fields.text(&mut pending),
        }
        if pending.len() >= FLUSH_AT {
            hand_over(&mut pending);
        }
    }
}

impl Drop for AccessLog {
    /// A request dropped before its response was sent: the client hung up while keygate
    /// waited for the upstream, and the upstream request was dropped with it.
    fn drop(&mut self) {
        if !self.written {
            self.status = CLIENT_CLOSED;
            self.write(0, Outcome::ClientClosed);
        }
    }
}

/// Charges a response's tokens (prompt plus completion) to its key's token budget. It must
/// not wait: it runs where the access line is written, at the end of the response.
pub struct Debit(Box<dyn FnOnce(u64) + Send + Sync>);

impl Debit {
    pub fn new(charge: impl FnOnce(u64) + Send + Sync + 'static) -> Self {
        Self(Box::new(charge))
    }
}

impl fmt::Debug for Debit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Debit")
    }
}

/// The status logged for a client that went away before its response (nginx's 499).
const CLIENT_CLOSED: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => StatusCode::BAD_REQUEST,
};

/// Hands the pending access lines to the log writer now. `server::run` calls it every
/// [`FLUSH_EVERY`] and once more when it returns.
pub(crate) fn flush() {
    hand_over(&mut PENDING.lock().unwrap_or_else(PoisonError::into_inner));
}

/// Queues the pending lines as one batch, never waiting on stdout (the queue drops and
/// counts what it has no room for), and leaves an empty buffer of the same size behind.
fn hand_over(pending: &mut String) {
    if !pending.is_empty() {
        let batch = std::mem::replace(pending, String::with_capacity(BATCH_CAPACITY));
        crate::observe::logging::write(batch.into_bytes());
    }
}

/// One line's values, formatted as JSON or text.
struct Fields<'a> {
    log: &'a AccessLog,
    bytes: u64,
    outcome: Outcome<'a>,
    duration: Duration,
}

impl Fields<'_> {
    fn error(&self) -> Option<&ProxyError> {
        match self.outcome {
            Outcome::Failed(e) if e.has_cause() => Some(e),
            _ => None,
        }
    }

    fn json(&self, out: &mut String) {
        let l = self.log;
        out.push_str(r#"{"timestamp":""#);
        push_timestamp(out);
        out.push_str(
            r#"","level":"INFO","message":"request","target":"keygate::access","method":"#,
        );
        json_plain(out, l.method.as_str());
        out.push_str(r#","path":"#);
        json_str(out, l.uri.path());
        out.push_str(r#","status":"#);
        push_int(out, l.status.as_u16());
        out.push_str(r#","duration_ms":"#);
        push_millis(out, self.duration);
        out.push_str(r#","upstream_ttfb_ms":"#);
        match l.upstream_ttfb {
            Some(ttfb) => push_millis(out, ttfb),
            None => out.push_str("null"),
        }
        out.push_str(r#","bytes":"#);
        push_int(out, self.bytes);
        out.push_str(r#","key":"#);
        json_str(out, l.key.as_deref().unwrap_or("-"));
        out.push_str(r#","request_id":"#);
        json_plain(out, l.request_id.to_str().unwrap_or("-"));
        out.push_str(r#","client":"#);
        json_plain(out, l.client.to_str().unwrap_or("-"));
        out.push_str(r#","outcome":""#);
        out.push_str(self.outcome.as_str());
        out.push('"');
        if let Some(wait) = l.queue_wait {
            out.push_str(r#","queue_ms":"#);
            push_millis(out, wait);
        }
        if l.sse_keepalives > 0 {
            out.push_str(r#","sse_keepalives":"#);
            push_int(out, l.sse_keepalives);
        }
        if l.sse_error_event {
            out.push_str(r#","sse_error_event":true"#);
        }
        if let Some(model) = &l.model {
            out.push_str(r#","model":"#);
            json_str(out, model);
        }
        if let Some(n) = l.prompt_tokens {
            out.push_str(r#","prompt_tokens":"#);
            push_int(out, n);
        }
        if let Some(n) = l.completion_tokens {
            out.push_str(r#","completion_tokens":"#);
            push_int(out, n);
        }
        if l.tokens_estimated {
            out.push_str(r#","tokens_estimated":true"#);
        }
        if let Some(e) = self.error() {
            out.push_str(r#","error":"#);
            json_str(out, &e.to_string());
        }
        out.push_str("}\n");
    }

    fn text(&self, out: &mut String) {
        let l = self.log;
        push_timestamp(out);
        let _ = write!(
            out,
            "  INFO {TARGET}: request method={} path={} status={} duration_ms=",
            l.method,
            l.uri.path(),
            l.status.as_u16(),
        );
        push_millis(out, self.duration);
        if let Some(ttfb) = l.upstream_ttfb {
            out.push_str(" upstream_ttfb_ms=");
            push_millis(out, ttfb);
        }
        let _ = write!(
            out,
            " bytes={} key={} request_id={} client={} outcome={}",
            self.bytes,
            l.key.as_deref().unwrap_or("-"),
            l.request_id.to_str().unwrap_or("-"),
            l.client.to_str().unwrap_or("-"),
            self.outcome.as_str()
        );
        if let Some(wait) = l.queue_wait {
            out.push_str(" queue_ms=");
            push_millis(out, wait);
        }
        if l.sse_keepalives > 0 {
            let _ = write!(out, " sse_keepalives={}", l.sse_keepalives);
        }
        if l.sse_error_event {
            out.push_str(" sse_error_event=true");
        }
        if let Some(model) = &l.model {
            // Quoted: a model name may hold spaces and any other character.
            out.push_str(" model=");
            json_str(out, model);
        }
        if let Some(n) = l.prompt_tokens {
            let _ = write!(out, " prompt_tokens={n}");
        }
        if let Some(n) = l.completion_tokens {
            let _ = write!(out, " completion_tokens={n}");
        }
        if l.tokens_estimated {
            out.push_str(" tokens_estimated=true");
        }
        if let Some(e) = self.error() {
            let _ = write!(out, " error=\"{e}\"");
        }
        out.push('\n');
    }
}

/// Appends the time as RFC 3339 UTC with microseconds, `2026-11-23T10:15:00.391200Z`. The
/// part up to the seconds changes once a second, so each thread keeps it ready.
fn push_timestamp(out: &mut String) {
    thread_local! {
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let since_epoch = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let second = since_epoch.as_secs();
    SECOND.with_borrow_mut(|(cached, prefix)| {
        if *cached != second {
            *cached = second;
            prefix.clear();
            let _ = write!(prefix, "{}", humantime::format_rfc3339_seconds(now));
            prefix.pop();
        }
        out.push_str(prefix);
    });
    let micros = since_epoch.subsec_micros();
    out.push('.');
    let digits = itoa::Buffer::new().format(micros).len();
    out.extend(std::iter::repeat_n('0', 6 - digits));
    push_int(out, micros);
    out.push('Z');
}

/// Appends milliseconds with three decimals (microsecond resolution), without floats.
fn push_millis(out: &mut String, d: Duration) {
    let micros = d.as_micros();
    push_int(out, micros / 1000);
    let fraction = (micros % 1000) as u16;
    out.push('.');
    for digit in [fraction / 100, fraction / 10 % 10, fraction % 10] {
        out.push(char::from(b'0' + digit as u8));
    }
}

fn push_int(out: &mut String, n: impl itoa::Integer) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// Appends `s` as a JSON string literal, for values that never need escaping: a method (an
/// HTTP token), a request id (letters, digits and `-_.:+/=`, see `rewrite::request_id`), an
/// IP address. Anything else goes through [`json_str`].
fn json_plain(out: &mut String, s: &str) {
    debug_assert!(
        !s.bytes().any(|b| b == b'"' || b == b'\\' || b < b' '),
        "{s:?}"
    );
    out.push('"');
    out.push_str(s);
    out.push('"');
}

/// Appends `s` as a JSON string literal. Logged values are nearly always plain ASCII, so
/// runs with nothing to escape are copied whole. The bytes that need escaping are all ASCII,
/// so a byte scan finds them without decoding UTF-8, and each is a character boundary.
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    let mut rest = s;
    while let Some(at) = rest
        .bytes()
        .position(|b| b == b'"' || b == b'\\' || b < b' ')
    {
        out.push_str(&rest[..at]);
        let escaped = rest.as_bytes()[at];
        match escaped {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            control => {
                let _ = write!(out, "\\u{control:04x}");
            }
        }
        rest = &rest[at + 1..];
    }
    out.push_str(rest);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log record of a GET of `target` from 10.0.0.7 with request id `id-1`.
    fn access_log(target: &str) -> AccessLog {
        let req = Request::get(target).body(()).unwrap();
        AccessLog::new(
            &req,
            &HeaderValue::from_static("10.0.0.7"),
            Instant::now(),
            HeaderValue::from_static("id-1"),
            Arc::new(Metrics::default()),
        )
    }

    fn line(format: LogFormat, outcome: Outcome<'_>) -> String {
        let mut log = access_log("/v1/x?secret=1");
        log.key = Some("ci".into());
        log.status = StatusCode::BAD_GATEWAY;
        let fields = Fields {
            log: &log,
            bytes: 42,
            outcome,
            duration: Duration::from_micros(1500),
        };
        let mut out = String::new();
        match format {
            LogFormat::Json => fields.json(&mut out),
            LogFormat::Text => fields.text(&mut out),
        }
        out
    }

    #[test]
    fn json_line_is_one_object_with_stable_fields_and_no_query() {
        let text = line(LogFormat::Json, Outcome::Complete);
        assert!(
            text.ends_with("}\n") && text.matches('\n').count() == 1,
            "{text}"
        );
        for field in [
            r#""level":"INFO""#,
            r#""target":"keygate::access""#,
            r#""method":"GET""#,
            r#""path":"/v1/x""#,
            r#""status":502"#,
            r#""upstream_ttfb_ms":null"#,
            r#""bytes":42"#,
            r#""key":"ci""#,
            r#""request_id":"id-1""#,
            r#""client":"10.0.0.7""#,
            r#""outcome":"complete""#,
        ] {
            assert!(text.contains(field), "{field} missing: {text}");
        }
        assert!(!text.contains("secret"), "{text}");
        assert!(!text.contains("sse_"), "{text}");
        assert!(!text.contains("queue_ms"), "{text}");
    }

    #[test]
    fn queue_ms_appears_for_a_request_that_went_through_the_queue() {
        let mut log = access_log("/v1/x");
        log.queue_wait = Some(Duration::from_micros(2500));
        let fields = Fields {
            log: &log,
            bytes: 1,
            outcome: Outcome::Complete,
            duration: Duration::ZERO,
        };
        let (mut json, mut text) = (String::new(), String::new());
        fields.json(&mut json);
        fields.text(&mut text);
        assert!(
            json.contains(r#""outcome":"complete","queue_ms":2.500}"#),
            "{json}"
        );
        assert!(
            text.ends_with(" outcome=complete queue_ms=2.500\n"),
            "{text}"
        );
    }

    #[test]
    fn sse_fields_appear_only_when_something_was_added_to_a_stream() {
        let mut log = access_log("/v1/x");
        log.sse_keepalives = 3;
        log.sse_error_event = true;
        let fields = Fields {
            log: &log,
            bytes: 1,
            outcome: Outcome::Complete,
            duration: Duration::ZERO,
        };
        let (mut json, mut text) = (String::new(), String::new());
        fields.json(&mut json);
        fields.text(&mut text);
        assert!(
            json.contains(r#""sse_keepalives":3,"sse_error_event":true}"#),
            "{json}"
        );
        assert!(
            text.contains(" sse_keepalives=3 sse_error_event=true\n"),
            "{text}"
        );
    }

    /// A log whose debit sends what it charges to the returned receiver.
    fn debited(
        prompt: Option<u64>,
        completion: Option<u64>,
    ) -> (AccessLog, std::sync::mpsc::Receiver<u64>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut log = access_log("/v1/chat/completions");
        log.prompt_tokens = prompt;
        log.completion_tokens = completion;
        log.debit = Some(Debit::new(move |tokens| tx.send(tokens).unwrap()));
        (log, rx)
    }

    #[test]
    fn the_debit_charges_prompt_plus_completion_once_when_the_line_is_written() {
        let (log, charged) = debited(Some(12), Some(30));
        log.finish(10, Outcome::Complete);
        assert_eq!(charged.try_iter().collect::<Vec<_>>(), [42]);
        // A client that hung up after the usage arrived is charged too.
        let (log, charged) = debited(Some(7), None);
        drop(log);
        assert_eq!(charged.try_iter().collect::<Vec<_>>(), [7]);
        let (log, charged) = debited(Some(1), Some(u64::MAX));
        log.finish(0, Outcome::Complete);
        assert_eq!(charged.try_iter().collect::<Vec<_>>(), [u64::MAX]);
    }

    #[test]
    fn without_usage_nothing_is_charged() {
        let (log, charged) = debited(None, None);
        log.finish(10, Outcome::Complete);
        assert_eq!(charged.try_iter().count(), 0);
    }

    #[test]
    fn model_and_tokens_appear_when_known() {
        let mut log = access_log("/v1/chat/completions");
        let fields = |log: &AccessLog| {
            let f = Fields {
                log,
                bytes: 1,
                outcome: Outcome::Complete,
                duration: Duration::ZERO,
            };
            let (mut json, mut text) = (String::new(), String::new());
            f.json(&mut json);
            f.text(&mut text);
            (json, text)
        };
        let (json, text) = fields(&log);
        assert!(
            !json.contains("model") && !json.contains("tokens"),
            "{json}"
        );
        assert!(
            !text.contains("model") && !text.contains("tokens"),
            "{text}"
        );
        log.model = Some("lora \"x\"\n".into());
        log.prompt_tokens = Some(9);
        log.completion_tokens = Some(0);
        let (json, text) = fields(&log);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["model"], "lora \"x\"\n");
        assert_eq!(v["prompt_tokens"], 9);
        assert_eq!(v["completion_tokens"], 0);
        assert!(
            text.ends_with(
                " model=\"lora \\\"x\\\"\\u000a\" prompt_tokens=9 completion_tokens=0\n"
            ),
            "{text}"
        );
        log.prompt_tokens = None;
        log.completion_tokens = Some(40);
        log.tokens_estimated = true;
        let (json, text) = fields(&log);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["completion_tokens"], 40);
        assert_eq!(v["tokens_estimated"], true);
        assert!(v.get("prompt_tokens").is_none(), "{json}");
        assert!(
            text.ends_with(" completion_tokens=40 tokens_estimated=true\n"),
            "{text}"
        );
    }

    #[test]
    fn text_line_names_the_outcome() {
        let text = line(LogFormat::Text, Outcome::ClientClosed);
        assert!(
            text.contains("INFO keygate::access: request method=GET path=/v1/x status=502"),
            "{text}"
        );
        assert!(text.ends_with("outcome=client_closed\n"), "{text}");
    }

    #[test]
    fn timestamp_is_rfc3339_with_microseconds() {
        let mut out = String::new();
        push_timestamp(&mut out);
        push_timestamp(&mut out);
        assert_eq!(out.len(), 2 * 27, "{out}");
        let first = &out[..27];
        assert!(
            first.ends_with('Z') && first.as_bytes()[10] == b'T' && first.as_bytes()[19] == b'.',
            "{out}"
        );
        assert!(humantime::parse_rfc3339(first).is_ok(), "{out}");
    }

    #[test]
    fn millis_have_three_decimals() {
        let mut out = String::new();
        push_millis(&mut out, Duration::from_micros(1_234_005));
        assert_eq!(out, "1234.005");
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut out = String::new();
        json_str(&mut out, "a\"b\\c\nd");
        assert_eq!(out, r#""a\"b\\c\u000ad""#);
        out.clear();
        json_str(&mut out, "é\"ü\t€");
        assert_eq!(out, r#""é\"ü\u0009€""#);
    }
}
