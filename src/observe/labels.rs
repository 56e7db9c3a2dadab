//! The label sets of keygate's Prometheus series, and the bounded values they take: a key's
//! name from the config (or `-`), a method class, a status code, fixed reason words. The
//! `model` label's values are minted in [`crate::observe::model_labels`].
//! [`crate::observe::metrics`] builds its series on these when a request is counted or a
//! scrape samples a gauge.

use std::sync::{Arc, OnceLock};

use http::Method;
use prometheus_client::encoding::EncodeLabelSet;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    pub(crate) key: Arc<str>,
    pub(crate) method: &'static str,
    pub(crate) status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabels {
    pub(crate) reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KeyLabels {
    pub(crate) key: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KeyReasonLabels {
    pub(crate) key: Arc<str>,
    pub(crate) reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TokenLabels {
    pub(crate) key: Arc<str>,
    pub(crate) model: Arc<str>,
    pub(crate) kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabels {
    pub(crate) kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabels {
    pub(crate) outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct BuildLabels {
    pub(crate) version: &'static str,
}

/// The `key` label: the key's name, or `-` for a request without one.
pub(crate) fn key_label(key: Option<&Arc<str>>) -> &Arc<str> {
    static NO_KEY: OnceLock<Arc<str>> = OnceLock::new();
    key.unwrap_or_else(|| NO_KEY.get_or_init(|| Arc::from("-")))
}

/// The `method` label: the standard methods by name, any other as `other`, so a client
/// cannot add series by inventing methods.
pub(crate) fn method_class(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}
