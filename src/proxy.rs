//! The upstream side: one pooled HTTP/1.1 client, the URI rewrite (keeping the upstream URL's
//! path prefix), the response timeout, and the classification of upstream failures.
//!
//! Dropping the future returned by [`Upstream::send`], or the response body it yields, drops
//! the upstream request: hyper then closes that upstream connection instead of returning it to
//! the pool, which is how an inference server learns that the client is gone.

use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::RequestBody;
use crate::config;
use crate::error::ProxyError;

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

pub struct Upstream {
    client: Client<HttpConnector, RequestBody>,
    scheme: Scheme,
    authority: Authority,
    path_prefix: String,
    response_timeout: Duration,
    connect_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Upstream {
    pub fn new(config: &config::Upstream) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector);
        Self {
            client,
            scheme: config.scheme.clone(),
            authority: config.authority.clone(),
            path_prefix: config.path_prefix.clone(),
            response_timeout: config.response_timeout,
            connect_timeout: config.connect_timeout,
            idle_timeout: config.idle_timeout,
        }
    }

    /// The upstream URI for a client's request target: the upstream's scheme and authority,
    /// its path prefix, then the client's path and query unchanged. Asterisk-form (`OPTIONS *`)
    /// cannot be forwarded under a prefix and is refused.
    pub fn uri(&self, target: &Uri) -> Result<Uri, ProxyError> {
        let path_and_query = target.path_and_query().map_or("/", PathAndQuery::as_str);
        if !path_and_query.starts_with('/') {
            return Err(ProxyError::BadRequest);
        }
        let path_and_query = if self.path_prefix.is_empty() {
            PathAndQuery::try_from(path_and_query)
        } else {
            PathAndQuery::try_from(format!("{}{path_and_query}", self.path_prefix))
        }
        .map_err(|_| ProxyError::BadRequest)?;
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|_| ProxyError::BadRequest)
    }

    /// Whether a TCP connection to the upstream opens within `connect_timeout`.
    pub async fn reachable(&self) -> bool {
        let port = self.authority.port_u16().unwrap_or(80);
        let connect = tokio::net::TcpStream::connect((self.authority.host(), port));
        matches!(
            tokio::time::timeout(self.connect_timeout, connect).await,
            Ok(Ok(_))
        )
    }

    /// Sends the request and waits for the response headers, at most `response_timeout`.
    pub async fn send(
        &self,
        mut req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        *req.version_mut() = Version::HTTP_11;
        match tokio::time::timeout(self.response_timeout, self.client.request(req)).await {
            Err(_) => Err(ProxyError::UpstreamTimeout),
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(classify(e)),
        }
    }
}

/// Names an upstream failure. A failure caused by the client's own body (too large, or the
/// client hung up mid-upload) is the client's, not the upstream's.
fn classify(e: hyper_util::client::legacy::Error) -> ProxyError {
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        match cause.downcast_ref::<ProxyError>() {
            Some(ProxyError::BodyTooLarge) => return ProxyError::BodyTooLarge,
            Some(ProxyError::ClientBody(_)) => return ProxyError::ClientBody(Box::new(e)),
            _ => source = cause.source(),
        }
    }
    if e.is_connect() {
        ProxyError::UpstreamUnreachable(e)
    } else {
        ProxyError::UpstreamFailed(e)
    }
}
