//! `[server]`, `[admin]`, `[cors]`, `[probe]` and `[public]`: listen addresses, TLS files,
//! the redirect listener, the edge limits and the key-less paths.

use super::*;

pub(super) fn server(s: ServerFile, p: &mut Problems<'_>) -> Option<Server> {
    let listen = match s.listen.get_ref().parse::<SocketAddr>() {
        Ok(addr) => Some(addr),
        Err(_) => {
            p.at(
                s.listen.span(),
                "[server] listen",
                "is not an IP:port address; write e.g. \"0.0.0.0:8080\" or \"127.0.0.1:8080\"",
            );
            None
        }
    };
    let header_read_timeout = positive(&s.header_read_timeout, "[server] header_read_timeout", p);
    let trusted_proxies = s
        .trusted_proxies
        .iter()
        .filter_map(|cidr| {
            let text = cidr.get_ref();
            let net = text
                .parse::<IpNet>()
                .ok()
                .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from));
            if net.is_none() {
                p.at(
                    cidr.span(),
                    "[server] trusted_proxies",
                    "is not a CIDR or IP address; write e.g. \"10.0.0.0/8\"",
                );
            }
            net
        })
        .collect();
    if *s.max_connections.get_ref() == 0 {
        p.at(
            s.max_connections.span(),
            "[server] max_connections",
            "must be at least 1",
        );
    }
    let workers = match &s.workers {
        Some(w) if *w.get_ref() == 0 => {
            p.at(
                w.span(),
                "[server] workers",
                "must be at least 1; leave it out for one per available core",
            );
            1
        }
        Some(w) => *w.get_ref(),
        None => std::thread::available_parallelism().map_or(1, usize::from),
    };
    let tls = tls_files(&s, p);
    let redirect = listen.and_then(|listen| redirect(&s, listen, tls.is_some(), p));
    Some(Server {
        listen: listen?,
        tls,
        redirect,
        workers,
        header_read_timeout,
        trusted_proxies,
        max_request_body: s.max_request_body.as_u64(),
        max_connections: *s.max_connections.get_ref(),
        shutdown_grace: s.shutdown_grace.0,
    })
}

/// Loads the certificate and key named by `tls_cert` and `tls_key`: both or neither.
pub(super) fn tls_files(s: &ServerFile, p: &mut Problems<'_>) -> Option<Tls> {
    let (cert, key) = match (&s.tls_cert, &s.tls_key) {
        (None, None) => return None,
        (Some(cert), Some(key)) => (cert, key),
        (Some(given), None) | (None, Some(given)) => {
            p.at(
                given.span(),
                "[server] tls_cert",
                "tls_cert and tls_key go together; set both (PEM chain and its private key) or neither",
            );
            return None;
        }
    };
    let paths = (PathBuf::from(cert.get_ref()), PathBuf::from(key.get_ref()));
    match Certificate::load(&paths.0, &paths.1) {
        Ok(certificate) => Some(Tls {
            cert: paths.0,
            key: paths.1,
            certificate,
        }),
        Err(problem) => {
            let (span, key) = match problem.file {
                Which::Cert => (cert.span(), "[server] tls_cert"),
                Which::Key => (key.span(), "[server] tls_key"),
            };
            p.at(span, key, problem.message);
            None
        }
    }
}

/// The plain listener redirecting to https: only with TLS, on an address of its own.
pub(super) fn redirect(
    s: &ServerFile,
    listen: SocketAddr,
    tls: bool,
    p: &mut Problems<'_>,
) -> Option<Redirect> {
    let key = "[server] redirect_http_listen";
    let Some(text) = &s.redirect_http_listen else {
        if let Some(port) = &s.redirect_https_port {
            p.at(
                port.span(),
                "[server] redirect_https_port",
                "is used only with redirect_http_listen; set that too or remove this",
            );
        }
        return None;
    };
    let Ok(addr) = text.get_ref().parse::<SocketAddr>() else {
        p.at(
            text.span(),
            key,
            "is not an IP:port address; write e.g. \"0.0.0.0:8081\"",
        );
        return None;
    };
    if !tls && (s.tls_cert.is_none() || s.tls_key.is_none()) {
        p.at(
            text.span(),
            key,
            "redirects to https, so it needs TLS on listen: set tls_cert and tls_key too",
        );
    }
    if same_socket(addr, listen) {
        p.at(
            text.span(),
            key,
            "is the proxy's own address; give the plain listener its own port, e.g. \"0.0.0.0:8081\"",
        );
    }
    let https_port = match &s.redirect_https_port {
        Some(port) if *port.get_ref() == 0 => {
            p.at(
                port.span(),
                "[server] redirect_https_port",
                "must be a port number 1-65535, e.g. 443",
            );
            443
        }
        Some(port) => *port.get_ref(),
        None => listen.port(),
    };
    Some(Redirect {
        listen: addr,
        https_port,
        serves_probe: s.redirect_serves_probe,
    })
}

pub(super) fn positive(d: &Spanned<HumanDuration>, key: &str, p: &mut Problems<'_>) -> Duration {
    let value = d.get_ref().0;
    if value.is_zero() {
        p.at(d.span(), key, "must be longer than zero, e.g. \"10s\"");
    }
    value
}

/// Whether two listen addresses would collide: same port, and the same IP or a wildcard.
/// Port 0 (an ephemeral port) never does.
pub(super) fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// `*` or exact origins, `scheme://host[:port]`, as browsers send them in `Origin`.
pub(super) fn cors_origins(cors: &Spanned<CorsFile>, p: &mut Problems<'_>) -> Vec<HeaderValue> {
    let mut origins = Vec::new();
    for origin in &cors.get_ref().allow_origins {
        let valid = origin == "*"
            || origin.parse::<Uri>().is_ok_and(|u| {
                u.scheme().is_some()
                    && u.authority().is_some()
                    && u.path_and_query().is_none_or(|pq| pq.as_str() == "/")
                    && !origin.ends_with('/')
            });
        match HeaderValue::from_str(origin) {
            Ok(value) if valid => origins.push(value),
            _ => p.at(
                cors.span(),
                "[cors] allow_origins",
                format!("{origin:?} is not an origin; write \"*\" or e.g. \"https://app.example.com\" (scheme, host, optional port, no path)"),
            ),
        }
    }
    origins
}

/// A probe or public path: compared exactly, so it must be an origin-form path.
pub(super) fn route_path(path: &Spanned<String>, key: &str, p: &mut Problems<'_>) -> String {
    let value = path.get_ref();
    let ok = value.starts_with('/')
        && value
            .parse::<http::uri::PathAndQuery>()
            .is_ok_and(|pq| pq.query().is_none() && pq.path() == value);
    if !ok {
        p.at(
            path.span(),
            key,
            "must be a path starting with / without a query, e.g. \"/health\"",
        );
    }
    value.clone()
}
