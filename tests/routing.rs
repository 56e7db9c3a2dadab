//! Routing: only GET and HEAD on exactly the probe and public paths are key-less;
//! the probe is forwarded; the upstream URL's path prefix is kept.

mod support;

use http::{Method, StatusCode};
use support::*;

#[tokio::test]
async fn probe_is_keyless_and_forwarded_to_the_upstream_health() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let reply = send(proxy.addr, get("/health", &[])).await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = send(proxy.addr, request(Method::HEAD, "/health?full=1", &[], "")).await;
    assert_eq!(reply.status, StatusCode::OK);
    let seen = upstream.wait_for_requests(2).await;
    assert_eq!(seen[0].uri, "/health");
    assert_eq!(seen[1].uri, "/health?full=1");
    assert!(!seen[0].headers.contains_key("x-keygate-key"));
    assert_eq!(seen[0].headers["x-shared-secret"], SHARED_SECRET);
    proxy.stop().await;
}

#[tokio::test]
async fn probe_follows_the_upstream_status() {
    let upstream = start_upstream_with(|_| fixed(StatusCode::SERVICE_UNAVAILABLE, "loading")).await;
    let proxy = start_proxy(upstream.addr).await;
    let reply = send(proxy.addr, get("/health", &[])).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    proxy.stop().await;
}

#[tokio::test]
async fn public_path_is_keyless_for_get_only() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    assert_eq!(
        send(proxy.addr, get("/docs", &[])).await.status,
        StatusCode::OK
    );
    let post = send(proxy.addr, request(Method::POST, "/docs", &[], "x")).await;
    assert_eq!(post.status, StatusCode::UNAUTHORIZED);
    assert_eq!(upstream.requests().len(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn lookalike_probe_paths_need_a_key() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let targets = LOOKALIKE_TARGETS.iter().chain(&["*"]);
    for target in targets {
        let req =
            format!("GET {target} HTTP/1.1\r\nHost: keygate.test\r\nConnection: close\r\n\r\n");
        let (status, text) = raw(proxy.addr, req.as_bytes()).await;
        assert!(status == 401 || status == 400, "{target}: {text}");
    }
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        let req = format!("{method} /health HTTP/1.1\r\nHost: keygate.test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        let (status, text) = raw(proxy.addr, req.as_bytes()).await;
        assert_eq!(status, 401, "{method}: {text}");
    }
    assert!(upstream.requests().is_empty(), "{:?}", upstream.requests());
    proxy.stop().await;
}

#[tokio::test]
async fn absolute_form_target_is_judged_by_its_path() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let (status, _) = raw(proxy.addr, b"GET http://other.example/health HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status, 200);
    let (status, _) = raw(proxy.addr, b"GET http://other.example/v1/models HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status, 401);
    let seen = upstream.wait_for_requests(1).await;
    assert_eq!(seen[0].uri, "/health");
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_path_prefix_is_kept_and_query_forwarded() {
    let upstream = start_upstream().await;
    let text = TestConfig::new(upstream.addr)
        .upstream_url(format!("http://{}/api/", upstream.addr))
        .text();
    let proxy = start_proxy_with(&text).await;
    let reply = send(
        proxy.addr,
        get(
            "/v1/models?limit=2&x=%2F",
            &[("authorization", &bearer(KEY))],
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let seen = upstream.wait_for_requests(1).await;
    assert_eq!(seen[0].uri, "/api/v1/models?limit=2&x=%2F");
    proxy.stop().await;
}
