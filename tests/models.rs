//! A key's `models`: the request body's model read the way the origin reads it, a model
//! outside the list refused with 404 and never forwarded, a body whose model cannot be decided
//! refused with 400, `GET /v1/models` filtered, and the config that sets it.

mod support;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use support::process::{run_to_end, TempDir};
use support::*;

/// The allow-list of the `default` key in these tests.
const MODELS: [&str; 2] = ["Qwen/Qwen3-0.6B", "lora-*"];

/// A keygate whose `default` key may use [`MODELS`] and whose `ci` key may use any model.
async fn proxy(upstream: &Upstream) -> Proxy {
    let config = TestConfig::new(upstream.addr)
        .max_request_body("4MiB")
        .keys([
            Key::env("default", "API_KEY").models(&MODELS),
            Key::env("ci", "CI_KEY"),
        ]);
    start_proxy_with(&config.text()).await
}

/// A POST of `body` to `path` with `key` and the given extra headers.
fn post(
    path: &str,
    key: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut builder = Request::post(path)
        .header("host", "keygate.test")
        .header("authorization", bearer(key));
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Full::new(body.into())).unwrap()
}

const JSON: (&str, &str) = ("content-type", "application/json");

/// The exact refusal for `model`.
fn not_found(model: &str) -> String {
    format!(
        r#"{{"error":{{"message":"The model `{model}` does not exist or you do not have access to it.","type":"invalid_request_error","code":"model_not_found"}}}}"#
    )
}

/// Sends `chunks` as one streamed request body of key `default` to the chat route, each
/// chunk its own frame; returns the reply.
async fn post_chunks(addr: std::net::SocketAddr, chunks: Vec<Bytes>) -> Reply {
    let (mut tx, req) = upload("/v1/chat/completions");
    let feeding = tokio::spawn(async move {
        for chunk in chunks {
            if tx.send_data(chunk).await.is_err() {
                return;
            }
        }
    });
    let reply = read_reply(open(addr, req).await).await;
    feeding.await.unwrap();
    reply
}

/// A chat body of more than the read-ahead, with `before` and `after` around the padding:
/// keygate sends it on while it reads it.
fn long_body(before: &str, after: &str) -> String {
    let pad = "x".repeat(200 * 1024);
    format!(r#"{{{before}"messages":[{{"role":"user","content":"{pad}"}}]{after}}}"#)
}

/// `body` cut into chunks of `size` bytes.
fn cut(body: &str, size: usize) -> Vec<Bytes> {
    body.as_bytes()
        .chunks(size)
        .map(Bytes::copy_from_slice)
        .collect()
}

#[tokio::test]
async fn an_allowed_model_is_forwarded_unchanged() {
    let upstream = start_upstream().await;
    let proxy = proxy(&upstream).await;
    let bodies = [
        r#"{"model":"Qwen/Qwen3-0.6B","messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"lora-sql","max_tokens":5}"#,
        r#"{"mod\u0065l":"lora-\u0061"}"#,
        "\u{feff}{\"model\":\"lora-a\"}",
    ];
    for body in bodies {
        let reply = send(proxy.addr, post("/v1/completions", KEY, &[JSON], body)).await;
        assert_eq!(reply.status, StatusCode::OK, "{body}: {}", reply.text());
    }
    let seen = upstream.wait_for_requests(bodies.len()).await;
    for (seen, body) in seen.iter().zip(bodies) {
        assert_eq!(seen.body, body.as_bytes());
        assert_eq!(seen.headers["content-length"], body.len().to_string());
    }
    proxy.stop().await;
}

#[tokio::test]
async fn a_model_outside_the_list_is_refused_and_never_reaches_the_upstream() {
    let upstream = start_upstream().await;
    let proxy = proxy(&upstream).await;
    for (body, model) in [
        (r#"{"model":"secret-base","messages":[]}"#, "secret-base"),
        (r#"{"mod\u0065l":"secret-base"}"#, "secret-base"),
        (r#"{"model":"\u0073ecret"}"#, "secret"),
        (r#"{"model":"qwen/qwen3-0.6b"}"#, "qwen/qwen3-0.6b"),
        (r#"{"model":"lora"}"#, "lora"),
        (r#"{"model":"Qwen/Qwen3-0.6B "}"#, "Qwen/Qwen3-0.6B "),
        ("\u{feff}{\"model\":\"secret\"}", "secret"),
    ] {
        let reply = send(proxy.addr, post("/v1/chat/completions", KEY, &[JSON], body)).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(reply.text(), not_found(model), "{body}");
        assert_eq!(reply.headers["content-type"], "application/json");
    }
    // Whatever the content type says, the body is read as the origin reads it: JSON.
    for content_type in ["text/plain", "application/x-www-form-urlencoded", "x/y"] {
        let body = r#"{"model":"secret"}"#;
        let reply = send(
            proxy.addr,
            post(
                "/v1/chat/completions",
                KEY,
                &[("content-type", content_type)],
                body,
            ),
        )
        .await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{content_type}");
    }
    let reply = send(
        proxy.addr,
        post("/v1/completions", KEY, &[], r#"{"model":"secret"}"#),
    )
    .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    // A body that ends within the read-ahead is decided before the upstream is contacted.
    assert_eq!(upstream.connections_opened(), 0);
    // The key without models reaches the same model.
    let reply = send(
        proxy.addr,
        post("/v1/completions", CI_KEY, &[], r#"{"model":"secret"}"#),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(upstream.wait_for_requests(1).await.len(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn duplicate_or_unreadable_models_are_refused_as_undecidable() {
    let upstream = start_upstream().await;
    let proxy = proxy(&upstream).await;
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let long_name = format!(r#"{{"model":"lora-{}"}}"#, "a".repeat(600));
    for body in [
        r#"{"model":"lora-a","model":"secret"}"#,
        r#"{"model":"lora-a","mod\u0065l":"lora-a"}"#,
        r#"{"messages":[]}"#,
        r#"{"model":["lora-a"]}"#,
        r#"{"model":null}"#,
        r#"{"model":"lora-a"} {"model":"secret"}"#,
        r#"{"model":"lora-a","x":NaN}"#,
        r#"[{"model":"lora-a"}]"#,
        r#"{"model":"lora-a""#,
        r#"{"model":"lora-\ud800"}"#,
        "model=lora-a",
        "\u{feff}\u{feff}{\"model\":\"lora-a\"}",
        &format!(r#"{{"model":"lora-a","x":{deep}}}"#),
        &long_name,
    ] {
        let reply = send(
            proxy.addr,
            post("/v1/chat/completions", KEY, &[JSON], body.to_owned()),
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{body}: {}",
            reply.text()
        );
        let error = &reply.json()["error"];
        assert_eq!(error["code"], "model_undecidable", "{body}");
        assert_eq!(error["type"], "invalid_request_error");
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .starts_with("The model of this request cannot be decided: "),
            "{error}"
        );
    }
    // UTF-16 is not read as JSON either.
    let utf16: Vec<u8> =
        r#"{"model":"lora-a"}"#.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let reply = send(
        proxy.addr,
        post("/v1/chat/completions", KEY, &[JSON], utf16),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    // Multipart forms are not read.
    let form = "--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nlora-a\r\n--b--\r\n";
    let reply = send(
        proxy.addr,
        post(
            "/v1/audio/transcriptions",
            KEY,
            &[("content-type", "multipart/form-data; boundary=b")],
            form,
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.text().contains("multipart"), "{}", reply.text());
    assert_eq!(upstream.connections_opened(), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn a_body_split_across_chunks_is_decided_as_a_whole() {
    let upstream = start_upstream().await;
    let proxy = proxy(&upstream).await;
    for body in [
        r#"{"model":"secret"}"#,
        r#"{"model":"lora-a","model":"secret"}"#,
        r#"{"mod\u0065l":"secret"}"#,
    ] {
        let reply = post_chunks(proxy.addr, cut(body, 1)).await;
        assert!(
            matches!(reply.status.as_u16(), 400 | 404),
            "{body}: {}",
            reply.status
        );
    }
    assert_eq!(upstream.connections_opened(), 0);
    let body = r#"{"mod"#.to_owned() + r#"el":"lora-split"}"#;
    let reply = post_chunks(proxy.addr, cut(&body, 3)).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(upstream.wait_for_requests(1).await[0].body, body.as_bytes());
    proxy.stop().await;
}

/// Sends a long body in chunks, expects `status`, and checks that the upstream, which saw
/// the start of the body, never got all of it.
async fn refused_while_sent_on(upstream: &Upstream, proxy: &Proxy, body: &str, status: u16) {
    let opened = upstream.connections_opened();
    let reply = post_chunks(proxy.addr, cut(body, 16 * 1024)).await;
    assert_eq!(reply.status.as_u16(), status, "{}", reply.text());
    // The upstream was sent the start of the body, and its connection was cut before the end.
    upstream
        .wait_until("the aborted upstream connection", |u| {
            u.connections_opened() > opened && u.connections_closed() == u.connections_opened()
        })
        .await;
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn a_long_body_is_sent_on_while_read_and_a_refusal_aborts_it_upstream() {
    let upstream = start_upstream().await;
    let proxy = proxy(&upstream).await;
    let model_last = long_body("", r#","model":"secret""#);
    refused_while_sent_on(&upstream, &proxy, &model_last, 404).await;
    let duplicate_last = long_body(r#""model":"lora-a","#, r#","model":"lora-b""#);
    refused_while_sent_on(&upstream, &proxy, &duplicate_last, 400).await;
    let missing = long_body("", "");
    refused_while_sent_on(&upstream, &proxy, &missing, 400).await;
    let broken = long_body(r#""model":"lora-a","#, "").replace("}]}", "}]");
    refused_while_sent_on(&upstream, &proxy, &broken, 400).await;

    let allowed = long_body(r#""model":"lora-a","#, r#","max_tokens":5"#);
    let reply = post_chunks(proxy.addr, cut(&allowed, 16 * 1024)).await;
    assert_eq!(reply.status, StatusCode::OK);
    let seen = upstream.wait_for_requests(1).await;
    assert_eq!(seen[0].body, allowed.as_bytes());
    // Sent on before its end was read: chunked.
    assert_eq!(seen[0].headers["transfer-encoding"], "chunked");
    proxy.stop().await;
}

#[tokio::test]
async fn a_long_body_that_cannot_be_json_is_refused_before_the_upstream_is_contacted() {
    let upstream = start_upstream().await;
    // Long enough that only an answer that waits for nothing more arrives by the deadline.
    let config = TestConfig::new(upstream.addr)
        .response_timeout(6 * DEADLINE)
        .keys([Key::env("default", "API_KEY").models(&MODELS)]);
    let proxy = start_proxy_with(&config.text()).await;
    // Exactly the read-ahead (64 KiB), not JSON from its first byte, and more to come: the
    // refusal reads the rest of the read-ahead and answers, without waiting for the end of
    // the body or sending any of it upstream.
    let body = format!("model=lora-a&prompt={}", "x".repeat(64 * 1024 - 20));
    let (mut tx, req) = upload("/v1/chat/completions");
    let feeding = tokio::spawn(async move {
        for chunk in cut(&body, 16 * 1024) {
            if tx.send_data(chunk).await.is_err() {
                return None;
            }
        }
        Some(tx)
    });
    let reply = tokio::time::timeout(DEADLINE, async {
        read_reply(open(proxy.addr, req).await).await
    })
    .await
    .expect("refused before the rest of the body");
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], "model_undecidable");
    drop(feeding.await.unwrap());
    assert_eq!(upstream.connections_opened(), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn a_body_read_ahead_is_held_to_max_request_body_to_the_byte() {
    let upstream = start_upstream().await;
    let config = TestConfig::new(upstream.addr)
        .max_request_body("1KiB")
        .keys([Key::env("default", "API_KEY").models(&MODELS)]);
    let proxy = start_proxy_with(&config.text()).await;
    // A JSON body of `len` bytes.
    let body = |len: usize| {
        let (head, tail) = (r#"{"model":"lora-a","prompt":""#, r#""}"#);
        format!("{head}{}{tail}", "x".repeat(len - head.len() - tail.len()))
    };
    // The body in two HTTP/1.1 chunks, which reach keygate as frames of their own.
    let request = |body: &str| {
        let (a, b) = body.split_at(600);
        format!(
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
            a.len(),
            b.len()
        )
    };
    let (status, text) = raw(proxy.addr, request(&body(1025)).as_bytes()).await;
    assert_eq!(status, 413, "{text}");
    assert!(upstream.requests().is_empty());
    let (status, text) = raw(proxy.addr, request(&body(1024)).as_bytes()).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(upstream.wait_for_requests(1).await[0].body, body(1024));
    proxy.stop().await;
}

#[tokio::test]
async fn a_refused_body_is_read_to_its_end() {
    let upstream = start_upstream().await;
    let proxy = proxy(&upstream).await;
    // A form refused from its head, and a model refused from the body's first chunk, each in
    // many small chunks and followed by a second request on the connection: the connection
    // stays usable only if keygate read the refused body to its end.
    let pieces = ["ab"; 20].join("");
    for (path, content_type, first, status) in [
        (
            "/v1/audio/transcriptions",
            "multipart/form-data; boundary=b",
            "--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n",
            400,
        ),
        (
            "/v1/chat/completions",
            "application/json",
            r#"{"model":"secret","x":""#,
            404,
        ),
    ] {
        let rest = format!("{pieces}\"}}");
        let chunks: String = std::iter::once(first.to_owned())
            .chain(
                cut(&rest, 2)
                    .iter()
                    .map(|c| String::from_utf8_lossy(c).into_owned()),
            )
            .map(|c| format!("{:x}\r\n{c}\r\n", c.len()))
            .collect();
        let requests = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n{chunks}0\r\n\r\nGET /props HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n\r\n"
        );
        let (answered, text) = raw(proxy.addr, requests.as_bytes()).await;
        assert_eq!(answered, status, "{text}");
        assert!(text.contains("HTTP/1.1 200 "), "{path}: {text}");
    }
    proxy.stop().await;
}

/// An upstream that never answers and reports, per connection, every byte it received
/// until keygate closed the connection.
async fn start_raw_upstream() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut received = Vec::new();
                let _ = stream.read_to_end(&mut received).await;
                let _ = tx.send(received);
            });
        }
    });
    (addr, rx)
}

/// The body bytes of a chunked HTTP/1.1 request as far as they arrived.
fn dechunk(raw: &[u8]) -> Vec<u8> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a request head")
        + 4;
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let mut rest = &raw[head_end..];
    let mut body = Vec::new();
    while let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap(), 16).unwrap();
        let data = &rest[line_end + 2..];
        body.extend_from_slice(&data[..size.min(data.len())]);
        if size == 0 || data.len() < size + 2 {
            break;
        }
        rest = &data[size + 2..];
    }
    body
}

#[tokio::test]
async fn the_upstream_never_holds_the_whole_of_a_refused_body() {
    let (upstream, mut received) = start_raw_upstream().await;
    let config = TestConfig::new(upstream)
        .max_request_body("4MiB")
        .keys([Key::env("default", "API_KEY").models(&MODELS)]);
    let proxy = start_proxy_with(&config.text()).await;
    for body in [
        long_body("", ""),
        long_body(r#""model":"lora-a","#, r#","model":"lora-b""#),
        long_body("", r#","model":"secret""#),
        long_body(r#""model":"lora-a","#, "").replace("}]}", "}]} x"),
    ] {
        // The last chunk holds nothing but the closing brace: without the hold-back it would
        // go upstream before the end of the body is known.
        let (head, tail) = body.split_at(body.len() - 1);
        let mut chunks = cut(head, 16 * 1024);
        chunks.push(Bytes::copy_from_slice(tail.as_bytes()));
        let reply = post_chunks(proxy.addr, chunks).await;
        assert!(
            matches!(reply.status.as_u16(), 400 | 404),
            "{}",
            reply.status
        );
        let raw = tokio::time::timeout(DEADLINE, received.recv())
            .await
            .unwrap()
            .unwrap();
        let sent = dechunk(&raw);
        assert!(sent.len() > 64 * 1024, "the body was sent on while read");
        assert!(
            serde_json::from_slice::<serde_json::Value>(&sent).is_err(),
            "the upstream got a complete JSON body"
        );
        assert!(!sent.ends_with(b"}") && body.as_bytes().starts_with(&sent));
    }
    proxy.stop().await;
}

#[tokio::test]
async fn a_long_body_over_http2_is_decided_as_over_http1() {
    let upstream = start_upstream().await;
    let proxy = proxy(&upstream).await;
    let body = long_body("", r#","model":"secret""#);
    let reply = send_h2(proxy.addr, post("/v1/chat/completions", KEY, &[JSON], body)).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.text(), not_found("secret"));
    upstream
        .wait_until("the aborted upstream connection", |u| {
            u.connections_opened() == 1 && u.connections_closed() == 1
        })
        .await;
    assert!(upstream.requests().is_empty());
    proxy.stop().await;
}

/// vLLM's `GET /v1/models`: the base model, a LoRA adapter, and a model the key may not use.
const MODEL_LIST: &str = r#"{"object":"list","data":[{"id":"Qwen/Qwen3-0.6B","object":"model","owned_by":"vllm"},{"id":"lora-sql","object":"model","owned_by":"vllm","parent":"Qwen/Qwen3-0.6B"},{"id":"secret-base","object":"model","owned_by":"vllm"}]}"#;

#[tokio::test]
async fn the_model_list_shows_a_key_only_its_models() {
    let upstream = start_upstream_with(|seen| match seen.uri.as_str() {
        "/v1/models" | "/models" => fixed(StatusCode::OK, MODEL_LIST),
        "/v1/broken/models" => fixed(StatusCode::OK, r#"{"data":["#),
        _ => fixed(StatusCode::OK, "ok"),
    })
    .await;
    let proxy = proxy(&upstream).await;
    for path in ["/v1/models", "/models"] {
        let reply = send(
            proxy.addr,
            get(
                path,
                &[("authorization", &bearer(KEY)), ("accept-encoding", "gzip")],
            ),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        let list = reply.json();
        let ids: Vec<&str> = list["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["Qwen/Qwen3-0.6B", "lora-sql"], "{path}");
        assert_eq!(
            reply.headers["content-length"],
            reply.body.len().to_string()
        );
    }
    // The upstream was asked without compression, so the list could be read.
    assert!(upstream
        .wait_for_requests(2)
        .await
        .iter()
        .all(|s| !s.headers.contains_key("accept-encoding")));
    let reply = send(
        proxy.addr,
        get("/v1/models", &[("authorization", &bearer(CI_KEY))]),
    )
    .await;
    assert_eq!(reply.text(), MODEL_LIST);
    proxy.stop().await;
}

#[tokio::test]
async fn model_routes_without_a_body_follow_the_list() {
    let upstream = start_upstream().await;
    let proxy = proxy(&upstream).await;
    let auth = [("authorization", bearer(KEY))];
    let auth: Vec<(&str, &str)> = auth.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let reply = send(proxy.addr, get("/v1/models/secret-base", &auth)).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.text(), not_found("secret-base"));
    for path in ["/v1/%6dodels", "/v1//models", "/v1/models/lora-%61"] {
        let reply = send(proxy.addr, get(path, &auth)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{path}");
    }
    assert_eq!(upstream.connections_opened(), 0);
    for path in ["/v1/models/lora-x", "/props", "/v1/responses/resp_1"] {
        let reply = send(proxy.addr, get(path, &auth)).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
    }
    let reply = send(
        proxy.addr,
        request(
            Method::POST,
            "/v1/responses/resp_1/cancel",
            &[("authorization", &bearer(KEY))],
            "",
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(upstream.wait_for_requests(4).await.len(), 4);
    proxy.stop().await;
}

#[tokio::test]
async fn an_unreadable_model_list_is_a_502_not_the_whole_list() {
    let upstream = start_upstream_with(|seen| match seen.uri.as_str() {
        "/v1/models" => fixed(StatusCode::OK, r#"{"object":"list"}"#),
        _ => fixed(StatusCode::OK, r#"{"data":["#),
    })
    .await;
    let proxy = proxy(&upstream).await;
    for path in ["/v1/models", "/models"] {
        let reply = send(proxy.addr, get(path, &[("authorization", &bearer(KEY))])).await;
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{path}");
        assert_eq!(
            reply.json()["error"]["code"],
            "upstream_model_list_unreadable"
        );
    }
    proxy.stop().await;
}

#[tokio::test]
async fn a_websocket_is_refused_for_a_key_with_models() {
    let upstream = start_upstream().await;
    let proxy = proxy(&upstream).await;
    let request = format!(
        "GET /v1/realtime HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nContent-Length: 0\r\n\r\n"
    );
    let (status, text) = raw(proxy.addr, request.as_bytes()).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("WebSocket"), "{text}");
    assert_eq!(upstream.connections_opened(), 0);
    proxy.stop().await;
}

/// The message `check` prints for a config whose keys are `keys`.
fn check(keys: &str) -> (bool, String, String) {
    let dir = TempDir::new("models-check");
    let text = format!("[server]\nlisten = \"127.0.0.1:0\"\n[auth]\nkeys = [\n  {keys},\n]\n");
    let path = dir.write("keygate.toml", &text);
    let (status, stdout, stderr) = run_to_end(
        &["check", "--config", path.to_str().unwrap()],
        &[("API_KEY", KEY)],
    );
    let stderr = stderr.replace(path.to_str().unwrap(), "keygate.toml");
    (status.success(), stdout, stderr)
}

#[test]
fn check_shows_a_keys_models() {
    let (ok, stdout, stderr) =
        check(r#"{ name = "app", env = "API_KEY", models = ["Qwen/Qwen3-0.6B", "lora-*"] }"#);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("key app:         models Qwen/Qwen3-0.6B, lora-*"),
        "{stdout}"
    );
}

#[test]
fn a_bad_models_list_names_file_line_key_and_fix() {
    for (models, fix) in [
        ("[]", "remove `models` to allow every model"),
        (r#"["a", ""]"#, "an empty model name; remove it"),
        (
            r#"["lo*ra"]"#,
            "`lo*ra`: `*` may only end a pattern, as in `lora-*`",
        ),
        (r#"["*-lora"]"#, "`*-lora`: `*` may only end a pattern"),
    ] {
        let (ok, _, stderr) = check(&format!(
            r#"{{ name = "app", env = "API_KEY", models = {models} }}"#
        ));
        assert!(!ok);
        assert!(
            stderr.starts_with(r#"keygate.toml:5:3: [auth] keys (name = "app"): models: "#),
            "{stderr}"
        );
        assert!(stderr.contains(fix), "{models}: {stderr}");
    }
}
