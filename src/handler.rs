//! One request, start to finish: answer a CORS preflight, refuse TRACE/CONNECT, route,
//! authenticate, rewrite, forward. This is the one place where a [`ProxyError`] becomes a
//! response and an access log line.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use arc_swap::ArcSwap;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, ORIGIN, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::{info, warn};

use crate::access::{AccessLog, Outcome};
use crate::auth::{self, Credential, KeySet};
use crate::body::{Body, RequestBody};
use crate::config::{reload_file_keys, Config, FileKey, FileStamp};
use crate::cors::{Cors, Preflight};
use crate::error::ProxyError;
use crate::headers::X_REQUEST_ID;
use crate::metrics::Metrics;
use crate::proxy::Upstream;
use crate::rewrite::{self, Origin, Peer, Rules};
use crate::route::{Route, Routes};
use crate::secrets::SecretSource;
use crate::throttle::FailedAuth;

/// Everything a request needs, built once at start-up and shared by all connections.
pub struct Gateway {
    routes: Routes,
    /// Swapped whole by a reload; a request holds the set it started with.
    keys: ArcSwap<KeySet>,
    /// Keys read from files, re-read by [`Gateway::reload_keys`].
    file_keys: Vec<FileKey>,
    /// What the key files looked like at the last look; see [`Gateway::key_files_changed`].
    file_stamps: Mutex<Vec<Option<FileStamp>>>,
    rules: Arc<Rules>,
    upstream: Upstream,
    max_request_body: u64,
    draining: AtomicBool,
    /// Whether the upstream answered the last request sent to it; `/readyz` reports it.
    upstream_answered: AtomicBool,
    failed_auth: FailedAuth,
    metrics: Arc<Metrics>,
    cors: Cors,
}

impl Gateway {
    pub fn new(config: &Config) -> Self {
        Self {
            routes: Routes::new(config.probe_path.clone(), config.public_paths.clone()),
            keys: ArcSwap::from_pointee(config.auth.keys.clone()),
            file_keys: config.auth.file_keys.clone(),
            file_stamps: Mutex::new(
                config
                    .auth
                    .file_keys
                    .iter()
                    .map(|f| f.stamp.clone())
                    .collect(),
            ),
            rules: Arc::new(Rules::new(config)),
            upstream: Upstream::new(&config.upstream),
            max_request_body: config.server.max_request_body,
            draining: AtomicBool::new(false),
            upstream_answered: AtomicBool::new(true),
            failed_auth: FailedAuth::default(),
            metrics: Arc::new(Metrics::default()),
            cors: Cors::new(config.cors_origins.clone()),
        }
    }

    /// Re-reads the key files (SIGHUP). A bad file keeps the keys in force and says why;
    /// requests in flight are not affected either way.
    pub fn reload_keys(&self, secrets: &dyn SecretSource) {
        // What this reload reads counts as seen, so a change is not reloaded twice.
        self.key_files_changed();
        let current = self.keys.load();
        match reload_file_keys(&current, &self.file_keys, secrets) {
            Ok(keys) => {
                let names = keys.names().collect::<Vec<_>>().join(", ");
                info!(keys = %names, "keys reloaded");
                self.keys.store(Arc::new(keys));
                self.metrics.reloaded(true);
            }
            Err(why) => {
                warn!(reason = %why, "key reload failed; the previous keys stay in force");
                self.metrics.reloaded(false);
            }
        }
    }

    /// Whether any key file changed since the last look: a new inode (Kubernetes swaps the
    /// symlink of a mounted Secret), modification time or length. Cheap: one `stat` per file.
    pub fn key_files_changed(&self) -> bool {
        if self.file_keys.is_empty() {
            return false;
        }
        let now = stamps(&self.file_keys);
        let mut last = self
            .file_stamps
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let changed = *last != now;
        *last = now;
        changed
    }

    /// Logs the failed-authentication summary; `server` calls it every `REPORT_EVERY`.
    pub fn report_failed_auth(&self) {
        self.failed_auth.report();
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
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

    /// From now on the probe answers 503, so load balancers stop sending traffic.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub async fn handle(&self, peer: &Peer, req: Request<Incoming>) -> Response<Body> {
        let request_id = rewrite::request_id(req.headers());
        let mut log = AccessLog::new(
            &req,
            peer,
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
            Ok(upstream) => {
                let (mut parts, body) = upstream.into_parts();
                self.rules.response(&mut parts.headers, &request_id);
                log.status = parts.status;
                let body =
                    Body::upstream(body, self.upstream.idle_timeout, log, self.rules.clone());
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
    ) -> Result<Response<Incoming>, ProxyError> {
        if req.method() == Method::TRACE || req.method() == Method::CONNECT {
            return Err(ProxyError::MethodNotAllowed);
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
            Route::Protected => match self.authenticate(&req) {
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
        log.key = key.as_ref().map(|id| id.name.clone());
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max_request_body) {
            return Err(ProxyError::BodyTooLarge);
        }
        let uri = self.upstream.uri(req.uri())?;
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
        parts.uri = uri;
        let upstream_req = Request::from_parts(
            parts,
            RequestBody::new(body, self.max_request_body, self.metrics.clone()),
        );
        let sent = Instant::now();
        let response = self.upstream.send(upstream_req).await;
        match &response {
            Ok(_) => {
                log.upstream_ttfb = Some(sent.elapsed());
                self.upstream_answered.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                let answered = !e.upstream_unanswered();
                self.upstream_answered.store(answered, Ordering::Relaxed);
            }
        }
        response
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

fn stamps(files: &[FileKey]) -> Vec<Option<FileStamp>> {
    files.iter().map(|f| FileStamp::of(&f.path)).collect()
}

fn error_response(e: &ProxyError, request_id: HeaderValue) -> Response<Body> {
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
