//! Prometheus metrics, served by `admin` on its own listener. Every label takes a bounded set
//! of values: key names from the config, method classes, status codes and fixed reason words
//! (see [`crate::observe::labels`]), and on `keygate_tokens_total` model names, bounded per key
//! (see [`crate::observe::model_labels`]).
//! No path, token or header value ever becomes a label.
//!
//! Requests are counted where their access line is written (`access`), so a metric and a log
//! line always agree.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::Method;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::error::ProxyError;
use crate::observe::labels::{
    key_label, method_class, BuildLabels, KeyLabels, KeyReasonLabels, KindLabels, OutcomeLabels,
    ReasonLabels, RequestLabels, TokenLabels,
};
use crate::observe::model_labels::ModelLabels;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    auth_failures: Family<ReasonLabels, Counter>,
    upstream_errors: Family<KindLabels, Counter>,
    reloads: Family<OutcomeLabels, Counter>,
    key_refusals: Family<KeyReasonLabels, Counter>,
    key_in_flight: Family<KeyLabels, Gauge>,
    key_not_after: Family<KeyLabels, Gauge>,
    sse_keepalives: Family<KeyLabels, Counter>,
    sse_error_events: Family<KeyLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    /// The model label values each key has minted so far.
    token_models: ModelLabels,
    upstream_ttfb: Histogram,
    duration: Histogram,
    bytes_in: Counter,
    bytes_out: Counter,
    connections: Gauge,
    parked: Gauge,
    in_flight: Gauge,
    tls_handshake_failures: Family<ReasonLabels, Counter>,
    certificate_expiry: Gauge,
    redirects: Counter,
    /// Only with `[upstream] max_in_flight`; see [`Metrics::with_queue`].
    queue: Option<QueueMetrics>,
    /// Only with `[limits] redis`; see [`Metrics::with_limit_backend`].
    limit_backend: Option<LimitBackendMetrics>,
}

/// The Redis behind shared limits, sampled when scraped: whether calls go to it, and the
/// totals of failed calls and of decisions taken without it.
#[derive(Debug)]
struct LimitBackendMetrics {
    up: Gauge,
    errors: Counter,
    fallbacks: Counter,
}

/// The fair queue in front of the upstream: how full it is, sampled when scraped, and how
/// long requests waited in it.
#[derive(Debug)]
struct QueueMetrics {
    depth: Family<KeyLabels, Gauge>,
    in_flight: Gauge,
    wait: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("keygate");
        let requests = Family::default();
        let auth_failures = Family::default();
        let upstream_errors = Family::default();
        let reloads = Family::default();
        let key_refusals = Family::default();
        let key_in_flight = Family::default();
        let key_not_after = Family::default();
        let sse_keepalives = Family::default();
        let sse_error_events = Family::default();
        let tokens = Family::default();
        // 1 ms to about 9 minutes: from a cached answer to a long time to first token.
        let upstream_ttfb = Histogram::new(exponential_buckets(0.001, 2.0, 20));
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 22));
        let bytes_in = Counter::default();
        let bytes_out = Counter::default();
        let connections = Gauge::default();
        let parked = Gauge::default();
        let in_flight = Gauge::default();
        let tls_handshake_failures = Family::default();
        let certificate_expiry = Gauge::default();
        let redirects = Counter::default();
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "requests",
            "Requests answered, by key name, method and status",
            requests.clone(),
        );
        registry.register(
            "auth_failures",
            "Requests refused for their credentials, by reason",
            auth_failures.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream failures, by kind",
            upstream_errors.clone(),
        );
        registry.register(
            "config_reloads",
            "Key and certificate reloads (SIGHUP or a changed file), by outcome",
            reloads.clone(),
        );
        registry.register(
            "key_refusals",
            "Requests with a matched key refused by its expiry, scope, concurrency limit or rates, by the shared limits being unavailable, or by the upstream queue timing out, by key and reason",
            key_refusals.clone(),
        );
        registry.register(
            "key_requests_in_flight",
            "Requests and streams in flight, by key; only keys with max_concurrent",
            key_in_flight.clone(),
        );
        registry.register(
            "key_not_after_timestamp_seconds",
            "When a key expires (its not_after, Unix time), by key; only keys with not_after",
            key_not_after.clone(),
        );
        registry.register(
            "sse_keepalives",
            "Keep-alive comments sent into silent SSE streams, by key",
            sse_keepalives.clone(),
        );
        registry.register(
            "sse_error_events",
            "Error events sent before an SSE stream that broke was ended, by key",
            sse_error_events.clone(),
        );
        registry.register(
            "tokens",
            "Tokens the upstream reported in its responses' usage, by key, model and kind (prompt or completion)",
            tokens.clone(),
        );
        registry.register(
            "upstream_ttfb_seconds",
            "Time from forwarding a request to the upstream's response headers",
            upstream_ttfb.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to the end of its response body",
            duration.clone(),
        );
        registry.register(
            "request_body_bytes",
            "Request body bytes forwarded upstream",
            bytes_in.clone(),
        );
        registry.register(
            "response_body_bytes",
            "Response body bytes sent to clients",
            bytes_out.clone(),
        );
        registry.register(
            "connections",
            "Open client connections",
            connections.clone(),
        );
        registry.register(
            "connections_parked",
            "Idle HTTP/1.1 keep-alive connections parked: holding their socket and nothing more",
            parked.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Requests and streams not yet finished",
            in_flight.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed, by reason (timeout or refused)",
            tls_handshake_failures.clone(),
        );
        registry.register(
            "tls_certificate_expiry_timestamp_seconds",
            "When the served certificate expires (notAfter, Unix time)",
            certificate_expiry.clone(),
        );
        registry.register(
            "redirects",
            "Plain HTTP requests answered with a redirect to https",
            redirects.clone(),
        );
        registry.register(
            "log_lines_dropped",
            "Log lines dropped because the log output was not read fast enough (or could not be written)",
            crate::observe::logging::dropped_lines(),
        );
        registry.register("build_info", "keygate's version", build);
        Self {
            registry,
            requests,
            auth_failures,
            upstream_errors,
            reloads,
            key_refusals,
            key_in_flight,
            key_not_after,
            sse_keepalives,
            sse_error_events,
            tokens,
            token_models: ModelLabels::default(),
            upstream_ttfb,
            duration,
            bytes_in,
            bytes_out,
            connections,
            parked,
            in_flight,
            tls_handshake_failures,
            certificate_expiry,
            redirects,
            queue: None,
            limit_backend: None,
        }
    }
}

/// What one finished request contributes.
pub struct Finished<'a> {
    pub key: Option<&'a Arc<str>>,
    pub method: &'a Method,
    pub status: u16,
    pub duration: Duration,
    pub upstream_ttfb: Option<Duration>,
    pub bytes_out: u64,
    /// The model named by the request or, failing that, by the response.
    pub model: Option<&'a Arc<str>>,
    /// Prompt and completion tokens, when the response reported them.
    pub tokens: Option<(u64, u64)>,
    pub error: Option<&'a ProxyError>,
}

impl Metrics {
    /// Adds the fair queue's series, for a gateway with `[upstream] max_in_flight`; without
    /// it they would only ever read zero.
    pub fn with_queue(mut self) -> Self {
        let queue = QueueMetrics {
            depth: Family::default(),
            in_flight: Gauge::default(),
            // 1 ms to about 9 minutes, as the time to first token: a wait is at most
            // queue_timeout.
            wait: Histogram::new(exponential_buckets(0.001, 2.0, 20)),
        };
        self.registry.register(
            "upstream_queue_depth",
            "Requests waiting for a place in flight to the upstream (max_in_flight), by key",
            queue.depth.clone(),
        );
        self.registry.register(
            "upstream_in_flight",
            "Requests and streams holding a place in flight to the upstream (max_in_flight)",
            queue.in_flight.clone(),
        );
        self.registry.register(
            "upstream_queue_wait_seconds",
            "Time a request waited for a place in flight to the upstream, zero when one was free; refused waits included",
            queue.wait.clone(),
        );
        self.queue = Some(queue);
        self
    }

    /// Adds the series of the Redis that shares the limits, for a gateway with
    /// `[limits] redis`.
    pub fn with_limit_backend(mut self) -> Self {
        let backend = LimitBackendMetrics {
            up: Gauge::default(),
            errors: Counter::default(),
            fallbacks: Counter::default(),
        };
        self.registry.register(
            "limit_backend_up",
            "1 while the Redis of [limits] answers, 0 while requests are decided without it",
            backend.up.clone(),
        );
        self.registry.register(
            "limit_backend_errors",
            "Calls to the Redis of [limits] that failed or took longer than redis_timeout, reconnection attempts included",
            backend.errors.clone(),
        );
        self.registry.register(
            "limit_fallbacks",
            "Rate decisions and concurrency slots taken without Redis (on_redis_error) because it was down or did not answer in time",
            backend.fallbacks.clone(),
        );
        self.limit_backend = Some(backend);
        self
    }

    /// Records the Redis of `[limits]` as it is now; `errors` and `fallbacks` are totals
    /// since start-up.
    pub fn limit_backend_sampled(&self, up: bool, errors: u64, fallbacks: u64) {
        let Some(backend) = &self.limit_backend else {
            return;
        };
        backend.up.set(i64::from(up));
        backend.errors.inner().fetch_max(errors, Ordering::Relaxed);
        backend
            .fallbacks
            .inner()
            .fetch_max(fallbacks, Ordering::Relaxed);
    }

    /// Records the queue as it is now: the places taken, and each key's waiting requests
    /// (`keys`: every key configured, with its count, zero included).
    pub fn queue_sampled<'a>(
        &self,
        in_flight: usize,
        keys: impl IntoIterator<Item = (&'a Arc<str>, usize)>,
    ) {
        let Some(queue) = &self.queue else { return };
        queue.in_flight.set(gauge_value(in_flight));
        for (key, waiting) in keys {
            queue
                .depth
                .get_or_create(&KeyLabels { key: key.clone() })
                .set(gauge_value(waiting));
        }
    }

    /// A request's time in the queue, however it ended: let through, timed out or drained.
    pub fn queue_waited(&self, waited: Duration) {
        if let Some(queue) = &self.queue {
            queue.wait.observe(waited.as_secs_f64());
        }
    }

    pub fn request_started(&self) {
        self.in_flight.inc();
    }

    pub fn request_finished(&self, r: Finished<'_>) {
        self.in_flight.dec();
        let key = key_label(r.key);
        self.requests
            .get_or_create(&RequestLabels {
                key: key.clone(),
                method: method_class(r.method),
                status: r.status,
            })
            .inc();
        self.duration.observe(r.duration.as_secs_f64());
        if let Some(ttfb) = r.upstream_ttfb {
            self.upstream_ttfb.observe(ttfb.as_secs_f64());
        }
        self.bytes_out.inc_by(r.bytes_out);
        if let (Some(key), Some((prompt, completion))) = (r.key, r.tokens) {
            self.count_tokens(key, r.model, prompt, completion);
        }
        let Some(e) = r.error else { return };
        match e {
            ProxyError::MissingCredentials => self.auth_failure("missing"),
            ProxyError::MalformedCredentials => self.auth_failure("malformed"),
            ProxyError::InvalidCredentials => self.auth_failure("invalid"),
            ProxyError::KeyExpired => {
                self.auth_failure("expired");
                self.key_refusal(key, "expired");
            }
            ProxyError::OutOfScope => self.key_refusal(key, "out_of_scope"),
            ProxyError::RouteNotInPreset => self.key_refusal(key, "route_not_in_preset"),
            ProxyError::KeyBusy => self.key_refusal(key, "concurrency_limit"),
            ProxyError::RateLimited(_) => self.key_refusal(key, "rate_limit"),
            ProxyError::LimitsUnavailable(_) => self.key_refusal(key, "limits_unavailable"),
            ProxyError::QueueTimeout => self.key_refusal(key, "queue_timeout"),
            ProxyError::ModelNotFound(_) => self.key_refusal(key, "model_not_allowed"),
            ProxyError::ModelUndecidable(_) => self.key_refusal(key, "model_undecidable"),
            ProxyError::ModelListUnreadable => self.upstream_error("model_list"),
            ProxyError::UpstreamUnreachable(_) => self.upstream_error("refused"),
            ProxyError::UpstreamFailed(_) | ProxyError::UpstreamBody(_) => {
                self.upstream_error("reset")
            }
            ProxyError::UpstreamTimeout => self.upstream_error("timeout"),
            ProxyError::UnexpectedUpgrade => self.upstream_error("protocol"),
            ProxyError::UpstreamIdle => self.upstream_error("idle_timeout"),
            _ => {}
        }
    }

    fn count_tokens(&self, key: &Arc<str>, model: Option<&Arc<str>>, prompt: u64, completion: u64) {
        let model = self.token_models.label(key, model);
        for (kind, n) in [("prompt", prompt), ("completion", completion)] {
            self.tokens
                .get_or_create(&TokenLabels {
                    key: key.clone(),
                    model: model.clone(),
                    kind,
                })
                .inc_by(n);
        }
    }

    fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    fn key_refusal(&self, key: &Arc<str>, reason: &'static str) {
        self.key_refusals
            .get_or_create(&KeyReasonLabels {
                key: key.clone(),
                reason,
            })
            .inc();
    }

    /// The gauge of `key`'s requests in flight, which a held concurrency slot counts in.
    pub fn key_in_flight(&self, key: &Arc<str>) -> Gauge {
        self.key_in_flight
            .get_or_create(&KeyLabels { key: key.clone() })
            .clone()
    }

    /// Takes out `key`'s `not_after`: the key was removed, or no longer expires.
    pub fn forget_key_not_after(&self, key: &Arc<str>) {
        self.key_not_after.remove(&KeyLabels { key: key.clone() });
    }

    /// Publishes `key`'s `not_after`.
    pub fn key_not_after(&self, key: &Arc<str>, not_after: SystemTime) {
        let secs = not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.key_not_after
            .get_or_create(&KeyLabels { key: key.clone() })
            .set(secs);
    }

    /// The counters one SSE response adds to, for the key it was admitted with.
    pub fn sse_counters(&self, key: Option<&Arc<str>>) -> SseCounters {
        let labels = KeyLabels {
            key: key_label(key).clone(),
        };
        SseCounters {
            keepalives: self.sse_keepalives.get_or_create(&labels).clone(),
            error_events: self.sse_error_events.get_or_create(&labels).clone(),
        }
    }

    fn upstream_error(&self, kind: &'static str) {
        self.upstream_errors
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    pub fn body_bytes_in(&self, n: u64) {
        self.bytes_in.inc_by(n);
    }

    pub fn connection_opened(&self) {
        self.connections.inc();
    }

    pub fn connection_closed(&self) {
        self.connections.dec();
    }

    pub fn connection_parked(&self) {
        self.parked.inc();
    }

    pub fn connection_unparked(&self) {
        self.parked.dec();
    }

    pub fn reloaded(&self, ok: bool) {
        let outcome = if ok { "success" } else { "failure" };
        self.reloads.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    pub fn tls_handshake_failed(&self, timed_out: bool) {
        let reason = if timed_out { "timeout" } else { "refused" };
        self.tls_handshake_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn certificate_expires(&self, not_after: i64) {
        self.certificate_expiry.set(not_after);
    }

    pub fn redirected(&self) {
        self.redirects.inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A permit (a key's concurrency slot) counted in a gauge for as long as it is held.
#[derive(Debug)]
pub(crate) struct Held<P> {
    _permit: P,
    in_use: Gauge,
}

impl<P> Held<P> {
    pub(crate) fn new(permit: P, in_use: Gauge) -> Self {
        in_use.inc();
        Self {
            _permit: permit,
            in_use,
        }
    }
}

impl<P> Drop for Held<P> {
    fn drop(&mut self) {
        self.in_use.dec();
    }
}

/// What one SSE response's metrics count, by key.
pub struct SseCounters {
    pub keepalives: Counter,
    pub error_events: Counter,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::model_labels::MODEL_LABELS_PER_KEY;

    #[test]
    fn a_finished_request_is_counted_with_bounded_labels() {
        let m = Metrics::default();
        m.request_started();
        let key: Arc<str> = Arc::from("ci");
        m.request_finished(Finished {
            key: Some(&key),
            method: &Method::from_bytes(b"BREW").unwrap(),
            status: 200,
            duration: Duration::from_millis(3),
            upstream_ttfb: Some(Duration::from_millis(2)),
            bytes_out: 10,
            model: None,
            tokens: None,
            error: None,
        });
        let text = m.encode();
        assert!(
            text.contains(r#"keygate_requests_total{key="ci",method="other",status="200"} 1"#),
            "{text}"
        );
        assert!(text.contains("keygate_requests_in_flight 0"), "{text}");
        assert!(
            text.contains("keygate_response_body_bytes_total 10"),
            "{text}"
        );
        assert!(text.contains(r#"keygate_build_info{version=""#), "{text}");
    }

    #[test]
    fn upstream_errors_are_counted_by_kind() {
        let m = Metrics::default();
        m.request_started();
        m.request_finished(Finished {
            key: None,
            method: &Method::GET,
            status: 504,
            duration: Duration::ZERO,
            upstream_ttfb: None,
            bytes_out: 0,
            model: None,
            tokens: None,
            error: Some(&ProxyError::UpstreamTimeout),
        });
        assert!(m
            .encode()
            .contains(r#"keygate_upstream_errors_total{kind="timeout"} 1"#));
    }

    fn tokens(m: &Metrics, key: &Arc<str>, model: Option<&str>, prompt: u64, completion: u64) {
        let model: Option<Arc<str>> = model.map(Arc::from);
        m.request_started();
        m.request_finished(Finished {
            key: Some(key),
            method: &Method::POST,
            status: 200,
            duration: Duration::ZERO,
            upstream_ttfb: None,
            bytes_out: 0,
            model: model.as_ref(),
            tokens: Some((prompt, completion)),
            error: None,
        });
    }

    #[test]
    fn tokens_are_counted_by_key_model_and_kind() {
        let m = Metrics::default();
        let key: Arc<str> = Arc::from("app");
        tokens(&m, &key, Some("Qwen/Qwen3-0.6B"), 12, 3);
        tokens(&m, &key, Some("Qwen/Qwen3-0.6B"), 1, 2);
        tokens(&m, &key, None, 4, 0);
        let text = m.encode();
        for line in [
            r#"keygate_tokens_total{key="app",model="Qwen/Qwen3-0.6B",kind="prompt"} 13"#,
            r#"keygate_tokens_total{key="app",model="Qwen/Qwen3-0.6B",kind="completion"} 5"#,
            r#"keygate_tokens_total{key="app",model="-",kind="prompt"} 4"#,
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
    }

    #[test]
    fn model_labels_are_bounded_per_key_and_cannot_forge_samples() {
        let m = Metrics::default();
        let (greedy, other): (Arc<str>, Arc<str>) = (Arc::from("greedy"), Arc::from("other"));
        for i in 0..MODEL_LABELS_PER_KEY + 10 {
            tokens(&m, &greedy, Some(&format!("m{i}")), 1, 1);
        }
        tokens(&m, &other, Some("m0"), 1, 1);
        tokens(&m, &greedy, Some("m0"), 1, 1);
        tokens(&m, &greedy, Some("x\"} 1\nkeygate_forged 1\n"), 1, 1);
        tokens(&m, &greedy, Some("a\\b\"c"), 1, 1);
        let text = m.encode();
        let greedy_series = text
            .lines()
            .filter(|l| {
                l.starts_with(r#"keygate_tokens_total{key="greedy""#) && l.contains("prompt")
            })
            .count();
        assert_eq!(greedy_series, MODEL_LABELS_PER_KEY + 1, "{text}");
        assert!(
            text.contains(r#"keygate_tokens_total{key="greedy",model="(other)",kind="prompt"} 12"#),
            "{text}"
        );
        assert!(
            text.contains(r#"keygate_tokens_total{key="greedy",model="m0",kind="prompt"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"keygate_tokens_total{key="other",model="m0",kind="prompt"} 1"#),
            "{text}"
        );
        assert!(!text.contains("keygate_forged"), "{text}");
        // A backslash and a quote are escaped, as the exposition format wants them.
        let fresh = Metrics::default();
        tokens(&fresh, &greedy, Some("a\\b\"c"), 1, 1);
        assert!(
            fresh
                .encode()
                .contains(r#"model="a\\b\"c",kind="prompt"} 1"#),
            "{}",
            fresh.encode()
        );
    }

    #[test]
    fn limit_backend_series_exist_only_with_redis_and_follow_its_totals() {
        let off = Metrics::default();
        off.limit_backend_sampled(false, 3, 4);
        assert!(!off.encode().contains("limit_"), "{}", off.encode());
        let on = Metrics::default().with_limit_backend();
        on.limit_backend_sampled(false, 3, 4);
        assert!(on.encode().contains("keygate_limit_backend_up 0\n"));
        on.limit_backend_sampled(true, 5, 4);
        on.limit_backend_sampled(true, 2, 1);
        let text = on.encode();
        for line in [
            "keygate_limit_backend_up 1",
            "keygate_limit_backend_errors_total 5",
            "keygate_limit_fallbacks_total 4",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
    }

    #[test]
    fn queue_series_exist_only_with_a_queue() {
        let off = Metrics::default();
        off.queue_sampled(1, []);
        off.queue_waited(Duration::from_millis(5));
        assert!(!off.encode().contains("upstream_queue"), "{}", off.encode());
        let on = Metrics::default().with_queue();
        let (busy, idle): (Arc<str>, Arc<str>) = (Arc::from("busy"), Arc::from("idle"));
        on.queue_sampled(4, [(&busy, 7), (&idle, 0)]);
        on.queue_waited(Duration::from_millis(5));
        let text = on.encode();
        for line in [
            r#"keygate_upstream_queue_depth{key="busy"} 7"#,
            r#"keygate_upstream_queue_depth{key="idle"} 0"#,
            "keygate_upstream_in_flight 4",
            "keygate_upstream_queue_wait_seconds_count 1",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
    }
}
