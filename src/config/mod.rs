//! Configuration: serde structs that mirror the TOML file (unknown keys are an error), and one
//! fallible function, [`Config::load`], that turns them into the validated runtime [`Config`]
//! with every secret resolved. Every problem names the file, the line and column, the TOML key
//! and what to do; all problems are reported at once.
//!
//! Nothing here opens a socket: `main` loads the whole config before binding anything.

pub mod secrets;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytesize::ByteSize;
use http::uri::{Authority, Scheme};
use http::{HeaderName, HeaderValue, Uri};
use ipnet::IpNet;
use rustls::ClientConfig;
use serde::{Deserialize, Deserializer};
use toml::Spanned;

use crate::config::secrets::{Secret, SecretSource};
use crate::headers::{FORWARDING, HOP_BY_HOP, REQUEST_REPLACED, X_REQUEST_ID};
use crate::listener::tls::{self, Certificate};
use crate::policy::auth::{KeySet, NamedKey};
use crate::policy::preset::{Preset, PRESETS};
use crate::policy::scope::{Classes, Clock, Paths, Policy, Rule};

/// Keys shorter than this are refused at start-up.
pub const MIN_KEY_BYTES: usize = 16;

// ---------------------------------------------------------------- the file, as written

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    server: ServerFile,
    #[serde(default)]
    upstream: UpstreamFile,
    #[serde(default)]
    auth: AuthFile,
    #[serde(default)]
    probe: ProbeFile,
    #[serde(default)]
    public: PublicFile,
    #[serde(default)]
    inject: Vec<Spanned<InjectFile>>,
    admin: Option<Spanned<AdminFile>>,
    cors: Option<Spanned<CorsFile>>,
    #[serde(default)]
    log: LogFile,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ServerFile {
    listen: Spanned<String>,
    tls_cert: Option<Spanned<String>>,
    tls_key: Option<Spanned<String>>,
    redirect_http_listen: Option<Spanned<String>>,
    redirect_https_port: Option<Spanned<u16>>,
    redirect_serves_probe: bool,
    header_read_timeout: Spanned<HumanDuration>,
    trusted_proxies: Vec<Spanned<String>>,
    max_request_body: ByteSize,
    max_connections: Spanned<usize>,
    shutdown_grace: HumanDuration,
    workers: Option<Spanned<usize>>,
}

impl Default for ServerFile {
    fn default() -> Self {
        Self {
            listen: unspanned("0.0.0.0:8080".into()),
            tls_cert: None,
            tls_key: None,
            redirect_http_listen: None,
            redirect_https_port: None,
            redirect_serves_probe: false,
            header_read_timeout: unspanned(HumanDuration(Duration::from_secs(10))),
            trusted_proxies: Vec::new(),
            max_request_body: ByteSize::mib(64),
            max_connections: unspanned(10_000),
            shutdown_grace: HumanDuration(Duration::from_secs(30)),
            workers: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct UpstreamFile {
    url: Spanned<String>,
    connect_timeout: Spanned<HumanDuration>,
    response_timeout: Spanned<HumanDuration>,
    idle_timeout: Spanned<HumanDuration>,
    ca_file: Option<Spanned<String>>,
    preset: Option<Spanned<String>>,
    sse_keepalive: Option<Spanned<HumanDuration>>,
}

impl Default for UpstreamFile {
    fn default() -> Self {
        Self {
            url: unspanned("http://127.0.0.1:8000".into()),
            connect_timeout: unspanned(HumanDuration(Duration::from_secs(5))),
            response_timeout: unspanned(HumanDuration(Duration::from_secs(600))),
            idle_timeout: unspanned(HumanDuration(Duration::from_secs(300))),
            ca_file: None,
            preset: None,
            sse_keepalive: None,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct AuthFile {
    keys: Vec<Spanned<KeyFile>>,
    identity_header: Option<Spanned<String>>,
    forward_authorization: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    name: String,
    env: Option<String>,
    file: Option<PathBuf>,
    #[serde(default)]
    optional: bool,
    allow: Option<Vec<RuleFile>>,
    routes: Option<Vec<String>>,
    max_concurrent: Option<usize>,
    /// RFC 3339, as a string or a TOML date-time.
    not_after: Option<toml::Value>,
}

/// One `allow` rule as written: `{ methods = ["POST"], path_prefix = "/v1/" }` or
/// `{ methods = ["GET"], path = "/v1/models" }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    methods: Vec<String>,
    path: Option<String>,
    path_prefix: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ProbeFile {
    path: Spanned<String>,
}

impl Default for ProbeFile {
    fn default() -> Self {
        Self {
            path: unspanned("/health".into()),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct PublicFile {
    paths: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InjectFile {
    name: String,
    /// A template: `${NAME}` is the environment variable NAME, `$$` a literal `$`.
    value: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminFile {
    listen: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CorsFile {
    #[serde(default)]
    allow_origins: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LogFile {
    format: LogFormat,
    level: Spanned<String>,
}

impl Default for LogFile {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            level: unspanned("info".into()),
        }
    }
}

/// A duration written the human way: "10s", "5m", "1h 30m".
struct HumanDuration(Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        humantime_serde::deserialize(d).map(HumanDuration)
    }
}

fn unspanned<T>(value: T) -> Spanned<T> {
    Spanned::new(0..0, value)
}

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
    pub log: Log,
    /// The time source for key expiry; tests put in their own.
    pub clock: Clock,
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
    /// Client TLS settings for an `https://` upstream.
    pub tls: Option<Arc<ClientConfig>>,
    /// Where the upstream's trusted roots come from, for the summary.
    pub ca_file: Option<PathBuf>,
    /// The server preset whose route table is enforced; `None` forwards every route.
    pub preset: Option<&'static Preset>,
    /// How long a `text/event-stream` response may be silent before a comment is sent.
    pub sse_keepalive: Option<Duration>,
}

#[derive(Debug)]
pub struct Auth {
    pub keys: KeySet,
    /// The keys read from files, re-read on SIGHUP.
    pub file_keys: Vec<FileKey>,
    /// `optional` keys whose secret was not set, with their rules; they admit nobody.
    pub absent_optional: Vec<(String, Arc<Policy>)>,
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

impl Config {
    /// A human summary for `keygate check` and the start-up log: names and addresses only,
    /// never a secret value.
    pub fn summary(&self) -> String {
        let list = |items: &mut dyn Iterator<Item = &str>| {
            let joined = items.collect::<Vec<_>>().join(", ");
            if joined.is_empty() {
                "none".to_owned()
            } else {
                joined
            }
        };
        let mut keys = list(&mut self.auth.keys.names());
        for (name, _) in &self.auth.absent_optional {
            keys.push_str(&format!(", {name} (optional, not set)"));
        }
        let u = &self.upstream;
        let tls = self.server.tls.as_ref().map_or_else(
            || "off (plain HTTP/1.1 and h2c)".to_owned(),
            |t| {
                format!(
                    "{}: {}; ALPN h2, http/1.1; reloaded on SIGHUP",
                    t.cert.display(),
                    t.certificate.expiry()
                )
            },
        );
        let redirect = self.server.redirect.as_ref().map_or_else(
            || "none".to_owned(),
            |r| {
                let probe = if r.serves_probe {
                    "probe answered"
                } else {
                    "probe redirected too"
                };
                format!("{} -> https port {} ({probe})", r.listen, r.https_port)
            },
        );
        let roots = match (&u.tls, &u.ca_file) {
            (None, _) => String::new(),
            (Some(_), Some(ca)) => format!(" (trusting {})", ca.display()),
            (Some(_), None) => " (trusting the webpki roots)".to_owned(),
        };
        let preset = u.preset.map_or_else(
            || "none (every route is forwarded)".to_owned(),
            |preset| {
                let (inference, admin) = preset.counts();
                format!(
                    "{}: {inference} inference and {admin} admin routes, anything else refused; from {}",
                    preset.name, preset.source
                )
            },
        );
        let mut limits = String::new();
        let absent = self
            .auth
            .absent_optional
            .iter()
            .map(|(n, p)| (n.as_str(), &**p));
        let policies = self.auth.keys.policies().map(|(n, p)| (&**n, p));
        for (name, policy) in policies.chain(absent) {
            if let Some(line) = policy_summary(policy, u.preset.is_some(), self.clock.now()) {
                limits.push_str(&format!("\n{:<17}{line}", format!("key {name}:")));
            }
        }
        format!(
            "listen:          {}\n\
             tls:             {tls}\n\
             redirect:        {redirect}\n\
             upstream:        {}://{}{}{roots}\n\
             keys:            {keys}{limits}\n\
             preset:          {preset}\n\
             sse keep-alive:  {}\n\
             identity header: {}\n\
             probe path:      {}\n\
             public paths:    {}\n\
             injected:        {}\n\
             trusted proxies: {}\n\
             cors origins:    {}\n\
             admin listener:  {}\n\
             key files:       {}",
            self.server.listen,
            u.scheme,
            u.authority,
            u.path_prefix,
            u.sse_keepalive.map_or_else(
                || "off (error events only)".to_owned(),
                |k| humantime::format_duration(k).to_string()
            ),
            self.auth
                .identity_header
                .as_ref()
                .map_or("none", |h| h.as_str()),
            self.probe_path,
            list(&mut self.public_paths.iter().map(String::as_str)),
            list(&mut self.inject.iter().map(|i| i.name.as_str())),
            list(
                &mut self
                    .server
                    .trusted_proxies
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .iter()
                    .map(String::as_str)
            ),
            list(&mut self.cors_origins.iter().filter_map(|o| o.to_str().ok())),
            self.admin
                .map_or_else(|| "none".to_owned(), |a| a.to_string()),
            if self.auth.file_keys.is_empty() {
                "none"
            } else {
                "re-read on SIGHUP"
            },
        )
    }
}

/// One key's scope and limits for the summary, or `None` for a key without any.
fn policy_summary(policy: &Policy, preset: bool, now: SystemTime) -> Option<String> {
    let mut parts = Vec::new();
    if preset {
        parts.push(format!("routes {}", policy.routes));
    }
    if !policy.allow.is_empty() {
        let rules: Vec<String> = policy.allow.iter().map(ToString::to_string).collect();
        parts.push(format!("allow {}", rules.join(", ")));
    }
    if let Some(n) = policy.max_concurrent() {
        parts.push(format!("max_concurrent {n}"));
    }
    if let Some(t) = policy.not_after {
        let left = match t.duration_since(now) {
            Ok(left) if !left.is_zero() => format!("{} days left", left.as_secs() / 86_400),
            _ => "expired: refused".to_owned(),
        };
        parts.push(format!(
            "not_after {} ({left})",
            humantime::format_rfc3339_seconds(t)
        ));
    }
    let default_routes = !preset || policy.routes == Classes::default();
    (parts.len() > usize::from(preset) || !default_routes).then(|| parts.join("; "))
}

// ---------------------------------------------------------------- errors

/// Everything wrong with one config file.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

/// One problem: where it is, which key, and what to do.
#[derive(Debug)]
pub struct Problem {
    /// 1-based line and column in the file; `None` for a command-line flag or a missing file.
    pub at: Option<(usize, usize)>,
    /// The key the problem is with; empty when the message names it itself.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match p.at {
                Some((line, col)) => write!(f, "{}:{line}:{col}: ", self.file.display())?,
                None => write!(f, "{}: ", self.file.display())?,
            }
            if !p.key.is_empty() {
                write!(f, "{}: ", p.key)?;
            }
            f.write_str(&p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Collects problems with their positions in the source text.
struct Problems<'a> {
    source: &'a str,
    list: Vec<Problem>,
}

impl Problems<'_> {
    /// Records a problem at `span` (a byte range of the file); an empty span at 0 means the
    /// value was not in the file (a default or a flag).
    fn at(
        &mut self,
        span: std::ops::Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        let at = (span != (0..0)).then(|| line_col(self.source, span.start));
        self.list.push(Problem {
            at,
            key: key.into(),
            message: message.into(),
        });
    }
}

fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let before = &source[..offset.min(source.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// What the TOML parser reported, in the file's terms: an unknown key names its table and
/// the keys allowed there; a value of the wrong kind names its key and, for a duration or a
/// size, shows how to write one; anything else is a syntax error. Only the parser's message
/// is used, never its Display, which quotes the offending line: a value typed into the file
/// by mistake is not echoed into logs.
fn file_problem(source: &str, e: &toml::de::Error) -> Problem {
    let message = e.message();
    let Some(span) = e.span() else {
        return Problem {
            at: None,
            key: "syntax".into(),
            message: message.to_owned(),
        };
    };
    let at = Some(line_col(source, span.start));
    let place = Place::of(source, span.start);
    let unknown = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once("`, "));
    if let Some((name, expected)) = unknown {
        let line = source.get(..span.start).and_then(|s| s.rsplit('\n').next());
        let in_header = line.is_some_and(|line| line.trim_start().starts_with('['));
        let message = match place.container() {
            Some(container) => format!("unknown key `{name}` in {container}; {expected}"),
            None if in_header => format!("unknown table `{name}`; {expected}"),
            None => format!("unknown key `{name}`; {expected}"),
        };
        return Problem {
            at,
            key: String::new(),
            message,
        };
    }
    let table_at_offset = source
        .get(span.start..)
        .filter(|rest| rest.starts_with('['))
        .and_then(|rest| rest.lines().next())
        .map(|header| header.split('#').next().unwrap_or(header).trim().to_owned());
    let Some(key) = place.value().or(table_at_offset) else {
        return Problem {
            at,
            key: "syntax".into(),
            message: message.to_owned(),
        };
    };
    let message = if message.ends_with("expected a duration") {
        "expected a duration with a unit, such as \"300s\" or \"5m\"".to_owned()
    } else if [
        "parsable string",
        "an integer or string",
        "integer overflow",
    ]
    .iter()
    .any(|size| message.ends_with(&format!("expected {size}")))
    {
        "expected a size, such as \"64MiB\" or \"512KiB\", or a number of bytes".to_owned()
    } else if ["usize", "u16", "u32", "u64"]
        .iter()
        .any(|int| message.ends_with(&format!("expected {int}")))
    {
        "expected a whole number, such as 100".to_owned()
    } else {
        message.to_owned()
    };
    Problem { at, key, message }
}

/// Where a byte offset of the file sits: under which table header, inside which arrays and
/// inline tables (by the keys that hold them), and whether a value starts there.
struct Place {
    /// The header as written, `[server]` or `[[inject]]`; `None` at the top of the file, or
    /// inside a header.
    table: Option<String>,
    /// The keys of the arrays and inline tables the offset is inside, outermost first.
    inside: Vec<String>,
    /// The key whose value starts at the offset.
    key: Option<String>,
}

impl Place {
    /// A light scan of the text before `offset` for headers, keys, brackets, strings and
    /// comments: enough to name the place in a message.
    fn of(source: &str, offset: usize) -> Self {
        let mut chars = source.get(..offset).unwrap_or(source).chars();
        let (mut table, mut inside) = (None, Vec::new());
        let (mut word, mut key) = (String::new(), String::new());
        let (mut in_word, mut after_equals, mut line_start) = (false, false, true);
        while let Some(c) = chars.next() {
            let bare = c.is_ascii_alphanumeric() || c == '_' || c == '-';
            match c {
                '[' if line_start && inside.is_empty() => {
                    let rest = chars.as_str();
                    let Some(end) = rest.find('\n') else {
                        // The offset is in this header: the name of a table, at the top level.
                        return Self {
                            table: None,
                            inside: Vec::new(),
                            key: None,
                        };
                    };
                    let header = rest[..end].split('#').next().unwrap_or_default();
                    table = Some(format!("[{}", header.trim()));
                    chars = rest[end..].chars();
                }
                '#' => {
                    chars.by_ref().find(|&c| c == '\n');
                }
                '"' | '\'' => {
                    while let Some(d) = chars.next() {
                        match d {
                            '\\' if c == '"' => {
                                chars.next();
                            }
                            '\n' => break,
                            d if d == c => break,
                            _ => {}
                        }
                    }
                }
                '[' | '{' => inside.push(key.clone()),
                ']' | '}' => {
                    inside.pop();
                }
                '=' => key.clone_from(&word),
                _ if bare && in_word => word.push(c),
                _ if bare => word = c.to_string(),
                _ => {}
            }
            in_word = bare;
            if !c.is_whitespace() {
                after_equals = c == '=';
            }
            line_start = c == '\n' || c == '#' || (line_start && c.is_whitespace());
        }
        inside.dedup();
        Self {
            table,
            inside,
            key: after_equals.then_some(key),
        }
    }

    /// The table or inline table the offset is in, e.g. `[server]` or `[auth] keys.allow`;
    /// `None` at the top of the file.
    fn container(&self) -> Option<String> {
        let table = self.table.as_deref().unwrap_or_default();
        let name = format!("{table} {}", self.inside.join("."));
        Some(name.trim().to_owned()).filter(|name| !name.is_empty())
    }

    /// The key of the value at the offset, e.g. `[upstream] idle_timeout` or
    /// `[auth] keys.not_after`; a value inside an array is named by its array.
    fn value(&self) -> Option<String> {
        let container = self.container();
        match (&self.key, container) {
            (Some(key), None) => Some(key.clone()),
            (Some(key), Some(container)) if self.inside.is_empty() => {
                Some(format!("{container} {key}"))
            }
            (Some(key), Some(container)) => Some(format!("{container}.{key}")),
            (None, container) => container.filter(|_| !self.inside.is_empty()),
        }
    }
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
        };
        let config = validate(path, file, secrets, &mut p);
        p.list.sort_by_key(|problem| problem.at);
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
    Some(Config {
        file: path.to_owned(),
        admin,
        cors_origins,
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
        clock: Clock::system(),
    })
}

fn server(s: ServerFile, p: &mut Problems<'_>) -> Option<Server> {
    let listen = match s.listen.get_ref().parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(_) => {
            p.at(
                s.listen.span(),
                "[server] listen",
                "is not an IP:port address; write e.g. \"0.0.0.0:8080\" or \"127.0.0.1:8080\"",
            );
            None
        }
    };
    let header_read_timeout = positive(&s.header_read_timeout, "[server] header_read_timeout", p);
    let trusted_proxies = s
        .trusted_proxies
        .iter()
        .filter_map(|cidr| {
            let text = cidr.get_ref();
            let net = text
                .parse::<IpNet>()
                .ok()
                .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from));
            if net.is_none() {
                p.at(
                    cidr.span(),
                    "[server] trusted_proxies",
                    "is not a CIDR or IP address; write e.g. \"10.0.0.0/8\"",
                );
            }
            net
        })
        .collect();
    if *s.max_connections.get_ref() == 0 {
        p.at(
            s.max_connections.span(),
            "[server] max_connections",
            "must be at least 1",
        );
    }
    let workers = match &s.workers {
        Some(w) if *w.get_ref() == 0 => {
            p.at(
                w.span(),
                "[server] workers",
                "must be at least 1; leave it out for one per available core",
            );
            1
        }
        Some(w) => *w.get_ref(),
        None => std::thread::available_parallelism().map_or(1, usize::from),
    };
    let tls = tls_files(&s, p);
    let redirect = listen.and_then(|listen| redirect(&s, listen, tls.is_some(), p));
    Some(Server {
        listen: listen?,
        tls,
        redirect,
        workers,
        header_read_timeout,
        trusted_proxies,
        max_request_body: s.max_request_body.as_u64(),
        max_connections: *s.max_connections.get_ref(),
        shutdown_grace: s.shutdown_grace.0,
    })
}

/// Loads the certificate and key named by `tls_cert` and `tls_key`: both or neither.
fn tls_files(s: &ServerFile, p: &mut Problems<'_>) -> Option<Tls> {
    let (cert, key) = match (&s.tls_cert, &s.tls_key) {
        (None, None) => return None,
        (Some(cert), Some(key)) => (cert, key),
        (Some(given), None) | (None, Some(given)) => {
            p.at(
                given.span(),
                "[server] tls_cert",
                "tls_cert and tls_key go together; set both (PEM chain and its private key) or neither",
            );
            return None;
        }
    };
    let paths = (PathBuf::from(cert.get_ref()), PathBuf::from(key.get_ref()));
    match Certificate::load(&paths.0, &paths.1) {
        Ok(certificate) => Some(Tls {
            cert: paths.0,
            key: paths.1,
            certificate,
        }),
        Err(problem) => {
            let (span, key) = match problem.file {
                tls::Which::Cert => (cert.span(), "[server] tls_cert"),
                tls::Which::Key => (key.span(), "[server] tls_key"),
            };
            p.at(span, key, problem.message);
            None
        }
    }
}

/// The plain listener redirecting to https: only with TLS, on an address of its own.
fn redirect(
    s: &ServerFile,
    listen: SocketAddr,
    tls: bool,
    p: &mut Problems<'_>,
) -> Option<Redirect> {
    let key = "[server] redirect_http_listen";
    let Some(text) = &s.redirect_http_listen else {
        if let Some(port) = &s.redirect_https_port {
            p.at(
                port.span(),
                "[server] redirect_https_port",
                "is used only with redirect_http_listen; set that too or remove this",
            );
        }
        return None;
    };
    let Ok(addr) = text.get_ref().parse::<SocketAddr>() else {
        p.at(
            text.span(),
            key,
            "is not an IP:port address; write e.g. \"0.0.0.0:8081\"",
        );
        return None;
    };
    if !tls && (s.tls_cert.is_none() || s.tls_key.is_none()) {
        p.at(
            text.span(),
            key,
            "redirects to https, so it needs TLS on listen: set tls_cert and tls_key too",
        );
    }
    if same_socket(addr, listen) {
        p.at(
            text.span(),
            key,
            "is the proxy's own address; give the plain listener its own port, e.g. \"0.0.0.0:8081\"",
        );
    }
    let https_port = match &s.redirect_https_port {
        Some(port) if *port.get_ref() == 0 => {
            p.at(
                port.span(),
                "[server] redirect_https_port",
                "must be a port number 1-65535, e.g. 443",
            );
            443
        }
        Some(port) => *port.get_ref(),
        None => listen.port(),
    };
    Some(Redirect {
        listen: addr,
        https_port,
        serves_probe: s.redirect_serves_probe,
    })
}

fn positive(d: &Spanned<HumanDuration>, key: &str, p: &mut Problems<'_>) -> Duration {
    let value = d.get_ref().0;
    if value.is_zero() {
        p.at(d.span(), key, "must be longer than zero, e.g. \"10s\"");
    }
    value
}

fn upstream(u: UpstreamFile, p: &mut Problems<'_>) -> Option<Upstream> {
    let connect_timeout = positive(&u.connect_timeout, "[upstream] connect_timeout", p);
    let response_timeout = positive(&u.response_timeout, "[upstream] response_timeout", p);
    let idle_timeout = positive(&u.idle_timeout, "[upstream] idle_timeout", p);
    let sse_keepalive = u.sse_keepalive.as_ref().map(|k| {
        let every = positive(k, "[upstream] sse_keepalive", p);
        if every >= idle_timeout {
            p.at(
                k.span(),
                "[upstream] sse_keepalive",
                "must be shorter than idle_timeout, which ends a stream whose upstream is silent that long whatever keygate sends; e.g. \"15s\", or raise idle_timeout",
            );
        }
        every
    });
    let preset = u.preset.as_ref().and_then(|name| {
        let found = Preset::named(name.get_ref());
        if found.is_none() && name.get_ref() != "none" {
            let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
            p.at(
                name.span(),
                "[upstream] preset",
                format!(
                    "is not a preset; write one of \"{}\" or \"none\"",
                    names.join("\", \"")
                ),
            );
        }
        found
    });
    let key = "[upstream] url";
    let uri = match u.url.get_ref().parse::<Uri>() {
        Ok(uri) => uri,
        Err(e) => {
            p.at(
                u.url.span(),
                key,
                format!("is not a URL ({e}); write e.g. \"http://127.0.0.1:8000\""),
            );
            return None;
        }
    };
    let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
        p.at(
            u.url.span(),
            key,
            "needs a scheme and host, e.g. \"http://127.0.0.1:8000\"",
        );
        return None;
    };
    if *scheme != Scheme::HTTP && *scheme != Scheme::HTTPS {
        p.at(u.url.span(), key, "must start with http:// or https://");
        return None;
    }
    let ca_file = u.ca_file.as_ref().map(|f| PathBuf::from(f.get_ref()));
    let tls = if *scheme == Scheme::HTTPS {
        match tls::upstream_client(ca_file.as_deref()) {
            Ok(config) => Some(Arc::new(config)),
            Err(why) => {
                let span = u.ca_file.as_ref().map_or(0..0, Spanned::span);
                p.at(span, "[upstream] ca_file", why);
                None
            }
        }
    } else {
        if let Some(f) = &u.ca_file {
            p.at(
                f.span(),
                "[upstream] ca_file",
                "applies to https:// upstreams only; remove it or make the url https://",
            );
        }
        None
    };
    if uri.query().is_some() || authority.as_str().contains('@') {
        p.at(u.url.span(), key, "must not carry a query or user info; give scheme, host, port and an optional path prefix");
        return None;
    }
    Some(Upstream {
        scheme: scheme.clone(),
        authority: authority.clone(),
        path_prefix: uri.path().trim_end_matches('/').to_owned(),
        connect_timeout,
        response_timeout,
        idle_timeout,
        tls,
        ca_file,
        preset,
        sse_keepalive,
    })
}

fn auth(
    a: AuthFile,
    inject: &[Injected],
    preset: Option<&Preset>,
    secrets: &dyn SecretSource,
    p: &mut Problems<'_>,
) -> Option<Auth> {
    let mut keys: Vec<NamedKey> = Vec::new();
    // Where each key with a value is written, for a clash of values.
    let mut spans = Vec::new();
    let mut absent_optional = Vec::new();
    let mut file_keys = Vec::new();
    for entry in &a.keys {
        let k = entry.get_ref();
        let key = format!("[auth] keys (name = \"{}\")", k.name);
        if !valid_key_name(&k.name) {
            p.at(
                entry.span(),
                &key,
                "name must be 1-64 characters of A-Z a-z 0-9 . _ -",
            );
        } else if keys.iter().any(|named| named.name == k.name)
            || absent_optional.iter().any(|(n, _)| *n == k.name)
        {
            p.at(
                entry.span(),
                &key,
                "this name is used twice; every key needs its own name",
            );
        }
        let policy = Arc::new(policy(k, preset, &mut |why| p.at(entry.span(), &key, why)));
        let source = match (&k.env, &k.file) {
            (Some(var), None) => KeySource::Env(var.clone()),
            (None, Some(path)) => {
                file_keys.push(FileKey {
                    name: k.name.clone(),
                    path: path.clone(),
                    optional: k.optional,
                    stamp: FileStamp::of(path),
                    policy: policy.clone(),
                });
                KeySource::File(path.clone())
            }
            _ => {
                p.at(
                    entry.span(),
                    &key,
                    "give exactly one of env = \"VAR\" or file = \"/path\"",
                );
                continue;
            }
        };
        match resolve_key(&source, k.optional, secrets) {
            Ok(Some(secret)) => {
                spans.push((k.name.clone(), entry.span()));
                keys.push(NamedKey {
                    name: k.name.clone(),
                    origin: source.to_string(),
                    secret,
                    policy,
                });
            }
            Ok(None) => absent_optional.push((k.name.clone(), policy)),
            Err(why) => p.at(entry.span(), &key, why),
        }
    }
    if a.keys.is_empty() {
        p.at(0..0, "[auth] keys", "no keys are configured, so nobody could be admitted; add e.g. keys = [{ name = \"default\", env = \"API_KEY\" }]");
    } else if keys.is_empty() && p.list.is_empty() {
        p.at(
            0..0,
            "[auth] keys",
            "every key is optional and none is set, so nobody could be admitted; set at least one",
        );
    }
    let identity_header = a.identity_header.as_ref().and_then(|h| {
        let key = "[auth] identity_header";
        let name = header_name(h, key, p)?;
        if inject.iter().any(|i| i.name == name) {
            p.at(
                h.span(),
                key,
                "is also an [[inject]] name; pick a different header",
            );
        }
        Some(name)
    });
    let keys = KeySet::new(keys).map_err(|clashes| {
        for clash in clashes {
            let later = &clash.second.0;
            let span = spans
                .iter()
                .find(|(name, _)| **name == **later)
                .map_or(0..0, |(_, span)| span.clone());
            p.at(
                span,
                format!("[auth] keys (name = \"{later}\")"),
                clash.to_string(),
            );
        }
    });
    Some(Auth {
        keys: keys.ok()?,
        file_keys,
        absent_optional,
        identity_header,
        forward_authorization: a.forward_authorization,
    })
}

/// A key's scope and limits, from its `allow`, `routes`, `max_concurrent` and `not_after`.
fn policy(k: &KeyFile, preset: Option<&Preset>, problem: &mut dyn FnMut(String)) -> Policy {
    let allow = match &k.allow {
        None => Vec::new(),
        Some(rules) if rules.is_empty() => {
            problem("allow = [] lets the key do nothing; give a rule such as { methods = [\"POST\"], path_prefix = \"/v1/\" }, or leave allow out to allow everything".into());
            Vec::new()
        }
        Some(rules) => rules.iter().filter_map(|r| rule(r, problem)).collect(),
    };
    let mut routes = Classes::default();
    if let Some(names) = &k.routes {
        if preset.is_none() {
            problem(
                "routes only applies with a server preset; set [upstream] preset, or remove routes"
                    .into(),
            );
        }
        routes.inference = names.iter().any(|n| n == "inference");
        routes.admin = names.iter().any(|n| n == "admin");
        if let Some(bad) = names
            .iter()
            .find(|n| !matches!(n.as_str(), "inference" | "admin"))
        {
            problem(format!("routes has {bad:?}; use \"inference\" and/or \"admin\", e.g. routes = [\"inference\", \"admin\"]"));
        } else if names.is_empty() {
            problem(
                "routes = [] lets the key use no route; write e.g. routes = [\"inference\"]".into(),
            );
        }
    }
    if k.max_concurrent == Some(0) {
        problem(
            "max_concurrent = 0 admits nothing; give at least 1, or leave it out for no limit"
                .into(),
        );
    }
    let not_after = k.not_after.as_ref().and_then(|v| {
        let text = match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Datetime(d) => d.to_string(),
            _ => String::new(),
        };
        let parsed = humantime::parse_rfc3339(&text).ok();
        if parsed.is_none() {
            problem("not_after is not an RFC 3339 time in UTC; write e.g. not_after = \"2027-01-31T00:00:00Z\"".into());
        }
        parsed
    });
    Policy::new(allow, routes, k.max_concurrent, not_after)
}

fn rule(r: &RuleFile, problem: &mut dyn FnMut(String)) -> Option<Rule> {
    let paths = match (&r.path, &r.path_prefix) {
        (None, None) if r.methods.is_empty() => {
            problem(
                "an allow rule needs methods, a path or path_prefix, or both; leave allow out to allow everything"
                    .into(),
            );
            return None;
        }
        (None, None) => None,
        (Some(path), Some(prefix)) => {
            problem(format!(
                "an allow rule has path or path_prefix, not both; write path = {path:?} for that route alone, or path_prefix = {prefix:?} for that path and the paths below it"
            ));
            return None;
        }
        (Some(path), None) => {
            if !rule_path(path) {
                problem(format!(
                    "path {path:?} must be a plain path: starting with /, without a query, a trailing /, an empty, \".\" or \"..\" segment, a backslash or %2e %2f %5c; e.g. path = \"/v1/models\""
                ));
                return None;
            }
            Some(Paths::Exact(path.clone()))
        }
        (None, Some(prefix)) => {
            let trimmed = prefix.strip_suffix('/').filter(|p| !p.is_empty());
            if !rule_path(trimmed.unwrap_or(prefix)) {
                problem(format!(
                    "path_prefix {prefix:?} must be a plain path: starting with /, without a query, an empty, \".\" or \"..\" segment, a backslash or %2e %2f %5c; e.g. path_prefix = \"/v1/\""
                ));
                return None;
            }
            Some(Paths::Prefix(prefix.clone()))
        }
    };
    let mut methods = Vec::new();
    for m in &r.methods {
        let valid = !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase());
        match http::Method::from_bytes(m.as_bytes()) {
            Ok(method) if valid => methods.push(method),
            _ => {
                problem(format!(
                    "{m:?} in allow is not a method; write it in capitals, e.g. \"POST\""
                ));
                return None;
            }
        }
    }
    Some(Rule { methods, paths })
}

/// A path an `allow` rule can match: plain (see [`crate::policy::preset::plain_path`]) and
/// nothing but a path.
fn rule_path(path: &str) -> bool {
    crate::policy::preset::plain_path(path)
        && path
            .parse::<http::uri::PathAndQuery>()
            .is_ok_and(|pq| pq.query().is_none() && pq.path() == path)
}

fn valid_key_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A key whose value lives in a file.
#[derive(Debug, Clone)]
pub struct FileKey {
    pub name: String,
    pub path: PathBuf,
    pub optional: bool,
    /// The file as it was just before it was read, so a change made after that is noticed.
    pub stamp: Option<FileStamp>,
    /// What the key may do; the same after every reload.
    pub policy: Arc<Policy>,
}

/// A file's identity and version, as `stat` (following symlinks) reports them: Kubernetes
/// publishes a Secret update by swapping a symlink, which changes the inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    inode: u64,
    modified: Option<std::time::SystemTime>,
    len: u64,
}

impl FileStamp {
    pub fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        Some(Self {
            inode: meta.ino(),
            modified: meta.modified().ok(),
            len: meta.len(),
        })
    }
}

/// Files watched for a change (a new inode, as when Kubernetes or cert-manager swaps a
/// mounted Secret, a new modification time or length). Cheap: one `stat` per file and look.
#[derive(Debug)]
pub struct WatchedFiles {
    /// Each file, and what it looked like at the last look.
    files: Mutex<Vec<(PathBuf, Option<FileStamp>)>>,
}

impl WatchedFiles {
    /// Each path with its stamp from when the file was last read.
    pub fn new(files: Vec<(PathBuf, Option<FileStamp>)>) -> Self {
        Self {
            files: Mutex::new(files),
        }
    }

    /// Whether any of the files changed since the last look; this look counts as seen.
    pub fn changed(&self) -> bool {
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        let mut changed = false;
        for (path, seen) in files.iter_mut() {
            let now = FileStamp::of(path);
            changed |= *seen != now;
            *seen = now;
        }
        changed
    }
}

enum KeySource {
    Env(String),
    File(PathBuf),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Env(var) => write!(f, "environment variable {var}"),
            Self::File(path) => write!(f, "file {}", path.display()),
        }
    }
}

/// A key's value: `Ok(None)` for an optional key that is not set (an empty variable or file
/// counts as not set), `Err` with what is wrong and what to do.
fn resolve_key(
    source: &KeySource,
    optional: bool,
    secrets: &dyn SecretSource,
) -> Result<Option<Secret>, String> {
    let found = match source {
        KeySource::Env(var) => Ok(secrets.env(var)),
        KeySource::File(path) => secrets.file(path).map(Some),
    };
    let origin = source.to_string();
    match found.map(|s| s.filter(|s| !s.expose().is_empty())) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && optional => Ok(None),
        Err(e) => Err(format!("cannot read the {origin}: {e}")),
        Ok(None) if optional => Ok(None),
        Ok(None) => Err(format!(
            "the {origin} is not set or is empty; set it, or mark the key optional = true"
        )),
        Ok(Some(secret)) => match key_problem(&secret) {
            Some(why) => Err(format!("the key in the {origin} {why}")),
            None => Ok(Some(secret)),
        },
    }
}

/// The key set after re-reading the key files (SIGHUP or a changed file): environment keys
/// stay as loaded at start-up, file keys take the files' current values. Any problem, two
/// keys with one value included, leaves `current` in force.
pub fn reload_file_keys(
    current: &KeySet,
    file_keys: &[FileKey],
    secrets: &dyn SecretSource,
) -> Result<KeySet, String> {
    let mut fresh = Vec::new();
    let mut problems = Vec::new();
    for k in file_keys {
        let source = KeySource::File(k.path.clone());
        match resolve_key(&source, k.optional, secrets) {
            Ok(Some(secret)) => fresh.push(NamedKey {
                name: k.name.clone(),
                origin: source.to_string(),
                secret,
                policy: k.policy.clone(),
            }),
            Ok(None) => {}
            Err(why) => problems.push(format!("key \"{}\": {why}", k.name)),
        }
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    let keys = current
        .replacing(|name| file_keys.iter().any(|k| k.name == name), fresh)
        .map_err(|clashes| {
            let clashes: Vec<String> = clashes.iter().map(ToString::to_string).collect();
            clashes.join("; ")
        })?;
    if keys.is_empty() {
        return Err("no key would be left to admit anyone".into());
    }
    Ok(keys)
}

/// Why a key value cannot be used, without revealing any of it.
fn key_problem(secret: &Secret) -> Option<&'static str> {
    let value = secret.expose();
    if value.len() < MIN_KEY_BYTES {
        Some("is shorter than 16 bytes; generate one with `keygate keygen`")
    } else if !value.bytes().all(|b| b.is_ascii_graphic()) {
        Some("contains spaces or control characters, which no client can send; generate one with `keygate keygen`")
    } else {
        None
    }
}

fn header_name(h: &Spanned<String>, key: &str, p: &mut Problems<'_>) -> Option<HeaderName> {
    match HeaderName::from_bytes(h.get_ref().to_ascii_lowercase().as_bytes()) {
        Ok(name) => Some(name),
        Err(_) => {
            p.at(
                h.span(),
                key,
                "is not a valid header name; use letters, digits and -",
            );
            None
        }
    }
}

fn inject(
    entries: &[Spanned<InjectFile>],
    secrets: &dyn SecretSource,
    p: &mut Problems<'_>,
) -> Vec<Injected> {
    let mut out: Vec<Injected> = Vec::new();
    for entry in entries {
        let i = entry.get_ref();
        let key = format!("[[inject]] (name = \"{}\")", i.name);
        let Ok(name) = HeaderName::from_bytes(i.name.to_ascii_lowercase().as_bytes()) else {
            p.at(
                entry.span(),
                &key,
                "name is not a valid header name; use letters, digits and -",
            );
            continue;
        };
        let reserved = HOP_BY_HOP
            .iter()
            .chain(&REQUEST_REPLACED)
            .chain(&FORWARDING)
            .chain([&X_REQUEST_ID, &http::header::CONTENT_LENGTH])
            .any(|r| *r == name);
        if reserved {
            p.at(
                entry.span(),
                &key,
                "keygate manages this header itself and cannot inject it; pick another name",
            );
            continue;
        }
        if out.iter().any(|o| o.name == name) {
            p.at(
                entry.span(),
                &key,
                "this header is injected twice; keep one entry",
            );
            continue;
        }
        let value_key = format!("{key} value");
        let value = match expand(i.value.get_ref(), secrets) {
            Ok(v) => v,
            Err(why) => {
                p.at(i.value.span(), &value_key, why);
                continue;
            }
        };
        match HeaderValue::from_str(value.expose()) {
            Ok(mut v) => {
                v.set_sensitive(true);
                out.push(Injected { name, value: v });
            }
            Err(_) => p.at(
                i.value.span(),
                &value_key,
                "contains characters not allowed in a header (after ${...} expansion), such as a newline",
            ),
        }
    }
    out
}

/// Expands `${NAME}` from the environment and `$$` to a literal `$`. Any other `$` is an
/// error: `$NAME` without braces looks like a variable but would reach the origin as written.
fn expand(template: &str, secrets: &dyn SecretSource) -> Result<Secret, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        if let Some(after) = after.strip_prefix('$') {
            out.push('$');
            rest = after;
            continue;
        }
        let Some(after) = after.strip_prefix('{') else {
            return Err(unbraced(after));
        };
        let end = after.find('}').ok_or_else(|| {
            "has a \"${\" without a closing \"}\"; write ${NAME}, or $$ for a literal $".to_owned()
        })?;
        let var = &after[..end];
        let valid = !var.is_empty()
            && !var.starts_with(|c: char| c.is_ascii_digit())
            && var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(format!(
                "\"${{{var}}}\" is not an environment variable name; use letters, digits and _"
            ));
        }
        match secrets.env(var) {
            Some(v) if !v.expose().is_empty() => out.push_str(v.expose()),
            _ => {
                return Err(format!(
                "uses ${{{var}}}, but the environment variable {var} is not set or empty; set it"
            ))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(Secret::new(out))
}

/// The problem with a `$` followed by neither `{` nor `$`; `after` is the text after it. The
/// name is repeated only when it looks like an environment variable (capitals, digits, `_`),
/// so a literal value that happens to hold a `$` is not echoed into the log.
fn unbraced(after: &str) -> String {
    let end = after
        .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
        .unwrap_or(after.len());
    let name = &after[..end];
    if name.starts_with(|c: char| c.is_ascii_uppercase() || c == '_') {
        format!("has ${name} without braces, which would be sent as written; write ${{{name}}} to insert the environment variable {name}, or $${name} for a literal $")
    } else {
        "has a $ that starts no ${NAME}; write ${NAME} to insert an environment variable, or $$ for a literal $".to_owned()
    }
}

/// Whether two listen addresses would collide: same port, and the same IP or a wildcard.
/// Port 0 (an ephemeral port) never does.
fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// `*` or exact origins, `scheme://host[:port]`, as browsers send them in `Origin`.
fn cors_origins(cors: &Spanned<CorsFile>, p: &mut Problems<'_>) -> Vec<HeaderValue> {
    let mut origins = Vec::new();
    for origin in &cors.get_ref().allow_origins {
        let valid = origin == "*"
            || origin.parse::<Uri>().is_ok_and(|u| {
                u.scheme().is_some()
                    && u.authority().is_some()
                    && u.path_and_query().is_none_or(|pq| pq.as_str() == "/")
                    && !origin.ends_with('/')
            });
        match HeaderValue::from_str(origin) {
            Ok(value) if valid => origins.push(value),
            _ => p.at(
                cors.span(),
                "[cors] allow_origins",
                format!("{origin:?} is not an origin; write \"*\" or e.g. \"https://app.example.com\" (scheme, host, optional port, no path)"),
            ),
        }
    }
    origins
}

/// A probe or public path: compared exactly, so it must be an origin-form path.
fn route_path(path: &Spanned<String>, key: &str, p: &mut Problems<'_>) -> String {
    let value = path.get_ref();
    let ok = value.starts_with('/')
        && value
            .parse::<http::uri::PathAndQuery>()
            .is_ok_and(|pq| pq.query().is_none() && pq.path() == value);
    if !ok {
        p.at(
            path.span(),
            key,
            "must be a path starting with / without a query, e.g. \"/health\"",
        );
    }
    value.clone()
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
        assert_eq!(c.auth.keys.names().collect::<Vec<_>>(), ["a"]);
    }

    #[test]
    fn key_file_is_read_and_a_missing_one_is_named() {
        let text = "[auth]\nkeys = [{ name = \"ci\", file = \"/run/secrets/ci\" }]\n";
        let c = parse(
            text,
            &MapSecrets::default().with_file("/run/secrets/ci", KEY),
        )
        .unwrap();
        assert_eq!(c.auth.keys.names().collect::<Vec<_>>(), ["ci"]);
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
        assert!(keys.verify(KEY.as_bytes()).is_some(), "env key kept");
        assert!(keys.verify(b"old-file-key-0123456789").is_none());
        assert_eq!(
            &*keys.verify(b"new-file-key-0123456789").unwrap().name,
            "ci"
        );
        assert_eq!(&*keys.verify(b"added-key-0123456789").unwrap().name, "new");
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
        let (name, policy) = c.auth.keys.policies().next().unwrap();
        assert_eq!(&**name, "default");
        assert!(policy.routes.admin && policy.routes.inference);
        assert_eq!(policy.allow[0].to_string(), "POST below /v1/");
        assert_eq!(policy.max_concurrent(), Some(4));
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
        let (_, policy) = c.auth.keys.policies().next().unwrap();
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
}
