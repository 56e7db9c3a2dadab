//! Lifecycle: on shutdown keygate stops accepting, lets open requests and streams
//! finish within `shutdown_grace`, answers the probe 503 meanwhile, and cuts what is still
//! open when the grace expires. At start-up, a listen address that cannot be bound is named
//! with the listener it is for.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Waits until nothing accepts connections on `addr` any more.
async fn wait_until_refusing(addr: std::net::SocketAddr) {
    tokio::time::timeout(DEADLINE, async {
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the listener closes after shutdown begins");
}

#[tokio::test]
async fn drain_lets_an_inflight_stream_finish_and_refuses_new_connections() {
    let (upstream, mut senders) = start_streaming_upstream().await;
    let mut proxy = start_proxy(upstream.addr).await;
    let (mut body, mut sender) = stream_first_event(proxy.addr, &mut senders).await;

    proxy.begin_shutdown();
    wait_until_refusing(proxy.addr).await;

    for i in 2..5 {
        let event = format!("data: {i}\n\n");
        sender.send_data(Bytes::from(event.clone())).await.unwrap();
        assert_eq!(
            next_frame(&mut body)
                .await
                .unwrap()
                .unwrap()
                .into_data()
                .unwrap(),
            event
        );
    }
    drop(sender);
    assert!(
        next_frame(&mut body).await.is_none(),
        "the drained stream ends cleanly"
    );
    assert!(
        proxy.finished().await,
        "keygate stops once the last stream is done"
    );
}

#[tokio::test]
async fn grace_expiry_cuts_an_unfinished_stream_abnormally() {
    let (upstream, mut senders) = start_streaming_upstream().await;
    let text = TestConfig::new(upstream.addr)
        .shutdown_grace(Duration::from_millis(200))
        .text();
    let mut proxy = start_proxy_with(&text).await;
    let (mut body, sender) = stream_first_event(proxy.addr, &mut senders).await;

    proxy.begin_shutdown();
    assert!(
        proxy.finished().await,
        "keygate stops when the grace expires"
    );
    let end = next_frame(&mut body).await;
    assert!(
        matches!(end, Some(Err(_))),
        "a cut stream must not end cleanly: {end:?}"
    );
    drop(sender);
}

#[tokio::test]
async fn probe_answers_503_once_draining_has_begun() {
    // Once the listener is closed, only a request already being read reaches the handler, so
    // the handler is driven directly over an in-memory connection.
    let upstream = start_upstream().await;
    let config = parse_config(&config_text(upstream.addr, ""));
    let gateway = std::sync::Arc::new(keygate::Gateway::new(
        &config,
        keygate::Clock::system(),
        keygate::Admission::local(),
    ));
    let peer = std::sync::Arc::new(keygate::Peer::new("127.0.0.1:1".parse().unwrap(), false));
    let (client_io, server_io) = tokio::io::duplex(4096);
    let service_gateway = gateway.clone();
    let service = hyper::service::service_fn(move |req| {
        let (gateway, peer) = (service_gateway.clone(), peer.clone());
        async move { Ok::<_, std::convert::Infallible>(gateway.handle(&peer, req).await) }
    });
    tokio::spawn(
        hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(server_io), service),
    );
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(client_io))
            .await
            .unwrap();
    tokio::spawn(conn);

    let before = sender.send_request(get("/health", &[])).await.unwrap();
    assert_eq!(before.status(), StatusCode::OK);
    gateway.start_draining();
    let during = sender.send_request(get("/health", &[])).await.unwrap();
    assert_eq!(during.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = http_body_util::BodyExt::collect(during.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert!(String::from_utf8_lossy(&body).contains(r#""code":"draining""#));
    let other = sender
        .send_request(get("/v1/models", &[("authorization", &bearer(KEY))]))
        .await
        .unwrap();
    assert_eq!(
        other.status(),
        StatusCode::OK,
        "only the probe changes while draining"
    );
    assert_eq!(
        upstream.requests().len(),
        2,
        "the draining probe is not forwarded"
    );
}

#[tokio::test]
async fn idle_keepalive_connections_are_closed_at_shutdown() {
    let upstream = start_upstream().await;
    let mut proxy = start_proxy(upstream.addr).await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let request =
        format!("GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut first = [0u8; 12];
    stream.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    proxy.begin_shutdown();
    let mut rest = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest))
        .await
        .expect("keygate closes the idle keep-alive connection")
        .unwrap();
    assert!(proxy.finished().await);
}

#[test]
fn a_busy_listen_address_is_named_with_its_own_listener() {
    let dir = support::process::TempDir::new("busy-listener");
    let tls = support::tls::Ca::new().issue(30).install(&dir);
    let upstream: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    for (listener, taken_by) in [
        ("[server] listen", "--listen"),
        ("[admin] listen", "[admin]"),
        ("[server] redirect_http_listen", "redirect_http_listen"),
    ] {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = held.local_addr().unwrap().to_string();
        let (listen, config) = match taken_by {
            "--listen" => (busy.clone(), TestConfig::new(upstream)),
            "[admin]" => (
                "127.0.0.1:0".into(),
                TestConfig::new(upstream).tables(&format!("[admin]\nlisten = \"{busy}\"\n")),
            ),
            _ => (
                "127.0.0.1:0".into(),
                TestConfig::new(upstream)
                    .tls(tls.clone())
                    .redirect_http_listen_on(&busy),
            ),
        };
        let config = config.text();
        let path = dir.write("keygate.toml", &config);
        let (status, _, stderr) = support::process::run_to_end(
            &["--config", path.to_str().unwrap(), "--listen", &listen],
            &support::process::ENV,
        );
        assert!(!status.success(), "{listener}: {stderr}");
        assert!(
            stderr.contains(&format!("keygate: cannot listen on {busy} ({listener}): ")),
            "{listener}: {stderr}"
        );
        assert_eq!(stderr.matches("cannot listen").count(), 1, "{stderr}");
        drop(held);
    }
}
