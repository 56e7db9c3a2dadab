//! One request, start to finish: answer a CORS preflight, refuse TRACE/CONNECT, route,
//! authenticate, admit (the key's expiry, the preset's route table, the key's scope and
//! concurrency limit), wait for a place in flight to the upstream (`max_in_flight`), rewrite,
//! forward. This is the one place where a [`ProxyError`] becomes a response and an access
//! log line.
//!
//! Only keyed requests wait in the upstream queue. The probe and the public paths pass it,
//! so a full queue never makes a load balancer think keygate is down; CORS preflights are
//! answered here and never reach the upstream; and WebSocket upgrades pass it, since a
//! tunnel would hold its place for as long as it is open (hours, with no generation in it
//! most of the time), leaving the upstream's capacity to requests one tunnel at a time. A
//! key's tunnels are bounded by its `max_concurrent`, as its requests are.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, ORIGIN, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::{info, warn};

use crate::config::secrets::SecretSource;
use crate::config::{reload_file_keys, Config, FileKey, KeySpec, WatchedFiles};
use crate::error::ProxyError;
use crate::forward::body::{Body, RequestBody};
use crate::forward::rewrite::{self, Origin, Peer, Rules};
use crate::forward::sse::{self, Sse};
use crate::forward::upgrade;
use crate::forward::upstream::{Lease, Upstream};
use crate::headers::X_REQUEST_ID;
use crate::observe::access::{AccessLog, Outcome};
use crate::observe::metrics::Metrics;
use crate::policy::auth::{self, Credential, KeySet};
use crate::policy::cors::{Cors, Preflight};
use crate::policy::fair::{FairQueue, Permit, Refused};
use crate::policy::route::{Route, Routes};
use crate::policy::scope::{Clock, Expiry, Policy, Slot};
use crate::policy::throttle::FailedAuth;
use crate::preset::Table;

/// Everything a request needs, built once at start-up and shared by all connections.
pub struct Gateway {
    routes: Routes,
    /// Swapped whole by a reload; a request holds the set it started with.
    keys: ArcSwap<KeySet>,
    /// The keys as configured, the source of `keys`: a reload re-reads their file keys.
    specs: Mutex<Vec<KeySpec>>,
    /// Each configured key's policy by name, built once: slots and expiry notices outlive
    /// reloads.
    policies: HashMap<String, Arc<Policy>>,
    /// Keys read from files, re-read by [`Gateway::reload_keys`].
    file_keys: Vec<FileKey>,
    /// The key files, watched for changes; see [`Gateway::key_files_changed`].
    watched: WatchedFiles,
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
    clock: Clock,
}

impl Gateway {
    /// The gateway for `config`; `clock` is where key expiry reads the time.
    pub fn new(config: &Config, clock: Clock) -> Self {
        let a = &config.auth;
        let configured = a.keys.iter().map(|k| (&k.name, &k.policy));
        let absent = a
            .absent_optional
            .iter()
            .map(|(name, policy)| (name, policy));
        let policies: HashMap<String, Arc<Policy>> = configured
            .chain(absent)
            .map(|(name, spec)| (name.clone(), Arc::new(Policy::new(spec.clone()))))
            .collect();
        let gateway = Self {
            routes: Routes::new(config.probe_path.clone(), config.public_paths.clone()),
            keys: ArcSwap::from_pointee(KeySet::new(&a.keys, |name| policy_of(&policies, name))),
            specs: Mutex::new(a.keys.clone()),
            policies,
            file_keys: config.auth.file_keys.clone(),
            watched: WatchedFiles::new(
                config
                    .auth
                    .file_keys
                    .iter()
                    .map(|f| (f.path.clone(), f.stamp.clone()))
                    .collect(),
            ),
            rules: Arc::new(Rules::new(config)),
            upstream: Upstream::new(&config.upstream),
            max_request_body: config.server.max_request_body,
            draining: AtomicBool::new(false),
            upstream_answered: AtomicBool::new(true),
            failed_auth: FailedAuth::default(),
            metrics: Arc::new(match config.upstream.max_in_flight {
                Some(_) => Metrics::default().with_queue(),
                None => Metrics::default(),
            }),
            cors: Cors::new(config.cors_origins.clone()),
            preset: config.upstream.preset.map(Table::new),
            sse_keepalive: config.upstream.sse_keepalive,
            queue: config.upstream.max_in_flight.map(FairQueue::new),
            queue_timeout: config.upstream.queue_timeout,
            clock,
        };
        gateway.publish_expiries();
        gateway
    }

    /// Puts each loaded key's `not_after` in the metrics (at start-up and after a reload,
    /// which may bring in a key that was not set before).
    fn publish_expiries(&self) {
        for (name, policy) in self.keys.load().policies() {
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

    /// Re-reads the key files (SIGHUP). A bad file keeps the keys in force and says why;
    /// requests in flight are not affected either way.
    pub fn reload_keys(&self, secrets: &dyn SecretSource) {
        // What this reload reads counts as seen, so a change is not reloaded twice.
        self.key_files_changed();
        let mut specs = self.specs.lock().unwrap_or_else(PoisonError::into_inner);
        match reload_file_keys(&specs, &self.file_keys, secrets) {
            Ok(fresh) => {
                let keys = KeySet::new(&fresh, |name| policy_of(&self.policies, name));
                let names = keys.names().collect::<Vec<_>>().join(", ");
                info!(keys = %names, "keys reloaded");
                self.keys.store(Arc::new(keys));
                *specs = fresh;
                self.publish_expiries();
                self.metrics.reloaded(true);
            }
            Err(why) => {
                warn!(reason = %why, "key reload failed; the previous keys stay in force");
                self.metrics.reloaded(false);
            }
        }
    }

    /// Whether any key file changed since the last look.
    pub fn key_files_changed(&self) -> bool {
        self.watched.changed()
    }

    /// Logs the failed-authentication summary; `server` calls it every `REPORT_EVERY`.
    pub fn report_failed_auth(&self) {
        self.failed_auth.report();
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The `/metrics` text, with the upstream queue's gauges sampled now: one depth per
    /// key loaded, so a key whose queue is empty reads zero rather than its last value.
    pub fn metrics_text(&self) -> String {
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
            None => self.forward(peer, req, &request_id, &mut log).await,
        };
        let mut response = match forwarded {
            Ok((upstream, lease)) => {
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
                let body = Body::upstream(
                    body,
                    self.upstream.idle_timeout,
                    log,
                    self.rules.clone(),
                    sse,
                    lease,
                );
                Response::from_parts(parts, body)
            }
            Err(e) => {
                log.status = e.status();
                let response = error_response(&e, request_id);
                log.finish(e.body().len() as u64, Outcome::Failed(&e));
                response
            }
        };
        self.cors.decorate(origin.as_ref(), response.headers_mut());
        response
    }

    async fn forward(
        &self,
        peer: &Peer,
        req: Request<Incoming>,
        request_id: &HeaderValue,
        log: &mut AccessLog,
    ) -> Result<(Response<Incoming>, Option<Lease>), ProxyError> {
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
            log.slot = self.admit(key, req.method(), req.uri().path())?;
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
        if let (Some(queue), Some(key), false) = (&self.queue, &key, websocket) {
            log.held_upstream = Some(Box::new(self.wait_for_upstream(queue, key, log).await?));
        }
        let (mut parts, body) = req.into_parts();
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
        let upstream_req = Request::from_parts(
            parts,
            RequestBody::new(body, self.max_request_body, self.metrics.clone()),
        );
        let sent = Instant::now();
        let (mut response, lease) = self.upstream.send(upstream_req).await.inspect_err(|e| {
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
                    return Ok((response, None));
                }
                _ => return Err(ProxyError::UnexpectedUpgrade),
            }
        }
        Ok((response, Some(lease)))
    }

    /// Whether the key may send this request now: the preset lists the route, the key's
    /// scope covers it, and the key has a concurrency slot free (returned, to be held for
    /// as long as the request is).
    fn admit(
        &self,
        key: &auth::KeyId,
        method: &Method,
        path: &str,
    ) -> Result<Option<Slot>, ProxyError> {
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
        key.policy.slot(|| self.metrics.key_in_flight(&key.name))
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
    let mut response = Response::new(Body::fixed(e.body()));
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

/// The policy kept for a configured key's name. Every key a reload can bring in is
/// configured, so the default (no limits) is never used for a real key.
fn policy_of(policies: &HashMap<String, Arc<Policy>>, name: &str) -> Arc<Policy> {
    policies.get(name).cloned().unwrap_or_default()
}
