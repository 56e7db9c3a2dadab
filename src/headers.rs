//! Header names and values used on every request, built once as constants, the static
//! hop-by-hop list of RFC 9110 §7.6.1, and the tokens of `Connection`.

use http::header::{
    HeaderName, CONNECTION, EXPECT, HOST, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE,
};
use http::HeaderMap;

pub(crate) const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(crate) const FORWARDED: HeaderName = HeaderName::from_static("forwarded");
pub(crate) const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub(crate) const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// OpenAI's rate-limit headers: `[requests, tokens]` of each.
pub(crate) const X_RATELIMIT_LIMIT: [HeaderName; 2] = [
    HeaderName::from_static("x-ratelimit-limit-requests"),
    HeaderName::from_static("x-ratelimit-limit-tokens"),
];
pub(crate) const X_RATELIMIT_REMAINING: [HeaderName; 2] = [
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
];
pub(crate) const X_RATELIMIT_RESET: [HeaderName; 2] = [
    HeaderName::from_static("x-ratelimit-reset-requests"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
];

pub(crate) const BEARER_CHALLENGE: &str = r#"Bearer realm="keygate""#;
pub(crate) const BEARER_CHALLENGE_INVALID_TOKEN: &str =
    r#"Bearer realm="keygate", error="invalid_token""#;
/// RFC 6750 §3.1: a valid token without the scope the request needs (403).
pub(crate) const BEARER_CHALLENGE_INSUFFICIENT_SCOPE: &str =
    r#"Bearer realm="keygate", error="insufficient_scope""#;

/// Headers that describe one connection, never the message (RFC 9110 §7.6.1), plus the
/// proxy-only authentication pair, which is meant for the hop it arrives on. A proxy removes
/// them in both directions, together with every header the `Connection` header names.
pub(crate) const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
];

/// Request headers keygate sets itself or that must not pass to the upstream as the client sent
/// them: `Host` is rewritten to the upstream authority, `Expect` is answered by keygate.
pub(crate) const REQUEST_REPLACED: [HeaderName; 2] = [HOST, EXPECT];

/// The client-supplied forwarding headers: replaced unless the peer is a trusted proxy.
pub(crate) const FORWARDING: [HeaderName; 4] = [
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    FORWARDED,
];

/// The comma-separated tokens of every `Connection` field, trimmed. Split as bytes: one odd
/// byte in a field must not hide the valid tokens beside it.
pub(crate) fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
}
