//! A client that hangs up before its response, or during a streamed one, is noticed at every
//! stage, and its upstream attempt is dropped at once: before its head is read (nothing reaches
//! the origin), while keygate connects to a slow-accepting origin, while the origin does not
//! read the request body, while keygate waits for response headers, over plain HTTP/1.1, TLS
//! and HTTP/2; and while a streamed response waits for its next bytes. `response_timeout` and
//! `connect_timeout` are 600 s here (and `idle_timeout` for streams), so only noticing the
//! hang-up closes anything within the deadline.
//!
//! What the kernel says about keygate's socket to the origin (`/proc/net/tcp`) is the
//! condition where the origin cannot see it: a connect still in SYN_SENT, a connection whose
//! close waits behind body bytes the origin does not read.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use support::process::TempDir;
use support::tls::{connect, Ca};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The test config with the upstream waits far beyond the deadline.
fn patient(upstream: SocketAddr) -> TestConfig {
    TestConfig::new(upstream)
        .max_request_body("64MiB")
        .connect_timeout(Duration::from_secs(600))
        .response_timeout(Duration::from_secs(600))
}

/// The head of a keyed upload that declares `length` body bytes.
fn upload_head(length: usize) -> String {
    format!(
        "POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n"
    )
}

// ---------------------------------------------------------------- the kernel's view

/// Consecutive samples (10 ms apart) with the same queue lengths that count as a pipeline
/// that stopped moving.
const SETTLED_SAMPLES: u32 = 20;

/// TCP states as `/proc/net/tcp` writes them.
const ESTABLISHED: u8 = 0x01;
const SYN_SENT: u8 = 0x02;

/// One IPv4 socket of this network namespace.
#[derive(Debug, Clone, Copy)]
struct Socket {
    local_port: u16,
    remote_port: u16,
    state: u8,
    send_queue: u64,
    receive_queue: u64,
}

fn sockets() -> Vec<Socket> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table.lines().skip(1).filter_map(parse_socket).collect()
}

fn parse_socket(line: &str) -> Option<Socket> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let port = |address: &str| u16::from_str_radix(address.rsplit(':').next()?, 16).ok();
    let (send_queue, receive_queue) = fields.get(4)?.split_once(':')?;
    Some(Socket {
        local_port: port(fields.get(1)?)?,
        remote_port: port(fields.get(2)?)?,
        state: u8::from_str_radix(fields.get(3)?, 16).ok()?,
        send_queue: u64::from_str_radix(send_queue, 16).ok()?,
        receive_queue: u64::from_str_radix(receive_queue, 16).ok()?,
    })
}

/// Polls the socket table until `found` returns something, or panics at the deadline.
async fn wait_for<T>(what: &str, mut found: impl FnMut(&[Socket]) -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(found) = found(&sockets()) {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The local port of keygate's connect to `origin` once it is stuck in SYN_SENT.
async fn connect_in_progress(origin: SocketAddr) -> u16 {
    wait_for("keygate's connect to the origin", |table| {
        table
            .iter()
            .find(|s| s.remote_port == origin.port() && s.state == SYN_SENT)
            .map(|s| s.local_port)
    })
    .await
}

/// Waits until keygate's socket from `local_port` to `origin` is neither connecting nor
/// established: abandoned, or closed by keygate.
async fn upstream_side_closed(local_port: u16, origin: SocketAddr) {
    wait_for(
        "keygate to close its side of the upstream connection",
        |table| {
            let open = table.iter().any(|s| {
                s.local_port == local_port
                    && s.remote_port == origin.port()
                    && (s.state == SYN_SENT || s.state == ESTABLISHED)
            });
            (!open).then_some(())
        },
    )
    .await;
}

// ---------------------------------------------------------------- origins

/// An origin that accepts nothing, its accept queue full: a connect to it stays in SYN_SENT.
/// Holding the returned filler connection keeps the queue full.
async fn unaccepting_origin() -> (TcpListener, TcpStream) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    // Backlog 0: one connection fills the queue; the kernel drops the SYNs after it.
    let listener = socket.listen(0).unwrap();
    let filler = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    (listener, filler)
}

/// Accepts one connection (keygate's, unless a test says otherwise) and its peer's port.
async fn accept(listener: &TcpListener) -> (TcpStream, u16) {
    let (stream, peer) = tokio::time::timeout(DEADLINE, listener.accept())
        .await
        .expect("keygate connects within the deadline")
        .unwrap();
    (stream, peer.port())
}

// ---------------------------------------------------------------- (0) before the head is read

/// A keyed upload whose head, first `sent` body bytes and FIN are all in keygate's socket
/// before keygate reads any of it: the request must not reach the origin at all. The client
/// is a blocking socket, so keygate (tasks of this test's one-thread runtime) cannot run
/// between its calls: it accepts the connection once everything is there.
async fn gone_before_its_head_is_read(sent: usize) {
    let origin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    origin.set_nonblocking(true).unwrap();
    let proxy = start_proxy_with(&patient(origin.local_addr().unwrap()).text()).await;
    let mut client = std::net::TcpStream::connect(proxy.addr).unwrap();
    std::io::Write::write_all(&mut client, upload_head(1_000_000).as_bytes()).unwrap();
    std::io::Write::write_all(&mut client, &vec![b'b'; sent]).unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    client.set_nonblocking(true).unwrap();
    let mut client = TcpStream::from_std(client).unwrap();
    let mut reply = Vec::new();
    // keygate closes without a response; with body bytes unread, its close is a reset.
    let closed = tokio::time::timeout(DEADLINE, client.read_to_end(&mut reply)).await;
    assert!(
        closed.is_ok(),
        "keygate keeps the connection of a gone client"
    );
    assert!(reply.is_empty(), "{}", String::from_utf8_lossy(&reply));
    // A connect keygate made has completed its handshake (loopback) and waits in the
    // origin's accept queue, even once keygate has closed it.
    match origin.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("keygate connected to the origin for a client already gone: {other:?}"),
    }
    proxy.stop().await;
}

#[tokio::test]
async fn a_client_gone_before_its_head_is_read_is_not_forwarded() {
    gone_before_its_head_is_read(2048).await;
}

/// Its FIN waits behind body bytes that hyper has not read.
#[tokio::test]
async fn a_client_gone_behind_unread_body_bytes_is_not_forwarded() {
    gone_before_its_head_is_read(32 * 1024).await;
}

// ---------------------------------------------------------------- (a) connecting

/// A keyed upload whose head and first `sent` body bytes reach keygate while it connects to
/// an origin that does not accept; the client then hangs up.
async fn hang_up_while_connecting(sent: usize) {
    let (listener, _filler) = unaccepting_origin().await;
    let origin = listener.local_addr().unwrap();
    let proxy = start_proxy_with(&patient(origin).text()).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(upload_head(1_000_000).as_bytes())
        .await
        .unwrap();
    client.write_all(&vec![b'b'; sent]).await.unwrap();
    let connecting = connect_in_progress(origin).await;
    drop(client);
    upstream_side_closed(connecting, origin).await;
    proxy.stop().await;
}

#[tokio::test]
async fn hangup_while_connecting_abandons_the_connect() {
    hang_up_while_connecting(2048).await;
}

/// More body than hyper reads with the head: the rest waits in the socket, unread.
#[tokio::test]
async fn hangup_with_body_bytes_unread_while_connecting_abandons_the_connect() {
    hang_up_while_connecting(32 * 1024).await;
}

#[tokio::test]
async fn hangup_over_tls_while_connecting_abandons_the_connect() {
    let (listener, _filler) = unaccepting_origin().await;
    let origin = listener.local_addr().unwrap();
    let (ca, dir) = (Ca::new(), TempDir::new("hangup-tls"));
    let config = patient(origin).tls(ca.issue(30).install(&dir)).text();
    let proxy = start_proxy_with(&config).await;
    let mut client = connect(proxy.addr, &ca.pem(), &[b"http/1.1"])
        .await
        .unwrap();
    client
        .write_all(upload_head(1_000_000).as_bytes())
        .await
        .unwrap();
    client.write_all(&[b'b'; 2048]).await.unwrap();
    client.flush().await.unwrap();
    let connecting = connect_in_progress(origin).await;
    drop(client);
    upstream_side_closed(connecting, origin).await;
    proxy.stop().await;
}

#[tokio::test]
async fn hangup_over_http2_while_connecting_abandons_the_connect() {
    let (listener, _filler) = unaccepting_origin().await;
    let origin = listener.local_addr().unwrap();
    let proxy = start_proxy_with(&patient(origin).text()).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);
    let (mut body, upload) = http_body_util::channel::Channel::<Bytes>::new(4);
    let req = Request::post("http://keygate.test/v1/audio/transcriptions")
        .header("authorization", bearer(KEY))
        .body(upload)
        .unwrap();
    let response = tokio::spawn(async move { sender.send_request(req).await });
    body.send_data(Bytes::from(vec![b'b'; 2048])).await.unwrap();
    let connecting = connect_in_progress(origin).await;
    connection.abort();
    response.abort();
    upstream_side_closed(connecting, origin).await;
    proxy.stop().await;
}

/// Not every byte that arrives while keygate connects is a hang-up: a client still sending
/// its body is served once the origin accepts.
#[tokio::test]
async fn a_client_still_uploading_while_keygate_connects_is_served() {
    let (listener, filler) = unaccepting_origin().await;
    let origin = listener.local_addr().unwrap();
    let proxy = start_proxy_with(&patient(origin).text()).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    let length = 64 * 1024;
    client
        .write_all(upload_head(length).as_bytes())
        .await
        .unwrap();
    client.write_all(&vec![b'b'; length / 2]).await.unwrap();
    connect_in_progress(origin).await;
    // Room in the accept queue: keygate's next SYN gets in.
    let (queued, _) = accept(&listener).await;
    drop((queued, filler));
    let serving = tokio::spawn(async move {
        let (mut upstream, _) = accept(&listener).await;
        let head = read_request_head(&mut upstream).await.unwrap();
        let mut body = vec![0u8; declared_length(&head)];
        upstream.read_exact(&mut body).await.unwrap();
        upstream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap();
        body.len()
    });
    client.write_all(&vec![b'b'; length / 2]).await.unwrap();
    let reply = read_ok_reply(&mut client).await;
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    assert_eq!(serving.await.unwrap(), length);
    proxy.stop().await;
}

/// Reads until the end of a response with a 2-byte body.
async fn read_ok_reply(client: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(DEADLINE, async {
        while !out.ends_with(b"\r\n\r\nok") {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("a response within the deadline");
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------- (b) forwarding the body

#[tokio::test]
async fn reset_while_the_upstream_does_not_read_the_body_closes_the_upstream() {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(16).unwrap();
    let origin = listener.local_addr().unwrap();
    let proxy = start_proxy_with(&patient(origin).text()).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    let client_port = client.local_addr().unwrap().port();
    // The client's kernel will hold body bytes it cannot send: a FIN would queue behind
    // them, so the hang-up that reaches keygate is a reset.
    client.set_zero_linger().unwrap();
    let length = 32 << 20;
    let uploading = tokio::spawn(async move {
        client
            .write_all(upload_head(length).as_bytes())
            .await
            .unwrap();
        let chunk = vec![b'b'; 64 * 1024];
        for _ in 0..length / chunk.len() {
            if client.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    // The origin takes the head, then reads nothing more.
    let (mut upstream, keygate_port) = accept(&listener).await;
    read_request_head(&mut upstream).await.unwrap();
    // Everything between fills up: keygate holds body bytes it could not send in its socket
    // to the origin, and more unread in the client's socket. Once full, nothing moves again.
    let queues = |table: &[Socket]| {
        let unread = table
            .iter()
            .find(|s| s.local_port == proxy.addr.port() && s.remote_port == client_port)?;
        let unsent = table
            .iter()
            .find(|s| s.local_port == keygate_port && s.remote_port == origin.port())?;
        (unread.receive_queue > 0 && unsent.send_queue > 0)
            .then_some((unread.receive_queue, unsent.send_queue))
    };
    let mut last = None;
    let mut unchanged = 0;
    wait_for("the body to back up in keygate and stop there", |table| {
        let now = queues(table);
        unchanged = if now.is_some() && now == last {
            unchanged + 1
        } else {
            0
        };
        last = now;
        (unchanged >= SETTLED_SAMPLES).then_some(())
    })
    .await;
    uploading.abort();
    assert!(
        uploading.await.unwrap_err().is_cancelled(),
        "the upload never ends"
    );
    upstream_side_closed(keygate_port, origin).await;
    drop(upstream);
    proxy.stop().await;
}

// ---------------------------------------------------------------- (c) response headers

/// hyper itself sees a plain hang-up once the request is read, but not when bytes follow
/// the request in its buffer (a pipelined request): keygate does.
#[tokio::test]
async fn hangup_while_waiting_for_response_headers_closes_the_upstream() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = listener.local_addr().unwrap();
    let proxy = start_proxy_with(&patient(origin).text()).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    let pipelined = format!("{}hello{}", upload_head(5), "GET /v1/models HTTP/1.1\r\n");
    client.write_all(pipelined.as_bytes()).await.unwrap();
    // The origin reads the whole request and never answers.
    let (mut upstream, _) = accept(&listener).await;
    let head = read_request_head(&mut upstream).await.unwrap();
    let mut body = vec![0u8; declared_length(&head)];
    upstream.read_exact(&mut body).await.unwrap();
    assert_eq!(body, b"hello");
    drop(client);
    let rest = read_to_close(&mut upstream).await;
    assert!(rest.is_empty(), "nothing more reaches the origin");
    proxy.stop().await;
}

// ---------------------------------------------------------------- (d) the response body

/// How the client goes away in the middle of an SSE stream.
#[derive(Clone, Copy)]
enum Leaving {
    Close,
    /// Shuts down its sending side and keeps reading: it counts as gone.
    HalfClose,
    /// Sends the head of a next request first: bytes keygate does not read during the
    /// stream, in front of the FIN.
    CloseBehindAPipelinedRequest,
}

/// A client that leaves while keygate waits for the stream's next event: the upstream
/// connection closes at once (`idle_timeout` is 600 s, so nothing else closes it in time).
async fn leave_mid_stream(leaving: Leaving) {
    let (upstream, mut senders) = start_streaming_upstream().await;
    let config = patient(upstream.addr).idle_timeout(Duration::from_secs(600));
    let proxy = start_proxy_with(&config.text()).await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    let head = format!("GET /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n");
    client.write_all(head.as_bytes()).await.unwrap();
    let mut sender = senders.recv().await.unwrap();
    sender
        .send_data(Bytes::from_static(b"data: 1\n\n"))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(DEADLINE, async {
        while !seen.windows(9).any(|w| w == b"data: 1\n\n") {
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "keygate closed the stream");
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the first event within the deadline");
    assert_eq!(upstream.connections_closed(), 0);
    match leaving {
        Leaving::Close => drop(client),
        Leaving::HalfClose => client.shutdown().await.unwrap(),
        Leaving::CloseBehindAPipelinedRequest => {
            client
                .write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            drop(client);
        }
    }
    upstream
        .wait_until("the upstream connection to close", |u| {
            u.connections_closed() == 1
        })
        .await;
    drop(sender);
    proxy.stop().await;
}

#[tokio::test]
async fn hangup_mid_stream_closes_the_upstream() {
    leave_mid_stream(Leaving::Close).await;
}

#[tokio::test]
async fn half_close_mid_stream_closes_the_upstream() {
    leave_mid_stream(Leaving::HalfClose).await;
}

#[tokio::test]
async fn hangup_behind_a_pipelined_request_mid_stream_closes_the_upstream() {
    leave_mid_stream(Leaving::CloseBehindAPipelinedRequest).await;
}
