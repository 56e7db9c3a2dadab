//! Per-key scopes and server presets: a valid key outside its `allow` rules or its
//! preset route classes gets 403 `permission_error`, a route the preset does not list gets
//! 404 even with a valid key, and neither reaches the upstream.

mod support;

use http::{Method, StatusCode};
use keygate::{Class, PRESETS};
use support::*;

/// The test config with an admin listener and `keys`, the inline tables of `[auth] keys`
/// as written.
fn scoped(upstream: std::net::SocketAddr, keys: &str) -> TestConfig {
    TestConfig::new(upstream).admin().keys_toml(keys)
}

/// [`scoped`] with the server preset `preset`, none if it is empty.
fn scoped_config(upstream: std::net::SocketAddr, keys: &str, preset: &str) -> String {
    let config = scoped(upstream, keys);
    match preset {
        "" => config,
        name => config.preset(name),
    }
    .text()
}

async fn status(
    addr: std::net::SocketAddr,
    method: Method,
    path: &str,
    key: Option<&str>,
) -> Reply {
    let auth = key.map(bearer);
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    send(addr, request(method, path, &headers, "")).await
}

fn assert_out_of_scope(reply: &Reply) {
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    assert_eq!(
        reply.headers["www-authenticate"],
        r#"Bearer realm="keygate", error="insufficient_scope""#
    );
    let error = &reply.json()["error"];
    assert_eq!(error["type"], "permission_error");
    assert_eq!(error["code"], "insufficient_scope");
}

#[tokio::test]
async fn scope_matrix_allowed_wrong_method_wrong_prefix_and_no_key() {
    let upstream = start_upstream().await;
    let keys = r#"{ name = "default", env = "API_KEY", allow = [{ methods = ["POST"], path_prefix = "/v1/" }, { methods = ["GET"], path_prefix = "/v1/models" }] }, { name = "ci", env = "CI_KEY" }"#;
    let proxy = start_proxy_with(&scoped_config(upstream.addr, keys, "")).await;
    let allowed = [
        (Method::POST, "/v1/chat/completions"),
        (Method::POST, "/v1/embeddings"),
        (Method::GET, "/v1/models"),
        (Method::GET, "/v1/models/some-model"),
    ];
    for (method, path) in &allowed {
        let reply = status(proxy.addr, method.clone(), path, Some(KEY)).await;
        assert_eq!(reply.status, StatusCode::OK, "{method} {path}");
    }
    let refused = [
        (Method::GET, "/v1/chat/completions"),
        (Method::DELETE, "/v1/models"),
        (Method::POST, "/v2/rerank"),
        (Method::POST, "/start_profile"),
        (Method::POST, "/v1"),
        (Method::POST, "/v1/../start_profile"),
        (Method::POST, "/v1/%2e%2e/start_profile"),
        (Method::POST, "//v1/chat/completions"),
    ];
    for (method, path) in &refused {
        let reply = status(proxy.addr, method.clone(), path, Some(KEY)).await;
        assert_out_of_scope(&reply);
    }
    for (method, path) in allowed.iter().chain(&refused) {
        let reply = status(proxy.addr, method.clone(), path, None).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{method} {path}");
    }
    let unscoped = status(proxy.addr, Method::POST, "/start_profile", Some(CI_KEY)).await;
    assert_eq!(
        unscoped.status,
        StatusCode::OK,
        "a key without allow may do anything"
    );
    let seen = upstream.wait_for_requests(allowed.len() + 1).await;
    assert_eq!(
        seen.len(),
        allowed.len() + 1,
        "no refused request reached the upstream"
    );
    let text = wait_for_sample(
        &proxy,
        r#"keygate_key_refusals_total{key="default",reason="out_of_scope"}"#,
        refused.len() as f64,
    )
    .await;
    assert_eq!(
        sample(
            &text,
            r#"keygate_requests_total{key="default",method="POST",status="403"}"#
        ),
        6.0,
        "{text}"
    );
    proxy.stop().await;
}

/// A concrete path for a table pattern.
fn concrete(pattern: &str) -> String {
    pattern.replace("**", "org/model-1").replace('*', "id-1")
}

#[tokio::test]
async fn each_preset_table_holds_against_a_recording_upstream() {
    for preset in &PRESETS {
        let upstream = start_upstream().await;
        let keys = r#"{ name = "default", env = "API_KEY" }, { name = "ci", env = "CI_KEY", routes = ["inference", "admin"] }"#;
        // No public paths: vLLM's and SGLang's /docs are admin routes of the presets.
        let text = scoped(upstream.addr, keys)
            .preset(preset.name)
            .public_paths(&[])
            .text();
        let proxy = start_proxy_with(&text).await;
        let mut forwarded = Vec::new();
        for (method, pattern, class) in preset.routes() {
            let path = concrete(pattern);
            let ordinary = status(proxy.addr, method.clone(), &path, Some(KEY)).await;
            match class {
                Class::Inference => {
                    assert_eq!(
                        ordinary.status,
                        StatusCode::OK,
                        "{} {method} {path}",
                        preset.name
                    );
                    forwarded.push((method.clone(), path.clone()));
                }
                Class::Admin => assert_out_of_scope(&ordinary),
            }
            let admin = status(proxy.addr, method.clone(), &path, Some(CI_KEY)).await;
            assert_eq!(
                admin.status,
                StatusCode::OK,
                "{} {method} {path}",
                preset.name
            );
            forwarded.push((method.clone(), path));
            let keyless = status(proxy.addr, method, &concrete(pattern), None).await;
            assert_eq!(keyless.status, StatusCode::UNAUTHORIZED);
        }
        for key in [KEY, CI_KEY] {
            for (method, path) in [
                (Method::GET, "/"),
                (Method::POST, "/v1/chat/completions/x"),
                (Method::PATCH, "/v1/chat/completions"),
                (Method::GET, "/v1/responses/../../metrics"),
                (Method::GET, "/nonexistent"),
            ] {
                let reply = status(proxy.addr, method.clone(), path, Some(key)).await;
                assert_eq!(
                    reply.status,
                    StatusCode::NOT_FOUND,
                    "{} {method} {path}",
                    preset.name
                );
                assert_eq!(reply.json()["error"]["code"], "route_not_found");
            }
        }
        let probe = status(proxy.addr, Method::GET, preset.probe, None).await;
        assert_eq!(
            probe.status,
            StatusCode::OK,
            "{}: the probe is key-less",
            preset.name
        );
        let seen = upstream.wait_for_requests(forwarded.len() + 1).await;
        let mut expected: Vec<(Method, String)> = forwarded;
        expected.push((Method::GET, preset.probe.to_owned()));
        let received: Vec<(Method, String)> = seen
            .iter()
            .map(|s| (s.method.clone(), s.uri.clone()))
            .collect();
        assert_eq!(
            received, expected,
            "{}: exactly the admitted requests",
            preset.name
        );
        proxy.stop().await;
    }
}

#[tokio::test]
async fn an_admin_only_key_cannot_use_inference_routes() {
    let upstream = start_upstream().await;
    let keys = r#"{ name = "default", env = "API_KEY", routes = ["admin"] }"#;
    let proxy = start_proxy_with(&scoped_config(upstream.addr, keys, "vllm")).await;
    let admin = status(proxy.addr, Method::POST, "/start_profile", Some(KEY)).await;
    assert_eq!(admin.status, StatusCode::OK);
    let inference = status(proxy.addr, Method::POST, "/v1/chat/completions", Some(KEY)).await;
    assert_out_of_scope(&inference);
    proxy.stop().await;
}

#[tokio::test]
async fn allow_rules_narrow_a_preset_further() {
    let upstream = start_upstream().await;
    let keys = r#"{ name = "default", env = "API_KEY", routes = ["inference", "admin"], allow = [{ path_prefix = "/v1/" }] }"#;
    let proxy = start_proxy_with(&scoped_config(upstream.addr, keys, "vllm")).await;
    let inside = status(proxy.addr, Method::POST, "/v1/load_lora_adapter", Some(KEY)).await;
    assert_eq!(inside.status, StatusCode::OK, "an admin route under /v1/");
    let outside = status(proxy.addr, Method::POST, "/start_profile", Some(KEY)).await;
    assert_out_of_scope(&outside);
    let text = wait_for_sample(
        &proxy,
        r#"keygate_key_refusals_total{key="default",reason="out_of_scope"}"#,
        1.0,
    )
    .await;
    assert_eq!(
        sample(
            &text,
            r#"keygate_key_refusals_total{key="default",reason="route_not_in_preset"}"#
        ),
        0.0
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_prefix_admits_whole_segments_and_a_path_one_route() {
    let upstream = start_upstream().await;
    let keys = r#"{ name = "default", env = "API_KEY", allow = [{ methods = ["POST"], path_prefix = "/v1/chat/completions" }, { methods = ["GET"], path = "/v1/models" }] }"#;
    let proxy = start_proxy_with(&scoped_config(upstream.addr, keys, "")).await;
    let allowed = [
        (Method::POST, "/v1/chat/completions"),
        (Method::POST, "/v1/chat/completions/batch"),
        (Method::GET, "/v1/models"),
        (Method::GET, "/v1/models?limit=1"),
    ];
    for (method, path) in &allowed {
        let reply = status(proxy.addr, method.clone(), path, Some(KEY)).await;
        assert_eq!(reply.status, StatusCode::OK, "{method} {path}");
    }
    let refused = [
        (Method::POST, "/v1/chat/completionsX"),
        (Method::POST, "/v1/chat/completions.json"),
        (Method::POST, "/v1/chat/completions/"),
        (Method::POST, "/v1/chat"),
        (Method::GET, "/v1/modelsX"),
        (Method::GET, "/v1/models/"),
        (Method::GET, "/v1/models/some-model"),
        (Method::GET, "//v1/models"),
        (Method::GET, "/v1//models"),
        (Method::GET, "/v1/./models"),
        (Method::GET, "/v1/x/../models"),
        (Method::GET, "/v1/%2e/models"),
        (Method::GET, "/v1%2fmodels"),
    ];
    for (method, path) in &refused {
        let reply = status(proxy.addr, method.clone(), path, Some(KEY)).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{method} {path}");
        assert_out_of_scope(&reply);
    }
    let seen = upstream.wait_for_requests(allowed.len()).await;
    let reached: Vec<String> = seen.iter().map(|s| s.uri.clone()).collect();
    let expected: Vec<String> = allowed.iter().map(|(_, p)| (*p).to_owned()).collect();
    assert_eq!(reached, expected, "no refused request reached the upstream");
    proxy.stop().await;
}

/// A config's debug output names its preset: the name alone, not the route table.
#[test]
fn a_preset_shows_as_its_name_in_debug_output() {
    let upstream = "127.0.0.1:9".parse().unwrap();
    for preset in &PRESETS {
        let config = parse_config(&TestConfig::new(upstream).preset(preset.name).text());
        let debug = format!("{config:?}");
        let shown = format!("preset: Some({})", preset.name);
        assert!(debug.contains(&shown), "{shown} in {debug}");
        assert!(!debug.contains("/v1/chat/completions"), "{debug}");
    }
}
