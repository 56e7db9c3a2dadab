//! The summary `keygate check` prints and the start-up log carries: names and addresses,
//! never secret values, and never a registry key's digest: an operator tells the registry's
//! keys apart by name, and a digest printed into CI and start-up logs would let whoever reads
//! them test guesses of a weak key offline.

use super::*;

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
        let mut keys = list(&mut self.auth.keys.iter().map(|k| k.name.as_str()));
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
        let roots = match (u.tls, &u.ca_file) {
            (false, _) => String::new(),
            (true, Some(ca)) => format!(" (trusting {})", ca.display()),
            (true, None) => " (trusting the webpki roots)".to_owned(),
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
        let policies = self.auth.keys.iter().map(|k| (k.name.as_str(), &*k.policy));
        let registered = self
            .auth
            .registry
            .iter()
            .flat_map(|r| r.keys.iter().map(|k| (k.name.as_str(), &*k.policy)));
        for (name, policy) in policies.chain(absent).chain(registered) {
            if let Some(line) = policy_summary(policy, u.preset.is_some(), SystemTime::now()) {
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
             upstream queue:  {}\n\
             limits:          {}\n\
             identity header: {}\n\
             probe path:      {}\n\
             public paths:    {}\n\
             injected:        {}\n\
             trusted proxies: {}\n\
             cors origins:    {}\n\
             admin listener:  {}\n\
             key files:       {}\n\
             key registry:    {}",
            self.server.listen,
            u.scheme,
            u.authority,
            u.path_prefix,
            u.sse_keepalive.map_or_else(
                || "off (error events only)".to_owned(),
                |k| humantime::format_duration(k).to_string()
            ),
            u.max_in_flight.map_or_else(
                || "off (no max_in_flight: every request is forwarded at once)".to_owned(),
                |n| format!(
                    "max_in_flight {n}, queue_timeout {}; the rest wait, shared by key weight",
                    humantime::format_duration(u.queue_timeout)
                )
            ),
            self.limits.redis.as_ref().map_or_else(
                || "in-process (each replica counts alone)".to_owned(),
                |r| format!("{r}; shared by every replica")
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
            self.auth.registry.as_ref().map_or_else(
                || "none".to_owned(),
                |r| format!(
                    "{}: {}; re-read on SIGHUP and when it changes",
                    r.path.display(),
                    list(&mut r.keys.iter().map(|k| k.name.as_str()))
                )
            ),
        )
    }
}

/// One key's scope and limits for the summary, or `None` for a key without any.
pub(super) fn policy_summary(policy: &KeyPolicy, preset: bool, now: SystemTime) -> Option<String> {
    let mut parts = Vec::new();
    if preset {
        parts.push(format!("routes {}", policy.routes));
    }
    if !policy.allow.is_empty() {
        let rules: Vec<String> = policy.allow.iter().map(ToString::to_string).collect();
        parts.push(format!("allow {}", rules.join(", ")));
    }
    if let Some(models) = &policy.models {
        parts.push(format!("models {models}"));
    }
    if let Some(n) = policy.max_concurrent {
        parts.push(format!("max_concurrent {n}"));
    }
    if let Some(n) = policy.rates.requests_per_minute {
        parts.push(format!("requests_per_minute {n}"));
    }
    if let Some(n) = policy.rates.tokens_per_minute {
        parts.push(format!("tokens_per_minute {n}"));
    }
    if policy.weight != 1 {
        parts.push(format!("weight {}", policy.weight));
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
