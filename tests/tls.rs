//! TLS on the listener: ALPN, authentication over TLS, refusal of plaintext and old
//! versions, the handshake timeout, certificate reload, the redirect listener, https
//! upstreams, and what `keygate check` says about the certificate.

mod support;

use http::{Method, StatusCode};
use support::process::{run_to_end, Running, TempDir, ENV};
use support::tls::{
    connect, https_upstream_config, send_tls, start_tls_proxy, start_tls_upstream, Ca, SeenOverTls,
};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const H2: &[u8] = b"h2";
const H1: &[u8] = b"http/1.1";

#[tokio::test]
async fn alpn_offers_h2_and_http1_and_both_carry_requests() {
    let upstream = start_upstream().await;
    let (ca, dir) = (Ca::new(), TempDir::new("tls-alpn"));
    let proxy = start_tls_proxy(&ca, &dir, TestConfig::new(upstream.addr)).await;
    let auth = bearer(KEY);
    for (offer, chosen) in [
        (&[H2, H1][..], Some(H2)),
        (&[H1][..], Some(H1)),
        (&[][..], None),
    ] {
        let got = send_tls(
            proxy.addr,
            &ca.pem(),
            offer,
            get("/v1/models", &[("authorization", &auth)]),
        )
        .await;
        assert_eq!(got.alpn.as_deref(), chosen);
        assert_eq!(got.reply.status, StatusCode::OK, "ALPN {chosen:?}");
    }
    let seen = upstream.wait_for_requests(3).await;
    for request in &seen {
        assert_eq!(request.headers["x-forwarded-proto"], "https");
        assert_eq!(request.headers["x-shared-secret"], SHARED_SECRET);
    }
    proxy.stop().await;
}

#[tokio::test]
async fn a_keyless_request_over_tls_gets_401() {
    let upstream = start_upstream().await;
    let (ca, dir) = (Ca::new(), TempDir::new("tls-401"));
    let proxy = start_tls_proxy(&ca, &dir, TestConfig::new(upstream.addr)).await;
    for alpn in [H2, H1] {
        let got = send_tls(proxy.addr, &ca.pem(), &[alpn], get("/v1/models", &[])).await;
        assert_eq!(got.reply.status, StatusCode::UNAUTHORIZED);
        assert_eq!(got.reply.json()["error"]["code"], "invalid_api_key");
    }
    let wrong = send_tls(
        proxy.addr,
        &ca.pem(),
        &[H2],
        get(
            "/v1/models",
            &[("authorization", "Bearer not-a-key-at-all-000")],
        ),
    )
    .await;
    assert_eq!(wrong.reply.status, StatusCode::UNAUTHORIZED);
    assert!(upstream.requests().is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn plaintext_http_on_the_tls_port_gets_no_http_answer() {
    let upstream = start_upstream().await;
    let (ca, dir) = (Ca::new(), TempDir::new("tls-plain"));
    let proxy = start_tls_proxy(&ca, &dir, TestConfig::new(upstream.addr)).await;
    for request in [
        format!("GET /v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\n\r\n"),
        "GET /health HTTP/1.1\r\nhost: x\r\n\r\n".to_owned(),
        "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_owned(),
    ] {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let answer = read_to_close(&mut stream).await;
        assert!(
            !answer.starts_with(b"HTTP/"),
            "plaintext was answered: {:?}",
            String::from_utf8_lossy(&answer)
        );
    }
    assert!(
        upstream.requests().is_empty(),
        "plaintext reached the upstream"
    );
    proxy.stop().await;
}

/// A TLS 1.1 ClientHello, by hand (no TLS library here will send one): record and handshake
/// version 3.2, one RSA cipher suite, no extensions.
fn tls11_client_hello() -> Vec<u8> {
    let mut hello = vec![0x03, 0x02];
    hello.extend([0x42; 32]);
    hello.extend([0x00, 0x00, 0x02, 0x00, 0x2f, 0x01, 0x00]);
    let mut handshake = vec![0x01, 0x00, 0x00, hello.len() as u8];
    handshake.extend(hello);
    let mut record = vec![0x16, 0x03, 0x02, 0x00, handshake.len() as u8];
    record.extend(handshake);
    record
}

#[tokio::test]
async fn tls_1_1_and_older_are_refused() {
    let upstream = start_upstream().await;
    let (ca, dir) = (Ca::new(), TempDir::new("tls-old"));
    let proxy = start_tls_proxy(&ca, &dir, TestConfig::new(upstream.addr)).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(&tls11_client_hello()).await.unwrap();
    let answer = read_to_close(&mut stream).await;
    // An alert record (content type 21), never a ServerHello (a handshake record, 22).
    assert_eq!(answer.first(), Some(&0x15), "{answer:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn a_stalled_handshake_is_cut_at_header_read_timeout_and_counted() {
    let upstream = start_upstream().await;
    let (ca, dir) = (Ca::new(), TempDir::new("tls-stall"));
    let proxy = start_tls_proxy(&ca, &dir, TestConfig::new(upstream.addr).admin()).await;
    let mut silent = TcpStream::connect(proxy.addr).await.unwrap();
    let mut partial = TcpStream::connect(proxy.addr).await.unwrap();
    partial
        .write_all(&tls11_client_hello()[..20])
        .await
        .unwrap();
    // header_read_timeout is 2 s in the test config; the deadline is well beyond it.
    assert!(read_to_close(&mut silent).await.is_empty());
    assert!(read_to_close(&mut partial).await.is_empty());
    let metrics = scrape(&proxy).await;
    assert!(
        metrics.contains(r#"keygate_tls_handshake_failures_total{reason="timeout"} 2"#),
        "{metrics}"
    );
    assert!(metrics.contains("keygate_tls_certificate_expiry_timestamp_seconds "));
    proxy.stop().await;
}

#[tokio::test]
async fn a_reload_serves_the_new_certificate_on_the_next_handshake_and_keeps_open_connections() {
    let upstream = start_upstream().await;
    let (ca, dir) = (Ca::new(), TempDir::new("tls-reload"));
    let first = ca.issue(30);
    let files = first.install(&dir);
    let proxy = start_proxy_with(&TestConfig::new(upstream.addr).tls(files).text()).await;
    let auth = bearer(KEY);
    let before = send_tls(proxy.addr, &ca.pem(), &[H1], get("/health", &[])).await;
    assert_eq!(before.server_cert, first.der);
    // A connection opened before the reload, used again after it.
    let open = connect(proxy.addr, &ca.pem(), &[H1]).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(open))
            .await
            .unwrap();
    tokio::spawn(conn);

    let second = ca.issue(60);
    second.install(&dir);
    proxy.reload();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let now = send_tls(proxy.addr, &ca.pem(), &[H1], get("/health", &[])).await;
        if now.server_cert == second.der {
            break;
        }
        assert_eq!(now.server_cert, first.der, "neither certificate was served");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::task::yield_now().await;
    }
    let reused = sender
        .send_request(get("/v1/models", &[("authorization", &auth)]))
        .await
        .unwrap();
    assert_eq!(reused.status(), StatusCode::OK);
    proxy.stop().await;
}

#[tokio::test]
async fn a_bad_certificate_file_keeps_the_certificate_in_force() {
    let upstream = start_upstream().await;
    let (ca, dir) = (Ca::new(), TempDir::new("tls-bad-reload"));
    let first = ca.issue(30);
    let files = first.install(&dir);
    let proxy = start_proxy_with(&TestConfig::new(upstream.addr).admin().tls(files).text()).await;
    dir.write(
        "cert.pem",
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n",
    );
    proxy.reload();
    wait_for_sample(
        &proxy,
        r#"keygate_config_reloads_total{outcome="failure"}"#,
        1.0,
    )
    .await;
    let after = send_tls(proxy.addr, &ca.pem(), &[H2], get("/health", &[])).await;
    assert_eq!(after.server_cert, first.der);
    assert_eq!(after.reply.status, StatusCode::OK);
    proxy.stop().await;
}

#[tokio::test]
async fn the_redirect_listener_answers_308_to_the_https_url_and_forwards_nothing() {
    let upstream = start_upstream().await;
    let (ca, dir) = (Ca::new(), TempDir::new("tls-redirect"));
    let config = TestConfig::new(upstream.addr)
        .redirect_http_listen()
        .redirect_https_port(8443);
    let proxy = start_tls_proxy(&ca, &dir, config).await;
    let plain = proxy.redirect.unwrap();
    let auth = bearer(KEY);
    for (method, path) in [
        ("GET", "/v1/models?limit=2"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/health"),
    ] {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: api.example.com:8080\r\nauthorization: {auth}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
        let (status, text) = raw(plain, head.as_bytes()).await;
        assert_eq!(status, 308, "{path}: {text}");
        let location = format!("location: https://api.example.com:8443{path}\r\n");
        assert!(text.contains(&location), "{text}");
    }
    let (status, _) = raw(plain, b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n").await;
    assert_eq!(status, 400, "a request without a host cannot be redirected");
    let (status, _) = raw(
        plain,
        b"GET / HTTP/1.1\r\nhost: user@evil.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        upstream.requests().is_empty(),
        "the plain listener forwarded a request"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn the_redirect_listener_answers_the_probe_only_when_configured() {
    let upstream = start_upstream().await;
    let (ca, dir) = (Ca::new(), TempDir::new("tls-redirect-probe"));
    let config = TestConfig::new(upstream.addr)
        .redirect_http_listen()
        .redirect_serves_probe();
    let proxy = start_tls_proxy(&ca, &dir, config).await;
    let plain = proxy.redirect.unwrap();
    let probe = send(plain, get("/health", &[])).await;
    assert_eq!(probe.status, StatusCode::OK);
    assert_eq!(probe.body, "ok");
    let seen = upstream.wait_for_requests(1).await;
    assert_eq!(seen[0].headers["x-forwarded-proto"], "http");
    for path in ["/health/", "/v1/models", "/docs"] {
        let reply = send(plain, get(path, &[])).await;
        assert_eq!(reply.status, StatusCode::PERMANENT_REDIRECT, "{path}");
    }
    let post = send(plain, request(Method::POST, "/health", &[], "")).await;
    assert_eq!(post.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(upstream.requests().len(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn an_https_upstream_signed_by_the_ca_file_gets_sni_host_and_injected_headers() {
    let (ca, dir) = (Ca::new(), TempDir::new("tls-upstream"));
    let (upstream, seen) = start_tls_upstream(&ca.issue(30)).await;
    let ca_file = dir.write("upstream-ca.pem", &ca.pem());
    let proxy =
        start_proxy_with(&https_upstream_config(upstream.port(), "localhost", "", &ca_file).text())
            .await;
    let auth = bearer(KEY);
    let reply = send(proxy.addr, get("/v1/models", &[("authorization", &auth)])).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, "secure");
    let seen: Vec<SeenOverTls> = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].sni.as_deref(), Some("localhost"));
    assert_eq!(
        seen[0].headers["host"],
        format!("localhost:{}", upstream.port()).as_str()
    );
    assert_eq!(seen[0].headers["x-shared-secret"], SHARED_SECRET);
    proxy.stop().await;
}

#[test]
fn an_untrusted_https_upstream_gets_502_and_a_log_line_that_says_why() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (ca, stranger, dir) = (Ca::new(), Ca::new(), TempDir::new("tls-untrusted"));
    let (upstream, seen) = runtime.block_on(start_tls_upstream(&stranger.issue(30)));
    let ca_file = dir.write("upstream-ca.pem", &ca.pem());
    let text = https_upstream_config(upstream.port(), "localhost", "", &ca_file)
        .log_level("info")
        .text();
    let config = dir.write("keygate.toml", &text);
    let mut running = Running::start(&config, &ENV);
    let auth = bearer(KEY);
    let reply = runtime.block_on(send(
        running.addr,
        get("/v1/models", &[("authorization", &auth)]),
    ));
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    let line = running.wait_for_line("upstream_unreachable");
    assert!(
        line.contains("invalid peer certificate: UnknownIssuer"),
        "{line}"
    );
    assert!(seen.lock().unwrap().is_empty());
    let (status, _) = running.terminate();
    assert!(status.success());
}

#[test]
fn check_names_the_certificate_and_when_it_expires() {
    let (ca, dir) = (Ca::new(), TempDir::new("tls-check"));
    let files = ca.issue(23).install(&dir);
    let text = TestConfig::new("127.0.0.1:8000".parse().unwrap())
        .tls(files)
        .text();
    let config = dir.write("keygate.toml", &text);
    let (status, stdout, stderr) =
        run_to_end(&["check", "--config", config.to_str().unwrap()], &ENV);
    assert!(status.success(), "{stderr}");
    assert!(
        stdout.contains("cert.pem: expires in 22 days")
            || stdout.contains("cert.pem: expires in 23 days"),
        "{stdout}"
    );
}

#[test]
fn check_refuses_a_key_that_does_not_fit_the_certificate() {
    let (ca, dir) = (Ca::new(), TempDir::new("tls-mismatch"));
    let files = ca.issue(30).install(&dir);
    dir.write("key.pem", &ca.issue(30).key_pem);
    let text = TestConfig::new("127.0.0.1:8000".parse().unwrap())
        .tls(files)
        .text();
    let config = dir.write("keygate.toml", &text);
    let (status, _, stderr) = run_to_end(&["check", "--config", config.to_str().unwrap()], &ENV);
    assert_eq!(status.code(), Some(2));
    assert!(
        stderr.contains("[server] tls_key:") && stderr.contains("does not fit"),
        "{stderr}"
    );
    assert!(!stderr.contains("PRIVATE KEY-----\n"), "{stderr}");
}

#[tokio::test]
async fn h2c_prior_knowledge_is_not_spoken_on_the_tls_port() {
    let upstream = start_upstream().await;
    let (ca, dir) = (Ca::new(), TempDir::new("tls-h2c"));
    let proxy = start_tls_proxy(&ca, &dir, TestConfig::new(upstream.addr)).await;
    let attempt = tokio::time::timeout(DEADLINE, async {
        let stream = TcpStream::connect(proxy.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await?;
        tokio::spawn(conn);
        sender
            .send_request(get("http://localhost/health", &[]))
            .await
    })
    .await
    .expect("the attempt ends within the deadline");
    assert!(attempt.is_err(), "h2c was answered on the TLS port");
    proxy.stop().await;
}
