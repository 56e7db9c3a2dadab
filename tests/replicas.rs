//! Limits that hold across replicas: three real keygate processes share one Redis
//! (`[limits] redis`), as replicas behind a load balancer do. One `requests_per_minute` and
//! one `max_concurrent` hold for all three together, a replica killed with SIGKILL gives its
//! slots back once their lease runs out, a hung or dead Redis costs each request at most
//! `redis_timeout` (each replica then decides alone), and a restarted Redis makes the limits
//! shared again.
//!
//! Rates are chosen so that a refill during a burst is rare, and a burst's admissions are
//! checked against the limit plus the refills its measured span allows.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use support::process::{Running, TempDir, ENV};
use support::redis_server::RedisServer;
use support::*;
use tokio::runtime::Runtime;

const REPLICAS: usize = 3;
/// `redis_timeout` of the functional tests: generous, so that a loaded machine does not turn
/// them into tests of the fallback.
const GENEROUS: Duration = Duration::from_secs(1);
/// `redis_timeout` of the outage test.
const OUTAGE_TIMEOUT: Duration = Duration::from_millis(500);
/// Most time one request may take with Redis hung or dead: `redis_timeout` and ample room
/// for a loaded machine, far below a request that waits for Redis unbounded.
const ANSWER_BOUND: Duration = Duration::from_secs(2);

/// One keygate process and its admin listener.
struct Replica {
    process: Running,
    admin: SocketAddr,
}

impl Replica {
    fn start(config: &std::path::Path) -> Self {
        let mut process = Running::start(config, &ENV);
        let line = process.wait_for_line("admin endpoints");
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        let admin = event["listen"].as_str().unwrap().parse().unwrap();
        Self { process, admin }
    }

    fn addr(&self) -> SocketAddr {
        self.process.addr
    }
}

/// The test's runtime (upstream, Redis, clients) with three replicas running `config`.
struct Cluster {
    runtime: Runtime,
    replicas: Vec<Option<Replica>>,
    _dir: TempDir,
}

impl Cluster {
    fn start(runtime: Runtime, config: TestConfig) -> Self {
        let dir = TempDir::new("replicas");
        let text = config.log_level("info,keygate::access=off").text();
        let path = dir.write("keygate.toml", &text);
        let replicas = (0..REPLICAS).map(|_| Some(Replica::start(&path))).collect();
        let cluster = Self {
            runtime,
            replicas,
            _dir: dir,
        };
        cluster.until_every_replica("reaches Redis", "keygate_limit_backend_up", |v| v == 1.0);
        cluster
    }

    fn replica(&self, i: usize) -> &Replica {
        self.replicas[i].as_ref().expect("replica was killed")
    }

    /// SIGKILL, as an OOM kill or a node failure ends a replica.
    fn kill(&mut self, i: usize) {
        drop(self.replicas[i].take());
    }

    fn send(&self, i: usize, req: http::Request<http_body_util::Full<Bytes>>) -> Reply {
        self.runtime.block_on(send(self.replica(i).addr(), req))
    }

    /// The status of a request to replica `i`, whose response is then dropped unread: what
    /// a streaming upstream sends may never end.
    fn status(&self, i: usize, req: http::Request<http_body_util::Full<Bytes>>) -> StatusCode {
        self.runtime
            .block_on(open(self.replica(i).addr(), req))
            .status()
    }

    fn metric(&self, i: usize, series: &str) -> f64 {
        let text = self
            .runtime
            .block_on(send(self.replica(i).admin, get("/metrics", &[])))
            .text();
        sample(&text, series)
    }

    /// Waits until `series` satisfies `check` on every live replica, or panics at the
    /// deadline.
    fn until_every_replica(&self, what: &str, series: &str, check: impl Fn(f64) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        for i in (0..REPLICAS).filter(|&i| self.replicas[i].is_some()) {
            while !check(self.metric(i, series)) {
                assert!(Instant::now() < deadline, "replica {i} never {what}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Every live replica decided everything through Redis so far.
    fn assert_no_fallbacks(&self) {
        for i in (0..REPLICAS).filter(|&i| self.replicas[i].is_some()) {
            let fallbacks = self.metric(i, "keygate_limit_fallbacks_total");
            assert_eq!(fallbacks, 0.0, "replica {i} decided without Redis");
        }
    }

    /// `n` keyed requests, round robin over the live replicas: how many were admitted, and
    /// how long the burst took. Every answer is 200 or 429 with `Retry-After`.
    fn burst(&self, n: usize) -> (usize, Duration) {
        let live: Vec<usize> = (0..REPLICAS)
            .filter(|&i| self.replicas[i].is_some())
            .collect();
        let started = Instant::now();
        let mut admitted = 0;
        for i in live.iter().cycle().take(n) {
            let reply = self.send(*i, models());
            match reply.status {
                StatusCode::OK => admitted += 1,
                StatusCode::TOO_MANY_REQUESTS => {
                    assert_eq!(reply.json()["error"]["code"], "rate_limit_exceeded");
                    assert!(reply.headers.contains_key("retry-after"));
                }
                other => panic!("replica {i} answered {other}: {}", reply.text()),
            }
        }
        (admitted, started.elapsed())
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn models() -> http::Request<http_body_util::Full<Bytes>> {
    get("/v1/models", &[("authorization", &bearer(KEY))])
}

fn chat() -> http::Request<http_body_util::Full<Bytes>> {
    request(
        Method::POST,
        "/v1/chat/completions",
        &[("authorization", &bearer(KEY))],
        r#"{"stream":true}"#,
    )
}

/// The most a bucket of `rpm` admits in a burst that took `span`: its capacity, and what
/// refilled meanwhile.
fn most_admitted(rpm: u32, span: Duration) -> usize {
    rpm as usize + (span.as_secs_f64() * f64::from(rpm) / 60.0).ceil() as usize
}

/// Three replicas of a config with `key`, sharing `redis`. Streams the test holds open stay
/// silent for longer than the base config's idle timeout.
fn config(upstream: SocketAddr, redis: &RedisServer, key: Key) -> TestConfig {
    TestConfig::new(upstream)
        .idle_timeout(Duration::from_secs(60))
        .admin()
        .keys([key])
        .redis(&redis.url())
        .redis_timeout(GENEROUS)
}

#[test]
fn three_replicas_share_one_requests_per_minute() {
    const RPM: u32 = 6;
    let rt = runtime();
    let upstream = rt.block_on(start_upstream());
    let redis = rt.block_on(RedisServer::start());
    let key = Key::env("default", "API_KEY").requests_per_minute(RPM);
    let cluster = Cluster::start(rt, config(upstream.addr, &redis, key));
    let remaining: Vec<String> = (0..REPLICAS)
        .map(|i| {
            let reply = cluster.send(i, models());
            assert_eq!(reply.status, StatusCode::OK);
            reply.headers["x-ratelimit-remaining-requests"]
                .to_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(remaining, ["5", "4", "3"], "one count for all three");
    let (admitted, span) = cluster.burst(10 * REPLICAS);
    let admitted = admitted + REPLICAS;
    assert!(
        admitted >= RPM as usize && admitted <= most_admitted(RPM, span),
        "{admitted} admitted by three replicas sharing {RPM} per minute, in {span:?}"
    );
    assert_eq!(upstream.requests().len(), admitted);
    cluster.assert_no_fallbacks();
}

#[test]
fn max_concurrent_holds_across_replicas() {
    let rt = runtime();
    let (upstream, mut senders) = rt.block_on(start_streaming_upstream());
    let redis = rt.block_on(RedisServer::start());
    let key = Key::env("default", "API_KEY").max_concurrent(2);
    let cluster = Cluster::start(rt, config(upstream.addr, &redis, key));
    let open_stream = |i: usize| {
        cluster
            .runtime
            .block_on(open(cluster.replica(i).addr(), chat()))
    };
    let first = open_stream(0);
    let second = open_stream(1);
    assert_eq!(
        (first.status(), second.status()),
        (StatusCode::OK, StatusCode::OK)
    );
    let _held = cluster
        .runtime
        .block_on(async { (senders.recv().await.unwrap(), senders.recv().await.unwrap()) });
    for i in 0..REPLICAS {
        let response = cluster
            .runtime
            .block_on(open(cluster.replica(i).addr(), chat()));
        assert_eq!(
            response.status(),
            StatusCode::TOO_MANY_REQUESTS,
            "replica {i}"
        );
        let busy = cluster.runtime.block_on(read_reply(response));
        assert_eq!(busy.json()["error"]["code"], "concurrency_limit_exceeded");
        assert_eq!(busy.headers["retry-after"], "1");
    }
    assert_eq!(
        cluster.metric(0, r#"keygate_key_requests_in_flight{key="default"}"#),
        1.0,
        "each replica counts the slots it holds"
    );
    // The client of the first stream hangs up: its slot is free for any replica.
    drop(first);
    let deadline = Instant::now() + DEADLINE;
    loop {
        let status = cluster.status(2, chat());
        if status == StatusCode::OK {
            break;
        }
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert!(
            Instant::now() < deadline,
            "the released slot never came back"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    cluster.assert_no_fallbacks();
    drop(second);
}

#[test]
fn a_replica_killed_while_holding_slots_gives_them_back_after_its_lease() {
    let rt = runtime();
    let (upstream, mut senders) = rt.block_on(start_streaming_upstream());
    let redis = rt.block_on(RedisServer::start());
    let key = Key::env("default", "API_KEY").max_concurrent(3);
    let lease = Duration::from_secs(3);
    let mut cluster = Cluster::start(rt, config(upstream.addr, &redis, key).slot_lease(lease));
    let open_stream = |cluster: &Cluster, i: usize| {
        cluster
            .runtime
            .block_on(open(cluster.replica(i).addr(), chat()))
    };
    // Two slots on the replica that will die, one on a survivor, which keeps renewing the
    // key's leases: the dead replica's must lapse one by one.
    let streams: Vec<_> = [0, 0, 1].map(|i| open_stream(&cluster, i)).into();
    assert!(streams.iter().all(|s| s.status() == StatusCode::OK));
    let mut held: Vec<_> = (0..3)
        .map(|_| cluster.runtime.block_on(senders.recv()).unwrap())
        .collect();
    cluster.assert_no_fallbacks();
    // Renewed every third of the lease: still held after more than a lease's time.
    let held_since = Instant::now();
    while held_since.elapsed() < lease + Duration::from_secs(1) {
        assert_eq!(cluster.status(2, chat()), StatusCode::TOO_MANY_REQUESTS);
        std::thread::sleep(Duration::from_millis(200));
    }

    cluster.kill(0);
    // Both slots come back: two more streams open at once on the third replica.
    let mut reopened = Vec::new();
    while reopened.len() < 2 {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let response = open_stream(&cluster, 2);
            if response.status() == StatusCode::OK {
                reopened.push(response);
                held.push(cluster.runtime.block_on(senders.recv()).unwrap());
                break;
            }
            assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
            assert!(
                Instant::now() < deadline,
                "the dead replica's slots never came back"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for i in [1, 2] {
        assert_eq!(
            cluster.status(i, chat()),
            StatusCode::TOO_MANY_REQUESTS,
            "still three slots in all"
        );
    }
    cluster.assert_no_fallbacks();
    drop((streams, reopened));
}

#[test]
fn a_hung_then_dead_redis_costs_each_request_at_most_the_timeout_and_a_restarted_one_shares_again()
{
    const RPM: u32 = 6;
    let rt = runtime();
    let upstream = rt.block_on(start_upstream());
    let mut redis = rt.block_on(RedisServer::start());
    let key = Key::env("default", "API_KEY").requests_per_minute(RPM);
    let config = config(upstream.addr, &redis, key).redis_timeout(OUTAGE_TIMEOUT);
    let cluster = Cluster::start(rt, config);
    for i in 0..REPLICAS {
        assert_eq!(cluster.send(i, models()).status, StatusCode::OK);
    }
    // Each replica used 1 of 6 through Redis; alone, each goes on from what it used.
    let answer_alone = |phase: &str| {
        for i in 0..REPLICAS {
            let started = Instant::now();
            let reply = cluster.send(i, models());
            let took = started.elapsed();
            assert!(took < ANSWER_BOUND, "{phase}: replica {i} took {took:?}");
            assert_eq!(reply.status, StatusCode::OK, "{phase}: replica {i}");
        }
    };
    redis.freeze();
    answer_alone("Redis hung");
    cluster.until_every_replica("noticed the hung Redis", "keygate_limit_backend_up", |v| {
        v == 0.0
    });
    redis.kill();
    answer_alone("Redis dead");
    answer_alone("Redis still dead");
    for i in 0..REPLICAS {
        assert!(cluster.metric(i, "keygate_limit_fallbacks_total") >= 3.0);
        assert!(cluster.metric(i, "keygate_limit_backend_errors_total") >= 1.0);
    }

    cluster.runtime.block_on(redis.restart());
    cluster.until_every_replica("reached Redis again", "keygate_limit_backend_up", |v| {
        v == 1.0
    });
    // The restarted Redis is empty: one limit for all three again, from zero.
    let (admitted, span) = cluster.burst(10 * REPLICAS);
    assert!(
        admitted >= RPM as usize && admitted <= most_admitted(RPM, span),
        "{admitted} admitted by three replicas sharing {RPM} per minute, in {span:?}"
    );
}
