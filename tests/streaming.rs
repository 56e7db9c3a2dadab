//! Streaming: bodies pass frame by frame in both directions, every SSE event
//! reaches the client before the upstream sends the next, a client that hangs up cancels the
//! upstream request, and a stream that breaks ends abnormally, never cleanly. (What keygate
//! adds to SSE streams, keep-alives and the final error event, is in sse.rs; the broken
//! streams here are NDJSON, which get nothing added.)

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::*;

fn chat_request() -> http::Request<http_body_util::Full<Bytes>> {
    let auth = bearer(KEY);
    request(
        Method::POST,
        "/v1/chat/completions",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        r#"{"model":"m","stream":true,"messages":[]}"#,
    )
}

#[tokio::test]
async fn every_sse_event_reaches_the_client_before_the_next_is_sent() {
    let (upstream, mut senders) = start_streaming_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let response = open(proxy.addr, chat_request()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let mut sender = senders.recv().await.unwrap();
    for i in 0..20 {
        let event = format!("data: {{\"token\":{i}}}\n\n");
        sender.send_data(Bytes::from(event.clone())).await.unwrap();
        let frame = next_frame(&mut body).await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), event);
    }
    sender
        .send_data(Bytes::from_static(b"data: [DONE]\n\n"))
        .await
        .unwrap();
    drop(sender);
    assert_eq!(
        next_frame(&mut body)
            .await
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap(),
        "data: [DONE]\n\n"
    );
    assert!(
        next_frame(&mut body).await.is_none(),
        "clean end after the upstream's clean end"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn client_hangup_mid_stream_closes_the_upstream_connection() {
    let (upstream, mut senders) = start_streaming_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let response = open(proxy.addr, chat_request()).await;
    let mut body = response.into_body();
    let mut sender = senders.recv().await.unwrap();
    sender
        .send_data(Bytes::from_static(b"data: 1\n\n"))
        .await
        .unwrap();
    next_frame(&mut body).await.unwrap().unwrap();
    assert_eq!(upstream.connections_closed(), 0);
    drop(body);
    upstream
        .wait_until("the upstream connection to close", |u| {
            u.connections_closed() == 1
        })
        .await;
    proxy.stop().await;
}

#[tokio::test]
async fn complete_responses_give_their_upstream_connection_back_and_a_hangup_does_not() {
    let (upstream, mut senders) = start_streaming_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    for _ in 0..3 {
        let (mut body, sender) = stream_first_event(proxy.addr, &mut senders).await;
        drop(sender);
        assert!(next_frame(&mut body).await.is_none(), "a clean end");
    }
    assert_eq!(
        upstream.connections_opened(),
        1,
        "one upstream connection serves streams that ended cleanly, one after the other"
    );
    let (body, _sender) = stream_first_event(proxy.addr, &mut senders).await;
    drop(body);
    upstream
        .wait_until("the abandoned connection to close", |u| {
            u.connections_closed() == 1
        })
        .await;
    let next = open(proxy.addr, chat_request()).await;
    assert_eq!(
        upstream.connections_opened(),
        2,
        "a new connection after the hang-up"
    );
    drop(next);
    proxy.stop().await;
}

#[tokio::test]
async fn sized_and_bodiless_responses_give_their_upstream_connection_back() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let auth = bearer(KEY);
    for method in [
        Method::GET,
        Method::HEAD,
        Method::GET,
        Method::POST,
        Method::GET,
    ] {
        let reply = send(
            proxy.addr,
            request(method, "/v1/models", &[("authorization", &auth)], ""),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eq!(upstream.connections_opened(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn client_hangup_before_response_headers_closes_the_upstream_connection() {
    let (silent, mut events) = start_silent_upstream().await;
    let proxy = start_proxy(silent).await;
    hang_up_once_forwarded(proxy.addr, &mut events).await;
    wait_for_close(&mut events).await;
    proxy.stop().await;
}

#[tokio::test]
async fn upload_streams_through_in_many_chunks() {
    let upstream = start_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let (mut tx, req) = upload("/v1/files");
    let sending = tokio::spawn(async move {
        for i in 0..64u8 {
            tx.send_data(Bytes::from(vec![i; 8192])).await.unwrap();
        }
    });
    let response = open(proxy.addr, req).await;
    assert_eq!(response.status(), StatusCode::OK);
    sending.await.unwrap();
    let seen = upstream.wait_for_requests(1).await;
    assert_eq!(seen[0].body.len(), 64 * 8192);
    assert!(seen[0]
        .body
        .chunks(8192)
        .enumerate()
        .all(|(i, c)| c.iter().all(|&b| b == i as u8)));
    proxy.stop().await;
}

/// Sends one event, checks it arrives, then breaks the upstream's stream: the client's body
/// must end with an error, never cleanly.
async fn assert_upstream_break_ends_abnormally(
    mut body: hyper::body::Incoming,
    senders: &mut tokio::sync::mpsc::UnboundedReceiver<BodySender>,
) {
    let mut sender = senders.recv().await.unwrap();
    sender
        .send_data(Bytes::from_static(b"data: 1\n\n"))
        .await
        .unwrap();
    next_frame(&mut body).await.unwrap().unwrap();
    sender.abort("upstream crashed".into());
    let end = next_frame(&mut body).await;
    assert!(
        matches!(end, Some(Err(_))),
        "a broken stream must not end cleanly: {end:?}"
    );
}

#[tokio::test]
async fn upstream_reset_mid_stream_ends_the_client_stream_abnormally() {
    let (upstream, mut senders) = start_streaming_upstream_as("application/x-ndjson").await;
    let proxy = start_proxy(upstream.addr).await;
    let body = open(proxy.addr, chat_request()).await.into_body();
    assert_upstream_break_ends_abnormally(body, &mut senders).await;
    proxy.stop().await;
}

#[tokio::test]
async fn silent_stream_past_idle_timeout_ends_abnormally() {
    let (upstream, mut senders) = start_streaming_upstream_as("application/x-ndjson").await;
    let text = TestConfig::new(upstream.addr)
        .idle_timeout(Duration::from_millis(300))
        .text();
    let proxy = start_proxy_with(&text).await;
    let (mut body, sender) = stream_first_event(proxy.addr, &mut senders).await;
    let end = next_frame(&mut body).await;
    assert!(
        matches!(end, Some(Err(_))),
        "an idle stream must not end cleanly: {end:?}"
    );
    drop(sender);
    proxy.stop().await;
}

#[tokio::test]
async fn steady_stream_longer_than_idle_timeout_is_never_cut() {
    const IDLE: Duration = Duration::from_secs(1);
    let (upstream, mut senders) = start_streaming_upstream().await;
    let text = TestConfig::new(upstream.addr).idle_timeout(IDLE).text();
    let proxy = start_proxy_with(&text).await;
    let mut body = open(proxy.addr, chat_request()).await.into_body();
    let mut sender = senders.recv().await.unwrap();
    // Each event is sent as soon as the one before it arrived, so the upstream is silent
    // only for a round trip, however slowly the machine runs, while the stream as a whole
    // outlasts the idle timeout twice over.
    let started = tokio::time::Instant::now();
    let mut events = 0;
    while started.elapsed() < 2 * IDLE {
        sender
            .send_data(Bytes::from_static(b"data: t\n\n"))
            .await
            .unwrap();
        assert_eq!(
            next_data(&mut body).await,
            "data: t\n\n",
            "event {events} after {:?}",
            started.elapsed()
        );
        events += 1;
    }
    // The same stream, once silent, is cut: the idle timeout was in force all along.
    let error = next_data(&mut body).await;
    assert!(
        error.starts_with(b"event: error\n")
            && String::from_utf8_lossy(&error).contains("upstream_idle_timeout"),
        "{error:?}"
    );
    let end = next_frame(&mut body).await;
    assert!(matches!(end, Some(Err(_))), "{end:?}");
    drop(sender);
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_reset_mid_stream_resets_the_http2_stream() {
    let (upstream, mut senders) = start_streaming_upstream_as("application/x-ndjson").await;
    let proxy = start_proxy(upstream.addr).await;
    let body = open_h2(proxy.addr, chat_request()).await.into_body();
    assert_upstream_break_ends_abnormally(body, &mut senders).await;
    proxy.stop().await;
}
