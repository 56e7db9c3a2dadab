//! Key rotation: key files are re-read on SIGHUP; a bad file keeps the keys in
//! force; no request is dropped while keys change.

mod support;

use std::os::unix::fs::MetadataExt;

use http::{Method, StatusCode};
use support::process::{Running, TempDir, ENV};
use support::*;

const OLD: &str = "kg-rotation-old-key-0123456789";
const NEW: &str = "kg-rotation-new-key-0123456789";

/// The base config whose keys are `default` from the environment, `current` from the file
/// `current` in `dir` and the optional `next` from the file `next`.
fn rotation(upstream: std::net::SocketAddr, dir: &TempDir) -> TestConfig {
    TestConfig::new(upstream).keys([
        Key::env("default", "API_KEY"),
        Key::file("current", &dir.0.join("current")),
        Key::file("next", &dir.0.join("next")).optional(),
    ])
}

fn rotation_config(upstream: std::net::SocketAddr, dir: &TempDir) -> String {
    rotation(upstream, dir).text()
}

async fn status_with(addr: std::net::SocketAddr, key: &str) -> StatusCode {
    send(addr, get("/v1/models", &[("authorization", &bearer(key))]))
        .await
        .status
}

/// Waits until `key` gets `expected` (a reload is applied between two accepts).
async fn wait_for_status(addr: std::net::SocketAddr, key: &str, expected: StatusCode) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while status_with(addr, key).await != expected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key} never got {expected}"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn two_key_rotation_through_reloads_drops_no_request() {
    let upstream = start_upstream().await;
    let dir = TempDir::new("rotation");
    dir.write("current", &format!("{OLD}\n"));
    let proxy = start_proxy_with(&rotation_config(upstream.addr, &dir)).await;
    assert_eq!(status_with(proxy.addr, OLD).await, StatusCode::OK);
    assert_eq!(status_with(proxy.addr, NEW).await, StatusCode::UNAUTHORIZED);

    // Traffic with the old key runs through the whole rotation until the old key is retired.
    let addr = proxy.addr;
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let traffic = tokio::spawn(async move {
        let mut answered = 0;
        loop {
            assert_eq!(
                status_with(addr, OLD).await,
                StatusCode::OK,
                "a request with the live old key was refused"
            );
            answered += 1;
            if stopped.try_recv().is_ok() {
                return answered;
            }
        }
    });
    // 1. Publish the new key beside the old one: both are admitted.
    dir.write("next", NEW);
    proxy.reload();
    wait_for_status(proxy.addr, NEW, StatusCode::OK).await;
    stop.send(()).unwrap();
    assert!(traffic.await.unwrap() > 0);
    // 2. Clients moved to the new key; retire the old one.
    dir.write("current", NEW);
    std::fs::remove_file(dir.0.join("next")).unwrap();
    proxy.reload();
    wait_for_status(proxy.addr, OLD, StatusCode::UNAUTHORIZED).await;
    assert_eq!(status_with(proxy.addr, NEW).await, StatusCode::OK);
    assert_eq!(
        status_with(proxy.addr, KEY).await,
        StatusCode::OK,
        "environment keys stay"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_bad_key_file_keeps_the_keys_in_force() {
    let upstream = start_upstream().await;
    let dir = TempDir::new("rotation-bad");
    dir.write("current", OLD);
    let text = rotation(upstream.addr, &dir).admin().text();
    let proxy = start_proxy_with(&text).await;
    dir.write("current", "short");
    proxy.reload();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let metrics = send(proxy.admin.unwrap(), get("/metrics", &[]))
            .await
            .text();
        let failures = metrics
            .lines()
            .find_map(|l| l.strip_prefix(r#"keygate_config_reloads_total{outcome="failure"} "#))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        if failures >= 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the failed reload is counted:\n{metrics}"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(status_with(proxy.addr, OLD).await, StatusCode::OK);
    assert_eq!(
        status_with(proxy.addr, "short").await,
        StatusCode::UNAUTHORIZED
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_changed_key_file_is_picked_up_without_a_signal() {
    let upstream = start_upstream().await;
    let dir = TempDir::new("rotation-watch");
    dir.write("current", OLD);
    let proxy = start_proxy_with(&rotation_config(upstream.addr, &dir)).await;
    // Kubernetes publishes a Secret update by swapping a symlink to a new file.
    let fresh = dir.write("current.new", NEW);
    std::fs::rename(&fresh, dir.0.join("current")).unwrap();
    wait_for_status(proxy.addr, NEW, StatusCode::OK).await;
    assert_eq!(status_with(proxy.addr, OLD).await, StatusCode::UNAUTHORIZED);
    proxy.stop().await;
}

#[test]
fn sighup_makes_the_binary_reread_its_key_files() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(start_upstream());
    let dir = TempDir::new("rotation-sighup");
    let current = dir.write("current", OLD);
    let config = rotation(upstream.addr, &dir).log_level("info").text();
    let path = dir.write("keygate.toml", &config);
    let mut keygate = Running::start(&path, &ENV);
    let addr = keygate.addr;
    assert_eq!(runtime.block_on(status_with(addr, OLD)), StatusCode::OK);
    // The new key is written over the old one in place (the same inode and length) and the
    // modification time is put back: the file watcher sees no change, only SIGHUP can.
    let before = std::fs::metadata(&current).unwrap();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&current)
        .unwrap();
    std::io::Write::write_all(&mut file, NEW.as_bytes()).unwrap();
    file.set_modified(before.modified().unwrap()).unwrap();
    drop(file);
    let after = std::fs::metadata(&current).unwrap();
    assert_eq!(
        (after.ino(), after.len(), after.modified().unwrap()),
        (before.ino(), before.len(), before.modified().unwrap())
    );
    keygate.signal("HUP");
    runtime.block_on(wait_for_status(addr, NEW, StatusCode::OK));
    keygate.wait_for_line("keys reloaded");
    assert_eq!(
        runtime.block_on(status_with(addr, OLD)),
        StatusCode::UNAUTHORIZED
    );
    let (status, output) = keygate.terminate();
    assert!(status.success(), "{output}");
    assert!(!output.contains(OLD) && !output.contains(NEW), "{output}");
}

#[test]
fn a_reload_that_would_give_two_keys_one_value_keeps_the_old_keys() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(start_upstream());
    let dir = TempDir::new("rotation-same-value");
    let admin = dir.write("admin", OLD);
    let config = TestConfig::new(upstream.addr)
        .keys_toml(&format!(
            "{{ name = \"default\", env = \"API_KEY\", allow = [{{ methods = [\"GET\"], path = \"/v1/models\" }}] }}, {{ name = \"admin\", file = \"{}\" }}",
            admin.display()
        ))
        .log_level("info")
        .text();
    let path = dir.write("keygate.toml", &config);
    let mut keygate = Running::start(&path, &ENV);
    let addr = keygate.addr;
    let chat = |key: &str| {
        let request = request(
            Method::POST,
            "/v1/chat/completions",
            &[("authorization", &bearer(key))],
            "",
        );
        runtime.block_on(send(addr, request)).status
    };
    assert_eq!(chat(KEY), StatusCode::FORBIDDEN);
    assert_eq!(chat(OLD), StatusCode::OK);
    // The restricted key's value pasted into the admin key's file, published in one step.
    let pasted = dir.write("admin.new", KEY);
    std::fs::rename(&pasted, &admin).unwrap();
    keygate.signal("HUP");
    let line = keygate.wait_for_line("have the same value");
    assert!(
        line.contains("key reload failed; the previous keys stay in force"),
        "{line}"
    );
    assert!(
        line.contains(&format!(
            "keys \\\"default\\\" (environment variable API_KEY) and \\\"admin\\\" (file {})",
            admin.display()
        )),
        "{line}"
    );
    assert_eq!(
        chat(OLD),
        StatusCode::OK,
        "the admin key still has its value"
    );
    assert_eq!(
        chat(KEY),
        StatusCode::FORBIDDEN,
        "the restricted key gained nothing"
    );
    let (status, output) = keygate.terminate();
    assert!(status.success(), "{output}");
    assert!(!output.contains(KEY) && !output.contains(OLD), "{output}");
}
