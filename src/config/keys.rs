//! `[auth]`: the keys, where each value comes from, and each key's scope and limits; the
//! re-reading of key files, with the key registry (`registry`) they are checked against.

use sha2::Digest;

use super::*;

pub(super) fn auth(
    a: AuthFile,
    inject: &[Injected],
    preset: Option<&'static Preset>,
    secrets: &dyn SecretSource,
    p: &mut Problems<'_>,
) -> Option<Auth> {
    let mut keys: Vec<KeySpec> = Vec::new();
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
        if k.sha256.is_some() {
            p.at(
                entry.span(),
                &key,
                "sha256 belongs in the key registry ([auth] registry = \"/path/keys.toml\"); \
                 a key here takes its value from env = \"VAR\" or file = \"/path\"",
            );
            continue;
        }
        let optional = k.optional.unwrap_or(false);
        let source = match (&k.env, &k.file) {
            (Some(var), None) => KeySource::Env(var.clone()),
            (None, Some(path)) => {
                file_keys.push(FileKey {
                    name: k.name.clone(),
                    path: path.clone(),
                    optional,
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
        match resolve_key(&source, optional, secrets) {
            Ok(Some(secret)) => {
                spans.push((k.name.clone(), entry.span()));
                keys.push(KeySpec {
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
    let registry = a.registry.as_ref().and_then(|path| {
        let config_names = a.keys.iter().map(|k| k.get_ref().name.clone()).collect();
        match Registry::read(path.get_ref(), &keys, config_names, preset, secrets) {
            Ok(registry) => Some(registry),
            Err(Unread::File(why)) => {
                p.at(path.span(), "[auth] registry", why);
                None
            }
            Err(Unread::Problems(problems)) => {
                p.list.extend(problems);
                None
            }
        }
    });
    let registry_keys = registry.as_ref().map_or(0, |r| r.keys.len());
    if a.keys.is_empty() && a.registry.is_none() {
        p.at(0..0, "[auth] keys", "no keys are configured, so nobody could be admitted; add e.g. keys = [{ name = \"default\", env = \"API_KEY\" }]");
    } else if keys.is_empty() && registry_keys == 0 && p.list.is_empty() {
        let why = if a.keys.is_empty() {
            "the registry holds no key and [auth] keys has none, so nobody could be admitted; add one with the entry `keygate keygen --name NAME` prints"
        } else {
            "every key is optional and none is set, so nobody could be admitted; set at least one"
        };
        p.at(0..0, "[auth] keys", why);
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
    let clashes = same_values(&keys);
    for clash in &clashes {
        let later = &clash.second.0;
        let span = spans
            .iter()
            .find(|(name, _)| name == later)
            .map_or(0..0, |(_, span)| span.clone());
        p.at(
            span,
            format!("[auth] keys (name = \"{later}\")"),
            clash.to_string(),
        );
    }
    if !clashes.is_empty() {
        return None;
    }
    Some(Auth {
        keys,
        registry,
        file_keys,
        absent_optional,
        identity_header,
        forward_authorization: a.forward_authorization,
    })
}

/// A key's scope and limits, from its `allow`, `routes`, `max_concurrent`,
/// `requests_per_minute`, `tokens_per_minute`, `not_after`, `weight` and `models`.
pub(super) fn policy(
    k: &KeyFile,
    preset: Option<&Preset>,
    problem: &mut dyn FnMut(String),
) -> KeyPolicy {
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
    let rates = KeyLimits {
        requests_per_minute: rate(k.requests_per_minute, "requests_per_minute", 600, problem),
        tokens_per_minute: rate(k.tokens_per_minute, "tokens_per_minute", 200_000, problem),
    };
    let models = k.models.as_ref().and_then(|names| {
        Models::new(names)
            .map(Arc::new)
            .map_err(|e| problem(format!("models: {e}")))
            .ok()
    });
    KeyPolicy {
        allow,
        routes,
        max_concurrent: k.max_concurrent,
        rates,
        not_after,
        weight: key_weight(k.weight, problem),
        models,
    }
}

/// A per-minute rate of a key: a whole number from 1 to 2^32 - 1, or not limited.
fn rate(
    value: Option<i64>,
    name: &str,
    example: u32,
    problem: &mut dyn FnMut(String),
) -> Option<std::num::NonZeroU32> {
    let value = value?;
    let rate = u32::try_from(value)
        .ok()
        .and_then(std::num::NonZeroU32::new);
    if rate.is_none() {
        problem(format!(
            "{name} must be a whole number from 1 to {}, e.g. {name} = {example}; leave it out for no limit",
            u32::MAX
        ));
    }
    rate
}

pub(super) fn rule(r: &RuleFile, problem: &mut dyn FnMut(String)) -> Option<Rule> {
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

/// A path an `allow` rule can match: plain (see [`crate::path::plain_path`]) and
/// nothing but a path.
pub(super) fn rule_path(path: &str) -> bool {
    crate::path::plain_path(path)
        && path
            .parse::<http::uri::PathAndQuery>()
            .is_ok_and(|pq| pq.query().is_none() && pq.path() == path)
}

pub(super) fn valid_key_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

pub(super) enum KeySource {
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
pub(super) fn resolve_key(
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

/// The keys in force: the config's keys with a value, and the registry as last read.
#[derive(Debug, Clone)]
pub(crate) struct LiveKeys {
    pub configured: Vec<KeySpec>,
    pub registry: Option<Registry>,
}

impl LiveKeys {
    pub(crate) fn new(auth: &Auth) -> Self {
        Self {
            configured: auth.keys.clone(),
            registry: auth.registry.clone(),
        }
    }

    /// Every key as the key check sees it: its name, the SHA-256 of its value, its policy.
    pub(crate) fn digests(&self) -> impl Iterator<Item = (&str, [u8; 32], &Arc<KeyPolicy>)> {
        let configured = self
            .configured
            .iter()
            .map(|k| (k.name.as_str(), k.digest(), &k.policy));
        let registry = self.registry.iter().flat_map(|r| {
            r.keys
                .iter()
                .map(|k| (k.name.as_str(), k.digest, &k.policy))
        });
        configured.chain(registry)
    }

    /// The keys after re-reading the key files and the registry (SIGHUP or a changed file),
    /// checked together: names, values and digests. Any problem in either leaves `self` in
    /// force, and so does a set that would admit nobody.
    pub(crate) fn reload(
        &self,
        file_keys: &[FileKey],
        secrets: &dyn SecretSource,
    ) -> Result<LiveKeys, String> {
        let configured = reload_file_keys(&self.configured, file_keys, secrets);
        let checked_against = configured.as_deref().unwrap_or(&self.configured);
        let registry = self
            .registry
            .as_ref()
            .map(|r| r.reread(checked_against, secrets))
            .transpose();
        match (configured, registry) {
            (Ok(configured), Ok(registry)) => {
                let live = LiveKeys {
                    configured,
                    registry,
                };
                if live.digests().next().is_none() {
                    return Err("no key would be left to admit anyone".into());
                }
                Ok(live)
            }
            (Err(why), Ok(_)) | (Ok(_), Err(why)) => Err(why),
            (Err(files), Err(registry)) => Err(format!("{files}; {registry}")),
        }
    }
}

/// The keys after re-reading the key files: environment keys stay as loaded at start-up,
/// file keys take the files' current values. Any problem, two keys with one value included,
/// leaves `current` in force.
pub(super) fn reload_file_keys(
    current: &[KeySpec],
    file_keys: &[FileKey],
    secrets: &dyn SecretSource,
) -> Result<Vec<KeySpec>, String> {
    let mut keys: Vec<KeySpec> = current
        .iter()
        .filter(|k| !file_keys.iter().any(|f| f.name == k.name))
        .cloned()
        .collect();
    let mut problems = Vec::new();
    for k in file_keys {
        let source = KeySource::File(k.path.clone());
        match resolve_key(&source, k.optional, secrets) {
            Ok(Some(secret)) => keys.push(KeySpec {
                name: k.name.clone(),
                origin: source.to_string(),
                secret,
                policy: k.policy.clone(),
            }),
            Ok(None) => {}
            Err(why) => problems.push(format!("key \"{}\": {why}", k.name)),
        }
    }
    problems.extend(same_values(&keys).iter().map(ToString::to_string));
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    Ok(keys)
}

/// Each later key that has the value of an earlier one, paired with the first such key.
/// Runs at load and reload only, so it compares values plainly.
pub(crate) fn same_values(keys: &[KeySpec]) -> Vec<SameValue> {
    keys.iter()
        .enumerate()
        .filter_map(|(i, later)| {
            let first = keys[..i]
                .iter()
                .find(|k| k.secret.expose() == later.secret.expose())?;
            Some(SameValue {
                first: (first.name.clone(), first.origin.clone()),
                second: (later.name.clone(), later.origin.clone()),
            })
        })
        .collect()
}

/// Two keys with the same value, by name and origin. A request with that value would get
/// the rights of one of them, whichever the key check happens to pick, so a set with such
/// a pair is refused, at start-up and on reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SameValue {
    pub first: (String, String),
    pub second: (String, String),
}

impl fmt::Display for SameValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ((a, a_origin), (b, b_origin)) = (&self.first, &self.second);
        write!(
            f,
            "keys \"{a}\" ({a_origin}) and \"{b}\" ({b_origin}) have the same value, so a client \
             holding it would get the rights of one or the other; give each key its own value \
             (`keygate keygen` prints one)"
        )
    }
}

/// A key with a value, as configured: its name, where the value was read, the value and what
/// the key may do.
#[derive(Debug, Clone)]
pub struct KeySpec {
    pub name: String,
    /// Where the value was read, e.g. "environment variable API_KEY" or "file /run/keys/ci":
    /// named when two keys clash.
    pub origin: String,
    pub secret: Secret,
    pub policy: Arc<KeyPolicy>,
}

impl KeySpec {
    /// The SHA-256 of the key's value: what the key check compares, and all the registry
    /// holds of a key.
    pub fn digest(&self) -> [u8; 32] {
        sha2::Sha256::digest(self.secret.expose().as_bytes()).into()
    }
}

/// Why a key value cannot be used, without revealing any of it.
pub(super) fn key_problem(secret: &Secret) -> Option<&'static str> {
    let value = secret.expose();
    if value.len() < MIN_KEY_BYTES {
        Some("is shorter than 16 bytes; generate one with `keygate keygen`")
    } else if !value.bytes().all(|b| b.is_ascii_graphic()) {
        Some("contains spaces or control characters, which no client can send; generate one with `keygate keygen`")
    } else {
        None
    }
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
    pub policy: Arc<KeyPolicy>,
}
