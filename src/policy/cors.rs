//! CORS for browsers, on when `[cors] allow_origins` is set.
//!
//! keygate answers preflights itself: a preflight never reaches the upstream and needs no key
//! (browsers never send credentials on one). An allowed origin gets 204 with the `Allow`
//! headers; any other origin gets 403. On every other response to an allowed origin keygate
//! sets `Access-Control-Allow-Origin` itself and drops whatever CORS headers the upstream
//! sent, so the two cannot disagree. A refused request (401 and friends) carries the header
//! too, so browser code can read the JSON error.

use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderMap, HeaderValue, Method, Request};

const ALLOW_METHODS: &str = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS";

/// The response headers browser code may read beside the CORS-safelisted ones: the request
/// id to quote in a report, and what a rate-limited client needs to wait (`Retry-After` and
/// OpenAI's `x-ratelimit-*`, which the openai JavaScript client reads).
const EXPOSED: &str = "x-request-id, retry-after, x-ratelimit-limit-requests, \
x-ratelimit-remaining-requests, x-ratelimit-reset-requests, x-ratelimit-limit-tokens, \
x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens";

/// Headers a browser may send when the preflight does not list its own.
const ALLOW_HEADERS: &str = "authorization, x-api-key, content-type";
/// How long a browser may cache a preflight answer, in seconds.
const MAX_AGE: &str = "600";

/// The allowed origins, fixed at start-up. Empty: CORS is off.
#[derive(Debug, Clone, Default)]
pub(crate) struct Cors {
    origins: Vec<HeaderValue>,
    any: bool,
}

/// keygate's answer to a preflight.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Preflight {
    Allowed(HeaderMap),
    Refused,
}

impl Cors {
    /// `origins` are exact origins (`https://app.example.com`) or `*`.
    pub(crate) fn new(origins: Vec<HeaderValue>) -> Self {
        let any = origins.iter().any(|o| o == "*");
        Self { origins, any }
    }

    fn enabled(&self) -> bool {
        !self.origins.is_empty()
    }

    fn allows(&self, origin: &HeaderValue) -> bool {
        self.any || self.origins.contains(origin)
    }

    /// keygate's answer when `req` is a CORS preflight (OPTIONS with `Origin` and
    /// `Access-Control-Request-Method`) and CORS is on; `None` otherwise.
    pub(crate) fn preflight<B>(&self, req: &Request<B>) -> Option<Preflight> {
        let headers = req.headers();
        if !self.enabled()
            || req.method() != Method::OPTIONS
            || !headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
        {
            return None;
        }
        let origin = headers.get(ORIGIN)?;
        if !self.allows(origin) {
            return Some(Preflight::Refused);
        }
        let mut answer = HeaderMap::new();
        answer.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        answer.insert(VARY, HeaderValue::from_static("Origin"));
        answer.insert(
            ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(ALLOW_METHODS),
        );
        let requested = headers
            .get(ACCESS_CONTROL_REQUEST_HEADERS)
            .filter(|v| {
                v.as_bytes()
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || b" ,-_".contains(b))
            })
            .cloned()
            .unwrap_or(HeaderValue::from_static(ALLOW_HEADERS));
        answer.insert(ACCESS_CONTROL_ALLOW_HEADERS, requested);
        answer.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(MAX_AGE));
        Some(Preflight::Allowed(answer))
    }

    /// Sets the CORS headers of a response to a request from `origin` (the request's
    /// `Origin` header), replacing any the upstream sent.
    pub(crate) fn decorate(&self, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
        if !self.enabled() {
            return;
        }
        for name in [
            ACCESS_CONTROL_ALLOW_ORIGIN,
            ACCESS_CONTROL_ALLOW_CREDENTIALS,
            ACCESS_CONTROL_ALLOW_HEADERS,
            ACCESS_CONTROL_ALLOW_METHODS,
            ACCESS_CONTROL_EXPOSE_HEADERS,
            ACCESS_CONTROL_MAX_AGE,
        ] {
            headers.remove(name);
        }
        headers.append(VARY, HeaderValue::from_static("Origin"));
        if let Some(origin) = origin.filter(|o| self.allows(o)) {
            headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            headers.insert(
                ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static(EXPOSED),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors() -> Cors {
        Cors::new(vec![HeaderValue::from_static("https://app.example")])
    }

    fn preflight(origin: &str) -> Request<()> {
        Request::options("/v1/chat/completions")
            .header(ORIGIN, origin)
            .header(ACCESS_CONTROL_REQUEST_METHOD, "POST")
            .header(
                ACCESS_CONTROL_REQUEST_HEADERS,
                "authorization, content-type",
            )
            .body(())
            .unwrap()
    }

    #[test]
    fn allowed_origin_gets_the_allow_headers() {
        let Some(Preflight::Allowed(h)) = cors().preflight(&preflight("https://app.example"))
        else {
            panic!("not allowed");
        };
        assert_eq!(h[ACCESS_CONTROL_ALLOW_ORIGIN], "https://app.example");
        assert_eq!(
            h[ACCESS_CONTROL_ALLOW_HEADERS],
            "authorization, content-type"
        );
        assert!(h[ACCESS_CONTROL_ALLOW_METHODS]
            .to_str()
            .unwrap()
            .contains("POST"));
    }

    #[test]
    fn other_origins_are_refused_and_plain_options_is_no_preflight() {
        assert_eq!(
            cors().preflight(&preflight("https://evil.example")),
            Some(Preflight::Refused)
        );
        let plain = Request::options("/")
            .header(ORIGIN, "https://app.example")
            .body(())
            .unwrap();
        assert_eq!(cors().preflight(&plain), None);
        assert_eq!(
            Cors::default().preflight(&preflight("https://app.example")),
            None
        );
    }

    #[test]
    fn decorate_replaces_upstream_cors_headers() {
        let mut h = HeaderMap::new();
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        let origin = HeaderValue::from_static("https://app.example");
        cors().decorate(Some(&origin), &mut h);
        assert_eq!(h[ACCESS_CONTROL_ALLOW_ORIGIN], "https://app.example");
        let mut h = HeaderMap::new();
        h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        cors().decorate(
            Some(&HeaderValue::from_static("https://evil.example")),
            &mut h,
        );
        assert!(!h.contains_key(ACCESS_CONTROL_ALLOW_ORIGIN));
    }
}
