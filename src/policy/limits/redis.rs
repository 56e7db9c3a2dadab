//! Limits shared by every replica through Redis, on the same request path as the in-process
//! ones: each admission is one round trip, a script (EVALSHA) that checks and takes in one
//! step on Redis's clock (`rate.lua`, `acquire.lua`).
//!
//! Concurrency slots are leases, a sorted set per key of lease ids scored by expiry: a
//! replica that dies without giving its slots back loses them when their lease runs out. One
//! background task per limiter renews every lease this process holds each third of the lease
//! time and sends the releases, in the order they happen, so a release is never overtaken by
//! a renewal that would bring the lease back.
//!
//! All calls share one multiplexed connection. Every call is bounded by `redis_timeout`; one
//! that fails or times out marks Redis down: from then on calls skip it and decide by
//! `on_redis_error` (this process alone, or refuse) until a background probe, backing off,
//! opens a new connection that answers PING. So an outage costs each request nothing and a
//! slow Redis at most `redis_timeout`, and a connection that went silent (a Redis host gone
//! without a reset) is never waited on again.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisResult, Script, TlsCertificates};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

use super::bucket::Admission;
use super::local::{caps, LocalLimiter};
use super::{BackendState, Busy, Decision, KeyLimits, LimitsError, SlotLease, Source, Stats};
use crate::config::limits;
pub(crate) use crate::config::limits::OnError;
use crate::config::secrets::Secret;

/// `Retry-After` of a request refused because Redis did not answer under `"deny"`.
pub(crate) const UNAVAILABLE_RETRY: Duration = Duration::from_secs(1);
/// First wait of the probe after Redis went down; it doubles up to [`PROBE_MAX`].
const PROBE_FIRST: Duration = Duration::from_millis(100);
const PROBE_MAX: Duration = Duration::from_secs(2);
/// Bound of a new connection (TCP, TLS, AUTH, PING), off the request path.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Most releases sent in one round trip.
const RELEASE_BATCH: usize = 512;
/// Fewest seconds between two warnings that Redis went down.
const WARN_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    /// Put before every Redis key keygate writes, so several deployments can share a Redis.
    pub prefix: String,
    /// Longest a request waits for Redis.
    pub timeout: Duration,
    pub on_error: OnError,
    /// How long a concurrency slot outlives a replica that stopped renewing it.
    pub lease: Duration,
    /// For `rediss://` with a private CA: the PEM of the CA that signs Redis's certificate,
    /// trusted instead of the public web roots.
    pub tls_ca_pem: Option<Vec<u8>>,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            prefix: "keygate:".to_owned(),
            timeout: Duration::from_millis(50),
            on_error: OnError::Local,
            lease: Duration::from_secs(30),
            tls_ca_pem: None,
        }
    }
}

/// The limits of every key, shared through Redis, with this process's own as the fallback.
pub(crate) struct RedisLimiter {
    shared: Arc<Shared>,
    leases: mpsc::UnboundedSender<LeaseEvent>,
    /// Where Redis is, for `keygate check`; without credentials.
    addr: String,
}

struct Shared {
    client: Client,
    /// The connection calls use; replaced by the probe after an outage.
    link: ArcSwapOption<Link>,
    /// Whether calls go to Redis; cleared by a failed call, set by the probe.
    up: AtomicBool,
    rate: Script,
    acquire: Script,
    renew: Script,
    options: RedisOptions,
    local: LocalLimiter,
    errors: AtomicU64,
    fallbacks: AtomicU64,
    /// When Redis going down was last logged, and whether the current outage was.
    last_warning: Mutex<Option<Instant>>,
    outage_logged: AtomicBool,
    /// Lease ids are this process's random id and a sequence number.
    replica: u64,
    next_lease: AtomicU64,
}

/// One connection to Redis. A failure counts against it only while it is the current one.
struct Link(MultiplexedConnection);

impl RedisLimiter {
    /// See [`super::Limiter::redis`].
    pub(crate) async fn new(url: &Secret, options: RedisOptions) -> Result<Self, LimitsError> {
        if options.timeout.is_zero() {
            return Err(LimitsError(
                "redis_timeout must be more than 0; the default is 50ms".to_owned(),
            ));
        }
        if options.lease < Duration::from_secs(1) {
            return Err(LimitsError(
                "the slot lease must be at least 1s; the default is 30s".to_owned(),
            ));
        }
        let client = match &options.tls_ca_pem {
            None => Client::open(url.expose()),
            Some(ca) => Client::build_with_tls(
                url.expose(),
                TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                },
            ),
        }
        .map_err(|e| {
            LimitsError(format!(
                "the redis URL or its CA does not work ({e}); write the URL as redis://[user:password@]host[:port][/db], or rediss://… for TLS, and the CA as PEM"
            ))
        })?;
        let addr = limits::address_of(client.get_connection_info());
        let replica = getrandom::u64()
            .map_err(|e| LimitsError(format!("no randomness for lease ids: {e}")))?;
        let shared = Arc::new(Shared {
            client,
            link: ArcSwapOption::empty(),
            up: AtomicBool::new(false),
            rate: Script::new(include_str!("rate.lua")),
            acquire: Script::new(include_str!("acquire.lua")),
            renew: Script::new(include_str!("renew.lua")),
            options,
            local: LocalLimiter::new(),
            errors: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            last_warning: Mutex::new(None),
            outage_logged: AtomicBool::new(false),
            replica,
            next_lease: AtomicU64::new(0),
        });
        match shared.open().await {
            Ok(link) => {
                shared.link.store(Some(link));
                shared.up.store(true, Ordering::Release);
            }
            Err(e) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                shared.outage(&e);
            }
        }
        let (leases, events) = mpsc::unbounded_channel();
        tokio::spawn(keep_leases(Arc::clone(&shared), events));
        Ok(Self {
            shared,
            leases,
            addr,
        })
    }

    pub(super) fn local(&self) -> &LocalLimiter {
        &self.shared.local
    }

    pub(crate) async fn check(&self, key: &str, limits: &KeyLimits) -> Decision {
        if limits.is_unlimited() {
            return Decision::unlimited(Source::Shared);
        }
        let s = &self.shared;
        if let Some(link) = s.link() {
            let (rpm, tpm) = caps(limits);
            let mut conn = link.0.clone();
            let mut call = s.rate.key(s.key("rpm:", key));
            call.key(s.key("tpm:", key))
                .arg("admit")
                .arg(rpm)
                .arg(tpm)
                .arg(0);
            let reply = s
                .bounded(
                    &link,
                    s.options.timeout,
                    call.invoke_async::<[u64; 6]>(&mut conn),
                )
                .await;
            if let Some([allowed, retry, rr, rs, tr, ts]) = reply {
                let admission = Admission {
                    allowed: allowed == 1,
                    retry,
                    requests_remaining: rr,
                    requests_reset: rs,
                    tokens_remaining: tr,
                    tokens_reset: ts,
                };
                if admission.allowed {
                    s.local.record_request(key, limits);
                }
                return Decision::from_admission(&admission, limits, Source::Shared);
            }
        }
        s.fallbacks.fetch_add(1, Ordering::Relaxed);
        match s.options.on_error {
            OnError::Local => s.local.decide(key, limits, Source::Fallback),
            OnError::Deny => Decision::unavailable(UNAVAILABLE_RETRY),
        }
    }

    /// Charges `tokens` in Redis and, for the time this process may decide alone, here.
    pub(crate) async fn debit_tokens(&self, key: &str, limits: &KeyLimits, tokens: u64) {
        let Some(tpm) = limits.tokens_per_minute else {
            return;
        };
        if tokens == 0 {
            return;
        }
        let s = &self.shared;
        s.local.debit_tokens(key, limits, tokens);
        let Some(link) = s.link() else {
            s.fallbacks.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut conn = link.0.clone();
        let mut call = s.rate.key(s.key("rpm:", key));
        call.key(s.key("tpm:", key))
            .arg("debit")
            .arg(0)
            .arg(tpm.get())
            .arg(tokens);
        let reply = s
            .bounded(
                &link,
                s.options.timeout,
                call.invoke_async::<u64>(&mut conn),
            )
            .await;
        if reply.is_none() {
            s.fallbacks.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) async fn acquire_slot(&self, key: &str, max: usize) -> Result<SlotLease, Busy> {
        let s = &self.shared;
        if let Some(link) = s.link() {
            let lease = Arc::new(LeaseId {
                key: s.key("slots:", key),
                id: format!(
                    "{:016x}-{}",
                    s.replica,
                    s.next_lease.fetch_add(1, Ordering::Relaxed)
                ),
            });
            // Dropped on a failure or timeout, or if this future is: it then releases a
            // lease Redis may still have granted.
            let mut shared = SharedLease {
                lease: Some(Arc::clone(&lease)),
                events: self.leases.clone(),
            };
            let mut conn = link.0.clone();
            let mut call = s.acquire.key(&lease.key);
            call.arg(max).arg(millis(s.options.lease)).arg(&lease.id);
            let reply = s
                .bounded(
                    &link,
                    s.options.timeout,
                    call.invoke_async::<(u64, u64)>(&mut conn),
                )
                .await;
            match reply {
                Some((1, _)) => {
                    // Cannot fail while `self` holds the receiving task's sender alive.
                    let _ = self.leases.send(LeaseEvent::Hold(lease));
                    return Ok(SlotLease {
                        _local: s.local.count_slot(key),
                        _shared: Some(shared),
                        source: Source::Shared,
                    });
                }
                Some(_) => {
                    shared.lease = None;
                    return Err(Busy::Full);
                }
                None => {}
            }
        }
        s.fallbacks.fetch_add(1, Ordering::Relaxed);
        match s.options.on_error {
            OnError::Local => s
                .local
                .slot(key, max)
                .map(|slot| SlotLease::local(slot, Source::Fallback))
                .ok_or(Busy::Full),
            OnError::Deny => Err(Busy::Unavailable {
                retry_after: UNAVAILABLE_RETRY,
            }),
        }
    }

    pub(crate) fn stats(&self) -> Stats {
        let s = &self.shared;
        Stats {
            state: if s.up.load(Ordering::Acquire) {
                BackendState::Up
            } else {
                BackendState::Down
            },
            errors: s.errors.load(Ordering::Relaxed),
            fallbacks: s.fallbacks.load(Ordering::Relaxed),
        }
    }
}

impl fmt::Display for RedisLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.shared.options;
        limits::write_backend(f, &self.addr, &o.prefix, o.timeout, o.lease, o.on_error)
    }
}

impl Shared {
    fn key(&self, kind: &str, name: &str) -> String {
        let mut key = String::with_capacity(self.options.prefix.len() + kind.len() + name.len());
        key.push_str(&self.options.prefix);
        key.push_str(kind);
        key.push_str(name);
        key
    }

    /// The connection to call Redis on; `None` while it is down.
    fn link(&self) -> Option<Arc<Link>> {
        if self.up.load(Ordering::Acquire) {
            self.link.load_full()
        } else {
            None
        }
    }

    /// `call` on `link` within `bound`; `None` when it failed or took longer, after marking
    /// Redis down.
    async fn bounded<T>(
        self: &Arc<Self>,
        link: &Arc<Link>,
        bound: Duration,
        call: impl std::future::Future<Output = RedisResult<T>>,
    ) -> Option<T> {
        match tokio::time::timeout(bound, call).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.failed(link, &e);
                None
            }
            Err(_) => {
                let bound = humantime::format_duration(bound);
                self.failed(link, &format_args!("no answer within {bound}"));
                None
            }
        }
    }

    /// Counts a failed call; the first failure on the current connection starts an outage.
    fn failed(self: &Arc<Self>, link: &Arc<Link>, error: &dyn fmt::Display) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let current = self.link.load();
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, link))
            && self.up.swap(false, Ordering::AcqRel)
        {
            self.outage(error);
        }
    }

    /// Logs an outage, at most once per [`WARN_EVERY`], and starts the probe.
    fn outage(self: &Arc<Self>, error: &dyn fmt::Display) {
        let now = Instant::now();
        let due = {
            let mut last = self
                .last_warning
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let due = last.is_none_or(|t| now.duration_since(t) >= WARN_EVERY);
            if due {
                *last = Some(now);
            }
            due
        };
        self.outage_logged.store(due, Ordering::Relaxed);
        if due {
            warn!(
                error = %error,
                on_redis_error = self.options.on_error.as_str(),
                errors = self.errors.load(Ordering::Relaxed),
                "limits backend unreachable; deciding without it until it answers again"
            );
        }
        tokio::spawn(probe(Arc::downgrade(self)));
    }

    /// A new connection that has answered PING, within [`CONNECT_TIMEOUT`].
    async fn open(&self) -> Result<Arc<Link>, String> {
        let connect = async {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(None)
                .set_response_timeout(None);
            let mut conn = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            redis::cmd("PING").query_async::<()>(&mut conn).await?;
            Ok::<_, redis::RedisError>(conn)
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(conn)) => Ok(Arc::new(Link(conn))),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no connection answering PING within {}",
                humantime::format_duration(CONNECT_TIMEOUT)
            )),
        }
    }
}

/// Opens connections, backing off, until one answers; then calls go to Redis again.
async fn probe(shared: Weak<Shared>) {
    let mut delay = PROBE_FIRST;
    loop {
        tokio::time::sleep(delay).await;
        let Some(s) = shared.upgrade() else {
            return;
        };
        match s.open().await {
            Ok(link) => {
                s.link.store(Some(link));
                s.up.store(true, Ordering::Release);
                if s.outage_logged.load(Ordering::Relaxed) {
                    info!(
                        errors = s.errors.load(Ordering::Relaxed),
                        fallbacks = s.fallbacks.load(Ordering::Relaxed),
                        "limits backend reachable again"
                    );
                }
                return;
            }
            Err(_) => {
                s.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        delay = (delay * 2).min(PROBE_MAX);
    }
}

/// A lease in Redis: the sorted set of its key and its id in it.
#[derive(Debug)]
struct LeaseId {
    key: String,
    id: String,
}

#[derive(Debug)]
enum LeaseEvent {
    Hold(Arc<LeaseId>),
    Release(Arc<LeaseId>),
}

/// A slot held in Redis; released when dropped.
#[derive(Debug)]
pub(super) struct SharedLease {
    lease: Option<Arc<LeaseId>>,
    events: mpsc::UnboundedSender<LeaseEvent>,
}

impl Drop for SharedLease {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            // The task is gone only when the runtime is: the lease then expires.
            let _ = self.events.send(LeaseEvent::Release(lease));
        }
    }
}

/// Renews every lease this process holds each third of the lease time, and sends releases
/// as they come, in batches. Ends when the limiter and every lease are gone.
async fn keep_leases(shared: Arc<Shared>, mut events: mpsc::UnboundedReceiver<LeaseEvent>) {
    let period = shared.options.lease / 3;
    let mut held: HashMap<String, Arc<LeaseId>> = HashMap::new();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else {
                    return;
                };
                let mut released = Vec::new();
                apply(event, &mut held, &mut released);
                while released.len() < RELEASE_BATCH {
                    match events.try_recv() {
                        Ok(event) => apply(event, &mut held, &mut released),
                        Err(_) => break,
                    }
                }
                let link = shared.link();
                if let (Some(link), false) = (link, released.is_empty()) {
                    let mut pipe = redis::pipe();
                    for lease in &released {
                        pipe.zrem(&lease.key, &lease.id).ignore();
                    }
                    let mut conn = link.0.clone();
                    shared.bounded(&link, period, pipe.query_async::<()>(&mut conn)).await;
                }
            }
            _ = tick.tick() => {
                let link = shared.link();
                if let (Some(link), false) = (link, held.is_empty()) {
                    let mut call = shared.renew.prepare_invoke();
                    call.arg(millis(shared.options.lease));
                    for lease in held.values() {
                        call.key(&lease.key).arg(&lease.id);
                    }
                    let mut conn = link.0.clone();
                    shared.bounded(&link, period, call.invoke_async::<u64>(&mut conn)).await;
                }
            }
        }
    }
}

fn apply(
    event: LeaseEvent,
    held: &mut HashMap<String, Arc<LeaseId>>,
    released: &mut Vec<Arc<LeaseId>>,
) {
    match event {
        LeaseEvent::Hold(lease) => {
            held.insert(lease.id.clone(), lease);
        }
        LeaseEvent::Release(lease) => {
            held.remove(&lease.id);
            released.push(lease);
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
