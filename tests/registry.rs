//! The key registry (`[auth] registry`): keys stored as the SHA-256 digests of their values,
//! with their policies, added, changed and removed while keygate runs (SIGHUP, a change to
//! the file, Kubernetes' symlink swap); a bad registry keeps the keys in force; names and
//! digests are unique across the config and the registry; a key's slots survive a reload;
//! `keygate keygen --name` prints an entry that works; `keygate check` never prints a digest.

mod support;

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use http::{Method, StatusCode};
use sha2::{Digest, Sha256};
use support::process::{run_to_end, Running, TempDir, ENV};
use support::*;

const OLD: &str = "kg-registry-old-key-0123456789abcdef";
const NEW: &str = "kg-registry-new-key-0123456789abcdef";
const APP: &str = "kg-registry-app-key-0123456789abcdef";
/// A key pasted where its digest belongs: it must never be repeated anywhere.
const PASTED: &str = "kg-pasted-key-instead-of-its-digest-01234";

/// The SHA-256 of `key` in lower-case hex, computed here rather than by keygate.
fn sha256(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One registry entry: the key `name` whose value is `key`, with more `fields` as written.
fn entry(name: &str, key: &str, fields: &str) -> String {
    format!(
        "{{ name = \"{name}\", sha256 = \"{}\"{fields} }}",
        sha256(key)
    )
}

/// A registry of `entries`, one a line from line 2 on.
fn registry(entries: &[String]) -> String {
    format!("keys = [\n  {},\n]\n", entries.join(",\n  "))
}

/// Writes `text` to `path` in one step, a new file renamed over the old one, as editors and
/// configuration management do.
fn publish(path: &Path, text: &str) {
    let fresh = path.with_extension("new");
    std::fs::write(&fresh, text).unwrap();
    std::fs::rename(&fresh, path).unwrap();
}

/// The test config with the registry at `path` and logs from `info` on.
fn config(upstream: SocketAddr, path: &Path) -> TestConfig {
    TestConfig::new(upstream).registry(path).log_level("info")
}

const GET_MODELS: (Method, &str) = (Method::GET, "/v1/models");
const POST_CHAT: (Method, &str) = (Method::POST, "/v1/chat/completions");

async fn status(addr: SocketAddr, (method, path): (Method, &str), key: &str) -> StatusCode {
    let auth = bearer(key);
    send(
        addr,
        request(method, path, &[("authorization", &auth)], "{}"),
    )
    .await
    .status
}

/// Waits until `key` gets `expected` for the request (a reload is applied between two
/// accepts).
async fn wait_for_status(addr: SocketAddr, route: (Method, &str), key: &str, expected: StatusCode) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while status(addr, route.clone(), key).await != expected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key} never got {expected} for {route:?}"
        );
        tokio::task::yield_now().await;
    }
}

/// The admin listener of a running binary, from its log line.
fn admin_addr(keygate: &mut Running) -> SocketAddr {
    let line = keygate.wait_for_line("admin endpoints");
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    event["listen"].as_str().unwrap().parse().unwrap()
}

/// Scrapes the binary's metrics until `series` reaches `at_least`.
async fn wait_for_binary_sample(admin: SocketAddr, series: &str, at_least: f64) -> String {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let text = send(admin, get("/metrics", &[])).await.text();
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

const RELOAD_FAILED: &str = r#"keygate_config_reloads_total{outcome="failure"}"#;
const RELOADED: &str = r#"keygate_config_reloads_total{outcome="success"}"#;

#[test]
fn sighup_makes_the_binary_reread_the_registry() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(start_upstream());
    let dir = TempDir::new("registry-sighup");
    let path = dir.write("keys.toml", &registry(&[entry("app", OLD, "")]));
    let config = dir.write("keygate.toml", &config(upstream.addr, &path).text());
    let mut keygate = Running::start(&config, &ENV);
    let addr = keygate.addr;
    assert_eq!(
        runtime.block_on(status(addr, GET_MODELS, OLD)),
        StatusCode::OK
    );
    // The new key's digest is written over the old one's in place (the same inode and
    // length) and the modification time is put back: the file watcher sees no change, only
    // SIGHUP can.
    let before = std::fs::metadata(&path).unwrap();
    let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::io::Write::write_all(&mut file, registry(&[entry("app", NEW, "")]).as_bytes()).unwrap();
    file.set_modified(before.modified().unwrap()).unwrap();
    drop(file);
    let after = std::fs::metadata(&path).unwrap();
    assert_eq!(
        (after.ino(), after.len(), after.modified().unwrap()),
        (before.ino(), before.len(), before.modified().unwrap())
    );
    keygate.signal("HUP");
    runtime.block_on(wait_for_status(addr, GET_MODELS, NEW, StatusCode::OK));
    let line = keygate.wait_for_line("keys reloaded");
    assert!(line.contains(r#""keys":"default, ci, app""#), "{line}");
    assert_eq!(
        runtime.block_on(status(addr, GET_MODELS, OLD)),
        StatusCode::UNAUTHORIZED
    );
    let (status, output) = keygate.terminate();
    assert!(status.success(), "{output}");
    for secret in [OLD, NEW] {
        assert!(!output.contains(secret), "{output}");
    }
}

#[test]
fn a_key_added_to_the_registry_is_admitted_with_its_own_policy_without_a_restart() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(start_upstream());
    let dir = TempDir::new("registry-add");
    let path = dir.write("keys.toml", &registry(&[entry("app", APP, "")]));
    let config = dir.write("keygate.toml", &config(upstream.addr, &path).text());
    let keygate = Running::start(&config, &ENV);
    let addr = keygate.addr;
    assert_eq!(
        runtime.block_on(status(addr, GET_MODELS, NEW)),
        StatusCode::UNAUTHORIZED
    );
    let models_only = ", allow = [{ methods = [\"GET\"], path = \"/v1/models\" }]";
    publish(
        &path,
        &registry(&[entry("app", APP, ""), entry("new", NEW, models_only)]),
    );
    runtime.block_on(wait_for_status(addr, GET_MODELS, NEW, StatusCode::OK));
    let seen = upstream.requests();
    assert_eq!(seen.last().unwrap().headers["x-keygate-key"], "new");
    assert_eq!(
        runtime.block_on(status(addr, POST_CHAT, NEW)),
        StatusCode::FORBIDDEN,
        "the added key has the policy its entry gives it"
    );
    assert_eq!(
        runtime.block_on(status(addr, POST_CHAT, APP)),
        StatusCode::OK
    );
    let (status, output) = keygate.terminate();
    assert!(status.success(), "{output}");
}

#[test]
fn a_kubernetes_symlink_swap_of_the_registry_changes_and_removes_keys() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(start_upstream());
    let dir = TempDir::new("registry-swap");
    // A Secret or ConfigMap volume: keys.toml -> ..data/keys.toml, ..data -> the current
    // version's directory; an update writes a new directory and swaps ..data in one rename.
    let version = |name: &str, text: &str| {
        std::fs::create_dir(dir.0.join(name)).unwrap();
        std::fs::write(dir.0.join(name).join("keys.toml"), text).unwrap();
    };
    let models_only = ", allow = [{ methods = [\"GET\"], path = \"/v1/models\" }]";
    let expiring = ", not_after = \"2099-01-01T00:00:00Z\"";
    version(
        "..2025_01_01",
        &registry(&[entry("app", APP, models_only), entry("old", OLD, expiring)]),
    );
    std::os::unix::fs::symlink("..2025_01_01", dir.0.join("..data")).unwrap();
    let path = dir.0.join("keys.toml");
    std::os::unix::fs::symlink("..data/keys.toml", &path).unwrap();
    let config = config(upstream.addr, &path).admin().text();
    let config = dir.write("keygate.toml", &config);
    let mut keygate = Running::start(&config, &ENV);
    let (addr, admin) = (keygate.addr, admin_addr(&mut keygate));
    assert_eq!(
        runtime.block_on(status(addr, GET_MODELS, OLD)),
        StatusCode::OK
    );
    assert_eq!(
        runtime.block_on(status(addr, POST_CHAT, APP)),
        StatusCode::FORBIDDEN
    );
    let expiry = r#"keygate_key_not_after_timestamp_seconds{key="old"}"#;
    runtime.block_on(wait_for_binary_sample(admin, expiry, 1.0));

    version("..2025_01_02", &registry(&[entry("app", APP, "")]));
    std::os::unix::fs::symlink("..2025_01_02", dir.0.join("..data_tmp")).unwrap();
    std::fs::rename(dir.0.join("..data_tmp"), dir.0.join("..data")).unwrap();
    runtime.block_on(wait_for_status(
        addr,
        GET_MODELS,
        OLD,
        StatusCode::UNAUTHORIZED,
    ));
    assert_eq!(
        runtime.block_on(status(addr, POST_CHAT, APP)),
        StatusCode::OK,
        "the changed policy is in force"
    );
    let metrics = runtime.block_on(send(admin, get("/metrics", &[]))).text();
    assert!(
        !metrics.contains(expiry),
        "a removed key's expiry is no longer published:\n{metrics}"
    );
    let (status, output) = keygate.terminate();
    assert!(status.success(), "{output}");
}

#[test]
fn a_bad_registry_keeps_the_keys_in_force_and_counts_a_failed_reload() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(start_upstream());
    let dir = TempDir::new("registry-bad");
    let path = dir.write("keys.toml", &registry(&[entry("app", APP, "")]));
    let config = dir.write("keygate.toml", &config(upstream.addr, &path).admin().text());
    let mut keygate = Running::start(&config, &ENV);
    let (addr, admin) = (keygate.addr, admin_addr(&mut keygate));
    // A good new key beside a digest one character short, on line 3.
    let short = &sha256(OLD)[..63];
    let bad = format!(
        "keys = [\n  {},\n  {{ name = \"bad\", sha256 = \"{short}\" }},\n  {},\n]\n",
        entry("app", APP, ""),
        entry("new", NEW, "")
    );
    publish(&path, &bad);
    let line = keygate.wait_for_line("key reload failed");
    let expected = format!(
        "{}:3:3: keys (name = \\\"bad\\\"): sha256 has 63 characters instead of 64",
        path.display()
    );
    assert!(line.contains(&expected), "{line}");
    assert!(line.contains("`keygate keygen --name bad`"), "{line}");
    runtime.block_on(wait_for_binary_sample(admin, RELOAD_FAILED, 1.0));
    assert_eq!(
        runtime.block_on(status(addr, GET_MODELS, APP)),
        StatusCode::OK
    );
    assert_eq!(
        runtime.block_on(status(addr, GET_MODELS, NEW)),
        StatusCode::UNAUTHORIZED,
        "nothing of a bad registry is taken"
    );
    let metrics = runtime.block_on(send(admin, get("/metrics", &[]))).text();
    assert_eq!(sample(&metrics, RELOADED), 0.0, "{metrics}");
    let (status, output) = keygate.terminate();
    assert!(status.success(), "{output}");
}

#[test]
fn never_a_secret_value_in_a_log_line_when_a_key_is_pasted_into_the_registry() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(start_upstream());
    let dir = TempDir::new("registry-pasted");
    let path = dir.write("keys.toml", &registry(&[entry("app", APP, "")]));
    let config_path = dir.write("keygate.toml", &config(upstream.addr, &path).text());
    let mut keygate = Running::start(&config_path, &ENV);
    let pasted = format!("keys = [\n  {{ name = \"app\", sha256 = \"{PASTED}\" }},\n]\n");
    publish(&path, &pasted);
    let line = keygate.wait_for_line("key reload failed");
    assert!(line.contains("has 41 characters instead of 64"), "{line}");
    let (status, output) = keygate.terminate();
    assert!(status.success(), "{output}");
    assert!(!output.contains(PASTED), "{output}");
    let (status, stdout, stderr) =
        run_to_end(&["check", "--config", config_path.to_str().unwrap()], &ENV);
    assert_eq!(status.code(), Some(2), "{stdout}{stderr}");
    assert!(stderr.contains("sha256 has 41 characters"), "{stderr}");
    assert!(
        !stderr.contains(PASTED) && !stdout.contains(PASTED),
        "{stderr}"
    );
}

#[test]
fn duplicate_names_and_digests_are_refused_at_start_up() {
    let dir = TempDir::new("registry-duplicates");
    let path = dir.0.join("keys.toml");
    let config = config("127.0.0.1:9".parse().unwrap(), &path).text();
    let config = dir.write("keygate.toml", &config);
    let at = |line: usize, name: &str| {
        format!("{}:{line}:3: keys (name = \"{name}\"): ", path.display())
    };
    for (entries, expected) in [
        (
            [entry("app", APP, ""), entry("app", NEW, "")],
            format!("{}this name is used twice", at(3, "app")),
        ),
        (
            [entry("app", APP, ""), entry("default", NEW, "")],
            format!("{}the name is taken by a key in the config file's [auth] keys", at(3, "default")),
        ),
        (
            [entry("app", APP, ""), entry("twin", APP, "")],
            format!(
                "{}keys \"app\" (registry {p}:2) and \"twin\" (registry {p}:3) have the same value",
                at(3, "twin"),
                p = path.display()
            ),
        ),
        (
            [entry("app", APP, ""), entry("copy", KEY, "")],
            format!(
                "{}keys \"default\" (environment variable API_KEY) and \"copy\" (registry {}:3) have the same value",
                at(3, "copy"),
                path.display()
            ),
        ),
    ] {
        std::fs::write(&path, registry(&entries)).unwrap();
        let (status, _, stderr) = run_to_end(&["check", "--config", config.to_str().unwrap()], &ENV);
        assert_eq!(status.code(), Some(2), "{stderr}");
        assert!(stderr.starts_with(&expected), "{expected}\n{stderr}");
        let (status, _, stderr) = run_to_end(
            &["--config", config.to_str().unwrap(), "--listen", "127.0.0.1:0"],
            &ENV,
        );
        assert_eq!(status.code(), Some(2), "keygate does not start: {stderr}");
        assert!(stderr.starts_with(&expected), "{stderr}");
    }
}

#[test]
fn duplicate_names_and_digests_are_refused_on_reload() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let upstream = runtime.block_on(start_upstream());
    let dir = TempDir::new("registry-duplicates-reload");
    let path = dir.write("keys.toml", &registry(&[entry("app", APP, "")]));
    let config = dir.write("keygate.toml", &config(upstream.addr, &path).text());
    let mut keygate = Running::start(&config, &ENV);
    let addr = keygate.addr;
    publish(
        &path,
        &registry(&[entry("app", APP, ""), entry("app", NEW, "")]),
    );
    keygate.signal("HUP");
    let line = keygate.wait_for_line("this name is used twice");
    assert!(
        line.contains("key reload failed; the previous keys stay in force"),
        "{line}"
    );
    publish(
        &path,
        &registry(&[
            entry("app", APP, ""),
            entry("new", NEW, ""),
            entry("copy", CI_KEY, ""),
        ]),
    );
    keygate.signal("HUP");
    let line = keygate.wait_for_line("have the same value");
    assert!(
        line.contains(r#"keys \"ci\" (environment variable CI_KEY) and \"copy\""#),
        "{line}"
    );
    assert_eq!(
        runtime.block_on(status(addr, GET_MODELS, APP)),
        StatusCode::OK
    );
    assert_eq!(
        runtime.block_on(status(addr, GET_MODELS, NEW)),
        StatusCode::UNAUTHORIZED
    );
    assert!(!keygate.output().contains("keys reloaded"));
    let (status, output) = keygate.terminate();
    assert!(status.success(), "{output}");
    assert!(!output.contains(CI_KEY), "{output}");
}

#[tokio::test]
async fn a_key_keeps_its_slots_in_use_across_a_reload_that_changes_its_policy() {
    let (upstream, mut senders) = start_streaming_upstream().await;
    let dir = TempDir::new("registry-slots");
    let limited = |fields: &str| registry(&[entry("app", APP, fields)]);
    let path = dir.write("keys.toml", &limited(", max_concurrent = 1"));
    let proxy = start_proxy_with(&config(upstream.addr, &path).admin().text()).await;
    let first = open(proxy.addr, stream_chat(APP)).await;
    assert_eq!(first.status(), StatusCode::OK);
    let _first_sender = senders.recv().await.unwrap();
    assert_eq!(
        send(proxy.addr, stream_chat(APP)).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );

    // Another field changes; the stream still holds the key's one slot.
    publish(&path, &limited(", max_concurrent = 1, weight = 3"));
    proxy.reload();
    wait_for_sample(&proxy, RELOADED, 1.0).await;
    let refused = send(proxy.addr, stream_chat(APP)).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        refused.json()["error"]["code"],
        "concurrency_limit_exceeded"
    );

    // A raised limit counts the stream in flight: one more, not two.
    publish(&path, &limited(", max_concurrent = 2"));
    proxy.reload();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let second = loop {
        let response = open(proxy.addr, stream_chat(APP)).await;
        if response.status() == StatusCode::OK {
            break response;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the raised limit never applied"
        );
        tokio::task::yield_now().await;
    };
    let _second_sender = senders.recv().await.unwrap();
    assert_eq!(
        send(proxy.addr, stream_chat(APP)).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let text = scrape(&proxy).await;
    assert_eq!(
        sample(&text, r#"keygate_key_requests_in_flight{key="app"}"#),
        2.0,
        "{text}"
    );
    drop((first, second));
    proxy.stop().await;
}

#[tokio::test]
async fn keygen_with_a_name_prints_a_key_and_an_entry_that_admits_it() {
    let (exit, stdout, stderr) = run_to_end(&["keygen", "--name", "app"], &[]);
    assert!(exit.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    let [key, line] = lines[..] else {
        panic!("two lines, the key and its entry:\n{stdout}");
    };
    assert_eq!(key.len(), 43, "{key}");
    assert_eq!(
        line,
        format!("{{ name = \"app\", sha256 = \"{}\" }},", sha256(key))
    );
    assert!(stderr.contains("the first line is the key"), "{stderr}");

    let upstream = start_upstream().await;
    let dir = TempDir::new("registry-keygen");
    let path = dir.write("keys.toml", &format!("keys = [\n  {line}\n]\n"));
    let proxy = start_proxy_with(&config(upstream.addr, &path).text()).await;
    assert_eq!(status(proxy.addr, GET_MODELS, key).await, StatusCode::OK);
    assert_eq!(upstream.requests()[0].headers["x-keygate-key"], "app");
    proxy.stop().await;

    let (exit, plain, _) = run_to_end(&["keygen"], &[]);
    assert!(exit.success());
    assert_eq!(
        plain.lines().count(),
        1,
        "plain keygen prints the key alone"
    );
    assert_eq!(plain.trim_end().len(), 43, "{plain}");
    let (exit, stdout, stderr) = run_to_end(&["keygen", "--name", "two words"], &[]);
    assert_eq!(exit.code(), Some(2), "{stdout}");
    assert!(stdout.is_empty(), "no key for an entry that cannot be used");
    assert!(
        stderr.contains("1-64 characters of A-Z a-z 0-9 . _ -"),
        "{stderr}"
    );
}

#[test]
fn check_prints_registry_names_and_policies_never_a_digest() {
    let dir = TempDir::new("registry-check");
    let path = dir.write(
        "keys.toml",
        &registry(&[
            entry("app", APP, ", max_concurrent = 2"),
            entry("batch", NEW, ""),
        ]),
    );
    let config = config("127.0.0.1:9".parse().unwrap(), &path).text();
    let config = dir.write("keygate.toml", &config);
    let (status, stdout, stderr) =
        run_to_end(&["check", "--config", config.to_str().unwrap()], &ENV);
    assert!(status.success(), "{stderr}");
    let registry_line = format!(
        "key registry:    {}: app, batch; re-read on SIGHUP and when it changes",
        path.display()
    );
    assert!(stdout.contains(&registry_line), "{stdout}");
    assert!(
        stdout.contains("key app:         max_concurrent 2\n"),
        "{stdout}"
    );
    for key in [APP, NEW] {
        assert!(!stdout.contains(&sha256(key)[..8]), "{stdout}");
    }
}

#[test]
fn the_example_registry_passes_check() {
    let example = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/examples/registry/keys.toml"
    ));
    let dir = TempDir::new("registry-example");
    let config = config("127.0.0.1:9".parse().unwrap(), example).text();
    let config = dir.write("keygate.toml", &config);
    let (status, stdout, stderr) =
        run_to_end(&["check", "--config", config.to_str().unwrap()], &ENV);
    assert!(status.success(), "{stderr}");
    assert!(
        stdout.contains(": app, batch, contractor; re-read on SIGHUP"),
        "{stdout}"
    );
}
