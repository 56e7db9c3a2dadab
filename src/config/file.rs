//! The config file as written: serde structs that mirror the TOML tables, unknown keys refused.

use super::*;

// ---------------------------------------------------------------- the file, as written

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    #[serde(default)]
    pub(super) server: ServerFile,
    #[serde(default)]
    pub(super) upstream: UpstreamFile,
    #[serde(default)]
    pub(super) auth: AuthFile,
    #[serde(default)]
    pub(super) probe: ProbeFile,
    #[serde(default)]
    pub(super) public: PublicFile,
    #[serde(default)]
    pub(super) inject: Vec<Spanned<InjectFile>>,
    pub(super) admin: Option<Spanned<AdminFile>>,
    pub(super) cors: Option<Spanned<CorsFile>>,
    #[serde(default)]
    pub(super) limits: LimitsFile,
    #[serde(default)]
    pub(super) log: LogFile,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct ServerFile {
    pub(super) listen: Spanned<String>,
    pub(super) tls_cert: Option<Spanned<String>>,
    pub(super) tls_key: Option<Spanned<String>>,
    pub(super) redirect_http_listen: Option<Spanned<String>>,
    pub(super) redirect_https_port: Option<Spanned<u16>>,
    pub(super) redirect_serves_probe: bool,
    pub(super) header_read_timeout: Spanned<HumanDuration>,
    pub(super) trusted_proxies: Vec<Spanned<String>>,
    pub(super) max_request_body: ByteSize,
    pub(super) max_connections: Spanned<usize>,
    pub(super) shutdown_grace: HumanDuration,
    pub(super) workers: Option<Spanned<usize>>,
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
pub(super) struct UpstreamFile {
    pub(super) url: Spanned<String>,
    pub(super) connect_timeout: Spanned<HumanDuration>,
    pub(super) response_timeout: Spanned<HumanDuration>,
    pub(super) idle_timeout: Spanned<HumanDuration>,
    pub(super) ca_file: Option<Spanned<String>>,
    pub(super) preset: Option<Spanned<String>>,
    pub(super) sse_keepalive: Option<Spanned<HumanDuration>>,
    pub(super) max_in_flight: Option<Spanned<i64>>,
    pub(super) queue_timeout: Spanned<HumanDuration>,
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
            max_in_flight: None,
            queue_timeout: unspanned(HumanDuration(Duration::from_secs(30))),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct AuthFile {
    pub(super) keys: Vec<Spanned<KeyFile>>,
    /// A file of more keys, stored as digests, re-read live.
    pub(super) registry: Option<Spanned<PathBuf>>,
    pub(super) identity_header: Option<Spanned<String>>,
    pub(super) forward_authorization: bool,
}

/// One key as written, in `[auth] keys` or in the registry: a name, where its value comes
/// from, and its policy. The registry reads its entries with this same struct, so every
/// policy field a key can have in the config it can have there; `registry` refuses the
/// value sources (`env`, `file`, `optional`) and the config refuses `sha256`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KeyFile {
    pub(super) name: String,
    pub(super) env: Option<String>,
    pub(super) file: Option<PathBuf>,
    pub(super) optional: Option<bool>,
    /// The SHA-256 of the key, in lower-case hex: registry entries only.
    pub(super) sha256: Option<String>,
    pub(super) allow: Option<Vec<RuleFile>>,
    pub(super) routes: Option<Vec<String>>,
    pub(super) max_concurrent: Option<usize>,
    pub(super) requests_per_minute: Option<i64>,
    pub(super) tokens_per_minute: Option<i64>,
    /// The key's share of the upstream under `[upstream] max_in_flight`.
    pub(super) weight: Option<i64>,
    /// The models the key may name in a request body: exact names or a trailing `*`.
    pub(super) models: Option<Vec<String>>,
    /// RFC 3339, as a string or a TOML date-time.
    pub(super) not_after: Option<toml::Value>,
}

/// One `allow` rule as written: `{ methods = ["POST"], path_prefix = "/v1/" }` or
/// `{ methods = ["GET"], path = "/v1/models" }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RuleFile {
    #[serde(default)]
    pub(super) methods: Vec<String>,
    pub(super) path: Option<String>,
    pub(super) path_prefix: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct ProbeFile {
    pub(super) path: Spanned<String>,
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
pub(super) struct PublicFile {
    pub(super) paths: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InjectFile {
    pub(super) name: String,
    /// A template: `${NAME}` is the environment variable NAME, `$$` a literal `$`.
    pub(super) value: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AdminFile {
    pub(super) listen: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CorsFile {
    #[serde(default)]
    pub(super) allow_origins: Vec<String>,
}

/// `[limits]` as written; every setting but `redis` needs `redis`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct LimitsFile {
    /// A template like an injected value: `${NAME}` from the environment, for a password.
    pub(super) redis: Option<Spanned<String>>,
    pub(super) prefix: Option<Spanned<String>>,
    pub(super) redis_timeout: Option<Spanned<HumanDuration>>,
    pub(super) on_redis_error: Option<Spanned<String>>,
    pub(super) slot_lease: Option<Spanned<HumanDuration>>,
    pub(super) redis_ca_file: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct LogFile {
    pub(super) format: LogFormat,
    pub(super) level: Spanned<String>,
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
pub(super) struct HumanDuration(pub(super) Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        humantime_serde::deserialize(d).map(HumanDuration)
    }
}

pub(super) fn unspanned<T>(value: T) -> Spanned<T> {
    Spanned::new(0..0, value)
}
