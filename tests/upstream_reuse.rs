//! Keep-alive to the upstream when the upstream closes a connection as keygate reuses it.
//! llama-server, for one, closes its connection after every stream without saying so; a
//! request keygate sends on such a connection is lost with it, and must go out again on
//! another instead of becoming a 502.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::{Method, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An origin that answers one request per connection, keeps the connection open without
/// `Connection: close`, and closes it without an answer when a second request arrives on
/// it: the idle connection looks alive to the pool until the request is sent. Each answer
/// echoes the body it read; `dropped` counts the requests closed without one.
async fn one_answer_per_connection_origin() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dropped = Arc::new(AtomicUsize::new(0));
    let counter = dropped.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(answer_once(stream, counter.clone()));
        }
    });
    (addr, dropped)
}

async fn answer_once(mut stream: TcpStream, dropped: Arc<AtomicUsize>) {
    let Some(head) = read_request_head(&mut stream).await else {
        return;
    };
    let mut body = vec![0; declared_length(&head)];
    if stream.read_exact(&mut body).await.is_err() {
        return;
    }
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.write_all(&body).await;
    if read_request_head(&mut stream).await.is_some() {
        dropped.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_request_lost_with_a_reused_upstream_connection_is_sent_again_whole() {
    let (origin, dropped) = one_answer_per_connection_origin().await;
    let proxy = start_proxy(origin).await;
    let auth = bearer(KEY);
    let bodies = [
        r#"{"model":"m","messages":[{"role":"user","content":"first"}]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"second"}]}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"third"}]}"#,
    ];
    for body in bodies {
        let reply = send(
            proxy.addr,
            request(
                Method::POST,
                "/v1/chat/completions",
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                ],
                body,
            ),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.text(), body);
    }
    // Each request after the first went out on the pooled connection first, and was lost.
    assert_eq!(dropped.load(Ordering::SeqCst), 2);
}

/// Only bodies up to 64 KiB are kept for a resend: a larger one lost with its connection is
/// answered 502, as before, and never sent in part.
#[tokio::test]
async fn a_body_over_the_replay_limit_is_not_sent_again() {
    let (origin, dropped) = one_answer_per_connection_origin().await;
    let proxy = start_proxy(origin).await;
    let auth = bearer(KEY);
    let limit = 64 * 1024;
    let mut statuses = Vec::new();
    for size in [limit, limit, limit + 1] {
        let body: &'static str = Box::leak("x".repeat(size).into_boxed_str());
        let reply = send(
            proxy.addr,
            request(
                Method::POST,
                "/v1/chat/completions",
                &[("authorization", &auth)],
                body,
            ),
        )
        .await;
        statuses.push(reply.status);
    }
    assert_eq!(
        statuses,
        [StatusCode::OK, StatusCode::OK, StatusCode::BAD_GATEWAY]
    );
    assert_eq!(dropped.load(Ordering::SeqCst), 2);
}

/// A request without a body (a GET, most often) keeps nothing for a resend and still goes
/// out again when it is lost with a reused connection.
#[tokio::test]
async fn a_bodiless_request_lost_with_a_reused_upstream_connection_is_sent_again() {
    let (origin, dropped) = one_answer_per_connection_origin().await;
    let proxy = start_proxy(origin).await;
    let auth = bearer(KEY);
    for _ in 0..3 {
        let reply = send(
            proxy.addr,
            request(Method::GET, "/v1/models", &[("authorization", &auth)], ""),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    assert_eq!(dropped.load(Ordering::SeqCst), 2);
}
