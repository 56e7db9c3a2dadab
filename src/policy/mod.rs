//! What a request may do: the credential and the constant-time key check against the keys
//! in force and their reloads ([`keyring`]), key-less routes, CORS preflights, server
//! presets, per-key scopes, expiry and concurrency slots, and the throttle on failed
//! authentication, the fair admission queue for the upstream, and the
//! per-key rate limits and concurrency slots, in process or shared through Redis
//! ([`limits`], the only part that performs I/O), taken for each request by [`admission`].

pub(crate) mod admission;
pub(crate) mod auth;
pub(crate) mod cors;
pub(crate) mod fair;
pub(crate) mod json_scan;
pub(crate) mod keyring;
pub(crate) mod limits;
pub(crate) mod models;
pub(crate) mod route;
pub(crate) mod scope;
pub(crate) mod throttle;
