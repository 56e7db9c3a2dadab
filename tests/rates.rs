//! Per-key rates through the proxy: `requests_per_minute` admits a burst and then answers 429
//! `rate_limit_exceeded` with `Retry-After`; OpenAI's `x-ratelimit-*` headers are on every
//! response to a key with a rate; `tokens_per_minute` admits while the budget lasts; and with
//! `[limits] redis` the rates are shared by every keygate on that Redis, or, with Redis away,
//! decided by `on_redis_error`.
//!
//! Rates are chosen so that nothing refills within a test's span: one request every 20 s or
//! slower.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::BodyExt;
use support::redis_server::RedisServer;
use support::*;

fn models(key: &str) -> http::Request<http_body_util::Full<Bytes>> {
    get("/v1/models", &[("authorization", &bearer(key))])
}

/// A chat request declaring a body over `max_request_body` (1 MiB): keygate answers it 413
/// itself, after admission, without reaching the upstream.
fn over_max_request_body(key: &str) -> http::Request<http_body_util::Full<Bytes>> {
    request(
        Method::POST,
        "/v1/chat/completions",
        &[
            ("authorization", &bearer(key)),
            ("content-length", "2000000"),
        ],
        "",
    )
}

/// The test config with an admin listener and the keys `key` and `ci` (no limits).
fn with_key(upstream: SocketAddr, key: Key) -> TestConfig {
    TestConfig::new(upstream)
        .admin()
        .keys([key, Key::env("ci", "CI_KEY")])
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} in {headers:?}"))
        .to_str()
        .unwrap()
}

/// A duration as Go writes it ("20ms", "19.998s", "1m12s", "1h0m0s"), as OpenAI's
/// `x-ratelimit-reset-*` headers carry it.
fn go_duration(text: &str) -> Duration {
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or_else(|| panic!("no unit in {text:?}"));
        let number: f64 = rest[..number_end].parse().unwrap();
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            unit => panic!("unit {unit:?} in {text:?}"),
        };
        total += Duration::from_secs_f64(number * seconds);
        rest = &rest[unit_end..];
    }
    total
}

/// The names of the `x-ratelimit-*` headers, sorted.
fn rate_headers(headers: &HeaderMap) -> Vec<&str> {
    let mut names: Vec<&str> = headers
        .keys()
        .map(http::HeaderName::as_str)
        .filter(|n| n.starts_with("x-ratelimit-"))
        .collect();
    names.sort_unstable();
    names
}

#[tokio::test]
async fn a_burst_of_requests_per_minute_then_429_with_retry_after_and_the_headers() {
    let upstream = start_upstream().await;
    let key = Key::env("default", "API_KEY").requests_per_minute(3);
    let proxy = start_proxy_with(&with_key(upstream.addr, key).text()).await;
    let started = Instant::now();
    let mut resets = Vec::new();
    for remaining in ["2", "1", "0"] {
        let reply = send(proxy.addr, models(KEY)).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(header(&reply.headers, "x-ratelimit-limit-requests"), "3");
        assert_eq!(
            header(&reply.headers, "x-ratelimit-remaining-requests"),
            remaining
        );
        resets.push(go_duration(header(
            &reply.headers,
            "x-ratelimit-reset-requests",
        )));
        assert!(
            !rate_headers(&reply.headers)
                .iter()
                .any(|n| n.ends_with("-tokens")),
            "a key without tokens_per_minute gets no token headers: {:?}",
            reply.headers
        );
    }
    // Until full again: one request refills every 20 s.
    for (i, reset) in resets.iter().enumerate() {
        let full = Duration::from_secs(20 * (i as u64 + 1));
        assert!(
            *reset <= full && *reset > full - Duration::from_secs(5),
            "{resets:?}"
        );
    }

    let refused = send(proxy.addr, models(KEY)).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    let error = &refused.json()["error"];
    assert_eq!(error["type"], "rate_limit_error");
    assert_eq!(error["code"], "rate_limit_exceeded");
    let retry: u64 = header(&refused.headers, "retry-after").parse().unwrap();
    let waited = started.elapsed().as_secs();
    assert!(
        retry <= 20 && retry + waited >= 20,
        "Retry-After {retry} after {waited} s"
    );
    assert_eq!(
        header(&refused.headers, "x-ratelimit-remaining-requests"),
        "0"
    );
    assert_eq!(header(&refused.headers, "x-ratelimit-limit-requests"), "3");
    let h2 = send_h2(proxy.addr, models(KEY)).await;
    assert_eq!(h2.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        upstream.requests().len(),
        3,
        "refused requests are not forwarded"
    );

    let other = send(proxy.addr, models(CI_KEY)).await;
    assert_eq!(
        other.status,
        StatusCode::OK,
        "another key has its own rates"
    );
    assert!(
        rate_headers(&other.headers).is_empty(),
        "{:?}",
        other.headers
    );
    wait_for_sample(
        &proxy,
        r#"keygate_key_refusals_total{key="default",reason="rate_limit"}"#,
        2.0,
    )
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn the_headers_are_on_every_response_to_the_key_whoever_answers_it() {
    let upstream = start_upstream_with(|seen| {
        let mut response = if seen.uri.starts_with("/missing") {
            fixed(StatusCode::NOT_FOUND, "not here")
        } else {
            fixed(StatusCode::OK, "ok")
        };
        // An origin's own rate headers would contradict keygate's.
        response.headers_mut().insert(
            "x-ratelimit-limit-requests",
            http::HeaderValue::from_static("9999"),
        );
        response
    })
    .await;
    let key = Key::env("default", "API_KEY")
        .requests_per_minute(100)
        .tokens_per_minute(1000);
    let proxy = start_proxy_with(&with_key(upstream.addr, key).text()).await;
    let expect_all = |headers: &HeaderMap, requests_left: &str| {
        assert_eq!(header(headers, "x-ratelimit-limit-requests"), "100");
        assert_eq!(
            header(headers, "x-ratelimit-remaining-requests"),
            requests_left
        );
        assert_eq!(header(headers, "x-ratelimit-limit-tokens"), "1000");
        assert_eq!(header(headers, "x-ratelimit-remaining-tokens"), "1000");
        assert_eq!(header(headers, "x-ratelimit-reset-tokens"), "0s");
        assert!(go_duration(header(headers, "x-ratelimit-reset-requests")) > Duration::ZERO);
        assert_eq!(rate_headers(headers).len(), 6, "{headers:?}");
        assert_eq!(
            headers.get_all("x-ratelimit-limit-requests").iter().count(),
            1
        );
    };
    let ok = send(proxy.addr, models(KEY)).await;
    assert_eq!(ok.status, StatusCode::OK);
    expect_all(&ok.headers, "99");
    let missing = send(
        proxy.addr,
        get("/missing", &[("authorization", &bearer(KEY))]),
    )
    .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    expect_all(&missing.headers, "98");
    // keygate's own answer after admission: a body over max_request_body (1 MiB).
    let too_large = send(proxy.addr, over_max_request_body(KEY)).await;
    assert_eq!(too_large.status, StatusCode::PAYLOAD_TOO_LARGE);
    expect_all(&too_large.headers, "97");
    let unlimited = send(proxy.addr, models(CI_KEY)).await;
    assert_eq!(
        header(&unlimited.headers, "x-ratelimit-limit-requests"),
        "9999",
        "a key without rates gets what the origin sent"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn tokens_per_minute_admits_while_the_budget_lasts() {
    let upstream = start_upstream().await;
    let key = Key::env("default", "API_KEY").tokens_per_minute(50);
    let proxy = start_proxy_with(&with_key(upstream.addr, key).text()).await;
    // The origin reports no usage, so nothing is charged: the budget is never spent.
    for _ in 0..5 {
        let reply = send(proxy.addr, models(KEY)).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(header(&reply.headers, "x-ratelimit-limit-tokens"), "50");
        assert_eq!(header(&reply.headers, "x-ratelimit-remaining-tokens"), "50");
        assert_eq!(
            rate_headers(&reply.headers),
            [
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens"
            ]
        );
    }
    proxy.stop().await;
}

/// The whole token loop: usage read from the response, charged when it ends, the key
/// refused until the debt is paid back.
#[tokio::test]
async fn a_response_that_crosses_the_token_budget_is_charged_in_full_and_the_key_waits() {
    let upstream = start_upstream_with(|_| {
        let mut response = fixed(
            StatusCode::OK,
            r#"{"object":"chat.completion","choices":[],"usage":{"prompt_tokens":70,"completion_tokens":50,"total_tokens":120}}"#,
        );
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        response
    })
    .await;
    let key = Key::env("default", "API_KEY").tokens_per_minute(100);
    let proxy = start_proxy_with(&with_key(upstream.addr, key).text()).await;
    let chat = || {
        request(
            Method::POST,
            "/v1/chat/completions",
            &[("authorization", &bearer(KEY))],
            r#"{"model":"m","messages":[]}"#,
        )
    };
    let first = send(proxy.addr, chat()).await;
    assert_eq!(
        first.status,
        StatusCode::OK,
        "admitted while budget is left"
    );
    assert_eq!(
        header(&first.headers, "x-ratelimit-remaining-tokens"),
        "100"
    );
    let refused = send(proxy.addr, chat()).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        header(&refused.headers, "x-ratelimit-remaining-tokens"),
        "0"
    );
    // 120 charged against 100: 21 tokens to refill at 100 per minute, 12.6 s.
    let retry: u64 = header(&refused.headers, "retry-after").parse().unwrap();
    assert!((12..=13).contains(&retry), "Retry-After {retry}");
    let reset = go_duration(header(&refused.headers, "x-ratelimit-reset-tokens"));
    assert!(
        reset <= Duration::from_secs(72) && reset > Duration::from_secs(60),
        "{reset:?}"
    );
    assert_eq!(upstream.requests().len(), 1);
    proxy.stop().await;
}

/// A stream its client hangs up on before the usage event is charged one token per event
/// it carried, so cancelling near the end does not make generation free.
#[tokio::test]
async fn a_stream_cut_before_its_usage_is_charged_for_the_events_streamed() {
    const STREAMED: usize = 40;
    let (upstream, mut senders) = start_streaming_upstream().await;
    let key = Key::env("default", "API_KEY").tokens_per_minute(60);
    let proxy = start_proxy_with(&with_key(upstream.addr, key).text()).await;
    let chat = request(
        Method::POST,
        "/v1/chat/completions",
        &[("authorization", &bearer(KEY))],
        r#"{"model":"m","stream":true,"messages":[]}"#,
    );
    let mut response = open(proxy.addr, chat).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut sender = tokio::time::timeout(DEADLINE, senders.recv())
        .await
        .unwrap()
        .unwrap();
    let event = "data: {\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n";
    for _ in 0..STREAMED {
        sender
            .send_data(Bytes::from_static(event.as_bytes()))
            .await
            .unwrap();
    }
    let mut received = 0;
    while received < STREAMED * event.len() {
        let frame = tokio::time::timeout(DEADLINE, response.body_mut().frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        received += frame.data_ref().map_or(0, Bytes::len);
    }
    drop(response);
    // 40 charged against 60 leaves 20, refilled at one per second: the budget stays under 45
    // for at least 25 s after the charge. Uncharged, it stays at 60. The probe is a request
    // keygate answers itself after admission (413), since this upstream only streams.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let reply = send(proxy.addr, over_max_request_body(KEY)).await;
        assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
        let left: u64 = header(&reply.headers, "x-ratelimit-remaining-tokens")
            .parse()
            .unwrap();
        if left <= 45 {
            break;
        }
        assert!(Instant::now() < deadline, "nothing charged: {left} left");
        tokio::task::yield_now().await;
    }
    drop(sender);
    proxy.stop().await;
}

#[tokio::test]
async fn two_keygates_on_one_redis_share_a_keys_rate() {
    let redis = RedisServer::start().await;
    let upstream = start_upstream().await;
    let key = Key::env("default", "API_KEY").requests_per_minute(4);
    // Generous, so that a loaded machine does not turn this into a fallback test.
    let config = with_key(upstream.addr, key)
        .redis(&redis.url())
        .redis_timeout(Duration::from_secs(1));
    let a = start_proxy_with(&config.text()).await;
    let b = start_proxy_with(&config.text()).await;
    for proxy in [&a, &b] {
        wait_for_sample(proxy, "keygate_limit_backend_up", 1.0).await;
    }
    let mut remaining = Vec::new();
    for proxy in [&a, &b, &a, &b] {
        let reply = send(proxy.addr, models(KEY)).await;
        assert_eq!(reply.status, StatusCode::OK);
        remaining.push(header(&reply.headers, "x-ratelimit-remaining-requests").to_owned());
    }
    assert_eq!(remaining, ["3", "2", "1", "0"]);
    for proxy in [&a, &b] {
        let refused = send(proxy.addr, models(KEY)).await;
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    }
    let text = scrape(&a).await;
    assert_eq!(
        sample(&text, "keygate_limit_fallbacks_total"),
        0.0,
        "{text}"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn with_redis_away_deny_answers_503_and_local_decides_alone() {
    let nowhere = closed_port();
    let upstream = start_upstream().await;
    let key = Key::env("default", "API_KEY")
        .requests_per_minute(100)
        .max_concurrent(4);
    let url = format!("redis://{}/0", nowhere.addr);
    let deny = start_proxy_with(
        &with_key(upstream.addr, key.clone())
            .redis(&url)
            .on_redis_error("deny")
            .text(),
    )
    .await;
    let refused = send(deny.addr, models(KEY)).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header(&refused.headers, "retry-after"), "1");
    let error = &refused.json()["error"];
    assert_eq!(error["type"], "server_error");
    assert_eq!(error["code"], "limits_unavailable");
    assert!(
        rate_headers(&refused.headers).is_empty(),
        "no numbers to report"
    );
    assert_eq!(
        send(deny.addr, models(CI_KEY)).await.status,
        StatusCode::OK,
        "a key without limits never needs Redis"
    );
    assert_eq!(
        send(deny.addr, get("/health", &[])).await.status,
        StatusCode::OK,
        "the probe never needs Redis"
    );
    let text = wait_for_sample(
        &deny,
        r#"keygate_key_refusals_total{key="default",reason="limits_unavailable"}"#,
        1.0,
    )
    .await;
    assert_eq!(sample(&text, "keygate_limit_backend_up"), 0.0, "{text}");
    assert!(
        sample(&text, "keygate_limit_backend_errors_total") >= 1.0,
        "{text}"
    );
    deny.stop().await;

    let local = start_proxy_with(&with_key(upstream.addr, key).redis(&url).text()).await;
    let reply = send(local.addr, models(KEY)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        header(&reply.headers, "x-ratelimit-remaining-requests"),
        "99",
        "this process's own count"
    );
    let text = wait_for_sample(&local, "keygate_limit_fallbacks_total", 2.0).await;
    assert_eq!(sample(&text, "keygate_limit_backend_up"), 0.0, "{text}");
    local.stop().await;
}
