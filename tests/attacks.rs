//! Attacks on SPEC §5 ("Never") that the other test files do not try: HTTP/2 → HTTP/1.1
//! downgrade tricks with hand-made frames, framing headers that an origin could read
//! differently, hop-by-hop and upgrade tricks, odd request-target forms, authentication
//! state across requests of one connection, odd bytes, and `Debug` output of the types on the
//! request path. Each test asserts the safe behaviour.

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

/// Writes the preface, empty SETTINGS and `frames`, then answers SETTINGS and PING until
/// every stream in `streams` was answered to its end or reset, or the connection went away.
async fn h2_exchange(addr: std::net::SocketAddr, frames: &[Vec<u8>], streams: &[u32]) -> H2Outcome {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut out = H2_PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    for f in frames {
        out.extend(f);
    }
    stream.write_all(&out).await.unwrap();
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
    let text = config_text(
        upstream.addr,
        "\n[[inject]]\nname = \"x_origin_secret\"\nvalue = \"${SHARED_SECRET}\"\n",
    )
    .replace(
        "identity_header = \"x-keygate-key\"",
        "identity_header = \"x_keygate_id\"",
    );
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

#[tokio::test]
async fn a_101_from_the_upstream_never_turns_a_keyless_probe_into_a_tunnel() {
    let upstream = start_upstream_with(|_| fixed(StatusCode::SWITCHING_PROTOCOLS, "")).await;
    let proxy = start_proxy(upstream.addr).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                break;
            }
            head.push(byte[0]);
        }
    })
    .await
    .expect("a response head within the deadline");
    // Whatever keygate answered, what follows on this connection is not a tunnel to the
    // upstream: a key-less request written now must not reach it.
    let _ = stream
        .write_all(b"GET /admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest)).await;
    let seen = upstream.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].uri, "/health");
    assert!(!seen[0].headers.contains_key("upgrade"));
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
    let rules = keygate::rewrite::Rules::new(&config);
    let matched = config.auth.keys.verify(KEY.as_bytes()).unwrap();
    let mut headers = http::HeaderMap::new();
    headers.insert("authorization", bearer(KEY).parse().unwrap());
    let credential = keygate::auth::credential(&headers);
    let debug = format!("{rules:?} {matched:?} {credential:?}");
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
