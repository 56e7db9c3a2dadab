//! Framing across the proxy, from the second adversarial review: an upstream connection
//! still busy writing a stalled upload never goes back to the pool (where it would hold up
//! the next client), and an event stream whose origin declared a `Content-Length` is sent
//! without it, since keygate may add comments and an error event to it.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// An origin that answers `GET /v1/models` at once, before reading the request's body (as a
/// FastAPI GET handler or a Starlette 404 does), then reads the body and serves the next
/// request on the same connection; everything else after reading its body.
async fn start_early_answering_upstream() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                while let Some(head) = read_request_head(&mut stream).await {
                    let early = head.starts_with("GET /v1/models ");
                    if early {
                        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nmodels";
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                    let mut body = vec![0u8; declared_length(&head)];
                    if stream.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    if !early {
                        let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nclean";
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// A client sends a keyed GET with `Content-Length: 1000`, two bytes of body, and stalls. The
/// origin answers before reading the body, and the answer ends cleanly, but hyper is still
/// writing the stalled body on that upstream connection: it must not be pooled, or the next
/// request (any client, any key) would wait behind it until `response_timeout`.
#[tokio::test]

async fn a_stalled_upload_answered_early_never_holds_up_another_clients_request() {
    let upstream = start_early_answering_upstream().await;
    let proxy = start_proxy(upstream).await;
    let mut attacker = TcpStream::connect(proxy.addr).await.unwrap();
    let stalled = format!(
        "GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 1000\r\n\r\nab"
    );
    attacker.write_all(stalled.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    while !seen.ends_with(b"models") {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(DEADLINE, attacker.read(&mut chunk))
            .await
            .expect("the early answer within the deadline")
            .unwrap();
        assert!(n > 0, "keygate closed the connection");
        seen.extend_from_slice(&chunk[..n]);
    }
    // The attacker holds its connection open and never sends the rest of the body.
    let victim = send(
        proxy.addr,
        request(
            Method::POST,
            "/v1/chat/completions",
            &[("authorization", &bearer(CI_KEY))],
            "{}",
        ),
    )
    .await;
    assert_eq!(victim.status, StatusCode::OK, "{}", victim.text());
    assert_eq!(victim.body, "clean");
    drop(attacker);
    proxy.stop().await;
}

/// An SSE origin that declares `Content-Length: 40`, sends its first event (9 bytes) at once,
/// waits for `go`, then sends `rest` (the remaining 31 bytes) or, without it, closes the
/// connection: a stream broken short of its length.
async fn start_sized_event_stream_upstream(
    rest: Option<&'static str>,
    go: Arc<Notify>,
) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let go = go.clone();
            tokio::spawn(async move {
                let Some(head) = read_request_head(&mut stream).await else {
                    return;
                };
                let mut body = vec![0u8; declared_length(&head)];
                let _ = stream.read_exact(&mut body).await;
                let answer = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 40\r\n\r\ndata: 1\n\n";
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                go.notified().await;
                if let Some(rest) = rest {
                    let _ = stream.write_all(rest.as_bytes()).await;
                    let mut sink = [0u8; 64];
                    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                }
            });
        }
    });
    addr
}

fn chat() -> http::Request<http_body_util::Full<Bytes>> {
    request(
        Method::POST,
        "/v1/chat/completions",
        &[("authorization", &bearer(KEY))],
        "{}",
    )
}

/// Reads the body to its end; after the first frame, wakes the upstream. Returns the bytes
/// and whether the end was clean.
async fn read_waking(body: &mut hyper::body::Incoming, go: &Notify) -> (Vec<u8>, bool) {
    let mut bytes = Vec::new();
    loop {
        match next_frame(body).await {
            Some(Ok(frame)) => {
                bytes.extend_from_slice(frame.data_ref().unwrap());
                go.notify_one();
            }
            Some(Err(_)) => return (bytes, false),
            None => return (bytes, true),
        }
    }
}

/// An event stream whose origin declares its `Content-Length` (a buffering framework, or a
/// proxy in front of the model server) still arrives whole with keep-alive comments added:
/// counted against the declared length, the comments would push the origin's last event
/// past it and hyper would cut it off, with a clean end.
#[tokio::test]
async fn keepalives_never_cut_an_event_stream_that_has_a_content_length() {
    const REST: &str = "data: 22222222222222222222222\n\n";
    assert_eq!(REST.len() + 9, 40);
    let go = Arc::new(Notify::new());
    let upstream = start_sized_event_stream_upstream(Some(REST), go.clone()).await;
    let text = TestConfig::new(upstream)
        .sse_keepalive(Duration::from_millis(100))
        .text();
    let proxy = start_proxy_with(&text).await;
    let mut body = open(proxy.addr, chat()).await.into_body();
    // The first frame is the first event; the upstream then waits for a second frame, which
    // can only be a keep-alive comment, before it sends the rest.
    let first = next_frame(&mut body).await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "data: 1\n\n");
    let (rest, _) = read_waking(&mut body, &go).await;
    let events = String::from_utf8_lossy(&rest).replace(": keep-alive\n\n", "");
    assert_eq!(events, REST, "every byte of the origin's events arrives");
    proxy.stop().await;
}

/// The same stream breaking before its declared length ends with the whole `event: error`
/// and abnormally: counted against the length, the event would be cut in half and the
/// response would end cleanly, a broken stream looking complete.
#[tokio::test]
async fn a_broken_event_stream_with_a_content_length_never_looks_complete() {
    let go = Arc::new(Notify::new());
    let upstream = start_sized_event_stream_upstream(None, go.clone()).await;
    let proxy = start_proxy(upstream).await;
    let mut body = open(proxy.addr, chat()).await.into_body();
    let (bytes, clean) = read_waking(&mut body, &go).await;
    let text = String::from_utf8_lossy(&bytes);
    assert!(!clean, "a broken stream ended cleanly with {text:?}");
    let event = text
        .strip_prefix("data: 1\n\nevent: error\ndata: ")
        .and_then(|e| e.strip_suffix("\n\n"))
        .unwrap_or_else(|| panic!("the origin's event, then the whole error event: {text:?}"));
    let error: serde_json::Value = serde_json::from_str(event)
        .unwrap_or_else(|e| panic!("the error event's data is one JSON line ({e}): {text:?}"));
    assert_eq!(error["error"]["code"], "upstream_stream_broken", "{text:?}");
    proxy.stop().await;
}
