//! keygate: an authenticating reverse proxy for inference servers and other HTTP origins.
//!
//! The tree follows the path of one request:
//!
//! 1. [`listener`] accepts a connection under the connection limit
//!    ([`listener::server`]), completes the TLS handshake when TLS is on
//!    ([`listener::tls`]), picks the protocol (ALPN over TLS, otherwise HTTP/1.1 or h2c by
//!    [`listener::preface`]) and hands each request to the [`gateway`]. An HTTP/2 connection
//!    without open streams idles out ([`listener::streams`]); an idle HTTP/1.1 keep-alive
//!    connection is parked, holding its socket and nothing more ([`listener::h1`]); an
//!    HTTP/1.1 request whose client hangs up before its response is dropped with its
//!    upstream attempt ([`listener::hangup`]).
//! 2. [`gateway`] runs the request through [`policy`]: CORS preflights
//!    ([`policy::cors`]), TRACE/CONNECT refused, the key-less routes ([`policy::route`]:
//!    exact probe and public paths, GET/HEAD only), the credential and the constant-time key
//!    check ([`policy::auth`]) against the keys in force ([`policy::keyring`]: the config's
//!    and the key registry's, swapped whole by a reload), then the matched key's scope
//!    ([`policy::scope`]): its expiry, the server preset's route table ([`preset`]) and its
//!    `allow` rules, then its concurrency slot and rates ([`policy::admission`], kept by
//!    [`policy::limits`] in process or through Redis). Failed authentication is slowed per
//!    client ([`policy::throttle`]). [`policy::fair`] (fair admission to the upstream),
//!    [`policy::models`] and [`policy::json_scan`] (the request body's `model`) complete the
//!    per-key policy layer; the gateway's `inspect` module applies a key's `models`
//!    ([`config::models`]) and reads token usage on the way.
//! 3. [`forward`] applies the header rules ([`forward::rewrite`]), sends the request over a
//!    pooled upstream connection ([`forward::upstream`], TLS by [`forward::tls_client`]),
//!    streams both bodies frame by frame ([`forward::body`]), adds SSE keep-alives and error
//!    events ([`forward::sse`]), reads token usage ([`forward::usage`]), and turns an
//!    authenticated WebSocket into a tunnel ([`forward::upgrade`]).
//! 4. [`observe`] writes one access line when the response ends ([`observe::access`]),
//!    counts it ([`observe::metrics`]), and owns the only writer of stdout
//!    ([`observe::logging`]).
//! 5. Any failure is an [`error::ProxyError`], turned into a JSON response in one place.
//!
//! Beside the proxy, [`listener::admin`] serves metrics, liveness and readiness on its own
//! listener, and [`listener::redirect`] answers plain HTTP with a redirect to https.
//!
//! [`config`] turns the TOML file and the secrets it names ([`config::secrets`]) into a
//! validated [`Config`] before any socket is opened: plain data (key specs and their
//! policies, TLS material read from its files), from which [`gateway::Gateway`] and the
//! listener build the running parts.
//!
//! Dependencies point one way: `listener` → `gateway` → `policy`, `forward` → `observe` →
//! `config`; `error`, `headers`, `path` and `preset` are leaves that any module may use.
//!
//! # Public API
//!
//! Every module is private to the crate. What the `keygate` binary (`src/main.rs`), the
//! integration tests (`tests/`) and the benches (`benches/`) call is re-exported below, and
//! nothing else: they build a [`Config`], bind [`Listeners`] and [`run`] the proxy, and the
//! tests and benches also drive a few parts on their own (the key check, the header rules,
//! the limiter, the body scanner, the fair queue).

// The module map above and every doc comment are for maintainers: `cargo doc
// --document-private-items` renders them, links to private items included.
#![allow(rustdoc::private_intra_doc_links)]

mod config;
mod error;
mod forward;
mod gateway;
mod headers;
mod listener;
mod observe;
mod path;
mod policy;
mod preset;

// The binary: the config and its secrets, the proxy's sockets and the proxy itself, the
// key generator of `keygate keygen`.
pub use config::problems::ConfigError;
pub use config::registry::registry_entry;
pub use config::secrets::ProcessSecrets;
pub use config::{Config, LogFormat, Overrides};
pub use listener::server::{run, Listeners};
pub use policy::auth::generate_key;

// The test and bench suites, beyond the above: configs from secrets in memory, the proxy on
// a clock of their own, and the parts they drive directly.
pub use config::key_policy::KeyLimits;
pub use config::keys::KeySpec;
pub use config::limits::OnError;
pub use config::models::Models;
pub use config::secrets::{MapSecrets, Secret, SecretSource};
pub use forward::rewrite::{request_id, Origin, Peer, Rules};
pub use forward::usage::sse::SseUsage;
pub use forward::usage::JsonUsage;
pub use gateway::Gateway;
pub use listener::h1::PARK_AFTER;
pub use listener::server::run_with_clock;
pub use observe::model_labels::MODEL_LABELS_PER_KEY;
pub use policy::admission::Admission;
pub use policy::auth::{credential, KeySet};
pub use policy::fair::{FairQueue, Permit};
pub use policy::limits::redis::RedisOptions;
pub use policy::limits::{BackendState, Busy, Decision, Limiter, Source, Verdict};
pub use policy::models::hold_back::HoldBack;
pub use policy::models::list::filter_model_list;
pub use policy::models::request::Scanner;
pub use policy::route::Routes;
pub use policy::scope::{Clock, Policy};
pub use policy::throttle::{FAILURE_BURST, SLOWDOWN};
pub use preset::{Class, Table, PRESETS, VLLM};

/// The only writer of stdout, for the binary: started before the proxy, flushed at exit.
pub mod logging {
    pub use crate::observe::logging::{finish, init, FINISH_WITHIN};
}
