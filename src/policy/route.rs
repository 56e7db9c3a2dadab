//! Which requests may skip authentication: GET and HEAD on exactly the probe path or a public
//! path. The comparison is byte for byte on the request's path with the query removed and
//! nothing else done to it, so `/health/`, `//health`, `/HEALTH`, `/health;x` and encoded or
//! dot-segment variants all need a key.

use http::{Method, Uri};

/// The key-less routes, fixed at start-up.
#[derive(Debug, Clone)]
pub struct Routes {
    probe: String,
    public: Vec<String>,
}

/// What a request may do before authentication.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// The readiness probe: key-less, forwarded, answered 503 by keygate while draining.
    Probe,
    /// A public path: key-less and forwarded.
    Public,
    /// Everything else: needs a key.
    Protected,
}

impl Routes {
    pub fn new(probe: String, public: Vec<String>) -> Self {
        Self { probe, public }
    }

    pub fn classify(&self, method: &Method, uri: &Uri) -> Route {
        if method != Method::GET && method != Method::HEAD {
            return Route::Protected;
        }
        let path = uri.path();
        if path == self.probe {
            Route::Probe
        } else if self.public.iter().any(|p| p == path) {
            Route::Public
        } else {
            Route::Protected
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn routes() -> Routes {
        Routes::new(
            "/health".into(),
            vec!["/docs".into(), "/openapi.json".into()],
        )
    }

    fn classify(method: Method, target: &str) -> Route {
        routes().classify(&method, &target.parse().unwrap())
    }

    #[test]
    fn probe_and_public_paths_are_keyless_for_get_and_head_only() {
        assert_eq!(classify(Method::GET, "/health"), Route::Probe);
        assert_eq!(classify(Method::HEAD, "/health?verbose=1"), Route::Probe);
        assert_eq!(classify(Method::GET, "/docs"), Route::Public);
        assert_eq!(classify(Method::POST, "/health"), Route::Protected);
        assert_eq!(classify(Method::OPTIONS, "/docs"), Route::Protected);
        assert_eq!(classify(Method::DELETE, "/openapi.json"), Route::Protected);
    }

    #[test]
    fn lookalike_paths_need_a_key() {
        for target in [
            "/health/",
            "/healthz",
            "/HEALTH",
            "//health",
            "/health/../v1/models",
            "/health%2F..",
            "/health;x",
            "/%68ealth",
            "/./health",
            "/docs/",
            "/v1/models",
            "*",
        ] {
            assert_eq!(classify(Method::GET, target), Route::Protected, "{target}");
        }
    }

    #[test]
    fn absolute_form_is_judged_by_its_path() {
        assert_eq!(
            classify(Method::GET, "http://evil.example/health"),
            Route::Probe
        );
        assert_eq!(
            classify(Method::GET, "http://evil.example/health/x"),
            Route::Protected
        );
    }

    proptest! {
        #[test]
        fn no_path_but_the_exact_ones_is_keyless(path in "/[a-zA-Z0-9/._;%~-]{0,24}") {
            if let Ok(uri) = path.parse::<Uri>() {
                let route = routes().classify(&Method::GET, &uri);
                let exact = ["/health", "/docs", "/openapi.json"].contains(&uri.path());
                prop_assert_eq!(route != Route::Protected, exact);
            }
        }
    }
}
