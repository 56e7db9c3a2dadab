//! CORS: with `[cors] allow_origins` set, keygate answers preflights
//! itself, never forwarding them, and marks responses to allowed origins.

mod support;

use http::{Method, StatusCode};
use support::*;

const CORS: &str = "\n[cors]\nallow_origins = [\"https://app.example\"]\n";

fn preflight(origin: &str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    request(
        Method::OPTIONS,
        "/v1/chat/completions",
        &[
            ("origin", origin),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization, content-type",
            ),
        ],
        "",
    )
}

#[tokio::test]
async fn preflight_from_an_allowed_origin_is_answered_by_keygate() {
    let upstream = start_upstream().await;
    let proxy = start_proxy_with(&config_text(upstream.addr, CORS)).await;
    let reply = send(proxy.addr, preflight("https://app.example")).await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert_eq!(
        reply.headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(
        reply.headers["access-control-allow-headers"],
        "authorization, content-type"
    );
    assert!(reply.headers["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));
    assert!(
        upstream.requests().is_empty(),
        "a preflight never reaches the upstream"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn preflight_from_another_origin_is_403_and_not_forwarded() {
    let upstream = start_upstream().await;
    let proxy = start_proxy_with(&config_text(upstream.addr, CORS)).await;
    let reply = send(proxy.addr, preflight("https://evil.example")).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    assert_eq!(reply.json()["error"]["code"], "origin_not_allowed");
    assert!(!reply.headers.contains_key("access-control-allow-origin"));
    assert!(upstream.requests().is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn responses_to_an_allowed_origin_carry_the_allow_origin_header() {
    let upstream = start_upstream_with(|_| {
        let mut response = fixed(StatusCode::OK, "ok");
        response.headers_mut().insert(
            "access-control-allow-origin",
            http::HeaderValue::from_static("*"),
        );
        response
    })
    .await;
    let proxy = start_proxy_with(&config_text(upstream.addr, CORS)).await;
    let auth = bearer(KEY);
    let ok = send(
        proxy.addr,
        get(
            "/v1/models",
            &[("authorization", &auth), ("origin", "https://app.example")],
        ),
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(
        ok.headers["access-control-allow-origin"], "https://app.example",
        "keygate's value replaces the upstream's"
    );
    let refused = send(
        proxy.addr,
        get("/v1/models", &[("origin", "https://app.example")]),
    )
    .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        refused.headers["access-control-allow-origin"], "https://app.example",
        "browser code can read the 401"
    );
    let other = send(
        proxy.addr,
        get(
            "/v1/models",
            &[("authorization", &auth), ("origin", "https://evil.example")],
        ),
    )
    .await;
    assert_eq!(other.status, StatusCode::OK);
    assert!(
        !other.headers.contains_key("access-control-allow-origin"),
        "the upstream's * does not leak through"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn browser_code_can_read_the_request_id_and_the_rate_limit_headers() {
    let upstream = start_upstream().await;
    let key = Key::env("default", "API_KEY").requests_per_minute(1);
    let config = TestConfig::new(upstream.addr).keys([key]).tables(CORS);
    let proxy = start_proxy_with(&config.text()).await;
    let auth = bearer(KEY);
    let browser = [
        ("authorization", auth.as_str()),
        ("origin", "https://app.example"),
    ];
    let admitted = send(proxy.addr, get("/v1/models", &browser)).await;
    let refused = send(proxy.addr, get("/v1/models", &browser)).await;
    assert_eq!(admitted.status, StatusCode::OK);
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    for reply in [&admitted, &refused] {
        let exposed: Vec<&str> = reply.headers["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .split(", ")
            .collect();
        let mut needed = vec!["x-request-id", "x-ratelimit-remaining-requests"];
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            needed.push("retry-after");
        }
        for name in needed {
            assert!(reply.headers.contains_key(name), "{name} sent: {reply:?}");
            assert!(exposed.contains(&name), "{name} exposed: {exposed:?}");
        }
    }
    proxy.stop().await;
}

#[tokio::test]
async fn without_cors_a_preflight_is_an_ordinary_request_needing_a_key() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let reply = send(proxy.addr, preflight("https://app.example")).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(upstream.requests().is_empty());
    proxy.stop().await;
}
