//! `[limits]`: where the per-key rates and concurrency slots are kept. Without `redis`, in
//! each process; with it, in a Redis that every replica shares, asked within
//! `redis_timeout`, and what a request gets when Redis does not answer (`on_redis_error`).

use super::*;

/// What a request gets when Redis does not answer within `redis_timeout`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnError {
    /// This process enforces the full limits alone, from what it has used.
    #[default]
    Local,
    /// Refused: 503 with `Retry-After`, and no slot.
    Deny,
}

impl OnError {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Deny => "deny",
        }
    }
}

/// `[limits]`, validated.
#[derive(Debug, Default)]
pub struct Limits {
    /// The Redis every replica shares; `None`: each process keeps its own limits.
    pub redis: Option<SharedLimits>,
}

/// Limits shared through Redis.
#[derive(Debug, Clone)]
pub struct SharedLimits {
    /// The URL with its `${NAME}`s expanded: it may hold a password.
    pub url: Secret,
    /// Where Redis is, without credentials, e.g. `redis:6379 (tls) db 0`.
    pub address: String,
    /// Put before every Redis key keygate writes.
    pub prefix: String,
    /// The longest a request waits for Redis.
    pub timeout: Duration,
    pub on_error: OnError,
    /// How long a concurrency slot outlives a replica that stopped renewing it.
    pub slot_lease: Duration,
    /// `redis_ca_file`: the file, and its PEM, trusted instead of the webpki roots.
    pub ca: Option<(PathBuf, Vec<u8>)>,
}

/// The default `redis_timeout`: a loopback or same-zone Redis answers in well under a
/// millisecond; a request waits no longer than this for one that does not.
const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);
const DEFAULT_PREFIX: &str = "keygate:";
const DEFAULT_SLOT_LEASE: Duration = Duration::from_secs(30);
/// The shortest lease: it is renewed every third of its time.
const MIN_SLOT_LEASE: Duration = Duration::from_secs(1);
const MAX_PREFIX_BYTES: usize = 128;

pub(super) fn limits(l: LimitsFile, secrets: &dyn SecretSource, p: &mut Problems<'_>) -> Limits {
    let Some(redis) = &l.redis else {
        let set = [
            ("prefix", l.prefix.as_ref().map(Spanned::span)),
            ("redis_timeout", l.redis_timeout.as_ref().map(Spanned::span)),
            (
                "on_redis_error",
                l.on_redis_error.as_ref().map(Spanned::span),
            ),
            ("slot_lease", l.slot_lease.as_ref().map(Spanned::span)),
            ("redis_ca_file", l.redis_ca_file.as_ref().map(Spanned::span)),
        ];
        for (name, span) in set {
            if let Some(span) = span {
                p.at(
                    span,
                    format!("[limits] {name}"),
                    "applies only with redis; set redis = \"redis://host:6379/0\" to share the limits between replicas, or remove it",
                );
            }
        }
        return Limits::default();
    };
    let key = "[limits] redis";
    let url = match expand(redis.get_ref(), secrets) {
        Ok(url) => url,
        Err(why) => {
            p.at(redis.span(), key, why);
            return Limits::default();
        }
    };
    let address = match redis_address(url.expose()) {
        Ok(address) => address,
        Err(why) => {
            p.at(redis.span(), key, why);
            return Limits::default();
        }
    };
    let tls = url.expose().starts_with("rediss://");
    let prefix = l.prefix.as_ref().map_or(DEFAULT_PREFIX.to_owned(), |prefix| {
        let text = prefix.get_ref();
        if text.len() > MAX_PREFIX_BYTES || text.chars().any(char::is_control) {
            p.at(
                prefix.span(),
                "[limits] prefix",
                format!("must be at most {MAX_PREFIX_BYTES} bytes without control characters, e.g. \"keygate:prod:\""),
            );
        }
        text.clone()
    });
    let timeout = l.redis_timeout.as_ref().map_or(DEFAULT_TIMEOUT, |t| {
        positive(t, "[limits] redis_timeout", p)
    });
    let on_error = match l.on_redis_error.as_ref() {
        None => OnError::default(),
        Some(e) => match e.get_ref().as_str() {
            "local" => OnError::Local,
            "deny" => OnError::Deny,
            _ => {
                p.at(
                    e.span(),
                    "[limits] on_redis_error",
                    "must be \"local\" (each replica enforces the full limits alone while Redis is away) or \"deny\" (503 with Retry-After)",
                );
                OnError::default()
            }
        },
    };
    let slot_lease = l.slot_lease.as_ref().map_or(DEFAULT_SLOT_LEASE, |lease| {
        let value = lease.get_ref().0;
        if value < MIN_SLOT_LEASE {
            p.at(
                lease.span(),
                "[limits] slot_lease",
                "must be at least 1s (it is renewed every third of its time); e.g. \"30s\"",
            );
        }
        value
    });
    let ca = l.redis_ca_file.as_ref().and_then(|file| {
        let key = "[limits] redis_ca_file";
        if !tls {
            p.at(
                file.span(),
                key,
                "applies to rediss:// only; remove it or make the url rediss://",
            );
            return None;
        }
        let path = PathBuf::from(file.get_ref());
        let read = tls_files::ca_certificates(&path).and_then(|_| {
            std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
        });
        match read {
            Ok(pem) => Some((path, pem)),
            Err(why) => {
                p.at(file.span(), key, why);
                None
            }
        }
    });
    Limits {
        redis: Some(SharedLimits {
            url,
            address,
            prefix,
            timeout,
            on_error,
            slot_lease,
            ca,
        }),
    }
}

/// Where the Redis of `url` is, without credentials: host, port, TLS and database. The
/// reasons a URL is refused never quote it: it may hold a password.
fn redis_address(url: &str) -> Result<String, String> {
    const EXAMPLE: &str = "e.g. \"redis://redis:6379/0\", or \"rediss://:${REDIS_PASSWORD}@redis:6380/0\" with a password from the environment";
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(format!(
            "must start with redis:// or rediss:// (TLS); {EXAMPLE}"
        ));
    }
    if url.contains('#') {
        return Err("must not end in a #fragment: keygate never skips the check of Redis's certificate (#insecure); for a private CA set redis_ca_file, and write a # in a password as %23".to_owned());
    }
    let info = redis::IntoConnectionInfo::into_connection_info(url).map_err(|e| {
        format!("is not a Redis URL ({e}); {EXAMPLE}; characters such as @ / # in a password are written %40 %2F %23")
    })?;
    Ok(address_of(&info))
}

/// Where the Redis of `info` is, without credentials, e.g. `redis:6380 (tls) db 0`: in
/// `keygate check`'s summary and in the limiter's startup line.
pub(crate) fn address_of(info: &redis::ConnectionInfo) -> String {
    let tls = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
    format!(
        "{}{} db {}",
        info.addr(),
        if tls { " (tls)" } else { "" },
        info.redis_settings().db()
    )
}

/// Writes the shared backend under the config's names, as `keygate check` and the limiter's
/// startup line show it: where Redis is (never its password) and how it is used.
pub(crate) fn write_backend(
    f: &mut fmt::Formatter<'_>,
    address: &str,
    prefix: &str,
    timeout: Duration,
    slot_lease: Duration,
    on_error: OnError,
) -> fmt::Result {
    write!(
        f,
        "redis {address}, prefix {prefix:?}, redis_timeout {}, slot_lease {}, on_redis_error {}",
        humantime::format_duration(timeout),
        humantime::format_duration(slot_lease),
        on_error.as_str()
    )
}

impl fmt::Display for SharedLimits {
    /// The backend as `keygate check` shows it; never the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_backend(
            f,
            &self.address,
            &self.prefix,
            self.timeout,
            self.slot_lease,
            self.on_error,
        )?;
        if let Some((path, _)) = &self.ca {
            write!(f, ", trusting {}", path.display())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::secrets::MapSecrets;

    const KEY: &str = "0123456789abcdef0123";

    fn parse(text: &str, secrets: &MapSecrets) -> Result<Config, ConfigError> {
        let text = format!("[auth]\nkeys = [{{ name = \"default\", env = \"API_KEY\" }}]\n{text}");
        Config::parse(
            Path::new("test.toml"),
            &text,
            &Overrides::default(),
            &secrets.clone().with_env("API_KEY", KEY),
        )
    }

    fn errors(text: &str, secrets: &MapSecrets) -> String {
        parse(text, secrets).unwrap_err().to_string()
    }

    #[test]
    fn without_limits_every_process_keeps_its_own() {
        let c = parse("", &MapSecrets::default()).unwrap();
        assert!(c.limits.redis.is_none());
        assert!(
            c.summary()
                .contains("\nlimits:          in-process (each replica counts alone)\n"),
            "{}",
            c.summary()
        );
    }

    #[test]
    fn redis_settings_are_read_with_their_defaults_and_the_password_from_the_environment() {
        let secrets = MapSecrets::default().with_env("REDIS_PASSWORD", "hunter2-secret");
        let c = parse(
            "[limits]\nredis = \"redis://:${REDIS_PASSWORD}@redis.internal:6380/2\"\n",
            &secrets,
        )
        .unwrap();
        let r = c.limits.redis.as_ref().unwrap();
        assert_eq!(
            r.url.expose(),
            "redis://:hunter2-secret@redis.internal:6380/2"
        );
        assert_eq!(r.address, "redis.internal:6380 db 2");
        assert_eq!(r.prefix, "keygate:");
        assert_eq!(r.timeout, Duration::from_millis(50));
        assert_eq!(r.on_error, OnError::Local);
        assert_eq!(r.slot_lease, Duration::from_secs(30));
        let summary = c.summary();
        assert!(
            summary.contains("\nlimits:          redis redis.internal:6380 db 2, prefix \"keygate:\", redis_timeout 50ms, slot_lease 30s, on_redis_error local; shared by every replica\n"),
            "{summary}"
        );
        assert!(!summary.contains("hunter2") && !format!("{c:?}").contains("hunter2"));
        let c = parse(
            "[limits]\nredis = \"rediss://u:p@10.0.0.5/0\"\nprefix = \"kg:prod:\"\nredis_timeout = \"20ms\"\non_redis_error = \"deny\"\nslot_lease = \"10s\"\n",
            &MapSecrets::default(),
        )
        .unwrap();
        let r = c.limits.redis.unwrap();
        assert_eq!(r.address, "10.0.0.5:6379 (tls) db 0");
        assert_eq!(
            (r.prefix.as_str(), r.timeout, r.on_error, r.slot_lease),
            (
                "kg:prod:",
                Duration::from_millis(20),
                OnError::Deny,
                Duration::from_secs(10)
            )
        );
    }

    #[test]
    fn bad_limits_name_the_line_the_key_and_the_fix_and_never_the_url() {
        let secrets = MapSecrets::default().with_env("PW", "hunter2-secret");
        for (table, expected) in [
            (
                "redis = \"http://:${PW}@redis:6379\"",
                "test.toml:4:9: [limits] redis: must start with redis:// or rediss://",
            ),
            (
                "redis = \"redis://:${PW}@\"",
                "test.toml:4:9: [limits] redis: is not a Redis URL",
            ),
            (
                "redis = \"rediss://:${PW}@redis:6379/#insecure\"",
                "test.toml:4:9: [limits] redis: must not end in a #fragment",
            ),
            (
                "redis = \"redis://:${NOPE}@redis:6379\"",
                "test.toml:4:9: [limits] redis: uses ${NOPE}, but the environment variable NOPE is not set",
            ),
            (
                "redis = \"redis://:${PW}@redis:6379/x\"",
                "[limits] redis: is not a Redis URL",
            ),
            (
                "redis = \"redis://redis\"\nredis_timeout = \"0s\"",
                "test.toml:5:17: [limits] redis_timeout: must be longer than zero",
            ),
            (
                "redis = \"redis://redis\"\non_redis_error = \"fail\"",
                "test.toml:5:18: [limits] on_redis_error: must be \"local\"",
            ),
            (
                "redis = \"redis://redis\"\nslot_lease = \"500ms\"",
                "test.toml:5:14: [limits] slot_lease: must be at least 1s",
            ),
            (
                "redis = \"redis://redis\"\nredis_ca_file = \"/ca.pem\"",
                "test.toml:5:17: [limits] redis_ca_file: applies to rediss:// only",
            ),
            (
                "redis = \"rediss://redis\"\nredis_ca_file = \"/nonexistent/ca.pem\"",
                "test.toml:5:17: [limits] redis_ca_file: cannot read /nonexistent/ca.pem",
            ),
            (
                "on_redis_error = \"deny\"",
                "test.toml:4:18: [limits] on_redis_error: applies only with redis",
            ),
            (
                "redis = \"redis://redis\"\nredis_timeout = 50",
                "[limits] redis_timeout: expected a duration with a unit",
            ),
        ] {
            let e = errors(&format!("[limits]\n{table}\n"), &secrets);
            assert!(e.starts_with(expected) || e.contains(expected), "{table}: {e}");
            assert!(!e.contains("hunter2"), "{table}: {e}");
        }
    }
}
