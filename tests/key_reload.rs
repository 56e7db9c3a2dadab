//! Key reloads that would leave keygate without a single key: refused like a bad key file,
//! so the keys in force keep admitting their clients instead of every request being
//! refused until the next good reload.

mod support;

use http::StatusCode;
use support::process::TempDir;
use support::*;

const FILE_KEY: &str = "kg-reload-file-key-0123456789";

#[tokio::test]
async fn a_reload_that_would_leave_no_key_keeps_the_keys_in_force() {
    let upstream = start_upstream().await;
    let dir = TempDir::new("reload-no-key");
    let path = dir.write("only", FILE_KEY);
    let text = TestConfig::new(upstream.addr)
        .keys([Key::file("only", &path).optional()])
        .admin()
        .text();
    let proxy = start_proxy_with(&text).await;
    let models = || get("/v1/models", &[("authorization", &bearer(FILE_KEY))]);
    assert_eq!(send(proxy.addr, models()).await.status, StatusCode::OK);

    // The only key is optional, so its file going away is no error of its own.
    std::fs::remove_file(&path).unwrap();
    proxy.reload();
    let succeeded = r#"keygate_config_reloads_total{outcome="success"}"#;
    let failed = r#"keygate_config_reloads_total{outcome="failure"}"#;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let text = loop {
        let text = scrape(&proxy).await;
        if sample(&text, succeeded) + sample(&text, failed) >= 1.0 {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reload is never counted:\n{text}"
        );
        tokio::task::yield_now().await;
    };
    assert_eq!(sample(&text, succeeded), 0.0, "{text}");
    assert_eq!(send(proxy.addr, models()).await.status, StatusCode::OK);
    proxy.stop().await;
}
