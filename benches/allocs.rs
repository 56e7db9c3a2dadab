//! Heap use of keygate on the proxied path, counted by the allocator: allocations and bytes
//! per proxied request, and live heap per idle keep-alive connection (once parked) and per
//! open SSE stream.
//! Counts, not times, so the figures do not move when other work shares the CPU.
//!
//! keygate runs in this process on a current-thread runtime (as on one core), with its
//! defaults and one key, in front of an origin that answers a 96-byte JSON document, or for
//! a streamed chat completion (`POST /v1/chat/completions` with `{}`, the request of
//! `benches/memory.py`, so keygate reads its body and the stream's token usage) an event
//! stream that sends one event and then waits. The origin and the clients run
//! on their own threads with blocking sockets, every thread and buffer made before the first
//! count, so what the allocator counts is keygate's (tokio and hyper included).
//!
//! ```text
//! cargo bench --bench allocs                  # 10,000 requests, 2,000 idle connections, 256 streams
//! cargo bench --bench allocs -- --requests 20000 --idle 5000 --streams 256
//! cargo bench --bench allocs -- --dhat /tmp/heap.json   # also a DHAT profile (dh_view.html)
//! ```
//!
//! With `--dhat`, the profile ends while the idle connections are open (with `--idle 0`: while
//! the streams are), so its "at t-end" figures are their memory by allocation site. The run
//! is bounded: each socket read waits at most 30 s, and nothing waits for anything else.
//!
//! Before the streams and the idle connections are counted, as many connections are opened,
//! answered and closed, which grows what all connections share (tokio's slab of socket
//! registrations, the set of connection tasks) as in a process that has served that many.
//! The live-heap figures leave out what the allocator rounds up and what the kernel holds for
//! the sockets; `benches/memory.py` measures the whole process (RSS) the same way.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keygate::{Config, Listeners, MapSecrets, Overrides, PARK_AFTER};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const KEY: &str = "bench-allocs-key-0123456789abcdef";
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Origin threads, each serving one upstream connection at a time: more than the streams.
const ORIGIN_THREADS: usize = 320;

const JSON_BODY: &str = r#"{"object":"list","data":[{"id":"m","object":"model","created":0,"owned_by":"bench-origin-012345"}]}"#;
const SSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
    transfer-encoding: chunked\r\n\r\nd\r\ndata: first\n\n\r\n";
const SSE_EVENT: &[u8] = b"data: first\n\n";
const SSE_END: &[u8] = b"0\r\n\r\n";

/// Rounds of streams the origin has been told to end: a stream started in round `r` ends
/// once this exceeds `r`.
static RELEASED: AtomicUsize = AtomicUsize::new(0);

struct Args {
    requests: usize,
    idle: usize,
    streams: usize,
    /// Connections opened, answered and closed before the counts (default: the most held).
    warm: Option<usize>,
    dhat: Option<String>,
}

fn args() -> Args {
    let mut args = Args {
        requests: 10_000,
        idle: 2_000,
        streams: 256,
        warm: None,
        dhat: None,
    };
    let mut given = std::env::args().skip(1);
    while let Some(flag) = given.next() {
        let mut value = || given.next().unwrap_or_default();
        match flag.as_str() {
            "--requests" => args.requests = value().parse().expect("--requests N"),
            "--idle" => args.idle = value().parse().expect("--idle N"),
            "--streams" => args.streams = value().parse().expect("--streams N"),
            "--warm" => args.warm = Some(value().parse().expect("--warm N")),
            "--dhat" => args.dhat = Some(value()),
            // `cargo bench` passes --bench; other flags are for other harnesses.
            _ => {}
        }
    }
    args
}

fn main() {
    let args = args();
    let profiler = match &args.dhat {
        Some(file) => dhat::Profiler::builder()
            .file_name(file)
            .trim_backtraces(Some(64))
            .build(),
        None => dhat::Profiler::builder().testing().build(),
    };
    let origin = start_origin();
    let config = Config::parse(
        Path::new("allocs.toml"),
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nmax_connections = 20000\n\
             header_read_timeout = \"60s\"\n[upstream]\nurl = \"http://{origin}\"\n\
             [auth]\nkeys = [{{ name = \"bench\", env = \"API_KEY\" }}]\n\
             [[inject]]\nname = \"x-shared-secret\"\nvalue = \"bench-shared-secret-0123456789\"\n"
        ),
        &Overrides::default(),
        &MapSecrets::default().with_env("API_KEY", KEY),
    )
    .expect("bench config is valid");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = proxy.local_addr().unwrap();
        let listeners = Listeners {
            proxy,
            admin: None,
            redirect: None,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (_reload, reloads) = tokio::sync::mpsc::unbounded_channel();
        let clients = std::thread::spawn(move || {
            let report = measure(addr, &args, profiler);
            let _ = stop.send(());
            report
        });
        let shutdown = async {
            let _ = stopped.await;
        };
        keygate::run(config, listeners, shutdown, reloads)
            .await
            .expect("keygate runs");
        for line in clients.join().expect("the clients finish") {
            println!("{line}");
        }
    });
}

/// The three figures, as report lines. The profiler is dropped (its file written) while the
/// idle connections are open, or with `--idle 0` while the streams are.
fn measure(proxy: SocketAddr, args: &Args, profiler: dhat::Profiler) -> Vec<String> {
    let mut report = Vec::with_capacity(4);
    let request =
        format!("GET /v1/models HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {KEY}\r\n\r\n")
            .into_bytes();
    let sse_request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: 2\r\n\r\n{{}}"
    )
    .into_bytes();
    let mut buf = vec![0u8; 64 * 1024];
    let mut held = Vec::with_capacity(args.idle.max(args.streams));

    let mut client = connect(proxy);
    for _ in 0..args.requests / 10 {
        exchange(&mut client, &request, &mut buf);
    }
    let before = dhat::HeapStats::get();
    for _ in 0..args.requests {
        exchange(&mut client, &request, &mut buf);
    }
    let after = dhat::HeapStats::get();
    drop(client);
    let n = args.requests as f64;
    report.push(format!(
        "proxied request (keep-alive GET, 96-byte JSON answer, {} requests): {:.1} allocations, \
         {:.0} bytes allocated per request",
        args.requests,
        (after.total_blocks - before.total_blocks) as f64 / n,
        (after.total_bytes - before.total_bytes) as f64 / n,
    ));

    // Grows what all connections share (tokio's slab of socket registrations, the set of
    // connection tasks) to the number held below, as a process serving that many has.
    for _ in 0..args.warm.unwrap_or(args.idle.max(args.streams)) {
        let mut c = connect(proxy);
        exchange(&mut c, &request, &mut buf);
        held.push(c);
    }
    held.clear();
    reap_closed(proxy, &request, &mut buf);

    let mut profiler = Some(profiler);
    if args.streams > 0 {
        let before = settled();
        open_streams(proxy, args.streams, &sse_request, &mut buf, &mut held);
        let after = settled();
        report.push(live_per(
            "open SSE stream (client and upstream connection)",
            args.streams,
            &before,
            &after,
        ));
        if args.idle == 0 {
            end_profile(&mut profiler, args, &mut report, "the streams open");
        }
        end_streams(&mut held, &mut buf);
        if args.idle > 0 {
            reap_closed(proxy, &request, &mut buf);
        }
    }
    if args.idle > 0 {
        let before = settled();
        for _ in 0..args.idle {
            let mut c = connect(proxy);
            exchange(&mut c, &request, &mut buf);
            held.push(c);
        }
        // Every connection idle for PARK_AFTER is parked; the timer may fire up to that late.
        std::thread::sleep(2 * PARK_AFTER);
        let after = settled();
        report.push(live_per(
            "idle keep-alive connection, each answered once (parked)",
            args.idle,
            &before,
            &after,
        ));
        end_profile(
            &mut profiler,
            args,
            &mut report,
            "the idle connections open",
        );
    }
    report
}

/// keygate frees the tasks of closed connections when it accepts the next connection: one
/// more connection, so that they are not freed while the next figure is counted.
fn reap_closed(proxy: SocketAddr, request: &[u8], buf: &mut [u8]) {
    let _ = settled();
    let mut c = connect(proxy);
    exchange(&mut c, request, buf);
}

/// Opens `n` SSE streams through keygate and reads each one's first event.
fn open_streams(
    proxy: SocketAddr,
    n: usize,
    request: &[u8],
    buf: &mut [u8],
    held: &mut Vec<TcpStream>,
) {
    for _ in 0..n {
        let mut c = connect(proxy);
        c.write_all(request).expect("send");
        read_until(&mut c, buf, |got| find(got, SSE_EVENT).is_some());
        held.push(c);
    }
}

/// Has the origin end the open streams, reads each to its end and closes it.
fn end_streams(held: &mut Vec<TcpStream>, buf: &mut [u8]) {
    RELEASED.fetch_add(1, Ordering::Relaxed);
    for c in held.iter_mut() {
        read_until(c, buf, |got| find(got, SSE_END).is_some());
    }
    held.clear();
}

/// Drops the profiler, which writes the DHAT file if one was asked for.
fn end_profile(
    profiler: &mut Option<dhat::Profiler>,
    args: &Args,
    report: &mut Vec<String>,
    at_end: &str,
) {
    if profiler.take().is_some() {
        if let Some(file) = &args.dhat {
            report.push(format!("DHAT profile (t-end: {at_end}): {file}"));
        }
    }
}

fn live_per(what: &str, n: usize, before: &dhat::HeapStats, after: &dhat::HeapStats) -> String {
    let bytes = after.curr_bytes as f64 - before.curr_bytes as f64;
    let blocks = after.curr_blocks as f64 - before.curr_blocks as f64;
    format!(
        "{what} ({n}): {:.0} bytes live in {:.1} blocks each",
        bytes / n as f64,
        blocks / n as f64
    )
}

/// The heap once keygate has finished with what the clients just did: the live-block count
/// unchanged over 100 ms (at most 5 s).
fn settled() -> dhat::HeapStats {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = dhat::HeapStats::get();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = dhat::HeapStats::get();
        if now.curr_blocks == last.curr_blocks || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let c = TcpStream::connect(addr).expect("connect to keygate");
    c.set_nodelay(true).expect("nodelay");
    c.set_read_timeout(Some(READ_TIMEOUT)).expect("timeout");
    c
}

/// Sends a request and reads its whole response (head and `Content-Length` body).
fn exchange(c: &mut TcpStream, request: &[u8], buf: &mut [u8]) {
    c.write_all(request).expect("send");
    let mut end = 0;
    let mut filled = read_until(c, buf, |got| {
        find(got, b"\r\n\r\n").is_some_and(|head| {
            end = head + 4 + content_length(&got[..head]);
            got.len() >= end
        })
    });
    while filled < end {
        filled += read_some(c, &mut buf[filled..]);
    }
    assert!(buf.starts_with(b"HTTP/1.1 200 "), "keygate answered 200");
}

/// Reads into `buf` until `done` says the bytes so far are enough; returns their length.
fn read_until(c: &mut TcpStream, buf: &mut [u8], mut done: impl FnMut(&[u8]) -> bool) -> usize {
    let mut filled = 0;
    while !done(&buf[..filled]) {
        filled += read_some(c, &mut buf[filled..]);
    }
    filled
}

fn read_some(c: &mut TcpStream, buf: &mut [u8]) -> usize {
    match c.read(buf) {
        Ok(0) => panic!("keygate closed the connection"),
        Ok(n) => n,
        Err(e) => panic!("reading from keygate: {e}"),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn content_length(head: &[u8]) -> usize {
    head.split(|&b| b == b'\n')
        .find_map(|line| {
            let (name, value) = line.split_at(line.iter().position(|&b| b == b':')?);
            name.eq_ignore_ascii_case(b"content-length")
                .then(|| std::str::from_utf8(&value[1..]).ok()?.trim().parse().ok())?
        })
        .unwrap_or(0)
}

/// The origin: `ORIGIN_THREADS` threads accepting on one listener, each serving its
/// connection's requests one after another.
fn start_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("origin listener");
    let addr = listener.local_addr().unwrap();
    let json: &'static [u8] = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{JSON_BODY}",
        JSON_BODY.len()
    )
    .leak()
    .as_bytes();
    for _ in 0..ORIGIN_THREADS {
        let listener = listener.try_clone().expect("listener clone");
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            while let Ok((c, _)) = listener.accept() {
                serve(c, &mut buf, json);
            }
        });
    }
    addr
}

fn serve(mut c: TcpStream, buf: &mut [u8], json: &[u8]) {
    let _ = c.set_read_timeout(Some(READ_TIMEOUT));
    loop {
        let mut filled = 0;
        let head = loop {
            if let Some(end) = find(&buf[..filled], b"\r\n\r\n") {
                break end;
            }
            match c.read(&mut buf[filled..]) {
                Ok(0) | Err(_) => return,
                Ok(n) => filled += n,
            }
        };
        let stream = buf[..head].starts_with(b"POST /v1/chat/completions ");
        // The request body: only a stream's request has one.
        let mut body = content_length(&buf[..head]).saturating_sub(filled - head - 4);
        while body > 0 {
            match c.read(&mut buf[..body.min(16 * 1024)]) {
                Ok(0) | Err(_) => return,
                Ok(n) => body -= n,
            }
        }
        let answer = if stream {
            let round = RELEASED.load(Ordering::Relaxed);
            if c.write_all(SSE_HEAD).is_err() {
                return;
            }
            let deadline = Instant::now() + READ_TIMEOUT;
            while RELEASED.load(Ordering::Relaxed) == round && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            SSE_END
        } else {
            json
        };
        if c.write_all(answer).is_err() {
            return;
        }
    }
}
