//! keygate: an authenticating reverse proxy for inference servers and other HTTP origins.
//!
//! The path of one request:
//!
//! 1. [`server`] accepts a connection under the connection limit, completes the TLS
//!    handshake when TLS is on ([`tls`]), picks the protocol (ALPN over TLS, otherwise
//!    HTTP/1.1 or h2c by [`preface`]) and hands each request to the handler. An HTTP/2
//!    connection without open streams idles out ([`streams`]); an HTTP/1.1 request whose
//!    client hangs up before its response is dropped with its upstream attempt ([`hangup`]).
//! 2. [`handler`] answers CORS preflights ([`cors`]), refuses TRACE/CONNECT, asks [`route`]
//!    whether the path is key-less (exact probe and public paths, GET/HEAD only), and
//!    otherwise asks [`auth`] for the credential and checks it against every key in
//!    constant time. The matched key is then admitted by [`scope`]: its expiry, the
//!    server preset's route table ([`preset`]), its `allow` rules and its concurrency slots.
//! 3. [`rewrite`] applies the header rules: hop-by-hop and client credentials out, identity,
//!    injected secret headers, forwarding headers and request id in.
//! 4. [`proxy`] sends the request over a pooled upstream connection (plain or TLS), bounded
//!    by the response timeout; an authenticated WebSocket becomes a tunnel ([`upgrade`]); [`body`] streams both bodies frame by frame with the body limit and the idle
//!    timeout, and [`access`] writes one log line when the response ends. An SSE response
//!    also gets keep-alive comments and a final error event from [`sse`].
//! 5. Any failure is a [`error::ProxyError`], turned into a JSON response in one place;
//!    failed authentication is also counted and, per client address, slowed ([`throttle`]).
//!
//! Beside the proxy, [`admin`] serves [`metrics`], liveness and readiness on its own listener,
//! and [`redirect`] answers plain HTTP with a redirect to https when TLS is on.
//!
//! [`config`] turns the TOML file and the secrets it names ([`secrets`]) into a validated
//! [`Config`] before any socket is opened.

#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod auth;
pub mod body;
pub mod config;
pub mod cors;
pub mod error;
pub mod handler;
pub mod hangup;
pub mod headers;
pub mod logging;
pub mod metrics;
pub mod preface;
pub mod preset;
pub mod proxy;
pub mod redirect;
pub mod rewrite;
pub mod route;
pub mod scope;
pub mod secrets;
pub mod server;
pub mod sse;
pub mod streams;
pub mod throttle;
pub mod tls;
pub mod upgrade;

pub use config::Config;
pub use server::{run, Listeners};
