//! Attacks on the "never" rules that the other test files do not try: HTTP/2 → HTTP/1.1
//! downgrade tricks with hand-made frames, framing headers that an origin could read
//! differently, hop-by-hop and upgrade tricks, odd request-target forms, authentication
//! state across requests of one connection, odd bytes, `Debug` output of the types on the
//! request path, and the TLS listener, the redirect listener, https upstreams and WebSocket
//! upgrades. Each test asserts the safe behaviour.

mod support;

use std::collections::HashSet;

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SMUGGLED: &str = "GET /admin HTTP/1.1\r\nHost: x\r\n\r\n";

/// Every request the upstream received carries the configured injected values exactly once,
/// and no header of it holds a value containing `forged`.
fn assert_clean(seen: &[Seen]) {
    for s in seen {
        let secret: Vec<_> = s.headers.get_all("x-shared-secret").iter().collect();
        assert_eq!(secret, [SHARED_SECRET], "{} {}", s.method, s.uri);
        let all = format!("{:?}", s.headers);
        assert!(!all.contains("forged"), "{} {}: {all}", s.method, s.uri);
        assert!(s.uri != "/admin", "smuggled request reached the upstream");
        assert!(
            !String::from_utf8_lossy(&s.body).contains("/admin"),
            "{} {}: body {:?}",
            s.method,
            s.uri,
            s.body
        );
    }
}

// ---------------------------------------------------------------- a raw HTTP/2 client

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1), `high` holding the other bits.
fn hpack_int(out: &mut Vec<u8>, value: usize, n: u32, high: u8) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(high | u8::try_from(value).unwrap());
        return;
    }
    out.push(high | u8::try_from(max).unwrap());
    let mut rest = value - max;
    while rest >= 128 {
        out.push(u8::try_from(rest % 128).unwrap() | 0x80);
        rest /= 128;
    }
    out.push(u8::try_from(rest).unwrap());
}

/// A header block of literal fields without indexing and without Huffman coding: any bytes
/// go through, as a hostile client would send them.
fn header_block(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        hpack_int(&mut out, name.len(), 7, 0);
        out.extend(*name);
        hpack_int(&mut out, value.len(), 7, 0);
        out.extend(*value);
    }
    out
}

/// The pseudo-headers of a request with a key, then `extra`.
fn keyed<'a>(method: &'a str, path: &'a str, extra: &[(&'a [u8], &'a [u8])]) -> Vec<u8> {
    let auth = bearer(KEY);
    let mut fields: Vec<(&[u8], &[u8])> = vec![
        (b":method", method.as_bytes()),
        (b":scheme", b"http"),
        (b":authority", b"keygate.test"),
        (b":path", path.as_bytes()),
        (b"authorization", auth.as_bytes()),
    ];
    fields.extend_from_slice(extra);
    header_block(&fields)
}

/// How keygate ended the streams of one raw HTTP/2 exchange.
#[derive(Debug, Default)]
struct H2Outcome {
    /// Streams keygate reset.
    reset: Vec<u32>,
    /// Streams answered to their end.
    answered: Vec<u32>,
    /// keygate ended the whole connection (GOAWAY or close) before all streams ended.
    connection_ended: bool,
}

/// Opens an HTTP/2 connection and writes the preface, empty SETTINGS and `frames`.
async fn h2_send(addr: std::net::SocketAddr, frames: &[Vec<u8>]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut out = H2_PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    for f in frames {
        out.extend(f);
    }
    stream.write_all(&out).await.unwrap();
    stream
}

/// Writes the preface, empty SETTINGS and `frames`, then answers SETTINGS and PING until
/// every stream in `streams` was answered to its end or reset, or the connection went away.
async fn h2_exchange(addr: std::net::SocketAddr, frames: &[Vec<u8>], streams: &[u32]) -> H2Outcome {
    let mut stream = h2_send(addr, frames).await;
    let mut pending: HashSet<u32> = streams.iter().copied().collect();
    let mut outcome = H2Outcome::default();
    let mut buf = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while !pending.is_empty() {
            let mut chunk = [0u8; 16 * 1024];
            let n = stream.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                outcome.connection_ended = true;
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            while buf.len() >= 9 {
                let len =
                    usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
                if buf.len() < 9 + len {
                    break;
                }
                let (kind, flags) = (buf[3], buf[4]);
                let id = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
                let payload = buf[9..9 + len].to_vec();
                buf.drain(..9 + len);
                match kind {
                    SETTINGS if flags & ACK == 0 => {
                        let _ = stream.write_all(&frame(SETTINGS, ACK, 0, &[])).await;
                    }
                    PING if flags & ACK == 0 => {
                        let _ = stream.write_all(&frame(PING, ACK, 0, &payload)).await;
                    }
                    RST_STREAM => {
                        outcome.reset.push(id);
                        pending.remove(&id);
                    }
                    HEADERS | DATA if flags & END_STREAM != 0 => {
                        outcome.answered.push(id);
                        pending.remove(&id);
                    }
                    GOAWAY => {
                        outcome.connection_ended = true;
                        return;
                    }
                    _ => {}
                }
            }
        }
    })
    .await
    .expect("every h2 stream is answered or reset within the deadline");
    outcome
}

/// A stream with a key and no body, after which the upstream must have seen nothing else.
fn sentinel(id: u32) -> Vec<u8> {
    frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        id,
        &keyed("GET", "/sentinel", &[]),
    )
}

#[tokio::test]
async fn h2_connection_specific_headers_never_reach_the_upstream() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let attempts: [&[(&[u8], &[u8])]; 6] = [
        &[(b"transfer-encoding", b"chunked")],
        &[(b"connection", b"x-shared-secret")],
        &[(b"upgrade", b"websocket")],
        &[(b"keep-alive", b"timeout=5")],
        &[(b"proxy-connection", b"keep-alive")],
        &[(b"te", b"gzip")],
    ];
    let mut frames = Vec::new();
    let mut ids = Vec::new();
    for (i, extra) in attempts.iter().enumerate() {
        let id = 1 + 2 * u32::try_from(i).unwrap();
        let mut fields = extra.to_vec();
        fields.push((b"x-shared-secret", b"forged"));
        frames.push(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            id,
            &keyed("GET", "/v1/connection-specific", &fields),
        ));
        ids.push(id);
    }
    frames.push(sentinel(13));
    ids.push(13);
    let outcome = h2_exchange(proxy.addr, &frames, &ids).await;
    let seen = upstream.wait_for_requests(1).await;
    assert_clean(&seen);
    assert!(
        seen.iter().all(|s| s.uri == "/sentinel"),
        "a request with a connection-specific header was forwarded: {seen:?}"
    );
    assert_eq!(outcome.reset.len(), attempts.len(), "{outcome:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn h2_body_beyond_its_content_length_never_becomes_a_second_upstream_request() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let body = format!("hello{SMUGGLED}");
    let conflicting = format!("{SMUGGLED}{SMUGGLED}");
    let conflicting_len = conflicting.len().to_string();
    let frames = [
        // Declares 5 bytes, sends 5 + a request.
        frame(
            HEADERS,
            END_HEADERS,
            1,
            &keyed("POST", "/v1/cl-short", &[(b"content-length", b"5")]),
        ),
        frame(DATA, END_STREAM, 1, body.as_bytes()),
        // Two content-lengths that disagree: a downgrade taking the first would let the
        // second request through as a new one.
        frame(
            HEADERS,
            END_HEADERS,
            3,
            &keyed(
                "POST",
                "/v1/cl-twice",
                &[
                    (b"content-length", b"0"),
                    (b"content-length", conflicting_len.as_bytes()),
                ],
            ),
        ),
        frame(DATA, END_STREAM, 3, conflicting.as_bytes()),
        // A list in one field.
        frame(
            HEADERS,
            END_HEADERS,
            5,
            &keyed("POST", "/v1/cl-list", &[(b"content-length", b"0, 40")]),
        ),
        frame(DATA, END_STREAM, 5, conflicting.as_bytes()),
        sentinel(7),
    ];
    h2_exchange(proxy.addr, &frames, &[1, 3, 5, 7]).await;
    let seen = upstream.wait_for_requests(1).await;
    assert_clean(&seen);
    proxy.stop().await;
}

#[tokio::test]
async fn h2_header_names_and_values_with_odd_bytes_are_refused_not_forwarded() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let attempts: [&[(&[u8], &[u8])]; 7] = [
        // Values that, written into HTTP/1.1 as they are, would add a header line or a request.
        &[(b"x-note", b"a\r\nx-shared-secret: forged")],
        &[(b"x-note", b"a\r\n\r\nGET /admin HTTP/1.1\r\nx: forged")],
        &[(b"x-note", b"a\nx-shared-secret: forged")],
        &[(b"x-note", b"a\0forged")],
        // Names an HTTP/1.1 origin might read as the injected header.
        &[(b"x-shared-secret ", b"forged")],
        &[(b"x-shared-secret:", b"forged")],
        &[(b"X-Shared-Secret", b"forged")],
    ];
    // One connection each: some of these end the whole connection.
    for extra in attempts {
        let mut frames = vec![frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            1,
            &keyed("GET", "/v1/odd", extra),
        )];
        // The same on the key-less probe path.
        let mut probe: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", b"keygate.test"),
            (b":path", b"/health"),
        ];
        probe.extend_from_slice(extra);
        frames.push(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            3,
            &header_block(&probe),
        ));
        let outcome = h2_exchange(proxy.addr, &frames, &[1, 3]).await;
        assert!(
            outcome.answered.is_empty(),
            "{:?}: {outcome:?}",
            String::from_utf8_lossy(extra[0].0)
        );
    }
    // The control: the same client, well-formed, is forwarded.
    let control = h2_exchange(proxy.addr, &[sentinel(1)], &[1]).await;
    assert_eq!(control.answered, [1], "{control:?}");
    let seen = upstream.requests();
    assert_clean(&seen);
    assert!(
        seen.iter().all(|s| s.uri == "/sentinel"),
        "a request with an invalid header was forwarded: {seen:?}"
    );
    proxy.stop().await;
}

// ---------------------------------------------------------------- HTTP/1.1

/// An upstream that records the raw bytes of each request head it receives and answers with
/// `response` as is, closing the connection.
async fn start_raw_upstream(
    response: &'static [u8],
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
                let _ = stream.write_all(response).await;
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn content_length_reaches_the_upstream_as_one_plain_decimal() {
    let (upstream, mut heads) =
        start_raw_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            .await;
    let mut forwarded = 0;
    let proxy = start_proxy(upstream).await;
    let auth = bearer(KEY);
    let variants = [
        "Content-Length: 5, 5\r\n",
        "Content-Length: 5\r\nContent-Length: 5\r\n",
        "Content-Length: 5,5\r\n",
    ];
    for cl in variants {
        let request = format!(
            "POST /v1/cl HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n{cl}Connection: close\r\n\r\nhello"
        );
        let (status, text) = raw(proxy.addr, request.as_bytes()).await;
        if status == 400 {
            continue;
        }
        assert_eq!(status, 200, "{text}");
        let head = tokio::time::timeout(DEADLINE, heads.recv())
            .await
            .unwrap()
            .unwrap();
        let lengths: Vec<_> = head
            .lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("content-length:"))
            .collect();
        assert_eq!(
            lengths,
            ["content-length: 5"],
            "client sent {cl:?}; an origin may reject or read this framing differently:\n{head}"
        );
        forwarded += 1;
    }
    assert!(
        forwarded > 0,
        "no variant was forwarded: the test proves nothing"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn connection_naming_framing_and_keygate_owned_headers_changes_nothing_upstream() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let auth = bearer(KEY);
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: keygate.test\r\nAuthorization: {auth}\r\nConnection: content-length, host, x-request-id, x-forwarded-for, x-keygate-key, authorization\r\nContent-Length: 5\r\nX-Request-Id: trace-7\r\n\r\nhello{SMUGGLED}"
    );
    let (status, text) = raw(proxy.addr, request.as_bytes()).await;
    assert_eq!(status, 200, "{text}");
    let seen = upstream.wait_for_requests(1).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    let s = &seen[0];
    assert_eq!(s.body, "hello");
    assert_eq!(s.headers["host"], upstream.addr.to_string());
    assert_eq!(s.headers["x-keygate-key"], "default");
    assert_eq!(s.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(s.headers["x-request-id"], "trace-7");
    assert!(!s.headers.contains_key("authorization"));
    assert_clean(&seen);
    proxy.stop().await;
}

#[tokio::test]
async fn keyless_requests_cannot_forge_the_identity_header() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let forged: [(&str, &str); 3] = [
        ("x-keygate-key", "default"),
        ("X_Keygate_Key", "ci"),
        ("x-keygate_key", "admin"),
    ];
    send(proxy.addr, get("/health", &forged)).await;
    send(proxy.addr, get("/docs", &forged)).await;
    send_h2(proxy.addr, get("/docs", &forged)).await;
    let seen = upstream.wait_for_requests(3).await;
    for s in &seen {
        let identity: Vec<_> = s
            .headers
            .keys()
            .filter(|n| n.as_str().replace('_', "-") == "x-keygate-key")
            .collect();
        assert!(
            identity.is_empty(),
            "{}: a key-less request carried an identity header {identity:?}",
            s.uri
        );
    }
    proxy.stop().await;
}

#[tokio::test]
async fn injected_and_identity_names_with_underscores_cannot_be_forged_with_dashes() {
    let upstream = start_upstream().await;
    let text = TestConfig::new(upstream.addr)
        .inject("x_origin_secret", "${SHARED_SECRET}")
        .identity_header("x_keygate_id")
        .text();
    let proxy = start_proxy_with(&text).await;
    let auth = bearer(KEY);
    let forged = [
        ("x-origin-secret", "forged"),
        ("x-keygate-id", "forged-admin"),
    ];
    let mut keyed = vec![("authorization", auth.as_str())];
    keyed.extend(forged);
    send(proxy.addr, get("/v1/models", &keyed)).await;
    send(proxy.addr, get("/health", &forged)).await;
    let seen = upstream.wait_for_requests(2).await;
    for s in &seen {
        // A WSGI origin reads both spellings as HTTP_X_ORIGIN_SECRET (or drops the one with
        // underscores): the client's must not be there at all.
        for name in ["x-origin-secret", "x-keygate-id"] {
            assert!(
                !s.headers.contains_key(name),
                "{}: client-chosen {name} reached the upstream beside keygate's: {:?}",
                s.uri,
                s.headers
            );
        }
        assert_eq!(s.headers["x_origin_secret"], SHARED_SECRET);
    }
    proxy.stop().await;
}

#[tokio::test]
async fn authentication_is_per_request_not_per_connection() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let auth = bearer(KEY);

    // HTTP/1.1 keep-alive: a keyed request, then key-less ones on the same connection.
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut statuses = Vec::new();
    for req in [
        get("/v1/h1-keyed", &[("authorization", &auth)]),
        get("/v1/h1-keyless", &[]),
        get("/v1/h1-bad", &[("authorization", "Bearer x")]),
    ] {
        let response = tokio::time::timeout(DEADLINE, h1.send_request(req))
            .await
            .unwrap()
            .unwrap();
        statuses.push(response.status());
        response.into_body().collect().await.unwrap();
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::UNAUTHORIZED,
            StatusCode::UNAUTHORIZED
        ]
    );

    // HTTP/2: streams of one connection, the keyed one still open while the others arrive.
    let (upstream_slow, mut senders) = start_streaming_upstream().await;
    let proxy_h2 = start_proxy(upstream_slow.addr).await;
    let stream = TcpStream::connect(proxy_h2.addr).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let target = |path: &str, headers: &[(&str, &str)]| {
        let mut req = get(path, headers);
        *req.uri_mut() = format!("http://keygate.test{path}").parse().unwrap();
        req.headers_mut().remove("host");
        req
    };
    let open = tokio::time::timeout(
        DEADLINE,
        h2.send_request(target("/v1/h2-keyed", &[("authorization", &auth)])),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(open.status(), StatusCode::OK);
    let _held = senders.recv().await.unwrap();
    let keyless = tokio::time::timeout(DEADLINE, h2.send_request(target("/v1/h2-keyless", &[])))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(keyless.status(), StatusCode::UNAUTHORIZED);

    assert_eq!(
        upstream
            .requests()
            .iter()
            .map(|s| s.uri.clone())
            .collect::<Vec<_>>(),
        ["/v1/h1-keyed"]
    );
    assert!(upstream_slow
        .requests()
        .iter()
        .all(|s| s.uri == "/v1/h2-keyed"));
    drop(open);
    proxy.stop().await;
    proxy_h2.stop().await;
}

#[tokio::test]
async fn asterisk_authority_and_schemeless_targets_never_reach_the_upstream_keyless() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let keyless: [&[u8]; 5] = [
        b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET keygate.test:80 HTTP/1.1\r\nHost: keygate.test\r\nConnection: close\r\n\r\n",
        b"GET http://keygate.test HTTP/1.1\r\nHost: keygate.test\r\nConnection: close\r\n\r\n",
        b"GET http://keygate.test?/health HTTP/1.1\r\nHost: keygate.test\r\nConnection: close\r\n\r\n",
        b"GET /v1/models#/../../health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ];
    for request in keyless {
        let (status, text) = raw(proxy.addr, request).await;
        assert!(status == 400 || status == 401, "{text}");
    }
    let keyed = format!(
        "OPTIONS * HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n\r\n"
    );
    let (status, text) = raw(proxy.addr, keyed.as_bytes()).await;
    assert_eq!(status, 400, "{text}");
    assert!(upstream.requests().is_empty(), "{:?}", upstream.requests());
    proxy.stop().await;
}

/// What an origin that answers every request with a WebSocket 101 saw.
#[derive(Debug)]
enum SwitchingEvent {
    /// A request head, on a connection not switched yet.
    Head(String),
    /// Bytes after its 101: what a tunnel would carry.
    Tunnelled(String),
}

/// An origin that answers every request with 101 Switching Protocols to WebSocket and then
/// reads on: whatever arrives after the 101 came through a tunnel, and is answered with a
/// `tunnel` response before the connection is closed.
async fn start_switching_upstream() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<SwitchingEvent>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let events = events_tx.clone();
            tokio::spawn(async move {
                let Some(head) = read_request_head(&mut stream).await else {
                    return;
                };
                let _ = events.send(SwitchingEvent::Head(head));
                let switched = "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
                if stream.write_all(switched.as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 4096];
                if let Ok(n @ 1..) = stream.read(&mut buf).await {
                    let bytes = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let _ = events.send(SwitchingEvent::Tunnelled(bytes));
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\ntunnel")
                        .await;
                }
            });
        }
    });
    (addr, events)
}

#[tokio::test]
async fn a_101_from_the_upstream_never_turns_a_keyless_probe_into_a_tunnel() {
    let (upstream, mut events) = start_switching_upstream().await;
    let proxy = start_proxy(upstream).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let head = tokio::time::timeout(DEADLINE, read_request_head(&mut stream))
        .await
        .expect("a response head within the deadline")
        .expect("a response head, not the end");
    assert!(head.starts_with("HTTP/1.1 502 "), "{head}");
    let mut body = vec![0u8; declared_length(&head)];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut body))
        .await
        .expect("the error body within the deadline")
        .unwrap();
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(error["error"]["code"], "upstream_protocol_error", "{error}");
    // Whatever follows on this connection is not a tunnel to the upstream: a keyed request
    // written now is either read by keygate as a request of its own or not read at all, and
    // never reaches the upstream as bytes after its 101.
    let follow_up =
        format!("GET /v1/after HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n\r\n");
    stream.write_all(follow_up.as_bytes()).await.unwrap();
    let rest = String::from_utf8_lossy(&read_to_close(&mut stream).await).into_owned();
    assert!(rest.starts_with("HTTP/1.1 502 "), "{rest}");
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        seen.push(event);
    }
    let heads: Vec<&str> = seen
        .iter()
        .map(|event| match event {
            SwitchingEvent::Head(head) => head.as_str(),
            SwitchingEvent::Tunnelled(bytes) => panic!("a tunnel carried {bytes:?}"),
        })
        .collect();
    assert_eq!(heads.len(), 2, "{heads:?}");
    assert!(heads[0].starts_with("GET /health "), "{}", heads[0]);
    assert!(
        !heads[0].to_ascii_lowercase().contains("upgrade"),
        "{}",
        heads[0]
    );
    assert!(heads[1].starts_with("GET /v1/after "), "{}", heads[1]);
    proxy.stop().await;
}

#[tokio::test]
async fn odd_bytes_in_headers_and_paths_neither_panic_nor_pass() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let mut key_with_obs_text = b"Bearer ".to_vec();
    key_with_obs_text.extend(KEY.as_bytes());
    key_with_obs_text.push(0xff);
    let head = |extra: &[u8], path: &[u8]| {
        let mut r = b"GET ".to_vec();
        r.extend(path);
        r.extend(b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
        r.extend(extra);
        r.extend(b"\r\n");
        r
    };
    let mut refused = Vec::new();
    for extra in [
        [b"Authorization: ".as_slice(), &key_with_obs_text, b"\r\n"].concat(),
        [b"x-api-key: \xff", KEY.as_bytes(), b"\r\n"].concat(),
        [b"x-api-key: ", KEY.as_bytes(), b"\x7f\r\n"].concat(),
        [b"x-api-key: ", KEY.as_bytes(), b"\r\nx-api-key:\r\n"].concat(),
        [b"Authorization: Bearer\t", KEY.as_bytes(), b"\r\n"].concat(),
    ] {
        refused.push(head(&extra, b"/v1/models"));
    }
    refused.push(head(b"", "/h\u{e9}alth".as_bytes()));
    refused.push(head(b"", b"/health\xff"));
    for request in &refused {
        let (status, text) = raw(proxy.addr, request).await;
        assert!(
            status == 400 || status == 401,
            "{}: {text}",
            String::from_utf8_lossy(request)
        );
    }
    assert!(upstream.requests().is_empty(), "{:?}", upstream.requests());
    // Odd bytes in headers keygate reads on an admitted request.
    let auth = bearer(KEY);
    let admitted = [
        format!("Authorization: {auth}\r\nConnection: \u{e9}\r\nX-Request-Id: \u{e9}\r\nX-Forwarded-For: \u{e9}\r\nx-shared-secret: forged\u{e9}\r\n").into_bytes(),
    ];
    for extra in &admitted {
        let (status, text) = raw(proxy.addr, &head(extra, b"/v1/odd")).await;
        assert_eq!(status, 200, "{text}");
    }
    let seen = upstream.wait_for_requests(1).await;
    assert_eq!(seen[0].headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen[0].headers["x-request-id"].len(), 32);
    assert_clean(&seen);
    // Still serving: no panic took the listener down.
    let reply = send(proxy.addr, get("/health", &[])).await;
    assert_eq!(reply.status, StatusCode::OK);
    proxy.stop().await;
}

#[test]
fn debug_output_of_request_path_types_never_shows_a_secret() {
    let upstream: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let config = parse_config(&config_text(upstream, ""));
    let rules = keygate::Rules::new(&config);
    let keys = keygate::KeySet::new(&config.auth.keys, |_| Default::default());
    let matched = keys.verify(KEY.as_bytes()).unwrap();
    let specs = &config.auth.keys;
    let mut headers = http::HeaderMap::new();
    headers.insert("authorization", bearer(KEY).parse().unwrap());
    let credential = keygate::credential(&headers);
    let debug = format!("{rules:?} {matched:?} {credential:?} {specs:?}");
    // The key as text, and as the list of bytes a derived Debug prints for `&[u8]`.
    let as_bytes = format!("{:?}", KEY.as_bytes());
    let as_bytes = &as_bytes[1..as_bytes.len() - 1];
    for secret in [KEY, SHARED_SECRET, UPSTREAM_TOKEN, as_bytes] {
        assert!(
            !debug.contains(secret),
            "Debug output shows a secret:\n{debug}"
        );
    }
}

#[tokio::test]
async fn cors_options_without_origin_is_no_preflight_and_needs_a_key() {
    let upstream = start_upstream().await;
    let cors = "\n[cors]\nallow_origins = [\"*\"]\n";
    let proxy = start_proxy_with(&config_text(upstream.addr, cors)).await;
    let no_origin = request(
        Method::OPTIONS,
        "/v1/chat/completions",
        &[("access-control-request-method", "POST")],
        "",
    );
    assert_eq!(
        send(proxy.addr, no_origin).await.status,
        StatusCode::UNAUTHORIZED
    );
    // A preflight with a body that is an HTTP request: answered by keygate, and the body is
    // not read as a second request that reaches the upstream.
    let (status, text) = raw(
        proxy.addr,
        format!(
            "OPTIONS /v1/x HTTP/1.1\r\nHost: x\r\nOrigin: https://a.example\r\nAccess-Control-Request-Method: POST\r\nContent-Length: {}\r\n\r\n{SMUGGLED}GET /v1/after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            SMUGGLED.len()
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(status, 204, "{text}");
    assert!(text.contains("HTTP/1.1 401"), "{text}");
    let h2_preflight = request(
        Method::OPTIONS,
        "/health",
        &[
            ("origin", "https://a.example"),
            ("access-control-request-method", "GET"),
        ],
        "",
    );
    assert_eq!(
        send_h2(proxy.addr, h2_preflight).await.status,
        StatusCode::NO_CONTENT
    );
    assert!(upstream.requests().is_empty(), "{:?}", upstream.requests());
    proxy.stop().await;
}

#[tokio::test]
async fn headers_named_by_a_connection_header_with_non_ascii_bytes_are_still_removed() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    // RFC 9110 §7.6.1: every header Connection names is hop-by-hop. One odd byte elsewhere in
    // the same field must not make keygate forget the names it can read.
    let request = format!(
        "GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nConnection: x-hop, \u{e9}\r\nx-hop: 1\r\nConnection: close\r\n\r\n"
    );
    let (status, text) = raw(proxy.addr, request.as_bytes()).await;
    assert_eq!(status, 200, "{text}");
    let seen = upstream.wait_for_requests(1).await;
    assert!(
        !seen[0].headers.contains_key("x-hop"),
        "a header named by Connection reached the upstream: {:?}",
        seen[0].headers
    );
    proxy.stop().await;
}

#[tokio::test]
async fn response_trailers_never_carry_an_injected_header_to_the_client() {
    // An origin that reflects request headers, here into trailer fields of a chunked
    // response (as gRPC-style and some streaming servers do). HTTP/1.1 clients get no
    // trailers (keygate drops the `Trailer` header), HTTP/2 clients get them as sent.
    const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-shared-secret, x-upstream-token, x_shared_secret\r\nconnection: close\r\n\r\n2\r\nok\r\n0\r\nx-shared-secret: shared-secret-value-4242\r\nx_shared_secret: shared-secret-value-4242\r\nx-upstream-token: Bearer upstream-api-key-77\r\nx-kept: 1\r\n\r\n";
    let (upstream, _heads) = start_raw_upstream(RESPONSE).await;
    let proxy = start_proxy(upstream).await;
    let auth = bearer(KEY);
    let mut received = Vec::new();
    let h1 = open(
        proxy.addr,
        get(
            "/v1/stream",
            &[("authorization", &auth), ("te", "trailers")],
        ),
    )
    .await;
    let h2 = open_h2(proxy.addr, get("/v1/stream", &[("authorization", &auth)])).await;
    for response in [h1, h2] {
        assert_eq!(response.status(), StatusCode::OK);
        let everything = tokio::time::timeout(DEADLINE, response.into_body().collect())
            .await
            .expect("the body within the deadline")
            .unwrap();
        let trailers = everything.trailers().cloned();
        assert_eq!(everything.to_bytes(), "ok");
        received.push(trailers);
    }
    assert!(
        received.iter().flatten().any(|t| t.contains_key("x-kept")),
        "no trailer reached the client at all: the test proves nothing"
    );
    for trailers in received.iter().flatten() {
        let text = format!("{trailers:?}");
        for secret in [SHARED_SECRET, UPSTREAM_TOKEN] {
            assert!(
                !text.contains(secret),
                "an injected value reached the client in a trailer: {text}"
            );
        }
    }
    proxy.stop().await;
}

// ---------------------------------------------------------------- TLS, redirect, upgrades

const H2_ALPN: &[u8] = b"h2";
const H1_ALPN: &[u8] = b"http/1.1";

/// An upstream that answers every request with a 101 to WebSocket (reflecting nothing).
async fn start_always_switching_upstream() -> Upstream {
    start_upstream_with(|_| {
        let mut response = fixed(StatusCode::SWITCHING_PROTOCOLS, "");
        let headers = response.headers_mut();
        headers.insert("upgrade", http::HeaderValue::from_static("websocket"));
        headers.insert("connection", http::HeaderValue::from_static("Upgrade"));
        headers.insert(
            "sec-websocket-accept",
            http::HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        );
        response
    })
    .await
}

const WS_HEADERS: &str =
    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

#[tokio::test]
async fn a_tls_http1_client_that_sends_nothing_is_cut_at_header_read_timeout() {
    let upstream = start_upstream().await;
    let (ca, dir) = (
        support::tls::Ca::new(),
        support::process::TempDir::new("attack-tls-silent-h1"),
    );
    let proxy = support::tls::start_tls_proxy(&ca, &dir, TestConfig::new(upstream.addr)).await;
    let mut silent = support::tls::connect(proxy.addr, &ca.pem(), &[H1_ALPN])
        .await
        .unwrap();
    assert_eq!(silent.get_ref().1.alpn_protocol(), Some(H1_ALPN));
    // header_read_timeout is 2 s in the test config; DEADLINE is well beyond it.
    let got = read_to_close(&mut silent).await;
    assert!(
        !String::from_utf8_lossy(&got).contains("HTTP/1.1 2"),
        "{got:?}"
    );
    assert!(upstream.requests().is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn alpn_h2_spoken_as_http1_and_alpn_http1_spoken_as_h2_reach_nothing() {
    let upstream = start_upstream().await;
    let (ca, dir) = (
        support::tls::Ca::new(),
        support::process::TempDir::new("attack-tls-alpn-mismatch"),
    );
    let proxy = support::tls::start_tls_proxy(&ca, &dir, TestConfig::new(upstream.addr)).await;
    // ALPN h2, then an HTTP/1.1 request with a key.
    let mut h2 = support::tls::connect(proxy.addr, &ca.pem(), &[H2_ALPN])
        .await
        .unwrap();
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(H2_ALPN));
    let http1 =
        format!("GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n");
    h2.write_all(http1.as_bytes()).await.unwrap();
    let got = read_to_close(&mut h2).await;
    assert!(!got.starts_with(b"HTTP/1.1"), "{got:?}");
    // ALPN http/1.1, then the HTTP/2 preface and a keyed HEADERS frame.
    let mut h1 = support::tls::connect(proxy.addr, &ca.pem(), &[H1_ALPN])
        .await
        .unwrap();
    let mut frames = H2_PREFACE.to_vec();
    frames.extend(frame(SETTINGS, 0, 0, &[]));
    frames.extend(frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &keyed("GET", "/v1/models", &[]),
    ));
    h1.write_all(&frames).await.unwrap();
    let got = String::from_utf8_lossy(&read_to_close(&mut h1).await).into_owned();
    assert!(!got.contains(" 200 "), "{got}");
    assert!(upstream.requests().is_empty(), "{:?}", upstream.requests());
    proxy.stop().await;
}

#[tokio::test]
async fn an_https_upstream_must_present_a_certificate_for_its_own_name() {
    let dir = support::process::TempDir::new("attack-upstream-name");
    let auth = bearer(KEY);
    // (names on the upstream's certificate, host in the upstream URL, expected status)
    let cases = [
        (&["other.example"][..], "localhost", StatusCode::BAD_GATEWAY),
        (&["localhost"][..], "127.0.0.1", StatusCode::BAD_GATEWAY),
        (&["127.0.0.1"][..], "localhost", StatusCode::BAD_GATEWAY),
        (&["localhost"][..], "localhost", StatusCode::OK),
    ];
    for (names, host, expected) in cases {
        let ca = support::tls::Ca::new();
        let (addr, seen) = support::tls::start_tls_upstream(&ca.issue_for(names, 30)).await;
        let ca_file = dir.write("ca.pem", &ca.pem());
        let text =
            support::tls::https_upstream_config(addr.port(), host, "/prefix", &ca_file).text();
        let proxy = start_proxy_with(&text).await;
        let reply = send(proxy.addr, get("/v1/models", &[("authorization", &auth)])).await;
        assert_eq!(
            reply.status,
            expected,
            "{names:?} for {host}: {}",
            reply.text()
        );
        let seen = seen.lock().unwrap().clone();
        if expected == StatusCode::OK {
            assert_eq!(seen.len(), 1);
            assert_eq!(
                seen[0].headers["host"],
                format!("{host}:{}", addr.port()).as_str()
            );
            assert_eq!(seen[0].headers["x-shared-secret"], SHARED_SECRET);
        } else {
            assert!(
                seen.is_empty(),
                "{names:?} for {host}: a request got through"
            );
            assert!(!reply.text().contains(SHARED_SECRET));
        }
        proxy.stop().await;
    }
}

#[tokio::test]
async fn an_unasked_101_with_bytes_after_it_never_poisons_the_upstream_pool() {
    let auth = bearer(KEY);
    // A plain keyed GET, a key-less probe, and a keyed WebSocket answered with another
    // protocol: each gets a 101 it cannot use, and the next client must get a clean answer.
    let first_requests = [
        format!("GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n"),
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_owned(),
        format!("GET /ws HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n{WS_HEADERS}\r\n"),
    ];
    for (first, switch_to) in first_requests.iter().zip(["websocket", "websocket", "h2c"]) {
        // A 101 followed at once by a complete response, on the first connection only.
        let upstream = start_misframing_upstream(format!(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {switch_to}\r\n\r\n{POISON_RESPONSE}"
        ))
        .await;
        let proxy = start_proxy(upstream).await;
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(first.as_bytes()).await.unwrap();
        let mut head = [0u8; 12];
        tokio::time::timeout(DEADLINE, stream.read_exact(&mut head))
            .await
            .expect("a response within the deadline")
            .unwrap();
        assert_eq!(&head, b"HTTP/1.1 502", "{first}");
        drop(stream);
        for _ in 0..3 {
            let reply = send(proxy.addr, get("/v1/models", &[("authorization", &auth)])).await;
            assert_eq!(reply.status, StatusCode::OK, "{first}");
            assert_eq!(reply.body, "clean", "{first}");
        }
        proxy.stop().await;
    }
}

#[tokio::test]
async fn a_websocket_handshake_carries_only_keygates_injected_identity_and_forwarding_values() {
    let upstream = start_always_switching_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let (ca, dir) = (
        support::tls::Ca::new(),
        support::process::TempDir::new("attack-ws-forged"),
    );
    let tls = support::tls::start_tls_proxy(&ca, &dir, TestConfig::new(upstream.addr)).await;
    let forged = "x-shared-secret: forged\r\nx_shared_secret: forged\r\nx-upstream-token: forged\r\n\
                  x-keygate-key: forged\r\nx_keygate_key: forged\r\nx-forwarded-for: 6.6.6.6forged\r\n\
                  x-forwarded-proto: forged\r\nx-forwarded-host: forged\r\nforwarded: for=forged\r\n\r\n";
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nConnection: Upgrade, x-shared-secret, x-keygate-key\r\nUpgrade: websocket\r\n{WS_HEADERS}{forged}"
    );
    // Over plain HTTP/1.1 and over TLS: the 101 comes back and the tunnel then closes.
    let mut plain = TcpStream::connect(proxy.addr).await.unwrap();
    plain.write_all(request.as_bytes()).await.unwrap();
    let answer = String::from_utf8_lossy(&read_to_close(&mut plain).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    let mut secure = support::tls::connect(tls.addr, &ca.pem(), &[H1_ALPN])
        .await
        .unwrap();
    secure.write_all(request.as_bytes()).await.unwrap();
    let answer = String::from_utf8_lossy(&read_to_close(&mut secure).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    let seen = upstream.wait_for_requests(2).await;
    assert_eq!(seen.len(), 2);
    assert_clean(&seen);
    for (s, proto) in seen.iter().zip(["http", "https"]) {
        assert_eq!(s.headers["upgrade"], "websocket");
        assert_eq!(
            s.headers["x-upstream-token"],
            format!("Bearer {UPSTREAM_TOKEN}")
        );
        assert_eq!(s.headers["x-keygate-key"], "default");
        assert_eq!(s.headers["x-forwarded-for"], "127.0.0.1");
        assert_eq!(s.headers["x-forwarded-proto"], proto);
        assert!(!s.headers.contains_key("authorization"));
        assert!(!s.headers.contains_key("x_shared_secret"));
    }
    proxy.stop().await;
    tls.stop().await;
}

#[tokio::test]
async fn a_keyed_upgrade_with_a_body_and_a_pipelined_request_smuggles_nothing() {
    // The upstream declines every upgrade (200), so the client's connection stays HTTP.
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let auth = bearer(KEY);
    let upgrade =
        format!("GET /ws HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n{WS_HEADERS}");
    let chunked_body = format!("{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n", SMUGGLED.len());
    let bodies = [
        format!("Content-Length: {}\r\n\r\n{SMUGGLED}", SMUGGLED.len()),
        format!("Transfer-Encoding: chunked\r\n\r\n{chunked_body}"),
        format!("Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{chunked_body}"),
    ];
    for body in &bodies {
        let exchange =
            format!("{upgrade}{body}GET /admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let (status, text) = raw(proxy.addr, exchange.as_bytes()).await;
        assert!(matches!(status, 200 | 400), "{text}");
        let statuses: Vec<_> = text
            .match_indices("HTTP/1.1 ")
            .map(|(i, _)| &text[i + 9..i + 12])
            .collect();
        assert!(
            !statuses[1..].contains(&"200"),
            "the pipelined key-less request was answered: {text}"
        );
    }
    for s in upstream.requests() {
        assert_eq!(s.uri, "/ws", "{s:?}");
        assert!(s.body.is_empty() || s.body == SMUGGLED.as_bytes(), "{s:?}");
        assert_eq!(s.headers["x-shared-secret"], SHARED_SECRET);
    }
    proxy.stop().await;
}

#[tokio::test]
async fn upgrade_requests_that_are_not_exactly_websocket_never_become_a_tunnel() {
    let upstream = start_always_switching_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let auth = bearer(KEY);
    let variants = [
        "GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket, h2c\r\n",
        "GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nUpgrade: websocket\r\n",
        "GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nUpgrade: h2c\r\n",
        "GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: WebSocket/13\r\n",
        "GET /ws HTTP/1.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n",
        "GET /ws HTTP/1.1\r\nConnection: keep-alive\r\nUpgrade: websocket\r\n",
        "GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n",
        "POST /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 0\r\n",
        "OPTIONS /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n",
    ];
    for head in variants {
        // The variant, then a key-less request on the same connection: answered by keygate
        // (401), never carried to the upstream as tunnel bytes.
        let exchange = format!(
            "{head}Host: x\r\nAuthorization: {auth}\r\n{WS_HEADERS}\r\nGET /admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let (status, text) = raw(proxy.addr, exchange.as_bytes()).await;
        assert_eq!(status, 502, "{head}: {text}");
        assert!(text.contains("HTTP/1.1 401"), "{head}: {text}");
    }
    // HTTP/1.0 has no upgrades.
    let old = format!(
        "GET /ws HTTP/1.0\r\nHost: x\r\nAuthorization: {auth}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n{WS_HEADERS}\r\n"
    );
    let (_, text) = raw(proxy.addr, old.as_bytes()).await;
    assert!(
        text.starts_with("HTTP/1.0 502") || text.starts_with("HTTP/1.1 502"),
        "{text}"
    );
    let seen = upstream.requests();
    assert_eq!(seen.len(), variants.len() + 1);
    for s in &seen {
        assert_eq!(s.uri, "/ws");
        assert!(!s.headers.contains_key("upgrade"), "{s:?}");
        assert!(!s.headers.contains_key("http2-settings"), "{s:?}");
    }
    proxy.stop().await;
}

/// A TLS keygate run with `config` and a redirect listener (https port 8443).
async fn redirecting_proxy(config: TestConfig, tag: &str) -> Proxy {
    let (ca, dir) = (support::tls::Ca::new(), support::process::TempDir::new(tag));
    let config = config.redirect_http_listen().redirect_https_port(8443);
    support::tls::start_tls_proxy(&ca, &dir, config).await
}

/// The value of the response's `location` header, if any.
fn location_of(text: &str) -> Option<&str> {
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    head.split("\r\n")
        .find_map(|line| line.strip_prefix("location: "))
}

#[tokio::test]
async fn the_redirect_listener_never_reflects_a_malformed_host_or_injects_a_header() {
    let upstream = start_upstream().await;
    let proxy = redirecting_proxy(TestConfig::new(upstream.addr), "attack-redirect-host").await;
    let plain = proxy.redirect.unwrap();
    let long = "a".repeat(254);
    let long_label = format!("Host: {long}\r\n");
    // (request line and headers, the Location expected; None: 400)
    let cases: Vec<(String, Option<&str>)> = vec![
        (
            "GET /p HTTP/1.1\r\nHost: good.example\r\n".into(),
            Some("https://good.example:8443/p"),
        ),
        ("GET /p HTTP/1.1\r\nHost: a@evil.example\r\n".into(), None),
        (
            "GET /p HTTP/1.1\r\nHost: good.example:80@evil.example\r\n".into(),
            None,
        ),
        (
            "GET /p HTTP/1.1\r\nHost: good.example\r\n x-folded: evil\r\n".into(),
            None,
        ),
        (
            "GET /p HTTP/1.1\r\nHost: good.example\rSet-Cookie: x=1\r\n".into(),
            None,
        ),
        (
            "GET /p HTTP/1.1\r\nHost: \u{e9}vil.example\r\n".into(),
            None,
        ),
        (
            "GET /p HTTP/1.1\r\nHost: xn--vil-9la.example\r\n".into(),
            Some("https://xn--vil-9la.example:8443/p"),
        ),
        (format!("GET /p HTTP/1.1\r\n{long_label}"), None),
        ("GET /p HTTP/1.1\r\nHost: [fe80::1%25eth0]\r\n".into(), None),
        (
            "GET /p HTTP/1.1\r\nHost: [fe80::1%eth0]:80\r\n".into(),
            None,
        ),
        (
            "GET /p HTTP/1.1\r\nHost: [::1]:80\r\n".into(),
            Some("https://[::1]:8443/p"),
        ),
        (
            "GET /p HTTP/1.1\r\nHost: good.example%2f.evil.example\r\n".into(),
            None,
        ),
        (
            "GET /p HTTP/1.1\r\nHost: good.example/.evil.example\r\n".into(),
            None,
        ),
        (
            "GET /p HTTP/1.1\r\nHost: good.example?.evil.example\r\n".into(),
            None,
        ),
        (
            "GET /p HTTP/1.1\r\nHost: good.example#.evil.example\r\n".into(),
            None,
        ),
        (
            "GET /p HTTP/1.1\r\nHost: good.example\\.evil.example\r\n".into(),
            None,
        ),
        (
            "GET //evil.example/p HTTP/1.1\r\nHost: good.example\r\n".into(),
            Some("https://good.example:8443//evil.example/p"),
        ),
        (
            "GET /%0d%0aSet-Cookie:%20x=1 HTTP/1.1\r\nHost: good.example\r\n".into(),
            Some("https://good.example:8443/%0d%0aSet-Cookie:%20x=1"),
        ),
        // Absolute-form: the target's authority is the host asked for (RFC 9112 §3.2.2),
        // whatever its scheme; user info in it is refused like in Host.
        (
            "GET ftp://good.example/p HTTP/1.1\r\nHost: other.example\r\n".into(),
            Some("https://good.example:8443/p"),
        ),
        (
            "GET http://u@evil.example/p HTTP/1.1\r\nHost: good.example\r\n".into(),
            None,
        ),
        ("GET * HTTP/1.1\r\nHost: good.example\r\n".into(), None),
        (
            "CONNECT good.example:443 HTTP/1.1\r\nHost: good.example\r\n".into(),
            None,
        ),
    ];
    for (head, expected) in &cases {
        let request = format!("{head}Connection: close\r\n\r\n");
        let (status, text) = raw(plain, request.as_bytes()).await;
        let lower = text.to_ascii_lowercase();
        assert!(!lower.contains("\r\nset-cookie"), "{head:?}: {text}");
        match expected {
            Some(location) => {
                assert_eq!(status, 308, "{head:?}: {text}");
                assert_eq!(location_of(&text), Some(*location), "{head:?}: {text}");
            }
            None => {
                assert_eq!(status, 400, "{head:?}: {text}");
                assert_eq!(location_of(&text), None, "{head:?}: {text}");
            }
        }
    }
    assert!(upstream.requests().is_empty(), "{:?}", upstream.requests());
    proxy.stop().await;
}

#[tokio::test]
async fn the_redirect_listener_forwards_only_get_and_head_on_the_exact_probe_path() {
    let upstream = start_upstream().await;
    let proxy = redirecting_proxy(
        TestConfig::new(upstream.addr).redirect_serves_probe(),
        "attack-redirect-probe",
    )
    .await;
    let plain = proxy.redirect.unwrap();
    let auth = bearer(KEY);
    // Answered as the probe, i.e. forwarded to the upstream's /health.
    let probes = [
        "GET /health HTTP/1.1",
        "HEAD /health HTTP/1.1",
        "GET /health?x=/../v1/models HTTP/1.1",
        "GET http://evil.example/health HTTP/1.1",
        "GET /health HTTP/1.0",
    ];
    for line in probes {
        let request = format!("{line}\r\nHost: h\r\nConnection: close\r\n\r\n");
        let (_, text) = raw(plain, request.as_bytes()).await;
        assert!(text.contains(" 200 OK\r\n"), "{line}: {text}");
    }
    // Anything else: a redirect or a refusal, never forwarded, with or without a key, and
    // never a tunnel (the key-less request written after it is not forwarded either).
    let mut others: Vec<String> = LOOKALIKE_TARGETS
        .iter()
        .map(|t| format!("GET {t} HTTP/1.1"))
        .collect();
    for method in [
        "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT",
    ] {
        others.push(format!("{method} /health HTTP/1.1"));
    }
    others.push("GET /v1/models HTTP/1.1".into());
    others.push("GET http://evil.example//health HTTP/1.1".into());
    others.push("GET /docs HTTP/1.1".into());
    for line in &others {
        for key in ["", &format!("Authorization: {auth}\r\n")] {
            let request = format!(
                "{line}\r\nHost: h\r\n{key}Connection: Upgrade\r\nUpgrade: websocket\r\n{WS_HEADERS}Content-Length: 0\r\n\r\n\
                 GET /admin HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
            );
            let (status, text) = raw(plain, request.as_bytes()).await;
            assert!(matches!(status, 308 | 400), "{line}: {text}");
        }
    }
    let seen = upstream.requests();
    assert_eq!(seen.len(), probes.len(), "{seen:?}");
    for s in &seen {
        assert!(s.method == Method::GET || s.method == Method::HEAD, "{s:?}");
        assert!(s.uri == "/health" || s.uri.starts_with("/health?"), "{s:?}");
        assert!(!s.headers.contains_key("x-keygate-key"), "{s:?}");
        assert!(!s.headers.contains_key("upgrade"), "{s:?}");
        assert_eq!(s.headers["x-shared-secret"], SHARED_SECRET);
    }
    proxy.stop().await;
}

#[tokio::test]
async fn h2_extended_connect_with_a_protocol_never_reaches_the_upstream() {
    let upstream = start_always_switching_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let auth = bearer(KEY);
    let mut frames = Vec::new();
    for (id, path, key) in [
        (1, "/ws", true),
        (3, "/health", false),
        (5, "/health", true),
    ] {
        let mut fields: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"CONNECT"),
            (b":protocol", b"websocket"),
            (b":scheme", b"http"),
            (b":authority", b"keygate.test"),
            (b":path", path.as_bytes()),
            (b"sec-websocket-version", b"13"),
        ];
        if key {
            fields.push((b"authorization", auth.as_bytes()));
        }
        frames.push(frame(HEADERS, END_HEADERS, id, &header_block(&fields)));
    }
    let outcome = h2_exchange(proxy.addr, &frames, &[1, 3, 5]).await;
    assert!(
        outcome.answered.len() + outcome.reset.len() == 3 || outcome.connection_ended,
        "{outcome:?}"
    );
    assert!(upstream.requests().is_empty(), "{:?}", upstream.requests());
    proxy.stop().await;
}

#[tokio::test]
async fn a_certificate_replaced_before_its_key_keeps_the_old_pair_until_both_match() {
    let upstream = start_upstream().await;
    let (ca, dir) = (
        support::tls::Ca::new(),
        support::process::TempDir::new("attack-cert-race"),
    );
    let first = ca.issue(30);
    let files = first.install(&dir);
    let text = TestConfig::new(upstream.addr).tls(files).text();
    let proxy = start_proxy_with(&text).await;
    let second = ca.issue(60);
    // A rotation caught half-way: the new certificate with the old key, then a key file cut
    // off mid-write. Each reload must keep the old pair serving.
    dir.write("cert.pem", &second.cert_pem);
    proxy.reload();
    let half = &second.key_pem[..second.key_pem.len() / 2];
    dir.write("key.pem", half);
    proxy.reload();
    for _ in 0..5 {
        let got =
            support::tls::send_tls(proxy.addr, &ca.pem(), &[H1_ALPN], get("/health", &[])).await;
        assert_eq!(got.server_cert, first.der);
        assert_eq!(got.reply.status, StatusCode::OK);
    }
    dir.write("key.pem", &second.key_pem);
    proxy.reload();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let got =
            support::tls::send_tls(proxy.addr, &ca.pem(), &[H2_ALPN], get("/health", &[])).await;
        assert_eq!(got.reply.status, StatusCode::OK);
        if got.server_cert == second.der {
            break;
        }
        assert_eq!(got.server_cert, first.der, "neither certificate was served");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the completed pair was never served"
        );
        tokio::task::yield_now().await;
    }
    proxy.stop().await;
}

/// Sends `request` (a keyed GET on a new connection) until it is answered 200 or the
/// deadline passes, polling every 200 ms; the last status seen.
async fn status_once_a_slot_frees(
    mut request: impl AsyncFnMut() -> http::StatusCode,
) -> http::StatusCode {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let status = request().await;
        if status == http::StatusCode::OK || tokio::time::Instant::now() >= deadline {
            return status;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// keygate over TLS with `max_connections = 1` in front of a recording upstream, and the CA
/// that signed its certificate.
struct OneSlotTls {
    proxy: Proxy,
    ca: support::tls::Ca,
    _dir: support::process::TempDir,
    _upstream: Upstream,
}

async fn one_slot_tls(tag: &str) -> OneSlotTls {
    let upstream = start_upstream().await;
    let (ca, dir) = (support::tls::Ca::new(), support::process::TempDir::new(tag));
    let config = TestConfig::new(upstream.addr).max_connections(1);
    let proxy = support::tls::start_tls_proxy(&ca, &dir, config).await;
    OneSlotTls {
        proxy,
        ca,
        _dir: dir,
        _upstream: upstream,
    }
}

// An HTTP/2 connection without open streams is cut at header_read_timeout like an idle
// HTTP/1.1 one: hyper's h2 server has no timer of its own (src/streams.rs), so without this a
// silent connection would hold a max_connections slot for ever.

#[tokio::test]
async fn a_tls_client_that_picks_h2_and_never_sends_its_preface_is_cut_at_header_read_timeout() {
    let tls = one_slot_tls("found-h2-silent").await;
    // The handshake completes with ALPN h2; then the client says nothing at all. The test
    // config's header_read_timeout is 2 s; DEADLINE is 10 s.
    let mut silent = support::tls::connect(tls.proxy.addr, &tls.ca.pem(), &[H2_ALPN])
        .await
        .unwrap();
    assert_eq!(silent.get_ref().1.alpn_protocol(), Some(H2_ALPN));
    // Panics if the connection is still open at the deadline (5x header_read_timeout).
    read_to_close(&mut silent).await;
    drop(silent);
    tls.proxy.stop().await;
}

#[tokio::test]
async fn silent_tls_h2_connections_cannot_keep_keyed_clients_out_past_header_read_timeout() {
    let tls = one_slot_tls("found-h2-slot").await;
    let silent = support::tls::connect(tls.proxy.addr, &tls.ca.pem(), &[H2_ALPN])
        .await
        .unwrap();
    // Keyed clients over TLS/http1.1 are refused with 503 while the slot is held; once the
    // silent connection is cut (header_read_timeout, 2 s), one must get through.
    let auth = bearer(KEY);
    let last = status_once_a_slot_frees(async || {
        let keyed = get("/v1/models", &[("authorization", &auth)]);
        let got = support::tls::send_tls(tls.proxy.addr, &tls.ca.pem(), &[H1_ALPN], keyed).await;
        got.reply.status
    })
    .await;
    assert_eq!(
        last,
        http::StatusCode::OK,
        "one silent h2 connection kept every keyed client out for DEADLINE"
    );
    drop(silent);
    tls.proxy.stop().await;
}

#[tokio::test]
async fn an_idle_tls_h2_connection_that_answers_pings_is_cut_like_an_idle_http1_one() {
    let tls = one_slot_tls("found-h2-idle").await;
    // A well-behaved h2 client (hyper's) that connects and never sends a request. An idle
    // HTTP/1.1 keep-alive connection is cut by header_read_timeout (2 s); this one must be too.
    let stream = support::tls::connect(tls.proxy.addr, &tls.ca.pem(), &[H2_ALPN])
        .await
        .unwrap();
    let (_sender, conn) =
        hyper::client::conn::http2::handshake::<_, _, http_body_util::Empty<bytes::Bytes>>(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
    let idle = tokio::spawn(conn);
    let ended = tokio::time::timeout(DEADLINE, idle).await;
    assert!(
        ended.is_ok(),
        "an idle h2 connection is still open (holding the only max_connections slot) after 5x header_read_timeout"
    );
    tls.proxy.stop().await;
}

#[tokio::test]
async fn an_h2c_client_that_sends_only_the_preface_is_cut_at_header_read_timeout() {
    let upstream = start_upstream().await;
    let text = TestConfig::new(upstream.addr).max_connections(1).text();
    let proxy = start_proxy_with(&text).await;
    let mut silent = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut silent, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let auth = bearer(KEY);
    let last = status_once_a_slot_frees(async || {
        let keyed = get("/v1/models", &[("authorization", &auth)]);
        send(proxy.addr, keyed).await.status
    })
    .await;
    assert_eq!(last, http::StatusCode::OK);
    drop(silent);
    proxy.stop().await;
}

// Two Host lines are refused with 400 (RFC 9112 §3.2), on both listeners: a front proxy or
// cache reading the last one must not disagree with keygate about the host.

#[tokio::test]
async fn two_host_header_lines_are_refused_on_the_redirect_and_proxy_listeners() {
    let upstream = start_upstream().await;
    let (ca, dir) = (
        support::tls::Ca::new(),
        support::process::TempDir::new("found-two-hosts"),
    );
    let config = TestConfig::new(upstream.addr).redirect_http_listen();
    let proxy = support::tls::start_tls_proxy(&ca, &dir, config).await;
    let two_hosts =
        "GET /p HTTP/1.1\r\nHost: good.example\r\nHost: evil.example\r\nConnection: close\r\n\r\n";
    let plain = start_proxy(upstream.addr).await;
    let keyed = format!(
        "GET /v1/models HTTP/1.1\r\nHost: good.example\r\nHost: evil.example\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n\r\n"
    );
    let (status, text) = raw(plain.addr, keyed.as_bytes()).await;
    assert_eq!(
        status,
        400,
        "proxy listener: {text} / upstream saw {:?}",
        upstream.requests()
    );
    let (status, text) = raw(proxy.redirect.unwrap(), two_hosts.as_bytes()).await;
    assert_eq!(status, 400, "redirect listener: {text}");
    drop(text);
    plain.stop().await;
    proxy.stop().await;
}

// ---------------------------------------------------------------- scopes, presets, pool, SSE

/// A complete response that must never reach a client: if it does, a connection with
/// leftover bytes was reused.
const POISON_RESPONSE: &str = "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON";

/// An origin whose first connection answers its first request with `answer` as is, then
/// holds the connection and answers nothing more; every later connection answers `clean`.
async fn start_misframing_upstream(answer: String) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((mut stream, _)) = listener.accept().await {
            let misframed = std::mem::take(&mut first).then(|| answer.clone());
            tokio::spawn(async move {
                while let Some(head) = read_request_head(&mut stream).await {
                    let mut body = vec![0u8; declared_length(&head)];
                    if stream.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let clean = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nclean";
                    let out = misframed.as_deref().unwrap_or(clean);
                    if stream.write_all(out.as_bytes()).await.is_err() {
                        return;
                    }
                    if misframed.is_some() {
                        let mut sink = [0u8; 1024];
                        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn misframed_upstream_responses_never_poison_the_pool_for_the_next_client() {
    let len = POISON_RESPONSE.len();
    let p = POISON_RESPONSE;
    // A body on HEAD, 204 and 304; bytes beyond Content-Length or after the last chunk; a
    // 100 Continue; duplicate or conflicting framing; an event stream; HTTP/1.0 keep-alive.
    let cases = [
        ("HEAD", format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n{p}")),
        ("HEAD", format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{len:x}\r\n{p}\r\n0\r\n\r\n")),
        ("GET", format!("HTTP/1.1 204 No Content\r\nContent-Length: {len}\r\n\r\n{p}")),
        ("GET", format!("HTTP/1.1 204 No Content\r\n\r\n{p}")),
        ("GET", format!("HTTP/1.1 304 Not Modified\r\nContent-Length: {len}\r\n\r\n{p}")),
        ("GET", format!("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok{p}")),
        ("GET", format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n{p}")),
        ("GET", format!("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok{p}")),
        ("GET", format!("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok{p}")),
        ("GET", format!("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n{p}")),
        ("GET", format!("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 2\r\n\r\nok{p}")),
        ("GET", format!("HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok{p}")),
    ];
    for (method, answer) in cases {
        let upstream = start_misframing_upstream(answer.clone()).await;
        let proxy = start_proxy(upstream).await;
        let first = request(
            method.parse().unwrap(),
            "/v1/models",
            &[("authorization", &bearer(KEY))],
            "",
        );
        let first = send(proxy.addr, first).await;
        assert!(!first.text().contains("POISON"), "{answer:?}");
        // The next clients, with another key, must each get their own answer.
        for _ in 0..3 {
            let reply = send(
                proxy.addr,
                get("/v1/models", &[("authorization", &bearer(CI_KEY))]),
            )
            .await;
            assert_eq!(reply.status, StatusCode::OK, "{answer:?}");
            assert_eq!(reply.body, "clean", "{answer:?}");
        }
        proxy.stop().await;
    }
}

/// The test config with the vLLM preset, `keys` and no public path.
fn vllm_preset_config(
    upstream: std::net::SocketAddr,
    keys: impl IntoIterator<Item = Key>,
) -> String {
    TestConfig::new(upstream)
        .keys(keys)
        .preset("vllm")
        .public_paths(&[])
        .text()
}

/// Targets an ordinary key might use to reach vLLM's admin routes, or routes the preset
/// does not list, through an origin that decodes or normalises paths.
const PRESET_ESCAPES: [&str; 30] = [
    "/%73tart_profile",
    "/start_profile/",
    "/start_profile;x",
    "/start_profile%3bx",
    "//start_profile",
    "/v1/../start_profile",
    "/./start_profile",
    "/START_PROFILE",
    "http://x/start_profile",
    "http://x//start_profile",
    "/v1/chat/completions/../../start_profile",
    "/v1/responses/..%2f..%2fstart_profile",
    "/v1/responses/%2e%2e/cancel",
    "/v1/responses/%2E./cancel",
    "/v1/responses/",
    "/v1/responses//cancel",
    "/v1/responses/a/..;/cancel",
    "/start_profile%00",
    "/start_profile%20",
    "/%2fstart_profile",
    "/v1/responses/..",
    "/v1/responses/.",
    "*",
    "/start_profile#x",
    "/metrics",
    "/v1/models/../metrics",
    "/v1/models%2f..%2fmetrics",
    "/v1%2fmodels",
    "/%76%31/models",
    "/v1/models/",
];

#[tokio::test]
async fn preset_admin_and_unlisted_routes_cannot_be_reached_by_path_or_method_tricks() {
    let upstream = start_upstream().await;
    let proxy = start_proxy_with(&vllm_preset_config(
        upstream.addr,
        [Key::env("default", "API_KEY")],
    ))
    .await;
    let auth = bearer(KEY);
    let methods = [
        "GET", "POST", "HEAD", "OPTIONS", "get", "post", "PROPFIND", "PUT", "DELETE",
    ];
    for method in methods {
        for target in PRESET_ESCAPES {
            let req = format!("{method} {target} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let (status, _) = raw(proxy.addr, req.as_bytes()).await;
            assert_ne!(status, 200, "{method} {target}");
        }
    }
    // The same over HTTP/2, where `:path` need not start with a slash or be origin-form.
    for path in PRESET_ESCAPES.iter().chain(&[
        "start_profile",
        "%2fstart_profile",
        "/v1/models#/../start_profile",
    ]) {
        for method in ["POST", "GET"] {
            let block = keyed(method, path, &[]);
            let outcome = h2_exchange(
                proxy.addr,
                &[frame(HEADERS, END_HEADERS | END_STREAM, 1, &block)],
                &[1],
            )
            .await;
            assert!(
                !outcome.answered.is_empty() || !outcome.reset.is_empty(),
                "{method} {path}: {outcome:?}"
            );
        }
    }
    // Only `GET /v1/models#/../start_profile` passes: the fragment is no part of the path,
    // so keygate checks and forwards plain `/v1/models`, an inference route.
    let seen = upstream.requests();
    let reached: Vec<_> = seen
        .iter()
        .map(|s| (s.method.as_str(), s.uri.as_str()))
        .collect();
    assert_eq!(reached, [("GET", "/v1/models")]);
    proxy.stop().await;
}

#[tokio::test]
async fn an_allow_path_prefix_cannot_be_escaped_by_path_tricks() {
    let upstream = start_upstream().await;
    let text = TestConfig::new(upstream.addr)
        .keys([
            Key::env("default", "API_KEY").allow(&[], "/v1/chat/"),
            Key::env("ci", "CI_KEY"),
        ])
        .text();
    let proxy = start_proxy_with(&text).await;
    let auth = bearer(KEY);
    for target in [
        "/v1/chat/../../start_profile",
        "/v1/chat/%2e%2e/%2e%2e/start_profile",
        "/v1/chat/.%2E/.%2e/start_profile",
        "/v1/chat/..%2f..%2fstart_profile",
        "/v1/chat/..%5c..%5cstart_profile",
        "/v1/chat/..\\..\\start_profile",
        "/v1/chat//../start_profile",
        "/v1/chat/./../../start_profile",
        "http://x/v1/chat/../../start_profile",
        "/v1/chat/..",
        "/V1/chat/completions",
        "//v1/chat/completions",
    ] {
        let req = format!("POST {target} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        let (status, _) = raw(proxy.addr, req.as_bytes()).await;
        assert!(matches!(status, 400 | 403), "{target}: {status}");
    }
    let inside = request(
        Method::POST,
        "http://x/v1/chat/completions?stream=true#frag",
        &[("authorization", &auth)],
        "",
    );
    assert_eq!(send(proxy.addr, inside).await.status, StatusCode::OK);
    let seen = upstream.requests();
    let uris: Vec<&str> = seen.iter().map(|s| s.uri.as_str()).collect();
    assert_eq!(
        uris,
        ["/v1/chat/completions?stream=true"],
        "exactly the path keygate checked"
    );
    proxy.stop().await;
}

/// An origin that never answers a request for `/v1/responses/hang` (it holds the connection
/// and reports it on the channel) and answers `ok` to anything else after reading its body.
async fn start_hanging_upstream() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(head) = read_request_head(&mut stream).await {
                    if head.contains(" /v1/responses/hang ") {
                        let _ = tx.send(());
                        let mut sink = [0u8; 1024];
                        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                        return;
                    }
                    let mut body = vec![0u8; declared_length(&head)];
                    if stream.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    if stream.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// Keyed GETs until one is admitted (the key's one slot is free again), or the deadline.
async fn one_slot_comes_back(addr: std::net::SocketAddr) -> bool {
    let auth = bearer(KEY);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let reply = send(addr, get("/v1/models", &[("authorization", &auth)])).await;
        if reply.status == StatusCode::OK {
            return true;
        }
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::task::yield_now().await;
    }
}

/// Opens an h2c connection, sends `frames` on it, and waits until the hanging upstream has
/// the request; returns the connection, still open.
async fn h2_hanging(
    addr: std::net::SocketAddr,
    frames: &[Vec<u8>],
    hung: &mut tokio::sync::mpsc::UnboundedReceiver<()>,
) -> TcpStream {
    let stream = h2_send(addr, frames).await;
    tokio::time::timeout(DEADLINE, hung.recv())
        .await
        .expect("the request reaches the upstream")
        .unwrap();
    stream
}

#[tokio::test]
async fn a_max_concurrent_slot_comes_back_after_resets_hang_ups_and_refused_bodies() {
    let (upstream, mut hung) = start_hanging_upstream().await;
    let text = TestConfig::new(upstream)
        .keys([
            Key::env("default", "API_KEY").max_concurrent(1),
            Key::env("ci", "CI_KEY"),
        ])
        .text();
    let proxy = start_proxy_with(&text).await;
    let auth = bearer(KEY);
    let cancel = 8u32.to_be_bytes();

    // HTTP/2 RST_STREAM while keygate waits for the response headers.
    let headers = keyed("GET", "/v1/responses/hang", &[]);
    let held = [frame(HEADERS, END_HEADERS | END_STREAM, 1, &headers)];
    let mut h2 = h2_hanging(proxy.addr, &held, &mut hung).await;
    let busy = send(proxy.addr, get("/v1/models", &[("authorization", &auth)])).await;
    assert_eq!(busy.status, StatusCode::TOO_MANY_REQUESTS);
    h2.write_all(&frame(RST_STREAM, 0, 1, &cancel))
        .await
        .unwrap();
    assert!(
        one_slot_comes_back(proxy.addr).await,
        "h2 reset before headers"
    );
    drop(h2);

    // HTTP/2 RST_STREAM in the middle of an upload.
    let headers = keyed("POST", "/v1/responses/hang", &[(b"content-length", b"100")]);
    let held = [
        frame(HEADERS, END_HEADERS, 1, &headers),
        frame(DATA, 0, 1, b"0123456789"),
    ];
    let mut h2 = h2_hanging(proxy.addr, &held, &mut hung).await;
    h2.write_all(&frame(RST_STREAM, 0, 1, &cancel))
        .await
        .unwrap();
    assert!(one_slot_comes_back(proxy.addr).await, "h2 reset mid-upload");
    drop(h2);

    // An HTTP/2 connection closed with the stream in flight.
    let headers = keyed("GET", "/v1/responses/hang", &[]);
    let held = [frame(HEADERS, END_HEADERS | END_STREAM, 1, &headers)];
    drop(h2_hanging(proxy.addr, &held, &mut hung).await);
    assert!(
        one_slot_comes_back(proxy.addr).await,
        "h2 connection closed"
    );

    // An HTTP/1.1 client that hangs up mid-upload.
    let mut h1 = TcpStream::connect(proxy.addr).await.unwrap();
    let upload = format!("POST /v1/responses/hang HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 100\r\n\r\n0123");
    h1.write_all(upload.as_bytes()).await.unwrap();
    tokio::time::timeout(DEADLINE, hung.recv())
        .await
        .unwrap()
        .unwrap();
    drop(h1);
    assert!(
        one_slot_comes_back(proxy.addr).await,
        "h1 hang-up mid-upload"
    );

    // A body refused by its declared length, and one refused mid-stream (chunked).
    let declared = format!("POST /v1/x HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 2000000\r\nConnection: close\r\n\r\n");
    assert_eq!(raw(proxy.addr, declared.as_bytes()).await.0, 413);
    assert!(one_slot_comes_back(proxy.addr).await, "declared too large");
    // To an upstream that reads the body and never answers, so the limit, not an early
    // answer, ends the exchange.
    let mut h1 = TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!("POST /v1/responses/hang HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\n\r\n");
    h1.write_all(head.as_bytes()).await.unwrap();
    let chunk = [b'a'; 64 * 1024];
    for _ in 0..20 {
        let sent = async {
            h1.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .await?;
            h1.write_all(&chunk).await?;
            h1.write_all(b"\r\n").await
        };
        if sent.await.is_err() {
            break;
        }
    }
    let answer = read_to_close(&mut h1).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 413"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        one_slot_comes_back(proxy.addr).await,
        "too large mid-stream"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn refused_requests_take_no_slot_and_are_refused_for_their_own_reason() {
    let (upstream, mut hung) = start_hanging_upstream().await;
    let key = Key::env("default", "API_KEY")
        .max_concurrent(1)
        .allow(&["GET"], "/v1/");
    let proxy = start_proxy_with(&vllm_preset_config(upstream, [key])).await;
    let auth = bearer(KEY);
    let mut holder = TcpStream::connect(proxy.addr).await.unwrap();
    let held =
        format!("GET /v1/responses/hang HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\n");
    holder.write_all(held.as_bytes()).await.unwrap();
    tokio::time::timeout(DEADLINE, hung.recv())
        .await
        .unwrap()
        .unwrap();
    let cases = [
        (Method::GET, "/nonexistent", KEY, StatusCode::NOT_FOUND),
        (Method::HEAD, "/v1/models", KEY, StatusCode::NOT_FOUND),
        (Method::GET, "/metrics", KEY, StatusCode::FORBIDDEN),
        (
            Method::POST,
            "/v1/chat/completions",
            KEY,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::GET,
            "/v1/models",
            "kg-never-issued-key-000000000",
            StatusCode::UNAUTHORIZED,
        ),
        (
            Method::GET,
            "/v1/models",
            KEY,
            StatusCode::TOO_MANY_REQUESTS,
        ),
    ];
    for _ in 0..3 {
        for (method, path, key, want) in &cases {
            let auth = bearer(key);
            let reply = send(
                proxy.addr,
                request(method.clone(), path, &[("authorization", &auth)], ""),
            )
            .await;
            assert_eq!(reply.status, *want, "{method} {path}");
        }
    }
    drop(holder);
    assert!(one_slot_comes_back(proxy.addr).await);
    proxy.stop().await;
}

/// Whether `prefix` of an event stream ends between events by the SSE line rules (CR LF, LF
/// or CR each end a line; an empty line ends an event), worked out independently of keygate.
fn sse_between_events(prefix: &[u8]) -> bool {
    let (mut line, mut last_empty, mut at_line_end) = (0usize, false, false);
    let mut i = 0;
    while i < prefix.len() {
        if matches!(prefix[i], b'\r' | b'\n') {
            if prefix[i] == b'\r' && prefix.get(i + 1) == Some(&b'\n') {
                i += 1;
            }
            (last_empty, line, at_line_end) = (line == 0, 0, true);
        } else {
            (line, at_line_end) = (line + 1, false);
        }
        i += 1;
    }
    prefix.is_empty() || (at_line_end && last_empty)
}

#[tokio::test]
async fn sse_keepalives_and_the_error_event_land_only_between_events_whatever_the_line_ends() {
    let every = std::time::Duration::from_millis(10);
    let mut clock = KeepaliveClock::start(every).await;
    let (upstream, mut senders) = start_streaming_upstream().await;
    let text = TestConfig::new(upstream.addr)
        .idle_timeout(std::time::Duration::from_secs(60))
        .sse_keepalive(every)
        .text();
    let proxy = start_proxy_with(&text).await;
    let mut body = open(proxy.addr, keyed_chat()).await.into_body();
    let mut sender = senders.recv().await.unwrap();
    let stream: &[u8] =
        b"data: a\r\n\r\ndata: b\rdata: c\r\r: note\n\nevent: x\ndata: d\n\r\ndata: e\r\n\r";
    // One byte at a time: after each, a keep-alive must come when the stream is between
    // events; when it is not, nothing may come in three intervals, so the next byte must be
    // the very next frame.
    let mut between = true;
    for (i, byte) in stream.iter().enumerate() {
        sender
            .send_data(bytes::Bytes::copy_from_slice(&[*byte]))
            .await
            .unwrap();
        let frame = if between {
            next_data_after_keepalives(&mut body).await
        } else {
            next_data(&mut body).await
        };
        assert_eq!(
            frame,
            [*byte][..],
            "{frame:?} inside an event, after {:?}",
            String::from_utf8_lossy(&stream[..i])
        );
        let prefix = &stream[..=i];
        between = sse_between_events(prefix);
        if between {
            let next = next_data(&mut body).await;
            assert_eq!(
                next,
                KEEP_ALIVE,
                "after {:?}",
                String::from_utf8_lossy(prefix)
            );
        } else {
            clock.intervals(3).await;
        }
    }
    // The stream ends between events (its last blank line is a lone CR): the error event
    // comes, whole, then the abnormal end.
    sender.abort("upstream crashed".into());
    let frame = next_data_after_keepalives(&mut body).await;
    let event = String::from_utf8_lossy(&frame).into_owned();
    assert!(
        event.starts_with("event: error\ndata: {") && event.ends_with("}\n\n"),
        "{event}"
    );
    assert!(matches!(next_frame(&mut body).await, Some(Err(_))));
    proxy.stop().await;
}
