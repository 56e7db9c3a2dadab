//! The "never" rules of the security model (README, "Security model"): one test per rule, named
//! after it, each trying the ways a client or a failure could break it.

mod support;

use http::{Method, StatusCode};
use http_body_util::BodyExt;
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

/// How a body reaches keygate.
#[derive(Debug, Clone, Copy)]
enum Delivery {
    /// One frame over HTTP/1.1.
    Whole,
    /// One byte per frame over HTTP/1.1.
    Bytes,
    /// Padded past the read-ahead and sent in 16 KiB frames, so keygate sends it on while
    /// it reads it.
    Long,
    /// One request over HTTP/2.
    H2,
    /// Padded, over HTTP/2.
    LongH2,
}

/// `body` with 200 KiB of padding in a leading member.
fn padded(body: &str) -> String {
    let (bom, rest) = match body.strip_prefix('\u{feff}') {
        Some(rest) => ("\u{feff}", rest),
        None => ("", body),
    };
    let rest = rest.strip_prefix('{').expect("an object");
    format!("{bom}{{\"pad\":\"{}\",{rest}", "x".repeat(200 * 1024))
}

/// Sends `body` as key `default`'s chat request: the status, or `None` when keygate answered
/// and closed the connection before the client could send the whole body and read the answer.
async fn send_body(
    addr: std::net::SocketAddr,
    body: &str,
    content_type: &str,
    how: Delivery,
) -> Option<StatusCode> {
    let body = match how {
        Delivery::Long | Delivery::LongH2 => padded(body),
        _ => body.to_owned(),
    };
    let chunks: Vec<bytes::Bytes> = match how {
        Delivery::Bytes => body
            .as_bytes()
            .chunks(1)
            .map(bytes::Bytes::copy_from_slice)
            .collect(),
        _ => body
            .as_bytes()
            .chunks(16 * 1024)
            .map(bytes::Bytes::copy_from_slice)
            .collect(),
    };
    let (mut tx, channel) = http_body_util::channel::Channel::<bytes::Bytes>::new(4);
    let req = http::Request::post("/v1/chat/completions")
        .header("host", "keygate.test")
        .header("authorization", bearer(KEY))
        .header("content-type", content_type)
        .body(channel)
        .unwrap();
    let feeding = tokio::spawn(async move {
        for chunk in chunks {
            if tx.send_data(chunk).await.is_err() {
                return;
            }
        }
    });
    let response = match how {
        Delivery::H2 | Delivery::LongH2 => Some(open_h2(addr, req).await),
        _ => {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let io = hyper_util::rt::TokioIo::new(stream);
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            tokio::time::timeout(DEADLINE, sender.send_request(req))
                .await
                .expect("an answer or a closed connection within the deadline")
                .ok()
        }
    };
    let status = response.as_ref().map(http::Response::status);
    if let Some(response) = response {
        let _ = tokio::time::timeout(DEADLINE, response.into_body().collect()).await;
    }
    feeding.await.unwrap();
    status
}

#[tokio::test]
async fn never_a_key_with_a_models_list_reaching_a_model_outside_it() {
    let upstream = start_upstream().await;
    let config = TestConfig::new(upstream.addr)
        .max_request_body("4MiB")
        .keys([Key::env("default", "API_KEY").models(&["Qwen/Qwen3-0.6B", "lora-*"])]);
    let proxy = start_proxy_with(&config.text()).await;
    let spellings = [
        r#"{"model":"secret-base"}"#,
        r#"{"mod\u0065l":"secret-base"}"#,
        r#"{"\u006d\u006f\u0064\u0065\u006c":"secret-base"}"#,
        r#"{"model":"secret\u002dbase"}"#,
        r#"{"model":"Qwen\/Qwen3-0.6B-secret"}"#,
        r#"{"model":"lora-a","model":"secret-base"}"#,
        r#"{"model":"secret-base","model":"lora-a"}"#,
        r#"{"model":"lora-a","mod\u0065l":"secret-base"}"#,
        r#"{"messages":[{"model":"lora-a"}],"model":"secret-base"}"#,
        r#"{"messages":[{"model":"lora-a"}]}"#,
        r#"{"model":"lora-a" , "x":1,"model" : "secret-base"}"#,
        r#"{"model":"LORA-a"}"#,
        r#"{"model":"lora-a\ud800"}"#,
        r#"{"model":["lora-a"]}"#,
        r#"{"model":"lora-a"}{"model":"secret-base"}"#,
        "\u{feff}{\"model\":\"secret-base\"}",
        "\u{feff}{\"model\":\"lora-a\",\"model\":\"secret-base\"}",
    ];
    let content_types = [
        "application/json",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ];
    let deliveries = [
        Delivery::Whole,
        Delivery::Bytes,
        Delivery::Long,
        Delivery::H2,
        Delivery::LongH2,
    ];
    for body in spellings {
        for content_type in content_types {
            for how in deliveries {
                let status = send_body(proxy.addr, body, content_type, how).await;
                // A long body refused before its end may find its connection closed.
                let cut_off = status.is_none() && matches!(how, Delivery::Long);
                assert!(
                    cut_off
                        || status == Some(StatusCode::NOT_FOUND)
                        || status == Some(StatusCode::BAD_REQUEST),
                    "{body} as {content_type}, {how:?}: {status:?}"
                );
            }
        }
    }
    // A multipart form naming an allowed model is refused too: its field is not read.
    let form = "--x\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nlora-a\r\n--x--\r\n";
    let status = send_body(
        proxy.addr,
        form,
        "multipart/form-data; boundary=x",
        Delivery::Whole,
    )
    .await;
    assert_eq!(status, Some(StatusCode::BAD_REQUEST));
    // Every upstream connection that saw the start of a long body was cut before its end.
    upstream
        .wait_until("every upstream connection closed", |u| {
            u.connections_closed() == u.connections_opened()
        })
        .await;
    assert!(
        upstream.connections_opened() > 0,
        "no body was sent on while read"
    );
    assert!(upstream.requests().is_empty(), "{:?}", upstream.requests());
    // The same key, the same ways, with an allowed model: it does reach the upstream.
    for how in deliveries {
        let status = send_body(proxy.addr, r#"{"model":"lora-a"}"#, "application/json", how).await;
        assert_eq!(status, Some(StatusCode::OK), "{how:?}");
    }
    assert_eq!(
        upstream.wait_for_requests(deliveries.len()).await.len(),
        deliveries.len()
    );
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
