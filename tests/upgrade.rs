//! Protocol upgrades: a WebSocket upgrade with a valid key becomes a byte tunnel
//! to the upstream, with the injected headers on its handshake; every other upgrade (key-less,
//! `h2c`, one the upstream was not asked for) is dropped or refused; a tunnel closes after
//! `idle_timeout` of silence, counts as an open connection, and drains with the others.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

/// The handshake headers of a WebSocket client (RFC 6455 §4.1; the key is the RFC's example).
const WEBSOCKET: [(&str, &str); 4] = [
    ("connection", "Upgrade"),
    ("upgrade", "websocket"),
    ("sec-websocket-version", "13"),
    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
];
/// The accept value for that key; keygate passes it through without checking it.
const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
/// What the upstream writes first on every tunnel, before it echoes.
const GREETING: &[u8] = b"hello from upstream";
/// `idle_timeout` in the configs of the idle tests; the base config's 2 s would only slow them.
/// The traffic that must keep a tunnel open is silent only for a round trip at a time.
const IDLE: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------- a WebSocket-ish upstream

struct Record {
    requests: Mutex<Vec<Seen>>,
    /// Tunnels whose client side the upstream saw end (EOF or error).
    tunnels_closed: AtomicUsize,
    /// Bytes the `/push` tunnels are to send: one each time the test adds a permit.
    pushes: Semaphore,
    changed: Notify,
}

/// An HTTP/1.1 origin with upgrades, recording every request. By path:
/// - `/switch`: 101 to websocket whatever was asked (and nothing after);
/// - `/other`: 101 to a protocol nobody asked for;
/// - `/decline`: 200, even to an upgrade request;
/// - `/push`: a WebSocket upgrade request gets 101; then the upstream sends [`GREETING`], and
///   a `.` each time the test calls [`WsUpstream::push`]; what the client sends is dropped;
/// - anything else: a WebSocket upgrade request gets 101, then [`GREETING`], then every byte
///   back (echo); any other request gets 200 `ok`.
///
/// Every 101 reflects the injected headers it received, as a careless origin might.
struct WsUpstream {
    addr: SocketAddr,
    record: Arc<Record>,
}

async fn start_ws_upstream() -> WsUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let record = Arc::new(Record {
        requests: Mutex::default(),
        tunnels_closed: AtomicUsize::new(0),
        pushes: Semaphore::new(0),
        changed: Notify::new(),
    });
    let shared = record.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let record = shared.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let record = record.clone();
                    async move { Ok::<_, Infallible>(answer(req, &record)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    WsUpstream { addr, record }
}

fn answer(mut req: Request<Incoming>, record: &Arc<Record>) -> Response<UpBody> {
    let asked = req
        .headers()
        .get("upgrade")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let path = req.uri().path().to_owned();
    let seen = Seen {
        method: req.method().clone(),
        uri: req.uri().to_string(),
        headers: req.headers().clone(),
        body: Bytes::new(),
    };
    let response = match path.as_str() {
        "/switch" => switching(&seen.headers, "websocket"),
        "/other" => switching(&seen.headers, "chat-2000"),
        "/decline" => fixed(StatusCode::OK, "no websocket here"),
        _ if asked => {
            let on_upgrade = hyper::upgrade::on(&mut req);
            let record = record.clone();
            let push = path == "/push";
            tokio::spawn(async move {
                let Ok(upgraded) = on_upgrade.await else {
                    return;
                };
                let pushes = push.then_some(&record.pushes);
                serve_tunnel(TokioIo::new(upgraded), pushes).await;
                record.tunnels_closed.fetch_add(1, Ordering::SeqCst);
                record.changed.notify_waiters();
            });
            switching(&seen.headers, "websocket")
        }
        _ => fixed(StatusCode::OK, "ok"),
    };
    record.requests.lock().unwrap().push(seen);
    record.changed.notify_waiters();
    response
}

fn switching(request: &HeaderMap, protocol: &'static str) -> Response<UpBody> {
    let mut response = fixed(StatusCode::SWITCHING_PROTOCOLS, "");
    let headers = response.headers_mut();
    headers.insert("upgrade", HeaderValue::from_static(protocol));
    headers.insert("connection", HeaderValue::from_static("Upgrade"));
    headers.insert("sec-websocket-accept", HeaderValue::from_static(ACCEPT));
    for name in ["x-shared-secret", "x-upstream-token"] {
        if let Some(value) = request.get(name) {
            headers.insert(name, value.clone());
        }
    }
    response
}

/// The upstream's side of a tunnel, until the other side ends it: an echo, or with `pushes`
/// a byte for each of its permits.
async fn serve_tunnel(mut io: TokioIo<Upgraded>, pushes: Option<&Semaphore>) {
    if io.write_all(GREETING).await.is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    if let Some(pushes) = pushes {
        let (mut reader, mut writer) = tokio::io::split(io);
        loop {
            tokio::select! {
                permit = pushes.acquire() => {
                    permit.expect("the semaphore is never closed").forget();
                    if writer.write_all(b".").await.is_err() {
                        return;
                    }
                }
                read = reader.read(&mut buf) => if !matches!(read, Ok(n) if n > 0) {
                    return;
                },
            }
        }
    }
    loop {
        match io.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if io.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

impl WsUpstream {
    fn requests(&self) -> Vec<Seen> {
        self.record.requests.lock().unwrap().clone()
    }

    fn tunnels_closed(&self) -> usize {
        self.record.tunnels_closed.load(Ordering::SeqCst)
    }

    /// Has a `/push` tunnel send one more byte.
    fn push(&self) {
        self.record.pushes.add_permits(1);
    }

    async fn wait_until(&self, what: &str, check: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let changed = self.record.changed.notified();
            if check(self) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!("upstream: timed out waiting for {what}");
            }
        }
    }

    /// The only request the upstream received.
    async fn only_request(&self) -> Seen {
        self.wait_until("a request", |u| !u.requests().is_empty())
            .await;
        let seen = self.requests();
        assert_eq!(seen.len(), 1, "{seen:#?}");
        seen.into_iter().next().unwrap()
    }
}

// ---------------------------------------------------------------- the client side

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Opens an HTTP/1.1 connection that can be upgraded and sends `req` on it; returns the
/// response with its body unread, and the connection for a next request.
async fn send_upgradable(
    addr: SocketAddr,
    req: Request<Full<Bytes>>,
) -> (Response<Incoming>, Sender) {
    tokio::time::timeout(DEADLINE, async {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn.with_upgrades());
        let response = sender.send_request(req).await.unwrap();
        (response, sender)
    })
    .await
    .expect("response headers within the deadline")
}

/// A GET asking for a WebSocket, with `extra` headers.
fn websocket(path: &str, extra: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let headers: Vec<_> = WEBSOCKET.iter().chain(extra).copied().collect();
    get(path, &headers)
}

/// A WebSocket request with a valid key on a new connection.
fn keyed_websocket(path: &str) -> Request<Full<Bytes>> {
    websocket(path, &[("authorization", &bearer(KEY))])
}

/// The client's end of a tunnel through keygate.
struct Tunnel {
    io: TokioIo<Upgraded>,
    /// The 101's headers, as the client saw them.
    headers: HeaderMap,
}

/// Opens a tunnel through keygate at `addr` and reads the upstream's greeting.
async fn open_tunnel(addr: SocketAddr, req: Request<Full<Bytes>>) -> Tunnel {
    let (response, _) = send_upgradable(addr, req).await;
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let headers = response.headers().clone();
    let upgraded = tokio::time::timeout(DEADLINE, hyper::upgrade::on(response))
        .await
        .expect("the upgrade within the deadline")
        .expect("the client side upgrades");
    let mut tunnel = Tunnel {
        io: TokioIo::new(upgraded),
        headers,
    };
    assert_eq!(tunnel.read_exact(GREETING.len()).await, GREETING);
    tunnel
}

impl Tunnel {
    async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        tokio::time::timeout(DEADLINE, self.io.read_exact(&mut buf))
            .await
            .expect("bytes through the tunnel within the deadline")
            .expect("the tunnel is open");
        buf
    }

    /// Sends `bytes` and reads the upstream's echo of them.
    async fn echo(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
        assert_eq!(self.read_exact(bytes.len()).await, bytes);
    }

    /// Sends `bytes`; `true` when the echo came back, `false` when the tunnel was closed.
    async fn echo_or_closed(&mut self, bytes: &[u8]) -> bool {
        if self.io.write_all(bytes).await.is_err() {
            return false;
        }
        let mut buf = vec![0; bytes.len()];
        match tokio::time::timeout(DEADLINE, self.io.read_exact(&mut buf)).await {
            Ok(Ok(_)) => {
                assert_eq!(buf, bytes);
                true
            }
            Ok(Err(_)) => false,
            Err(_) => panic!("neither the echo nor the end of the tunnel within the deadline"),
        }
    }

    /// Waits for keygate to close the tunnel, reading nothing more; returns when it did.
    async fn wait_for_close(&mut self) -> Instant {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(DEADLINE, self.io.read(&mut buf))
            .await
            .expect("the tunnel closes within the deadline");
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "unexpected bytes instead of the end: {:?}",
            read.map(|n| Bytes::copy_from_slice(&buf[..n]))
        );
        Instant::now()
    }
}

/// Runs `exchange` on the tunnel for twice `IDLE`, each time as soon as the one before it is
/// done, so the tunnel is silent only for a round trip however slowly the machine runs; then
/// waits for keygate to close the tunnel, and asserts it did so only after `IDLE` of silence.
async fn busy_then_silent(tunnel: &mut Tunnel, mut exchange: impl AsyncFnMut(&mut Tunnel)) {
    let started = Instant::now();
    let mut last = started;
    while last - started < 2 * IDLE {
        last = Instant::now();
        exchange(tunnel).await;
    }
    // Taken before the last exchange began, so keygate's silence began after it.
    let silence = tunnel.wait_for_close().await - last;
    assert!(
        silence >= IDLE,
        "closed after {silence:?} of silence, before idle_timeout"
    );
}

fn has_upgrade_headers(headers: &HeaderMap) -> bool {
    headers.contains_key("upgrade")
        || headers
            .get_all("connection")
            .iter()
            .any(|v| v.to_str().unwrap().to_ascii_lowercase().contains("upgrade"))
}

fn assert_json_error(reply: &Reply, status: StatusCode, code: &str) {
    assert_eq!(reply.status, status, "{}", reply.text());
    assert_eq!(reply.headers["content-type"], "application/json");
    assert_eq!(reply.json()["error"]["code"], code, "{}", reply.text());
    assert!(!has_upgrade_headers(&reply.headers), "{:?}", reply.headers);
}

// ---------------------------------------------------------------- the tests

#[tokio::test]
async fn websocket_with_a_valid_key_is_tunnelled_with_the_injected_headers() {
    let upstream = start_ws_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let mut tunnel = open_tunnel(proxy.addr, keyed_websocket("/v1/realtime?model=m")).await;
    assert_eq!(tunnel.headers["upgrade"], "websocket");
    assert_eq!(
        tunnel.headers["connection"]
            .to_str()
            .unwrap()
            .to_ascii_lowercase(),
        "upgrade"
    );
    assert_eq!(tunnel.headers["sec-websocket-accept"], ACCEPT);
    for i in 0..5u8 {
        tunnel.echo(&[b'a' + i; 3000]).await;
    }

    let seen = upstream.only_request().await;
    assert_eq!(seen.uri, "/v1/realtime?model=m");
    assert_eq!(seen.headers["upgrade"], "websocket");
    assert!(has_upgrade_headers(&seen.headers));
    assert_eq!(seen.headers["sec-websocket-key"], WEBSOCKET[3].1);
    assert_eq!(seen.headers["sec-websocket-version"], "13");
    assert_eq!(seen.headers["x-shared-secret"], SHARED_SECRET);
    assert_eq!(
        seen.headers["x-upstream-token"],
        format!("Bearer {UPSTREAM_TOKEN}").as_str()
    );
    assert_eq!(seen.headers["x-keygate-key"], "default");
    assert!(!seen.headers.contains_key("authorization"));
    proxy.stop().await;
}

#[tokio::test]
async fn injected_values_reflected_in_the_101_never_reach_the_client() {
    let upstream = start_ws_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let mut tunnel = open_tunnel(
        proxy.addr,
        websocket(
            "/ws",
            &[
                ("x-api-key", KEY),
                ("x-shared-secret", "client-forged"),
                ("x-upstream-token", "client-forged"),
            ],
        ),
    )
    .await;
    tunnel.echo(b"ping").await;
    // The upstream got (and reflected) the configured values, not the client's.
    let seen = upstream.only_request().await;
    assert_eq!(seen.headers["x-shared-secret"], SHARED_SECRET);
    assert!(!seen.headers.contains_key("x-api-key"));
    assert!(!tunnel.headers.contains_key("x-shared-secret"));
    assert!(!tunnel.headers.contains_key("x-upstream-token"));
    for value in tunnel.headers.values() {
        let value = value.to_str().unwrap();
        assert!(!value.contains(SHARED_SECRET) && !value.contains(UPSTREAM_TOKEN));
    }
    proxy.stop().await;
}

#[tokio::test]
async fn websocket_without_a_key_is_refused_before_the_upstream() {
    let upstream = start_ws_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let (response, _) = send_upgradable(proxy.addr, websocket("/ws", &[])).await;
    let reply = read_reply(response).await;
    assert_json_error(&reply, StatusCode::UNAUTHORIZED, "invalid_api_key");
    assert!(upstream.requests().is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn websocket_with_a_wrong_key_is_refused_before_the_upstream() {
    let upstream = start_ws_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let wrong = bearer("kg-test-wrong-key-000000000000");
    let (response, _) =
        send_upgradable(proxy.addr, websocket("/ws", &[("authorization", &wrong)])).await;
    let reply = read_reply(response).await;
    assert_json_error(&reply, StatusCode::UNAUTHORIZED, "invalid_api_key");
    assert!(reply.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .contains("invalid_token"));
    assert!(upstream.requests().is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn keyless_upgrade_on_the_probe_and_public_paths_is_served_without_it() {
    let upstream = start_ws_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    for (i, path) in ["/health", "/docs"].into_iter().enumerate() {
        let (response, _) = send_upgradable(proxy.addr, websocket(path, &[])).await;
        let reply = read_reply(response).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
        assert_eq!(reply.text(), "ok", "{path}: the upstream's own answer");
        assert!(!has_upgrade_headers(&reply.headers), "{path}");
        upstream
            .wait_until("the request", |u| u.requests().len() > i)
            .await;
        let seen = &upstream.requests()[i];
        assert_eq!(seen.uri, path);
        assert!(
            !has_upgrade_headers(&seen.headers),
            "{path}: {:?}",
            seen.headers
        );
        assert!(!seen.headers.contains_key("x-keygate-key"));
    }
    assert_eq!(upstream.tunnels_closed(), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn h2c_upgrade_is_never_honoured_and_the_connection_stays_http1() {
    let upstream = start_ws_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let auth = bearer(KEY);
    let h2c = get(
        "/v1/models",
        &[
            ("authorization", &auth),
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ],
    );
    let (response, mut sender) = send_upgradable(proxy.addr, h2c).await;
    let reply = read_reply(response).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.text(), "ok");
    assert!(!has_upgrade_headers(&reply.headers));
    let seen = upstream.only_request().await;
    assert!(!has_upgrade_headers(&seen.headers), "{:?}", seen.headers);
    assert!(!seen.headers.contains_key("http2-settings"));
    // The same connection carries the next HTTP/1.1 request.
    let next = tokio::time::timeout(
        DEADLINE,
        sender.send_request(get("/v1/next", &[("authorization", &auth)])),
    )
    .await
    .expect("the next response within the deadline")
    .expect("the connection is still HTTP/1.1");
    assert_eq!(next.status(), StatusCode::OK);
    upstream
        .wait_until("the second request", |u| u.requests().len() == 2)
        .await;
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_101_to_a_request_without_upgrade_is_a_502() {
    let upstream = start_ws_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let reply = send(
        proxy.addr,
        get("/switch", &[("authorization", &bearer(KEY))]),
    )
    .await;
    assert_json_error(&reply, StatusCode::BAD_GATEWAY, "upstream_protocol_error");
    assert_eq!(reply.json()["error"]["type"], "upstream_error");
    assert!(!has_upgrade_headers(&upstream.only_request().await.headers));
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_switching_to_another_protocol_than_websocket_is_a_502() {
    let upstream = start_ws_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let (response, _) = send_upgradable(proxy.addr, keyed_websocket("/other")).await;
    let reply = read_reply(response).await;
    assert_json_error(&reply, StatusCode::BAD_GATEWAY, "upstream_protocol_error");
    assert_eq!(
        upstream.only_request().await.headers["upgrade"],
        "websocket"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_declining_the_upgrade_is_answered_normally_on_a_usable_connection() {
    let upstream = start_ws_upstream().await;
    let proxy = start_proxy(upstream.addr).await;
    let (response, mut sender) = send_upgradable(proxy.addr, keyed_websocket("/decline")).await;
    let reply = read_reply(response).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "no websocket here");
    assert!(!has_upgrade_headers(&reply.headers));
    let next = tokio::time::timeout(
        DEADLINE,
        sender.send_request(get("/v1/next", &[("authorization", &bearer(KEY))])),
    )
    .await
    .expect("the next response within the deadline")
    .expect("the connection is still HTTP/1.1");
    assert_eq!(read_reply(next).await.text(), "ok");
    proxy.stop().await;
}

/// A WebSocket asked for on a keep-alive connection that keygate parked after its first
/// request: the 101 ends a session that began with the parked socket, which the tunnel takes.
#[tokio::test]
async fn websocket_on_a_connection_parked_before_is_tunnelled() {
    let upstream = start_ws_upstream().await;
    let proxy = start_proxy_with(&TestConfig::new(upstream.addr).admin().text()).await;
    let auth = bearer(KEY);
    let (first, mut sender) =
        send_upgradable(proxy.addr, get("/v1/models", &[("authorization", &auth)])).await;
    assert_eq!(read_reply(first).await.text(), "ok");
    wait_for_sample(&proxy, "keygate_connections_parked", 1.0).await;
    let response = tokio::time::timeout(DEADLINE, sender.send_request(keyed_websocket("/ws")))
        .await
        .expect("the 101 within the deadline")
        .expect("the parked connection takes the request");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let upgraded = tokio::time::timeout(DEADLINE, hyper::upgrade::on(response))
        .await
        .expect("the upgrade within the deadline")
        .expect("the client side upgrades");
    let mut tunnel = Tunnel {
        io: TokioIo::new(upgraded),
        headers: HeaderMap::new(),
    };
    assert_eq!(tunnel.read_exact(GREETING.len()).await, GREETING);
    tunnel.echo(b"after parking").await;
    proxy.stop().await;
}

#[tokio::test]
async fn tunnel_traffic_keeps_it_open_and_silence_closes_it_after_idle_timeout() {
    let upstream = start_ws_upstream().await;
    let proxy = start_proxy_with(&TestConfig::new(upstream.addr).idle_timeout(IDLE).text()).await;
    let mut tunnel = open_tunnel(proxy.addr, keyed_websocket("/ws")).await;
    busy_then_silent(&mut tunnel, async |t| t.echo(b"tick").await).await;
    upstream
        .wait_until("the upstream side of the tunnel to close", |u| {
            u.tunnels_closed() == 1
        })
        .await;
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_only_traffic_keeps_a_tunnel_open_past_idle_timeout() {
    let upstream = start_ws_upstream().await;
    let proxy = start_proxy_with(&TestConfig::new(upstream.addr).idle_timeout(IDLE).text()).await;
    let mut tunnel = open_tunnel(proxy.addr, keyed_websocket("/push")).await;
    // The client never writes: each byte comes from the upstream.
    busy_then_silent(&mut tunnel, async |t| {
        upstream.push();
        assert_eq!(t.read_exact(1).await, b".");
    })
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn a_tunnel_counts_as_an_open_connection_until_the_client_closes_it() {
    let upstream = start_ws_upstream().await;
    let proxy = start_proxy_with(&TestConfig::new(upstream.addr).admin().text()).await;
    let mut tunnel = open_tunnel(proxy.addr, keyed_websocket("/ws")).await;
    tunnel.echo(b"ping").await;
    assert_eq!(connections(&proxy).await, 1.0);
    tunnel.echo(b"still open").await;
    drop(tunnel);
    upstream
        .wait_until("the upstream side of the tunnel to close", |u| {
            u.tunnels_closed() == 1
        })
        .await;
    let deadline = Instant::now() + DEADLINE;
    while connections(&proxy).await != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the closed tunnel leaves the gauge"
        );
        tokio::task::yield_now().await;
    }
    proxy.stop().await;
}

#[tokio::test]
async fn an_open_tunnel_holds_its_keys_concurrency_slot() {
    let upstream = start_ws_upstream().await;
    let text = TestConfig::new(upstream.addr)
        .keys([
            Key::env("default", "API_KEY").max_concurrent(1),
            Key::env("ci", "CI_KEY"),
        ])
        .text();
    let proxy = start_proxy_with(&text).await;
    let auth = bearer(KEY);
    let mut tunnel = open_tunnel(proxy.addr, keyed_websocket("/ws")).await;
    tunnel.echo(b"ping").await;
    let busy = send(proxy.addr, get("/v1/models", &[("authorization", &auth)])).await;
    assert_json_error(
        &busy,
        StatusCode::TOO_MANY_REQUESTS,
        "concurrency_limit_exceeded",
    );
    drop(tunnel);
    upstream
        .wait_until("the upstream side of the tunnel to close", |u| {
            u.tunnels_closed() == 1
        })
        .await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let reply = send(proxy.addr, get("/v1/models", &[("authorization", &auth)])).await;
        if reply.status == StatusCode::OK {
            break;
        }
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(
            Instant::now() < deadline,
            "the closed tunnel keeps its slot"
        );
        tokio::task::yield_now().await;
    }
    proxy.stop().await;
}

/// `keygate_connections` from the admin listener.
async fn connections(proxy: &Proxy) -> f64 {
    let text = send(proxy.admin.unwrap(), get("/metrics", &[]))
        .await
        .text();
    text.lines()
        .find_map(|line| line.strip_prefix("keygate_connections ")?.parse().ok())
        .unwrap_or_else(|| panic!("no keygate_connections in {text}"))
}

#[tokio::test]
async fn draining_waits_for_an_open_tunnel_and_ends_when_it_closes() {
    let upstream = start_ws_upstream().await;
    // A grace far beyond the deadline: only the tunnel's end can let the proxy stop in time.
    let text = TestConfig::new(upstream.addr)
        .shutdown_grace(Duration::from_secs(60))
        .text();
    let mut proxy = start_proxy_with(&text).await;
    let mut tunnel = open_tunnel(proxy.addr, keyed_websocket("/ws")).await;
    proxy.begin_shutdown();
    // Draining has begun once the listener is gone; the tunnel still works after that.
    let deadline = Instant::now() + DEADLINE;
    while TcpStream::connect(proxy.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "the listener closes on shutdown");
        tokio::task::yield_now().await;
    }
    for _ in 0..3 {
        tunnel.echo(b"draining").await;
    }
    // A drain that did not wait for the tunnel would have ended at once, with nothing else
    // open, long before these echoes came back.
    assert!(!proxy.has_stopped(), "the proxy stopped with a tunnel open");
    tunnel.echo(b"still open").await;
    drop(tunnel);
    assert!(
        proxy.finished().await,
        "the proxy stops once the tunnel closed"
    );
}

#[tokio::test]
async fn shutdown_grace_cuts_an_open_tunnel_and_the_proxy_stops() {
    let upstream = start_ws_upstream().await;
    let grace = Duration::from_secs(2);
    // Idle timeout far beyond the grace: only the grace can cut this tunnel.
    let text = TestConfig::new(upstream.addr)
        .shutdown_grace(grace)
        .idle_timeout(Duration::from_secs(60))
        .text();
    let mut proxy = start_proxy_with(&text).await;
    let mut tunnel = open_tunnel(proxy.addr, keyed_websocket("/ws")).await;
    // Taken before keygate hears of the shutdown, so its grace began after it.
    let began = Instant::now();
    proxy.begin_shutdown();
    // Echoes back to back until the tunnel is cut: it is never idle for long.
    let mut echoes = 0;
    loop {
        assert!(began.elapsed() < DEADLINE, "the grace never cut the tunnel");
        if !tunnel.echo_or_closed(b"x").await {
            break;
        }
        echoes += 1;
    }
    let cut = began.elapsed();
    assert!(
        cut >= grace,
        "cut {cut:?} after shutdown began, before shutdown_grace ({echoes} echoes)"
    );
    assert!(echoes >= 3, "the tunnel carried traffic while draining");
    assert!(proxy.finished().await, "the proxy stops after the grace");
    upstream
        .wait_until("the upstream side of the tunnel to close", |u| {
            u.tunnels_closed() == 1
        })
        .await;
}
