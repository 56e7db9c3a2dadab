//! What one key may do, as configured: its `allow` rules, the preset route classes it may
//! use, its limits and its expiry. Plain data; `policy::scope` and `policy::limits` decide
//! with it.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::SystemTime;

use http::Method;

use crate::config::models::Models;

/// A key's scope and limits. The default allows everything a key could do before scopes
/// existed.
#[derive(Debug, Clone)]
pub struct KeyPolicy {
    /// Any rule must match; empty: every method and path.
    pub allow: Vec<Rule>,
    /// The preset route classes the key may use; only consulted with a preset.
    pub routes: Classes,
    /// Requests and streams the key may have in flight at once, if limited.
    pub max_concurrent: Option<usize>,
    /// Requests and tokens per minute.
    pub rates: KeyLimits,
    /// After this instant the key is refused as invalid.
    pub not_after: Option<SystemTime>,
    /// The key's share of the upstream under `[upstream] max_in_flight`, 1 to
    /// [`MAX_WEIGHT`]: a key of weight 3 is let through three times as often as one of
    /// weight 1 while both wait.
    pub weight: u32,
    /// The models the key may use, if limited: every request body must name one of them.
    pub models: Option<Arc<Models>>,
}

impl Default for KeyPolicy {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            routes: Classes::default(),
            max_concurrent: None,
            rates: KeyLimits::default(),
            not_after: None,
            weight: 1,
            models: None,
        }
    }
}

/// The rates of one key. `None`: not limited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyLimits {
    /// A burst of this many requests, then this many per minute, refilled continuously.
    pub requests_per_minute: Option<NonZeroU32>,
    /// Prompt plus completion tokens, from the responses' usage: a budget of this many,
    /// refilled at this many per minute.
    pub tokens_per_minute: Option<NonZeroU32>,
}

impl KeyLimits {
    pub fn is_unlimited(&self) -> bool {
        self.requests_per_minute.is_none() && self.tokens_per_minute.is_none()
    }
}

/// The largest `weight` a key may have: a thousand times the default share is beyond any
/// real use, and keeps the fair queue's shares exact to within a tenth of a percent.
pub(crate) const MAX_WEIGHT: u32 = 1000;

/// One `allow` rule: the methods (any when empty) and the paths (any when `None`).
#[derive(Debug, Clone)]
pub struct Rule {
    pub methods: Vec<Method>,
    pub paths: Option<Paths>,
}

/// The paths an `allow` rule admits. Only plain paths (see [`crate::path::plain_path`]) ever match, so
/// `/v1/../admin` never counts as under `/v1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Paths {
    /// `path`: this one route.
    Exact(String),
    /// `path_prefix`: this path and the paths below it, on segment boundaries, so that
    /// "/v1/chat/completions" admits "/v1/chat/completions/batch" but not
    /// "/v1/chat/completionsX". Written with a trailing `/`, as "/v1/", the prefix admits
    /// only what is below it: "/v1/models", not "/v1".
    Prefix(String),
}

impl fmt::Display for Paths {
    /// What the paths admit, in words: `check` shows it for every rule.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(path) => write!(f, "{path} exactly"),
            Self::Prefix(prefix) if prefix.len() > 1 && prefix.ends_with('/') => {
                write!(f, "below {prefix}")
            }
            Self::Prefix(prefix) => write!(f, "{prefix} and below"),
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.methods.as_slice() {
            [] => f.write_str("any method")?,
            methods => {
                let names: Vec<&str> = methods.iter().map(Method::as_str).collect();
                f.write_str(&names.join("|"))?;
            }
        }
        match &self.paths {
            Some(paths) => write!(f, " {paths}"),
            None => f.write_str(" any path"),
        }
    }
}

/// The preset route classes a key may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classes {
    pub inference: bool,
    pub admin: bool,
}

impl Default for Classes {
    /// Ordinary keys: inference routes only.
    fn default() -> Self {
        Self {
            inference: true,
            admin: false,
        }
    }
}

impl fmt::Display for Classes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = [(self.inference, "inference"), (self.admin, "admin")]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect();
        f.write_str(&names.join("+"))
    }
}
