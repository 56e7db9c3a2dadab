//! Header rules, built once at start-up and applied to every request on its way
//! upstream and every response on its way back.
//!
//! Request order: remove hop-by-hop headers and whatever `Connection` names; remove `Host`
//! and `Expect`; remove the client's credentials and any header named like an identity or
//! injected header (also when spelled with `_` for `-`, which WSGI servers merge); replace
//! or extend the forwarding headers; then set the identity header, the injected headers and
//! `X-Request-Id`. Whatever the client sent, the upstream sees keygate's values only.

use std::net::{IpAddr, SocketAddr};

use http::header::{AUTHORIZATION, HOST};
use http::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

use crate::config::{Config, Injected};
use crate::forward::upgrade::TunnelSlot;
use crate::headers::{
    connection_tokens, FORWARDING, HOP_BY_HOP, REQUEST_REPLACED, X_API_KEY, X_FORWARDED_FOR,
    X_FORWARDED_HOST, X_FORWARDED_PROTO, X_REQUEST_ID,
};
use crate::policy::auth::KeyId;

/// The rules, fixed at start-up.
#[derive(Debug)]
pub struct Rules {
    /// Client headers removed before forwarding, because keygate owns their meaning; a name
    /// configured with `_` is listed in its `-` spelling too.
    owned: Vec<HeaderName>,
    /// The injected names (and their `-` spellings), removed from responses and trailers.
    injected_names: Vec<HeaderName>,
    identity: Option<HeaderName>,
    inject: Vec<Injected>,
    trusted_proxies: Vec<IpNet>,
    /// `Host` for the upstream: its authority, built once (hyper would format it per request).
    upstream_host: HeaderValue,
}

/// The client end of a connection, with its IP address already as text: formatted once per
/// connection instead of once per request.
#[derive(Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    pub ip: HeaderValue,
    /// Accepted beyond `max_connections`: only the probe is served on this connection.
    pub over_capacity: bool,
    /// The connection came over TLS: `X-Forwarded-Proto: https`.
    pub tls: bool,
    /// A WebSocket tunnel for the connection to run once its 101 response is written.
    pub tunnel: TunnelSlot,
}

impl Peer {
    pub fn new(addr: SocketAddr, over_capacity: bool) -> Self {
        let ip = HeaderValue::try_from(addr.ip().to_string())
            .expect("an IP address is valid header text");
        Self {
            addr,
            ip,
            over_capacity,
            tls: false,
            tunnel: TunnelSlot::default(),
        }
    }
}

/// What the request looked like before the rewrite, needed to set the forwarding headers.
pub struct Origin<'a> {
    pub peer: &'a Peer,
    pub host: Option<&'a HeaderValue>,
    pub key: Option<&'a KeyId>,
    pub request_id: &'a HeaderValue,
}

impl Rules {
    pub fn new(config: &Config) -> Self {
        let mut owned = vec![X_API_KEY, X_REQUEST_ID];
        if !config.auth.forward_authorization {
            owned.push(AUTHORIZATION);
        }
        owned.extend(config.auth.identity_header.clone());
        owned.extend(config.inject.iter().map(|i| i.name.clone()));
        Self {
            owned: with_dashed_spellings(owned),
            injected_names: with_dashed_spellings(
                config.inject.iter().map(|i| i.name.clone()).collect(),
            ),
            identity: config.auth.identity_header.clone(),
            inject: config.inject.clone(),
            trusted_proxies: config.server.trusted_proxies.clone(),
            upstream_host: HeaderValue::from_str(config.upstream.authority.as_str())
                .expect("a URI authority is valid header text"),
        }
    }

    /// Rewrites the headers of a request about to be forwarded. `Host` is taken out by the
    /// caller first (it becomes `X-Forwarded-Host`).
    pub fn request(&self, headers: &mut HeaderMap, origin: Origin<'_>) {
        let peer = origin.peer.addr.ip();
        let trusted = self.trusted_proxies.iter().any(|net| net.contains(&peer));
        strip(headers, |name| {
            REQUEST_REPLACED.contains(name)
                || self.owned.contains(name)
                || (!trusted && FORWARDING.contains(name))
        });
        self.forwarding(headers, &origin, trusted);
        if let (Some(name), Some(key)) = (&self.identity, origin.key) {
            headers.insert(name.clone(), key.header.clone());
        }
        for i in &self.inject {
            headers.insert(i.name.clone(), i.value.clone());
        }
        headers.insert(X_REQUEST_ID, origin.request_id.clone());
        headers.insert(HOST, self.upstream_host.clone());
    }

    /// The address of the client behind the connection: the peer itself, or, when the peer
    /// is a trusted proxy, the address it appended last to `X-Forwarded-For`.
    pub fn client_ip(&self, peer: &Peer, headers: &HeaderMap) -> IpAddr {
        let peer_ip = peer.addr.ip();
        if !self
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&peer_ip))
        {
            return peer_ip;
        }
        headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok()?.rsplit(',').next()?.trim().parse().ok())
            .unwrap_or(peer_ip)
    }

    /// `X-Forwarded-For` gets the peer's address: appended to the chain from a trusted proxy,
    /// replacing whatever an untrusted client claimed (`strip` removed those). The other
    /// forwarding headers are kept from a trusted proxy and set by keygate otherwise.
    fn forwarding(&self, headers: &mut HeaderMap, origin: &Origin<'_>, trusted: bool) {
        let chain = if trusted {
            let earlier: Vec<&str> = headers
                .get_all(&X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            (!earlier.is_empty())
                .then(|| format!("{}, {}", earlier.join(", "), origin.peer.addr.ip()))
                .and_then(|chain| HeaderValue::try_from(chain).ok())
        } else {
            None
        };
        let chain = chain.unwrap_or_else(|| origin.peer.ip.clone());
        headers.insert(X_FORWARDED_FOR, chain);
        if !headers.contains_key(&X_FORWARDED_PROTO) {
            let proto = if origin.peer.tls { "https" } else { "http" };
            headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
        }
        if !headers.contains_key(&X_FORWARDED_HOST) {
            if let Some(host) = origin.host {
                headers.insert(X_FORWARDED_HOST, host.clone());
            }
        }
    }

    /// Rewrites the headers of an upstream response about to be sent to the client: no
    /// hop-by-hop header, and no header carrying an injected name, so an origin that reflects
    /// request headers cannot hand the shared secret to a client.
    pub fn response(&self, headers: &mut HeaderMap, request_id: &HeaderValue) {
        self.response_trailers(headers);
        headers.insert(X_REQUEST_ID, request_id.clone());
    }

    /// The same rule for the upstream's response trailers: header fields too, sent after the
    /// body, and just as able to reflect the shared secret.
    pub fn response_trailers(&self, trailers: &mut HeaderMap) {
        strip(trailers, |name| self.injected_names.contains(name));
    }
}

/// `names` plus, for each name written with `_`, its `-` spelling: WSGI servers read both as
/// one header, so a client must not be able to send either.
fn with_dashed_spellings(mut names: Vec<HeaderName>) -> Vec<HeaderName> {
    let dashed: Vec<HeaderName> = names
        .iter()
        .filter(|n| n.as_str().contains('_'))
        .filter_map(dashed)
        .collect();
    names.extend(dashed);
    names
}

/// Removes the hop-by-hop headers, every header the `Connection` header names, and every
/// header `owned` accepts, also when the client spelled its name with `_` for `-` (`owned`
/// lists the `-` spelling of names configured with `_`, see [`with_dashed_spellings`]).
///
/// One pass over the few names present instead of a hash lookup for each of the twenty-odd
/// names that might be: this runs twice per request.
fn strip(headers: &mut HeaderMap, owned: impl Fn(&HeaderName) -> bool) {
    // `close` and names already hop-by-hop (`keep-alive`, sent on most responses) need no
    // lookup, which would allocate a name per response.
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter(|token| {
            !token.eq_ignore_ascii_case(b"close")
                && !HOP_BY_HOP
                    .iter()
                    .any(|h| token.eq_ignore_ascii_case(h.as_str().as_bytes()))
        })
        .filter_map(|token| HeaderName::from_bytes(token).ok())
        .collect();
    let doomed = |name: &HeaderName| {
        HOP_BY_HOP.contains(name)
            || named.contains(name)
            || owned(name)
            || (name.as_str().as_bytes().contains(&b'_') && dashed(name).is_some_and(|d| owned(&d)))
    };
    // Removing a name reorders the map, so each pass starts over; a pass takes up to
    // `found.len()` names, and a next one runs only if it found more (nearly never: a
    // response usually has one, `Connection`).
    loop {
        let mut found: [Option<HeaderName>; 4] = Default::default();
        let mut names = headers.keys().filter(|name| doomed(name));
        for (slot, name) in found.iter_mut().zip(&mut names) {
            *slot = Some(name.clone());
        }
        let more = names.next().is_some();
        for name in found.iter().flatten() {
            headers.remove(name);
        }
        if !more {
            return;
        }
    }
}

/// The name with `_` read as `-`, as WSGI servers and some others merge them.
fn dashed(name: &HeaderName) -> Option<HeaderName> {
    HeaderName::from_bytes(name.as_str().replace('_', "-").as_bytes()).ok()
}

/// The client's `X-Request-Id` if there is exactly one and it is sane (1–128 characters of
/// letters, digits and `-_.:+/=`), else a new one: 32 hex digits, a per-process random
/// prefix and a counter, unique across replicas without a lock or a syscall per request.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    let mut sent = headers.get_all(X_REQUEST_ID).iter();
    if let (Some(id), None) = (sent.next(), sent.next()) {
        let bytes = id.as_bytes();
        let sane = (1..=128).contains(&bytes.len())
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:+/=".contains(b));
        if sane {
            return id.clone();
        }
    }
    generate_request_id()
}

fn generate_request_id() -> HeaderValue {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    // The prefix's digits, written once.
    static PREFIX: OnceLock<[u8; 16]> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = PREFIX.get_or_init(|| {
        let mut seed = [0u8; 8];
        // Without OS randomness, fall back to the time: ids stay unique per process.
        if getrandom::fill(&mut seed).is_err() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            seed = (nanos ^ u64::from(std::process::id())).to_le_bytes();
        }
        hex16(u64::from_le_bytes(seed))
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut id = [0u8; 32];
    id[..16].copy_from_slice(prefix);
    id[16..].copy_from_slice(&hex16(n));
    HeaderValue::from_bytes(&id).expect("hex digits are valid header text")
}

/// `n` as 16 lower-case hex digits.
fn hex16(n: u64) -> [u8; 16] {
    let mut hex = [0u8; 16];
    for (i, digit) in hex.iter_mut().enumerate() {
        *digit = b"0123456789abcdef"[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
    hex
}

#[cfg(test)]
mod tests {
    use http::header::CONNECTION;

    use super::*;

    #[test]
    fn sane_request_id_is_kept_and_others_are_replaced() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123_x.y:z"));
        assert_eq!(request_id(&h), "abc-123_x.y:z");
        for bad in ["", "has space", "quote\"", &"x".repeat(129)] {
            h.insert(X_REQUEST_ID, HeaderValue::from_str(bad).unwrap());
            let id = request_id(&h);
            assert_ne!(id, bad);
            assert_eq!(id.len(), 32);
        }
        h.append(X_REQUEST_ID, HeaderValue::from_static("second"));
        assert_eq!(request_id(&h).len(), 32);
    }

    #[test]
    fn generated_request_ids_differ() {
        let h = HeaderMap::new();
        assert_ne!(request_id(&h), request_id(&h));
    }

    #[test]
    fn generated_request_id_is_32_hex_digits() {
        let id = generate_request_id();
        assert_eq!(id.len(), 32);
        assert!(id.as_bytes().iter().all(u8::is_ascii_hexdigit), "{id:?}");
    }

    #[test]
    fn strip_removes_hop_by_hop_connection_named_owned_and_aliases() {
        let mut h = HeaderMap::new();
        h.insert(
            CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret-Hop ,close"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-owned", HeaderValue::from_static("1"));
        h.insert("x_owned", HeaderValue::from_static("1"));
        h.insert("x_other", HeaderValue::from_static("1"));
        strip(&mut h, |name| name == "x-owned");
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["x-kept", "x_other"]);
    }

    /// The first 16 digits are the process's, so replicas never hand out one id twice; the
    /// last 16 count, so one process never does.
    #[test]
    fn generated_request_ids_share_the_process_prefix_and_never_repeat() {
        let first = generate_request_id();
        let ids: Vec<HeaderValue> = (0..1000).map(|_| generate_request_id()).collect();
        for id in &ids {
            assert_eq!(id.as_bytes()[..16], first.as_bytes()[..16], "{id:?}");
        }
        let distinct: std::collections::HashSet<&[u8]> =
            ids.iter().map(HeaderValue::as_bytes).collect();
        assert_eq!(distinct.len(), ids.len());
    }
}
