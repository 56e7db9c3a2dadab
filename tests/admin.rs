//! The admin listener: Prometheus metrics that move with the traffic, liveness and readiness,
//! on a port of its own.

mod support;

use http::{Method, StatusCode};
use support::*;

const ADMIN: &str = "\n[admin]\nlisten = \"127.0.0.1:9090\"\n";

#[tokio::test]
async fn metrics_count_requests_by_key_method_and_status() {
    let upstream = start_upstream().await;
    let proxy = start_proxy_with(&config_text(upstream.addr, ADMIN)).await;
    send(
        proxy.addr,
        get("/v1/models", &[("authorization", &bearer(KEY))]),
    )
    .await;
    send(proxy.addr, get("/v1/models", &[("x-api-key", CI_KEY)])).await;
    send(
        proxy.addr,
        request(
            Method::POST,
            "/v1/chat/completions",
            &[("x-api-key", CI_KEY)],
            "{}",
        ),
    )
    .await;
    send(proxy.addr, get("/v1/models", &[])).await;
    send(
        proxy.addr,
        get(
            "/v1/models",
            &[("authorization", &bearer("kg-wrong-key-00000000000"))],
        ),
    )
    .await;
    let text = scrape(&proxy).await;
    assert_eq!(
        sample(
            &text,
            r#"keygate_requests_total{key="default",method="GET",status="200"}"#
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"keygate_requests_total{key="ci",method="GET",status="200"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            r#"keygate_requests_total{key="ci",method="POST",status="200"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            r#"keygate_requests_total{key="-",method="GET",status="401"}"#
        ),
        2.0
    );
    assert_eq!(
        sample(&text, r#"keygate_auth_failures_total{reason="missing"}"#),
        1.0
    );
    assert_eq!(
        sample(&text, r#"keygate_auth_failures_total{reason="invalid"}"#),
        1.0
    );
    assert_eq!(sample(&text, "keygate_upstream_ttfb_seconds_count"), 3.0);
    assert_eq!(sample(&text, "keygate_request_duration_seconds_count"), 5.0);
    assert_eq!(sample(&text, "keygate_request_body_bytes_total"), 2.0);
    assert!(sample(&text, "keygate_response_body_bytes_total") > 0.0);
    assert_eq!(sample(&text, "keygate_requests_in_flight"), 0.0);
    assert!(text.contains("keygate_build_info{version="));
    proxy.stop().await;
}

#[tokio::test]
async fn in_flight_streams_and_connections_are_gauged() {
    let (upstream, mut senders) = start_streaming_upstream().await;
    let proxy = start_proxy_with(&config_text(upstream.addr, ADMIN)).await;
    let response = open(
        proxy.addr,
        get("/v1/stream", &[("authorization", &bearer(KEY))]),
    )
    .await;
    let sender = senders.recv().await.unwrap();
    let text = scrape(&proxy).await;
    assert_eq!(sample(&text, "keygate_requests_in_flight"), 1.0, "{text}");
    assert!(sample(&text, "keygate_connections") >= 1.0, "{text}");
    drop(sender);
    drop(response);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while sample(&scrape(&proxy).await, "keygate_requests_in_flight") != 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the finished stream leaves the gauge"
        );
        tokio::task::yield_now().await;
    }
    proxy.stop().await;
}

#[tokio::test]
async fn client_hangup_before_headers_is_logged_and_counted_once() {
    let (silent, mut events) = start_silent_upstream().await;
    let proxy = start_proxy_with(&config_text(silent, ADMIN)).await;
    hang_up_once_forwarded(proxy.addr, &mut events).await;
    wait_for_close(&mut events).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let text = scrape(&proxy).await;
        if sample(
            &text,
            r#"keygate_requests_total{key="default",method="GET",status="499"}"#,
        ) == 1.0
        {
            assert_eq!(sample(&text, "keygate_requests_in_flight"), 0.0);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the abandoned request is counted as 499:\n{text}"
        );
        tokio::task::yield_now().await;
    }
    proxy.stop().await;
}

#[tokio::test]
async fn livez_and_readyz_follow_the_process_and_the_upstream() {
    let upstream = closed_port();
    let proxy = start_proxy_with(&config_text(upstream.addr, ADMIN)).await;
    let admin = proxy.admin.unwrap();
    assert_eq!(send(admin, get("/livez", &[])).await.status, StatusCode::OK);
    assert_eq!(
        send(admin, get("/readyz", &[])).await.status,
        StatusCode::OK,
        "ready until the upstream fails"
    );
    send(proxy.addr, get("/health", &[])).await;
    assert_eq!(
        send(admin, get("/readyz", &[])).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let text = scrape(&proxy).await;
    assert_eq!(
        sample(&text, r#"keygate_upstream_errors_total{kind="refused"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(
        send(admin, get("/v1/models", &[])).await.status,
        StatusCode::NOT_FOUND,
        "the admin port proxies nothing"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn admin_endpoints_are_not_on_the_proxy_port() {
    let upstream = start_upstream().await;
    let proxy = start_proxy_with(&config_text(upstream.addr, ADMIN)).await;
    for path in ["/metrics", "/livez", "/readyz"] {
        assert_eq!(
            send(proxy.addr, get(path, &[])).await.status,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
    }
    assert!(upstream.requests().is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn readyz_recovers_when_the_upstream_comes_back_without_traffic() {
    // The upstream's port is closed at first, then an origin starts on it; no proxied request
    // arrives in between, yet readiness recovers.
    let upstream = closed_port();
    let proxy = start_proxy_with(&config_text(upstream.addr, ADMIN)).await;
    let admin = proxy.admin.unwrap();
    send(proxy.addr, get("/health", &[])).await;
    assert_eq!(
        send(admin, get("/readyz", &[])).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let listener = upstream.open();
    assert_eq!(
        send(admin, get("/readyz", &[])).await.status,
        StatusCode::OK
    );
    drop(listener);
    proxy.stop().await;
}
