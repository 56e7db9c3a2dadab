//! One request, start to finish: answer a CORS preflight, refuse TRACE/CONNECT, route,
//! authenticate, admit (the key's expiry, the preset's route table, the key's scope, then its
//! concurrency slot and rates), wait for a place in flight to the upstream
//! (`max_in_flight`), rewrite, forward. This is the one place where a [`ProxyError`] becomes
//! a response and an access log line, and where a rate-limited key's `x-ratelimit-*` headers
//! are put on its response.
//!
//! A key's `models` and the token usage of keyed requests are read on the way (`inspect`):
//! the body before the request waits in the queue, so a refused model never takes a place.
//!
//! Only keyed requests wait in the upstream queue. The probe and the public paths pass it,
//! so a full queue never makes a load balancer think keygate is down; CORS preflights are
//! answered here and never reach the upstream; and WebSocket upgrades pass it, since a
//! tunnel would hold its place for as long as it is open (hours, with no generation in it
//! most of the time), leaving the upstream's capacity to requests one tunnel at a time. A
//! key's tunnels are bounded by its `max_concurrent`, as its requests are.

mod inspect;

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, ORIGIN, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body as _;
use hyper::body::Incoming;
use tracing::{info, warn};

use crate::config::secrets::SecretSource;
use crate::config::Config;
use crate::error::ProxyError;
use crate::forward::body::Body;
use crate::forward::rewrite::{self, Origin, Peer, Rules};
use crate::forward::sse::{self, Sse};
use crate::forward::upgrade;
use crate::forward::upstream::{Lease, Upstream};
use crate::headers::X_REQUEST_ID;
use crate::observe::access::{AccessLog, Outcome};
use crate::observe::metrics::Metrics;
use crate::policy::admission::{Admission, RateHeaders};
use crate::policy::auth::{self, Credential, KeySet};
use crate::policy::cors::{Cors, Preflight};
use crate::policy::fair::{FairQueue, Permit, Refused};
use crate::policy::keyring::Keyring;
use crate::policy::route::{Route, Routes};
use crate::policy::scope::{Clock, Expiry};
use crate::policy::throttle::FailedAuth;
use crate::preset::Table;

/// Everything a request needs, built once at start-up and shared by all connections.
pub struct Gateway {
    routes: Routes,
    /// The keys in force, from the config and the registry; see [`Gateway::reload_keys`].
    keys: Keyring,
    rules: Arc<Rules>,
    upstream: Upstream,
    max_request_body: u64,
    draining: AtomicBool,
    /// Whether the upstream answered the last request sent to it; `/readyz` reports it.
    upstream_answered: AtomicBool,
    failed_auth: FailedAuth,
    metrics: Arc<Metrics>,
    cors: Cors,
    /// The server preset's route table, if `[upstream] preset` names one.
    preset: Option<Table>,
    sse_keepalive: Option<Duration>,
    /// The fair queue in front of the upstream, with `[upstream] max_in_flight`.
    queue: Option<FairQueue>,
    queue_timeout: Duration,
    /// Each key's concurrency slots and rates, in process or shared through Redis.
    admission: Admission,
    clock: Clock,
}

impl Gateway {
    /// The gateway for `config`; `clock` is where key expiry reads the time, `admission`
    /// keeps the keys' slots and rates (see [`Admission::start`]).
    pub fn new(config: &Config, clock: Clock, admission: Admission) -> Self {
        let gateway = Self {
            routes: Routes::new(config.probe_path.clone(), config.public_paths.clone()),
            keys: Keyring::new(&config.auth),
            rules: Arc::new(Rules::new(config)),
            upstream: Upstream::new(&config.upstream),
            max_request_body: config.server.max_request_body,
            draining: AtomicBool::new(false),
            upstream_answered: AtomicBool::new(true),
            failed_auth: FailedAuth::default(),
            metrics: Arc::new({
                let metrics = match config.upstream.max_in_flight {
                    Some(_) => Metrics::default().with_queue(),
                    None => Metrics::default(),
                };
                match config.limits.redis {
                    Some(_) => metrics.with_limit_backend(),
                    None => metrics,
                }
            }),
            cors: Cors::new(config.cors_origins.clone()),
            preset: config.upstream.preset.map(Table::new),
            sse_keepalive: config.upstream.sse_keepalive,
            queue: config.upstream.max_in_flight.map(FairQueue::new),
            queue_timeout: config.upstream.queue_timeout,
            admission,
            clock,
        };
        gateway.publish_expiries(&KeySet::default());
        gateway
    }

    /// Puts each loaded key's `not_after` in the metrics, and takes out those of the keys
    /// `before` that no longer have one (at start-up, and after a reload, which may add a
    /// key, remove one or change its `not_after`).
    fn publish_expiries(&self, before: &KeySet) {
        let keys = self.keys.load();
        for (name, policy) in before.policies() {
            let still = keys
                .policies()
                .any(|(now, p)| now == name && p.not_after.is_some());
            if policy.not_after.is_some() && !still {
                self.metrics.forget_key_not_after(name);
            }
        }
        for (name, policy) in keys.policies() {
            if let Some(not_after) = policy.not_after {
                self.metrics.key_not_after(name, not_after);
            }
        }
    }

    /// Logs each key's coming expiry once when it is [`EXPIRY_WARNING`] away, and once more
    /// when it has passed; `server` calls it at start-up and every few seconds.
    ///
    /// [`EXPIRY_WARNING`]: crate::policy::scope::EXPIRY_WARNING
    pub fn warn_of_expiring_keys(&self) {
        let now = self.clock.now();
        for (name, policy) in self.keys.load().policies() {
            let Some(notice) = policy.expiry_notice(now) else {
                continue;
            };
            let not_after = policy
                .not_after
                .map(humantime::format_rfc3339_seconds)
                .map(|t| t.to_string())
                .unwrap_or_default();
            match notice {
                Expiry::Soon(left) => warn!(
                    key = %name,
                    not_after = %not_after,
                    hours_left = left.as_secs() / 3600,
                    "API key expires soon; issue its successor"
                ),
                Expiry::Expired => warn!(
                    key = %name,
                    not_after = %not_after,
                    "API key expired; it is refused as invalid from now on"
                ),
            }
        }
    }

    /// Re-reads the key files and the key registry (SIGHUP, or one of them changed). A bad
    /// file keeps the keys in force and says why; requests in flight are not affected
    /// either way.
    pub fn reload_keys(&self, secrets: &dyn SecretSource) {
        let before = self.keys.load_full();
        match self.keys.reload(secrets) {
            Ok(keys) => {
                let names = keys.names().collect::<Vec<_>>().join(", ");
                info!(keys = %names, "keys reloaded");
                self.publish_expiries(&before);
                self.metrics.reloaded(true);
            }
            Err(why) => {
                warn!(reason = %why, "key reload failed; the previous keys stay in force");
                self.metrics.reloaded(false);
            }
        }
    }

    /// Whether a key file or the key registry changed since the last look.
    pub fn key_files_changed(&self) -> bool {
        self.keys.changed()
    }

    /// Logs the failed-authentication summary; `server` calls it every `REPORT_EVERY`.
    pub fn report_failed_auth(&self) {
        self.failed_auth.report();
    }

    /// Forgets the in-process rate state of keys whose buckets are full again.
    pub fn prune_limits(&self) {
        self.admission.prune();
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The `/metrics` text, with the upstream queue's gauges sampled now: one depth per
    /// key loaded, so a key whose queue is empty reads zero rather than its last value.
    pub fn metrics_text(&self) -> String {
        self.admission.sample(&self.metrics);
        if let Some(queue) = &self.queue {
            let snapshot = queue.snapshot();
            let keys = self.keys.load();
            self.metrics.queue_sampled(
                snapshot.in_flight,
                keys.policies().map(|(name, _)| {
                    let waiting = snapshot
                        .queued
                        .iter()
                        .find(|(queued, _)| queued == name)
                        .map_or(0, |(_, n)| *n);
                    (name, waiting)
                }),
            );
        }
        self.metrics.encode()
    }

    /// Ready: not draining, and the upstream reachable. The last proxied exchange says so;
    /// after a failure the upstream is asked directly (a TCP connect within
    /// `connect_timeout`), so readiness recovers even when no traffic arrives to prove it.
    pub async fn ready(&self) -> bool {
        if self.draining.load(Ordering::Relaxed) {
            return false;
        }
        if !self.upstream_answered.load(Ordering::Relaxed) {
            let reachable = self.upstream.reachable().await;
            self.upstream_answered.store(reachable, Ordering::Relaxed);
        }
        self.upstream_answered.load(Ordering::Relaxed)
    }

    /// Whether the request is the probe: GET or HEAD on the exact probe path.
    pub fn is_probe<B>(&self, req: &Request<B>) -> bool {
        self.routes.classify(req.method(), req.uri()) == Route::Probe
    }

    /// From now on the probe answers 503, so load balancers stop sending traffic, and the
    /// requests waiting in the upstream queue are answered 503 at once: they would otherwise
    /// wait into the shutdown grace, to be cut off when it ends. Requests in flight keep
    /// their places and finish.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        if let Some(queue) = &self.queue {
            queue.drain();
        }
    }

    pub async fn handle(&self, peer: &Peer, req: Request<Incoming>) -> Response<Body> {
        let request_id = rewrite::request_id(req.headers());
        let mut log = AccessLog::new(
            &req,
            &peer.ip,
            Instant::now(),
            request_id.clone(),
            self.metrics.clone(),
        );
        let origin = req.headers().get(ORIGIN).cloned();
        let mut rates = None;
        let forwarded = match self.cors.preflight(&req) {
            Some(Preflight::Allowed(headers)) => {
                let mut response = Response::new(Body::fixed(""));
                *response.status_mut() = StatusCode::NO_CONTENT;
                *response.headers_mut() = headers;
                response.headers_mut().insert(X_REQUEST_ID, request_id);
                log.status = StatusCode::NO_CONTENT;
                log.finish(0, Outcome::Complete);
                return response;
            }
            Some(Preflight::Refused) => Err(ProxyError::OriginNotAllowed),
            None => {
                self.forward(peer, req, &request_id, &mut log, &mut rates)
                    .await
            }
        };
        let mut response = match forwarded {
            Ok((upstream, lease, inspection)) => {
                let (mut parts, body) = upstream.into_parts();
                self.rules.response(&mut parts.headers, &request_id);
                if parts.status == StatusCode::SWITCHING_PROTOCOLS {
                    upgrade::restore_headers(&mut parts.headers);
                }
                log.status = parts.status;
                let sse = sse::is_event_stream(&parts.headers).then(|| {
                    // keygate may add to an event stream (comments, the error event), so the
                    // upstream's length no longer holds: HTTP/1.1 sends it chunked.
                    parts.headers.remove(CONTENT_LENGTH);
                    let counters = self.metrics.sse_counters(log.key.as_ref());
                    Sse::new(self.sse_keepalive, counters)
                });
                let filter = inspection.and_then(|i| i.response(&mut parts.headers));
                let body = Body::upstream(
                    body,
                    self.upstream.idle_timeout,
                    log,
                    self.rules.clone(),
                    sse,
                    lease,
                    filter,
                );
                Response::from_parts(parts, body)
            }
            Err(e) => {
                log.status = e.status();
                let response = error_response(&e, request_id);
                let sent = response.body().size_hint().exact().unwrap_or(0);
                log.finish(sent, Outcome::Failed(&e));
                response
            }
        };
        if let Some(rates) = rates {
            rates.apply(response.headers_mut());
        }
        self.cors.decorate(origin.as_ref(), response.headers_mut());
        response
    }

    async fn forward(
        &self,
        peer: &Peer,
        req: Request<Incoming>,
        request_id: &HeaderValue,
        log: &mut AccessLog,
        rates: &mut Option<RateHeaders>,
    ) -> Result<
        (
            Response<Incoming>,
            Option<Lease>,
            Option<inspect::Inspection>,
        ),
        ProxyError,
    > {
        if req.method() == Method::TRACE || req.method() == Method::CONNECT {
            return Err(ProxyError::MethodNotAllowed);
        }
        // RFC 9112 §3.2: two Host lines are refused, so nothing in front of keygate can read
        // one host while keygate reads the other.
        if req.headers().get_all(HOST).iter().nth(1).is_some() {
            return Err(ProxyError::BadRequest);
        }
        let route = self.routes.classify(req.method(), req.uri());
        if peer.over_capacity && route != Route::Probe {
            return Err(ProxyError::OverCapacity);
        }
        let key = match route {
            Route::Probe if self.draining.load(Ordering::Relaxed) => {
                return Err(ProxyError::Draining)
            }
            Route::Probe | Route::Public => None,
            Route::Protected => match self.authenticate(&req).and_then(|key| {
                log.key = Some(key.name.clone());
                if key.policy.expired(self.clock.now()) {
                    return Err(ProxyError::KeyExpired);
                }
                Ok(key)
            }) {
                Ok(key) => Some(key),
                Err(e) => {
                    let client = self.rules.client_ip(peer, req.headers());
                    if let Some(hold) = self.failed_auth.record(client, &e) {
                        tokio::time::sleep(hold).await;
                    }
                    return Err(e);
                }
            },
        };
        if let Some(key) = &key {
            self.in_scope(key, req.method(), req.uri().path())?;
            self.admission.admit(key, &self.metrics, log, rates).await?;
        }
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max_request_body) {
            return Err(ProxyError::BodyTooLarge);
        }
        let uri = self.upstream.uri(req.uri())?;
        // Only a request with a valid key may upgrade; any other loses its upgrade headers
        // with the hop-by-hop ones.
        let websocket = key.is_some() && upgrade::wants_websocket(&req);
        let (mut parts, body) = req.into_parts();
        let limits = inspect::Limits {
            max_request_body: self.max_request_body,
            timeout: self.upstream.response_timeout,
            metrics: &self.metrics,
        };
        let (key_ref, preset) = (key.as_ref(), self.preset.as_ref());
        let (body, inspection) =
            inspect::read(key_ref, preset, websocket, &mut parts, body, log, &limits).await?;
        if let (Some(queue), Some(key), false) = (&self.queue, &key, websocket) {
            log.held_upstream = Some(Box::new(self.wait_for_upstream(queue, key, log).await?));
        }
        let host = parts.headers.remove(HOST).or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        self.rules.request(
            &mut parts.headers,
            Origin {
                peer,
                host: host.as_ref(),
                key: key.as_ref(),
                request_id,
            },
        );
        if websocket {
            upgrade::restore_headers(&mut parts.headers);
        }
        parts.uri = uri;
        let upstream_req = Request::from_parts(parts, body);
        let sent = Instant::now();
        let exchanged = self.upstream.send(upstream_req).await;
        inspect::note(inspection.as_ref(), log);
        let (mut response, lease) = exchanged.inspect_err(|e| {
            let answered = !e.upstream_unanswered();
            self.upstream_answered.store(answered, Ordering::Relaxed);
        })?;
        log.upstream_ttfb = Some(sent.elapsed());
        self.upstream_answered.store(true, Ordering::Relaxed);
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            match websocket {
                true if upgrade::upgrade_is_websocket(response.headers()) => {
                    let upstream = hyper::upgrade::on(&mut response);
                    let idle = self.upstream.idle_timeout;
                    // The key's concurrency slot stays taken for as long as the tunnel is open.
                    let slot = log.slot.take();
                    peer.tunnel.put(upgrade::tunnel(upstream, idle, slot));
                    lease.into_tunnel();
                    return Ok((response, None, None));
                }
                _ => return Err(ProxyError::UnexpectedUpgrade),
            }
        }
        let inspection = match inspection {
            Some(i) => Some(
                i.answered(&mut response, self.upstream.idle_timeout)
                    .await?,
            ),
            None => None,
        };
        Ok((response, Some(lease), inspection))
    }

    /// Whether the key may send this request: the preset lists the route and the key's
    /// scope covers it.
    fn in_scope(&self, key: &auth::KeyId, method: &Method, path: &str) -> Result<(), ProxyError> {
        let class = match &self.preset {
            Some(table) => Some(
                table
                    .class(method, path)
                    .ok_or(ProxyError::RouteNotInPreset)?,
            ),
            None => None,
        };
        if !key.policy.permits(method, path, class) {
            return Err(ProxyError::OutOfScope);
        }
        Ok(())
    }

    /// A place in flight to the upstream for the key's request, held in `log` for as long
    /// as the request is. A client that hangs up meanwhile drops this future, which takes
    /// the request out of its queue.
    async fn wait_for_upstream(
        &self,
        queue: &FairQueue,
        key: &auth::KeyId,
        log: &mut AccessLog,
    ) -> Result<Permit, ProxyError> {
        let admitted = queue
            .admit(&key.name, key.policy.weight, self.queue_timeout)
            .await;
        let waited = match &admitted {
            Ok(permit) => permit.waited(),
            Err(refused) => refused.waited(),
        };
        log.queue_wait = Some(waited);
        self.metrics.queue_waited(waited);
        admitted.map_err(|refused| match refused {
            Refused::Timeout { .. } => ProxyError::QueueTimeout,
            Refused::Draining { .. } => ProxyError::Draining,
        })
    }

    /// The matched key, or why the request is refused.
    fn authenticate<B>(&self, req: &Request<B>) -> Result<auth::KeyId, ProxyError> {
        match auth::credential(req.headers()) {
            Credential::Missing => Err(ProxyError::MissingCredentials),
            Credential::Malformed => Err(ProxyError::MalformedCredentials),
            Credential::Token(token) => self
                .keys
                .load()
                .verify(token)
                .ok_or(ProxyError::InvalidCredentials),
        }
    }
}

pub(crate) fn error_response(e: &ProxyError, request_id: HeaderValue) -> Response<Body> {
    let body = match e.body() {
        Cow::Borrowed(text) => Bytes::from_static(text.as_bytes()),
        Cow::Owned(text) => Bytes::from(text),
    };
    let mut response = Response::new(Body::fixed(body));
    *response.status_mut() = e.status();
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(X_REQUEST_ID, request_id);
    if let Some(challenge) = e.challenge() {
        headers.insert(WWW_AUTHENTICATE, challenge);
    }
    if let Some(after) = e.retry_after() {
        headers.insert(RETRY_AFTER, after);
    }
    response
}
