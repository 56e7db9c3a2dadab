//! Idle HTTP/1.1 keep-alive connections are parked: after a second without a request, keygate
//! drops hyper's state for the connection and keeps only its socket
//! (`keygate_connections_parked`). A parked connection behaves as one that was not: its next
//! request is served, bytes of a next head that came with the last request are kept, it is
//! closed `header_read_timeout` after its last response, when its client closes it, and at
//! shutdown.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PARKED: &str = "keygate_connections_parked";

fn request(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n")
}

/// Reads one response with a `Content-Length` body; returns its status.
async fn response(stream: &mut TcpStream) -> u16 {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(DEADLINE, async {
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:")?.trim().parse().ok())
                    .unwrap_or(0);
                if got.len() >= end + 4 + length {
                    return head[9..12].parse().unwrap();
                }
            }
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "keygate closed the connection");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("a response within the deadline")
}

/// A keep-alive connection that has been answered once.
async fn answered_once(proxy: &Proxy) -> TcpStream {
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(request("/v1/models").as_bytes())
        .await
        .unwrap();
    assert_eq!(response(&mut stream).await, 200);
    stream
}

/// Scrapes until `series` is exactly `value`.
async fn wait_for_exactly(proxy: &Proxy, series: &str, value: f64) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let text = scrape(proxy).await;
        if sample(&text, series) == value {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} never came to {value}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn start(upstream: &Upstream) -> Proxy {
    start_proxy_with(&TestConfig::new(upstream.addr).admin().text()).await
}

/// With the timeouts that would close a parked connection far beyond the deadline.
async fn start_patient(upstream: &Upstream) -> Proxy {
    let config = TestConfig::new(upstream.addr)
        .admin()
        .header_read_timeout(Duration::from_secs(600))
        .shutdown_grace(Duration::from_secs(600));
    start_proxy_with(&config.text()).await
}

#[tokio::test]
async fn a_parked_connection_serves_its_next_request() {
    let upstream = start_upstream().await;
    let proxy = start(&upstream).await;
    let mut stream = answered_once(&proxy).await;
    wait_for_exactly(&proxy, PARKED, 1.0).await;
    for _ in 0..2 {
        stream
            .write_all(request("/v1/models").as_bytes())
            .await
            .unwrap();
        assert_eq!(response(&mut stream).await, 200);
    }
    assert_eq!(upstream.requests().len(), 3);
    proxy.stop().await;
}

/// The client sent the start of its next request with the last one: hyper has read it when
/// the connection is parked, and the next session gets it.
#[tokio::test]
async fn the_start_of_a_next_head_sent_with_a_request_is_kept() {
    let upstream = start_upstream().await;
    let proxy = start(&upstream).await;
    let mut first = TcpStream::connect(proxy.addr).await.unwrap();
    let next = request("/v1/next");
    let (start, rest) = next.split_at(next.len() / 2);
    first
        .write_all(format!("{}{start}", request("/v1/models")).as_bytes())
        .await
        .unwrap();
    assert_eq!(response(&mut first).await, 200);
    // A connection answered after that one parks after it: once this one is parked, the
    // first has passed its parking point too.
    let _second = answered_once(&proxy).await;
    wait_for_exactly(&proxy, PARKED, 1.0).await;
    first.write_all(rest.as_bytes()).await.unwrap();
    assert_eq!(response(&mut first).await, 200);
    let uris: Vec<String> = upstream.requests().into_iter().map(|r| r.uri).collect();
    assert_eq!(uris, ["/v1/models", "/v1/models", "/v1/next"]);
    proxy.stop().await;
}

#[tokio::test]
async fn a_parked_connection_closes_with_its_client() {
    let upstream = start_upstream().await;
    let proxy = start_patient(&upstream).await;
    let stream = answered_once(&proxy).await;
    wait_for_exactly(&proxy, PARKED, 1.0).await;
    drop(stream);
    wait_for_exactly(&proxy, PARKED, 0.0).await;
    wait_for_exactly(&proxy, "keygate_connections", 0.0).await;
    proxy.stop().await;
}

#[tokio::test]
async fn a_parked_connection_is_closed_at_shutdown() {
    let upstream = start_upstream().await;
    let mut proxy = start_patient(&upstream).await;
    let mut stream = answered_once(&proxy).await;
    wait_for_exactly(&proxy, PARKED, 1.0).await;
    proxy.begin_shutdown();
    assert!(read_to_close(&mut stream).await.is_empty());
    assert!(proxy.finished().await);
}

/// `header_read_timeout` (2 s here) bounds the wait for the next request from the end of the
/// last response, whether the connection is parked meanwhile (after 1 s) or not.
#[tokio::test]
async fn an_idle_connection_is_closed_header_read_timeout_after_its_last_response() {
    let upstream = start_upstream().await;
    let proxy = start(&upstream).await;
    let mut stream = answered_once(&proxy).await;
    let answered = Instant::now();
    wait_for_exactly(&proxy, PARKED, 1.0).await;
    assert!(read_to_close(&mut stream).await.is_empty());
    let open_for = answered.elapsed();
    assert!(
        open_for >= Duration::from_secs(2),
        "closed after {open_for:?}"
    );
    proxy.stop().await;
}
