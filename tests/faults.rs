//! Upstream and client faults answered with the right status and JSON error:
//! refused → 502, no response headers in time → 504, body over the limit → 413.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::process::{stalled_log_keygate, Running, StalledLog, TempDir, ENV};
use support::*;

fn assert_upstream_error(reply: &Reply, status: StatusCode) {
    assert_eq!(reply.status, status);
    assert_eq!(reply.headers["content-type"], "application/json");
    assert_eq!(reply.json()["error"]["type"], "upstream_error");
}

#[tokio::test]
async fn refused_upstream_is_502_json() {
    let upstream = closed_port();
    let proxy = start_proxy(upstream.addr).await;
    let reply = send(
        proxy.addr,
        get("/v1/models", &[("authorization", &bearer(KEY))]),
    )
    .await;
    assert_upstream_error(&reply, StatusCode::BAD_GATEWAY);
    let probe = send(proxy.addr, get("/health", &[])).await;
    assert_upstream_error(&probe, StatusCode::BAD_GATEWAY);
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_without_response_headers_in_time_is_504_json_and_closed() {
    let (silent, mut events) = start_silent_upstream().await;
    let text = TestConfig::new(silent)
        .response_timeout(Duration::from_millis(300))
        .text();
    let proxy = start_proxy_with(&text).await;
    let reply = send(
        proxy.addr,
        get("/v1/models", &[("authorization", &bearer(KEY))]),
    )
    .await;
    assert_upstream_error(&reply, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.json()["error"]["code"], "upstream_timeout");
    wait_for_close(&mut events).await;
    proxy.stop().await;
}

#[tokio::test]
async fn declared_body_over_the_limit_is_413_before_anything_is_forwarded() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        2 * 1024 * 1024
    );
    let (status, text) = raw(proxy.addr, request.as_bytes()).await;
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("request_too_large"), "{text}");
    assert!(upstream.requests().is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn oversized_body_without_a_key_is_401_not_413() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let (status, _) = raw(proxy.addr, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status, 401);
    proxy.stop().await;
}

#[tokio::test]
async fn streamed_body_growing_past_the_limit_is_cut_and_answered_413() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let (mut tx, req) = upload("/v1/files");
    tokio::spawn(async move {
        for _ in 0..40 {
            if tx
                .send_data(Bytes::from(vec![b'x'; 64 * 1024]))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let response = open(proxy.addr, req).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        upstream.requests().is_empty(),
        "the upstream never sees a complete oversized body"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn oversized_request_head_is_431() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let request = format!(
        "GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let (status, text) = raw(proxy.addr, request.as_bytes()).await;
    assert_eq!(status, 431, "{}", &text[..text.len().min(200)]);
    assert!(upstream.requests().is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn slow_header_client_is_disconnected_after_header_read_timeout() {
    let upstream = start_upstream().await;
    let text = TestConfig::new(upstream.addr)
        .header_read_timeout(Duration::from_millis(300))
        .text();
    let proxy = start_proxy_with(&text).await;
    for partial in [
        &b""[..],
        b"GE",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\n",
        b"PRI * HTTP/2.0\r\n",
    ] {
        let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stream, partial)
            .await
            .unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(
            DEADLINE,
            tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut rest),
        )
        .await;
        assert!(
            read.is_ok(),
            "connection after {partial:?} is closed by keygate within the deadline"
        );
    }
    assert!(upstream.requests().is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn smuggling_attempts_never_deliver_a_second_request_upstream() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    // The smuggled request carries a key: were it read as a request of its own, by keygate
    // or by the origin, it would be forwarded and seen, not refused with a 401.
    let smuggled = format!("GET /admin HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n");
    let post =
        format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n");
    // Each attempt and the one status it gets; the connection is closed after it.
    let attempts = [
        // Transfer-Encoding wins over Content-Length (RFC 9112 §6.3): an empty body.
        (
            format!(
                "{post}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
            200,
        ),
        (
            format!("{post}Content-Length: 5\r\nContent-Length: 40\r\n\r\nhello{smuggled}"),
            400,
        ),
        (
            format!(
                "{post}Transfer-Encoding: xchunked\r\nContent-Length: 5\r\n\r\nhello{smuggled}"
            ),
            400,
        ),
        (
            format!("{post}Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n{smuggled}"),
            400,
        ),
    ];
    for (attempt, expected) in &attempts {
        let (status, text) = raw(proxy.addr, attempt.as_bytes()).await;
        assert_eq!(status, *expected, "{attempt:?}:\n{text}");
        assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{attempt:?}:\n{text}");
    }
    // A request after them all, forwarded on a pooled upstream connection that smuggled
    // bytes would have been left on: the origin reads those first.
    let last = send(
        proxy.addr,
        get("/v1/last", &[("authorization", &bearer(KEY))]),
    )
    .await;
    assert_eq!(last.status, StatusCode::OK);
    let seen: Vec<(Method, String, Bytes)> = upstream
        .requests()
        .into_iter()
        .map(|s| (s.method, s.uri, s.body))
        .collect();
    assert_eq!(
        seen,
        [
            (Method::POST, "/v1/completions".to_owned(), Bytes::new()),
            (Method::GET, "/v1/last".to_owned(), Bytes::new()),
        ]
    );
    proxy.stop().await;
}

#[tokio::test]
async fn over_max_connections_the_probe_is_answered_and_other_requests_get_503() {
    let upstream = start_upstream().await;
    let text = TestConfig::new(upstream.addr).max_connections(2).text();
    let proxy = start_proxy_with(&text).await;
    let auth = bearer(KEY);
    // Two keep-alive connections, each served once and held open, fill the limit.
    let mut held = Vec::new();
    for _ in 0..2 {
        let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let reply = sender
            .send_request(get("/v1/models", &[("authorization", &auth)]))
            .await
            .unwrap();
        assert_eq!(reply.status(), StatusCode::OK);
        held.push(sender);
    }
    let full = send(proxy.addr, get("/v1/models", &[("authorization", &auth)])).await;
    assert_eq!(full.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(full.headers["retry-after"], "1");
    assert_eq!(full.json()["error"]["code"], "over_capacity");
    assert_eq!(
        send(proxy.addr, get("/health", &[])).await.status,
        StatusCode::OK,
        "the probe stays answerable"
    );

    held.pop();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let reply = send(proxy.addr, get("/v1/models", &[("authorization", &auth)])).await;
        if reply.status == StatusCode::OK {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a freed slot is used again"
        );
        tokio::task::yield_now().await;
    }
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_that_never_completes_the_connect_is_502_after_connect_timeout() {
    // A listener that never accepts, with its accept queue full: the kernel drops further
    // SYNs, so keygate's connect hangs until connect_timeout.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(stream)) = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            fillers.push(stream);
        }
    }
    let text = TestConfig::new(addr)
        .connect_timeout(Duration::from_millis(300))
        .text();
    let proxy = start_proxy_with(&text).await;
    let reply = send(
        proxy.addr,
        get("/v1/models", &[("authorization", &bearer(KEY))]),
    )
    .await;
    assert_upstream_error(&reply, StatusCode::BAD_GATEWAY);
    drop(listener);
    proxy.stop().await;
}

#[tokio::test]
async fn download_larger_than_the_client_reads_is_held_back_not_buffered() {
    let (upstream, mut senders) = start_streaming_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let response = open(
        proxy.addr,
        get("/v1/files/big", &[("authorization", &bearer(KEY))]),
    )
    .await;
    let mut sender = senders.recv().await.unwrap();
    let chunk = Bytes::from(vec![b'x'; 256 * 1024]);
    // The client reads nothing: once the socket buffers on both sides are full, keygate stops
    // reading from the upstream and the upstream's writes stall.
    let mut sent = 0usize;
    loop {
        let send = sender.send_data(chunk.clone());
        match tokio::time::timeout(std::time::Duration::from_millis(500), send).await {
            Ok(result) => {
                result.unwrap();
                sent += chunk.len();
                assert!(
                    sent < 64 * 1024 * 1024,
                    "keygate buffered {sent} bytes for a client that reads nothing"
                );
            }
            Err(_) => break,
        }
    }
    // Reading resumes the flow.
    let mut body = response.into_body();
    let mut received = 0usize;
    while received < sent {
        received += next_frame(&mut body)
            .await
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap()
            .len();
    }
    drop(sender);
    proxy.stop().await;
}

#[test]
fn accept_errors_back_off_and_serving_resumes() {
    // With few file descriptors, accepting more connections than fit fails with EMFILE;
    // keygate logs it, backs off, and serves again once connections close.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(start_upstream());
    let dir = TempDir::new("emfile");
    let config = TestConfig::new(upstream.addr).log_level("info").text();
    let path = dir.write("keygate.toml", &config);
    let mut keygate = Running::start_with_fd_limit(&path, &ENV, 64);
    let addr = keygate.addr;
    let held: Vec<_> = (0..80)
        .filter_map(|_| std::net::TcpStream::connect(addr).ok())
        .collect();
    keygate.wait_for_line("accept failed");
    drop(held);
    let reply = runtime.block_on(async {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let reply = send(addr, get("/v1/models", &[("authorization", &bearer(KEY))])).await;
            if reply.status == StatusCode::OK || tokio::time::Instant::now() > deadline {
                return reply;
            }
        }
    });
    assert_eq!(reply.status, StatusCode::OK);
    let (status, output) = keygate.terminate();
    assert!(status.success(), "{output}");
}

#[test]
fn a_stalled_log_reader_costs_counted_lines_and_one_warning_once_it_reads_again() {
    let mut stalled = stalled_log_keygate("stalled-log");
    let StalledLog {
        runtime, keygate, ..
    } = &mut stalled;
    let (addr, admin) = (keygate.addr, keygate.admin);
    runtime.block_on(async {
        flood_the_log(addr).await;
        wait_for_dropped_log_lines(admin).await;
    });
    keygate.read_again();
    let warnings = keygate.wait_for_lines("log lines were dropped");
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    let warning: serde_json::Value = serde_json::from_str(&warnings[0]).unwrap();
    assert_eq!(warning["level"], "WARN", "{warning}");
    let dropped = runtime.block_on(wait_for_dropped_log_lines(admin));
    assert_eq!(
        warning["lost"].as_f64(),
        Some(dropped),
        "the warning counts every dropped line: {warning}"
    );
    let status = keygate.terminate_within(DEADLINE);
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}
