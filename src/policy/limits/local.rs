//! In-process limits: each key's buckets and slot count in this process's memory, keyed by
//! the key's name. Used alone without `[limits] redis`, and beside Redis as the fallback: the
//! shared backend records here everything it admits, so that when Redis goes away this
//! process goes on from what it has really used, enforcing the full limits alone.
//!
//! The map holds one entry per key name seen; names come from the configured keys, so it is
//! bounded by them. [`LocalLimiter::prune`] drops entries that no longer limit anything.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::time::Instant;

use super::bucket::{self, Bucket, Take};
use super::{Busy, Decision, KeyLimits, SlotLease, Source};

/// The limits of every key, in this process.
#[derive(Debug)]
pub(crate) struct LocalLimiter {
    /// Times are microseconds since this instant, on the monotonic clock (Tokio's, so a
    /// test can pause and advance it).
    origin: Instant,
    rates: Mutex<HashMap<String, Rates>>,
    slots: Mutex<HashMap<String, Arc<AtomicUsize>>>,
}

/// One key's two buckets; absent ones are full.
#[derive(Debug, Default)]
struct Rates {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    /// When both buckets are full again, so the entry can be forgotten.
    until: f64,
}

impl Rates {
    fn extend(&mut self, bucket: Option<Bucket>, cap: f64) {
        if let Some(b) = bucket {
            let full_at = b.stamp + bucket::reset(b.level, cap) as f64;
            self.until = self.until.max(full_at);
        }
    }
}

impl Default for LocalLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalLimiter {
    pub(crate) fn new() -> Self {
        Self {
            origin: Instant::now(),
            rates: Mutex::new(HashMap::new()),
            slots: Mutex::new(HashMap::new()),
        }
    }

    fn now(&self) -> f64 {
        self.origin.elapsed().as_micros() as f64
    }

    pub(crate) fn check(&self, key: &str, limits: &KeyLimits) -> Decision {
        self.decide(key, limits, Source::Local)
    }

    /// [`Self::check`], reporting `source` as where the decision was taken.
    pub(super) fn decide(&self, key: &str, limits: &KeyLimits, source: Source) -> Decision {
        if limits.is_unlimited() {
            return Decision::unlimited(source);
        }
        let (rpm, tpm) = caps(limits);
        let now = self.now();
        let mut rates = lock(&self.rates);
        let entry = rates.get(key);
        let (admission, take) = bucket::admit(
            entry.and_then(|e| e.requests),
            entry.and_then(|e| e.tokens),
            rpm,
            tpm,
            now,
        );
        if let Take::Requests(requests) = take {
            update(&mut rates, key, |e| {
                e.requests = requests;
                e.extend(requests, rpm);
            });
        }
        Decision::from_admission(&admission, limits, source)
    }

    /// Takes one request of `key` whatever its level: Redis admitted it for every replica,
    /// and this process counts it for the time it may have to decide alone.
    pub(super) fn record_request(&self, key: &str, limits: &KeyLimits) {
        let Some(rpm) = limits.requests_per_minute else {
            return;
        };
        let rpm = f64::from(rpm.get());
        let now = self.now();
        update(&mut lock(&self.rates), key, |e| {
            e.requests = bucket::store(bucket::level(e.requests, rpm, now) - 1.0, rpm, now);
            e.extend(e.requests, rpm);
        });
    }

    pub(crate) fn debit_tokens(&self, key: &str, limits: &KeyLimits, tokens: u64) {
        let Some(tpm) = limits.tokens_per_minute else {
            return;
        };
        if tokens == 0 {
            return;
        }
        let tpm = f64::from(tpm.get());
        let now = self.now();
        update(&mut lock(&self.rates), key, |e| {
            e.tokens = bucket::debit(e.tokens, tpm, tokens as f64, now);
            e.extend(e.tokens, tpm);
        });
    }

    pub(crate) fn acquire_slot(&self, key: &str, max: usize) -> Result<SlotLease, Busy> {
        let slot = self.slot(key, max).ok_or(Busy::Full)?;
        Ok(SlotLease::local(slot, Source::Local))
    }

    /// One of `key`'s slots in this process, if fewer than `max` are in use.
    pub(super) fn slot(&self, key: &str, max: usize) -> Option<LocalSlot> {
        let counter = self.counter(key);
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(LocalSlot(counter))
    }

    /// Counts a slot Redis granted, for the time this process may have to decide alone.
    pub(super) fn count_slot(&self, key: &str) -> LocalSlot {
        let counter = self.counter(key);
        counter.fetch_add(1, Ordering::AcqRel);
        LocalSlot(counter)
    }

    fn counter(&self, key: &str) -> Arc<AtomicUsize> {
        let mut slots = lock(&self.slots);
        match slots.get(key) {
            Some(c) => Arc::clone(c),
            None => Arc::clone(slots.entry(key.to_owned()).or_default()),
        }
    }

    /// Drops the state of keys whose buckets are full again and whose slots are all free.
    pub(crate) fn prune(&self) {
        let now = self.now();
        lock(&self.rates).retain(|_, r| r.until > now);
        lock(&self.slots).retain(|_, c| Arc::strong_count(c) > 1 || c.load(Ordering::Acquire) > 0);
    }

    /// Keys with state held, for tests of [`Self::prune`].
    #[cfg(test)]
    pub(super) fn held(&self) -> (usize, usize) {
        (lock(&self.rates).len(), lock(&self.slots).len())
    }
}

/// The configured rates as bucket capacities; 0 is "not limited".
pub(super) fn caps(limits: &KeyLimits) -> (f64, f64) {
    (
        limits
            .requests_per_minute
            .map_or(0.0, |n| f64::from(n.get())),
        limits.tokens_per_minute.map_or(0.0, |n| f64::from(n.get())),
    )
}

/// Applies `f` to `key`'s entry, created on first use; the name is copied only then.
fn update(rates: &mut HashMap<String, Rates>, key: &str, f: impl FnOnce(&mut Rates)) {
    match rates.get_mut(key) {
        Some(entry) => f(entry),
        None => {
            let mut entry = Rates::default();
            f(&mut entry);
            rates.insert(key.to_owned(), entry);
        }
    }
}

/// Nothing panics while holding these locks; a poisoned one still holds valid counts.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One slot of a key counted in this process, given back when dropped.
#[derive(Debug)]
pub(crate) struct LocalSlot(Arc<AtomicUsize>);

impl Drop for LocalSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::time::Duration;

    use super::*;
    use crate::policy::limits::{Headroom, Verdict};

    fn limits(rpm: Option<u32>, tpm: Option<u32>) -> KeyLimits {
        KeyLimits {
            requests_per_minute: rpm.and_then(NonZeroU32::new),
            tokens_per_minute: tpm.and_then(NonZeroU32::new),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn requests_burst_then_refill_at_the_rate() {
        let l = LocalLimiter::new();
        let rpm6 = limits(Some(6), None);
        for left in (0..6).rev() {
            let d = l.check("a", &rpm6);
            assert_eq!(d.verdict, Verdict::Allowed);
            assert_eq!(d.requests.map(|h| h.remaining), Some(left));
        }
        let d = l.check("a", &rpm6);
        assert_eq!(
            d.verdict,
            Verdict::Limited {
                retry_after: Duration::from_secs(10)
            }
        );
        assert_eq!(
            d.requests,
            Some(Headroom {
                limit: 6,
                remaining: 0,
                reset: Duration::from_secs(60)
            })
        );
        assert_eq!(d.tokens, None);
        // Another key has its own bucket.
        assert_eq!(l.check("b", &rpm6).verdict, Verdict::Allowed);
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert!(matches!(
            l.check("a", &rpm6).verdict,
            Verdict::Limited { .. }
        ));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(l.check("a", &rpm6).verdict, Verdict::Allowed);
        assert!(matches!(
            l.check("a", &rpm6).verdict,
            Verdict::Limited { .. }
        ));
        // Steady state: one every ten seconds, never a reset on the minute.
        for _ in 0..12 {
            tokio::time::advance(Duration::from_secs(10)).await;
            assert_eq!(l.check("a", &rpm6).verdict, Verdict::Allowed);
            assert!(matches!(
                l.check("a", &rpm6).verdict,
                Verdict::Limited { .. }
            ));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_debit_below_zero_makes_the_key_wait_until_paid_back() {
        let l = LocalLimiter::new();
        let tpm = limits(Some(100), Some(600));
        assert_eq!(l.check("a", &tpm).verdict, Verdict::Allowed);
        // One large request crosses the budget: it was admitted, and is charged in full.
        l.debit_tokens("a", &tpm, 900);
        let d = l.check("a", &tpm);
        // 301 tokens to refill at 10 per second.
        assert_eq!(
            d.verdict,
            Verdict::Limited {
                retry_after: Duration::from_millis(30_100)
            }
        );
        assert_eq!(d.tokens.map(|h| h.remaining), Some(0));
        assert_eq!(
            d.requests.map(|h| h.remaining),
            Some(99),
            "a refused request takes nothing"
        );
        tokio::time::advance(Duration::from_millis(30_099)).await;
        assert!(matches!(
            l.check("a", &tpm).verdict,
            Verdict::Limited { .. }
        ));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(l.check("a", &tpm).verdict, Verdict::Allowed);
    }

    #[tokio::test(start_paused = true)]
    async fn limits_changed_by_a_reload_keep_what_the_key_used() {
        let l = LocalLimiter::new();
        for _ in 0..10 {
            assert_eq!(
                l.check("a", &limits(Some(10), None)).verdict,
                Verdict::Allowed
            );
        }
        let raised = l.check("a", &limits(Some(20), None));
        assert!(matches!(raised.verdict, Verdict::Limited { .. }));
        assert_eq!(raised.requests.map(|h| h.limit), Some(20));
    }

    #[tokio::test(start_paused = true)]
    async fn slots_run_out_come_back_and_follow_a_changed_max() {
        let l = LocalLimiter::new();
        let a = l.acquire_slot("k", 2).unwrap();
        let b = l.acquire_slot("k", 2).unwrap();
        assert_eq!(l.acquire_slot("k", 2).unwrap_err(), Busy::Full);
        assert!(l.acquire_slot("other", 2).is_ok());
        drop(a);
        let c = l.acquire_slot("k", 2).unwrap();
        assert_eq!(
            l.acquire_slot("k", 3).map(|s| s.source()),
            Ok(Source::Local)
        );
        assert_eq!(l.acquire_slot("k", 1).unwrap_err(), Busy::Full);
        drop((b, c));
    }

    #[tokio::test(start_paused = true)]
    async fn prune_forgets_only_what_no_longer_limits() {
        let l = LocalLimiter::new();
        l.check("a", &limits(Some(60), None));
        l.debit_tokens("b", &limits(None, Some(60)), 120);
        let held = l.acquire_slot("c", 1).unwrap();
        drop(l.acquire_slot("d", 1).unwrap());
        l.prune();
        assert_eq!(l.held(), (2, 1));
        tokio::time::advance(Duration::from_secs(1)).await;
        l.prune();
        assert_eq!(l.held(), (1, 1), "a's bucket is full after a second");
        tokio::time::advance(Duration::from_secs(180)).await;
        l.prune();
        assert_eq!(l.held(), (0, 1));
        drop(held);
        l.prune();
        assert_eq!(l.held(), (0, 0));
    }
}
