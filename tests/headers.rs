//! Header rules: what the upstream receives and what the client gets back.

mod support;

use http::StatusCode;
use support::*;

async fn forwarded(headers: &[(&str, &str)]) -> Seen {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let mut all = vec![("authorization", bearer(KEY))];
    all.extend(headers.iter().map(|(n, v)| (*n, v.to_string())));
    let borrowed: Vec<(&str, &str)> = all.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let reply = send(proxy.addr, get("/v1/models", &borrowed)).await;
    assert_eq!(reply.status, StatusCode::OK);
    let seen = upstream.wait_for_requests(1).await.remove(0);
    proxy.stop().await;
    seen
}

fn values<'a>(seen: &'a Seen, name: &str) -> Vec<&'a str> {
    seen.headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect()
}

#[tokio::test]
async fn injected_and_identity_headers_are_set_exactly_once() {
    let seen = forwarded(&[]).await;
    assert_eq!(values(&seen, "x-shared-secret"), [SHARED_SECRET]);
    assert_eq!(
        values(&seen, "x-upstream-token"),
        [format!("Bearer {UPSTREAM_TOKEN}")]
    );
    assert_eq!(values(&seen, "x-keygate-key"), ["default"]);
}

#[tokio::test]
async fn client_credentials_never_reach_the_upstream() {
    let seen = forwarded(&[]).await;
    assert!(!seen.headers.contains_key("authorization"));
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    send(proxy.addr, get("/v1/models", &[("x-api-key", KEY)])).await;
    let seen = upstream.wait_for_requests(1).await;
    assert!(!seen[0].headers.contains_key("x-api-key"));
    proxy.stop().await;
}

#[tokio::test]
async fn forward_authorization_passes_the_client_header_when_enabled() {
    let upstream = start_upstream().await;
    let text = TestConfig::new(upstream.addr)
        .forward_authorization()
        .text();
    let proxy = start_proxy_with(&text).await;
    send(
        proxy.addr,
        get("/v1/models", &[("authorization", &bearer(KEY))]),
    )
    .await;
    let seen = upstream.wait_for_requests(1).await;
    assert_eq!(seen[0].headers["authorization"], bearer(KEY));
    proxy.stop().await;
}

#[tokio::test]
async fn forged_identity_and_injected_headers_are_replaced_including_underscore_aliases() {
    let seen = forwarded(&[
        ("x-shared-secret", "forged"),
        ("x-keygate-key", "admin"),
        ("x_shared_secret", "forged-underscore"),
        ("X_Keygate_Key", "admin-underscore"),
        ("x-upstream-token", "forged"),
    ])
    .await;
    assert_eq!(values(&seen, "x-shared-secret"), [SHARED_SECRET]);
    assert_eq!(values(&seen, "x-keygate-key"), ["default"]);
    assert_eq!(
        values(&seen, "x-upstream-token"),
        [format!("Bearer {UPSTREAM_TOKEN}")]
    );
    assert!(!seen.headers.contains_key("x_shared_secret"));
    assert!(!seen.headers.contains_key("x_keygate_key"));
}

#[tokio::test]
async fn hop_by_hop_headers_and_those_connection_names_are_removed() {
    let seen = forwarded(&[
        ("connection", "keep-alive, x-hop-secret"),
        ("x-hop-secret", "1"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("te", "trailers"),
        ("upgrade", "h2c"),
        ("proxy-authorization", "Basic eA=="),
        ("x-kept", "yes"),
    ])
    .await;
    for gone in [
        "x-hop-secret",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
        "proxy-authorization",
    ] {
        assert!(
            !seen.headers.contains_key(gone),
            "{gone} reached the upstream"
        );
    }
    assert_eq!(values(&seen, "x-kept"), ["yes"]);
}

#[tokio::test]
async fn upgrade_h2c_is_never_honoured() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let request = format!(
        "GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    );
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
        .await
        .unwrap();
    let mut head = vec![0u8; 12];
    tokio::time::timeout(
        DEADLINE,
        tokio::io::AsyncReadExt::read_exact(&mut stream, &mut head),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let seen = upstream.wait_for_requests(1).await;
    assert!(!seen[0].headers.contains_key("upgrade"));
    assert!(!seen[0].headers.contains_key("http2-settings"));
    proxy.stop().await;
}

#[tokio::test]
async fn forwarding_headers_from_an_untrusted_client_are_replaced() {
    let seen = forwarded(&[
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "evil.example"),
        ("forwarded", "for=6.6.6.6"),
        ("x_forwarded_for", "6.6.6.6"),
    ])
    .await;
    assert_eq!(values(&seen, "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(values(&seen, "x-forwarded-proto"), ["http"]);
    assert_eq!(values(&seen, "x-forwarded-host"), ["keygate.test"]);
    assert!(!seen.headers.contains_key("forwarded"));
    assert!(!seen.headers.contains_key("x_forwarded_for"));
}

#[tokio::test]
async fn forwarding_headers_from_a_trusted_proxy_are_extended() {
    let upstream = start_upstream().await;
    let text = TestConfig::new(upstream.addr)
        .trusted_proxies(&["127.0.0.0/8"])
        .text();
    let proxy = start_proxy_with(&text).await;
    let headers = [
        ("authorization", bearer(KEY)),
        ("x-forwarded-for", "203.0.113.9".to_owned()),
        ("x-forwarded-proto", "https".to_owned()),
        ("x-forwarded-host", "api.example".to_owned()),
    ];
    let borrowed: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    send(proxy.addr, get("/v1/models", &borrowed)).await;
    let seen = upstream.wait_for_requests(1).await.remove(0);
    assert_eq!(values(&seen, "x-forwarded-for"), ["203.0.113.9, 127.0.0.1"]);
    assert_eq!(values(&seen, "x-forwarded-proto"), ["https"]);
    assert_eq!(values(&seen, "x-forwarded-host"), ["api.example"]);
    proxy.stop().await;
}

#[tokio::test]
async fn host_is_the_upstream_authority() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    send(
        proxy.addr,
        get("/v1/models", &[("authorization", &bearer(KEY))]),
    )
    .await;
    let seen = upstream.wait_for_requests(1).await;
    assert_eq!(seen[0].headers["host"], upstream.addr.to_string());
    proxy.stop().await;
}

#[tokio::test]
async fn request_id_is_kept_when_sane_generated_otherwise_and_returned() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let auth = bearer(KEY);
    let reply = send(
        proxy.addr,
        get(
            "/v1/models",
            &[("authorization", &auth), ("x-request-id", "trace-42")],
        ),
    )
    .await;
    assert_eq!(reply.headers["x-request-id"], "trace-42");
    let reply = send(
        proxy.addr,
        get(
            "/v1/models",
            &[("authorization", &auth), ("x-request-id", "bad id\"")],
        ),
    )
    .await;
    let generated = reply.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(generated.len(), 32);
    let seen = upstream.wait_for_requests(2).await;
    assert_eq!(seen[0].headers["x-request-id"], "trace-42");
    assert_eq!(seen[1].headers["x-request-id"], generated.as_str());
    proxy.stop().await;
}

#[tokio::test]
async fn request_trailers_are_dropped() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\nTrailer: x-shared-secret\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\nx-shared-secret: forged\r\n\r\n"
    );
    let (status, text) = raw(proxy.addr, request.as_bytes()).await;
    assert_eq!(status, 200, "{text}");
    let seen = upstream.wait_for_requests(1).await;
    assert_eq!(seen[0].body, "hello");
    assert_eq!(values(&seen[0], "x-shared-secret"), [SHARED_SECRET]);
    assert!(!seen[0].headers.contains_key("trailer"));
    proxy.stop().await;
}

#[tokio::test]
async fn response_loses_hop_by_hop_and_injected_headers() {
    let upstream = start_upstream_with(|seen| {
        let mut response = fixed(StatusCode::OK, "ok");
        let h = response.headers_mut();
        h.insert("x-shared-secret", seen.headers["x-shared-secret"].clone());
        h.insert("x_shared_secret", seen.headers["x-shared-secret"].clone());
        h.insert("x-upstream-token", seen.headers["x-upstream-token"].clone());
        h.insert("connection", http::HeaderValue::from_static("x-internal"));
        h.insert("x-internal", http::HeaderValue::from_static("1"));
        h.insert("keep-alive", http::HeaderValue::from_static("timeout=5"));
        h.insert("x-model", http::HeaderValue::from_static("m"));
        response
    })
    .await;
    let proxy = start_proxy(upstream.addr).await;
    let reply = send(
        proxy.addr,
        get("/v1/models", &[("authorization", &bearer(KEY))]),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    for gone in [
        "x-shared-secret",
        "x_shared_secret",
        "x-upstream-token",
        "x-internal",
        "keep-alive",
    ] {
        assert!(
            !reply.headers.contains_key(gone),
            "{gone} reached the client"
        );
    }
    assert_eq!(reply.headers["x-model"], "m");
    proxy.stop().await;
}
