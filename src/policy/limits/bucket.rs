//! The rate arithmetic of both backends, a continuously refilled bucket (GCRA in its
//! token-bucket form): a bucket of `cap` holds `cap` when unused and refills at `cap` per
//! minute. The in-process backend runs this code; `rate.lua` runs the same operations in the
//! same order on Redis's clock, so both give the same answers.
//!
//! Times are microseconds in `f64`, as in Lua. Levels rather than theoretical arrival times
//! are stored so that taking one whole request from a whole level is exact: a burst of `cap`
//! is admitted exactly, whatever `cap`, with no rounding at the edge of the burst.

/// Microseconds in a minute.
const MINUTE: f64 = 60_000_000.0;

/// How far a debit may drive a budget below zero, in minutes of refill: one response that
/// reports absurd usage makes its key wait at most this long.
pub(super) const MAX_DEBT_MINUTES: f64 = 1440.0;

/// A bucket's level at the time it was stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Bucket {
    pub level: f64,
    pub stamp: f64,
}

/// The level of a bucket of `cap` at `now`: full when it has no stored state.
pub(super) fn level(bucket: Option<Bucket>, cap: f64, now: f64) -> f64 {
    match bucket {
        None => cap,
        Some(b) => (b.level + (now - b.stamp).max(0.0) * cap / MINUTE).min(cap),
    }
}

/// The state to store for `level` at `now`; `None` once the bucket is full, which is the
/// same as no state. A debt is bounded by [`MAX_DEBT_MINUTES`].
pub(super) fn store(level: f64, cap: f64, now: f64) -> Option<Bucket> {
    let level = level.max(-cap * MAX_DEBT_MINUTES);
    (reset(level, cap) > 0).then_some(Bucket { level, stamp: now })
}

/// Microseconds until a bucket at `level` is full.
pub(super) fn reset(level: f64, cap: f64) -> u64 {
    whole(((cap - level) * MINUTE / cap).ceil())
}

/// Microseconds until a bucket at `level` holds one whole unit.
pub(super) fn wait(level: f64, cap: f64) -> u64 {
    whole(((1.0 - level) * MINUTE / cap).ceil())
}

/// Whole units left at `level`.
pub(super) fn remaining(level: f64) -> u64 {
    whole(level.floor())
}

/// A whole `f64` as a count, negatives as 0, as `rate.lua` returns it.
fn whole(x: f64) -> u64 {
    if x > 0.0 {
        x as u64
    } else {
        0
    }
}

/// The outcome of one admission, in the shape `rate.lua` returns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Admission {
    pub allowed: bool,
    /// Microseconds until both rates would admit the request; 0 when allowed.
    pub retry: u64,
    pub requests_remaining: u64,
    pub requests_reset: u64,
    pub tokens_remaining: u64,
    pub tokens_reset: u64,
}

/// What an admission changed: the new request bucket, if it took a request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Take {
    Nothing,
    Requests(Option<Bucket>),
}

/// Admits one request at `now` if the request bucket holds a whole request and the token
/// budget at least one token, taking the request only then. `rpm`/`tpm` of 0: not limited.
pub(super) fn admit(
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    rpm: f64,
    tpm: f64,
    now: f64,
) -> (Admission, Take) {
    let mut r = 0.0;
    let mut t = 0.0;
    if rpm > 0.0 {
        r = level(requests, rpm, now);
    }
    if tpm > 0.0 {
        t = level(tokens, tpm, now);
    }
    let requests_ok = rpm == 0.0 || r >= 1.0;
    let tokens_ok = tpm == 0.0 || t >= 1.0;
    let allowed = requests_ok && tokens_ok;
    let mut retry = 0;
    let mut take = Take::Nothing;
    if allowed {
        if rpm > 0.0 {
            r -= 1.0;
            take = Take::Requests(store(r, rpm, now));
        }
    } else {
        if !requests_ok {
            retry = wait(r, rpm);
        }
        if !tokens_ok {
            retry = retry.max(wait(t, tpm));
        }
    }
    let admission = Admission {
        allowed,
        retry,
        requests_remaining: remaining(r),
        requests_reset: if rpm > 0.0 { reset(r, rpm) } else { 0 },
        tokens_remaining: remaining(t),
        tokens_reset: if tpm > 0.0 { reset(t, tpm) } else { 0 },
    };
    (admission, take)
}

/// The token budget after charging `tokens` at `now`.
pub(super) fn debit(tokens: Option<Bucket>, tpm: f64, amount: f64, now: f64) -> Option<Bucket> {
    store(level(tokens, tpm, now) - amount, tpm, now)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: f64 = 1.0e15;

    #[test]
    fn a_burst_of_cap_passes_exactly_then_one_per_interval() {
        for cap in [1.0, 3.0, 7.0, 600.0, 10_000.0] {
            let mut state = None;
            for i in 0..cap as u64 {
                let (a, take) = admit(state, None, cap, 0.0, T0);
                assert!(a.allowed, "cap {cap}: request {i} of the burst refused");
                assert_eq!(a.requests_remaining, cap as u64 - i - 1);
                let Take::Requests(s) = take else {
                    panic!("an admission took nothing")
                };
                state = s;
            }
            let (a, take) = admit(state, None, cap, 0.0, T0);
            assert!(!a.allowed, "cap {cap}: one past the burst admitted");
            assert_eq!(take, Take::Nothing);
            let interval = MINUTE / cap;
            assert_eq!(a.retry, interval.ceil() as u64);
            let (a, _) = admit(state, None, cap, 0.0, T0 + interval.ceil());
            assert!(a.allowed, "cap {cap}: not refilled after one interval");
        }
    }

    #[test]
    fn a_debit_below_zero_waits_until_paid_back() {
        let tpm = 1000.0;
        let spent = debit(None, tpm, 1500.0, T0);
        let (a, _) = admit(None, spent, 0.0, tpm, T0);
        assert!(!a.allowed);
        assert_eq!(a.tokens_remaining, 0);
        // 501 tokens to refill at 1000 per minute: 30.06 s.
        assert_eq!(a.retry, 30_060_000);
        assert_eq!(a.tokens_reset, 90_000_000);
        let (a, _) = admit(None, spent, 0.0, tpm, T0 + 30_060_000.0);
        assert!(a.allowed);
    }

    #[test]
    fn a_request_is_taken_only_when_both_rates_admit_it() {
        let spent = debit(None, 100.0, 100.0, T0);
        let (a, take) = admit(None, spent, 10.0, 100.0, T0);
        assert!(!a.allowed);
        assert_eq!(take, Take::Nothing);
        assert_eq!(a.requests_remaining, 10);
    }

    #[test]
    fn debt_is_bounded() {
        let spent = debit(None, 10.0, 1.0e18, T0);
        let (a, _) = admit(None, spent, 0.0, 10.0, T0);
        assert_eq!(
            a.retry,
            ((MAX_DEBT_MINUTES * 10.0 + 1.0) * MINUTE / 10.0) as u64
        );
    }

    #[test]
    fn a_full_bucket_stores_nothing_and_the_clock_never_runs_back() {
        assert_eq!(store(5.0, 5.0, T0), None);
        let b = Some(Bucket {
            level: 2.0,
            stamp: T0,
        });
        assert_eq!(level(b, 5.0, T0 - 1.0e9), 2.0);
    }
}
