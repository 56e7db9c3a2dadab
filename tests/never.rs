//! The "never" rules of the security model (README, "Security model"): one test per rule, named
//! after it, each trying the ways a client or a failure could break it.

mod support;

use http::{Method, StatusCode};
use support::process::{stalled_log_keygate, Running, StalledLog, TempDir, ENV};
use support::*;

const WRONG_TOKEN: &str = "kg-presented-wrong-token-31337";
const QUERY_SECRET: &str = "query-token-never-logged-555";

fn secret_values() -> [&'static str; 6] {
    [
        KEY,
        CI_KEY,
        SHARED_SECRET,
        UPSTREAM_TOKEN,
        WRONG_TOKEN,
        QUERY_SECRET,
    ]
}

#[test]
fn never_a_secret_value_in_a_log_line() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(start_upstream());
    let dir = TempDir::new("never-log");
    let config = TestConfig::new(upstream.addr).log_level("debug").text();
    let path = dir.write("keygate.toml", &config);
    let keygate = Running::start(&path, &ENV);
    let addr = keygate.addr;
    let near_miss = &KEY[..KEY.len() - 1];
    let query = format!("/v1/models?api_key={QUERY_SECRET}");
    runtime.block_on(async {
        send(addr, get("/v1/models", &[("authorization", &bearer(KEY))])).await;
        send(addr, get("/v1/models", &[("x-api-key", CI_KEY)])).await;
        send(
            addr,
            get("/v1/models", &[("authorization", &bearer(WRONG_TOKEN))]),
        )
        .await;
        send(
            addr,
            get("/v1/models", &[("authorization", &bearer(near_miss))]),
        )
        .await;
        send(
            addr,
            get(
                "/v1/models",
                &[("authorization", &bearer(KEY)), ("x-api-key", KEY)],
            ),
        )
        .await;
        send(addr, get(&query, &[("authorization", &bearer(KEY))])).await;
        send(addr, get(&query, &[])).await;
        send(
            addr,
            get(
                "/v1/models",
                &[
                    ("x-shared-secret", SHARED_SECRET),
                    ("authorization", &bearer(KEY)),
                ],
            ),
        )
        .await;
        send_h2(addr, get("/v1/models", &[("authorization", &bearer(KEY))])).await;
    });
    let (status, output) = keygate.terminate();
    assert!(status.success(), "{output}");
    let events: Vec<serde_json::Value> = output
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    let access: Vec<_> = events
        .iter()
        .filter(|e| e["target"] == "keygate::access")
        .collect();
    assert_eq!(access.len(), 9, "one access line per request:\n{output}");
    for line in &access {
        for field in [
            "timestamp",
            "method",
            "path",
            "status",
            "duration_ms",
            "upstream_ttfb_ms",
            "bytes",
            "key",
            "request_id",
            "client",
            "outcome",
        ] {
            assert!(line.get(field).is_some(), "{field} missing: {line}");
        }
        assert!(
            !line["path"].as_str().unwrap().contains('?'),
            "no query in the path: {line}"
        );
    }
    // Admitted with the default key: bearer, with a query, with a forged secret, over h2.
    assert_eq!(access.iter().filter(|l| l["key"] == "default").count(), 4);
    for secret in secret_values().iter().chain([&near_miss]) {
        assert!(
            !output.contains(secret),
            "a secret value was logged:\n{output}"
        );
    }
}

#[tokio::test]
async fn never_a_secret_value_in_an_error_body() {
    let upstream = closed_port();
    let proxy = start_proxy(upstream.addr).await;
    let near_miss = &KEY[..KEY.len() - 1];
    let replies = [
        send(
            proxy.addr,
            get("/v1/models", &[("authorization", &bearer(WRONG_TOKEN))]),
        )
        .await,
        send(proxy.addr, get("/v1/models", &[("x-api-key", near_miss)])).await,
        send(
            proxy.addr,
            get(
                "/v1/models",
                &[("authorization", &bearer(KEY)), ("x-api-key", WRONG_TOKEN)],
            ),
        )
        .await,
        send(proxy.addr, get(&format!("/v1/x?key={QUERY_SECRET}"), &[])).await,
        send(
            proxy.addr,
            get("/v1/models", &[("authorization", &bearer(KEY))]),
        )
        .await,
        send(
            proxy.addr,
            request(Method::TRACE, "/", &[("authorization", &bearer(KEY))], ""),
        )
        .await,
    ];
    for reply in &replies {
        let everything = format!("{:?}{}", reply.headers, reply.text());
        for secret in secret_values().iter().chain([&near_miss]) {
            assert!(!everything.contains(secret), "{everything}");
        }
        assert!(reply.json()["error"]["message"].is_string());
    }
    assert_eq!(replies[4].status, StatusCode::BAD_GATEWAY);
    proxy.stop().await;
}

#[test]
fn never_a_secret_value_in_debug_output() {
    let upstream: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let config = parse_config(&config_text(upstream, ""));
    let debug = format!("{config:?} {config:#?}");
    for secret in secret_values() {
        assert!(!debug.contains(secret), "{debug}");
    }
    // With TLS on, the private key is held too: neither its PEM text nor its bytes show.
    let dir = TempDir::new("never-debug-tls");
    let leaf = support::tls::Ca::new().issue(30);
    let files = leaf.install(&dir);
    let text = TestConfig::new(upstream).tls(files).text();
    let config = parse_config(&text);
    let debug = format!("{config:?} {config:#?}");
    assert!(debug.contains("not_after"), "{debug}");
    for line in leaf.key_pem.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!debug.contains(line), "{debug}");
    }
    assert!(
        !debug.contains("PrivateKey") && !debug.contains("SigningKey"),
        "{debug}"
    );
}

#[test]
fn never_a_secret_value_in_a_config_error() {
    let dir = TempDir::new("never-config");
    let path = dir.write(
        "bad.toml",
        "[auth]\nkeys = [{ name = \"short\", env = \"SHORT\" }]\n[[inject]]\nname = \"x-bad\"\nvalue = \"a${NL}b\"\n",
    );
    let (status, stdout, stderr) = support::process::run_to_end(
        &["check", "--config", path.to_str().unwrap()],
        &[("SHORT", "tiny-secret"), ("NL", "line\nbreak")],
    );
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("shorter than 16 bytes"), "{stderr}");
    assert!(stderr.contains("not allowed in a header"), "{stderr}");
    for secret in ["tiny-secret", "line\nbreak", "break"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{stderr}"
        );
    }
}

/// Every request the upstream received carries the configured injected values, exactly once.
fn assert_all_injected(seen: &[Seen]) {
    assert!(!seen.is_empty());
    for s in seen {
        let secret: Vec<_> = s.headers.get_all("x-shared-secret").iter().collect();
        let token: Vec<_> = s.headers.get_all("x-upstream-token").iter().collect();
        assert_eq!(secret, [SHARED_SECRET], "{} {}", s.method, s.uri);
        assert_eq!(
            token,
            [&format!("Bearer {UPSTREAM_TOKEN}")],
            "{} {}",
            s.method,
            s.uri
        );
    }
}

#[tokio::test]
async fn never_a_request_reaches_the_upstream_without_the_injected_headers() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let auth = bearer(KEY);
    send(proxy.addr, get("/health", &[])).await;
    send(proxy.addr, request(Method::HEAD, "/health", &[], "")).await;
    send(proxy.addr, get("/docs", &[])).await;
    send(proxy.addr, get("/v1/models", &[("authorization", &auth)])).await;
    send(
        proxy.addr,
        request(
            Method::POST,
            "/v1/chat/completions",
            &[("authorization", &auth)],
            "{}",
        ),
    )
    .await;
    send(
        proxy.addr,
        request(Method::DELETE, "/v1/files/1", &[("x-api-key", KEY)], ""),
    )
    .await;
    send_h2(proxy.addr, get("/v1/models", &[("authorization", &auth)])).await;
    send_h2(proxy.addr, get("/health", &[])).await;
    let chunked = format!("POST /v1/x HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n");
    raw(proxy.addr, chunked.as_bytes()).await;
    raw(proxy.addr, b"GET http://elsewhere.example/health HTTP/1.1\r\nHost: elsewhere.example\r\nConnection: close\r\n\r\n").await;
    let seen = upstream.wait_for_requests(10).await;
    assert_all_injected(&seen);
    proxy.stop().await;
}

#[tokio::test]
async fn never_a_request_reaches_the_upstream_with_a_client_chosen_injected_value() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let auth = bearer(KEY);
    let forgeries: [&[(&str, &str)]; 6] = [
        &[("x-shared-secret", "forged")],
        &[
            ("X-Shared-Secret", "forged"),
            ("x-shared-secret", "forged-2"),
        ],
        &[("x_shared_secret", "forged")],
        &[
            ("X_SHARED_SECRET", "forged"),
            ("x-upstream_token", "forged"),
        ],
        &[
            ("connection", "x-shared-secret"),
            ("x-shared-secret", "forged"),
        ],
        &[("x-upstream-token", "Bearer forged")],
    ];
    for forged in forgeries {
        let mut headers = vec![("authorization", auth.as_str())];
        headers.extend_from_slice(forged);
        send(proxy.addr, get("/v1/models", &headers)).await;
        send(proxy.addr, get("/health", forged)).await;
    }
    let trailer = format!("POST /v1/x HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\nx-shared-secret: forged\r\n\r\n");
    raw(proxy.addr, trailer.as_bytes()).await;
    let seen = upstream.wait_for_requests(13).await;
    assert_all_injected(&seen);
    for s in &seen {
        let all = format!("{:?}", s.headers);
        assert!(!all.contains("forged"), "{} {}: {all}", s.method, s.uri);
    }
    proxy.stop().await;
}

#[tokio::test]
async fn never_a_keyless_request_reaches_a_path_other_than_the_probe_and_public_paths() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let others = [
        "/",
        "/v1/models",
        "/v1/chat/completions",
        "/metrics",
        "/admin",
        "/v1/models?x=/health",
    ];
    let paths = LOOKALIKE_TARGETS.iter().chain(&others);
    let methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"];
    for path in paths {
        for method in methods {
            let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            raw(proxy.addr, req.as_bytes()).await;
        }
    }
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        for path in ["/health", "/docs"] {
            let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            raw(proxy.addr, req.as_bytes()).await;
        }
    }
    for bad_credential in [
        "Basic eDp5",
        "Bearer",
        "Bearer ",
        "bearer wrong-key-value-0000",
    ] {
        send(
            proxy.addr,
            get("/v1/models", &[("authorization", bad_credential)]),
        )
        .await;
        send_h2(
            proxy.addr,
            get("/v1/models", &[("authorization", bad_credential)]),
        )
        .await;
    }
    send_h2(proxy.addr, get("/v1/models", &[])).await;
    // The only key-less requests that may pass: GET/HEAD on the exact probe and public paths.
    send(proxy.addr, get("/health", &[])).await;
    let seen = upstream.wait_for_requests(1).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(
        (seen[0].method.as_str(), seen[0].uri.as_str()),
        ("GET", "/health")
    );
    proxy.stop().await;
}

#[tokio::test]
async fn never_a_secret_value_in_a_metric_label() {
    let upstream = start_upstream().await;
    let proxy = start_proxy_with(&config_text(
        upstream.addr,
        "\n[admin]\nlisten = \"127.0.0.1:9090\"\n",
    ))
    .await;
    let near_miss = &KEY[..KEY.len() - 1];
    send(
        proxy.addr,
        get("/v1/models", &[("authorization", &bearer(KEY))]),
    )
    .await;
    send(proxy.addr, get("/v1/models", &[("x-api-key", CI_KEY)])).await;
    send(
        proxy.addr,
        get("/v1/models", &[("authorization", &bearer(WRONG_TOKEN))]),
    )
    .await;
    send(proxy.addr, get("/v1/models", &[("x-api-key", near_miss)])).await;
    send(
        proxy.addr,
        get(
            &format!("/v1/models?key={QUERY_SECRET}"),
            &[("authorization", &bearer(KEY))],
        ),
    )
    .await;
    send(
        proxy.addr,
        get(
            &format!("/{QUERY_SECRET}"),
            &[("authorization", &bearer(KEY))],
        ),
    )
    .await;
    let text = send(proxy.admin.unwrap(), get("/metrics", &[]))
        .await
        .text();
    assert!(text.contains(r#"key="default""#), "{text}");
    for secret in secret_values().iter().chain([&near_miss]) {
        assert!(
            !text.contains(secret),
            "a secret value in the metrics:\n{text}"
        );
    }
    proxy.stop().await;
}

#[test]
fn never_request_handling_waiting_on_the_log() {
    let mut stalled = stalled_log_keygate("never-wait-log");
    let StalledLog {
        runtime, keygate, ..
    } = &mut stalled;
    let (addr, admin) = (keygate.addr, keygate.admin);
    runtime.block_on(async {
        flood_the_log(addr).await;
        let probe = tokio::time::timeout(DEADLINE, send(addr, get("/health", &[])))
            .await
            .expect("the probe is answered while the log is not read");
        assert_eq!(probe.status, StatusCode::OK);
        wait_for_dropped_log_lines(admin).await;
    });
    // No request is open, so the 5 s shutdown_grace is not used: the process exits once the
    // log has had its own, shorter, bound to be written.
    let status = keygate.terminate_within(DEADLINE);
    assert!(
        status.is_some_and(|s| s.success()),
        "keygate did not exit cleanly after SIGTERM with its log unread: {status:?}"
    );
}
