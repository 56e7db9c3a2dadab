//! Authentication through the whole proxy: which credentials admit a request,
//! and what a refused client sees.

mod support;

use std::net::SocketAddr;

use http::{Method, StatusCode};
use keygate::{FAILURE_BURST, SLOWDOWN};
use support::*;

fn assert_refused(reply: &Reply, token_presented: bool) {
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    let challenge = reply.headers["www-authenticate"].to_str().unwrap();
    if token_presented {
        assert_eq!(
            challenge,
            r#"Bearer realm="keygate", error="invalid_token""#
        );
    } else {
        assert_eq!(challenge, r#"Bearer realm="keygate""#);
    }
    assert_eq!(reply.headers["content-type"], "application/json");
    let error = &reply.json()["error"];
    assert_eq!(error["type"], "authentication_error");
    assert_eq!(error["code"], "invalid_api_key");
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
}

#[tokio::test]
async fn valid_bearer_key_is_admitted_in_any_scheme_case() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let auth = format!("{scheme} {KEY}");
        let reply = send(proxy.addr, get("/v1/models", &[("authorization", &auth)])).await;
        assert_eq!(reply.status, StatusCode::OK, "{scheme}");
        assert_eq!(reply.text(), "ok");
    }
    assert_eq!(upstream.requests().len(), 3);
    proxy.stop().await;
}

#[tokio::test]
async fn x_api_key_header_is_admitted() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let reply = send(proxy.addr, get("/v1/models", &[("x-api-key", CI_KEY)])).await;
    assert_eq!(reply.status, StatusCode::OK);
    let seen = upstream.wait_for_requests(1).await;
    assert_eq!(seen[0].headers["x-keygate-key"], "ci");
    proxy.stop().await;
}

#[tokio::test]
async fn missing_key_is_401_with_challenge_and_openai_error() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let reply = send(proxy.addr, get("/v1/models", &[])).await;
    assert_refused(&reply, false);
    assert!(reply.headers.contains_key("x-request-id"));
    assert!(upstream.requests().is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn wrong_keys_are_401_invalid_token() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let shorter = &KEY[..KEY.len() - 1];
    let longer = format!("{KEY}x");
    for wrong in [
        "kg-random-wrong-key-000000000",
        shorter,
        &longer,
        &KEY.to_uppercase(),
    ] {
        let reply = send(
            proxy.addr,
            get("/v1/models", &[("authorization", &bearer(wrong))]),
        )
        .await;
        assert_refused(&reply, true);
        let reply = send(proxy.addr, get("/v1/models", &[("x-api-key", wrong)])).await;
        assert_refused(&reply, true);
    }
    assert!(upstream.requests().is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn malformed_and_doubled_credentials_are_401() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let good = bearer(KEY);
    let extra = format!("Bearer {KEY} extra");
    let cases: Vec<Vec<(&str, &str)>> = vec![
        vec![("authorization", "Basic a2V5OnNlY3JldA==")],
        vec![("authorization", "Bearer")],
        vec![("authorization", &extra)],
        vec![("authorization", &good), ("authorization", &good)],
        vec![("authorization", &good), ("x-api-key", KEY)],
        vec![("x-api-key", KEY), ("x-api-key", KEY)],
    ];
    for headers in &cases {
        let reply = send(proxy.addr, get("/v1/models", headers)).await;
        assert_refused(&reply, true);
    }
    assert!(upstream.requests().is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn trace_and_connect_are_405_on_every_path_even_with_a_key() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let good = bearer(KEY);
    for path in ["/health", "/v1/models", "/docs"] {
        let reply = send(
            proxy.addr,
            request(Method::TRACE, path, &[("authorization", &good)], ""),
        )
        .await;
        assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED, "{path}");
        assert_eq!(reply.json()["error"]["code"], "method_not_allowed");
    }
    let (status, _) = raw(
        proxy.addr,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 405);
    assert!(upstream.requests().is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn expect_continue_without_a_key_is_refused_before_the_body() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let (status, text) = raw(
        proxy.addr,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 401, "{text}");
    assert!(!text.contains("100 Continue"), "{text}");
    assert!(upstream.requests().is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn http2_prior_knowledge_requests_are_authenticated_too() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let reply = send_h2(proxy.addr, get("/v1/models", &[])).await;
    assert_refused(&reply, false);
    let reply = send_h2(
        proxy.addr,
        get("/v1/models", &[("authorization", &bearer(KEY))]),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let seen = upstream.wait_for_requests(1).await;
    assert_eq!(seen[0].headers["x-keygate-key"], "default");
    proxy.stop().await;
}

/// A GET of `/v1/models` from the client at `client` (behind the trusted proxy) presenting
/// `credential`, a header.
async fn from_client(addr: SocketAddr, client: String, credential: (&str, String)) -> Reply {
    let (name, value) = credential;
    let headers = [(name, value.as_str()), ("x-forwarded-for", client.as_str())];
    send(addr, get("/v1/models", &headers)).await
}

#[tokio::test]
async fn repeated_failures_from_one_client_are_slowed_without_affecting_others() {
    let upstream = start_upstream().await;
    // Behind a trusted load balancer, clients are told apart by X-Forwarded-For.
    let text = TestConfig::new(upstream.addr)
        .trusted_proxies(&["127.0.0.1"])
        .text();
    let proxy = start_proxy_with(&text).await;
    let addr = proxy.addr;
    let noisy = || "203.0.113.66".to_owned();
    let wrong = || ("authorization", bearer("kg-guessed-key-000000000000000"));
    for _ in 0..FAILURE_BURST {
        let reply = from_client(addr, noisy(), wrong()).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }
    // The burst refills while this runs, so the noisy client keeps failing, one refusal per
    // round, until one is held: it outruns the refill unless a round takes longer than a
    // refill does. A held refusal takes at least SLOWDOWN, however fast the machine is.
    // Each round a client not seen before, with a good key and then a wrong one, must be
    // answered while the noisy client's refusal is still pending.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    for round in 0u32.. {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refusal of the noisy client was held while others were answered ({round} rounds)"
        );
        let started = tokio::time::Instant::now();
        let slowed = tokio::spawn(from_client(addr, noisy(), wrong()));
        let [_, a, b, c] = round.to_be_bytes();
        let other = format!("10.{a}.{b}.{c}");
        let good = from_client(addr, other.clone(), ("authorization", bearer(KEY))).await;
        assert_eq!(good.status, StatusCode::OK);
        let other_wrong = ("x-api-key", "kg-other-wrong-key-0000000".to_owned());
        let other_wrong = from_client(addr, other, other_wrong).await;
        assert_eq!(other_wrong.status, StatusCode::UNAUTHORIZED);
        let others_first = !slowed.is_finished();
        assert_eq!(slowed.await.unwrap().status, StatusCode::UNAUTHORIZED);
        if others_first && started.elapsed() >= SLOWDOWN {
            break;
        }
    }
    proxy.stop().await;
}
