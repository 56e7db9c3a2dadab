//! What a request may do: the credential and the constant-time key check, key-less routes,
//! CORS preflights, server presets, per-key scopes, expiry and concurrency slots, and the
//! throttle on failed authentication. Nothing here performs I/O.

pub mod auth;
pub mod cors;
pub mod json_scan;
pub mod models;
pub mod preset;
pub mod route;
pub mod scope;
pub mod throttle;
