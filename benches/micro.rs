//! Micro-benchmarks of keygate's per-request work outside the network: checking a key
//! against 1, 8 and 64 configured keys, reading the credential header, matching the key-less
//! routes, rewriting request and response headers, picking the request id, and taking a
//! place from the upstream's fair queue; and the body inspection: a request body's model (a
//! 2 KB chat and a 20 MB base64 image), token usage from a JSON response and from SSE events,
//! and the filtered model list.
//!
//! Run from the repository root with `cargo bench --bench micro`; a quicker pass (about a
//! minute on two cores, once built) is
//! `cargo bench --bench micro -- --warm-up-time 1 --measurement-time 3`.
//! A name filter runs a subset: `cargo bench --bench micro -- rewrite`.

use std::future::Future;
use std::hint::black_box;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use http::header::HOST;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use keygate::{
    filter_model_list, Config, FairQueue, HoldBack, JsonUsage, KeySet, KeySpec, MapSecrets, Models,
    Origin, Overrides, Peer, Permit, Policy, Routes, Rules, Scanner, Secret, SseUsage,
};

const KEY: &str = "bench-api-key-0123456789abcdef";
const SECRET: &str = "bench-shared-secret-0123456789";

const CONFIG: &str = r#"
[auth]
keys = [{ name = "default", env = "API_KEY" }]
identity_header = "x-keygate-key"

[[inject]]
name = "x-shared-secret"
value = "${SHARED_SECRET}"
"#;

fn header_map(pairs: &[(&'static str, &str)]) -> HeaderMap {
    pairs
        .iter()
        .map(|&(name, value)| {
            (
                HeaderName::from_static(name),
                HeaderValue::from_str(value).expect("valid header text"),
            )
        })
        .collect()
}

/// The headers of a chat completion sent by the OpenAI Python client, `Host` included.
fn client_request(key: &str) -> HeaderMap {
    header_map(&[
        ("host", "127.0.0.1:8080"),
        ("authorization", &format!("Bearer {key}")),
        ("content-type", "application/json"),
        ("content-length", "187"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate"),
        ("connection", "keep-alive"),
        ("user-agent", "OpenAI/Python 1.54.0"),
        ("x-stainless-lang", "python"),
        ("x-stainless-package-version", "1.54.0"),
        ("x-stainless-runtime", "CPython"),
        ("x-stainless-retry-count", "0"),
    ])
}

/// The headers of a non-streamed completion as an inference server answers it.
fn upstream_response() -> HeaderMap {
    header_map(&[
        ("date", "Sun, 23 Nov 2025 10:00:00 GMT"),
        ("server", "uvicorn"),
        ("content-type", "application/json"),
        ("content-length", "612"),
        ("connection", "keep-alive"),
        ("x-request-id", "chatcmpl-5f0c1b2e9a7d4c3b8e6f"),
    ])
}

fn auth_verify(c: &mut Criterion) {
    let mut group = c.benchmark_group("auth_verify");
    for n in [1, 8, 64, 1024, 10_000] {
        let keys: Vec<String> = (0..n)
            .map(|_| keygate::generate_key().expect("OS randomness"))
            .collect();
        let last = keys.last().expect("at least one key").clone();
        let specs: Vec<KeySpec> = keys
            .into_iter()
            .enumerate()
            .map(|(i, key)| KeySpec {
                name: format!("key-{i}"),
                origin: format!("environment variable KEY_{i}"),
                secret: Secret::new(key),
                policy: Arc::default(),
            })
            .collect();
        let set = KeySet::new(&specs, |_| Arc::new(Policy::default()));
        let wrong = keygate::generate_key().expect("OS randomness");
        group.bench_with_input(BenchmarkId::new("last_key", n), &last, |b, token| {
            b.iter(|| set.verify(black_box(token.as_bytes())))
        });
        group.bench_with_input(BenchmarkId::new("wrong_token", n), &wrong, |b, token| {
            b.iter(|| set.verify(black_box(token.as_bytes())))
        });
    }
    group.finish();
}

fn auth_credential(c: &mut Criterion) {
    let headers = client_request(KEY);
    c.bench_function("auth_credential/bearer", |b| {
        b.iter(|| keygate::credential(black_box(&headers)))
    });
}

fn route_classify(c: &mut Criterion) {
    let routes = Routes::new(
        "/health".into(),
        vec!["/docs".into(), "/redoc".into(), "/openapi.json".into()],
    );
    let mut group = c.benchmark_group("route_classify");
    for (name, target) in [
        ("probe", "/health"),
        ("protected", "/v1/chat/completions"),
        ("dot_segments", "/health/../v1/models"),
    ] {
        let uri: Uri = target.parse().expect("valid request target");
        group.bench_function(name, |b| {
            b.iter(|| routes.classify(black_box(&Method::GET), black_box(&uri)))
        });
    }
    group.finish();
}

fn preset_lookup(c: &mut Criterion) {
    let table = keygate::Table::new(&keygate::VLLM);
    let mut group = c.benchmark_group("preset_lookup_vllm");
    for (name, method, path) in [
        ("inference", Method::POST, "/v1/chat/completions"),
        ("pattern", Method::GET, "/v1/responses/resp_123"),
        ("not_listed", Method::GET, "/v1/nowhere"),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| table.class(black_box(&method), black_box(path)))
        });
    }
    group.finish();
}

fn rewrite_headers(c: &mut Criterion) {
    let secrets = MapSecrets::default()
        .with_env("API_KEY", KEY)
        .with_env("SHARED_SECRET", SECRET);
    let config = Config::parse(
        Path::new("bench.toml"),
        CONFIG,
        &Overrides::default(),
        &secrets,
    )
    .expect("valid bench config");
    let rules = Rules::new(&config);
    let keys = KeySet::new(&config.auth.keys, |_| Arc::new(Policy::default()));
    let key = keys.verify(KEY.as_bytes());
    assert!(key.is_some(), "the bench key verifies");
    let peer = Peer::new(SocketAddr::from(([127, 0, 0, 1], 51234)), false);
    // The handler takes `Host` out before the rewrite and hands it over as the origin's host.
    let mut request = client_request(KEY);
    let host = request.remove(HOST);
    let request_id = HeaderValue::from_static("0123456789abcdef0123456789abcdef");
    let response = upstream_response();

    let mut group = c.benchmark_group("rewrite");
    group.bench_function("request", |b| {
        b.iter_batched(
            || request.clone(),
            |mut headers| {
                let origin = Origin {
                    peer: &peer,
                    host: host.as_ref(),
                    key: key.as_ref(),
                    request_id: &request_id,
                };
                rules.request(black_box(&mut headers), origin);
                headers
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("response", |b| {
        b.iter_batched(
            || response.clone(),
            |mut headers| {
                rules.response(black_box(&mut headers), &request_id);
                headers
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn request_id(c: &mut Criterion) {
    let generated = client_request(KEY);
    let mut client_sent = generated.clone();
    client_sent.insert(
        "x-request-id",
        HeaderValue::from_static("req-7f3a9c2e-41d8-4b6a-9e0f-2c5d8a1b3e47"),
    );
    let mut group = c.benchmark_group("request_id");
    group.bench_function("client_sent", |b| {
        b.iter(|| keygate::request_id(black_box(&client_sent)))
    });
    group.bench_function("generated", |b| {
        b.iter(|| keygate::request_id(black_box(&generated)))
    });
    group.finish();
}

/// Polls an admission once, as a task's first poll does.
fn admit_once(queue: &FairQueue, key: &Arc<str>) -> Poll<Option<Permit>> {
    let admission = pin!(queue.admit(key, 1, Duration::from_secs(30)));
    admission
        .poll(&mut Context::from_waker(Waker::noop()))
        .map(Result::ok)
}

fn fair_admit(c: &mut Criterion) {
    // A waiting admission arms a tokio timer, so it needs a runtime to register with.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a tokio runtime");
    let _entered = runtime.enter();
    let key: Arc<str> = Arc::from("bench");
    let mut group = c.benchmark_group("fair_admit");
    // A place is free: one lock to take it, one to give it back.
    let queue = FairQueue::new(64);
    group.bench_function("free_place", |b| {
        b.iter(|| match admit_once(&queue, black_box(&key)) {
            Poll::Ready(permit) => drop(permit.expect("admitted")),
            Poll::Pending => unreachable!("a place is free"),
        })
    });
    // Full: a request queues, the holder gives its place back, the waiter takes it.
    let queue = FairQueue::new(1);
    let Poll::Ready(mut held) = admit_once(&queue, &key) else {
        unreachable!("the only place is free")
    };
    group.bench_function("queue_and_hand_over", |b| {
        b.iter(|| {
            let mut admission = pin!(queue.admit(black_box(&key), 1, Duration::from_secs(30)));
            let mut cx = Context::from_waker(Waker::noop());
            assert!(admission.as_mut().poll(&mut cx).is_pending());
            drop(held.take());
            match admission.poll(&mut cx) {
                Poll::Ready(permit) => held = permit.ok(),
                Poll::Pending => unreachable!("the place was handed over"),
            }
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    auth_verify,
    auth_credential,
    preset_lookup,
    route_classify,
    rewrite_headers,
    request_id,
    fair_admit
);
criterion_main!(benches, inspection);

/// A chat request of about 2 KB as the openai Python client sends it.
fn chat_body() -> Vec<u8> {
    let turn = "Summarise the following paragraph in one sentence, keeping every figure: keygate \
        authenticates each request with a constant-time key check, forwards it over a pooled \
        connection and streams both bodies in constant memory.";
    let messages: Vec<String> = (0..5)
        .map(|i| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            format!(r#"{{"role": "{role}", "content": "{turn}"}}"#)
        })
        .collect();
    format!(
        r#"{{"messages": [{{"role": "system", "content": "You are a careful assistant."}}, {}], "model": "Qwen/Qwen3-0.6B", "max_tokens": 256, "stream": true, "temperature": 0.7, "top_p": 0.95}}"#,
        messages.join(", ")
    )
    .into_bytes()
}

/// A vision request carrying a 20 MB base64 image, the model named last.
fn image_body() -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut body = br#"{"messages":[{"role":"user","content":[{"type":"text","text":"What is in this image?"},{"type":"image_url","image_url":{"url":"data:image/png;base64,"#.to_vec();
    body.extend((0..20_000_000usize).map(|i| ALPHABET[(i * 7 + i / 64) % 64]));
    body.extend_from_slice(br#""}}]}],"max_tokens":300,"model":"Qwen/Qwen2.5-VL-3B-Instruct"}"#);
    body
}

/// Scans a body through the hold-back in `chunk`-sized pieces and checks the allow-list,
/// as the request path does.
fn inspect_body(body: &Bytes, chunk: usize, models: &Models) -> bool {
    let mut hold = HoldBack::new(Scanner::requiring_model());
    let mut at = 0;
    while at < body.len() {
        let end = (at + chunk).min(body.len());
        if hold.push(body.slice(at..end)).is_err() {
            return false;
        }
        at = end;
    }
    match hold.finish() {
        (Ok(inspected), held) => {
            black_box(held);
            inspected.model.is_some_and(|m| models.allows(&m))
        }
        (Err(_), _) => false,
    }
}

fn inspect_request(c: &mut Criterion) {
    let models = Models::new(["Qwen/Qwen3-0.6B", "Qwen/Qwen2.5-VL-3B-Instruct", "lora-*"])
        .expect("valid patterns");
    let mut group = c.benchmark_group("inspect_request");
    let chat = Bytes::from(chat_body());
    group.throughput(Throughput::Bytes(chat.len() as u64));
    group.bench_function("chat_2k", |b| {
        b.iter(|| assert!(inspect_body(black_box(&chat), 16 * 1024, &models)))
    });
    let image = Bytes::from(image_body());
    group.sample_size(10);
    group.throughput(Throughput::Bytes(image.len() as u64));
    group.bench_function("image_20mb", |b| {
        b.iter(|| assert!(inspect_body(black_box(&image), 64 * 1024, &models)))
    });
    group.finish();
}

fn usage_response(c: &mut Criterion) {
    let json = br#"{"id":"chatcmpl-9c1f","object":"chat.completion","created":1732000000,"model":"Qwen/Qwen3-0.6B","choices":[{"index":0,"message":{"role":"assistant","content":"Keygate checks each key in constant time and streams both bodies in constant memory.","tool_calls":[]},"logprobs":null,"finish_reason":"stop","stop_reason":null}],"usage":{"prompt_tokens":421,"total_tokens":439,"completion_tokens":18,"prompt_tokens_details":null},"prompt_logprobs":null}"#;
    let token = Bytes::from_static(br#"data: {"id":"chatcmpl-9c1f","object":"chat.completion.chunk","created":1732000000,"model":"Qwen/Qwen3-0.6B","choices":[{"index":0,"delta":{"content":" constant"},"logprobs":null,"finish_reason":null}]}

"#);
    let usage_event = Bytes::from_static(br#"data: {"id":"chatcmpl-9c1f","object":"chat.completion.chunk","created":1732000000,"model":"Qwen/Qwen3-0.6B","choices":[],"usage":{"prompt_tokens":421,"total_tokens":439,"completion_tokens":18}}

"#);
    let mut group = c.benchmark_group("usage");
    group.bench_function("json_response", |b| {
        b.iter(|| {
            let mut u = JsonUsage::new();
            u.push(black_box(json));
            u.finish()
        })
    });
    let mut counting = SseUsage::counting();
    group.bench_function("sse_token_event/counting", |b| {
        b.iter(|| counting.push(black_box(&token)))
    });
    let mut stripping = SseUsage::stripping();
    group.bench_function("sse_token_event/stripping", |b| {
        b.iter(|| stripping.push(black_box(&token)))
    });
    let mut usage_only = SseUsage::stripping();
    group.bench_function("sse_usage_event/stripping", |b| {
        b.iter(|| usage_only.push(black_box(&usage_event)))
    });
    group.finish();
}

fn filter_models(c: &mut Criterion) {
    let entries: Vec<String> = (0..32)
        .map(|i| {
            let id = if i % 2 == 0 { format!("lora-{i}") } else { format!("other-{i}") };
            format!(r#"{{"id":"{id}","object":"model","created":1732000000,"owned_by":"vllm","root":"/adapters/{id}","parent":"Qwen/Qwen3-0.6B","max_model_len":32768,"permission":[]}}"#)
        })
        .collect();
    let list = format!(r#"{{"object":"list","data":[{}]}}"#, entries.join(","));
    let models = Models::new(["Qwen/Qwen3-0.6B", "lora-*"]).expect("valid patterns");
    c.bench_function("filter_model_list/32_entries", |b| {
        b.iter(|| filter_model_list(black_box(list.as_bytes()), &models))
    });
}

criterion_group!(inspection, inspect_request, usage_response, filter_models);
