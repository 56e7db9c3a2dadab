//! The admin listener, apart from the proxy's: `/metrics` (Prometheus text), `/livez`
//! (the process is up) and `/readyz` (not draining, and the upstream reachable: by the last
//! proxied exchange, or by a direct connect after a failure). It asks for no key, so bind it to loopback or a pod-internal
//! address only; it is never served on the proxy's port.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioTimer;
use tokio::net::TcpListener;
use tracing::info;

use crate::gateway::Gateway;
use crate::listener::server::serve_plain;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Admin requests are tiny: their head must arrive quickly.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the admin endpoints until the task is aborted (when `server::run` returns).
pub(crate) async fn serve(listener: TcpListener, gateway: Arc<Gateway>) {
    if let Ok(addr) = listener.local_addr() {
        info!(listen = %addr, "admin endpoints: /metrics /livez /readyz");
    }
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    serve_plain(listener, builder, move |_| {
        let gateway = gateway.clone();
        service_fn(move |req| {
            let gateway = gateway.clone();
            async move { Ok::<_, Infallible>(answer(&gateway, &req).await) }
        })
    })
    .await;
}

async fn answer(gateway: &Gateway, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match req.uri().path() {
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(gateway.metrics_text())));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
            response
        }
        "/livez" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match gateway.ready().await {
            true => text(StatusCode::OK, "ready\n"),
            false => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: draining, or the upstream cannot be reached\n",
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
