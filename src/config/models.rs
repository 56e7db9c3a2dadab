//! A key's `models` allow-list as configured: exact model names and `prefix*` patterns,
//! checked when the config is loaded. The gateway asks it about the model a request body
//! names ([`crate::policy::models`] reads that model the way the origin does).
//!
//! Names are matched byte for byte. Origins compare names exactly (a dict or hash-map lookup
//! of the served name or LoRA adapter), so case folding or Unicode normalisation here could
//! only make keygate accept a spelling the origin resolves differently, or refuse one it
//! accepts.

use std::fmt;

/// A key's `models`: exact names and `prefix*` patterns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Models {
    exact: Vec<String>,
    prefixes: Vec<String>,
}

/// A `models` list that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatternError {
    /// An empty list would refuse every request; leave `models` out to allow every model.
    EmptyList,
    /// An empty name matches nothing an origin serves.
    EmptyName,
    /// A `*` elsewhere than at the end.
    Star(String),
}

impl fmt::Display for PatternError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EmptyList => f.write_str(
                "an empty list would refuse every request; remove `models` to allow every model",
            ),
            Self::EmptyName => f.write_str("an empty model name; remove it"),
            Self::Star(p) => write!(
                f,
                "`{p}`: `*` may only end a pattern, as in `lora-*`; list the names otherwise"
            ),
        }
    }
}

impl std::error::Error for PatternError {}

impl Models {
    pub fn new<I, S>(patterns: I) -> Result<Self, PatternError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut exact = Vec::new();
        let mut prefixes = Vec::new();
        for p in patterns {
            let p = p.as_ref();
            if p.is_empty() {
                return Err(PatternError::EmptyName);
            }
            match p.find('*') {
                None => exact.push(p.to_owned()),
                Some(star) if star + 1 == p.len() => prefixes.push(p[..star].to_owned()),
                Some(_) => return Err(PatternError::Star(p.to_owned())),
            }
        }
        if exact.is_empty() && prefixes.is_empty() {
            return Err(PatternError::EmptyList);
        }
        Ok(Self { exact, prefixes })
    }

    /// Whether `model` (decoded) is allowed: equal to a name, or starting with a pattern's
    /// prefix (`lora-*` allows `lora-` itself too).
    pub fn allows(&self, model: &str) -> bool {
        self.exact.iter().any(|e| e == model)
            || self.prefixes.iter().any(|p| model.starts_with(p.as_str()))
    }
}

impl fmt::Display for Models {
    /// The names, then the patterns, for `keygate check`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = self.exact.iter().map(String::as_str);
        let patterns = self.prefixes.iter().map(|p| format!("{p}*"));
        let all: Vec<String> = names.map(str::to_owned).chain(patterns).collect();
        f.write_str(&all.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_lists_match_names_and_prefixes_exactly() {
        let m = Models::new(["Qwen/Qwen3-0.6B", "lora-*"]).unwrap();
        for (name, allowed) in [
            ("Qwen/Qwen3-0.6B", true),
            ("lora-a", true),
            ("lora-", true),
            ("lora-é", true),
            ("qwen/qwen3-0.6b", false),
            ("Qwen/Qwen3-0.6B ", false),
            ("Qwen/Qwen3-0.6", false),
            ("lora", false),
            ("LORA-a", false),
            ("", false),
            ("x-lora-a", false),
        ] {
            assert_eq!(m.allows(name), allowed, "{name:?}");
        }
        // NFC and NFD spell the same text with different code points: different names.
        let nfc = Models::new(["caf\u{e9}"]).unwrap();
        assert!(nfc.allows("caf\u{e9}"));
        assert!(!nfc.allows("cafe\u{301}"));
        assert!(Models::new(["*"]).unwrap().allows("anything"));
    }

    #[test]
    fn bad_allow_lists_are_refused_with_the_fix() {
        assert_eq!(
            Models::new(Vec::<String>::new()),
            Err(PatternError::EmptyList)
        );
        assert_eq!(Models::new([""]), Err(PatternError::EmptyName));
        for p in ["lo*ra", "*-lora", "lora-**", "a*b*"] {
            let e = Models::new(["x", p]).unwrap_err();
            assert_eq!(e, PatternError::Star(p.into()));
            assert!(e.to_string().contains("lora-*"), "{e}");
        }
    }
}
