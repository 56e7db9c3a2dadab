//! The one request-error enum. Every way a request can fail short of a proxied response is a
//! variant here; `handler` turns it into exactly one response and one log line.
//!
//! Bodies are JSON in the shape OpenAI client libraries parse
//! (`{"error":{"message","type","code"}}`), constant per variant but for one: a refused model
//! is named in its message, as OpenAI names it, JSON-escaped and at most
//! [`crate::policy::models::MODEL_CAP`] bytes. That name is the client's own input, never a
//! secret of keygate's; no other variant echoes anything the client sent.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use http::{HeaderValue, StatusCode};

use crate::headers::{
    BEARER_CHALLENGE, BEARER_CHALLENGE_INSUFFICIENT_SCOPE, BEARER_CHALLENGE_INVALID_TOKEN,
};

/// Why a request was answered by keygate itself instead of the upstream, or why a proxied
/// stream ended early.
#[derive(Debug)]
pub enum ProxyError {
    /// TRACE or CONNECT: refused on every path before authentication.
    MethodNotAllowed,
    /// No `Authorization` and no `x-api-key` header.
    MissingCredentials,
    /// A credential header that is not one well-formed Bearer token or API key, or two of them.
    MalformedCredentials,
    /// A well-formed token that matches no configured key.
    InvalidCredentials,
    /// A key past its `not_after`. The client sees exactly what an invalid key gets.
    KeyExpired,
    /// A valid key used outside its scope: its `allow` rules or its preset route classes.
    OutOfScope,
    /// A route the server preset does not list: refused even with a valid key.
    RouteNotInPreset,
    /// The key has `max_concurrent` requests and streams in flight already.
    KeyBusy,
    /// The key is over its `requests_per_minute` or `tokens_per_minute`; it would be admitted
    /// after this long.
    RateLimited(Duration),
    /// The shared limits could not be asked within `redis_timeout` and `on_redis_error` is
    /// "deny"; this long is worth waiting before a retry.
    LimitsUnavailable(Duration),
    /// The request target cannot be forwarded (e.g. asterisk-form `OPTIONS *`).
    BadRequest,
    /// The declared or streamed request body is over `max_request_body`.
    BodyTooLarge,
    /// keygate is draining after SIGTERM/SIGINT; the probe says so, and a request waiting
    /// in the upstream queue gets it at once.
    Draining,
    /// No place in flight to the upstream came free within `queue_timeout`.
    QueueTimeout,
    /// The connection was accepted beyond `max_connections`: only the probe is served.
    OverCapacity,
    /// A CORS preflight from an origin not in `[cors] allow_origins`.
    OriginNotAllowed,
    /// The upstream refused the connection, could not be reached, or timed out connecting.
    UpstreamUnreachable(BoxError),
    /// The upstream connection failed after it was established, before response headers.
    UpstreamFailed(hyper::Error),
    /// The upstream answered 101 Switching Protocols to a request that did not ask for a
    /// WebSocket, or switched to another protocol: never passed on.
    UnexpectedUpgrade,
    /// No response headers from the upstream within `response_timeout`.
    UpstreamTimeout,
    /// A streamed upstream body went silent for longer than `idle_timeout`.
    UpstreamIdle,
    /// The upstream's body broke after its headers were forwarded (reset, bad framing).
    UpstreamBody(hyper::Error),
    /// The client's request body ended abnormally (client hung up or sent bad framing).
    ClientBody(BoxError),
    /// A key with `models` named a model outside its list (the name, decoded): never
    /// forwarded.
    ModelNotFound(Box<str>),
    /// A key with `models` sent a request whose model cannot be decided with certainty; the
    /// phrase says why, in words for the client.
    ModelUndecidable(&'static str),
    /// The upstream's model list, to be filtered for a key with `models`, could not be read.
    ModelListUnreadable,
}

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::MissingCredentials
            | Self::MalformedCredentials
            | Self::InvalidCredentials
            | Self::KeyExpired => StatusCode::UNAUTHORIZED,
            Self::OutOfScope => StatusCode::FORBIDDEN,
            Self::RouteNotInPreset => StatusCode::NOT_FOUND,
            Self::KeyBusy | Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::BadRequest | Self::ClientBody(_) | Self::ModelUndecidable(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::ModelNotFound(_) => StatusCode::NOT_FOUND,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::OriginNotAllowed => StatusCode::FORBIDDEN,
            Self::Draining
            | Self::OverCapacity
            | Self::QueueTimeout
            | Self::LimitsUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::UpstreamUnreachable(_)
            | Self::UpstreamFailed(_)
            | Self::UpstreamBody(_)
            | Self::UnexpectedUpgrade
            | Self::ModelListUnreadable => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout | Self::UpstreamIdle => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// A short, stable reason for logs and (later) metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MethodNotAllowed => "method_not_allowed",
            Self::MissingCredentials => "missing_credentials",
            Self::MalformedCredentials => "malformed_credentials",
            Self::InvalidCredentials => "invalid_credentials",
            Self::KeyExpired => "key_expired",
            Self::OutOfScope => "out_of_scope",
            Self::RouteNotInPreset => "route_not_in_preset",
            Self::KeyBusy => "key_busy",
            Self::RateLimited(_) => "rate_limited",
            Self::LimitsUnavailable(_) => "limits_unavailable",
            Self::BadRequest => "bad_request",
            Self::BodyTooLarge => "body_too_large",
            Self::Draining => "draining",
            Self::OverCapacity => "over_capacity",
            Self::QueueTimeout => "queue_timeout",
            Self::OriginNotAllowed => "origin_not_allowed",
            Self::UpstreamUnreachable(_) => "upstream_unreachable",
            Self::UpstreamFailed(_) => "upstream_failed",
            Self::UnexpectedUpgrade => "upstream_unexpected_upgrade",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::UpstreamIdle => "upstream_idle_timeout",
            Self::UpstreamBody(_) => "upstream_stream_broken",
            Self::ClientBody(_) => "client_body_error",
            Self::ModelNotFound(_) => "model_not_allowed",
            Self::ModelUndecidable(_) => "model_undecidable",
            Self::ModelListUnreadable => "upstream_model_list_unreadable",
        }
    }

    /// Whether the upstream gave no answer at all: no connection, a connection that failed,
    /// or no response headers in time. Readiness follows this.
    pub fn upstream_unanswered(&self) -> bool {
        matches!(
            self,
            Self::UpstreamUnreachable(_) | Self::UpstreamFailed(_) | Self::UpstreamTimeout
        )
    }

    /// Whether the error wraps a lower-level cause worth logging beside [`Self::reason`].
    pub fn has_cause(&self) -> bool {
        matches!(
            self,
            Self::UpstreamUnreachable(_)
                | Self::UpstreamFailed(_)
                | Self::UpstreamBody(_)
                | Self::ClientBody(_)
                | Self::ModelUndecidable(_)
        )
    }

    /// A copy of a refusal that the request body raised on its way upstream, which hyper
    /// hands back wrapped in its own error; `None` for anything else.
    pub fn refusal(&self) -> Option<Self> {
        match self {
            Self::ModelNotFound(model) => Some(Self::ModelNotFound(model.clone())),
            Self::ModelUndecidable(why) => Some(Self::ModelUndecidable(why)),
            _ => None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Cow<'static, str> {
        match self {
            Self::ModelNotFound(model) => {
                let mut message = String::from("The model `");
                json_escape(&mut message, model);
                message.push_str("` does not exist or you do not have access to it.");
                Cow::Owned(format!(
                    r#"{{"error":{{"message":"{message}","type":"invalid_request_error","code":"model_not_found"}}}}"#
                ))
            }
            Self::ModelUndecidable(why) => Cow::Owned(format!(
                r#"{{"error":{{"message":"The model of this request cannot be decided: {why}. Send one JSON object with exactly one top-level string `model`.","type":"invalid_request_error","code":"model_undecidable"}}}}"#
            )),
            Self::MethodNotAllowed => json!(
                "Method not allowed.",
                "invalid_request_error",
                "method_not_allowed"
            ),
            Self::MissingCredentials => json!(
                "Missing API key. Send it as `Authorization: Bearer <key>` or `x-api-key: <key>`.",
                "authentication_error",
                "invalid_api_key"
            ),
            Self::MalformedCredentials => json!(
                "Malformed credentials. Send exactly one `Authorization: Bearer <key>` or one `x-api-key: <key>` header.",
                "authentication_error",
                "invalid_api_key"
            ),
            Self::InvalidCredentials | Self::KeyExpired => json!(
                "Invalid API key.",
                "authentication_error",
                "invalid_api_key"
            ),
            Self::OutOfScope => json!(
                "This API key is not allowed to use this route.",
                "permission_error",
                "insufficient_scope"
            ),
            Self::RouteNotInPreset => json!(
                "This route is not served here.",
                "not_found_error",
                "route_not_found"
            ),
            Self::KeyBusy => json!(
                "This API key has as many requests in flight as it may have; retry when one has finished.",
                "rate_limit_error",
                "concurrency_limit_exceeded"
            ),
            Self::RateLimited(_) => json!(
                "Rate limit reached for this API key (requests or tokens per minute); retry after the number of seconds in Retry-After.",
                "rate_limit_error",
                "rate_limit_exceeded"
            ),
            Self::LimitsUnavailable(_) => json!(
                "The rate limits of this API key cannot be checked right now; retry shortly.",
                "server_error",
                "limits_unavailable"
            ),
            Self::BadRequest | Self::ClientBody(_) => {
                json!("Bad request.", "invalid_request_error", "bad_request")
            }
            Self::BodyTooLarge => json!(
                "Request body is larger than this server accepts.",
                "invalid_request_error",
                "request_too_large"
            ),
            Self::OriginNotAllowed => json!(
                "This origin is not allowed to call this API from a browser.",
                "invalid_request_error",
                "origin_not_allowed"
            ),
            Self::OverCapacity => json!(
                "Server is at its connection limit; retry shortly.",
                "service_unavailable",
                "over_capacity"
            ),
            Self::Draining => json!(
                "Server is shutting down.",
                "service_unavailable",
                "draining"
            ),
            Self::QueueTimeout => json!(
                "The server is busy: this request waited its turn for the upstream longer than queue_timeout; retry shortly.",
                "server_error",
                "queue_timeout"
            ),
            Self::UpstreamUnreachable(_) | Self::UpstreamFailed(_) => json!(
                "The upstream server could not be reached.",
                "upstream_error",
                "upstream_unavailable"
            ),
            Self::UnexpectedUpgrade => json!(
                "The upstream server switched to a protocol that was not asked for.",
                "upstream_error",
                "upstream_protocol_error"
            ),
            Self::UpstreamTimeout => json!(
                "The upstream server did not answer in time.",
                "upstream_error",
                "upstream_timeout"
            ),
            // The two below only ever reach a client as an SSE error event: the response's
            // headers were sent already.
            Self::UpstreamBody(_) => json!(
                "The upstream server's stream broke off.",
                "upstream_error",
                "upstream_stream_broken"
            ),
            Self::UpstreamIdle => json!(
                "The upstream server sent nothing for longer than idle_timeout.",
                "upstream_error",
                "upstream_idle_timeout"
            ),
            Self::ModelListUnreadable => json!(
                "The upstream server's model list could not be read.",
                "upstream_error",
                "upstream_model_list_unreadable"
            ),
        }
    }

    /// `Retry-After` for a refusal that clears by itself, in whole seconds rounded up: a
    /// client that waits that long is not refused again for the same reason.
    pub fn retry_after(&self) -> Option<HeaderValue> {
        match self {
            Self::RateLimited(after) | Self::LimitsUnavailable(after) => {
                let seconds = after.as_micros().div_ceil(1_000_000).max(1);
                Some(HeaderValue::from(
                    u64::try_from(seconds).unwrap_or(u64::MAX),
                ))
            }
            Self::OverCapacity | Self::KeyBusy | Self::QueueTimeout => {
                Some(HeaderValue::from_static("1"))
            }
            _ => None,
        }
    }

    /// The `WWW-Authenticate` challenge of a 401 (RFC 6750 §3), if this is one.
    pub fn challenge(&self) -> Option<HeaderValue> {
        match self {
            Self::MissingCredentials => Some(HeaderValue::from_static(BEARER_CHALLENGE)),
            Self::MalformedCredentials | Self::InvalidCredentials | Self::KeyExpired => {
                Some(HeaderValue::from_static(BEARER_CHALLENGE_INVALID_TOKEN))
            }
            Self::OutOfScope => Some(HeaderValue::from_static(
                BEARER_CHALLENGE_INSUFFICIENT_SCOPE,
            )),
            _ => None,
        }
    }
}

/// Appends `s` to a JSON string's contents: quotes, backslashes and control characters
/// escaped.
fn json_escape(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
}

/// Builds a constant OpenAI-shaped error body at compile time.
macro_rules! json {
    ($message:literal, $type:literal, $code:literal) => {
        Cow::Borrowed(concat!(
            r#"{"error":{"message":""#,
            $message,
            r#"","type":""#,
            $type,
            r#"","code":""#,
            $code,
            r#""}}"#
        ))
    };
}
use json;

impl fmt::Display for ProxyError {
    /// Sources are included: upstream and client errors name sockets and protocol states,
    /// never header values, so they cannot carry a secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UpstreamFailed(e) | Self::UpstreamBody(e) => {
                write!(f, "{}: {}", self.reason(), ErrorChain(e))
            }
            Self::UpstreamUnreachable(e) | Self::ClientBody(e) => {
                write!(f, "{}: {}", self.reason(), ErrorChain(&**e))
            }
            Self::ModelUndecidable(why) => write!(f, "{}: {why}", self.reason()),
            _ => f.write_str(self.reason()),
        }
    }
}

impl std::error::Error for ProxyError {}

/// Displays an error and its `source()` chain on one line.
pub(crate) struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every variant that can be made without a hyper error, with its status, and the type
    /// and code of its body.
    fn all() -> Vec<(ProxyError, StatusCode, &'static str, &'static str)> {
        use StatusCode as S;
        let (auth, request) = ("authentication_error", "invalid_request_error");
        vec![
            (
                ProxyError::MethodNotAllowed,
                S::METHOD_NOT_ALLOWED,
                request,
                "method_not_allowed",
            ),
            (
                ProxyError::MissingCredentials,
                S::UNAUTHORIZED,
                auth,
                "invalid_api_key",
            ),
            (
                ProxyError::MalformedCredentials,
                S::UNAUTHORIZED,
                auth,
                "invalid_api_key",
            ),
            (
                ProxyError::InvalidCredentials,
                S::UNAUTHORIZED,
                auth,
                "invalid_api_key",
            ),
            (
                ProxyError::KeyExpired,
                S::UNAUTHORIZED,
                auth,
                "invalid_api_key",
            ),
            (
                ProxyError::OutOfScope,
                S::FORBIDDEN,
                "permission_error",
                "insufficient_scope",
            ),
            (
                ProxyError::RouteNotInPreset,
                S::NOT_FOUND,
                "not_found_error",
                "route_not_found",
            ),
            (
                ProxyError::KeyBusy,
                S::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "concurrency_limit_exceeded",
            ),
            (
                ProxyError::RateLimited(Duration::from_secs(1)),
                S::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limit_exceeded",
            ),
            (
                ProxyError::LimitsUnavailable(Duration::from_secs(1)),
                S::SERVICE_UNAVAILABLE,
                "server_error",
                "limits_unavailable",
            ),
            (
                ProxyError::BadRequest,
                S::BAD_REQUEST,
                request,
                "bad_request",
            ),
            (
                ProxyError::ClientBody("reset".into()),
                S::BAD_REQUEST,
                request,
                "bad_request",
            ),
            (
                ProxyError::BodyTooLarge,
                S::PAYLOAD_TOO_LARGE,
                request,
                "request_too_large",
            ),
            (
                ProxyError::Draining,
                S::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "draining",
            ),
            (
                ProxyError::OverCapacity,
                S::SERVICE_UNAVAILABLE,
                "service_unavailable",
                "over_capacity",
            ),
            (
                ProxyError::QueueTimeout,
                S::SERVICE_UNAVAILABLE,
                "server_error",
                "queue_timeout",
            ),
            (
                ProxyError::OriginNotAllowed,
                S::FORBIDDEN,
                request,
                "origin_not_allowed",
            ),
            (
                ProxyError::UpstreamUnreachable("refused".into()),
                S::BAD_GATEWAY,
                "upstream_error",
                "upstream_unavailable",
            ),
            (
                ProxyError::UnexpectedUpgrade,
                S::BAD_GATEWAY,
                "upstream_error",
                "upstream_protocol_error",
            ),
            (
                ProxyError::UpstreamTimeout,
                S::GATEWAY_TIMEOUT,
                "upstream_error",
                "upstream_timeout",
            ),
            (
                ProxyError::UpstreamIdle,
                S::GATEWAY_TIMEOUT,
                "upstream_error",
                "upstream_idle_timeout",
            ),
            (
                ProxyError::ModelNotFound("lora-x".into()),
                S::NOT_FOUND,
                request,
                "model_not_found",
            ),
            (
                ProxyError::ModelUndecidable("the body has two `model` members"),
                S::BAD_REQUEST,
                request,
                "model_undecidable",
            ),
            (
                ProxyError::ModelListUnreadable,
                S::BAD_GATEWAY,
                "upstream_error",
                "upstream_model_list_unreadable",
            ),
        ]
    }

    /// The message, type and code of an error body, which must be exactly
    /// `{"error":{"message":…,"type":…,"code":…}}` with three strings.
    fn fields(body: &str) -> [String; 3] {
        let parsed: serde_json::Value =
            serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
        let outer = parsed.as_object().expect("an object");
        assert_eq!(outer.len(), 1, "{body}");
        let error = outer["error"].as_object().expect("`error` is an object");
        assert_eq!(error.len(), 3, "{body}");
        ["message", "type", "code"].map(|field| {
            error
                .get(field)
                .and_then(serde_json::Value::as_str)
                .unwrap_or_else(|| panic!("no string `{field}`: {body}"))
                .to_owned()
        })
    }

    #[test]
    fn every_body_is_json_with_the_openai_error_shape() {
        for (e, status, kind, code) in all() {
            let [message, found_kind, found_code] = fields(&e.body());
            assert!(!message.is_empty(), "{e}");
            assert_eq!(
                (found_kind.as_str(), found_code.as_str()),
                (kind, code),
                "{e}"
            );
            assert_eq!(e.status(), status, "{e}");
        }
    }

    #[test]
    fn authentication_errors_carry_the_code_openai_clients_map() {
        for e in [
            ProxyError::MissingCredentials,
            ProxyError::MalformedCredentials,
            ProxyError::InvalidCredentials,
            ProxyError::KeyExpired,
        ] {
            assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
            let [_, kind, code] = fields(&e.body());
            assert_eq!(kind, "authentication_error");
            assert_eq!(code, "invalid_api_key");
            assert!(e.challenge().is_some());
        }
        assert_eq!(
            ProxyError::MissingCredentials.challenge().unwrap(),
            r#"Bearer realm="keygate""#
        );
        assert_eq!(
            ProxyError::InvalidCredentials.challenge().unwrap(),
            r#"Bearer realm="keygate", error="invalid_token""#
        );
    }

    #[test]
    fn an_expired_key_looks_exactly_like_an_invalid_one() {
        let (expired, invalid) = (ProxyError::KeyExpired, ProxyError::InvalidCredentials);
        assert_eq!(expired.status(), invalid.status());
        assert_eq!(expired.body(), invalid.body());
        assert_eq!(expired.challenge(), invalid.challenge());
        assert_ne!(expired.reason(), invalid.reason());
    }

    #[test]
    fn scope_refusals_are_403_and_limits_429_with_retry_after() {
        let scope = ProxyError::OutOfScope;
        assert_eq!(scope.status(), StatusCode::FORBIDDEN);
        let [_, kind, _] = fields(&scope.body());
        assert_eq!(kind, "permission_error");
        assert_eq!(
            scope.challenge().unwrap(),
            r#"Bearer realm="keygate", error="insufficient_scope""#
        );
        assert_eq!(ProxyError::KeyBusy.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(ProxyError::KeyBusy.retry_after().unwrap(), "1");
    }

    #[test]
    fn a_rate_refusal_says_when_to_retry_in_whole_seconds_rounded_up() {
        for (after, header) in [
            (Duration::from_micros(1), "1"),
            (Duration::from_millis(999), "1"),
            (Duration::from_secs(1), "1"),
            (Duration::from_micros(1_000_001), "2"),
            (Duration::from_millis(29_100), "30"),
            (Duration::from_secs(86_400), "86400"),
        ] {
            assert_eq!(
                ProxyError::RateLimited(after).retry_after().unwrap(),
                header,
                "{after:?}"
            );
        }
        let unavailable = ProxyError::LimitsUnavailable(Duration::from_secs(1));
        assert_eq!(unavailable.retry_after().unwrap(), "1");
        assert_eq!(unavailable.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn a_refused_model_is_named_in_openai_words_whatever_its_characters() {
        for model in [
            "Qwen/Qwen3-0.6B",
            "a\"b\\c",
            "line\nbreak\u{1}",
            "caf\u{e9} \u{1f600}",
        ] {
            let e = ProxyError::ModelNotFound(model.into());
            let [message, kind, code] = fields(&e.body());
            assert_eq!(
                message,
                format!("The model `{model}` does not exist or you do not have access to it.")
            );
            assert_eq!(
                (kind.as_str(), code.as_str()),
                ("invalid_request_error", "model_not_found")
            );
            assert_eq!(e.status(), StatusCode::NOT_FOUND);
            assert!(e.refusal().is_some());
        }
        assert!(ProxyError::ModelListUnreadable.refusal().is_none());
    }

    #[test]
    fn a_queue_timeout_is_a_503_server_error_with_retry_after() {
        let e = ProxyError::QueueTimeout;
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        let [_, kind, _] = fields(&e.body());
        assert_eq!(kind, "server_error");
        assert_eq!(e.retry_after().unwrap(), "1");
    }
}
