//! Per-key scopes, checked by the gateway right after a key is matched: the key's expiry
//! (`not_after`), the classes of preset routes it may use (`routes`) and its `allow` rules.
//! Its concurrency slots and rates are taken next (`policy::admission`), and its `weight` is
//! read when the request waits for the upstream (`policy::fair`).
//!
//! A [`Policy`] pairs a key's [`KeyPolicy`] with the expiry notices already logged for the
//! key's name. A reload that brings a key back builds its new policy with
//! [`Policy::renewed`], which keeps them unless `not_after` changed; the key's slots and
//! rates are kept by its name in the limiter (`policy::limits`), so a reload resets neither.

use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::Method;

pub(crate) use crate::config::key_policy::{Classes, KeyPolicy, Paths, Rule};
use crate::path::plain_path;
use crate::preset::Class;

/// How long before its `not_after` a key's coming expiry is logged.
pub(crate) const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// What one key may do ([`KeyPolicy`], read as a field of this), with the expiry notices
/// already logged.
#[derive(Debug)]
pub struct Policy {
    spec: Arc<KeyPolicy>,
    /// The last expiry notice logged, so each is logged once; shared with the key's policy
    /// before a reload unless the reload changed `not_after`.
    noticed: Arc<AtomicU8>,
}

impl Default for Policy {
    fn default() -> Self {
        Self::new(Arc::default())
    }
}

impl Deref for Policy {
    type Target = KeyPolicy;

    fn deref(&self) -> &KeyPolicy {
        &self.spec
    }
}

impl Rule {
    fn matches(&self, method: &Method, path: &str) -> bool {
        (self.methods.is_empty() || self.methods.contains(method))
            && self.paths.as_ref().is_none_or(|paths| paths.matches(path))
    }
}

impl Paths {
    fn matches(&self, path: &str) -> bool {
        plain_path(path)
            && match self {
                Self::Exact(exact) => path == exact,
                Self::Prefix(prefix) => path.strip_prefix(prefix.as_str()).is_some_and(|rest| {
                    rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/')
                }),
            }
    }
}

impl Classes {
    fn contains(self, class: Class) -> bool {
        match class {
            Class::Inference => self.inference,
            Class::Admin => self.admin,
        }
    }
}

/// An expiry notice to log, at most once each per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Within [`EXPIRY_WARNING`] of `not_after`: this much is left.
    Soon(Duration),
    /// Past `not_after`.
    Expired,
}

impl Policy {
    pub fn new(spec: Arc<KeyPolicy>) -> Self {
        Self {
            spec,
            noticed: Arc::default(),
        }
    }

    /// The policy `spec` for the key that has this policy now (a reload): the expiry
    /// notices given stay given unless `not_after` changed.
    pub fn renewed(&self, spec: Arc<KeyPolicy>) -> Self {
        let noticed = if spec.not_after == self.not_after {
            self.noticed.clone()
        } else {
            Arc::default()
        };
        Self { spec, noticed }
    }

    /// Whether the key is past its `not_after` at `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        self.not_after.is_some_and(|t| now >= t)
    }

    /// Whether the key may send `method` to `path`, whose preset class is `class` (`None`
    /// without a preset).
    pub fn permits(&self, method: &Method, path: &str, class: Option<Class>) -> bool {
        class.is_none_or(|c| self.routes.contains(c))
            && (self.allow.is_empty() || self.allow.iter().any(|r| r.matches(method, path)))
    }

    /// The expiry notice due at `now` that has not been given yet, if any.
    pub fn expiry_notice(&self, now: SystemTime) -> Option<Expiry> {
        let not_after = self.not_after?;
        let (notice, level) = match not_after.duration_since(now) {
            Err(_) | Ok(Duration::ZERO) => (Expiry::Expired, 2),
            Ok(left) if left <= EXPIRY_WARNING => (Expiry::Soon(left), 1),
            Ok(_) => return None,
        };
        (self.noticed.fetch_max(level, Ordering::Relaxed) < level).then_some(notice)
    }
}

/// Where keygate reads the time for key expiry: the system clock, or a test's own.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> SystemTime + Send + Sync>);

impl Clock {
    pub fn system() -> Self {
        Self(Arc::new(SystemTime::now))
    }

    pub fn new(now: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        Self(Arc::new(now))
    }

    pub fn now(&self) -> SystemTime {
        (self.0)()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Clock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: Vec<Rule>, routes: Classes, not_after: Option<SystemTime>) -> Policy {
        Policy::new(Arc::new(KeyPolicy {
            allow,
            routes,
            not_after,
            ..KeyPolicy::default()
        }))
    }

    fn rule(methods: &[Method], paths: Option<Paths>) -> Rule {
        Rule {
            methods: methods.to_vec(),
            paths,
        }
    }

    fn prefix(prefix: &str) -> Option<Paths> {
        Some(Paths::Prefix(prefix.to_owned()))
    }

    #[test]
    fn rules_match_method_and_plain_path_prefix() {
        let p = policy(
            vec![
                rule(&[Method::POST], prefix("/v1/")),
                rule(&[], prefix("/health")),
            ],
            Classes::default(),
            None,
        );
        assert!(p.permits(&Method::POST, "/v1/chat/completions", None));
        assert!(!p.permits(&Method::GET, "/v1/models", None));
        assert!(!p.permits(&Method::POST, "/v2/rerank", None));
        assert!(!p.permits(&Method::POST, "/v1", None));
        assert!(!p.permits(&Method::POST, "/v1/../start_profile", None));
        assert!(!p.permits(&Method::POST, "/v1/%2e%2e/start_profile", None));
        assert!(p.permits(&Method::DELETE, "/health", None));
        assert!(p.permits(&Method::DELETE, "/health/ready", None));
        assert!(!p.permits(&Method::DELETE, "/health_generate", None));
        assert!(Policy::default().permits(&Method::PATCH, "/anything/..", None));
    }

    #[test]
    fn a_prefix_matches_on_segment_boundaries_only() {
        let chat = Paths::Prefix("/v1/chat/completions".into());
        for path in [
            "/v1/chat/completions",
            "/v1/chat/completions/batch",
            "/v1/chat/completions/render",
        ] {
            assert!(chat.matches(path), "{path}");
        }
        for path in [
            "/v1/chat/completionsX",
            "/v1/chat/completions.json",
            "/v1/chat/completions/",
            "/v1/chat/completions//x",
            "/v1/chat/completions/../../start_profile",
            "/v1/chat",
        ] {
            assert!(!chat.matches(path), "{path}");
        }
        let below = Paths::Prefix("/v1/".into());
        assert!(below.matches("/v1/models") && below.matches("/v1/chat/completions"));
        assert!(!below.matches("/v1") && !below.matches("/v1/") && !below.matches("/v10/x"));
        let root = Paths::Prefix("/".into());
        assert!(root.matches("/") && root.matches("/v1/models"));
        assert!(!root.matches("//v1") && !root.matches("/v1/./models"));
    }

    #[test]
    fn an_exact_path_matches_that_path_alone() {
        let models = Paths::Exact("/v1/models".into());
        assert!(models.matches("/v1/models"));
        for path in [
            "/v1/models/",
            "/v1/models/x",
            "/v1/modelsX",
            "/v1",
            "//v1/models",
            "/v1//models",
            "/v1/./models",
            "/v1/x/../models",
            "/v1/%2e/models",
            "/v1%2fmodels",
            "/v1\\models",
            "/V1/models",
        ] {
            assert!(!models.matches(path), "{path}");
        }
    }

    #[test]
    fn a_rule_says_what_it_admits() {
        let cases = [
            (
                rule(&[Method::POST], prefix("/v1/chat/completions")),
                "POST /v1/chat/completions and below",
            ),
            (
                rule(
                    &[Method::GET, Method::HEAD],
                    Some(Paths::Exact("/v1/models".into())),
                ),
                "GET|HEAD /v1/models exactly",
            ),
            (rule(&[], prefix("/v1/")), "any method below /v1/"),
            (rule(&[], prefix("/")), "any method / and below"),
            (rule(&[Method::DELETE], None), "DELETE any path"),
        ];
        for (rule, expected) in cases {
            assert_eq!(rule.to_string(), expected);
        }
    }

    #[test]
    fn preset_classes_need_the_key_to_have_them() {
        let ordinary = Policy::default();
        assert!(ordinary.permits(&Method::POST, "/x", Some(Class::Inference)));
        assert!(!ordinary.permits(&Method::POST, "/x", Some(Class::Admin)));
        let admin_only = policy(
            Vec::new(),
            Classes {
                inference: false,
                admin: true,
            },
            None,
        );
        assert!(admin_only.permits(&Method::POST, "/x", Some(Class::Admin)));
        assert!(!admin_only.permits(&Method::POST, "/x", Some(Class::Inference)));
    }

    #[test]
    fn a_renewed_policy_keeps_its_expiry_notices_unless_not_after_changed() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let expiring = |at: SystemTime| {
            Arc::new(KeyPolicy {
                not_after: Some(at),
                ..KeyPolicy::default()
            })
        };
        let p = Policy::new(expiring(start));
        assert_eq!(p.expiry_notice(start), Some(Expiry::Expired));
        let same = p.renewed(expiring(start));
        assert_eq!(same.expiry_notice(start), None, "given once");
        let extended = same.renewed(expiring(start + EXPIRY_WARNING / 2));
        assert_eq!(
            extended.expiry_notice(start),
            Some(Expiry::Soon(EXPIRY_WARNING / 2)),
            "a new not_after gets its own notices"
        );
    }

    #[test]
    fn expiry_is_noticed_once_when_near_and_once_when_past() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let p = policy(
            Vec::new(),
            Classes::default(),
            Some(start + EXPIRY_WARNING * 2),
        );
        assert_eq!(p.expiry_notice(start), None);
        let near = start + EXPIRY_WARNING + Duration::from_secs(60);
        assert_eq!(
            p.expiry_notice(near),
            Some(Expiry::Soon(EXPIRY_WARNING - Duration::from_secs(60)))
        );
        assert_eq!(p.expiry_notice(near), None);
        assert!(!p.expired(near));
        let past = start + EXPIRY_WARNING * 2;
        assert!(p.expired(past));
        assert_eq!(p.expiry_notice(past), Some(Expiry::Expired));
        assert_eq!(p.expiry_notice(past + EXPIRY_WARNING), None);
    }
}
