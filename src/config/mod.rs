//! Configuration: serde structs that mirror the TOML file (unknown keys are an error), and one
//! fallible function, [`Config::load`], that turns them into the validated runtime [`Config`]
//! with every secret resolved. Every problem names the file, the line and column, the TOML key
//! and what to do; all problems are reported at once.
//!
//! Nothing here opens a socket: `main` loads the whole config before binding anything.

mod file;
mod inject;
pub(crate) mod key_policy;
pub(crate) mod keys;
pub(crate) mod limits;
pub(crate) mod models;
pub(crate) mod problems;
pub(crate) mod registry;
pub(crate) mod secrets;
mod server;
mod summary;
pub(crate) mod tls_files;
mod upstream;
mod watch;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytesize::ByteSize;
use http::uri::{Authority, Scheme};
use http::{HeaderName, HeaderValue, Uri};
use ipnet::IpNet;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Deserializer};
use toml::Spanned;

use crate::config::secrets::{Secret, SecretSource};
use crate::headers::{FORWARDING, HOP_BY_HOP, REQUEST_REPLACED, X_REQUEST_ID};
use crate::preset::{Preset, PRESETS};
use key_policy::{Classes, KeyLimits, KeyPolicy, Paths, Rule, MAX_WEIGHT};
use models::Models;
use tls_files::{Certificate, Which};

use file::*;
use inject::*;
use keys::*;
use limits::*;
use problems::*;
use registry::*;
use server::*;
use upstream::*;

pub(crate) use keys::{FileKey, KeySpec, LiveKeys, SameValue};
pub(crate) use problems::{ConfigError, Problem};
#[cfg(test)]
pub(crate) use registry::sha256_hex;
pub(crate) use registry::Registry;
pub(crate) use watch::{FileStamp, WatchedFiles};

/// Keys shorter than this are refused at start-up.
pub(crate) const MIN_KEY_BYTES: usize = 16;

// ---------------------------------------------------------------- the validated config

/// The validated configuration the proxy runs with. Secrets are resolved; nothing here is
/// read from the environment or disk again except on an explicit reload.
#[derive(Debug)]
pub struct Config {
    pub file: PathBuf,
    pub server: Server,
    pub upstream: Upstream,
    pub auth: Auth,
    pub probe_path: String,
    pub public_paths: Vec<String>,
    pub inject: Vec<Injected>,
    /// The admin listener (`/metrics`, `/livez`, `/readyz`), if configured.
    pub admin: Option<SocketAddr>,
    /// Origins allowed by CORS; empty: CORS is off.
    pub cors_origins: Vec<HeaderValue>,
    /// Where per-key rates and concurrency slots are kept.
    pub limits: Limits,
    pub log: Log,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub listen: SocketAddr,
    /// TLS on `listen`, when `tls_cert` and `tls_key` are set.
    pub tls: Option<Tls>,
    /// The plain listener that redirects to https, when `redirect_http_listen` is set.
    pub redirect: Option<Redirect>,
    pub header_read_timeout: Duration,
    pub trusted_proxies: Vec<IpNet>,
    pub max_request_body: u64,
    pub max_connections: usize,
    pub shutdown_grace: Duration,
    /// Runtime worker threads; 1 runs everything on the main thread.
    pub workers: usize,
}

/// The certificate files and what was loaded from them at start-up.
#[derive(Debug, Clone)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub certificate: Certificate,
}

#[derive(Debug, Clone)]
pub struct Redirect {
    pub listen: SocketAddr,
    /// The port written into the `https://` URL; 443 is left out.
    pub https_port: u16,
    /// Whether the probe is answered on the plain listener instead of redirected.
    pub serves_probe: bool,
}

#[derive(Debug)]
pub struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
    /// The URL's path without its trailing `/`; empty when the URL has none.
    pub path_prefix: String,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub idle_timeout: Duration,
    /// Whether the upstream is reached over TLS (an `https://` URL).
    pub tls: bool,
    /// The CA certificates of `ca_file`, the only roots then trusted; the webpki roots
    /// without it.
    pub ca_certificates: Option<Vec<CertificateDer<'static>>>,
    /// Where the upstream's trusted roots come from, for the summary.
    pub ca_file: Option<PathBuf>,
    /// The server preset whose route table is enforced; `None` forwards every route.
    pub preset: Option<&'static Preset>,
    /// How long a `text/event-stream` response may be silent before a comment is sent.
    pub sse_keepalive: Option<Duration>,
    /// Requests and streams in flight to the upstream at once; the rest wait in the fair
    /// queue. `None`: no limit and no queue.
    pub max_in_flight: Option<usize>,
    /// The longest a request waits in that queue.
    pub queue_timeout: Duration,
}

#[derive(Debug)]
pub struct Auth {
    /// The keys with a value, in the file's order.
    pub keys: Vec<KeySpec>,
    /// The key registry (`[auth] registry`), as read at start-up.
    pub registry: Option<Registry>,
    /// The keys read from files, re-read on SIGHUP.
    pub file_keys: Vec<FileKey>,
    /// `optional` keys whose secret was not set, with their rules; they admit nobody.
    pub absent_optional: Vec<(String, Arc<KeyPolicy>)>,
    pub identity_header: Option<HeaderName>,
    pub forward_authorization: bool,
}

/// A header set on every forwarded request. The value is marked sensitive.
#[derive(Debug, Clone)]
pub struct Injected {
    pub name: HeaderName,
    pub value: HeaderValue,
}

#[derive(Debug)]
pub struct Log {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

/// Command-line values that replace what the file says.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub upstream: Option<String>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
}

// ---------------------------------------------------------------- loading

impl Config {
    /// Reads and validates the file at `path`, applies `overrides`, and resolves every secret
    /// through `secrets`.
    pub fn load(
        path: &Path,
        overrides: &Overrides,
        secrets: &dyn SecretSource,
    ) -> Result<Config, ConfigError> {
        let source = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            problems: vec![Problem {
                file: None,
                at: None,
                key: "--config".into(),
                message: format!("cannot read the config file: {e}"),
            }],
        })?;
        Self::parse(path, &source, overrides, secrets)
    }

    /// Validates config text; `path` is used only to name the file in errors.
    pub fn parse(
        path: &Path,
        source: &str,
        overrides: &Overrides,
        secrets: &dyn SecretSource,
    ) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError {
            file: path.to_owned(),
            problems,
        };
        let mut file: FileConfig =
            toml::from_str(source).map_err(|e| fail(vec![file_problem(source, &e)]))?;
        apply_overrides(&mut file, overrides);
        let mut p = Problems {
            source,
            list: Vec::new(),
            file: None,
        };
        let config = validate(path, file, secrets, &mut p);
        // The config file's problems first, then the registry's, each in file order.
        p.list.sort_by(|a, b| (&a.file, a.at).cmp(&(&b.file, b.at)));
        match config {
            Some(config) if p.list.is_empty() => Ok(config),
            _ => Err(fail(p.list)),
        }
    }
}

fn apply_overrides(file: &mut FileConfig, o: &Overrides) {
    if let Some(listen) = &o.listen {
        file.server.listen = unspanned(listen.clone());
    }
    if let Some(url) = &o.upstream {
        file.upstream.url = unspanned(url.clone());
    }
    if let Some(format) = o.log_format {
        file.log.format = format;
    }
    if let Some(level) = &o.log_level {
        file.log.level = unspanned(level.clone());
    }
}

fn validate(
    path: &Path,
    f: FileConfig,
    secrets: &dyn SecretSource,
    p: &mut Problems<'_>,
) -> Option<Config> {
    let server = server(f.server, p);
    let upstream = upstream(f.upstream, p);
    let preset = upstream.as_ref().and_then(|u| u.preset);
    let inject = inject(&f.inject, secrets, p);
    let auth = auth(f.auth, &inject, preset, secrets, p);
    let mut probe_path = route_path(&f.probe.path, "[probe] path", p);
    if let Some(preset) = preset.filter(|_| f.probe.path.span() == (0..0)) {
        probe_path = preset.probe.to_owned();
    }
    let public_paths = f
        .public
        .paths
        .iter()
        .map(|path| route_path(path, "[public] paths", p))
        .collect();
    let level = f.log.level.get_ref();
    if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(level) {
        p.at(
            f.log.level.span(),
            "[log] level",
            format!("{e}; use a level such as \"info\" or a filter such as \"keygate=debug,warn\""),
        );
    }
    let admin = f.admin.as_ref().and_then(|a| {
        let listen = &a.get_ref().listen;
        let addr = listen.get_ref().parse::<SocketAddr>().ok();
        let taken = server.as_ref().and_then(|s| {
            let redirect = s.redirect.as_ref().map(|r| r.listen);
            [Some(s.listen), redirect]
                .into_iter()
                .flatten()
                .find(|&other| addr.is_some_and(|addr| same_socket(other, addr)))
        });
        match (addr, taken) {
            (None, _) => p.at(listen.span(), "[admin] listen", "is not an IP:port address; write e.g. \"127.0.0.1:9090\""),
            (Some(_), Some(_)) => p.at(
                listen.span(),
                "[admin] listen",
                "is the address of the proxy or its redirect listener; the admin listener must be separate, e.g. \"127.0.0.1:9090\"",
            ),
            (Some(_), None) => {}
        }
        addr
    });
    let cors_origins = f
        .cors
        .as_ref()
        .map_or_else(Vec::new, |c| cors_origins(c, p));
    let limits = limits(f.limits, secrets, p);
    Some(Config {
        file: path.to_owned(),
        admin,
        cors_origins,
        limits,
        server: server?,
        upstream: upstream?,
        auth: auth?,
        probe_path,
        public_paths,
        inject,
        log: Log {
            format: f.log.format,
            level: level.clone(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::secrets::MapSecrets;

    const KEY: &str = "0123456789abcdef0123";

    fn parse(text: &str, secrets: &MapSecrets) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), text, &Overrides::default(), secrets)
    }

    fn minimal() -> &'static str {
        "[auth]\nkeys = [{ name = \"default\", env = \"API_KEY\" }]\n"
    }

    fn names(keys: &[KeySpec]) -> Vec<&str> {
        keys.iter().map(|k| k.name.as_str()).collect()
    }

    /// The name of the key whose value is `value`.
    fn holder<'a>(keys: &'a [KeySpec], value: &str) -> Option<&'a str> {
        keys.iter()
            .find(|k| k.secret.expose() == value)
            .map(|k| k.name.as_str())
    }

    fn errors(text: &str, secrets: &MapSecrets) -> String {
        parse(text, secrets).unwrap_err().to_string()
    }

    #[test]
    fn defaults_fill_everything_the_file_leaves_out() {
        let c = parse(minimal(), &MapSecrets::default().with_env("API_KEY", KEY)).unwrap();
        assert_eq!(c.server.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.server.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.server.max_request_body, 64 * 1024 * 1024);
        assert_eq!(
            c.server.workers,
            std::thread::available_parallelism().map_or(1, usize::from)
        );
        assert_eq!(c.upstream.authority.as_str(), "127.0.0.1:8000");
        assert_eq!(c.upstream.response_timeout, Duration::from_secs(600));
        assert_eq!(c.probe_path, "/health");
        assert!(!c.auth.forward_authorization);
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn unknown_key_is_an_error_with_line_and_column() {
        let e = errors(
            "[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n",
            &MapSecrets::default(),
        );
        assert!(e.starts_with("test.toml:3:1: "), "{e}");
        assert!(
            e.contains("unknown key `lisen` in [server]; expected one of `listen`"),
            "{e}"
        );
    }

    #[test]
    fn missing_key_variable_names_the_variable_and_the_line() {
        let e = errors(minimal(), &MapSecrets::default());
        assert!(e.starts_with("test.toml:2:"), "{e}");
        assert!(
            e.contains("API_KEY") && e.contains("name = \"default\""),
            "{e}"
        );
    }

    #[test]
    fn short_key_is_refused_without_showing_it() {
        let e = errors(
            minimal(),
            &MapSecrets::default().with_env("API_KEY", "short-key"),
        );
        assert!(e.contains("shorter than 16 bytes"), "{e}");
        assert!(!e.contains("short-key"), "{e}");
    }

    #[test]
    fn empty_required_key_is_refused_and_empty_optional_key_is_skipped() {
        let text = "[auth]\nkeys = [{ name = \"a\", env = \"A\" }, { name = \"b\", env = \"B\", optional = true }]\n";
        let e = errors(text, &MapSecrets::default().with_env("A", ""));
        assert!(
            e.contains("environment variable A is not set or is empty"),
            "{e}"
        );
        let c = parse(
            text,
            &MapSecrets::default().with_env("A", KEY).with_env("B", ""),
        )
        .unwrap();
        assert_eq!(c.auth.absent_optional[0].0, "b");
        assert_eq!(c.auth.absent_optional.len(), 1);
        assert_eq!(names(&c.auth.keys), ["a"]);
    }

    #[test]
    fn key_file_is_read_and_a_missing_one_is_named() {
        let text = "[auth]\nkeys = [{ name = \"ci\", file = \"/run/secrets/ci\" }]\n";
        let c = parse(
            text,
            &MapSecrets::default().with_file("/run/secrets/ci", KEY),
        )
        .unwrap();
        assert_eq!(names(&c.auth.keys), ["ci"]);
        let e = errors(text, &MapSecrets::default());
        assert!(e.contains("file /run/secrets/ci"), "{e}");
    }

    #[test]
    fn reload_rereads_file_keys_and_keeps_environment_keys() {
        let text = "[auth]\nkeys = [{ name = \"env\", env = \"A\" }, { name = \"ci\", file = \"/k\" }, { name = \"new\", file = \"/n\", optional = true }]\n";
        let start = MapSecrets::default()
            .with_env("A", KEY)
            .with_file("/k", "old-file-key-0123456789");
        let c = parse(text, &start).unwrap();
        let later = MapSecrets::default()
            .with_file("/k", "new-file-key-0123456789")
            .with_file("/n", "added-key-0123456789");
        let keys = reload_file_keys(&c.auth.keys, &c.auth.file_keys, &later).unwrap();
        assert_eq!(holder(&keys, KEY), Some("env"), "env key kept");
        assert_eq!(holder(&keys, "old-file-key-0123456789"), None);
        assert_eq!(holder(&keys, "new-file-key-0123456789"), Some("ci"));
        assert_eq!(holder(&keys, "added-key-0123456789"), Some("new"));
        let broken = MapSecrets::default().with_file("/k", "short");
        let e = reload_file_keys(&c.auth.keys, &c.auth.file_keys, &broken).unwrap_err();
        assert!(
            e.contains("\"ci\"") && e.contains("shorter than 16 bytes") && !e.contains("short\""),
            "{e}"
        );
    }

    #[test]
    fn two_keys_with_one_value_are_refused_at_start_and_on_reload() {
        let text = "[auth]\nkeys = [{ name = \"restricted\", env = \"A\", allow = [{ path = \"/v1/models\" }] },\n  { name = \"admin\", file = \"/k\" }]\n";
        let e = errors(
            text,
            &MapSecrets::default()
                .with_env("A", KEY)
                .with_file("/k", KEY),
        );
        assert!(
            e.starts_with("test.toml:3:3: [auth] keys (name = \"admin\"): keys \"restricted\" (environment variable A) and \"admin\" (file /k) have the same value"),
            "{e}"
        );
        assert!(!e.contains(KEY), "{e}");
        let start = MapSecrets::default()
            .with_env("A", KEY)
            .with_file("/k", "admin-key-0123456789");
        let c = parse(text, &start).unwrap();
        let pasted = MapSecrets::default().with_file("/k", KEY);
        let e = reload_file_keys(&c.auth.keys, &c.auth.file_keys, &pasted).unwrap_err();
        assert!(
            e.starts_with("keys \"restricted\" (environment variable A) and \"admin\" (file /k) have the same value"),
            "{e}"
        );
        assert!(!e.contains(KEY), "{e}");
    }

    #[test]
    fn inject_template_reads_the_environment_and_marks_the_value_sensitive() {
        let text = format!(
            "{}[[inject]]\nname = \"Authorization\"\nvalue = \"Bearer ${{UP}}\"\n",
            minimal()
        );
        let secrets = MapSecrets::default()
            .with_env("API_KEY", KEY)
            .with_env("UP", "upstream-key");
        let c = parse(&text, &secrets).unwrap();
        assert_eq!(c.inject[0].name, "authorization");
        assert_eq!(c.inject[0].value, "Bearer upstream-key");
        assert!(c.inject[0].value.is_sensitive());
        let e = errors(&text, &MapSecrets::default().with_env("API_KEY", KEY));
        assert!(
            e.starts_with("test.toml:5:9: [[inject]] (name = \"Authorization\") value: uses ${UP}"),
            "{e}"
        );
        assert!(e.contains("environment variable UP"), "{e}");
    }

    #[test]
    fn a_dollar_starts_a_braced_name_or_is_doubled() {
        let secrets = MapSecrets::default()
            .with_env("API_KEY", KEY)
            .with_env("S", "shared");
        let inject = |value: &str| {
            format!(
                "{}[[inject]]\nname = \"x-secret\"\nvalue = '{value}'\n",
                minimal()
            )
        };
        let c = parse(&inject("$$5 ${S}$$${S}$$ $${S}"), &secrets).unwrap();
        assert_eq!(c.inject[0].value, "$5 shared$shared$ ${S}");
        for (value, expected) in [
            (
                "$SHARED_SECRET",
                "has $SHARED_SECRET without braces, which would be sent as written; write ${SHARED_SECRET} to insert the environment variable SHARED_SECRET, or $$SHARED_SECRET for a literal $",
            ),
            ("Bearer $UP_1-x", "write ${UP_1} to insert"),
            ("price: 5$", "has a $ that starts no ${NAME}; write ${NAME} to insert an environment variable, or $$ for a literal $"),
            ("pa$sword", "has a $ that starts no ${NAME}"),
            ("$$$S", "write ${S} to insert"),
            ("${S", "without a closing"),
        ] {
            let e = errors(&inject(value), &secrets);
            assert!(
                e.starts_with("test.toml:5:9: [[inject]] (name = \"x-secret\") value: "),
                "{value}: {e}"
            );
            assert!(e.contains(expected), "{value}: {e}");
        }
        assert!(!errors(&inject("pa$sword"), &secrets).contains("sword"));
    }

    #[test]
    fn config_debug_output_never_shows_a_secret() {
        let text = format!(
            "{}[[inject]]\nname = \"x-shared-secret\"\nvalue = \"${{S}}\"\n",
            minimal()
        );
        let secrets = MapSecrets::default()
            .with_env("API_KEY", KEY)
            .with_env("S", "shared-secret-value");
        let debug = format!("{:?}", parse(&text, &secrets).unwrap());
        assert!(
            !debug.contains(KEY) && !debug.contains("shared-secret-value"),
            "{debug}"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = "[server]\nlisten = \"nowhere\"\nmax_connections = 0\n[upstream]\nurl = \"ftp://x\"\n[auth]\nkeys = []\n";
        let e = parse(text, &MapSecrets::default()).unwrap_err();
        let keys: Vec<_> = e.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "[auth] keys",
                "[server] listen",
                "[server] max_connections",
                "[upstream] url"
            ]
        );
    }

    #[test]
    fn tls_settings_that_cannot_work_are_refused() {
        let secrets = MapSecrets::default().with_env("API_KEY", KEY);
        let e = errors(
            &format!("{}[server]\ntls_cert = \"/c.pem\"\n", minimal()),
            &secrets,
        );
        assert!(e.contains("tls_cert and tls_key go together"), "{e}");
        let e = errors(
            &format!(
                "{}[server]\ntls_cert = \"/nonexistent/c.pem\"\ntls_key = \"/nonexistent/k.pem\"\n",
                minimal()
            ),
            &secrets,
        );
        assert!(
            e.contains("[server] tls_cert: cannot read /nonexistent/c.pem"),
            "{e}"
        );
        let e = errors(
            &format!(
                "{}[server]\nredirect_http_listen = \"127.0.0.1:8081\"\n",
                minimal()
            ),
            &secrets,
        );
        assert!(e.contains("needs TLS on listen"), "{e}");
        let e = errors(
            &format!("{}[upstream]\nca_file = \"/ca.pem\"\n", minimal()),
            &secrets,
        );
        assert!(e.contains("applies to https:// upstreams only"), "{e}");
    }

    #[test]
    fn cors_origins_must_be_origins() {
        let ok = format!(
            "{}[cors]\nallow_origins = [\"https://app.example\", \"http://localhost:3000\"]\n",
            minimal()
        );
        let c = parse(&ok, &MapSecrets::default().with_env("API_KEY", KEY)).unwrap();
        assert_eq!(c.cors_origins.len(), 2);
        let bad = format!(
            "{}[cors]\nallow_origins = [\"app.example\", \"https://app.example/path\"]\n",
            minimal()
        );
        let e = parse(&bad, &MapSecrets::default().with_env("API_KEY", KEY)).unwrap_err();
        assert_eq!(e.problems.len(), 2, "{e}");
    }

    #[test]
    fn admin_listener_must_differ_from_the_proxy_listener() {
        let text = format!(
            "{}[server]\nlisten = \"0.0.0.0:9090\"\n[admin]\nlisten = \"127.0.0.1:9090\"\n",
            minimal()
        );
        let e = errors(&text, &MapSecrets::default().with_env("API_KEY", KEY));
        assert!(
            e.contains("[admin] listen") && e.contains("must be separate"),
            "{e}"
        );
    }

    #[test]
    fn overrides_replace_file_values() {
        let o = Overrides {
            listen: Some("127.0.0.1:9999".into()),
            upstream: Some("http://10.0.0.1:81/v2/".into()),
            ..Overrides::default()
        };
        let c = Config::parse(
            Path::new("t"),
            minimal(),
            &o,
            &MapSecrets::default().with_env("API_KEY", KEY),
        )
        .unwrap();
        assert_eq!(c.server.listen.port(), 9999);
        assert_eq!(c.upstream.authority.as_str(), "10.0.0.1:81");
        assert_eq!(c.upstream.path_prefix, "/v2");
    }

    #[test]
    fn reserved_and_duplicate_inject_names_are_refused() {
        let text = format!("{}[[inject]]\nname = \"Host\"\nvalue = \"x\"\n[[inject]]\nname = \"a\"\nvalue = \"1\"\n[[inject]]\nname = \"A\"\nvalue = \"2\"\n", minimal());
        let e = parse(&text, &MapSecrets::default().with_env("API_KEY", KEY)).unwrap_err();
        assert_eq!(e.problems.len(), 2, "{e}");
        assert!(e.problems[0].message.contains("manages this header"));
        assert!(e.problems[1].message.contains("injected twice"));
    }

    #[test]
    fn probe_path_must_be_a_plain_path() {
        for bad in ["health", "/health?x=1", ""] {
            let text = format!("{}[probe]\npath = \"{bad}\"\n", minimal());
            let e = errors(&text, &MapSecrets::default().with_env("API_KEY", KEY));
            assert!(e.contains("[probe] path"), "{bad}: {e}");
        }
    }

    #[test]
    fn key_scopes_and_limits_are_read() {
        let text = "[upstream]\npreset = \"vllm\"\n[auth]\nkeys = [{ name = \"default\", env = \"API_KEY\", routes = [\"inference\", \"admin\"], allow = [{ methods = [\"POST\"], path_prefix = \"/v1/\" }], max_concurrent = 4, not_after = \"2030-01-01T00:00:00Z\" }]\n";
        let c = parse(text, &MapSecrets::default().with_env("API_KEY", KEY)).unwrap();
        let (name, policy) = (&c.auth.keys[0].name, &c.auth.keys[0].policy);
        assert_eq!(name, "default");
        assert!(policy.routes.admin && policy.routes.inference);
        assert_eq!(policy.allow[0].to_string(), "POST below /v1/");
        assert_eq!(policy.max_concurrent, Some(4));
        assert_eq!(
            policy.not_after,
            Some(humantime::parse_rfc3339("2030-01-01T00:00:00Z").unwrap())
        );
        assert_eq!(c.upstream.preset.unwrap().name, "vllm");
        assert_eq!(c.probe_path, "/health");
    }

    #[test]
    fn not_after_may_be_a_toml_date_time() {
        let text = "[auth]\nkeys = [{ name = \"default\", env = \"API_KEY\", not_after = 2030-01-01T00:00:00Z }]\n";
        let c = parse(text, &MapSecrets::default().with_env("API_KEY", KEY)).unwrap();
        let policy = &c.auth.keys[0].policy;
        assert!(policy.not_after.is_some());
    }

    #[test]
    fn bad_scopes_and_limits_name_the_key_and_the_fix() {
        let secrets = MapSecrets::default().with_env("API_KEY", KEY);
        for (entry, expected) in [
            ("allow = []", "lets the key do nothing"),
            ("allow = [{}]", "needs methods, a path or path_prefix, or both"),
            ("allow = [{ methods = [\"post\"] }]", "write it in capitals"),
            (
                "allow = [{ path_prefix = \"v1/\" }]",
                "must be a plain path",
            ),
            (
                "allow = [{ path_prefix = \"/v1/../\" }]",
                "must be a plain path",
            ),
            (
                "allow = [{ path_prefix = \"/v1?x=1\" }]",
                "must be a plain path",
            ),
            (
                "allow = [{ path = \"/v1/models/\" }]",
                "must be a plain path",
            ),
            (
                "allow = [{ path = \"/v1//models\" }]",
                "must be a plain path",
            ),
            (
                "allow = [{ path = \"/v1/models\", path_prefix = \"/v1/\" }]",
                "has path or path_prefix, not both; write path = \"/v1/models\" for that route alone, or path_prefix = \"/v1/\"",
            ),
            ("routes = [\"admin\"]", "only applies with a server preset"),
            ("max_concurrent = 0", "admits nothing"),
            ("not_after = \"2030-01-01\"", "RFC 3339"),
            ("not_after = \"2030-01-01T00:00:00+02:00\"", "in UTC"),
            (
                "allow = [{ method = [\"POST\"] }]",
                "unknown key `method` in [auth] keys.allow",
            ),
        ] {
            let text =
                format!("[auth]\nkeys = [{{ name = \"default\", env = \"API_KEY\", {entry} }}]\n");
            let e = errors(&text, &secrets);
            assert!(e.starts_with("test.toml:2:"), "{entry}: {e}");
            assert!(e.contains(expected), "{entry}: {e}");
        }
    }

    #[test]
    fn presets_and_sse_keepalive_are_checked() {
        let secrets = MapSecrets::default().with_env("API_KEY", KEY);
        let e = errors(
            &format!("{}[upstream]\npreset = \"vlm\"\n", minimal()),
            &secrets,
        );
        assert!(
            e.contains("[upstream] preset") && e.contains("\"vllm\", \"sglang\", \"llamacpp\""),
            "{e}"
        );
        let e = errors(
            &format!(
                "{}[upstream]\nidle_timeout = \"10s\"\nsse_keepalive = \"10s\"\n",
                minimal()
            ),
            &secrets,
        );
        assert!(
            e.starts_with(
                "test.toml:5:17: [upstream] sse_keepalive: must be shorter than idle_timeout"
            ),
            "{e}"
        );
        let c = parse(
            &format!(
                "{}[upstream]\npreset = \"none\"\nsse_keepalive = \"15s\"\n",
                minimal()
            ),
            &secrets,
        )
        .unwrap();
        assert!(c.upstream.preset.is_none());
        assert_eq!(c.upstream.sse_keepalive, Some(Duration::from_secs(15)));
        let c = parse(
            &format!(
                "{}[upstream]\npreset = \"sglang\"\n[probe]\npath = \"/ready\"\n",
                minimal()
            ),
            &secrets,
        )
        .unwrap();
        assert_eq!(c.probe_path, "/ready", "an explicit probe path wins");
    }

    #[test]
    fn summary_shows_scopes_limits_preset_and_keepalive() {
        let text = "[upstream]\npreset = \"llamacpp\"\nsse_keepalive = \"15s\"\n[auth]\nkeys = [{ name = \"default\", env = \"API_KEY\" }, { name = \"ops\", env = \"OPS\", routes = [\"admin\"], max_concurrent = 2, not_after = \"2000-01-01T00:00:00Z\" }]\n";
        let secrets = MapSecrets::default()
            .with_env("API_KEY", KEY)
            .with_env("OPS", "ops-key-0123456789abcdef");
        let summary = parse(text, &secrets).unwrap().summary();
        assert!(
            summary.contains(
                "key ops:         routes admin; max_concurrent 2; not_after 2000-01-01T00:00:00Z (expired: refused)\n"
            ),
            "{summary}"
        );
        assert!(!summary.contains("key default:"), "{summary}");
        assert!(
            summary.contains("preset:          llamacpp: 34 inference and 15 admin routes"),
            "{summary}"
        );
        assert!(summary.contains("sse keep-alive:  15s\n"), "{summary}");
        assert!(!summary.contains("ops-key"), "{summary}");
    }

    #[test]
    fn summary_says_what_each_allow_rule_admits() {
        let text = "[auth]\nkeys = [{ name = \"default\", env = \"API_KEY\", allow = [{ methods = [\"POST\"], path_prefix = \"/v1/chat/completions\" }, { methods = [\"GET\"], path = \"/v1/models\" }, { path_prefix = \"/v2/\" }] }]\n";
        let summary = parse(text, &MapSecrets::default().with_env("API_KEY", KEY))
            .unwrap()
            .summary();
        assert!(
            summary.contains(
                "key default:     allow POST /v1/chat/completions and below, GET /v1/models exactly, any method below /v2/\n"
            ),
            "{summary}"
        );
    }

    #[test]
    fn summary_shows_the_rules_of_an_unset_optional_key() {
        let text = "[upstream]\npreset = \"vllm\"\n[auth]\nkeys = [{ name = \"default\", env = \"API_KEY\" }, { name = \"ops\", file = \"/run/keys/ops\", optional = true, routes = [\"admin\"], max_concurrent = 1 }]\n";
        let secrets = MapSecrets::default().with_env("API_KEY", KEY);
        let summary = parse(text, &secrets).unwrap().summary();
        assert!(summary.contains("ops (optional, not set)"), "{summary}");
        assert!(
            summary.contains("key ops:         routes admin; max_concurrent 1\n"),
            "{summary}"
        );
    }

    #[test]
    fn keys_sharing_a_value_are_named_by_name_and_origin_never_by_value() {
        let spec = |name: &str, value: &str| KeySpec {
            name: name.to_owned(),
            origin: format!("environment variable {}", name.to_uppercase()),
            secret: Secret::new(value.to_owned()),
            policy: Arc::default(),
        };
        let clashes = same_values(&[
            spec("restricted", "shared-value-0123456789"),
            spec("other", "other-value-0123456789"),
            spec("admin", "shared-value-0123456789"),
            spec("third", "shared-value-0123456789"),
        ]);
        let pairs: Vec<(&str, &str)> = clashes
            .iter()
            .map(|c| (c.first.0.as_str(), c.second.0.as_str()))
            .collect();
        assert_eq!(pairs, [("restricted", "admin"), ("restricted", "third")]);
        let message = clashes[0].to_string();
        assert!(
            message.starts_with(
                "keys \"restricted\" (environment variable RESTRICTED) and \"admin\" (environment variable ADMIN) have the same value"
            ),
            "{message}"
        );
        assert!(!message.contains("shared-value"), "{message}");
    }

    #[test]
    fn fair_admission_settings_are_checked_and_summarised() {
        let secrets = MapSecrets::default().with_env("API_KEY", KEY);
        for (upstream, expected) in [
            (
                "max_in_flight = 0",
                "test.toml:2:17: [upstream] max_in_flight: must be at least 1",
            ),
            (
                "max_in_flight = -3",
                "test.toml:2:17: [upstream] max_in_flight: must be at least 1",
            ),
            (
                "queue_timeout = \"0s\"",
                "test.toml:2:17: [upstream] queue_timeout: must be longer than zero",
            ),
        ] {
            let e = errors(&format!("[upstream]\n{upstream}\n{}", minimal()), &secrets);
            assert!(e.starts_with(expected), "{upstream}: {e}");
        }
        for weight in ["0", "1001", "-1"] {
            let text = format!(
                "[auth]\nkeys = [{{ name = \"default\", env = \"API_KEY\", weight = {weight} }}]\n"
            );
            let e = errors(&text, &secrets);
            assert!(
                e.starts_with("test.toml:2:9: [auth] keys (name = \"default\"): weight must be a whole number from 1 to 1000"),
                "{weight}: {e}"
            );
        }
        let c = parse(minimal(), &secrets).unwrap();
        assert_eq!(c.upstream.max_in_flight, None);
        assert_eq!(c.upstream.queue_timeout, Duration::from_secs(30));
        assert!(
            c.summary().contains("upstream queue:  off"),
            "{}",
            c.summary()
        );
        let text = "[upstream]\nmax_in_flight = 4\nqueue_timeout = \"5s\"\n[auth]\nkeys = [{ name = \"default\", env = \"API_KEY\" }, { name = \"batch\", env = \"API_KEY_2\", weight = 3 }]\n";
        let secrets = secrets.with_env("API_KEY_2", "second-key-0123456789abcdef");
        let c = parse(text, &secrets).unwrap();
        assert_eq!(c.upstream.max_in_flight, Some(4));
        let summary = c.summary();
        assert!(
            summary.contains("upstream queue:  max_in_flight 4, queue_timeout 5s;"),
            "{summary}"
        );
        assert!(summary.contains("key batch:       weight 3\n"), "{summary}");
        assert!(!summary.contains("key default:"), "{summary}");
    }
}
