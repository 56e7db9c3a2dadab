//! The edge: accepting connections under the connection limit, the TLS handshake, the choice
//! of protocol (ALPN, or HTTP/1.1 and h2c by the connection preface), parking idle HTTP/1.1
//! connections, HTTP/2 idle handling, and the side listeners (admin endpoints, the plain-HTTP
//! redirect). Each accepted request goes to the [`crate::gateway`].

mod accept;
pub mod admin;
pub mod h1;
pub mod hangup;
pub mod preface;
pub mod redirect;
pub mod server;
pub mod streams;
pub mod tls;
