//! Failed authentication stays cheap and quiet. Each failure is counted by reason and
//! reported in one warning every [`REPORT_EVERY`] instead of a line per attempt (the access
//! log still has one line per request). A client address that keeps presenting wrong or
//! malformed credentials is slowed: past [`FAILURES_PER_SECOND`] (bursts of
//! [`FAILURE_BURST`]) its refusals are held for [`SLOWDOWN`], while every other client is
//! answered at once. A request without any credential is not a guess and is never held.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::ProxyError;

/// How often the failure summary is logged.
pub(crate) const REPORT_EVERY: Duration = Duration::from_secs(10);
/// Failures per second one address may have before it is slowed.
pub(crate) const FAILURES_PER_SECOND: u32 = 10;
/// Failures one address may have at once before it is slowed.
pub const FAILURE_BURST: u32 = 20;
/// How long a slowed refusal is held.
pub const SLOWDOWN: Duration = Duration::from_secs(1);

pub(crate) struct FailedAuth {
    per_client: DefaultKeyedRateLimiter<IpAddr>,
    missing: AtomicU64,
    malformed: AtomicU64,
    invalid: AtomicU64,
    expired: AtomicU64,
    slowed: AtomicU64,
}

impl Default for FailedAuth {
    fn default() -> Self {
        let rate = NonZeroU32::new(FAILURES_PER_SECOND).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(FAILURE_BURST).unwrap_or(NonZeroU32::MIN);
        Self {
            per_client: RateLimiter::dashmap(Quota::per_second(rate).allow_burst(burst)),
            missing: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            invalid: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            slowed: AtomicU64::new(0),
        }
    }
}

impl FailedAuth {
    /// Counts an authentication failure of `client` and says how long to hold the answer.
    /// Errors other than authentication failures are not counted.
    pub(crate) fn record(&self, client: IpAddr, error: &ProxyError) -> Option<Duration> {
        let counter = match error {
            ProxyError::MissingCredentials => {
                self.missing.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            ProxyError::MalformedCredentials => &self.malformed,
            ProxyError::InvalidCredentials => &self.invalid,
            // Refused as an invalid key is, and slowed the same way.
            ProxyError::KeyExpired => &self.expired,
            _ => return None,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if self.per_client.check_key(&client).is_ok() {
            return None;
        }
        self.slowed.fetch_add(1, Ordering::Relaxed);
        Some(SLOWDOWN)
    }

    /// Logs the counts since the last report, if any, and forgets addresses that have been
    /// quiet long enough to be allowed a full burst again.
    pub(crate) fn report(&self) {
        let take = |c: &AtomicU64| c.swap(0, Ordering::Relaxed);
        let (missing, malformed, invalid, expired, slowed) = (
            take(&self.missing),
            take(&self.malformed),
            take(&self.invalid),
            take(&self.expired),
            take(&self.slowed),
        );
        if missing + malformed + invalid + expired > 0 {
            tracing::warn!(
                missing,
                malformed,
                invalid,
                expired,
                slowed,
                period_s = REPORT_EVERY.as_secs(),
                "failed authentication"
            );
        }
        self.per_client.retain_recent();
        self.per_client.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_is_slowed_after_its_burst_and_others_are_not() {
        let failed = FailedAuth::default();
        let noisy: IpAddr = "203.0.113.1".parse().unwrap();
        let quiet: IpAddr = "203.0.113.2".parse().unwrap();
        let held: Vec<_> = (0..FAILURE_BURST + 5)
            .map(|_| failed.record(noisy, &ProxyError::InvalidCredentials))
            .collect();
        assert!(held[..FAILURE_BURST as usize].iter().all(Option::is_none));
        assert!(held[FAILURE_BURST as usize..]
            .iter()
            .all(|d| *d == Some(SLOWDOWN)));
        assert_eq!(failed.record(quiet, &ProxyError::InvalidCredentials), None);
        assert_eq!(
            failed.record(noisy, &ProxyError::MissingCredentials),
            None,
            "no credential, no guess"
        );
        assert_eq!(
            failed.invalid.load(Ordering::Relaxed),
            u64::from(FAILURE_BURST) + 6
        );
        assert_eq!(failed.missing.load(Ordering::Relaxed), 1);
        assert_eq!(failed.slowed.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn other_errors_are_not_counted() {
        let failed = FailedAuth::default();
        let client: IpAddr = "203.0.113.1".parse().unwrap();
        assert_eq!(failed.record(client, &ProxyError::UpstreamTimeout), None);
        failed.report();
        assert_eq!(failed.missing.load(Ordering::Relaxed), 0);
    }
}
