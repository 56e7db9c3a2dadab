//! The edge: accepting connections under the connection limit, the TLS handshake, the choice
//! of protocol (ALPN, or HTTP/1.1 and h2c by the connection preface), parking idle HTTP/1.1
//! connections, HTTP/2 idle handling, and the side listeners (admin endpoints, the plain-HTTP
//! redirect). Each accepted request goes to the [`crate::gateway`].

mod accept;
pub(crate) mod admin;
pub(crate) mod h1;
pub(crate) mod hangup;
pub(crate) mod preface;
pub(crate) mod redirect;
pub(crate) mod server;
pub(crate) mod streams;
pub(crate) mod tls;
