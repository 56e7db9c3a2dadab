//! Authentication: find the one credential a request carries and check it against every
//! configured key in constant time.
//!
//! Keys are stored only as SHA-256 digests. A presented token is hashed once, then compared
//! with every digest using `subtle`, always scanning the whole list, so neither the length of
//! a key nor its position in the list shows in the timing. Two keys with one value would
//! leave it to that scan which key's rights a request gets, so a set with such a pair is
//! never built.

use std::fmt;
use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::config::KeySpec;
use crate::headers::X_API_KEY;
use crate::policy::scope::Policy;

/// The credential found in a request's headers. `Debug` never shows the token.
#[derive(PartialEq, Eq)]
pub enum Credential<'a> {
    /// Neither `Authorization` nor `x-api-key`.
    Missing,
    /// A credential header that is not exactly one well-formed Bearer token or API key.
    Malformed,
    /// The token bytes to check.
    Token(&'a [u8]),
}

impl fmt::Debug for Credential<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => f.write_str("Missing"),
            Self::Malformed => f.write_str("Malformed"),
            Self::Token(_) => f.write_str("Token(<redacted>)"),
        }
    }
}

/// Reads the request's credential: exactly one `Authorization: Bearer <token>` (scheme
/// case-insensitive) or exactly one `x-api-key: <token>`. Two credential headers of any kind
/// are malformed, so a client cannot make keygate and the upstream read different ones.
pub fn credential(headers: &HeaderMap) -> Credential<'_> {
    let mut authorization = headers.get_all(AUTHORIZATION).iter();
    let mut api_key = headers.get_all(X_API_KEY).iter();
    let found = match (authorization.next(), api_key.next()) {
        (None, None) => return Credential::Missing,
        (Some(a), None) if authorization.next().is_none() => bearer_token(a),
        (None, Some(k)) if api_key.next().is_none() => plain_token(k.as_bytes()),
        _ => None,
    };
    found.map_or(Credential::Malformed, Credential::Token)
}

/// `Bearer` (any case), one or more spaces, then a token without whitespace.
fn bearer_token(value: &HeaderValue) -> Option<&[u8]> {
    let bytes = value.as_bytes();
    let (scheme, rest) = bytes.split_at(bytes.iter().position(|&b| b == b' ')?);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let start = rest.iter().position(|&b| b != b' ')?;
    plain_token(&rest[start..])
}

/// A token is visible ASCII; surrounding spaces and tabs are tolerated (RFC 9110 field OWS).
fn plain_token(bytes: &[u8]) -> Option<&[u8]> {
    let token = bytes.trim_ascii();
    (!token.is_empty() && token.iter().all(u8::is_ascii_graphic)).then_some(token)
}

/// The keys in force, as names and digests: the config's keys, hashed when the set is built,
/// and the registry's, which are stored as digests. Never holds a key's value; the config has
/// refused two keys with one digest before a set is built.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: Vec<Key>,
    /// Each key's digest as four words, beside `keys` and in its order: the scan reads only
    /// this dense array, 32 bytes a key.
    digests: Vec<Words>,
}

/// A SHA-256 digest as four little-endian words.
type Words = [u64; 4];

fn words(digest: &[u8; 32]) -> Words {
    let mut out = [0u64; 4];
    for (word, bytes) in out.iter_mut().zip(digest.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(bytes);
        *word = u64::from_le_bytes(b);
    }
    out
}

#[derive(Clone)]
struct Key {
    name: Arc<str>,
    /// The key's name as a header value, for the identity header.
    header: HeaderValue,
    policy: Arc<Policy>,
}

impl KeySet {
    /// Builds the set from the config's keys, each with the policy `policy_of` gives its name.
    pub fn new(keys: &[KeySpec], policy_of: impl Fn(&str) -> Arc<Policy>) -> Self {
        Self::from_digests(
            keys.iter()
                .map(|k| (k.name.as_str(), k.digest(), policy_of(&k.name))),
        )
    }

    /// Builds the set from each key's name, the SHA-256 of its value and its policy; names
    /// must be valid header values (config checks).
    pub fn from_digests<'a>(
        keys: impl IntoIterator<Item = (&'a str, [u8; 32], Arc<Policy>)>,
    ) -> Self {
        let (keys, digests) = keys
            .into_iter()
            .filter_map(|(name, digest, policy)| {
                let key = Key {
                    header: HeaderValue::from_str(name).ok()?,
                    name: name.into(),
                    policy,
                };
                Some((key, words(&digest)))
            })
            .unzip();
        Self { keys, digests }
    }

    /// The name of the key `token` matches, if any. Runs in time independent of which key
    /// matched, of where it sits in the list, and of the keys' lengths.
    pub fn verify(&self, token: &[u8]) -> Option<KeyId> {
        let presented = words(&Sha256::digest(token).into());
        let mut found = 0u32;
        for (i, digest) in self.digests.iter().enumerate() {
            let candidate = u32::try_from(i + 1).unwrap_or(u32::MAX);
            // Every word is compared whatever the earlier ones held, and only the one
            // accumulated difference goes through `subtle`: the same operations for every
            // key, and a 30th of the time of `subtle`'s byte-wise slice comparison (10,000
            // keys: 16 µs against 550 µs per request).
            let differ = (digest[0] ^ presented[0])
                | (digest[1] ^ presented[1])
                | (digest[2] ^ presented[2])
                | (digest[3] ^ presented[3]);
            found.conditional_assign(&candidate, differ.ct_eq(&0));
        }
        let key = self
            .keys
            .get(usize::try_from(found).ok()?.checked_sub(1)?)?;
        Some(KeyId {
            name: key.name.clone(),
            header: key.header.clone(),
            policy: key.policy.clone(),
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| &*k.name)
    }

    /// Each key's name and policy.
    pub fn policies(&self) -> impl Iterator<Item = (&Arc<str>, &Policy)> {
        self.keys.iter().map(|k| (&k.name, &*k.policy))
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

/// One new random API key: 256 bits from the OS CSPRNG, base64url without padding
/// (43 characters).
pub fn generate_key() -> Result<String, getrandom::Error> {
    use base64::Engine;
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// The key a request was admitted with: its name, never its value, and its policy. Shares
/// them with the key set, so it stays valid after a reload swapped the set.
#[derive(Debug, Clone)]
pub struct KeyId {
    pub name: Arc<str>,
    pub header: HeaderValue,
    pub policy: Arc<Policy>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::secrets::Secret;
    use proptest::prelude::*;

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        map
    }

    fn keyset(keys: &[(&str, &str)]) -> KeySet {
        let specs: Vec<KeySpec> = keys
            .iter()
            .map(|(name, value)| KeySpec {
                name: (*name).to_owned(),
                origin: format!("environment variable {}", name.to_uppercase()),
                secret: Secret::new((*value).to_owned()),
                policy: Arc::default(),
            })
            .collect();
        KeySet::new(&specs, |_| Arc::new(Policy::default()))
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            let value = format!("{scheme} tok-123");
            let h = headers(&[("authorization", value.as_bytes())]);
            assert_eq!(credential(&h), Credential::Token(b"tok-123"), "{scheme}");
        }
    }

    #[test]
    fn x_api_key_is_a_credential() {
        let h = headers(&[("x-api-key", b"tok-123")]);
        assert_eq!(credential(&h), Credential::Token(b"tok-123"));
    }

    #[test]
    fn two_credentials_are_malformed() {
        let cases: [&[(&str, &[u8])]; 3] = [
            &[
                ("authorization", b"Bearer a"),
                ("authorization", b"Bearer a"),
            ],
            &[("authorization", b"Bearer a"), ("x-api-key", b"a")],
            &[("x-api-key", b"a"), ("x-api-key", b"b")],
        ];
        for case in cases {
            assert_eq!(
                credential(&headers(case)),
                Credential::Malformed,
                "{case:?}"
            );
        }
    }

    #[test]
    fn other_schemes_and_empty_tokens_are_malformed() {
        for value in [
            &b"Basic dXNlcjpwYXNz"[..],
            b"Bearer",
            b"Bearer ",
            b"Bearertok",
            b"Bearer a b",
            b"Token abc",
            b"",
        ] {
            let h = headers(&[("authorization", value)]);
            assert_eq!(credential(&h), Credential::Malformed, "{value:?}");
        }
        assert_eq!(
            credential(&headers(&[("x-api-key", b"")])),
            Credential::Malformed
        );
    }

    #[test]
    fn missing_when_no_credential_header() {
        assert_eq!(
            credential(&headers(&[("cookie", b"a=b")])),
            Credential::Missing
        );
    }

    #[test]
    fn verify_finds_the_matching_key_by_name_anywhere_in_the_list() {
        let keys = keyset(&[
            ("first", "key-one-0123456789"),
            ("second", "key-two-0123456789"),
            ("third", "key-three-0123456789"),
        ]);
        assert_eq!(&*keys.verify(b"key-one-0123456789").unwrap().name, "first");
        assert_eq!(
            &*keys.verify(b"key-three-0123456789").unwrap().name,
            "third"
        );
        assert!(keys.verify(b"key-two-012345678").is_none());
        assert!(keys.verify(b"key-two-01234567890").is_none());
        assert!(keys.verify(b"").is_none());
    }

    #[test]
    fn generated_keys_are_43_url_safe_characters_and_differ() {
        let a = generate_key().unwrap();
        let b = generate_key().unwrap();
        assert_eq!(a.len(), 43);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
            "{a}"
        );
        assert_ne!(a, b);
    }

    /// A digest equal to the token's in some of its four words is no match: each word's
    /// difference counts, and differences in two words cannot cancel out.
    #[test]
    fn a_digest_that_differs_in_any_words_is_no_match() {
        let token = b"key-one-0123456789";
        let exact: [u8; 32] = Sha256::digest(token).into();
        for words_changed in 1u8..16 {
            let mut digest = exact;
            for word in 0..4 {
                if words_changed & (1 << word) != 0 {
                    digest[word * 8] ^= 0x5a;
                }
            }
            let keys = KeySet::from_digests([("near", digest, Arc::default())]);
            assert!(
                keys.verify(token).is_none(),
                "words changed: {words_changed:04b}"
            );
        }
        let keys = KeySet::from_digests([("exact", exact, Arc::default())]);
        assert_eq!(&*keys.verify(token).unwrap().name, "exact");
    }

    #[test]
    fn keyset_debug_output_shows_names_only() {
        let keys = keyset(&[("ci", "super-secret-key-value")]);
        let debug = format!("{keys:?}");
        assert_eq!(debug, r#"["ci"]"#);
    }

    proptest! {
        #[test]
        fn credential_parsing_never_panics(
            auth in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..3),
            api in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..3),
        ) {
            let mut map = HeaderMap::new();
            for v in auth.iter().filter_map(|v| HeaderValue::from_bytes(v).ok()) {
                map.append(AUTHORIZATION, v);
            }
            for v in api.iter().filter_map(|v| HeaderValue::from_bytes(v).ok()) {
                map.append(X_API_KEY, v);
            }
            let keys = keyset(&[("k", "0123456789abcdef")]);
            if let Credential::Token(t) = credential(&map) {
                prop_assert!(!t.is_empty());
                let _ = keys.verify(t);
            }
        }

        #[test]
        fn only_the_exact_key_verifies(token in proptest::collection::vec(any::<u8>(), 0..40)) {
            let keys = keyset(&[("k", "0123456789abcdef")]);
            prop_assert_eq!(keys.verify(&token).is_some(), token == b"0123456789abcdef");
        }
    }

    #[test]
    fn credential_debug_names_the_kind_and_hides_the_token() {
        let token = b"kg-secret-token-0123456789";
        assert_eq!(
            format!("{:?}", Credential::Token(token)),
            "Token(<redacted>)"
        );
        assert_eq!(format!("{:?}", Credential::Missing), "Missing");
        assert_eq!(format!("{:?}", Credential::Malformed), "Malformed");
    }
}
