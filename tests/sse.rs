//! SSE fidelity: keep-alive comments while a `text/event-stream` response is
//! silent, only between events and without extending `idle_timeout`; and a final
//! `event: error` before a broken stream ends abnormally.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use hyper::body::Incoming;
use support::*;

const KEEPALIVE: Duration = Duration::from_millis(100);

/// The test config with an admin listener and a 5 s `idle_timeout`.
fn sse_config(upstream: std::net::SocketAddr) -> TestConfig {
    TestConfig::new(upstream)
        .admin()
        .idle_timeout(Duration::from_secs(5))
}

/// A streamed chat completion that asks for its usage itself, so keygate passes each byte on
/// as it comes (in a stream whose usage keygate asked for, an event is held until it cannot be
/// the usage event: see tests/usage.rs).
fn chat() -> http::Request<http_body_util::Full<Bytes>> {
    request(
        Method::POST,
        "/v1/chat/completions",
        &[("authorization", &bearer(KEY))],
        r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
    )
}

#[tokio::test]
async fn keepalive_comments_arrive_while_the_upstream_is_silent() {
    let (upstream, mut senders) = start_streaming_upstream().await;
    let proxy = start_proxy_with(&sse_config(upstream.addr).sse_keepalive(KEEPALIVE).text()).await;
    let mut body = open(proxy.addr, chat()).await.into_body();
    let mut sender = senders.recv().await.unwrap();
    for _ in 0..3 {
        assert_eq!(next_data(&mut body).await, KEEP_ALIVE);
    }
    sender
        .send_data(Bytes::from_static(b"data: {\"token\":1}\n\n"))
        .await
        .unwrap();
    assert_eq!(
        next_data_after_keepalives(&mut body).await,
        "data: {\"token\":1}\n\n"
    );
    drop(sender);
    let mut end = next_frame(&mut body).await;
    while matches!(&end, Some(Ok(f)) if f.data_ref().is_some_and(|d| d == KEEP_ALIVE)) {
        end = next_frame(&mut body).await;
    }
    assert!(end.is_none(), "clean end after the upstream's: {end:?}");
    wait_for_sample(
        &proxy,
        r#"keygate_sse_keepalives_total{key="default"}"#,
        3.0,
    )
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn keepalive_waits_for_the_end_of_an_event() {
    let mut clock = KeepaliveClock::start(KEEPALIVE).await;
    let (upstream, mut senders) = start_streaming_upstream().await;
    let proxy = start_proxy_with(&sse_config(upstream.addr).sse_keepalive(KEEPALIVE).text()).await;
    let mut body = open(proxy.addr, chat()).await.into_body();
    let mut sender = senders.recv().await.unwrap();
    sender
        .send_data(Bytes::from_static(b"data: {\"tok"))
        .await
        .unwrap();
    assert_eq!(next_data(&mut body).await, "data: {\"tok");
    // Keep-alives fall due inside the event; none may be sent: the event's end is the very
    // next frame.
    clock.intervals(3).await;
    sender
        .send_data(Bytes::from_static(b"en\":1}\n\n"))
        .await
        .unwrap();
    assert_eq!(next_data(&mut body).await, "en\":1}\n\n");
    assert_eq!(next_data(&mut body).await, KEEP_ALIVE);
    drop((body, sender));
    proxy.stop().await;
}

#[tokio::test]
async fn keepalives_do_not_keep_an_idle_stream_alive() {
    let (upstream, mut senders) = start_streaming_upstream().await;
    // Ten keep-alive intervals: the first comment is due long before the idle timeout, and
    // were comments to count as traffic, the stream would never end.
    let proxy = start_proxy_with(
        &sse_config(upstream.addr)
            .idle_timeout(10 * KEEPALIVE)
            .sse_keepalive(KEEPALIVE)
            .text(),
    )
    .await;
    let mut body = open(proxy.addr, chat()).await.into_body();
    let sender = senders.recv().await.unwrap();
    let mut keepalives = 0;
    let until_the_end = async {
        loop {
            let frame = next_data(&mut body).await;
            if frame != KEEP_ALIVE {
                return frame;
            }
            keepalives += 1;
        }
    };
    let error = tokio::time::timeout(DEADLINE, until_the_end)
        .await
        .expect("the idle timeout ends the stream, keep-alives or not");
    assert!(keepalives >= 1, "{keepalives}");
    assert_error_event(&error, "upstream_idle_timeout");
    let end = next_frame(&mut body).await;
    assert!(matches!(end, Some(Err(_))), "an abnormal end: {end:?}");
    drop(sender);
    proxy.stop().await;
}

#[tokio::test]
async fn without_sse_keepalive_a_silent_stream_gets_nothing_added() {
    let mut clock = KeepaliveClock::start(KEEPALIVE).await;
    let (upstream, mut senders) = start_streaming_upstream().await;
    let proxy = start_proxy_with(&sse_config(upstream.addr).text()).await;
    let mut body = open(proxy.addr, chat()).await.into_body();
    let sender = senders.recv().await.unwrap();
    clock.intervals(3).await;
    drop(sender);
    let end = next_frame(&mut body).await;
    assert!(end.is_none(), "nothing but the end: {end:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn only_event_streams_get_keepalives() {
    let mut clock = KeepaliveClock::start(KEEPALIVE).await;
    let (upstream, mut senders) = start_streaming_upstream_as("application/json").await;
    let proxy = start_proxy_with(&sse_config(upstream.addr).sse_keepalive(KEEPALIVE).text()).await;
    let mut body = open(proxy.addr, chat()).await.into_body();
    let sender = senders.recv().await.unwrap();
    clock.intervals(3).await;
    drop(sender);
    let end = next_frame(&mut body).await;
    assert!(end.is_none(), "nothing but the end: {end:?}");
    proxy.stop().await;
}

/// `frame` is one `event: error` whose data is keygate's OpenAI-shaped error with `code`.
fn assert_error_event(frame: &Bytes, code: &str) {
    let text = std::str::from_utf8(frame).unwrap();
    let json = text
        .strip_prefix("event: error\ndata: ")
        .and_then(|rest| rest.strip_suffix("\n\n"))
        .unwrap_or_else(|| panic!("not an error event: {text:?}"));
    let value: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(value["error"]["type"], "upstream_error", "{text}");
    assert_eq!(value["error"]["code"], code, "{text}");
}

async fn assert_error_event_then_abnormal_end(mut body: Incoming, mut sender: BodySender) {
    sender
        .send_data(Bytes::from_static(b"data: 1\n\n"))
        .await
        .unwrap();
    assert_eq!(next_data(&mut body).await, "data: 1\n\n");
    sender.abort("upstream crashed".into());
    assert_error_event(&next_data(&mut body).await, "upstream_stream_broken");
    let end = next_frame(&mut body).await;
    assert!(matches!(end, Some(Err(_))), "never a clean end: {end:?}");
}

#[tokio::test]
async fn a_broken_stream_gets_an_error_event_then_ends_abnormally() {
    let (upstream, mut senders) = start_streaming_upstream().await;
    let proxy = start_proxy_with(&sse_config(upstream.addr).text()).await;
    let body = open(proxy.addr, chat()).await.into_body();
    assert_error_event_then_abnormal_end(body, senders.recv().await.unwrap()).await;
    wait_for_sample(
        &proxy,
        r#"keygate_sse_error_events_total{key="default"}"#,
        1.0,
    )
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn a_broken_http2_stream_gets_an_error_event_then_a_reset() {
    let (upstream, mut senders) = start_streaming_upstream().await;
    let proxy = start_proxy_with(&sse_config(upstream.addr).text()).await;
    let body = open_h2(proxy.addr, chat()).await.into_body();
    assert_error_event_then_abnormal_end(body, senders.recv().await.unwrap()).await;
    proxy.stop().await;
}

#[tokio::test]
async fn a_stream_broken_inside_an_event_ends_without_an_error_event() {
    let (upstream, mut senders) = start_streaming_upstream().await;
    let proxy = start_proxy_with(&sse_config(upstream.addr).text()).await;
    let mut body = open(proxy.addr, chat()).await.into_body();
    let mut sender = senders.recv().await.unwrap();
    sender
        .send_data(Bytes::from_static(b"data: {\"tok"))
        .await
        .unwrap();
    assert_eq!(next_data(&mut body).await, "data: {\"tok");
    sender.abort("upstream crashed".into());
    let end = next_frame(&mut body).await;
    assert!(matches!(end, Some(Err(_))), "an abnormal end: {end:?}");
    proxy.stop().await;
}
