//! Fair admission to the upstream under `[upstream] max_in_flight`, end to end: keygate in
//! front of an origin that holds every request until the test lets it end, so which request
//! the origin receives next after each release is exact, with no timing involved. The queue
//! is watched through `/metrics` (`keygate_upstream_queue_depth{key}`).

mod support;

use std::collections::VecDeque;
use std::time::Duration;

use http::{Method, StatusCode};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Long enough that nothing the test holds times out while it holds it.
const HOLD: Duration = Duration::from_secs(60);

/// An origin that answers every request's headers at once and keeps its body open until
/// the test drops the sender that arrives here with the request's path: each request holds
/// its place in flight until the test releases it.
struct Parking {
    upstream: Upstream,
    arrivals: mpsc::UnboundedReceiver<(String, BodySender)>,
    /// Requests that reached the origin and are held, oldest first.
    held: VecDeque<(String, BodySender)>,
}

impl Parking {
    async fn start() -> Self {
        let (tx, arrivals) = mpsc::unbounded_channel();
        let upstream = start_upstream_with(move |seen| {
            let (response, sender) = streamed("text/plain");
            let _ = tx.send((seen.uri.clone(), sender));
            response
        })
        .await;
        Self {
            upstream,
            arrivals,
            held: VecDeque::new(),
        }
    }

    /// Waits for the next request to reach the origin, holds it, and returns its path.
    async fn next(&mut self) -> String {
        let (path, sender) = tokio::time::timeout(DEADLINE, self.arrivals.recv())
            .await
            .expect("a request reaches the origin within the deadline")
            .expect("the origin is running");
        self.held.push_back((path.clone(), sender));
        path
    }

    /// Ends the oldest held request's response, which gives its place back.
    fn release(&mut self) {
        drop(self.held.pop_front().expect("a request is held"));
    }

    /// Releases one request and returns the path of the one let through in its place.
    async fn release_and_next(&mut self) -> String {
        self.release();
        self.next().await
    }

    /// The paths of every request the origin received, in order.
    fn seen(&self) -> Vec<String> {
        self.upstream
            .requests()
            .into_iter()
            .map(|s| s.uri)
            .collect()
    }
}

/// keygate with `max_in_flight` in front of `origin`: key `default` (API_KEY) and key `ci`
/// (CI_KEY), the admin listener on, and nothing timing out while the test holds requests.
fn config(origin: &Parking, max_in_flight: usize) -> TestConfig {
    TestConfig::new(origin.upstream.addr)
        .max_in_flight(max_in_flight)
        .queue_timeout(HOLD)
        .response_timeout(HOLD)
        .idle_timeout(HOLD)
        .admin()
}

/// Starts keygate with `config` (of `max_in_flight = 1`) and fills its one place: a GET of
/// `/v1/first` with key `default`, held by `origin`. The proxy, and the client's task.
async fn first_in_flight(config: TestConfig, origin: &mut Parking) -> (Proxy, JoinHandle<Reply>) {
    let proxy = start_proxy_with(&config.text()).await;
    let first = spawn_get(proxy.addr, "/v1/first", KEY);
    assert_eq!(origin.next().await, "/v1/first");
    (proxy, first)
}

/// Sends a GET of `path` with `key` on its own connection, answered in the background.
fn spawn_get(addr: std::net::SocketAddr, path: &str, key: &str) -> JoinHandle<Reply> {
    let req = get(path, &[("authorization", &bearer(key))]);
    tokio::spawn(send(addr, req))
}

/// Waits until exactly `n` requests of `key` wait in the upstream queue.
async fn wait_for_depth(proxy: &Proxy, key: &str, n: usize) {
    let series = format!("keygate_upstream_queue_depth{{key=\"{key}\"}}");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let text = scrape(proxy).await;
        if text.lines().any(|line| line == format!("{series} {n}")) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} never reached {n}:\n{text}"
        );
        tokio::task::yield_now().await;
    }
}

async fn reply(task: JoinHandle<Reply>) -> Reply {
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("answered within the deadline")
        .expect("the client task did not panic")
}

#[tokio::test]
async fn a_light_key_is_let_through_at_the_first_release_despite_a_flood() {
    let mut origin = Parking::start().await;
    let proxy = start_proxy_with(&config(&origin, 2).text()).await;
    let mut clients = Vec::new();
    for i in 0..2 {
        clients.push(spawn_get(proxy.addr, &format!("/v1/flood/{i}"), KEY));
        origin.next().await;
    }
    for i in 2..13 {
        clients.push(spawn_get(proxy.addr, &format!("/v1/flood/{i}"), KEY));
    }
    wait_for_depth(&proxy, "default", 11).await;
    // The flood is being served from its queue, ten still waiting, when the light key's
    // request arrives.
    let mut flood = vec![origin.release_and_next().await];
    wait_for_depth(&proxy, "default", 10).await;
    clients.push(spawn_get(proxy.addr, "/v1/light", CI_KEY));
    wait_for_depth(&proxy, "ci", 1).await;

    assert_eq!(origin.release_and_next().await, "/v1/light");
    // The flood is served after it, every request of it.
    for _ in 0..10 {
        flood.push(origin.release_and_next().await);
    }
    flood.sort_by_key(|path| path["/v1/flood/".len()..].parse::<usize>().unwrap());
    let expected: Vec<String> = (2..13).map(|i| format!("/v1/flood/{i}")).collect();
    assert_eq!(flood, expected);
    origin.held.clear();
    for client in clients {
        assert_eq!(reply(client).await.status, StatusCode::OK);
    }
    proxy.stop().await;
}

#[tokio::test]
async fn weights_share_the_releases_one_to_three() {
    let mut origin = Parking::start().await;
    let text = config(&origin, 1)
        .keys([
            Key::env("default", "API_KEY"),
            Key::env("ci", "CI_KEY").weight(3),
        ])
        .text();
    let proxy = start_proxy_with(&text).await;
    let mut clients = vec![spawn_get(proxy.addr, "/v1/ci/first", CI_KEY)];
    origin.next().await;
    for i in 0..4 {
        clients.push(spawn_get(proxy.addr, &format!("/v1/default/{i}"), KEY));
    }
    wait_for_depth(&proxy, "default", 4).await;
    for i in 0..12 {
        clients.push(spawn_get(proxy.addr, &format!("/v1/ci/{i}"), CI_KEY));
    }
    wait_for_depth(&proxy, "ci", 12).await;

    let mut order = Vec::new();
    for _ in 0..16 {
        let path = origin.release_and_next().await;
        order.push(if path.starts_with("/v1/ci/") {
            "ci"
        } else {
            "default"
        });
    }
    assert_eq!(order, ["default", "ci", "ci", "ci"].repeat(4));
    origin.held.clear();
    for client in clients {
        assert_eq!(reply(client).await.status, StatusCode::OK);
    }
    proxy.stop().await;
}

#[tokio::test]
async fn a_queued_client_that_hangs_up_leaves_the_queue_and_never_reaches_the_origin() {
    let mut origin = Parking::start().await;
    let (proxy, first) = first_in_flight(config(&origin, 1), &mut origin).await;

    // A body still to come: hyper does not read the socket again until the body is
    // forwarded, so only keygate's hang-up watch can see this client go.
    let mut gone = TcpStream::connect(proxy.addr).await.unwrap();
    let request = format!(
        "POST /v1/gone HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CI_KEY}\r\nContent-Length: 5\r\n\r\nab"
    );
    gone.write_all(request.as_bytes()).await.unwrap();
    wait_for_depth(&proxy, "ci", 1).await;
    drop(gone);
    wait_for_depth(&proxy, "ci", 0).await;

    let next = spawn_get(proxy.addr, "/v1/next", KEY);
    wait_for_depth(&proxy, "default", 1).await;
    assert_eq!(origin.release_and_next().await, "/v1/next");
    origin.release();
    assert_eq!(reply(first).await.status, StatusCode::OK);
    assert_eq!(reply(next).await.status, StatusCode::OK);
    assert_eq!(origin.seen(), ["/v1/first", "/v1/next"]);
    proxy.stop().await;
}

#[tokio::test]
async fn a_request_queued_past_queue_timeout_is_answered_503_with_retry_after() {
    let mut origin = Parking::start().await;
    let short_wait = config(&origin, 1).queue_timeout(Duration::from_millis(50));
    let (proxy, first) = first_in_flight(short_wait, &mut origin).await;

    let late = reply(spawn_get(proxy.addr, "/v1/late", CI_KEY)).await;
    assert_eq!(late.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(late.headers["retry-after"], "1");
    assert_eq!(late.headers["content-type"], "application/json");
    let body = late.json();
    assert_eq!(body["error"]["type"], "server_error");
    assert_eq!(body["error"]["code"], "queue_timeout");
    let metrics = scrape(&proxy).await;
    assert_eq!(
        sample(
            &metrics,
            r#"keygate_key_refusals_total{key="ci",reason="queue_timeout"}"#
        ),
        1.0,
        "{metrics}"
    );

    origin.release();
    assert_eq!(reply(first).await.status, StatusCode::OK);
    assert_eq!(origin.seen(), ["/v1/first"]);
    proxy.stop().await;
}

#[tokio::test]
async fn the_probe_and_public_paths_pass_a_full_queue() {
    let mut origin = Parking::start().await;
    let (proxy, first) = first_in_flight(config(&origin, 1), &mut origin).await;
    let queued = spawn_get(proxy.addr, "/v1/queued", CI_KEY);
    wait_for_depth(&proxy, "ci", 1).await;

    for path in ["/health", "/docs"] {
        let bypass = tokio::spawn(send(proxy.addr, get(path, &[])));
        assert_eq!(origin.next().await, path);
        drop(origin.held.pop_back());
        assert_eq!(reply(bypass).await.status, StatusCode::OK);
    }
    wait_for_depth(&proxy, "ci", 1).await;

    assert_eq!(origin.release_and_next().await, "/v1/queued");
    origin.release();
    assert_eq!(reply(first).await.status, StatusCode::OK);
    assert_eq!(reply(queued).await.status, StatusCode::OK);
    proxy.stop().await;
}

#[tokio::test]
async fn draining_answers_the_queued_at_once_and_lets_the_in_flight_finish() {
    let mut origin = Parking::start().await;
    let (mut proxy, first) = first_in_flight(config(&origin, 1), &mut origin).await;
    let queued = spawn_get(proxy.addr, "/v1/queued", CI_KEY);
    wait_for_depth(&proxy, "ci", 1).await;

    proxy.begin_shutdown();
    let refused = reply(queued).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.json()["error"]["code"], "draining");
    // Still held: the request in flight has not been cut off.
    assert!(!first.is_finished());

    origin.release();
    assert_eq!(reply(first).await.status, StatusCode::OK);
    assert!(proxy.finished().await);
    assert_eq!(origin.seen(), ["/v1/first"]);
}

#[tokio::test]
async fn a_websocket_upgrade_passes_a_full_queue() {
    let mut origin = Parking::start().await;
    let (proxy, first) = first_in_flight(config(&origin, 1), &mut origin).await;

    let upgrade = request(
        Method::GET,
        "/v1/realtime",
        &[
            ("authorization", &bearer(CI_KEY)),
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        "",
    );
    let upgrade = tokio::spawn(send(proxy.addr, upgrade));
    assert_eq!(origin.next().await, "/v1/realtime");
    drop(origin.held.pop_back());
    // The parking origin answers 200, not 101: what matters is that it was reached.
    assert_eq!(reply(upgrade).await.status, StatusCode::OK);

    origin.release();
    assert_eq!(reply(first).await.status, StatusCode::OK);
    proxy.stop().await;
}
