//! Per-key limits: `max_concurrent` caps a key's requests and streams in flight
//! (429 with `Retry-After` beyond it, the slot freed when a stream ends or its client hangs
//! up), and `not_after` retires a key, refused exactly like an invalid one and warned of
//! ahead of time.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::StatusCode;
use keygate::Clock;
use support::process::{Running, TempDir, ENV};
use support::*;

/// The test config with an admin listener and the keys `key` and `ci`.
fn with_default_key(upstream: std::net::SocketAddr, key: Key) -> String {
    TestConfig::new(upstream)
        .admin()
        .keys([key, Key::env("ci", "CI_KEY")])
        .text()
}

#[tokio::test]
async fn max_concurrent_caps_parallel_streams_and_a_hangup_frees_the_slot() {
    let (upstream, mut senders) = start_streaming_upstream().await;
    let key = Key::env("default", "API_KEY").max_concurrent(2);
    let proxy = start_proxy_with(&with_default_key(upstream.addr, key)).await;
    let (first, _first_sender) = stream_first_event(proxy.addr, &mut senders).await;
    let (second, _second_sender) = stream_first_event(proxy.addr, &mut senders).await;
    let text = wait_for_sample(
        &proxy,
        r#"keygate_key_requests_in_flight{key="default"}"#,
        2.0,
    )
    .await;
    assert_eq!(
        sample(&text, r#"keygate_key_requests_in_flight{key="default"}"#),
        2.0
    );

    let over = send(proxy.addr, stream_chat(KEY)).await;
    assert_eq!(over.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(over.headers["retry-after"], "1");
    let error = &over.json()["error"];
    assert_eq!(error["type"], "rate_limit_error");
    assert_eq!(error["code"], "concurrency_limit_exceeded");
    let h2 = send_h2(proxy.addr, stream_chat(KEY)).await;
    assert_eq!(h2.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        upstream.requests().len(),
        2,
        "refused requests are not forwarded"
    );

    let other = open(proxy.addr, stream_chat(CI_KEY)).await;
    assert_eq!(
        other.status(),
        StatusCode::OK,
        "another key has its own slots"
    );
    drop(other);

    // The client of the first stream hangs up mid-stream: its slot comes back.
    drop(first);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let third = loop {
        let response = open(proxy.addr, stream_chat(KEY)).await;
        if response.status() == StatusCode::OK {
            break response;
        }
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot of a hung-up stream was never freed"
        );
        tokio::task::yield_now().await;
    };
    let refused = sample(
        &scrape(&proxy).await,
        r#"keygate_key_refusals_total{key="default",reason="concurrency_limit"}"#,
    );
    assert!(refused >= 2.0, "{refused}");
    drop((second, third));
    wait_for_sample(
        &proxy,
        r#"keygate_requests_total{key="default",method="POST",status="429"}"#,
        2.0,
    )
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn a_finished_request_frees_its_slot() {
    let upstream = start_upstream().await;
    let key = Key::env("default", "API_KEY").max_concurrent(1);
    let proxy = start_proxy_with(&with_default_key(upstream.addr, key)).await;
    for _ in 0..5 {
        let reply = send(
            proxy.addr,
            get("/v1/models", &[("authorization", &bearer(KEY))]),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    proxy.stop().await;
}

/// A clock the test moves by hand, in seconds since the Unix epoch.
fn test_clock(start: &str) -> (Clock, Arc<AtomicU64>) {
    let secs = humantime::parse_rfc3339(start)
        .unwrap()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let now = Arc::new(AtomicU64::new(secs));
    let shared = now.clone();
    let clock = Clock::new(move || {
        SystemTime::UNIX_EPOCH + Duration::from_secs(shared.load(Ordering::SeqCst))
    });
    (clock, now)
}

#[tokio::test]
async fn an_expired_key_is_refused_exactly_like_an_invalid_one() {
    let upstream = start_upstream().await;
    let expiry = humantime::parse_rfc3339("2030-01-01T00:00:00Z").unwrap();
    let key = Key::env("default", "API_KEY").not_after(expiry);
    let config = parse_config(&with_default_key(upstream.addr, key));
    let (clock, now) = test_clock("2029-12-31T23:59:58Z");
    let proxy = start_proxy_clocked(config, clock).await;
    let models = |key: &str| get("/v1/models", &[("authorization", &bearer(key))]);
    assert_eq!(send(proxy.addr, models(KEY)).await.status, StatusCode::OK);

    now.fetch_add(2, Ordering::SeqCst);
    let expired = send(proxy.addr, models(KEY)).await;
    let invalid = send(proxy.addr, models("kg-never-issued-key-000000000")).await;
    assert_eq!(expired.status, StatusCode::UNAUTHORIZED);
    assert_eq!(expired.status, invalid.status);
    assert_eq!(expired.body, invalid.body);
    assert_eq!(
        expired.headers["www-authenticate"],
        invalid.headers["www-authenticate"]
    );
    assert_eq!(
        send(proxy.addr, models(CI_KEY)).await.status,
        StatusCode::OK,
        "other keys are not affected"
    );
    assert_eq!(upstream.requests().len(), 2);
    let text = wait_for_sample(
        &proxy,
        r#"keygate_key_refusals_total{key="default",reason="expired"}"#,
        1.0,
    )
    .await;
    assert_eq!(
        sample(&text, r#"keygate_auth_failures_total{reason="expired"}"#),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            r#"keygate_key_not_after_timestamp_seconds{key="default"}"#
        ),
        1_893_456_000.0
    );
    proxy.stop().await;
}

#[test]
fn keys_near_or_past_their_expiry_are_warned_of_at_start_up() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(start_upstream());
    let in_three_days = SystemTime::now() + Duration::from_secs(3 * 24 * 3600);
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let text = TestConfig::new(upstream.addr)
        .keys([
            Key::env("default", "API_KEY").not_after(in_three_days),
            Key::env("ci", "CI_KEY").not_after(an_hour_ago),
        ])
        .log_level("info")
        .text();
    let dir = TempDir::new("expiry");
    let path = dir.write("keygate.toml", &text);
    let mut keygate = Running::start(&path, &ENV);
    let soon = keygate.wait_for_line("API key expires soon");
    assert!(
        soon.contains(r#""key":"default""#) && soon.contains(r#""level":"WARN""#),
        "{soon}"
    );
    let past = keygate.wait_for_line("API key expired");
    assert!(past.contains(r#""key":"ci""#), "{past}");
    let status = |key: &str| {
        runtime.block_on(send(
            keygate.addr,
            get("/v1/models", &[("authorization", &bearer(key))]),
        ))
    };
    assert_eq!(status(KEY).status, StatusCode::OK);
    assert_eq!(status(CI_KEY).status, StatusCode::UNAUTHORIZED);
    let (exit, output) = keygate.terminate();
    assert!(exit.success(), "{output}");
    assert_eq!(
        output.matches("API key expires soon").count(),
        1,
        "warned once: {output}"
    );
    let refused = output
        .lines()
        .find(|l| l.contains(r#""target":"keygate::access""#) && l.contains(r#""status":401"#))
        .unwrap_or_else(|| panic!("no access line for the refusal:\n{output}"));
    assert!(
        refused.contains(r#""key":"ci""#) && refused.contains(r#""outcome":"key_expired""#),
        "{refused}"
    );
}

#[tokio::test]
async fn a_reloaded_key_keeps_its_scope_and_its_slots() {
    const OLD: &str = "kg-limits-old-file-key-0123456789";
    const NEW: &str = "kg-limits-new-file-key-0123456789";
    let (upstream, mut senders) = start_streaming_upstream().await;
    let dir = TempDir::new("limits-reload");
    let file = dir.write("key", OLD);
    let key = Key::file("default", &file)
        .max_concurrent(1)
        .allow(&[], "/v1/chat/");
    let proxy = start_proxy_with(&with_default_key(upstream.addr, key)).await;
    let held = open(proxy.addr, stream_chat(OLD)).await;
    assert_eq!(held.status(), StatusCode::OK);
    let _held_sender = senders.recv().await.unwrap();

    dir.write("key", NEW);
    proxy.reload();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let status = send(proxy.addr, stream_chat(NEW)).await.status;
        if status != StatusCode::UNAUTHORIZED {
            assert_eq!(
                status,
                StatusCode::TOO_MANY_REQUESTS,
                "the new value shares the slot the old one holds"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never reloaded");
        tokio::task::yield_now().await;
    }
    let models = send(
        proxy.addr,
        get("/v1/models", &[("authorization", &bearer(NEW))]),
    )
    .await;
    assert_eq!(models.status, StatusCode::FORBIDDEN, "the scope is kept");
    drop(held);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while open(proxy.addr, stream_chat(NEW)).await.status() != StatusCode::OK {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot never came back"
        );
        tokio::task::yield_now().await;
    }
    proxy.stop().await;
}
