//! The way to the upstream and back: the header rules, the pooled upstream connections and
//! their TLS client, both bodies streamed frame by frame, SSE keep-alives and error events,
//! and WebSocket tunnels.

pub mod body;
pub mod replay;
pub mod rewrite;
pub mod sse;
pub mod tls_client;
pub mod upgrade;
pub mod upstream;
pub mod usage;
