//! Token usage: read from JSON responses and SSE streams of every keyed request, counted in
//! `keygate_tokens_total` with bounded model labels and written to the access line; a streamed
//! completion that did not ask for `stream_options.include_usage` gets it asked for, and its
//! client sees exactly the stream it asked for.

mod support;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use keygate::MODEL_LABELS_PER_KEY;
use support::process::{Running, TempDir, ENV};
use support::*;

/// A non-streamed chat completion from vLLM.
const VLLM_JSON: &str = r#"{"id":"chatcmpl-9c1f","object":"chat.completion","created":1732000000,"model":"Qwen/Qwen3-0.6B","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":21,"total_tokens":27,"completion_tokens":6}}"#;

/// The events of a streamed chat completion, as vLLM sends them.
const EVENTS: [&str; 3] = [
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"Qwen/Qwen3-0.6B\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hel\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"Qwen/Qwen3-0.6B\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\"}]}\n\n",
    "data: [DONE]\n\n",
];

/// The usage-only event `include_usage` adds before `[DONE]`.
const USAGE_EVENT: &str = "data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"Qwen/Qwen3-0.6B\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"total_tokens\":15,\"completion_tokens\":3}}\n\n";

fn answer(content_type: &'static str, body: impl Into<Bytes>) -> Response<UpBody> {
    let mut response = Response::new(Full::new(body.into()).map_err(|e| match e {}).boxed());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A keygate with an admin listener; the `default` key may use any model, `limited` (with
/// `CI_KEY`) only `lora-*`.
async fn proxy(upstream: &Upstream) -> Proxy {
    let config = TestConfig::new(upstream.addr)
        .max_request_body("4MiB")
        .admin()
        .keys([
            Key::env("default", "API_KEY"),
            Key::env("limited", "CI_KEY").models(&["lora-*"]),
        ]);
    start_proxy_with(&config.text()).await
}

fn post(path: &str, key: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::post(path)
        .header("host", "keygate.test")
        .header("authorization", bearer(key))
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap()
}

fn tokens(key: &str, model: &str, kind: &str) -> String {
    format!(r#"keygate_tokens_total{{key="{key}",model="{model}",kind="{kind}"}}"#)
}

#[tokio::test]
async fn usage_is_counted_from_a_json_response() {
    let upstream = start_upstream_with(|_| answer("application/json", VLLM_JSON)).await;
    let proxy = proxy(&upstream).await;
    let body = r#"{"model":"Qwen/Qwen3-0.6B","messages":[{"role":"user","content":"hi"}]}"#;
    for _ in 0..2 {
        let reply = send(proxy.addr, post("/v1/chat/completions", KEY, body)).await;
        assert_eq!(reply.body, VLLM_JSON.as_bytes());
        assert_eq!(reply.headers["content-length"], VLLM_JSON.len().to_string());
    }
    let prompt = tokens("default", "Qwen/Qwen3-0.6B", "prompt");
    let text = wait_for_sample(&proxy, &prompt, 42.0).await;
    assert_eq!(sample(&text, &prompt), 42.0, "{text}");
    let completion = tokens("default", "Qwen/Qwen3-0.6B", "completion");
    assert_eq!(sample(&text, &completion), 12.0, "{text}");
    // The upstream got the body as sent: a request that is not streamed is left alone.
    let seen = upstream.wait_for_requests(2).await;
    assert_eq!(seen[0].body, body.as_bytes());
    proxy.stop().await;
}

#[tokio::test]
async fn usage_is_counted_from_a_stream_that_asked_for_it_and_passed_on() {
    let stream = [EVENTS[0], EVENTS[1], USAGE_EVENT, EVENTS[2]].concat();
    let sent = stream.clone();
    let upstream = start_upstream_with(move |_| answer("text/event-stream", sent.clone())).await;
    let proxy = proxy(&upstream).await;
    let body = r#"{"model":"lora-a","stream":true,"stream_options":{"include_usage":true}}"#;
    let reply = send(proxy.addr, post("/v1/chat/completions", CI_KEY, body)).await;
    assert_eq!(reply.text(), stream);
    assert_eq!(upstream.wait_for_requests(1).await[0].body, body.as_bytes());
    let prompt = tokens("limited", "lora-a", "prompt");
    let text = wait_for_sample(&proxy, &prompt, 12.0).await;
    assert_eq!(
        sample(&text, &tokens("limited", "lora-a", "completion")),
        3.0
    );
    proxy.stop().await;
}

/// Sends `body` as a streamed chat completion; the upstream answers with the events and the
/// usage event, cut into `pieces`-byte chunks. Returns what the client received and what the
/// upstream received.
async fn stream_without_asking(key: &str, body: String, pieces: usize) -> (String, Bytes) {
    let (upstream, mut senders) = start_streaming_upstream().await;
    let proxy = proxy(&upstream).await;
    let addr = proxy.addr;
    let sending = key.to_owned();
    let client = tokio::spawn(async move {
        let response = open(addr, post("/v1/chat/completions", &sending, body)).await;
        assert!(!response.headers().contains_key("content-length"));
        read_reply(response).await
    });
    let mut sender = tokio::time::timeout(DEADLINE, senders.recv())
        .await
        .unwrap()
        .unwrap();
    let stream = [EVENTS[0], EVENTS[1], USAGE_EVENT, EVENTS[2]].concat();
    for piece in stream.as_bytes().chunks(pieces) {
        sender
            .send_data(Bytes::copy_from_slice(piece))
            .await
            .unwrap();
    }
    drop(sender);
    let reply = client.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    let (key_name, model) = if key == KEY {
        ("default", "m")
    } else {
        ("limited", "lora-a")
    };
    let prompt = tokens(key_name, model, "prompt");
    let text = wait_for_sample(&proxy, &prompt, 12.0).await;
    assert_eq!(sample(&text, &tokens(key_name, model, "completion")), 3.0);
    let seen = upstream.wait_for_requests(1).await;
    proxy.stop().await;
    (reply.text(), seen[0].body.clone())
}

#[tokio::test]
async fn a_stream_that_did_not_ask_for_usage_is_counted_and_its_client_never_sees_the_usage() {
    let asked_for = EVENTS.concat();
    for pieces in [1, 7, 4096] {
        let body = r#"{"model":"m","stream":true,"messages":[]}"#;
        let (client, upstream) = stream_without_asking(KEY, body.to_owned(), pieces).await;
        assert_eq!(client, asked_for, "pieces of {pieces}");
        assert_eq!(
            upstream,
            r#"{"model":"m","stream":true,"messages":[],"stream_options":{"include_usage":true}}"#
        );
    }
    // The client's own options are kept, and its `false` replaced.
    let body = r#"{"model":"m","stream":true,"stream_options":{"include_usage":false}} "#;
    let (client, upstream) = stream_without_asking(KEY, body.to_owned(), 64).await;
    assert_eq!(client, asked_for);
    let sent: serde_json::Value = serde_json::from_slice(&upstream).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
}

#[tokio::test]
async fn a_long_streamed_request_gets_usage_asked_for_while_it_is_sent_on() {
    let pad = "x".repeat(200 * 1024);
    let body = format!(r#"{{"model":"lora-a","stream":true,"prompt":"{pad}"}}"#);
    let (client, upstream) = stream_without_asking(CI_KEY, body.clone(), 100).await;
    assert_eq!(client, EVENTS.concat());
    let expected = format!(
        r#"{{"model":"lora-a","stream":true,"prompt":"{pad}","stream_options":{{"include_usage":true}}}}"#
    );
    assert!(upstream == expected.as_bytes(), "the upstream body differs");
}

#[tokio::test]
async fn routes_that_do_not_honour_include_usage_are_left_alone() {
    let upstream = start_upstream_with(|_| answer("text/event-stream", EVENTS.concat())).await;
    let proxy = proxy(&upstream).await;
    let body = r#"{"model":"m","stream":true}"#;
    for path in ["/v1/responses", "/completion", "/v1/chat/completions/batch"] {
        let reply = send(proxy.addr, post(path, KEY, body)).await;
        assert_eq!(reply.text(), EVENTS.concat());
    }
    for seen in upstream.wait_for_requests(3).await {
        assert_eq!(seen.body, body.as_bytes(), "{}", seen.uri);
    }
    proxy.stop().await;
}

#[tokio::test]
async fn a_body_that_is_not_json_is_forwarded_unchanged_for_a_key_without_models() {
    let upstream = start_upstream_with(|_| answer("application/json", VLLM_JSON)).await;
    let proxy = proxy(&upstream).await;
    let long = format!("binary {}", "y".repeat(200 * 1024));
    let bodies = [
        "plain text".to_owned(),
        r#"{"stream":true,"stream":true} x"#.to_owned(),
        long,
        // Found not to be JSON only at its end, where a key with models is refused.
        r#"{"model":"named","messages":["#.to_owned(),
    ];
    for body in &bodies {
        let reply = send(proxy.addr, post("/v1/completions", KEY, body.clone())).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let seen = upstream.wait_for_requests(bodies.len()).await;
    for (seen, body) in seen.iter().zip(&bodies) {
        assert!(seen.body == body.as_bytes());
        // Unread from its first bad byte, so its length stays known.
        assert_eq!(seen.headers["content-length"], body.len().to_string());
    }
    // The answers carried usage and named their model; a body that is not JSON names none,
    // whatever it holds.
    let prompt = tokens("default", "Qwen/Qwen3-0.6B", "prompt");
    let text = wait_for_sample(&proxy, &prompt, 84.0).await;
    assert!(!text.contains(r#"model="named""#), "{text}");
    proxy.stop().await;
}

#[tokio::test]
async fn a_body_that_is_not_json_goes_upstream_before_its_end() {
    let upstream = start_upstream_with(|_| answer("application/json", VLLM_JSON)).await;
    // However slowly the rest of the body follows, the upstream waits for it.
    let config = TestConfig::new(upstream.addr)
        .response_timeout(6 * DEADLINE)
        .keys([Key::env("default", "API_KEY")]);
    let proxy = start_proxy_with(&config.text()).await;
    let (mut tx, req) = upload("/v1/completions");
    let addr = proxy.addr;
    let client = tokio::spawn(async move { read_reply(open(addr, req).await).await });
    tx.send_data(Bytes::from_static(b"plain text, "))
        .await
        .unwrap();
    // The rest waits for the upstream: once the body cannot be JSON, keygate does not wait
    // for the read-ahead to fill.
    upstream
        .wait_until("the upstream contacted", |u| u.connections_opened() == 1)
        .await;
    tx.send_data(Bytes::from_static(b"then the rest"))
        .await
        .unwrap();
    drop(tx);
    assert_eq!(client.await.unwrap().status, StatusCode::OK);
    let seen = upstream.wait_for_requests(1).await;
    assert_eq!(seen[0].body, "plain text, then the rest".as_bytes());
    proxy.stop().await;
}

#[tokio::test]
async fn only_a_post_that_is_not_a_form_is_read() {
    let upstream = start_upstream_with(|_| answer("text/event-stream", EVENTS.concat())).await;
    let proxy = proxy(&upstream).await;
    // A streamed chat completion that would get `include_usage` asked for, were it read.
    let body = r#"{"model":"m","stream":true}"#;
    for (method, content_type) in [
        ("PUT", "application/json"),
        ("POST", "multipart/form-data; boundary=x"),
    ] {
        let req = Request::builder()
            .method(method)
            .uri("/v1/chat/completions")
            .header("host", "keygate.test")
            .header("authorization", bearer(KEY))
            .header("content-type", content_type)
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let reply = send(proxy.addr, req).await;
        assert_eq!(reply.text(), EVENTS.concat(), "{method} {content_type}");
    }
    for seen in upstream.wait_for_requests(2).await {
        assert_eq!(seen.body, body.as_bytes(), "{}", seen.method);
    }
    proxy.stop().await;
}

#[tokio::test]
async fn bodies_that_are_not_json_flow_unread_and_their_answers_still_count() {
    let upstream = start_upstream_with(|_| answer("application/json", VLLM_JSON)).await;
    let proxy = proxy(&upstream).await;
    let form = "model=m&stream=true&prompt=hi";
    for content_type in [
        "application/x-www-form-urlencoded",
        "application/octet-stream",
        "multipart/form-data; boundary=x",
    ] {
        let req = Request::post("/v1/completions")
            .header("host", "keygate.test")
            .header("authorization", bearer(KEY))
            .header("content-type", content_type)
            .body(Full::new(Bytes::from_static(form.as_bytes())))
            .unwrap();
        assert_eq!(send(proxy.addr, req).await.status, StatusCode::OK);
    }
    for seen in upstream.wait_for_requests(3).await {
        assert_eq!(seen.body, form.as_bytes());
        assert_eq!(seen.headers["content-length"], form.len().to_string());
    }
    let prompt = tokens("default", "Qwen/Qwen3-0.6B", "prompt");
    wait_for_sample(&proxy, &prompt, 63.0).await;
    proxy.stop().await;
}

#[tokio::test]
async fn model_labels_are_minted_only_from_answers_and_bounded_per_key() {
    // Answers any model with usage, naming it back, as llama.cpp does; refuses `missing`.
    let upstream = start_upstream_with(|seen| {
        let body: serde_json::Value = serde_json::from_slice(&seen.body).unwrap();
        let model = body["model"].as_str().unwrap().to_owned();
        if model == "missing" {
            return answer(
                "application/json",
                r#"{"error":{"message":"no such model","code":404}}"#,
            );
        }
        let answer_body = serde_json::json!({
            "model": model,
            "choices": [],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2},
        });
        answer("application/json", answer_body.to_string())
    })
    .await;
    let proxy = proxy(&upstream).await;
    // Sent first, while the key could still mint labels.
    for model in ["missing", "line\nbreak\"} 1\nforged_total 1"] {
        let body = serde_json::json!({ "model": model }).to_string();
        send(proxy.addr, post("/v1/completions", KEY, body)).await;
    }
    let sent = MODEL_LABELS_PER_KEY + 8;
    for i in 0..sent {
        let body = serde_json::json!({"model": format!("model-{i}")}).to_string();
        let reply = send(proxy.addr, post("/v1/completions", KEY, body)).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    let other = tokens("default", "(other)", "prompt");
    let text = wait_for_sample(&proxy, &other, 9.0).await;
    let series = text
        .lines()
        .filter(|l| l.starts_with(r#"keygate_tokens_total{key="default""#))
        .count();
    assert_eq!(series, 2 * (MODEL_LABELS_PER_KEY + 1), "{text}");
    assert_eq!(sample(&text, &other), 9.0, "{text}");
    assert!(
        !text.contains("missing") && !text.contains("forged"),
        "{text}"
    );
    assert_eq!(
        sample(&text, &tokens("default", "model-0", "completion")),
        2.0
    );
    proxy.stop().await;
}

#[test]
fn the_access_line_carries_the_model_and_the_tokens() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(start_upstream_with(|_| {
        answer("application/json", VLLM_JSON)
    }));
    let dir = TempDir::new("usage-log");
    let config = TestConfig::new(upstream.addr)
        .log_level("info")
        .keys([
            Key::env("default", "API_KEY"),
            Key::env("limited", "CI_KEY").models(&["lora-*"]),
        ])
        .text();
    let keygate = Running::start(&dir.write("keygate.toml", &config), &ENV);
    runtime.block_on(async {
        let body = r#"{"model":"lora-a","messages":[]}"#;
        let reply = send(keygate.addr, post("/v1/chat/completions", CI_KEY, body)).await;
        assert_eq!(reply.status, StatusCode::OK);
        let refused = r#"{"model":"secret"}"#;
        let reply = send(keygate.addr, post("/v1/chat/completions", CI_KEY, refused)).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND);
        let reply = send(
            keygate.addr,
            get("/v1/models", &[("authorization", &bearer(KEY))]),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK);
        // Longer than the read-ahead, its model last: refused while it is sent on.
        let long = format!(
            r#"{{"prompt":"{}","model":"secret"}}"#,
            "x".repeat(200 * 1024)
        );
        let reply = send(keygate.addr, post("/v1/chat/completions", CI_KEY, long)).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND);
    });
    let (status, output) = keygate.terminate();
    assert!(status.success(), "{output}");
    let access: Vec<serde_json::Value> = output
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["target"] == "keygate::access")
        .collect();
    assert_eq!(access.len(), 4, "{output}");
    assert_eq!(access[0]["model"], "lora-a");
    assert_eq!(access[0]["prompt_tokens"], 21);
    assert_eq!(access[0]["completion_tokens"], 6);
    assert_eq!(access[1]["model"], "secret");
    assert_eq!(access[1]["status"], 404);
    assert_eq!(access[1]["prompt_tokens"], serde_json::Value::Null);
    // A request without a body names no model and reports no tokens.
    assert!(access[2].get("model").is_none() && access[2].get("prompt_tokens").is_none());
    assert_eq!(access[3]["model"], "secret");
    assert_eq!(access[3]["status"], 404);
}
