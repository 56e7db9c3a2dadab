//! The command line and config loading, through the real binary: a bad config
//! stops start-up with exit 2 and a message naming file, line, key and fix, before any socket
//! is bound; `check` and `keygen`; SIGTERM exits 0.

mod support;

use support::process::{run_to_end, Running, TempDir};
use support::*;

const GOOD: &str = r#"
[server]
listen = "127.0.0.1:0"
[auth]
keys = [{ name = "default", env = "API_KEY" }, { name = "next", env = "API_KEY_NEXT", optional = true }]
[[inject]]
name = "x-shared-secret"
value = "${SHARED_SECRET}"
"#;

fn env() -> [(&'static str, &'static str); 2] {
    [("API_KEY", KEY), ("SHARED_SECRET", SHARED_SECRET)]
}

#[test]
fn check_prints_names_never_values_and_exits_0() {
    let dir = TempDir::new("check");
    let path = dir.write("keygate.toml", GOOD);
    let (status, stdout, stderr) =
        run_to_end(&["check", "--config", path.to_str().unwrap()], &env());
    assert!(status.success(), "{stderr}");
    assert!(
        stdout.contains("keys:            default, next (optional, not set)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("injected:        x-shared-secret"),
        "{stdout}"
    );
    assert!(
        !stdout.contains(KEY) && !stdout.contains(SHARED_SECRET),
        "{stdout}"
    );
}

#[test]
fn check_output_is_exactly_the_summary() {
    let dir = TempDir::new("golden");
    let key_file = dir.write("ci-key", &format!("{CI_KEY}\n"));
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
[auth]
keys = [{{ name = "default", env = "API_KEY" }}, {{ name = "next", env = "API_KEY_NEXT", optional = true }}, {{ name = "ci", file = "{}" }}]
[[inject]]
name = "x-shared-secret"
value = "${{SHARED_SECRET}}"
[public]
paths = ["/docs"]
[cors]
allow_origins = ["https://app.example"]
[admin]
listen = "127.0.0.1:9090"
"#,
        key_file.display()
    );
    let path = dir.write("keygate.toml", &text);
    let (status, stdout, stderr) =
        run_to_end(&["check", "--config", path.to_str().unwrap()], &env());
    assert!(status.success(), "{stderr}");
    let expected = format!(
        "{}: OK\n\
         listen:          127.0.0.1:0\n\
         tls:             off (plain HTTP/1.1 and h2c)\n\
         redirect:        none\n\
         upstream:        http://127.0.0.1:8000\n\
         keys:            default, ci, next (optional, not set)\n\
         preset:          none (every route is forwarded)\n\
         sse keep-alive:  off (error events only)\n\
         upstream queue:  off (no max_in_flight: every request is forwarded at once)\n\
         limits:          in-process (each replica counts alone)\n\
         identity header: none\n\
         probe path:      /health\n\
         public paths:    /docs\n\
         injected:        x-shared-secret\n\
         trusted proxies: none\n\
         cors origins:    https://app.example\n\
         admin listener:  127.0.0.1:9090\n\
         key files:       re-read on SIGHUP\n\
         key registry:    none\n",
        path.display()
    );
    assert_eq!(stdout, expected);
}

#[test]
fn check_shows_each_keys_rates_and_the_shared_backend_never_its_password() {
    let dir = TempDir::new("check-limits");
    let text = r#"
[auth]
keys = [{ name = "default", env = "API_KEY", requests_per_minute = 600, tokens_per_minute = 200000, max_concurrent = 4 }]
[limits]
redis = "rediss://keygate:${REDIS_PASSWORD}@redis.internal:6380/1"
on_redis_error = "deny"
"#;
    let path = dir.write("keygate.toml", text);
    let password = "redis-password-0123456789";
    let (status, stdout, stderr) = run_to_end(
        &["check", "--config", path.to_str().unwrap()],
        &[("API_KEY", KEY), ("REDIS_PASSWORD", password)],
    );
    assert!(status.success(), "{stderr}");
    assert!(
        stdout.contains("key default:     max_concurrent 4; requests_per_minute 600; tokens_per_minute 200000\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("limits:          redis redis.internal:6380 (tls) db 1, prefix \"keygate:\", redis_timeout 50ms, slot_lease 30s, on_redis_error deny; shared by every replica\n"),
        "{stdout}"
    );
    assert!(
        !stdout.contains(password) && !stderr.contains(password),
        "{stdout}"
    );
    // A password missing from the environment is named with its line, never guessed at.
    let (status, _, stderr) = run_to_end(
        &["check", "--config", path.to_str().unwrap()],
        &[("API_KEY", KEY)],
    );
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("keygate.toml:5:9: [limits] redis: uses ${REDIS_PASSWORD}, but the environment variable REDIS_PASSWORD is not set"),
        "{stderr}"
    );
}

#[test]
fn a_bad_rate_names_the_key_and_the_fix() {
    let dir = TempDir::new("check-rate");
    for (rate, expected) in [
        ("requests_per_minute = 0", "requests_per_minute must be a whole number from 1 to 4294967295, e.g. requests_per_minute = 600; leave it out for no limit"),
        ("tokens_per_minute = -5", "tokens_per_minute must be a whole number from 1 to 4294967295, e.g. tokens_per_minute = 200000"),
        ("tokens_per_minute = 5000000000", "tokens_per_minute must be a whole number from 1 to 4294967295"),
    ] {
        let text = format!("[auth]\nkeys = [{{ name = \"default\", env = \"API_KEY\", {rate} }}]\n");
        let path = dir.write("keygate.toml", &text);
        let (status, _, stderr) = run_to_end(&["check", "--config", path.to_str().unwrap()], &env());
        assert_eq!(status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("keygate.toml:2:9: [auth] keys (name = \"default\"): ") && stderr.contains(expected),
            "{rate}: {stderr}"
        );
    }
}

#[test]
fn unknown_key_exits_2_naming_file_line_and_key() {
    let dir = TempDir::new("unknown");
    let bad = r#"
[server]
listen_addr = "x"
listen = "127.0.0.1:0"
[auth]
keys = [{ name = "default", env = "API_KEY" }]
"#;
    let path = dir.write("keygate.toml", bad);
    let (status, _, stderr) = run_to_end(&["--config", path.to_str().unwrap()], &env());
    assert_eq!(status.code(), Some(2));
    let expected = format!(
        "{}:3:1: unknown key `listen_addr` in [server]; expected one of `listen`,",
        path.display()
    );
    assert!(stderr.starts_with(&expected), "{stderr}");
}

#[test]
fn missing_secret_exits_2_naming_the_variable_and_the_config_line() {
    let dir = TempDir::new("missing");
    let path = dir.write("keygate.toml", GOOD);
    let (status, _, stderr) =
        run_to_end(&["--config", path.to_str().unwrap()], &[("API_KEY", KEY)]);
    assert_eq!(status.code(), Some(2));
    assert!(
        stderr.contains(&format!(
            "{}:8:9: [[inject]] (name = \"x-shared-secret\") value: uses ${{SHARED_SECRET}}",
            path.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("SHARED_SECRET"), "{stderr}");
    let (status, _, stderr) = run_to_end(
        &["--config", path.to_str().unwrap()],
        &[("SHARED_SECRET", SHARED_SECRET)],
    );
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("API_KEY is not set"), "{stderr}");
}

#[test]
fn bad_config_binds_no_socket() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = TempDir::new("nobind");
    let path = dir.write("keygate.toml", GOOD);
    let listen = format!("127.0.0.1:{port}");
    let (status, _, _) = run_to_end(
        &["--config", path.to_str().unwrap(), "--listen", &listen],
        &[("API_KEY", "too-short")],
    );
    assert_eq!(status.code(), Some(2));
    std::net::TcpListener::bind(&listen).expect("the port is still free");
}

#[test]
fn missing_config_file_exits_2_and_says_so() {
    let (status, _, stderr) = run_to_end(&["--config", "/nonexistent/keygate.toml"], &env());
    assert_eq!(status.code(), Some(2));
    assert!(
        stderr.contains("/nonexistent/keygate.toml") && stderr.contains("cannot read"),
        "{stderr}"
    );
}

#[test]
fn shipped_default_config_passes_check() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/keygate.toml");
    let (status, stdout, stderr) = run_to_end(&["check", "--config", path], &env());
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("listen:          0.0.0.0:8080"), "{stdout}");
}

#[test]
fn example_configs_pass_check() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config/examples");
    let env = [
        ("API_KEY", KEY),
        ("OPS_KEY", CI_KEY),
        ("SHARED_SECRET", SHARED_SECRET),
        ("UPSTREAM_API_KEY", UPSTREAM_TOKEN),
        ("REDIS_PASSWORD", "redis-password-0123456789"),
    ];
    // An example naming certificate files is checked with made-up files in their place.
    let certs = TempDir::new("example-certs");
    let files = support::tls::Ca::new().issue(90).install(&certs);
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let mut path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let mut example: toml::Table = text.parse().unwrap();
            let server = example
                .get_mut("server")
                .and_then(toml::Value::as_table_mut);
            if let Some(server) = server.filter(|s| s.contains_key("tls_cert")) {
                let made_up = |file: &std::path::Path| file.to_str().unwrap().into();
                server.insert("tls_cert".to_owned(), made_up(&files.cert));
                server.insert("tls_key".to_owned(), made_up(&files.key));
                let text = toml::to_string(&example).unwrap();
                path = certs.write(path.file_name().unwrap().to_str().unwrap(), &text);
            }
            let (status, _, stderr) =
                run_to_end(&["check", "--config", path.to_str().unwrap()], &env);
            assert!(status.success(), "{}: {stderr}", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 4, "examples found: {checked}");
}

#[test]
fn keygen_prints_a_new_256_bit_url_safe_key() {
    let (status, first, _) = run_to_end(&["keygen"], &[]);
    let (_, second, _) = run_to_end(&["keygen"], &[]);
    assert!(status.success());
    let key = first.trim_end();
    assert_eq!(key.len(), 43);
    assert!(key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    assert_ne!(first, second);
}

#[test]
fn sigterm_exits_0_and_sighup_does_not_kill() {
    let dir = TempDir::new("sigterm");
    let path = dir.write("keygate.toml", GOOD);
    let mut keygate = Running::start(&path, &env());
    keygate.signal("HUP");
    keygate.wait_for_line("SIGHUP received");
    let (status, output) = keygate.terminate();
    assert!(status.success(), "{output}");
    assert!(output.contains("all connections drained"), "{output}");
}

/// Every key the parser accepts, set at once: the list is checked against the parser (an
/// unknown key fails `check`) and against the documented default config.
const EVERY_KEY: &[(&str, &str)] = &[
    ("server", "listen = \"127.0.0.1:0\""),
    ("server", "header_read_timeout = \"10s\""),
    ("server", "trusted_proxies = []"),
    ("server", "max_request_body = \"64MiB\""),
    ("server", "max_connections = 10000"),
    ("server", "shutdown_grace = \"30s\""),
    ("server", "workers = 1"),
    ("upstream", "url = \"http://127.0.0.1:8000\""),
    ("upstream", "connect_timeout = \"5s\""),
    ("upstream", "response_timeout = \"600s\""),
    ("upstream", "idle_timeout = \"300s\""),
    ("upstream", "preset = \"none\""),
    ("upstream", "sse_keepalive = \"15s\""),
    (
        "auth",
        "keys = [{ name = \"default\", env = \"API_KEY\", optional = false, allow = [{ methods = [\"POST\"], path_prefix = \"/v1/\" }, { methods = [\"GET\"], path = \"/v1/models\" }], max_concurrent = 8, requests_per_minute = 600, tokens_per_minute = 200000, not_after = \"2099-01-01T00:00:00Z\" }]",
    ),
    ("auth", "identity_header = \"x-keygate-key\""),
    ("auth", "forward_authorization = false"),
    ("probe", "path = \"/health\""),
    ("public", "paths = []"),
    ("cors", "allow_origins = []"),
    ("admin", "listen = \"127.0.0.1:9090\""),
    ("limits", "redis = \"redis://127.0.0.1:6379/0\""),
    ("limits", "prefix = \"keygate:\""),
    ("limits", "redis_timeout = \"50ms\""),
    ("limits", "on_redis_error = \"local\""),
    ("limits", "slot_lease = \"30s\""),
    ("log", "format = \"json\""),
    ("log", "level = \"info\""),
];

#[test]
fn default_config_documents_every_key() {
    let mut text = String::new();
    let mut table = "";
    for (t, line) in EVERY_KEY {
        if *t != table {
            text.push_str(&format!("[{t}]\n"));
            table = t;
        }
        text.push_str(line);
        text.push('\n');
    }
    text.push_str("[[inject]]\nname = \"x-shared-secret\"\nvalue = \"${SHARED_SECRET}\"\n");
    let dir = TempDir::new("every-key");
    let path = dir.write("keygate.toml", &text);
    let (status, _, stderr) = run_to_end(&["check", "--config", path.to_str().unwrap()], &env());
    assert!(status.success(), "{stderr}");
    let documented =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/keygate.toml"))
            .unwrap();
    for (t, line) in EVERY_KEY {
        let key = line.split(' ').next().unwrap();
        assert!(
            documented.contains(&format!("[{t}]")),
            "[{t}] is not in config/keygate.toml"
        );
        assert!(
            documented.contains(&format!("{key} =")),
            "[{t}] {key} is not documented in config/keygate.toml"
        );
    }
    for key in [
        "name",
        "env",
        "file",
        "optional",
        "allow",
        "methods",
        "path_prefix",
        "routes",
        "max_concurrent",
        "requests_per_minute",
        "tokens_per_minute",
        "redis_ca_file",
        "not_after",
        "value",
        "[[inject]]",
    ] {
        assert!(
            documented.contains(key),
            "{key} is not documented in config/keygate.toml"
        );
    }
}

#[test]
fn a_dollar_without_braces_is_refused_and_a_doubled_one_is_literal() {
    let dir = TempDir::new("dollar");
    let path = dir.write(
        "keygate.toml",
        &edited(GOOD, "${SHARED_SECRET}", "$SHARED_SECRET"),
    );
    let (status, stdout, stderr) =
        run_to_end(&["check", "--config", path.to_str().unwrap()], &env());
    assert_eq!(status.code(), Some(2), "{stdout}");
    let expected = format!(
        "{}:8:9: [[inject]] (name = \"x-shared-secret\") value: has $SHARED_SECRET without braces, which would be sent as written; write ${{SHARED_SECRET}} to insert the environment variable SHARED_SECRET, or $$SHARED_SECRET for a literal $",
        path.display()
    );
    assert!(stderr.starts_with(&expected), "{stderr}");
    assert!(!stderr.contains(SHARED_SECRET), "{stderr}");
    let path = dir.write(
        "escaped.toml",
        &edited(GOOD, "${SHARED_SECRET}", "$$5-${SHARED_SECRET}"),
    );
    let (status, _, stderr) = run_to_end(&["check", "--config", path.to_str().unwrap()], &env());
    assert!(status.success(), "{stderr}");
}

#[test]
fn two_keys_with_one_value_stop_check_and_start_up_naming_both() {
    let dir = TempDir::new("same-value");
    let admin = dir.write("admin-key", &format!("{KEY}\n"));
    let text = edited(
        GOOD,
        "{ name = \"next\", env = \"API_KEY_NEXT\", optional = true }",
        &format!("{{ name = \"admin\", file = \"{}\" }}", admin.display()),
    );
    let path = dir.write("keygate.toml", &text);
    let line = text.lines().nth(4).unwrap();
    let column = line.find("{ name = \"admin\"").unwrap() + 1;
    let expected = format!(
        "{}:5:{column}: [auth] keys (name = \"admin\"): keys \"default\" (environment variable API_KEY) and \"admin\" (file {}) have the same value",
        path.display(),
        admin.display()
    );
    let config = path.to_str().unwrap();
    for args in [&["check", "--config", config][..], &["--config", config]] {
        let (status, stdout, stderr) = run_to_end(args, &env());
        assert_eq!(status.code(), Some(2), "{args:?}: {stdout}");
        assert!(stderr.starts_with(&expected), "{args:?}: {stderr}");
        assert!(!stdout.contains(KEY) && !stderr.contains(KEY), "{stderr}");
    }
}

/// The text of the `keygate.toml: |` entry of a manifest: the lines below the entry that are
/// blank or indented deeper than it, without the block's indentation, as YAML reads a
/// literal block scalar (one final newline kept).
fn embedded_config(manifest: &str) -> String {
    let indent = |line: &str| line.len() - line.trim_start_matches(' ').len();
    let mut lines = manifest
        .lines()
        .skip_while(|line| line.trim() != "keygate.toml: |");
    let entry = lines.next().expect("a `keygate.toml: |` entry");
    let mut block: Vec<&str> = lines
        .take_while(|line| line.trim().is_empty() || indent(line) > indent(entry))
        .collect();
    while block.last().is_some_and(|line| line.trim().is_empty()) {
        block.pop();
    }
    let margin = " ".repeat(indent(block.first().expect("an entry with text")));
    block
        .iter()
        .map(|line| {
            let text = match line.strip_prefix(&margin) {
                Some(text) => text,
                None if line.trim().is_empty() => "",
                None => panic!("{line:?} is indented less than the block"),
            };
            format!("{text}\n")
        })
        .collect()
}

#[test]
fn the_kubernetes_examples_embed_their_configs_unchanged() {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/config/examples");
    for (yaml, toml) in [
        ("kubernetes-sidecar.yaml", "vllm-sidecar.toml"),
        ("kubernetes-replicas.yaml", "vllm-replicas.toml"),
    ] {
        let manifest = std::fs::read_to_string(format!("{examples}/{yaml}")).unwrap();
        let config = std::fs::read_to_string(format!("{examples}/{toml}")).unwrap();
        let embedded = embedded_config(&manifest);
        for (n, (inside, outside)) in embedded.lines().zip(config.lines()).enumerate() {
            assert_eq!(
                inside,
                outside,
                "line {} of {toml} differs in {yaml}'s ConfigMap",
                n + 1
            );
        }
        assert_eq!(
            embedded, config,
            "{yaml}'s ConfigMap must hold {toml} unchanged"
        );
    }
}

#[test]
fn keygen_takes_and_shows_no_config_flags_and_check_keeps_them() {
    let (status, help, stderr) = run_to_end(&["keygen", "--help"], &[]);
    assert!(status.success(), "{stderr}");
    for flag in [
        "--config",
        "--listen",
        "--upstream",
        "--log-format",
        "--log-level",
    ] {
        assert!(!help.contains(flag), "keygen --help lists {flag}:\n{help}");
    }
    let (status, _, stderr) = run_to_end(&["keygen", "--config", "x.toml"], &[]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    let (status, help, stderr) = run_to_end(&["check", "--help"], &[]);
    assert!(status.success(), "{stderr}");
    for flag in ["--config", "--listen", "--upstream"] {
        assert!(help.contains(flag), "check --help lacks {flag}:\n{help}");
    }
}

/// The message `check` prints for `config`.
fn check_error(config: &str) -> String {
    let dir = TempDir::new("message");
    let path = dir.write("keygate.toml", config);
    let (status, _, stderr) = run_to_end(&["check", "--config", path.to_str().unwrap()], &env());
    assert_eq!(status.code(), Some(2), "{stderr}");
    stderr.replace(path.to_str().unwrap(), "keygate.toml")
}

#[test]
fn a_duration_or_size_without_a_unit_is_named_with_how_to_write_it() {
    for (line, expected) in [
        (
            "[upstream]\nidle_timeout = 300\n",
            "keygate.toml:2:16: [upstream] idle_timeout: expected a duration with a unit, such as \"300s\" or \"5m\"\n",
        ),
        (
            "[server]\nshutdown_grace = \"30\"\n",
            "keygate.toml:2:18: [server] shutdown_grace: expected a duration with a unit, such as \"300s\" or \"5m\"\n",
        ),
        (
            "[server]\nmax_request_body = \"lots\"\n",
            "keygate.toml:2:20: [server] max_request_body: expected a size, such as \"64MiB\" or \"512KiB\", or a number of bytes\n",
        ),
        (
            "[server]\nmax_connections = \"many\"\n",
            "keygate.toml:2:19: [server] max_connections: expected a whole number, such as 100\n",
        ),
    ] {
        assert_eq!(check_error(line), expected);
    }
}

#[test]
fn an_unknown_key_names_its_table_and_the_keys_allowed_there() {
    for (text, expected) in [
        (
            "[server]\nlisten = \"127.0.0.1:0\" # [x] \"\nfoo = 1\n",
            "keygate.toml:3:1: unknown key `foo` in [server]; expected one of `listen`, `tls_cert`,",
        ),
        (
            "[auth]\nkeys = [\n  { name = \"a\", env = \"API_KEY\", allow = [{ method = [\"GET\"] }] },\n]\n",
            "keygate.toml:3:45: unknown key `method` in [auth] keys.allow; expected one of `methods`, `path`, `path_prefix`\n",
        ),
        (
            "[auth]\nkeys = [{ name = \"a\", env = \"API_KEY\", bogus = 1 }]\n",
            "keygate.toml:2:40: unknown key `bogus` in [auth] keys; expected one of `name`, `env`,",
        ),
        (
            "[[inject]]\nname = \"x-a\"\nvalu = \"b\"\n",
            "keygate.toml:3:1: unknown key `valu` in [[inject]]; expected `name` or `value`\n",
        ),
        (
            "[sever]\nlisten = \"127.0.0.1:0\"\n",
            "keygate.toml:1:2: unknown table `sever`; expected one of `server`, `upstream`,",
        ),
    ] {
        let e = check_error(text);
        assert!(e.starts_with(expected), "{text}:\n{e}");
        assert!(!e.contains("syntax"), "{e}");
    }
    assert!(
        check_error("[server\n").starts_with("keygate.toml:1:8: syntax: invalid table header"),
        "what is not TOML is still a syntax error"
    );
}

/// `text` with `from` replaced by `to`; `from` must be there, so a change to the base text
/// cannot turn a test's variant back into the base.
fn edited(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} is not in the base config");
    text.replace(from, to)
}
