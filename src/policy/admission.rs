//! A key's concurrency slot and rates, taken by the gateway right after the key's scope
//! admits the request and before it waits for the upstream: one of its `max_concurrent`
//! slots, then one request of its `requests_per_minute` if its token budget
//! (`tokens_per_minute`) is not spent. Both come from the [`Limiter`]: this process's own,
//! or the Redis every replica shares (`[limits] redis`).
//!
//! What the limiter answers becomes OpenAI's `x-ratelimit-*` headers ([`RateHeaders`]) on
//! the response, whatever the response turns out to be, and, for a key with a token budget,
//! a [`Debit`] on the access log that charges the response's usage when it ends, without
//! waiting for Redis.
//!
//! The slot is taken first, so a request refused for concurrency costs the key nothing of
//! its rates; a request refused for its rates gives its slot back with its response.

use std::fmt::Write as _;
use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use tracing::info;

use crate::config::limits::Limits;
use crate::error::ProxyError;
use crate::headers::{X_RATELIMIT_LIMIT, X_RATELIMIT_REMAINING, X_RATELIMIT_RESET};
use crate::observe::access::{AccessLog, Debit};
use crate::observe::metrics::{Held, Metrics};
use crate::policy::auth::KeyId;
use crate::policy::limits::{
    BackendState, Busy, Decision, Headroom, Limiter, LimitsError, RedisOptions, SlotLease, Verdict,
};

/// A held concurrency slot, counted in `keygate_key_requests_in_flight` while held.
pub(crate) type Slot = Held<SlotLease>;

/// The limiter of every key, with what the gateway does with its answers.
#[derive(Debug, Clone)]
pub struct Admission {
    limiter: Limiter,
}

impl Admission {
    /// The limits of `[limits]`: in this process, or shared through Redis. A Redis that is
    /// down does not stop start-up: the first connection is waited for at most a second,
    /// and requests are then decided by `on_redis_error` until it answers.
    pub async fn start(limits: &Limits) -> Result<Self, LimitsError> {
        let limiter = match &limits.redis {
            None => Limiter::local(),
            Some(r) => {
                let options = RedisOptions {
                    prefix: r.prefix.clone(),
                    timeout: r.timeout,
                    on_error: r.on_error,
                    lease: r.slot_lease,
                    tls_ca_pem: r.ca.as_ref().map(|(_, pem)| pem.clone()),
                };
                Limiter::redis(&r.url, options).await?
            }
        };
        info!(
            backend = %limiter,
            state = limiter.stats().state.as_str(),
            "per-key limits ready"
        );
        Ok(Self { limiter })
    }

    /// Limits kept in this process alone.
    pub fn local() -> Self {
        Self {
            limiter: Limiter::local(),
        }
    }

    /// Takes `key`'s concurrency slot and one request of its rates, or says why not. The
    /// slot goes into `log`, held as long as the request is, with the debit of the
    /// response's tokens; `headers` gets the rates as they are after this request.
    pub async fn admit(
        &self,
        key: &KeyId,
        metrics: &Metrics,
        log: &mut AccessLog,
        headers: &mut Option<RateHeaders>,
    ) -> Result<(), ProxyError> {
        if let Some(max) = key.policy.max_concurrent {
            let lease =
                self.limiter
                    .acquire_slot(&key.name, max)
                    .await
                    .map_err(|busy| match busy {
                        Busy::Full => ProxyError::KeyBusy,
                        Busy::Unavailable { retry_after } => {
                            ProxyError::LimitsUnavailable(retry_after)
                        }
                    })?;
            let slot: Slot = Held::new(lease, metrics.key_in_flight(&key.name));
            log.slot = Some(Box::new(slot));
        }
        let rates = key.policy.rates;
        if rates.is_unlimited() {
            return Ok(());
        }
        let decision = self.limiter.check(&key.name, &rates).await;
        *headers = RateHeaders::of(&decision);
        match decision.verdict {
            Verdict::Allowed => {}
            Verdict::Limited { retry_after } => return Err(ProxyError::RateLimited(retry_after)),
            Verdict::Unavailable { retry_after } => {
                return Err(ProxyError::LimitsUnavailable(retry_after))
            }
        }
        if rates.tokens_per_minute.is_some() {
            let (limiter, name) = (self.limiter.clone(), key.name.clone());
            log.debit = Some(Debit::new(move |tokens| {
                limiter.debit_tokens_soon(&name, &rates, tokens);
            }));
        }
        Ok(())
    }

    /// Puts the shared backend's state in the metrics (a no-op without Redis).
    pub fn sample(&self, metrics: &Metrics) {
        let stats = self.limiter.stats();
        metrics.limit_backend_sampled(
            stats.state == BackendState::Up,
            stats.errors,
            stats.fallbacks,
        );
    }

    /// Forgets in-process state that no longer limits anything.
    pub fn prune(&self) {
        self.limiter.prune();
    }
}

/// A key's rates after its request was decided, as OpenAI's headers report them:
/// `x-ratelimit-limit-*` the configured rate, `-remaining-*` the whole requests or tokens
/// that would be admitted now, `-reset-*` the time until the bucket is full again. Only the
/// rates the key has are reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateHeaders {
    requests: Option<Headroom>,
    tokens: Option<Headroom>,
}

impl RateHeaders {
    /// `None` when the limiter had no numbers (Redis unavailable under "deny").
    fn of(decision: &Decision) -> Option<Self> {
        (decision.requests.is_some() || decision.tokens.is_some()).then_some(Self {
            requests: decision.requests,
            tokens: decision.tokens,
        })
    }

    /// Sets the headers on a response, replacing any the upstream sent under those names.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (i, headroom) in [self.requests, self.tokens].into_iter().enumerate() {
            for name in [
                &X_RATELIMIT_LIMIT[i],
                &X_RATELIMIT_REMAINING[i],
                &X_RATELIMIT_RESET[i],
            ] {
                headers.remove(name);
            }
            let Some(h) = headroom else {
                continue;
            };
            headers.insert(X_RATELIMIT_LIMIT[i].clone(), HeaderValue::from(h.limit));
            headers.insert(
                X_RATELIMIT_REMAINING[i].clone(),
                HeaderValue::from(h.remaining),
            );
            if let Ok(reset) = HeaderValue::from_str(&go_duration(h.reset)) {
                headers.insert(X_RATELIMIT_RESET[i].clone(), reset);
            }
        }
    }
}

/// A duration the way OpenAI's `x-ratelimit-reset-*` headers write it, which is Go's
/// `time.Duration` format: "20ms", "1s", "6m0s", "1h0m0s", "8.64s". Rounded up to the
/// millisecond, so that a client waiting this long finds the bucket full.
fn go_duration(d: Duration) -> String {
    let ms = d.as_micros().div_ceil(1000);
    if ms < 1000 {
        return if ms == 0 {
            "0s".to_owned()
        } else {
            format!("{ms}ms")
        };
    }
    let (hours, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (minutes, rest) = (rest / 60_000, rest % 60_000);
    let (seconds, fraction) = (rest / 1000, rest % 1000);
    let mut out = String::new();
    if hours > 0 {
        let _ = write!(out, "{hours}h");
    }
    if hours > 0 || minutes > 0 {
        let _ = write!(out, "{minutes}m");
    }
    let _ = write!(out, "{seconds}");
    if fraction > 0 {
        let digits = format!("{fraction:03}");
        out.push('.');
        out.push_str(digits.trim_end_matches('0'));
    }
    out.push('s');
    out
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;
    use crate::config::key_policy::KeyLimits;
    use crate::policy::limits::Source;

    #[test]
    fn reset_times_are_written_as_go_durations_rounded_up_to_the_millisecond() {
        for (micros, expected) in [
            (0, "0s"),
            (1, "1ms"),
            (20_000, "20ms"),
            (999_000, "999ms"),
            (999_001, "1s"),
            (1_000_000, "1s"),
            (8_640_000, "8.64s"),
            (20_500_000, "20.5s"),
            (60_000_000, "1m0s"),
            (360_000_000, "6m0s"),
            (361_200_000, "6m1.2s"),
            (3_600_000_000, "1h0m0s"),
            (86_400_000_000, "24h0m0s"),
            (90_061_001_000, "25h1m1.001s"),
        ] {
            assert_eq!(
                go_duration(Duration::from_micros(micros)),
                expected,
                "{micros} µs"
            );
        }
    }

    fn headroom(limit: u32, remaining: u64, reset_ms: u64) -> Option<Headroom> {
        Some(Headroom {
            limit,
            remaining,
            reset: Duration::from_millis(reset_ms),
        })
    }

    #[test]
    fn only_the_rates_a_key_has_are_reported_and_the_upstreams_are_replaced() {
        let mut headers = HeaderMap::new();
        for name in X_RATELIMIT_LIMIT.iter().chain(&X_RATELIMIT_RESET) {
            headers.insert(name.clone(), HeaderValue::from_static("upstream"));
        }
        RateHeaders {
            requests: headroom(600, 598, 200),
            tokens: None,
        }
        .apply(&mut headers);
        let mut shown: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        shown.sort_unstable();
        assert_eq!(
            shown,
            [
                ("x-ratelimit-limit-requests", "600"),
                ("x-ratelimit-remaining-requests", "598"),
                ("x-ratelimit-reset-requests", "200ms"),
            ]
        );
        RateHeaders {
            requests: None,
            tokens: headroom(200_000, 0, 360_000),
        }
        .apply(&mut headers);
        assert_eq!(headers.len(), 3);
        assert_eq!(headers["x-ratelimit-limit-tokens"], "200000");
        assert_eq!(headers["x-ratelimit-remaining-tokens"], "0");
        assert_eq!(headers["x-ratelimit-reset-tokens"], "6m0s");
    }

    #[test]
    fn headers_report_whichever_rates_the_decision_has() {
        let decision = |requests, tokens| Decision {
            verdict: Verdict::Allowed,
            requests,
            tokens,
            source: Source::Local,
        };
        assert_eq!(RateHeaders::of(&decision(None, None)), None);
        let (requests, tokens) = (headroom(600, 598, 200), headroom(200_000, 0, 360_000));
        for (requests, tokens) in [(requests, None), (None, tokens), (requests, tokens)] {
            assert_eq!(
                RateHeaders::of(&decision(requests, tokens)),
                Some(RateHeaders { requests, tokens })
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pruning_reaches_the_limiter() {
        let admission = Admission::local();
        let rpm = KeyLimits {
            requests_per_minute: NonZeroU32::new(60),
            tokens_per_minute: None,
        };
        admission.limiter.check("a", &rpm).await;
        assert_eq!(admission.limiter.held(), (1, 0));
        tokio::time::advance(Duration::from_secs(1)).await;
        admission.prune();
        assert_eq!(admission.limiter.held(), (0, 0), "the bucket is full again");
    }
}
