//! The way to the upstream and back: the header rules, the pooled upstream connections and
//! their TLS client, both bodies streamed frame by frame, SSE keep-alives and error events,
//! and WebSocket tunnels.

pub(crate) mod body;
pub(crate) mod replay;
pub(crate) mod rewrite;
pub(crate) mod sse;
pub(crate) mod tls_client;
pub(crate) mod upgrade;
pub(crate) mod upstream;
pub(crate) mod usage;
