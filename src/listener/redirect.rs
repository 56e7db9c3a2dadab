//! The plain-HTTP listener beside a TLS one (`redirect_http_listen`): every request gets a 308
//! to the same host and path over https, so a client that typed `http://` is sent to TLS
//! before it sends a key. With `redirect_serves_probe`, the probe (GET/HEAD on the exact probe
//! path) is answered here as on the TLS listener, for load balancers that check over plain
//! HTTP; nothing else is ever proxied from this listener.

use std::convert::Infallible;
use std::net::Ipv6Addr;
use std::sync::Arc;

use http::header::{HOST, LOCATION};
use http::uri::Authority;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use tokio::net::TcpListener;
use tracing::info;

use crate::config;
use crate::error::ProxyError;
use crate::forward::body::Body;
use crate::forward::rewrite::{self, Peer};
use crate::gateway::{error_response, Gateway};
use crate::listener::server::serve_plain;

pub(crate) struct Redirector {
    gateway: Arc<Gateway>,
    https_port: u16,
    serves_probe: bool,
}

impl Redirector {
    pub(crate) fn new(settings: &config::Redirect, gateway: Arc<Gateway>) -> Self {
        Self {
            gateway,
            https_port: settings.https_port,
            serves_probe: settings.serves_probe,
        }
    }

    /// Serves until the task is aborted (when `server::run` returns). `http1` is the proxy
    /// listener's builder: the same header limits and timeouts apply.
    pub(crate) async fn serve(self, listener: TcpListener, http1: http1::Builder) {
        if let Ok(addr) = listener.local_addr() {
            info!(listen = %addr, https_port = self.https_port, "redirecting plain HTTP to https");
        }
        let this = Arc::new(self);
        serve_plain(listener, http1, move |peer| {
            let this = this.clone();
            let peer = Arc::new(Peer::new(peer, false));
            service_fn(move |req| {
                let (this, peer) = (this.clone(), peer.clone());
                async move { Ok::<_, Infallible>(this.answer(&peer, req).await) }
            })
        })
        .await;
    }

    async fn answer(&self, peer: &Peer, req: Request<Incoming>) -> Response<Body> {
        if self.serves_probe && self.gateway.is_probe(&req) {
            return self.gateway.handle(peer, req).await;
        }
        let Some(location) = location(&req, self.https_port) else {
            return error_response(&ProxyError::BadRequest, rewrite::request_id(req.headers()));
        };
        self.gateway.metrics().redirected();
        let mut response = Response::new(Body::fixed(""));
        *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
        response.headers_mut().insert(LOCATION, location);
        response
    }
}

/// The https URL for a request: the host the client asked for (the request target's
/// authority, else `Host`), the https port unless it is 443, and the path and query as sent.
/// `None` when the host is missing or is not a DNS name or IP address.
fn location<B>(req: &Request<B>, https_port: u16) -> Option<HeaderValue> {
    let mut hosts = req.headers().get_all(HOST).iter();
    let (host, second) = (hosts.next(), hosts.next());
    if second.is_some() {
        return None;
    }
    let authority = match req.uri().authority() {
        Some(authority) => authority.clone(),
        None => host?.to_str().ok()?.parse().ok()?,
    };
    let host = valid_host(&authority)?;
    let path = req.uri().path_and_query()?.as_str();
    if !path.starts_with('/') {
        return None;
    }
    let location = if https_port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{https_port}{path}")
    };
    HeaderValue::try_from(location).ok()
}

fn valid_host(authority: &Authority) -> Option<&str> {
    let host = authority.host();
    let ipv6 = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .is_some_and(|h| h.parse::<Ipv6Addr>().is_ok());
    let name = (1..=253).contains(&host.len())
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    (!authority.as_str().contains('@') && (ipv6 || name)).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect(target: &str, host: Option<&str>, port: u16) -> Option<String> {
        let mut req = Request::get(target);
        if let Some(host) = host {
            req = req.header(HOST, host);
        }
        location(&req.body(()).unwrap(), port).map(|v| v.to_str().unwrap().to_owned())
    }

    #[test]
    fn the_redirect_keeps_host_path_and_query_and_names_the_https_port() {
        assert_eq!(
            redirect("/v1/models?x=1", Some("api.example.com:8080"), 443).as_deref(),
            Some("https://api.example.com/v1/models?x=1")
        );
        assert_eq!(
            redirect("/", Some("api.example.com"), 8443).as_deref(),
            Some("https://api.example.com:8443/")
        );
        assert_eq!(
            redirect("/h", Some("[::1]:80"), 443).as_deref(),
            Some("https://[::1]/h")
        );
        assert_eq!(
            redirect("http://other.example/p", Some("api.example.com"), 443).as_deref(),
            Some("https://other.example/p")
        );
    }

    #[test]
    fn a_missing_or_odd_host_gets_no_redirect() {
        assert_eq!(redirect("/", None, 443), None);
        assert_eq!(redirect("/", Some("user@evil.example"), 443), None);
        assert_eq!(redirect("/", Some("a b"), 443), None);
        assert_eq!(redirect("/", Some("evil.example/x"), 443), None);
        assert_eq!(redirect("/", Some(""), 443), None);
        let two_hosts = Request::get("/")
            .header(HOST, "good.example")
            .header(HOST, "evil.example")
            .body(())
            .unwrap();
        assert_eq!(location(&two_hosts, 443), None);
    }
}
