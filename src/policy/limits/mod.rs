//! Per-key rates and concurrency, checked right after a key's scope and before the request
//! is forwarded: `requests_per_minute`, `tokens_per_minute` and `max_concurrent`.
//!
//! A [`Limiter`] keeps them in this process ([`local`]) or shares them between replicas
//! through Redis ([`redis`]); the gateway sees the same calls either way:
//!
//! - [`Limiter::check`] before forwarding takes one request from the key's request bucket
//!   if, and only if, the request bucket and the token budget both admit it, in one step,
//!   and returns the numbers for the `x-ratelimit-*` headers;
//! - [`Limiter::debit_tokens`] when the response ends charges the tokens it really used,
//!   which may leave the budget below zero: the key then waits until it is paid back;
//! - [`Limiter::acquire_slot`] holds one of the key's concurrency slots until the returned
//!   [`SlotLease`] is dropped.
//!
//! State belongs to the key's name, so a reload that changes a key's limits keeps what the
//! key has used. Both backends run the arithmetic of `bucket`; the Redis scripts repeat
//! it line by line, and a test holds the two to the same answers.

mod bucket;
pub(crate) mod local;
pub(crate) mod redis;

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use crate::config::secrets::Secret;

pub(crate) use self::local::LocalLimiter;
pub(crate) use self::redis::{RedisLimiter, RedisOptions};
pub(crate) use crate::config::key_policy::KeyLimits;

/// What [`Limiter::check`] decided, with the numbers for the response headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// The request bucket after this decision; `None` without `requests_per_minute` or when
    /// the shared backend could not be asked.
    pub requests: Option<Headroom>,
    /// The token budget after this decision; `None` as for `requests`.
    pub tokens: Option<Headroom>,
    /// Where the decision was taken.
    pub source: Source,
}

impl Decision {
    fn unlimited(source: Source) -> Self {
        Self {
            verdict: Verdict::Allowed,
            requests: None,
            tokens: None,
            source,
        }
    }

    fn unavailable(retry_after: Duration) -> Self {
        Self {
            verdict: Verdict::Unavailable { retry_after },
            requests: None,
            tokens: None,
            source: Source::Fallback,
        }
    }

    fn from_admission(a: &bucket::Admission, limits: &KeyLimits, source: Source) -> Self {
        let headroom = |limit: Option<NonZeroU32>, remaining, reset| {
            limit.map(|n| Headroom {
                limit: n.get(),
                remaining,
                reset: Duration::from_micros(reset),
            })
        };
        Self {
            verdict: if a.allowed {
                Verdict::Allowed
            } else {
                Verdict::Limited {
                    retry_after: Duration::from_micros(a.retry),
                }
            },
            requests: headroom(
                limits.requests_per_minute,
                a.requests_remaining,
                a.requests_reset,
            ),
            tokens: headroom(limits.tokens_per_minute, a.tokens_remaining, a.tokens_reset),
            source,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forward the request.
    Allowed,
    /// Over a rate: 429 with `Retry-After`; nothing was taken.
    Limited { retry_after: Duration },
    /// The shared backend did not answer and `on_redis_error = "deny"`: 503 with
    /// `Retry-After`.
    Unavailable { retry_after: Duration },
}

/// One rate as OpenAI's `x-ratelimit-{limit,remaining,reset}-*` headers report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Headroom {
    pub limit: u32,
    /// Whole requests or tokens that would be admitted now.
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

/// Which state a decision or a slot came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// In-process limits, as configured.
    Local,
    /// The limits shared through Redis.
    Shared,
    /// Redis is configured but did not answer in time: this process decided alone.
    Fallback,
}

/// Why [`Limiter::acquire_slot`] gave no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// The key has `max_concurrent` requests and streams in flight.
    Full,
    /// The shared backend did not answer and `on_redis_error = "deny"`.
    Unavailable { retry_after: Duration },
}

/// The backend's health, for `/metrics` (`keygate_limit_backend_errors_total`, the state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub state: BackendState,
    /// Redis calls that failed or timed out, probes included.
    pub errors: u64,
    /// Decisions and slots taken without Redis because it was down or did not answer.
    pub fallbacks: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendState {
    /// No Redis configured.
    Local,
    Up,
    /// Calls skip Redis until a background probe reaches it again.
    Down,
}

impl BackendState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Up => "up",
            Self::Down => "down",
        }
    }
}

/// The limits of every key, in this process or shared. Cheap to clone.
#[derive(Clone)]
pub struct Limiter(Arc<Backend>);

enum Backend {
    Local(LocalLimiter),
    Redis(RedisLimiter),
}

impl Limiter {
    /// In-process limits: each replica enforces them alone.
    pub fn local() -> Self {
        Self(Arc::new(Backend::Local(LocalLimiter::new())))
    }

    /// Limits shared through the Redis at `url`. Waits at most a second for a first
    /// connection; Redis being down at start-up is handled like Redis going down later.
    /// Fails only on a URL or CA that does not parse.
    pub async fn redis(url: &Secret, options: RedisOptions) -> Result<Self, LimitsError> {
        let backend = RedisLimiter::new(url, options).await?;
        Ok(Self(Arc::new(Backend::Redis(backend))))
    }

    /// Takes one request of `key` if its request bucket and token budget both admit it.
    pub async fn check(&self, key: &str, limits: &KeyLimits) -> Decision {
        match &*self.0 {
            Backend::Local(l) => l.check(key, limits),
            Backend::Redis(r) => r.check(key, limits).await,
        }
    }

    /// Charges `tokens` of usage to `key`'s token budget; a no-op without
    /// `tokens_per_minute`.
    pub async fn debit_tokens(&self, key: &str, limits: &KeyLimits, tokens: u64) {
        match &*self.0 {
            Backend::Local(l) => l.debit_tokens(key, limits, tokens),
            Backend::Redis(r) => r.debit_tokens(key, limits, tokens).await,
        }
    }

    /// [`Self::debit_tokens`] without waiting, for the end of a response: in this process
    /// at once; with Redis, by a task of its own (none once the runtime is shutting down).
    pub fn debit_tokens_soon(&self, key: &str, limits: &KeyLimits, tokens: u64) {
        if limits.tokens_per_minute.is_none() || tokens == 0 {
            return;
        }
        match &*self.0 {
            Backend::Local(l) => l.debit_tokens(key, limits, tokens),
            Backend::Redis(_) => {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    return;
                };
                let (limiter, key, limits) = (self.clone(), key.to_owned(), *limits);
                runtime.spawn(async move { limiter.debit_tokens(&key, &limits, tokens).await });
            }
        }
    }

    /// One of `key`'s `max` concurrency slots, held until the lease is dropped.
    pub async fn acquire_slot(&self, key: &str, max: usize) -> Result<SlotLease, Busy> {
        match &*self.0 {
            Backend::Local(l) => l.acquire_slot(key, max),
            Backend::Redis(r) => r.acquire_slot(key, max).await,
        }
    }

    pub fn stats(&self) -> Stats {
        match &*self.0 {
            Backend::Local(_) => Stats {
                state: BackendState::Local,
                errors: 0,
                fallbacks: 0,
            },
            Backend::Redis(r) => r.stats(),
        }
    }

    /// Forgets in-process state that no longer limits anything (full buckets, free slots),
    /// e.g. of keys a reload removed. State of configured keys is rebuilt on first use.
    pub fn prune(&self) {
        match &*self.0 {
            Backend::Local(l) => l.prune(),
            Backend::Redis(r) => r.local().prune(),
        }
    }

    /// Keys with in-process state held (rate buckets, slot counters), for tests of pruning.
    #[cfg(test)]
    pub(crate) fn held(&self) -> (usize, usize) {
        match &*self.0 {
            Backend::Local(l) => l.held(),
            Backend::Redis(r) => r.local().held(),
        }
    }
}

impl fmt::Display for Limiter {
    /// The backend as `keygate check` shows it; never the Redis password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.0 {
            Backend::Local(_) => f.write_str("in-process"),
            Backend::Redis(r) => fmt::Display::fmt(r, f),
        }
    }
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Limiter({self})")
    }
}

/// A held concurrency slot. Dropping it gives the slot back: at once in this process, and
/// in Redis with the next release the background task sends (or when its lease runs out).
#[derive(Debug)]
pub struct SlotLease {
    _local: local::LocalSlot,
    _shared: Option<redis::SharedLease>,
    source: Source,
}

impl SlotLease {
    fn local(slot: local::LocalSlot, source: Source) -> Self {
        Self {
            _local: slot,
            _shared: None,
            source,
        }
    }

    /// Whether the slot is counted in Redis or, for want of it, in this process only.
    pub fn source(&self) -> Source {
        self.source
    }
}

/// A limits setting that cannot work; the config layer adds file, line and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsError(pub String);

impl fmt::Display for LimitsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LimitsError {}
