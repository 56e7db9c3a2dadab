//! The `model` label of `keygate_tokens_total`: minted per key from the names the requests
//! and the origin's answers carry, at most [`MODEL_LABELS_PER_KEY`] per key, escaped for the
//! exposition format.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

/// The model label values one key may mint on `keygate_tokens_total`; further models are
/// counted under [`OTHER_MODELS`]. Model names come from request bodies and the origin's
/// answers, and llama.cpp answers to any name, so without a bound a client could add series
/// at will.
pub const MODEL_LABELS_PER_KEY: usize = 32;

/// The model label of a key's tokens beyond its [`MODEL_LABELS_PER_KEY`] models, and of a
/// name that holds a control character.
pub(crate) const OTHER_MODELS: &str = "(other)";

/// The model label values each key has minted so far.
#[derive(Debug, Default)]
pub(crate) struct ModelLabels(Mutex<HashMap<Arc<str>, Vec<Arc<str>>>>);

impl ModelLabels {
    /// The label value for `model` among `key`'s, minted if the key has room for one more.
    /// The exposition format is written without escaping, so `\` and `"` are escaped here
    /// and a name with a control character (a line break would start a forged sample) is
    /// never a label.
    pub(crate) fn label(&self, key: &Arc<str>, model: Option<&Arc<str>>) -> Arc<str> {
        static OTHER: OnceLock<Arc<str>> = OnceLock::new();
        let other = || OTHER.get_or_init(|| Arc::from(OTHER_MODELS)).clone();
        let name = model.map_or("-", |m| &**m);
        if name.chars().any(char::is_control) {
            return other();
        }
        let label = if name.contains(['\\', '"']) {
            Cow::Owned(name.replace('\\', "\\\\").replace('"', "\\\""))
        } else {
            Cow::Borrowed(name)
        };
        let mut minted = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let models = minted.entry(key.clone()).or_default();
        if let Some(known) = models.iter().find(|m| ***m == *label) {
            return known.clone();
        }
        if models.len() >= MODEL_LABELS_PER_KEY {
            return other();
        }
        let label: Arc<str> = Arc::from(&*label);
        models.push(label.clone());
        label
    }
}
