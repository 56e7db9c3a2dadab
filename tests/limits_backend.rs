//! Per-key rates and concurrency slots shared through a real `redis-server`, through the
//! library's `Limiter` (the gateway is not wired to it yet): replicas are limiter instances
//! with their own connections, a dead replica is one whose runtime is gone, and outages are
//! a killed, frozen or absent Redis. The in-process backend must give the same answers.
//!
//! No test depends on a refill within its span: limits are chosen so that none happens for
//! many seconds, and every wait is on a condition with a deadline.

mod support;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate::{
    BackendState, Busy, Decision, KeyLimits, Limiter, OnError, RedisOptions, Secret, Source,
    Verdict,
};
use support::redis_server::RedisServer;
use support::tls::Ca;
use support::DEADLINE;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn limits(rpm: Option<u32>, tpm: Option<u32>) -> KeyLimits {
    KeyLimits {
        requests_per_minute: rpm.and_then(NonZeroU32::new),
        tokens_per_minute: tpm.and_then(NonZeroU32::new),
    }
}

/// Generous, so that a loaded machine does not turn a functional test into a fallback one;
/// the outage tests set their own.
fn options() -> RedisOptions {
    RedisOptions {
        timeout: Duration::from_millis(500),
        ..RedisOptions::default()
    }
}

/// A replica of the shared limits, once it reaches Redis.
async fn replica(redis: &RedisServer, options: RedisOptions) -> Limiter {
    let limiter = Limiter::redis(&Secret::new(redis.url()), options)
        .await
        .unwrap();
    up(&limiter).await;
    limiter
}

async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done().await {
        assert!(Instant::now() < deadline, "not within {DEADLINE:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `call`, failing the test instead of hanging it when the limiter has no bound of its own.
async fn bounded<T>(call: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("a limiter call hung")
}

async fn up(limiter: &Limiter) {
    until("the limiter reaches Redis", async || {
        limiter.stats().state == BackendState::Up
    })
    .await;
}

async fn redis_conn(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

fn retry_after(d: &Decision) -> Duration {
    match d.verdict {
        Verdict::Limited { retry_after } => retry_after,
        other => panic!("expected a 429, got {other:?}"),
    }
}

#[tokio::test]
async fn two_replicas_share_one_request_limit() {
    let redis = RedisServer::start().await;
    let (a, b) = (
        replica(&redis, options()).await,
        replica(&redis, options()).await,
    );
    // One request refills every 20 s: none during the test.
    let rpm3 = limits(Some(3), None);
    let mut remaining = Vec::new();
    for l in [&a, &b, &a] {
        let d = l.check("app", &rpm3).await;
        assert_eq!((d.verdict, d.source), (Verdict::Allowed, Source::Shared));
        remaining.push(d.requests.unwrap().remaining);
    }
    assert_eq!(remaining, [2, 1, 0]);
    for l in [&b, &a] {
        let d = l.check("app", &rpm3).await;
        let wait = retry_after(&d);
        assert!(
            wait <= Duration::from_secs(20) && wait > Duration::from_secs(10),
            "{wait:?}"
        );
        assert_eq!(d.requests.unwrap().remaining, 0);
    }
    assert_eq!(b.check("other", &rpm3).await.verdict, Verdict::Allowed);
    // Idle state vanishes from Redis once the bucket would be full again.
    let pttl: i64 = redis::cmd("PTTL")
        .arg("keygate:rpm:app")
        .query_async(&mut redis_conn(&redis).await)
        .await
        .unwrap();
    assert!(pttl > 0 && pttl <= 60_000, "PTTL {pttl}");
}

#[tokio::test]
async fn tokens_debited_by_one_replica_make_the_key_wait_on_another() {
    let redis = RedisServer::start().await;
    let (a, b) = (
        replica(&redis, options()).await,
        replica(&redis, options()).await,
    );
    let l = limits(Some(100), Some(600));
    assert_eq!(a.check("app", &l).await.verdict, Verdict::Allowed);
    // One large request crosses the budget and is charged in full when it ends.
    b.debit_tokens("app", &l, 900).await;
    let d = a.check("app", &l).await;
    // 301 tokens to refill at 10 per second.
    let wait = retry_after(&d);
    assert!(
        wait <= Duration::from_millis(30_100) && wait > Duration::from_secs(20),
        "{wait:?}"
    );
    assert_eq!(d.tokens.unwrap().remaining, 0);
    assert_eq!(
        d.requests.unwrap().remaining,
        99,
        "a refused request takes nothing"
    );
}

/// The admissions of one run, and how long the run took.
async fn scripted(l: &Limiter) -> (Vec<Decision>, Duration) {
    let start = Instant::now();
    let both = limits(Some(4), Some(6));
    let tokens = limits(None, Some(6));
    let mut out = Vec::new();
    for _ in 0..3 {
        out.push(l.check("d", &both).await);
    }
    l.debit_tokens("d", &both, 5).await;
    out.push(l.check("d", &both).await);
    l.debit_tokens("d", &both, 3).await;
    out.push(l.check("d", &both).await);
    out.push(l.check("t", &tokens).await);
    l.debit_tokens("t", &tokens, 1_000_000).await;
    out.push(l.check("t", &tokens).await);
    out.push(l.check("t", &limits(Some(1), Some(6))).await);
    // A fresh bucket of one holds exactly one request.
    for _ in 0..2 {
        out.push(l.check("one", &limits(Some(1), None)).await);
    }
    (out, start.elapsed())
}

#[tokio::test]
async fn the_redis_script_and_the_in_process_arithmetic_agree() {
    let redis = RedisServer::start().await;
    let shared = replica(&redis, options()).await;
    let (local, local_span) = scripted(&Limiter::local()).await;
    let (remote, remote_span) = scripted(&shared).await;
    // A refill of one token takes 10 s: the runs can only differ by the time each took.
    let slack = local_span + remote_span + Duration::from_millis(1);
    assert_eq!(local.len(), remote.len());
    for (i, (l, r)) in local.iter().zip(&remote).enumerate() {
        assert_eq!(r.source, Source::Shared);
        let close = |a: Duration, b: Duration| a.abs_diff(b) <= slack;
        match (l.verdict, r.verdict) {
            (Verdict::Allowed, Verdict::Allowed) => {}
            (Verdict::Limited { retry_after: x }, Verdict::Limited { retry_after: y }) => {
                assert!(close(x, y), "admission {i}: retry {x:?} vs {y:?}")
            }
            (x, y) => panic!("admission {i}: {x:?} in process, {y:?} in Redis"),
        }
        for (x, y) in [(l.requests, r.requests), (l.tokens, r.tokens)] {
            match (x, y) {
                (None, None) => {}
                (Some(x), Some(y)) => {
                    assert_eq!(
                        (x.limit, x.remaining),
                        (y.limit, y.remaining),
                        "admission {i}"
                    );
                    assert!(close(x.reset, y.reset), "admission {i}: {x:?} vs {y:?}");
                }
                _ => panic!("admission {i}: {x:?} vs {y:?}"),
            }
        }
    }
    let verdicts: Vec<bool> = local
        .iter()
        .map(|d| d.verdict == Verdict::Allowed)
        .collect();
    assert_eq!(
        verdicts,
        [true, true, true, true, false, true, false, false, true, false],
        "{local:#?}"
    );
}

#[tokio::test]
async fn concurrency_slots_are_shared_and_given_back() {
    let redis = RedisServer::start().await;
    let (a, b) = (
        replica(&redis, options()).await,
        replica(&redis, options()).await,
    );
    let first = a.acquire_slot("app", 2).await.unwrap();
    let second = b.acquire_slot("app", 2).await.unwrap();
    assert_eq!(
        (first.source(), second.source()),
        (Source::Shared, Source::Shared)
    );
    assert_eq!(a.acquire_slot("app", 2).await.unwrap_err(), Busy::Full);
    assert_eq!(b.acquire_slot("app", 2).await.unwrap_err(), Busy::Full);
    assert!(b.acquire_slot("other", 2).await.is_ok());
    drop(first);
    until("a's released slot is free for b", async || {
        b.acquire_slot("app", 2).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn a_dead_replica_loses_its_slots_after_the_lease() {
    let redis = RedisServer::start().await;
    let lease = Duration::from_secs(3);
    let short = RedisOptions { lease, ..options() };
    let url = redis.url();
    let dead_options = short.clone();
    // A replica in a runtime of its own, which then goes away as a SIGKILL would take it:
    // the lease is neither released nor renewed.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let dying = Limiter::redis(&Secret::new(url), dead_options)
                .await
                .unwrap();
            up(&dying).await;
            let slot = dying.acquire_slot("app", 2).await.unwrap();
            assert_eq!(slot.source(), Source::Shared);
            std::mem::forget(slot);
        });
    })
    .join()
    .unwrap();
    let died = Instant::now();
    let survivor = replica(&redis, short).await;
    // The survivor's own renewed lease keeps the key alive: the dead one must be purged.
    let _own = survivor.acquire_slot("app", 2).await.unwrap();
    let refused = survivor.acquire_slot("app", 2).await;
    assert!(died.elapsed() < lease, "too slow to see the slot held");
    assert_eq!(refused.unwrap_err(), Busy::Full);
    until("the dead replica's lease expires", async || {
        survivor.acquire_slot("app", 2).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn a_long_holder_keeps_its_lease_by_renewing_it() {
    let redis = RedisServer::start().await;
    let lease = Duration::from_secs(2);
    let short = RedisOptions { lease, ..options() };
    let (a, b) = (
        replica(&redis, short.clone()).await,
        replica(&redis, short).await,
    );
    let held = a.acquire_slot("app", 1).await.unwrap();
    let mut conn = redis_conn(&redis).await;
    let first_expiry: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg("keygate:slots:app")
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut conn)
        .await
        .unwrap();
    let first_expiry = first_expiry[0].1;
    // Held for a whole lease past the expiry it was first given, on Redis's clock.
    until("a lease's time passes", async || {
        assert_eq!(b.acquire_slot("app", 1).await.unwrap_err(), Busy::Full);
        let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
        (secs * 1000 + micros / 1000) as f64 > first_expiry + lease.as_millis() as f64
    })
    .await;
    assert_eq!(b.acquire_slot("app", 1).await.unwrap_err(), Busy::Full);
    drop(held);
    until("the released slot is free", async || {
        b.acquire_slot("app", 1).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn redis_killed_mid_run_falls_back_to_what_each_replica_used_then_recovers() {
    let mut redis = RedisServer::start().await;
    let quick = RedisOptions {
        timeout: Duration::from_millis(250),
        ..RedisOptions::default()
    };
    let (a, b) = (
        replica(&redis, quick.clone()).await,
        replica(&redis, quick).await,
    );
    let rpm3 = limits(Some(3), None);
    for _ in 0..2 {
        assert_eq!(a.check("app", &rpm3).await.source, Source::Shared);
    }
    let slot = a.acquire_slot("app", 2).await.unwrap();

    redis.kill();
    let mut verdicts = Vec::new();
    for l in [&a, &a, &b] {
        let start = Instant::now();
        let d = bounded(l.check("app", &rpm3)).await;
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(d.source, Source::Fallback);
        verdicts.push(d.verdict == Verdict::Allowed);
    }
    // a used 2 of 3 through Redis and goes on from there alone; b had used none.
    assert_eq!(verdicts, [true, false, true]);
    let start = Instant::now();
    let fallback_slot = bounded(a.acquire_slot("app", 2)).await.unwrap();
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(fallback_slot.source(), Source::Fallback);
    assert_eq!(
        a.acquire_slot("app", 2).await.unwrap_err(),
        Busy::Full,
        "the slot held through Redis counts here too"
    );
    for l in [&a, &b] {
        let stats = l.stats();
        assert_eq!(stats.state, BackendState::Down);
        assert!(stats.errors >= 1 && stats.fallbacks >= 1, "{stats:?}");
    }
    drop((slot, fallback_slot));

    redis.restart().await;
    up(&a).await;
    up(&b).await;
    // The restarted Redis is empty: the shared limit holds again from zero.
    let mut allowed = 0;
    for l in [&a, &b, &a, &b, &a] {
        let d = l.check("app", &rpm3).await;
        assert_eq!(d.source, Source::Shared);
        allowed += usize::from(d.verdict == Verdict::Allowed);
    }
    assert_eq!(allowed, 3);
    let one = a.acquire_slot("app", 1).await.unwrap();
    assert_eq!(one.source(), Source::Shared);
    assert_eq!(b.acquire_slot("app", 1).await.unwrap_err(), Busy::Full);
}

#[tokio::test]
async fn a_hung_redis_costs_one_request_the_timeout_and_the_rest_nothing() {
    let redis = RedisServer::start().await;
    let timeout = Duration::from_secs(1);
    let deny = RedisOptions {
        timeout,
        on_error: OnError::Deny,
        ..RedisOptions::default()
    };
    let l = replica(&redis, deny).await;
    let rpm = limits(Some(100), Some(1000));
    assert_eq!(l.check("app", &rpm).await.source, Source::Shared);

    redis.freeze();
    let unavailable = Verdict::Unavailable {
        retry_after: Duration::from_secs(1),
    };
    let start = Instant::now();
    let d = bounded(l.check("app", &rpm)).await;
    assert!(start.elapsed() < timeout * 2, "{:?}", start.elapsed());
    assert_eq!((d.verdict, d.requests, d.tokens), (unavailable, None, None));
    assert_eq!(l.stats().state, BackendState::Down);
    // Redis is known to be down now: nobody else waits for it.
    let start = Instant::now();
    for _ in 0..3 {
        assert_eq!(bounded(l.check("app", &rpm)).await.verdict, unavailable);
    }
    assert!(matches!(
        bounded(l.acquire_slot("app", 5)).await.unwrap_err(),
        Busy::Unavailable { .. }
    ));
    bounded(l.debit_tokens("app", &rpm, 10)).await;
    assert!(start.elapsed() < timeout / 2, "{:?}", start.elapsed());

    redis.thaw();
    up(&l).await;
    assert_eq!(l.check("app", &rpm).await.source, Source::Shared);
}

/// A TCP relay to Redis that can go silent on the connections it has, as a path to a Redis
/// host that vanished without a reset does, while new connections go through.
struct Relay {
    port: u16,
    epoch: Arc<AtomicU64>,
}

impl Relay {
    async fn start(to: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let epoch = Arc::new(AtomicU64::new(0));
        let current = Arc::clone(&epoch);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                    continue;
                };
                let born = current.load(Ordering::SeqCst);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(relay(cr, sw, born, Arc::clone(&current)));
                tokio::spawn(relay(sr, cw, born, Arc::clone(&current)));
            }
        });
        Self { port, epoch }
    }

    /// From now on the connections already open carry nothing either way.
    fn silence_existing(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }
}

async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    born: u64,
    epoch: Arc<AtomicU64>,
) {
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        if epoch.load(Ordering::SeqCst) == born && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn a_connection_gone_silent_is_replaced_not_waited_on() {
    let redis = RedisServer::start().await;
    let relay = Relay::start(redis.port).await;
    let l = Limiter::redis(
        &Secret::new(format!("redis://127.0.0.1:{}/0", relay.port)),
        RedisOptions {
            timeout: Duration::from_millis(200),
            ..RedisOptions::default()
        },
    )
    .await
    .unwrap();
    let rpm = limits(Some(100), None);
    assert_eq!(l.check("app", &rpm).await.source, Source::Shared);
    relay.silence_existing();
    assert_eq!(bounded(l.check("app", &rpm)).await.source, Source::Fallback);
    up(&l).await;
    assert_eq!(bounded(l.check("app", &rpm)).await.source, Source::Shared);
}

#[tokio::test]
async fn redis_down_at_start_up_is_an_outage_like_any_other() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let start = Instant::now();
    let l = bounded(Limiter::redis(
        &Secret::new(format!("redis://127.0.0.1:{port}/0")),
        RedisOptions::default(),
    ))
    .await
    .unwrap();
    assert_eq!(l.stats().state, BackendState::Down);
    let d = bounded(l.check("app", &limits(Some(10), None))).await;
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!((d.verdict, d.source), (Verdict::Allowed, Source::Fallback));
    let Some(_redis) = RedisServer::start_on(port).await else {
        // Another process took the port in the meantime: nothing to learn here.
        return;
    };
    up(&l).await;
    assert_eq!(
        l.check("app", &limits(Some(10), None)).await.source,
        Source::Shared
    );
}

#[tokio::test]
async fn rediss_speaks_tls_through_rustls() {
    let ca = Ca::new();
    let leaf = ca.issue(30);
    let redis = RedisServer::start_tls(&leaf.cert_pem, &leaf.key_pem, &ca.pem()).await;
    let url = Secret::new(format!("rediss://localhost:{}/0", redis.tls_port.unwrap()));
    let trusting = RedisOptions {
        tls_ca_pem: Some(ca.pem().into_bytes()),
        ..options()
    };
    let l = Limiter::redis(&url, trusting).await.unwrap();
    up(&l).await;
    // The test CA is in no public root store.
    let untrusting = Limiter::redis(&url, options()).await.unwrap();
    until("an untrusted certificate is refused", async || {
        untrusting.stats().state == BackendState::Down
    })
    .await;
    assert_eq!(
        untrusting.check("app", &limits(Some(1), None)).await.source,
        Source::Fallback
    );
    let d = l.check("app", &limits(Some(1), None)).await;
    assert_eq!((d.verdict, d.source), (Verdict::Allowed, Source::Shared));
    assert!(matches!(
        l.check("app", &limits(Some(1), None)).await.verdict,
        Verdict::Limited { .. }
    ));
}

#[tokio::test]
async fn the_backend_shows_where_redis_is_but_never_its_password() {
    // Nothing listens on port 1: the limiter starts with Redis down.
    let l = Limiter::redis(
        &Secret::new("rediss://user:hunter2@127.0.0.1:1/3".to_owned()),
        RedisOptions::default(),
    )
    .await
    .unwrap();
    let shown = l.to_string();
    assert_eq!(
        shown,
        "redis 127.0.0.1:1 (tls) db 3, prefix \"keygate:\", redis_timeout 50ms, slot_lease 30s, on_redis_error local"
    );
    assert!(!format!("{l:?}").contains("hunter2"));
    let bad = Limiter::redis(&Secret::new("http://x".to_owned()), RedisOptions::default()).await;
    assert!(bad.unwrap_err().to_string().contains("redis://"));
    assert_eq!(Limiter::local().to_string(), "in-process");
}

/// Added latency of one admission, Redis on loopback against in process:
/// `cargo test --release --locked --test limits_backend -- --ignored --nocapture admission_latency`.
#[tokio::test]
#[ignore = "a measurement, not a test"]
async fn admission_latency() {
    const CALLS: usize = 20_000;
    let redis = RedisServer::start().await;
    // A loaded machine can miss the default 50 ms now and then; every call here must go
    // to Redis, or the figures would include in-process fallbacks.
    let shared = replica(
        &redis,
        RedisOptions {
            timeout: Duration::from_secs(1),
            ..RedisOptions::default()
        },
    )
    .await;
    let local = Limiter::local();
    let wide = limits(Some(u32::MAX), Some(u32::MAX));
    for (name, l) in [("in-process", &local), ("redis", &shared)] {
        let mut checks = Vec::with_capacity(CALLS);
        let mut slots = Vec::with_capacity(CALLS);
        for _ in 0..CALLS {
            let start = Instant::now();
            let d = l.check("bench", &wide).await;
            checks.push(start.elapsed());
            assert_eq!(d.verdict, Verdict::Allowed);
            let start = Instant::now();
            let slot = l.acquire_slot("bench", 1_000_000).await.unwrap();
            slots.push(start.elapsed());
            drop(slot);
        }
        for (what, mut times) in [("check", checks), ("acquire_slot", slots)] {
            times.sort();
            println!(
                "{name:>10} {what:<12} p50 {:>9.1?} p99 {:>9.1?} ({CALLS} calls)",
                times[CALLS / 2],
                times[CALLS * 99 / 100]
            );
        }
    }
    let stats = shared.stats();
    assert_eq!((stats.errors, stats.fallbacks), (0, 0), "{stats:?}");
}
