//! What a request may do: the credential and the constant-time key check against the keys
//! in force and their reloads ([`keyring`]), key-less routes, CORS preflights, server
//! presets, per-key scopes, expiry and concurrency slots, and the throttle on failed
//! authentication, the fair admission queue for the upstream, and the
//! per-key rate limits and concurrency slots, in process or shared through Redis
//! ([`limits`], the only part that performs I/O), taken for each request by [`admission`].

pub mod admission;
pub mod auth;
pub mod cors;
pub mod fair;
pub mod json_scan;
pub mod keyring;
pub mod limits;
pub mod models;
pub mod route;
pub mod scope;
pub mod throttle;
