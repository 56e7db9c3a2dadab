//! Shared harness for the integration tests: a recording upstream, a keygate on an ephemeral
//! port with its own shutdown and a config from [`TestConfig`], and clients (hyper for
//! well-formed requests, raw TCP for requests a well-behaved client would never send). Every
//! wait has a deadline.

#![allow(
    dead_code,
    reason = "each test file uses a different part of the harness"
)]
#![allow(
    unreachable_pub,
    reason = "compiled into each test crate, which exports nothing: `pub` marks what the test files use"
)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use keygate::{Config, MapSecrets, Overrides, ProcessSecrets, Secret, SecretSource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

pub const KEY: &str = "kg-test-default-key-0123456789";
pub const CI_KEY: &str = "kg-test-ci-key-abcdefghijklmn";
pub const SHARED_SECRET: &str = "shared-secret-value-4242";
pub const UPSTREAM_TOKEN: &str = "upstream-api-key-77";

/// Longest any test waits for something to happen.
pub const DEADLINE: Duration = Duration::from_secs(10);

pub type UpBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;
pub type BodySender =
    http_body_util::channel::Sender<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Request targets that look like the probe (`/health`) or the public path (`/docs`) of
/// `config_text` but are not exactly them: each needs a key.
pub const LOOKALIKE_TARGETS: [&str; 15] = [
    "/health/",
    "/healthz",
    "/HEALTH",
    "//health",
    "/health/../v1/models",
    "/health%2F..",
    "/health%2f..%2fv1%2fmodels",
    "/health;x",
    "/./health",
    "/%68ealth",
    "/%2e/health",
    "/health/.",
    "/docs/",
    "/docs/../v1/models",
    "http://keygate.test/health/../v1/models",
];

/// The environment the test configs read their secrets from.
pub fn secrets() -> MapSecrets {
    MapSecrets::default()
        .with_env("API_KEY", KEY)
        .with_env("CI_KEY", CI_KEY)
        .with_env("SHARED_SECRET", SHARED_SECRET)
        .with_env("UPSTREAM_API_KEY", UPSTREAM_TOKEN)
}

/// The test environment from [`secrets`], and key files from the real file system.
struct TestSecrets;

impl SecretSource for TestSecrets {
    fn env(&self, name: &str) -> Option<Secret> {
        secrets().env(name)
    }

    fn file(&self, path: &Path) -> std::io::Result<Secret> {
        ProcessSecrets.file(path)
    }
}

/// The base [`TestConfig`] in front of `upstream` as TOML, with `extra` appended (more
/// tables).
pub fn config_text(upstream: SocketAddr, extra: &str) -> String {
    TestConfig::new(upstream).tables(extra).text()
}

/// The validated config of `toml`, with the test environment and real key files.
pub fn parse_config(toml: &str) -> Config {
    Config::parse(
        Path::new("test.toml"),
        toml,
        &Overrides::default(),
        &TestSecrets,
    )
    .unwrap_or_else(|e| panic!("test config is invalid:\n{e}"))
}

/// A keygate running in this process on 127.0.0.1:0.
pub struct Proxy {
    pub addr: SocketAddr,
    /// The admin listener, when the config has `[admin]` (bound on an ephemeral port).
    pub admin: Option<SocketAddr>,
    /// The redirect listener, when the config has `redirect_http_listen` (ephemeral port).
    pub redirect: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    reload: mpsc::UnboundedSender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

pub async fn start_proxy(upstream: SocketAddr) -> Proxy {
    start_proxy_with(&config_text(upstream, "")).await
}

pub async fn start_proxy_with(toml: &str) -> Proxy {
    start_proxy_config(parse_config(toml)).await
}

/// Runs keygate with a config the test has built or changed.
pub async fn start_proxy_config(config: Config) -> Proxy {
    start_proxy_clocked(config, keygate::Clock::system()).await
}

/// Runs keygate with key expiry read from the test's own clock.
pub async fn start_proxy_clocked(config: Config, clock: keygate::Clock) -> Proxy {
    let proxy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = proxy.local_addr().unwrap();
    let admin = match config.admin {
        Some(_) => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
        None => None,
    };
    let admin_addr = admin.as_ref().map(|a| a.local_addr().unwrap());
    let redirect = match config.server.redirect {
        Some(_) => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
        None => None,
    };
    let redirect_addr = redirect.as_ref().map(|r| r.local_addr().unwrap());
    let (tx, rx) = oneshot::channel();
    let (reload, reloads) = mpsc::unbounded_channel();
    let listeners = keygate::Listeners {
        proxy,
        admin,
        redirect,
    };
    let shutdown = async {
        let _ = rx.await;
    };
    let task = tokio::spawn(keygate::run_with_clock(
        config, clock, listeners, shutdown, reloads,
    ));
    Proxy {
        addr,
        admin: admin_addr,
        redirect: redirect_addr,
        shutdown: Some(tx),
        reload,
        task,
    }
}

impl Proxy {
    /// What SIGHUP does to the binary: re-read the key files.
    pub fn reload(&self) {
        self.reload.send(()).unwrap();
    }

    /// Starts the graceful shutdown and returns the task, to await when the test wants.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    pub async fn stop(mut self) {
        self.begin_shutdown();
        tokio::time::timeout(DEADLINE, &mut self.task)
            .await
            .expect("proxy stops within the deadline")
            .unwrap()
            .unwrap();
    }

    pub async fn finished(&mut self) -> bool {
        tokio::time::timeout(DEADLINE, &mut self.task).await.is_ok()
    }

    /// Whether keygate has stopped by now, without waiting.
    pub fn has_stopped(&self) -> bool {
        self.task.is_finished()
    }
}

// ---------------------------------------------------------------- metrics

/// The proxy's `/metrics` text, from its admin listener.
pub async fn scrape(proxy: &Proxy) -> String {
    let reply = send(proxy.admin.expect("admin listener"), get("/metrics", &[])).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    reply.text()
}

/// The value of the sample whose line starts with `series` (name and labels), 0 if absent.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Scrapes until `series` reaches `at_least` (requests are counted when their response
/// ends, which the client may see first), or panics at the deadline.
pub async fn wait_for_sample(proxy: &Proxy, series: &str, at_least: f64) -> String {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let text = scrape(proxy).await;
        if sample(&text, series) >= at_least {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} never reached {at_least}:\n{text}"
        );
        tokio::task::yield_now().await;
    }
}

// ---------------------------------------------------------------- the recording upstream

/// What the upstream received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Default)]
struct Record {
    requests: Mutex<Vec<Seen>>,
    connections_opened: AtomicUsize,
    connections_closed: AtomicUsize,
    changed: Notify,
}

/// An HTTP/1.1 origin on 127.0.0.1 that records every request and every closed connection.
pub struct Upstream {
    pub addr: SocketAddr,
    record: Arc<Record>,
}

type Respond = Arc<dyn Fn(&Seen) -> Response<UpBody> + Send + Sync>;

/// Answers every request with 200 and the body `ok`.
pub async fn start_upstream() -> Upstream {
    start_upstream_with(|_| fixed(StatusCode::OK, "ok")).await
}

pub async fn start_upstream_with(
    respond: impl Fn(&Seen) -> Response<UpBody> + Send + Sync + 'static,
) -> Upstream {
    let respond: Respond = Arc::new(respond);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let record = Arc::new(Record::default());
    let shared = record.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let record = shared.clone();
            let respond = respond.clone();
            tokio::spawn(async move {
                record.connections_opened.fetch_add(1, Ordering::SeqCst);
                record.changed.notify_waiters();
                let service_record = record.clone();
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let record = service_record.clone();
                    let respond = respond.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        // A request whose body broke off is not a request the origin received.
                        let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
                            return Ok(fixed(StatusCode::BAD_REQUEST, "incomplete body"));
                        };
                        let seen = Seen {
                            method: parts.method,
                            uri: parts.uri.to_string(),
                            headers: parts.headers,
                            body,
                        };
                        let response = respond(&seen);
                        record.requests.lock().unwrap().push(seen);
                        record.changed.notify_waiters();
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                record.connections_closed.fetch_add(1, Ordering::SeqCst);
                record.changed.notify_waiters();
            });
        }
    });
    Upstream { addr, record }
}

impl Upstream {
    pub fn requests(&self) -> Vec<Seen> {
        self.record.requests.lock().unwrap().clone()
    }

    pub fn connections_opened(&self) -> usize {
        self.record.connections_opened.load(Ordering::SeqCst)
    }

    pub fn connections_closed(&self) -> usize {
        self.record.connections_closed.load(Ordering::SeqCst)
    }

    /// Waits until `check` holds, or panics at the deadline.
    pub async fn wait_until(&self, what: &str, check: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
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

    pub async fn wait_for_requests(&self, n: usize) -> Vec<Seen> {
        self.wait_until(&format!("{n} requests"), |u| u.requests().len() >= n)
            .await;
        self.requests()
    }
}

pub fn fixed(status: StatusCode, body: &'static str) -> Response<UpBody> {
    let mut response = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|e| match e {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
}

/// A response whose body the test writes chunk by chunk through the returned sender.
pub fn streamed(content_type: &'static str) -> (Response<UpBody>, BodySender) {
    let (tx, body) = http_body_util::channel::Channel::new(16);
    let mut response = Response::new(body.boxed());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    (response, tx)
}

/// An upstream whose every response is an SSE stream fed by the test: each request's body
/// sender arrives on the returned channel.
pub async fn start_streaming_upstream() -> (Upstream, mpsc::UnboundedReceiver<BodySender>) {
    start_streaming_upstream_as("text/event-stream").await
}

/// [`start_streaming_upstream`] with another content type.
pub async fn start_streaming_upstream_as(
    content_type: &'static str,
) -> (Upstream, mpsc::UnboundedReceiver<BodySender>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let upstream = start_upstream_with(move |_| {
        let (response, sender) = streamed(content_type);
        let _ = tx.send(sender);
        response
    })
    .await;
    (upstream, rx)
}

// ---------------------------------------------------------------- clients

/// A fully read response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A streamed chat completion with the key `key`: what the concurrency tests hold open.
pub fn stream_chat(key: &str) -> Request<Full<Bytes>> {
    request(
        Method::POST,
        "/v1/chat/completions",
        &[("authorization", &bearer(key))],
        r#"{"stream":true}"#,
    )
}

/// A GET with the given headers.
pub fn get(path: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    request(Method::GET, path, headers, "")
}

pub fn request(
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &'static str,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "keygate.test");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

pub fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// A chat completion with the default key and an empty JSON body.
pub fn keyed_chat() -> Request<Full<Bytes>> {
    request(
        Method::POST,
        "/v1/chat/completions",
        &[("authorization", &bearer(KEY))],
        "{}",
    )
}

/// Sends `count` keyed GETs of `path` one after another over one keep-alive connection;
/// returns how many were answered with 200, each within the deadline.
pub async fn keyed_gets(addr: SocketAddr, path: String, count: usize) -> usize {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut answered = 0;
    for _ in 0..count {
        let req = get(&path, &[("authorization", &bearer(KEY))]);
        let reply = tokio::time::timeout(DEADLINE, async {
            let response = sender.send_request(req).await.unwrap();
            read_reply(response).await
        })
        .await
        .expect("each request is answered within the deadline");
        answered += usize::from(reply.status == StatusCode::OK);
    }
    answered
}

/// Sends 2,000 keyed GETs over 8 connections, each to a path of over 4 KiB, and asserts
/// all are answered with 200. The access lines carry the path: 8 MiB of log, many times what
/// a pipe and keygate's log queue hold.
pub async fn flood_the_log(addr: SocketAddr) {
    let long_path = format!("/v1/{}", "a".repeat(4096));
    let (connections, per_connection) = (8, 250);
    let senders: Vec<_> = (0..connections)
        .map(|_| tokio::spawn(keyed_gets(addr, long_path.clone(), per_connection)))
        .collect();
    for sender in senders {
        assert_eq!(sender.await.unwrap(), per_connection);
    }
}

/// Scrapes the admin listener at `admin` until `keygate_log_lines_dropped_total` is above 0,
/// or panics at the deadline; returns the count.
pub async fn wait_for_dropped_log_lines(admin: SocketAddr) -> f64 {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let metrics = tokio::time::timeout(DEADLINE, send(admin, get("/metrics", &[])))
            .await
            .expect("the admin listener answers within the deadline")
            .text();
        let dropped = sample(&metrics, "keygate_log_lines_dropped_total");
        if dropped > 0.0 {
            return dropped;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no dropped log lines counted:\n{metrics}"
        );
        tokio::task::yield_now().await;
    }
}

/// Sends one request over a new HTTP/1.1 connection and reads the whole response.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Reply {
    read_reply(open(addr, req).await).await
}

/// Sends one request over a new HTTP/2 prior-knowledge (h2c) connection.
pub async fn send_h2(addr: SocketAddr, req: Request<Full<Bytes>>) -> Reply {
    read_reply(open_h2(addr, req).await).await
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Opens an HTTP/1.1 connection and sends `req`; returns the response with its body unread,
/// so a test can read it frame by frame or drop it mid-stream.
pub async fn open<B>(addr: SocketAddr, req: Request<B>) -> Response<Incoming>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    tokio::time::timeout(DEADLINE, async {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender.send_request(req).await.unwrap()
    })
    .await
    .expect("response headers within the deadline")
}

/// [`open`] over a new HTTP/2 prior-knowledge (h2c) connection; the target's path is kept,
/// the authority is `keygate.test`.
pub async fn open_h2<B>(addr: SocketAddr, mut req: Request<B>) -> Response<Incoming>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    *req.uri_mut() = format!("http://keygate.test{}", req.uri()).parse().unwrap();
    req.headers_mut().remove("host");
    tokio::time::timeout(DEADLINE, async {
        let stream = TcpStream::connect(addr).await.unwrap();
        let executor = hyper_util::rt::TokioExecutor::new();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(executor, TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        sender.send_request(req).await.unwrap()
    })
    .await
    .expect("response headers within the deadline")
}

/// A POST to `path` with a key whose body the test writes through the returned sender.
pub fn upload(
    path: &str,
) -> (
    http_body_util::channel::Sender<Bytes>,
    Request<http_body_util::channel::Channel<Bytes>>,
) {
    let (tx, body) = http_body_util::channel::Channel::new(4);
    let req = Request::post(path)
        .header("host", "x")
        .header("authorization", bearer(KEY))
        .body(body)
        .unwrap();
    (tx, req)
}

/// Collects a response into a [`Reply`], the body within the deadline.
pub async fn read_reply(response: Response<Incoming>) -> Reply {
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .expect("the body within the deadline");
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.unwrap().to_bytes(),
    }
}

/// A raw exchange: writes `request` as is, reads until the proxy closes the connection.
/// Returns the status code (0 when no status line came back) and the whole text.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut out))
        .await
        .expect("proxy closes the connection within the deadline");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// Everything the server sends on `stream` until it closes it; panics if it is still open
/// at the deadline.
pub async fn read_to_close<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(DEADLINE, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("keygate closes the connection within the deadline");
    out
}

/// For hand-written origins: reads one request head from an upstream connection; `None`
/// at end of stream.
pub async fn read_request_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.unwrap_or(0) == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// The `Content-Length` a request head declares; 0 without one.
pub fn declared_length(head: &str) -> usize {
    head.lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0)
}

/// Opens a streamed chat completion through the proxy at `addr`, has the upstream send one
/// event and reads it: the client's body, and the upstream's sender for what comes next.
pub async fn stream_first_event(
    addr: SocketAddr,
    senders: &mut mpsc::UnboundedReceiver<BodySender>,
) -> (Incoming, BodySender) {
    let mut body = open(addr, keyed_chat()).await.into_body();
    let mut sender = senders.recv().await.unwrap();
    sender
        .send_data(Bytes::from_static(b"data: 1\n\n"))
        .await
        .unwrap();
    let first = next_frame(&mut body).await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "data: 1\n\n");
    (body, sender)
}

/// The next body frame, waiting at most the deadline: `None` at a clean end, `Some(Err)` at
/// an abnormal one.
pub async fn next_frame(
    body: &mut Incoming,
) -> Option<Result<http_body::Frame<Bytes>, hyper::Error>> {
    tokio::time::timeout(DEADLINE, body.frame())
        .await
        .expect("a frame within the deadline")
}

/// The next frame of `body`, which must be data.
pub async fn next_data(body: &mut Incoming) -> Bytes {
    next_frame(body)
        .await
        .expect("a frame, not the end")
        .expect("a frame, not an error")
        .into_data()
        .expect("a data frame")
}

/// The next data frame of `body` that is not an SSE keep-alive comment.
pub async fn next_data_after_keepalives(body: &mut Incoming) -> Bytes {
    loop {
        let data = next_data(body).await;
        if data != KEEP_ALIVE {
            return data;
        }
    }
}

/// The SSE keep-alive comment.
pub const KEEP_ALIVE: &str = ": keep-alive\n\n";

/// Time as keygate's own timers count it, for a test that shows something does *not* happen
/// within some keep-alive intervals: a second keygate in the test's runtime, with
/// `sse_keepalive`, and one SSE stream through it that stays silent, so a keep-alive comment
/// comes each interval. In a test's current-thread runtime, timers fire in the order they
/// fall due and the tasks they wake run in that order: once the clock has sent its second
/// comment after an event, every timer of the keygate under test that fell due before the
/// first has fired, its task has run, and what it wrote is on the wire ahead of anything the
/// test has the upstream send afterwards. No wall-clock window to miss on a loaded machine.
pub struct KeepaliveClock {
    body: Incoming,
    sender: BodySender,
    _proxy: Proxy,
    _upstream: Upstream,
}

impl KeepaliveClock {
    pub async fn start(every: Duration) -> Self {
        let (upstream, mut senders) = start_streaming_upstream().await;
        let text = TestConfig::new(upstream.addr)
            .idle_timeout(Duration::from_secs(600))
            .sse_keepalive(every)
            .text();
        let proxy = start_proxy_with(&text).await;
        let body = open(proxy.addr, keyed_chat()).await.into_body();
        let sender = senders.recv().await.unwrap();
        Self {
            body,
            sender,
            _proxy: proxy,
            _upstream: upstream,
        }
    }

    /// Returns once `n` keep-alive intervals have passed on the clock's timer since the call.
    pub async fn intervals(&mut self, n: usize) {
        // An event restarts the clock's interval, and marks the end of the comments sent
        // before the call.
        const TICK: &str = "data: tick\n\n";
        self.sender
            .send_data(Bytes::from_static(TICK.as_bytes()))
            .await
            .unwrap();
        while next_data(&mut self.body).await != TICK {}
        for _ in 0..n {
            assert_eq!(next_data(&mut self.body).await, KEEP_ALIVE);
        }
    }
}

/// What a silent upstream observed on one connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Silent {
    /// Bytes arrived (a request, or part of one).
    Received,
    /// The other side closed the connection.
    Closed,
}

/// An upstream that accepts connections, reads whatever comes, never answers, and reports
/// what it sees on the returned channel.
pub async fn start_silent_upstream() -> (SocketAddr, mpsc::UnboundedReceiver<Silent>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let events = events_tx.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {
                    let _ = events.send(Silent::Received);
                }
                let _ = events.send(Silent::Closed);
            });
        }
    });
    (addr, events_rx)
}

/// Sends a keyed GET to the proxy at `addr`, waits until the silent upstream has it, then
/// hangs up the client connection.
pub async fn hang_up_once_forwarded(
    addr: SocketAddr,
    events: &mut mpsc::UnboundedReceiver<Silent>,
) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request =
        format!("GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let first = tokio::time::timeout(DEADLINE, events.recv()).await.unwrap();
    assert_eq!(first, Some(Silent::Received));
    drop(stream);
}

/// Waits for the next event from a silent upstream that is not `Received`.
pub async fn wait_for_close(events: &mut mpsc::UnboundedReceiver<Silent>) {
    tokio::time::timeout(DEADLINE, async {
        while events.recv().await != Some(Silent::Closed) {}
    })
    .await
    .expect("the upstream connection is closed within the deadline");
}

/// A port bound but not listening: connections to it are refused, and while the test holds
/// it no other socket can take the port (not even a connection's own ephemeral end, which
/// would otherwise connect to itself).
pub struct ClosedPort {
    pub addr: SocketAddr,
    socket: tokio::net::TcpSocket,
}

impl ClosedPort {
    /// Starts listening on the same port.
    pub fn open(self) -> TcpListener {
        self.socket.listen(64).unwrap()
    }
}

pub fn closed_port() -> ClosedPort {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    ClosedPort { addr, socket }
}
pub mod config;
pub mod process;
pub mod redis_server;
pub mod tls;

#[allow(
    unused_imports,
    reason = "each test file uses a different part of the harness"
)]
pub use config::{Key, TestConfig, TlsFiles};
