//! The config a test runs keygate with, built field by field and rendered as TOML. A test
//! states each value it depends on through a method, so a change to the defaults cannot
//! quietly turn a variant into the base config, as editing the text could.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// A config in front of one upstream. [`TestConfig::new`] gives the common base: two keys
/// (`default` from `API_KEY`, `ci` from `CI_KEY`), the identity header `x-keygate-key`, two
/// injected headers, the probe `/health`, the public path `/docs`, and short timeouts.
#[derive(Debug, Clone)]
pub struct TestConfig {
    header_read_timeout: Duration,
    max_request_body: &'static str,
    shutdown_grace: Duration,
    max_connections: Option<usize>,
    trusted_proxies: Vec<String>,
    tls: Option<TlsFiles>,
    redirect_http_listen: Option<String>,
    redirect_https_port: Option<u16>,
    redirect_serves_probe: bool,
    url: String,
    ca_file: Option<PathBuf>,
    connect_timeout: Duration,
    response_timeout: Duration,
    idle_timeout: Duration,
    preset: Option<String>,
    sse_keepalive: Option<Duration>,
    max_in_flight: Option<usize>,
    queue_timeout: Option<Duration>,
    keys: Keys,
    registry: Option<PathBuf>,
    identity_header: Option<String>,
    forward_authorization: bool,
    probe_path: String,
    public_paths: Vec<String>,
    inject: Vec<(String, String)>,
    admin: bool,
    limits: Limits,
    log_level: &'static str,
    tables: String,
}

/// `[limits]`: written only when `redis` is set.
#[derive(Debug, Clone, Default)]
struct Limits {
    redis: Option<String>,
    redis_timeout: Option<Duration>,
    on_redis_error: Option<&'static str>,
    slot_lease: Option<Duration>,
}

#[derive(Debug, Clone)]
enum Keys {
    Built(Vec<Key>),
    /// Inline tables written by the test, for key options the builder has no method for.
    Toml(String),
}

/// The certificate and key files of a TLS listener.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestConfig {
    pub fn new(upstream: SocketAddr) -> Self {
        Self {
            header_read_timeout: Duration::from_secs(2),
            max_request_body: "1MiB",
            shutdown_grace: Duration::from_secs(5),
            max_connections: None,
            trusted_proxies: Vec::new(),
            tls: None,
            redirect_http_listen: None,
            redirect_https_port: None,
            redirect_serves_probe: false,
            url: format!("http://{upstream}"),
            ca_file: None,
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(2),
            preset: None,
            sse_keepalive: None,
            max_in_flight: None,
            queue_timeout: None,
            keys: Keys::Built(vec![
                Key::env("default", "API_KEY"),
                Key::env("ci", "CI_KEY"),
            ]),
            registry: None,
            identity_header: Some("x-keygate-key".to_owned()),
            forward_authorization: false,
            probe_path: "/health".to_owned(),
            public_paths: vec!["/docs".to_owned()],
            inject: vec![
                ("x-shared-secret".to_owned(), "${SHARED_SECRET}".to_owned()),
                (
                    "x-upstream-token".to_owned(),
                    "Bearer ${UPSTREAM_API_KEY}".to_owned(),
                ),
            ],
            admin: false,
            limits: Limits::default(),
            log_level: "warn",
            tables: String::new(),
        }
    }

    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    pub fn max_request_body(mut self, size: &'static str) -> Self {
        self.max_request_body = size;
        self
    }

    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    pub fn max_connections(mut self, limit: usize) -> Self {
        self.max_connections = Some(limit);
        self
    }

    /// Addresses or networks whose forwarding headers are trusted.
    pub fn trusted_proxies(mut self, proxies: &[&str]) -> Self {
        self.trusted_proxies = proxies.iter().map(|p| (*p).to_owned()).collect();
        self
    }

    /// Terminates TLS with these files.
    pub fn tls(mut self, files: TlsFiles) -> Self {
        self.tls = Some(files);
        self
    }

    /// A plain HTTP listener on an ephemeral port that redirects to https.
    pub fn redirect_http_listen(self) -> Self {
        self.redirect_http_listen_on("127.0.0.1:0")
    }

    /// The redirecting listener on this address.
    pub fn redirect_http_listen_on(mut self, addr: &str) -> Self {
        self.redirect_http_listen = Some(addr.to_owned());
        self
    }

    pub fn redirect_https_port(mut self, port: u16) -> Self {
        self.redirect_https_port = Some(port);
        self
    }

    pub fn redirect_serves_probe(mut self) -> Self {
        self.redirect_serves_probe = true;
        self
    }

    /// Another upstream URL than `http://{upstream}` (a path prefix, https, a host name).
    pub fn upstream_url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }

    /// The CA file an https upstream is checked against.
    pub fn ca_file(mut self, path: &Path) -> Self {
        self.ca_file = Some(path.to_owned());
        self
    }

    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    pub fn preset(mut self, name: &str) -> Self {
        self.preset = Some(name.to_owned());
        self
    }

    pub fn sse_keepalive(mut self, every: Duration) -> Self {
        self.sse_keepalive = Some(every);
        self
    }

    /// Replaces the keys.
    pub fn max_in_flight(mut self, limit: usize) -> Self {
        self.max_in_flight = Some(limit);
        self
    }

    pub fn queue_timeout(mut self, timeout: Duration) -> Self {
        self.queue_timeout = Some(timeout);
        self
    }

    pub fn keys(mut self, keys: impl IntoIterator<Item = Key>) -> Self {
        self.keys = Keys::Built(keys.into_iter().collect());
        self
    }

    /// Replaces the keys with `inline_tables`, the text between the brackets of `keys = [...]`.
    pub fn keys_toml(mut self, inline_tables: &str) -> Self {
        self.keys = Keys::Toml(inline_tables.to_owned());
        self
    }

    /// `[auth] registry`: the key registry at `path`.
    pub fn registry(mut self, path: &Path) -> Self {
        self.registry = Some(path.to_owned());
        self
    }

    pub fn identity_header(mut self, name: &str) -> Self {
        self.identity_header = Some(name.to_owned());
        self
    }

    pub fn forward_authorization(mut self) -> Self {
        self.forward_authorization = true;
        self
    }

    pub fn public_paths(mut self, paths: &[&str]) -> Self {
        self.public_paths = paths.iter().map(|p| (*p).to_owned()).collect();
        self
    }

    /// One more injected header.
    pub fn inject(mut self, name: &str, value: &str) -> Self {
        self.inject.push((name.to_owned(), value.to_owned()));
        self
    }

    /// An `[admin]` listener (the in-process harness binds its own ephemeral port for it).
    pub fn admin(mut self) -> Self {
        self.admin = true;
        self
    }

    /// Rates and slots shared through the Redis at `url` (`[limits] redis`).
    pub fn redis(mut self, url: &str) -> Self {
        self.limits.redis = Some(url.to_owned());
        self
    }

    pub fn redis_timeout(mut self, timeout: Duration) -> Self {
        self.limits.redis_timeout = Some(timeout);
        self
    }

    /// `"local"` or `"deny"`.
    pub fn on_redis_error(mut self, what: &'static str) -> Self {
        self.limits.on_redis_error = Some(what);
        self
    }

    pub fn slot_lease(mut self, lease: Duration) -> Self {
        self.limits.slot_lease = Some(lease);
        self
    }

    pub fn log_level(mut self, level: &'static str) -> Self {
        self.log_level = level;
        self
    }

    /// Tables appended as written, for sections the builder has no method for.
    pub fn tables(mut self, toml: &str) -> Self {
        self.tables.push_str(toml);
        self
    }

    /// The config as TOML.
    pub fn text(&self) -> String {
        let mut server = format!(
            "listen = \"127.0.0.1:0\"\nheader_read_timeout = {}\n",
            duration(self.header_read_timeout)
        );
        if let Some(tls) = &self.tls {
            server += &format!(
                "tls_cert = {}\ntls_key = {}\n",
                path(&tls.cert),
                path(&tls.key)
            );
        }
        if let Some(addr) = &self.redirect_http_listen {
            server += &format!("redirect_http_listen = \"{addr}\"\n");
        }
        if let Some(port) = self.redirect_https_port {
            server += &format!("redirect_https_port = {port}\n");
        }
        if self.redirect_serves_probe {
            server += "redirect_serves_probe = true\n";
        }
        if !self.trusted_proxies.is_empty() {
            server += &format!("trusted_proxies = {}\n", strings(&self.trusted_proxies));
        }
        if let Some(limit) = self.max_connections {
            server += &format!("max_connections = {limit}\n");
        }
        server += &format!(
            "max_request_body = {}\nshutdown_grace = {}\n",
            string(self.max_request_body),
            duration(self.shutdown_grace)
        );

        let mut upstream = String::new();
        if let Some(ca_file) = &self.ca_file {
            upstream += &format!("ca_file = {}\n", path(ca_file));
        }
        upstream += &format!(
            "url = {}\nconnect_timeout = {}\nresponse_timeout = {}\nidle_timeout = {}\n",
            string(&self.url),
            duration(self.connect_timeout),
            duration(self.response_timeout),
            duration(self.idle_timeout)
        );
        if let Some(preset) = &self.preset {
            upstream += &format!("preset = {}\n", string(preset));
        }
        if let Some(every) = self.sse_keepalive {
            upstream += &format!("sse_keepalive = {}\n", duration(every));
        }
        if let Some(limit) = self.max_in_flight {
            upstream += &format!("max_in_flight = {limit}\n");
        }
        if let Some(timeout) = self.queue_timeout {
            upstream += &format!("queue_timeout = {}\n", duration(timeout));
        }

        let keys = match &self.keys {
            Keys::Built(keys) => keys.iter().map(Key::toml).collect::<Vec<_>>().join(", "),
            Keys::Toml(text) => text.clone(),
        };
        let mut auth = format!("keys = [{keys}]\n");
        if let Some(registry) = &self.registry {
            auth += &format!("registry = {}\n", path(registry));
        }
        if let Some(name) = &self.identity_header {
            auth += &format!("identity_header = {}\n", string(name));
        }
        if self.forward_authorization {
            auth += "forward_authorization = true\n";
        }

        let mut inject = String::new();
        for (name, value) in &self.inject {
            inject += &format!(
                "\n[[inject]]\nname = {}\nvalue = {}\n",
                string(name),
                string(value)
            );
        }
        let admin = if self.admin {
            "\n[admin]\nlisten = \"127.0.0.1:0\"\n"
        } else {
            ""
        };
        let mut limits = String::new();
        if let Some(url) = &self.limits.redis {
            limits += &format!("\n[limits]\nredis = {}\n", string(url));
            if let Some(timeout) = self.limits.redis_timeout {
                limits += &format!("redis_timeout = {}\n", duration(timeout));
            }
            if let Some(what) = self.limits.on_redis_error {
                limits += &format!("on_redis_error = {}\n", string(what));
            }
            if let Some(lease) = self.limits.slot_lease {
                limits += &format!("slot_lease = {}\n", duration(lease));
            }
        }
        format!(
            "\n[server]\n{server}\n[upstream]\n{upstream}\n[auth]\n{auth}\n[probe]\npath = {}\n\n[public]\npaths = {}\n{inject}{admin}{limits}\n[log]\nlevel = {}\n{}",
            string(&self.probe_path),
            strings(&self.public_paths),
            string(self.log_level),
            self.tables
        )
    }
}

/// One entry of `[auth] keys`.
#[derive(Debug, Clone)]
pub struct Key {
    name: String,
    source: Source,
    optional: bool,
    allow: Option<Vec<Rule>>,
    routes: Option<Vec<String>>,
    max_concurrent: Option<usize>,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u32>,
    not_after: Option<SystemTime>,
    weight: Option<u32>,
    models: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
enum Source {
    Env(String),
    File(PathBuf),
}

/// One `allow` rule: any of `methods` (any method when empty) under `path_prefix`.
#[derive(Debug, Clone)]
struct Rule {
    methods: Vec<String>,
    path_prefix: String,
}

impl Key {
    /// A key whose value is in the environment variable `var`.
    pub fn env(name: &str, var: &str) -> Self {
        Self::new(name, Source::Env(var.to_owned()))
    }

    /// A key whose value is in the file at `path`.
    pub fn file(name: &str, path: &Path) -> Self {
        Self::new(name, Source::File(path.to_owned()))
    }

    fn new(name: &str, source: Source) -> Self {
        Self {
            name: name.to_owned(),
            source,
            optional: false,
            allow: None,
            routes: None,
            max_concurrent: None,
            requests_per_minute: None,
            tokens_per_minute: None,
            not_after: None,
            weight: None,
            models: None,
        }
    }

    pub fn optional(mut self) -> Self {
        self.optional = true;
        self
    }

    /// One more `allow` rule.
    pub fn allow(mut self, methods: &[&str], path_prefix: &str) -> Self {
        self.allow.get_or_insert_with(Vec::new).push(Rule {
            methods: methods.iter().map(|m| (*m).to_owned()).collect(),
            path_prefix: path_prefix.to_owned(),
        });
        self
    }

    /// The preset route classes the key may use.
    pub fn routes(mut self, classes: &[&str]) -> Self {
        self.routes = Some(classes.iter().map(|c| (*c).to_owned()).collect());
        self
    }

    pub fn max_concurrent(mut self, limit: usize) -> Self {
        self.max_concurrent = Some(limit);
        self
    }

    pub fn requests_per_minute(mut self, rate: u32) -> Self {
        self.requests_per_minute = Some(rate);
        self
    }

    pub fn tokens_per_minute(mut self, rate: u32) -> Self {
        self.tokens_per_minute = Some(rate);
        self
    }

    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = Some(weight);
        self
    }

    /// The models the key may name: exact names or a trailing `*`.
    pub fn models(mut self, models: &[&str]) -> Self {
        self.models = Some(models.iter().map(|m| (*m).to_owned()).collect());
        self
    }

    /// Expires at `when` (written in whole seconds).
    pub fn not_after(mut self, when: SystemTime) -> Self {
        self.not_after = Some(when);
        self
    }

    /// The key as an inline table.
    fn toml(&self) -> String {
        let mut fields = vec![format!("name = {}", string(&self.name))];
        fields.push(match &self.source {
            Source::Env(var) => format!("env = {}", string(var)),
            Source::File(file) => format!("file = {}", path(file)),
        });
        if self.optional {
            fields.push("optional = true".to_owned());
        }
        if let Some(rules) = &self.allow {
            let rules: Vec<String> = rules
                .iter()
                .map(|rule| {
                    let prefix = format!("path_prefix = {}", string(&rule.path_prefix));
                    if rule.methods.is_empty() {
                        format!("{{ {prefix} }}")
                    } else {
                        format!("{{ methods = {}, {prefix} }}", strings(&rule.methods))
                    }
                })
                .collect();
            fields.push(format!("allow = [{}]", rules.join(", ")));
        }
        if let Some(routes) = &self.routes {
            fields.push(format!("routes = {}", strings(routes)));
        }
        if let Some(limit) = self.max_concurrent {
            fields.push(format!("max_concurrent = {limit}"));
        }
        if let Some(rate) = self.requests_per_minute {
            fields.push(format!("requests_per_minute = {rate}"));
        }
        if let Some(rate) = self.tokens_per_minute {
            fields.push(format!("tokens_per_minute = {rate}"));
        }
        if let Some(when) = self.not_after {
            let when = humantime::format_rfc3339_seconds(when).to_string();
            fields.push(format!("not_after = {}", string(&when)));
        }
        if let Some(weight) = self.weight {
            fields.push(format!("weight = {weight}"));
        }
        if let Some(models) = &self.models {
            fields.push(format!("models = {}", strings(models)));
        }
        format!("{{ {} }}", fields.join(", "))
    }
}

/// A TOML basic string.
fn string(value: &str) -> String {
    toml::Value::String(value.to_owned()).to_string()
}

fn strings(values: &[String]) -> String {
    let quoted: Vec<String> = values.iter().map(|v| string(v)).collect();
    format!("[{}]", quoted.join(", "))
}

fn path(value: &Path) -> String {
    string(value.to_str().expect("test paths are UTF-8"))
}

fn duration(value: Duration) -> String {
    string(&humantime::format_duration(value).to_string())
}
